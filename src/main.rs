//! The `asgigramd` command: parse arguments, load settings, set up logging,
//! run. The only place that turns an error into an exit code.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use asgigramd::journal::JournalError;
use asgigramd::ops::logging;
use asgigramd::settings::{LogFormat, Settings, Sources};
use asgigramd::{chat, RunError};

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
        asgigramd --sandbox-web 8090 --config config/asgigram.toml   (in the browser: http://127.0.0.1:8090/)\n  \
        asgigramd 123456:ABC-token mybot.asgi:application  (the original asgigram form)\n  \
        asgigramd sandbox --listen 8081 --web 8090   (the Bot API emulator alone, for any bot)\n  \
        asgigramd cluster status --config asgigram.toml   (what the NATS cluster holds for the bot)\n\n\
        Every setting can also come from ASGIGRAM_<SECTION>__<KEY> environment variables."
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Subcommand>,

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

    /// Run against a local Bot API emulator and serve a Telegram-like web
    /// chat with the bot on ADDR: IP:PORT, or :PORT or PORT for
    /// 127.0.0.1. With --sandbox too, the terminal chat runs beside it on
    /// the same sandbox.
    #[arg(long, value_name = "ADDR", value_parser = web_addr)]
    sandbox_web: Option<SocketAddr>,

    /// Development: restart the workers whenever a .py file under the app
    /// directory changes (SIGHUP does the same on demand).
    #[arg(long)]
    reload: bool,

    /// If the journal is damaged, move its files aside (renamed with a
    /// timestamp, never deleted) and start with an empty journal. An intact
    /// journal is kept.
    #[arg(long, conflicts_with_all = ["check", "sandbox", "sandbox_web"])]
    reset_journal: bool,

    /// Bot API base URL (telegram.api_url).
    #[arg(long, value_name = "URL")]
    api_url: Option<String>,

    /// Bot token (original form: `asgigramd TOKEN module:application`).
    /// Other users can read arguments: prefer ASGIGRAM_TELEGRAM__TOKEN.
    /// With --sandbox or --sandbox-web, a single positional argument is the
    /// application.
    #[arg(value_name = "TOKEN")]
    token: Option<String>,

    /// ASGI application as module.path:attribute (original form).
    #[arg(value_name = "APPLICATION")]
    application: Option<String>,
}

