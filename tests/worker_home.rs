//! A chat stays on one worker (`src/actors/supervisor/pool.rs`, docs/protocol.md):
//! with several workers, every instance of a chat runs in the same process,
//! after an idle close as after a reload. The real binary, the sandbox, real
//! Python workers running tests/apps/pid.py.

mod common;

use std::collections::{BTreeMap, BTreeSet};

use asgigramd::sandbox::Sandbox;
use common::*;

const CHATS: std::ops::Range<i64> = 3000..3008;

/// Asks each chat, in the given order and one at a time, for the pid of the
/// worker its instance runs in.
fn pids(sb: &Sandbox, d: &Daemon, order: &[i64]) -> BTreeMap<i64, String> {
    let mut pids = BTreeMap::new();
    for &chat in order {
        let before = sb.sent_texts(chat).len();
        sb.inject_text(chat, "pid");
        let texts = wait_texts(sb, chat, before + 1, d);
        let pid = texts
            .iter()
            .rev()
            .find(|t| t.starts_with("pid:"))
            .cloned()
            .unwrap_or_else(|| panic!("chat {chat}: no pid in {texts:?}"));
        pids.insert(chat, pid);
    }
    pids
}

/// Waits until every chat's instance said it was closed for `reason`, as
/// many times as `times`.
fn wait_closed(sb: &Sandbox, d: &Daemon, reason: &str, times: usize) {
    let text = format!("closed:{reason}");
    let closed = wait_for(DEADLINE, || {
        CHATS
            .into_iter()
            .all(|c| sb.sent_texts(c).iter().filter(|t| **t == text).count() >= times)
    });
    assert!(closed, "not every chat was closed ({reason}):\n{}", d.log());
}

/// The chats grouped by the worker they ran on.
fn groups(pids: &BTreeMap<i64, String>) -> BTreeSet<BTreeSet<i64>> {
    let mut by_pid: BTreeMap<&String, BTreeSet<i64>> = BTreeMap::new();
    for (chat, pid) in pids {
        by_pid.entry(pid).or_default().insert(*chat);
    }
    by_pid.into_values().collect()
}

#[test]
fn a_chat_gets_the_same_worker_after_an_idle_close_and_its_replacement_after_a_reload() {
    let sb = sandbox();
    let config = config_for(&sb, "pid:app", "[scopes]\nidle_timeout = 1\n")
        .replace("[app]\n", "[app]\nworkers = 2\n");
    let d = Daemon::start(&config, &[]);
    assert!(d.wait_log("Polling Telegram"), "{}", d.log());
    let order: Vec<i64> = CHATS.collect();
    let first = pids(&sb, &d, &order);
    assert_eq!(
        groups(&first).len(),
        2,
        "the chats are spread over both workers: {first:?}"
    );
    wait_closed(&sb, &d, "idle", 1);
    // In the other order: whichever worker has fewer scopes does not matter.
    let reversed: Vec<i64> = order.iter().rev().copied().collect();
    let again = pids(&sb, &d, &reversed);
    assert_eq!(again, first, "each chat's new instance ran on its worker");

    // A reload replaces both workers: each replacement takes over the chats
    // of the worker it replaced.
    // SAFETY: kill(2) on the daemon this test started.
    unsafe {
        libc::kill(d.pid(), libc::SIGHUP);
    }
    assert!(d.wait_log("reload complete"), "{}", d.log());
    wait_closed(&sb, &d, "reload", 1);
    let reloaded = pids(&sb, &d, &reversed);
    let old: BTreeSet<&String> = first.values().collect();
    assert!(
        reloaded.values().all(|pid| !old.contains(pid)),
        "new processes: {reloaded:?} after {first:?}"
    );
    assert_eq!(
        groups(&reloaded),
        groups(&first),
        "the chats that shared a worker share its replacement"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}
