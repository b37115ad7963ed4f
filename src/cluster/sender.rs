//! The elected sender: one node at a time, the holder of the `sender` lease,
//! makes every call in the bot's outbox ([`super::outbox`]), so that
//! Telegram's limits (30 messages a second per bot, 1 a second per chat, 20
//! a minute per group) hold for the whole cluster, paced by one
//! [`Pacer`] as on a single node.
//!
//! Every node runs an [`ElectedSender`]; all but one only contend. The
//! holder reads the calls stream through a consumer of its own and makes
//! each call through an [`Executor`] (in the daemon, the single node's
//! Sender; [`BotExecutor`] is the Bot API client's; tests also use a fake).
//!
//! # The algorithm
//!
//! 1. Contend: try to create the `sender` lease every `cluster.lease_renew`
//!    until it is taken or the sender is stopped.
//! 2. Take over: delete every consumer of the calls stream (the previous
//!    holder's: its deliveries and acks stop counting), then create
//!    `sender-<lease revision>`, reading the stream from its first call.
//!    With work-queue retention the stream holds exactly the calls not yet
//!    acknowledged, in the order they were stored, so the new holder sees the
//!    previous one's unfinished calls first, each chat's in its order.
//! 3. Calls of one chat form a lane: at most one marked or in flight, the
//!    next only after the previous one's answer is stored, so at most one
//!    call per chat can be in doubt when a holder dies. Calls without a chat
//!    go at once. A lane's head is marked first (step 4), then made when its
//!    chat's and the bot's budget allow (for a message, see
//!    [`crate::telegram::limits`]); the oldest waiting lane gets the global
//!    budget first. The budget is taken right before the request goes out,
//!    not before the mark's round trip, so that the pacer never counts a
//!    message earlier than Telegram does.
//! 4. Marking a call: write its *started* mark (the lease's revision) to the
//!    answers bucket on condition that it has no entry. Where it has one:
//!    an answer means the call was made (the previous holder died between
//!    storing the answer and acknowledging): acknowledge it, make nothing;
//!    another holder's started mark means the call is *in doubt* (made or
//!    not, no one knows): `sender.ambiguous` decides, `retry` makes it again,
//!    `fail` stores an error answer.
//! 5. The answer is stored, then the call acknowledged (it leaves the stream).
//! 6. A 429 puts the call back at the head of its lane for `retry_after`
//!    (every message, for a call without a chat); a failure that surely did
//!    not execute (5xx, connect failed) is tried again with backoff, up to
//!    `sender.max_attempts`; one of unknown fate (no answer in time) follows
//!    `sender.ambiguous`; any other error is the call's answer. Where the
//!    call surely was not made, its started mark is removed while it waits,
//!    so that a successor does not count it in doubt.
//! 7. Fencing: the holder renews its lease every `cluster.lease_renew` and
//!    stops at once, dropping its calls in flight, when the lease stops being
//!    valid by its own clock (before any other node can take it): no pull and
//!    no call after that instant. A call already on its way to Telegram then
//!    is what the successor finds in doubt.
//! 8. Stopping (SIGTERM): stop pulling, finish the calls in flight (answer
//!    stored, acknowledged), remove the marks of the calls marked and
//!    waiting for the limits (not made), release the lease: the next
//!    contender takes over at once and finds no call in doubt. Calls pulled
//!    but not made are still in the stream for it.
//!
//! What a tenure costs when it ends badly: a holder fenced, or one whose
//! writes to the engine keep failing (it then releases the lease and
//! contends again), drops its calls in flight, and each of those chats'
//! marked call is in doubt for the next holder, at most one per chat, as
//! after a death; that includes a call marked and still waiting for the
//! limits, which was not made (for `sender.ambiguous = fail`, an error
//! answer to a call that could have been made).
//!
//! 9. Pacing across tenures: the holder writes its pacer's snapshot
//!    ([`PaceSnapshot`]: what it counted in the last second, and for
//!    groups the last minute) to the answers bucket under [`PACE_KEY`]
//!    after a renewal whenever it counted something since the last one, and
//!    once more when it stops. A new holder restores it before its first
//!    call, so a handover neither resets a chat's budget nor the bot's.
//!    After a death, what the dead holder sent after its last snapshot (at
//!    most one `lease_renew`'s worth) is not known; the per-second limits
//!    have passed by the time the lease expires, the group's minute may
//!    not have.

use std::cell::Cell;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::{self, consumer, kv, AckKind};
use foldhash::{HashMap, HashSet};
use futures_util::stream::FuturesUnordered;
use futures_util::StreamExt;
use serde_json::{Map, Value};
use tokio::sync::watch;

use super::lease::{lost_race, Lease, Leases};
use super::outbox::{Mark, Outbox, StoredCall};
use super::ClusterError;
use crate::actors::call::{chat_of, Outcome};
use crate::backoff::Backoff;
use crate::settings::{AmbiguousPolicy, SenderSettings};
use crate::telegram::limits::{message_cost, Cost, PaceSnapshot, Pacer, Pass, Ticket};
use crate::telegram::{Bot, TelegramError};

/// The lease's key in the lease bucket.
pub const SENDER_LEASE: &str = "sender";

/// Where the holder keeps its pacer's snapshot for the next one (step 9):
/// in the answers bucket, under a key no call id can be (call ids have no
/// `/`).
pub const PACE_KEY: &str = "sender/pace";

