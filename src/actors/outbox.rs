//! Outbox: where the apps' calls and the updates they finished meet the
//! journal, so that a reply outlives the daemon and an update delivered
//! twice is answered once.
//!
//! Owns: the row ids of stored calls; what gathers for the next journal
//! write (new calls, answers, handled updates) and the write under way; the
//! calls held until their rows are written; for each update in hand, what
//! became of every call made while handling it (to recognise repeats).
//! Takes: [`Call`] and [`Done`] from the scopes, [`Sent`] from the Sender,
//! [`Recover`] (once, at start), [`Flush`] (shutdown).
//! Sends: [`ReportSent`] to the Sender as it starts, then the calls
//! ([`Call`], with their row ids); `Record` batches to the journal thread;
//! [`Recorded`] to the Sender once a batch's answers are written;
//! [`CallDone`] to a scope whose repeated call asked for its outcome.
//! Stops: with the System. [`Flush`] resolves once everything received so
//! far is written (or its write failed), so that shutdown records what the
//! apps and the Sender finished.
//!
//! Scopes send it, in the order their app acted, the calls the app made
//! ([`Call`], each keyed by its cause and ordinal) and the updates the app is
//! done with ([`Done`]). It hands each call to the Sender at once, with the
//! row id it will have, and writes the rows, the answers the Sender reports
//! ([`Sent`]) and the finished updates to the journal in one transaction per
//! batch (rule 5 of [`crate::journal`]), then tells the Sender which answers
//! are written ([`Recorded`]). While one batch is being written the
//! next one gathers, so under load many share a write; a reply never waits
//! for one, only the chat's next call does (until its answer is written).
//!
//! A call whose key was made before, while its cause was not yet done, is a
//! repeat: the cause was delivered again, after a crash or a worker's death.
//! It is not made again; an app that asked for the outcome gets the first
//! call's. Keys are kept from a call until its cause is done; after a restart
//! they come from the journal ([`Recover`]).
//!
//! Without a journal (`--check`) calls pass straight to the Sender and
//! repeats are still recognised.
//!
//! A download's getFile ([`Call::download`]) passes straight to the Sender,
//! with or without a journal: it only reads, so it is neither stored nor
//! recognised as a repeat.

use std::collections::HashMap;
use std::time::Duration;

use actix::prelude::*;
use serde_json::{Map, Value};
use tokio::sync::oneshot;

use crate::actors::call::{Call, CallDone, Cause, Outcome, ReplyTo};
use crate::actors::sender::{Recorded, ReportSent, Sender};
use crate::backoff::Backoff;
use crate::journal::{JournalActor, JournalError, NewCall, Recovered, SentCall};
use crate::ops::metrics::metrics;

/// The app is done with these updates: they may leave the journal.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Done(pub Vec<i64>);

/// A tracked call (one with a row or a cause) has its final outcome: from
/// the Sender.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Sent {
    pub row: Option<i64>,
    pub cause: Option<Cause>,
    /// Kept when the app asked for it: a repeat gets the same answer.
    pub outcome: Option<Outcome>,
}

/// After a restart: the calls to send again and the keys of calls made.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Recover(pub Recovered);

/// The wait before writing a failed batch again: as the Poller's appends.
const BACKOFF: Backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// Resolves once everything received so far is written, or its write failed.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Flush;

/// One batch for the journal, written in one transaction.
#[derive(Message)]
#[rtype(result = "Result<(), NotRecorded>")]
struct Record {
    calls: Vec<NewCall>,
    handled: Vec<i64>,
    sent: Vec<SentCall>,
}

/// The batch's transaction rolled back whole: the Outbox writes `record`
/// again (see `Outbox::retry`).
struct NotRecorded {
    error: JournalError,
    record: Record,
}

impl Handler<Record> for JournalActor {
    type Result = Result<(), NotRecorded>;
    fn handle(&mut self, msg: Record, _: &mut SyncContext<Self>) -> Self::Result {
        let written = self.journal().record(&msg.calls, &msg.handled, &msg.sent);
        written.map_err(|error| NotRecorded { error, record: msg })
    }
}

/// What became of a call made while its cause was in hand.
enum Made {
    /// In the journal or with the Sender; repeats that want the outcome wait.
    Pending(Vec<ReplyTo>),
    /// Answered; the outcome when the first call wanted it.
    Answered(Option<Outcome>),
}

pub struct Outbox {
    journal: Option<Addr<JournalActor>>,
    sender: Addr<Sender>,
    /// The row id of the next call stored.
    next_id: i64,
    /// Gathered for the next write, in arrival order.
    calls: Vec<NewCall>,
    handled: Vec<i64>,
    sent: Vec<SentCall>,
    /// Rows of the `sent` calls not yet through a write: the Sender holds
    /// their chats until told ([`Recorded`]). A retried batch's rows were
    /// told already.
    releasing: Vec<i64>,
    /// Calls that go once their rows are written (see `store_and_send`):
    /// those whose rows gather for the next write, and those of the write
    /// under way.
    held: Vec<Call>,
    held_writing: Vec<Call>,
    writing: bool,
    /// A write is due once the messages queued now are handled.
    write_due: bool,
    /// cause -> ordinal -> what became of that call; until the cause is done.
    made: HashMap<i64, HashMap<u32, Made>>,
    flush_waiters: Vec<oneshot::Sender<()>>,
    /// Writes that failed in a row (they are retried, see `retry`).
    failures: u32,
}

