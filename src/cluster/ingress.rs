//! Ingress in cluster mode: exactly one node polls `getUpdates`, the holder
//! of the `ingress` lease, and stores every batch in the update log before
//! confirming it to Telegram (docs/cluster.md, "Ingress under a lease").
//!
//! Owns: its contention for the lease, the lease while held and its
//! renewals, the offset of the next getUpdates, the backoff after a failure.
//! Takes: the `stop` future given to [`Ingress::run`].
//! Sends: each batch to the [`UpdateLog`]; its [`IngressStatus`] to whoever
//! watches it ([`Ingress::status`]).
//! Stops: when `stop` completes (releasing the lease, so another node takes
//! over at once), or when Telegram rejects the token.
//!
//! 1. Every node contends: it tries to take the lease every
//!    `cluster.lease_renew` until it holds it.
//! 2. The holder renews the lease every `cluster.lease_renew`, beside
//!    polling; each renewal moves the time until which the lease is surely
//!    its own (the lease's clock argument).
//! 3. Taking the lease, it polls from what Telegram still holds (no
//!    offset): Telegram keeps every unconfirmed update, and the log holds
//!    every confirmed one.
//! 4. Each batch is put in update_id order (as the Poller does), each
//!    update given its partition by scope key, and the whole batch
//!    published; only once every update is acknowledged does the offset
//!    move past the batch, so the next getUpdates confirms only what a
//!    majority of the log's replicas hold. A failed store is retried after
//!    the Poller's backoff by fetching again from the same offset: Telegram
//!    answers the same updates, and the log drops those it already has.
//! 5. An element of the batch that is not an update is logged, counted and
//!    skipped as the Poller does it, and the offset moves past its id when
//!    it has one: what no node could decode must not stall polling. An
//!    update of an unknown kind, or one without a chat or user, is an update
//!    all the same and is stored (in partition 0, see
//!    [`super::partition_of_update`]).
//! 6. The lease is checked before each getUpdates (which confirms the
//!    previous batch) and before each publish, and every wait under it
//!    (the long poll, the publish, a backoff) ends the moment the lease
//!    stops being valid by this node's clock: the node stops at once,
//!    fenced, and contends again. What it had fetched and not confirmed
//!    Telegram gives to the next holder. A stale holder's publish still
//!    buffered in its connection holds only such unconfirmed updates, which
//!    the successor publishes too, from the same offset and in the same id
//!    order: the first copy of each to reach the stream is stored, so
//!    nothing is stored twice and a chat's order holds. Each update carries
//!    the lease's revision ([`super::log::LEASE_REVISION_HEADER`]).
//! 7. 429, 409, 5xx and no answer: the Poller's waits and log lines. 401:
//!    the lease is released and `run` returns [`ClusterError::TokenRejected`].
//! 8. On stop, a publish under way is finished, what was stored is
//!    confirmed (a getUpdates that waits for nothing, while the lease is
//!    valid), and the lease is released: the next holder takes over at
//!    once and starts after the last stored update.

use std::future::Future;
use std::pin::Pin;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::FutureExt;
use tokio::sync::{oneshot, watch};

use super::log::{Entry, UpdateLog};
use super::{partition_of_update, ClusterError, Lease, Leases};
use crate::actors::poller::{
    after_failure, in_id_order_as, take_batch_as, AfterFailure, PollParams, BACKOFF,
};
use crate::settings::{ClusterSettings, TelegramSettings};
use crate::telegram::{Bot, Update};

/// The lease's key in the bot's lease bucket.
pub const LEASE: &str = "ingress";

/// What an [`Ingress`] is doing, for `/readyz` and `/metrics`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IngressStatus {
    /// This node holds the `ingress` lease and polls.
    pub holding: bool,
    /// When it took the lease it holds (`None` when it holds none).
    pub held_since: Option<Instant>,
    /// The revision of the lease entry it wrote last, while holding.
    pub lease_revision: Option<u64>,
    /// Batches stored and confirmed since start, under any lease.
    pub batches: u64,
    /// Updates the log stored new from those batches.
    pub stored: u64,
    /// Updates the log already had (fetched again after a takeover or a
    /// failed store).
    pub duplicates: u64,
    /// The offset of the last getUpdates sent under a lease: everything
    /// below it is in the log, and confirmed to Telegram by that call.
    pub last_offset: Option<i64>,
    /// Times this node took the lease.
    pub acquired: u64,
    /// Batches fetched under a lease that ran out before they were stored
    /// (rule 6): left unconfirmed, for the next holder to fetch.
    pub abandoned: u64,
}

