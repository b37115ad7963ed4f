//! asgigramd: an ASGI server for Telegram bots.
//!
//! It long-polls the Bot API, gives every chat (or user) its own instance of a
//! Python ASGI application running in a worker process, feeds the instance the
//! chat's updates through `receive()`, and carries what it `send()`s back to
//! Telegram through one Sender.
//!
//! # Layout, in reading order
//!
//! - [`settings`]: typed settings in layers (defaults, file, environment); the
//!   token redacts itself.
//! - [`telegram`]: the Bot API boundary: updates, the client and its errors,
//!   uploads, downloads, the method tables, and Telegram's flood limits as data with the
//!   pure pacer the Sender uses.
//! - [`routing`]: which scope an update goes to; one pure function.
//! - [`bridge`]: the worker channel protocol and starting a worker process.
//! - [`journal`]: the durable store: updates (and pushed events) until
//!   handled, calls until sent.
//! - [`push`]: what other programs may send over the HTTP endpoint (events
//!   into a chat, Bot API calls), checked before anything is stored.
//! - [`actors`]: the daemon itself, one file (or folder) per actor, in the
//!   order an update meets them: Poller (or, in webhook mode, the webhook
//!   Receiver), Supervisor, ScopeActor, Worker, Outbox, Sender. Each opens
//!   with its contract: what it owns, takes, sends, and when it stops.
//!   [`actors::intake`] is what the Poller and the Receiver share;
//!   [`actors::call`] is the call the Outbox and the Sender carry, and its
//!   outcome. [`actors::ingress`] takes what other programs send over the
//!   HTTP endpoint into the daemon.
//! - [`ops`]: what an operator steers and watches it with: `/healthz`,
//!   `/readyz`, `/metrics`, the metrics registry, logging (secrets masked),
//!   SIGHUP reload; and the endpoint's routes for other programs
//!   (`/v1/...`, behind `http.api_token`).
//! - [`sandbox`]: a local Bot API emulator for trying and testing bots.
//! - [`chat`]: `--sandbox` and `--sandbox-web`: the terminal, or a web
//!   page, as a chat with the bot on the sandbox.
//! - [`backoff`]: the retry delays the Poller, the Outbox and the Sender share.
//!
//! # Message flow
//!
//! ```text
//!  Bot API ──getUpdates──▶ Poller ──Dispatch──────▶ Supervisor (scope table, worker pool,
//!                            │   ◀──Backpressure──       reload, suspects in isolation)
//!                            └══Append══▶ journal thread (offset confirmed once stored)
//!  Bot API ──POST──▶ webhook Receiver: the same Append (200 once stored), then Dispatch
//!                                                  │ spawns / reaps
//!                                                  ▼
//!                      ScopeActor (chat:123) ──Attach/Write──▶ Worker ══fd 3══▶ python worker
//!                      ScopeActor (user:456) ◀──InstanceMsg───   │              (bridge + instances)
//!                           │ app's send() (Call), finished updates (Done)
//!                           ▼                                     └─ stdout/stderr lines ─▶ log
//!                         Outbox ══Record══▶ journal thread (calls, answers, handled: one transaction)
//!                           │ ▲
//!       Call (with its row) │ │ Sent (row, cause, Outcome)
//!   Recorded (rows written) │ │
//!                           ▼ │
//!  Bot API ◀──sendMessage── Sender (limits, per-chat order, retries) ──CallDone (Outcome)──▶ ScopeActor
//!                             └── pause / resume (backpressure) ──▶ Worker
//! ```
//!
//! A `telegram.download` takes the same one-way path: its getFile passes the
//! Outbox unstored (it only reads), and the Sender fetches the file with the
//! token before its `CallDone` carries File and content to the scope.
//!
//! Other programs reach the same path over the HTTP endpoint: the Ingress
//! hands a pushed event to the Supervisor as [`actors::supervisor::Push`]
//! (it goes where a Dispatch would) and then to the journal thread
//! (`StorePushed`), and a Bot API call to the Outbox as an app's call.
//!
//! A chat's next stored call waits until the journal has the answer to its
//! previous one (`Recorded`, by outbox row), so that a crash leaves at most
//! one call per chat whose fate the journal does not know.
//! The call and its [`actors::call::Outcome`] keep one form from the scope
//! to the Sender and back; only the journal and the app's event encode them.
//! A worker's lifespan scope makes calls too, from outside any chat: its
//! Worker sends them to the Outbox with no cause and takes their
//! `CallDone` back to the lifespan.
//!
//! Every actor runs on one thread, the actix `System` that [`run`] is driven
//! by; the [`journal`]'s SQLite calls run on one `SyncArbiter` thread, off
//! the path from an update to its reply.

