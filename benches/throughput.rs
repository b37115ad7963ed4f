//! Throughput, latency and memory benchmark: the real `asgigramd` binary
//! (release build) with a Python ASGI echo app (`tests/apps/echo3.py`)
//! against the sandbox on loopback, rate limits off. Prints figures; asserts
//! nothing.
//!
//!     cargo build --release
//!     cargo bench --bench throughput -- burst  [UPDATES] [CHATS] [WORKERS]
//!     cargo bench --bench throughput -- steady [RATE] [SECONDS] [CHATS] [WORKERS]
//!     cargo bench --bench throughput -- idle   [CHATS] [WORKERS]
//!     cargo bench --bench throughput -- webhook [UPDATES] [CHATS] [WORKERS]
//!     cargo bench --bench throughput -- all
//!     cargo bench --bench throughput -- [UPDATES] [CHATS] [WORKERS]   # = burst
//!
//! Workloads:
//! - `burst` (default 20,000 updates over 1,000 chats, 1 worker): every
//!   update released at once.
//! - `steady` (default 200 updates/s for 15 s over 200 chats, 1 worker):
//!   updates injected on a deadline schedule (update i at t0 + i/RATE, so
//!   sleeping late never accumulates). The same schedule is first run against
//!   a minimal client in this process (a blocking HTTP/1.1 keep-alive loop:
//!   long-poll getUpdates, then one sendMessage per update), which is the
//!   emulator's own round trip; the latency the daemon adds is its p50/p99
//!   minus that baseline's.
//! - `idle` (default 100,000 chats, 1 worker): each chat sends one message,
//!   with `max_scopes` above the chat count and a long `idle_timeout`, so
//!   every scope stays alive. Reports the whole tree's RSS at 1,000 live
//!   scopes, and (RSS once every reply arrived - RSS right after startup) /
//!   live scopes for the daemon and for the workers.
//! - `webhook` (default 20,000 updates over 1,000 chats, 1 worker): the
//!   burst in webhook mode: the sandbox POSTs each update to the daemon
//!   (one per chat at a time, 40 connections), which answers once it is
//!   stored.
//! - `all`: burst with 1 and 2 workers, steady, idle, webhook.
//!
//! Every workload reports replies/s, latency from the moment an update is
//! available in the sandbox to the moment its reply reaches it (p50/p99),
//! daemon CPU per update, peak RSS of the daemon and of its workers, the
//! sandbox's own CPU share (this process: sandbox plus harness), and lost /
//! duplicated / out-of-order replies.

use std::collections::HashMap;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use asgigramd::sandbox::{Sandbox, SandboxOptions};
use serde_json::{json, Value};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (name, rest) = match args.first().map(String::as_str) {
        Some(n @ ("burst" | "steady" | "idle" | "webhook" | "all")) => (n.to_string(), &args[1..]),
        _ => ("burst".to_string(), &args[..]),
    };
    let arg = |i: usize, default: f64| {
        rest.get(i)
            .and_then(|a| a.parse::<f64>().ok())
            .unwrap_or(default)
    };
    println!("# {}", date());
    match name.as_str() {
        "burst" => burst(
            arg(0, 20_000.0) as usize,
            arg(1, 1_000.0) as usize,
            arg(2, 1.0) as usize,
        ),
        "steady" => steady(
            arg(0, 200.0),
            arg(1, 15.0),
            arg(2, 200.0) as usize,
            arg(3, 1.0) as usize,
        ),
        "idle" => idle(arg(0, 100_000.0) as usize, arg(1, 1.0) as usize),
        "webhook" => webhook(
            arg(0, 20_000.0) as usize,
            arg(1, 1_000.0) as usize,
            arg(2, 1.0) as usize,
        ),
        _ => {
            burst(20_000, 1_000, 1);
            burst(20_000, 1_000, 2);
            steady(200.0, 15.0, 200, 1);
            idle(100_000, 1);
            webhook(20_000, 1_000, 1);
        }
    }
}

// ---------------------------------------------------------------- workloads

fn burst(updates: usize, chats: usize, workers: usize) {
    println!("\n== burst: {updates} updates over {chats} chats, released at once, {workers} worker(s), limits off");
    released_at_once(Daemon::start(workers, ""), updates, chats);
}

fn webhook(updates: usize, chats: usize, workers: usize) {
    println!("\n== webhook: {updates} updates over {chats} chats, released at once, pushed by webhook, {workers} worker(s), limits off");
    let port = free_port();
    let section = format!(
        "[webhook]\nurl = \"http://127.0.0.1:{port}/hook\"\nlisten = \"127.0.0.1:{port}\"\nsecret_token = \"bench\"\n"
    );
    released_at_once(Daemon::start(workers, &section), updates, chats);
}

