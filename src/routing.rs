//! Which scope an update belongs to: one pure function, [`route`], used
//! everywhere and tested against a fixture per update kind.
//!
//! The table (also in docs/protocol.md):
//!
//! | update kinds | scope |
//! |---|---|
//! | message, edited_message, channel_post, edited_channel_post, message_reaction, message_reaction_count, my_chat_member, chat_member, chat_join_request, chat_boost, removed_chat_boost | the chat (`chat`) |
//! | business_message, edited_business_message, deleted_business_messages | the chat, in the business connection's own conversation (`business_connection_id`) |
//! | guest_message | the chat, in the guest conversation |
//! | callback_query | its message's chat; the user (`from`) for inline-message buttons |
//! | inline_query, chosen_inline_result, shipping_query, pre_checkout_query, purchased_paid_media, business_connection, managed_bot, subscription | the user (`from` or `user`) |
//! | poll_answer | the user, else `voter_chat` |
//! | poll | none: counted and skipped |
//! | any kind this table does not know | `chat`, else `message.chat`, else `from`/`user`; none: counted and skipped |

use std::fmt;

use serde_json::{Map, Value};

use crate::telegram::Update;

/// Where a chat's updates go when they are not plain chat traffic.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Conversation {
    /// Ordinary chat traffic.
    Plain,
    /// Messages the bot handles on behalf of a business account: same chat id,
    /// but a different conversation, answered with `business_connection_id`.
    Business(String),
    /// Guest messages, answered with answerGuestQuery.
    Guest,
}

/// The identity of a scope: one application instance per key.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ScopeKey {
    Chat { id: i64, conversation: Conversation },
    User { id: i64 },
}

impl ScopeKey {
    pub fn chat(id: i64) -> ScopeKey {
        ScopeKey::Chat {
            id,
            conversation: Conversation::Plain,
        }
    }

    /// The chat id, for chat scopes.
    pub fn chat_id(&self) -> Option<i64> {
        match self {
            ScopeKey::Chat { id, .. } => Some(*id),
            ScopeKey::User { .. } => None,
        }
    }
}

impl fmt::Display for ScopeKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ScopeKey::Chat {
                id,
                conversation: Conversation::Plain,
            } => write!(f, "chat:{id}"),
            ScopeKey::Chat {
                id,
                conversation: Conversation::Business(conn),
            } => write!(f, "business:{conn}:{id}"),
            ScopeKey::Chat {
                id,
                conversation: Conversation::Guest,
            } => write!(f, "guest:{id}"),
            ScopeKey::User { id } => write!(f, "user:{id}"),
        }
    }
}

/// The scope an update goes to, with the Chat or User object the scope is
/// described by (`scope["chat"]` / `scope["user"]`).
#[derive(Debug, Clone, PartialEq)]
pub struct Route {
    pub key: ScopeKey,
    /// The full Chat or User object as Telegram sent it.
    pub subject: Value,
}

/// Why an update goes to no scope.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Unroutable {
    /// The update carries no kind besides `update_id`.
    Empty,
    /// The kind's value is not an object.
    NotAnObject(String),
    /// The kind has neither a chat nor a user (e.g. `poll`).
    NoChatOrUser(String),
}

/// Update kinds this version of the daemon knows; others are "newer" kinds,
/// still routed by the generic rule.
pub const KNOWN_KINDS: &[&str] = &[
    "message",
    "edited_message",
    "channel_post",
    "edited_channel_post",
    "business_connection",
    "business_message",
    "edited_business_message",
    "deleted_business_messages",
    "guest_message",
    "message_reaction",
    "message_reaction_count",
    "inline_query",
    "chosen_inline_result",
    "callback_query",
    "shipping_query",
    "pre_checkout_query",
    "purchased_paid_media",
    "poll",
    "poll_answer",
    "my_chat_member",
    "chat_member",
    "chat_join_request",
    "chat_boost",
    "removed_chat_boost",
    "managed_bot",
    "subscription",
];

/// Finds the scope for an update.
pub fn route(update: &Update) -> Result<Route, Unroutable> {
    let (kind, value) = update.kind().ok_or(Unroutable::Empty)?;
    let Value::Object(obj) = value else {
        return Err(Unroutable::NotAnObject(kind.to_string()));
    };
    let found = match kind {
        "business_message" | "edited_business_message" | "deleted_business_messages" => {
            match obj.get("business_connection_id").and_then(Value::as_str) {
                Some(conn) => chat_in(obj, Conversation::Business(conn.to_string())),
                None => chat_in(obj, Conversation::Plain),
            }
        }
        "guest_message" => chat_in(obj, Conversation::Guest),
        "callback_query" => obj
            .get("message")
            .and_then(Value::as_object)
            .and_then(|m| chat_in(m, Conversation::Plain))
            .or_else(|| user_in(obj, "from")),
        "inline_query"
        | "chosen_inline_result"
        | "shipping_query"
        | "pre_checkout_query"
        | "purchased_paid_media" => user_in(obj, "from"),
        "business_connection" | "managed_bot" | "subscription" => user_in(obj, "user"),
        "poll_answer" => user_in(obj, "user").or_else(|| {
            obj.get("voter_chat")
                .and_then(Value::as_object)
                .and_then(|c| chat_route(c, Conversation::Plain))
        }),
        "poll" => None,
        _ => chat_in(obj, Conversation::Plain)
            .or_else(|| {
                obj.get("message")
                    .and_then(Value::as_object)
                    .and_then(|m| chat_in(m, Conversation::Plain))
            })
            .or_else(|| user_in(obj, "from"))
            .or_else(|| user_in(obj, "user")),
    };
    found.ok_or_else(|| Unroutable::NoChatOrUser(kind.to_string()))
}

