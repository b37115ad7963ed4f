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
        let info = match js.get_stream(&name).await {
            Ok(mut stream) => stream
                .info()
                .await
                .map_err(|e| ClusterError::engine(format!("reading stream {name}"), e))?
                .clone(),
            Err(_) => match js.create_stream(config).await {
                Ok(mut stream) => stream
                    .info()
                    .await
                    .map_err(|e| ClusterError::engine(format!("reading stream {name}"), e))?
                    .clone(),
                // Created meanwhile by another node, perhaps differently: the
                // check below tells.
                Err(create) => js
                    .get_stream(&name)
                    .await
                    .map_err(|_| ClusterError::engine(format!("creating stream {name}"), create))?
                    .info()
                    .await
                    .map_err(|e| ClusterError::engine(format!("reading stream {name}"), e))?
                    .clone(),
            },
        };
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
        let ack = self.send(update_id, partition, update).await?;
        let ack = ack.await.map_err(|e| {
            ClusterError::engine(format!("storing update {update_id} in {}", self.stream), e)
        })?;
        Ok(Published {
            sequence: ack.sequence,
            duplicate: ack.duplicate,
        })
    }

    async fn send(
        &self,
        update_id: i64,
        partition: u32,
        update: Bytes,
    ) -> Result<PublishAckFuture, ClusterError> {
        if partition >= self.partitions {
            return Err(ClusterError::engine(
                format!("storing update {update_id}"),
                format!("partition {partition} of {}", self.partitions),
            ));
        }
        let message = PublishMessage::build()
            .payload(update)
            .message_id(update_id.to_string())
            // A stream of another name on these subjects is a mistake to
            // report, not a place to store the update.
            .expected_stream(&self.stream);
        self.js
            .send_publish(self.subject(partition), message)
            .await
            .map_err(|e| ClusterError::engine(format!("storing update {update_id}"), e))
    }
}
