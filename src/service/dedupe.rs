//! The dedupe store: at most one successful processing per `message-id` within a window.
//!
//! A worker claims a message's id before processing it, records it as done on success and
//! releases it on failure, so that a retry can claim it again. The built-in
//! [`MemoryDedupe`] keeps the ids in a [`DashMap`]; done entries live for a TTL and at most
//! `capacity` of them are kept (oldest evicted first), which bounds memory as DESIGN.md's
//! "Guarantees" require.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use dashmap::mapref::entry::Entry;
use dashmap::DashMap;
use parking_lot::Mutex;

use crate::model::InlineBytes;

/// Result of claiming a message id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Claim {
    /// The caller now owns the id: it processes the message, then calls
    /// [`DedupeStore::complete`] on success or [`DedupeStore::release`] on failure.
    Acquired,
    /// The id was processed successfully within the window: the message is skipped.
    Duplicate,
    /// Another worker holds the claim right now: the message must not be processed in
    /// parallel; the caller decides whether to wait or to try again later.
    InProgress,
}

/// The keyed hasher of the map: foldhash, seeded at random per store (message ids come
/// from producers, so the seed keeps collisions out of their hands), several times faster
/// than the default SipHash on short ids.
type IdHasher = foldhash::fast::RandomState;

/// The longest id held inline in the map (UUIDs and most other ids): no allocation per id,
/// and a look-up compares the key where it sits instead of following a pointer to it.
const INLINE_ID: usize = 46;

/// A message id as a key of the map and of the FIFO, compared and hashed as its bytes (so
/// the map is searched by `id.as_bytes()`).
type IdKey = InlineBytes<INLINE_ID>;

/// A store of message ids: claimed atomically before processing, recorded as done on success,
/// released on failure so a retry can run.
///
/// It is a trait so that the worker pool can be tested with a mock and so that a shared
/// store (e.g. one backed by a database) can replace the in-memory one later.
#[cfg_attr(test, mockall::automock)]
pub trait DedupeStore: Send + Sync + 'static {
    /// Atomically claims `id`. `replayed_at_ms` is the `courier-replayed-at-ms` header of the message, if any.
    fn claim(&self, id: &str, replayed_at_ms: Option<i64>) -> Claim;
    /// Records `id` (which this caller claimed) as processed successfully at wall-clock `now_ms`.
    fn complete(&self, id: &str, now_ms: i64);
    /// Releases a claim after a failure (the id is forgotten, so a retry can claim it).
    fn release(&self, id: &str);
    /// Entries held (done + in progress), for the `courier_dedupe_entries` gauge.
    fn len(&self) -> usize;
    /// Whether no entry is held; provided so that callers need not compare `len()` with 0.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The most entries the map is sized for up front.
const MAX_PRESIZED: usize = 1 << 20;

/// The FIFO is compacted once it holds more than twice the live done entries plus this many
/// items, so stale items cost amortised O(1) and the FIFO stays bounded by the capacity.
const COMPACT_SLACK: usize = 64;

/// State of one id in the map.
#[derive(Debug, Clone, Copy)]
enum Slot {
    /// Claimed and being processed.
    InProgress,
    /// Processed successfully at wall-clock `done_ms`; `at` starts the TTL and `seq` ties the
    /// entry to its FIFO item, so that a stale item never evicts a newer completion.
    Done { done_ms: i64, at: Instant, seq: u64 },
}

impl Slot {
    /// Whether the slot counts against the capacity.
    fn is_done(&self) -> bool {
        matches!(self, Slot::Done { .. })
    }

    /// The insertion instant if this is the done entry created with sequence number `seq`.
    fn done_at(&self, seq: u64) -> Option<Instant> {
        match *self {
            Slot::Done { at, seq: s, .. } if s == seq => Some(at),
            _ => None,
        }
    }
}

