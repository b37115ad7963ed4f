//! Methods that post, forward, copy, edit and delete messages. Messages
//! are remembered in the state so that later calls can refer to them, with
//! Telegram's errors when they cannot.

use serde_json::{json, Map, Value};

use super::envelope::{ApiError, Outcome, Success};
use super::fabricate::overlay;
use super::formatting;
use super::methods::{fabricate, resolve_chat, Request};
use super::schema::schema;
use super::state::{unix_now, State, UploadedFile};

/// Telegram's limit on message text, in UTF-16 units.
const MAX_TEXT_LENGTH: usize = 4096;

/// Message keys that describe who/where/when rather than content: they are
/// not carried over when a message is forwarded or copied.
const ENVELOPE_KEYS: [&str; 14] = [
    "message_id",
    "from",
    "sender_chat",
    "chat",
    "date",
    "edit_date",
    "reply_to_message",
    "message_thread_id",
    "is_topic_message",
    "reply_markup",
    "forward_origin",
    "has_protected_content",
    "media_group_id",
    "author_signature",
];

/// Message keys holding media, replaced as a whole by editMessageMedia.
const MEDIA_KEYS: [&str; 6] = [
    "animation",
    "audio",
    "document",
    "live_photo",
    "photo",
    "video",
];

// ----- sending ------------------------------------------------------------

pub(super) fn send_message(state: &mut State, call: &Request, chat: &Value) -> Outcome {
    let text = call.text("text").unwrap_or_default();
    let (text, entities) = formatted(state, text, call.get("parse_mode"), call.get("entities"))?;
    if text.encode_utf16().count() > MAX_TEXT_LENGTH {
        return Err(ApiError::bad_request("message is too long"));
    }
    let mut message = new_message(state, chat, call)?;
    message.insert("text".into(), text.into());
    if let Some(entities) = entities {
        message.insert("entities".into(), entities);
    }
    Ok(finish_message(state, message).into())
}

/// Text and entities as Telegram stores them: `entities` as given, else
/// what `parse_mode` makes of the markup (None: no entities).
fn formatted(
    state: &State,
    text: String,
    parse_mode: Option<&Value>,
    entities: Option<&Value>,
) -> Result<(String, Option<Value>), ApiError> {
    if let Some(entities) = entities.filter(|e| e.is_array()) {
        return Ok((text, Some(entities.clone())));
    }
    let Some(mode) = parse_mode.and_then(Value::as_str).filter(|m| !m.is_empty()) else {
        return Ok((text, None));
    };
    let parsed = formatting::parse(&text, mode, &state.users).map_err(ApiError::bad_request)?;
    let entities = (!parsed.entities.is_empty()).then_some(Value::Array(parsed.entities));
    Ok((parsed.text, entities))
}

/// sendPhoto, sendLocation, sendPoll…: the content goes in the Message field
/// named after the method (`sendVideoNote` → `video_note`).
pub(super) fn send_content(state: &mut State, call: &Request, chat: &Value) -> Outcome {
    let mut message = new_message(state, chat, call)?;
    let field = content_field(call.name());
    if let Some(ty) = message_field_type(&field) {
        let upload = find_upload(call.params.get(&field), &field, &call.files);
        let content = build_content(state, &field, &ty, &call.params, upload, chat);
        message.insert(field, content);
    }
    copy_caption(state, &call.params, &mut message)?;
    Ok(finish_message(state, message).into())
}

pub(super) fn send_media_group(state: &mut State, call: &Request, chat: &Value) -> Outcome {
    let Some(Value::Array(media)) = call.get("media") else {
        return Err(ApiError::bad_request("can't parse media JSON object"));
    };
    let group_id = state.next_serial().to_string();
    let mut messages = Vec::with_capacity(media.len());
    for item in media {
        let Some(item) = item.as_object() else {
            return Err(ApiError::bad_request(
                "can't parse InputMedia: object expected",
            ));
        };
        let kind = item
            .get("type")
            .and_then(Value::as_str)
            .unwrap_or("document");
        let mut message = new_message(state, chat, call)?;
        message.insert("media_group_id".into(), group_id.clone().into());
        if let Some(ty) = message_field_type(kind) {
            let upload = find_upload(item.get("media"), kind, &call.files);
            let content = build_content(state, kind, &ty, item, upload, chat);
            message.insert(kind.to_string(), content);
        }
        copy_caption(state, item, &mut message)?;
        messages.push(finish_message(state, message));
    }
    Ok(Value::Array(messages).into())
}

