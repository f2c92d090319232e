//! Processing logic, free of rdkafka types: the processor trait and built-ins, outcome
//! routing, the dedupe store, the offset tracker, the worker pool and the producer's ingest
//! logic (its HTTP adapter is `api`).

pub mod builtin;
pub(crate) mod circuit;
pub(crate) mod dedupe;
pub mod demo;
pub mod dlq;
pub(crate) mod generator;
pub(crate) mod ingest;
pub(crate) mod limits;
pub(crate) mod offsets;
pub mod pipeline;
pub mod processor;
pub mod publish;
pub(crate) mod source;
pub(crate) mod worker;

pub use processor::{ProcessError, Processor};
pub use publish::{PublishError, PublishFailure, Publisher};
