//! Bounded channel history: the memory broker's store, the limits every broker applies, and
//! epochs.
//!
//! Every publication on a channel gets the next offset (1, 2, 3, ...). The `epoch` names one
//! life of a channel's stream: it changes whenever the history that backs the offsets is lost
//! (for the memory broker: on restart, or when an idle channel's state was freed), so a client
//! can tell "offset 12 of this life" from "offset 12 of the last one" and never recovers from
//! the wrong stream.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::time::Instant;

use crate::types::{ClientId, Publication, StreamPosition};

/// Bounds on one channel's history.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryLimits {
    /// Most publications kept (0 = keep none).
    pub size: usize,
    /// Oldest publication kept, if bounded by age.
    pub ttl: Option<Duration>,
    /// Most bytes of `data` kept.
    pub max_bytes: usize,
}

/// Bookkeeping bytes counted per retained publication on top of its data, so a budget of
/// bytes also bounds how many tiny publications (and channels) can be kept.
pub const ENTRY_OVERHEAD: usize = 96;

/// A fresh epoch: 12 hex digits, for every broker (no `|`, so it fits the wire format).
pub fn new_epoch() -> String {
    let mut epoch = uuid::Uuid::new_v4().simple().to_string();
    epoch.truncate(12);
    epoch
}

/// A channel's stream: its epoch, last offset and retained publications.
#[derive(Debug)]
pub struct Stream {
    epoch: String,
    offset: u64,
    entries: VecDeque<(Instant, Publication)>,
    bytes: usize,
}

impl Default for Stream {
    fn default() -> Self {
        Self::new()
    }
}

impl Stream {
    /// A new stream life. It has no epoch until its first publication (its position is
    /// [`StreamPosition::start`] until then), so a read of a channel that never had one
    /// tells every reader the same position.
    pub fn new() -> Self {
        Self {
            epoch: String::new(),
            offset: 0,
            entries: VecDeque::new(),
            bytes: 0,
        }
    }

