//! Poller: long-polls `getUpdates` and hands each batch to the Supervisor.
//!
//! Owns: the offset (one past everything the journal has stored), a copy of
//! the journal's watermark, the one getUpdates in flight and its backoff.
//! Takes: [`Backpressure`] (from the Supervisor), [`StopPolling`].
//! Sends: [`WatchBackpressure`] to the Supervisor once, at start; each
//! batch's new updates as [`Dispatch`] to the Supervisor and as [`Append`]
//! to the journal; the [`FatalHook`] when polling cannot go on.
//! Stops: on [`StopPolling`], answering with the offset to confirm (once
//! an append under way is written: rule 9); by itself when Telegram
//! rejects the token (401), after calling the hook.
//!
//! 1. Exactly one getUpdates is in flight; the next starts when it answered.
//! 2. Updates the journal has seen before (Telegram resends what was not
//!    confirmed) are dropped, by the journal's own rule against a copy of its
//!    watermark. The new ones go to the journal and, without waiting for it,
//!    to the Supervisor; once the journal has stored them the offset moves
//!    one past the batch's highest update_id, so the next call confirms to
//!    Telegram only what is on disk. A failed store is retried, not polled
//!    past.
//! 3. An element that is not an update (no object, no integer update_id, or
//!    JSON serde_json cannot decode, such as one nested beyond its recursion
//!    limit) is logged, counted as skipped (kind `(malformed)`) and skipped;
//!    the rest of the batch is delivered, and the offset moves past its id
//!    when it has one, so it is not fetched again.
//! 4. A batch whose ids do not rise (Telegram never sends that) is put in
//!    update_id order, repeated ids dropped, with one warning. Rule 2 tells
//!    a resend by comparing each id, in batch order, with a watermark the
//!    batch itself raises, so an id lower than one before it in the same
//!    batch would be taken for a resend and never delivered; in id order
//!    every new id is above the mark, in the Poller and in the journal
//!    alike, and the apps get the order the journal would give back after
//!    a restart.
//! 5. While the daemon holds `max_undelivered` updates the apps have not
//!    received, no new getUpdates starts (backpressure): Telegram keeps the
//!    rest, and memory stays bounded. The Supervisor keeps that count and
//!    sends [`Backpressure`] when it crosses the limit; a paused Poller polls
//!    again on the message that lifts it. The first getUpdates waits for the
//!    Supervisor's answer to [`WatchBackpressure`] (updates left in the
//!    journal are dispatched before polling starts).
//! 6. On 429 the next call waits exactly `retry_after` (clamped to 1 s..1 h
//!    when it is parsed, [`crate::telegram::RETRY_AFTER_SECS`]); on other
//!    failures, a timeout included, it waits a capped exponential backoff
//!    with jitter, reset by a success.
//! 7. 401 is fatal: the token was rejected and retrying cannot help.
//! 8. 409 means another poller or a webhook holds the token: logged as such,
//!    then backoff.
//! 9. [`StopPolling`] during an append waits for it, then answers with the
//!    offset past the batch. The journal thread skips a message whose
//!    sender stopped waiting for the answer (actix drops it unhandled), so
//!    cancelling the append would lose it: the apps have the batch already
//!    and may have answered it, and the next start would deliver it again.

use std::time::Duration;

use actix::prelude::*;
use futures_util::FutureExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::actors::intake::{journal_rows, log_resent, Gate, GateWords};
use crate::actors::supervisor::{Dispatch, Supervisor, WatchBackpressure};
use crate::backoff::Backoff;
use crate::journal::{admit, Append, JournalActor};
use crate::telegram::{Bot, Skipped, TelegramError, Update};

/// The kind label under which skipped malformed updates are counted.
const MALFORMED: &str = "(malformed)";

/// The wait after a failed getUpdates or store (rule 6); the cluster's
/// ingress waits the same.
pub(crate) const BACKOFF: Backoff =
    Backoff::new(Duration::from_millis(500), Duration::from_secs(30));

