//! Ingress: events and Bot API calls that other programs send over the HTTP
//! endpoint (`POST /v1/chats/{chat_id}/events`, `POST /v1/calls`), on their
//! way into the daemon. The endpoint's handlers run on a thread of their
//! own and reach the actors only through this one.
//!
//! Owns: the id the next pushed event gets (negative, counting down, rule 8
//! of [`crate::journal`]); whether pushed events are taken yet; the pushed
//! events waiting to be stored, and the store under way; the `/v1/calls`
//! requests waiting for their call's outcome.
//! Takes: [`PushEvent`] and [`ApiCall`] (the endpoint), [`Open`] (`run`,
//! once the journal's leftovers are dispatched), [`CallDone`] (the Sender,
//! with an [`ApiCall`]'s outcome).
//! Sends: [`Push`] to the Supervisor; [`StorePushed`] to the journal thread,
//! one at a time; [`Call`] to the Outbox.
//! Stops: with the System. Requests still waiting then get
//! [`IngressError::Stopping`].
//!
//! A pushed event goes to the Supervisor first, which delivers it and says
//! which update it came after; then it is stored, and only then is the
//! request answered (202). Delivering first is what updates do too (the
//! journal's rule 1): the event's place among its chat's updates is fixed
//! where the Supervisor takes it, and the journal keeps that place (rule 9).
//! A store that fails is written again with backoff, in front of what
//! gathered meanwhile; the request waits until it is written. Stores go to
//! the journal one batch at a time, so pushes, however many, never fill the
//! journal's mailbox, which the Poller and the Outbox rely on being free.
//!
//! A call from `/v1/calls` has no cause, so the Outbox stores it before it
//! goes and it keeps its place among the apps' calls; its outcome comes
//! back here as the app's would.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use serde_json::{json, Map, Value};
use tokio::sync::oneshot;

use crate::actors::call::{Call, CallDone, Outcome, ReplyTo};
use crate::actors::outbox::Outbox;
use crate::actors::supervisor::{Full, Push, Supervisor};
use crate::backoff::Backoff;
use crate::journal::{JournalActor, NewPushed, NotStored, StorePushed};
use crate::push::PushedEvent;
use crate::telegram::Params;

/// The wait before storing again after a failed store: as the Poller's.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// Why a request from another program cannot be taken now; the endpoint
/// answers 503 and the program tries again later.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IngressError {
    /// Before the apps run and the journal's leftovers are on their way.
    #[error("the daemon is starting; try again shortly")]
    Starting,
    /// `journal.max_undelivered` events wait for the apps.
    #[error("too many events wait for the apps (journal.max_undelivered); try again shortly")]
    Full,
    /// The daemon is stopping; a call already stored is sent at the next
    /// start.
    #[error("the daemon is stopping")]
    Stopping,
    /// A cluster node's update log cannot store it now (no NATS majority,
    /// say); nothing was stored.
    #[error("the update log cannot store it now ({0}); try again shortly")]
    NotStored(String),
}

/// An event for a chat's scope; answers with its id once it is stored.
#[derive(Message)]
#[rtype(result = "Result<i64, IngressError>")]
pub struct PushEvent {
    pub chat_id: i64,
    /// Checked by [`crate::push::event`].
    pub event: Map<String, Value>,
}

/// One Bot API call; answers with its final outcome.
#[derive(Message)]
#[rtype(result = "Result<Outcome, IngressError>")]
pub struct ApiCall {
    pub method: String,
    pub params: Map<String, Value>,
}

/// From now on pushed events are taken: the apps are ready, the bot's User
/// is known, and the journal's leftovers are dispatched ahead of them.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Open;

/// A pushed event placed by the Supervisor, waiting to be stored.
struct Placed {
    event: NewPushed,
    stored: oneshot::Sender<Result<i64, IngressError>>,
}

pub struct Ingress {
    journal: Addr<JournalActor>,
    supervisor: Addr<Supervisor>,
    outbox: Addr<Outbox>,
    next_id: i64,
    open: bool,
    /// Placed, waiting for the next store.
    to_store: Vec<Placed>,
    storing: bool,
    /// Stores that failed in a row.
    failures: u32,
    calls: ApiCalls,
}

/// `/v1/calls` calls waiting for their outcome, told apart by the
/// `request_id` of their [`ReplyTo`]. Shared by the single node's
/// [`Ingress`] and a cluster node's (`cluster::api`).
#[derive(Default)]
pub struct ApiCalls {
    next: u64,
    waiting: HashMap<u64, oneshot::Sender<Outcome>>,
}

impl ApiCalls {
    /// Sends `msg` to `outbox`, its outcome to come back to `reply_to` as a
    /// [`CallDone`] for [`ApiCalls::answered`].
    pub fn ask(
        &mut self,
        msg: ApiCall,
        outbox: &Recipient<Call>,
        reply_to: Recipient<CallDone>,
    ) -> ResponseFuture<Result<Outcome, IngressError>> {
        let n = self.next;
        self.next += 1;
        let (tx, rx) = oneshot::channel();
        self.waiting.insert(n, tx);
        let reply = ReplyTo {
            to: reply_to,
            request_id: json!(n),
            // No instance asked: calls are told apart by `request_id` alone.
            sid: 0,
        };
        outbox.do_send(Call::new(
            msg.method,
            Params::from_map(&msg.params),
            Some(reply),
        ));
        Box::pin(async move { rx.await.map_err(|_| IngressError::Stopping) })
    }

