//! The webhook queue: one ordered queue of events, delivered from its head.
//!
//! One queue for every channel is the simplest way to keep each channel's events in order: a
//! later event is never sent before an earlier one that is still being retried, because
//! nothing is sent past the head. The cost is head-of-line blocking: while the backend refuses
//! a batch, every later event waits (it is the same backend, so they would fail too).
//!
//! With a store (`RUSTY_SOCKS_DATA_DIR`), [`WebhookQueue::push`] hands the event to the store
//! thread, which writes and syncs it (many at once when they arrive together) before it joins
//! the in-memory queue the sender reads: an event is only sent once it is on disk, and is
//! marked done on disk once delivered. Without a store the queue lives in memory only and a
//! crash loses what it holds.
//!
//! Every step is bounded and none blocks the caller: at most [`MAX_PENDING`] events are
//! admitted (on their way to the disk or waiting for delivery); the store thread's command
//! channel has room for all of them ([`STORE_CAPACITY`]), and done-marks are added up in one
//! counter instead of queued one by one, so it never fills while admission holds. Past the
//! bound, new events are dropped: counted in `rusty_socks_webhook_events_dropped_total` and
//! logged once per episode, never silently. A slow disk shows as
//! `rusty_socks_webhook_events_storing` (events waiting for their write) and a warning when
//! one write takes longer than [`SLOW_STORE`].

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;

use crate::broker::transition::{StoredFuture, Transition, TransitionSink};
use crate::engine::sessions::SessionEvents;
use crate::engine::stats::counter;
use crate::types::ClientId;

use super::event::{Event, EventName, EventSet};
use super::store::Store;

/// Most events held at once; more are dropped (and counted) rather than exhausting memory
/// while the backend is away.
pub const MAX_PENDING: usize = 100_000;

/// Commands the store thread's channel holds: every admitted event, plus room for the
/// done-mark wake-up and the tracker's [`TransitionSink::on_transitions_stored`] batches.
pub const STORE_CAPACITY: usize = MAX_PENDING + 64;

/// A store round (write and sync) slower than this is logged: events wait in memory meanwhile.
pub const SLOW_STORE: Duration = Duration::from_secs(1);

/// An event in the queue, with the length of its record on disk (0 without a store).
#[derive(Debug, Clone)]
pub struct Pending {
    /// The event.
    pub event: Event,
    /// Bytes of its record in the store.
    pub len: u64,
}

/// What the store thread is asked to do.
#[derive(Debug)]
enum Command {
    Append(Event),
    /// Done-marks were added to [`Shared::acked`]: write them.
    Ack,
    /// Append these and answer whether they are on disk.
    Stored(Vec<Event>, tokio::sync::oneshot::Sender<bool>),
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    /// Events that joined the queue.
    pub queued: AtomicU64,
    /// Events delivered (a 2xx answer).
    pub sent: AtomicU64,
    /// Events in attempts that failed and are tried again.
    pub retried: AtomicU64,
    /// Events given up on (older than the max age, or the queue full).
    pub dropped: AtomicU64,
}

