//! A Bot API call an application made, and what became of it: the data the
//! outgoing path carries, from the scope through the Outbox and the Sender,
//! and back to the scope as one [`Outcome`].
//!
//! A [`Call`] says what the app asked for and where it belongs (its
//! [`Cause`], its outbox row once stored); how the Sender paces and retries
//! it is the Sender's own business and does not travel with it.

use actix::prelude::*;
use serde_json::{json, Value};

use crate::actors::worker::Worker;
use crate::bridge::Sid;
use crate::telegram::Params;

/// Which update's handling made a call, and how many calls that handling
/// had made before it: a repeat of the call after the update is delivered
/// again has the same cause.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cause {
    pub update_id: i64,
    pub ordinal: u32,
}

/// Where the outcome of a call goes, when the app asked for it.
pub struct ReplyTo {
    pub to: Recipient<CallDone>,
    pub request_id: Value,
    /// The instance that asked: a scope's next instance (after a worker
    /// died) must not take it for the answer to one of its own calls.
    pub sid: Sid,
}

/// One Bot API call, as the app made it.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Call {
    pub method: String,
    pub params: Params,
    pub reply: Option<ReplyTo>,
    /// `None` when the app had no update in hand (lifespan, a background
    /// task): nothing would bring the call back after a crash.
    pub cause: Option<Cause>,
    /// Its id in the journal's outbox, once the Outbox stored it; the Outbox
    /// hears of its outcome by this id.
    pub row: Option<i64>,
    /// The worker whose app made it, so that backpressure can reach that
    /// worker.
    pub origin: Option<Addr<Worker>>,
    /// A getFile made for a `telegram.download`: its File is fetched before
    /// the app hears of it (the Sender's `download`). It only reads, so it
    /// is never stored nor recognised as a repeat: made again, it reads the
    /// same file.
    pub download: bool,
}

impl Call {
    pub fn new(method: String, params: Params, reply: Option<ReplyTo>) -> Call {
        Call {
            method,
            params,
            reply,
            cause: None,
            row: None,
            origin: None,
            download: false,
        }
    }

    /// Marks a getFile as a `telegram.download`'s (see [`Call::download`]).
    pub fn as_download(mut self) -> Call {
        self.download = true;
        self
    }

    pub fn caused_by(mut self, cause: Cause) -> Call {
        self.cause = Some(cause);
        self
    }

    pub fn from_worker(mut self, worker: Addr<Worker>) -> Call {
        self.origin = Some(worker);
        self
    }

    /// The Outbox wants to hear of its outcome: to record it, or to answer
    /// a repeat of it.
    pub fn is_tracked(&self) -> bool {
        self.row.is_some() || self.cause.is_some()
    }

    /// The chat this call goes to, as Telegram would see it: the Sender
    /// keeps one order per chat.
    pub fn chat(&self) -> Option<String> {
        chat_of_json(self.params.get("chat_id")?)
    }
}

/// [`chat_of`] for a value's JSON text.
pub fn chat_of_json(chat_id: &str) -> Option<String> {
    if chat_id.starts_with('"') {
        serde_json::from_str(chat_id).ok()
    } else if is_plain_integer(chat_id) {
        Some(chat_id.to_owned())
    } else {
        // As `Value::Number` writes it, which is how it was named before.
        serde_json::from_str::<serde_json::Number>(chat_id)
            .ok()
            .map(|n| n.to_string())
    }
}

/// A `chat_id` as a name: a number or a `@username`; anything else is not
/// one Telegram would take.
pub fn chat_of(chat_id: &Value) -> Option<String> {
    match chat_id {
        Value::Number(n) => Some(n.to_string()),
        Value::String(s) => Some(s.clone()),
        _ => None,
    }
}

/// An integer as `Value::Number` writes one: no leading zeros, no `-0`, and
/// short enough to be an `i64`.
fn is_plain_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty()
        && digits.len() <= 18
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (!digits.starts_with('0') || (digits == "0" && !text.starts_with('-')))
}

/// The final outcome of a call, after the retries the Sender makes on its
/// own: Telegram's `result`, or the error envelope (`ok: false`,
/// `error_code`, `description`, `parameters` where Telegram gave them).
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Result(Value),
    Error(Value),
}

impl Outcome {
    /// What a repeat of a call gets when the first call's outcome was not
    /// kept (its app did not ask for it).
    pub fn not_kept() -> Outcome {
        Outcome::refused(
            "this call was already made while handling the same update, and its outcome was not kept",
        )
    }

    /// A call the daemon did not make, saying why: an error the app tells
    /// apart from Telegram's by its `error_code` 0.
    pub fn refused(description: &str) -> Outcome {
        Outcome::Error(json!({
            "ok": false,
            "error_code": 0,
            "description": description,
        }))
    }

    pub fn is_ok(&self) -> bool {
        matches!(self, Outcome::Result(_))
    }

    /// The result, or the error envelope.
    pub fn as_result(&self) -> Result<&Value, &Value> {
        match self {
            Outcome::Result(result) => Ok(result),
            Outcome::Error(envelope) => Err(envelope),
        }
    }

    /// As the journal keeps it: the Bot API's answer (`{"ok": true,
    /// "result": ...}` or the error envelope).
    pub fn into_answer(self) -> Value {
        match self {
            Outcome::Result(result) => json!({"ok": true, "result": result}),
            Outcome::Error(envelope) => envelope,
        }
    }