/// Done entries in completion order; only touched under the mutex in [`MemoryDedupe`].
#[derive(Debug, Default)]
struct DoneQueue {
    /// `(id, seq, at)` of each completion, oldest first; items whose seq no longer matches
    /// the map are stale and are skipped. `at` is the entry's insertion instant, so the
    /// front's expiry is known without a map lookup.
    items: VecDeque<(IdKey, u64, Instant)>,
    /// The sequence number of the next completion.
    next_seq: u64,
}

/// The built-in store: DashMap, TTL, capacity bound (oldest done entry evicted first).
///
/// Memory is bounded by `capacity` done entries plus the claims in progress (which the
/// in-flight bound limits); the FIFO of done entries holds at most about twice the capacity.
/// Expired entries are dropped lazily (when their id is claimed, or when they reach the FIFO
/// front during a `complete`), so `len()` may count a few expired entries.
#[derive(Debug)]
pub struct MemoryDedupe {
    /// Every id that is in progress or done.
    entries: DashMap<IdKey, Slot, IdHasher>,
    /// Completion order for eviction. Lock order: this mutex, then a map shard, never the
    /// reverse (`claim` and `release` only take shard locks).
    queue: Mutex<DoneQueue>,
    /// Number of `Slot::Done` entries in the map; changed only while the entry's shard lock
    /// is held (or after it was removed under the queue mutex), so it never underflows.
    done_count: AtomicUsize,
    /// How long a done entry suppresses duplicates.
    ttl: Duration,
    /// Maximum number of done entries; 0 disables dedupe.
    capacity: usize,
}

impl MemoryDedupe {
    /// capacity 0 disables dedupe: claim always returns Acquired and nothing is stored.
    ///
    /// A zero `ttl` means done entries expire at once, which also lets every claim through.
    pub fn new(ttl: std::time::Duration, capacity: usize) -> Self {
        Self {
            // Sized for the capacity at once (bounded), so a filling store never rehashes.
            entries: DashMap::with_capacity_and_hasher(
                capacity.min(MAX_PRESIZED),
                IdHasher::default(),
            ),
            queue: Mutex::new(DoneQueue::default()),
            done_count: AtomicUsize::new(0),
            ttl,
            capacity,
        }
    }

    /// Whether dedupe is switched off (capacity 0).
    fn disabled(&self) -> bool {
        self.capacity == 0
    }

    /// Whether a done entry inserted at `at` is older than the TTL.
    fn expired(&self, at: Instant) -> bool {
        at.elapsed() >= self.ttl
    }

    /// Pops the FIFO front while it is expired, or while there are more done entries than
    /// the capacity (a stale front item is popped on the way; the others are left to
    /// [`MemoryDedupe::compact`]). One map operation per popped item, and no clock read:
    /// `now` is the caller's. Called with the queue mutex held.
    fn evict(&self, queue: &mut DoneQueue, now: Instant) {
        while let Some((id, seq, at)) = queue.items.front() {
            let over = self.done_count.load(Ordering::Acquire) > self.capacity;
            if !over && now.saturating_duration_since(*at) < self.ttl {
                break;
            }
            // A concurrent claim may have turned the entry into InProgress meanwhile, or a
            // later completion replaced it: the seq check keeps both.
            let removed = self
                .entries
                .remove_if(id.as_bytes(), |_, slot| slot.done_at(*seq).is_some());
            if removed.is_some() {
                self.done_count.fetch_sub(1, Ordering::AcqRel);
            }
            queue.items.pop_front();
        }
    }

    /// Drops stale FIFO items once they outnumber the live ones, so that ids completed again
    /// and again (or released after a replay) cannot grow the FIFO without bound.
    fn compact(&self, queue: &mut DoneQueue) {
        let live = self.done_count.load(Ordering::Acquire);
        if queue.items.len() <= live.saturating_mul(2).saturating_add(COMPACT_SLACK) {
            return;
        }
        queue.items.retain(|(id, seq, _)| {
            self.entries
                .get(id.as_bytes())
                .is_some_and(|slot| slot.done_at(*seq).is_some())
        });
    }
}

