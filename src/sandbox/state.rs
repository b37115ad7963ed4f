//! What the sandbox knows: the update queue, the chats, users, messages and
//! files Telegram would know, and everything the bot did.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::mpsc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde_json::{json, Map, Value};

use super::faults::{Fault, FaultInjector, FaultPlan, FloodControl};
use super::schema::schema;
use super::SandboxOptions;

/// A file part of a multipart request.
#[derive(Clone)]
pub struct UploadedFile {
    /// The form field name (the parameter, or the name an `attach://` refers to).
    pub name: String,
    pub file_name: Option<String>,
    pub content_type: Option<String>,
    pub size: usize,
    pub bytes: Bytes,
}

impl fmt::Debug for UploadedFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The content can be megabytes: show its size only.
        f.debug_struct("UploadedFile")
            .field("name", &self.name)
            .field("file_name", &self.file_name)
            .field("content_type", &self.content_type)
            .field("size", &self.size)
            .finish()
    }
}

/// One getUpdates answer that carried updates.
#[derive(Clone, Debug)]
pub struct AnsweredPoll {
    /// When the getUpdates request arrived.
    pub arrived: Instant,
    /// When its answer was handed to the HTTP server to write.
    pub answered: Instant,
    /// Whether it waited for updates (parked) rather than finding some.
    pub parked: bool,
    /// The update_ids it carried.
    pub update_ids: Vec<i64>,
}

/// One call the bot made.
#[derive(Clone, Debug)]
pub struct RecordedCall {
    /// Canonical method name (`sendMessage`), or the name as sent when the
    /// method does not exist.
    pub method: String,
    /// Parameters as Telegram understood them (numbers, flags and JSON
    /// values converted from strings); file parts are in `files`.
    pub params: Value,
    pub files: Vec<UploadedFile>,
    /// When the request arrived.
    pub at: Instant,
    /// HTTP status of the answer; 0 when the connection was dropped instead.
    pub status: u16,
    /// The envelope the sandbox produced, or null when the call was not
    /// executed because of a fault. After [`Fault::DropAfterExecute`] it
    /// holds the answer the bot never received.
    pub response: Value,
    /// The fault injected into this call, if any.
    pub fault: Option<Fault>,
}

impl RecordedCall {
    /// Whether the call was executed successfully (even if its answer was
    /// then lost to a fault).
    pub fn ok(&self) -> bool {
        self.response["ok"] == Value::Bool(true)
    }

    /// The `result` of a successful call.
    pub fn result(&self) -> Option<&Value> {
        self.response.get("result").filter(|_| self.ok())
    }

    /// The `description` of a failed call.
    pub fn error(&self) -> Option<&str> {
        self.response
            .get("description")?
            .as_str()
            .filter(|_| !self.ok())
    }
}

/// Something that happened in the sandbox, for [`super::Sandbox::watch`].
#[derive(Clone, Debug)]
pub enum SandboxEvent {
    /// A call the bot made (any but getUpdates), failed ones included.
    Call(RecordedCall),
    /// An update queued for the bot: a user's message, a button press.
    Update(Value),
}

/// A [`SandboxEvent`] and its place in the sandbox's history: events are
/// numbered from 1 in the order they happened, and
/// [`SandboxView::events`] tells how many a view already shows.
#[derive(Clone, Debug)]
pub struct Watched {
    pub seq: u64,
    pub event: SandboxEvent,
}

/// Counters since the sandbox started.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SandboxStats {
    /// Calls per canonical method name, getUpdates included.
    pub calls_by_method: BTreeMap<String, u64>,
    pub get_updates: u64,
    /// Answers with status 429.
    pub too_many_requests: u64,
    /// Answers with status 409.
    pub conflicts: u64,
    /// Answers with status 401.
    pub unauthorized: u64,
    pub faults_injected: u64,
}

/// A read-only view of the sandbox for [`super::Sandbox::wait_until`]
/// predicates and [`super::Sandbox::inspect`].
pub struct SandboxView<'a> {
    state: &'a State,
}

impl<'a> SandboxView<'a> {
    pub(crate) fn new(state: &'a State) -> Self {
        SandboxView { state }
    }

