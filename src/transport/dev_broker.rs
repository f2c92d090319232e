//! `courier dev-broker`: librdkafka's in-memory mock cluster, a real Kafka-protocol broker
//! on loopback. It keeps nothing on disk and only the newest messages of each partition:
//! for local runs and tests, never for production.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

/// A running in-memory broker. Dropping it stops it.
pub struct DevBroker {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for DevBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DevBroker")
            .field("bootstrap", &self.bootstrap_servers())
            .finish()
    }
}

impl DevBroker {
    /// Starts a one-broker mock cluster.
    ///
    /// # Errors
    /// When librdkafka cannot start it.
    pub fn start() -> Result<Self, rdkafka::error::KafkaError> {
        Ok(DevBroker {
            cluster: MockCluster::new(1)?,
        })
    }

    /// Creates `topic` with `partitions` partitions (the mock has no CreateTopics API).
    ///
    /// # Errors
    /// When the mock refuses it.
    pub fn create_topic(
        &self,
        topic: &str,
        partitions: i32,
    ) -> Result<(), rdkafka::error::KafkaError> {
        self.cluster.create_topic(topic, partitions, 1)
    }

    /// The bootstrap address, `127.0.0.1:port`.
    pub fn bootstrap_servers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// Takes the broker down (fault injection for tests and demos).
    ///
    /// # Errors
    /// When the mock refuses it.
    pub fn broker_down(&self) -> Result<(), rdkafka::error::KafkaError> {
        self.cluster.broker_down(1)
    }

    /// Brings the broker back up.
    ///
    /// # Errors
    /// When the mock refuses it.
    pub fn broker_up(&self) -> Result<(), rdkafka::error::KafkaError> {
        self.cluster.broker_up(1)
    }

    /// The underlying mock cluster, for fault injection in tests.
    pub fn cluster(&self) -> &MockCluster<'static, DefaultProducerContext> {
        &self.cluster
    }
}
