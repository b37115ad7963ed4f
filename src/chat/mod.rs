//! `asgigramd --sandbox` and `--sandbox-web`: chat with the bot, no token,
//! no network.
//!
//! The sandbox (a local Bot API emulator) runs on its own thread on
//! loopback; the daemon polls it like it would poll Telegram. Two views play
//! Telegram's client side on it, alone or together: the terminal
//! (`terminal`: each line typed is a message, the bot's calls print as
//! lines) and a web page (`web`: a Telegram-like chat in the browser, live).
//! What both mean by the same action lives here: the two sandbox people
//! (Alice and Bob), their private chats and the group they share with the
//! bot, and what a person can do in a chat (write, press a button, send a
//! file), all through the sandbox's own client side (`inject_text_from`,
//! `press_button`, `inject_file_from`).

mod input;
mod render;
mod terminal;
pub mod web;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::sync::Notify;

use crate::sandbox::{ButtonError, Pressed, Sandbox, SandboxOptions};
use crate::settings::{BotToken, Settings};
use crate::RunError;

/// The first sandbox user's id, which is also their private chat's id.
pub const SANDBOX_USER: i64 = 1000;
/// The second sandbox user, for trying a bot with two people.
pub const SECOND_USER: i64 = 1001;
/// The group the sandbox makes, with both users and the bot in it.
pub const SANDBOX_GROUP: i64 = -4_000_000_001;
const GROUP_TITLE: &str = "Sandbox group";

/// The sandbox users: id, the name the chat knows them by, first name.
const PEOPLE: [(i64, &str, &str); 2] = [
    (SANDBOX_USER, "alice", "Alice"),
    (SECOND_USER, "bob", "Bob"),
];

/// Which views of the chat run.
#[derive(Clone, Copy, Debug, Default)]
pub struct Views {
    /// The terminal chat on stdin and stdout (`--sandbox`).
    pub terminal: bool,
    /// The web chat, served on this address (`--sandbox-web`).
    pub web: Option<SocketAddr>,
}

/// Where a person is: who they are, and whether in the group or in their
/// private chat with the bot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Place {
    /// Index into [`PEOPLE`].
    person: usize,
    in_group: bool,
}

impl Place {
    /// Alice in her private chat, where both chats start.
    pub const START: Place = Place {
        person: 0,
        in_group: false,
    };

    /// User `user` in chat `chat`; None unless `user` is one of the sandbox
    /// people and `chat` is their private chat or the group.
    pub fn of(user: i64, chat: i64) -> Option<Place> {
        let person = PEOPLE.iter().position(|(id, ..)| *id == user)?;
        let in_group = match chat {
            SANDBOX_GROUP => true,
            _ if chat == user => false,
            _ => return None,
        };
        Some(Place { person, in_group })
    }

    pub fn user(self) -> i64 {
        PEOPLE[self.person].0
    }

    pub fn chat(self) -> i64 {
        if self.in_group {
            SANDBOX_GROUP
        } else {
            self.user()
        }
    }

    /// `[alice @ private]`.
    fn label(self) -> String {
        let place = if self.in_group { "group" } else { "private" };
        format!("[{} @ {place}]", PEOPLE[self.person].1)
    }

    /// A text message from this person in this chat; the update's id.
    pub fn send_text(self, sandbox: &Sandbox, text: &str) -> i64 {
        sandbox.inject_text_from(self.chat(), self.user(), text)
    }

    /// Presses button `index` (0-based) of the inline keyboard on the bot's
    /// message `message_id` here.
    pub fn press(
        self,
        sandbox: &Sandbox,
        message_id: i64,
        index: usize,
    ) -> Result<Pressed, ButtonError> {
        sandbox.press_button(self.chat(), message_id, self.user(), index)
    }

    /// Sends a file: a photo, or with `document_name` a document of that
    /// name. Returns the update's id.
    pub fn send_file(
        self,
        sandbox: &Sandbox,
        bytes: impl Into<bytes::Bytes>,
        document_name: Option<&str>,
        caption: Option<&str>,
    ) -> i64 {
        let (update, _) =
            sandbox.inject_file_from(self.chat(), self.user(), bytes, document_name, caption);
        update
    }
}

