//! ScopeActor: one per live scope (a chat, a user, a business chat). It keeps
//! one application instance fed with the scope's events, in order, and turns
//! what the instance `send()`s into Bot API calls.
//!
//! Owns: the scope's ordered queue of events the instance has not
//! received yet, the update *in hand*, the calls awaiting their outcome,
//! and the instance (its `sid` in a worker).
//! Takes: [`Enqueue`] (events, from the Supervisor), [`Close`] and
//! [`Terminate`] (the Supervisor), [`InstanceMsg`] (the worker's frames for
//! its instance), [`CallDone`] (an outcome the app asked for).
//! Sends: `Attach` and `Write` (the instance's frames) to its Worker;
//! [`Call`]s and [`Done`] to the Outbox; [`ScopeReport`]s (received, idle,
//! instance ended, bounced, stopped) to the Supervisor.
//! Stops: when the Supervisor closes it (idle, evicted, moved,
//! shutdown) and the instance has ended, or at once when its worker is
//! gone; either way it hands back what is still queued in [`Stopped`].
//!
//! The update an instance received last is *in hand* until the instance is
//! done with it: it asks for the next event (`receive()` returns another
//! update, or finds nothing queued while no call awaits its outcome), or it
//! ends. Calls made meanwhile carry that update as their cause, numbered in
//! order; the Outbox records the update as handled ([`Done`]) after them.
//!
//! While a call of the instance awaits its outcome (`awaiting`), no further
//! event is written to the worker: the chat's later updates wait here, and
//! the response, written as its own frame, goes ahead of those written
//! before the call was made (the bridge gives an instance that awaits a
//! response nothing else). So the calls an app makes after reading its
//! response belong to the update it was handling, whatever arrived
//! meanwhile (docs/reliability.md, Replies rule 5).
//!
//! An instance that ends (returns, raises, or dies with its worker) loses
//! nothing: events it had not received stay queued for the next instance, and
//! when its worker died, so does the update in hand (its calls already made
//! are recognised as repeats). It is restarted at once when it had made
//! progress, otherwise on the next event, so an app that raises before
//! receiving anything cannot spin.

use std::collections::VecDeque;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use actix::prelude::*;
use serde_json::json;
use serde_json::value::RawValue;

use crate::actors::call::{Call, CallDone, Cause, ReplyTo};
use crate::actors::outbox::OutboxLink;
use crate::actors::worker::{Attach, Death, InstanceMsg, Worker, Write};
use crate::bridge::{Event, Outgoing, OutgoingError, ScopeDict, Sid, ToWorker};
use crate::routing::{Conversation, ScopeKey};
use crate::telegram::{methods, Params};

/// Unique per process, so a frame for an ended instance never reaches its
/// successor.
static NEXT_SID: AtomicU64 = AtomicU64::new(1);

/// New events for this scope, in update order.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Enqueue(pub Vec<Event>);

/// The server ends the scope: `telegram.disconnect` with `reason`, then the
/// grace period, then cancellation.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Close {
    pub reason: &'static str,
}

/// The reason a daemon stop gives.
pub const SHUTDOWN: &str = "shutdown";

/// Reports to the Supervisor.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum ScopeReport {
    /// The instance received these updates.
    Received {
        scope_id: u64,
        key: ScopeKey,
        ids: Vec<i64>,
    },
    /// The instance returned by itself and nothing is queued. `through`
    /// counts the events the scope had been given then (as [`Idle`]).
    ///
    /// [`Idle`]: ScopeReport::Idle
    InstanceEnded {
        scope_id: u64,
        key: ScopeKey,
        through: u64,
    },
    /// The instance is done with every event the scope had been given, the
    /// first `through` of them: nothing in hand, nothing queued. Sent once per
    /// such moment; it is idle unless more were sent since.
    Idle {
        scope_id: u64,
        key: ScopeKey,
        through: u64,
    },
    /// The scope is done and hands back what it did not finish. The actor
    /// waits for [`Terminate`].
    Stopped(Box<Stopped>, Addr<ScopeActor>),
    /// Events that reached the scope after it reported `Stopped`.
    Bounced { key: ScopeKey, events: Vec<Event> },
}

