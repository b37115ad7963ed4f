//! `asgigramd --sandbox-web ADDR`: a Telegram-like chat with the bot in the
//! browser, on the sandbox.
//!
//! One page (`page.html`, inline CSS and JS, compiled into the binary)
//! shows the chat list (Alice's and Bob's private chats with the bot, and
//! the group), the messages as bubbles with their formatting, media and
//! inline keyboards, the reply keyboard above the composer, and a side
//! panel with every Bot API call the bot made. It stays live through
//! Server-Sent Events (`/events`): a snapshot first, built from the
//! sandbox's state, then what [`crate::sandbox::Sandbox::watch`] reports,
//! numbered so that nothing is shown twice or missed in between (see
//! `view`). After a restart of the daemon the page reconnects by itself and
//! starts again from the new sandbox's snapshot.
//!
//! What the person at the page does goes through [`super::Place`], as in
//! the terminal chat: `/api/send` (a text message), `/api/press` (an inline
//! button), `/api/upload` (a photo or a document). Those POSTs must carry
//! an `X-Sandbox-Chat` header, which a page on another site cannot add
//! without the browser asking first (and being refused), and on a loopback
//! address the Host must be an IP address or `localhost`, which keeps
//! DNS-rebinding pages out.
//!
//! The server runs on a thread of its own with its own actix System, as the
//! sandbox's does, so the daemon's actors never wait for a browser.

mod html;
mod view;

use std::convert::Infallible;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::Duration;

use actix_web::dev::ServerHandle;
use actix_web::http::header;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use bytes::Bytes;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::broadcast;

use crate::sandbox::{multipart_parts, Part, PartsError, Sandbox, SandboxEvent, Watched};

use super::{Place, PEOPLE, SANDBOX_GROUP, SANDBOX_USER, SECOND_USER};

/// The chats the page lists, in its order.
const CHATS: [i64; 3] = [SANDBOX_USER, SECOND_USER, SANDBOX_GROUP];

/// The page, with `{{NONCE}}` where each load's script and style nonce go.
const PAGE: &str = include_str!("page.html");

/// The header every POST must carry (see the module's comment).
const ACTION_HEADER: &str = "x-sandbox-chat";

/// Largest file the page may send, as Telegram's bots may download.
const MAX_UPLOAD: usize = 20 << 20;

/// Telegram's limit on a message's text, in UTF-16 units.
const MAX_TEXT: usize = 4096;

/// How often an idle event stream says it is still there, so that a
/// browser that went away is noticed and a proxy does not cut it.
const KEEPALIVE: Duration = Duration::from_secs(15);

/// How many events may wait for a slow page before it is cut off (it then
/// reconnects and starts from a fresh snapshot).
const BACKLOG: usize = 4096;

/// The running web chat. [`WebChat::stop`] ends it.
pub struct WebChat {
    addr: SocketAddr,
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
    pump: Option<JoinHandle<()>>,
    stopping: Arc<AtomicBool>,
}

impl WebChat {
    /// The address it listens on (the port chosen, if 0 was asked for).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The page's URL.
    pub fn url(&self) -> String {
        format!("http://{}/", self.addr)
    }

    /// Closes every connection and waits for the server's threads.
    pub fn stop(mut self) {
        self.stopping.store(true, Ordering::Relaxed);
        // The stop command goes out when called; joining awaits its end.
        drop(self.handle.stop(false));
        for thread in [self.thread.take(), self.pump.take()].into_iter().flatten() {
            if thread.join().is_err() {
                log::error!("a web chat thread panicked");
            }
        }
    }
}

/// What every request handler shares.
struct Hub {
    sandbox: Arc<Sandbox>,
    /// Events for the pages, already in their SSE form.
    events: broadcast::Sender<Arc<Outgoing>>,
    /// Tells a page that reconnects whether it still talks to the same
    /// sandbox.
    instance: String,
    bot: Value,
    /// Whether the server listens on a loopback address only.
    loopback: bool,
}

/// One SSE message and the number of the sandbox event it came from.
struct Outgoing {
    seq: u64,
    text: String,
}

