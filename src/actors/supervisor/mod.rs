//! Supervisor: owns the scopes and the workers.
//!
//! Takes batches of updates from the Poller ([`Dispatch`]), routes each to its
//! scope (creating the ScopeActor on the first update), and keeps at most
//! `max_scopes` scopes alive: when full, the longest-idle scope (one whose
//! instance is done with everything it was given) is closed to make room, and
//! a new chat waits for the room. Closes scopes idle for `idle_timeout`, and
//! scopes whose instance ended by itself. Starts the Worker actors, reports
//! when all are ready, restarts a worker that dies (a worker that keeps
//! failing before it is ready stops the daemon), gives each new scope the
//! least-loaded worker, and replaces every worker on a reload.
//!
//! # Where a scope's events are
//!
//! Every event the Supervisor holds for a scope key is in exactly one place,
//! in update order: given to the key's live scope, or in its [`Pending`]
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
//! [`quarantine`](super::quarantine)); the other chats go on at once on the
//! other workers. Only an update that killed the isolation worker on its own,
//! repeatedly, is dropped.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::oneshot;

mod pending;

use pending::PendingEvents;

use crate::actors::outbox::{Done, Outbox};
use crate::actors::quarantine::{Quarantine, Verdict, ISOLATED_DEATHS};
use crate::actors::scope::{
    Close, Enqueue, ScopeActor, ScopeLinks, ScopeReport, Stopped, Terminate, SHUTDOWN,
};
use crate::actors::worker::{describe, Death, Release, ShutdownWorker, Worker, WorkerEvent};
use crate::backoff::Backoff;
use crate::ops::metrics::metrics;
use crate::routing::{self, ScopeKey, Unroutable};
use crate::settings::Settings;
use crate::telegram::Update;

/// Consecutive start failures of one worker after which the daemon gives up.
const CRASH_LOOP_LIMIT: u32 = 5;

/// The reason a scope gets when it leaves the isolation worker.
const MOVED: &str = "moved";

/// New updates from the Poller, in update order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Dispatch(pub Vec<Update>);

/// The bot's own User (from getMe), for every scope's `bot` key.
#[derive(Message)]
#[rtype(result = "()")]
pub struct SetBot(pub Value);

/// Resolves when every worker is ready, or with the first worker's error.
#[derive(Message)]
#[rtype(result = "oneshot::Receiver<Result<(), String>>")]
pub struct WaitReady;

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

struct ScopeEntry {
    scope_id: u64,
    addr: Addr<ScopeActor>,
    worker: usize,
    /// Events given to the scope, and how many it reported received.
    dispatched: u64,
    acked: u64,
    /// When its app last received an event (or the scope started).
    last_progress: Instant,
    stall_reported: bool,
    /// While its instance is idle: its place in `Supervisor::idle`, and since
    /// when.
    idle: Option<(u64, Instant)>,
    /// Runs on the isolation worker.
    isolated: bool,
}

impl ScopeEntry {
    fn busy(&self) -> bool {
        self.dispatched > self.acked
    }
}

/// A scope told to close that has not stopped yet.
struct Closing {
    key: ScopeKey,
    worker: usize,
    /// Closed to make room for a waiting chat.
    for_room: bool,
    isolated: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    /// One of the `app.workers`.
    Regular,
    /// Runs one suspect chat at a time; started only while there are any.
    Isolation,
}

struct WorkerSlot {
    /// The worker's address and the rest of what its scopes talk to; `None`
    /// while no worker runs in the slot.
    links: Option<Rc<ScopeLinks>>,
    ready: bool,
    scopes: usize,
    /// Consecutive failures before reaching ready.
    failures: u32,
    /// Consecutive deaths that were not asked for (the isolation worker's
    /// crash-loop guard: each restart waits longer).
    deaths: u32,
    pid: u32,
    /// Replaced by a reload: takes no new scopes, is not restarted.
    retired: bool,
    role: Role,
}

