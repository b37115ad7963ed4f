//! Typed settings, read in layers and validated before anything starts.
//!
//! Layers, later ones winning: the built-in defaults (`config/default.toml`,
//! compiled in), the TOML file given with `--config`, then environment variables
//! `ASGIGRAM_<SECTION>__<KEY>`. Every key is known: an unknown one, a malformed
//! value or a missing token is a [`SettingsError`] that names the key.

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use config::{Config, Environment, File, FileFormat};
use serde::Deserialize;

/// The built-in defaults; also the reference for every key.
pub const DEFAULTS: &str = include_str!("../config/default.toml");

/// Telegram refuses long-poll timeouts above this many seconds.
pub const MAX_POLL_TIMEOUT: u64 = 50;

/// The longest duration any key accepts, in seconds (365 days): far beyond
/// any useful timeout, and far enough from `Duration`'s and `Instant`'s
/// limits that adding two of them cannot overflow.
pub const MAX_SECONDS: u64 = 365 * 24 * 3600;

/// The largest value of the counts that have no natural limit
/// (`scopes.max_scopes`, `sender.queue_limit`, `journal.max_undelivered`).
pub const MAX_COUNT: u64 = 1_000_000_000;

/// Prefix of the environment variables that override settings.
pub const ENV_PREFIX: &str = "ASGIGRAM";

/// Defines a secret of the settings: `Debug` and `Display` print it
/// redacted, and the only way to the value is `expose`, whose result is
/// never logged.
macro_rules! secret {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq)]
        pub struct $name(String);

        impl $name {
            pub fn new(value: impl Into<String>) -> Self {
                $name(value.into())
            }

            /// The secret itself, for where it must go. Never log the result.
            pub fn expose(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(concat!(stringify!($name), "(<redacted>)"))
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("<redacted>")
            }
        }
    };
}

secret!(
    /// The bot token, in request URLs.
    BotToken
);

secret!(
    /// The bearer token other programs present to `/v1/...` on the HTTP
    /// endpoint (`http.api_token`, `http.api_token_file`).
    ApiToken
);

/// Whether the ASGI lifespan protocol is used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LifespanMode {
    Auto,
    On,
    Off,
}

impl LifespanMode {
    pub fn as_str(self) -> &'static str {
        match self {
            LifespanMode::Auto => "auto",
            LifespanMode::On => "on",
            LifespanMode::Off => "off",
        }
    }
}

/// Everything the daemon is configured with, validated.
#[derive(Debug, Clone)]
pub struct Settings {
    pub telegram: TelegramSettings,
    pub app: AppSettings,
    pub scopes: ScopeSettings,
    pub sender: SenderSettings,
    pub journal: JournalSettings,
    pub shutdown: ShutdownSettings,
    pub http: HttpSettings,
    pub log: LogSettings,
    /// `None`: polling mode (`webhook.url` is empty).
    pub webhook: Option<WebhookSettings>,
    /// `None`: one node with the local journal (`cluster.nats_urls` is empty).
    pub cluster: Option<ClusterSettings>,
}

#[derive(Debug, Clone)]
pub struct JournalSettings {
    /// Directory of the journal; `None`: the default state directory.
    pub dir: Option<PathBuf>,
    /// Undelivered updates held at most before polling pauses.
    pub max_undelivered: usize,
    /// Appends wait for the disk before the offset is confirmed.
    pub fsync: bool,
}

impl JournalSettings {
    /// The journal's directory: the configured one, else `$STATE_DIRECTORY`
    /// (systemd), `$XDG_STATE_HOME/asgigramd`, `~/.local/state/asgigramd`,
    /// or `./.asgigramd` as a last resort.
    pub fn resolved_dir(&self) -> PathBuf {
        if let Some(dir) = &self.dir {
            return dir.clone();
        }
        let env = |k: &str| {
            std::env::var_os(k)
                .filter(|v| !v.is_empty())
                .map(PathBuf::from)
        };
        env("STATE_DIRECTORY")
            .or_else(|| env("XDG_STATE_HOME").map(|d| d.join("asgigramd")))
            .or_else(|| env("HOME").map(|h| h.join(".local/state/asgigramd")))
            .unwrap_or_else(|| PathBuf::from(".asgigramd"))
    }
}

#[derive(Debug, Clone)]
pub struct ShutdownSettings {
    /// How long the Sender may take to send what is queued.
    pub drain_timeout: Duration,
    /// How long workers may take for lifespan shutdown and exit.
    pub worker_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct TelegramSettings {
    pub token: BotToken,
    pub api_url: String,
    pub poll_timeout: Duration,
    pub http_timeout: Duration,
    pub poll_limit: u8,
    pub allowed_updates: Vec<String>,
    pub delete_webhook: bool,
}

#[derive(Debug, Clone)]
pub struct AppSettings {
    /// `module.path:attribute`
    pub application: String,
    pub python: String,
    pub app_dir: PathBuf,
    pub workers: usize,
    pub lifespan: LifespanMode,
    pub startup_timeout: Duration,
    /// How long a worker's event loop may leave pings unanswered before the
    /// worker is killed and replaced.
    pub hang_timeout: Duration,
}

#[derive(Debug, Clone)]
pub struct ScopeSettings {
    pub idle_timeout: Duration,
    pub max_scopes: usize,
    pub disconnect_grace: Duration,
    /// How long a scope may hold events without its app receiving any before
    /// it is reported in the log.
    pub stall_warning: Duration,
}

/// What the Sender does with a call whose outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AmbiguousPolicy {
    /// Send it again: a rare duplicate beats a lost message.
    Retry,
    /// Report the failure; never risk a duplicate.
    Fail,
}

#[derive(Debug, Clone, PartialEq)]
pub struct SenderSettings {
    pub limits: crate::telegram::limits::Limits,
    /// Queued calls above which the apps' `send()` waits.
    pub queue_limit: usize,
    pub response_timeout: Duration,
    pub ambiguous: AmbiguousPolicy,
    pub max_attempts: u32,
}

impl Default for SenderSettings {
    /// The values of `config/default.toml`.
    fn default() -> Self {
        SenderSettings {
            limits: crate::telegram::limits::Limits::default(),
            queue_limit: 10_000,
            response_timeout: Duration::from_secs(60),
            ambiguous: AmbiguousPolicy::Retry,
            max_attempts: 10,
        }
    }
}

#[derive(Debug, Clone)]
pub struct LogSettings {
    pub level: log::LevelFilter,
    pub format: LogFormat,
    /// How often the stats line is logged; zero: never.
    pub stats_interval: Duration,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    /// `timestamp LEVEL target] message key=value ...`
    Text,
    /// One JSON object per line, for log pipelines.
    Json,
}

/// The HTTP endpoint: operations (`/healthz`, `/readyz`, `/metrics`) and,
/// with a token, events and calls from other programs (`/v1/...`).
#[derive(Debug, Clone)]
pub struct HttpSettings {
    /// Where it listens; `None`: no endpoint.
    pub bind: Option<std::net::SocketAddr>,
    /// What `/v1/...` requests must present; `None`: those routes answer 404.
    pub api_token: Option<ApiToken>,
}

/// Why settings could not be loaded. Each message names the key or file at fault.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("cannot read config file {path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// Parse and type errors from the layers, as the `config` crate words them
    /// (they name the key, e.g. "invalid type ... for key `app.workers`").
    #[error("invalid configuration: {0}")]
    Layers(String),
    #[error("invalid configuration: key `{key}`: {reason}")]
    Key { key: &'static str, reason: String },
}

impl SettingsError {
    fn key(key: &'static str, reason: impl Into<String>) -> Self {
        SettingsError::Key {
            key,
            reason: reason.into(),
        }
    }
}