    /// Back from [`Outcome::into_answer`]'s form; any answer without `"ok":
    /// true` is an error.
    pub fn from_answer(answer: Value) -> Outcome {
        if answer.get("ok") == Some(&Value::Bool(true)) {
            Outcome::Result(answer.get("result").cloned().unwrap_or(Value::Null))
        } else {
            Outcome::Error(answer)
        }
    }

    /// The `telegram.api.response` event the app receives (docs/protocol.md).
    pub fn into_event(self, request_id: Value) -> Value {
        let mut event = match self {
            Outcome::Result(result) => {
                json!({"type": "telegram.api.response", "ok": true, "result": result})
            }
            Outcome::Error(mut envelope) => {
                envelope["type"] = json!("telegram.api.response");
                envelope
            }
        };
        event["request_id"] = request_id;
        event
    }
}

/// The outcome of a call, for the app that asked.
#[derive(Message)]
#[rtype(result = "()")]
pub struct CallDone {
    pub request_id: Value,
    pub outcome: Outcome,
    /// As in the [`ReplyTo`] it answers.
    pub sid: Sid,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(v: Value) -> Params {
        match v {
            Value::Object(m) => Params::from_map(&m),
            _ => unreachable!("tests pass JSON objects"),
        }
    }

    fn envelope() -> Value {
        json!({"ok": false, "error_code": 400, "description": "Bad Request: chat not found"})
    }

    #[test]
    fn a_result_becomes_the_documented_response_event() {
        let event = Outcome::Result(json!({"message_id": 5})).into_event(json!("r1"));
        assert_eq!(
            event,
            json!({"type": "telegram.api.response", "ok": true,
                   "result": {"message_id": 5}, "request_id": "r1"})
        );
    }

    #[test]
    fn an_error_keeps_telegrams_fields_in_the_response_event() {
        let mut with_parameters = envelope();
        with_parameters["parameters"] = json!({"retry_after": 3});
        let event = Outcome::Error(with_parameters).into_event(json!(7));
        assert_eq!(
            event,
            json!({"type": "telegram.api.response", "ok": false, "error_code": 400,
                   "description": "Bad Request: chat not found",
                   "parameters": {"retry_after": 3}, "request_id": 7})
        );
    }

    #[test]
    fn the_journals_form_is_the_bot_api_answer_and_reads_back() {
        let ok = Outcome::Result(json!([1, 2]));
        assert_eq!(
            ok.clone().into_answer(),
            json!({"ok": true, "result": [1, 2]})
        );
        assert_eq!(Outcome::from_answer(ok.clone().into_answer()), ok);
        let err = Outcome::Error(envelope());
        assert_eq!(err.clone().into_answer(), envelope());
        assert_eq!(Outcome::from_answer(err.clone().into_answer()), err);
        // `true` (the result of e.g. deleteMessage) stays a result.
        let t = Outcome::Result(json!(true));
        assert_eq!(Outcome::from_answer(t.clone().into_answer()), t);
    }

    #[test]
    fn an_answer_without_ok_true_is_an_error() {
        let odd = json!({"ok": "yes", "result": 1});
        assert_eq!(Outcome::from_answer(odd.clone()), Outcome::Error(odd));
        assert_eq!(
            Outcome::from_answer(json!({"ok": true})),
            Outcome::Result(Value::Null)
        );
    }

    #[test]
    fn an_outcome_not_kept_is_an_error_the_app_can_tell_apart() {
        let outcome = Outcome::not_kept();
        assert!(!outcome.is_ok());
        let envelope = outcome.as_result().expect_err("an error");
        assert_eq!(envelope["error_code"], json!(0));
        assert_eq!(envelope["ok"], json!(false));
    }

    #[test]
    fn only_calls_with_a_cause_or_a_row_are_tracked() {
        let call = || Call::new("sendMessage".into(), object(json!({"chat_id": 1})), None);
        assert!(!call().is_tracked());
        let cause = Cause {
            update_id: 10,
            ordinal: 0,
        };
        assert!(call().caused_by(cause).is_tracked());
        let mut stored = call();
        stored.row = Some(3);
        assert!(stored.is_tracked());
    }

    #[test]
    fn the_chat_is_the_chat_id_as_telegram_sees_it() {
        let call = |p: Value| Call::new("sendMessage".into(), object(p), None);
        assert_eq!(
            call(json!({"chat_id": -100})).chat().as_deref(),
            Some("-100")
        );
        assert_eq!(
            call(json!({"chat_id": "@channel"})).chat().as_deref(),
            Some("@channel")
        );
        assert_eq!(call(json!({"chat_id": [1]})).chat(), None);
        assert_eq!(call(json!({"chat_id": null})).chat(), None);
        let written = |text: &str| {
            let params = Params::from_json(text).expect("an object");
            Call::new("sendMessage".into(), params, None).chat()
        };
        // Named as a JSON tree names it, however the app wrote the number.
        assert_eq!(written(r#"{"chat_id": 1e2}"#).as_deref(), Some("100.0"));
        for id in [
            "0",
            "-0",
            "7",
            "-1001234567890",
            "12345678901234567890",
            "-12.5",
        ] {
            let tree = serde_json::from_str::<Value>(id).expect("a JSON number");
            assert_eq!(
                written(&format!(r#"{{"chat_id": {id}}}"#)),
                chat_of(&tree),
                "{id}"
            );
        }
        assert_eq!(
            written(r#"{"chat_id": "\u0040ch"}"#).as_deref(),
            Some("@ch")
        );
        assert_eq!(call(json!({"callback_query_id": "x"})).chat(), None);
    }
}