impl WorkerSlot {
    /// A slot whose worker is not started yet.
    fn empty(role: Role) -> WorkerSlot {
        WorkerSlot {
            links: None,
            ready: false,
            scopes: 0,
            failures: 0,
            deaths: 0,
            pid: 0,
            retired: false,
            role,
        }
    }
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
    outbox: Addr<Outbox>,
    /// The bot's User object, encoded once for every scope dict.
    bot: Rc<RawValue>,
    scopes: HashMap<ScopeKey, ScopeEntry>,
    closing: HashMap<u64, Closing>,
    /// Keys whose closing scope has not stopped yet: scope_id.
    closing_keys: HashMap<ScopeKey, u64>,
    next_scope_id: u64,
    pending: PendingEvents,
    /// Keys with pending events that wait for a worker or for room, in the
    /// order they began to wait.
    admit: VecDeque<ScopeKey>,
    /// Idle scopes, longest idle first: tick -> key.
    idle: BTreeMap<u64, ScopeKey>,
    next_tick: u64,
    /// Scopes closed to make room that have not stopped yet.
    evicting: usize,
    /// Since when chats have been waiting for room with no idle scope to
    /// close, and how many have waited (logged once per such stretch).
    full: Option<(Instant, usize)>,
    quarantine: Quarantine,
    /// The isolation worker's slot, while one runs or starts.
    isolation: Option<usize>,
    workers: Vec<WorkerSlot>,
    ready_waiters: Vec<oneshot::Sender<Result<(), String>>>,
    startup_error: Option<String>,
    close_waiters: Vec<oneshot::Sender<()>>,
    exit_waiters: Vec<oneshot::Sender<()>>,
    stopping_workers: bool,
    shutting_down: bool,
    /// Updates dispatched that no app has received yet; the Poller reads it.
    undelivered: Rc<Cell<usize>>,
    /// Every worker has been ready once: later failures are restarts.
    started_up: bool,
    /// A reload in progress (SIGHUP, --reload).
    reload: Reload,
    tally: Tally,
}

impl Supervisor {
    pub fn new(
        settings: Settings,
        outbox: Addr<Outbox>,
        undelivered: Rc<Cell<usize>>,
    ) -> Supervisor {
        Supervisor {
            undelivered,
            settings,
            outbox,
            bot: Rc::from(RawValue::NULL.to_owned()),
            scopes: HashMap::new(),
            closing: HashMap::new(),
            closing_keys: HashMap::new(),
            next_scope_id: 1,
            pending: PendingEvents::default(),
            admit: VecDeque::new(),
            idle: BTreeMap::new(),
            next_tick: 0,
            evicting: 0,
            full: None,
            quarantine: Quarantine::default(),
            isolation: None,
            workers: Vec::new(),
            ready_waiters: Vec::new(),
            startup_error: None,
            close_waiters: Vec::new(),
            exit_waiters: Vec::new(),
            stopping_workers: false,
            shutting_down: false,
            started_up: false,
            reload: Reload::default(),
            tally: Tally::default(),
        }
    }

    fn start_worker(&mut self, index: usize, ctx: &mut Context<Self>) {
        let worker = Worker::new(index, self.settings.app.clone(), ctx.address().recipient());
        let slot = &mut self.workers[index];
        slot.links = Some(Rc::new(ScopeLinks {
            worker: worker.start(),
            supervisor: ctx.address().recipient(),
            outbox: self.outbox.clone(),
            grace: self.settings.scopes.disconnect_grace,
        }));
        slot.ready = false;
    }

