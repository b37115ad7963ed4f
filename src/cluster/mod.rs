//! Cluster mode's foundation on NATS JetStream (docs/cluster.md): the
//! connection, the [`lease`] primitive, the bot's [`log`] of updates, the
//! [`ingress`] that fills it under the `ingress` lease, the live nodes
//! ([`membership`]), the [`partitions`]' owners, the [`outbox`] of its
//! calls and the elected [`sender`] that makes them.
//!
//! Not yet wired into `run`: a daemon configured with `[cluster]` refuses to
//! start (see `main.rs`) rather than run as a single node unannounced. Every
//! name in the engine comes from the bot's numeric id, never from its token,
//! so that `nats stream ls` and the servers' logs show nothing secret.

pub mod api;
pub mod ingress;
pub mod lease;
pub mod log;
pub mod membership;
pub mod node;
pub mod outbox;
pub mod partitions;
pub mod relay;
pub mod sender;
pub mod status;

use std::time::Duration;

use crate::routing::ScopeKey;
use crate::settings::{BotToken, ClusterSettings, NatsAuth};
use crate::telegram::Update;

pub use ingress::{Ingress, IngressStatus};
pub use lease::{Lease, Leases};
pub use log::{Entry, Published, UpdateLog};
pub use membership::{Membership, Node};
pub use outbox::{Outbox, Pending, Requester};
pub use partitions::{
    assign, AckHandle, Delivery, Owner, OwnerSettings, OwnerStatus, PartitionStatus,
};
pub use sender::{BotExecutor, ElectedSender, Executor, SenderStatus};

/// How long connecting to the first server may take before start-up fails:
/// long enough for a TLS handshake across a data centre, short enough that a
/// wrong URL shows at once.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// Why something in cluster mode failed. Messages name the NATS object or
/// setting at fault, never a secret.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    #[error("cannot connect to NATS at {urls}: {reason}")]
    Connect { urls: String, reason: String },
    #[error("cannot read cluster.credentials_file {path}: {reason}")]
    Credentials {
        path: std::path::PathBuf,
        reason: String,
    },
    #[error("the bot token has no numeric bot id before its ':' to name the cluster's streams by")]
    BotId,
    /// A JetStream request failed or was refused (`what` says which).
    #[error("JetStream: {what}: {reason}")]
    Engine { what: String, reason: String },
    #[error(
        "the update log {stream} was created with {stored} partitions, but cluster.partitions is \
         {configured}: set cluster.partitions = {stored}, or, to change the count, stop every \
         node, let them finish, and delete the stream (nats stream rm {stream})"
    )]
    PartitionsMismatch {
        stream: String,
        stored: u32,
        configured: u32,
    },
    #[error(
        "the lease bucket {bucket} expires leases after {stored:?}, but cluster.lease_ttl is \
         {configured:?}: set cluster.lease_ttl to match, or, to change it, stop every node and \
         delete the bucket (nats kv rm {bucket}; it holds only leases)"
    )]
    LeaseTtlMismatch {
        bucket: String,
        stored: Duration,
        configured: Duration,
    },
    /// The lease was taken over or released: whatever the holder did under it
    /// must stop.
    #[error("lease {name} is no longer held by this node (fenced)")]
    Fenced { name: String },
    /// A call's id cannot name it in the engine (it is a key of the
    /// answers bucket).
    #[error("call id {id:?} is not usable: letters, digits, '-', '_', '=' and inner dots only")]
    CallId { id: String },
    /// The call, as stored, is larger than the NATS servers take in one
    /// message (their `max_payload`): it can never be stored.
    #[error(
        "call {id} is {size} bytes as stored, more than the NATS servers' max_payload of {limit} \
         bytes; it is not made (raise max_payload on the servers for calls this large)"
    )]
    CallTooLarge {
        id: String,
        size: usize,
        limit: usize,
    },
    /// No answer to the call within the time the caller allowed; the call
    /// stays in the outbox and asking again with its id gets its answer.
    #[error("call {id}: no answer from the sender within {after:?}")]
    CallTimeout { id: String, after: Duration },
    /// Telegram rejected the bot token (401): polling cannot go on on any
    /// node; the operator replaces the token.
    #[error("getUpdates: the bot token was rejected by Telegram (401 Unauthorized)")]
    TokenRejected,
}

impl ClusterError {
    fn engine(what: impl Into<String>, reason: impl std::fmt::Display) -> ClusterError {
        ClusterError::Engine {
            what: what.into(),
            reason: reason.to_string(),
        }
    }
}

/// The first error of type `T` among `e`'s sources: the client library
/// wraps the server's answer (its JetStream error code) in errors of its
/// own, some of which name no kind for it.
pub(crate) fn cause<'a, T: std::error::Error + 'static>(
    e: &'a (dyn std::error::Error + 'static),
) -> Option<&'a T> {
    let mut source = e.source();
    while let Some(c) = source {
        if let Some(t) = c.downcast_ref::<T>() {
            return Some(t);
        }
        source = c.source();
    }
    None
}

/// The stream `config` names, created with `config` on first use, or as it
/// already is: the caller checks what matters in the answer, since another
/// node may have created it first, perhaps with other settings.
pub(crate) async fn open_stream(
    js: &async_nats::jetstream::Context,
    config: async_nats::jetstream::stream::Config,
) -> Result<async_nats::jetstream::stream::Info, ClusterError> {
    let name = config.name.clone();
    let reading = |e| ClusterError::engine(format!("reading stream {name}"), e);
    let mut stream = match js.get_stream(&name).await {
        Ok(stream) => stream,
        Err(_) => match js.create_stream(config).await {
            Ok(stream) => stream,
            // Created meanwhile by another node.
            Err(create) => js
                .get_stream(&name)
                .await
                .map_err(|_| ClusterError::engine(format!("creating stream {name}"), create))?,
        },
    };
    Ok(stream.info().await.map_err(reading)?.clone())
}

