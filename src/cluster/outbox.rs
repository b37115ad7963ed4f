//! The outbox in the engine: the bot's Bot API calls, stored before they are
//! made, and their answers, kept so that a call is made once however often
//! it is asked for.
//!
//! - The calls stream `ASGIGRAM_CALLS_<bot id>`: file storage,
//!   `cluster.replicas` copies, work-queue retention (a call leaves it once
//!   the sender acknowledged it, after its answer was stored), and the
//!   call's stable id as `Nats-Msg-Id`, so that a call published twice
//!   within `cluster.duplicate_window` (its update redelivered to a new
//!   partition owner, which handles it again) is stored once.
//! - The answers bucket `asgigram_answers_<bot id>`: one entry per call id,
//!   first the sender's *started* mark, written before the call is made,
//!   then its *answer*. Entries expire after [`ANSWER_TTL`]. A node that asks
//!   for a call already answered gets the stored answer and publishes
//!   nothing; the sender, finding a call already answered, acknowledges it
//!   without making it again; finding it only started, it knows the call is
//!   in doubt (see `cluster::sender`).
//!
//! A call's id is what the single node's journal derives from the update
//! and the call's index ([`call_id`]), so the same handling of the same
//! update asks for the same ids on any node.
//!
//! Nodes other than the sender use a [`Requester`]: [`Requester::submit`]
//! stores the call (or finds its answer), [`Pending::answer`] waits for the
//! answer, bounded. Publishing waits for the stream's acknowledgement, so a
//! node's calls are in the stream in the order it submitted them, which is
//! the order the sender makes each chat's calls in.

use std::time::Duration;

use async_nats::jetstream::{self, kv, message::PublishMessage, stream};
use bytes::Bytes;
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::ClusterError;
use crate::actors::call::Outcome;
use crate::settings::ClusterSettings;

/// How long an answer is kept, and a call waits in the stream: as long as
/// the update log keeps an update, since an update still in the log may be
/// handled again and ask for its calls again.
pub const ANSWER_TTL: Duration = Duration::from_secs(24 * 3600);

/// The calls stream's name for a bot.
pub fn stream_name(bot_id: u64) -> String {
    format!("ASGIGRAM_CALLS_{bot_id}")
}

/// The answers bucket's name for a bot.
pub fn answers_bucket(bot_id: u64) -> String {
    format!("asgigram_answers_{bot_id}")
}

/// The id of the `ordinal`-th call made while handling update `update_id`:
/// the same on every node and every time the update is handled.
pub fn call_id(update_id: i64, ordinal: u32) -> String {
    format!("u{update_id}.{ordinal}")
}

/// Whether `id` can name a call: it is a key of the answers bucket, so
/// letters, digits, `-`, `_`, `=` and inner dots only.
fn check_id(id: &str) -> Result<(), ClusterError> {
    let ok = !id.is_empty()
        && id.len() <= 200
        && !id.starts_with('.')
        && !id.ends_with('.')
        && !id.contains("..")
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'=' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(ClusterError::CallId { id: id.to_string() })
    }
}

/// A call as stored in the calls stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredCall {
    pub id: String,
    pub method: String,
    pub params: Map<String, Value>,
}

/// An entry of the answers bucket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "lowercase")]
pub(crate) enum Mark {
    /// The sender holding the lease of this revision is making the call.
    Started { by: u64 },
    /// The call's final outcome: Telegram's `result`, or an error envelope.
    Done { ok: bool, answer: Value },
}

impl Mark {
    pub(crate) fn done(outcome: &Outcome) -> Mark {
        match outcome {
            Outcome::Result(v) => Mark::Done {
                ok: true,
                answer: v.clone(),
            },
            Outcome::Error(v) => Mark::Done {
                ok: false,
                answer: v.clone(),
            },
        }
    }

    fn outcome(self) -> Option<Outcome> {
        match self {
            Mark::Started { .. } => None,
            Mark::Done { ok: true, answer } => Some(Outcome::Result(answer)),
            Mark::Done { ok: false, answer } => Some(Outcome::Error(answer)),
        }
    }

    pub(crate) fn encode(&self) -> Bytes {
        // A Mark is plain data (strings, numbers, JSON values): it always
        // serializes.
        Bytes::from(serde_json::to_vec(self).expect("a Mark serializes"))
    }

    pub(crate) fn decode(bytes: &[u8]) -> Option<Mark> {
        serde_json::from_slice(bytes).ok()
    }
}

/// The bot's outbox: the calls stream and the answers bucket, opened.
#[derive(Clone)]
pub struct Outbox {
    js: jetstream::Context,
    stream: String,
    subject: String,
    answers: kv::Store,
    bucket: String,
}

impl std::fmt::Debug for Outbox {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outbox")
            .field("stream", &self.stream)
            .field("bucket", &self.bucket)
            .finish()
    }
}

