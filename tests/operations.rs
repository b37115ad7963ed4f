//! Operations: the HTTP endpoint, JSON logs, the stats line, reloading the
//! workers (SIGHUP, --reload). The real binary against the sandbox, with real
//! Python workers.

mod common;

use common::*;
use serde_json::{json, Value};

fn wait_ready(addr: &str, d: &Daemon) {
    assert!(
        wait_for(DEADLINE, || get(addr, "/readyz").0 == 200),
        "never ready: {:?}; log:\n{}",
        get(addr, "/readyz"),
        d.log()
    );
}

#[test]
fn health_readiness_and_metrics_count_real_traffic() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "echo3:app", HTTP), &[]);
    let addr = endpoint(&d);
    assert_eq!(get(&addr, "/healthz"), (200, "ok\n".to_string()));
    wait_ready(&addr, &d);
    assert_eq!(get(&addr, "/readyz").1, "ready\n");

    for i in 0..5 {
        sb.inject_text(61, &format!("m{i}"));
    }
    sb.inject_raw(json!({"poll": {"id": "p1", "question": "?", "options": []}}));
    assert_eq!(wait_texts(&sb, 61, 5, &d).len(), 5);

    // The Sender counts a call once its answer is back, a moment after the
    // sandbox recorded it: scrape until the counts are in.
    let mut text = String::new();
    let counted = wait_for(DEADLINE, || {
        let (status, body) = get(&addr, "/metrics");
        assert_eq!(status, 200);
        text = body;
        sample(
            &text,
            "asgigram_api_calls_total{method=\"sendMessage\",outcome=\"ok\"}",
        ) == Some(5.0)
    });
    assert!(counted, "sendMessage not counted:\n{text}");
    let expect = [
        ("asgigram_updates_received_total{kind=\"message\"}", 5.0),
        ("asgigram_updates_received_total{kind=\"poll\"}", 1.0),
        ("asgigram_updates_delivered_total{kind=\"message\"}", 5.0),
        ("asgigram_updates_skipped_total{kind=\"poll\"}", 1.0),
        (
            "asgigram_api_calls_total{method=\"getMe\",outcome=\"ok\"}",
            1.0,
        ),
        ("asgigram_api_rate_limited_total", 0.0),
        ("asgigram_scopes_started_total", 1.0),
        ("asgigram_workers_configured", 1.0),
        ("asgigram_workers_ready", 1.0),
        ("asgigram_worker_restarts_total", 0.0),
        ("asgigram_ready", 1.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&text, series), Some(value), "{series} in:\n{text}");
    }
    assert!(
        sample(&text, "asgigram_poll_duration_seconds_count").is_some_and(|n| n >= 1.0),
        "{text}"
    );
    assert!(text.contains("# TYPE asgigram_poll_duration_seconds histogram"));
    // Every update was received (or skipped): the journal empties, and it
    // has a file on disk.
    let emptied = wait_for(DEADLINE, || {
        text = get(&addr, "/metrics").1;
        sample(&text, "asgigram_journal_entries") == Some(0.0)
    });
    assert!(emptied, "journal not emptied:\n{text}");
    assert!(
        sample(&text, "asgigram_journal_bytes").is_some_and(|b| b > 0.0),
        "{text}"
    );
    assert_eq!(get(&addr, "/nothing").0, 404);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    // The HTTP server's own lines ("starting 1 workers") say again what the
    // daemon says of it, so they are left to debug level.
    assert!(!log.contains("actix_server"), "{log}");
}

/// Readiness while the token is rejected. The daemon exits (code 3) once
/// getUpdates answers 401, so the test needs the process to outlive the
/// 401 for a while: a chat's instance that ignores `telegram.disconnect`
/// keeps the shutdown's disconnect phase waiting for the whole grace period
/// (10 s here), during which `/readyz` must say why it is not ready.
#[test]
fn readiness_turns_false_while_the_token_is_rejected() {
    let sb = sandbox();
    let d = Daemon::start(
        &config_for(
            &sb,
            "goodbye:app",
            &format!("{HTTP}\n[scopes]\ndisconnect_grace = 10\n"),
        ),
        &[],
    );
    let addr = endpoint(&d);
    wait_ready(&addr, &d);
    sb.inject_text(71, "stubborn");
    assert_eq!(wait_texts(&sb, 71, 1, &d), vec!["hi"]);

    sb.set_token_rejected(true);
    let mut last = (0, String::new());
    let seen = wait_for(DEADLINE, || {
        last = get(&addr, "/readyz");
        last.0 == 503 && last.1.contains("rejected the token")
    });
    assert!(seen, "last /readyz answer {last:?}; log:\n{}", d.log());
    assert_eq!(get(&addr, "/healthz").0, 200, "alive while not ready");
    let (_, metrics) = get(&addr, "/metrics");
    assert_eq!(sample(&metrics, "asgigram_ready"), Some(0.0), "{metrics}");
    assert!(
        sample(
            &metrics,
            "asgigram_api_calls_total{method=\"getUpdates\",outcome=\"401\"}"
        )
        .is_some_and(|n| n >= 1.0),
        "{metrics}"
    );
    let mut d = d;
    assert_eq!(d.wait_exit().code(), Some(3), "{}", d.log());
}