/// Where settings come from besides the built-in defaults.
#[derive(Debug, Default, Clone)]
pub struct Sources {
    /// The `--config` file.
    pub file: Option<PathBuf>,
    /// Values given on the command line, applied after the environment
    /// (`(key, value)` with dotted keys such as `telegram.api_url`).
    pub overrides: Vec<(&'static str, String)>,
    /// Accept a missing token (the sandbox supplies its own).
    pub token_optional: bool,
}

// Raw layer shapes: exactly the keys of config/default.toml, so serde rejects
// anything else with the offending name.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSettings {
    telegram: RawTelegram,
    app: RawApp,
    scopes: RawScopes,
    sender: RawSender,
    journal: RawJournal,
    shutdown: RawShutdown,
    http: RawHttp,
    log: RawLog,
    webhook: RawWebhook,
    cluster: RawCluster,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawJournal {
    dir: String,
    max_undelivered: Number,
    fsync: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawShutdown {
    drain_timeout: Number,
    worker_timeout: Number,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTelegram {
    token: String,
    token_file: String,
    api_url: String,
    poll_timeout: Number,
    http_timeout: Number,
    poll_limit: Number,
    allowed_updates: Vec<String>,
    delete_webhook: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    application: String,
    python: String,
    app_dir: String,
    workers: Number,
    lifespan: LifespanMode,
    startup_timeout: Number,
    hang_timeout: Number,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScopes {
    idle_timeout: Number,
    max_scopes: Number,
    disconnect_grace: Number,
    stall_warning: Number,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSender {
    limits: bool,
    global_per_second: Number,
    paid_broadcast_per_second: Number,
    chat_per_second: Number,
    chat_burst: Number,
    group_per_minute: Number,
    safety_margin: Number,
    queue_limit: Number,
    response_timeout: Number,
    ambiguous: AmbiguousPolicy,
    max_attempts: Number,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLog {
    level: String,
    format: String,
    stats_interval: Number,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHttp {
    bind: String,
    api_token: String,
    api_token_file: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWebhook {
    url: String,
    listen: String,
    secret_token: String,
    secret_token_file: String,
    max_connections: Number,
    tls_cert: String,
    tls_key: String,
    upload_certificate: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCluster {
    nats_urls: Vec<String>,
    credentials_file: String,
    user: String,
    password: String,
    token: String,
    ca_file: String,
    node_id: String,
    partitions: Number,
    replicas: Number,
    lease_ttl: Number,
    lease_renew: Number,
    duplicate_window: Number,
}

impl Settings {
    /// Every secret these settings hold (the bot token, `http.api_token`,
    /// the webhook's secret, NATS's password or token), for the log's
    /// redaction ([`crate::ops::logging::register_secret`]).
    pub fn secrets(&self) -> Vec<&str> {
        let mut secrets = vec![self.telegram.token.expose()];
        secrets.extend(self.http.api_token.as_ref().map(ApiToken::expose));
        secrets.extend(self.webhook.as_ref().map(|w| w.secret_token.expose()));
        if let Some(cluster) = &self.cluster {
            match &cluster.auth {
                NatsAuth::UserPassword {
                    password: secret, ..
                }
                | NatsAuth::Token(secret) => {
                    secrets.push(secret.expose());
                }
                NatsAuth::None | NatsAuth::CredentialsFile(_) => {}
            }
        }
        secrets
    }

    /// Reads the layers from the process environment.
    pub fn load(sources: &Sources) -> Result<Settings, SettingsError> {
        Self::load_with_env(sources, std::env::vars())
    }

    /// Reads the layers with an explicit environment (tests pass their own).
    pub fn load_with_env(
        sources: &Sources,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Settings, SettingsError> {
        let env: config::Map<String, String> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(&format!("{ENV_PREFIX}_")))
            .collect();
        let mut builder = Config::builder().add_source(File::from_str(DEFAULTS, FileFormat::Toml));
        if let Some(path) = &sources.file {
            let text = std::fs::read_to_string(path).map_err(|e| SettingsError::File {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            builder = builder.add_source(File::from_str(&text, FileFormat::Toml));
        }
        builder = builder.add_source(
            Environment::with_prefix(ENV_PREFIX)
                .prefix_separator("_")
                .separator("__")
                .list_separator(",")
                .with_list_parse_key("telegram.allowed_updates")
                .with_list_parse_key("cluster.nats_urls")
                .try_parsing(true)
                .source(Some(env)),
        );
        for (key, value) in &sources.overrides {
            builder = builder
                .set_override(*key, value.as_str())
                .map_err(|e| SettingsError::Layers(e.to_string()))?;
        }
        let raw: RawSettings = builder
            .build()
            .and_then(Config::try_deserialize)
            .map_err(|e| SettingsError::Layers(e.to_string()))?;
        let base_dir = sources
            .file
            .as_deref()
            .map(config_dir)
            .unwrap_or_else(|| PathBuf::from("."));
        Self::validate(raw, &base_dir, sources.token_optional, system_host_name)
    }

    fn validate(
        raw: RawSettings,
        base_dir: &Path,
        token_optional: bool,
        host_name: fn() -> Option<String>,
    ) -> Result<Settings, SettingsError> {
        let token = resolve_token(&raw.telegram, base_dir, token_optional)?;

        let api_url = raw.telegram.api_url.trim_end_matches('/').to_string();
        if !(api_url.starts_with("http://") || api_url.starts_with("https://")) {
            return Err(SettingsError::key(
                "telegram.api_url",
                format!("must start with http:// or https://, got {api_url:?}"),
            ));
        }
        let poll_timeout = whole_seconds(
            "telegram.poll_timeout",
            raw.telegram.poll_timeout,
            0,
            MAX_POLL_TIMEOUT,
        )?;
        let http_timeout = whole_seconds(
            "telegram.http_timeout",
            raw.telegram.http_timeout,
            1,
            MAX_SECONDS,
        )?;
        let poll_limit = count("telegram.poll_limit", raw.telegram.poll_limit, 1, 100)? as u8;

        let application = raw.app.application.trim().to_string();
        if application.is_empty() {
            return Err(SettingsError::key(
                "app.application",
                "is required: the ASGI application as \"module.path:attribute\"",
            ));
        }
        validate_app_spec(&application).map_err(|r| SettingsError::key("app.application", r))?;
        let python = if raw.app.python.trim().is_empty() {
            let exe = std::env::current_exe().ok();
            default_python(exe.as_deref().and_then(Path::parent), is_executable_file)
        } else {
            raw.app.python
        };
        let workers = count("app.workers", raw.app.workers, 1, 256)?;
        let app_dir = if raw.app.app_dir.is_empty() {
            base_dir.to_path_buf()
        } else {
            base_dir.join(&raw.app.app_dir)
        };
        if !app_dir.is_dir() {
            return Err(SettingsError::key(
                "app.app_dir",
                format!("{} is not a directory", app_dir.display()),
            ));
        }
        let startup_timeout = whole_seconds(
            "app.startup_timeout",
            raw.app.startup_timeout,
            1,
            MAX_SECONDS,
        )?;
        let hang_timeout = seconds("app.hang_timeout", raw.app.hang_timeout, 0.5, 86_400.0)?;

        let idle_timeout = whole_seconds(
            "scopes.idle_timeout",
            raw.scopes.idle_timeout,
            1,
            MAX_SECONDS,
        )?;
        let max_scopes = count("scopes.max_scopes", raw.scopes.max_scopes, 1, MAX_COUNT)?;
        let disconnect_grace = seconds(
            "scopes.disconnect_grace",
            raw.scopes.disconnect_grace,
            0.0,
            MAX_SECONDS as f64,
        )?;
        let stall_warning = whole_seconds(
            "scopes.stall_warning",
            raw.scopes.stall_warning,
            0,
            MAX_SECONDS,
        )?;
        let sender = validate_sender(&raw.sender)?;
        let max_undelivered = count(
            "journal.max_undelivered",
            raw.journal.max_undelivered,
            1,
            MAX_COUNT,
        )?;
        let journal = JournalSettings {
            dir: (!raw.journal.dir.is_empty()).then(|| base_dir.join(&raw.journal.dir)),
            max_undelivered: max_undelivered as usize,
            fsync: raw.journal.fsync,
        };
        let shutdown = ShutdownSettings {
            drain_timeout: seconds(
                "shutdown.drain_timeout",
                raw.shutdown.drain_timeout,
                0.0,
                MAX_SECONDS as f64,
            )?,
            worker_timeout: seconds(
                "shutdown.worker_timeout",
                raw.shutdown.worker_timeout,
                0.0,
                MAX_SECONDS as f64,
            )?,
        };
        let http = HttpSettings {
            bind: match raw.http.bind.trim() {
                "" => None,
                bind => Some(bind.parse().map_err(|_| {
                    SettingsError::key(
                        "http.bind",
                        format!("must be IP:port such as 0.0.0.0:8080, or empty for no endpoint; got {bind:?}"),
                    )
                })?),
            },
            api_token: resolve_api_token(&raw.http, base_dir)?,
        };
        let format = match raw.log.format.as_str() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(SettingsError::key(
                    "log.format",
                    format!("must be \"text\" or \"json\", got {other:?}"),
                ))
            }
        };
        let stats_interval =
            whole_seconds("log.stats_interval", raw.log.stats_interval, 0, MAX_SECONDS)?;
        let level = raw.log.level.parse::<log::LevelFilter>().map_err(|_| {
            SettingsError::key(
                "log.level",
                format!(
                    "must be one of off, error, warn, info, debug, trace; got {:?}",
                    raw.log.level
                ),
            )
        })?;

        let webhook = validate_webhook(&raw.webhook, base_dir)?;
        let cluster = validate_cluster(&raw.cluster, base_dir, host_name)?;

        Ok(Settings {
            telegram: TelegramSettings {
                token,
                api_url,
                poll_timeout,
                http_timeout,
                poll_limit,
                allowed_updates: raw.telegram.allowed_updates,
                delete_webhook: raw.telegram.delete_webhook,
            },
            app: AppSettings {
                application,
                python,
                app_dir,
                workers: workers as usize,
                lifespan: raw.app.lifespan,
                startup_timeout,
                hang_timeout,
            },
            scopes: ScopeSettings {
                idle_timeout,
                max_scopes: max_scopes as usize,
                disconnect_grace,
                // Zero would make the stall check spin; one second is as eager.
                stall_warning: stall_warning.max(Duration::from_secs(1)),
            },
            sender,
            journal,
            shutdown,
            http,
            log: LogSettings {
                level,
                format,
                stats_interval,
            },
            webhook,
            cluster,
        })
    }
}

fn validate_sender(raw: &RawSender) -> Result<SenderSettings, SettingsError> {
    let rate = |key: &'static str, value: Number| count(key, value, 1, 100_000).map(|n| n as u32);
    let global_per_second = rate("sender.global_per_second", raw.global_per_second)?;
    let paid_broadcast_per_second = rate(
        "sender.paid_broadcast_per_second",
        raw.paid_broadcast_per_second,
    )?;
    let group_per_minute = rate("sender.group_per_minute", raw.group_per_minute)?;
    let chat_burst = count("sender.chat_burst", raw.chat_burst, 1, 1000)? as u32;
    let max_attempts = count("sender.max_attempts", raw.max_attempts, 1, 1000)? as u32;
    let chat_per_second = number("sender.chat_per_second", raw.chat_per_second, 0.001, 1000.0)?;
    let safety_margin = seconds("sender.safety_margin", raw.safety_margin, 0.0, 10.0)?;
    let queue_limit = count("sender.queue_limit", raw.queue_limit, 2, MAX_COUNT)?;
    let response_timeout = whole_seconds(
        "sender.response_timeout",
        raw.response_timeout,
        1,
        MAX_SECONDS,
    )?;
    Ok(SenderSettings {
        limits: crate::telegram::limits::Limits {
            enabled: raw.limits,
            global_per_second,
            paid_broadcast_per_second,
            chat_per_second,
            chat_burst,
            group_per_minute,
            safety_margin,
        },
        queue_limit: queue_limit as usize,
        response_timeout,
        ambiguous: raw.ambiguous,
        max_attempts,
    })
}

/// A number as a layer gave it, checked against its key's range in
/// `validate`. Deserializing straight into `u64` would make 1e300 or `inf`
/// `u64::MAX` and 2.5 a 3 without a word, and `f64` seconds past
/// `Duration`'s range make it panic.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Number {
    Int(i128),
    Float(f64),
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Int(n) => write!(f, "{n}"),
            // Debug writes 1e300 rather than three hundred digits.
            Number::Float(x) => write!(f, "{x:?}"),
        }
    }
}

impl Number {
    fn as_f64(self) -> f64 {
        match self {
            Number::Int(n) => n as f64,
            Number::Float(x) => x,
        }
    }

    /// The value if it is a whole number (2.0 is; 2.5, NaN and inf are not).
    fn whole(self) -> Option<i128> {
        match self {
            Number::Int(n) => Some(n),
            // Whole floats beyond ±2^100 are out of every range anyway.
            Number::Float(x) if x.fract() == 0.0 && x.abs() < 2f64.powi(100) => Some(x as i128),
            Number::Float(_) => None,
        }
    }
}

impl<'de> Deserialize<'de> for Number {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Number, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = Number;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number")
            }
            fn visit_i64<E>(self, v: i64) -> Result<Number, E> {
                Ok(Number::Int(v.into()))
            }
            fn visit_u64<E>(self, v: u64) -> Result<Number, E> {
                Ok(Number::Int(v.into()))
            }
            fn visit_i128<E>(self, v: i128) -> Result<Number, E> {
                Ok(Number::Int(v))
            }
            fn visit_u128<E>(self, v: u128) -> Result<Number, E> {
                Ok(i128::try_from(v).map_or(Number::Float(v as f64), Number::Int))
            }
            fn visit_f64<E>(self, v: f64) -> Result<Number, E> {
                Ok(Number::Float(v))
            }
            // Quoted numbers in the file and values set as text still count.
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Number, E> {
                let t = v.trim();
                t.parse()
                    .map(Number::Int)
                    .or_else(|_| t.parse().map(Number::Float))
                    .map_err(|_| E::invalid_value(serde::de::Unexpected::Str(v), &self))
            }
        }
        d.deserialize_any(Visitor)
    }
}

/// A whole number in `min..=max`.
fn count(key: &'static str, value: Number, min: u64, max: u64) -> Result<u64, SettingsError> {
    match value.whole() {
        Some(n) if (i128::from(min)..=i128::from(max)).contains(&n) => Ok(n as u64),
        _ => Err(SettingsError::key(
            key,
            format!("must be a whole number from {min} to {max}, got {value}"),
        )),
    }
}

/// Whole seconds in `min..=max`.
fn whole_seconds(
    key: &'static str,
    value: Number,
    min: u64,
    max: u64,
) -> Result<Duration, SettingsError> {
    match value.whole() {
        Some(n) if (i128::from(min)..=i128::from(max)).contains(&n) => {
            Ok(Duration::from_secs(n as u64))
        }
        _ => Err(SettingsError::key(
            key,
            format!("must be a whole number of seconds from {min} to {max}, got {value}"),
        )),
    }
}

/// Seconds, fractions allowed, in `min..=max`.
fn seconds(
    key: &'static str,
    value: Number,
    min: f64,
    max: f64,
) -> Result<Duration, SettingsError> {
    let x = value.as_f64();
    if (min..=max).contains(&x) {
        // In range, so finite and far below Duration's limit.
        Ok(Duration::from_secs_f64(x))
    } else {
        Err(SettingsError::key(
            key,
            format!("must be a number of seconds from {min} to {max}, got {value}"),
        ))
    }
}

/// Any number in `min..=max`.
fn number(key: &'static str, value: Number, min: f64, max: f64) -> Result<f64, SettingsError> {
    let x = value.as_f64();
    if (min..=max).contains(&x) {
        Ok(x)
    } else {
        Err(SettingsError::key(
            key,
            format!("must be a number from {min} to {max}, got {value}"),
        ))
    }
}

/// The directory a relative `app_dir` / `token_file` is resolved against.
/// The interpreter the workers run when `app.python` is empty:
/// `python3`, else `python`, in `exe_dir` (the directory of the running
/// binary) when `is_interpreter` says it is one, else `python3` on `PATH`.
///
/// `pip install asgigramd` puts the binary in a virtualenv's `bin/`, beside
/// that virtualenv's interpreter, so this runs the workers in the environment
/// the daemon was installed into, with the packages installed next to it,
/// without the user activating it or naming it in the config. The candidate
/// is used as found, not canonicalised: a virtualenv's `bin/python3` is a
/// symlink to the base interpreter, and Python finds its virtualenv from the
/// path it was started by.
pub fn default_python(exe_dir: Option<&Path>, is_interpreter: impl Fn(&Path) -> bool) -> String {
    exe_dir
        .into_iter()
        .flat_map(|dir| ["python3", "python"].map(|name| dir.join(name)))
        .find(|candidate| is_interpreter(candidate))
        // A path that is not UTF-8 cannot be carried in the `String` the
        // setting is; PATH's python3 is then the one guess left.
        .and_then(|candidate| candidate.into_os_string().into_string().ok())
        .unwrap_or_else(|| "python3".to_string())
}

/// Whether `path` (following symlinks) is a regular file someone may execute.
fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

fn config_dir(file: &Path) -> PathBuf {
    match file.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    }
}

fn resolve_token(
    raw: &RawTelegram,
    base_dir: &Path,
    token_optional: bool,
) -> Result<BotToken, SettingsError> {
    let token = if !raw.token.trim().is_empty() {
        raw.token.trim().to_string()
    } else if !raw.token_file.is_empty() {
        let path = base_dir.join(&raw.token_file);
        let text = std::fs::read_to_string(&path).map_err(|e| {
            SettingsError::key(
                "telegram.token_file",
                format!("cannot read {}: {e}", path.display()),
            )
        })?;
        let token = text.trim().to_string();
        if token.is_empty() {
            return Err(SettingsError::key(
                "telegram.token_file",
                format!("{} is empty", path.display()),
            ));
        }
        token
    } else if token_optional {
        String::new()
    } else {
        return Err(SettingsError::key(
            "telegram.token",
            "no bot token: set telegram.token, telegram.token_file or ASGIGRAM_TELEGRAM__TOKEN",
        ));
    };
    // A token goes into the URL path; anything outside this set would break the
    // URL or hint at a pasting mistake. The message never repeats the token.
    if !token
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == ':' || c == '_' || c == '-')
    {
        return Err(SettingsError::key(
            "telegram.token",
            "contains characters a bot token never has (expected digits, ':', letters, '_' and '-')",
        ));
    }
    Ok(BotToken(token))
}

/// `http.api_token` or the contents of `http.api_token_file` (relative to
/// the config file), trimmed; neither: `None`. Both set is an error rather
/// than a silent preference, since an operator who set both cannot tell
/// which one a client must use.
fn resolve_api_token(raw: &RawHttp, base_dir: &Path) -> Result<Option<ApiToken>, SettingsError> {
    let inline = raw.api_token.trim();
    let token = match (inline.is_empty(), raw.api_token_file.trim().is_empty()) {
        (true, true) => return Ok(None),
        (false, false) => {
            return Err(SettingsError::key(
                "http.api_token",
                "http.api_token and http.api_token_file are both set; set one of them",
            ))
        }
        (false, true) => inline.to_string(),
        (true, false) => {
            let path = base_dir.join(raw.api_token_file.trim());
            let text = std::fs::read_to_string(&path).map_err(|e| {
                SettingsError::key(
                    "http.api_token_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            let token = text.trim().to_string();
            if token.is_empty() {
                return Err(SettingsError::key(
                    "http.api_token_file",
                    format!("{} is empty", path.display()),
                ));
            }
            token
        }
    };
    // It travels in an `Authorization: Bearer` header: whitespace or control
    // characters could not be sent there. The message never repeats it.
    if !token.chars().all(|c| c.is_ascii_graphic()) {
        return Err(SettingsError::key(
            "http.api_token",
            "must be printable ASCII without spaces (it is sent as `Authorization: Bearer <token>`)",
        ));
    }
    Ok(Some(ApiToken(token)))
}

/// Checks the shape of `module.path:attribute`.
pub fn validate_app_spec(spec: &str) -> Result<(), String> {
    let Some((module, attr)) = spec.split_once(':') else {
        return Err(format!("expected \"module.path:attribute\", got {spec:?}"));
    };
    let ident = |s: &str| {
        !s.is_empty()
            && s.split('.').all(|part| {
                let mut chars = part.chars();
                matches!(chars.next(), Some(c) if c.is_alphabetic() || c == '_')
                    && chars.all(|c| c.is_alphanumeric() || c == '_')
            })
    };
    if ident(module) && ident(attr) {
        Ok(())
    } else {
        Err(format!("expected \"module.path:attribute\", got {spec:?}"))
    }
}

secret!(
    /// The secret Telegram sends with every webhook request
    /// (`X-Telegram-Bot-Api-Secret-Token`), for `setWebhook` and the comparison.
    WebhookSecret
);

/// Webhook mode: Telegram POSTs updates to asgigramd instead of being polled.
#[derive(Debug, Clone)]
pub struct WebhookSettings {
    /// The public URL `setWebhook` is given.
    pub url: String,
    /// The path of `url`: the one path POSTs are taken on.
    pub path: String,
    /// Where the receiver listens.
    pub listen: std::net::SocketAddr,
    pub secret_token: WebhookSecret,
    /// Telegram's connections at once (1-100), for `setWebhook`.
    pub max_connections: u8,
    /// HTTPS served by asgigramd itself; `None`: plain HTTP (TLS ends at a
    /// proxy in front).
    pub tls: Option<WebhookTls>,
    /// Send `tls.cert` with `setWebhook` (a self-signed certificate).
    pub upload_certificate: bool,
}

/// The PEM files of the receiver's certificate (chain) and private key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookTls {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The characters Telegram allows in a webhook secret, and its length.
fn valid_secret(secret: &str) -> bool {
    (1..=256).contains(&secret.len())
        && secret
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
}

/// The path of an `http://` or `https://` URL (`/` when it has none); the
/// scheme is not otherwise checked, since a local Bot API server and the
/// sandbox deliver over plain HTTP.
fn url_path(url: &str) -> Option<String> {
    let rest = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))?;
    let end = rest.find(['?', '#']).unwrap_or(rest.len());
    let rest = &rest[..end];
    let (host, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    (!host.is_empty()).then(|| path.to_string())
}

/// Every `[webhook]` key is checked, also in polling mode, so that a typo
/// shows before the day webhook mode is turned on.
fn validate_webhook(
    raw: &RawWebhook,
    base_dir: &Path,
) -> Result<Option<WebhookSettings>, SettingsError> {
    let listen = raw.listen.trim().parse().map_err(|_| {
        SettingsError::key(
            "webhook.listen",
            format!("must be IP:port such as 0.0.0.0:8443; got {:?}", raw.listen),
        )
    })?;
    let max_connections = count("webhook.max_connections", raw.max_connections, 1, 100)? as u8;
    let tls = match (raw.tls_cert.trim(), raw.tls_key.trim()) {
        ("", "") => None,
        ("", _) | (_, "") => {
            return Err(SettingsError::key(
                "webhook.tls_cert",
                "webhook.tls_cert and webhook.tls_key go together: set both (HTTPS) or neither",
            ))
        }
        (cert, key) => Some(WebhookTls {
            cert: base_dir.join(cert),
            key: base_dir.join(key),
        }),
    };
    if raw.upload_certificate && tls.is_none() {
        return Err(SettingsError::key(
            "webhook.upload_certificate",
            "needs webhook.tls_cert (the certificate to send) and webhook.tls_key",
        ));
    }
    let secret = match (raw.secret_token.trim(), raw.secret_token_file.trim()) {
        ("", "") => None,
        (_, "") => Some(raw.secret_token.trim().to_string()),
        ("", file) => {
            let path = base_dir.join(file);
            let text = std::fs::read_to_string(&path).map_err(|e| {
                SettingsError::key(
                    "webhook.secret_token_file",
                    format!("cannot read {}: {e}", path.display()),
                )
            })?;
            Some(text.trim().to_string())
        }
        _ => {
            return Err(SettingsError::key(
                "webhook.secret_token",
                "set webhook.secret_token or webhook.secret_token_file, not both",
            ))
        }
    };
    // The message never repeats the secret.
    if let Some(secret) = &secret {
        if !valid_secret(secret) {
            return Err(SettingsError::key(
                "webhook.secret_token",
                "must be 1 to 256 characters of A-Z, a-z, 0-9, '_' and '-' (Telegram's rule)",
            ));
        }
    }
    let url = raw.url.trim();
    if url.is_empty() {
        return Ok(None);
    }
    let path = url_path(url).ok_or_else(|| {
        SettingsError::key(
            "webhook.url",
            format!("must be an http:// or https:// URL with a host, got {url:?}"),
        )
    })?;
    let secret_token = secret.map(WebhookSecret).ok_or_else(|| {
        SettingsError::key(
            "webhook.secret_token",
            "is required in webhook mode (webhook.url is set): set webhook.secret_token, \
             webhook.secret_token_file or ASGIGRAM_WEBHOOK__SECRET_TOKEN",
        )
    })?;
    Ok(Some(WebhookSettings {
        url: url.to_string(),
        path,
        listen,
        secret_token,
        max_connections,
        tls,
        upload_certificate: raw.upload_certificate,
    }))
}

secret!(
    /// A NATS secret (`cluster.password`, `cluster.token`), for the
    /// connection's options.
    NatsSecret
);

/// How a node proves itself to NATS: at most one way, as the server takes one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NatsAuth {
    None,
    /// A `.creds` file (JWT and NKey seed), read when connecting.
    CredentialsFile(PathBuf),
    UserPassword {
        user: String,
        password: NatsSecret,
    },
    Token(NatsSecret),
}

/// Cluster mode: several nodes share one bot through NATS JetStream
/// (docs/cluster.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClusterSettings {
    /// `nats://` or `tls://` URLs of the NATS servers, without credentials.
    pub nats_urls: Vec<String>,
    pub auth: NatsAuth,
    /// PEM file of the certificate authorities the servers' certificates are
    /// checked against; set, the connection requires TLS.
    pub ca_file: Option<PathBuf>,
    /// This node's name in leases and status; unique in the cluster.
    pub node_id: String,
    /// Partitions of the update log; fixed when the bot's stream is created.
    pub partitions: u32,
    /// Copies JetStream keeps of the update log and the leases.
    pub replicas: usize,
    /// How long a lease outlives its holder's last renewal.
    pub lease_ttl: Duration,
    /// How often a holder renews its leases.
    pub lease_renew: Duration,
    /// How long the update log remembers an `update_id` to drop it when
    /// published again.
    pub duplicate_window: Duration,
}

/// Most partitions `cluster.partitions` accepts: each one is a lease and a
/// consumer, so thousands would cost more in renewals than they spread.
pub const MAX_PARTITIONS: u64 = 1024;

/// JetStream replicates a stream at most this many times.
pub const MAX_REPLICAS: u64 = 5;

/// The host name, the default `cluster.node_id`.
fn system_host_name() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: the pointer and length describe `buf`, which outlives the call.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).trim().to_string();
    (!name.is_empty()).then_some(name)
}

