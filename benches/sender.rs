//! Sender benchmark: the real Sender actor at Telegram's limits against the
//! sandbox enforcing the same limits (429 with `retry_after`, as Telegram).
//! Prints figures; asserts nothing.
//!
//!     cargo bench --bench sender -- [SCALE] [broadcast|hotcold]
//!
//! SCALE (default 1.0) multiplies both workloads (the second argument runs
//! only one):
//! - broadcast: 3,000 messages to 300 chats (10 each), queued at once;
//! - hot/cold: 5 hot chats with 30 messages each among 1,350 cold chats with
//!   one message each, queued at once (hot chats first); the hot chats are
//!   held to 1/s by their own limit while the cold ones fill the rest.
//!
//! At 30 messages/s they take about 100 s and 50 s.
//!
//! Figures: the sustained rate as a ratio of the configured global limit
//! (messages / (limit x (span + 1 s)), where span runs from the first to the
//! last message's arrival at the sandbox: a perfect 30-per-sliding-second
//! schedule scores 1.0), the sandbox's 429 count, order violations (chats
//! whose messages arrived in another order than sent, duplicates from
//! retries removed), and the queueing delay from `send()` to the message's
//! arrival at the sandbox (p50/p99; for hot/cold also the cold chats' own).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::prelude::*;
use asgigramd::actors::call::Call;
use asgigramd::actors::sender::{Drained, Sender};
use asgigramd::sandbox::{Sandbox, SandboxOptions};
use asgigramd::settings::{BotToken, SenderSettings};
use asgigramd::telegram::Bot;
use serde_json::{json, Value};

struct Workload {
    name: &'static str,
    /// (chat, text) in the order they are sent.
    messages: Vec<(i64, String)>,
    /// Chats whose delay is reported separately.
    cold: Vec<i64>,
}

fn broadcast(scale: f64) -> Workload {
    let chats = ((300.0 * scale) as i64).max(1);
    let mut messages = Vec::new();
    for i in 0..10 {
        for chat in 1..=chats {
            messages.push((chat, format!("{chat}:{i}")));
        }
    }
    Workload {
        name: "broadcast",
        messages,
        cold: Vec::new(),
    }
}

fn hot_and_cold(scale: f64) -> Workload {
    let cold_chats = ((1350.0 * scale) as i64).max(1);
    let per_hot = ((30.0 * scale) as usize).max(3);
    let mut messages = Vec::new();
    for i in 0..per_hot {
        for hot in 1..=5 {
            messages.push((hot, format!("{hot}:{i}")));
        }
    }
    let cold: Vec<i64> = (1_000..1_000 + cold_chats).collect();
    for &chat in &cold {
        messages.push((chat, format!("{chat}:0")));
    }
    Workload {
        name: "hot/cold",
        messages,
        cold,
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

async fn run(workload: Workload, settings: &SenderSettings) {
    let sb = Sandbox::start(SandboxOptions::default()).expect("sandbox starts on loopback");
    sb.set_rate_limits(true);
    let mut expected: HashMap<i64, Vec<String>> = HashMap::new();
    for (chat, text) in &workload.messages {
        expected.entry(*chat).or_default().push(text.clone());
    }
    for chat in expected.keys() {
        sb.register_chat(json!({"id": chat, "type": "private", "first_name": "U"}));
    }
    let bot = Bot::new(
        &sb.api_url(),
        &BotToken::new(sb.token()),
        Duration::from_secs(30),
    );
    let sender = Sender::new(bot, settings.clone()).start();
    let total = workload.messages.len();
    let mut submitted: HashMap<String, Instant> = HashMap::new();
    for (chat, text) in workload.messages {
        let Value::Object(params) = json!({"chat_id": chat, "text": text}) else {
            unreachable!("a JSON object literal")
        };
        submitted.insert(text, Instant::now());
        sender.do_send(Call::new("sendMessage".into(), params, None));
    }
    // Limits aside, generous: a stuck run ends with what it has.
    let deadline = Instant::now() + Duration::from_secs(600);
    tokio::select! {
        _ = sender.send(Drained) => {}
        _ = tokio::time::sleep_until(deadline.into()) => println!("  (deadline reached)"),
    }

    let calls = sb.calls();
    let delivered: Vec<_> = calls
        .iter()
        .filter(|c| c.method == "sendMessage" && c.ok())
        .collect();
    let first = delivered.first().map(|c| c.at);
    let last = delivered.last().map(|c| c.at);
    let span = match (first, last) {
        (Some(f), Some(l)) => l - f,
        _ => Duration::ZERO,
    };
    let limit = f64::from(settings.limits.global_per_second);
    let ratio = delivered.len() as f64 / (limit * (span.as_secs_f64() + 1.0));

    let mut violations = 0;
    for (chat, texts) in &expected {
        let mut got = sb.sent_texts(*chat);
        got.dedup();
        if &got != texts {
            violations += 1;
        }
    }
    let mut delays = Vec::new();
    let mut cold_delays = Vec::new();
    let cold: std::collections::HashSet<i64> = workload.cold.iter().copied().collect();
    for c in &delivered {
        let text = c.params["text"].as_str().unwrap_or_default();
        if let Some(t) = submitted.get(text) {
            let d = c.at.saturating_duration_since(*t);
            delays.push(d);
            if c.params["chat_id"]
                .as_i64()
                .is_some_and(|id| cold.contains(&id))
            {
                cold_delays.push(d);
            }
        }
    }
    delays.sort();
    cold_delays.sort();
    println!("{}:", workload.name);
    println!(
        "  messages: {} queued, {} delivered to {} chats in {:.1}s",
        total,
        delivered.len(),
        expected.len(),
        span.as_secs_f64()
    );
    println!(
        "  sustained: {:.2} msgs/s, ratio {:.3} of the global limit ({limit}/s)",
        delivered.len() as f64 / (span.as_secs_f64() + 1.0),
        ratio
    );
    println!("  429s: {}", sb.stats().too_many_requests);
    for c in calls.iter().filter(|c| c.status == 429).take(10) {
        println!(
            "    429 chat={} at {:.3}s",
            c.params["chat_id"],
            first.map_or(0.0, |f| c.at.saturating_duration_since(f).as_secs_f64())
        );
    }
    println!("  order violations: {violations} chat(s)");
    println!(
        "  queueing delay: p50 {:.2}s p99 {:.2}s",
        percentile(&delays, 0.5).as_secs_f64(),
        percentile(&delays, 0.99).as_secs_f64()
    );
    if !cold_delays.is_empty() {
        println!(
            "  cold chats' delay: p50 {:.2}s p99 {:.2}s",
            percentile(&cold_delays, 0.5).as_secs_f64(),
            percentile(&cold_delays, 0.99).as_secs_f64()
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let scale: f64 = args.first().and_then(|a| a.parse().ok()).unwrap_or(1.0);
    let only = args.get(1).cloned().unwrap_or_default();
    let settings = SenderSettings::default();
    println!(
        "sender benchmark, scale {scale}: limits {}/s global, {}/s per chat (burst {}), safety margin {:?}",
        settings.limits.global_per_second,
        settings.limits.chat_per_second,
        settings.limits.chat_burst,
        settings.limits.safety_margin
    );
    let system = actix_rt::System::new();
    system.block_on(async {
        if only.is_empty() || only == "broadcast" {
            run(broadcast(scale), &settings).await;
        }
        if only.is_empty() || only == "hotcold" {
            run(hot_and_cold(scale), &settings).await;
        }
    });
}
