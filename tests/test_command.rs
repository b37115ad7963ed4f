//! The README's test command is self-sufficient: it installs the Python
//! packages the tests need and then runs `cargo test`, and `.ci/run` runs
//! exactly that command rather than a copy of its own.

use std::path::Path;
use std::process::Command;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// The one indented command line of README.md's "## Run the tests" section.
fn readme_test_command() -> String {
    let readme = std::fs::read_to_string(root().join("README.md")).expect("README.md is committed");
    let section = readme
        .split("\n## ")
        .find(|s| s.starts_with("Run the tests\n"))
        .expect("README.md has a \"## Run the tests\" section");
    let commands: Vec<&str> = section
        .lines()
        .filter_map(|l| l.strip_prefix("    "))
        .collect();
    assert_eq!(
        commands.len(),
        1,
        "the test section shows one command line: {commands:?}"
    );
    commands[0].to_string()
}

#[test]
fn readme_test_command_installs_the_test_requirements_then_runs_cargo_test() {
    let command = readme_test_command();
    let install = command
        .find("-r tests/requirements.txt")
        .unwrap_or_else(|| panic!("{command:?} does not install tests/requirements.txt"));
    let test = command
        .find("cargo test")
        .unwrap_or_else(|| panic!("{command:?} does not run cargo test"));
    assert!(install < test, "{command:?} installs after testing");
    // A system python3 on Debian 12, Ubuntu 23.04+ or Homebrew refuses
    // `pip install` outside a virtual environment (PEP 668).
    assert!(
        command.contains("-m venv "),
        "{command:?} installs outside a virtual environment"
    );
}

#[test]
fn ci_runs_exactly_the_readme_test_command() {
    let command = readme_test_command();
    let out = Command::new("bash")
        .arg(root().join(".ci/run"))
        .arg("--print-command")
        .output()
        .expect("bash is installed");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{command}\n"));
}
