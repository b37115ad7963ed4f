//! The daemon from pip: the wheel maturin makes of the `asgigramd` binary
//! (`pyproject.toml`) installs into a fresh virtualenv, puts `asgigramd` on
//! that virtualenv's PATH, and runs a bot there whose workers use the
//! virtualenv's interpreter although the configuration names none.
//!
//! The wheel is the one in the target directory's `wheels/` that `maturin
//! build` leaves there, if it is newer than every source it is built from.
//! `.ci/run` builds it (`maturin build --release`) and sets
//! `ASGIGRAMD_REQUIRE_WHEEL=1`; with that variable a missing or stale wheel
//! is built here (`maturin build`, the dev profile, which reuses the binary
//! the tests run), and a failure to build it fails the test. Without it
//! (plain `cargo test`) the test says on stderr that it skipped, and passes.
//!
//! The variable's name does not start with `ASGIGRAM_`: the daemon reads
//! every such variable as a setting and refuses unknown ones.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, SystemTime};

const REQUIRE: &str = "ASGIGRAMD_REQUIRE_WHEEL";

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Where maturin puts wheels: `wheels/` in the cargo target directory, the
/// one that holds the profile directory of the binary under test.
fn wheel_dir() -> PathBuf {
    Path::new(common::binary())
        .parent()
        .and_then(Path::parent)
        .expect("the test binary lives in <target>/<profile>/")
        .join("wheels")
}

/// The newest modification time among the files the wheel is built from.
fn newest_source() -> SystemTime {
    fn walk(path: &Path, newest: &mut SystemTime) {
        let meta = std::fs::metadata(path)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        if meta.is_dir() {
            for entry in std::fs::read_dir(path).expect("a directory just listed") {
                walk(&entry.expect("a directory entry").path(), newest);
            }
        } else if let Ok(modified) = meta.modified() {
            *newest = (*newest).max(modified);
        }
    }
    let mut newest = SystemTime::UNIX_EPOCH;
    for source in [
        "src",
        "config/default.toml",
        "Cargo.toml",
        "Cargo.lock",
        "pyproject.toml",
    ] {
        walk(&root().join(source), &mut newest);
    }
    newest
}

/// This version's wheel in `dir`, if one is there and no source is newer.
fn fresh_wheel(dir: &Path) -> Result<PathBuf, String> {
    let prefix = format!("asgigramd-{}-", env!("CARGO_PKG_VERSION"));
    let mut wheels: Vec<(SystemTime, PathBuf)> = std::fs::read_dir(dir)
        .map_err(|e| format!("no wheel in {}: {e}", dir.display()))?
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| {
            let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
            name.starts_with(&prefix) && name.ends_with(".whl")
        })
        .filter_map(|path| Some((std::fs::metadata(&path).ok()?.modified().ok()?, path)))
        .collect();
    wheels.sort();
    let (built, wheel) = wheels
        .pop()
        .ok_or_else(|| format!("no {prefix}*.whl in {}", dir.display()))?;
    if built < newest_source() {
        return Err(format!(
            "{} is older than the sources; rebuild it with `maturin build`",
            wheel.display()
        ));
    }
    Ok(wheel)
}

/// maturin from PATH, else the one `.ci/run` installs under target/.
fn maturin() -> PathBuf {
    let ci = root().join("target/maturin/bin/maturin");
    let on_path = Command::new("maturin")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if on_path || !ci.exists() {
        PathBuf::from("maturin")
    } else {
        ci
    }
}

