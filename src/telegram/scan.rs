//! The top level of an object in JSON text that serde_json has already
//! checked: each field's key as written and its value's text, found by
//! skipping over strings and brackets.
//!
//! serde_json reads a struct of borrowed raw values in one pass as well, but
//! with a general reader's checks around every key and value: an update's
//! `update_id` and kind cost about 3,900 instructions that way and about
//! 2,300 this way (docs/performance.md). This reader trusts the text to be
//! well-formed and only stops early (returns fewer fields) where it is not.

/// The fields of the object `text`, in order; empty unless `text` starts
/// with `{`. A key is given as written between its quotes, escapes and all:
/// a caller that compares keys treats one with a `\` as unknown and reads
/// the object another way.
pub fn fields(text: &str) -> Fields<'_> {
    let at = if text.starts_with('{') { 1 } else { text.len() };
    Fields { text, at }
}

pub struct Fields<'a> {
    text: &'a str,
    /// Where to look for the next key.
    at: usize,
}

impl<'a> Iterator for Fields<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<(&'a str, &'a str)> {
        let bytes = self.text.as_bytes();
        let open = skip_space(bytes, self.at)?;
        if bytes[open] != b'"' {
            self.at = bytes.len();
            return None;
        }
        let key_end = string_end(bytes, open)?;
        let colon = skip_space(bytes, key_end)?;
        if bytes[colon] != b':' {
            self.at = bytes.len();
            return None;
        }
        let start = skip_space(bytes, colon + 1)?;
        let end = value_end(bytes, start)?;
        let after = skip_space(bytes, end)?;
        // A comma leads to the next field; the closing brace (or anything
        // else) ends the object.
        self.at = if bytes[after] == b',' {
            after + 1
        } else {
            bytes.len()
        };
        // Every index above is at an ASCII byte of valid UTF-8 (a quote, a
        // bracket, a delimiter), so each slice is on character boundaries.
        Some((&self.text[open + 1..key_end - 1], &self.text[start..end]))
    }
}

/// The first byte at or after `at` that is not JSON whitespace.
fn skip_space(bytes: &[u8], at: usize) -> Option<usize> {
    (at..bytes.len()).find(|&i| !matches!(bytes[i], b' ' | b'\t' | b'\n' | b'\r'))
}

/// Just past the string whose opening quote is at `open`.
fn string_end(bytes: &[u8], open: usize) -> Option<usize> {
    let mut at = open + 1;
    loop {
        at += memchr::memchr2(b'"', b'\\', bytes.get(at..)?)?;
        if bytes[at] == b'"' {
            return Some(at + 1);
        }
        // An escape: the next byte is escaped (a `\uXXXX`'s digits need no
        // care, they are neither quote nor backslash).
        at += 2;
    }
}

