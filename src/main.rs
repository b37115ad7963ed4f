//! The `asgigramd` command: parse arguments, load settings, set up logging,
//! run. The only place that turns an error into an exit code.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use asgigramd::journal::JournalError;
use asgigramd::settings::{Settings, Sources};
use asgigramd::{chat, logging, RunError};

/// An ASGI server for Telegram bots: long-polls the Bot API and runs a Python
/// ASGI application instance per chat.
#[derive(Parser, Debug)]
#[command(
    name = "asgigramd",
    version,
    about,
    after_help = "Examples:\n  \
        asgigramd --config asgigram.toml\n  \
        asgigramd --sandbox --config config/asgigram.toml   (chat with the bot in the terminal)\n  \
        asgigramd 123456:ABC-token mybot.asgi:application  (the original asgigram form)\n\n\
        Every setting can also come from ASGIGRAM_<SECTION>__<KEY> environment variables."
)]
struct Cli {
    /// TOML configuration file (see config/default.toml for every key).
    #[arg(short, long, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Load the configuration, start a worker, import the app, then exit:
    /// 0 if all is well, non-zero with the reason otherwise.
    #[arg(long)]
    check: bool,

    /// Run against a local Bot API emulator and chat with the bot in the
    /// terminal: no token, no network.
    #[arg(long)]
    sandbox: bool,

    /// Development: restart the workers whenever a .py file under the app
    /// directory changes (SIGHUP does the same on demand).
    #[arg(long)]
    reload: bool,

    /// If the journal is damaged, move its files aside (renamed with a
    /// timestamp, never deleted) and start with an empty journal. An intact
    /// journal is kept.
    #[arg(long, conflicts_with_all = ["check", "sandbox"])]
    reset_journal: bool,

    /// Bot API base URL (telegram.api_url).
    #[arg(long, value_name = "URL")]
    api_url: Option<String>,

    /// Bot token (original form: `asgigramd TOKEN module:application`).
    /// With --sandbox, a single positional argument is the application.
    #[arg(value_name = "TOKEN")]
    token: Option<String>,

    /// ASGI application as module.path:attribute (original form).
    #[arg(value_name = "APPLICATION")]
    application: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("asgigramd: error: {}", logging::redact(&e.to_string()));
            ExitCode::from(match e {
                Failure::Usage(_) => 2,
                Failure::Run(RunError::TokenRejected) => 3,
                Failure::Run(RunError::Journal(JournalError::Damaged { .. })) => 4,
                _ => 1,
            })
        }
    }
}

#[derive(Debug, thiserror::Error)]
enum Failure {
    #[error("{0}")]
    Usage(String),
    #[error(transparent)]
    Settings(#[from] asgigramd::settings::SettingsError),
    #[error(transparent)]
    Run(#[from] RunError),
}

fn run(cli: Cli) -> Result<(), Failure> {
    let mut sources = Sources {
        file: cli.config.clone(),
        token_optional: cli.sandbox || cli.check,
        ..Sources::default()
    };
    let (token, application) = match (cli.sandbox, cli.token, cli.application) {
        // `--sandbox module:app`: the one positional is the application.
        (true, Some(app), None) => (None, Some(app)),
        (_, token, app) => (token, app),
    };
    if let Some(token) = token {
        logging::register_secret(&token);
        sources.overrides.push(("telegram.token", token));
    }
    if let Some(app) = application {
        sources.overrides.push(("app.application", app));
        if cli.config.is_none() {
            // The original put the current directory on sys.path.
            let cwd = std::env::current_dir()
                .map_err(|e| Failure::Usage(format!("cannot read the current directory: {e}")))?;
            sources
                .overrides
                .push(("app.app_dir", cwd.display().to_string()));
        }
    }
    if let Some(url) = cli.api_url {
        sources.overrides.push(("telegram.api_url", url));
    }
    if cli.config.is_none()
        && !sources
            .overrides
            .iter()
            .any(|(k, _)| *k == "app.application")
    {
        return Err(Failure::Usage(
            "nothing to run: give --config FILE, or TOKEN module:application (see --help)".into(),
        ));
    }
    let settings = Settings::load(&sources)?;
    logging::register_secret(settings.telegram.token.expose());
    // The sandbox chat owns the terminal: only warnings and errors go to
    // stderr there, unless RUST_LOG asks for more.
    let level = if cli.sandbox {
        settings.log.level.min(log::LevelFilter::Warn)
    } else {
        settings.log.level
    };
    logging::init_with(level, settings.log.format);
    if cli.reload {
        asgigramd::reload::watch_app_files();
    }

    if cli.check {
        actix::System::new().block_on(asgigramd::check(settings.clone()))?;
        println!("ok: {} imported and ready", settings.app.application);
        return Ok(());
    }
    if cli.sandbox {
        chat::run(settings)?;
        return Ok(());
    }
    if cli.reset_journal {
        asgigramd::reset_damaged_journal(&settings)?;
    }
    actix::System::new().block_on(asgigramd::run(settings, None))?;
    Ok(())
}