    /// Every call except getUpdates, in arrival order.
    pub fn calls(&self) -> &'a [RecordedCall] {
        &self.state.calls
    }

    /// The getUpdates answers that carried updates, in answer order: when
    /// each request arrived and when its answer left, so that a latency can
    /// be split into the wait for a poll and what the bot did after it.
    pub fn answered_polls(&self) -> &'a [AnsweredPoll] {
        &self.state.polls
    }

    /// The calls of one method (case-insensitive), in arrival order.
    pub fn calls_to(&self, method: &str) -> Vec<&'a RecordedCall> {
        self.state
            .calls
            .iter()
            .filter(|c| c.method.eq_ignore_ascii_case(method))
            .collect()
    }

    /// Texts of the sendMessage calls that delivered a message to `chat_id`.
    pub fn sent_texts(&self, chat_id: i64) -> Vec<String> {
        self.state
            .calls
            .iter()
            .filter(|c| c.method == "sendMessage")
            .filter_map(RecordedCall::result)
            .filter(|message| message["chat"]["id"].as_i64() == Some(chat_id))
            .filter_map(|message| message["text"].as_str().map(str::to_string))
            .collect()
    }

    pub fn confirmed_offset(&self) -> i64 {
        self.state.confirmed_offset
    }

    pub fn pending_updates(&self) -> usize {
        self.state.updates.len()
    }

    /// Updates the webhook delivered (answered 2xx), and attempts that
    /// failed (non-2xx, dropped connections, timeouts).
    pub fn webhook_deliveries(&self) -> (u64, u64) {
        (
            self.state.deliveries.delivered,
            self.state.deliveries.failed,
        )
    }

    /// Whether a getUpdates request is parked, waiting for updates.
    pub fn is_polling(&self) -> bool {
        self.state.parked_polls > 0
    }

    pub fn stats(&self) -> &'a SandboxStats {
        &self.state.stats
    }

    /// How many [`SandboxEvent`]s happened so far: the state seen here
    /// includes the event numbered this and none after it.
    pub fn events(&self) -> u64 {
        self.state.events
    }

    /// A known user's User object.
    pub fn user(&self, id: i64) -> Option<&'a Value> {
        self.state.users.get(&id)
    }

    /// The messages of a chat the sandbox knows (sent by the bot or
    /// injected, not deleted), oldest first.
    pub fn messages_in(&self, chat_id: i64) -> Vec<&'a Value> {
        let mut messages: Vec<(i64, &Value)> = self
            .state
            .messages
            .iter()
            .filter(|((chat, _), _)| *chat == chat_id)
            .map(|((_, id), message)| (*id, message))
            .collect();
        messages.sort_unstable_by_key(|(id, _)| *id);
        messages.into_iter().map(|(_, m)| m).collect()
    }

    /// The content of a file a user sent or the bot uploaded, and its
    /// `file_path`; None for unknown ids and files known by id only.
    pub fn file_content(&self, file_id: &str) -> Option<(Bytes, &'a str)> {
        let file = self.state.files.get(file_id)?;
        Some((file.bytes.clone()?, file.path.as_str()))
    }

    /// A known chat's Chat object.
    pub fn chat(&self, id: i64) -> Option<&'a Value> {
        self.state.chats.get(&id)
    }

    /// A message the sandbox knows (sent by the bot or injected).
    pub fn message(&self, chat_id: i64, message_id: i64) -> Option<&'a Value> {
        self.state.messages.get(&(chat_id, message_id))
    }
}

/// An update waiting for the bot. `id` orders and confirms it even when the
/// body (from `inject_raw`) has no usable `update_id`.
pub(crate) struct QueuedUpdate {
    pub id: i64,
    /// The update's type, for `allowed_updates`; None for raw updates,
    /// which are always delivered.
    pub kind: Option<String>,
    pub body: Value,
}

/// A file the bot can fetch with getFile and download.
pub(crate) struct StoredFile {
    pub file_id: String,
    pub unique_id: String,
    pub path: String,
    pub size: usize,
    /// None for file ids the sandbox did not issue but accepted anyway.
    pub bytes: Option<Bytes>,
}

