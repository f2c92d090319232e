//! Logs, metrics and the ops HTTP server (`/metrics`, `/healthz`, `/readyz`).

pub mod logging;
pub mod metrics;
pub mod ops;

pub use metrics::Metrics;
pub use ops::{serve_ops, Readiness};
