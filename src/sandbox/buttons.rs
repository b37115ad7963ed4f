//! Pressing the inline keyboard buttons of the bot's messages, as a
//! Telegram client does: a callback button becomes a `callback_query`
//! update that carries the message, the user who pressed and the chat's
//! `chat_instance`; other buttons do nothing the bot would see.

use serde_json::{json, Value};

use super::state::{synthetic_user, State};

/// Why a button press produced no update; the caller tells the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ButtonError {
    #[error("message {message_id} is not known in chat {chat_id}")]
    MessageNotFound { chat_id: i64, message_id: i64 },
    #[error("the message has no inline keyboard")]
    NoKeyboard,
    #[error("the keyboard has {count} button(s); there is no button {index}")]
    NoSuchButton { index: usize, count: usize },
    /// A URL button: a client opens the link, the bot hears nothing.
    #[error("the button opens {url}")]
    OpensUrl { url: String },
    /// Web apps, inline-query switches, games, payments, copy-text
    /// buttons: a client does something the sandbox does not emulate.
    #[error("a {kind} button cannot be pressed in the sandbox")]
    Unsupported { kind: String },
}

/// A button press that reached the bot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pressed {
    pub update_id: i64,
    /// The callback query's `id`, which the bot answers with
    /// `answerCallbackQuery`.
    pub query_id: String,
}

impl State {
    /// Presses button `index` (0-based, counted row by row) of the inline
    /// keyboard on message `message_id` of chat `chat_id`, as user `from`.
    pub fn press_button(
        &mut self,
        chat_id: i64,
        message_id: i64,
        from: i64,
        index: usize,
    ) -> Result<Pressed, ButtonError> {
        let message = self.messages.get(&(chat_id, message_id)).cloned().ok_or(
            ButtonError::MessageNotFound {
                chat_id,
                message_id,
            },
        )?;
        let buttons: Vec<&Value> = message["reply_markup"]["inline_keyboard"]
            .as_array()
            .ok_or(ButtonError::NoKeyboard)?
            .iter()
            .filter_map(Value::as_array)
            .flatten()
            .collect();
        let button = *buttons.get(index).ok_or(ButtonError::NoSuchButton {
            index,
            count: buttons.len(),
        })?;
        let (key, value) = if let Some(data) = button.get("callback_data") {
            ("data", data.clone())
        } else if let Some(url) = button.get("url").and_then(Value::as_str) {
            return Err(ButtonError::OpensUrl {
                url: url.to_string(),
            });
        } else {
            let kind = button
                .as_object()
                .and_then(|b| b.keys().find(|k| k.as_str() != "text"))
                .cloned()
                .unwrap_or_else(|| "text-only".to_string());
            return Err(ButtonError::Unsupported { kind });
        };
        let user = self
            .users
            .get(&from)
            .cloned()
            .unwrap_or_else(|| synthetic_user(from));
        // Telegram's query ids are long decimal strings; a serial keeps
        // them unique.
        let query_id = format!("{}", 4_000_000_000_000_000_000u64 + self.next_serial());
        let mut query = json!({
            "id": query_id,
            "from": user,
            "message": message,
            "chat_instance": chat_instance(chat_id, self.bot_id()),
        });
        query[key] = value;
        let update_id = self.inject_update(json!({ "callback_query": query }));
        Ok(Pressed {
            update_id,
            query_id,
        })
    }
}

/// Telegram's `chat_instance`: the same for every button of one chat (for
/// one bot), different between chats. Multiplying by an odd constant is a
/// bijection on 64-bit numbers, so distinct chats never share one.
pub(crate) fn chat_instance(chat_id: i64, bot_id: i64) -> String {
    let mixed =
        (chat_id as u64 ^ (bot_id as u64).rotate_left(32)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    // Telegram's are signed decimal numbers.
    (mixed as i64).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::SandboxOptions;

    fn state_with_keyboard() -> State {
        let mut s = State::new(SandboxOptions::default());
        let bot = s.bot_sender();
        s.store_message(json!({
            "message_id": 5, "from": bot, "date": 0, "text": "pick",
            "chat": {"id": 7, "type": "private", "first_name": "A"},
            "reply_markup": {"inline_keyboard": [
                [{"text": "Yes", "callback_data": "y"}, {"text": "No", "callback_data": "n"}],
                [{"text": "Docs", "url": "https://example.org"}],
                [{"text": "App", "web_app": {"url": "https://example.org/app"}}],
            ]},
        }));
        s
    }

    #[test]
    fn a_callback_button_queues_a_callback_query_with_the_message() {
        let mut s = state_with_keyboard();
        s.register_user(&json!({"id": 7, "first_name": "Alice", "username": "alice"}));
        let pressed = s.press_button(7, 5, 7, 1).expect("a callback button");
        let update = &s.updates.back().expect("queued").body;
        assert_eq!(update["update_id"], pressed.update_id);
        let query = &update["callback_query"];
        assert_eq!(query["id"], pressed.query_id.as_str());
        assert_eq!(query["data"], "n");
        assert_eq!(query["from"]["first_name"], "Alice");
        assert_eq!(query["from"]["is_bot"], false);
        assert_eq!(query["message"]["message_id"], 5);
        assert_eq!(query["message"]["text"], "pick");
        assert_eq!(
            query["chat_instance"],
            chat_instance(7, s.bot_id()).as_str()
        );
        let again = s.press_button(7, 5, 7, 0).expect("pressed again");
        assert_ne!(
            again.query_id, pressed.query_id,
            "every press is a new query"
        );
    }

    #[test]
    fn buttons_the_bot_never_hears_about_are_refused() {
        let mut s = state_with_keyboard();
        assert_eq!(
            s.press_button(7, 5, 7, 2),
            Err(ButtonError::OpensUrl {
                url: "https://example.org".into()
            })
        );
        assert_eq!(
            s.press_button(7, 5, 7, 3),
            Err(ButtonError::Unsupported {
                kind: "web_app".into()
            })
        );
        assert_eq!(
            s.press_button(7, 5, 7, 4),
            Err(ButtonError::NoSuchButton { index: 4, count: 4 })
        );
        assert_eq!(
            s.press_button(7, 6, 7, 0),
            Err(ButtonError::MessageNotFound {
                chat_id: 7,
                message_id: 6
            })
        );
        assert!(s.updates.is_empty());
    }

    #[test]
    fn chat_instance_is_per_chat() {
        assert_eq!(chat_instance(7, 1), chat_instance(7, 1));
        assert_ne!(chat_instance(7, 1), chat_instance(-7, 1));
        assert_ne!(chat_instance(7, 1), chat_instance(7, 2));
    }
}
