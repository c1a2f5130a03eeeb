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

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, DefaultHasher, Hash, Hasher, RandomState};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, RwLockReadGuard, RwLockWriteGuard};

use bytes::Bytes;
use tokio::sync::Notify;

use crate::engine::namespace::SlowPolicy;
use crate::engine::outbox::{Outbox, Push, Pushing};
use crate::types::ClientId;
use crate::types::thin_list::ThinList;
use crate::ws::close::CloseCode;
use crate::ws::deflate::SharedFrame;
use runs::Runs;

mod runs;

const SHARDS: usize = 64;

/// A frame waiting in a recovering member's buffer, with its epoch's [`epoch_tag`] and offset
/// if it is a publication.
pub type Buffered = (Option<(u64, u64)>, Bytes);

/// A number standing for an epoch, so that every delivery can compare epochs without a lock
/// or an allocation: 0 for the empty epoch (a channel without publications), a hash of the
/// epoch otherwise (two epochs of one channel colliding is a 1 in 2^64 chance).
pub fn epoch_tag(epoch: &str) -> u64 {
    if epoch.is_empty() {
        return 0;
    }
    let mut hasher = DefaultHasher::new();
    epoch.hash(&mut hasher);
    hasher.finish().max(1)
}

/// A recovering membership's held-back frames, allocated on the first one: one pointer
/// inline instead of a `Vec`'s three, since most memberships never buffer.
type RecoveryBuffer = ThinList<Buffered>;

/// One connection's subscription to one channel.
#[derive(Debug)]
pub struct MemberState {
    /// The channel.
    pub channel: Arc<str>,
    policy: SlowPolicy,
    /// Frames a recovery buffers at most. 32 bits: every subscription has one of these
    /// states, and it must stay in the allocator's 80-byte size class (see
    /// `a_membership_fits_the_80_byte_size_class`).
    buffer_limit: u32,
    recovering: AtomicBool,
    /// Live frames held back while recovering; one pointer until the first one (a `Vec`
    /// inline takes three, in every subscription).
    buffer: Mutex<RecoveryBuffer>,
    gapped: AtomicBool,
    /// The [`epoch_tag`] of the stream `last_offset` and `replayed_through` count in. A
    /// publication of another epoch starts both again: its offsets say nothing about the old
    /// ones (a late copy check across epochs would drop the new stream's first publications).
    epoch: AtomicU64,
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
            buffer_limit: u32::try_from(buffer_limit).unwrap_or(u32::MAX),
            recovering: AtomicBool::new(true),
            buffer: Mutex::default(),
            gapped: AtomicBool::new(false),
            epoch: AtomicU64::new(0),
            last_offset: AtomicU64::new(0),
            replayed_through: AtomicU64::new(0),
            left: AtomicU8::new(0),
        })
    }

    /// Offset of the last publication queued for this member (in its epoch, see
    /// [`MemberState::enter_epoch`]).
    pub fn last_offset(&self) -> u64 {
        self.last_offset.load(Ordering::Acquire)
    }

    /// Records that everything up to `offset` has been handed to the client.
    pub fn delivered_up_to(&self, offset: u64) {
        self.last_offset.fetch_max(offset, Ordering::AcqRel);
    }

    /// [`MemberState::delivered_up_to`] on the delivery path, where it runs for every
    /// delivery: a load and a store instead of a read-modify-write (a locked instruction per
    /// delivery). Deliveries to one member come from one broker path in order, and the only
    /// other writer, [`Hub::finish_recovery`], runs before live delivery starts.
    fn delivered_in_order(&self, offset: u64) {
        if self.last_offset.load(Ordering::Acquire) < offset {
            self.last_offset.store(offset, Ordering::Release);
        }
    }

    /// Makes `epoch` (an [`epoch_tag`]) the member's stream; if it was another one, what was
    /// delivered or replayed of that one counts no more. Deliveries to one member come from
    /// one broker path in order, so this does not race with itself.
    pub fn enter_epoch(&self, epoch: u64) {
        // A load first: on every delivery, and almost always the same epoch.
        if self.epoch.load(Ordering::Acquire) != epoch
            && self.epoch.swap(epoch, Ordering::AcqRel) != epoch
        {
            self.last_offset.store(0, Ordering::Release);
            self.replayed_through.store(0, Ordering::Release);
        }
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

    /// Whether frames are being dropped until a gap is reported (see [`Outbox::report_gap`]).
    pub fn is_gapped(&self) -> bool {
        self.gapped.load(Ordering::Acquire)
    }

    /// Ends a gap after it was reported; frames flow again.
    pub fn clear_gap(&self) {
        self.gapped.store(false, Ordering::Release);
    }

    fn lock_buffer(&self) -> std::sync::MutexGuard<'_, RecoveryBuffer> {
        self.buffer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// One member of a channel, found in the channel's set by its client's id, which its outbox
/// holds: a map keyed by the id kept it a second time, 16 bytes more per slot of the table
/// (a channel's table has up to twice as many slots as members).
#[derive(Debug, Clone)]
struct Member {
    outbox: Outbox,
    state: Arc<MemberState>,
}

impl PartialEq for Member {
    fn eq(&self, other: &Self) -> bool {
        self.outbox.id_ref() == other.outbox.id_ref()
    }
}

impl Eq for Member {}

/// As its id, so the set finds it by id ([`Borrow`]).
impl Hash for Member {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.outbox.id_ref().hash(state);
    }
}