fn sse(name: &str, data: &Value, seq: Option<u64>) -> String {
    match seq {
        Some(seq) => format!("id: {seq}\nevent: {name}\ndata: {data}\n\n"),
        None => format!("event: {name}\ndata: {data}\n\n"),
    }
}

/// Starts the web chat on `addr` and returns once it listens.
pub fn serve(addr: SocketAddr, sandbox: Arc<Sandbox>) -> io::Result<WebChat> {
    let watched = sandbox.watch();
    let (events, _) = broadcast::channel(BACKLOG);
    let hub = Arc::new(Hub {
        bot: sandbox.bot(),
        instance: format!("{:016x}", fastrand::u64(..)),
        loopback: addr.ip().is_loopback(),
        events: events.clone(),
        sandbox: sandbox.clone(),
    });
    let stopping = Arc::new(AtomicBool::new(false));
    let pump = {
        let stopping = stopping.clone();
        std::thread::Builder::new()
            .name("web-chat-events".into())
            .spawn(move || pump(&sandbox, &watched, &events, &stopping))?
    };
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<(SocketAddr, ServerHandle)>>();
    let thread = std::thread::Builder::new()
        .name("web-chat".into())
        .spawn(move || {
            actix_rt::System::new().block_on(async move {
                let server = match build(hub, addr) {
                    Ok(built) => built,
                    Err(error) => {
                        // The receiver waits for this; if it is gone there
                        // is nobody left to tell.
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                let (server, bound) = server;
                let _ = ready_tx.send(Ok((bound, server.handle())));
                if let Err(error) = server.await {
                    log::error!("web chat server failed: {error}");
                }
            });
        })?;
    let fail = |error| {
        stopping.store(true, Ordering::Relaxed);
        error
    };
    match ready_rx.recv() {
        Ok(Ok((addr, handle))) => Ok(WebChat {
            addr,
            handle,
            thread: Some(thread),
            pump: Some(pump),
            stopping,
        }),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(fail(error))
        }
        Err(_) => Err(fail(io::Error::other(
            "the web chat thread ended before listening",
        ))),
    }
}

fn build(hub: Arc<Hub>, addr: SocketAddr) -> io::Result<(actix_web::dev::Server, SocketAddr)> {
    let data = web::Data::from(hub);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/", web::get().to(page))
            .route("/events", web::get().to(events))
            .route("/file/{file_id}", web::get().to(file))
            .route("/api/send", web::post().to(send))
            .route("/api/press", web::post().to(press))
            .route("/api/upload", web::post().to(upload))
            .default_service(web::to(|| async {
                HttpResponse::NotFound().json(json!({"error": "no such page"}))
            }))
    })
    .workers(1)
    // The program (asgigramd) handles signals itself.
    .disable_signals()
    // Event streams stay open; a stop must not wait for them.
    .shutdown_timeout(1)
    .bind(addr)?;
    let bound = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| io::Error::other("the web chat bound no address"))?;
    Ok((server.run(), bound))
}

/// Turns what the sandbox reports into page events, for every open page.
fn pump(
    sandbox: &Sandbox,
    watched: &mpsc::Receiver<Watched>,
    events: &broadcast::Sender<Arc<Outgoing>>,
    stopping: &AtomicBool,
) {
    // Calls are numbered as the snapshot numbers them: by their place in
    // the sandbox's list.
    let mut calls = sandbox.inspect(|v| v.calls().len());
    while !stopping.load(Ordering::Relaxed) {
        let w = match watched.recv_timeout(Duration::from_millis(200)) {
            Ok(w) => w,
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        };
        if matches!(w.event, SandboxEvent::Call(_)) {
            calls += 1;
        }
        for e in sandbox.inspect(|v| view::translate(&w, v, calls)) {
            let text = sse(e.name, &e.data, Some(w.seq));
            // No page open is no error: the next one starts from a snapshot.
            let _ = events.send(Arc::new(Outgoing { seq: w.seq, text }));
        }
    }
}

/// Why a request is refused: its status and the message the page shows.
struct Refused(u16, String);

impl Refused {
    fn bad(message: impl Into<String>) -> Self {
        Refused(400, message.into())
    }

