//! The sandbox: a local emulator of the Telegram Bot API.
//!
//! The project's tests and `asgigramd --sandbox` point the daemon at a
//! [`Sandbox`] instead of `api.telegram.org`. It serves the Bot API over HTTP
//! on the loopback interface and lets the embedding code play Telegram's other
//! side: inject updates, look at every call the bot made, wait for conditions,
//! and switch on flood limits and failures.
//!
//! # What is faithful
//!
//! Everything the daemon can observe over HTTP follows Telegram:
//!
//! * URLs `/bot<token>/<method>` (method names case-insensitive), GET or POST,
//!   parameters from the query string, JSON, url-encoded or multipart bodies;
//!   values are read the way Telegram reads them (numbers and booleans from
//!   strings, JSON-serialized objects such as `reply_markup`).
//! * Envelopes `{"ok":true,"result":…}` and `{"ok":false,"error_code":…,
//!   "description":…,"parameters":…}` with Telegram's status codes and wording:
//!   401 for a wrong or revoked token (404 for a malformed one), 404 for an
//!   unknown method, 400 for missing parameters or unknown chats, 403 when
//!   writing first to a user who never talked to the bot, 409 conflicts, 429
//!   with `retry_after` and a `Retry-After` header.
//! * `getUpdates`: offset confirmation (including negative offsets), limit
//!   clamping, long polling up to 50 s with a short batching delay, persistent
//!   `allowed_updates`, and the 409 that terminates an earlier parked request.
//!   An active webhook makes `getUpdates` fail with 409 as on Telegram.
//! * Webhooks: `setWebhook` (http:// accepted too, for local delivery),
//!   `deleteWebhook`, `getWebhookInfo` with the last delivery error; while
//!   one is set, updates are POSTed to it with the secret header, one per
//!   chat at a time, up to `max_connections` at once, and sent again with
//!   backoff until answered 2xx (see `webhook`).
//! * Every method of Bot API 10.2 (see `schema.json`) exists, checks its
//!   required parameters and answers a plausible result of its documented
//!   return type. Messages get per-chat increasing ids, are remembered, and
//!   can be replied to, edited, forwarded, copied and deleted with Telegram's
//!   errors for unknown or unmodified messages.
//! * Formatting: `parse_mode` HTML, MarkdownV2 and Markdown in texts and
//!   captions become plain text and `entities` (UTF-16 offsets) by
//!   Telegram's rules, and markup Telegram refuses is refused with its
//!   `can't parse entities: …` error (see `formatting`).
//! * Files: `getFile` answers the File of every file a user sent
//!   ([`Sandbox::inject_document`], [`Sandbox::inject_photo`],
//!   [`Sandbox::add_file`]) or the bot uploaded, and `400 Bad Request:
//!   invalid file_id` for any other id; their bytes are served at
//!   `/file/bot<token>/<file_path>`.
//! * Clients' side: a group whose members are known ([`Sandbox::create_group`]),
//!   messages from any user in it ([`Sandbox::inject_text_from`]), and
//!   inline button presses that become `callback_query` updates with the
//!   message, the user and a per-chat `chat_instance`
//!   ([`Sandbox::press_button`]).
//! * Flood limits (1 message/s per chat with a small burst, 20/min per group,
//!   30/s overall), group-to-supergroup migration errors and token revocation,
//!   all switchable at run time.
//!
//! # What is not emulated
//!
//! Self-signed webhook certificates, the entities Telegram detects by itself
//! (URLs, mentions, hashtags in plain text; entities given are kept as
//! given), permissions, membership beyond the private-chat rule and the
//! groups made by `create_group`, real media processing, file size limits other than the upload cap, the 3-second
//! throttling Telegram applies to busy-looping or conflicting `getUpdates`
//! callers, and the 24-hour expiry of unconfirmed updates. File identifiers
//! the sandbox never issued are accepted in messages the bot sends (and
//! known to `getFile` from then on). Where Telegram never
//! creates updates of types the bot left out of `allowed_updates`, the
//! sandbox drops them when the bot polls, so that tests may inject before
//! the bot's first `getUpdates`. A caller that hangs up while its long poll
//! is parked is forgotten (within 0.1 s) rather than answered 409 later.
//!
//! Failures that Telegram's network produces (502 pages, dropped connections,
//! delays, answers whose body stalls after the headers) and 429s with any
//! `retry_after` are injected on demand through a [`FaultPlan`], for
//! `getUpdates` as for every other method.

mod buttons;
mod envelope;
mod fabricate;
mod faults;
pub(crate) mod formatting;
mod messages;
mod methods;
mod params;
mod polling;
mod schema;
mod server;
mod state;
mod webhook;

