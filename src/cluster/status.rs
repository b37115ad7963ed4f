//! `asgigramd cluster status`: the whole cluster's view as one node's
//! settings see it, read from the engine, for people and scripts.
//!
//! It only reads: it creates no stream or bucket (one that does not exist
//! yet means the bot's cluster has not started, which is a state to report,
//! not an error), and it takes no lease. Every configured URL is tried on
//! its own connection, so that the output says which servers answer, and
//! the first that answers serves the JetStream requests.
//!
//! The JetStream meta group (its leader, and how current each peer is) is
//! visible only through the system account's `$SYS.REQ.SERVER.PING.JSZ`.
//! A bot's account has it only where the servers' configuration imports
//! that service (docs/cluster.md); otherwise the request has no responders,
//! the peers are those of the stream's and the bucket's replica groups,
//! which are the servers that matter to the bot, and the meta leader is
//! reported as unknown.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{
    self, context::GetStreamErrorKind, stream::LastRawMessageErrorKind, ErrorCode,
};
use futures_util::StreamExt;
use serde::Serialize;

use super::{connect_client, lease, log, ClusterError};
use crate::settings::ClusterSettings;

/// The header in which a KV bucket's delete and purge markers say so.
const KV_OPERATION: &str = "KV-Operation";

/// How long the system account's meta-group request may wait: it answers at
/// once or, from any other account, not at all.
const META_TIMEOUT: Duration = Duration::from_secs(2);

/// The cluster as read by [`read`]. Serialized as `--json` prints it: the
/// keys are stable, absent values are `null`.
#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub bot_id: u64,
    /// Each configured URL, in the configured order.
    pub servers: Vec<ServerProbe>,
    pub jetstream: JetStreamCluster,
    pub stream: StreamStatus,
    pub leases: LeaseBucket,
}

