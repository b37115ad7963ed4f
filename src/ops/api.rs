//! The endpoint's routes for other programs: `POST /v1/chats/{chat_id}/events`
//! and `POST /v1/calls` (docs/protocol.md, "Events and calls from other
//! programs").
//!
//! Behind a bearer token (`http.api_token` or `http.api_token_file`):
//! without one configured they answer 404 (said once in the log at start,
//! and in a debug line per request); a missing or wrong token gets 401 with
//! no detail. The token is compared in constant time and never logged.
//! Bodies are read up to [`crate::push::MAX_BODY`]; what is larger, not
//! JSON, or not what the route takes gets 400 with a message, before
//! anything is stored. The handlers run on the endpoint's own thread and
//! reach the daemon through the [`crate::actors::ingress::Ingress`] actor (a cluster node's
//! `cluster::api::ClusterApi`).

use actix::{Actor, Addr, Handler, Recipient};
use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::StreamExt;
use serde_json::{json, Value};

use crate::actors::call::Outcome;
use crate::actors::ingress::{ApiCall, IngressError, PushEvent};
use crate::push::{self, BadRequest, MAX_BODY};
use crate::settings::ApiToken;

/// The paths, for the log.
pub const PATHS: &str = "/v1/chats/{chat_id}/events,/v1/calls";

/// What the routes need; `None` when no token is configured. The events
/// and calls go to the single node's [`crate::actors::ingress::Ingress`] or to a cluster node's
/// `cluster::api::ClusterApi`.
#[derive(Clone)]
pub struct Api {
    pub token: ApiToken,
    pub events: Recipient<PushEvent>,
    pub calls: Recipient<ApiCall>,
}

impl Api {
    pub fn new<A>(token: ApiToken, to: &Addr<A>) -> Api
    where
        A: Actor<Context = actix::Context<A>> + Handler<PushEvent> + Handler<ApiCall>,
    {
        Api {
            token,
            events: to.clone().recipient(),
            calls: to.clone().recipient(),
        }
    }
}

/// The routes' state in the endpoint's app.
pub type ApiData = web::Data<Option<Api>>;

pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/v1/chats/{chat_id}/events", web::post().to(push_event))
        .route("/v1/calls", web::post().to(api_call));
}

fn error(status: StatusCode, message: impl std::fmt::Display) -> HttpResponse {
    HttpResponse::build(status).json(json!({"ok": false, "error": message.to_string()}))
}

fn bad(e: BadRequest) -> HttpResponse {
    error(StatusCode::BAD_REQUEST, e)
}

fn unavailable(e: IngressError) -> HttpResponse {
    let mut answer = HttpResponse::ServiceUnavailable();
    if e != IngressError::Stopping {
        answer.insert_header((header::RETRY_AFTER, "1"));
    }
    answer.json(json!({"ok": false, "error": e.to_string()}))
}

/// Equal without an early exit on the first differing byte, so the time
/// an answer takes does not tell how much of a guess was right.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |d, (x, y)| d | (x ^ y)) == 0
}

/// Why a request may not use the API; [`Refused::answer`] says it.
enum Refused {
    /// No token is configured: the routes are off.
    Off,
    /// No bearer token, or another one.
    Token,
}

impl Refused {
    fn answer(self, req: &HttpRequest) -> HttpResponse {
        match self {
            Refused::Off => {
                log::debug!(
                    "http: {} {} answered 404: neither http.api_token nor http.api_token_file is set",
                    req.method(),
                    req.path()
                );
                HttpResponse::NotFound().finish()
            }
            Refused::Token => {
                log::debug!(
                    "http: {} {} answered 401: missing or wrong bearer token",
                    req.method(),
                    req.path()
                );
                HttpResponse::Unauthorized()
                    .insert_header((header::WWW_AUTHENTICATE, "Bearer"))
                    .finish()
            }
        }
    }
}