pub use buttons::{ButtonError, Pressed};
pub use faults::{Fault, FaultPlan};
pub(crate) use params::{multipart_parts, Part, PartsError};
pub use state::{
    AnsweredPoll, RecordedCall, SandboxEvent, SandboxStats, SandboxView, UploadedFile, Watched,
};

use std::fmt;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use state::State;

/// Token used when [`SandboxOptions::token`] is left at its default.
pub const DEFAULT_TOKEN: &str = "1234567890:AAsandbox-token-for-local-use-only";

/// How to start a [`Sandbox`].
#[derive(Clone)]
pub struct SandboxOptions {
    /// The bot token the sandbox accepts; any other token is rejected.
    pub token: String,
    /// Address to listen on; port 0 picks a free port.
    pub bind: SocketAddr,
    /// The bot's User object as returned by `getMe`. Missing `id`, `is_bot`,
    /// `first_name` and `username` are filled in (the id from the token).
    pub bot: Value,
    /// The `update_id` given to the first injected update.
    pub first_update_id: i64,
    /// Seed of the random choices (fault plans, dice values), so that runs
    /// with the same calls behave the same.
    pub seed: u64,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            token: DEFAULT_TOKEN.to_string(),
            bind: SocketAddr::from((Ipv4Addr::LOCALHOST, 0)),
            bot: json!({"first_name": "Sandbox Bot", "username": "sandbox_bot"}),
            first_update_id: 100_000_001,
            seed: 0,
        }
    }
}

impl fmt::Debug for SandboxOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SandboxOptions")
            .field("token", &"<redacted>")
            .field("bind", &self.bind)
            .field("bot", &self.bot)
            .field("first_update_id", &self.first_update_id)
            .field("seed", &self.seed)
            .finish()
    }
}

/// State shared by the control API and the HTTP server.
pub(crate) struct Shared {
    state: Mutex<State>,
    /// Signalled after every change, for [`Sandbox::wait_until`].
    changed: Condvar,
    /// Wakes parked `getUpdates` requests after every change.
    poll_wakeup: tokio::sync::Notify,
}

impl Shared {
    /// Locks the state. A panic while the lock was held (for instance in a
    /// test's `wait_until` predicate) poisons the mutex; the state is plain
    /// data whose every change is completed before anything can panic, so
    /// carrying on is safe and spares other tests a cascade of failures.
    pub(crate) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Reads the state without signalling a change.
    pub(crate) fn read<R>(&self, f: impl FnOnce(&State) -> R) -> R {
        f(&self.lock())
    }

    /// Changes the state, then wakes `wait_until` callers and parked polls.
    pub(crate) fn update<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let result = f(&mut self.lock());
        self.changed.notify_all();
        self.poll_wakeup.notify_waiters();
        result
    }

    /// Changes the state and wakes `wait_until` callers, but not parked
    /// polls: for the polls' own bookkeeping, which must not wake the poll
    /// that made it.
    pub(crate) fn update_quietly<R>(&self, f: impl FnOnce(&mut State) -> R) -> R {
        let result = f(&mut self.lock());
        self.changed.notify_all();
        result
    }
}

/// A running Bot API emulator. Dropping it stops the server.
pub struct Sandbox {
    shared: Arc<Shared>,
    addr: SocketAddr,
    token: String,
    server: server::Running,
}

impl fmt::Debug for Sandbox {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sandbox")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Sandbox {
    /// Starts the HTTP server on its own thread and returns once it listens.
    ///
    /// # Errors
    ///
    /// When the address cannot be bound or the thread cannot be started.
    pub fn start(opts: SandboxOptions) -> std::io::Result<Sandbox> {
        let token = opts.token.clone();
        let bind = opts.bind;
        let shared = Arc::new(Shared {
            state: Mutex::new(State::new(opts)),
            changed: Condvar::new(),
            poll_wakeup: tokio::sync::Notify::new(),
        });
        let (addr, server) = server::spawn(shared.clone(), bind)?;
        log::info!(
            "Bot API {} sandbox listening on http://{addr}",
            schema::schema().version
        );
        Ok(Sandbox {
            shared,
            addr,
            token,
            server,
        })
    }

    /// Base URL of the API, such as `http://127.0.0.1:40123`; clients call
    /// `{api_url}/bot{token}/{method}` and download files from
    /// `{api_url}/file/bot{token}/{file_path}`.
    pub fn api_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The token the sandbox accepts.
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The bot's User object, as `getMe` returns it.
    pub fn bot(&self) -> Value {
        self.shared.read(|s| s.bot.clone())
    }

