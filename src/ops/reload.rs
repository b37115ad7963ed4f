//! What reloads the workers: SIGHUP always, and with `--reload` (development)
//! any change to a `.py` file under the app directory.
//!
//! Both only send [`ReloadWorkers`] to the Supervisor, which replaces the
//! workers one at a time without losing an update.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use actix::prelude::*;

use crate::actors::supervisor::{ReloadWorkers, Supervisor};

static WATCH_FILES: AtomicBool = AtomicBool::new(false);

/// How often `--reload` looks at the files' modification times.
const WATCH_INTERVAL: Duration = Duration::from_secs(1);

/// `--reload`: from now on [`install`] also watches the app's `.py` files.
pub fn watch_app_files() {
    WATCH_FILES.store(true, Ordering::Relaxed);
}

/// Installs the SIGHUP handler and, with `--reload`, the file watcher.
/// Must be called inside the actix System the Supervisor runs on.
pub fn install(supervisor: Addr<Supervisor>, app_dir: &Path) -> std::io::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup())?;
    let to = supervisor.clone();
    actix::spawn(async move {
        while hup.recv().await.is_some() {
            log::info!("SIGHUP received; reloading the workers");
            to.do_send(ReloadWorkers {
                reason: "SIGHUP".into(),
            });
        }
    });
    if WATCH_FILES.load(Ordering::Relaxed) {
        let dir = app_dir.to_path_buf();
        log::info!(
            "watching *.py under dir={} for changes (--reload)",
            dir.display()
        );
        // A plain thread: walking a directory tree blocks, and the actors'
        // thread must not. `Addr` is Send, so the thread can message them.
        std::thread::Builder::new()
            .name("reload-watch".into())
            .spawn(move || watch(dir, supervisor))?;
    }
    Ok(())
}

fn watch(dir: PathBuf, supervisor: Addr<Supervisor>) {
    let mut known = snapshot(&dir);
    while supervisor.connected() {
        std::thread::sleep(WATCH_INTERVAL);
        let now = snapshot(&dir);
        if let Some(changed) = first_change(&known, &now) {
            log::info!(
                "file changed path={}; reloading the workers",
                changed.display()
            );
            supervisor.do_send(ReloadWorkers {
                reason: format!("{} changed", changed.display()),
            });
        }
        known = now;
    }
}

/// The first file added, removed or modified between two snapshots.
fn first_change(
    old: &BTreeMap<PathBuf, SystemTime>,
    new: &BTreeMap<PathBuf, SystemTime>,
) -> Option<PathBuf> {
    new.iter()
        .find(|(p, t)| old.get(*p) != Some(t))
        .map(|(p, _)| p.clone())
        .or_else(|| old.keys().find(|p| !new.contains_key(*p)).cloned())
}

/// Every `.py` file under `dir` with its modification time. Hidden
/// directories, `__pycache__` and virtualenvs are skipped: they change
/// without the app's code changing, or are too big to walk every second.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, SystemTime> {
    let mut files = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                let skip = name.starts_with('.')
                    || name == "__pycache__"
                    || name == "node_modules"
                    || path.join("pyvenv.cfg").exists();
                if !skip {
                    stack.push(path);
                }
            } else if name.ends_with(".py") {
                if let Ok(modified) = meta.modified() {
                    files.insert(path, modified);
                }
            }
        }
    }
    files
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_changed_added_or_removed_py_file_is_noticed() {
        let dir = tempfile::tempdir().expect("temp dir");
        let a = dir.path().join("a.py");
        std::fs::write(&a, "x = 1\n").expect("write a.py");
        std::fs::create_dir(dir.path().join("__pycache__")).expect("mkdir");
        std::fs::write(dir.path().join("__pycache__/a.py"), "").expect("write");
        std::fs::write(dir.path().join("notes.txt"), "").expect("write");
        let before = snapshot(dir.path());
        assert_eq!(before.keys().collect::<Vec<_>>(), vec![&a]);
        assert_eq!(first_change(&before, &before), None);

        let b = dir.path().join("sub/b.py");
        std::fs::create_dir(dir.path().join("sub")).expect("mkdir");
        std::fs::write(&b, "").expect("write b.py");
        let after = snapshot(dir.path());
        assert_eq!(first_change(&before, &after), Some(b));
        std::fs::remove_file(&a).expect("rm a.py");
        assert_eq!(first_change(&after, &snapshot(dir.path())), Some(a));
    }
}
