//! A damaged journal stops the daemon at start instead of being opened
//! empty, `--reset-journal` moves it aside, and the journal is private
//! (docs/reliability.md, "Journal damage" and "Permissions"). The real
//! binary, the sandbox, real Python workers.

mod common;

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use asgigramd::sandbox::Sandbox;
use common::*;

/// Undelivered updates each test leaves in the journal.
const HELD: usize = 40;

/// The exit status `main` gives a damaged journal.
const DAMAGED: i32 = 4;

/// The stuck app never finishes "hang": the chat's first update holds its
/// instance and every later one waits behind it, all in the journal.
fn start_on(sb: &Sandbox, state: &Path, args: &[&str]) -> Daemon {
    // What the modes below are measured against; 022 is every system's
    // default, so setting it changes nothing for the other tests here.
    // SAFETY: umask(2) cannot fail.
    unsafe {
        libc::umask(0o022);
    }
    let config = config_for(sb, "stuck:app", "[scopes]\ndisconnect_grace = 0.5\n");
    Daemon::start_args(
        &config,
        args,
        &[(
            "ASGIGRAM_JOURNAL__DIR",
            state.to_str().expect("utf-8 temp path"),
        )],
    )
}

/// How the daemon that filled the journal ended.
#[derive(Clone, Copy)]
enum End {
    /// SIGKILL: what the journal holds is in its WAL.
    Kill9,
    /// SIGTERM, then a checkpoint (as SQLite makes once the WAL grows past
    /// 1,000 pages): what the journal holds is in its main file.
    Checkpointed,
}

/// Runs a daemon until `HELD` updates are journaled (Telegram was told they
/// arrived, so it will not send them again), ends it, and returns the
/// journal's main file.
fn fill(sb: &Sandbox, state: &Path, end: End) -> PathBuf {
    let mut d = start_on(sb, state, &[]);
    assert!(d.wait_log("Polling Telegram as"), "{}", d.log());
    let mut last = 0;
    for _ in 0..HELD {
        last = sb.inject_text(300, "hang");
    }
    assert!(
        wait_for(DEADLINE, || sb.confirmed_offset() > last),
        "never confirmed; log:\n{}",
        d.log()
    );
    match end {
        End::Kill9 => {
            // SAFETY: kill(2) on the daemon this test started.
            unsafe {
                libc::kill(d.pid(), libc::SIGKILL);
            }
            d.wait_exit();
        }
        End::Checkpointed => {
            let (status, log) = d.stop();
            assert!(status.success(), "{log}");
            let db = journal_file(state);
            let conn = rusqlite::Connection::open(&db).expect("journal opens");
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))
                .expect("checkpointed");
            conn.close().expect("closed");
        }
    }
    journal_file(state)
}

fn journal_file(state: &Path) -> PathBuf {
    fs::read_dir(state)
        .expect("the journal's directory exists")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "sqlite3"))
        .expect("the journal file exists")
}

fn wal_of(db: &Path) -> PathBuf {
    let mut name = db.as_os_str().to_owned();
    name.push("-wal");
    PathBuf::from(name)
}

fn file_name(p: &Path) -> String {
    p.file_name()
        .expect("a file")
        .to_str()
        .expect("utf-8")
        .to_string()
}

/// The journal's files with their bytes, to check that nothing changes them.
fn snapshot(db: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    [db.to_path_buf(), wal_of(db)]
        .into_iter()
        .filter(|p| p.exists())
        .map(|p| {
            let bytes = fs::read(&p).expect("readable");
            (p, bytes)
        })
        .collect()
}

