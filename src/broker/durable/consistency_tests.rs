//! The durable broker's consistency under sweeps, failures, concurrency and changing limits:
//! idempotency keys across a sweep and a restart, a key whose publish failed, the quota under
//! concurrent publishers, a channel whose `history_size` switches to 0.

use std::sync::Arc;

use super::log::MAGIC;
use super::record::Record;
use super::tests::{
    KEEP, TempDir, answer, keyed, offsets, open, open_at, options, publish_n, queued, request,
    segments,
};
use super::{DurableOptions, wall_ms};
use crate::broker::conformance;
use crate::broker::history::{HistoryLimits, new_epoch};
use crate::broker::{Broker, BrokerError, PublishRequest};

/// A key still within its window keeps the segment of its record: the sweep does not delete
/// it, and a retry after a restart is still a duplicate.
#[tokio::test]
async fn a_live_idempotency_key_survives_the_sweep_and_a_restart() {
    let dir = TempDir::new();
    let small = HistoryLimits { size: 2, ..KEEP };
    let (broker, _) = open_at(&dir, 1024);
    let first = broker
        .publish("k", keyed(1, small, "once"))
        .await
        .expect("ok");
    for n in 2..=60 {
        broker.publish("k", request(n, small)).await.expect("ok");
    }
    let before = segments(&dir.0).len();
    assert!(before > 5, "small segments: {before}");
    // Offset 1 left the history long ago; only its key is still live.
    broker.sweep_once();
    drop(broker);
    let (broker, _) = open_at(&dir, 1024);
    let retry = broker
        .publish("k", keyed(1, small, "once"))
        .await
        .expect("ok");
    assert!(
        retry.duplicate,
        "the key survived the sweep and the restart"
    );
    assert_eq!(retry.position, first.position);
    let next = broker.publish("k", request(61, small)).await.expect("ok");
    assert_eq!(next.position.offset, 61, "nothing was published again");
}

/// The original publish with a key failed (and its publisher is gone, so nobody renewed the
/// channel yet): a retry with the same key must publish for real, not be acknowledged as a
/// duplicate of a publication that is not on disk.
#[tokio::test]
async fn a_retry_of_a_failed_keyed_publish_publishes_again() {
    let dir = TempDir::new();
    let (broker, _) = open_at(&dir, 1 << 20);
    let epoch = publish_n(&broker, "a", 2).await;
    let durable = broker.durable.as_ref().expect("durable");
    let release = durable.hold();
    durable.fail_next_write();
    let original = queued(&broker, "a", keyed(3, KEEP, "k"), 3).await;
    original.abort();
    let _ = original.await;
    drop(release);
    // Everything queued so far is processed: the original failed in that earlier batch.
    let _ = durable.barrier().expect("queued").await;
    let retry = broker
        .publish("a", keyed(3, KEEP, "k"))
        .await
        .expect("published");
    assert!(!retry.duplicate, "its original was never stored: {retry:?}");
    assert_ne!(retry.position.epoch, epoch, "a new epoch after the failure");
    assert_eq!(retry.position.offset, 1);
    let again = broker
        .publish("a", keyed(3, KEEP, "k"))
        .await
        .expect("published");
    assert!(again.duplicate, "the successful retry is remembered");
    assert_eq!(again.position, retry.position);
    drop(broker);
    let (broker, _) = open_at(&dir, 1 << 20);
    let (again, got) = offsets(&broker, "a").await;
    assert_eq!(again, retry.position.epoch);
    assert_eq!(got, vec![1]);
}

/// Also when the retry arrives while the original is still queued and both are answered by
/// the same batch.
#[tokio::test]
async fn a_retry_queued_behind_its_failing_original_is_not_a_duplicate() {
    let dir = TempDir::new();
    let (broker, _) = open_at(&dir, 1 << 20);
    let epoch = publish_n(&broker, "a", 2).await;
    let durable = broker.durable.as_ref().expect("durable");
    let release = durable.hold();
    durable.fail_next_write();
    let original = queued(&broker, "a", keyed(3, KEEP, "k"), 3).await;
    let retry = {
        let broker = Arc::clone(&broker);
        tokio::spawn(async move { broker.publish("a", keyed(3, KEEP, "k")).await })
    };
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    drop(release);
    assert!(answer(original).await.is_err(), "the original failed");
    match answer(retry).await {
        Ok(published) => {
            assert!(!published.duplicate, "not a duplicate of a lost publish");
            assert_ne!(published.position.epoch, epoch);
        }
        Err(err) => panic!("the retry should have published: {err}"),
    }
}

/// The framed size of a record of `payload` on a channel named like `channel`.
fn record_len(channel: &str, payload: &str) -> u64 {
    let record = Record {
        channel: channel.into(),
        epoch: new_epoch(),
        offset: 1,
        time_ms: wall_ms(),
        limits: KEEP,
        client_id: None,
        key: None,
        data: Some(payload.into()),
    };
    let mut bytes = Vec::new();
    record.encode(&mut bytes);
    bytes.len() as u64
}

