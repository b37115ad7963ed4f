//! Telegram's flood limits as data, and a pure pacer that keeps the Sender
//! under them.
//!
//! # The limits (Telegram's bot FAQ, "My bot is hitting limits, how do I avoid this?")
//!
//! - In a single chat, avoid sending more than **one message per second**;
//!   short bursts are tolerated, longer ones end in 429. Modelled as a token
//!   bucket: `chat_burst` messages at once, refilled at `chat_per_second`.
//! - In a group (or supergroup, or channel) no more than **20 messages per
//!   minute**: a sliding window of 60 s holding at most `group_per_minute`
//!   messages, on top of the per-chat bucket. Negative chat ids and
//!   `@username`s (which only channels and supergroups have) are groups.
//! - For bulk notifications, not more than **about 30 messages per second**
//!   overall: a sliding window of 1 s holding at most `global_per_second`.
//! - Paid broadcast (the Bot API's `allow_paid_broadcast`, "up to 1000
//!   messages per second ... for a fee"): a call with `allow_paid_broadcast:
//!   true` is counted in its own 1 s window of `paid_broadcast_per_second`
//!   instead of the free global window; the per-chat and per-group limits
//!   still apply to it (Telegram waives the broadcast limit only).
//!
//! # Which calls are "sending a message"
//!
//! Only these are paced; every other call (answerCallbackQuery, getChat,
//! editMessageText, deleteMessage, sendChatAction, ...) goes out as soon as
//! its chat's earlier calls are done. Telegram documents its limits for
//! messages only.
//!
//! | method | counts as |
//! |---|---|
//! | `send*` except the five below | 1 message |
//! | `sendMediaGroup` | 1 per item of `media` (conservative: each item is a message) |
//! | `forwardMessage`, `copyMessage` | 1 message |
//! | `forwardMessages`, `copyMessages` | 1 per id in `message_ids` |
//! | `sendChatAction`, `sendGift`, `sendMessageDraft`, `sendRichMessageDraft`, `sendChatJoinRequestWebApp` | not a message |
//!
//! A weight is capped at the capacity of the limit it is counted in, so that
//! a large album still goes out (on an empty budget) instead of never.
//!
//! # When a message counts: the anchor
//!
//! Telegram counts a message when the request reaches it, which is somewhere
//! between the moment the Sender wrote it and the moment the answer came
//! back. The pacer counts each message at its *anchor*: the send time plus
//! `safety_margin`, or the answer's arrival if that is earlier. Whenever the
//! answer comes within the margin (always on a nearby server, including the
//! slow first requests that must open a connection), the anchor is an upper
//! bound of Telegram's count time, so pacing on anchors never exceeds a
//! window as Telegram sees it. Only a request that takes longer than the
//! margin to reach Telegram can earn a 429; in exchange a far server costs
//! at most the margin per window (30 per 1.25 s by default) rather than a
//! whole round trip. A margin of 50 ms earned 30 429s in the benchmark: the
//! first burst's requests, each opening a connection on a busy machine, took
//! longer than that to arrive.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// Telegram's limits and how the pacer applies them.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Pace at all. Off: every call goes out at once (benchmarks against a
    /// local server).
    pub enabled: bool,
    /// Messages per second overall.
    pub global_per_second: u32,
    /// Messages per second overall with `allow_paid_broadcast`.
    pub paid_broadcast_per_second: u32,
    /// Messages per second into one chat, sustained.
    pub chat_per_second: f64,
    /// Messages one chat may receive at once.
    pub chat_burst: u32,
    /// Messages per minute into one group, supergroup or channel.
    pub group_per_minute: u32,
    /// Assumed upper bound of the delay until Telegram counts a message.
    pub safety_margin: Duration,
}

impl Default for Limits {
    /// Telegram's published limits (see the module documentation).
    fn default() -> Self {
        Limits {
            enabled: true,
            global_per_second: 30,
            paid_broadcast_per_second: 1000,
            chat_per_second: 1.0,
            chat_burst: 3,
            group_per_minute: 20,
            safety_margin: Duration::from_millis(250),
        }
    }
}

impl Limits {
    /// No pacing at all.
    pub fn off() -> Self {
        Limits {
            enabled: false,
            ..Limits::default()
        }
    }
}

/// What a call costs against the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cost {
    /// Messages it posts.
    pub messages: u32,
    /// It carries `allow_paid_broadcast: true`.
    pub paid: bool,
}

