//! The Bot API boundary: updates as they arrive, method calls over awc, and the
//! `{ok, result | error_code, description, parameters}` envelope.
//!
//! Updates are kept as raw JSON: the daemon reads only `update_id`, the kind and
//! the routing fields, and hands everything else to the application untouched,
//! so an update kind newer than this code still flows through.

use std::collections::BTreeMap;
use std::fmt;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::settings::BotToken;
use crate::upload;

/// Telegram's update identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct UpdateId(pub i64);

/// One update from getUpdates, validated only as far as the daemon needs.
#[derive(Debug, Clone)]
pub struct Update {
    pub id: UpdateId,
    /// The update object, `update_id` included.
    pub raw: Map<String, Value>,
}

/// Why an element of getUpdates' result is not an update.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UpdateError {
    #[error("update is not a JSON object")]
    NotAnObject,
    #[error("update has no integer update_id")]
    NoUpdateId,
    /// Well-formed JSON that serde_json cannot make a value of: nested
    /// deeper than its recursion limit (128).
    #[error("update cannot be decoded: {0}")]
    Undecodable(String),
}

/// An element of getUpdates' result that is skipped, with its update_id
/// when one could be read, so the offset can still move past it.
#[derive(Debug, PartialEq)]
pub struct Skipped {
    pub id: Option<i64>,
    pub error: UpdateError,
}

impl Update {
    pub fn from_value(value: Value) -> Result<Update, UpdateError> {
        let Value::Object(raw) = value else {
            return Err(UpdateError::NotAnObject);
        };
        let id = raw
            .get("update_id")
            .and_then(Value::as_i64)
            .ok_or(UpdateError::NoUpdateId)?;
        Ok(Update {
            id: UpdateId(id),
            raw,
        })
    }

    /// Decodes one element of getUpdates' result, on its own: an element
    /// that cannot be decoded spoils only itself, and its update_id is still
    /// read if it has one.
    pub fn from_raw(raw: &RawValue) -> Result<Update, Skipped> {
        match serde_json::from_str::<Value>(raw.get()) {
            Ok(value) => Update::from_value(value).map_err(|error| Skipped { id: None, error }),
            Err(e) => Err(Skipped {
                id: probe_update_id(raw),
                error: UpdateError::Undecodable(e.to_string()),
            }),
        }
    }

    /// The update's kind (`message`, `callback_query`, ...) and its object:
    /// the one field besides `update_id`.
    pub fn kind(&self) -> Option<(&str, &Value)> {
        self.raw
            .iter()
            .find(|(k, _)| k.as_str() != "update_id")
            .map(|(k, v)| (k.as_str(), v))
    }
}

/// What went wrong with a Bot API call, split by what the caller does next.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TelegramError {
    /// 429: wait exactly this long (clamped to [`RETRY_AFTER_SECS`]), then
    /// retry.
    #[error("flood control: retry after {retry_after}s ({description})")]
    RetryAfter {
        retry_after: u64,
        description: String,
    },
    /// 400 with `migrate_to_chat_id`: the group became a supergroup.
    #[error("chat migrated to {migrate_to_chat_id} ({description})")]
    Migrated {
        migrate_to_chat_id: i64,
        description: String,
    },
    /// 401: the token was rejected; retrying cannot help.
    #[error("the token was rejected by the Bot API (401 Unauthorized)")]
    Unauthorized,
    /// 409: another getUpdates poller or a webhook holds the token.
    #[error("conflict: {description}")]
    Conflict { description: String },
    /// Telegram's own 5xx: the call did not execute; retry later.
    #[error("server error {code}: {description}")]
    Server { code: u16, description: String },
    /// Any other error envelope (400, 403, 404, ...): final.
    #[error("error {code}: {description}")]
    Api {
        code: u16,
        description: String,
        parameters: Option<Value>,
    },
    /// The request never reached Telegram (connect failed, DNS, TLS).
    #[error("network error: {0}")]
    Network(String),
    /// The request was (or may have been) sent but no answer came: ambiguous.
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    /// No usable answer came although the request was (or may have been)
    /// written: the connection dropped, or the answer is not a Bot API
    /// envelope. Ambiguous: the call may have executed.
    #[error("invalid answer from the Bot API: {0}")]
    InvalidResponse(String),
}