/// The parts every message the bot sends has, plus what the call asked for
/// about replies, threads, protection and inline keyboards.
fn new_message(
    state: &mut State,
    chat: &Value,
    call: &Request,
) -> Result<Map<String, Value>, ApiError> {
    let chat_id = chat["id"].as_i64().unwrap_or_default();
    let reply = reply_target(state, chat_id, call)?;
    let mut message = Map::new();
    message.insert("message_id".into(), state.alloc_message_id(chat_id).into());
    // Channel posts are signed by the channel, not by the bot.
    if chat["type"] == "channel" {
        message.insert("sender_chat".into(), chat.clone());
    } else {
        message.insert("from".into(), state.bot_sender());
    }
    message.insert("chat".into(), chat.clone());
    message.insert("date".into(), unix_now().into());
    if let Some(thread) = call.int("message_thread_id") {
        message.insert("message_thread_id".into(), thread.into());
        message.insert("is_topic_message".into(), true.into());
    }
    if let Some(reply) = reply {
        message.insert("reply_to_message".into(), reply);
    }
    if call.flag("protect_content") {
        message.insert("has_protected_content".into(), true.into());
    }
    if let Some(effect) = call.str("effect_id") {
        message.insert("effect_id".into(), effect.into());
    }
    if let Some(markup) = inline_keyboard(call.get("reply_markup")) {
        message.insert("reply_markup".into(), markup);
    }
    Ok(message)
}

/// Messages only show inline keyboards; reply keyboards go to the client.
fn inline_keyboard(markup: Option<&Value>) -> Option<Value> {
    markup
        .filter(|m| m.get("inline_keyboard").is_some())
        .cloned()
}

/// The message being replied to, from `reply_parameters` or the older
/// `reply_to_message_id`.
fn reply_target(state: &State, chat_id: i64, call: &Request) -> Result<Option<Value>, ApiError> {
    let (reply_chat, message_id, allow_missing) = match call.get("reply_parameters") {
        Some(Value::Object(p)) => (
            p.get("chat_id").and_then(Value::as_i64).unwrap_or(chat_id),
            p.get("message_id").and_then(Value::as_i64),
            p.get("allow_sending_without_reply")
                .and_then(Value::as_bool)
                .unwrap_or(false),
        ),
        _ => (
            chat_id,
            call.int("reply_to_message_id"),
            call.flag("allow_sending_without_reply"),
        ),
    };
    let Some(message_id) = message_id else {
        return Ok(None);
    };
    match state.messages.get(&(reply_chat, message_id)) {
        Some(original) => {
            // Telegram nests replies one level deep only.
            let mut original = original.clone();
            if let Value::Object(o) = &mut original {
                o.remove("reply_to_message");
            }
            Ok(Some(original))
        }
        None if allow_missing => Ok(None),
        None => Err(ApiError::bad_request("message to be replied not found")),
    }
}

fn finish_message(state: &mut State, message: Map<String, Value>) -> Value {
    let message = Value::Object(message);
    state.store_message(message.clone());
    message
}

/// The caption of a message being sent, formatted by its `parse_mode`.
fn copy_caption(
    state: &State,
    source: &Map<String, Value>,
    message: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    set_caption(state, source, message)?;
    if let Some(value) = source
        .get("show_caption_above_media")
        .filter(|v| !v.is_null())
    {
        message.insert("show_caption_above_media".into(), value.clone());
    }
    if source.get("has_spoiler").and_then(Value::as_bool) == Some(true) {
        message.insert("has_media_spoiler".into(), true.into());
    }
    Ok(())
}

/// Sets (or, when `source` has none, removes) a message's caption and its
/// entities from `caption`, `parse_mode` and `caption_entities`.
fn set_caption(
    state: &State,
    source: &Map<String, Value>,
    message: &mut Map<String, Value>,
) -> Result<(), ApiError> {
    let caption = source
        .get("caption")
        .filter(|v| !v.is_null() && v.as_str() != Some(""))
        .map(|c| match c {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        });
    let Some(caption) = caption else {
        message.remove("caption");
        message.remove("caption_entities");
        return Ok(());
    };
    let (caption, entities) = formatted(
        state,
        caption,
        source.get("parse_mode"),
        source.get("caption_entities").filter(|v| !v.is_null()),
    )?;
    message.insert("caption".into(), caption.into());
    set_or_remove(message, "caption_entities", entities.as_ref());
    Ok(())
}

