//! courier: Kafka producer and consumer services with retry topics, a dead-letter topic and
//! dedupe by `message-id`. See DESIGN.md for the contract.

pub(crate) mod api;
pub mod app;
pub mod cli;
pub mod config;
pub mod model;
pub mod observability;
pub mod otel;
pub mod service;
pub mod transport;