impl Outbox {
    pub fn new(journal: Option<Addr<JournalActor>>, sender: Addr<Sender>) -> Outbox {
        Outbox {
            journal,
            sender,
            next_id: 1,
            calls: Vec::new(),
            handled: Vec::new(),
            sent: Vec::new(),
            releasing: Vec::new(),
            held: Vec::new(),
            held_writing: Vec::new(),
            writing: false,
            write_due: false,
            made: HashMap::new(),
            flush_waiters: Vec::new(),
            failures: 0,
        }
    }

    /// Starts a write of what has gathered, unless one is under way (its
    /// completion starts the next).
    fn write(&mut self, ctx: &mut Context<Self>) {
        if self.writing {
            return;
        }
        if self.calls.is_empty() && self.handled.is_empty() && self.sent.is_empty() {
            for w in self.flush_waiters.drain(..) {
                let _ = w.send(());
            }
            return;
        }
        let Some(journal) = self.journal.clone() else {
            // Nothing to store: calls went straight on and have no rows.
            self.handled.clear();
            return self.write(ctx);
        };
        self.writing = true;
        let record = Record {
            calls: std::mem::take(&mut self.calls),
            handled: std::mem::take(&mut self.handled),
            sent: std::mem::take(&mut self.sent),
        };
        let releasing = std::mem::take(&mut self.releasing);
        self.held_writing = std::mem::take(&mut self.held);
        journal
            .send(record)
            .into_actor(self)
            .map(move |written, act, ctx| {
                // Written or not, the chats go on: holding them would not
                // make a failing write succeed.
                if !releasing.is_empty() {
                    act.sender.do_send(Recorded(releasing));
                }
                for call in act.held_writing.drain(..) {
                    act.sender.do_send(call);
                }
                match written {
                    Ok(Ok(())) => {
                        act.failures = 0;
                        act.writing = false;
                        act.write(ctx);
                    }
                    Ok(Err(NotRecorded { error, record })) => act.retry(record, error, ctx),
                    // The journal thread is gone only when the system stops.
                    Err(e) => {
                        log::error!(
                            "journal: recording failed: {e}; the calls went without a durable copy"
                        );
                        act.writing = false;
                        act.write(ctx);
                    }
                }
            })
            .spawn(ctx);
    }

    /// A failed write rolled back whole, so the same batch goes in front of
    /// what gathered meanwhile and is written again: until it is, its calls
    /// went without a durable copy (a reply without one beats none) and its
    /// handled updates stay journaled, delivered again only if the daemon
    /// stops first. Shutdown does not wait for a journal that keeps failing:
    /// flush waiters are told after each attempt.
    fn retry(&mut self, failed: Record, e: JournalError, ctx: &mut Context<Self>) {
        let delay = BACKOFF.delay(self.failures);
        self.failures = self.failures.saturating_add(1);
        log::error!(
            "journal: recording {} call(s) and {} handled update(s) failed: {e}; the calls went without a durable copy; retrying in {:.1}s",
            failed.calls.len(),
            failed.handled.len(),
            delay.as_secs_f64()
        );
        let Record {
            mut calls,
            mut handled,
            mut sent,
        } = failed;
        calls.append(&mut self.calls);
        handled.append(&mut self.handled);
        sent.append(&mut self.sent);
        (self.calls, self.handled, self.sent) = (calls, handled, sent);
        for w in self.flush_waiters.drain(..) {
            let _ = w.send(());
        }
        ctx.run_later(delay, |act, ctx| {
            act.writing = false;
            act.write(ctx);
        });
    }

    /// Writes once the mailbox is drained: a scope reports an app's calls
    /// and the update it finished in one go, and they share a transaction.
    fn write_soon(&mut self, ctx: &mut Context<Self>) {
        if !self.write_due {
            self.write_due = true;
            ctx.spawn(
                fut::wrap_future::<_, Self>(std::future::ready(())).map(|(), act, ctx| {
                    act.write_due = false;
                    act.write(ctx);
                }),
            );
        }
    }

