//! Test harness: the real `asgigramd` binary against an in-process sandbox on
//! loopback, with real Python workers running the apps in tests/apps.
//!
//! Every wait polls with a deadline; nothing sleeps a fixed time to "let
//! things settle".

#![allow(dead_code)]

use std::fs;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use asgigramd::sandbox::{Sandbox, SandboxOptions};

/// Generous: CI machines are slow and Python start-up is not instant.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// A token that looks real enough to be routed, and is easy to grep for.
pub const TOKEN: &str = "4242:SECRET-token_for-tests";

pub fn sandbox() -> Sandbox {
    Sandbox::start(SandboxOptions {
        token: TOKEN.to_string(),
        ..SandboxOptions::default()
    })
    .expect("sandbox starts on loopback")
}

pub fn apps_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/apps")
}

pub fn binary() -> &'static str {
    env!("CARGO_BIN_EXE_asgigramd")
}

/// A running daemon whose log (stderr) goes to a file.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    log_path: PathBuf,
}

/// Config text pointing at `sandbox` with the given app and extra TOML lines
/// (`[section]` blocks; they are merged by appending, so use sections not
/// already present: `[scopes]`, `[log]`).
pub fn config_for(sandbox: &Sandbox, app: &str, extra: &str) -> String {
    format!(
        "[telegram]\ntoken = \"{}\"\napi_url = \"{}\"\npoll_timeout = 5\n\n[app]\napplication = \"{app}\"\napp_dir = \"{}\"\n\n{extra}\n",
        sandbox.token(),
        sandbox.api_url(),
        apps_dir().display()
    )
}

impl Daemon {
    /// Starts `asgigramd --config <tmp>/asgigram.toml` with `config` as the file.
    pub fn start(config: &str, env: &[(&str, &str)]) -> Daemon {
        Self::start_args(config, &[], env)
    }

