//! End to end: the real binary, the sandbox, real Python workers.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::*;
use serde_json::json;

#[test]
fn asgi3_app_echoes_into_the_same_chat() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "echo3:app", ""), &[]);
    sb.inject_text(101, "hello there");
    let texts = wait_texts(&sb, 101, 1, &d);
    assert_eq!(texts, vec!["hello there"]);
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    for line in [
        "Application startup complete.",
        "Polling Telegram as @",
        "Finished.",
    ] {
        assert!(log.contains(line), "missing {line:?} in log:\n{log}");
    }
}

/// The bridge reaches the worker as bytecode on stdin (src/bridge/compiled.rs);
/// the app still finds itself in `__main__` beside the bridge, and its
/// stdin at /dev/null and at its end, as when the source came on the
/// command line.
#[test]
fn the_worker_runs_the_bridge_from_bytecode_and_the_app_sees_stdin_closed() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "process_probe:app", ""), &[]);
    sb.inject_text(102, "probe");
    let texts = wait_texts(&sb, 102, 1, &d);
    let probe = &texts[0];
    assert!(
        probe.starts_with("stdin=/dev/null read='' main=__main__ bridge=True command_bytes="),
        "{probe}"
    );
    let command: usize = probe
        .split("command_bytes=")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no command size in {probe}"));
    assert!(
        command < asgigramd::bridge::BRIDGE_SOURCE.len() / 10,
        "the bridge's source was on the command line ({command} bytes): {probe}"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("could not compile the bridge"), "{log}");
}

#[test]
fn asgi2_class_app_runs_and_reply_to_is_passed_through() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "echo2:App", ""), &[]);
    sb.inject_text(7, "ping");
    assert_eq!(wait_texts(&sb, 7, 1, &d), vec!["v2:ping"]);
    let call = sb
        .calls()
        .into_iter()
        .find(|c| c.method == "sendMessage")
        .expect("a sendMessage call");
    assert!(
        call.params["reply_to_message_id"].is_i64(),
        "{:?}",
        call.params
    );
    assert_eq!(call.params["chat_id"], json!(7));
}

#[test]
fn each_chat_gets_its_own_instance_and_state() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "counter:app", ""), &[]);
    for _ in 0..3 {
        sb.inject_text(1, "a");
    }
    sb.inject_text(2, "b");
    let one = wait_texts(&sb, 1, 3, &d);
    let two = wait_texts(&sb, 2, 1, &d);
    assert_eq!(
        one,
        vec!["chat 1 count 1", "chat 1 count 2", "chat 1 count 3"]
    );
    assert_eq!(two, vec!["chat 2 count 1"]);
}

#[test]
fn replies_keep_per_chat_order_across_chats_and_workers() {
    let sb = sandbox();
    let config = config_for(&sb, "burst:app", "").replace("[app]\n", "[app]\nworkers = 2\n");
    // 45 replies per chat, one chat a group: at Telegram's limits (1/s per
    // chat, 20/min per group) that takes minutes; this test is about order.
    let d = Daemon::start(&config, &[("ASGIGRAM_SENDER__LIMITS", "false")]);
    let chats = [11, 12, 13, -14];
    for i in 0..15 {
        for chat in chats {
            sb.inject_text(chat, &format!("m{i}"));
        }
    }
    for chat in chats {
        let texts = wait_texts(&sb, chat, 45, &d);
        let expected: Vec<String> = (0..15)
            .flat_map(|i| (0..3).map(move |j| format!("m{i}.{j}")))
            .collect();
        assert_eq!(texts, expected, "chat {chat} out of order");
    }
}

#[test]
fn an_app_that_raises_keeps_the_bot_alive_and_the_chat_answering() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "flaky:app", ""), &[]);
    sb.inject_text(5, "one");
    sb.inject_text(5, "boom");
    sb.inject_text(5, "two");
    // "two" was queued behind "boom": the fresh instance must get it.
    let texts = wait_texts(&sb, 5, 2, &d);
    assert_eq!(texts, vec!["ok:one", "ok:two"]);
    sb.inject_text(5, "three");
    assert_eq!(wait_texts(&sb, 5, 3, &d)[2], "ok:three");
    sb.inject_text(6, "other chat");
    assert_eq!(wait_texts(&sb, 6, 1, &d), vec!["ok:other chat"]);
    let (status, log) = d.stop();
    assert!(status.success());
    assert_eq!(
        log.matches("ZeroDivisionError: the app blew up on purpose")
            .count(),
        1,
        "traceback must be logged exactly once:\n{log}"
    );
    assert!(log.contains("Traceback (most recent call last)"), "{log}");
}

