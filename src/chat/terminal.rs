//! The terminal chat (`asgigramd --sandbox`): each line read from stdin is
//! a message from a sandbox user, or one of the chat's commands (see
//! `input`): press a button, send a file, go to the group, become the
//! other user. What the bot does prints as it happens (see `render`):
//! messages with their keyboards as numbered buttons, media, edits,
//! deletions and callback answers. With piped input each line waits for
//! the bot to answer the one before (so `!1` presses a button the bot just
//! sent), and the chat ends once the bot has been quiet for a moment after
//! the last line, so a session can be scripted.

use std::collections::HashMap;
use std::io::{BufRead, IsTerminal, Write};
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::sync::Notify;

use crate::sandbox::{RecordedCall, Sandbox};

use super::input::{self, Command};
use super::render::{Press, Screen};
use super::{Place, PEOPLE, SANDBOX_GROUP, SANDBOX_USER};

/// How long the bot must stay quiet after piped input ended before the chat
/// ends.
const QUIET: Duration = Duration::from_millis(1500);
/// How long the bot must stay quiet, once it answered a piped line, before
/// the next line is read.
const STEP_QUIET: Duration = Duration::from_millis(400);
/// Upper bound on waiting for replies after piped input ended.
const REPLY_DEADLINE: Duration = Duration::from_secs(60);

/// What both threads of the chat share: where the user is and what the bot
/// showed.
struct Chat {
    place: Place,
    screen: Screen,
}

/// The chat's output: stdout, with a `bot> ` prefix and a prompt when it
/// is a terminal.
struct Terminal {
    interactive: bool,
    chat: Mutex<Chat>,
}

impl Terminal {
    /// As `Shared::lock` in the sandbox: the state stays usable after a
    /// panic elsewhere.
    fn chat(&self) -> MutexGuard<'_, Chat> {
        self.chat.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Prints what the bot did. In a terminal, the line being typed is
    /// cleared first and the prompt shown again after.
    fn bot(&self, lines: &[String]) -> bool {
        if lines.is_empty() {
            return true;
        }
        let mut text = String::new();
        if self.interactive {
            text.push_str("\r\x1b[2K");
        }
        for line in lines {
            if self.interactive {
                text.push_str(if line.starts_with(' ') {
                    "     "
                } else {
                    "bot> "
                });
            }
            text.push_str(line);
            text.push('\n');
        }
        if self.interactive {
            text.push_str(&self.chat().place.label());
            text.push(' ');
        }
        write_out(&text)
    }

    /// Prints a line of the chat's own (help, errors, where the user went).
    fn note(&self, text: &str) {
        write_out(&format!("{text}\n"));
    }

    fn prompt(&self) {
        if self.interactive {
            let label = self.chat().place.label();
            write_out(&format!("{label} "));
        }
    }
}

/// Writes to stdout; false once stdout is closed (e.g. `| head`), when
/// there is nothing left to print to.
pub(super) fn write_out(text: &str) -> bool {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())
        .and_then(|_| out.flush())
        .is_ok()
}

/// Starts the terminal chat on `sandbox`: one thread reads stdin, one
/// prints what the bot does; `stop` is notified when the input ends.
pub(super) fn start(sandbox: &Arc<Sandbox>, stop: &Arc<Notify>, app: &str) {
    let mut names: HashMap<i64, String> = PEOPLE
        .iter()
        .map(|(id, name, _)| (*id, name.to_string()))
        .collect();
    names.insert(SANDBOX_GROUP, "group".to_string());
    let terminal = Arc::new(Terminal {
        interactive: std::io::stdin().is_terminal(),
        chat: Mutex::new(Chat {
            place: Place::START,
            screen: Screen::new(names),
        }),
    });
    let replies = sandbox.subscribe();
    {
        let (sandbox, terminal) = (sandbox.clone(), terminal.clone());
        std::thread::spawn(move || print_replies(&sandbox, replies, &terminal));
    }
    let (sandbox, stop, terminal) = (sandbox.clone(), stop.clone(), terminal.clone());
    let app = app.to_string();
    std::thread::spawn(move || read_lines(&sandbox, &stop, &terminal, &app));
}

fn read_lines(sandbox: &Sandbox, stop: &Notify, terminal: &Terminal, app: &str) {
    let interactive = terminal.interactive;
    if interactive {
        terminal.note(&format!(
            "Sandbox chat with {app}: you are Alice (user {SANDBOX_USER}) in a private chat \
             with the bot. Type a message and press Enter; /help lists the chat's commands; \
             Ctrl-D ends the chat."
        ));
    }
    let mut last = None;
    terminal.prompt();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        if !interactive {
            // Line by line: what the bot answered the previous line (a
            // keyboard to press, say) is on show before the next is read.
            if let Some(last) = last.take() {
                wait_for_replies(sandbox, last, STEP_QUIET);
            }
        }
        if let Some(update) = perform(sandbox, terminal, input::parse(&line)) {
            last = Some(update);
        }
        terminal.prompt();
    }
    if !interactive {
        if let Some(last) = last {
            wait_for_replies(sandbox, last, QUIET);
        }
    }
    stop.notify_one();
}

