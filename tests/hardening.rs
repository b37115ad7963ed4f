//! What a crashing chat costs, and what hostile apps cannot do to the daemon
//! (docs/reliability.md, "A chat that kills its worker"): the real binary,
//! the sandbox, real Python workers. Each test reproduces a failure seen on
//! an earlier release.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use asgigramd::sandbox::Sandbox;
use common::*;

/// The texts "c<chat>-<i>" for i in 0..n, in order.
fn expected(chat: i64, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("c{chat}-{i}")).collect()
}

/// Waits until every chat got its `per_chat` replies, then asserts each was
/// answered exactly once and in order.
fn assert_all_answered_in_order(sb: &Sandbox, chats: &[i64], per_chat: usize, d: &Daemon) {
    let done = wait_for(Duration::from_secs(120), || {
        chats.iter().all(|&c| sb.sent_texts(c).len() >= per_chat)
    });
    let short: Vec<(i64, usize)> = chats
        .iter()
        .map(|&c| (c, sb.sent_texts(c).len()))
        .filter(|&(_, n)| n < per_chat)
        .collect();
    assert!(
        done,
        "chats short of replies: {short:?}\n{}",
        tail(&d.log())
    );
    for &chat in chats {
        assert_eq!(
            sb.sent_texts(chat),
            expected(chat, per_chat),
            "chat {chat}: each update answered once, in order"
        );
    }
}

/// The last lines of a log, for assertion messages.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(80)..].join("\n")
}

fn count(log: &str, needle: &str) -> usize {
    log.lines().filter(|l| l.contains(needle)).count()
}

/// Injects `per_chat` texts into each chat, round robin; `poison` maps a chat
/// to the index of its poisoned message. Returns the poison update ids.
fn burst(sb: &Sandbox, chats: &[i64], per_chat: usize, poison: &HashMap<i64, usize>) -> Vec<i64> {
    let mut ids = Vec::new();
    for i in 0..per_chat {
        for &chat in chats {
            if poison.get(&chat) == Some(&i) {
                ids.push(sb.inject_text(chat, "poison"));
            }
            sb.inject_text(chat, &format!("c{chat}-{i}"));
        }
    }
    ids
}

/// The recorder app `poison:app` with `workers`, recording into `record`.
fn start_poison(
    sb: &Sandbox,
    record: &Path,
    workers: usize,
    extra: &str,
    env: &[(&str, &str)],
) -> Daemon {
    let config = config_for(
        sb,
        "poison:app",
        &format!("[sender]\nlimits = false\n\n{extra}"),
    )
    .replace("[app]\n", &format!("[app]\nworkers = {workers}\n"));
    let mut all = vec![("RECORD_FILE", record.to_str().expect("utf-8 temp path"))];
    all.extend_from_slice(env);
    Daemon::start(&config, &all)
}

/// 20 chats share one worker; two of them each send one message whose
/// handler kills the worker. Only those two updates may be lost: every other
/// update of every chat is answered once and in order.
fn a_chat_that_kills_its_worker_costs_other_chats_nothing(how: &str, extra_env: &[(&str, &str)]) {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let record = dir.path().join("record");
    let mut env = vec![("POISON", how), ("RECORD_DELAY", "0.005")];
    env.extend_from_slice(extra_env);
    let d = start_poison(&sb, &record, 1, "", &env);
    let chats: Vec<i64> = (500..520).collect();
    let per_chat = 15;
    let poison = HashMap::from([(503, 4), (507, 9)]);
    let poison_ids = burst(&sb, &chats, per_chat, &poison);
    assert_all_answered_in_order(&sb, &chats, per_chat, &d);
    let log = d.log();
    for id in &poison_ids {
        assert!(
            log.contains(&format!("update={id} dropped")),
            "poison update {id} dropped and said so:\n{}",
            tail(&log)
        );
        // Alone on the isolation worker, it killed it twice.
        assert!(
            receipts(&record).get(id).copied().unwrap_or(0) >= 2,
            "it ran at two deaths before it was dropped"
        );
    }
    assert_eq!(
        count(&log, " dropped: "),
        poison_ids.len(),
        "{}",
        tail(&log)
    );
    assert!(log.contains("isolation worker"), "{}", tail(&log));
    let (status, log) = d.stop();
    assert!(status.success(), "{}", tail(&log));
}

#[test]
fn a_chat_whose_handler_exits_the_worker_costs_other_chats_nothing() {
    a_chat_that_kills_its_worker_costs_other_chats_nothing("exit", &[]);
}

#[test]
fn a_chat_whose_handler_corrupts_the_channel_costs_other_chats_nothing() {
    a_chat_that_kills_its_worker_costs_other_chats_nothing("garbage", &[]);
}

#[test]
fn a_chat_whose_handler_forks_and_exits_costs_other_chats_nothing() {
    a_chat_that_kills_its_worker_costs_other_chats_nothing("fork", &[]);
}

