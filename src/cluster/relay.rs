//! Relay: a cluster node's outgoing path. The scopes and workers send it
//! what they send the single node's Outbox ([`Call`], [`Done`]); it stores
//! the calls in the engine's outbox for the elected sender, and
//! acknowledges an update to its partition once the app is done with it.
//!
//! Owns: the acknowledgement handles of the updates in hand; the work in
//! arrival order: calls being stored (up to [`STORING_AT_MOST`] at once, one
//! per chat), calls waiting behind their chat's, finished updates waiting
//! for the calls before them.
//! Takes: [`Call`] and [`Done`] from the scopes and workers; [`Held`] from
//! the delivery of a partition's update; [`Flush`] at shutdown.
//! Sends: [`CallDone`] to an app that awaited a call's outcome; a download's
//! getFile straight to this node's Sender (it only reads, so it neither
//! counts for the bot's limits nor needs to be made once).
//!
//! Two rules of order carry the guarantees.
//!
//! - **A finished update waits for every call before it.** A scope reports
//!   an update done after the calls its app made for it, so the update is
//!   acknowledged only once every call that arrived before its `Done` is in
//!   the outbox (a majority of its replicas). A node killed at any moment has
//!   either stored an update's calls, so its redelivery asks for the same
//!   call ids and nothing is made twice, or not acknowledged the update, so
//!   the next owner handles it again.
//! - **A chat's calls are stored one after the other**, each once the one
//!   before it is acknowledged by the stream, so they are in the stream in
//!   the order the app made them, which is the order the sender makes them
//!   in, even where a store failed and was retried. Calls of different chats
//!   are stored concurrently: a store is a round trip to the stream's
//!   leader and its replicas, and one at a time would cap the node's calls
//!   at one per round trip.
//!
//! Storing a call that fails for the engine's sake (no server reachable, no
//! majority) is retried with backoff rather than dropped, holding its chat's
//! later calls and every later finished update behind it: the outgoing path
//! stalls, and the apps' `send()` with it, as a single node's does when
//! Telegram is unreachable.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use futures_util::future::LocalBoxFuture;
use futures_util::stream::{FuturesUnordered, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::outbox::{call_id, Requester};
use super::partitions::{AckHandle, Fence};
use super::ClusterError;
use crate::actors::call::{Call, CallDone, Outcome, ReplyTo};
use crate::actors::outbox::{Done, Flush};
use crate::actors::sender::Sender;
use crate::backoff::Backoff;

/// How long an app that awaited a call waits for the elected sender's
/// answer: the sender paces the whole bot at Telegram's limits, so under a
/// burst a call may queue for a while. After it the app gets an error and
/// the call is still made.
pub const ANSWER_WAIT: Duration = Duration::from_secs(120);

const BACKOFF: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));

/// An update delivered to this node's scopes, and its acknowledgement.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Held {
    pub update_id: i64,
    pub ack: AckHandle,
}

enum Work {
    Call(Call),
    Done(Vec<i64>),
    Held(Held),
    Flush(oneshot::Sender<()>),
}

/// The actor in front of the queue: the scopes address an actor.
pub struct Relay {
    queue: mpsc::UnboundedSender<Work>,
}

impl Relay {
    /// Starts the queue's task on the calling actix System. `node_id`
    /// names the calls made with no update in hand (lifespan, background
    /// tasks), which no redelivery can repeat.
    pub fn start(requester: Requester, local: Addr<Sender>, node_id: &str) -> Addr<Relay> {
        let (queue, rx) = mpsc::unbounded_channel();
        let ids = CallIds::new(node_id);
        let store: StoreFn = Box::new(move |id, call, fences| {
            let requester = requester.clone();
            Box::pin(async move { store(&requester, id, call, &fences).await })
        });
        actix::spawn(relay(rx, store, local.recipient(), ids));
        Relay { queue }.start()
    }

    fn put(&self, work: Work) {
        // The task ends only with the System, which ends this actor too.
        let _ = self.queue.send(work);
    }
}

