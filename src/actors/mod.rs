//! The daemon's actors, one file each, and the call the outgoing ones pass
//! along ([`call`]). All run on the one actix System thread.

pub mod call;
pub mod ingress;
pub mod intake;
pub mod outbox;
pub mod poller;
pub mod scope;
pub mod sender;
pub mod supervisor;
pub mod webhook;
pub mod worker;
