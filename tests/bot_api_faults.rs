//! The Bot API boundary under faults the network or Telegram itself can
//! produce: answers whose body stalls after the headers, `retry_after`
//! values out of any sane range, updates serde_json cannot decode, and ids
//! that go backwards within a batch. Polling and sending must go on, and
//! the log must say what happened.
//!
//! The Poller is exercised through the real binary; the Sender as an actor
//! in this process, like tests/sender.rs. Every wait has a generous deadline.

mod common;

use std::cell::RefCell;
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use asgigramd::actors::call::{Call, CallDone, Outcome, ReplyTo};
use asgigramd::actors::sender::Sender;
use asgigramd::sandbox::{Fault, FaultPlan, Sandbox};
use asgigramd::settings::{AmbiguousPolicy, BotToken, SenderSettings};
use asgigramd::telegram::limits::Limits;
use asgigramd::telegram::{Bot, Params};
use common::*;
use serde_json::{json, Value};

/// A stall far longer than any test: the rest of the body never comes.
const FOREVER: Duration = Duration::from_secs(3600);

/// Short timeouts, so that a stalled poll is given up within seconds:
/// getUpdates waits poll_timeout + http_timeout = 3 s in all.
const QUICK_POLL: [(&str, &str); 2] = [
    ("ASGIGRAM_TELEGRAM__POLL_TIMEOUT", "1"),
    ("ASGIGRAM_TELEGRAM__HTTP_TIMEOUT", "2"),
];

fn echo(sb: &Sandbox, extra: &str) -> Daemon {
    Daemon::start(&config_for(sb, "echo3:app", extra), &QUICK_POLL)
}

/// The log's lines that contain `needle`.
fn lines_with<'a>(log: &'a str, needle: &str) -> Vec<&'a str> {
    log.lines().filter(|l| l.contains(needle)).collect()
}

// ----- 5: one deadline for the whole exchange ------------------------------

#[test]
fn a_get_updates_answer_whose_body_stalls_is_given_up_and_polling_goes_on() {
    let sb = sandbox();
    sb.set_faults(FaultPlan::get_updates(vec![Fault::StallBody(FOREVER)]));
    sb.inject_text(1, "before the stall");
    let d = echo(&sb, "");
    // The stalled answer carried this update; it was not confirmed, so the
    // next poll fetches it again.
    assert_eq!(wait_texts(&sb, 1, 1, &d), vec!["before the stall"]);
    sb.inject_text(1, "after the stall");
    assert_eq!(wait_texts(&sb, 1, 2, &d)[1], "after the stall");
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    let timed_out = lines_with(&log, "getUpdates failed: no answer within 3s; retrying in");
    assert_eq!(timed_out.len(), 1, "one line for the stalled poll:\n{log}");
}

/// A Sender on `sb` (limits off) and where its outcomes go.
fn sender(
    sb: &Sandbox,
    settings: SenderSettings,
) -> (
    Addr<Sender>,
    Recipient<CallDone>,
    Rc<RefCell<Vec<CallDone>>>,
) {
    sb.register_chat(json!({"id": 7, "type": "private", "first_name": "U"}));
    let bot = Bot::new(
        &sb.api_url(),
        &BotToken::new(sb.token()),
        Duration::from_secs(30),
    );
    let settings = SenderSettings {
        limits: Limits::off(),
        ..settings
    };
    let (to, done) = collector();
    (Sender::new(bot, settings).start(), to, done)
}

fn message(text: &str, to: &Recipient<CallDone>) -> Call {
    let Value::Object(params) = json!({"chat_id": 7, "text": text}) else {
        unreachable!("a JSON object literal")
    };
    Call::new(
        "sendMessage".into(),
        Params::from_map(&params),
        Some(ReplyTo {
            to: to.clone(),
            request_id: json!(1),
            sid: 1,
        }),
    )
}

