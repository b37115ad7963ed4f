//! The daemon's side of the worker channel (docs/worker-protocol.md): frame
//! types for both directions, their encoding, and starting a worker process
//! with the channel on fd 3.
//!
//! The Python side is `asgigram_bridge.py` beside this file, compiled into the
//! binary and given to each worker as bytecode ([`compiled`]; as source with
//! `python -c` where that cannot be had), so the daemon needs nothing
//! installed next to it but a Python interpreter.

mod compiled;

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream as StdUnixStream;
use std::os::unix::process::CommandExt;
use std::process::Stdio;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use serde_json::{Map, Value};

use crate::routing::{Conversation, ScopeKey};
use crate::settings::{AppSettings, ENV_PREFIX};
use crate::telegram::params;
use crate::telegram::{Params, Update};

/// Source of the Python bridge, run in every worker process.
pub const BRIDGE_SOURCE: &str = include_str!("asgigram_bridge.py");

/// Largest frame either side accepts (uploads travel as base64 inside frames).
pub const MAX_FRAME: usize = 64 * 1024 * 1024;

/// The fd number the bridge reads its channel from.
pub const CHANNEL_FD: i32 = 3;

/// Identifies one application instance (a scope's current run) in a worker.
pub type Sid = u64;

/// The sid of a worker's lifespan scope: its `send` frames are the calls it
/// makes from outside any chat, and the `event` frames with it are their
/// responses. Instances count from 1 (`NEXT_SID` in the scope actor), so
/// no instance ever has it.
pub const LIFESPAN_SID: Sid = 0;

/// An event for an instance's `receive()`, as its scope holds it until the
/// instance received it.
#[derive(Debug, Clone)]
pub enum Event {
    /// An update's event, written from the update's own bytes
    /// ([`Update::write_event`]); [`Event::of_update`] makes sure it has
    /// one.
    Update(Update),
    /// One the daemon makes (`telegram.disconnect`) or a program pushed.
    Json(Value),
}

impl Event {
    /// The update's event, or `None` when its kind's value is not an
    /// object (an update without an event).
    pub fn of_update(update: Update) -> Option<Event> {
        let (_, value) = update.kind_value()?;
        value.starts_with('{').then_some(Event::Update(update))
    }

    /// The update (or pushed event) it stands for.
    pub fn update_id(&self) -> Option<i64> {
        match self {
            Event::Update(update) => Some(update.id.0),
            Event::Json(event) => event.get("update_id").and_then(Value::as_i64),
        }
    }

    /// A `telegram.disconnect`, which the daemon made for the scope's
    /// instance alone and which is not handed on. (API responses never
    /// enter a scope's queue: they go to the instance as they come.)
    pub fn is_disconnect(&self) -> bool {
        matches!(self, Event::Json(event)
            if event.get("type").and_then(Value::as_str) == Some("telegram.disconnect"))
    }

    /// The event as a JSON tree (what the app's `receive()` returns).
    pub fn to_value(&self) -> Value {
        match self {
            Event::Json(event) => event.clone(),
            Event::Update(update) => {
                let mut text = Vec::new();
                update.write_event(&mut text);
                // Written from an update decoded once already.
                serde_json::from_slice(&text).unwrap_or(Value::Null)
            }
        }
    }
}

impl Serialize for Event {
    /// [`ToWorker::encode`] writes an update's event without serde; this
    /// is for anything else that serializes one.
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Event::Json(event) => event.serialize(s),
            Event::Update(_) => self.to_value().serialize(s),
        }
    }
}

/// Daemon -> worker frames. Built from borrowed parts so an event is
/// serialized once, straight from the scope's queue.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToWorker<'a> {
    Start {
        sid: Sid,
        scope: ScopeDict<'a>,
        /// Acks unbatched: set on the isolation worker, where the daemon must
        /// know exactly which event an instance had when the worker died.
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        eager: bool,
    },
    Event {
        sid: Sid,
        seq: u64,
        event: &'a Event,
    },
    /// A `telegram.api.response` for a call the instance made: it goes
    /// ahead of the events queued for the instance (docs/worker-protocol.md).
    Response {
        sid: Sid,
        event: &'a Value,
    },
    Close {
        sid: Sid,
        grace: f64,
    },
    Ping {
        n: u64,
    },
    /// The bot's own User (getMe's answer) for the lifespan scope, which
    /// the bridge starts once it has it; `null` when the daemon does not ask
    /// Telegram (`--check`).
    Bot {
        bot: &'a RawValue,
    },
    Shutdown {
        grace: f64,
    },
    /// Backpressure: the Sender holds more calls than it may queue, so every
    /// instance's `send()` waits until [`ToWorker::Resume`].
    Pause,
    /// The Sender's queue has drained enough for waiting `send()`s to go on.
    Resume,
}

