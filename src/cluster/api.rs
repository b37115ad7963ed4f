//! The push API (`POST /v1/chats/{chat_id}/events`, `POST /v1/calls`) on a
//! cluster node: any node takes a request, as any node takes a webhook's.
//!
//! - An event is stored in the update log, in its chat's partition and
//!   marked [`super::log::PUSHED_HEADER`], and answered 202 once the stream
//!   acknowledged it (a majority holds it). Its `update_id` is the negative
//!   of its stream sequence ([`super::log::pushed_id`]): unique in the bot's
//!   log, and the same each time the event is delivered. The partition's
//!   owner delivers it to the chat's scope in the log's order, among the
//!   chat's updates, with the updates' guarantees (delivered again to a new
//!   owner if its owner dies with it in hand; its calls made once).
//! - A call goes through the node's [`super::relay::Relay`] as an app's
//!   call without an update does: stored in the outbox, made by the elected
//!   sender, its outcome the answer.
//!
//! Unlike a single node, an event is taken before the apps are ready (it
//! waits in the log) and is never refused as too many waiting: the log
//! holds it.

use std::time::{SystemTime, UNIX_EPOCH};

use actix::prelude::*;

use super::log::{pushed_id, UpdateLog};
use super::partition_of;
use crate::actors::call::{Call, CallDone, Outcome};
use crate::actors::ingress::{ApiCall, ApiCalls, IngressError, PushEvent};
use crate::push::PushedEvent;
use crate::routing::ScopeKey;

pub struct ClusterApi {
    log: UpdateLog,
    outbox: Recipient<Call>,
    calls: ApiCalls,
    node_id: String,
    next_event: u64,
}

impl ClusterApi {
    /// `outbox`: the node's Relay.
    pub fn new(log: UpdateLog, outbox: Recipient<Call>, node_id: &str) -> ClusterApi {
        ClusterApi {
            log,
            outbox,
            calls: ApiCalls::default(),
            node_id: node_id.to_string(),
            next_event: 0,
        }
    }

    /// Unique to one event across the cluster and across restarts (a node
    /// id is the cluster's only one; its clock moves on between two runs),
    /// so that only a publish sent again is taken for a copy.
    fn message_id(&mut self) -> String {
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis());
        self.next_event += 1;
        format!("event.{}.{ms}.{}", self.node_id, self.next_event)
    }
}

impl Actor for ClusterApi {
    type Context = Context<Self>;
}

impl Handler<PushEvent> for ClusterApi {
    type Result = ResponseFuture<Result<i64, IngressError>>;
    fn handle(&mut self, msg: PushEvent, _: &mut Context<Self>) -> Self::Result {
        let partition = partition_of(&ScopeKey::chat(msg.chat_id), self.log.partitions());
        let body = PushedEvent::encode_unnumbered(msg.chat_id, &msg.event);
        let message_id = self.message_id();
        let log = self.log.clone();
        let chat_id = msg.chat_id;
        Box::pin(async move {
            match log.publish_pushed(message_id, partition, body.into()).await {
                Ok(stored) => Ok(pushed_id(stored.sequence)),
                Err(e) => {
                    ::log::error!(
                        "http: an event for chat={chat_id} was not stored: {e}; answered 503"
                    );
                    Err(IngressError::NotStored(e.to_string()))
                }
            }
        })
    }
}

impl Handler<ApiCall> for ClusterApi {
    type Result = ResponseFuture<Result<Outcome, IngressError>>;
    fn handle(&mut self, msg: ApiCall, ctx: &mut Context<Self>) -> Self::Result {
        self.calls.ask(msg, &self.outbox, ctx.address().recipient())
    }
}

impl Handler<CallDone> for ClusterApi {
    type Result = ();
    fn handle(&mut self, msg: CallDone, _: &mut Context<Self>) {
        self.calls.answered(msg);
    }
}