impl TelegramError {
    /// The error as an envelope-shaped JSON object, for the application.
    pub fn to_envelope(&self) -> Value {
        let (code, description, parameters) = match self {
            TelegramError::RetryAfter {
                retry_after,
                description,
            } => (
                429,
                description.clone(),
                Some(serde_json::json!({ "retry_after": retry_after })),
            ),
            TelegramError::Migrated {
                migrate_to_chat_id,
                description,
            } => (
                400,
                description.clone(),
                Some(serde_json::json!({ "migrate_to_chat_id": migrate_to_chat_id })),
            ),
            TelegramError::Unauthorized => (401, "Unauthorized".to_string(), None),
            TelegramError::Conflict { description } => (409, description.clone(), None),
            TelegramError::Server { code, description } => (*code, description.clone(), None),
            TelegramError::Api {
                code,
                description,
                parameters,
            } => (*code, description.clone(), parameters.clone()),
            other => (0, other.to_string(), None),
        };
        let mut env = serde_json::json!({
            "ok": false,
            "error_code": code,
            "description": description,
        });
        if let Some(p) = parameters {
            env["parameters"] = p;
        }
        env
    }
}

/// The top-level `update_id` of an element that cannot be decoded whole.
/// serde_json skips the other fields without recursing, however deep.
fn probe_update_id(raw: &RawValue) -> Option<i64> {
    #[derive(serde::Deserialize)]
    struct Probe<'a> {
        #[serde(borrow)]
        update_id: Option<&'a RawValue>,
    }
    let probe = serde_json::from_str::<Probe<'_>>(raw.get()).ok()?;
    serde_json::from_str(probe.update_id?.get()).ok()
}

/// Interprets a Bot API answer: status and body.
pub fn parse_envelope(status: u16, body: &[u8]) -> Result<Value, TelegramError> {
    match open_envelope(status, body)? {
        None => Ok(Value::Bool(true)),
        Some(result) => serde_json::from_str(result.get()).map_err(|e| {
            TelegramError::InvalidResponse(format!("the result cannot be decoded: {e}"))
        }),
    }
}

/// Interprets getUpdates' answer. Each element of the result is decoded on
/// its own, so one that cannot be decoded is skipped rather than failing
/// the batch (and every retry of it). Only an answer that is not an
/// envelope, or whose result is not an array, fails whole.
pub fn parse_updates(
    status: u16,
    body: &[u8],
) -> Result<Vec<Result<Update, Skipped>>, TelegramError> {
    let result = open_envelope(status, body)?;
    let Some(Ok(items)) = result.map(|r| serde_json::from_str::<Vec<&RawValue>>(r.get())) else {
        return Err(TelegramError::InvalidResponse(format!(
            "getUpdates answered {}, not an array",
            result.map_or("no result", kind_of_raw)
        )));
    };
    Ok(items.into_iter().map(Update::from_raw).collect())
}

/// What a JSON text is, from its first character (it is well-formed).
fn kind_of_raw(raw: &RawValue) -> &'static str {
    match raw.get().trim_start().as_bytes().first() {
        Some(b'{') => "an object",
        Some(b'[') => "an array",
        Some(b'"') => "a string",
        Some(b't' | b'f') => "a boolean",
        Some(b'n') => "null",
        _ => "a number",
    }
}