    /// Queues an update for `getUpdates`. Fills `update_id` when absent and
    /// learns the chats, users and messages it mentions. Updates of a type the
    /// bot excludes with `allowed_updates` (by default `chat_member`,
    /// `message_reaction` and `message_reaction_count`) are dropped when the
    /// bot polls, whenever they were injected. Returns the update's id.
    pub fn inject_update(&self, update: Value) -> i64 {
        self.shared.update(|s| s.inject_update(update))
    }

    /// Queues `raw` exactly as given, even if it is not a valid update (an
    /// object without `update_id` still gets one), to test bad input.
    pub fn inject_raw(&self, raw: Value) {
        self.shared.update(|s| s.inject_raw(raw));
    }

    /// Queues a text message written by the user `chat_id` in their private
    /// chat with the bot (first name `"User <id>"`); a negative `chat_id` is a
    /// group message from user 1000. A leading `/command` gets its
    /// `bot_command` entity as on Telegram. Returns the update's id.
    pub fn inject_text(&self, chat_id: i64, text: &str) -> i64 {
        self.shared.update(|s| s.inject_text(chat_id, text))
    }

    /// [`Sandbox::inject_text`] written by user `from` instead of the chat's
    /// default sender: a second user in a group, for instance.
    pub fn inject_text_from(&self, chat_id: i64, from: i64, text: &str) -> i64 {
        self.shared
            .update(|s| s.inject_text_from(chat_id, Some(from), text))
    }

    /// A message with a photo (`file_name` None) or a document named
    /// `file_name`, of `bytes`, with an optional caption, written by user
    /// `from` in chat `chat_id`. Returns the update's id and the file's
    /// `file_id`.
    pub fn inject_file_from(
        &self,
        chat_id: i64,
        from: i64,
        bytes: impl Into<bytes::Bytes>,
        file_name: Option<&str>,
        caption: Option<&str>,
    ) -> (i64, String) {
        let bytes = bytes.into();
        self.shared
            .update(|s| s.inject_file_from(chat_id, Some(from), bytes, file_name, caption))
    }

    /// Makes a user known (a User object with at least `id`; `is_bot` and
    /// `first_name` are filled in when missing), so that their messages,
    /// button presses and their private chat carry this name.
    pub fn register_user(&self, user: Value) {
        self.shared.update(|s| s.register_user(&user));
    }

    /// Makes a basic group with the bot and `members` in it, as if a user
    /// had created it and added the bot; returns its Chat object. Messages
    /// from any member can then be injected with
    /// [`Sandbox::inject_text_from`]; `getChatMember` answers "left" for
    /// users who are not members.
    pub fn create_group(&self, id: i64, title: &str, members: &[i64]) -> Value {
        self.shared.update(|s| s.create_group(id, title, members))
    }

    /// Presses button `index` (0-based, counted row by row) of the inline
    /// keyboard on the bot's message `message_id` in chat `chat_id`, as
    /// user `from`. A callback button queues a `callback_query` update
    /// with the message, the user and the chat's `chat_instance`, which the
    /// bot answers with `answerCallbackQuery` (see [`Sandbox::subscribe`]).
    ///
    /// # Errors
    ///
    /// When there is no such message or button, or the button does
    /// something only a client does (opening a URL, a web app…).
    pub fn press_button(
        &self,
        chat_id: i64,
        message_id: i64,
        from: i64,
        index: usize,
    ) -> Result<Pressed, ButtonError> {
        self.shared
            .update(|s| s.press_button(chat_id, message_id, from, index))
    }

    /// Makes a chat known without an update, e.g. a group or channel the bot
    /// was added to. `chat` is a Chat object with at least `id` and `type`.
    pub fn register_chat(&self, chat: Value) {
        self.shared.update(|s| s.register_chat(&chat));
    }

    /// Stores a downloadable file and returns its `file_id`, so that injected
    /// updates can refer to media the bot fetches with `getFile`.
    pub fn add_file(&self, bytes: impl Into<bytes::Bytes>, file_name: &str) -> String {
        let bytes = bytes.into();
        self.shared.update(|s| s.add_file(bytes, file_name))
    }

    /// Queues a message with a document of `bytes` named `file_name`, from
    /// the user (or group) [`Sandbox::inject_text`] would write it from.
    /// Returns the update's id and the document's `file_id`, which `getFile`
    /// knows and whose bytes it serves.
    pub fn inject_document(
        &self,
        chat_id: i64,
        bytes: impl Into<bytes::Bytes>,
        file_name: &str,
    ) -> (i64, String) {
        let bytes = bytes.into();
        self.shared
            .update(|s| s.inject_file(chat_id, bytes, Some(file_name)))
    }

