//! Events and calls from other programs (docs/protocol.md, "Events and calls
//! from other programs"; docs/reliability.md, "Pushed events"): the real
//! binary, the sandbox, real Python workers, and plain HTTP requests to the
//! endpoint as another program would make them.

mod common;

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::Duration;

use serde_json::{json, Value};

use common::*;

const API_TOKEN: &str = "push-SECRET-3f9c1a";

/// The endpoint on an ephemeral port, opened with [`API_TOKEN`].
fn http_with_token() -> String {
    format!("[http]\nbind = \"127.0.0.1:0\"\napi_token = \"{API_TOKEN}\"\n")
}

fn json_of(body: &str) -> Value {
    serde_json::from_str(body).unwrap_or_else(|e| panic!("not JSON ({e}): {body:?}"))
}

/// Pushes `event` into `chat` with the right token; returns the id it got,
/// asserting the answer is 202.
fn push(addr: &str, chat: i64, event: Value) -> i64 {
    let path = format!("/v1/chats/{chat}/events");
    let (status, body) = post(addr, &path, Some(API_TOKEN), event.to_string().as_bytes());
    assert_eq!(status, 202, "{body}");
    let answer = json_of(&body);
    assert_eq!(answer["ok"], json!(true), "{body}");
    answer["update_id"]
        .as_i64()
        .unwrap_or_else(|| panic!("no id in {body}"))
}

/// The journal file in `state`.
fn journal_file(state: &Path) -> PathBuf {
    std::fs::read_dir(state)
        .expect("the journal's directory exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "sqlite3"))
        .expect("the journal file exists")
}

fn count(c: &rusqlite::Connection, sql: &str) -> i64 {
    c.query_row(sql, [], |r| r.get(0))
        .expect("journal readable")
}

/// The update_ids an app recorded, in the order it received them.
fn record(path: &Path) -> Vec<i64> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn start(sb: &asgigramd::sandbox::Sandbox, state: &Path, record: &Path, delay: &str) -> Daemon {
    let config = config_for(sb, "pushed:app", &http_with_token());
    start_recording(&config, state, record, delay)
}

#[test]
fn a_pushed_event_reaches_the_chats_app_in_order_with_its_updates_and_the_reply_arrives() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let d = start(
        &sb,
        &dir.path().join("state"),
        &dir.path().join("record"),
        "0.3",
    );
    let addr = endpoint(&d);
    assert!(d.wait_log("Polling Telegram as"), "{}", d.log());

    let a = sb.inject_text(50, "a");
    // "a" is with the Supervisor once its batch is confirmed (it is
    // dispatched before it is stored), so the event is pushed after it.
    assert!(
        wait_for(DEADLINE, || sb.confirmed_offset() > a),
        "{}",
        d.log()
    );
    let first = push(&addr, 50, json!({"type": "app.order_shipped", "order": 17}));
    assert!(
        first < 0,
        "pushed ids never collide with Telegram's: {first}"
    );
    sb.inject_text(50, "b");
    assert_eq!(
        wait_texts(&sb, 50, 3, &d),
        ["a", "app.order_shipped order=17 chat=50", "b"]
    );

    // A chat without a live scope: the event starts one.
    sb.register_chat(json!({"id": 51, "type": "group", "title": "g"}));
    let second = push(&addr, 51, json!({"type": "app.ping"}));
    assert_eq!(second, first - 1, "ids count down");
    assert_eq!(wait_texts(&sb, 51, 1, &d), ["app.ping order=None chat=51"]);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_pushed_event_is_answered_202_only_once_it_is_stored() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let d = start(&sb, &state, &dir.path().join("record"), "0");
    let addr = endpoint(&d);
    assert!(d.wait_log("Polling Telegram as"), "{}", d.log());
    let warm = sb.inject_text(71, "warm");
    wait_texts(&sb, 71, 1, &d);
    let file = journal_file(&state);
    let mut other = rusqlite::Connection::open(&file).expect("journal opens");
    let rows = |c: &rusqlite::Connection| {
        count(
            c,
            "SELECT (SELECT COUNT(*) FROM updates) + (SELECT COUNT(*) FROM outbox)
                  + (SELECT COUNT(*) FROM pushed)",
        )
    };
    let stored = |c: &rusqlite::Connection| {
        count(
            c,
            "SELECT COALESCE((SELECT value FROM meta WHERE key = 'watermark'), 0)",
        ) >= warm
    };
    // Nothing more for the daemon to write (see reliability.rs's test that
    // holds the lock): the next write to meet the lock is the event's store.
    assert!(
        wait_for(DEADLINE, || stored(&other) && rows(&other) == 0),
        "{}",
        d.log()
    );
    let lock = other
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .expect("write lock taken");

    let (tx, answered) = mpsc::channel();
    {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let body = json!({"type": "app.held", "order": 1}).to_string();
            let _ = tx.send(post(
                &addr,
                "/v1/chats/71/events",
                Some(API_TOKEN),
                body.as_bytes(),
            ));
        });
    }
    // Delivered while its store waits for the lock...
    assert_eq!(
        wait_texts(&sb, 71, 2, &d)[1],
        "app.held order=1 chat=71",
        "delivered while it is stored"
    );
    assert!(
        answered.try_recv().is_err(),
        "answered before it was stored"
    );
    // ...which fails after SQLite's busy timeout (10 s) and is retried; the
    // request still waits.
    assert!(
        wait_for(Duration::from_secs(40), || d
            .log()
            .contains("journal: cannot store 1 pushed event(s)")),
        "{}",
        d.log()
    );
    assert!(
        answered.try_recv().is_err(),
        "answered after a failed store"
    );
    drop(lock);
    drop(other);
    let (status, body) = answered
        .recv_timeout(Duration::from_secs(60))
        .expect("answered once the lock is gone");
    assert_eq!(status, 202, "{body}");
    // Handled already, so the retried store does not leave it behind to be
    // delivered again at the next start.
    let reader = rusqlite::Connection::open(&file).expect("journal opens");
    assert!(
        wait_for(DEADLINE, || rows(&reader) == 0),
        "left in the journal: {} row(s); log:\n{}",
        rows(&reader),
        d.log()
    );
    assert_eq!(
        sb.sent_texts(71)
            .iter()
            .filter(|t| t.starts_with("app.held"))
            .count(),
        1
    );
}