/// getUpdates' parameters that stay the same from call to call, shared with
/// the cluster's ingress so that both poll alike.
#[derive(Debug, Clone)]
pub(crate) struct PollParams {
    pub poll_timeout: Duration,
    pub limit: u8,
    pub allowed_updates: Vec<String>,
}

impl PollParams {
    pub(crate) fn new(telegram: &crate::settings::TelegramSettings) -> PollParams {
        PollParams {
            poll_timeout: telegram.poll_timeout,
            limit: telegram.poll_limit,
            allowed_updates: telegram.allowed_updates.clone(),
        }
    }

    /// The parameters of one getUpdates, confirming everything below
    /// `offset`.
    pub(crate) fn params(&self, offset: Option<i64>) -> Value {
        let mut params = json!({
            "timeout": self.poll_timeout.as_secs(),
            "limit": self.limit,
        });
        if let Some(offset) = offset {
            params["offset"] = json!(offset);
        }
        if !self.allowed_updates.is_empty() {
            params["allowed_updates"] = json!(self.allowed_updates);
        }
        params
    }

    /// The deadline of one getUpdates: the long poll plus the HTTP timeout.
    pub(crate) fn deadline(&self, bot: &Bot) -> Duration {
        self.poll_timeout + bot.http_timeout()
    }
}

/// What to do after getUpdates failed (rules 6 to 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum AfterFailure {
    /// Poll again after this wait.
    Retry(Duration),
    /// The token was rejected (401): polling cannot go on.
    TokenRejected,
}

/// Decides the wait after getUpdates failed for the `failures`-th time in a
/// row (0-based) and logs the one line that says so, under `target` (the
/// Poller's module, or the cluster's ingress).
pub(crate) fn after_failure(target: &str, e: &TelegramError, failures: u32) -> AfterFailure {
    match e {
        TelegramError::RetryAfter { retry_after, .. } => {
            log::warn!(target: target, "getUpdates: 429 from Telegram; polling again in {retry_after}s");
            AfterFailure::Retry(Duration::from_secs(*retry_after))
        }
        TelegramError::Unauthorized => {
            log::error!(target: target, "getUpdates: the token was rejected (401 Unauthorized); stopping");
            AfterFailure::TokenRejected
        }
        other => {
            let delay = BACKOFF.delay(failures);
            match other {
                TelegramError::Conflict { description } => log::error!(
                    target: target,
                    "getUpdates: 409 Conflict: another poller or a webhook holds this token ({description}); retrying in {:.1}s",
                    delay.as_secs_f64()
                ),
                other => log::warn!(
                    target: target,
                    "getUpdates failed: {other}; retrying in {:.1}s",
                    delay.as_secs_f64()
                ),
            }
            AfterFailure::Retry(delay)
        }
    }
}

/// Stop polling; answers with the offset that confirms everything stored.
#[derive(Message)]
#[rtype(result = "Option<i64>")]
pub struct StopPolling;

/// Whether the updates the apps have not received yet hold polling back
/// (rule 5); sent by the Supervisor when that changes.
#[derive(Debug, PartialEq, Eq, Message)]
#[rtype(result = "()")]
pub struct Backpressure {
    pub paused: bool,
    /// Updates dispatched that no app has received, as the state changed.
    pub undelivered: usize,
}

/// How the Poller ends the daemon when polling cannot go on.
pub type FatalHook = Box<dyn FnOnce(TelegramError)>;

/// Where a Poller's updates go and what holds it back.
pub struct Delivery {
    pub supervisor: Addr<Supervisor>,
    pub journal: Option<Addr<JournalActor>>,
    /// The Supervisor's limit (rule 5), for the log.
    pub max_undelivered: usize,
}

/// How the Poller's pauses read in the log (rule 5).
const GATE_WORDS: GateWords = GateWords {
    target: module_path!(),
    paused: "polling paused",
    resumed: "polling resumed",
};

