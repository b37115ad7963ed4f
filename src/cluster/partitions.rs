//! Partition ownership: which live node reads which partition of the update
//! log, and the [`Owner`] that reads the partitions this node holds.
//!
//! # Who should own a partition
//!
//! [`assign`] is weighted rendezvous hashing with bounded loads: every node
//! scores every partition by a stable hash of (node id, partition),
//! weighted by the node's worker count, and partitions go to the nodes
//! that score them highest, each node up to its share of the partitions
//! by weight (its numbered comment). Every node computes the same answer
//! from the same live set ([`super::membership`]), in every version: the
//! hash is FNV-1a with a fixed finaliser, and the logarithm the weighting
//! needs is computed here with additions, multiplications and divisions
//! only, which IEEE 754 makes exact on every machine (a platform's `ln` may
//! differ in its last bit, and a near tie would then go two ways). A node
//! joining takes its share and moves few others; a node leaving gives up
//! its own and moves few others.
//!
//! # How an Owner holds its partitions
//!
//! Every `cluster.lease_renew` the Owner renews its announcement, reads the
//! live set and, once that set has not changed for `settle` (and `settle`
//! after start), computes the assignment:
//!
//! 1. A partition assigned to this node and not held: take its lease
//!    `partition.<n>` if free (`try_acquire`; held by the previous owner
//!    until it hands over or its lease expires).
//! 2. A partition held but assigned elsewhere (a node joined, or the
//!    shares changed): hand it over, as on stop (below).
//!
//! Each held partition has a task of its own, which owns the lease and the
//! partition's durable pull consumer (`partition_<n>`, explicit acks,
//! `ack_wait` of one lease TTL, `max_ack_pending` bounded) and:
//!
//! 1. On taking over, reads the consumer: where updates are unacknowledged
//!    (the previous owner died or was fenced with them in hand), it pulls
//!    nothing until their `ack_wait` has certainly run out and the previous
//!    owner's last pull request has expired; JetStream then redelivers them
//!    first, in stream order, before anything newer. So per-chat order holds
//!    across the takeover and the updates the dead owner had in hand come
//!    again.
//! 2. Pulls in batches that fit under `max_ack_pending`, each pull waiting
//!    at most `pull_wait`, and hands each update to the delivery channel
//!    in stream order, only while its lease is valid by [`Lease::is_valid`]:
//!    an owner whose lease lapsed (renewals failing, the process paused)
//!    delivers nothing more, which is before the lease can expire on the
//!    server, so before another node can take the partition (fencing).
//! 3. Acks an update (waiting for the server's confirmation) when the
//!    receiver of its [`Delivery`] calls [`AckHandle::done`]; at every
//!    renewal tells the server the updates still in hand are in progress, so
//!    that none is redelivered while its owner works on it.
//! 4. On stop (SIGTERM) or a handover: pulls nothing more, delivers what
//!    its last pull brings, waits (up to `drain_timeout`) until every update
//!    in hand is acknowledged, then releases the lease, so the next owner
//!    starts at once, finds nothing unacknowledged and delivers nothing
//!    twice. The Owner withdraws its announcement first, so the others
//!    assign its partitions among themselves meanwhile.
//!
//! A dropped [`Owner`] stops at once, releasing nothing, as a node that
//! died: its leases expire after the TTL.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::pull, AckKind};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};
use tokio::task::{JoinHandle, JoinSet};

use super::membership::{Membership, Node};
use super::{ClusterError, Lease, Leases, UpdateLog};
use crate::settings::ClusterSettings;

// ---------------------------------------------------------------------------
// The assignment

/// The owner of each partition `0..partitions` among `live` (node id,
/// weight): the index is the partition, the value the owner's id. Nodes of
/// weight 0 own nothing; with none of weight above 0, no partition has an
/// owner. A node listed twice counts once; the order of `live` does not
/// matter.
///
/// 1. Each node's share: `partitions * weight / total weight`, rounded
///    down, and the partitions left over go one each to the nodes whose
///    shares lost the most in rounding (ties: the smaller id). The shares
///    add up to `partitions`.
/// 2. Every (node, partition) pair is scored `weight / -ln(h)`, `h` the
///    pair's stable hash in (0, 1): rendezvous hashing, where the highest
///    score would own the partition.
/// 3. Pairs in order of score, highest first (ties: the smaller id, then
///    the smaller partition): the partition goes to the node if neither is
///    taken yet, that is if the partition has no owner and the node holds
///    less than its share.
///
/// So every node holds exactly its share (equal nodes differ by one at
/// most), where plain rendezvous hashing leaves a dozen partitions split as
/// unevenly as dice would; and each partition goes to the node that wants
/// it most among those with room, so a node joining or leaving moves its
/// own share and, through the shares' change, a few more.
pub fn assign<S: AsRef<str>>(partitions: u32, live: &[(S, u32)]) -> Vec<Option<&str>> {
    let mut nodes: Vec<(&str, u32)> = live
        .iter()
        .map(|(id, weight)| (id.as_ref(), *weight))
        .filter(|&(_, weight)| weight > 0)
        .collect();
    nodes.sort_unstable();
    nodes.dedup_by(|a, b| a.0 == b.0);
    let mut owners: Vec<Option<&str>> = vec![None; partitions as usize];
    if nodes.is_empty() {
        return owners;
    }
    // 1. Shares.
    let total: u64 = nodes.iter().map(|&(_, w)| u64::from(w)).sum();
    let scaled = |w: u32| u64::from(partitions) * u64::from(w);
    let mut room: Vec<u64> = nodes.iter().map(|&(_, w)| scaled(w) / total).collect();
    let left_over = u64::from(partitions) - room.iter().sum::<u64>();
    let mut by_rounding: Vec<usize> = (0..nodes.len()).collect();
    by_rounding.sort_by_key(|&i| (std::cmp::Reverse(scaled(nodes[i].1) % total), nodes[i].0));
    // Fewer left over than nodes: each share lost less than one partition.
    for &i in by_rounding.iter().take(left_over as usize) {
        room[i] += 1;
    }
    // 2. Scores.
    let mut pairs: Vec<(f64, usize, u32)> = Vec::with_capacity(nodes.len() * partitions as usize);
    for (i, &(id, weight)) in nodes.iter().enumerate() {
        for p in 0..partitions {
            pairs.push((f64::from(weight) / -ln(unit_hash(id, p)), i, p));
        }
    }
    // `nodes` is sorted by id, so the index orders ties by id.
    pairs.sort_unstable_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
    // 3. Greedy, best pairs first.
    let mut unowned = partitions;
    for (_, i, p) in pairs {
        if unowned == 0 {
            break;
        }
        let owner = &mut owners[p as usize];
        if owner.is_none() && room[i] > 0 {
            *owner = Some(nodes[i].0);
            room[i] -= 1;
            unowned -= 1;
        }
    }
    owners
}