#[derive(Debug, Clone, Serialize)]
pub struct ServerProbe {
    pub url: String,
    pub reached: bool,
    /// The server's name (`server_name`), which the replica groups use.
    pub name: Option<String>,
    pub version: Option<String>,
    /// Why it could not be reached.
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct JetStreamCluster {
    /// The NATS cluster's name, as the server that answered gave it.
    pub name: Option<String>,
    /// `None` unless read from the meta group (see the module's docs).
    pub meta_leader: Option<String>,
    /// Where `peers` comes from: `"meta group"` or `"replica groups"`.
    pub peers_from: &'static str,
    pub peers: Vec<Peer>,
}

/// A server in a RAFT group, as the group's leader sees it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Peer {
    pub name: String,
    /// Leads the group; in the JetStream cluster's peers taken from the
    /// replica groups, leads the stream's or the bucket's.
    pub leader: bool,
    pub current: bool,
    pub offline: bool,
    /// Milliseconds since the leader last heard from it; `None` for the
    /// leader itself.
    pub active_ms: Option<u64>,
    /// Operations it is behind the leader.
    pub lag: Option<u64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct StreamStatus {
    pub name: String,
    pub exists: bool,
    /// From the stream's `asgigram.partitions` metadata.
    pub partitions: Option<u32>,
    pub replicas: Option<usize>,
    pub messages: Option<u64>,
    pub bytes: Option<u64>,
    pub first_sequence: Option<u64>,
    pub last_sequence: Option<u64>,
    pub duplicate_window_s: Option<u64>,
    pub leader: Option<String>,
    /// The leader first, then the other replicas.
    pub peers: Vec<Peer>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LeaseBucket {
    pub name: String,
    pub exists: bool,
    /// `cluster.lease_ttl`, against which `expired` is judged.
    pub ttl_ms: u64,
    /// The bucket's own entry age limit, which decides; a node whose
    /// `cluster.lease_ttl` differs refuses to start.
    pub stored_ttl_ms: Option<u64>,
    pub replicas: Option<usize>,
    pub leases: Vec<LeaseStatus>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LeaseStatus {
    pub key: String,
    /// The node id its value names; `None` if the value is not asgigramd's.
    pub holder: Option<String>,
    pub revision: u64,
    /// Since the entry was written, by this machine's clock against the
    /// server's stamp.
    pub age_ms: u64,
    /// Older than `cluster.lease_ttl`: the server is about to remove it,
    /// and any node may take it.
    pub expired: bool,
}

/// Reads the status of bot `bot_id`'s cluster. Fails only when no server
/// answers or a JetStream request fails.
pub async fn read(settings: &ClusterSettings, bot_id: u64) -> Result<Status, ClusterError> {
    let probes = futures_util::future::join_all(
        settings
            .nats_urls
            .iter()
            .map(|url| connect_client(settings, std::slice::from_ref(url))),
    )
    .await;
    let mut servers = Vec::new();
    let mut client = None;
    let mut first_error = None;
    for (url, probe) in settings.nats_urls.iter().zip(probes) {
        match probe {
            Ok(c) => {
                let info = c.server_info();
                servers.push(ServerProbe {
                    url: url.clone(),
                    reached: true,
                    name: Some(info.server_name),
                    version: Some(info.version),
                    error: None,
                });
                client.get_or_insert(c);
            }
            Err(e) => {
                let reason = match &e {
                    ClusterError::Connect { reason, .. } => reason.clone(),
                    other => other.to_string(),
                };
                servers.push(ServerProbe {
                    url: url.clone(),
                    reached: false,
                    name: None,
                    version: None,
                    error: Some(reason),
                });
                first_error.get_or_insert(e);
            }
        }
    }
    let Some(client) = client else {
        return Err(match first_error {
            // A credentials file that cannot be read is that, not a network
            // failure.
            Some(e @ ClusterError::Credentials { .. }) => e,
            Some(ClusterError::Connect { reason, .. }) => ClusterError::Connect {
                urls: settings.nats_urls.join(","),
                reason,
            },
            Some(other) => other,
            None => ClusterError::Connect {
                urls: String::new(),
                reason: "cluster.nats_urls is empty".into(),
            },
        });
    };
    let cluster_name = client.server_info().cluster;
    let meta = meta_group(&client).await;
    let js = jetstream::new(client);
    let stream = stream_status(&js, bot_id).await?;
    let (leases, bucket_peers) = lease_bucket(&js, bot_id, settings.lease_ttl).await?;
    let jetstream = match meta {
        Some((leader, peers)) => JetStreamCluster {
            name: cluster_name,
            meta_leader: leader,
            peers_from: "meta group",
            peers,
        },
        None => JetStreamCluster {
            name: cluster_name,
            meta_leader: None,
            peers_from: "replica groups",
            peers: merge_groups(&[&stream.peers, &bucket_peers]),
        },
    };
    Ok(Status {
        bot_id,
        servers,
        jetstream,
        stream,
        leases,
    })
}

/// The meta group from the system account's JSZ ping, if this account may
/// send it and a server answers.
async fn meta_group(client: &async_nats::Client) -> Option<(Option<String>, Vec<Peer>)> {
    let reply = tokio::time::timeout(
        META_TIMEOUT,
        client.request("$SYS.REQ.SERVER.PING.JSZ", "{}".into()),
    )
    .await
    .ok()?
    .ok()?;
    meta_from_jsz(&serde_json::from_slice(&reply.payload).ok()?)
}

/// The meta leader and peers in a JSZ answer; `None` if it has no meta
/// group (a server outside a cluster).
fn meta_from_jsz(body: &serde_json::Value) -> Option<(Option<String>, Vec<Peer>)> {
    let meta = &body["data"]["meta_cluster"];
    if !meta.is_object() {
        return None;
    }
    let leader = meta["leader"].as_str().map(str::to_string);
    // The answering server lists the others; it is itself a member, and
    // answering, so current.
    let me = body["server"]["name"].as_str()?.to_string();
    let mut peers = vec![Peer {
        leader: leader.as_deref() == Some(me.as_str()),
        name: me,
        current: true,
        offline: false,
        active_ms: None,
        lag: None,
    }];
    for replica in meta["replicas"].as_array().into_iter().flatten() {
        let Some(name) = replica["name"].as_str() else {
            continue;
        };
        peers.push(Peer {
            name: name.to_string(),
            leader: leader.as_deref() == Some(name),
            current: replica["current"].as_bool().unwrap_or(false),
            offline: replica["offline"].as_bool().unwrap_or(false),
            active_ms: replica["active"].as_u64().map(|ns| ns / 1_000_000),
            lag: replica["lag"].as_u64(),
        });
    }
    peers.sort_by(|a, b| b.leader.cmp(&a.leader).then(a.name.cmp(&b.name)));
    Some((leader, peers))
}

/// The stream and its info, or `None` if JetStream says it does not exist.
async fn stream_info(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<(jetstream::stream::Stream, jetstream::stream::Info)>, ClusterError> {
    match js.get_stream(name).await {
        Ok(mut stream) => {
            let info = stream
                .info()
                .await
                .map_err(|e| ClusterError::engine(format!("reading stream {name}"), e))?
                .clone();
            Ok(Some((stream, info)))
        }
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(js) if js.error_code() == ErrorCode::STREAM_NOT_FOUND => {
                Ok(None)
            }
            _ => Err(ClusterError::engine(format!("reading stream {name}"), e)),
        },
    }
}

/// A RAFT group's members, the leader first.
fn group_peers(cluster: Option<&jetstream::stream::ClusterInfo>) -> Vec<Peer> {
    let Some(cluster) = cluster else {
        return Vec::new();
    };
    let mut peers: Vec<Peer> = cluster
        .leader
        .iter()
        .map(|leader| Peer {
            name: leader.clone(),
            leader: true,
            current: true,
            offline: false,
            active_ms: None,
            lag: None,
        })
        .collect();
    peers.extend(cluster.replicas.iter().map(|r| Peer {
        name: r.name.clone(),
        leader: false,
        current: r.current,
        offline: r.offline,
        active_ms: Some(r.active.as_millis() as u64),
        lag: r.lag,
    }));
    peers
}

/// The servers of several groups: current only where current in every
/// group it is in, the worst lag, leader if it leads any.
fn merge_groups(groups: &[&[Peer]]) -> Vec<Peer> {
    let mut merged: Vec<Peer> = Vec::new();
    for peer in groups.iter().flat_map(|g| g.iter()) {
        match merged.iter_mut().find(|m| m.name == peer.name) {
            Some(m) => {
                m.leader |= peer.leader;
                m.current &= peer.current;
                m.offline |= peer.offline;
                m.active_ms = m.active_ms.max(peer.active_ms);
                m.lag = m.lag.max(peer.lag);
            }
            None => merged.push(peer.clone()),
        }
    }
    merged.sort_by(|a, b| a.name.cmp(&b.name));
    merged
}

async fn stream_status(js: &jetstream::Context, bot_id: u64) -> Result<StreamStatus, ClusterError> {
    let name = log::stream_name(bot_id);
    let Some((_, info)) = stream_info(js, &name).await? else {
        return Ok(StreamStatus {
            name,
            exists: false,
            partitions: None,
            replicas: None,
            messages: None,
            bytes: None,
            first_sequence: None,
            last_sequence: None,
            duplicate_window_s: None,
            leader: None,
            peers: Vec::new(),
        });
    };
    Ok(StreamStatus {
        name,
        exists: true,
        partitions: info
            .config
            .metadata
            .get(log::PARTITIONS_KEY)
            .and_then(|p| p.parse().ok()),
        replicas: Some(info.config.num_replicas),
        messages: Some(info.state.messages),
        bytes: Some(info.state.bytes),
        first_sequence: Some(info.state.first_sequence),
        last_sequence: Some(info.state.last_sequence),
        duplicate_window_s: Some(info.config.duplicate_window.as_secs()),
        leader: info.cluster.as_ref().and_then(|c| c.leader.clone()),
        peers: group_peers(info.cluster.as_ref()),
    })
}

/// The lease bucket's entries, and its replica group for the peers.
async fn lease_bucket(
    js: &jetstream::Context,
    bot_id: u64,
    ttl: Duration,
) -> Result<(LeaseBucket, Vec<Peer>), ClusterError> {
    let name = lease::bucket_name(bot_id);
    let mut bucket = LeaseBucket {
        name: name.clone(),
        exists: false,
        ttl_ms: ttl.as_millis() as u64,
        stored_ttl_ms: None,
        replicas: None,
        leases: Vec::new(),
    };
    let Some((stream, info)) = stream_info(js, &format!("KV_{name}")).await? else {
        return Ok((bucket, Vec::new()));
    };
    bucket.exists = true;
    bucket.stored_ttl_ms = Some(info.config.max_age.as_millis() as u64);
    bucket.replicas = Some(info.config.num_replicas);
    // Listed and read through the stream's leader (its info and its
    // message get), not the bucket's direct get: that is served by the
    // nearest replica, which can lag a lease taken a moment ago, and a
    // status that shows a held lease as free sends an operator looking
    // for a fault that is not there.
    let prefix = format!("$KV.{name}.");
    let what = || format!("listing bucket {name}");
    let mut subjects = stream
        .info_with_subjects(format!("{prefix}>"))
        .await
        .map_err(|e| ClusterError::engine(what(), e))?;
    let mut keys = Vec::new();
    while let Some(subject) = subjects.next().await {
        let (subject, _count) = subject.map_err(|e| ClusterError::engine(what(), e))?;
        if let Some(key) = subject.strip_prefix(&prefix) {
            keys.push(key.to_string());
        }
    }
    keys.sort();
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i128);
    for key in keys {
        let last = match stream
            .get_last_raw_message_by_subject(&format!("{prefix}{key}"))
            .await
        {
            Ok(message) => message,
            // Expired between the listing and the read.
            Err(e) if e.kind() == LastRawMessageErrorKind::NoMessageFound => continue,
            Err(e) => return Err(ClusterError::engine(format!("reading lease {key}"), e)),
        };
        // A release writes a delete marker, which stays the key's last
        // revision until the entry ages out.
        if last
            .headers
            .get(KV_OPERATION)
            .is_some_and(|op| op.as_str() != "PUT")
        {
            continue;
        }
        let created_ms = last.time.unix_timestamp_nanos() / 1_000_000;
        let age_ms = (now_ms - created_ms).max(0) as u64;
        bucket.leases.push(LeaseStatus {
            holder: lease::holder_of(&last.payload),
            key,
            revision: last.sequence,
            age_ms,
            expired: age_ms >= bucket.ttl_ms,
        });
    }
    Ok((bucket, group_peers(info.cluster.as_ref())))
}

/// The human form: a few short tables.
pub fn render(status: &Status) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let dash = |v: Option<String>| v.unwrap_or_else(|| "-".into());
    // Writing to a String cannot fail.
    let _ = writeln!(out, "bot {}", status.bot_id);
    let _ = writeln!(out, "\nNATS servers");
    for s in &status.servers {
        if s.reached {
            let _ = writeln!(
                out,
                "  {:<28} reached  {} (nats-server {})",
                s.url,
                dash(s.name.clone()),
                dash(s.version.clone())
            );
        } else {
            let _ = writeln!(
                out,
                "  {:<28} UNREACHABLE  {}",
                s.url,
                dash(s.error.clone())
            );
        }
    }
    let js = &status.jetstream;
    let _ = writeln!(
        out,
        "\nJetStream cluster {}: meta leader {} (peers from the {})",
        dash(js.name.clone()),
        js.meta_leader
            .clone()
            .unwrap_or_else(|| "unknown (needs the system account)".into()),
        js.peers_from
    );
    render_peers(&mut out, &js.peers);
    let st = &status.stream;
    if st.exists {
        let _ = writeln!(
            out,
            "\nupdate log {}: {} partitions, {} replicas, leader {}",
            st.name,
            dash(st.partitions.map(|p| p.to_string())),
            dash(st.replicas.map(|r| r.to_string())),
            dash(st.leader.clone())
        );
        let _ = writeln!(
            out,
            "  {} messages, {} bytes, sequences {}..{}, duplicate window {} s",
            st.messages.unwrap_or(0),
            st.bytes.unwrap_or(0),
            st.first_sequence.unwrap_or(0),
            st.last_sequence.unwrap_or(0),
            st.duplicate_window_s.unwrap_or(0)
        );
        render_peers(&mut out, &st.peers);
    } else {
        let _ = writeln!(
            out,
            "\nupdate log {}: does not exist yet (the bot's cluster has not started)",
            st.name
        );
    }
    let b = &status.leases;
    if b.exists {
        let _ = writeln!(
            out,
            "\nleases in {} ({} replicas, ttl {} ms): {} held",
            b.name,
            dash(b.replicas.map(|r| r.to_string())),
            b.ttl_ms,
            b.leases.len()
        );
        if let Some(stored) = b.stored_ttl_ms.filter(|&t| t != b.ttl_ms) {
            let _ = writeln!(
                out,
                "  the bucket expires leases after {stored} ms, not cluster.lease_ttl: \
                 a node with these settings refuses to start"
            );
        }
        for l in &b.leases {
            let _ = writeln!(
                out,
                "  {:<16} held by {:<20} revision {:<8} age {} ms{}",
                l.key,
                dash(l.holder.clone()),
                l.revision,
                l.age_ms,
                if l.expired { "  EXPIRED" } else { "" }
            );
        }
    } else {
        let _ = writeln!(
            out,
            "\nleases {}: the bucket does not exist yet (the bot's cluster has not started)",
            b.name
        );
    }
    out
}

fn render_peers(out: &mut String, peers: &[Peer]) {
    use std::fmt::Write;
    for p in peers {
        let state = if p.leader {
            "leader"
        } else if p.offline {
            "OFFLINE"
        } else if p.current {
            "current"
        } else {
            "NOT CURRENT"
        };
        let _ = writeln!(
            out,
            "  {:<12} {:<12} lag {:<6} active {}",
            p.name,
            state,
            p.lag.map_or("-".into(), |l| l.to_string()),
            p.active_ms.map_or("-".into(), |a| format!("{a} ms ago"))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A JSZ answer as nats-server 2.15.1 gave it from an account that
    /// imports the system account's `$SYS.REQ.SERVER.PING.JSZ`, with one of
    /// three servers killed (trimmed to the fields read).
    const JSZ: &str = r#"{"server": {"name": "m0"}, "data": {"meta_cluster": {"name": "meta-test",
        "leader": "m0", "peer": "gY0OD2fs", "replicas": [
        {"name": "m1", "current": true, "active": 552377399, "peer": "GDuFSb67"},
        {"name": "m2", "current": false, "offline": true, "active": 14552264924, "peer": "f7sDjKXP"}],
        "cluster_size": 3}}}"#;

