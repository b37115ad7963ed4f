//! Delivery guarantees under faults (docs/reliability.md): kill -9 of the
//! daemon, SIGTERM under load, and a flaky Bot API. The real binary, the
//! sandbox, real Python workers; every update's receipt is recorded by the
//! app itself in a file that survives the daemon.

mod common;

use std::path::Path;
use std::time::Duration;

use asgigramd::sandbox::{Fault, FaultPlan};
use common::*;

/// Waits for the replies "m0".."m{total-1}" (the recorder echoes) in `chats`
/// and asserts each arrived exactly once.
fn assert_each_answered_once(
    sb: &asgigramd::sandbox::Sandbox,
    chats: std::ops::Range<i64>,
    total: usize,
    d: &Daemon,
) {
    assert!(
        wait_for(DEADLINE, || replies(sb, chats.clone()).len() >= total),
        "{}",
        d.log()
    );
    let sent = replies(sb, chats);
    let wrong: Vec<_> = (0..total)
        .map(|i| format!("m{i}"))
        .filter_map(|t| match sent.get(&t) {
            Some(1) => None,
            n => Some((t, n.copied())),
        })
        .collect();
    assert!(wrong.is_empty(), "not answered exactly once: {wrong:?}");
}

fn start(sb: &asgigramd::sandbox::Sandbox, state: &Path, record: &Path, delay: &str) -> Daemon {
    let config = config_for(sb, "recorder:app", "[sender]\nlimits = false\n");
    start_recording(&config, state, record, delay)
}

#[test]
fn kill_9_mid_stream_several_times_loses_no_update_and_no_reply() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    let total = 2000;
    let mut ids = Vec::with_capacity(total);
    for i in 0..total {
        ids.push(sb.inject_text(100 + (i % 40) as i64, &format!("m{i}")));
    }
    // A little work per message keeps the run long enough to be killed in.
    for kill_at in [300, 900, 1500] {
        let mut d = start(&sb, &state, &record, "0.002");
        assert!(
            wait_for(Duration::from_secs(60), || received(&record) >= kill_at),
            "only {} received; log:\n{}",
            received(&record),
            d.log()
        );
        // SAFETY: kill(2) on the daemon this test started.
        unsafe {
            libc::kill(d.pid(), libc::SIGKILL);
        }
        d.wait_exit();
    }
    let d = start(&sb, &state, &record, "0");
    let all = wait_for(Duration::from_secs(60), || received(&record) >= total);
    let seen = receipts(&record);
    let lost: Vec<_> = ids.iter().filter(|id| !seen.contains_key(id)).collect();
    assert!(
        all && lost.is_empty(),
        "{} lost, e.g. {:?}; log:\n{}",
        lost.len(),
        &lost[..lost.len().min(5)],
        d.log()
    );
    // Every update answered: replies the Sender held when the daemon died
    // were in the outbox and went after the restart.
    let texts: Vec<String> = (0..total).map(|i| format!("m{i}")).collect();
    let answered = wait_for(Duration::from_secs(60), || {
        let sent = replies(&sb, 100..140);
        texts.iter().all(|t| sent.contains_key(t))
    });
    let sent = replies(&sb, 100..140);
    let unanswered: Vec<_> = texts.iter().filter(|t| !sent.contains_key(*t)).collect();
    assert!(
        answered,
        "{} unanswered, e.g. {:?}; log:\n{}",
        unanswered.len(),
        &unanswered[..unanswered.len().min(5)],
        d.log()
    );
    // Answered twice only when the daemon died between Telegram executing
    // the call and the daemon recording that it did (docs/reliability.md,
    // replies rule 4): at most the calls in flight, one per chat, and those
    // answered in the last moments before the kill.
    let twice = sent.values().filter(|&&n| n > 1).count();
    let received_twice = seen.values().filter(|&&n| n > 1).count();
    eprintln!(
        "kill -9 x3: {total} updates, 0 lost, 0 unanswered, {received_twice} received twice, {twice} answered twice"
    );
    assert!(
        twice <= 3 * 40,
        "{twice} answered twice: more than the calls in flight at three kills"
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn sigterm_under_load_exits_cleanly_and_the_next_start_delivers_the_rest_once() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    let total = 300;
    for i in 0..total {
        sb.inject_text(200 + (i % 5) as i64, &format!("m{i}"));
    }
    // 100 ms per message and 5 chats: 6 s of work, more than the 5 s grace
    // period a stop gives the instances.
    let d = start(&sb, &state, &record, "0.1");
    assert!(
        wait_for(DEADLINE, || received(&record) >= 30),
        "{}",
        d.log()
    );
    let (status, log) = d.stop();
    assert!(status.success(), "exit {status:?}\n{log}");
    assert!(log.contains("Finished."), "{log}");
    let before = received(&record);
    assert!(before < total, "the stop came too late to test anything");

    let d = start(&sb, &state, &record, "0");
    assert!(
        wait_for(DEADLINE, || received(&record) >= total),
        "{}",
        d.log()
    );
    let seen = receipts(&record);
    assert_eq!(seen.len(), total);
    // The stop cancelled each chat's instance in the middle of an update
    // (the grace period ran out): that one is delivered again, nothing else.
    let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(
        twice.len() <= 5,
        "received twice beyond one per chat: {twice:?}"
    );
    // And every update is answered exactly once across the two runs.
    assert_each_answered_once(&sb, 200..205, total, &d);
    assert!(
        d.log().contains("update(s) left in the journal"),
        "{}",
        d.log()
    );
}