    /// Gives the call its row, queued for the next write, and sends it.
    ///
    /// A call made while handling an update goes at once: if the daemon dies
    /// before its row is written, its cause is not recorded handled either
    /// and makes it again. A call with no cause (lifespan, a background
    /// task) has nothing to bring it back, so it waits for its row, and so
    /// does every call after it, to keep the order in which the apps made
    /// them.
    fn store_and_send(&mut self, mut call: Call, ctx: &mut Context<Self>) {
        if self.journal.is_some() {
            let id = self.next_id;
            self.next_id += 1;
            call.row = Some(id);
            self.calls.push(NewCall {
                id,
                cause: call.cause.map(|c| c.update_id),
                ordinal: call.cause.map_or(0, |c| c.ordinal),
                method: call.method.clone(),
                params: encode(&call.params),
            });
            self.write_soon(ctx);
            if call.cause.is_none() || !self.held.is_empty() || !self.held_writing.is_empty() {
                self.held.push(call);
                return;
            }
        }
        self.sender.do_send(call);
    }

    /// A repeat of a call made before is answered from the first one's
    /// outcome; returns the call when it is not a repeat.
    fn repeat(&mut self, call: Call) -> Option<Call> {
        let Some(cause) = call.cause else {
            return Some(call);
        };
        let made = self.made.entry(cause.update_id).or_default();
        let Some(first) = made.get_mut(&cause.ordinal) else {
            made.insert(cause.ordinal, Made::Pending(Vec::new()));
            return Some(call);
        };
        metrics().calls_repeated.inc();
        log::debug!(
            "update={} call #{} method={} repeated after a redelivery; not made again",
            cause.update_id,
            cause.ordinal,
            call.method
        );
        if let Some(reply) = call.reply {
            match first {
                Made::Pending(waiters) => waiters.push(reply),
                Made::Answered(outcome) => answer(reply, outcome.clone()),
            }
        }
        None
    }
}

fn encode(params: &Map<String, Value>) -> String {
    // A map of `Value`s has string keys and finite numbers: it always encodes.
    serde_json::to_string(params).unwrap_or_default()
}

/// Tells a repeat that wanted the outcome what the first call got.
fn answer(reply: ReplyTo, outcome: Option<Outcome>) {
    let outcome = outcome.unwrap_or_else(Outcome::not_kept);
    reply.to.do_send(CallDone {
        request_id: reply.request_id,
        outcome,
        sid: reply.sid,
    });
}

impl Actor for Outbox {
    type Context = Context<Self>;

    /// First in the Sender's mailbox, ahead of every call this Outbox hands
    /// on, so that no outcome goes unreported.
    fn started(&mut self, ctx: &mut Context<Self>) {
        self.sender.do_send(ReportSent(ctx.address().recipient()));
    }
}

impl Handler<Call> for Outbox {
    type Result = ();
    fn handle(&mut self, call: Call, ctx: &mut Context<Self>) {
        if call.download {
            // Nothing to keep: it changes nothing at Telegram, so after a
            // crash it is simply made again.
            self.sender.do_send(call);
            return;
        }
        if let Some(call) = self.repeat(call) {
            self.store_and_send(call, ctx);
        }
    }
}

impl Handler<Done> for Outbox {
    type Result = ();
    fn handle(&mut self, msg: Done, ctx: &mut Context<Self>) {
        for id in &msg.0 {
            self.made.remove(id);
        }
        self.handled.extend(msg.0);
        self.write_soon(ctx);
    }
}

impl Handler<Sent> for Outbox {
    type Result = ();
    fn handle(&mut self, msg: Sent, ctx: &mut Context<Self>) {
        if let Some(cause) = msg.cause {
            if let Some(made) = self
                .made
                .get_mut(&cause.update_id)
                .and_then(|m| m.get_mut(&cause.ordinal))
            {
                if let Made::Pending(waiters) = made {
                    for reply in waiters.drain(..) {
                        answer(reply, msg.outcome.clone());
                    }
                }
                *made = Made::Answered(msg.outcome.clone());
            }
        }
        if let Some(id) = msg.row {
            self.releasing.push(id);
            self.sent.push(SentCall {
                id,
                outcome: msg.outcome.map(Outcome::into_answer),
            });
            self.write_soon(ctx);
        }
    }
}

impl Handler<Recover> for Outbox {
    type Result = ();
    fn handle(&mut self, msg: Recover, _: &mut Context<Self>) {
        let Recovered {
            resend,
            answered,
            next_id,
        } = msg.0;
        self.next_id = next_id;
        for a in answered {
            let outcome = a.outcome.map(Outcome::from_answer);
            self.made
                .entry(a.cause)
                .or_default()
                .insert(a.ordinal, Made::Answered(outcome));
        }
        if !resend.is_empty() {
            log::info!(
                "journal: sending {} call(s) the apps made before the restart",
                resend.len()
            );
        }
        for stored in resend {
            let mut call = Call::new(stored.method, stored.params, None);
            call.cause = stored.cause.map(|update_id| Cause {
                update_id,
                ordinal: stored.ordinal,
            });
            call.row = Some(stored.id);
            self.sender.do_send(call);
        }
    }
}

impl Handler<Flush> for Outbox {
    type Result = ResponseFuture<()>;
    fn handle(&mut self, _: Flush, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        self.flush_waiters.push(tx);
        self.write(ctx);
        Box::pin(async move {
            let _ = rx.await;
        })
    }
}