#[test]
fn json_logs_parse_carry_fields_and_never_the_token() {
    let sb = sandbox();
    let d = Daemon::start(
        &config_for(
            &sb,
            "printer:app",
            "[log]\nformat = \"json\"\nlevel = \"debug\"\nstats_interval = 1\n",
        ),
        &[],
    );
    sb.inject_text(81, "x");
    wait_texts(&sb, 81, 1, &d);
    assert!(d.wait_log("updates_received=1"), "{}", d.log());
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains(TOKEN), "token leaked");
    assert!(!log.contains("SECRET-token"), "part of the token leaked");

    let lines: Vec<Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l:?}")))
        .collect();
    for v in &lines {
        for key in ["timestamp", "level", "target", "message"] {
            assert!(v[key].is_string(), "{key} missing in {v}");
        }
        assert!(v["fields"].is_object(), "fields missing in {v}");
    }
    let message = |needle: &str| {
        lines
            .iter()
            .find(|v| v["message"].as_str().is_some_and(|m| m.contains(needle)))
            .unwrap_or_else(|| panic!("no line with {needle:?} in:\n{log}"))
    };
    for lifecycle in [
        "Waiting for application startup.",
        "Application startup complete.",
        "Polling Telegram as @",
        "Shutting down",
        "Finished.",
    ] {
        message(lifecycle);
    }
    let ready = message(" ready: ASGI ");
    assert!(ready["fields"]["pid"].is_u64(), "{ready}");
    assert_eq!(ready["fields"]["worker"], 0, "{ready}");
    // A stats line may come before the update did; take one after it.
    let stats = message("stats updates_received=1 ");
    assert_eq!(stats["fields"]["updates_received"], 1, "{stats}");
    assert_eq!(stats["fields"]["workers_ready"], 1, "{stats}");
    // Worker output keeps its pid.
    assert!(message("printed by the app: x")["message"]
        .as_str()
        .is_some_and(|m| m.starts_with("[worker ")));
}

#[test]
fn sighup_replaces_every_worker_and_loses_nothing() {
    let sb = sandbox();
    // Its instances linger after telegram.disconnect, so updates arrive for
    // chats whose old instance is still winding down.
    let config = config_for(&sb, "lingering:app", "").replace("[app]\n", "[app]\nworkers = 2\n");
    // Order and exactly-once are the point, not Telegram's pace.
    let d = Daemon::start(
        &config,
        &[
            ("ASGIGRAM_SENDER__LIMITS", "false"),
            ("RUST_LOG", "info,asgigramd::actors::supervisor=debug"),
        ],
    );
    assert!(d.wait_log("Polling Telegram as @"), "{}", d.log());
    let chats = [91, 92, 93];
    let mut expected: Vec<Vec<String>> = vec![Vec::new(); chats.len()];
    let send = |expected: &mut Vec<Vec<String>>, phase: &str, n: usize| {
        for i in 0..n {
            for (c, chat) in chats.iter().enumerate() {
                let text = format!("{phase}{i}");
                sb.inject_text(*chat, &text);
                expected[c].push(text);
            }
        }
    };
    send(&mut expected, "before", 5);
    for (c, chat) in chats.iter().enumerate() {
        wait_texts(&sb, *chat, expected[c].len(), &d);
    }
    let old = worker_pids(&d.log());
    assert_eq!(old.len(), 2, "{}", d.log());

    // SAFETY: kill(2) on the daemon this test started.
    unsafe {
        libc::kill(d.pid(), libc::SIGHUP);
    }
    // Injected while the workers are being replaced: a round every few
    // milliseconds until the reload is complete (bounded).
    let mut round = 0;
    let done = wait_for(DEADLINE, || {
        send(&mut expected, &format!("during{round}."), 1);
        round += 1;
        round >= 5 && d.log().contains("reload complete")
    });
    assert!(done, "{}", d.log());
    send(&mut expected, "after", 2);
    for (c, chat) in chats.iter().enumerate() {
        wait_texts(&sb, *chat, expected[c].len(), &d);
    }

    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    // Exactly once, in order: nothing lost, nothing repeated, also after the
    // Sender drained at shutdown.
    for (c, chat) in chats.iter().enumerate() {
        assert_eq!(
            sb.sent_texts(*chat),
            expected[c],
            "chat {chat}; log:\n{log}"
        );
    }
    let pids = worker_pids(&log);
    assert_eq!(pids.len(), 4, "two replacements started:\n{log}");
    assert!(pids[2..].iter().all(|p| !old.contains(p)), "{pids:?}");
    for pid in &old {
        assert!(
            log.contains(&format!("pid={pid} retired")),
            "worker {pid} retired:\n{log}"
        );
    }
    assert!(!log.contains("died"), "no worker died:\n{log}");
}