pub mod actors;
pub mod backoff;
pub mod bridge;
pub mod chat;
pub mod cluster;
pub mod journal;
pub mod ops;
pub mod push;
pub mod routing;
pub mod sandbox;
pub mod settings;
pub mod telegram;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde_json::{json, Value};
use tokio::sync::{oneshot, Notify};

use actors::ingress::{Ingress, Open};
use actors::outbox::{Flush, Outbox, OutboxLink, Recover};
use actors::poller::Delivery;
use actors::poller::{Poller, Start, StopPolling};
use actors::sender::{Drained, Sender};
use actors::supervisor::{
    CloseAll, Dispatch, Push, SetBot, StartupError, StopWorkers, Supervisor, WaitReady,
};
use journal::{Journal, JournalActor};
use settings::Settings;
use telegram::{Bot, TelegramError};

/// Why the daemon stopped with an error. Only `main` turns it into an exit
/// code; every variant ends the process.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The workers cannot run the app: fix the app or its settings.
    #[error("the application could not start: {0}")]
    Startup(#[from] StartupError),
    /// The workers did not report ready within `app.startup_timeout`.
    #[error("the application could not start: the workers were not ready within {}s (app.startup_timeout)", .0.as_secs())]
    StartupTimeout(Duration),
    /// The Supervisor dropped the answer to `WaitReady` unanswered.
    #[error("the application could not start: the supervisor stopped")]
    SupervisorStopped,
    /// The Supervisor's mailbox was closed.
    #[error("supervisor: {0}")]
    Supervisor(#[from] MailboxError),
    #[error("the token was rejected by Telegram (401 Unauthorized)")]
    TokenRejected,
    /// Another Telegram error that stopped polling.
    #[error(transparent)]
    Polling(#[from] TelegramError),
    /// The journal cannot be opened, or is damaged
    /// ([`journal::JournalError::Damaged`]).
    #[error(transparent)]
    Journal(#[from] journal::JournalError),
    /// `http.bind` cannot be listened on (in use, not allowed).
    #[error("http.bind: cannot listen on {addr}: {source}")]
    Listen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The endpoint cannot be served on the bound socket.
    #[error("http.bind: cannot serve on {addr}: {source}")]
    Serve {
        addr: String,
        source: std::io::Error,
    },
    /// A signal handler cannot be installed (`signal` is its name).
    #[error("installing the {signal} handler: {source}")]
    Signal {
        signal: &'static str,
        source: std::io::Error,
    },
    /// `webhook.listen` cannot be listened on (in use, not allowed).
    #[error("webhook.listen: cannot listen on {addr}: {source}")]
    WebhookListen {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// The webhook receiver cannot serve (the socket, the TLS files).
    #[error(transparent)]
    WebhookServe(#[from] actors::webhook::ServeError),
    /// Webhook mode could not be set up with Telegram.
    #[error(transparent)]
    WebhookRegister(#[from] actors::webhook::RegisterError),
    /// `--sandbox`: the local Bot API emulator cannot start.
    #[error("starting the sandbox: {0}")]
    Sandbox(std::io::Error),
    /// `--sandbox-web`: the web chat cannot listen on its address.
    #[error("--sandbox-web: cannot listen on {addr}: {source}")]
    WebChat {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    /// A second SIGTERM or SIGINT after the first: stop at once, without
    /// waiting for what is still shutting down. The log has said so.
    #[error("interrupted by a second signal")]
    Interrupted,
    /// Cluster mode: the engine cannot be reached or refused what the
    /// node asked for at start, or the ingress stopped for good.
    #[error("cluster: {0}")]
    Cluster(#[from] cluster::ClusterError),
}

/// What the journal held at start.
struct Recovery {
    /// Updates and pushed events not handled, in the order they came.
    updates: Vec<Replayed>,
    /// The highest update_id it ever stored.
    watermark: Option<i64>,
    /// The id the next pushed event gets.
    next_pushed: i64,
    /// A webhook delivered updates lately (journal rule 11), and how far
    /// polling stored (rule 12).
    webhook_seen: bool,
    polled: Option<i64>,
    outbox: journal::Recovered,
}

/// One thing the journal gives back to deliver again.
enum Replayed {
    Update(telegram::Update),
    Pushed(push::PushedEvent),
}

/// Sends what the journal gave back to the Supervisor in its order: runs
/// of updates as one `Dispatch` each, pushed events between them.
fn replay(supervisor: &Addr<Supervisor>, replayed: Vec<Replayed>) {
    let mut run = Vec::new();
    for item in replayed {
        match item {
            Replayed::Update(update) => run.push(update),
            Replayed::Pushed(event) => {
                if !run.is_empty() {
                    supervisor.do_send(Dispatch(std::mem::take(&mut run)));
                }
                supervisor.do_send(Push {
                    event,
                    placed: None,
                });
            }
        }
    }
    if !run.is_empty() {
        supervisor.do_send(Dispatch(run));
    }
}

/// Opens this bot's journal and starts its thread.
fn start_journal(settings: &Settings) -> Result<(Addr<JournalActor>, Recovery), RunError> {
    let dir = settings.journal.resolved_dir();
    let name = journal_name(settings);
    let fail = RunError::Journal;
    let mut journal = Journal::open(&dir, &name).map_err(fail)?;
    if !settings.journal.fsync {
        journal.set_fsync(false).map_err(fail)?;
    }
    let outbox = journal.recover().map_err(fail)?;
    let watermark = journal.watermark();
    let next_pushed = journal.next_pushed_id().map_err(fail)?;
    let webhook_seen = journal.webhook_seen().map_err(fail)?;
    let polled = journal.polled().map_err(fail)?;
    let mut pending = Vec::new();
    for (id, body) in journal.pending().map_err(fail)? {
        let read = if id < 0 {
            push::PushedEvent::decode(id, &body).map(Replayed::Pushed)
        } else {
            telegram::Update::from_json(&body)
                .map_err(|skipped| skipped.error.to_string())
                .map(Replayed::Update)
        };
        match read {
            Ok(item) => pending.push(item),
            Err(e) => log::error!("journal: update={id} cannot be read back ({e}); skipped"),
        }
    }
    log::info!(
        "journal: {} ({} undelivered update(s), {} unsent call(s))",
        dir.display(),
        pending.len(),
        outbox.resend.len()
    );
    ops::metrics::metrics()
        .journal_entries
        .set_count(pending.len());
    let journal = Arc::new(std::sync::Mutex::new(journal));
    let thread = SyncArbiter::start(1, move || {
        journal::yield_to_latency();
        JournalActor(journal.clone())
    });
    let recovery = Recovery {
        updates: pending,
        watermark,
        next_pushed,
        webhook_seen,
        polled,
        outbox,
    };
    Ok((thread, recovery))
}

/// `--reset-journal`: moves this bot's journal aside if it is damaged, so
/// that [`run`] starts with an empty one; one line says where its files went.
/// An intact journal is kept.
pub fn reset_damaged_journal(settings: &Settings) -> Result<(), RunError> {
    let dir = settings.journal.resolved_dir();
    match journal::reset_if_damaged(&dir, &journal_name(settings))? {
        Some(reset) => {
            let moved: Vec<String> = reset
                .moved
                .iter()
                .map(|(from, to)| format!("{} -> {}", from.display(), to.display()))
                .collect();
            log::warn!(
                "journal: --reset-journal: the damaged journal ({}) was moved aside: {}; \
                 starting with an empty journal",
                reset.what,
                moved.join(", ")
            );
        }
        None => log::info!(
            "journal: --reset-journal: no damaged journal in {}; nothing moved",
            dir.display()
        ),
    }
    Ok(())
}

/// The Sender and the Outbox in front of it; the Outbox tells the Sender
/// where to report outcomes as it starts.
fn start_sending(
    bot: Bot,
    settings: &Settings,
    journal: Option<Addr<JournalActor>>,
) -> (Addr<Sender>, Addr<Outbox>) {
    let sender = Sender::new(bot, settings.sender.clone()).start();
    let outbox = Outbox::new(journal, sender.clone()).start();
    (sender, outbox)
}

/// One journal per bot and Bot API server: `<bot id>@<host>`. The bot id is
/// the public part of the token (getMe shows it too).
fn journal_name(settings: &Settings) -> String {
    let bot_id = settings
        .telegram
        .token
        .expose()
        .split(':')
        .next()
        .unwrap_or("bot");
    let host = settings
        .telegram
        .api_url
        .split("://")
        .nth(1)
        .unwrap_or("")
        .split('/')
        .next()
        .unwrap_or("");
    format!("{bot_id}@{host}")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "@.-".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Runs the daemon until a signal (or `stop`) asks it to stop.
/// Must be awaited inside an actix `System`.
pub async fn run(settings: Settings, stop: Option<Arc<Notify>>) -> Result<(), RunError> {
    for secret in settings.secrets() {
        ops::logging::register_secret(secret);
    }
    if let Some(cluster) = settings.cluster.clone() {
        return cluster::node::run(settings, cluster, stop).await;
    }
    let bot = Bot::new(
        &settings.telegram.api_url,
        &settings.telegram.token,
        settings.telegram.http_timeout,
    );
    log::info!(
        "asgigramd {} starting: app={} workers={} python={}",
        env!("CARGO_PKG_VERSION"),
        settings.app.application,
        settings.app.workers,
        settings.app.python
    );
    // First: a port in use stops the daemon before anything else runs.
    let listener = ops::http::bind(&settings)?;
    let webhook_listener = match &settings.webhook {
        Some(hook) => {
            Some(
                actors::webhook::bind(hook).map_err(|source| RunError::WebhookListen {
                    addr: hook.listen,
                    source,
                })?,
            )
        }
        None => None,
    };
    let (journal, recovery) = start_journal(&settings)?;
    let Recovery {
        updates: replayed,
        watermark,
        next_pushed,
        webhook_seen,
        polled,
        outbox: unsent,
    } = recovery;
    let (sender, outbox) = start_sending(bot.clone(), &settings, Some(journal.clone()));
    // First in the Outbox's mailbox: repeats of calls made before the
    // restart must be known before any app runs.
    outbox.do_send(Recover(unsent));
    let supervisor = Supervisor::new(settings.clone(), OutboxLink::to(&outbox)).start();
    // Only where a program can reach it: an endpoint, and a token to open it.
    let ingress = settings
        .http
        .api_token
        .clone()
        .filter(|_| listener.is_some())
        .map(|token| {
            let ingress = Ingress::new(
                journal.clone(),
                supervisor.clone(),
                outbox.clone(),
                next_pushed,
            )
            .start();
            (ops::api::Api::new(token, &ingress), ingress)
        });
    let shutdown = ShutdownSignal::install(stop)?;
    // A second signal ends what follows wherever it is, startup included.
    let serve = async {
        let _operations = ops::http::start_operations(
            listener,
            &settings,
            &supervisor,
            ingress.as_ref().map(|(api, _)| api.clone()),
        )?;

        let Some(name) = start_apps(&settings, &supervisor, &bot, &shutdown).await? else {
            return Ok(());
        };
        if !replayed.is_empty() {
            log::info!(
                "Delivering {} update(s) left in the journal",
                replayed.len()
            );
            replay(&supervisor, replayed);
        }
        // Behind the leftovers, so that a new event comes after them.
        if let Some((_, ingress)) = &ingress {
            ingress.do_send(Open);
        }
        let fatal: Rc<RefCell<Option<TelegramError>>> = Rc::default();
        let fatal_notify = Rc::new(Notify::new());
        let delivery = Delivery {
            supervisor: supervisor.clone(),
            journal: Some(journal),
            max_undelivered: settings.journal.max_undelivered,
        };
        let intake = match (&settings.webhook, webhook_listener) {
            (Some(hook), Some(listener)) => {
                // Listening before setWebhook: Telegram delivers at once.
                ops::metrics::metrics().set_webhook_health(ops::metrics::WebhookHealth::NotSet);
                let receiver = actors::webhook::Receiver::new(delivery).start();
                let server = actors::webhook::serve(listener, hook, receiver)?;
                let registered = tokio::select! {
                    r = actors::webhook::register(&bot, hook, &settings.telegram.allowed_updates) => Some(r),
                    _ = shutdown.wait() => None,
                };
                if !matches!(registered, Some(Ok(()))) {
                    server.stop(false).await;
                    stop_workers(
                        &supervisor,
                        Duration::ZERO,
                        settings.shutdown.worker_timeout,
                    )
                    .await;
                    return match registered {
                        Some(Err(actors::webhook::RegisterError::TokenRejected)) => {
                            Err(RunError::TokenRejected)
                        }
                        Some(Err(e)) => Err(e.into()),
                        _ => Ok(()),
                    };
                }
                let (fatal, notify) = (fatal.clone(), fatal_notify.clone());
                actors::webhook::watch_info(
                    bot.clone(),
                    Box::new(move |e| {
                        *fatal.borrow_mut() = Some(e);
                        notify.notify_one();
                    }),
                );
                log::info!("Receiving updates by webhook as @{name}");
                Intake::Webhook(server)
            }
            _ => {
                if settings.telegram.delete_webhook {
                    match bot.request("deleteWebhook", &json!({})).await {
                        Ok(_) => log::info!("webhook deleted (telegram.delete_webhook)"),
                        Err(e) => log::warn!("deleteWebhook failed: {e}"),
                    }
                }
                let (fatal, notify) = (fatal.clone(), fatal_notify.clone());
                let poller = Poller::new(
                    bot.clone(),
                    delivery,
                    &settings.telegram,
                    Start {
                        watermark,
                        after_webhook: webhook_seen,
                        polled,
                    },
                    Box::new(move |e| {
                        *fatal.borrow_mut() = Some(e);
                        notify.notify_one();
                    }),
                )
                .start();
                log::info!("Polling Telegram as @{name}");
                Intake::Poller(poller)
            }
        };

        tokio::select! {
            _ = shutdown.wait() => {}
            _ = fatal_notify.notified() => {}
        }
        log::info!("Shutting down");
        ops::metrics::metrics().set_shutting_down();
        // Shutdown, in phases (each bounded): stop polling; confirm what the
        // journal holds, so Telegram does not send it again; disconnect every
        // scope (what an app did not receive stays in the journal for the next
        // start); record what the apps finished; let the Sender send what they
        // sent; record what it sent; end the workers (lifespan shutdown).
        match intake {
            Intake::Poller(poller) => {
                // Waits for an append under way (the Poller's rule 9); a
                // journal stuck longer leaves the batch unconfirmed, for
                // Telegram to send again.
                let drain = settings.shutdown.drain_timeout;
                let offset = match tokio::time::timeout(drain, poller.send(StopPolling)).await {
                    Ok(answer) => answer.ok().flatten(),
                    Err(_) => {
                        log::warn!(
                            "journal: the last batch was not stored within {:.1}s (shutdown.drain_timeout); it stays unconfirmed and comes again at the next start",
                            drain.as_secs_f64()
                        );
                        None
                    }
                };
                if let Some(offset) = offset.filter(|_| fatal.borrow().is_none()) {
                    confirm_offset(&bot, offset).await;
                }
            }
            // The webhook stays set: Telegram keeps what comes meanwhile for
            // the next start. Requests under way finish (their updates are
            // stored or refused); later ones are not accepted.
            Intake::Webhook(server) => server.stop(true).await,
        }
        let grace = settings.scopes.disconnect_grace;
        close_scopes(&supervisor, grace).await;
        let _ = outbox.send(Flush).await;
        let drain = settings.shutdown.drain_timeout;
        if tokio::time::timeout(drain, sender.send(Drained))
            .await
            .is_err()
        {
            log::warn!(
            "the Sender did not drain within {:.1}s (shutdown.drain_timeout); unsent calls dropped",
            drain.as_secs_f64()
        );
        }
        // What the Sender got answered is marked sent; what it dropped stays in
        // the outbox for the next start.
        let _ = outbox.send(Flush).await;
        stop_workers(&supervisor, grace, settings.shutdown.worker_timeout).await;
        let result = match fatal.borrow_mut().take() {
            Some(TelegramError::Unauthorized) => Err(RunError::TokenRejected),
            Some(e) => Err(RunError::Polling(e)),
            None => Ok(()),
        };
        log::info!("Finished.");
        result
    };
    tokio::select! {
        result = serve => result,
        () = shutdown.forced() => Err(RunError::Interrupted),
    }
}

/// Starts the apps: getMe runs while the workers import the app, then
/// readiness is awaited within `app.startup_timeout`. Returns the bot's
/// username, or `None` when a signal came first; on an error or a signal
/// the workers are told to stop.
pub(crate) async fn start_apps(
    settings: &Settings,
    supervisor: &Addr<Supervisor>,
    bot: &Bot,
    shutdown: &ShutdownSignal,
) -> Result<Option<String>, RunError> {
    log::info!("Waiting for application startup.");
    // getMe runs while the workers import the app: their lifespan scope
    // starts once it has the bot, and an app that cannot be imported
    // stops the daemon without waiting for Telegram.
    let mut startup = Startup(Some(supervisor.send(WaitReady).await?));
    let me = tokio::select! {
        me = get_me(bot) => me,
        e = startup.failed() => {
            // As when readiness failed after getMe: the workers are
            // told to stop, and the error is shown at once.
            supervisor.do_send(StopWorkers {
                grace: Duration::ZERO,
            });
            return Err(e);
        }
        _ = shutdown.wait() => {
            stop_workers(supervisor, Duration::ZERO, settings.shutdown.worker_timeout).await;
            return Ok(None);
        }
    };
    let me = match me {
        Ok(me) => me,
        Err(e) => {
            stop_workers(supervisor, Duration::ZERO, settings.shutdown.worker_timeout).await;
            return Err(e);
        }
    };
    let name = me
        .get("username")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    supervisor.do_send(SetBot(me));
    startup
        .ready(settings.app.startup_timeout)
        .await
        .inspect_err(|_| {
            supervisor.do_send(StopWorkers {
                grace: Duration::ZERO,
            });
        })?;
    log::info!("Application startup complete.");
    Ok(Some(name))
}

/// How updates come in: polled, or pushed to the webhook receiver.
enum Intake {
    Poller(Addr<Poller>),
    Webhook(actix_web::dev::ServerHandle),
}

/// Loads the app in one worker and stops it again: `--check`.
pub async fn check(mut settings: Settings) -> Result<(), RunError> {
    settings.app.workers = 1;
    let bot = Bot::new(
        &settings.telegram.api_url,
        &settings.telegram.token,
        settings.telegram.http_timeout,
    );
    let (_, outbox) = start_sending(bot, &settings, None);
    let supervisor = Supervisor::new(settings.clone(), OutboxLink::to(&outbox))
        .without_lifespan_calls()
        .start();
    // No getMe: the check needs no Telegram, and its lifespan scope no bot.
    supervisor.do_send(SetBot(Value::Null));
    let ready = wait_ready(&supervisor, settings.app.startup_timeout).await;
    stop_workers(
        &supervisor,
        Duration::ZERO,
        settings.shutdown.worker_timeout,
    )
    .await;
    ready
}

async fn wait_ready(supervisor: &Addr<Supervisor>, timeout: Duration) -> Result<(), RunError> {
    Startup(Some(supervisor.send(WaitReady).await?))
        .ready(timeout)
        .await
}

/// The answer to [`WaitReady`], waited for in two steps: while getMe runs,
/// only a failure counts; then readiness, within `app.startup_timeout`
/// (the workers cannot finish before they have the bot).
struct Startup(Option<oneshot::Receiver<Result<(), StartupError>>>);

impl Startup {
    /// Resolves only if the workers cannot start; readiness is kept for
    /// [`Startup::ready`].
    async fn failed(&mut self) -> RunError {
        if let Some(rx) = &mut self.0 {
            match rx.await {
                Ok(Ok(())) => self.0 = None,
                Ok(Err(e)) => return e.into(),
                Err(_) => return RunError::SupervisorStopped,
            }
        }
        std::future::pending().await
    }

    async fn ready(self, timeout: Duration) -> Result<(), RunError> {
        let Some(rx) = self.0 else {
            return Ok(());
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(ready)) => Ok(ready?),
            Ok(Err(_)) => Err(RunError::SupervisorStopped),
            Err(_) => Err(RunError::StartupTimeout(timeout)),
        }
    }
}

/// Disconnects every scope, each instance given `grace` to end.
pub(crate) async fn close_scopes(supervisor: &Addr<Supervisor>, grace: Duration) {
    match supervisor.send(CloseAll).await {
        Ok(rx) => {
            if tokio::time::timeout(grace + Duration::from_secs(2), rx)
                .await
                .is_err()
            {
                log::warn!("some scopes did not end within the grace period");
            }
        }
        Err(e) => log::warn!("closing scopes: {e}"),
    }
}

/// Ends the workers: instances get `grace` seconds, the processes
/// `deadline` more to run lifespan shutdown and exit.
pub(crate) async fn stop_workers(
    supervisor: &Addr<Supervisor>,
    grace: Duration,
    deadline: Duration,
) {
    if let Ok(rx) = supervisor.send(StopWorkers { grace }).await {
        if tokio::time::timeout(grace + deadline, rx).await.is_err() {
            log::warn!("workers did not exit within the deadline; killing them");
        }
    }
}

/// getMe, retried with backoff until it answers; 401 is final.
async fn get_me(bot: &Bot) -> Result<Value, RunError> {
    let backoff = backoff::Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut failures = 0;
    loop {
        match bot.request("getMe", &json!({})).await {
            Ok(me) => return Ok(me),
            Err(TelegramError::Unauthorized) => return Err(RunError::TokenRejected),
            Err(e) => {
                let delay = backoff.delay(failures);
                log::warn!("getMe failed: {e}; retrying in {:.1}s", delay.as_secs_f64());
                failures += 1;
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// One last getUpdates with timeout 0 confirms what was handled, so Telegram
/// does not send it again after a restart.
async fn confirm_offset(bot: &Bot, offset: i64) {
    let params = json!({"offset": offset, "timeout": 0, "limit": 1});
    match bot.call("getUpdates", &params, bot.http_timeout()).await {
        Ok(_) => log::debug!("offset {offset} confirmed"),
        Err(e) => log::warn!("could not confirm offset {offset}: {e}"),
    }
}

/// SIGTERM, SIGINT, or a programmatic stop. A second signal makes
/// [`ShutdownSignal::forced`] resolve, and `run` returns at once.
pub(crate) struct ShutdownSignal {
    notify: Arc<Notify>,
    forced: Rc<Notify>,
}

impl ShutdownSignal {
    pub(crate) fn install(stop: Option<Arc<Notify>>) -> Result<ShutdownSignal, RunError> {
        use tokio::signal::unix::SignalKind;
        let notify = stop.unwrap_or_default();
        let handler = |signal: &'static str, kind: SignalKind| {
            tokio::signal::unix::signal(kind).map_err(|source| RunError::Signal { signal, source })
        };
        let mut term = handler("SIGTERM", SignalKind::terminate())?;
        let mut int = handler("SIGINT", SignalKind::interrupt())?;
        let forced = Rc::new(Notify::new());
        let (n, f) = (notify.clone(), forced.clone());
        actix::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            log::info!("signal received; shutting down (a second signal forces exit)");
            n.notify_one();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            log::warn!("second signal: exiting now");
            f.notify_one();
        });
        Ok(ShutdownSignal { notify, forced })
    }

    pub(crate) async fn wait(&self) {
        self.notify.notified().await
    }

    /// Resolves at the second signal.
    pub(crate) async fn forced(&self) {
        self.forced.notified().await
    }
}
