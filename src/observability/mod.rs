//! Logs, metrics, message events, readiness and the ops HTTP server (`/metrics`, `/healthz`,
//! `/readyz`).

pub mod events;
pub mod logging;
pub mod metrics;
pub mod ops;
pub mod readiness;

pub use metrics::Metrics;
pub use ops::serve_ops;
pub use readiness::Readiness;
