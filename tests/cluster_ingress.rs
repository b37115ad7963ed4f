//! Ingress in cluster mode against a real three-node NATS JetStream cluster
//! on loopback (tests/common/nats.rs) and the Bot API sandbox: contenders
//! for the `ingress` lease, each on its own NATS connection, of which one
//! polls; takeover after the holder is aborted, after its NATS server
//! stalls past the lease, and at once after a graceful stop; the webhook
//! receiver storing into the update log on two nodes.
//!
//! What every test checks of the log at the end ([`assert_stored_once`]):
//! every update injected is stored exactly once, in its chat's partition,
//! in update_id order within each partition, and the lease revision the
//! updates were published under never goes down in the stream's order
//! (here, where a stale holder's late publishes reach the stream only after
//! its successor stored the same updates, none of them is stored). Deadlines are
//! generous; the only timing bounds asserted are the issue's "within the
//! lease time plus a margin" and, for a graceful stop, "well before the
//! lease could have expired".

mod common;
#[macro_use]
#[path = "common/nats.rs"]
mod nats;

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use asgigramd::cluster::log::LEASE_REVISION_HEADER;
use asgigramd::cluster::{self, partition_of, Ingress, IngressStatus, Leases, UpdateLog};
use asgigramd::routing::ScopeKey;
use asgigramd::sandbox::{Fault, FaultPlan, Sandbox};
use asgigramd::settings::{
    BotToken, ClusterSettings, NatsAuth, TelegramSettings, WebhookSecret, WebhookSettings,
};
use asgigramd::telegram::Bot;
use nats::NatsCluster;
use serde_json::json;
use tokio::sync::{oneshot, watch};

/// The bot of the tests' token (common::TOKEN).
const BOT: u64 = 4242;

const PARTITIONS: u32 = 4;

/// Short, for quick takeovers, with renewals far enough apart that a loaded
/// machine keeps up.
const TTL: Duration = Duration::from_secs(5);
const RENEW: Duration = Duration::from_secs(1);

/// Slack over the lease TTL for a takeover: a loaded machine, the server's
/// expiry timer, the contenders' pace, a JetStream election.
const TAKEOVER_MARGIN: Duration = Duration::from_secs(15);

/// For everything else: long enough never to be the reason a test fails on
/// a slow machine.
const DEADLINE: Duration = Duration::from_secs(60);

fn cluster_settings(urls: Vec<String>, node: &str, ttl: Duration) -> ClusterSettings {
    ClusterSettings {
        nats_urls: urls,
        auth: NatsAuth::None,
        ca_file: None,
        node_id: node.to_string(),
        partitions: PARTITIONS,
        replicas: 3,
        lease_ttl: ttl,
        lease_renew: RENEW,
        duplicate_window: Duration::from_secs(600),
    }
}

fn telegram_settings(sandbox: &Sandbox) -> TelegramSettings {
    TelegramSettings {
        token: BotToken::new(common::TOKEN),
        api_url: sandbox.api_url(),
        // Short: a stopped or fenced poller's request ends quickly on the
        // sandbox's side too.
        poll_timeout: Duration::from_secs(1),
        http_timeout: Duration::from_secs(10),
        poll_limit: 100,
        allowed_updates: Vec::new(),
        delete_webhook: false,
    }
}

/// One contender, running on the test's actix System.
struct Node {
    status: watch::Receiver<IngressStatus>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<Result<(), cluster::ClusterError>>,
    /// Its NATS connection, to flush after a pause.
    client: async_nats::Client,
}

