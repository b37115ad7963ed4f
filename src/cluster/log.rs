//! The update log: one JetStream stream per bot, where an update is stored,
//! replicated, before its offset is confirmed to Telegram.
//!
//! File storage, `cluster.replicas` copies, one subject per partition
//! (`asgigram.<bot id>.updates.<partition>`), and the update's `update_id`
//! as its `Nats-Msg-Id`, so that an update polled twice (a poller died
//! between publishing and confirming) is stored once within the stream's
//! duplicate window. The partition count is stored in the stream's metadata
//! when the stream is created, and a node configured with another count
//! refuses to open it: partitions decide which node owns a chat, and two
//! counts at once would deliver one chat's updates on two nodes.
//!
//! Updates age out after a day, as Telegram's own unfetched updates do.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, context::PublishAckFuture, message::PublishMessage, stream};
use bytes::Bytes;

use super::ClusterError;
use crate::settings::ClusterSettings;

/// The metadata key of the partition count.
pub(crate) const PARTITIONS_KEY: &str = "asgigram.partitions";

/// How long an update stays in the log: Telegram keeps an unfetched update
/// for 24 hours, and a log that outlived that would only grow.
const RETENTION: Duration = Duration::from_secs(24 * 3600);

/// How many times, and how far apart, an update is sent again when the
/// stream could not take it yet ([`send_again`]): storing another copy
/// takes a round trip among the replicas, and a server learns to route a
/// just-created stream's subjects within a second; five seconds in all
/// also cover an election in between, and a stream really missing still
/// fails soon.
const AGAIN_ATTEMPTS: u32 = 50;
const AGAIN_WAIT: Duration = Duration::from_millis(100);

/// Whether a publish was refused in a way that sending it again a moment
/// later can cure, without storing it twice (its `update_id` is its
/// message id): the stream is storing another copy of the same id at this
/// moment (10158, which the client library does not name: two webhook
/// nodes given Telegram's retry at once, a poller and a stale one), or the
/// server reached routes no stream for the subject yet (a stream another
/// node has just created).
fn send_again(e: &jetstream::context::PublishError) -> bool {
    e.kind() == jetstream::context::PublishErrorKind::StreamNotFound
        || super::cause::<jetstream::Error>(e).is_some_and(|js| {
            js.error_code() == jetstream::ErrorCode::STREAM_DUPLICATE_MESSAGE_CONFLICT
        })
}

/// The stream's name for a bot.
pub fn stream_name(bot_id: u64) -> String {
    format!("ASGIGRAM_UPDATES_{bot_id}")
}

/// The bot's update log, opened and checked.
#[derive(Clone)]
pub struct UpdateLog {
    js: jetstream::Context,
    stream: String,
    subject_prefix: String,
    partitions: u32,
}

impl std::fmt::Debug for UpdateLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpdateLog")
            .field("stream", &self.stream)
            .field("partitions", &self.partitions)
            .finish()
    }
}

/// The header naming the revision of the `ingress` lease an update was
/// published under (a later holder's is larger): which holder stored each
/// update, for people reading the stream and for the tests, which check
/// that a stale holder's late publish stored nothing after its successor's.
/// No decision reads it.
pub const LEASE_REVISION_HEADER: &str = "Asgigram-Lease-Revision";

/// The header that marks a pushed event (`POST /v1/chats/{chat_id}/events`)
/// among the updates. Its body is [`crate::push::PushedEvent::encode`]'s
/// without an `update_id`: the event's id is the negative of its stream
/// sequence ([`pushed_id`]), unique in the bot's log for good, and known
/// only once stored.
pub const PUSHED_HEADER: &str = "Asgigram-Pushed";

/// The `update_id` of the pushed event at `sequence` in the log: negative,
/// as on a single node, so that it never meets one of Telegram's.
pub fn pushed_id(sequence: u64) -> i64 {
    // A stream's sequences stay far below 2^63.
    -i64::try_from(sequence).unwrap_or(i64::MAX)
}