/// What a stopped scope hands back: `leftover` holds the events no instance
/// finished: first the one in hand, if `in_hand` (it was received, so it no
/// longer counts as undelivered), then those never received. `accepted`
/// counts the events it was given before it stopped: any sent after come
/// back as [`Bounced`](ScopeReport::Bounced). `lost` says why its worker
/// ended, when that is why it stopped.
#[derive(Debug)]
pub struct Stopped {
    pub scope_id: u64,
    pub key: ScopeKey,
    pub leftover: Vec<Event>,
    pub in_hand: bool,
    /// Events not acked had been written to its worker.
    pub flushed: bool,
    pub accepted: u64,
    pub lost: Option<Death>,
    /// The scope's Chat or User object, for the scope that takes over.
    pub subject: Box<RawValue>,
}

/// The Supervisor has forgotten this scope: nothing more will be sent to it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Terminate;

enum Instance {
    /// No instance: none started yet, or the last one ended.
    None,
    Running {
        sid: Sid,
    },
    Closing {
        sid: Sid,
    },
}

/// The update an instance is handling.
struct InHand {
    update_id: i64,
    /// Its event, given back if the worker dies before the app is done.
    event: Event,
    /// Calls made so far while handling it.
    calls: u32,
}

/// What every scope on one worker talks to. Shared rather than held per
/// scope: each actix address clone allocates its own sender record, which
/// would be paid again by every live scope.
pub struct ScopeLinks {
    pub worker: Addr<Worker>,
    pub supervisor: Recipient<ScopeReport>,
    pub outbox: OutboxLink,
    /// How long a closed instance may take to end before it is cancelled.
    pub grace: Duration,
}

/// Every live scope holds one, inside its actix context in a tokio task,
/// which is allocated in 128-byte steps on x86_64: fields that are large and
/// seldom used are boxed (see the `task_fits` test).
pub struct ScopeActor {
    scope_id: u64,
    key: ScopeKey,
    /// The scope's Chat or User object and the bot's User, for the scope
    /// dict of every instance. Kept encoded: they are only ever written to
    /// the worker, and as JSON trees they would take several times the memory
    /// of every live scope.
    subject: Box<RawValue>,
    /// The same for every scope.
    bot: Rc<RawValue>,
    links: Rc<ScopeLinks>,
    /// Events not yet received, oldest first, each with its sequence number.
    queue: VecDeque<(u64, Event)>,
    next_seq: u64,
    /// Sequence number of the first queued event the current instance has
    /// not been given yet.
    unsent_from: u64,
    instance: Instance,
    /// The current instance has received at least one event.
    progressed: bool,
    in_hand: Option<Box<InHand>>,
    /// Calls of the current instance whose outcome it asked for and has not
    /// been given yet.
    awaiting: u32,
    /// Events taken from the Supervisor, and that count when the Supervisor
    /// was last told the instance is idle.
    accepted: u64,
    idle_reported: u64,
    /// Reported `Stopped`; waiting for `Terminate`.
    stopped: bool,
    /// Runs on the isolation worker: its instances ack eagerly.
    isolated: bool,
}

impl ScopeActor {
    pub fn new(
        scope_id: u64,
        key: ScopeKey,
        subject: Box<RawValue>,
        bot: Rc<RawValue>,
        links: Rc<ScopeLinks>,
        isolated: bool,
    ) -> ScopeActor {
        ScopeActor {
            scope_id,
            key,
            subject,
            bot,
            links,
            queue: VecDeque::new(),
            next_seq: 0,
            unsent_from: 0,
            instance: Instance::None,
            progressed: false,
            in_hand: None,
            awaiting: 0,
            accepted: 0,
            idle_reported: 0,
            stopped: false,
            isolated,
        }
    }

    fn push(&mut self, event: Event) {
        self.queue.push_back((self.next_seq, event));
        self.next_seq += 1;
    }