impl StoredFile {
    /// The File object getFile returns.
    pub fn to_json(&self) -> Value {
        json!({"file_id": self.file_id, "file_unique_id": self.unique_id,
               "file_size": self.size, "file_path": self.path})
    }
}

pub(crate) struct Webhook {
    pub url: String,
    pub max_connections: i64,
    pub allowed_updates: Option<Value>,
    /// Sent with every delivery as `X-Telegram-Bot-Api-Secret-Token`.
    pub secret_token: Option<String>,
}

/// Update types Telegram leaves out unless asked for by `allowed_updates`.
const OPT_IN_UPDATE_TYPES: [&str; 3] =
    ["chat_member", "message_reaction", "message_reaction_count"];

/// Update keys whose value is a message of the chat it names.
const MESSAGE_UPDATE_TYPES: [&str; 5] = [
    "message",
    "edited_message",
    "channel_post",
    "edited_channel_post",
    "business_message",
];

/// The user injected group messages come from.
const DEFAULT_GROUP_SENDER: i64 = 1000;

pub(crate) struct State {
    pub token: String,
    pub token_rejected: bool,
    /// The bot as getMe returns it.
    pub bot: Value,
    pub updates: VecDeque<QueuedUpdate>,
    next_update_id: i64,
    pub confirmed_offset: i64,
    allowed_updates: HashSet<String>,
    /// Bumped whenever a getUpdates request parks or a webhook is set, so
    /// that the request parked before knows it was superseded.
    pub poll_generation: u64,
    pub parked_polls: usize,
    pub webhook: Option<Webhook>,
    /// What the webhook is sending (see `webhook`).
    pub deliveries: super::webhook::Deliveries,
    pub chats: HashMap<i64, Value>,
    pub users: HashMap<i64, Value>,
    /// Members (other than the bot) of the groups made by `create_group`.
    members: HashMap<i64, Vec<i64>>,
    last_message_id: HashMap<i64, i64>,
    pub messages: HashMap<(i64, i64), Value>,
    files: HashMap<String, StoredFile>,
    pub serial: u64,
    pub calls: Vec<RecordedCall>,
    /// The getUpdates answers that carried updates, in answer order.
    pub polls: Vec<AnsweredPoll>,
    subscribers: Vec<mpsc::Sender<RecordedCall>>,
    /// The number of the last [`SandboxEvent`].
    events: u64,
    watchers: Vec<mpsc::Sender<Watched>>,
    pub stats: SandboxStats,
    /// Flood limits; None while switched off.
    pub flood: Option<FloodControl>,
    pub faults: FaultInjector,
    pub migrations: HashMap<i64, i64>,
    /// Randomness of results (dice values), separate from fault decisions so
    /// that the two do not disturb each other's sequences.
    pub rng: fastrand::Rng,
}

impl State {
    pub fn new(opts: SandboxOptions) -> Self {
        let bot = complete_bot(opts.bot, &opts.token);
        State {
            token: opts.token,
            token_rejected: false,
            bot,
            updates: VecDeque::new(),
            next_update_id: opts.first_update_id,
            confirmed_offset: 0,
            allowed_updates: default_allowed_updates(),
            poll_generation: 0,
            parked_polls: 0,
            webhook: None,
            deliveries: Default::default(),
            chats: HashMap::new(),
            users: HashMap::new(),
            members: HashMap::new(),
            last_message_id: HashMap::new(),
            messages: HashMap::new(),
            files: HashMap::new(),
            serial: 0,
            calls: Vec::new(),
            polls: Vec::new(),
            subscribers: Vec::new(),
            events: 0,
            watchers: Vec::new(),
            stats: SandboxStats::default(),
            flood: None,
            faults: FaultInjector::new(opts.seed),
            migrations: HashMap::new(),
            rng: fastrand::Rng::with_seed(opts.seed.wrapping_add(1)),
        }
    }

    pub fn bot_id(&self) -> i64 {
        self.bot["id"].as_i64().unwrap_or_default()
    }

    /// The bot as it appears in `from` of its messages: getMe's capability
    /// flags are not part of it.
    pub fn bot_sender(&self) -> Value {
        let mut sender = Map::new();
        for key in ["id", "is_bot", "first_name", "last_name", "username"] {
            if let Some(value) = self.bot.get(key) {
                sender.insert(key.to_string(), value.clone());
            }
        }
        Value::Object(sender)
    }

