//! `KAFKA_CONSUMER_AUTO_OFFSET_RESET=latest`, for the source topics only.
//!
//! librdkafka's `auto.offset.reset` applies to every topic a consumer subscribes to, and
//! courier's consumer reads its retry topics in the same group. A retry topic must always be
//! read from its earliest offset: a member that published a retry and stopped before the
//! group committed anything on that retry topic would otherwise come back at its end and
//! skip the retry (whose source offset was already committed), losing it. So librdkafka is
//! always given `earliest`, and `latest` is applied here instead, before the consumer joins:
//! every source partition the group has no committed offset for gets its current end offset
//! committed for the group. Records produced before the group first starts are skipped;
//! everything after is processed, however long the first join or a later rebalance takes
//! (librdkafka's own `latest` would reset again to the end of the moment each time a
//! partition without a commit is assigned).
//!
//! A broker accepts such a commit (no generation, no member) only while the group has no
//! active member. When other members already run the group, its partitions have committed
//! offsets or a member is reading them from the end already: this is logged and start-up
//! goes on. Partitions added to a topic later start from their earliest offset, which is
//! where a new partition's records begin anyway.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::{Offset, TopicPartitionList};

use crate::config::Config;
use crate::transport::settings::{client_config, ClientRole};

/// How long each broker request may take.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// What [`start_at_end`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartedAtEnd {
    /// Source partitions that had no committed offset, with the end offset committed now.
    pub committed: Vec<(String, i32, i64)>,
    /// Set when the commit was refused because the group has active members.
    pub group_active: bool,
}

/// Why the group's offsets could not be read or set.
#[derive(Debug, thiserror::Error)]
#[error("KAFKA_CONSUMER_AUTO_OFFSET_RESET=latest: {what}: {source}")]
pub struct OffsetResetError {
    what: &'static str,
    #[source]
    source: KafkaError,
}

fn failed(what: &'static str) -> impl FnOnce(KafkaError) -> OffsetResetError {
    move |source| OffsetResetError { what, source }
}

/// Commits, for the group of `config`, the end offset of every source partition it has no
/// committed offset for (see the module documentation). Blocking: call it off the async
/// runtime, before the consumer subscribes.
///
/// # Errors
/// When the client cannot be created or the broker does not answer the metadata, offset or
/// watermark requests (start-up should stop rather than read from the beginning).
pub fn start_at_end(config: &Config) -> Result<StartedAtEnd, OffsetResetError> {
    let consumer: BaseConsumer = client_config(config, ClientRole::Consumer)
        .create()
        .map_err(failed("cannot create a client"))?;
    let mut all = TopicPartitionList::new();
    for topic in &config.consumer.topics {
        let metadata = consumer
            .fetch_metadata(Some(topic), REQUEST_TIMEOUT)
            .map_err(failed("cannot read the source topics' metadata"))?;
        for t in metadata.topics() {
            if t.error().is_some() || t.partitions().is_empty() {
                tracing::warn!(topic = t.name(), "A source topic has no partitions yet; its partitions start from their earliest offset.");
                continue;
            }
            for p in t.partitions() {
                all.add_partition(t.name(), p.id());
            }
        }
    }
    if all.count() == 0 {
        return Ok(StartedAtEnd::default());
    }
    let committed = consumer
        .committed_offsets(all, REQUEST_TIMEOUT)
        .map_err(failed("cannot read the group's committed offsets"))?;
    let mut at_end = TopicPartitionList::new();
    let mut out = StartedAtEnd::default();
    for e in committed.elements() {
        if matches!(e.offset(), Offset::Offset(_)) {
            continue;
        }
        let (_, high) = consumer
            .fetch_watermarks(e.topic(), e.partition(), REQUEST_TIMEOUT)
            .map_err(failed("cannot read the end offsets of the source topics"))?;
        // An add to a list built from the same partitions cannot fail.
        let _ = at_end.add_partition_offset(e.topic(), e.partition(), Offset::Offset(high));
        out.committed
            .push((e.topic().to_owned(), e.partition(), high));
    }
    if out.committed.is_empty() {
        return Ok(out);
    }
    match consumer.commit(&at_end, CommitMode::Sync) {
        Ok(()) => {
            for (topic, partition, offset) in &out.committed {
                tracing::info!(topic, partition, offset, "A source partition without a committed offset starts at its end (KAFKA_CONSUMER_AUTO_OFFSET_RESET=latest).");
            }
            Ok(out)
        }
        Err(e) if group_is_active(&e) => {
            tracing::warn!(error = %e, "KAFKA_CONSUMER_AUTO_OFFSET_RESET=latest: the group has active members, so the end offsets were not committed; partitions without a committed offset start from their earliest offset.");
            out.committed.clear();
            out.group_active = true;
            Ok(out)
        }
        Err(e) => Err(failed("cannot commit the end offsets for the group")(e)),
    }
}

/// Whether a refused commit means that the group has members (which own its offsets).
fn group_is_active(e: &KafkaError) -> bool {
    matches!(
        e.rdkafka_error_code(),
        Some(
            RDKafkaErrorCode::UnknownMemberId
                | RDKafkaErrorCode::IllegalGeneration
                | RDKafkaErrorCode::RebalanceInProgress
                | RDKafkaErrorCode::StaleMemberEpoch
        )
    )
}
