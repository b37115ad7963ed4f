//! Telegram's answer envelopes and error wording.

use std::fmt::Display;

use serde_json::{json, Map, Value};

/// An error answer, as Telegram words it.
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct ApiError {
    pub code: u16,
    pub description: String,
    /// The envelope's `parameters` object (`retry_after`, `migrate_to_chat_id`).
    pub parameters: Option<Value>,
}

impl ApiError {
    fn new(code: u16, description: String) -> Self {
        ApiError {
            code,
            description,
            parameters: None,
        }
    }

    /// 400 with Telegram's "Bad Request: " prefix.
    pub fn bad_request(what: impl Display) -> Self {
        Self::new(400, format!("Bad Request: {what}"))
    }

    pub fn forbidden(what: impl Display) -> Self {
        Self::new(403, format!("Forbidden: {what}"))
    }

    pub fn unauthorized() -> Self {
        Self::new(401, "Unauthorized".to_string())
    }

    pub fn not_found() -> Self {
        Self::new(404, "Not Found".to_string())
    }

    pub fn conflict(description: &str) -> Self {
        Self::new(409, description.to_string())
    }

    pub fn too_many_requests(retry_after: u64) -> Self {
        ApiError {
            code: 429,
            description: format!("Too Many Requests: retry after {retry_after}"),
            parameters: Some(json!({ "retry_after": retry_after })),
        }
    }

    pub fn payload_too_large() -> Self {
        Self::new(413, "Request Entity Too Large".to_string())
    }

    pub fn migrated(to: i64) -> Self {
        ApiError {
            code: 400,
            description: "Bad Request: group chat was upgraded to a supergroup chat".to_string(),
            parameters: Some(json!({ "migrate_to_chat_id": to })),
        }
    }

    /// Seconds to wait, for the `Retry-After` header of a 429.
    pub fn retry_after(&self) -> Option<u64> {
        self.parameters.as_ref()?.get("retry_after")?.as_u64()
    }

    pub fn envelope(&self) -> Value {
        let mut body = Map::new();
        body.insert("ok".into(), Value::Bool(false));
        body.insert("error_code".into(), self.code.into());
        body.insert("description".into(), self.description.clone().into());
        if let Some(parameters) = &self.parameters {
            body.insert("parameters".into(), parameters.clone());
        }
        Value::Object(body)
    }
}

/// A successful answer. Telegram adds a `description` to a few of them
/// ("Webhook was set").
#[derive(Clone, Debug, PartialEq)]
pub(crate) struct Success {
    pub result: Value,
    pub description: Option<&'static str>,
}

impl Success {
    pub fn envelope(&self) -> Value {
        let mut body = json!({ "ok": true, "result": self.result });
        if let Some(description) = self.description {
            body["description"] = description.into();
        }
        body
    }
}

impl From<Value> for Success {
    fn from(result: Value) -> Self {
        Success {
            result,
            description: None,
        }
    }
}

pub(crate) type Outcome = Result<Success, ApiError>;

/// What goes back over HTTP for an outcome.
pub(crate) struct Reply {
    pub status: u16,
    pub body: Value,
    pub retry_after: Option<u64>,
}

impl From<&Outcome> for Reply {
    fn from(outcome: &Outcome) -> Self {
        match outcome {
            Ok(success) => Reply {
                status: 200,
                body: success.envelope(),
                retry_after: None,
            },
            Err(error) => Reply {
                status: error.code,
                body: error.envelope(),
                retry_after: error.retry_after(),
            },
        }
    }
}
