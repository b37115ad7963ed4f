//! The sandbox seen from a bot: plain HTTP/1.1 over `TcpStream`, so the
//! tests exercise exactly the bytes a client would.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::*;

/// Upper bound for every wait in these tests.
const WAIT: Duration = Duration::from_secs(5);

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", String::from_utf8_lossy(&self.body)))
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// Sends one request on a fresh connection and reads the answer to the end.
/// An empty answer means the server dropped the connection.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    content_type: Option<&str>,
    body: &[u8],
) -> io::Result<Option<Response>> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut head = format!(
        "{method} {path} HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(content_type) = content_type {
        head.push_str(&format!("Content-Type: {content_type}\r\n"));
    }
    head.push_str("\r\n");
    stream.write_all(head.as_bytes())?;
    stream.write_all(body)?;
    let mut raw = Vec::new();
    match stream.read_to_end(&mut raw) {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::ConnectionReset => return Ok(None),
        Err(e) => return Err(e),
    }
    if raw.is_empty() {
        return Ok(None);
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("response has a header block");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|s| s.parse().ok())
        .expect("status line");
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Some(Response {
        status,
        headers,
        body: raw[split + 4..].to_vec(),
    }))
}

/// A getUpdates with a 10 s timeout, on a thread of its own.
fn long_poll(sb: &Sandbox) -> thread::JoinHandle<Response> {
    let (addr, path) = (
        sb.local_addr(),
        format!("/bot{}/getUpdates?timeout=10", sb.token()),
    );
    thread::spawn(move || http(addr, "GET", &path, None, b"").unwrap().unwrap())
}

/// [`long_poll`], once the sandbox holds it parked.
fn parked_poll(sb: &Sandbox) -> thread::JoinHandle<Response> {
    let poller = long_poll(sb);
    assert!(sb.wait_until(WAIT, |v| v.is_polling()));
    poller
}

fn start() -> Sandbox {
    Sandbox::start(SandboxOptions {
        first_update_id: 500,
        seed: 7,
        ..SandboxOptions::default()
    })
    .unwrap()
}

/// POSTs `params` as JSON to a method and expects an answer.
fn call(sb: &Sandbox, method: &str, params: Value) -> Response {
    try_call(sb, method, params).expect("an answer")
}

fn try_call(sb: &Sandbox, method: &str, params: Value) -> Option<Response> {
    let path = format!("/bot{}/{method}", sb.token());
    http(
        sb.local_addr(),
        "POST",
        &path,
        Some("application/json"),
        params.to_string().as_bytes(),
    )
    .unwrap()
}

fn get(sb: &Sandbox, path: &str) -> Response {
    http(sb.local_addr(), "GET", path, None, b"")
        .unwrap()
        .expect("an answer")
}

fn result(response: Response) -> Value {
    let body = response.json();
    assert_eq!(
        (response.status, &body["ok"]),
        (200, &json!(true)),
        "{body}"
    );
    body["result"].clone()
}

fn error(response: Response) -> (u16, String) {
    let body = response.json();
    assert_eq!(body["ok"], false, "{body}");
    assert_eq!(body["error_code"], response.status);
    (
        response.status,
        body["description"].as_str().unwrap().to_string(),
    )
}

fn update_ids(updates: &Value) -> Vec<i64> {
    updates
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["update_id"].as_i64().unwrap())
        .collect()
}

#[test]
fn get_me_in_any_case_and_http_method() {
    let sb = start();
    let me = result(call(&sb, "getMe", json!({})));
    assert_eq!(me["is_bot"], true);
    assert_eq!(me["id"], 1234567890);
    assert_eq!(me["username"], "sandbox_bot");
    let path = format!("/bot{}/GETME", sb.token());
    assert_eq!(result(get(&sb, &path)), me);
    assert_eq!(sb.calls().len(), 2);
    assert_eq!(sb.stats().calls_by_method["getMe"], 2);
}

#[test]
fn wrong_token_and_unknown_method() {
    let sb = start();
    let wrong = get(&sb, "/bot42:not-the-token/getMe");
    assert_eq!(
        wrong.json(),
        json!({"ok": false, "error_code": 401, "description": "Unauthorized"})
    );
    assert_eq!(
        error(get(&sb, "/botgarbage/getMe")),
        (404, "Not Found".to_string())
    );
    assert_eq!(
        error(call(&sb, "getMoon", json!({}))),
        (404, "Not Found".to_string())
    );
    assert_eq!(
        error(get(&sb, "/elsewhere")),
        (404, "Not Found".to_string())
    );
    assert_eq!(sb.stats().unauthorized, 1);
    assert!(
        !format!("{sb:?} {:?}", SandboxOptions::default()).contains("sandbox-token"),
        "Debug hides the token"
    );
}

#[test]
fn get_updates_offset_and_limit() {
    let sb = start();
    let ids: Vec<i64> = (0..4)
        .map(|i| sb.inject_text(10, &format!("m{i}")))
        .collect();
    assert_eq!(ids, vec![500, 501, 502, 503]);

    let first = result(call(&sb, "getUpdates", json!({"limit": 2})));
    assert_eq!(update_ids(&first), vec![500, 501]);
    assert_eq!(first[0]["message"]["text"], "m0");
    assert_eq!(
        first[0]["message"]["chat"],
        json!({"id": 10, "type": "private", "first_name": "User 10"})
    );
    assert_eq!(
        sb.pending_updates(),
        4,
        "nothing is confirmed without an offset"
    );

    // Form-encoded strings are read as numbers.
    let path = format!("/bot{}/getUpdates", sb.token());
    let body = b"offset=502&limit=0";
    let next = http(
        sb.local_addr(),
        "POST",
        &path,
        Some("application/x-www-form-urlencoded"),
        body,
    )
    .unwrap()
    .unwrap();
    assert_eq!(
        update_ids(&result(next)),
        vec![502],
        "limit is clamped to at least 1"
    );
    assert_eq!(sb.confirmed_offset(), 502);
    assert_eq!(sb.pending_updates(), 2);

    let last = result(get(
        &sb,
        &format!("/bot{}/getUpdates?offset=-1", sb.token()),
    ));
    assert_eq!(update_ids(&last), vec![503]);
    assert_eq!(sb.pending_updates(), 1);
    assert_eq!(sb.stats().get_updates, 3);
    assert!(sb.calls().is_empty(), "getUpdates is not recorded");
}

