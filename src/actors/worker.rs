//! Worker actor: one per Python worker process.
//!
//! Owns the process and its channel (fd 3). Writes the frames scopes give it,
//! reads the worker's frames and routes each to the instance (`sid`) it belongs
//! to, and forwards the process's stdout/stderr lines to the log with its pid.
//! Tells the Supervisor when the worker is ready, failed to start, or exited;
//! tells every attached scope when the process is gone, so their unreceived
//! events can go to a new instance. Stops once the process has exited.

use std::collections::HashMap;
use std::io;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use crate::bridge::{self, FromWorker, Sid, ToWorker};
use crate::settings::AppSettings;

/// What a worker reports to the instance a frame belongs to.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum InstanceMsg {
    /// The instance's `receive()` returned event `seq`.
    Received { sid: Sid, seq: u64 },
    /// The instance's `receive()` found nothing queued: it is done with what
    /// it received.
    Idle { sid: Sid },
    /// The instance called `send(event)`.
    Send { sid: Sid, event: serde_json::Value },
    /// The instance's coroutine finished.
    Ended {
        sid: Sid,
        error: Option<String>,
        cancelled: bool,
    },
    /// The worker process is gone; the instance with it.
    WorkerLost { sid: Sid },
}

/// Lifecycle reports to the Supervisor.
#[derive(Debug, Message)]
#[rtype(result = "()")]
pub enum WorkerEvent {
    Ready {
        index: usize,
        pid: u32,
        asgi_version: String,
    },
    /// The worker cannot run the app (import error, lifespan startup failed).
    Failed { index: usize, error: String },
    Exited {
        index: usize,
        pid: u32,
        status: Option<ExitStatus>,
    },
}

/// Start an instance: register where its frames go, then send `start` (its
/// encoded `start` frame).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Attach {
    pub sid: Sid,
    pub start: Bytes,
    pub to: Recipient<InstanceMsg>,
}

/// Write one encoded frame (an `event` or `close`) to the worker.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Write(pub Bytes);

/// Ask the worker to end every instance and run lifespan shutdown.
#[derive(Message)]
#[rtype(result = "()")]
pub struct ShutdownWorker {
    pub grace: f64,
}

#[derive(Message)]
#[rtype(result = "()")]
struct ProcessExited(Option<ExitStatus>);

