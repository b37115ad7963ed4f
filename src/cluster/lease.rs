//! Leases: at most one node holds a role (polling, a partition, sending) at a
//! time, through compare-and-set on a JetStream KV bucket.
//!
//! The bucket keeps one revision per key and expires every entry `lease_ttl`
//! after it was written (the bucket's `max_age`), judged by the NATS server
//! that stores it. Acquiring creates the key, which succeeds only where it
//! is absent (never written, expired, or released); renewing rewrites it on
//! condition that its last revision is the one the holder wrote; releasing
//! deletes it on the same condition. So a holder that was taken over from
//! (its entry expired and another created it) can no longer renew: its CAS
//! names a revision that is gone.
//!
//! # The clock argument
//!
//! The holder notes its monotonic clock at `sent`, just before it writes the
//! entry. The server stamps the entry when it stores it, which is after
//! `sent`, and expires it `lease_ttl` after that stamp; no one else can
//! create the key before then. So on the holder's own clock the lease is
//! safely its own until `sent + lease_ttl`, whatever the network delay, and
//! the holder stops acting as holder earlier, at
//! `sent + lease_ttl - lease_ttl / 10` ([`Lease::is_valid`]). The tenth
//! covers clocks that run at different rates (NTP keeps them within a few
//! parts per million; the margin allows 10%) and the JetStream servers' wall
//! clocks disagreeing when the stream's leader changes between the write and
//! the expiry, as long as they agree within that margin, which NTP does by
//! orders of magnitude. It does not cover a process paused between checking
//! [`Lease::is_valid`] and acting: an action under a lease must itself be
//! fenced where it matters (the update log deduplicates by `update_id`, and
//! later stages carry the lease's revision).
//!
//! A renewal whose answer is lost (a timeout) may still have been stored;
//! the next renewal then names a revision that is no longer the last and
//! fails, and the holder counts itself fenced. That costs a takeover after
//! the TTL, never two holders.

use std::future::Future;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::kv::{self, UpdateErrorKind};
use async_nats::jetstream::{self, stream::StorageType};
use bytes::Bytes;

use super::ClusterError;
use crate::settings::ClusterSettings;

/// The leases of one bot, in the bucket `asgigram_leases_<bot id>`.
#[derive(Clone)]
pub struct Leases {
    kv: kv::Store,
    bucket: String,
    node_id: String,
    ttl: Duration,
    renew_every: Duration,
}

impl std::fmt::Debug for Leases {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Leases")
            .field("bucket", &self.bucket)
            .field("node_id", &self.node_id)
            .field("ttl", &self.ttl)
            .finish()
    }
}

/// The bucket's name for a bot.
pub fn bucket_name(bot_id: u64) -> String {
    format!("asgigram_leases_{bot_id}")
}