/// Waits, without blocking the actors, until `cond` holds; panics after the
/// deadline.
async fn until(what: &str, mut cond: impl FnMut() -> bool) {
    let start = Instant::now();
    while !cond() {
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// One sendMessage whose answer's body stalls for good, with a 1 s
/// `response_timeout` and `policy`; waits for its outcome.
async fn a_stalled_call(policy: AmbiguousPolicy) -> (Sandbox, Rc<RefCell<Vec<CallDone>>>) {
    let sb = sandbox();
    sb.set_faults(FaultPlan::scripted(vec![Fault::StallBody(FOREVER)]).only(&["sendMessage"]));
    let (s, to, done) = sender(
        &sb,
        SenderSettings {
            response_timeout: Duration::from_secs(1),
            ambiguous: policy,
            ..SenderSettings::default()
        },
    );
    s.do_send(message("stalled", &to));
    until("the stalled call's outcome", || !done.borrow().is_empty()).await;
    (sb, done)
}

#[actix_rt::test]
async fn a_sent_call_whose_body_stalls_fails_after_response_timeout_as_unknown() {
    let (sb, done) = a_stalled_call(AmbiguousPolicy::Fail).await;
    let outcome = &done.borrow()[0].outcome;
    let Outcome::Error(envelope) = outcome else {
        panic!("the stalled call succeeded: {outcome:?}")
    };
    assert_eq!(envelope["description"], "no answer within 1s", "{envelope}");
    assert_eq!(
        sb.sent_texts(7),
        vec!["stalled"],
        "executed once, not resent"
    );
}

#[actix_rt::test]
async fn a_sent_call_whose_body_stalls_is_retried_under_the_retry_policy() {
    let (sb, done) = a_stalled_call(AmbiguousPolicy::Retry).await;
    assert!(done.borrow()[0].outcome.is_ok());
    // The first attempt executed before its answer stalled: a duplicate,
    // which is what "retry" accepts rather than losing the message.
    assert_eq!(sb.sent_texts(7), vec!["stalled", "stalled"]);
}

// ----- 6: retry_after clamped to 1..=3600 s ----------------------------------

#[test]
fn get_updates_retry_after_of_zero_or_less_waits_a_second_said_once() {
    let sb = sandbox();
    sb.set_faults(FaultPlan::get_updates(vec![
        Fault::RetryAfter(0),
        Fault::RetryAfter(-5),
        Fault::RetryAfter(0),
    ]));
    sb.inject_text(1, "after three 429s");
    let d = echo(&sb, "");
    assert_eq!(wait_texts(&sb, 1, 1, &d), vec!["after three 429s"]);
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    let waits = lines_with(&log, "getUpdates: 429 from Telegram; polling again in");
    assert_eq!(waits.len(), 3, "{log}");
    assert!(
        waits.iter().all(|l| l.contains("polling again in 1s")),
        "{waits:#?}"
    );
    assert_eq!(
        lines_with(&log, "outside 1..=3600s").len(),
        1,
        "the clamping is said once:\n{log}"
    );
}

#[test]
fn get_updates_retry_after_of_1e12_waits_an_hour_not_forever() {
    let sb = sandbox();
    sb.set_faults(FaultPlan::get_updates(vec![Fault::RetryAfter(
        1_000_000_000_000,
    )]));
    let d = echo(&sb, "");
    assert!(
        d.wait_log("getUpdates: 429 from Telegram; polling again in 3600s"),
        "{}",
        d.log()
    );
    let (status, log) = d.stop();
    assert!(
        status.success(),
        "a waiting Poller stops: {status:?}; log:\n{log}"
    );
    assert_eq!(lines_with(&log, "outside 1..=3600s").len(), 1, "{log}");
}

#[actix_rt::test]
async fn a_sent_call_with_retry_after_zero_or_less_waits_a_second_each() {
    let sb = sandbox();
    sb.set_faults(
        FaultPlan::scripted(vec![Fault::RetryAfter(0), Fault::RetryAfter(-3)])
            .only(&["sendMessage"]),
    );
    let (s, to, done) = sender(&sb, SenderSettings::default());
    let started = Instant::now();
    s.do_send(message("after two 429s", &to));
    until("the call's outcome", || !done.borrow().is_empty()).await;
    assert!(done.borrow()[0].outcome.is_ok());
    // Two waits of at least the 1 s floor; unclamped, they were none.
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(sb.sent_texts(7), vec!["after two 429s"]);
}

// ----- 7: an undecodable update is skipped, not the whole batch ------------

#[test]
fn an_update_nested_too_deep_is_skipped_and_the_rest_delivered() {
    let sb = sandbox();
    // serde_json stops at 128 levels; Telegram never nests like this. (The
    // Bot API parser is tested with 10,000 levels in telegram.rs; here the
    // sandbox's own recursive handling of the value must stay in its stack.)
    let mut deep = json!("bottom");
    for _ in 0..1_000 {
        deep = Value::Array(vec![deep]);
    }
    sb.inject_text(1, "before");
    let bad =
        sb.inject_update(json!({"message": {"chat": {"id": 1, "type": "private"}, "text": deep}}));
    sb.inject_text(1, "after");
    let d = echo(&sb, HTTP);
    let addr = endpoint(&d);
    assert_eq!(wait_texts(&sb, 1, 2, &d), vec!["before", "after"]);
    assert!(
        wait_for(DEADLINE, || sb.confirmed_offset() > bad),
        "the offset never moved past the bad update"
    );
    let mut metrics = String::new();
    let counted = wait_for(DEADLINE, || {
        metrics = get(&addr, "/metrics").1;
        sample(
            &metrics,
            "asgigram_updates_skipped_total{kind=\"(malformed)\"}",
        ) == Some(1.0)
    });
    assert!(counted, "not counted as skipped:\n{metrics}");
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    let named = lines_with(&log, &format!("update={bad} "));
    assert_eq!(named.len(), 1, "one line names the bad update:\n{log}");
    assert!(named[0].contains("skipped"), "{}", named[0]);
}

// ----- 10: update ids that go backwards within a batch ----------------------

#[test]
fn ids_going_backwards_in_a_batch_are_all_delivered_in_id_order() {
    let sb = sandbox();
    sb.register_chat(json!({"id": 1, "type": "private", "first_name": "U"}));
    let text = |id: i64| {
        json!({"update_id": id, "message": {
            "message_id": id, "date": 0, "text": format!("id {id}"),
            "chat": {"id": 1, "type": "private", "first_name": "U"},
            "from": {"id": 1, "is_bot": false, "first_name": "U"},
        }})
    };
    for id in [52, 51, 50] {
        sb.inject_update(text(id));
    }
    let d = echo(&sb, "");
    assert_eq!(wait_texts(&sb, 1, 3, &d), vec!["id 50", "id 51", "id 52"]);
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}; log:\n{log}");
    assert_eq!(lines_with(&log, "went backwards").len(), 1, "{log}");
    assert!(!log.contains("already in the journal"), "{log}");
}
