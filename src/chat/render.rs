//! What the terminal chat shows of the bot's calls: each message as lines
//! of text (media as one line with kind, size and caption), its keyboards as
//! numbered buttons, edits, deletions and callback answers. [`Screen`]
//! remembers the keyboards on show, so that `!N` knows what button N is.

use std::collections::HashMap;

use serde_json::Value;

/// What pressing a numbered button does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Press {
    /// Button `index` (0-based) of the inline keyboard on `message_id`.
    Inline { message_id: i64, index: usize },
    /// A reply keyboard button: its text is sent as a message.
    Text(String),
}

/// Why `!N` presses nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PressError {
    #[error("no keyboard in this chat")]
    NoKeyboard,
    #[error("the keyboard has {0} button(s)")]
    NoSuchButton(usize),
}

/// The keyboards on show in one chat.
#[derive(Default)]
struct Keyboards {
    /// The message with the inline keyboard shown last, and how many
    /// buttons it has.
    inline: Option<(i64, usize)>,
    /// The texts of the reply keyboard's buttons.
    reply: Option<Vec<String>>,
    /// Whether the reply keyboard came after the inline one.
    reply_is_latest: bool,
}

/// The chat's memory of what the bot showed.
pub struct Screen {
    /// Names of chats for lines that arrive in a chat the user is not in.
    names: HashMap<i64, String>,
    keyboards: HashMap<i64, Keyboards>,
    /// A short form of each message, so that a deletion can say which.
    summaries: HashMap<(i64, i64), String>,
}

impl Screen {
    /// `names`: how to refer to a chat (`"group"`, `"bob"`) when a message
    /// arrives in one other than the user's.
    pub fn new(names: HashMap<i64, String>) -> Self {
        Screen {
            names,
            keyboards: HashMap::new(),
            summaries: HashMap::new(),
        }
    }