    fn start_instance(&mut self, ctx: &mut Context<Self>) {
        let sid = NEXT_SID.fetch_add(1, Ordering::Relaxed);
        self.instance = Instance::Running { sid };
        self.progressed = false;
        self.awaiting = 0;
        self.unsent_from = self.queue.front().map_or(self.next_seq, |(seq, _)| *seq);
        log::debug!("scope={} instance sid={sid} starting", self.key);
        if !self.links.worker.connected() {
            // Its worker died and the Supervisor has released it: nothing was
            // in hand (an instance that ended finished it), so no suspicion.
            self.instance = Instance::None;
            self.stop_with_leftovers(Some(Death::Asked), ctx);
            return;
        }
        self.links.worker.do_send(Attach {
            sid,
            start: ToWorker::Start {
                sid,
                scope: ScopeDict::new(&self.key, &self.subject, &self.bot),
                eager: self.isolated,
            }
            .encode(),
            to: ctx.address().recipient(),
        });
        self.flush(sid);
    }

    /// Gives the instance every queued event it has not been given yet,
    /// unless a call of its awaits its outcome: then they wait for it.
    fn flush(&mut self, sid: Sid) {
        if self.awaiting > 0 {
            return;
        }
        self.write_unsent(sid);
    }

    fn write_unsent(&mut self, sid: Sid) {
        for (seq, event) in self
            .queue
            .iter()
            .skip_while(|(seq, _)| *seq < self.unsent_from)
        {
            self.links.worker.do_send(Write(
                ToWorker::Event {
                    sid,
                    seq: *seq,
                    event,
                }
                .encode(),
            ));
        }
        self.unsent_from = self.next_seq;
    }

    fn current_sid(&self) -> Option<Sid> {
        match self.instance {
            Instance::Running { sid } | Instance::Closing { sid } => Some(sid),
            Instance::None => None,
        }
    }

    /// The instance is done with the update in hand.
    fn finish_in_hand(&mut self) {
        if let Some(h) = self.in_hand.take() {
            self.links.outbox.done(vec![h.update_id]);
        }
    }

    /// Tells the Supervisor the instance is idle, once per idle moment.
    fn report_idle(&mut self) {
        if self.in_hand.is_some()
            || !self.queue.is_empty()
            || self.idle_reported == self.accepted
            || !matches!(self.instance, Instance::Running { .. })
        {
            return;
        }
        self.idle_reported = self.accepted;
        self.links.supervisor.do_send(ScopeReport::Idle {
            scope_id: self.scope_id,
            key: self.key.clone(),
            through: self.accepted,
        });
    }

    fn stop_with_leftovers(&mut self, lost: Option<Death>, ctx: &mut Context<Self>) {
        let in_hand = self.in_hand.is_some();
        // An event written to the worker may have been received by the app
        // even though its ack never arrived (acks are batched).
        let flushed = self
            .queue
            .iter()
            .any(|(seq, e)| *seq < self.unsent_from && !e.is_disconnect());
        let leftover = self
            .in_hand
            .take()
            .map(|h| h.event)
            .into_iter()
            .chain(self.queue.drain(..).map(|(_, e)| e))
            .filter(|e| !e.is_disconnect())
            .collect();
        let stopped = Stopped {
            scope_id: self.scope_id,
            key: self.key.clone(),
            leftover,
            in_hand,
            flushed,
            accepted: self.accepted,
            lost,
            subject: std::mem::replace(&mut self.subject, RawValue::NULL.to_owned()),
        };
        self.links
            .supervisor
            .do_send(ScopeReport::Stopped(Box::new(stopped), ctx.address()));
        // Not ctx.stop(): an Enqueue the Supervisor sent before it read the
        // report would die in a stopped mailbox. Such events are bounced
        // until the Supervisor answers with Terminate (rule: nothing lost).
        self.stopped = true;
    }