impl Node {
    /// An Ingress named `name`, connected to `urls` only, on a connection
    /// of its own.
    async fn start(sandbox: &Sandbox, name: &str, urls: Vec<String>, ttl: Duration) -> Node {
        let settings = cluster_settings(urls, name, ttl);
        let js = cluster::connect(&settings).await.expect("connects to NATS");
        let client = js.client();
        let leases = persist("opening the lease bucket", || {
            Leases::open(&js, BOT, &settings)
        })
        .await;
        let log = persist("opening the update log", || {
            UpdateLog::open(&js, BOT, &settings)
        })
        .await;
        let telegram = telegram_settings(sandbox);
        let bot = Bot::new(&telegram.api_url, &telegram.token, telegram.http_timeout);
        let ingress = Ingress::new(bot, leases, log, &telegram, &settings);
        let status = ingress.status();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = actix_rt::spawn(ingress.run(async move {
            let _ = stopped.await;
        }));
        Node {
            status,
            stop: Some(stop),
            task,
            client,
        }
    }

    fn status(&self) -> IngressStatus {
        self.status.borrow().clone()
    }

    fn holding(&self) -> bool {
        self.status.borrow().holding
    }
}

/// Polls `cond` every 50 ms until it holds or `deadline` passes.
async fn wait_until(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    cond()
}

/// The one node holding the lease, once exactly one does.
async fn the_holder(nodes: &[&Node], deadline: Duration) -> usize {
    let mut holder = None;
    let found = wait_until(deadline, || {
        let holding: Vec<usize> = (0..nodes.len()).filter(|&i| nodes[i].holding()).collect();
        assert!(holding.len() <= 1, "two nodes poll at once: {holding:?}");
        holder = holding.first().copied();
        holder.is_some()
    })
    .await;
    assert!(found, "no node took the ingress lease within {deadline:?}");
    holder.expect("found, as just asserted")
}

/// A client of its own, to read the stream as an operator would.
async fn stream(url: &str) -> async_nats::jetstream::stream::Stream {
    let client = async_nats::connect(url).await.expect("connects");
    let js = async_nats::jetstream::new(client);
    let name = asgigramd::cluster::log::stream_name(BOT);
    persist("opening the update log", || js.get_stream(&name)).await
}

/// A request to the stream, tried again while it fails: a stream electing
/// a leader (a server paused or back), or a loaded machine, can let one
/// time out; only failing until [`DEADLINE`] fails the test.
async fn persist<T, E: std::fmt::Display, F: std::future::Future<Output = Result<T, E>>>(
    what: &str,
    mut request: impl FnMut() -> F,
) -> T {
    let end = Instant::now() + DEADLINE;
    loop {
        match request().await {
            Ok(answer) => return answer,
            Err(_) if Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("{what} still fails after {DEADLINE:?}: {e}"),
        }
    }
}

/// The stream's state, as its leader answers.
async fn stream_state(
    stream: &async_nats::jetstream::stream::Stream,
) -> async_nats::jetstream::stream::State {
    persist("stream info", || async {
        stream.clone().info().await.map(|info| info.state.clone())
    })
    .await
}

async fn stored_count(stream: &mut async_nats::jetstream::stream::Stream) -> u64 {
    stream_state(stream).await.messages
}

