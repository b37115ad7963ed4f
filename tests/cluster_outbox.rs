//! The outbox in the engine and the one elected sender, against a real
//! three-node NATS JetStream cluster on loopback (tests/common/nats.rs):
//! a call asked for twice is made once, calls from several nodes are all
//! made by the one holder of the `sender` lease in each chat's order, a
//! holder killed mid-run is taken over after the lease TTL with nothing lost
//! and at most one call per chat made twice (the ones in doubt), a holder
//! stopped gracefully hands over at once with nothing made twice, and the
//! global rate holds for calls from several nodes.
//!
//! "Nodes" are separate NATS connections in one process; the calls are made
//! by a fake executor that records what it made, where and when. Timing is
//! asserted only as lower bounds (pacing) or with wide margins.

#[macro_use]
#[path = "common/nats.rs"]
mod nats;

use std::cell::RefCell;
use std::collections::HashMap;
use std::future::Future;
use std::rc::Rc;
use std::time::{Duration, Instant};

use asgigramd::actors::call::Outcome;
use asgigramd::cluster::{
    self, BotExecutor, ElectedSender, Executor, Leases, Outbox, Requester, SenderStatus,
};
use asgigramd::sandbox::{Sandbox, SandboxOptions};
use asgigramd::settings::{AmbiguousPolicy, BotToken, ClusterSettings, NatsAuth, SenderSettings};
use asgigramd::telegram::limits::Limits;
use asgigramd::telegram::Bot;
use asgigramd::telegram::TelegramError;
use futures_util::future::join_all;
use nats::NatsCluster;
use serde_json::{json, Map, Value};
use tokio::sync::watch;

/// The bot of the tests' token "4242:SECRET-token_for-tests".
const BOT: u64 = 4242;

/// Short, for quick takeovers; renewals far enough apart that a loaded
/// machine keeps up.
const TTL: Duration = Duration::from_secs(3);
const RENEW: Duration = Duration::from_secs(1);

/// Generous: every call of a test answered, takeovers included, on a
/// loaded machine.
const ANSWER_DEADLINE: Duration = Duration::from_secs(60);

fn settings(nats: &NatsCluster, node: &str, ttl: Duration) -> ClusterSettings {
    ClusterSettings {
        nats_urls: nats.urls(),
        auth: NatsAuth::None,
        ca_file: None,
        node_id: node.to_string(),
        partitions: 4,
        replicas: 3,
        lease_ttl: ttl,
        lease_renew: RENEW,
        duplicate_window: Duration::from_secs(120),
    }
}

/// One node's view of the engine: its own connection, outbox and leases.
struct Node {
    outbox: Outbox,
    leases: Leases,
}

async fn node(nats: &NatsCluster, name: &str, ttl: Duration) -> Node {
    let s = settings(nats, name, ttl);
    let js = cluster::connect(&s).await.expect("connects to NATS");
    let outbox = Outbox::open(&js, BOT, &s).await.expect("the outbox opens");
    let leases = Leases::open(&js, BOT, &s)
        .await
        .expect("the lease bucket opens");
    Node { outbox, leases }
}

/// A call made by a fake executor.
#[derive(Debug, Clone)]
struct Made {
    node: String,
    chat: i64,
    /// The call's id, which the tests put in its text.
    id: String,
    at: Instant,
}

/// Records every call it is asked to make, then answers after `latency`.
#[derive(Clone)]
struct Fake {
    node: String,
    made: Rc<RefCell<Vec<Made>>>,
    latency: Duration,
}

impl Executor for Fake {
    fn execute(
        &self,
        _method: &str,
        params: &Map<String, Value>,
    ) -> impl Future<Output = Result<Value, TelegramError>> {
        let chat = params["chat_id"]
            .as_i64()
            .expect("the tests' calls name a chat");
        let id = params["text"]
            .as_str()
            .expect("the tests' calls have a text")
            .to_string();
        // Counted as made as soon as it is asked for: a sender killed while
        // it waits has made the call as far as Telegram knows.
        self.made.borrow_mut().push(Made {
            node: self.node.clone(),
            chat,
            id: id.clone(),
            at: Instant::now(),
        });
        let latency = self.latency;
        async move {
            tokio::time::sleep(latency).await;
            Ok(json!({"message_id": 1, "text": id}))
        }
    }
}

