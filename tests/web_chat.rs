//! End to end in a real browser: `asgigramd --sandbox-web` with a real
//! Python bot (tests/apps/web_bot.py), driven through headless Chromium by
//! chromedriver (WebDriver). A person types a message and sees the reply,
//! presses an inline button and sees the message edited in place, sends a
//! photo through the file input and sees the bot's answer, finds the calls
//! in the side panel, and, after the daemon restarts, sees the page come
//! back by itself.
//!
//! Without Debian's `chromium` and `chromium-driver` the test says so on
//! stderr and passes, unless `ASGIGRAMD_REQUIRE_BROWSER` is set (as
//! `.ci/run` sets it): then their absence fails it. On any failure a
//! screenshot of the page is saved and its path printed.

mod common;

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::elements::Element;
use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use common::{apps_dir, binary, free_port, DEADLINE};

/// A program on PATH (or at one of the usual places).
fn find_program(names: &[&str]) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for name in names {
        for dir in std::env::split_paths(&path).chain([PathBuf::from("/usr/bin")]) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    None
}

/// A child process killed when dropped.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `asgigramd --sandbox-web ADDR` on the web bot; returns the process and
/// the URL it printed.
fn start_daemon(dir: &Path, addr: &str, log_name: &str) -> (Running, String) {
    let config = dir.join("asgigram.toml");
    std::fs::write(
        &config,
        format!(
            "[app]\napplication = \"web_bot:application\"\napp_dir = \"{}\"\nworkers = 1\n",
            apps_dir().display()
        ),
    )
    .expect("config written");
    let log = std::fs::File::create(dir.join(log_name)).expect("log file");
    let mut child = Command::new(binary())
        .args(["--sandbox-web", addr, "--config"])
        .arg(&config)
        .env_remove("RUST_LOG")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(log)
        .spawn()
        .expect("asgigramd starts");
    let stdout = child.stdout.take().expect("piped");
    let running = Running(child);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { return };
            if let Some(at) = line.find("http://") {
                let _ = tx.send(line[at..].split_whitespace().next().map(str::to_string));
            }
        }
    });
    let url = rx.recv_timeout(DEADLINE).ok().flatten().unwrap_or_else(|| {
        panic!(
            "asgigramd printed no web chat URL; log:\n{}",
            std::fs::read_to_string(dir.join(log_name)).unwrap_or_default()
        )
    });
    (running, url)
}

