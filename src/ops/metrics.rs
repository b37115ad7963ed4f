//! The process-wide metrics registry: counters and gauges the actors bump with
//! one-liners (`metrics().updates_received.inc(&[kind])`), read by the HTTP
//! endpoint (`/metrics`, `/readyz`) and the periodic stats log line.
//!
//! The actors run on one thread, but the HTTP handlers run on actix-web's
//! worker thread, so everything here is atomics or small `Mutex`ed maps.
//! Nothing here blocks for long: a lock is held only to bump or copy a map.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use crate::telegram::TelegramError;

/// The registry every part of the daemon reports to.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// A value that goes up and down.
#[derive(Debug, Default)]
pub struct Gauge(AtomicI64);

impl Gauge {
    pub fn set(&self, v: i64) {
        self.0.store(v, Ordering::Relaxed);
    }
    /// Sets from a count; saturates (a count above i64::MAX is not a thing).
    pub fn set_count(&self, v: usize) {
        self.set(i64::try_from(v).unwrap_or(i64::MAX));
    }
    pub fn get(&self) -> i64 {
        self.0.load(Ordering::Relaxed)
    }
    /// Moves the gauge by `d`, for values kept up to date from several threads.
    pub fn add(&self, d: i64) {
        self.0.fetch_add(d, Ordering::Relaxed);
    }
}

/// A counter per combination of label values, e.g. (method, outcome).
#[derive(Debug)]
pub struct Labelled {
    names: &'static [&'static str],
    /// Every series counted so far, in label order.
    values: Mutex<Vec<(Vec<String>, u64)>>,
}

impl Labelled {
    fn new(names: &'static [&'static str]) -> Labelled {
        Labelled {
            names,
            values: Mutex::new(Vec::new()),
        }
    }

    /// Where the series with these label values is (`Ok`) or would go.
    fn find(values: &[(Vec<String>, u64)], labels: &[&str]) -> Result<usize, usize> {
        // Compared as they are: a series counted before is found without
        // building its key, and this runs several times per update.
        values
            .binary_search_by(|(key, _)| key.iter().map(String::as_str).cmp(labels.iter().copied()))
    }

    /// Adds one to the series with these label values (one per label name).
    pub fn inc(&self, labels: &[&str]) {
        debug_assert_eq!(labels.len(), self.names.len());
        let mut values = lock(&self.values);
        match Labelled::find(&values, labels) {
            Ok(at) => values[at].1 += 1,
            Err(at) => values.insert(at, (labels.iter().map(|s| s.to_string()).collect(), 1)),
        }
    }

    /// Every series, in label order.
    pub fn snapshot(&self) -> Vec<(Vec<String>, u64)> {
        lock(&self.values).clone()
    }

    /// The sum over every series.
    pub fn total(&self) -> u64 {
        lock(&self.values).iter().map(|(_, n)| n).sum()
    }

    /// The series with exactly these label values (0 if never counted).
    pub fn get(&self, labels: &[&str]) -> u64 {
        let values = lock(&self.values);
        Labelled::find(&values, labels).map_or(0, |at| values[at].1)
    }
}

/// A latency histogram with fixed buckets, in seconds.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Non-cumulative counts per bucket; the last one is +Inf.
    counts: Vec<AtomicU64>,
    /// Sum of observations in microseconds (an integer, so it can be atomic).
    sum_micros: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }

    pub fn sum_secs(&self) -> f64 {
        self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6
    }
}

/// Whether polling works, as far as the last getMe/getUpdates showed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PollState {
    /// No getMe or getUpdates has answered yet.
    Starting,
    /// The last getMe or getUpdates succeeded.
    Ok,
    /// The last getUpdates failed (not with 401); it is being retried.
    Failing(String),
    /// Telegram answered 401: the token was rejected.
    Rejected,
}

/// Webhook mode's standing with Telegram, for `/readyz`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookHealth {
    /// `setWebhook` has not succeeded yet.
    NotSet,
    /// Set; with Telegram's last delivery error from `getWebhookInfo`.
    Set { last_error: Option<String> },
}

