//! Compaction on real files: a retained old record no longer pins the disk, and what it
//! copied comes back exactly once after a restart (even with the original still there).

use std::sync::atomic::Ordering;

use super::DurableOptions;
use super::log::segment_path;
use super::tests::{KEEP, TempDir, keyed, offsets, open, open_at, options, request, segments};
use crate::broker::history::HistoryLimits;
use crate::broker::{Broker, BrokerError};

const SMALL: HistoryLimits = HistoryLimits {
    size: 5,
    ttl: None,
    max_bytes: 1 << 20,
};

fn disk_bytes(dir: &std::path::Path) -> u64 {
    segments(dir)
        .iter()
        .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
        .sum()
}

/// A quiet channel's single record (no TTL) in the oldest segment, then a busy channel that
/// keeps only 5: without compaction every segment stays on disk.
async fn pinned(dir: &TempDir) -> (std::sync::Arc<crate::broker::memory::MemoryBroker>, String) {
    let (broker, _) = open_at(dir, 4096);
    let quiet = broker
        .publish("quiet", request(1, KEEP))
        .await
        .expect("ok")
        .position
        .epoch;
    for i in 1..=300 {
        broker.publish("busy", request(i, SMALL)).await.expect("ok");
    }
    (broker, quiet)
}

#[tokio::test]
async fn a_retained_old_record_no_longer_pins_the_segments_behind_it() {
    let dir = TempDir::new();
    let (broker, quiet) = pinned(&dir).await;
    let before = disk_bytes(&dir.0);
    assert!(segments(&dir.0).len() > 8, "{:?}", segments(&dir.0));
    broker.sweep_once();
    let after = disk_bytes(&dir.0);
    assert!(
        after * 4 < before,
        "bytes on disk drop: {before} -> {after}"
    );
    assert!(
        !segment_path(&dir.0, 1).exists(),
        "the oldest was compacted"
    );
    assert_eq!(offsets(&broker, "quiet").await, (quiet.clone(), vec![1]));
    drop(broker);
    let (broker, _) = open_at(&dir, 4096);
    assert_eq!(
        offsets(&broker, "quiet").await,
        (quiet.clone(), vec![1]),
        "the copy is recovered, same epoch"
    );
    assert_eq!(
        offsets(&broker, "busy").await.1,
        (296..=300).collect::<Vec<_>>()
    );
    let next = broker.publish("quiet", request(2, KEEP)).await.expect("ok");
    assert_eq!(next.position.offset, 2);
    assert_eq!(next.position.epoch, quiet);
}

/// A crash after the copies were written but before the old segment was deleted: both the
/// original and its copy are on disk, out of offset order; each offset comes back once.
#[tokio::test]
async fn a_record_both_copied_and_still_in_place_comes_back_once() {
    let dir = TempDir::new();
    let (broker, _) = open_at(&dir, 4096);
    let epoch = broker
        .publish("c", request(1, KEEP))
        .await
        .expect("ok")
        .position
        .epoch;
    for i in 2..=3 {
        broker.publish("c", request(i, KEEP)).await.expect("ok");
    }
    for i in 1..=300 {
        broker.publish("busy", request(i, SMALL)).await.expect("ok");
    }
    for i in 4..=5 {
        broker.publish("c", request(i, KEEP)).await.expect("ok");
    }
    let durable = broker.durable.as_ref().expect("durable");
    durable.compact_keeps.store(true, Ordering::Relaxed);
    broker.sweep_once();
    assert!(
        segment_path(&dir.0, 1).exists(),
        "kept: the crash came first"
    );
    drop(broker);
    let (broker, _) = open_at(&dir, 4096);
    assert_eq!(
        offsets(&broker, "c").await,
        (epoch.clone(), vec![1, 2, 3, 4, 5])
    );
    // Now compacted for real, and after another restart still the same.
    broker.sweep_once();
    assert!(!segment_path(&dir.0, 1).exists());
    drop(broker);
    let (broker, _) = open_at(&dir, 4096);
    assert_eq!(offsets(&broker, "c").await, (epoch, vec![1, 2, 3, 4, 5]));
    let next = broker.publish("c", request(6, KEEP)).await.expect("ok");
    assert_eq!(next.position.offset, 6);
}