/// Calls in flight at once, as on a single node.
const MAX_IN_FLIGHT: usize = 64;
/// Calls delivered and not acknowledged at most: what the holder keeps in
/// hand, bounded so that a long outbox does not fill its memory.
const MAX_IN_HAND: i64 = 1024;
/// How long a delivered call may stay unacknowledged before the stream
/// would deliver it again: far longer than pacing a full hand takes (1024
/// calls at 30 a second is 35 s), so that within one holder's tenure
/// nothing is delivered twice; a successor does not wait for it (step 2).
const ACK_WAIT: Duration = Duration::from_secs(600);
/// How long after a first pull that found no responders a new one is sent:
/// a consumer just created is known to the meta group before the server
/// this node is connected to routes its pull subject (seen once in CI, a few
/// milliseconds after the takeover). The pull stream itself would not ask
/// again until its request expires (30 s in async-nats 0.46), so the holder
/// opens a new stream. Only while the stream has delivered nothing: a later
/// pull's failure may leave messages of an earlier one on their way to its
/// inbox, and dropping the stream would leave them unacknowledged until
/// [`ACK_WAIT`].
const REPULL_PAUSE: Duration = Duration::from_millis(100);
/// Backoff of retried failures, as the single node's Sender's.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(30));
/// Writes to the answers bucket tried before the holder gives up its tenure
/// (a bucket leader election takes seconds; twenty tries a quarter second
/// apart outlast it).
const WRITE_TRIES: u32 = 20;
const WRITE_PAUSE: Duration = Duration::from_millis(250);

/// Makes one Bot API call. The daemon's is the single node's Sender (its own
/// limiter then paces as well, harmlessly); tests use fakes.
pub trait Executor {
    /// Makes the call once: Telegram's `result`, or why not.
    fn execute(
        &self,
        method: &str,
        params: &Map<String, Value>,
    ) -> impl Future<Output = Result<Value, TelegramError>>;
}

/// The Bot API client as an executor: each call made once, within
/// `timeout`, with no retries of its own (the elected sender makes those).
#[derive(Debug, Clone)]
pub struct BotExecutor {
    bot: Bot,
    timeout: Duration,
}

impl BotExecutor {
    pub fn new(bot: Bot, timeout: Duration) -> BotExecutor {
        BotExecutor { bot, timeout }
    }
}

impl Executor for BotExecutor {
    fn execute(
        &self,
        method: &str,
        params: &Map<String, Value>,
    ) -> impl Future<Output = Result<Value, TelegramError>> {
        let params = Value::Object(params.clone());
        async move { self.bot.call(method, &params, self.timeout).await }
    }
}

/// What the sender of this node is doing, for `/readyz` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SenderStatus {
    /// It holds the `sender` lease and makes the calls.
    pub holding: bool,
    /// Since when it holds it.
    pub held_since: Option<Instant>,
    /// Calls in hand (pulled, not answered) plus those the stream still holds
    /// beyond them, as of the last pull.
    pub pending: u64,
    /// Calls found in doubt since this node started (step 4).
    pub in_doubt: u64,
    /// Calls made since this node started.
    pub made: u64,
}

impl SenderStatus {
    /// How long it holds the lease, if it does.
    pub fn lease_age(&self) -> Option<Duration> {
        self.held_since.map(|t| t.elapsed())
    }
}

/// One node's contender for the `sender` lease, and the sender while it
/// holds it.
pub struct ElectedSender<E> {
    outbox: Outbox,
    leases: Leases,
    executor: Rc<E>,
    settings: SenderSettings,
    status: watch::Sender<SenderStatus>,
}

impl<E> std::fmt::Debug for ElectedSender<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ElectedSender")
            .field("outbox", &self.outbox)
            .field("leases", &self.leases)
            .finish()
    }
}

/// A renewal under way: the lease comes back with the outcome.
type Renewal = Pin<Box<dyn Future<Output = (Lease, Result<(), ClusterError>)>>>;

/// How a tenure ended.
enum Tenure {
    /// Stopped on request, calls in flight finished: release the lease.
    Stopped(Lease),
    /// The lease is no longer valid: contend again.
    Fenced,
    /// The engine failed under it: release and contend again.
    Failed(Option<Lease>, ClusterError),
}

