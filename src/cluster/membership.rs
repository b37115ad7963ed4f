//! Membership: which nodes are live, and how many workers each brings.
//!
//! Each node announces itself with the key `node.<node id>` in the lease
//! bucket, its value naming the node, its worker count and since when, and
//! keeps it as a lease: renewed every `cluster.lease_renew`, expired by the
//! bucket `cluster.lease_ttl` after the last renewal, deleted on a clean
//! stop. The live set is the bucket's `node.*` entries younger than the TTL.
//!
//! The live set decides only where partitions should go
//! ([`super::partitions::assign`]); it never makes a node an owner, a
//! partition's lease does. So a listing that lags behind (a copy of the
//! bucket that has not seen a write yet, clocks that disagree about an
//! entry's age) costs at most a partition taken a tick later, never two
//! owners.

use std::time::{SystemTime, UNIX_EPOCH};

use super::{ClusterError, Lease, Leases};

/// The key prefix of the nodes' announcements.
pub const NODE_PREFIX: &str = "node.";

/// A live node, as its announcement says.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Node {
    pub id: String,
    /// Its worker processes: its weight in the assignment.
    pub workers: u32,
    /// When it announced itself, in milliseconds since the Unix epoch by
    /// its own clock (for people; no decision reads it).
    pub since_ms: u64,
}

/// This node's announcement and the view of everyone's.
#[derive(Debug, Clone)]
pub struct Membership {
    leases: Leases,
    workers: u32,
}

impl Membership {
    /// A node with `workers` worker processes, announcing through `leases`.
    pub fn new(leases: Leases, workers: u32) -> Membership {
        Membership { leases, workers }
    }

    pub fn node_id(&self) -> &str {
        self.leases.node_id()
    }

    pub fn workers(&self) -> u32 {
        self.workers
    }

    /// The key this node announces itself under.
    pub fn key(&self) -> String {
        format!("{NODE_PREFIX}{}", self.leases.node_id())
    }

    /// Announces this node: `None` while an entry of its id is still live,
    /// that of an earlier run of this node (it expires within the TTL) or of
    /// another node given the same id by mistake.
    pub async fn announce(&self) -> Result<Option<Lease>, ClusterError> {
        let mut extra = serde_json::Map::new();
        extra.insert("workers".into(), self.workers.into());
        self.leases.try_acquire_with(&self.key(), extra).await
    }

    /// Keeps `announcement` (from [`Membership::announce`]) current: renews
    /// it, or announces again where it lapsed or was never taken. Errors
    /// that may pass are logged and retried on the next call.
    pub async fn keep(&self, announcement: &mut Option<Lease>) {
        if let Some(lease) = announcement.as_mut() {
            match lease.renew().await {
                Ok(()) => return,
                Err(e) if lease.is_valid() && !matches!(e, ClusterError::Fenced { .. }) => {
                    ::log::warn!(
                        "node={} announcement renewal failed, retrying: {e}",
                        self.node_id()
                    );
                    return;
                }
                Err(e) => {
                    ::log::warn!(
                        "node={} announcement lapsed ({e}); announcing again",
                        self.node_id()
                    );
                    *announcement = None;
                }
            }
        }
        match self.announce().await {
            Ok(Some(lease)) => *announcement = Some(lease),
            Ok(None) => ::log::debug!(
                "node={} an announcement of this id is still live; retrying",
                self.node_id()
            ),
            Err(e) => ::log::warn!("node={} announcing failed, retrying: {e}", self.node_id()),
        }
    }

    /// The live nodes, sorted by id: the `node.*` entries younger than the
    /// TTL by this machine's clock against the server's stamp (the bucket
    /// removes them soon after anyway).
    pub async fn live_nodes(&self) -> Result<Vec<Node>, ClusterError> {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i128);
        let ttl_ms = self.leases.ttl().as_millis() as i128;
        let mut nodes: Vec<Node> = self
            .leases
            .entries(NODE_PREFIX)
            .await?
            .into_iter()
            .filter(|e| now_ms - e.created.unix_timestamp_nanos() / 1_000_000 < ttl_ms)
            .filter_map(|e| parse(&e.key, &e.value))
            .collect();
        nodes.sort();
        nodes.dedup_by(|a, b| a.id == b.id);
        Ok(nodes)
    }
}

/// A node's announcement, where its value is one; another value under
/// `node.` (written by hand) is skipped rather than trusted.
fn parse(key: &str, value: &[u8]) -> Option<Node> {
    let value: serde_json::Value = serde_json::from_slice(value).ok()?;
    let id = value["node"].as_str()?;
    if key.strip_prefix(NODE_PREFIX) != Some(id) {
        return None;
    }
    Some(Node {
        id: id.to_string(),
        workers: value["workers"]
            .as_u64()
            .and_then(|w| u32::try_from(w).ok())?,
        since_ms: value["since_ms"].as_u64().unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_announcement_is_read_back_and_anything_else_is_skipped() {
        let good = br#"{"node":"n-1","workers":4,"since_ms":7}"#;
        assert_eq!(
            parse("node.n-1", good),
            Some(Node {
                id: "n-1".into(),
                workers: 4,
                since_ms: 7
            })
        );
        // Under another node's key, without a worker count, not JSON.
        assert_eq!(parse("node.n-2", good), None);
        assert_eq!(parse("node.n-1", br#"{"node":"n-1"}"#), None);
        assert_eq!(parse("node.n-1", b"n-1"), None);
    }
}