impl Actor for Relay {
    type Context = Context<Self>;
}

impl Handler<Call> for Relay {
    type Result = ();
    fn handle(&mut self, call: Call, _: &mut Context<Self>) {
        self.put(Work::Call(call));
    }
}

impl Handler<Done> for Relay {
    type Result = ();
    fn handle(&mut self, done: Done, _: &mut Context<Self>) {
        self.put(Work::Done(done.0));
    }
}

impl Handler<Held> for Relay {
    type Result = ();
    fn handle(&mut self, held: Held, _: &mut Context<Self>) {
        self.put(Work::Held(held));
    }
}

impl Handler<Flush> for Relay {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Flush, _: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.put(Work::Flush(tx));
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}

/// Ids for calls with no cause: the node, when it started, and a count.
/// Unique across the cluster and across this node's restarts, so such a
/// call is never taken for another.
struct CallIds {
    prefix: String,
    next: u64,
}

impl CallIds {
    fn new(node_id: &str) -> CallIds {
        let node: String = node_id
            .chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect();
        let started = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        CallIds {
            prefix: format!("n{node}.{started}"),
            next: 0,
        }
    }

    fn next(&mut self) -> String {
        self.next += 1;
        format!("{}.{}", self.prefix, self.next)
    }
}

/// Calls being stored at once, at most: enough to overlap the engine's
/// round trips, few enough that a failing engine holds a bounded number.
const STORING_AT_MOST: usize = 128;

/// How the queue stores one call (the engine's outbox; a fake in tests).
type StoreFn = Box<dyn Fn(String, Call, Vec<Fence>) -> LocalBoxFuture<'static, ()>>;

/// The calls of one chat are stored one after the other; calls with no
/// chat (setMyCommands, say) form one lane of their own.
type Lane = Option<String>;

/// The queue's state: see the module's rules. Every piece of work gets a
/// number in arrival order; a finished update is acknowledged once every
/// call numbered before it is stored.
struct Queue {
    store: StoreFn,
    local: Recipient<Call>,
    ids: CallIds,
    held: HashMap<i64, Vec<AckHandle>>,
    next: u64,
    /// Calls not yet stored (being stored, or waiting), by number.
    unstored: BTreeSet<u64>,
    /// Finished updates and flushes, waiting for the calls before them.
    barriers: VecDeque<(u64, Barrier)>,
    /// Per lane, the calls waiting behind the one being stored.
    waiting: HashMap<Lane, VecDeque<(u64, Call)>>,
    /// Lanes with a call being stored.
    busy: HashSet<Lane>,
    /// Lanes not busy whose next call waits for room under the cap, in
    /// the order they got it.
    ready: VecDeque<Lane>,
    storing: FuturesUnordered<LocalBoxFuture<'static, (u64, Lane)>>,
}

enum Barrier {
    Done(Vec<i64>),
    Flush(oneshot::Sender<()>),
}

impl Queue {
    fn take(&mut self, work: Work) {
        let number = self.next;
        self.next += 1;
        match work {
            Work::Held(Held { update_id, ack }) => {
                self.held.entry(update_id).or_default().push(ack)
            }
            Work::Done(updates) => self.barriers.push_back((number, Barrier::Done(updates))),
            Work::Flush(tx) => self.barriers.push_back((number, Barrier::Flush(tx))),
            Work::Call(call) if call.download => self.local.do_send(call),
            Work::Call(call) => {
                let lane = call.chat();
                self.unstored.insert(number);
                if self.busy.contains(&lane) || self.storing.len() >= STORING_AT_MOST {
                    let queue = self.waiting.entry(lane.clone()).or_default();
                    queue.push_back((number, call));
                    if queue.len() == 1 && !self.busy.contains(&lane) {
                        self.ready.push_back(lane);
                    }
                } else {
                    self.issue(number, lane, call);
                }
            }
        }
    }

