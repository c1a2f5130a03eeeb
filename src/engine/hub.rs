//! Local sessions and their channel membership; fan-out to them.
//!
//! The hub knows nothing about other nodes or history: the broker decides *what* reaches this
//! node, the hub decides *which local outboxes* get it. Channels are spread over independently
//! locked shards so publishes on different channels never contend, and a lock is only ever held
//! for synchronous work (`try_send` into outboxes), never across an `.await`. A channel with no
//! members is removed at once.
//!
//! Each membership carries a [`MemberState`] for the two situations where a frame must not go
//! straight to the outbox: while the member is *recovering* (its replay is being prepared, so
//! live frames are buffered and merged by offset afterwards) and while it is *gapped* (its
//! outbox overflowed on a `gap` namespace, so frames are dropped until the gap is reported).

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::engine::namespace::SlowPolicy;
use crate::engine::outbox::{Outbox, Push};
use crate::types::ClientId;
use crate::ws::close::CloseCode;

const SHARDS: usize = 64;

/// A frame waiting in a recovering member's buffer, with its offset if it is a publication.
pub type Buffered = (Option<u64>, Bytes);

/// One connection's subscription to one channel.
#[derive(Debug)]
pub struct MemberState {
    /// The channel.
    pub channel: Arc<str>,
    policy: SlowPolicy,
    buffer_limit: usize,
    recovering: AtomicBool,
    buffer: Mutex<Vec<Buffered>>,
    gapped: AtomicBool,
    last_offset: AtomicU64,
    /// Publications up to this offset were in the recovery's replay or live frames already:
    /// a networked broker may still deliver them after recovery finished (history and live
    /// delivery travel on different connections), and they must not reach the client twice.
    /// Reset when the broker reports a gap (`Hub::gap`): the client then recovers by itself,
    /// and a stream that restarted numbers its publications from 1 again. A gap from this
    /// client's own overflow keeps it, since late copies may still follow a recovery.
    replayed_through: AtomicU64,
    /// What taking the connection off the channel did, once its closing session detached it
    /// (see `Node::detach`): 0 still attached (or never), else [`Left`] as 1 + its index.
    left: AtomicU8,
}

impl MemberState {
    /// A membership that starts in recovery: live frames are buffered until
    /// [`Hub::finish_recovery`].
    pub fn recovering(
        channel: impl Into<Arc<str>>,
        policy: SlowPolicy,
        buffer_limit: usize,
    ) -> Arc<Self> {
        Arc::new(Self {
            channel: channel.into(),
            policy,
            buffer_limit,
            recovering: AtomicBool::new(true),
            buffer: Mutex::default(),
            gapped: AtomicBool::new(false),
            last_offset: AtomicU64::new(0),
            replayed_through: AtomicU64::new(0),
            left: AtomicU8::new(0),
        })
    }

    /// Offset of the last publication queued for this member.
    pub fn last_offset(&self) -> u64 {
        self.last_offset.load(Ordering::Acquire)
    }

    /// Records that everything up to `offset` has been handed to the client.
    pub fn delivered_up_to(&self, offset: u64) {
        self.last_offset.fetch_max(offset, Ordering::AcqRel);
    }

    /// Records that the client got everything up to `offset` when its recovery finished, so a
    /// late live delivery of any of those is dropped.
    pub fn replayed_through(&self, offset: u64) {
        self.delivered_up_to(offset);
        self.replayed_through.fetch_max(offset, Ordering::AcqRel);
    }

    /// Records what detaching the closing connection from the hub did.
    pub fn set_left(&self, left: Left) {
        let code = match left {
            Left::NotMember => 1,
            Left::Removed => 2,
            Left::Last => 3,
        };
        self.left.store(code, Ordering::Release);
    }

    /// What detaching did ([`Left::NotMember`] if it was not detached).
    pub fn left(&self) -> Left {
        match self.left.load(Ordering::Acquire) {
            2 => Left::Removed,
            3 => Left::Last,
            _ => Left::NotMember,
        }
    }

    /// Ends a gap after it was reported; frames flow again.
    pub fn clear_gap(&self) {
        self.gapped.store(false, Ordering::Release);
    }

    fn lock_buffer(&self) -> std::sync::MutexGuard<'_, Vec<Buffered>> {
        self.buffer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

#[derive(Debug, Clone)]
struct Member {
    outbox: Outbox,
    state: Arc<MemberState>,
}

/// Whether this node's broker subscription for a channel is in place yet.
///
/// The first local member subscribes the node at the broker; members that join meanwhile must
/// wait for it before reading history, or a publication made in between would reach neither
/// their replay nor their outbox.
#[derive(Debug, Default)]
pub struct BrokerReady {
    /// 0 pending, 1 subscribed, 2 failed.
    state: AtomicU8,
    notify: Notify,
}

impl BrokerReady {
    /// Records the outcome of the broker subscription and wakes every waiter.
    pub fn set(&self, subscribed: bool) {
        self.state
            .store(if subscribed { 1 } else { 2 }, Ordering::Release);
        self.notify.notify_waiters();
    }

