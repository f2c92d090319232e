//! Messages that cannot move on. A message whose next hop (retry topic or DLQ) cannot be
//! published for a reason that will not heal by itself (the topic does not exist, no
//! authorization, too large even as a pointer) keeps its partition's commit point, so
//! nothing is lost; it must not do so silently (DESIGN.md, guarantee 9). The worker reports
//! it here; observability turns it into `/readyz` 503 with the reason and the
//! `courier_held_messages` gauge. The worker keeps trying, and releases it once the publish
//! succeeds (for example after the topic is created).

/// Where held messages are reported.
#[cfg_attr(test, mockall::automock)]
pub trait Holds: Send + Sync + 'static {
    /// `key` (`topic/partition@offset`) holds its partition because of `reason`.
    fn hold(&self, key: &str, reason: &str);
    /// `key` moved on (or was given up at shutdown).
    fn release(&self, key: &str);
}