#[test]
fn long_poll_wakes_up_on_inject_and_times_out() {
    let sb = start();
    let (addr, path) = (
        sb.local_addr(),
        format!("/bot{}/getUpdates?timeout=10", sb.token()),
    );
    let poller = thread::spawn(move || {
        let started = Instant::now();
        let response = http(addr, "GET", &path, None, b"").unwrap().unwrap();
        (response, started.elapsed())
    });
    assert!(sb.wait_until(WAIT, |v| v.is_polling()));
    let id = sb.inject_text(11, "wake up");
    let (response, elapsed) = poller.join().unwrap();
    assert_eq!(update_ids(&result(response)), vec![id]);
    assert!(
        elapsed < Duration::from_secs(5),
        "answered at once, not after the timeout: {elapsed:?}"
    );
    assert!(sb.wait_until(WAIT, |v| !v.is_polling()));

    // With nothing to deliver, the poll ends with [] after its timeout.
    let started = Instant::now();
    let empty = result(call(
        &sb,
        "getUpdates",
        json!({"offset": id + 1, "timeout": 1}),
    ));
    assert_eq!(empty, json!([]));
    assert!(started.elapsed() >= Duration::from_millis(900));
}

#[test]
fn answered_polls_say_which_updates_each_answer_carried_and_whether_it_parked() {
    let sb = start();
    let poller = parked_poll(&sb);
    let injected = Instant::now();
    let woke = sb.inject_text(11, "wake up");
    assert_eq!(update_ids(&result(poller.join().unwrap())), vec![woke]);

    // Waiting already: answered at once, not parked.
    let waiting = sb.inject_text(11, "waiting");
    let at_once = result(call(&sb, "getUpdates", json!({"offset": woke + 1})));
    assert_eq!(update_ids(&at_once), vec![waiting]);
    // An empty answer is not kept.
    result(call(&sb, "getUpdates", json!({"offset": waiting + 1})));

    let polls = sb.inspect(|v| v.answered_polls().to_vec());
    assert_eq!(polls.len(), 2, "{polls:?}");
    assert_eq!(
        (polls[0].parked, polls[0].update_ids.clone()),
        (true, vec![woke])
    );
    assert!(polls[0].arrived < injected && polls[0].answered > injected);
    assert_eq!(
        (polls[1].parked, polls[1].update_ids.clone()),
        (false, vec![waiting])
    );
    assert!(polls[1].arrived >= polls[0].answered && polls[1].answered >= polls[1].arrived);
}

#[test]
fn second_poller_terminates_the_first() {
    let sb = start();
    let first = parked_poll(&sb);
    let second = long_poll(&sb);

    let (status, description) = error(first.join().unwrap());
    assert_eq!(status, 409);
    assert_eq!(description, "Conflict: terminated by other getUpdates request; make sure that only one bot instance is running");
    assert!(
        sb.wait_until(WAIT, |v| v.is_polling()),
        "the second one is still parked"
    );
    let id = sb.inject_text(12, "for the survivor");
    assert_eq!(update_ids(&result(second.join().unwrap())), vec![id]);
    assert_eq!(sb.stats().conflicts, 1);
}

#[test]
fn send_message_to_a_known_chat() {
    let sb = start();
    sb.inject_text(42, "hi");
    let keyboard = json!({"inline_keyboard": [[{"text": "ok", "callback_data": "ok"}]]});
    let message = result(call(
        &sb,
        "sendMessage",
        json!({"chat_id": 42, "text": "hello", "reply_markup": keyboard}),
    ));
    assert_eq!(message["message_id"], 2, "after the injected message 1");
    assert_eq!(
        message["from"],
        json!({"id": 1234567890, "is_bot": true, "first_name": "Sandbox Bot", "username": "sandbox_bot"})
    );
    assert_eq!(message["chat"]["id"], 42);
    assert_eq!(message["text"], "hello");
    assert_eq!(message["reply_markup"], keyboard);
    assert!(message["date"].as_i64().unwrap() > 1_600_000_000);

    // A reply keyboard is not echoed, and the reply points at the message.
    let reply_keyboard = json!({"keyboard": [[{"text": "a"}]]}).to_string();
    let body = format!(
        "chat_id=42&text=again&reply_markup={}&reply_parameters=%7B%22message_id%22%3A1%7D",
        urlencode(&reply_keyboard)
    );
    let path = format!("/bot{}/sendMessage", sb.token());
    let response = http(
        sb.local_addr(),
        "POST",
        &path,
        Some("application/x-www-form-urlencoded"),
        body.as_bytes(),
    )
    .unwrap();
    let second = result(response.unwrap());
    assert_eq!(second["message_id"], 3);
    assert!(second.get("reply_markup").is_none());
    assert_eq!(second["reply_to_message"]["text"], "hi");
    assert_eq!(
        sb.calls()[1].params["chat_id"],
        42,
        "form strings are read as numbers"
    );

    assert_eq!(sb.sent_texts(42), vec!["hello", "again"]);
}