/// The daemon refuses to start, says why and what to do in one line, and
/// leaves every file as it was.
fn assert_refused(sb: &Sandbox, state: &Path, files: &[(PathBuf, Vec<u8>)], why: &str) {
    let mut d = start_on(sb, state, &[]);
    let status = d.wait_exit();
    let log = d.log();
    assert_eq!(status.code(), Some(DAMAGED), "{log}");
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("damaged")).collect();
    assert_eq!(lines.len(), 1, "one line says it: {log}");
    let line = lines[0];
    assert!(
        line.contains("--reset-journal") && line.contains(why),
        "{line}"
    );
    for (path, bytes) in files {
        assert!(
            line.contains(&path.display().to_string()),
            "names {path:?}: {line}"
        );
        let now = fs::read(path).unwrap_or_else(|e| panic!("{path:?} is gone: {e}"));
        assert!(now == *bytes, "{path:?} was changed");
    }
    assert!(!log.contains("Polling Telegram"), "{log}");
    assert!(!log.contains(TOKEN), "{log}");
}

/// `--reset-journal` moves the files aside (one line says where), keeps
/// their bytes, and the daemon runs with an empty journal.
fn assert_reset(sb: &Sandbox, state: &Path, files: &[(PathBuf, Vec<u8>)]) {
    let d = start_on(sb, state, &["--reset-journal"]);
    assert!(d.wait_log("Polling Telegram as"), "{}", d.log());
    let log = d.log();
    assert!(log.contains("(0 undelivered update(s)"), "{log}");
    let moved: Vec<&str> = log.lines().filter(|l| l.contains("moved aside")).collect();
    assert_eq!(moved.len(), 1, "{log}");
    for (path, bytes) in files {
        let prefix = format!("{}.damaged-", file_name(path));
        let copy = fs::read_dir(state)
            .expect("state dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| file_name(p).starts_with(&prefix))
            .unwrap_or_else(|| panic!("no {prefix}* in {state:?}; log:\n{log}"));
        assert!(fs::read(&copy).expect("readable") == *bytes, "{copy:?}");
        assert!(
            moved[0].contains(&copy.display().to_string()),
            "says where {path:?} went: {}",
            moved[0]
        );
    }
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn a_zeroed_wal_stops_the_daemon_and_reset_journal_keeps_a_copy() {
    a_damaged_wal_stops_the_daemon_and_reset_journal_keeps_a_copy(|len| vec![0u8; len]);
}

#[test]
fn a_wal_of_random_bytes_stops_the_daemon_and_reset_journal_keeps_a_copy() {
    a_damaged_wal_stops_the_daemon_and_reset_journal_keeps_a_copy(|len| {
        (0..len).map(|_| fastrand::u8(..)).collect()
    });
}

/// The WAL a kill -9 left, holding the updates, is overwritten with
/// `damage(its length)`.
fn a_damaged_wal_stops_the_daemon_and_reset_journal_keeps_a_copy(
    damage: impl Fn(usize) -> Vec<u8>,
) {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let db = fill(&sb, &state, End::Kill9);
    let wal = wal_of(&db);
    let len = fs::metadata(&wal).expect("kill -9 leaves the WAL").len();
    assert!(len > 0, "the updates are in the WAL");
    fs::write(&wal, damage(len as usize)).expect("WAL overwritten");
    let files = snapshot(&db);
    assert_refused(&sb, &state, &files, "WAL");
    assert_reset(&sb, &state, &files);
}

#[test]
fn a_truncated_main_file_stops_the_daemon_and_reset_journal_keeps_a_copy() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let db = fill(&sb, &state, End::Checkpointed);
    assert!(
        fs::metadata(wal_of(&db)).map_or(true, |m| m.len() == 0),
        "the checkpoint left it all in the main file"
    );
    let len = fs::metadata(&db).expect("journal").len();
    let file = fs::OpenOptions::new()
        .write(true)
        .open(&db)
        .expect("journal opens for writing");
    file.set_len(len / 2).expect("truncated");
    drop(file);
    let files = snapshot(&db);
    assert_refused(&sb, &state, &files, "SQLite");
    assert_reset(&sb, &state, &files);
}

#[test]
fn a_main_file_truncated_to_nothing_stops_the_daemon() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let db = fill(&sb, &state, End::Checkpointed);
    fs::write(&db, b"").expect("truncated to nothing");
    let files = snapshot(&db);
    assert_refused(&sb, &state, &files, "empty");
    assert_reset(&sb, &state, &files);
}

