//! Supervisor: owns the scopes and the workers.
//!
//! Takes batches of updates from the Poller ([`Dispatch`]), routes each to its
//! scope (creating the ScopeActor on the first update), and keeps at most
//! `max_scopes` scopes alive: when full, the longest-idle scope (one whose
//! instance is done with everything it was given) is closed to make room, and
//! a new chat waits for the room. Closes scopes idle for `idle_timeout`, and
//! scopes whose instance ended by itself. Starts the Worker actors, reports
//! when all are ready, restarts a worker that dies (a worker that keeps
//! failing before it is ready stops the daemon), gives each new scope its
//! chat's worker (the same for every instance of a chat, `pool.rs`), and
//! replaces every worker on a reload.
//!
//! Owns: the scope table (`scopes.rs`: live, closing and idle scopes, keys
//! waiting for room), the events of keys without a live scope
//! (`pending.rs`), the worker pool (`pool.rs`: regular workers and the
//! isolation worker), the reload in progress (`reload.rs`), the suspects of
//! workers' deaths (`quarantine.rs`), and the count of updates no app has
//! received yet (`backlog.rs`). This file is the actor shell: it decides with
//! those and sends the messages; `isolation.rs` holds its steps for suspects.
//! Takes: [`Dispatch`] (the Poller, and the journal's leftovers at start),
//! [`Push`] (events other programs pushed, from the Ingress, and the
//! journal's leftovers at start), [`SetBot`], [`WaitReady`], [`WatchBackpressure`] (the Poller),
//! [`ReloadWorkers`] (SIGHUP, `--reload`), [`ScopeReport`] (its scopes),
//! [`WorkerEvent`] (its workers); at shutdown [`CloseAll`], then
//! [`StopWorkers`].
//! Sends: [`Enqueue`], [`Close`] and [`Terminate`] to scopes;
//! [`GiveBot`] (as soon as both the bot and the worker are there),
//! [`ShutdownWorker`] and [`Release`] to workers; [`Done`] to the Outbox for
//! updates it skips (no scope to route them to) or drops (an update that
//! killed the isolation worker every time); [`Backpressure`] to the Poller
//! when the count of updates no app has received crosses
//! `journal.max_undelivered`, either way (the queue of a scope reported
//! stalled, `scopes.stall_warning`, stops counting: one stuck chat does not
//! stop polling for the others).
//! Stops: with the System, never by itself. A worker that fails before it is
//! ready at startup, or [`CRASH_LOOP_LIMIT`] times in a row later, answers
//! [`WaitReady`] with a [`StartupError`] and restarts no more workers; the
//! caller stops the daemon. After [`CloseAll`] it starts no scope (what
//! waits stays in the journal), after [`StopWorkers`] it restarts no worker,
//! and a reload asked for then is ignored.
//!
//! # Where a scope's events are
//!
//! Every event the Supervisor holds for a scope key is in exactly one place,
//! in update order: given to the key's live scope, or in its pending
//! queue while the key has no live scope. A key's pending events wait while
//! its previous scope is still closing (an instance per key at a time), while
//! events sent to a scope that stopped by itself are on their way back, while
//! the chat is held for isolation, or while no worker or no room for a scope
//! is free. What a stopped scope hands back goes in front of them.
//!
//! # When a worker dies
//!
//! Its scopes stop and hand back what their instances did not finish. When it
//! died of the app's doing, the chats whose update was in hand are suspects
//! and are run again one at a time on the isolation worker (see
//! `quarantine.rs` and `isolation.rs`); the other chats go on at once on the other workers. Only
//! an update that killed the isolation worker on its own, repeatedly, is
//! dropped.
//!
//! # Reload
//!
//! [`ReloadWorkers`] replaces the regular workers one at a time (see
//! `reload.rs`); the scopes of a retired worker are closed and their events go,
//! in order, to fresh scopes on the live workers.

use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use foldhash::HashMap;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::oneshot;

mod backlog;
mod isolation;
mod pending;
mod pool;
pub mod quarantine;
mod reload;
mod scopes;

use backlog::Backlog;
use pending::PendingEvents;
use pool::{Role, WorkerPool};
use quarantine::Quarantine;
use reload::{Exit, Next, Reload};
use scopes::{IdleReport, Scope, ScopeTable};