/// `send*` methods that post no message.
const NOT_MESSAGES: &[&str] = &[
    "sendChatAction",
    "sendChatJoinRequestWebApp",
    "sendGift",
    "sendMessageDraft",
    "sendRichMessageDraft",
];

/// The cost of a call, or `None` when it is not "sending a message" (see the
/// table in the module documentation).
pub fn message_cost(method: &str, params: &impl CallFields) -> Option<Cost> {
    let items = |key: &str| params.array_len(key).map_or(1, |n| n.max(1) as u32);
    let messages = match method {
        "sendMediaGroup" => items("media"),
        "forwardMessages" | "copyMessages" => items("message_ids"),
        "forwardMessage" | "copyMessage" => 1,
        m if m.starts_with("send") && !NOT_MESSAGES.contains(&m) => 1,
        _ => return None,
    };
    let paid = params.is_true("allow_paid_broadcast");
    Some(Cost { messages, paid })
}

/// The two readings of a call's parameters that [`message_cost`] makes, from
/// either form a call's parameters take.
pub trait CallFields {
    /// The number of elements of `key`'s value when it is an array.
    fn array_len(&self, key: &str) -> Option<usize>;
    /// Whether `key`'s value is `true`.
    fn is_true(&self, key: &str) -> bool;
}

impl CallFields for Map<String, Value> {
    fn array_len(&self, key: &str) -> Option<usize> {
        self.get(key).and_then(Value::as_array).map(Vec::len)
    }
    fn is_true(&self, key: &str) -> bool {
        matches!(self.get(key), Some(Value::Bool(true)))
    }
}

impl CallFields for super::Params {
    fn array_len(&self, key: &str) -> Option<usize> {
        super::Params::array_len(self, key)
    }
    fn is_true(&self, key: &str) -> bool {
        super::Params::is_true(self, key)
    }
}

/// Whether a chat id names a group, supergroup or channel.
pub fn is_group(chat: &str) -> bool {
    chat.starts_with('-') || chat.starts_with('@')
}

/// Identifies one counted send until its answer comes ([`Pacer::settle`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    id: u64,
    chat: String,
    sent: Instant,
    cost: Cost,
    /// The chat's theoretical arrival time before this send.
    prior_tat: Option<Instant>,
}

/// Sliding window: at most `limit` messages whose anchors lie within any
/// `window`.
#[derive(Debug)]
struct Window {
    limit: u32,
    window: Duration,
    /// (ticket id, anchor, messages), in send order.
    entries: VecDeque<(u64, Instant, u32)>,
}

impl Window {
    fn new(limit: u32, window: Duration) -> Self {
        Window {
            limit: limit.max(1),
            window,
            entries: VecDeque::new(),
        }
    }

    /// Forgets entries that can no longer constrain a send at or after `now`.
    fn prune(&mut self, now: Instant) {
        self.entries
            .retain(|&(_, anchor, _)| anchor + self.window > now);
    }

    /// The earliest instant (>= now) at which `messages` more fit.
    fn ready_at(&self, messages: u32, now: Instant) -> Instant {
        let messages = messages.min(self.limit);
        let live: Vec<(Instant, u32)> = self
            .entries
            .iter()
            .filter(|&&(_, anchor, _)| anchor + self.window > now)
            .map(|&(_, anchor, n)| (anchor, n))
            .collect();
        let mut used: u32 = live.iter().map(|&(_, n)| n).sum();
        if used + messages <= self.limit {
            return now;
        }
        let mut live = live;
        live.sort_by_key(|&(anchor, _)| anchor);
        // Oldest first, entries leave the window at anchor + window (the
        // server forgets a send exactly `window` after it).
        for (anchor, n) in live {
            used -= n;
            if used + messages <= self.limit {
                return (anchor + self.window).max(now);
            }
        }
        now
    }

    fn record(&mut self, id: u64, anchor: Instant, messages: u32) {
        self.entries
            .push_back((id, anchor, messages.min(self.limit)));
    }

    fn settle(&mut self, id: u64, anchor: Instant) {
        if let Some(e) = self.entries.iter_mut().find(|e| e.0 == id) {
            e.1 = e.1.min(anchor);
        }
    }

    fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// Per-chat state: a GCRA token bucket, and the group window.
#[derive(Debug)]
struct ChatPace {
    /// Theoretical arrival time: the bucket is full at `tat - tau` and later.
    tat: Option<Instant>,
    /// The ticket of the chat's latest send.
    last: u64,
    group: Option<Window>,
}

impl ChatPace {
    /// A chat not yet counted; a group gets its minute's window.
    fn new(chat: &str, group_per_minute: u32) -> ChatPace {
        ChatPace {
            tat: None,
            last: 0,
            group: is_group(chat).then(|| Window::new(group_per_minute, Duration::from_secs(60))),
        }
    }
}

/// One pass of [`Pacer::admit`] over the waiting chats: whether the free
/// and the paid overall budget were found short in it.
#[derive(Debug, Default)]
pub struct Pass {
    free_short: bool,
    paid_short: bool,
}

/// What a pacer has counted and that still constrains a send, so that
/// another process can go on from it: the next elected sender of a cluster
/// (`cluster::sender`), which would otherwise start with an empty pacer and
/// let a chat's next message come sooner than its limit allows.
///
/// Instants do not cross processes, so every time is an offset in
/// milliseconds from the moment the snapshot was taken (`taken_at_ms`, Unix
/// time), rounded towards later; the restoring side places them by its own
/// wall clock, which on nodes kept by NTP agrees within milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PaceSnapshot {
    pub taken_at_ms: u64,
    /// (anchor offset, messages) of the free overall window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    global: Vec<(i64, u32)>,
    /// (anchor offset, messages) of the paid-broadcast window.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    paid: Vec<(i64, u32)>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    chats: Vec<ChatSnapshot>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    hold: Option<i64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ChatSnapshot {
    chat: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    tat: Option<i64>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    group: Vec<(i64, u32)>,
}

