//! The daemon's actors, one file each. All run on the one actix System thread.

pub mod outbox;
pub mod poller;
pub mod scope;
pub mod sender;
pub mod supervisor;
pub mod worker;