/// What the queue's handle, the store thread and the sender share.
#[derive(Debug)]
pub struct Shared {
    pending: Mutex<VecDeque<Pending>>,
    /// Wakes the sender when events join the queue (or shutdown begins).
    pub(super) wake: Notify,
    /// Commands handed to the store thread and not yet carried out.
    in_store: AtomicUsize,
    /// Events handed to the store thread and not yet written (the gauge of a slow disk).
    storing: AtomicUsize,
    /// Bytes delivered or dropped and not yet marked done on disk (a store thread adds them
    /// all up to one mark; delivery is head-first, so they always follow the last mark).
    acked: AtomicU64,
    /// An [`Command::Ack`] is in the channel: later done-marks join it.
    ack_queued: AtomicBool,
    /// Set when shutdown begins: the sender stops waiting to fill batches.
    pub(super) closing: AtomicBool,
    /// Set while the queue is full, so the overflow is logged once per episode.
    overflowing: AtomicBool,
    /// Events admitted and not yet delivered or dropped: those in `pending` and those on their
    /// way to the store. The bound is applied here, when an event is pushed, never after its
    /// record was written: a record on disk that the queue then refused would never be marked
    /// done, and every later done-mark would point inside a record.
    admitted: AtomicUsize,
    /// The counters.
    pub counters: Counters,
    store: Option<tokio::sync::mpsc::Sender<Command>>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, VecDeque<Pending>> {
        // Every update is a push or a pop: a poisoned lock is still consistent.
        self.pending
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Events waiting to be delivered.
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether no event waits to be delivered.
    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Whether nothing waits, in memory or on its way to the store.
    pub fn is_idle(&self) -> bool {
        self.in_store.load(Ordering::Acquire) == 0 && self.lock().is_empty()
    }

    /// Copies of the first `n` events.
    pub fn head(&self, n: usize) -> Vec<Pending> {
        self.lock().iter().take(n).cloned().collect()
    }

    /// Copies of the events at the head for which `f` holds.
    pub fn head_while(&self, f: impl Fn(&Pending) -> bool) -> Vec<Pending> {
        self.lock().iter().take_while(|p| f(p)).cloned().collect()
    }

    /// Events waiting for their write to disk.
    pub fn storing(&self) -> usize {
        self.storing.load(Ordering::Relaxed)
    }

    /// Admits one more event, unless `MAX_PENDING` are already admitted (then it is dropped,
    /// counted, and the overflow logged once per episode).
    fn admit(&self) -> bool {
        let admitted = self
            .admitted
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < MAX_PENDING).then_some(n + 1)
            })
            .is_ok();
        if admitted {
            self.overflowing.store(false, Ordering::Relaxed);
        } else {
            self.counters.dropped.fetch_add(1, Ordering::Relaxed);
            if !self.overflowing.swap(true, Ordering::Relaxed) {
                tracing::error!(
                    max = MAX_PENDING,
                    "webhook queue full: new events are dropped until the backend catches up"
                );
            }
        }
        admitted
    }

    /// Removes the first `n` events (delivered or dropped) and marks them done on disk.
    pub fn done(&self, n: usize) {
        let bytes: u64 = {
            let mut pending = self.lock();
            let n = n.min(pending.len());
            self.admitted.fetch_sub(n, Ordering::AcqRel);
            pending.drain(..n).map(|p| p.len).sum()
        };
        // Without a store thread there is nothing on disk to mark.
        if bytes > 0 && self.store.is_some() {
            self.acked.fetch_add(bytes, Ordering::AcqRel);
            if !self.ack_queued.swap(true, Ordering::AcqRel) && self.command(Command::Ack).is_err()
            {
                // The channel is full (so the thread has rounds to come, and each writes
                // what `acked` holds) or the thread is gone.
                self.ack_queued.store(false, Ordering::Release);
            }
        }
    }

    /// Adds admitted events (written to the store first, if there is one) to the queue.
    fn enqueue(&self, items: impl IntoIterator<Item = Pending>) {
        let added = {
            let mut pending = self.lock();
            let before = pending.len();
            pending.extend(items);
            pending.len() - before
        };
        self.counters
            .queued
            .fetch_add(added as u64, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// Hands `command` to the store thread without waiting; gives it back if there is no
    /// store, its channel is full or the thread is gone.
    fn command(&self, command: Command) -> Result<(), Command> {
        let Some(store) = &self.store else {
            return Err(command);
        };
        let events = command.events();
        self.in_store.fetch_add(1, Ordering::AcqRel);
        self.storing.fetch_add(events, Ordering::AcqRel);
        store.try_send(command).map_err(|err| {
            self.in_store.fetch_sub(1, Ordering::AcqRel);
            self.storing.fetch_sub(events, Ordering::AcqRel);
            match err {
                tokio::sync::mpsc::error::TrySendError::Full(command)
                | tokio::sync::mpsc::error::TrySendError::Closed(command) => command,
            }
        })
    }

    /// The channel is full although admission holds (it has room for every admitted
    /// event): `event` is dropped, counted and logged, never waited for.
    fn refused(&self, event: &Event) {
        self.admitted.fetch_sub(1, Ordering::AcqRel);
        self.counters.dropped.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            id = %event.id,
            name = event.name.as_str(),
            "webhook store channel full: event dropped"
        );
    }
}

