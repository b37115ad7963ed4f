//! Which update killed a worker: suspects, isolated one chat at a time.
//!
//! A worker runs the instances of many chats in one process, so when it dies
//! of the app's doing (it exits or crashes by itself, hangs, or breaks its
//! channel) every update in hand there is a suspect, and all but one are
//! usually innocent. Each suspect's chat is run again *alone*, on a worker of
//! its own (the isolation worker), one chat after the other: a death there
//! has exactly one update in hand, so it can be blamed on that update. An
//! update in hand at [`ISOLATED_DEATHS`] isolated deaths in a row is dropped;
//! no other update is ever dropped for a death. A worker killed from outside
//! (SIGKILL the daemon did not send: the OOM killer, an operator) makes no
//! suspect at all.
//!
//! This module is the bookkeeping only; the Supervisor runs the isolation
//! worker and holds the suspects' events meanwhile, in order.

use std::collections::VecDeque;

use foldhash::HashSet;

use crate::routing::ScopeKey;

/// Isolated deaths with the same update in hand after which it is dropped.
/// With the death that made it a suspect, an update is dropped at its third.
pub const ISOLATED_DEATHS: u32 = 2;

/// What to do after the isolated chat's worker died.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Run the chat again in isolation; nothing is dropped.
    Retry,
    /// This update killed the worker every time it ran alone: drop it, then
    /// go on with the chat's later updates, still in isolation.
    Drop(i64),
}

#[derive(Default)]
pub struct Quarantine {
    /// Suspect chats not isolated yet, in the order they became suspects.
    waiting: VecDeque<ScopeKey>,
    /// Every chat held here: waiting or current.
    members: HashSet<ScopeKey>,
    current: Option<Current>,
}

struct Current {
    key: ScopeKey,
    /// The update in hand at the last isolated death, and how many isolated
    /// deaths in a row had it in hand.
    strikes: Option<(i64, u32)>,
}

impl Quarantine {
    /// `key`'s update in hand was there when its worker died of the app's
    /// doing. A chat already held keeps its place.
    pub fn suspect(&mut self, key: ScopeKey) {
        if self.members.insert(key.clone()) {
            self.waiting.push_back(key);
        }
    }

    /// Whether `key`'s events must wait for (or are in) isolation.
    pub fn holds(&self, key: &ScopeKey) -> bool {
        self.members.contains(key)
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }

    /// Chats held, the isolated one included.
    pub fn len(&self) -> usize {
        self.members.len()
    }

    /// The chat running in isolation, if any.
    pub fn current(&self) -> Option<&ScopeKey> {
        self.current.as_ref().map(|c| &c.key)
    }

    /// Makes the next waiting chat the isolated one, unless one is already.
    pub fn take_turn(&mut self) -> Option<&ScopeKey> {
        if self.current.is_none() {
            let key = self.waiting.pop_front()?;
            self.current = Some(Current { key, strikes: None });
        }
        self.current()
    }

    /// The isolated chat's worker died of the app's doing with `in_hand`
    /// being handled (None: between updates, or before the first).
    pub fn died(&mut self, in_hand: Option<i64>) -> Verdict {
        let Some(current) = self.current.as_mut() else {
            return Verdict::Retry;
        };
        let Some(id) = in_hand else {
            // Nothing to blame: let the other suspects have their turn first,
            // so a chat whose instance dies before receiving anything cannot
            // hold the isolation worker for ever.
            if let Some(current) = self.current.take() {
                self.waiting.push_back(current.key);
            }
            return Verdict::Retry;
        };
        let count = match current.strikes {
            Some((last, n)) if last == id => n + 1,
            _ => 1,
        };
        if count >= ISOLATED_DEATHS {
            current.strikes = None;
            Verdict::Drop(id)
        } else {
            current.strikes = Some((id, count));
            Verdict::Retry
        }
    }

    /// The isolated chat finished what it held without killing its worker:
    /// it goes back to the ordinary workers.
    pub fn release(&mut self) -> Option<ScopeKey> {
        let current = self.current.take()?;
        self.members.remove(&current.key);
        Some(current.key)
    }

    /// Forgets every chat (shutdown: what they hold stays in the journal).
    pub fn clear(&mut self) {
        self.waiting.clear();
        self.members.clear();
        self.current = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat(id: i64) -> ScopeKey {
        ScopeKey::chat(id)
    }

    #[test]
    fn suspects_are_isolated_one_at_a_time_in_order() {
        let mut q = Quarantine::default();
        q.suspect(chat(1));
        q.suspect(chat(2));
        q.suspect(chat(1));
        assert_eq!(q.len(), 2);
        assert_eq!(q.take_turn(), Some(&chat(1)));
        // Still chat 1 until it is released.
        assert_eq!(q.take_turn(), Some(&chat(1)));
        assert!(q.holds(&chat(2)));
        assert_eq!(q.release(), Some(chat(1)));
        assert!(!q.holds(&chat(1)));
        assert_eq!(q.take_turn(), Some(&chat(2)));
        assert_eq!(q.release(), Some(chat(2)));
        assert!(q.is_empty());
        assert_eq!(q.take_turn(), None);
    }

    #[test]
    fn only_an_update_in_hand_at_consecutive_isolated_deaths_is_dropped() {
        let mut q = Quarantine::default();
        q.suspect(chat(1));
        q.take_turn();
        assert_eq!(q.died(Some(10)), Verdict::Retry);
        // Another update in hand resets the count: 10 was not to blame alone.
        assert_eq!(q.died(Some(11)), Verdict::Retry);
        assert_eq!(q.died(Some(11)), Verdict::Drop(11));
        // After a drop the next update starts from nothing.
        assert_eq!(q.died(Some(12)), Verdict::Retry);
        assert_eq!(q.current(), Some(&chat(1)));
    }

    #[test]
    fn a_death_with_nothing_in_hand_blames_nobody_and_lets_others_go_first() {
        let mut q = Quarantine::default();
        q.suspect(chat(1));
        q.suspect(chat(2));
        q.take_turn();
        for _ in 0..10 {
            assert_eq!(q.died(None), Verdict::Retry);
            q.take_turn();
        }
        // Turns alternate; both chats are still held, nothing was dropped.
        assert!(q.holds(&chat(1)) && q.holds(&chat(2)));
        assert_eq!(q.len(), 2);
    }
}
