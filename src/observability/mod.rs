//! Logs, metrics, message events, readiness and the ops HTTP server (`/metrics`, `/healthz`,
//! `/readyz`).

pub(crate) mod events;
pub mod logging;
pub mod metrics;
pub(crate) mod ops;
pub(crate) mod readiness;

pub use metrics::Metrics;
pub use ops::serve_ops;
pub use readiness::Readiness;