use crate::actors::outbox::OutboxLink;
use crate::actors::poller::Backpressure;
use crate::actors::scope::{
    Close, Enqueue, ScopeActor, ScopeLinks, ScopeReport, Stopped, Terminate, SHUTDOWN,
};
use crate::actors::worker::{
    describe, Death, GiveBot, Release, ShutdownWorker, Worker, WorkerEvent,
};
use crate::bridge::{Event, ToWorker};
use crate::ops::metrics::{self, metrics};
use crate::push::PushedEvent;
use crate::routing::{self, ScopeKey, Unroutable};
use crate::settings::Settings;
use crate::telegram::Update;

/// Consecutive start failures of one worker after which the daemon gives up.
pub const CRASH_LOOP_LIMIT: u32 = 5;

/// The reason a scope gets when it leaves the isolation worker.
const MOVED: &str = "moved";

/// New updates from the Poller, in update order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Dispatch(pub Vec<Update>);

/// An event another program pushed into a chat (docs/protocol.md), for the
/// chat's scope, behind everything dispatched so far.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Push {
    pub event: PushedEvent,
    /// New (from the Ingress): told its place, the highest update_id
    /// dispatched before it (rule 9 of [`crate::journal`]), or [`Full`]
    /// when `journal.max_undelivered` is reached, and then not delivered.
    /// `None`: the journal's leftovers at start, delivered in any case.
    pub placed: Option<oneshot::Sender<Result<Option<i64>, Full>>>,
}

/// `journal.max_undelivered` events wait for the apps: a pushed event is
/// refused (503) until they catch up, as polling pauses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Full;

/// The bot's own User (from getMe), for every scope's `bot` key, the
/// lifespan scope's included: a worker starts its lifespan once it has it.
/// `null` under `--check`, which does not ask Telegram.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetBot(pub Value);

/// Resolves when every worker is ready, or with the first worker's error.
#[derive(Message)]
#[rtype(result = "oneshot::Receiver<Result<(), StartupError>>")]
pub struct WaitReady;

/// Why the workers cannot run the app. The daemon cannot go on: the caller
/// stops it and shows this.
#[derive(Clone, Debug, thiserror::Error)]
pub enum StartupError {
    /// A worker could not start the app (import error, lifespan startup
    /// failed) while the daemon was starting.
    #[error("{0}")]
    App(String),
    /// A worker kept failing before it was ready.
    #[error(
        "worker {index} failed {} times in a row before it was ready: {error}",
        CRASH_LOOP_LIMIT
    )]
    CrashLoop { index: usize, error: String },
}

/// From the Poller: tell it, now and whenever it changes, whether the
/// updates no app has received yet hold polling back.
#[derive(Message)]
#[rtype(result = "()")]
pub struct WatchBackpressure(pub Recipient<Backpressure>);

/// Shutdown phase: close every scope; resolves when all have stopped. What
/// no instance received stays in the journal for the next start.
#[derive(Message)]
#[rtype(result = "oneshot::Receiver<()>")]
pub struct CloseAll;

/// Shutdown phase: end the workers; resolves when every process has exited.
#[derive(Message)]
#[rtype(result = "oneshot::Receiver<()>")]
pub struct StopWorkers {
    pub grace: Duration,
}

/// Replace every worker, one at a time: start a new worker, wait until it is
/// ready, then retire the old one (SIGHUP, `--reload`). Scopes move lazily.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReloadWorkers {
    /// What asked for it, for the log.
    pub reason: String,
}

/// Counts for the one log line that stands for many similar events.
#[derive(Default)]
struct Tally {
    suspects: usize,
    scheduled: bool,
}