/// A stable hash of (node, partition) mapped into (0, 1): FNV-1a 64 over
/// the id's bytes, a 0xff separator (no id contains it) and the partition's
/// little-endian bytes, then SplitMix64's finaliser, whose avalanche spreads
/// the ids' common prefixes over all 64 bits.
fn unit_hash(node: &str, partition: u32) -> f64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in node.bytes().chain([0xff]).chain(partition.to_le_bytes()) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    // The top 53 bits, centred in their interval: never 0, never 1.
    ((hash >> 11) as f64 + 0.5) / (1u64 << 53) as f64
}

/// The natural logarithm of `x` in (0, 1], with the same result on every
/// machine: `x = m * 2^e` with `m` in [sqrt(1/2), sqrt(2)), and
/// `ln m = 2 atanh(s)`, `s = (m - 1) / (m + 1)`, summed as a series
/// (|s| < 0.172, so 16 terms are exact to below an ulp). Only `x` that
/// [`unit_hash`] gives are passed: normal numbers, at least 2^-54.
fn ln(x: f64) -> f64 {
    let bits = x.to_bits();
    let mut exponent = ((bits >> 52) & 0x7ff) as i64 - 1023;
    let mut m = f64::from_bits((bits & ((1u64 << 52) - 1)) | (1023u64 << 52));
    if m > std::f64::consts::SQRT_2 {
        m /= 2.0;
        exponent += 1;
    }
    let s = (m - 1.0) / (m + 1.0);
    let s2 = s * s;
    let mut term = s;
    let mut sum = 0.0;
    for k in 0..16 {
        sum += term / f64::from(2 * k + 1);
        term *= s2;
    }
    2.0 * sum + exponent as f64 * std::f64::consts::LN_2
}

// ---------------------------------------------------------------------------
// Deliveries

/// An update handed to the receiver (in the daemon: the chat's scope), with
/// the handle that acknowledges it.
#[derive(Debug)]
pub struct Delivery {
    pub partition: u32,
    /// Its sequence in the update log.
    pub sequence: u64,
    /// The update's JSON, as Telegram sent it, or a pushed event's body.
    pub update: Bytes,
    /// A pushed event ([`super::log::PUSHED_HEADER`]), not a Telegram update.
    pub pushed: bool,
    /// Delivered before, by this node or by an owner that died or was
    /// fenced with it in hand.
    pub redelivered: bool,
    pub ack: AckHandle,
}

/// Acknowledges one [`Delivery`]. [`AckHandle::done`] once the update was
/// taken (the journal's `delivered`); dropped without it, the update is
/// given back at once to be delivered again (a receiver that stopped).
#[derive(Debug)]
#[must_use = "an update never acknowledged is held until its owner stops"]
pub struct AckHandle {
    sequence: u64,
    tx: mpsc::UnboundedSender<Settled>,
    settled: bool,
    fence: Fence,
}

/// Whether the partition an update came from is still this node's: until
/// when its lease is surely valid, as of the last renewal; `None` once the
/// partition's task ended (fenced, handed over, stopped).
///
/// What the node does for an update after that must not reach the engine:
/// the next owner handles the update again, and two nodes storing calls for
/// the same update race (the calls of one chat could be stored out of their
/// order). So the Relay stores no call caused by an update whose fence is
/// down.
#[derive(Debug, Clone)]
pub struct Fence(std::sync::Arc<std::sync::Mutex<Option<Instant>>>);

impl Fence {
    fn new(valid_until: Instant) -> Fence {
        Fence(std::sync::Arc::new(std::sync::Mutex::new(Some(
            valid_until,
        ))))
    }

    /// Since the partition is not this node's any more, nothing done for its
    /// updates may be stored.
    pub fn is_up(&self) -> bool {
        self.valid_until()
            .is_some_and(|until| Instant::now() < until)
    }

    fn valid_until(&self) -> Option<Instant> {
        // A poisoned lock: a thread panicked while writing an Instant, which
        // leaves a valid value.
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, until: Option<Instant>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = until;
    }

