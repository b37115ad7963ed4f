//! The real Sender actor against the sandbox: order, fairness, 429s, retries,
//! migrations and final errors. Waits poll with generous deadlines; nothing
//! depends on how fast the machine is.

use std::time::{Duration, Instant};

use actix::prelude::*;
use asgigramd::actors::call::{Call, CallDone, ReplyTo};
use asgigramd::actors::sender::{Drained, Sender};
use asgigramd::sandbox::{Fault, FaultPlan, Sandbox, SandboxOptions};
use asgigramd::settings::{AmbiguousPolicy, BotToken, SenderSettings};
use asgigramd::telegram::limits::Limits;
use asgigramd::telegram::{Bot, Params};
use serde_json::{json, Value};

mod common;
use common::collector;

const DEADLINE: Duration = Duration::from_secs(60);

fn sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions::default()).expect("sandbox starts on loopback")
}

fn sender(sb: &Sandbox, settings: SenderSettings) -> Addr<Sender> {
    let bot = Bot::new(
        &sb.api_url(),
        &BotToken::new(sb.token()),
        Duration::from_secs(30),
    );
    Sender::new(bot, settings).start()
}

fn settings(limits: Limits) -> SenderSettings {
    SenderSettings {
        limits,
        ..SenderSettings::default()
    }
}

fn register(sb: &Sandbox, id: i64) {
    let kind = if id < 0 { "group" } else { "private" };
    sb.register_chat(json!({"id": id, "type": kind, "title": "t", "first_name": "U"}));
}

fn params(v: Value) -> Params {
    match v {
        Value::Object(m) => Params::from_map(&m),
        _ => unreachable!("tests pass JSON objects"),
    }
}

fn message(chat: i64, text: &str) -> Call {
    Call::new(
        "sendMessage".into(),
        params(json!({"chat_id": chat, "text": text})),
        None,
    )
}

fn asking(mut call: Call, to: &Recipient<CallDone>, id: i64) -> Call {
    call.reply = Some(ReplyTo {
        to: to.clone(),
        request_id: json!(id),
        sid: 1,
    });
    call
}