    /// The live regular worker with the fewest scopes.
    fn pick_worker(&self) -> Option<usize> {
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.links.is_some() && !w.retired && w.role == Role::Regular)
            .min_by_key(|(_, w)| (!w.ready, w.scopes))
            .map(|(i, _)| i)
    }

    /// `{"type": "telegram.<kind>", ...fields, "update_id": id}`
    fn event_for(update: Update) -> Option<Value> {
        let id = update.id.0;
        let (kind, value) = update.raw.into_iter().find(|(k, _)| k != "update_id")?;
        let Value::Object(mut fields) = value else {
            return None;
        };
        fields.insert("type".into(), Value::String(format!("telegram.{kind}")));
        fields.insert("update_id".into(), json!(id));
        Some(Value::Object(fields))
    }

    fn dispatch(&mut self, updates: Vec<Update>) {
        // Group by scope, keeping update order within each scope.
        let mut batches: Vec<(ScopeKey, Value, Vec<Value>)> = Vec::new();
        let mut index: HashMap<ScopeKey, usize> = HashMap::new();
        let mut skipped = Vec::new();
        for update in updates {
            metrics()
                .updates_received
                .inc(&[update.kind().map_or("(empty)", |(k, _)| k)]);
            let routed = routing::route(&update);
            let id = update.id.0;
            match routed {
                Ok(route) => {
                    let Some(event) = Self::event_for(update) else {
                        skipped.push(id);
                        continue;
                    };
                    self.undelivered.set(self.undelivered.get() + 1);
                    match index.get(&route.key) {
                        Some(&i) => batches[i].2.push(event),
                        None => {
                            index.insert(route.key.clone(), batches.len());
                            batches.push((route.key, route.subject, vec![event]));
                        }
                    }
                }
                Err(why) => {
                    self.skip(id, why);
                    skipped.push(id);
                }
            }
        }
        if !skipped.is_empty() {
            self.outbox.do_send(Done(skipped));
        }
        for (key, subject, events) in batches {
            self.deliver(key, || encode_subject(&subject), events);
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
        events: Vec<Value>,
    ) {
        if let Some(entry) = self.scopes.get_mut(&key).filter(|e| !e.isolated) {
            if entry.stall_reported {
                self.undelivered
                    .set(self.undelivered.get().saturating_sub(events.len()));
            }
            entry.dispatched += events.len() as u64;
            if let Some((tick, _)) = entry.idle.take() {
                self.idle.remove(&tick);
            }
            entry.addr.do_send(Enqueue(events));
            return;
        }
        self.pending.push(&key, subject, events);
        self.try_start(&key);
    }

    /// Whether `key`'s pending events must wait for something other than a
    /// worker or room.
    fn blocked(&self, key: &ScopeKey) -> bool {
        self.closing_keys.contains_key(key)
            || self.scopes.contains_key(key)
            || self.quarantine.holds(key)
            || self.pending.awaits_bounces(key)
    }

    fn live_scopes(&self) -> usize {
        self.scopes.len() + self.closing.len()
    }

    fn has_room(&self) -> bool {
        self.live_scopes() < self.settings.scopes.max_scopes
    }

    /// Starts a scope for `key`'s pending events if nothing holds them, else
    /// leaves them to whatever does.
    fn try_start(&mut self, key: &ScopeKey) {
        if self.shutting_down || !self.pending.contains(key) || self.blocked(key) {
            return;
        }
        match self.pick_worker() {
            Some(worker) if self.has_room() && self.admit.is_empty() => {
                self.start_scope(key, worker, false)
            }
            _ => {
                if let Some(p) = self.pending.get_mut(key).filter(|p| !p.queued) {
                    p.queued = true;
                    self.admit.push_back(key.clone());
                }
                self.make_room();
            }
        }
    }

    /// Starts scopes for waiting keys while there is a worker and room.
    fn admit_waiting(&mut self) {
        while let Some(key) = self.admit.front().cloned() {
            let Some(worker) = self.pick_worker().filter(|_| self.has_room()) else {
                break;
            };
            self.admit.pop_front();
            let Some(p) = self.pending.get_mut(&key) else {
                continue;
            };
            p.queued = false;
            if !self.blocked(&key) && !self.shutting_down {
                self.start_scope(&key, worker, false);
            }
        }
        if self.admit.is_empty() {
            if let Some((since, waited)) = self.full.take() {
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
        if self.pick_worker().is_none() {
            return;
        }
        while self.admit.len() > self.evicting
            && self.live_scopes() >= self.settings.scopes.max_scopes
        {
            let Some((_, key)) = self.idle.pop_first() else {
                let waiting = self.admit.len();
                match &mut self.full {
                    Some((_, waited)) => *waited = (*waited).max(waiting),
                    None => {
                        log::warn!(
                            "max_scopes={} reached and no instance is idle: {waiting} chat(s) wait for a scope to end (raise scopes.max_scopes?)",
                            self.settings.scopes.max_scopes
                        );
                        self.full = Some((Instant::now(), waiting));
                    }
                }
                return;
            };
            if let Some(e) = self.scopes.get_mut(&key) {
                e.idle = None;
            }
            log::debug!(
                "scope={key} evicted: max_scopes={} reached",
                self.settings.scopes.max_scopes
            );
            self.close_for(&key, "evicted", true);
            self.evicting += 1;
        }
    }

    /// A scope on `worker` for `key`, given all its pending events.
    fn start_scope(&mut self, key: &ScopeKey, worker: usize, isolated: bool) {
        let Some(p) = self.pending.take(key) else {
            return;
        };
        let Some(links) = self.workers[worker].links.clone() else {
            unreachable!("scopes are only started on workers with an address")
        };
        let scope_id = self.next_scope_id;
        self.next_scope_id += 1;
        let actor = ScopeActor::new(
            scope_id,
            key.clone(),
            p.subject,
            self.bot.clone(),
            links,
            isolated,
        );
        let addr = actor.start();
        self.workers[worker].scopes += 1;
        metrics().scopes_started.inc();
        let events: Vec<Value> = p.events.into();
        let dispatched = events.len() as u64;
        addr.do_send(Enqueue(events));
        log::debug!("scope={key} started on worker={worker}");
        self.scopes.insert(
            key.clone(),
            ScopeEntry {
                scope_id,
                addr,
                worker,
                dispatched,
                acked: 0,
                last_progress: Instant::now(),
                stall_reported: false,
                idle: None,
                isolated,
            },
        );
    }

    fn close(&mut self, key: &ScopeKey, reason: &'static str) {
        self.close_for(key, reason, false);
    }

    fn close_for(&mut self, key: &ScopeKey, reason: &'static str, for_room: bool) {
        let Some(entry) = self.scopes.remove(key) else {
            return;
        };
        if let Some((tick, _)) = entry.idle {
            self.idle.remove(&tick);
        }
        self.closing_keys.insert(key.clone(), entry.scope_id);
        self.closing.insert(
            entry.scope_id,
            Closing {
                key: key.clone(),
                worker: entry.worker,
                for_room,
                isolated: entry.isolated,
            },
        );
        entry.addr.do_send(Close { reason });
    }

    /// How long the isolated chat may work on an update without its worker
    /// dying before it is taken to be innocent: past the ping deadline a hang
    /// would have been caught, so it is only slow. Without this, one handler
    /// awaiting something for an hour would hold every other suspect back.
    fn isolation_limit(&self) -> Duration {
        self.settings.app.hang_timeout + Duration::from_secs(5)
    }

    /// Moves the isolated chat back to the regular workers once it has gone
    /// `isolation_limit` without progress and without a death.
    fn release_slow_isolated(&mut self) {
        let limit = self.isolation_limit();
        let slow = self
            .quarantine
            .current()
            .filter(|key| {
                self.scopes
                    .get(*key)
                    .is_some_and(|e| e.isolated && e.last_progress.elapsed() >= limit)
            })
            .cloned();
        if let Some(key) = slow {
            log::warn!(
                "scope={key} ran {:.0}s alone on the isolation worker without killing it; taken to be innocent and moved back",
                limit.as_secs_f64()
            );
            self.close(&key, MOVED);
        }
    }

    /// Logs, once per stall, scopes whose app stopped receiving.
    fn report_stalls(&mut self) {
        let limit = self.settings.scopes.stall_warning;
        let now = Instant::now();
        for (key, e) in &mut self.scopes {
            if e.busy() && !e.stall_reported && now.duration_since(e.last_progress) >= limit {
                e.stall_reported = true;
                // A stalled scope's queue no longer counts towards
                // backpressure: one stuck chat must not stop the others.
                let outstanding = (e.dispatched - e.acked) as usize;
                self.undelivered
                    .set(self.undelivered.get().saturating_sub(outstanding));
                log::warn!(
                    "scope={key} has not received an event for {}s: {} event(s) queued (is the app still calling receive()?)",
                    now.duration_since(e.last_progress).as_secs(),
                    e.dispatched - e.acked
                );
            }
        }
    }

    /// Closes scopes idle for `idle_timeout`: the front of the idle list.
    fn reap_idle(&mut self) {
        let timeout = self.settings.scopes.idle_timeout;
        let now = Instant::now();
        let mut expired = Vec::new();
        for key in self.idle.values() {
            match self.scopes.get(key).and_then(|e| e.idle) {
                Some((_, since)) if now.duration_since(since) >= timeout => {
                    expired.push(key.clone())
                }
                _ => break,
            }
        }
        for key in expired {
            log::debug!("scope={key} idle for {}s; closing", timeout.as_secs());
            self.close(&key, "idle");
        }
    }

    /// The instance of `key`'s scope is done with the first `through` events
    /// it was given.
    fn scope_idle(&mut self, scope_id: u64, key: &ScopeKey, through: u64) {
        let Some(e) = self.scopes.get_mut(key).filter(|e| e.scope_id == scope_id) else {
            return;
        };
        if e.dispatched != through || e.idle.is_some() {
            // More were given since: not idle after all.
            return;
        }
        if e.isolated {
            // Done with what it held without killing its worker: the chat
            // goes back to the ordinary workers once this scope has stopped.
            self.close(key, MOVED);
            return;
        }
        let tick = self.next_tick;
        self.next_tick += 1;
        e.idle = Some((tick, Instant::now()));
        self.idle.insert(tick, key.clone());
        if !self.admit.is_empty() {
            self.make_room();
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
            self.undelivered.set(self.undelivered.get() + 1);
        }
        let (worker, isolated, bounces) = if let Some(c) = self.closing.remove(&scope_id) {
            if self.closing_keys.get(&c.key) == Some(&scope_id) {
                self.closing_keys.remove(&c.key);
            }
            if c.for_room {
                self.evicting = self.evicting.saturating_sub(1);
            }
            (c.worker, c.isolated, 0)
        } else {
            // Stopped without being closed: its worker died.
            match self.scopes.get(&key) {
                Some(e) if e.scope_id == scope_id => {
                    let Some(e) = self.scopes.remove(&key) else {
                        unreachable!("looked up just above")
                    };
                    if let Some((tick, _)) = e.idle {
                        self.idle.remove(&tick);
                    }
                    if e.stall_reported && !self.shutting_down {
                        // Its leftovers go to a fresh scope and count again
                        // (the one in hand already does, above).
                        let unreceived = leftover.len() - usize::from(in_hand);
                        self.undelivered.set(self.undelivered.get() + unreceived);
                    }
                    (e.worker, e.isolated, e.dispatched.saturating_sub(accepted))
                }
                _ => return,
            }
        };
        if let Some(w) = self.workers.get_mut(worker) {
            w.scopes = w.scopes.saturating_sub(1);
        }
        if self.shutting_down {
            // What it did not finish stays in the journal for the next start.
            self.check_closed();
            return;
        }
        let in_hand_id = if in_hand {
            leftover
                .first()
                .and_then(|e| e.get("update_id"))
                .and_then(Value::as_i64)
        } else {
            None
        };
        if isolated {
            self.isolated_stopped(&key, lost, in_hand_id, &mut leftover);
        } else if lost == Some(Death::App) && (in_hand || flushed) {
            self.quarantine.suspect(key.clone());
            self.count_suspect(ctx);
        }
        self.pending.hand_back(&key, subject, leftover, bounces);
        self.try_start(&key);
        self.pump_isolation(ctx);
        self.admit_waiting();
        self.check_closed();
    }

    /// Events that reached a scope after it stopped by itself.
    fn bounced(&mut self, key: &ScopeKey, events: Vec<Value>, ctx: &mut Context<Self>) {
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

    /// The isolated chat's scope stopped: because its worker died (blame the
    /// update in hand, if the app did it), or because it was closed.
    fn isolated_stopped(
        &mut self,
        key: &ScopeKey,
        lost: Option<Death>,
        in_hand: Option<i64>,
        leftover: &mut Vec<Value>,
    ) {
        if self.quarantine.current() != Some(key) {
            return;
        }
        match lost {
            Some(Death::App) => match self.quarantine.died(in_hand) {
                Verdict::Drop(id) => {
                    log::error!(
                        "scope={key} update={id} dropped: it was being handled, alone in the isolation worker, each of the {} times that worker died (and at the death that made it a suspect)",
                        ISOLATED_DEATHS
                    );
                    leftover.remove(0);
                    self.outbox.do_send(Done(vec![id]));
                    self.undelivered
                        .set(self.undelivered.get().saturating_sub(1));
                    metrics().updates_dropped.inc();
                }
                Verdict::Retry => {
                    if let Some(id) = in_hand {
                        log::warn!(
                            "scope={key} update={id} was in hand when the isolation worker died; it runs once more, alone"
                        );
                    }
                }
            },
            // Killed from outside, or stopped for a reload: nothing to blame.
            Some(Death::Outside | Death::Asked) => {}
            None => {
                self.quarantine.release();
                log::info!("scope={key} cleared in isolation; back on the regular workers");
            }
        }
    }

    /// Runs the next suspect chat on the isolation worker, starting one if
    /// needed; ends the isolation worker when nothing is left to isolate.
    fn pump_isolation(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down || self.stopping_workers {
            return;
        }
        if self.quarantine.is_empty() {
            if let Some(index) = self.isolation {
                let slot = &mut self.workers[index];
                if let Some(links) = slot.links.as_ref().filter(|_| !slot.retired) {
                    slot.retired = true;
                    log::info!(
                        "isolation worker={index} pid={} no longer needed; stopping it",
                        slot.pid
                    );
                    links.worker.do_send(ShutdownWorker {
                        grace: self.settings.scopes.disconnect_grace.as_secs_f64(),
                    });
                }
            }
            return;
        }
        let Some(index) = self.isolation else {
            let index = match (0..self.workers.len()).find(|&i| {
                self.workers[i].links.is_none() && self.workers[i].role == Role::Isolation
            }) {
                Some(i) => {
                    self.workers[i] = WorkerSlot::empty(Role::Isolation);
                    i
                }
                None => {
                    self.workers.push(WorkerSlot::empty(Role::Isolation));
                    self.workers.len() - 1
                }
            };
            self.isolation = Some(index);
            log::info!(
                "starting isolation worker={index}: {} chat(s) to run one at a time",
                self.quarantine.len()
            );
            return self.start_isolation_worker(index, Duration::ZERO, ctx);
        };
        let slot = &self.workers[index];
        if !slot.ready || slot.retired || slot.links.is_none() {
            return;
        }
        let current = self.quarantine.current().cloned();
        if let Some(key) = &current {
            if self.scopes.contains_key(key) || self.closing_keys.contains_key(key) {
                return;
            }
        }
        // The current chat (after a death), or the next one.
        let mut tries = self.quarantine.len();
        while tries > 0 {
            tries -= 1;
            let Some(key) = self.quarantine.take_turn().cloned() else {
                return;
            };
            let startable = self.pending.contains(&key)
                && !self.pending.awaits_bounces(&key)
                && !self.closing_keys.contains_key(&key)
                && !self.scopes.contains_key(&key);
            if startable {
                log::debug!("scope={key} runs alone on isolation worker={index}");
                self.start_scope(&key, index, true);
                return;
            }
            if !self.pending.contains(&key)
                && !self.closing_keys.contains_key(&key)
                && !self.scopes.contains_key(&key)
            {
                // Nothing left to run for it (its only update was dropped).
                self.quarantine.release();
                continue;
            }
            return;
        }
    }

    fn start_isolation_worker(&mut self, index: usize, delay: Duration, ctx: &mut Context<Self>) {
        if delay.is_zero() {
            return self.start_worker(index, ctx);
        }
        ctx.run_later(delay, move |act, ctx| {
            if act.isolation == Some(index) && !act.stopping_workers && !act.shutting_down {
                act.start_worker(index, ctx);
            }
        });
    }

    /// One line per burst of suspects (a worker's death makes them all at
    /// once), not one per chat.
    fn count_suspect(&mut self, ctx: &mut Context<Self>) {
        self.tally.suspects += 1;
        if std::mem::replace(&mut self.tally.scheduled, true) {
            return;
        }
        ctx.run_later(Duration::from_millis(100), |act, _| {
            let n = std::mem::take(&mut act.tally.suspects);
            act.tally.scheduled = false;
            log::warn!(
                "{n} chat(s) had an update in hand when their worker died: each runs again alone on the isolation worker, one chat at a time ({} waiting in all); the other chats go on",
                act.quarantine.len()
            );
        });
    }

    fn check_closed(&mut self) {
        if self.shutting_down && self.scopes.is_empty() && self.closing.is_empty() {
            for w in self.close_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn all_ready(&self) -> bool {
        self.workers
            .iter()
            .all(|w| w.ready || w.retired || w.role == Role::Isolation)
    }

    fn resolve_ready(&mut self, result: Result<(), String>) {
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
        for index in 0..self.settings.app.workers {
            self.workers.push(WorkerSlot::empty(Role::Regular));
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
    }
}

impl Handler<SetBot> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: SetBot, _: &mut Context<Self>) {
        // A User object from getMe is plain JSON.
        let bot = serde_json::value::to_raw_value(&msg.0).expect("getMe's User is plain JSON");
        self.bot = Rc::from(bot);
    }
}

impl Handler<WaitReady> for Supervisor {
    type Result = MessageResult<WaitReady>;
    fn handle(&mut self, _: WaitReady, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if let Some(e) = &self.startup_error {
            let _ = tx.send(Err(e.clone()));
        } else if self.all_ready() {
            let _ = tx.send(Ok(()));
        } else {
            self.ready_waiters.push(tx);
        }
        MessageResult(rx)
    }
}

impl Handler<CloseAll> for Supervisor {
    type Result = MessageResult<CloseAll>;
    fn handle(&mut self, _: CloseAll, _: &mut Context<Self>) -> Self::Result {
        self.shutting_down = true;
        // What waits (for room, a worker, or isolation) stays in the journal.
        self.pending.clear();
        self.admit.clear();
        self.quarantine.clear();
        let (tx, rx) = oneshot::channel();
        self.close_waiters.push(tx);
        let keys: Vec<ScopeKey> = self.scopes.keys().cloned().collect();
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
        if self.workers.iter().all(|w| w.links.is_none()) {
            let _ = tx.send(());
        } else {
            self.exit_waiters.push(tx);
        }
        for w in &self.workers {
            if let Some(links) = &w.links {
                links.worker.do_send(ShutdownWorker {
                    grace: msg.grace.as_secs_f64(),
                });
            }
        }
        MessageResult(rx)
    }
}

impl Handler<ScopeReport> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: ScopeReport, ctx: &mut Context<Self>) {
        match msg {
            ScopeReport::Received { scope_id, key, ids } => {
                if let Some(e) = self.scopes.get_mut(&key).filter(|e| e.scope_id == scope_id) {
                    if e.stall_reported {
                        // Moving again: its queue counts again.
                        let outstanding = (e.dispatched - e.acked) as usize;
                        self.undelivered.set(self.undelivered.get() + outstanding);
                        e.stall_reported = false;
                    }
                    e.acked += ids.len() as u64;
                    e.last_progress = Instant::now();
                }
                self.undelivered
                    .set(self.undelivered.get().saturating_sub(ids.len()));
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
                if self
                    .scopes
                    .get(&key)
                    .is_some_and(|e| e.scope_id == scope_id && e.dispatched == through)
                {
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
    }
}

impl Handler<WorkerEvent> for Supervisor {
    type Result = ();
    fn handle(&mut self, msg: WorkerEvent, ctx: &mut Context<Self>) {
        match msg {
            WorkerEvent::Ready { index, pid, .. } => {
                let slot = &mut self.workers[index];
                slot.ready = true;
                slot.failures = 0;
                slot.pid = pid;
                let role = slot.role;
                self.publish_metrics();
                if role == Role::Isolation {
                    self.pump_isolation(ctx);
                    return;
                }
                if self.all_ready() {
                    self.started_up = true;
                    self.resolve_ready(Ok(()));
                }
                self.admit_waiting();
                self.reload_worker_ready(index, ctx);
            }
            WorkerEvent::Failed { index, error } => {
                let slot = &mut self.workers[index];
                slot.failures += 1;
                if !self.started_up || slot.failures >= CRASH_LOOP_LIMIT {
                    let error = if slot.failures >= CRASH_LOOP_LIMIT {
                        format!("worker {index} failed {CRASH_LOOP_LIMIT} times in a row before it was ready: {error}")
                    } else {
                        error
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
        let slot = &mut self.workers[index];
        if let Some(links) = slot.links.take() {
            // Forgotten here first, so no new scope is attached to it.
            links.worker.do_send(Release);
        }
        slot.ready = false;
        slot.scopes = 0;
        let role = slot.role;
        if death == Death::Asked {
            slot.deaths = 0;
        } else {
            slot.deaths += 1;
        }
        self.publish_metrics();
        if self.stopping_workers {
            log::info!("worker={index} pid={pid} exited ({})", describe(status));
            if self.workers.iter().all(|w| w.links.is_none()) {
                for w in self.exit_waiters.drain(..) {
                    let _ = w.send(());
                }
            }
            return;
        }
        if self.startup_error.is_some() {
            return;
        }
        if role == Role::Isolation {
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
        let delay = Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
            .delay(self.workers[index].failures);
        ctx.run_later(delay, move |act, ctx| {
            if !act.stopping_workers {
                act.start_worker(index, ctx);
            }
        });
    }

    fn isolation_exited(
        &mut self,
        index: usize,
        pid: u32,
        status: Option<std::process::ExitStatus>,
        death: Death,
        ctx: &mut Context<Self>,
    ) {
        if self.workers[index].retired || death == Death::Asked {
            log::info!(
                "isolation worker={index} pid={pid} exited ({})",
                describe(status)
            );
            self.isolation = None;
            // Suspects may have come meanwhile.
            return self.pump_isolation(ctx);
        }
        let deaths = self.workers[index].deaths;
        let failures = self.workers[index].failures;
        // Crash-loop guard: each death in a row waits longer, never drops.
        let delay = Backoff::new(Duration::from_millis(200), Duration::from_secs(10))
            .delay(deaths.max(failures).saturating_sub(1));
        log::warn!(
            "isolation worker={index} pid={pid} died ({}); restarting it in {:.1}s",
            describe(status),
            delay.as_secs_f64()
        );
        metrics().worker_restarts.inc();
        self.start_isolation_worker(index, delay, ctx);
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
        m.scopes_live
            .set_count(self.scopes.len() + self.closing.len());
        m.workers_configured.set_count(self.settings.app.workers);
        m.workers_ready.set_count(
            self.workers
                .iter()
                .filter(|w| w.ready && !w.retired && w.role == Role::Regular)
                .count(),
        );
    }
}

/// Replace every worker, one at a time: start a new worker, wait until it is
/// ready, then retire the old one (SIGHUP, `--reload`). Scopes move lazily.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ReloadWorkers {
    /// What asked for it, for the log.
    pub reason: String,
}

/// Where a reload stands.
#[derive(Default)]
struct Reload {
    /// Workers (slot indices) still to replace, after the current one.
    queue: VecDeque<usize>,
    current: Option<ReloadStep>,
    /// Another reload was asked for while this one ran: run it after.
    again: bool,
}

struct ReloadStep {
    old: usize,
    new: usize,
    /// The replacement is ready and the old worker is retiring.
    retiring: bool,
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
        if self.reload.current.is_some() {
            log::info!(
                "reload ({}) asked for while one is running; it follows",
                msg.reason
            );
            self.reload.again = true;
            return;
        }
        self.reload.queue = self.live_workers();
        log::info!(
            "reloading the workers ({}): workers={}",
            msg.reason,
            self.reload.queue.len()
        );
        self.reload_next(ctx);
    }
}

impl Supervisor {
    fn live_workers(&self) -> VecDeque<usize> {
        (0..self.workers.len())
            .filter(|&i| {
                let w = &self.workers[i];
                w.links.is_some() && !w.retired && w.role == Role::Regular
            })
            .collect()
    }

    /// Starts the replacement of the next worker in the queue.
    fn reload_next(&mut self, ctx: &mut Context<Self>) {
        if self.stopping_workers || self.shutting_down {
            self.reload.queue.clear();
            self.reload.current = None;
            return;
        }
        let Some(old) = self.reload.queue.pop_front() else {
            log::info!("reload complete: workers={}", self.live_workers().len());
            if std::mem::take(&mut self.reload.again) {
                ctx.notify(ReloadWorkers {
                    reason: "asked for again during the last one".into(),
                });
            }
            return;
        };
        if self.workers[old].links.is_none() || self.workers[old].retired {
            // Died meanwhile: the ordinary restart already loads the new code.
            return self.reload_next(ctx);
        }
        // Reuse a slot whose retired worker has exited; else add one. At most
        // one worker is being replaced at a time, so slots stay under 2x.
        let new = match (0..self.workers.len()).find(|&i| {
            let w = &self.workers[i];
            w.retired && w.links.is_none() && w.role == Role::Regular
        }) {
            Some(i) => i,
            None => {
                self.workers.push(WorkerSlot::empty(Role::Regular));
                self.workers.len() - 1
            }
        };
        let slot = &mut self.workers[new];
        slot.retired = false;
        slot.failures = 0;
        slot.scopes = 0;
        self.start_worker(new, ctx);
        log::info!(
            "worker={old} pid={} being replaced by worker={new}",
            self.workers[old].pid
        );
        self.reload.current = Some(ReloadStep {
            old,
            new,
            retiring: false,
        });
    }

    /// The replacement is ready: retire the worker it replaces. Its scopes
    /// get `telegram.disconnect`; events that arrive meanwhile wait, and go
    /// with what the scopes hand back, in order, to fresh scopes on live
    /// workers.
    fn reload_worker_ready(&mut self, index: usize, _: &mut Context<Self>) {
        let Some(step) = self.reload.current.as_mut() else {
            return;
        };
        if step.new != index || step.retiring {
            return;
        }
        step.retiring = true;
        let old = step.old;
        let slot = &mut self.workers[old];
        slot.retired = true;
        slot.ready = false;
        let Some(addr) = slot.links.as_ref().map(|l| l.worker.clone()) else {
            // Exited already; `reload_worker_exited` moved on.
            return;
        };
        metrics().worker_reloads.inc();
        self.publish_metrics();
        let keys: Vec<ScopeKey> = self
            .scopes
            .iter()
            .filter(|(_, e)| e.worker == old)
            .map(|(k, _)| k.clone())
            .collect();
        log::info!(
            "worker={old} pid={} retiring: scopes={} move to the new workers",
            self.workers[old].pid,
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
        if self.workers[index].retired {
            log::info!("worker={index} pid={pid} retired ({})", describe(status));
            if self.reload.current.as_ref().is_some_and(|s| s.old == index) {
                self.reload.current = None;
                self.reload_next(ctx);
            }
            return true;
        }
        match &self.reload.current {
            Some(step) if step.new == index && !step.retiring => {
                log::error!(
                    "reload aborted: the new worker={index} pid={pid} did not start ({}); the running workers stay",
                    describe(status)
                );
                self.workers[index].retired = true;
                self.reload.queue.clear();
                self.reload.current = None;
                self.reload.again = false;
                true
            }
            _ => false,
        }
    }
}
