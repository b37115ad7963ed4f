//! Injected failures and Telegram's flood limits.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// One way a call can go wrong between the bot and Telegram.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// 502 Bad Gateway with the HTML page of Telegram's front proxy; the call
    /// is not executed.
    BadGatewayHtml,
    /// 502 with a JSON envelope (`"description":"Bad Gateway"`); the call is
    /// not executed.
    BadGatewayJson,
    /// The connection is closed without an answer and the call not executed.
    DropBeforeExecute,
    /// The call is executed (a message is sent, …) and then the connection is
    /// closed without an answer: the bot cannot know it succeeded.
    DropAfterExecute,
    /// The call is executed at once but its answer comes this much later.
    Delay(Duration),
    /// The call is executed and answered: the status line, the headers
    /// (with the body's `Content-Length`) and the first half of the body go
    /// out at once, the rest only this much later. The connection stays
    /// open meanwhile, as with a stalled proxy.
    StallBody(Duration),
    /// 429 with this `retry_after`, taken as given (Telegram itself says 1 s
    /// to about an hour, never 0 or less); the call is not executed.
    RetryAfter(i64),
}

impl Fault {
    /// Whether the call still runs when this fault hits it.
    pub fn executes_call(&self) -> bool {
        matches!(
            self,
            Fault::DropAfterExecute | Fault::Delay(_) | Fault::StallBody(_)
        )
    }
}

/// Which calls fail and how. The default plan injects nothing.
///
/// A call that is eligible (its method is listed in `methods`, or the list is
/// empty) takes the next fault of `script` while any is left, and otherwise
/// fails with probability `rate`, the fault then being picked from `faults`.
/// Choices come from an RNG seeded with the sandbox's seed, reset whenever a
/// plan is set, so a plan is deterministic for a given sequence of calls.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct FaultPlan {
    /// Probability (0.0 to 1.0) that an eligible call fails.
    pub rate: f64,
    /// Faults to pick from, uniformly, when `rate` hits.
    pub faults: Vec<Fault>,
    /// Faults for the next eligible calls, in order, before `rate` applies.
    pub script: Vec<Fault>,
    /// Eligible methods (case-insensitive); empty means every method except
    /// `getUpdates`, which is governed by `get_updates` and
    /// `get_updates_bad_gateway` only.
    pub methods: Vec<String>,
    /// Probability that a `getUpdates` request is answered 502 (HTML).
    pub get_updates_bad_gateway: f64,
    /// Faults for the next `getUpdates` requests, in order, one each, before
    /// `get_updates_bad_gateway` applies. One that does not execute the call
    /// answers at once, confirming nothing; one that does (`Delay`,
    /// `StallBody`, `DropAfterExecute`) hits the answer the request would
    /// have had, confirmation and long poll included.
    pub get_updates: Vec<Fault>,
}

impl FaultPlan {
    /// A plan that fails a fraction `rate` of all calls with faults picked
    /// from `faults`.
    pub fn random(rate: f64, faults: Vec<Fault>) -> Self {
        FaultPlan {
            rate,
            faults,
            ..FaultPlan::default()
        }
    }

    /// A plan that applies `script` to the next calls, one fault each.
    pub fn scripted(script: Vec<Fault>) -> Self {
        FaultPlan {
            script,
            ..FaultPlan::default()
        }
    }

    /// A plan that applies `script` to the next `getUpdates` requests, one
    /// fault each, and injects nothing else.
    pub fn get_updates(script: Vec<Fault>) -> Self {
        FaultPlan {
            get_updates: script,
            ..FaultPlan::default()
        }
    }

    /// Restricts the plan to the given methods.
    pub fn only(mut self, methods: &[&str]) -> Self {
        self.methods = methods.iter().map(ToString::to_string).collect();
        self
    }
}

/// Applies a [`FaultPlan`] to the stream of calls.
pub(crate) struct FaultInjector {
    plan: FaultPlan,
    script: VecDeque<Fault>,
    get_updates_script: VecDeque<Fault>,
    rng: fastrand::Rng,
    seed: u64,
}

impl FaultInjector {
    pub fn new(seed: u64) -> Self {
        FaultInjector {
            plan: FaultPlan::default(),
            script: VecDeque::new(),
            get_updates_script: VecDeque::new(),
            rng: fastrand::Rng::with_seed(seed),
            seed,
        }
    }

    pub fn set_plan(&mut self, plan: FaultPlan) {
        self.script = plan.script.iter().copied().collect();
        self.get_updates_script = plan.get_updates.iter().copied().collect();
        self.rng = fastrand::Rng::with_seed(self.seed);
        self.plan = plan;
    }

    /// The fault for a call of `method` (canonical name, not getUpdates).
    pub fn for_call(&mut self, method: &str) -> Option<Fault> {
        let eligible = self.plan.methods.is_empty()
            || self
                .plan
                .methods
                .iter()
                .any(|m| m.eq_ignore_ascii_case(method));
        if !eligible {
            return None;
        }
        if let Some(fault) = self.script.pop_front() {
            return Some(fault);
        }
        // Draw only when the plan can fail, so that an inert plan does not
        // shift the sequence of later decisions.
        if self.plan.rate <= 0.0 || self.plan.faults.is_empty() {
            return None;
        }
        if self.rng.f64() >= self.plan.rate {
            return None;
        }
        Some(self.plan.faults[self.rng.usize(..self.plan.faults.len())])
    }