impl Outbox {
    /// Opens the bot's calls stream and answers bucket, creating them on
    /// first use. Existing ones are used as they are (the settings that
    /// matter, work-queue retention and the duplicate window, are checked
    /// on the stream).
    pub async fn open(
        js: &jetstream::Context,
        bot_id: u64,
        settings: &ClusterSettings,
    ) -> Result<Outbox, ClusterError> {
        let name = stream_name(bot_id);
        let subject = format!("asgigram.{bot_id}.calls");
        let config = stream::Config {
            name: name.clone(),
            description: Some("asgigramd calls to make (docs/cluster.md)".into()),
            subjects: vec![subject.clone()],
            storage: stream::StorageType::File,
            num_replicas: settings.replicas,
            retention: stream::RetentionPolicy::WorkQueue,
            max_age: ANSWER_TTL,
            duplicate_window: settings.duplicate_window,
            ..Default::default()
        };
        let info = super::open_stream(js, config).await?;
        if info.config.retention != stream::RetentionPolicy::WorkQueue {
            // Without it a call acknowledged stays, and a new sender's
            // consumer, reading from the start, would see it again.
            return Err(ClusterError::engine(
                format!("opening stream {name}"),
                "it does not have work-queue retention: it was not created by asgigramd; \
                 delete or rename it",
            ));
        }
        let bucket = answers_bucket(bot_id);
        let answers = match js.get_key_value(&bucket).await {
            Ok(kv) => kv,
            Err(_) => match js
                .create_key_value(kv::Config {
                    bucket: bucket.clone(),
                    description: "asgigramd answers of calls (docs/cluster.md)".into(),
                    history: 1,
                    max_age: ANSWER_TTL,
                    storage: stream::StorageType::File,
                    num_replicas: settings.replicas,
                    ..Default::default()
                })
                .await
            {
                Ok(kv) => kv,
                // Another node created it first.
                Err(create) => js.get_key_value(&bucket).await.map_err(|_| {
                    ClusterError::engine(format!("creating bucket {bucket}"), create)
                })?,
            },
        };
        Ok(Outbox {
            js: js.clone(),
            stream: name,
            subject,
            answers,
            bucket,
        })
    }

    pub fn stream(&self) -> &str {
        &self.stream
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub(crate) fn context(&self) -> &jetstream::Context {
        &self.js
    }

    pub(crate) fn answers(&self) -> &kv::Store {
        &self.answers
    }

    /// Call `id`'s entry (its mark, and the entry's revision for a write
    /// on condition), read from the bucket's leader: a replica may lag
    /// behind a mark just written, and the sender decides by it whether to
    /// make the call. `None` if the bucket has no entry for it; a removed
    /// mark reads as `None` too.
    pub(crate) async fn mark(&self, id: &str) -> Result<Option<(Mark, u64)>, ClusterError> {
        let entry = self.latest(id, &format!("the answer of call {id}")).await?;
        Ok(entry.and_then(|(payload, sequence)| Mark::decode(&payload).map(|m| (m, sequence))))
    }

    /// The newest value at `key` in the answers bucket and its revision,
    /// read from the bucket's leader (not a replica that may lag). `what`
    /// names it in an error.
    pub(crate) async fn latest(
        &self,
        key: &str,
        what: &str,
    ) -> Result<Option<(Bytes, u64)>, ClusterError> {
        let stream = self
            .js
            .get_stream_no_info(format!("KV_{}", self.bucket))
            .await
            .map_err(|e| ClusterError::engine(format!("opening bucket {}", self.bucket), e))?;
        match stream
            .get_last_raw_message_by_subject(&format!("$KV.{}.{key}", self.bucket))
            .await
        {
            Ok(message) => Ok(Some((message.payload, message.sequence))),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(None),
            Err(e) => Err(ClusterError::engine(format!("reading {what}"), e)),
        }
    }

    /// A [`Requester`] on this outbox.
    pub fn requester(&self) -> Requester {
        Requester {
            outbox: self.clone(),
        }
    }
}

/// How a node asks for calls to be made by the elected sender.
#[derive(Debug, Clone)]
pub struct Requester {
    outbox: Outbox,
}

/// A call stored (or found answered), whose answer is to come.
pub struct Pending {
    id: String,
    state: PendingState,
}

enum PendingState {
    Answered(Outcome),
    Waiting(Box<kv::Watch>),
}

impl std::fmt::Debug for Pending {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pending")
            .field("id", &self.id)
            .field("answered", &matches!(self.state, PendingState::Answered(_)))
            .finish()
    }
}

impl Requester {
    /// Stores call `id` for the sender and returns once the stream holds it
    /// (a majority of its replicas), or at once with the answer where the
    /// bucket already has one. A call already in the stream (the same id
    /// within the duplicate window) is not stored again.
    pub async fn submit(
        &self,
        id: &str,
        method: &str,
        params: Map<String, Value>,
    ) -> Result<Pending, ClusterError> {
        check_id(id)?;
        let answers = &self.outbox.answers;
        // Watching before reading and publishing: an answer written at any
        // moment is seen, the watch replaying the key's current entry first.
        let watch = answers
            .watch_with_history(id)
            .await
            .map_err(|e| ClusterError::engine(format!("watching the answer of call {id}"), e))?;
        // Answered already: asked again after a redelivery. A copy that lags
        // may miss an answer; then the call is published once more, the
        // sender finds the answer and makes no second call, and the watch
        // replays it.
        let stored = answers
            .get(id)
            .await
            .map_err(|e| ClusterError::engine(format!("reading the answer of call {id}"), e))?;
        if let Some(outcome) = stored
            .as_deref()
            .and_then(Mark::decode)
            .and_then(Mark::outcome)
        {
            return Ok(Pending {
                id: id.to_string(),
                state: PendingState::Answered(outcome),
            });
        }
        self.publish(id, method, params).await?;
        Ok(Pending {
            id: id.to_string(),
            state: PendingState::Waiting(Box::new(watch)),
        })
    }

