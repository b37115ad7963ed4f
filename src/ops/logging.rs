//! Logging setup: env_logger with one line per record, module targets, and
//! every registered secret (the bot token) masked in every line, whichever
//! crate wrote it.
//!
//! Two formats (`log.format`): `text`, `timestamp LEVEL target] message`, and
//! `json`, one object per line with `timestamp`, `level`, `target`,
//! `message`, and `fields`: the message's `key=value` pairs, numbers as
//! numbers. Secrets are masked before either is written.

use std::io::Write;

pub use crate::settings::LogFormat;
use std::sync::RwLock;

/// Strings that must never reach the log.
static SECRETS: RwLock<Vec<String>> = RwLock::new(Vec::new());

/// Masks `secret` in every log line from now on.
pub fn register_secret(secret: &str) {
    if secret.is_empty() {
        return;
    }
    // A poisoned lock only means another thread panicked while pushing; the
    // list itself is still a valid Vec.
    let mut secrets = SECRETS.write().unwrap_or_else(|e| e.into_inner());
    if !secrets.iter().any(|s| s == secret) {
        secrets.push(secret.to_string());
    }
}

/// `text` with every registered secret replaced by `<redacted>`.
pub fn redact(text: &str) -> String {
    let secrets = SECRETS.read().unwrap_or_else(|e| e.into_inner());
    let mut out = text.to_string();
    for s in secrets.iter() {
        if out.contains(s.as_str()) {
            out = out.replace(s.as_str(), "<redacted>");
        }
    }
    out
}

/// Installs the text logger. `RUST_LOG`, when set, wins over `level` and
/// allows per-module filters.
pub fn init(level: log::LevelFilter) {
    init_with(level, LogFormat::Text);
}

/// Installs the logger in `format`.
pub fn init_with(level: log::LevelFilter, format: LogFormat) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    // actix-server's lines ("starting 1 workers", "starting service: ...")
    // repeat what asgigramd says of its own servers; kept for debugging.
    let server = if level >= log::LevelFilter::Debug {
        level
    } else {
        level.min(log::LevelFilter::Warn)
    };
    builder.filter_module("actix_server", server);
    if let Ok(filters) = std::env::var("RUST_LOG") {
        builder.parse_filters(&filters);
    }
    match format {
        LogFormat::Text => builder.format(|buf, record| {
            let ts = buf.timestamp_millis();
            let message = redact(&record.args().to_string());
            writeln!(
                buf,
                "{ts} {:<5} {}] {message}",
                record.level(),
                record.target()
            )
        }),
        LogFormat::Json => builder.format(|buf, record| {
            let ts = buf.timestamp_millis().to_string();
            let message = redact(&record.args().to_string());
            let line = json_line(&ts, record.level(), record.target(), &message);
            writeln!(buf, "{line}")
        }),
    };
    // A second init (tests, --check then run) keeps the first logger.
    let _ = builder.try_init();
}

/// One JSON log line. `message` must already be redacted; the target is
/// redacted here (a secret in a module path is unlikely, but cheap to rule out).
pub fn json_line(timestamp: &str, level: log::Level, target: &str, message: &str) -> String {
    serde_json::json!({
        "timestamp": timestamp,
        "level": level.as_str(),
        "target": redact(target),
        "message": message,
        "fields": fields(message),
    })
    .to_string()
}

/// The `key=value` pairs of a log message: a key is a lowercase identifier
/// (dots allowed) at the start of a word; the value runs to the next space,
/// without trailing `;`, `,`, `:` or `)`. Integers and decimals become
/// numbers. The first occurrence of a key wins.
pub fn fields(message: &str) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for word in message.split_whitespace() {
        let Some((key, value)) = word.split_once('=') else {
            continue;
        };
        let key_ok = key.starts_with(|c: char| c.is_ascii_lowercase())
            && key
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '.');
        let value = value.trim_end_matches([';', ',', ':', ')']);
        if !key_ok || value.is_empty() || out.contains_key(key) {
            continue;
        }
        let value = if let Ok(n) = value.parse::<i64>() {
            serde_json::Value::from(n)
        } else if let Some(f) = value
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite() && value.contains('.'))
        {
            serde_json::Value::from(f)
        } else {
            serde_json::Value::from(value)
        };
        out.insert(key.to_string(), value);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_lines_carry_the_fields_and_no_secret() {
        register_secret("777:JSONSECRET");
        let message = redact("worker=0 pid=4242 died (exit status 1); url=http://x/bot777:JSONSECRET/getMe delay=1.5 scope=chat:-100");
        let line = json_line(
            "2026-01-01T00:00:00.000Z",
            log::Level::Warn,
            "asgigramd::x",
            &message,
        );
        assert!(!line.contains("JSONSECRET"));
        let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON object");
        assert_eq!(v["level"], "WARN");
        assert_eq!(v["target"], "asgigramd::x");
        assert_eq!(v["fields"]["worker"], 0);
        assert_eq!(v["fields"]["pid"], 4242);
        assert_eq!(v["fields"]["delay"], 1.5);
        assert_eq!(v["fields"]["scope"], "chat:-100");
        assert_eq!(v["fields"]["url"], "http://x/bot<redacted>/getMe");
        assert!(v["message"]
            .as_str()
            .is_some_and(|m| m.starts_with("worker=0 pid=4242")));
    }

    #[test]
    fn registered_secrets_are_masked() {
        register_secret("123:TOKENVALUE");
        let line = redact("GET /bot123:TOKENVALUE/getUpdates failed");
        assert_eq!(line, "GET /bot<redacted>/getUpdates failed");
        assert_eq!(redact("nothing here"), "nothing here");
    }
}