    fn respond(self, what: &str) -> HttpResponse {
        log::warn!("web chat: {what} refused: {}", self.1);
        let status = actix_web::http::StatusCode::from_u16(self.0)
            .unwrap_or(actix_web::http::StatusCode::BAD_REQUEST);
        HttpResponse::build(status).json(json!({"error": self.1}))
    }
}

/// Whether the Host header names this machine by address or as
/// localhost; on a loopback bind, any other name is a page that had its
/// DNS name pointed here.
fn host_allowed(req: &HttpRequest, hub: &Hub) -> bool {
    if !hub.loopback {
        return true;
    }
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or_default();
    let name = match host.strip_prefix('[') {
        Some(rest) => rest.split(']').next().unwrap_or_default(),
        None => host.rsplit_once(':').map_or(host, |(name, _)| name),
    };
    name.eq_ignore_ascii_case("localhost") || name.parse::<std::net::IpAddr>().is_ok()
}

/// The checks every POST passes before it is read.
fn action_allowed(req: &HttpRequest, hub: &Hub) -> Result<(), Refused> {
    if !host_allowed(req, hub) {
        return Err(Refused(403, "unknown Host".into()));
    }
    if req.headers().get(ACTION_HEADER).is_none() {
        return Err(Refused(
            403,
            format!("the {ACTION_HEADER} header is missing (only the chat page may post)"),
        ));
    }
    Ok(())
}

/// Who does it and where, checked: one of the sandbox people, in their own
/// private chat or in the group.
fn place(user: i64, chat: i64) -> Result<Place, Refused> {
    Place::of(user, chat).ok_or_else(|| {
        Refused::bad(format!(
            "user {user} cannot write in chat {chat}: the people are {SANDBOX_USER} and \
             {SECOND_USER}, each in their private chat or in the group {SANDBOX_GROUP}"
        ))
    })
}

async fn page(req: HttpRequest, hub: web::Data<Hub>) -> HttpResponse {
    if !host_allowed(&req, &hub) {
        return HttpResponse::Forbidden().body("unknown Host");
    }
    let nonce = format!("{:032x}", fastrand::u128(..));
    let csp = format!(
        "default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; \
         img-src 'self' blob: data:; media-src 'self'; connect-src 'self'; \
         base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    );
    HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .insert_header((header::CONTENT_SECURITY_POLICY, csp))
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .body(PAGE.replace("{{NONCE}}", &nonce))
}

async fn events(req: HttpRequest, hub: web::Data<Hub>) -> HttpResponse {
    if !host_allowed(&req, &hub) {
        return HttpResponse::Forbidden().body("unknown Host");
    }
    // Subscribed before the snapshot is taken: every event after it is
    // in the channel, and those it already shows are skipped by number.
    let rx = hub.events.subscribe();
    let (snapshot, seen) = hub
        .sandbox
        .inspect(|v| (view::snapshot(v, &hub.instance, &hub.bot), v.events()));
    let first = Bytes::from(format!("retry: 1000\n{}", sse("snapshot", &snapshot, None)));
    let stream =
        futures_util::stream::unfold((Some(first), rx), move |(first, mut rx)| async move {
            if let Some(first) = first {
                return Some((Ok::<_, Infallible>(first), (None, rx)));
            }
            loop {
                match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
                    Err(_) => {
                        return Some((Ok(Bytes::from_static(b": still here\n\n")), (None, rx)))
                    }
                    Ok(Ok(out)) if out.seq <= seen => continue,
                    Ok(Ok(out)) => return Some((Ok(Bytes::from(out.text.clone())), (None, rx))),
                    // Too far behind, or the server is stopping: the page
                    // reconnects and starts again from a snapshot.
                    Ok(Err(_)) => return None,
                }
            }
        });
    HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-store"))
        .streaming(stream)
}

#[derive(Deserialize)]
struct SendRequest {
    user: i64,
    chat: i64,
    text: String,
}

