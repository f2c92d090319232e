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

/// Identifies one assignment of a partition, or one fetch position within it. The driver
/// starts a new epoch at every assignment (the partition's *generation*) and at every seek
/// (its *fetch epoch*), and tags every delivery with the current fetch epoch, so the
/// pipeline can drop deliveries fetched before a seek or under an earlier assignment, and
/// the driver can ignore requests about an assignment that is gone.
pub type Epoch = u64;

/// A rebalance event from the driver.
#[derive(Debug)]
pub enum DriverEvent {
    /// Partitions newly assigned; each starts at its committed offset, with the given
    /// epoch as its generation and first fetch epoch. The driver has resumed each one, so
    /// no pause of an earlier assignment survives (librdkafka keeps an application pause
    /// across unassign/assign).
    Assigned(Vec<(Tp, Epoch)>),
    /// Partitions about to be revoked (all of them with the eager protocol, only those that
    /// change owner with `cooperative-sticky`). The pipeline stops dispatching them (work
    /// queued for them is never started), drains what is running (bounded by the shutdown
    /// timeout) and answers with the offsets to commit; the driver commits them
    /// synchronously before letting the partitions go.
    Revoked {
        /// The partitions.
        partitions: Vec<Tp>,
        /// The group already gave them to another member (session lost): nothing may be
        /// committed and nothing is waited for.
        lost: bool,
        /// Where to send the offsets to commit (next offset to consume per partition).
        reply: SyncSender<Vec<(Tp, i64)>>,
    },
}

/// A batch of deliveries of one poll round, each with the epoch it was fetched under.
pub type DeliveryBatch = Vec<(Delivery, Epoch)>;

/// What the pipeline asks of the driver. Every call returns at once (the driver applies it
/// on its own thread), so the pipeline never blocks on Kafka. Each request names the
/// partition's generation: the driver ignores a request about an assignment that was
/// revoked meanwhile, so nothing leaks onto a later assignment of the same partition.
#[cfg_attr(test, mockall::automock)]
pub trait DriverControl: Send + Sync + 'static {
    /// Stops fetching `tp`.
    fn pause(&self, tp: &Tp, generation: Epoch);
    /// Resumes fetching `tp`.
    fn resume(&self, tp: &Tp, generation: Epoch);
    /// Pauses `tp` and moves its fetch position to `offset`, in that order and as one
    /// request; returns the new fetch epoch that deliveries fetched from there will carry.
    /// The caller resumes the partition when it wants the messages.
    fn seek(&self, tp: &Tp, generation: Epoch, offset: i64) -> Epoch;
    /// Commits these offsets (next offset to consume) asynchronously: `(partition,
    /// generation, offset)`.
    fn commit(&self, offsets: Vec<(Tp, Epoch, i64)>);
    /// Hands deliveries the pipeline is done with (and emptied batch buffers) back to the
    /// driver, which frees them on its own thread, where they were allocated, and reuses
    /// the buffers: freeing them where they were used would make every allocation of the
    /// driver take the allocator's slow path. A driver may simply drop them.
    fn recycle(&self, spent: DeliveryBatch);
    /// Commits these offsets synchronously, leaves the group and stops the driver.
    /// Returns once the driver has stopped.
    fn close(&self, offsets: Vec<(Tp, Epoch, i64)>);
}