    /// A fresh number for generated identifiers.
    pub fn next_serial(&mut self) -> u64 {
        self.serial += 1;
        self.serial
    }

    // ----- updates -------------------------------------------------------

    pub fn inject_update(&mut self, mut update: Value) -> i64 {
        let id = self.assign_update_id(&mut update);
        self.learn(&update);
        self.remember_messages(&update);
        let kind = update_type(&update).map(str::to_string);
        self.tell(|| SandboxEvent::Update(update.clone()));
        self.updates.push_back(QueuedUpdate {
            id,
            kind,
            body: update,
        });
        id
    }

    pub fn inject_raw(&mut self, mut raw: Value) {
        let id = match raw.get("update_id").and_then(Value::as_i64) {
            Some(id) => {
                self.next_update_id = self.next_update_id.max(id + 1);
                id
            }
            None => {
                let id = self.take_update_id();
                if let Value::Object(object) = &mut raw {
                    // Objects without the key get one; a present but
                    // malformed update_id is kept as the test wrote it.
                    object.entry("update_id").or_insert(id.into());
                }
                id
            }
        };
        self.tell(|| SandboxEvent::Update(raw.clone()));
        self.updates.push_back(QueuedUpdate {
            id,
            kind: None,
            body: raw,
        });
    }

    pub fn inject_text(&mut self, chat_id: i64, text: &str) -> i64 {
        self.inject_text_from(chat_id, None, text)
    }

    /// [`State::inject_text`] written by user `from` (None: the chat's
    /// default sender).
    pub fn inject_text_from(&mut self, chat_id: i64, from: Option<i64>, text: &str) -> i64 {
        let mut message = self.user_message(chat_id, from);
        message["text"] = json!(text);
        if let Some(length) = command_length(text) {
            message["entities"] = json!([{"type": "bot_command", "offset": 0, "length": length}]);
        }
        self.inject_update(json!({ "message": message }))
    }

    /// Queues a message carrying a file of `bytes`, as [`State::inject_text`]
    /// addresses it: a document named `file_name`, or with `None` a photo
    /// (one size, since the sandbox does not scale images). Returns the
    /// update's id and the file's `file_id`.
    pub fn inject_file(
        &mut self,
        chat_id: i64,
        bytes: Bytes,
        file_name: Option<&str>,
    ) -> (i64, String) {
        self.inject_file_from(chat_id, None, bytes, file_name, None)
    }

    /// [`State::inject_file`] written by user `from` (None: the chat's
    /// default sender), with a caption.
    pub fn inject_file_from(
        &mut self,
        chat_id: i64,
        from: Option<i64>,
        bytes: Bytes,
        file_name: Option<&str>,
        caption: Option<&str>,
    ) -> (i64, String) {
        let size = bytes.len();
        let folder = if file_name.is_some() {
            "documents"
        } else {
            "photos"
        };
        let file = self.store_file(Some(bytes), size, folder, file_name);
        let file_id = file.file_id.clone();
        let media =
            json!({"file_id": file.file_id, "file_unique_id": file.unique_id, "file_size": size});
        let mut message = self.user_message(chat_id, from);
        if let Some(caption) = caption.filter(|c| !c.is_empty()) {
            message["caption"] = json!(caption);
        }
        match file_name {
            Some(name) => {
                let mut document = media;
                document["file_name"] = json!(name);
                message["document"] = document;
            }
            None => {
                let mut photo = media;
                photo["width"] = json!(800);
                photo["height"] = json!(600);
                message["photo"] = json!([photo]);
            }
        }
        (self.inject_update(json!({ "message": message })), file_id)
    }