fn id_of(obj: &Map<String, Value>) -> Option<i64> {
    obj.get("id").and_then(Value::as_i64)
}

fn chat_route(chat: &Map<String, Value>, conversation: Conversation) -> Option<Route> {
    Some(Route {
        key: ScopeKey::Chat {
            id: id_of(chat)?,
            conversation,
        },
        subject: Value::Object(chat.clone()),
    })
}

fn chat_in(obj: &Map<String, Value>, conversation: Conversation) -> Option<Route> {
    chat_route(obj.get("chat")?.as_object()?, conversation)
}

fn user_in(obj: &Map<String, Value>, field: &str) -> Option<Route> {
    let user = obj.get(field)?.as_object()?;
    Some(Route {
        key: ScopeKey::User { id: id_of(user)? },
        subject: Value::Object(user.clone()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn update(v: Value) -> Update {
        Update::from_value(v).expect("fixture has an update_id")
    }

    fn key(v: Value) -> Result<ScopeKey, Unroutable> {
        route(&update(v)).map(|r| r.key)
    }

    #[test]
    fn message_goes_to_its_chat_with_the_chat_object() {
        let r = route(&update(json!({"update_id": 1, "message": {
            "message_id": 5, "chat": {"id": -100, "type": "group", "title": "g"}, "text": "hi"}})))
        .unwrap();
        assert_eq!(r.key, ScopeKey::chat(-100));
        assert_eq!(r.subject["title"], "g");
        assert_eq!(r.key.to_string(), "chat:-100");
    }

    #[test]
    fn callback_query_prefers_the_message_chat_then_the_user() {
        assert_eq!(
            key(
                json!({"update_id": 1, "callback_query": {"id": "q", "from": {"id": 7},
                "message": {"message_id": 1, "chat": {"id": 42}}}})
            ),
            Ok(ScopeKey::chat(42))
        );
        assert_eq!(
            key(
                json!({"update_id": 1, "callback_query": {"id": "q", "from": {"id": 7},
                "inline_message_id": "x"}})
            ),
            Ok(ScopeKey::User { id: 7 })
        );
    }

    #[test]
    fn business_messages_do_not_mix_with_the_plain_chat() {
        let k = key(json!({"update_id": 1, "business_message": {"message_id": 1,
            "business_connection_id": "bc1", "chat": {"id": 42}}}))
        .unwrap();
        assert_eq!(k.to_string(), "business:bc1:42");
        assert_ne!(k, ScopeKey::chat(42));
    }

    #[test]
    fn user_only_kinds_go_to_the_user() {
        for kind in [
            "inline_query",
            "chosen_inline_result",
            "shipping_query",
            "pre_checkout_query",
            "purchased_paid_media",
        ] {
            assert_eq!(
                key(json!({"update_id": 1, kind: {"id": "x", "from": {"id": 9}}})),
                Ok(ScopeKey::User { id: 9 }),
                "{kind}"
            );
        }
        assert_eq!(
            key(
                json!({"update_id": 1, "poll_answer": {"poll_id": "p", "user": {"id": 3}, "option_ids": [0]}})
            ),
            Ok(ScopeKey::User { id: 3 })
        );
        assert_eq!(
            key(
                json!({"update_id": 1, "poll_answer": {"poll_id": "p", "voter_chat": {"id": -5}, "option_ids": [0]}})
            ),
            Ok(ScopeKey::chat(-5))
        );
    }

    #[test]
    fn poll_and_empty_updates_are_unroutable() {
        assert_eq!(
            key(json!({"update_id": 1, "poll": {"id": "p", "question": "?"}})),
            Err(Unroutable::NoChatOrUser("poll".into()))
        );
        assert_eq!(key(json!({"update_id": 1})), Err(Unroutable::Empty));
        assert_eq!(
            key(json!({"update_id": 1, "message": "text"})),
            Err(Unroutable::NotAnObject("message".into()))
        );
    }

    #[test]
    fn a_newer_kind_with_a_chat_or_user_is_still_routed() {
        assert_eq!(
            key(json!({"update_id": 1, "future_thing": {"chat": {"id": 11}}})),
            Ok(ScopeKey::chat(11))
        );
        assert_eq!(
            key(json!({"update_id": 1, "future_thing": {"from": {"id": 12}}})),
            Ok(ScopeKey::User { id: 12 })
        );
        assert_eq!(
            key(json!({"update_id": 1, "future_thing": {"x": 1}})),
            Err(Unroutable::NoChatOrUser("future_thing".into()))
        );
    }
}