    fn issue(&mut self, number: u64, lane: Lane, call: Call) {
        let id = match call.cause {
            Some(cause) => call_id(cause.update_id, cause.ordinal),
            None => self.ids.next(),
        };
        // The fences of the partition the cause came from: none for a call
        // with no update in hand.
        let fences: Vec<Fence> = call
            .cause
            .and_then(|cause| self.held.get(&cause.update_id))
            .map(|acks| acks.iter().map(AckHandle::fence).collect())
            .unwrap_or_default();
        if fenced(&fences) {
            not_stored(&id, call);
            self.unstored.remove(&number);
            if self.waiting.get(&lane).is_some_and(|q| !q.is_empty()) {
                self.ready.push_back(lane);
            }
            return;
        }
        self.busy.insert(lane.clone());
        let stored = (self.store)(id, call, fences);
        self.storing.push(Box::pin(async move {
            stored.await;
            (number, lane)
        }));
    }

    fn stored(&mut self, number: u64, lane: Lane) {
        self.unstored.remove(&number);
        self.busy.remove(&lane);
        if self.waiting.get(&lane).is_some_and(|q| !q.is_empty()) {
            self.ready.push_back(lane);
        }
    }

    /// Issues what the cap allows, then lifts the barriers whose calls are
    /// all stored.
    fn settle(&mut self) {
        while self.storing.len() < STORING_AT_MOST {
            let Some(lane) = self.ready.pop_front() else {
                break;
            };
            let Some(queue) = self.waiting.get_mut(&lane) else {
                continue;
            };
            let Some((number, call)) = queue.pop_front() else {
                continue;
            };
            if queue.is_empty() {
                self.waiting.remove(&lane);
            }
            self.issue(number, lane, call);
        }
        let oldest = self.unstored.first().copied().unwrap_or(u64::MAX);
        while self.barriers.front().is_some_and(|(n, _)| *n < oldest) {
            let Some((_, barrier)) = self.barriers.pop_front() else {
                break;
            };
            match barrier {
                Barrier::Done(updates) => {
                    for id in updates {
                        for ack in self.held.remove(&id).unwrap_or_default() {
                            ack.done();
                        }
                    }
                }
                Barrier::Flush(tx) => {
                    let _ = tx.send(());
                }
            }
        }
    }
}

async fn relay(
    mut rx: mpsc::UnboundedReceiver<Work>,
    store: StoreFn,
    local: Recipient<Call>,
    ids: CallIds,
) {
    let mut queue = Queue::new(store, local, ids);
    loop {
        tokio::select! {
            work = rx.recv() => match work {
                Some(work) => queue.take(work),
                None => break,
            },
            Some((number, lane)) = queue.storing.next(), if !queue.storing.is_empty() => {
                queue.stored(number, lane);
            }
        }
        queue.settle();
    }
}

impl Queue {
    fn new(store: StoreFn, local: Recipient<Call>, ids: CallIds) -> Queue {
        Queue {
            store,
            local,
            ids,
            held: HashMap::new(),
            next: 0,
            unstored: BTreeSet::new(),
            barriers: VecDeque::new(),
            waiting: HashMap::new(),
            busy: HashSet::new(),
            ready: VecDeque::new(),
            storing: FuturesUnordered::new(),
        }
    }
}

