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
use asgigramd::actors::sender::{Call, CallDone, ReplyTo, Sender};
use asgigramd::limits::Limits;
use asgigramd::sandbox::{Fault, FaultPlan, Sandbox};
use asgigramd::settings::{AmbiguousPolicy, BotToken, SenderSettings};
use asgigramd::telegram::Bot;
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

/// Collects the outcomes the Sender reports.
#[derive(Default)]
struct Collector(Rc<RefCell<Vec<CallDone>>>);

impl Actor for Collector {
    type Context = Context<Self>;
}

impl Handler<CallDone> for Collector {
    type Result = ();
    fn handle(&mut self, msg: CallDone, _: &mut Context<Self>) {
        self.0.borrow_mut().push(msg);
    }
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
    let done = Rc::new(RefCell::new(Vec::new()));
    let collector = Collector(done.clone()).start().recipient();
    (Sender::new(bot, settings, None).start(), collector, done)
}

fn message(text: &str, to: &Recipient<CallDone>) -> Call {
    let Value::Object(params) = json!({"chat_id": 7, "text": text}) else {
        unreachable!("a JSON object literal")
    };
    Call::new(
        "sendMessage".into(),
        params,
        Some(ReplyTo {
            to: to.clone(),
            request_id: json!(1),
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

#[actix_rt::test]
async fn a_sent_call_whose_body_stalls_fails_after_response_timeout_as_unknown() {
    let sb = sandbox();
    sb.set_faults(FaultPlan::scripted(vec![Fault::StallBody(FOREVER)]).only(&["sendMessage"]));
    let (s, to, done) = sender(
        &sb,
        SenderSettings {
            response_timeout: Duration::from_secs(1),
            ambiguous: AmbiguousPolicy::Fail,
            ..SenderSettings::default()
        },
    );
    s.do_send(message("stalled", &to));
    until("the stalled call's outcome", || !done.borrow().is_empty()).await;
    let outcome = &done.borrow()[0].outcome;
    let Err(envelope) = outcome else {
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
    let sb = sandbox();
    sb.set_faults(FaultPlan::scripted(vec![Fault::StallBody(FOREVER)]).only(&["sendMessage"]));
    let (s, to, done) = sender(
        &sb,
        SenderSettings {
            response_timeout: Duration::from_secs(1),
            ambiguous: AmbiguousPolicy::Retry,
            ..SenderSettings::default()
        },
    );
    s.do_send(message("stalled", &to));
    until("the retried call's outcome", || !done.borrow().is_empty()).await;
    assert!(done.borrow()[0].outcome.is_ok());
    // The first attempt executed before its answer stalled: a duplicate,
    // which is what "retry" accepts rather than losing the message.
    assert_eq!(sb.sent_texts(7), vec!["stalled", "stalled"]);
}