    /// Turns an outgoing application event into a Bot API call.
    fn outgoing(
        &mut self,
        sid: Sid,
        event: Result<Outgoing, OutgoingError>,
        ctx: &mut Context<Self>,
    ) {
        let download = matches!(event, Ok(Outgoing::Download { .. }));
        let (method, mut params, request_id) = match event {
            Ok(out) => out.into_call(),
            Err(e) => {
                log::warn!("scope={} {e}; skipped", self.key);
                return;
            }
        };
        self.fill_defaults(&method, &mut params);
        let reply = request_id.map(|request_id| ReplyTo {
            to: ctx.address().recipient(),
            request_id,
            sid,
        });
        if reply.is_some() {
            self.awaiting += 1;
        }
        let mut call = Call::new(method, params, reply).from_worker(self.links.worker.clone());
        if download {
            // A download only reads, so making it again after a redelivery
            // does no harm: it carries no cause and takes no ordinal from the
            // calls that do.
            call = call.as_download();
        } else if let Some(h) = &mut self.in_hand {
            call = call.caused_by(Cause {
                update_id: h.update_id,
                ordinal: h.calls,
            });
            h.calls += 1;
        }
        self.links.outbox.call(call);
    }

    /// `chat_id` (and a business conversation's `business_connection_id`) default to
    /// the scope's own, for methods that take them.
    fn fill_defaults(&self, method: &str, params: &mut Params) {
        let ScopeKey::Chat { id, conversation } = &self.key else {
            return;
        };
        if takes(methods::CHAT_ID_METHODS, method) {
            params.insert_absent("chat_id", &json!(id));
        }
        if let Conversation::Business(conn) = conversation {
            if takes(methods::BUSINESS_METHODS, method) {
                params.insert_absent("business_connection_id", &json!(conn));
            }
        }
    }
}

fn takes(table: &[&str], method: &str) -> bool {
    table.binary_search(&method).is_ok()
}

impl Actor for ScopeActor {
    type Context = Context<Self>;
}

impl Handler<Enqueue> for ScopeActor {
    type Result = ();
    fn handle(&mut self, msg: Enqueue, ctx: &mut Context<Self>) {
        if self.stopped {
            self.links.supervisor.do_send(ScopeReport::Bounced {
                key: self.key.clone(),
                events: msg.0,
            });
            return;
        }
        self.accepted += msg.0.len() as u64;
        for event in msg.0 {
            self.push(event);
        }
        match self.instance {
            Instance::Running { sid } => self.flush(sid),
            Instance::None => self.start_instance(ctx),
            // The Supervisor sends new events to a new scope once it closed
            // this one; any sent before the close may still be read.
            Instance::Closing { sid } => self.flush(sid),
        }
    }
}

impl Handler<Terminate> for ScopeActor {
    type Result = ();
    fn handle(&mut self, _: Terminate, ctx: &mut Context<Self>) {
        ctx.stop();
    }
}

impl Handler<Close> for ScopeActor {
    type Result = ();
    fn handle(&mut self, msg: Close, ctx: &mut Context<Self>) {
        if self.stopped {
            return;
        }
        match self.instance {
            Instance::Running { sid } => {
                log::debug!("scope={} closing ({})", self.key, msg.reason);
                self.push(Event::Json(
                    json!({"type": "telegram.disconnect", "reason": msg.reason}),
                ));
                // Everything, awaited call or not: the bridge still gives the
                // response first, and the instance must see the disconnect.
                self.write_unsent(sid);
                self.links.worker.do_send(Write(
                    ToWorker::Close {
                        sid,
                        grace: self.links.grace.as_secs_f64(),
                    }
                    .encode(),
                ));
                self.instance = Instance::Closing { sid };
            }
            Instance::Closing { .. } => {}
            Instance::None => self.stop_with_leftovers(None, ctx),
        }
    }
}