pub struct Supervisor {
    settings: Settings,
    /// Where scopes send their calls and finished updates; skipped and
    /// dropped updates are finished here.
    outbox: OutboxLink,
    /// The bot's User object, encoded once for every scope dict.
    bot: Rc<RawValue>,
    /// [`SetBot`] came: workers get the bot as they start.
    bot_known: bool,
    /// The lifespan scopes' calls go to the Outbox; not under `--check`.
    lifespan_calls: bool,
    scopes: ScopeTable<Addr<ScopeActor>>,
    pending: PendingEvents,
    quarantine: Quarantine,
    workers: WorkerPool<Rc<ScopeLinks>>,
    /// A reload in progress (SIGHUP, --reload).
    reload: Reload,
    /// Updates dispatched that no app has received yet.
    backlog: Backlog,
    /// Told when the backlog starts or stops holding polling back.
    poller: Option<Recipient<Backpressure>>,
    ready_waiters: Vec<oneshot::Sender<Result<(), StartupError>>>,
    startup_error: Option<StartupError>,
    close_waiters: Vec<oneshot::Sender<()>>,
    exit_waiters: Vec<oneshot::Sender<()>>,
    stopping_workers: bool,
    shutting_down: bool,
    /// Every worker has been ready once: later failures are restarts.
    started_up: bool,
    tally: Tally,
    /// The highest update_id dispatched: where a pushed event goes after a
    /// restart.
    dispatched_through: Option<i64>,
}

impl Supervisor {
    pub fn new(settings: Settings, outbox: OutboxLink) -> Supervisor {
        Supervisor {
            scopes: ScopeTable::new(settings.scopes.max_scopes),
            backlog: Backlog::new(settings.journal.max_undelivered),
            settings,
            outbox,
            bot: Rc::from(RawValue::NULL.to_owned()),
            bot_known: false,
            lifespan_calls: true,
            pending: PendingEvents::default(),
            quarantine: Quarantine::default(),
            workers: WorkerPool::default(),
            reload: Reload::default(),
            poller: None,
            ready_waiters: Vec::new(),
            startup_error: None,
            close_waiters: Vec::new(),
            exit_waiters: Vec::new(),
            stopping_workers: false,
            shutting_down: false,
            started_up: false,
            tally: Tally::default(),
            dispatched_through: None,
        }
    }

    /// `--check`: the workers' lifespan scopes make no calls; one that asks
    /// for the outcome is told so.
    pub fn without_lifespan_calls(mut self) -> Supervisor {
        self.lifespan_calls = false;
        self
    }

    fn bot_frame(&self) -> GiveBot {
        GiveBot(ToWorker::Bot { bot: &self.bot }.encode())
    }

    fn start_worker(&mut self, index: usize, ctx: &mut Context<Self>) {
        let worker = Worker::new(
            index,
            self.settings.app.clone(),
            ctx.address().recipient(),
            self.lifespan_calls.then(|| self.outbox.clone()),
        )
        .start();
        if self.bot_known {
            worker.do_send(self.bot_frame());
        }
        let links = Rc::new(ScopeLinks {
            worker,
            supervisor: ctx.address().recipient(),
            outbox: self.outbox.clone(),
            grace: self.settings.scopes.disconnect_grace,
        });
        self.workers.started(index, links);
    }

    /// Tells the Poller whether to pause, if that changed.
    fn announce_backpressure(&mut self) {
        if let Some(change) = self.backlog.change() {
            if let Some(poller) = &self.poller {
                poller.do_send(change);
            }
        }
    }

    fn dispatch(&mut self, updates: Vec<Update>) {
        // Group by scope, keeping update order within each scope.
        let mut batches: Vec<(ScopeKey, Box<RawValue>, Vec<Event>)> = Vec::new();
        let mut index: HashMap<ScopeKey, usize> = HashMap::default();
        let mut skipped = Vec::new();
        for update in updates {
            metrics()
                .updates_received
                .inc(&[update.kind().unwrap_or("(empty)")]);
            let id = update.id.0;
            self.dispatched_through = Some(self.dispatched_through.map_or(id, |d| d.max(id)));
            let at = match routing::route(&update) {
                Ok(route) => match index.get(&route.key) {
                    Some(&i) => i,
                    None => {
                        index.insert(route.key.clone(), batches.len());
                        let subject = route.subject.into_owned();
                        batches.push((route.key, subject, Vec::new()));
                        batches.len() - 1
                    }
                },
                Err(why) => {
                    self.skip(id, why);
                    skipped.push(id);
                    continue;
                }
            };
            // Routed, so its kind's value is an object.
            let Some(event) = Event::of_update(update) else {
                skipped.push(id);
                continue;
            };
            self.backlog.add(1);
            batches[at].2.push(event);
        }
        if !skipped.is_empty() {
            self.outbox.done(skipped);
        }
        for (key, subject, events) in batches {
            if !events.is_empty() {
                self.deliver(key, || subject, events);
            }
        }
    }

