//! The bounded queue between fan-out and one connection's writer, and the signals that travel
//! beside it.
//!
//! Fan-out never waits: it pushes an already-encoded frame (a cheap `Bytes` clone), or a run of
//! them laid end to end that counts as its frames ([`Pushing::push_run`]), and moves on. When
//! a connection's queue is full, the client is not keeping up, and the hub applies the
//! channel's slow-client policy: close the connection with [`CloseCode::SlowConsumer`] (4001),
//! or, on a `gap` namespace, drop that channel's frames and report a gap once the queue has
//! drained. Waiting instead would let one client that stops reading stall every other
//! subscriber, and growing the queue would let it grow the server's memory without bound.
//!
//! The queue is a `VecDeque` behind a per-connection mutex (never contended by more than the
//! publishers of that moment and the connection itself) with one wake-up (an atomic flag, and
//! the session's waker kept under the queue's lock) for everything: frames, close requests and
//! gap reports. An idle connection's queue
//! holds no allocation at all (a drained queue keeps its slots for the next batch until the
//! session's heartbeat tick), which is what keeps memory per idle connection small; a general
//! purpose channel would pre-allocate a block of slots per connection.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};

use bytes::{Bytes, BytesMut};

use crate::engine::hub::MemberState;
use crate::types::{ClientId, clock};
use crate::ws::close::CloseCode;
use crate::ws::deflate::{Deflate, SharedFrame};

/// The close codes that can be requested from outside a session.
const SIGNAL_CODES: [CloseCode; 8] = [
    CloseCode::SlowConsumer,
    CloseCode::GoingAway,
    CloseCode::InternalError,
    CloseCode::MessagesMissed,
    CloseCode::TokenExpired,
    CloseCode::RateLimited,
    CloseCode::Disconnected,
    CloseCode::TryAgainLater,
];

/// A notice is queued only while fewer frames than this (or than half the queue's capacity,
/// if smaller) are waiting. A client with that much unread is behind; when 19,000 clients
/// leave at once, the notices bound this way cost at most a few MB in all instead of a full
/// queue per connection.
pub const NOTICE_QUEUE_LIMIT: usize = 64;

/// What [`OutboxReceiver::drain_frames`] moved.
#[derive(Debug, Default, Clone, Copy)]
pub struct Drained {
    /// Frames moved.
    pub count: u64,
    /// When the oldest of them was queued ([`clock::stamp_us`]).
    pub since: u32,
    /// Their bytes as the connection sends them.
    pub sent: usize,
    /// The bytes they keep alive: the plain frames.
    pub held: usize,
}

/// One queued frame, or a run of them ([`Pushing::push_run`]); `notice` marks a
/// join/leave/`Disconnect` notice (always one frame), which may be dropped to make room (see
/// [`Outbox::try_push_notice`]).
#[derive(Debug)]
struct Queued {
    frame: SharedFrame,
    notice: bool,
}

#[derive(Debug, Default)]
struct Queue {
    frames: VecDeque<Queued>,
    /// How many of `frames` are notices.
    notices: u32,
    /// When the queue last went from empty to non-empty ([`clock::stamp_us`]: 32 bits, for
    /// the write-delay histogram).
    since: u32,
    /// The session task to wake, registered while it waits. Under the queue's lock, which a
    /// push holds anyway when it finds the queue empty, instead of an `AtomicWaker` of its
    /// own: 8 bytes less per connection, which keeps the outbox in the allocator's 112-byte
    /// size class (see `an_outbox_fits_the_112_byte_size_class`).
    waker: Option<Waker>,
}

