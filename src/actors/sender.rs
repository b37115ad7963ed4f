//! Sender: every Bot API call an application asks for goes through here.
//!
//! Makes the calls the Outbox hands it over one connection pool, under
//! Telegram's flood limits ([`crate::telegram::limits`]), in each chat's
//! order, retrying what may be retried; reports each call's final outcome to
//! the scope when the app asked for it ([`CallDone`]), else logs failures in
//! one line, and to the Outbox when it tracks the call ([`Sent`]). For a
//! download ([`Call::download`]) it fetches the file getFile described, with
//! the token only it holds, and the app hears of both at once.
//!
//! Owns: the calls not yet answered, one queue (lane) per chat; the pacer;
//! the workers whose apps sent calls (for backpressure); the lanes of stored
//! calls whose answers the journal is writing; the file fetches under way.
//! Takes: [`Call`] from the Outbox (tests and the benchmark send it
//! directly, with no Outbox); [`ReportSent`] (where the Outbox hears of
//! outcomes, once as it starts); [`Recorded`] (the journal wrote these
//! calls' answers); [`Drained`] (shutdown).
//! Sends: the Bot API requests and file fetches
//! ([`crate::telegram::download`]); [`CallDone`] to the scope that asked;
//! [`Sent`] to the Outbox for every call it tracks; `pause` / `resume`
//! frames ([`Write`]) to workers.
//! Stops: with the System. [`Drained`] resolves once no call is queued, in
//! flight or waiting for its answer to be written; what it never sent is
//! still in the journal's outbox for the next start.
//!
//! # The algorithm
//!
//! 1. Calls for one chat form a *lane* (keyed by `chat_id`). At most one call
//!    of a lane is in flight, and the next starts only once the previous has
//!    a final outcome, so a chat's calls reach Telegram in the order the app
//!    sent them — edits and deletes included, so an edit never overtakes the
//!    message it edits. For a stored call, "final" includes the journal
//!    having recorded the answer ([`Recorded`]): a crash then leaves at most
//!    one call per chat whose fate is unknown.
//! 2. Calls without a chat (answerCallbackQuery, answerInlineQuery, ...) have
//!    no order to keep, are not messages, and go out at once.
//! 3. Lanes whose head call may go wait in `ready`, ordered by when the app
//!    sent that head call (a retried call keeps its original place). Each
//!    pass walks `ready` in that order and starts every head call that is
//!    allowed now:
//!    - a call that is not "sending a message" (see the table in
//!      [`crate::telegram::limits`]) is always allowed: it waits for its chat's earlier
//!      calls, never for the rate limits;
//!    - a message needs its chat's budget (1/s with a small burst, 20/min for
//!      groups) and the global budget (30/s; paid broadcast has its own). A
//!      lane that lacks its chat's budget keeps its place and is skipped; once
//!      a lane lacks the global budget, no later lane may take global budget
//!      in this pass, so the oldest waiting lane gets the next free slot
//!      (earliest-eligible first: no starvation of large albums).
//!
//!    So the calls go out first-sent first-served across chats, except that
//!    a chat held by its own limit is skipped, never waited for (no
//!    head-of-line blocking): a chat with a thousand queued messages takes
//!    only its own 1/s of the 30/s, and another chat's first message waits
//!    only for earlier-sent messages that may go, at the global rate. Serving
//!    the busy chat whenever its own limit allows (rather than once per
//!    round of all waiting chats) is what keeps the global rate at the
//!    limit when a few busy chats mix with many quiet ones: a chat's unused
//!    per-second budget is lost, a quiet chat's wait is not.
//! 4. When nothing more may start, a timer wakes the Sender at the earliest
//!    instant a waiting call becomes allowed.
//! 5. A 429 holds the lane for exactly `retry_after` (from the answer's
//!    arrival; clamped to 1 s..1 h, [`crate::telegram::RETRY_AFTER_SECS`]),
//!    then the same call is retried at the head of its lane. A 429 to a call
//!    without a chat holds every message for that long.
//! 6. A call that surely did not execute (connect failed, Telegram's 5xx) is
//!    retried with capped exponential backoff and jitter, up to
//!    `max_attempts`. One whose fate is unknown (connection lost after the
//!    request was written, no answer within `response_timeout`) follows
//!    `sender.ambiguous`: retried likewise (default), or failed.
//! 7. 400 with `migrate_to_chat_id` re-addresses the call and every queued
//!    and later call for that chat (the lane moves to the new id) and
//!    resends it.
//! 8. Any other error (403, other 4xx) is final: reported to the app if it
//!    asked, logged otherwise, never retried.
//! 9. At most `MAX_IN_FLIGHT` calls are in flight.
//! 10. Backpressure: when more than `queue_limit` calls wait, every worker
//!     that sent calls gets a `pause` frame (the app's `send()` then waits);
//!     once fewer than half of that wait, `resume`. Nothing is dropped.
//! 11. A download's getFile is a call like any other (it has no chat, so
//!     step 2). Once it answers a File, the file is fetched outside the
//!     lanes and the limits (it is no Bot API call), at most
//!     `MAX_DOWNLOADS` at once, and the app gets the File with its content
//!     or the error; a file over 20 MB is refused, never cut short.
//!
//! The decisions live in [`Core`], which takes `now` as an argument and is
//! tested without an actor system or real time; the actor only does I/O and
//! timers.

