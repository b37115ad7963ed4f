//! Webhook receiver: in webhook mode Telegram POSTs each update to
//! asgigramd, which answers 200 once the update is in the journal.
//!
//! Owns: the updates being stored and the requests waiting for that, the
//! backpressure gate; its HTTP server (on `webhook.listen`) is started by
//! [`serve`] and runs on actix-web's thread, which only checks a request
//! and hands the update over as [`Push`].
//! Takes: [`Push`] (from the HTTP handler), [`Backpressure`] (from the
//! Supervisor).
//! Sends: [`WatchBackpressure`] to the Supervisor once, at start; each
//! stored batch as [`Append`] (`by_webhook`) to the journal, then its new updates
//! as [`Dispatch`] to the Supervisor.
//! Stops: with the System; the daemon stops the HTTP server first. Its
//! companion [`watch_info`] calls the daemon's fatal hook when Telegram
//! rejects the token (401).
//!
//! 1. A request is refused, counted and stored nowhere when: its path is
//!    not `webhook.url`'s (404); it is not a POST (405); its
//!    `X-Telegram-Bot-Api-Secret-Token` is not the secret, compared in
//!    constant time (401); its body is over [`MAX_BODY`] (413); the body is
//!    not a JSON Update (400). Each refusal is logged at most once per
//!    [`LOG_EVERY`] and reason, with how many came meanwhile.
//! 2. An update is answered 200 only once the journal has stored it
//!    (`journal.fsync`'s meaning); a failed store is 500, and Telegram
//!    sends it again. The journal tells a resend by its id (its rule 11):
//!    answered 200, not delivered again.
//! 3. Updates arriving while a store is under way go into the next one
//!    (one append in flight, many updates per fsync). The new ones are
//!    dispatched once stored, before any of their requests is answered:
//!    Telegram sends a chat's next update only after the previous got its
//!    200, so a chat's updates reach the Supervisor in order.
//! 4. While the apps hold `journal.max_undelivered` updates not received,
//!    requests get 503 with `Retry-After` (backpressure), and Telegram keeps
//!    the rest. Before the Supervisor's first word they get 503 too.
//! 5. In cluster mode ([`serve_to_log`]) every node serves the same checks
//!    (rule 1), and an update is answered 200 once the cluster's update log
//!    acknowledged it, that is once a majority of its replicas hold it; a
//!    resend (Telegram's retry, or the same update at another node) is a
//!    duplicate the log drops, answered 200 all the same. A failed store is
//!    500. The HTTP handler publishes itself, with no actor between: the
//!    log is shared by every node, so there is no local order to keep.
//!    There is no backpressure here (rule 4): what waits for the apps is
//!    bounded where the log is read, by each partition's consumer.

use std::collections::{HashMap, HashSet};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_web::dev::ServerHandle;
use actix_web::http::{header, Method, StatusCode};
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use base64::Engine;
use futures_util::StreamExt;
use serde_json::{json, Value};
use tokio::sync::oneshot;

use crate::actors::intake::{journal_rows, log_resent, Gate, GateWords};
use crate::actors::poller::{Backpressure, Delivery, FatalHook};
use crate::actors::supervisor::{Dispatch, WatchBackpressure};
use crate::backoff::Backoff;
use crate::cluster::{partition_of_update, UpdateLog};
use crate::journal::Append;
use crate::ops::metrics::{metrics, WebhookHealth};
use crate::settings::WebhookSettings;
use crate::telegram::{Bot, TelegramError, Update};

/// The largest body taken (rule 1). Telegram's updates are far smaller; a
/// few megabytes leave room for the largest message with entities.
pub const MAX_BODY: usize = 4 * 1024 * 1024;

/// A refusal of one reason is logged at most this often (rule 1).
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// Seconds Telegram is asked to wait after a 503 (rule 4).
const RETRY_AFTER: &str = "2";

const GATE_WORDS: GateWords = GateWords {
    target: module_path!(),
    paused: "webhook requests answered 503",
    resumed: "webhook requests accepted again",
};

