//! Operations: what an operator watches and steers a running daemon with.
//!
//! - [`http`]: `/healthz`, `/readyz`, `/metrics` (off unless `http.bind`).
//! - [`metrics`]: the process-wide counters the actors bump; Prometheus text.
//! - [`logging`]: text or JSON lines, secrets masked.
//! - [`reload`]: SIGHUP and `--reload` ask the Supervisor to replace the workers.

pub mod http;
pub mod logging;
pub mod metrics;
pub mod reload;
