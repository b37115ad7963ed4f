//! Process hygiene, end to end with the real binary: bad numbers in the
//! configuration are errors (never panics), a port in use is one clear error,
//! processes an app forks end with its worker, and a token given on the
//! command line does not stay readable in /proc/PID/cmdline.

mod common;

use std::process::{Command, Stdio};
use std::time::Instant;

use common::*;

/// A configuration that is valid in every numeric key; the cases below
/// break one key at a time. No sandbox: nothing may get as far as the Bot
/// API, and the port it names (discard) is never listened on.
fn base_config() -> String {
    format!(
        "[telegram]\ntoken = \"{TOKEN}\"\napi_url = \"http://127.0.0.1:9\"\n\n[app]\napplication = \"echo3:app\"\napp_dir = \"{}\"\n",
        apps_dir().display()
    )
}

/// The base configuration with `key = value` (TOML) added to its section.
fn config_with(key: &str, value: &str) -> String {
    let (section, name) = key.split_once('.').expect("keys are section.name");
    let base = base_config();
    let header = format!("[{section}]\n");
    if base.contains(&header) {
        base.replacen(&header, &format!("{header}{name} = {value}\n"), 1)
    } else {
        format!("{base}\n{header}{name} = {value}\n")
    }
}

/// Every numeric key and the range its error must state.
const NUMERIC_KEYS: &[(&str, &str)] = &[
    ("telegram.poll_timeout", "from 0 to 50"),
    ("telegram.http_timeout", "from 1 to 31536000"),
    ("telegram.poll_limit", "from 1 to 100"),
    ("app.workers", "from 1 to 256"),
    ("app.startup_timeout", "from 1 to 31536000"),
    ("app.hang_timeout", "from 0.5 to 86400"),
    ("scopes.idle_timeout", "from 1 to 31536000"),
    ("scopes.max_scopes", "from 1 to 1000000000"),
    ("scopes.disconnect_grace", "from 0 to 31536000"),
    ("scopes.stall_warning", "from 0 to 31536000"),
    ("sender.global_per_second", "from 1 to 100000"),
    ("sender.paid_broadcast_per_second", "from 1 to 100000"),
    ("sender.chat_per_second", "from 0.001 to 1000"),
    ("sender.chat_burst", "from 1 to 1000"),
    ("sender.group_per_minute", "from 1 to 100000"),
    ("sender.safety_margin", "from 0 to 10"),
    ("sender.queue_limit", "from 2 to 1000000000"),
    ("sender.response_timeout", "from 1 to 31536000"),
    ("sender.max_attempts", "from 1 to 1000"),
    ("journal.max_undelivered", "from 1 to 1000000000"),
    ("shutdown.drain_timeout", "from 0 to 31536000"),
    ("shutdown.worker_timeout", "from 0 to 31536000"),
    ("log.stats_interval", "from 0 to 31536000"),
];

/// `telegram.poll_timeout` -> `ASGIGRAM_TELEGRAM__POLL_TIMEOUT`.
fn env_name(key: &str) -> String {
    format!("ASGIGRAM_{}", key.to_uppercase().replace('.', "__"))
}

/// One bad value for one key, given in the environment or in the file.
struct Case {
    key: &'static str,
    range: &'static str,
    how: String,
    daemon: Daemon,
}