/// How a request ended: the `outcome` label of
/// `asgigram_webhook_requests_total`, its status and what the log says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Stored now.
    Accepted,
    /// Stored before (Telegram sent it again): answered 200 all the same.
    Duplicate,
    NotFound,
    MethodNotAllowed,
    Unauthorized,
    TooLarge,
    BadRequest,
    /// Backpressure, or the receiver is not taking updates (yet, or any
    /// more).
    Busy,
    /// The journal (or, in cluster mode, the update log) could not store it.
    StoreFailed,
}

impl Outcome {
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Accepted => "accepted",
            Outcome::Duplicate => "duplicate",
            Outcome::NotFound => "not_found",
            Outcome::MethodNotAllowed => "method_not_allowed",
            Outcome::Unauthorized => "unauthorized",
            Outcome::TooLarge => "too_large",
            Outcome::BadRequest => "bad_request",
            Outcome::Busy => "busy",
            Outcome::StoreFailed => "store_failed",
        }
    }

    fn status(self) -> StatusCode {
        match self {
            Outcome::Accepted | Outcome::Duplicate => StatusCode::OK,
            Outcome::NotFound => StatusCode::NOT_FOUND,
            Outcome::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Outcome::Unauthorized => StatusCode::UNAUTHORIZED,
            Outcome::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Outcome::BadRequest => StatusCode::BAD_REQUEST,
            Outcome::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Outcome::StoreFailed => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Why, for the log; `None` for the outcomes that are not refusals.
    fn reason(self) -> Option<&'static str> {
        Some(match self {
            Outcome::Accepted | Outcome::Duplicate => return None,
            Outcome::NotFound => "404: not the path of webhook.url",
            Outcome::MethodNotAllowed => "405: not a POST",
            Outcome::Unauthorized => {
                "401: missing or wrong X-Telegram-Bot-Api-Secret-Token (webhook.secret_token)"
            }
            Outcome::TooLarge => "413: body too large",
            Outcome::BadRequest => "400: the body is not a JSON Update",
            Outcome::Busy => "503: backpressure or not ready",
            Outcome::StoreFailed => "500: the update could not be stored",
        })
    }
}

/// One update from a request that passed the checks; answered with
/// [`Outcome::Accepted`], [`Outcome::Duplicate`], [`Outcome::Busy`] or
/// [`Outcome::StoreFailed`].
#[derive(Message)]
#[rtype(result = "oneshot::Receiver<Outcome>")]
pub struct Push(pub Update);

pub struct Receiver {
    delivery: Delivery,
    gate: Gate,
    /// Waiting for the next append (rule 3).
    queued: Vec<(Update, oneshot::Sender<Outcome>)>,
    /// An append is in flight.
    storing: bool,
}

impl Receiver {
    /// `delivery.journal` is required: without a journal nothing could be
    /// answered 200 (rule 2).
    pub fn new(delivery: Delivery) -> Receiver {
        Receiver {
            delivery,
            gate: Gate::default(),
            queued: Vec::new(),
            storing: false,
        }
    }

    fn store_queued(&mut self, ctx: &mut Context<Self>) {
        if self.storing || self.queued.is_empty() {
            return;
        }
        let Some(journal) = self.delivery.journal.clone() else {
            for (_, answer) in self.queued.drain(..) {
                let _ = answer.send(Outcome::StoreFailed);
            }
            return;
        };
        let batch = std::mem::take(&mut self.queued);
        let (updates, answers): (Vec<Update>, Vec<_>) = batch.into_iter().unzip();
        let append = Append {
            batch: journal_rows(&updates),
            fetched_with: None,
            by_webhook: true,
        };
        self.storing = true;
        let stored = journal.send(append);
        ctx.spawn(stored.into_actor(self).map(move |result, act, ctx| {
            act.storing = false;
            match result.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                Ok(fresh) => {
                    let (new, outcomes) = sort_out(updates, &fresh);
                    let resent = outcomes.iter().filter(|o| **o == Outcome::Duplicate).count();
                    log_resent(module_path!(), resent);
                    if !new.is_empty() {
                        act.delivery.supervisor.do_send(Dispatch(new));
                    }
                    for (answer, outcome) in answers.into_iter().zip(outcomes) {
                        let _ = answer.send(outcome);
                    }
                }
                Err(e) => {
                    log::error!(
                        "journal: cannot store {} update(s) from the webhook: {e}; answered 500, Telegram sends them again",
                        answers.len()
                    );
                    for answer in answers {
                        let _ = answer.send(Outcome::StoreFailed);
                    }
                }
            }
            act.store_queued(ctx);
        }));
    }
}

