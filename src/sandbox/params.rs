//! Reading a call's parameters the way Telegram does.
//!
//! Telegram accepts parameters in the query string and in JSON, url-encoded
//! or multipart bodies, and treats them all as strings that each method then
//! reads as a number, a flag or JSON. We convert them once, using the
//! schema's parameter types, so recorded calls hold what Telegram understood
//! (`"chat_id":"42"` becomes `42`, a JSON-serialized `reply_markup` becomes an
//! object). Parameters unknown to the schema are kept as sent.

use actix_web::{web, HttpMessage, HttpRequest};
use futures_util::{StreamExt, TryStreamExt};
use serde_json::{Map, Value};

use super::envelope::ApiError;
use super::schema::{Method, ParamKind};
use super::state::UploadedFile;

/// Largest request body accepted; Telegram's upload limit is 50 MB.
const MAX_BODY: usize = 64 << 20;

/// A request's parameters before they are matched to a method.
#[derive(Default)]
pub(crate) struct Input {
    pub params: Map<String, Value>,
    pub files: Vec<UploadedFile>,
}

/// Collects the parameters of a request from its query string and body.
pub(crate) async fn read(req: &HttpRequest, payload: web::Payload) -> Result<Input, ApiError> {
    let mut input = Input::default();
    add_form(&mut input.params, req.query_string())?;
    match req.content_type().to_ascii_lowercase().as_str() {
        "application/json" => {
            let body = read_body(payload).await?;
            add_json(&mut input.params, &body)?;
        }
        "application/x-www-form-urlencoded" => {
            let body = read_body(payload).await?;
            let text = std::str::from_utf8(&body)
                .map_err(|_| ApiError::bad_request("can't parse request body"))?;
            add_form(&mut input.params, text)?;
        }
        "multipart/form-data" => read_multipart(req, payload, &mut input).await?,
        // Telegram ignores bodies of other types.
        _ => {}
    }
    Ok(input)
}

async fn read_body(mut payload: web::Payload) -> Result<Vec<u8>, ApiError> {
    let mut body = Vec::new();
    while let Some(chunk) = payload.next().await {
        let chunk = chunk.map_err(|_| ApiError::bad_request("can't read request body"))?;
        if body.len() + chunk.len() > MAX_BODY {
            return Err(ApiError::payload_too_large());
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn add_form(params: &mut Map<String, Value>, encoded: &str) -> Result<(), ApiError> {
    if encoded.is_empty() {
        return Ok(());
    }
    let pairs = web::Query::<Vec<(String, String)>>::from_query(encoded)
        .map_err(|_| ApiError::bad_request("can't parse request parameters"))?;
    for (name, value) in pairs.into_inner() {
        params.insert(name, Value::String(value));
    }
    Ok(())
}

fn add_json(params: &mut Map<String, Value>, body: &[u8]) -> Result<(), ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(());
    }
    match serde_json::from_slice::<Value>(body) {
        Ok(Value::Object(object)) => {
            params.extend(object);
            Ok(())
        }
        _ => Err(ApiError::bad_request("can't parse JSON object")),
    }
}

async fn read_multipart(
    req: &HttpRequest,
    payload: web::Payload,
    input: &mut Input,
) -> Result<(), ApiError> {
    let parts = multipart_parts(req, payload, MAX_BODY)
        .await
        .map_err(|e| match e {
            PartsError::TooLarge => ApiError::payload_too_large(),
            PartsError::Malformed(_) => {
                ApiError::bad_request("can't parse multipart/form-data request")
            }
        })?;
    for part in parts {
        // A part with a file name is an upload; any other part is a plain
        // value, exactly like a url-encoded one.
        if part.file_name.is_some() {
            input.files.push(UploadedFile {
                name: part.name,
                size: part.bytes.len(),
                file_name: part.file_name,
                content_type: part.content_type,
                bytes: part.bytes.into(),
            });
        } else {
            input.params.insert(
                part.name,
                Value::String(String::from_utf8_lossy(&part.bytes).into_owned()),
            );
        }
    }
    Ok(())
}

/// One part of a multipart/form-data body.
pub(crate) struct Part {
    pub name: String,
    /// Present when the part is a file upload.
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub bytes: Vec<u8>,
}

/// Why a multipart/form-data body could not be read.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PartsError {
    #[error("{0}")]
    Malformed(actix_multipart::MultipartError),
    #[error("the body is larger than allowed")]
    TooLarge,
}

