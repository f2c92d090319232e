//! Revokes and reassignments: queued work never starts after a revoke, late answers never
//! touch a new assignment, and every request names its generation.

use super::*;

/// One lane (one key) holds a blocked message of partition A, then a queued message of B.
/// B is revoked: its queued message is never started, the revoke does not wait for A's, and
/// its commit point stays at the queued message for the next owner.
#[tokio::test]
async fn work_queued_for_a_revoked_partition_is_never_started() {
    let (gate, script) = gated();
    let mut c = cfg();
    c.workers = 1;
    let h = Harness::scripted(c, &script);
    let (a, b) = (Tp::new("ev-a", 0), Tp::new("ev-b", 0));
    h.assign(&a, 1).await;
    h.assign(&b, 2).await;
    h.deliver(vec![
        (delivery("ev-b", 0, "k", b"{}", vec![]), 2),
        (delivery("ev-a", 0, "k", b"block", vec![]), 1),
        (delivery("ev-b", 1, "k", b"{}", vec![]), 2),
    ])
    .await;
    script.until_running("A's message is running", 1).await;
    let rx = h.revoke(&b, false).await;
    assert_eq!(
        answer(&rx).await,
        vec![(b.clone(), 1)],
        "offset 0 finished; offset 1 queued, not started, left for the next owner"
    );
    gate.add_permits(1);
    script.until_running("A's message finished", 0).await;
    let (summary, calls) = h.stop().await;
    assert_eq!(
        *script.calls.lock(),
        vec![("ev-b".to_string(), 0), ("ev-a".to_string(), 0)],
        "B's queued message never reached the processor"
    );
    assert_eq!(summary[&b].abandoned, 1);
    assert_eq!(calls.lock().closed, Some(vec![(a, 1, 1)]));
}

/// The revoke of generation 1 is still draining when the partition is assigned again as
/// generation 2. The late answer must not remove generation 2, whose messages flow and are
/// committed under generation 2; nothing about generation 1 reaches the driver after it.
#[tokio::test]
async fn a_late_revoke_answer_never_touches_a_new_assignment() {
    let (gate, script) = gated();
    let mut c = cfg();
    c.workers = 8;
    let h = Harness::scripted(c, &script);
    // A key on another lane than "k", so generation 2 is not queued behind the blocked one.
    let mut rr = 0;
    let other = (0..)
        .map(|i| format!("k{i}"))
        .find(|k| {
            lanes::lane_of(Some(k.as_bytes()), 8, &mut rr) != lanes::lane_of(Some(b"k"), 8, &mut rr)
        })
        .expect("some key hashes elsewhere");
    let tp = Tp::new("ev", 0);
    h.assign(&tp, 1).await;
    h.deliver(vec![(delivery("ev", 0, "k", b"block", vec![]), 1)])
        .await;
    script
        .until_running("generation 1's message is running", 1)
        .await;
    let rx = h.revoke(&tp, false).await;
    h.assign(&tp, 2).await;
    let before = h.calls.lock().commits.len();
    h.deliver(vec![(delivery("ev", 0, &other, b"{}", vec![]), 2)])
        .await;
    h.until_committed("generation 2 commits", &tp, 2, 1).await;
    gate.add_permits(1);
    assert_eq!(
        answer(&rx).await,
        vec![],
        "generation 1 is gone: nothing to commit"
    );
    h.deliver(vec![(delivery("ev", 1, &other, b"{}", vec![]), 2)])
        .await;
    h.until_committed("generation 2 still flows after the late answer", &tp, 2, 2)
        .await;
    let (_, calls) = h.stop().await;
    let c = calls.lock();
    assert!(
        c.commits[before..].iter().all(|(_, g, _)| *g == 2),
        "no commit names generation 1 after its revoke: {:?}",
        c.commits
    );
    assert_eq!(c.closed, Some(vec![(tp.clone(), 2, 2)]));
}

#[tokio::test]
async fn a_lost_assignment_is_answered_at_once_with_nothing_to_commit() {
    let (gate, script) = gated();
    let h = Harness::scripted(cfg(), &script);
    let tp = Tp::new("ev", 0);
    h.assign(&tp, 1).await;
    h.deliver(vec![
        (delivery("ev", 0, "k", b"{}", vec![]), 1),
        (delivery("ev", 1, "k", b"block", vec![]), 1),
    ])
    .await;
    script.until_running("offset 1 is running", 1).await;
    let rx = h.revoke(&tp, true).await;
    assert_eq!(answer(&rx).await, vec![]);
    gate.add_permits(1);
    let (_, calls) = h.stop().await;
    assert_eq!(calls.lock().closed, Some(vec![]));
}

