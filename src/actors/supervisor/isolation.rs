//! The Supervisor's steps for suspects: chats whose update was in hand when
//! the app killed its worker run again one at a time on the isolation worker
//! ([`super::quarantine`] decides who goes next and what is dropped), move
//! back to their home worker once clean, and the isolation worker is started
//! only while there are suspects.

use std::time::{Duration, Instant};

use actix::prelude::*;

use super::quarantine::{Verdict, ISOLATED_DEATHS};
use super::{Supervisor, MOVED};
use crate::actors::worker::{describe, Death, ShutdownWorker};
use crate::bridge::Event;
use crate::ops::metrics::metrics;
use crate::routing::ScopeKey;

impl Supervisor {
    /// How long the isolated chat may work on an update without its worker
    /// dying before it is taken to be innocent: past the ping deadline a hang
    /// would have been caught, so it is only slow. Without this, one handler
    /// awaiting something for an hour would hold every other suspect back.
    pub(super) fn isolation_limit(&self) -> Duration {
        self.settings.app.hang_timeout + Duration::from_secs(5)
    }

    /// Moves the isolated chat back to the regular workers once it has gone
    /// `isolation_limit` without progress and without a death.
    pub(super) fn release_slow_isolated(&mut self) {
        let limit = self.isolation_limit();
        let now = Instant::now();
        let slow = self
            .quarantine
            .current()
            .filter(|key| self.scopes.isolated_without_progress(key, now, limit))
            .cloned();
        if let Some(key) = slow {
            log::warn!(
                "scope={key} ran {:.0}s alone on the isolation worker without killing it; taken to be innocent and moved back",
                limit.as_secs_f64()
            );
            self.close(&key, MOVED);
        }
    }

    /// The isolated chat's scope stopped: because its worker died (blame the
    /// update in hand, if the app did it), or because it was closed.
    pub(super) fn isolated_stopped(
        &mut self,
        key: &ScopeKey,
        lost: Option<Death>,
        in_hand: Option<i64>,
        leftover: &mut Vec<Event>,
    ) {
        if self.quarantine.current() != Some(key) {
            return;
        }
        match lost {
            Some(Death::App) => match self.quarantine.died(in_hand) {
                Verdict::Drop(id) => {
                    log::error!(
                        "scope={key} update={id} dropped: it was being handled, alone in the isolation worker, each of the {} times that worker died (and at the death that made it a suspect)",
                        ISOLATED_DEATHS
                    );
                    leftover.remove(0);
                    self.outbox.done(vec![id]);
                    self.backlog.remove(1);
                    metrics().updates_dropped.inc();
                }
                Verdict::Retry => {
                    if let Some(id) = in_hand {
                        log::warn!(
                            "scope={key} update={id} was in hand when the isolation worker died; it runs once more, alone"
                        );
                    }
                }
            },
            // Killed from outside, or stopped for a reload: nothing to blame.
            Some(Death::Outside | Death::Asked) => {}
            None => {
                self.quarantine.release();
                log::info!("scope={key} cleared in isolation; back on the regular workers");
            }
        }
    }

    /// Runs the next suspect chat on the isolation worker, starting one if
    /// needed; ends the isolation worker when nothing is left to isolate.
    pub(super) fn pump_isolation(&mut self, ctx: &mut Context<Self>) {
        if self.shutting_down || self.stopping_workers {
            return;
        }
        if self.quarantine.is_empty() {
            if let Some(index) = self.workers.retire_isolation() {
                log::info!(
                    "isolation worker={index} pid={} no longer needed; stopping it",
                    self.workers.pid(index)
                );
                if let Some(links) = self.workers.links(index) {
                    links.worker.do_send(ShutdownWorker {
                        grace: self.settings.scopes.disconnect_grace.as_secs_f64(),
                    });
                }
            }
            return;
        }
        let Some(index) = self.workers.isolation() else {
            let index = self.workers.open_isolation();
            log::info!(
                "starting isolation worker={index}: {} chat(s) to run one at a time",
                self.quarantine.len()
            );
            return self.start_isolation_worker(index, Duration::ZERO, ctx);
        };
        if self.workers.isolation_ready().is_none() {
            return;
        }
        if let Some(key) = self.quarantine.current() {
            if self.scopes.holds(key) {
                return;
            }
        }
        // The current chat (after a death), or the next one.
        let mut tries = self.quarantine.len();
        while tries > 0 {
            tries -= 1;
            let Some(key) = self.quarantine.take_turn().cloned() else {
                return;
            };
            let startable = self.pending.contains(&key)
                && !self.pending.awaits_bounces(&key)
                && !self.scopes.holds(&key);
            if startable {
                log::debug!("scope={key} runs alone on isolation worker={index}");
                self.start_scope(&key, index, true);
                return;
            }
            if !self.pending.contains(&key) && !self.scopes.holds(&key) {
                // Nothing left to run for it (its only update was dropped).
                self.quarantine.release();
                continue;
            }
            return;
        }
    }

    pub(super) fn start_isolation_worker(
        &mut self,
        index: usize,
        delay: Duration,
        ctx: &mut Context<Self>,
    ) {
        if delay.is_zero() {
            return self.start_worker(index, ctx);
        }
        ctx.run_later(delay, move |act, ctx| {
            if act.workers.isolation() == Some(index) && !act.stopping_workers && !act.shutting_down
            {
                act.start_worker(index, ctx);
            }
        });
    }

    /// One line per burst of suspects (a worker's death makes them all at
    /// once), not one per chat.
    pub(super) fn count_suspect(&mut self, ctx: &mut Context<Self>) {
        self.tally.suspects += 1;
        if std::mem::replace(&mut self.tally.scheduled, true) {
            return;
        }
        ctx.run_later(Duration::from_millis(100), |act, _| {
            let n = std::mem::take(&mut act.tally.suspects);
            act.tally.scheduled = false;
            log::warn!(
                "{n} chat(s) had an update in hand when their worker died: each runs again alone on the isolation worker, one chat at a time ({} waiting in all); the other chats go on",
                act.quarantine.len()
            );
        });
    }

    pub(super) fn isolation_exited(
        &mut self,
        index: usize,
        pid: u32,
        status: Option<std::process::ExitStatus>,
        death: Death,
        ctx: &mut Context<Self>,
    ) {
        if self.workers.is_retired(index) || death == Death::Asked {
            log::info!(
                "isolation worker={index} pid={pid} exited ({})",
                describe(status)
            );
            self.workers.close_isolation();
            // Suspects may have come meanwhile.
            return self.pump_isolation(ctx);
        }
        // Crash-loop guard: each death in a row waits longer, never drops.
        let delay = self.workers.isolation_restart_delay(index);
        log::warn!(
            "isolation worker={index} pid={pid} died ({}); restarting it in {:.1}s",
            describe(status),
            delay.as_secs_f64()
        );
        metrics().worker_restarts.inc();
        self.start_isolation_worker(index, delay, ctx);
    }
}
