//! Where a reload stands: the workers still to replace, the one being
//! replaced, and whether another reload was asked for meanwhile.
//!
//! A reload replaces every worker, one at a time: start a new worker, wait
//! until it is ready, then retire the old one and wait until it has exited.
//! Plain data: the Supervisor starts and stops the workers and tells this
//! what happened; this says what comes next. A replacement that exits before
//! it is ready aborts the reload (the running workers stay); a worker that
//! died before its turn is skipped, its ordinary restart already loads the
//! new code.

use std::collections::VecDeque;

#[derive(Default)]
pub struct Reload {
    /// Workers (slot indices) still to replace, after the current one.
    queue: VecDeque<usize>,
    current: Option<Step>,
    /// Another reload was asked for while this one ran: run it after.
    again: bool,
}

struct Step {
    old: usize,
    new: usize,
    /// The replacement is ready and the old worker is retiring.
    retiring: bool,
}

/// What to do after a step of a reload.
#[derive(Debug, PartialEq, Eq)]
pub enum Next {
    /// Replace the worker in this slot.
    Replace(usize),
    /// Every worker was replaced; `again`: run another reload now.
    Complete { again: bool },
}

/// What a worker's exit means for the reload.
#[derive(Debug, PartialEq, Eq)]
pub enum Exit {
    /// Not the reload's: an ordinary death.
    Unrelated,
    /// A retired worker exited; `advance`: it was the one being replaced,
    /// go on with the next.
    Retired { advance: bool },
    /// The replacement exited before it was ready: the reload is over.
    Aborted,
}

impl Reload {
    /// A reload was asked for, to replace `workers`: true when it starts
    /// now, false when one is running already (it follows that one).
    pub fn request(&mut self, workers: VecDeque<usize>) -> bool {
        if self.current.is_some() {
            self.again = true;
            return false;
        }
        self.queue = workers;
        true
    }

    /// The number of workers to replace, as of the start.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// The next worker to replace, or the end of the reload.
    pub fn next(&mut self) -> Next {
        match self.queue.pop_front() {
            Some(old) => Next::Replace(old),
            None => Next::Complete {
                again: std::mem::take(&mut self.again),
            },
        }
    }

    /// `new` was started to replace `old`.
    pub fn replacing(&mut self, old: usize, new: usize) {
        self.current = Some(Step {
            old,
            new,
            retiring: false,
        });
    }

    /// The worker in `index` is ready: the worker it replaces, to retire now.
    pub fn ready(&mut self, index: usize) -> Option<usize> {
        let step = self.current.as_mut()?;
        if step.new != index || step.retiring {
            return None;
        }
        step.retiring = true;
        Some(step.old)
    }

    /// The worker in `index` exited; `retired` says whether it had been
    /// retired.
    pub fn exited(&mut self, index: usize, retired: bool) -> Exit {
        if retired {
            let advance = self.current.as_ref().is_some_and(|s| s.old == index);
            if advance {
                self.current = None;
            }
            return Exit::Retired { advance };
        }
        match &self.current {
            Some(step) if step.new == index && !step.retiring => {
                self.cancel();
                Exit::Aborted
            }
            _ => Exit::Unrelated,
        }
    }

    /// Forgets the reload and any that was to follow (shutdown, or abort).
    pub fn cancel(&mut self) {
        self.queue.clear();
        self.current = None;
        self.again = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_are_replaced_one_at_a_time_in_order() {
        let mut r = Reload::default();
        assert!(r.request(VecDeque::from([0, 1])));
        assert_eq!(r.queued(), 2);
        assert_eq!(r.next(), Next::Replace(0));
        r.replacing(0, 2);
        // Only the replacement's readiness retires the old worker, once.
        assert_eq!(r.ready(1), None);
        assert_eq!(r.ready(2), Some(0));
        assert_eq!(r.ready(2), None);
        // Another worker's death is not the reload's business.
        assert_eq!(r.exited(1, false), Exit::Unrelated);
        assert_eq!(r.exited(0, true), Exit::Retired { advance: true });
        assert_eq!(r.next(), Next::Replace(1));
        r.replacing(1, 0);
        assert_eq!(r.ready(0), Some(1));
        assert_eq!(r.exited(1, true), Exit::Retired { advance: true });
        assert_eq!(r.next(), Next::Complete { again: false });
    }

    #[test]
    fn a_reload_asked_for_during_one_follows_it_once() {
        let mut r = Reload::default();
        assert!(r.request(VecDeque::from([0])));
        assert_eq!(r.next(), Next::Replace(0));
        r.replacing(0, 1);
        assert!(!r.request(VecDeque::from([1])));
        assert!(!r.request(VecDeque::from([1])));
        r.ready(1);
        assert_eq!(r.exited(0, true), Exit::Retired { advance: true });
        assert_eq!(r.next(), Next::Complete { again: true });
        assert!(r.request(VecDeque::from([1])));
        assert_eq!(r.next(), Next::Replace(1));
    }

    #[test]
    fn a_replacement_that_dies_before_it_is_ready_aborts_everything() {
        let mut r = Reload::default();
        r.request(VecDeque::from([0, 1]));
        assert_eq!(r.next(), Next::Replace(0));
        r.replacing(0, 2);
        r.request(VecDeque::new());
        assert_eq!(r.exited(2, false), Exit::Aborted);
        // Nothing queued, nothing to follow.
        assert_eq!(r.next(), Next::Complete { again: false });
        assert!(r.request(VecDeque::from([0])));
    }

    #[test]
    fn a_retired_worker_that_is_not_the_current_one_does_not_advance() {
        let mut r = Reload::default();
        r.request(VecDeque::from([0, 1]));
        assert_eq!(r.next(), Next::Replace(0));
        r.replacing(0, 2);
        // Once the replacement is ready, its death is an ordinary one.
        r.ready(2);
        assert_eq!(r.exited(2, false), Exit::Unrelated);
        assert_eq!(r.exited(5, true), Exit::Retired { advance: false });
        assert_eq!(r.exited(0, true), Exit::Retired { advance: true });
    }
}