/// Why `/readyz` answers 503; the orchestrator waits, or restarts the pod
/// when it lasts (the token, say, will not come right by itself).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NotReady {
    #[error("Telegram rejected the token (401 Unauthorized)")]
    TokenRejected,
    #[error("shutting down")]
    ShuttingDown,
    #[error("not polling yet")]
    NotPolling,
    #[error("getUpdates failing: {0}")]
    PollFailing(String),
    #[error("{ready} of {want} workers ready")]
    Workers { ready: i64, want: i64 },
    #[error("webhook not set yet")]
    WebhookNotSet,
}

/// Every metric the daemon exports. Fields are public so instrumentation is
/// a one-liner; the HTTP endpoint and the stats line only read them.
#[derive(Debug)]
pub struct Metrics {
    started: Instant,
    /// Updates handed from the Poller to the Supervisor, by update kind.
    pub updates_received: Labelled,
    /// Updates an instance's `receive()` returned, by update kind.
    pub updates_delivered: Labelled,
    /// Updates that could not be routed to a scope, by update kind.
    pub updates_skipped: Labelled,
    /// Bot API calls answered (or failed), by method and outcome.
    pub api_calls: Labelled,
    /// 429 answers (any method).
    pub rate_limited: Counter,
    /// Calls the Sender sent again (429, 5xx, network, migration).
    pub retries: Counter,
    /// Calls not made again because an update delivered again after a crash
    /// or a worker's death repeated them (see `actors::outbox`).
    pub calls_repeated: Counter,
    /// Updates dropped because they killed the isolation worker every time
    /// they ran alone in it (see `actors::supervisor::quarantine`).
    pub updates_dropped: Counter,
    pub scopes_live: Gauge,
    pub scopes_started: Counter,
    /// Worker processes the daemon should have running.
    pub workers_configured: Gauge,
    /// Worker processes up and ready.
    pub workers_ready: Gauge,
    /// Workers that died and were restarted.
    pub worker_restarts: Counter,
    /// Workers replaced by a reload (SIGHUP, --reload).
    pub worker_reloads: Counter,
    /// Calls waiting in the Sender (queued or held for a retry).
    pub sender_queued: Gauge,
    /// Calls the Sender has sent and not yet had answered.
    pub sender_in_flight: Gauge,
    /// getUpdates round-trip time (includes the long-poll wait).
    pub poll_latency: Histogram,
    /// Updates held in the durable journal, not yet confirmed (set by the
    /// journal; stays 0 without one).
    pub journal_entries: Gauge,
    /// The journal's database file: its size (with the WAL) is read when
    /// metrics are rendered, not on every append.
    pub journal_path: std::sync::OnceLock<std::path::PathBuf>,
    /// Webhook mode: requests to the receiver, by outcome (`accepted`,
    /// `duplicate`, or the reason of a refusal).
    pub webhook_requests: Labelled,
    /// `None`: polling mode.
    webhook: Mutex<Option<WebhookHealth>>,
    poll_state: Mutex<PollState>,
    shutting_down: std::sync::atomic::AtomicBool,
    /// Cluster mode: this node's roles and partitions; `None` on a single
    /// node.
    cluster: Mutex<Option<ClusterView>>,
}

/// A cluster node's part, as of the last refresh (every lease renewal):
/// plain numbers, so that the endpoint's thread needs nothing of the
/// cluster's tasks.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterView {
    pub node_id: String,
    /// The nodes announced live, this one included.
    pub live_nodes: usize,
    /// How long this node has held the `ingress` lease, if it does.
    pub poller: Option<Duration>,
    /// How long it has held the `sender` lease, if it does.
    pub sender: Option<Duration>,
    pub partitions: Vec<PartitionView>,
    /// Calls in the engine's outbox not yet made, as the sender last saw
    /// them (0 on a node that is not the sender).
    pub calls_pending: u64,
    /// Calls found in doubt by this node's sender since it started.
    pub calls_in_doubt: u64,
    /// Updates this node stored since start (as the poller, or in webhook
    /// mode as posted to it), and those the poller fetched again.
    pub updates_stored: u64,
    pub updates_fetched_again: u64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartitionView {
    pub partition: u32,
    pub lease_age: Duration,
    pub in_hand: usize,
    /// Updates the log holds for it beyond those delivered.
    pub lag: u64,
    /// Updates delivered again since this node took it.
    pub redelivered: u64,
}

