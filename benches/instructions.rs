//! Instructions per update in the daemon alone, counted by callgrind, which
//! repeats to a fraction of a percent where CPU time varies by 10% or more
//! on a shared machine.
//!
//!     cargo build --release
//!     cargo bench --bench instructions                       # the release build beside this bench
//!     cargo bench --bench instructions -- --binary PATH      # another build (a baseline; or ASGIGRAMD_BIN=PATH)
//!     cargo bench --bench instructions -- [N1 N2 [CHATS]] [--top K]
//!     cargo bench --bench instructions -- --rate 50 100 600  # one update at a time, at 50/s
//!
//! Runs the daemon binary under `valgrind --tool=callgrind
//! --trace-children=no` (its Python worker runs natively, untraced) against
//! the sandbox, with `tests/apps/echo3.py` in one worker, limits off and the
//! journal on (fsync included), twice: N1 updates (default 200) and N2
//! (default 2,200), over the same CHATS chats (default 200). The updates
//! are queued in the sandbox before the daemon starts, so both runs fetch
//! full batches and create the same scopes; each run ends with SIGTERM
//! once every reply arrived. What both runs share (startup, the scopes,
//! shutdown) cancels out of
//!
//!     marginal instructions per update = (Ir(N2) - Ir(N1)) / (N2 - N1)
//!
//! With `--rate R` the updates are not queued beforehand but injected one
//! at a time, R per second, once the daemon polls: each then comes in a
//! getUpdates answer of its own, with its own journal commit, as a bot
//! with moderate traffic sees them. The difference then also holds what
//! the daemon spends while idle for the longer run's extra time (timers,
//! long polls), which such a bot pays too.
//!
//! The same difference per function, exclusive (self) and inclusive,
//! is printed for the top K functions (default 25), from
//! `callgrind_annotate`. The callgrind files are kept in a temporary
//! directory whose path is printed, for `callgrind_annotate` by hand.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use asgigramd::sandbox::{Sandbox, SandboxOptions};
use serde_json::json;

mod common;
use common::{callgrind_total, config, daemon_binary, date};

fn main() {
    let mut args = std::env::args().skip(1);
    let mut binary: Option<PathBuf> = None;
    let mut top = 25;
    let mut rate: Option<f64> = None;
    let mut numbers = Vec::new();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--binary" => binary = args.next().map(PathBuf::from),
            "--top" => top = args.next().and_then(|t| t.parse().ok()).unwrap_or(top),
            "--rate" => {
                rate = args.next().and_then(|r| r.parse().ok()).filter(|r: &f64| *r > 0.0);
                assert!(rate.is_some(), "--rate takes updates per second, above 0");
            }
            // cargo bench passes `--bench` to every bench binary.
            a if a.starts_with("--") => {}
            a => numbers.push(a.parse::<usize>().unwrap_or_else(|_| {
                panic!("not a number: {a} (arguments: [--binary PATH] [--rate R] [N1 N2 [CHATS]] [--top K])")
            })),
        }
    }
    let n1 = numbers.first().copied().unwrap_or(200);
    let n2 = numbers.get(1).copied().unwrap_or(2_200);
    let chats = numbers.get(2).copied().unwrap_or(200);
    assert!(n2 > n1, "N2 must be larger than N1");
    let binary = binary.unwrap_or_else(daemon_binary);
    assert!(
        binary.exists(),
        "no daemon binary at {} (cargo build --release, or --binary PATH)",
        binary.display()
    );
    let dir = tempfile::Builder::new()
        .prefix("asgigramd-instructions-")
        .tempdir()
        .expect("a temporary directory");
    println!(
        "# {}; binary {}; {chats} chats, N1 = {n1}, N2 = {n2}, {}",
        date(),
        binary.display(),
        match rate {
            Some(r) => format!("injected at {r}/s"),
            None => "queued before the start".to_string(),
        }
    );
    let small = run(&binary, dir.path(), n1, chats, rate);
    let large = run(&binary, dir.path(), n2, chats, rate);
    let per = |a: u64, b: u64| (b as f64 - a as f64) / (n2 - n1) as f64;
    println!("Ir({n1}) = {}, Ir({n2}) = {}", small.total, large.total);
    println!(
        "marginal instructions per update: {:.0}",
        per(small.total, large.total)
    );
    for (what, inclusive) in [
        ("exclusive (self)", false),
        ("inclusive, the daemon's own functions", true),
    ] {
        println!("\ntop {top} functions, marginal instructions per update, {what}:");
        let a = functions(&small.file, inclusive);
        let b = functions(&large.file, inclusive);
        // Inclusively, the runtime's frames (main, the executor, actix's
        // contexts) hold everything; the daemon's own functions say where
        // it goes.
        let mut rows: Vec<(f64, &str)> = b
            .iter()
            .filter(|(name, _)| {
                !inclusive
                    || (name.contains("asgigramd::")
                        && !matches!(shorten(name).as_str(), "asgigramd::main" | "asgigramd::run"))
            })
            .map(|(name, &ir)| (per(a.get(name).copied().unwrap_or(0), ir), name.as_str()))
            .collect();
        rows.sort_by(|x, y| y.0.total_cmp(&x.0));
        let total = per(small.total, large.total);
        for (ir, name) in rows.into_iter().take(top) {
            println!("{ir:>9.0} {:>5.1}%  {}", 100.0 * ir / total, shorten(name));
        }
    }
    println!("\ncallgrind files: {}", dir.path().display());
    // Kept for callgrind_annotate by hand.
    let _ = dir.keep();
}