impl Command {
    fn events(&self) -> usize {
        match self {
            Command::Append(_) => 1,
            Command::Ack => 0,
            Command::Stored(events, _) => events.len(),
        }
    }
}

/// The queue every webhook event joins. Cheap to share behind an `Arc`.
#[derive(Debug)]
pub struct WebhookQueue {
    events: EventSet,
    shared: Arc<Shared>,
}

impl WebhookQueue {
    /// A queue reporting `events`; with `store`, kept on disk, starting with the events it
    /// still holds (sent first, in their order).
    pub fn new(events: EventSet, store: Option<Store>, recovered: Vec<(Event, u64)>) -> Self {
        Self::with_capacity(events, store, recovered, STORE_CAPACITY)
    }

    /// [`WebhookQueue::new`] with a store channel of `capacity` commands (tests: a full one).
    fn with_capacity(
        events: EventSet,
        store: Option<Store>,
        recovered: Vec<(Event, u64)>,
        capacity: usize,
    ) -> Self {
        let (tx, rx) = tokio::sync::mpsc::channel(capacity);
        let with_store = store.is_some();
        let shared = Arc::new(Shared {
            pending: Mutex::new(VecDeque::new()),
            wake: Notify::new(),
            in_store: AtomicUsize::new(0),
            storing: AtomicUsize::new(0),
            acked: AtomicU64::new(0),
            ack_queued: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            overflowing: AtomicBool::new(false),
            admitted: AtomicUsize::new(recovered.len()),
            counters: Counters::default(),
            store: with_store.then_some(tx),
        });
        if !recovered.is_empty() {
            tracing::info!(
                events = recovered.len(),
                "webhook events from before the restart are sent first"
            );
            shared.lock().extend(
                recovered
                    .into_iter()
                    .map(|(event, len)| Pending { event, len }),
            );
            shared.wake.notify_one();
        }
        if let Some(store) = store {
            let weak = Arc::downgrade(&shared);
            let spawned = std::thread::Builder::new()
                .name("webhook-store".into())
                .spawn(move || store_thread(store, rx, weak));
            if let Err(err) = spawned {
                tracing::error!(%err, "cannot start the webhook store thread");
            }
        }
        Self { events, shared }
    }

    /// What the sender and the metrics read.
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Whether events named `name` are reported.
    pub fn reports(&self, name: EventName) -> bool {
        self.events.contains(name)
    }

    /// Whether any channel or member event is reported (so the node must track transitions).
    pub fn reports_transitions(&self) -> bool {
        [
            EventName::ChannelOccupied,
            EventName::ChannelVacated,
            EventName::MemberAdded,
            EventName::MemberRemoved,
        ]
        .into_iter()
        .any(|name| self.reports(name))
    }

    /// Queues `event` (if its kind is reported). Never blocks: with a store, the write and the
    /// sync happen on the store thread.
    pub fn push(&self, event: Event) {
        if !self.reports(event.name) || !self.shared.admit() {
            return;
        }
        let event = match self.shared.command(Command::Append(event)) {
            Ok(()) => return,
            Err(Command::Append(event)) => event,
            Err(_) => return,
        };
        if self.shared.store.as_ref().is_some_and(|s| !s.is_closed()) {
            self.shared.refused(&event);
            return;
        }
        // No store, or its thread is gone: the event waits in memory only.
        self.shared.enqueue([Pending { event, len: 0 }]);
    }

