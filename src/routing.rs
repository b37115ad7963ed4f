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

use std::borrow::Cow;

use serde_json::value::RawValue;
use serde_json::Value;

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
#[derive(Debug, Clone)]
pub struct Route<'a> {
    pub key: ScopeKey,
    /// The full Chat or User object as Telegram sent it: borrowed from the
    /// update, unless the update had to be rewritten (a key given twice).
    pub subject: Cow<'a, RawValue>,
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

/// Finds the scope for an update. Reads only the fields it routes by, in
/// place; the rest of the update is skipped, not decoded.
pub fn route(update: &Update) -> Result<Route<'_>, Unroutable> {
    let (kind, value) = update.kind_value().ok_or(Unroutable::Empty)?;
    if !value.starts_with('{') {
        return Err(Unroutable::NotAnObject(kind.to_string()));
    }
    let found = match route_in(kind, value) {
        Ok(found) => found.map(|(key, subject)| Route {
            key,
            subject: Cow::Borrowed(subject),
        }),
        // The rules read an object as a map, whose last value of a key given
        // twice counts: so does this one's, rewritten as that map.
        Err(Repeats) => serde_json::from_str::<Value>(value).ok().and_then(|map| {
            let text = map.to_string();
            let (key, subject) = route_in(kind, &text).ok().flatten()?;
            Some(Route {
                key,
                subject: Cow::Owned(subject.to_owned()),
            })
        }),
    };
    found.ok_or_else(|| Unroutable::NoChatOrUser(kind.to_string()))
}

/// The routing rules on the kind's object (`text`, an object).
fn route_in<'a>(kind: &str, text: &'a str) -> Found<'a> {
    let obj = fields(text)?.unwrap_or_default();
    match kind {
        "business_message" | "edited_business_message" | "deleted_business_messages" => {
            let conn = obj
                .business_connection_id
                .and_then(|c| serde_json::from_str::<String>(c.get()).ok());
            match conn {
                Some(conn) => chat_route(obj.chat, Conversation::Business(conn)),
                None => chat_route(obj.chat, Conversation::Plain),
            }
        }
        "guest_message" => chat_route(obj.chat, Conversation::Guest),
        "callback_query" => or(message_chat(&obj), || user_of(obj.from)),
        "inline_query"
        | "chosen_inline_result"
        | "shipping_query"
        | "pre_checkout_query"
        | "purchased_paid_media" => user_of(obj.from),
        "business_connection" | "managed_bot" | "subscription" => user_of(obj.user),
        "poll_answer" => or(user_of(obj.user), || {
            chat_route(obj.voter_chat, Conversation::Plain)
        }),
        "poll" => Ok(None),
        _ => or(chat_route(obj.chat, Conversation::Plain), || {
            or(message_chat(&obj), || {
                or(user_of(obj.from), || user_of(obj.user))
            })
        }),
    }
}

/// A scope and its Chat or User object, or none; `Err` when an object on
/// the way has a key given twice.
type Found<'a> = Result<Option<(ScopeKey, &'a RawValue)>, Repeats>;

/// An object with a key given twice, which a struct of fields refuses.
struct Repeats;

fn or<'a>(first: Found<'a>, then: impl FnOnce() -> Found<'a>) -> Found<'a> {
    match first? {
        Some(found) => Ok(Some(found)),
        None => then(),
    }
}

/// The fields of an object that route it, kept as they came.
#[derive(Default, serde::Deserialize)]
struct Fields<'a> {
    #[serde(borrow)]
    chat: Option<&'a RawValue>,
    #[serde(borrow)]
    message: Option<&'a RawValue>,
    #[serde(borrow)]
    from: Option<&'a RawValue>,
    #[serde(borrow)]
    user: Option<&'a RawValue>,
    #[serde(borrow)]
    voter_chat: Option<&'a RawValue>,
    #[serde(borrow)]
    business_connection_id: Option<&'a RawValue>,
}

/// `None` when `text` is not an object. A struct also takes an array (by
/// position), hence the check; on an object it fails only for a field
/// given twice, as every field is taken as it is.
fn fields(text: &str) -> Result<Option<Fields<'_>>, Repeats> {
    if !text.starts_with('{') {
        return Ok(None);
    }
    serde_json::from_str(text).map(Some).map_err(|_| Repeats)
}