#[test]
fn a_chat_whose_handler_hangs_the_worker_costs_other_chats_nothing() {
    a_chat_that_kills_its_worker_costs_other_chats_nothing(
        "hang",
        &[("ASGIGRAM_APP__HANG_TIMEOUT", "1")],
    );
}

/// A suspect whose handler awaits for an hour (without blocking anything)
/// cannot hold the isolation worker, and so the other suspects, for ever:
/// past the ping deadline it is taken to be innocent and moved back.
#[test]
fn a_slow_suspect_does_not_hold_back_the_other_suspects() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let record = dir.path().join("record");
    let d = start_poison(
        &sb,
        &record,
        1,
        "",
        &[
            ("ASGIGRAM_APP__HANG_TIMEOUT", "1"),
            ("RECORD_DELAY", "0.01"),
        ],
    );
    assert!(d.wait_log("Polling Telegram"), "{}", d.log());
    sb.inject_text(800, "slow");
    assert!(
        wait_for(DEADLINE, || !receipts(&record).is_empty()),
        "{}",
        tail(&d.log())
    );
    let chats: Vec<i64> = (801..806).collect();
    let poison = burst(&sb, &chats, 4, &HashMap::from([(801, 1)]));
    assert_all_answered_in_order(&sb, &chats, 4, &d);
    let log = d.log();
    assert!(
        log.contains(&format!("update={} dropped", poison[0])),
        "{}",
        tail(&log)
    );
    assert_eq!(count(&log, " dropped: "), 1, "{}", tail(&log));
    assert!(d.wait_log("scope=chat:800 ran"), "{}", tail(&d.log()));
    assert!(
        d.log().contains("taken to be innocent"),
        "{}",
        tail(&d.log())
    );
}

/// What an OOM killer does to a busy bot: workers SIGKILLed again and again
/// during a burst, at points spread over its progress. Nothing is suspected (the
/// daemon did not send those signals), so nothing is dropped; every update
/// is answered once, and each chat's replies keep their order.
#[test]
fn workers_killed_repeatedly_during_a_burst_lose_nothing_and_keep_each_chats_order() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let record = dir.path().join("record");
    let d = start_poison(&sb, &record, 2, "", &[("RECORD_DELAY", "0.002")]);
    assert!(d.wait_log("Polling Telegram"), "{}", d.log());
    let chats: Vec<i64> = (600..660).collect();
    let per_chat = 50;
    burst(&sb, &chats, per_chat, &HashMap::new());
    let total = chats.len() * per_chat;
    let mut rng = fastrand::Rng::with_seed(7);
    let mut kills = 0;
    let deadline = Instant::now() + Duration::from_secs(120);
    let left = || deadline.saturating_duration_since(Instant::now());
    // Each kill lands at a point of the burst's progress, not at a time, so
    // that however fast the machine runs it, every kill is mid-burst.
    for step in 1..=5 {
        let at = total * step / 8;
        if !wait_for(left(), || receipts(&record).len() >= at) {
            break;
        }
        let mut pids = Vec::new();
        // A worker being restarted after the last kill has no pid yet.
        wait_for(left(), || {
            pids = worker_pids_now(d.pid());
            !pids.is_empty()
        });
        if let Some(&pid) = pids.get(rng.usize(0..pids.len().max(1))) {
            // SAFETY: kill(2) on a worker process of this test's daemon.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
            }
            kills += 1;
        }
    }
    assert!(kills >= 3, "the burst outlasted a few kills ({kills})");
    assert_all_answered_in_order(&sb, &chats, per_chat, &d);
    let log = d.log();
    assert_eq!(count(&log, " dropped: "), 0, "{}", tail(&log));
    assert!(log.contains("killed from outside"), "{}", tail(&log));
    eprintln!("{kills} worker kills during a burst of {total}: all answered once, in order");
}

/// 1,000 chats at once with room for 50 instances, each instance busy with
/// its update for a while: chats wait for room instead of evicting busy
/// instances (which cancelled their work and redelivered it, in a loop).
#[test]
fn a_burst_over_many_more_chats_than_max_scopes_makes_progress_within_the_bound() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let record = dir.path().join("record");
    let extra = format!("[scopes]\nmax_scopes = 50\n\n{HTTP}");
    let d = start_poison(&sb, &record, 1, &extra, &[("RECORD_DELAY", "0.02")]);
    let addr = endpoint(&d);
    let chats: Vec<i64> = (10_000..11_000).collect();
    burst(&sb, &chats, 2, &HashMap::new());
    let mut most = 0.0f64;
    let finished = wait_for(Duration::from_secs(120), || {
        if let Some(live) = sample(&get(&addr, "/metrics").1, "asgigram_scopes_live") {
            most = most.max(live);
        }
        chats.iter().all(|&c| sb.sent_texts(c).len() >= 2)
    });
    assert!(finished, "{}", tail(&d.log()));
    assert_all_answered_in_order(&sb, &chats, 2, &d);
    assert!(most <= 50.0, "at most max_scopes live at once, saw {most}");
    let log = d.log();
    assert_eq!(
        count(&log, "cancelled after the grace period"),
        0,
        "{}",
        tail(&log)
    );
    assert!(
        count(&log, "max_scopes") <= 4,
        "waiting for room is logged once, not per chat:\n{}",
        tail(&log)
    );
    // Each update went to an instance once: no eviction took one back.
    let twice = receipts(&record).values().filter(|&&n| n > 1).count();
    assert_eq!(twice, 0, "updates delivered more than once");
}

