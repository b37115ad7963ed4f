//! The Telegram ASGI protocol end to end (docs/protocol.md): update kinds and
//! routing, outgoing events, responses, lifespan, disconnect, Channels.

mod common;

use std::process::Command;

use common::*;
use serde_json::{json, Value};

/// One fixture per update kind of Bot API 10.2, with where it must arrive.
fn fixtures() -> Vec<(&'static str, Value, &'static str)> {
    let user = json!({"id": 501, "is_bot": false, "first_name": "Ann"});
    let chat = json!({"id": -700, "type": "supergroup", "title": "club"});
    let private = json!({"id": 501, "type": "private", "first_name": "Ann"});
    let msg = |c: &Value| json!({"message_id": 1, "date": 1, "chat": c, "from": user, "text": "t"});
    let member = json!({"chat": chat, "from": user, "date": 1,
        "old_chat_member": {"status": "left", "user": user},
        "new_chat_member": {"status": "member", "user": user}});
    vec![
        ("message", msg(&private), "chat:501"),
        ("edited_message", msg(&private), "chat:501"),
        ("channel_post", msg(&chat), "chat:-700"),
        ("edited_channel_post", msg(&chat), "chat:-700"),
        (
            "business_connection",
            json!({"id": "bc1", "user": user, "user_chat_id": 501, "date": 1, "is_enabled": true}),
            "user:501",
        ),
        (
            "business_message",
            json!({"message_id": 2, "date": 1, "chat": private, "from": user, "business_connection_id": "bc1", "text": "b"}),
            "business:bc1:501",
        ),
        (
            "edited_business_message",
            json!({"message_id": 2, "date": 1, "chat": private, "from": user, "business_connection_id": "bc1", "text": "b2"}),
            "business:bc1:501",
        ),
        (
            "deleted_business_messages",
            json!({"business_connection_id": "bc1", "chat": private, "message_ids": [2]}),
            "business:bc1:501",
        ),
        ("guest_message", msg(&chat), "chat:-700"),
        (
            "message_reaction",
            json!({"chat": chat, "message_id": 1, "user": user, "date": 1, "old_reaction": [], "new_reaction": []}),
            "chat:-700",
        ),
        (
            "message_reaction_count",
            json!({"chat": chat, "message_id": 1, "date": 1, "reactions": []}),
            "chat:-700",
        ),
        (
            "inline_query",
            json!({"id": "iq", "from": user, "query": "q", "offset": ""}),
            "user:501",
        ),
        (
            "chosen_inline_result",
            json!({"result_id": "r", "from": user, "query": "q"}),
            "user:501",
        ),
        (
            "callback_query",
            json!({"id": "cq", "from": user, "chat_instance": "ci", "data": "d", "message": msg(&chat)}),
            "chat:-700",
        ),
        (
            "shipping_query",
            json!({"id": "sq", "from": user, "invoice_payload": "p", "shipping_address": {}}),
            "user:501",
        ),
        (
            "pre_checkout_query",
            json!({"id": "pq", "from": user, "currency": "XTR", "total_amount": 1, "invoice_payload": "p"}),
            "user:501",
        ),
        (
            "purchased_paid_media",
            json!({"from": user, "paid_media_payload": "p"}),
            "user:501",
        ),
        (
            "poll_answer",
            json!({"poll_id": "p", "user": user, "option_ids": [0]}),
            "user:501",
        ),
        ("my_chat_member", member.clone(), "chat:-700"),
        ("chat_member", member, "chat:-700"),
        (
            "chat_join_request",
            json!({"chat": chat, "from": user, "user_chat_id": 501, "date": 1}),
            "chat:-700",
        ),
        (
            "chat_boost",
            json!({"chat": chat, "boost": {"boost_id": "b", "add_date": 1, "expiration_date": 2, "source": {"source": "premium", "user": user}}}),
            "chat:-700",
        ),
        (
            "removed_chat_boost",
            json!({"chat": chat, "boost_id": "b", "remove_date": 1, "source": {"source": "premium", "user": user}}),
            "chat:-700",
        ),
        (
            "managed_bot",
            json!({"user": user, "bot": {"id": 9, "is_bot": true, "first_name": "B"}}),
            "user:501",
        ),
        (
            "subscription",
            json!({"user": user, "invoice_payload": "p", "state": "active"}),
            "user:501",
        ),
        (
            "a_kind_from_the_future",
            json!({"chat": chat, "x": 1}),
            "chat:-700",
        ),
    ]
}

