//! The scope table: which keys have a live scope, which scopes are closing,
//! which are idle (longest idle first), and which keys wait for room.
//!
//! Plain data: the Supervisor starts and closes the scope actors; this keeps
//! the rules of `max_scopes` (a scope is live until it has stopped, closing
//! included), the idle list that eviction and `idle_timeout` take from, the
//! queue of keys waiting to be admitted (first come, first admitted), and
//! each scope's progress (events given, events received, stalls). `A` is
//! what the Supervisor reaches a scope by: its actor address in the daemon,
//! a plain value in tests.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use foldhash::HashMap;

use crate::routing::ScopeKey;

/// A live scope: started and not told to close.
pub struct Scope<A> {
    scope_id: u64,
    addr: A,
    worker: usize,
    /// Runs on the isolation worker.
    isolated: bool,
    /// Events given to the scope, and how many it reported received.
    dispatched: u64,
    acked: u64,
    /// When its app last received an event (or the scope started).
    last_progress: Instant,
    stall_reported: bool,
    /// While its instance is idle: its place in the idle list, and since
    /// when.
    idle: Option<(u64, Instant)>,
}

impl<A> Scope<A> {
    /// A scope just started, given `dispatched` events.
    pub fn new(
        scope_id: u64,
        addr: A,
        worker: usize,
        isolated: bool,
        dispatched: u64,
        now: Instant,
    ) -> Scope<A> {
        Scope {
            scope_id,
            addr,
            worker,
            isolated,
            dispatched,
            acked: 0,
            last_progress: now,
            stall_reported: false,
            idle: None,
        }
    }

    fn busy(&self) -> bool {
        self.dispatched > self.acked
    }

    /// Events given and not yet received.
    fn outstanding(&self) -> usize {
        (self.dispatched - self.acked) as usize
    }
}

/// A scope told to close that has not stopped yet.
struct Closing {
    key: ScopeKey,
    worker: usize,
    /// Closed to make room for a waiting key.
    for_room: bool,
    isolated: bool,
}

/// What the table knew of a scope that stopped.
#[derive(Debug, PartialEq, Eq)]
pub struct Ended {
    pub worker: usize,
    pub isolated: bool,
    /// Events given to it after it stopped, on their way back (only for a
    /// scope that stopped without being closed: its worker died).
    pub bounces: u64,
    /// It had been reported stalled, so its queue no longer counted as
    /// undelivered.
    pub stalled: bool,
}

/// What an idle report from a scope means.
#[derive(Debug, PartialEq, Eq)]
pub enum IdleReport {
    /// Stale (another scope of the key, or more events given since) or
    /// already known.
    Ignored,
    /// The isolated scope is done with what it held: it should close.
    Isolated,
    /// Put on the idle list.
    Listed,
}

/// A scope whose app stopped receiving, reported once per stall.
#[derive(Debug, PartialEq, Eq)]
pub struct Stall {
    pub key: ScopeKey,
    /// Events queued and not received: they no longer count as undelivered.
    pub queued: usize,
    pub silent_for: Duration,
}

pub struct ScopeTable<A> {
    max_scopes: usize,
    live: HashMap<ScopeKey, Scope<A>>,
    closing: HashMap<u64, Closing>,
    /// Keys whose closing scope has not stopped yet: scope_id.
    closing_keys: HashMap<ScopeKey, u64>,
    next_scope_id: u64,
    /// Keys that wait for a worker or for room, in the order they began to
    /// wait.
    admit: VecDeque<ScopeKey>,
    /// Idle scopes, longest idle first: tick -> key.
    idle: BTreeMap<u64, ScopeKey>,
    next_tick: u64,
    /// Scopes closed to make room that have not stopped yet.
    evicting: usize,
    /// The stretch, if any, in which keys wait for room with no idle scope
    /// to close.
    full: Option<Full>,
    /// When a stretch was last logged, and how many began since unlogged.
    full_logged: Option<Instant>,
    unlogged: u32,
}

