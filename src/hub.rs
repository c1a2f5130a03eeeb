//! Local sessions and their channel membership; fan-out to them.
//!
//! The hub knows nothing about other nodes or history: a [`Broker`](crate::broker::Broker)
//! decides *what* reaches this node, the hub decides *which local outboxes* get it. Channels are
//! spread over independently locked shards so publishes on different channels never contend,
//! and a lock is only ever held for synchronous work (`try_send` into outboxes), never across an
//! `.await`. A channel with no members is removed at once.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;

use crate::ws::outbox::{ClientId, Outbox, Push};

const SHARDS: usize = 64;

type Members = HashMap<ClientId, Outbox>;

/// Result of delivering one frame to a channel's local members.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Outboxes that accepted the frame.
    pub queued: usize,
    /// Members whose outbox was full or gone.
    pub dropped: usize,
}

/// Local channel membership, sharded by channel name.
#[derive(Debug)]
pub struct Hub {
    hasher: RandomState,
    shards: Box<[RwLock<HashMap<String, Members>>]>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
        }
    }

    fn shard(&self, channel: &str) -> &RwLock<HashMap<String, Members>> {
        let index = self.hasher.hash_one(channel) as usize % SHARDS;
        &self.shards[index]
    }

    fn read(&self, channel: &str) -> RwLockReadGuard<'_, HashMap<String, Members>> {
        // A panic while holding the lock cannot leave the maps half-updated (every update is a
        // single insert/remove), so a poisoned lock is still safe to use.
        self.shard(channel)
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self, channel: &str) -> RwLockWriteGuard<'_, HashMap<String, Members>> {
        self.shard(channel)
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a session to a channel. Returns false if it was already a member.
    pub fn subscribe(&self, channel: &str, outbox: Outbox) -> bool {
        let mut shard = self.write(channel);
        let members = shard.entry(channel.to_owned()).or_default();
        members.insert(outbox.id(), outbox).is_none()
    }

    /// Removes a session from a channel; the channel goes away with its last member.
    pub fn unsubscribe(&self, channel: &str, client: ClientId) -> bool {
        let mut shard = self.write(channel);
        let Some(members) = shard.get_mut(channel) else {
            return false;
        };
        let removed = members.remove(&client).is_some();
        if members.is_empty() {
            shard.remove(channel);
        }
        removed
    }

    /// Queues one encoded frame to every local member of `channel` except `skip`.
    pub fn deliver(&self, channel: &str, frame: &Bytes, skip: Option<ClientId>) -> Delivery {
        let shard = self.read(channel);
        let mut delivery = Delivery::default();
        let Some(members) = shard.get(channel) else {
            return delivery;
        };
        for (id, outbox) in members {
            if Some(*id) == skip {
                continue;
            }
            match outbox.push(frame.clone()) {
                Push::Queued => delivery.queued += 1,
                Push::Dropped => delivery.dropped += 1,
            }
        }
        delivery
    }

    /// Local members of a channel.
    pub fn member_count(&self, channel: &str) -> usize {
        self.read(channel).get(channel).map_or(0, HashMap::len)
    }

    /// Channels with at least one local member.
    pub fn channel_count(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.read()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    #[tokio::test]
    async fn delivers_to_members_but_the_skipped_one() {
        let hub = Hub::new();
        let (a, mut ra, _) = Outbox::new(Uuid::new_v4(), 4);
        let (b, mut rb, _) = Outbox::new(Uuid::new_v4(), 4);
        let a_id = a.id();
        assert!(hub.subscribe("room", a));
        assert!(hub.subscribe("room", b));
        let d = hub.deliver("room", &Bytes::from_static(b"x"), Some(a_id));
        assert_eq!(
            d,
            Delivery {
                queued: 1,
                dropped: 0
            }
        );
        assert_eq!(rb.recv().await.as_deref(), Some(&b"x"[..]));
        assert!(ra.try_recv().is_err());
        assert_eq!(
            hub.deliver("other", &Bytes::new(), None),
            Delivery::default()
        );
    }

    #[test]
    fn empty_channels_are_removed() {
        let hub = Hub::new();
        let (a, _ra, _) = Outbox::new(Uuid::new_v4(), 1);
        let id = a.id();
        hub.subscribe("room", a);
        assert_eq!((hub.channel_count(), hub.member_count("room")), (1, 1));
        assert!(hub.unsubscribe("room", id));
        assert!(!hub.unsubscribe("room", id));
        assert_eq!(hub.channel_count(), 0);
    }

    #[test]
    fn a_full_outbox_is_dropped_not_waited_for() {
        let hub = Hub::new();
        let (slow, _keep_rx, signal) = Outbox::new(Uuid::new_v4(), 1);
        hub.subscribe("room", slow);
        let frame = Bytes::from_static(b"m");
        assert_eq!(hub.deliver("room", &frame, None).queued, 1);
        assert_eq!(hub.deliver("room", &frame, None).dropped, 1);
        assert!(signal.requested().is_some());
    }
}