fn urlencode(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

#[test]
fn send_message_errors_are_telegrams() {
    let sb = start();
    sb.inject_text(42, "hi");
    let bad = |params: Value| error(call(&sb, "sendMessage", params));
    assert_eq!(
        bad(json!({"chat_id": 555, "text": "x"})),
        (400, "Bad Request: chat not found".into())
    );
    assert_eq!(
        bad(json!({"chat_id": 42})),
        (400, "Bad Request: message text is empty".into())
    );
    assert_eq!(
        bad(json!({"chat_id": 42, "text": ""})),
        (400, "Bad Request: message text is empty".into())
    );
    assert_eq!(
        bad(json!({"text": "x"})),
        (400, "Bad Request: chat_id is empty".into())
    );
    assert_eq!(
        bad(json!({"chat_id": 42, "text": "x", "reply_parameters": {"message_id": 99}})),
        (400, "Bad Request: message to be replied not found".into())
    );
    // User 1000 is known from a group message but never wrote to the bot.
    sb.inject_text(-77, "group hello");
    assert_eq!(
        bad(json!({"chat_id": 1000, "text": "x"})),
        (
            403,
            "Forbidden: bot can't initiate conversation with a user".into()
        )
    );
    assert!(sb.sent_texts(42).is_empty());
    assert_eq!(sb.calls().len(), 6, "failed calls are recorded too");
}

#[test]
fn other_methods_answer_from_the_schema() {
    let sb = start();
    sb.inject_text(42, "hi");
    let link = result(call(
        &sb,
        "createChatInviteLink",
        json!({"chat_id": 42, "name": "vip", "member_limit": 3}),
    ));
    assert_eq!(link["name"], "vip");
    assert_eq!(link["member_limit"], 3);
    assert_eq!(link["creator"]["is_bot"], true);
    assert!(link["invite_link"]
        .as_str()
        .unwrap()
        .starts_with("https://t.me/"));

    assert_eq!(
        result(call(
            &sb,
            "setMyCommands",
            json!({"commands": [{"command": "a", "description": "b"}]})
        )),
        true
    );
    assert_eq!(
        result(call(
            &sb,
            "answerCallbackQuery",
            json!({"callback_query_id": "1"})
        )),
        true
    );
    assert_eq!(
        result(call(&sb, "getChat", json!({"chat_id": 42})))["first_name"],
        "User 42"
    );
    assert_eq!(result(call(&sb, "getMyCommands", json!({}))), json!([]));
    assert_eq!(
        error(call(&sb, "banChatMember", json!({"chat_id": 42}))),
        (400, "Bad Request: parameter \"user_id\" is required".into())
    );

    let copied = result(call(
        &sb,
        "copyMessage",
        json!({"chat_id": 42, "from_chat_id": 42, "message_id": 1}),
    ));
    assert_eq!(copied, json!({"message_id": 2}));
    let forwarded = result(call(
        &sb,
        "forwardMessage",
        json!({"chat_id": 42, "from_chat_id": 42, "message_id": 1}),
    ));
    assert_eq!(forwarded["text"], "hi");
    assert_eq!(forwarded["forward_origin"]["type"], "user");

    let album = json!([{"type": "photo", "media": "AgADphoto", "caption": "one"}, {"type": "video", "media": "BAADvideo"}]);
    let messages = result(call(
        &sb,
        "sendMediaGroup",
        json!({"chat_id": 42, "media": album}),
    ));
    assert_eq!(messages.as_array().unwrap().len(), 2);
    assert_eq!(messages[0]["photo"][0]["file_id"], "AgADphoto");
    assert_eq!(messages[0]["caption"], "one");
    assert_eq!(messages[0]["media_group_id"], messages[1]["media_group_id"]);
    assert!(messages[1]["video"]["file_id"].is_string());

    let sent = result(call(
        &sb,
        "sendMessage",
        json!({"chat_id": 42, "text": "draft"}),
    ));
    let id = sent["message_id"].clone();
    let edited = result(call(
        &sb,
        "editMessageText",
        json!({"chat_id": 42, "message_id": id, "text": "final"}),
    ));
    assert_eq!(edited["text"], "final");
    assert!(edited["edit_date"].is_i64());
    let (_, unchanged) = error(call(
        &sb,
        "editMessageText",
        json!({"chat_id": 42, "message_id": id, "text": "final"}),
    ));
    assert!(
        unchanged.starts_with("Bad Request: message is not modified"),
        "{unchanged}"
    );
    assert_eq!(
        result(call(
            &sb,
            "deleteMessage",
            json!({"chat_id": 42, "message_id": id})
        )),
        true
    );
    assert_eq!(
        error(call(
            &sb,
            "deleteMessage",
            json!({"chat_id": 42, "message_id": id})
        )),
        (400, "Bad Request: message to delete not found".into())
    );
    let dice = result(call(&sb, "sendDice", json!({"chat_id": 42})));
    assert!((1..=6).contains(&dice["dice"]["value"].as_i64().unwrap()));
}

#[test]
fn multipart_upload_is_parsed_and_downloadable() {
    let sb = start();
    sb.inject_text(42, "hi");
    let boundary = "sandboxboundary";
    let content = b"%PDF-1.4 not really";
    let mut body = Vec::new();
    let part = |body: &mut Vec<u8>, headers: &str, value: &[u8]| {
        body.extend_from_slice(format!("--{boundary}\r\n{headers}\r\n\r\n").as_bytes());
        body.extend_from_slice(value);
        body.extend_from_slice(b"\r\n");
    };
    part(
        &mut body,
        "Content-Disposition: form-data; name=\"chat_id\"",
        b"42",
    );
    part(
        &mut body,
        "Content-Disposition: form-data; name=\"caption\"",
        b"the report",
    );
    part(
        &mut body,
        "Content-Disposition: form-data; name=\"reply_markup\"",
        br#"{"inline_keyboard":[]}"#,
    );
    part(
        &mut body,
        "Content-Disposition: form-data; name=\"document\"; filename=\"report.pdf\"\r\nContent-Type: application/pdf",
        content,
    );
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    let path = format!("/bot{}/sendDocument", sb.token());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let response = http(sb.local_addr(), "POST", &path, Some(&content_type), &body)
        .unwrap()
        .unwrap();
    let message = result(response);
    assert_eq!(message["caption"], "the report");
    assert_eq!(message["document"]["file_name"], "report.pdf");
    assert_eq!(message["document"]["mime_type"], "application/pdf");
    assert_eq!(message["document"]["file_size"], content.len());

    let recorded = &sb.calls()[0];
    assert_eq!(recorded.params["chat_id"], 42);
    assert_eq!(
        recorded.params["reply_markup"],
        json!({"inline_keyboard": []})
    );
    let file = &recorded.files[0];
    assert_eq!(
        (file.name.as_str(), file.file_name.as_deref()),
        ("document", Some("report.pdf"))
    );
    assert_eq!(
        (file.content_type.as_deref(), file.size),
        (Some("application/pdf"), content.len())
    );
    assert_eq!(&file.bytes[..], content);

    let file = result(call(
        &sb,
        "getFile",
        json!({"file_id": message["document"]["file_id"]}),
    ));
    let download = get(
        &sb,
        &format!(
            "/file/bot{}/{}",
            sb.token(),
            file["file_path"].as_str().unwrap()
        ),
    );
    assert_eq!(
        (download.status, download.body.as_slice()),
        (200, &content[..])
    );
}

#[test]
fn injected_files_are_known_to_get_file_and_downloadable() {
    let sb = start();
    let (update_id, doc) = sb.inject_document(42, &b"%PDF report"[..], "report.pdf");
    let (_, photo) = sb.inject_photo(-7, &b"\xff\xd8 jpeg"[..]);
    let updates = result(call(&sb, "getUpdates", json!({})));
    assert_eq!(updates[0]["update_id"], update_id);
    let document = &updates[0]["message"]["document"];
    assert_eq!(
        (
            &document["file_id"],
            &document["file_name"],
            &document["file_size"]
        ),
        (&json!(doc), &json!("report.pdf"), &json!(11))
    );
    assert_eq!(updates[0]["message"]["chat"]["id"], 42);
    let sizes = &updates[1]["message"]["photo"];
    assert_eq!(sizes[0]["file_id"], json!(photo));
    assert_eq!(updates[1]["message"]["chat"]["type"], "group");

    for (file_id, content, folder) in [
        (&doc, &b"%PDF report"[..], "documents/"),
        (&photo, &b"\xff\xd8 jpeg"[..], "photos/"),
    ] {
        let file = result(call(&sb, "getFile", json!({"file_id": file_id})));
        assert_eq!(file["file_size"], content.len());
        let path = file["file_path"].as_str().unwrap();
        assert!(path.starts_with(folder), "{path}");
        let download = get(&sb, &format!("/file/bot{}/{path}", sb.token()));
        assert_eq!((download.status, download.body.as_slice()), (200, content));
        let wrong = get(&sb, &format!("/file/bot1:wrong/{path}"));
        assert_eq!(wrong.status, 404);
    }

    assert!(sb.fake_file_size(&doc, 30_000_000));
    let file = result(call(&sb, "getFile", json!({"file_id": doc})));
    assert_eq!(file["file_size"], 30_000_000);
    assert!(!sb.fake_file_size("nope", 1));
}

#[test]
fn get_file_refuses_an_id_it_never_issued() {
    let sb = start();
    assert_eq!(
        error(call(&sb, "getFile", json!({"file_id": "AgADmadeup"}))),
        (400, "Bad Request: invalid file_id".into())
    );
    // A made-up id the bot sent a photo with is known from then on.
    sb.inject_text(42, "hi");
    result(call(
        &sb,
        "sendPhoto",
        json!({"chat_id": 42, "photo": "AgADmadeup"}),
    ));
    assert_eq!(
        result(call(&sb, "getFile", json!({"file_id": "AgADmadeup"})))["file_id"],
        "AgADmadeup"
    );
}

#[test]
fn flood_limits_answer_429_with_retry_after() {
    let sb = start();
    sb.inject_text(42, "hi");
    sb.set_rate_limits(true);
    let statuses: Vec<Response> = (0..4)
        .map(|i| {
            call(
                &sb,
                "sendMessage",
                json!({"chat_id": 42, "text": i.to_string()}),
            )
        })
        .collect();
    assert_eq!(
        statuses.iter().map(|r| r.status).collect::<Vec<_>>(),
        vec![200, 200, 200, 429]
    );
    let limited = &statuses[3];
    assert_eq!(limited.header("Retry-After"), Some("1"));
    assert_eq!(
        limited.json(),
        json!({"ok": false, "error_code": 429, "description": "Too Many Requests: retry after 1",
               "parameters": {"retry_after": 1}})
    );
    assert_eq!(
        result(call(&sb, "getMe", json!({})))["is_bot"],
        true,
        "only sending methods are limited"
    );
    assert_eq!(sb.stats().too_many_requests, 1);
    assert_eq!(sb.sent_texts(42), vec!["0", "1", "2"]);
    sb.set_rate_limits(false);
    assert_eq!(
        call(&sb, "sendMessage", json!({"chat_id": 42, "text": "free"})).status,
        200
    );
}

#[test]
fn random_faults_are_deterministic() {
    let run = || {
        let sb = start();
        sb.set_faults(
            FaultPlan::random(0.5, vec![Fault::BadGatewayJson, Fault::BadGatewayHtml])
                .only(&["getMe"]),
        );
        let statuses: Vec<u16> = (0..12)
            .map(|_| call(&sb, "getMe", json!({})).status)
            .collect();
        assert_eq!(
            sb.stats().faults_injected as usize,
            statuses.iter().filter(|&&s| s == 502).count()
        );
        statuses
    };
    let statuses = run();
    assert_eq!(statuses, run());
    assert!(
        statuses.contains(&502) && statuses.contains(&200),
        "{statuses:?}"
    );
}

#[test]
fn scripted_faults_drop_fail_and_delay() {
    let sb = start();
    sb.inject_text(42, "hi");
    sb.set_faults(FaultPlan::scripted(vec![
        Fault::DropBeforeExecute,
        Fault::DropAfterExecute,
        Fault::BadGatewayHtml,
        Fault::Delay(Duration::from_millis(300)),
    ]));
    let send = |text: &str| try_call(&sb, "sendMessage", json!({"chat_id": 42, "text": text}));
    assert!(
        send("lost before").is_none(),
        "connection dropped without an answer"
    );
    assert!(
        send("lost after").is_none(),
        "connection dropped without an answer"
    );
    let page = send("gateway").unwrap();
    assert_eq!(
        (page.status, page.header("Content-Type")),
        (502, Some("text/html"))
    );
    assert!(String::from_utf8_lossy(&page.body).contains("502 Bad Gateway"));
    let started = Instant::now();
    assert_eq!(send("slow").unwrap().status, 200);
    assert!(started.elapsed() >= Duration::from_millis(300));
    assert_eq!(send("normal").unwrap().status, 200);

    assert_eq!(
        sb.sent_texts(42),
        vec!["lost after", "slow", "normal"],
        "only executed calls sent messages"
    );
    let faults: Vec<Option<Fault>> = sb.calls().iter().map(|c| c.fault).collect();
    assert_eq!(
        faults[..3],
        [
            Some(Fault::DropBeforeExecute),
            Some(Fault::DropAfterExecute),
            Some(Fault::BadGatewayHtml)
        ]
    );
    assert_eq!(sb.stats().faults_injected, 4);
}

#[test]
fn get_updates_bad_gateway() {
    let sb = start();
    sb.set_faults(FaultPlan {
        get_updates_bad_gateway: 1.0,
        ..FaultPlan::default()
    });
    let page = get(&sb, &format!("/bot{}/getUpdates", sb.token()));
    assert_eq!(page.status, 502);
    sb.set_faults(FaultPlan::default());
    assert_eq!(
        result(get(&sb, &format!("/bot{}/getUpdates", sb.token()))),
        json!([])
    );
}

/// Sends one request and reads what arrives within `patience`: the head and
/// as much of the body as came, and whether the server went quiet before
/// the `Content-Length` it announced.
fn read_within(
    sb: &Sandbox,
    method: &str,
    params: &Value,
    patience: Duration,
) -> (String, usize, usize) {
    let mut stream = TcpStream::connect(sb.local_addr()).unwrap();
    let body = params.to_string();
    write!(
        stream,
        "POST /bot{}/{method} HTTP/1.1\r\nHost: sandbox\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        sb.token(),
        body.len()
    )
    .unwrap();
    stream.set_read_timeout(Some(patience)).unwrap();
    let mut raw = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => raw.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                break
            }
            Err(e) => panic!("{e}"),
        }
    }
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("the head arrived");
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let announced = head
        .split("\r\n")
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length:")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("a Content-Length");
    (head, raw.len() - split - 4, announced)
}