fn unix_ms(wall: SystemTime) -> u64 {
    wall.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// `at - now` in whole milliseconds, rounded up.
fn offset_ms(at: Instant, now: Instant) -> i64 {
    let ceil = |d: Duration| i64::try_from(d.as_micros().div_ceil(1000)).unwrap_or(i64::MAX);
    match at.checked_duration_since(now) {
        Some(ahead) => ceil(ahead),
        // Rounded up means towards zero for a time in the past.
        None => -(i64::try_from(now.duration_since(at).as_millis()).unwrap_or(i64::MAX)),
    }
}

/// `base + offset`, or `None` where the monotonic clock cannot go that far
/// back (then the entry predates anything that can still constrain).
fn place(base: Instant, offset: i64) -> Option<Instant> {
    let by = Duration::from_millis(offset.unsigned_abs());
    if offset >= 0 {
        base.checked_add(by)
    } else {
        base.checked_sub(by)
    }
}

impl Window {
    fn snapshot(&self, now: Instant) -> Vec<(i64, u32)> {
        self.entries
            .iter()
            .filter(|&&(_, anchor, _)| anchor + self.window > now)
            .map(|&(_, anchor, n)| (offset_ms(anchor, now), n))
            .collect()
    }

    fn restore(&mut self, entries: &[(i64, u32)], base: Instant, now: Instant, ids: &mut u64) {
        for &(offset, n) in entries {
            if let Some(anchor) = place(base, offset).filter(|&a| a + self.window > now) {
                *ids += 1;
                self.record(*ids, anchor, n);
            }
        }
    }
}

/// The pacing decisions, free of actors and of real time: every method takes
/// `now`, so tests drive it with made-up instants.
#[derive(Debug)]
pub struct Pacer {
    limits: Limits,
    global: Window,
    paid: Window,
    chats: HashMap<String, ChatPace>,
    /// No message goes out before this (a 429 not tied to a chat).
    global_hold: Option<Instant>,
    next_id: u64,
    /// Holds set, for [`Pacer::changes`].
    holds: u64,
}

impl Pacer {
    pub fn new(limits: Limits) -> Self {
        Pacer {
            global: Window::new(limits.global_per_second, Duration::from_secs(1)),
            paid: Window::new(limits.paid_broadcast_per_second, Duration::from_secs(1)),
            limits,
            chats: HashMap::new(),
            global_hold: None,
            next_id: 0,
            holds: 0,
        }
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Seconds between two messages of one chat, sustained.
    fn chat_interval(&self) -> Duration {
        Duration::from_secs_f64(1.0 / self.limits.chat_per_second.max(1e-6))
    }

    fn burst(&self) -> u32 {
        self.limits.chat_burst.max(1)
    }

    /// Whether any limit is applied at all.
    pub fn enabled(&self) -> bool {
        self.limits.enabled
    }

    /// The earliest instant (>= now) the chat's own limits (bucket and group
    /// window) allow a send of `cost`.
    pub fn chat_ready_at(&self, chat: &str, cost: Cost, now: Instant) -> Instant {
        if !self.limits.enabled {
            return now;
        }
        let Some(pace) = self.chats.get(chat) else {
            return now;
        };
        let mut at = now;
        if let Some(tat) = pace.tat {
            // GCRA: n messages conform at t when t >= tat + (n-1)T - tau,
            // tau = (burst-1)T.
            let n = cost.messages.clamp(1, self.burst());
            let interval = self.chat_interval();
            let ahead = interval * (n - 1);
            let tau = interval * (self.burst() - 1);
            at = at.max((tat + ahead).checked_sub(tau).unwrap_or(now));
        }
        if let Some(group) = &pace.group {
            at = at.max(group.ready_at(cost.messages, now));
        }
        at
    }

    /// The earliest instant (>= now) the overall limit (free or paid) allows
    /// a send of `cost`.
    pub fn global_ready_at(&self, cost: Cost, now: Instant) -> Instant {
        if !self.limits.enabled {
            return now;
        }
        let window = if cost.paid { &self.paid } else { &self.global };
        let at = window.ready_at(cost.messages, now);
        match self.global_hold {
            Some(hold) => at.max(hold),
            None => at,
        }
    }

    /// Both of the above.
    pub fn ready_at(&self, chat: &str, cost: Cost, now: Instant) -> Instant {
        self.chat_ready_at(chat, cost, now)
            .max(self.global_ready_at(cost, now))
    }

    /// Admits a send of `cost` to `chat` at `now` within one pass over the
    /// waiting chats in their order: a ticket (the send is counted), or
    /// `Err(Some(at))` to look again at `at`, or `Err(None)` when an earlier
    /// chat in this pass already found the overall budget short, which it
    /// then gets first.
    pub fn admit(
        &mut self,
        chat: &str,
        cost: Cost,
        now: Instant,
        pass: &mut Pass,
    ) -> Result<Ticket, Option<Instant>> {
        let short = if cost.paid {
            &mut pass.paid_short
        } else {
            &mut pass.free_short
        };
        if *short {
            return Err(None);
        }
        let chat_at = self.chat_ready_at(chat, cost, now);
        if chat_at > now {
            return Err(Some(chat_at));
        }
        let global_at = self.global_ready_at(cost, now);
        if global_at > now {
            *short = true;
            return Err(Some(global_at));
        }
        Ok(self.record(chat, cost, now))
    }

    /// Counts a send of `cost` to `chat` made at `now`. Call
    /// [`Pacer::settle`] with the ticket when its answer comes.
    pub fn record(&mut self, chat: &str, cost: Cost, now: Instant) -> Ticket {
        self.next_id += 1;
        let id = self.next_id;
        let anchor = now + self.limits.safety_margin;
        let interval = self.chat_interval();
        let group_limit = self.limits.group_per_minute;
        let pace = self
            .chats
            .entry(chat.to_string())
            .or_insert_with(|| ChatPace::new(chat, group_limit));
        let prior_tat = pace.tat;
        let n = cost.messages.clamp(1, self.limits.chat_burst.max(1));
        pace.tat = Some(prior_tat.map_or(anchor, |t| t.max(anchor)) + interval * n);
        pace.last = id;
        if let Some(group) = &mut pace.group {
            group.record(id, anchor, cost.messages);
        }
        if cost.paid {
            self.paid.record(id, anchor, cost.messages);
        } else {
            self.global.record(id, anchor, cost.messages);
        }
        Ticket {
            id,
            chat: chat.to_string(),
            sent: now,
            cost,
            prior_tat,
        }
    }

    /// The answer to a counted send came at `now`: Telegram counted it at
    /// `now` at the latest, so its anchor moves there if that is earlier.
    pub fn settle(&mut self, ticket: &Ticket, now: Instant) {
        let anchor = now.min(ticket.sent + self.limits.safety_margin);
        let interval = self.chat_interval();
        let n = ticket.cost.messages.clamp(1, self.burst());
        if let Some(pace) = self.chats.get_mut(&ticket.chat) {
            // Only the chat's latest send can be re-based: a later one has
            // built on this one's provisional value, which stays pessimistic.
            if pace.last == ticket.id {
                pace.tat = Some(ticket.prior_tat.map_or(anchor, |t| t.max(anchor)) + interval * n);
            }
            if let Some(group) = &mut pace.group {
                group.settle(ticket.id, anchor);
            }
        }
        if ticket.cost.paid {
            self.paid.settle(ticket.id, anchor);
        } else {
            self.global.settle(ticket.id, anchor);
        }
    }

    /// A 429 that cannot be tied to a chat: no message goes out before
    /// `until`.
    pub fn hold_all(&mut self, until: Instant) {
        self.holds += 1;
        self.global_hold = Some(self.global_hold.map_or(until, |h| h.max(until)));
    }

    /// Forgets state that no longer constrains anything, so memory follows
    /// the chats active within the last minute.
    pub fn prune(&mut self, now: Instant) {
        self.global.prune(now);
        self.paid.prune(now);
        if self.global_hold.is_some_and(|h| h <= now) {
            self.global_hold = None;
        }
        self.chats.retain(|_, pace| {
            if let Some(group) = &mut pace.group {
                group.prune(now);
            }
            // A bucket is full again once its theoretical arrival time is past.
            let bucket_full = pace.tat.is_none_or(|tat| tat <= now);
            !(bucket_full && pace.group.as_ref().is_none_or(Window::is_empty))
        });
    }

    /// Chats with state (for tests and diagnostics).
    pub fn tracked_chats(&self) -> usize {
        self.chats.len()
    }

    /// What still constrains a send at or after `now` (`wall` is the same
    /// instant by the wall clock).
    pub fn snapshot(&self, now: Instant, wall: SystemTime) -> PaceSnapshot {
        let chats = self
            .chats
            .iter()
            .filter_map(|(chat, pace)| {
                let tat = pace.tat.filter(|&t| t > now).map(|t| offset_ms(t, now));
                let group = pace
                    .group
                    .as_ref()
                    .map(|g| g.snapshot(now))
                    .unwrap_or_default();
                (tat.is_some() || !group.is_empty()).then(|| ChatSnapshot {
                    chat: chat.clone(),
                    tat,
                    group,
                })
            })
            .collect();
        PaceSnapshot {
            taken_at_ms: unix_ms(wall),
            global: self.global.snapshot(now),
            paid: self.paid.snapshot(now),
            chats,
            hold: self
                .global_hold
                .filter(|&h| h > now)
                .map(|h| offset_ms(h, now)),
        }
    }

    /// Counts what `snapshot` counted, as if this pacer had made those
    /// sends itself. Its age comes from the wall clock; a snapshot that
    /// seems to come from the future (clocks apart) is taken as just made,
    /// which errs towards waiting.
    pub fn restore(&mut self, snapshot: &PaceSnapshot, now: Instant, wall: SystemTime) {
        let age = Duration::from_millis(unix_ms(wall).saturating_sub(snapshot.taken_at_ms));
        let Some(base) = now.checked_sub(age) else {
            // Older than the monotonic clock: nothing in it still counts.
            return;
        };
        let mut ids = self.next_id;
        self.global.restore(&snapshot.global, base, now, &mut ids);
        self.paid.restore(&snapshot.paid, base, now, &mut ids);
        let group_limit = self.limits.group_per_minute;
        for c in &snapshot.chats {
            let pace = self
                .chats
                .entry(c.chat.clone())
                .or_insert_with(|| ChatPace::new(&c.chat, group_limit));
            if let Some(tat) = c.tat.and_then(|t| place(base, t)) {
                pace.tat = Some(pace.tat.map_or(tat, |t| t.max(tat)));
            }
            if let Some(group) = &mut pace.group {
                group.restore(&c.group, base, now, &mut ids);
            }
        }
        if let Some(hold) = snapshot.hold.and_then(|h| place(base, h)) {
            self.hold_all(hold);
        }
        self.next_id = ids;
        self.prune(now);
    }

    /// Grows with every send counted and every hold: a snapshot taken at an
    /// earlier value may be out of date.
    pub fn changes(&self) -> u64 {
        self.next_id + self.holds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const ONE: Cost = Cost {
        messages: 1,
        paid: false,
    };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn limits() -> Limits {
        Limits {
            safety_margin: ms(50),
            ..Limits::default()
        }
    }

    fn params(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("tests pass objects"),
        }
    }

    #[test]
    fn the_table_of_message_methods() {
        let p = Map::new();
        assert_eq!(message_cost("sendMessage", &p), Some(ONE));
        assert_eq!(message_cost("sendPhoto", &p), Some(ONE));
        assert_eq!(message_cost("copyMessage", &p), Some(ONE));
        assert_eq!(message_cost("forwardMessage", &p), Some(ONE));
        for not in [
            "sendChatAction",
            "sendGift",
            "answerCallbackQuery",
            "editMessageText",
            "getChat",
            "deleteMessage",
        ] {
            assert_eq!(message_cost(not, &p), None, "{not}");
        }
        let album = params(json!({"media": [{}, {}, {}, {}]}));
        assert_eq!(message_cost("sendMediaGroup", &album).unwrap().messages, 4);
        let ids = params(json!({"message_ids": [1, 2]}));
        assert_eq!(message_cost("copyMessages", &ids).unwrap().messages, 2);
        let paid = params(json!({"allow_paid_broadcast": true}));
        assert!(message_cost("sendMessage", &paid).unwrap().paid);
        // The same reading of parameters kept as the app's text.
        for (method, p) in [
            ("sendMediaGroup", album),
            ("copyMessages", ids),
            ("sendMessage", paid),
            ("sendMediaGroup", params(json!({"media": []}))),
            (
                "sendMessage",
                params(json!({"allow_paid_broadcast": "true"})),
            ),
        ] {
            let text = crate::telegram::Params::from_map(&p);
            assert_eq!(
                message_cost(method, &text),
                message_cost(method, &p),
                "{p:?}"
            );
        }
    }

    #[test]
    fn chat_bucket_allows_a_burst_then_one_per_second() {
        let mut p = Pacer::new(limits());
        let t0 = Instant::now();
        // One in flight per chat: each send follows the previous answer.
        for i in 0..3 {
            let now = t0 + ms(2 * i);
            assert_eq!(p.ready_at("7", ONE, now), now);
            let t = p.record("7", ONE, now);
            p.settle(&t, now + ms(2));
        }
        // The bucket is empty; it refills one message per second, counted
        // from the first message's answer.
        assert_eq!(p.ready_at("7", ONE, t0 + ms(6)), t0 + ms(2) + ms(1000));
        assert_eq!(p.ready_at("8", ONE, t0), t0, "other chats are free");
    }

    #[test]
    fn an_unanswered_send_counts_at_send_time_plus_margin() {
        let mut p = Pacer::new(Limits {
            chat_burst: 1,
            ..limits()
        });
        let t0 = Instant::now();
        let t = p.record("7", ONE, t0);
        assert_eq!(p.ready_at("7", ONE, t0), t0 + ms(1050));
        // A late answer does not make it later than the margin says.
        p.settle(&t, t0 + ms(500));
        assert_eq!(p.ready_at("7", ONE, t0), t0 + ms(1050));
    }

    #[test]
    fn global_window_holds_thirty_per_second() {
        let mut p = Pacer::new(limits());
        let t0 = Instant::now();
        for chat in 0..30 {
            let now = t0 + ms(chat);
            assert_eq!(p.ready_at(&chat.to_string(), ONE, now), now);
            let t = p.record(&chat.to_string(), ONE, now);
            p.settle(&t, now + ms(1));
        }
        // The 31st waits until the first leaves the window: its anchor (the
        // answer at t0+1ms) plus one second.
        assert_eq!(p.ready_at("99", ONE, t0 + ms(30)), t0 + ms(1001));
        // Paid broadcast has its own window.
        let paid = Cost {
            messages: 1,
            paid: true,
        };
        assert_eq!(p.ready_at("99", paid, t0 + ms(30)), t0 + ms(30));
    }

    #[test]
    fn a_pass_gives_a_short_overall_budget_to_the_first_chat_that_found_it_short() {
        let mut p = Pacer::new(Limits {
            chat_burst: 1,
            ..limits()
        });
        let t0 = Instant::now();
        let mut pass = Pass::default();
        for chat in 0..30 {
            assert!(p.admit(&chat.to_string(), ONE, t0, &mut pass).is_ok());
        }
        // The 31st chat learns when the window has room again; every later
        // chat in the same pass waits behind it, with no time of its own.
        assert_eq!(p.admit("30", ONE, t0, &mut pass), Err(Some(t0 + ms(1050))));
        assert_eq!(p.admit("31", ONE, t0, &mut pass), Err(None));
        // The paid budget is another one, and a chat's own limit says when.
        let paid = Cost {
            messages: 1,
            paid: true,
        };
        assert!(p.admit("32", paid, t0, &mut pass).is_ok());
        // A chat's own limit holds back that chat only.
        let mut next = Pass::default();
        let later = t0 + ms(1050);
        assert!(p.admit("30", ONE, later, &mut next).is_ok());
        let Err(Some(at)) = p.admit("30", ONE, later, &mut next) else {
            panic!("chat 30 sent again at once")
        };
        assert!(at > later);
        assert!(p.admit("31", ONE, later, &mut next).is_ok());
    }

    #[test]
    fn groups_get_twenty_per_minute() {
        let mut p = Pacer::new(limits());
        let t0 = Instant::now();
        let mut now = t0;
        for i in 0..20 {
            now = p.ready_at("-5", ONE, now);
            let t = p.record("-5", ONE, now);
            p.settle(&t, now);
            assert!(now < t0 + Duration::from_secs(60), "message {i} at {now:?}");
        }
        // The 21st waits for the first to leave the minute.
        assert_eq!(p.ready_at("-5", ONE, now), t0 + Duration::from_secs(60));
        assert!(is_group("@channel") && is_group("-100123") && !is_group("42"));
    }

    #[test]
    fn a_weight_beyond_the_capacity_still_fits_an_empty_budget() {
        let p = Pacer::new(limits());
        let t0 = Instant::now();
        let huge = Cost {
            messages: 100,
            paid: false,
        };
        assert_eq!(p.ready_at("-5", huge, t0), t0);
    }

    #[test]
    fn hold_all_and_off() {
        let mut p = Pacer::new(limits());
        let t0 = Instant::now();
        p.hold_all(t0 + ms(3000));
        assert_eq!(p.ready_at("1", ONE, t0), t0 + ms(3000));
        let mut off = Pacer::new(Limits::off());
        for _ in 0..100 {
            off.record("1", ONE, t0);
        }
        assert_eq!(off.ready_at("1", ONE, t0), t0);
    }

    #[test]
    fn prune_forgets_idle_chats() {
        let mut p = Pacer::new(limits());
        let t0 = Instant::now();
        let t = p.record("1", ONE, t0);
        p.settle(&t, t0);
        let t = p.record("-2", ONE, t0);
        p.settle(&t, t0);
        p.prune(t0 + ms(10));
        assert_eq!(p.tracked_chats(), 2, "both buckets are still refilling");
        p.prune(t0 + ms(1500));
        assert_eq!(p.tracked_chats(), 1, "the group's window still holds");
        p.prune(t0 + Duration::from_secs(61));
        assert_eq!(p.tracked_chats(), 0);
    }

    /// A pacer with a burst to a private chat, a group near its minute's
    /// limit, the overall second full and a hold: what each allows next.
    fn busy_pacer(t0: Instant) -> Pacer {
        let mut p = Pacer::new(limits());
        for _ in 0..3 {
            p.record("1", ONE, t0);
        }
        for i in 0..20 {
            p.record("-2", ONE, t0 - Duration::from_secs(40) + ms(i * 1100));
        }
        for i in 0..8 {
            p.record(&format!("{}", 100 + i), ONE, t0 + ms(10));
        }
        p.hold_all(t0 + ms(700));
        p
    }

    fn ready_of(p: &Pacer, now: Instant) -> Vec<Duration> {
        ["1", "-2", "100", "fresh"]
            .iter()
            .map(|chat| p.ready_at(chat, ONE, now) - now)
            .collect()
    }

    #[test]
    fn a_restored_pacer_waits_as_long_as_the_one_it_came_from() {
        let t0 = Instant::now() + Duration::from_secs(120);
        let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let p = busy_pacer(t0);
        let snapshot = p.snapshot(t0 + ms(20), wall);
        // Through the engine: JSON.
        let snapshot: PaceSnapshot =
            serde_json::from_slice(&serde_json::to_vec(&snapshot).expect("serialisable"))
                .expect("round trip");
        // Restored 150 ms later, by both clocks.
        let later = t0 + ms(170);
        let mut q = Pacer::new(limits());
        q.restore(&snapshot, later, wall + ms(150));
        let want = ready_of(&p, later);
        let got = ready_of(&q, later);
        assert!(
            want.iter().all(|d| *d > Duration::ZERO),
            "all held: {want:?}"
        );
        for (w, g) in want.iter().zip(&got) {
            // Never sooner; later by the rounding to milliseconds at most.
            assert!(g >= w && *g <= *w + ms(2), "{want:?} against {got:?}");
        }
        // The group's minute is the old one: a 21st message fits once the
        // first leaves the window, 60 s after it was sent.
        q.prune(t0 + ms(800));
        assert_eq!(
            q.ready_at("-2", ONE, t0 + ms(800)),
            q.chat_ready_at("-2", ONE, t0 + ms(800))
        );
        let group_at = q.chat_ready_at("-2", ONE, t0 + Duration::from_secs(2));
        assert!(
            group_at >= t0 + Duration::from_secs(20) && group_at <= t0 + Duration::from_secs(21),
            "the group's 21st message {:?} after t0",
            group_at - t0
        );
    }

    #[test]
    fn an_old_snapshot_restores_nothing_and_one_from_the_future_counts_as_just_taken() {
        let t0 = Instant::now() + Duration::from_secs(120);
        let wall = UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        let snapshot = busy_pacer(t0).snapshot(t0, wall);
        let mut old = Pacer::new(limits());
        old.restore(&snapshot, t0, wall + Duration::from_secs(61));
        assert_eq!(old.tracked_chats(), 0);
        assert_eq!(ready_of(&old, t0), vec![Duration::ZERO; 4]);

        // The restoring node's clock is 5 s behind the snapshot's.
        let mut skewed = Pacer::new(limits());
        skewed.restore(&snapshot, t0, wall - Duration::from_secs(5));
        let mut exact = Pacer::new(limits());
        exact.restore(&snapshot, t0, wall);
        assert_eq!(ready_of(&skewed, t0), ready_of(&exact, t0));
        assert!(ready_of(&exact, t0)[0] > Duration::ZERO);
    }

    #[test]
    fn an_idle_pacer_snapshots_to_nothing_and_changes_count_sends_and_holds() {
        let t0 = Instant::now();
        let mut p = Pacer::new(limits());
        let s = p.snapshot(t0, SystemTime::now());
        assert_eq!(
            s,
            PaceSnapshot {
                taken_at_ms: s.taken_at_ms,
                ..PaceSnapshot::default()
            }
        );
        let before = p.changes();
        let t = p.record("1", ONE, t0);
        p.settle(&t, t0);
        assert!(p.changes() > before);
        let before = p.changes();
        p.hold_all(t0 + ms(10));
        assert!(p.changes() > before);
        // Two seconds later nothing constrains: the snapshot is empty.
        let s = p.snapshot(t0 + Duration::from_secs(2), SystemTime::now());
        assert!(
            s.chats.is_empty() && s.global.is_empty() && s.hold.is_none(),
            "{s:?}"
        );
    }

    /// Replays the pacer's schedule against a copy of the sandbox's limiter
    /// semantics (token bucket of 3 at 1/s, 20 per sliding minute, 30 per
    /// sliding second, counted at arrival), with answers arriving 1-3 ms
    /// after arrival: nothing may be refused.
    #[test]
    fn schedule_passes_a_limiter_counting_at_arrival() {
        let mut p = Pacer::new(limits());
        let t0 = Instant::now();
        let mut now = t0;
        let mut arrivals: Vec<(String, Instant)> = Vec::new();
        let chats: Vec<String> = (0..40)
            .map(|i| {
                if i % 5 == 0 {
                    format!("-{i}")
                } else {
                    i.to_string()
                }
            })
            .collect();
        let mut queue: Vec<usize> = (0..1200).map(|i| i % 40).collect();
        queue.reverse();
        while let Some(c) = queue.pop() {
            let chat = &chats[c];
            now = p.ready_at(chat, ONE, now);
            let t = p.record(chat, ONE, now);
            let arrival = now + ms(1 + (c as u64 % 2));
            arrivals.push((chat.clone(), arrival));
            p.settle(&t, arrival + ms(1));
        }
        arrivals.sort_by_key(|a| a.1);
        for (i, (chat, at)) in arrivals.iter().enumerate() {
            let in_last = |d: Duration, only: Option<&str>| {
                arrivals[..=i]
                    .iter()
                    .filter(|(c, t)| *at - *t < d && only.is_none_or(|o| o == c))
                    .count()
            };
            assert!(in_last(Duration::from_secs(1), None) <= 30, "global at {i}");
            if is_group(chat) {
                assert!(in_last(Duration::from_secs(60), Some(chat)) <= 20);
            }
        }
        // The sandbox's per-chat token bucket, replayed in arrival order.
        let mut buckets: HashMap<&str, (f64, Instant)> = HashMap::new();
        for (chat, at) in &arrivals {
            let b = buckets.entry(chat).or_insert((3.0, *at));
            b.0 = (b.0 + (*at - b.1).as_secs_f64()).min(3.0);
            b.1 = *at;
            assert!(b.0 >= 1.0, "chat {chat} refused at {at:?}");
            b.0 -= 1.0;
        }
        let elapsed = now - t0;
        // 1200 messages at 30/s take 40 s; the groups' 20/min make them the
        // bottleneck here, so only check that pacing is not wildly slow.
        assert!(elapsed < Duration::from_secs(400), "{elapsed:?}");
    }
}