/// Waits until chromedriver accepts connections.
fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + DEADLINE;
    while TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err() {
        assert!(
            Instant::now() < deadline,
            "chromedriver did not listen on {addr}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

type Step<T> = Result<T, String>;

/// The element `xpath` finds, waited for.
async fn find(client: &Client, xpath: &str) -> Step<Element> {
    client
        .wait()
        .at_most(DEADLINE)
        .every(Duration::from_millis(100))
        .for_element(Locator::XPath(xpath))
        .await
        .map_err(|e| format!("no element {xpath} within {DEADLINE:?}: {e}"))
}

/// Waits until `xpath` finds nothing.
async fn gone(client: &Client, xpath: &str) -> Step<()> {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let found = client
            .find_all(Locator::XPath(xpath))
            .await
            .map_err(|e| e.to_string())?;
        if found.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("{xpath} still there after {DEADLINE:?}"));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// An XPath test for an element whose class list has `class`.
fn has_class(class: &str) -> String {
    format!("contains(concat(' ', normalize-space(@class), ' '), ' {class} ')")
}

/// A bubble (its row) whose text contains `text`; `out` for the person's
/// own messages.
fn bubble(text: &str, out: bool) -> String {
    let side = if out {
        has_class("out")
    } else {
        format!("not({})", has_class("out"))
    };
    format!(
        "//div[{}][{side}]/div[{}][contains(., '{text}')]",
        has_class("row"),
        has_class("bubble")
    )
}

async fn send_text(client: &Client, text: &str) -> Step<()> {
    let input = find(client, "//textarea[@id='text']").await?;
    input.send_keys(text).await.map_err(|e| e.to_string())?;
    // Enter sends, as in Telegram.
    input
        .send_keys(&char::from(fantoccini::key::Key::Enter).to_string())
        .await
        .map_err(|e| e.to_string())
}

async fn scenario(
    client: &Client,
    url: &str,
    photo: &Path,
    restart: impl FnOnce() -> String,
) -> Step<()> {
    client.goto(url).await.map_err(|e| e.to_string())?;
    find(
        client,
        "//div[@id='chat-status'][contains(., 'you are Alice')]",
    )
    .await?;
    // The three chats, Alice's open.
    find(client, "//ul[@id='chats']/li[1][contains(., 'Alice')]").await?;
    find(client, "//ul[@id='chats']/li[2][contains(., 'Bob')]").await?;
    find(
        client,
        "//ul[@id='chats']/li[3][contains(., 'Sandbox group')]",
    )
    .await?;

    // A message and its reply, with the bot's HTML formatting rendered
    // and the user's markup kept as text.
    send_text(client, "hello <i>web</i>").await?;
    find(client, &bubble("hello <i>web</i>", true)).await?;
    let reply = find(client, &bubble("said: hello <i>web</i>", false)).await?;
    let bold = reply
        .find(Locator::XPath(".//b"))
        .await
        .map_err(|e| format!("the reply has no bold part: {e}"))?;
    let bold = bold.text().await.map_err(|e| e.to_string())?;
    if bold != "Alice" {
        return Err(format!("the bold part is {bold:?}, not \"Alice\""));
    }

    // An inline keyboard. An alert answer is a dialog to acknowledge; a
    // notice is a toast, and the press edits the message in place.
    send_text(client, "/start").await?;
    let button = |text: &str| {
        format!(
            "{}/following-sibling::div[{}]//button[normalize-space()='{text}']",
            bubble("Pick one", false),
            has_class("inline-keyboard")
        )
    };
    let alert = find(client, &button("Alert me")).await?;
    alert.click().await.map_err(|e| e.to_string())?;
    find(
        client,
        "//dialog[@id='alert'][@open][contains(., 'it needs an OK')]",
    )
    .await?;
    find(client, "//button[@id='alert-ok']")
        .await?
        .click()
        .await
        .map_err(|e| e.to_string())?;
    gone(client, "//dialog[@id='alert'][@open]").await?;
    let yes = find(client, &button("Yes")).await?;
    yes.click().await.map_err(|e| e.to_string())?;
    find(client, "//div[@id='toast'][contains(., 'You chose yes')]").await?;
    let edited = find(client, &bubble("Chose yes (by Alice)", false)).await?;
    let meta = edited
        .find(Locator::Css(".meta"))
        .await
        .map_err(|e| e.to_string())?;
    let meta = meta.text().await.map_err(|e| e.to_string())?;
    if !meta.contains("edited") {
        return Err(format!(
            "the edited message's time says {meta:?}, not \"edited\""
        ));
    }
    gone(client, &bubble("Pick one", false)).await?;
    gone(
        client,
        "//div[contains(@class, 'inline-keyboard')]//button[normalize-space()='Yes']",
    )
    .await?;

    // A photo through the file input, with a caption; it shows as an
    // image served from the sandbox, and the bot tells its size.
    let input = find(client, "//input[@id='file-input']").await?;
    input
        .send_keys(&photo.display().to_string())
        .await
        .map_err(|e| e.to_string())?;
    let caption = find(client, "//input[@id='upload-caption']").await?;
    caption
        .send_keys("my sun")
        .await
        .map_err(|e| e.to_string())?;
    find(client, "//button[@id='upload-send']")
        .await?
        .click()
        .await
        .map_err(|e| e.to_string())?;
    let size = std::fs::metadata(photo).map_err(|e| e.to_string())?.len();
    find(
        client,
        &bubble(
            &format!("Got your photo: {size} bytes, caption my sun"),
            false,
        ),
    )
    .await?;
    let image = find(
        client,
        &format!("{}//img[{}]", bubble("my sun", true), has_class("photo")),
    )
    .await?;
    let loaded = client
        .execute(
            "return arguments[0].complete && arguments[0].naturalWidth",
            vec![serde_json::to_value(&image).map_err(|e| e.to_string())?],
        )
        .await
        .map_err(|e| e.to_string())?;
    if loaded != json!(48) {
        return Err(format!(
            "the photo did not load as the 48x32 image: {loaded}"
        ));
    }

    // Every call in the side panel, with its parameters.
    for method in [
        "getMe",
        "setMyCommands",
        "sendMessage",
        "answerCallbackQuery",
        "editMessageText",
        "getFile",
    ] {
        find(
            client,
            &format!("//ol[@id='call-list']/li[@data-method='{method}']"),
        )
        .await?;
    }
    let edit = find(
        client,
        "//ol[@id='call-list']/li[@data-method='editMessageText']",
    )
    .await?;
    edit.click().await.map_err(|e| e.to_string())?;
    find(
        client,
        "//ol[@id='call-list']/li[@data-method='editMessageText']//pre[contains(., '\"parse_mode\": \"HTML\"')]",
    )
    .await?;

    // The daemon restarts: the page reconnects by itself to the new
    // sandbox, whose chat is empty, and works on.
    let new_url = restart();
    if new_url != url {
        return Err(format!("the restarted daemon serves {new_url}, not {url}"));
    }
    gone(client, &bubble("Chose yes", false)).await?;
    find(
        client,
        "//div[@id='chat-status'][contains(., 'you are Alice')]",
    )
    .await?;
    send_text(client, "back again").await?;
    find(client, &bubble("said: back again", false)).await?;
    Ok(())
}

#[test]
fn a_person_chats_presses_a_button_and_sends_a_photo_in_a_real_browser() {
    let required = std::env::var_os("ASGIGRAMD_REQUIRE_BROWSER").is_some();
    let (Some(chromium), Some(driver)) = (
        find_program(&["chromium", "chromium-browser", "google-chrome"]),
        find_program(&["chromedriver"]),
    ) else {
        assert!(
            !required,
            "ASGIGRAMD_REQUIRE_BROWSER is set, but chromium or chromedriver is missing \
             (apt-get install chromium chromium-driver)"
        );
        eprintln!(
            "web_chat: SKIPPED: no chromium and chromedriver on PATH \
             (apt-get install chromium chromium-driver; ASGIGRAMD_REQUIRE_BROWSER=1 makes this a failure)"
        );
        return;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let photo = apps_dir().join("sun.png");
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let (daemon, url) = start_daemon(dir.path(), &addr, "daemon.log");
    let mut daemon = Some(daemon);

    let driver_port = free_port();
    let driver_log = std::fs::File::create(dir.path().join("chromedriver.log")).expect("log");
    let _driver = Running(
        Command::new(&driver)
            .arg(format!("--port={driver_port}"))
            .stdin(Stdio::null())
            .stdout(driver_log.try_clone().expect("log"))
            .stderr(driver_log)
            .spawn()
            .expect("chromedriver starts"),
    );
    wait_listening(SocketAddr::from(([127, 0, 0, 1], driver_port)));

    let profile = dir.path().join("chromium-profile");
    let capabilities = json!({
        "goog:chromeOptions": {
            "binary": chromium,
            "args": [
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                "--no-first-run", "--disable-background-networking",
                "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", "--window-size=1400,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }
    });
    let capabilities = match capabilities {
        serde_json::Value::Object(map) => map,
        _ => unreachable!("an object literal"),
    };
    let failure_shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("web-chat-failure.png");
    let dir_path = dir.path().to_path_buf();
    let outcome = actix_rt::System::new().block_on(async {
        let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
            .capabilities(capabilities)
            .connect(&format!("http://127.0.0.1:{driver_port}"))
            .await
            .map_err(|e| format!("chromedriver could not start Chromium: {e}"))?;
        let restart = || {
            // SIGTERM, as a person's Ctrl-C would, then the same address.
            let mut old = daemon.take().expect("running");
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(old.0.id() as i32, libc::SIGTERM);
            }
            let _ = old.0.wait();
            let (new, url) = start_daemon(&dir_path, &addr, "daemon-restarted.log");
            daemon = Some(new);
            url
        };
        let result = scenario(&client, &url, &photo, restart).await;
        if result.is_err() {
            match client.screenshot().await {
                Ok(png) => match std::fs::write(&failure_shot, png) {
                    Ok(()) => eprintln!(
                        "web_chat: screenshot of the failure: {}",
                        failure_shot.display()
                    ),
                    Err(e) => eprintln!("web_chat: could not save the screenshot: {e}"),
                },
                Err(e) => eprintln!("web_chat: could not take a screenshot: {e}"),
            }
        }
        let _ = client.close().await;
        result
    });
    drop(daemon);
    if let Err(e) = outcome {
        let log = |name: &str| std::fs::read_to_string(dir.path().join(name)).unwrap_or_default();
        panic!(
            "{e}\n(screenshot: {})\n--- daemon log ---\n{}{}\n--- chromedriver log (tail) ---\n{}",
            failure_shot.display(),
            log("daemon.log"),
            log("daemon-restarted.log"),
            log("chromedriver.log")
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n"),
        );
    }
}