/// A stretch of keys waiting for room with no idle scope to close: since
/// when, how many waited at most, and whether its start was logged. Under a
/// sustained burst room runs out and comes back many times a second, so
/// only the first stretch in [`FULL_LOG_INTERVAL`] is logged (and its end).
#[derive(Debug)]
struct Full {
    since: Instant,
    waited: usize,
    logged: bool,
}

/// At most one "max_scopes reached" line (and its "room again") per this.
const FULL_LOG_INTERVAL: Duration = Duration::from_secs(60);

impl<A> ScopeTable<A> {
    pub fn new(max_scopes: usize) -> ScopeTable<A> {
        ScopeTable {
            max_scopes,
            live: HashMap::default(),
            closing: HashMap::default(),
            closing_keys: HashMap::default(),
            next_scope_id: 1,
            admit: VecDeque::new(),
            idle: BTreeMap::new(),
            next_tick: 0,
            evicting: 0,
            full: None,
            full_logged: None,
            unlogged: 0,
        }
    }

    /// Scopes that count towards `max_scopes`: live and closing.
    pub fn count(&self) -> usize {
        self.live.len() + self.closing.len()
    }

    pub fn has_room(&self) -> bool {
        self.count() < self.max_scopes
    }

    /// No scope is live or closing.
    pub fn is_empty(&self) -> bool {
        self.live.is_empty() && self.closing.is_empty()
    }

    /// Whether `key` has a scope, live or closing (an instance per key at a
    /// time).
    pub fn holds(&self, key: &ScopeKey) -> bool {
        self.live.contains_key(key) || self.closing_keys.contains_key(key)
    }

    #[cfg(test)]
    pub fn get(&self, key: &ScopeKey) -> Option<&Scope<A>> {
        self.live.get(key)
    }

    /// Every live key.
    pub fn keys(&self) -> Vec<ScopeKey> {
        self.live.keys().cloned().collect()
    }

    /// The live keys whose scope runs on `worker`.
    pub fn on_worker(&self, worker: usize) -> Vec<ScopeKey> {
        self.live
            .iter()
            .filter(|(_, s)| s.worker == worker)
            .map(|(k, _)| k.clone())
            .collect()
    }

    /// The id for the next scope to start.
    pub fn next_id(&mut self) -> u64 {
        let id = self.next_scope_id;
        self.next_scope_id += 1;
        id
    }

    /// A scope just started for `key`.
    pub fn insert(&mut self, key: ScopeKey, started: Scope<A>) {
        self.live.insert(key, started);
    }

    /// Gives `n` more events to `key`'s live scope, unless it has none or
    /// runs in isolation: its address, and whether it is stalled (then the
    /// events do not count as undelivered).
    pub fn give(&mut self, key: &ScopeKey, n: usize) -> Option<(&A, bool)> {
        let scope = self.live.get_mut(key).filter(|s| !s.isolated)?;
        scope.dispatched += n as u64;
        if let Some((tick, _)) = scope.idle.take() {
            self.idle.remove(&tick);
        }
        Some((&scope.addr, scope.stall_reported))
    }

    /// The scope's app received `n` events. Answers how many events count as
    /// undelivered again: a stalled scope's whole queue, once it moves.
    pub fn received(&mut self, scope_id: u64, key: &ScopeKey, n: usize, now: Instant) -> usize {
        let Some(scope) = self.live.get_mut(key).filter(|s| s.scope_id == scope_id) else {
            return 0;
        };
        let counted_again = if std::mem::take(&mut scope.stall_reported) {
            scope.outstanding()
        } else {
            0
        };
        scope.acked += n as u64;
        scope.last_progress = now;
        counted_again
    }

    /// The scope's instance is done with the first `through` events it was
    /// given.
    pub fn idle(
        &mut self,
        scope_id: u64,
        key: &ScopeKey,
        through: u64,
        now: Instant,
    ) -> IdleReport {
        let Some(scope) = self.live.get_mut(key).filter(|s| s.scope_id == scope_id) else {
            return IdleReport::Ignored;
        };
        if scope.dispatched != through || scope.idle.is_some() {
            return IdleReport::Ignored;
        }
        if scope.isolated {
            return IdleReport::Isolated;
        }
        let tick = self.next_tick;
        self.next_tick += 1;
        scope.idle = Some((tick, now));
        self.idle.insert(tick, key.clone());
        IdleReport::Listed
    }