#[derive(Debug)]
struct Shared {
    id: ClientId,
    /// Frames the queue holds at most. This struct and the fields below are 32 bits where
    /// that suffices: every connection has one (112 bytes with its reference counts, the
    /// allocator's 112-byte size class; at 152 it took 160).
    capacity: u32,
    queue: Mutex<Queue>,
    /// Frames queued (a run counts its frames: see [`Pushing::push_run`]), kept beside the
    /// queue so the session's frequent "anything queued?" checks need no lock. Written under
    /// the queue's lock, where it is the queue's length against `capacity`; a push that races
    /// a zero read wakes the session anyway.
    queued: AtomicU32,
    /// Set when the session should look: a frame arrived in an empty queue, a close was
    /// requested, or a gap was reported. The task to wake is `Queue::waker`.
    woken: AtomicBool,
    /// 0 while open; otherwise the index + 1 in [`SIGNAL_CODES`] of the first close request.
    close: AtomicU8,
    has_gaps: AtomicBool,
    /// Set by the server's heartbeat ticker: time to check the heartbeat deadlines.
    tick: AtomicBool,
    /// The session is gone: pushes are refused. Read and written under the queue's lock only
    /// (kept out of [`Queue`], whose size sets the outbox's size class).
    closed: AtomicBool,
}

/// A queue length as stored in `Shared::queued`: never above the capacity, a `u32`.
fn queued_count(len: usize) -> u32 {
    u32::try_from(len).unwrap_or(u32::MAX)
}

impl Shared {
    fn wake(&self) {
        self.wake_locked(self.queue());
    }

    /// Marks the outbox woken and wakes the session if it waits, taking its waker under the
    /// lock already held (released before the wake-up: the session may run on another worker
    /// at once). The flag is set before the waker is looked at, and the session registers
    /// under the same lock before it checks the flag again, so no wake-up is lost.
    fn wake_locked(&self, mut queue: MutexGuard<'_, Queue>) {
        self.woken.store(true, Ordering::Release);
        let waker = queue.waker.take();
        drop(queue);
        if let Some(waker) = waker {
            waker.wake();
        }
    }

    /// Frames queued; only meaningful under the queue's lock (see `Shared::queued`).
    fn len(&self) -> usize {
        self.queued.load(Ordering::Relaxed) as usize
    }

    /// Whether the session is gone; only meaningful under the queue's lock, which orders it.
    fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Relaxed)
    }

    fn queue(&self) -> MutexGuard<'_, Queue> {
        // Nothing under the lock can panic between updating the queue and its length (see
        // `Shared::queued`), so a poisoned lock is still consistent.
        self.queue
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The sending side of one connection's queue, held by the hub (cheap to clone).
#[derive(Debug, Clone)]
pub struct Outbox {
    shared: Arc<Shared>,
}

/// The receiving side, owned by the connection's session.
#[derive(Debug)]
pub struct OutboxReceiver {
    shared: Arc<Shared>,
}

/// What happened to one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// The frame is queued.
    Queued,
    /// The queue is full: the client is not keeping up.
    Full,
    /// The session is gone.
    Closed,
    /// The frame is queued in place of the oldest queued notice, which was dropped.
    QueuedOverNotice,
    /// A notice was not queued: the queue holds too many frames already (see
    /// [`NOTICE_QUEUE_LIMIT`]; the client is not at fault).
    NoticeDropped,
}

impl Outbox {
    /// A queue of at most `capacity` frames for client `id`, and its receiving end.
    pub fn new(id: ClientId, capacity: usize) -> (Self, OutboxReceiver) {
        let shared = Arc::new(Shared {
            id,
            capacity: u32::try_from(capacity).unwrap_or(u32::MAX).max(1),
            queue: Mutex::default(),
            queued: AtomicU32::new(0),
            woken: AtomicBool::new(false),
            close: AtomicU8::new(0),
            has_gaps: AtomicBool::new(false),
            closed: AtomicBool::new(false),
            tick: AtomicBool::new(false),
        });
        (
            Self {
                shared: Arc::clone(&shared),
            },
            OutboxReceiver { shared },
        )
    }

    /// The client this queue feeds.
    pub fn id(&self) -> ClientId {
        self.shared.id
    }

    /// The id where it is kept, for sets that find an outbox by its id without keeping the
    /// id a second time.
    pub fn id_ref(&self) -> &ClientId {
        &self.shared.id
    }

    /// Queues an encoded frame without waiting. A full queue that holds notices drops the
    /// oldest of them to make room: only a queue full of publications is the client's fault.
    ///
    /// The frame is shared: a publication's compressed form (permessage-deflate) is built
    /// once, by the first session that needs it, for every outbox it went to.
    pub fn try_push(&self, frame: impl Into<SharedFrame>) -> Push {
        self.pushing().push(frame.into())
    }

