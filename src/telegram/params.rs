//! A Bot API call's parameters as the JSON text of an object, with where
//! each of its top-level fields is in that text.
//!
//! The outgoing path reads only a few parameters (`chat_id` for the Sender's
//! lanes, `media` and `allow_paid_broadcast` for what a message costs) and
//! carries the rest from the app's event to the journal and into the request
//! body unchanged. Decoding the event into a `Map` tree and writing that
//! tree out twice, for the journal and for the body, was more work per reply
//! than reading the few fields where they are.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use serde::de::{self, Deserializer, MapAccess, Visitor};

use super::Key;
use serde::Deserialize;
use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// The parameters of one call: always a JSON object, whose top-level keys
/// are unique (an object that gave a key twice is kept as a JSON reader
/// takes it, the last value winning).
#[derive(Clone)]
pub struct Params {
    text: String,
    /// Each field's key (as written, without its quotes) and value.
    fields: Vec<(Range<usize>, Range<usize>)>,
}

/// Text that is not a JSON object.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("call parameters are not a JSON object")]
pub struct NotAnObject;

impl Params {
    /// No parameters.
    pub fn new() -> Params {
        Params {
            text: "{}".to_string(),
            fields: Vec::new(),
        }
    }

    pub fn from_map(map: &Map<String, Value>) -> Params {
        let mut params = Params::new();
        for (key, value) in map {
            params.push(key, value);
        }
        params
    }

    /// The object `text` is, or [`NotAnObject`].
    pub fn from_json(text: &str) -> Result<Params, NotAnObject> {
        match scan(text.trim()) {
            Scanned::Fields(fields) => Ok(Params::from_fields(fields.into_iter())),
            Scanned::Irregular => serde_json::from_str::<Map<String, Value>>(text)
                .map(|map| Params::from_map(&map))
                .map_err(|_| NotAnObject),
            Scanned::NotAnObject => Err(NotAnObject),
        }
    }

    /// The fields of a scanned object, written anew without the spacing
    /// between them.
    fn from_fields<'a>(fields: impl Iterator<Item = (&'a str, &'a str)> + Clone) -> Params {
        let size = fields
            .clone()
            .map(|(k, v)| k.len() + v.len() + 4)
            .sum::<usize>();
        // No room kept for the defaults a scope adds (`chat_id`, ...): 48
        // spare bytes per call saved moving the text once, but cost 1.5 MB
        // of the burst's peak RSS, where 20,000 calls wait at once.
        let mut params = Params {
            text: String::with_capacity(size + 2),
            fields: Vec::with_capacity(fields.clone().count()),
        };
        params.text.push('{');
        for (key, value) in fields {
            params.append_raw(key, value);
        }
        params.text.push('}');
        params
    }

    /// Adds a field, `key` written as JSON writes it.
    fn push(&mut self, key: &str, value: &Value) {
        use std::fmt::Write as _;
        self.text.pop();
        // The daemon's own keys and values (a chat's id, a file_id) need no
        // escapes: written as they are, without a detour through serde.
        // Writing into a String cannot fail, nor can serializing a string or
        // a JSON value.
        let k = if needs_no_escapes(key) {
            self.open_field(key)
        } else {
            let quoted = serde_json::to_string(key).expect("a string serializes");
            self.open_field(&quoted[1..quoted.len() - 1])
        };
        let v = self.text.len();
        match value {
            Value::String(s) if needs_no_escapes(s) => {
                self.text.push('"');
                self.text.push_str(s);
                self.text.push('"');
            }
            Value::Number(n) => {
                let _ = write!(self.text, "{n}");
            }
            other => self
                .text
                .push_str(&serde_json::to_string(other).expect("a JSON value serializes")),
        }
        self.fields.push((k, v..self.text.len()));
        self.text.push('}');
    }

    /// Writes `"key":value` at the end of the text (the caller writes the
    /// braces), and notes where it went.
    fn append_raw(&mut self, key: &str, value: &str) {
        let k = self.open_field(key);
        let v = self.text.len();
        self.text.push_str(value);
        self.fields.push((k, v..self.text.len()));
    }

    /// Writes the separator and `"key":`; where the key went.
    fn open_field(&mut self, key: &str) -> Range<usize> {
        if !self.fields.is_empty() {
            self.text.push(',');
        }
        self.text.push('"');
        let k = self.text.len();
        self.text.push_str(key);
        let k = k..self.text.len();
        self.text.push_str("\":");
        k
    }

    /// The JSON text of the object.
    pub fn json(&self) -> &str {
        &self.text
    }

    /// Each field's key as written (without its quotes) and its value's
    /// text, in order.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.fields
            .iter()
            .map(|(k, v)| (&self.text[k.clone()], &self.text[v.clone()]))
    }

    /// The JSON text of `key`'s value. Keys are compared as written, which
    /// is exact for any key without escapes (every Bot API parameter).
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| &self.text[k.clone()] == key)
            .map(|(_, v)| &self.text[v.clone()])
    }

    /// `key`'s value as a JSON tree.
    pub fn value(&self, key: &str) -> Option<Value> {
        // The text was read or written as JSON: its values parse.
        self.get(key).and_then(|v| serde_json::from_str(v).ok())
    }

    /// Sets `key` to `value` where it has no value yet.
    pub fn insert_absent(&mut self, key: &str, value: &Value) {
        if self.get(key).is_none() {
            self.push(key, value);
        }
    }

    /// Sets `key` to `value`, in place of any value it had.
    pub fn set(&mut self, key: &str, value: &Value) {
        if self.get(key).is_none() {
            self.push(key, value);
            return;
        }
        let mut map = self.to_map();
        map.insert(key.to_string(), value.clone());
        *self = Params::from_map(&map);
    }

    /// As a JSON tree, for what reads every parameter (a multipart body,
    /// the cluster's stored calls).
    pub fn to_map(&self) -> Map<String, Value> {
        // Built as a JSON object by every constructor.
        serde_json::from_str(&self.text).unwrap_or_default()
    }

    /// Whether any value holds a file (`{"$bytes": ...}`, see [`super::upload`]).
    pub fn has_files(&self) -> bool {
        // Only text that names `$bytes`, or could through an escape, can.
        (self.text.contains("\"$bytes\"") || self.text.contains("\\u"))
            && super::upload::has_files(&Value::Object(self.to_map()))
    }

    /// The number of elements of `key`'s value when it is an array.
    pub fn array_len(&self, key: &str) -> Option<usize> {
        let value = self.get(key)?;
        if !value.starts_with('[') {
            return None;
        }
        serde_json::from_str::<Vec<de::IgnoredAny>>(value)
            .ok()
            .map(|items| items.len())
    }

    /// Whether `key`'s value is `true`.
    pub fn is_true(&self, key: &str) -> bool {
        self.get(key) == Some("true")
    }
}

