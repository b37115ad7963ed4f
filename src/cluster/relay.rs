//! Relay: a cluster node's outgoing path. The scopes and workers send it
//! what they send the single node's Outbox ([`Call`], [`Done`]); it stores
//! the calls in the engine's outbox for the elected sender, and
//! acknowledges an update to its partition once the app is done with it.
//!
//! Owns: the acknowledgement handles of the updates in hand, and one
//! queue of work done strictly in arrival order.
//! Takes: [`Call`] and [`Done`] from the scopes and workers; [`Held`] from
//! the delivery of a partition's update; [`Flush`] at shutdown.
//! Sends: [`CallDone`] to an app that awaited a call's outcome; a download's
//! getFile straight to this node's Sender (it only reads, so it neither
//! counts for the bot's limits nor needs to be made once).
//!
//! Arrival order is the whole argument. A scope reports an update done after
//! the calls its app made for it, so the update is acknowledged only once
//! those calls are in the outbox (a majority of its replicas): a node killed
//! at any moment either has them stored, and the update's redelivery asks
//! for the same call ids and makes nothing twice, or has not acknowledged
//! the update, and the next owner handles it again. And a node's calls reach
//! the stream in the order its apps made them, which is the order the sender
//! makes each chat's calls in.
//!
//! Storing a call that fails for the engine's sake (no server reachable, no
//! majority) is retried with backoff, holding everything behind it, rather
//! than dropped: the outgoing path stalls, and the apps' `send()` with it, as
//! a single node's does when Telegram is unreachable.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use actix::prelude::*;
use tokio::sync::{mpsc, oneshot};

use super::outbox::{call_id, Requester};
use super::partitions::AckHandle;
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
        actix::spawn(relay(rx, requester, local, ids));
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

async fn relay(
    mut rx: mpsc::UnboundedReceiver<Work>,
    requester: Requester,
    local: Addr<Sender>,
    mut ids: CallIds,
) {
    let mut held: HashMap<i64, Vec<AckHandle>> = HashMap::new();
    while let Some(work) = rx.recv().await {
        match work {
            Work::Held(Held { update_id, ack }) => held.entry(update_id).or_default().push(ack),
            Work::Done(updates) => {
                for id in updates {
                    for ack in held.remove(&id).unwrap_or_default() {
                        ack.done();
                    }
                }
            }
            Work::Flush(tx) => {
                let _ = tx.send(());
            }
            Work::Call(call) if call.download => local.do_send(call),
            Work::Call(call) => {
                let id = match call.cause {
                    Some(cause) => call_id(cause.update_id, cause.ordinal),
                    None => ids.next(),
                };
                store(&requester, id, call).await;
            }
        }
    }
}

/// Stores one call, retrying what the engine failed; an app that awaits
/// the outcome gets it from a task of its own, so the queue goes on.
async fn store(requester: &Requester, id: String, call: Call) {
    let Call {
        method,
        params,
        reply,
        ..
    } = call;
    let mut failures = 0u32;
    loop {
        let stored = match &reply {
            Some(_) => requester
                .submit(&id, &method, params.clone())
                .await
                .map(Some),
            None => requester
                .store(&id, &method, params.clone())
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
