//! The log's files on disk: preallocated segments, their zero tails, and what recovery makes
//! of them (real files in a temporary directory).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::log::{MAGIC, prepared_path};
use super::{DurableOptions, FsyncMode};
use crate::broker::conformance::{self, Recorder};
use crate::broker::history::HistoryLimits;
use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, PublishRequest};

/// A fresh directory, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let path = std::env::temp_dir().join(format!("rusty-socks-log-{}", uuid::Uuid::new_v4()));
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn options(dir: &Path, fsync: FsyncMode, segment_bytes: u64) -> DurableOptions {
    DurableOptions {
        dir: dir.to_owned(),
        fsync,
        max_bytes: 0,
        segment_bytes,
    }
}

fn open(options: DurableOptions) -> Arc<MemoryBroker> {
    MemoryBroker::open(Arc::new(Recorder::default()), 1 << 30, options).expect("opens")
}

const KEEP: HistoryLimits = HistoryLimits {
    size: 1000,
    ttl: None,
    max_bytes: 1 << 20,
};

fn request(n: u64) -> PublishRequest {
    PublishRequest {
        data: conformance::json(&format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(100))),
        client_id: None,
        history: KEEP,
        idempotency: None,
    }
}

async fn publish_n(broker: &MemoryBroker, channel: &str, from: u64, to: u64) -> String {
    let mut epoch = String::new();
    for i in from..=to {
        let published = broker
            .publish(channel, request(i))
            .await
            .expect("published");
        assert_eq!(published.position.offset, i);
        epoch = published.position.epoch;
    }
    epoch
}

async fn offsets(broker: &MemoryBroker, channel: &str) -> (String, Vec<u64>) {
    let page = broker
        .history(channel, Some(0), usize::MAX)
        .await
        .expect("reads");
    (
        page.position.epoch,
        page.publications.iter().map(|p| p.offset).collect(),
    )
}

fn files(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == ext))
        .collect();
    found.sort();
    found
}

/// Copies the segments of a running broker, as a `kill -9` would leave them (everything
/// acknowledged is written; the open segment still has its preallocated zeros).
fn crash_copy(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("dir");
    for path in files(from, "seg") {
        std::fs::copy(&path, to.join(path.file_name().expect("name"))).expect("copy");
    }
}

#[tokio::test]
async fn the_open_segment_is_preallocated_and_its_zero_tail_is_the_end_after_a_crash() {
    let dir = TempDir::new();
    let crashed = TempDir::new();
    let broker = open(options(&dir.0, FsyncMode::Always, 1 << 20));
    let epoch = publish_n(&broker, "a", 1, 20).await;
    let open_segment = files(&dir.0, "seg").pop().expect("a segment");
    assert_eq!(
        std::fs::metadata(&open_segment).expect("meta").len(),
        1 << 20,
        "the open segment is written full of zeros ahead of its records"
    );
    crash_copy(&dir.0, &crashed.0);
    drop(broker);
    assert!(
        std::fs::metadata(&open_segment).expect("meta").len() < 1 << 20,
        "a clean close cuts the zeros"
    );
    assert!(files(&dir.0, "pre").is_empty(), "no prepared file is left");

    let broker = open(options(&crashed.0, FsyncMode::Always, 1 << 20));
    let (again, got) = offsets(&broker, "a").await;
    assert_eq!(again, epoch, "zeros are not damage: same epoch");
    assert_eq!(got, (1..=20).collect::<Vec<_>>());
    let copied = crashed.0.join(open_segment.file_name().expect("name"));
    assert!(
        std::fs::metadata(&copied).expect("meta").len() < 1 << 20,
        "recovery cuts the zeros off"
    );
    publish_n(&broker, "a", 21, 25).await;
    drop(broker);
    let broker = open(options(&crashed.0, FsyncMode::Always, 1 << 20));
    assert_eq!(offsets(&broker, "a").await.1, (1..=25).collect::<Vec<_>>());
}

#[tokio::test]
async fn bytes_after_the_zero_tail_are_cut_and_the_records_kept() {
    let dir = TempDir::new();
    let crashed = TempDir::new();
    let broker = open(options(
        &dir.0,
        FsyncMode::Interval(std::time::Duration::from_millis(5)),
        1 << 16,
    ));
    let epoch = publish_n(&broker, "b", 1, 10).await;
    crash_copy(&dir.0, &crashed.0);
    drop(broker);
    let last = files(&crashed.0, "seg").pop().expect("a segment");
    let mut bytes = std::fs::read(&last).expect("read");
    assert_eq!(bytes.len(), 1 << 16, "preallocated");
    // A page written out of order before a power loss: garbage after the zeros.
    let far = bytes.len() - 100;
    bytes[far..far + 37].fill(0x55);
    std::fs::write(&last, &bytes).expect("write");
    let broker = open(options(&crashed.0, FsyncMode::Always, 1 << 16));
    let (again, got) = offsets(&broker, "b").await;
    assert_eq!(again, epoch);
    assert_eq!(got, (1..=10).collect::<Vec<_>>());
    assert_eq!(
        std::fs::metadata(&last).expect("meta").len(),
        far as u64,
        "cut where the garbage starts"
    );
}