    fn skip(&mut self, update_id: i64, why: Unroutable) {
        let kind = match &why {
            Unroutable::Empty => "(empty)".to_string(),
            Unroutable::NotAnObject(k) | Unroutable::NoChatOrUser(k) => k.clone(),
        };
        let known = routing::KNOWN_KINDS.contains(&kind.as_str());
        match why {
            Unroutable::NoChatOrUser(_) if known => {
                log::debug!("update={update_id} kind={kind} has no chat or user; skipped")
            }
            Unroutable::NoChatOrUser(_) => log::debug!(
                "update={update_id} kind={kind} is unknown to this version and has no chat or user; skipped"
            ),
            Unroutable::NotAnObject(_) => {
                log::warn!("update={update_id} kind={kind} is not an object; skipped")
            }
            Unroutable::Empty => log::warn!("update={update_id} carries no update kind; skipped"),
        }
        metrics().updates_skipped.inc(&[&kind]);
    }

    /// New events for `key`, after every event it already has.
    fn deliver(
        &mut self,
        key: ScopeKey,
        subject: impl FnOnce() -> Box<RawValue>,
        events: Vec<Event>,
    ) {
        if let Some((addr, stalled)) = self.scopes.give(&key, events.len()) {
            if stalled {
                self.backlog.remove(events.len());
            }
            addr.do_send(Enqueue(events));
            return;
        }
        self.pending.push(&key, subject, events);
        self.try_start(&key);
    }

    /// Whether `key`'s pending events must wait for something other than a
    /// worker or room.
    fn blocked(&self, key: &ScopeKey) -> bool {
        self.scopes.holds(key) || self.quarantine.holds(key) || self.pending.awaits_bounces(key)
    }

    /// Starts a scope for `key`'s pending events if nothing holds them, else
    /// leaves them to whatever does.
    fn try_start(&mut self, key: &ScopeKey) {
        if self.shutting_down || !self.pending.contains(key) || self.blocked(key) {
            return;
        }
        match self.workers.pick(key) {
            Some(worker) if self.scopes.has_room() && self.scopes.none_waiting() => {
                self.start_scope(key, worker, false)
            }
            _ => {
                if let Some(p) = self.pending.get_mut(key).filter(|p| !p.queued) {
                    p.queued = true;
                    self.scopes.wait(key.clone());
                }
                self.make_room();
            }
        }
    }

    /// Starts scopes for waiting keys while there is a worker and room.
    fn admit_waiting(&mut self) {
        while let Some(key) = self.scopes.first_waiting().cloned() {
            let Some(worker) = self.workers.pick(&key).filter(|_| self.scopes.has_room()) else {
                break;
            };
            self.scopes.admitted();
            let Some(p) = self.pending.get_mut(&key) else {
                continue;
            };
            p.queued = false;
            if !self.blocked(&key) && !self.shutting_down {
                self.start_scope(&key, worker, false);
            }
        }
        if self.scopes.none_waiting() {
            if let Some((since, waited)) = self.scopes.room_again() {
                log::info!(
                    "max_scopes: room again after {:.1}s; {waited} chat(s) waited for it",
                    since.elapsed().as_secs_f64()
                );
            }
        } else {
            self.make_room();
        }
    }

    /// Closes idle scopes, longest idle first, while chats wait for room and
    /// the scopes already closing will not make enough.
    fn make_room(&mut self) {
        // Without a worker no waiting chat could start anyway.
        if !self.workers.any_live() {
            return;
        }
        for (key, addr) in self.scopes.make_room(Instant::now()) {
            log::debug!(
                "scope={key} evicted: max_scopes={} reached",
                self.settings.scopes.max_scopes
            );
            addr.do_send(Close { reason: "evicted" });
        }
    }

