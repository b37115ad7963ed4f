//! What the page shows, as JSON: each message as a bubble (safe HTML,
//! media, keyboard), each Bot API call for the side panel, and what a call
//! changes on screen (a reply keyboard, a deletion, a callback answer, the
//! bot typing). Built from the sandbox's own state and its watched events,
//! so the page holds no chat state the sandbox does not.

use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

use crate::sandbox::{RecordedCall, SandboxEvent, SandboxView, Watched};

use super::super::render;
use super::html;
use super::{CHATS, PEOPLE};

/// One event for the page: its SSE name and its data.
#[derive(Debug, Clone, PartialEq)]
pub struct PageEvent {
    pub name: &'static str,
    pub data: Value,
}

fn event(name: &'static str, data: Value) -> PageEvent {
    PageEvent { name, data }
}

/// How many calls the first view of the page lists; the panel says how
/// many came before.
const CALLS_SHOWN: usize = 500;

/// Everything the page needs to draw itself from nothing, as of event
/// number `events()` of the sandbox.
pub fn snapshot(v: &SandboxView<'_>, instance: &str, bot: &Value) -> Value {
    let people: Vec<Value> = PEOPLE
        .iter()
        .map(|(id, username, name)| json!({"id": id, "name": name, "username": username}))
        .collect();
    // A private chat is one the sandbox knows only once its person wrote.
    let chats: Vec<Value> = CHATS
        .iter()
        .map(
            |&id| match PEOPLE.iter().find(|(person, ..)| *person == id) {
                Some((_, _, name)) => json!({"id": id, "title": name, "type": "private"}),
                None => {
                    let chat = v.chat(id).cloned().unwrap_or(Value::Null);
                    json!({"id": id, "title": chat["title"], "type": chat["type"]})
                }
            },
        )
        .collect();
    let messages: Vec<Value> = CHATS
        .iter()
        .flat_map(|&id| v.messages_in(id))
        .map(|m| message(m, v))
        .collect();
    let calls = v.calls();
    let first = calls.len().saturating_sub(CALLS_SHOWN);
    let listed: Vec<Value> = calls[first..]
        .iter()
        .enumerate()
        .map(|(i, c)| call(c, first + i + 1))
        .collect();
    // The reply keyboard on show in each chat, and the bot's command list:
    // the last call that set them.
    let mut keyboards = Map::new();
    let mut commands = Value::Null;
    for c in calls.iter().filter(|c| c.ok()) {
        if let Some(change) = keyboard(c) {
            keyboards.insert(change.data["chat"].to_string(), change.data);
        }
        if c.method == "setMyCommands" {
            commands = c.params["commands"].clone();
        }
    }
    json!({
        "instance": instance,
        "seq": v.events(),
        "bot": {"id": bot["id"], "name": bot["first_name"], "username": bot["username"]},
        "people": people,
        "chats": chats,
        "messages": messages,
        "keyboards": keyboards.into_iter().map(|(_, k)| k).collect::<Vec<_>>(),
        "commands": commands,
        "calls": listed,
        "calls_before": first,
    })
}

/// What the page shows of one sandbox event; `n` counts the calls so far.
pub fn translate(watched: &Watched, v: &SandboxView<'_>, n: usize) -> Vec<PageEvent> {
    match &watched.event {
        SandboxEvent::Update(update) => update
            .get("message")
            .filter(|m| shown(m))
            .map(|m| vec![event("message", message(m, v))])
            .unwrap_or_default(),
        SandboxEvent::Call(c) => {
            let mut events = vec![event("call", call(c, n))];
            if c.ok() {
                events.extend(effects(c, v));
            }
            events
        }
    }
}

/// Whether a message belongs to one of the chats the page has.
fn shown(message: &Value) -> bool {
    message["chat"]["id"]
        .as_i64()
        .is_some_and(|id| CHATS.contains(&id))
}