fn sender_settings(limits: Limits) -> SenderSettings {
    SenderSettings {
        limits,
        ..SenderSettings::default()
    }
}

/// Starts a contender on `node`; returns its task, its status and the
/// sender that stops it gracefully.
fn contend(
    node: &Node,
    name: &str,
    made: &Rc<RefCell<Vec<Made>>>,
    latency: Duration,
    settings: SenderSettings,
) -> (
    tokio::task::JoinHandle<()>,
    watch::Receiver<SenderStatus>,
    tokio::sync::oneshot::Sender<()>,
) {
    let fake = Fake {
        node: name.to_string(),
        made: made.clone(),
        latency,
    };
    let sender = ElectedSender::new(node.outbox.clone(), node.leases.clone(), fake, settings);
    let status = sender.status();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = actix_rt::spawn(sender.run(async move {
        let _ = stop_rx.await;
    }));
    (task, status, stop_tx)
}

/// Waits until `status` says holding (or not), within `within`.
async fn wait_holding(status: &mut watch::Receiver<SenderStatus>, holding: bool, within: Duration) {
    let wait = status.wait_for(|s| s.holding == holding);
    tokio::time::timeout(within, wait)
        .await
        .unwrap_or_else(|_| panic!("the sender's holding is not {holding} within {within:?}"))
        .expect("the sender is alive");
}

fn message(chat: i64, id: &str) -> Map<String, Value> {
    let Value::Object(p) = json!({"chat_id": chat, "text": id}) else {
        unreachable!("a JSON object literal")
    };
    p
}

/// Submits `per_chat` calls to each chat in `chats` through `requester`,
/// each chat's in order, the chats at once; returns every answer, by id.
async fn ask(
    requester: Requester,
    chats: std::ops::Range<i64>,
    per_chat: u32,
) -> Vec<(String, Outcome)> {
    let requester = &requester;
    let per_chat_tasks = chats.map(|chat| async move {
        let mut pending = Vec::new();
        for i in 0..per_chat {
            let id = cluster::outbox::call_id(chat * 1000 + i64::from(i), 0);
            let p = requester
                .submit(&id, "sendMessage", message(chat, &id))
                .await
                .expect("the call is stored");
            pending.push(p);
        }
        let answers = join_all(pending.into_iter().map(|p| async move {
            let id = p.id().to_string();
            let outcome = p
                .answer(ANSWER_DEADLINE)
                .await
                .unwrap_or_else(|e| panic!("call {id} answered: {e}"));
            (id, outcome)
        }))
        .await;
        answers
    });
    join_all(per_chat_tasks)
        .await
        .into_iter()
        .flatten()
        .collect()
}

/// The ids the tests' calls to `chat` got, in submission order.
fn expected(chat: i64, per_chat: u32) -> Vec<String> {
    (0..per_chat)
        .map(|i| cluster::outbox::call_id(chat * 1000 + i64::from(i), 0))
        .collect()
}

fn answer_is_the_call(id: &str, outcome: &Outcome) {
    assert_eq!(
        outcome,
        &Outcome::Result(json!({"message_id": 1, "text": id})),
        "the answer of {id}"
    );
}

/// The ids made for `chat`, in the order they were made.
fn made_for(made: &[Made], chat: i64) -> Vec<String> {
    made.iter()
        .filter(|m| m.chat == chat)
        .map(|m| m.id.clone())
        .collect()
}

