//! The HTTP side: an actix-web server with one worker, on a thread of its
//! own with its own actix System, so that it runs the same whether or not
//! the caller is inside an actix runtime.

use std::any::Any;
use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::fd::{AsRawFd, RawFd};
use std::pin::Pin;
use std::sync::{mpsc, Arc};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use actix_web::body::{BodySize, MessageBody};
use actix_web::dev::{Extensions, Server, ServerHandle};
use actix_web::http::StatusCode;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};
use bytes::Bytes;
use serde_json::Value;

use super::envelope::{ApiError, Reply};
use super::faults::Fault;
use super::methods::{self, Request};
use super::params;
use super::polling::{self, PollAnswer};
use super::state::RecordedCall;
use super::Shared;

/// The page Telegram's front proxy serves when the API backend is down.
const BAD_GATEWAY_HTML: &str = "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n\
<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx/1.18.0</center>\r\n</body>\r\n</html>\r\n";

/// The server thread; stopping it closes every connection at once.
pub(crate) struct Running {
    handle: ServerHandle,
    thread: Option<JoinHandle<()>>,
}

impl Running {
    pub fn stop(&mut self) {
        // The stop command is sent when `stop` is called; the returned
        // future only reports completion, which joining the thread awaits.
        drop(self.handle.stop(false));
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                log::error!("the sandbox server thread panicked");
            }
        }
    }
}