    /// Takes the queue's lock for a run of publication pushes ([`Pushing`]): the hub's batch
    /// fan-out queues a whole run for one member under one lock and with one wake-up.
    pub fn pushing(&self) -> Pushing<'_> {
        let queue = self.shared.queue();
        let was_empty = queue.frames.is_empty();
        Pushing {
            outbox: self,
            len: self.shared.len(),
            queue: Some(queue),
            was_empty,
        }
    }

    /// Queues a join/leave/`Disconnect` notice, only while fewer than
    /// [`NOTICE_QUEUE_LIMIT`] frames (and less than half the capacity) are queued:
    /// notices are the first thing to give up when a client falls behind, so they never make
    /// it a slow consumer (4001), and a burst of them (thousands of clients leaving at once)
    /// cannot grow a connection's queue past half its capacity.
    pub fn try_push_notice(&self, frame: impl Into<SharedFrame>) -> Push {
        let queue = self.shared.queue();
        if self.shared.is_closed() {
            return Push::Closed;
        }
        if self.shared.len() >= (self.shared.capacity as usize / 2).clamp(1, NOTICE_QUEUE_LIMIT) {
            return Push::NoticeDropped;
        }
        self.push_locked(queue, frame.into(), true);
        Push::Queued
    }

    fn push_locked(&self, mut queue: MutexGuard<'_, Queue>, frame: SharedFrame, notice: bool) {
        let frames = frame.frames();
        debug_assert!(!notice || frames == 1, "a notice is one frame");
        queue.frames.push_back(Queued { frame, notice });
        queue.notices += u32::from(notice);
        let first = queue.frames.len() == 1;
        if first {
            queue.since = clock::stamp_us();
        }
        self.shared
            .queued
            .store(queued_count(self.shared.len() + frames), Ordering::Release);
        if first {
            // A non-empty queue is drained until empty, so only this transition needs a wake.
            hold_or_wake(&self.shared, queue);
        }
    }

    /// Asks the session to close with `code` (the first request wins).
    pub fn close(&self, code: CloseCode) {
        let Some(index) = SIGNAL_CODES.iter().position(|c| *c == code) else {
            return;
        };
        let first = self
            .shared
            .close
            .compare_exchange(0, index as u8 + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            // Debug only: shutdown and mass disconnects close thousands at once (the server logs
            // a summary, and the counters say how many and why).
            tracing::debug!(client_id = %self.shared.id, code = code.code(), reason = code.reason(), "closing connection");
            self.shared.wake();
        }
    }

    /// Asks the session to check its heartbeat deadlines (see `crate::engine::sessions`).
    pub fn tick(&self) {
        self.shared.tick.store(true, Ordering::Release);
        self.shared.wake();
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        self.shared.close.load(Ordering::Acquire) != 0
    }

    /// Records that a membership overflowed on a `gap` namespace; the session reports it once
    /// everything queued before it has been written.
    ///
    /// Only a flag: the membership itself is marked (`MemberState::gapped`, set by the caller
    /// before this), and the session finds which of its memberships are gapped. A list of them
    /// here would cost every connection's outbox 8 bytes for something that rarely happens.
    pub fn report_gap(&self, state: &MemberState) {
        tracing::debug!(client_id = %self.shared.id, channel = %state.channel, "outbox overflow: gap");
        self.shared.has_gaps.store(true, Ordering::Release);
        self.shared.wake();
    }

    /// Takes the gap report: whether a gap was reported since the last call (see
    /// [`Outbox::report_gap`]).
    pub fn take_gap_report(&self) -> bool {
        self.shared.has_gaps.swap(false, Ordering::AcqRel)
    }
}