/// Equal when they hold the same parameters, however written.
impl PartialEq for Params {
    fn eq(&self, other: &Params) -> bool {
        self.text == other.text || self.to_map() == other.to_map()
    }
}

impl fmt::Debug for Params {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

/// Whether JSON writes `s` between quotes as it is.
fn needs_no_escapes(s: &str) -> bool {
    s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\')
}

/// What [`scan`] found.
enum Scanned<'a> {
    /// An object's fields, keys without escapes and none given twice.
    Fields(Vec<(&'a str, &'a str)>),
    /// An object whose keys need decoding (escapes) or repeat.
    Irregular,
    NotAnObject,
}

/// Reads an object's top level, each value kept as it is written.
fn scan(text: &str) -> Scanned<'_> {
    if !text.starts_with('{') {
        return Scanned::NotAnObject;
    }
    let Ok(TopLevel(fields)) = serde_json::from_str::<TopLevel<'_>>(text) else {
        return Scanned::NotAnObject;
    };
    let Some(fields) = fields
        .into_iter()
        .map(|(k, v)| match k {
            Cow::Borrowed(k) => Some((k, v.get())),
            Cow::Owned(_) => None,
        })
        .collect::<Option<Vec<_>>>()
    else {
        return Scanned::Irregular;
    };
    if repeats(&fields) {
        return Scanned::Irregular;
    }
    Scanned::Fields(fields)
}

/// Whether a key is given twice.
fn repeats(fields: &[(&str, &str)]) -> bool {
    // Quadratic, but a call's parameters are few; a long list is checked
    // through a set.
    if fields.len() <= 16 {
        return fields
            .iter()
            .enumerate()
            .any(|(i, (k, _))| fields[..i].iter().any(|(seen, _)| seen == k));
    }
    let mut seen = foldhash::HashSet::default();
    !fields.iter().all(|(k, _)| seen.insert(*k))
}

/// An object's fields in order; a key is owned where it had escapes (it
/// could not be borrowed as written).
struct TopLevel<'a>(Vec<(Cow<'a, str>, &'a RawValue)>);

impl<'de> Deserialize<'de> for TopLevel<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Fields;
        impl<'de> Visitor<'de> for Fields {
            type Value = TopLevel<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut fields = Vec::with_capacity(map.size_hint().unwrap_or(4));
                while let Some(Key(key)) = map.next_key()? {
                    fields.push((key, map.next_value()?));
                }
                Ok(TopLevel(fields))
            }
        }
        d.deserialize_map(Fields)
    }
}