    /// The fault for this getUpdates request: the next of the plan's
    /// `get_updates` script, else a 502 page with probability
    /// `get_updates_bad_gateway`.
    pub fn for_get_updates(&mut self) -> Option<Fault> {
        if let Some(fault) = self.get_updates_script.pop_front() {
            return Some(fault);
        }
        (self.plan.get_updates_bad_gateway > 0.0
            && self.rng.f64() < self.plan.get_updates_bad_gateway)
            .then_some(Fault::BadGatewayHtml)
    }
}

/// Messages a single chat may receive at once before the 1/s rate applies.
const CHAT_BURST: f64 = 3.0;
const CHAT_RATE_PER_SEC: f64 = 1.0;
const GROUP_LIMIT: usize = 20;
const GROUP_WINDOW: Duration = Duration::from_secs(60);
const GLOBAL_LIMIT: usize = 30;
const GLOBAL_WINDOW: Duration = Duration::from_secs(1);

/// Telegram's published broadcast limits: about one message per second per
/// chat, 20 per minute per group or channel, 30 per second overall.
#[derive(Default)]
pub(crate) struct FloodControl {
    /// Token bucket per chat: (tokens, when last refilled).
    chats: HashMap<i64, (f64, Instant)>,
    /// Send times per group/channel within the last minute.
    groups: HashMap<i64, VecDeque<Instant>>,
    /// Send times within the last second.
    global: VecDeque<Instant>,
}

impl FloodControl {
    /// Counts one message to `chat_id` at `now`, or says how many seconds to
    /// wait (without counting anything).
    pub fn admit(&mut self, chat_id: i64, now: Instant) -> Result<(), u64> {
        let bucket = self.chats.entry(chat_id).or_insert((CHAT_BURST, now));
        bucket.0 = (bucket.0 + now.duration_since(bucket.1).as_secs_f64() * CHAT_RATE_PER_SEC)
            .min(CHAT_BURST);
        bucket.1 = now;
        let mut wait = if bucket.0 >= 1.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64((1.0 - bucket.0) / CHAT_RATE_PER_SEC)
        };

        // Negative ids are groups, supergroups and channels.
        let group = (chat_id < 0).then(|| self.groups.entry(chat_id).or_default());
        if let Some(group) = group {
            wait = wait.max(window_wait(group, GROUP_LIMIT, GROUP_WINDOW, now));
        }
        wait = wait.max(window_wait(
            &mut self.global,
            GLOBAL_LIMIT,
            GLOBAL_WINDOW,
            now,
        ));

        if !wait.is_zero() {
            // Telegram rounds up and never says "retry after 0".
            return Err((wait.as_secs_f64().ceil() as u64).max(1));
        }
        if let Some(bucket) = self.chats.get_mut(&chat_id) {
            bucket.0 -= 1.0;
        }
        if chat_id < 0 {
            self.groups.entry(chat_id).or_default().push_back(now);
        }
        self.global.push_back(now);
        Ok(())
    }
}

/// Forgets sends older than `window` and returns how long until another one
/// fits under `limit`.
fn window_wait(
    sends: &mut VecDeque<Instant>,
    limit: usize,
    window: Duration,
    now: Instant,
) -> Duration {
    while sends
        .front()
        .is_some_and(|&t| now.duration_since(t) >= window)
    {
        sends.pop_front();
    }
    match sends.front() {
        Some(&oldest) if sends.len() >= limit => (oldest + window).saturating_duration_since(now),
        _ => Duration::ZERO,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chat_burst_then_one_per_second() {
        let mut flood = FloodControl::default();
        let t0 = Instant::now();
        for _ in 0..3 {
            assert_eq!(flood.admit(7, t0), Ok(()));
        }
        assert_eq!(flood.admit(7, t0), Err(1));
        assert_eq!(flood.admit(8, t0), Ok(()), "other chats are not affected");
        assert_eq!(flood.admit(7, t0 + Duration::from_millis(1000)), Ok(()));
    }

    #[test]
    fn group_limit_per_minute() {
        let mut flood = FloodControl::default();
        let t0 = Instant::now();
        for i in 0..20 {
            assert_eq!(
                flood.admit(-5, t0 + Duration::from_secs(i * 2)),
                Ok(()),
                "message {i}"
            );
        }
        // The first send leaves the window at t0+60s; now is t0+40s.
        assert_eq!(flood.admit(-5, t0 + Duration::from_secs(40)), Err(20));
    }

    #[test]
    fn global_limit_per_second() {
        let mut flood = FloodControl::default();
        let t0 = Instant::now();
        for chat in 0..30 {
            assert_eq!(flood.admit(chat, t0), Ok(()));
        }
        assert_eq!(flood.admit(99, t0), Err(1));
    }

    #[test]
    fn injector_is_deterministic() {
        let decide = || {
            let mut injector = FaultInjector::new(42);
            injector.set_plan(FaultPlan::random(
                0.5,
                vec![Fault::BadGatewayJson, Fault::DropAfterExecute],
            ));
            (0..32)
                .map(|_| injector.for_call("sendMessage"))
                .collect::<Vec<_>>()
        };
        let first = decide();
        assert_eq!(first, decide());
        assert!(first.iter().any(Option::is_some) && first.iter().any(Option::is_none));
    }

    #[test]
    fn script_comes_first_and_methods_filter() {
        let mut injector = FaultInjector::new(1);
        injector
            .set_plan(FaultPlan::scripted(vec![Fault::DropBeforeExecute]).only(&["sendmessage"]));
        assert_eq!(injector.for_call("getMe"), None);
        assert_eq!(
            injector.for_call("sendMessage"),
            Some(Fault::DropBeforeExecute)
        );
        assert_eq!(injector.for_call("sendMessage"), None);
    }
}
