//! Events and calls from other programs: what `POST /v1/chats/{chat_id}/events`
//! and `POST /v1/calls` accept (docs/protocol.md, "Events and calls from
//! other programs"), checked before anything is stored, and the form a
//! pushed event has in the journal.
//!
//! Plain functions: the endpoint ([`crate::ops::api`]) calls them on the
//! request's body and answers 400 with the [`BadRequest`]'s message; the
//! [`crate::actors::ingress::Ingress`] takes what they return.

use serde_json::{json, Map, Value};

/// The largest body either route accepts: an event is stored and delivered
/// whole, and a Bot API call's JSON parameters are far below this.
pub const MAX_BODY: usize = 1 << 20;

/// The prefix every pushed event's `type` has, so that an app can tell
/// events of its own programs from Telegram's (`telegram.*`).
pub const APP_PREFIX: &str = "app.";

/// Methods that would take the bot's updates or its token away from the
/// daemon: getUpdates would confirm updates the daemon has not seen, a
/// webhook stops polling, logOut and close end the bot's session.
const RESERVED_METHODS: &[&str] = &[
    "close",
    "deleteWebhook",
    "getUpdates",
    "logOut",
    "setWebhook",
];

/// Why a request is refused with 400; nothing of it was stored. The message
/// is the answer's `error`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum BadRequest {
    #[error("the chat id {0:?} is not an integer")]
    ChatId(String),
    #[error("the body is larger than {MAX_BODY} bytes (1 MiB)")]
    TooLarge,
    #[error("the body cannot be read: {0}")]
    Unreadable(String),
    #[error("the body is not JSON: {0}")]
    NotJson(String),
    #[error("the body must be a JSON object")]
    NotAnObject,
    #[error("\"type\" must be a string that starts with \"app.\", such as \"app.order_shipped\"")]
    Type,
    #[error(
        "\"update_id\" is given by asgigramd (the id the event gets in the journal); leave it out"
    )]
    UpdateId,
    #[error("\"method\" must be a Bot API method name such as \"sendMessage\"")]
    Method,
    #[error("{0} is the daemon's own (it polls Telegram for the bot); it cannot be called here")]
    ReservedMethod(String),
    #[error("\"params\" must be a JSON object")]
    Params,
    #[error("unknown key {0:?}: a call has \"method\" and \"params\"")]
    UnknownKey(String),
}

/// The `{chat_id}` of the path.
pub fn chat_id(segment: &str) -> Result<i64, BadRequest> {
    segment
        .parse()
        .map_err(|_| BadRequest::ChatId(segment.to_string()))
}

fn object(body: &[u8]) -> Result<Map<String, Value>, BadRequest> {
    if body.len() > MAX_BODY {
        return Err(BadRequest::TooLarge);
    }
    match serde_json::from_slice(body) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(BadRequest::NotAnObject),
        Err(e) => Err(BadRequest::NotJson(e.to_string())),
    }
}

/// The body of `POST /v1/chats/{chat_id}/events`: a JSON object whose
/// `type` starts with `app.`; every other key is the app's.
pub fn event(body: &[u8]) -> Result<Map<String, Value>, BadRequest> {
    let event = object(body)?;
    match event.get("type").and_then(Value::as_str) {
        Some(t) if t.len() > APP_PREFIX.len() && t.starts_with(APP_PREFIX) => {}
        _ => return Err(BadRequest::Type),
    }
    if event.contains_key("update_id") {
        return Err(BadRequest::UpdateId);
    }
    Ok(event)
}

/// The body of `POST /v1/calls`: `{"method": ..., "params": {...}}`
/// (`params` may be left out).
pub fn call(body: &[u8]) -> Result<(String, Map<String, Value>), BadRequest> {
    let mut call = object(body)?;
    let method = match call.remove("method") {
        Some(Value::String(m))
            if !m.is_empty() && m.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') =>
        {
            m
        }
        _ => return Err(BadRequest::Method),
    };
    if RESERVED_METHODS
        .iter()
        .any(|r| r.eq_ignore_ascii_case(&method))
    {
        return Err(BadRequest::ReservedMethod(method));
    }
    let params = match call.remove("params") {
        None => Map::new(),
        Some(Value::Object(p)) => p,
        Some(_) => return Err(BadRequest::Params),
    };
    if let Some(key) = call.keys().next() {
        return Err(BadRequest::UnknownKey(key.clone()));
    }
    Ok((method, params))
}

/// An event pushed into a chat, with the id the journal knows it by.
#[derive(Debug, Clone, PartialEq)]
pub struct PushedEvent {
    /// Negative (rule 8 of [`crate::journal`]); the event's `update_id`.
    pub id: i64,
    pub chat_id: i64,
    /// As the app receives it: the pushed object with `update_id` added.
    pub event: Value,
}

impl PushedEvent {
    pub fn new(id: i64, chat_id: i64, mut event: Map<String, Value>) -> PushedEvent {
        event.insert("update_id".into(), json!(id));
        PushedEvent {
            id,
            chat_id,
            event: Value::Object(event),
        }
    }

    /// A stored body, and the chat it names.
    fn stored(body: &[u8]) -> Result<(i64, Value), String> {
        let stored: Value = serde_json::from_slice(body).map_err(|e| e.to_string())?;
        let chat_id = stored
            .get("chat_id")
            .and_then(Value::as_i64)
            .ok_or("no chat_id")?;
        Ok((chat_id, stored))
    }