    /// Moves the fence on to `until` after a renewal, if it is still up.
    /// A fence that went down stays down (`false`): the Relay may have
    /// dropped a call by it meanwhile, so the partition's task must end
    /// without acknowledging anything more, and the update comes again to
    /// the next owner, in order. Raising it again would let that update be
    /// acknowledged with its call never stored. Read and written under one
    /// lock, so a call dropped by a down fence is never followed by a raise.
    fn extend(&self, until: Instant) -> bool {
        let mut fence = self.0.lock().unwrap_or_else(|e| e.into_inner());
        match *fence {
            Some(current) if Instant::now() < current => {
                *fence = Some(until.max(current));
                true
            }
            _ => {
                *fence = None;
                false
            }
        }
    }
}

/// Takes the fence down when the partition's task ends, on any path.
struct FenceGuard(Fence);

impl Drop for FenceGuard {
    fn drop(&mut self) {
        self.0.set(None);
    }
}

#[derive(Debug)]
enum Settled {
    Done(u64),
    Dropped(u64),
}

impl AckHandle {
    /// The fence of the partition the update came from.
    pub fn fence(&self) -> Fence {
        self.fence.clone()
    }

    /// The update was taken: its owner acknowledges it to the log. After
    /// the owner lost the partition (fenced) nothing is sent, and the next
    /// owner delivers the update again.
    pub fn done(mut self) {
        self.settled = true;
        // A closed channel: the partition task ended; see above.
        let _ = self.tx.send(Settled::Done(self.sequence));
    }
}

/// Whether a detached [`AckHandle`] was acknowledged: for the Relay's tests.
#[cfg(test)]
pub(crate) struct AckProbe(mpsc::UnboundedReceiver<Settled>);

#[cfg(test)]
impl AckProbe {
    pub(crate) fn acked(&mut self) -> bool {
        matches!(self.0.try_recv(), Ok(Settled::Done(_)))
    }
}

#[cfg(test)]
impl AckHandle {
    /// Takes the handle's fence down, as its partition's end would.
    pub(crate) fn take_fence_down(&self) {
        self.fence.set(None);
    }

    /// A handle on no partition, and the probe that tells its fate.
    pub(crate) fn detached() -> (AckHandle, AckProbe) {
        let (tx, rx) = mpsc::unbounded_channel();
        let handle = AckHandle {
            sequence: 0,
            tx,
            settled: false,
            fence: Fence::new(Instant::now() + Duration::from_secs(3600)),
        };
        (handle, AckProbe(rx))
    }
}

impl Drop for AckHandle {
    fn drop(&mut self) {
        if !self.settled {
            let _ = self.tx.send(Settled::Dropped(self.sequence));
        }
    }
}

// ---------------------------------------------------------------------------
// Settings and status

/// How an [`Owner`] paces itself; the lease TTL and renewal interval come
/// from its [`Leases`].
#[derive(Debug, Clone)]
pub struct OwnerSettings {
    /// How long the live set must stay unchanged (and how long after start
    /// to wait) before partitions move: a node joining, or several nodes
    /// starting together, moves each partition once.
    pub settle: Duration,
    /// Updates in hand per partition at most, delivered and not yet
    /// acknowledged (the consumer's `max_ack_pending`).
    pub max_ack_pending: usize,
    /// How long one pull waits for updates on an idle partition; also how
    /// long a handover may wait for the last pull to end.
    pub pull_wait: Duration,
    /// How long a stop or handover waits for the updates in hand to be
    /// acknowledged before it releases the partition anyway (those updates
    /// are then delivered again by the next owner).
    pub drain_timeout: Duration,
}

impl OwnerSettings {
    /// The defaults for a cluster: settling over three renewals (long
    /// enough for every node to see a newcomer's announcement), pulls of up
    /// to a second, thirty seconds to finish what is in hand.
    pub fn new(cluster: &ClusterSettings, max_ack_pending: usize) -> OwnerSettings {
        OwnerSettings {
            settle: cluster.lease_renew * 3,
            max_ack_pending: max_ack_pending.max(1),
            pull_wait: cluster.lease_renew.min(Duration::from_secs(1)),
            drain_timeout: Duration::from_secs(30),
        }
    }
}

/// What an [`Owner`] holds, as of its last renewal tick (for `/readyz` and
/// `/metrics`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct OwnerStatus {
    pub node_id: String,
    /// Whether this node's announcement is current.
    pub announced: bool,
    /// The live set the last assignment was computed from.
    pub live: Vec<Node>,
    /// The partitions held, by number.
    pub partitions: Vec<PartitionStatus>,
}

/// One held partition.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PartitionStatus {
    pub partition: u32,
    /// The lease's revision (its fencing token).
    pub revision: u64,
    /// Since the lease was last written.
    pub lease_age: Duration,
    /// Updates delivered and not yet acknowledged.
    pub in_hand: usize,
    /// Updates the log holds for the partition beyond those delivered, as
    /// of the last delivery (the stream's lag behind this owner).
    pub lag: u64,
    /// Updates delivered since the partition was taken.
    pub delivered: u64,
    /// Of those, the ones delivered before (by a previous owner).
    pub redelivered: u64,
    /// Waiting for a previous owner's unacknowledged updates to come back.
    pub awaiting_redelivery: bool,
    /// Being handed over (stopping or moved to another node).
    pub handing_over: bool,
}

/// What a partition task reports as it goes; the age is computed when the
/// Owner's status is read.
#[derive(Debug, Clone)]
struct PartitionState {
    status: PartitionStatus,
    lease_written: Instant,
}

// ---------------------------------------------------------------------------
// The Owner

/// Holds the partitions assigned to this node and delivers their updates.
/// [`Owner::stop`] hands them over; dropped, it stops at once as a node that
/// died would.
#[derive(Debug)]
pub struct Owner {
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    status: watch::Receiver<OwnerStatus>,
}

