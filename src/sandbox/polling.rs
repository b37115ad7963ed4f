//! getUpdates: confirmation, long polling and conflicts between pollers.

use std::time::{Duration, Instant};

use serde_json::{Map, Value};

use super::envelope::{ApiError, Outcome};
use super::faults::Fault;
use super::state::{AnsweredPoll, State};
use super::Shared;

/// Longest long poll Telegram honours, in seconds.
const MAX_TIMEOUT_SECS: i64 = 50;

/// How often a parked request checks whether its caller hung up: actix
/// does not notice while the request is pending.
const HANGUP_CHECK: Duration = Duration::from_millis(100);

/// Once updates arrive, a parked request waits this long for more before
/// answering, as Telegram does, so that a burst comes in one answer.
const BATCH_DELAY: Duration = Duration::from_millis(2);

const CONFLICT_OTHER_POLL: &str =
    "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running";
const CONFLICT_SET_WEBHOOK: &str = "Conflict: terminated by setWebhook request";
const CONFLICT_WEBHOOK_ACTIVE: &str =
    "Conflict: can't use getUpdates method while webhook is active; use deleteWebhook to delete the webhook first";

/// getUpdates' parameters, read with Telegram's defaults and bounds.
struct PollRequest {
    offset: i64,
    limit: usize,
    timeout: Duration,
    allowed_updates: Option<Value>,
}

impl PollRequest {
    fn parse(params: &Map<String, Value>) -> Self {
        let limit = integer(params, "limit").unwrap_or(100).clamp(1, 100);
        let timeout = integer(params, "timeout")
            .unwrap_or(0)
            .clamp(0, MAX_TIMEOUT_SECS);
        PollRequest {
            offset: integer(params, "offset").unwrap_or(0),
            // Both clamped to small positive ranges above.
            limit: usize::try_from(limit).unwrap_or(100),
            timeout: Duration::from_secs(u64::try_from(timeout).unwrap_or(0)),
            allowed_updates: allowed_updates(params.get("allowed_updates")),
        }
    }
}

/// Telegram reads an integer argument's leading digits: a present but
/// unreadable value counts as 0, an absent or empty one as the default.
fn integer(params: &Map<String, Value>, name: &str) -> Option<i64> {
    match params.get(name)? {
        Value::Number(n) => Some(
            n.as_i64()
                .unwrap_or_else(|| n.as_f64().unwrap_or(0.0) as i64),
        ),
        Value::String(s) if s.trim().is_empty() => None,
        Value::String(s) => Some(s.trim().parse().unwrap_or(0)),
        Value::Null => None,
        _ => Some(0),
    }
}

/// The list form of `allowed_updates`, also when sent JSON-serialized.
fn allowed_updates(value: Option<&Value>) -> Option<Value> {
    match value? {
        list @ Value::Array(_) => Some(list.clone()),
        Value::String(text) => serde_json::from_str::<Value>(text)
            .ok()
            .filter(Value::is_array),
        _ => None,
    }
}

/// How a getUpdates request ends.
pub(crate) enum PollAnswer {
    /// The answer, and the injected fault that executes the call (a delay,
    /// a stall, a drop) to apply to it, if any.
    Outcome(Outcome, Option<Fault>),
    /// An injected fault that does not execute the call (a 502, a 429, a
    /// dropped connection): nothing was confirmed.
    Refused(Fault),
    /// The caller closed the connection while parked; nobody will read an
    /// answer.
    HungUp,
}

/// What a new request does first.
enum Start {
    Answer(PollAnswer),
    /// Wait for updates; the number identifies this request as the current
    /// poller. With the fault for its answer.
    Park(u64, Option<Fault>),
}

/// What a parked request does after a change.
enum Parked {
    Waiting,
    /// Updates are there; answer after the batching delay.
    Ready,
    Done(Outcome),
}

/// Serves one getUpdates request, parking it until updates arrive, the
/// timeout passes, another request supersedes it, or the caller hangs up
/// (`hung_up` says whether it did).
pub(crate) async fn get_updates(
    shared: &Shared,
    params: &Map<String, Value>,
    arrived: Instant,
    hung_up: impl Fn() -> bool,
) -> PollAnswer {
    let request = PollRequest::parse(params);
    // `update` wakes the request parked before, which then sees it lost.
    let (generation, fault) = match shared.update(|s| start(s, &request)) {
        Start::Answer(answer) => {
            note_answer(shared, &answer, arrived, false);
            return answer;
        }
        Start::Park(generation, fault) => (generation, fault),
    };
    let _parked = ParkedGuard(shared);
    let deadline = tokio::time::Instant::now() + request.timeout;
    let mut batching = false;
    loop {
        // A hung-up caller must not count as a live poller, nor its
        // termination as a conflict the bot saw.
        if hung_up() {
            return PollAnswer::HungUp;
        }
        // Registered before looking at the state, so that a change made
        // between the look and the wait still wakes us.
        let notified = shared.poll_wakeup.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        match shared.update_quietly(|s| check_parked(s, generation, request.limit, batching)) {
            Parked::Done(outcome) => {
                let answer = PollAnswer::Outcome(outcome, fault);
                note_answer(shared, &answer, arrived, true);
                return answer;
            }
            Parked::Ready => {
                batching = true;
                tokio::time::sleep(BATCH_DELAY).await;
                continue;
            }
            Parked::Waiting => {}
        }
        tokio::select! {
            _ = &mut notified => {}
            _ = tokio::time::sleep(HANGUP_CHECK) => {}
            _ = tokio::time::sleep_until(deadline) => {
                return PollAnswer::Outcome(Ok(Value::Array(Vec::new()).into()), fault);
            }
        }
    }
}