    /// A scope on `worker` for `key`, given all its pending events.
    fn start_scope(&mut self, key: &ScopeKey, worker: usize, isolated: bool) {
        let Some(p) = self.pending.take(key) else {
            return;
        };
        let Some(links) = self.workers.links(worker).cloned() else {
            unreachable!("scopes are only started on workers with an address")
        };
        let scope_id = self.scopes.next_id();
        let actor = ScopeActor::new(
            scope_id,
            key.clone(),
            p.subject,
            self.bot.clone(),
            links,
            isolated,
        );
        let addr = actor.start();
        self.workers.scope_started(worker);
        metrics().scopes_started.inc();
        let events: Vec<Event> = p.events.into();
        let dispatched = events.len() as u64;
        addr.do_send(Enqueue(events));
        log::debug!("scope={key} started on worker={worker}");
        let scope = Scope::new(scope_id, addr, worker, isolated, dispatched, Instant::now());
        self.scopes.insert(key.clone(), scope);
    }

    fn close(&mut self, key: &ScopeKey, reason: &'static str) {
        if let Some(addr) = self.scopes.close(key, false) {
            addr.do_send(Close { reason });
        }
    }

    /// Logs, once per stall, scopes whose app stopped receiving.
    fn report_stalls(&mut self) {
        let limit = self.settings.scopes.stall_warning;
        for stall in self.scopes.stalls(Instant::now(), limit) {
            // A stalled scope's queue no longer counts towards
            // backpressure: one stuck chat must not stop the others.
            self.backlog.remove(stall.queued);
            log::warn!(
                "scope={} has not received an event for {}s: {} event(s) queued (is the app still calling receive()?)",
                stall.key,
                stall.silent_for.as_secs(),
                stall.queued
            );
        }
        self.announce_backpressure();
    }

    /// Closes scopes idle for `idle_timeout`.
    fn reap_idle(&mut self) {
        let timeout = self.settings.scopes.idle_timeout;
        for key in self.scopes.expired(Instant::now(), timeout) {
            log::debug!("scope={key} idle for {}s; closing", timeout.as_secs());
            self.close(&key, "idle");
        }
    }

    /// The instance of `key`'s scope is done with the first `through` events
    /// it was given.
    fn scope_idle(&mut self, scope_id: u64, key: &ScopeKey, through: u64) {
        match self.scopes.idle(scope_id, key, through, Instant::now()) {
            IdleReport::Ignored => {}
            // Done with what it held without killing its worker: the chat
            // goes back to the ordinary workers once this scope has stopped.
            IdleReport::Isolated => self.close(key, MOVED),
            IdleReport::Listed => {
                if !self.scopes.none_waiting() {
                    self.make_room();
                }
            }
        }
    }

    fn scope_stopped(&mut self, report: Stopped, ctx: &mut Context<Self>) {
        let Stopped {
            scope_id,
            key,
            mut leftover,
            in_hand,
            flushed,
            accepted,
            lost,
            subject,
        } = report;
        if in_hand && !self.shutting_down {
            // Counted out when it was received; undelivered again.
            self.backlog.add(1);
        }
        let Some(ended) = self.scopes.stopped(scope_id, &key, accepted) else {
            return;
        };
        if ended.stalled && !self.shutting_down {
            // Its leftovers go to a fresh scope and count again (the one in
            // hand already does, above).
            self.backlog.add(leftover.len() - usize::from(in_hand));
        }
        self.workers.scope_ended(ended.worker);
        if self.shutting_down {
            // What it did not finish stays in the journal for the next start.
            self.check_closed();
            return;
        }
        let in_hand_id = if in_hand {
            leftover.first().and_then(Event::update_id)
        } else {
            None
        };
        if ended.isolated {
            self.isolated_stopped(&key, lost, in_hand_id, &mut leftover);
        } else if lost == Some(Death::App) && (in_hand || flushed) {
            self.quarantine.suspect(key.clone());
            self.count_suspect(ctx);
        }
        self.pending
            .hand_back(&key, subject, leftover, ended.bounces);
        self.try_start(&key);
        self.pump_isolation(ctx);
        self.admit_waiting();
        self.check_closed();
    }

