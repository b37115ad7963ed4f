//! Calls from outside any chat: the lifespan scope sends `telegram.api` and
//! `telegram.send_message` events (docs/protocol.md, "Calls from the
//! lifespan scope"). End to end: the real binary, the sandbox, real Python
//! workers running tests/apps/lifespan_calls.py.

mod common;

use asgigramd::sandbox::{Fault, FaultPlan};
use common::*;
use serde_json::json;

const CHATS: [i64; 3] = [301, 302, 303];

fn register_chats(sb: &asgigramd::sandbox::Sandbox) {
    for id in CHATS {
        sb.register_chat(json!({"id": id, "type": "private", "first_name": format!("user{id}")}));
    }
}

fn broadcast_env() -> String {
    CHATS.map(|c| c.to_string()).join(",")
}

#[test]
fn the_lifespan_scope_sets_commands_broadcasts_and_gets_its_responses() {
    let sb = sandbox();
    register_chats(&sb);
    let chats = broadcast_env();
    let d = Daemon::start(
        &config_for(&sb, "lifespan_calls:app", ""),
        &[("LIFESPAN_BROADCAST", &chats)],
    );

    // setMyCommands during startup reached Telegram with its parameters.
    let ok = sb.wait_until(DEADLINE, |v| !v.calls_to("setMyCommands").is_empty());
    assert!(ok, "no setMyCommands; log:\n{}", d.log());
    let commands = sb.inspect(|v| v.calls_to("setMyCommands")[0].params.clone());
    assert_eq!(
        commands["commands"],
        json!([{"command": "start", "description": "Start"},
               {"command": "help", "description": "Help"}])
    );

    // The task started in lifespan broadcast to every chat, in order per chat.
    for chat in CHATS {
        assert_eq!(wait_texts(&sb, chat, 2, &d), ["news 1", "news 2"]);
    }

    // What the lifespan saw: the bot in its scope, send_message without
    // chat_id rejected in send(), the startup call's response in receive(),
    // and, after startup, a later call's response there too.
    let mut status = String::new();
    let answered = wait_for(DEADLINE, || {
        let n = sb.sent_texts(400).len();
        sb.inject_text(400, "status");
        status = wait_texts(&sb, 400, n + 1, &d).pop().unwrap_or_default();
        status.contains("later=")
    });
    assert!(
        answered,
        "no later response in {status:?}; log:\n{}",
        d.log()
    );
    let username = sb.bot()["username"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(
        status,
        format!(
            "bot={username} rejected=ValueError commands=telegram.api.response:commands:True \
             later=telegram.api.response:2:True"
        )
    );
    assert!(
        d.log()
            .contains("lifespan: telegram.send_message requires 'chat_id' in the lifespan scope"),
        "{}",
        d.log()
    );
    // Nothing without a chat_id reached Telegram.
    let sends = sb.inspect(|v| v.calls_to("sendMessage").len());
    assert_eq!(sends, CHATS.len() * 2 + sb.sent_texts(400).len());

    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert!(log.contains("lifespan shutdown ran"), "{log}");
}

#[test]
fn a_lifespan_call_is_stored_before_it_goes_and_survives_kill_9() {
    let sb = sandbox();
    register_chats(&sb);
    let state = tempfile::tempdir().expect("temp dir");
    let state_dir = state.path().to_str().expect("utf-8 temp path");
    // Every sendMessage fails for now: the broadcast is in the Sender's
    // retries when the daemon is killed.
    sb.set_faults(FaultPlan {
        rate: 1.0,
        faults: vec![Fault::BadGatewayJson],
        methods: vec!["sendMessage".into()],
        ..FaultPlan::default()
    });
    let chats = broadcast_env();
    let d = Daemon::start(
        &config_for(&sb, "lifespan_calls:app", ""),
        &[
            ("LIFESPAN_BROADCAST", &chats),
            ("ASGIGRAM_JOURNAL__DIR", state_dir),
        ],
    );
    // A call with no cause goes to Telegram only once its outbox row is
    // written: one attempt seen is one call stored.
    let tried = sb.wait_until(DEADLINE, |v| {
        v.calls_to("sendMessage")
            .iter()
            .any(|c| c.params["chat_id"] == json!(CHATS[0]) && c.params["text"] == "news 1")
    });
    assert!(tried, "the broadcast was not tried; log:\n{}", d.log());
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(d.pid(), libc::SIGKILL);
    }
    drop(d);

    sb.set_faults(FaultPlan::default());
    // No broadcast this time: what arrives was stored by the first daemon.
    let d = Daemon::start(
        &config_for(&sb, "lifespan_calls:app", ""),
        &[("ASGIGRAM_JOURNAL__DIR", state_dir)],
    );
    let texts = wait_texts(&sb, CHATS[0], 1, &d);
    assert_eq!(texts[0], "news 1", "{texts:?}");
    assert!(
        d.wait_log("sending") && d.log().contains("call(s) the apps made before the restart"),
        "{}",
        d.log()
    );
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
}

#[test]
fn an_app_written_for_lifespan_without_calls_runs_as_before() {
    // tests/apps/lifespan_state.py: state, the bot in chat scopes, and a
    // receive() after startup.complete that waits for lifespan.shutdown.
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "lifespan_state:app", ""), &[]);
    sb.inject_text(55, "hi");
    let username = sb.bot()["username"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let texts = wait_texts(&sb, 55, 1, &d);
    assert!(
        texts[0].starts_with(&format!("hello from lifespan @{username} spec=")),
        "{texts:?}"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert!(log.contains("lifespan shutdown ran"), "{log}");
    // Only the chat's reply was sent: the lifespan made no call.
    let methods: Vec<String> = sb.inspect(|v| v.calls().iter().map(|c| c.method.clone()).collect());
    assert_eq!(
        methods.iter().filter(|m| *m != "getMe").collect::<Vec<_>>(),
        ["sendMessage"],
        "{methods:?}"
    );
}
