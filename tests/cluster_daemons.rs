//! The whole cluster, for real: three (or four) `asgigramd` processes with
//! their Python workers, a three-node NATS JetStream cluster, and one Bot
//! API emulator they all share, with Telegram's flood limits on. During a
//! run of updates over many chats a node or a server is killed, paused or
//! stopped, and afterwards every update is answered, in order within its
//! chat, repeated only where a call was in doubt.
//!
//! Skipped (with a line on stderr) where `nats-server` is missing, unless
//! `ASGIGRAMD_REQUIRE_NATS` is set, as in CI.

mod common;
#[macro_use]
#[path = "common/nats.rs"]
mod nats;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use asgigramd::sandbox::Sandbox;
use common::{apps_dir, Daemon};
use nats::NatsCluster;

/// Chats in a run, and messages per chat: Telegram lets a chat get one
/// message a second, so a run takes about `PER_CHAT` seconds at least, and
/// the bot 30 a second, so `CHATS * PER_CHAT / 30` at least.
const CHATS: i64 = 150;
const PER_CHAT: usize = 14;

/// Within this, the cluster has answered everything after the last
/// failure: 2,100 replies at 30/s take 70 s.
const ANSWERED_WITHIN: Duration = Duration::from_secs(300);

/// The cluster's nodes and what they share.
struct Nodes {
    sandbox: Sandbox,
    nats: NatsCluster,
    nodes: BTreeMap<String, Daemon>,
    /// The app every node runs, from tests/apps.
    app: &'static str,
    /// Killed nodes, kept so that their logs outlive them.
    dead: Vec<Daemon>,
    /// Webhook mode: the load balancer in front of every node.
    balancer: Option<Balancer>,
}

impl Nodes {
    fn start(sandbox: Sandbox, nats: NatsCluster, names: &[&str]) -> Nodes {
        Nodes::start_with("echo3:app", sandbox, nats, names, &[])
    }

    fn start_with(
        app: &'static str,
        sandbox: Sandbox,
        nats: NatsCluster,
        names: &[&str],
        env: &[(&str, &str)],
    ) -> Nodes {
        let mut nodes = Nodes {
            sandbox,
            nats,
            app,
            nodes: BTreeMap::new(),
            dead: Vec::new(),
            balancer: None,
        };
        for name in names {
            nodes.add_with(name, env);
        }
        nodes
    }

    fn config(&self) -> String {
        format!(
            "[telegram]\ntoken = \"{}\"\napi_url = \"{}\"\npoll_timeout = 2\n\n\
             [app]\napplication = \"{}\"\napp_dir = \"{}\"\nworkers = 1\n\n\
             [sender]\nsafety_margin = 0.4\n\n\
             [http]\nbind = \"127.0.0.1:0\"\n\n\
             [cluster]\npartitions = 8\nlease_ttl = 4.0\nlease_renew = 1.0\n",
            self.sandbox.token(),
            self.sandbox.api_url(),
            self.app,
            apps_dir().display()
        )
    }

    fn add(&mut self, name: &str) {
        self.add_with(name, &[]);
    }

    fn add_with(&mut self, name: &str, extra_env: &[(&str, &str)]) {
        let urls = self.nats.urls().join(",");
        let mut env = vec![
            ("ASGIGRAM_CLUSTER__NATS_URLS", urls.as_str()),
            ("ASGIGRAM_CLUSTER__NODE_ID", name),
            ("RUST_LOG", "info"),
        ];
        env.extend_from_slice(extra_env);
        let mut config = self.config();
        if let Some(balancer) = &self.balancer {
            let port = common::free_port();
            config.push_str(&format!(
                "\n[webhook]\nurl = \"{}\"\nlisten = \"127.0.0.1:{port}\"\nsecret_token = \"{WEBHOOK_SECRET}\"\n",
                balancer.url()
            ));
            balancer.add(port);
        }
        let daemon = Daemon::start(&config, &env);
        assert!(
            daemon.wait_log("Application startup complete."),
            "node {name} did not start:\n{}",
            daemon.log()
        );
        self.nodes.insert(name.to_string(), daemon);
    }

