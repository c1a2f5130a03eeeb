//! Startup: reads every segment once, checks every record, cuts damaged tails and rebuilds
//! each channel's stream.
//!
//! Damage handling, in order of how often it happens:
//! - A torn or corrupt tail of the newest segment (a crash mid-write, or a power loss before
//!   the OS wrote its cache): the tail is cut off and logged. Those records were never
//!   acknowledged under `always`.
//! - A damaged record inside an older segment, or a missing segment between two present ones:
//!   the rest of that segment is cut (or the segment is absent). Records after that point are
//!   still read. A channel whose offsets then have a hole, or whose last record lies before
//!   the damage (its later records may have been lost), cannot be trusted: it is forgotten,
//!   so its next use starts a new epoch and clients see `recovered: false`. A "forget" record
//!   is written for it so later restarts agree. Other channels are unaffected.
//! - A segment whose header is not ours is renamed `*.damaged` and counts as missing.
//!
//! A preallocated segment (see [`super::log`]) ends in zeros after its last record: a zero
//! frame header followed only by zeros is the clean end, and the zeros are cut off. Bytes
//! that are not zero after such a run are a damaged tail: they are cut, the zeros kept.
//! Leftover `.pre` files (a segment being prepared when the process stopped) are deleted.

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::path::Path;
use std::sync::Arc;

use super::log::{MAGIC, SegmentInfo, segment_path};
use super::record::FRAME_HEADER;
use serde_json::value::RawValue;

use super::record::{Damage, Record};
use crate::broker::history::HistoryLimits;

/// One channel as found on disk.
#[derive(Debug)]
pub struct RecoveredChannel {
    /// The channel.
    pub name: String,
    /// Its stream's epoch.
    pub epoch: String,
    /// Its last offset.
    pub offset: u64,
    /// The limits of its last record.
    pub limits: HistoryLimits,
    /// Retained publications, oldest first: (wall ms, offset, client, data).
    pub entries: Vec<(u64, u64, Option<uuid::Uuid>, Arc<RawValue>)>,
    /// Idempotency keys: (key, offset, expiry in wall ms).
    pub keys: Vec<(String, u64, u64)>,
}

/// What startup found.
#[derive(Debug, Default)]
pub struct Recovered {
    /// Channels that can be trusted.
    pub channels: Vec<RecoveredChannel>,
    /// Channels forgotten because of damage.
    pub forgotten: Vec<String>,
    /// Segments on disk after repair.
    pub segments: BTreeMap<u64, SegmentInfo>,
    /// The highest segment number used (the writer continues after it).
    pub last_seq: u64,
    /// Records read.
    pub records: u64,
    /// Bytes cut off damaged segments.
    pub cut_bytes: u64,
}

struct Building {
    channel: RecoveredChannel,
    /// The name and epoch shared with every segment's summary (one allocation each).
    name: Arc<str>,
    epoch: Arc<str>,
    /// Global record number of its last record.
    last_seen: u64,
    untrusted: bool,
}