/// Keeps an answer that carries updates in [`State::polls`], for latency
/// breakdowns.
fn note_answer(shared: &Shared, answer: &PollAnswer, arrived: Instant, parked: bool) {
    let PollAnswer::Outcome(Ok(success), _) = answer else {
        return;
    };
    let Some(batch) = success.result.as_array().filter(|b| !b.is_empty()) else {
        return;
    };
    let poll = AnsweredPoll {
        arrived,
        answered: Instant::now(),
        parked,
        update_ids: batch
            .iter()
            .filter_map(|u| u.get("update_id").and_then(Value::as_i64))
            .collect(),
    };
    shared.update_quietly(|s| s.polls.push(poll));
}

fn start(state: &mut State, request: &PollRequest) -> Start {
    state.stats.get_updates += 1;
    *state
        .stats
        .calls_by_method
        .entry("getUpdates".into())
        .or_default() += 1;
    if state.webhook.is_some() {
        state.count_status(409);
        return Start::Answer(PollAnswer::Outcome(
            Err(ApiError::conflict(CONFLICT_WEBHOOK_ACTIVE)),
            None,
        ));
    }
    let fault = state.faults.for_get_updates();
    if let Some(fault) = fault {
        state.stats.faults_injected += 1;
        if !fault.executes_call() {
            if matches!(fault, Fault::RetryAfter(_)) {
                state.count_status(429);
            }
            return Start::Answer(PollAnswer::Refused(fault));
        }
    }
    if let Some(allowed) = &request.allowed_updates {
        state.set_allowed_updates(allowed);
    }
    state.confirm(request.offset);
    let batch = state.batch(request.limit);
    if !batch.is_empty() || request.timeout.is_zero() {
        return Start::Answer(PollAnswer::Outcome(Ok(Value::Array(batch).into()), fault));
    }
    state.poll_generation += 1;
    state.parked_polls += 1;
    Start::Park(state.poll_generation, fault)
}

fn check_parked(state: &mut State, generation: u64, limit: usize, batching: bool) -> Parked {
    if state.token_rejected {
        state.count_status(401);
        return Parked::Done(Err(ApiError::unauthorized()));
    }
    if state.poll_generation != generation {
        state.count_status(409);
        let description = if state.webhook.is_some() {
            CONFLICT_SET_WEBHOOK
        } else {
            CONFLICT_OTHER_POLL
        };
        return Parked::Done(Err(ApiError::conflict(description)));
    }
    let batch = state.batch(limit);
    match (batch.is_empty(), batching) {
        (true, _) => Parked::Waiting,
        (false, false) => Parked::Ready,
        (false, true) => Parked::Done(Ok(Value::Array(batch).into())),
    }
}

/// Keeps `parked_polls` right however the request ends, including when the
/// client disconnects and actix drops the request's future.
struct ParkedGuard<'a>(&'a Shared);

impl Drop for ParkedGuard<'_> {
    fn drop(&mut self) {
        self.0
            .update_quietly(|s| s.parked_polls = s.parked_polls.saturating_sub(1));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parameters_follow_telegram_bounds() {
        let params = json!({"offset": "-3", "limit": 0, "timeout": "500", "allowed_updates": "[\"message\"]"});
        let request = PollRequest::parse(params.as_object().unwrap());
        assert_eq!(request.offset, -3);
        assert_eq!(request.limit, 1);
        assert_eq!(request.timeout, Duration::from_secs(50));
        assert_eq!(request.allowed_updates, Some(json!(["message"])));

        let defaults = PollRequest::parse(&Map::new());
        assert_eq!(
            (defaults.offset, defaults.limit, defaults.timeout),
            (0, 100, Duration::ZERO)
        );
        let garbage = PollRequest::parse(json!({"limit": "many"}).as_object().unwrap());
        assert_eq!(garbage.limit, 1);
    }
}
