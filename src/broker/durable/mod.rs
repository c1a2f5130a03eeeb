//! Durable history for the memory broker (`RUSTY_SOCKS_DATA_DIR`).
//!
//! The memory broker keeps serving history from memory; this module makes it survive a
//! restart. Every publication on a channel that keeps history is encoded as a checksummed
//! [`record::Record`] and appended to one segmented log ([`log`]) by a single writer thread
//! that batches concurrent appends and syncs once per batch (group commit). A publish is
//! acknowledged only after its record is durable according to [`FsyncMode`]; subscribers get
//! the publication as soon as it is written, before the sync. At startup [`recovery`] reads
//! every segment once, cuts damaged tails and rebuilds the streams, epochs included.
//!
//! The directory is locked (`LOCK`, an advisory `flock`) for the life of the broker: a second
//! process on it is refused at startup.

pub mod broker;
mod compact;
#[cfg(test)]
mod compact_tests;
#[cfg(test)]
mod consistency_tests;
pub mod holdings;
pub mod log;
#[cfg(test)]
mod log_tests;
pub mod record;
pub mod recovery;
#[cfg(test)]
mod tests;

use std::fs::{File, OpenOptions};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::Sender;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use log::{Ack, Append, Command, MAGIC, Segments, Writer, segment_path};
use record::Record;
use recovery::Recovered;

use crate::broker::BrokerEvents;
use crate::broker::history::{HistoryLimits, new_epoch};
use crate::types::Publication;

/// When an acknowledged publication is on stable storage (`RUSTY_SOCKS_FSYNC`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncMode {
    /// Synced before the acknowledgement; concurrent publishes share one sync.
    Always,
    /// Written (in the OS cache) before the acknowledgement, synced at least this often:
    /// a process crash loses nothing, a power loss at most this window.
    Interval(Duration),
    /// Written before the acknowledgement; the OS decides when it reaches the disk.
    Never,
}

/// The durable store's options (built from the settings).
#[derive(Debug, Clone)]
pub struct DurableOptions {
    /// `RUSTY_SOCKS_DATA_DIR`.
    pub dir: PathBuf,
    /// `RUSTY_SOCKS_FSYNC` and `RUSTY_SOCKS_FSYNC_INTERVAL_MS`.
    pub fsync: FsyncMode,
    /// `RUSTY_SOCKS_DATA_MAX_BYTES`: most bytes of segments on disk (0 = only the disk's size).
    pub max_bytes: u64,
    /// `RUSTY_SOCKS_DATA_SEGMENT_BYTES`: a segment is sealed past this size; the unit in
    /// which history is deleted from disk.
    pub segment_bytes: u64,
}

/// Why a publication could not be made durable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StorageError {
    /// `RUSTY_SOCKS_DATA_MAX_BYTES` is reached or the disk is full.
    #[error("storage full: {0}")]
    Full(String),
    /// Any other I/O failure.
    #[error("storage failed: {0}")]
    Io(String),
}

/// What a segment holds of one channel: (channel, epoch, highest offset).
pub type Held = (Arc<str>, Arc<str>, u64);

/// The open data directory: the writer's queue, the quota and the segment map.
pub struct Durable {
    queue: Mutex<Option<Sender<Command>>>,
    writer: Mutex<Option<std::thread::JoinHandle<()>>>,
    bytes: Arc<AtomicU64>,
    segments: Segments,
    options: DurableOptions,
    /// The pinned segment compaction last found not worth copying, and when: it is read
    /// again only after [`compact::RECHECK`].
    compact_checked: Mutex<Option<(u64, Instant)>>,
    /// Held by a sweep: one at a time (a compaction must not copy a segment twice).
    pub(super) sweeping: Mutex<()>,
    /// Tests: compaction copies but does not delete (a crash between the two).
    #[cfg(test)]
    pub(super) compact_keeps: std::sync::atomic::AtomicBool,
    /// Held for the broker's life: the `flock` is the lock.
    _lock: File,
}

impl std::fmt::Debug for Durable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Durable")
            .field("dir", &self.options.dir)
            .finish_non_exhaustive()
    }
}