/// Reads `dir`'s segments, repairing damage in place (see the module docs).
pub fn recover(dir: &Path) -> std::io::Result<Recovered> {
    let mut seqs: Vec<u64> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let name = entry?.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".seg")
            && let Ok(seq) = u64::from_str_radix(hex, 16)
        {
            seqs.push(seq);
        }
        if let Some(hex) = name.strip_suffix(".seg.damaged")
            && let Ok(seq) = u64::from_str_radix(hex, 16)
        {
            seqs.push(seq);
        }
        if let Some(hex) = name.strip_suffix(".pre")
            && u64::from_str_radix(hex, 16).is_ok()
        {
            std::fs::remove_file(dir.join(name.as_ref()))?;
        }
    }
    seqs.sort_unstable();
    seqs.dedup();
    let mut out = Recovered {
        last_seq: seqs.last().copied().unwrap_or(0),
        ..Recovered::default()
    };
    let mut building: HashMap<String, Building> = HashMap::new();
    let mut damage_at: u64 = 0;
    let mut counter: u64 = 0;
    let last = seqs.last().copied();
    let mut previous: Option<u64> = None;
    // Segments are checked and parsed in parallel, a window at a time (bounded memory), and
    // applied in log order.
    let threads = std::thread::available_parallelism().map_or(2, |n| n.get().min(8));
    for window in seqs.chunks(threads * 2) {
        let scans = scan_all(dir, window, threads);
        for (&seq, scan) in window.iter().zip(scans) {
            if let Some(prev) = previous
                && seq != prev + 1
            {
                tracing::warn!(
                    missing = format!("{:016x}..{:016x}", prev + 1, seq),
                    "RUSTY_SOCKS_DATA_DIR: segments are missing; channels written there get a new epoch"
                );
                damage_at = counter;
            }
            previous = Some(seq);
            let path = segment_path(dir, seq);
            let scan = match scan {
                Scan::Unreadable => {
                    // Renamed `.damaged` on an earlier start: still a hole.
                    damage_at = counter;
                    continue;
                }
                Scan::Empty => {
                    if Some(seq) == last {
                        // Created, then the crash came before its header was written.
                        std::fs::remove_file(&path)?;
                        // The writer numbers the next segment `last_seq + 1`: reuse this
                        // one's number, or the next restart sees a hole and renews every
                        // channel written before it.
                        out.last_seq = seq.saturating_sub(1);
                        tracing::warn!(
                            segment = seq,
                            "RUSTY_SOCKS_DATA_DIR: removed an empty segment"
                        );
                        continue;
                    }
                    Scan::Foreign(0)
                }
                other => other,
            };
            let (records, valid, total, damage) = match scan {
                Scan::Read {
                    records,
                    valid,
                    total,
                    damage,
                } => (records, valid, total, damage),
                Scan::Foreign(len) => {
                    let damaged = path.with_extension("seg.damaged");
                    std::fs::rename(&path, &damaged)?;
                    tracing::warn!(
                        segment = %damaged.display(),
                        "RUSTY_SOCKS_DATA_DIR: not a segment of this format; set aside, its channels get a new epoch"
                    );
                    out.cut_bytes += len;
                    damage_at = counter;
                    continue;
                }
                Scan::Unreadable | Scan::Empty => continue,
            };
            let mut info = SegmentInfo::default();
            for (record, data) in records {
                counter += 1;
                let offset = record.offset;
                let (name, epoch) = apply(&mut building, record, data, counter);
                // Up to the highest offset held (a copied record may be older).
                let held = info
                    .channels
                    .entry(name)
                    .or_insert_with(|| (Arc::clone(&epoch), offset));
                if held.0 != epoch || held.1 < offset {
                    *held = (epoch, offset);
                }
            }
            if damage.is_none() && valid < total {
                // Preallocated zeros after the last record.
                OpenOptions::new().write(true).open(&path)?.set_len(valid)?;
            }
            if let Some(damage) = damage {
                let lost = total - valid;
                OpenOptions::new().write(true).open(&path)?.set_len(valid)?;
                out.cut_bytes += lost;
                let tail = Some(seq) == last;
                tracing::warn!(
                    segment = %path.display(),
                    at = valid,
                    lost_bytes = lost,
                    reason = %damage,
                    "RUSTY_SOCKS_DATA_DIR: cut a damaged {}",
                    if tail { "tail (unacknowledged writes)" } else { "segment" }
                );
                if !tail {
                    damage_at = counter;
                }
            }
            info.bytes = valid;
            out.segments.insert(seq, info);
        }
    }
    out.records = counter;
    for (name, b) in building {
        if b.untrusted || b.last_seen <= damage_at {
            out.forgotten.push(name);
        } else {
            let mut channel = b.channel;
            // Copied records bring their keys back out of order.
            channel.keys.sort_by_key(|k| k.1);
            out.channels.push(channel);
        }
    }
    if !out.forgotten.is_empty() {
        out.forgotten.sort_unstable();
        tracing::warn!(
            count = out.forgotten.len(),
            channels = ?out.forgotten.iter().take(20).collect::<Vec<_>>(),
            "RUSTY_SOCKS_DATA_DIR: channels whose history may be incomplete start a new epoch"
        );
    }
    Ok(out)
}

/// One segment, checked and parsed.
enum Scan {
    /// Its file could not be opened (set aside earlier).
    Unreadable,
    /// Shorter than the header.
    Empty,
    /// Not our header; its length.
    Foreign(u64),
    /// Its whole records (data checked to be JSON), where they end, the file's length, and
    /// why reading stopped early.
    Read {
        records: Vec<(Record, Option<Arc<RawValue>>)>,
        valid: u64,
        total: u64,
        damage: Option<Damage>,
    },
}

