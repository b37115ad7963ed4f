//! Executing a call: Telegram's checks in Telegram's order, then each
//! method's result. getUpdates lives in `polling`.

use std::time::Instant;

use serde_json::{json, Map, Value};

use super::envelope::{ApiError, Outcome, Success};
use super::fabricate::{overlay, Fabricator};
use super::messages;
use super::params::{self, Input};
use super::schema::{schema, Method};
use super::state::{synthetic_user, unix_now, State, UploadedFile, Webhook};

/// A method request to the emulator, matched to its method, with parameters
/// read as Telegram reads them.
pub(crate) struct Request {
    pub method: &'static Method,
    pub params: Map<String, Value>,
    pub files: Vec<UploadedFile>,
}

impl Request {
    pub fn new(method: &'static Method, input: Input) -> Self {
        let mut params = input.params;
        params::normalize(method, &mut params);
        Request {
            method,
            params,
            files: input.files,
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.method.name
    }

    /// A parameter Telegram considers given (not null, not empty).
    pub(super) fn get(&self, name: &str) -> Option<&Value> {
        self.params
            .get(name)
            .filter(|_| params::is_present(&self.params, &[], name))
    }

    pub(super) fn int(&self, name: &str) -> Option<i64> {
        self.get(name)?.as_i64()
    }

    pub(super) fn str(&self, name: &str) -> Option<&str> {
        self.get(name)?.as_str()
    }

    pub(super) fn flag(&self, name: &str) -> bool {
        self.get(name).and_then(Value::as_bool).unwrap_or(false)
    }

    /// A parameter as text; Telegram reads every parameter as a string, so
    /// a number sent in JSON is its decimal text.
    pub(super) fn text(&self, name: &str) -> Option<String> {
        match self.get(name)? {
            Value::String(s) => Some(s.clone()),
            other => Some(other.to_string()),
        }
    }
}

/// The checks that come before any parameter is looked at, in Telegram's
/// order: the token, then the method name.
pub(crate) fn route(state: &State, token: &str, method: &str) -> Result<&'static Method, ApiError> {
    if token != state.token {
        // api.telegram.org answers 404 to tokens that cannot be tokens.
        return Err(if is_well_formed(token) {
            ApiError::unauthorized()
        } else {
            ApiError::not_found()
        });
    }
    if state.token_rejected {
        return Err(ApiError::unauthorized());
    }
    schema().method(method).ok_or_else(ApiError::not_found)
}

fn is_well_formed(token: &str) -> bool {
    match token.split_once(':') {
        Some((id, secret)) => {
            !id.is_empty() && id.bytes().all(|b| b.is_ascii_digit()) && !secret.is_empty()
        }
        None => false,
    }
}

/// Runs a call (not getUpdates) against the state.
pub(crate) fn execute(state: &mut State, call: &Request, now: Instant) -> Outcome {
    check_required(call)?;
    let sends = sends_message(call.method);
    let chat = match call.get("chat_id") {
        Some(chat_id) => Some(resolve_chat(state, chat_id, sends)?),
        None => None,
    };
    if sends {
        if let (Some(flood), Some(chat_id)) = (
            state.flood.as_mut(),
            chat.as_ref().and_then(|c| c["id"].as_i64()),
        ) {
            flood
                .admit(chat_id, now)
                .map_err(ApiError::too_many_requests)?;
        }
    }
    dispatch(state, call, chat)
}

/// The send*/copy*/forward* methods that post messages, which are the ones
/// Telegram's flood limits apply to.
fn sends_message(method: &Method) -> bool {
    let name = method.name.as_str();
    (name.starts_with("send") || name.starts_with("copy") || name.starts_with("forward"))
        && method.returns.contains("Message")
}

fn check_required(call: &Request) -> Result<(), ApiError> {
    for param in call.method.params.iter().filter(|p| p.required) {
        // setWebhook with an empty url removes the webhook, as on Telegram.
        let optional_in_practice = call.name() == "setWebhook" && param.name == "url";
        if !optional_in_practice && !params::is_present(&call.params, &call.files, &param.name) {
            return Err(missing(call.name(), &param.name));
        }
    }
    Ok(())
}

fn missing(method: &str, param: &str) -> ApiError {
    match param {
        "chat_id" => ApiError::bad_request("chat_id is empty"),
        "text" if method == "sendMessage" || method == "editMessageText" => {
            ApiError::bad_request("message text is empty")
        }
        _ => ApiError::bad_request(format!("parameter \"{param}\" is required")),
    }
}