impl<E: Executor + 'static> ElectedSender<E> {
    /// A contender on `outbox` with these leases; `settings` are the single
    /// node's `[sender]` ones (limits, `ambiguous`, `max_attempts`).
    pub fn new(
        outbox: Outbox,
        leases: Leases,
        executor: E,
        settings: SenderSettings,
    ) -> ElectedSender<E> {
        ElectedSender {
            outbox,
            leases,
            executor: Rc::new(executor),
            settings,
            status: watch::channel(SenderStatus::default()).0,
        }
    }

    /// Its status, updated as it changes.
    pub fn status(&self) -> watch::Receiver<SenderStatus> {
        self.status.subscribe()
    }

    /// Contends, and sends while holding the lease, until `stop` completes;
    /// then finishes the calls in flight and releases the lease (step 8).
    pub async fn run(self, stop: impl Future<Output = ()>) {
        tokio::pin!(stop);
        // Set once `stop` completed: a completed future must not be polled
        // again, and a tenure that ends while stopping ends the run.
        let mut stopped = false;
        loop {
            let lease = loop {
                match self.leases.try_acquire(SENDER_LEASE).await {
                    Ok(Some(lease)) => break lease,
                    Ok(None) => {}
                    Err(e) => ::log::warn!("sender lease: {e}; trying again"),
                }
                tokio::select! {
                    () = &mut stop => return,
                    () = tokio::time::sleep(self.leases.renew_every()) => {}
                }
            };
            ::log::info!(
                "sender lease taken revision={}; sending the outbox's calls",
                lease.revision()
            );
            let tenure = self.serve(lease, &mut stop, &mut stopped).await;
            match tenure {
                Tenure::Stopped(lease) => {
                    self.set_holding(false);
                    match lease.release().await {
                        Ok(()) => ::log::info!("sender lease released"),
                        Err(e) => ::log::warn!("sender lease release failed: {e}"),
                    }
                    return;
                }
                Tenure::Fenced => {
                    self.set_holding(false);
                    if stopped {
                        ::log::warn!("sender lease lost while stopping");
                        return;
                    }
                    ::log::warn!("sender lease lost; stopped sending, contending again");
                }
                Tenure::Failed(lease, e) => {
                    self.set_holding(false);
                    ::log::warn!("sender stopped: {e}; releasing the lease, contending again");
                    if let Some(lease) = lease {
                        let _ = lease.release().await;
                    }
                    if stopped {
                        return;
                    }
                    tokio::select! {
                        () = &mut stop => return,
                        () = tokio::time::sleep(self.leases.renew_every()) => {}
                    }
                }
            }
        }
    }

    fn set_holding(&self, holding: bool) {
        self.status.send_modify(|s| {
            s.holding = holding;
            s.held_since = holding.then(Instant::now);
            if !holding {
                s.pending = 0;
            }
        });
    }

    /// Step 2: the consumer of this tenure, every other one deleted.
    async fn take_over(&self, revision: u64) -> Result<consumer::PullConsumer, ClusterError> {
        let name = self.outbox.stream().to_string();
        let js = self.outbox.context();
        let stream = js
            .get_stream_no_info(&name)
            .await
            .map_err(|e| ClusterError::engine(format!("opening stream {name}"), e))?;
        let mine = format!("sender-{revision}");
        let mut names = stream.consumer_names();
        let mut others = Vec::new();
        while let Some(other) = names.next().await {
            let other = other
                .map_err(|e| ClusterError::engine(format!("listing consumers of {name}"), e))?;
            if other != mine {
                others.push(other);
            }
        }
        for other in others {
            stream.delete_consumer(&other).await.map_err(|e| {
                ClusterError::engine(format!("deleting consumer {other} of {name}"), e)
            })?;
        }
        stream
            .get_or_create_consumer(
                &mine,
                consumer::pull::Config {
                    durable_name: Some(mine.clone()),
                    description: Some("asgigramd elected sender (docs/cluster.md)".into()),
                    deliver_policy: consumer::DeliverPolicy::All,
                    ack_policy: consumer::AckPolicy::Explicit,
                    ack_wait: ACK_WAIT,
                    max_ack_pending: MAX_IN_HAND,
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| ClusterError::engine(format!("creating consumer {mine} of {name}"), e))
    }

    /// One tenure under `lease` (steps 2-8).
    async fn serve(
        &self,
        lease: Lease,
        stop: &mut Pin<&mut impl Future<Output = ()>>,
        stopped: &mut bool,
    ) -> Tenure {
        let revision = lease.revision();
        // Read by the calls in flight before each attempt, written only by
        // this loop: all in one task, so a Cell suffices.
        let fence = Rc::new(Cell::new(lease.valid_until()));
        let consumer = match self.take_over(revision).await {
            Ok(c) => c,
            Err(e) => return Tenure::Failed(Some(lease), e),
        };
        let mut messages = match consumer.messages().await {
            Ok(m) => Some(m),
            Err(e) => {
                return Tenure::Failed(
                    Some(lease),
                    ClusterError::engine("pulling from the calls stream", e),
                )
            }
        };
        self.set_holding(true);
        let renew_every = self.leases.renew_every();
        let mut lease = Some(lease);
        let mut renew_at = tokio::time::Instant::now() + renew_every;
        let mut renewal: Option<Renewal> = None;
        let mut lanes = Lanes::new(&self.settings);
        if lanes.pacer.enabled() {
            match load_pace(&self.outbox).await {
                Ok(Some(snapshot)) => {
                    lanes
                        .pacer
                        .restore(&snapshot, Instant::now(), SystemTime::now());
                }
                Ok(None) => {}
                Err(e) => ::log::warn!(
                    "sender: the previous holder's pacing is unknown ({e}); a chat's next message may come sooner than its limit allows, once"
                ),
            }
        }
        let mut saved_changes = lanes.pacer.changes();
        let saving = Rc::new(Cell::new(false));
        let mut in_flight = FuturesUnordered::new();
        let mut stopping = false;
        let mut stream_pending = 0u64;
        let mut repull_at: Option<tokio::time::Instant> = None;
        let mut delivered = false;
        loop {
            let now = Instant::now();
            if now >= fence.get() {
                return Tenure::Fenced;
            }
            let (starts, wake) = if stopping {
                (Vec::new(), None)
            } else {
                lanes.poll(now, MAX_IN_FLIGHT - in_flight.len())
            };
            for start in starts {
                let step: Pin<Box<dyn Future<Output = End>>> = if start.waiting.marked {
                    Box::pin(make_call(
                        self.outbox.clone(),
                        self.executor.clone(),
                        start,
                        fence.clone(),
                        self.settings.clone(),
                    ))
                } else {
                    Box::pin(mark_call(
                        self.outbox.clone(),
                        start,
                        revision,
                        self.settings.clone(),
                    ))
                };
                in_flight.push(step);
            }
            self.status.send_modify(|s| {
                s.pending = lanes.in_hand() as u64 + stream_pending;
            });
            if stopping && in_flight.is_empty() {
                // Marked, waiting for the limits, never made: unmarked, so
                // that the next holder makes them without doubt.
                for id in lanes.marked_not_made() {
                    if let Err(e) = unmark(self.outbox.answers(), &id, false).await {
                        ::log::warn!(
                            "call={id} stays marked: {e}; the next sender finds it in doubt"
                        );
                    }
                }
                if lanes.pacer.enabled() {
                    let snapshot = lanes.pacer.snapshot(Instant::now(), SystemTime::now());
                    if let Err(e) = save_pace(self.outbox.answers(), &snapshot).await {
                        ::log::warn!("sender: pacing not handed over ({e}); the next sender's first messages may come early");
                    }
                }
                return match lease {
                    Some(lease) => Tenure::Stopped(lease),
                    // Renewing: wait for it below, then stop.
                    None => match renewal.take() {
                        Some(r) => {
                            let (lease, result) = r.await;
                            match result {
                                Ok(()) => Tenure::Stopped(lease),
                                Err(_) => Tenure::Fenced,
                            }
                        }
                        None => Tenure::Fenced,
                    },
                };
            }
            let wake = wake.map(tokio::time::Instant::from_std);
            let fence_at = tokio::time::Instant::from_std(fence.get());
            tokio::select! {
                () = stop.as_mut(), if !stopping => {
                    ::log::info!("sender stopping: finishing {} calls in flight", in_flight.len());
                    stopping = true;
                    *stopped = true;
                    messages = None;
                    repull_at = None;
                }
                () = tokio::time::sleep_until(fence_at) => return Tenure::Fenced,
                () = tokio::time::sleep_until(renew_at), if renewal.is_none() => {
                    // The lease is here whenever no renewal is under way.
                    let mut held = lease.take().expect("the lease is held between renewals");
                    renewal = Some(Box::pin(async move {
                        let result = held.renew().await;
                        (held, result)
                    }));
                }
                (held, result) = poll_some(&mut renewal) => {
                    renewal = None;
                    renew_at = tokio::time::Instant::now() + renew_every;
                    match result {
                        Ok(()) => {
                            fence.set(held.valid_until());
                            let changes = lanes.pacer.changes();
                            if lanes.pacer.enabled() && changes != saved_changes && !saving.get() {
                                saved_changes = changes;
                                saving.set(true);
                                let snapshot = lanes.pacer.snapshot(Instant::now(), SystemTime::now());
                                let answers = self.outbox.answers().clone();
                                let saving = saving.clone();
                                tokio::task::spawn_local(async move {
                                    if let Err(e) = save_pace(&answers, &snapshot).await {
                                        ::log::debug!("sender: pacing snapshot not written: {e}");
                                    }
                                    saving.set(false);
                                });
                            }
                        }
                        Err(ClusterError::Fenced { .. }) => return Tenure::Fenced,
                        Err(e) => ::log::warn!("sender lease renewal failed, retrying: {e}"),
                    }
                    lease = Some(held);
                }
                Some(end) = in_flight.next(), if !in_flight.is_empty() => {
                    match end {
                        End::Answered { sequence, lane, ticket, answered_at, in_doubt, made } => {
                            lanes.forget(sequence);
                            lanes.answered(lane.as_deref(), ticket.as_ref(), answered_at);
                            self.status.send_modify(|s| {
                                s.in_doubt += u64::from(in_doubt);
                                s.made += u64::from(made);
                            });
                        }
                        End::Marked { lane, waiting, in_doubt } => {
                            lanes.marked(lane, *waiting, Instant::now());
                            self.status.send_modify(|s| s.in_doubt += u64::from(in_doubt));
                        }
                        End::Again { lane, ticket, answered_at, waiting, at, hold_all, made } => {
                            lanes.again(lane, ticket.as_ref(), answered_at, *waiting, at, hold_all);
                            self.status.send_modify(|s| s.made += u64::from(made));
                        }
                        End::Fenced => return Tenure::Fenced,
                        End::Failed(e) => return Tenure::Failed(lease, e),
                    }
                }
                next = next_message(&mut messages), if !stopping && lanes.in_hand() < MAX_IN_HAND as usize => {
                    match next {
                        Some(Ok(message)) => {
                            if let Ok(info) = message.info() {
                                stream_pending = info.pending;
                            }
                            delivered = true;
                            lanes.take(message, Instant::now());
                        }
                        // Deleted: a successor took over, so this lease
                        // is lost even if the clock says otherwise.
                        Some(Err(e)) if e.kind() == consumer::pull::MessagesErrorKind::ConsumerDeleted => {
                            return Tenure::Fenced;
                        }
                        Some(Err(e)) if !delivered && e.kind() == consumer::pull::MessagesErrorKind::NoResponders => {
                            ::log::warn!("calls stream: no responders; pulling again in {} ms", REPULL_PAUSE.as_millis());
                            messages = None;
                            repull_at = Some(tokio::time::Instant::now() + REPULL_PAUSE);
                        }
                        // A missed heartbeat or a failed pull: the stream
                        // pulls again on its own.
                        Some(Err(e)) => ::log::warn!("calls stream: {e}; pulling again"),
                        None => {
                            return Tenure::Failed(lease, ClusterError::engine("pulling from the calls stream", "the consumer's stream ended (deleted by a successor?)"));
                        }
                    }
                }
                () = sleep_until_some(repull_at) => {
                    repull_at = None;
                    match consumer.messages().await {
                        Ok(m) => messages = Some(m),
                        Err(e) => {
                            ::log::warn!("calls stream: {e}; pulling again in {} ms", REPULL_PAUSE.as_millis());
                            repull_at = Some(tokio::time::Instant::now() + REPULL_PAUSE);
                        }
                    }
                }
                () = sleep_until_some(wake) => {}
            }
        }
    }
}