/// What a message of the log is: its `Nats-Msg-Id`, and its name in errors.
#[derive(Debug, Clone)]
enum Stored {
    /// A Telegram update, deduplicated by its update_id.
    Update(i64),
    /// A pushed event, deduplicated (a publish sent again) by the id its
    /// node gave it.
    Pushed(String),
}

impl Stored {
    fn message_id(&self) -> String {
        match self {
            Stored::Update(id) => id.to_string(),
            Stored::Pushed(id) => id.clone(),
        }
    }
}

impl std::fmt::Display for Stored {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Stored::Update(id) => write!(f, "update {id}"),
            Stored::Pushed(id) => write!(f, "pushed event {id}"),
        }
    }
}

/// One update to store, for [`UpdateLog::publish_all`].
#[derive(Debug, Clone)]
pub struct Entry {
    pub update_id: i64,
    pub partition: u32,
    /// The update's JSON as Telegram sent it.
    pub update: Bytes,
}

/// Where a published update is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Published {
    /// Its sequence in the stream (the first copy's, for a duplicate).
    pub sequence: u64,
    /// The stream already held this `update_id`; nothing was added.
    pub duplicate: bool,
}

impl UpdateLog {
    /// Opens the bot's stream, creating it on first use; refuses a stream
    /// created with another partition count.
    pub async fn open(
        js: &jetstream::Context,
        bot_id: u64,
        settings: &ClusterSettings,
    ) -> Result<UpdateLog, ClusterError> {
        let name = stream_name(bot_id);
        let subject_prefix = format!("asgigram.{bot_id}.updates");
        let config = stream::Config {
            name: name.clone(),
            description: Some("asgigramd update log (docs/cluster.md)".into()),
            subjects: vec![format!("{subject_prefix}.*")],
            storage: stream::StorageType::File,
            num_replicas: settings.replicas,
            retention: stream::RetentionPolicy::Limits,
            max_age: RETENTION,
            duplicate_window: settings.duplicate_window,
            metadata: HashMap::from([(
                PARTITIONS_KEY.to_string(),
                settings.partitions.to_string(),
            )]),
            ..Default::default()
        };
        let info = super::open_stream(js, config).await?;
        let stored = info.config.metadata.get(PARTITIONS_KEY);
        let Some(stored) = stored.and_then(|p| p.parse::<u32>().ok()) else {
            return Err(ClusterError::engine(
                format!("opening stream {name}"),
                format!(
                    "it has no {PARTITIONS_KEY} metadata: it was not created by asgigramd; \
                     delete or rename it"
                ),
            ));
        };
        if stored != settings.partitions {
            return Err(ClusterError::PartitionsMismatch {
                stream: name,
                stored,
                configured: settings.partitions,
            });
        }
        if info.config.num_replicas != settings.replicas {
            // Safe either way; the operator changes it with `nats stream edit`.
            ::log::warn!(
                "stream={name} has {} replicas, cluster.replicas is {}; the stream's count applies",
                info.config.num_replicas,
                settings.replicas
            );
        }
        Ok(UpdateLog {
            js: js.clone(),
            stream: name,
            subject_prefix,
            partitions: stored,
        })
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn partitions(&self) -> u32 {
        self.partitions
    }

    /// The subject of one partition.
    pub fn subject(&self, partition: u32) -> String {
        format!("{}.{partition}", self.subject_prefix)
    }

    /// Stores an update (its JSON as Telegram sent it) in `partition` and
    /// waits until the stream acknowledged it, that is until a majority of
    /// its replicas hold it.
    pub async fn publish(
        &self,
        update_id: i64,
        partition: u32,
        update: Bytes,
    ) -> Result<Published, ClusterError> {
        self.publish_one(&Stored::Update(update_id), partition, update, None)
            .await
    }

    /// Stores a pushed event for a chat in `partition` (its chat's), marked
    /// with [`PUSHED_HEADER`]; `message_id` is unique to this event (a
    /// publish sent again is stored once). Its id is then
    /// [`pushed_id`]`(sequence)`.
    pub async fn publish_pushed(
        &self,
        message_id: String,
        partition: u32,
        body: Bytes,
    ) -> Result<Published, ClusterError> {
        self.publish_one(&Stored::Pushed(message_id), partition, body, None)
            .await
    }

    /// Stores a batch: sends every update first, then waits for all the
    /// acknowledgements, so a batch costs about one round trip to a majority
    /// rather than one per update. The updates are sent in the batch's
    /// order on one connection, so within a partition they are stored in
    /// that order. `lease_revision` goes with each update in
    /// [`LEASE_REVISION_HEADER`]. An error means some may be stored and
    /// some not: the caller sends the whole batch again, and the stream
    /// drops the copies it has.
    pub async fn publish_all(
        &self,
        batch: Vec<Entry>,
        lease_revision: Option<u64>,
    ) -> Result<Vec<Published>, ClusterError> {
        let mut acks = Vec::with_capacity(batch.len());
        for entry in batch {
            let ack = self
                .send(
                    &Stored::Update(entry.update_id),
                    entry.partition,
                    entry.update.clone(),
                    lease_revision,
                )
                .await?;
            acks.push((entry, ack));
        }
        let mut published = Vec::with_capacity(acks.len());
        for (entry, ack) in acks {
            published.push(match ack.await {
                Ok(ack) => Published {
                    sequence: ack.sequence,
                    duplicate: ack.duplicate,
                },
                Err(e) if send_again(&e) => {
                    self.publish_one(
                        &Stored::Update(entry.update_id),
                        entry.partition,
                        entry.update,
                        lease_revision,
                    )
                    .await?
                }
                Err(e) => return Err(self.store_error(&Stored::Update(entry.update_id), e)),
            });
        }
        Ok(published)
    }

    /// Publishes one update and waits for its acknowledgement, sending it
    /// again while the stream cannot take it yet ([`send_again`]): the
    /// answer to a copy sent again once another is stored is "duplicate".
    async fn publish_one(
        &self,
        stored: &Stored,
        partition: u32,
        update: Bytes,
        lease_revision: Option<u64>,
    ) -> Result<Published, ClusterError> {
        let mut attempts = 0;
        loop {
            let ack = self
                .send(stored, partition, update.clone(), lease_revision)
                .await?;
            match ack.await {
                Ok(ack) => {
                    return Ok(Published {
                        sequence: ack.sequence,
                        duplicate: ack.duplicate,
                    })
                }
                Err(e) if send_again(&e) && attempts < AGAIN_ATTEMPTS => {
                    attempts += 1;
                    tokio::time::sleep(AGAIN_WAIT).await;
                }
                Err(e) => return Err(self.store_error(stored, e)),
            }
        }
    }

    fn store_error(&self, stored: &Stored, e: impl std::fmt::Display) -> ClusterError {
        ClusterError::engine(format!("storing {stored} in {}", self.stream), e)
    }

    async fn send(
        &self,
        stored: &Stored,
        partition: u32,
        update: Bytes,
        lease_revision: Option<u64>,
    ) -> Result<PublishAckFuture, ClusterError> {
        if partition >= self.partitions {
            return Err(ClusterError::engine(
                format!("storing {stored}"),
                format!("partition {partition} of {}", self.partitions),
            ));
        }
        let mut message = PublishMessage::build()
            .payload(update)
            .message_id(stored.message_id())
            // A stream of another name on these subjects is a mistake to
            // report, not a place to store the update.
            .expected_stream(&self.stream);
        if let Some(revision) = lease_revision {
            message = message.header(LEASE_REVISION_HEADER, revision.to_string());
        }
        if let Stored::Pushed(_) = stored {
            message = message.header(PUSHED_HEADER, "1");
        }
        self.js
            .send_publish(self.subject(partition), message)
            .await
            .map_err(|e| ClusterError::engine(format!("storing {stored}"), e))
    }
}
