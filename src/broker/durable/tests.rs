//! The durable memory broker on real files: conformance, restarts, damage, quota, TTL, lock.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::log::segment_path;
use super::{DurableOptions, FsyncMode};
use crate::broker::conformance::{self, Recorder};
use crate::broker::history::HistoryLimits;
use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, BrokerError, BrokerEvents, Idempotency, PublishRequest, Published};

/// A fresh directory, removed when dropped.
pub(super) struct TempDir(pub(super) PathBuf);

impl TempDir {
    pub(super) fn new() -> Self {
        let path =
            std::env::temp_dir().join(format!("rusty-socks-durable-{}", uuid::Uuid::new_v4()));
        Self(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub(super) fn options(dir: &Path, segment_bytes: u64) -> DurableOptions {
    DurableOptions {
        dir: dir.to_owned(),
        fsync: FsyncMode::Always,
        max_bytes: 0,
        segment_bytes,
    }
}

pub(super) fn open(options: DurableOptions) -> (Arc<MemoryBroker>, Arc<Recorder>) {
    let events = Arc::new(Recorder::default());
    let broker = MemoryBroker::open(events.clone(), 1 << 30, options).expect("opens");
    (broker, events)
}

/// A broker on `dir` with segments of `segment_bytes`, `fsync` always, no quota.
pub(super) fn open_at(dir: &TempDir, segment_bytes: u64) -> (Arc<MemoryBroker>, Arc<Recorder>) {
    open(options(&dir.0, segment_bytes))
}

pub(super) const KEEP: HistoryLimits = HistoryLimits {
    size: 1000,
    ttl: None,
    max_bytes: 1 << 20,
};

pub(super) fn request(n: u64, limits: HistoryLimits) -> PublishRequest {
    PublishRequest {
        data: conformance::json(&format!("{{\"n\":{n},\"pad\":\"{}\"}}", "x".repeat(100))),
        client_id: None,
        history: limits,
        idempotency: None,
    }
}

pub(super) async fn publish_n(broker: &MemoryBroker, channel: &str, n: u64) -> String {
    let mut epoch = String::new();
    for i in 1..=n {
        let published = broker
            .publish(channel, request(i, KEEP))
            .await
            .expect("published");
        assert_eq!(published.position.offset, i);
        epoch = published.position.epoch;
    }
    epoch
}

pub(super) async fn offsets(broker: &MemoryBroker, channel: &str) -> (String, Vec<u64>) {
    let page = broker
        .history(channel, Some(0), usize::MAX)
        .await
        .expect("reads");
    (
        page.position.epoch,
        page.publications.iter().map(|p| p.offset).collect(),
    )
}

pub(super) fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut found: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    found.sort();
    found
}

/// Waits (up to 5 s) for the sweep to leave at most `most` segments in `dir`.
pub(super) async fn swept_to(dir: &Path, most: usize) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    while segments(dir).len() > most && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `request` with the idempotency key `key` (remembered for a minute).
pub(super) fn keyed(n: u64, limits: HistoryLimits, key: &str) -> PublishRequest {
    PublishRequest {
        idempotency: Some(Idempotency {
            key: key.into(),
            window: Duration::from_secs(60),
        }),
        ..request(n, limits)
    }
}

/// A publish still in flight.
pub(super) type InFlight = tokio::task::JoinHandle<Result<Published, BrokerError>>;

/// Publishes `request` on `channel` in a task and returns once it is appended in memory as
/// offset `offset` (the writer may be held: not yet written).
pub(super) async fn queued(
    broker: &Arc<MemoryBroker>,
    channel: &'static str,
    request: PublishRequest,
    offset: u64,
) -> InFlight {
    let task = {
        let broker = Arc::clone(broker);
        tokio::spawn(async move { broker.publish(channel, request).await })
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while broker.with(channel, |state| state.stream.position().offset) < offset {
        assert!(tokio::time::Instant::now() < deadline, "never appended");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    task
}

/// The answer to a publish started by [`queued`].
pub(super) async fn answer(task: InFlight) -> Result<Published, BrokerError> {
    tokio::time::timeout(Duration::from_secs(10), task)
        .await
        .expect("answered")
        .expect("task")
}

#[tokio::test]
async fn the_durable_memory_broker_passes_the_conformance_suite() {
    for fsync in [
        FsyncMode::Always,
        FsyncMode::Interval(Duration::from_millis(5)),
        FsyncMode::Never,
    ] {
        let dirs = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = Arc::clone(&dirs);
        conformance::run_all(move |events: Arc<dyn BrokerEvents>| {
            let dir = TempDir::new();
            let options = DurableOptions {
                fsync,
                ..options(&dir.0, 1 << 20)
            };
            keep.lock().expect("dirs").push(dir);
            async move {
                MemoryBroker::open(events, 1 << 30, options).expect("opens") as Arc<dyn Broker>
            }
        })
        .await;
    }
}

#[tokio::test]
async fn history_offsets_epochs_and_keys_survive_a_restart() {
    let dir = TempDir::new();
    let (broker, _) = open_at(&dir, 1 << 20);
    let epoch = publish_n(&broker, "a", 20).await;
    publish_n(&broker, "b", 3).await;
    let keyed = keyed(21, KEEP, "k");
    assert_eq!(
        broker
            .publish("a", keyed.clone())
            .await
            .expect("ok")
            .position
            .offset,
        21
    );
    drop(broker);
    let (broker, _) = open_at(&dir, 1 << 20);
    let (again, got) = offsets(&broker, "a").await;
    assert_eq!(again, epoch, "the epoch is unchanged");
    assert_eq!(got, (1..=21).collect::<Vec<_>>());
    assert_eq!(offsets(&broker, "b").await.1, vec![1, 2, 3]);
    let retry = broker.publish("a", keyed).await.expect("ok");
    assert!(retry.duplicate, "the idempotency key survived the restart");
    assert_eq!(retry.position.offset, 21);
    let next = broker.publish("a", request(22, KEEP)).await.expect("ok");
    assert_eq!(next.position.offset, 22, "offsets continue");
    assert_eq!(next.position.epoch, epoch);
}

#[tokio::test]
async fn a_torn_tail_is_cut_and_the_rest_kept() {
    let dir = TempDir::new();
    let (broker, _) = open_at(&dir, 1 << 20);
    let epoch = publish_n(&broker, "a", 10).await;
    drop(broker);
    let last = segments(&dir.0).pop().expect("a segment");
    let len = std::fs::metadata(&last).expect("meta").len();
    let file = std::fs::OpenOptions::new()
        .write(true)
        .open(&last)
        .expect("open");
    file.set_len(len - 5).expect("truncate");
    drop(file);
    let (broker, _) = open_at(&dir, 1 << 20);
    let (again, got) = offsets(&broker, "a").await;
    assert_eq!(again, epoch, "a torn tail keeps the epoch");
    assert_eq!(
        got,
        (1..=9).collect::<Vec<_>>(),
        "only the torn record is lost"
    );
    let next = broker.publish("a", request(10, KEEP)).await.expect("ok");
    assert_eq!(next.position.offset, 10);
    drop(broker);
    let (broker, _) = open_at(&dir, 1 << 20);
    assert_eq!(offsets(&broker, "a").await.1, (1..=10).collect::<Vec<_>>());
}

/// Two channels written alternately into small segments; damage in the middle of the log.
async fn interleaved(dir: &Path) -> (String, String) {
    let (broker, _) = open(options(dir, 4096));
    let mut epochs = (String::new(), String::new());
    for i in 1..=60 {
        epochs.0 = broker
            .publish("early", request(i, KEEP))
            .await
            .expect("ok")
            .position
            .epoch;
    }
    for i in 1..=60 {
        epochs.1 = broker
            .publish("late", request(i, KEEP))
            .await
            .expect("ok")
            .position
            .epoch;
    }
    drop(broker);
    epochs
}

#[tokio::test]
async fn flipped_bytes_in_an_old_segment_renew_only_the_channels_it_cut() {
    let dir = TempDir::new();
    let (early_epoch, late_epoch) = interleaved(&dir.0).await;
    let all = segments(&dir.0);
    assert!(all.len() > 4, "small segments: {}", all.len());
    // A byte in the second segment: `early` (written only before and around it) may have
    // lost records there; `late` was written entirely after it.
    let victim = &all[1];
    let mut bytes = std::fs::read(victim).expect("read");
    let at = bytes.len() / 2;
    bytes[at] ^= 0xFF;
    std::fs::write(victim, &bytes).expect("write");
    let (broker, _) = open_at(&dir, 4096);
    let (epoch, got) = offsets(&broker, "late").await;
    assert_eq!(
        epoch, late_epoch,
        "a channel written after the damage is unaffected"
    );
    assert_eq!(got, (1..=60).collect::<Vec<_>>());
    let (epoch, got) = offsets(&broker, "early").await;
    assert_ne!(
        epoch, early_epoch,
        "a channel that may have lost records gets a new epoch"
    );
    assert!(got.is_empty(), "and serves nothing it cannot vouch for");
    drop(broker);
    // A second restart agrees, although the damaged part is gone by now.
    let (broker, _) = open_at(&dir, 4096);
    assert_ne!(offsets(&broker, "early").await.0, early_epoch);
    assert_eq!(offsets(&broker, "late").await.0, late_epoch);
}

#[tokio::test]
async fn a_missing_segment_renews_the_channels_it_held() {
    let dir = TempDir::new();
    let (early_epoch, late_epoch) = interleaved(&dir.0).await;
    let all = segments(&dir.0);
    std::fs::remove_file(&all[1]).expect("remove");
    let (broker, _) = open_at(&dir, 4096);
    assert_ne!(offsets(&broker, "early").await.0, early_epoch);
    let (epoch, got) = offsets(&broker, "late").await;
    assert_eq!(epoch, late_epoch);
    assert_eq!(got, (1..=60).collect::<Vec<_>>());
}

#[tokio::test]
async fn a_channel_with_a_hole_gets_a_new_epoch() {
    let dir = TempDir::new();
    let (broker, _) = open_at(&dir, 4096);
    let mut epoch = String::new();
    for i in 1..=80 {
        epoch = broker
            .publish("c", request(i, KEEP))
            .await
            .expect("ok")
            .position
            .epoch;
    }
    drop(broker);
    let all = segments(&dir.0);
    // Damage a middle segment: `c` has records before and after it.
    let mut bytes = std::fs::read(&all[1]).expect("read");
    let last = bytes.len() - 3;
    bytes[last] ^= 0x01;
    std::fs::write(&all[1], &bytes).expect("write");
    let (broker, _) = open_at(&dir, 4096);
    let (again, got) = offsets(&broker, "c").await;
    assert_ne!(again, epoch);
    assert!(got.is_empty());
}

#[tokio::test]
async fn a_second_broker_on_the_directory_is_refused() {
    let dir = TempDir::new();
    let (_broker, _) = open_at(&dir, 1 << 20);
    let events = Arc::new(Recorder::default());
    let err = MemoryBroker::open(events, 1 << 30, options(&dir.0, 1 << 20)).expect_err("locked");
    let text = err.to_string();
    assert!(
        text.contains("RUSTY_SOCKS_DATA_DIR") && text.contains("in use"),
        "{text}"
    );
}

#[tokio::test]
async fn the_quota_refuses_publishes_but_reads_and_delivery_go_on() {
    let dir = TempDir::new();
    let options = DurableOptions {
        max_bytes: 4096,
        ..options(&dir.0, 1 << 20)
    };
    let (broker, events) = open(options);
    broker.subscribe("q").await.expect("ok");
    let mut acknowledged = 0;
    let refused = loop {
        match broker.publish("q", request(acknowledged + 1, KEEP)).await {
            Ok(p) => acknowledged = p.position.offset,
            Err(err) => break err,
        }
        assert!(acknowledged < 1000, "the quota never applied");
    };
    assert!(matches!(refused, BrokerError::StorageFull(_)), "{refused}");
    assert!(acknowledged > 10);
    let (_, got) = offsets(&broker, "q").await;
    assert_eq!(
        got,
        (1..=acknowledged).collect::<Vec<_>>(),
        "reads go on, nothing half-published"
    );
    assert_eq!(events.taken("q").len() as u64, acknowledged);
    // A channel without history needs no disk: still published and delivered.
    broker.subscribe("live").await.expect("ok");
    let none = HistoryLimits { size: 0, ..KEEP };
    broker
        .publish("live", request(1, none))
        .await
        .expect("no storage needed");
    assert_eq!(events.taken("live").len(), 1);
}

#[tokio::test]
async fn ttl_expiry_holds_across_a_restart_and_leaves_no_files() {
    let dir = TempDir::new();
    let short = HistoryLimits {
        ttl: Some(Duration::from_millis(300)),
        ..KEEP
    };
    let (broker, _) = open_at(&dir, 4096);
    for i in 1..=100 {
        broker.publish("t", request(i, short)).await.expect("ok");
    }
    let written = segments(&dir.0).len();
    assert!(written > 2);
    drop(broker);
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (broker, _) = open_at(&dir, 4096);
    let (_, got) = offsets(&broker, "t").await;
    assert!(got.is_empty(), "expired while the server was down: {got:?}");
    // The sweep deletes every sealed segment; the newest one is all that may stay.
    swept_to(&dir.0, 1).await;
    assert_eq!(
        segments(&dir.0).len(),
        1,
        "expired history leaves no sealed files"
    );
}

#[tokio::test]
async fn size_limits_delete_whole_old_segments() {
    let dir = TempDir::new();
    let small = HistoryLimits { size: 5, ..KEEP };
    let (broker, _) = open_at(&dir, 4096);
    for i in 1..=300 {
        broker.publish("s", request(i, small)).await.expect("ok");
    }
    swept_to(&dir.0, 3).await;
    assert!(segments(&dir.0).len() <= 3, "{:?}", segments(&dir.0));
    drop(broker);
    let (broker, _) = open_at(&dir, 4096);
    assert_eq!(
        offsets(&broker, "s").await.1,
        (296..=300).collect::<Vec<_>>()
    );
    assert!(
        !segment_path(&dir.0, 1).exists(),
        "the oldest segment was deleted"
    );
}

/// A crash between creating a segment and writing its header leaves an empty newest file.
/// Recovery removes it; the next segment must take its number, not leave a hole that the
/// restart after that would read as a missing segment (and renew every channel).
#[tokio::test]
async fn an_empty_newest_segment_leaves_no_hole_for_the_next_restart() {
    let dir = TempDir::new();
    let (broker, _) = open_at(&dir, 4096);
    let a = publish_n(&broker, "a", 60).await;
    let b = publish_n(&broker, "b", 3).await;
    drop(broker);
    let all = segments(&dir.0);
    let newest = all.last().expect("a segment");
    let seq = u64::from_str_radix(
        newest.file_stem().and_then(|s| s.to_str()).expect("named"),
        16,
    )
    .expect("hex");
    std::fs::write(segment_path(&dir.0, seq + 1), b"").expect("empty segment");
    let (broker, _) = open_at(&dir, 4096);
    let more = broker.publish("b", request(4, KEEP)).await.expect("ok");
    assert_eq!(more.position.offset, 4);
    assert_eq!(more.position.epoch, b);
    drop(broker);
    let (broker, _) = open_at(&dir, 4096);
    let (epoch, got) = offsets(&broker, "a").await;
    assert_eq!(epoch, a, "a keeps its epoch over the second restart");
    assert_eq!(got, (1..=60).collect::<Vec<_>>());
    let (epoch, got) = offsets(&broker, "b").await;
    assert_eq!(epoch, b, "b keeps its epoch over the second restart");
    assert_eq!(got, vec![1, 2, 3, 4]);
}

/// A publication appended in memory but not yet written is invisible to reads: a crash
/// would lose it and the restarted server would give its offset to another publication, so
/// a client holding that position would resume "recovered" and miss the new one.
#[tokio::test]
async fn reads_never_report_an_offset_the_writer_has_not_written() {
    let dir = TempDir::new();
    let (broker, _) = open_at(&dir, 1 << 20);
    let epoch = publish_n(&broker, "a", 3).await;
    let release = broker.durable.as_ref().expect("durable").hold();
    // Offset 4 appended in memory; the writer is held, so not written.
    let publishing = queued(&broker, "a", request(4, KEEP), 4).await;
    let page = broker
        .history("a", Some(0), usize::MAX)
        .await
        .expect("reads");
    assert_eq!(
        page.position.offset, 3,
        "the unwritten offset 4 is not reported"
    );
    assert_eq!(page.position.epoch, epoch);
    let got: Vec<u64> = page.publications.iter().map(|p| p.offset).collect();
    assert_eq!(got, vec![1, 2, 3]);
    let latest = broker.history("a", None, 10).await.expect("reads");
    assert_eq!(latest.publications.len(), 3);
    assert_eq!(latest.position.offset, 3);
    drop(release);
    let published = answer(publishing).await.expect("published once written");
    assert_eq!(published.position.offset, 4);
    let (again, got) = offsets(&broker, "a").await;
    assert_eq!(again, epoch);
    assert_eq!(got, vec![1, 2, 3, 4], "written now: reported");
}

/// Once a record of a channel failed to be written, the records queued behind it in the same
/// epoch fail too: none is acknowledged (and delivered) after an earlier one was lost. The
/// channel then goes on in a new epoch, across a restart too.
#[tokio::test]
async fn records_queued_behind_a_failed_write_of_their_channel_fail_too() {
    let dir = TempDir::new();
    // One record per segment: the two records below are written by separate writes.
    let (broker, _) = open_at(&dir, 1);
    let epoch = publish_n(&broker, "a", 2).await;
    let durable = broker.durable.as_ref().expect("durable");
    let release = durable.hold();
    durable.fail_next_write();
    let mut publishing = Vec::new();
    for n in 3..=4 {
        publishing.push(queued(&broker, "a", request(n, KEEP), n).await);
    }
    drop(release);
    for task in publishing {
        let answer = answer(task).await;
        assert!(answer.is_err(), "not acknowledged: {answer:?}");
    }
    let next = broker.publish("a", request(5, KEEP)).await.expect("ok");
    assert_ne!(next.position.epoch, epoch, "a new epoch after the failure");
    assert_eq!(next.position.offset, 1);
    drop(broker);
    let (broker, _) = open_at(&dir, 1);
    let (again, got) = offsets(&broker, "a").await;
    assert_eq!(again, next.position.epoch);
    assert_eq!(got, vec![1]);
}

/// A failed sync: what it covered may be lost, so the records of those channels queued
/// behind it fail too, and the writer goes on in a new segment, not the suspect file.
#[tokio::test]
async fn after_a_failed_sync_queued_records_fail_and_a_new_segment_starts() {
    let dir = TempDir::new();
    let (broker, _) = open_at(&dir, 1 << 20);
    let epoch = publish_n(&broker, "a", 2).await;
    let files = segments(&dir.0).len();
    let durable = broker.durable.as_ref().expect("durable");
    // The writer's queue: hold, fail the sync, 3, hold, 4: 3 and 4 are committed apart.
    let first = durable.hold();
    durable.fail_next_sync();
    let mut holds = vec![first];
    let mut publishing = Vec::new();
    for n in 3..=4 {
        if n == 4 {
            holds.push(durable.hold());
        }
        publishing.push(queued(&broker, "a", request(n, KEEP), n).await);
    }
    for (hold, task) in holds.into_iter().zip(publishing) {
        drop(hold);
        let answer = answer(task).await;
        assert!(answer.is_err(), "not acknowledged: {answer:?}");
    }
    let next = broker.publish("a", request(5, KEEP)).await.expect("ok");
    assert_ne!(next.position.epoch, epoch, "a new epoch after the failure");
    assert!(
        segments(&dir.0).len() > files,
        "the writer left the file whose sync failed"
    );
}

fn holding(channel: &str, user: Option<&str>) -> crate::broker::Holding {
    crate::broker::Holding {
        channel: Arc::from(channel),
        user: user.map(Arc::from),
    }
}

#[tokio::test]
async fn holdings_a_run_left_are_released_by_the_next_ones_first_sweep_until_stored() {
    use crate::broker::TransitionKind::{ChannelVacated, MemberRemoved};
    let dir = TempDir::new();
    let (room, u1) = (holding("room", None), holding("room", Some("u1")));
    let (broker, _) = open_at(&dir, 1 << 20);
    assert!(broker.sweep().await.expect("memory").transitions.is_empty());
    for h in [&room, &u1] {
        assert!(broker.track(h, true).await.expect("memory").is_some());
    }
    // Ends without releasing them (as a crash does).
    drop(broker);
    let kinds = |swept: crate::broker::Swept| -> Vec<_> {
        swept
            .transitions
            .into_iter()
            .map(|t| (t.kind, t.channel.to_string(), t.user.map(|u| u.to_string())))
            .collect()
    };
    let released = || {
        vec![
            (MemberRemoved, "room".to_owned(), Some("u1".to_owned())),
            (ChannelVacated, "room".to_owned(), None),
        ]
    };
    let (broker, _) = open_at(&dir, 1 << 20);
    assert_eq!(kinds(broker.sweep().await.expect("memory")), released());
    assert!(broker.sweep().await.expect("memory").transitions.is_empty());
    // This run holds the channel anew: a transition of its own (the set is this run's).
    assert!(broker.track(&room, true).await.expect("memory").is_some());
    // The releases were not stored durably: kept, and the next run reports them again, with
    // what this run held.
    broker.claimed_stored(false).await.expect("memory");
    drop(broker);
    let (broker, _) = open_at(&dir, 1 << 20);
    assert_eq!(kinds(broker.sweep().await.expect("memory")), released());
    broker.claimed_stored(true).await.expect("memory");
    drop(broker);
    let (broker, _) = open_at(&dir, 1 << 20);
    assert!(broker.sweep().await.expect("memory").transitions.is_empty());
}

#[tokio::test]
async fn a_release_stays_in_the_journal_until_its_event_is_stored() {
    use crate::broker::TransitionKind::ChannelVacated;
    let dir = TempDir::new();
    let (a, b) = (holding("a", None), holding("b", None));
    let (broker, _) = open_at(&dir, 1 << 20);
    assert!(broker.keeps_releases());
    for h in [&a, &b] {
        assert!(broker.track(h, true).await.expect("memory").is_some());
        assert!(broker.track(h, false).await.expect("memory").is_some());
    }
    // `a`'s vacated reached the queue's disk; `b`'s did not (a crash came first).
    broker.release_stored(&a, true).await.expect("memory");
    broker.release_stored(&b, false).await.expect("memory");
    drop(broker);
    let (broker, _) = open_at(&dir, 1 << 20);
    let swept = broker.sweep().await.expect("memory").transitions;
    let got: Vec<_> = swept.iter().map(|t| (t.kind, &*t.channel)).collect();
    assert_eq!(
        got,
        vec![(ChannelVacated, "b")],
        "b's release is reported again"
    );
}