/// Reads the envelope's fields without decoding `result`, which is
/// returned as it came (`None` when absent), or the error the envelope
/// states.
fn open_envelope(status: u16, body: &[u8]) -> Result<Option<&RawValue>, TelegramError> {
    // Fields are kept raw first: serde_json skips a raw value without
    // recursing, so a result nested beyond its recursion limit does not
    // make the whole answer unreadable.
    let Ok(mut fields) = serde_json::from_slice::<BTreeMap<String, &RawValue>>(body) else {
        return Err(if status >= 500 {
            TelegramError::Server {
                code: status,
                description: "non-JSON answer".to_string(),
            }
        } else {
            TelegramError::InvalidResponse(format!(
                "HTTP {status} with a body that is not a JSON object"
            ))
        });
    };
    let result = fields.remove("result");
    // The other fields are small; one that cannot be decoded counts as
    // absent.
    let mut env: Map<String, Value> = fields
        .into_iter()
        .filter_map(|(k, v)| Some((k, serde_json::from_str(v.get()).ok()?)))
        .collect();
    if env.get("ok").and_then(Value::as_bool) == Some(true) {
        return Ok(result);
    }
    let code = env
        .get("error_code")
        .and_then(Value::as_u64)
        .map(|c| c as u16)
        .unwrap_or(status);
    let description = env
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or("no description")
        .to_string();
    let parameters = env.remove("parameters");
    let param = |name: &str| {
        parameters
            .as_ref()
            .and_then(|p| p.get(name))
            .and_then(Value::as_i64)
    };
    Err(match code {
        429 => TelegramError::RetryAfter {
            retry_after: retry_after(parameters.as_ref().and_then(|p| p.get("retry_after"))),
            description,
        },
        401 => TelegramError::Unauthorized,
        409 => TelegramError::Conflict { description },
        _ if param("migrate_to_chat_id").is_some() => TelegramError::Migrated {
            // Checked just above.
            migrate_to_chat_id: param("migrate_to_chat_id").unwrap_or_default(),
            description,
        },
        500..=599 => TelegramError::Server { code, description },
        _ => TelegramError::Api {
            code,
            description,
            parameters,
        },
    })
}

/// The seconds a 429's `retry_after` may ask for. Telegram's own answers
/// range from 1 s to about an hour; 0 or less would make the caller retry in
/// a tight loop, and a huge value would stop it for good.
pub const RETRY_AFTER_SECS: std::ops::RangeInclusive<u64> = 1..=3600;

/// Whether an out-of-range `retry_after` was logged: once per process, so
/// that a server answering 0 on every poll does not add a line per poll.
static RETRY_AFTER_CLAMP_LOGGED: AtomicBool = AtomicBool::new(false);

/// A 429's `retry_after`, clamped to [`RETRY_AFTER_SECS`]; an absent one is
/// the shortest wait, a fractional one is rounded up.
fn retry_after(asked: Option<&Value>) -> u64 {
    let (min, max) = (*RETRY_AFTER_SECS.start(), *RETRY_AFTER_SECS.end());
    let Some(asked) = asked else { return min };
    let seconds = asked.as_f64().filter(|s| s.is_finite()).map(f64::ceil);
    let used = seconds.map_or(min, |s| s.clamp(min as f64, max as f64) as u64);
    if seconds != Some(used as f64) && !RETRY_AFTER_CLAMP_LOGGED.swap(true, Ordering::Relaxed) {
        log::warn!(
            "the Bot API asked for retry_after={asked}, outside {min}..={max}s; waiting {used}s instead (said once: later values out of range are clamped silently)"
        );
    }
    used
}

/// A Bot API client bound to one token. Cheap to clone (shared connection pool).
///
/// The token lives only inside `base`, which is never logged or put in an error.
#[derive(Clone)]
pub struct Bot {
    client: awc::Client,
    base: Rc<str>,
    http_timeout: Duration,
}

impl fmt::Debug for Bot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Bot")
            .field("token", &"<redacted>")
            .field("http_timeout", &self.http_timeout)
            .finish()
    }
}