/// Runs the daemon against a fresh sandbox with the chosen views. With the
/// terminal, the chat ends when its input does; with the web chat alone, at
/// SIGINT or SIGTERM.
pub fn run(mut settings: Settings, views: Views) -> Result<(), RunError> {
    let sandbox = with_people(SandboxOptions::default())?;
    settings.telegram.api_url = sandbox.api_url();
    settings.telegram.token = BotToken::new(sandbox.token());
    // Replies should show promptly; the sandbox answers long polls at once
    // when a message arrives, so a short poll timeout costs nothing.
    settings.telegram.poll_timeout = Duration::from_secs(10);
    // Each sandbox starts its update ids afresh: a journal of its own, gone
    // with it.
    let state = std::env::temp_dir().join(format!("asgigramd-sandbox-{}", std::process::id()));
    settings.journal.dir = Some(state.clone());
    let sandbox = Arc::new(sandbox);
    let stop = Arc::new(Notify::new());
    let web = match views.web {
        Some(addr) => {
            let server = serve_web(addr, &sandbox)?;
            // With the terminal chat, its end (Ctrl-D) ends both.
            let ends = if views.terminal {
                ""
            } else {
                " (Ctrl-C stops)"
            };
            terminal::write_out(&format!(
                "Web chat with {}: {}{ends}\n",
                settings.app.application,
                server.url()
            ));
            Some(server)
        }
        None => None,
    };
    if views.terminal {
        terminal::start(&sandbox, &stop, &settings.app.application);
    }
    let result = actix::System::new().block_on(crate::run(settings, Some(stop)));
    if let Some(server) = web {
        server.stop();
    }
    let _ = std::fs::remove_dir_all(&state);
    result
}

/// A sandbox with the two people and their group, as both views expect.
fn with_people(options: SandboxOptions) -> Result<Sandbox, RunError> {
    let sandbox = Sandbox::start(options).map_err(RunError::Sandbox)?;
    for (id, name, first_name) in PEOPLE {
        sandbox.register_user(json!({"id": id, "first_name": first_name, "username": name}));
    }
    let members: Vec<i64> = PEOPLE.iter().map(|(id, ..)| *id).collect();
    sandbox.create_group(SANDBOX_GROUP, GROUP_TITLE, &members);
    Ok(sandbox)
}

fn serve_web(addr: SocketAddr, sandbox: &Arc<Sandbox>) -> Result<web::WebChat, RunError> {
    let server =
        web::serve(addr, sandbox.clone()).map_err(|source| RunError::WebChat { addr, source })?;
    if !server.addr().ip().is_loopback() {
        log::warn!(
            "the web chat listens on {}, which other machines can reach; it has no \
             login, so anyone who can reach it can write as the sandbox users",
            server.addr()
        );
    }
    Ok(server)
}

/// `asgigramd sandbox`: the emulator alone on `listen`, for bots of any
/// framework (and asgigramd nodes) pointed at it, with the web chat on
/// `web` to play its users. Prints where both are and the token, then
/// runs until SIGINT or SIGTERM.
pub fn standalone(
    listen: SocketAddr,
    web: Option<SocketAddr>,
    token: Option<String>,
) -> Result<(), RunError> {
    let mut options = SandboxOptions {
        bind: listen,
        ..SandboxOptions::default()
    };
    if let Some(token) = token {
        options.token = token;
    }
    let sandbox = Arc::new(with_people(options)?);
    if !sandbox.local_addr().ip().is_loopback() {
        log::warn!(
            "the sandbox listens on {}, which other machines can reach",
            sandbox.local_addr()
        );
    }
    // The emulator's token is for local use and must be known to be used:
    // printing it is the point (a real bot's token never reaches here).
    terminal::write_out(&format!(
        "Bot API sandbox: {}\ntoken: {}\n",
        sandbox.api_url(),
        sandbox.token()
    ));
    let web = match web {
        Some(addr) => {
            let server = serve_web(addr, &sandbox)?;
            terminal::write_out(&format!("Web chat: {}\n", server.url()));
            Some(server)
        }
        None => None,
    };
    terminal::write_out("(Ctrl-C stops)\n");
    let signalled = actix::System::new().block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            interrupted = tokio::signal::ctrl_c() => interrupted,
            _ = term.recv() => Ok(()),
        }
    });
    if let Some(server) = web {
        server.stop();
    }
    log::info!("sandbox stopped");
    signalled.map_err(RunError::Sandbox)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn places_name_their_chat_and_user() {
        assert_eq!(
            (Place::START.chat(), Place::START.user()),
            (SANDBOX_USER, SANDBOX_USER)
        );
        assert_eq!(Place::START.label(), "[alice @ private]");
        let bob_group = Place::of(SECOND_USER, SANDBOX_GROUP).expect("Bob is in the group");
        assert_eq!(
            (bob_group.chat(), bob_group.user()),
            (SANDBOX_GROUP, SECOND_USER)
        );
        assert_eq!(bob_group.label(), "[bob @ group]");
    }

    #[test]
    fn people_write_only_in_their_own_chats() {
        assert_eq!(Place::of(SANDBOX_USER, SANDBOX_USER), Some(Place::START));
        assert_eq!(
            Place::of(SECOND_USER, SECOND_USER).map(Place::chat),
            Some(SECOND_USER)
        );
        assert_eq!(Place::of(SANDBOX_USER, SECOND_USER), None, "Bob's chat");
        assert_eq!(Place::of(1002, 1002), None, "not a sandbox user");
        assert_eq!(Place::of(SANDBOX_USER, -1), None, "not the group");
    }
}