struct Counted {
    total: u64,
    file: PathBuf,
}

/// One run of the daemon under callgrind: `updates` over `chats`, queued
/// before it starts or injected at `rate` per second once it polls;
/// stopped with SIGTERM once every reply arrived.
fn run(binary: &Path, dir: &Path, updates: usize, chats: usize, rate: Option<f64>) -> Counted {
    let sandbox = Sandbox::start(SandboxOptions::default()).expect("sandbox starts");
    for chat in 0..chats {
        sandbox.register_chat(
            json!({"id": 10_000 + chat as i64, "type": "private", "first_name": "U"}),
        );
    }
    let inject = |i: usize| sandbox.inject_text(10_000 + (i % chats) as i64, &format!("u{i}"));
    if rate.is_none() {
        (0..updates).for_each(|i| {
            inject(i);
        });
    }
    let journal = dir.join(format!("journal-{updates}"));
    let config = config(&sandbox, "echo3:app", 1, &journal, "");
    let config_path = dir.join(format!("config-{updates}.toml"));
    fs::write(&config_path, config).expect("config written");
    let out = dir.join(format!("callgrind.out.{updates}"));
    let started = Instant::now();
    let mut child = Command::new("valgrind")
        .arg("--tool=callgrind")
        .arg("--trace-children=no")
        .arg(format!("--callgrind-out-file={}", out.display()))
        .arg(format!(
            "--log-file={}",
            dir.join(format!("valgrind-{updates}.log")).display()
        ))
        .arg(binary)
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("valgrind starts (is it installed?)");
    if let Some(rate) = rate {
        let polling = sandbox.wait_until(Duration::from_secs(300), |v| {
            v.stats().calls_by_method.contains_key("getUpdates")
        });
        assert!(polling, "the daemon under valgrind never polled");
        let every = Duration::from_secs_f64(1.0 / rate);
        let start = Instant::now();
        for i in 0..updates {
            // On a schedule, not after a sleep each: a late wake-up does not
            // push the rest back.
            let due = start + every * i as u32;
            std::thread::sleep(due.saturating_duration_since(Instant::now()));
            inject(i);
        }
    }
    let replied = sandbox.wait_until(Duration::from_secs(900), |v| {
        v.stats()
            .calls_by_method
            .get("sendMessage")
            .copied()
            .unwrap_or(0) as usize
            >= updates
    });
    assert!(replied, "the daemon did not answer all {updates} updates");
    // SAFETY: kill(2) on the process this bench started (valgrind runs the
    // daemon in its own process).
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let status = child.wait().expect("valgrind is waited for");
    assert!(
        status.success(),
        "the daemon under valgrind exited with {status}"
    );
    sandbox.stop();
    let total = callgrind_total(&out);
    println!(
        "{updates} updates: {total} instructions ({:.0} s under valgrind)",
        started.elapsed().as_secs_f64()
    );
    Counted { total, file: out }
}

/// Instructions per function, from `callgrind_annotate`.
fn functions(file: &Path, inclusive: bool) -> HashMap<String, u64> {
    let output = Command::new("callgrind_annotate")
        .arg(format!(
            "--inclusive={}",
            if inclusive { "yes" } else { "no" }
        ))
        .arg("--threshold=100")
        .arg(file)
        .output()
        .expect("callgrind_annotate runs");
    let mut by_name = HashMap::new();
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        // "  1,234,567 (12.34%)  file:function [object]"
        let line = line.trim_start();
        let Some((count, rest)) = line.split_once(' ') else {
            continue;
        };
        let Ok(ir) = count.replace(',', "").parse::<u64>() else {
            continue;
        };
        let rest = rest.trim_start();
        let rest = match rest.strip_prefix('(') {
            Some(r) => r.split_once(')').map_or(r, |(_, after)| after).trim_start(),
            None => rest,
        };
        if rest.is_empty() || rest.starts_with("PROGRAM TOTALS") {
            continue;
        }
        *by_name.entry(rest.to_string()).or_insert(0) += ir;
    }
    by_name
}

/// A function's line without the object file and the hash Rust appends.
fn shorten(name: &str) -> String {
    let name = name.rsplit_once(" [").map_or(name, |(n, _)| n);
    let name = name.split_once(':').map_or(name, |(file, f)| {
        if file.contains('/') || file == "???" {
            f
        } else {
            name
        }
    });
    let mut s = name.to_string();
    if s.len() > 150 {
        s.truncate(150);
        s.push_str("...");
    }
    s
}