impl Borrow<ClientId> for Member {
    fn borrow(&self) -> &ClientId {
        self.outbox.id_ref()
    }
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

/// How many member frames of join/leave/`Disconnect` notices one channel fans out per second
/// at most (and in one burst). A notice costs one frame per member, so when N members leave
/// at once the notices alone would be N² frames: 361 million for 19,000 legacy clients. Past
/// this budget a notice is dropped for the whole channel at once, at the cost of a counter.
/// At 1,000 members that is still 1,000 notices a second.
pub const NOTICE_FRAMES_PER_SECOND: f64 = 1_000_000.0;

/// A channel's budget of notice frames (see [`NOTICE_FRAMES_PER_SECOND`]).
#[derive(Debug)]
struct NoticeBudget {
    tokens: f64,
    at: std::time::Instant,
}

impl Default for NoticeBudget {
    fn default() -> Self {
        Self {
            tokens: NOTICE_FRAMES_PER_SECOND,
            at: std::time::Instant::now(),
        }
    }
}

impl NoticeBudget {
    /// Whether a notice to `frames` members may go out now. A full budget always lets one
    /// through (a channel larger than the budget still gets its notices, at a lower rate).
    fn take(&mut self, frames: usize) -> bool {
        let now = std::time::Instant::now();
        let refill = now.duration_since(self.at).as_secs_f64() * NOTICE_FRAMES_PER_SECOND;
        self.tokens = (self.tokens + refill).min(NOTICE_FRAMES_PER_SECOND);
        self.at = now;
        let cost = frames as f64;
        if self.tokens >= cost.min(NOTICE_FRAMES_PER_SECOND) {
            self.tokens -= cost;
            true
        } else {
            false
        }
    }
}

#[derive(Debug, Default)]
struct Channel {
    members: HashSet<Member>,
    ready: Arc<BrokerReady>,
    notices: Mutex<NoticeBudget>,
}

/// Result of delivering one frame to a channel's local members.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivery {
    /// Outboxes (or recovery buffers) that took the frame.
    pub queued: usize,
    /// Members that did not get it (full outbox, gap, or gone).
    pub dropped: usize,
    /// Notice frames dropped instead of queued: this notice, for members whose queue held
    /// too much already or for the whole channel past its budget, or, for a publication,
    /// older notices it pushed out of full queues. Never anyone's fault.
    pub notices_dropped: usize,
}