#[test]
fn stalled_body_sends_the_head_then_waits() {
    let sb = start();
    sb.register_chat(json!({"id": 42, "type": "private", "first_name": "U"}));
    sb.set_faults(FaultPlan::scripted(vec![Fault::StallBody(
        Duration::from_secs(3600),
    )]));
    let (head, got, announced) = read_within(
        &sb,
        "sendMessage",
        &json!({"chat_id": 42, "text": "stuck"}),
        Duration::from_millis(500),
    );
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(got > 0 && got < announced, "{got} of {announced} bytes");
    assert_eq!(sb.sent_texts(42), vec!["stuck"], "the call was executed");

    // A short stall ends with the whole answer.
    sb.set_faults(FaultPlan::scripted(vec![Fault::StallBody(
        Duration::from_millis(200),
    )]));
    let started = Instant::now();
    let sent = result(call(
        &sb,
        "sendMessage",
        json!({"chat_id": 42, "text": "late"}),
    ));
    assert_eq!(sent["text"], "late");
    assert!(started.elapsed() >= Duration::from_millis(200));
}

#[test]
fn scripted_retry_after_is_sent_as_given() {
    let sb = start();
    sb.register_chat(json!({"id": 42, "type": "private", "first_name": "U"}));
    sb.set_faults(FaultPlan::scripted(vec![
        Fault::RetryAfter(0),
        Fault::RetryAfter(-5),
    ]));
    for seconds in [0, -5] {
        let answer = call(&sb, "sendMessage", json!({"chat_id": 42, "text": "x"}));
        assert_eq!(answer.header("Retry-After"), None);
        let body = answer.json();
        assert_eq!(answer.status, 429);
        assert_eq!(body["parameters"]["retry_after"], seconds);
    }
    assert!(sb.sent_texts(42).is_empty(), "a 429 executes nothing");
    assert_eq!(sb.stats().too_many_requests, 2);
}