impl ClusterView {
    /// The roles, for `/readyz`'s body and the log.
    pub fn roles(&self) -> String {
        let mut roles = Vec::new();
        if self.poller.is_some() {
            roles.push("poller");
        }
        if self.sender.is_some() {
            roles.push("sender");
        }
        if roles.is_empty() {
            roles.push("apps only");
        }
        roles.join(", ")
    }

    fn report(&self) -> String {
        let held: Vec<String> = self
            .partitions
            .iter()
            .map(|p| p.partition.to_string())
            .collect();
        format!(
            "cluster node {}: roles: {}; partitions: {} ({}); live nodes: {}",
            self.node_id,
            self.roles(),
            self.partitions.len(),
            if held.is_empty() {
                "none".to_string()
            } else {
                held.join(",")
            },
            self.live_nodes
        )
    }
}

/// getUpdates round trips: short ones when updates are waiting, up to the
/// long-poll timeout (30 s by default, at most 50) when the bot is quiet.
/// The kind label of events other programs pushed (`app.*`), received and
/// delivered.
pub const PUSHED: &str = "(app)";

const POLL_BUCKETS: &[f64] = &[0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0];

/// The `method` label: a Bot API method's canonical name, or `other`. Apps
/// choose the method of `telegram.api`; unchecked names would let them grow
/// the label set without bound.
fn method_label(method: &str) -> &'static str {
    let methods = crate::telegram::methods::ALL_METHODS;
    match methods.binary_search(&method) {
        Ok(i) => methods[i],
        // Telegram takes method names in any case.
        Err(_) => methods
            .iter()
            .find(|m| m.eq_ignore_ascii_case(method))
            .copied()
            .unwrap_or("other"),
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A poisoned lock only means a thread panicked while bumping a counter;
    // the map itself is still valid.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Metrics {
    /// Bytes of the journal on disk: database file plus WAL; 0 without one.
    fn journal_bytes(&self) -> u64 {
        let Some(path) = self.journal_path.get() else {
            return 0;
        };
        let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());
        size(path) + size(&path.with_extension("sqlite3-wal"))
    }

    fn new() -> Metrics {
        Metrics {
            started: Instant::now(),
            updates_received: Labelled::new(&["kind"]),
            updates_delivered: Labelled::new(&["kind"]),
            updates_skipped: Labelled::new(&["kind"]),
            api_calls: Labelled::new(&["method", "outcome"]),
            rate_limited: Counter::default(),
            retries: Counter::default(),
            calls_repeated: Counter::default(),
            updates_dropped: Counter::default(),
            scopes_live: Gauge::default(),
            scopes_started: Counter::default(),
            workers_configured: Gauge::default(),
            workers_ready: Gauge::default(),
            worker_restarts: Counter::default(),
            worker_reloads: Counter::default(),
            sender_queued: Gauge::default(),
            sender_in_flight: Gauge::default(),
            poll_latency: Histogram::new(POLL_BUCKETS),
            journal_entries: Gauge::default(),
            journal_path: std::sync::OnceLock::new(),
            webhook_requests: Labelled::new(&["outcome"]),
            webhook: Mutex::new(None),
            poll_state: Mutex::new(PollState::Starting),
            shutting_down: Default::default(),
            cluster: Mutex::new(None),
        }
    }

    /// Records one answered Bot API call (from [`crate::telegram::Bot::call`]).
    pub fn api_call(&self, method: &str, elapsed: Duration, result: &Result<(), &TelegramError>) {
        let outcome = match result {
            Ok(()) => "ok",
            Err(e) => outcome_of(e),
        };
        self.api_calls.inc(&[method_label(method), outcome]);
        if matches!(result, Err(TelegramError::RetryAfter { .. })) {
            self.rate_limited.inc();
        }
        match (method, result) {
            (_, Err(TelegramError::Unauthorized)) => self.set_poll_state(PollState::Rejected),
            ("getMe", Ok(())) => self.set_poll_state(PollState::Ok),
            ("getUpdates", Ok(())) => {
                self.poll_latency.observe(elapsed);
                self.set_poll_state(PollState::Ok);
            }
            ("getUpdates", Err(e)) => {
                self.poll_latency.observe(elapsed);
                self.set_poll_state(PollState::Failing(e.to_string()));
            }
            _ => {}
        }
    }

    /// Counts an event an instance's `receive()` returned, by update kind
    /// (its `type` without the `telegram.` prefix).
    pub fn delivered(&self, event: &crate::bridge::Event) {
        let event = match event {
            crate::bridge::Event::Update(update) => {
                self.updates_delivered.inc(&[update.kind().unwrap_or("?")]);
                return;
            }
            crate::bridge::Event::Json(event) => event,
        };
        let kind = event
            .get("type")
            .and_then(serde_json::Value::as_str)
            .map_or("?", |t| match t.strip_prefix("telegram.") {
                Some(kind) => kind,
                // Programs choose their events' types: one label for all
                // keeps the series bounded.
                None if t.starts_with(crate::push::APP_PREFIX) => PUSHED,
                None => t,
            });
        self.updates_delivered.inc(&[kind]);
    }

    /// The Sender's queue: calls waiting, and calls sent but not answered.
    pub fn sender_depth(&self, queued: usize, in_flight: usize) {
        self.sender_queued.set_count(queued);
        self.sender_in_flight.set_count(in_flight);
    }

    pub fn poll_state(&self) -> PollState {
        lock(&self.poll_state).clone()
    }

    pub fn set_poll_state(&self, state: PollState) {
        let mut current = lock(&self.poll_state);
        // A rejected token stays rejected: the daemon is on its way out.
        if *current != PollState::Rejected {
            *current = state;
        }
    }

    /// The daemon stopped polling and is winding down.
    pub fn set_shutting_down(&self) {
        self.shutting_down.store(true, Ordering::Relaxed);
    }

    /// `Ok` when the bot can serve: polling works and every worker is up;
    /// otherwise why not (the body of a 503 from `/readyz`).
    pub fn readiness(&self) -> Result<(), NotReady> {
        // The most telling reason first: a rejected token also shuts down.
        let state = self.poll_state();
        if state == PollState::Rejected {
            return Err(NotReady::TokenRejected);
        }
        if self.shutting_down.load(Ordering::Relaxed) {
            return Err(NotReady::ShuttingDown);
        }
        match state {
            PollState::Ok | PollState::Rejected => {}
            PollState::Starting => return Err(NotReady::NotPolling),
            PollState::Failing(why) => return Err(NotReady::PollFailing(why)),
        }
        if self.webhook_health() == Some(WebhookHealth::NotSet) {
            return Err(NotReady::WebhookNotSet);
        }
        let (ready, want) = (self.workers_ready.get(), self.workers_configured.get());
        if ready < want {
            return Err(NotReady::Workers { ready, want });
        }
        Ok(())
    }

    pub fn set_cluster(&self, view: ClusterView) {
        *lock(&self.cluster) = Some(view);
    }

    pub fn cluster(&self) -> Option<ClusterView> {
        lock(&self.cluster).clone()
    }

    /// Cluster mode: one line for `/readyz`'s body, on the node's part.
    pub fn cluster_report(&self) -> Option<String> {
        lock(&self.cluster).as_ref().map(ClusterView::report)
    }

    pub fn set_webhook_health(&self, health: WebhookHealth) {
        *lock(&self.webhook) = Some(health);
    }

    pub fn webhook_health(&self) -> Option<WebhookHealth> {
        lock(&self.webhook).clone()
    }

    /// Webhook mode: one line for `/readyz`'s body, on the webhook: set or
    /// not, Telegram's last delivery error, the requests refused.
    pub fn webhook_report(&self) -> Option<String> {
        let health = self.webhook_health()?;
        let refused: u64 = self
            .webhook_requests
            .snapshot()
            .iter()
            .filter(|(labels, _)| {
                !labels
                    .first()
                    .is_some_and(|o| o == "accepted" || o == "duplicate")
            })
            .map(|(_, n)| n)
            .sum();
        let state = match health {
            WebhookHealth::NotSet => "not set".to_string(),
            WebhookHealth::Set { last_error: None } => "set; last error: none".to_string(),
            WebhookHealth::Set {
                last_error: Some(e),
            } => format!("set; last error: {e}"),
        };
        Some(format!("webhook: {state}; refused requests: {refused}"))
    }

    /// The main counters on one line, `key=value` separated.
    pub fn stats_line(&self) -> String {
        format!(
            "stats updates_received={} updates_delivered={} updates_skipped={} api_calls={} api_errors={} rate_limited={} retries={} scopes_live={} workers_ready={} workers={} worker_restarts={} sender_queued={} sender_in_flight={} polls={} journal_entries={}",
            self.updates_received.total(),
            self.updates_delivered.total(),
            self.updates_skipped.total(),
            self.api_calls.total(),
            self.api_calls.total() - self.api_calls_with_outcome("ok"),
            self.rate_limited.get(),
            self.retries.get(),
            self.scopes_live.get(),
            self.workers_ready.get(),
            self.workers_configured.get(),
            self.worker_restarts.get(),
            self.sender_queued.get(),
            self.sender_in_flight.get(),
            self.poll_latency.count(),
            self.journal_entries.get(),
        )
    }

    fn api_calls_with_outcome(&self, outcome: &str) -> u64 {
        self.api_calls
            .snapshot()
            .iter()
            .filter(|(labels, _)| labels.get(1).is_some_and(|o| o == outcome))
            .map(|(_, n)| n)
            .sum()
    }

    /// Everything, in the Prometheus text exposition format (version 0.0.4).
    pub fn render(&self) -> String {
        let mut out = String::with_capacity(4096);
        let labelled = |out: &mut String, name: &str, help: &str, m: &Labelled| {
            header(out, name, help, "counter");
            for (values, n) in m.snapshot() {
                let labels: Vec<String> = m
                    .names
                    .iter()
                    .zip(&values)
                    .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                    .collect();
                let _ = writeln!(out, "{name}{{{}}} {n}", labels.join(","));
            }
        };
        let single = |out: &mut String, name: &str, help: &str, kind: &str, v: String| {
            header(out, name, help, kind);
            let _ = writeln!(out, "{name} {v}");
        };
        labelled(
            &mut out,
            "asgigram_updates_received_total",
            "Updates received from getUpdates, by kind.",
            &self.updates_received,
        );
        labelled(
            &mut out,
            "asgigram_updates_delivered_total",
            "Updates an application instance received, by kind.",
            &self.updates_delivered,
        );
        labelled(
            &mut out,
            "asgigram_updates_skipped_total",
            "Updates with no chat or user to route them to, by kind.",
            &self.updates_skipped,
        );
        labelled(
            &mut out,
            "asgigram_webhook_requests_total",
            "Webhook requests, by outcome: accepted, duplicate, or why refused.",
            &self.webhook_requests,
        );
        labelled(
            &mut out,
            "asgigram_api_calls_total",
            "Bot API calls answered, by method and outcome.",
            &self.api_calls,
        );
        single(
            &mut out,
            "asgigram_api_rate_limited_total",
            "429 answers from the Bot API.",
            "counter",
            self.rate_limited.get().to_string(),
        );
        single(
            &mut out,
            "asgigram_sender_retries_total",
            "Calls the Sender sent again after a failure or a 429.",
            "counter",
            self.retries.get().to_string(),
        );
        single(
            &mut out,
            "asgigram_calls_repeated_total",
            "Calls an update delivered again repeated, answered from the outbox instead of made twice.",
            "counter",
            self.calls_repeated.get().to_string(),
        );
        single(
            &mut out,
            "asgigram_updates_dropped_total",
            "Updates dropped because their worker died each time they ran alone in it.",
            "counter",
            self.updates_dropped.get().to_string(),
        );
        single(
            &mut out,
            "asgigram_sender_queued",
            "Calls waiting in the Sender.",
            "gauge",
            self.sender_queued.get().to_string(),
        );
        single(
            &mut out,
            "asgigram_sender_in_flight",
            "Calls sent and not yet answered.",
            "gauge",
            self.sender_in_flight.get().to_string(),
        );
        single(
            &mut out,
            "asgigram_scopes_live",
            "Live scopes (application instances).",
            "gauge",
            self.scopes_live.get().to_string(),
        );
        single(
            &mut out,
            "asgigram_scopes_started_total",
            "Scopes started.",
            "counter",
            self.scopes_started.get().to_string(),
        );
        single(
            &mut out,
            "asgigram_workers_configured",
            "Worker processes configured (app.workers).",
            "gauge",
            self.workers_configured.get().to_string(),
        );
        single(
            &mut out,
            "asgigram_workers_ready",
            "Worker processes up and ready.",
            "gauge",
            self.workers_ready.get().to_string(),
        );
        single(
            &mut out,
            "asgigram_worker_restarts_total",
            "Worker processes that died and were restarted.",
            "counter",
            self.worker_restarts.get().to_string(),
        );
        single(
            &mut out,
            "asgigram_worker_reloads_total",
            "Worker processes replaced by a reload (SIGHUP, --reload).",
            "counter",
            self.worker_reloads.get().to_string(),
        );
        header(
            &mut out,
            "asgigram_poll_duration_seconds",
            "getUpdates round-trip time, long-poll wait included.",
            "histogram",
        );
        let mut cumulative = 0;
        for (i, c) in self.poll_latency.counts.iter().enumerate() {
            cumulative += c.load(Ordering::Relaxed);
            let le = self
                .poll_latency
                .bounds
                .get(i)
                .map_or_else(|| "+Inf".to_string(), |b| b.to_string());
            let _ = writeln!(
                out,
                "asgigram_poll_duration_seconds_bucket{{le=\"{le}\"}} {cumulative}"
            );
        }
        let _ = writeln!(
            out,
            "asgigram_poll_duration_seconds_sum {}",
            self.poll_latency.sum_secs()
        );
        let _ = writeln!(out, "asgigram_poll_duration_seconds_count {cumulative}");
        single(
            &mut out,
            "asgigram_journal_entries",
            "Updates held in the journal, not yet confirmed.",
            "gauge",
            self.journal_entries.get().to_string(),
        );
        single(
            &mut out,
            "asgigram_journal_bytes",
            "Size of the journal on disk.",
            "gauge",
            self.journal_bytes().to_string(),
        );
        if let Some(view) = self.cluster() {
            render_cluster(&mut out, &view);
        }
        single(
            &mut out,
            "asgigram_ready",
            "1 when /readyz answers 200.",
            "gauge",
            u8::from(self.readiness().is_ok()).to_string(),
        );
        single(
            &mut out,
            "asgigram_uptime_seconds",
            "Seconds since the daemon started.",
            "gauge",
            format!("{:.3}", self.started.elapsed().as_secs_f64()),
        );
        out
    }
}