#[derive(clap::Subcommand, Debug)]
enum Subcommand {
    /// Run the local Bot API emulator on its own, for any bot or framework
    /// pointed at it (and other asgigramd nodes), with the web chat to play
    /// its users. Runs until SIGINT or SIGTERM.
    Sandbox {
        /// Where the Bot API listens: IP:PORT, or :PORT or PORT for
        /// 127.0.0.1.
        #[arg(long, value_name = "ADDR", value_parser = web_addr, default_value = "127.0.0.1:8081")]
        listen: SocketAddr,

        /// Also serve the web chat on ADDR.
        #[arg(long, value_name = "ADDR", value_parser = web_addr)]
        web: Option<SocketAddr>,

        /// The one token the emulator accepts (default: a fixed local one,
        /// printed at start).
        #[arg(long, value_name = "TOKEN")]
        token: Option<String>,
    },
    /// Cluster mode's tools (docs/cluster.md).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
enum ClusterCommand {
    /// Print the cluster's view of the bot: the NATS servers reached, the
    /// JetStream cluster's peers, the update log stream and its replicas,
    /// and every lease with its holder. Reads only; creates nothing.
    #[command(
        after_help = "Reads the same settings as the daemon (the config file and \
        ASGIGRAM_* variables; [cluster] and the bot token, whose numeric id names the \
        stream and the bucket; the token itself is never sent or printed).\n\n\
        Exit status:\n  \
        0  connected and read (also when the stream or the bucket does not exist yet, \
        or some servers are unreachable: the output says so)\n  \
        1  no configured server could be reached, a JetStream request failed, or the \
        configuration is wrong or has no [cluster]; one line on stderr says which\n  \
        2  wrong arguments"
    )]
    Status {
        /// TOML configuration file, as the daemon's --config.
        #[arg(short, long, value_name = "FILE")]
        config: Option<PathBuf>,

        /// One JSON object with stable keys instead of the tables.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let result = match cli.command.take() {
        Some(Subcommand::Sandbox { listen, web, token }) => {
            logging::init_with(log::LevelFilter::Info, LogFormat::Text);
            chat::standalone(listen, web, token).map_err(Failure::from)
        }
        Some(Subcommand::Cluster {
            command: ClusterCommand::Status { config, json },
        }) => cluster_status(config, json),
        None => run(cli),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        // A second signal: the log said "exiting now"; the shell's code for
        // an interrupt, and nothing more to say.
        Err(Failure::Run(RunError::Interrupted)) => ExitCode::from(130),
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
    /// Settings that parse but cannot serve the command (exit 1, unlike a
    /// usage error).
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Cluster(#[from] asgigramd::cluster::ClusterError),
}

/// `asgigramd cluster status`: the whole cluster's view, printed once.
fn cluster_status(config: Option<PathBuf>, json: bool) -> Result<(), Failure> {
    let sources = Sources {
        file: config,
        ..Sources::default()
    };
    let settings = Settings::load(&sources)?;
    register_secrets(&settings);
    let Some(cluster) = settings.cluster else {
        return Err(Failure::Config(
            "cluster mode is not configured: set cluster.nats_urls (or \
             ASGIGRAM_CLUSTER__NATS_URLS) to the NATS servers' URLs"
                .into(),
        ));
    };
    let bot_id = asgigramd::cluster::bot_id(&settings.telegram.token)?;
    let status =
        actix::System::new().block_on(asgigramd::cluster::status::read(&cluster, bot_id))?;
    if json {
        // Plain data: serializing it cannot fail.
        let text = serde_json::to_string(&status).expect("the status serializes");
        println!("{text}");
    } else {
        print!("{}", asgigramd::cluster::status::render(&status));
    }
    Ok(())
}

/// Every secret of the settings, for the redaction of what is printed.
fn register_secrets(settings: &Settings) {
    for secret in settings.secrets() {
        logging::register_secret(secret);
    }
}

/// `--sandbox-web`'s address: `IP:PORT`, `localhost:PORT`, or `:PORT` and
/// `PORT` on 127.0.0.1.
fn web_addr(text: &str) -> Result<SocketAddr, String> {
    if let Ok(addr) = text.parse() {
        return Ok(addr);
    }
    let port = text
        .strip_prefix(':')
        .or_else(|| text.strip_prefix("localhost:"))
        .unwrap_or(text);
    port.parse::<u16>()
        .map(|port| SocketAddr::from((Ipv4Addr::LOCALHOST, port)))
        .map_err(|_| {
            format!(
                "expected IP:PORT, :PORT or PORT (such as 127.0.0.1:8090 or 8090), not {text:?}"
            )
        })
}

fn run(cli: Cli) -> Result<(), Failure> {
    let sandbox = cli.sandbox || cli.sandbox_web.is_some();
    let mut sources = Sources {
        file: cli.config.clone(),
        token_optional: sandbox || cli.check,
        ..Sources::default()
    };
    let (token, application) = match (sandbox, cli.token, cli.application) {
        // `--sandbox module:app`: the one positional is the application.
        (true, Some(app), None) => (None, Some(app)),
        (_, token, app) => (token, app),
    };
    // Some(outcome) when the token came from argv: the warning goes out once
    // logging is set up.
    let mut token_in_argv = None;
    if let Some(token) = token {
        logging::register_secret(&token);
        token_in_argv = Some(argv::overwrite(&token));
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
    register_secrets(&settings);
    // The terminal chat owns the terminal: only warnings and errors go to
    // stderr there, unless RUST_LOG asks for more. The web chat alone
    // leaves the terminal to the log.
    let level = if cli.sandbox {
        settings.log.level.min(log::LevelFilter::Warn)
    } else {
        settings.log.level
    };
    logging::init_with(level, settings.log.format);
    if let Some(outcome) = token_in_argv {
        let pid = std::process::id();
        let how = match outcome {
            Ok(()) => format!(
                "it is now overwritten in /proc/{pid}/cmdline but was readable there until then"
            ),
            Err(e) => {
                format!("it stays readable in /proc/{pid}/cmdline, overwriting it failed: {e}")
            }
        };
        log::warn!(
            "the bot token was given on the command line, where every user of this machine can read it ({how}); \
             give it in ASGIGRAM_TELEGRAM__TOKEN or a telegram.token_file instead"
        );
    }
    if cli.reload {
        asgigramd::ops::reload::watch_app_files();
    }

    if cli.check {
        actix::System::new().block_on(asgigramd::check(settings.clone()))?;
        println!("ok: {} imported and ready", settings.app.application);
        return Ok(());
    }
    if sandbox {
        let views = chat::Views {
            terminal: cli.sandbox,
            web: cli.sandbox_web,
        };
        chat::run(settings, views)?;
        return Ok(());
    }
    if cli.reset_journal {
        asgigramd::reset_damaged_journal(&settings)?;
    }
    actix::System::new().block_on(asgigramd::run(settings, None))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn web_chat_addresses_default_to_loopback() {
        let local = |port| SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        assert_eq!(web_addr("8090"), Ok(local(8090)));
        assert_eq!(web_addr(":8090"), Ok(local(8090)));
        assert_eq!(web_addr("localhost:8090"), Ok(local(8090)));
        assert_eq!(
            web_addr("0.0.0.0:80"),
            Ok("0.0.0.0:80".parse().expect("an address"))
        );
        assert_eq!(
            web_addr("[::1]:9"),
            Ok("[::1]:9".parse().expect("an address"))
        );
        assert!(web_addr("example.org:80").is_err());
        assert!(web_addr("99999").is_err());
    }
}

/// Hiding a secret given on the command line from other users.
///
/// `/proc/PID/cmdline`, readable by everyone, is the process's own argument
/// strings, read live from its memory: the kernel copied them to the
/// initial stack at exec, between the addresses `/proc/self/stat` gives as
/// `arg_start` and `arg_end`. Overwriting the bytes there hides them.
mod argv {
    use std::io;
    use std::ops::Range;
    use std::os::unix::fs::FileExt;

    /// Overwrites with 'x' every argument (but the program name) that is
    /// exactly `secret`. Call it before any thread starts: `std::env::args`
    /// reads the same memory.
    pub fn overwrite(secret: &str) -> io::Result<()> {
        let stat = std::fs::read_to_string("/proc/self/stat")?;
        let area = arg_area(&stat)
            .ok_or_else(|| io::Error::other("no arg_start/arg_end in /proc/self/stat"))?;
        // Read through /proc/self/mem, which fails cleanly rather than faulting
        // if the addresses were wrong, and must match what others see.
        let mut bytes = vec![0; area.len()];
        std::fs::File::open("/proc/self/mem")?.read_exact_at(&mut bytes, area.start as u64)?;
        if bytes != std::fs::read("/proc/self/cmdline")? {
            return Err(io::Error::other(
                "the argument area does not hold what /proc/self/cmdline shows",
            ));
        }
        let found = secret_ranges(&bytes, secret.as_bytes());
        if found.is_empty() {
            return Err(io::Error::other("the token is not one of the arguments"));
        }
        for range in found {
            // SAFETY: `range` lies within [arg_start, arg_end), memory the
            // kernel mapped writable for the process's whole life, just read
            // back above. No Rust reference points into it: std keeps only
            // raw pointers (for env::args), and no other thread runs yet.
            unsafe {
                std::ptr::write_bytes((area.start + range.start) as *mut u8, b'x', range.len());
            }
        }
        Ok(())
    }

    /// `arg_start..arg_end` from the text of /proc/PID/stat (fields 48, 49).
    pub fn arg_area(stat: &str) -> Option<Range<usize>> {
        // The command name (field 2) is in parentheses and may itself hold
        // spaces and parentheses; the fields after its last ')' start at 3.
        let rest = &stat[stat.rfind(')')? + 1..];
        let mut fields = rest.split_whitespace().skip(48 - 3);
        let start: usize = fields.next()?.parse().ok()?;
        let end: usize = fields.next()?.parse().ok()?;
        (start > 0 && start < end).then_some(start..end)
    }

    /// Where `secret` is a whole argument (after the first, the program) in
    /// NUL-separated `args`.
    pub fn secret_ranges(args: &[u8], secret: &[u8]) -> Vec<Range<usize>> {
        let mut found = Vec::new();
        let mut offset = 0;
        for (i, arg) in args.split(|&b| b == 0).enumerate() {
            if i > 0 && !secret.is_empty() && arg == secret {
                found.push(offset..offset + arg.len());
            }
            offset += arg.len() + 1;
        }
        found
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn the_argument_area_is_read_past_a_command_name_with_parentheses() {
            let mut fields: Vec<String> = (3..=52).map(|n| n.to_string()).collect();
            fields[48 - 3] = "140737488347000".into();
            fields[49 - 3] = "140737488347100".into();
            let stat = format!("1234 (a) b (c)) {}\n", fields.join(" "));
            assert_eq!(arg_area(&stat), Some(140737488347000..140737488347100));
            assert_eq!(arg_area("1234 (short) S 1 2"), None);
            fields[49 - 3] = "0".into();
            assert_eq!(arg_area(&format!("1 (a) {}", fields.join(" "))), None);
        }

        #[test]
        fn only_whole_arguments_after_the_program_name_match() {
            let args = b"asgigramd\x0042:tok\x00echo:app\x00--x=42:tok\x0042:tok\x00";
            assert_eq!(secret_ranges(args, b"42:tok"), vec![10..16, 37..43]);
            assert!(secret_ranges(b"42:tok\x00a\x00", b"42:tok").is_empty());
            assert!(secret_ranges(args, b"").is_empty());
        }
    }
}
