//! Webhook mode end to end: the real binary receives the sandbox's POSTs
//! (the sandbox plays Telegram's webhook delivery), with real Python
//! workers. The same guarantees as polling: per-chat order, nothing lost
//! or answered twice across kill -9 and a worker's death, and requests
//! that are not Telegram's refused without storing anything.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use asgigramd::sandbox::{Fault, FaultPlan};
use common::*;

const SECRET: &str = "test-secret_for-webhooks";
const PATH: &str = "/tg/hook";

fn webhook_section(port: u16) -> String {
    format!(
        "[webhook]\nurl = \"http://127.0.0.1:{port}{PATH}\"\nlisten = \"127.0.0.1:{port}\"\nsecret_token = \"{SECRET}\"\n"
    )
}

/// The recorder app in webhook mode on `port`, its journal in `state`.
fn start(
    sb: &asgigramd::sandbox::Sandbox,
    port: u16,
    state: &Path,
    record: &Path,
    delay: &str,
    extra: &str,
) -> Daemon {
    let config = config_for(
        sb,
        "recorder:app",
        &format!(
            "[sender]\nlimits = false\n\n{}\n{extra}",
            webhook_section(port)
        ),
    );
    let d = start_recording(&config, state, record, delay);
    assert!(
        d.wait_log("Receiving updates by webhook as @"),
        "{}",
        d.log()
    );
    d
}

/// One POST to the receiver: (status, the response's head).
fn post(port: u16, path: &str, secret: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("the receiver accepts");
    s.set_read_timeout(Some(DEADLINE)).expect("set timeout");
    let mut head = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n",
        body.len()
    );
    if let Some(secret) = secret {
        head.push_str(&format!("X-Telegram-Bot-Api-Secret-Token: {secret}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("head written");
    // A refusal may come (and the connection close) before the whole body
    // of an oversized request is written.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).into_owned();
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let head = raw.split("\r\n\r\n").next().unwrap_or("").to_string();
    (status, head)
}

/// A POST whose Content-Length is over the bound: refused on its head.
fn declared_too_large(port: u16) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("the receiver accepts");
    s.set_read_timeout(Some(DEADLINE)).expect("set timeout");
    write!(
        s,
        "POST {PATH} HTTP/1.1\r\nHost: x\r\nX-Telegram-Bot-Api-Secret-Token: {SECRET}\r\nContent-Length: {}\r\n\r\n",
        5 * 1024 * 1024
    )
    .expect("head written");
    status_of(&mut s)
}

/// A POST whose chunked body grows past the bound: refused as it is read.
fn post_chunked(port: u16, body: &[u8]) -> u16 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("the receiver accepts");
    s.set_read_timeout(Some(DEADLINE)).expect("set timeout");
    write!(
        s,
        "POST {PATH} HTTP/1.1\r\nHost: x\r\nX-Telegram-Bot-Api-Secret-Token: {SECRET}\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    .expect("head written");
    for chunk in body.chunks(64 * 1024) {
        let sent = write!(s, "{:x}\r\n", chunk.len())
            .and_then(|()| s.write_all(chunk))
            .and_then(|()| s.write_all(b"\r\n"));
        // The answer may come, and the connection close, before the end.
        if sent.is_err() {
            break;
        }
    }
    let _ = s.write_all(b"0\r\n\r\n");
    status_of(&mut s)
}

fn status_of(s: &mut TcpStream) -> u16 {
    let mut raw = [0u8; 512];
    let n = s.read(&mut raw).expect("an answer");
    String::from_utf8_lossy(&raw[..n])
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {:?}", String::from_utf8_lossy(&raw[..n])))
}

fn text_update(id: i64, chat: i64, text: &str) -> Vec<u8> {
    serde_json::json!({
        "update_id": id,
        "message": {
            "message_id": id, "date": 1, "text": text,
            "chat": {"id": chat, "type": "private", "first_name": "U"},
            "from": {"id": chat, "is_bot": false, "first_name": "U"},
        },
    })
    .to_string()
    .into_bytes()
}

#[test]
fn a_burst_keeps_each_chats_order_and_the_webhook_stays_set_after_stop() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    let port = free_port();
    let d = start(&sb, port, &state, &record, "0", "");
    let (chats, per_chat) = (10, 30);
    for i in 0..per_chat {
        for chat in 0..chats {
            sb.inject_text(300 + chat, &format!("c{chat}-{i}"));
        }
    }
    for chat in 0..chats {
        let texts = wait_texts(&sb, 300 + chat, per_chat, &d);
        let expected: Vec<String> = (0..per_chat).map(|i| format!("c{chat}-{i}")).collect();
        assert_eq!(texts, expected, "chat {chat} out of order");
    }
    let set = sb.inspect(|v| v.calls_to("setWebhook").len());
    assert_eq!(set, 1);
    let calls = sb.calls();
    let call = calls
        .iter()
        .find(|c| c.method == "setWebhook")
        .expect("setWebhook was called");
    assert_eq!(call.params["secret_token"], SECRET);
    assert_eq!(call.params["max_connections"], 40);
    assert!(sb.inspect(|v| v.calls_to("getWebhookInfo").len()) >= 1);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains(SECRET), "the secret was logged:\n{log}");
    assert_eq!(sb.inspect(|v| v.calls_to("deleteWebhook").len()), 0);
    let info = call_api(&sb, "getWebhookInfo", serde_json::json!({}));
    assert_eq!(
        info["result"]["url"],
        format!("http://127.0.0.1:{port}{PATH}"),
        "the webhook stays set"
    );
    // Switching back to polling deletes it first.
    let polling = config_for(&sb, "echo3:app", "[sender]\nlimits = false\n")
        .replace("[telegram]\n", "[telegram]\ndelete_webhook = true\n");
    let p = Daemon::start(&polling, &[]);
    assert!(p.wait_log("Polling Telegram as @"), "{}", p.log());
    assert!(p.wait_log("webhook deleted"), "{}", p.log());
}

