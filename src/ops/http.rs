//! The HTTP endpoint: `/healthz`, `/readyz`, `/metrics`, and the routes for
//! other programs ([`crate::ops::api`]).
//!
//! Off unless `http.bind` is set. An actix-web server with one worker, started
//! inside the daemon's actix System; actix-web runs its worker on a thread of
//! its own, so the operations handlers only read the [`crate::ops::metrics`]
//! registry, which is `Sync`, and never touch the actors; the routes for
//! other programs reach them through one actor's address
//! ([`crate::actors::ingress::Ingress`]).
//!
//! - `/healthz`: 200 while the process runs (liveness).
//! - `/readyz`: 200 when polling works and every worker is ready, else 503
//!   with the reason in the body (readiness).
//! - `/metrics`: the Prometheus text format.
//! - `POST /v1/chats/{chat_id}/events`, `POST /v1/calls`: see
//!   [`crate::ops::api`].

use std::net::TcpListener;

use actix_web::dev::ServerHandle;
use actix_web::http::header::ContentType;
use actix_web::{web, App, HttpResponse, HttpServer};

use crate::ops::api::{Api, ApiData, PATHS};
use crate::ops::metrics::metrics;

async fn healthz() -> HttpResponse {
    HttpResponse::Ok()
        .content_type(ContentType::plaintext())
        .body("ok\n")
}

async fn readyz() -> HttpResponse {
    match metrics().readiness() {
        Ok(()) => HttpResponse::Ok()
            .content_type(ContentType::plaintext())
            .body({
                let mut body = "ready\n".to_string();
                for line in [metrics().webhook_report(), metrics().cluster_report()]
                    .into_iter()
                    .flatten()
                {
                    body.push_str(&line);
                    body.push('\n');
                }
                body
            }),
        Err(why) => HttpResponse::ServiceUnavailable()
            .content_type(ContentType::plaintext())
            .body(format!("not ready: {why}\n")),
    }
}

async fn prometheus() -> HttpResponse {
    HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(metrics().render())
}

/// Binds `http.bind`, if it is set. Called before anything else starts: a
/// port in use must stop the daemon while there is nothing to stop yet.
pub fn bind(settings: &crate::settings::Settings) -> Result<Option<TcpListener>, crate::RunError> {
    let Some(addr) = settings.http.bind else {
        return Ok(None);
    };
    TcpListener::bind(addr)
        .map(Some)
        .map_err(|source| crate::RunError::Listen { addr, source })
}

/// Serves the endpoint on `listener` on the current actix System until the
/// returned handle stops it (or the process ends). Logs the bound address,
/// so `127.0.0.1:0` can be used and the port read from the log.
pub fn start(listener: TcpListener, api: Option<Api>) -> std::io::Result<ServerHandle> {
    let api: ApiData = web::Data::new(api);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(api.clone())
            .route("/healthz", web::get().to(healthz))
            .route("/readyz", web::get().to(readyz))
            .route("/metrics", web::get().to(prometheus))
            .configure(crate::ops::api::routes)
    })
    // Probes and scrapes are rare and cheap: one worker thread is plenty.
    .workers(1)
    // The daemon handles SIGTERM/SIGINT itself and stops in order; the
    // endpoint must not shut itself down on them first.
    .disable_signals()
    .shutdown_timeout(1)
    .listen(listener)?;
    let addrs = server
        .addrs()
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",");
    let server = server.run();
    let handle = server.handle();
    actix::spawn(async move {
        if let Err(e) = server.await {
            log::error!("http endpoint failed: {e}");
        }
    });
    log::info!("http endpoint listening addr={addrs} paths=/healthz,/readyz,/metrics");
    Ok(handle)
}

/// The operations side of a running daemon: the endpoint (if configured),
/// the stats line, and the reload triggers. Dropping it stops the endpoint.
pub struct Operations {
    endpoint: Option<ServerHandle>,
}

impl Drop for Operations {
    fn drop(&mut self) {
        if let Some(handle) = self.endpoint.take() {
            // The stop command is sent by the call itself; the future only
            // reports completion, which nobody needs to wait for.
            drop(handle.stop(false));
        }
    }
}

/// Starts what `settings` asks for: the HTTP endpoint on `listener` (from
/// [`bind`]) with the routes for other programs when `api` is given, the
/// stats line (`log.stats_interval`), SIGHUP and `--reload`.
pub fn start_operations(
    listener: Option<TcpListener>,
    settings: &crate::settings::Settings,
    supervisor: &actix::Addr<crate::actors::supervisor::Supervisor>,
    api: Option<Api>,
) -> Result<Operations, crate::RunError> {
    let endpoint = match listener {
        Some(listener) => {
            let addr = listener
                .local_addr()
                .map_or_else(|e| e.to_string(), |a| a.to_string());
            let open = api.is_some();
            let handle =
                start(listener, api).map_err(|source| crate::RunError::Serve { addr, source })?;
            if open {
                log::info!(
                    "http: {PATHS} take events and calls from other programs (bearer token: http.api_token)"
                );
            } else {
                log::info!(
                    "http: {PATHS} answer 404: neither http.api_token nor http.api_token_file is set"
                );
            }
            Some(handle)
        }
        None => None,
    };
    crate::ops::metrics::spawn_stats_logger(settings.log.stats_interval);
    crate::ops::reload::install(supervisor.clone(), &settings.app.app_dir).map_err(|source| {
        crate::RunError::Signal {
            signal: "SIGHUP",
            source,
        }
    })?;
    Ok(Operations { endpoint })
}