/// The scope dict an instance starts with (docs/protocol.md; the worker adds
/// `asgi` and `state`). Its parts stay encoded while the scope lives: they
/// are only ever written to the worker, and the bot is the same in every
/// scope.
#[derive(Debug, Serialize)]
pub struct ScopeDict<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    chat: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    user: Option<&'a RawValue>,
    #[serde(skip_serializing_if = "Option::is_none")]
    business_connection_id: Option<&'a str>,
    bot: &'a RawValue,
    extensions: Map<String, Value>,
}

impl<'a> ScopeDict<'a> {
    /// `subject` is the scope's Chat or User object, as the key says.
    pub fn new(key: &'a ScopeKey, subject: &'a RawValue, bot: &'a RawValue) -> ScopeDict<'a> {
        let (chat, user, business_connection_id) = match key {
            ScopeKey::Chat { conversation, .. } => {
                let conn = match conversation {
                    Conversation::Business(conn) => Some(conn.as_str()),
                    Conversation::Plain | Conversation::Guest => None,
                };
                (Some(subject), None, conn)
            }
            ScopeKey::User { .. } => (None, Some(subject), None),
        };
        ScopeDict {
            kind: "telegram",
            chat,
            user,
            business_connection_id,
            bot,
            extensions: Map::new(),
        }
    }
}

impl ToWorker<'_> {
    pub fn encode(&self) -> Bytes {
        if let ToWorker::Event {
            sid,
            seq,
            event: Event::Update(update),
        } = self
        {
            // The bytes serde would write, with the update's own in the
            // middle instead of a tree built from them and written back.
            let mut out = Vec::with_capacity(update.json().len() + 80);
            out.extend_from_slice(br#"{"op":"event","sid":"#);
            out.extend_from_slice(sid.to_string().as_bytes());
            out.extend_from_slice(br#","seq":"#);
            out.extend_from_slice(seq.to_string().as_bytes());
            out.extend_from_slice(br#","event":"#);
            // `Event::of_update` made sure it has an event.
            if update.write_event(&mut out) {
                out.push(b'}');
                return Bytes::from(out);
            }
        }
        // Serializing a tree of JSON values and numbers cannot fail.
        Bytes::from(serde_json::to_vec(self).expect("frames are plain JSON"))
    }
}

/// Worker -> daemon frames.
#[derive(Debug, Deserialize, PartialEq)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromWorker {
    Ready {
        pid: u32,
        asgi_version: String,
        #[serde(default)]
        lifespan: bool,
        #[serde(default)]
        python: String,
    },
    Fatal {
        error: String,
    },
    Received {
        sid: Sid,
        seq: u64,
    },
    /// `receive()` was called with nothing queued.
    Idle {
        sid: Sid,
    },
    Send {
        sid: Sid,
        event: AppEvent,
    },
    Ended {
        sid: Sid,
        #[serde(default)]
        error: Option<String>,
        #[serde(default)]
        cancelled: bool,
    },
    Pong {
        n: u64,
    },
    Log {
        level: String,
        message: String,
    },
}

/// A frame from a worker that the daemon cannot use.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("malformed frame from worker: {0}")]
    Malformed(String),
}

impl FromWorker {
    pub fn decode(frame: &[u8]) -> Result<FromWorker, ChannelError> {
        if let Some(frame) = FromWorker::decode_template(frame) {
            return Ok(frame);
        }
        if let Some(frame) = FromWorker::decode_common(frame) {
            return Ok(frame);
        }
        serde_json::from_slice(frame).map_err(|e| {
            let shown = String::from_utf8_lossy(&frame[..frame.len().min(120)]).into_owned();
            ChannelError::Malformed(format!("{e} in {shown:?}"))
        })
    }
}

impl FromWorker {
    /// `received` and `idle`, two of the three frames that come with every
    /// update, as the bridge writes them: from fixed templates
    /// (`asgigram_bridge.py`), so read by the same templates. `None` for
    /// anything else, which the JSON readers below then take.
    fn decode_template(frame: &[u8]) -> Option<FromWorker> {
        if let Some(rest) = frame.strip_prefix(br#"{"op":"received","sid":"#) {
            let (sid, rest) = leading_integer(rest)?;
            let (seq, rest) = leading_integer(rest.strip_prefix(br#","seq":"#)?)?;
            return (rest == b"}").then_some(FromWorker::Received { sid, seq });
        }
        let (sid, rest) = leading_integer(frame.strip_prefix(br#"{"op":"idle","sid":"#)?)?;
        (rest == b"}").then_some(FromWorker::Idle { sid })
    }

    /// The frames that come with every update (`received`, `idle`, `send`),
    /// read field by field in place. The derived decoding of a tagged enum
    /// first copies the whole frame into a buffer of its own, strings and
    /// the app's event included, to find the tag. `None` for anything else,
    /// which the derived decoding then reads (or refuses) as before.
    fn decode_common(frame: &[u8]) -> Option<FromWorker> {
        #[derive(Deserialize)]
        struct Common<'a> {
            #[serde(borrow)]
            op: &'a str,
            sid: Option<Sid>,
            seq: Option<u64>,
            #[serde(borrow)]
            event: Option<&'a RawValue>,
        }
        // A struct would also take an array, by position.
        if frame.first() != Some(&b'{') {
            return None;
        }
        let common = serde_json::from_slice::<Common<'_>>(frame).ok()?;
        let sid = common.sid?;
        match (common.op, common.seq, common.event) {
            ("received", Some(seq), _) => Some(FromWorker::Received { sid, seq }),
            ("idle", _, _) => Some(FromWorker::Idle { sid }),
            ("send", _, Some(event)) => Some(FromWorker::Send {
                sid,
                event: AppEvent(event.to_owned()),
            }),
            _ => None,
        }
    }
}

/// An event an app sent, as the JSON text it came in: [`Outgoing::parse`]
/// reads the few fields it needs where they are.
#[derive(Debug)]
pub struct AppEvent(pub Box<RawValue>);

impl PartialEq for AppEvent {
    fn eq(&self, other: &AppEvent) -> bool {
        self.0.get() == other.0.get()
    }
}

/// Read as a tree and written back: the derived decoding of [`FromWorker`]
/// (a frame [`FromWorker::decode_common`] did not take) hands its fields
/// over from a buffer, which a `RawValue` cannot borrow from.
impl<'de> Deserialize<'de> for AppEvent {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<AppEvent, D::Error> {
        let tree = Value::deserialize(d)?;
        serde_json::value::to_raw_value(&tree)
            .map(AppEvent)
            .map_err(serde::de::Error::custom)
    }
}

/// A JSON integer at the start of `bytes` that fits a `u64`, and the rest.
fn leading_integer(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let digits = bytes.iter().take_while(|b| b.is_ascii_digit()).count();
    // JSON writes no leading zeros.
    if digits == 0 || (digits > 1 && bytes[0] == b'0') {
        return None;
    }
    let mut n = 0u64;
    for &d in &bytes[..digits] {
        n = n.checked_mul(10)?.checked_add(u64::from(d - b'0'))?;
    }
    Some((n, &bytes[digits..]))
}

/// What an application instance asked for with `send(event)`, parsed from the
/// event once, here, so the rest of the daemon never looks at its strings.
#[derive(Debug, PartialEq)]
pub enum Outgoing {
    /// `telegram.send_message`: the event's other keys are the parameters.
    SendMessage {
        params: Params,
        request_id: Option<Value>,
    },
    /// `telegram.api`: any Bot API method.
    Api {
        method: String,
        params: Params,
        request_id: Option<Value>,
    },
    /// `telegram.download`: getFile, then the file itself, fetched by the
    /// daemon (the worker never holds the token); the content comes back
    /// in the response to `request_id`.
    Download { file_id: String, request_id: Value },
}

/// An outgoing event the daemon cannot turn into a call. The bridge validates
/// events before it sends them, so this is a second line of defence; the
/// texts are what the scope logs before it skips the event.
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum OutgoingError {
    #[error("app sent a non-object event")]
    NotAnObject,
    #[error("telegram.api event without a method")]
    NoMethod,
    #[error("telegram.api params is not an object")]
    ParamsNotAnObject,
    #[error("telegram.download event without a file_id")]
    NoFileId,
    /// Only the response could carry the file: without a `request_id` a
    /// download has nowhere to go.
    #[error("telegram.download event without a request_id")]
    DownloadWithoutRequestId,
    /// `None` when `type` is missing or not a string.
    #[error("app sent an event of unknown type {0:?}")]
    UnknownType(Option<String>),
}

impl Outgoing {
    /// Reads the event's own keys in place; the parameters keep the app's
    /// text.
    pub fn parse(event: &RawValue) -> Result<Outgoing, OutgoingError> {
        if let Some(fields) = params::fields_of(event.get()) {
            return Outgoing::from_fields(&fields);
        }
        // Keys with escapes or given twice, or not an object at all: as a
        // JSON reader takes it, the last value of a key winning.
        let Ok(tree) = serde_json::from_str::<Map<String, Value>>(event.get()) else {
            return Err(OutgoingError::NotAnObject);
        };
        let decoded = Params::from_map(&tree);
        Outgoing::from_fields(&decoded.entries().collect::<Vec<_>>())
    }

    /// The rules on an event's fields (each key as written, without
    /// repeats, and its value's text).
    fn from_fields(fields: &[(&str, &str)]) -> Result<Outgoing, OutgoingError> {
        let get = |key: &str| fields.iter().find(|(k, _)| *k == key).map(|(_, v)| *v);
        let text = |key: &str| get(key).and_then(json_str);
        // Taken whatever its value: it goes back verbatim, and the bridge
        // only lets a str or an int through.
        let request_id = get("request_id").and_then(|id| serde_json::from_str(id).ok());
        match text("type").as_deref() {
            Some("telegram.send_message") => Ok(Outgoing::SendMessage {
                params: params::params_from(&fields, &["type", "request_id"]),
                request_id,
            }),
            Some("telegram.api") => {
                let method = match text("method") {
                    Some(m) if !m.is_empty() => m.into_owned(),
                    _ => return Err(OutgoingError::NoMethod),
                };
                let params = match get("params") {
                    None | Some("null") => Params::new(),
                    Some(p) => {
                        Params::from_json(p).map_err(|_| OutgoingError::ParamsNotAnObject)?
                    }
                };
                Ok(Outgoing::Api {
                    method,
                    params,
                    request_id,
                })
            }
            Some("telegram.download") => {
                let file_id = match text("file_id") {
                    Some(id) if !id.is_empty() => id.into_owned(),
                    _ => return Err(OutgoingError::NoFileId),
                };
                let request_id = request_id.ok_or(OutgoingError::DownloadWithoutRequestId)?;
                Ok(Outgoing::Download {
                    file_id,
                    request_id,
                })
            }
            other => Err(OutgoingError::UnknownType(other.map(str::to_owned))),
        }
    }

    /// The Bot API method, its parameters, and the `request_id` the outcome
    /// goes back with when the app asked for it. A download's call is its
    /// getFile.
    pub fn into_call(self) -> (String, Params, Option<Value>) {
        match self {
            Outgoing::Download {
                file_id,
                request_id,
            } => {
                let mut params = Params::new();
                params.insert_absent("file_id", &Value::String(file_id));
                ("getFile".to_string(), params, Some(request_id))
            }
            Outgoing::SendMessage { params, request_id } => {
                ("sendMessage".to_string(), params, request_id)
            }
            Outgoing::Api {
                method,
                params,
                request_id,
            } => (method, params, request_id),
        }
    }
}

/// A JSON string's value, borrowed where it has no escapes; `None` for any
/// other JSON value.
fn json_str(text: &str) -> Option<std::borrow::Cow<'_, str>> {
    let inner = text.strip_prefix('"')?.strip_suffix('"')?;
    if !inner.contains('\\') {
        return Some(std::borrow::Cow::Borrowed(inner));
    }
    serde_json::from_str::<String>(text)
        .ok()
        .map(std::borrow::Cow::Owned)
}

/// A freshly started worker process and the daemon's end of its channel.
pub struct Spawned {
    pub child: tokio::process::Child,
    pub channel: tokio::net::UnixStream,
}

/// The app never needs the token; keep it out of the environment of every
/// Python process the daemon starts.
fn without_token(cmd: &mut std::process::Command) {
    for (key, _) in std::env::vars_os() {
        if key
            .to_str()
            .is_some_and(|k| k.starts_with(&format!("{ENV_PREFIX}_TELEGRAM__TOKEN")))
        {
            cmd.env_remove(key);
        }
    }
}

/// Starts `python -u -c LOADER --fd 3 --app ... --app-dir ...` with the
/// bridge's bytecode on stdin (or `-c BRIDGE` without), the channel on fd 3
/// and stdout/stderr piped. Must be called inside a Tokio runtime.
pub fn spawn_worker(app: &AppSettings) -> io::Result<Spawned> {
    let (ours, theirs) = StdUnixStream::pair()?;
    let theirs: OwnedFd = theirs.into();
    let theirs_raw = theirs.as_raw_fd();
    let bytecode = compiled::bytecode(&app.python, without_token);
    let mut cmd = std::process::Command::new(&app.python);
    cmd.arg("-u")
        .arg("-c")
        .arg(if bytecode.is_some() {
            compiled::LOADER
        } else {
            BRIDGE_SOURCE
        })
        .arg("--fd")
        .arg(CHANNEL_FD.to_string())
        .arg("--app")
        .arg(&app.application)
        .arg("--app-dir")
        .arg(&app.app_dir)
        .arg("--lifespan")
        .arg(app.lifespan.as_str())
        .stdin(if bytecode.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    without_token(&mut cmd);
    // SAFETY: between fork and exec only async-signal-safe calls (prctl,
    // setpgid, dup2, fcntl) are made, on fds owned by this function.
    unsafe {
        cmd.pre_exec(move || {
            // A worker must not outlive the daemon: whatever it did after the
            // daemon died could never be acknowledged, and the journal would
            // hand it to the next daemon's workers again.
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) < 0 {
                return Err(io::Error::last_os_error());
            }
            // Nor may what the app forks (PDEATHSIG is not inherited): its own
            // process group, whose id is the worker's pid, lets the Worker
            // actor end them all with one killpg.
            if libc::setpgid(0, 0) < 0 {
                return Err(io::Error::last_os_error());
            }
            if theirs_raw == CHANNEL_FD {
                // dup2 onto itself keeps CLOEXEC; clear it so fd 3 survives exec.
                let flags = libc::fcntl(CHANNEL_FD, libc::F_GETFD);
                if flags < 0
                    || libc::fcntl(CHANNEL_FD, libc::F_SETFD, flags & !libc::FD_CLOEXEC) < 0
                {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(theirs_raw, CHANNEL_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut cmd = tokio::process::Command::from(cmd);
    cmd.kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot start Python interpreter {:?}: {e}", app.python),
        )
    })?;
    drop(theirs);
    if let (Some(code), Some(mut stdin)) = (bytecode, child.stdin.take()) {
        // More than a pipe holds: written as the worker reads it. A worker
        // that died first makes this fail, which its exit reports.
        tokio::spawn(async move {
            use tokio::io::AsyncWriteExt;
            let _ = stdin.write_all(&code).await;
        });
    }
    ours.set_nonblocking(true)?;
    let channel = tokio::net::UnixStream::from_std(ours)?;
    Ok(Spawned { child, channel })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn frames_encode_with_their_op() {
        let raw = |v: Value| serde_json::value::to_raw_value(&v).unwrap();
        let (chat, bot) = (raw(json!({"id": 1})), raw(json!({"id": 2, "is_bot": true})));
        let key = ScopeKey::chat(1);
        let f = ToWorker::Start {
            sid: 4,
            scope: ScopeDict::new(&key, &chat, &bot),
            eager: false,
        }
        .encode();
        let v: Value = serde_json::from_slice(&f).unwrap();
        let scope = json!({"type": "telegram", "chat": {"id": 1}, "bot": {"id": 2, "is_bot": true}, "extensions": {}});
        assert_eq!(v, json!({"op": "start", "sid": 4, "scope": scope}));
        let key = ScopeKey::Chat {
            id: 1,
            conversation: Conversation::Business("c".into()),
        };
        let f = ToWorker::Start {
            sid: 5,
            scope: ScopeDict::new(&key, &chat, &bot),
            eager: true,
        }
        .encode();
        let v: Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v["scope"]["business_connection_id"], "c");
        assert_eq!(v["eager"], true);
        let key = ScopeKey::User { id: 1 };
        let f = ToWorker::Start {
            sid: 6,
            scope: ScopeDict::new(&key, &chat, &bot),
            eager: false,
        }
        .encode();
        let v: Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v["scope"]["user"], json!({"id": 1}));
        assert!(v["scope"].get("chat").is_none());
        let ev = Event::Json(json!({"type": "telegram.message"}));
        let f = ToWorker::Event {
            sid: 4,
            seq: 9,
            event: &ev,
        }
        .encode();
        let v: Value = serde_json::from_slice(&f).unwrap();
        assert_eq!(v["seq"], 9);
    }

    #[test]
    fn worker_frames_decode_and_garbage_is_an_error() {
        assert_eq!(
            FromWorker::decode(br#"{"op":"idle","sid":1}"#).unwrap(),
            FromWorker::Idle { sid: 1 }
        );
        assert_eq!(
            FromWorker::decode(br#"{"op":"received","sid":1,"seq":2}"#).unwrap(),
            FromWorker::Received { sid: 1, seq: 2 }
        );
        assert_eq!(
            FromWorker::decode(br#"{"op":"ended","sid":1,"error":null,"cancelled":false}"#)
                .unwrap(),
            FromWorker::Ended {
                sid: 1,
                error: None,
                cancelled: false
            }
        );
        for bad in [
            &b"not json"[..],
            b"[]",
            br#"{"op":"nope"}"#,
            br#"{"op":"received","sid":"x"}"#,
            b"",
        ] {
            assert!(FromWorker::decode(bad).is_err());
        }
    }

    #[test]
    fn pause_and_resume_are_the_bare_op() {
        // The bytes docs/worker-protocol.md specifies, exactly.
        assert_eq!(&ToWorker::Pause.encode()[..], br#"{"op":"pause"}"#);
        assert_eq!(&ToWorker::Resume.encode()[..], br#"{"op":"resume"}"#);
    }

    #[test]
    fn the_bot_frame_carries_the_user_or_null() {
        let user = serde_json::value::to_raw_value(&json!({"id": 2, "username": "b"})).unwrap();
        assert_eq!(
            &ToWorker::Bot { bot: &user }.encode()[..],
            br#"{"op":"bot","bot":{"id":2,"username":"b"}}"#
        );
        assert_eq!(
            &ToWorker::Bot {
                bot: RawValue::NULL
            }
            .encode()[..],
            br#"{"op":"bot","bot":null}"#
        );
    }

    fn obj(v: Value) -> Params {
        match v {
            Value::Object(m) => Params::from_map(&m),
            other => panic!("test literal is not an object: {other}"),
        }
    }

    fn parse(event: Value) -> Result<Outgoing, OutgoingError> {
        let text = serde_json::value::to_raw_value(&event).expect("a JSON tree serializes");
        Outgoing::parse(&text)
    }

    #[test]
    fn the_templated_frames_read_as_the_json_reader_reads_them() {
        let frames: &[&[u8]] = &[
            br#"{"op":"received","sid":1,"seq":2}"#,
            br#"{"op":"received","sid":0,"seq":18446744073709551615}"#,
            br#"{"op":"idle","sid":42}"#,
            // Near misses: the JSON reader decides, the template takes none.
            br#"{"op":"received","sid":1,"seq":2} "#,
            br#"{"op":"received","sid":01,"seq":2}"#,
            br#"{"op":"received","sid":1,"seq":18446744073709551616}"#,
            br#"{"op":"received","sid":1,"seq":-2}"#,
            br#"{"op":"received","sid":1}"#,
            br#"{"op":"idle","sid":4,"x":1}"#,
            br#"{"op":"idle","sid":}"#,
            br#"{"op":"idle","sid":7"#,
            br#"{"op": "idle","sid":7}"#,
        ];
        for frame in frames {
            let templated = FromWorker::decode_template(frame);
            let read = FromWorker::decode_common(frame)
                .ok_or(())
                .or_else(|()| serde_json::from_slice::<FromWorker>(frame).map_err(|_| ()));
            if let Some(templated) = templated {
                assert_eq!(
                    Ok(&templated),
                    read.as_ref(),
                    "{}",
                    String::from_utf8_lossy(frame)
                );
            }
            assert_eq!(
                FromWorker::decode(frame).ok(),
                read.ok(),
                "{}",
                String::from_utf8_lossy(frame)
            );
        }
        assert!(FromWorker::decode_template(frames[0]).is_some());
        assert!(FromWorker::decode_template(frames[2]).is_some());
        assert!(frames[3..]
            .iter()
            .all(|f| FromWorker::decode_template(f).is_none()));
    }

    #[test]
    fn an_events_text_is_read_as_a_json_reader_reads_it() {
        let parse_text = |text: &str| {
            let raw: Box<RawValue> = serde_json::from_str(text).expect("valid JSON");
            Outgoing::parse(&raw)
        };
        // Spacing, escapes in values: the parameters keep the app's values.
        let out = parse_text(r#" { "type" : "telegram.send_message" , "text" : "a\n\"b\"" } "#);
        assert_eq!(
            out,
            Ok(Outgoing::SendMessage {
                params: obj(json!({"text": "a\n\"b\""})),
                request_id: None,
            })
        );
        // A key given twice: its last value, the type's included.
        let out = parse_text(
            r#"{"type": "telegram.nope", "text": "a", "type": "telegram.send_message", "text": "b"}"#,
        );
        assert_eq!(
            out,
            Ok(Outgoing::SendMessage {
                params: obj(json!({"text": "b"})),
                request_id: None,
            })
        );
        // A key written with escapes means the same key.
        let out =
            parse_text(r#"{"\u0074ype": "telegram.api", "method": "getMe", "request_id": 4}"#);
        assert_eq!(
            out,
            Ok(Outgoing::Api {
                method: "getMe".into(),
                params: Params::new(),
                request_id: Some(json!(4)),
            })
        );
        let out = parse_text(r#"{"type": "telegram.send\u005fmessage", "text": "x"}"#);
        assert!(matches!(out, Ok(Outgoing::SendMessage { .. })), "{out:?}");
        assert_eq!(parse_text("[1, 2]"), Err(OutgoingError::NotAnObject));
    }

    #[test]
    fn a_send_frames_event_comes_as_the_app_wrote_it() {
        let frame =
            br#"{"op":"send","sid":3,"event":{"type":"telegram.send_message","text":"hi"}}"#;
        let Ok(FromWorker::Send { sid: 3, event }) = FromWorker::decode(frame) else {
            panic!("a send frame");
        };
        assert_eq!(
            event.0.get(),
            r#"{"type":"telegram.send_message","text":"hi"}"#
        );
        // The derived decoding (an `op` that cannot be read in place) gives
        // the same event.
        let frame =
            br#"{"event":{"type":"telegram.send_message","text":"hi"},"op":"s\u0065nd","sid":3}"#;
        let Ok(FromWorker::Send {
            sid: 3,
            event: other,
        }) = FromWorker::decode(frame)
        else {
            panic!("a send frame");
        };
        assert_eq!(Outgoing::parse(&other.0), Outgoing::parse(&event.0),);
    }

    #[test]
    fn send_message_takes_the_other_keys_as_params() {
        let out = parse(json!({
            "type": "telegram.send_message", "text": "hi", "chat_id": 7, "request_id": 3
        }))
        .unwrap();
        assert_eq!(
            out,
            Outgoing::SendMessage {
                params: obj(json!({"text": "hi", "chat_id": 7})),
                request_id: Some(json!(3)),
            }
        );
        assert_eq!(
            out.into_call(),
            (
                "sendMessage".to_string(),
                obj(json!({"text": "hi", "chat_id": 7})),
                Some(json!(3))
            )
        );
        let out = parse(json!({"type": "telegram.send_message", "text": "x"})).unwrap();
        assert_eq!(
            out,
            Outgoing::SendMessage {
                params: obj(json!({"text": "x"})),
                request_id: None,
            }
        );
    }

    #[test]
    fn api_takes_method_and_params() {
        let out = parse(json!({
            "type": "telegram.api", "method": "sendDice",
            "params": {"emoji": "🎲"}, "request_id": "r1", "ignored": true
        }))
        .unwrap();
        assert_eq!(
            out,
            Outgoing::Api {
                method: "sendDice".into(),
                params: obj(json!({"emoji": "🎲"})),
                request_id: Some(json!("r1")),
            }
        );
        assert_eq!(
            out.into_call(),
            (
                "sendDice".to_string(),
                obj(json!({"emoji": "🎲"})),
                Some(json!("r1"))
            )
        );
        // Missing or null params mean a call without parameters.
        for event in [
            json!({"type": "telegram.api", "method": "getMe"}),
            json!({"type": "telegram.api", "method": "getMe", "params": null}),
        ] {
            assert_eq!(
                parse(event).unwrap(),
                Outgoing::Api {
                    method: "getMe".into(),
                    params: Params::new(),
                    request_id: None,
                }
            );
        }
    }

    #[test]
    fn download_takes_file_id_and_request_id_and_calls_get_file() {
        let out = parse(json!({
            "type": "telegram.download", "file_id": "AgAD", "request_id": 4, "extra": 1
        }))
        .unwrap();
        assert_eq!(
            out,
            Outgoing::Download {
                file_id: "AgAD".into(),
                request_id: json!(4),
            }
        );
        assert_eq!(
            out.into_call(),
            (
                "getFile".to_string(),
                obj(json!({"file_id": "AgAD"})),
                Some(json!(4))
            )
        );
        for event in [
            json!({"type": "telegram.download", "request_id": 1}),
            json!({"type": "telegram.download", "file_id": "", "request_id": 1}),
            json!({"type": "telegram.download", "file_id": 7, "request_id": 1}),
            // The file_id is looked at before the request_id.
            json!({"type": "telegram.download"}),
        ] {
            assert_eq!(parse(event), Err(OutgoingError::NoFileId));
        }
        assert_eq!(
            parse(json!({"type": "telegram.download", "file_id": "AgAD"})),
            Err(OutgoingError::DownloadWithoutRequestId)
        );
    }

    #[test]
    fn malformed_events_are_errors() {
        for event in [json!([1]), json!("telegram.api"), json!(null), json!(5)] {
            assert_eq!(parse(event), Err(OutgoingError::NotAnObject));
        }
        for event in [
            json!({"type": "telegram.api"}),
            json!({"type": "telegram.api", "method": ""}),
            json!({"type": "telegram.api", "method": 5, "params": {}}),
            json!({"type": "telegram.api", "method": null}),
            // The method is looked at before the params.
            json!({"type": "telegram.api", "params": []}),
        ] {
            assert_eq!(parse(event), Err(OutgoingError::NoMethod));
        }
        for params in [json!([]), json!("a=1"), json!(1), json!(false)] {
            let event = json!({"type": "telegram.api", "method": "getMe", "params": params});
            assert_eq!(parse(event), Err(OutgoingError::ParamsNotAnObject));
        }
        assert_eq!(
            parse(json!({"type": "telegram.nope"})),
            Err(OutgoingError::UnknownType(Some("telegram.nope".into())))
        );
        for event in [
            json!({}),
            json!({"type": 5}),
            json!({"type": null, "text": "x"}),
        ] {
            assert_eq!(parse(event), Err(OutgoingError::UnknownType(None)));
        }
    }

    #[test]
    fn outgoing_errors_read_as_the_scope_logged_them() {
        // The scope logs "scope=... {error}; skipped"; these are the texts it
        // wrote before the parsing moved here.
        let text = |e: OutgoingError| e.to_string();
        assert_eq!(
            text(OutgoingError::NotAnObject),
            "app sent a non-object event"
        );
        assert_eq!(
            text(OutgoingError::NoMethod),
            "telegram.api event without a method"
        );
        assert_eq!(
            text(OutgoingError::ParamsNotAnObject),
            "telegram.api params is not an object"
        );
        assert_eq!(
            text(OutgoingError::UnknownType(Some("telegram.nope".into()))),
            r#"app sent an event of unknown type Some("telegram.nope")"#
        );
        assert_eq!(
            text(OutgoingError::UnknownType(None)),
            "app sent an event of unknown type None"
        );
    }
}