/// Cluster mode's series: roles, lease ages, partitions, lag, redeliveries.
fn render_cluster(out: &mut String, view: &ClusterView) {
    let node = escape(&view.node_id);
    header(
        out,
        "asgigram_cluster_role",
        "1 where this node holds the role's lease.",
        "gauge",
    );
    for (role, held) in [("poller", view.poller), ("sender", view.sender)] {
        let _ = writeln!(
            out,
            "asgigram_cluster_role{{node=\"{node}\",role=\"{role}\"}} {}",
            u8::from(held.is_some())
        );
    }
    header(
        out,
        "asgigram_cluster_lease_age_seconds",
        "Since this node took the role's lease, or last renewed the partition's.",
        "gauge",
    );
    for (lease, held) in [("ingress", view.poller), ("sender", view.sender)] {
        if let Some(age) = held {
            let _ = writeln!(
                out,
                "asgigram_cluster_lease_age_seconds{{lease=\"{lease}\"}} {:.3}",
                age.as_secs_f64()
            );
        }
    }
    for p in &view.partitions {
        let _ = writeln!(
            out,
            "asgigram_cluster_lease_age_seconds{{lease=\"partition.{}\"}} {:.3}",
            p.partition,
            p.lease_age.as_secs_f64()
        );
    }
    type Series = (&'static str, &'static str, fn(&PartitionView) -> u64);
    let per_partition: [Series; 3] = [
        (
            "asgigram_cluster_partition_in_hand",
            "Updates delivered to the scopes and not yet done, per partition held.",
            |p| p.in_hand as u64,
        ),
        (
            "asgigram_cluster_partition_lag",
            "Updates the log holds beyond those delivered, per partition held.",
            |p| p.lag,
        ),
        (
            "asgigram_cluster_partition_redelivered",
            "Updates delivered again since this node took the partition.",
            |p| p.redelivered,
        ),
    ];
    for (name, help, value) in per_partition {
        header(out, name, help, "gauge");
        for p in &view.partitions {
            let _ = writeln!(out, "{name}{{partition=\"{}\"}} {}", p.partition, value(p));
        }
    }
    let singles = [
        (
            "asgigram_cluster_partitions_held",
            "Partitions this node owns.",
            "gauge",
            view.partitions.len() as u64,
        ),
        (
            "asgigram_cluster_live_nodes",
            "Nodes announced live.",
            "gauge",
            view.live_nodes as u64,
        ),
        (
            "asgigram_cluster_calls_pending",
            "Calls in the engine's outbox not yet made (on the sender).",
            "gauge",
            view.calls_pending,
        ),
        (
            "asgigram_cluster_calls_in_doubt_total",
            "Calls this node's sender found in doubt.",
            "counter",
            view.calls_in_doubt,
        ),
        (
            "asgigram_cluster_updates_stored_total",
            "Updates this node stored in the log (polled, or posted to its webhook).",
            "counter",
            view.updates_stored,
        ),
        (
            "asgigram_cluster_updates_fetched_again_total",
            "Updates the ingress fetched that the log already had.",
            "counter",
            view.updates_fetched_again,
        ),
    ];
    for (name, help, kind, value) in singles {
        header(out, name, help, kind);
        let _ = writeln!(out, "{name} {value}");
    }
}