#[test]
fn get_updates_takes_its_own_script() {
    let sb = start();
    let id = sb.inject_text(42, "hi");
    sb.set_faults(FaultPlan::get_updates(vec![
        Fault::RetryAfter(1_000_000_000_000),
        Fault::StallBody(Duration::from_secs(3600)),
    ]));
    let poll = json!({"offset": id + 1, "timeout": 0});
    let refused = call(&sb, "getUpdates", poll.clone());
    assert_eq!(refused.status, 429);
    assert_eq!(
        refused.json()["parameters"]["retry_after"],
        1_000_000_000_000i64
    );
    assert_eq!(sb.pending_updates(), 1, "a refused poll confirms nothing");
    let (head, got, announced) = read_within(&sb, "getUpdates", &poll, Duration::from_millis(500));
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(got < announced, "{got} of {announced} bytes");
    assert_eq!(
        sb.pending_updates(),
        0,
        "the stalled poll confirmed the update"
    );
    assert_eq!(
        result(call(&sb, "getUpdates", json!({"timeout": 0}))),
        json!([])
    );
    assert_eq!(sb.stats().faults_injected, 2, "the script was used up");
}

#[test]
fn migrated_group_answers_with_the_new_id() {
    let sb = start();
    sb.register_chat(json!({"id": -4001, "type": "group", "title": "Team"}));
    assert_eq!(
        call(
            &sb,
            "sendMessage",
            json!({"chat_id": -4001, "text": "before"})
        )
        .status,
        200
    );
    sb.migrate_chat(-4001, -1004001);
    let moved = call(
        &sb,
        "sendMessage",
        json!({"chat_id": -4001, "text": "after"}),
    );
    assert_eq!(
        moved.json(),
        json!({"ok": false, "error_code": 400, "description": "Bad Request: group chat was upgraded to a supergroup chat",
               "parameters": {"migrate_to_chat_id": -1004001}})
    );
    let message = result(call(
        &sb,
        "sendMessage",
        json!({"chat_id": -1004001, "text": "after"}),
    ));
    assert_eq!(
        message["chat"],
        json!({"id": -1004001, "type": "supergroup", "title": "Team"})
    );
}