impl IngressStatus {
    /// How long this node has held the lease, while it does.
    pub fn lease_age(&self) -> Option<Duration> {
        self.held_since.map(|since| since.elapsed())
    }
}

/// How holding the lease ended.
enum Held {
    /// `stop` completed.
    Stopped,
    /// The lease stopped being valid (taken over, or not renewed in time).
    Fenced,
    TokenRejected,
}

/// The lease as the poller sees it: until when it is surely this node's,
/// and its revision, as of the last renewal.
#[derive(Debug, Clone, Copy)]
struct Validity {
    until: Instant,
    revision: u64,
}

/// The `stop` future of [`Ingress::run`], boxed so it can be awaited in
/// several places.
type Stop<'a> = Pin<Box<dyn Future<Output = ()> + 'a>>;

/// Polls under the `ingress` lease; see the module's rules.
pub struct Ingress {
    bot: Bot,
    leases: Leases,
    log: UpdateLog,
    poll: PollParams,
    renew_every: Duration,
    status: watch::Sender<IngressStatus>,
}

impl std::fmt::Debug for Ingress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The Bot's own Debug redacts the token; the rest names no secret.
        f.debug_struct("Ingress")
            .field("bot", &self.bot)
            .field("leases", &self.leases)
            .field("log", &self.log)
            .finish()
    }
}

impl Ingress {
    pub fn new(
        bot: Bot,
        leases: Leases,
        log: UpdateLog,
        telegram: &TelegramSettings,
        cluster: &ClusterSettings,
    ) -> Ingress {
        Ingress {
            bot,
            leases,
            log,
            poll: PollParams::new(telegram),
            renew_every: cluster.lease_renew,
            status: watch::Sender::new(IngressStatus::default()),
        }
    }

    /// Its status, updated as it changes.
    pub fn status(&self) -> watch::Receiver<IngressStatus> {
        self.status.subscribe()
    }

