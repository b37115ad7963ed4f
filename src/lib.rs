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
//! - [`telegram`]: the Bot API boundary: updates, calls, the error envelope.
//! - [`limits`]: Telegram's flood limits as data and the pure pacer the Sender uses.
//! - [`routing`]: which scope an update goes to; one pure function.
//! - [`bridge`]: the worker channel protocol and starting a worker process.
//! - [`actors`]: the daemon itself, one file per actor.
//! - [`sandbox`]: a local Bot API emulator for trying and testing bots.
//! - [`chat`]: `--sandbox`: the terminal as a chat with the bot.
//!
//! # Message flow
//!
//! ```text
//!  Bot API ──getUpdates──▶ Poller ──Dispatch──▶ Supervisor
//!                                                  │ spawns / reaps
//!                                                  ▼
//!                      ScopeActor (chat:123) ──Attach/Write──▶ Worker ══fd 3══▶ python worker
//!                      ScopeActor (user:456) ◀──InstanceMsg───   │              (bridge + instances)
//!                           │ app's send()                        └─ stdout/stderr lines ─▶ log
//!                           ▼
//!  Bot API ◀──sendMessage── Sender (limits, per-chat order, retries) ──CallDone──▶ ScopeActor
//!                             └── pause / resume (backpressure) ──▶ Worker
//! ```
//!
//! Every actor runs on one thread, the actix `System` that [`run`] is driven by.

pub mod actors;
pub mod backoff;
pub mod bridge;
pub mod chat;
pub mod journal;
pub mod limits;
pub mod logging;
pub mod methods;
pub mod routing;
pub mod sandbox;
pub mod settings;
pub mod telegram;
pub mod upload;

use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use serde_json::{json, Value};
use tokio::sync::Notify;

use actors::poller::{Poller, StopPolling};
use actors::sender::{Drained, Sender};
use actors::supervisor::{CloseAll, SetBot, StopWorkers, Supervisor, WaitReady};
use settings::Settings;
use telegram::{Bot, TelegramError};

/// Why the daemon stopped with an error. Only `main` turns it into an exit code.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the application could not start: {0}")]
    Startup(String),
    #[error("the token was rejected by Telegram (401 Unauthorized)")]
    TokenRejected,
    #[error("{0}")]
    Other(String),
}

/// Deadlines of the shutdown phases.
const SENDER_DRAIN_DEADLINE: Duration = Duration::from_secs(10);
const WORKER_EXIT_DEADLINE: Duration = Duration::from_secs(15);

/// Runs the daemon until a signal (or `stop`) asks it to stop.
/// Must be awaited inside an actix `System`.
pub async fn run(settings: Settings, stop: Option<Arc<Notify>>) -> Result<(), RunError> {
    logging::register_secret(settings.telegram.token.expose());
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
    let sender = Sender::new(bot.clone(), settings.sender.clone()).start();
    let supervisor = Supervisor::new(settings.clone(), sender.clone()).start();
    let shutdown = ShutdownSignal::install(stop)?;

    log::info!("Waiting for application startup.");
    wait_ready(&supervisor, settings.app.startup_timeout)
        .await
        .inspect_err(|_| {
            supervisor.do_send(StopWorkers {
                grace: Duration::ZERO,
            });
        })?;
    log::info!("Application startup complete.");

    let me = tokio::select! {
        me = get_me(&bot) => me,
        _ = shutdown.wait() => {
            stop_workers(&supervisor, Duration::ZERO).await;
            return Ok(());
        }
    };
    let me = match me {
        Ok(me) => me,
        Err(e) => {
            stop_workers(&supervisor, Duration::ZERO).await;
            return Err(e);
        }
    };
    let name = me
        .get("username")
        .and_then(Value::as_str)
        .unwrap_or("?")
        .to_string();
    supervisor.do_send(SetBot(me));
    if settings.telegram.delete_webhook {
        match bot.request("deleteWebhook", &json!({})).await {
            Ok(_) => log::info!("webhook deleted (telegram.delete_webhook)"),
            Err(e) => log::warn!("deleteWebhook failed: {e}"),
        }
    }

    let fatal: Rc<RefCell<Option<TelegramError>>> = Rc::default();
    let fatal_notify = Rc::new(Notify::new());
    let poller = {
        let (fatal, notify) = (fatal.clone(), fatal_notify.clone());
        Poller::new(
            bot.clone(),
            supervisor.clone(),
            settings.telegram.poll_timeout,
            settings.telegram.poll_limit,
            settings.telegram.allowed_updates.clone(),
            Box::new(move |e| {
                *fatal.borrow_mut() = Some(e);
                notify.notify_one();
            }),
        )
        .start()
    };
    log::info!("Polling Telegram as @{name}");

    tokio::select! {
        _ = shutdown.wait() => {}
        _ = fatal_notify.notified() => {}
    }
    log::info!("Shutting down");
    let offset = poller.send(StopPolling).await.ok().flatten();
    let grace = settings.scopes.disconnect_grace;
    // Confirm only what every instance received: an update handed back
    // unreceived, or a scope that did not end in time, keeps the offset where
    // Telegram will send it again after a restart.
    let confirm = match supervisor.send(CloseAll).await {
        Ok(rx) => match tokio::time::timeout(grace + Duration::from_secs(2), rx).await {
            Ok(Ok(None)) => offset,
            Ok(Ok(Some(unreceived))) => offset.map(|o| o.min(unreceived)),
            _ => {
                log::warn!("some scopes did not end within the grace period");
                None
            }
        },
        Err(e) => {
            log::warn!("closing scopes: {e}");
            None
        }
    };
    if let Some(offset) = confirm.filter(|_| fatal.borrow().is_none()) {
        confirm_offset(&bot, offset).await;
    }
    if tokio::time::timeout(SENDER_DRAIN_DEADLINE, sender.send(Drained))
        .await
        .is_err()
    {
        log::warn!(
            "the Sender did not drain within {SENDER_DRAIN_DEADLINE:?}; unsent calls dropped"
        );
    }
    stop_workers(&supervisor, grace).await;
    let result = match fatal.borrow_mut().take() {
        Some(TelegramError::Unauthorized) => Err(RunError::TokenRejected),
        Some(e) => Err(RunError::Other(e.to_string())),
        None => Ok(()),
    };
    log::info!("Finished.");
    result
}