use std::collections::{BTreeMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use foldhash::{HashMap, HashSet};
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::actors::call::{chat_of, Call, CallDone, Outcome, ReplyTo};
use crate::actors::outbox::Sent;
use crate::actors::worker::{Worker, Write};
use crate::backoff::Backoff;
use crate::bridge::ToWorker;
use crate::settings::{AmbiguousPolicy, SenderSettings};
use crate::telegram::limits::{message_cost, Cost, Pacer, Pass, Ticket};
use crate::telegram::{Bot, TelegramError};

const MAX_IN_FLIGHT: usize = 64;
/// Files fetched at once: each may hold up to 20 MB until the app has it.
const MAX_DOWNLOADS: usize = 8;
/// Backoff of retried failures: 250 ms doubling, capped at 30 s.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));

/// A call in the Sender's hands, with what the Sender keeps about it.
pub struct Queued {
    call: Call,
    /// Attempts made so far.
    attempts: u32,
    /// Failures counted against `max_attempts` (429s and migrations are not).
    failures: u32,
    /// Submission number: the call's place in the Sender's first-come order.
    seq: u64,
    /// What it costs against the flood limits; `None`: not a message.
    cost: Option<Cost>,
}

impl Queued {
    fn new(call: Call, seq: u64) -> Queued {
        let cost = message_cost(&call.method, &call.params);
        Queued {
            call,
            attempts: 0,
            failures: 0,
            seq,
            cost,
        }
    }

    /// The lane this call belongs to: its chat.
    fn lane(&self) -> Option<String> {
        self.call.chat()
    }

    /// Sends the call to chat `to` instead (the chat migrated).
    fn readdress(&mut self, to: &Value) {
        self.call.params.set("chat_id", to);
    }

    fn chat_for_log(&self) -> String {
        self.lane().unwrap_or_else(|| "-".to_string())
    }
}

/// Where to report the outcomes of the calls the Outbox tracks. Sent once,
/// by the Outbox as it starts, ahead of any call it hands on.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReportSent(pub Recipient<Sent>);

/// The journal wrote the answers of these stored calls (by outbox row id;
/// see `Sender::finish`): their chats' next calls may go. Also sent when
/// the write failed: holding the chats would not make it succeed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Recorded(pub Vec<i64>);

/// Resolves once no call is queued or in flight (for shutdown).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Drained;

/// A call started by [`Core::poll`].
pub struct Start {
    pub lane: Option<String>,
    pub queued: Queued,
    /// Set when the call counted against the limits.
    pub ticket: Option<Ticket>,
}

#[derive(Default)]
struct Lane {
    queue: VecDeque<Queued>,
    /// A call of this lane is in flight.
    busy: bool,
    /// The lane's head call may not start before this (429, backoff).
    held_until: Option<Instant>,
}

/// The Sender's decisions, free of I/O: queues, lanes, pacing, backpressure.
pub struct Core {
    /// Lanes of stored calls answered whose answers the journal has not
    /// written yet, by outbox row id: held busy until [`Core::recorded`].
    recording: HashMap<i64, Option<String>>,
    pacer: Pacer,
    lanes: HashMap<String, Lane>,
    /// Lanes that are not busy and have a queued call, keyed by the
    /// submission number of their head call.
    ready: BTreeMap<u64, String>,
    /// Submission number of the next call.
    next_seq: u64,
    /// Calls without a lane, each with the instant it may start.
    unordered: VecDeque<(Instant, Queued)>,
    in_flight: usize,
    /// Calls queued, not in flight.
    queued: usize,
    /// Old chat id -> new chat id, learnt from migrations.
    migrated: HashMap<String, Value>,
    queue_limit: usize,
    paused: bool,
    last_prune: Option<Instant>,
}

impl Core {
    pub fn new(settings: &SenderSettings) -> Core {
        Core {
            recording: HashMap::default(),
            pacer: Pacer::new(settings.limits.clone()),
            lanes: HashMap::default(),
            ready: BTreeMap::new(),
            next_seq: 0,
            unordered: VecDeque::new(),
            in_flight: 0,
            queued: 0,
            migrated: HashMap::default(),
            queue_limit: settings.queue_limit,
            paused: false,
            last_prune: None,
        }
    }

    /// Calls waiting (queued or held for a retry), not in flight.
    pub fn queued(&self) -> usize {
        self.queued
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Nothing queued, in flight, or waiting for its answer to be written.
    pub fn is_idle(&self) -> bool {
        self.in_flight == 0 && self.queued == 0 && self.recording.is_empty()
    }

    /// Queues a call from the app.
    pub fn push(&mut self, call: Call, now: Instant) {
        self.queued += 1;
        self.next_seq += 1;
        let mut queued = Queued::new(call, self.next_seq);
        let mut lane = queued.lane();
        if let Some(new) = lane.as_ref().and_then(|l| self.migrated.get(l)) {
            queued.readdress(new);
            lane = queued.lane();
        }
        match lane {
            None => self.unordered.push_back((now, queued)),
            Some(lane) => {
                let q = self.lanes.entry(lane.clone()).or_default();
                q.queue.push_back(queued);
                if !q.busy && q.queue.len() == 1 {
                    self.ready.insert(self.next_seq, lane);
                }
            }
        }
    }

    /// Starts every call allowed at `now` (steps 2-4 of the algorithm).
    /// Returns the calls to make and when to look again.
    pub fn poll(&mut self, now: Instant) -> (Vec<Start>, Option<Instant>) {
        if self
            .last_prune
            .is_none_or(|t| now >= t + Duration::from_secs(1))
        {
            self.pacer.prune(now);
            self.last_prune = Some(now);
        }
        let mut starts = Vec::new();
        let mut wake: Option<Instant> = None;
        let mut wake_at = |at: Instant| wake = Some(wake.map_or(at, |w: Instant| w.min(at)));

        let mut i = 0;
        while i < self.unordered.len() && self.in_flight < MAX_IN_FLIGHT {
            if self.unordered[i].0 > now {
                wake_at(self.unordered[i].0);
                i += 1;
                continue;
            }
            // The index is in range: checked by the loop condition.
            let (_, queued) = self.unordered.remove(i).expect("index checked above");
            self.in_flight += 1;
            self.queued -= 1;
            starts.push(Start {
                lane: None,
                queued,
                ticket: None,
            });
        }

        // Once the free (or paid) global budget is found short, later lanes
        // may not take it: the earlier lane gets it first.
        let mut pass = Pass::default();
        // Walk the ready lanes in order by cursor rather than by a copy of
        // the set: the loop removes lanes as it goes, and a copy per pass
        // costs an allocation per lane on the hot path.
        let mut cursor = 0;
        while let Some((key, name)) = self
            .ready
            .range(cursor..)
            .next()
            .map(|(k, n)| (*k, n.clone()))
        {
            cursor = key + 1;
            if self.in_flight >= MAX_IN_FLIGHT {
                break;
            }
            let Some(lane) = self.lanes.get(&name) else {
                self.ready.remove(&key);
                continue;
            };
            if let Some(until) = lane.held_until.filter(|&u| u > now) {
                wake_at(until);
                continue;
            }
            let Some(head) = lane.queue.front() else {
                self.ready.remove(&key);
                continue;
            };
            let mut ticket = None;
            // With the limits off there is nothing to count.
            if let Some(cost) = head.cost.filter(|_| self.pacer.enabled()) {
                match self.pacer.admit(&name, cost, now, &mut pass) {
                    Ok(counted) => ticket = Some(counted),
                    Err(again) => {
                        if let Some(at) = again {
                            wake_at(at);
                        }
                        continue;
                    }
                }
            }
            self.ready.remove(&key);
            // The lane and its head were looked up above.
            let lane = self.lanes.get_mut(&name).expect("lane looked up above");
            let queued = lane.queue.pop_front().expect("head looked up above");
            lane.busy = true;
            lane.held_until = None;
            self.in_flight += 1;
            self.queued -= 1;
            starts.push(Start {
                lane: Some(name),
                queued,
                ticket,
            });
        }
        if self.in_flight >= MAX_IN_FLIGHT {
            // A finishing call polls again; no timer needed.
            wake = None;
        }
        (starts, wake)
    }

    /// The answer to a started call came (any outcome): the pacer learns
    /// when Telegram counted it at the latest.
    pub fn answered(&mut self, ticket: Option<&Ticket>, now: Instant) {
        self.in_flight -= 1;
        if let Some(ticket) = ticket {
            self.pacer.settle(ticket, now);
        }
    }

    /// The lane's call has a final outcome: let its next call go.
    pub fn done(&mut self, lane: Option<&str>) {
        let Some(name) = lane else { return };
        let Some(lane) = self.lanes.get_mut(name) else {
            return;
        };
        lane.busy = false;
        match lane.queue.front() {
            None => {
                self.lanes.remove(name);
            }
            Some(head) => {
                self.ready.insert(head.seq, name.to_string());
            }
        }
    }

    /// The stored call `row` of `lane` has a final outcome, which the journal
    /// is to write: its lane's next call waits until [`Core::recorded`].
    pub fn done_once_recorded(&mut self, row: i64, lane: Option<String>) {
        self.recording.insert(row, lane);
    }

    /// The journal wrote the answer of the stored call `row`: its lane's
    /// next call may go. A row not waiting (never held, or told twice)
    /// releases nothing, so it cannot let a lane's call overtake another.
    pub fn recorded(&mut self, row: i64) {
        if let Some(lane) = self.recording.remove(&row) {
            self.done(lane.as_deref());
        }
    }

    /// Puts a call back at the head of its lane, to start no earlier than
    /// `at`.
    pub fn retry(&mut self, lane: Option<&str>, call: Queued, at: Instant) {
        self.queued += 1;
        match lane {
            None => self.unordered.push_back((at, call)),
            Some(name) => {
                let q = self.lanes.entry(name.to_string()).or_default();
                q.busy = false;
                q.held_until = Some(at);
                if let Some(old_head) = q.queue.front() {
                    self.ready.remove(&old_head.seq);
                }
                self.ready.insert(call.seq, name.to_string());
                q.queue.push_front(call);
            }
        }
    }

    /// A 429 that cannot be tied to a chat: no message before `until`.
    pub fn hold_all(&mut self, until: Instant) {
        self.pacer.hold_all(until);
    }

    /// The chat of lane `old` became `new`: the call that learnt it, then
    /// every queued call of the lane, move to the new chat's lane (ahead of
    /// anything already queued there) and every later call for `old` is
    /// re-addressed on arrival.
    pub fn migrate(&mut self, old: &str, new: Value, mut call: Queued) {
        self.migrated.insert(old.to_string(), new.clone());
        let Some(new_name) = chat_of(&new) else {
            // An id that is not a number or string cannot come from Telegram;
            // keep the call where it was rather than lose it.
            self.retry(Some(old), call, Instant::now());
            return;
        };
        let mut moved = self.lanes.remove(old).map(|l| l.queue).unwrap_or_default();
        self.ready.retain(|_, l| l != old);
        call.readdress(&new);
        for c in &mut moved {
            c.readdress(&new);
        }
        moved.push_front(call);
        self.queued += 1;
        let lane = self.lanes.entry(new_name.clone()).or_default();
        if let Some(head) = lane.queue.front() {
            self.ready.remove(&head.seq);
        }
        for c in moved.into_iter().rev() {
            lane.queue.push_front(c);
        }
        if let Some(head) = lane.queue.front().filter(|_| !lane.busy) {
            self.ready.insert(head.seq, new_name);
        }
    }

    /// Backpressure, with hysteresis: `Some(true)` when the queue just went
    /// over `queue_limit`, `Some(false)` when it just fell under half of it.
    pub fn backpressure(&mut self) -> Option<bool> {
        if !self.paused && self.queued > self.queue_limit {
            self.paused = true;
            Some(true)
        } else if self.paused && self.queued < self.queue_limit / 2 {
            self.paused = false;
            Some(false)
        } else {
            None
        }
    }

    pub fn is_paused(&self) -> bool {
        self.paused
    }
}

#[derive(Message)]
#[rtype(result = "()")]
struct Finished {
    lane: Option<String>,
    ticket: Option<Ticket>,
    queued: Queued,
    result: Result<Value, TelegramError>,
}

pub struct Sender {
    bot: Bot,
    settings: SenderSettings,
    core: Core,
    /// The pending wake-up timer and its instant.
    timer: Option<(Instant, SpawnHandle)>,
    /// Workers that sent calls, for backpressure frames.
    workers: HashSet<Addr<Worker>>,
    drain_waiters: Vec<tokio::sync::oneshot::Sender<()>>,
    /// Told the final outcome of every call it tracks ([`ReportSent`]).
    outbox: Option<Recipient<Sent>>,
    /// Slots for file fetches, so that downloads cannot fill memory.
    downloads: Rc<Semaphore>,
}

impl Sender {
    pub fn new(bot: Bot, settings: SenderSettings) -> Sender {
        Sender {
            bot,
            core: Core::new(&settings),
            settings,
            timer: None,
            workers: HashSet::default(),
            drain_waiters: Vec::new(),
            outbox: None,
            downloads: Rc::new(Semaphore::new(MAX_DOWNLOADS)),
        }
    }

    /// A call's final outcome: to the app if it asked, to the Outbox if it
    /// tracks the call. A stored call's lane waits until the journal has
    /// written the answer ([`Recorded`]), so that a crash can leave at most
    /// one call per chat whose fate the journal does not know.
    fn finish(&mut self, lane: Option<String>, queued: Queued, outcome: Outcome) {
        let call = queued.call;
        let mut stored = None;
        if let Some(outbox) = self.outbox.as_ref().filter(|_| call.is_tracked()) {
            stored = call.row;
            outbox.do_send(Sent {
                row: call.row,
                cause: call.cause,
                outcome: call.reply.as_ref().map(|_| outcome.clone()),
            });
        }
        if let Some(reply) = call.reply {
            match outcome {
                Outcome::Result(file) if call.download => self.download(file, reply),
                outcome => reply.to.do_send(CallDone {
                    request_id: reply.request_id,
                    outcome,
                    sid: reply.sid,
                }),
            }
        }
        match stored {
            Some(row) => self.core.done_once_recorded(row, lane),
            None => self.core.done(lane.as_deref()),
        }
    }

    /// A download's getFile answered `file`: the file is fetched (at most
    /// [`MAX_DOWNLOADS`] at once, each within `sender.response_timeout`),
    /// and the app gets the File with its content, or the error.
    fn download(&self, file: Value, reply: ReplyTo) {
        let bot = self.bot.clone();
        let timeout = self.settings.response_timeout;
        let slots = self.downloads.clone();
        actix::spawn(async move {
            // The semaphore is never closed, so a permit always comes.
            let _slot = slots.acquire().await;
            let outcome = match bot.download(file, timeout).await {
                Ok(result) => Outcome::Result(result),
                Err(e) => {
                    log::debug!("download failed: {e}; reported to the app");
                    Outcome::Error(e.to_envelope())
                }
            };
            reply.to.do_send(CallDone {
                request_id: reply.request_id,
                outcome,
                sid: reply.sid,
            });
        });
    }

    /// Starts what may start now and sets the timer for what waits.
    fn pump(&mut self, ctx: &mut Context<Self>) {
        let now = Instant::now();
        let (starts, wake) = self.core.poll(now);
        for start in starts {
            self.start(start, ctx);
        }
        crate::ops::metrics::metrics().sender_depth(self.core.queued(), self.core.in_flight());
        match wake {
            Some(at) if self.timer.as_ref().is_none_or(|(t, _)| *t != at) => {
                if let Some((_, handle)) = self.timer.take() {
                    ctx.cancel_future(handle);
                }
                let handle = ctx.run_later(at.saturating_duration_since(now), |act, ctx| {
                    act.timer = None;
                    act.pump(ctx);
                });
                self.timer = Some((at, handle));
            }
            Some(_) => {}
            None => {
                if let Some((_, handle)) = self.timer.take() {
                    ctx.cancel_future(handle);
                }
            }
        }
        self.apply_backpressure();
        if self.core.is_idle() {
            for w in self.drain_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn apply_backpressure(&mut self) {
        let Some(pause) = self.core.backpressure() else {
            return;
        };
        self.workers.retain(Addr::connected);
        let frame = if pause {
            log::warn!(
                "sender queue full queued={} limit={}; pausing the apps' send()",
                self.core.queued(),
                self.settings.queue_limit
            );
            ToWorker::Pause
        } else {
            log::info!(
                "sender queue drained queued={}; resuming the apps' send()",
                self.core.queued()
            );
            ToWorker::Resume
        }
        .encode();
        for w in &self.workers {
            w.do_send(Write(frame.clone()));
        }
    }

    fn start(&mut self, start: Start, ctx: &mut Context<Self>) {
        let Start {
            lane,
            mut queued,
            ticket,
        } = start;
        queued.attempts += 1;
        if queued.attempts > 1 {
            crate::ops::metrics::metrics().retries.inc();
        }
        log::trace!(
            "call start method={} chat={} attempt={}",
            queued.call.method,
            queued.chat_for_log(),
            queued.attempts
        );
        let bot = self.bot.clone();
        let timeout = self.settings.response_timeout;
        let me = ctx.address();
        actix::spawn(async move {
            let call = &queued.call;
            // Nobody reads the result of a call whose app did not ask for
            // it (`finish` passes the outcome on only with a reply), and
            // decoding a whole Message per reply was a tenth of the daemon's
            // instructions per update.
            let result = if call.reply.is_some() {
                bot.call(&call.method, &call.params, timeout).await
            } else {
                bot.call_unread(&call.method, &call.params, timeout).await
            };
            me.do_send(Finished {
                lane,
                ticket,
                queued,
                result,
            });
        });
    }

    /// Retries a failed call after capped exponential backoff, or gives up
    /// after `max_attempts`.
    fn retry_or_fail(
        &mut self,
        lane: Option<String>,
        mut queued: Queued,
        error: TelegramError,
        now: Instant,
    ) {
        queued.failures += 1;
        if queued.failures >= self.settings.max_attempts {
            self.fail(lane, queued, error);
            return;
        }
        let delay = BACKOFF.delay(queued.failures - 1);
        log::warn!(
            "call failed method={} chat={} attempt={}: {error}; retrying in {:.2}s",
            queued.call.method,
            queued.chat_for_log(),
            queued.attempts,
            delay.as_secs_f64()
        );
        self.core.retry(lane.as_deref(), queued, now + delay);
    }

    /// A final failure: reported or logged, and the lane moves on.
    fn fail(&mut self, lane: Option<String>, queued: Queued, error: TelegramError) {
        let outcome = Outcome::Error(error.to_envelope());
        if queued.call.reply.is_none() {
            log::warn!(
                "call failed method={} chat={} attempts={}: {error}",
                queued.call.method,
                queued.chat_for_log(),
                queued.attempts
            );
        } else {
            log::debug!(
                "call failed method={} chat={} attempts={}: {error}; reported to the app",
                queued.call.method,
                queued.chat_for_log(),
                queued.attempts
            );
        }
        self.finish(lane, queued, outcome);
    }
}

impl Actor for Sender {
    type Context = Context<Self>;
}

impl Handler<Call> for Sender {
    type Result = ();
    fn handle(&mut self, mut call: Call, ctx: &mut Context<Self>) {
        // Only backpressure needs the worker, and only once.
        if let Some(worker) = call.origin.take() {
            if self.core.is_paused() && !self.workers.contains(&worker) {
                // A worker seen for the first time while paused (e.g. one
                // restarted meanwhile) must pause too.
                worker.do_send(Write(ToWorker::Pause.encode()));
            }
            self.workers.insert(worker);
        }
        self.core.push(call, Instant::now());
        self.pump(ctx);
    }
}

impl Handler<ReportSent> for Sender {
    type Result = ();
    fn handle(&mut self, msg: ReportSent, _: &mut Context<Self>) {
        self.outbox = Some(msg.0);
    }
}

impl Handler<Recorded> for Sender {
    type Result = ();
    fn handle(&mut self, msg: Recorded, ctx: &mut Context<Self>) {
        for row in msg.0 {
            self.core.recorded(row);
        }
        self.pump(ctx);
    }
}

impl Handler<Drained> for Sender {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Drained, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = tokio::sync::oneshot::channel();
        if self.core.is_idle() {
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
        let now = Instant::now();
        let Finished {
            lane,
            ticket,
            mut queued,
            result,
        } = msg;
        self.core.answered(ticket.as_ref(), now);
        match result {
            Ok(result) => {
                log::trace!(
                    "call ok method={} chat={}",
                    queued.call.method,
                    queued.chat_for_log()
                );
                self.finish(lane, queued, Outcome::Result(result));
            }
            Err(TelegramError::RetryAfter { retry_after, .. }) => {
                let delay = Duration::from_secs(retry_after);
                log::warn!(
                    "429 from Telegram method={} chat={}; retrying in {retry_after}s",
                    queued.call.method,
                    queued.chat_for_log()
                );
                if lane.is_none() {
                    self.core.hold_all(now + delay);
                }
                self.core.retry(lane.as_deref(), queued, now + delay);
            }
            Err(TelegramError::Migrated {
                migrate_to_chat_id, ..
            }) if lane.is_some() && queued.attempts <= self.settings.max_attempts => {
                let new = Value::from(migrate_to_chat_id);
                log::info!(
                    "chat={} migrated to chat={new}; resending method={}",
                    queued.chat_for_log(),
                    queued.call.method
                );
                // Checked by the guard.
                let old = lane.expect("guarded by lane.is_some()");
                self.core.migrate(&old, new, queued);
            }
            Err(e @ (TelegramError::Server { .. } | TelegramError::Network(_))) => {
                self.retry_or_fail(lane, queued, e, now);
            }
            Err(e @ (TelegramError::Timeout(_) | TelegramError::InvalidResponse(_))) => {
                match self.settings.ambiguous {
                    AmbiguousPolicy::Retry => self.retry_or_fail(lane, queued, e, now),
                    AmbiguousPolicy::Fail => {
                        queued.failures += 1;
                        self.fail(lane, queued, e);
                    }
                }
            }
            Err(e) => self.fail(lane, queued, e),
        }
        self.pump(ctx);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telegram::limits::Limits;
    use crate::telegram::Params;
    use serde_json::json;

    fn settings() -> SenderSettings {
        SenderSettings::default()
    }

    /// A Core that paces nothing, for the tests of order and holding.
    fn unlimited() -> Core {
        Core::new(&SenderSettings {
            limits: Limits::off(),
            ..settings()
        })
    }

    fn msg(chat: i64, text: &str) -> Call {
        let Value::Object(p) = json!({"chat_id": chat, "text": text}) else {
            unreachable!("a JSON object literal")
        };
        Call::new("sendMessage".into(), Params::from_map(&p), None)
    }

    fn text(q: &Queued) -> &str {
        // The tests' texts are plain: their JSON is the text in quotes.
        q.call
            .params
            .get("text")
            .map(|t| t.trim_matches('"'))
            .unwrap_or_default()
    }

    /// Runs `core` to completion with every call answered `latency` after it
    /// started, on a made-up clock; returns (start instant, chat, text).
    fn simulate(core: &mut Core, t0: Instant, latency: Duration) -> Vec<(Instant, String, String)> {
        let mut now = t0;
        let mut in_flight: Vec<(Instant, Start)> = Vec::new();
        let mut log = Vec::new();
        for _ in 0..1_000_000 {
            let (starts, wake) = core.poll(now);
            for s in starts {
                log.push((
                    now,
                    s.lane.clone().unwrap_or_default(),
                    text(&s.queued).into(),
                ));
                in_flight.push((now + latency, s));
            }
            in_flight.sort_by_key(|(t, _)| *t);
            let next_answer = in_flight.first().map(|(t, _)| *t);
            let next = match (next_answer, wake) {
                (Some(a), Some(w)) => a.min(w),
                (Some(a), None) => a,
                (None, Some(w)) => w,
                (None, None) => break,
            };
            now = next;
            while in_flight.first().is_some_and(|(t, _)| *t <= now) {
                let (_, s) = in_flight.remove(0);
                core.answered(s.ticket.as_ref(), now);
                core.done(s.lane.as_deref());
            }
        }
        assert!(core.is_idle());
        log
    }

    #[test]
    fn order_and_chat_pace_over_a_run() {
        let mut core = Core::new(&settings());
        let t0 = Instant::now();
        for i in 0..10 {
            core.push(msg(1, &i.to_string()), t0);
        }
        let log = simulate(&mut core, t0, Duration::from_millis(5));
        let texts: Vec<_> = log.iter().map(|(_, _, t)| t.as_str()).collect();
        assert_eq!(texts, (0..10).map(|i| i.to_string()).collect::<Vec<_>>());
        // A burst of 3, then one per second.
        let last = log[9].0 - t0;
        assert!(last >= Duration::from_secs(7), "{last:?}");
        assert!(last < Duration::from_secs(8), "{last:?}");
    }

    #[test]
    fn a_busy_chat_does_not_delay_another_chats_first_message() {
        let mut core = Core::new(&settings());
        let t0 = Instant::now();
        for i in 0..1000 {
            core.push(msg(1, &format!("hot {i}")), t0);
        }
        let (starts, _) = core.poll(t0);
        assert_eq!(starts.len(), 1);
        core.push(msg(2, "cold"), t0);
        let (starts2, _) = core.poll(t0);
        assert_eq!(starts2.len(), 1, "the cold chat goes at once");
        assert_eq!(text(&starts2[0].queued), "cold");
    }

    #[test]
    fn global_limit_is_shared_fairly_and_reached() {
        let mut core = Core::new(&settings());
        let t0 = Instant::now();
        // 300 chats with 10 messages each, queued at once.
        for i in 0..10 {
            for chat in 1..=300 {
                core.push(msg(chat, &format!("{chat}:{i}")), t0);
            }
        }
        let log = simulate(&mut core, t0, Duration::from_millis(3));
        assert_eq!(log.len(), 3000);
        // Order per chat.
        let mut next: HashMap<String, usize> = HashMap::default();
        for (_, chat, t) in &log {
            let n = next.entry(chat.clone()).or_default();
            assert_eq!(t, &format!("{chat}:{n}"));
            *n += 1;
        }
        // No sliding second holds more than 30 starts.
        for (i, (at, _, _)) in log.iter().enumerate() {
            let in_window = log[i..]
                .iter()
                .take_while(|(t, _, _)| *t - *at < Duration::from_secs(1))
                .count();
            assert!(
                in_window <= 30,
                "{in_window} starts in the second after start {i}"
            );
        }
        // And the rate is close to the limit: 3000 at 30/s is 100 s.
        let took = log[2999].0 - t0;
        assert!(took < Duration::from_secs(101), "{took:?}");
        // Round robin: every chat's first message goes before any chat's
        // second one.
        let firsts = log
            .iter()
            .position(|(_, _, t)| t.ends_with(":1"))
            .unwrap_or(0);
        assert_eq!(firsts, 300);
    }

    #[test]
    fn busy_chats_among_quiet_ones_keep_the_global_rate() {
        let mut core = Core::new(&settings());
        let t0 = Instant::now();
        for i in 0..30 {
            for hot in 1..=5 {
                core.push(msg(hot, &format!("{hot}:{i}")), t0);
            }
        }
        for cold in 1000..2350 {
            core.push(msg(cold, "cold"), t0);
        }
        let log = simulate(&mut core, t0, Duration::from_millis(3));
        assert_eq!(log.len(), 1500);
        // 1500 messages at 30/s: 50 s; the busy chats go at their own 1/s
        // meanwhile instead of waiting for every quiet chat.
        let took = log[1499].0 - t0;
        assert!(took < Duration::from_secs(51), "{took:?}");
        let hot_done = log
            .iter()
            .rev()
            .find(|(_, c, _)| c.len() == 1)
            .map(|e| e.0 - t0);
        assert!(hot_done < Some(Duration::from_secs(30)), "{hot_done:?}");
    }

    #[test]
    fn non_messages_are_not_paced_but_keep_their_place() {
        let mut core = Core::new(&SenderSettings {
            limits: Limits {
                chat_burst: 1,
                ..Limits::default()
            },
            ..settings()
        });
        let t0 = Instant::now();
        core.push(msg(1, "a"), t0);
        core.push(msg(1, "b"), t0);
        let Value::Object(p) = json!({"chat_id": 1, "message_id": 1, "text": "edited"}) else {
            unreachable!("a JSON object literal")
        };
        core.push(
            Call::new("editMessageText".into(), Params::from_map(&p), None),
            t0,
        );
        let Value::Object(p) = json!({"callback_query_id": "x"}) else {
            unreachable!("a JSON object literal")
        };
        core.push(
            Call::new("answerCallbackQuery".into(), Params::from_map(&p), None),
            t0,
        );
        let log = simulate(&mut core, t0, Duration::from_millis(10));
        let order: Vec<_> = log.iter().map(|(t, _, x)| (x.as_str(), *t - t0)).collect();
        // The callback answer goes at once; the edit waits for "b" (order)
        // but not for a rate-limit slot after it.
        assert_eq!(order[0], ("", Duration::ZERO));
        assert_eq!(order[1].0, "a");
        assert_eq!(order[2].0, "b");
        assert!(order[2].1 >= Duration::from_secs(1));
        assert_eq!(order[3], ("edited", order[2].1 + Duration::from_millis(10)));
    }

    #[test]
    fn a_held_lane_waits_exactly_and_retries_in_place() {
        let mut core = unlimited();
        let t0 = Instant::now();
        core.push(msg(1, "a"), t0);
        core.push(msg(1, "b"), t0);
        let (mut starts, _) = core.poll(t0);
        let s = starts.remove(0);
        core.answered(None, t0);
        core.retry(s.lane.as_deref(), s.queued, t0 + Duration::from_secs(7));
        let (starts, wake) = core.poll(t0 + Duration::from_secs(1));
        assert!(starts.is_empty());
        assert_eq!(wake, Some(t0 + Duration::from_secs(7)));
        let (starts, _) = core.poll(t0 + Duration::from_secs(7));
        assert_eq!(
            text(&starts[0].queued),
            "a",
            "the retried call keeps its place"
        );
    }

    #[test]
    fn migration_moves_the_lane_and_later_calls() {
        let mut core = unlimited();
        let t0 = Instant::now();
        core.push(msg(-5, "a"), t0);
        core.push(msg(-5, "b"), t0);
        let (mut starts, _) = core.poll(t0);
        let s = starts.remove(0);
        core.answered(None, t0);
        core.migrate("-5", json!(-1005), s.queued);
        core.push(msg(-5, "c"), t0);
        let log = simulate(&mut core, t0, Duration::from_millis(1));
        let got: Vec<_> = log
            .iter()
            .map(|(_, l, t)| (l.as_str(), t.as_str()))
            .collect();
        assert_eq!(got, vec![("-1005", "a"), ("-1005", "b"), ("-1005", "c")]);
    }

    #[test]
    fn backpressure_has_hysteresis() {
        let mut core = Core::new(&SenderSettings {
            queue_limit: 4,
            ..settings()
        });
        let t0 = Instant::now();
        for i in 0..5 {
            core.push(msg(1, &i.to_string()), t0);
            let expected = (i == 4).then_some(true);
            assert_eq!(core.backpressure(), expected, "after {i}");
        }
        let (starts, _) = core.poll(t0);
        assert_eq!(starts.len(), 1);
        assert_eq!(core.backpressure(), None, "4 queued: not under half");
        core.answered(starts[0].ticket.as_ref(), t0);
        core.done(starts[0].lane.as_deref());
        let log = simulate(&mut core, t0, Duration::from_millis(1));
        assert_eq!(log.len(), 4);
        assert_eq!(core.backpressure(), Some(false));
    }

    #[test]
    fn a_stored_calls_chat_waits_until_its_answer_is_recorded() {
        let mut core = unlimited();
        let t0 = Instant::now();
        core.push(msg(1, "a"), t0);
        core.push(msg(1, "b"), t0);
        core.push(msg(2, "other"), t0);
        let (mut starts, _) = core.poll(t0);
        assert_eq!(starts.len(), 2, "one call per chat");
        let a = starts.remove(0);
        assert_eq!(text(&a.queued), "a");
        core.answered(None, t0);
        core.done_once_recorded(7, a.lane);
        let (starts, _) = core.poll(t0);
        assert!(starts.is_empty(), "b waits for a's answer to be written");
        assert!(!core.is_idle());
        core.recorded(7);
        let (starts, _) = core.poll(t0);
        assert_eq!(starts.len(), 1);
        assert_eq!(text(&starts[0].queued), "b");
    }

    #[test]
    fn a_row_not_waiting_releases_no_chat() {
        let mut core = unlimited();
        let t0 = Instant::now();
        core.push(msg(1, "a"), t0);
        core.push(msg(1, "b"), t0);
        let (starts, _) = core.poll(t0);
        assert_eq!(starts.len(), 1);
        // "a" is still in flight: a stray or repeated row must not let "b"
        // overtake it.
        core.recorded(99);
        core.done_once_recorded(5, starts[0].lane.clone());
        core.recorded(5);
        core.recorded(5);
        let (starts, _) = core.poll(t0);
        assert_eq!(starts.len(), 1, "released once, by its own row");
        assert_eq!(text(&starts[0].queued), "b");
        let (starts, _) = core.poll(t0);
        assert!(starts.is_empty());
    }

    #[test]
    fn a_stored_call_without_a_chat_still_counts_until_recorded() {
        let mut core = Core::new(&settings());
        let t0 = Instant::now();
        let Value::Object(p) = json!({"callback_query_id": "x"}) else {
            unreachable!("a JSON object literal")
        };
        core.push(
            Call::new("answerCallbackQuery".into(), Params::from_map(&p), None),
            t0,
        );
        let (starts, _) = core.poll(t0);
        core.answered(None, t0);
        core.done_once_recorded(3, starts[0].lane.clone());
        assert!(
            !core.is_idle(),
            "shutdown waits for the answer to be written"
        );
        core.recorded(3);
        assert!(core.is_idle());
    }

    #[test]
    fn a_readdressed_call_moves_chat_and_keeps_its_place_and_cost() {
        let call = msg(-5, "a");
        let mut q = Queued::new(call, 42);
        assert_eq!(q.lane().as_deref(), Some("-5"));
        let cost = q.cost;
        assert_eq!(cost.map(|c| c.messages), Some(1), "a message");
        q.readdress(&json!(-1005));
        assert_eq!(q.lane().as_deref(), Some("-1005"));
        assert_eq!(q.call.params.value("chat_id"), Some(json!(-1005)));
        assert_eq!((q.seq, q.cost, q.attempts), (42, cost, 0));
    }

    #[test]
    fn only_messages_cost_against_the_limits() {
        let Value::Object(p) = json!({"chat_id": 1, "message_id": 1, "text": "e"}) else {
            unreachable!("a JSON object literal")
        };
        let edit = Queued::new(
            Call::new("editMessageText".into(), Params::from_map(&p), None),
            1,
        );
        assert_eq!(edit.cost, None);
        let Value::Object(p) = json!({"chat_id": 1, "media": [{}, {}, {}]}) else {
            unreachable!("a JSON object literal")
        };
        let album = Queued::new(
            Call::new("sendMediaGroup".into(), Params::from_map(&p), None),
            2,
        );
        assert_eq!(album.cost.map(|c| c.messages), Some(3));
    }
}