#[test]
fn reload_flag_restarts_the_workers_when_a_python_file_changes() {
    let sb = sandbox();
    let app_dir = tempfile::tempdir().expect("temp dir");
    let app = app_dir.path().join("hot.py");
    let source = |prefix: &str| {
        format!(
            "async def app(scope, receive, send):\n    while True:\n        event = await receive()\n        if event[\"type\"] == \"telegram.disconnect\":\n            return\n        await send({{\"type\": \"telegram.send_message\", \"text\": \"{prefix}\" + event[\"text\"]}})\n"
        )
    };
    std::fs::write(&app, source("v1:")).expect("app written");
    let config = config_for(&sb, "hot:app", "").replace(
        &format!("app_dir = \"{}\"", apps_dir().display()),
        &format!("app_dir = \"{}\"", app_dir.path().display()),
    );
    let d = Daemon::start_args(&config, &["--reload"], &[]);
    sb.inject_text(95, "a");
    assert_eq!(wait_texts(&sb, 95, 1, &d), vec!["v1:a"]);

    // A different length, so Python's bytecode cache cannot mistake the new
    // file for the old one even within the same second.
    std::fs::write(&app, source("version two:")).expect("app rewritten");
    assert!(d.wait_log("reload complete"), "{}", d.log());
    sb.inject_text(95, "b");
    assert_eq!(wait_texts(&sb, 95, 2, &d), vec!["v1:a", "version two:b"]);
    assert!(d.log().contains("path="), "{}", d.log());

    // Code that does not import: the reload stops, the running worker stays.
    std::fs::write(&app, "this is not python\n").expect("app broken");
    assert!(d.wait_log("reload aborted"), "{}", d.log());
    sb.inject_text(95, "c");
    assert_eq!(wait_texts(&sb, 95, 3, &d)[2], "version two:c");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn bad_operations_settings_name_their_key() {
    let sb = sandbox();
    for (extra, key) in [
        ("[http]\nbind = \"localhost\"\n", "http.bind"),
        ("[log]\nformat = \"xml\"\n", "log.format"),
        ("[log]\nstats_interval = -1\n", "log.stats_interval"),
    ] {
        let mut d = Daemon::start(&config_for(&sb, "echo3:app", extra), &[]);
        let status = d.wait_exit();
        assert_eq!(status.code(), Some(1), "{extra}: {}", d.log());
        assert!(d.log().contains(key), "{extra}: {}", d.log());
    }
}

#[test]
fn a_reload_whose_new_worker_hangs_on_import_is_aborted_and_the_old_one_stays() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let marker = dir.path().join("hang");
    let d = Daemon::start(
        &config_for(&sb, "hangs_on_import:app", ""),
        &[
            ("ASGIGRAM_APP__STARTUP_TIMEOUT", "2"),
            (
                "HANG_IMPORT_MARKER",
                marker.to_str().expect("utf-8 temp path"),
            ),
        ],
    );
    assert!(d.wait_log("Polling Telegram as @"), "{}", d.log());
    sb.inject_text(95, "before");
    assert_eq!(wait_texts(&sb, 95, 1, &d), vec!["ok:before"]);
    // The new code hangs while it is imported.
    std::fs::write(&marker, "").expect("marker written");
    // SAFETY: kill(2) on the daemon this test started.
    unsafe {
        libc::kill(d.pid(), libc::SIGHUP);
    }
    assert!(
        d.wait_log("not ready within 2s (app.startup_timeout); killing it"),
        "{}",
        d.log()
    );
    assert!(d.wait_log("reload aborted"), "{}", d.log());
    sb.inject_text(95, "after");
    assert_eq!(wait_texts(&sb, 95, 2, &d)[1], "ok:after");
    assert_eq!(
        worker_pids(&d.log()).len(),
        2,
        "no restart loop:\n{}",
        d.log()
    );
}
