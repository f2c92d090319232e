//! Readiness: what `/readyz` answers and `courier_ready` shows. The broker answers the
//! health checker's probes, the consumer holds a group membership, and no message holds its
//! partition because it cannot be forwarded (DESIGN.md, "Health" and guarantee 9). Written
//! by transport (probes, rebalances) and service (held messages), read by the ops server.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;

use super::Metrics;

/// What readiness depends on, shared between the health checker, the consumer and the ops
/// server.
#[derive(Debug)]
pub struct Readiness {
    broker_up: AtomicBool,
    needs_group: bool,
    group_joined: AtomicBool,
    consecutive_failures: AtomicU64,
    last_error: Mutex<String>,
    /// Messages holding their partition, by `topic/partition@offset`, with the reason.
    held: Mutex<std::collections::BTreeMap<String, String>>,
    metrics: Metrics,
    /// Serializes updates of `courier_ready`, so the last writer saw the latest state.
    ready_gauge: Mutex<()>,
}

impl Readiness {
    /// A readiness state; `needs_group` for the consumer, which is ready only once it has
    /// joined its group.
    pub fn new(metrics: Metrics, needs_group: bool) -> Arc<Self> {
        Arc::new(Readiness {
            broker_up: AtomicBool::new(false),
            needs_group,
            group_joined: AtomicBool::new(false),
            consecutive_failures: AtomicU64::new(0),
            last_error: Mutex::new("the broker has not been probed yet".into()),
            held: Mutex::new(std::collections::BTreeMap::new()),
            metrics,
            ready_gauge: Mutex::new(()),
        })
    }

    /// Records a successful broker probe.
    pub fn broker_ok(&self) {
        self.broker_up.store(true, Ordering::SeqCst);
        self.consecutive_failures.store(0, Ordering::SeqCst);
        self.metrics.broker_up.set(1);
        self.update_ready_gauge();
    }

    /// Records a failed broker probe; returns the consecutive failure count.
    pub fn broker_failed(&self, reason: &str) -> u64 {
        self.broker_up.store(false, Ordering::SeqCst);
        *self.last_error.lock() = reason.to_owned();
        self.metrics.broker_up.set(0);
        let failures = self.consecutive_failures.fetch_add(1, Ordering::SeqCst) + 1;
        self.update_ready_gauge();
        failures
    }

    /// Whether the last probe reached the broker.
    pub fn is_broker_up(&self) -> bool {
        self.broker_up.load(Ordering::SeqCst)
    }

    /// Sets whether the consumer currently holds a group membership.
    pub fn set_group_joined(&self, joined: bool) {
        self.group_joined.store(joined, Ordering::SeqCst);
        self.update_ready_gauge();
    }

    /// Sets `courier_ready` to what `/readyz` answers now (called after every state change).
    fn update_ready_gauge(&self) {
        let _serialized = self.ready_gauge.lock();
        self.metrics.ready.set(i64::from(self.check().is_ok()));
    }

    /// `Ok` when ready, else the reason.
    pub fn check(&self) -> Result<(), String> {
        if !self.is_broker_up() {
            let failures = self.consecutive_failures.load(Ordering::SeqCst);
            return Err(format!(
                "broker unreachable ({failures} consecutive failed probes): {}",
                self.last_error.lock()
            ));
        }
        if self.needs_group && !self.group_joined.load(Ordering::SeqCst) {
            return Err("the consumer has not joined its group yet".into());
        }
        let held = self.held.lock();
        if let Some((key, reason)) = held.iter().next() {
            return Err(format!(
                "{} message(s) cannot be forwarded and hold their partition; {key}: {reason}",
                held.len()
            ));
        }
        Ok(())
    }
}

impl Readiness {
    /// `key` (`topic/partition@offset`) holds its partition because of `reason`: not ready,
    /// with the reason, until it is released; counted by `courier_held_messages`.
    pub fn hold(&self, key: &str, reason: &str) {
        {
            let mut held = self.held.lock();
            held.insert(key.to_owned(), reason.to_owned());
            self.metrics.held_messages.set(held.len() as i64);
        }
        // After the lock is released: `check()` takes it too.
        self.update_ready_gauge();
    }

    /// `key` moved on (or was given up at shutdown).
    pub fn release(&self, key: &str) {
        {
            let mut held = self.held.lock();
            held.remove(key);
            self.metrics.held_messages.set(held.len() as i64);
        }
        self.update_ready_gauge();
    }
}