#[test]
fn a_pushed_event_stored_before_kill_9_is_delivered_after_the_restart_once_and_in_its_place() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let rec = dir.path().join("record");
    let mut d = start(&sb, &state, &rec, "30");
    let addr = endpoint(&d);
    assert!(d.wait_log("Polling Telegram as"), "{}", d.log());

    // The app works on "a" for 30 s; the event and "b" wait behind it.
    let a = sb.inject_text(60, "a");
    assert!(wait_for(DEADLINE, || record(&rec) == [a]), "{}", d.log());
    let pushed = push(&addr, 60, json!({"type": "app.order_shipped", "order": 9}));
    let b = sb.inject_text(60, "b");
    assert!(
        wait_for(DEADLINE, || sb.confirmed_offset() > b),
        "{}",
        d.log()
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(d.pid(), libc::SIGKILL);
    }
    d.wait_exit();
    assert_eq!(
        record(&rec),
        [a],
        "nothing else was received before the kill"
    );
    assert!(sb.sent_texts(60).is_empty());

    let d = start(&sb, &state, &rec, "0");
    assert_eq!(
        wait_texts(&sb, 60, 3, &d),
        ["a", "app.order_shipped order=9 chat=60", "b"],
        "in its place among the chat's updates"
    );
    // "a" was in hand at the kill and is received again (rule 4); the
    // event, never received, is received once.
    assert_eq!(record(&rec), [a, a, pushed, b]);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let journal = rusqlite::Connection::open(journal_file(&state)).expect("journal opens");
    assert_eq!(count(&journal, "SELECT COUNT(*) FROM updates"), 0);
}

#[test]
fn a_call_from_another_program_is_made_through_the_sender_and_answered_with_telegrams_envelope() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let d = start(
        &sb,
        &dir.path().join("state"),
        &dir.path().join("record"),
        "0",
    );
    let addr = endpoint(&d);
    sb.register_chat(json!({"id": 80, "type": "group", "title": "g"}));
    let call = json!({"method": "sendMessage", "params": {"chat_id": 80, "text": "from outside"}});
    let (status, body) = post(
        &addr,
        "/v1/calls",
        Some(API_TOKEN),
        call.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    let answer = json_of(&body);
    assert_eq!(answer["ok"], json!(true), "{body}");
    assert_eq!(answer["result"]["text"], json!("from outside"), "{body}");
    assert!(answer["result"]["message_id"].as_i64().is_some(), "{body}");
    assert_eq!(sb.sent_texts(80), ["from outside"]);

    // Telegram's refusal is its answer, as it gave it.
    let call = json!({"method": "sendMessage", "params": {"chat_id": 555, "text": "x"}});
    let (status, body) = post(
        &addr,
        "/v1/calls",
        Some(API_TOKEN),
        call.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        json_of(&body),
        json!({"ok": false, "error_code": 400, "description": "Bad Request: chat not found"})
    );
}