    /// The node whose log last says it took `lease` (the ingress's
    /// "lease=ingress taken", the sender's "sender lease taken").
    fn holder(&self, taken: &str, lost: &[&str]) -> Option<String> {
        self.nodes
            .iter()
            .filter(|(_, d)| d.child_alive())
            .filter_map(|(name, d)| {
                let log = d.log();
                let at = log.rfind(taken)?;
                let after = &log[at..];
                (!lost.iter().any(|l| after.contains(l))).then(|| name.clone())
            })
            .next()
    }

    fn wait_holder(&self, taken: &str, lost: &[&str]) -> String {
        let mut found = None;
        common::wait_for(Duration::from_secs(60), || {
            found = self.holder(taken, lost);
            found.is_some()
        });
        found.unwrap_or_else(|| panic!("no node took {taken:?}:\n{}", self.logs()))
    }

    fn poller(&self) -> String {
        self.wait_holder(
            "lease=ingress taken",
            &["lease=ingress lost", "lease=ingress released"],
        )
    }

    fn sender(&self) -> String {
        self.wait_holder(
            "sender lease taken",
            &["sender lease lost", "sender lease released"],
        )
    }

    fn kill(&mut self, name: &str) {
        let mut daemon = self.nodes.remove(name).expect("a node of this cluster");
        let _ = daemon.child.kill();
        let _ = daemon.child.wait();
        // Its workers notice their channel close and exit; the test does
        // not wait for them.
        self.dead.push(daemon);
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for (name, d) in &self.nodes {
            all.push_str(&format!("===== node {name}\n{}\n", tail(&d.log(), 60)));
        }
        for d in &self.dead {
            all.push_str(&format!("===== a killed node\n{}\n", tail(&d.log(), 30)));
        }
        all
    }
}

/// The secret the webhook-mode nodes expect from Telegram.
const WEBHOOK_SECRET: &str = "cluster-secret_for-webhooks";

/// A TCP load balancer on loopback, as an operator puts in front of the
/// nodes in webhook mode: each connection goes to the next node in turn,
/// skipping nodes that refuse it; one that all refuse is closed, which
/// Telegram (here the emulator) answers by trying the update again.
struct Balancer {
    addr: std::net::SocketAddr,
    backends: std::sync::Arc<std::sync::Mutex<Vec<u16>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Balancer {
    fn start() -> Balancer {
        use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
        use std::sync::{Arc, Mutex};
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let addr = listener.local_addr().expect("bound");
        let backends: Arc<Mutex<Vec<u16>>> = Arc::default();
        let stop = Arc::new(AtomicBool::new(false));
        let (b, st) = (backends.clone(), stop.clone());
        std::thread::spawn(move || {
            let next = AtomicUsize::new(0);
            for client in listener.incoming() {
                if st.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(client) = client else { continue };
                let ports = b.lock().expect("not poisoned: no panics under it").clone();
                let first = next.fetch_add(1, Ordering::SeqCst);
                let node = (0..ports.len()).find_map(|k| {
                    let port = ports[(first + k) % ports.len()];
                    std::net::TcpStream::connect_timeout(
                        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
                        Duration::from_secs(1),
                    )
                    .ok()
                });
                if let Some(node) = node {
                    pipe(client, node);
                }
            }
        });
        Balancer {
            addr,
            backends,
            stop,
        }
    }

    fn url(&self) -> String {
        format!("http://{}/telegram", self.addr)
    }

    fn add(&self, port: u16) {
        self.backends
            .lock()
            .expect("not poisoned: no panics under it")
            .push(port);
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        // Wakes the accept loop so that it sees the flag.
        let _ = std::net::TcpStream::connect(self.addr);
    }
}

/// Copies both ways until either side closes, then closes both.
fn pipe(a: std::net::TcpStream, b: std::net::TcpStream) {
    let (Ok(a2), Ok(b2)) = (a.try_clone(), b.try_clone()) else {
        return;
    };
    let one_way = |mut from: std::net::TcpStream, mut to: std::net::TcpStream| {
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut from, &mut to);
            let _ = to.shutdown(std::net::Shutdown::Both);
            let _ = from.shutdown(std::net::Shutdown::Both);
        });
    };
    one_way(a, b2);
    one_way(b, a2);
}