/// The configured API, if the request may use it.
fn authorize(req: &HttpRequest, api: &ApiData) -> Result<Api, Refused> {
    let api = api.get_ref().as_ref().ok_or(Refused::Off)?;
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
    match presented {
        Some(token) if same(token, api.token.expose().as_bytes()) => Ok(api.clone()),
        _ => Err(Refused::Token),
    }
}

/// The body, up to [`MAX_BODY`]; one byte more is enough to refuse it.
async fn body(mut payload: web::Payload) -> Result<Vec<u8>, BadRequest> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|e| BadRequest::Unreadable(e.to_string()))?;
        if body.len() + chunk.len() > MAX_BODY {
            return Err(BadRequest::TooLarge);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

async fn push_event(
    req: HttpRequest,
    path: web::Path<String>,
    payload: web::Payload,
    api: ApiData,
) -> HttpResponse {
    let api = match authorize(&req, &api) {
        Ok(api) => api,
        Err(refused) => return refused.answer(&req),
    };
    let chat_id = match push::chat_id(&path) {
        Ok(id) => id,
        Err(e) => return bad(e),
    };
    let event = match body(payload).await.and_then(|body| push::event(&body)) {
        Ok(event) => event,
        Err(e) => return bad(e),
    };
    match api.events.send(PushEvent { chat_id, event }).await {
        Ok(Ok(id)) => {
            log::debug!("http: event update={id} for chat={chat_id} stored");
            HttpResponse::Accepted().json(json!({"ok": true, "update_id": id}))
        }
        Ok(Err(e)) => unavailable(e),
        Err(_) => unavailable(IngressError::Stopping),
    }
}

async fn api_call(req: HttpRequest, payload: web::Payload, api: ApiData) -> HttpResponse {
    let api = match authorize(&req, &api) {
        Ok(api) => api,
        Err(refused) => return refused.answer(&req),
    };
    let (method, params) = match body(payload).await.and_then(|body| push::call(&body)) {
        Ok(call) => call,
        Err(e) => return bad(e),
    };
    match api.calls.send(ApiCall { method, params }).await {
        Ok(Ok(outcome)) => answer_with(outcome),
        Ok(Err(e)) => unavailable(e),
        Err(_) => unavailable(IngressError::Stopping),
    }
}

/// Telegram's answer as it gave it (200), or, when no answer from Telegram
/// settles the call (error_code 0: no answer in time, the connection
/// failed, an answer that was not the Bot API's), 504 or 502 with what
/// happened.
fn answer_with(outcome: Outcome) -> HttpResponse {
    let envelope = outcome.into_answer();
    if envelope.get("error_code").and_then(Value::as_i64) != Some(0) {
        return HttpResponse::Ok().json(envelope);
    }
    let description = envelope
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or("no answer from the Bot API");
    let status = if description.starts_with("no answer within") {
        StatusCode::GATEWAY_TIMEOUT
    } else {
        StatusCode::BAD_GATEWAY
    };
    error(
        status,
        format!("the call's outcome is unknown (it may or may not have executed): {description}"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(same(b"abc", b"abc"));
        assert!(!same(b"abc", b"abd"));
        assert!(!same(b"abc", b"abcd"));
        assert!(!same(b"", b"a"));
    }

    #[test]
    fn only_an_outcome_telegram_did_not_settle_is_a_gateway_error() {
        let ok = answer_with(Outcome::Result(json!({"message_id": 1})));
        assert_eq!(ok.status(), StatusCode::OK);
        let refused = answer_with(Outcome::Error(
            json!({"ok": false, "error_code": 400, "description": "Bad Request: chat not found"}),
        ));
        assert_eq!(refused.status(), StatusCode::OK, "Telegram's own answer");
        let timeout = answer_with(Outcome::Error(
            json!({"ok": false, "error_code": 0, "description": "no answer within 60s"}),
        ));
        assert_eq!(timeout.status(), StatusCode::GATEWAY_TIMEOUT);
        let dropped = answer_with(Outcome::Error(
            json!({"ok": false, "error_code": 0, "description": "network error: connect"}),
        ));
        assert_eq!(dropped.status(), StatusCode::BAD_GATEWAY);
    }
}
