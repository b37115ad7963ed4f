//! What the two ways updates come in share: the Poller (`getUpdates`) and
//! the webhook receiver (Telegram's POSTs) hand updates to the journal in
//! the same rows and hold back by the same word from the Supervisor.
//!
//! Plain data and functions; the actors own the instances.

use std::sync::Arc;

use crate::actors::poller::Backpressure;
use crate::telegram::Update;

/// The journal's rows for these updates: `(update_id, body)`, shared so
/// that a failed store can be sent again as it was.
pub fn journal_rows(updates: &[Update]) -> Arc<[(i64, String)]> {
    updates
        .iter()
        .map(|u| (u.id.0, u.json().to_owned()))
        .collect::<Vec<_>>()
        .into()
}

/// What the Supervisor last said about backpressure, and whether the pause
/// was logged (its end is logged too, once each).
pub struct Gate {
    state: State,
    logged_pause: bool,
}

#[derive(Clone, Copy)]
enum State {
    /// Nothing yet: new updates wait for word.
    Unknown,
    Open {
        undelivered: usize,
    },
    Closed {
        undelivered: usize,
    },
}

/// How a pause and its end read in the log: the log target (the actor's
/// module), what stops, what starts again.
pub struct GateWords {
    pub target: &'static str,
    pub paused: &'static str,
    pub resumed: &'static str,
}

impl Default for Gate {
    fn default() -> Self {
        Gate {
            state: State::Unknown,
            logged_pause: false,
        }
    }
}

impl Gate {
    /// The Supervisor's word.
    pub fn set(&mut self, msg: &Backpressure) {
        let undelivered = msg.undelivered;
        self.state = if msg.paused {
            State::Closed { undelivered }
        } else {
            State::Open { undelivered }
        };
    }

    /// Whether new updates may be taken now; the first refusal of a pause
    /// and the first admission after it are logged.
    pub fn admits(&mut self, max_undelivered: usize, words: &GateWords) -> bool {
        match self.state {
            State::Unknown => false,
            State::Closed { undelivered } => {
                if !self.logged_pause {
                    self.logged_pause = true;
                    log::warn!(
                        target: words.target,
                        "backpressure: {undelivered} updates not yet received by the apps (journal.max_undelivered={max_undelivered}); {}",
                        words.paused
                    );
                }
                false
            }
            State::Open { undelivered } => {
                if self.logged_pause {
                    self.logged_pause = false;
                    log::info!(
                        target: words.target,
                        "backpressure: {undelivered} updates undelivered; {}",
                        words.resumed
                    );
                }
                true
            }
        }
    }
}

/// One line for the updates of a batch the journal had stored before,
/// under the caller's log target (`module_path!()`), as it always was.
pub fn log_resent(target: &str, skipped: usize) {
    if skipped > 0 {
        log::info!(
            target: target,
            "{skipped} update(s) already in the journal skipped (sent again by Telegram)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WORDS: GateWords = GateWords {
        target: module_path!(),
        paused: "paused",
        resumed: "resumed",
    };

    #[test]
    fn the_gate_is_shut_until_the_supervisor_opens_it() {
        let mut gate = Gate::default();
        assert!(!gate.admits(10, &WORDS), "no word yet");
        gate.set(&Backpressure {
            paused: false,
            undelivered: 0,
        });
        assert!(gate.admits(10, &WORDS));
        gate.set(&Backpressure {
            paused: true,
            undelivered: 10,
        });
        assert!(!gate.admits(10, &WORDS));
        assert!(gate.logged_pause);
        gate.set(&Backpressure {
            paused: false,
            undelivered: 4,
        });
        assert!(gate.admits(10, &WORDS));
        assert!(!gate.logged_pause, "the end of the pause was logged");
    }

    #[test]
    fn rows_carry_the_update_as_received() {
        let update =
            Update::from_value(serde_json::json!({"update_id": 3, "message": {"text": "a"}}))
                .expect("an update");
        let rows = journal_rows(&[update]);
        assert_eq!(rows[0].0, 3);
        let back: serde_json::Value = serde_json::from_str(&rows[0].1).expect("JSON");
        assert_eq!(back["message"]["text"], "a");
    }
}