pub struct Poller {
    bot: Bot,
    delivery: Delivery,
    poll: PollParams,
    /// The offset of the next getUpdates: one past everything stored.
    offset: Option<i64>,
    /// The journal's watermark (its rule 2), as of the batches sent to it.
    watermark: Option<i64>,
    failures: u32,
    fatal: Option<FatalHook>,
    in_flight: Option<SpawnHandle>,
    /// An append is under way (not a retry's wait): rule 9.
    storing: bool,
    /// Who waits for the stop once the append under way is written.
    stopping: Option<oneshot::Sender<Option<i64>>>,
    gate: Gate,
    /// A poll waits for the gate to open.
    deferred: bool,
    /// A webhook delivered updates lately (journal rule 11): Telegram may
    /// still hold one whose id is below the watermark (refused with 503
    /// while later ones were taken), so until Telegram has nothing older
    /// left, polling starts from what it holds and the journal's `seen`
    /// table, asked before anything is dispatched, tells new from resent.
    after_webhook: bool,
    /// While `after_webhook`: ids up to this were stored by polling before.
    polled: Option<i64>,
}

/// Where polling starts, from the journal.
pub struct Start {
    /// The journal's watermark (its rule 2).
    pub watermark: Option<i64>,
    /// A webhook delivered updates lately (its rule 11).
    pub after_webhook: bool,
    /// The highest update_id polling stored (its rule 12).
    pub polled: Option<i64>,
}

impl Poller {
    pub fn new(
        bot: Bot,
        delivery: Delivery,
        telegram: &crate::settings::TelegramSettings,
        start: Start,
        fatal: FatalHook,
    ) -> Poller {
        let Start {
            watermark,
            after_webhook,
            polled,
        } = start;
        if after_webhook {
            log::info!(
                "journal: a webhook delivered updates lately; polling takes what Telegram still holds and tells resends by id"
            );
        }
        Poller {
            bot,
            delivery,
            poll: PollParams::new(telegram),
            offset: if after_webhook {
                None
            } else {
                watermark.map(|w| w + 1)
            },
            watermark,
            failures: 0,
            fatal: Some(fatal),
            in_flight: None,
            storing: false,
            stopping: None,
            gate: Gate::default(),
            deferred: false,
            after_webhook,
            polled,
        }
    }

    /// Polls now, or once the apps have caught up (rule 5).
    fn poll_when_ready(&mut self, ctx: &mut Context<Self>) {
        if self.gate.admits(self.delivery.max_undelivered, &GATE_WORDS) {
            self.poll(ctx);
        } else {
            self.deferred = true;
        }
    }

    /// Hands the new updates of a batch to the journal and the Supervisor,
    /// and polls again once they are stored (rule 2).
    fn store_and_dispatch(
        &mut self,
        mut updates: Vec<Update>,
        next: Option<i64>,
        ctx: &mut Context<Self>,
    ) {
        in_id_order(&mut updates);
        let Some(journal) = self.delivery.journal.clone() else {
            self.offset = next;
            if !updates.is_empty() {
                self.delivery.supervisor.do_send(Dispatch(updates));
            }
            self.poll_when_ready(ctx);
            return;
        };
        let fetched_with = self.offset;
        if self.after_webhook && updates.is_empty() {
            // Telegram holds nothing older: from here ids are new past the
            // watermark, as without a webhook.
            self.after_webhook = false;
            self.offset = next.max(self.watermark.map(|w| w + 1));
            self.poll_when_ready(ctx);
            return;
        }
        let count = updates.len();
        if self.after_webhook {
            let polled = self.polled;
            updates.retain(|u| polled.is_none_or(|p| u.id.0 > p));
        } else {
            updates.retain(|u| admit(&mut self.watermark, u.id.0, fetched_with));
        }
        log_resent(module_path!(), count - updates.len());
        if updates.is_empty() {
            self.offset = next;
            self.poll_when_ready(ctx);
            return;
        }
        let append = Append {
            batch: journal_rows(&updates),
            fetched_with,
            by_webhook: self.after_webhook,
        };
        if self.after_webhook {
            // Which are new only the journal's `seen` can say: dispatched
            // once it answered.
            self.store(journal, append, Some(updates), next, ctx);
            return;
        }
        // The journal's one thread takes messages in the order they were
        // sent, and a record about these updates can only come once an app
        // has had them, so their append, queued in this same turn, is written
        // first. Dispatched first: waking the journal thread costs the actor
        // thread a system call that the update need not wait for.
        self.delivery.supervisor.do_send(Dispatch(updates));
        self.store(journal, append, None, next, ctx);
    }