/// `sendVideoNote` → `video_note`.
fn content_field(method: &str) -> String {
    let mut field = String::new();
    for (i, c) in method.trim_start_matches("send").chars().enumerate() {
        if c.is_ascii_uppercase() && i > 0 {
            field.push('_');
        }
        field.push(c.to_ascii_lowercase());
    }
    field
}

fn message_field_type(field: &str) -> Option<String> {
    Some(schema().type_def("Message")?.field(field)?.ty.clone())
}

/// Where a media parameter's content comes from.
enum Upload<'a> {
    /// A multipart file part.
    Part(&'a UploadedFile),
    /// A file_id or URL.
    Reference(String),
}

/// A media value is a file part named like the parameter, an
/// `attach://<part>` reference, or a file_id/URL string.
fn find_upload<'a>(
    value: Option<&Value>,
    field: &str,
    files: &'a [UploadedFile],
) -> Option<Upload<'a>> {
    match value.and_then(Value::as_str) {
        Some(text) => match text.strip_prefix("attach://") {
            Some(part) => files.iter().find(|f| f.name == part).map(Upload::Part),
            None => Some(Upload::Reference(text.to_string())),
        },
        None => files.iter().find(|f| f.name == field).map(Upload::Part),
    }
}

/// The content object of a message (a Document, a Location, a Poll…) built
/// from the call's parameters (`source`) and upload.
fn build_content(
    state: &mut State,
    field: &str,
    ty: &str,
    source: &Map<String, Value>,
    upload: Option<Upload<'_>>,
    chat: &Value,
) -> Value {
    let (is_array, element) = match ty.strip_prefix("Array of ") {
        Some(element) => (true, element),
        None => (false, ty),
    };
    let mut content = fabricate(state, element, Some(chat), field);
    overlay(&mut content, element, source);
    if let Some(upload) = upload {
        attach_file(state, &mut content, element, field, upload);
    }
    adjust_content(state, field, &mut content, source);
    if is_array {
        Value::Array(vec![content])
    } else {
        content
    }
}

/// Gives a media object the identity and metadata of the file it carries.
fn attach_file(state: &mut State, content: &mut Value, ty: &str, field: &str, upload: Upload<'_>) {
    let Value::Object(object) = content else {
        return;
    };
    if !object.contains_key("file_id") {
        return;
    }
    let folder = format!("{field}s");
    let (file, name, mime) = match upload {
        Upload::Part(part) => {
            let stored = state.store_file(
                Some(part.bytes.clone()),
                part.size,
                &folder,
                part.file_name.as_deref(),
            );
            (
                stored.to_json(),
                part.file_name.clone(),
                part.content_type.clone(),
            )
        }
        // A URL makes Telegram download a new file; a file_id is reused.
        Upload::Reference(url) if url.contains("://") => (
            state.store_file(None, 0, &folder, None).to_json(),
            None,
            None,
        ),
        Upload::Reference(file_id) => (state.file(&file_id).to_json(), None, None),
    };
    object.insert("file_id".into(), file["file_id"].clone());
    object.insert("file_unique_id".into(), file["file_unique_id"].clone());
    let Some(def) = schema().type_def(ty) else {
        return;
    };
    if def.field("file_size").is_some() {
        object.insert("file_size".into(), file["file_size"].clone());
    }
    if let (Some(name), Some(_)) = (name, def.field("file_name")) {
        object.insert("file_name".into(), name.into());
    }
    if let (Some(mime), Some(_)) = (mime, def.field("mime_type")) {
        object.insert("mime_type".into(), mime.into());
    }
}