/// Finds the chat a `chat_id` parameter names. `for_sending`: writing
/// first to a user who never talked to the bot is forbidden.
pub(super) fn resolve_chat(
    state: &State,
    chat_id: &Value,
    for_sending: bool,
) -> Result<Value, ApiError> {
    let not_found = || ApiError::bad_request("chat not found");
    if let Some(username) = chat_id.as_str().and_then(|s| s.strip_prefix('@')) {
        return state
            .chat_by_username(username)
            .cloned()
            .ok_or_else(not_found);
    }
    let id = chat_id.as_i64().ok_or_else(not_found)?;
    if let Some(&to) = state.migrations.get(&id) {
        return Err(ApiError::migrated(to));
    }
    if let Some(chat) = state.chats.get(&id) {
        return Ok(chat.clone());
    }
    match state.users.get(&id) {
        Some(_) if for_sending => Err(ApiError::forbidden(
            "bot can't initiate conversation with a user",
        )),
        Some(user) => Ok(json!({"id": id, "type": "private", "first_name": user["first_name"]})),
        None => Err(not_found()),
    }
}

fn dispatch(state: &mut State, call: &Request, chat: Option<Value>) -> Outcome {
    let name = call.name();
    match name {
        "getMe" => Ok(state.bot.clone().into()),
        "setWebhook" => set_webhook(state, call),
        "deleteWebhook" => Ok(delete_webhook(state, call)),
        "getWebhookInfo" => Ok(webhook_info(state).into()),
        "sendMessage" => messages::send_message(state, call, &require(chat)?),
        "sendMediaGroup" => messages::send_media_group(state, call, &require(chat)?),
        "forwardMessage" | "copyMessage" => messages::forward_or_copy(state, call, &require(chat)?),
        "forwardMessages" | "copyMessages" => {
            messages::forward_or_copy_many(state, call, &require(chat)?)
        }
        "editMessageText"
        | "editMessageCaption"
        | "editMessageReplyMarkup"
        | "editMessageMedia"
        | "editMessageLiveLocation"
        | "stopMessageLiveLocation"
        | "editMessageChecklist" => messages::edit_message(state, call, chat.as_ref()),
        "deleteMessage" => messages::delete_message(state, call, &require(chat)?),
        "deleteMessages" => Ok(messages::delete_messages(state, call, &require(chat)?)),
        "getChat" => Ok(get_chat(state, &require(chat)?).into()),
        "getChatMember" => Ok(get_chat_member(state, call, &require(chat)?).into()),
        "getChatAdministrators" => get_chat_administrators(state, &require(chat)?),
        "getChatMemberCount" => Ok(get_chat_member_count(state, &require(chat)?).into()),
        "getFile" => get_file(state, call),
        _ if name.starts_with("send") && call.method.returns == "Message" => {
            messages::send_content(state, call, &require(chat)?)
        }
        _ => generic(state, call, chat.as_ref()),
    }
}

/// Methods that need a chat have a required `chat_id`, already checked.
fn require(chat: Option<Value>) -> Result<Value, ApiError> {
    chat.ok_or_else(|| ApiError::bad_request("chat_id is empty"))
}

// ----- webhooks ---------------------------------------------------------

fn set_webhook(state: &mut State, call: &Request) -> Outcome {
    let url = call.str("url").unwrap_or_default();
    if url.is_empty() {
        return Ok(delete_webhook(state, call));
    }
    // Telegram takes https:// only; the sandbox delivers over plain HTTP
    // too, as a local Bot API server does.
    if !(url.starts_with("https://") || url.starts_with("http://")) {
        return Err(ApiError::bad_request(
            "bad webhook: An HTTPS URL must be provided for webhook",
        ));
    }
    let secret_token = call.text("secret_token");
    if secret_token.as_ref().is_some_and(|s| {
        s.len() > 256
            || !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    }) {
        return Err(ApiError::bad_request(
            "bad webhook: secret token contains unallowed characters",
        ));
    }
    if call.flag("drop_pending_updates") {
        state.updates.clear();
    }
    if let Some(allowed) = call.get("allowed_updates") {
        state.set_allowed_updates(allowed);
    }
    let unchanged = state.webhook.as_ref().is_some_and(|w| w.url == url);
    state.webhook = Some(Webhook {
        url: url.to_string(),
        max_connections: call.int("max_connections").unwrap_or(40),
        allowed_updates: call.get("allowed_updates").cloned(),
        secret_token,
    });
    // A parked getUpdates request is terminated by the webhook.
    state.poll_generation += 1;
    let description = if unchanged {
        "Webhook is already set"
    } else {
        "Webhook was set"
    };
    Ok(Success {
        result: Value::Bool(true),
        description: Some(description),
    })
}

fn delete_webhook(state: &mut State, call: &Request) -> Success {
    if call.flag("drop_pending_updates") {
        state.updates.clear();
    }
    let description = if state.webhook.take().is_some() {
        "Webhook was deleted"
    } else {
        "Webhook is already deleted"
    };
    Success {
        result: Value::Bool(true),
        description: Some(description),
    }
}

