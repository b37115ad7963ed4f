//! Logging setup: env_logger with one line per record, module targets, and
//! every registered secret (the bot token) masked in every line, whichever
//! crate wrote it.

use std::io::Write;
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

/// Installs the logger. `RUST_LOG`, when set, wins over `level` and allows
/// per-module filters.
pub fn init(level: log::LevelFilter) {
    let mut builder = env_logger::Builder::new();
    builder.filter_level(level);
    if let Ok(filters) = std::env::var("RUST_LOG") {
        builder.parse_filters(&filters);
    }
    builder.format(|buf, record| {
        let ts = buf.timestamp_millis();
        let message = redact(&record.args().to_string());
        writeln!(
            buf,
            "{ts} {:<5} {}] {message}",
            record.level(),
            record.target()
        )
    });
    // A second init (tests, --check then run) keeps the first logger.
    let _ = builder.try_init();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registered_secrets_are_masked() {
        register_secret("123:TOKENVALUE");
        let line = redact("GET /bot123:TOKENVALUE/getUpdates failed");
        assert_eq!(line, "GET /bot<redacted>/getUpdates failed");
        assert_eq!(redact("nothing here"), "nothing here");
    }
}