#[tokio::test]
async fn a_leftover_prepared_file_is_deleted_at_startup_and_segments_roll_through_prepared_files() {
    let dir = TempDir::new();
    std::fs::create_dir_all(&dir.0).expect("dir");
    let stale = prepared_path(&dir.0, 77);
    std::fs::write(&stale, [0u8; 4096]).expect("write");
    // Small segments: many rolls, each into a file prepared ahead.
    let broker = open(options(&dir.0, FsyncMode::Always, 4096));
    assert!(!stale.exists(), "a stale .pre file is removed");
    let epoch = publish_n(&broker, "c", 1, 200).await;
    let segs = files(&dir.0, "seg");
    assert!(segs.len() > 5, "{}", segs.len());
    for sealed in &segs[..segs.len() - 1] {
        let bytes = std::fs::read(sealed).expect("read");
        assert_eq!(&bytes[..MAGIC.len()], MAGIC);
        assert_ne!(
            bytes.last(),
            Some(&0),
            "a sealed segment ends with its last record"
        );
    }
    drop(broker);
    let broker = open(options(&dir.0, FsyncMode::Always, 4096));
    let (again, got) = offsets(&broker, "c").await;
    assert_eq!(again, epoch);
    assert_eq!(got, (1..=200).collect::<Vec<_>>());
}

#[tokio::test]
async fn never_does_not_preallocate() {
    let dir = TempDir::new();
    let broker = open(options(&dir.0, FsyncMode::Never, 1 << 20));
    publish_n(&broker, "d", 1, 3).await;
    let seg = files(&dir.0, "seg").pop().expect("a segment");
    assert!(std::fs::metadata(&seg).expect("meta").len() < 4096);
    assert!(files(&dir.0, "pre").is_empty());
}

#[tokio::test]
async fn a_failed_periodic_sync_fails_the_channels_it_covered_and_starts_a_new_segment() {
    let dir = TempDir::new();
    let every = std::time::Duration::from_millis(50);
    let broker = open(options(&dir.0, FsyncMode::Interval(every), 1 << 20));
    let epoch = publish_n(&broker, "a", 1, 3).await;
    let files_before = files(&dir.0, "seg").len();
    let durable = broker.durable.as_ref().expect("durable");
    // Acknowledged after the write; the timer's sync that should cover them fails.
    durable.fail_next_sync();
    tokio::time::sleep(every * 20).await;
    let lost = broker.publish("a", request(4)).await;
    assert!(
        lost.is_err(),
        "a record after ones a failed sync may have lost is not acknowledged: {lost:?}"
    );
    let next = broker.publish("a", request(1)).await.expect("published");
    assert_ne!(next.position.epoch, epoch, "the channel starts a new epoch");
    assert_eq!(next.position.offset, 1);
    assert!(
        files(&dir.0, "seg").len() > files_before,
        "the writer left the file whose sync failed"
    );
    let other = broker.publish("b", request(1)).await.expect("published");
    assert_eq!(other.position.offset, 1, "other channels are unaffected");
}

#[tokio::test]
async fn a_failed_sync_when_a_segment_is_sealed_fails_the_records_it_covered() {
    // One record's size on disk, from a log of exactly one.
    let probe = TempDir::new();
    {
        let broker = open(options(&probe.0, FsyncMode::Never, 1 << 20));
        publish_n(&broker, "w", 1, 1).await;
    }
    let seg = files(&probe.0, "seg").pop().expect("a segment");
    let record = std::fs::metadata(&seg).expect("meta").len() - MAGIC.len() as u64;

    // Segments of two records: `w` and `a` fill one, `b` seals it and starts the next.
    let dir = TempDir::new();
    let broker = open(options(
        &dir.0,
        FsyncMode::Always,
        MAGIC.len() as u64 + 2 * record + record / 2,
    ));
    publish_n(&broker, "w", 1, 1).await;
    let durable = broker.durable.as_ref().expect("durable");
    let release = durable.hold();
    durable.fail_next_sync();
    let (a, b) = (Arc::clone(&broker), Arc::clone(&broker));
    let a = tokio::spawn(async move { a.publish("a", request(1)).await });
    let b = tokio::spawn(async move { b.publish("b", request(1)).await });
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    release.send(()).expect("the writer waits");
    let (a, b) = (a.await.expect("task"), b.await.expect("task"));
    // `a` was written into the segment whose sync (when it was sealed) failed: it must not
    // be acknowledged as durable, nor `b`, which needed the next segment.
    assert!(
        a.is_err(),
        "a record the failed sync covered was acknowledged: {a:?}"
    );
    assert!(b.is_err(), "{b:?}");
    // The channels go on, `a` in a new epoch.
    let next = broker.publish("a", request(1)).await.expect("published");
    assert_eq!(next.position.offset, 1);
}
