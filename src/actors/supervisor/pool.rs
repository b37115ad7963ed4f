//! The worker pool: one slot per worker process the Supervisor runs or
//! starts, each with its role, readiness, scope count and restart history.
//!
//! Plain data: the Supervisor starts the Worker actors and decides when to
//! restart one; this says which worker a new scope goes to (its chat's
//! *home*, see below), which slot a reload's replacement or the isolation
//! worker takes (a slot is reused once its worker has exited, so slots stay
//! under twice `app.workers`), and how long a restart waits. `L` is what a
//! scope reaches its worker by: the scope links in the daemon, a plain value
//! in tests.
//!
//! # A chat stays on one worker
//!
//! Each of the `app.workers` regular workers has a home number, 0 to
//! `app.workers - 1`, and a scope key has a home too: a stable hash of its
//! text form (`chat:123`) over the homes, the same in every run and every
//! build ([`home_hash`], FNV-1a; Rust's own hasher is seeded at random). A
//! new scope goes to the worker of its home, so every instance of a chat
//! runs in the same process, and what a framework keeps in memory per chat
//! outlives idle closes. A worker restarted after a death, or a reload's
//! replacement, takes over its home. Only while a home has no worker at all
//! (a restart's backoff) does a new scope go to the live worker with the
//! fewest scopes instead: the dead process's memory is gone anyway. The
//! price: a chat cannot spread over workers, so one very busy chat keeps one
//! worker busy while the others have room.

use std::collections::VecDeque;
use std::time::Duration;

use crate::actors::worker::Death;
use crate::backoff::Backoff;
use crate::routing::ScopeKey;

/// How long a restart waits, by consecutive failures.
const RESTART: Backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// One of the `app.workers`.
    Regular,
    /// Runs one suspect chat at a time; started only while there are any.
    Isolation,
}

struct Slot<L> {
    /// What scopes talk to; `None` while no worker runs in the slot.
    links: Option<L>,
    ready: bool,
    scopes: usize,
    /// Consecutive failures before reaching ready.
    failures: u32,
    /// Consecutive deaths that were not asked for (the isolation worker's
    /// crash-loop guard: each restart waits longer).
    deaths: u32,
    pid: u32,
    /// Replaced by a reload, or an isolation worker no longer needed: takes
    /// no new scopes, is not restarted.
    retired: bool,
    role: Role,
    /// The chats whose scopes it takes (a regular worker; 0 otherwise).
    home: usize,
}

impl<L> Slot<L> {
    /// A slot whose worker is not started yet.
    fn empty(role: Role, home: usize) -> Slot<L> {
        Slot {
            links: None,
            ready: false,
            scopes: 0,
            failures: 0,
            deaths: 0,
            pid: 0,
            retired: false,
            role,
            home,
        }
    }

    fn takes_scopes(&self) -> bool {
        self.links.is_some() && !self.retired && self.role == Role::Regular
    }
}

pub struct WorkerPool<L> {
    slots: Vec<Slot<L>>,
    /// The isolation worker's slot, while one runs or starts.
    isolation: Option<usize>,
    /// How many homes there are: the regular workers added.
    homes: usize,
}

impl<L> Default for WorkerPool<L> {
    fn default() -> WorkerPool<L> {
        WorkerPool {
            slots: Vec::new(),
            isolation: None,
            homes: 0,
        }
    }
}

/// FNV-1a (64 bit) of a scope key's text form: the same for a key in every
/// run, on every machine, so a chat's home does not change with a restart.
pub fn home_hash(key: &ScopeKey) -> u64 {
    use std::fmt::Write;
    /// Feeds the hash as the key is formatted, without building a string.
    struct Fnv(u64);
    impl Write for Fnv {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            for byte in s.bytes() {
                self.0 ^= u64::from(byte);
                self.0 = self.0.wrapping_mul(0x0000_0100_0000_01b3);
            }
            Ok(())
        }
    }
    let mut fnv = Fnv(0xcbf2_9ce4_8422_2325);
    // Writing into the hash cannot fail.
    let _ = write!(fnv, "{key}");
    fnv.0
}

impl<L> WorkerPool<L> {
    /// A new regular slot, with a home of its own: its index, to start its
    /// worker in.
    pub fn add_regular(&mut self) -> usize {
        self.slots.push(Slot::empty(Role::Regular, self.homes));
        self.homes += 1;
        self.slots.len() - 1
    }

    /// A worker was started in `index`; it is not ready yet.
    pub fn started(&mut self, index: usize, links: L) {
        let slot = &mut self.slots[index];
        slot.links = Some(links);
        slot.ready = false;
    }

