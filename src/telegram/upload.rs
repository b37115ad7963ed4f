//! File uploads: turning an app's parameters with `bytes` values into a
//! `multipart/form-data` body, as the Bot API takes files.
//!
//! On the worker channel a `bytes` value travels as `{"$bytes": "<base64>"}`.
//! Where one appears:
//! 1. directly as a parameter (`"photo": b"..."`): a file part of that name;
//! 2. as `{"filename": "cat.jpg", "content": b"..."}`: the same, with that
//!    file name;
//! 3. deeper, inside a JSON-serialized parameter (`media` of sendMediaGroup,
//!    `sticker` lists, ...): replaced by `"attach://fileN"` and sent as file
//!    part `fileN`, which is how Telegram links the two.
//!
//! Every other parameter becomes a text part: strings as they are, anything
//! else JSON-serialized (Telegram parses `reply_markup`, `media`, numbers and
//! booleans from text).

use base64::Engine;
use bytes::{BufMut, Bytes, BytesMut};
use serde_json::{Map, Value};

/// One file to upload.
#[derive(Debug, Clone, PartialEq)]
pub struct FilePart {
    pub field: String,
    pub filename: String,
    pub content: Bytes,
}

/// Why parameters could not be made into an upload.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum UploadError {
    #[error("parameter {0}: invalid base64 in a bytes value")]
    BadBase64(String),
}

/// Whether `params` holds any `bytes` value (then the call needs multipart).
pub fn has_files(value: &Value) -> bool {
    match value {
        Value::Object(m) => m.contains_key("$bytes") && m.len() == 1 || m.values().any(has_files),
        Value::Array(a) => a.iter().any(has_files),
        _ => false,
    }
}

/// Text parameters as (name, value) pairs.
pub type TextFields = Vec<(String, String)>;

/// Splits `params` into text fields and file parts (rules in the module doc).
pub fn split(params: &Map<String, Value>) -> Result<(TextFields, Vec<FilePart>), UploadError> {
    let mut fields = Vec::new();
    let mut files = Vec::new();
    for (key, value) in params {
        if let Some(content) = as_bytes(value, key)? {
            files.push(FilePart {
                field: key.clone(),
                filename: key.clone(),
                content,
            });
            continue;
        }
        if let Some((filename, content)) = as_named_file(value, key)? {
            files.push(FilePart {
                field: key.clone(),
                filename,
                content,
            });
            continue;
        }
        let mut value = value.clone();
        attach_nested(&mut value, key, &mut files)?;
        let text = match value {
            Value::String(s) => s,
            other => other.to_string(),
        };
        fields.push((key.clone(), text));
    }
    Ok((fields, files))
}

fn as_bytes(value: &Value, key: &str) -> Result<Option<Bytes>, UploadError> {
    match value {
        Value::Object(m) if m.len() == 1 => match m.get("$bytes") {
            Some(Value::String(b64)) => base64::engine::general_purpose::STANDARD
                .decode(b64)
                .map(|v| Some(Bytes::from(v)))
                .map_err(|_| UploadError::BadBase64(key.to_string())),
            _ => Ok(None),
        },
        _ => Ok(None),
    }
}

fn as_named_file(value: &Value, key: &str) -> Result<Option<(String, Bytes)>, UploadError> {
    let Value::Object(m) = value else {
        return Ok(None);
    };
    let (Some(Value::String(name)), Some(content)) = (m.get("filename"), m.get("content")) else {
        return Ok(None);
    };
    if m.len() != 2 {
        return Ok(None);
    }
    Ok(as_bytes(content, key)?.map(|c| (name.clone(), c)))
}

/// Replaces nested files by `attach://fileN` and collects them.
fn attach_nested(
    value: &mut Value,
    key: &str,
    files: &mut Vec<FilePart>,
) -> Result<(), UploadError> {
    let found = match &*value {
        v @ Value::Object(_) => match (as_bytes(v, key)?, as_named_file(v, key)?) {
            (Some(content), _) => Some((None, content)),
            (None, Some((name, content))) => Some((Some(name), content)),
            _ => None,
        },
        _ => None,
    };
    if let Some((name, content)) = found {
        let field = format!("file{}", files.len());
        *value = Value::String(format!("attach://{field}"));
        files.push(FilePart {
            filename: name.unwrap_or_else(|| field.clone()),
            field,
            content,
        });
        return Ok(());
    }
    match value {
        Value::Object(m) => m
            .values_mut()
            .try_for_each(|v| attach_nested(v, key, files)),
        Value::Array(a) => a.iter_mut().try_for_each(|v| attach_nested(v, key, files)),
        _ => Ok(()),
    }
}