/// Every request names the generation it is about, so the driver can drop those about an
/// assignment that is gone: a partition assigned again starts unpaused under its new
/// generation, even if the old one was waiting for a retry.
#[tokio::test]
async fn requests_name_the_generation_they_are_about() {
    let script = Arc::new(Script::default());
    let h = Harness::scripted(cfg(), &script);
    let tp = Tp::new("ev-retry-1", 0);
    h.assign(&tp, 1).await;
    h.deliver(vec![(due_in("ev-retry-1", 0, 60_000), 1)]).await;
    until("generation 1 paused", || {
        h.calls.lock().pauses.contains(&(tp.clone(), 1))
    })
    .await;
    let rx = h.revoke(&tp, false).await;
    assert_eq!(
        answer(&rx).await,
        vec![],
        "nothing started, nothing to commit"
    );
    h.assign(&tp, 2).await;
    h.deliver(vec![(delivery("ev-retry-1", 0, "k", b"{}", vec![]), 2)])
        .await;
    h.until_committed("processed under generation 2", &tp, 2, 1)
        .await;
    assert!(
        !h.calls.lock().pauses.contains(&(tp.clone(), 2)),
        "the new assignment is not paused"
    );
    let (_, calls) = h.stop().await;
    assert_eq!(calls.lock().seeks, vec![(tp.clone(), 1, 0)]);
}

/// A retry the partition waited for must be the first delivery after the resume. When a
/// later one comes first (librdkafka lost the seek), the seek is repeated and the later one
/// is not processed; the awaited one then is.
#[tokio::test]
async fn a_later_message_before_the_awaited_retry_repeats_the_seek() {
    let script = Arc::new(Script::default());
    let h = Harness::scripted(cfg(), &script);
    let tp = Tp::new("ev-retry-1", 0);
    h.assign(&tp, 1).await;
    h.deliver(vec![(due_in("ev-retry-1", 5, 100), 1)]).await;
    until("the wait's seek", || h.calls.lock().seeks.len() == 1).await;
    h.until_resumed("the resume", &tp, 1).await;
    // The seek was lost: offset 6 arrives first under the seek's epoch (100).
    h.deliver(vec![(delivery("ev-retry-1", 6, "k", b"{}", vec![]), 100)])
        .await;
    until("the seek is repeated", || h.calls.lock().seeks.len() == 2).await;
    assert_eq!(h.calls.lock().seeks[1], (tp.clone(), 1, 5));
    assert!(script.calls.lock().is_empty(), "offset 6 was not processed");
    // Now the awaited message comes, then the next one.
    h.deliver(vec![
        (delivery("ev-retry-1", 5, "k", b"{}", vec![]), 101),
        (delivery("ev-retry-1", 6, "k", b"{}", vec![]), 101),
    ])
    .await;
    h.until_committed("both processed and committed", &tp, 1, 7)
        .await;
    h.stop().await;
    assert_eq!(
        *script.calls.lock(),
        vec![("ev-retry-1".to_string(), 5), ("ev-retry-1".to_string(), 6)]
    );
}

/// When the awaited retry is the partition's last message and does not come back after the
/// resume, the seek is repeated after a while.
#[tokio::test]
async fn an_awaited_retry_that_never_comes_is_sought_again() {
    let script = Arc::new(Script::default());
    let h = Harness::scripted(cfg(), &script);
    let tp = Tp::new("ev-retry-1", 0);
    h.assign(&tp, 1).await;
    h.deliver(vec![(due_in("ev-retry-1", 9, 50), 1)]).await;
    h.until_resumed("the resume", &tp, 1).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while h.calls.lock().seeks.len() < 2 {
        assert!(
            Instant::now() < deadline,
            "the seek is repeated within its check interval"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(h.calls.lock().seeks[1], (tp.clone(), 1, 9));
    let resumes = h.calls.lock().resumes.len();
    until("and the partition is resumed again", || {
        h.calls.lock().resumes.len() > resumes
    })
    .await;
    h.stop().await;
}
