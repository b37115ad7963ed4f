//! Worker actor: one per Python worker process, the daemon's side of its
//! channel (fd 3, [`crate::bridge`]).
//!
//! Owns: the process (its group, so that what it forks dies with it),
//! the channel's write half, which scope each instance (`sid`) in it
//! belongs to, and its lifespan scope's side of the calls it makes.
//! Takes: [`GiveBot`] (the Supervisor, once getMe answered), [`Attach`]
//! (start an instance for a scope), [`Write`] (frames from scopes, and
//! `pause`/`resume` from the Sender), [`CallDone`] (the outcome of a call
//! its lifespan scope asked for), [`ShutdownWorker`] and [`Release`] (the
//! Supervisor), and the process's exit.
//! Sends: [`InstanceMsg`] to the scope each frame belongs to, and
//! [`InstanceMsg::WorkerLost`] to every attached scope when the process is
//! gone; [`Call`]s its lifespan scope makes to the Outbox; [`WorkerEvent`]s
//! (ready, failed to start, exited, with how it died) to the Supervisor;
//! the process's stdout/stderr lines to the log, with its pid.
//! Stops: once the process has exited (asked to, crashed, or killed
//! for hanging or for breaking its channel), its last frames are read (or
//! a short grace has passed), and the Supervisor, told of the exit, has
//! released it.
//!
//! The lifespan scope is no chat: what it sends (`send` frames with
//! [`LIFESPAN_SID`]) are calls from outside any chat, made here into
//! [`Call`]s with no cause, and the outcomes it asked for come back here
//! and go to it as `event` frames with the same sid.

use std::io;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use actix::prelude::*;
use bytes::{Bytes, BytesMut};
use foldhash::HashMap;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio_util::codec::{FramedRead, LengthDelimitedCodec};

use crate::actors::call::{Call, CallDone, Outcome, ReplyTo};
use crate::actors::outbox::OutboxLink;
use crate::bridge::{self, FromWorker, Outgoing, OutgoingError, Sid, ToWorker, LIFESPAN_SID};
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
    /// The instance called `send(event)`; parsed here, at the boundary.
    Send {
        sid: Sid,
        event: Result<Outgoing, OutgoingError>,
    },
    /// The instance's coroutine finished.
    Ended {
        sid: Sid,
        error: Option<String>,
        cancelled: bool,
    },
    /// The worker process is gone; the instance with it.
    WorkerLost { sid: Sid, death: Death },
}

/// Why a worker process ended, as far as the daemon can tell. It decides
/// whether the updates its instances had in hand are suspects (see the
/// Supervisor's isolation of suspects).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Death {
    /// It was asked to stop (shutdown, reload, an idle isolation worker).
    Asked,
    /// The app's doing: it exited or crashed by itself, or the daemon killed
    /// it for hanging or for breaking its channel.
    App,
    /// A signal the daemon did not send ended it (the OOM killer, an
    /// operator's kill): nothing points at any update.
    Outside,
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
        death: Death,
        /// Instances that were running in it.
        instances: usize,
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

/// The bot's own User, as the encoded `bot` frame: the bridge starts the
/// lifespan scope once it has it, so a worker's start-up (and its
/// `app.startup_timeout`) counts from here. Only the first one is written.
#[derive(Message)]
#[rtype(result = "()")]
pub struct GiveBot(pub Bytes);

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

/// The Supervisor has forgotten this worker: nothing new will be attached, so
/// the actor may stop. Until then an `Attach` is answered with `WorkerLost`,
/// so a scope that starts an instance on a worker that just died is told so
/// instead of waiting forever.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Release;

/// Longest line of a worker's stdout or stderr that is logged whole; the rest
/// of a longer line is counted, not kept, so an app printing without newlines
/// cannot grow the daemon.
pub const MAX_LINE: usize = 16 * 1024;

/// How long a worker whose channel failed may take to be seen exiting before
/// it is taken to live on without one.
const CHANNEL_GRACE: Duration = Duration::from_secs(1);

/// How often a ready worker is pinged: several pings per `app.hang_timeout`,
/// so that one delayed by a busy loop is not yet a hang, at most every 5 s.
fn ping_interval(hang_timeout: Duration) -> Duration {
    (hang_timeout / 6).clamp(Duration::from_millis(100), Duration::from_secs(5))
}