    pub fn links(&self, index: usize) -> Option<&L> {
        self.slots[index].links.as_ref()
    }

    /// What every running worker's scopes talk to.
    pub fn all_links(&self) -> impl Iterator<Item = &L> {
        self.slots.iter().filter_map(|s| s.links.as_ref())
    }

    pub fn pid(&self, index: usize) -> u32 {
        self.slots[index].pid
    }

    pub fn role(&self, index: usize) -> Role {
        self.slots[index].role
    }

    pub fn is_retired(&self, index: usize) -> bool {
        self.slots[index].retired
    }

    /// The worker a new scope for `key` goes to: the live regular worker of
    /// its home (a ready one first, while a reload's replacement starts);
    /// without one, the live regular worker with the fewest scopes.
    pub fn pick(&self, key: &ScopeKey) -> Option<usize> {
        let home = match self.homes {
            0 => None,
            // The remainder is below `homes`, a usize.
            n => Some((home_hash(key) % n as u64) as usize),
        };
        let live = || {
            self.slots
                .iter()
                .enumerate()
                .filter(|(_, s)| s.takes_scopes())
        };
        live()
            .filter(|(_, s)| Some(s.home) == home)
            .min_by_key(|(_, s)| !s.ready)
            .or_else(|| live().min_by_key(|(_, s)| (!s.ready, s.scopes)))
            .map(|(i, _)| i)
    }

    /// Some regular worker takes new scopes.
    pub fn any_live(&self) -> bool {
        self.slots.iter().any(Slot::takes_scopes)
    }