/// An app's event read as [`scan`] reads parameters: its fields in order,
/// or `None` for anything [`scan`] would not take as regular (the caller
/// then reads it as a tree).
pub fn fields_of(text: &str) -> Option<Vec<(&str, &str)>> {
    match scan(text.trim()) {
        Scanned::Fields(fields) => Some(fields),
        Scanned::Irregular | Scanned::NotAnObject => None,
    }
}

/// The parameters made of `fields` (see [`fields_of`]), those `skip` names
/// left out.
pub fn params_from(fields: &[(&str, &str)], skip: &[&str]) -> Params {
    Params::from_fields(fields.iter().filter(|(k, _)| !skip.contains(k)).copied())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        match v {
            Value::Object(m) => m,
            _ => unreachable!("tests pass JSON objects"),
        }
    }

    #[test]
    fn fields_are_read_where_they_are_written() {
        let p = Params::from_json(r#" { "chat_id" : -100 , "text":"a \"b\"", "media": [1, {"x": 2}], "allow_paid_broadcast": true } "#)
            .expect("an object");
        assert_eq!(p.get("chat_id"), Some("-100"));
        assert_eq!(p.value("text"), Some(json!("a \"b\"")));
        assert_eq!(p.array_len("media"), Some(2));
        assert_eq!(p.array_len("text"), None);
        assert!(p.is_true("allow_paid_broadcast"));
        assert!(!p.is_true("chat_id"));
        assert_eq!(p.get("missing"), None);
        assert_eq!(
            p.to_map(),
            map(
                json!({"chat_id": -100, "text": "a \"b\"", "media": [1, {"x": 2}], "allow_paid_broadcast": true})
            )
        );
    }

    #[test]
    fn a_key_given_twice_keeps_its_last_value_as_a_json_reader_does() {
        let p =
            Params::from_json(r#"{"chat_id": 1, "text": "a", "chat_id": 2}"#).expect("an object");
        assert_eq!(p.get("chat_id"), Some("2"));
        assert_eq!(p.to_map(), map(json!({"chat_id": 2, "text": "a"})));
        assert_eq!(p.json().matches("chat_id").count(), 1, "{}", p.json());
    }

    #[test]
    fn a_key_written_with_escapes_is_found_by_its_meaning() {
        let p = Params::from_json(r#"{"chat\u005fid": 7}"#).expect("an object");
        assert_eq!(p.get("chat_id"), Some("7"));
    }

    #[test]
    fn only_objects_are_parameters() {
        for text in ["[1]", "\"x\"", "3", "null", "{", "{\"a\":}", ""] {
            assert_eq!(Params::from_json(text), Err(NotAnObject), "{text}");
        }
        assert_eq!(
            Params::from_json(" {} ").expect("empty object").json(),
            "{}"
        );
    }

    #[test]
    fn inserting_and_setting_keep_the_text_an_object_with_unique_keys() {
        let mut p = Params::new();
        p.insert_absent("chat_id", &json!(5));
        p.insert_absent("chat_id", &json!(6));
        p.insert_absent("text", &json!("hi"));
        assert_eq!(p.json(), r#"{"chat_id":5,"text":"hi"}"#);
        p.set("chat_id", &json!(-1009));
        assert_eq!(p.get("chat_id"), Some("-1009"));
        assert_eq!(p.to_map(), map(json!({"chat_id": -1009, "text": "hi"})));
        let from_map = Params::from_map(&map(json!({"a\"b": 1, "c": [true]})));
        assert_eq!(
            serde_json::from_str::<Value>(from_map.json()).expect("valid JSON"),
            json!({"a\"b": 1, "c": [true]})
        );
        assert_eq!(from_map.get("c"), Some("[true]"));
    }

    #[test]
    fn files_are_found_however_their_marker_is_written() {
        let plain = Params::from_json(r#"{"photo": {"$bytes": "aGk="}}"#).expect("an object");
        assert!(plain.has_files());
        let escaped =
            Params::from_json(r#"{"photo": {"\u0024bytes": "aGk="}}"#).expect("an object");
        assert!(escaped.has_files());
        let none = Params::from_json(r#"{"text": "\"$bytes\" is only text"}"#).expect("an object");
        assert!(!none.has_files());
    }

    #[test]
    fn many_fields_are_checked_for_repeats_too() {
        let mut text = String::from("{");
        for i in 0..40 {
            text.push_str(&format!("\"k{i}\":{i},"));
        }
        text.push_str("\"k3\":\"last\"}");
        let p = Params::from_json(&text).expect("an object");
        assert_eq!(p.get("k3"), Some("\"last\""));
        assert_eq!(p.to_map().len(), 40);
    }
}