/// Every update injected at once; replies/s, latency, CPU, memory.
fn released_at_once(mut d: Daemon, updates: usize, chats: usize) {
    for chat in 0..chats {
        d.sandbox.register_chat(
            json!({"id": 10_000 + chat as i64, "type": "private", "first_name": "U"}),
        );
    }
    let cpu_before = d.cpu();
    let mut injected_at: HashMap<String, Instant> = HashMap::with_capacity(updates);
    let start = Instant::now();
    for i in 0..updates {
        let chat = 10_000 + (i % chats) as i64;
        let text = format!("u{i}");
        d.sandbox.inject_text(chat, &text);
        injected_at.insert(text, Instant::now());
    }
    let done = d.wait_replies(updates, Duration::from_secs(600));
    let elapsed = start.elapsed();
    let cpu = d.cpu_since(cpu_before);
    let outcome = analyse(&d.sandbox, &injected_at);
    let (peak_daemon, peak_workers) = (d.peak_daemon, d.peak_workers);
    d.stop();
    println!("completed: {done} in {:.2} s", elapsed.as_secs_f64());
    println!("replies/s: {:.0}", updates as f64 / elapsed.as_secs_f64());
    outcome.print_latency("latency");
    print_common(cpu, updates, elapsed, peak_daemon, peak_workers, &outcome);
}

fn steady(rate: f64, seconds: f64, chats: usize, workers: usize) {
    let updates = (rate * seconds) as usize;
    println!("\n== steady: {rate} updates/s for {seconds} s ({updates} updates) over {chats} chats, {workers} worker(s), limits off");

    // Baseline: the emulator's own round trip, driven by a minimal client.
    let sandbox = Sandbox::start(SandboxOptions::default()).expect("sandbox starts");
    for chat in 0..chats {
        sandbox.register_chat(chat_json(chat));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let (addr, token, stop) = (
            sandbox.local_addr(),
            sandbox.token().to_string(),
            stop.clone(),
        );
        std::thread::spawn(move || direct_echo_client(addr, &token, &stop))
    };
    assert!(
        sandbox.wait_until(Duration::from_secs(10), |v| v.is_polling()),
        "the baseline client did not poll"
    );
    let cpu_before = self_cpu();
    let (injected_at, elapsed) = paced(&sandbox, rate, updates, chats);
    let done = wait(Duration::from_secs(60), || sent(&sandbox) >= updates);
    let base_cpu = self_cpu() - cpu_before;
    stop.store(true, Ordering::Relaxed);
    let _ = client.join();
    let base = analyse(&sandbox, &injected_at);
    sandbox.stop();
    println!("baseline (sandbox + minimal Rust client, no daemon): completed {done}");
    base.print_latency("baseline latency");
    println!(
        "baseline process CPU share (sandbox + client + injector): {:.0}% of one core",
        100.0 * base_cpu / elapsed.as_secs_f64()
    );

    // The daemon on the same schedule.
    let mut d = Daemon::start(workers, "");
    for chat in 0..chats {
        d.sandbox.register_chat(chat_json(chat));
    }
    // Let the worker settle after startup before the clock starts.
    std::thread::sleep(Duration::from_millis(500));
    let cpu_before = d.cpu();
    let (injected_at, _) = paced(&d.sandbox, rate, updates, chats);
    let done = d.wait_replies(updates, Duration::from_secs(60));
    let elapsed = Duration::from_secs_f64(seconds);
    let cpu = d.cpu_since(cpu_before);
    let outcome = analyse(&d.sandbox, &injected_at);
    let (peak_daemon, peak_workers) = (d.peak_daemon, d.peak_workers);
    d.stop();
    println!("daemon: completed {done}");
    println!(
        "replies/s: {:.0} (offered {rate})",
        outcome.replies as f64 / elapsed.as_secs_f64()
    );
    outcome.print_latency("daemon latency");
    println!(
        "added by the daemon: p50 {:.3} ms, p99 {:.3} ms",
        ms(outcome.pct(0.50)) - ms(base.pct(0.50)),
        ms(outcome.pct(0.99)) - ms(base.pct(0.99))
    );
    print_common(cpu, updates, elapsed, peak_daemon, peak_workers, &outcome);
}

