//! Sender: every Bot API call an application asks for goes through here.
//!
//! Takes [`Call`]s from scopes; makes them over one connection pool; reports the
//! outcome to the scope when the app asked for it ([`CallDone`]), else logs
//! failures in one line.
//!
//! Ordering and retries, in order of precedence:
//! 1. Calls for one chat form a lane: at most one call of a lane is in flight,
//!    and the next starts only when the previous has a final outcome, so a
//!    chat's messages reach Telegram in the order the app sent them.
//! 2. Calls without a chat (answerCallbackQuery, answerInlineQuery, ...) have no
//!    order to keep and go out at once.
//! 3. A 429 holds the lane for exactly `retry_after`, then the same call is
//!    retried in its place.
//! 4. A call that surely did not execute (connect failed, Telegram's 5xx) or
//!    whose fate is unknown (no answer in time) is retried with capped
//!    exponential backoff and jitter, up to `MAX_ATTEMPTS`; a rare duplicate
//!    beats a lost reply.
//! 5. 400 with `migrate_to_chat_id` re-addresses the call (and every later call
//!    for that chat) and resends it.
//! 6. Any other error is final.
//! 7. At most `MAX_IN_FLIGHT` calls are in flight; lanes wait their turn in
//!    arrival order, so a busy chat does not starve the others.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use actix::prelude::*;
use serde_json::{Map, Value};

use crate::backoff::Backoff;
use crate::telegram::{Bot, TelegramError};

const MAX_IN_FLIGHT: usize = 64;
const MAX_ATTEMPTS: u32 = 8;

/// Where the outcome of a call goes, when the app asked for it.
pub struct ReplyTo {
    pub to: Recipient<CallDone>,
    pub request_id: Value,
}

/// One Bot API call.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Call {
    pub method: String,
    pub params: Map<String, Value>,
    pub reply: Option<ReplyTo>,
    attempts: u32,
}

impl Call {
    pub fn new(method: String, params: Map<String, Value>, reply: Option<ReplyTo>) -> Call {
        Call {
            method,
            params,
            reply,
            attempts: 0,
        }
    }

    /// The lane this call belongs to: its `chat_id`, as Telegram would see it.
    fn lane(&self) -> Option<String> {
        match self.params.get("chat_id")? {
            Value::Number(n) => Some(n.to_string()),
            Value::String(s) => Some(s.clone()),
            _ => None,
        }
    }

    fn chat_for_log(&self) -> String {
        self.lane().unwrap_or_else(|| "-".to_string())
    }
}

/// The outcome of a call, for the app that asked: the result, or the error
/// envelope (`ok`, `error_code`, `description`, `parameters`).
#[derive(Message)]
#[rtype(result = "()")]
pub struct CallDone {
    pub request_id: Value,
    pub outcome: Result<Value, Value>,
}

/// Resolves once no call is queued or in flight (for shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drained;

#[derive(Message)]
#[rtype(result = "()")]
struct Finished {
    lane: Option<String>,
    call: Call,
    result: Result<Value, TelegramError>,
}

#[derive(Default)]
struct LaneQueue {
    queue: VecDeque<Call>,
    /// A call of this lane is in flight or waiting for its retry.
    busy: bool,
}

pub struct Sender {
    bot: Bot,
    lanes: HashMap<String, LaneQueue>,
    /// Lanes with a call ready to go, waiting for an in-flight slot.
    ready: VecDeque<String>,
    /// Calls without a lane waiting for an in-flight slot.
    unordered: VecDeque<Call>,
    in_flight: usize,
    /// Old chat id -> new chat id, learnt from migrations.
    migrated: HashMap<String, Value>,
    drain_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
}

impl Sender {
    pub fn new(bot: Bot) -> Sender {
        Sender {
            bot,
            lanes: HashMap::new(),
            ready: VecDeque::new(),
            unordered: VecDeque::new(),
            in_flight: 0,
            migrated: HashMap::new(),
            drain_waiters: Vec::new(),
        }
    }

    fn enqueue(&mut self, mut call: Call, ctx: &mut Context<Self>) {
        if let Some(new) = call.lane().and_then(|l| self.migrated.get(&l)) {
            call.params.insert("chat_id".into(), new.clone());
        }
        match call.lane() {
            None => self.unordered.push_back(call),
            Some(lane) => {
                let q = self.lanes.entry(lane.clone()).or_default();
                q.queue.push_back(call);
                if !q.busy && q.queue.len() == 1 {
                    q.busy = true;
                    self.ready.push_back(lane);
                }
            }
        }
        self.pump(ctx);
    }