#[test]
fn kill_9_mid_stream_loses_no_update_and_answers_each_about_once() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    let port = free_port();
    let total = 1000;
    let chats = 20;
    let mut ids = Vec::with_capacity(total);
    for i in 0..total {
        ids.push(sb.inject_text(500 + (i % chats) as i64, &format!("m{i}")));
    }
    for kill_at in [200, 600] {
        let mut d = start(&sb, port, &state, &record, "0.002", "");
        assert!(
            wait_for(Duration::from_secs(60), || received(&record) >= kill_at),
            "only {} received; log:\n{}",
            received(&record),
            d.log()
        );
        // SAFETY: kill(2) on the daemon this test started.
        unsafe {
            libc::kill(d.pid(), libc::SIGKILL);
        }
        d.wait_exit();
    }
    let d = start(&sb, port, &state, &record, "0", "");
    let all = wait_for(Duration::from_secs(60), || received(&record) >= total);
    let seen = receipts(&record);
    let lost: Vec<_> = ids.iter().filter(|id| !seen.contains_key(id)).collect();
    assert!(
        all && lost.is_empty(),
        "{} lost, e.g. {:?}; log:\n{}",
        lost.len(),
        &lost[..lost.len().min(5)],
        d.log()
    );
    let texts: Vec<String> = (0..total).map(|i| format!("m{i}")).collect();
    let range = 500..500 + chats as i64;
    let answered = wait_for(Duration::from_secs(60), || {
        let sent = replies(&sb, range.clone());
        texts.iter().all(|t| sent.contains_key(t))
    });
    let sent = replies(&sb, range);
    assert!(answered, "some unanswered; log:\n{}", d.log());
    // Twice only for what was in doubt at a kill: a call in flight per chat.
    let twice = sent.values().filter(|&&n| n > 1).count();
    assert!(
        twice <= 2 * chats,
        "{twice} answered twice: more than the calls in flight at two kills"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_flaky_bot_api_loses_and_duplicates_nothing() {
    let sb = sandbox();
    // setWebhook, getWebhookInfo and the replies all meet the faults.
    sb.set_faults(FaultPlan::random(
        0.05,
        vec![
            Fault::BadGatewayJson,
            Fault::BadGatewayHtml,
            Fault::DropBeforeExecute,
        ],
    ));
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    let port = free_port();
    let total = 400;
    let d = start(&sb, port, &state, &record, "0", "");
    for i in 0..total {
        sb.inject_text(600 + (i % 20) as i64, &format!("m{i}"));
    }
    assert_received_once_and_answered(&sb, &record, 600..620, total, &d);
}

#[test]
fn a_worker_killed_mid_stream_loses_nothing_and_answers_each_update_once() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    let port = free_port();
    let total = 400;
    let d = start(&sb, port, &state, &record, "0.002", "");
    for i in 0..total {
        sb.inject_text(700 + (i % 20) as i64, &format!("m{i}"));
    }
    assert!(
        wait_for(DEADLINE, || received(&record) >= total / 3),
        "{}",
        d.log()
    );
    kill_first_worker(&d);
    assert!(
        wait_for(DEADLINE, || received(&record) >= total),
        "{}",
        d.log()
    );
    assert!(d.log().contains("restarting it"), "{}", d.log());
    assert!(
        wait_for(DEADLINE, || replies(&sb, 700..720).len() >= total),
        "{}",
        d.log()
    );
    let sent = replies(&sb, 700..720);
    let wrong: Vec<_> = sent.iter().filter(|(_, &n)| n != 1).collect();
    assert!(wrong.is_empty(), "not answered exactly once: {wrong:?}");
}