/// Milliseconds since the UNIX epoch now.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Creates `dir` if needed and takes its lock (`<dir>/LOCK`, an advisory `flock`), held as
/// long as the returned file is open. The durable history takes it, and so does the webhook
/// queue alone when the broker is Redis or NATS: one process per directory either way. The
/// error names `RUSTY_SOCKS_DATA_DIR`.
pub fn lock_dir(dir: &std::path::Path) -> Result<File, String> {
    let why = |what: &str, err: std::io::Error| {
        format!("RUSTY_SOCKS_DATA_DIR: {what} {}: {err}", dir.display())
    };
    std::fs::create_dir_all(dir).map_err(|e| why("cannot create", e))?;
    let lock_path = dir.join("LOCK");
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| why("cannot open the lock file in", e))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(format!(
            "RUSTY_SOCKS_DATA_DIR: {} is in use by another process (lock file {})",
            dir.display(),
            lock_path.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => Err(why("cannot lock", e)),
    }
}

impl Durable {
    /// Locks the directory, recovers what it holds and starts the writer. Errors name the
    /// setting: the server does not start without its data.
    pub fn open(
        options: DurableOptions,
        events: Arc<dyn BrokerEvents>,
    ) -> Result<(Self, Recovered), String> {
        let dir = &options.dir;
        let why = |what: &str, err: std::io::Error| {
            format!("RUSTY_SOCKS_DATA_DIR: {what} {}: {err}", dir.display())
        };
        let lock = lock_dir(dir)?;
        let started = Instant::now();
        let recovered = recovery::recover(dir).map_err(|e| why("cannot read", e))?;
        let on_disk: u64 = recovered.segments.values().map(|s| s.bytes).sum();
        tracing::info!(
            channels = recovered.channels.len(),
            records = recovered.records,
            segments = recovered.segments.len(),
            bytes = on_disk,
            cut_bytes = recovered.cut_bytes,
            ms = started.elapsed().as_millis() as u64,
            "durable history recovered from {}",
            dir.display()
        );
        let bytes = Arc::new(AtomicU64::new(on_disk));
        let segments: Segments = Arc::new(Mutex::new(recovered.segments.clone()));
        let writer = Writer {
            dir: dir.clone(),
            fsync: options.fsync,
            segment_bytes: options.segment_bytes,
            file: None,
            seq: recovered.last_seq,
            len: 0,
            events,
            segments: Arc::clone(&segments),
            bytes: Arc::clone(&bytes),
            last_sync: Instant::now(),
            unsynced: false,
            failed: std::collections::HashSet::new(),
            since_sync: Vec::new(),
            preallocated: false,
            next: None,
            sealing_failed: None,
            #[cfg(test)]
            fail_next_write: false,
            #[cfg(test)]
            fail_next_sync: false,
        };
        let (queue, receiver) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("rusty-socks-log".into())
            .spawn(move || writer.run(receiver))
            .map_err(|e| why("cannot start the log writer for", e))?;
        let durable = Self {
            queue: Mutex::new(Some(queue)),
            writer: Mutex::new(Some(thread)),
            bytes,
            segments,
            options,
            compact_checked: Mutex::new(None),
            sweeping: Mutex::new(()),
            #[cfg(test)]
            compact_keeps: std::sync::atomic::AtomicBool::new(false),
            _lock: lock,
        };
        // Channels forgotten because of damage: a record of a fresh epoch, so that a later
        // restart (which no longer sees the repaired damage) does not bring the old one back.
        for name in &recovered.forgotten {
            let record = Record {
                channel: name.clone(),
                epoch: new_epoch(),
                offset: 1,
                time_ms: wall_ms(),
                limits: HistoryLimits {
                    size: 0,
                    ttl: None,
                    max_bytes: 0,
                },
                client_id: None,
                key: None,
                data: None,
            };
            let epoch: Arc<str> = Arc::from(record.epoch.as_str());
            let mut buf = Vec::new();
            record.encode(&mut buf);
            // Queued before any publication, past the quota if need be; a failure is
            // logged by the writer.
            let _ = durable.reserve(buf.len(), true);
            let _ = durable.append(buf, Arc::from(name.as_str()), epoch, 1, None, None);
        }
        Ok((durable, recovered))
    }