    /// Stores a batch, then polls again; `held` are updates not dispatched
    /// yet, of which the new ones go once the journal said which they are.
    fn store(
        &mut self,
        journal: Addr<JournalActor>,
        append: Append,
        held: Option<Vec<Update>>,
        next: Option<i64>,
        ctx: &mut Context<Self>,
    ) {
        // The journal's mailbox never nears its capacity (the Poller and the
        // Outbox each keep one message in flight), so `send` queues at once.
        let stored = journal.send(append.clone());
        self.storing = true;
        self.in_flight = Some(ctx.spawn(stored.into_actor(self).map(move |result, act, ctx| {
            let mut held = held;
            act.in_flight = None;
            act.storing = false;
            let result =
                result.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string()));
            if let Ok(fresh) = &result {
                act.failures = 0;
                if let Some(held) = held.take() {
                    act.dispatch_fresh(held, fresh);
                }
                act.offset = next;
            }
            if let Some(stopping) = act.stopping.take() {
                // Rule 9: stored or not, the offset now says what is on disk.
                let _ = stopping.send(act.offset);
                ctx.stop();
                return;
            }
            match result {
                Ok(_) => act.poll_when_ready(ctx),
                Err(e) => {
                    // Not stored means not confirmed: Telegram keeps them,
                    // and the apps have them already, so the same batch is
                    // stored again rather than fetched again.
                    let delay = BACKOFF.delay(act.failures);
                    act.failures = act.failures.saturating_add(1);
                    log::error!(
                        "journal: cannot store {count} update(s): {e}; they stay unconfirmed, retrying in {:.1}s",
                        delay.as_secs_f64(),
                        count = append.batch.len()
                    );
                    act.in_flight = Some(ctx.run_later(delay, move |act, ctx| {
                        act.store(journal, append, held, next, ctx);
                    }));
                }
            }
        })));
    }

    /// Dispatches the updates of `held` the journal stored as new (`fresh`);
    /// the rest were delivered by the webhook already.
    fn dispatch_fresh(&mut self, held: Vec<Update>, fresh: &[i64]) {
        let fresh: std::collections::HashSet<i64> = fresh.iter().copied().collect();
        let count = held.len();
        let new: Vec<Update> = held
            .into_iter()
            .filter(|u| fresh.contains(&u.id.0))
            .collect();
        log_resent(module_path!(), count - new.len());
        if let Some(highest) = new.iter().map(|u| u.id.0).max() {
            self.watermark = self.watermark.max(Some(highest));
        }
        if !new.is_empty() {
            self.delivery.supervisor.do_send(Dispatch(new));
        }
    }

    fn poll(&mut self, ctx: &mut Context<Self>) {
        let bot = self.bot.clone();
        let params = self.poll.params(self.offset);
        let timeout = self.poll.deadline(&bot);
        let fut = async move { bot.get_updates(&params, timeout).await };
        self.in_flight = Some(ctx.spawn(fut.into_actor(self).map(|result, act, ctx| {
            act.in_flight = None;
            act.answered(result, ctx);
        })));
    }

    fn answered(&mut self, result: Result<Vec<Item>, TelegramError>, ctx: &mut Context<Self>) {
        match result {
            Ok(items) => {
                self.failures = 0;
                let mut next = self.offset;
                let updates = take_batch(&mut next, items);
                self.store_and_dispatch(updates, next, ctx);
            }
            Err(e) => match after_failure(module_path!(), &e, self.failures) {
                AfterFailure::Retry(delay) => self.retry(delay, ctx),
                AfterFailure::TokenRejected => {
                    if let Some(fatal) = self.fatal.take() {
                        fatal(TelegramError::Unauthorized);
                    }
                    ctx.stop();
                }
            },
        }
    }

    fn retry(&mut self, delay: Duration, ctx: &mut Context<Self>) {
        self.failures = self.failures.saturating_add(1);
        self.in_flight = Some(ctx.run_later(delay, |act, ctx| act.poll(ctx)));
    }
}