/// A stored batch's updates that are new (in arrival order), and each
/// request's outcome; `fresh` are the ids the journal stored (rule 2). The
/// same id twice in one batch is new once.
fn sort_out(updates: Vec<Update>, fresh: &[i64]) -> (Vec<Update>, Vec<Outcome>) {
    let fresh: HashSet<i64> = fresh.iter().copied().collect();
    let mut outcomes = Vec::with_capacity(updates.len());
    let mut new = Vec::with_capacity(fresh.len());
    let mut taken = HashSet::new();
    for update in updates {
        if fresh.contains(&update.id.0) && taken.insert(update.id.0) {
            outcomes.push(Outcome::Accepted);
            new.push(update);
        } else {
            outcomes.push(Outcome::Duplicate);
        }
    }
    (new, outcomes)
}

impl Actor for Receiver {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.delivery
            .supervisor
            .do_send(WatchBackpressure(ctx.address().recipient()));
    }
}

impl Handler<Push> for Receiver {
    type Result = MessageResult<Push>;
    fn handle(&mut self, Push(update): Push, ctx: &mut Context<Self>) -> Self::Result {
        let (tx, rx) = oneshot::channel();
        if self.gate.admits(self.delivery.max_undelivered, &GATE_WORDS) {
            self.queued.push((update, tx));
            self.store_queued(ctx);
        } else {
            let _ = tx.send(Outcome::Busy);
        }
        MessageResult(rx)
    }
}

impl Handler<Backpressure> for Receiver {
    type Result = ();
    fn handle(&mut self, msg: Backpressure, _: &mut Context<Self>) {
        self.gate.set(&msg);
    }
}

/// Compares the secret without an early exit, so the time taken does not
/// tell how much of a guess was right (rule 1); only its length shows.
pub fn same_secret(given: &[u8], secret: &[u8]) -> bool {
    let mut diff = u8::from(given.len() != secret.len());
    for (i, s) in secret.iter().enumerate() {
        diff |= given.get(i).copied().unwrap_or(0) ^ s;
    }
    diff == 0
}

/// Refusals logged at most once per interval and reason (rule 1): what to
/// say and when, with the time given, so it is tested without a clock.
#[derive(Default)]
pub struct RefusalLog {
    /// By reason: when it was last logged, and how many came since.
    last: HashMap<&'static str, (Instant, u64)>,
}

impl RefusalLog {
    /// Notes a refusal; `Some(n)` when it is to be logged, `n` being the
    /// refusals of that reason not logged since the last line.
    pub fn note(&mut self, label: &'static str, now: Instant) -> Option<u64> {
        match self.last.get_mut(label) {
            Some((at, quiet)) if now.duration_since(*at) < LOG_EVERY => {
                *quiet += 1;
                None
            }
            Some((at, quiet)) => {
                *at = now;
                Some(std::mem::take(quiet))
            }
            None => {
                self.last.insert(label, (now, 0));
                Some(0)
            }
        }
    }
}

/// Where an update that passed the checks is stored.
enum Store {
    /// The single node's journal, through the [`Receiver`] (rules 2 to 4).
    Journal(Addr<Receiver>),
    /// The cluster's update log (rule 5); boxed, so that the journal's case
    /// does not take the log's ten times larger size.
    Log(Box<UpdateLog>),
}