    /// Events that reached a scope after it stopped by itself.
    fn bounced(&mut self, key: &ScopeKey, events: Vec<Event>, ctx: &mut Context<Self>) {
        if self.shutting_down {
            return;
        }
        let n = events.len();
        match self.pending.bounced(key, events) {
            None => log::error!("scope={key} {n} bounced event(s) with nowhere to go; dropped"),
            Some(true) => {
                self.try_start(key);
                self.pump_isolation(ctx);
            }
            Some(false) => {}
        }
    }

    fn check_closed(&mut self) {
        if self.shutting_down && self.scopes.is_empty() {
            for w in self.close_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn resolve_ready(&mut self, result: Result<(), StartupError>) {
        for w in self.ready_waiters.drain(..) {
            let _ = w.send(result.clone());
        }
    }
}

/// A Chat or User object from an update is plain JSON.
fn encode_subject(subject: &Value) -> Box<RawValue> {
    serde_json::value::to_raw_value(subject).expect("a Chat or User object is plain JSON")
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        for _ in 0..self.settings.app.workers {
            let index = self.workers.add_regular();
            self.start_worker(index, ctx);
        }
        let tick = (self.settings.scopes.idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        ctx.run_interval(tick, |act, _| act.reap_idle());
        let stall_tick = (self.settings.scopes.stall_warning / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        ctx.run_interval(stall_tick, |act, _| act.report_stalls());
        let isolation_tick =
            (self.isolation_limit() / 4).clamp(Duration::from_millis(100), Duration::from_secs(5));
        ctx.run_interval(isolation_tick, |act, _| act.release_slow_isolated());
        ctx.run_interval(METRICS_TICK, |act, _| act.publish_metrics());
    }
}

impl Handler<Dispatch> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: Dispatch, _: &mut Context<Self>) {
        self.dispatch(msg.0);
        self.announce_backpressure();
    }
}

impl Handler<Push> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: Push, _: &mut Context<Self>) {
        let Push { event, placed } = msg;
        if let Some(placed) = placed {
            if self.backlog.full() {
                let _ = placed.send(Err(Full));
                return;
            }
            // The Ingress stores it only once told its place; an Ingress
            // gone meanwhile (the system stopping) stores nothing, and the
            // event goes with this run.
            let _ = placed.send(Ok(self.dispatched_through));
        }
        metrics().updates_received.inc(&[metrics::PUSHED]);
        self.backlog.add(1);
        let subject = json!({ "id": event.chat_id });
        self.deliver(
            ScopeKey::chat(event.chat_id),
            || encode_subject(&subject),
            vec![Event::Json(event.event)],
        );
        self.announce_backpressure();
    }
}

impl Handler<SetBot> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: SetBot, _: &mut Context<Self>) {
        // A User object from getMe is plain JSON.
        let bot = serde_json::value::to_raw_value(&msg.0).expect("getMe's User is plain JSON");
        self.bot = Rc::from(bot);
        if self.bot_known {
            return;
        }
        self.bot_known = true;
        for links in self.workers.all_links() {
            links.worker.do_send(self.bot_frame());
        }
    }
}

impl Handler<WaitReady> for Supervisor {
    type Result = MessageResult<WaitReady>;
    fn handle(&mut self, _: WaitReady, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if let Some(e) = &self.startup_error {
            let _ = tx.send(Err(e.clone()));
        } else if self.workers.all_ready() {
            let _ = tx.send(Ok(()));
        } else {
            self.ready_waiters.push(tx);
        }
        MessageResult(rx)
    }
}

impl Handler<WatchBackpressure> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: WatchBackpressure, _: &mut Context<Self>) {
        // The Poller's first getUpdates waits for this answer.
        msg.0.do_send(self.backlog.state());
        self.poller = Some(msg.0);
    }
}

impl Handler<CloseAll> for Supervisor {
    type Result = MessageResult<CloseAll>;
    fn handle(&mut self, _: CloseAll, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        // What waits (for room, a worker, or isolation) stays in the journal.
        self.pending.clear();
        self.scopes.clear_waiting();
        self.quarantine.clear();
        let (tx, rx) = oneshot::channel();
        self.close_waiters.push(tx);
        let keys = self.scopes.keys();
        log::info!("closing {} scope(s)", keys.len());
        for key in keys {
            self.close(&key, SHUTDOWN);
        }
        self.check_closed();
        MessageResult(rx)
    }
}

