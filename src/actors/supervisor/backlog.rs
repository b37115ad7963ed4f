//! The backlog: updates dispatched that no app has received yet, and whether
//! that holds polling back (`journal.max_undelivered`).
//!
//! Plain data: the Supervisor counts updates in as it takes them and out as
//! the apps receive them (a stalled scope's queue is counted out while it is
//! stalled: one stuck chat must not stop the others), and after each message
//! it handles tells the Poller only when the answer to "pause?" changed.

use crate::actors::poller::Backpressure;

pub struct Backlog {
    undelivered: usize,
    limit: usize,
    /// Whether the Poller was last told to pause.
    told_paused: bool,
}

impl Backlog {
    pub fn new(limit: usize) -> Backlog {
        Backlog {
            undelivered: 0,
            limit,
            told_paused: false,
        }
    }

    pub fn add(&mut self, n: usize) {
        self.undelivered += n;
    }

    pub fn remove(&mut self, n: usize) {
        self.undelivered = self.undelivered.saturating_sub(n);
    }

    fn paused(&self) -> bool {
        self.undelivered >= self.limit
    }

    /// At the limit: what is pushed over the HTTP endpoint waits outside,
    /// as Telegram's updates do while polling is paused.
    pub fn full(&self) -> bool {
        self.paused()
    }

    /// What to tell the Poller, if the answer changed since it was last
    /// told.
    pub fn change(&mut self) -> Option<Backpressure> {
        (self.paused() != self.told_paused).then(|| self.state())
    }

    /// The state as it is, for a Poller that asks; it counts as told.
    pub fn state(&mut self) -> Backpressure {
        self.told_paused = self.paused();
        Backpressure {
            paused: self.told_paused,
            undelivered: self.undelivered,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_poller_hears_only_of_crossings_of_the_limit() {
        let mut b = Backlog::new(3);
        b.add(2);
        assert_eq!(b.change(), None);
        b.add(1);
        assert_eq!(
            b.change(),
            Some(Backpressure {
                paused: true,
                undelivered: 3
            })
        );
        assert_eq!(b.change(), None, "told once");
        b.add(5);
        b.remove(4);
        assert_eq!(b.change(), None, "still at or above the limit");
        b.remove(2);
        assert_eq!(
            b.change(),
            Some(Backpressure {
                paused: false,
                undelivered: 2
            })
        );
        // Over and back within one message: nothing to tell.
        b.add(10);
        b.remove(10);
        assert_eq!(b.change(), None);
        b.remove(100);
        assert_eq!(b.state().undelivered, 0, "never below zero");
    }

    #[test]
    fn a_poller_that_asks_gets_the_state_and_then_only_changes() {
        let mut b = Backlog::new(1);
        b.add(4);
        assert!(b.state().paused);
        assert_eq!(b.change(), None);
        b.remove(4);
        assert!(!b.change().expect("resumed").paused);
    }
}