impl Handler<InstanceMsg> for ScopeActor {
    type Result = ();
    fn handle(&mut self, msg: InstanceMsg, ctx: &mut Context<Self>) {
        let sid = match &msg {
            InstanceMsg::Received { sid, .. }
            | InstanceMsg::Idle { sid }
            | InstanceMsg::Send { sid, .. }
            | InstanceMsg::Ended { sid, .. }
            | InstanceMsg::WorkerLost { sid, .. } => *sid,
        };
        if self.current_sid() != Some(sid) {
            return;
        }
        match msg {
            InstanceMsg::Received { seq, .. } => {
                let mut ids = Vec::new();
                while self.queue.front().is_some_and(|(s, _)| *s <= seq) {
                    let Some((_, e)) = self.queue.pop_front() else {
                        break;
                    };
                    if e.is_disconnect() {
                        // Still on the update in hand: the disconnect is
                        // part of handling it.
                        continue;
                    }
                    crate::ops::metrics::metrics().delivered(&e);
                    if let Some(update_id) = e.update_id() {
                        self.finish_in_hand();
                        ids.push(update_id);
                        self.in_hand = Some(Box::new(InHand {
                            update_id,
                            event: e,
                            calls: 0,
                        }));
                    }
                }
                if self.queue.is_empty() {
                    // A drained queue keeps its capacity, which an idle scope
                    // would otherwise hold for as long as it lives.
                    self.queue = VecDeque::new();
                }
                if !ids.is_empty() {
                    self.links.supervisor.do_send(ScopeReport::Received {
                        scope_id: self.scope_id,
                        key: self.key.clone(),
                        ids,
                    });
                }
                self.progressed = true;
            }
            InstanceMsg::Idle { .. } => {
                if self.awaiting == 0 {
                    self.finish_in_hand();
                    self.report_idle();
                }
            }
            InstanceMsg::Send { sid, event } => self.outgoing(sid, event, ctx),
            InstanceMsg::Ended {
                error, cancelled, ..
            } => {
                if let Some(tb) = error {
                    log::error!(
                        "scope={} application instance raised; the next update starts a fresh one\n{}",
                        self.key,
                        tb.trim_end()
                    );
                } else if cancelled {
                    log::info!(
                        "scope={} application instance cancelled after the grace period",
                        self.key
                    );
                }
                let closing = matches!(self.instance, Instance::Closing { .. });
                // An instance a close cancelled in the middle of an update did
                // not finish it: it goes with the leftovers (to a fresh
                // instance, or on a stop to the journal for the next start).
                // Any other end means the app is done with it (one that raised
                // would raise again).
                if !(cancelled && closing) {
                    self.finish_in_hand();
                }
                self.instance = Instance::None;
                // Daemon-made events die with the instance they were for.
                self.queue.retain(|(_, e)| !e.is_disconnect());
                if closing {
                    self.stop_with_leftovers(None, ctx);
                } else if self.queue.is_empty() {
                    self.links.supervisor.do_send(ScopeReport::InstanceEnded {
                        scope_id: self.scope_id,
                        key: self.key.clone(),
                        through: self.accepted,
                    });
                } else if self.progressed {
                    self.start_instance(ctx);
                } else {
                    log::warn!(
                        "scope={} instance ended without receiving anything; {} event(s) wait for the next update",
                        self.key,
                        self.queue.len()
                    );
                }
            }
            InstanceMsg::WorkerLost { death, .. } => {
                // The Supervisor logs the worker's death once for all its scopes.
                log::debug!(
                    "scope={} worker lost ({death:?}); {} unfinished event(s) go to a new instance",
                    self.key,
                    self.queue.len() + usize::from(self.in_hand.is_some())
                );
                self.instance = Instance::None;
                self.stop_with_leftovers(Some(death), ctx);
            }
        }
    }
}

impl Handler<CallDone> for ScopeActor {
    type Result = ();
    fn handle(&mut self, msg: CallDone, _: &mut Context<Self>) {
        if self.current_sid() != Some(msg.sid) {
            log::debug!(
                "scope={} API response for an ended instance dropped",
                self.key
            );
            return;
        }
        self.awaiting = self.awaiting.saturating_sub(1);
        let event = msg.outcome.into_event(msg.request_id);
        self.links.worker.do_send(Write(
            ToWorker::Response {
                sid: msg.sid,
                event: &event,
            }
            .encode(),
        ));
        // What waited for this outcome follows it.
        self.flush(msg.sid);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix::dev::ContextFut;

    /// With tokio's task header, trailer and stage around it, a scope's
    /// task takes 640 B while its actix future is at most 536 B (measured
    /// with heaptrack: 552 B made it 768 B), so growing past that costs every
    /// live scope another 128 B.
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn task_fits() {
        let size = std::mem::size_of::<ContextFut<ScopeActor, Context<ScopeActor>>>();
        assert!(size <= 536, "a scope's actix future takes {size} B");
    }
}