/// Carries out one line of input; returns the id of the update it made.
fn perform(sandbox: &Sandbox, terminal: &Terminal, command: Command) -> Option<i64> {
    let place = terminal.chat().place;
    match command {
        Command::Nothing => None,
        Command::Send(text) => Some(place.send_text(sandbox, &text)),
        Command::Help => {
            terminal.note(input::HELP);
            Some(place.send_text(sandbox, "/help"))
        }
        Command::Usage(usage) => {
            terminal.note(usage);
            None
        }
        Command::Press(n) => {
            let press = terminal.chat().screen.button(place.chat(), n);
            match press {
                Ok(Press::Inline { message_id, index }) => {
                    match place.press(sandbox, message_id, index) {
                        Ok(pressed) => Some(pressed.update_id),
                        Err(e) => {
                            terminal.note(&format!("({e})"));
                            None
                        }
                    }
                }
                Ok(Press::Text(text)) => Some(place.send_text(sandbox, &text)),
                Err(e) => {
                    terminal.note(&format!("({e})"));
                    None
                }
            }
        }
        Command::File {
            path,
            caption,
            document,
        } => match std::fs::read(&path) {
            Ok(bytes) => {
                let name = document.then(|| file_name(&path));
                Some(place.send_file(sandbox, bytes, name.as_deref(), caption.as_deref()))
            }
            Err(e) => {
                terminal.note(&format!("(cannot read {}: {e})", path.display()));
                None
            }
        },
        Command::Group | Command::Private | Command::User(_) => {
            let Some(next) = moved(place, &command) else {
                terminal.note("(no such user; they are alice and bob)");
                return None;
            };
            terminal.chat().place = next;
            if !terminal.interactive {
                // A transcript of piped input says where each part happens.
                terminal.note(&next.label());
            }
            None
        }
    }
}

/// Where a /group, /private or /user command takes the user; None for a
/// user who does not exist.
fn moved(place: Place, command: &Command) -> Option<Place> {
    Some(match command {
        Command::Group => Place {
            in_group: true,
            ..place
        },
        Command::Private => Place {
            in_group: false,
            ..place
        },
        Command::User(None) => Place {
            person: (place.person + 1) % PEOPLE.len(),
            ..place
        },
        Command::User(Some(name)) => {
            let person = PEOPLE
                .iter()
                .position(|(id, handle, _)| handle == name || id.to_string() == *name)?;
            Place { person, ..place }
        }
        _ => place,
    })
}

/// The name a document is sent with: the file's own.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|name| name.to_string_lossy().into_owned())
        .unwrap_or_else(|| "file".to_string())
}

/// Waits until the daemon has taken update `last` and the bot, once it
/// started answering (within [`QUIET`]), has sent nothing for `quiet`; or
/// until [`REPLY_DEADLINE`] passes.
fn wait_for_replies(sandbox: &Sandbox, last: i64, quiet: Duration) {
    let deadline = Instant::now() + REPLY_DEADLINE;
    // The daemon confirms a batch with its next getUpdates, right after it
    // dispatched the batch.
    while sandbox.confirmed_offset() <= last {
        if Instant::now() >= deadline {
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let calls = || sandbox.inspect(|v| v.calls().len());
    let taken = calls();
    let started = Instant::now();
    while calls() == taken {
        if started.elapsed() >= QUIET {
            // The bot does not answer this one.
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let mut seen = calls();
    while Instant::now() < deadline {
        std::thread::sleep(quiet);
        let now = calls();
        if now == seen {
            return;
        }
        seen = now;
    }
}

fn print_replies(
    sandbox: &Sandbox,
    replies: std::sync::mpsc::Receiver<RecordedCall>,
    terminal: &Terminal,
) {
    for call in replies {
        let result = match (call.method.as_str(), call.result()) {
            // copyMessage answers only the new message's id.
            ("copyMessage", Some(copied)) => call.params["chat_id"]
                .as_i64()
                .zip(copied["message_id"].as_i64())
                .and_then(|(chat, id)| sandbox.inspect(|v| v.message(chat, id).cloned()))
                .unwrap_or(Value::Null),
            (_, Some(result)) => result.clone(),
            (_, None) => continue,
        };
        let lines = {
            let mut chat = terminal.chat();
            let here = chat.place.chat();
            chat.screen.show(&call.method, &call.params, &result, here)
        };
        if !terminal.bot(&lines) {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ALICE_PRIVATE: Place = Place::START;

    #[test]
    fn switching_keeps_the_other_half_of_the_place() {
        let in_group = moved(ALICE_PRIVATE, &Command::Group).expect("always possible");
        assert_eq!(in_group.label(), "[alice @ group]");
        let bob = moved(in_group, &Command::User(None)).expect("the other user");
        assert_eq!(bob.label(), "[bob @ group]");
        let back = moved(bob, &Command::Private).expect("always possible");
        assert_eq!(back.chat(), super::super::SECOND_USER);
        assert_eq!(moved(back, &Command::User(None)), Some(ALICE_PRIVATE));
        assert_eq!(
            moved(back, &Command::User(Some("alice".into()))),
            Some(ALICE_PRIVATE)
        );
        assert_eq!(
            moved(ALICE_PRIVATE, &Command::User(Some("1001".into()))).map(Place::user),
            Some(super::super::SECOND_USER)
        );
        assert_eq!(
            moved(ALICE_PRIVATE, &Command::User(Some("carol".into()))),
            None
        );
    }
}