/// An app that closes the worker's channel and lives on is replaced at once,
/// with one line, not a line per failed write until the ping deadline.
#[test]
fn a_worker_that_closes_its_channel_is_replaced_without_a_flood_of_log_lines() {
    let sb = sandbox();
    let d = Daemon::start(
        &config_for(&sb, "closes_channel:app", ""),
        &[("ASGIGRAM_APP__HANG_TIMEOUT", "600")],
    );
    sb.inject_text(1, "before");
    assert_eq!(wait_texts(&sb, 1, 1, &d), vec!["ok:before"]);
    sb.inject_text(1, "close");
    sb.inject_text(2, "other chat");
    assert!(d.wait_log("closed its channel"), "{}", tail(&d.log()));
    assert!(d.wait_log("restarting it"), "{}", tail(&d.log()));
    assert_eq!(wait_texts(&sb, 2, 1, &d), vec!["ok:other chat"]);
    sb.inject_text(1, "after");
    let texts = wait_texts(&sb, 1, 2, &d);
    assert_eq!(texts.last().map(String::as_str), Some("ok:after"));
    let log = d.log();
    assert!(count(&log, "Broken pipe") <= 1, "{}", tail(&log));
    assert!(log.len() < 200_000, "log of {} bytes", log.len());
}

/// Many scopes and two workers, then SIGTERM: no line per scope, and no
/// write errors from the workers' ordinary exit.
#[test]
fn a_clean_stop_with_many_scopes_logs_no_line_per_scope() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let record = dir.path().join("record");
    let d = start_poison(&sb, &record, 2, "", &[]);
    let chats: Vec<i64> = (700..1_000).collect();
    burst(&sb, &chats, 1, &HashMap::new());
    assert_all_answered_in_order(&sb, &chats, 1, &d);
    let (status, log) = d.stop();
    assert!(status.success(), "{}", tail(&log));
    assert_eq!(count(&log, "worker lost"), 0, "{}", tail(&log));
    assert_eq!(count(&log, "channel write failed"), 0, "{}", tail(&log));
    assert_eq!(count(&log, "Broken pipe"), 0, "{}", tail(&log));
}

/// Instances that refuse to end are still attached when the workers stop:
/// their scopes learn it together, and the log says so once per worker, not
/// once per scope.
#[test]
fn instances_left_when_the_workers_stop_are_not_logged_one_by_one() {
    let sb = sandbox();
    let config = config_for(
        &sb,
        "stubborn:app",
        "[sender]\nlimits = false\n\n[scopes]\ndisconnect_grace = 0.2\n\n[shutdown]\nworker_timeout = 3\n",
    )
    .replace("[app]\n", "[app]\nworkers = 2\n");
    let d = Daemon::start(&config, &[]);
    let chats: Vec<i64> = (2_000..2_300).collect();
    for &chat in &chats {
        sb.inject_text(chat, &format!("c{chat}-0"));
    }
    assert_all_answered_in_order(&sb, &chats, 1, &d);
    let (_, log) = d.stop();
    assert_eq!(count(&log, "worker lost"), 0, "{}", tail(&log));
    assert!(
        count(&log, "cancelled after the grace period") <= 2,
        "{}",
        tail(&log)
    );
    assert_eq!(count(&log, "Broken pipe"), 0, "{}", tail(&log));
}

/// 20 MB printed without a newline: one log line, cut, and the daemon does
/// not grow by the size of the output.
#[test]
fn output_without_newlines_is_cut_into_a_bounded_line() {
    let sb = sandbox();
    let d = Daemon::start(
        &config_for(&sb, "floods_output:app", ""),
        &[("FLOOD_BYTES", "20000000")],
    );
    sb.inject_text(1, "flood");
    assert_eq!(wait_texts(&sb, 1, 1, &d), vec!["ok:flood"]);
    assert!(d.wait_log("after the flood"), "{}", tail(&d.log()));
    let log = d.log();
    assert!(
        log.contains("[line cut at 16384 bytes; 19983616 more byte(s) not logged]"),
        "{}",
        tail(&log)
    );
    let longest = log.lines().map(str::len).max().unwrap_or(0);
    assert!(longest < 17_000, "longest log line {longest} bytes");
    let status = std::fs::read_to_string(format!("/proc/{}/status", d.pid())).unwrap_or_default();
    let peak_kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
        .unwrap_or(0);
    assert!(
        peak_kb > 0 && peak_kb < 60_000,
        "daemon peak RSS {peak_kb} kB"
    );
}