    /// The same with a photo (one size: the sandbox does not scale images).
    pub fn inject_photo(&self, chat_id: i64, bytes: impl Into<bytes::Bytes>) -> (i64, String) {
        let bytes = bytes.into();
        self.shared.update(|s| s.inject_file(chat_id, bytes, None))
    }

    /// Makes `getFile` report `size` bytes for the file, whatever its
    /// content: a bot can be tried on a file too large to move, or on one
    /// larger than its File says. Returns whether the file is known.
    pub fn fake_file_size(&self, file_id: &str, size: usize) -> bool {
        self.shared.update(|s| s.fake_file_size(file_id, size))
    }

    /// Every call the bot made except `getUpdates`, in arrival order.
    pub fn calls(&self) -> Vec<RecordedCall> {
        self.shared.read(|s| s.calls.clone())
    }

    /// Texts of the `sendMessage` calls that delivered a message to `chat_id`,
    /// in order (including those whose answer a fault then lost).
    pub fn sent_texts(&self, chat_id: i64) -> Vec<String> {
        self.shared
            .read(|s| SandboxView::new(s).sent_texts(chat_id))
    }

    /// Blocks until `pred` holds or `timeout` passes; returns whether it held.
    /// `pred` is checked now and after every change of the sandbox's state,
    /// with the state locked: it must use the view it is given, not call
    /// back into the `Sandbox`.
    pub fn wait_until(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&SandboxView<'_>) -> bool,
    ) -> bool {
        let deadline = Instant::now() + timeout;
        let mut guard = self.shared.lock();
        loop {
            if pred(&SandboxView::new(&guard)) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            guard = match self.shared.changed.wait_timeout(guard, deadline - now) {
                Ok((guard, _)) => guard,
                // Same reasoning as `Shared::lock`: the state stays usable.
                Err(poisoned) => poisoned.into_inner().0,
            };
        }
    }

    /// Runs `f` on a consistent view of the current state (locked meanwhile,
    /// so `f` must not call back into the `Sandbox`).
    pub fn inspect<R>(&self, f: impl FnOnce(&SandboxView<'_>) -> R) -> R {
        self.shared.read(|s| f(&SandboxView::new(s)))
    }

    /// The offset the bot confirmed last: every update with a smaller id is
    /// gone. 0 until the first confirmation.
    pub fn confirmed_offset(&self) -> i64 {
        self.shared.read(|s| s.confirmed_offset)
    }

    /// Number of queued updates the bot has not confirmed yet.
    pub fn pending_updates(&self) -> usize {
        self.shared.read(|s| s.updates.len())
    }

    /// Receives every successful call from now on, as it happens.
    pub fn subscribe(&self) -> mpsc::Receiver<RecordedCall> {
        self.shared.update(State::subscribe)
    }

    /// Receives, from now on, every call the bot makes (failed ones too)
    /// and every update queued for it, numbered in the order they happened
    /// (see [`SandboxView::events`]): what a client needs to show a chat
    /// live.
    pub fn watch(&self) -> mpsc::Receiver<Watched> {
        self.shared.update(State::watch)
    }

    /// Switches Telegram's flood limits on or off (off by default). Turning
    /// them on starts with fresh counters.
    pub fn set_rate_limits(&self, on: bool) {
        self.shared.update(|s| s.set_rate_limits(on));
    }

    /// Replaces the fault plan; [`FaultPlan::default`] injects nothing. The
    /// random choices restart from the sandbox's seed, so a plan makes the
    /// same decisions for the same sequence of calls.
    pub fn set_faults(&self, plan: FaultPlan) {
        self.shared.update(|s| s.set_faults(plan));
    }

    /// Declares that group `from` was upgraded to supergroup `to`: calls aimed
    /// at `from` fail with 400 and `migrate_to_chat_id`, and `to` becomes a
    /// known supergroup with the group's title.
    pub fn migrate_chat(&self, from: i64, to: i64) {
        self.shared.update(|s| s.migrate_chat(from, to));
    }

    /// Makes every call fail with 401 as if the token had been revoked (or
    /// accepts it again), including `getUpdates` requests already parked.
    pub fn set_token_rejected(&self, on: bool) {
        self.shared.update(|s| s.token_rejected = on);
    }

    /// Counters since start.
    pub fn stats(&self) -> SandboxStats {
        self.shared.read(|s| s.stats.clone())
    }

    /// Stops the server and waits for its thread to end.
    pub fn stop(self) {
        // Dropping does the work; this spells out the intent at call sites.
        drop(self);
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        self.server.stop();
        log::info!("Bot API sandbox on {} stopped", self.addr);
    }
}

#[cfg(test)]
mod tests;
