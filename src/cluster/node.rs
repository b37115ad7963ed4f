//! The daemon as a cluster node: the single node's apps (Supervisor, scopes,
//! workers) with the cluster's parts around them in place of the journal,
//! the Poller and the Sender (docs/cluster.md, "A node").
//!
//! Every node runs every part and the engine decides who does what: the
//! [`Ingress`] polls only while it holds the `ingress` lease (or, with a
//! webhook, every node stores what Telegram posts to it); the [`Owner`]
//! takes the partitions assigned to this node and hands their updates to
//! the scopes; the [`Relay`] stores the apps' calls in the engine's outbox
//! and acknowledges updates the apps are done with; the [`ElectedSender`]
//! makes the bot's calls only while it holds the `sender` lease.
//!
//! Shutdown (SIGTERM) hands over before it stops: the ingress lease is
//! released; the Owner withdraws this node, lets the scopes finish the
//! updates in hand and releases its partitions (their next owners deliver
//! nothing twice); then the scopes close, the Relay stores what they sent
//! last, the sender finishes its calls in flight and releases its lease, and
//! the workers end.

use std::future::Future;
use std::sync::Arc;

use actix::prelude::*;
use tokio::sync::{mpsc, oneshot, Notify};

use super::api::ClusterApi;
use super::partitions::{Delivery, OwnerSettings};
use super::relay::{Held, Relay};
use super::{
    bot_id, BotExecutor, ClusterError, ElectedSender, Ingress, Leases, Membership, Owner, UpdateLog,
};
use crate::actors::outbox::{Flush, OutboxLink};
use crate::actors::sender::Sender;
use crate::actors::supervisor::{Dispatch, Push, Supervisor};
use crate::ops::metrics::{ClusterView, PartitionView};
use crate::push::PushedEvent;
use crate::settings::{ClusterSettings, Settings};
use crate::telegram::{Bot, Update};
use crate::{ops, RunError};

/// Updates in hand per partition, delivered to the scopes and not yet done:
/// enough to keep every worker busy, few enough that a takeover redelivers
/// little.
const IN_HAND_PER_PARTITION: usize = 64;

/// Runs the daemon as a cluster node until a signal (or `stop`) asks it to
/// stop. Must be awaited inside an actix `System`.
pub async fn run(
    settings: Settings,
    cluster: ClusterSettings,
    stop: Option<Arc<Notify>>,
) -> Result<(), RunError> {
    let bot = Bot::new(
        &settings.telegram.api_url,
        &settings.telegram.token,
        settings.telegram.http_timeout,
    );
    log::info!(
        "asgigramd {} starting as cluster node {}: app={} workers={} python={}",
        env!("CARGO_PKG_VERSION"),
        cluster.node_id,
        settings.app.application,
        settings.app.workers,
        settings.app.python
    );
    let listener = crate::ops::http::bind(&settings)?;
    let webhook_listener =
        match &settings.webhook {
            Some(hook) => Some(crate::actors::webhook::bind(hook).map_err(|source| {
                RunError::WebhookListen {
                    addr: hook.listen,
                    source,
                }
            })?),
            None => None,
        };
    let shutdown = crate::ShutdownSignal::install(stop)?;
    let parts = tokio::select! {
        parts = Parts::open(&settings, &cluster) => parts?,
        _ = shutdown.wait() => return Ok(()),
        () = shutdown.forced() => return Err(RunError::Interrupted),
    };
    let serve = serve(
        settings,
        cluster,
        bot,
        parts,
        listener,
        webhook_listener,
        &shutdown,
    );
    tokio::select! {
        result = serve => result,
        () = shutdown.forced() => Err(RunError::Interrupted),
    }
}

/// What a node opens in the engine before anything runs.
struct Parts {
    js: async_nats::jetstream::Context,
    leases: Leases,
    log: UpdateLog,
    outbox: super::Outbox,
}

