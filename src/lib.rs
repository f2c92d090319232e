//! courier: Kafka producer and consumer services with retry topics, a dead-letter topic and
//! dedupe by `message-id`. See DESIGN.md for the contract.
//!
//! # Layout
//!
//! Each layer uses only the ones below it:
//!
//! - [`cli`] (with `main.rs`): the command line; one [`app`] call per subcommand.
//! - [`app`]: wiring. Every subcommand `x` is `XArgs` + `app::x::run(config, args, shutdown)`;
//!   `consumer` and `producer` also offer `start` for tests and the demo.
//! - `api`: the producer's ingest HTTP adapter (axum) over [`service`]'s publishing logic;
//!   bearer tokens (`auth`), the TLS listener (`tls`), files re-read on change (`watch`).
//! - [`service`]: processing logic, free of rdkafka, axum and prometheus types: processors,
//!   the consumer pipeline (retry gate, back-pressure, key-hash lanes, offsets, rebalances),
//!   routing to retry topics and the DLQ, dedupe, the circuit breaker and limits, ingest
//!   validation, the generator, DLQ inspection and replay.
//! - [`transport`]: the only code that touches rdkafka: client settings, the consumer
//!   driver, the publisher, the health checker, admin, the DLQ reader, the dev broker.
//! - [`observability`]: logs, metrics, message events (one type per event that logs and
//!   counts), readiness and the ops server.
//! - [`config`]: every setting defined once; defaults → TOML → environment.
//! - [`model`]: the envelope, W3C trace context, headers and owned message types every
//!   layer shares.
//! - [`otel`]: spans behind a no-op facade; OpenTelemetry is compiled only with the `otel`
//!   feature.
//! - `testing` (feature `test-util`, for tests/ and benches/ only): mock clusters, child
//!   processes, service environments, an HTTP client and sink, a scripted processor.

pub(crate) mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod model;
pub mod observability;
pub mod otel;
pub mod service;
#[cfg(any(test, feature = "test-util"))]
pub mod testing;
pub mod transport;