impl Store {
    async fn store(&self, update: Update) -> Outcome {
        match self {
            Store::Journal(receiver) => match receiver.send(Push(update)).await {
                // A dropped answer means the receiver stopped: Telegram tries again.
                Ok(answer) => answer.await.unwrap_or(Outcome::Busy),
                Err(_) => Outcome::Busy,
            },
            Store::Log(log) => {
                let id = update.id.0;
                let partition = partition_of_update(&update, log.partitions());
                let json = bytes::Bytes::copy_from_slice(update.json().as_bytes());
                match log.publish(id, partition, json).await {
                    Ok(published) if published.duplicate => Outcome::Duplicate,
                    Ok(_) => Outcome::Accepted,
                    Err(e) => {
                        log::error!(
                            "update log: cannot store update={id} from the webhook: {e}; answered 500, Telegram sends it again"
                        );
                        Outcome::StoreFailed
                    }
                }
            }
        }
    }
}

/// What the HTTP handler needs, shared by its workers.
struct Shared {
    path: String,
    secret: Vec<u8>,
    store: Store,
    refusals: Mutex<RefusalLog>,
}

impl Shared {
    fn answer(&self, outcome: Outcome, req: &HttpRequest) -> HttpResponse {
        metrics().webhook_requests.inc(&[outcome.label()]);
        if let Some(reason) = outcome.reason() {
            // A poisoned lock only means a handler panicked while noting; the
            // map is still valid.
            let mut refusals = self.refusals.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(quiet) = refusals.note(outcome.label(), Instant::now()) {
                let peer = req
                    .peer_addr()
                    .map_or_else(|| "?".to_string(), |a| a.ip().to_string());
                let more = match quiet {
                    0 => String::new(),
                    n => format!("; {n} more alike since the last such line"),
                };
                log::warn!("webhook: refused a request from {peer}: {reason}{more}");
            }
        }
        let mut response = HttpResponse::build(outcome.status());
        if outcome == Outcome::Busy {
            response.insert_header((header::RETRY_AFTER, RETRY_AFTER));
        }
        response.finish()
    }
}

async fn receive(
    req: HttpRequest,
    mut body: web::Payload,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let outcome = match check(&req, &mut body, &shared).await {
        Ok(update) => shared.store.store(update).await,
        Err(refused) => refused,
    };
    shared.answer(outcome, &req)
}

/// Rule 1: the update a request carries, or why it is refused. Nothing is
/// read before the path, the method and the secret are right.
async fn check(
    req: &HttpRequest,
    body: &mut web::Payload,
    shared: &Shared,
) -> Result<Update, Outcome> {
    if req.path() != shared.path {
        return Err(Outcome::NotFound);
    }
    if req.method() != Method::POST {
        return Err(Outcome::MethodNotAllowed);
    }
    let given = req
        .headers()
        .get("X-Telegram-Bot-Api-Secret-Token")
        .map_or(&[][..], |v| v.as_bytes());
    if !same_secret(given, &shared.secret) {
        return Err(Outcome::Unauthorized);
    }
    let declared = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(Outcome::TooLarge);
    }
    let mut bytes = web::BytesMut::with_capacity(declared.unwrap_or(1024).min(MAX_BODY));
    while let Some(chunk) = body.next().await {
        let Ok(chunk) = chunk else {
            return Err(Outcome::BadRequest);
        };
        if bytes.len() + chunk.len() > MAX_BODY {
            return Err(Outcome::TooLarge);
        }
        bytes.extend_from_slice(&chunk);
    }
    match std::str::from_utf8(&bytes).map(Update::from_json) {
        Ok(Ok(update)) => Ok(update),
        _ => Err(Outcome::BadRequest),
    }
}

/// Binds `webhook.listen`. Called before anything else starts, as the
/// operations endpoint is.
pub fn bind(settings: &WebhookSettings) -> std::io::Result<TcpListener> {
    TcpListener::bind(settings.listen)
}

/// Why the receiver cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("webhook.listen: cannot serve on {addr}: {source}")]
    Serve {
        addr: String,
        source: std::io::Error,
    },
    /// `webhook.tls_cert` / `webhook.tls_key` cannot be used: fix the files.
    #[error("webhook TLS: {0}")]
    Tls(String),
}