/// Loads the app in one worker and stops it again: `--check`.
pub async fn check(mut settings: Settings) -> Result<(), RunError> {
    settings.app.workers = 1;
    let bot = Bot::new(
        &settings.telegram.api_url,
        &settings.telegram.token,
        settings.telegram.http_timeout,
    );
    let sender = Sender::new(bot, settings.sender.clone()).start();
    let supervisor = Supervisor::new(settings.clone(), sender).start();
    let ready = wait_ready(&supervisor, settings.app.startup_timeout).await;
    stop_workers(&supervisor, Duration::ZERO).await;
    ready
}

async fn wait_ready(supervisor: &Addr<Supervisor>, timeout: Duration) -> Result<(), RunError> {
    let rx = supervisor
        .send(WaitReady)
        .await
        .map_err(|e| RunError::Other(format!("supervisor: {e}")))?;
    match tokio::time::timeout(timeout, rx).await {
        Ok(Ok(Ok(()))) => Ok(()),
        Ok(Ok(Err(e))) => Err(RunError::Startup(e)),
        Ok(Err(_)) => Err(RunError::Startup("the supervisor stopped".into())),
        Err(_) => Err(RunError::Startup(format!(
            "the workers were not ready within {}s (app.startup_timeout)",
            timeout.as_secs()
        ))),
    }
}

async fn stop_workers(supervisor: &Addr<Supervisor>, grace: Duration) {
    if let Ok(rx) = supervisor.send(StopWorkers { grace }).await {
        if tokio::time::timeout(grace + WORKER_EXIT_DEADLINE, rx)
            .await
            .is_err()
        {
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

/// SIGTERM, SIGINT, or a programmatic stop. A second signal exits at once.
struct ShutdownSignal {
    notify: Arc<Notify>,
}

impl ShutdownSignal {
    fn install(stop: Option<Arc<Notify>>) -> Result<ShutdownSignal, RunError> {
        use tokio::signal::unix::{signal, SignalKind};
        let notify = stop.unwrap_or_default();
        let mut term = signal(SignalKind::terminate())
            .map_err(|e| RunError::Other(format!("installing the SIGTERM handler: {e}")))?;
        let mut int = signal(SignalKind::interrupt())
            .map_err(|e| RunError::Other(format!("installing the SIGINT handler: {e}")))?;
        let n = notify.clone();
        actix::spawn(async move {
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            log::info!("signal received; shutting down (a second signal forces exit)");
            n.notify_one();
            tokio::select! { _ = term.recv() => {}, _ = int.recv() => {} }
            log::warn!("second signal: exiting now");
            std::process::exit(130);
        });
        Ok(ShutdownSignal { notify })
    }

    async fn wait(&self) {
        self.notify.notified().await
    }
}