impl DedupeStore for MemoryDedupe {
    fn claim(&self, id: &str, replayed_at_ms: Option<i64>) -> Claim {
        if self.disabled() {
            return Claim::Acquired;
        }
        // The entry API holds the shard's write lock for the whole decision, so two threads
        // never both acquire one id.
        match self.entries.entry(IdKey::from(id.as_bytes())) {
            Entry::Vacant(vacant) => {
                vacant.insert(Slot::InProgress);
                Claim::Acquired
            }
            Entry::Occupied(mut occupied) => match *occupied.get() {
                Slot::InProgress => Claim::InProgress,
                Slot::Done { done_ms, at, .. } => {
                    let replay = replayed_at_ms.is_some_and(|replayed| replayed > done_ms);
                    if !replay && !self.expired(at) {
                        return Claim::Duplicate;
                    }
                    if replay {
                        tracing::debug!(message_id = id, "dedupe lets a replayed message through");
                    }
                    occupied.insert(Slot::InProgress);
                    self.done_count.fetch_sub(1, Ordering::AcqRel);
                    Claim::Acquired
                }
            },
        }
    }

    fn complete(&self, id: &str, now_ms: i64) {
        if self.disabled() {
            return;
        }
        // The map insert and the FIFO push happen under the queue mutex, so sequence numbers
        // and instants increase along the FIFO and every live done entry has its item.
        let mut queue = self.queue.lock();
        let seq = queue.next_seq;
        queue.next_seq += 1;
        let at = Instant::now();
        let slot = Slot::Done {
            done_ms: now_ms,
            at,
            seq,
        };
        // Usually the caller's claim is there: update it in place; otherwise insert.
        let existing = self.entries.get_mut(id.as_bytes()).map(|mut entry| {
            if !entry.is_done() {
                self.done_count.fetch_add(1, Ordering::AcqRel);
            }
            *entry = slot;
            entry.key().clone()
        });
        let key = match existing {
            Some(key) => key,
            None => match self.entries.entry(IdKey::from(id.as_bytes())) {
                Entry::Vacant(vacant) => {
                    let key = vacant.key().clone();
                    vacant.insert(slot);
                    self.done_count.fetch_add(1, Ordering::AcqRel);
                    key
                }
                Entry::Occupied(mut occupied) => {
                    if !occupied.get().is_done() {
                        self.done_count.fetch_add(1, Ordering::AcqRel);
                    }
                    occupied.insert(slot);
                    occupied.key().clone()
                }
            },
        };
        queue.items.push_back((key, seq, at));
        self.evict(&mut queue, at);
        self.compact(&mut queue);
    }