    /// Waits until every event is delivered, or `deadline`; returns how many are left (kept
    /// on disk with a store, lost without one).
    pub async fn flush(&self, deadline: tokio::time::Instant) -> usize {
        self.shared.closing.store(true, Ordering::Release);
        self.shared.wake.notify_one();
        while !self.shared.is_idle() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Done-marks of the last deliveries reach the disk before the process ends.
        let marks = deadline + Duration::from_millis(500);
        while self.shared.in_store.load(Ordering::Acquire) > 0
            && tokio::time::Instant::now() < marks
        {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.shared.len()
    }

    /// Renders the counters for `/metrics`.
    pub fn render(&self, out: &mut String) {
        let c = &self.shared.counters;
        let read = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            out,
            "rusty_socks_webhook_events_queued_total",
            "Webhook events queued (on disk when RUSTY_SOCKS_DATA_DIR is set)",
            read(&c.queued),
        );
        counter(
            out,
            "rusty_socks_webhook_events_sent_total",
            "Webhook events delivered (the backend answered 2xx)",
            read(&c.sent),
        );
        counter(
            out,
            "rusty_socks_webhook_events_retried_total",
            "Webhook events in POSTs that failed and are tried again",
            read(&c.retried),
        );
        counter(
            out,
            "rusty_socks_webhook_events_dropped_total",
            "Webhook events given up on (older than RUSTY_SOCKS_WEBHOOK_MAX_AGE, or the queue full)",
            read(&c.dropped),
        );
        crate::engine::stats::gauge(
            out,
            "rusty_socks_webhook_events_pending",
            "Webhook events waiting to be delivered",
            i64::try_from(self.shared.len()).unwrap_or(i64::MAX),
        );
        crate::engine::stats::gauge(
            out,
            "rusty_socks_webhook_events_storing",
            "Webhook events waiting to be written to RUSTY_SOCKS_DATA_DIR",
            i64::try_from(self.shared.storing()).unwrap_or(i64::MAX),
        );
    }
}

impl TransitionSink for WebhookQueue {
    fn on_transition(&self, transition: Transition) {
        if self.reports(transition.kind.into()) {
            self.push(Event::from_transition(transition));
        }
    }

    /// Writes and syncs them as one command (waiting for room in the store's channel: the
    /// tracker's worker calls this, never the message path) and answers whether all of them
    /// are on disk. Kinds not reported count as stored: nothing is ever sent of them.
    fn on_transitions_stored(&self, transitions: Vec<Transition>) -> StoredFuture<'_> {
        let events: Vec<Event> = transitions
            .into_iter()
            .filter(|t| self.reports(t.kind.into()))
            .map(Event::from_transition)
            .collect();
        let offered = events.len();
        let events: Vec<Event> = events.into_iter().filter(|_| self.shared.admit()).collect();
        let all = events.len() == offered;
        Box::pin(async move {
            if events.is_empty() {
                return all;
            }
            let Some(store) = &self.shared.store else {
                self.shared
                    .enqueue(events.into_iter().map(|event| Pending { event, len: 0 }));
                return false;
            };
            let (reply, stored) = tokio::sync::oneshot::channel();
            let count = events.len();
            self.shared.in_store.fetch_add(1, Ordering::AcqRel);
            self.shared.storing.fetch_add(count, Ordering::AcqRel);
            if let Err(err) = store.send(Command::Stored(events, reply)).await {
                self.shared.in_store.fetch_sub(1, Ordering::AcqRel);
                self.shared.storing.fetch_sub(count, Ordering::AcqRel);
                // The store thread is gone: memory only.
                if let Command::Stored(events, _) = err.0 {
                    self.shared
                        .enqueue(events.into_iter().map(|event| Pending { event, len: 0 }));
                }
                return false;
            }
            stored.await.unwrap_or(false) && all
        })
    }
}

impl SessionEvents for WebhookQueue {
    fn connected(&self, client: ClientId, user: Option<Arc<str>>) {
        if self.reports(EventName::ClientConnected) {
            self.push(Event::client(EventName::ClientConnected, client, user));
        }
    }

    fn disconnected(&self, client: ClientId, user: Option<Arc<str>>) {
        if self.reports(EventName::ClientDisconnected) {
            self.push(Event::client(EventName::ClientDisconnected, client, user));
        }
    }
}

