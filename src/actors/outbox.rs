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
//! are written ([`Recorded`]). A row goes into a batch only once it is
//! needed, and a finished update waits up to [`ANSWERS_WAIT`] for its calls'
//! answers, so that usually the update's deletion and its calls' answers
//! share a batch and the calls need no row at all (`Gathered::due`). While
//! one batch is being written the next one gathers, so under load many
//! share a write; a reply never waits for one, only the chat's next call
//! does (until its answer is written).
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

use std::time::{Duration, Instant};

use actix::prelude::*;
use foldhash::{HashMap, HashSet};
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

/// Where the scopes and workers send the calls their apps make and the
/// updates they are done with: on a single node the [`Outbox`] in front of
/// the journal, in a cluster the relay to the engine
/// (`cluster::relay::Relay`). They see no difference.
#[derive(Clone)]
pub struct OutboxLink {
    calls: Recipient<Call>,
    done: Recipient<Done>,
}

impl OutboxLink {
    pub fn to<A>(addr: &Addr<A>) -> OutboxLink
    where
        A: Actor + Handler<Call> + Handler<Done>,
        A::Context: actix::dev::ToEnvelope<A, Call> + actix::dev::ToEnvelope<A, Done>,
    {
        OutboxLink {
            calls: addr.clone().recipient(),
            done: addr.clone().recipient(),
        }
    }

    pub fn call(&self, call: Call) {
        self.calls.do_send(call);
    }

    pub fn done(&self, updates: Vec<i64>) {
        self.done.do_send(Done(updates));
    }
}

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

/// How long a finished update's handled mark waits for the answers to its
/// calls (see [`Gathered::due`]), after which it is recorded handled
/// whatever became of them. Telegram answers most calls well within it; a
/// wait of 20 or 100 ms missed many answers even against the local
/// sandbox, while the updates it leaves to be delivered again after a kill
/// were about as many at 100 ms as at 1 s (docs/performance.md, "The
/// journal's record per update").
const ANSWERS_WAIT: Duration = Duration::from_secs(1);

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

impl Record {
    fn is_empty(&self) -> bool {
        self.calls.is_empty() && self.handled.is_empty() && self.sent.is_empty()
    }
}

/// An update the app is done with, not yet recorded handled.
struct Finished {
    id: i64,
    /// Until when its handled mark may wait for its calls' answers; `None`:
    /// it does not wait (a failed batch's, written again).
    until: Option<Instant>,
}

/// What gathers for the journal's next write, in arrival order.
#[derive(Default)]
struct Gathered {
    /// Rows not yet written.
    calls: Vec<NewCall>,
    handled: Vec<Finished>,
    /// Answers not yet written, of rows written or not.
    sent: Vec<SentCall>,
}

impl Gathered {
    /// Takes what the next write must carry, leaving what may wait; `all`
    /// takes everything (shutdown's [`Flush`]).
    ///
    /// A row is written only when something needs it (rules 5 and 6 of
    /// [`crate::journal`]): a call with no cause before it goes (nothing
    /// would make it again); a call whose answer is being written (the row,
    /// marked sent, recognises a repeat while its cause may come again; the
    /// journal writes none when the cause is handled in the same batch); a
    /// call whose cause is being recorded handled (unanswered, it is sent
    /// again after a restart). Until then a crash leaves its cause not
    /// handled, to be delivered again and make the call again, as when the
    /// daemon dies before a row it wrote at once.
    ///
    /// A finished update waits for the answers of its calls that have no
    /// row, up to [`ANSWERS_WAIT`], so that the common case (the answer in
    /// within milliseconds) writes the update's deletion and nothing for
    /// its calls. Its calls answered meanwhile are written as sent, so that
    /// their chats' next calls may go (the Sender's rule 1).
    fn due(&mut self, all: bool, now: Instant) -> Record {
        if all {
            return Record {
                calls: std::mem::take(&mut self.calls),
                handled: self.handled.drain(..).map(|f| f.id).collect(),
                sent: std::mem::take(&mut self.sent),
            };
        }
        let answered: HashSet<i64> = self.sent.iter().map(|s| s.id).collect();
        // Causes with a call that has neither a row nor an answer yet.
        let waiting_for: HashSet<i64> = self
            .calls
            .iter()
            .filter(|c| !answered.contains(&c.id))
            .filter_map(|c| c.cause)
            .collect();
        let mut handled = Vec::new();
        self.handled.retain(|f| {
            let waits = waiting_for.contains(&f.id) && f.until.is_some_and(|until| now < until);
            if !waits {
                handled.push(f.id);
            }
            waits
        });
        let ready: HashSet<i64> = handled.iter().copied().collect();
        let (calls, kept) = std::mem::take(&mut self.calls).into_iter().partition(|c| {
            c.cause.is_none_or(|cause| ready.contains(&cause)) || answered.contains(&c.id)
        });
        self.calls = kept;
        Record {
            calls,
            handled,
            sent: std::mem::take(&mut self.sent),
        }
    }