#[test]
fn a_flaky_bot_api_loses_and_duplicates_nothing() {
    let sb = sandbox();
    sb.set_faults(FaultPlan {
        get_updates_bad_gateway: 0.05,
        ..FaultPlan::random(
            0.05,
            vec![
                Fault::BadGatewayJson,
                Fault::BadGatewayHtml,
                Fault::DropBeforeExecute,
            ],
        )
    });
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    let total = 400;
    let d = start(&sb, &state, &record, "0");
    for i in 0..total {
        sb.inject_text(300 + (i % 20) as i64, &format!("m{i}"));
    }
    // Faults that surely did not execute are retried: every reply arrives once.
    assert_received_once_and_answered(&sb, &record, 300..320, total, &d);
}

#[test]
fn a_scope_whose_app_stops_receiving_is_reported_and_holds_up_no_other_chat() {
    let sb = sandbox();
    let extra = "[scopes]\nstall_warning = 1\n";
    let d = Daemon::start(&config_for(&sb, "stuck:app", extra), &[]);
    sb.inject_text(1, "hang");
    for i in 0..5 {
        sb.inject_text(1, &format!("queued {i}"));
    }
    sb.inject_text(2, "other chat");
    assert_eq!(wait_texts(&sb, 2, 1, &d), vec!["ok:other chat"]);
    assert!(
        d.wait_log("scope=chat:1 has not received an event for 1s: 5 event(s) queued"),
        "{}",
        d.log()
    );
}

#[test]
fn conflict_409_is_explained_and_delete_webhook_clears_it() {
    let sb = sandbox();
    let set = call_api(
        &sb,
        "setWebhook",
        serde_json::json!({"url": "https://example.invalid/hook"}),
    );
    assert_eq!(set["ok"], true, "{set}");
    // With a webhook set, getUpdates is refused with 409.
    let d = Daemon::start(&config_for(&sb, "echo3:app", ""), &[]);
    assert!(
        d.wait_log("409 Conflict: another poller or a webhook holds this token"),
        "{}",
        d.log()
    );
    drop(d);
    // telegram.delete_webhook removes it at start, and polling works.
    let d = Daemon::start(
        &config_for(&sb, "echo3:app", ""),
        &[("ASGIGRAM_TELEGRAM__DELETE_WEBHOOK", "true")],
    );
    sb.inject_text(3, "after webhook");
    assert_eq!(wait_texts(&sb, 3, 1, &d), vec!["after webhook"]);
    assert!(d.log().contains("webhook deleted"), "{}", d.log());
}

#[test]
fn an_app_that_cannot_be_imported_stops_the_daemon_with_the_python_error() {
    let sb = sandbox();
    let mut d = Daemon::start(&config_for(&sb, "broken_import:app", ""), &[]);
    let status = d.wait_exit();
    let log = d.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(
        log.contains("ModuleNotFoundError: No module named 'module_that_does_not_exist'"),
        "{log}"
    );
    assert_eq!(
        log.matches("started pid=").count(),
        1,
        "no restart loop:\n{log}"
    );
    // getMe runs while the workers import the app; nothing else is
    // called, and polling never starts.
    let methods: Vec<String> = sb.calls().into_iter().map(|c| c.method).collect();
    assert!(methods.iter().all(|m| m == "getMe"), "{methods:?}");
    assert_eq!(sb.stats().get_updates, 0, "polling never started");
}