/// A `multipart/form-data` body and its content type.
pub fn encode(fields: &[(String, String)], files: &[FilePart]) -> (String, Bytes) {
    let boundary = format!(
        "asgigramd-{:016x}{:016x}",
        fastrand::u64(..),
        fastrand::u64(..)
    );
    let mut body = BytesMut::new();
    for (name, value) in fields {
        body.put_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"\r\n\r\n",
                quote(name)
            )
            .as_bytes(),
        );
        body.put_slice(value.as_bytes());
        body.put_slice(b"\r\n");
    }
    for f in files {
        body.put_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{}\"; filename=\"{}\"\r\nContent-Type: application/octet-stream\r\n\r\n",
                quote(&f.field),
                quote(&f.filename)
            )
            .as_bytes(),
        );
        body.put_slice(&f.content);
        body.put_slice(b"\r\n");
    }
    body.put_slice(format!("--{boundary}--\r\n").as_bytes());
    (
        format!("multipart/form-data; boundary={boundary}"),
        body.freeze(),
    )
}

/// Header parameter values may not carry quotes or line breaks.
fn quote(s: &str) -> String {
    s.replace(['"', '\r', '\n'], "_")
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn b64(data: &[u8]) -> Value {
        json!({"$bytes": base64::engine::general_purpose::STANDARD.encode(data)})
    }

    #[test]
    fn top_level_and_named_files_become_parts() {
        let params = json!({"chat_id": 5, "photo": b64(b"PNG"), "document": {"filename": "a.txt", "content": b64(b"hi")}, "caption": "c"});
        let (fields, files) = split(params.as_object().unwrap()).unwrap();
        assert!(fields.contains(&("chat_id".into(), "5".into())));
        assert!(fields.contains(&("caption".into(), "c".into())));
        assert_eq!(files.len(), 2);
        let photo = files.iter().find(|f| f.field == "photo").unwrap();
        assert_eq!(&photo.content[..], b"PNG");
        let doc = files.iter().find(|f| f.field == "document").unwrap();
        assert_eq!(doc.filename, "a.txt");
    }

    #[test]
    fn nested_files_are_attached_by_reference() {
        let params = json!({"chat_id": 1, "media": [
            {"type": "photo", "media": b64(b"one")},
            {"type": "photo", "media": "https://example.invalid/x.jpg"},
            {"type": "photo", "media": {"filename": "two.jpg", "content": b64(b"two")}},
        ]});
        assert!(has_files(&params));
        let (fields, files) = split(params.as_object().unwrap()).unwrap();
        let media: Value =
            serde_json::from_str(&fields.iter().find(|(k, _)| k == "media").unwrap().1).unwrap();
        assert_eq!(media[0]["media"], "attach://file0");
        assert_eq!(media[1]["media"], "https://example.invalid/x.jpg");
        assert_eq!(media[2]["media"], "attach://file1");
        assert_eq!(files[1].filename, "two.jpg");
        assert_eq!(&files[1].content[..], b"two");
    }

    #[test]
    fn no_bytes_means_no_files_and_bad_base64_is_an_error() {
        assert!(!has_files(
            &json!({"chat_id": 1, "text": "x", "reply_markup": {"inline_keyboard": []}})
        ));
        let err = split(json!({"photo": {"$bytes": "!!"}}).as_object().unwrap()).unwrap_err();
        assert_eq!(err, UploadError::BadBase64("photo".into()));
    }

    #[test]
    fn encoded_body_has_every_part_and_the_closing_boundary() {
        let (ct, body) = encode(
            &[("chat_id".into(), "5".into())],
            &[FilePart {
                field: "photo".into(),
                filename: "p.png".into(),
                content: Bytes::from_static(b"\x89PNG"),
            }],
        );
        let boundary = ct.strip_prefix("multipart/form-data; boundary=").unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(text.contains("name=\"chat_id\"\r\n\r\n5\r\n"));
        assert!(text.contains("name=\"photo\"; filename=\"p.png\""));
        assert!(text.ends_with(&format!("--{boundary}--\r\n")));
    }
}