    /// The lines a successful call shows, seen from chat `here`; nothing
    /// for calls a chat does not show (getMe, sendChatAction…).
    pub fn show(&mut self, method: &str, params: &Value, result: &Value, here: i64) -> Vec<String> {
        let mut lines = match method {
            "answerCallbackQuery" => return answer(params),
            "deleteMessage" => {
                let (chat, id) = (params["chat_id"].as_i64(), params["message_id"].as_i64());
                match (chat, id) {
                    (Some(chat), Some(id)) => {
                        let line = self.deleted(chat, id);
                        return self.placed(chat, here, vec![line]);
                    }
                    _ => return Vec::new(),
                }
            }
            "deleteMessages" => {
                let Some(chat) = params["chat_id"].as_i64() else {
                    return Vec::new();
                };
                let ids = params["message_ids"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                let lines = ids
                    .iter()
                    .filter_map(Value::as_i64)
                    .map(|id| self.deleted(chat, id))
                    .collect();
                return self.placed(chat, here, lines);
            }
            _ if method.starts_with("editMessage") => {
                if !result.is_object() {
                    // An inline message, in a chat the sandbox does not show.
                    return Vec::new();
                }
                self.message(result, "(edited) ")
            }
            "forwardMessage" => self.message(result, "(forwarded) "),
            "sendMediaGroup" => {
                let messages = result.as_array().cloned().unwrap_or_default();
                let Some(chat) = messages.first().and_then(|m| m["chat"]["id"].as_i64()) else {
                    return Vec::new();
                };
                let lines = messages.iter().flat_map(|m| self.message(m, "")).collect();
                return self.placed(chat, here, lines);
            }
            _ if (method.starts_with("send") || method.starts_with("copy"))
                && result.get("message_id").is_some()
                && result.get("chat").is_some() =>
            {
                self.message(result, "")
            }
            _ => return Vec::new(),
        };
        let Some(chat) = result["chat"]["id"].as_i64() else {
            return Vec::new();
        };
        lines.extend(self.reply_keyboard(chat, params.get("reply_markup")));
        self.placed(chat, here, lines)
    }

    /// What `!n` presses in `chat`: a button of the keyboard shown last
    /// there (the other one if it is gone).
    pub fn button(&self, chat: i64, n: usize) -> Result<Press, PressError> {
        let keyboards = self.keyboards.get(&chat).ok_or(PressError::NoKeyboard)?;
        let index = n.checked_sub(1).ok_or(PressError::NoSuchButton(0))?;
        let inline = keyboards.inline.map(|(message_id, count)| {
            if index < count {
                Ok(Press::Inline { message_id, index })
            } else {
                Err(PressError::NoSuchButton(count))
            }
        });
        let reply = keyboards.reply.as_ref().map(|texts| {
            texts
                .get(index)
                .map(|text| Press::Text(text.clone()))
                .ok_or(PressError::NoSuchButton(texts.len()))
        });
        let (first, second) = if keyboards.reply_is_latest {
            (reply, inline)
        } else {
            (inline, reply)
        };
        first.or(second).unwrap_or(Err(PressError::NoKeyboard))
    }

    /// Prefixes the first line with the chat's name when it is not `here`.
    fn placed(&self, chat: i64, here: i64, mut lines: Vec<String>) -> Vec<String> {
        if chat != here {
            if let Some(first) = lines.first_mut() {
                let name = self
                    .names
                    .get(&chat)
                    .cloned()
                    .unwrap_or_else(|| format!("chat {chat}"));
                let marker = if chat < 0 {
                    format!("(in {name}) ")
                } else {
                    format!("(to {name}) ")
                };
                first.insert_str(0, &marker);
            }
        }
        lines
    }

    /// A message's lines (its content, then its inline keyboard), and what
    /// the screen remembers of it.
    fn message(&mut self, message: &Value, prefix: &str) -> Vec<String> {
        let (Some(chat), Some(id)) = (
            message["chat"]["id"].as_i64(),
            message["message_id"].as_i64(),
        ) else {
            return Vec::new();
        };
        let content = content(message);
        self.summaries.insert((chat, id), summary(&content));
        let mut lines = vec![format!("{prefix}{content}")];
        let keyboards = self.keyboards.entry(chat).or_default();
        match message["reply_markup"]["inline_keyboard"].as_array() {
            Some(rows) => {
                let (rows, count) = numbered_rows(rows, inline_label);
                lines.extend(rows.into_iter().map(|row| format!("  {row}")));
                keyboards.inline = Some((id, count));
                keyboards.reply_is_latest = false;
            }
            None if keyboards.inline.is_some_and(|(shown, _)| shown == id) => {
                keyboards.inline = None;
            }
            None => {}
        }
        lines
    }

    /// The lines of a reply keyboard a message came with, or of its
    /// removal; keyboards the bot sends replace the one on show.
    fn reply_keyboard(&mut self, chat: i64, markup: Option<&Value>) -> Vec<String> {
        let Some(markup) = markup else {
            return Vec::new();
        };
        let keyboards = self.keyboards.entry(chat).or_default();
        if let Some(rows) = markup["keyboard"].as_array() {
            let (lines, _) = numbered_rows(rows, reply_text);
            keyboards.reply = Some(
                rows.iter()
                    .filter_map(Value::as_array)
                    .flatten()
                    .map(reply_text)
                    .collect(),
            );
            keyboards.reply_is_latest = true;
            const LABEL: &str = "keyboard: ";
            return lines
                .into_iter()
                .enumerate()
                .map(|(i, row)| {
                    let label = if i == 0 {
                        LABEL.to_string()
                    } else {
                        " ".repeat(LABEL.len())
                    };
                    format!("  {label}{row}")
                })
                .collect();
        }
        if markup["remove_keyboard"] == Value::Bool(true) && keyboards.reply.take().is_some() {
            keyboards.reply_is_latest = false;
            return vec!["  (keyboard removed)".to_string()];
        }
        Vec::new()
    }

    fn deleted(&mut self, chat: i64, id: i64) -> String {
        if let Some(keyboards) = self.keyboards.get_mut(&chat) {
            if keyboards.inline.is_some_and(|(shown, _)| shown == id) {
                keyboards.inline = None;
            }
        }
        match self.summaries.remove(&(chat, id)) {
            Some(summary) => format!("(deleted) {summary}"),
            None => format!("(deleted message {id})"),
        }
    }
}

/// Rows of `[N label]` buttons, numbered across rows from 1, and how many.
fn numbered_rows(rows: &[Value], label: impl Fn(&Value) -> String) -> (Vec<String>, usize) {
    let mut n = 0;
    let lines = rows
        .iter()
        .filter_map(Value::as_array)
        .map(|row| {
            row.iter()
                .map(|button| {
                    n += 1;
                    format!("[{n} {}]", label(button))
                })
                .collect::<Vec<_>>()
                .join(" ")
        })
        .collect();
    (lines, n)
}

/// A reply keyboard button: a KeyboardButton, or its text alone.
fn reply_text(button: &Value) -> String {
    button
        .as_str()
        .or_else(|| button["text"].as_str())
        .unwrap_or_default()
        .to_string()
}

/// An inline button's text, with where a link button leads.
fn inline_label(button: &Value) -> String {
    let text = button["text"].as_str().unwrap_or_default();
    match button["url"].as_str() {
        Some(url) => format!("{text} -> {url}"),
        None => text.to_string(),
    }
}

fn answer(params: &Value) -> Vec<String> {
    let Some(text) = params["text"].as_str().filter(|t| !t.is_empty()) else {
        return match params["url"].as_str() {
            Some(url) => vec![format!("(answer) opens {url}")],
            None => Vec::new(),
        };
    };
    if params["show_alert"] == Value::Bool(true) {
        vec![format!("(alert) {text}")]
    } else {
        vec![format!("(answer) {text}")]
    }
}

/// The first line of a message, for `(deleted) …`.
fn summary(content: &str) -> String {
    let first = content.lines().next().unwrap_or_default();
    let mut short: String = first.chars().take(40).collect();
    if short.len() < content.len() {
        short.push('…');
    }
    short
}

/// Media keys of a Message, in the order a client would show them; the
/// first [`FILES`] carry a file (photos, videos, documents, ...).
pub(super) const MEDIA: [&str; 16] = [
    "photo",
    "video",
    "animation",
    "audio",
    "voice",
    "video_note",
    "document",
    "sticker",
    "venue",
    "location",
    "contact",
    "poll",
    "dice",
    "game",
    "invoice",
    "story",
];

/// How many of [`MEDIA`], from the first, are files.
pub(super) const FILES: usize = 7;

/// A message's content as one line: its text, or its media as
/// `[kind details] caption`.
pub fn content(message: &Value) -> String {
    if let Some(text) = message["text"].as_str() {
        return text.to_string();
    }
    let caption = message["caption"]
        .as_str()
        .map(|c| format!(" {c}"))
        .unwrap_or_default();
    let Some((kind, media)) = MEDIA
        .iter()
        .find_map(|kind| message.get(*kind).map(|media| (*kind, media)))
    else {
        return format!("[message]{caption}");
    };
    // A photo comes in several sizes; the largest is the last.
    let media = match media {
        Value::Array(sizes) => sizes.last().unwrap_or(&Value::Null),
        other => other,
    };
    let mut details = Vec::new();
    match kind {
        "location" | "venue" => {
            let at = if kind == "venue" {
                &media["location"]
            } else {
                media
            };
            if let (Some(lat), Some(lon)) = (at["latitude"].as_f64(), at["longitude"].as_f64()) {
                details.push(format!("{lat}, {lon}"));
            }
            if let Some(title) = media["title"].as_str() {
                details.push(title.to_string());
            }
        }
        "contact" => {
            let name = [&media["first_name"], &media["last_name"]]
                .iter()
                .filter_map(|v| v.as_str())
                .collect::<Vec<_>>()
                .join(" ");
            details.push(name);
            if let Some(phone) = media["phone_number"].as_str() {
                details.push(phone.to_string());
            }
        }
        "poll" => {
            let question = media["question"].as_str().unwrap_or_default();
            let options = media["options"]
                .as_array()
                .map(|o| {
                    o.iter()
                        .filter_map(|o| o["text"].as_str())
                        .collect::<Vec<_>>()
                        .join(" / ")
                })
                .unwrap_or_default();
            details.push(format!("{question} ({options})"));
        }
        "dice" => {
            details.push(format!(
                "{} {}",
                media["emoji"].as_str().unwrap_or_default(),
                media["value"]
            ));
        }
        "sticker" => {
            if let Some(emoji) = media["emoji"].as_str() {
                details.push(emoji.to_string());
            }
        }
        _ => {}
    }
    if let Some(name) = media["file_name"].as_str().or(media["title"].as_str()) {
        if kind != "venue" {
            details.push(name.to_string());
        }
    }
    if let (Some(w), Some(h)) = (media["width"].as_i64(), media["height"].as_i64()) {
        if kind != "sticker" {
            details.push(format!("{w}x{h}"));
        }
    }
    if let Some(seconds) = media["duration"].as_i64() {
        details.push(format!("{seconds} s"));
    }
    if let Some(size) = media["file_size"].as_u64().filter(|s| *s > 0) {
        details.push(human_size(size));
    }
    let kind = kind.replace('_', " ");
    if details.is_empty() {
        format!("[{kind}]{caption}")
    } else {
        format!("[{kind} {}]{caption}", details.join(", "))
    }
}

fn human_size(bytes: u64) -> String {
    const KB: f64 = 1024.0;
    let b = bytes as f64;
    if b < KB {
        format!("{bytes} B")
    } else if b < KB * KB {
        format!("{:.1} KB", b / KB)
    } else {
        format!("{:.1} MB", b / KB / KB)
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    const HERE: i64 = 1000;

    fn screen() -> Screen {
        Screen::new(HashMap::from([
            (-5, "group".to_string()),
            (1001, "bob".to_string()),
        ]))
    }

    fn message(chat: i64, id: i64, body: Value) -> Value {
        let mut message =
            json!({"message_id": id, "chat": {"id": chat, "type": "private"}, "date": 0});
        message
            .as_object_mut()
            .expect("an object literal")
            .extend(body.as_object().expect("an object literal").clone());
        message
    }

    fn sent(screen: &mut Screen, params: Value, result: Value) -> Vec<String> {
        screen.show("sendMessage", &params, &result, HERE)
    }

    #[test]
    fn text_prints_as_sent_and_other_chats_are_named() {
        let mut s = screen();
        let hi = message(HERE, 1, json!({"text": "hi"}));
        assert_eq!(sent(&mut s, json!({}), hi), ["hi"]);
        let group = message(-5, 2, json!({"text": "hello all"}));
        assert_eq!(sent(&mut s, json!({}), group), ["(in group) hello all"]);
        let bob = message(1001, 3, json!({"text": "psst"}));
        assert_eq!(sent(&mut s, json!({}), bob), ["(to bob) psst"]);
        assert!(s
            .show("getMe", &json!({}), &json!({"id": 1}), HERE)
            .is_empty());
        assert!(s
            .show("sendChatAction", &json!({}), &json!(true), HERE)
            .is_empty());
    }

    #[test]
    fn inline_keyboards_are_numbered_and_pressed_by_number() {
        let mut s = screen();
        let keyboard = json!({"inline_keyboard": [
            [{"text": "Yes", "callback_data": "y"}, {"text": "No", "callback_data": "n"}],
            [{"text": "Docs", "url": "https://example.org"}]]});
        let pick = message(HERE, 7, json!({"text": "Pick", "reply_markup": keyboard}));
        assert_eq!(
            sent(&mut s, json!({"reply_markup": keyboard}), pick),
            [
                "Pick",
                "  [1 Yes] [2 No]",
                "  [3 Docs -> https://example.org]"
            ]
        );
        assert_eq!(
            s.button(HERE, 2),
            Ok(Press::Inline {
                message_id: 7,
                index: 1
            })
        );
        assert_eq!(s.button(HERE, 4), Err(PressError::NoSuchButton(3)));
        assert_eq!(s.button(-5, 1), Err(PressError::NoKeyboard));

        // The edit takes the keyboard away: nothing left to press.
        let edited = message(HERE, 7, json!({"text": "Chose: no", "edit_date": 1}));
        assert_eq!(
            s.show("editMessageText", &json!({}), &edited, HERE),
            ["(edited) Chose: no"]
        );
        assert_eq!(s.button(HERE, 1), Err(PressError::NoKeyboard));
    }

    #[test]
    fn reply_keyboards_send_their_text_until_removed() {
        let mut s = screen();
        let markup = json!({"keyboard": [["Red", {"text": "Blue"}], [{"text": "Green"}]]});
        let ask = message(HERE, 1, json!({"text": "Colour?"}));
        assert_eq!(
            sent(&mut s, json!({"reply_markup": markup}), ask),
            [
                "Colour?",
                "  keyboard: [1 Red] [2 Blue]",
                "            [3 Green]"
            ]
        );
        assert_eq!(s.button(HERE, 3), Ok(Press::Text("Green".into())));
        // A newer inline keyboard is the one `!N` presses …
        let inline = json!({"inline_keyboard": [[{"text": "Go", "callback_data": "g"}]]});
        let go = message(HERE, 2, json!({"text": "Ready?", "reply_markup": inline}));
        sent(&mut s, json!({}), go);
        assert_eq!(
            s.button(HERE, 1),
            Ok(Press::Inline {
                message_id: 2,
                index: 0
            })
        );
        // … until it is deleted.
        assert_eq!(
            s.show(
                "deleteMessage",
                &json!({"chat_id": HERE, "message_id": 2}),
                &json!(true),
                HERE
            ),
            ["(deleted) Ready?"]
        );
        assert_eq!(s.button(HERE, 1), Ok(Press::Text("Red".into())));
        let done = message(HERE, 3, json!({"text": "Thanks"}));
        assert_eq!(
            sent(
                &mut s,
                json!({"reply_markup": {"remove_keyboard": true}}),
                done
            ),
            ["Thanks", "  (keyboard removed)"]
        );
        assert_eq!(s.button(HERE, 1), Err(PressError::NoKeyboard));
    }

    #[test]
    fn deletions_name_the_message_when_it_was_shown() {
        let mut s = screen();
        sent(
            &mut s,
            json!({}),
            message(-5, 4, json!({"text": "temporary\nsecond line"})),
        );
        let lines = s.show(
            "deleteMessages",
            &json!({"chat_id": -5, "message_ids": [4, 9]}),
            &json!(true),
            HERE,
        );
        assert_eq!(
            lines,
            ["(in group) (deleted) temporary…", "(deleted message 9)"]
        );
    }

    #[test]
    fn answers_print_their_text() {
        let mut s = screen();
        let show =
            |s: &mut Screen, params| s.show("answerCallbackQuery", &params, &json!(true), HERE);
        assert_eq!(show(&mut s, json!({"text": "Saved"})), ["(answer) Saved"]);
        assert_eq!(
            show(&mut s, json!({"text": "Careful", "show_alert": true})),
            ["(alert) Careful"]
        );
        assert!(show(&mut s, json!({"callback_query_id": "1"})).is_empty());
    }

    #[test]
    fn media_is_one_line_with_kind_size_and_caption() {
        let photo = json!({"photo": [{"width": 90, "height": 60, "file_size": 100},
                                     {"width": 800, "height": 600, "file_size": 2048}],
                           "caption": "a cat"});
        assert_eq!(content(&photo), "[photo 800x600, 2.0 KB] a cat");
        let document = json!({"document": {"file_name": "report.pdf", "file_size": 3_500_000}});
        assert_eq!(content(&document), "[document report.pdf, 3.3 MB]");
        let voice = json!({"voice": {"duration": 4, "file_size": 900}});
        assert_eq!(content(&voice), "[voice 4 s, 900 B]");
        let sticker = json!({"sticker": {"emoji": "😀", "width": 512, "height": 512}});
        assert_eq!(content(&sticker), "[sticker 😀]");
        let note = json!({"video_note": {"duration": 3, "file_size": 0}});
        assert_eq!(content(&note), "[video note 3 s]");
        let dice = json!({"dice": {"emoji": "🎲", "value": 4}});
        assert_eq!(content(&dice), "[dice 🎲 4]");
        let poll =
            json!({"poll": {"question": "Tea?", "options": [{"text": "Yes"}, {"text": "No"}]}});
        assert_eq!(content(&poll), "[poll Tea? (Yes / No)]");
        assert_eq!(content(&json!({"caption": "?"})), "[message] ?");
    }

    #[test]
    fn albums_and_edited_captions() {
        let mut s = screen();
        let album = json!([
            message(HERE, 1, json!({"photo": [{"file_size": 3}]})),
            message(
                HERE,
                2,
                json!({"photo": [{"file_size": 4}], "caption": "two"})
            ),
        ]);
        assert_eq!(
            s.show("sendMediaGroup", &json!({}), &album, HERE),
            ["[photo 3 B]", "[photo 4 B] two"]
        );
        let edited = message(
            HERE,
            2,
            json!({"photo": [{"file_size": 4}], "caption": "2"}),
        );
        assert_eq!(
            s.show("editMessageCaption", &json!({}), &edited, HERE),
            ["(edited) [photo 4 B] 2"]
        );
        assert!(s
            .show("editMessageText", &json!({}), &json!(true), HERE)
            .is_empty());
    }
}