#[test]
fn garbage_on_the_worker_channel_cannot_crash_the_daemon() {
    let sb = sandbox();
    let d = Daemon::start(&config_for(&sb, "garbage:app", ""), &[]);
    sb.inject_text(1, "bad json");
    assert_eq!(wait_texts(&sb, 1, 1, &d), vec!["ok:bad json"]);
    assert!(d.wait_log("malformed frame from worker"), "{}", d.log());
    // The worker is killed for it; run alone on the isolation worker it
    // corrupts the channel twice more, and only then is it dropped.
    sb.inject_text(1, "corrupt");
    sb.inject_text(1, "still here");
    assert!(d.wait_log("channel corrupted"), "{}", d.log());
    assert!(
        d.wait_log("dropped: it was being handled, alone in the isolation worker"),
        "{}",
        d.log()
    );
    assert_eq!(wait_texts(&sb, 1, 2, &d)[1], "ok:still here");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn backpressure_pauses_polling_and_a_stalled_chat_does_not_hold_the_others() {
    let sb = sandbox();
    let config = config_for(
        &sb,
        "stuck:app",
        "[scopes]\nstall_warning = 2\n\n[journal]\nmax_undelivered = 5\n",
    )
    .replace("[telegram]\n", "[telegram]\npoll_limit = 5\n");
    let d = Daemon::start(&config, &[]);
    assert!(
        wait_for(DEADLINE, || sb.inspect(|v| v.is_polling())),
        "{}",
        d.log()
    );
    sb.inject_text(1, "hang");
    for i in 0..20 {
        sb.inject_text(1, &format!("queued {i}"));
    }
    sb.inject_text(2, "other chat");
    // Chat 1's app holds its queue: past 5 undelivered the Poller stops and
    // Telegram keeps the rest.
    assert!(d.wait_log("polling paused"), "{}", d.log());
    assert!(
        sb.pending_updates() >= 10,
        "{} left at the Bot API",
        sb.pending_updates()
    );
    // Once chat 1 is reported stalled its queue stops counting: polling
    // resumes and chat 2 is answered.
    assert!(
        d.wait_log("scope=chat:1 has not received an event"),
        "{}",
        d.log()
    );
    assert_eq!(wait_texts(&sb, 2, 1, &d), vec!["ok:other chat"]);
    assert!(d.log().contains("polling resumed"), "{}", d.log());
}

#[test]
fn a_worker_killed_mid_stream_loses_nothing_and_answers_each_update_once() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    let total = 600;
    let d = start(&sb, &state, &record, "0.002");
    for i in 0..total {
        sb.inject_text(400 + (i % 20) as i64, &format!("m{i}"));
    }
    assert!(
        wait_for(DEADLINE, || received(&record) >= total / 3),
        "{}",
        d.log()
    );
    kill_first_worker(&d);
    assert!(
        wait_for(DEADLINE, || received(&record) >= total),
        "{}",
        d.log()
    );
    assert!(d.log().contains("restarting it"), "{}", d.log());
    // The updates the instances had in hand are delivered again; the calls
    // they had made are recognised, so each update is answered once. The
    // Sender is unaffected by a worker's death: nothing is in doubt.
    assert_each_answered_once(&sb, 400..420, total, &d);
    let received_twice = receipts(&record).values().filter(|&&n| n > 1).count();
    eprintln!(
        "worker SIGKILL: {total} updates, {received_twice} received twice, each answered once"
    );
}

#[test]
fn a_repeated_call_gets_the_first_calls_outcome_instead_of_being_made_again() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let marker = dir.path().join("died");
    let d = Daemon::start(
        &config_for(&sb, "dies_once:app", HTTP),
        &[("DIE_MARKER", marker.to_str().expect("utf-8 temp path"))],
    );
    let addr = endpoint(&d);
    let repeated = || sample(&get(&addr, "/metrics").1, "asgigram_calls_repeated_total");
    assert_eq!(repeated(), Some(0.0));
    sb.inject_text(31, "die");
    let texts = wait_texts(&sb, 31, 2, &d);
    // One "die" message: the fresh instance's repeat of the call was answered
    // from the first call's outcome, with the same message_id.
    let first = sb
        .calls()
        .into_iter()
        .find(|c| c.method == "sendMessage" && c.params["text"] == "die")
        .expect("the first call was made");
    let id = first.response["result"]["message_id"].clone();
    assert_eq!(
        texts,
        vec!["die".to_string(), format!("die -> message_id {id}")]
    );
    assert!(d.log().contains("restarting it"), "{}", d.log());
    assert_eq!(repeated(), Some(1.0), "the one repeat is counted");
    sb.inject_text(31, "after");
    assert_eq!(wait_texts(&sb, 31, 4, &d)[2], "after");
    assert_eq!(repeated(), Some(1.0), "a new update's call is no repeat");
}