/// An outbox's queue, locked for a run of pushes ([`Outbox::pushing`]). The length the
/// session reads without the lock is updated, and the session woken, when it is dropped.
///
/// While it is alive, nothing may call another method of the same outbox: `close`, `tick`,
/// `report_gap` and every wake-up take the queue's lock (the session's waker lives under it),
/// and a second lock on the same queue would deadlock. The hub drops it before applying a
/// slow-client policy (`hub::deliver_frames`).
#[derive(Debug)]
pub struct Pushing<'a> {
    outbox: &'a Outbox,
    /// Frames queued, as pushes go (stored in `Shared::queued` when dropped).
    len: usize,
    /// Always `Some` until dropped (taken then, to release the lock before the wake-up).
    queue: Option<MutexGuard<'a, Queue>>,
    was_empty: bool,
}

impl Pushing<'_> {
    /// [`Outbox::try_push`] under the lock already held: one frame (a run goes through
    /// [`Pushing::push_run`], which checks it fits whole).
    pub fn push(&mut self, frame: SharedFrame) -> Push {
        debug_assert_eq!(frame.frames(), 1, "a run pushed as one frame");
        let Some(queue) = self.queue.as_deref_mut() else {
            return Push::Closed;
        };
        if self.outbox.shared.is_closed() {
            return Push::Closed;
        }
        let mut pushed = Push::Queued;
        if self.len >= self.outbox.shared.capacity as usize {
            let oldest = if queue.notices > 0 {
                queue.frames.iter().position(|q| q.notice)
            } else {
                None
            };
            match oldest.and_then(|i| queue.frames.remove(i)) {
                Some(_) => {
                    queue.notices -= 1;
                    self.len = self.len.saturating_sub(1);
                    pushed = Push::QueuedOverNotice;
                }
                None => return Push::Full,
            }
        }
        if queue.frames.is_empty() {
            queue.since = clock::stamp_us();
        }
        self.len += frame.frames();
        queue.frames.push_back(Queued {
            frame,
            notice: false,
        });
        pushed
    }

    /// Queues a run of publications ([`SharedFrame::run`]) as one entry that counts as its
    /// frames, only if all of them fit: `Full` otherwise, with nothing queued and no notice
    /// dropped, so the caller can push the frames one by one instead and reach the limit
    /// exactly where it would have.
    pub fn push_run(&mut self, run: SharedFrame) -> Push {
        let Some(queue) = self.queue.as_deref_mut() else {
            return Push::Closed;
        };
        if self.outbox.shared.is_closed() {
            return Push::Closed;
        }
        let frames = run.frames();
        if self.len + frames > self.outbox.shared.capacity as usize {
            return Push::Full;
        }
        if queue.frames.is_empty() {
            queue.since = clock::stamp_us();
        }
        queue.frames.push_back(Queued {
            frame: run,
            notice: false,
        });
        self.len += frames;
        Push::Queued
    }
}

impl Drop for Pushing<'_> {
    fn drop(&mut self) {
        let Some(queue) = self.queue.take() else {
            return;
        };
        let len = self.len;
        self.outbox
            .shared
            .queued
            .store(queued_count(len), Ordering::Release);
        if self.was_empty && len > 0 {
            hold_or_wake(&self.outbox.shared, queue);
        }
    }
}

thread_local! {
    /// Whether a [`WakeBatch`] is being polled on this thread: pushes then hold their wake-ups
    /// in [`HELD_WAKES`] instead of waking at once.
    static HOLDING: Cell<bool> = const { Cell::new(false) };
    /// The wake-ups held back by the [`WakeBatch`] being polled on this thread (its list, lent
    /// for the duration of one poll).
    static HELD_WAKES: RefCell<Vec<Arc<Shared>>> = const { RefCell::new(Vec::new()) };
}

/// Wakes the session of a queue that just got its first frame, or holds the wake-up back
/// for the [`WakeBatch`] being polled on this thread. Takes the queue's lock guard, to take
/// the waker without locking again.
fn hold_or_wake(shared: &Arc<Shared>, queue: MutexGuard<'_, Queue>) {
    if HOLDING.get() {
        drop(queue);
        HELD_WAKES.with_borrow_mut(|held| held.push(Arc::clone(shared)));
    } else {
        shared.wake_locked(queue);
    }
}