/// Content whose parameters do not map one-to-one onto its fields.
fn adjust_content(
    state: &mut State,
    field: &str,
    content: &mut Value,
    source: &Map<String, Value>,
) {
    // sendVenue takes the venue's coordinates as flat parameters.
    if let (Some(latitude), Some(longitude)) = (source.get("latitude"), source.get("longitude")) {
        if content.get("location").is_some() {
            content["location"] = json!({"latitude": latitude, "longitude": longitude});
        }
    }
    match field {
        "dice" => {
            let emoji = source
                .get("emoji")
                .and_then(Value::as_str)
                .unwrap_or("🎲")
                .to_string();
            let faces = match emoji.as_str() {
                "🏀" | "⚽" => 5,
                "🎰" => 64,
                _ => 6,
            };
            content["value"] = (1 + state.rng.u32(..faces)).into();
            content["emoji"] = emoji.into();
        }
        "poll" => {
            if let Some(Value::Array(options)) = source.get("options") {
                let options: Vec<Value> = options
                    .iter()
                    .enumerate()
                    .map(|(i, option)| {
                        let text = option
                            .get("text")
                            .or(Some(option))
                            .and_then(Value::as_str)
                            .unwrap_or_default();
                        json!({"persistent_id": i.to_string(), "text": text, "voter_count": 0})
                    })
                    .collect();
                content["options"] = options.into();
            }
            content["is_anonymous"] = source
                .get("is_anonymous")
                .and_then(Value::as_bool)
                .unwrap_or(true)
                .into();
            content["type"] = source
                .get("type")
                .and_then(Value::as_str)
                .unwrap_or("regular")
                .into();
        }
        _ => {}
    }
}

// ----- forwarding and copying ------------------------------------------------

pub(super) fn forward_or_copy(state: &mut State, call: &Request, chat: &Value) -> Outcome {
    let copy = call.name().starts_with("copy");
    let from_chat = source_chat(state, call)?;
    let message_id = call.int("message_id").unwrap_or_default();
    let Some(original) = state.messages.get(&(from_chat, message_id)).cloned() else {
        let what = if copy {
            "message to copy not found"
        } else {
            "message to forward not found"
        };
        return Err(ApiError::bad_request(what));
    };
    let message = duplicate(state, call, chat, &original, copy)?;
    if copy {
        Ok(json!({"message_id": message["message_id"]}).into())
    } else {
        Ok(message.into())
    }
}

/// forwardMessages/copyMessages skip the messages they cannot find.
pub(super) fn forward_or_copy_many(state: &mut State, call: &Request, chat: &Value) -> Outcome {
    let copy = call.name().starts_with("copy");
    let from_chat = source_chat(state, call)?;
    let Some(Value::Array(ids)) = call.get("message_ids") else {
        return Err(ApiError::bad_request(
            "message identifiers are not specified",
        ));
    };
    let mut ids: Vec<i64> = ids.iter().filter_map(Value::as_i64).collect();
    ids.sort_unstable();
    let mut results = Vec::new();
    for id in ids {
        if let Some(original) = state.messages.get(&(from_chat, id)).cloned() {
            let message = duplicate(state, call, chat, &original, copy)?;
            results.push(json!({"message_id": message["message_id"]}));
        }
    }
    Ok(Value::Array(results).into())
}

fn source_chat(state: &State, call: &Request) -> Result<i64, ApiError> {
    let from = call
        .get("from_chat_id")
        .ok_or_else(|| ApiError::bad_request("chat_id is empty"))?;
    let chat = resolve_chat(state, from, false)?;
    Ok(chat["id"].as_i64().unwrap_or_default())
}

fn duplicate(
    state: &mut State,
    call: &Request,
    chat: &Value,
    original: &Value,
    copy: bool,
) -> Result<Value, ApiError> {
    let mut message = new_message(state, chat, call)?;
    if let Value::Object(source) = original {
        for (key, value) in source
            .iter()
            .filter(|(key, _)| !ENVELOPE_KEYS.contains(&key.as_str()))
        {
            message.insert(key.clone(), value.clone());
        }
    }
    if copy {
        if call.get("caption").is_some() {
            copy_caption(state, &call.params, &mut message)?;
        }
    } else {
        message.insert("forward_origin".into(), origin_of(original));
    }
    Ok(finish_message(state, message))
}

/// Where a forwarded message comes from; forwarding a forward keeps the
/// first origin.
fn origin_of(original: &Value) -> Value {
    if let Some(origin) = original.get("forward_origin") {
        return origin.clone();
    }
    let date = &original["date"];
    if original["chat"]["type"] == "channel" {
        json!({"type": "channel", "chat": original["chat"], "message_id": original["message_id"], "date": date})
    } else if let Some(sender_chat) = original.get("sender_chat") {
        json!({"type": "chat", "sender_chat": sender_chat, "date": date})
    } else {
        json!({"type": "user", "sender_user": original["from"], "date": date})
    }
}

// ----- editing and deleting ------------------------------------------------