/// The `outcome` label of a failed call.
fn outcome_of(e: &TelegramError) -> &'static str {
    match e {
        TelegramError::RetryAfter { .. } => "429",
        TelegramError::Migrated { .. } => "migrated",
        TelegramError::Unauthorized => "401",
        TelegramError::Conflict { .. } => "409",
        TelegramError::Server { .. } => "5xx",
        TelegramError::Api { .. } => "4xx",
        TelegramError::Network(_) => "network",
        TelegramError::Timeout(_) => "timeout",
        TelegramError::InvalidResponse(_) => "invalid",
    }
}

fn header(out: &mut String, name: &str, help: &str, kind: &str) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// Label values: backslash, double quote and newline escaped.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Logs [`Metrics::stats_line`] every `interval` (zero: never), on the
/// current actix System.
pub fn spawn_stats_logger(interval: Duration) {
    if interval.is_zero() {
        return;
    }
    actix::spawn(async move {
        let mut tick = tokio::time::interval(interval);
        // The first tick is immediate; the first line is due one interval in.
        tick.tick().await;
        loop {
            tick.tick().await;
            log::info!("{}", metrics().stats_line());
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labelled_counters_render_in_the_text_format() {
        let m = Metrics::new();
        m.api_calls.inc(&["sendMessage", "ok"]);
        m.api_calls.inc(&["sendMessage", "ok"]);
        m.api_calls.inc(&["send\"x", "429"]);
        m.updates_received.inc(&["message"]);
        m.poll_latency.observe(Duration::from_millis(70));
        m.poll_latency.observe(Duration::from_secs(100));
        assert_eq!(m.api_calls.get(&["sendMessage", "ok"]), 2);
        assert_eq!(m.api_calls.total(), 3);
        let text = m.render();
        assert!(
            text.contains("asgigram_api_calls_total{method=\"sendMessage\",outcome=\"ok\"} 2\n")
        );
        assert!(text.contains("asgigram_api_calls_total{method=\"send\\\"x\",outcome=\"429\"} 1\n"));
        assert!(text.contains("asgigram_updates_received_total{kind=\"message\"} 1\n"));
        assert!(text.contains("asgigram_poll_duration_seconds_bucket{le=\"0.05\"} 0\n"));
        assert!(text.contains("asgigram_poll_duration_seconds_bucket{le=\"0.1\"} 1\n"));
        assert!(text.contains("asgigram_poll_duration_seconds_bucket{le=\"+Inf\"} 2\n"));
        assert!(text.contains("asgigram_poll_duration_seconds_count 2\n"));
        // Every sample line is `name{labels} value` or `name value`.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let value = line
                .rsplit(' ')
                .next()
                .expect("split yields at least one part");
            assert!(value.parse::<f64>().is_ok(), "bad sample line {line:?}");
        }
    }

    #[test]
    fn the_method_label_is_a_known_method_or_other() {
        let m = Metrics::new();
        let ok: Result<(), &TelegramError> = Ok(());
        m.api_call("sendMessage", Duration::ZERO, &ok);
        m.api_call("SENDMESSAGE", Duration::ZERO, &ok);
        for i in 0..100 {
            m.api_call(&format!("madeUp{i}"), Duration::ZERO, &ok);
        }
        assert_eq!(m.api_calls.get(&["sendMessage", "ok"]), 2);
        assert_eq!(m.api_calls.get(&["other", "ok"]), 100);
        assert!(!m.render().contains("madeUp"));
    }

    #[test]
    fn readiness_needs_polling_and_every_worker() {
        let m = Metrics::new();
        m.workers_configured.set(2);
        assert_eq!(m.readiness(), Err(NotReady::NotPolling));
        m.api_call("getMe", Duration::ZERO, &Ok(()));
        let why = m.readiness().unwrap_err();
        assert_eq!(why, NotReady::Workers { ready: 0, want: 2 });
        assert_eq!(why.to_string(), "0 of 2 workers ready");
        m.workers_ready.set(2);
        assert_eq!(m.readiness(), Ok(()));
        let e = TelegramError::Network("refused".into());
        m.api_call("getUpdates", Duration::ZERO, &Err(&e));
        assert!(m
            .readiness()
            .unwrap_err()
            .to_string()
            .starts_with("getUpdates failing"));
        m.api_call("getUpdates", Duration::ZERO, &Ok(()));
        assert_eq!(m.readiness(), Ok(()));
        m.api_call(
            "sendMessage",
            Duration::ZERO,
            &Err(&TelegramError::Unauthorized),
        );
        m.api_call("getUpdates", Duration::ZERO, &Ok(()));
        let why = m.readiness().unwrap_err();
        assert_eq!(why, NotReady::TokenRejected);
        assert!(why.to_string().contains("401"));
    }

    #[test]
    fn webhook_mode_is_ready_once_set_and_reports_errors_and_refusals() {
        let m = Metrics::new();
        assert_eq!(m.webhook_report(), None, "polling mode");
        m.api_call("getMe", Duration::ZERO, &Ok(()));
        m.set_webhook_health(WebhookHealth::NotSet);
        assert_eq!(m.readiness(), Err(NotReady::WebhookNotSet));
        m.set_webhook_health(WebhookHealth::Set {
            last_error: Some("Connection refused".into()),
        });
        assert_eq!(m.readiness(), Ok(()));
        m.webhook_requests.inc(&["accepted"]);
        m.webhook_requests.inc(&["duplicate"]);
        m.webhook_requests.inc(&["unauthorized"]);
        m.webhook_requests.inc(&["busy"]);
        assert_eq!(
            m.webhook_report().as_deref(),
            Some("webhook: set; last error: Connection refused; refused requests: 2")
        );
    }
}