    /// Its body in the journal.
    pub fn encode(&self) -> String {
        json!({"chat_id": self.chat_id, "event": self.event}).to_string()
    }

    /// Back from [`PushedEvent::encode`], after a restart.
    pub fn decode(id: i64, body: &str) -> Result<PushedEvent, String> {
        let (chat_id, stored) = PushedEvent::stored(body.as_bytes())?;
        match stored.get("event") {
            Some(event @ Value::Object(_)) if event.get("update_id") == Some(&json!(id)) => {
                Ok(PushedEvent {
                    id,
                    chat_id,
                    event: event.clone(),
                })
            }
            _ => Err("no event with this id".into()),
        }
    }

    /// Its body in a cluster's update log, stored before it has an id (the
    /// log's sequence gives it one: `cluster::log::pushed_id`).
    pub fn encode_unnumbered(chat_id: i64, event: &Map<String, Value>) -> String {
        json!({"chat_id": chat_id, "event": event}).to_string()
    }

    /// Back from [`PushedEvent::encode_unnumbered`], as event `id`.
    pub fn decode_numbered(id: i64, body: &[u8]) -> Result<PushedEvent, String> {
        let (chat_id, stored) = PushedEvent::stored(body)?;
        match stored.get("event") {
            Some(Value::Object(event)) => Ok(PushedEvent::new(id, chat_id, event.clone())),
            _ => Err("no event object".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unnumbered_event_gets_its_id_when_read_back() {
        let event = event(br#"{"type": "app.ping", "n": 1}"#).unwrap();
        let body = PushedEvent::encode_unnumbered(-100, &event);
        assert!(!body.contains("update_id"), "{body}");
        let read = PushedEvent::decode_numbered(-42, body.as_bytes()).unwrap();
        assert_eq!((read.id, read.chat_id), (-42, -100));
        assert_eq!(read.event["update_id"], json!(-42));
        assert_eq!(read.event["n"], json!(1));
        assert!(PushedEvent::decode_numbered(-1, b"{\"chat_id\": 1}").is_err());
        assert!(PushedEvent::decode_numbered(-1, b"not json").is_err());
    }

    #[test]
    fn an_event_is_an_object_of_an_app_type_without_an_update_id() {
        let ok = event(br#"{"type": "app.order_shipped", "order": 17}"#).unwrap();
        assert_eq!(ok["order"], json!(17));
        for (body, want) in [
            (&b"not json"[..], "not JSON"),
            (b"[1, 2]", "JSON object"),
            (br#"{"order": 17}"#, "starts with"),
            (br#"{"type": "telegram.message"}"#, "starts with"),
            (br#"{"type": "app."}"#, "starts with"),
            (br#"{"type": 5}"#, "starts with"),
            (br#"{"type": "app.x", "update_id": 3}"#, "update_id"),
        ] {
            let err = event(body).unwrap_err().to_string();
            assert!(
                err.contains(want),
                "{}: {err}",
                String::from_utf8_lossy(body)
            );
        }
        let big = format!(r#"{{"type": "app.x", "pad": "{}"}}"#, "x".repeat(MAX_BODY));
        assert_eq!(event(big.as_bytes()), Err(BadRequest::TooLarge));
    }

    #[test]
    fn a_chat_id_is_an_integer() {
        assert_eq!(chat_id("-100123"), Ok(-100123));
        assert!(matches!(chat_id("@channel"), Err(BadRequest::ChatId(_))));
        assert!(matches!(chat_id("1.5"), Err(BadRequest::ChatId(_))));
        assert!(matches!(
            chat_id("99999999999999999999"),
            Err(BadRequest::ChatId(_))
        ));
    }

    #[test]
    fn a_call_is_a_method_and_its_params() {
        let (method, params) =
            call(br#"{"method": "sendMessage", "params": {"chat_id": 1, "text": "hi"}}"#).unwrap();
        assert_eq!(method, "sendMessage");
        assert_eq!(params["text"], json!("hi"));
        assert_eq!(call(br#"{"method": "getMe"}"#).unwrap().1, Map::new());
        for (body, want) in [
            (&br#"{"params": {}}"#[..], BadRequest::Method),
            (br#"{"method": "send/../x"}"#, BadRequest::Method),
            (br#"{"method": ""}"#, BadRequest::Method),
            (br#"{"method": "getMe", "params": [1]}"#, BadRequest::Params),
            (
                br#"{"method": "getMe", "param": {}}"#,
                BadRequest::UnknownKey("param".into()),
            ),
            (
                br#"{"method": "getupdates"}"#,
                BadRequest::ReservedMethod("getupdates".into()),
            ),
            (
                br#"{"method": "setWebhook", "params": {}}"#,
                BadRequest::ReservedMethod("setWebhook".into()),
            ),
        ] {
            assert_eq!(call(body), Err(want), "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn a_pushed_event_reads_back_from_the_journal_as_it_was() {
        let map = event(br#"{"type": "app.x", "n": [1, {"a": null}]}"#).unwrap();
        let pushed = PushedEvent::new(-7, 42, map);
        assert_eq!(pushed.event["update_id"], json!(-7));
        assert_eq!(
            PushedEvent::decode(-7, &pushed.encode()),
            Ok(pushed.clone())
        );
        assert!(
            PushedEvent::decode(-8, &pushed.encode()).is_err(),
            "another id"
        );
        assert!(PushedEvent::decode(-7, "{}").is_err());
    }
}
