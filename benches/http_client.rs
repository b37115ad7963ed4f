//! Instructions per Bot API call in the HTTP client alone, counted by
//! callgrind: the daemon's own client (`telegram::Bot`, on awc, as the
//! Sender calls it) next to hyper's HTTP/1.1 connection API on one
//! keep-alive connection, the leanest well-kept client there is.
//!
//!     cargo bench --bench http_client [-- N1 N2]
//!
//! The bench starts a copy of itself as a server on 127.0.0.1 (untraced),
//! which answers every POST with a sendMessage result and the headers
//! Telegram sends with it, then runs each client under `valgrind
//! --tool=callgrind --trace-children=no`, N1 (default 200) and N2 (2,200)
//! calls one after the other, and prints
//!
//!     marginal instructions per call = (Ir(N2) - Ir(N1)) / (N2 - N1)
//!
//! Both clients encode the same parameters from a `serde_json::Value`
//! and read the whole answer; only `Bot` checks its envelope.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

// Only its callgrind helper is used here.
#[allow(dead_code)]
mod common;
use common::callgrind_total;

const ANSWER: &str = r#"{"ok":true,"result":{"message_id":12345,"from":{"id":77,"is_bot":true,"first_name":"Bench","username":"bench_bot"},"chat":{"id":10001,"first_name":"U","type":"private"},"date":1764000000,"text":"u1"}}"#;

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    match args.first().map(String::as_str) {
        Some("--serve") => serve(args.get(1).and_then(|p| p.parse().ok()).expect("a port")),
        Some("--client") => {
            let client = args.get(1).expect("a client").clone();
            let calls: usize = args.get(2).and_then(|n| n.parse().ok()).expect("a count");
            let port: u16 = args.get(3).and_then(|p| p.parse().ok()).expect("a port");
            match client.as_str() {
                "bot" => with_bot(calls, port),
                "hyper" => with_hyper(calls, port),
                other => panic!("no client {other}"),
            }
        }
        _ => {
            let n1 = args.first().and_then(|n| n.parse().ok()).unwrap_or(200);
            let n2 = args.get(1).and_then(|n| n.parse().ok()).unwrap_or(2_200);
            assert!(n2 > n1, "N2 must be larger than N1");
            drive(n1, n2);
        }
    }
}

fn drive(n1: usize, n2: usize) {
    let exe = std::env::current_exe().expect("the bench knows its path");
    let port = TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let server = Server(
        Command::new(&exe)
            .args(["--serve", &port.to_string()])
            .stdin(Stdio::null())
            .spawn()
            .expect("the server starts"),
    );
    // Bounded: the server binds within moments or the bench fails.
    let up = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    assert!(up, "the server did not listen on {port}");
    let dir = tempfile::tempdir().expect("a temporary directory");
    println!("# HTTP client alone, {n1} and {n2} calls on one keep-alive connection");
    for client in ["bot", "hyper"] {
        let count = |calls: usize| -> u64 {
            let out = dir.path().join(format!("callgrind.{client}.{calls}"));
            let status = Command::new("valgrind")
                .arg("--tool=callgrind")
                .arg("--trace-children=no")
                .arg(format!("--callgrind-out-file={}", out.display()))
                .arg(format!("--log-file={}.log", out.display()))
                .arg(&exe)
                .args(["--client", client, &calls.to_string(), &port.to_string()])
                .status()
                .expect("valgrind starts (is it installed?)");
            assert!(status.success(), "{client} under valgrind: {status}");
            callgrind_total(&out)
        };
        let (small, large) = (count(n1), count(n2));
        let per = (large as f64 - small as f64) / (n2 - n1) as f64;
        let name = match client {
            "bot" => "asgigramd's Bot (awc)",
            _ => "hyper, HTTP/1.1 connection API",
        };
        println!("{name}: {per:.0} instructions per call");
    }
    drop(server);
}

/// The server child, killed however the bench ends.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn params() -> Value {
    json!({"chat_id": 10001, "text": "u1"})
}

fn with_bot(calls: usize, port: u16) {
    let token = asgigramd::settings::BotToken::new("77:BENCH");
    actix_rt::System::new().block_on(async move {
        let bot = asgigramd::telegram::Bot::new(
            &format!("http://127.0.0.1:{port}"),
            &token,
            Duration::from_secs(10),
        );
        for _ in 0..calls {
            bot.call_unread("sendMessage", &params(), Duration::from_secs(10))
                .await
                .expect("the server answers");
        }
    });
}

fn with_hyper(calls: usize, port: u16) {
    use http_body_util::{BodyExt, Full};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .expect("the server listens");
        stream.set_nodelay(true).expect("a TCP socket");
        let (mut send, connection) =
            hyper::client::conn::http1::handshake::<_, Full<bytes::Bytes>>(
                hyper_util::rt::TokioIo::new(stream),
            )
            .await
            .expect("an HTTP/1.1 connection");
        tokio::task::spawn_local(connection);
        for _ in 0..calls {
            let body = serde_json::to_vec(&params()).expect("a map encodes");
            let request = hyper::Request::post("/bot77:BENCH/sendMessage")
                .header("host", format!("127.0.0.1:{port}"))
                .header("content-type", "application/json")
                .body(Full::new(bytes::Bytes::from(body)))
                .expect("a valid request");
            send.ready().await.expect("the connection is open");
            let answer = send
                .send_request(request)
                .await
                .expect("the server answers");
            let body = answer.into_body().collect().await.expect("a whole body");
            assert!(body.to_bytes().starts_with(b"{\"ok\":true"));
        }
    });
}

/// Answers every request on each connection, keep-alive, with [`ANSWER`].
fn serve(port: u16) {
    let listener = TcpListener::bind(("127.0.0.1", port)).expect("the port is free");
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        std::thread::spawn(move || {
            let _ = answer_all(stream);
        });
    }
}

fn answer_all(stream: TcpStream) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut out = stream.try_clone()?;
    let mut input = BufReader::new(stream);
    let mut line = String::new();
    loop {
        let mut length = 0;
        loop {
            line.clear();
            if input.read_line(&mut line)? == 0 {
                return Ok(());
            }
            let header = line.trim_end();
            if header.is_empty() {
                break;
            }
            if let Some((name, value)) = header.split_once(':') {
                if name.eq_ignore_ascii_case("content-length") {
                    length = value.trim().parse().unwrap_or(0);
                }
            }
        }
        let mut body = vec![0; length];
        input.read_exact(&mut body)?;
        write!(
            out,
            "HTTP/1.1 200 OK\r\nServer: nginx/1.18.0\r\nDate: Thu, 03 Dec 2026 10:00:00 GMT\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: keep-alive\r\n\
             Strict-Transport-Security: max-age=31536000; includeSubDomains; preload\r\n\
             Access-Control-Allow-Origin: *\r\n\
             Access-Control-Expose-Headers: Content-Length,Content-Type,Date,Server,Connection\r\n\r\n{ANSWER}",
            ANSWER.len()
        )?;
    }
}