/// Puts a batch in update_id order and drops repeated ids (rule 4), saying
/// so in one line when it had to.
fn in_id_order(updates: &mut Vec<Update>) {
    in_id_order_as(module_path!(), updates);
}

/// [`in_id_order`], logging under `target` (the cluster's ingress shares it).
pub(crate) fn in_id_order_as(target: &str, updates: &mut Vec<Update>) {
    if updates.windows(2).all(|w| w[0].id < w[1].id) {
        return;
    }
    const SHOWN: usize = 10;
    let mut arrived = updates
        .iter()
        .take(SHOWN)
        .map(|u| u.id.0.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    if updates.len() > SHOWN {
        arrived.push_str(", ...");
    }
    // Stable: of repeated ids, the first to arrive is kept.
    updates.sort_by_key(|u| u.id);
    let count = updates.len();
    updates.dedup_by_key(|u| u.id);
    let repeated = match count - updates.len() {
        0 => String::new(),
        n => format!("; {n} repeated id(s) dropped"),
    };
    log::warn!(
        target: target,
        "getUpdates answered update ids that went backwards ({arrived}); delivering the {} update(s) in update_id order{repeated}",
        updates.len()
    );
}

/// One element of getUpdates' result.
pub(crate) type Item = Result<Update, Skipped>;

/// Turns getUpdates' result into updates and moves the offset past them.
fn take_batch(offset: &mut Option<i64>, items: Vec<Item>) -> Vec<Update> {
    take_batch_as(module_path!(), offset, items)
}

/// [`take_batch`], logging under `target` (the cluster's ingress shares it).
pub(crate) fn take_batch_as(
    target: &str,
    offset: &mut Option<i64>,
    items: Vec<Item>,
) -> Vec<Update> {
    let mut updates = Vec::with_capacity(items.len());
    for item in items {
        // Even a malformed element usually has an id; confirm past it.
        let id = match &item {
            Ok(update) => Some(update.id.0),
            Err(skipped) => skipped.id,
        };
        if let Some(id) = id {
            *offset = Some(offset.map_or(id + 1, |o| o.max(id + 1)));
        }
        match item {
            Ok(update) => updates.push(update),
            Err(Skipped { id, error }) => {
                match id {
                    Some(id) => {
                        log::warn!(target: target, "update={id} is malformed and skipped: {error}")
                    }
                    None => log::warn!(
                        target: target,
                        "a malformed element of getUpdates' result skipped: {error}"
                    ),
                }
                crate::ops::metrics::metrics()
                    .updates_skipped
                    .inc(&[MALFORMED]);
            }
        }
    }
    updates
}

impl Actor for Poller {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.delivery
            .supervisor
            .do_send(WatchBackpressure(ctx.address().recipient()));
        self.poll_when_ready(ctx);
    }
}

impl Handler<Backpressure> for Poller {
    type Result = ();
    fn handle(&mut self, msg: Backpressure, ctx: &mut Context<Self>) {
        self.gate.set(&msg);
        // A poll in flight or storing goes on; the gate is looked at when
        // it would poll next.
        if std::mem::take(&mut self.deferred) {
            self.poll_when_ready(ctx);
        }
    }
}

