//! File downloads: from the File object `getFile` answers to the file's
//! bytes, fetched from `{api_url}/file/bot<token>/<file_path>` within the
//! 20 MB Telegram lets bots download.
//!
//! That URL holds the token, so it is built only inside [`Bot::download`] and
//! never logged or put in an error. What goes back to the app is the File
//! object, whose `file_path` is relative and carries no token, with the
//! content beside its fields ([`with_content`]).
//!
//! A file over the limit is refused whole, never cut short: by the
//! `file_size` getFile reports, and again while the body is read
//! ([`Capped`]), since a File need not say its size.

use std::time::Duration;

use base64::Engine;
use bytes::{Bytes, BytesMut};
use futures_util::StreamExt;
use serde_json::{json, Value};

use super::{classify_send_error, parse_envelope, Bot, TelegramError};

/// The most a bot may download: Telegram's 20 MB.
pub const MAX_DOWNLOAD: usize = 20 * 1024 * 1024;

/// The most of an error answer's body that is read: an envelope is small.
const MAX_ERROR_BODY: usize = 64 * 1024;

/// Why a file could not be downloaded. None is retried: the app gets it as
/// a Bot API error envelope ([`DownloadError::to_envelope`]) and may ask
/// again.
#[derive(Debug, Clone, thiserror::Error)]
pub enum DownloadError {
    /// The File says it is larger than [`MAX_DOWNLOAD`] (`Some(file_size)`),
    /// or its body grew past that (`None`).
    #[error("Bad Request: file is too big to download{}: bots may download files of up to 20 MB", .0.map_or(String::new(), |n| format!(" ({n} bytes)")))]
    TooBig(Option<u64>),
    /// getFile answered a File without a `file_path`.
    #[error("Bad Request: the File has no file_path to download it from")]
    NoPath,
    /// getFile failed, or the file server refused, or the fetch failed or
    /// timed out: as any Bot API call's error.
    #[error(transparent)]
    Failed(#[from] TelegramError),
}

impl DownloadError {
    /// The error as the app gets it, in the Bot API's envelope shape.
    pub fn to_envelope(&self) -> Value {
        match self {
            DownloadError::Failed(e) => e.to_envelope(),
            other => json!({"ok": false, "error_code": 400, "description": other.to_string()}),
        }
    }
}

/// The path to fetch, from getFile's File: refused when the File says the
/// file is over the limit, or names no path.
pub fn file_path(file: &Value) -> Result<&str, DownloadError> {
    if let Some(size) = file.get("file_size").and_then(Value::as_u64) {
        if size > MAX_DOWNLOAD as u64 {
            return Err(DownloadError::TooBig(Some(size)));
        }
    }
    file.get("file_path")
        .and_then(Value::as_str)
        .filter(|p| !p.is_empty())
        .ok_or(DownloadError::NoPath)
}

/// `path` as it goes into the URL: every byte but the unreserved ones and
/// `/` percent-encoded, so a path with a space, `?` or `#` still names the
/// file rather than breaking the URL.
pub fn url_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    for &b in path.as_bytes() {
        if b.is_ascii_alphanumeric() || b"-._~/".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A body as it arrives, refused as soon as it grows past its limit, so a
/// file larger than it claimed is never held whole nor handed on cut short.
pub struct Capped {
    buf: BytesMut,
    limit: usize,
}

impl Capped {
    pub fn new(limit: usize) -> Capped {
        Capped {
            buf: BytesMut::new(),
            limit,
        }
    }

    pub fn push(&mut self, chunk: &[u8]) -> Result<(), DownloadError> {
        if self.buf.len() + chunk.len() > self.limit {
            return Err(DownloadError::TooBig(None));
        }
        self.buf.extend_from_slice(chunk);
        Ok(())
    }

    pub fn finish(self) -> Bytes {
        self.buf.freeze()
    }
}

/// The file server's answer to a failed fetch, as a Bot API error: its own
/// envelope when it sent one, else its HTTP status.
pub fn refusal(status: u16, body: &[u8]) -> TelegramError {
    match parse_envelope(status, body) {
        Err(TelegramError::InvalidResponse(_)) | Ok(_) => TelegramError::Api {
            code: status,
            description: format!("the file server answered HTTP {status}"),
            parameters: None,
        },
        Err(e) => e,
    }
}

/// The result the app receives: the File object with `content` beside its
/// fields, as a bytes value travels on the worker channel (see
/// [`super::upload`]), so the bridge hands the app Python `bytes`.
pub fn with_content(mut file: Value, content: &[u8]) -> Value {
    let encoded = base64::engine::general_purpose::STANDARD.encode(content);
    if let Value::Object(fields) = &mut file {
        fields.insert("content".into(), json!({ "$bytes": encoded }));
    }
    file
}

impl Bot {
    /// Fetches the file `file` (getFile's result) describes, within
    /// `timeout` for the whole exchange and [`MAX_DOWNLOAD`] for its body;
    /// returns the File with its content ([`with_content`]).
    pub async fn download(&self, file: Value, timeout: Duration) -> Result<Value, DownloadError> {
        let path = file_path(&file)?;
        let url = format!("{}{}", self.files, url_path(path));
        let content = match tokio::time::timeout(timeout, self.fetch(url)).await {
            Ok(content) => content?,
            Err(_) => return Err(TelegramError::Timeout(timeout).into()),
        };
        Ok(with_content(file, &content))
    }

    /// One GET of a file URL. `url` holds the token: it goes nowhere but the
    /// request (awc's errors do not carry it, see [`classify_send_error`]).
    async fn fetch(&self, url: String) -> Result<Bytes, DownloadError> {
        let mut response = self
            .client
            .get(url)
            .send()
            .await
            .map_err(classify_send_error)?;
        let status = response.status().as_u16();
        if status != 200 {
            let body = response
                .body()
                .limit(MAX_ERROR_BODY)
                .await
                .unwrap_or_default();
            return Err(refusal(status, &body).into());
        }
        let mut body = Capped::new(MAX_DOWNLOAD);
        while let Some(chunk) = response.next().await {
            let chunk = chunk.map_err(|e| {
                TelegramError::InvalidResponse(format!("reading the file's body: {e}"))
            })?;
            body.push(&chunk)?;
        }
        Ok(body.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_within_the_limit_gives_its_path() {
        let file = json!({"file_id": "a", "file_size": 20 * 1024 * 1024, "file_path": "photos/file_1.jpg"});
        assert_eq!(file_path(&file).unwrap(), "photos/file_1.jpg");
        // A File need not say its size; the body's cap still applies.
        let file = json!({"file_id": "a", "file_path": "documents/x"});
        assert_eq!(file_path(&file).unwrap(), "documents/x");
    }

    #[test]
    fn a_file_over_the_limit_is_refused_before_any_fetch() {
        let file = json!({"file_id": "a", "file_size": 20 * 1024 * 1024 + 1, "file_path": "p"});
        let e = file_path(&file).unwrap_err();
        assert!(
            matches!(e, DownloadError::TooBig(Some(20_971_521))),
            "{e:?}"
        );
        let envelope = e.to_envelope();
        assert_eq!(envelope["ok"], false);
        assert_eq!(envelope["error_code"], 400);
        let description = envelope["description"].as_str().unwrap();
        assert!(
            description.starts_with("Bad Request: file is too big to download")
                && description.contains("20 MB"),
            "{description}"
        );
    }

    #[test]
    fn a_file_without_a_path_cannot_be_fetched() {
        for file in [
            json!({"file_id": "a"}),
            json!({"file_id": "a", "file_path": ""}),
            json!({"file_id": "a", "file_path": 5}),
            json!(true),
        ] {
            assert!(matches!(file_path(&file), Err(DownloadError::NoPath)));
        }
        assert_eq!(DownloadError::NoPath.to_envelope()["error_code"], 400);
    }

    #[test]
    fn the_body_is_refused_once_it_grows_past_the_limit() {
        let mut body = Capped::new(10);
        body.push(b"12345").unwrap();
        body.push(b"67890").unwrap();
        assert!(matches!(body.push(b"x"), Err(DownloadError::TooBig(None))));
        let mut body = Capped::new(10);
        body.push(b"1234").unwrap();
        body.push(b"").unwrap();
        body.push(b"567890").unwrap();
        assert_eq!(&body.finish()[..], b"1234567890");
        let envelope = DownloadError::TooBig(None).to_envelope();
        assert!(
            envelope["description"]
                .as_str()
                .unwrap()
                .contains("up to 20 MB"),
            "{envelope}"
        );
    }

    #[test]
    fn paths_are_percent_encoded_except_slashes() {
        assert_eq!(url_path("photos/file_1.jpg"), "photos/file_1.jpg");
        assert_eq!(url_path("a b/c?d#e%"), "a%20b/c%3Fd%23e%25");
        assert_eq!(url_path("é"), "%C3%A9");
    }

    #[test]
    fn a_refusal_keeps_the_servers_envelope_or_its_status() {
        let e = refusal(
            404,
            br#"{"ok":false,"error_code":404,"description":"Not Found"}"#,
        );
        assert_eq!(
            e.to_envelope(),
            json!({"ok": false, "error_code": 404, "description": "Not Found"})
        );
        let e = refusal(403, b"<html>forbidden</html>");
        assert_eq!(e.to_envelope()["error_code"], 403);
        assert_eq!(
            e.to_envelope()["description"],
            "the file server answered HTTP 403"
        );
        let e = refusal(502, b"<html>Bad Gateway</html>");
        assert_eq!(e.to_envelope()["error_code"], 502);
        // A 200 would not be a refusal; any other status with an "ok" body
        // still is one.
        assert_eq!(
            refusal(302, br#"{"ok":true,"result":1}"#).to_envelope()["error_code"],
            302
        );
    }

    #[test]
    fn the_content_goes_beside_the_files_fields_as_channel_bytes() {
        let file = json!({"file_id": "a", "file_size": 3, "file_path": "p"});
        let result = with_content(file, b"abc");
        assert_eq!(
            result,
            json!({"file_id": "a", "file_size": 3, "file_path": "p", "content": {"$bytes": "YWJj"}})
        );
        assert!(super::super::upload::has_files(&result));
    }
}