#[test]
fn an_intact_journal_after_kill_9_opens_and_reset_journal_leaves_it_alone() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    let held = format!("({HELD} undelivered update(s)");
    fill(&sb, &state, End::Kill9);
    let mut d = start_on(&sb, &state, &[]);
    assert!(d.wait_log("Polling Telegram as"), "{}", d.log());
    assert!(d.log().contains(&held), "{}", d.log());
    // SAFETY: kill(2) on the daemon this test started.
    unsafe {
        libc::kill(d.pid(), libc::SIGKILL);
    }
    d.wait_exit();

    let d = start_on(&sb, &state, &["--reset-journal"]);
    assert!(d.wait_log("Polling Telegram as"), "{}", d.log());
    let log = d.log();
    assert!(log.contains(&held), "{log}");
    assert!(log.contains("no damaged journal in"), "{log}");
    let copies = fs::read_dir(&state)
        .expect("state dir")
        .filter_map(|e| e.ok())
        .filter(|e| file_name(&e.path()).contains(".damaged-"))
        .count();
    assert_eq!(copies, 0);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

fn mode(p: &Path) -> u32 {
    fs::metadata(p)
        .unwrap_or_else(|e| panic!("{p:?}: {e}"))
        .permissions()
        .mode()
        & 0o777
}

/// The db and, while the daemon runs, its -wal and -shm.
fn assert_files_private(db: &Path) {
    let mut shm = db.as_os_str().to_owned();
    shm.push("-shm");
    for p in [db.to_path_buf(), wal_of(db), PathBuf::from(shm)] {
        assert_eq!(mode(&p), 0o600, "{p:?}");
    }
}

#[test]
fn a_new_journal_is_private() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let parent = dir.path().join("new");
    let state = parent.join("state");
    let d = start_on(&sb, &state, &[]);
    let id = sb.inject_text(301, "hello");
    assert!(
        wait_for(DEADLINE, || sb.confirmed_offset() > id),
        "{}",
        d.log()
    );
    assert_eq!(mode(&state), 0o700);
    assert_eq!(mode(&parent), 0o700, "created by the daemon too");
    assert_files_private(&journal_file(&state));
    assert!(!d.log().contains("WARN"), "{}", d.log());
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}

#[test]
fn an_open_directory_gets_one_warning_and_keeps_its_mode_while_the_files_are_made_private() {
    let sb = sandbox();
    let dir = tempfile::tempdir().expect("temp dir");
    let state = dir.path().join("state");
    fs::create_dir(&state).expect("created");
    fs::set_permissions(&state, fs::Permissions::from_mode(0o755)).expect("chmod");
    let d = start_on(&sb, &state, &[]);
    assert!(d.wait_log("Polling Telegram as"), "{}", d.log());
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    let about_dir = |log: &str| {
        log.lines()
            .filter(|l| l.contains("WARN") && l.contains(&state.display().to_string()))
            .count()
    };
    assert_eq!(about_dir(&log), 1, "{log}");
    assert!(log.contains("0755"), "{log}");
    assert_eq!(mode(&state), 0o755, "not the daemon's to change");

    // A journal file left readable by an older version is made private.
    let db = journal_file(&state);
    fs::set_permissions(&db, fs::Permissions::from_mode(0o644)).expect("chmod");
    let d = start_on(&sb, &state, &[]);
    let id = sb.inject_text(302, "hello");
    assert!(
        wait_for(DEADLINE, || sb.confirmed_offset() > id),
        "{}",
        d.log()
    );
    assert_files_private(&db);
    let log = d.log();
    let about_file = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains(&file_name(&db)) && l.contains("0600"))
        .count();
    assert_eq!(about_file, 1, "{log}");
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
}