impl Bot {
    /// `api_url` is the server root, e.g. `https://api.telegram.org`.
    pub fn new(api_url: &str, token: &BotToken, http_timeout: Duration) -> Bot {
        let client = awc::Client::builder()
            // Each call has one deadline for its whole exchange (see
            // `Bot::exchange`); this bounds only the connect phase within it.
            .connector(
                awc::Connector::new()
                    .timeout(Duration::from_secs(10))
                    .limit(256),
            )
            .disable_timeout()
            .finish();
        Bot {
            client,
            base: format!("{}/bot{}/", api_url.trim_end_matches('/'), token.expose()).into(),
            http_timeout,
        }
    }

    /// Calls `method` with JSON parameters; `timeout` bounds the whole call.
    pub async fn call(
        &self,
        method: &str,
        params: &Value,
        timeout: Duration,
    ) -> Result<Value, TelegramError> {
        metered(method, async {
            let (status, body) = self.exchange(method, params, timeout).await?;
            parse_envelope(status, &body)
        })
        .await
    }

    /// Calls getUpdates; `timeout` bounds the whole call. Each update is
    /// decoded on its own ([`parse_updates`]).
    pub async fn get_updates(
        &self,
        params: &Value,
        timeout: Duration,
    ) -> Result<Vec<Result<Update, Skipped>>, TelegramError> {
        metered("getUpdates", async {
            let (status, body) = self.exchange("getUpdates", params, timeout).await?;
            parse_updates(status, &body)
        })
        .await
    }

    /// One request and its whole answer, status and body, within `timeout`.
    ///
    /// awc's own request timeout ends once the headers are in: a body that
    /// stalls after them would be waited for forever. So the one deadline
    /// covers connecting, sending, the headers and the body alike.
    async fn exchange(
        &self,
        method: &str,
        params: &Value,
        timeout: Duration,
    ) -> Result<(u16, bytes::Bytes), TelegramError> {
        match tokio::time::timeout(timeout, self.exchange_unbounded(method, params)).await {
            Ok(answer) => answer,
            // Possibly sent, possibly executed: ambiguous, as the variant says.
            Err(_) => Err(TelegramError::Timeout(timeout)),
        }
    }

    async fn exchange_unbounded(
        &self,
        method: &str,
        params: &Value,
    ) -> Result<(u16, bytes::Bytes), TelegramError> {
        let url = format!("{}{}", self.base, method);
        let request = self.client.post(url);
        let response = match params.as_object().filter(|_| upload::has_files(params)) {
            Some(map) => {
                let (fields, files) = upload::split(map).map_err(|e| TelegramError::Api {
                    code: 400,
                    description: format!("Bad Request: {e}"),
                    parameters: None,
                })?;
                let (content_type, body) = upload::encode(&fields, &files);
                request
                    .insert_header(("content-type", content_type))
                    .send_body(body)
                    .await
            }
            None => request.send_json(params).await,
        };
        let mut response = response.map_err(classify_send_error)?;
        let status = response.status().as_u16();
        let body = response
            .body()
            .limit(64 * 1024 * 1024)
            .await
            .map_err(|e| TelegramError::InvalidResponse(format!("reading the body: {e}")))?;
        Ok((status, body))
    }

    /// Calls a non-polling method with the configured HTTP timeout.
    pub async fn request(&self, method: &str, params: &Value) -> Result<Value, TelegramError> {
        self.call(method, params, self.http_timeout).await
    }

    pub fn http_timeout(&self) -> Duration {
        self.http_timeout
    }
}

/// Every call is counted here, by method and outcome: one place sees the
/// Poller's, the Sender's and the daemon's own calls alike.
async fn metered<T>(
    method: &str,
    call: impl std::future::Future<Output = Result<T, TelegramError>>,
) -> Result<T, TelegramError> {
    let started = std::time::Instant::now();
    let result = call.await;
    crate::metrics::metrics().api_call(method, started.elapsed(), &result.as_ref().map(|_| ()));
    result
}