impl Handler<StopWorkers> for Supervisor {
    type Result = MessageResult<StopWorkers>;
    fn handle(&mut self, msg: StopWorkers, _: &mut Context<Self>) -> Self::Result {
        self.stopping_workers = true;
        let (tx, rx) = oneshot::channel();
        if self.workers.all_exited() {
            let _ = tx.send(());
        } else {
            self.exit_waiters.push(tx);
        }
        for links in self.workers.all_links() {
            links.worker.do_send(ShutdownWorker {
                grace: msg.grace.as_secs_f64(),
            });
        }
        MessageResult(rx)
    }
}

impl Handler<ScopeReport> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: ScopeReport, ctx: &mut Context<Self>) {
        match msg {
            ScopeReport::Received { scope_id, key, ids } => {
                // Moving again after a stall: its queue counts again.
                let again = self
                    .scopes
                    .received(scope_id, &key, ids.len(), Instant::now());
                self.backlog.add(again);
                self.backlog.remove(ids.len());
            }
            ScopeReport::Idle {
                scope_id,
                key,
                through,
            } => self.scope_idle(scope_id, &key, through),
            ScopeReport::InstanceEnded {
                scope_id,
                key,
                through,
            } => {
                // Events may be on their way to it; then it restarts instead.
                if self.scopes.ended_with_all(scope_id, &key, through) {
                    self.close(&key, "ended");
                }
            }
            ScopeReport::Stopped(report, addr) => {
                self.scope_stopped(*report, ctx);
                // Whatever it bounces was sent before this, so arrives next.
                addr.do_send(Terminate);
            }
            ScopeReport::Bounced { key, events } => self.bounced(&key, events, ctx),
        }
        self.announce_backpressure();
    }
}

impl Handler<WorkerEvent> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: WorkerEvent, ctx: &mut Context<Self>) {
        match msg {
            WorkerEvent::Ready { index, pid, .. } => {
                let role = self.workers.ready(index, pid);
                self.publish_metrics();
                if role == Role::Isolation {
                    self.pump_isolation(ctx);
                    return;
                }
                if self.workers.all_ready() {
                    self.started_up = true;
                    self.resolve_ready(Ok(()));
                }
                self.admit_waiting();
                self.reload_worker_ready(index);
            }
            WorkerEvent::Failed { index, error } => {
                let failures = self.workers.failed(index);
                if !self.started_up || failures >= CRASH_LOOP_LIMIT {
                    let error = if failures >= CRASH_LOOP_LIMIT {
                        StartupError::CrashLoop { index, error }
                    } else {
                        StartupError::App(error)
                    };
                    self.startup_error.get_or_insert(error.clone());
                    self.resolve_ready(Err(error));
                }
            }
            WorkerEvent::Exited {
                index,
                pid,
                status,
                death,
                instances,
            } => self.worker_exited(index, pid, status, death, instances, ctx),
        }
    }
}