/// Serves the receiver on `listener` until the returned handle stops it.
pub fn serve(
    listener: TcpListener,
    settings: &WebhookSettings,
    receiver: Addr<Receiver>,
) -> Result<ServerHandle, ServeError> {
    serve_into(listener, settings, Store::Journal(receiver))
}

/// Serves on `listener`, with the same checks as [`serve`], storing each
/// update in the cluster's update log instead of the journal (rule 5),
/// until the returned handle stops it. It needs no actor: every node runs
/// one, and each request waits for the log's acknowledgement.
pub fn serve_to_log(
    listener: TcpListener,
    settings: &WebhookSettings,
    log: UpdateLog,
) -> Result<ServerHandle, ServeError> {
    serve_into(listener, settings, Store::Log(Box::new(log)))
}

fn serve_into(
    listener: TcpListener,
    settings: &WebhookSettings,
    store: Store,
) -> Result<ServerHandle, ServeError> {
    let addr = listener
        .local_addr()
        .map_or_else(|e| e.to_string(), |a| a.to_string());
    let shared = web::Data::new(Shared {
        path: settings.path.clone(),
        secret: settings.secret_token.expose().as_bytes().to_vec(),
        store,
        refusals: Mutex::default(),
    });
    let server = HttpServer::new(move || {
        App::new()
            .app_data(shared.clone())
            .default_service(web::to(receive))
    })
    // The handler only checks and forwards; the work is on the actor thread
    // (or, for the update log, in the engine, which the one worker waits on
    // for many requests at once).
    .workers(1)
    // Telegram opens at most webhook.max_connections; a few more leave room
    // for a proxy's health checks.
    .max_connections(usize::from(settings.max_connections) + 16)
    // The daemon handles SIGTERM/SIGINT itself and stops in order.
    .disable_signals()
    .shutdown_timeout(5);
    let serve_err = |source| ServeError::Serve {
        addr: addr.clone(),
        source,
    };
    let server = match &settings.tls {
        Some(tls) => server
            .listen_rustls_0_23(listener, tls_config(tls)?)
            .map_err(serve_err)?,
        None => server.listen(listener).map_err(serve_err)?,
    };
    let server = server.run();
    let handle = server.handle();
    actix::spawn(async move {
        if let Err(e) = server.await {
            log::error!("webhook receiver failed: {e}");
        }
    });
    let scheme = if settings.tls.is_some() {
        "https"
    } else {
        "http"
    };
    log::info!(
        "webhook receiver listening addr={addr} scheme={scheme} path={}",
        settings.path
    );
    Ok(handle)
}

/// The rustls server configuration from the PEM files.
fn tls_config(tls: &crate::settings::WebhookTls) -> Result<rustls::ServerConfig, ServeError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&tls.cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| ServeError::Tls(format!("webhook.tls_cert {}: {e}", tls.cert.display())))?;
    if certs.is_empty() {
        return Err(ServeError::Tls(format!(
            "webhook.tls_cert {}: no certificate in it",
            tls.cert.display()
        )));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key)
        .map_err(|e| ServeError::Tls(format!("webhook.tls_key {}: {e}", tls.key.display())))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_no_client_auth().with_single_cert(certs, key))
        .map_err(|e| ServeError::Tls(format!("webhook.tls_cert/tls_key: {e}")))
}

/// Why webhook mode could not be set up with Telegram; the daemon stops.
#[derive(Debug, thiserror::Error)]
pub enum RegisterError {
    /// Telegram refused `setWebhook` (a bad URL, port or certificate):
    /// fix the `[webhook]` settings.
    #[error("setWebhook was refused: {0}")]
    Refused(TelegramError),
    #[error("the token was rejected by Telegram (401 Unauthorized)")]
    TokenRejected,
    /// `webhook.tls_cert` cannot be read for `upload_certificate`.
    #[error("webhook.upload_certificate: cannot read {path}: {reason}")]
    Certificate { path: String, reason: String },
}