/// The bot's numeric id: the part of its token before the ':'.
pub fn bot_id(token: &BotToken) -> Result<u64, ClusterError> {
    token
        .expose()
        .split_once(':')
        .and_then(|(id, _)| id.parse().ok())
        .ok_or(ClusterError::BotId)
}

/// Connects to the configured NATS servers with the configured credentials
/// and TLS, and returns the JetStream context on that connection. It runs on
/// the calling tokio runtime (actix's, in the daemon).
pub async fn connect(
    settings: &ClusterSettings,
) -> Result<async_nats::jetstream::Context, ClusterError> {
    let client = connect_client(settings, &settings.nats_urls).await?;
    Ok(async_nats::jetstream::new(client))
}

/// Connects to `urls` (all or some of `cluster.nats_urls`) with the
/// configured name, credentials and TLS.
pub(crate) async fn connect_client(
    settings: &ClusterSettings,
    urls: &[String],
) -> Result<async_nats::Client, ClusterError> {
    let mut options = async_nats::ConnectOptions::new()
        .name(format!("asgigramd {}", settings.node_id))
        .connection_timeout(CONNECT_TIMEOUT)
        .event_callback(|event| async move {
            match event {
                async_nats::Event::Connected => ::log::info!("NATS connected"),
                // The client reconnects on its own; JetStream requests wait or
                // time out meanwhile and their callers decide.
                other => ::log::warn!("NATS {other}"),
            }
        });
    options = match &settings.auth {
        NatsAuth::None => options,
        NatsAuth::CredentialsFile(path) => {
            options
                .credentials_file(path)
                .await
                .map_err(|e| ClusterError::Credentials {
                    path: path.clone(),
                    reason: e.to_string(),
                })?
        }
        NatsAuth::UserPassword { user, password } => {
            options.user_and_password(user.clone(), password.expose().to_string())
        }
        NatsAuth::Token(token) => options.token(token.expose().to_string()),
    };
    if let Some(ca) = &settings.ca_file {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    let joined = urls.join(",");
    let servers = urls
        .iter()
        .map(|url| url.parse::<async_nats::ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ClusterError::Connect {
            urls: joined.clone(),
            reason: e.to_string(),
        })?;
    options
        .connect(servers)
        .await
        .map_err(|e| ClusterError::Connect {
            urls: joined,
            reason: e.to_string(),
        })
}

/// The partition a scope's updates go to: a stable hash of the scope key,
/// the same on every node and in every version (FNV-1a over the key's text
/// form; the std and foldhash hashers are seeded per process or may change).
pub fn partition_of(key: &ScopeKey, partitions: u32) -> u32 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for byte in key.to_string().bytes() {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0100_0000_01b3);
    }
    // `partitions` is at least 1 (settings), so the remainder fits in u32.
    (hash % u64::from(partitions.max(1))) as u32
}

/// The partition an update goes to: its scope's ([`partition_of`]), or 0
/// for an update that routes to no scope (no chat or user, a kind without
/// an object). Such an update belongs to no chat whose order it could
/// break, and a fixed partition keeps it stored rather than dropped, so
/// that whoever owns that partition decides about it as the single node
/// does (logs and skips it).
pub fn partition_of_update(update: &Update, partitions: u32) -> u32 {
    match crate::routing::route(update) {
        Ok(route) => partition_of(&route.key, partitions),
        Err(_) => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bot_id_is_the_tokens_number_and_the_token_is_never_in_the_error() {
        assert_eq!(bot_id(&BotToken::new("4242:SECRET")).unwrap(), 4242);
        let err = bot_id(&BotToken::new("SECRET")).unwrap_err().to_string();
        assert!(!err.contains("SECRET"), "{err}");
        assert!(bot_id(&BotToken::new("x1:SECRET")).is_err());
    }

    #[test]
    fn partitions_are_stable_and_spread() {
        // Fixed values: a change of hash would move every chat to another
        // partition of a running cluster's existing stream.
        assert_eq!(
            partition_of(&ScopeKey::chat(42), 16),
            partition_of(&ScopeKey::chat(42), 16)
        );
        let fixed: Vec<u32> = [1, 2, 3, -100]
            .iter()
            .map(|&c| partition_of(&ScopeKey::chat(c), 16))
            .collect();
        assert_eq!(fixed, FIXED_PARTITIONS);
        let mut seen = [0usize; 8];
        for chat in 0..8000 {
            seen[partition_of(&ScopeKey::chat(chat), 8) as usize] += 1;
        }
        assert!(seen.iter().all(|&n| (700..1300).contains(&n)), "{seen:?}");
        assert_eq!(partition_of(&ScopeKey::User { id: 5 }, 1), 0);
    }

    #[test]
    fn an_update_goes_to_its_chats_partition_and_one_without_a_scope_to_0() {
        let update = |v: serde_json::Value| Update::from_value(v).expect("an update");
        let chat = update(serde_json::json!({"update_id": 1, "message": {"chat": {"id": 2}}}));
        assert_eq!(partition_of_update(&chat, 16), FIXED_PARTITIONS[1]);
        let strange = update(serde_json::json!({"update_id": 2, "new_kind": {"x": 1}}));
        assert_eq!(partition_of_update(&strange, 16), 0);
        let bare = update(serde_json::json!({"update_id": 3}));
        assert_eq!(partition_of_update(&bare, 16), 0);
    }

    // FNV-1a 64 of "chat:1", "chat:2", "chat:3", "chat:-100", modulo 16, as
    // computed independently of this code.
    const FIXED_PARTITIONS: [u32; 4] = [6, 3, 0, 9];
}
