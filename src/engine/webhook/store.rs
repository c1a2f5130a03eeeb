//! Pending webhook events on disk (`<RUSTY_SOCKS_DATA_DIR>/webhooks/`), so a crash or a
//! `kill -9` loses none of them.
//!
//! - `queue-<generation>.log`: an append-only file of records, one event each: body length
//!   (`u32` LE), CRC-32C of the body (`u32` LE, the durable history's checksum), the event as
//!   JSON (its `seq` included; a record without one, written before `seq` existed, reads as
//!   an event without it). An event counts as queued once its record is written and synced.
//! - `ACKED`: the generation in use and how many of its bytes are delivered (or dropped), with
//!   a CRC-32C; replaced atomically (written aside, synced, renamed). Delivery is head-first,
//!   so what is done is always a prefix of the file.
//! - Once everything is done (or the done prefix passes [`COMPACT_BYTES`]), the rest is copied
//!   into the next generation's file, synced, `ACKED` is pointed at it and the old file is
//!   deleted. A crash between two of these steps leaves `ACKED` naming a complete file.
//!
//! A damaged tail (a record cut short by the crash, or one whose checksum fails) is cut off at
//! startup; only a record that was never synced can be damaged, and no such event was queued.
//! The directory is guarded by the durable history's lock (`<data_dir>/LOCK`), held from
//! before this store opens.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use crate::broker::durable::record::crc32c;

use super::event::Event;

/// The done prefix past which the file is rewritten even while events are pending.
pub const COMPACT_BYTES: u64 = 4 << 20;

/// Largest record body accepted when reading back (an event is a few hundred bytes).
const MAX_RECORD: usize = 1 << 20;

const HEADER: usize = 8;

/// The on-disk queue. Used from one thread (the webhook store thread).
#[derive(Debug)]
pub struct Store {
    dir: PathBuf,
    generation: u64,
    file: File,
    /// Bytes of the current file delivered or dropped.
    done: u64,
    /// Length of the current file.
    len: u64,
}

/// A pending event read back at startup, with its record's length on disk.
pub type Recovered = (Event, u64);

impl Store {
    /// Opens (or creates) the store in `dir` and reads back every pending event, oldest first.
    pub fn open(dir: &Path) -> std::io::Result<(Self, Vec<Recovered>)> {
        std::fs::create_dir_all(dir)?;
        let (generation, done) = read_marker(dir)?.unwrap_or((0, 0));
        let path = log_path(dir, generation);
        let mut file = OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&path)?;
        // The directory entries of a new directory and a new log must be durable too, or a
        // power loss could take synced events with them.
        sync_dir(dir)?;
        if let Some(parent) = dir.parent() {
            sync_dir(parent)?;
        }
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        let done = done.min(bytes.len() as u64);
        let mut pending = Vec::new();
        let mut at = usize::try_from(done).unwrap_or(usize::MAX);
        while at < bytes.len() {
            match decode(&bytes[at..]) {
                Some((event, len)) => {
                    pending.push((event, len as u64));
                    at += len;
                }
                None => {
                    tracing::warn!(
                        file = %path.display(),
                        offset = at,
                        cut = bytes.len() - at,
                        "webhook queue: cutting a damaged tail (never synced, so never queued)"
                    );
                    file.set_len(at as u64)?;
                    file.sync_all()?;
                    bytes.truncate(at);
                    break;
                }
            }
        }
        // Files of other generations are leftovers of an interrupted compaction.
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with("queue-") && entry.path() != path {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let store = Self {
            dir: dir.to_owned(),
            generation,
            file,
            done,
            len: bytes.len() as u64,
        };
        Ok((store, pending))
    }

    /// Writes `events` and syncs them; returns each one's record length.
    pub fn append(&mut self, events: &[Event]) -> std::io::Result<Vec<u64>> {
        let mut buf = Vec::new();
        let mut lens = Vec::with_capacity(events.len());
        for event in events {
            let start = buf.len();
            encode(event, &mut buf);
            lens.push((buf.len() - start) as u64);
        }
        self.file.write_all(&buf)?;
        self.file.sync_data()?;
        self.len += buf.len() as u64;
        Ok(lens)
    }

    /// Marks the next `bytes` as done (delivered or dropped).
    pub fn ack(&mut self, bytes: u64) -> std::io::Result<()> {
        self.done = (self.done + bytes).min(self.len);
        if self.done == self.len || self.done >= COMPACT_BYTES {
            self.compact()
        } else {
            write_marker(&self.dir, self.generation, self.done)
        }
    }