/// awc's errors never carry the URL (and so never the token), but they are
/// reworded here so the caller can tell "surely not sent" from "ambiguous".
fn classify_send_error(err: awc::error::SendRequestError) -> TelegramError {
    use awc::error::{ConnectError, SendRequestError as E};
    match err {
        // awc reports a connection that closed after the request was written,
        // before the answer's head, as `Connect(Disconnected)`; an HTTP/2
        // stream error can also come after the request left. Ambiguous.
        E::Connect(e @ (ConnectError::Disconnected | ConnectError::H2(_))) => {
            TelegramError::InvalidResponse(format!("connection lost before the answer: {e}"))
        }
        // Connecting failed or the URL is bad: nothing was written, so the
        // call surely did not execute.
        E::Connect(e) => TelegramError::Network(format!("connect: {e}")),
        E::Url(e) => TelegramError::Network(format!("invalid URL: {e}")),
        // Writing failed part-way, or the connection closed before an answer:
        // Telegram may have received and executed the request. Ambiguous, like
        // a timeout, and unlike `Network`.
        E::Send(e) => TelegramError::InvalidResponse(format!("connection lost while sending: {e}")),
        other => TelegramError::InvalidResponse(format!("no complete answer: {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn ok_envelope_yields_result() {
        let v = parse_envelope(200, br#"{"ok":true,"result":[1,2]}"#).unwrap();
        assert_eq!(v, json!([1, 2]));
    }

    #[test]
    fn error_envelopes_are_classified() {
        let e = parse_envelope(
            429,
            br#"{"ok":false,"error_code":429,"description":"Too Many Requests: retry after 7","parameters":{"retry_after":7}}"#,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            TelegramError::RetryAfter { retry_after: 7, .. }
        ));
        let e = parse_envelope(
            401,
            br#"{"ok":false,"error_code":401,"description":"Unauthorized"}"#,
        )
        .unwrap_err();
        assert!(matches!(e, TelegramError::Unauthorized));
        let e = parse_envelope(
            400,
            br#"{"ok":false,"error_code":400,"description":"Bad Request: group chat was upgraded to a supergroup chat","parameters":{"migrate_to_chat_id":-1001}}"#,
        )
        .unwrap_err();
        assert!(matches!(
            e,
            TelegramError::Migrated {
                migrate_to_chat_id: -1001,
                ..
            }
        ));
        let e = parse_envelope(502, b"<html>Bad Gateway</html>").unwrap_err();
        assert!(matches!(e, TelegramError::Server { code: 502, .. }));
        let e = parse_envelope(403, br#"{"ok":false,"error_code":403,"description":"Forbidden: bot was blocked by the user"}"#)
            .unwrap_err();
        assert!(matches!(e, TelegramError::Api { code: 403, .. }));
        assert_eq!(
            e.to_envelope()["description"],
            "Forbidden: bot was blocked by the user"
        );
    }

    #[test]
    fn retry_after_is_clamped_to_a_second_to_an_hour() {
        let asked = |v: Value| {
            let body = json!({"ok": false, "error_code": 429, "description": "Too Many Requests",
                              "parameters": {"retry_after": v}});
            match parse_envelope(429, body.to_string().as_bytes()) {
                Err(TelegramError::RetryAfter { retry_after, .. }) => retry_after,
                other => panic!("not a 429: {other:?}"),
            }
        };
        assert_eq!(asked(json!(7)), 7, "in range: as asked");
        assert_eq!(asked(json!(3600)), 3600);
        assert_eq!(asked(json!(2.5)), 3, "a fraction rounds up");
        assert_eq!(asked(json!(0)), 1);
        assert_eq!(asked(json!(-5)), 1);
        assert_eq!(asked(json!(0.2)), 1);
        assert_eq!(asked(json!(1_000_000_000_000i64)), 3600);
        assert_eq!(asked(json!(1e12)), 3600);
        assert_eq!(asked(json!(u64::MAX)), 3600);
        assert_eq!(asked(json!("soon")), 1, "not a number: the shortest wait");
        let absent = parse_envelope(429, br#"{"ok":false,"error_code":429,"description":"x"}"#);
        assert!(matches!(
            absent,
            Err(TelegramError::RetryAfter { retry_after: 1, .. })
        ));
    }

    /// `{"update_id": id, "message": {"text": [[[...]]]}}`, `depth` arrays
    /// deep, written as text: a value that deep cannot be built and dropped
    /// on a test thread's stack.
    fn nested(id: i64, depth: usize) -> String {
        format!(
            r#"{{"update_id":{id},"message":{{"text":{}"x"{}}}}}"#,
            "[".repeat(depth),
            "]".repeat(depth)
        )
    }

    #[test]
    fn one_undecodable_update_spoils_only_itself() {
        let deep = nested(11, 10_000);
        // Not an object at all, so no id to find.
        let (open, close) = ("[".repeat(10_000), "]".repeat(10_000));
        let body = format!(
            r#"{{"ok":true,"result":[{{"update_id":10,"message":{{}}}},{deep},{open}1{close},{{"update_id":12,"message":{{}}}}]}}"#
        );
        let items = parse_updates(200, body.as_bytes()).unwrap();
        assert_eq!(items.len(), 4);
        assert_eq!(items[0].as_ref().unwrap().id, UpdateId(10));
        let bad = items[1].as_ref().unwrap_err();
        assert_eq!(bad.id, Some(11));
        assert!(
            matches!(&bad.error, UpdateError::Undecodable(e) if e.contains("recursion limit")),
            "{bad:?}"
        );
        assert_eq!(items[2].as_ref().unwrap_err().id, None);
        assert_eq!(items[3].as_ref().unwrap().id, UpdateId(12));
    }

    #[test]
    fn only_an_answer_that_is_no_envelope_fails_the_batch() {
        assert!(matches!(
            parse_updates(200, b"<html>oops</html>"),
            Err(TelegramError::InvalidResponse(_))
        ));
        let e = parse_updates(200, br#"{"ok":true,"result":"x"}"#).unwrap_err();
        assert!(e.to_string().contains("a string, not an array"), "{e}");
        assert!(matches!(
            parse_updates(
                409,
                br#"{"ok":false,"error_code":409,"description":"Conflict"}"#
            ),
            Err(TelegramError::Conflict { .. })
        ));
        // Other calls' results are decoded whole; one that cannot be is an
        // invalid answer, not a panic or a hang.
        let deep = format!(
            r#"{{"ok":true,"result":{}1{}}}"#,
            "[".repeat(500),
            "]".repeat(500)
        );
        assert!(matches!(
            parse_envelope(200, deep.as_bytes()),
            Err(TelegramError::InvalidResponse(e)) if e.contains("cannot be decoded")
        ));
    }

    #[test]
    fn update_needs_an_integer_id() {
        assert_eq!(
            Update::from_value(json!([1])).unwrap_err(),
            UpdateError::NotAnObject
        );
        assert_eq!(
            Update::from_value(json!({"update_id": "x", "message": {}})).unwrap_err(),
            UpdateError::NoUpdateId
        );
        let u = Update::from_value(json!({"update_id": 5, "message": {"text": "hi"}})).unwrap();
        assert_eq!(u.id, UpdateId(5));
        assert_eq!(u.kind().unwrap().0, "message");
    }

    #[test]
    fn bot_debug_hides_the_token() {
        let bot = Bot::new(
            "http://127.0.0.1:1",
            &BotToken::new("77:SECRET"),
            Duration::from_secs(1),
        );
        assert!(!format!("{bot:?}").contains("SECRET"));
    }
}