    /// A new message from the user `chat_id` in their private chat with the
    /// bot, or for a negative `chat_id` from user 1000 in that group; the
    /// caller adds its content. `from` names another sender.
    fn user_message(&mut self, chat_id: i64, from: Option<i64>) -> Value {
        let (chat, mut sender) = if chat_id > 0 {
            let user = self
                .users
                .get(&chat_id)
                .cloned()
                .unwrap_or_else(|| synthetic_user(chat_id));
            let chat = self
                .chats
                .get(&chat_id)
                .cloned()
                .unwrap_or_else(|| private_chat_of(&user));
            (chat, user)
        } else {
            let chat = self
                .chats
                .get(&chat_id)
                .cloned()
                .unwrap_or_else(|| synthetic_group(chat_id));
            let user = self
                .users
                .get(&DEFAULT_GROUP_SENDER)
                .cloned()
                .unwrap_or_else(|| synthetic_user(DEFAULT_GROUP_SENDER));
            (chat, user)
        };
        if let Some(id) = from {
            sender = self
                .users
                .get(&id)
                .cloned()
                .unwrap_or_else(|| synthetic_user(id));
        }
        json!({
            "message_id": self.alloc_message_id(chat_id),
            "from": sender,
            "chat": chat,
            "date": unix_now(),
        })
    }

    fn assign_update_id(&mut self, update: &mut Value) -> i64 {
        if let Some(id) = update.get("update_id").and_then(Value::as_i64) {
            self.next_update_id = self.next_update_id.max(id + 1);
            return id;
        }
        let id = self.take_update_id();
        if let Value::Object(object) = update {
            object.insert("update_id".into(), id.into());
        }
        id
    }

    fn take_update_id(&mut self) -> i64 {
        let id = self.next_update_id;
        self.next_update_id += 1;
        id
    }

    /// Drops the updates the bot confirmed with `offset`, as getUpdates
    /// does: a positive offset confirms every update below it; a negative
    /// one keeps only the last `-offset` updates.
    pub fn confirm(&mut self, offset: i64) {
        if offset > 0 {
            self.updates.retain(|u| u.id >= offset);
            self.confirmed_offset = self.confirmed_offset.max(offset);
        } else if offset < 0 {
            let keep = usize::try_from(offset.unsigned_abs()).unwrap_or(usize::MAX);
            while self.updates.len() > keep {
                if let Some(dropped) = self.updates.pop_front() {
                    self.confirmed_offset = self.confirmed_offset.max(dropped.id + 1);
                }
            }
        }
    }

    /// The first `limit` unconfirmed updates; they stay queued until confirmed.
    ///
    /// Updates of types outside `allowed_updates` are dropped first. Telegram
    /// does not create them at all; since a test injects updates whenever it
    /// likes, often before the bot's first getUpdates told which types it
    /// wants, the sandbox applies the bot's choice at delivery instead, as if
    /// the bot had been asking for those types all along.
    pub fn batch(&mut self, limit: usize) -> Vec<Value> {
        self.drop_unwanted_updates();
        self.updates
            .iter()
            .take(limit)
            .map(|u| u.body.clone())
            .collect()
    }

    /// Drops the queued updates of types outside `allowed_updates` (see
    /// [`State::batch`]); a webhook delivers by the same rule.
    pub fn drop_unwanted_updates(&mut self) {
        let allowed = &self.allowed_updates;
        self.updates
            .retain(|u| u.kind.as_ref().is_none_or(|kind| allowed.contains(kind)));
    }

