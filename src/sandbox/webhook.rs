//! Delivery to a webhook, as Telegram does it: while a webhook is set, each
//! queued update is POSTed to its URL as JSON, with the secret in
//! `X-Telegram-Bot-Api-Secret-Token` when one was given.
//!
//! 1. At most one update per chat is in flight, and a chat's next update
//!    goes only after the previous one was answered 2xx: per-chat order.
//! 2. At most `max_connections` updates are in flight overall.
//! 3. A non-2xx answer, a dropped connection or no answer within
//!    [`TIMEOUT`] leaves the update queued; it is sent again after a
//!    backoff ([`retry_delay`]), and getWebhookInfo reports the error.
//! 4. A 2xx answer removes the update from the queue.
//!
//! The choice of what to send is plain data on the state
//! ([`Deliveries`]); [`run`] does the sending on the server's thread.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::state::{unix_now, State};
use super::Shared;

/// How long a delivery may take before it counts as failed (Telegram
/// gives a webhook about a minute; the sandbox is impatient, for tests).
pub(crate) const TIMEOUT: Duration = Duration::from_secs(30);

/// The wait before the `failures`-th retry of an update: short, since
/// the tests wait for it, and doubling up to two seconds.
pub(crate) fn retry_delay(failures: u32) -> Duration {
    Duration::from_millis(50u64 << failures.min(10).saturating_sub(1)).min(Duration::from_secs(2))
}

/// What the webhook is sending and what waits for a retry.
#[derive(Default)]
pub(crate) struct Deliveries {
    /// Update ids in flight.
    in_flight: HashSet<i64>,
    /// By update id: when it may be sent again, and its failures so far.
    retry: HashMap<i64, (Instant, u32)>,
    /// Answered 2xx.
    pub delivered: u64,
    /// Attempts that failed (rule 3).
    pub failed: u64,
    /// Unix time and text of the last failure, for getWebhookInfo.
    pub last_error: Option<(i64, String)>,
}

/// One update to POST.
pub(crate) struct Due {
    pub id: i64,
    pub body: Value,
}

/// Where and how to POST.
#[derive(Clone)]
pub(crate) struct Target {
    pub url: String,
    pub secret: Option<String>,
}

/// The chat an update belongs to for rule 1: its chat, else its message's
/// chat, else its sender; updates with none are not held back by others.
fn chat_of(body: &Value) -> Option<i64> {
    let object = body
        .as_object()?
        .iter()
        .find(|(k, _)| k.as_str() != "update_id")?
        .1;
    [
        &object["chat"]["id"],
        &object["message"]["chat"]["id"],
        &object["from"]["id"],
        &object["user"]["id"],
    ]
    .into_iter()
    .find_map(Value::as_i64)
}

impl State {
    /// The updates to send now (rules 1 and 2), marked in flight; the target;
    /// and the earliest time a held-back retry becomes due.
    pub(crate) fn webhook_due(
        &mut self,
        now: Instant,
    ) -> (Vec<Due>, Option<Target>, Option<Instant>) {
        let Some(hook) = &self.webhook else {
            return (Vec::new(), None, None);
        };
        let target = Target {
            url: hook.url.clone(),
            secret: hook.secret_token.clone(),
        };
        let limit = usize::try_from(hook.max_connections.clamp(1, 100)).unwrap_or(40);
        self.drop_unwanted_updates();
        let deliveries = &mut self.deliveries;
        let mut due = Vec::new();
        let mut next: Option<Instant> = None;
        let mut chats_waiting = HashSet::new();
        for update in &self.updates {
            if let Some(chat) = chat_of(&update.body) {
                // The chat's earliest queued update is the only one that may go.
                if !chats_waiting.insert(chat) {
                    continue;
                }
            }
            if deliveries.in_flight.contains(&update.id) {
                continue;
            }
            if let Some((at, _)) = deliveries.retry.get(&update.id) {
                if *at > now {
                    next = Some(next.map_or(*at, |n| n.min(*at)));
                    continue;
                }
            }
            if deliveries.in_flight.len() >= limit {
                break;
            }
            deliveries.in_flight.insert(update.id);
            due.push(Due {
                id: update.id,
                body: update.body.clone(),
            });
        }
        (due, Some(target), next)
    }

    /// Rules 3 and 4: the answer to a delivery, `Err` with what went wrong.
    pub(crate) fn webhook_done(&mut self, id: i64, answer: Result<(), String>, now: Instant) {
        self.deliveries.in_flight.remove(&id);
        match answer {
            Ok(()) => {
                self.deliveries.retry.remove(&id);
                self.deliveries.delivered += 1;
                self.updates.retain(|u| u.id != id);
            }
            Err(error) => {
                self.deliveries.failed += 1;
                let failures = self.deliveries.retry.get(&id).map_or(0, |(_, n)| *n) + 1;
                self.deliveries
                    .retry
                    .insert(id, (now + retry_delay(failures), failures));
                self.deliveries.last_error = Some((unix_now(), error));
            }
        }
    }
}