    /// Reserves room for a record of `len` bytes and the header of the segment it may have
    /// to start ([`MAGIC`]): refused, atomically, when that would take the bytes on disk plus
    /// those reserved past `RUSTY_SOCKS_DATA_MAX_BYTES` (`force` skips the check, for the
    /// bookkeeping records of recovery). The reservation is handed to [`Self::append`]: the
    /// writer keeps what reaches the disk and gives the rest back, a failure gives all back.
    /// So the segment files never total more than the quota.
    pub fn reserve(&self, len: usize, force: bool) -> Result<(), StorageError> {
        let need = (len + MAGIC.len()) as u64;
        let max = self.options.max_bytes;
        if force || max == 0 {
            self.bytes.fetch_add(need, Ordering::Relaxed);
            return Ok(());
        }
        self.bytes
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(need).filter(|total| *total <= max)
            })
            .map(|_| ())
            .map_err(|_| StorageError::Full(format!("RUSTY_SOCKS_DATA_MAX_BYTES ({max}) reached")))
    }

    /// Queues an encoded record whose room was [reserved](Self::reserve). Once it is written,
    /// `written` (the channel's written-through offset) is raised to `offset`.
    pub fn append(
        &self,
        bytes: Vec<u8>,
        channel: Arc<str>,
        epoch: Arc<str>,
        offset: u64,
        deliver: Option<Publication>,
        written: Option<Arc<AtomicU64>>,
    ) -> Result<Ack, StorageError> {
        let reserved = (bytes.len() + MAGIC.len()) as u64;
        let (done, ack) = tokio::sync::oneshot::channel();
        let command = Command::Append(Append {
            bytes,
            allowance: MAGIC.len() as u64,
            channel,
            epoch,
            offset,
            deliver,
            done: Some(done),
            written,
        });
        if let Err(err) = self.send(command) {
            self.bytes.fetch_sub(reserved, Ordering::Relaxed);
            return Err(err);
        }
        Ok(ack)
    }

    /// Answers once everything queued so far is durable (a duplicate publish must not be
    /// acknowledged before its original).
    pub fn barrier(&self) -> Result<Ack, StorageError> {
        let (done, ack) = tokio::sync::oneshot::channel();
        self.send(Command::Barrier(done))?;
        Ok(ack)
    }

    /// Tests: the writer's next sync fails.
    #[cfg(test)]
    pub fn fail_next_sync(&self) {
        let _ = self.send(Command::FailNextSync);
    }

    /// Tests: the writer's next write fails.
    #[cfg(test)]
    pub fn fail_next_write(&self) {
        let _ = self.send(Command::FailNextWrite);
    }

    /// Tests: the writer writes nothing until the returned sender is dropped.
    #[cfg(test)]
    pub fn hold(&self) -> std::sync::mpsc::Sender<()> {
        let (release, held) = std::sync::mpsc::channel();
        let _ = self.send(Command::Hold(held));
        release
    }

    fn send(&self, command: Command) -> Result<(), StorageError> {
        let queue = self
            .queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sent = queue.as_ref().is_some_and(|q| q.send(command).is_ok());
        if sent {
            Ok(())
        } else {
            Err(StorageError::Io("the log writer has stopped".into()))
        }
    }

    /// Bytes of segments on disk plus those reserved by queued records.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Syncs everything queued so far, whatever the fsync mode (waits at most `wait`).
    pub fn sync_now(&self, wait: Duration) -> Result<(), StorageError> {
        let (done, answer) = std::sync::mpsc::sync_channel(1);
        self.send(Command::Sync(done))?;
        answer
            .recv_timeout(wait)
            .unwrap_or_else(|_| Err(StorageError::Io("the log writer did not answer".into())))
    }

    /// The file of segment `seq`.
    pub fn segment_file(&self, seq: u64) -> PathBuf {
        segment_path(&self.options.dir, seq)
    }

    /// Sealed segments (every one but the newest), oldest first, with their size in bytes
    /// and what they hold.
    pub fn sealed(&self) -> Vec<(u64, u64, Vec<Held>)> {
        let segments = self
            .segments
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let newest = segments.keys().next_back().copied();
        segments
            .iter()
            .filter(|(seq, _)| Some(**seq) != newest)
            .map(|(seq, info)| {
                let channels = info
                    .channels
                    .iter()
                    .map(|(c, (e, o))| (Arc::clone(c), Arc::clone(e), *o))
                    .collect();
                (*seq, info.bytes, channels)
            })
            .collect()
    }

    /// Deletes sealed segment `seq` if it is the oldest (whole segments, oldest first: a hole
    /// in the numbering means damage to recovery).
    pub fn delete_oldest(&self, seq: u64) -> std::io::Result<bool> {
        let mut segments = self
            .segments
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let oldest = segments.keys().next().copied();
        let newest = segments.keys().next_back().copied();
        if oldest != Some(seq) || newest == Some(seq) {
            return Ok(false);
        }
        std::fs::remove_file(segment_path(&self.options.dir, seq))?;
        if let Some(info) = segments.remove(&seq) {
            self.bytes.fetch_sub(info.bytes, Ordering::Relaxed);
        }
        Ok(true)
    }

    /// Stops the writer after it has written and synced everything queued.
    pub fn close(&self) {
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        let thread = self
            .writer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Drop for Durable {
    fn drop(&mut self) {
        self.close();
    }
}