/// Builds the wheel into `dir` with maturin's dev profile.
fn build_wheel(dir: &Path) {
    let maturin = maturin();
    let out = Command::new(&maturin)
        .args(["build", "--out"])
        .arg(dir)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "{REQUIRE} is set and there is no fresh wheel, but {} cannot run ({e}): \
                 `pip install maturin`, or run .ci/run",
                maturin.display()
            )
        });
    assert!(
        out.status.success(),
        "maturin build failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn run(command: &mut Command) -> Output {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {command:?}: {e}"));
    assert!(
        out.status.success(),
        "{command:?} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// A bot that answers every text with the `sys.prefix` of the interpreter
/// its worker runs in.
const PREFIX_BOT: &str = r#"
import sys


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            event = await receive()
            if event["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif event["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    while True:
        event = await receive()
        if event["type"] == "telegram.message" and "text" in event:
            await send({"type": "telegram.send_message", "text": sys.prefix})
        elif event["type"] == "telegram.disconnect":
            return
"#;

#[test]
fn the_wheel_installs_asgigramd_into_a_virtualenv_whose_python_runs_the_workers() {
    let dir = wheel_dir();
    let wheel = match fresh_wheel(&dir) {
        Ok(wheel) => wheel,
        Err(_) if std::env::var_os(REQUIRE).is_some_and(|v| v == "1") => {
            build_wheel(&dir);
            fresh_wheel(&dir).unwrap_or_else(|e| panic!("maturin built no usable wheel: {e}"))
        }
        Err(why) => {
            // Straight to stderr: the test harness captures eprintln! of a
            // passing test, and a skip nobody sees is a silent pass.
            let _ = writeln!(
                std::io::stderr().lock(),
                "\n*** SKIPPED the wheel test: {why}.\n*** Build it with `maturin build`, \
                 or set {REQUIRE}=1 to build it here (.ci/run does).\n"
            );
            return;
        }
    };

    let tmp = tempfile::tempdir().expect("temp dir");
    let venv = tmp.path().join("venv");
    run(Command::new("python3").args(["-m", "venv"]).arg(&venv));
    let bin = venv.join("bin");
    // Nothing to fetch: the wheel has no dependencies.
    run(Command::new(bin.join("python"))
        .args([
            "-m",
            "pip",
            "install",
            "--no-index",
            "--no-deps",
            "--disable-pip-version-check",
            "--quiet",
        ])
        .arg(&wheel));

    // On the virtualenv's PATH, as activating it would set it.
    let path = std::env::join_paths(std::iter::once(bin.clone()).chain(std::env::split_paths(
        &std::env::var_os("PATH").unwrap_or_default(),
    )))
    .expect("PATH entries have no separator in them");
    let version = run(Command::new("asgigramd")
        .arg("--version")
        .env("PATH", &path));
    assert_eq!(
        String::from_utf8_lossy(&version.stdout),
        format!("asgigramd {}\n", env!("CARGO_PKG_VERSION"))
    );

    // Run by its full path with the test's own PATH, whose python3 is another
    // interpreter: only the rule "the python beside the binary" finds the
    // virtualenv's.
    let bot = tmp.path().join("bot");
    std::fs::create_dir(&bot).expect("bot dir");
    std::fs::write(bot.join("prefixbot.py"), PREFIX_BOT).expect("app written");
    std::fs::write(
        bot.join("asgigram.toml"),
        "[app]\napplication = \"prefixbot:app\"\n",
    )
    .expect("config written");
    let mut child = Command::new(bin.join("asgigramd"))
        .args(["--sandbox", "--config"])
        .arg(bot.join("asgigram.toml"))
        .current_dir(tmp.path())
        .env("RUST_LOG", "info")
        .env_remove("ASGIGRAM_APP__PYTHON")
        .env_remove("VIRTUAL_ENV")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the installed asgigramd runs");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(b"where are you?\n")
        .expect("written");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(90))
        .expect("the sandbox chat exits by itself once the reply came")
        .expect("output");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let reply = String::from_utf8_lossy(&out.stdout);
    let prefix = Path::new(reply.trim_end());
    assert_eq!(
        prefix.canonicalize().ok(),
        venv.canonicalize().ok(),
        "the worker ran in {prefix:?}, not the virtualenv {venv:?}; log:\n{stderr}"
    );
    let python = bin.join("python3");
    assert!(
        stderr.contains(&format!("python={}", python.display())),
        "the start line names {python:?}:\n{stderr}"
    );
}