/// `setWebhook`'s parameters: the URL, the secret, `max_connections`,
/// `allowed_updates` (always sent: empty means Telegram's default, as it
/// does for polling; left out, Telegram would keep an earlier setting) and,
/// with `upload_certificate`, the certificate.
pub fn set_webhook_params(
    settings: &WebhookSettings,
    allowed_updates: &[String],
) -> Result<Value, RegisterError> {
    let mut params = json!({
        "url": settings.url,
        "secret_token": settings.secret_token.expose(),
        "max_connections": settings.max_connections,
        "allowed_updates": allowed_updates,
    });
    if let Some(tls) = settings
        .tls
        .as_ref()
        .filter(|_| settings.upload_certificate)
    {
        let pem = std::fs::read(&tls.cert).map_err(|e| RegisterError::Certificate {
            path: tls.cert.display().to_string(),
            reason: e.to_string(),
        })?;
        params["certificate"] = json!({
            "filename": "certificate.pem",
            "content": {"$bytes": base64::engine::general_purpose::STANDARD.encode(pem)},
        });
    }
    Ok(params)
}

/// On start in webhook mode: `setWebhook`, retried with backoff until
/// Telegram answers (a refusal is final), then `getWebhookInfo`, whose
/// `last_error_message` is logged if there is one.
pub async fn register(
    bot: &Bot,
    settings: &WebhookSettings,
    allowed_updates: &[String],
) -> Result<(), RegisterError> {
    let params = set_webhook_params(settings, allowed_updates)?;
    let backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(30));
    let mut failures = 0;
    loop {
        let delay = match bot.request("setWebhook", &params).await {
            Ok(_) => break,
            Err(TelegramError::Unauthorized) => return Err(RegisterError::TokenRejected),
            Err(e @ (TelegramError::Api { .. } | TelegramError::Migrated { .. })) => {
                return Err(RegisterError::Refused(e))
            }
            Err(TelegramError::RetryAfter { retry_after, .. }) => Duration::from_secs(retry_after),
            Err(e) => {
                let delay = backoff.delay(failures);
                log::warn!(
                    "setWebhook failed: {e}; retrying in {:.1}s",
                    delay.as_secs_f64()
                );
                delay
            }
        };
        failures += 1;
        tokio::time::sleep(delay).await;
    }
    log::info!(
        "webhook set: Telegram sends updates to {} (max_connections={})",
        settings.url,
        settings.max_connections
    );
    let mut last_error = None;
    match check_info(bot, &mut last_error, true).await {
        Err(TelegramError::Unauthorized) => Err(RegisterError::TokenRejected),
        // Only for `/readyz` and the log: the next check tries again.
        _ => Ok(()),
    }
}

/// How often `getWebhookInfo` is asked for Telegram's last delivery error,
/// for `/readyz`.
pub const INFO_EVERY: Duration = Duration::from_secs(60);

/// Asks `getWebhookInfo` every [`INFO_EVERY`] for as long as the System
/// runs; a new `last_error_message` is logged once. Nothing polls in
/// webhook mode, so this is where a revoked token shows: a 401 calls
/// `fatal`, as the Poller does, and the watch ends.
pub fn watch_info(bot: Bot, fatal: FatalHook) {
    actix::spawn(async move {
        let mut last_error = metrics().webhook_health().and_then(|h| match h {
            WebhookHealth::Set { last_error } => last_error,
            WebhookHealth::NotSet => None,
        });
        loop {
            tokio::time::sleep(INFO_EVERY).await;
            if let Err(TelegramError::Unauthorized) = check_info(&bot, &mut last_error, false).await
            {
                log::error!("getWebhookInfo: the token was rejected (401 Unauthorized); stopping");
                fatal(TelegramError::Unauthorized);
                return;
            }
        }
    });
}

