//! Events for scope keys that have no live scope, each key's in update order.
//!
//! Plain data: the Supervisor decides when a key may start a scope; this
//! keeps the order rules. A stopped scope's leftovers go in front of what
//! arrived for its key meanwhile; events that reached a scope after it
//! stopped by itself come back ("bounce") and go in right after those
//! leftovers, and the key waits until all of them are back.

use std::collections::VecDeque;

use foldhash::HashMap;
use serde_json::value::RawValue;

use crate::bridge::Event;
use crate::routing::ScopeKey;

/// One key's waiting events.
pub struct Pending {
    /// The scope's Chat or User object, encoded, for its next scope dict.
    pub subject: Box<RawValue>,
    pub events: VecDeque<Event>,
    /// Bounced events still to come back, and where they go.
    bounces: u64,
    bounce_at: usize,
    /// In the Supervisor's queue of keys waiting for a worker or room.
    pub queued: bool,
}

#[derive(Default)]
pub struct PendingEvents {
    keys: HashMap<ScopeKey, Pending>,
}

impl PendingEvents {
    /// New events for `key`, after every event it already has.
    pub fn push(
        &mut self,
        key: &ScopeKey,
        subject: impl FnOnce() -> Box<RawValue>,
        events: Vec<Event>,
    ) {
        match self.keys.get_mut(key) {
            Some(p) => p.events.extend(events),
            None => {
                self.keys.insert(
                    key.clone(),
                    Pending {
                        subject: subject(),
                        events: events.into(),
                        bounces: 0,
                        bounce_at: 0,
                        queued: false,
                    },
                );
            }
        }
    }

    /// A stopped scope's `leftover`, older than anything waiting for `key`;
    /// `bounces` events it was sent after it stopped are on their way back.
    pub fn hand_back(
        &mut self,
        key: &ScopeKey,
        subject: Box<RawValue>,
        leftover: Vec<Event>,
        bounces: u64,
    ) {
        if leftover.is_empty() && bounces == 0 {
            return;
        }
        let n = leftover.len();
        let p = self.keys.entry(key.clone()).or_insert_with(|| Pending {
            subject,
            events: VecDeque::new(),
            bounces: 0,
            bounce_at: 0,
            queued: false,
        });
        for event in leftover.into_iter().rev() {
            p.events.push_front(event);
        }
        p.bounces += bounces;
        p.bounce_at = n;
    }

    /// Bounced events are back. `None` when nothing waits for them (they
    /// were not announced); `Some(true)` once every announced one is back.
    pub fn bounced(&mut self, key: &ScopeKey, events: Vec<Event>) -> Option<bool> {
        let p = self.keys.get_mut(key)?;
        let n = events.len();
        for (i, event) in events.into_iter().enumerate() {
            p.events.insert(p.bounce_at + i, event);
        }
        p.bounce_at += n;
        p.bounces = p.bounces.saturating_sub(n as u64);
        Some(p.bounces == 0)
    }

    /// Whether `key` waits for bounced events.
    pub fn awaits_bounces(&self, key: &ScopeKey) -> bool {
        self.keys.get(key).is_some_and(|p| p.bounces > 0)
    }

    pub fn contains(&self, key: &ScopeKey) -> bool {
        self.keys.contains_key(key)
    }

    pub fn get_mut(&mut self, key: &ScopeKey) -> Option<&mut Pending> {
        self.keys.get_mut(key)
    }

    /// Takes everything waiting for `key`, to start its scope with.
    pub fn take(&mut self, key: &ScopeKey) -> Option<Pending> {
        self.keys.remove(key)
    }

    pub fn clear(&mut self) {
        self.keys.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn subject() -> Box<RawValue> {
        serde_json::value::to_raw_value(&json!({"id": 1})).unwrap()
    }

    fn ids(p: &Pending) -> Vec<i64> {
        p.events.iter().map(|e| e.update_id().unwrap()).collect()
    }

    fn ev(id: i64) -> Event {
        Event::Json(json!({"update_id": id}))
    }

    #[test]
    fn leftovers_go_in_front_of_what_arrived_meanwhile() {
        let key = ScopeKey::chat(1);
        let mut p = PendingEvents::default();
        p.push(&key, subject, vec![ev(11), ev(12)]);
        p.hand_back(&key, subject(), vec![ev(6), ev(7)], 0);
        p.push(&key, subject, vec![ev(13)]);
        assert_eq!(ids(&p.take(&key).unwrap()), [6, 7, 11, 12, 13]);
        assert!(!p.contains(&key));
    }

    #[test]
    fn bounced_events_return_to_their_place_and_the_key_waits_for_all() {
        let key = ScopeKey::chat(1);
        let mut p = PendingEvents::default();
        // Stopped with 6-7 left and 8-9 sent after it stopped.
        p.hand_back(&key, subject(), vec![ev(6), ev(7)], 2);
        // 10 arrives before the bounces do.
        p.push(&key, subject, vec![ev(10)]);
        assert!(p.awaits_bounces(&key));
        assert_eq!(p.bounced(&key, vec![ev(8)]), Some(false));
        assert!(p.awaits_bounces(&key));
        assert_eq!(p.bounced(&key, vec![ev(9)]), Some(true));
        assert!(!p.awaits_bounces(&key));
        assert_eq!(ids(&p.take(&key).unwrap()), [6, 7, 8, 9, 10]);
    }

    #[test]
    fn a_stop_with_nothing_left_leaves_nothing_waiting() {
        let key = ScopeKey::chat(1);
        let mut p = PendingEvents::default();
        p.hand_back(&key, subject(), Vec::new(), 0);
        assert!(!p.contains(&key));
        // Bounces alone make the key wait, with no events yet.
        p.hand_back(&key, subject(), Vec::new(), 1);
        assert!(p.awaits_bounces(&key));
        assert_eq!(p.bounced(&key, vec![ev(5)]), Some(true));
        assert_eq!(ids(&p.take(&key).unwrap()), [5]);
        assert_eq!(p.bounced(&key, vec![ev(6)]), None);
    }
}
