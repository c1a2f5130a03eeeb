//! The segmented append-only log and its writer thread (group commit).
//!
//! One thread owns the open segment. Publishers hand it encoded records through a queue while
//! holding their channel's lock, so each channel's records reach the file in offset order.
//! The thread takes everything queued as one batch, writes it with one `write`, delivers the
//! batch's publications to subscribers (they are in the OS page cache by then, so a `kill -9`
//! cannot lose what a subscriber saw), then syncs once for the whole batch (`always`) and
//! completes every publisher's acknowledgement. Concurrent publishers therefore share one
//! fsync, and live delivery never waits for it.
//!
//! Segments are files `<seq>.seg` (16 hex digits) of at most `segment_bytes`, starting with
//! [`MAGIC`]. Sealed segments are never written again; they are deleted whole, oldest first,
//! once none of their records is retained any more (see `MemoryBroker`'s sweep), or once
//! compaction has copied the few still retained forward (see `durable::compact`).
//!
//! With `always` and `interval` the next segment is prepared ahead by a helper thread: a file
//! `<seq>.pre` written full of zeros to `segment_bytes` (at most [`MAX_PREALLOCATE`]) and
//! synced, renamed to `<seq>.seg` when the writer reaches it. Records then overwrite blocks
//! that are already allocated and written, so `fdatasync` flushes data only: no size change,
//! no extent conversion, no journal commit (on ext4 under load, a journal commit waits for
//! other processes' data too: an appending `fdatasync` measured 6.7 ms p50 during builds,
//! an overwrite 0.08 ms). The zero tail of the open segment is the end of its records
//! (recovery reads a zero frame header as the end); a segment is cut to its records when
//! sealed or closed. A `.pre` file found at startup is deleted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError, TryRecvError};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::oneshot;

use super::{FsyncMode, StorageError};
use crate::broker::BrokerEvents;
use crate::types::Publication;

/// First bytes of every segment file (format version 1).
pub const MAGIC: &[u8; 8] = b"RSLOG\0\0\x01";
/// Most commands taken into one batch.
const MAX_BATCH: usize = 8192;
/// Largest segment preallocated (a larger `segment_bytes` grows by appending past it).
pub const MAX_PREALLOCATE: u64 = 256 << 20;
/// How long a roll waits for the helper preparing the next segment before creating one
/// without preallocation.
const PREPARE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// What a segment holds, per channel: the epoch and highest offset of its last record there.
#[derive(Debug, Default, Clone)]
pub struct SegmentInfo {
    /// File size in bytes.
    pub bytes: u64,
    /// Channel name to (epoch, highest offset).
    pub channels: HashMap<Arc<str>, (Arc<str>, u64)>,
}

/// Segments on disk, by sequence number; shared by the writer and the sweep.
pub type Segments = Arc<Mutex<BTreeMap<u64, SegmentInfo>>>;

/// The answer a publisher waits for.
pub type Ack = oneshot::Receiver<Result<(), StorageError>>;

/// One queued record.
pub struct Append {
    /// The framed record.
    pub bytes: Vec<u8>,
    /// Reserved against the quota on top of `bytes`: the header of the segment this record
    /// may start. Kept if it does, given back once it is written otherwise.
    pub allowance: u64,
    /// Its channel.
    pub channel: Arc<str>,
    /// Its epoch.
    pub epoch: Arc<str>,
    /// Its offset.
    pub offset: u64,
    /// Delivered to subscribers once written, if the channel was subscribed.
    pub deliver: Option<Publication>,
    /// Completed once durable according to the fsync mode.
    pub done: Option<oneshot::Sender<Result<(), StorageError>>>,
    /// The channel's written-through offset: raised to `offset` once the record is written,
    /// before it is delivered, so reads never report an offset a crash could still lose.
    pub written: Option<Arc<AtomicU64>>,
}

/// What the writer thread is asked to do.
pub enum Command {
    /// Append a record.
    Append(Append),
    /// Answer once everything queued before it is durable.
    Barrier(oneshot::Sender<Result<(), StorageError>>),
    /// Sync now whatever the fsync mode, then answer (compaction, before it deletes the
    /// segment whose records it copied). Answered after every command queued before it.
    Sync(std::sync::mpsc::SyncSender<Result<(), StorageError>>),
    /// Tests: the writer waits, writing nothing, until the sender is dropped.
    #[cfg(test)]
    Hold(std::sync::mpsc::Receiver<()>),
    /// Tests: the next write fails.
    #[cfg(test)]
    FailNextWrite,
    /// Tests: the next sync fails.
    #[cfg(test)]
    FailNextSync,
}