impl Leases {
    /// Opens the bot's lease bucket, creating it with `cluster.replicas`
    /// copies and `cluster.lease_ttl` as its entries' age limit. A bucket
    /// that expires entries after another time is refused: a node that
    /// believed its lease lasts longer than the server keeps it would act
    /// after another took over.
    pub async fn open(
        js: &jetstream::Context,
        bot_id: u64,
        settings: &ClusterSettings,
    ) -> Result<Leases, ClusterError> {
        let bucket = bucket_name(bot_id);
        let stream_name = format!("KV_{bucket}");
        let stored = match js.get_stream(&stream_name).await {
            Ok(mut stream) => Some(
                stream
                    .info()
                    .await
                    .map_err(|e| ClusterError::engine(format!("reading bucket {bucket}"), e))?
                    .config
                    .max_age,
            ),
            Err(_) => None,
        };
        let kv = match stored {
            Some(max_age) if max_age != settings.lease_ttl => {
                return Err(ClusterError::LeaseTtlMismatch {
                    bucket,
                    stored: max_age,
                    configured: settings.lease_ttl,
                })
            }
            Some(_) => js
                .get_key_value(&bucket)
                .await
                .map_err(|e| ClusterError::engine(format!("opening bucket {bucket}"), e))?,
            None => match js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    description: "asgigramd leases (docs/cluster.md)".into(),
                    history: 1,
                    max_age: settings.lease_ttl,
                    storage: StorageType::File,
                    num_replicas: settings.replicas,
                    ..Default::default()
                })
                .await
            {
                Ok(kv) => kv,
                // Another node created it first, maybe with other settings:
                // open it again through the check above.
                Err(create) => {
                    let mut stream = js.get_stream(&stream_name).await.map_err(|_| {
                        ClusterError::engine(format!("creating bucket {bucket}"), create)
                    })?;
                    let max_age = stream
                        .info()
                        .await
                        .map_err(|e| ClusterError::engine(format!("reading bucket {bucket}"), e))?
                        .config
                        .max_age;
                    if max_age != settings.lease_ttl {
                        return Err(ClusterError::LeaseTtlMismatch {
                            bucket,
                            stored: max_age,
                            configured: settings.lease_ttl,
                        });
                    }
                    js.get_key_value(&bucket)
                        .await
                        .map_err(|e| ClusterError::engine(format!("opening bucket {bucket}"), e))?
                }
            },
        };
        Ok(Leases {
            kv,
            bucket,
            node_id: settings.node_id.clone(),
            ttl: settings.lease_ttl,
            renew_every: settings.lease_renew,
        })
    }

    /// Takes the lease `name` if no one holds it; `None` if someone does.
    pub async fn try_acquire(&self, name: &str) -> Result<Option<Lease>, ClusterError> {
        self.try_acquire_with(name, serde_json::Map::new()).await
    }

    /// [`Leases::try_acquire`], with `extra` fields in the entry's value
    /// beside the node and the time (a node's announcement carries its
    /// worker count this way).
    pub async fn try_acquire_with(
        &self,
        name: &str,
        extra: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Option<Lease>, ClusterError> {
        let value = self.value(extra);
        let sent = Instant::now();
        // Not `kv::Store::create`: when another node creates the key between
        // its conditional write and its read-back, and the read is served by
        // a replica that has not seen that write yet, it reports the lost
        // race as an error. Here every lost compare-and-set is "held".
        let revision = match self.write_if_last(name, &value, 0).await? {
            Some(revision) => revision,
            None => match self.kv.entry(name).await {
                Err(e) => return Err(ClusterError::engine(format!("reading lease {name}"), e)),
                // Released: its delete marker is the last revision.
                Ok(Some(released))
                    if matches!(
                        released.operation,
                        kv::Operation::Delete | kv::Operation::Purge
                    ) =>
                {
                    match self.write_if_last(name, &value, released.revision).await? {
                        Some(revision) => revision,
                        None => return Ok(None),
                    }
                }
                // Held, or written so lately that this copy has not seen it.
                Ok(_) => return Ok(None),
            },
        };
        Ok(Some(Lease {
            kv: self.kv.clone(),
            name: name.to_string(),
            value,
            revision,
            valid_until: valid_until(sent, self.ttl),
            ttl: self.ttl,
            renew_every: self.renew_every,
        }))
    }

    /// Writes `value` on condition that `name`'s last revision is `last`
    /// (0: none); `None` when another write came first.
    async fn write_if_last(
        &self,
        name: &str,
        value: &Bytes,
        last: u64,
    ) -> Result<Option<u64>, ClusterError> {
        let mut tries = 0;
        loop {
            match self.kv.update(name, value.clone(), last).await {
                Ok(revision) => return Ok(Some(revision)),
                Err(e) if lost_race(&e) => return Ok(None),
                // No server stored the write, so trying again cannot write
                // twice.
                Err(e) if no_stream_yet(&e) && tries < NO_STREAM_TRIES => {
                    tries += 1;
                    tokio::time::sleep(NO_STREAM_PAUSE).await;
                }
                Err(e) => return Err(ClusterError::engine(format!("acquiring lease {name}"), e)),
            }
        }
    }

    /// The node holding `name` as the bucket's nearest copy last saw it;
    /// for status only (it may lag, and it decides nothing).
    pub async fn holder(&self, name: &str) -> Result<Option<String>, ClusterError> {
        let entry = self
            .kv
            .entry(name)
            .await
            .map_err(|e| ClusterError::engine(format!("reading lease {name}"), e))?;
        Ok(entry
            .filter(|e| e.operation == kv::Operation::Put)
            .and_then(|e| holder_of(&e.value)))
    }

    /// What a holder writes: who it is and since when (wall clock, for
    /// people reading the bucket; no decision uses them), and `fields` (a
    /// node's announcement: its worker count, which the assignment reads).
    fn value(&self, mut fields: serde_json::Map<String, serde_json::Value>) -> Bytes {
        let since_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        fields.insert("node".into(), self.node_id.clone().into());
        fields.insert("since_ms".into(), since_ms.into());
        Bytes::from(serde_json::Value::Object(fields).to_string())
    }

    /// This node's id, as its leases name it.
    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// How long an entry outlives its last write (the bucket's `max_age`).
    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    /// How often a holder renews (`cluster.lease_renew`).
    pub fn renew_every(&self) -> Duration {
        self.renew_every
    }

    /// The live entries whose key starts with `prefix`, as the bucket's
    /// nearest copy holds them: for listings that decide nothing on their
    /// own (the live nodes; a partition is still taken only by a lease).
    pub(crate) async fn entries(&self, prefix: &str) -> Result<Vec<kv::Entry>, ClusterError> {
        use futures_util::TryStreamExt;
        let what = || format!("listing {prefix}* in bucket {}", self.bucket);
        let keys: Vec<String> = match self.kv.keys().await {
            Ok(keys) => keys
                .try_collect()
                .await
                .map_err(|e| ClusterError::engine(what(), e))?,
            Err(e) => return Err(ClusterError::engine(what(), e)),
        };
        let mut entries = Vec::new();
        for key in keys.into_iter().filter(|k| k.starts_with(prefix)) {
            let entry = self
                .kv
                .entry(key.as_str())
                .await
                .map_err(|e| ClusterError::engine(what(), e))?;
            // Deleted or expired between the listing and the read.
            if let Some(entry) = entry.filter(|e| e.operation == kv::Operation::Put) {
                entries.push(entry);
            }
        }
        Ok(entries)
    }
}