/// One publication for [`Hub::deliver_batch`].
#[derive(Debug, Clone)]
pub struct Outgoing {
    /// The publication's [`epoch_tag`] and offset.
    pub place: (u64, u64),
    /// The encoded frame.
    pub frame: Bytes,
    /// A member that must not get it (a legacy publisher does not get its own message).
    pub skip: Option<ClientId>,
}

impl Delivery {
    /// Counts one member's outcome for one frame.
    fn count(&mut self, outcome: Outcome) {
        match outcome {
            Outcome::Queued => self.queued += 1,
            Outcome::QueuedOverNotice => {
                self.queued += 1;
                self.notices_dropped += 1;
            }
            Outcome::NoticeDropped => self.notices_dropped += 1,
            Outcome::Dropped => self.dropped += 1,
        }
    }
}

/// What happened to one frame for one member.
enum Outcome {
    Queued,
    /// Queued in place of a notice that was dropped.
    QueuedOverNotice,
    /// A notice that was not queued.
    NoticeDropped,
    Dropped,
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
        if channel.members.contains(outbox.id_ref()) {
            return Joined::Already;
        }
        channel.members.insert(Member {
            outbox: outbox.clone(),
            state,
        });
        let ready = Arc::clone(&channel.ready);
        if first {
            Joined::First(ready)
        } else {
            Joined::Added(ready)
        }
    }

    /// Ends recovery: returns the frames buffered meanwhile, after which frames go straight to
    /// the outbox. Taking the buffer and switching mode happen under the buffer's lock, so no
    /// frame is both buffered and queued, and none is lost. `epoch` is the [`epoch_tag`] of
    /// the position the recovery read, `replayed_through` its offset.
    pub fn finish_recovery(
        &self,
        state: &MemberState,
        epoch: u64,
        replayed_through: u64,
    ) -> Vec<Buffered> {
        let mut buffer = state.lock_buffer();
        // Before live delivery starts: a late copy of a replayed publication arriving right
        // after the switch must already be recognised.
        state.enter_epoch(epoch);
        state.replayed_through(replayed_through);
        state.recovering.store(false, Ordering::Release);
        buffer.take()
    }

    /// Removes a membership; the channel goes away with its last member.
    pub fn unsubscribe(&self, channel: &str, client: ClientId) -> Left {
        let mut shard = self.write(channel);
        let Some(entry) = shard.get_mut(channel) else {
            return Left::NotMember;
        };
        if !entry.members.remove(&client) {
            return Left::NotMember;
        }
        if entry.members.is_empty() {
            shard.remove(channel);
            Left::Last
        } else {
            Left::Removed
        }
    }

    /// Queues one encoded frame to every local member of `channel` except `skip`. `publication`
    /// is the publication's [`epoch_tag`] and offset, used to merge recovery buffers and drop
    /// late copies of replayed publications (of the same epoch only); `None` marks a join, leave
    /// or `Disconnect` notice, which is dropped rather than ever making a member a slow
    /// consumer: past the channel's [`NOTICE_FRAMES_PER_SECOND`], or for a member whose queue
    /// holds too much already (`outbox::NOTICE_QUEUE_LIMIT`), and a publication pushes queued
    /// notices out of a full queue.
    pub fn deliver(
        &self,
        channel: &str,
        publication: Option<(u64, u64)>,
        frame: &Bytes,
        skip: Option<ClientId>,
    ) -> Delivery {
        // One shared frame for every member: its compressed form is built once, if needed.
        let frame = &SharedFrame::from(frame);
        let shard = self.read(channel);
        let mut delivery = Delivery::default();
        let Some(entry) = shard.get(channel) else {
            return delivery;
        };
        if publication.is_none() {
            let skipped = skip.is_some_and(|id| entry.members.contains(&id));
            let frames = entry.members.len() - usize::from(skipped);
            let allowed = entry
                .notices
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .take(frames);
            if !allowed {
                delivery.notices_dropped = frames;
                return delivery;
            }
        }
        for member in &entry.members {
            if skip.is_some_and(|id| id == member.outbox.id()) {
                continue;
            }
            delivery.count(deliver_one(member, publication, frame));
        }
        delivery
    }

    /// [`Hub::deliver`] for several publications of one channel, in their order, member by
    /// member: each member's state and queue are touched once for the whole batch instead of
    /// once per publication. With 10,000 members those no longer fit in a core's cache, and
    /// publication by publication every delivery missed it (issue 19: the cost per delivery
    /// at 10,000 subscribers was 0.70× that at 1,000, at best).
    pub fn deliver_batch(&self, channel: &str, batch: &[Outgoing]) -> Delivery {
        let mut delivery = Delivery::default();
        if batch.is_empty() {
            return delivery;
        }
        // One shared frame per publication for every member (see `deliver`).
        let frames: Vec<SharedFrame> = batch.iter().map(|o| SharedFrame::from(&o.frame)).collect();
        let shard = self.read(channel);
        let Some(entry) = shard.get(channel) else {
            return delivery;
        };
        let mut runs = Runs::new(batch, &frames, entry.members.len());
        for member in &entry.members {
            let id = member.outbox.id();
            let state = &member.state;
            if state.recovering.load(Ordering::Acquire) || state.gapped.load(Ordering::Acquire) {
                // The rare paths, frame by frame (buffering, dropping).
                for (outgoing, frame) in batch.iter().zip(&frames) {
                    if Some(id) != outgoing.skip {
                        delivery.count(deliver_one(member, Some(outgoing.place), frame));
                    }
                }
            } else if !runs.deliver(member, id, &mut delivery) {
                deliver_frames(member, id, batch, &frames, &mut delivery);
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
        for member in &entry.members {
            // The stream may have restarted (offsets from 1 again): nothing is a late copy now.
            member.state.replayed_through.store(0, Ordering::Release);
            if close_instead {
                member.outbox.close(CloseCode::MessagesMissed);
            } else if !member.state.gapped.swap(true, Ordering::AcqRel) {
                member.outbox.report_gap(&member.state);
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

fn deliver_one(member: &Member, publication: Option<(u64, u64)>, frame: &SharedFrame) -> Outcome {
    let state = &member.state;
    if state.recovering.load(Ordering::Acquire) {
        let mut buffer = state.lock_buffer();
        // Re-checked under the lock: recovery may have finished while we waited for it.
        if state.recovering.load(Ordering::Acquire) {
            return buffer_one(buffer.as_vec_mut(), member, publication, frame);
        }
    }
    if state.gapped.load(Ordering::Acquire) {
        return Outcome::Dropped;
    }
    let Some((epoch, offset)) = publication else {
        return match member.outbox.try_push_notice(frame.clone()) {
            Push::Queued => Outcome::Queued,
            Push::Closed => Outcome::Dropped,
            _ => Outcome::NoticeDropped,
        };
    };
    state.enter_epoch(epoch);
    if offset <= state.replayed_through.load(Ordering::Acquire) {
        // Already in the client's replay (see `MemberState::replayed_through`).
        return Outcome::Queued;
    }
    match member.outbox.try_push(frame.clone()) {
        pushed @ (Push::Queued | Push::QueuedOverNotice) => {
            state.delivered_in_order(offset);
            if pushed == Push::Queued {
                Outcome::Queued
            } else {
                Outcome::QueuedOverNotice
            }
        }
        Push::Full => {
            overflowed(member);
            Outcome::Dropped
        }
        Push::Closed | Push::NoticeDropped => Outcome::Dropped,
    }
}

/// A batch of publications, frame by frame, for a member that is neither recovering nor
/// gapped, under one lock of its queue ([`deliver_one`]'s publication path). The first frame
/// that does not fit applies the slow-client policy, and the rest of the batch is dropped, as
/// it would be one by one (the member is then gapped or closing).
fn deliver_frames(
    member: &Member,
    id: ClientId,
    batch: &[Outgoing],
    frames: &[SharedFrame],
    delivery: &mut Delivery,
) {
    let mut pushing = member.outbox.pushing();
    let full = push_frames(&mut pushing, &member.state, id, batch, frames, delivery);
    drop(pushing);
    if full {
        overflowed(member);
    }
}

/// [`deliver_frames`] under a lock already held; `true` if the queue filled, for the caller
/// to apply the slow-client policy once it has let go of the lock ([`Pushing`]).
fn push_frames(
    pushing: &mut Pushing<'_>,
    state: &MemberState,
    id: ClientId,
    batch: &[Outgoing],
    frames: &[SharedFrame],
    delivery: &mut Delivery,
) -> bool {
    let mut full = false;
    for (outgoing, frame) in batch.iter().zip(frames) {
        if Some(id) == outgoing.skip {
            continue;
        }
        // Gapped meanwhile (a broker's gap, on another thread): dropped, as one by one.
        if full || state.gapped.load(Ordering::Acquire) {
            delivery.dropped += 1;
            continue;
        }
        let (epoch, offset) = outgoing.place;
        state.enter_epoch(epoch);
        if offset <= state.replayed_through.load(Ordering::Acquire) {
            // Already in the client's replay (see `MemberState::replayed_through`).
            delivery.queued += 1;
            continue;
        }
        match pushing.push(frame.clone()) {
            pushed @ (Push::Queued | Push::QueuedOverNotice) => {
                state.delivered_in_order(offset);
                delivery.queued += 1;
                if pushed == Push::QueuedOverNotice {
                    delivery.notices_dropped += 1;
                }
            }
            Push::Full => {
                full = true;
                delivery.dropped += 1;
            }
            Push::Closed | Push::NoticeDropped => delivery.dropped += 1,
        }
    }
    full
}

/// Applies a member's slow-client policy when its queue had no room for a publication: a
/// gap (reported once) on a `gap` namespace, otherwise a close with
/// [`CloseCode::SlowConsumer`].
fn overflowed(member: &Member) {
    let state = &member.state;
    match state.policy {
        SlowPolicy::Gap => {
            if !state.gapped.swap(true, Ordering::AcqRel) {
                member.outbox.report_gap(state);
            }
        }
        SlowPolicy::Disconnect => member.outbox.close(CloseCode::SlowConsumer),
    }
}

/// [`deliver_one`] for a recovering member, under its buffer's lock: notices as in the
/// outbox (up to half the buffer, and pushed out by publications), so only publications can
/// overflow it.
fn buffer_one(
    buffer: &mut Vec<Buffered>,
    member: &Member,
    publication: Option<(u64, u64)>,
    frame: &SharedFrame,
) -> Outcome {
    let limit = member.state.buffer_limit as usize;
    if publication.is_none() {
        let notices = (limit / 2).clamp(1, crate::engine::outbox::NOTICE_QUEUE_LIMIT);
        if buffer.len() >= notices {
            return Outcome::NoticeDropped;
        }
        buffer.push((None, frame.plain().clone()));
        return Outcome::Queued;
    }
    let mut outcome = Outcome::Queued;
    if buffer.len() >= limit {
        match buffer.iter().position(|(o, _)| o.is_none()) {
            Some(notice) => {
                buffer.remove(notice);
                outcome = Outcome::QueuedOverNotice;
            }
            None => {
                member.outbox.close(CloseCode::SlowConsumer);
                return Outcome::Dropped;
            }
        }
    }
    buffer.push((publication, frame.plain().clone()));
    outcome
}

#[cfg(test)]
#[path = "hub_tests.rs"]
mod tests;