    /// Applies getUpdates' `allowed_updates`: a list of update types, where
    /// an empty list (or one naming no known type) means the default set.
    pub fn set_allowed_updates(&mut self, value: &Value) {
        let Some(list) = value.as_array() else { return };
        let known: HashSet<String> = list
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_ascii_lowercase)
            .filter(|kind| schema().is_update_type(kind))
            .collect();
        self.allowed_updates = if known.is_empty() {
            default_allowed_updates()
        } else {
            known
        };
    }

    // ----- chats, users, messages ---------------------------------------

    pub fn register_chat(&mut self, chat: &Value) {
        self.learn(chat);
    }

    /// Makes a user known, so that messages from them carry this User
    /// object (name, username) instead of a made-up one.
    pub fn register_user(&mut self, user: &Value) {
        if let Some(id) = user["id"].as_i64() {
            let mut user = user.clone();
            if let Value::Object(object) = &mut user {
                object.entry("is_bot").or_insert(false.into());
                object
                    .entry("first_name")
                    .or_insert(format!("User {id}").into());
            }
            self.users.insert(id, user);
        }
    }

    /// A basic group titled `title` whose members are the bot and `members`:
    /// getChatMember answers "left" for anyone else, and
    /// getChatMemberCount counts them.
    pub fn create_group(&mut self, id: i64, title: &str, members: &[i64]) -> Value {
        let chat = json!({"id": id, "type": "group", "title": title});
        self.chats.insert(id, chat.clone());
        self.members.insert(id, members.to_vec());
        chat
    }

    /// The users of a group made by [`State::create_group`]; None for any
    /// other chat, whose membership the sandbox does not track.
    pub fn members(&self, chat_id: i64) -> Option<&[i64]> {
        self.members.get(&chat_id).map(Vec::as_slice)
    }

    /// Learns every chat and user object found anywhere in `value`.
    fn learn(&mut self, value: &Value) {
        match value {
            Value::Object(object) => {
                if let Some(id) = chat_id_of(object) {
                    self.chats.insert(id, value.clone());
                } else if let Some(id) = user_id_of(object) {
                    self.users.insert(id, value.clone());
                }
                object.values().for_each(|v| self.learn(v));
            }
            Value::Array(items) => items.iter().for_each(|v| self.learn(v)),
            _ => {}
        }
    }

    fn remember_messages(&mut self, update: &Value) {
        for kind in MESSAGE_UPDATE_TYPES {
            if let Some(message) = update.get(kind) {
                self.store_message(message.clone());
            }
        }
    }

    /// Remembers a message so it can be replied to, edited, forwarded…
    pub fn store_message(&mut self, message: Value) {
        let (Some(chat_id), Some(message_id)) = (
            message["chat"]["id"].as_i64(),
            message["message_id"].as_i64(),
        ) else {
            return;
        };
        let last = self.last_message_id.entry(chat_id).or_default();
        *last = (*last).max(message_id);
        self.messages.insert((chat_id, message_id), message);
    }

    /// The next message id in a chat: ids increase per chat.
    pub fn alloc_message_id(&mut self, chat_id: i64) -> i64 {
        let last = self.last_message_id.entry(chat_id).or_default();
        *last += 1;
        *last
    }

    /// A known chat whose username is `username` (without the `@`).
    pub fn chat_by_username(&self, username: &str) -> Option<&Value> {
        self.chats.values().find(|chat| {
            chat["username"]
                .as_str()
                .is_some_and(|u| u.eq_ignore_ascii_case(username))
        })
    }

    pub fn migrate_chat(&mut self, from: i64, to: i64) {
        self.migrations.insert(from, to);
        let title = self
            .chats
            .get(&from)
            .and_then(|c| c["title"].as_str())
            .map(str::to_string);
        let title = title.unwrap_or_else(|| format!("Group {}", from.unsigned_abs()));
        self.chats
            .entry(to)
            .or_insert_with(|| json!({"id": to, "type": "supergroup", "title": title}));
    }

    // ----- files -----------------------------------------------------------

    /// Stores content under a fresh file_id; `folder` is Telegram's path
    /// prefix ("photos", "documents", …).
    pub fn store_file(
        &mut self,
        bytes: Option<Bytes>,
        size: usize,
        folder: &str,
        file_name: Option<&str>,
    ) -> &StoredFile {
        let n = self.next_serial();
        let extension = file_name
            .and_then(|name| name.rsplit_once('.'))
            .map(|(_, ext)| format!(".{ext}"));
        let file = StoredFile {
            file_id: format!("SBX{n:08}file"),
            unique_id: format!("SBX{n:08}"),
            path: format!("{folder}/file_{n}{}", extension.unwrap_or_default()),
            size,
            bytes,
        };
        let id = file.file_id.clone();
        self.files.entry(id).or_insert(file)
    }

    pub fn add_file(&mut self, bytes: Bytes, file_name: &str) -> String {
        let size = bytes.len();
        self.store_file(Some(bytes), size, "documents", Some(file_name))
            .file_id
            .clone()
    }

    /// The file behind a file_id a message is sent with. Unknown ids are
    /// accepted and get an entry without content: tests inject updates with
    /// made-up file ids, and the bot may send them on.
    pub fn file(&mut self, file_id: &str) -> &StoredFile {
        if !self.files.contains_key(file_id) {
            let n = self.next_serial();
            let file = StoredFile {
                file_id: file_id.to_string(),
                unique_id: format!("SBX{n:08}"),
                path: format!("documents/file_{n}"),
                size: 0,
                bytes: None,
            };
            self.files.insert(file_id.to_string(), file);
        }
        &self.files[file_id]
    }

    /// The file behind a file_id the sandbox issued or was sent, for
    /// getFile: unlike [`State::file`], an unknown id is not made up.
    pub fn known_file(&self, file_id: &str) -> Option<&StoredFile> {
        self.files.get(file_id)
    }

    /// Makes getFile (and later messages) report `size` as the file's size,
    /// whatever its content: to try a bot on a file too large to move.
    /// Returns whether the file is known.
    pub fn fake_file_size(&mut self, file_id: &str, size: usize) -> bool {
        self.files
            .get_mut(file_id)
            .map(|file| file.size = size)
            .is_some()
    }

    pub fn file_by_path(&self, path: &str) -> Option<&StoredFile> {
        self.files.values().find(|f| f.path == path)
    }

    // ----- recording and control ---------------------------------------

    /// Records a call (not getUpdates): counts it and tells subscribers
    /// about it if it succeeded.
    pub fn record(&mut self, call: RecordedCall) {
        *self
            .stats
            .calls_by_method
            .entry(call.method.clone())
            .or_default() += 1;
        self.count_status(call.status);
        if call.fault.is_some() {
            self.stats.faults_injected += 1;
        }
        if call.ok() {
            // A closed receiver just means the subscriber lost interest.
            self.subscribers.retain(|s| s.send(call.clone()).is_ok());
        }
        self.tell(|| SandboxEvent::Call(call.clone()));
        self.calls.push(call);
    }

    /// Numbers an event and hands it to the watchers; `event` is only
    /// built when someone watches.
    fn tell(&mut self, event: impl FnOnce() -> SandboxEvent) {
        self.events += 1;
        if self.watchers.is_empty() {
            return;
        }
        let watched = Watched {
            seq: self.events,
            event: event(),
        };
        self.watchers.retain(|w| w.send(watched.clone()).is_ok());
    }

    pub fn watch(&mut self) -> mpsc::Receiver<Watched> {
        let (sender, receiver) = mpsc::channel();
        self.watchers.push(sender);
        receiver
    }

    pub fn count_status(&mut self, status: u16) {
        match status {
            401 => self.stats.unauthorized += 1,
            409 => self.stats.conflicts += 1,
            429 => self.stats.too_many_requests += 1,
            _ => {}
        }
    }

    pub fn subscribe(&mut self) -> mpsc::Receiver<RecordedCall> {
        let (sender, receiver) = mpsc::channel();
        self.subscribers.push(sender);
        receiver
    }

    pub fn set_rate_limits(&mut self, on: bool) {
        self.flood = on.then(FloodControl::default);
    }

    pub fn set_faults(&mut self, plan: FaultPlan) {
        self.faults.set_plan(plan);
    }
}