#[test]
fn every_update_kind_reaches_its_documented_scope_as_its_event() {
    let sb = sandbox();
    sb.register_chat(json!({"id": -700, "type": "supergroup", "title": "club"}));
    sb.register_chat(json!({"id": 501, "type": "private", "first_name": "Ann"}));
    let config = config_for(&sb, "kinds:app", "[log]\nlevel = \"debug\"\n");
    // chat_member and the reaction kinds come only when asked for, as on Telegram.
    let mut kinds: Vec<String> = fixtures()
        .iter()
        .map(|(k, _, _)| format!("{k:?}"))
        .collect();
    kinds.push("\"poll\"".into());
    let config = config.replace(
        "[telegram]\n",
        &format!("[telegram]\nallowed_updates = [{}]\n", kinds.join(", ")),
    );
    let d = Daemon::start(&config, &[]);
    // allowed_updates applies to updates made after the first getUpdates.
    assert!(
        wait_for(DEADLINE, || sb.inspect(|v| v.is_polling())),
        "{}",
        d.log()
    );
    let mut expected = Vec::new();
    for (kind, object, scope) in fixtures() {
        let id = if kind == "a_kind_from_the_future" {
            // A kind the sandbox does not know either: queued as it is.
            sb.inject_raw(json!({"update_id": 1_900_000_000, kind: object}));
            1_900_000_000
        } else {
            sb.inject_update(json!({ kind: object }))
        };
        expected.push(format!("telegram.{kind} {scope} update={id}"));
    }
    // poll has neither chat nor user: logged and counted, not delivered.
    sb.inject_update(
        json!({"poll": {"id": "p", "question": "?", "options": [], "total_voter_count": 0}}),
    );
    let all = |sb: &asgigramd::sandbox::Sandbox| {
        let mut t = sb.sent_texts(501);
        t.extend(sb.sent_texts(-700));
        t
    };
    let ok = wait_for(DEADLINE, || all(&sb).len() >= expected.len());
    let mut got = all(&sb);
    got.sort();
    expected.sort();
    assert!(ok, "got {got:#?}\nlog:\n{}", d.log());
    assert_eq!(got, expected);
    assert!(d.wait_log("kind=poll has no chat or user"), "{}", d.log());
}

#[test]
fn outgoing_api_calls_responses_uploads_and_validation() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "api:app", ""), &[]);
    let chat = 31;
    for cmd in ["api", "fail", "photo", "album", "keyboard", "bad"] {
        sb.inject_text(chat, cmd);
    }
    let texts = wait_texts(&sb, chat, 7, &d);
    assert_eq!(
        texts,
        vec![
            "via api",
            "response telegram.api.response ok=True id=True",
            "error 7 400 Bad Request: chat not found",
            "photo ok=True",
            "album ok=True n=2",
            "pick",
            "bad TypeError,ValueError,ValueError,TypeError,TypeError",
        ],
        "log:\n{}",
        d.log()
    );
    let calls = sb.calls();
    let photo = calls
        .iter()
        .find(|c| c.method == "sendPhoto")
        .expect("sendPhoto made");
    assert_eq!(
        photo.params["chat_id"],
        json!(chat),
        "chat_id defaults to the scope's chat"
    );
    assert_eq!(photo.files.len(), 1);
    assert_eq!(photo.files[0].file_name.as_deref(), Some("cat.png"));
    assert_eq!(&photo.files[0].bytes[..], b"\x89PNG fake");
    let album = calls
        .iter()
        .find(|c| c.method == "sendMediaGroup")
        .expect("sendMediaGroup made");
    assert_eq!(album.files.len(), 2);
    assert_eq!(album.params["media"][0]["media"], "attach://file0");
    let kb = calls
        .iter()
        .find(|c| c.params.get("text") == Some(&json!("pick")))
        .expect("keyboard message");
    assert_eq!(
        kb.params["reply_markup"]["inline_keyboard"][0][0]["callback_data"],
        "a"
    );
    assert!(kb.params["reply_to_message_id"].is_i64());
}