#[test]
fn a_wrong_token_gets_401_and_bad_input_400_and_nothing_is_stored_nor_the_token_logged() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let rec = dir.path().join("record");
    let config = config_for(
        &sb,
        "pushed:app",
        &format!("{}\n[log]\nlevel = \"debug\"\n", http_with_token()),
    );
    let d = Daemon::start(
        &config,
        &[
            ("ASGIGRAM_JOURNAL__DIR", state.to_str().expect("utf-8")),
            ("RECORD_FILE", rec.to_str().expect("utf-8")),
        ],
    );
    let addr = endpoint(&d);
    assert!(d.wait_log("Polling Telegram as"), "{}", d.log());
    let event = json!({"type": "app.x"}).to_string();

    for token in [None, Some("push-SECRET-wrong"), Some("")] {
        for path in ["/v1/chats/1/events", "/v1/calls"] {
            let (status, body) = post(&addr, path, token, event.as_bytes());
            assert_eq!(status, 401, "{path} {token:?}: {body}");
            assert!(body.is_empty(), "no detail: {body}");
        }
    }

    let big = format!(
        r#"{{"type": "app.x", "pad": "{}"}}"#,
        "x".repeat(asgigramd::push::MAX_BODY)
    );
    let cases: [(&str, &[u8], &str); 9] = [
        ("/v1/chats/1/events", b"not json", "not JSON"),
        (
            "/v1/chats/1/events",
            br#"{"type": "telegram.message"}"#,
            "app.",
        ),
        ("/v1/chats/1/events", br#"{"order": 1}"#, "app."),
        ("/v1/chats/1/events", br#"["app.x"]"#, "JSON object"),
        ("/v1/chats/@chan/events", event.as_bytes(), "not an integer"),
        ("/v1/chats/1/events", big.as_bytes(), "larger than"),
        ("/v1/calls", br#"{"params": {}}"#, "method"),
        (
            "/v1/calls",
            br#"{"method": "sendMessage", "params": 5}"#,
            "params",
        ),
        ("/v1/calls", br#"{"method": "getUpdates"}"#, "daemon's own"),
    ];
    for (path, body, says) in cases {
        let (status, answer) = post(&addr, path, Some(API_TOKEN), body);
        assert_eq!(status, 400, "{path}: {answer}");
        let error = json_of(&answer)["error"].as_str().unwrap_or("").to_string();
        assert!(error.contains(says), "{path}: {answer}");
    }

    let journal = rusqlite::Connection::open(journal_file(&state)).expect("journal opens");
    assert_eq!(
        count(&journal, "SELECT COUNT(*) FROM meta WHERE key = 'pushed'"),
        0,
        "nothing was stored"
    );
    assert_eq!(count(&journal, "SELECT COUNT(*) FROM outbox"), 0);
    // A good one still goes, and is the first the app receives.
    sb.register_chat(json!({"id": 1, "type": "group", "title": "g"}));
    let id = push(&addr, 1, json!({"type": "app.x", "order": 2}));
    assert_eq!(wait_texts(&sb, 1, 1, &d), ["app.x order=2 chat=1"]);
    assert_eq!(record(&rec), [id]);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        log.contains("answered 401"),
        "a debug line per refusal:\n{log}"
    );
    assert!(!log.contains("SECRET"), "a token in the log:\n{log}");
}

#[test]
fn without_an_api_token_the_routes_answer_404_and_the_log_says_why() {
    let sb = sandbox();
    let config = config_for(
        &sb,
        "pushed:app",
        &format!("{HTTP}\n[log]\nlevel = \"debug\"\n"),
    );
    let d = Daemon::start(&config, &[]);
    let addr = endpoint(&d);
    assert!(
        d.wait_log("answer 404: neither http.api_token nor http.api_token_file is set"),
        "{}",
        d.log()
    );
    let event = json!({"type": "app.x"}).to_string();
    for path in ["/v1/chats/1/events", "/v1/calls"] {
        for token in [None, Some(API_TOKEN)] {
            let (status, _) = post(&addr, path, token, event.as_bytes());
            assert_eq!(status, 404, "{path}");
        }
    }
    assert!(
        d.wait_log("http: POST /v1/calls answered 404: neither http.api_token"),
        "{}",
        d.log()
    );
    assert_eq!(
        get(&addr, "/healthz").0,
        200,
        "the rest of the endpoint is on"
    );
}