#[test]
fn requests_that_are_not_telegrams_are_refused_and_nothing_is_stored() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    let port = free_port();
    let d = start(&sb, port, &state, &record, "0", HTTP);
    let ops = endpoint(&d);

    sb.register_chat(serde_json::json!({"id": 77, "type": "private", "first_name": "U"}));
    let update = text_update(900_000_001, 77, "pushed");
    assert_eq!(post(port, PATH, None, &update).0, 401);
    assert_eq!(post(port, PATH, Some("wrong-secret"), &update).0, 401);
    assert_eq!(post(port, "/elsewhere", Some(SECRET), &update).0, 404);
    assert_eq!(post(port, PATH, Some(SECRET), b"{not json").0, 400);
    assert_eq!(post(port, PATH, Some(SECRET), b"[1,2]").0, 400);
    assert_eq!(
        post(port, PATH, Some(SECRET), br#"{"message":{}}"#).0,
        400,
        "no update_id"
    );
    assert_eq!(declared_too_large(port), 413);
    let huge = vec![b' '; 5 * 1024 * 1024];
    assert_eq!(post_chunked(port, &huge), 413);
    // None of them reached an app, the right one does, once, however often
    // it is sent.
    assert_eq!(post(port, PATH, Some(SECRET), &update).0, 200);
    assert_eq!(wait_texts(&sb, 77, 1, &d), vec!["pushed"]);
    assert_eq!(post(port, PATH, Some(SECRET), &update).0, 200);
    assert_eq!(post(port, PATH, Some(SECRET), &update).0, 200);
    let next = text_update(900_000_002, 77, "next");
    assert_eq!(post(port, PATH, Some(SECRET), &next).0, 200);
    assert_eq!(wait_texts(&sb, 77, 2, &d), vec!["pushed", "next"]);
    let seen = receipts(&record);
    assert_eq!(seen.get(&900_000_001), Some(&1), "{seen:?}");
    assert_eq!(seen.len(), 2, "{seen:?}");

    let (status, ready) = get(&ops, "/readyz");
    assert_eq!(status, 200, "{ready}");
    assert!(
        ready.contains("webhook: set; last error: none; refused requests: 8"),
        "{ready}"
    );
    let (_, metrics) = get(&ops, "/metrics");
    let count = |outcome: &str| {
        sample(
            &metrics,
            &format!("asgigram_webhook_requests_total{{outcome=\"{outcome}\"}}"),
        )
    };
    assert_eq!(count("unauthorized"), Some(2.0), "{metrics}");
    assert_eq!(count("not_found"), Some(1.0));
    assert_eq!(count("bad_request"), Some(3.0));
    assert_eq!(count("too_large"), Some(2.0));
    assert_eq!(count("accepted"), Some(2.0));
    assert_eq!(count("duplicate"), Some(2.0));
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    // Logged once per reason in the interval, not per request.
    let lines = log.matches("webhook: refused a request").count();
    assert_eq!(lines, 4, "{log}");
    assert!(!log.contains(SECRET), "the secret was logged:\n{log}");
    assert!(!log.contains("wrong-secret"), "a guess was logged:\n{log}");
}

