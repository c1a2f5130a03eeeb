//! Stored chat messages, replayed to newcomers.
//!
//! The store keeps encoded frames, so a replay is a copy of bytes and never a re-encode. It is
//! bounded per channel by message count *and* total bytes: a single large message can never be
//! replayed to every newcomer forever, and memory stays bounded however chatty clients are.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use bytes::Bytes;

/// Where chat messages are kept for replay.
///
/// Contract: `append` and `recent` are synchronous and must not block on I/O, because the
/// memory broker calls them under its per-channel lock to keep "append then deliver" atomic
/// with "subscribe then replay". A durable store keeps an in-memory tail and writes behind.
pub trait MessageStore: Send + Sync + std::fmt::Debug {
    /// Adds a message (an encoded frame) to the end of `channel`'s history, evicting the
    /// oldest messages past the bounds.
    fn append(&self, channel: &str, frame: Bytes);
    /// The last `limit` messages of `channel`, oldest first.
    fn recent(&self, channel: &str, limit: usize) -> Vec<Bytes>;
}

#[derive(Debug, Default)]
struct ChannelLog {
    frames: VecDeque<Bytes>,
    bytes: usize,
}

/// In-memory [`MessageStore`]: lost on restart.
#[derive(Debug)]
pub struct MemoryStore {
    max_messages: usize,
    max_bytes: usize,
    channels: Mutex<HashMap<String, ChannelLog>>,
}

impl MemoryStore {
    /// A store keeping at most `max_messages` and `max_bytes` per channel.
    pub fn new(max_messages: usize, max_bytes: usize) -> Self {
        Self {
            max_messages,
            max_bytes,
            channels: Mutex::default(),
        }
    }
}

impl MessageStore for MemoryStore {
    fn append(&self, channel: &str, frame: Bytes) {
        if self.max_messages == 0 || frame.len() > self.max_bytes {
            return;
        }
        let mut channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let log = channels.entry(channel.to_owned()).or_default();
        log.bytes += frame.len();
        log.frames.push_back(frame);
        while log.frames.len() > self.max_messages || log.bytes > self.max_bytes {
            match log.frames.pop_front() {
                Some(old) => log.bytes -= old.len(),
                None => break,
            }
        }
    }

    fn recent(&self, channel: &str, limit: usize) -> Vec<Bytes> {
        let channels = self
            .channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let Some(log) = channels.get(channel) else {
            return Vec::new();
        };
        let skip = log.frames.len().saturating_sub(limit);
        log.frames.iter().skip(skip).cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: usize, len: usize) -> Bytes {
        let mut v = n.to_string().into_bytes();
        v.resize(len.max(v.len()), b'.');
        Bytes::from(v)
    }

    #[test]
    fn keeps_the_newest_by_count() {
        let store = MemoryStore::new(3, 1 << 20);
        for n in 0..5 {
            store.append("c", msg(n, 1));
        }
        let recent: Vec<_> = store.recent("c", 10);
        assert_eq!(recent, vec![msg(2, 1), msg(3, 1), msg(4, 1)]);
        assert_eq!(store.recent("c", 2), vec![msg(3, 1), msg(4, 1)]);
        assert!(store.recent("other", 2).is_empty());
    }

    #[test]
    fn keeps_total_bytes_bounded() {
        let store = MemoryStore::new(100, 250);
        for n in 0..10 {
            store.append("c", msg(n, 100));
        }
        assert_eq!(store.recent("c", 100), vec![msg(8, 100), msg(9, 100)]);
        store.append("c", msg(99, 251));
        assert_eq!(
            store.recent("c", 100).len(),
            2,
            "a message over the byte bound is not stored"
        );
    }

    #[test]
    fn zero_size_disables_storage() {
        let store = MemoryStore::new(0, 1000);
        store.append("c", msg(1, 1));
        assert!(store.recent("c", 10).is_empty());
    }
}