    pub fn start_args(config: &str, args: &[&str], env: &[(&str, &str)]) -> Daemon {
        let dir = tempfile::tempdir().expect("temp dir");
        let config_path = dir.path().join("asgigram.toml");
        fs::write(&config_path, config).expect("config written");
        let log_path = dir.path().join("daemon.log");
        let log = fs::File::create(&log_path).expect("log file");
        let mut cmd = Command::new(binary());
        cmd.arg("--config").arg(&config_path).args(args);
        cmd.env_remove("RUST_LOG");
        // A journal per daemon; tests that restart a daemon pass their own.
        cmd.env("ASGIGRAM_JOURNAL__DIR", dir.path().join("state"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("asgigramd binary starts");
        Daemon {
            child,
            dir,
            log_path,
        }
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// Waits until the log contains `needle`.
    pub fn wait_log(&self, needle: &str) -> bool {
        wait_for(DEADLINE, || self.log().contains(needle))
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGTERM, then waits for the exit; returns the status and the whole log.
    pub fn stop(mut self) -> (ExitStatus, String) {
        // SAFETY: kill(2) on our own child's pid.
        unsafe {
            libc::kill(self.pid(), libc::SIGTERM);
        }
        let status = self.wait_exit();
        let log = self.log();
        (status, log)
    }

    /// Waits for the process to exit on its own (killing it after the deadline).
    pub fn wait_exit(&mut self) -> ExitStatus {
        let deadline = Instant::now() + DEADLINE;
        loop {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                panic!(
                    "asgigramd did not exit within {DEADLINE:?}; log:\n{}",
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Polls `cond` every 20 ms until it holds or `deadline` passes.
/// A journal directory of the test's own, removed with it.
pub struct StateDir {
    _dir: tempfile::TempDir,
    pub path: PathBuf,
}

impl StateDir {
    pub fn new() -> StateDir {
        let dir = tempfile::tempdir().expect("temp dir");
        let path = dir.path().join("state");
        StateDir { _dir: dir, path }
    }

    /// The environment that points a daemon at it.
    pub fn env(&self) -> [(&'static str, &str); 1] {
        [(
            "ASGIGRAM_JOURNAL__DIR",
            self.path.to_str().expect("utf-8 temp path"),
        )]
    }
}

/// A loopback port free now, for a listener whose address must be known
/// before its process starts (a webhook URL given to setWebhook).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free loopback port")
        .port()
}

pub fn wait_for(deadline: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until `chat` has received at least `n` texts; returns them.
pub fn wait_texts(sandbox: &Sandbox, chat: i64, n: usize, daemon: &Daemon) -> Vec<String> {
    let ok = sandbox.wait_until(DEADLINE, |v| v.sent_texts(chat).len() >= n);
    let texts = sandbox.sent_texts(chat);
    assert!(
        ok,
        "chat {chat}: expected {n} replies, got {texts:?}; daemon log:\n{}",
        daemon.log()
    );
    texts
}

/// Calls the sandbox's Bot API directly, as another client would (HTTP/1.1
/// over loopback, one request per connection).
pub fn call_api(sandbox: &Sandbox, method: &str, params: serde_json::Value) -> serde_json::Value {
    use std::io::{Read, Write};
    let addr = sandbox.local_addr();
    let body = params.to_string();
    let mut stream = std::net::TcpStream::connect(addr).expect("sandbox listens");
    stream
        .set_read_timeout(Some(DEADLINE))
        .expect("timeout can be set");
    write!(
        stream,
        "POST /bot{}/{method} HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        sandbox.token(),
        body.len()
    )
    .expect("request written");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).expect("answer read");
    let json = answer.split("\r\n\r\n").nth(1).unwrap_or("null");
    serde_json::from_str(json).unwrap_or(serde_json::Value::Null)
}

/// Worker pids in start order, from the "worker=N started pid=P" lines.
pub fn worker_pids(log: &str) -> Vec<i32> {
    log.lines()
        .filter_map(|l| l.split(" started pid=").nth(1))
        .filter_map(|rest| rest.split_whitespace().next()?.parse().ok())
        .collect()
}

/// A daemon journaling in `state` whose recording app (tests/apps, the
/// `RECORD_FILE` convention) notes each update in `record`, taking `delay`
/// seconds over each.
pub fn start_recording(config: &str, state: &Path, record: &Path, delay: &str) -> Daemon {
    Daemon::start(
        config,
        &[
            (
                "ASGIGRAM_JOURNAL__DIR",
                state.to_str().expect("utf-8 temp path"),
            ),
            ("RECORD_FILE", record.to_str().expect("utf-8 temp path")),
            ("RECORD_DELAY", delay),
        ],
    )
}

/// `kill -9` of the daemon's first worker, as its log names it.
pub fn kill_first_worker(d: &Daemon) {
    let pid = *worker_pids(&d.log())
        .first()
        .unwrap_or_else(|| panic!("no worker started yet:\n{}", d.log()));
    // SAFETY: kill(2) on a worker process this test's daemon started.
    unsafe {
        libc::kill(pid, libc::SIGKILL);
    }
}

/// The pids of the daemon's worker processes (its children), from /proc.
pub fn worker_pids_now(daemon: i32) -> Vec<i32> {
    let mut pids = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // The fields after the command, which is in parentheses and may hold
        // spaces: state, ppid, ...
        let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
            continue;
        };
        let mut fields = rest.split_whitespace();
        let state = fields.next();
        let ppid: Option<i32> = fields.next().and_then(|p| p.parse().ok());
        if ppid == Some(daemon) && state != Some("Z") {
            pids.push(pid);
        }
    }
    pids
}

/// `[http]` on an ephemeral port: the daemon logs the address it bound.
pub const HTTP: &str = "[http]\nbind = \"127.0.0.1:0\"\n";

/// The endpoint's address, from the "http endpoint listening addr=..." line.
pub fn endpoint(d: &Daemon) -> String {
    let mut addr = None;
    let found = wait_for(DEADLINE, || {
        addr = d
            .log()
            .lines()
            .find_map(|l| l.split("http endpoint listening addr=").nth(1))
            .and_then(|rest| rest.split_whitespace().next())
            .map(str::to_string);
        addr.is_some()
    });
    assert!(found, "no endpoint address in the log:\n{}", d.log());
    addr.expect("found above")
}

/// A whole HTTP/1.1 response's status code and body.
fn status_and_body(raw: &str) -> (u16, String) {
    let status = raw
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {raw:?}"));
    let body = raw
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    (status, body)
}

/// GET `path`: (status, body). A plain HTTP/1.1 request over a socket.
pub fn get(addr: &str, path: &str) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("the endpoint accepts connections");
    s.set_read_timeout(Some(DEADLINE)).expect("set timeout");
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .expect("request written");
    let mut raw = String::new();
    s.read_to_string(&mut raw).expect("response read");
    status_and_body(&raw)
}

/// POST `body` to `path`, with `Authorization: Bearer <token>` when given:
/// (status, body).
pub fn post(addr: &str, path: &str, token: Option<&str>, body: &[u8]) -> (u16, String) {
    let mut s = TcpStream::connect(addr).expect("the endpoint accepts connections");
    s.set_read_timeout(Some(Duration::from_secs(60)))
        .expect("set timeout");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).expect("request written");
    // A body the endpoint refuses part way may not be read to its end.
    let _ = s.write_all(body);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let raw = String::from_utf8_lossy(&raw).to_string();
    status_and_body(&raw)
}

/// The value of one sample line (`name{labels} value`) in a scrape.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Collects the `CallDone`s a Sender reports (tests that drive the actor
/// system directly).
struct Collector(std::rc::Rc<std::cell::RefCell<Vec<asgigramd::actors::call::CallDone>>>);

impl actix::Actor for Collector {
    type Context = actix::Context<Self>;
}

impl actix::Handler<asgigramd::actors::call::CallDone> for Collector {
    type Result = ();
    fn handle(&mut self, msg: asgigramd::actors::call::CallDone, _: &mut actix::Context<Self>) {
        self.0.borrow_mut().push(msg);
    }
}

/// Where to send outcomes, and what arrived there. Must run inside an actix
/// System.
pub fn collector() -> (
    actix::Recipient<asgigramd::actors::call::CallDone>,
    std::rc::Rc<std::cell::RefCell<Vec<asgigramd::actors::call::CallDone>>>,
) {
    use actix::Actor;
    let done = std::rc::Rc::default();
    let addr = Collector(std::rc::Rc::clone(&done)).start();
    (addr.recipient(), done)
}

/// update_id -> how many times an app instance received it, from the record
/// file the recording test apps append each update_id to.
pub fn receipts(record: &Path) -> std::collections::HashMap<i64, usize> {
    let mut seen = std::collections::HashMap::new();
    for line in fs::read_to_string(record).unwrap_or_default().lines() {
        if let Ok(id) = line.trim().parse() {
            *seen.entry(id).or_default() += 1;
        }
    }
    seen
}

/// How many distinct updates the app received.
pub fn received(record: &Path) -> usize {
    receipts(record).len()
}

/// Reply text -> how many times it reached the Bot API, over `chats`.
pub fn replies(
    sb: &Sandbox,
    chats: std::ops::Range<i64>,
) -> std::collections::HashMap<String, usize> {
    let mut seen = std::collections::HashMap::new();
    for chat in chats {
        for text in sb.sent_texts(chat) {
            *seen.entry(text).or_default() += 1;
        }
    }
    seen
}

/// Waits until the app recorded `total` distinct updates and `chats` got
/// `total` replies between them; asserts that no update reached the app
/// twice and that the replies are exactly `total`.
pub fn assert_received_once_and_answered(
    sb: &Sandbox,
    record: &Path,
    chats: std::ops::Range<i64>,
    total: usize,
    d: &Daemon,
) {
    assert!(
        wait_for(DEADLINE, || received(record) >= total),
        "{}",
        d.log()
    );
    assert!(
        receipts(record).values().all(|&n| n == 1),
        "an update reached the app twice"
    );
    let count = || chats.clone().map(|c| sb.sent_texts(c).len()).sum::<usize>();
    let ok = wait_for(DEADLINE, || count() >= total);
    let replies = count();
    assert!(
        ok && replies == total,
        "{replies} replies for {total} updates; log:\n{}",
        d.log()
    );
}
