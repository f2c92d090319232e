//! The only code that touches rdkafka: client settings, the publisher, the health checker,
//! topic administration, the consumer driver and the dev broker.

pub mod admin;
pub mod consumer;
pub(crate) mod context;

pub(crate) mod dev_broker;
pub(crate) mod dlq;
pub mod headers;
pub(crate) mod health;
pub(crate) mod publisher;
pub mod settings;

pub use admin::TopicAdmin;
pub use dev_broker::DevBroker;
pub use health::HealthChecker;
pub use publisher::KafkaPublisher;

// KAFKA_CONSUMER_AUTO_OFFSET_RESET=latest, applied to the source topics before joining.
pub(crate) mod offset_reset;