    /// Whether the instance that ended by itself had been given every event
    /// sent to its scope (else events are on their way and it restarts).
    pub fn ended_with_all(&self, scope_id: u64, key: &ScopeKey, through: u64) -> bool {
        self.live
            .get(key)
            .is_some_and(|s| s.scope_id == scope_id && s.dispatched == through)
    }

    /// Moves `key`'s live scope to closing: its address, to tell it.
    /// `for_room`: closed to make room for a waiting key.
    pub fn close(&mut self, key: &ScopeKey, for_room: bool) -> Option<A> {
        let scope = self.live.remove(key)?;
        if let Some((tick, _)) = scope.idle {
            self.idle.remove(&tick);
        }
        if for_room {
            self.evicting += 1;
        }
        self.closing_keys.insert(key.clone(), scope.scope_id);
        self.closing.insert(
            scope.scope_id,
            Closing {
                key: key.clone(),
                worker: scope.worker,
                for_room,
                isolated: scope.isolated,
            },
        );
        Some(scope.addr)
    }

    /// Scope `scope_id` of `key` stopped, having accepted `accepted` events.
    /// `None` when the table no longer knows it.
    pub fn stopped(&mut self, scope_id: u64, key: &ScopeKey, accepted: u64) -> Option<Ended> {
        if let Some(c) = self.closing.remove(&scope_id) {
            if self.closing_keys.get(&c.key) == Some(&scope_id) {
                self.closing_keys.remove(&c.key);
            }
            if c.for_room {
                self.evicting = self.evicting.saturating_sub(1);
            }
            return Some(Ended {
                worker: c.worker,
                isolated: c.isolated,
                bounces: 0,
                stalled: false,
            });
        }
        // Stopped without being closed: its worker died.
        if self.live.get(key)?.scope_id != scope_id {
            return None;
        }
        let scope = self.live.remove(key)?;
        if let Some((tick, _)) = scope.idle {
            self.idle.remove(&tick);
        }
        Some(Ended {
            worker: scope.worker,
            isolated: scope.isolated,
            bounces: scope.dispatched.saturating_sub(accepted),
            stalled: scope.stall_reported,
        })
    }

    /// Busy scopes whose app has received nothing for `limit`, each reported
    /// once per stall.
    pub fn stalls(&mut self, now: Instant, limit: Duration) -> Vec<Stall> {
        let mut found = Vec::new();
        for (key, s) in &mut self.live {
            let silent_for = now.duration_since(s.last_progress);
            if s.busy() && !s.stall_reported && silent_for >= limit {
                s.stall_reported = true;
                found.push(Stall {
                    key: key.clone(),
                    queued: s.outstanding(),
                    silent_for,
                });
            }
        }
        found
    }

    /// Keys whose scope has been idle for `timeout`: the front of the idle
    /// list.
    pub fn expired(&self, now: Instant, timeout: Duration) -> Vec<ScopeKey> {
        let mut expired = Vec::new();
        for key in self.idle.values() {
            match self.live.get(key).and_then(|s| s.idle) {
                Some((_, since)) if now.duration_since(since) >= timeout => {
                    expired.push(key.clone())
                }
                _ => break,
            }
        }
        expired
    }

    /// Whether `key`'s isolated scope has gone `limit` without its app
    /// receiving anything.
    pub fn isolated_without_progress(&self, key: &ScopeKey, now: Instant, limit: Duration) -> bool {
        self.live
            .get(key)
            .is_some_and(|s| s.isolated && now.duration_since(s.last_progress) >= limit)
    }

    // --- keys waiting to be admitted ---

    /// `key` waits for a worker or room, after every key waiting already.
    pub fn wait(&mut self, key: ScopeKey) {
        self.admit.push_back(key);
    }