    /// Starts calls while there are free in-flight slots.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        while self.in_flight < MAX_IN_FLIGHT {
            if let Some(call) = self.unordered.pop_front() {
                self.start(None, call, ctx);
            } else if let Some(lane) = self.ready.pop_front() {
                let Some(call) = self.lanes.get_mut(&lane).and_then(|q| q.queue.pop_front()) else {
                    continue;
                };
                self.start(Some(lane), call, ctx);
            } else {
                break;
            }
        }
        if self.is_idle() {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.unordered.is_empty() && self.lanes.values().all(|q| !q.busy)
    }

    fn start(&mut self, lane: Option<String>, mut call: Call, ctx: &mut Context<Self>) {
        self.in_flight += 1;
        call.attempts += 1;
        let bot = self.bot.clone();
        let me = ctx.address();
        actix::spawn(async move {
            let params = Value::Object(std::mem::take(&mut call.params));
            let result = bot.request(&call.method, &params).await;
            let Value::Object(p) = params else {
                unreachable!("constructed as an object just above")
            };
            call.params = p;
            me.do_send(Finished { lane, call, result });
        });
    }

    /// Puts a call back at the head of its lane after `delay`.
    fn retry_later(
        &mut self,
        lane: Option<String>,
        call: Call,
        delay: Duration,
        ctx: &mut Context<Self>,
    ) {
        ctx.run_later(delay, move |act, ctx| {
            match lane {
                Some(lane) => {
                    act.lanes
                        .entry(lane.clone())
                        .or_default()
                        .queue
                        .push_front(call);
                    act.ready.push_back(lane);
                }
                None => act.unordered.push_front(call),
            }
            act.pump(ctx);
        });
    }

    /// The lane's call has a final outcome: let its next call go.
    fn advance(&mut self, lane: Option<String>) {
        let Some(lane) = lane else { return };
        let Some(q) = self.lanes.get_mut(&lane) else {
            return;
        };
        if q.queue.is_empty() {
            self.lanes.remove(&lane);
        } else {
            self.ready.push_back(lane);
        }
    }

    fn report(call: Call, outcome: Result<Value, Value>, err: Option<&TelegramError>) {
        match call.reply {
            Some(reply) => reply.to.do_send(CallDone {
                request_id: reply.request_id,
                outcome,
            }),
            None => {
                if let Some(e) = err {
                    log::warn!(
                        "call failed method={} chat={} attempts={}: {e}",
                        call.method,
                        call.chat_for_log(),
                        call.attempts
                    );
                }
            }
        }
    }
}

impl Actor for Sender {
    type Context = Context<Self>;
}

impl Handler<Call> for Sender {
    type Result = ();
    fn handle(&mut self, call: Call, ctx: &mut Context<Self>) {
        self.enqueue(call, ctx);
    }
}

impl Handler<Drained> for Sender {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Drained, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.is_idle() {
            let _ = tx.send(());
        } else {
            self.drain_waiters.push(tx);
        }
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

impl Handler<Finished> for Sender {
    type Result = ();
    fn handle(&mut self, msg: Finished, ctx: &mut Context<Self>) {
        self.in_flight -= 1;
        let Finished {
            lane,
            mut call,
            result,
        } = msg;
        match result {
            Ok(result) => {
                log::trace!(
                    "call ok method={} chat={}",
                    call.method,
                    call.chat_for_log()
                );
                Self::report(call, Ok(result), None);
                self.advance(lane);
            }
            Err(TelegramError::RetryAfter { retry_after, .. }) => {
                log::warn!(
                    "429 from Telegram method={} chat={}; retrying in {retry_after}s",
                    call.method,
                    call.chat_for_log()
                );
                self.retry_later(lane, call, Duration::from_secs(retry_after), ctx);
            }
            Err(TelegramError::Migrated {
                migrate_to_chat_id, ..
            }) if call.attempts < MAX_ATTEMPTS => {
                let new = Value::from(migrate_to_chat_id);
                log::info!(
                    "chat={} migrated to {new}; resending method={}",
                    call.chat_for_log(),
                    call.method
                );
                if let Some(old) = call.lane() {
                    self.migrated.insert(old, new.clone());
                }
                call.params.insert("chat_id".into(), new);
                self.retry_later(lane, call, Duration::ZERO, ctx);
            }
            Err(
                e @ (TelegramError::Server { .. }
                | TelegramError::Network(_)
                | TelegramError::Timeout(_)
                | TelegramError::InvalidResponse(_)),
            ) if call.attempts < MAX_ATTEMPTS => {
                let delay = Backoff::new(Duration::from_millis(250), Duration::from_secs(30))
                    .delay(call.attempts - 1);
                log::warn!(
                    "call failed method={} chat={} attempt={}: {e}; retrying in {:.1}s",
                    call.method,
                    call.chat_for_log(),
                    call.attempts,
                    delay.as_secs_f64()
                );
                self.retry_later(lane, call, delay, ctx);
            }
            Err(e) => {
                let envelope = e.to_envelope();
                Self::report(call, Err(envelope), Some(&e));
                self.advance(lane);
            }
        }
        self.pump(ctx);
    }
}