    /// Bytes of the current file not yet done.
    pub fn pending_bytes(&self) -> u64 {
        self.len - self.done
    }

    /// Copies what is pending into the next generation's file and switches to it.
    fn compact(&mut self) -> std::io::Result<()> {
        let mut rest = Vec::new();
        self.file.seek(SeekFrom::Start(self.done))?;
        self.file.read_to_end(&mut rest)?;
        let next = self.generation + 1;
        let path = log_path(&self.dir, next);
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .read(true)
            .write(true)
            .open(&path)?;
        file.write_all(&rest)?;
        file.sync_all()?;
        drop(file);
        // Reopened for appending, as `open` does.
        let file = OpenOptions::new().read(true).append(true).open(&path)?;
        sync_dir(&self.dir)?;
        write_marker(&self.dir, next, 0)?;
        let old = log_path(&self.dir, self.generation);
        self.file = file;
        self.generation = next;
        self.done = 0;
        self.len = rest.len() as u64;
        let _ = std::fs::remove_file(old);
        Ok(())
    }
}

fn log_path(dir: &Path, generation: u64) -> PathBuf {
    dir.join(format!("queue-{generation}.log"))
}

fn encode(event: &Event, out: &mut Vec<u8>) {
    let body = serde_json::to_vec(event).unwrap_or_default();
    out.extend_from_slice(&(body.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32c(&body).to_le_bytes());
    out.extend_from_slice(&body);
}

/// The event at the start of `buf` and its record's length, or `None` if it cannot be trusted.
fn decode(buf: &[u8]) -> Option<(Event, usize)> {
    let len = u32::from_le_bytes(buf.get(0..4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(buf.get(4..8)?.try_into().ok()?);
    if len > MAX_RECORD {
        return None;
    }
    let body = buf.get(HEADER..HEADER + len)?;
    if crc32c(body) != crc {
        return None;
    }
    let event = serde_json::from_slice(body).ok()?;
    Some((event, HEADER + len))
}

const MARKER: &str = "ACKED";

fn read_marker(dir: &Path) -> std::io::Result<Option<(u64, u64)>> {
    let bytes = match std::fs::read(dir.join(MARKER)) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let field = |at: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(at..at + 8)?.try_into().ok()?))
    };
    let (Some(generation), Some(done), Some(crc)) = (field(0), field(8), bytes.get(16..20)) else {
        return Err(damaged_marker(dir));
    };
    if crc32c(&bytes[..16]).to_le_bytes() != crc {
        return Err(damaged_marker(dir));
    }
    Ok(Some((generation, done)))
}

/// The marker is replaced by a rename, so it is never half written: a damaged one was damaged
/// by something else, and guessing could lose or repeat events.
fn damaged_marker(dir: &Path) -> std::io::Error {
    std::io::Error::new(
        std::io::ErrorKind::InvalidData,
        format!(
            "{} is damaged; remove the webhooks directory to start with an empty queue",
            dir.join(MARKER).display()
        ),
    )
}

