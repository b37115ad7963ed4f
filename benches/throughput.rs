//! Throughput benchmark: the real `asgigramd` binary with a Python ASGI echo
//! app against the sandbox on loopback. Prints figures; asserts nothing.
//!
//!     cargo bench --bench throughput -- [UPDATES] [CHATS] [WORKERS]
//!
//! Defaults: 20,000 updates over 1,000 chats, released at once, 1 worker.
//! Reports replies/s, latency from the moment an update is available to the
//! moment its reply reaches the Bot API (p50/p99), daemon CPU per update, peak
//! RSS of the daemon and of its workers, the sandbox's own CPU share, and lost
//! / duplicated / out-of-order replies.

use std::collections::HashMap;
use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use asgigramd::sandbox::{Sandbox, SandboxOptions};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let arg =
        |i: usize, default: usize| args.get(i).and_then(|a| a.parse().ok()).unwrap_or(default);
    let (updates, chats, workers) = (arg(0, 20_000), arg(1, 1_000), arg(2, 1));

    let sandbox = Sandbox::start(SandboxOptions::default()).expect("sandbox starts");
    let dir = tempfile::tempdir().expect("temp dir");
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = format!(
        "[telegram]\ntoken = \"{}\"\napi_url = \"{}\"\npoll_timeout = 5\n\n[app]\napplication = \"echo3:app\"\napp_dir = \"{}\"\nworkers = {workers}\n\n[sender]\nlimits = false\n\n[log]\nlevel = \"warn\"\n",
        sandbox.token(),
        sandbox.api_url(),
        root.join("tests/apps").display()
    );
    let config_path = dir.path().join("bench.toml");
    fs::write(&config_path, config).expect("config written");
    let binary = root.join("target/release/asgigramd");
    assert!(
        binary.exists(),
        "build the daemon first: cargo build --release (looked for {})",
        binary.display()
    );
    let mut daemon = Command::new(&binary)
        .arg("--config")
        .arg(&config_path)
        .stdin(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("asgigramd starts");
    let pid = daemon.id();
    // Ready once it polls.
    let polling = wait(Duration::from_secs(60), || {
        sandbox.inspect(|v| v.is_polling())
    });
    assert!(polling, "the daemon did not start polling");

    // Every chat must be known to the sandbox before the bot answers it.
    for chat in 0..chats {
        sandbox.register_chat(
            serde_json::json!({"id": 10_000 + chat as i64, "type": "private", "first_name": "U"}),
        );
    }
    let cpu_before = (proc_cpu(pid), self_cpu());
    let mut injected_at: HashMap<String, Instant> = HashMap::with_capacity(updates);
    let start = Instant::now();
    for i in 0..updates {
        let chat = 10_000 + (i % chats) as i64;
        let text = format!("u{i}");
        sandbox.inject_text(chat, &text);
        injected_at.insert(text, Instant::now());
    }
    let mut peak_daemon = 0;
    let mut peak_workers = 0;
    let done = wait(Duration::from_secs(600), || {
        peak_daemon = peak_daemon.max(rss_kb(pid));
        peak_workers = peak_workers.max(children(pid).iter().map(|&c| rss_kb(c)).sum());
        sandbox.inspect(|v| v.calls_to("sendMessage").len()) >= updates
    });
    let elapsed = start.elapsed();
    let cpu_after = (proc_cpu(pid), self_cpu());

    let calls = sandbox.calls();
    let mut latencies = Vec::with_capacity(updates);
    let mut seen: HashMap<&str, usize> = HashMap::new();
    let mut last_per_chat: HashMap<i64, usize> = HashMap::new();
    let mut out_of_order = 0;
    for call in calls.iter().filter(|c| c.method == "sendMessage") {
        let Some(text) = call.params.get("text").and_then(|t| t.as_str()) else {
            continue;
        };
        *seen.entry(text).or_default() += 1;
        if let Some(at) = injected_at.get(text) {
            latencies.push(call.at.saturating_duration_since(*at));
        }
        let n: usize = text[1..].parse().unwrap_or(0);
        let chat = call
            .params
            .get("chat_id")
            .and_then(|c| c.as_i64())
            .unwrap_or(0);
        if let Some(prev) = last_per_chat.insert(chat, n) {
            if n < prev {
                out_of_order += 1;
            }
        }
    }
    latencies.sort();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 * p) as usize).min(latencies.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    };
    let lost = injected_at
        .keys()
        .filter(|t| !seen.contains_key(t.as_str()))
        .count();
    let duplicated: usize = seen.values().filter(|&&n| n > 1).map(|n| n - 1).sum();
    let daemon_cpu = cpu_after.0 - cpu_before.0;
    let sandbox_cpu = cpu_after.1 - cpu_before.1;

    // SAFETY: kill(2) on the daemon this benchmark started.
    unsafe {
        libc::kill(pid as i32, libc::SIGTERM);
    }
    let _ = daemon.wait();

    println!("workload: {updates} updates over {chats} chats, released at once, {workers} worker(s), limits off");
    println!("completed: {done} in {:.2} s", elapsed.as_secs_f64());
    println!("replies/s: {:.0}", updates as f64 / elapsed.as_secs_f64());
    println!(
        "latency p50: {:.1} ms, p99: {:.1} ms",
        ms(pct(0.50)),
        ms(pct(0.99))
    );
    println!(
        "daemon CPU per update: {:.1} us",
        daemon_cpu * 1e6 / updates as f64
    );
    println!(
        "sandbox + harness (this process) CPU share: {:.0}% of one core",
        100.0 * sandbox_cpu / elapsed.as_secs_f64()
    );
    println!(
        "peak RSS: daemon {:.1} MB, workers {:.1} MB",
        peak_daemon as f64 / 1024.0,
        peak_workers as f64 / 1024.0
    );
    println!("lost: {lost}, duplicated: {duplicated}, out of order: {out_of_order}");
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn wait(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

/// User + system CPU seconds of a process, from /proc/PID/stat.
fn proc_cpu(pid: u32) -> f64 {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|&i| fields.get(i)?.parse::<f64>().ok())
        .sum();
    // SAFETY: sysconf has no preconditions.
    ticks / unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64
}

/// CPU seconds of this process (the sandbox's threads).
fn self_cpu() -> f64 {
    proc_cpu(std::process::id())
}

fn rss_kb(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn children(pid: u32) -> Vec<u32> {
    fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}