pub struct Worker {
    index: usize,
    app: AppSettings,
    supervisor: Recipient<WorkerEvent>,
    /// Where the lifespan scope's calls go; `None` under `--check`, which
    /// makes none.
    outbox: Option<OutboxLink>,
    /// The `bot` frame is written: the lifespan scope may start.
    bot_given: bool,
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
    /// Why the daemon killed the process, if it did.
    killed: Option<&'static str>,
    /// Asked to shut down: its channel closing is expected.
    stopping: bool,
    /// The channel can no longer be written (broken, or the process exited);
    /// frames for it are counted and dropped.
    broken: bool,
    unwritten: u64,
    /// The process's exit status, once it exited.
    status: Option<Option<ExitStatus>>,
    /// The channel reached its end: every frame the worker wrote is read.
    eof: bool,
    /// The exit has been reported; waiting for `Release`.
    exited: Option<Death>,
}

impl Worker {
    pub fn new(
        index: usize,
        app: AppSettings,
        supervisor: Recipient<WorkerEvent>,
        outbox: Option<OutboxLink>,
    ) -> Worker {
        Worker {
            index,
            app,
            supervisor,
            outbox,
            bot_given: false,
            pid: 0,
            ready: false,
            was_ready: false,
            writer: None,
            instances: HashMap::default(),
            fatal: None,
            pings_sent: 0,
            last_pong: Instant::now(),
            killed: None,
            stopping: false,
            broken: false,
            unwritten: 0,
            status: None,
            eof: false,
            exited: None,
        }
    }

    fn write(&mut self, frame: Bytes) {
        match &mut self.writer {
            Some(w) if !self.broken => w.write(frame),
            _ => self.unwritten += 1,
        }
    }

    /// The channel failed (`what`): nothing more can reach the app. A
    /// process that exits closes its channel too, a moment before its exit is
    /// seen, so only one still running after [`CHANNEL_GRACE`] is killed (its
    /// scopes' events then go to new instances).
    fn channel_broken(&mut self, what: String, ctx: &mut Context<Self>) {
        if self.broken {
            return;
        }
        self.broken = true;
        log::debug!("worker={} pid={} {what}", self.index, self.pid);
        ctx.run_later(CHANNEL_GRACE, move |act, _| {
            if act.status.is_none() && !act.stopping {
                log::error!(
                    "worker={} pid={} {what} and is still running; killing it",
                    act.index,
                    act.pid
                );
                act.kill("broke its channel");
            }
        });
    }

    /// What the exit means for the updates in hand.
    fn death(&self, status: Option<ExitStatus>) -> Death {
        use std::os::unix::process::ExitStatusExt;
        if self.killed.is_some() {
            return Death::App;
        }
        if self.stopping {
            return Death::Asked;
        }
        match status.and_then(|s| s.signal()) {
            Some(libc::SIGKILL | libc::SIGTERM | libc::SIGINT | libc::SIGHUP | libc::SIGQUIT) => {
                Death::Outside
            }
            _ => Death::App,
        }
    }

