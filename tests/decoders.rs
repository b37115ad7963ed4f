//! Property tests for the two decoders that take outside input: updates from
//! the Bot API and frames from worker processes. Whatever arrives, they
//! answer with a value or an error, never a panic; and an update's event,
//! written from its bytes, is the JSON map it would have been built as.

use asgigramd::bridge::FromWorker;
use asgigramd::routing::route;
use asgigramd::telegram::{parse_envelope, Update};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

/// Any JSON value, a few levels deep, with keys the decoders look for mixed
/// into random ones so the interesting paths are reached.
fn json_value() -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("update_id".to_string()),
        Just("chat".to_string()),
        Just("id".to_string()),
        Just("from".to_string()),
        Just("user".to_string()),
        Just("message".to_string()),
        Just("business_connection_id".to_string()),
        Just("op".to_string()),
        Just("sid".to_string()),
        Just("seq".to_string()),
        "[a-z_]{1,12}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        ".{0,20}".prop_map(Value::String),
        prop_oneof![
            Just("received"),
            Just("send"),
            Just("ended"),
            Just("ready"),
            Just("message")
        ]
        .prop_map(|s| Value::String(s.into())),
    ];
    leaf.prop_recursive(4, 64, 8, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::vec((key.clone(), inner), 0..6)
                .prop_map(|kv| Value::Object(kv.into_iter().collect::<Map<_, _>>())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    #[test]
    fn worker_frames_of_random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
        let _ = FromWorker::decode(&bytes);
    }

    #[test]
    fn worker_frames_of_random_json_never_panic(value in json_value()) {
        let _ = FromWorker::decode(value.to_string().as_bytes());
    }

    #[test]
    fn random_updates_are_routed_or_refused_never_panic(body in json_value(), id in any::<i64>(), kind in "[a-z_]{1,20}") {
        for candidate in [body.clone(), json!({"update_id": id, kind.clone(): body})] {
            if let Ok(update) = Update::from_value(candidate) {
                let _ = update.kind();
                let _ = route(&update);
            }
        }
    }

    #[test]
    fn an_update_s_event_is_the_map_it_was_before_it_stayed_in_bytes(body in json_value(), id in any::<i64>(), kind in "[a-z_]{1,20}") {
        prop_assume!(kind != "update_id");
        let text = json!({"update_id": id, kind.clone(): body}).to_string();
        let update = Update::from_json(&text).expect("an object with an integer update_id");
        // The map as it was built from the same text (a float's digits
        // decode to the same number both ways).
        let mut map: Value = serde_json::from_str(&text).expect("written just above");
        let mut written = Vec::new();
        match map[&kind].take() {
            Value::Object(mut fields) => {
                prop_assert!(update.write_event(&mut written));
                fields.insert("type".into(), json!(format!("telegram.{kind}")));
                fields.insert("update_id".into(), json!(id));
                let event: Value = serde_json::from_slice(&written).expect("the event is JSON");
                prop_assert_eq!(event, Value::Object(fields));
            }
            _ => prop_assert!(!update.write_event(&mut written)),
        }
    }

    #[test]
    fn random_bot_api_answers_never_panic(status in 100u16..600, body in json_value(), raw in prop::collection::vec(any::<u8>(), 0..200)) {
        let _ = parse_envelope(status, body.to_string().as_bytes());
        let _ = parse_envelope(status, &raw);
        let wrapped = json!({"ok": false, "error_code": status, "description": "x", "parameters": body});
        let _ = parse_envelope(status, wrapped.to_string().as_bytes());
    }
}

#[test]
fn huge_and_truncated_frames_are_errors() {
    let huge = format!(
        r#"{{"op":"send","sid":1,"event":{{"text":"{}"}}}}"#,
        "x".repeat(5_000_000)
    );
    assert!(matches!(
        FromWorker::decode(huge.as_bytes()),
        Ok(FromWorker::Send { .. })
    ));
    let full = br#"{"op":"received","sid":1,"seq":2}"#;
    for cut in 0..full.len() {
        assert!(
            FromWorker::decode(&full[..cut]).is_err(),
            "prefix of {cut} bytes"
        );
    }
    assert!(FromWorker::decode(br#"{"op":"received","sid":-1,"seq":2}"#).is_err());
    assert!(FromWorker::decode(br#"{"op":"received","sid":1e400,"seq":2}"#).is_err());
}