/// Many publishers at once against a small quota, one record per segment (every record also
/// costs a segment header): the files never exceed the quota, and `storage_full` comes only
/// when the next record and its segment header no longer fit.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_publishers_never_take_the_files_past_the_quota() {
    let dir = TempDir::new();
    let payload = format!("{{\"pad\":\"{}\"}}", "p".repeat(200));
    let len = record_len("c00", &payload);
    let each = len + MAGIC.len() as u64;
    // Room for 100 records with their headers and then some, not for a 101st with its header.
    let quota = 100 * each + len + 4;
    let (broker, _) = open(DurableOptions {
        max_bytes: quota,
        ..options(&dir.0, 1)
    });
    let mut publishers = Vec::new();
    for p in 0..32 {
        let broker = Arc::clone(&broker);
        let payload = payload.clone();
        publishers.push(tokio::spawn(async move {
            let channel = format!("c{p:02}");
            let mut acknowledged = 0u64;
            loop {
                let request = PublishRequest {
                    data: conformance::json(&payload),
                    client_id: None,
                    history: KEEP,
                    idempotency: None,
                };
                match broker.publish(&channel, request).await {
                    Ok(_) => acknowledged += 1,
                    Err(BrokerError::StorageFull(_)) => return acknowledged,
                    Err(err) => panic!("{channel}: {err}"),
                }
                assert!(acknowledged < 1000, "the quota never applied");
            }
        }));
    }
    let mut acknowledged = 0;
    for publisher in publishers {
        acknowledged += publisher.await.expect("publisher");
    }
    let on_disk: u64 = segments(&dir.0)
        .iter()
        .map(|path| std::fs::metadata(path).expect("segment").len())
        .sum();
    assert!(on_disk <= quota, "{on_disk} bytes on disk, quota {quota}");
    assert!(
        on_disk + each > quota,
        "refused before the quota: {on_disk} of {quota}"
    );
    assert_eq!(acknowledged, 100);
    assert_eq!(on_disk, broker.durable.as_ref().expect("durable").bytes());
}

/// A namespace reload switches a durable channel's `history_size` to 0 while its earlier
/// publications are still on their way to the disk: the publication without history must
/// neither overtake them nor take an offset the log does not know of.
#[tokio::test]
async fn a_channel_switched_to_no_history_keeps_its_order_and_offsets() {
    let dir = TempDir::new();
    let (broker, events) = open_at(&dir, 1 << 20);
    broker.subscribe("c").await.expect("ok");
    let epoch = publish_n(&broker, "c", 2).await;
    let release = broker.durable.as_ref().expect("durable").hold();
    let third = queued(&broker, "c", request(3, KEEP), 3).await;
    let none = HistoryLimits { size: 0, ..KEEP };
    let fourth = queued(&broker, "c", request(4, none), 4).await;
    drop(release);
    assert_eq!(answer(third).await.expect("ok").position.offset, 3);
    assert_eq!(answer(fourth).await.expect("ok").position.offset, 4);
    let delivered: Vec<u64> = events.epochs("c").iter().map(|(o, _)| *o).collect();
    assert_eq!(delivered, vec![1, 2, 3, 4], "delivered in offset order");
    drop(broker);
    let (broker, _) = open_at(&dir, 1 << 20);
    let next = broker.publish("c", request(5, KEEP)).await.expect("ok");
    assert!(
        next.position.epoch != epoch || next.position.offset == 5,
        "offset 4 was handed out in this epoch: {next:?}"
    );
}

/// The other way: a channel published without history (kept alive by a subscriber) starts
/// keeping history; its offsets go on, and a restart continues after them.
#[tokio::test]
async fn a_channel_switched_to_history_continues_its_offsets_across_a_restart() {
    let dir = TempDir::new();
    let (broker, events) = open_at(&dir, 1 << 20);
    broker.subscribe("c").await.expect("ok");
    let none = HistoryLimits { size: 0, ..KEEP };
    let first = broker.publish("c", request(1, none)).await.expect("ok");
    broker.publish("c", request(2, none)).await.expect("ok");
    let third = broker.publish("c", request(3, KEEP)).await.expect("ok");
    assert_eq!(third.position.offset, 3);
    assert_eq!(third.position.epoch, first.position.epoch);
    let delivered: Vec<u64> = events.epochs("c").iter().map(|(o, _)| *o).collect();
    assert_eq!(delivered, vec![1, 2, 3]);
    drop(broker);
    let (broker, _) = open_at(&dir, 1 << 20);
    let (epoch, got) = offsets(&broker, "c").await;
    assert_eq!(epoch, first.position.epoch);
    assert_eq!(got, vec![3]);
    let next = broker.publish("c", request(4, KEEP)).await.expect("ok");
    assert_eq!(next.position.offset, 4);
}
