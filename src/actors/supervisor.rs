//! Supervisor: owns the scopes and the workers.
//!
//! Takes batches of updates from the Poller ([`Dispatch`]), routes each to its
//! scope (creating the ScopeActor on the first update), and keeps the scope
//! table within `max_scopes` by closing the longest-idle scope that has nothing
//! left to receive. Closes scopes idle for `idle_timeout`, and scopes whose
//! instance ended by itself. Starts the Worker actors, reports when all are
//! ready, restarts a worker that dies (a worker that keeps failing before it is
//! ready stops the daemon), and gives each new scope the least-loaded worker.

use std::cell::Cell;
use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use serde_json::value::RawValue;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::actors::outbox::{Done, Outbox};
use crate::actors::scope::{
    Close, Enqueue, ScopeActor, ScopeLinks, ScopeReport, Terminate, SHUTDOWN,
};
use crate::actors::worker::{describe, ShutdownWorker, Worker, WorkerEvent};
use crate::backoff::Backoff;
use crate::metrics::metrics;
use crate::routing::{self, Route, ScopeKey, Unroutable};
use crate::settings::Settings;
use crate::telegram::Update;

/// Worker deaths with the same update on hand after which it is dropped.
const POISON_LIMIT: u32 = 3;

/// Consecutive start failures of one worker after which the daemon gives up.
const CRASH_LOOP_LIMIT: u32 = 5;

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
    last_active: Instant,
    /// When its app last received an event (or the scope started).
    last_progress: Instant,
    stall_reported: bool,
}

impl ScopeEntry {
    fn busy(&self) -> bool {
        self.dispatched > self.acked
    }
}

struct WorkerSlot {
    /// The worker's address and the rest of what its scopes talk to; `None`
    /// while no worker runs in the slot.
    links: Option<Rc<ScopeLinks>>,
    ready: bool,
    scopes: usize,
    /// Consecutive failures before reaching ready.
    failures: u32,
    pid: u32,
    /// Replaced by a reload: takes no new scopes, is not restarted.
    retired: bool,
}

impl WorkerSlot {
    /// A slot whose worker is not started yet.
    fn empty() -> WorkerSlot {
        WorkerSlot {
            links: None,
            ready: false,
            scopes: 0,
            failures: 0,
            pid: 0,
            retired: false,
        }
    }
}

pub struct Supervisor {
    settings: Settings,
    /// Where scopes send their calls and finished updates; skipped and
    /// poison updates are finished here.
    outbox: Addr<Outbox>,
    /// The bot's User object, encoded once for every scope dict.
    bot: Rc<RawValue>,
    scopes: HashMap<ScopeKey, ScopeEntry>,
    /// Scopes told to close that have not stopped yet: scope_id -> worker index.
    closing: HashMap<u64, usize>,
    next_scope_id: u64,
    workers: Vec<WorkerSlot>,
    /// Updates waiting for a worker (none is up right now).
    parked: VecDeque<(Route, Value)>,
    ready_waiters: Vec<oneshot::Sender<Result<(), String>>>,
    startup_error: Option<String>,
    close_waiters: Vec<oneshot::Sender<()>>,
    exit_waiters: Vec<oneshot::Sender<()>>,
    stopping_workers: bool,
    shutting_down: bool,
    /// update_id -> worker deaths while it was on hand (see `drop_poison`).
    deaths: HashMap<i64, u32>,
    /// Updates dispatched that no app has received yet; the Poller reads it.
    undelivered: Rc<Cell<usize>>,
    /// Every worker has been ready once: later failures are restarts.
    started_up: bool,
    /// A reload in progress (SIGHUP, --reload).
    reload: Reload,
}