#[test]
fn revoked_token_ends_parked_polls_too() {
    let sb = start();
    let poller = parked_poll(&sb);
    sb.set_token_rejected(true);
    assert_eq!(error(poller.join().unwrap()), (401, "Unauthorized".into()));
    assert_eq!(
        error(call(&sb, "getMe", json!({}))),
        (401, "Unauthorized".into())
    );
    sb.set_token_rejected(false);
    assert_eq!(call(&sb, "getMe", json!({})).status, 200);
}

#[test]
fn webhook_blocks_polling_until_deleted() {
    let sb = start();
    let set = call(
        &sb,
        "setWebhook",
        json!({"url": "https://example.invalid/hook"}),
    )
    .json();
    assert_eq!(
        set,
        json!({"ok": true, "result": true, "description": "Webhook was set"})
    );
    assert_eq!(
        result(call(&sb, "getWebhookInfo", json!({})))["url"],
        "https://example.invalid/hook"
    );
    let (status, description) = error(call(&sb, "getUpdates", json!({})));
    assert_eq!(status, 409);
    assert!(
        description.starts_with("Conflict: can't use getUpdates method while webhook is active")
    );
    let deleted = call(&sb, "deleteWebhook", json!({"drop_pending_updates": true})).json();
    assert_eq!(deleted["description"], "Webhook was deleted");
    assert_eq!(result(call(&sb, "getUpdates", json!({}))), json!([]));
}

#[test]
fn allowed_updates_and_raw_updates() {
    let sb = start();
    result(call(
        &sb,
        "getUpdates",
        json!({"allowed_updates": ["callback_query"]}),
    ));
    sb.inject_text(5, "not wanted");
    let callback = sb.inject_update(json!({"callback_query": {"id": "1", "chat_instance": "c",
        "from": {"id": 5, "is_bot": false, "first_name": "A"}}}));
    sb.inject_raw(json!("not an update"));
    sb.inject_raw(json!({"update_id": "bad"}));
    // Without allowed_updates the previous choice stays.
    let updates = result(call(&sb, "getUpdates", json!({})));
    assert_eq!(updates[0]["update_id"], callback);
    assert_eq!(updates[1], "not an update");
    assert_eq!(updates[2], json!({"update_id": "bad"}));
    assert_eq!(updates.as_array().unwrap().len(), 3);

    // An empty list means the default set: messages again, reactions not.
    let reaction =
        sb.inject_update(json!({"message_reaction": {"chat": {"id": 5, "type": "private"}}}));
    let message = sb.inject_text(5, "visible");
    let updates = result(call(
        &sb,
        "getUpdates",
        json!({"offset": callback + 1, "allowed_updates": "[]"}),
    ));
    let updates = updates.as_array().unwrap();
    assert_eq!(
        updates.len(),
        3,
        "the two raw updates and the message; reaction {reaction} dropped"
    );
    assert_eq!(updates[2]["update_id"], message);
}

#[test]
fn subscribers_and_waiters_see_calls_as_they_happen() {
    let sb = start();
    sb.inject_text(42, "hi");
    let calls = sb.subscribe();
    let (addr, path) = (
        sb.local_addr(),
        format!("/bot{}/sendMessage?chat_id=42&text=ping", sb.token()),
    );
    let sender =
        thread::spawn(move || http(addr, "GET", &path, None, b"").unwrap().unwrap().status);
    assert!(sb.wait_until(WAIT, |v| v.sent_texts(42) == ["ping"]));
    let seen = calls.recv_timeout(WAIT).unwrap();
    assert_eq!((seen.method.as_str(), seen.status), ("sendMessage", 200));
    assert_eq!(seen.result().unwrap()["text"], "ping");
    assert_eq!(sender.join().unwrap(), 200);
    assert!(
        !sb.wait_until(Duration::from_millis(50), |v| v.calls().len() > 1),
        "bounded wait gives up"
    );
}

#[test]
fn a_poller_that_hangs_up_is_forgotten() {
    let sb = start();
    let mut stream = TcpStream::connect(sb.local_addr()).unwrap();
    let request = format!(
        "GET /bot{}/getUpdates?timeout=30 HTTP/1.1\r\nHost: sandbox\r\n\r\n",
        sb.token()
    );
    stream.write_all(request.as_bytes()).unwrap();
    assert!(sb.wait_until(WAIT, |v| v.is_polling()));
    drop(stream);
    assert!(
        sb.wait_until(WAIT, |v| !v.is_polling()),
        "the parked request ends with its connection"
    );
}