impl Parts {
    /// Connects and opens (creating where missing) the bot's streams and
    /// buckets; a partition count or lease TTL that differs from what the
    /// engine holds stops the node here.
    async fn open(settings: &Settings, cluster: &ClusterSettings) -> Result<Parts, ClusterError> {
        let id = bot_id(&settings.telegram.token)?;
        let js = super::connect(cluster).await?;
        let leases = Leases::open(&js, id, cluster).await?;
        let log = UpdateLog::open(&js, id, cluster).await?;
        let outbox = super::Outbox::open(&js, id, cluster).await?;
        log::info!(
            "cluster: connected; update log {} ({} partitions), outbox {}",
            log.stream(),
            log.partitions(),
            outbox.stream()
        );
        Ok(Parts {
            js,
            leases,
            log,
            outbox,
        })
    }
}

/// Stops one part: its `run` awaits the receiving end.
fn stopper() -> (oneshot::Sender<()>, impl Future<Output = ()> + 'static) {
    let (tx, rx) = oneshot::channel::<()>();
    (tx, async move {
        let _ = rx.await;
    })
}

async fn serve(
    settings: Settings,
    cluster: ClusterSettings,
    bot: Bot,
    parts: Parts,
    listener: Option<std::net::TcpListener>,
    webhook_listener: Option<std::net::TcpListener>,
    shutdown: &crate::ShutdownSignal,
) -> Result<(), RunError> {
    let Parts {
        js,
        leases,
        log,
        outbox,
    } = parts;
    // Downloads only: every call that changes something goes through the
    // engine to the elected sender.
    let local = Sender::new(bot.clone(), settings.sender.clone()).start();
    let relay = Relay::start(outbox.requester(), local, &cluster.node_id);
    let supervisor = Supervisor::new(settings.clone(), OutboxLink::to(&relay)).start();
    // Only where a program can reach it: an endpoint, and a token to open it.
    let api = settings
        .http
        .api_token
        .clone()
        .filter(|_| listener.is_some())
        .map(|token| {
            let api = ClusterApi::new(log.clone(), relay.clone().recipient(), &cluster.node_id);
            ops::api::Api::new(token, &api.start())
        });
    let _operations = ops::http::start_operations(listener, &settings, &supervisor, api)?;
    // The sender contends before the apps start: a lifespan startup that
    // awaits a call (setMyCommands, say) on the cluster's first node must
    // find a sender.
    let elected = ElectedSender::new(
        outbox,
        leases.clone(),
        BotExecutor::new(bot.clone(), settings.telegram.http_timeout),
        settings.sender.clone(),
    );
    let sender_status = elected.status();
    let (stop_sender, sender_stop) = stopper();
    let sender_task = actix::spawn(elected.run(sender_stop));
    let name = match crate::start_apps(&settings, &supervisor, &bot, shutdown).await {
        Ok(Some(name)) => name,
        // The apps never ran: the sender lets its lease go at once rather
        // than have the others wait out its TTL.
        other => {
            let _ = stop_sender.send(());
            let _ = tokio::time::timeout(settings.shutdown.drain_timeout, sender_task).await;
            return other.map(|_| ());
        }
    };
    log::info!("Application startup complete.");

    let (deliver, deliveries) = mpsc::channel(IN_HAND_PER_PARTITION);
    let owner = Owner::start(
        js,
        log.clone(),
        leases.clone(),
        Membership::new(leases.clone(), settings.app.workers as u32),
        OwnerSettings::new(&cluster, IN_HAND_PER_PARTITION),
        deliver,
    );
    let handing = actix::spawn(hand_to_scopes(
        deliveries,
        supervisor.clone(),
        relay.clone(),
    ));

    let mut ingress_status = None;
    let (stop_ingress, ingress_stop) = stopper();
    let ingress = match (&settings.webhook, webhook_listener) {
        (Some(hook), Some(listener)) => {
            let server = crate::actors::webhook::serve_to_log(listener, hook, log)?;
            let registered = tokio::select! {
                r = crate::actors::webhook::register(&bot, hook, &settings.telegram.allowed_updates) => Some(r),
                _ = shutdown.wait() => None,
            };
            match registered {
                Some(Ok(())) => log::info!("Receiving updates by webhook as @{name}"),
                Some(Err(crate::actors::webhook::RegisterError::TokenRejected)) => {
                    server.stop(false).await;
                    return Err(RunError::TokenRejected);
                }
                Some(Err(e)) => {
                    server.stop(false).await;
                    return Err(e.into());
                }
                None => {}
            }
            Intake::Webhook(server)
        }
        _ => {
            let poller = Ingress::new(bot.clone(), leases, log, &settings.telegram, &cluster);
            ingress_status = Some(poller.status());
            log::info!("Polling Telegram as @{name} while this node holds the ingress lease");
            Intake::Polling(actix::spawn(poller.run(ingress_stop)))
        }
    };
    let view = View {
        node_id: cluster.node_id.clone(),
        ingress: ingress_status,
        sender: sender_status,
        owner: owner.status_watch(),
    };
    let viewing = actix::spawn(view.refresh(cluster.lease_renew));
    let fatal = match ingress {
        Intake::Polling(mut task) => {
            let fatal = tokio::select! {
                _ = shutdown.wait() => None,
                ended = &mut task => Some(ended),
            };
            if fatal.is_none() {
                let _ = stop_ingress.send(());
                let _ = task.await;
            }
            fatal
        }
        Intake::Webhook(server) => {
            shutdown.wait().await;
            server.stop(true).await;
            None
        }
    };
    log::info!("Shutting down");
    ops::metrics::metrics().set_shutting_down();
    // Handing over needs the scopes running: the updates in hand must be
    // done before their partitions are released.
    viewing.abort();
    owner.stop().await;
    let _ = handing.await;
    let grace = settings.scopes.disconnect_grace;
    crate::close_scopes(&supervisor, grace).await;
    let drain = settings.shutdown.drain_timeout;
    if tokio::time::timeout(drain, relay.send(Flush))
        .await
        .is_err()
    {
        log::warn!(
            "cluster: the last calls were not stored within {:.1}s (shutdown.drain_timeout); \
             their updates were not acknowledged and come again to the next owner",
            drain.as_secs_f64()
        );
    }
    let _ = stop_sender.send(());
    if tokio::time::timeout(drain, sender_task).await.is_err() {
        log::warn!(
            "cluster: the sender did not finish within {:.1}s (shutdown.drain_timeout); its \
             lease expires and the next sender makes what is left",
            drain.as_secs_f64()
        );
    }
    crate::stop_workers(&supervisor, grace, settings.shutdown.worker_timeout).await;
    let result = match fatal {
        Some(Ok(Err(ClusterError::TokenRejected))) => Err(RunError::TokenRejected),
        Some(Ok(Err(e))) => Err(e.into()),
        _ => Ok(()),
    };
    log::info!("Finished.");
    result
}