    /// When the first update that waits for answers stops waiting.
    fn next_due(&self) -> Option<Instant> {
        self.handled.iter().filter_map(|f| f.until).min()
    }

    /// A failed batch goes back in front of what gathered since, due at once.
    fn put_back(&mut self, failed: Record) {
        let Record {
            mut calls,
            handled,
            mut sent,
        } = failed;
        calls.append(&mut self.calls);
        sent.append(&mut self.sent);
        let mut finished: Vec<Finished> = handled
            .into_iter()
            .map(|id| Finished { id, until: None })
            .collect();
        finished.append(&mut self.handled);
        (self.calls, self.handled, self.sent) = (calls, finished, sent);
    }
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
    gathered: Gathered,
    /// A write is due when the first update waiting for answers stops
    /// waiting ([`Gathered::due`]).
    wake_armed: bool,
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
            gathered: Gathered::default(),
            wake_armed: false,
            releasing: Vec::new(),
            held: Vec::new(),
            held_writing: Vec::new(),
            writing: false,
            write_due: false,
            made: HashMap::default(),
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
        let Some(journal) = self.journal.clone() else {
            // Nothing to store: calls went straight on and have no rows.
            self.gathered.handled.clear();
            for w in self.flush_waiters.drain(..) {
                let _ = w.send(());
            }
            return;
        };
        let now = Instant::now();
        let record = self.gathered.due(!self.flush_waiters.is_empty(), now);
        if record.is_empty() {
            // What gathered may wait, the rows of held calls included (a
            // call without a cause is always due, so these have one).
            for call in self.held.drain(..) {
                self.sender.do_send(call);
            }
            for w in self.flush_waiters.drain(..) {
                let _ = w.send(());
            }
            self.wake_at(now, ctx);
            return;
        }
        self.writing = true;
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
                act.wake_at(Instant::now(), ctx);
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
        self.gathered.put_back(failed);
        for w in self.flush_waiters.drain(..) {
            let _ = w.send(());
        }
        ctx.run_later(delay, |act, ctx| {
            act.writing = false;
            act.write(ctx);
        });
    }

    /// Arms the one timer that writes once the first update waiting for
    /// answers stops waiting, if one waits.
    fn wake_at(&mut self, now: Instant, ctx: &mut Context<Self>) {
        if self.wake_armed {
            return;
        }
        if let Some(at) = self.gathered.next_due() {
            self.wake_armed = true;
            ctx.run_later(at.saturating_duration_since(now), |act, ctx| {
                act.wake_armed = false;
                act.write(ctx);
            });
        }
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
            self.gathered.calls.push(NewCall {
                id,
                cause: call.cause.map(|c| c.update_id),
                ordinal: call.cause.map_or(0, |c| c.ordinal),
                method: call.method.clone(),
                params: call.params.json().to_owned(),
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
        let until = Instant::now() + ANSWERS_WAIT;
        self.gathered
            .handled
            .extend(msg.0.into_iter().map(|id| Finished {
                id,
                until: Some(until),
            }));
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
            self.gathered.sent.push(SentCall {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::Journal;

    fn call(id: i64, cause: Option<i64>) -> NewCall {
        NewCall {
            id,
            cause,
            ordinal: 0,
            method: "sendMessage".into(),
            params: r#"{"chat_id":1,"text":"hi"}"#.into(),
        }
    }

    fn answer(id: i64) -> SentCall {
        SentCall { id, outcome: None }
    }

    fn finished(id: i64, now: Instant) -> Finished {
        Finished {
            id,
            until: Some(now + ANSWERS_WAIT),
        }
    }

    fn ids(record: &Record) -> (Vec<i64>, Vec<i64>, Vec<i64>) {
        (
            record.calls.iter().map(|c| c.id).collect(),
            record.handled.clone(),
            record.sent.iter().map(|s| s.id).collect(),
        )
    }

    fn journal_with(dir: &std::path::Path, updates: &[i64]) -> Journal {
        let mut j = Journal::open(dir, "j").unwrap();
        let batch: Vec<(i64, String)> = updates.iter().map(|i| (*i, "{}".to_string())).collect();
        j.append(&batch, None).unwrap();
        j
    }

    /// A fresh journal holding update 10, the time, nothing gathered.
    fn holding_update_10() -> (tempfile::TempDir, Journal, Instant, Gathered) {
        let dir = tempfile::tempdir().unwrap();
        let j = journal_with(dir.path(), &[10]);
        (dir, j, Instant::now(), Gathered::default())
    }

    /// The journal as the next start finds it.
    fn reopened(dir: &tempfile::TempDir, j: Journal) -> Journal {
        drop(j);
        Journal::open(dir.path(), "j").unwrap()
    }

    fn write(j: &mut Journal, record: &Record) {
        j.record(&record.calls, &record.handled, &record.sent)
            .unwrap();
    }

    #[test]
    fn a_finished_update_waits_for_its_calls_answer_and_then_needs_no_outbox_row() {
        let (dir, mut j, now, mut g) = holding_update_10();
        g.calls.push(call(1, Some(10)));
        g.handled.push(finished(10, now));
        let first = g.due(false, now);
        assert!(first.is_empty(), "nothing is due yet: {:?}", ids(&first));
        assert_eq!(g.next_due(), Some(now + ANSWERS_WAIT));
        g.sent.push(answer(1));
        let record = g.due(false, now);
        assert_eq!(ids(&record), (vec![1], vec![10], vec![1]));
        assert!(g.due(false, now).is_empty() && g.next_due().is_none());
        write(&mut j, &record);
        // After a restart nothing comes again: not the update, not the call.
        let mut j = reopened(&dir, j);
        assert!(j.is_empty().unwrap());
        let r = j.recover().unwrap();
        assert!(r.resend.is_empty() && r.answered.is_empty(), "{r:?}");
        assert_eq!(r.next_id, 1, "no row was ever written");
    }

    #[test]
    fn an_update_waits_no_longer_than_answers_wait_and_its_unanswered_call_is_sent_again() {
        let (dir, mut j, now, mut g) = holding_update_10();
        g.calls.push(call(1, Some(10)));
        g.handled.push(finished(10, now));
        assert!(g.due(false, now + ANSWERS_WAIT / 2).is_empty());
        let record = g.due(false, now + ANSWERS_WAIT);
        assert_eq!(ids(&record), (vec![1], vec![10], vec![]));
        write(&mut j, &record);
        let mut j = reopened(&dir, j);
        assert!(j.is_empty().unwrap(), "recorded handled");
        let r = j.recover().unwrap();
        let resend: Vec<i64> = r.resend.iter().map(|c| c.id).collect();
        assert_eq!(resend, vec![1], "its row brings the call back instead");
    }

    #[test]
    fn an_answer_while_the_update_is_in_hand_is_written_with_its_row_to_recognise_a_repeat() {
        let (dir, mut j, now, mut g) = holding_update_10();
        g.calls.push(call(1, Some(10)));
        g.calls.push(call(2, Some(10)));
        assert!(g.due(false, now).is_empty(), "rows wait for a need");
        g.sent.push(answer(1));
        // The answer must be written before the chat's next call may go
        // (the Sender's rule 1); the other call's row still waits.
        let record = g.due(false, now);
        assert_eq!(ids(&record), (vec![1], vec![], vec![1]));
        write(&mut j, &record);
        // Killed now: update 10 comes again; its call 0 was made, the other
        // (no row) is made again by the redelivery.
        let mut j = reopened(&dir, j);
        assert_eq!(j.len().unwrap(), 1);
        let r = j.recover().unwrap();
        assert!(r.resend.is_empty(), "{r:?}");
        assert_eq!(r.answered.len(), 1);
        assert_eq!((r.answered[0].cause, r.answered[0].ordinal), (10, 0));
    }

    #[test]
    fn a_call_without_a_cause_is_due_at_once_and_flush_takes_everything() {
        let now = Instant::now();
        let mut g = Gathered::default();
        g.calls.push(call(1, None));
        g.calls.push(call(2, Some(10)));
        g.handled.push(finished(10, now));
        g.handled.push(finished(11, now));
        let record = g.due(false, now);
        assert_eq!(
            ids(&record),
            (vec![1], vec![11], vec![]),
            "no cause would make 1 again; 11 has no call to wait for"
        );
        let all = g.due(true, now);
        assert_eq!(ids(&all), (vec![2], vec![10], vec![]));
        assert!(g.calls.is_empty() && g.handled.is_empty());
    }

    #[test]
    fn a_failed_batch_goes_back_in_front_and_is_due_at_once() {
        let now = Instant::now();
        let mut g = Gathered::default();
        g.calls.push(call(3, Some(12)));
        g.handled.push(finished(12, now));
        g.put_back(Record {
            calls: vec![call(1, Some(10))],
            handled: vec![10],
            sent: vec![],
        });
        assert_eq!(g.calls.iter().map(|c| c.id).collect::<Vec<_>>(), vec![1, 3]);
        let record = g.due(false, now);
        assert_eq!(ids(&record), (vec![1], vec![10], vec![]), "12 still waits");
    }
}