#[test]
fn stopping_ends_parked_polls() {
    let sb = start();
    let (addr, path) = (
        sb.local_addr(),
        format!("/bot{}/getUpdates?timeout=30", sb.token()),
    );
    let poller = thread::spawn(move || http(addr, "GET", &path, None, b""));
    assert!(sb.wait_until(WAIT, |v| v.is_polling()));
    let started = Instant::now();
    sb.stop();
    let answer = poller.join().unwrap();
    assert!(
        started.elapsed() < WAIT,
        "stopped in {:?}",
        started.elapsed()
    );
    assert!(
        !matches!(answer, Ok(Some(_))),
        "no answer after stop: {:?}",
        answer.map(|r| r.map(|r| r.status))
    );
    assert!(
        TcpStream::connect(addr).is_err(),
        "nothing listens any more"
    );
}

#[test]
fn works_from_inside_an_actix_system_with_awc() {
    actix_rt::System::new().block_on(async {
        let sb = start();
        sb.inject_text(42, "hi");
        let client = awc::Client::default();
        let url = format!("{}/bot{}/sendMessage", sb.api_url(), sb.token());
        let mut response = client
            .post(&url)
            .send_json(&json!({"chat_id": 42, "text": "from awc"}))
            .await
            .unwrap();
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["result"]["text"], "from awc");

        sb.set_faults(FaultPlan::scripted(vec![Fault::DropAfterExecute]));
        let dropped = client
            .post(&url)
            .send_json(&json!({"chat_id": 42, "text": "unanswered"}))
            .await;
        assert!(dropped.is_err(), "the client sees a failed request");
        assert_eq!(sb.sent_texts(42), vec!["from awc", "unanswered"]);
    });
}

/// A webhook endpoint on a thread: answers each request with the next of
/// `statuses` (then 200), dropping the connection for a 0, and reports
/// each request's secret header and update_id.
fn hook_endpoint(
    statuses: Vec<u16>,
) -> (SocketAddr, std::sync::mpsc::Receiver<(Option<String>, i64)>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
    let addr = listener.local_addr().expect("bound");
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let mut statuses = statuses.into_iter();
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { return };
            let mut raw = Vec::new();
            let mut buf = [0u8; 4096];
            let (head, body_start) = loop {
                let Ok(n) = stream.read(&mut buf) else {
                    break (String::new(), 0);
                };
                if n == 0 {
                    break (String::new(), 0);
                }
                raw.extend_from_slice(&buf[..n]);
                if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
                    break (String::from_utf8_lossy(&raw[..end]).into_owned(), end + 4);
                }
            };
            let header = |name: &str| {
                head.split("\r\n")
                    .filter_map(|l| l.split_once(':'))
                    .find(|(n, _)| n.trim().eq_ignore_ascii_case(name))
                    .map(|(_, v)| v.trim().to_string())
            };
            let length: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while raw.len() < body_start + length {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => raw.extend_from_slice(&buf[..n]),
                }
            }
            let body: Value = serde_json::from_slice(&raw[body_start..]).unwrap_or(Value::Null);
            let id = body["update_id"].as_i64().unwrap_or(-1);
            if tx
                .send((header("x-telegram-bot-api-secret-token"), id))
                .is_err()
            {
                return;
            }
            match statuses.next().unwrap_or(200) {
                0 => drop(stream),
                status => {
                    let _ = stream.write_all(
                        format!(
                            "HTTP/1.1 {status} X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        )
                        .as_bytes(),
                    );
                }
            }
        }
    });
    (addr, rx)
}

#[test]
fn a_webhook_gets_each_chats_updates_in_order_and_failures_again() {
    let sb = start();
    let (addr, requests) = hook_endpoint(vec![503, 0]);
    let a1 = sb.inject_text(1, "a1");
    let a2 = sb.inject_text(1, "a2");
    let set = call(
        &sb,
        "setWebhook",
        json!({"url": format!("http://{addr}/hook"), "secret_token": "s3cret", "max_connections": 1}),
    );
    assert_eq!(set.status, 200, "{:?}", set.json());
    assert!(sb.wait_until(WAIT, |v| v.pending_updates() == 0));
    let got: Vec<(Option<String>, i64)> = requests.try_iter().collect();
    let secret = Some("s3cret".to_string());
    // a1 answered 503, then its connection dropped, then 200; only then a2.
    assert_eq!(
        got,
        vec![
            (secret.clone(), a1),
            (secret.clone(), a1),
            (secret.clone(), a1),
            (secret, a2)
        ]
    );
    assert_eq!(sb.inspect(|v| v.webhook_deliveries()), (2, 2));
    let info = result(call(&sb, "getWebhookInfo", json!({})));
    assert!(info["last_error_message"].as_str().is_some(), "{info}");
    assert!(info["last_error_date"].as_i64().is_some(), "{info}");
    let (status, _) = error(call(&sb, "getUpdates", json!({})));
    assert_eq!(
        status, 409,
        "getUpdates stays refused while the webhook is set"
    );
    let bad = call(
        &sb,
        "setWebhook",
        json!({"url": format!("http://{addr}/hook"), "secret_token": "no spaces"}),
    );
    assert_eq!(bad.status, 400);
}

