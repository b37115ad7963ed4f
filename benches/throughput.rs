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
//!     cargo bench --bench throughput -- overhead [UPDATES] [CHATS] [RATE] [SECONDS]
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
//!   minus that baseline's. For both, each latency is also split at the
//!   getUpdates answer that carried the update (the wait for a poll, and
//!   the bot's work after it), with what the slowest 2% are made of.
//! - `idle` (default 100,000 chats, 1 worker): each chat sends one message,
//!   with `max_scopes` above the chat count and a long `idle_timeout`, so
//!   every scope stays alive. Reports the whole tree's RSS at 1,000 live
//!   scopes, and (RSS once every reply arrived - RSS right after startup) /
//!   live scopes for the daemon and for the workers.
//! - `webhook` (default 20,000 updates over 1,000 chats, 1 worker): the
//!   burst in webhook mode: the sandbox POSTs each update to the daemon
//!   (one per chat at a time, 40 connections), which answers once it is
//!   stored.
//! - `overhead` (default a burst of 20,000 updates over 1,000 chats, then
//!   200/s for 15 s over 200 chats): "how much does asgigramd add over my app?". The same
//!   app logic in a bare single-process Python loop (benches/bare_loop.py)
//!   and in asgigramd with one worker, each against its own sandbox, for the
//!   echo app and for one that spends 1 ms of CPU per update
//!   (tests/apps/cpu_work.py, a quarter of the burst); CPU per update of the
//!   daemon and of Python, replies/s, latency p50/p90/p99, and the
//!   difference.
//! - `all`: burst with 1 and 2 workers, steady, idle, webhook.
//!
//! `ASGIGRAMD_BIN=PATH` runs another build of the daemon (with the worker
//! bridge compiled into it) under the same harness; by default the release
//! build beside this bench.
//!
//! Every workload reports replies/s, latency from the moment an update is
//! available in the sandbox to the moment its reply reaches it
//! (p50/p90/p99), CPU per update of the daemon, of its workers and of both,
//! peak RSS of the daemon and of its workers, the sandbox's own CPU share
//! (this process: sandbox plus harness), and lost / duplicated /
//! out-of-order replies.

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

