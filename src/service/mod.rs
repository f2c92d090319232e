//! Processing logic, free of rdkafka types: the processor trait and built-ins, outcome
//! routing, the dedupe store, the offset tracker, the worker pool and the producer's ingest
//! logic (its HTTP adapter is `api`).

pub mod builtin;
pub mod circuit;
pub mod dedupe;
pub mod demo;
pub mod dlq;
pub mod generator;
pub mod ingest;
pub mod limits;
pub mod offsets;
pub mod pipeline;
pub mod processor;
pub mod publish;
pub mod source;
pub mod worker;

pub use processor::{ProcessError, Processor};
pub use publish::{PublishError, PublishFailure, Publisher};