/// A node id goes into KV keys, NATS subjects and log lines: letters,
/// digits, '.', '_' and '-' keep it valid in all of them.
fn valid_node_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// Every `[cluster]` key is checked also when cluster mode is off, so that
/// a typo shows before the day it is turned on; the host name is asked for
/// only when it is on and no `node_id` is set.
fn validate_cluster(
    raw: &RawCluster,
    base_dir: &Path,
    host_name: fn() -> Option<String>,
) -> Result<Option<ClusterSettings>, SettingsError> {
    let mut nats_urls = Vec::new();
    for url in raw
        .nats_urls
        .iter()
        .map(|u| u.trim())
        .filter(|u| !u.is_empty())
    {
        let rest = ["nats://", "tls://"]
            .iter()
            .find_map(|scheme| url.strip_prefix(scheme));
        let Some(rest) = rest else {
            return Err(SettingsError::key(
                "cluster.nats_urls",
                format!("each must be nats://host:port or tls://host:port, got {url:?}"),
            ));
        };
        // Credentials in a URL would travel into every log line that names
        // the server; the message does not repeat the URL for that reason.
        if rest.contains('@') {
            return Err(SettingsError::key(
                "cluster.nats_urls",
                "a URL holds credentials (user:password@ or token@): set cluster.user and \
                 cluster.password, cluster.token or cluster.credentials_file instead",
            ));
        }
        if rest.is_empty() || rest.starts_with(':') || rest.contains('/') {
            return Err(SettingsError::key(
                "cluster.nats_urls",
                format!("each must be nats://host:port or tls://host:port, got {url:?}"),
            ));
        }
        nats_urls.push(url.to_string());
    }
    let text = |s: &str| s.trim().to_string();
    let (user, password, token, creds) = (
        text(&raw.user),
        text(&raw.password),
        text(&raw.token),
        text(&raw.credentials_file),
    );
    let ways = [
        !creds.is_empty(),
        !user.is_empty() || !password.is_empty(),
        !token.is_empty(),
    ];
    if ways.iter().filter(|&&set| set).count() > 1 {
        return Err(SettingsError::key(
            "cluster.credentials_file",
            "cluster.credentials_file, cluster.user/cluster.password and cluster.token are \
             different ways to authenticate: set one of them",
        ));
    }
    let auth = if !creds.is_empty() {
        NatsAuth::CredentialsFile(base_dir.join(creds))
    } else if !token.is_empty() {
        NatsAuth::Token(NatsSecret(token))
    } else if user.is_empty() != password.is_empty() {
        return Err(SettingsError::key(
            if user.is_empty() {
                "cluster.user"
            } else {
                "cluster.password"
            },
            "cluster.user and cluster.password go together: set both or neither",
        ));
    } else if !user.is_empty() {
        NatsAuth::UserPassword {
            user,
            password: NatsSecret(password),
        }
    } else {
        NatsAuth::None
    };
    let ca_file = (!raw.ca_file.trim().is_empty()).then(|| base_dir.join(raw.ca_file.trim()));
    let partitions = count("cluster.partitions", raw.partitions, 1, MAX_PARTITIONS)? as u32;
    let replicas = count("cluster.replicas", raw.replicas, 1, MAX_REPLICAS)? as usize;
    let lease_ttl = seconds("cluster.lease_ttl", raw.lease_ttl, 1.0, 3600.0)?;
    let lease_renew = seconds("cluster.lease_renew", raw.lease_renew, 0.1, 3600.0)?;
    if lease_renew >= lease_ttl {
        return Err(SettingsError::key(
            "cluster.lease_renew",
            format!(
                "must be shorter than cluster.lease_ttl ({} s), or a lease lapses between two \
                 renewals; a third of it is usual; got {} s",
                lease_ttl.as_secs_f64(),
                lease_renew.as_secs_f64()
            ),
        ));
    }
    // JetStream's own bounds for a stream's duplicate window are a second
    // and the stream's age limit; a day matches Telegram's own retention.
    let duplicate_window =
        whole_seconds("cluster.duplicate_window", raw.duplicate_window, 1, 86_400)?;
    let node_id = raw.node_id.trim();
    if !node_id.is_empty() && !valid_node_id(node_id) {
        return Err(SettingsError::key(
            "cluster.node_id",
            format!(
                "must be 1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'; got {node_id:?}"
            ),
        ));
    }
    if nats_urls.is_empty() {
        return Ok(None);
    }
    let node_id = if node_id.is_empty() {
        let host = host_name().ok_or_else(|| {
            SettingsError::key(
                "cluster.node_id",
                "is empty and the host name cannot be read: set it",
            )
        })?;
        if !valid_node_id(&host) {
            return Err(SettingsError::key(
                "cluster.node_id",
                format!(
                    "is empty and the host name {host:?} is not a valid node id \
                     (1 to 64 characters of A-Z, a-z, 0-9, '.', '_' and '-'): set it"
                ),
            ));
        }
        host
    } else {
        node_id.to_string()
    };
    Ok(Some(ClusterSettings {
        nats_urls,
        auth,
        ca_file,
        node_id,
        partitions,
        replicas,
        lease_ttl,
        lease_renew,
        duplicate_window,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("temp dir is writable");
        path
    }

    fn load(file: Option<PathBuf>, env: &[(&str, &str)]) -> Result<Settings, SettingsError> {
        let sources = Sources {
            file,
            ..Sources::default()
        };
        Settings::load_with_env(
            &sources,
            env.iter().map(|(k, v)| (k.to_string(), v.to_string())),
        )
    }

    const MINIMAL: &str = "[telegram]\ntoken = \"123:abc\"\n[app]\napplication = \"echo:app\"\n";

    #[test]
    fn defaults_fill_every_key_the_file_leaves_out() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(Some(write(dir.path(), "a.toml", MINIMAL)), &[]).unwrap();
        assert_eq!(s.telegram.api_url, "https://api.telegram.org");
        assert_eq!(s.telegram.poll_timeout, Duration::from_secs(30));
        assert_eq!(s.app.python, "python3");
        assert_eq!(s.app.workers, 1);
        assert_eq!(s.app.app_dir, dir.path());
        assert_eq!(s.scopes.max_scopes, 10000);
        assert_eq!(s.telegram.token.expose(), "123:abc");
    }

    #[test]
    fn environment_overrides_file_for_every_section() {
        let dir = tempfile::tempdir().unwrap();
        let s = load(
            Some(write(dir.path(), "a.toml", MINIMAL)),
            &[
                ("ASGIGRAM_TELEGRAM__TOKEN", "999:zzz"),
                (
                    "ASGIGRAM_TELEGRAM__ALLOWED_UPDATES",
                    "message,callback_query",
                ),
                ("ASGIGRAM_APP__WORKERS", "3"),
                ("ASGIGRAM_SCOPES__IDLE_TIMEOUT", "7"),
                ("ASGIGRAM_LOG__LEVEL", "debug"),
            ],
        )
        .unwrap();
        assert_eq!(s.telegram.token.expose(), "999:zzz");
        assert_eq!(
            s.telegram.allowed_updates,
            vec!["message", "callback_query"]
        );
        assert_eq!(s.app.workers, 3);
        assert_eq!(s.scopes.idle_timeout, Duration::from_secs(7));
        assert_eq!(s.log.level, log::LevelFilter::Debug);
    }

    #[test]
    fn unknown_key_in_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{MINIMAL}[scopes]\nidle_timeot = 5\n");
        let err = load(Some(write(dir.path(), "a.toml", &text)), &[]).unwrap_err();
        assert!(err.to_string().contains("idle_timeot"), "{err}");
    }

    #[test]
    fn unknown_section_and_unknown_env_key_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{MINIMAL}[telegarm]\ntoken = \"1:a\"\n");
        let err = load(Some(write(dir.path(), "a.toml", &text)), &[]).unwrap_err();
        assert!(err.to_string().contains("telegarm"), "{err}");
        let file = write(dir.path(), "b.toml", MINIMAL);
        let err = load(Some(file), &[("ASGIGRAM_APP__WORKRS", "2")]).unwrap_err();
        assert!(err.to_string().contains("workrs"), "{err}");
    }

    #[test]
    fn malformed_value_names_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let text = format!("{MINIMAL}workers = \"many\"\n");
        let err = load(Some(write(dir.path(), "a.toml", &text)), &[]).unwrap_err();
        assert!(err.to_string().contains("workers"), "{err}");
        let file = write(dir.path(), "b.toml", MINIMAL);
        let err = load(Some(file), &[("ASGIGRAM_TELEGRAM__POLL_TIMEOUT", "soon")]).unwrap_err();
        assert!(err.to_string().contains("poll_timeout"), "{err}");
    }

    #[test]
    fn poll_timeout_is_capped_at_telegrams_limit() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        let err = load(Some(file), &[("ASGIGRAM_TELEGRAM__POLL_TIMEOUT", "51")]).unwrap_err();
        assert!(err.to_string().contains("telegram.poll_timeout"), "{err}");
    }

    #[test]
    fn missing_token_is_an_error_naming_the_key() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", "[app]\napplication = \"echo:app\"\n");
        let err = load(Some(file), &[]).unwrap_err();
        assert!(err.to_string().contains("telegram.token"), "{err}");
    }

    #[test]
    fn token_file_is_read_and_trimmed_relative_to_the_config() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "secret", "  42:from_file\n");
        let file = write(
            dir.path(),
            "a.toml",
            "[telegram]\ntoken_file = \"secret\"\n[app]\napplication = \"m:a\"\n",
        );
        let s = load(Some(file), &[]).unwrap();
        assert_eq!(s.telegram.token.expose(), "42:from_file");
    }

    #[test]
    fn missing_application_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", "[telegram]\ntoken = \"1:a\"\n");
        let err = load(Some(file), &[]).unwrap_err();
        assert!(err.to_string().contains("app.application"), "{err}");
        let file = write(
            dir.path(),
            "b.toml",
            "[telegram]\ntoken = \"1:a\"\n[app]\napplication = \"no-colon\"\n",
        );
        let err = load(Some(file), &[]).unwrap_err();
        assert!(err.to_string().contains("app.application"), "{err}");
    }

    #[test]
    fn token_never_appears_in_debug_or_errors() {
        let token = "5550001:SECRETSECRETsecret";
        let dir = tempfile::tempdir().unwrap();
        let file = write(
            dir.path(),
            "a.toml",
            &format!("[telegram]\ntoken = \"{token}\"\n[app]\napplication = \"m:a\"\n"),
        );
        let s = load(Some(file.clone()), &[]).unwrap();
        assert!(!format!("{s:?}").contains("SECRET"));
        assert!(!format!("{}", s.telegram.token).contains("SECRET"));
        let bad = write(
            dir.path(),
            "b.toml",
            &format!("[telegram]\ntoken = \"{token} x\"\n[app]\napplication = \"m:a\"\n"),
        );
        let err = load(Some(bad), &[]).unwrap_err();
        assert!(!err.to_string().contains("SECRET"), "{err}");
    }

    #[test]
    fn sender_section_defaults_overrides_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        let s = load(Some(file.clone()), &[]).unwrap();
        assert_eq!(s.sender, SenderSettings::default());
        let s = load(
            Some(file.clone()),
            &[
                ("ASGIGRAM_SENDER__LIMITS", "false"),
                ("ASGIGRAM_SENDER__AMBIGUOUS", "fail"),
                ("ASGIGRAM_SENDER__SAFETY_MARGIN", "0.2"),
            ],
        )
        .unwrap();
        assert!(!s.sender.limits.enabled);
        assert_eq!(s.sender.ambiguous, AmbiguousPolicy::Fail);
        assert_eq!(s.sender.limits.safety_margin, Duration::from_millis(200));
        for (key, value, named) in [
            (
                "ASGIGRAM_SENDER__GLOBAL_PER_SECOND",
                "0",
                "sender.global_per_second",
            ),
            (
                "ASGIGRAM_SENDER__CHAT_PER_SECOND",
                "-1",
                "sender.chat_per_second",
            ),
            ("ASGIGRAM_SENDER__AMBIGUOUS", "maybe", "ambiguous"),
            ("ASGIGRAM_SENDER__QUEUE_LIMIT", "1", "sender.queue_limit"),
        ] {
            let err = load(Some(file.clone()), &[(key, value)]).unwrap_err();
            assert!(err.to_string().contains(named), "{err}");
        }
    }

    #[test]
    fn default_python_is_the_one_beside_the_binary_else_python3_on_path() {
        let venv_bin = Path::new("/srv/bot/.venv/bin");
        let only = |names: &'static [&'static str]| {
            move |p: &Path| {
                p.parent() == Some(venv_bin)
                    && names.iter().any(|n| p.file_name() == Some(n.as_ref()))
            }
        };
        assert_eq!(
            default_python(Some(venv_bin), only(&["python", "python3"])),
            "/srv/bot/.venv/bin/python3"
        );
        assert_eq!(
            default_python(Some(venv_bin), only(&["python"])),
            "/srv/bot/.venv/bin/python"
        );
        // Installed anywhere without an interpreter beside it (cargo install,
        // the container image's /usr/local/bin): as before.
        assert_eq!(default_python(Some(venv_bin), only(&[])), "python3");
        assert_eq!(default_python(None, |_| true), "python3");
    }

    #[test]
    fn an_interpreter_beside_the_binary_is_an_executable_file_kept_as_linked() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let base = write(dir.path(), "base-python", "#!/bin/sh\n");
        let bin = dir.path().join("bin");
        std::fs::create_dir(&bin).unwrap();
        // Not executable: not an interpreter.
        write(&bin, "python3", "");
        assert_eq!(default_python(Some(&bin), is_executable_file), "python3");
        // A virtualenv's: a symlink to the base interpreter, used by its own path.
        std::fs::remove_file(bin.join("python3")).unwrap();
        std::fs::set_permissions(&base, std::fs::Permissions::from_mode(0o755)).unwrap();
        std::os::unix::fs::symlink(&base, bin.join("python3")).unwrap();
        assert_eq!(
            default_python(Some(&bin), is_executable_file),
            bin.join("python3").to_str().unwrap()
        );
        // A dangling link, or a directory, is none.
        std::fs::remove_file(&base).unwrap();
        std::fs::create_dir(bin.join("python")).unwrap();
        assert_eq!(default_python(Some(&bin), is_executable_file), "python3");
    }

    #[test]
    fn app_python_set_explicitly_always_wins() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        for explicit in ["python3", "/opt/py/bin/python3.12", "python"] {
            let s = load(Some(file.clone()), &[("ASGIGRAM_APP__PYTHON", explicit)]).unwrap();
            assert_eq!(s.app.python, explicit);
        }
        let with_key = write(
            dir.path(),
            "b.toml",
            &format!("{MINIMAL}python = \"/usr/bin/python3\"\n"),
        );
        assert_eq!(
            load(Some(with_key), &[]).unwrap().app.python,
            "/usr/bin/python3"
        );
        // Empty, in any layer: the default, found the same way as when unset.
        let unset = load(Some(file.clone()), &[]).unwrap().app.python;
        let empty = load(Some(file), &[("ASGIGRAM_APP__PYTHON", " ")]).unwrap();
        assert_eq!(empty.app.python, unset);
    }

    #[test]
    fn hang_timeout_defaults_to_30s_and_rejects_nonsense() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        let s = load(Some(file.clone()), &[]).unwrap();
        assert_eq!(s.app.hang_timeout, Duration::from_secs(30));
        let s = load(Some(file.clone()), &[("ASGIGRAM_APP__HANG_TIMEOUT", "1.5")]).unwrap();
        assert_eq!(s.app.hang_timeout, Duration::from_millis(1500));
        for bad in ["0", "-3", "nan"] {
            let err = load(Some(file.clone()), &[("ASGIGRAM_APP__HANG_TIMEOUT", bad)]).unwrap_err();
            assert!(err.to_string().contains("app.hang_timeout"), "{bad}: {err}");
        }
    }

    #[test]
    fn numbers_are_checked_as_written_against_their_keys_range() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        let ok = |env: &[(&str, &str)]| load(Some(file.clone()), env).unwrap();
        let err = |env: &[(&str, &str)]| load(Some(file.clone()), env).unwrap_err().to_string();
        assert_eq!(ok(&[("ASGIGRAM_APP__WORKERS", "2.0")]).app.workers, 2);
        assert_eq!(
            ok(&[("ASGIGRAM_SENDER__QUEUE_LIMIT", "1e3")])
                .sender
                .queue_limit,
            1000
        );
        assert_eq!(
            ok(&[("ASGIGRAM_SHUTDOWN__DRAIN_TIMEOUT", "0.25")])
                .shutdown
                .drain_timeout,
            Duration::from_millis(250)
        );
        assert_eq!(
            ok(&[("ASGIGRAM_SCOPES__IDLE_TIMEOUT", "31536000")])
                .scopes
                .idle_timeout,
            Duration::from_secs(MAX_SECONDS)
        );
        // Saturating or rounding would hide these; the error shows each as given.
        for (key, value, message) in [
            ("APP__WORKERS", "2.5", "got 2.5"),
            ("APP__WORKERS", "1e300", "got 1e300"),
            ("SCOPES__IDLE_TIMEOUT", "31536001", "got 31536001"),
            ("SCOPES__MAX_SCOPES", "99999999999999999999999", "got 1e23"),
            ("SHUTDOWN__DRAIN_TIMEOUT", "inf", "got inf"),
            ("SHUTDOWN__DRAIN_TIMEOUT", "nan", "got NaN"),
            ("SHUTDOWN__WORKER_TIMEOUT", "-0.5", "got -0.5"),
            ("TELEGRAM__POLL_LIMIT", "-1", "got -1"),
            ("SENDER__CHAT_PER_SECOND", "1e-300", "got 1e-300"),
        ] {
            let env = format!("ASGIGRAM_{key}");
            let e = err(&[(&env, value)]);
            let named = key.to_lowercase().replace("__", ".");
            assert!(e.contains(&format!("`{named}`")), "{env}={value}: {e}");
            assert!(e.contains(message), "{env}={value}: {e}");
            assert!(e.contains(" from "), "{env}={value}: no range in {e}");
        }
        let text = format!("{MINIMAL}[journal]\nmax_undelivered = \"lots\"\n");
        let e = load(Some(write(dir.path(), "b.toml", &text)), &[]).unwrap_err();
        assert!(e.to_string().contains("journal.max_undelivered"), "{e}");
    }

    #[test]
    fn journal_fsync_is_on_unless_turned_off() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        assert!(load(Some(file.clone()), &[]).unwrap().journal.fsync);
        let s = load(Some(file.clone()), &[("ASGIGRAM_JOURNAL__FSYNC", "false")]).unwrap();
        assert!(!s.journal.fsync);
        let err = load(Some(file), &[("ASGIGRAM_JOURNAL__FSYNC", "sometimes")]).unwrap_err();
        assert!(err.to_string().contains("fsync"), "{err}");
    }

    #[test]
    fn api_token_comes_from_the_key_or_a_file_never_both() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        assert!(load(Some(file.clone()), &[])
            .unwrap()
            .http
            .api_token
            .is_none());
        let s = load(
            Some(file.clone()),
            &[("ASGIGRAM_HTTP__API_TOKEN", " push-SECRET-1 ")],
        )
        .unwrap();
        let token = s.http.api_token.expect("set by the key");
        assert_eq!(token.expose(), "push-SECRET-1");
        write(dir.path(), "api-secret", "push-SECRET-2\n");
        let with_file = write(
            dir.path(),
            "b.toml",
            &format!("{MINIMAL}[http]\napi_token_file = \"api-secret\"\n"),
        );
        let s = load(Some(with_file.clone()), &[]).unwrap();
        assert_eq!(
            s.http.api_token.as_ref().map(ApiToken::expose),
            Some("push-SECRET-2"),
            "read relative to the config file, trimmed"
        );
        assert!(!format!("{s:?}").contains("SECRET"), "redacted in Debug");

        let err = load(
            Some(with_file),
            &[("ASGIGRAM_HTTP__API_TOKEN", "push-SECRET-1")],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("both set"), "{err}");
        assert!(!err.contains("SECRET"), "{err}");

        write(dir.path(), "empty", " \n");
        let empty = write(
            dir.path(),
            "c.toml",
            &format!("{MINIMAL}[http]\napi_token_file = \"empty\"\n"),
        );
        let err = load(Some(empty), &[]).unwrap_err().to_string();
        assert!(
            err.contains("http.api_token_file") && err.contains("is empty"),
            "{err}"
        );
        let missing = write(
            dir.path(),
            "d.toml",
            &format!("{MINIMAL}[http]\napi_token_file = \"nowhere\"\n"),
        );
        let err = load(Some(missing), &[]).unwrap_err().to_string();
        assert!(
            err.contains("http.api_token_file") && err.contains("cannot read"),
            "{err}"
        );

        let err = load(
            Some(file),
            &[("ASGIGRAM_HTTP__API_TOKEN", "two SECRET words")],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("http.api_token") && !err.contains("SECRET"),
            "{err}"
        );
    }

    #[test]
    fn webhook_mode_is_off_until_a_url_is_set() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        assert!(load(Some(file.clone()), &[]).unwrap().webhook.is_none());
        let s = load(
            Some(file.clone()),
            &[
                (
                    "ASGIGRAM_WEBHOOK__URL",
                    "https://bot.example.org/tg/hook?x=1",
                ),
                ("ASGIGRAM_WEBHOOK__SECRET_TOKEN", "s3cr3t_-X"),
            ],
        )
        .unwrap();
        let hook = s.webhook.expect("webhook mode");
        assert_eq!(hook.url, "https://bot.example.org/tg/hook?x=1");
        assert_eq!(hook.path, "/tg/hook");
        assert_eq!(hook.listen, "0.0.0.0:8443".parse().unwrap());
        assert_eq!(hook.max_connections, 40);
        assert_eq!(hook.tls, None);
        assert!(!hook.upload_certificate);
        assert_eq!(hook.secret_token.expose(), "s3cr3t_-X");
        let bare = load(
            Some(file),
            &[
                ("ASGIGRAM_WEBHOOK__URL", "http://127.0.0.1:9000"),
                ("ASGIGRAM_WEBHOOK__SECRET_TOKEN", "a"),
            ],
        )
        .unwrap();
        assert_eq!(bare.webhook.expect("webhook mode").path, "/");
    }

    #[test]
    fn webhook_secret_is_required_checked_and_never_shown() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        let url = ("ASGIGRAM_WEBHOOK__URL", "https://h/x");
        let err = load(Some(file.clone()), &[url]).unwrap_err().to_string();
        assert!(err.contains("webhook.secret_token"), "{err}");
        assert!(err.contains("required"), "{err}");
        let long = "a".repeat(257);
        for bad in ["has space", "semi;colon", "ünï", long.as_str()] {
            let secret = ("ASGIGRAM_WEBHOOK__SECRET_TOKEN", bad);
            let err = load(Some(file.clone()), &[url, secret])
                .unwrap_err()
                .to_string();
            assert!(err.contains("webhook.secret_token"), "{bad}: {err}");
            assert!(!err.contains(bad), "the secret is repeated: {err}");
        }
        let max = "Z".repeat(256);
        let secret = ("ASGIGRAM_WEBHOOK__SECRET_TOKEN", max.as_str());
        let s = load(Some(file.clone()), &[url, secret]).unwrap();
        assert!(!format!("{s:?}").contains("ZZZ"), "Debug shows the secret");
        let hook = s.webhook.expect("webhook mode");
        assert_eq!(hook.secret_token.to_string(), "<redacted>");

        write(dir.path(), "secret", " from_file-1\n");
        let from_file = ("ASGIGRAM_WEBHOOK__SECRET_TOKEN_FILE", "secret");
        let s = load(Some(file.clone()), &[url, from_file]).unwrap();
        assert_eq!(
            s.webhook.expect("webhook mode").secret_token.expose(),
            "from_file-1"
        );
        let both = ("ASGIGRAM_WEBHOOK__SECRET_TOKEN", "abc");
        let err = load(Some(file.clone()), &[url, from_file, both]).unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let missing = ("ASGIGRAM_WEBHOOK__SECRET_TOKEN_FILE", "nope");
        let err = load(Some(file), &[url, missing]).unwrap_err();
        assert!(
            err.to_string().contains("webhook.secret_token_file"),
            "{err}"
        );
    }

    #[test]
    fn webhook_keys_are_checked_in_both_modes() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        let hook = [
            ("ASGIGRAM_WEBHOOK__URL", "https://h/x"),
            ("ASGIGRAM_WEBHOOK__SECRET_TOKEN", "abc"),
        ];
        let with = |extra: &[(&'static str, &'static str)]| {
            let env: Vec<_> = hook.iter().chain(extra).copied().collect();
            load(Some(file.clone()), &env)
        };
        for (key, value, named) in [
            (
                "ASGIGRAM_WEBHOOK__MAX_CONNECTIONS",
                "0",
                "webhook.max_connections",
            ),
            (
                "ASGIGRAM_WEBHOOK__MAX_CONNECTIONS",
                "101",
                "webhook.max_connections",
            ),
            ("ASGIGRAM_WEBHOOK__LISTEN", "8443", "webhook.listen"),
            ("ASGIGRAM_WEBHOOK__TLS_CERT", "c.pem", "webhook.tls_cert"),
            ("ASGIGRAM_WEBHOOK__TLS_KEY", "k.pem", "webhook.tls_cert"),
            (
                "ASGIGRAM_WEBHOOK__UPLOAD_CERTIFICATE",
                "true",
                "webhook.upload_certificate",
            ),
            ("ASGIGRAM_WEBHOOK__URL", "ftp://h/x", "webhook.url"),
            ("ASGIGRAM_WEBHOOK__URL", "https:///x", "webhook.url"),
        ] {
            let err = with(&[(key, value)]).unwrap_err().to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
            if key != "ASGIGRAM_WEBHOOK__URL" {
                // Polling mode checks them too.
                let err = load(Some(file.clone()), &[(key, value)]).unwrap_err();
                assert!(err.to_string().contains(named), "{key}={value}: {err}");
            }
        }
        let s = with(&[
            ("ASGIGRAM_WEBHOOK__MAX_CONNECTIONS", "100"),
            ("ASGIGRAM_WEBHOOK__LISTEN", "127.0.0.1:9443"),
            ("ASGIGRAM_WEBHOOK__TLS_CERT", "c.pem"),
            ("ASGIGRAM_WEBHOOK__TLS_KEY", "/k.pem"),
            ("ASGIGRAM_WEBHOOK__UPLOAD_CERTIFICATE", "true"),
        ])
        .unwrap();
        let hook = s.webhook.expect("webhook mode");
        assert_eq!(hook.max_connections, 100);
        assert_eq!(hook.listen, "127.0.0.1:9443".parse().unwrap());
        assert_eq!(
            hook.tls,
            Some(WebhookTls {
                cert: dir.path().join("c.pem"),
                key: PathBuf::from("/k.pem"),
            })
        );
        assert!(hook.upload_certificate);
    }

    #[test]
    fn cluster_is_off_by_default_and_on_with_urls_from_the_environment() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        assert_eq!(load(Some(file.clone()), &[]).unwrap().cluster, None);
        let s = load(
            Some(file.clone()),
            &[(
                "ASGIGRAM_CLUSTER__NATS_URLS",
                "nats://a:4222,tls://b.example.org:4222",
            )],
        )
        .unwrap();
        let c = s.cluster.expect("cluster mode");
        assert_eq!(
            c.nats_urls,
            vec!["nats://a:4222", "tls://b.example.org:4222"]
        );
        assert_eq!(c.auth, NatsAuth::None);
        assert_eq!(c.ca_file, None);
        assert_eq!(Some(c.node_id), system_host_name());
        assert_eq!(c.partitions, 16);
        assert_eq!(c.replicas, 3);
        assert_eq!(c.lease_ttl, Duration::from_secs(10));
        assert_eq!(c.lease_renew, Duration::from_secs(3));
        assert_eq!(c.duplicate_window, Duration::from_secs(600));

        let text = format!(
            "{MINIMAL}[cluster]\nnats_urls = [\"nats://127.0.0.1:4222\"]\nnode_id = \"node-1.a\"\n\
             partitions = 4\nreplicas = 1\nlease_ttl = 2.5\nlease_renew = 0.5\n\
             ca_file = \"ca.pem\"\ncredentials_file = \"/run/bot.creds\"\n"
        );
        let c = load(
            Some(write(dir.path(), "b.toml", &text)),
            &[("ASGIGRAM_CLUSTER__PARTITIONS", "8")],
        )
        .unwrap()
        .cluster
        .expect("cluster mode");
        assert_eq!(c.node_id, "node-1.a");
        assert_eq!(c.partitions, 8, "the environment wins over the file");
        assert_eq!(c.replicas, 1);
        assert_eq!(c.lease_ttl, Duration::from_millis(2500));
        assert_eq!(c.lease_renew, Duration::from_millis(500));
        assert_eq!(c.ca_file, Some(dir.path().join("ca.pem")));
        assert_eq!(
            c.auth,
            NatsAuth::CredentialsFile(PathBuf::from("/run/bot.creds"))
        );
    }

    #[test]
    fn cluster_keys_are_checked_in_both_modes_and_errors_name_them() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        let on = ("ASGIGRAM_CLUSTER__NATS_URLS", "nats://127.0.0.1:4222");
        for (key, value, named) in [
            ("ASGIGRAM_CLUSTER__PARTITIONS", "0", "cluster.partitions"),
            ("ASGIGRAM_CLUSTER__PARTITIONS", "1025", "cluster.partitions"),
            ("ASGIGRAM_CLUSTER__PARTITIONS", "2.5", "cluster.partitions"),
            ("ASGIGRAM_CLUSTER__REPLICAS", "6", "cluster.replicas"),
            ("ASGIGRAM_CLUSTER__REPLICAS", "0", "cluster.replicas"),
            ("ASGIGRAM_CLUSTER__LEASE_TTL", "0.2", "cluster.lease_ttl"),
            ("ASGIGRAM_CLUSTER__LEASE_RENEW", "10", "cluster.lease_renew"),
            ("ASGIGRAM_CLUSTER__LEASE_RENEW", "12", "cluster.lease_renew"),
            (
                "ASGIGRAM_CLUSTER__DUPLICATE_WINDOW",
                "0",
                "cluster.duplicate_window",
            ),
            ("ASGIGRAM_CLUSTER__NODE_ID", "a b", "cluster.node_id"),
            ("ASGIGRAM_CLUSTER__NODE_ID", "a/b", "cluster.node_id"),
            ("ASGIGRAM_CLUSTER__USER", "bot", "cluster.password"),
            ("ASGIGRAM_CLUSTER__PASSWORD", "pw", "cluster.user"),
            (
                "ASGIGRAM_CLUSTER__NATS_URLS",
                "http://a:4222",
                "cluster.nats_urls",
            ),
            (
                "ASGIGRAM_CLUSTER__NATS_URLS",
                "nats://:4222",
                "cluster.nats_urls",
            ),
            (
                "ASGIGRAM_CLUSTER__NATS_URLS",
                "nats://a:4222/x",
                "cluster.nats_urls",
            ),
        ] {
            let err = load(Some(file.clone()), &[on, (key, value)])
                .unwrap_err()
                .to_string();
            assert!(err.contains(named), "{key}={value}: {err}");
            if key != "ASGIGRAM_CLUSTER__NATS_URLS" {
                // Checked with cluster mode off as well.
                let err = load(Some(file.clone()), &[(key, value)])
                    .unwrap_err()
                    .to_string();
                assert!(err.contains(named), "{key}={value} (off): {err}");
            }
        }
        let two_ways = [
            on,
            ("ASGIGRAM_CLUSTER__TOKEN", "t0ken"),
            ("ASGIGRAM_CLUSTER__CREDENTIALS_FILE", "x.creds"),
        ];
        let err = load(Some(file.clone()), &two_ways).unwrap_err().to_string();
        assert!(err.contains("set one of them"), "{err}");
        // The renewal must come before the lease lapses, not on the dot.
        let err = load(
            Some(file),
            &[
                on,
                ("ASGIGRAM_CLUSTER__LEASE_TTL", "5"),
                ("ASGIGRAM_CLUSTER__LEASE_RENEW", "5"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("shorter than cluster.lease_ttl"), "{err}");
    }

    #[test]
    fn cluster_node_id_without_a_readable_host_name_is_an_error_naming_the_key() {
        let raw = RawCluster {
            nats_urls: vec!["nats://127.0.0.1:4222".into()],
            credentials_file: String::new(),
            user: String::new(),
            password: String::new(),
            token: String::new(),
            ca_file: String::new(),
            node_id: String::new(),
            partitions: Number::Int(4),
            replicas: Number::Int(3),
            lease_ttl: Number::Int(10),
            lease_renew: Number::Int(3),
            duplicate_window: Number::Int(60),
        };
        let err = validate_cluster(&raw, Path::new("."), || None).unwrap_err();
        assert!(err.to_string().contains("cluster.node_id"), "{err}");
        let err = validate_cluster(&raw, Path::new("."), || {
            Some("under_score but spaced".into())
        })
        .unwrap_err();
        assert!(err.to_string().contains("cluster.node_id"), "{err}");
        let c = validate_cluster(&raw, Path::new("."), || Some("pod-7".into()))
            .unwrap()
            .expect("cluster mode");
        assert_eq!(c.node_id, "pod-7");
    }

    #[test]
    fn nats_secrets_never_appear_in_debug_or_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = write(dir.path(), "a.toml", MINIMAL);
        let on = ("ASGIGRAM_CLUSTER__NATS_URLS", "nats://127.0.0.1:4222");
        let s = load(
            Some(file.clone()),
            &[
                on,
                ("ASGIGRAM_CLUSTER__USER", "botuser"),
                ("ASGIGRAM_CLUSTER__PASSWORD", "SECRETpassword"),
            ],
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("SECRET"), "{s:?}");
        assert!(
            s.secrets().contains(&"SECRETpassword"),
            "redacted in the log"
        );
        assert!(s.secrets().contains(&s.telegram.token.expose()));
        let c = s.cluster.expect("cluster mode");
        match &c.auth {
            NatsAuth::UserPassword { user, password } => {
                assert_eq!(user, "botuser");
                assert_eq!(password.expose(), "SECRETpassword");
                assert_eq!(password.to_string(), "<redacted>");
            }
            other => panic!("expected user and password, got {other:?}"),
        }
        let s = load(
            Some(file.clone()),
            &[on, ("ASGIGRAM_CLUSTER__TOKEN", "SECRETtoken")],
        )
        .unwrap();
        assert!(!format!("{s:?}").contains("SECRET"), "{s:?}");
        assert!(s.secrets().contains(&"SECRETtoken"), "redacted in the log");
        // A URL with credentials is refused without being repeated.
        for url in ["nats://bot:SECRETpw@a:4222", "nats://SECRETtok@a:4222"] {
            let err = load(Some(file.clone()), &[("ASGIGRAM_CLUSTER__NATS_URLS", url)])
                .unwrap_err()
                .to_string();
            assert!(err.contains("cluster.nats_urls"), "{err}");
            assert!(!err.contains("SECRET"), "the secret is repeated: {err}");
        }
        // Two ways at once: the message names the keys, not the values.
        let err = load(
            Some(file),
            &[
                on,
                ("ASGIGRAM_CLUSTER__TOKEN", "SECRETtoken"),
                ("ASGIGRAM_CLUSTER__PASSWORD", "SECRETpassword"),
            ],
        )
        .unwrap_err()
        .to_string();
        assert!(!err.contains("SECRET"), "{err}");
    }

    #[test]
    fn every_default_key_is_documented_by_a_comment() {
        // Each key line in default.toml is preceded by a comment line.
        let lines: Vec<&str> = DEFAULTS.lines().collect();
        for (i, line) in lines.iter().enumerate() {
            let t = line.trim();
            if t.is_empty() || t.starts_with('#') || t.starts_with('[') {
                continue;
            }
            assert!(
                i > 0 && lines[i - 1].trim().starts_with('#'),
                "key line without a comment above it: {t}"
            );
        }
    }
}
