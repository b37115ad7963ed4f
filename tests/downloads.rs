//! End to end: `telegram.download` (docs/protocol.md). The app (tests/apps/
//! downloads.py) downloads what users send through the real daemon and the
//! sandbox and answers with the size and SHA-256 it got, or the error.

mod common;

use std::io::Write;
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

/// `len` bytes that are not all alike, the same in every run.
fn content(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed.wrapping_mul(2_654_435_761).max(1);
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

/// The SHA-256 the app computes, by the same library.
fn sha256(bytes: &[u8]) -> String {
    let mut python = Command::new("python3")
        .args([
            "-c",
            "import hashlib, sys; print(hashlib.sha256(sys.stdin.buffer.read()).hexdigest())",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3 is installed (see .ci/run)");
    python
        .stdin
        .take()
        .expect("stdin was piped")
        .write_all(bytes)
        .expect("python3 reads its stdin");
    let out = python.wait_with_output().expect("python3 runs");
    String::from_utf8(out.stdout)
        .expect("a hex digest")
        .trim()
        .to_string()
}

const TOO_BIG: &str = "error 400 Bad Request: file is too big to download";

#[test]
fn files_users_send_are_downloaded_whole_and_the_token_is_in_no_log_line() {
    let sb = sandbox();
    let d = Daemon::start(
        &config_for(&sb, "downloads:app", ""),
        &[("RUST_LOG", "trace")],
    );
    // Larger than the bridge's read buffer (4 MiB) once encoded for the channel.
    let document = content(6_000_000, 1);
    let photo = content(40_000, 2);
    sb.inject_document(501, document.clone(), "big.bin");
    sb.inject_photo(-502, photo.clone());
    let texts = wait_texts(&sb, 501, 1, &d);
    assert_eq!(
        texts,
        vec![format!(
            "bytes size=6000000 sha256={} file_size=6000000 id=True",
            sha256(&document)
        )]
    );
    let texts = wait_texts(&sb, -502, 1, &d);
    assert_eq!(
        texts,
        vec![format!(
            "bytes size=40000 sha256={} file_size=40000 id=True",
            sha256(&photo)
        )]
    );
    let get_files = sb.calls().iter().filter(|c| c.method == "getFile").count();
    assert_eq!(get_files, 2, "one getFile per download");
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert!(log.contains("TRACE"), "trace logging was not on:\n{log}");
    assert!(!log.contains(TOKEN), "the token leaked into the log");
    assert!(!log.contains("SECRET-token"), "part of the token leaked");
    // Nothing even tried to log it: the masking had nothing to hide.
    assert!(
        !log.contains("<redacted>"),
        "a line held the token before it was masked:\n{log}"
    );
}

#[test]
fn a_file_over_20_mb_gets_the_error_response_and_never_a_part() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "downloads:app", ""), &[]);
    // getFile says it is too big: refused without fetching it.
    // Each file's size is faked before the app hears of it (`get <id>`), so
    // getFile can never answer with the true size first.
    let said = sb.add_file(&b"small really"[..], "said.bin");
    assert!(sb.fake_file_size(&said, 21 * 1024 * 1024));
    sb.inject_text(511, &format!("get {said}"));
    let texts = wait_texts(&sb, 511, 1, &d);
    assert!(texts[0].starts_with(TOO_BIG), "{texts:?}");
    assert!(texts[0].contains("(22020096 bytes)"), "{texts:?}");
    assert!(texts[0].ends_with("bots may download files of up to 20 MB"));
    // getFile says it is small, but the body grows past 20 MB as it is
    // read: refused all the same.
    let lied = sb.add_file(content(20 * 1024 * 1024 + 1, 3), "lied.bin");
    assert!(sb.fake_file_size(&lied, 1000));
    sb.inject_text(512, &format!("get {lied}"));
    let texts = wait_texts(&sb, 512, 1, &d);
    assert_eq!(
        texts,
        vec![format!("{TOO_BIG}: bots may download files of up to 20 MB")]
    );
    // And the daemon carries on.
    sb.inject_document(513, &b"fine"[..], "fine.txt");
    let texts = wait_texts(&sb, 513, 1, &d);
    assert!(texts[0].starts_with("bytes size=4 "), "{texts:?}");
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
}

#[test]
fn failures_come_back_in_telegrams_envelope_and_a_download_needs_a_request_id() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "downloads:app", ""), &[]);
    sb.inject_text(521, "get AgADnothing");
    assert_eq!(
        wait_texts(&sb, 521, 1, &d),
        vec!["error 400 Bad Request: invalid file_id"]
    );
    // A file getFile knows but the file server does not have: sent on by a
    // file_id the sandbox never had the bytes of.
    sb.inject_text(522, "hello");
    let sent = call_api(
        &sb,
        "sendPhoto",
        json!({"chat_id": 522, "photo": "AgADghost"}),
    );
    assert_eq!(sent["ok"], true, "{sent}");
    sb.inject_text(522, "get AgADghost");
    assert_eq!(wait_texts(&sb, 522, 1, &d), vec!["error 404 Not Found"]);
    sb.inject_text(523, "no request id");
    let texts = wait_texts(&sb, 523, 1, &d);
    assert!(
        texts[0].starts_with("refused: telegram.download requires a 'request_id'"),
        "{texts:?}"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
}