/// The writer thread's state.
pub struct Writer {
    pub(super) dir: PathBuf,
    pub(super) fsync: FsyncMode,
    pub(super) segment_bytes: u64,
    pub(super) file: Option<File>,
    pub(super) seq: u64,
    pub(super) len: u64,
    pub(super) events: Arc<dyn BrokerEvents>,
    pub(super) segments: Segments,
    /// Bytes on disk plus bytes reserved by queued records (the quota's measure).
    pub(super) bytes: Arc<AtomicU64>,
    pub(super) last_sync: Instant,
    pub(super) unsynced: bool,
    /// Channels (and epochs) whose record failed to be written or synced: their later
    /// records fail too, so none is acknowledged after an earlier one was lost (the channel
    /// starts a new epoch). Cleared when it grows past [`MAX_FAILED`].
    pub(super) failed: HashSet<(Arc<str>, Arc<str>)>,
    /// `interval`: the channels written since the last sync. A failed periodic sync may have
    /// lost them (acknowledged after the write): their later records fail, as under `always`.
    pub(super) since_sync: Vec<(Arc<str>, Arc<str>)>,
    /// The open segment was preallocated: its file is longer than `len` (zeros).
    pub(super) preallocated: bool,
    /// The helper preparing the next segment: its number and the zeroed file.
    pub(super) next: Option<(u64, Receiver<std::io::Result<File>>)>,
    /// Sealing a segment during the current commit failed (its truncation or its sync): the
    /// records the commit had written into it are not durable.
    pub(super) sealing_failed: Option<std::io::Error>,
    /// Tests: the next write fails.
    #[cfg(test)]
    pub(super) fail_next_write: bool,
    /// Tests: the next sync fails.
    #[cfg(test)]
    pub(super) fail_next_sync: bool,
}

/// Bound on [`Writer::failed`]: the publisher starts a new epoch as soon as it sees the
/// failure, so an entry is only needed for the records already queued behind it.
const MAX_FAILED: usize = 4096;

/// The file name of segment `seq`.
pub fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.seg"))
}

/// The file name of segment `seq` while it is prepared.
pub fn prepared_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{seq:016x}.pre"))
}