    /// The live regular workers, in slot order.
    pub fn live_regular(&self) -> VecDeque<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].takes_scopes())
            .collect()
    }

    /// Regular workers that are ready and not retired.
    pub fn ready_regular(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| s.ready && !s.retired && s.role == Role::Regular)
            .count()
    }

    /// Every regular worker not retired is ready.
    pub fn all_ready(&self) -> bool {
        self.slots
            .iter()
            .all(|s| s.ready || s.retired || s.role == Role::Isolation)
    }

    /// No worker runs in any slot.
    pub fn all_exited(&self) -> bool {
        self.slots.iter().all(|s| s.links.is_none())
    }

    /// The worker in `index` is ready: its role.
    pub fn ready(&mut self, index: usize, pid: u32) -> Role {
        let slot = &mut self.slots[index];
        slot.ready = true;
        slot.failures = 0;
        slot.pid = pid;
        slot.role
    }

    /// The worker in `index` failed before it was ready: the failures in a
    /// row.
    pub fn failed(&mut self, index: usize) -> u32 {
        let slot = &mut self.slots[index];
        slot.failures += 1;
        slot.failures
    }

    /// The worker in `index` exited: what its scopes talked to, to release.
    pub fn exited(&mut self, index: usize, death: Death) -> Option<L> {
        let slot = &mut self.slots[index];
        slot.ready = false;
        slot.scopes = 0;
        if death == Death::Asked {
            slot.deaths = 0;
        } else {
            slot.deaths += 1;
        }
        slot.links.take()
    }

    pub fn scope_started(&mut self, index: usize) {
        self.slots[index].scopes += 1;
    }

    pub fn scope_ended(&mut self, index: usize) {
        if let Some(slot) = self.slots.get_mut(index) {
            slot.scopes = slot.scopes.saturating_sub(1);
        }
    }

    /// How long the regular worker in `index` waits before its restart.
    pub fn restart_delay(&self, index: usize) -> Duration {
        RESTART.delay(self.slots[index].failures)
    }

    /// How long the isolation worker waits before its restart: each death
    /// in a row waits longer.
    pub fn isolation_restart_delay(&self, index: usize) -> Duration {
        let slot = &self.slots[index];
        RESTART.delay(slot.deaths.max(slot.failures).saturating_sub(1))
    }

    /// The worker in `index` takes no new scopes and is not restarted.
    pub fn retire(&mut self, index: usize) {
        let slot = &mut self.slots[index];
        slot.retired = true;
        slot.ready = false;
    }

    /// A slot for a reload's replacement of the worker in `replacing`, with
    /// its home: one whose retired worker has exited, else a new one. At most
    /// one worker is replaced at a time, so slots stay under twice
    /// `app.workers`.
    pub fn spare_regular(&mut self, replacing: usize) -> usize {
        let home = self.slots[replacing].home;
        let index = match (0..self.slots.len()).find(|&i| {
            let s = &self.slots[i];
            s.retired && s.links.is_none() && s.role == Role::Regular
        }) {
            Some(i) => i,
            None => {
                self.slots.push(Slot::empty(Role::Regular, home));
                self.slots.len() - 1
            }
        };
        let slot = &mut self.slots[index];
        slot.retired = false;
        slot.failures = 0;
        slot.scopes = 0;
        slot.home = home;
        index
    }

    /// The isolation worker's slot, while one runs or starts.
    pub fn isolation(&self) -> Option<usize> {
        self.isolation
    }

    /// A fresh slot for the isolation worker: the last one's, once its
    /// worker has exited, else a new one.
    pub fn open_isolation(&mut self) -> usize {
        let index = match (0..self.slots.len())
            .find(|&i| self.slots[i].links.is_none() && self.slots[i].role == Role::Isolation)
        {
            Some(i) => {
                self.slots[i] = Slot::empty(Role::Isolation, 0);
                i
            }
            None => {
                self.slots.push(Slot::empty(Role::Isolation, 0));
                self.slots.len() - 1
            }
        };
        self.isolation = Some(index);
        index
    }

    /// The isolation worker has exited and is not to be restarted.
    pub fn close_isolation(&mut self) {
        self.isolation = None;
    }

    /// The isolation worker, if it is ready for a chat.
    pub fn isolation_ready(&self) -> Option<usize> {
        let index = self.isolation?;
        let slot = &self.slots[index];
        (slot.ready && !slot.retired && slot.links.is_some()).then_some(index)
    }

    /// Retires the running isolation worker, once: its slot, to stop it.
    pub fn retire_isolation(&mut self) -> Option<usize> {
        let index = self.isolation?;
        let slot = &mut self.slots[index];
        if slot.retired || slot.links.is_none() {
            return None;
        }
        slot.retired = true;
        Some(index)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A pool of `n` regular workers, started and ready; links are the
    /// slot's index.
    fn pool(n: usize) -> WorkerPool<usize> {
        let mut p = WorkerPool::default();
        for _ in 0..n {
            let i = p.add_regular();
            p.started(i, i);
            p.ready(i, 100 + i as u32);
        }
        p
    }

    /// A chat whose home, among `homes`, is `home`.
    fn key_at(home: usize, homes: usize) -> ScopeKey {
        (0..)
            .map(ScopeKey::chat)
            .find(|k| home_hash(k) % homes as u64 == home as u64)
            .expect("every home has chats")
    }

    #[test]
    fn the_home_hash_is_fnv_1a_of_the_keys_text_and_the_same_in_every_run() {
        // Values computed apart from this code, from "chat:123" and so on.
        assert_eq!(home_hash(&ScopeKey::chat(123)), 0x3000_1e9c_ae07_8e4d);
        assert_eq!(home_hash(&ScopeKey::User { id: 7 }), 0xf7fd_a0aa_7508_271d);
        let business = ScopeKey::Chat {
            id: 5,
            conversation: crate::routing::Conversation::Business("abc".into()),
        };
        assert_eq!(home_hash(&business), 0x9218_be8b_60b5_aad0);
    }

    #[test]
    fn a_chat_goes_to_its_home_whatever_the_load() {
        let mut p = pool(3);
        for _ in 0..10 {
            p.scope_started(0);
        }
        let mut per_home = [0; 3];
        for id in 0..3000 {
            let key = ScopeKey::chat(id);
            let home = (home_hash(&key) % 3) as usize;
            assert_eq!(p.pick(&key), Some(home), "{key}");
            per_home[home] += 1;
        }
        // Consecutive ids spread over the homes.
        assert!(
            per_home.iter().all(|&n| (800..1200).contains(&n)),
            "{per_home:?}"
        );
        // A home whose worker restarts and is not ready yet keeps its chats.
        p.exited(1, Death::Outside);
        p.started(1, 1);
        assert_eq!(p.pick(&key_at(1, 3)), Some(1));
    }

    #[test]
    fn a_chat_whose_home_has_no_worker_goes_to_the_least_loaded_ready_one() {
        let mut p = pool(4);
        let key = key_at(3, 4);
        // Its worker died and waits for its restart.
        p.exited(3, Death::App);
        p.scope_started(0);
        p.scope_started(1);
        assert_eq!(p.pick(&key), Some(2));
        p.scope_started(2);
        p.scope_started(2);
        assert_eq!(p.pick(&key), Some(0));
        // A worker not ready yet is taken only when no ready one is live.
        p.exited(0, Death::App);
        p.started(0, 0);
        assert_eq!(p.pick(&key), Some(1));
        p.retire(1);
        p.retire(2);
        assert_eq!(p.pick(&key), Some(0));
        p.scope_ended(1);
        p.exited(0, Death::App);
        assert_eq!(p.pick(&key), None);
        assert!(!p.any_live());
        // Back from its restart, the home has its chats again.
        p.started(3, 3);
        assert!(p.any_live());
        assert_eq!(p.pick(&key), Some(3));
    }

    #[test]
    fn a_reloads_replacement_takes_over_the_home_of_the_worker_it_replaces() {
        let mut p = pool(2);
        let (zero, one) = (key_at(0, 2), key_at(1, 2));
        let new = p.spare_regular(0);
        p.started(new, new);
        // Until the replacement is ready, the worker it replaces takes them.
        assert_eq!(p.pick(&zero), Some(0));
        p.ready(new, 200);
        p.retire(0);
        assert_eq!(p.pick(&zero), Some(new));
        assert_eq!(p.pick(&one), Some(1));
        // Slot 0, once its worker exited, is reused for worker 1's
        // replacement, and gets worker 1's home.
        p.exited(0, Death::Asked);
        assert_eq!(p.spare_regular(1), 0);
        p.started(0, 0);
        p.ready(0, 300);
        p.retire(1);
        assert_eq!(p.pick(&one), Some(0));
        assert_eq!(p.pick(&zero), Some(new));
    }

    #[test]
    fn readiness_counts_regular_workers_that_are_not_retired() {
        let mut p = WorkerPool::<usize>::default();
        let a = p.add_regular();
        let b = p.add_regular();
        p.started(a, a);
        p.started(b, b);
        assert!(!p.all_ready());
        assert_eq!(p.ready(a, 1), Role::Regular);
        assert!(!p.all_ready());
        assert_eq!(p.failed(b), 1);
        assert_eq!(p.failed(b), 2);
        p.ready(b, 2);
        assert!(p.all_ready());
        assert_eq!(p.ready_regular(), 2);
        // The isolation worker never holds startup back.
        let iso = p.open_isolation();
        p.started(iso, iso);
        assert!(p.all_ready());
        assert_eq!(p.ready_regular(), 2);
        assert_eq!(p.isolation_ready(), None);
        assert_eq!(p.ready(iso, 3), Role::Isolation);
        assert_eq!(p.isolation_ready(), Some(iso));
        assert_eq!(p.ready_regular(), 2);
    }

    #[test]
    fn a_replacement_reuses_a_slot_only_once_its_retired_worker_exited() {
        let mut p = pool(2);
        p.retire(0);
        // Worker 0 is still running: the replacement gets a new slot.
        let new = p.spare_regular(0);
        assert_eq!(new, 2);
        p.started(new, new);
        assert_eq!(p.live_regular(), [1, 2]);
        assert_eq!(p.exited(0, Death::Asked), Some(0));
        p.retire(1);
        assert_eq!(p.spare_regular(1), 0, "the exited retired slot is reused");
        assert!(!p.is_retired(0));
    }

    #[test]
    fn the_isolation_slot_is_reused_after_its_worker_exited() {
        let mut p = pool(1);
        let iso = p.open_isolation();
        p.started(iso, iso);
        p.ready(iso, 7);
        assert_eq!(p.retire_isolation(), Some(iso));
        assert!(p.retire_isolation().is_none(), "retired once");
        assert!(p.is_retired(iso) && p.links(iso).is_some());
        assert_eq!(p.exited(iso, Death::Asked), Some(iso));
        p.close_isolation();
        assert_eq!(p.isolation(), None);
        assert_eq!(p.open_isolation(), iso);
        assert!(!p.is_retired(iso), "a fresh slot");
        assert_eq!(p.pid(iso), 0);
    }

    #[test]
    fn exits_count_the_deaths_not_asked_for_and_release_the_links() {
        let mut p = pool(1);
        p.scope_started(0);
        assert_eq!(p.exited(0, Death::App), Some(0));
        assert!(p.all_exited());
        assert_eq!(p.exited(0, Death::Outside), None);
        assert_eq!(p.slots[0].deaths, 2);
        assert_eq!(p.slots[0].scopes, 0);
        p.exited(0, Death::Asked);
        assert_eq!(p.slots[0].deaths, 0);
        // Restart delays stay within the backoff's bounds.
        assert!(p.restart_delay(0) <= Duration::from_millis(200));
        for _ in 0..10 {
            p.failed(0);
        }
        assert!(p.restart_delay(0) <= Duration::from_secs(10));
        assert!(p.restart_delay(0) >= Duration::from_secs(5));
    }
}
