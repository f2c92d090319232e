//! The driver's librdkafka callbacks: rebalances (incremental with `cooperative-sticky`,
//! eager otherwise), the revoke handshake with the pipeline, commit results and statistics.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, RebalanceProtocol};
use rdkafka::error::{KafkaError, KafkaResult};
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaRespErr;
use rdkafka::{ClientContext, TopicPartitionList};
use tokio::sync::mpsc;

use super::state::{names, offsets_of, tpl_of, tps_of, Assigned, Shared};
use crate::observability::{Metrics, Readiness};
use crate::service::source::{DriverEvent, Epoch, Tp};
use crate::transport::context::ErrorLimiter;

pub(super) struct DriverContext {
    pub(super) shared: Arc<Shared>,
    pub(super) events: mpsc::Sender<DriverEvent>,
    pub(super) metrics: Metrics,
    pub(super) readiness: Arc<Readiness>,
    pub(super) revoke_wait: Duration,
    /// Whether the configured strategy is `cooperative-sticky`.
    pub(super) cooperative: bool,
    pub(super) errors: ErrorLimiter,
}

impl ClientContext for DriverContext {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.report(&error, reason);
    }

    fn stats(&self, statistics: Statistics) {
        let assigned = self.shared.assigned.lock();
        for (topic, t) in &statistics.topics {
            for (partition, p) in &t.partitions {
                if *partition < 0 || !assigned.contains_key(&Tp::new(topic.as_str(), *partition)) {
                    continue;
                }
                if p.consumer_lag >= 0 {
                    self.metrics
                        .consumer_lag
                        .with_label_values(&[topic.as_str(), &partition.to_string()])
                        .set(p.consumer_lag);
                }
            }
        }
    }
}

impl DriverContext {
    /// New partitions: assign them, resume them (no pause of an earlier assignment may
    /// survive), give each a new generation and tell the pipeline.
    fn on_assign(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
        cooperative: bool,
    ) {
        let assigned = if cooperative {
            consumer.incremental_assign(tpl)
        } else {
            consumer.assign(tpl)
        };
        if let Err(e) = assigned {
            tracing::error!(error = %e, partitions = ?names(&tps_of(tpl)), "Taking an assignment failed; not ready until the next one.");
            self.readiness.set_group_joined(false);
            return;
        }
        if !cooperative {
            self.shared.assigned.lock().clear();
        }
        self.register_assigned(consumer, tpl);
    }

    /// Partitions librdkafka now fetches for us: resumed (no pause of an earlier assignment
    /// may survive), each with a new generation, and announced to the pipeline.
    fn register_assigned(&self, consumer: &BaseConsumer<Self>, tpl: &TopicPartitionList) {
        if tpl.count() > 0 {
            if let Err(e) = consumer.resume(tpl) {
                tracing::warn!(error = %e, "Resuming newly assigned partitions failed.");
            }
        }
        let list: Vec<(Tp, Epoch)> = {
            let mut assigned = self.shared.assigned.lock();
            let mut commands = self.shared.commands.lock();
            tps_of(tpl)
                .into_iter()
                .map(|tp| {
                    let e = self.shared.new_epoch();
                    commands.forget(&tp);
                    assigned.insert(
                        tp.clone(),
                        Assigned {
                            generation: e,
                            fetch_epoch: e,
                        },
                    );
                    (tp, e)
                })
                .collect()
        };
        self.readiness.set_group_joined(true);
        self.count_partitions("assigned", list.len());
        if !list.is_empty() {
            let _ = self.events.blocking_send(DriverEvent::Assigned(list));
        }
    }

    /// Partitions leaving: let the pipeline drain them (bounded), commit what it finished
    /// unless the assignment was lost, forget them, and let them go.
    fn on_revoke(
        &self,
        consumer: &BaseConsumer<Self>,
        tpl: &TopicPartitionList,
        cooperative: bool,
    ) {
        let partitions = tps_of(tpl);
        let lost = consumer.assignment_lost();
        if lost {
            // The group moved on without us (e.g. after a broker outage): not consuming
            // until the next assignment, and nothing of these may be committed.
            self.readiness.set_group_joined(false);
        }
        if !self.shared.closing.load(Ordering::SeqCst) && !partitions.is_empty() {
            self.handshake(consumer, &partitions, lost);
        }
        self.forget(&partitions);
        self.count_partitions(if lost { "lost" } else { "revoked" }, partitions.len());
        let released = if cooperative {
            consumer.incremental_unassign(tpl)
        } else {
            consumer.unassign()
        };
        if let Err(e) = released {
            tracing::warn!(error = %e, "Releasing revoked partitions failed.");
        }
    }

    fn handshake(&self, consumer: &BaseConsumer<Self>, partitions: &[Tp], lost: bool) {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let sent = self.events.blocking_send(DriverEvent::Revoked {
            partitions: partitions.to_vec(),
            lost,
            reply: tx,
        });
        if sent.is_err() {
            return;
        }
        match rx.recv_timeout(self.revoke_wait) {
            Ok(offsets) if !offsets.is_empty() && !lost => {
                match consumer.commit(&tpl_of(&offsets), CommitMode::Sync) {
                    Ok(()) => tracing::debug!(offsets = ?offsets, "Committed on revoke."),
                    Err(e) => {
                        tracing::warn!(error = %e, "The commit on revoke failed; the next owner starts from the last committed offsets.")
                    }
                }
            }
            Ok(_) => {}
            Err(_) => {
                tracing::warn!(partitions = ?names(partitions), "The pipeline did not answer the revoke in time; nothing more is committed for these partitions.")
            }
        }
    }