#[test]
fn a_worker_whose_loop_hangs_is_killed_and_its_update_answered_by_the_next() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let marker = dir.path().join("hung");
    let d = Daemon::start(
        &config_for(&sb, "hangs_once:app", ""),
        &[
            ("ASGIGRAM_APP__HANG_TIMEOUT", "1"),
            ("HANG_MARKER", marker.to_str().expect("utf-8 temp path")),
        ],
    );
    sb.inject_text(41, "hang");
    sb.inject_text(41, "next");
    sb.inject_text(42, "other chat");
    // The hung worker answers nothing, for any chat, until it is replaced;
    // then the update it hung on goes to a fresh instance, and the rest follow.
    assert_eq!(wait_texts(&sb, 41, 2, &d), vec!["ok:hang", "ok:next"]);
    assert_eq!(wait_texts(&sb, 42, 1, &d), vec!["ok:other chat"]);
    let log = d.log();
    assert!(
        log.contains("has not answered pings for 1.0s (app.hang_timeout); killing it"),
        "{log}"
    );
    assert!(log.contains("restarting it"), "{log}");
}

#[test]
fn calls_executed_but_unanswered_are_repeated_once_each_and_nothing_else_is() {
    let sb = sandbox();
    // 5% of sends are executed and then lose their answer: the daemon cannot
    // know they went, and by default (sender.ambiguous = "retry") sends them
    // again. Documented rule: exactly those are duplicated.
    sb.set_faults(FaultPlan::random(0.05, vec![Fault::DropAfterExecute]).only(&["sendMessage"]));
    let dir = tempfile::tempdir().expect("temp dir");
    let (state, record) = (dir.path().join("state"), dir.path().join("record"));
    let total = 400;
    let d = start(&sb, &state, &record, "0");
    for i in 0..total {
        sb.inject_text(500 + (i % 20) as i64, &format!("m{i}"));
    }
    let executed = || {
        sb.calls()
            .into_iter()
            .filter(|c| c.method == "sendMessage" && !c.response.is_null())
            .count()
    };
    let unanswered = || {
        sb.calls()
            .iter()
            .filter(|c| c.fault == Some(Fault::DropAfterExecute))
            .count()
    };
    assert!(
        wait_for(DEADLINE, || executed() >= total + unanswered()),
        "{} executed, {} unanswered; log:\n{}",
        executed(),
        unanswered(),
        d.log()
    );
    // Settled: nothing more is sent.
    std::thread::sleep(Duration::from_millis(500));
    let sent = replies(&sb, 500..520);
    let texts: Vec<String> = (0..total).map(|i| format!("m{i}")).collect();
    assert!(
        texts.iter().all(|t| sent.contains_key(t)),
        "a reply was lost"
    );
    let extra: usize = sent.values().map(|n| n - 1).sum();
    assert!(unanswered() > 0, "the plan injected no fault");
    assert_eq!(
        extra,
        unanswered(),
        "duplicates must be exactly the calls whose answer was lost"
    );
    assert_eq!(executed(), total + unanswered());
}

#[test]
fn an_update_goes_to_the_app_while_it_is_stored_and_a_failed_store_is_retried_before_confirming() {
    let sb = sandbox();
    let state = StateDir::new();
    let d = Daemon::start(&config_for(&sb, "echo3:app", ""), &state.env());
    let (file, mut other) = warmed_up(&sb, &d, &state.path, 71);
    // The next thing to meet the write lock that another connection
    // now holds is the append of "held": it waits SQLite's busy timeout
    // (10 s), and fails.
    let lock = other
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .expect("write lock taken");
    let held = sb.inject_text(71, "held");
    assert_eq!(
        wait_texts(&sb, 71, 2, &d)[1],
        "held",
        "answered while its store waits"
    );
    assert!(
        sb.confirmed_offset() <= held,
        "confirmed to Telegram before it was stored"
    );
    assert!(
        wait_for(Duration::from_secs(40), || d
            .log()
            .contains("journal: cannot store 1 update(s)")),
        "{}",
        d.log()
    );
    assert!(
        sb.confirmed_offset() <= held,
        "confirmed after a failed store"
    );
    // Behind the append, the record that "held" was handled (and its reply
    // made) waits its busy timeout too and fails; it must be written again,
    // or "held" stays in the journal to be delivered again at the next start.
    assert!(
        wait_for(Duration::from_secs(40), || d
            .log()
            .contains("handled update(s) failed")),
        "{}",
        d.log()
    );
    drop(lock);
    drop(other);

    // The same batch is stored again, and only then confirmed.
    assert!(
        wait_for(DEADLINE, || sb.confirmed_offset() > held),
        "never confirmed; log:\n{}",
        d.log()
    );
    sb.inject_text(71, "after");
    assert_eq!(wait_texts(&sb, 71, 3, &d), ["warm", "held", "after"]);
    assert_eq!(
        sb.sent_texts(71).iter().filter(|t| *t == "held").count(),
        1,
        "the retried store does not deliver it again"
    );
    // Neither retry leaves "held" in the journal to be delivered again after
    // a restart: whichever of the two is written first, the other agrees.
    let reader = rusqlite::Connection::open(&file).expect("journal opens");
    assert!(
        wait_for(DEADLINE, || journal_rows(&reader) == 0),
        "left in the journal: {} row(s); log:\n{}",
        journal_rows(&reader),
        d.log()
    );
}