impl Handler<StopPolling> for Poller {
    type Result = ResponseFuture<Option<i64>>;
    fn handle(&mut self, _: StopPolling, ctx: &mut Context<Self>) -> Self::Result {
        if self.storing {
            let (tx, rx) = oneshot::channel();
            self.stopping = Some(tx);
            return Box::pin(rx.map(Result::ok).map(Option::flatten));
        }
        // A getUpdates in flight, or a wait before the next one or before a
        // failed append's retry: nothing is lost by cancelling it.
        if let Some(h) = self.in_flight.take() {
            ctx.cancel_future(h);
        }
        ctx.stop();
        Box::pin(std::future::ready(self.offset))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(updates: &[Update]) -> Vec<i64> {
        updates.iter().map(|u| u.id.0).collect()
    }

    #[test]
    fn a_batch_going_backwards_is_put_in_id_order_and_admitted_whole() {
        let mut batch = take_batch(
            &mut None,
            items(
                r#"[{"update_id":52,"message":{"text":"a"}},{"update_id":51,"message":{}},
                    {"update_id":52,"message":{"text":"b"}},{"update_id":50,"message":{}}]"#,
            ),
        );
        in_id_order(&mut batch);
        assert_eq!(ids(&batch), vec![50, 51, 52]);
        assert_eq!(
            batch[2].value()["message"]["text"],
            "a",
            "the first 52 is kept"
        );
        // Rule 2 as the Poller and the journal apply it, in batch order.
        let mut watermark = Some(49);
        assert!(batch
            .iter()
            .all(|u| admit(&mut watermark, u.id.0, Some(50))));
        assert_eq!(watermark, Some(52));

        let mut rising = take_batch(
            &mut None,
            items(r#"[{"update_id":7,"message":{}},{"update_id":9,"message":{}}]"#),
        );
        in_id_order(&mut rising);
        assert_eq!(ids(&rising), vec![7, 9]);
    }

    #[test]
    fn get_updates_parameters_and_the_wait_after_a_failure_are_the_pollers_rules() {
        let poll = PollParams {
            poll_timeout: Duration::from_secs(25),
            limit: 100,
            allowed_updates: vec!["message".into()],
        };
        assert_eq!(
            poll.params(Some(7)),
            json!({"timeout": 25, "limit": 100, "offset": 7, "allowed_updates": ["message"]})
        );
        let plain = PollParams {
            allowed_updates: Vec::new(),
            ..poll
        };
        assert_eq!(plain.params(None), json!({"timeout": 25, "limit": 100}));

        let target = module_path!();
        let retry_after = TelegramError::RetryAfter {
            retry_after: 7,
            description: "Too Many Requests".into(),
        };
        assert_eq!(
            after_failure(target, &retry_after, 5),
            AfterFailure::Retry(Duration::from_secs(7)),
            "429 waits exactly retry_after, whatever failed before"
        );
        assert_eq!(
            after_failure(target, &TelegramError::Unauthorized, 0),
            AfterFailure::TokenRejected
        );
        for e in [
            TelegramError::Conflict {
                description: "terminated by other getUpdates request".into(),
            },
            TelegramError::Server {
                code: 502,
                description: "Bad Gateway".into(),
            },
            TelegramError::Timeout(Duration::from_secs(35)),
        ] {
            let AfterFailure::Retry(delay) = after_failure(target, &e, 3) else {
                panic!("{e} is retried");
            };
            assert!(
                delay <= BACKOFF.ceiling(3) && delay >= BACKOFF.ceiling(3) / 2,
                "{e}: {delay:?}"
            );
        }
    }

    fn items(result: &str) -> Vec<Item> {
        let body = format!(r#"{{"ok":true,"result":{result}}}"#);
        crate::telegram::parse_updates(200, body.as_bytes()).expect("an envelope")
    }

    #[test]
    fn offset_moves_past_every_id_including_malformed_ones() {
        let mut offset = None;
        let deep = format!(
            r#"{{"update_id":14,"message":{}0{}}}"#,
            "[".repeat(1000),
            "]".repeat(1000)
        );
        let batch = items(&format!(
            r#"[{{"update_id":10,"message":{{}}}},{{"update_id":11}},{{"update_id":"bad"}},[1,2],
                {{"update_id":12,"weird":1}},{deep}]"#
        ));
        let got = take_batch(&mut offset, batch);
        assert_eq!(
            got.iter().map(|u| u.id.0).collect::<Vec<_>>(),
            vec![10, 11, 12]
        );
        assert_eq!(offset, Some(15), "past the undecodable 14 too");
        // An older id never moves the offset back.
        take_batch(&mut offset, items(r#"[{"update_id":5,"message":{}}]"#));
        assert_eq!(offset, Some(15));
    }
}
