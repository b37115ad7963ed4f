//! End to end with the `asgigram` package (python/): a bot written with the
//! first-party API (tests/apps/firstparty.py) and a Django Channels
//! `TelegramConsumer` (tests/apps/telegram_consumer.py), through the real
//! binary, the sandbox and real workers, each across a worker kill with
//! every update answered once. The workers run the interpreter the tests
//! run with (python3 first on PATH: the virtualenv tests/requirements.txt
//! installed the package into).

mod common;

use std::collections::HashMap;
use std::path::Path;

use asgigramd::sandbox::Sandbox;
use common::*;
use serde_json::{json, Value};

fn start(sb: &Sandbox, app: &str, record: &Path) -> Daemon {
    let config = config_for(sb, app, "[sender]\nlimits = false\n");
    Daemon::start(
        &config,
        &[
            ("RECORD_FILE", record.to_str().expect("utf-8 temp path")),
            ("RECORD_DELAY", "0.002"),
        ],
    )
}

/// Sends "m0".."m{total-1}" over `chats` (the apps echo them), kills the
/// worker a third of the way through, and asserts every one was answered
/// exactly once by the restarted worker and its predecessor together.
fn echo_across_a_worker_kill(sb: &Sandbox, d: &Daemon, record: &Path, chats: std::ops::Range<i64>) {
    let total = 300;
    let before = receipts(record).len();
    let width = chats.end - chats.start;
    for i in 0..total {
        sb.inject_text(chats.start + (i as i64 % width), &format!("m{i}"));
    }
    assert!(
        wait_for(DEADLINE, || receipts(record).len() >= before + total / 3),
        "{}",
        d.log()
    );
    kill_first_worker(d);
    let replies = || {
        let mut seen: HashMap<String, usize> = HashMap::new();
        for chat in chats.clone() {
            for text in sb.sent_texts(chat) {
                *seen.entry(text).or_default() += 1;
            }
        }
        seen
    };
    assert!(
        wait_for(DEADLINE, || replies().len() >= total),
        "{}",
        d.log()
    );
    assert!(d.log().contains("restarting it"), "{}", d.log());
    let sent = replies();
    let wrong: Vec<_> = (0..total)
        .map(|i| format!("m{i}"))
        .filter_map(|t| match sent.get(&t) {
            Some(1) => None,
            n => Some((t, n.copied())),
        })
        .collect();
    assert!(wrong.is_empty(), "not answered exactly once: {wrong:?}");
}

/// The successful calls of `method` whose params have `key` = `value`.
fn ok_calls(sb: &Sandbox, method: &str, key: &str, value: &Value) -> Vec<Value> {
    sb.calls()
        .into_iter()
        .filter(|c| c.method == method && c.params.get(key) == Some(value) && c.status == 200)
        .map(|c| c.response["result"].clone())
        .collect()
}

#[test]
fn a_first_party_api_bot_commands_edits_converses_downloads_and_survives_a_worker_kill() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let record = dir.path().join("record");
    let d = start(&sb, "firstparty:application", &record);

    // A command with an inline keyboard, then its button pressed: the
    // callback is answered and the message edited.
    sb.inject_text(31, "/start");
    assert_eq!(wait_texts(&sb, 31, 1, &d), vec!["Hi!"]);
    let hi = ok_calls(&sb, "sendMessage", "text", &json!("Hi!"));
    assert_eq!(
        hi[0]["reply_markup"]["inline_keyboard"][0][0]["callback_data"], "go",
        "{hi:?}"
    );
    sb.inject_update(json!({"callback_query": {
        "id": "cq1", "from": {"id": 31, "is_bot": false, "first_name": "User 31"},
        "chat_instance": "ci", "data": "go", "message": hi[0],
    }}));
    assert!(
        wait_for(DEADLINE, || !ok_calls(
            &sb,
            "editMessageText",
            "text",
            &json!("Gone.")
        )
        .is_empty()),
        "{}",
        d.log()
    );
    assert_eq!(
        ok_calls(
            &sb,
            "answerCallbackQuery",
            "callback_query_id",
            &json!("cq1")
        )
        .len(),
        1
    );

    // A conversation: the handler waits for the chat's next message.
    sb.inject_text(32, "/name");
    assert_eq!(wait_texts(&sb, 32, 1, &d), vec!["Your name?"]);
    sb.inject_text(32, "Ada");
    assert_eq!(wait_texts(&sb, 32, 2, &d)[1], "Hello, Ada");

    // A download, from a plain (sync) handler in a thread.
    sb.inject_document(33, vec![7u8; 1234], "data.bin");
    assert_eq!(wait_texts(&sb, 33, 1, &d), vec!["got 1234 bytes"]);

    // The startup hook's outside-chat call.
    assert!(sb.calls().iter().any(|c| c.method == "setMyCommands"));

    echo_across_a_worker_kill(&sb, &d, &record, 600..620);

    // The restarted worker converses as the first did.
    sb.inject_text(34, "/name");
    assert_eq!(wait_texts(&sb, 34, 1, &d), vec!["Your name?"]);
    sb.inject_text(34, "Bob");
    assert_eq!(wait_texts(&sb, 34, 2, &d)[1], "Hello, Bob");

    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("Traceback"), "{log}");
}

#[test]
fn a_telegram_consumer_ignores_kinds_it_has_no_handler_for_awaits_calls_and_survives_a_worker_kill()
{
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let record = dir.path().join("record");
    let d = start(&sb, "telegram_consumer:application", &record);

    // An edit, which a plain AsyncConsumer dies on, then calls whose
    // results and errors the handlers await.
    let user = json!({"id": 41, "is_bot": false, "first_name": "User 41"});
    sb.inject_update(json!({"edited_message": {
        "message_id": 1, "date": 1, "edit_date": 2, "text": "edited",
        "chat": {"id": 41, "type": "private", "first_name": "User 41"}, "from": user,
    }}));
    sb.inject_text(41, "/who");
    sb.inject_text(41, "/fail");
    let texts = wait_texts(&sb, 41, 2, &d);
    assert_eq!(
        texts[0],
        format!("I am @{}", sb.bot()["username"].as_str().unwrap_or(""))
    );
    assert_eq!(texts[1], "failed: 400");

    echo_across_a_worker_kill(&sb, &d, &record, 700..720);

    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains("Traceback"), "{log}");
}