/// How often a ready worker is pinged: several pings per `app.hang_timeout`,
/// so that one delayed by a busy loop is not yet a hang, at most every 5 s.
fn ping_interval(hang_timeout: Duration) -> Duration {
    (hang_timeout / 6).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

pub struct Worker {
    index: usize,
    app: AppSettings,
    supervisor: Recipient<WorkerEvent>,
    pid: u32,
    ready: bool,
    /// Reached ready once (a later kill clears `ready`, not this).
    was_ready: bool,
    writer: Option<actix::io::FramedWrite<Bytes, OwnedWriteHalf, LengthDelimitedCodec>>,
    instances: HashMap<Sid, Recipient<InstanceMsg>>,
    /// The first `fatal` message, reported when the process exits.
    fatal: Option<String>,
    pings_sent: u64,
    last_pong: Instant,
}

impl Worker {
    pub fn new(index: usize, app: AppSettings, supervisor: Recipient<WorkerEvent>) -> Worker {
        Worker {
            index,
            app,
            supervisor,
            pid: 0,
            ready: false,
            was_ready: false,
            writer: None,
            instances: HashMap::new(),
            fatal: None,
            pings_sent: 0,
            last_pong: Instant::now(),
        }
    }

    fn write(&mut self, frame: Bytes) {
        if let Some(w) = &mut self.writer {
            w.write(frame);
        }
    }

    fn handle_frame(&mut self, frame: FromWorker) {
        match frame {
            FromWorker::Received { sid, seq } => {
                self.route(sid, InstanceMsg::Received { sid, seq })
            }
            FromWorker::Idle { sid } => self.route(sid, InstanceMsg::Idle { sid }),
            FromWorker::Send { sid, event } => self.route(sid, InstanceMsg::Send { sid, event }),
            FromWorker::Ended {
                sid,
                error,
                cancelled,
            } => {
                if let Some(to) = self.instances.remove(&sid) {
                    to.do_send(InstanceMsg::Ended {
                        sid,
                        error,
                        cancelled,
                    });
                }
            }
            FromWorker::Ready {
                pid,
                asgi_version,
                lifespan,
                python,
            } => {
                self.ready = true;
                self.was_ready = true;
                self.last_pong = Instant::now();
                log::info!(
                    "worker={} pid={pid} ready: ASGI {asgi_version}, lifespan {}, Python {python}",
                    self.index,
                    if lifespan { "on" } else { "off" }
                );
                self.supervisor.do_send(WorkerEvent::Ready {
                    index: self.index,
                    pid,
                    asgi_version,
                });
            }
            FromWorker::Fatal { error } => {
                log::error!(
                    "worker={} pid={} cannot run the application:\n{}",
                    self.index,
                    self.pid,
                    error.trim_end()
                );
                self.fatal.get_or_insert(error);
            }
            FromWorker::Pong { .. } => self.last_pong = Instant::now(),
            FromWorker::Log { level, message } => {
                let level = match level.as_str() {
                    "error" => log::Level::Error,
                    "warning" | "warn" => log::Level::Warn,
                    "info" => log::Level::Info,
                    _ => log::Level::Debug,
                };
                log::log!(
                    level,
                    "worker={} pid={} bridge: {message}",
                    self.index,
                    self.pid
                );
            }
        }
    }

    fn kill(&mut self) {
        if self.writer.is_none() || self.pid == 0 {
            return;
        }
        // The whole process group: the worker and whatever the app forked.
        // SAFETY: killpg(2) on the group of the child this actor started (its
        // pid, see spawn_worker). The id stays ours while the child is not
        // reaped, and then `writer` is cleared before any further kill can run.
        unsafe {
            libc::killpg(self.pid as i32, libc::SIGKILL);
        }
        self.ready = false;
    }

    /// Pings a ready worker; kills it when it stopped answering for
    /// `app.hang_timeout` (an app blocking the loop, a deadlock), so the
    /// Supervisor replaces it and its scopes' events go to fresh instances.
    fn check_alive(&mut self) {
        if !self.ready || self.writer.is_none() {
            return;
        }
        if self.last_pong.elapsed() > self.app.hang_timeout {
            log::error!(
                "worker={} pid={} has not answered pings for {:.1}s (app.hang_timeout); killing it",
                self.index,
                self.pid,
                self.app.hang_timeout.as_secs_f64()
            );
            self.kill();
            return;
        }
        self.pings_sent += 1;
        self.write(ToWorker::Ping { n: self.pings_sent }.encode());
    }

    fn route(&self, sid: Sid, msg: InstanceMsg) {
        match self.instances.get(&sid) {
            Some(to) => to.do_send(msg),
            None => log::debug!(
                "worker={} frame for unknown instance sid={sid} dropped",
                self.index
            ),
        }
    }
}

impl Actor for Worker {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        let spawned = match bridge::spawn_worker(&self.app) {
            Ok(s) => s,
            Err(e) => {
                let error = e.to_string();
                log::error!("worker={} {error}", self.index);
                self.supervisor.do_send(WorkerEvent::Failed {
                    index: self.index,
                    error,
                });
                ctx.stop();
                return;
            }
        };
        let mut child = spawned.child;
        self.pid = child.id().unwrap_or(0);
        log::info!(
            "worker={} started pid={} ({})",
            self.index,
            self.pid,
            self.app.python
        );
        let (read, write) = spawned.channel.into_split();
        let codec = || {
            LengthDelimitedCodec::builder()
                .max_frame_length(bridge::MAX_FRAME)
                .new_codec()
        };
        ctx.add_stream(FramedRead::new(read, codec()));
        self.writer = Some(actix::io::FramedWrite::new(write, codec(), ctx));
        if let Some(out) = child.stdout.take() {
            actix::spawn(forward_lines(out, self.pid, "stdout"));
        }
        if let Some(err) = child.stderr.take() {
            actix::spawn(forward_lines(err, self.pid, "stderr"));
        }
        let me = ctx.address();
        actix::spawn(async move {
            let status = child.wait().await.ok();
            me.do_send(ProcessExited(status));
        });
        ctx.run_interval(ping_interval(self.app.hang_timeout), |act, _| {
            act.check_alive()
        });
        // A worker stuck importing the app (or in lifespan startup) would
        // otherwise hold a restart or a reload forever; its exit is then
        // handled like any failure to start.
        ctx.run_later(self.app.startup_timeout, |act, _| {
            if !act.was_ready && act.fatal.is_none() {
                log::error!(
                    "worker={} pid={} not ready within {}s (app.startup_timeout); killing it",
                    act.index,
                    act.pid,
                    act.app.startup_timeout.as_secs()
                );
                act.kill();
            }
        });
    }

    fn stopped(&mut self, _: &mut Context<Self>) {
        for (sid, to) in self.instances.drain() {
            to.do_send(InstanceMsg::WorkerLost { sid });
        }
    }
}