/// Polls `cond` until it holds; panics after `DEADLINE`.
async fn wait_for(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Consecutive duplicates removed: an ambiguous failure may deliver a
/// message twice in a row, never out of order.
fn dedup(mut v: Vec<String>) -> Vec<String> {
    v.dedup();
    v
}

#[actix_rt::test]
async fn order_is_kept_and_nothing_lost_under_faults() {
    let sb = sandbox();
    sb.set_faults(
        FaultPlan::random(
            0.25,
            vec![
                Fault::BadGatewayJson,
                Fault::BadGatewayHtml,
                Fault::DropBeforeExecute,
                Fault::DropAfterExecute,
            ],
        )
        .only(&["sendMessage"]),
    );
    for chat in 1..=5 {
        register(&sb, chat);
    }
    let s = sender(&sb, settings(Limits::off()));
    for i in 0..12 {
        for chat in 1..=5 {
            s.do_send(message(chat, &format!("m{i}")));
        }
    }
    let expected: Vec<String> = (0..12).map(|i| format!("m{i}")).collect();
    wait_for("every chat's messages", || {
        (1..=5).all(|c| dedup(sb.sent_texts(c)) == expected)
    })
    .await;
    s.send(Drained).await.expect("the sender runs");
    assert!(sb.stats().faults_injected > 0, "the plan injected faults");
    for chat in 1..=5 {
        assert_eq!(dedup(sb.sent_texts(chat)), expected, "chat {chat}");
    }
}

#[actix_rt::test]
async fn a_429_is_obeyed_for_its_chat_and_retried_in_place() {
    let sb = sandbox();
    sb.set_rate_limits(true);
    register(&sb, 1);
    register(&sb, 2);
    // Our own limits off, so that the sandbox answers 429.
    let s = sender(&sb, settings(Limits::off()));
    for i in 0..5 {
        s.do_send(message(1, &format!("m{i}")));
    }
    s.do_send(message(2, "other"));
    let expected: Vec<String> = (0..5).map(|i| format!("m{i}")).collect();
    wait_for("chat 1's messages", || sb.sent_texts(1) == expected).await;
    assert!(sb.stats().too_many_requests > 0);
    assert_eq!(sb.sent_texts(2), vec!["other"]);
    // After each 429, the chat's next request comes no sooner than
    // retry_after later.
    let calls = sb.calls();
    let to_chat_1: Vec<_> = calls
        .iter()
        .filter(|c| c.params["chat_id"] == json!(1))
        .collect();
    for pair in to_chat_1.windows(2) {
        if pair[0].status == 429 {
            let wait = pair[0].response["parameters"]["retry_after"]
                .as_u64()
                .expect("a 429 carries retry_after");
            assert!(
                pair[1].at - pair[0].at >= Duration::from_secs(wait),
                "retried after {:?}, retry_after {wait}",
                pair[1].at - pair[0].at
            );
        }
    }
    // The other chat was not held by chat 1's 429s.
    let other = calls
        .iter()
        .find(|c| c.params["chat_id"] == json!(2))
        .expect("chat 2's message was sent");
    let first = calls.first().expect("calls were made");
    assert!(other.at - first.at < Duration::from_secs(1));
}

#[actix_rt::test]
async fn own_pacing_avoids_429s_for_chats_and_groups() {
    let sb = sandbox();
    sb.set_rate_limits(true);
    for chat in [1, 2, -3] {
        register(&sb, chat);
    }
    let s = sender(&sb, settings(Limits::default()));
    for i in 0..6 {
        for chat in [1, 2, -3] {
            s.do_send(message(chat, &format!("m{i}")));
        }
    }
    let expected: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    wait_for("every message", || {
        [1, 2, -3].iter().all(|&c| sb.sent_texts(c) == expected)
    })
    .await;
    assert_eq!(sb.stats().too_many_requests, 0);
}

#[actix_rt::test]
async fn a_busy_chat_does_not_hold_back_another_chats_first_message() {
    let sb = sandbox();
    sb.set_rate_limits(true);
    register(&sb, 1);
    register(&sb, 2);
    let s = sender(&sb, settings(Limits::default()));
    for i in 0..50 {
        s.do_send(message(1, &format!("hot{i}")));
    }
    s.do_send(message(2, "cold"));
    wait_for("the cold chat's message", || sb.sent_texts(2) == ["cold"]).await;
    // The hot chat had its burst of 3 and maybe a paced 4th by then, not 50.
    assert!(sb.sent_texts(1).len() <= 4, "{:?}", sb.sent_texts(1));
    assert_eq!(sb.stats().too_many_requests, 0);
}

#[actix_rt::test]
async fn migration_readdresses_the_chat_and_later_calls() {
    let sb = sandbox();
    register(&sb, -5);
    sb.migrate_chat(-5, -1005);
    let s = sender(&sb, settings(Limits::off()));
    let (to, done) = collector();
    for i in 0..3 {
        s.do_send(asking(message(-5, &format!("m{i}")), &to, i));
    }
    wait_for("three answers", || done.borrow().len() == 3).await;
    s.do_send(message(-5, "later"));
    wait_for("the later message", || sb.sent_texts(-1005).len() == 4).await;
    assert_eq!(sb.sent_texts(-1005), vec!["m0", "m1", "m2", "later"]);
    for d in done.borrow().iter() {
        let result = d.outcome.as_result().expect("sent after the migration");
        assert_eq!(result["chat"]["id"], json!(-1005));
    }
    let to_old = sb
        .calls()
        .iter()
        .filter(|c| c.params["chat_id"] == json!(-5))
        .count();
    assert_eq!(to_old, 1, "only the first call learnt the new id");
}

#[actix_rt::test]
async fn final_errors_are_reported_once_and_the_lane_moves_on() {
    let sb = sandbox();
    register(&sb, 1);
    let s = sender(&sb, settings(Limits::default()));
    let (to, done) = collector();
    // Unknown chat: 400, final.
    s.do_send(asking(message(999, "nobody"), &to, 1));
    // Missing text: 400, final; then the lane's next call still goes.
    let bad = Call::new("sendMessage".into(), params(json!({"chat_id": 1})), None);
    s.do_send(asking(bad, &to, 2));
    s.do_send(asking(message(1, "after"), &to, 3));
    wait_for("three answers", || done.borrow().len() == 3).await;
    let done = done.borrow();
    let by_id = |id: i64| {
        done.iter()
            .find(|d| d.request_id == json!(id))
            .expect("every request is answered")
    };
    let e = by_id(1).outcome.as_result().expect_err("chat not found");
    assert_eq!(e["error_code"], json!(400));
    assert_eq!(
        by_id(2).outcome.as_result().expect_err("no text")["error_code"],
        json!(400)
    );
    assert!(by_id(3).outcome.is_ok());
    // Never retried.
    assert_eq!(sb.calls().len(), 3);
}

/// One message to chat 1 whose first attempt meets `fault`, under `policy`:
/// whether the app was told it succeeded, and the texts the chat got.
async fn one_message_meeting(fault: Fault, policy: AmbiguousPolicy) -> (bool, Vec<String>) {
    let sb = sandbox();
    register(&sb, 1);
    sb.set_faults(FaultPlan::scripted(vec![fault]).only(&["sendMessage"]));
    let s = sender(
        &sb,
        SenderSettings {
            ambiguous: policy,
            ..settings(Limits::off())
        },
    );
    let (to, done) = collector();
    s.do_send(asking(message(1, "once?"), &to, 1));
    wait_for("the answer", || done.borrow().len() == 1).await;
    let ok = done.borrow()[0].outcome.is_ok();
    (ok, sb.sent_texts(1))
}

#[actix_rt::test]
async fn ambiguous_failures_follow_the_policy() {
    let _ = env_logger::builder().is_test(true).try_init();
    // Retry (default): the message is delivered; a duplicate is possible.
    assert_eq!(
        one_message_meeting(Fault::DropAfterExecute, AmbiguousPolicy::Retry).await,
        (true, vec!["once?".to_string(), "once?".to_string()])
    );
    // Fail: reported, never resent.
    assert_eq!(
        one_message_meeting(Fault::DropAfterExecute, AmbiguousPolicy::Fail).await,
        (false, vec!["once?".to_string()])
    );
    // A failure that surely did not execute is retried under either policy.
    assert_eq!(
        one_message_meeting(Fault::BadGatewayJson, AmbiguousPolicy::Fail).await,
        (true, vec!["once?".to_string()])
    );
}

/// End to end, with the real daemon and a Python app: a queue over
/// `sender.queue_limit` pauses the app's `send()` (the `pause` frame), and
/// resumes it once drained; every reply arrives, in order.
#[test]
fn a_full_queue_pauses_the_apps_send_and_loses_nothing() {
    let sb = sandbox();
    let config = common::config_for(
        &sb,
        "burst:app",
        "[sender]\nqueue_limit = 4\nchat_per_second = 5.0\n",
    );
    let d = common::Daemon::start(&config, &[]);
    for i in 0..6 {
        sb.inject_text(21, &format!("m{i}"));
    }
    let texts = common::wait_texts(&sb, 21, 18, &d);
    let expected: Vec<String> = (0..6)
        .flat_map(|i| (0..3).map(move |j| format!("m{i}.{j}")))
        .collect();
    assert_eq!(texts, expected);
    assert!(
        common::wait_for(DEADLINE, || d.log().contains("resuming the apps' send()")),
        "no pause/resume in the log:\n{}",
        d.log()
    );
    assert!(d.log().contains("pausing the apps' send()"));
}