/// The calls left once acknowledgements have had up to 10 s to arrive: an
/// acknowledgement is published after the answer is stored, and the
/// server removes the call when it gets it, a moment after the asker saw
/// the answer (a CI run under load found 5 still there at once).
async fn calls_left_after_acks(nats: &NatsCluster) -> u64 {
    let end = Instant::now() + Duration::from_secs(10);
    loop {
        let left = calls_left(nats).await;
        if left == 0 || Instant::now() >= end {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn calls_left(nats: &NatsCluster) -> u64 {
    let client = async_nats::connect(nats.url(0)).await.expect("connects");
    let js = async_nats::jetstream::new(client);
    js.get_stream(cluster::outbox::stream_name(BOT))
        .await
        .expect("the calls stream exists")
        .info()
        .await
        .expect("stream info")
        .state
        .messages
}

#[actix_rt::test]
async fn a_call_published_twice_is_made_once_and_both_get_the_answer() {
    let nats = cluster_or_skip!("a_call_published_twice_is_made_once_and_both_get_the_answer");
    let a = node(&nats, "node-a", TTL).await;
    let b = node(&nats, "node-b", TTL).await;
    let c = node(&nats, "node-c", TTL).await;
    let id = cluster::outbox::call_id(77, 0);
    // Both nodes ask before any sender runs: the stream holds it once.
    let first = a
        .outbox
        .requester()
        .submit(&id, "sendMessage", message(5, &id))
        .await
        .expect("stored");
    let second = b
        .outbox
        .requester()
        .submit(&id, "sendMessage", message(5, &id))
        .await
        .expect("stored");
    assert_eq!(calls_left(&nats).await, 1, "one copy in the stream");

    let made = Rc::new(RefCell::new(Vec::new()));
    let (task, mut status, stop) = contend(
        &c,
        "node-c",
        &made,
        Duration::ZERO,
        sender_settings(Limits::off()),
    );
    wait_holding(&mut status, true, Duration::from_secs(20)).await;
    let (one, two) = tokio::join!(
        first.answer(ANSWER_DEADLINE),
        second.answer(ANSWER_DEADLINE)
    );
    let (one, two) = (one.expect("answered"), two.expect("answered"));
    answer_is_the_call(&id, &one);
    assert_eq!(one, two, "both askers get the one answer");

    // Asked again after it was answered: the stored answer, nothing
    // published, nothing made.
    let again = a
        .outbox
        .requester()
        .call(&id, "sendMessage", message(5, &id), ANSWER_DEADLINE)
        .await
        .expect("answered");
    assert_eq!(again, one);
    assert_eq!(made.borrow().len(), 1, "made once: {:?}", made.borrow());
    assert_eq!(
        calls_left_after_acks(&nats).await,
        0,
        "the call left the stream once answered"
    );

    // A bad id is refused with a clear error, nothing stored.
    let err = a
        .outbox
        .requester()
        .submit("u1 .0", "sendMessage", message(5, "x"))
        .await
        .expect_err("an id with a space is refused");
    assert!(err.to_string().contains("u1 .0"), "{err}");

    let _ = stop.send(());
    task.await.expect("the sender stops");
    assert_eq!(made.borrow().len(), 1);
    drop(nats);
}

#[actix_rt::test]
async fn calls_from_two_nodes_are_all_made_by_the_one_elected_sender_in_each_chats_order() {
    let nats = cluster_or_skip!(
        "calls_from_two_nodes_are_all_made_by_the_one_elected_sender_in_each_chats_order"
    );
    let nodes = [
        node(&nats, "node-a", TTL).await,
        node(&nats, "node-b", TTL).await,
        node(&nats, "node-c", TTL).await,
    ];
    let made = Rc::new(RefCell::new(Vec::new()));
    let mut senders = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        senders.push(contend(
            n,
            &format!("node-{i}"),
            &made,
            Duration::from_millis(5),
            sender_settings(Limits::off()),
        ));
    }
    const PER_CHAT: u32 = 8;
    let (from_a, from_b) = tokio::join!(
        ask(nodes[0].outbox.requester(), 1..4, PER_CHAT),
        ask(nodes[1].outbox.requester(), 4..7, PER_CHAT)
    );
    for (id, outcome) in from_a.iter().chain(&from_b) {
        answer_is_the_call(id, outcome);
    }
    assert_eq!(from_a.len() + from_b.len(), 6 * PER_CHAT as usize);

    let made = made.borrow().clone();
    assert_eq!(
        made.len(),
        6 * PER_CHAT as usize,
        "each call made once: {made:?}"
    );
    let makers: std::collections::HashSet<&str> = made.iter().map(|m| m.node.as_str()).collect();
    assert_eq!(makers.len(), 1, "one sender made every call: {makers:?}");
    let holders: Vec<bool> = senders.iter().map(|(_, s, _)| s.borrow().holding).collect();
    assert_eq!(
        holders.iter().filter(|h| **h).count(),
        1,
        "one holder: {holders:?}"
    );
    let holder = holders
        .iter()
        .position(|h| *h)
        .expect("one holder, as asserted");
    assert_eq!(
        makers.into_iter().next(),
        Some(format!("node-{holder}").as_str())
    );
    for chat in 1..7 {
        assert_eq!(
            made_for(&made, chat),
            expected(chat, PER_CHAT),
            "chat {chat}'s order"
        );
    }
    // The status counts a call once its answer is stored and acknowledged,
    // a moment after the asker saw the answer.
    let mut status = senders[holder].1.clone();
    let counted = status.wait_for(|s| s.made == 6 * u64::from(PER_CHAT));
    tokio::time::timeout(Duration::from_secs(10), counted)
        .await
        .expect("the holder counts every call it made")
        .expect("the holder is alive");
    let status = status.borrow().clone();
    assert_eq!(status.in_doubt, 0);
    assert!(status.lease_age().is_some());

    for (task, _, stop) in senders {
        let _ = stop.send(());
        task.await.expect("the sender stops");
    }
    drop(nats);
}

/// What a kill of the first sender mid-run left: every answer, every call
/// made, and the calls the second sender found in doubt.
struct AfterKill {
    answers: Vec<(String, Outcome)>,
    made: Vec<Made>,
    in_doubt: u64,
}

const KILL_CHATS: i64 = 5;
const KILL_PER_CHAT: u32 = 10;

/// Two contenders with `ambiguous`; the first, holding, is killed (its task
/// aborted, its lease not released) while it has calls on their way; the
/// second must take over after the lease TTL and answer the rest.
async fn kill_mid_run(nats: &NatsCluster, ambiguous: AmbiguousPolicy) -> AfterKill {
    let a = node(nats, "node-a", TTL).await;
    let b = node(nats, "node-b", TTL).await;
    let c = node(nats, "node-c", TTL).await;
    let made = Rc::new(RefCell::new(Vec::new()));
    let settings = SenderSettings {
        ambiguous,
        ..sender_settings(Limits::off())
    };
    // Slow calls, so that the kill finds some on their way.
    let latency = Duration::from_millis(150);
    let (first, mut first_status, _first_stop) =
        contend(&a, "node-a", &made, latency, settings.clone());
    wait_holding(&mut first_status, true, Duration::from_secs(20)).await;
    let (second, mut second_status, second_stop) = contend(&b, "node-b", &made, latency, settings);

    let asking = ask(c.outbox.requester(), 1..1 + KILL_CHATS, KILL_PER_CHAT);
    let kill = async {
        // Bounded: five chats' calls go out at about 30 a second.
        let end = Instant::now() + ANSWER_DEADLINE;
        while made.borrow().len() < 12 {
            assert!(Instant::now() < end, "the first sender made too few calls");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        first.abort();
        Instant::now()
    };
    let (answers, killed_at) = tokio::join!(asking, kill);
    wait_holding(&mut second_status, true, Duration::from_secs(1)).await;
    // The killed sender renewed at most RENEW before it died, and the
    // server keeps that entry TTL after: no takeover before, less a second
    // for the renewal's own time on a loaded machine.
    let taken_at = second_status
        .borrow()
        .held_since
        .expect("holding, as waited for");
    let after = taken_at.saturating_duration_since(killed_at);
    assert!(
        after >= TTL - RENEW - Duration::from_secs(1),
        "taken over {after:?} after the kill, before the killed sender's lease could expire"
    );
    assert_eq!(
        answers.len(),
        KILL_CHATS as usize * KILL_PER_CHAT as usize,
        "nothing lost"
    );
    assert!(
        made.borrow().iter().any(|m| m.node == "node-b"),
        "the second sender made the rest"
    );
    // Counted once each answer is stored and acknowledged, a moment after
    // the asker saw it: nothing in hand then.
    let settled = second_status.wait_for(|s| s.pending == 0);
    tokio::time::timeout(Duration::from_secs(10), settled)
        .await
        .expect("the second sender finishes every call in hand")
        .expect("the second sender is alive");
    assert_eq!(
        calls_left_after_acks(nats).await,
        0,
        "every call acknowledged"
    );
    let in_doubt = second_status.borrow().in_doubt;
    let _ = second_stop.send(());
    second.await.expect("the second sender stops");
    let made = made.borrow().clone();
    AfterKill {
        answers,
        made,
        in_doubt,
    }
}

/// Per chat: how many calls were made twice; asserts none more than twice
/// and the chat's order kept (a call made again right after itself).
fn made_twice_per_chat(made: &[Made]) -> Vec<usize> {
    (1..1 + KILL_CHATS)
        .map(|chat| {
            let ids = made_for(made, chat);
            let mut seen: HashMap<&str, usize> = HashMap::new();
            for id in &ids {
                *seen.entry(id.as_str()).or_default() += 1;
            }
            assert!(seen.values().all(|n| *n <= 2), "chat {chat}: {ids:?}");
            let mut order = ids.clone();
            order.dedup();
            assert_eq!(
                order,
                expected(chat, KILL_PER_CHAT),
                "chat {chat}'s order: {ids:?}"
            );
            seen.values().filter(|n| **n == 2).count()
        })
        .collect()
}

#[actix_rt::test]
async fn a_sender_killed_mid_run_is_taken_over_after_the_ttl_with_at_most_one_call_per_chat_made_twice(
) {
    let nats = cluster_or_skip!(
        "a_sender_killed_mid_run_is_taken_over_after_the_ttl_with_at_most_one_call_per_chat_made_twice"
    );
    let after = kill_mid_run(&nats, AmbiguousPolicy::Retry).await;
    for (id, outcome) in &after.answers {
        answer_is_the_call(id, outcome);
    }
    let twice = made_twice_per_chat(&after.made);
    assert!(
        twice.iter().all(|n| *n <= 1),
        "at most one call in doubt per chat: {twice:?}"
    );
    let twice: usize = twice.iter().sum();
    // Calls were on their way when the sender was killed; each was made
    // again (sender.ambiguous = retry), unless the kill came between its
    // mark and its making, which counts it in doubt and makes it once.
    assert!(after.in_doubt >= 1, "the kill found calls in doubt");
    assert!(
        twice as u64 <= after.in_doubt && after.in_doubt <= KILL_CHATS as u64,
        "made twice {twice}, in doubt {}",
        after.in_doubt
    );
    drop(nats);
}

#[actix_rt::test]
async fn with_ambiguous_fail_the_calls_in_doubt_after_a_kill_are_answered_with_an_error_not_made_again(
) {
    let nats = cluster_or_skip!(
        "with_ambiguous_fail_the_calls_in_doubt_after_a_kill_are_answered_with_an_error_not_made_again"
    );
    let after = kill_mid_run(&nats, AmbiguousPolicy::Fail).await;
    let twice = made_twice_per_chat(&after.made);
    assert!(
        twice.iter().all(|n| *n == 0),
        "nothing made twice: {twice:?}"
    );
    let failed: Vec<&(String, Outcome)> = after
        .answers
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Error(_)))
        .collect();
    for (id, outcome) in &failed {
        let Outcome::Error(e) = outcome else {
            unreachable!("filtered on errors")
        };
        let description = e["description"].as_str().unwrap_or_default();
        assert!(description.contains("in doubt"), "{id}: {e}");
    }
    assert!(after.in_doubt >= 1, "the kill found calls in doubt");
    assert_eq!(
        failed.len() as u64,
        after.in_doubt,
        "each call in doubt answered with an error"
    );
    for (id, outcome) in after
        .answers
        .iter()
        .filter(|(_, o)| matches!(o, Outcome::Result(_)))
    {
        answer_is_the_call(id, outcome);
    }
    drop(nats);
}

#[actix_rt::test]
async fn a_sender_stopped_gracefully_hands_over_at_once_with_no_call_made_twice() {
    let nats =
        cluster_or_skip!("a_sender_stopped_gracefully_hands_over_at_once_with_no_call_made_twice");
    // A long TTL: a takeover well before it can only be the release's.
    let ttl = Duration::from_secs(20);
    let a = node(&nats, "node-a", ttl).await;
    let b = node(&nats, "node-b", ttl).await;
    let c = node(&nats, "node-c", ttl).await;
    let made = Rc::new(RefCell::new(Vec::new()));
    let latency = Duration::from_millis(100);
    // Telegram's limits, so that at the stop some chats' next calls are
    // marked and waiting for their chat's budget.
    let (first, mut first_status, first_stop) = contend(
        &a,
        "node-a",
        &made,
        latency,
        sender_settings(Limits::default()),
    );
    wait_holding(&mut first_status, true, Duration::from_secs(20)).await;
    let (second, mut second_status, second_stop) = contend(
        &b,
        "node-b",
        &made,
        latency,
        sender_settings(Limits::default()),
    );

    const CHATS: i64 = 4;
    const PER_CHAT: u32 = 10;
    let requester = c.outbox.requester();
    let asking = ask(requester.clone(), 1..1 + CHATS, PER_CHAT);
    let handover = async {
        let end = Instant::now() + ANSWER_DEADLINE;
        // Past every chat's burst of 3: the chats are paced, a second
        // apart, all at once; between two such instants their next calls
        // are marked and waiting for their budget, which is where the stop
        // should find them (wherever it does, nothing may be made twice).
        while made.borrow().len() < 16 {
            assert!(Instant::now() < end, "the first sender made too few calls");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tokio::time::sleep(Duration::from_millis(400)).await;
        let _ = first_stop.send(());
        first.await.expect("the first sender stops");
        let stopped = Instant::now();
        wait_holding(&mut second_status, true, ttl / 2).await;
        stopped
    };
    let (answers, _stopped) = tokio::join!(asking, handover);
    assert_eq!(
        answers.len(),
        (CHATS as usize) * PER_CHAT as usize,
        "nothing lost"
    );
    for (id, outcome) in &answers {
        answer_is_the_call(id, outcome);
    }
    let made = made.borrow().clone();
    for chat in 1..1 + CHATS {
        assert_eq!(
            made_for(&made, chat),
            expected(chat, PER_CHAT),
            "chat {chat}: once each, in order"
        );
    }
    assert!(made.iter().any(|m| m.node == "node-a") && made.iter().any(|m| m.node == "node-b"));
    assert_eq!(second_status.borrow().in_doubt, 0);
    assert!(!first_status.borrow().holding);

    let _ = second_stop.send(());
    second.await.expect("the second sender stops");
    drop(nats);
}

#[actix_rt::test]
async fn the_global_rate_holds_for_calls_from_two_nodes() {
    let nats = cluster_or_skip!("the_global_rate_holds_for_calls_from_two_nodes");
    let a = node(&nats, "node-a", TTL).await;
    let b = node(&nats, "node-b", TTL).await;
    let c = node(&nats, "node-c", TTL).await;
    const PER_SECOND: u32 = 5;
    let limits = Limits {
        global_per_second: PER_SECOND,
        ..Limits::default()
    };
    let made = Rc::new(RefCell::new(Vec::new()));
    let (task, mut status, stop) = contend(
        &c,
        "node-c",
        &made,
        Duration::from_millis(5),
        sender_settings(limits.clone()),
    );
    wait_holding(&mut status, true, Duration::from_secs(20)).await;
    // 30 messages, two to each of 15 chats, from two nodes.
    let (from_a, from_b) = tokio::join!(
        ask(a.outbox.requester(), 1..8, 2),
        ask(b.outbox.requester(), 8..16, 2)
    );
    assert_eq!(from_a.len() + from_b.len(), 30);
    let made = made.borrow().clone();
    assert_eq!(made.len(), 30, "each once");
    let mut at: Vec<Instant> = made.iter().map(|m| m.at).collect();
    at.sort();
    // 30 messages at 5 a second take at least 5 s from the first to the
    // last (less the pacer's margin for when Telegram counts a message).
    let span = at[at.len() - 1].duration_since(at[0]);
    let least = Duration::from_secs(5) - limits.safety_margin - Duration::from_millis(50);
    assert!(span >= least, "30 messages in {span:?}, at {PER_SECOND}/s");
    // And no burst: no second holds more than twice the limit even with a
    // loaded machine's scheduling delays.
    for (i, t) in at.iter().enumerate() {
        let within = at[i..]
            .iter()
            .take_while(|u| u.duration_since(*t) < Duration::from_secs(1))
            .count();
        assert!(
            within <= 2 * PER_SECOND as usize,
            "{within} messages within a second from {i}"
        );
    }
    let _ = stop.send(());
    task.await.expect("the sender stops");
    drop(nats);
}

#[actix_rt::test]
async fn the_real_client_against_the_sandboxs_flood_limits_gets_no_429_with_calls_from_two_nodes() {
    let nats = cluster_or_skip!(
        "the_real_client_against_the_sandboxs_flood_limits_gets_no_429_with_calls_from_two_nodes"
    );
    let sb = Sandbox::start(SandboxOptions::default()).expect("sandbox starts on loopback");
    sb.set_rate_limits(true);
    for (chat, kind) in [(1, "private"), (2, "private"), (-3, "group")] {
        sb.register_chat(json!({"id": chat, "type": kind, "title": "t", "first_name": "U"}));
    }
    let a = node(&nats, "node-a", TTL).await;
    let b = node(&nats, "node-b", TTL).await;
    let c = node(&nats, "node-c", TTL).await;
    let bot = Bot::new(
        &sb.api_url(),
        &BotToken::new(sb.token()),
        Duration::from_secs(30),
    );
    let sender = ElectedSender::new(
        c.outbox.clone(),
        c.leases.clone(),
        BotExecutor::new(bot, Duration::from_secs(30)),
        sender_settings(Limits::default()),
    );
    let mut status = sender.status();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let task = actix_rt::spawn(sender.run(async move {
        let _ = stop_rx.await;
    }));
    wait_holding(&mut status, true, Duration::from_secs(20)).await;

    // Chats 1 and 2 from one node, the group from the other, six messages
    // each: more than each chat's burst, so the per-chat limit paces them.
    let ask_chats = |requester: Requester, chats: Vec<i64>| async move {
        let per_chat = chats.into_iter().map(|chat| {
            let requester = requester.clone();
            async move {
                let mut pending = Vec::new();
                for i in 0..6 {
                    let id = format!("s{}.{i}", chat.unsigned_abs());
                    let text = format!("m{i}");
                    pending.push(
                        requester
                            .submit(&id, "sendMessage", message(chat, &text))
                            .await
                            .expect("stored"),
                    );
                }
                for p in pending {
                    let id = p.id().to_string();
                    let outcome = p.answer(ANSWER_DEADLINE).await.expect("answered");
                    assert!(matches!(outcome, Outcome::Result(_)), "{id}: {outcome:?}");
                }
            }
        });
        join_all(per_chat).await;
    };
    tokio::join!(
        ask_chats(a.outbox.requester(), vec![1, 2]),
        ask_chats(b.outbox.requester(), vec![-3])
    );
    let expected: Vec<String> = (0..6).map(|i| format!("m{i}")).collect();
    for chat in [1, 2, -3] {
        assert_eq!(
            sb.sent_texts(chat),
            expected,
            "chat {chat}: each once, in order"
        );
    }
    assert_eq!(sb.stats().too_many_requests, 0, "no 429");
    let _ = stop_tx.send(());
    task.await.expect("the sender stops");
    drop(nats);
}

/// A graceful handover passes the pacer on: a chat that used its burst just
/// before the stop is not given a new one by the next sender. A chat here
/// may take 5 messages at once, then one every 4 s; the first sender makes
/// the burst and stops at once; the next one, an empty pacer's burst
/// later, must wait for the chat's budget all the same.
#[actix_rt::test]
async fn a_sender_handed_over_to_goes_on_with_the_previous_ones_pacing() {
    let nats = cluster_or_skip!("a_sender_handed_over_to_goes_on_with_the_previous_ones_pacing");
    let ttl = Duration::from_secs(20);
    let a = node(&nats, "node-a", ttl).await;
    let b = node(&nats, "node-b", ttl).await;
    let c = node(&nats, "node-c", ttl).await;
    const BURST: u32 = 5;
    const EVERY: Duration = Duration::from_secs(4);
    let limits = Limits {
        chat_burst: BURST,
        chat_per_second: 1.0 / EVERY.as_secs_f64(),
        ..Limits::default()
    };
    let made = Rc::new(RefCell::new(Vec::new()));
    let latency = Duration::from_millis(20);
    let (first, mut first_status, first_stop) = contend(
        &a,
        "node-a",
        &made,
        latency,
        sender_settings(limits.clone()),
    );
    wait_holding(&mut first_status, true, Duration::from_secs(20)).await;
    let (second, mut second_status, second_stop) = contend(
        &b,
        "node-b",
        &made,
        latency,
        sender_settings(limits.clone()),
    );

    const CHAT: i64 = 7;
    const CALLS: u32 = BURST + 2;
    let asking = ask(c.outbox.requester(), CHAT..CHAT + 1, CALLS);
    let handover = async {
        let end = Instant::now() + ANSWER_DEADLINE;
        while made.borrow().len() < BURST as usize {
            assert!(Instant::now() < end, "the first sender made too few calls");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let _ = first_stop.send(());
        first.await.expect("the first sender stops");
        wait_holding(&mut second_status, true, ttl / 2).await;
    };
    let (answers, ()) = tokio::join!(asking, handover);
    assert_eq!(answers.len(), CALLS as usize, "nothing lost");
    let made = made.borrow().clone();
    assert_eq!(
        made_for(&made, CHAT),
        expected(CHAT, CALLS),
        "once each, in order"
    );
    let by_a = made.iter().filter(|m| m.node == "node-a").count();
    assert_eq!(
        by_a, BURST as usize,
        "the first sender made the burst only: {made:?}"
    );
    // The chat's budget, as the first sender left it: the (BURST+1)-th
    // message one interval after the first, the next another interval on.
    // An empty pacer would have sent both at once on taking over.
    let slack = Duration::from_millis(100);
    for (k, m) in made[BURST as usize..].iter().enumerate() {
        let after = m.at.duration_since(made[0].at);
        let least = EVERY * (k as u32 + 1) - slack;
        assert!(
            after >= least,
            "message {} went {after:?} after the first, before the chat's budget ({least:?})",
            BURST as usize + k
        );
    }
    assert_eq!(second_status.borrow().in_doubt, 0);
    let _ = second_stop.send(());
    second.await.expect("the second sender stops");
    drop(nats);
}