/// What a successful call changes on screen.
fn effects(c: &RecordedCall, v: &SandboxView<'_>) -> Vec<PageEvent> {
    let mut events = Vec::new();
    let result = c.result().cloned().unwrap_or(Value::Null);
    let by_id = |chat: &Value, id: &Value| {
        chat.as_i64()
            .zip(id.as_i64())
            .and_then(|(chat, id)| v.message(chat, id))
            .cloned()
    };
    let messages: Vec<Value> = match c.method.as_str() {
        // These answer only the new messages' ids.
        "copyMessage" => by_id(&c.params["chat_id"], &result["message_id"])
            .into_iter()
            .collect(),
        "copyMessages" | "forwardMessages" => result
            .as_array()
            .map(|ids| {
                ids.iter()
                    .filter_map(|m| by_id(&c.params["chat_id"], &m["message_id"]))
                    .collect()
            })
            .unwrap_or_default(),
        _ => match &result {
            Value::Array(items) => items.iter().filter(|m| is_message(m)).cloned().collect(),
            m if is_message(m) => vec![m.clone()],
            _ => Vec::new(),
        },
    };
    events.extend(
        messages
            .iter()
            .filter(|m| shown(m))
            .map(|m| event("message", message(m, v))),
    );
    if let Some(change) = keyboard(c) {
        events.push(change);
    }
    match c.method.as_str() {
        "deleteMessage" | "deleteMessages" => {
            let ids = match c.params.get("message_ids") {
                Some(Value::Array(ids)) => ids.clone(),
                _ => vec![c.params["message_id"].clone()],
            };
            events.push(event(
                "delete",
                json!({"chat": c.params["chat_id"], "ids": ids}),
            ));
        }
        "answerCallbackQuery" => events.push(event(
            "answer",
            json!({
                "query_id": c.params["callback_query_id"],
                "text": c.params["text"],
                "alert": c.params["show_alert"] == Value::Bool(true),
                "url": c.params["url"],
            }),
        )),
        "sendChatAction" => events.push(event(
            "action",
            json!({"chat": c.params["chat_id"], "action": c.params["action"]}),
        )),
        "setMyCommands" => {
            events.push(event("commands", json!({"commands": c.params["commands"]})))
        }
        "deleteMyCommands" => events.push(event("commands", json!({"commands": null}))),
        _ => {}
    }
    events
}

fn is_message(value: &Value) -> bool {
    value.get("message_id").is_some() && value.get("chat").is_some()
}

/// The reply keyboard a message-sending call shows (or removes) in its
/// chat; None when the call leaves it as it is.
fn keyboard(c: &RecordedCall) -> Option<PageEvent> {
    let markup = c.params.get("reply_markup")?;
    let chat = c
        .result()
        .and_then(|r| r["chat"]["id"].as_i64())
        .or_else(|| c.params["chat_id"].as_i64())?;
    if !CHATS.contains(&chat) {
        return None;
    }
    if let Some(rows) = markup["keyboard"].as_array() {
        let rows: Vec<Vec<Value>> = rows
            .iter()
            .filter_map(Value::as_array)
            .map(|row| {
                row.iter()
                    .map(|b| {
                        let text = b.as_str().or(b["text"].as_str()).unwrap_or_default();
                        let request = ["request_contact", "request_location", "request_poll"]
                            .into_iter()
                            .find(|k| b.get(*k).is_some_and(|v| v != &Value::Bool(false)));
                        json!({"text": text, "request": request})
                    })
                    .collect()
            })
            .collect();
        return Some(event(
            "keyboard",
            json!({
                "chat": chat,
                "rows": rows,
                "one_time": markup["one_time_keyboard"] == Value::Bool(true),
                "placeholder": markup["input_field_placeholder"],
            }),
        ));
    }
    if markup["remove_keyboard"] == Value::Bool(true) {
        return Some(event("keyboard", json!({"chat": chat, "rows": null})));
    }
    if let Some(placeholder) = markup
        .get("force_reply")
        .and_then(|_| markup.get("input_field_placeholder"))
    {
        return Some(event(
            "keyboard",
            json!({"chat": chat, "rows": null, "placeholder": placeholder}),
        ));
    }
    None
}

/// A message as a bubble.
pub fn message(m: &Value, v: &SandboxView<'_>) -> Value {
    let from = &m["from"];
    let name = [from["first_name"].as_str(), from["last_name"].as_str()]
        .into_iter()
        .flatten()
        .collect::<Vec<_>>()
        .join(" ");
    let (text, entities) = match m["text"].as_str() {
        Some(text) => (text, &m["entities"]),
        None => (
            m["caption"].as_str().unwrap_or_default(),
            &m["caption_entities"],
        ),
    };
    let entities = entities.as_array().map(Vec::as_slice).unwrap_or_default();
    json!({
        "chat": m["chat"]["id"],
        "id": m["message_id"],
        "date": m["date"],
        "edited": m.get("edit_date").is_some(),
        "from": {"id": from["id"], "name": name, "bot": from["is_bot"] == Value::Bool(true)},
        "html": html::render(text, entities),
        "media": media(m, v),
        "keyboard": inline_keyboard(&m["reply_markup"]),
        "reply_to": m.get("reply_to_message").map(|r| json!({
            "name": r["from"]["first_name"],
            "text": summary(r),
        })),
        "forward": m["forward_origin"]["sender_user"]["first_name"]
            .as_str()
            .or(m["forward_origin"]["chat"]["title"].as_str()),
    })
}

