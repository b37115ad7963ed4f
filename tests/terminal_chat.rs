//! End to end: `asgigramd --sandbox` with piped input, the terminal chat as
//! a script, against tests/apps/buttons.py.

mod common;

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{apps_dir, binary};

/// Runs the chat with `script` as its input from `dir`; returns stdout.
fn chat(dir: &Path, script: &str) -> String {
    let config = dir.join("asgigram.toml");
    std::fs::write(
        &config,
        format!(
            "[app]\napplication = \"buttons:app\"\napp_dir = \"{}\"\n",
            apps_dir().display()
        ),
    )
    .expect("config written");
    let mut child = Command::new(binary())
        .arg("--sandbox")
        .arg("--config")
        .arg(&config)
        .current_dir(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("runs");
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(script.as_bytes())
        .expect("written");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("the chat exits by itself once the replies came")
        .expect("output");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Asserts that `lines` appear in `output` in this order (others between).
fn assert_in_order(output: &str, lines: &[&str]) {
    let mut rest = output.lines();
    for line in lines {
        assert!(
            rest.any(|l| l == *line),
            "missing or out of order: {line:?}\n--- output ---\n{output}"
        );
    }
}

#[test]
fn buttons_are_numbered_and_pressed_and_edits_deletions_and_media_print() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = chat(dir.path(), "/start\n!2\n!3\ncat\ncolours\n!2\ntemp\n!9\n");
    assert_in_order(
        &out,
        &[
            "Pick one",
            "  [1 Yes] [2 No]",
            "  [3 Docs -> https://example.org/docs]",
        ],
    );
    assert_in_order(&out, &["(answer) You chose no"]);
    assert_in_order(&out, &["(edited) Chose no (by Alice)"]);
    // The edit took the keyboard away; button 3 was the link anyway.
    assert_in_order(
        &out,
        &[
            "(edited) Chose no (by Alice)",
            "(no keyboard in this chat)",
            "[photo 512x512, 100 B] a cat",
            "Which colour?",
            "  keyboard: [1 Red] [2 Blue]",
            "private Alice: Blue it is",
            "  (keyboard removed)",
            "short-lived",
            "(deleted) short-lived",
            "(no keyboard in this chat)",
        ],
    );
}

#[test]
fn files_reach_the_app_and_users_and_the_group_are_told_apart() {
    let dir = tempfile::tempdir().expect("temp dir");
    let photo = dir.path().join("pic.png");
    std::fs::write(&photo, vec![7u8; 1234]).expect("photo written");
    std::fs::write(dir.path().join("notes.txt"), "some notes\n").expect("document written");
    let out = chat(
        dir.path(),
        &format!(
            "/photo {} my cat\n/document notes.txt\n/group\nhello group\n/user\n\
             hi from bob\n/private\nhi privately\n/user alice\n//start\n/help\n!!1\n",
            photo.display()
        ),
    );
    assert_in_order(
        &out,
        &[
            "private Alice: got photo of 1234 bytes, caption my cat",
            "private Alice: got document notes.txt of 11 bytes, caption None",
            "[alice @ group]",
            "group Alice: hello group",
            "[bob @ group]",
            "group Bob: hi from bob",
            "[bob @ private]",
            "private Bob: hi privately",
            "[alice @ private]",
            // `//start` is the literal /start, which the app takes as such.
            "Pick one",
            "Sandbox chat commands (anything else is a message to the bot):",
            "private Alice: /help",
            "private Alice: !1",
        ],
    );
}