fn webhook_info(state: &State) -> Value {
    let mut info = json!({"url": "", "has_custom_certificate": false, "pending_update_count": state.updates.len()});
    if let Some(webhook) = &state.webhook {
        info["url"] = webhook.url.clone().into();
        info["max_connections"] = webhook.max_connections.into();
        info["ip_address"] = "127.0.0.1".into();
        if let Some(allowed) = &webhook.allowed_updates {
            info["allowed_updates"] = allowed.clone();
        }
        if let Some((date, message)) = &state.deliveries.last_error {
            info["last_error_date"] = (*date).into();
            info["last_error_message"] = message.clone().into();
        }
    }
    info
}

// ----- chats, members, files ---------------------------------------------------

fn get_chat(state: &mut State, chat: &Value) -> Value {
    let mut info = fabricate(state, "ChatFullInfo", Some(chat), "chat");
    if let (Value::Object(info), Value::Object(chat)) = (&mut info, chat) {
        info.extend(chat.clone());
        info.insert("accent_color_id".into(), 0.into());
        info.insert("max_reaction_count".into(), 11.into());
    }
    info
}

fn get_chat_member(state: &mut State, call: &Request, chat: &Value) -> Value {
    let user_id = call.int("user_id").unwrap_or_default();
    if user_id == state.bot_id() && chat["type"] != "private" {
        return bot_administrator(state, chat);
    }
    let user = state
        .users
        .get(&user_id)
        .cloned()
        .unwrap_or_else(|| synthetic_user(user_id));
    let chat_id = chat["id"].as_i64().unwrap_or_default();
    let status = match state.members(chat_id) {
        Some(members) if !members.contains(&user_id) => "left",
        _ => "member",
    };
    json!({"status": status, "user": user})
}

/// The bot and the members of a group the sandbox made; 2 (the bot and
/// one user) where it does not track membership.
fn get_chat_member_count(state: &State, chat: &Value) -> Value {
    let chat_id = chat["id"].as_i64().unwrap_or_default();
    match state.members(chat_id) {
        Some(members) => json!(members.len() + 1),
        None => json!(2),
    }
}

fn get_chat_administrators(state: &mut State, chat: &Value) -> Outcome {
    if chat["type"] == "private" {
        return Err(ApiError::bad_request(
            "there are no administrators in the private chat",
        ));
    }
    Ok(json!([bot_administrator(state, chat)]).into())
}

fn bot_administrator(state: &mut State, chat: &Value) -> Value {
    let mut member = fabricate(state, "ChatMemberAdministrator", Some(chat), "member");
    member["user"] = state.bot_sender();
    member
}

/// Telegram knows the files it issued; any other id is refused as Telegram
/// words it.
fn get_file(state: &mut State, call: &Request) -> Outcome {
    let file_id = call.text("file_id").unwrap_or_default();
    match state.known_file(&file_id) {
        Some(file) => Ok(file.to_json().into()),
        None => Err(ApiError::bad_request("invalid file_id")),
    }
}

// ----- everything else -------------------------------------------------------

/// A plausible result of the method's documented return type, reflecting
/// the parameters that name fields of that type.
fn generic(state: &mut State, call: &Request, chat: Option<&Value>) -> Outcome {
    let returns = call.method.returns.as_str();
    if returns == "Message or True" {
        // setGameScore and the like: True for inline messages, else the message.
        if call.get("inline_message_id").is_some() {
            return Ok(Value::Bool(true).into());
        }
        let key = (
            chat.and_then(|c| c["id"].as_i64()).unwrap_or_default(),
            call.int("message_id").unwrap_or_default(),
        );
        return state
            .messages
            .get(&key)
            .cloned()
            .map(Success::from)
            .ok_or_else(|| ApiError::bad_request("message not found"));
    }
    // The method name hints at string results: exportChatInviteLink → a link.
    let hint = call.name().to_ascii_lowercase();
    let mut result = fabricate(state, returns, chat, &hint);
    let element = returns.split(" or ").next().unwrap_or(returns);
    overlay(&mut result, element, &call.params);
    Ok(result.into())
}

pub(super) fn fabricate(state: &mut State, ty: &str, chat: Option<&Value>, field: &str) -> Value {
    let bot = state.bot_sender();
    let mut fabricator = Fabricator {
        bot: &bot,
        chat,
        now: unix_now(),
        serial: &mut state.serial,
    };
    fabricator.value(ty, field)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_shapes() {
        assert!(is_well_formed("123:abc"));
        assert!(!is_well_formed("abc"));
        assert!(!is_well_formed("12a:abc"));
        assert!(!is_well_formed("123:"));
    }

    #[test]
    fn flood_limited_methods() {
        let counted = |name: &str| sends_message(schema().method(name).unwrap());
        assert!(
            counted("sendMessage")
                && counted("copyMessage")
                && counted("forwardMessages")
                && counted("sendMediaGroup")
        );
        assert!(!counted("sendChatAction") && !counted("sendMessageDraft") && !counted("getMe"));
    }
}