/// Just past the value that starts at `start`.
fn value_end(bytes: &[u8], start: usize) -> Option<usize> {
    match bytes.get(start)? {
        b'"' => string_end(bytes, start),
        b'{' | b'[' => {
            // Byte by byte: the strings and brackets of an update lie a few
            // bytes apart, closer than a vector search pays for.
            let mut depth = 0usize;
            let mut at = start;
            while at < bytes.len() {
                match bytes[at] {
                    b'"' => {
                        at = string_end(bytes, at)?;
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return Some(at + 1);
                        }
                    }
                    _ => {}
                }
                at += 1;
            }
            None
        }
        // A number, `true`, `false` or `null`.
        _ => Some(
            (start..bytes.len())
                .find(|&i| matches!(bytes[i], b',' | b'}' | b']' | b' ' | b'\t' | b'\n' | b'\r'))
                .unwrap_or(bytes.len()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::value::RawValue;
    use serde_json::Value;

    /// serde_json's reading of the same top level (nothing for anything
    /// but an object).
    fn by_serde(text: &str) -> Vec<(String, String)> {
        struct Pairs(Vec<(String, String)>);
        impl<'de> serde::Deserialize<'de> for Pairs {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> serde::de::Visitor<'de> for V {
                    type Value = Pairs;
                    fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                        f.write_str("an object")
                    }
                    fn visit_map<A: serde::de::MapAccess<'de>>(
                        self,
                        mut m: A,
                    ) -> Result<Pairs, A::Error> {
                        let mut out = Vec::new();
                        while let Some(k) = m.next_key::<String>()? {
                            let v: &RawValue = m.next_value()?;
                            out.push((k, v.get().to_string()));
                        }
                        Ok(Pairs(out))
                    }
                }
                d.deserialize_map(V)
            }
        }
        serde_json::from_str::<Pairs>(text).map_or_else(|_| Vec::new(), |p| p.0)
    }

    fn by_scan(text: &str) -> Vec<(String, String)> {
        fields(text)
            .map(|(k, v)| {
                // Keys decoded the way serde does, to compare.
                let key = serde_json::from_str::<String>(&format!("\"{k}\"")).expect("a key");
                (key, v.to_string())
            })
            .collect()
    }

    #[test]
    fn fields_of_hand_written_objects() {
        for text in [
            r#"{}"#,
            r#" { } "#,
            r#"{"a":1}"#,
            r#"{ "a" : 1 , "b" : [1, {"c": "}"}], "d": "x\"y\\", "e": {"f": []} }"#,
            r#"{"update_id":5,"message":{"text":"{[\"]}","chat":{"id":-1}},"z":null}"#,
            r#"{"k\"ey": true, "k\\": false, "\u00e9": -1.5e3}"#,
            "{\"multi\u{e9}\u{1F600}\":\"\u{1F600}\",\"n\":\n0\n}",
        ] {
            assert_eq!(by_scan(text), by_serde(text), "{text}");
        }
        assert_eq!(fields("[1, 2]").count(), 0);
        assert_eq!(fields("\"a\"").count(), 0);
        assert_eq!(fields("").count(), 0);
    }

    fn json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::Bool),
            any::<i64>().prop_map(Value::from),
            any::<f64>()
                .prop_filter("finite", |f| f.is_finite())
                .prop_map(Value::from),
            ".{0,8}".prop_map(Value::String),
        ];
        leaf.prop_recursive(4, 32, 6, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..5).prop_map(Value::Array),
                prop::collection::vec((".{0,6}", inner), 0..5)
                    .prop_map(|kv| Value::Object(kv.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #[test]
        fn the_scan_finds_what_serde_finds(
            pairs in prop::collection::vec((".{0,6}", json()), 0..6),
            pretty in any::<bool>(),
        ) {
            let object = Value::Object(pairs.into_iter().collect());
            let text = if pretty {
                serde_json::to_string_pretty(&object).expect("serializes")
            } else {
                object.to_string()
            };
            prop_assert_eq!(by_scan(&text), by_serde(&text));
        }

        #[test]
        fn an_update_read_in_place_is_the_update_serde_reads(
            id in any::<i64>(),
            pairs in prop::collection::vec(("[a-z_]{0,4}|update_id", json()), 0..5),
            repeat in any::<bool>(),
        ) {
            let mut text = format!("{{\"update_id\":{id}");
            for (k, v) in &pairs {
                text.push_str(&format!(",{}:{v}", Value::from(k.as_str())));
            }
            if repeat {
                if let Some((k, v)) = pairs.first() {
                    text.push_str(&format!(",{}:{v}", Value::from(k.as_str())));
                }
            }
            text.push('}');
            let serde = super::super::Update::from_json(&text);
            match super::super::Update::from_checked(&text) {
                Some(fast) => {
                    let serde = serde.expect("serde reads what the scan reads");
                    prop_assert_eq!(fast.id, serde.id);
                    prop_assert_eq!(fast.kind_value(), serde.kind_value());
                    prop_assert_eq!(fast.json(), serde.json());
                }
                // Only where an update_id is not an integer.
                None => prop_assert!(
                    serde.is_err(),
                    "the scan gave up on {}, serde read it",
                    text
                ),
            }
        }
    }
}