#[tokio::test]
async fn an_idempotency_key_is_honoured_after_its_record_was_copied() {
    let dir = TempDir::new();
    let (broker, _) = open_at(&dir, 4096);
    let tiny = HistoryLimits { size: 1, ..SMALL };
    let first = broker
        .publish("k", keyed(1, tiny, "once"))
        .await
        .expect("ok");
    for i in 1..=300 {
        broker.publish("busy", request(i, SMALL)).await.expect("ok");
    }
    broker.publish("k", request(2, tiny)).await.expect("ok");
    broker.sweep_once();
    assert!(
        !segment_path(&dir.0, 1).exists(),
        "the key's segment was compacted"
    );
    let retry = broker
        .publish("k", keyed(1, tiny, "once"))
        .await
        .expect("ok");
    assert!(retry.duplicate);
    drop(broker);
    let (broker, _) = open_at(&dir, 4096);
    let retry = broker
        .publish("k", keyed(1, tiny, "once"))
        .await
        .expect("ok");
    assert!(retry.duplicate, "the copied key survived the restart");
    assert_eq!(retry.position, first.position);
    let next = broker.publish("k", request(3, tiny)).await.expect("ok");
    assert_eq!(next.position.offset, 3, "nothing was published again");
}

/// The quota holds a few segments; a quiet channel's record pins the oldest. Publishing goes
/// on for many times the quota: compaction frees the dead data.
#[tokio::test]
async fn dead_data_behind_a_retained_record_does_not_fill_the_quota() {
    let dir = TempDir::new();
    let options = DurableOptions {
        max_bytes: 8 * 4096,
        ..options(&dir.0, 4096)
    };
    let (broker, _) = open(options);
    let quiet = broker
        .publish("quiet", request(1, KEEP))
        .await
        .expect("ok")
        .position
        .epoch;
    for i in 1..=2000u64 {
        match broker.publish("busy", request(i, SMALL)).await {
            Ok(_) => {}
            Err(BrokerError::StorageFull(_)) => {
                broker.sweep_once();
                broker
                    .publish("busy", request(i, SMALL))
                    .await
                    .unwrap_or_else(|err| panic!("publish {i} after a sweep: {err}"));
            }
            Err(err) => panic!("publish {i}: {err}"),
        }
    }
    assert_eq!(offsets(&broker, "quiet").await, (quiet.clone(), vec![1]));
    drop(broker);
    let (broker, _) = open_at(&dir, 4096);
    assert_eq!(offsets(&broker, "quiet").await, (quiet, vec![1]));
    assert_eq!(offsets(&broker, "busy").await.1.len(), 5);
}

/// Hole detection still works with copies: a segment missing after compaction renews the
/// channel with records on both sides of it, not the one whose record was copied past it.
#[tokio::test]
async fn a_missing_segment_after_compaction_renews_only_its_channels() {
    let dir = TempDir::new();
    let (broker, quiet) = pinned(&dir).await;
    for i in 301..=400 {
        broker.publish("busy", request(i, KEEP)).await.expect("ok");
    }
    broker.sweep_once();
    assert!(!segment_path(&dir.0, 1).exists(), "compacted");
    let mut busy_epoch = String::new();
    for i in 401..=420 {
        busy_epoch = broker
            .publish("busy", request(i, KEEP))
            .await
            .expect("ok")
            .position
            .epoch;
    }
    drop(broker);
    let all = segments(&dir.0);
    assert!(all.len() > 3, "{all:?}");
    std::fs::remove_file(&all[1]).expect("remove");
    let (broker, _) = open_at(&dir, 4096);
    assert_ne!(offsets(&broker, "busy").await.0, busy_epoch);
    assert_eq!(offsets(&broker, "quiet").await, (quiet, vec![1]));
}