/// Writes `path` full of zeros up to `len` bytes and syncs it (the helper thread's job).
fn prepare(path: &Path, len: u64) -> std::io::Result<File> {
    let zeros = vec![0u8; 1 << 20];
    let result = (|| {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(path)?;
        let mut left = len;
        while left > 0 {
            let n = left.min(zeros.len() as u64) as usize;
            file.write_all(&zeros[..n])?;
            left -= n as u64;
        }
        file.sync_all()?;
        Ok(file)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(path);
    }
    result
}

/// Whether an I/O error means "no space" (a full disk or a quota).
pub fn is_full(err: &std::io::Error) -> bool {
    err.kind() == std::io::ErrorKind::StorageFull
        || err.kind() == std::io::ErrorKind::QuotaExceeded
        || matches!(err.raw_os_error(), Some(28 | 122))
}

fn storage_error(err: &std::io::Error) -> StorageError {
    if is_full(err) {
        StorageError::Full(err.to_string())
    } else {
        StorageError::Io(err.to_string())
    }
}

impl Writer {
    /// Runs until every sender is gone, then syncs what is left.
    pub fn run(mut self, queue: Receiver<Command>) {
        self.prepare_next(self.seq + 1);
        loop {
            let first = match self.fsync {
                FsyncMode::Interval(every) if self.unsynced => {
                    let left = every.saturating_sub(self.last_sync.elapsed());
                    match queue.recv_timeout(left) {
                        Ok(command) => command,
                        Err(RecvTimeoutError::Timeout) => {
                            if let Err(err) = self.sync() {
                                tracing::error!(%err, segment = self.seq, "RUSTY_SOCKS_DATA_DIR: periodic sync failed; its channels start a new epoch");
                                self.file = None;
                            }
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    }
                }
                _ => match queue.recv() {
                    Ok(command) => command,
                    Err(_) => break,
                },
            };
            #[cfg(test)]
            if let Command::Hold(release) = first {
                let _ = release.recv();
                continue;
            }
            let mut batch = vec![first];
            #[cfg(test)]
            let mut hold = None;
            while batch.len() < MAX_BATCH {
                match queue.try_recv() {
                    // Tests: a hold ends the batch; the writer waits after committing it.
                    #[cfg(test)]
                    Ok(Command::Hold(release)) => {
                        hold = Some(release);
                        break;
                    }
                    Ok(command) => batch.push(command),
                    Err(TryRecvError::Empty | TryRecvError::Disconnected) => break,
                }
            }
            self.commit(batch);
            #[cfg(test)]
            if let Some(release) = hold {
                let _ = release.recv();
            }
        }
        if let Err(err) = self.seal().and_then(|()| self.sync()) {
            tracing::error!(%err, "RUSTY_SOCKS_DATA_DIR: final sync failed");
        }
        if let Some((seq, ready)) = self.next.take() {
            // Wait for the helper, so no `.pre` file appears after the lock is released.
            let _ = ready.recv();
            let _ = std::fs::remove_file(prepared_path(&self.dir, seq));
        }
    }

    fn commit(&mut self, batch: Vec<Command>) {
        let mut written: Vec<Append> = Vec::with_capacity(batch.len());
        let mut barriers = Vec::new();
        let mut syncs = Vec::new();
        let mut group: Vec<Append> = Vec::new();
        let mut buf: Vec<u8> = Vec::new();
        for command in batch {
            match command {
                Command::Barrier(done) => barriers.push(done),
                Command::Sync(done) => syncs.push(done),
                #[cfg(test)]
                Command::Hold(release) => {
                    let _ = release.recv();
                }
                #[cfg(test)]
                Command::FailNextWrite => self.fail_next_write = true,
                #[cfg(test)]
                Command::FailNextSync => self.fail_next_sync = true,
                Command::Append(mut append) => {
                    let full = self.len + (buf.len() + append.bytes.len()) as u64
                        > self.segment_bytes
                        && self.len + buf.len() as u64 > MAGIC.len() as u64;
                    if full || self.file.is_none() {
                        self.flush(&mut buf, &mut group, &mut written);
                        if let Err(err) = self.roll() {
                            tracing::error!(%err, "RUSTY_SOCKS_DATA_DIR: cannot start a new segment");
                            self.remember_failed(&append);
                            self.fail(append, storage_error(&err));
                            continue;
                        }
                        // The new segment's header used this record's allowance.
                        append.allowance = 0;
                    }
                    // Checked after the flush above, which may have failed an earlier record.
                    let key = (Arc::clone(&append.channel), Arc::clone(&append.epoch));
                    if self.failed.contains(&key) {
                        self.fail(
                            append,
                            StorageError::Io(
                                "an earlier record of this channel was not stored".into(),
                            ),
                        );
                        continue;
                    }
                    buf.extend_from_slice(&append.bytes);
                    group.push(append);
                }
            }
        }
        self.flush(&mut buf, &mut group, &mut written);
        // A sync of a segment sealed during this commit failed: it covered records of
        // `written`, and syncing the file again would not make them durable (the kernel
        // reports a failed writeback once, then forgets the lost pages).
        let synced = if let Some(err) = self.sealing_failed.take() {
            Err(err)
        } else {
            match self.fsync {
                _ if !syncs.is_empty() => self.sync(),
                FsyncMode::Always => self.sync(),
                FsyncMode::Interval(every) if self.last_sync.elapsed() >= every => self.sync(),
                _ => Ok(()),
            }
        };
        let answer = synced.map_err(|err| storage_error(&err));
        if answer.is_err() {
            // What the failed sync covered may be lost: no later record of these channels
            // may be acknowledged, and the file is not trusted with more.
            for a in &written {
                self.remember_failed(a);
            }
            self.file = None;
        }
        for append in written {
            if let Some(done) = append.done {
                let _ = done.send(answer.clone());
            }
        }
        for done in barriers {
            let _ = done.send(answer.clone());
        }
        for done in syncs {
            let _ = done.send(answer.clone());
        }
    }

    /// Writes `buf` (the records of `group`) to the open segment; on success delivers them
    /// and moves them to `written`, on failure cuts the file back and fails them.
    fn flush(&mut self, buf: &mut Vec<u8>, group: &mut Vec<Append>, written: &mut Vec<Append>) {
        if group.is_empty() {
            return;
        }
        #[cfg(test)]
        if std::mem::take(&mut self.fail_next_write) {
            let error = StorageError::Io("write failed on purpose".into());
            for a in group.drain(..) {
                self.remember_failed(&a);
                self.fail(a, error.clone());
            }
            buf.clear();
            return;
        }
        let at = self.len;
        let result = match self.file.as_mut() {
            Some(file) => file
                .seek(SeekFrom::Start(at))
                .and_then(|_| file.write_all(buf)),
            None => Err(std::io::Error::other("no open segment")),
        };
        match result {
            Ok(()) => {
                self.len += buf.len() as u64;
                self.unsynced = true;
                {
                    let mut segments = self
                        .segments
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let info = segments.entry(self.seq).or_default();
                    info.bytes = self.len;
                    for a in group.iter() {
                        // A copied record (compaction) may be older than one written here
                        // before it: the segment holds up to the highest.
                        let held = info
                            .channels
                            .entry(Arc::clone(&a.channel))
                            .or_insert_with(|| (Arc::clone(&a.epoch), a.offset));
                        if held.0 != a.epoch || held.1 < a.offset {
                            *held = (Arc::clone(&a.epoch), a.offset);
                        }
                    }
                }
                if matches!(self.fsync, FsyncMode::Interval(_)) {
                    self.since_sync.extend(
                        group
                            .iter()
                            .map(|a| (Arc::clone(&a.channel), Arc::clone(&a.epoch))),
                    );
                }
                let unused: u64 = group.iter().map(|a| a.allowance).sum();
                self.bytes.fetch_sub(unused, Ordering::Relaxed);
                // Consecutive publications of one channel and epoch go to the node together,
                // which fans them out member by member.
                let mut run: Vec<Publication> = Vec::new();
                let mut run_of: Option<(&Arc<str>, &Arc<str>)> = None;
                for a in group.iter() {
                    if let Some(written) = &a.written {
                        written.fetch_max(a.offset, Ordering::Release);
                    }
                    let Some(publication) = &a.deliver else {
                        continue;
                    };
                    if run_of.is_some_and(|(c, e)| *c != a.channel || *e != a.epoch) {
                        if let Some((channel, epoch)) = run_of {
                            self.events.on_publications(channel, epoch, &run);
                        }
                        run.clear();
                    }
                    run_of = Some((&a.channel, &a.epoch));
                    run.push(publication.clone());
                }
                if let Some((channel, epoch)) = run_of {
                    self.events.on_publications(channel, epoch, &run);
                }
                written.append(group);
            }
            Err(err) => {
                tracing::error!(%err, segment = self.seq, "RUSTY_SOCKS_DATA_DIR: write failed");
                // A partial record in the middle of a segment would cut everything after it
                // at the next startup: take the file back to its last whole record.
                self.preallocated = false;
                if let Some(file) = self.file.as_ref()
                    && file.set_len(self.len).is_err()
                {
                    // Cannot repair this file: continue in a new one.
                    self.file = None;
                }
                let error = storage_error(&err);
                for a in group.drain(..) {
                    self.remember_failed(&a);
                    self.fail(a, error.clone());
                }
            }
        }
        buf.clear();
    }

    fn remember_failed(&mut self, append: &Append) {
        if self.failed.len() >= MAX_FAILED {
            self.failed.clear();
        }
        self.failed
            .insert((Arc::clone(&append.channel), Arc::clone(&append.epoch)));
    }

    fn fail(&self, append: Append, error: StorageError) {
        self.bytes.fetch_sub(
            append.bytes.len() as u64 + append.allowance,
            Ordering::Relaxed,
        );
        if let Some(done) = append.done {
            let _ = done.send(Err(error));
        }
    }

    fn sync(&mut self) -> std::io::Result<()> {
        self.last_sync = Instant::now();
        if !self.unsynced {
            return Ok(());
        }
        #[cfg(test)]
        let result = if std::mem::take(&mut self.fail_next_sync) {
            Err(std::io::Error::other("sync failed on purpose"))
        } else {
            self.file.as_ref().map_or(Ok(()), File::sync_data)
        };
        #[cfg(not(test))]
        let result = self.file.as_ref().map_or(Ok(()), File::sync_data);
        let since = std::mem::take(&mut self.since_sync);
        if result.is_err() {
            for (channel, epoch) in since {
                if self.failed.len() >= MAX_FAILED {
                    self.failed.clear();
                }
                self.failed.insert((channel, epoch));
            }
            return result;
        }
        self.unsynced = false;
        Ok(())
    }

    /// Cuts the open segment's preallocated zeros (before it is sealed or closed).
    fn seal(&mut self) -> std::io::Result<()> {
        if self.preallocated
            && let Some(file) = self.file.as_ref()
        {
            file.set_len(self.len)?;
            self.preallocated = false;
            self.unsynced = true;
        }
        Ok(())
    }

    /// Starts the helper preparing segment `seq` (not with `never`: nothing waits for syncs).
    fn prepare_next(&mut self, seq: u64) {
        if self.fsync == FsyncMode::Never {
            return;
        }
        let path = prepared_path(&self.dir, seq);
        let len = self
            .segment_bytes
            .clamp(MAGIC.len() as u64, MAX_PREALLOCATE);
        let (done, ready) = std::sync::mpsc::sync_channel(1);
        let spawned = std::thread::Builder::new()
            .name("rusty-socks-log-prepare".into())
            .spawn(move || {
                let _ = done.send(prepare(&path, len));
            });
        if spawned.is_ok() {
            self.next = Some((seq, ready));
        }
    }

    /// The prepared file for segment `seq`, renamed into place with its header, if the
    /// helper has it (waiting up to [`PREPARE_WAIT`]).
    fn take_prepared(&mut self, seq: u64) -> Option<File> {
        let (at, ready) = self.next.take()?;
        let pre = prepared_path(&self.dir, at);
        let file = match ready.recv_timeout(PREPARE_WAIT) {
            Ok(Ok(file)) if at == seq => file,
            Ok(Ok(_)) => {
                let _ = std::fs::remove_file(&pre);
                return None;
            }
            Ok(Err(err)) => {
                tracing::warn!(%err, "RUSTY_SOCKS_DATA_DIR: cannot preallocate a segment");
                return None;
            }
            Err(_) => {
                // Still zeroing (or gone): let it finish on its own and clean up after it.
                std::thread::spawn(move || {
                    let _ = ready.recv();
                    let _ = std::fs::remove_file(&pre);
                });
                return None;
            }
        };
        let installed = (|| {
            let mut file = file;
            file.seek(SeekFrom::Start(0))?;
            file.write_all(MAGIC)?;
            file.sync_data()?;
            std::fs::rename(&pre, segment_path(&self.dir, seq))?;
            File::open(&self.dir)?.sync_all()?;
            Ok::<_, std::io::Error>(file)
        })();
        match installed {
            Ok(file) => Some(file),
            Err(err) => {
                tracing::warn!(%err, "RUSTY_SOCKS_DATA_DIR: cannot use a preallocated segment");
                let _ = std::fs::remove_file(&pre);
                // Holds no record yet: gone, so the segment can be created without it.
                let _ = std::fs::remove_file(segment_path(&self.dir, seq));
                None
            }
        }
    }

    /// Seals the open segment and starts the next one.
    fn roll(&mut self) -> std::io::Result<()> {
        if self.file.is_some() {
            let sealed = self.seal().and_then(|()| {
                if self.fsync == FsyncMode::Never {
                    Ok(())
                } else {
                    self.sync()
                }
            });
            if let Err(err) = sealed {
                // What this commit wrote into the old segment may be lost with it.
                self.sealing_failed
                    .get_or_insert_with(|| std::io::Error::new(err.kind(), err.to_string()));
                return Err(err);
            }
        }
        let seq = self.seq + 1;
        let (file, preallocated) = match self.take_prepared(seq) {
            Some(file) => (file, true),
            None => (self.create(seq)?, false),
        };
        self.file = Some(file);
        self.preallocated = preallocated;
        self.seq = seq;
        self.len = MAGIC.len() as u64;
        self.unsynced = false;
        // Its header is counted already: the allowance of the record that starts it.
        self.segments
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(
                seq,
                SegmentInfo {
                    bytes: self.len,
                    channels: HashMap::new(),
                },
            );
        self.prepare_next(seq + 1);
        Ok(())
    }

    /// Creates segment `seq` without preallocation.
    fn create(&self, seq: u64) -> std::io::Result<File> {
        let path = segment_path(&self.dir, seq);
        let mut file = OpenOptions::new()
            .create_new(true)
            .write(true)
            .open(&path)?;
        if let Err(err) = file.write_all(MAGIC) {
            drop(file);
            let _ = std::fs::remove_file(&path);
            return Err(err);
        }
        if self.fsync != FsyncMode::Never {
            file.sync_all()?;
            File::open(&self.dir)?.sync_all()?;
        }
        Ok(file)
    }
}