/// The first line of a message, as the reply header shows it.
fn summary(message: &Value) -> String {
    let content = match message["text"].as_str() {
        Some(text) => text.to_string(),
        None => render::content(message),
    };
    let first = content.lines().next().unwrap_or_default();
    let mut short: String = first.chars().take(60).collect();
    if short.len() < content.len() {
        short.push('…');
    }
    short
}

/// Photos and files to show (with a URL when the sandbox has their bytes),
/// and any other content as a line of text.
fn media(m: &Value, v: &SandboxView<'_>) -> Value {
    let found = render::MEDIA[..render::FILES]
        .iter()
        .find_map(|kind| m.get(*kind).map(|media| (*kind, media)));
    let Some((kind, media)) = found else {
        if m.get("text").is_some() {
            return Value::Null;
        }
        // Stickers, locations, polls, dice…: the terminal's line, without
        // the caption the bubble shows anyway.
        let mut bare = m.clone();
        if let Value::Object(o) = &mut bare {
            o.remove("caption");
        }
        let line = render::content(&bare);
        if line == "[message]" {
            return Value::Null;
        }
        let emoji = m["sticker"]["emoji"]
            .as_str()
            .or(m["dice"]["emoji"].as_str());
        return json!({"kind": "other", "label": line, "emoji": emoji});
    };
    // A photo comes in several sizes; the largest is the last.
    let media = match media {
        Value::Array(sizes) => sizes.last().unwrap_or(&Value::Null),
        other => other,
    };
    let file_id = media["file_id"].as_str().unwrap_or_default();
    let url = v
        .file_content(file_id)
        .map(|_| format!("/file/{}", percent_encode(file_id)));
    let mut bare = Map::new();
    bare.insert(kind.to_string(), media.clone());
    json!({
        "kind": kind,
        "url": url,
        "name": media["file_name"],
        "mime": media["mime_type"],
        "width": media["width"],
        "height": media["height"],
        "label": render::content(&Value::Object(bare)),
    })
}

/// An inline keyboard's rows of buttons, and what each does.
fn inline_keyboard(markup: &Value) -> Value {
    let Some(rows) = markup["inline_keyboard"].as_array() else {
        return Value::Null;
    };
    let rows: Vec<Vec<Value>> = rows
        .iter()
        .filter_map(Value::as_array)
        .map(|row| {
            row.iter()
                .map(|b| {
                    let text = b["text"].as_str().unwrap_or_default();
                    if b.get("callback_data").is_some() {
                        json!({"text": text, "kind": "callback"})
                    } else if let Some(url) = b["url"].as_str().filter(|u| is_web_url(u)) {
                        json!({"text": text, "kind": "url", "url": url})
                    } else if let Some(copy) = b["copy_text"]["text"].as_str() {
                        json!({"text": text, "kind": "copy", "copy": copy})
                    } else {
                        let kind = b
                            .as_object()
                            .and_then(|o| o.keys().find(|k| k.as_str() != "text"))
                            .cloned()
                            .unwrap_or_default();
                        json!({"text": text, "kind": "other", "what": kind})
                    }
                })
                .collect()
        })
        .collect();
    json!(rows)
}

fn is_web_url(url: &str) -> bool {
    let lower = url.to_ascii_lowercase();
    lower.starts_with("https://") || lower.starts_with("http://")
}

/// A call for the side panel: number, method, parameters (files as name and
/// size), and the result or the error.
fn call(c: &RecordedCall, n: usize) -> Value {
    let mut params = c.params.clone();
    if let Value::Object(p) = &mut params {
        for file in &c.files {
            p.insert(
                file.name.clone(),
                json!({"file": file.file_name, "size": file.size, "type": file.content_type}),
            );
        }
    }
    json!({
        "n": n,
        "method": c.method,
        "at": wall_clock_ms(c.at),
        "status": c.status,
        "ok": c.ok(),
        "params": params,
        "result": c.result(),
        "error": c.error().map(str::to_string).or_else(|| c.fault.map(|f| format!("{f:?}"))),
    })
}