/// Starts the server thread and waits until it listens.
pub(crate) fn spawn(shared: Arc<Shared>, bind: SocketAddr) -> io::Result<(SocketAddr, Running)> {
    let (ready_tx, ready_rx) = mpsc::channel::<io::Result<(SocketAddr, ServerHandle)>>();
    let thread = std::thread::Builder::new()
        .name("bot-api-sandbox".into())
        .spawn(move || {
            let system = actix_rt::System::new();
            let webhook_shared = shared.clone();
            system.block_on(async move {
                let (server, addr) = match build(shared, bind) {
                    Ok(built) => built,
                    Err(error) => {
                        // The receiver waits for this message; if it is gone
                        // there is nobody left to tell.
                        let _ = ready_tx.send(Err(error));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((addr, server.handle())));
                // Ends with the System, when the server has stopped.
                actix_rt::spawn(super::webhook::run(webhook_shared));
                if let Err(error) = server.await {
                    log::error!("sandbox server failed: {error}");
                }
            });
        })?;
    match ready_rx.recv() {
        Ok(Ok((addr, handle))) => Ok((
            addr,
            Running {
                handle,
                thread: Some(thread),
            },
        )),
        Ok(Err(error)) => {
            let _ = thread.join();
            Err(error)
        }
        Err(_) => Err(io::Error::other(
            "the sandbox server thread ended before listening",
        )),
    }
}

fn build(shared: Arc<Shared>, bind: SocketAddr) -> io::Result<(Server, SocketAddr)> {
    let data = web::Data::from(shared);
    let server = HttpServer::new(move || {
        App::new()
            .app_data(data.clone())
            .route("/bot{token}/{method:.*}", web::route().to(api_call))
            .route("/file/bot{token}/{path:.*}", web::get().to(download))
            .default_service(web::to(not_found))
    })
    .workers(1)
    // The embedding program (asgigramd --sandbox) handles signals itself.
    .disable_signals()
    .on_connect(remember_socket)
    .bind(bind)?;
    let addr = server
        .addrs()
        .first()
        .copied()
        .ok_or_else(|| io::Error::other("the sandbox bound no address"))?;
    Ok((server.run(), addr))
}

/// The socket of a connection, kept so that a fault can drop it.
#[derive(Clone, Copy)]
struct ConnectionSocket(RawFd);

fn remember_socket(connection: &dyn Any, extensions: &mut Extensions) {
    if let Some(stream) = connection.downcast_ref::<actix_web::rt::net::TcpStream>() {
        extensions.insert(ConnectionSocket(stream.as_raw_fd()));
    }
}

async fn api_call(
    req: HttpRequest,
    payload: web::Payload,
    shared: web::Data<Shared>,
) -> HttpResponse {
    let arrived = Instant::now();
    let token = req
        .match_info()
        .get("token")
        .unwrap_or_default()
        .to_string();
    let requested = req
        .match_info()
        .get("method")
        .unwrap_or_default()
        .to_string();
    let input = match params::read(&req, payload).await {
        Ok(input) => input,
        Err(error) => return respond(&Reply::from(&Err(error))),
    };
    let method = match shared.read(|s| methods::route(s, &token, &requested)) {
        Ok(method) => method,
        Err(error) => return reject(&shared, &requested, input, error, arrived),
    };
    let call = Request::new(method, input);
    if method.name == "getUpdates" {
        let socket = req.conn_data::<ConnectionSocket>().copied();
        let hung_up = || socket.is_some_and(|s| peer_closed(s.0));
        return match polling::get_updates(&shared, &call.params, arrived, hung_up).await {
            PollAnswer::Outcome(outcome, fault) => {
                answer(&req, &Reply::from(&outcome), fault).await
            }
            PollAnswer::Refused(fault) => fail(&req, fault),
            PollAnswer::HungUp => {
                log::debug!("a getUpdates caller hung up while parked");
                HttpResponse::NoContent().finish()
            }
        };
    }
    execute(&req, &shared, call, arrived).await
}

/// Answers a call refused for its token or method name. The token is never
/// logged.
fn reject(
    shared: &Shared,
    requested: &str,
    input: params::Input,
    error: ApiError,
    arrived: Instant,
) -> HttpResponse {
    log::debug!("call to {requested:?} refused: {}", error.description);
    let reply = Reply::from(&Err(error));
    shared.update(|s| {
        if requested.eq_ignore_ascii_case("getUpdates") {
            s.count_status(reply.status);
        } else {
            s.record(RecordedCall {
                method: requested.to_string(),
                params: Value::Object(input.params),
                files: input.files,
                at: arrived,
                status: reply.status,
                response: reply.body.clone(),
                fault: None,
            });
        }
    });
    respond(&reply)
}

/// Runs a call through the fault plan and the state.
async fn execute(
    req: &HttpRequest,
    shared: &Shared,
    call: Request,
    arrived: Instant,
) -> HttpResponse {
    let fault = shared.update_quietly(|s| s.faults.for_call(&call.method.name));
    if let Some(fault) = fault.filter(|f| !f.executes_call()) {
        log::debug!("{}: injected {fault:?}", call.method.name);
        let status = match fault {
            Fault::DropBeforeExecute => 0,
            Fault::RetryAfter(_) => 429,
            _ => 502,
        };
        shared.update(|s| s.record(recorded(call, arrived, status, Value::Null, Some(fault))));
        return fail(req, fault);
    }
    let reply = shared.update(|s| {
        let reply = Reply::from(&methods::execute(s, &call, arrived));
        let status = if fault == Some(Fault::DropAfterExecute) {
            0
        } else {
            reply.status
        };
        s.record(recorded(call, arrived, status, reply.body.clone(), fault));
        reply
    });
    answer(req, &reply, fault).await
}

/// Sends the answer of an executed call, through the fault that hit it.
async fn answer(req: &HttpRequest, reply: &Reply, fault: Option<Fault>) -> HttpResponse {
    match fault {
        Some(Fault::Delay(delay)) => {
            actix_rt::time::sleep(delay).await;
            respond(reply)
        }
        Some(Fault::StallBody(stall)) => stalled(reply, stall),
        Some(fault) => fail(req, fault),
        None => respond(reply),
    }
}

fn recorded(
    call: Request,
    at: Instant,
    status: u16,
    response: Value,
    fault: Option<Fault>,
) -> RecordedCall {
    RecordedCall {
        method: call.method.name.clone(),
        params: Value::Object(call.params),
        files: call.files,
        at,
        status,
        response,
        fault,
    }
}

fn fail(req: &HttpRequest, fault: Fault) -> HttpResponse {
    match fault {
        Fault::DropBeforeExecute | Fault::DropAfterExecute => drop_connection(req),
        Fault::RetryAfter(seconds) => respond(&Reply {
            status: 429,
            body: serde_json::json!({
                "ok": false,
                "error_code": 429,
                "description": format!("Too Many Requests: retry after {seconds}"),
                "parameters": {"retry_after": seconds},
            }),
            // No header can say "0 seconds or less"; the envelope does.
            retry_after: u64::try_from(seconds).ok().filter(|&s| s > 0),
        }),
        _ => bad_gateway(fault),
    }
}

/// `reply` with its body's second half held back for `stall`
/// ([`Fault::StallBody`]).
fn stalled(reply: &Reply, stall: Duration) -> HttpResponse {
    let mut first = Bytes::from(reply.body.to_string());
    let rest = first.split_off(first.len() / 2);
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    HttpResponse::build(status)
        .content_type("application/json")
        .body(StalledBody {
            len: (first.len() + rest.len()) as u64,
            first: Some(first),
            rest: Some(rest),
            stall: Box::pin(actix_rt::time::sleep(stall)),
        })
}

/// A body of known length whose first part is ready at once and whose rest
/// waits for a timer. Its `Content-Length` goes out with the headers, so the
/// client knows more is due and waits for it.
struct StalledBody {
    len: u64,
    first: Option<Bytes>,
    rest: Option<Bytes>,
    stall: Pin<Box<actix_rt::time::Sleep>>,
}

impl MessageBody for StalledBody {
    type Error = Infallible;

    fn size(&self) -> BodySize {
        BodySize::Sized(self.len)
    }

    fn poll_next(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Bytes, Infallible>>> {
        let this = self.get_mut();
        if let Some(first) = this.first.take() {
            return Poll::Ready(Some(Ok(first)));
        }
        if this.rest.is_none() {
            return Poll::Ready(None);
        }
        match this.stall.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(this.rest.take().map(Ok)),
            Poll::Pending => Poll::Pending,
        }
    }
}

fn bad_gateway(fault: Fault) -> HttpResponse {
    if fault == Fault::BadGatewayHtml {
        HttpResponse::BadGateway()
            .content_type("text/html")
            .body(BAD_GATEWAY_HTML)
    } else {
        respond(&Reply {
            status: 502,
            body: serde_json::json!({"ok": false, "error_code": 502, "description": "Bad Gateway"}),
            retry_after: None,
        })
    }
}

/// Ends the connection without an answer: the client sees it closed before
/// any byte of a response.
fn drop_connection(req: &HttpRequest) -> HttpResponse {
    match req.conn_data::<ConnectionSocket>() {
        Some(socket) => {
            // SAFETY: the descriptor belongs to the connection serving this
            // request, which actix keeps open at least until the request is
            // answered. shutdown() only ends the TCP streams; it neither
            // closes nor reuses the descriptor, so no other file is touched.
            let rc = unsafe { libc::shutdown(socket.0, libc::SHUT_RDWR) };
            if rc != 0 {
                log::warn!(
                    "could not drop a connection: {}",
                    io::Error::last_os_error()
                );
            }
        }
        None => log::warn!("could not drop a connection: its socket is unknown"),
    }
    // Writing this to the shut-down socket fails, and actix closes it.
    HttpResponse::BadGateway().finish()
}

/// Whether the client closed its side of the connection.
fn peer_closed(fd: RawFd) -> bool {
    let mut byte = 0u8;
    // SAFETY: `fd` is the socket of the connection whose request is being
    // served, open for as long as the request is pending (see
    // `drop_connection`); the buffer is a valid byte. MSG_PEEK leaves any
    // data for actix to read and MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            fd,
            std::ptr::addr_of_mut!(byte).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    match n {
        0 => true,
        n if n > 0 => false,
        _ => !matches!(
            io::Error::last_os_error().kind(),
            io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
        ),
    }
}

fn respond(reply: &Reply) -> HttpResponse {
    let status = StatusCode::from_u16(reply.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = HttpResponse::build(status);
    response.content_type("application/json");
    if let Some(seconds) = reply.retry_after {
        response.insert_header(("Retry-After", seconds.to_string()));
    }
    response.body(reply.body.to_string())
}

/// Serves files stored by uploads and `Sandbox::add_file`.
async fn download(req: HttpRequest, shared: web::Data<Shared>) -> HttpResponse {
    let token = req.match_info().get("token").unwrap_or_default();
    let path = req.match_info().get("path").unwrap_or_default();
    let bytes = shared.read(|s| {
        let authorized = token == s.token && !s.token_rejected;
        authorized
            .then(|| s.file_by_path(path).and_then(|f| f.bytes.clone()))
            .flatten()
    });
    match bytes {
        Some(bytes) => HttpResponse::Ok()
            .content_type("application/octet-stream")
            .body(bytes),
        None => not_found().await,
    }
}

async fn not_found() -> HttpResponse {
    respond(&Reply::from(&Err(ApiError::not_found())))
}