#[test]
fn backpressure_answers_503_with_retry_after_and_telegram_holds_the_rest() {
    let sb = sandbox();
    let port = free_port();
    let config = config_for(
        &sb,
        "stuck:app",
        &format!(
            "[scopes]\nstall_warning = 2\n\n[journal]\nmax_undelivered = 5\n\n{}",
            webhook_section(port)
        ),
    );
    let d = Daemon::start(&config, &[]);
    assert!(
        d.wait_log("Receiving updates by webhook as @"),
        "{}",
        d.log()
    );
    sb.inject_text(1, "hang");
    for i in 0..20 {
        sb.inject_text(1, &format!("queued {i}"));
    }
    sb.inject_text(2, "other chat");
    assert!(d.wait_log("webhook requests answered 503"), "{}", d.log());
    let (status, head) = post(port, PATH, Some(SECRET), &text_update(42, 3, "x"));
    let pending = sb.pending_updates();
    // Unless the stall was reported meanwhile, which lifts the pause.
    if !d.log().contains("has not received an event") {
        assert_eq!(status, 503, "{head}");
        assert!(head.to_ascii_lowercase().contains("retry-after:"), "{head}");
        assert!(pending >= 10, "{pending} left at the Bot API");
    }
    // Chat 2 is not held up by chat 1; once chat 1 is reported stalled its
    // queue stops counting, and the requests held back are taken again.
    assert_eq!(wait_texts(&sb, 2, 1, &d), vec!["ok:other chat"]);
    assert!(d.wait_log("webhook requests accepted again"), "{}", d.log());
    assert!(
        sb.inspect(|v| v.webhook_deliveries().1) > 0,
        "the sandbox saw refusals"
    );
}