/// One `getWebhookInfo`: its last error goes to `/readyz`, and to the log
/// when it is new (or `at_start`, with the updates Telegram holds).
async fn check_info(
    bot: &Bot,
    last_error: &mut Option<String>,
    at_start: bool,
) -> Result<(), TelegramError> {
    let info = match bot.request("getWebhookInfo", &json!({})).await {
        Ok(info) => info,
        Err(e) => {
            log::warn!("getWebhookInfo failed: {e}");
            return Err(e);
        }
    };
    let pending = info
        .get("pending_update_count")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    let error = info
        .get("last_error_message")
        .and_then(Value::as_str)
        .map(str::to_string);
    match &error {
        Some(message) if at_start || last_error.as_ref() != Some(message) => log::warn!(
            "getWebhookInfo: Telegram's last delivery error: {message} (pending_update_count={pending})"
        ),
        None if at_start && pending > 0 => {
            log::info!("getWebhookInfo: {pending} update(s) waiting at Telegram")
        }
        _ => {}
    }
    metrics().set_webhook_health(WebhookHealth::Set {
        last_error: error.clone(),
    });
    *last_error = error;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_files_are_loaded_or_named_in_the_error() {
        let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
        let tls = crate::settings::WebhookTls {
            cert: fixtures.join("webhook-cert.pem"),
            key: fixtures.join("webhook-key.pem"),
        };
        assert!(tls_config(&tls).is_ok());
        let swapped = crate::settings::WebhookTls {
            cert: tls.key.clone(),
            key: tls.cert.clone(),
        };
        let err = tls_config(&swapped).expect_err("a key is no certificate");
        assert!(err.to_string().contains("webhook.tls_cert"), "{err}");
        let missing = crate::settings::WebhookTls {
            cert: tls.cert.clone(),
            key: fixtures.join("nothing-here.pem"),
        };
        let err = tls_config(&missing).expect_err("no key file");
        assert!(err.to_string().contains("nothing-here.pem"), "{err}");
    }

    #[test]
    fn a_batch_is_sorted_into_new_updates_and_resends() {
        let update = |id: i64| {
            Update::from_value(json!({"update_id": id, "message": {"text": id.to_string()}}))
                .expect("an update")
        };
        let batch = vec![update(7), update(3), update(7), update(5)];
        let (new, outcomes) = sort_out(batch, &[7, 5]);
        let ids: Vec<i64> = new.iter().map(|u| u.id.0).collect();
        assert_eq!(ids, vec![7, 5], "arrival order, 7 once");
        assert_eq!(
            outcomes,
            vec![
                Outcome::Accepted,
                Outcome::Duplicate,
                Outcome::Duplicate,
                Outcome::Accepted
            ]
        );
    }

    #[test]
    fn the_secret_must_match_whole() {
        assert!(same_secret(b"abc-_9", b"abc-_9"));
        assert!(!same_secret(b"abc-_8", b"abc-_9"));
        assert!(!same_secret(b"abc", b"abc-_9"), "a prefix");
        assert!(!same_secret(b"abc-_9x", b"abc-_9"), "longer");
        assert!(!same_secret(b"", b"abc"));
        assert!(!same_secret(b"abc\0", b"abc"));
    }

    #[test]
    fn a_refusal_is_logged_once_per_interval_with_the_count_between() {
        let mut log = RefusalLog::default();
        let t0 = Instant::now();
        assert_eq!(log.note("unauthorized", t0), Some(0));
        assert_eq!(log.note("unauthorized", t0 + Duration::from_secs(1)), None);
        assert_eq!(log.note("unauthorized", t0 + Duration::from_secs(9)), None);
        assert_eq!(
            log.note("bad_request", t0 + Duration::from_secs(9)),
            Some(0)
        );
        assert_eq!(log.note("unauthorized", t0 + LOG_EVERY), Some(2));
        assert_eq!(log.note("unauthorized", t0 + LOG_EVERY * 2), Some(0));
    }

    #[test]
    fn outcomes_map_to_the_statuses_telegram_acts_on() {
        assert_eq!(Outcome::Accepted.status(), StatusCode::OK);
        assert_eq!(Outcome::Duplicate.status(), StatusCode::OK);
        assert_eq!(Outcome::Busy.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(Outcome::StoreFailed.status().is_server_error());
        for refused in [
            Outcome::NotFound,
            Outcome::MethodNotAllowed,
            Outcome::Unauthorized,
            Outcome::TooLarge,
            Outcome::BadRequest,
        ] {
            assert!(refused.status().is_client_error(), "{refused:?}");
            assert!(refused.reason().is_some());
        }
    }
}