impl Supervisor {
    pub fn new(
        settings: Settings,
        outbox: Addr<Outbox>,
        undelivered: Rc<Cell<usize>>,
    ) -> Supervisor {
        Supervisor {
            deaths: HashMap::new(),
            undelivered,
            settings,
            outbox,
            bot: Rc::from(RawValue::NULL.to_owned()),
            scopes: HashMap::new(),
            closing: HashMap::new(),
            next_scope_id: 1,
            workers: Vec::new(),
            parked: VecDeque::new(),
            ready_waiters: Vec::new(),
            startup_error: None,
            close_waiters: Vec::new(),
            exit_waiters: Vec::new(),
            stopping_workers: false,
            shutting_down: false,
            started_up: false,
            reload: Reload::default(),
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

    /// The live worker with the fewest scopes.
    fn pick_worker(&self) -> Option<usize> {
        self.workers
            .iter()
            .enumerate()
            .filter(|(_, w)| w.links.is_some() && !w.retired)
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
        let mut batches: Vec<(Route, Vec<Value>)> = Vec::new();
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
                        Some(&i) => batches[i].1.push(event),
                        None => {
                            index.insert(route.key.clone(), batches.len());
                            batches.push((route, vec![event]));
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
        for (route, events) in batches {
            self.deliver(route, events);
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

    fn deliver(&mut self, route: Route, events: Vec<Value>) {
        let Some(events) = self.hold_for_reload(&route, events) else {
            return;
        };
        if let Some(entry) = self.scopes.get_mut(&route.key) {
            if entry.stall_reported {
                self.undelivered
                    .set(self.undelivered.get().saturating_sub(events.len()));
            }
            entry.dispatched += events.len() as u64;
            entry.last_active = Instant::now();
            entry.addr.do_send(Enqueue(events));
            return;
        }
        let Some(worker) = self.pick_worker() else {
            self.parked
                .extend(events.into_iter().map(|e| (route.clone(), e)));
            return;
        };
        if self.scopes.len() >= self.settings.scopes.max_scopes {
            self.evict_one();
        }
        let scope_id = self.next_scope_id;
        self.next_scope_id += 1;
        let Some(links) = self.workers[worker].links.clone() else {
            unreachable!("pick_worker only returns workers with an address")
        };
        // A Chat or User object from an update is plain JSON.
        let subject =
            serde_json::value::to_raw_value(&route.subject).expect("the subject is plain JSON");
        let actor = ScopeActor::new(
            scope_id,
            route.key.clone(),
            subject,
            self.bot.clone(),
            links,
        );
        let addr = actor.start();
        self.workers[worker].scopes += 1;
        metrics().scopes_started.inc();
        let dispatched = events.len() as u64;
        addr.do_send(Enqueue(events));
        log::debug!("scope={} started on worker={worker}", route.key);
        self.scopes.insert(
            route.key,
            ScopeEntry {
                scope_id,
                addr,
                worker,
                dispatched,
                acked: 0,
                last_active: Instant::now(),
                last_progress: Instant::now(),
                stall_reported: false,
            },
        );
    }

    /// Closes the longest-idle scope with nothing left to receive.
    fn evict_one(&mut self) {
        let victim = self
            .scopes
            .iter()
            .filter(|(_, e)| !e.busy())
            .min_by_key(|(_, e)| e.last_active)
            .map(|(k, _)| k.clone());
        match victim {
            Some(key) => {
                log::debug!(
                    "scope={key} evicted: max_scopes={} reached",
                    self.settings.scopes.max_scopes
                );
                self.close(&key, "evicted");
            }
            None => log::warn!(
                "max_scopes={} reached and every scope is busy; going over the limit",
                self.settings.scopes.max_scopes
            ),
        }
    }

    fn close(&mut self, key: &ScopeKey, reason: &'static str) {
        if let Some(entry) = self.scopes.remove(key) {
            self.closing.insert(entry.scope_id, entry.worker);
            entry.addr.do_send(Close { reason });
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

    fn reap_idle(&mut self) {
        let idle = self.settings.scopes.idle_timeout;
        let now = Instant::now();
        let expired: Vec<ScopeKey> = self
            .scopes
            .iter()
            .filter(|(_, e)| !e.busy() && now.duration_since(e.last_active) >= idle)
            .map(|(k, _)| k.clone())
            .collect();
        for key in expired {
            log::debug!("scope={key} idle for {}s; closing", idle.as_secs());
            self.close(&key, "idle");
        }
    }

    fn scope_stopped(
        &mut self,
        scope_id: u64,
        key: ScopeKey,
        mut leftover: Vec<Value>,
        in_hand: bool,
    ) {
        if in_hand && !self.shutting_down {
            // Counted out when it was received; undelivered again.
            self.undelivered.set(self.undelivered.get() + 1);
        }
        let worker = match self.closing.remove(&scope_id) {
            Some(w) => Some(w),
            // Stopped without being closed (its worker died): drop its entry.
            None => match self.scopes.get(&key) {
                Some(e) if e.scope_id == scope_id => self.scopes.remove(&key).map(|e| {
                    if e.stall_reported && !self.shutting_down {
                        // Its leftovers go to a fresh scope and count again
                        // (the one in hand already does, above).
                        let unreceived = leftover.len() - usize::from(in_hand);
                        self.undelivered.set(self.undelivered.get() + unreceived);
                    }
                    e.worker
                }),
                _ => None,
            },
        };
        if let Some(w) = worker.and_then(|w| self.workers.get_mut(w)) {
            w.scopes = w.scopes.saturating_sub(1);
        }
        if !leftover.is_empty() && !self.shutting_down {
            self.drop_poison(&key, &mut leftover);
        }
        if !leftover.is_empty() && !self.shutting_down {
            // Fresh scope for what the old instance never received; the chat
            // object comes from the events themselves.
            if let Some(route) = leftover.iter().find_map(route_of_event) {
                self.deliver(route, leftover);
            }
        }
        self.release_held(&key);
        self.check_closed();
    }

    /// Leftovers outside shutdown mean the worker died; the first of them is
    /// the one its instance was on. An update that was on hand at
    /// `POISON_LIMIT` worker deaths is taken to be their cause and dropped,
    /// so that it cannot kill workers forever.
    fn drop_poison(&mut self, key: &ScopeKey, leftover: &mut Vec<Value>) {
        let Some(id) = leftover[0].get("update_id").and_then(Value::as_i64) else {
            return;
        };
        let deaths = self.deaths.entry(id).or_default();
        *deaths += 1;
        if *deaths >= POISON_LIMIT {
            log::error!(
                "scope={key} update={id} dropped: {POISON_LIMIT} workers died while it was being delivered"
            );
            self.deaths.remove(&id);
            leftover.remove(0);
            self.outbox.do_send(Done(vec![id]));
            self.undelivered
                .set(self.undelivered.get().saturating_sub(1));
            if let Some(e) = self.scopes.get_mut(key) {
                e.acked += 1;
            }
        }
        // Only worker deaths add entries; a bound keeps a long life's worth
        // of unrelated ones from piling up.
        if self.deaths.len() > 10_000 {
            self.deaths.clear();
        }
    }

    fn check_closed(&mut self) {
        if self.shutting_down && self.scopes.is_empty() && self.closing.is_empty() {
            for w in self.close_waiters.drain(..) {
                let _ = w.send(());
            }
        }
    }

    fn unpark(&mut self) {
        let parked: Vec<(Route, Value)> = self.parked.drain(..).collect();
        for (route, event) in parked {
            self.deliver(route, vec![event]);
        }
    }

    fn all_ready(&self) -> bool {
        self.workers.iter().all(|w| w.ready || w.retired)
    }

    fn resolve_ready(&mut self, result: Result<(), String>) {
        for w in self.ready_waiters.drain(..) {
            let _ = w.send(result.clone());
        }
    }
}

/// Recovers a route from an event already built from an update.
fn route_of_event(event: &Value) -> Option<Route> {
    let kind = event.get("type")?.as_str()?.strip_prefix("telegram.")?;
    let mut fields = event.as_object()?.clone();
    fields.remove("type");
    let id = fields.remove("update_id").unwrap_or(json!(0));
    let update = Update::from_value(json!({"update_id": id, kind: fields})).ok()?;
    routing::route(&update).ok()
}

impl Actor for Supervisor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        for index in 0..self.settings.app.workers {
            self.workers.push(WorkerSlot::empty());
            self.start_worker(index, ctx);
        }
        let tick = (self.settings.scopes.idle_timeout / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        ctx.run_interval(tick, |act, _| act.reap_idle());
        let stall_tick = (self.settings.scopes.stall_warning / 4)
            .clamp(Duration::from_millis(100), Duration::from_secs(5));
        ctx.run_interval(stall_tick, |act, _| act.report_stalls());
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
    fn handle(&mut self, msg: ScopeReport, _: &mut Context<Self>) {
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
                    e.last_active = e.last_progress;
                }
                self.undelivered
                    .set(self.undelivered.get().saturating_sub(ids.len()));
            }
            ScopeReport::InstanceEnded { scope_id, key } => {
                // Events may be on their way to it; then it restarts instead.
                if self
                    .scopes
                    .get(&key)
                    .is_some_and(|e| e.scope_id == scope_id && !e.busy())
                {
                    self.close(&key, "ended");
                }
            }
            ScopeReport::Stopped {
                scope_id,
                key,
                leftover,
                in_hand,
                addr,
            } => {
                self.scope_stopped(scope_id, key, leftover, in_hand);
                // Whatever it bounces was sent before this, so arrives next.
                addr.do_send(Terminate);
            }
            ScopeReport::Bounced { key, events } => {
                if !self.shutting_down {
                    log::debug!(
                        "scope={key} {} event(s) bounced by a stopped scope; redelivered",
                        events.len()
                    );
                    if let Some(route) = events.iter().find_map(route_of_event) {
                        self.deliver(route, events);
                    }
                }
            }
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
                self.publish_metrics();
                if self.all_ready() {
                    self.started_up = true;
                    self.resolve_ready(Ok(()));
                }
                self.unpark();
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
            WorkerEvent::Exited { index, pid, status } => {
                let slot = &mut self.workers[index];
                slot.links = None;
                slot.ready = false;
                slot.scopes = 0;
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
                if self.reload_worker_exited(index, pid, status, ctx) {
                    return;
                }
                log::error!(
                    "worker={index} pid={pid} died ({}); restarting it",
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
        }
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
                .filter(|w| w.ready && !w.retired)
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
    /// New events for scopes of a retiring worker, held until that scope has
    /// stopped and handed back what it did not receive, then delivered after
    /// it: order kept, and nothing sent to a scope that is going away.
    held: HashMap<ScopeKey, Vec<(Route, Vec<Value>)>>,
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
            .filter(|&i| self.workers[i].links.is_some() && !self.workers[i].retired)
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
        let new = match (0..self.workers.len())
            .find(|&i| self.workers[i].retired && self.workers[i].links.is_none())
        {
            Some(i) => i,
            None => {
                self.workers.push(WorkerSlot::empty());
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
    /// get `telegram.disconnect` and stay routed until they stop, so events
    /// that arrive meanwhile queue behind the disconnect, come back unreceived
    /// and go, in order, to a fresh scope on a live worker.
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
        let scopes: Vec<&ScopeEntry> = self.scopes.values().filter(|e| e.worker == old).collect();
        log::info!(
            "worker={old} pid={} retiring: scopes={} move to the new workers",
            self.workers[old].pid,
            scopes.len()
        );
        for entry in scopes {
            entry.addr.do_send(Close { reason: "reload" });
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

impl Supervisor {
    /// `Some(events)` to deliver now; `None` when they were held because
    /// their scope lives on a retiring worker.
    fn hold_for_reload(&mut self, route: &Route, events: Vec<Value>) -> Option<Vec<Value>> {
        let retiring = self
            .scopes
            .get(&route.key)
            .is_some_and(|e| self.workers.get(e.worker).is_some_and(|w| w.retired));
        if !retiring {
            return Some(events);
        }
        log::debug!(
            "scope={} events={} held until its retiring instance stopped",
            route.key,
            events.len()
        );
        self.reload
            .held
            .entry(route.key.clone())
            .or_default()
            .push((route.clone(), events));
        None
    }

    /// The scope `key` stopped: deliver what was held for it, in order, after
    /// its leftovers (already delivered). During shutdown they stay undelivered,
    /// like the leftovers: the journal gives them to the next start.
    fn release_held(&mut self, key: &ScopeKey) {
        let Some(held) = self.reload.held.remove(key) else {
            return;
        };
        if self.shutting_down {
            return;
        }
        for (route, events) in held {
            self.deliver(route, events);
        }
    }
}