/// Logs each line a worker prints, prefixed with its pid.
async fn forward_lines(stream: impl AsyncRead + Unpin, pid: u32, name: &'static str) {
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        match reader.read_until(b'\n', &mut line).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                let text = String::from_utf8_lossy(&line);
                log::info!(target: "asgigramd::app", "[worker {pid} {name}] {}", text.trim_end());
            }
        }
    }
}

impl StreamHandler<Result<BytesMut, io::Error>> for Worker {
    fn handle(&mut self, item: Result<BytesMut, io::Error>, _: &mut Context<Self>) {
        match item {
            Ok(frame) => match FromWorker::decode(&frame) {
                Ok(frame) => self.handle_frame(frame),
                // Well framed but not a frame we know: the next one is fine.
                Err(e) => log::warn!("worker={} pid={} {e}; frame skipped", self.index, self.pid),
            },
            // A framing error (a length over the limit, a read error) leaves
            // the stream out of step: nothing after it can be trusted. The
            // worker is replaced, and its scopes' events go to new instances.
            Err(e) => {
                log::error!(
                    "worker={} pid={} channel corrupted ({e}); killing the worker",
                    self.index,
                    self.pid
                );
                self.kill();
            }
        }
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // Channel closed: the process is exiting; ProcessExited follows.
        log::debug!("worker={} pid={} channel closed", self.index, self.pid);
    }
}

impl actix::io::WriteHandler<io::Error> for Worker {
    fn error(&mut self, err: io::Error, _: &mut Context<Self>) -> Running {
        log::warn!(
            "worker={} pid={} channel write failed: {err}",
            self.index,
            self.pid
        );
        // Keep running: the exit watcher decides when the worker is gone.
        Running::Continue
    }
}

impl Handler<Attach> for Worker {
    type Result = ();
    fn handle(&mut self, msg: Attach, _: &mut Context<Self>) {
        if self.writer.is_none() {
            msg.to.do_send(InstanceMsg::WorkerLost { sid: msg.sid });
            return;
        }
        self.instances.insert(msg.sid, msg.to);
        self.write(msg.start);
    }
}

impl Handler<Write> for Worker {
    type Result = ();
    fn handle(&mut self, msg: Write, _: &mut Context<Self>) {
        self.write(msg.0);
    }
}

impl Handler<ShutdownWorker> for Worker {
    type Result = ();
    fn handle(&mut self, msg: ShutdownWorker, _: &mut Context<Self>) {
        self.write(ToWorker::Shutdown { grace: msg.grace }.encode());
    }
}

impl Handler<ProcessExited> for Worker {
    type Result = ();
    fn handle(&mut self, msg: ProcessExited, ctx: &mut Context<Self>) {
        let status = msg.0;
        if self.pid != 0 {
            // What the app forked is still in the worker's process group and
            // would outlive it. The kernel keeps a group's id from being
            // reused while any member lives; with none left, the id would
            // have had to come round again in the moment since the reap.
            // SAFETY: killpg(2) on the group spawn_worker made for this
            // worker; never 0, which would be the daemon's own group.
            unsafe {
                libc::killpg(self.pid as i32, libc::SIGKILL);
            }
        }
        match (self.fatal.take(), self.ready) {
            (Some(error), _) => self.supervisor.do_send(WorkerEvent::Failed {
                index: self.index,
                error,
            }),
            (None, false) => self.supervisor.do_send(WorkerEvent::Failed {
                index: self.index,
                error: format!(
                    "the worker exited before it was ready ({})",
                    describe(status)
                ),
            }),
            (None, true) => {}
        }
        self.supervisor.do_send(WorkerEvent::Exited {
            index: self.index,
            pid: self.pid,
            status,
        });
        self.writer = None;
        ctx.stop();
    }
}

/// "exit status 1" / "killed by signal 9".
pub fn describe(status: Option<ExitStatus>) -> String {
    use std::os::unix::process::ExitStatusExt;
    match status {
        Some(s) => match (s.code(), s.signal()) {
            (Some(code), _) => format!("exit status {code}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => s.to_string(),
        },
        None => "exit status unknown".to_string(),
    }
}