/// Holds back the wake-ups of the outboxes that a session's own messages fill, and releases
/// them together: after a batch of messages, before the session yields, and whenever the
/// handler has to wait (so nothing is held while the task is suspended).
///
/// Why: a push wakes a session only when its queue goes from empty to non-empty. With one
/// worker thread the woken sessions cannot run before the publisher yields, so each
/// subscriber takes a whole batch of publications per wake and per `write`. With two or more
/// workers, an idle worker would run each woken subscriber right away, while the publisher
/// is still at its first message: every publication then costs every subscriber a wake, a
/// lock handover between cores and a `write` of its own, and the second worker made the
/// server slower per delivery than one (issue 19: 0.57x the deliveries per CPU-second).
/// Held back until the batch ends, the wake-ups go out once per subscriber per batch again,
/// however many workers there are. Frames are queued at once either way; only the wake waits,
/// for at most one batch of the publisher's messages ([`crate::engine::session`] yields every
/// 256).
#[derive(Debug, Default)]
pub struct WakeBatch {
    held: Vec<Arc<Shared>>,
}

impl WakeBatch {
    /// Polls `future` with this batch holding the wake-ups of the pushes it makes. If it has
    /// to wait, the held wake-ups go out before it is suspended.
    pub async fn hold<F: Future>(&mut self, future: F) -> F::Output {
        let mut future = pin!(future);
        std::future::poll_fn(|cx| {
            if HOLDING.get() {
                // Already inside a batch on this thread (not expected): that one holds them.
                return future.as_mut().poll(cx);
            }
            HELD_WAKES.with_borrow_mut(|held| std::mem::swap(held, &mut self.held));
            HOLDING.set(true);
            // Restores the thread's state even if the future panics.
            let restore = Restore(&mut self.held);
            let polled = future.as_mut().poll(cx);
            drop(restore);
            if polled.is_pending() {
                self.release();
            }
            polled
        })
        .await
    }

    /// Wakes every session held back so far.
    pub fn release(&mut self) {
        for shared in self.held.drain(..) {
            shared.wake();
        }
    }
}

impl Drop for WakeBatch {
    fn drop(&mut self) {
        self.release();
    }
}

/// Takes the thread's held wake-ups back into their batch when one poll ends.
struct Restore<'a>(&'a mut Vec<Arc<Shared>>);

impl Drop for Restore<'_> {
    fn drop(&mut self) {
        HOLDING.set(false);
        HELD_WAKES.with_borrow_mut(|held| std::mem::swap(held, self.0));
    }
}

impl OutboxReceiver {
    /// Ready once something happened since the last time it was ready: frames, a close request
    /// or a gap. Wake-ups that happen while nobody polls are kept, not lost.
    pub fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.shared.woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        {
            let mut queue = self.shared.queue();
            if !queue
                .waker
                .as_ref()
                .is_some_and(|w| w.will_wake(cx.waker()))
            {
                queue.waker = Some(cx.waker().clone());
            }
        }
        // Checked again after registering, so a wake in between is not missed.
        if self.shared.woken.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Whether a heartbeat tick arrived since the last call.
    pub fn take_tick(&self) -> bool {
        self.shared.tick.swap(false, Ordering::AcqRel)
    }

    /// The close requested from outside, if any.
    pub fn close_requested(&self) -> Option<CloseCode> {
        match self.shared.close.load(Ordering::Acquire) {
            0 => None,
            n => SIGNAL_CODES.get(usize::from(n) - 1).copied(),
        }
    }

    /// Moves queued frames into `buf` until it holds `limit` bytes (at least one entry, a
    /// frame or a run, if any is queued), compressed when the connection negotiated
    /// `deflate`; returns how many frames were moved and since when the oldest of them waited
    /// ([`clock::stamp_us`]).
    pub fn drain_into(
        &self,
        buf: &mut BytesMut,
        limit: usize,
        deflate: Option<Deflate>,
    ) -> (u64, u32) {
        if self.shared.queued.load(Ordering::Acquire) == 0 {
            return (0, 0);
        }
        let mut queue = self.shared.queue();
        // Sized first, then reserved once: growing the buffer frame by frame reallocated and
        // copied it over and over (a third of the instructions per delivery in a profile).
        let (mut entries, mut count) = (0, 0);
        let mut bytes = 0;
        for queued in &queue.frames {
            if entries > 0 && buf.len() + bytes >= limit {
                break;
            }
            bytes += queued.frame.for_connection(deflate).len();
            entries += 1;
            count += queued.frame.frames();
        }
        buf.reserve(bytes);
        let queue = &mut *queue;
        for queued in queue.frames.drain(..entries) {
            queue.notices -= u32::from(queued.notice);
            buf.extend_from_slice(queued.frame.for_connection(deflate));
        }
        self.shared.queued.store(
            queued_count(self.shared.len().saturating_sub(count)),
            Ordering::Release,
        );
        (count as u64, queue.since)
    }