pub(crate) fn unix_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or_default()
}

/// The update's type: its first key that names an Update field.
pub(crate) fn update_type(update: &Value) -> Option<&str> {
    update
        .as_object()?
        .keys()
        .map(String::as_str)
        .find(|key| schema().is_update_type(key))
}

fn default_allowed_updates() -> HashSet<String> {
    schema()
        .update_types
        .iter()
        .filter(|kind| !OPT_IN_UPDATE_TYPES.contains(&kind.as_str()))
        .cloned()
        .collect()
}

/// Fills what getMe always has; a bot's id is the number its token starts with.
fn complete_bot(bot: Value, token: &str) -> Value {
    let mut bot = match bot {
        Value::Object(object) => object,
        _ => Map::new(),
    };
    let token_id = token
        .split(':')
        .next()
        .and_then(|id| id.parse::<i64>().ok())
        .unwrap_or(1);
    bot.entry("id").or_insert(token_id.into());
    bot.entry("is_bot").or_insert(true.into());
    bot.entry("first_name").or_insert("Sandbox Bot".into());
    bot.entry("username").or_insert("sandbox_bot".into());
    for flag in [
        "can_join_groups",
        "can_read_all_group_messages",
        "supports_inline_queries",
        "can_connect_to_business",
        "has_main_web_app",
    ] {
        bot.entry(flag)
            .or_insert((flag == "can_join_groups").into());
    }
    Value::Object(bot)
}