impl Supervisor {
    fn worker_exited(
        &mut self,
        index: usize,
        pid: u32,
        status: Option<std::process::ExitStatus>,
        death: Death,
        instances: usize,
        ctx: &mut Context<Self>,
    ) {
        if let Some(links) = self.workers.exited(index, death) {
            // Forgotten here first, so no new scope is attached to it.
            links.worker.do_send(Release);
        }
        self.publish_metrics();
        if self.stopping_workers {
            log::info!("worker={index} pid={pid} exited ({})", describe(status));
            if self.workers.all_exited() {
                for w in self.exit_waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            return;
        }
        if self.startup_error.is_some() {
            return;
        }
        if self.workers.role(index) == Role::Isolation {
            return self.isolation_exited(index, pid, status, death, ctx);
        }
        if self.reload_worker_exited(index, pid, status, ctx) {
            return;
        }
        let why = match death {
            Death::Outside => " (killed from outside: no update is suspected)",
            Death::App | Death::Asked => "",
        };
        log::error!(
            "worker={index} pid={pid} died ({}); restarting it; the {instances} instance(s) it ran get their unfinished updates again{why}",
            describe(status)
        );
        metrics().worker_restarts.inc();
        let delay = self.workers.restart_delay(index);
        ctx.run_later(delay, move |act, ctx| {
            if !act.stopping_workers {
                act.start_worker(index, ctx);
            }
        });
    }
}

// --- operations: metrics and reloading the workers ---------------------------

/// How often the scope and worker gauges are refreshed besides the moments
/// they change.
const METRICS_TICK: Duration = Duration::from_millis(500);

impl Supervisor {
    /// Copies the scope and worker counts into the metrics registry.
    fn publish_metrics(&self) {
        let m = metrics();
        m.scopes_live.set_count(self.scopes.count());
        m.workers_configured.set_count(self.settings.app.workers);
        m.workers_ready.set_count(self.workers.ready_regular());
    }
}

impl Handler<ReloadWorkers> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: ReloadWorkers, ctx: &mut Context<Self>) {
        if self.stopping_workers || self.shutting_down || !self.started_up {
            log::info!(
                "reload ({}) ignored: the daemon is starting or stopping",
                msg.reason
            );
            return;
        }
        if !self.reload.request(self.workers.live_regular()) {
            log::info!(
                "reload ({}) asked for while one is running; it follows",
                msg.reason
            );
            return;
        }
        log::info!(
            "reloading the workers ({}): workers={}",
            msg.reason,
            self.reload.queued()
        );
        self.reload_next(ctx);
    }
}

impl Supervisor {
    /// Starts the replacement of the next worker in the queue.
    fn reload_next(&mut self, ctx: &mut Context<Self>) {
        if self.stopping_workers || self.shutting_down {
            self.reload.cancel();
            return;
        }
        let old = match self.reload.next() {
            Next::Replace(old) => old,
            Next::Complete { again } => {
                log::info!(
                    "reload complete: workers={}",
                    self.workers.live_regular().len()
                );
                if again {
                    ctx.notify(ReloadWorkers {
                        reason: "asked for again during the last one".into(),
                    });
                }
                return;
            }
        };
        if self.workers.links(old).is_none() || self.workers.is_retired(old) {
            // Died meanwhile: the ordinary restart already loads the new code.
            return self.reload_next(ctx);
        }
        let new = self.workers.spare_regular(old);
        self.start_worker(new, ctx);
        log::info!(
            "worker={old} pid={} being replaced by worker={new}",
            self.workers.pid(old)
        );
        self.reload.replacing(old, new);
    }

    /// The replacement is ready: retire the worker it replaces. Its scopes
    /// get `telegram.disconnect`; events that arrive meanwhile wait, and go
    /// with what the scopes hand back, in order, to fresh scopes on live
    /// workers.
    fn reload_worker_ready(&mut self, index: usize) {
        let Some(old) = self.reload.ready(index) else {
            return;
        };
        self.workers.retire(old);
        let Some(addr) = self.workers.links(old).map(|l| l.worker.clone()) else {
            // Exited already; `reload_worker_exited` moved on.
            return;
        };
        metrics().worker_reloads.inc();
        self.publish_metrics();
        let keys = self.scopes.on_worker(old);
        log::info!(
            "worker={old} pid={} retiring: scopes={} move to the new workers",
            self.workers.pid(old),
            keys.len()
        );
        for key in keys {
            self.close(&key, "reload");
        }
        addr.do_send(ShutdownWorker {
            grace: self.settings.scopes.disconnect_grace.as_secs_f64(),
        });
    }

    /// A worker exited: true when the reload accounts for it (a retired
    /// worker, or a replacement that never became ready), so it is not
    /// restarted.
    fn reload_worker_exited(
        &mut self,
        index: usize,
        pid: u32,
        status: Option<std::process::ExitStatus>,
        ctx: &mut Context<Self>,
    ) -> bool {
        match self.reload.exited(index, self.workers.is_retired(index)) {
            Exit::Unrelated => false,
            Exit::Retired { advance } => {
                log::info!("worker={index} pid={pid} retired ({})", describe(status));
                if advance {
                    self.reload_next(ctx);
                }
                true
            }
            Exit::Aborted => {
                log::error!(
                    "reload aborted: the new worker={index} pid={pid} did not start ({}); the running workers stay",
                    describe(status)
                );
                self.workers.retire(index);
                true
            }
        }
    }
}
