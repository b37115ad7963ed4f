//! Runs the Python bridge's own unit tests (tests/python) with the same
//! interpreter the daemon defaults to, so `cargo test` covers both sides of
//! the worker channel.

use std::process::Command;

#[test]
fn python_bridge_unit_tests_pass() {
    let out = Command::new("python3")
        .args(["-m", "unittest", "discover", "-s", "tests/python"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("python3 is installed (see .ci/run)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bridge tests failed:\n{stderr}");
    assert!(stderr.contains("OK"), "{stderr}");
}
