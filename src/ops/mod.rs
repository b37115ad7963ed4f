//! Operations: what an operator watches and steers a running daemon with.
//!
//! - [`http`]: `/healthz`, `/readyz`, `/metrics` (off unless `http.bind`).
//! - [`api`]: the endpoint's routes for other programs (events into chats,
//!   Bot API calls), behind `http.api_token`.
//! - [`metrics`]: the process-wide counters the actors bump; Prometheus text.
//! - [`logging`]: text or JSON lines, secrets masked.
//! - [`reload`]: SIGHUP and `--reload` ask the Supervisor to replace the workers.

pub mod api;
pub mod http;
pub mod logging;
pub mod metrics;
pub mod reload;
