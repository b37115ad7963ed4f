//! Runs the `asgigram` package's own pytest suite (python/tests) with the
//! interpreter the daemon defaults to, the virtualenv's when the README's
//! test command put it first on PATH (tests/requirements.txt installs
//! pytest and the package there), so `cargo test` covers the package too.

use std::process::Command;

#[test]
fn asgigram_package_tests_pass() {
    let out = Command::new("python3")
        // No cache folder written into the source tree.
        .args(["-m", "pytest", "-q", "-p", "no:cacheprovider"])
        .current_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/python"))
        .output()
        .expect("python3 is installed (see .ci/run)");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "python/tests failed (is pytest installed? see tests/requirements.txt):\n{stdout}\n{stderr}"
    );
    assert!(stdout.contains(" passed"), "{stdout}");
    assert!(
        !stdout.contains(" skipped"),
        "a part of the suite did not run:\n{stdout}"
    );
}