fn scan(path: &Path) -> Scan {
    let Ok(bytes) = std::fs::read(path) else {
        return Scan::Unreadable;
    };
    if bytes.len() < MAGIC.len() {
        return Scan::Empty;
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Scan::Foreign(bytes.len() as u64);
    }
    let mut pos = MAGIC.len();
    let mut records = Vec::new();
    let mut damage = None;
    while pos < bytes.len() {
        let rest = &bytes[pos..];
        if rest[..rest.len().min(FRAME_HEADER)].iter().all(|&b| b == 0) {
            // No record starts with a zero length: preallocated space from here.
            let zeros = rest.iter().position(|&b| b != 0).unwrap_or(rest.len());
            if zeros < rest.len() {
                // Something after the zeros: a damaged tail, cut after the zeros.
                pos += zeros;
                damage = Some(Damage::AfterZeros);
            }
            return Scan::Read {
                records,
                valid: pos as u64,
                total: bytes.len() as u64,
                damage,
            };
        }
        match Record::decode(rest) {
            Ok((mut record, used)) => {
                let data = match record.data.take().map(RawValue::from_string) {
                    None => None,
                    Some(Ok(raw)) => Some(Arc::from(raw)),
                    Some(Err(_)) => {
                        damage = Some(Damage::Malformed);
                        break;
                    }
                };
                records.push((record, data));
                pos += used;
            }
            Err(why) => {
                damage = Some(why);
                break;
            }
        }
    }
    Scan::Read {
        records,
        valid: pos as u64,
        total: bytes.len() as u64,
        damage,
    }
}

/// Scans `seqs` on up to `threads` threads, results in order.
fn scan_all(dir: &Path, seqs: &[u64], threads: usize) -> Vec<Scan> {
    let per = seqs.len().div_ceil(threads.max(1)).max(1);
    std::thread::scope(|scope| {
        let handles: Vec<_> = seqs
            .chunks(per)
            .map(|chunk| {
                scope.spawn(move || {
                    chunk
                        .iter()
                        .map(|&seq| scan(&segment_path(dir, seq)))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap_or_default())
            .collect()
    })
}

fn apply(
    building: &mut HashMap<String, Building>,
    record: Record,
    data: Option<Arc<RawValue>>,
    counter: u64,
) -> (Arc<str>, Arc<str>) {
    // Looked up before inserting: a record of a known channel allocates no key.
    if !building.contains_key(&record.channel) {
        building.insert(record.channel.clone(), fresh(&record));
    }
    let Some(b) = building.get_mut(&record.channel) else {
        // Inserted just above.
        return (
            Arc::from(record.channel.as_str()),
            Arc::from(record.epoch.as_str()),
        );
    };
    let c = &mut b.channel;
    if c.epoch != record.epoch {
        // A later life of the channel: the earlier one is over.
        b.epoch = Arc::from(record.epoch.as_str());
        c.epoch = record.epoch;
        c.offset = 0;
        c.entries.clear();
        c.keys.clear();
        b.untrusted = false;
    } else if c.offset != 0 && record.offset <= c.offset {
        // An older offset after a newer one: a record compaction copied forward (or its
        // original, still there after a crash). Kept once, in offset order; it says nothing
        // about the channel's newest records, so `last_seen` stays.
        insert_older(c, record, data);
        return (Arc::clone(&b.name), Arc::clone(&b.epoch));
    } else if c.offset != 0 && record.offset != c.offset + 1 {
        b.untrusted = true;
    }
    b.last_seen = counter;
    c.offset = record.offset;
    c.limits = record.limits;
    if let Some(data) = data {
        c.entries
            .push((record.time_ms, record.offset, record.client_id, data));
        // Records the running server had already trimmed may still be on disk (their
        // segment is shared): keep memory bounded while reading.
        let keep = c.limits.size;
        if c.entries.len() > keep.saturating_mul(2).max(64) {
            let drop = c.entries.len() - keep;
            c.entries.drain(..drop);
        }
    }
    if let Some((key, expires)) = record.key {
        c.keys.push((key, record.offset, expires));
    }
    (Arc::clone(&b.name), Arc::clone(&b.epoch))
}

/// Adds a record older than the channel's newest, unless its offset is there already.
fn insert_older(c: &mut RecoveredChannel, record: Record, data: Option<Arc<RawValue>>) {
    if let Some(data) = data {
        let at = c.entries.partition_point(|e| e.1 < record.offset);
        let present = c.entries.get(at).is_some_and(|e| e.1 == record.offset);
        // Below the bounded window kept while reading: trimmed anyway.
        let below = at == 0 && c.entries.len() >= c.limits.size.saturating_mul(2).max(64);
        if !present && !below {
            c.entries
                .insert(at, (record.time_ms, record.offset, record.client_id, data));
        }
    }
    if let Some((key, expires)) = record.key
        && !c
            .keys
            .iter()
            .any(|(k, o, _)| *o == record.offset && *k == key)
    {
        c.keys.push((key, record.offset, expires));
    }
}

fn fresh(record: &Record) -> Building {
    Building {
        name: Arc::from(record.channel.as_str()),
        epoch: Arc::from(record.epoch.as_str()),
        channel: RecoveredChannel {
            name: record.channel.clone(),
            epoch: record.epoch.clone(),
            offset: 0,
            limits: record.limits,
            entries: Vec::new(),
            keys: Vec::new(),
        },
        last_seen: 0,
        untrusted: false,
    }
}