    fn release(&self, id: &str) {
        // A done entry stays: only a failed claim is forgotten.
        self.entries
            .remove_if(id.as_bytes(), |_, slot| matches!(slot, Slot::InProgress));
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use proptest::prelude::*;

    use super::*;

    const HOUR: Duration = Duration::from_secs(3600);

    /// Done entries actually in the map (not the counter), to check the counter too.
    fn done_entries(store: &MemoryDedupe) -> usize {
        store
            .entries
            .iter()
            .filter(|entry| entry.value().is_done())
            .count()
    }

    #[test]
    fn acquire_then_in_progress_then_duplicate() {
        let store = MemoryDedupe::new(HOUR, 10);
        assert!(store.is_empty());
        assert_eq!(store.claim("a", None), Claim::Acquired);
        assert_eq!(store.claim("a", None), Claim::InProgress);
        assert_eq!(store.len(), 1);
        store.complete("a", 1_000);
        assert_eq!(store.claim("a", None), Claim::Duplicate);
        assert_eq!(store.claim("b", None), Claim::Acquired);
        assert_eq!(store.len(), 2);
        assert_eq!(done_entries(&store), 1);
    }

    #[test]
    fn release_lets_the_retry_claim() {
        let store = MemoryDedupe::new(HOUR, 10);
        assert_eq!(store.claim("a", None), Claim::Acquired);
        store.release("a");
        assert!(store.is_empty());
        assert_eq!(store.claim("a", None), Claim::Acquired);
        store.complete("a", 1_000);
        // Releasing a done entry does nothing.
        store.release("a");
        assert_eq!(store.claim("a", None), Claim::Duplicate);
        // Releasing an unknown id does nothing either.
        store.release("unknown");
        assert_eq!(store.len(), 1);
    }

    #[test]
    fn expired_entries_are_claimable_and_evicted_lazily() {
        let store = MemoryDedupe::new(Duration::from_millis(100), 10);
        assert_eq!(store.claim("a", None), Claim::Acquired);
        store.complete("a", 1_000);
        store.complete("b", 1_000);
        assert_eq!(store.claim("a", None), Claim::Duplicate);
        std::thread::sleep(Duration::from_millis(150));
        // On claim of that id.
        assert_eq!(store.claim("a", None), Claim::Acquired);
        assert_eq!(store.len(), 2);
        // From the FIFO front during complete: "b" goes, "c" stays, "a" is in progress.
        store.complete("c", 2_000);
        assert_eq!(store.len(), 2);
        assert_eq!(store.claim("b", None), Claim::Acquired);
        assert_eq!(store.claim("c", None), Claim::Duplicate);
        assert_eq!(store.claim("a", None), Claim::InProgress);
        assert_eq!(
            store.done_count.load(Ordering::Acquire),
            done_entries(&store)
        );
    }

    #[test]
    fn capacity_evicts_the_oldest_done_entry_first() {
        let store = MemoryDedupe::new(HOUR, 2);
        store.complete("a", 1);
        store.complete("b", 2);
        store.complete("c", 3);
        assert_eq!(done_entries(&store), 2);
        assert_eq!(store.claim("b", None), Claim::Duplicate);
        assert_eq!(store.claim("c", None), Claim::Duplicate);
        assert_eq!(store.claim("a", None), Claim::Acquired);
        // In-progress entries are not subject to the capacity.
        assert_eq!(store.claim("x", None), Claim::Acquired);
        assert_eq!(store.claim("y", None), Claim::Acquired);
        assert_eq!(store.len(), 5);
        store.complete("d", 4);
        assert_eq!(store.claim("b", None), Claim::Acquired);
        assert_eq!(store.claim("c", None), Claim::Duplicate);
        assert_eq!(store.claim("x", None), Claim::InProgress);
    }

    #[test]
    fn a_re_completed_id_counts_as_new() {
        let store = MemoryDedupe::new(HOUR, 2);
        store.complete("a", 1);
        store.complete("b", 2);
        // "a" is replayed and completed again: it becomes the newest.
        assert_eq!(store.claim("a", Some(5)), Claim::Acquired);
        store.complete("a", 10);
        store.complete("c", 11);
        // The stale FIFO item of the first "a" must not evict the second.
        assert_eq!(store.claim("a", None), Claim::Duplicate);
        assert_eq!(store.claim("c", None), Claim::Duplicate);
        assert_eq!(store.claim("b", None), Claim::Acquired);
    }

    #[test]
    fn a_stale_item_of_a_released_id_does_not_evict_its_new_entry() {
        let store = MemoryDedupe::new(HOUR, 2);
        store.complete("a", 1);
        assert_eq!(store.claim("a", Some(5)), Claim::Acquired);
        store.release("a");
        store.complete("b", 6);
        assert_eq!(store.claim("a", None), Claim::Acquired);
        store.complete("a", 7);
        // FIFO: a(stale), b, a. Over capacity: "b" is the oldest live entry.
        store.complete("c", 8);
        assert_eq!(store.claim("a", None), Claim::Duplicate);
        assert_eq!(store.claim("c", None), Claim::Duplicate);
        assert_eq!(store.claim("b", None), Claim::Acquired);
    }

    #[test]
    fn a_replay_is_let_through_once() {
        let store = MemoryDedupe::new(HOUR, 10);
        assert_eq!(store.claim("a", None), Claim::Acquired);
        store.complete("a", 1_000);
        assert_eq!(store.claim("a", None), Claim::Duplicate);
        // Replayed before (or at) the successful processing: a duplicate.
        assert_eq!(store.claim("a", Some(900)), Claim::Duplicate);
        assert_eq!(store.claim("a", Some(1_000)), Claim::Duplicate);
        assert_eq!(store.claim("a", Some(1_500)), Claim::Acquired);
        assert_eq!(store.claim("a", Some(1_500)), Claim::InProgress);
        // A failed replay is released, so its retry runs.
        store.release("a");
        assert_eq!(store.claim("a", Some(1_500)), Claim::Acquired);
        store.complete("a", 2_000);
        assert_eq!(store.claim("a", Some(1_500)), Claim::Duplicate);
        assert_eq!(store.claim("a", None), Claim::Duplicate);
        // A later replay goes through again.
        assert_eq!(store.claim("a", Some(2_500)), Claim::Acquired);
    }

    #[test]
    fn long_ids_and_short_ids_behave_alike() {
        let long = |n: usize| format!("{}-{n}", "i".repeat(INLINE_ID));
        let store = MemoryDedupe::new(HOUR, 2);
        for id in [long(1), "short".to_owned(), "x".repeat(INLINE_ID)] {
            assert_eq!(store.claim(&id, None), Claim::Acquired);
            assert_eq!(store.claim(&id, None), Claim::InProgress);
            store.release(&id);
            assert_eq!(store.claim(&id, None), Claim::Acquired);
            store.complete(&id, 1);
            assert_eq!(store.claim(&id, None), Claim::Duplicate);
        }
        // Capacity 2: the oldest (the long id) was evicted by the third completion.
        assert_eq!(store.claim(&long(1), None), Claim::Acquired);
        assert_eq!(store.claim(&long(2), None), Claim::Acquired);
        assert_eq!(store.claim("short", None), Claim::Duplicate);
        assert_eq!(done_entries(&store), 2);
    }

    #[test]
    fn capacity_zero_disables_dedupe() {
        let store = MemoryDedupe::new(HOUR, 0);
        assert_eq!(store.claim("a", None), Claim::Acquired);
        assert_eq!(store.claim("a", None), Claim::Acquired);
        store.complete("a", 1);
        assert_eq!(store.claim("a", None), Claim::Acquired);
        store.release("a");
        assert_eq!(store.len(), 0);
        assert!(store.is_empty());
    }

    #[test]
    fn the_fifo_stays_bounded_when_one_id_is_completed_again_and_again() {
        let store = MemoryDedupe::new(HOUR, 4);
        for now in 1..10_000 {
            assert_eq!(store.claim("a", Some(now)), Claim::Acquired);
            store.complete("a", now);
        }
        assert!(store.queue.lock().items.len() <= 2 * 4 + COMPACT_SLACK);
        assert_eq!(store.len(), 1);
        assert_eq!(store.claim("a", None), Claim::Duplicate);
    }

    #[test]
    fn concurrent_claims_acquire_each_id_exactly_once() {
        const IDS: usize = 1_000;
        let store = MemoryDedupe::new(HOUR, 10_000);
        let acquired: Vec<AtomicUsize> = (0..IDS).map(|_| AtomicUsize::new(0)).collect();
        std::thread::scope(|scope| {
            for thread in 0..8 {
                let (store, acquired) = (&store, &acquired);
                scope.spawn(move || {
                    // Each thread starts elsewhere, so threads race on the same ids.
                    for step in 0..IDS {
                        let n = (step + thread * 125) % IDS;
                        if store.claim(&n.to_string(), None) == Claim::Acquired {
                            acquired[n].fetch_add(1, Ordering::Relaxed);
                            if n.is_multiple_of(2) {
                                store.complete(&n.to_string(), 1);
                            }
                        }
                    }
                });
            }
        });
        assert!(acquired
            .iter()
            .all(|count| count.load(Ordering::Relaxed) == 1));
        assert_eq!(store.len(), IDS);
    }

    #[test]
    fn concurrent_completes_keep_the_capacity() {
        let store = MemoryDedupe::new(HOUR, 10);
        std::thread::scope(|scope| {
            for thread in 0..8_i64 {
                let store = &store;
                scope.spawn(move || {
                    for step in 0..2_000_i64 {
                        let id = ((step * 7 + thread) % 100).to_string();
                        match store.claim(&id, Some(step)) {
                            Claim::Acquired if step % 3 == 0 => store.release(&id),
                            Claim::Acquired => store.complete(&id, step),
                            Claim::Duplicate | Claim::InProgress => {}
                        }
                    }
                });
            }
        });
        assert!(done_entries(&store) <= 10);
        assert_eq!(
            store.done_count.load(Ordering::Acquire),
            done_entries(&store)
        );
        // No claim is left in progress: each one was completed or released.
        assert_eq!(store.len(), done_entries(&store));
    }

    /// One step of the property test.
    #[derive(Debug, Clone)]
    enum Op {
        Claim(u8, Option<i64>),
        Complete(u8),
        Release(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0_u8..12, proptest::option::of(0_i64..80)).prop_map(|(id, r)| Op::Claim(id, r)),
            (0_u8..12).prop_map(Op::Complete),
            (0_u8..12).prop_map(Op::Release),
        ]
    }