/// What the Owner's tasks share.
#[derive(Clone)]
struct Shared {
    js: jetstream::Context,
    log: UpdateLog,
    settings: OwnerSettings,
    ttl: Duration,
    renew_every: Duration,
    node_id: String,
    deliver: mpsc::Sender<Delivery>,
}

impl Owner {
    /// Starts contending for the partitions assigned to this node, on the
    /// calling tokio runtime. `leases` and `membership` are this node's
    /// (the same node id); deliveries go to `deliver`, in stream order per
    /// partition.
    pub fn start(
        js: jetstream::Context,
        log: UpdateLog,
        leases: Leases,
        membership: Membership,
        settings: OwnerSettings,
        deliver: mpsc::Sender<Delivery>,
    ) -> Owner {
        let (stop, stopped) = oneshot::channel();
        let (status_tx, status) = watch::channel(OwnerStatus {
            node_id: leases.node_id().to_string(),
            ..OwnerStatus::default()
        });
        let ctx = Shared {
            js,
            log,
            settings,
            ttl: leases.ttl(),
            renew_every: leases.renew_every(),
            node_id: leases.node_id().to_string(),
            deliver,
        };
        let task = tokio::spawn(coordinate(ctx, leases, membership, stopped, status_tx));
        Owner {
            stop: Some(stop),
            task: Some(task),
            status,
        }
    }

    /// What this node holds, as of its last renewal tick.
    pub fn status(&self) -> OwnerStatus {
        self.status.borrow().clone()
    }

    /// [`Owner::status`], as it changes.
    pub fn status_watch(&self) -> watch::Receiver<OwnerStatus> {
        self.status.clone()
    }

    /// SIGTERM's handover: withdraws this node's announcement, stops taking
    /// updates, waits for the ones in hand to be acknowledged (each
    /// partition up to `drain_timeout`), and releases every partition lease.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            if let Err(e) = task.await {
                ::log::error!("partition owner ended abnormally: {e}");
            }
        }
    }
}