/// The daemon serves HTTPS itself with `webhook.tls_cert`/`tls_key`, and
/// sends the certificate with setWebhook when asked to.
#[test]
fn with_a_certificate_the_receiver_speaks_https_and_uploads_it() {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};
    use std::sync::Arc;

    let sb = sandbox();
    sb.register_chat(serde_json::json!({"id": 88, "type": "private", "first_name": "U"}));
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let cert = fixtures.join("webhook-cert.pem");
    let port = free_port();
    let tls = format!(
        "tls_cert = \"{}\"\ntls_key = \"{}\"\nupload_certificate = true\n",
        cert.display(),
        fixtures.join("webhook-key.pem").display()
    );
    let config = config_for(
        &sb,
        "recorder:app",
        &format!(
            "[sender]\nlimits = false\n\n{}{tls}",
            webhook_section(port).replace("http://", "https://")
        ),
    );
    let d = Daemon::start(
        &config,
        &[
            (
                "ASGIGRAM_JOURNAL__DIR",
                state.to_str().expect("utf-8 temp path"),
            ),
            ("RECORD_FILE", record.to_str().expect("utf-8 temp path")),
        ],
    );
    assert!(
        d.wait_log("Receiving updates by webhook as @"),
        "{}",
        d.log()
    );
    assert!(d.log().contains("scheme=https"), "{}", d.log());
    let calls = sb.calls();
    let set = calls
        .iter()
        .find(|c| c.method == "setWebhook")
        .expect("setWebhook was called");
    let uploaded = set
        .files
        .iter()
        .find(|f| f.name == "certificate")
        .expect("the certificate was uploaded");
    assert_eq!(uploaded.bytes, std::fs::read(&cert).expect("the fixture"));

    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(&cert).expect("the fixture") {
        roots.add(c.expect("a certificate")).expect("a usable root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let client = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let name = ServerName::try_from("127.0.0.1").expect("an IP address name");
    let conn = rustls::ClientConnection::new(Arc::new(client), name).expect("a TLS client");
    let sock = TcpStream::connect(("127.0.0.1", port)).expect("the receiver accepts");
    sock.set_read_timeout(Some(DEADLINE)).expect("set timeout");
    let mut tls = rustls::StreamOwned::new(conn, sock);
    let body = text_update(910_000_001, 88, "over tls");
    write!(
        tls,
        "POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Telegram-Bot-Api-Secret-Token: {SECRET}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .expect("head written");
    tls.write_all(&body).expect("body written");
    let mut raw = Vec::new();
    // The server may close without close_notify; what was read counts.
    let _ = tls.read_to_end(&mut raw);
    let answer = String::from_utf8_lossy(&raw);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert_eq!(wait_texts(&sb, 88, 1, &d), vec!["over tls"]);
}

/// Back from webhook to polling: Telegram may still hold an update whose id
/// is below the highest one the webhook delivered (it was refused while
/// later ones of other chats were taken). Polling then starts from what
/// Telegram holds and tells resends by the ids the webhook delivered, so
/// that update is delivered, and one the webhook had delivered is not.
#[test]
fn back_to_polling_an_update_telegram_held_below_the_webhooks_ids_is_delivered() {
    let sb = sandbox();
    let state = StateDir::new();
    let env = state.env();
    let config = config_for(&sb, "echo3:app", "");
    let d = Daemon::start(&config, &env);
    let warm = sb.inject_text(81, "warm");
    assert_eq!(wait_texts(&sb, 81, 1, &d), ["warm"]);
    let (status, first_log) = d.stop();
    assert!(status.success(), "{first_log}");

    // What webhook mode would have left: the webhook delivered two updates
    // (their ids seen, the watermark at the higher), while Telegram still
    // holds them and one below them it never delivered. "warm" itself may
    // still be held too: the stop came before its offset was confirmed.
    let file = std::fs::read_dir(&state.path)
        .expect("the journal's directory exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "sqlite3"))
        .expect("the journal file exists");
    let held = sb.inject_text(81, "held");
    let resent = sb.inject_text(81, "delivered by the webhook");
    let other = sb.inject_text(82, "another chat's, delivered by the webhook");
    assert_eq!((held, resent, other), (warm + 1, warm + 2, warm + 3));
    {
        let c = rusqlite::Connection::open(&file).expect("journal opens");
        for id in [resent, other] {
            c.execute(
                "INSERT INTO seen (update_id, at) VALUES (?1, strftime('%s', 'now'))",
                [id],
            )
            .expect("seen row written");
        }
        c.execute(
            "UPDATE meta SET value = ?1 WHERE key = 'watermark'",
            [other],
        )
        .expect("watermark moved");
    }

    let d = Daemon::start(&config, &env);
    sb.inject_text(81, "after");
    assert!(
        wait_for(DEADLINE, || sb.sent_texts(81).len() >= 3),
        "{}",
        d.log()
    );
    assert!(
        wait_for(DEADLINE, || sb.confirmed_offset() > warm + 4),
        "confirmed {} (warm {warm}), sent {:?}\n{}",
        sb.confirmed_offset(),
        sb.sent_texts(81),
        d.log()
    );
    assert_eq!(
        sb.sent_texts(81),
        ["warm", "held", "after"],
        "the held update delivered, the webhook's and the polled one not again\n\
         first run:\n{first_log}\nsecond run:\n{}",
        d.log()
    );
    assert!(sb.sent_texts(82).is_empty(), "{}", d.log());
}