mod common;
use common::{daemon_binary, date};

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let (name, rest) = match args.first().map(String::as_str) {
        Some(n @ ("burst" | "steady" | "idle" | "webhook" | "overhead" | "all")) => {
            (n.to_string(), &args[1..])
        }
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
        "overhead" => overhead(
            arg(0, 20_000.0) as usize,
            arg(1, 1_000.0) as usize,
            arg(2, 200.0),
            arg(3, 15.0),
        ),
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
    let (injected_at, elapsed, ids) = paced(&sandbox, rate, updates, chats);
    let done = wait(Duration::from_secs(60), || sent(&sandbox) >= updates);
    let base_cpu = self_cpu() - cpu_before;
    stop.store(true, Ordering::Relaxed);
    let _ = client.join();
    let base = analyse(&sandbox, &injected_at);
    let base_split = split(&sandbox, &injected_at, &ids);
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
    let (injected_at, _, ids) = paced(&d.sandbox, rate, updates, chats);
    let done = d.wait_replies(updates, Duration::from_secs(60));
    let elapsed = Duration::from_secs_f64(seconds);
    let cpu = d.cpu_since(cpu_before);
    let outcome = analyse(&d.sandbox, &injected_at);
    let daemon_split = split(&d.sandbox, &injected_at, &ids);
    let (peak_daemon, peak_workers) = (d.peak_daemon, d.peak_workers);
    d.stop();
    base_split.print("baseline");
    daemon_split.print("daemon");
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

/// "How much does asgigramd add over my app?": the same app logic run by a
/// bare single-process Python loop (benches/bare_loop.py) and by asgigramd
/// with one worker, against the same kind of sandbox, in a burst and at a
/// steady rate; once for the echo app and once for an app that spends 1 ms
/// of CPU per update (tests/apps/cpu_work.py; a quarter of the burst).
fn overhead(updates: usize, chats: usize, rate: f64, seconds: f64) {
    let apps = [
        ("echo", "echo3:app", false, updates),
        ("1 ms of CPU per update", "cpu_work:app", true, updates / 4),
    ];
    for (name, app, work, burst_updates) in apps {
        println!("\n== overhead, {name}: burst of {burst_updates} updates over {chats} chats, then {rate}/s for {seconds} s over {STEADY_CHATS} chats, 1 worker, limits off");
        let start = |daemon: bool| {
            if daemon {
                Side::Daemon(Daemon::start_app(1, app, ""))
            } else {
                Side::Bare(Bare::start(work))
            }
        };
        let mut rows = Vec::new();
        for daemon in [false, true] {
            let burst = measure(start(daemon), chats, |sb| {
                let t0 = Instant::now();
                let mut at = HashMap::with_capacity(burst_updates);
                for i in 0..burst_updates {
                    let text = format!("u{i}");
                    sb.inject_text(10_000 + (i % chats) as i64, &text);
                    at.insert(text, Instant::now());
                }
                (at, t0)
            });
            let steady = measure(start(daemon), STEADY_CHATS, |sb| {
                let t0 = Instant::now();
                (
                    paced(sb, rate, (rate * seconds) as usize, STEADY_CHATS).0,
                    t0,
                )
            });
            rows.push((burst, steady));
        }
        let (bare, asgi) = (&rows[0], &rows[1]);
        println!(
            "{:<28} {:>10} {:>12} {:>12} {:>12} | {:>9} {:>9} {:>9} {:>12}",
            "", "burst", "CPU/update", "", "", "steady", "", "", "CPU/update"
        );
        println!(
            "{:<28} {:>10} {:>12} {:>12} {:>12} | {:>9} {:>9} {:>9} {:>12}",
            "", "replies/s", "daemon", "Python", "total", "p50 ms", "p90 ms", "p99 ms", "total"
        );
        for (label, (b, st)) in [("bare Python loop", bare), ("asgigramd + 1 worker", asgi)] {
            println!(
                "{label:<28} {:>10.0} {:>12} {:>12.1} {:>12.1} | {:>9.3} {:>9.3} {:>9.3} {:>12.1}",
                b.per_s,
                b.daemon_us.map_or("-".to_string(), |d| format!("{d:.1}")),
                b.python_us,
                b.total_us(),
                ms(st.outcome.pct(0.50)),
                ms(st.outcome.pct(0.90)),
                ms(st.outcome.pct(0.99)),
                st.total_us()
            );
        }
        println!(
            "{:<28} {:>10} {:>12} {:>12} {:>12.1} | {:>9.3} {:>9.3} {:>9.3} {:>12.1}",
            "added by asgigramd",
            "",
            "",
            "",
            asgi.0.total_us() - bare.0.total_us(),
            ms(asgi.1.outcome.pct(0.50)) - ms(bare.1.outcome.pct(0.50)),
            ms(asgi.1.outcome.pct(0.90)) - ms(bare.1.outcome.pct(0.90)),
            ms(asgi.1.outcome.pct(0.99)) - ms(bare.1.outcome.pct(0.99)),
            asgi.1.total_us() - bare.1.total_us()
        );
        for (label, (b, st)) in [("bare loop", bare), ("asgigramd", asgi)] {
            println!(
                "{label}: burst lost {} / duplicated {} / out of order {}, steady lost {} / duplicated {} / out of order {}",
                b.outcome.lost,
                b.outcome.duplicated,
                b.outcome.out_of_order,
                st.outcome.lost,
                st.outcome.duplicated,
                st.outcome.out_of_order
            );
        }
    }
}

/// The chats of the overhead workload's steady part, as `steady` has by
/// default: each gets a message every second, so its scope stays alive.
const STEADY_CHATS: usize = 200;

/// What one side of the overhead comparison cost and how it answered.
struct Measured {
    per_s: f64,
    /// CPU per update of the daemon (None for the bare loop).
    daemon_us: Option<f64>,
    /// CPU per update of the Python process(es): the workers, or the loop.
    python_us: f64,
    outcome: Outcome,
}

impl Measured {
    fn total_us(&self) -> f64 {
        self.daemon_us.unwrap_or(0.0) + self.python_us
    }
}

/// Registers the chats, lets the side settle, runs `inject` (which returns
/// when each update was injected and when injection began), waits for every
/// reply, and stops the side.
fn measure(
    mut side: Side,
    chats: usize,
    inject: impl FnOnce(&Sandbox) -> (HashMap<String, Instant>, Instant),
) -> Measured {
    for chat in 0..chats {
        side.sandbox().register_chat(chat_json(chat));
    }
    std::thread::sleep(Duration::from_millis(500));
    let before = side.cpu();
    let (injected_at, t0) = inject(side.sandbox());
    let n = injected_at.len();
    let end = Instant::now() + Duration::from_secs(600);
    while sent(side.sandbox()) < n && Instant::now() < end {
        if let Side::Daemon(d) = &mut side {
            d.sample();
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let elapsed = t0.elapsed();
    let after = side.cpu();
    let outcome = analyse(side.sandbox(), &injected_at);
    side.stop();
    let per = |s: f64| s * 1e6 / n.max(1) as f64;
    Measured {
        per_s: outcome.replies as f64 / elapsed.as_secs_f64(),
        daemon_us: after.0.map(|a| per(a - before.0.unwrap_or(0.0))),
        python_us: per(after.1 - before.1),
        outcome,
    }
}

/// The two things the overhead workload compares.
enum Side {
    Daemon(Daemon),
    Bare(Bare),
}

impl Side {
    fn sandbox(&self) -> &Sandbox {
        match self {
            Side::Daemon(d) => &d.sandbox,
            Side::Bare(b) => &b.sandbox,
        }
    }

    /// (daemon, Python) CPU seconds so far.
    fn cpu(&self) -> (Option<f64>, f64) {
        match self {
            Side::Daemon(d) => {
                let c = d.cpu();
                (Some(c.daemon), c.workers)
            }
            Side::Bare(b) => (None, proc_cpu(b.child.id())),
        }
    }

    fn stop(self) {
        match self {
            Side::Daemon(d) => d.stop(),
            Side::Bare(b) => b.stop(),
        }
    }
}

/// benches/bare_loop.py against its own sandbox.
struct Bare {
    sandbox: Sandbox,
    child: Child,
}

impl Bare {
    fn start(work: bool) -> Bare {
        let sandbox = Sandbox::start(SandboxOptions::default()).expect("sandbox starts");
        let root = Path::new(env!("CARGO_MANIFEST_DIR"));
        let python = std::env::var("ASGIGRAM_APP__PYTHON").unwrap_or_else(|_| "python3".into());
        let mut cmd = Command::new(&python);
        cmd.arg(root.join("benches/bare_loop.py"))
            .arg(sandbox.api_url())
            .arg(sandbox.token());
        if work {
            cmd.arg("--work");
        }
        let child = cmd
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("{python} starts benches/bare_loop.py: {e}"));
        assert!(
            sandbox.wait_until(Duration::from_secs(30), |v| v.is_polling()),
            "the bare loop did not poll"
        );
        Bare { sandbox, child }
    }

    fn stop(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.sandbox.stop();
    }
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
        Daemon::start_app(workers, "echo3:app", extra)
    }

    fn start_app(workers: usize, app: &str, extra: &str) -> Daemon {
        let sandbox = Sandbox::start(SandboxOptions::default()).expect("sandbox starts");
        let dir = tempfile::tempdir().expect("temp dir");
        let config = common::config(&sandbox, app, workers, dir.path(), extra);
        let config_path = dir.path().join("bench.toml");
        fs::write(&config_path, config).expect("config written");
        let binary = daemon_binary();
        assert!(
            binary.exists(),
            "build the daemon first: cargo build --release, or set ASGIGRAMD_BIN (looked for {})",
            binary.display()
        );
        println!("binary: {}", binary.display());
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

    /// CPU seconds so far of the daemon, its workers and this process.
    fn cpu(&self) -> Cpu {
        Cpu {
            daemon: proc_cpu(self.pid),
            workers: children(self.pid).iter().map(|&c| proc_cpu(c)).sum(),
            bench: self_cpu(),
        }
    }

    fn cpu_since(&self, before: Cpu) -> Cpu {
        let now = self.cpu();
        Cpu {
            daemon: now.daemon - before.daemon,
            workers: now.workers - before.workers,
            bench: now.bench - before.bench,
        }
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
/// t0 + i / rate. Returns when each was injected, the span, and each
/// update_id's text.
fn paced(
    sandbox: &Sandbox,
    rate: f64,
    updates: usize,
    chats: usize,
) -> (HashMap<String, Instant>, Duration, HashMap<i64, String>) {
    let mut injected_at = HashMap::with_capacity(updates);
    let mut ids = HashMap::with_capacity(updates);
    let t0 = Instant::now();
    for i in 0..updates {
        let due = t0 + Duration::from_secs_f64(i as f64 / rate);
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        let text = format!("u{i}");
        let id = sandbox.inject_text(10_000 + (i % chats) as i64, &text);
        injected_at.insert(text.clone(), Instant::now());
        ids.insert(id, text);
    }
    (injected_at, t0.elapsed(), ids)
}

/// Each update's latency split at the getUpdates answer that carried it:
/// the wait for that answer (the poll's own batching delay, or the bot not
/// polling when the update came) and the rest (the bot's work and its
/// sendMessage reaching the sandbox).
struct Split {
    /// (injected -> answered, answered -> reply arrived, total, parked,
    /// the poll arrived after the update was injected), per update.
    rows: Vec<(Duration, Duration, Duration, bool, bool)>,
    /// Between an answer and the next getUpdates' arrival.
    away: Vec<Duration>,
}

fn split(
    sandbox: &Sandbox,
    injected_at: &HashMap<String, Instant>,
    ids: &HashMap<i64, String>,
) -> Split {
    sandbox.inspect(|v| {
        let replied: HashMap<&str, Instant> = v
            .calls()
            .iter()
            .filter(|c| c.method == "sendMessage")
            .filter_map(|c| Some((c.params.get("text")?.as_str()?, c.at)))
            .collect();
        let polls = v.answered_polls();
        let mut rows = Vec::new();
        for p in polls {
            for id in &p.update_ids {
                let Some(text) = ids.get(id) else { continue };
                let (Some(&at), Some(&reply)) = (injected_at.get(text), replied.get(text.as_str()))
                else {
                    continue;
                };
                rows.push((
                    p.answered.saturating_duration_since(at),
                    reply.saturating_duration_since(p.answered),
                    reply.saturating_duration_since(at),
                    p.parked,
                    p.arrived > at,
                ));
            }
        }
        let away = polls
            .windows(2)
            .map(|w| w[1].arrived.saturating_duration_since(w[0].answered))
            .collect();
        Split { rows, away }
    })
}

impl Split {
    fn print(&self, who: &str) {
        let pct = |mut v: Vec<Duration>, p: f64| {
            v.sort();
            v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
                .copied()
                .unwrap_or_default()
        };
        let col = |f: fn(&(Duration, Duration, Duration, bool, bool)) -> Duration| {
            let v: Vec<Duration> = self.rows.iter().map(f).collect();
            format!(
                "p50 {:.3} / p90 {:.3} / p99 {:.3} ms",
                ms(pct(v.clone(), 0.5)),
                ms(pct(v.clone(), 0.9)),
                ms(pct(v, 0.99))
            )
        };
        println!(
            "{who} split: injected -> getUpdates answered {}",
            col(|r| r.0)
        );
        println!(
            "{who} split: answered -> sendMessage arrived {}",
            col(|r| r.1)
        );
        println!(
            "{who} split: answer -> next getUpdates arrived p50 {:.3} / p90 {:.3} / p99 {:.3} ms, {} answers for {} updates",
            ms(pct(self.away.clone(), 0.5)),
            ms(pct(self.away.clone(), 0.9)),
            ms(pct(self.away.clone(), 0.99)),
            self.away.len() + 1,
            self.rows.len()
        );
        // The slowest 2%: what they are made of.
        let mut by_total: Vec<_> = self.rows.clone();
        by_total.sort_by_key(|r| r.2);
        let tail = &by_total[by_total.len() - by_total.len() / 50..];
        if tail.is_empty() {
            return;
        }
        let n = tail.len() as f64;
        let mean = |f: fn(&(Duration, Duration, Duration, bool, bool)) -> Duration| {
            tail.iter().map(|r| ms(f(r))).sum::<f64>() / n
        };
        println!(
            "{who} slowest 2% ({}): mean total {:.3} ms = wait for the answer {:.3} + after it {:.3}; parked polls {}, polls that came after the update {}",
            tail.len(),
            mean(|r| r.2),
            mean(|r| r.0),
            mean(|r| r.1),
            tail.iter().filter(|r| r.3).count(),
            tail.iter().filter(|r| r.4).count()
        );
    }
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
            "{what} p50: {:.3} ms, p90: {:.3} ms, p99: {:.3} ms, max: {:.3} ms",
            ms(self.pct(0.50)),
            ms(self.pct(0.90)),
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

/// CPU seconds, by process.
#[derive(Clone, Copy)]
struct Cpu {
    daemon: f64,
    /// The daemon's worker processes (the same ones throughout a workload:
    /// none is restarted in these runs).
    workers: f64,
    /// This process: the sandbox and the harness.
    bench: f64,
}

fn print_common(
    cpu: Cpu,
    updates: usize,
    elapsed: Duration,
    peak_daemon: u64,
    peak_workers: u64,
    outcome: &Outcome,
) {
    let per = |s: f64| s * 1e6 / updates.max(1) as f64;
    println!("daemon CPU per update: {:.1} us", per(cpu.daemon));
    println!("worker CPU per update: {:.1} us", per(cpu.workers));
    println!(
        "whole tree (daemon + workers) CPU per update: {:.1} us",
        per(cpu.daemon + cpu.workers)
    );
    println!(
        "sandbox + harness (this process) CPU share: {:.0}% of one core",
        100.0 * cpu.bench / elapsed.as_secs_f64()
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

/// The processes `pid` started, whichever of its threads started them.
fn children(pid: u32) -> Vec<u32> {
    let mut out: Vec<u32> = fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .flat_map(|task| {
            fs::read_to_string(task.path().join("children"))
                .unwrap_or_default()
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect::<Vec<u32>>()
        })
        .collect();
    out.sort_unstable();
    out.dedup();
    out
}