#[test]
fn unknown_and_malformed_updates_are_skipped_without_a_crash() {
    let sb = sandbox();
    let d = Daemon::start(
        &config_for(&sb, "echo3:app", "[log]\nlevel = \"debug\"\n"),
        &[],
    );
    sb.inject_raw(json!({"mystery_kind_from_the_future": {"x": 1}}));
    sb.inject_raw(json!({"message": "not an object"}));
    sb.inject_raw(json!({"poll": {"id": "p1", "question": "?", "options": []}}));
    sb.inject_text(9, "still alive");
    assert_eq!(wait_texts(&sb, 9, 1, &d), vec!["still alive"]);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("kind=mystery_kind_from_the_future is unknown"),
        "{log}"
    );
    assert!(log.contains("kind=message is not an object"), "{log}");
    assert!(log.contains("kind=poll has no chat or user"), "{log}");
}

#[test]
fn app_output_goes_to_the_log_with_the_worker_pid() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "printer:app", ""), &[]);
    sb.inject_text(3, "x");
    assert_eq!(wait_texts(&sb, 3, 1, &d), vec!["printed"]);
    assert!(d.wait_log("stdout] printed by the app: x"), "{}", d.log());
    assert!(
        d.wait_log("stderr] stderr line from the app"),
        "{}",
        d.log()
    );
    assert!(d.log().contains("[worker "), "{}", d.log());
}

#[test]
fn the_token_appears_in_no_log_line_even_at_trace_level() {
    let sb = sandbox();
    let d = Daemon::start(
        &config_for(&sb, "printer:app", ""),
        &[("RUST_LOG", "trace")],
    );
    sb.inject_text(3, "x");
    wait_texts(&sb, 3, 1, &d);
    let (status, log) = d.stop();
    assert!(status.success());
    assert!(log.contains("TRACE"), "trace logging was not on:\n{log}");
    assert!(!log.contains(TOKEN), "token leaked into the log");
    assert!(
        !log.contains("SECRET-token"),
        "part of the token leaked into the log"
    );
}

#[test]
fn a_rejected_token_stops_the_daemon_without_printing_it() {
    let sb = sandbox();
    sb.set_token_rejected(true);
    let mut d = Daemon::start(&config_for(&sb, "echo3:app", ""), &[("RUST_LOG", "trace")]);
    let status = d.wait_exit();
    let log = d.log();
    assert_eq!(status.code(), Some(3), "{log}");
    assert!(log.contains("token was rejected"), "{log}");
    assert!(!log.contains(TOKEN), "token leaked");
}

#[test]
fn config_errors_name_the_key_and_start_nothing() {
    let sb = sandbox();
    for (extra, key) in [
        ("[scopes]\nidle_timout = 5\n", "idle_timout"),
        ("[scopes]\nmax_scopes = \"lots\"\n", "max_scopes"),
        ("[log]\nlevel = \"loud\"\n", "log.level"),
    ] {
        let mut d = Daemon::start(&config_for(&sb, "echo3:app", extra), &[]);
        let status = d.wait_exit();
        assert_eq!(status.code(), Some(1), "{extra}");
        assert!(
            d.log().contains(key),
            "error for {extra:?} does not name {key}: {}",
            d.log()
        );
    }
    // A missing token is named too, and nothing was started.
    let config =
        config_for(&sb, "echo3:app", "").replace(&format!("token = \"{}\"", sb.token()), "");
    let mut d = Daemon::start(&config, &[]);
    assert_eq!(d.wait_exit().code(), Some(1));
    assert!(d.log().contains("telegram.token"), "{}", d.log());
    assert!(!d.log().contains("worker"), "{}", d.log());
    assert!(sb.calls().is_empty(), "nothing may reach the Bot API");
}

#[test]
fn environment_overrides_the_file() {
    let sb = sandbox();
    let config = config_for(&sb, "does_not_exist:app", "");
    let d = Daemon::start(&config, &[("ASGIGRAM_APP__APPLICATION", "echo3:app")]);
    sb.inject_text(4, "from env");
    assert_eq!(wait_texts(&sb, 4, 1, &d), vec!["from env"]);
}

