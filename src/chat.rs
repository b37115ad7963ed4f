//! `asgigramd --sandbox`: the terminal becomes a private chat with the bot.
//!
//! The sandbox (a local Bot API emulator) runs on its own thread on loopback;
//! the daemon polls it like it would poll Telegram. Each line read from stdin
//! is a message from the sandbox user; each message the bot sends prints as it
//! arrives. With piped input the chat ends once every line has been taken by
//! the daemon and the bot has been quiet for a moment, so the quick start can
//! be scripted.

use std::io::{BufRead, IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Notify;

use crate::sandbox::{RecordedCall, Sandbox, SandboxOptions};
use crate::settings::{BotToken, Settings};
use crate::RunError;

/// The sandbox user's id, which is also its private chat's id.
pub const SANDBOX_USER: i64 = 1000;

/// How long the bot must stay quiet after piped input ended before the chat
/// ends.
const QUIET: Duration = Duration::from_millis(1500);
/// Upper bound on waiting for replies after piped input ended.
const REPLY_DEADLINE: Duration = Duration::from_secs(60);

/// Runs the daemon against a fresh sandbox, with stdin/stdout as the chat.
pub fn run(mut settings: Settings) -> Result<(), RunError> {
    let sandbox = Sandbox::start(SandboxOptions::default()).map_err(RunError::Sandbox)?;
    settings.telegram.api_url = sandbox.api_url();
    settings.telegram.token = BotToken::new(sandbox.token());
    // Replies should print promptly; the sandbox answers long polls at once
    // when a message arrives, so a short poll timeout costs nothing.
    settings.telegram.poll_timeout = Duration::from_secs(10);
    // Each sandbox starts its update ids afresh: a journal of its own, gone
    // with it.
    let state = std::env::temp_dir().join(format!("asgigramd-sandbox-{}", std::process::id()));
    settings.journal.dir = Some(state.clone());
    let sandbox = Arc::new(sandbox);
    let stop = Arc::new(Notify::new());
    let interactive = std::io::stdin().is_terminal();

    let replies = sandbox.subscribe();
    std::thread::spawn(move || print_replies(replies, interactive));
    {
        let (sandbox, stop) = (sandbox.clone(), stop.clone());
        let app = settings.app.application.clone();
        std::thread::spawn(move || read_lines(&sandbox, &stop, interactive, &app));
    }
    let result = actix::System::new().block_on(crate::run(settings, Some(stop)));
    let _ = std::fs::remove_dir_all(&state);
    result
}

fn read_lines(sandbox: &Sandbox, stop: &Notify, interactive: bool, app: &str) {
    if interactive {
        println!(
            "Sandbox chat with {app}: you are user {SANDBOX_USER} in a private chat. \
             Type a message and press Enter; Ctrl-D ends the chat."
        );
    }
    let mut last = None;
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if line.trim().is_empty() {
            continue;
        }
        last = Some(sandbox.inject_text(SANDBOX_USER, &line));
    }
    if !interactive {
        if let Some(last) = last {
            wait_for_replies(sandbox, last);
        }
    }
    stop.notify_one();
}

/// Waits until the daemon has taken update `last` and the bot has sent nothing
/// for [`QUIET`], or [`REPLY_DEADLINE`] passes.
fn wait_for_replies(sandbox: &Sandbox, last: i64) {
    let deadline = Instant::now() + REPLY_DEADLINE;
    // The daemon confirms a batch with its next getUpdates, right after it
    // dispatched the batch.
    while sandbox.confirmed_offset() <= last {
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut seen = sandbox.calls().len();
    while Instant::now() < deadline {
        std::thread::sleep(QUIET);
        let now = sandbox.calls().len();
        if now == seen {
            return;
        }
        seen = now;
    }
}

fn print_replies(replies: std::sync::mpsc::Receiver<RecordedCall>, interactive: bool) {
    let mut out = std::io::stdout();
    for call in replies {
        let text = match call.params.get("text").and_then(Value::as_str) {
            Some(text) => text.to_string(),
            None if call.method.starts_with("send") => format!("[{}]", call.method),
            None => continue,
        };
        let prefix = if interactive { "bot> " } else { "" };
        // stdout closed (e.g. `| head`): nothing left to print to.
        if writeln!(out, "{prefix}{text}")
            .and_then(|_| out.flush())
            .is_err()
        {
            return;
        }
    }
}