fn chat_id_of(object: &Map<String, Value>) -> Option<i64> {
    let kind = object.get("type")?.as_str()?;
    matches!(kind, "private" | "group" | "supergroup" | "channel").then_some(())?;
    object.get("id")?.as_i64()
}

fn user_id_of(object: &Map<String, Value>) -> Option<i64> {
    object.get("is_bot")?.as_bool()?;
    object.get("first_name")?.as_str()?;
    object.get("id")?.as_i64()
}

pub(crate) fn synthetic_user(id: i64) -> Value {
    json!({"id": id, "is_bot": false, "first_name": format!("User {id}")})
}

fn private_chat_of(user: &Value) -> Value {
    let mut chat = json!({"id": user["id"], "type": "private"});
    for key in ["first_name", "last_name", "username"] {
        if let Some(value) = user.get(key) {
            chat[key] = value.clone();
        }
    }
    chat
}

/// Supergroup and channel ids are below -10^12 ("-100…"); others are groups.
fn synthetic_group(id: i64) -> Value {
    let kind = if id <= -1_000_000_000_000 {
        "supergroup"
    } else {
        "group"
    };
    json!({"id": id, "type": kind, "title": format!("Group {}", id.unsigned_abs())})
}

/// Length, in UTF-16 units as Telegram counts, of a leading `/command`.
fn command_length(text: &str) -> Option<usize> {
    let command = text
        .split_whitespace()
        .next()
        .filter(|word| word.starts_with('/') && word.len() > 1)?;
    text.starts_with('/')
        .then(|| command.encode_utf16().count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state() -> State {
        State::new(SandboxOptions {
            first_update_id: 10,
            ..SandboxOptions::default()
        })
    }

    #[test]
    fn confirm_positive_and_negative_offsets() {
        let mut s = state();
        for i in 0..5 {
            assert_eq!(s.inject_text(7, &format!("m{i}")), 10 + i);
        }
        s.confirm(12);
        assert_eq!(s.updates.front().map(|u| u.id), Some(12));
        assert_eq!(s.confirmed_offset, 12);
        s.confirm(-1);
        assert_eq!(s.updates.len(), 1);
        assert_eq!(s.updates[0].id, 14);
        assert_eq!(s.confirmed_offset, 14);
    }

    #[test]
    fn learns_chats_and_users() {
        let mut s = state();
        s.inject_text(-42, "hello");
        assert_eq!(s.chats[&-42]["type"], "group");
        assert!(s.users.contains_key(&DEFAULT_GROUP_SENDER));
        assert_eq!(s.alloc_message_id(-42), 2);
    }

    #[test]
    fn opt_in_update_types_are_dropped_by_default() {
        let mut s = state();
        s.inject_update(json!({"message_reaction": {"chat": {"id": 1, "type": "private"}}}));
        s.inject_update(json!({"message": {}}));
        assert_eq!(s.batch(10).len(), 1);
        assert_eq!(s.updates.len(), 1, "dropped for good");

        s.inject_update(json!({"message_reaction": {}}));
        s.set_allowed_updates(&json!(["message_reaction"]));
        let batch = s.batch(10);
        assert_eq!(batch.len(), 1);
        assert!(batch[0].get("message_reaction").is_some());
    }

    #[test]
    fn commands_get_an_entity() {
        assert_eq!(command_length("/start now"), Some(6));
        assert_eq!(command_length("hi /start"), None);
        assert_eq!(command_length("/"), None);
    }

    #[test]
    fn bot_is_completed_from_the_token() {
        let bot = complete_bot(json!({"first_name": "X"}), "777:abc");
        assert_eq!(bot["id"], 777);
        assert_eq!(bot["first_name"], "X");
        assert_eq!(bot["is_bot"], true);
    }
}