    /// Where the stream is now.
    pub fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }

    /// The stream's epoch.
    pub fn epoch(&self) -> &str {
        &self.epoch
    }

    /// Memory this stream's history accounts for (data plus [`ENTRY_OVERHEAD`] per entry).
    pub fn cost(&self) -> usize {
        self.bytes + self.entries.len() * ENTRY_OVERHEAD
    }

    /// Gives a stream that never had a publication the epoch its first one starts (a durable
    /// log writes that record, epoch included, before the publication is appended here).
    pub fn adopt_epoch(&mut self, epoch: String) {
        if self.epoch.is_empty() {
            self.epoch = epoch;
        }
    }

    /// Assigns the next offset and, if `store`, keeps the publication within `limits`.
    pub fn append(
        &mut self,
        data: Arc<RawValue>,
        client_id: Option<ClientId>,
        limits: HistoryLimits,
        now: Instant,
        store: bool,
    ) -> Publication {
        if self.epoch.is_empty() {
            self.epoch = new_epoch();
        }
        self.offset += 1;
        let publication = Publication {
            offset: self.offset,
            data,
            client_id,
        };
        let size = publication.data.get().len();
        if Self::keeps(size, limits, store) {
            self.entries.push_back((now, publication.clone()));
            self.bytes += size;
        }
        self.trim(limits, now);
        publication
    }

    /// Whether [`Stream::append`] keeps a publication of `size` bytes of data.
    pub fn keeps(size: usize, limits: HistoryLimits, store: bool) -> bool {
        store && limits.size > 0 && size <= limits.max_bytes
    }

    /// A stream brought back from disk: its epoch, last offset and retained publications
    /// (oldest first, with when they were published).
    pub fn restore(epoch: String, offset: u64, entries: Vec<(Instant, Publication)>) -> Self {
        let bytes = entries.iter().map(|(_, p)| p.data.get().len()).sum();
        Self {
            epoch,
            offset,
            entries: entries.into(),
            bytes,
        }
    }

    /// The oldest retained offset.
    pub fn first_offset(&self) -> Option<u64> {
        self.entries.front().map(|(_, p)| p.offset)
    }

    /// Drops what is past the count, byte and age bounds.
    pub fn trim(&mut self, limits: HistoryLimits, now: Instant) {
        while self.entries.len() > limits.size
            || self.bytes > limits.max_bytes
            || self.entries.front().is_some_and(|(at, _)| {
                limits
                    .ttl
                    .is_some_and(|ttl| now.saturating_duration_since(*at) > ttl)
            })
        {
            match self.entries.pop_front() {
                Some((_, old)) => self.bytes -= old.data.get().len(),
                None => break,
            }
        }
    }

    /// Whether any publication is retained.
    pub fn has_history(&self) -> bool {
        !self.entries.is_empty()
    }

    /// Publications after `since` (oldest first, at most `limit`), or the newest `limit`.
    pub fn read(&self, since: Option<u64>, limit: usize) -> Vec<Publication> {
        self.read_through(since, limit, u64::MAX)
    }

    /// [`Stream::read`] of the publications up to offset `through` only (a durable channel
    /// reads only what is written).
    pub fn read_through(&self, since: Option<u64>, limit: usize, through: u64) -> Vec<Publication> {
        let upto = self.entries.partition_point(|(_, p)| p.offset <= through);
        let entries = self.entries.range(..upto);
        match since {
            Some(after) => entries
                .map(|(_, p)| p)
                .filter(|p| p.offset > after)
                .take(limit)
                .cloned()
                .collect(),
            None => {
                let skip = upto.saturating_sub(limit);
                entries.skip(skip).map(|(_, p)| p.clone()).collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::types::position::{continues_from, is_complete_replay};

    fn data(n: u64) -> Arc<RawValue> {
        Arc::from(RawValue::from_string(n.to_string()).expect("number is JSON"))
    }

    const LIMITS: HistoryLimits = HistoryLimits {
        size: 3,
        ttl: None,
        max_bytes: 1 << 20,
    };

    #[test]
    fn offsets_start_at_one_and_have_no_gaps() {
        let mut s = Stream::new();
        let now = Instant::now();
        let offsets: Vec<u64> = (0..5)
            .map(|n| s.append(data(n), None, LIMITS, now, true).offset)
            .collect();
        assert_eq!(offsets, vec![1, 2, 3, 4, 5]);
        assert_eq!(s.position().offset, 5);
        let kept: Vec<u64> = s.read(None, 10).iter().map(|p| p.offset).collect();
        assert_eq!(kept, vec![3, 4, 5]);
        let after: Vec<u64> = s.read(Some(3), 10).iter().map(|p| p.offset).collect();
        assert_eq!(after, vec![4, 5]);
        assert_eq!(s.read(None, 1)[0].offset, 5);
    }

    #[test]
    fn age_and_bytes_bound_history() {
        let mut s = Stream::new();
        let start = Instant::now();
        let limits = HistoryLimits {
            size: 10,
            ttl: Some(Duration::from_secs(5)),
            max_bytes: 4,
        };
        s.append(data(11), None, limits, start, true);
        s.append(data(22), None, limits, start, true);
        s.append(data(33), None, limits, start, true);
        assert_eq!(s.read(None, 10).len(), 2, "4 bytes hold two 2-byte values");
        s.trim(limits, start + Duration::from_secs(6));
        assert!(!s.has_history());
        assert_eq!(s.position().offset, 3, "offsets survive trimming");
    }

    /// A stream with offsets 1..=5 published and 3..=5 retained (`LIMITS` keeps three).
    fn five_published() -> (Stream, StreamPosition) {
        let mut s = Stream::new();
        let now = Instant::now();
        for n in 0..5 {
            s.append(data(n), None, LIMITS, now, true);
        }
        let current = s.position();
        (s, current)
    }

    #[test]
    fn a_page_continues_only_without_a_hole() {
        let (s, current) = five_published();
        let at = |offset| StreamPosition {
            offset,
            epoch: current.epoch.clone(),
        };
        assert!(
            continues_from(&at(3), &current, &s.read(Some(3), 1)),
            "a limit is not a hole"
        );
        assert!(
            !continues_from(&at(0), &current, &s.read(Some(0), 10)),
            "1 and 2 were trimmed"
        );
        assert!(continues_from(&at(5), &current, &[]));
        let other = StreamPosition {
            offset: 3,
            epoch: "x".into(),
        };
        assert!(!continues_from(&other, &current, &s.read(Some(3), 10)));
    }

    #[test]
    fn epochs_differ_between_lives() {
        let epoch = || {
            let mut s = Stream::new();
            s.append(data(1), None, LIMITS, Instant::now(), true);
            s.position().epoch
        };
        assert_ne!(epoch(), epoch());
    }

    #[test]
    fn replay_must_be_whole() {
        let (s, current) = five_published();
        let at = |offset| StreamPosition {
            offset,
            epoch: current.epoch.clone(),
        };
        assert!(is_complete_replay(&at(3), &current, &s.read(Some(3), 100)));
        assert!(is_complete_replay(&at(5), &current, &[]));
        assert!(
            !is_complete_replay(&at(1), &current, &s.read(Some(1), 100)),
            "2 was trimmed"
        );
        assert!(
            !is_complete_replay(&at(6), &current, &[]),
            "from the future"
        );
        let other = StreamPosition {
            offset: 3,
            epoch: "other".into(),
        };
        assert!(!is_complete_replay(&other, &current, &s.read(Some(3), 100)));
    }

    #[test]
    fn the_start_position_comes_before_offset_one_of_any_epoch() {
        let start = StreamPosition::start();
        let mut s = Stream::new();
        assert_eq!(s.position(), start, "no publication yet: no epoch");
        assert!(is_complete_replay(&start, &start, &[]));
        assert!(continues_from(&start, &start, &[]));
        let now = Instant::now();
        for n in 0..3 {
            s.append(data(n), None, LIMITS, now, true);
        }
        let current = s.position();
        assert!(
            !current.epoch.is_empty(),
            "the first publication starts an epoch"
        );
        assert!(is_complete_replay(&start, &current, &s.read(Some(0), 100)));
        assert!(continues_from(&start, &current, &s.read(Some(0), 1)));
        s.append(data(3), None, LIMITS, now, true);
        let current = s.position();
        assert!(
            !is_complete_replay(&start, &current, &s.read(Some(0), 100)),
            "offset 1 was trimmed"
        );
        assert!(!continues_from(&start, &current, &s.read(Some(0), 100)));
        let zero_of_another = StreamPosition {
            offset: 0,
            epoch: "other".into(),
        };
        assert!(
            !is_complete_replay(&zero_of_another, &current, &s.read(Some(0), 100)),
            "only the empty epoch is the start of every epoch"
        );
        // A client that kept the empty epoch past offset 0 (live publications carry their
        // epoch, so it should have taken it): its offsets may be of a life that is gone, so
        // they are read in no epoch.
        let kept_empty = StreamPosition {
            offset: 3,
            epoch: String::new(),
        };
        assert!(!is_complete_replay(
            &kept_empty,
            &current,
            &s.read(Some(3), 100)
        ));
        assert!(!continues_from(
            &kept_empty,
            &current,
            &s.read(Some(3), 100)
        ));
    }
}