/// Updates and calls the journal holds.
fn journal_rows(c: &rusqlite::Connection) -> i64 {
    c.query_row(
        "SELECT (SELECT COUNT(*) FROM updates) + (SELECT COUNT(*) FROM outbox)",
        [],
        |r| r.get(0),
    )
    .expect("journal readable")
}

/// Sends "warm" to `chat` and waits until the daemon has nothing more to
/// write: "warm" stored (the watermark is its id) and, with its reply, gone
/// from the journal. An empty journal alone does not say that: "warm" is
/// answered before its append is written, and a slow journal thread may not
/// have begun it. Returns the journal's file and a connection to it.
fn warmed_up(
    sb: &asgigramd::sandbox::Sandbox,
    d: &Daemon,
    state: &Path,
    chat: i64,
) -> (std::path::PathBuf, rusqlite::Connection) {
    let warm = sb.inject_text(chat, "warm");
    wait_texts(sb, chat, 1, d);
    let file = std::fs::read_dir(state)
        .expect("the journal's directory exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "sqlite3"))
        .expect("the journal file exists");
    let c = rusqlite::Connection::open(&file).expect("journal opens");
    let stored = |c: &rusqlite::Connection| -> bool {
        c.query_row(
            "SELECT CAST(value AS INTEGER) FROM meta WHERE key = 'watermark'",
            [],
            |r| r.get::<_, i64>(0),
        )
        .is_ok_and(|w| w >= warm)
    };
    assert!(
        wait_for(DEADLINE, || stored(&c) && journal_rows(&c) == 0),
        "{}",
        d.log()
    );
    (file, c)
}

/// SIGTERM while an update's append waits for the disk: the update is
/// answered already (it goes to the app while it is stored), so the stop
/// waits for the append and confirms it, and the next start does not
/// deliver it again. Before, the stop dropped the append unwritten (the
/// journal thread skips a message nobody waits for) and the reply came twice.
#[test]
fn sigterm_while_an_update_is_being_stored_writes_it_and_it_is_not_answered_again() {
    let sb = sandbox();
    let state = StateDir::new();
    let env = state.env();
    let config = config_for(&sb, "echo3:app", "");
    let mut d = Daemon::start(&config, &env);
    let (_, mut other) = warmed_up(&sb, &d, &state.path, 72);
    // The append of "held" waits for this lock (SQLite's busy timeout is
    // 10 s), so the stop comes while it is under way.
    let lock = other
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .expect("write lock taken");
    let held = sb.inject_text(72, "held");
    assert_eq!(
        wait_texts(&sb, 72, 2, &d)[1],
        "held",
        "answered while stored"
    );
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(d.pid(), libc::SIGTERM);
    }
    assert!(
        wait_for(DEADLINE, || d.log().contains("Shutting down")),
        "{}",
        d.log()
    );
    std::thread::sleep(Duration::from_millis(300));
    drop(lock);
    drop(other);
    let status = d.wait_exit();
    let log = d.log();
    assert!(status.success(), "{log}");
    assert!(
        sb.confirmed_offset() > held,
        "the stored batch is confirmed at the stop (confirmed {}, held {held})\n{log}",
        sb.confirmed_offset()
    );

    let d = Daemon::start(&config, &env);
    sb.inject_text(72, "after");
    assert_eq!(
        wait_texts(&sb, 72, 3, &d),
        ["warm", "held", "after"],
        "{log}\n{}",
        d.log()
    );
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert_eq!(
        sb.sent_texts(72),
        ["warm", "held", "after"],
        "nothing answered twice\n{log}"
    );
}