trait Alive {
    fn child_alive(&self) -> bool;
}

impl Alive for Daemon {
    fn child_alive(&self) -> bool {
        // SAFETY: kill(2) with signal 0 only checks our own child's pid.
        unsafe { libc::kill(self.pid(), 0) == 0 }
    }
}

fn tail(log: &str, lines: usize) -> String {
    let all: Vec<&str> = log.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn text(chat: i64, i: usize) -> String {
    format!("c{chat}.m{i}")
}

/// Writes message `i` in every chat.
fn write_round(sandbox: &Sandbox, i: usize) {
    for chat in 1..=CHATS {
        sandbox.inject_text(chat, &text(chat, i));
    }
}

/// What the run's replies came to: per chat, whether every message was
/// answered in order, and how many replies were repeats.
struct Outcome {
    unanswered: Vec<String>,
    out_of_order: Vec<String>,
    repeats: usize,
}

fn outcome(sandbox: &Sandbox) -> Outcome {
    let mut result = Outcome {
        unanswered: Vec::new(),
        out_of_order: Vec::new(),
        repeats: 0,
    };
    for chat in 1..=CHATS {
        let sent = sandbox.sent_texts(chat);
        // A repeat of a call in doubt comes right after the first, or after
        // later replies of the same chat: drop every second sighting.
        let mut seen = std::collections::HashSet::new();
        let mut firsts = Vec::new();
        for t in sent {
            if seen.insert(t.clone()) {
                firsts.push(t);
            } else {
                result.repeats += 1;
            }
        }
        let expected: Vec<String> = (0..PER_CHAT).map(|i| text(chat, i)).collect();
        for t in &expected {
            if !firsts.contains(t) {
                result.unanswered.push(t.clone());
            }
        }
        let answered: Vec<&String> = firsts.iter().filter(|t| expected.contains(t)).collect();
        let in_order: Vec<&String> = expected.iter().filter(|t| firsts.contains(t)).collect();
        if answered != in_order {
            result.out_of_order.push(format!("chat {chat}: {firsts:?}"));
        }
    }
    result
}

/// Waits until every message of the run is answered (or the deadline).
fn wait_answered(nodes: &Nodes) -> Outcome {
    let deadline = Instant::now() + ANSWERED_WITHIN;
    loop {
        let o = outcome(&nodes.sandbox);
        if o.unanswered.is_empty() || Instant::now() > deadline {
            return o;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// 429s as rare as on one node: the one elected sender paces the whole
/// bot, and a new sender goes on from its predecessor's pacer (a dead one's
/// as of its last renewal), so a takeover does not give chats a new burst.
/// A few are allowed, for the emulator's own stalls:
///
/// The emulator counts a message when its thread gets to it. On this
/// two-core machine, with four daemons, their workers and three NATS
/// servers beside it, that thread can stall for a few hundred milliseconds
/// and then take a backlog at once, which it sees as a burst no sender
/// made. The sender's pacer counts a message from its answer, or at most
/// `sender.safety_margin` after it was sent; the nodes run with 0.4 s
/// rather than 0.25 s, so that such a stall does not show as a 429. The
/// pacing itself is what `tests/cluster_outbox.rs` and `tests/sender.rs`
/// check.
const TOO_MANY_AT_MOST: u64 = 5;

fn assert_whole(nodes: &Nodes, o: &Outcome, repeats_at_most: usize) {
    let too_many = nodes.sandbox.stats().too_many_requests;
    assert!(
        too_many <= TOO_MANY_AT_MOST,
        "the sandbox answered 429 {too_many} times\n{}",
        nodes.logs()
    );
    assert!(
        o.unanswered.is_empty(),
        "{} unanswered (first: {:?}):\n{}",
        o.unanswered.len(),
        &o.unanswered[..o.unanswered.len().min(10)],
        nodes.logs()
    );
    assert!(
        o.out_of_order.is_empty(),
        "out of order: {:?}\n{}",
        o.out_of_order,
        nodes.logs()
    );
    assert!(
        o.repeats <= repeats_at_most,
        "{} repeated replies, more than the {repeats_at_most} calls that can be in doubt\n{}",
        o.repeats,
        nodes.logs()
    );
}

/// The partitions in the tests' `[cluster]`.
const PARTITIONS: f64 = 8.0;

/// docs/cluster.md's failure table: a role is taken over within
/// `lease_ttl` plus `lease_renew` (4 + 1 s here); partitions within about
/// twice the TTL plus the settling time (3 s). Asserted with room for a
/// loaded machine: a takeover that waits for anything but the lease would
/// take far longer, or never come.
const ROLE_BACK_WITHIN: Duration = Duration::from_secs(20);
const PARTITIONS_BACK_WITHIN: Duration = Duration::from_secs(40);

fn within_documented_time(nodes: &Nodes, what: &str, since: Instant) {
    let took = since.elapsed();
    assert!(
        took < ROLE_BACK_WITHIN,
        "{what} was taken over after {took:?}, beyond {ROLE_BACK_WITHIN:?}\n{}",
        nodes.logs()
    );
    eprintln!(
        "{what} taken over {:.1} s after the kill",
        took.as_secs_f64()
    );
}

/// Waits until the live nodes' `/metrics` together hold every partition.
fn wait_every_partition_held(nodes: &Nodes, since: Instant) {
    let addrs: Vec<String> = nodes.nodes.values().map(common::endpoint).collect();
    let mut held = 0.0;
    let all = common::wait_for(
        PARTITIONS_BACK_WITHIN.saturating_sub(since.elapsed()),
        || {
            held = addrs
                .iter()
                .filter_map(|a| {
                    common::sample(
                        &common::get(a, "/metrics").1,
                        "asgigram_cluster_partitions_held",
                    )
                })
                .sum();
            held == PARTITIONS
        },
    );
    assert!(
        all,
        "{held} of {PARTITIONS} partitions held {:?} after the kill\n{}",
        since.elapsed(),
        nodes.logs()
    );
    eprintln!(
        "every partition held again {:.1} s after the kill",
        since.elapsed().as_secs_f64()
    );
}

/// The emulator's flood limits on: a call beyond them is answered 429.
fn limited_sandbox() -> Sandbox {
    let sandbox = common::sandbox();
    sandbox.set_rate_limits(true);
    sandbox
}

#[actix_rt::test]
async fn killing_the_polling_node_then_the_sending_node_loses_nothing_and_keeps_chat_order() {
    let nats = cluster_or_skip!("cluster_daemons_kill");
    let mut nodes = Nodes::start(limited_sandbox(), nats, &["node-a", "node-b", "node-c"]);
    for i in 0..PER_CHAT / 3 {
        write_round(&nodes.sandbox, i);
    }
    let poller = nodes.poller();
    nodes.kill(&poller);
    let killed = Instant::now();
    for i in PER_CHAT / 3..2 * PER_CHAT / 3 {
        write_round(&nodes.sandbox, i);
    }
    let new_poller = nodes.poller();
    assert_ne!(new_poller, poller);
    within_documented_time(&nodes, "the ingress", killed);
    wait_every_partition_held(&nodes, killed);
    let sender = nodes.sender();
    nodes.kill(&sender);
    let killed = Instant::now();
    for i in 2 * PER_CHAT / 3..PER_CHAT {
        write_round(&nodes.sandbox, i);
    }
    nodes.sender();
    within_documented_time(&nodes, "the sender", killed);
    wait_every_partition_held(&nodes, killed);
    let o = wait_answered(&nodes);
    // Each killed node: at most one call in doubt per chat it had in hand.
    assert_whole(&nodes, &o, 2 * CHATS as usize);
    let stats = nodes.sandbox.stats();
    eprintln!(
        "after two kills: {} repeats, {} answers 429, {} sendMessage",
        o.repeats,
        stats.too_many_requests,
        stats
            .calls_by_method
            .get("sendMessage")
            .copied()
            .unwrap_or(0)
    );
}

fn signal(daemon: &Daemon, signal: i32) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(daemon.pid(), signal);
    }
}

/// How many partitions `name`'s log says it took.
fn partitions_taken(nodes: &Nodes, name: &str) -> usize {
    nodes.nodes[name]
        .log()
        .lines()
        .filter(|l| l.contains(&format!("node={name} partition=")) && l.contains("taken"))
        .count()
}

#[actix_rt::test]
async fn a_sigterm_handover_and_a_fourth_node_joining_repeat_nothing() {
    let nats = cluster_or_skip!("cluster_daemons_handover");
    let mut nodes = Nodes::start(limited_sandbox(), nats, &["node-a", "node-b", "node-c"]);
    for i in 0..PER_CHAT / 3 {
        write_round(&nodes.sandbox, i);
    }
    // A node that holds partitions stops as an orchestrator stops it.
    assert!(
        common::wait_for(Duration::from_secs(60), || nodes.nodes["node-b"]
            .log()
            .contains("node=node-b partition=")),
        "node-b took no partition:\n{}",
        nodes.logs()
    );
    check_operations(&nodes);
    let stopping = nodes.nodes.remove("node-b").expect("started");
    let (status, log) = stopping.stop();
    assert!(
        status.success(),
        "node-b did not stop cleanly: {status}\n{log}"
    );
    assert!(log.contains("handing over"), "{log}");
    for i in PER_CHAT / 3..2 * PER_CHAT / 3 {
        write_round(&nodes.sandbox, i);
    }
    // A fourth node joins and takes its share after settling.
    nodes.add("node-d");
    assert!(
        common::wait_for(Duration::from_secs(60), || {
            nodes.nodes["node-d"]
                .log()
                .contains("node=node-d partition=")
                && nodes.nodes["node-d"].log().contains("taken (revision")
        }),
        "node-d took no partition:\n{}",
        nodes.logs()
    );
    for i in 2 * PER_CHAT / 3..PER_CHAT {
        write_round(&nodes.sandbox, i);
    }
    let o = wait_answered(&nodes);
    // A handover finishes what it has in hand: nothing is made twice.
    assert_whole(&nodes, &o, 0);
    assert!(partitions_taken(&nodes, "node-d") > 0);
    eprintln!(
        "after a SIGTERM and a join: {} answers 429",
        nodes.sandbox.stats().too_many_requests
    );
}

#[actix_rt::test]
async fn an_app_node_killed_a_nats_server_killed_and_a_paused_owner_lose_nothing() {
    let nats = cluster_or_skip!("cluster_daemons_faults");
    let mut nodes = Nodes::start(limited_sandbox(), nats, &["node-a", "node-b", "node-c"]);
    write_round(&nodes.sandbox, 0);
    let (poller, sender) = (nodes.poller(), nodes.sender());
    let names: Vec<String> = nodes.nodes.keys().cloned().collect();
    let app_only = names
        .iter()
        .find(|n| **n != poller && **n != sender)
        .cloned();
    // Three nodes, two roles: at least one node holds neither.
    let app_only = app_only.expect("a node with no role");
    assert!(
        common::wait_for(Duration::from_secs(60), || nodes.nodes[&app_only]
            .log()
            .contains("taken (revision")),
        "{app_only} took no partition:\n{}",
        nodes.logs()
    );
    write_round(&nodes.sandbox, 1);
    nodes.kill(&app_only);
    let killed = Instant::now();
    write_round(&nodes.sandbox, 2);
    wait_every_partition_held(&nodes, killed);
    nodes.nats.kill(1);
    for i in 3..6 {
        write_round(&nodes.sandbox, i);
    }
    nodes.nats.restart(1);
    write_round(&nodes.sandbox, 6);
    // A partition owner paused past its lease (a long GC pause, a frozen
    // VM): the others take its partitions, and once it runs again it must
    // deliver nothing of them.
    let paused = nodes
        .nodes
        .keys()
        .find(|n| **n != nodes.poller())
        .cloned()
        .expect("two nodes left");
    signal(&nodes.nodes[&paused], libc::SIGSTOP);
    write_round(&nodes.sandbox, 7);
    std::thread::sleep(Duration::from_secs(7));
    signal(&nodes.nodes[&paused], libc::SIGCONT);
    for i in 8..PER_CHAT {
        write_round(&nodes.sandbox, i);
    }
    let o = wait_answered(&nodes);
    assert_whole(&nodes, &o, 2 * CHATS as usize);
    eprintln!(
        "after an app node's kill, a NATS server's kill and a pause: {} repeats, {} answers 429",
        o.repeats,
        nodes.sandbox.stats().too_many_requests
    );
}

/// Webhook mode behind a load balancer: every node accepts Telegram's
/// POSTs and answers 200 once the update is in the replicated log, so the
/// balancer may send any update to any node. A node killed mid-run costs
/// only the POSTs it had open, which Telegram sends again to another.
#[actix_rt::test]
async fn webhook_nodes_behind_a_load_balancer_lose_nothing_when_one_is_killed() {
    let nats = cluster_or_skip!("cluster_daemons_webhook");
    let mut nodes = Nodes::start(limited_sandbox(), nats, &[]);
    nodes.balancer = Some(Balancer::start());
    for name in ["node-a", "node-b", "node-c"] {
        nodes.add(name);
        assert!(
            nodes.nodes[name].wait_log("Receiving updates by webhook as @"),
            "{name} is not in webhook mode:\n{}",
            nodes.logs()
        );
    }
    for i in 0..PER_CHAT / 2 {
        write_round(&nodes.sandbox, i);
    }
    // Every node stores what it is posted: each has stored some updates.
    let stored = |nodes: &Nodes, name: &str| {
        common::sample(
            &common::get(&common::endpoint(&nodes.nodes[name]), "/metrics").1,
            "asgigram_cluster_updates_stored_total",
        )
        .unwrap_or(0.0)
    };
    assert!(
        common::wait_for(Duration::from_secs(60), || ["node-a", "node-b", "node-c"]
            .iter()
            .all(|n| stored(&nodes, n) > 0.0)),
        "not every node stored updates:\n{}",
        nodes.logs()
    );
    // Not the sender: what a killed sender costs is the other tests'.
    let sender = nodes.sender();
    let victim = nodes
        .nodes
        .keys()
        .find(|n| **n != sender)
        .cloned()
        .expect("three nodes");
    nodes.kill(&victim);
    for i in PER_CHAT / 2..PER_CHAT {
        write_round(&nodes.sandbox, i);
    }
    let o = wait_answered(&nodes);
    assert_whole(&nodes, &o, CHATS as usize);
    let (delivered, failed) = nodes.sandbox.inspect(|s| s.webhook_deliveries());
    assert!(
        delivered >= (CHATS as u64) * PER_CHAT as u64,
        "{delivered} deliveries"
    );
    eprintln!(
        "webhook mode, a node killed: {delivered} POSTs answered 200, {failed} failed and sent again, {} repeats, {} answers 429",
        o.repeats,
        nodes.sandbox.stats().too_many_requests
    );
}

/// Two of three NATS servers down: no majority, so nothing can be stored.
/// The nodes keep running, stop polling and fence themselves as their
/// leases lapse (Telegram keeps the updates meanwhile), say so in their
/// logs, and once a majority is back everything resumes with nothing lost.
#[actix_rt::test]
async fn losing_the_nats_majority_pauses_the_cluster_and_it_resumes_with_nothing_lost() {
    let nats = cluster_or_skip!("cluster_daemons_majority");
    let mut nodes = Nodes::start(limited_sandbox(), nats, &["node-a", "node-b", "node-c"]);
    for i in 0..PER_CHAT / 3 {
        write_round(&nodes.sandbox, i);
    }
    nodes.poller();
    nodes.nats.kill(1);
    nodes.nats.kill(2);
    for i in PER_CHAT / 3..2 * PER_CHAT / 3 {
        write_round(&nodes.sandbox, i);
    }
    // Past the lease TTL (4 s) twice over: every lease has lapsed.
    std::thread::sleep(Duration::from_secs(12));
    for (name, daemon) in &nodes.nodes {
        assert!(
            daemon.child_alive(),
            "{name} exited without a NATS majority:\n{}",
            nodes.logs()
        );
    }
    assert!(
        nodes.nodes.values().any(|d| d.log().contains("lost")),
        "no node said it lost a lease:\n{}",
        nodes.logs()
    );
    nodes.nats.restart(1);
    nodes.nats.restart(2);
    let back = Instant::now();
    for i in 2 * PER_CHAT / 3..PER_CHAT {
        write_round(&nodes.sandbox, i);
    }
    nodes.poller();
    eprintln!(
        "a poller again {:.1} s after the majority came back",
        back.elapsed().as_secs_f64()
    );
    let o = wait_answered(&nodes);
    // Calls on their way when the engine went away are in doubt: at most
    // one per chat.
    assert_whole(&nodes, &o, CHATS as usize);
    eprintln!(
        "after losing and regaining the NATS majority: {} repeats, {} answers 429, answered {:.1} s after it came back",
        o.repeats,
        nodes.sandbox.stats().too_many_requests,
        back.elapsed().as_secs_f64()
    );
}

/// The push API on a cluster: any node takes an event and stores it in the
/// log, in its chat's partition, before it answers 202; the partition's
/// owner, whichever node that is, delivers it in its place among the
/// chat's updates. A call from another program is made by the one sender.
#[actix_rt::test]
async fn events_pushed_to_any_node_reach_their_chats_in_order_and_calls_are_made_once() {
    const TOKEN: &str = "cluster-push-SECRET-7d2e";
    const PUSH_CHATS: i64 = 20;
    let nats = cluster_or_skip!("cluster_daemons_push");
    let nodes = Nodes::start_with(
        "pushed:app",
        limited_sandbox(),
        nats,
        &["node-a", "node-b"],
        &[("ASGIGRAM_HTTP__API_TOKEN", TOKEN)],
    );
    let addrs: Vec<String> = nodes.nodes.values().map(common::endpoint).collect();
    for chat in 1..=PUSH_CHATS {
        nodes.sandbox.inject_text(chat, "before");
    }
    let answered = |n: usize| {
        common::wait_for(ANSWERED_WITHIN, || {
            (1..=PUSH_CHATS).all(|c| nodes.sandbox.sent_texts(c).len() >= n)
        })
    };
    assert!(answered(1), "not every chat answered:\n{}", nodes.logs());
    // Each chat's event through one node or the other, alternately.
    let mut ids = Vec::new();
    for chat in 1..=PUSH_CHATS {
        let addr = &addrs[chat as usize % addrs.len()];
        let event = serde_json::json!({"type": "app.order_shipped", "order": chat});
        let (status, body) = common::post(
            addr,
            &format!("/v1/chats/{chat}/events"),
            Some(TOKEN),
            event.to_string().as_bytes(),
        );
        assert_eq!(status, 202, "{body}\n{}", nodes.logs());
        let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
        ids.push(answer["update_id"].as_i64().expect("an id"));
    }
    for chat in 1..=PUSH_CHATS {
        nodes.sandbox.inject_text(chat, "after");
    }
    assert!(answered(3), "not every chat answered:\n{}", nodes.logs());
    for chat in 1..=PUSH_CHATS {
        assert_eq!(
            nodes.sandbox.sent_texts(chat),
            [
                "before".to_string(),
                format!("app.order_shipped order={chat} chat={chat}"),
                "after".to_string()
            ],
            "chat {chat}"
        );
    }
    let mut distinct = ids.clone();
    distinct.sort();
    distinct.dedup();
    assert!(
        ids.iter().all(|id| *id < 0) && distinct.len() == ids.len(),
        "pushed ids are negative and unique across nodes: {ids:?}"
    );

    let call = serde_json::json!({"method": "sendMessage", "params": {"chat_id": 1, "text": "from outside"}});
    let (status, body) = common::post(
        &addrs[1],
        "/v1/calls",
        Some(TOKEN),
        call.to_string().as_bytes(),
    );
    assert_eq!(status, 200, "{body}");
    let answer: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(answer["result"]["text"], "from outside", "{body}");
    assert_eq!(
        nodes
            .sandbox
            .sent_texts(1)
            .iter()
            .filter(|t| *t == "from outside")
            .count(),
        1
    );
    // Without the token: refused, nothing stored.
    let (status, _) = common::post(
        &addrs[0],
        "/v1/chats/1/events",
        None,
        b"{\"type\": \"app.x\"}",
    );
    assert_eq!(status, 401);
    for (name, d) in &nodes.nodes {
        assert!(!d.log().contains(TOKEN), "{name} logged the API token");
    }
}

/// `/readyz` and `/metrics` of every node name its roles and partitions, and
/// exactly one node says it polls and one that it sends.
fn check_operations(nodes: &Nodes) {
    let (poller, sender) = (nodes.poller(), nodes.sender());
    let mut partitions = 0.0;
    for (name, daemon) in &nodes.nodes {
        let addr = common::endpoint(daemon);
        let mut scrape = String::new();
        let settled = common::wait_for(Duration::from_secs(30), || {
            scrape = common::get(&addr, "/metrics").1;
            let role = |r: &str| {
                common::sample(
                    &scrape,
                    &format!("asgigram_cluster_role{{node=\"{name}\",role=\"{r}\"}}"),
                )
            };
            role("poller") == Some(f64::from(u8::from(*name == poller)))
                && role("sender") == Some(f64::from(u8::from(*name == sender)))
        });
        assert!(
            settled,
            "{name}'s roles in /metrics are wrong (poller {poller}, sender {sender}):\n{scrape}"
        );
        let held = common::sample(&scrape, "asgigram_cluster_partitions_held").expect("partitions");
        partitions += held;
        if *name == poller {
            assert!(
                common::sample(
                    &scrape,
                    "asgigram_cluster_lease_age_seconds{lease=\"ingress\"}"
                )
                .is_some(),
                "{scrape}"
            );
        }
        let (status, body) = common::get(&addr, "/readyz");
        assert_eq!(status, 200, "{body}");
        assert!(
            body.contains(&format!("cluster node {name}: roles: ")),
            "{body}"
        );
        if *name == poller {
            assert!(body.contains("poller"), "{body}");
        }
    }
    // Every partition has one owner once the assignment settled.
    assert!(
        partitions <= PARTITIONS,
        "{partitions} partitions held among the nodes"
    );
}

/// The lifespan scope's calls go through the engine too: on the cluster's
/// first node its startup awaits setMyCommands (the sender must already
/// contend), its background broadcast reaches every chat in order, and a
/// later awaited call's answer comes back to it from the answers bucket.
#[actix_rt::test]
async fn lifespan_calls_awaited_and_broadcast_go_through_the_clusters_sender() {
    let nats = cluster_or_skip!("cluster_daemons_lifespan");
    let sandbox = common::sandbox();
    let chats = [301i64, 302, 303];
    for id in chats {
        sandbox.register_chat(
            serde_json::json!({"id": id, "type": "private", "first_name": format!("user{id}")}),
        );
    }
    let list = chats.map(|c| c.to_string()).join(",");
    let nodes = Nodes::start_with(
        "lifespan_calls:app",
        sandbox,
        nats,
        &["node-a", "node-b"],
        &[("LIFESPAN_BROADCAST", &list)],
    );
    let daemon = &nodes.nodes["node-a"];
    for chat in chats {
        // Each node's lifespan broadcasts: two rounds from each of two nodes.
        let texts = common::wait_texts(&nodes.sandbox, chat, 4, daemon);
        let ones = texts.iter().position(|t| t == "news 2");
        assert!(
            ones.is_some_and(|i| texts[..i].contains(&"news 1".to_string())),
            "chat {chat}: {texts:?}"
        );
    }
    nodes.sandbox.inject_text(400, "status");
    let status = common::wait_texts(&nodes.sandbox, 400, 1, daemon)
        .pop()
        .unwrap_or_default();
    assert!(
        status.contains("commands=telegram.api.response:commands:True"),
        "{status}\n{}",
        nodes.logs()
    );
    assert!(
        status.contains("later=telegram.api.response:2:True"),
        "{status}\n{}",
        nodes.logs()
    );
}