/// Sends what is due whenever the state changes or a retry comes due, for
/// as long as the server runs.
pub(crate) async fn run(shared: Arc<Shared>) {
    let client = awc::Client::builder().disable_timeout().finish();
    loop {
        // Enabled before the state is read, so no change in between is missed.
        let changed = shared.poll_wakeup.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let (due, target, next) = shared.update_quietly(|s| s.webhook_due(Instant::now()));
        if let Some(target) = target {
            for update in due {
                let (client, shared, target) = (client.clone(), shared.clone(), target.clone());
                actix_rt::spawn(async move {
                    let answer = post(&client, &target, &update.body).await;
                    shared.update(|s| s.webhook_done(update.id, answer, Instant::now()));
                });
            }
        }
        match next {
            Some(at) => {
                tokio::select! {
                    () = changed => {}
                    () = tokio::time::sleep_until(at.into()) => {}
                }
            }
            None => changed.await,
        }
    }
}

/// One delivery; `Err` with Telegram's wording of the failure.
async fn post(client: &awc::Client, target: &Target, body: &Value) -> Result<(), String> {
    let mut request = client.post(&target.url).timeout(TIMEOUT);
    if let Some(secret) = &target.secret {
        request = request.insert_header(("X-Telegram-Bot-Api-Secret-Token", secret.as_str()));
    }
    let attempt = async {
        let mut response = request.send_json(body).await.map_err(|e| match e {
            awc::error::SendRequestError::Timeout => "Read timeout expired".to_string(),
            awc::error::SendRequestError::Connect(e) => format!("Connection refused: {e}"),
            other => format!("Connection failed: {other}"),
        })?;
        let status = response.status();
        // The body is read so the connection can be reused; its content
        // does not matter.
        let _ = response.body().limit(1024 * 1024).await;
        if status.is_success() {
            Ok(())
        } else {
            Err(format!(
                "Wrong response from the webhook: {} {}",
                status.as_u16(),
                status.canonical_reason().unwrap_or("")
            ))
        }
    };
    match tokio::time::timeout(TIMEOUT, attempt).await {
        Ok(answer) => answer,
        Err(_) => Err("Read timeout expired".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sandbox::state::Webhook;
    use crate::sandbox::SandboxOptions;
    use serde_json::json;

    fn with_hook(max_connections: i64) -> State {
        let mut state = State::new(SandboxOptions::default());
        state.webhook = Some(Webhook {
            url: "http://127.0.0.1:1/hook".into(),
            max_connections,
            allowed_updates: None,
            secret_token: Some("s".into()),
        });
        state
    }

    fn ids(due: &[Due]) -> Vec<i64> {
        due.iter().map(|d| d.id).collect()
    }

    #[test]
    fn one_update_per_chat_in_flight_and_at_most_max_connections() {
        let mut state = with_hook(2);
        let now = Instant::now();
        let a1 = state.inject_text(1, "a1");
        let a2 = state.inject_text(1, "a2");
        let b1 = state.inject_text(2, "b1");
        let c1 = state.inject_text(3, "c1");
        let (due, target, _) = state.webhook_due(now);
        assert_eq!(ids(&due), vec![a1, b1], "one per chat, two connections");
        assert_eq!(target.expect("a webhook").secret.as_deref(), Some("s"));
        assert!(state.webhook_due(now).0.is_empty(), "both connections busy");
        state.webhook_done(a1, Ok(()), now);
        assert_eq!(
            ids(&state.webhook_due(now).0),
            vec![a2],
            "chat 1 goes on first"
        );
        state.webhook_done(b1, Ok(()), now);
        assert_eq!(ids(&state.webhook_due(now).0), vec![c1]);
        assert_eq!(state.deliveries.delivered, 2);
        assert_eq!(state.updates.len(), 2, "a2 and c1 wait for their answers");
    }

    #[test]
    fn a_failed_delivery_holds_its_chat_back_until_retried_after_a_backoff() {
        let mut state = with_hook(40);
        let now = Instant::now();
        let a1 = state.inject_text(1, "a1");
        state.inject_text(1, "a2");
        let b1 = state.inject_text(2, "b1");
        assert_eq!(ids(&state.webhook_due(now).0), vec![a1, b1]);
        state.webhook_done(a1, Err("Wrong response from the webhook: 503".into()), now);
        let (due, _, next) = state.webhook_due(now);
        assert!(due.is_empty(), "a2 must not overtake a1");
        assert_eq!(next, Some(now + retry_delay(1)));
        let later = now + retry_delay(1);
        assert_eq!(
            ids(&state.webhook_due(later).0),
            vec![a1],
            "a1 again, not a2"
        );
        assert_eq!(
            state.deliveries.last_error.as_ref().map(|e| e.1.as_str()),
            Some("Wrong response from the webhook: 503")
        );
        state.webhook_done(a1, Err("again".into()), later);
        let (_, _, next) = state.webhook_due(later);
        assert_eq!(next, Some(later + retry_delay(2)), "the backoff grows");
        assert!(retry_delay(2) > retry_delay(1));
        assert!(retry_delay(100) <= Duration::from_secs(2));
    }

    #[test]
    fn nothing_is_sent_without_a_webhook_and_chatless_updates_are_not_held_back() {
        let mut state = State::new(SandboxOptions::default());
        state.inject_text(1, "a");
        assert!(state.webhook_due(Instant::now()).1.is_none());
        let mut state = with_hook(40);
        let p1 = state.inject_update(json!({"poll": {"id": "1"}}));
        let p2 = state.inject_update(json!({"poll": {"id": "2"}}));
        assert_eq!(ids(&state.webhook_due(Instant::now()).0), vec![p1, p2]);
    }
}