impl Drop for Owner {
    fn drop(&mut self) {
        // Not stopped: gone as a dead node is, with its leases left to
        // expire. Aborting the coordinator drops its JoinSet, which aborts
        // every partition task.
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

/// A partition this node holds, as the coordinator sees it.
struct Held {
    stop: Option<oneshot::Sender<()>>,
    state: watch::Receiver<PartitionState>,
    /// Its task: an ended task's partition may have been taken again by a
    /// newer one by the time its end is read.
    task: tokio::task::Id,
}

/// How a partition task ended.
#[derive(Debug)]
enum PartitionEnd {
    /// Drained and released (a stop or a handover).
    Released,
    /// Its lease lapsed or was taken over: it delivered nothing after.
    Fenced,
    /// The partition could not be read; the lease was released to be taken
    /// again.
    Failed(ClusterError),
}

/// The Owner's own task: announcement, live set, assignment, and the
/// partition tasks.
async fn coordinate(
    ctx: Shared,
    leases: Leases,
    membership: Membership,
    mut stopped: oneshot::Receiver<()>,
    status: watch::Sender<OwnerStatus>,
) {
    let started = Instant::now();
    let mut announcement: Option<Lease> = None;
    let mut live: Vec<Node> = Vec::new();
    let mut live_changed = started;
    let mut held: BTreeMap<u32, Held> = BTreeMap::new();
    let mut tasks: JoinSet<(u32, PartitionEnd)> = JoinSet::new();
    let mut tick = tokio::time::interval(ctx.renew_every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    ::log::info!(
        "node={} partition owner started: {} partitions, settling {:?}",
        ctx.node_id,
        ctx.log.partitions(),
        ctx.settings.settle
    );
    loop {
        tokio::select! {
            _ = &mut stopped => break,
            Some(joined) = tasks.join_next_with_id() => ended(&ctx, &mut held, joined),
            _ = tick.tick() => {
                // No one takes deliveries any more (the daemon is stopping):
                // hand everything over rather than take partitions again.
                if ctx.deliver.is_closed() {
                    break;
                }
                membership.keep(&mut announcement).await;
                match membership.live_nodes().await {
                    Ok(nodes) if nodes != live => {
                        ::log::info!(
                            "node={} live nodes: {}",
                            ctx.node_id,
                            nodes.iter().map(|n| format!("{}({})", n.id, n.workers)).collect::<Vec<_>>().join(" ")
                        );
                        live = nodes;
                        live_changed = Instant::now();
                    }
                    Ok(_) => {}
                    Err(e) => ::log::warn!("node={} reading the live nodes failed, retrying: {e}", ctx.node_id),
                }
                let announced = announcement.as_ref().is_some_and(Lease::is_valid);
                let now = Instant::now();
                let settled = now >= live_changed + ctx.settings.settle
                    && now >= started + ctx.settings.settle;
                if announced && settled {
                    rebalance(&ctx, &leases, &membership, &live, &mut held, &mut tasks).await;
                }
                publish(&ctx, &status, announced, &live, &held);
            }
        }
    }

    // Stop: withdraw the announcement first, so that the others assign this
    // node's partitions among themselves while it drains them.
    ::log::info!(
        "node={} handing over {} partitions",
        ctx.node_id,
        held.len()
    );
    if let Some(lease) = announcement.take() {
        if let Err(e) = lease.release().await {
            ::log::warn!(
                "node={} withdrawing the announcement failed (it expires): {e}",
                ctx.node_id
            );
        }
    }
    for h in held.values_mut() {
        if let Some(stop) = h.stop.take() {
            let _ = stop.send(());
        }
    }
    let bound = ctx.settings.drain_timeout + ctx.settings.pull_wait + ctx.renew_every * 2;
    let drained = tokio::time::timeout(bound, async {
        while let Some(joined) = tasks.join_next_with_id().await {
            ended(&ctx, &mut held, joined);
        }
    })
    .await;
    if drained.is_err() {
        ::log::warn!(
            "node={} partitions {:?} did not hand over within {bound:?}; their leases expire",
            ctx.node_id,
            held.keys().collect::<Vec<_>>()
        );
    }
    publish(&ctx, &status, false, &[], &BTreeMap::new());
    ::log::info!("node={} partition owner stopped", ctx.node_id);
}

/// A partition task ended: forget it (it is taken again on a later tick if
/// still assigned here).
fn ended(
    ctx: &Shared,
    held: &mut BTreeMap<u32, Held>,
    joined: Result<(tokio::task::Id, (u32, PartitionEnd)), tokio::task::JoinError>,
) {
    let task = match &joined {
        Ok((task, _)) => *task,
        Err(e) => e.id(),
    };
    held.retain(|_, h| h.task != task);
    match joined {
        Ok((_, (partition, end))) => match end {
            PartitionEnd::Released => {
                ::log::info!("node={} partition={partition} handed over", ctx.node_id)
            }
            PartitionEnd::Fenced => ::log::warn!(
                "node={} partition={partition} lease lost; stopped delivering",
                ctx.node_id
            ),
            PartitionEnd::Failed(e) => ::log::warn!(
                "node={} partition={partition} released after an error, retrying: {e}",
                ctx.node_id
            ),
        },
        // A panic in a partition task: the partition is taken again once its
        // lease, not released, expired.
        Err(e) => ::log::error!("node={} partition task failed: {e}", ctx.node_id),
    }
}

/// Takes the free partitions assigned here, hands over the held ones
/// assigned elsewhere.
async fn rebalance(
    ctx: &Shared,
    leases: &Leases,
    membership: &Membership,
    live: &[Node],
    held: &mut BTreeMap<u32, Held>,
    tasks: &mut JoinSet<(u32, PartitionEnd)>,
) {
    let mut weights: Vec<(&str, u32)> = live.iter().map(|n| (n.id.as_str(), n.workers)).collect();
    // Announced but not listed yet (the bucket's copy lags): this node is
    // live by its own announcement.
    if !live.iter().any(|n| n.id == ctx.node_id) {
        weights.push((&ctx.node_id, membership.workers()));
    }
    for (partition, owner) in assign(ctx.log.partitions(), &weights)
        .into_iter()
        .enumerate()
    {
        // `assign` yields one entry per partition number, which is a u32.
        let partition = partition as u32;
        let mine = owner == Some(ctx.node_id.as_str());
        match held.get_mut(&partition) {
            Some(h) if !mine => {
                if let Some(stop) = h.stop.take() {
                    ::log::info!(
                        "node={} partition={partition} moves to {}; handing over",
                        ctx.node_id,
                        owner.unwrap_or("no one")
                    );
                    let _ = stop.send(());
                }
            }
            Some(_) => {}
            None if mine => match leases.try_acquire(&format!("partition.{partition}")).await {
                Ok(Some(lease)) => {
                    ::log::info!(
                        "node={} partition={partition} taken (revision {})",
                        ctx.node_id,
                        lease.revision()
                    );
                    let (stop, stopped) = oneshot::channel();
                    let (state_tx, state) = watch::channel(PartitionState {
                        status: PartitionStatus {
                            partition,
                            revision: lease.revision(),
                            ..PartitionStatus::default()
                        },
                        lease_written: lease.written_at(),
                    });
                    let task = tasks
                        .spawn(own_partition(
                            ctx.clone(),
                            partition,
                            lease,
                            stopped,
                            state_tx,
                        ))
                        .id();
                    held.insert(
                        partition,
                        Held {
                            stop: Some(stop),
                            state,
                            task,
                        },
                    );
                }
                // Still the previous owner's: it hands over or expires.
                Ok(None) => {}
                Err(e) => ::log::warn!(
                    "node={} partition={partition} acquiring failed, retrying: {e}",
                    ctx.node_id
                ),
            },
            None => {}
        }
    }
}

fn publish(
    ctx: &Shared,
    status: &watch::Sender<OwnerStatus>,
    announced: bool,
    live: &[Node],
    held: &BTreeMap<u32, Held>,
) {
    let now = Instant::now();
    let partitions = held
        .values()
        .map(|h| {
            let state = h.state.borrow();
            PartitionStatus {
                lease_age: now.saturating_duration_since(state.lease_written),
                ..state.status.clone()
            }
        })
        .collect();
    status.send_replace(OwnerStatus {
        node_id: ctx.node_id.clone(),
        announced,
        live: live.to_vec(),
        partitions,
    });
}

// ---------------------------------------------------------------------------
// One held partition

/// An update pulled and not yet acknowledged.
struct InHand {
    message: jetstream::Message,
    /// Its receiver is done with it, and acknowledging failed: retried at
    /// each renewal.
    done: bool,
}

/// Opens the partition's durable consumer, creating it on first use.
async fn consumer(
    ctx: &Shared,
    partition: u32,
) -> Result<jetstream::consumer::PullConsumer, ClusterError> {
    let name = format!("partition_{partition}");
    let what = || format!("opening consumer {name} of {}", ctx.log.stream());
    let stream = ctx
        .js
        .get_stream(ctx.log.stream())
        .await
        .map_err(|e| ClusterError::engine(what(), e))?;
    stream
        .get_or_create_consumer(
            &name,
            pull::Config {
                durable_name: Some(name.clone()),
                description: Some("asgigramd partition owner (docs/cluster.md)".into()),
                filter_subject: ctx.log.subject(partition),
                deliver_policy: jetstream::consumer::DeliverPolicy::All,
                ack_policy: jetstream::consumer::AckPolicy::Explicit,
                // One lease TTL: an owner keeps what it holds alive with
                // progress acks at every renewal; a dead owner's updates come
                // back once a successor may hold the partition.
                ack_wait: ctx.ttl,
                max_ack_pending: i64::try_from(ctx.settings.max_ack_pending).unwrap_or(i64::MAX),
                ..Default::default()
            },
        )
        .await
        .map_err(|e| ClusterError::engine(what(), e))
}

/// The next message of the current pull, or never without one (its
/// `select!` branch is disabled then).
async fn next_in(
    batch: &mut Option<pull::Batch>,
) -> Option<Result<jetstream::Message, async_nats::Error>> {
    match batch {
        Some(batch) => batch.next().await,
        None => std::future::pending().await,
    }
}

/// Reads one partition while its lease holds (the module's numbered list).
async fn own_partition(
    ctx: Shared,
    partition: u32,
    mut lease: Lease,
    mut stop: oneshot::Receiver<()>,
    state: watch::Sender<PartitionState>,
) -> (u32, PartitionEnd) {
    let node = ctx.node_id.clone();
    let consumer = match consumer(&ctx, partition).await {
        Ok(consumer) => consumer,
        Err(e) => {
            let _ = lease.release().await;
            return (partition, PartitionEnd::Failed(e));
        }
    };
    // 1. A previous owner's unacknowledged updates: wait until JetStream
    // gives them back, so that they come before anything newer.
    let mut pull_from = Instant::now();
    match consumer.get_info().await {
        Ok(info) if info.num_ack_pending > 0 => {
            ::log::info!(
                "node={node} partition={partition} {} updates unacknowledged by the previous owner; \
                 waiting for their redelivery",
                info.num_ack_pending
            );
            // The consumer's own ack wait, which is the TTL it was created
            // with (a consumer is not changed once created).
            pull_from += info.config.ack_wait + ctx.settings.pull_wait + ctx.renew_every;
            state.send_modify(|s| s.status.awaiting_redelivery = true);
        }
        Ok(_) => {}
        Err(e) => {
            let _ = lease.release().await;
            return (
                partition,
                PartitionEnd::Failed(ClusterError::engine(
                    format!("reading consumer partition_{partition}"),
                    e,
                )),
            );
        }
    }

    let (settled_tx, mut settled_rx) = mpsc::unbounded_channel::<Settled>();
    let fence = FenceGuard(Fence::new(lease.valid_until()));
    let mut in_hand: BTreeMap<u64, InHand> = BTreeMap::new();
    let mut batch: Option<pull::Batch> = None;
    let mut pending: Option<Delivery> = None;
    let mut next_renewal = Instant::now() + ctx.renew_every;
    let mut drain_until: Option<Instant> = None;
    // Acks and renewals wait at most this long, so a NATS server that does
    // not answer delays the loop, never the fencing check, by more.
    let request_timeout = ctx.renew_every;

    loop {
        // 2. Fencing: checked before anything else, every time round.
        if !lease.is_valid() {
            return (partition, PartitionEnd::Fenced);
        }
        let now = Instant::now();
        // 4. Handing over: once nothing is in hand (or the drain timed out).
        if let Some(until) = drain_until {
            let drained = batch.is_none() && pending.is_none() && in_hand.is_empty();
            if drained || now >= until {
                if !drained {
                    ::log::warn!(
                        "node={node} partition={partition} handing over with {} updates \
                         unacknowledged after {:?}; the next owner delivers them again",
                        in_hand.len(),
                        ctx.settings.drain_timeout
                    );
                }
                return match lease.release().await {
                    Ok(()) => (partition, PartitionEnd::Released),
                    // Expired meanwhile: the next owner takes it after the TTL.
                    Err(_) => (partition, PartitionEnd::Fenced),
                };
            }
        }
        // 2. Pull while room under max_ack_pending.
        if drain_until.is_none() && batch.is_none() && pending.is_none() && now >= pull_from {
            let room = ctx.settings.max_ack_pending.saturating_sub(in_hand.len());
            if room > 0 {
                match consumer
                    .batch()
                    .max_messages(room)
                    .expires(ctx.settings.pull_wait)
                    .messages()
                    .await
                {
                    Ok(b) => {
                        batch = Some(b);
                        state.send_modify(|s| s.status.awaiting_redelivery = false);
                    }
                    Err(e) => {
                        ::log::warn!(
                            "node={node} partition={partition} pull failed, retrying: {e}"
                        );
                        pull_from = now + ctx.renew_every;
                    }
                }
            }
        }
        let mut wake = lease.valid_until().min(next_renewal);
        if pull_from > now {
            wake = wake.min(pull_from);
        }
        if let Some(until) = drain_until {
            wake = wake.min(until);
        }

        tokio::select! {
            biased;
            _ = &mut stop, if drain_until.is_none() => {
                drain_until = Some(Instant::now() + ctx.settings.drain_timeout);
                state.send_modify(|s| s.status.handing_over = true);
            }
            Some(settled) = settled_rx.recv() => match settled {
                Settled::Done(sequence) => {
                    // A fence that went down may have dropped this update's
                    // calls: not acknowledged, it comes again to the next owner.
                    if !fence.0.is_up() {
                        return (partition, PartitionEnd::Fenced);
                    }
                    if let Some(h) = in_hand.get_mut(&sequence) {
                        match tokio::time::timeout(request_timeout, h.message.double_ack()).await {
                            Ok(Ok(())) => {
                                in_hand.remove(&sequence);
                            }
                            Ok(Err(e)) => {
                                h.done = true;
                                ::log::warn!("node={node} partition={partition} ack of {sequence} failed, retrying: {e}");
                            }
                            Err(_) => {
                                h.done = true;
                                ::log::warn!("node={node} partition={partition} ack of {sequence} timed out, retrying");
                            }
                        }
                        let n = in_hand.len();
                        state.send_modify(|s| s.status.in_hand = n);
                    }
                }
                Settled::Dropped(sequence) => {
                    if let Some(h) = in_hand.remove(&sequence) {
                        ::log::warn!("node={node} partition={partition} update {sequence} given back undelivered");
                        let _ = h.message.ack_with(AckKind::Nak(None)).await;
                        let n = in_hand.len();
                        state.send_modify(|s| s.status.in_hand = n);
                    }
                }
            },
            permit = ctx.deliver.reserve(), if pending.is_some() => match permit {
                // Checked again at the last moment: the wait for room may
                // have outlasted the lease.
                Ok(permit) if lease.is_valid() => {
                    if let Some(delivery) = pending.take() {
                        let redelivered = delivery.redelivered;
                        permit.send(delivery);
                        state.send_modify(|s| {
                            s.status.delivered += 1;
                            s.status.redelivered += u64::from(redelivered);
                        });
                    }
                }
                Ok(_) => {}
                // The receiver is gone (the daemon is stopping): hand over.
                Err(_) => {
                    pending = None;
                    if drain_until.is_none() {
                        drain_until = Some(Instant::now() + ctx.settings.drain_timeout);
                        state.send_modify(|s| s.status.handing_over = true);
                    }
                }
            },
            item = next_in(&mut batch), if pending.is_none() => match item {
                None => batch = None,
                Some(Err(e)) => {
                    ::log::debug!("node={node} partition={partition} pull ended: {e}");
                    batch = None;
                }
                Some(Ok(message)) => match message.info().map(|i| (i.stream_sequence, i.delivered, i.pending)) {
                    Ok((sequence, delivered, lag)) => {
                        let update = message.payload.clone();
                        let pushed = message
                            .headers
                            .as_ref()
                            .is_some_and(|h| h.get(super::log::PUSHED_HEADER).is_some());
                        in_hand.insert(sequence, InHand { message, done: false });
                        let n = in_hand.len();
                        state.send_modify(|s| {
                            s.status.in_hand = n;
                            s.status.lag = lag;
                        });
                        pending = Some(Delivery {
                            partition,
                            sequence,
                            update,
                            pushed,
                            redelivered: delivered > 1,
                            ack: AckHandle {
                                sequence,
                                tx: settled_tx.clone(),
                                settled: false,
                                fence: fence.0.clone(),
                            },
                        });
                    }
                    Err(e) => ::log::warn!("node={node} partition={partition} a message without JetStream metadata skipped: {e}"),
                },
            },
            () = tokio::time::sleep_until(wake.into()) => {}
        }

        // 3. Renew, keep what is in hand from being redelivered, retry acks.
        if Instant::now() >= next_renewal {
            next_renewal = Instant::now() + ctx.renew_every;
            match tokio::time::timeout(request_timeout, lease.renew()).await {
                Ok(Ok(())) => {
                    if !fence.0.extend(lease.valid_until()) {
                        ::log::warn!(
                            "node={node} partition={partition} lease lapsed by this node's clock \
                             before its renewal came back; giving the partition up"
                        );
                        return (partition, PartitionEnd::Fenced);
                    }
                    state.send_modify(|s| {
                        s.status.revision = lease.revision();
                        s.lease_written = lease.written_at();
                    })
                }
                Ok(Err(ClusterError::Fenced { .. })) => return (partition, PartitionEnd::Fenced),
                Ok(Err(e)) => {
                    ::log::warn!("node={node} partition={partition} renewal failed, retrying: {e}")
                }
                Err(_) => {
                    ::log::warn!("node={node} partition={partition} renewal timed out, retrying")
                }
            }
            if !lease.is_valid() {
                continue;
            }
            let mut acked = Vec::new();
            for (sequence, h) in &in_hand {
                if h.done {
                    if let Ok(Ok(())) =
                        tokio::time::timeout(request_timeout, h.message.double_ack()).await
                    {
                        acked.push(*sequence);
                    }
                } else if let Err(e) = h.message.ack_with(AckKind::Progress).await {
                    ::log::debug!(
                        "node={node} partition={partition} progress of {sequence} not sent: {e}"
                    );
                }
            }
            for sequence in acked {
                in_hand.remove(&sequence);
            }
            let n = in_hand.len();
            state.send_modify(|s| s.status.in_hand = n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// A fence that went down is never raised again by a late renewal:
    /// a call dropped while it was down would otherwise have its update
    /// acknowledged (the whole-cluster fault test lost three replies so).
    #[test]
    fn a_fence_that_went_down_stays_down() {
        let up = Fence::new(Instant::now() + Duration::from_secs(60));
        assert!(up.is_up());
        assert!(up.extend(Instant::now() + Duration::from_secs(120)));
        assert!(up.is_up());

        let lapsed = Fence::new(Instant::now());
        assert!(!lapsed.is_up(), "valid until a moment already past");
        assert!(
            !lapsed.extend(Instant::now() + Duration::from_secs(60)),
            "a renewal that came back after the lapse does not raise it"
        );
        assert!(!lapsed.is_up());

        let ended = Fence::new(Instant::now() + Duration::from_secs(60));
        ended.set(None);
        assert!(!ended.extend(Instant::now() + Duration::from_secs(60)));
        assert!(!ended.is_up());
    }

    fn nodes(ids: &[(&'static str, u32)]) -> Vec<(String, u32)> {
        ids.iter().map(|&(id, w)| (id.to_string(), w)).collect()
    }

    fn counts(owners: &[Option<&str>], ids: &[(String, u32)]) -> Vec<usize> {
        ids.iter()
            .map(|(id, _)| owners.iter().filter(|o| **o == Some(id.as_str())).count())
            .collect()
    }

    #[test]
    fn the_logarithm_is_the_platforms_to_within_rounding() {
        for x in [
            1e-16,
            1e-9,
            0.001,
            0.1,
            0.25,
            0.5,
            0.7,
            std::f64::consts::FRAC_1_SQRT_2,
            0.9,
            0.999_999,
            1.0,
        ] {
            let (ours, std) = (ln(x), f64::ln(x));
            assert!(
                (ours - std).abs() <= 4.0 * f64::EPSILON * std.abs().max(1.0),
                "{x}: {ours} {std}"
            );
        }
    }

    #[test]
    fn the_assignment_is_pinned() {
        // Fixed values: a change here moves partitions of a running cluster
        // when its nodes run two versions during an upgrade.
        let live = nodes(&[("node-a", 1), ("node-b", 1), ("node-c", 1)]);
        let owners = assign(8, &live);
        assert_eq!(owners, PINNED.map(Some).to_vec());
        let weighted = nodes(&[("node-a", 1), ("node-b", 4)]);
        assert_eq!(assign(8, &weighted), PINNED_WEIGHTED.map(Some).to_vec());
        assert_eq!(unit_hash("node-a", 0).to_bits(), PINNED_HASH);
    }

    // As this code computed them when the cluster's assignment was first
    // released; they must never change.
    const PINNED: [&str; 8] = [
        "node-a", "node-b", "node-b", "node-a", "node-c", "node-a", "node-b", "node-c",
    ];
    const PINNED_WEIGHTED: [&str; 8] = [
        "node-b", "node-b", "node-b", "node-a", "node-b", "node-a", "node-b", "node-b",
    ];
    const PINNED_HASH: u64 = 4_605_707_754_355_037_476;

    #[test]
    fn every_node_holds_its_share_by_weight() {
        for partitions in [1, 2, 5, 12, 16, 100, 1024] {
            let live = nodes(&[("node-a", 1), ("node-b", 1), ("node-c", 1)]);
            let seen = counts(&assign(partitions, &live), &live);
            assert_eq!(seen.iter().sum::<usize>(), partitions as usize);
            let (min, max) = (seen.iter().min(), seen.iter().max());
            assert!(
                max.zip(min).is_some_and(|(max, min)| max - min <= 1),
                "{seen:?}"
            );
            let live = nodes(&[("small", 1), ("medium", 2), ("large", 3)]);
            let seen = counts(&assign(partitions, &live), &live);
            assert_eq!(seen.iter().sum::<usize>(), partitions as usize);
            for (n, w) in seen.iter().zip([1, 2, 3]) {
                let exact = f64::from(partitions) * f64::from(w) / 6.0;
                assert!((*n as f64 - exact).abs() < 1.0, "{partitions}: {seen:?}");
            }
        }
    }

    #[test]
    fn no_one_owns_without_weight() {
        assert_eq!(assign::<&str>(2, &[]), vec![None, None]);
        assert_eq!(assign(2, &[("idle", 0)]), vec![None, None]);
        assert_eq!(
            assign(2, &[("idle", 0), ("busy", 1)]),
            vec![Some("busy"); 2]
        );
    }

    /// Partitions whose owner differs.
    fn moved(before: &[Option<&str>], after: &[Option<&str>]) -> usize {
        before.iter().zip(after).filter(|(b, a)| b != a).count()
    }

    proptest! {
        /// The order the nodes are listed in does not matter; every node
        /// holds its share; a node joining takes its share and moves only a
        /// few others (at most its share again and one per node: a share
        /// that shrank gives up its weakest partition), and a node leaving
        /// likewise.
        #[test]
        fn shares_are_exact_and_movement_is_small_and_order_free(
            weights in proptest::collection::vec(1u32..8, 1..6),
            newcomer in 1u32..8,
            partitions in 1u32..200,
        ) {
            let live: Vec<(String, u32)> =
                weights.iter().enumerate().map(|(i, &w)| (format!("node-{i}"), w)).collect();
            let before = assign(partitions, &live);
            prop_assert!(before.iter().all(Option::is_some));
            let mut reversed = live.clone();
            reversed.reverse();
            prop_assert_eq!(&assign(partitions, &reversed), &before);
            let total: u32 = weights.iter().sum();
            for (n, (_, w)) in counts(&before, &live).iter().zip(&live) {
                let exact = f64::from(partitions) * f64::from(*w) / f64::from(total);
                prop_assert!((*n as f64 - exact).abs() < 1.0);
            }

            let mut joined = live.clone();
            joined.push(("newcomer".to_string(), newcomer));
            let after = assign(partitions, &joined);
            let taken = after.iter().filter(|o| **o == Some("newcomer")).count();
            prop_assert!(moved(&before, &after) <= 2 * taken + live.len(),
                "{} moved for {} taken", moved(&before, &after), taken);

            let gone = live[0].0.as_str();
            let given_up = before.iter().filter(|o| **o == Some(gone)).count();
            let left = assign(partitions, &live[1..]);
            if live.len() > 1 {
                prop_assert!(moved(&before, &left) <= 2 * given_up + live.len(),
                    "{} moved for {} given up", moved(&before, &left), given_up);
            }
        }
    }
}
