//! Durable history (`RUSTY_SOCKS_DATA_DIR`) with the real binary: `kill -9` while many
//! publishers publish, restart, and every acknowledged publication is there once, in order, in
//! the same epoch; legacy replay after a restart; a second process on the directory refused;
//! `storage_full` over the API and WebSocket when the quota is reached, and on a really full
//! disk (a tiny tmpfs; needs root).
#![allow(clippy::unwrap_used)]

mod common;

use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::process::{BIN, Logged, clean_env, signal, wait_exit};
use common::*;
use rusty_socks::settings::{Config, Secret};
use serde_json::{Value, json};

const NAMESPACES: &str = r#"{"":{},"busy":{"history_size":100000}}"#;

fn start(dir: &TempDir, fsync: &str) -> (Logged, std::net::SocketAddr) {
    let mut server = Logged::start(&[
        ("RUSTY_SOCKS_DATA_DIR", dir.path()),
        ("RUSTY_SOCKS_FSYNC", fsync),
        ("RUSTY_SOCKS_NAMESPACES", NAMESPACES),
        ("RUSTY_SOCKS_HISTORY_BYTES", "1073741824"),
        ("RUSTY_SOCKS_MAX_CONN_PER_IP", "0"),
    ]);
    let addr = server.address();
    (server, addr)
}

/// The newest history segment (`*.seg`) in `dir`.
fn newest_segment(dir: &TempDir) -> std::path::PathBuf {
    let mut segments: Vec<_> = std::fs::read_dir(&dir.0)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    segments.pop().expect("a segment")
}

/// Publishes without pause (`in_flight` pipelined) until the connection dies, recording the
/// offset of every `published` reply.
/// The epoch of the next `publication` frame `ws` receives (other frames are skipped).
async fn first_publication_epoch(ws: &mut Ws) -> Value {
    loop {
        let frame = recv_json(ws).await;
        if frame["type"] == "publication" {
            assert_ne!(frame["epoch"], "", "{frame}");
            return frame["epoch"].clone();
        }
    }
}

fn publish_forever(mut ws: Ws, channel: &'static str, acked: Arc<Mutex<Vec<u64>>>) {
    tokio::spawn(async move {
        use futures_util::{SinkExt, StreamExt};
        use tokio_tungstenite::tungstenite::Message;
        let command =
            json!({"type":"publish","channel":channel,"data":{"pad":"x".repeat(200)}}).to_string();
        let in_flight = 4;
        for _ in 0..in_flight {
            if ws.send(Message::text(command.clone())).await.is_err() {
                return;
            }
        }
        while let Ok(Some(Ok(Message::Text(text)))) =
            tokio::time::timeout(Duration::from_secs(10), ws.next()).await
        {
            let reply: Value = serde_json::from_str(&text).unwrap();
            assert_eq!(reply["type"], "published", "{reply}");
            acked
                .lock()
                .unwrap()
                .push(reply["offset"].as_u64().unwrap());
            if ws.send(Message::text(command.clone())).await.is_err() {
                return;
            }
        }
    });
}