#[test]
fn a_group_of_two_users_and_a_button_press() {
    let sb = start();
    sb.register_user(json!({"id": 1000, "first_name": "Alice", "username": "alice"}));
    sb.register_user(json!({"id": 1001, "first_name": "Bob"}));
    let group = sb.create_group(-4001, "Friends", &[1000, 1001]);
    assert_eq!(group["type"], "group");
    sb.inject_text_from(-4001, 1001, "hi all");
    let (_, file_id) = sb.inject_file_from(-4001, 1000, &b"PNG"[..], None, Some("look"));
    let updates = result(call(&sb, "getUpdates", json!({})));
    let (text, photo) = (&updates[0]["message"], &updates[1]["message"]);
    assert_eq!(
        (&text["from"]["first_name"], &text["chat"]["title"]),
        (&json!("Bob"), &json!("Friends"))
    );
    assert_eq!(photo["from"]["username"], "alice");
    assert_eq!(photo["caption"], "look");
    assert_eq!(photo["photo"][0]["file_id"], file_id.as_str());
    assert_eq!(photo["photo"][0]["file_size"], 3);

    let member = |user: i64| {
        result(call(
            &sb,
            "getChatMember",
            json!({"chat_id": -4001, "user_id": user}),
        ))["status"]
            .clone()
    };
    assert_eq!(
        (member(1001), member(1002)),
        (json!("member"), json!("left"))
    );
    assert_eq!(
        result(call(&sb, "getChatMemberCount", json!({"chat_id": -4001}))),
        3
    );

    let sent = result(call(
        &sb,
        "sendMessage",
        json!({"chat_id": -4001, "text": "vote",
               "reply_markup": {"inline_keyboard": [[{"text": "Up", "callback_data": "up"}]]}}),
    ));
    let message_id = sent["message_id"].as_i64().unwrap();
    let pressed = sb.press_button(-4001, message_id, 1001, 0).unwrap();
    let offset = updates[1]["update_id"].as_i64().unwrap() + 1;
    let updates = result(call(&sb, "getUpdates", json!({ "offset": offset })));
    let query = &updates[0]["callback_query"];
    assert_eq!(updates[0]["update_id"], pressed.update_id);
    assert_eq!(query["id"], pressed.query_id.as_str());
    assert_eq!(
        (&query["data"], &query["from"]["id"]),
        (&json!("up"), &json!(1001))
    );
    assert_eq!(query["message"]["text"], "vote");
    assert_eq!(query["message"]["chat"]["id"], -4001);
    assert!(query["chat_instance"].as_str().is_some());
    // Once the keyboard is edited away, there is nothing to press.
    result(call(
        &sb,
        "editMessageText",
        json!({"chat_id": -4001, "message_id": message_id, "text": "closed"}),
    ));
    assert_eq!(
        sb.press_button(-4001, message_id, 1001, 0),
        Err(ButtonError::NoKeyboard)
    );
}

#[test]
fn parse_modes_become_entities_and_bad_markup_is_refused_as_on_telegram() {
    let sb = start();
    sb.inject_text(42, "hi");
    let sent = result(call(
        &sb,
        "sendMessage",
        json!({"chat_id": 42, "text": "<b>Hi</b> &amp; <i>bye</i>", "parse_mode": "HTML"}),
    ));
    assert_eq!(sent["text"], "Hi & bye");
    assert_eq!(
        sent["entities"],
        json!([{"type": "bold", "offset": 0, "length": 2},
               {"type": "italic", "offset": 5, "length": 3}])
    );
    let id = sent["message_id"].clone();
    let edited = result(call(
        &sb,
        "editMessageText",
        json!({"chat_id": 42, "message_id": id, "text": "*now* plain\\.", "parse_mode": "MarkdownV2"}),
    ));
    assert_eq!(edited["text"], "now plain.");
    assert_eq!(
        edited["entities"],
        json!([{"type": "bold", "offset": 0, "length": 3}])
    );
    // Entities given win over a parse mode, and text without one is as sent.
    let given = result(call(
        &sb,
        "sendMessage",
        json!({"chat_id": 42, "text": "<b>x</b>", "parse_mode": "HTML",
               "entities": [{"type": "code", "offset": 0, "length": 8}]}),
    ));
    assert_eq!(given["text"], "<b>x</b>");
    assert_eq!(given["entities"][0]["type"], "code");
    let caption = result(call(
        &sb,
        "sendPhoto",
        json!({"chat_id": 42, "photo": "SBXfile", "caption": "<u>sun</u>", "parse_mode": "HTML"}),
    ));
    assert_eq!(caption["caption"], "sun");
    assert_eq!(caption["caption_entities"][0]["type"], "underline");

    assert_eq!(
        error(call(
            &sb,
            "sendMessage",
            json!({"chat_id": 42, "text": "<script>x</script>", "parse_mode": "HTML"}),
        )),
        (
            400,
            "Bad Request: can't parse entities: Unsupported start tag \"script\" at byte offset 0"
                .to_string()
        )
    );
    assert_eq!(
        error(call(
            &sb,
            "sendMessage",
            json!({"chat_id": 42, "text": "1.5", "parse_mode": "MarkdownV2"}),
        ))
        .1,
        "Bad Request: can't parse entities: Character '.' is reserved and must be escaped with the preceding '\\'"
    );
    assert_eq!(
        error(call(
            &sb,
            "sendMessage",
            json!({"chat_id": 42, "text": "x", "parse_mode": "BBCode"}),
        ))
        .1,
        "Bad Request: unsupported parse_mode"
    );
    assert_eq!(sb.sent_texts(42), ["Hi & bye", "<b>x</b>"]);
}

#[test]
fn watchers_see_every_call_and_update_numbered_in_order() {
    let sb = start();
    let watched = sb.watch();
    sb.inject_text(42, "hi");
    call(&sb, "sendMessage", json!({"chat_id": 42, "text": "ok"}));
    call(&sb, "sendMessage", json!({"chat_id": 42}));
    let seen: Vec<Watched> = (0..3)
        .map(|_| watched.recv_timeout(WAIT).expect("an event"))
        .collect();
    assert_eq!(seen.iter().map(|w| w.seq).collect::<Vec<_>>(), [1, 2, 3]);
    assert!(matches!(&seen[0].event, SandboxEvent::Update(u) if u["message"]["text"] == "hi"));
    assert!(matches!(&seen[1].event, SandboxEvent::Call(c) if c.ok()));
    // Failed calls too, unlike `subscribe`.
    assert!(matches!(&seen[2].event, SandboxEvent::Call(c) if c.status == 400));
    assert_eq!(sb.inspect(|v| v.events()), 3);
    let messages = sb.inspect(|v| {
        v.messages_in(42)
            .iter()
            .map(|m| m["message_id"].as_i64().unwrap_or_default())
            .collect::<Vec<_>>()
    });
    assert_eq!(messages, [1, 2]);
}