/// What is wrong with how the daemon ended, if anything: it must exit 1 with
/// one line that names the key and its range, panic nowhere, start nothing.
fn judge(case: &mut Case, end: Instant) -> Option<String> {
    let status = loop {
        if let Some(status) = case.daemon.child.try_wait().expect("try_wait") {
            break Some(status);
        }
        if Instant::now() >= end {
            break None;
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    };
    let log = case.daemon.log();
    let what = format!("{} {}", case.key, case.how);
    let Some(status) = status else {
        return Some(format!("{what}: still running after {DEADLINE:?}:\n{log}"));
    };
    let lines: Vec<&str> = log.lines().collect();
    if status.code() != Some(1)
        || log.contains("panicked")
        || lines.len() != 1
        || !lines[0].contains(case.key)
        || !lines[0].contains(case.range)
        || log.contains("worker=")
    {
        return Some(format!("{what}: exit {status:?}, log:\n{log}"));
    }
    None
}

#[test]
fn every_numeric_key_rejects_huge_negative_and_non_finite_values() {
    let mut cases = Vec::new();
    // All at once: each is expected to end within milliseconds, and one that
    // does not must not make the others wait for it.
    for &(key, range) in NUMERIC_KEYS {
        for value in ["1e300", "-1", "inf", "nan", "99999999999999999999999"] {
            let env = env_name(key);
            cases.push(Case {
                key,
                range,
                how: format!("{env}={value}"),
                daemon: Daemon::start(&base_config(), &[(&env, value)]),
            });
        }
        // The same in the file, TOML's own float syntax included.
        for value in ["1e300", "-1", "inf", "-inf", "nan"] {
            cases.push(Case {
                key,
                range,
                how: format!("in the file: {key} = {value}"),
                daemon: Daemon::start(&config_with(key, value), &[]),
            });
        }
    }
    let end = Instant::now() + DEADLINE;
    let failures: Vec<String> = cases.iter_mut().filter_map(|c| judge(c, end)).collect();
    assert!(
        failures.is_empty(),
        "{} of {} bad values were not one clean error:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn http_bind_on_a_port_in_use_is_one_clear_error_and_starts_nothing() {
    let held = std::net::TcpListener::bind("127.0.0.1:0").expect("a free loopback port");
    let addr = held.local_addr().expect("bound").to_string();
    let config = config_with("http.bind", &format!("{addr:?}"));
    let mut d = Daemon::start(&config, &[]);
    let status = d.wait_exit();
    let log = d.log();
    assert_eq!(status.code(), Some(1), "{log}");
    assert!(!log.contains("panicked"), "{log}");
    let errors: Vec<&str> = log.lines().filter(|l| l.contains("error")).collect();
    assert_eq!(errors.len(), 1, "one error line expected:\n{log}");
    assert!(errors[0].contains("http.bind"), "{log}");
    assert!(errors[0].contains(&addr), "{log}");
    assert!(!log.contains("worker="), "a worker was started:\n{log}");
    drop(held);
}

/// A process the test saw alive, told apart from a later one with its pid
/// by its start time. Dropping it kills it if it is still that process, so
/// a failing run leaves no sleeper behind.
struct Forked {
    pid: i32,
    start: u64,
}

/// (state, process group, start time) from /proc/PID/stat; `None`: no such pid.
fn proc_stat(pid: i32) -> Option<(char, i32, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after "pid (comm) ": comm may hold spaces and parentheses.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let state = fields.first()?.chars().next()?;
    let pgrp = fields.get(2)?.parse().ok()?;
    let start = fields.get(19)?.parse().ok()?;
    Some((state, pgrp, start))
}

impl Forked {
    /// The pid the forker app wrote, once it is there.
    fn read(path: &std::path::Path) -> Forked {
        Self::read_new(path, 0)
    }

    /// The pid the forker app wrote, once it is there and not `old`.
    fn read_new(path: &std::path::Path, old: i32) -> Forked {
        let mut pid = None;
        let found = wait_for(DEADLINE, || {
            pid = std::fs::read_to_string(path)
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .filter(|&p| p != old);
            pid.is_some()
        });
        assert!(found, "the app wrote no pid to {}", path.display());
        let pid = pid.expect("found above");
        let (_, _, start) = proc_stat(pid).expect("the forked child runs");
        Forked { pid, start }
    }

    /// Still the same process, and not a zombie: a zombie has ended, it only
    /// waits for whoever inherited it to reap it.
    fn running(&self) -> bool {
        proc_stat(self.pid)
            .is_some_and(|(state, _, start)| start == self.start && state != 'Z' && state != 'X')
    }

    fn pgrp(&self) -> i32 {
        proc_stat(self.pid).expect("the forked child runs").1
    }
}

impl Drop for Forked {
    fn drop(&mut self) {
        if self.running() {
            // SAFETY: kill(2) on a pid just checked to be the app's child.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
        }
    }
}

/// A daemon running the forker app, the child its first instance forked,
/// the worker's pid, and the directory of the pid file (alive as long as the
/// app may write to it).
fn daemon_with_a_forked_child(
    sb: &asgigramd::sandbox::Sandbox,
) -> (Daemon, Forked, i32, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("temp dir");
    let pid_file = dir.path().join("child.pid");
    let d = Daemon::start(
        &config_for(sb, "forker:app", ""),
        &[(
            "FORKER_PID_FILE",
            pid_file.to_str().expect("utf-8 temp path"),
        )],
    );
    sb.inject_text(31, "fork");
    wait_texts(sb, 31, 1, &d);
    let child = Forked::read(&pid_file);
    let worker = worker_pids(&d.log())[0];
    assert!(child.running());
    assert_eq!(
        child.pgrp(),
        worker,
        "the app's child is in its worker's process group"
    );
    (d, child, worker, dir)
}

#[test]
fn processes_an_app_forks_end_when_its_worker_is_killed() {
    let sb = sandbox();
    let (d, child, worker, dir) = daemon_with_a_forked_child(&sb);
    // SAFETY: kill(2) on the worker process this test's daemon started.
    unsafe {
        libc::kill(worker, libc::SIGKILL);
    }
    assert!(
        d.wait_log("died (killed by signal 9); restarting it"),
        "{}",
        d.log()
    );
    assert!(
        wait_for(DEADLINE, || !child.running()),
        "pid {} forked by the app outlived its killed worker {worker}",
        child.pid
    );
    // The daemon goes on with a new worker, in a group of its own too.
    sb.inject_text(31, "again");
    wait_texts(&sb, 31, 2, &d);
    let second = Forked::read_new(&dir.path().join("child.pid"), child.pid);
    assert!(second.running());
    assert_ne!(second.pgrp(), worker);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        wait_for(DEADLINE, || !second.running()),
        "pid {} forked by the app outlived the daemon:\n{log}",
        second.pid
    );
}

#[test]
fn processes_an_app_forks_end_when_the_daemon_stops() {
    let sb = sandbox();
    let (d, child, _, _dir) = daemon_with_a_forked_child(&sb);
    let (status, log) = d.stop();
    assert!(status.success(), "{log}");
    assert!(
        wait_for(DEADLINE, || !child.running()),
        "pid {} forked by the app outlived the daemon:\n{log}",
        child.pid
    );
}

/// SIGTERM and wait for it on drop, so a failing assertion stops it too.
struct Stopping(std::process::Child);

impl Drop for Stopping {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.0.id() as i32, libc::SIGTERM);
        }
        let end = Instant::now() + DEADLINE;
        while self.0.try_wait().ok().flatten().is_none() && Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_token_on_the_command_line_is_overwritten_in_proc_cmdline() {
    let sb = sandbox();
    let state = tempfile::tempdir().expect("temp dir");
    let log_path = state.path().join("daemon.log");
    let log = std::fs::File::create(&log_path).expect("log file");
    let api_url = sb.api_url();
    let child = Command::new(binary())
        .args([sb.token(), "echo3:app", "--api-url", &api_url])
        .env("ASGIGRAM_JOURNAL__DIR", state.path().join("state"))
        .env_remove("RUST_LOG")
        .current_dir(apps_dir())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("runs");
    let pid = child.id();
    let child = Stopping(child);
    sb.inject_text(41, "started");
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    assert!(
        sb.wait_until(DEADLINE, |v| v.sent_texts(41).len() == 1),
        "{}",
        log()
    );

    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).expect("cmdline readable");
    let args: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert!(
        !args.iter().any(|a| a.contains("SECRET")),
        "the token is readable in /proc/{pid}/cmdline: {args:?}"
    );
    assert_eq!(args[1], "x".repeat(TOKEN.len()), "{args:?}");
    assert_eq!(args[2..], ["echo3:app", "--api-url", &api_url], "{args:?}");

    drop(child);
    let log = log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("command line"))
        .collect();
    assert_eq!(warnings.len(), 1, "one warning about the token:\n{log}");
    assert!(
        warnings[0].contains("ASGIGRAM_TELEGRAM__TOKEN")
            && warnings[0].contains("telegram.token_file"),
        "{log}"
    );
    assert!(!log.contains("SECRET"), "the token leaked into the log");
}