async fn kill_9_during_publishing(fsync: &str) {
    let dir = TempDir::new();
    let (mut server, addr) = start(&dir, fsync);
    let url = format!("ws://{addr}/ws");
    let channels: [&'static str; 2] = ["busy:a", "busy:b"];
    let mut epochs = Vec::new();
    let mut acked = Vec::new();
    for channel in channels {
        let (mut watcher, _) = v1_client_url(&url).await;
        subscribe(&mut watcher, channel).await;
        // A channel gets its epoch with its first publication, which carries it live.
        publish(&mut watcher, channel, json!("first")).await;
        epochs.push(first_publication_epoch(&mut watcher).await);
        let got = Arc::new(Mutex::new(Vec::new()));
        for _ in 0..6 {
            let (ws, _) = v1_client_url(&url).await;
            publish_forever(ws, channel, Arc::clone(&got));
        }
        acked.push(got);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while acked.iter().any(|a| a.lock().unwrap().len() < 1500) {
        assert!(std::time::Instant::now() < deadline, "publishers stalled");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // SIGKILL while all twelve publishers are still publishing.
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let acknowledged: Vec<Vec<u64>> = acked.iter().map(|a| a.lock().unwrap().clone()).collect();

    let (mut server, addr) = start(&dir, fsync);
    let url = format!("ws://{addr}/ws");
    for (i, channel) in channels.iter().enumerate() {
        let (mut ws, _) = v1_client_url(&url).await;
        let sub = call(
            &mut ws,
            json!({"type":"subscribe","id":1,"channel":channel,"since":{"offset":0,"epoch":epochs[i]}}),
        )
        .await;
        assert_eq!(sub["type"], "subscribed", "{sub}");
        assert_eq!(
            sub["recovered"], true,
            "{channel}: same epoch, nothing missing"
        );
        assert_eq!(sub["epoch"], epochs[i]);
        let got = offsets(&sub["publications"]);
        let head = sub["offset"].as_u64().unwrap();
        assert_sequence(&got, 1..=head, channel);
        let highest = *acknowledged[i].iter().max().unwrap();
        assert!(
            head >= highest,
            "{channel}: acknowledged up to {highest}, recovered up to {head}"
        );
        // Offsets continue after the restart in the same epoch.
        let next = publish(&mut ws, channel, json!("after")).await;
        assert_eq!(next, head + 1);
    }
    signal(&server.child, "TERM");
    assert!(wait_exit(&mut server.child, WAIT).success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_publishing_loses_no_acknowledged_publication_fsync_always() {
    kill_9_during_publishing("always").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_publishing_loses_no_acknowledged_publication_fsync_never() {
    // `never` still writes before acknowledging: a crash of the process loses nothing.
    kill_9_during_publishing("never").await;
}

#[tokio::test]
async fn legacy_chat_is_replayed_after_a_restart() {
    let dir = TempDir::new();
    let (mut server, addr) = start(&dir, "always");
    let url = format!("ws://{addr}/ws");
    let (mut a, _) = join_url(&url).await;
    let (mut b, _) = join_url(&url).await;
    for n in 0..3 {
        send_text(
            &mut a,
            &json!({"sender":"a","content":format!("m{n}")}).to_string(),
        )
        .await;
        // b receiving it means it was stored (the store is acknowledged before delivery).
        assert_eq!(recv_json(&mut b).await["content"], format!("m{n}"));
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let (mut server, addr) = start(&dir, "always");
    let (mut c, _) = join_url(&format!("ws://{addr}/ws")).await;
    for n in 0..3 {
        let replayed = recv_json(&mut c).await;
        assert_eq!(replayed["type"], "Chat", "{replayed}");
        assert_eq!(replayed["content"], format!("m{n}"));
    }
    signal(&server.child, "TERM");
    assert!(wait_exit(&mut server.child, WAIT).success());
}

#[test]
fn a_second_process_on_the_same_directory_is_refused_naming_the_setting() {
    let dir = TempDir::new();
    let (mut first, _) = start(&dir, "always");
    let mut cmd = Command::new(BIN);
    clean_env(&mut cmd)
        .env("RUSTY_SOCKS_HOST", "127.0.0.1")
        .env("RUSTY_SOCKS_PORT", "0")
        .env("RUSTY_SOCKS_DATA_DIR", dir.path())
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut second = common::process::Reap(cmd.spawn().unwrap());
    let status = wait_exit(&mut second, Duration::from_secs(10));
    assert!(!status.success());
    let mut text = String::new();
    use std::io::Read;
    second
        .stdout
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    second
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut text)
        .unwrap();
    assert!(
        text.contains("RUSTY_SOCKS_DATA_DIR") && text.contains("in use"),
        "{text}"
    );
    signal(&first.child, "TERM");
    assert!(wait_exit(&mut first.child, WAIT).success());
}

const KEY: &str = "api-key-0123456789abcdef";

#[tokio::test]
async fn a_full_quota_answers_storage_full_while_delivery_and_reads_go_on() {
    let dir = TempDir::new();
    let data_dir = dir.0.clone();
    let server = TestServer::start(move |config: &mut Config| {
        config.data_dir = Some(data_dir);
        config.data_max_bytes = 8192;
        config.api_key = Some(Secret(KEY.into()));
    })
    .await;
    let (mut sub, _) = v1_client(&server).await;
    let subscribed = subscribe(&mut sub, "room").await;
    let (mut publisher, _) = v1_client(&server).await;
    let mut last = 0;
    let refused = loop {
        let reply = call(
            &mut publisher,
            json!({"type":"publish","id":"p","channel":"room","data":"y".repeat(300)}),
        )
        .await;
        if reply["type"] != "published" {
            break reply;
        }
        last = reply["offset"].as_u64().unwrap();
        assert!(last < 100, "the quota never applied");
    };
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "storage_full", "{refused}");
    assert!(last > 5);
    let (status, body) = api_post_keyed(
        KEY,
        &server,
        "/api/publish",
        &json!({"channel":"room","data":"z".repeat(400)}),
    )
    .await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "storage_full");
    // The subscriber got every acknowledged publication, and nothing that was refused.
    for offset in 1..=last {
        let push = recv_json(&mut sub).await;
        assert_eq!(push["offset"], offset, "{push}");
    }
    // Reads go on.
    let page = call(
        &mut publisher,
        json!({"type":"history","id":"h","channel":"room","since":{"offset":0,"epoch":subscribed["epoch"]}}),
    )
    .await;
    assert_eq!(
        offsets(&page["publications"]),
        (1..=last).collect::<Vec<_>>()
    );
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_during_publishing_loses_no_acknowledged_publication_fsync_interval() {
    kill_9_during_publishing("interval").await;
}

#[tokio::test]
async fn a_damaged_tail_is_cut_and_logged_and_the_server_starts() {
    let dir = TempDir::new();
    let (mut server, addr) = start(&dir, "always");
    let (mut watcher, _) = v1_client_url(&format!("ws://{addr}/ws")).await;
    subscribe(&mut watcher, "busy:t").await;
    let (mut ws, _) = v1_client_url(&format!("ws://{addr}/ws")).await;
    for n in 1..=5 {
        assert_eq!(publish(&mut ws, "busy:t", json!(n)).await, n);
    }
    let epoch = first_publication_epoch(&mut watcher).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let last = newest_segment(&dir);
    // Garbage after the last record, as a torn write leaves it.
    let mut bytes = std::fs::read(&last).unwrap();
    let whole = bytes.len();
    bytes.extend_from_slice(&[0x55; 37]);
    std::fs::write(&last, &bytes).unwrap();
    let (mut server, addr) = start(&dir, "always");
    let line = server.wait_for("cut a damaged tail");
    assert!(line.contains("lost_bytes=37"), "{line}");
    assert_eq!(std::fs::metadata(&last).unwrap().len(), whole as u64);
    let (mut ws, _) = v1_client_url(&format!("ws://{addr}/ws")).await;
    let sub = call(
        &mut ws,
        json!({"type":"subscribe","id":1,"channel":"busy:t","since":{"offset":2,"epoch":epoch}}),
    )
    .await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(offsets(&sub["publications"]), vec![3, 4, 5]);
    signal(&server.child, "TERM");
    assert!(wait_exit(&mut server.child, WAIT).success());
}

#[tokio::test]
async fn after_kill_9_the_preallocated_zero_tail_is_the_end_not_damage() {
    let dir = TempDir::new();
    let (mut server, addr) = start(&dir, "always");
    let (mut ws, _) = v1_client_url(&format!("ws://{addr}/ws")).await;
    for n in 1..=5 {
        assert_eq!(publish(&mut ws, "busy:z", json!(n)).await, n);
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let last = newest_segment(&dir);
    let bytes = std::fs::read(&last).unwrap();
    assert_eq!(
        bytes.len(),
        16 << 20,
        "the open segment was preallocated to RUSTY_SOCKS_DATA_SEGMENT_BYTES"
    );
    assert!(bytes[bytes.len() - 4096..].iter().all(|&b| b == 0));
    let (mut server, addr) = start(&dir, "always");
    let line = server.wait_for("durable history recovered");
    assert!(line.contains("cut_bytes=0"), "{line}");
    assert!(
        !server.seen.iter().any(|l| l.contains("cut a damaged")),
        "zeros are not damage: {:#?}",
        server.seen
    );
    assert!(
        std::fs::metadata(&last).unwrap().len() < 16 << 20,
        "the zeros are cut off"
    );
    let (mut ws, _) = v1_client_url(&format!("ws://{addr}/ws")).await;
    let subscribed = call(
        &mut ws,
        json!({"type":"subscribe","id":1,"channel":"busy:z"}),
    )
    .await;
    let page = call(
        &mut ws,
        json!({"type":"history","id":"h","channel":"busy:z","since":{"offset":0,"epoch":subscribed["epoch"]}}),
    )
    .await;
    assert_eq!(
        offsets(&page["publications"]),
        vec![1, 2, 3, 4, 5],
        "{page}"
    );
    assert_eq!(publish(&mut ws, "busy:z", json!(6)).await, 6);
    signal(&server.child, "TERM");
    assert!(wait_exit(&mut server.child, WAIT).success());
}

/// A 256 KiB tmpfs mounted on a fresh directory, unmounted when dropped.
struct Tmpfs(TempDir);

impl Tmpfs {
    fn mount() -> Self {
        let dir = TempDir::new();
        std::fs::create_dir_all(&dir.0).unwrap();
        let status = Command::new("mount")
            .args(["-t", "tmpfs", "-o", "size=256k", "tmpfs", dir.path()])
            .status()
            .unwrap();
        assert!(status.success(), "mount -t tmpfs failed: needs root");
        Self(dir)
    }

    /// Fills the file system with `filler` until the disk is full (`ENOSPC`).
    fn fill(&self, filler: &std::path::Path) {
        use std::io::Write;
        let mut file = std::fs::File::create(filler).unwrap();
        let chunk = vec![0u8; 1024];
        loop {
            if let Err(err) = file.write_all(&chunk).and_then(|()| file.flush()) {
                assert_eq!(err.raw_os_error(), Some(28), "{err}");
                return;
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(self.0.path()).status();
    }
}

/// The next `publication` frame on `channel` (other frames are skipped).
async fn next_publication_on(ws: &mut Ws, channel: &str) -> Value {
    loop {
        let frame = recv_json(ws).await;
        if frame["type"] == "publication" && frame["channel"] == channel {
            return frame;
        }
    }
}

/// The real `ENOSPC`: the data directory on a tiny tmpfs that the test fills up. Publishes to
/// channels with history fail with `storage_full`; delivery to connected clients and history
/// reads go on; once space is freed, publishing works again.
#[tokio::test]
#[ignore = "needs root to mount a tmpfs"]
async fn a_full_disk_answers_storage_full_and_publishing_resumes_once_space_is_freed() {
    let disk = Tmpfs::mount();
    let mut server = Logged::start(&[
        ("RUSTY_SOCKS_DATA_DIR", disk.0.path()),
        ("RUSTY_SOCKS_FSYNC", "always"),
        (
            "RUSTY_SOCKS_NAMESPACES",
            r#"{"":{},"live":{"history_size":0}}"#,
        ),
        ("RUSTY_SOCKS_MAX_CONN_PER_IP", "0"),
    ]);
    let url = format!("ws://{}/ws", server.address());
    let (mut watcher, _) = v1_client_url(&url).await;
    subscribe(&mut watcher, "room").await;
    subscribe(&mut watcher, "live:x").await;
    let (mut publisher, _) = v1_client_url(&url).await;
    let mut epoch = Value::Null;
    for n in 1..=3 {
        assert_eq!(
            publish(&mut publisher, "room", json!("y".repeat(300))).await,
            n
        );
        let pushed = next_publication_on(&mut watcher, "room").await;
        assert_eq!(pushed["offset"], n);
        epoch = pushed["epoch"].clone();
    }
    let filler = disk.0.0.join("filler");
    disk.fill(&filler);

    // What is left of the segment's last page fills up first: then the disk refuses.
    let mut refused = None;
    for _ in 0..50 {
        let reply = call(
            &mut publisher,
            json!({"type":"publish","id":"p","channel":"other","data":"z".repeat(300)}),
        )
        .await;
        if reply["type"] != "published" {
            refused = Some(reply);
            break;
        }
    }
    let refused = refused.expect("the full disk never refused a publish");
    assert_eq!(refused["type"], "error", "{refused}");
    assert_eq!(refused["code"], "storage_full", "{refused}");
    server.wait_for("write failed");

    // History reads go on.
    let page = call(
        &mut publisher,
        json!({"type":"history","id":"h","channel":"room","since":{"offset":0,"epoch":epoch}}),
    )
    .await;
    assert_eq!(offsets(&page["publications"]), vec![1, 2, 3], "{page}");
    // Delivery of what needs no disk goes on.
    publish(&mut publisher, "live:x", json!("still live")).await;
    assert_eq!(
        next_publication_on(&mut watcher, "live:x").await["data"],
        "still live"
    );

    // Space freed: publishing works again, and `room` continues where it was.
    std::fs::remove_file(&filler).unwrap();
    publish(&mut publisher, "other", json!("z".repeat(300))).await;
    assert_eq!(publish(&mut publisher, "room", json!("after")).await, 4);
    let pushed = next_publication_on(&mut watcher, "room").await;
    assert_eq!(pushed["offset"], 4);
    assert_eq!(pushed["epoch"], epoch);
    signal(&server.child, "TERM");
    assert!(wait_exit(&mut server.child, WAIT).success());
}

/// Compaction with the real binary: a quiet channel's records pin the oldest segment while a
/// channel that keeps 5 publications fills many small segments. The sweep copies the quiet
/// records forward and deletes the old segments; `kill -9` right after a compaction (while
/// publishers go on, so another may be under way), restart: the quiet channel comes back
/// once, in order, same epoch (`recovered: true`), and the busy one continues after every
/// acknowledged offset in its epoch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_right_after_compaction_recovers_the_copied_records_once() {
    let dir = TempDir::new();
    let settings = [
        ("RUSTY_SOCKS_DATA_DIR", dir.path()),
        ("RUSTY_SOCKS_FSYNC", "always"),
        (
            "RUSTY_SOCKS_NAMESPACES",
            r#"{"":{},"busy":{"history_size":100000},"small":{"history_size":5}}"#,
        ),
        ("RUSTY_SOCKS_DATA_SEGMENT_BYTES", "16384"),
        ("RUSTY_SOCKS_MAX_CONN_PER_IP", "0"),
    ];
    let mut server = Logged::start(&settings);
    let url = format!("ws://{}/ws", server.address());
    let (mut watcher, _) = v1_client_url(&url).await;
    let (mut publisher, _) = v1_client_url(&url).await;
    subscribe(&mut watcher, "busy:quiet").await;
    for n in 1..=3 {
        assert_eq!(publish(&mut publisher, "busy:quiet", json!(n)).await, n);
    }
    let quiet_epoch = first_publication_epoch(&mut watcher).await;
    let (mut watcher, _) = v1_client_url(&url).await;
    subscribe(&mut watcher, "small:x").await;
    publish(&mut publisher, "small:x", json!("first")).await;
    let small_epoch = first_publication_epoch(&mut watcher).await;
    let acked = Arc::new(Mutex::new(Vec::new()));
    for _ in 0..4 {
        let (ws, _) = v1_client_url(&url).await;
        publish_forever(ws, "small:x", Arc::clone(&acked));
    }
    // Blocks this worker only; the publishers run on the others.
    server.wait_for("compacted the oldest segment");
    tokio::time::sleep(Duration::from_millis(50)).await;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let highest = acked.lock().unwrap().iter().copied().max().unwrap_or(1);
    assert!(
        !dir.0.join(format!("{:016x}.seg", 1)).exists(),
        "the oldest segment was compacted away"
    );

    let mut server = Logged::start(&settings);
    let url = format!("ws://{}/ws", server.address());
    let (mut ws, _) = v1_client_url(&url).await;
    let sub = call(
        &mut ws,
        json!({"type":"subscribe","id":1,"channel":"busy:quiet","since":{"offset":0,"epoch":quiet_epoch}}),
    )
    .await;
    assert_eq!(sub["recovered"], true, "{sub}");
    assert_eq!(sub["epoch"], quiet_epoch);
    assert_eq!(offsets(&sub["publications"]), vec![1, 2, 3], "{sub}");
    let next = publish(&mut ws, "small:x", json!("after")).await;
    assert!(next > highest, "acknowledged up to {highest}, next {next}");
    let sub = call(
        &mut ws,
        json!({"type":"subscribe","id":2,"channel":"small:x","since":{"offset":next - 1,"epoch":small_epoch}}),
    )
    .await;
    assert_eq!(sub["recovered"], true, "same epoch after compaction: {sub}");
    assert_eq!(offsets(&sub["publications"]), vec![next], "{sub}");
    assert_eq!(publish(&mut ws, "busy:quiet", json!(4)).await, 4);
    signal(&server.child, "TERM");
    assert!(wait_exit(&mut server.child, WAIT).success());
}