    fn count_partitions(&self, kind: &str, n: usize) {
        self.metrics
            .rebalance_partitions
            .with_label_values(&[kind])
            .inc_by(n as u64);
        let owned = self.shared.assigned.lock().len();
        self.metrics.assigned_partitions.set(owned as i64);
    }

    pub(super) fn forget(&self, partitions: &[Tp]) {
        let mut assigned = self.shared.assigned.lock();
        let mut commands = self.shared.commands.lock();
        for tp in partitions {
            assigned.remove(tp);
            commands.forget(tp);
            let _ = self
                .metrics
                .consumer_lag
                .remove_label_values(&[&tp.topic, &tp.partition.to_string()]);
        }
    }

    /// A failed rebalance: librdkafka expects the whole assignment to be dropped.
    fn on_rebalance_error(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        cooperative: bool,
    ) {
        let code: rdkafka::error::RDKafkaErrorCode = err.into();
        tracing::warn!(error = %code, "Rebalance error; not ready until the next assignment.");
        self.readiness.set_group_joined(false);
        let current: Vec<Tp> = self.shared.assigned.lock().keys().cloned().collect();
        if !self.shared.closing.load(Ordering::SeqCst) && !current.is_empty() {
            self.handshake(consumer, &current, true);
        }
        self.forget(&current);
        self.count_partitions("lost", current.len());
        let released = if cooperative {
            consumer
                .assignment()
                .and_then(|a| consumer.incremental_unassign(&a))
        } else {
            consumer.unassign()
        };
        if let Err(e) = released {
            tracing::warn!(error = %e, "Dropping the assignment after a rebalance error failed.");
        }
    }
}

impl DriverContext {
    /// Checks that the partitions librdkafka fetches are exactly those the pipeline owns,
    /// and repairs a difference (it would otherwise strand a partition: fetched messages of a
    /// partition the pipeline does not know are dropped, and a partition the pipeline thinks
    /// it owns but librdkafka does not fetch never moves). Between polls the two always agree
    /// unless a callback was missed, so a difference is logged as an error.
    pub(super) fn reconcile(&self, consumer: &BaseConsumer<Self>) {
        let Ok(tpl) = consumer.assignment() else {
            return;
        };
        let fetched: std::collections::HashSet<Tp> = tps_of(&tpl).into_iter().collect();
        let (unknown, gone): (Vec<Tp>, Vec<Tp>) = {
            let assigned = self.shared.assigned.lock();
            (
                fetched
                    .iter()
                    .filter(|tp| !assigned.contains_key(*tp))
                    .cloned()
                    .collect(),
                assigned
                    .keys()
                    .filter(|tp| !fetched.contains(*tp))
                    .cloned()
                    .collect(),
            )
        };
        if !gone.is_empty() {
            tracing::error!(partitions = ?names(&gone), "The pipeline owned partitions librdkafka no longer fetches; dropping them uncommitted (their next owner reads them).");
            if !self.shared.closing.load(Ordering::SeqCst) {
                self.handshake(consumer, &gone, true);
            }
            self.forget(&gone);
            self.count_partitions("lost", gone.len());
        }
        if !unknown.is_empty() {
            tracing::error!(partitions = ?names(&unknown), "librdkafka fetches partitions the pipeline did not know; taking them as newly assigned.");
            let mut tpl = TopicPartitionList::new();
            for tp in &unknown {
                tpl.add_partition(&tp.topic, tp.partition);
            }
            self.register_assigned(consumer, &tpl);
        }
    }
}

impl ConsumerContext for DriverContext {
    fn rebalance(
        &self,
        consumer: &BaseConsumer<Self>,
        err: RDKafkaRespErr,
        tpl: &mut TopicPartitionList,
    ) {
        // The group's protocol follows the configured strategy (every member must support
        // it); librdkafka's answer is used when it has one, the configuration otherwise, so a
        // momentary "none" never turns an incremental assignment into a full one.
        let cooperative = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => true,
            RebalanceProtocol::Eager => false,
            RebalanceProtocol::None => self.cooperative,
        };
        match err {
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS => {
                self.on_assign(consumer, tpl, cooperative)
            }
            RDKafkaRespErr::RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS => {
                self.on_revoke(consumer, tpl, cooperative)
            }
            other => self.on_rebalance_error(consumer, other, cooperative),
        }
    }

    fn commit_callback(&self, result: KafkaResult<()>, offsets: &TopicPartitionList) {
        if let Err(KafkaError::ConsumerCommit(rdkafka::error::RDKafkaErrorCode::NoOffset)) = result
        {
            return;
        }
        // librdkafka may report partition errors (a rebalance in progress, a generation that
        // just changed) with a successful request: look at every partition.
        let failed = offsets.elements().iter().any(|e| e.error().is_err());
        match (&result, failed) {
            (Ok(()), false) => {
                tracing::debug!(offsets = ?offsets_of(offsets), "Committed offsets.");
                self.metrics.commits.with_label_values(&["ok"]).inc()
            }
            _ => {
                self.metrics.commits.with_label_values(&["error"]).inc();
                let error = match &result {
                    Err(e) => e.to_string(),
                    Ok(()) => offsets
                        .elements()
                        .iter()
                        .find_map(|e| e.error().err())
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                };
                tracing::warn!(error, offsets = ?offsets_of(offsets), "An offset commit failed (usually during a rebalance); it is tried again while this member owns the partitions.");
                self.shared.commit_failed(offsets, result.is_err());
            }
        }
    }
}