    fn handle_frame(&mut self, frame: FromWorker, ctx: &mut Context<Self>) {
        match frame {
            FromWorker::Send {
                sid: LIFESPAN_SID,
                event,
            } => self.lifespan_call(Outgoing::parse(&event.0), ctx),
            FromWorker::Received { sid, seq } => {
                self.route(sid, InstanceMsg::Received { sid, seq })
            }
            FromWorker::Idle { sid } => self.route(sid, InstanceMsg::Idle { sid }),
            FromWorker::Send { sid, event } => self.route(
                sid,
                InstanceMsg::Send {
                    sid,
                    event: Outgoing::parse(&event.0),
                },
            ),
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

    /// The lifespan scope sent a call. Nothing would bring it back after a
    /// crash (it has no cause), so the Outbox sends it once it is stored,
    /// in order with every other call; the Sender may pause this worker for
    /// it like for any instance's.
    fn lifespan_call(&mut self, event: Result<Outgoing, OutgoingError>, ctx: &mut Context<Self>) {
        let download = matches!(event, Ok(Outgoing::Download { .. }));
        let (method, params, request_id) = match event {
            Ok(out) => out.into_call(),
            Err(e) => {
                log::warn!(
                    "worker={} pid={} lifespan: {e}; skipped",
                    self.index,
                    self.pid
                );
                return;
            }
        };
        let reply = request_id.map(|request_id| ReplyTo {
            to: ctx.address().recipient(),
            request_id,
            sid: LIFESPAN_SID,
        });
        let Some(outbox) = &self.outbox else {
            log::info!(
                "worker={} pid={} lifespan call method={method} not made: --check makes no Bot API calls",
                self.index,
                self.pid
            );
            if let Some(reply) = reply {
                ctx.notify(CallDone {
                    sid: reply.sid,
                    request_id: reply.request_id,
                    outcome: Outcome::refused("not made: asgigramd --check makes no Bot API calls"),
                });
            }
            return;
        };
        let call = Call::new(method, params, reply).from_worker(ctx.address());
        outbox.call(if download { call.as_download() } else { call });
    }

    fn kill(&mut self, why: &'static str) {
        if self.status.is_some() || self.pid == 0 {
            return;
        }
        self.killed.get_or_insert(why);
        // The whole process group: the worker and whatever the app forked.
        // SAFETY: killpg(2) on the group of the child this actor started (its
        // pid, see spawn_worker). The id stays ours while the child is not
        // reaped, and once it is, `status` is set before any further kill.
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
            self.kill("hung");
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
    }
}

impl Worker {
    /// A worker stuck importing the app (or in lifespan startup) would
    /// otherwise hold a restart or a reload forever; its exit is then
    /// handled like any failure to start. Armed once the bot is given: the
    /// lifespan scope cannot start before, and getMe may take long while
    /// Telegram is unreachable.
    fn arm_startup_timeout(&mut self, ctx: &mut Context<Self>) {
        ctx.run_later(self.app.startup_timeout, |act, _| {
            if !act.was_ready && act.fatal.is_none() {
                log::error!(
                    "worker={} pid={} not ready within {}s (app.startup_timeout); killing it",
                    act.index,
                    act.pid,
                    act.app.startup_timeout.as_secs()
                );
                act.kill("not ready in time");
            }
        });
    }
}

/// Logs each line a worker prints, prefixed with its pid. A line longer than
/// [`MAX_LINE`] is logged cut, saying how much was left out.
async fn forward_lines(stream: impl AsyncRead + Unpin, pid: u32, name: &'static str) {
    let mut reader = BufReader::new(stream);
    let mut lines = LineCutter::default();
    loop {
        let chunk = match reader.fill_buf().await {
            Ok([]) | Err(_) => break,
            Ok(chunk) => chunk,
        };
        let used = chunk.len();
        lines.feed(chunk, |line| log_line(pid, name, line));
        reader.consume(used);
    }
    lines.finish(|line| log_line(pid, name, line));
}

fn log_line(pid: u32, name: &str, line: Line<'_>) {
    let text = String::from_utf8_lossy(line.text);
    let text = text.trim_end();
    if line.cut > 0 {
        log::info!(target: "asgigramd::app", "[worker {pid} {name}] {text} [line cut at {MAX_LINE} bytes; {} more byte(s) not logged]", line.cut);
    } else {
        log::info!(target: "asgigramd::app", "[worker {pid} {name}] {text}");
    }
}

/// One line of output, as logged: its first [`MAX_LINE`] bytes and how many
/// bytes after them were dropped.
pub struct Line<'a> {
    pub text: &'a [u8],
    pub cut: u64,
}

/// Splits a byte stream into lines of at most [`MAX_LINE`] bytes kept.
#[derive(Default)]
pub struct LineCutter {
    kept: Vec<u8>,
    cut: u64,
}

impl LineCutter {
    pub fn feed(&mut self, mut bytes: &[u8], mut emit: impl FnMut(Line<'_>)) {
        while !bytes.is_empty() {
            let end = bytes.iter().position(|&b| b == b'\n');
            let part = &bytes[..end.unwrap_or(bytes.len())];
            let room = MAX_LINE - self.kept.len();
            if part.len() > room {
                self.kept.extend_from_slice(&part[..room]);
                self.cut += (part.len() - room) as u64;
            } else {
                self.kept.extend_from_slice(part);
            }
            match end {
                Some(i) => {
                    emit(Line {
                        text: &self.kept,
                        cut: self.cut,
                    });
                    self.kept.clear();
                    self.cut = 0;
                    bytes = &bytes[i + 1..];
                }
                None => bytes = &[],
            }
        }
    }

    /// The stream ended: a last line without a newline is logged too.
    pub fn finish(&mut self, mut emit: impl FnMut(Line<'_>)) {
        if !self.kept.is_empty() || self.cut > 0 {
            emit(Line {
                text: &self.kept,
                cut: self.cut,
            });
        }
        self.kept = Vec::new();
        self.cut = 0;
    }
}

impl StreamHandler<Result<BytesMut, io::Error>> for Worker {
    fn handle(&mut self, item: Result<BytesMut, io::Error>, ctx: &mut Context<Self>) {
        match item {
            Ok(frame) => match FromWorker::decode(&frame) {
                Ok(frame) => self.handle_frame(frame, ctx),
                // Well framed but not a frame we know: the next one is fine.
                Err(e) => log::warn!("worker={} pid={} {e}; frame skipped", self.index, self.pid),
            },
            // A process that ends with frames of ours unread resets the
            // channel instead of closing it: its exit, seen a moment early,
            // and not the app's doing until its exit status says so.
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => {
                self.channel_broken(format!("reset its channel ({e})"), ctx);
            }
            // A framing error (a length over the limit, a read error) leaves
            // the stream out of step: nothing after it can be trusted. The
            // worker is replaced, and its scopes' events go to new instances.
            Err(e) => {
                log::error!(
                    "worker={} pid={} channel corrupted ({e}); killing the worker",
                    self.index,
                    self.pid
                );
                self.kill("corrupted its channel");
            }
        }
    }

    fn finished(&mut self, ctx: &mut Context<Self>) {
        // The worker's end of the channel closed: the process is exiting, or
        // the app closed fd 3 and lives on, unreachable.
        self.eof = true;
        if self.status.is_some() {
            return self.finish();
        }
        self.channel_broken("closed its channel (fd 3)".into(), ctx);
    }
}

impl actix::io::WriteHandler<io::Error> for Worker {
    fn error(&mut self, err: io::Error, ctx: &mut Context<Self>) -> Running {
        self.channel_broken(format!("channel write failed ({err})"), ctx);
        // Stop: the writer would otherwise retry the same bytes at once, an
        // error each time, for as long as the process lives.
        Running::Stop
    }

    fn finished(&mut self, _: &mut Context<Self>) {
        // The default stops the actor; it must live on until the process has
        // exited and the Supervisor released it.
    }
}

impl Handler<Attach> for Worker {
    type Result = ();
    fn handle(&mut self, msg: Attach, _: &mut Context<Self>) {
        if let Some(death) = self.exited {
            msg.to.do_send(InstanceMsg::WorkerLost {
                sid: msg.sid,
                death,
            });
            return;
        }
        self.instances.insert(msg.sid, msg.to);
        self.write(msg.start);
    }
}

impl Handler<GiveBot> for Worker {
    type Result = ();
    fn handle(&mut self, msg: GiveBot, ctx: &mut Context<Self>) {
        if self.bot_given {
            return;
        }
        self.bot_given = true;
        self.write(msg.0);
        self.arm_startup_timeout(ctx);
    }
}

impl Handler<CallDone> for Worker {
    type Result = ();
    fn handle(&mut self, msg: CallDone, _: &mut Context<Self>) {
        let event = msg.outcome.into_event(msg.request_id);
        self.write(
            ToWorker::Response {
                sid: LIFESPAN_SID,
                event: &event,
            }
            .encode(),
        );
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
        self.stopping = true;
        self.write(ToWorker::Shutdown { grace: msg.grace }.encode());
    }
}

impl Handler<ProcessExited> for Worker {
    type Result = ();
    fn handle(&mut self, msg: ProcessExited, ctx: &mut Context<Self>) {
        if self.pid != 0 {
            // What the app forked is still in the worker's process group and
            // would outlive it (and hold its channel open). The kernel keeps a
            // group's id from being reused while any member lives; with none
            // left, the id would have had to come round again in the moment
            // since the reap.
            // SAFETY: killpg(2) on the group spawn_worker made for this
            // worker; never 0, which would be the daemon's own group.
            unsafe {
                libc::killpg(self.pid as i32, libc::SIGKILL);
            }
        }
        self.status = Some(msg.0);
        if self.eof {
            return self.finish();
        }
        // Frames the worker wrote before it died may still be unread: the
        // last ack says which event an instance was on. They are read up to
        // the channel's end, unless something else holds it open.
        ctx.run_later(CHANNEL_GRACE, |act, _| act.finish());
    }
}

impl Worker {
    /// The process has exited and its frames are read: tell the instances
    /// and the Supervisor, once.
    fn finish(&mut self) {
        let Some(status) = self.status else {
            return;
        };
        if self.exited.is_some() {
            return;
        }
        let death = self.death(status);
        self.exited = Some(death);
        match (self.fatal.take(), self.was_ready) {
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
        if self.unwritten > 0 {
            log::debug!(
                "worker={} pid={} {} frame(s) not written: its channel was closed",
                self.index,
                self.pid,
                self.unwritten
            );
        }
        let instances = self.instances.len();
        for (sid, to) in self.instances.drain() {
            to.do_send(InstanceMsg::WorkerLost { sid, death });
        }
        self.supervisor.do_send(WorkerEvent::Exited {
            index: self.index,
            pid: self.pid,
            status,
            death,
            instances,
        });
        self.writer = None;
    }
}

impl Handler<Release> for Worker {
    type Result = ();
    fn handle(&mut self, _: Release, ctx: &mut Context<Self>) {
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