fn write_marker(dir: &Path, generation: u64, done: u64) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(20);
    bytes.extend_from_slice(&generation.to_le_bytes());
    bytes.extend_from_slice(&done.to_le_bytes());
    bytes.extend_from_slice(&crc32c(&bytes).to_le_bytes());
    let aside = dir.join("ACKED.new");
    let mut file = File::create(&aside)?;
    file.write_all(&bytes)?;
    file.sync_all()?;
    std::fs::rename(&aside, dir.join(MARKER))?;
    sync_dir(dir)
}

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::webhook::event::EventName;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "rusty-socks-webhook-{name}-{}",
            uuid::Uuid::new_v4()
        ));
        std::fs::create_dir_all(&dir).expect("test setup");
        dir
    }

    fn events(n: usize) -> Vec<Event> {
        (0..n)
            .map(|_| Event::client(EventName::ClientConnected, uuid::Uuid::new_v4(), None))
            .collect()
    }

    #[test]
    fn pending_events_come_back_after_a_reopen_and_done_ones_do_not() {
        let dir = temp_dir("reopen");
        let written = events(5);
        let (mut store, pending) = Store::open(&dir).expect("test setup");
        assert!(pending.is_empty());
        let lens = store.append(&written).expect("test setup");
        store.ack(lens[0] + lens[1]).expect("test setup");
        drop(store);
        let (mut store, pending) = Store::open(&dir).expect("test setup");
        let ids: Vec<_> = pending.iter().map(|(e, _)| e.id).collect();
        assert_eq!(ids, written[2..].iter().map(|e| e.id).collect::<Vec<_>>());
        // Everything done: the file is replaced by an empty one of the next generation.
        store
            .ack(pending.iter().map(|(_, l)| l).sum())
            .expect("test setup");
        assert_eq!(store.pending_bytes(), 0);
        drop(store);
        let (_, pending) = Store::open(&dir).expect("test setup");
        assert!(pending.is_empty());
        let logs: Vec<_> = std::fs::read_dir(&dir)
            .expect("test setup")
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("queue-"))
            .collect();
        assert_eq!(logs.len(), 1);
        std::fs::remove_dir_all(dir).expect("test setup");
    }

    #[test]
    fn a_torn_or_corrupt_tail_is_cut_and_what_came_before_survives() {
        let dir = temp_dir("torn");
        let written = events(3);
        let (mut store, _) = Store::open(&dir).expect("test setup");
        store.append(&written).expect("test setup");
        drop(store);
        let path = log_path(&dir, 0);
        let mut bytes = std::fs::read(&path).expect("test setup");
        // The last record cut short, as a crash mid-write leaves it.
        bytes.truncate(bytes.len() - 3);
        std::fs::write(&path, &bytes).expect("test setup");
        let (mut store, pending) = Store::open(&dir).expect("test setup");
        assert_eq!(pending.len(), 2);
        // Appending after the cut starts at a record boundary.
        let more = events(1);
        store.append(&more).expect("test setup");
        drop(store);
        // A flipped bit in the middle record: it and what follows are cut.
        let mut bytes = std::fs::read(&path).expect("test setup");
        let second = pending[0].1 as usize + HEADER + 2;
        bytes[second] ^= 0x20;
        std::fs::write(&path, &bytes).expect("test setup");
        let (_, pending) = Store::open(&dir).expect("test setup");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].0.id, written[0].id);
        std::fs::remove_dir_all(dir).expect("test setup");
    }

    #[test]
    fn a_compaction_interrupted_before_the_marker_keeps_the_old_file() {
        let dir = temp_dir("compact");
        let written = events(2);
        let (mut store, _) = Store::open(&dir).expect("test setup");
        store.append(&written).expect("test setup");
        drop(store);
        // A next-generation file written, the marker never switched to it.
        std::fs::write(log_path(&dir, 1), b"partial").expect("test setup");
        let (_, pending) = Store::open(&dir).expect("test setup");
        assert_eq!(pending.len(), 2);
        assert!(!log_path(&dir, 1).exists());
        std::fs::remove_dir_all(dir).expect("test setup");
    }

    /// Records carry the event's `seq`; records written before it existed (no `seq`) are
    /// still read, as events without one.
    #[test]
    fn records_keep_the_seq_and_old_records_without_one_are_read() {
        let dir = temp_dir("seq");
        let old = br#"{"id":"6f1c2a67-9d0e-4b8a-b3c4-7e210a9f6d13","name":"channel_occupied","channel":"news","time_ms":7}"#;
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(old.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&crc32c(old).to_le_bytes());
        bytes.extend_from_slice(old);
        std::fs::write(log_path(&dir, 0), &bytes).expect("test setup");
        let (mut store, pending) = Store::open(&dir).expect("test setup");
        assert_eq!(pending.len(), 1);
        assert_eq!(pending[0].0.seq, None);
        assert_eq!(pending[0].0.channel.as_deref(), Some("news"));
        let mut new = pending[0].0.clone();
        new.seq = Some(1_733_000_000_000_001);
        store
            .append(std::slice::from_ref(&new))
            .expect("test setup");
        drop(store);
        let (_, pending) = Store::open(&dir).expect("test setup");
        let seqs: Vec<_> = pending.iter().map(|(e, _)| e.seq).collect();
        assert_eq!(seqs, vec![None, Some(1_733_000_000_000_001)]);
        std::fs::remove_dir_all(dir).expect("test setup");
    }

    #[test]
    fn a_damaged_marker_is_an_error_not_a_guess() {
        let dir = temp_dir("marker");
        std::fs::write(dir.join(MARKER), [1u8; 20]).expect("test setup");
        let err = Store::open(&dir).expect_err("an error");
        assert!(err.to_string().contains("ACKED is damaged"), "{err}");
        std::fs::remove_dir_all(dir).expect("test setup");
    }
}