    #[test]
    fn the_meta_group_is_read_from_a_jsz_answer_with_the_answering_server_in_it() {
        let body = serde_json::from_str(JSZ).expect("JSON");
        let (leader, peers) = meta_from_jsz(&body).expect("a meta group");
        assert_eq!(leader.as_deref(), Some("m0"));
        let names: Vec<&str> = peers.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, ["m0", "m1", "m2"]);
        assert!(peers[0].leader && peers[0].current);
        assert_eq!(peers[1].active_ms, Some(552));
        assert!(peers[1].current && !peers[1].offline);
        assert!(!peers[2].current && peers[2].offline);
        assert_eq!(meta_from_jsz(&serde_json::json!({"data": {}})), None);
    }

    fn peer(name: &str, leader: bool, current: bool, lag: Option<u64>) -> Peer {
        Peer {
            name: name.into(),
            leader,
            current,
            offline: false,
            active_ms: Some(1),
            lag,
        }
    }

    #[test]
    fn merged_groups_show_a_server_behind_in_any_group_as_not_current() {
        let stream = [
            peer("n0", true, true, None),
            peer("n1", false, true, Some(0)),
        ];
        let bucket = [
            peer("n1", true, true, None),
            peer("n0", false, false, Some(7)),
        ];
        let merged = merge_groups(&[&stream, &bucket]);
        assert_eq!(merged.len(), 2);
        assert_eq!(merged[0].name, "n0");
        assert!(merged[0].leader && !merged[0].current);
        assert_eq!(merged[0].lag, Some(7));
        assert!(merged[1].leader && merged[1].current);
    }
}