async fn send(req: HttpRequest, body: Bytes, hub: web::Data<Hub>) -> HttpResponse {
    let sent = (|| {
        action_allowed(&req, &hub)?;
        let request: SendRequest = serde_json::from_slice(&body)
            .map_err(|e| Refused::bad(format!("expected {{user, chat, text}}: {e}")))?;
        let place = place(request.user, request.chat)?;
        if request.text.trim().is_empty() {
            return Err(Refused::bad("the message is empty"));
        }
        if request.text.encode_utf16().count() > MAX_TEXT {
            return Err(Refused::bad(format!(
                "the message is longer than Telegram's {MAX_TEXT} characters"
            )));
        }
        Ok(place.send_text(&hub.sandbox, &request.text))
    })();
    match sent {
        Ok(update_id) => HttpResponse::Ok().json(json!({"update_id": update_id})),
        Err(refused) => refused.respond("a message"),
    }
}

#[derive(Deserialize)]
struct PressRequest {
    user: i64,
    chat: i64,
    message_id: i64,
    index: usize,
}

async fn press(req: HttpRequest, body: Bytes, hub: web::Data<Hub>) -> HttpResponse {
    let pressed = (|| {
        action_allowed(&req, &hub)?;
        let request: PressRequest = serde_json::from_slice(&body).map_err(|e| {
            Refused::bad(format!("expected {{user, chat, message_id, index}}: {e}"))
        })?;
        let place = place(request.user, request.chat)?;
        place
            .press(&hub.sandbox, request.message_id, request.index)
            .map_err(|e| Refused(409, e.to_string()))
    })();
    match pressed {
        Ok(pressed) => HttpResponse::Ok()
            .json(json!({"update_id": pressed.update_id, "query_id": pressed.query_id})),
        Err(refused) => refused.respond("a button press"),
    }
}

/// The fields of an upload: the file, who sends it where, as what.
#[derive(Default)]
struct Upload {
    user: Option<i64>,
    chat: Option<i64>,
    caption: Option<String>,
    as_document: bool,
    file: Option<(String, Vec<u8>)>,
}

async fn upload(req: HttpRequest, payload: web::Payload, hub: web::Data<Hub>) -> HttpResponse {
    if let Err(refused) = action_allowed(&req, &hub) {
        return refused.respond("a file");
    }
    let sent = match read_upload(&req, payload).await {
        Ok(upload) => send_upload(&hub.sandbox, upload),
        Err(refused) => Err(refused),
    };
    match sent {
        Ok(update_id) => HttpResponse::Ok().json(json!({"update_id": update_id})),
        Err(refused) => refused.respond("a file"),
    }
}

async fn read_upload(req: &HttpRequest, payload: web::Payload) -> Result<Upload, Refused> {
    let parts = multipart_parts(req, payload, MAX_UPLOAD)
        .await
        .map_err(|e| match e {
            PartsError::TooLarge => Refused(
                413,
                format!("the file is larger than {} MB", MAX_UPLOAD >> 20),
            ),
            PartsError::Malformed(e) => {
                Refused::bad(format!("expected a multipart/form-data upload: {e}"))
            }
        })?;
    let mut upload = Upload::default();
    for Part {
        name,
        file_name,
        bytes,
        ..
    } in parts
    {
        let text = || String::from_utf8_lossy(&bytes).trim().to_string();
        let number = |what: &str| {
            text()
                .parse::<i64>()
                .map_err(|_| Refused::bad(format!("{what} must be a number")))
        };
        match name.as_str() {
            "file" => upload.file = Some((file_name.unwrap_or_else(|| "file".into()), bytes)),
            "user" => upload.user = Some(number("user")?),
            "chat" => upload.chat = Some(number("chat")?),
            "caption" => upload.caption = Some(text()).filter(|c| !c.is_empty()),
            "as" => upload.as_document = text() == "document",
            _ => {}
        }
    }
    Ok(upload)
}

fn send_upload(sandbox: &Sandbox, upload: Upload) -> Result<i64, Refused> {
    let (Some(user), Some(chat)) = (upload.user, upload.chat) else {
        return Err(Refused::bad("the upload names no user or chat"));
    };
    let place = place(user, chat)?;
    let Some((name, bytes)) = upload.file else {
        return Err(Refused::bad("the upload has no file"));
    };
    if bytes.is_empty() {
        return Err(Refused::bad(format!("{name} is empty")));
    }
    let document = upload.as_document.then_some(name.as_str());
    Ok(place.send_file(sandbox, bytes, document, upload.caption.as_deref()))
}