/// Milliseconds since the epoch when `at` was.
fn wall_clock_ms(at: Instant) -> u64 {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let then = now.saturating_sub(at.elapsed());
    u64::try_from(then.as_millis()).unwrap_or_default()
}

/// A file_id as one path segment: only its unreserved characters pass.
fn percent_encode(text: &str) -> String {
    text.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chat::{SANDBOX_GROUP, SANDBOX_USER};

    fn sent(params: Value) -> RecordedCall {
        let chat = params["chat_id"].clone();
        RecordedCall {
            method: "sendMessage".into(),
            params,
            files: Vec::new(),
            at: Instant::now(),
            status: 200,
            response: json!({"ok": true, "result": {"message_id": 1, "chat": {"id": chat}}}),
            fault: None,
        }
    }

    #[test]
    fn reply_keyboards_are_shown_replaced_and_removed_per_chat() {
        let shown = keyboard(&sent(json!({"chat_id": SANDBOX_USER, "reply_markup": {
            "keyboard": [["Red", {"text": "Here", "request_location": true}]],
            "one_time_keyboard": true, "input_field_placeholder": "Colour?"}})))
        .expect("a keyboard");
        assert_eq!(shown.name, "keyboard");
        assert_eq!(
            shown.data,
            json!({"chat": SANDBOX_USER, "one_time": true, "placeholder": "Colour?", "rows": [[
                {"text": "Red", "request": null},
                {"text": "Here", "request": "request_location"}]]})
        );
        let removed = keyboard(&sent(json!({"chat_id": SANDBOX_GROUP,
            "reply_markup": {"remove_keyboard": true}})))
        .expect("a removal");
        assert_eq!(removed.data, json!({"chat": SANDBOX_GROUP, "rows": null}));
        assert!(keyboard(&sent(json!({"chat_id": SANDBOX_USER}))).is_none());
        assert!(
            keyboard(&sent(
                json!({"chat_id": 77, "reply_markup": {"remove_keyboard": true}})
            ))
            .is_none(),
            "not a chat the page has"
        );
    }

    #[test]
    fn inline_buttons_say_what_a_press_does() {
        let rows = inline_keyboard(&json!({"inline_keyboard": [[
            {"text": "Go", "callback_data": "go"},
            {"text": "Site", "url": "https://example.org"},
            {"text": "Bad", "url": "javascript:alert(1)"},
            {"text": "Copy", "copy_text": {"text": "abc"}},
            {"text": "App", "web_app": {"url": "https://example.org"}},
        ]]}));
        assert_eq!(
            rows,
            json!([[
                {"text": "Go", "kind": "callback"},
                {"text": "Site", "kind": "url", "url": "https://example.org"},
                {"text": "Bad", "kind": "other", "what": "url"},
                {"text": "Copy", "kind": "copy", "copy": "abc"},
                {"text": "App", "kind": "other", "what": "web_app"},
            ]])
        );
        assert_eq!(inline_keyboard(&Value::Null), Value::Null);
    }

    #[test]
    fn calls_for_the_panel_carry_files_and_errors() {
        let mut c = sent(json!({"chat_id": 5, "caption": "x"}));
        c.method = "sendPhoto".into();
        c.files.push(crate::sandbox::UploadedFile {
            name: "photo".into(),
            file_name: Some("sun.png".into()),
            content_type: Some("image/png".into()),
            size: 261,
            bytes: bytes::Bytes::from_static(b"png"),
        });
        let shown = call(&c, 7);
        assert_eq!(shown["n"], 7);
        assert_eq!(
            shown["params"]["photo"],
            json!({"file": "sun.png", "size": 261, "type": "image/png"})
        );
        assert_eq!(shown["ok"], true);
        c.status = 400;
        c.response = json!({"ok": false, "error_code": 400, "description": "Bad Request: no"});
        let failed = call(&c, 8);
        assert_eq!(
            (failed["ok"].clone(), failed["error"].clone()),
            (json!(false), json!("Bad Request: no"))
        );
        assert_eq!(failed["result"], Value::Null);
    }
}
