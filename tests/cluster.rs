//! Cluster mode's foundation against a real three-node NATS JetStream
//! cluster on loopback (tests/common/nats.rs): leases (one holder at a time,
//! takeover after the TTL, fencing of a stale holder, release), the update
//! log (deduplication by update_id, surviving `kill -9` of a NATS server),
//! the partition count's check, and `asgigramd cluster status` run as a
//! binary against all of that.
//!
//! Deadlines are generous; the only timing bound asserted is the issue's
//! "within the lease time plus a margin".

mod common;
#[macro_use]
#[path = "common/nats.rs"]
mod nats;

use std::time::{Duration, Instant};

use asgigramd::cluster::{self, ClusterError, Leases, UpdateLog};
use asgigramd::settings::{ClusterSettings, NatsAuth};
use bytes::Bytes;
use nats::NatsCluster;

/// The bot of the tests' token "4242:SECRET-token_for-tests".
const BOT: u64 = 4242;

/// The tests' lease TTL and renewal interval: short, for quick takeovers,
/// with renewals far enough apart that a loaded machine keeps up.
const TTL: Duration = Duration::from_secs(5);
const RENEW: Duration = Duration::from_secs(1);

/// Slack over the lease TTL for a takeover: a loaded CI machine, the
/// server's expiry timer, the contender's polling.
const TAKEOVER_MARGIN: Duration = Duration::from_secs(10);

fn settings(nats: &NatsCluster, node: &str) -> ClusterSettings {
    ClusterSettings {
        nats_urls: nats.urls(),
        auth: NatsAuth::None,
        ca_file: None,
        node_id: node.to_string(),
        partitions: 4,
        replicas: 3,
        lease_ttl: TTL,
        lease_renew: RENEW,
        duplicate_window: Duration::from_secs(120),
    }
}

async fn leases(nats: &NatsCluster, node: &str) -> Leases {
    let s = settings(nats, node);
    let js = cluster::connect(&s).await.expect("connects to NATS");
    Leases::open(&js, BOT, &s)
        .await
        .expect("lease bucket opens")
}

async fn log(s: &ClusterSettings) -> Result<UpdateLog, ClusterError> {
    let js = cluster::connect(s).await.expect("connects to NATS");
    UpdateLog::open(&js, BOT, s).await
}

/// A client of its own, to look at the stream as an operator would.
async fn stream_info(url: &str, name: &str) -> async_nats::jetstream::stream::Info {
    let client = async_nats::connect(url).await.expect("connects");
    let js = async_nats::jetstream::new(client);
    js.get_stream(name)
        .await
        .expect("stream exists")
        .info()
        .await
        .expect("stream info")
        .clone()
}

/// Rounds of the all-at-once race, enough to lose some by a hair.
const RACE_ROUNDS: usize = 25;

/// Every contender tries for `name` at once; exactly one gets it and no one
/// gets an error. The winner's index and lease.
async fn race(contenders: &[Leases], name: &str) -> (usize, cluster::Lease) {
    let tries = contenders.iter().map(|l| l.try_acquire(name));
    let results = futures_util::future::join_all(tries).await;
    let mut held: Vec<_> = results
        .into_iter()
        .enumerate()
        .filter_map(|(i, r)| {
            r.unwrap_or_else(|e| panic!("node-{i} acquiring {name} answers: {e:?}"))
                .map(|lease| (i, lease))
        })
        .collect();
    assert_eq!(held.len(), 1, "exactly one contender holds {name}");
    held.pop().expect("one holder, as just asserted")
}

/// Waits until `reader`'s nearest copy of the bucket names `node` as the
/// holder of `name`. Reads are served by any replica (direct get), so one
/// that has not applied the latest write yet may name no one for a moment;
/// a wrong holder stays wrong, and fails here.
async fn holder_becomes(reader: &Leases, name: &str, node: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let holder = reader.holder(name).await.expect("the bucket answers");
        if holder.as_deref() == Some(node) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name} is held by {holder:?}, not {node}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[actix_rt::test]
