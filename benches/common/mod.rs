//! What the daemon benches share: which binary they run, the configuration
//! they run it with, and the date their figures are stamped with.

use std::path::{Path, PathBuf};
use std::process::Command;

use asgigramd::sandbox::Sandbox;

/// `ASGIGRAMD_BIN` if set (to compare builds under the same harness), else
/// the release build beside this bench (`target/release/deps/..`), which
/// follows `CARGO_TARGET_DIR`, else `target/release/asgigramd`.
pub fn daemon_binary() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.parent()?.join("asgigramd")))
        .filter(|b| b.exists());
    std::env::var_os("ASGIGRAMD_BIN")
        .map(PathBuf::from)
        .or(beside)
        .unwrap_or_else(|| root().join("target/release/asgigramd"))
}

/// The repository, for `tests/apps`.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The daemon against `sandbox` with `app` from `tests/apps` in `workers`
/// workers, limits off, the journal (fsync on) in `journal`, warnings only;
/// `extra` is appended (whole sections).
pub fn config(sandbox: &Sandbox, app: &str, workers: usize, journal: &Path, extra: &str) -> String {
    // startup_timeout: under callgrind the daemon starts tens of times slower.
    format!(
        "[telegram]\ntoken = \"{}\"\napi_url = \"{}\"\npoll_timeout = 5\n\n\
         [app]\napplication = \"{app}\"\napp_dir = \"{}\"\nworkers = {workers}\nstartup_timeout = 120\n\n\
         [sender]\nlimits = false\n\n[journal]\ndir = \"{}\"\n\n[log]\nlevel = \"warn\"\n\n{extra}",
        sandbox.token(),
        sandbox.api_url(),
        root().join("tests/apps").display(),
        journal.display()
    )
}

pub fn date() -> String {
    Command::new("date")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

/// The instruction count callgrind wrote to `file` (its `totals:` line).
// Only the callgrind benches call it; the others share this module.
#[allow(dead_code)]
pub fn callgrind_total(file: &Path) -> u64 {
    std::fs::read_to_string(file)
        .expect("callgrind wrote its file")
        .lines()
        .find_map(|l| {
            l.strip_prefix("totals:")
                .or_else(|| l.strip_prefix("summary:"))
        })
        .and_then(|v| v.trim().parse().ok())
        .expect("callgrind's file has its totals")
}