/// Writes and syncs appended events (all that arrived together, with one sync), then hands
/// them to the sender; writes the done-marks. Ends when the queue is gone.
fn store_thread(
    mut store: Store,
    mut rx: tokio::sync::mpsc::Receiver<Command>,
    shared: std::sync::Weak<Shared>,
) {
    let mut broken = false;
    while let Some(first) = rx.blocking_recv() {
        let mut commands = vec![first];
        while commands.len() < 4096 {
            match rx.try_recv() {
                Ok(command) => commands.push(command),
                Err(_) => break,
            }
        }
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let started = std::time::Instant::now();
        let count = commands.len();
        let mut appended = Vec::new();
        let mut replies = Vec::new();
        for command in commands {
            match command {
                Command::Append(event) => appended.push(event),
                Command::Ack => shared.ack_queued.store(false, Ordering::Release),
                Command::Stored(events, reply) => {
                    appended.extend(events);
                    replies.push(reply);
                }
            }
        }
        let events = appended.len();
        if !appended.is_empty() {
            let lens = if broken {
                vec![0; appended.len()]
            } else {
                match store.append(&appended) {
                    Ok(lens) => lens,
                    Err(err) => {
                        broken = true;
                        tracing::error!(
                            %err,
                            "webhook queue: cannot write to disk; events are kept in memory only \
                             from now on (a crash loses them)"
                        );
                        vec![0; appended.len()]
                    }
                }
            };
            shared.enqueue(
                appended
                    .into_iter()
                    .zip(lens)
                    .map(|(event, len)| Pending { event, len }),
            );
        }
        for reply in replies {
            let _ = reply.send(!broken);
        }
        // After the appends: a mark only ever covers records already written.
        let acked = shared.acked.swap(0, Ordering::AcqRel);
        if acked > 0
            && !broken
            && let Err(err) = store.ack(acked)
        {
            // Delivered events may be sent again after a restart: receivers drop them by id.
            tracing::warn!(%err, "webhook queue: cannot mark delivered events done on disk");
        }
        let took = started.elapsed();
        if took > SLOW_STORE {
            tracing::warn!(
                ms = took.as_millis() as u64,
                events,
                waiting = shared.storing().saturating_sub(events),
                "webhook queue: a write to disk was slow; events wait in memory meanwhile"
            );
        }
        shared.storing.fetch_sub(events, Ordering::AcqRel);
        shared.in_store.fetch_sub(count, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settled(shared: &Shared) {
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        while shared.in_store.load(Ordering::Acquire) > 0 {
            assert!(
                std::time::Instant::now() < deadline,
                "the store thread stalled"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn connected() -> Event {
        Event::client(EventName::ClientConnected, uuid::Uuid::new_v4(), None)
    }

    #[test]
    fn a_full_queue_refuses_before_writing_so_the_disk_holds_exactly_what_waits() {
        let dir = temp_dir();
        let (store, recovered) = Store::open(&dir).expect("test setup");
        let queue = WebhookQueue::new(
            EventSet::of([EventName::ClientConnected]),
            Some(store),
            recovered,
        );
        let shared = Arc::clone(queue.shared());
        for _ in 0..MAX_PENDING + 5 {
            queue.push(connected());
        }
        settled(&shared);
        assert_eq!(shared.len(), MAX_PENDING);
        assert_eq!(shared.counters.dropped.load(Ordering::Relaxed), 5);
        // Half is delivered; three more arrive; all but those three are delivered.
        shared.done(MAX_PENDING / 2);
        let late: Vec<Event> = (0..3).map(|_| connected()).collect();
        for event in &late {
            queue.push(event.clone());
        }
        settled(&shared);
        shared.done(shared.len() - late.len());
        settled(&shared);
        drop(queue);
        drop(shared);
        // What a restart reads back is exactly the three that still wait: the refused events
        // were never written, and the done-marks end where the last delivered record ends.
        let (_, recovered) = Store::open(&dir).expect("reopen");
        let ids: Vec<_> = recovered.iter().map(|(e, _)| e.id).collect();
        assert_eq!(ids, late.iter().map(|e| e.id).collect::<Vec<_>>());
        std::fs::remove_dir_all(dir).expect("test cleanup");
    }

    fn temp_dir() -> std::path::PathBuf {
        std::env::temp_dir().join(format!("rusty-socks-queue-{}", uuid::Uuid::new_v4()))
    }

    /// The store thread stops at its next hand-over to the sender while `pending` is locked:
    /// a stalled disk, as far as the channel can tell.
    #[test]
    fn a_full_store_channel_drops_and_counts_without_blocking_and_marks_coalesce() {
        let dir = temp_dir();
        let (store, recovered) = Store::open(&dir).expect("test setup");
        let queue = WebhookQueue::with_capacity(
            EventSet::of([EventName::ClientConnected]),
            Some(store),
            recovered,
            4,
        );
        let shared = Arc::clone(queue.shared());
        let channel = shared.store.clone().expect("a store");
        // Two events reach the sender's queue, so there is something to mark done.
        queue.push(connected());
        queue.push(connected());
        settled(&shared);
        let stalled = shared.lock();
        queue.push(connected());
        // The thread took it and waits for the lock.
        while channel.capacity() < 4 || shared.storing() == 0 {
            std::thread::sleep(Duration::from_millis(5));
        }
        let started = std::time::Instant::now();
        for _ in 0..4 {
            queue.push(connected());
        }
        assert_eq!(channel.capacity(), 0, "full");
        queue.push(connected());
        assert_eq!(shared.counters.dropped.load(Ordering::Relaxed), 1);
        assert_eq!(shared.storing(), 5, "the one taken and four waiting");
        drop(stalled);
        // Many done-marks while the channel is full or busy: at most one command.
        let marks = std::thread::spawn({
            let shared = Arc::clone(&shared);
            move || {
                shared.done(1);
                shared.done(1);
            }
        });
        marks.join().expect("done-marks");
        assert!(started.elapsed() < Duration::from_secs(5), "never blocked");
        settled(&shared);
        assert_eq!(shared.len(), 5);
        assert_eq!(shared.storing(), 0);
        drop(queue);
        drop(shared);
        drop(channel);
        // On disk: the five admitted and not done; the dropped one was never written.
        let (_, recovered) = Store::open(&dir).expect("reopen");
        assert_eq!(recovered.len(), 5);
        std::fs::remove_dir_all(dir).expect("test cleanup");
    }

    fn vacated(channel: &str) -> Transition {
        crate::broker::Holding {
            channel: Arc::from(channel),
            user: None,
        }
        .transition(false, "test", 1, 0)
    }

    #[tokio::test]
    async fn transitions_handed_over_together_say_whether_they_are_on_disk() {
        let dir = temp_dir();
        let (store, recovered) = Store::open(&dir).expect("test setup");
        let queue = WebhookQueue::new(EventSet::DEFAULT, Some(store), recovered);
        assert!(
            queue
                .on_transitions_stored(vec![vacated("a"), vacated("b")])
                .await
        );
        // Stored means readable after a crash, in order.
        let (_, recovered) = Store::open(&dir).expect("reopen");
        let channels: Vec<_> = recovered
            .iter()
            .map(|(e, _)| e.channel.as_deref().map(str::to_owned))
            .collect();
        assert_eq!(channels, [Some("a".to_owned()), Some("b".to_owned())]);
        // A kind not reported has nothing to keep.
        let quiet = WebhookQueue::new(EventSet::of([EventName::ClientConnected]), None, vec![]);
        assert!(quiet.on_transitions_stored(vec![vacated("c")]).await);
        // Without a store they wait in memory: not durable.
        let memory = WebhookQueue::new(EventSet::DEFAULT, None, vec![]);
        assert!(!memory.on_transitions_stored(vec![vacated("d")]).await);
        assert_eq!(memory.shared().len(), 1);
        drop(queue);
        std::fs::remove_dir_all(dir).expect("test cleanup");
    }
}
