//! Storage for durable history, measured: the durable memory broker (its segmented log with
//! group commit) against redb (a maintained embedded B-tree store) doing the same job, then
//! the broker's acknowledged publishes per second and publish-to-acknowledgement latency for
//! each `RUSTY_SOCKS_FSYNC` mode against the in-memory broker, with 1, 10 and 100 concurrent
//! publishers.
//!
//! `cargo run --release -p rusty-bench --bin storage -- [dir] [seconds per cell]`
//! (dir defaults to `target/storage-bench`; it must be on a real disk, not tmpfs, or syncs
//! cost nothing). Publishers publish 200-byte values on a channel of their own, each waiting
//! for its acknowledgement before the next, which is what a client awaiting `published` does.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};
use rusty_socks::broker::durable::{DurableOptions, FsyncMode};
use rusty_socks::broker::history::HistoryLimits;
use rusty_socks::broker::memory::MemoryBroker;
use rusty_socks::broker::{Broker, BrokerEvents, ClientInfo, PublishRequest};
use rusty_socks::types::Publication;
use serde_json::value::RawValue;
use tokio::sync::{mpsc, oneshot};

struct Quiet;

impl BrokerEvents for Quiet {
    fn on_publication(&self, _: &str, _: &str, _: &Publication) {}
    fn on_join(&self, _: &str, _: &ClientInfo) {}
    fn on_leave(&self, _: &str, _: &ClientInfo) {}
    fn on_gap(&self, _: &str) {}
}

const LIMITS: HistoryLimits = HistoryLimits {
    size: 1000,
    ttl: None,
    max_bytes: 1 << 20,
};

fn data() -> Arc<RawValue> {
    let text = format!("{{\"pad\":\"{}\"}}", "x".repeat(190));
    Arc::from(RawValue::from_string(text).expect("JSON"))
}

/// Throughput and latency of `publishers` tasks calling `publish` for `secs`.
struct Cell {
    per_sec: f64,
    p50: Duration,
    p99: Duration,
}

async fn drive<F, Fut>(publishers: usize, secs: f64, publish: F) -> Cell
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let publish = Arc::new(publish);
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let tasks: Vec<_> = (0..publishers)
        .map(|p| {
            let (publish, stop) = (Arc::clone(&publish), Arc::clone(&stop));
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    n += 1;
                    let at = Instant::now();
                    publish(p, n).await;
                    latencies.push(at.elapsed());
                    // The in-memory broker answers at once: let the timer and the others run.
                    tokio::task::yield_now().await;
                }
                latencies
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs_f64(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("publisher"));
    }
    let elapsed = started.elapsed().as_secs_f64();
    all.sort_unstable();
    let at = |q: f64| all[((all.len() as f64 * q) as usize).min(all.len() - 1)];
    Cell {
        per_sec: all.len() as f64 / elapsed,
        p50: at(0.50),
        p99: at(0.99),
    }
}

fn fresh(dir: &Path, name: &str) -> PathBuf {
    let path = dir.join(name);
    let _ = std::fs::remove_dir_all(&path);
    std::fs::create_dir_all(&path).expect("bench dir");
    path
}