async fn poll_some<T>(f: &mut Option<Pin<Box<dyn Future<Output = T>>>>) -> T {
    match f {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn next_message(
    messages: &mut Option<consumer::pull::Stream>,
) -> Option<Result<jetstream::Message, consumer::pull::MessagesError>> {
    match messages {
        Some(m) => m.next().await,
        None => std::future::pending().await,
    }
}

async fn sleep_until_some(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// A call in hand: pulled, not yet answered. `M` is the message to
/// acknowledge (a JetStream message; `()` in unit tests).
struct Waiting<M = jetstream::Message> {
    message: M,
    call: StoredCall,
    /// Its place in the stream: the order of calls across chats.
    sequence: u64,
    cost: Option<Cost>,
    /// Failures counted against `sender.max_attempts` (429s are not).
    failures: u32,
    /// An earlier attempt may have executed (its fate was unknown).
    maybe_made: bool,
    /// Its started mark is written: it may be made once the limits allow.
    marked: bool,
}

/// A call the lanes let start.
struct Start<M = jetstream::Message> {
    lane: Option<String>,
    waiting: Waiting<M>,
    ticket: Option<Ticket>,
}

struct Lane<M> {
    queue: VecDeque<Waiting<M>>,
    busy: bool,
    held_until: Option<Instant>,
}

impl<M> Default for Lane<M> {
    fn default() -> Self {
        Lane {
            queue: VecDeque::new(),
            busy: false,
            held_until: None,
        }
    }
}

/// Step 3's lanes and pacing, free of I/O.
struct Lanes<M = jetstream::Message> {
    pacer: Pacer,
    lanes: HashMap<String, Lane<M>>,
    /// Calls without a chat, each with when it may start.
    unordered: VecDeque<(Instant, Waiting<M>)>,
    /// Stream sequences in hand, so that a call delivered twice within a
    /// tenure is not taken twice.
    in_hand: HashSet<u64>,
    last_prune: Option<Instant>,
}

impl<M> Lanes<M> {
    fn new(settings: &SenderSettings) -> Lanes<M> {
        Lanes {
            pacer: Pacer::new(settings.limits.clone()),
            lanes: HashMap::default(),
            unordered: VecDeque::new(),
            in_hand: HashSet::default(),
            last_prune: None,
        }
    }

    fn in_hand(&self) -> usize {
        self.in_hand.len()
    }

    /// Queues a call in hand into its chat's lane.
    fn push(&mut self, waiting: Waiting<M>, now: Instant) {
        if !self.in_hand.insert(waiting.sequence) {
            return;
        }
        match waiting.call.params.get("chat_id").and_then(chat_of) {
            None => self.unordered.push_back((now, waiting)),
            Some(lane) => self.lanes.entry(lane).or_default().queue.push_back(waiting),
        }
    }

    /// The calls that may start at `now`, at most `room`, and when to look
    /// again.
    fn poll(&mut self, now: Instant, room: usize) -> (Vec<Start<M>>, Option<Instant>) {
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
        while i < self.unordered.len() && starts.len() < room {
            if self.unordered[i].0 > now {
                wake_at(self.unordered[i].0);
                i += 1;
                continue;
            }
            // In range: checked by the loop condition.
            let (_, waiting) = self.unordered.remove(i).expect("index checked above");
            starts.push(Start {
                lane: None,
                waiting,
                ticket: None,
            });
        }
        // Lanes that may start, oldest head call first.
        let mut ready: Vec<(u64, String)> = self
            .lanes
            .iter()
            .filter(|(_, l)| !l.busy)
            .filter_map(|(name, l)| l.queue.front().map(|w| (w.sequence, name.clone())))
            .collect();
        ready.sort_unstable();
        // The oldest lane gets a short overall budget first.
        let mut pass = Pass::default();
        for (_, name) in ready {
            if starts.len() >= room {
                break;
            }
            // Listed from the map just above.
            let lane = self.lanes.get_mut(&name).expect("a listed lane");
            if let Some(until) = lane.held_until.filter(|&u| u > now) {
                wake_at(until);
                continue;
            }
            // Listed for its head.
            let head = lane.queue.front().expect("a listed lane has a head");
            let mut ticket = None;
            // Marking is no message: only making the call counts, and the
            // ticket is taken right before the request goes out, so that the
            // pacer's anchor is no earlier than Telegram's count.
            let paced = head.cost.filter(|_| head.marked && self.pacer.enabled());
            if let Some(cost) = paced {
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
            // Its head was looked at just above.
            let waiting = lane.queue.pop_front().expect("a listed lane has a head");
            lane.busy = true;
            lane.held_until = None;
            starts.push(Start {
                lane: Some(name),
                waiting,
                ticket,
            });
        }
        (starts, wake)
    }

    /// A call has its answer stored: its lane's next call may go.
    fn answered(&mut self, lane: Option<&str>, ticket: Option<&Ticket>, at: Instant) {
        if let Some(ticket) = ticket {
            self.pacer.settle(ticket, at);
        }
        self.release(lane);
    }

    fn release(&mut self, lane: Option<&str>) {
        let Some(name) = lane else { return };
        if let Some(l) = self.lanes.get_mut(name) {
            l.busy = false;
            if l.queue.is_empty() {
                self.lanes.remove(name);
            }
        }
    }

    /// A call to try again at `at`, at the head of its lane.
    fn again(
        &mut self,
        lane: Option<String>,
        ticket: Option<&Ticket>,
        answered_at: Instant,
        waiting: Waiting<M>,
        at: Instant,
        hold_all: bool,
    ) {
        if let Some(ticket) = ticket {
            self.pacer.settle(ticket, answered_at);
        }
        if hold_all {
            self.pacer.hold_all(at);
        }
        match lane {
            None => self.unordered.push_back((at, waiting)),
            Some(name) => {
                let l = self.lanes.entry(name).or_default();
                l.busy = false;
                l.held_until = Some(at);
                l.queue.push_front(waiting);
            }
        }
    }

    /// A call's started mark is written: it goes back to the head of its
    /// lane, to be made once the limits allow.
    fn marked(&mut self, lane: Option<String>, waiting: Waiting<M>, now: Instant) {
        match lane {
            None => self.unordered.push_front((now, waiting)),
            Some(name) => {
                let l = self.lanes.entry(name).or_default();
                l.busy = false;
                l.queue.push_front(waiting);
            }
        }
    }

    /// The ids of the calls in hand that are marked, surely not made (no
    /// attempt of unknown fate), and not in flight.
    fn marked_not_made(&self) -> Vec<String> {
        self.lanes
            .values()
            .filter_map(|l| l.queue.front())
            .chain(self.unordered.iter().map(|(_, w)| w))
            .filter(|w| w.marked && !w.maybe_made)
            .map(|w| w.call.id.clone())
            .collect()
    }

    fn forget(&mut self, sequence: u64) {
        self.in_hand.remove(&sequence);
    }
}

impl Lanes<jetstream::Message> {
    /// A pulled message: a call into its lane, or, if it is not a call, one
    /// log line and off the stream (nothing can make it).
    fn take(&mut self, message: jetstream::Message, now: Instant) {
        let Ok(sequence) = message.info().map(|i| i.stream_sequence) else {
            ::log::warn!("calls stream: a message without JetStream metadata; ignored");
            return;
        };
        if self.in_hand.contains(&sequence) {
            return;
        }
        let call = match serde_json::from_slice::<StoredCall>(&message.payload) {
            Ok(call) => call,
            Err(e) => {
                ::log::error!("calls stream: message {sequence} is not a call ({e}); dropped");
                tokio::spawn(async move {
                    let _ = message.ack_with(AckKind::Term).await;
                });
                return;
            }
        };
        let cost = message_cost(&call.method, &call.params);
        self.push(
            Waiting {
                message,
                call,
                sequence,
                cost,
                failures: 0,
                maybe_made: false,
                marked: false,
            },
            now,
        );
    }
}

/// How a call in flight ended.
enum End {
    /// Its answer is stored and it is acknowledged.
    Answered {
        sequence: u64,
        lane: Option<String>,
        ticket: Option<Ticket>,
        answered_at: Instant,
        in_doubt: bool,
        made: bool,
    },
    /// Marked (step 4): to be made once the limits allow. `in_doubt`: it
    /// was another holder's, not answered, and is made again.
    Marked {
        lane: Option<String>,
        waiting: Box<Waiting>,
        in_doubt: bool,
    },
    /// To be tried again at `at` (step 6).
    Again {
        lane: Option<String>,
        ticket: Option<Ticket>,
        answered_at: Instant,
        waiting: Box<Waiting>,
        at: Instant,
        hold_all: bool,
        made: bool,
    },
    /// The lease ran out before the call could be made.
    Fenced,
    /// The answers bucket or the stream failed.
    Failed(ClusterError),
}

/// Step 4 for one call: its started mark, unless it is this tenure's own
/// (a retry), or what an existing entry says.
async fn mark_call(outbox: Outbox, start: Start, revision: u64, settings: SenderSettings) -> End {
    let Start {
        lane,
        mut waiting,
        ticket,
    } = start;
    let id = waiting.call.id.clone();
    let answers = outbox.answers();
    let mut in_doubt = false;
    // Step 4: the started mark, unless it is this tenure's own (a retry).
    let mark = Mark::Started { by: revision }.encode();
    match write(answers, &id, mark.clone(), Some(0)).await {
        Ok(true) => {}
        Ok(false) => match outbox.mark(&id).await {
            Err(e) => return End::Failed(e),
            Ok(Some((Mark::Done { .. }, _))) => {
                ::log::debug!("call={id} already answered; acknowledged, not made again");
                return finish(waiting, lane, ticket, Instant::now(), false, false).await;
            }
            Ok(Some((Mark::Started { by }, _))) if by == revision => {}
            Ok(Some((Mark::Started { by }, last))) => {
                in_doubt = true;
                match settings.ambiguous {
                    AmbiguousPolicy::Retry => {
                        ::log::warn!(
                            "call={id} method={} in doubt (started by the sender of lease \
                             revision {by}, not answered); making it again (sender.ambiguous = retry)",
                            waiting.call.method
                        );
                        match write(answers, &id, mark, Some(last)).await {
                            Ok(true) => {}
                            // Written meanwhile: the previous holder's
                            // answer, landing late. Looked at afresh.
                            Ok(false) => {
                                return End::Again {
                                    lane,
                                    ticket,
                                    answered_at: Instant::now(),
                                    waiting: Box::new(waiting),
                                    at: Instant::now(),
                                    hold_all: false,
                                    made: false,
                                }
                            }
                            Err(e) => return End::Failed(e),
                        }
                    }
                    AmbiguousPolicy::Fail => {
                        ::log::warn!(
                            "call={id} method={} in doubt (started by the sender of lease \
                             revision {by}, not answered); answered with an error \
                             (sender.ambiguous = fail)",
                            waiting.call.method
                        );
                        let outcome = Outcome::Error(serde_json::json!({
                            "ok": false,
                            "error_code": 0,
                            "description": "in doubt: the sender making this call stopped before \
                                            its answer; not made again (sender.ambiguous = fail)",
                        }));
                        if let Err(e) = store(answers, &id, &outcome).await {
                            return End::Failed(e);
                        }
                        return finish(waiting, lane, ticket, Instant::now(), true, false).await;
                    }
                }
            }
            // Removed while it waited for a retry, or not a mark: ours now.
            Ok(_) => {
                if let Err(e) = write(answers, &id, mark, None).await {
                    return End::Failed(e);
                }
            }
        },
        Err(e) => return End::Failed(e),
    }
    waiting.marked = true;
    End::Marked {
        lane,
        waiting: Box::new(waiting),
        in_doubt,
    }
}

/// Steps 5 and 6 for one call, marked: made, its answer stored, and
/// acknowledged; or put back for a retry.
async fn make_call<E: Executor>(
    outbox: Outbox,
    executor: Rc<E>,
    start: Start,
    fence: Rc<Cell<Instant>>,
    settings: SenderSettings,
) -> End {
    let Start {
        lane,
        mut waiting,
        ticket,
    } = start;
    let id = waiting.call.id.clone();
    let answers = outbox.answers();
    if Instant::now() >= fence.get() {
        return End::Fenced;
    }
    let result = executor
        .execute(&waiting.call.method, &waiting.call.params)
        .await;
    let answered_at = Instant::now();
    // Marked again before its next attempt: a removed mark is written
    // anew, one kept (the call may have been made) is found to be this
    // tenure's.
    let again = |mut waiting: Waiting, at: Instant, hold_all: bool, made: bool| {
        waiting.marked = false;
        End::Again {
            lane: lane.clone(),
            ticket: ticket.clone(),
            answered_at,
            waiting: Box::new(waiting),
            at,
            hold_all,
            made,
        }
    };
    let outcome = match result {
        Ok(result) => Outcome::Result(result),
        Err(TelegramError::RetryAfter { retry_after, .. }) => {
            ::log::warn!(
                "429 from Telegram method={} call={id}; retrying in {retry_after}s",
                waiting.call.method
            );
            if let Err(e) = unmark(answers, &id, waiting.maybe_made).await {
                return End::Failed(e);
            }
            let hold_all = lane.is_none();
            return again(
                waiting,
                answered_at + Duration::from_secs(retry_after),
                hold_all,
                false,
            );
        }
        Err(e @ (TelegramError::Server { .. } | TelegramError::Network(_)))
            if waiting.failures + 1 < settings.max_attempts =>
        {
            waiting.failures += 1;
            let delay = BACKOFF.delay(waiting.failures - 1);
            ::log::warn!(
                "call={id} method={} failed: {e}; retrying in {:.2}s",
                waiting.call.method,
                delay.as_secs_f64()
            );
            if let Err(e) = unmark(answers, &id, waiting.maybe_made).await {
                return End::Failed(e);
            }
            return again(waiting, answered_at + delay, false, false);
        }
        Err(e @ (TelegramError::Timeout(_) | TelegramError::InvalidResponse(_)))
            if settings.ambiguous == AmbiguousPolicy::Retry
                && waiting.failures + 1 < settings.max_attempts =>
        {
            waiting.failures += 1;
            waiting.maybe_made = true;
            let delay = BACKOFF.delay(waiting.failures - 1);
            ::log::warn!(
                "call={id} method={} failed: {e}; retrying in {:.2}s (sender.ambiguous = retry)",
                waiting.call.method,
                delay.as_secs_f64()
            );
            return again(waiting, answered_at + delay, false, true);
        }
        Err(e) => {
            ::log::debug!(
                "call={id} method={} failed: {e}; that is its answer",
                waiting.call.method
            );
            Outcome::Error(e.to_envelope())
        }
    };
    if let Err(e) = store(answers, &id, &outcome).await {
        return End::Failed(e);
    }
    finish(waiting, lane, ticket, answered_at, false, true).await
}

/// Step 5's acknowledgement. A lost one is harmless: the call comes again
/// and is found answered.
async fn finish(
    waiting: Waiting,
    lane: Option<String>,
    ticket: Option<Ticket>,
    answered_at: Instant,
    in_doubt: bool,
    made: bool,
) -> End {
    let sequence = waiting.sequence;
    if let Err(e) = waiting.message.ack().await {
        ::log::debug!(
            "call={} acknowledgement failed: {e}; it will be found answered",
            waiting.call.id
        );
    }
    End::Answered {
        sequence,
        lane,
        ticket,
        answered_at,
        in_doubt,
        made,
    }
}

/// Step 9: the pacer's snapshot for the next holder. Written once, not
/// retried: a snapshot that did not make it is replaced by the next.
async fn save_pace(answers: &kv::Store, snapshot: &PaceSnapshot) -> Result<(), ClusterError> {
    let bytes = serde_json::to_vec(snapshot)
        .map_err(|e| ClusterError::engine("encoding the pacing snapshot", e))?;
    answers
        .put(PACE_KEY, bytes.into())
        .await
        .map(|_| ())
        .map_err(|e| ClusterError::engine("writing the pacing snapshot", e))
}

/// The last holder's snapshot, if it left one that this version can read.
async fn load_pace(outbox: &Outbox) -> Result<Option<PaceSnapshot>, ClusterError> {
    let Some((bytes, _)) = outbox.latest(PACE_KEY, "the pacing snapshot").await? else {
        return Ok(None);
    };
    match serde_json::from_slice(&bytes) {
        Ok(snapshot) => Ok(Some(snapshot)),
        Err(e) => {
            ::log::warn!(
                "sender: the pacing snapshot is unreadable ({e}); starting with an empty pacer"
            );
            Ok(None)
        }
    }
}

/// Stores a call's answer.
async fn store(answers: &kv::Store, id: &str, outcome: &Outcome) -> Result<(), ClusterError> {
    write(answers, id, Mark::done(outcome).encode(), None)
        .await
        .map(|_| ())
}

/// Removes the started mark of a call that surely was not made (it waits
/// for a retry), so that a successor does not count it in doubt; kept where
/// an earlier attempt may have executed.
async fn unmark(answers: &kv::Store, id: &str, maybe_made: bool) -> Result<(), ClusterError> {
    if maybe_made {
        return Ok(());
    }
    let mut tries = 0;
    loop {
        match answers.delete(id).await {
            Ok(()) => return Ok(()),
            Err(_) if tries + 1 < WRITE_TRIES => {
                tries += 1;
                tokio::time::sleep(WRITE_PAUSE).await;
            }
            Err(e) => return Err(ClusterError::engine(format!("unmarking call {id}"), e)),
        }
    }
}

/// Writes `value` at `id`: on condition that the last revision is `last`
/// when given (`Ok(false)` when it is not), else unconditionally. Errors
/// that may pass (a leader election) are tried again; a conditional write
/// whose answer was lost and that is tried again finds its own write and
/// reports a lost race, which the caller resolves by reading the mark.
async fn write(
    answers: &kv::Store,
    id: &str,
    value: bytes::Bytes,
    last: Option<u64>,
) -> Result<bool, ClusterError> {
    let mut tries = 0;
    loop {
        let error = match last {
            Some(last) => match answers.update(id, value.clone(), last).await {
                Ok(_) => return Ok(true),
                Err(e) if lost_race(&e) => return Ok(false),
                Err(e) => ClusterError::engine(format!("marking call {id}"), e),
            },
            None => match answers.put(id, value.clone()).await {
                Ok(_) => return Ok(true),
                Err(e) => ClusterError::engine(format!("writing the answer of call {id}"), e),
            },
        };
        if tries + 1 >= WRITE_TRIES {
            return Err(error);
        }
        tries += 1;
        tokio::time::sleep(WRITE_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn lanes(limits: crate::telegram::limits::Limits) -> Lanes<()> {
        Lanes::new(&SenderSettings {
            limits,
            ..SenderSettings::default()
        })
    }

    fn call(sequence: u64, params: Value) -> Waiting<()> {
        let Value::Object(params) = params else {
            unreachable!("the tests pass objects")
        };
        let method = if params.contains_key("chat_id") {
            "sendMessage"
        } else {
            "answerCallbackQuery"
        };
        Waiting {
            message: (),
            cost: message_cost(method, &params),
            call: StoredCall {
                id: format!("u{sequence}.0"),
                method: method.into(),
                params,
            },
            sequence,
            failures: 0,
            maybe_made: false,
            marked: true,
        }
    }

    fn ids(starts: &[Start<()>]) -> Vec<u64> {
        starts.iter().map(|s| s.waiting.sequence).collect()
    }

    #[test]
    fn one_call_per_chat_at_a_time_in_stream_order_and_chatless_calls_at_once() {
        let mut l = lanes(crate::telegram::limits::Limits::off());
        let now = Instant::now();
        l.push(call(1, json!({"chat_id": 1})), now);
        l.push(call(2, json!({"chat_id": 1})), now);
        l.push(call(3, json!({"chat_id": 2})), now);
        l.push(call(4, json!({"callback_query_id": "q"})), now);
        // Delivered again within a tenure: not taken twice.
        l.push(call(1, json!({"chat_id": 1})), now);
        let (starts, wake) = l.poll(now, 64);
        assert_eq!(ids(&starts), vec![4, 1, 3]);
        assert_eq!(wake, None);
        // Chat 1's second call waits for the first's answer.
        assert!(l.poll(now, 64).0.is_empty());
        l.forget(1);
        l.answered(Some("1"), None, now);
        assert_eq!(ids(&l.poll(now, 64).0), vec![2]);
        assert_eq!(l.in_hand(), 3);
    }

    #[test]
    fn a_call_put_back_goes_first_in_its_chat_after_its_hold() {
        let mut l = lanes(crate::telegram::limits::Limits::off());
        let now = Instant::now();
        l.push(call(1, json!({"chat_id": 1})), now);
        l.push(call(2, json!({"chat_id": 1})), now);
        let mut starts = l.poll(now, 64).0;
        let first = starts.pop().expect("chat 1's first call starts");
        let later = now + Duration::from_secs(3);
        l.again(first.lane, None, now, first.waiting, later, false);
        let (starts, wake) = l.poll(now, 64);
        assert!(starts.is_empty());
        assert_eq!(wake, Some(later));
        assert_eq!(ids(&l.poll(later, 64).0), vec![1]);
    }

    #[test]
    fn messages_are_paced_by_the_global_limit_oldest_chat_first() {
        let limits = crate::telegram::limits::Limits {
            global_per_second: 2,
            ..crate::telegram::limits::Limits::default()
        };
        let mut l = lanes(limits);
        let now = Instant::now();
        for chat in 1..=4 {
            l.push(call(chat as u64, json!({"chat_id": chat})), now);
        }
        let (starts, wake) = l.poll(now, 64);
        assert_eq!(ids(&starts), vec![1, 2]);
        let wake = wake.expect("the others wait for the budget");
        assert!(
            wake > now && wake <= now + Duration::from_secs(2),
            "{wake:?}"
        );
        for s in &starts {
            l.answered(s.lane.as_deref(), s.ticket.as_ref(), now);
        }
        // A second later the budget is back, for the two oldest waiting.
        let (starts, _) = l.poll(now + Duration::from_millis(1100), 64);
        assert_eq!(ids(&starts), vec![3, 4]);
    }

    #[test]
    fn marking_is_not_paced_and_making_is() {
        let limits = crate::telegram::limits::Limits {
            global_per_second: 1,
            ..crate::telegram::limits::Limits::default()
        };
        let mut l = lanes(limits);
        let now = Instant::now();
        for chat in 1..=3 {
            let mut c = call(chat as u64, json!({"chat_id": chat}));
            c.marked = false;
            l.push(c, now);
        }
        // Every chat's head is marked at once, whatever the budget.
        let starts = l.poll(now, 64).0;
        assert_eq!(ids(&starts), vec![1, 2, 3]);
        assert!(starts.iter().all(|s| s.ticket.is_none()));
        for mut s in starts {
            s.waiting.marked = true;
            l.marked(s.lane, s.waiting, now);
        }
        // Made one a second: the ticket is taken as each is made.
        let (starts, wake) = l.poll(now, 64);
        assert_eq!(ids(&starts), vec![1]);
        assert!(starts[0].ticket.is_some());
        assert!(wake.is_some());
    }

    #[test]
    fn no_more_than_room_start() {
        let mut l = lanes(crate::telegram::limits::Limits::off());
        let now = Instant::now();
        for chat in 1..=5 {
            l.push(call(chat as u64, json!({"chat_id": chat})), now);
        }
        assert_eq!(l.poll(now, 2).0.len(), 2);
        assert_eq!(l.poll(now, 64).0.len(), 3);
    }
}