#[test]
fn check_imports_the_app_and_reports_errors() {
    let sb = sandbox();
    let ok = Command::new(binary())
        .args(["--check", "--config"])
        .arg(
            write_config(&config_for(&sb, "echo3:app", ""))
                .path()
                .join("c.toml"),
        )
        .output()
        .expect("runs");
    assert!(
        ok.status.success(),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    assert!(String::from_utf8_lossy(&ok.stdout).contains("ok: echo3:app"));

    let dir = write_config(&config_for(&sb, "broken_import:app", ""));
    let bad = Command::new(binary())
        .args(["--check", "--config"])
        .arg(dir.path().join("c.toml"))
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert_eq!(bad.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("module_that_does_not_exist"), "{stderr}");
    assert!(sb.calls().is_empty(), "--check must not call the Bot API");
}

fn write_config(text: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(dir.path().join("c.toml"), text).expect("written");
    dir
}

#[test]
fn the_original_command_line_form_works_with_the_cwd_on_sys_path() {
    let sb = sandbox();
    let state = tempfile::tempdir().expect("temp dir");
    let mut child = Command::new(binary())
        .args([sb.token(), "echo3:app", "--api-url", &sb.api_url()])
        .env("ASGIGRAM_JOURNAL__DIR", state.path())
        .current_dir(apps_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("runs");
    sb.inject_text(8, "original form");
    let ok = sb.wait_until(DEADLINE, |v| v.sent_texts(8).len() == 1);
    let _ = child.kill();
    let _ = child.wait();
    assert!(ok);
    assert_eq!(sb.sent_texts(8), vec!["original form"]);
}

#[test]
fn sandbox_chat_with_piped_input_prints_the_replies_and_exits() {
    // The README's quick start, from the repository root.
    sandbox_chat_echoes(
        Path::new(env!("CARGO_MANIFEST_DIR")),
        "config/asgigram.toml",
    );
}

#[test]
fn example_config_finds_its_app_from_any_working_directory() {
    // The example app lives in examples/, named by a relative app_dir that is
    // resolved against the config file, not the working directory.
    let elsewhere = tempfile::tempdir().expect("temp dir");
    let config = concat!(env!("CARGO_MANIFEST_DIR"), "/config/asgigram.toml");
    sandbox_chat_echoes(elsewhere.path(), config);
}

fn sandbox_chat_echoes(cwd: &Path, config: &str) {
    let mut child = Command::new(binary())
        .args(["--sandbox", "--config", config])
        .current_dir(cwd)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("piped");
        stdin.write_all(b"hi\nhow are you?\n").expect("written");
    }
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(std::time::Duration::from_secs(90))
        .expect("the sandbox chat exits by itself once the replies came")
        .expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(stdout, "hi\nhow are you?\n");
}

#[test]
fn max_scopes_evicts_the_longest_idle_scope_which_starts_fresh_later() {
    let sb = sandbox();
    let extra = "[scopes]\nmax_scopes = 2\n";
    let d = Daemon::start(
        &config_for(&sb, "counter:app", extra),
        &[("RUST_LOG", "debug")],
    );
    sb.inject_text(1, "a");
    wait_texts(&sb, 1, 1, &d);
    sb.inject_text(2, "b");
    wait_texts(&sb, 2, 1, &d);
    // A third chat needs room: chat 1 is the longest idle.
    sb.inject_text(3, "c");
    wait_texts(&sb, 3, 1, &d);
    assert!(d.wait_log("scope=chat:1 evicted"), "{}", d.log());
    sb.inject_text(2, "b again");
    sb.inject_text(1, "a again");
    assert_eq!(
        wait_texts(&sb, 2, 2, &d)[1],
        "chat 2 count 2",
        "chat 2 kept its instance"
    );
    assert_eq!(
        wait_texts(&sb, 1, 2, &d)[1],
        "chat 1 count 1",
        "chat 1 starts a fresh instance"
    );
}

#[test]
fn a_killed_worker_is_restarted_and_its_chats_lose_nothing() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "echo3:app", ""), &[]);
    sb.inject_text(21, "before");
    assert_eq!(wait_texts(&sb, 21, 1, &d), vec!["before"]);
    kill_first_worker(&d);
    // Sent while the worker is dying or being replaced.
    for i in 0..5 {
        sb.inject_text(21, &format!("after {i}"));
    }
    assert!(
        d.wait_log("died (killed by signal 9); restarting it"),
        "{}",
        d.log()
    );
    let texts = wait_texts(&sb, 21, 6, &d);
    assert_eq!(
        texts[1..],
        ["after 0", "after 1", "after 2", "after 3", "after 4"]
    );
    assert!(
        worker_pids(&d.log()).len() >= 2,
        "a new worker was started: {}",
        d.log()
    );
}