    /// Moves queued frames, shared and uncopied, to the back of `out` until their frames
    /// hold `room` bytes (at least one entry, a frame or a run, if any is queued); returns
    /// how many frames were moved, since when the oldest of them waited
    /// ([`clock::stamp_us`]), their bytes as this connection sends them (`deflate`), and the
    /// bytes they keep alive (the plain frames, which a compressed one keeps too): a slow
    /// client is bounded by what it keeps, not by what its frames compress to. For a
    /// transport that writes them without copying each into a buffer of the connection's own
    /// (see `session/output.rs`).
    pub fn drain_frames(
        &self,
        out: &mut VecDeque<SharedFrame>,
        room: usize,
        deflate: Option<Deflate>,
    ) -> Drained {
        let mut drained = Drained::default();
        if self.shared.queued.load(Ordering::Acquire) == 0 {
            return drained;
        }
        let mut queue = self.shared.queue();
        let queue = &mut *queue;
        let (mut entries, mut count) = (0, 0);
        for queued in &queue.frames {
            if entries > 0 && drained.held >= room {
                break;
            }
            drained.sent += queued.frame.for_connection(deflate).len();
            drained.held += queued.frame.plain().len();
            entries += 1;
            count += queued.frame.frames();
        }
        out.reserve(entries);
        for queued in queue.frames.drain(..entries) {
            queue.notices -= u32::from(queued.notice);
            out.push_back(queued.frame);
        }
        self.shared.queued.store(
            queued_count(self.shared.len().saturating_sub(count)),
            Ordering::Release,
        );
        drained.count = count as u64;
        drained.since = queue.since;
        drained
    }

    /// Gives back the queue's memory if it is empty. The session calls this on its heartbeat
    /// tick: a busy connection keeps its slots (no allocation per batch of pushes), an idle
    /// one holds none within a second.
    pub fn release_idle(&self) {
        let mut queue = self.shared.queue();
        if queue.frames.is_empty() && queue.frames.capacity() > 0 {
            queue.frames = VecDeque::new();
        }
    }

    /// The next queued frame, if any (a run's frames one by one).
    pub fn try_recv(&mut self) -> Option<Bytes> {
        let mut queue = self.shared.queue();
        let queued = queue.frames.pop_front()?;
        queue.notices -= u32::from(queued.notice);
        self.shared.queued.store(
            queued_count(self.shared.len().saturating_sub(1)),
            Ordering::Release,
        );
        let mut parts = queued.frame.parts();
        let first = parts.remove(0);
        for frame in parts.into_iter().rev() {
            queue.frames.push_front(Queued {
                frame: frame.into(),
                notice: false,
            });
        }
        Some(first)
    }

    /// Whether nothing is queued.
    pub fn is_empty(&self) -> bool {
        self.shared.queued.load(Ordering::Acquire) == 0
    }

    /// Whether a gap is waiting to be reported.
    pub fn has_gaps(&self) -> bool {
        self.shared.has_gaps.load(Ordering::Acquire)
    }
}

impl Drop for OutboxReceiver {
    fn drop(&mut self) {
        let mut queue = self.shared.queue();
        self.shared.closed.store(true, Ordering::Relaxed);
        queue.frames = VecDeque::new();
        queue.notices = 0;
        // Nothing will wake the ended session; its task's memory need not wait for the
        // outbox's last handle.
        queue.waker = None;
        self.shared.queued.store(0, Ordering::Release);
    }
}

#[cfg(test)]
#[path = "outbox_tests.rs"]
mod tests;
