//! Compaction: the oldest sealed segment, still holding a few retained records, is not
//! allowed to pin the disk.
//!
//! Segments are deleted whole and oldest first (so the numbering stays contiguous from the
//! oldest present segment and a hole always means damage). One retained record in the
//! oldest segment (a quiet channel without TTL, a live idempotency key) would otherwise keep
//! every newer segment on disk. So when the oldest sealed segment is still retained, the
//! sweep reads it and sums the bytes of its records that are still retained (its *live*
//! bytes). **Rule**: if the live bytes are at most half of what deleting it frees (its own
//! size plus the sealed segments right behind it that nothing retains), each live record is
//! copied, byte for byte (same channel, epoch, offset, time, limits, key), through the
//! writer to the open segment, under its channel's lock (so the copy is queued after every
//! record of the channel assigned before it, and a publish cannot change the channel
//! meanwhile). Once the copies are synced (whatever `RUSTY_SOCKS_FSYNC` says), the old
//! segment is deleted. A segment found not worth it is read again after [`RECHECK`].
//!
//! The copies count against `RUSTY_SOCKS_DATA_MAX_BYTES`, reserved past it if need be: the
//! rule makes compaction free at least twice what it copies, at once, so it never leaves the
//! quota fuller than it found it. A crash between the copies and the deletion leaves a
//! record twice on disk: recovery keeps one (see [`super::recovery`]).

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::Durable;
use super::log::{Ack, MAGIC};
use super::record::{FRAME_HEADER, Record};
use crate::broker::memory::MemoryBroker;

/// How long a pinned segment found not worth compacting is left alone.
pub const RECHECK: Duration = Duration::from_secs(30);
/// How long compaction waits for the writer to sync its copies.
const SYNC_WAIT: Duration = Duration::from_secs(30);

impl MemoryBroker {
    /// Compacts the oldest sealed segment `seq` if its live bytes are at most half of `frees`
    /// (see the module docs). True once it is deleted.
    pub(super) fn compact_oldest(&self, durable: &Durable, seq: u64, frees: u64) -> bool {
        if !compaction_due(durable, seq) {
            return false;
        }
        let path = durable.segment_file(seq);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(err) => {
                tracing::warn!(%err, segment = seq, "RUSTY_SOCKS_DATA_DIR: cannot read a segment to compact it");
                self.checked(durable, seq);
                return false;
            }
        };
        let Some(records) = records(&bytes) else {
            tracing::warn!(
                segment = seq,
                "RUSTY_SOCKS_DATA_DIR: a sealed segment does not read back whole; not compacted"
            );
            self.checked(durable, seq);
            return false;
        };
        let live: u64 = records
            .iter()
            .filter(|(r, _)| self.retains(&r.channel, &r.epoch, r.offset))
            .map(|(_, range)| range.len() as u64)
            .sum();
        if live.saturating_mul(2) > frees {
            self.checked(durable, seq);
            return false;
        }
        let mut acks: Vec<Ack> = Vec::new();
        let mut copied = 0u64;
        for (record, range) in &records {
            let queued = self.retains_then(&record.channel, &record.epoch, record.offset, || {
                let framed = bytes[range.clone()].to_vec();
                let _ = durable.reserve(framed.len(), true);
                durable.append(
                    framed,
                    Arc::from(record.channel.as_str()),
                    Arc::from(record.epoch.as_str()),
                    record.offset,
                    None,
                    None,
                )
            });
            match queued {
                None => {}
                Some(Ok(ack)) => {
                    copied += range.len() as u64;
                    acks.push(ack);
                }
                Some(Err(err)) => {
                    tracing::warn!(%err, segment = seq, "RUSTY_SOCKS_DATA_DIR: compaction stopped");
                    return false;
                }
            }
        }
        let synced = durable.sync_now(SYNC_WAIT);
        // The sync was answered after every copy: their answers are in.
        let all_written = acks
            .into_iter()
            .all(|mut ack| matches!(ack.try_recv(), Ok(Ok(()))));
        if let Err(err) = synced {
            tracing::warn!(%err, segment = seq, "RUSTY_SOCKS_DATA_DIR: compaction's copies not synced; segment kept");
            return false;
        }
        if !all_written {
            tracing::warn!(
                segment = seq,
                "RUSTY_SOCKS_DATA_DIR: compaction's copies not written; segment kept"
            );
            return false;
        }
        #[cfg(test)]
        if durable
            .compact_keeps
            .load(std::sync::atomic::Ordering::Relaxed)
        {
            return false;
        }
        match durable.delete_oldest(seq) {
            Ok(deleted) => {
                tracing::info!(
                    segment = seq,
                    segment_bytes = bytes.len(),
                    copied_bytes = copied,
                    "compacted the oldest segment: copied its retained records forward"
                );
                deleted
            }
            Err(err) => {
                tracing::warn!(%err, segment = seq, "RUSTY_SOCKS_DATA_DIR: cannot delete a compacted segment");
                false
            }
        }
    }

    fn checked(&self, durable: &Durable, seq: u64) {
        *durable
            .compact_checked
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = Some((seq, Instant::now()));
    }
}

/// False while segment `seq` was found not worth compacting less than [`RECHECK`] ago.
pub(super) fn compaction_due(durable: &Durable, seq: u64) -> bool {
    let checked = durable
        .compact_checked
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    !matches!(*checked, Some((at, when)) if at == seq && when.elapsed() < RECHECK)
}

/// The records of a sealed segment and where each lies in it; `None` if it does not read
/// back whole.
fn records(bytes: &[u8]) -> Option<Vec<(Record, std::ops::Range<usize>)>> {
    if bytes.get(..MAGIC.len())? != MAGIC {
        return None;
    }
    let mut pos = MAGIC.len();
    let mut out = Vec::new();
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest[..rest.len().min(FRAME_HEADER)].iter().all(|&b| b == 0) {
            // Zeros a sealed segment should not have; nothing after them is a record.
            break;
        }
        let (record, used) = Record::decode(rest).ok()?;
        out.push((record, pos..pos + used));
        pos += used;
    }
    Some(out)
}