pub(super) fn edit_message(state: &mut State, call: &Request, chat: Option<&Value>) -> Outcome {
    // Inline messages live in other chats the sandbox does not track.
    if call.get("inline_message_id").is_some() {
        return Ok(Value::Bool(true).into());
    }
    let chat = chat.ok_or_else(|| ApiError::bad_request("chat_id is empty"))?;
    let chat_id = chat["id"].as_i64().unwrap_or_default();
    let message_id = call
        .int("message_id")
        .ok_or_else(|| ApiError::bad_request("message identifier is not specified"))?;
    let original = state
        .messages
        .get(&(chat_id, message_id))
        .cloned()
        .ok_or_else(|| ApiError::bad_request("message to edit not found"))?;
    let bot_id = state.bot_id();
    if original
        .get("from")
        .is_some_and(|from| from["id"].as_i64() != Some(bot_id))
    {
        return Err(ApiError::bad_request("message can't be edited"));
    }
    let mut edited = original.clone();
    apply_edit(state, call, &mut edited, chat)?;
    if edited == original && call.name() != "stopMessageLiveLocation" {
        return Err(ApiError::bad_request(
            "message is not modified: specified new message content and reply markup are exactly the same as a \
             current content and reply markup of the message",
        ));
    }
    edited["edit_date"] = unix_now().into();
    state.store_message(edited.clone());
    Ok(edited.into())
}

fn apply_edit(
    state: &mut State,
    call: &Request,
    message: &mut Value,
    chat: &Value,
) -> Result<(), ApiError> {
    let Value::Object(fields) = message else {
        return Ok(());
    };
    match call.name() {
        "editMessageText" => {
            let (text, entities) = formatted(
                state,
                call.text("text").unwrap_or_default(),
                call.get("parse_mode"),
                call.get("entities"),
            )?;
            fields.insert("text".into(), text.into());
            set_or_remove(fields, "entities", entities.as_ref());
        }
        "editMessageCaption" => set_caption(state, &call.params, fields)?,
        "editMessageMedia" => {
            if let Some(Value::Object(item)) = call.get("media") {
                let kind = item
                    .get("type")
                    .and_then(Value::as_str)
                    .unwrap_or("document");
                if let Some(ty) = message_field_type(kind) {
                    for key in MEDIA_KEYS {
                        fields.remove(key);
                    }
                    let upload = find_upload(item.get("media"), kind, &call.files);
                    let content = build_content(state, kind, &ty, item, upload, chat);
                    fields.insert(kind.to_string(), content);
                    set_caption(state, item, fields)?;
                }
            }
        }
        "editMessageLiveLocation" => {
            if let Some(location) = fields.get_mut("location") {
                location["latitude"] = call.get("latitude").cloned().unwrap_or_default();
                location["longitude"] = call.get("longitude").cloned().unwrap_or_default();
            }
        }
        _ => {}
    }
    // An edit without reply_markup removes the inline keyboard.
    set_or_remove(
        fields,
        "reply_markup",
        inline_keyboard(call.get("reply_markup")).as_ref(),
    );
    Ok(())
}

fn set_or_remove(fields: &mut Map<String, Value>, key: &str, value: Option<&Value>) {
    match value {
        Some(value) => fields.insert(key.to_string(), value.clone()),
        None => fields.remove(key),
    };
}

pub(super) fn delete_message(state: &mut State, call: &Request, chat: &Value) -> Outcome {
    let chat_id = chat["id"].as_i64().unwrap_or_default();
    let message_id = call.int("message_id").unwrap_or_default();
    match state.messages.remove(&(chat_id, message_id)) {
        Some(_) => Ok(Value::Bool(true).into()),
        None => Err(ApiError::bad_request("message to delete not found")),
    }
}

/// deleteMessages skips the messages it cannot find.
pub(super) fn delete_messages(state: &mut State, call: &Request, chat: &Value) -> Success {
    let chat_id = chat["id"].as_i64().unwrap_or_default();
    if let Some(Value::Array(ids)) = call.get("message_ids") {
        for id in ids.iter().filter_map(Value::as_i64) {
            state.messages.remove(&(chat_id, id));
        }
    }
    Value::Bool(true).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn content_fields() {
        assert_eq!(content_field("sendVideoNote"), "video_note");
        assert_eq!(content_field("sendPhoto"), "photo");
        assert_eq!(
            message_field_type("photo").as_deref(),
            Some("Array of PhotoSize")
        );
    }
}