async fn one_holder_at_a_time_among_contenders() {
    let nats = cluster_or_skip!("one_holder_at_a_time_among_contenders");
    let mut contenders = Vec::new();
    for i in 0..5 {
        contenders.push(leases(&nats, &format!("node-{i}")).await);
    }
    // All at once, each on its own connection, over and over: a contender
    // that loses the race by a hair reads the key back from a replica that
    // may not have the winner's write yet, and must still answer "held".
    for round in 0..RACE_ROUNDS {
        let name = format!("race.{round}");
        let (_, lease) = race(&contenders, &name).await;
        // A released lease is raced for again the same way.
        lease.release().await.expect("the holder releases");
        race(&contenders, &name).await;
    }
    let (winner, mut lease) = race(&contenders, "ingress").await;
    holder_becomes(&contenders[0], "ingress", &format!("node-{winner}")).await;
    // Renewed, it stays the winner's for longer than the TTL, however often
    // the others try.
    let end = Instant::now() + TTL * 2;
    let mut next_renewal = Instant::now();
    while Instant::now() < end {
        if Instant::now() >= next_renewal {
            lease.renew().await.expect("the holder renews");
            next_renewal = Instant::now() + RENEW;
        }
        for (i, other) in contenders.iter().enumerate().filter(|&(i, _)| i != winner) {
            let got = other
                .try_acquire("ingress")
                .await
                .expect("acquiring answers");
            assert!(got.is_none(), "node-{i} took a lease node-{winner} renews");
        }
        assert!(lease.is_valid());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Other names are independent leases.
    assert!(contenders[(winner + 1) % 5]
        .try_acquire("partition.0")
        .await
        .unwrap()
        .is_some());
}

/// Fresh buckets raced for: enough that a server still without a route to
/// a just-created bucket shows up.
const FRESH_BUCKETS: u64 = 15;

#[actix_rt::test]
async fn a_lease_is_taken_through_any_server_the_moment_another_node_created_its_bucket() {
    let nats = cluster_or_skip!("a_lease_is_taken_through_any_server_the_moment");
    // One connection to each server, as three nodes spread over them.
    let mut nodes = Vec::new();
    for i in 0..3 {
        let s = ClusterSettings {
            nats_urls: vec![nats.url(i)],
            ..settings(&nats, &format!("node-{i}"))
        };
        let js = cluster::connect(&s).await.expect("connects to NATS");
        nodes.push((js, s));
    }
    for round in 0..FRESH_BUCKETS {
        // A bot of its own per round, so every round starts with no bucket.
        let bot = 5000 + round;
        let creator = (round % 3) as usize;
        let (js, s) = &nodes[creator];
        Leases::open(js, bot, s)
            .await
            .expect("the creator opens the bucket");
        // The others open it and take a lease at once, each through its own
        // server, which may not route the new bucket's subjects yet.
        let mut contenders = Vec::new();
        for (i, (js, s)) in nodes.iter().enumerate() {
            if i != creator {
                contenders.push(Leases::open(js, bot, s).await.expect("the bucket opens"));
            }
        }
        race(&contenders, "ingress").await;
    }
}

#[actix_rt::test]
async fn takeover_after_the_holder_stops_renewing_and_the_stale_holder_is_fenced() {
    let nats = cluster_or_skip!("takeover_after_the_holder_stops_renewing");
    let a = leases(&nats, "node-a").await;
    let b = leases(&nats, "node-b").await;
    // Before the request: the server's stamp, from which the TTL runs, is
    // later than this.
    let stopped = Instant::now();
    let mut stale = a.try_acquire("ingress").await.unwrap().expect("free lease");
    let first_revision = stale.revision();
    // node-a stops renewing (paused, partitioned, dead); node-b keeps trying.
    let ttl = TTL;
    let mut taken = None;
    while stopped.elapsed() < ttl + TAKEOVER_MARGIN {
        if let Some(lease) = b.try_acquire("ingress").await.expect("acquiring answers") {
            // Fencing: node-a had stopped counting itself the holder before
            // node-b could take over.
            assert!(!stale.is_valid(), "two holders at once");
            taken = Some(lease);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut fresh = taken.unwrap_or_else(|| {
        panic!(
            "no takeover within {:?}\n{}",
            ttl + TAKEOVER_MARGIN,
            nats.logs()
        )
    });
    assert!(
        stopped.elapsed() >= ttl - ttl / 10,
        "taken over after {:?}, before the holder's lease could have lapsed",
        stopped.elapsed()
    );
    assert!(fresh.revision() > first_revision, "revisions only grow");
    holder_becomes(&a, "ingress", "node-b").await;

    // The stale holder's compare-and-set fails, and its release leaves the
    // successor's lease alone.
    match stale.renew().await {
        Err(ClusterError::Fenced { name }) => assert_eq!(name, "ingress"),
        other => panic!("a stale holder renewed: {other:?}"),
    }
    assert!(!stale.is_valid());
    assert!(
        stale.release().await.is_err(),
        "a stale release went through"
    );
    holder_becomes(&a, "ingress", "node-b").await;
    fresh.renew().await.expect("the new holder renews");
    assert!(a.try_acquire("ingress").await.unwrap().is_none());
}

#[actix_rt::test]
async fn a_held_lease_is_renewed_until_stop_then_released_for_the_next_at_once() {
    let nats = cluster_or_skip!("a_held_lease_is_renewed_until_stop");
    let a = leases(&nats, "node-a").await;
    let b = leases(&nats, "node-b").await;
    let lease = a.try_acquire("sender").await.unwrap().expect("free lease");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let holding = tokio::spawn(lease.hold(async {
        let _ = stopped.await;
    }));
    // Held well past the TTL by the renewals alone.
    let until = Instant::now() + TTL * 2;
    while Instant::now() < until {
        assert!(b.try_acquire("sender").await.unwrap().is_none());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // SIGTERM's handover: released, so the next takes it before any TTL.
    stop.send(()).expect("the holder is running");
    holding
        .await
        .expect("the holding task ends")
        .expect("released cleanly");
    let lease = b.try_acquire("sender").await.unwrap();
    assert!(lease.is_some(), "the released lease was not free at once");
}

#[actix_rt::test]
async fn the_same_update_id_published_twice_is_stored_once() {
    let nats = cluster_or_skip!("the_same_update_id_published_twice_is_stored_once");
    let s = settings(&nats, "node-a");
    let log = log(&s).await.expect("the update log opens");
    assert_eq!(log.stream(), "ASGIGRAM_UPDATES_4242", "named by the bot id");
    assert_eq!(log.partitions(), 4);
    let update = |id: i64| Bytes::from(format!("{{\"update_id\":{id}}}"));
    let first = log.publish(7, 1, update(7)).await.expect("stored");
    assert!(!first.duplicate);
    // Polled again by a poller that died before confirming: the same id.
    let again = log.publish(7, 1, update(7)).await.expect("acknowledged");
    assert!(again.duplicate, "the second copy was stored");
    assert_eq!(again.sequence, first.sequence);
    let other = log.publish(8, 2, update(8)).await.expect("stored");
    assert!(!other.duplicate);
    assert!(other.sequence > first.sequence);
    // Another node publishing the same update is deduplicated as well.
    let peer = self::log(&settings(&nats, "node-b")).await.unwrap();
    assert!(peer.publish(8, 2, update(8)).await.unwrap().duplicate);

    let info = stream_info(&nats.url(2), log.stream()).await;
    assert_eq!(info.state.messages, 2);
    assert_eq!(info.config.num_replicas, 3);
    assert_eq!(
        info.config.storage,
        async_nats::jetstream::stream::StorageType::File
    );
    assert_eq!(info.config.duplicate_window, Duration::from_secs(120));
    assert_eq!(info.config.subjects, vec!["asgigram.4242.updates.*"]);
    assert!(
        log.publish(9, 4, update(9)).await.is_err(),
        "partition 4 of 4"
    );
}

/// Publishes until acknowledged: a NATS server going away makes single
/// publishes fail until the stream has a leader again, and deduplication
/// makes the retry safe.
async fn publish_until_acked(log: &UpdateLog, id: i64) {
    let end = Instant::now() + nats::NATS_DEADLINE;
    loop {
        let partition = (id % 4) as u32;
        match log
            .publish(
                id,
                partition,
                Bytes::from(format!("{{\"update_id\":{id}}}")),
            )
            .await
        {
            Ok(_) => return,
            Err(e) if Instant::now() < end => {
                eprintln!("update {id}: {e}; retrying");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!(
                "update {id} not stored within {:?}: {e}",
                nats::NATS_DEADLINE
            ),
        }
    }
}

#[actix_rt::test]
async fn publishing_survives_kill_9_of_one_nats_server_and_the_server_catches_up() {
    let mut nats = cluster_or_skip!("publishing_survives_kill_9_of_one_nats_server");
    let s = settings(&nats, "node-a");
    let log = log(&s).await.expect("the update log opens");
    for id in 1..=100 {
        publish_until_acked(&log, id).await;
    }
    // Whichever server leads the stream or holds the client's connection,
    // losing one of three keeps a majority of the replicas.
    for victim in [0, 1] {
        nats.kill(victim);
        let base = 100 + victim as i64 * 100;
        for id in base + 1..=base + 100 {
            publish_until_acked(&log, id).await;
        }
        nats.restart(victim);
        // Back: it rejoins and holds every update again, current with the
        // leader, before the next server is killed.
        let end = Instant::now() + nats::NATS_DEADLINE;
        loop {
            let info = stream_info(&nats.url((victim + 2) % 3), log.stream()).await;
            let cluster = info.cluster.clone().unwrap_or_default();
            let current = cluster.replicas.iter().filter(|r| r.current).count();
            if info.state.messages == base as u64 + 100 && current == 2 && cluster.leader.is_some()
            {
                break;
            }
            assert!(
                Instant::now() < end,
                "server {victim} did not catch up: {} messages, {current} current replicas\n{}",
                info.state.messages,
                nats.logs()
            );
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
    // Retries stored nothing twice, and nothing was lost.
    let info = stream_info(&nats.url(2), log.stream()).await;
    assert_eq!(info.state.messages, 300);
    assert_eq!(info.state.last_sequence, 300);
}

#[actix_rt::test]
async fn a_partition_count_or_lease_ttl_other_than_the_engines_is_refused() {
    let nats = cluster_or_skip!("a_partition_count_other_than_the_streams_is_refused");
    let s = settings(&nats, "node-a");
    log(&s).await.expect("created with 4 partitions");
    let mut eight = settings(&nats, "node-b");
    eight.partitions = 8;
    match log(&eight).await {
        Err(e @ ClusterError::PartitionsMismatch { .. }) => {
            let text = e.to_string();
            assert!(text.contains("set cluster.partitions = 4"), "{text}");
            assert!(text.contains("ASGIGRAM_UPDATES_4242"), "{text}");
        }
        other => panic!("another partition count was accepted: {other:?}"),
    }
    // The stream is untouched by the refused node.
    let info = stream_info(&nats.url(0), "ASGIGRAM_UPDATES_4242").await;
    assert_eq!(
        info.config
            .metadata
            .get("asgigram.partitions")
            .map(String::as_str),
        Some("4")
    );
    assert!(log(&settings(&nats, "node-c")).await.is_ok());

    let js = cluster::connect(&s).await.unwrap();
    Leases::open(&js, BOT, &s).await.expect("bucket created");
    let mut longer = settings(&nats, "node-b");
    longer.lease_ttl = Duration::from_secs(30);
    match Leases::open(&js, BOT, &longer).await {
        Err(e @ ClusterError::LeaseTtlMismatch { .. }) => {
            assert!(e.to_string().contains("cluster.lease_ttl"), "{e}")
        }
        other => panic!("another lease TTL was accepted: {other:?}"),
    }
}

/// A node that cannot reach NATS at start stops with one clear error line
/// naming the URLs and exit 1, before any worker starts: it never runs as
/// a single node beside a cluster. Needs no NATS server.
#[test]
fn a_node_that_cannot_reach_nats_stops_with_one_clear_line_and_no_secret() {
    let config = format!(
        "[telegram]\ntoken = \"{}\"\napi_url = \"http://127.0.0.1:9\"\n\n[app]\napplication = \"echo3:app\"\napp_dir = \"{}\"\n",
        common::TOKEN,
        common::apps_dir().display()
    );
    let mut daemon = common::Daemon::start(
        &config,
        &[
            (
                "ASGIGRAM_CLUSTER__NATS_URLS",
                "nats://127.0.0.1:9,nats://127.0.0.1:10",
            ),
            ("ASGIGRAM_CLUSTER__USER", "bot"),
            ("ASGIGRAM_CLUSTER__PASSWORD", "SECRET-nats-password"),
        ],
    );
    let status = daemon.wait_exit();
    let log = daemon.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let errors: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("ERROR") || l.starts_with("asgigramd: error"))
        .collect();
    assert_eq!(errors.len(), 1, "{log}");
    assert!(errors[0].contains("cannot connect to NATS"), "{log}");
    assert!(errors[0].contains("nats://127.0.0.1:9"), "{log}");
    assert!(log.contains("starting as cluster node"), "{log}");
    assert!(!log.contains("SECRET"), "a secret in the log: {log}");
    assert!(!log.contains("worker="), "workers started: {log}");
}

/// The daemon's settings for `cluster status`: a config file with the
/// tests' token, and `[cluster]` from the environment as an operator would
/// give it.
struct StatusConfig {
    _dir: tempfile::TempDir,
    file: std::path::PathBuf,
}

fn status_config() -> StatusConfig {
    let dir = tempfile::tempdir().expect("temp dir");
    let file = dir.path().join("asgigram.toml");
    std::fs::write(
        &file,
        format!(
            "[telegram]\ntoken = \"{}\"\n\n[app]\napplication = \"echo3:app\"\napp_dir = \"{}\"\n",
            common::TOKEN,
            common::apps_dir().display()
        ),
    )
    .expect("config written");
    StatusConfig { _dir: dir, file }
}

/// Runs `asgigramd cluster status` (with `extra` arguments) against
/// `urls`, returning its exit code, stdout and stderr.
async fn cluster_status(
    config: &StatusConfig,
    urls: &[String],
    extra: &[&str],
) -> (Option<i32>, String, String) {
    let output = tokio::process::Command::new(common::binary())
        .args(["cluster", "status", "--config"])
        .arg(&config.file)
        .args(extra)
        .env("ASGIGRAM_CLUSTER__NATS_URLS", urls.join(","))
        .env("ASGIGRAM_CLUSTER__NODE_ID", "operator")
        .env("ASGIGRAM_CLUSTER__LEASE_TTL", TTL.as_secs().to_string())
        .env("ASGIGRAM_CLUSTER__LEASE_RENEW", RENEW.as_secs().to_string())
        .env("ASGIGRAM_CLUSTER__USER", "bot")
        .env("ASGIGRAM_CLUSTER__PASSWORD", "SECRET-nats-password")
        .kill_on_drop(true)
        .output()
        .await
        .expect("the binary runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !stdout.contains("SECRET") && !stderr.contains("SECRET"),
        "a secret in the output: {stdout}{stderr}"
    );
    (output.status.code(), stdout, stderr)
}

/// Whether a status JSON shows the update log's group missing a current
/// replica: one behind, offline, or gone from the group.
fn a_replica_is_not_current(status: &serde_json::Value) -> bool {
    let peers = status["stream"]["peers"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    peers.len() < 3
        || peers.iter().any(|p| {
            p["current"] == serde_json::Value::Bool(false)
                || p["offline"] == serde_json::Value::Bool(true)
        })
}

#[actix_rt::test]
async fn cluster_status_shows_the_log_replicas_and_lease_holder_and_answers_with_a_server_dead() {
    let mut nats = cluster_or_skip!("cluster_status_shows_the_log_replicas_and_lease_holder");
    let config = status_config();
    // The NATS servers the harness starts require no credentials; a user
    // and password given anyway are sent and ignored, and must not show.
    let urls = nats.urls();

    // Before any node started: nothing exists, which is no error.
    let (code, out, err) = cluster_status(&config, &urls, &[]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("update log ASGIGRAM_UPDATES_4242: does not exist yet"),
        "{out}"
    );
    assert!(
        out.contains("asgigram_leases_4242: the bucket does not exist yet"),
        "{out}"
    );

    let s = settings(&nats, "node-a");
    let log = log(&s).await.expect("the update log opens");
    for id in 1..=3 {
        publish_until_acked(&log, id).await;
    }
    let lease = leases(&nats, "node-a")
        .await
        .try_acquire("ingress")
        .await
        .expect("acquiring answers")
        .expect("a free lease");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let holding = tokio::spawn(lease.hold(async {
        let _ = stopped.await;
    }));

    let (code, out, err) = cluster_status(&config, &urls, &[]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(
        out.contains("update log ASGIGRAM_UPDATES_4242: 4 partitions, 3 replicas"),
        "{out}"
    );
    assert!(out.contains("3 messages"), "{out}");
    let ingress = out
        .lines()
        .find(|l| l.trim_start().starts_with("ingress"))
        .unwrap_or_else(|| panic!("no ingress lease in:\n{out}"));
    assert!(ingress.contains("held by node-a"), "{out}");
    assert!(!ingress.contains("EXPIRED"), "{out}");

    let (code, out, err) = cluster_status(&config, &urls, &["--json"]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    let status: serde_json::Value = serde_json::from_str(&out).expect("--json prints JSON");
    assert_eq!(status["bot_id"], 4242);
    let servers = status["servers"].as_array().expect("servers");
    assert_eq!(servers.len(), 3);
    assert!(servers.iter().all(|s| s["reached"] == true), "{out}");
    let stream = &status["stream"];
    assert_eq!(stream["name"], "ASGIGRAM_UPDATES_4242");
    assert_eq!(stream["exists"], true);
    assert_eq!(stream["replicas"], 3);
    assert_eq!(stream["partitions"], 4);
    assert_eq!(stream["messages"], 3);
    assert_eq!(stream["last_sequence"], 3);
    assert_eq!(stream["duplicate_window_s"], 120);
    assert!(stream["leader"].is_string(), "{out}");
    assert_eq!(stream["peers"].as_array().map(Vec::len), Some(3), "{out}");
    assert_eq!(
        status["jetstream"]["peers"].as_array().map(Vec::len),
        Some(3),
        "{out}"
    );
    assert_eq!(status["jetstream"]["name"], nats.cluster_name());
    assert_eq!(status["leases"]["replicas"], 3);
    assert_eq!(status["leases"]["stored_ttl_ms"], 5000);
    let leases = status["leases"]["leases"].as_array().expect("leases");
    assert_eq!(leases.len(), 1, "{out}");
    assert_eq!(leases[0]["key"], "ingress");
    assert_eq!(leases[0]["holder"], "node-a");
    assert_eq!(leases[0]["expired"], false);
    assert!(
        leases[0]["revision"].as_u64().is_some_and(|r| r > 0),
        "{out}"
    );

    // One server gone: the status still answers, and shows it.
    nats.kill(0);
    let end = Instant::now() + nats::NATS_DEADLINE;
    let mut last;
    loop {
        let (code, out, err) = cluster_status(&config, &urls, &["--json"]).await;
        last = format!("exit {code:?}\n{out}{err}");
        if code == Some(0) {
            let status: serde_json::Value = serde_json::from_str(&out).expect("JSON");
            assert_eq!(status["servers"][0]["reached"], false, "{out}");
            assert!(status["servers"][0]["error"].is_string(), "{out}");
            if a_replica_is_not_current(&status) {
                break;
            }
        }
        assert!(
            Instant::now() < end,
            "no status showing the dead server within {:?}: {last}\n{}",
            nats::NATS_DEADLINE,
            nats.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (code, out, err) = cluster_status(&config, &urls, &[]).await;
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("UNREACHABLE"), "{out}");
    // With a server dead the holder's renewal may have timed out, and a
    // holder that cannot renew in time gives the lease up (fencing): its
    // task may have ended already.
    let _ = stop.send(());
    let _ = holding.await;
}

/// A lease taken while one replica of the bucket was stalled, read back
/// through that replica the moment it runs again: it shows held. A read
/// served by the nearest replica (the bucket's direct get) answers with what
/// that replica has applied, which can lag a write a majority acknowledged;
/// the status once showed a lease taken a moment before as not held.
#[actix_rt::test]
async fn cluster_status_shows_a_lease_taken_while_a_replica_lagged() {
    let mut nats = cluster_or_skip!("cluster_status_shows_a_lease_taken_while_a_replica_lagged");
    // Creates the bucket, through any server.
    drop(leases(&nats, "node-a").await);
    const ROUNDS: usize = 12;
    const FILLER: usize = 2000;
    let bucket_name = cluster::lease::bucket_name(BOT);
    let mut stale = Vec::new();
    for round in 0..ROUNDS {
        let bucket = stream_info(&nats.url(0), &format!("KV_{bucket_name}")).await;
        let leader = bucket
            .cluster
            .and_then(|c| c.leader)
            .expect("the bucket has a leader");
        let leader: usize = leader[1..].parse().expect("servers are named n0..n2");
        let lagging = (leader + 1 + round % 2) % 3;
        let mut through_leader = settings(&nats, "node-a");
        through_leader.nats_urls = vec![nats.url(leader)];
        let js = cluster::connect(&through_leader).await.expect("connects");
        let holder = Leases::open(&js, BOT, &through_leader)
            .await
            .expect("the bucket opens");

        nats.pause(lagging);
        // Writes for the stalled replica to catch up on once it runs again,
        // so that it is still applying them when the status reads.
        let filler = async_nats::jetstream::new(
            async_nats::connect(nats.url(leader))
                .await
                .expect("connects"),
        );
        futures_util::future::join_all((0..FILLER).map(|i| {
            let (filler, bucket_name) = (filler.clone(), &bucket_name);
            async move {
                filler
                    .publish(format!("$KV.{bucket_name}.filler-{i}"), Bytes::new())
                    .await
                    .expect("published")
                    .await
                    .expect("a majority stores it")
            }
        }))
        .await;
        let key = format!("probe-{round}");
        let lease = holder
            .try_acquire(&key)
            .await
            .expect("a majority answers")
            .expect("a fresh key is free");
        nats.resume(lagging);
        let mut reader = settings(&nats, "operator");
        reader.nats_urls = vec![nats.url(lagging)];
        let status = cluster::status::read(&reader, BOT)
            .await
            .expect("the status reads");
        let shown = status.leases.leases.iter().find(|l| l.key == key);
        if shown.map(|l| l.holder.as_deref()) != Some(Some("node-a")) {
            stale.push(format!("{key} through n{lagging}: {shown:?}"));
        }
        lease.release().await.expect("the lease is released");
    }
    assert!(
        stale.is_empty(),
        "{} of {ROUNDS} leases just taken did not show held: {stale:?}",
        stale.len()
    );
}

/// No server answering, or no `[cluster]`: exit 1 and one line, naming the
/// URLs tried. Needs no NATS server.
#[actix_rt::test]
async fn cluster_status_exits_1_with_one_line_when_no_server_answers_or_no_cluster_is_set() {
    let config = status_config();
    let urls = vec![
        "nats://127.0.0.1:9".to_string(),
        "nats://127.0.0.1:10".to_string(),
    ];
    let (code, out, err) = cluster_status(&config, &urls, &["--json"]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert!(out.is_empty(), "{out}");
    let lines: Vec<&str> = err.lines().collect();
    assert_eq!(lines.len(), 1, "{err}");
    assert!(
        lines[0].contains("nats://127.0.0.1:9,nats://127.0.0.1:10"),
        "{err}"
    );
    assert!(lines[0].contains("cannot connect"), "{err}");

    let (code, out, err) = cluster_status(&config, &[], &[]).await;
    assert_eq!(code, Some(1), "{out}{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("cluster.nats_urls"), "{err}");
}