/// Stores one call, retrying what the engine failed; an app that awaits
/// the outcome gets it from a task of its own, so the queue goes on.
async fn store(requester: &Requester, id: String, call: Call, fences: &[Fence]) {
    let Call {
        method,
        params,
        reply,
        cause,
        ..
    } = call;
    let mut failures = 0u32;
    loop {
        // Checked before every attempt: a store retried past the partition's
        // end would race the next owner's handling of the same update.
        if fenced(fences) {
            let mut call = Call::new(method, params, reply);
            call.cause = cause;
            not_stored(&id, call);
            return;
        }
        let stored = match &reply {
            Some(_) => requester
                .submit(&id, &method, params.to_map())
                .await
                .map(Some),
            None => requester
                .store(&id, &method, params.to_map())
                .await
                .map(|()| None),
        };
        match stored {
            Ok(pending) => {
                if let (Some(pending), Some(reply)) = (pending, reply) {
                    actix::spawn(async move {
                        let outcome = match pending.answer(ANSWER_WAIT).await {
                            Ok(outcome) => outcome,
                            Err(e) => {
                                log::warn!("{e}; the app is told so, and the call is still made");
                                Outcome::refused(&format!(
                                    "no answer from the cluster's sender within {}s; the call \
                                     is still made",
                                    ANSWER_WAIT.as_secs()
                                ))
                            }
                        };
                        answer(reply, outcome);
                    });
                }
                return;
            }
            Err(e @ (ClusterError::CallId { .. } | ClusterError::CallTooLarge { .. })) => {
                log::error!("method={method}: {e}");
                if let Some(reply) = reply {
                    answer(reply, Outcome::refused(&e.to_string()));
                }
                return;
            }
            Err(e) => {
                let delay = BACKOFF.delay(failures);
                failures = failures.saturating_add(1);
                log::warn!(
                    "call {id} method={method} not stored in the cluster's outbox: {e}; \
                     retrying in {:.1}s (this node's calls wait behind it)",
                    delay.as_secs_f64()
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Whether the partition of the call's cause is no longer this node's (a
/// call with no cause has no fences, and is never fenced).
fn fenced(fences: &[Fence]) -> bool {
    !fences.is_empty() && !fences.iter().any(Fence::is_up)
}

/// Drops a call whose update's partition moved: see [`Fence`].
fn not_stored(id: &str, call: Call) {
    log::info!(
        "call {id} method={} not stored: its update's partition is no longer this node's, and \
         its next owner handles the update again",
        call.method
    );
    if let Some(reply) = call.reply {
        answer(
            reply,
            Outcome::refused(
                "not made here: the update's partition moved to another node, which handles the \
                 update again",
            ),
        );
    }
}

fn answer(reply: ReplyTo, outcome: Outcome) {
    reply.to.do_send(CallDone {
        request_id: reply.request_id,
        outcome,
        sid: reply.sid,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::actors::call::Cause;
    use std::cell::RefCell;
    use std::rc::Rc;

    /// Takes downloads; the tests make none.
    struct Nowhere;
    impl Actor for Nowhere {
        type Context = Context<Self>;
    }
    impl Handler<Call> for Nowhere {
        type Result = ();
        fn handle(&mut self, _: Call, _: &mut Context<Self>) {}
    }

    /// A store that finishes when the test says: the ids it was asked for,
    /// in order, each with the sender that completes it.
    type Started = Rc<RefCell<Vec<(String, Option<oneshot::Sender<()>>)>>>;

    fn queue() -> (Queue, Started) {
        let started: Started = Rc::default();
        let log = started.clone();
        let store: StoreFn = Box::new(move |id, _call, _fences| {
            let (tx, rx) = oneshot::channel();
            log.borrow_mut().push((id, Some(tx)));
            Box::pin(async move {
                let _ = rx.await;
            })
        });
        (
            Queue::new(store, Nowhere.start().recipient(), CallIds::new("t")),
            started,
        )
    }

    fn call(chat: i64, update_id: i64, ordinal: u32) -> Work {
        let mut params = crate::telegram::Params::new();
        params.insert_absent("chat_id", &chat.into());
        Work::Call(
            Call::new("sendMessage".into(), params, None).caused_by(Cause { update_id, ordinal }),
        )
    }

    fn ids(started: &Started) -> Vec<String> {
        started.borrow().iter().map(|(id, _)| id.clone()).collect()
    }

    fn finish(started: &Started, id: &str) {
        let mut started = started.borrow_mut();
        let (_, tx) = started
            .iter_mut()
            .find(|(i, _)| i == id)
            .expect("that call was started");
        let _ = tx.take().expect("finished once").send(());
    }

    /// Runs the queue until the finished stores are taken in.
    async fn run(queue: &mut Queue) {
        while let Ok(Some((number, lane))) =
            tokio::time::timeout(Duration::from_millis(50), queue.storing.next()).await
        {
            queue.stored(number, lane);
            queue.settle();
        }
    }

    #[actix_rt::test]
    async fn a_chats_calls_are_stored_one_after_the_other_and_other_chats_meanwhile() {
        let (mut q, started) = queue();
        for work in [
            call(1, 10, 0),
            call(1, 10, 1),
            call(2, 11, 0),
            call(1, 12, 0),
        ] {
            q.take(work);
            q.settle();
        }
        assert_eq!(ids(&started), ["u10.0", "u11.0"]);
        finish(&started, "u11.0");
        run(&mut q).await;
        assert_eq!(ids(&started), ["u10.0", "u11.0"], "chat 1 waits for u10.0");
        finish(&started, "u10.0");
        run(&mut q).await;
        assert_eq!(ids(&started), ["u10.0", "u11.0", "u10.1"]);
        finish(&started, "u10.1");
        run(&mut q).await;
        assert_eq!(ids(&started), ["u10.0", "u11.0", "u10.1", "u12.0"]);
    }

    #[actix_rt::test]
    async fn an_update_is_acknowledged_only_once_every_call_before_it_is_stored() {
        let (mut q, started) = queue();
        let (first, mut first_acked) = AckHandle::detached();
        let (second, mut second_acked) = AckHandle::detached();
        q.take(Work::Held(Held {
            update_id: 10,
            ack: first,
        }));
        q.take(Work::Held(Held {
            update_id: 11,
            ack: second,
        }));
        q.take(call(1, 10, 0));
        q.take(call(2, 11, 0));
        q.take(Work::Done(vec![11]));
        q.take(Work::Done(vec![10]));
        q.settle();
        // u11.0 stored, but u10.0, which came before 11's Done, is not.
        finish(&started, "u11.0");
        run(&mut q).await;
        assert!(!second_acked.acked() && !first_acked.acked());
        finish(&started, "u10.0");
        run(&mut q).await;
        assert!(second_acked.acked() && first_acked.acked());
    }

    #[actix_rt::test]
    async fn no_call_is_stored_for_an_update_whose_partition_was_lost() {
        let (mut q, started) = queue();
        let (kept, _) = AckHandle::detached();
        let (lost, _) = AckHandle::detached();
        lost.take_fence_down();
        q.take(Work::Held(Held {
            update_id: 10,
            ack: kept,
        }));
        q.take(Work::Held(Held {
            update_id: 11,
            ack: lost,
        }));
        q.take(call(1, 10, 0));
        q.take(call(2, 11, 0));
        q.settle();
        run(&mut q).await;
        assert_eq!(ids(&started), ["u10.0"]);
    }

    #[actix_rt::test]
    async fn no_more_than_the_cap_is_stored_at_once_and_the_rest_follow_in_order() {
        let (mut q, started) = queue();
        let chats = STORING_AT_MOST as i64 + 5;
        for chat in 0..chats {
            q.take(call(chat, chat, 0));
            q.settle();
        }
        assert_eq!(started.borrow().len(), STORING_AT_MOST);
        finish(&started, "u0.0");
        finish(&started, "u1.0");
        run(&mut q).await;
        let now = ids(&started);
        assert_eq!(now.len(), STORING_AT_MOST + 2);
        let n = STORING_AT_MOST;
        assert_eq!(now[n..], [format!("u{n}.0"), format!("u{}.0", n + 1)]);
    }

    #[test]
    fn ids_without_a_cause_are_valid_keys_and_never_repeat() {
        let mut ids = CallIds::new("node a.example:1");
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        assert!(a.starts_with("nnode_a_example_1."), "{a}");
        for id in [&a, &b] {
            assert!(id
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || b"-_.".contains(&c)));
        }
        // A restart later names them differently.
        std::thread::sleep(Duration::from_millis(2));
        assert_ne!(CallIds::new("node a.example:1").next(), a);
    }
}