    /// The key waiting longest.
    pub fn first_waiting(&self) -> Option<&ScopeKey> {
        self.admit.front()
    }

    pub fn admitted(&mut self) -> Option<ScopeKey> {
        self.admit.pop_front()
    }

    pub fn none_waiting(&self) -> bool {
        self.admit.is_empty()
    }

    /// Forgets every waiting key (shutdown).
    pub fn clear_waiting(&mut self) {
        self.admit.clear();
    }

    /// Nothing waits any more: if keys had waited for room with no idle
    /// scope to close, since when and how many at most.
    /// Only a stretch whose start was logged is reported.
    pub fn room_again(&mut self) -> Option<(Instant, usize)> {
        if !self.admit.is_empty() {
            return None;
        }
        self.full
            .take()
            .filter(|f| f.logged)
            .map(|f| (f.since, f.waited))
    }

    /// Closes idle scopes, longest idle first, while keys wait for room and
    /// the scopes already closing will not make enough: the keys and
    /// addresses of those to tell.
    pub fn make_room(&mut self, now: Instant) -> Vec<(ScopeKey, A)> {
        let mut evicted = Vec::new();
        while self.admit.len() > self.evicting && self.count() >= self.max_scopes {
            let Some((_, key)) = self.idle.pop_first() else {
                let waiting = self.admit.len();
                match &mut self.full {
                    Some(full) => full.waited = full.waited.max(waiting),
                    None => {
                        let logged = self
                            .full_logged
                            .is_none_or(|t| now.saturating_duration_since(t) >= FULL_LOG_INTERVAL);
                        if logged {
                            let since_last = match self.unlogged {
                                0 => String::new(),
                                n => format!(" ({n} more time(s) since the last such line)"),
                            };
                            log::warn!(
                                "max_scopes={} reached and no instance is idle: {waiting} chat(s) wait for a scope to end{since_last} (raise scopes.max_scopes?)",
                                self.max_scopes
                            );
                            self.full_logged = Some(now);
                            self.unlogged = 0;
                        } else {
                            self.unlogged += 1;
                        }
                        self.full = Some(Full {
                            since: now,
                            waited: waiting,
                            logged,
                        });
                    }
                }
                break;
            };
            if let Some(s) = self.live.get_mut(&key) {
                s.idle = None;
            }
            if let Some(addr) = self.close(&key, true) {
                evicted.push((key, addr));
            }
        }
        evicted
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(id: i64) -> ScopeKey {
        ScopeKey::chat(id)
    }

    /// A table with scopes for chats `ids`, each given one event, on worker 0;
    /// the scope's address is its chat id.
    fn table(max: usize, ids: &[i64], now: Instant) -> ScopeTable<i64> {
        let mut t = ScopeTable::new(max);
        for &id in ids {
            start(&mut t, id, false, now);
        }
        t
    }

    fn start(t: &mut ScopeTable<i64>, id: i64, isolated: bool, now: Instant) -> u64 {
        let scope_id = t.next_id();
        t.insert(chat(id), Scope::new(scope_id, id, 0, isolated, 1, now));
        scope_id
    }

    fn id_of(t: &ScopeTable<i64>, id: i64) -> u64 {
        t.get(&chat(id)).expect("live").scope_id
    }

    #[test]
    fn eviction_takes_the_longest_idle_and_never_a_busy_scope() {
        let now = Instant::now();
        let mut t = table(3, &[1, 2, 3], now);
        // 2 went idle before 3; 1 is busy.
        assert_eq!(t.idle(id_of(&t, 2), &chat(2), 1, now), IdleReport::Listed);
        assert_eq!(t.idle(id_of(&t, 3), &chat(3), 1, now), IdleReport::Listed);
        t.wait(chat(9));
        let evicted = t.make_room(now);
        assert_eq!(evicted, vec![(chat(2), 2)]);
        // One closing for the one waiting key: no more evictions.
        assert!(t.make_room(now).is_empty());
        assert!(t.holds(&chat(2)) && t.get(&chat(2)).is_none());
        assert_eq!(t.count(), 3, "a closing scope still counts");
        // Two waiting: the next idle one goes too, then nothing is left but
        // the busy scope.
        t.wait(chat(10));
        assert_eq!(t.make_room(now), vec![(chat(3), 3)]);
        t.wait(chat(11));
        assert!(t.make_room(now).is_empty());
        assert!(t.get(&chat(1)).is_some());
    }

    #[test]
    fn a_full_table_with_nothing_idle_remembers_the_stretch_until_no_key_waits() {
        let now = Instant::now();
        let mut t = table(1, &[1], now);
        t.wait(chat(2));
        assert!(t.make_room(now).is_empty());
        t.wait(chat(3));
        assert!(t.make_room(now + Duration::from_secs(1)).is_empty());
        assert_eq!(t.room_again(), None, "keys still wait");
        assert_eq!(t.admitted(), Some(chat(2)));
        assert_eq!(t.first_waiting(), Some(&chat(3)));
        assert_eq!(t.admitted(), Some(chat(3)));
        assert!(t.none_waiting());
        assert_eq!(t.room_again(), Some((now, 2)));
        assert_eq!(t.room_again(), None, "reported once");
    }

    #[test]
    fn stretches_of_a_full_table_are_reported_at_most_once_a_minute() {
        let now = Instant::now();
        let mut t = table(1, &[1], now);
        let stretch = |t: &mut ScopeTable<i64>, key: i64, at: Instant| {
            t.wait(chat(key));
            assert!(t.make_room(at).is_empty());
            assert_eq!(t.admitted(), Some(chat(key)));
            t.room_again()
        };
        assert_eq!(stretch(&mut t, 2, now), Some((now, 1)));
        // Room runs out again and again within the minute: not reported.
        let soon = now + Duration::from_secs(1);
        assert_eq!(stretch(&mut t, 3, soon), None);
        assert_eq!(stretch(&mut t, 4, now + Duration::from_secs(59)), None);
        assert_eq!(t.unlogged, 2);
        let later = now + FULL_LOG_INTERVAL;
        assert_eq!(stretch(&mut t, 5, later), Some((later, 1)));
        assert_eq!(t.unlogged, 0);
    }

    #[test]
    fn a_stopped_scope_frees_its_key_and_its_room() {
        let now = Instant::now();
        let mut t = table(2, &[1, 2], now);
        assert!(!t.has_room());
        let first = id_of(&t, 1);
        t.idle(first, &chat(1), 1, now);
        t.wait(chat(3));
        assert_eq!(t.make_room(now).len(), 1);
        // A new scope of the same key must wait for this one to stop.
        assert!(t.holds(&chat(1)));
        let ended = t.stopped(first, &chat(1), 1).expect("known");
        assert_eq!(ended.bounces, 0);
        assert!(!t.holds(&chat(1)));
        assert!(t.has_room());
        // Stopping twice is not counted twice.
        assert_eq!(t.stopped(first, &chat(1), 1), None);
        assert_eq!(t.count(), 1);
    }

    #[test]
    fn a_scope_that_stopped_unasked_tells_what_is_on_its_way_back() {
        let now = Instant::now();
        let mut t = table(5, &[1], now);
        let scope_id = id_of(&t, 1);
        t.give(&chat(1), 3).expect("live");
        // It stopped (worker died) having accepted 2 of the 4 events.
        let ended = t.stopped(scope_id, &chat(1), 2).expect("known");
        assert_eq!(ended.bounces, 2);
        assert!(!ended.stalled);
        assert!(t.is_empty());
        // A stale report about an older scope of the key is ignored.
        start(&mut t, 1, false, now);
        assert_eq!(t.stopped(scope_id, &chat(1), 0), None);
        assert!(t.get(&chat(1)).is_some());
    }

    #[test]
    fn idle_reports_count_only_when_nothing_was_given_since() {
        let now = Instant::now();
        let mut t = table(5, &[1], now);
        let scope_id = id_of(&t, 1);
        t.give(&chat(1), 1);
        // Reported idle after the first event, but a second was given.
        assert_eq!(t.idle(scope_id, &chat(1), 1, now), IdleReport::Ignored);
        assert!(!t.ended_with_all(scope_id, &chat(1), 1));
        assert_eq!(t.idle(scope_id, &chat(1), 2, now), IdleReport::Listed);
        assert_eq!(t.idle(scope_id, &chat(1), 2, now), IdleReport::Ignored);
        assert!(t.ended_with_all(scope_id, &chat(1), 2));
        // Giving it more takes it off the idle list: nothing to evict.
        t.give(&chat(1), 1);
        assert!(t
            .expired(now + Duration::from_secs(3600), Duration::ZERO)
            .is_empty());
        // An isolated scope is never listed: it is done and should close.
        let mut iso = ScopeTable::new(5);
        let id = start(&mut iso, 7, true, now);
        assert_eq!(iso.idle(id, &chat(7), 1, now), IdleReport::Isolated);
        assert!(
            iso.give(&chat(7), 1).is_none(),
            "isolated scopes take no new events"
        );
    }

    #[test]
    fn idle_timeout_closes_from_the_front_of_the_idle_list() {
        let now = Instant::now();
        let mut t = table(5, &[1, 2, 3], now);
        let later = now + Duration::from_secs(10);
        t.idle(id_of(&t, 2), &chat(2), 1, now);
        t.idle(id_of(&t, 1), &chat(1), 1, later);
        let timeout = Duration::from_secs(30);
        assert!(t.expired(now + Duration::from_secs(29), timeout).is_empty());
        assert_eq!(
            t.expired(now + Duration::from_secs(35), timeout),
            vec![chat(2)]
        );
        assert_eq!(
            t.expired(now + Duration::from_secs(45), timeout),
            vec![chat(2), chat(1)]
        );
    }

    #[test]
    fn a_stall_is_reported_once_and_moving_again_counts_its_queue_again() {
        let now = Instant::now();
        let mut t = table(5, &[1, 2], now);
        let limit = Duration::from_secs(5);
        let id2 = id_of(&t, 2);
        // Chat 2 received its one event: not busy, never stalled.
        assert_eq!(t.received(id2, &chat(2), 1, now), 0);
        t.give(&chat(1), 2);
        let stalls = t.stalls(now + limit, limit);
        assert_eq!(
            stalls,
            vec![Stall {
                key: chat(1),
                queued: 3,
                silent_for: limit
            }]
        );
        assert!(
            t.stalls(now + limit * 2, limit).is_empty(),
            "once per stall"
        );
        // Events given to a stalled scope do not count.
        assert_eq!(t.give(&chat(1), 1).map(|(_, stalled)| stalled), Some(true));
        // It moves: its 4 queued events count again, and it can stall anew.
        let id1 = id_of(&t, 1);
        assert_eq!(t.received(id1, &chat(1), 1, now + limit * 2), 4);
        assert_eq!(t.received(id1, &chat(1), 1, now + limit * 2), 0);
        assert_eq!(t.stalls(now + limit * 3, limit).len(), 1);
        let ended = t.stopped(id1, &chat(1), 4).expect("known");
        assert!(ended.stalled);
    }

    #[test]
    fn the_isolated_scope_is_slow_only_without_progress() {
        let now = Instant::now();
        let mut t = ScopeTable::new(5);
        let id = start(&mut t, 1, true, now);
        let limit = Duration::from_secs(20);
        assert!(!t.isolated_without_progress(&chat(1), now + limit / 2, limit));
        t.received(id, &chat(1), 1, now + limit / 2);
        assert!(!t.isolated_without_progress(&chat(1), now + limit, limit));
        assert!(t.isolated_without_progress(&chat(1), now + limit * 2, limit));
        start(&mut t, 2, false, now);
        assert!(!t.isolated_without_progress(&chat(2), now + limit * 2, limit));
    }
}
