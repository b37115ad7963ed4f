//! The generators in `tools/` reproduce the committed generated files byte for
//! byte from the input committed next to them, so a regeneration needs nothing
//! outside the repository and a hand edit of a generated file is caught.

use std::path::Path;
use std::process::Command;

/// Runs `python3 tools/<script>` from the repository root with no argument
/// (the script's default input, `tools/botapi-schema.json`) and returns stdout.
fn generate(script: &str) -> Vec<u8> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let out = Command::new("python3")
        .arg(root.join("tools").join(script))
        .current_dir(root)
        // The output must not depend on the user's locale.
        .env("LC_ALL", "C")
        .env_remove("PYTHONIOENCODING")
        .output()
        .expect("python3 is installed (see .ci/run)");
    assert!(
        out.status.success(),
        "{script} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

fn assert_reproduces(script: &str, committed: &str) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let expected = std::fs::read(root.join(committed)).expect("the generated file is committed");
    let actual = generate(script);
    if actual != expected {
        // The first differing line says more than two megabytes of bytes.
        let first = actual
            .split(|b| *b == b'\n')
            .zip(expected.split(|b| *b == b'\n'))
            .enumerate()
            .find(|(_, (a, e))| a != e);
        match first {
            Some((n, (a, e))) => panic!(
                "python3 tools/{script} differs from {committed} at line {}:\n  generated: {}\n  committed: {}",
                n + 1,
                String::from_utf8_lossy(a),
                String::from_utf8_lossy(e)
            ),
            None => panic!(
                "python3 tools/{script} differs from {committed} in length: {} bytes generated, {} committed",
                actual.len(),
                expected.len()
            ),
        }
    }
}

#[test]
fn gen_methods_reproduces_src_telegram_methods_rs() {
    assert_reproduces("gen_methods.py", "src/telegram/methods.rs");
}

#[test]
fn gen_sandbox_schema_reproduces_src_sandbox_schema_json() {
    assert_reproduces("gen_sandbox_schema.py", "src/sandbox/schema.json");
}