#[derive(Deserialize)]
struct FileQuery {
    /// Present for a download link: the name to save it as.
    download: Option<String>,
}

/// A file's bytes, for `<img>`, `<video>`, `<audio>` and download links.
/// Only image, audio and video types Telegram's clients play are served
/// inline; anything else is an attachment, so no file becomes a page.
async fn file(
    req: HttpRequest,
    path: web::Path<String>,
    query: web::Query<FileQuery>,
    hub: web::Data<Hub>,
) -> HttpResponse {
    if !host_allowed(&req, &hub) {
        return HttpResponse::Forbidden().body("unknown Host");
    }
    let found = hub.sandbox.inspect(|v| {
        v.file_content(&path)
            .map(|(bytes, path)| (bytes, path.to_string()))
    });
    let Some((bytes, file_path)) = found else {
        return HttpResponse::NotFound().json(json!({"error": "no such file in the sandbox"}));
    };
    let mut response = HttpResponse::Ok();
    response.insert_header(("X-Content-Type-Options", "nosniff"));
    match (query.download.as_deref(), media_type(&bytes, &file_path)) {
        (None, Some(kind)) => {
            response.content_type(kind);
        }
        (name, _) => {
            let name = safe_file_name(name.unwrap_or(&file_path));
            response.content_type("application/octet-stream");
            response.insert_header((
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"{name}\""),
            ));
        }
    }
    response.body(bytes)
}

/// The type of an image, audio or video file, by its first bytes or, for
/// containers without a plain signature, its name.
fn media_type(bytes: &[u8], path: &str) -> Option<&'static str> {
    const SIGNATURES: [(&[u8], &str); 6] = [
        (b"\x89PNG\r\n\x1a\n", "image/png"),
        (b"\xff\xd8\xff", "image/jpeg"),
        (b"GIF87a", "image/gif"),
        (b"GIF89a", "image/gif"),
        (b"OggS", "audio/ogg"),
        (b"ID3", "audio/mpeg"),
    ];
    if let Some((_, kind)) = SIGNATURES.iter().find(|(sig, _)| bytes.starts_with(sig)) {
        return Some(kind);
    }
    if bytes.len() > 12 && &bytes[..4] == b"RIFF" && &bytes[8..12] == b"WEBP" {
        return Some("image/webp");
    }
    let extension = path.rsplit_once('.').map(|(_, e)| e.to_ascii_lowercase());
    match extension.as_deref() {
        Some("mp4") => Some("video/mp4"),
        Some("webm") => Some("video/webm"),
        Some("mp3") => Some("audio/mpeg"),
        Some("m4a") => Some("audio/mp4"),
        _ => None,
    }
}

/// A file name safe inside a quoted header value.
fn safe_file_name(name: &str) -> String {
    let base = name.rsplit('/').next().unwrap_or_default();
    let safe: String = base
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || "._- ".contains(*c))
        .collect();
    if safe.trim_matches('.').is_empty() {
        "file".to_string()
    } else {
        safe
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_images_and_media_are_served_inline() {
        assert_eq!(media_type(b"\x89PNG\r\n\x1a\nrest", "x"), Some("image/png"));
        assert_eq!(media_type(b"\xff\xd8\xff\xe0", "x"), Some("image/jpeg"));
        assert_eq!(media_type(b"RIFF\0\0\0\0WEBPVP8 ", "x"), Some("image/webp"));
        assert_eq!(media_type(b"....", "videos/file_3.mp4"), Some("video/mp4"));
        assert_eq!(media_type(b"<html><script>", "documents/x.html"), None);
        assert_eq!(media_type(b"<svg onload=alert(1)>", "photos/x.svg"), None);
    }

    #[test]
    fn download_names_cannot_break_the_header() {
        assert_eq!(safe_file_name("documents/report 1.pdf"), "report 1.pdf");
        assert_eq!(safe_file_name("a\"; evil=\"x\r\n.txt"), "a evilx.txt");
        assert_eq!(safe_file_name(".."), "file");
    }
}