#[test]
fn a_failed_call_without_request_id_is_logged_with_method_chat_and_description() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "kinds:app", ""), &[]);
    // A user scope answers into chat_id = user id; this user never wrote a
    // private message, so the sandbox does not know the chat.
    sb.inject_update(json!({"inline_query": {"id": "q", "from": {"id": 4444, "is_bot": false, "first_name": "X"}, "query": "", "offset": ""}}));
    assert!(
        d.wait_log("call failed method=sendMessage chat=4444"),
        "{}",
        d.log()
    );
    assert!(
        d.log()
            .contains("Forbidden: bot can't initiate conversation with a user"),
        "{}",
        d.log()
    );
}

#[test]
fn lifespan_state_and_bot_reach_every_scope_and_shutdown_runs() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "lifespan_state:app", ""), &[]);
    sb.inject_text(1, "x");
    sb.inject_text(2, "y");
    let bot = sb.bot();
    let want = format!(
        "hello from lifespan @{} spec=1.1",
        bot["username"].as_str().unwrap()
    );
    assert_eq!(wait_texts(&sb, 1, 1, &d), vec![want.clone()]);
    assert_eq!(wait_texts(&sb, 2, 1, &d), vec![want]);
    let (status, log) = d.stop();
    assert!(status.success());
    assert!(log.contains("lifespan shutdown ran"), "{log}");
}

#[test]
fn lifespan_startup_failed_stops_the_daemon_with_the_apps_message() {
    let sb = sandbox();
    let mut d = Daemon::start(&config_for(&sb, "lifespan_fail:app", ""), &[]);
    let status = d.wait_exit();
    assert_eq!(status.code(), Some(1), "{}", d.log());
    assert!(
        d.log().contains("database unreachable at startup"),
        "{}",
        d.log()
    );
    // getMe answers before lifespan startup runs (the lifespan scope
    // carries the bot); nothing else is called, and polling never starts.
    let methods: Vec<String> = sb.calls().into_iter().map(|c| c.method).collect();
    assert!(methods.iter().all(|m| m == "getMe"), "{methods:?}");
    assert_eq!(sb.stats().get_updates, 0, "polling must not start");
}

#[test]
fn idle_scopes_get_disconnect_with_reason_and_stubborn_ones_are_cancelled() {
    let sb = sandbox();
    let extra = "[scopes]\nidle_timeout = 1\ndisconnect_grace = 0.5\n";
    let d = Daemon::start(&config_for(&sb, "goodbye:app", extra), &[]);
    sb.inject_text(1, "hello");
    sb.inject_text(2, "stubborn");
    assert_eq!(wait_texts(&sb, 1, 2, &d), vec!["hi", "bye: idle"]);
    assert_eq!(wait_texts(&sb, 2, 2, &d), vec!["hi", "bye: idle"]);
    assert!(
        d.wait_log("cancelled after the grace period"),
        "{}",
        d.log()
    );
    // The scope comes back on the next update.
    sb.inject_text(1, "again");
    assert_eq!(wait_texts(&sb, 1, 3, &d)[2], "hi");
}

#[test]
fn shutdown_disconnects_scopes_with_reason_shutdown() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "goodbye:app", ""), &[]);
    sb.inject_text(1, "hello");
    wait_texts(&sb, 1, 1, &d);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert_eq!(sb.sent_texts(1), vec!["hi", "bye: shutdown"], "{log}");
}

fn channels_installed() -> bool {
    Command::new("python3")
        .args(["-c", "import channels, django"])
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn django_channels_async_and_sync_consumers_run_unmodified() {
    assert!(
        channels_installed(),
        "django and channels must be installed (tests/requirements.txt)"
    );
    for (attr, first, second) in [
        ("async_application", "async 1: hi", "async 2: there"),
        ("sync_application", "sync: hi", "sync: there"),
    ] {
        let sb = sandbox();
        let d = Daemon::start(&config_for(&sb, &format!("channels_bot:{attr}"), ""), &[]);
        sb.inject_text(77, "hi");
        sb.inject_text(77, "there");
        assert_eq!(wait_texts(&sb, 77, 2, &d), vec![first, second]);
        let (status, log) = d.stop();
        assert!(status.success(), "{log}");
        assert!(!log.contains("Traceback"), "{log}");
    }
}