enum Intake {
    Polling(tokio::task::JoinHandle<Result<(), ClusterError>>),
    Webhook(actix_web::dev::ServerHandle),
}

/// Hands the partitions' updates to the Supervisor, each with its
/// acknowledgement given to the Relay first, so that the scope's `Done`
/// finds it. Ends when the Owner stops.
async fn hand_to_scopes(
    mut deliveries: mpsc::Receiver<Delivery>,
    supervisor: Addr<Supervisor>,
    relay: Addr<Relay>,
) {
    let mut batch = Vec::new();
    while deliveries.recv_many(&mut batch, 256).await > 0 {
        let mut updates = Vec::with_capacity(batch.len());
        for delivery in batch.drain(..) {
            if delivery.pushed {
                // After the updates before it in the batch: a chat's
                // events and updates reach its scope in the log's order.
                if !updates.is_empty() {
                    supervisor.do_send(Dispatch(std::mem::take(&mut updates)));
                }
                hand_pushed(delivery, &supervisor, &relay);
                continue;
            }
            let read = std::str::from_utf8(&delivery.update)
                .map_err(|e| e.to_string())
                .and_then(|text| Update::from_json(text).map_err(|s| s.error.to_string()));
            match read {
                Ok(update) => {
                    if delivery.redelivered {
                        log::info!(
                            "update={} delivered again (partition {}): its previous owner \
                             stopped with it in hand",
                            update.id.0,
                            delivery.partition
                        );
                    }
                    relay.do_send(Held {
                        update_id: update.id.0,
                        ack: delivery.ack,
                    });
                    updates.push(update);
                }
                Err(e) => {
                    log::error!(
                        "partition {} sequence {}: the update log holds an update that cannot \
                         be read ({e}); acknowledged and skipped",
                        delivery.partition,
                        delivery.sequence
                    );
                    delivery.ack.done();
                }
            }
        }
        if !updates.is_empty() {
            supervisor.do_send(Dispatch(updates));
        }
    }
}