    pub fn answered(&mut self, msg: CallDone) {
        let waiting = msg
            .request_id
            .as_u64()
            .and_then(|n| self.waiting.remove(&n));
        if let Some(tx) = waiting {
            // The requester may have gone; the call was made all the same.
            let _ = tx.send(msg.outcome);
        }
    }
}

impl Ingress {
    /// `next_id` from [`crate::journal::Journal::next_pushed_id`].
    pub fn new(
        journal: Addr<JournalActor>,
        supervisor: Addr<Supervisor>,
        outbox: Addr<Outbox>,
        next_id: i64,
    ) -> Ingress {
        Ingress {
            journal,
            supervisor,
            outbox,
            next_id,
            open: false,
            to_store: Vec::new(),
            storing: false,
            failures: 0,
            calls: ApiCalls::default(),
        }
    }

    /// Writes what waits, unless a store is under way (its end starts the
    /// next).
    fn store(&mut self, ctx: &mut Context<Self>) {
        if self.storing || self.to_store.is_empty() {
            return;
        }
        self.storing = true;
        let batch = std::mem::take(&mut self.to_store);
        let (events, answers): (Vec<_>, Vec<_>) =
            batch.into_iter().map(|p| (p.event, p.stored)).unzip();
        let ids: Vec<i64> = events.iter().map(|e| e.id).collect();
        self.journal
            .send(StorePushed(events))
            .into_actor(self)
            .map(move |written, act, ctx| match written {
                Ok(Ok(())) => {
                    act.failures = 0;
                    act.storing = false;
                    for (answer, id) in answers.into_iter().zip(ids) {
                        let _ = answer.send(Ok(id));
                    }
                    act.store(ctx);
                }
                Ok(Err(NotStored { error, events })) => {
                    let delay = BACKOFF.delay(act.failures);
                    act.failures = act.failures.saturating_add(1);
                    log::error!(
                        "journal: cannot store {} pushed event(s): {error}; their requests wait, retrying in {:.1}s",
                        events.len(),
                        delay.as_secs_f64()
                    );
                    let mut again: Vec<Placed> = events
                        .into_iter()
                        .zip(answers)
                        .map(|(event, stored)| Placed { event, stored })
                        .collect();
                    again.append(&mut act.to_store);
                    act.to_store = again;
                    ctx.run_later(delay, |act, ctx| {
                        act.storing = false;
                        act.store(ctx);
                    });
                }
                // The journal thread is gone only when the system stops.
                Err(_) => {
                    for answer in answers {
                        let _ = answer.send(Err(IngressError::Stopping));
                    }
                }
            })
            .spawn(ctx);
    }
}

impl Actor for Ingress {
    type Context = Context<Self>;
}

impl Handler<Open> for Ingress {
    type Result = ();
    fn handle(&mut self, _: Open, _: &mut Context<Self>) {
        self.open = true;
    }
}

impl Handler<PushEvent> for Ingress {
    type Result = ResponseFuture<Result<i64, IngressError>>;
    fn handle(&mut self, msg: PushEvent, ctx: &mut Context<Self>) -> Self::Result {
        if !self.open {
            return Box::pin(std::future::ready(Err(IngressError::Starting)));
        }
        let id = self.next_id;
        self.next_id -= 1;
        let event = PushedEvent::new(id, msg.chat_id, msg.event);
        let body = event.encode();
        let (placed_tx, placed_rx) = oneshot::channel();
        // `do_send`, not `send`: it queues at once whatever the mailbox
        // holds, so the Supervisor takes the events in the order of their
        // ids, which is the order the journal gives back (rule 9).
        self.supervisor.do_send(Push {
            event,
            placed: Some(placed_tx),
        });
        let (stored_tx, stored_rx) = oneshot::channel();
        placed_rx
            .into_actor(self)
            .map(move |placed, act, ctx| match placed {
                Ok(Ok(after)) => {
                    act.to_store.push(Placed {
                        event: NewPushed { id, after, body },
                        stored: stored_tx,
                    });
                    act.store(ctx);
                }
                Ok(Err(Full)) => {
                    let _ = stored_tx.send(Err(IngressError::Full));
                }
                Err(_) => {
                    let _ = stored_tx.send(Err(IngressError::Stopping));
                }
            })
            .spawn(ctx);
        Box::pin(async move { stored_rx.await.unwrap_or(Err(IngressError::Stopping)) })
    }
}

impl Handler<ApiCall> for Ingress {
    type Result = ResponseFuture<Result<Outcome, IngressError>>;
    fn handle(&mut self, msg: ApiCall, ctx: &mut Context<Self>) -> Self::Result {
        let outbox = self.outbox.clone().recipient();
        self.calls.ask(msg, &outbox, ctx.address().recipient())
    }
}

impl Handler<CallDone> for Ingress {
    type Result = ();
    fn handle(&mut self, msg: CallDone, _: &mut Context<Self>) {
        self.calls.answered(msg);
    }
}