/// Waits until the log holds `n` updates, polling its count.
async fn wait_stored(
    stream: &mut async_nats::jetstream::stream::Stream,
    n: u64,
    deadline: Duration,
) {
    let end = Instant::now() + deadline;
    loop {
        let have = stored_count(stream).await;
        if have >= n {
            return;
        }
        assert!(
            Instant::now() < end,
            "the update log holds {have} of {n} updates after {deadline:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// One update as the log holds it.
#[derive(Debug)]
struct Stored {
    partition: u32,
    update_id: i64,
    chat: Option<i64>,
    revision: Option<u64>,
}

/// Every message of the log, in stream order.
async fn read_log(stream: &mut async_nats::jetstream::stream::Stream) -> Vec<Stored> {
    let state = stream_state(stream).await;
    let mut stored = Vec::new();
    if state.messages == 0 {
        return stored;
    }
    for sequence in state.first_sequence..=state.last_sequence {
        let message = persist(&format!("message {sequence}"), || {
            stream.get_raw_message(sequence)
        })
        .await;
        let partition = message
            .subject
            .rsplit('.')
            .next()
            .and_then(|p| p.parse().ok())
            .expect("the subject ends in the partition");
        let update: serde_json::Value =
            serde_json::from_slice(&message.payload).expect("the log holds JSON");
        let revision = message
            .headers
            .get(LEASE_REVISION_HEADER)
            .map(|v| v.as_str().parse().expect("a revision is a number"));
        stored.push(Stored {
            partition,
            update_id: update["update_id"].as_i64().expect("an update_id"),
            chat: update["message"]["chat"]["id"].as_i64(),
            revision,
        });
    }
    stored
}

/// The checks of the module's opening, for the updates `expected`.
fn assert_stored_once(stored: &[Stored], expected: &[i64]) {
    let mut copies: HashMap<i64, usize> = HashMap::new();
    for s in stored {
        *copies.entry(s.update_id).or_default() += 1;
    }
    let twice: Vec<_> = copies.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "stored more than once: {twice:?}");
    let missing: Vec<_> = expected
        .iter()
        .filter(|id| !copies.contains_key(id))
        .collect();
    assert!(
        missing.is_empty(),
        "{} update(s) lost, such as {:?}",
        missing.len(),
        &missing[..missing.len().min(10)]
    );
    assert_eq!(
        stored.len(),
        expected.len(),
        "only the updates injected are stored"
    );
    let mut last: BTreeMap<u32, i64> = BTreeMap::new();
    for s in stored {
        let want = s
            .chat
            .map_or(0, |chat| partition_of(&ScopeKey::chat(chat), PARTITIONS));
        assert_eq!(
            s.partition, want,
            "update {} in another partition than its chat's",
            s.update_id
        );
        if let Some(&before) = last.get(&s.partition) {
            assert!(
                before < s.update_id,
                "partition {}: {} stored after {before}",
                s.partition,
                s.update_id
            );
        }
        last.insert(s.partition, s.update_id);
    }
    let revisions: Vec<u64> = stored.iter().filter_map(|s| s.revision).collect();
    assert!(
        revisions.windows(2).all(|w| w[0] <= w[1]),
        "a publish under an older lease landed after one under a newer: {revisions:?}"
    );
}

/// Injects `n` text messages over `chats` chats, in chunks that let the
/// poller take several batches; their ids.
async fn inject(sandbox: &Sandbox, n: usize, chats: i64) -> Vec<i64> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        let chat = 1 + (i as i64 % chats);
        ids.push(sandbox.inject_text(chat, &format!("update {i}")));
        if i % 250 == 249 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    ids
}

#[actix_rt::test]
async fn exactly_one_of_three_polls_and_thousands_of_updates_are_stored_once_in_order() {
    let nats = cluster_or_skip!("exactly_one_of_three_polls");
    let sandbox = common::sandbox();
    let mut nodes = Vec::new();
    for i in 0..3 {
        nodes.push(Node::start(&sandbox, &format!("node-{i}"), nats.urls(), TTL).await);
    }
    let all: Vec<&Node> = nodes.iter().collect();
    let holder = the_holder(&all, DEADLINE).await;

    let mut expected = inject(&sandbox, 1500, 150).await;
    // An update of a kind this version does not know is an update all the
    // same: stored, in partition 0 (no chat it routes by).
    expected.push(sandbox.inject_update(json!({"future_kind": {"x": 1}})));
    // One no node could decode (nested past serde_json's limit): skipped
    // with one line, polled past, not stalling what comes after.
    let mut deep = json!(0);
    for _ in 0..200 {
        deep = json!([deep]);
    }
    sandbox.inject_raw(json!({"message": {"chat": {"id": 1}, "deep": deep}}));
    expected.extend(inject(&sandbox, 1500, 150).await);

    let mut log = stream(&nats.url(0)).await;
    let end = Instant::now() + DEADLINE;
    while stored_count(&mut log).await < expected.len() as u64 && Instant::now() < end {
        let holding: Vec<usize> = (0..3).filter(|&i| nodes[i].holding()).collect();
        assert_eq!(
            holding,
            vec![holder],
            "the holder changed or another polls too"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_stored(&mut log, expected.len() as u64, Duration::ZERO).await;
    // The last batch is confirmed by the next getUpdates.
    let last = *expected.iter().max().expect("updates were injected");
    assert!(
        wait_until(DEADLINE, || sandbox.confirmed_offset() > last).await,
        "Telegram was never told the last batch was stored"
    );

    assert_stored_once(&read_log(&mut log).await, &expected);
    assert_eq!(sandbox.stats().conflicts, 0, "two getUpdates at once (409)");
    for (i, node) in nodes.iter().enumerate() {
        let status = node.status();
        if i == holder {
            assert_eq!(status.stored, expected.len() as u64, "{status:?}");
            assert_eq!(status.duplicates, 0);
            assert!(status.batches >= 30, "batches of at most 100: {status:?}");
            assert!(status.last_offset > Some(last));
            assert!(status.lease_age().is_some());
            assert_eq!(status.acquired, 1);
        } else {
            assert_eq!(status.acquired, 0, "node-{i} held the lease: {status:?}");
            assert_eq!(status.batches, 0, "node-{i} stored: {status:?}");
        }
    }
}

#[actix_rt::test]
async fn the_holder_aborted_mid_run_is_taken_over_within_the_lease_and_nothing_is_lost_or_stored_twice(
) {
    let nats = cluster_or_skip!("the_holder_aborted_mid_run");
    let sandbox = common::sandbox();
    let nodes = [
        Node::start(&sandbox, "node-a", nats.urls(), TTL).await,
        Node::start(&sandbox, "node-b", nats.urls(), TTL).await,
    ];
    let holder = the_holder(&nodes.iter().collect::<Vec<_>>(), DEADLINE).await;
    let other = 1 - holder;
    let mut log = stream(&nats.url(1)).await;

    let mut expected = inject(&sandbox, 600, 40).await;
    wait_stored(&mut log, 300, DEADLINE).await;
    // As a kill -9: no release, the lease lapses on its own; a batch may be
    // half stored and not confirmed.
    let killed = Instant::now();
    nodes[holder].task.abort();
    expected.extend(inject(&sandbox, 600, 40).await);

    assert!(
        wait_until(TTL + TAKEOVER_MARGIN, || nodes[other].holding()).await,
        "no takeover within {:?} of the holder's death\n{}",
        TTL + TAKEOVER_MARGIN,
        nats.logs()
    );
    let took = killed.elapsed();
    assert!(
        took >= TTL - TTL / 10,
        "taken over after {took:?}, before the lease could lapse"
    );
    wait_stored(&mut log, expected.len() as u64, DEADLINE).await;
    assert_stored_once(&read_log(&mut log).await, &expected);
    assert_eq!(nodes[other].status().acquired, 1);
}

#[actix_rt::test]
async fn a_holder_whose_nats_server_stalls_past_the_lease_is_fenced_and_publishes_nothing_after_its_successor(
) {
    let mut nats = cluster_or_skip!("a_holder_whose_nats_server_stalls");
    let sandbox = common::sandbox();
    // node-a reaches the cluster only through server 0, node-b through 1.
    let a = Node::start(&sandbox, "node-a", vec![nats.url(0)], TTL).await;
    assert!(
        wait_until(DEADLINE, || a.holding()).await,
        "node-a took no lease"
    );
    let b = Node::start(&sandbox, "node-b", vec![nats.url(1)], TTL).await;
    let mut log = stream(&nats.url(2)).await;

    let mut expected = inject(&sandbox, 400, 30).await;
    wait_stored(&mut log, 200, DEADLINE).await;
    // Its server stalls under it, perhaps with a publish or a renewal
    // written into the connection and not yet read.
    nats.pause(0);
    let paused = Instant::now();
    expected.extend(inject(&sandbox, 400, 30).await);
    assert!(
        wait_until(TTL + TAKEOVER_MARGIN, || !a.holding()).await,
        "node-a still polls a lease it cannot renew"
    );
    // Fenced: from here it may count no batch, under this lease or another.
    let before = a.status();
    assert!(
        wait_until(TTL + TAKEOVER_MARGIN, || b.holding()).await,
        "node-b did not take over within {:?}\n{}",
        TTL + TAKEOVER_MARGIN,
        nats.logs()
    );
    assert!(
        paused.elapsed() >= TTL - TTL / 10,
        "taken over before node-a's lease could lapse"
    );
    wait_stored(&mut log, expected.len() as u64, DEADLINE).await;
    // node-b stores on while node-a's server is stalled.
    expected.extend(inject(&sandbox, 200, 30).await);
    wait_stored(&mut log, expected.len() as u64, DEADLINE).await;

    // Whatever node-a had written into its connection reaches the cluster
    // now; the flush returns once server 0 has read all of it.
    nats.resume(0);
    tokio::time::timeout(DEADLINE, a.client.flush())
        .await
        .expect("node-a's connection flushes once its server is back")
        .expect("flushed");
    expected.extend(inject(&sandbox, 200, 30).await);
    wait_stored(&mut log, expected.len() as u64, DEADLINE).await;
    assert!(b.holding(), "node-b keeps the lease");
    assert!(!a.holding(), "node-a does not take it back");
    let after = a.status();
    assert_eq!(
        after.batches, before.batches,
        "node-a stored a batch after its lease was gone"
    );
    // It had fetched the updates injected after the pause (its lease was
    // valid for seconds more) and was publishing them into the stalled
    // connection when its lease ran out: the stale publish whose late
    // arrival the log must drop.
    assert!(after.abandoned >= 1, "{after:?}");
    assert_eq!(after.acquired, 1);
    assert_stored_once(&read_log(&mut log).await, &expected);
}

#[actix_rt::test]
async fn a_holder_stopped_gracefully_hands_over_at_once() {
    let nats = cluster_or_skip!("a_holder_stopped_gracefully");
    let sandbox = common::sandbox();
    // A long TTL: a handover well within it can only be the release.
    let ttl = Duration::from_secs(30);
    let mut nodes = [
        Node::start(&sandbox, "node-a", nats.urls(), ttl).await,
        Node::start(&sandbox, "node-b", nats.urls(), ttl).await,
    ];
    let holder = the_holder(&nodes.iter().collect::<Vec<_>>(), DEADLINE).await;
    let other = 1 - holder;
    let mut log = stream(&nats.url(0)).await;
    let mut expected = inject(&sandbox, 300, 20).await;
    wait_stored(&mut log, expected.len() as u64, DEADLINE).await;

    let stopped = Instant::now();
    let _ = nodes[holder].stop.take().expect("running").send(());
    let ended = tokio::time::timeout(DEADLINE, &mut nodes[holder].task)
        .await
        .expect("the stopped node's run returns")
        .expect("not aborted");
    assert!(ended.is_ok(), "{ended:?}");
    assert!(
        wait_until(ttl / 2, || nodes[other].holding()).await,
        "node-b did not take the released lease within {:?}",
        ttl / 2
    );
    assert!(stopped.elapsed() < ttl / 2);
    expected.extend(inject(&sandbox, 300, 20).await);
    wait_stored(&mut log, expected.len() as u64, DEADLINE).await;
    assert_stored_once(&read_log(&mut log).await, &expected);
    assert_eq!(sandbox.stats().conflicts, 0, "two getUpdates at once (409)");
    // node-a confirmed what it stored before it let go: node-b fetched
    // nothing the log had.
    let b = nodes[other].status();
    assert_eq!((b.stored, b.duplicates), (300, 0), "{b:?}");
}

#[actix_rt::test]
async fn telegram_failing_get_updates_is_waited_out_as_by_the_poller_and_nothing_is_lost_or_stored_twice(
) {
    let nats = cluster_or_skip!("telegram_failing_get_updates");
    let sandbox = common::sandbox();
    // The first getUpdates calls fail as Telegram's do: 429, a proxy's 502,
    // a connection dropped before and after the call ran, a slow answer.
    sandbox.set_faults(FaultPlan::get_updates(vec![
        Fault::RetryAfter(1),
        Fault::BadGatewayHtml,
        Fault::DropBeforeExecute,
        Fault::DropAfterExecute,
        Fault::Delay(Duration::from_millis(300)),
    ]));
    let node = Node::start(&sandbox, "node-a", nats.urls(), TTL).await;
    let mut log = stream(&nats.url(0)).await;
    let mut expected = inject(&sandbox, 500, 25).await;
    wait_stored(&mut log, expected.len() as u64, DEADLINE).await;
    assert_eq!(sandbox.stats().faults_injected, 5);

    // Another getUpdates (a second bot instance somewhere): Telegram ends
    // the holder's long poll with 409, and it polls again after a backoff.
    let telegram = telegram_settings(&sandbox);
    let other = Bot::new(&telegram.api_url, &telegram.token, telegram.http_timeout);
    let mut tries = 0;
    while sandbox.stats().conflicts == 0 && tries < 20 {
        tries += 1;
        // A long poll of its own (one that returns at once takes no
        // turn), without an offset, so it confirms nothing.
        let _ = other.request("getUpdates", &json!({"timeout": 1})).await;
    }
    assert!(sandbox.stats().conflicts >= 1, "no 409 in {tries} tries");
    expected.extend(inject(&sandbox, 500, 25).await);
    wait_stored(&mut log, expected.len() as u64, DEADLINE).await;
    assert_stored_once(&read_log(&mut log).await, &expected);
    let status = node.status();
    assert!(status.holding, "{status:?}");
    assert_eq!(status.acquired, 1, "the lease was kept through it all");
}

#[actix_rt::test]
async fn a_rejected_token_ends_the_ingress_with_its_error_and_the_lease_released() {
    let nats = cluster_or_skip!("a_rejected_token_ends_the_ingress");
    let sandbox = common::sandbox();
    // A long TTL: the lease free at once can only be the release.
    let ttl = Duration::from_secs(30);
    let mut node = Node::start(&sandbox, "node-a", nats.urls(), ttl).await;
    assert!(
        wait_until(DEADLINE, || node.holding()).await,
        "node-a took no lease"
    );
    sandbox.set_token_rejected(true);
    let ended = tokio::time::timeout(DEADLINE, &mut node.task)
        .await
        .expect("run returns once Telegram answers 401")
        .expect("not aborted");
    assert!(
        matches!(ended, Err(cluster::ClusterError::TokenRejected)),
        "{ended:?}"
    );
    let message = ended.expect_err("as just matched").to_string();
    assert!(
        !message.contains("SECRET"),
        "the token in the error: {message}"
    );
    assert!(!node.holding());
    let settings = cluster_settings(nats.urls(), "node-b", ttl);
    let js = cluster::connect(&settings).await.expect("connects to NATS");
    let leases = persist("opening the lease bucket", || {
        Leases::open(&js, BOT, &settings)
    })
    .await;
    assert!(
        leases
            .try_acquire("ingress")
            .await
            .expect("acquiring answers")
            .is_some(),
        "the lease was not released"
    );
}

/// One webhook node: its own NATS connection and update log, serving on a
/// loopback port.
async fn webhook_node(nats: &NatsCluster, i: usize) -> (String, actix_web::dev::ServerHandle) {
    let settings = cluster_settings(vec![nats.url(i)], &format!("hook-{i}"), TTL);
    let js = cluster::connect(&settings).await.expect("connects to NATS");
    let log = persist("opening the update log", || {
        UpdateLog::open(&js, BOT, &settings)
    })
    .await;
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a loopback port");
    let addr = listener.local_addr().expect("bound");
    let webhook = WebhookSettings {
        url: "https://bot.example/hook".into(),
        path: "/hook".into(),
        listen: addr,
        secret_token: WebhookSecret::new(SECRET),
        max_connections: 40,
        tls: None,
        upload_certificate: false,
    };
    let handle = asgigramd::actors::webhook::serve_to_log(listener, &webhook, log).expect("serves");
    (format!("http://{addr}/hook"), handle)
}

const SECRET: &str = "hook-secret_42";

async fn post(client: &awc::Client, url: &str, secret: &str, body: String) -> u16 {
    let end = Instant::now() + DEADLINE;
    loop {
        match client
            .post(url)
            .insert_header(("X-Telegram-Bot-Api-Secret-Token", secret))
            .insert_header(("content-type", "application/json"))
            .send_body(body.clone())
            .await
        {
            Ok(response) => return response.status().as_u16(),
            // The server's thread may still be starting to accept.
            Err(_) if Instant::now() < end => {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Err(e) => panic!("POST {url}: {e}"),
        }
    }
}

fn update(id: i64, chat: i64) -> String {
    json!({"update_id": id, "message": {"message_id": id, "date": 0, "chat": {"id": chat, "type": "private"}, "text": format!("hook {id}")}})
        .to_string()
}

#[actix_rt::test]
async fn webhook_posts_to_two_nodes_are_answered_200_once_stored_and_resends_are_stored_once() {
    let nats = cluster_or_skip!("webhook_posts_to_two_nodes");
    let (hook_a, stop_a) = webhook_node(&nats, 0).await;
    let (hook_b, stop_b) = webhook_node(&nats, 1).await;
    let hooks = [hook_a, hook_b];
    let client = awc::Client::builder().timeout(DEADLINE).finish();
    let mut log = stream(&nats.url(2)).await;

    let mut expected = Vec::new();
    for n in 0..40 {
        let id = 5000 + n;
        let status = post(
            &client,
            &hooks[n as usize % 2],
            SECRET,
            update(id, 1 + n % 7),
        )
        .await;
        assert_eq!(status, 200, "update {id}");
        expected.push(id);
        // Answered 200 means stored: the log holds it already.
        assert_eq!(
            stored_count(&mut log).await,
            expected.len() as u64,
            "update {id} answered before stored"
        );
    }
    // Telegram's retries, to the other node, one by one and at both at once.
    for n in 0..40 {
        let id = 5000 + n;
        let other = &hooks[(n as usize + 1) % 2];
        assert_eq!(
            post(&client, other, SECRET, update(id, 1 + n % 7)).await,
            200
        );
    }
    for n in 40..60 {
        let id = 5000 + n;
        let (a, b) = tokio::join!(
            post(&client, &hooks[0], SECRET, update(id, 1 + n % 7)),
            post(&client, &hooks[1], SECRET, update(id, 1 + n % 7))
        );
        assert_eq!((a, b), (200, 200), "update {id}");
        expected.push(id);
    }
    // The checks are the single node's: neither is stored.
    assert_eq!(
        post(&client, &hooks[0], "wrong", update(9000, 1)).await,
        401
    );
    assert_eq!(
        post(&client, &hooks[1], SECRET, "{\"no\": \"id\"}".into()).await,
        400
    );

    assert_eq!(stored_count(&mut log).await, expected.len() as u64);
    let stored = read_log(&mut log).await;
    assert!(
        stored.iter().all(|s| s.revision.is_none()),
        "no lease in webhook mode"
    );
    assert_stored_once(&stored, &expected);
    // Its idle connections would hold a graceful stop for its timeout.
    drop(client);
    stop_a.stop(true).await;
    stop_b.stop(true).await;
}
