//! The bridge as bytecode: compiled once per interpreter by a short-lived
//! Python process, then handed to every worker on its stdin.
//!
//! Compiling the bridge's source inside a worker (`python -c SOURCE`) leaves
//! the compiler's memory in the worker for good: CPython keeps the arenas
//! its parser and compiler touched, about 2.8 MB of a 25 MB worker, and the
//! compile's CPU is spent again at every worker start and restart. A worker
//! that loads the bytecode skips both. Nothing is written to disk, so a
//! read-only root filesystem is no obstacle.
//!
//! Bytecode belongs to one CPython version, so the cache is keyed by the
//! interpreter's path and its file's size and modification time: an
//! interpreter upgraded in place is compiled for again. The first line of
//! what the compiler prints is its `sys.hexversion`, which the loader
//! checks too, and says so in one line if it differs. If compiling fails
//! (an interpreter that is not CPython, one that hangs), workers are
//! started from the source as before.

use std::ffi::OsString;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, SystemTime};

use super::BRIDGE_SOURCE;

/// Run by the compiling process with the bridge's source as its argument.
const COMPILE: &str = r#"import marshal, sys
sys.stdout.buffer.write(b'%d\n' % sys.hexversion + marshal.dumps(compile(sys.argv[1], 'asgigram_bridge.py', 'exec')))
"#;

/// Run by every worker: the bytecode comes on stdin, which is then
/// /dev/null for the app, as it was when the source came on the command
/// line. Its names are removed before the bridge runs in `__main__`, as the
/// source would.
pub const LOADER: &str = r#"import marshal as _m, os as _o, sys as _s
_v, _c = _s.stdin.buffer.read().split(b'\n', 1)
if int(_v) != _s.hexversion:
    raise SystemExit('asgigramd: the bridge was compiled by Python %x, this is %x; restart asgigramd' % (int(_v), _s.hexversion))
_c = _m.loads(_c)
_n = _o.open(_o.devnull, _o.O_RDONLY)
_o.dup2(_n, 0)
_o.close(_n)
del _m, _o, _s, _n, _v
exec(_c)
"#;

/// How long the compiling process may take: far more than it needs (tens
/// of milliseconds), so only a broken interpreter meets it. It runs on the
/// actor thread, once per interpreter (at the first worker's start, and
/// after a reload names another), which a broken one holds up this long.
const COMPILE_TIMEOUT: Duration = Duration::from_secs(5);

/// Which interpreter file the bytecode was made by.
#[derive(Clone, PartialEq, Eq, Debug)]
struct Interpreter {
    python: String,
    file: Option<(PathBuf, u64, Option<SystemTime>)>,
}

impl Interpreter {
    fn of(python: &str) -> Interpreter {
        let file = resolve(python).and_then(|path| {
            let meta = std::fs::metadata(&path).ok()?;
            Some((path, meta.len(), meta.modified().ok()))
        });
        Interpreter {
            python: python.to_owned(),
            file,
        }
    }
}

/// The file `python` names, searched on PATH as exec would.
fn resolve(python: &str) -> Option<PathBuf> {
    if python.contains('/') {
        return std::fs::canonicalize(python).ok();
    }
    let path = std::env::var_os("PATH").unwrap_or_else(|| OsString::from("/usr/bin:/bin"));
    std::env::split_paths(&path)
        .map(|dir| dir.join(python))
        .find(|candidate| is_executable(candidate))
        .and_then(|found| std::fs::canonicalize(found).ok())
}

fn is_executable(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What was compiled last, and by which interpreter (`None`: it failed).
type Cached = Option<(Interpreter, Option<Arc<[u8]>>)>;

/// The bridge's bytecode for `python`, compiled on first use; `None` when it
/// cannot be had, and workers are started from the source.
pub fn bytecode(python: &str, scrub: impl Fn(&mut Command)) -> Option<Arc<[u8]>> {
    static CACHE: Mutex<Cached> = Mutex::new(None);
    let interpreter = Interpreter::of(python);
    // A poisoned lock only means a compile panicked; the cache is rebuilt.
    let mut cache = CACHE.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((made_by, code)) = cache.as_ref() {
        if *made_by == interpreter {
            return code.clone();
        }
    }
    let code = compile(python, scrub).map(Arc::from);
    if code.is_none() {
        log::warn!(
            "could not compile the bridge with {python:?}; workers compile it themselves (about 3 MB more each)"
        );
    }
    *cache = Some((interpreter, code.clone()));
    code
}

fn compile(python: &str, scrub: impl Fn(&mut Command)) -> Option<Vec<u8>> {
    let mut cmd = Command::new(python);
    cmd.arg("-c")
        .arg(COMPILE)
        .arg(BRIDGE_SOURCE)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    scrub(&mut cmd);
    let mut child = cmd.spawn().ok()?;
    let mut out = child.stdout.take()?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut code = Vec::new();
        let _ = tx.send(out.read_to_end(&mut code).map(|_| code));
    });
    let code = rx.recv_timeout(COMPILE_TIMEOUT).ok().and_then(Result::ok);
    if code.is_none() {
        let _ = child.kill();
    }
    let succeeded = child.wait().is_ok_and(|status| status.success());
    code.filter(|c| succeeded && c.contains(&b'\n'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_interpreter_is_found_on_path_and_one_that_is_not_compiles_nothing() {
        let found = Interpreter::of("python3");
        assert!(found.file.is_some(), "python3 is on PATH in the tests");
        assert_eq!(
            found,
            Interpreter::of("python3"),
            "the same file, the same key"
        );
        assert!(compile("/nonexistent/python3", |_| {}).is_none());
        // `false` runs and fails: no bytecode, and no hang.
        assert!(compile("false", |_| {}).is_none());
    }

    #[test]
    fn the_loader_runs_the_bridge_from_its_bytecode_and_refuses_another_versions() {
        use std::io::Write;
        let code = compile("python3", |_| {}).expect("python3 compiles the bridge");
        let run = |input: &[u8]| {
            let mut child = Command::new("python3")
                .args(["-c", LOADER, "--help"])
                .stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("python3 starts");
            let mut stdin = child.stdin.take().expect("piped");
            stdin.write_all(input).expect("bytecode written");
            drop(stdin);
            child.wait_with_output().expect("python3 ends")
        };
        let ran = run(&code);
        let usage = String::from_utf8_lossy(&ran.stdout).into_owned()
            + &String::from_utf8_lossy(&ran.stderr);
        assert!(ran.status.success(), "{usage}");
        assert!(usage.contains("--fd"), "the bridge's own usage: {usage}");

        let newline = code.iter().position(|b| *b == b'\n');
        let (_, marshalled) = code.split_at(newline.expect("compile() checked the line") + 1);
        let mut other = b"50594288\n".to_vec(); // 0x30401f0: Python 3.4.1
        other.extend_from_slice(marshalled);
        let refused = run(&other);
        assert!(!refused.status.success());
        assert!(
            String::from_utf8_lossy(&refused.stderr).contains("compiled by Python 30401f0"),
            "{}",
            String::from_utf8_lossy(&refused.stderr)
        );
    }
}