fn dir_bytes(path: &Path) -> u64 {
    std::fs::read_dir(path)
        .map(|d| {
            d.filter_map(|e| e.ok()?.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

async fn broker_cell(dir: &Path, fsync: Option<FsyncMode>, publishers: usize, secs: f64) -> Cell {
    let broker: Arc<MemoryBroker> = match fsync {
        None => Arc::new(MemoryBroker::new(Arc::new(Quiet), 1 << 30)),
        Some(fsync) => {
            let options = DurableOptions {
                dir: fresh(dir, "log"),
                fsync,
                max_bytes: 0,
                segment_bytes: 16 << 20,
            };
            MemoryBroker::open(Arc::new(Quiet), 1 << 30, options).expect("opens")
        }
    };
    let data = data();
    let channels: Arc<Vec<String>> =
        Arc::new((0..publishers).map(|p| format!("bench:{p}")).collect());
    drive(publishers, secs, move |p, _| {
        let (broker, data, channels) = (
            Arc::clone(&broker),
            Arc::clone(&data),
            Arc::clone(&channels),
        );
        async move {
            let request = PublishRequest {
                data,
                client_id: None,
                history: LIMITS,
                idempotency: None,
            };
            broker
                .publish(&channels[p], request)
                .await
                .expect("published");
        }
    })
    .await
}

const TABLE: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("history");

type Job = (String, u64, Vec<u8>, oneshot::Sender<()>);

/// redb with the same group commit: one writer thread takes every queued record into one
/// write transaction and commits it (fsync with `Durability::Immediate`).
fn redb_writer(path: &Path, immediate: bool) -> mpsc::UnboundedSender<Job> {
    let db = Database::create(path.join("history.redb")).expect("redb");
    let (tx, mut rx) = mpsc::unbounded_channel::<Job>();
    std::thread::spawn(move || {
        while let Some(first) = rx.blocking_recv() {
            let mut batch = vec![first];
            while let Ok(job) = rx.try_recv() {
                batch.push(job);
            }
            let mut txn = db.begin_write().expect("txn");
            txn.set_durability(if immediate {
                Durability::Immediate
            } else {
                Durability::None
            })
            .expect("durability");
            {
                let mut table = txn.open_table(TABLE).expect("table");
                for (channel, offset, bytes, _) in &batch {
                    table
                        .insert((channel.as_str(), *offset), bytes.as_slice())
                        .expect("insert");
                }
            }
            txn.commit().expect("commit");
            for (.., done) in batch {
                let _ = done.send(());
            }
        }
    });
    tx
}

async fn redb_cell(dir: &Path, publishers: usize, secs: f64) -> (Cell, u64, u64) {
    let path = fresh(dir, "redb");
    let writer = redb_writer(&path, true);
    let bytes = data().get().as_bytes().to_vec();
    let written = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let count = Arc::clone(&written);
    let cell = drive(publishers, secs, move |p, n| {
        let (writer, bytes, count) = (writer.clone(), bytes.clone(), Arc::clone(&count));
        async move {
            let (done, ack) = oneshot::channel();
            writer
                .send((format!("bench:{p}"), n, bytes, done))
                .expect("writer");
            ack.await.expect("committed");
            count.fetch_add(1, Ordering::Relaxed);
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    (cell, written.load(Ordering::Relaxed), dir_bytes(&path))
}

/// Time to open and read back everything: redb (a full scan) and the log (recovery).
fn reopen_redb(dir: &Path) -> (Duration, u64) {
    let at = Instant::now();
    let db = Database::create(dir.join("redb").join("history.redb")).expect("redb");
    let txn = db.begin_read().expect("read");
    let table = txn.open_table(TABLE).expect("table");
    let mut n = 0;
    for row in table.iter().expect("iter") {
        let (_, value) = row.expect("row");
        n += value.value().len() as u64 / 200 + 1;
    }
    (at.elapsed(), n)
}

fn fmt(cell: &Cell) -> String {
    format!(
        "{:>9.0}/s  p50 {:>7.2} ms  p99 {:>7.2} ms",
        cell.per_sec,
        cell.p50.as_secs_f64() * 1e3,
        cell.p99.as_secs_f64() * 1e3
    )
}

/// Startup with 10,000 channels and about 1 GB of history: written with `never`, then the
/// time `MemoryBroker::open` takes to recover it (the page cache is warm: the files were just
/// written; a cold cache adds the disk's read time for the same bytes).
async fn startup(dir: &Path, keep: bool) {
    let path = dir.join("startup");
    let reuse = keep && path.join("LOCK").exists();
    if !reuse {
        fresh(dir, "startup");
    }
    let options = DurableOptions {
        dir: path.clone(),
        fsync: FsyncMode::Never,
        max_bytes: 0,
        segment_bytes: 64 << 20,
    };
    let limits = HistoryLimits {
        size: 100,
        ttl: None,
        max_bytes: 1 << 20,
    };
    let big: Arc<RawValue> =
        Arc::from(RawValue::from_string(format!("\"{}\"", "y".repeat(1000))).expect("JSON"));
    let broker = MemoryBroker::open(Arc::new(Quiet), 4 << 30, options.clone()).expect("opens");
    let at = Instant::now();
    let tasks: Vec<_> = (0..if reuse { 0 } else { 100 })
        .map(|t| {
            let (broker, big) = (Arc::clone(&broker), Arc::clone(&big));
            tokio::spawn(async move {
                for c in (t..10_000).step_by(100) {
                    let channel = format!("startup:{c}");
                    for _ in 0..100 {
                        let request = PublishRequest {
                            data: Arc::clone(&big),
                            client_id: None,
                            history: limits,
                            idempotency: None,
                        };
                        broker.publish(&channel, request).await.expect("published");
                    }
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("writer");
    }
    let wrote = at.elapsed();
    drop(broker);
    let bytes = dir_bytes(&path);
    let at = Instant::now();
    let broker = MemoryBroker::open(Arc::new(Quiet), 4 << 30, options).expect("reopens");
    let opened = at.elapsed();
    let page = broker
        .history("startup:9999", Some(0), 1000)
        .await
        .expect("reads");
    assert_eq!(page.publications.len(), 100);
    println!(
        "startup: 10,000 channels x 100 publications of 1 kB = {} MB on disk (written in {:.1} s); open + recover {:.2} s",
        bytes >> 20,
        wrote.as_secs_f64(),
        opened.as_secs_f64()
    );
    drop(broker);
    if !keep {
        let _ = std::fs::remove_dir_all(&path);
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().unwrap_or_else(|| "target/storage-bench".into()));
    let secs: f64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(3.0);
    std::fs::create_dir_all(&dir).expect("bench dir");
    match args.next().as_deref() {
        Some("startup") => return startup(&dir, false).await,
        // Keeps the written directory and reuses it on the next run (for profiling recovery).
        Some("startup-keep") => return startup(&dir, true).await,
        // One cell: `cell always|interval|never|memory PUBLISHERS` (for before/after runs).
        Some("cell") => {
            let mode = match args.next().as_deref() {
                Some("memory") => None,
                Some("interval") => Some(FsyncMode::Interval(Duration::from_millis(100))),
                Some("never") => Some(FsyncMode::Never),
                _ => Some(FsyncMode::Always),
            };
            let publishers = args.next().and_then(|s| s.parse().ok()).unwrap_or(100);
            let cell = broker_cell(&dir, mode, publishers, secs).await;
            println!("{mode:?} {publishers:>3} publishers  {}", fmt(&cell));
            let _ = std::fs::remove_dir_all(dir.join("log"));
            return;
        }
        _ => {}
    }
    println!(
        "# storage bench: {secs} s per cell, 200-byte publications, dir {}",
        dir.display()
    );

    println!("\n## engines: group commit with fsync per batch (acknowledged writes)");
    for publishers in [1, 10, 100] {
        let log = broker_cell(&dir, Some(FsyncMode::Always), publishers, secs).await;
        let log_bytes = dir_bytes(&dir.join("log"));
        let (redb, rows, redb_bytes) = redb_cell(&dir, publishers, secs).await;
        println!(
            "{publishers:>3} publishers  log:  {}  ({} MB on disk)",
            fmt(&log),
            log_bytes >> 20
        );
        println!(
            "{publishers:>3} publishers  redb: {}  ({} MB on disk for {rows} rows)",
            fmt(&redb),
            redb_bytes >> 20
        );
        if publishers == 100 {
            let at = Instant::now();
            let options = DurableOptions {
                dir: dir.join("log"),
                fsync: FsyncMode::Always,
                max_bytes: 0,
                segment_bytes: 16 << 20,
            };
            let broker = MemoryBroker::open(Arc::new(Quiet), 1 << 30, options).expect("reopens");
            let log_open = at.elapsed();
            drop(broker);
            let (redb_open, _) = reopen_redb(&dir);
            println!(
                "reopen and read all: log {:.0} ms ({} MB), redb {:.0} ms ({} MB)",
                log_open.as_secs_f64() * 1e3,
                log_bytes >> 20,
                redb_open.as_secs_f64() * 1e3,
                redb_bytes >> 20
            );
        }
    }

    println!("\n## the broker: acknowledged publishes per RUSTY_SOCKS_FSYNC mode");
    let modes: [(&str, Option<FsyncMode>); 4] = [
        ("memory (no data dir)", None),
        ("always", Some(FsyncMode::Always)),
        (
            "interval 100 ms",
            Some(FsyncMode::Interval(Duration::from_millis(100))),
        ),
        ("never", Some(FsyncMode::Never)),
    ];
    for (name, mode) in modes {
        for publishers in [1, 10, 100] {
            let cell = broker_cell(&dir, mode, publishers, secs).await;
            println!("{name:<21} {publishers:>3} publishers  {}", fmt(&cell));
        }
    }
    let _ = std::fs::remove_dir_all(dir.join("log"));
    let _ = std::fs::remove_dir_all(dir.join("redb"));
}
