//! End to end: `asgigramd sandbox`, the Bot API emulator as a process of its
//! own. A daemon in another process polls it like Telegram, a person
//! writes through its web chat, and the reply shows there; SIGTERM ends it.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::{apps_dir, binary, Daemon};

/// The emulator's process and what it printed at start.
struct Standalone {
    child: Child,
    api_url: String,
    token: String,
    web: String,
}

impl Standalone {
    fn start() -> Standalone {
        let mut child = Command::new(binary())
            .args(["sandbox", "--listen", "127.0.0.1:0", "--web", "127.0.0.1:0"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("the binary runs");
        let mut lines = BufReader::new(child.stdout.take().expect("piped")).lines();
        let mut next = |prefix: &str| {
            let line = lines
                .next()
                .expect("a line")
                .expect("the sandbox prints where it is");
            line.strip_prefix(prefix)
                .unwrap_or_else(|| panic!("expected {prefix:?}, got {line:?}"))
                .to_string()
        };
        let api_url = next("Bot API sandbox: ");
        let token = next("token: ");
        let web = next("Web chat: ");
        Standalone {
            child,
            api_url,
            token,
            web,
        }
    }

    /// The web chat's `host:port`.
    fn web_host(&self) -> &str {
        self.web.trim_start_matches("http://").trim_end_matches('/')
    }

    /// Writes `text` as Alice in her private chat, through the web chat.
    fn send_as_alice(&self, text: &str) {
        let body = serde_json::json!({"user": 1000, "chat": 1000, "text": text}).to_string();
        let host = self.web_host();
        let request = format!(
            "POST /api/send HTTP/1.1\r\nHost: {host}\r\nx-sandbox-chat: 1\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        let answer = exchange(host, &request, None);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    }

    /// The web chat's first event on connecting: a snapshot of every chat.
    fn snapshot(&self) -> String {
        let host = self.web_host();
        let request = format!("GET /events HTTP/1.1\r\nHost: {host}\r\n\r\n");
        exchange(host, &request, Some("\n\n"))
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `request` to `host` and reads the answer: all of it, or up to the
/// first `until` after the headers (an event stream never ends).
fn exchange(host: &str, request: &str, until: Option<&str>) -> String {
    let mut stream = TcpStream::connect(host).expect("the web chat listens");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("a timeout can be set");
    stream
        .write_all(request.as_bytes())
        .expect("the request is written");
    let mut answer = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(20) {
        match stream.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(n) => answer.extend_from_slice(&chunk[..n]),
        }
        let text = String::from_utf8_lossy(&answer);
        if let (Some(until), Some(body)) = (until, text.split_once("\r\n\r\n")) {
            if body.1.contains(until) {
                break;
            }
        }
    }
    String::from_utf8_lossy(&answer).into_owned()
}

#[test]
fn a_daemon_in_another_process_answers_a_person_in_the_web_chat_and_sigterm_ends_it() {
    let mut sandbox = Standalone::start();
    assert!(sandbox.api_url.starts_with("http://127.0.0.1:"));
    let config = format!(
        "[telegram]\ntoken = \"{}\"\napi_url = \"{}\"\npoll_timeout = 5\n\n\
         [app]\napplication = \"echo3:app\"\napp_dir = \"{}\"\n",
        sandbox.token,
        sandbox.api_url,
        apps_dir().display()
    );
    let daemon = Daemon::start(&config, &[]);
    sandbox.send_as_alice("hello from the web chat");
    let deadline = Instant::now() + Duration::from_secs(60);
    let (answered, last) = loop {
        let snapshot = sandbox.snapshot();
        // The person's message and the bot's echo: the text twice.
        if snapshot.matches("hello from the web chat").count() >= 2 {
            break (true, snapshot);
        }
        if Instant::now() > deadline {
            break (false, snapshot);
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        answered,
        "no echo in the web chat; last snapshot:\n{last}\ndaemon log:\n{}",
        daemon.log()
    );
    let (status, log) = daemon.stop();
    assert!(status.success(), "{log}");

    let pid = i32::try_from(sandbox.child.id()).expect("pids fit in i32");
    // SAFETY: kill(2) with a pid this test started and has not reaped.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    let started = Instant::now();
    let status = loop {
        if let Some(status) = sandbox.child.try_wait().expect("waitable") {
            break Some(status);
        }
        if started.elapsed() > Duration::from_secs(20) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "SIGTERM ends the sandbox cleanly: {status:?}"
    );
}
