//! Process hygiene, end to end with the real binary: bad numbers in the
//! configuration are errors (never panics), a port in use is one clear error.

mod common;

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