    /// Waits for the outcome; `true` if the node is subscribed.
    pub async fn wait(&self) -> bool {
        loop {
            let notified = self.notify.notified();
            tokio::pin!(notified);
            // Register before checking, so a `set` in between is not missed.
            notified.as_mut().enable();
            match self.state.load(Ordering::Acquire) {
                1 => return true,
                2 => return false,
                _ => notified.await,
            }
        }
    }
}

#[derive(Debug, Default)]
struct Channel {
    members: HashMap<ClientId, Member>,
    ready: Arc<BrokerReady>,
}

/// Result of delivering one frame to a channel's local members.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Outboxes (or recovery buffers) that took the frame.
    pub queued: usize,
    /// Members that did not get it (full outbox, gap, or gone).
    pub dropped: usize,
}

/// Local channel membership, sharded by channel name.
#[derive(Debug)]
pub struct Hub {
    hasher: RandomState,
    shards: Box<[RwLock<HashMap<String, Channel>>]>,
}

impl Default for Hub {
    fn default() -> Self {
        Self::new()
    }
}

/// What [`Hub::subscribe`] did.
#[derive(Debug, Clone)]
pub enum Joined {
    /// The client was already a member; nothing changed.
    Already,
    /// Added; the node already had members on this channel. Wait for `ready` before reading
    /// history.
    Added(Arc<BrokerReady>),
    /// Added as the node's first member: the node must subscribe at the broker and then
    /// report the outcome through `ready`.
    First(Arc<BrokerReady>),
}

/// What [`Hub::unsubscribe`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Left {
    /// The client was not a member.
    NotMember,
    /// Removed; others remain.
    Removed,
    /// Removed the node's last member: the node should unsubscribe from the broker.
    Last,
}

impl Hub {
    /// An empty hub.
    pub fn new() -> Self {
        Self {
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| RwLock::default()).collect(),
        }
    }

    fn shard(&self, channel: &str) -> &RwLock<HashMap<String, Channel>> {
        let index = self.hasher.hash_one(channel) as usize % SHARDS;
        &self.shards[index]
    }

    fn read(&self, channel: &str) -> RwLockReadGuard<'_, HashMap<String, Channel>> {
        // Every update is a single insert/remove, so a poisoned lock is still consistent.
        self.shard(channel)
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn write(&self, channel: &str) -> RwLockWriteGuard<'_, HashMap<String, Channel>> {
        self.shard(channel)
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Adds a membership (normally created with [`MemberState::recovering`]).
    pub fn subscribe(&self, outbox: &Outbox, state: Arc<MemberState>) -> Joined {
        let mut shard = self.write(&state.channel);
        let first = !shard.contains_key(&*state.channel);
        let channel = shard.entry(state.channel.to_string()).or_default();
        if channel.members.contains_key(&outbox.id()) {
            return Joined::Already;
        }
        channel.members.insert(
            outbox.id(),
            Member {
                outbox: outbox.clone(),
                state,
            },
        );
        let ready = Arc::clone(&channel.ready);
        if first {
            Joined::First(ready)
        } else {
            Joined::Added(ready)
        }
    }

    /// Ends recovery: returns the frames buffered meanwhile, after which frames go straight to
    /// the outbox. Taking the buffer and switching mode happen under the buffer's lock, so no
    /// frame is both buffered and queued, and none is lost.
    pub fn finish_recovery(&self, state: &MemberState, replayed_through: u64) -> Vec<Buffered> {
        let mut buffer = state.lock_buffer();
        // Before live delivery starts: a late copy of a replayed publication arriving right
        // after the switch must already be recognised.
        state.replayed_through(replayed_through);
        state.recovering.store(false, Ordering::Release);
        std::mem::take(&mut *buffer)
    }

    /// Removes a membership; the channel goes away with its last member.
    pub fn unsubscribe(&self, channel: &str, client: ClientId) -> Left {
        let mut shard = self.write(channel);
        let Some(entry) = shard.get_mut(channel) else {
            return Left::NotMember;
        };
        if entry.members.remove(&client).is_none() {
            return Left::NotMember;
        }
        if entry.members.is_empty() {
            shard.remove(channel);
            Left::Last
        } else {
            Left::Removed
        }
    }

    /// Queues one encoded frame to every local member of `channel` except `skip`. `offset` is
    /// the publication's offset (`None` for join/leave), used to merge recovery buffers.
    pub fn deliver(
        &self,
        channel: &str,
        offset: Option<u64>,
        frame: &Bytes,
        skip: Option<ClientId>,
    ) -> Delivery {
        let shard = self.read(channel);
        let mut delivery = Delivery::default();
        let Some(entry) = shard.get(channel) else {
            return delivery;
        };
        for (id, member) in &entry.members {
            if Some(*id) == skip {
                continue;
            }
            if deliver_one(member, offset, frame) {
                delivery.queued += 1;
            } else {
                delivery.dropped += 1;
            }
        }
        delivery
    }

    /// Tells every local member of `channel` that publications may have been missed: each
    /// gets a `gap` (reported by its session like an outbox overflow on a `gap` namespace),
    /// or, on a channel whose members cannot be told (`close_instead`), is closed with
    /// [`CloseCode::MessagesMissed`]. Returns how many members were told.
    pub fn gap(&self, channel: &str, close_instead: bool) -> usize {
        let shard = self.read(channel);
        let Some(entry) = shard.get(channel) else {
            return 0;
        };
        for member in entry.members.values() {
            // The stream may have restarted (offsets from 1 again): nothing is a late copy now.
            member.state.replayed_through.store(0, Ordering::Release);
            if close_instead {
                member.outbox.close(CloseCode::MessagesMissed);
            } else if !member.state.gapped.swap(true, Ordering::AcqRel) {
                member.outbox.report_gap(Arc::clone(&member.state));
            }
        }
        entry.members.len()
    }

    /// Local members of a channel.
    pub fn member_count(&self, channel: &str) -> usize {
        self.read(channel)
            .get(channel)
            .map_or(0, |c| c.members.len())
    }

    /// Every channel with local members, with how many (for `/api/channels`).
    pub fn channels(&self) -> Vec<(String, usize)> {
        let mut all = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            all.extend(
                shard
                    .iter()
                    .map(|(name, channel)| (name.clone(), channel.members.len())),
            );
        }
        all.sort_unstable();
        all
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