fn idle(chats: usize, workers: usize) {
    println!("\n== idle: {chats} chats each sending one message, {workers} worker(s), max_scopes {}, idle_timeout 1 h", chats * 2);
    let metrics_port = free_port();
    let extra = format!(
        "[scopes]\nmax_scopes = {}\nidle_timeout = 3600\n\n[http]\nbind = \"127.0.0.1:{metrics_port}\"\n",
        chats * 2
    );
    let mut d = Daemon::start(workers, &extra);
    let metrics: SocketAddr = ([127, 0, 0, 1], metrics_port).into();
    std::thread::sleep(Duration::from_millis(1000));
    let (daemon0, workers0) = d.rss();
    println!(
        "RSS after startup: daemon {:.1} MB, workers {:.1} MB",
        mb(daemon0),
        mb(workers0)
    );
    let cpu_before = d.cpu();
    let mut injected_at: HashMap<String, Instant> = HashMap::with_capacity(chats);
    let start = Instant::now();
    let deadline = start + Duration::from_secs(600);
    let (chunk, window) = (1_000, 3_000);
    let mut injected = 0;
    let mut at_1000 = None;
    while injected < chats && Instant::now() < deadline {
        let replied = sent(&d.sandbox);
        if injected == 1_000.min(chats) && at_1000.is_none() {
            // Checkpoint: the whole tree at 1,000 live scopes.
            d.wait_replies(injected, Duration::from_secs(60));
            std::thread::sleep(Duration::from_millis(300));
            at_1000 = Some((d.rss(), scopes_live(metrics)));
            continue;
        }
        if injected - replied.min(injected) < window {
            let n = chunk.min(chats - injected);
            for i in injected..injected + n {
                let text = format!("u{i}");
                d.sandbox.inject_text(10_000 + i as i64, &text);
                injected_at.insert(text, Instant::now());
            }
            injected += n;
        } else {
            d.sample();
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let left = deadline.saturating_duration_since(Instant::now());
    let done = injected == chats && d.wait_replies(chats, left.max(Duration::from_secs(1)));
    let elapsed = start.elapsed();
    let cpu = d.cpu_since(cpu_before);
    std::thread::sleep(Duration::from_millis(1000));
    let (daemon1, workers1) = d.rss();
    let live = scopes_live(metrics);
    let outcome = analyse(&d.sandbox, &injected_at);
    let (peak_daemon, peak_workers) = (d.peak_daemon, d.peak_workers);
    d.stop();
    println!(
        "completed: {done} ({injected} injected) in {:.2} s",
        elapsed.as_secs_f64()
    );
    println!(
        "replies/s: {:.0}",
        outcome.replies as f64 / elapsed.as_secs_f64()
    );
    if let Some(((d1k, w1k), live1k)) = at_1000 {
        println!(
            "at {live1k:?} live scopes: daemon {:.1} MB + workers {:.1} MB = whole tree {:.1} MB",
            mb(d1k),
            mb(w1k),
            mb(d1k + w1k)
        );
    }
    println!(
        "after all replies: daemon {:.1} MB, workers {:.1} MB, live scopes (daemon's gauge) {live:?}",
        mb(daemon1),
        mb(workers1)
    );
    let scopes = live.unwrap_or(outcome.replies as u64).max(1) as f64;
    println!(
        "per live scope: daemon {:.0} B, workers {:.0} B",
        (daemon1 as f64 - daemon0 as f64) * 1024.0 / scopes,
        (workers1 as f64 - workers0 as f64) * 1024.0 / scopes
    );
    outcome.print_latency("latency");
    print_common(
        cpu,
        outcome.replies,
        elapsed,
        peak_daemon,
        peak_workers,
        &outcome,
    );
}

// ---------------------------------------------------------------- harness

/// The daemon under test, with its own sandbox and temporary directory
/// (config and journal).
struct Daemon {
    sandbox: Sandbox,
    child: Child,
    pid: u32,
    _dir: tempfile::TempDir,
    peak_daemon: u64,
    peak_workers: u64,
}

impl Daemon {
    fn start(workers: usize, extra: &str) -> Daemon {
        let sandbox = Sandbox::start(SandboxOptions::default()).expect("sandbox starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let config = format!(
            "[telegram]\ntoken = \"{}\"\napi_url = \"{}\"\npoll_timeout = 5\n\n[app]\napplication = \"echo3:app\"\napp_dir = \"{}\"\nworkers = {workers}\n\n[sender]\nlimits = false\n\n[journal]\ndir = \"{}\"\n\n[log]\nlevel = \"warn\"\n\n{extra}",
            sandbox.token(),
            sandbox.api_url(),
            root.join("tests/apps").display(),
            dir.path().display()
        );
        let config_path = dir.path().join("bench.toml");
        fs::write(&config_path, config).expect("config written");
        let binary = root.join("target/release/asgigramd");
        assert!(
            binary.exists(),
            "build the daemon first: cargo build --release (looked for {})",
            binary.display()
        );
        let child = Command::new(&binary)
            .arg("--config")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("asgigramd starts");
        let pid = child.id();
        // Ready once it polls, or once it set its webhook.
        let webhook = extra.contains("[webhook]");
        let ready = sandbox.wait_until(Duration::from_secs(60), |v| {
            if webhook {
                !v.calls_to("setWebhook").is_empty()
            } else {
                v.is_polling()
            }
        });
        assert!(
            ready,
            "the daemon did not start polling (or set its webhook)"
        );
        println!("daemon pid {pid}");
        Daemon {
            sandbox,
            child,
            pid,
            _dir: dir,
            peak_daemon: 0,
            peak_workers: 0,
        }
    }

    /// (daemon, workers) RSS in KiB.
    fn rss(&self) -> (u64, u64) {
        (
            rss_kb(self.pid),
            children(self.pid).iter().map(|&c| rss_kb(c)).sum(),
        )
    }

    fn sample(&mut self) {
        let (d, w) = self.rss();
        self.peak_daemon = self.peak_daemon.max(d);
        self.peak_workers = self.peak_workers.max(w);
    }

    /// Waits until `n` sendMessage calls arrived, sampling RSS meanwhile.
    fn wait_replies(&mut self, n: usize, deadline: Duration) -> bool {
        let end = Instant::now() + deadline;
        loop {
            self.sample();
            if sent(&self.sandbox) >= n {
                self.sample();
                return true;
            }
            if Instant::now() >= end {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// (daemon, this process) CPU seconds.
    fn cpu(&self) -> (f64, f64) {
        (proc_cpu(self.pid), self_cpu())
    }

    fn cpu_since(&self, before: (f64, f64)) -> (f64, f64) {
        let now = self.cpu();
        (now.0 - before.0, now.1 - before.1)
    }

    fn stop(mut self) {
        // SAFETY: kill(2) on the daemon this benchmark started.
        unsafe {
            libc::kill(self.pid as i32, libc::SIGTERM);
        }
        let _ = self.child.wait();
        self.sandbox.stop();
    }
}

/// Injects `updates` texts at `rate` per second, update i due at
/// t0 + i / rate. Returns when each was injected, and the span.
fn paced(
    sandbox: &Sandbox,
    rate: f64,
    updates: usize,
    chats: usize,
) -> (HashMap<String, Instant>, Duration) {
    let mut injected_at = HashMap::with_capacity(updates);
    let t0 = Instant::now();
    for i in 0..updates {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let text = format!("u{i}");
        sandbox.inject_text(10_000 + (i % chats) as i64, &text);
        injected_at.insert(text, Instant::now());
    }
    (injected_at, t0.elapsed())
}

struct Outcome {
    latencies: Vec<Duration>,
    replies: usize,
    lost: usize,
    duplicated: usize,
    out_of_order: usize,
}

impl Outcome {
    fn pct(&self, p: f64) -> Duration {
        let l = &self.latencies;
        l.get(((l.len() as f64 * p) as usize).min(l.len().saturating_sub(1)))
            .copied()
            .unwrap_or_default()
    }

    fn print_latency(&self, what: &str) {
        println!(
            "{what} p50: {:.3} ms, p99: {:.3} ms, max: {:.3} ms",
            ms(self.pct(0.50)),
            ms(self.pct(0.99)),
            ms(self.latencies.last().copied().unwrap_or_default())
        );
    }
}

fn analyse(sandbox: &Sandbox, injected_at: &HashMap<String, Instant>) -> Outcome {
    sandbox.inspect(|v| {
        let mut latencies = Vec::with_capacity(injected_at.len());
        let mut seen: HashMap<&str, usize> = HashMap::new();
        let mut last_per_chat: HashMap<i64, usize> = HashMap::new();
        let mut out_of_order = 0;
        for call in v.calls().iter().filter(|c| c.method == "sendMessage") {
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
        let lost = injected_at
            .keys()
            .filter(|t| !seen.contains_key(t.as_str()))
            .count();
        let duplicated = seen.values().filter(|&&n| n > 1).map(|n| n - 1).sum();
        Outcome {
            replies: latencies.len(),
            latencies,
            lost,
            duplicated,
            out_of_order,
        }
    })
}

fn print_common(
    cpu: (f64, f64),
    updates: usize,
    elapsed: Duration,
    peak_daemon: u64,
    peak_workers: u64,
    outcome: &Outcome,
) {
    println!(
        "daemon CPU per update: {:.1} us",
        cpu.0 * 1e6 / updates.max(1) as f64
    );
    println!(
        "sandbox + harness (this process) CPU share: {:.0}% of one core",
        100.0 * cpu.1 / elapsed.as_secs_f64()
    );
    println!(
        "peak RSS: daemon {:.1} MB, workers {:.1} MB",
        mb(peak_daemon),
        mb(peak_workers)
    );
    println!(
        "lost: {}, duplicated: {}, out of order: {}",
        outcome.lost, outcome.duplicated, outcome.out_of_order
    );
}

fn chat_json(chat: usize) -> Value {
    json!({"id": 10_000 + chat as i64, "type": "private", "first_name": "U"})
}

fn sent(sandbox: &Sandbox) -> usize {
    sandbox.inspect(|v| {
        v.stats()
            .calls_by_method
            .get("sendMessage")
            .copied()
            .unwrap_or(0) as usize
    })
}

// ---------------------------------------------------------------- baseline client

/// The least a bot can do: long-poll getUpdates and answer each text with
/// sendMessage, over one keep-alive connection, until `stop`.
fn direct_echo_client(addr: SocketAddr, token: &str, stop: &AtomicBool) {
    let mut http = Http::connect(addr);
    let mut offset = 0i64;
    while !stop.load(Ordering::Relaxed) {
        let body = json!({"offset": offset, "timeout": 1}).to_string();
        let answer = http.post(&format!("/bot{token}/getUpdates"), &body);
        let Some(updates) = answer.get("result").and_then(Value::as_array) else {
            continue;
        };
        for u in updates {
            offset = offset.max(u["update_id"].as_i64().unwrap_or(0) + 1);
            let m = &u["message"];
            let body = json!({"chat_id": m["chat"]["id"], "text": m["text"]}).to_string();
            http.post(&format!("/bot{token}/sendMessage"), &body);
        }
    }
}

/// A minimal blocking HTTP/1.1 client (Content-Length or chunked answers).
struct Http {
    stream: BufReader<TcpStream>,
}

impl Http {
    fn connect(addr: SocketAddr) -> Http {
        let stream = TcpStream::connect(addr).expect("connects");
        stream.set_nodelay(true).expect("nodelay");
        Http {
            stream: BufReader::new(stream),
        }
    }

    fn request(&mut self, method: &str, path: &str, body: &str) -> Vec<u8> {
        let head = format!(
            "{method} {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        let s = self.stream.get_mut();
        s.write_all(head.as_bytes()).expect("write");
        s.write_all(body.as_bytes()).expect("write");
        let mut length = None;
        let mut chunked = false;
        let mut line = String::new();
        loop {
            line.clear();
            self.stream.read_line(&mut line).expect("read");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let lower = l.to_ascii_lowercase();
            if let Some(v) = lower.strip_prefix("content-length:") {
                length = v.trim().parse::<usize>().ok();
            } else if lower.starts_with("transfer-encoding:") && lower.contains("chunked") {
                chunked = true;
            }
        }
        let mut out = Vec::new();
        if chunked {
            loop {
                line.clear();
                self.stream.read_line(&mut line).expect("read");
                let n = usize::from_str_radix(line.trim(), 16).unwrap_or(0);
                let mut chunk = vec![0; n + 2];
                self.stream.read_exact(&mut chunk).expect("read");
                out.extend_from_slice(&chunk[..n]);
                if n == 0 {
                    break;
                }
            }
        } else {
            out.resize(length.unwrap_or(0), 0);
            self.stream.read_exact(&mut out).expect("read");
        }
        out
    }

    fn post(&mut self, path: &str, body: &str) -> Value {
        serde_json::from_slice(&self.request("POST", path, body)).unwrap_or(Value::Null)
    }
}

fn scopes_live(metrics: SocketAddr) -> Option<u64> {
    let stream = TcpStream::connect(metrics).ok()?;
    let mut http = Http {
        stream: BufReader::new(stream),
    };
    let text = String::from_utf8(http.request("GET", "/metrics", "")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("asgigram_scopes_live "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map(|v| v as u64)
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

// ---------------------------------------------------------------- /proc

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn mb(kb: u64) -> f64 {
    kb as f64 / 1024.0
}

fn date() -> String {
    Command::new("date")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
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