/// A pushed event from the log to its chat's scope, numbered by its place
/// in the log.
fn hand_pushed(delivery: Delivery, supervisor: &Addr<Supervisor>, relay: &Addr<Relay>) {
    let id = super::log::pushed_id(delivery.sequence);
    match PushedEvent::decode_numbered(id, &delivery.update) {
        Ok(event) => {
            relay.do_send(Held {
                update_id: id,
                ack: delivery.ack,
            });
            supervisor.do_send(Push {
                event,
                placed: None,
            });
        }
        Err(e) => {
            log::error!(
                "partition {} sequence {}: the update log holds a pushed event that cannot \
                 be read ({e}); acknowledged and skipped",
                delivery.partition,
                delivery.sequence
            );
            delivery.ack.done();
        }
    }
}

/// What `/readyz` and `/metrics` show of this node, read from its parts.
struct View {
    node_id: String,
    ingress: Option<tokio::sync::watch::Receiver<super::IngressStatus>>,
    sender: tokio::sync::watch::Receiver<super::SenderStatus>,
    owner: tokio::sync::watch::Receiver<super::OwnerStatus>,
}

impl View {
    fn read(&self) -> ClusterView {
        let ingress = self.ingress.as_ref().map(|s| s.borrow().clone());
        let sender = self.sender.borrow().clone();
        let owner = self.owner.borrow().clone();
        ClusterView {
            node_id: self.node_id.clone(),
            live_nodes: owner.live.len(),
            poller: ingress
                .as_ref()
                .filter(|i| i.holding)
                .and_then(|i| i.lease_age()),
            sender: sender.lease_age().filter(|_| sender.holding),
            partitions: owner
                .partitions
                .iter()
                .map(|p| PartitionView {
                    partition: p.partition,
                    lease_age: p.lease_age,
                    in_hand: p.in_hand,
                    lag: p.lag,
                    redelivered: p.redelivered,
                })
                .collect(),
            calls_pending: if sender.holding { sender.pending } else { 0 },
            calls_in_doubt: sender.in_doubt,
            // In webhook mode every node stores what it is posted.
            updates_stored: ingress.as_ref().map_or_else(
                || {
                    crate::ops::metrics::metrics()
                        .webhook_requests
                        .get(&["accepted"])
                },
                |i| i.stored,
            ),
            updates_fetched_again: ingress.as_ref().map_or(0, |i| i.duplicates),
        }
    }

    /// Publishes the view every `every`, and logs one line when the node's
    /// roles or partitions change, for log-based monitoring.
    async fn refresh(self, every: std::time::Duration) {
        let mut last: Option<(String, Vec<u32>)> = None;
        loop {
            let view = self.read();
            let part = (
                view.roles(),
                view.partitions
                    .iter()
                    .map(|p| p.partition)
                    .collect::<Vec<_>>(),
            );
            if last.as_ref() != Some(&part) {
                log::info!(
                    "cluster: node={} roles: {}; partitions: {:?}",
                    view.node_id,
                    part.0,
                    part.1
                );
                last = Some(part);
            }
            ops::metrics::metrics().set_cluster(view);
            tokio::time::sleep(every).await;
        }
    }
}