    /// Stores call `id` for the sender, for a caller that does not wait for
    /// its answer: no watch, no read of the answers bucket. A call answered
    /// before is stored again only to be acknowledged by the sender
    /// unmade, and one still in the duplicate window not at all.
    pub async fn store(
        &self,
        id: &str,
        method: &str,
        params: Map<String, Value>,
    ) -> Result<(), ClusterError> {
        check_id(id)?;
        self.publish(id, method, params).await
    }

    /// Publishes the call and waits for the stream's acknowledgement.
    async fn publish(
        &self,
        id: &str,
        method: &str,
        params: Map<String, Value>,
    ) -> Result<(), ClusterError> {
        let call = StoredCall {
            id: id.to_string(),
            method: method.to_string(),
            params,
        };
        // A StoredCall is strings and JSON values: it always serializes.
        let payload = serde_json::to_vec(&call).expect("a StoredCall serializes");
        let limit = self.outbox.js.client().server_info().max_payload;
        if payload.len() > limit {
            return Err(ClusterError::CallTooLarge {
                id: id.to_string(),
                size: payload.len(),
                limit,
            });
        }
        let message = PublishMessage::build()
            .payload(payload.into())
            .message_id(id)
            .expected_stream(&self.outbox.stream);
        let ack = self
            .outbox
            .js
            .send_publish(self.outbox.subject.clone(), message)
            .await
            .map_err(|e| ClusterError::engine(format!("storing call {id}"), e))?;
        ack.await
            .map_err(|e| ClusterError::engine(format!("storing call {id}"), e))?;
        Ok(())
    }

    /// [`Requester::submit`], then [`Pending::answer`].
    pub async fn call(
        &self,
        id: &str,
        method: &str,
        params: Map<String, Value>,
        timeout: Duration,
    ) -> Result<Outcome, ClusterError> {
        self.submit(id, method, params).await?.answer(timeout).await
    }
}

fn decode_entry(entry: &kv::Entry) -> Option<Outcome> {
    if entry.operation != kv::Operation::Put {
        return None;
    }
    Mark::decode(&entry.value).and_then(Mark::outcome)
}

impl Pending {
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Waits up to `timeout` for the call's answer. A timeout leaves the
    /// call in the outbox: it is still made, and asking for it again
    /// (the same id) gets its answer.
    pub async fn answer(self, timeout: Duration) -> Result<Outcome, ClusterError> {
        let id = self.id;
        let mut watch = match self.state {
            PendingState::Answered(outcome) => return Ok(outcome),
            PendingState::Waiting(watch) => watch,
        };
        let wait = async {
            while let Some(entry) = watch.next().await {
                let entry = entry.map_err(|e| {
                    ClusterError::engine(format!("watching the answer of call {id}"), e)
                })?;
                if let Some(outcome) = decode_entry(&entry) {
                    return Ok(outcome);
                }
            }
            Err(ClusterError::engine(
                format!("watching the answer of call {id}"),
                "the watch ended",
            ))
        };
        match tokio::time::timeout(timeout, wait).await {
            Ok(result) => result,
            Err(_) => Err(ClusterError::CallTimeout {
                id: id.clone(),
                after: timeout,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn call_ids_are_stable_and_valid_keys() {
        assert_eq!(call_id(123, 0), "u123.0");
        assert_eq!(call_id(-5, 7), "u-5.7");
        assert!(check_id(&call_id(123, 4)).is_ok());
        for bad in ["", ".a", "a.", "a..b", "a b", "a*", "a>"] {
            assert!(check_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn marks_round_trip_and_only_done_is_an_answer() {
        let started = Mark::Started { by: 9 };
        assert_eq!(Mark::decode(&started.encode()), Some(started.clone()));
        assert_eq!(started.outcome(), None);
        let ok = Mark::done(&Outcome::Result(json!({"message_id": 1})));
        assert_eq!(
            Mark::decode(&ok.encode()).and_then(Mark::outcome),
            Some(Outcome::Result(json!({"message_id": 1})))
        );
        let err = Mark::done(&Outcome::Error(json!({"ok": false, "error_code": 403})));
        assert_eq!(
            Mark::decode(&err.encode()).and_then(Mark::outcome),
            Some(Outcome::Error(json!({"ok": false, "error_code": 403})))
        );
        assert_eq!(Mark::decode(b"not json"), None);
    }
}