/// The node id a lease entry's value names (what [`Leases::value`] wrote).
pub(crate) fn holder_of(value: &[u8]) -> Option<String> {
    serde_json::from_slice::<serde_json::Value>(value)
        .ok()
        .and_then(|v| v["node"].as_str().map(str::to_string))
}

/// Whether a conditional write failed because the key's last revision was
/// not the one named: someone else wrote it. nats-server answers that with
/// 10071 or, as seen when several nodes write one key at once (2.15.1), with
/// 10164, the same error without the sequence in its text; the client
/// library names only the first.
pub(crate) fn lost_race(e: &kv::UpdateError) -> bool {
    e.kind() == UpdateErrorKind::WrongLastRevision
        || super::cause::<jetstream::Error>(e).is_some_and(|js| {
            js.error_code() == jetstream::ErrorCode::STREAM_WRONG_LAST_SEQUENCE_CONSTANT
        })
}

/// How often, and how far apart, a write that found no stream is tried
/// again: a bucket another node has just created is known to the meta group
/// before every server routes its subjects, and the server this node is
/// connected to answers "no responders" until it does (seen for well under
/// a second on a loopback cluster). Two seconds in all, so that a bucket
/// really missing still fails quickly.
const NO_STREAM_TRIES: u32 = 20;
const NO_STREAM_PAUSE: Duration = Duration::from_millis(100);

/// Whether a write failed because the server it reached routes no stream
/// for the key's subject (yet).
fn no_stream_yet(e: &kv::UpdateError) -> bool {
    super::cause::<jetstream::context::PublishError>(e)
        .is_some_and(|p| p.kind() == jetstream::context::PublishErrorKind::StreamNotFound)
}

/// Until when a lease written at `sent` is safely the writer's (see the
/// module's clock argument).
fn valid_until(sent: Instant, ttl: Duration) -> Instant {
    sent + ttl - ttl / 10
}

/// A lease this node holds, as of its last successful write.
#[derive(Debug)]
pub struct Lease {
    kv: kv::Store,
    name: String,
    value: Bytes,
    revision: u64,
    valid_until: Instant,
    ttl: Duration,
    renew_every: Duration,
}