fn deliver_one(member: &Member, offset: Option<u64>, frame: &Bytes) -> bool {
    let state = &member.state;
    if state.recovering.load(Ordering::Acquire) {
        let mut buffer = state.lock_buffer();
        // Re-checked under the lock: recovery may have finished while we waited for it.
        if state.recovering.load(Ordering::Acquire) {
            if buffer.len() >= state.buffer_limit {
                member.outbox.close(CloseCode::SlowConsumer);
                return false;
            }
            buffer.push((offset, frame.clone()));
            return true;
        }
    }
    if state.gapped.load(Ordering::Acquire) {
        return false;
    }
    if offset.is_some_and(|o| o <= state.replayed_through.load(Ordering::Acquire)) {
        // Already in the client's replay (see `MemberState::replayed_through`).
        return true;
    }
    match member.outbox.try_push(frame.clone()) {
        Push::Queued => {
            if let Some(offset) = offset {
                state.delivered_up_to(offset);
            }
            true
        }
        Push::Full => {
            match state.policy {
                SlowPolicy::Gap => {
                    if !state.gapped.swap(true, Ordering::AcqRel) {
                        member.outbox.report_gap(Arc::clone(state));
                    }
                }
                SlowPolicy::Disconnect => member.outbox.close(CloseCode::SlowConsumer),
            }
            false
        }
        Push::Closed => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use uuid::Uuid;

    fn member(
        hub: &Hub,
        channel: &str,
        capacity: usize,
        policy: SlowPolicy,
    ) -> (
        Outbox,
        crate::engine::outbox::OutboxReceiver,
        Arc<MemberState>,
    ) {
        let (outbox, rx) = Outbox::new(Uuid::new_v4(), capacity);
        let state = MemberState::recovering(channel, policy, 8);
        hub.subscribe(&outbox, Arc::clone(&state));
        hub.finish_recovery(&state, 0);
        (outbox, rx, state)
    }

    #[tokio::test]
    async fn delivers_to_members_but_the_skipped_one() {
        let hub = Hub::new();
        let (a, mut ra, _) = member(&hub, "room", 4, SlowPolicy::Disconnect);
        let (_b, mut rb, _) = member(&hub, "room", 4, SlowPolicy::Disconnect);
        let d = hub.deliver("room", Some(1), &Bytes::from_static(b"x"), Some(a.id()));
        assert_eq!(
            d,
            Delivery {
                queued: 1,
                dropped: 0
            }
        );
        assert_eq!(rb.try_recv().as_deref(), Some(&b"x"[..]));
        assert!(ra.try_recv().is_none());
        assert_eq!(
            hub.deliver("other", None, &Bytes::new(), None),
            Delivery::default()
        );
    }

    #[test]
    fn first_and_last_members_are_reported() {
        let hub = Hub::new();
        let (outbox, _rx) = Outbox::new(Uuid::new_v4(), 1);
        let state = MemberState::recovering("room", SlowPolicy::Disconnect, 1);
        assert!(matches!(
            hub.subscribe(&outbox, Arc::clone(&state)),
            Joined::First(_)
        ));
        assert!(matches!(hub.subscribe(&outbox, state), Joined::Already));
        let (_b, _rb, _) = member(&hub, "room", 1, SlowPolicy::Disconnect);
        assert_eq!(hub.channel_count(), 1);
        assert_eq!(hub.member_count("room"), 2);
        assert_eq!(hub.unsubscribe("room", outbox.id()), Left::Removed);
        assert_eq!(hub.unsubscribe("room", outbox.id()), Left::NotMember);
        assert_eq!(hub.unsubscribe("room", _b.id()), Left::Last);
        assert_eq!(hub.channel_count(), 0);
    }

    #[tokio::test]
    async fn later_members_wait_for_the_first_ones_broker_subscription() {
        let hub = Hub::new();
        let (a, _ra) = Outbox::new(Uuid::new_v4(), 1);
        let (b, _rb) = Outbox::new(Uuid::new_v4(), 1);
        let Joined::First(first) =
            hub.subscribe(&a, MemberState::recovering("c", SlowPolicy::Disconnect, 1))
        else {
            panic!("first member");
        };
        let Joined::Added(second) =
            hub.subscribe(&b, MemberState::recovering("c", SlowPolicy::Disconnect, 1))
        else {
            panic!("second member");
        };
        let waiting = tokio::spawn(async move { second.wait().await });
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "waits while the broker subscription is pending"
        );
        first.set(true);
        assert!(waiting.await.expect("waiter"));
    }

    #[test]
    fn recovering_members_buffer_until_recovery_ends() {
        let hub = Hub::new();
        let (outbox, mut rx) = Outbox::new(Uuid::new_v4(), 4);
        let state = MemberState::recovering("room", SlowPolicy::Disconnect, 8);
        hub.subscribe(&outbox, Arc::clone(&state));
        hub.deliver("room", Some(7), &Bytes::from_static(b"7"), None);
        assert!(rx.try_recv().is_none(), "buffered, not queued");
        let buffered = hub.finish_recovery(&state, 0);
        assert_eq!(buffered, vec![(Some(7), Bytes::from_static(b"7"))]);
        hub.deliver("room", Some(8), &Bytes::from_static(b"8"), None);
        assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"8")));
    }

    #[test]
    fn a_late_live_copy_of_a_replayed_publication_is_dropped_until_a_gap() {
        let hub = Hub::new();
        let (_outbox, mut rx, state) = member(&hub, "room", 8, SlowPolicy::Gap);
        // Recovery replayed 1..=5; a networked broker's live delivery of 5 comes afterwards.
        state.replayed_through(5);
        hub.deliver("room", Some(5), &Bytes::from_static(b"5"), None);
        hub.deliver("room", Some(6), &Bytes::from_static(b"6"), None);
        assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"6")));
        assert!(rx.try_recv().is_none(), "5 reached the client twice");
        // A gap of its own (an overflow) keeps the bound: late copies may still come.
        state.clear_gap();
        hub.deliver("room", Some(4), &Bytes::from_static(b"4"), None);
        assert!(rx.try_recv().is_none(), "4 was replayed");
        // After a broker's gap the client recovers by itself, and a restarted stream counts
        // from 1.
        hub.gap("room", false);
        state.clear_gap();
        hub.deliver("room", Some(1), &Bytes::from_static(b"1"), None);
        assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"1")));
    }

    #[test]
    fn overflow_disconnects_or_gaps_by_policy() {
        let hub = Hub::new();
        let (slow, _keep, _) = member(&hub, "d", 1, SlowPolicy::Disconnect);
        let frame = Bytes::from_static(b"m");
        assert_eq!(hub.deliver("d", Some(1), &frame, None).queued, 1);
        assert_eq!(hub.deliver("d", Some(2), &frame, None).dropped, 1);
        assert!(slow.is_closing());

        let (gappy, mut rx, state) = member(&hub, "g", 1, SlowPolicy::Gap);
        assert_eq!(hub.deliver("g", Some(1), &frame, None).queued, 1);
        assert_eq!(hub.deliver("g", Some(2), &frame, None).dropped, 1);
        assert!(!gappy.is_closing(), "gap policy keeps the connection");
        assert_eq!(state.last_offset(), 1);
        let gaps = gappy.take_gaps();
        assert_eq!(gaps.len(), 1);
        // Room again, but the gap is not reported yet: still dropped.
        let _ = rx.try_recv();
        assert_eq!(hub.deliver("g", Some(3), &frame, None).dropped, 1);
        state.clear_gap();
        assert_eq!(hub.deliver("g", Some(4), &frame, None).queued, 1);
        assert_eq!(state.last_offset(), 4);
    }
}
