//! The boundary between the consumer pipeline and the Kafka consumer driver: the events the
//! driver delivers and the commands the pipeline gives back. No rdkafka types cross it.

use std::sync::mpsc::SyncSender;

use crate::model::Delivery;

/// A topic and partition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Tp {
    /// Topic name.
    pub topic: String,
    /// Partition number.
    pub partition: i32,
}

impl Tp {
    /// A topic-partition.
    pub fn new(topic: impl Into<String>, partition: i32) -> Self {
        Tp {
            topic: topic.into(),
            partition,
        }
    }
}

impl std::fmt::Display for Tp {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.topic, self.partition)
    }
}

/// Identifies one fetch position of a partition. The driver tags every delivery with the
/// partition's current epoch; assignment and every seek start a new one, so the pipeline
/// can drop deliveries fetched before a seek or from an earlier assignment.
pub type Epoch = u64;

/// A rebalance event from the driver.
#[derive(Debug)]
pub enum Control {
    /// Partitions assigned; each starts at its committed offset with the given epoch.
    Assigned(Vec<(Tp, Epoch)>),
    /// Partitions about to be revoked. The pipeline stops dispatching them, drains their
    /// in-flight messages (bounded by the shutdown timeout), and answers with the offsets
    /// to commit; the driver commits them synchronously before letting them go.
    Revoked {
        /// The partitions.
        partitions: Vec<Tp>,
        /// Where to send the offsets to commit (next offset to consume per partition).
        reply: SyncSender<Vec<(Tp, i64)>>,
    },
}

/// A batch of deliveries of one poll round, each with the epoch it was fetched under.
pub type DeliveryBatch = Vec<(Delivery, Epoch)>;

/// What the pipeline asks of the driver. Every call returns at once (the driver applies it
/// on its own thread), so the pipeline never blocks on Kafka.
#[cfg_attr(test, mockall::automock)]
pub trait ConsumerControl: Send + Sync + 'static {
    /// Stops fetching `tp`.
    fn pause(&self, tp: &Tp);
    /// Resumes fetching `tp`.
    fn resume(&self, tp: &Tp);
    /// Pauses `tp` and moves its fetch position to `offset`, in that order and as one
    /// request; returns the new epoch that deliveries fetched from there will carry. The
    /// caller resumes the partition when it wants the messages.
    fn seek(&self, tp: &Tp, offset: i64) -> Epoch;
    /// Commits these offsets (next offset to consume) asynchronously.
    fn commit(&self, offsets: Vec<(Tp, i64)>);
    /// Commits these offsets synchronously, leaves the group and stops the driver.
    /// Returns once the driver has stopped.
    fn close(&self, offsets: Vec<(Tp, i64)>);
}