/// Reads every part of a multipart/form-data body, refusing it once all the
/// parts together exceed `max_total` bytes (before buffering more).
pub(crate) async fn multipart_parts(
    req: &HttpRequest,
    payload: web::Payload,
    max_total: usize,
) -> Result<Vec<Part>, PartsError> {
    let mut multipart = actix_multipart::Multipart::new(req.headers(), payload);
    let mut parts = Vec::new();
    let mut total = 0usize;
    while let Some(mut field) = multipart.try_next().await.map_err(PartsError::Malformed)? {
        let name = field.name().unwrap_or_default().to_string();
        let file_name = field
            .content_disposition()
            .and_then(|cd| cd.get_filename())
            .map(str::to_string);
        let content_type = field.content_type().map(ToString::to_string);
        let mut bytes = Vec::new();
        while let Some(chunk) = field.try_next().await.map_err(PartsError::Malformed)? {
            total += chunk.len();
            if total > max_total {
                return Err(PartsError::TooLarge);
            }
            bytes.extend_from_slice(&chunk);
        }
        parts.push(Part {
            name,
            file_name,
            content_type,
            bytes,
        });
    }
    Ok(parts)
}

/// Converts every parameter known to `method` to the JSON type Telegram
/// reads it as. Values that do not convert stay as they are.
pub(crate) fn normalize(method: &Method, params: &mut Map<String, Value>) {
    for (name, value) in params.iter_mut() {
        if let Some(param) = method.param(name) {
            convert(ParamKind::of(&param.ty), value);
        }
    }
}

fn convert(kind: ParamKind, value: &mut Value) {
    let Value::String(text) = value else { return };
    let converted = match kind {
        ParamKind::Integer | ParamKind::IntegerOrString => {
            text.trim().parse::<i64>().ok().map(Value::from)
        }
        ParamKind::Float => text.trim().parse::<f64>().ok().map(Value::from),
        ParamKind::Boolean => parse_bool(text).map(Value::Bool),
        ParamKind::Json => parse_json_container(text),
        ParamKind::Text | ParamKind::File => None,
    };
    if let Some(converted) = converted {
        *value = converted;
    }
}

fn parse_bool(text: &str) -> Option<bool> {
    match text.trim().to_ascii_lowercase().as_str() {
        "true" | "1" => Some(true),
        "false" | "0" => Some(false),
        _ => None,
    }
}

/// JSON-serialized parameters are objects or arrays; anything else is left
/// for the method to reject.
fn parse_json_container(text: &str) -> Option<Value> {
    match serde_json::from_str::<Value>(text) {
        Ok(value @ (Value::Object(_) | Value::Array(_))) => Some(value),
        _ => None,
    }
}

/// Whether Telegram would consider the parameter given: present, and neither
/// null nor an empty string.
pub(crate) fn is_present(params: &Map<String, Value>, files: &[UploadedFile], name: &str) -> bool {
    let given = match params.get(name) {
        None | Some(Value::Null) => false,
        Some(Value::String(s)) => !s.is_empty(),
        Some(_) => true,
    };
    given || files.iter().any(|f| f.name == name)
}

#[cfg(test)]
mod tests {
    use super::super::schema::schema;
    use super::*;
    use serde_json::json;

    #[test]
    fn form_values_become_typed() {
        let method = schema().method("sendMessage").unwrap();
        let mut params = Map::new();
        add_form(
            &mut params,
            "chat_id=42&text=hi%20there&disable_notification=true&reply_markup=%7B%22inline_keyboard%22%3A%5B%5D%7D&extra=7",
        )
        .unwrap();
        normalize(method, &mut params);
        assert_eq!(
            Value::Object(params),
            json!({"chat_id": 42, "text": "hi there", "disable_notification": true,
                   "reply_markup": {"inline_keyboard": []}, "extra": "7"})
        );
    }

    #[test]
    fn usernames_and_bad_json_are_kept() {
        let method = schema().method("sendMessage").unwrap();
        let mut params = Map::new();
        params.insert("chat_id".into(), json!("@channel"));
        params.insert("reply_markup".into(), json!("{not json"));
        normalize(method, &mut params);
        assert_eq!(params["chat_id"], json!("@channel"));
        assert_eq!(params["reply_markup"], json!("{not json"));
    }

    #[test]
    fn json_body_must_be_an_object() {
        let mut params = Map::new();
        assert!(add_json(&mut params, b"[1]").is_err());
        add_json(&mut params, br#"{"chat_id": "5"}"#).unwrap();
        assert_eq!(params["chat_id"], json!("5"));
    }
}