/// An object's integer `id`.
fn id_of(obj: &RawValue) -> Result<Option<i64>, Repeats> {
    #[derive(serde::Deserialize)]
    struct Id<'a> {
        #[serde(borrow)]
        id: Option<&'a RawValue>,
    }
    if !obj.get().starts_with('{') {
        return Ok(None);
    }
    let id = serde_json::from_str::<Id<'_>>(obj.get()).map_err(|_| Repeats)?;
    Ok(id
        .id
        .and_then(|id| serde_json::from_str::<i64>(id.get()).ok()))
}

fn chat_route(chat: Option<&RawValue>, conversation: Conversation) -> Found<'_> {
    let Some(chat) = chat else { return Ok(None) };
    Ok(id_of(chat)?.map(|id| (ScopeKey::Chat { id, conversation }, chat)))
}

fn message_chat<'a>(obj: &Fields<'a>) -> Found<'a> {
    match obj.message.map(|m| fields(m.get())).transpose()?.flatten() {
        Some(message) => chat_route(message.chat, Conversation::Plain),
        None => Ok(None),
    }
}

fn user_of(user: Option<&RawValue>) -> Found<'_> {
    let Some(user) = user else { return Ok(None) };
    Ok(id_of(user)?.map(|id| (ScopeKey::User { id }, user)))
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
        let u = update(json!({"update_id": 1, "message": {
            "message_id": 5, "chat": {"id": -100, "type": "group", "title": "g"}, "text": "hi"}}));
        let r = route(&u).unwrap();
        assert_eq!(r.key, ScopeKey::chat(-100));
        let subject: Value = serde_json::from_str(r.subject.get()).unwrap();
        assert_eq!(subject["title"], "g");
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
    fn a_key_given_twice_counts_with_its_last_value_as_in_a_map() {
        let text =
            r#"{"update_id":1,"message":{"chat":{"id":1},"text":"a","chat":{"id":2,"id":3}}}"#;
        let u = Update::from_json(text).unwrap();
        let r = route(&u).unwrap();
        assert_eq!(r.key, ScopeKey::chat(3));
        let subject: Value = serde_json::from_str(r.subject.get()).unwrap();
        assert_eq!(subject, json!({"id": 3}));
        // The subject is the object as it came, not a copy re-encoded.
        let u = update(json!({"update_id": 1, "message": {"chat": {"id": 4, "title": "t"}}}));
        let r = route(&u).unwrap();
        assert!(matches!(r.subject, Cow::Borrowed(_)));
        assert_eq!(r.subject.get(), r#"{"id":4,"title":"t"}"#);
    }

    #[test]
    fn keys_written_with_escapes_route_as_the_keys_they_mean() {
        for text in [
            r#"{"update_id":1,"message":{"\u0063hat":{"id":8}}}"#,
            r#"{"update_id":1,"message":{"x\n":0,"chat":{"\u0069d":8}}}"#,
            r#"{"update_id":1,"callback_query":{"message":{"ch\u0061t":{"id":8}},"from":{"id":9}}}"#,
        ] {
            let u = Update::from_json(text).unwrap();
            assert_eq!(route(&u).map(|r| r.key), Ok(ScopeKey::chat(8)), "{text}");
        }
        // One given twice, once with escapes: the last counts, as in a map.
        let text = r#"{"update_id":1,"message":{"chat":{"id":1},"\u0063hat":{"id":2}}}"#;
        let u = Update::from_json(text).unwrap();
        assert_eq!(route(&u).map(|r| r.key), Ok(ScopeKey::chat(2)));
    }

    #[test]
    fn objects_where_the_rules_want_them_and_nothing_else() {
        // An array is not read by position as if it were the object.
        assert_eq!(
            key(json!({"update_id": 1, "message": {"chat": [5]}})),
            Err(Unroutable::NoChatOrUser("message".into()))
        );
        assert_eq!(
            key(json!({"update_id": 1, "message": {"chat": {"id": "5"}}})),
            Err(Unroutable::NoChatOrUser("message".into()))
        );
        assert_eq!(
            key(json!({"update_id": 1, "message": {"chat": {"id": 5.5}, "from": {"id": 6}}})),
            Ok(ScopeKey::User { id: 6 })
        );
        assert_eq!(
            key(json!({"update_id": 1, "message": [{"chat": {"id": 5}}]})),
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
