//! End to end: aiogram 3 and python-telegram-bot 22 bots, written as their
//! authors write them, run on the real daemon with real workers through
//! `asgigram.aiogram` and `asgigram.ptb` (python/README.md), against the
//! sandbox. Each conversation goes across a worker that kills itself while
//! handling an update: the update is delivered again, the calls it had made
//! are not made twice, and every update is answered once.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

/// The document both bots download, and its SHA-256.
const DOCUMENT: &[u8] = b"adapter test file";
const DOCUMENT_SHA256: &str = "0a5894dcce61fbef140c1e33079eadae40f5249db8cec7066b7564c019e2f6a2";

fn importable(module: &str) -> bool {
    Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

/// How many calls of `method` the sandbox got.
fn count(sb: &asgigramd::sandbox::Sandbox, method: &str) -> usize {
    sb.calls().iter().filter(|c| c.method == method).count()
}

/// The message the bot sent with `text` into `chat`, as Telegram returned it.
fn sent(sb: &asgigramd::sandbox::Sandbox, chat: i64, text: &str) -> Value {
    sb.calls()
        .into_iter()
        .filter(|c| c.method == "sendMessage")
        .filter_map(|c| c.response["result"].as_object().cloned())
        .find(|m| m["chat"]["id"] == chat && m["text"] == text)
        .map(Value::Object)
        .unwrap_or_else(|| panic!("no message {text:?} in chat {chat}"))
}

/// Starts the daemon on `app` with a DIE_MARKER in a temp dir; the marker
/// dir is returned so it lives as long as the test.
fn start(sb: &asgigramd::sandbox::Sandbox, app: &str) -> (Daemon, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let marker = dir.path().join("died");
    let d = Daemon::start(
        &config_for(sb, app, ""),
        &[("DIE_MARKER", marker.to_str().expect("utf-8 temp path"))],
    );
    (d, dir)
}

#[test]
fn an_aiogram_bot_runs_unchanged_across_a_worker_kill() {
    assert!(
        importable("aiogram"),
        "aiogram must be installed (tests/requirements.txt)"
    );
    let sb = sandbox();
    let (d, _marker) = start(&sb, "aiogram_bot:application");
    let chat = 610;
    sb.inject_text(chat, "/start");
    assert_eq!(wait_texts(&sb, chat, 1, &d), vec!["Welcome"]);
    let welcome = sb
        .calls()
        .into_iter()
        .find(|c| c.method == "sendMessage")
        .expect("the welcome was sent");
    assert_eq!(
        welcome.params["reply_markup"]["inline_keyboard"][0][0],
        json!({"text": "Sign up", "callback_data": "form"}),
        "the keyboard builder's markup reaches Telegram"
    );

    // The button: its handler answers the query, sets the form's state,
    // asks for the name, then the worker dies. The update comes again to
    // the restarted worker; its calls are answered from the first ones.
    let user = json!({"id": chat, "is_bot": false, "first_name": format!("User {chat}")});
    sb.inject_update(json!({"callback_query": {
        "id": "cq-form", "from": user, "chat_instance": "ci", "data": "form",
        "message": sent(&sb, chat, "Welcome"),
    }}));
    for text in ["Ann", "old", "33", "/bad"] {
        sb.inject_text(chat, text);
    }
    sb.inject_document(chat, DOCUMENT, "notes.txt");
    let texts = wait_texts(&sb, chat, 7, &d);
    assert_eq!(
        texts,
        vec![
            "Welcome".to_string(),
            "Your name?".into(),
            "Your age?".into(),
            "Age is a number".into(),
            "Thanks Ann, 33".into(),
            "caught TelegramBadRequest: Bad Request: message to edit not found".into(),
            format!("got {} bytes sha256={DOCUMENT_SHA256}", DOCUMENT.len()),
        ],
        "every update answered once, in order; log:\n{}",
        d.log()
    );
    assert!(d.log().contains("restarting it"), "{}", d.log());
    assert_eq!(count(&sb, "answerCallbackQuery"), 1, "made once");
    let answer = sb
        .calls()
        .into_iter()
        .find(|c| c.method == "answerCallbackQuery")
        .expect("counted above");
    assert_eq!(answer.params["callback_query_id"], "cq-form");
    assert_eq!(answer.params["text"], "Let's go");
    // The startup hook ran in lifespan, at each worker start.
    assert!(count(&sb, "setMyCommands") >= 1, "{}", d.log());
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains(TOKEN), "the token never reaches the log");
}

#[test]
fn a_python_telegram_bot_conversation_runs_unchanged_across_a_worker_kill() {
    assert!(
        importable("telegram.ext"),
        "python-telegram-bot must be installed (tests/requirements.txt)"
    );
    let sb = sandbox();
    let (d, _marker) = start(&sb, "ptb_bot:application");
    let chat = 620;
    // /start replies, then the worker dies; the update comes again to the
    // restarted worker, which enters the conversation there.
    for text in ["/start", "Bob", "old", "41", "/bad", "/boom"] {
        sb.inject_text(chat, text);
    }
    sb.inject_document(chat, DOCUMENT, "notes.txt");
    let texts = wait_texts(&sb, chat, 7, &d);
    assert_eq!(
        texts,
        vec![
            "Hi! What's your name?".to_string(),
            "How old are you?".into(),
            "Age is a number".into(),
            "Thanks Bob, 41 (starts: 1)".into(),
            "caught BadRequest: Message to edit not found".into(),
            "error handler: boom".into(),
            format!("got {} bytes sha256={DOCUMENT_SHA256}", DOCUMENT.len()),
        ],
        "every update answered once, in order; log:\n{}",
        d.log()
    );
    assert!(d.log().contains("restarting it"), "{}", d.log());
    // post_init ran in lifespan, at each worker start, and getMe was not
    // asked again: the daemon's answer is in the scope.
    assert!(count(&sb, "setMyCommands") >= 1, "{}", d.log());
    assert_eq!(count(&sb, "getMe"), 1, "only the daemon's own getMe");
    // A second conversation in another chat, on the same worker.
    for text in ["/start", "/cancel"] {
        sb.inject_text(chat + 1, text);
    }
    assert_eq!(
        wait_texts(&sb, chat + 1, 2, &d),
        vec!["Hi! What's your name?", "Cancelled"]
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(!log.contains(TOKEN), "the token never reaches the log");
}
