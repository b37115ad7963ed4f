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
        let daemon = Daemon::start(&self.config(), &env);
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
/// bot. A new sender starts with an empty pacer, so a chat's first message
/// after a handover may come early, once; a few such are allowed.
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
    for i in PER_CHAT / 3..2 * PER_CHAT / 3 {
        write_round(&nodes.sandbox, i);
    }
    let new_poller = nodes.poller();
    assert_ne!(new_poller, poller);
    let sender = nodes.sender();
    nodes.kill(&sender);
    for i in 2 * PER_CHAT / 3..PER_CHAT {
        write_round(&nodes.sandbox, i);
    }
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
    write_round(&nodes.sandbox, 2);
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
        partitions <= 8.0,
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