impl Lease {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The revision of the entry this holder wrote last: a fencing token
    /// (it only grows, and a later holder's is larger).
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Whether this node may still act as the holder. False from shortly
    /// before the entry could expire, whatever the reason renewals failed.
    pub fn is_valid(&self) -> bool {
        Instant::now() < self.valid_until
    }

    pub fn valid_until(&self) -> Instant {
        self.valid_until
    }

    /// When this holder last wrote the entry (acquired or renewed), on its
    /// own clock: the lease's age runs from here.
    pub fn written_at(&self) -> Instant {
        self.valid_until - (self.ttl - self.ttl / 10)
    }

    /// Rewrites the entry on condition that it is still this holder's.
    /// [`ClusterError::Fenced`] if it is not (taken over, or expired); any
    /// other error leaves the lease as it was, to be retried while
    /// [`Lease::is_valid`].
    pub async fn renew(&mut self) -> Result<(), ClusterError> {
        let sent = Instant::now();
        match self
            .kv
            .update(&self.name, self.value.clone(), self.revision)
            .await
        {
            Ok(revision) => {
                self.revision = revision;
                self.valid_until = valid_until(sent, self.ttl);
                Ok(())
            }
            Err(e) if lost_race(&e) => {
                self.valid_until = sent.min(self.valid_until);
                Err(ClusterError::Fenced {
                    name: self.name.clone(),
                })
            }
            Err(e) => Err(ClusterError::engine(
                format!("renewing lease {}", self.name),
                e,
            )),
        }
    }

    /// Gives the lease up at once (a SIGTERM handover), on condition that it
    /// is still this holder's, so that a release never deletes a successor's.
    pub async fn release(self) -> Result<(), ClusterError> {
        match self
            .kv
            .delete_expect_revision(&self.name, Some(self.revision))
            .await
        {
            Ok(()) => Ok(()),
            Err(e) if lost_race(&e) => Err(ClusterError::Fenced { name: self.name }),
            Err(e) => Err(ClusterError::engine(
                format!("releasing lease {}", self.name),
                e,
            )),
        }
    }

    /// Renews every `cluster.lease_renew` until `stop` completes (SIGTERM),
    /// then releases. Returns `Fenced` as soon as the lease is lost; errors
    /// that may pass (a NATS server restarting) are retried at the same pace
    /// for as long as the lease is valid.
    pub async fn hold(mut self, stop: impl Future<Output = ()>) -> Result<(), ClusterError> {
        tokio::pin!(stop);
        loop {
            tokio::select! {
                () = &mut stop => return self.release().await,
                () = tokio::time::sleep(self.renew_every) => {}
            }
            match self.renew().await {
                Ok(()) => {}
                Err(fenced @ ClusterError::Fenced { .. }) => return Err(fenced),
                Err(e) if self.is_valid() => {
                    ::log::warn!("lease={} renewal failed, retrying: {e}", self.name)
                }
                Err(_) => {
                    return Err(ClusterError::Fenced {
                        name: self.name.clone(),
                    })
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::context::{PublishError, PublishErrorKind};

    /// The errors as the client library builds them from a publish's answer.
    fn update_error(kind: PublishErrorKind) -> kv::UpdateError {
        kv::UpdateError::from(PublishError::new(kind))
    }

    #[test]
    fn only_a_write_that_found_no_stream_is_tried_again() {
        assert!(no_stream_yet(&update_error(
            PublishErrorKind::StreamNotFound
        )));
        // A timed-out write may have been stored: not tried blindly.
        for kind in [
            PublishErrorKind::TimedOut,
            PublishErrorKind::WrongLastSequence,
            PublishErrorKind::BrokenPipe,
            PublishErrorKind::Other,
        ] {
            assert!(!no_stream_yet(&update_error(kind)), "{kind:?}");
        }
    }

    #[test]
    fn a_wrong_last_sequence_is_a_lost_race_and_no_stream_is_not() {
        assert!(lost_race(&update_error(
            PublishErrorKind::WrongLastSequence
        )));
        assert!(!lost_race(&update_error(PublishErrorKind::StreamNotFound)));
    }
}