    /// Contends for the lease and polls while holding it (rules 1 to 8),
    /// until `stop` completes or Telegram rejects the token. It runs on the
    /// actix System's thread, as the Poller does (the Bot's connection pool
    /// is that thread's).
    pub async fn run(self, stop: impl Future<Output = ()>) -> Result<(), ClusterError> {
        let mut stop: Stop<'_> = Box::pin(stop);
        let mut failures = 0u32;
        loop {
            // Not raced against `stop`: an acquisition cancelled after the
            // server stored it would hold the lease, unreleased, for a TTL.
            if stop.as_mut().now_or_never().is_some() {
                return Ok(());
            }
            let wait = match self.leases.try_acquire(LEASE).await {
                Ok(Some(lease)) => {
                    failures = 0;
                    match self.hold(lease, &mut stop).await {
                        Held::Stopped => return Ok(()),
                        Held::TokenRejected => return Err(ClusterError::TokenRejected),
                        Held::Fenced => continue,
                    }
                }
                Ok(None) => self.renew_every,
                Err(e) => {
                    let delay = BACKOFF.delay(failures);
                    failures = failures.saturating_add(1);
                    log::warn!(
                        "lease={LEASE} cannot be contended for: {e}; trying again in {:.1}s",
                        delay.as_secs_f64()
                    );
                    delay
                }
            };
            tokio::select! {
                () = stop.as_mut() => return Ok(()),
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// Holds `lease`: renews it beside polling until polling ends, then
    /// releases it unless it was lost.
    async fn hold(&self, lease: Lease, stop: &mut Stop<'_>) -> Held {
        let revision = lease.revision();
        log::info!("lease={LEASE} taken (revision={revision}); this node polls getUpdates");
        self.status.send_modify(|s| {
            s.holding = true;
            s.held_since = Some(Instant::now());
            s.lease_revision = Some(revision);
            s.acquired += 1;
        });
        let (validity, valid) = watch::channel(Validity {
            until: lease.valid_until(),
            revision,
        });
        let (release, released) = oneshot::channel();
        let renewing = keep_renewed(lease, self.renew_every, validity, released, &self.status);
        let polling = async {
            let held = self.poll_while_valid(valid, stop).await;
            // Not holding from here, even while a renewal under way (with a
            // server that does not answer) has yet to time out.
            self.status.send_modify(|s| {
                s.holding = false;
                s.held_since = None;
                s.lease_revision = None;
            });
            // A renewal that already ended (fenced) no longer listens.
            let _ = release.send(());
            held
        };
        let (held, ()) = tokio::join!(polling, renewing);
        match held {
            Held::Fenced => {
                log::warn!("lease={LEASE} lost (fenced); polling stopped, contending again")
            }
            Held::Stopped => log::info!("lease={LEASE} released; polling stopped"),
            Held::TokenRejected => {
                log::info!("lease={LEASE} released after the token was rejected")
            }
        }
        held
    }

    /// Rules 3 to 7: polls, stores, confirms, for as long as the lease is
    /// valid and `stop` has not completed; on stop, confirms what it stored.
    async fn poll_while_valid(
        &self,
        mut valid: watch::Receiver<Validity>,
        stop: &mut Stop<'_>,
    ) -> Held {
        let mut offset: Option<i64> = None;
        let held = self.poll_until_done(&mut valid, stop, &mut offset).await;
        if matches!(held, Held::Stopped) {
            self.confirm(offset, &mut valid).await;
        }
        held
    }

    /// Tells Telegram, on a graceful stop, that everything below `offset`
    /// is stored, so the next holder does not fetch the last batch again:
    /// a getUpdates that waits for nothing, whose answer stays unconfirmed
    /// for the next holder. Only while the lease is valid; a failure costs
    /// only that the next holder fetches the batch again, and the log drops
    /// it.
    async fn confirm(&self, offset: Option<i64>, valid: &mut watch::Receiver<Validity>) {
        if offset.is_none() || !is_valid(valid) {
            return;
        }
        let mut params = self.poll.params(offset);
        params["timeout"] = 0.into();
        params["limit"] = 1.into();
        self.status.send_modify(|s| s.last_offset = offset);
        tokio::select! {
            biased;
            () = lost(valid) => {}
            answer = self.bot.get_updates(&params, self.bot.http_timeout()) => {
                if let Err(e) = answer {
                    log::warn!("getUpdates: the last batch could not be confirmed on stop ({e}); the next poller fetches it again");
                }
            }
        }
    }

    async fn poll_until_done(
        &self,
        valid: &mut watch::Receiver<Validity>,
        stop: &mut Stop<'_>,
        offset: &mut Option<i64>,
    ) -> Held {
        let mut failures = 0u32;
        loop {
            if !is_valid(valid) {
                return Held::Fenced;
            }
            let params = self.poll.params(*offset);
            self.status.send_modify(|s| s.last_offset = *offset);
            let answer = tokio::select! {
                biased;
                () = stop.as_mut() => return Held::Stopped,
                () = lost(valid) => return Held::Fenced,
                answer = self.bot.get_updates(&params, self.poll.deadline(&self.bot)) => answer,
            };
            let wait = match answer {
                Ok(items) => {
                    failures = 0;
                    let mut next = *offset;
                    let mut updates = take_batch_as(module_path!(), &mut next, items);
                    in_id_order_as(module_path!(), &mut updates);
                    if updates.is_empty() {
                        *offset = next;
                        continue;
                    }
                    if !is_valid(valid) {
                        self.status.send_modify(|s| s.abandoned += 1);
                        return Held::Fenced;
                    }
                    let count = updates.len();
                    let revision = valid.borrow().revision;
                    let batch = self.entries(&updates);
                    // Not raced against `stop`: a batch half stored is
                    // stored whole first, and confirmed on stop.
                    let stored = tokio::select! {
                        biased;
                        () = lost(valid) => {
                            self.status.send_modify(|s| s.abandoned += 1);
                            return Held::Fenced;
                        }
                        stored = self.log.publish_all(batch, Some(revision)) => stored,
                    };
                    match stored {
                        Ok(published) => {
                            let duplicates = published.iter().filter(|p| p.duplicate).count();
                            self.status.send_modify(|s| {
                                s.batches += 1;
                                s.stored += (count - duplicates) as u64;
                                s.duplicates += duplicates as u64;
                            });
                            if duplicates > 0 {
                                log::info!(
                                    "update log: {duplicates} of {count} update(s) were stored already (fetched again); dropped as duplicates"
                                );
                            }
                            *offset = next;
                            continue;
                        }
                        Err(e) => {
                            let delay = BACKOFF.delay(failures);
                            failures = failures.saturating_add(1);
                            log::error!(
                                "update log: cannot store {count} update(s): {e}; they stay unconfirmed, fetching them again in {:.1}s",
                                delay.as_secs_f64()
                            );
                            delay
                        }
                    }
                }
                Err(e) => match after_failure(module_path!(), &e, failures) {
                    AfterFailure::Retry(delay) => {
                        failures = failures.saturating_add(1);
                        delay
                    }
                    AfterFailure::TokenRejected => return Held::TokenRejected,
                },
            };
            tokio::select! {
                biased;
                () = stop.as_mut() => return Held::Stopped,
                () = lost(valid) => return Held::Fenced,
                () = tokio::time::sleep(wait) => {}
            }
        }
    }

    /// The batch as the log stores it, each update in its scope's partition.
    fn entries(&self, updates: &[Update]) -> Vec<Entry> {
        updates
            .iter()
            .map(|update| Entry {
                update_id: update.id.0,
                partition: partition_of_update(update, self.log.partitions()),
                update: Bytes::copy_from_slice(update.json().as_bytes()),
            })
            .collect()
    }
}

/// Rule 2: renews `lease` every `every` and tells the poller until when it
/// is valid, until `release` fires (then releases it) or the lease is lost.
async fn keep_renewed(
    mut lease: Lease,
    every: Duration,
    validity: watch::Sender<Validity>,
    release: oneshot::Receiver<()>,
    status: &watch::Sender<IngressStatus>,
) {
    tokio::pin!(release);
    loop {
        tokio::select! {
            _ = &mut release => {
                match lease.release().await {
                    Ok(()) | Err(ClusterError::Fenced { .. }) => {}
                    // It expires after the TTL all the same; the next
                    // holder only waits longer.
                    Err(e) => log::warn!("lease={LEASE} not released: {e}; it expires by itself"),
                }
                return;
            }
            () = tokio::time::sleep(every) => {}
        }
        match lease.renew().await {
            Ok(()) => {
                validity.send_replace(Validity {
                    until: lease.valid_until(),
                    revision: lease.revision(),
                });
                status.send_modify(|s| s.lease_revision = Some(lease.revision()));
            }
            Err(ClusterError::Fenced { .. }) => break,
            Err(e) if lease.is_valid() => {
                log::warn!("lease={LEASE} renewal failed, retrying: {e}")
            }
            Err(e) => {
                log::warn!("lease={LEASE} renewal failed and the lease ran out: {e}");
                break;
            }
        }
    }
    // Lost: the poller stops at once rather than at the old deadline.
    validity.send_modify(|v| v.until = v.until.min(Instant::now()));
    // The poller ends on the change; wait for its release signal so the
    // join in `hold` completes (the lease is not released: it is not ours).
    let _ = release.await;
}

fn is_valid(valid: &watch::Receiver<Validity>) -> bool {
    Instant::now() < valid.borrow().until
}

/// Completes once the lease stops being valid by this node's clock.
async fn lost(valid: &mut watch::Receiver<Validity>) {
    loop {
        let until = valid.borrow_and_update().until;
        if Instant::now() >= until {
            return;
        }
        tokio::select! {
            () = tokio::time::sleep_until(until.into()) => {}
            changed = valid.changed() => {
                if changed.is_err() {
                    // No more renewals: valid until the last one said.
                    tokio::time::sleep_until(valid.borrow().until.into()).await;
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn validity(until: Instant) -> Validity {
        Validity { until, revision: 1 }
    }

    #[actix_rt::test]
    async fn the_lease_is_lost_when_it_runs_out_and_at_once_when_fenced() {
        let start = Instant::now();
        let (tx, mut rx) = watch::channel(validity(start + Duration::from_millis(200)));
        assert!(is_valid(&rx));
        lost(&mut rx).await;
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert!(!is_valid(&rx));

        // A renewal moves the end; a fencing moves it to now, waking the
        // wait at once rather than at the old end.
        tx.send_replace(validity(Instant::now() + Duration::from_secs(3600)));
        assert!(is_valid(&rx));
        let renewed = tx.clone();
        let fence = async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            renewed.send_modify(|v| v.until = Instant::now());
        };
        let waited = Instant::now();
        tokio::join!(lost(&mut rx), fence);
        assert!(waited.elapsed() < Duration::from_secs(3600));
        assert!(!is_valid(&rx));

        // Renewals ended: valid until the last one said, then lost.
        let (tx, mut rx) = watch::channel(validity(Instant::now() + Duration::from_millis(100)));
        drop(tx);
        lost(&mut rx).await;
        assert!(!is_valid(&rx));
    }

    #[test]
    fn the_status_has_a_lease_age_only_while_holding() {
        let mut status = IngressStatus::default();
        assert_eq!(status.lease_age(), None);
        status.held_since = Some(Instant::now());
        assert!(status.lease_age().is_some());
    }
}
