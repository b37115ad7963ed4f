//! A call belongs to the update it was made for (docs/reliability.md,
//! Replies rule 5): an app that awaits the response to its call and then
//! makes a second call has both calls counted as that update's, however many
//! of the chat's later updates arrived meanwhile, across worker kills and
//! `kill -9` of the daemon. The real binary, the sandbox, real Python
//! workers running tests/apps/awaits.py.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use asgigramd::sandbox::Sandbox;
use common::*;

/// One chat with many updates (a double-tapped button, a busy group) and a
/// few with fewer.
const BUSY: i64 = 900;
const BUSY_UPDATES: usize = 120;
const OTHERS: std::ops::Range<i64> = 901..905;
const OTHER_UPDATES: usize = 30;

fn chats() -> Vec<(i64, usize)> {
    let mut chats = vec![(BUSY, BUSY_UPDATES)];
    chats.extend(OTHERS.map(|c| (c, OTHER_UPDATES)));
    chats
}

fn total() -> usize {
    chats().iter().map(|(_, n)| n).sum()
}

/// The texts "<chat>-<i>", round robin over the chats, as fast as the
/// sandbox takes them.
fn burst(sb: &Sandbox) {
    let chats = chats();
    let most = chats.iter().map(|(_, n)| *n).max().unwrap_or(0);
    for i in 0..most {
        for &(chat, n) in &chats {
            if i < n {
                sb.inject_text(chat, &format!("{chat}-{i}"));
            }
        }
    }
}

/// What a chat must have been sent: per update, its first call and then
/// the second one, which names the first one's response.
fn expected(chat: i64, n: usize) -> Vec<String> {
    (0..n)
        .flat_map(|i| {
            let a = format!("a:{chat}-{i}");
            let b = format!("b:{chat}-{i} re {a}");
            [a, b]
        })
        .collect()
}

fn start(sb: &Sandbox, state: &Path, record: &Path, workers: usize) -> Daemon {
    let config = config_for(sb, "awaits:app", "[sender]\nlimits = false\n")
        .replace("[app]\n", &format!("[app]\nworkers = {workers}\n"));
    Daemon::start(
        &config,
        &[
            (
                "ASGIGRAM_JOURNAL__DIR",
                state.to_str().expect("utf-8 temp path"),
            ),
            ("RECORD_FILE", record.to_str().expect("utf-8 temp path")),
        ],
    )
}

/// The last lines of a log, for assertion messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

/// Waits until every chat has at least its expected number of texts.
fn wait_all(sb: &Sandbox, d: &Daemon) {
    // Distinct texts: a call repeated after a kill (Replies rule 4) must not
    // count for one still to come.
    let distinct = |c: i64| {
        sb.sent_texts(c)
            .into_iter()
            .collect::<std::collections::HashSet<_>>()
            .len()
    };
    let done = wait_for(Duration::from_secs(120), || {
        chats().iter().all(|&(c, n)| distinct(c) >= 2 * n)
    });
    let short: Vec<(i64, usize)> = chats()
        .iter()
        .map(|&(c, _)| (c, sb.sent_texts(c).len()))
        .collect();
    assert!(done, "texts per chat: {short:?}\n{}", tail(&d.log()));
}

#[test]
fn calls_awaited_during_a_burst_belong_to_their_update_when_the_worker_is_killed() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    let d = start(&sb, &state, &record, 1);
    assert!(d.wait_log("Polling Telegram"), "{}", d.log());
    burst(&sb);
    let total = total();
    let deadline = Instant::now() + Duration::from_secs(120);
    let left = || deadline.saturating_duration_since(Instant::now());
    let mut kills = 0;
    // Kills land at points of the burst's progress, not at times, so that
    // every one is mid-burst however fast the machine runs.
    for step in 1..=4 {
        let at = total * step / 6;
        if !wait_for(left(), || received(&record) >= at) {
            break;
        }
        let mut pids = Vec::new();
        wait_for(left(), || {
            pids = worker_pids_now(d.pid());
            !pids.is_empty()
        });
        if let Some(&pid) = pids.first() {
            // SAFETY: kill(2) on a worker process of this test's daemon.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            kills += 1;
        }
    }
    assert!(
        kills >= 3,
        "the burst outlasted a few kills ({kills}, {} of {total} received)\n{}",
        received(&record),
        tail(&d.log())
    );
    wait_all(&sb, &d);
    for (chat, n) in chats() {
        assert_eq!(
            sb.sent_texts(chat),
            expected(chat, n),
            "chat {chat}: every call made once, for its own update, in order\n{}",
            tail(&d.log())
        );
    }
    let log = d.log();
    assert!(log.contains("killed from outside"), "{}", tail(&log));
    assert!(!log.contains(" dropped: "), "{}", tail(&log));
    eprintln!("{kills} worker kills during a burst of {total} awaiting updates: every call once");
}

#[test]
fn calls_awaited_during_a_burst_belong_to_their_update_across_kill_9() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    burst(&sb);
    let total = total();
    let kills = 3;
    for step in 1..=kills {
        let mut d = start(&sb, &state, &record, 2);
        let at = total * step / (kills + 2);
        assert!(
            wait_for(Duration::from_secs(60), || received(&record) >= at),
            "only {} of {at} received; log:\n{}",
            received(&record),
            tail(&d.log())
        );
        // SAFETY: kill(2) on the daemon this test started.
        unsafe {
            libc::kill(d.pid(), libc::SIGKILL);
        }
        d.wait_exit();
    }
    let d = start(&sb, &state, &record, 2);
    wait_all(&sb, &d);
    // A call Telegram executed in the moment before a kill, whose answer the
    // journal had not recorded, is made again (Replies rule 4): at most one
    // per chat per kill, and always right after itself, since a chat's next
    // call waits for its previous one's record. Nothing else is repeated,
    // and nothing is missing or made for another update.
    let mut repeats = HashMap::new();
    for (chat, n) in chats() {
        let mut texts = sb.sent_texts(chat);
        let before = texts.len();
        texts.dedup();
        repeats.insert(chat, before - texts.len());
        assert_eq!(
            texts,
            expected(chat, n),
            "chat {chat}: every call made for its own update, in order\n{}",
            tail(&d.log())
        );
    }
    assert!(
        repeats.values().all(|&r| r <= kills),
        "more repeats than one per chat per kill: {repeats:?}"
    );
    eprintln!(
        "kill -9 x{kills} during a burst of {total} awaiting updates: repeated calls {repeats:?}"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{}", tail(&log));
}