    /// The reference: ids mapped to `None` (in progress) or `Some(done_ms)`, and the done ids
    /// oldest first. The TTL is an hour, so nothing expires.
    struct Model {
        slots: HashMap<u8, Option<i64>>,
        order: Vec<u8>,
        capacity: usize,
    }

    impl Model {
        fn claim(&mut self, id: u8, replayed: Option<i64>) -> Claim {
            if self.capacity == 0 {
                return Claim::Acquired;
            }
            match self.slots.get(&id).copied() {
                None => {
                    self.slots.insert(id, None);
                    Claim::Acquired
                }
                Some(None) => Claim::InProgress,
                Some(Some(done)) if replayed.is_some_and(|r| r > done) => {
                    self.order.retain(|&other| other != id);
                    self.slots.insert(id, None);
                    Claim::Acquired
                }
                Some(Some(_)) => Claim::Duplicate,
            }
        }

        fn complete(&mut self, id: u8, now: i64) {
            if self.capacity == 0 {
                return;
            }
            self.order.retain(|&other| other != id);
            self.order.push(id);
            self.slots.insert(id, Some(now));
            while self.order.len() > self.capacity {
                let oldest = self.order.remove(0);
                self.slots.remove(&oldest);
            }
        }

        fn release(&mut self, id: u8) {
            if self.slots.get(&id) == Some(&None) {
                self.slots.remove(&id);
            }
        }
    }

    proptest! {
        #[test]
        fn done_entries_never_exceed_the_capacity(
            capacity in 0_usize..6,
            ops in proptest::collection::vec(op(), 0..80),
        ) {
            let store = MemoryDedupe::new(HOUR, capacity);
            let mut model = Model { slots: HashMap::new(), order: Vec::new(), capacity };
            for (now, op) in (0_i64..).zip(ops) {
                match op {
                    Op::Claim(id, r) => {
                        prop_assert_eq!(store.claim(&id.to_string(), r), model.claim(id, r));
                    }
                    Op::Complete(id) => {
                        store.complete(&id.to_string(), now);
                        model.complete(id, now);
                    }
                    Op::Release(id) => {
                        store.release(&id.to_string());
                        model.release(id);
                    }
                }
                prop_assert!(done_entries(&store) <= capacity);
                prop_assert_eq!(done_entries(&store), model.order.len());
                prop_assert_eq!(store.done_count.load(Ordering::Acquire), model.order.len());
                prop_assert_eq!(store.len(), model.slots.len());
            }
        }
    }
}
