//! The single-node broker: streams, history and presence in this process.
//!
//! Channels are spread over independently locked stripes. Publishing takes the channel's stripe
//! for the whole assign-offset / append / deliver step (synchronous work only, never across an
//! `.await`), which makes offsets gapless and delivery ordered. A channel's state is freed when
//! the node is not subscribed, no history is retained and nobody is present; the next
//! publication then starts a new epoch, which is exactly what a client must be told. Reads of
//! a channel without state (history, presence) leave none behind, and tell the position
//! [`StreamPosition::start`] until the first publication.
//!
//! Idempotency keys live in the channel's state too, so they die with its epoch (a key never
//! returns an offset of another life of the channel) and keep the state, and with it the
//! epoch, alive while they are remembered.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::{BuildHasher, RandomState};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use super::{
    Broker, BrokerError, BrokerEvents, BrokerFuture, BrokerStatus, ClientInfo, HistoryPage,
    Holding, PublishRequest, Published, Swept, Transition,
};
use crate::broker::history::{ENTRY_OVERHEAD, HistoryLimits, Stream};
use crate::types::StreamPosition;
use crate::types::{ClientId, Publication};

const STRIPES: usize = 64;
/// Every this many operations on a stripe, its idle channels are swept.
const SWEEP_EVERY: u32 = 64;
/// Most idempotency keys remembered per channel: past it the oldest are forgotten, so a
/// publisher sending a new key with every message cannot grow a channel without bound.
const MAX_KEYS: usize = 10_000;
/// Bookkeeping bytes counted per remembered key on top of its length.
const KEY_OVERHEAD: usize = 64;

/// Durable channels: the outcome of a keyed publication's write, shared by its publisher and
/// every retry with the same key (a retry is a duplicate only once its original is stored).
pub(in crate::broker) type Stored = futures_util::future::Shared<crate::broker::durable::log::Ack>;

/// The idempotency keys used on one channel in its current epoch, oldest first.
#[derive(Debug, Default)]
pub(in crate::broker) struct Keys {
    /// Key to (offset of its first publish, when it is forgotten, its write if durable and
    /// written in this process).
    offsets: HashMap<String, (u64, Instant, Option<Stored>)>,
    /// Keys in the order they were remembered, with when they expire.
    order: VecDeque<(Instant, String)>,
    bytes: usize,
}

impl Keys {
    pub(in crate::broker) fn get(&self, key: &str, now: Instant) -> Option<u64> {
        self.entry(key, now).map(|(offset, _)| offset)
    }

    /// The offset of the key's first publish and, on a durable channel, its write.
    pub(in crate::broker) fn entry(
        &self,
        key: &str,
        now: Instant,
    ) -> Option<(u64, Option<Stored>)> {
        self.offsets
            .get(key)
            .filter(|(_, expires, _)| *expires > now)
            .map(|(offset, _, stored)| (*offset, stored.clone()))
    }

    pub(in crate::broker) fn insert(&mut self, key: String, offset: u64, expires: Instant) {
        self.insert_stored(key, offset, expires, None);
    }

    pub(in crate::broker) fn insert_stored(
        &mut self,
        key: String,
        offset: u64,
        expires: Instant,
        stored: Option<Stored>,
    ) {
        self.bytes += key.len() + KEY_OVERHEAD;
        self.offsets.insert(key.clone(), (offset, expires, stored));
        self.order.push_back((expires, key));
        while self.order.len() > MAX_KEYS {
            self.pop();
        }
    }

    /// The lowest offset of a key still remembered at `now` (the durable sweep keeps the
    /// segments of those records, so the keys survive a restart).
    pub(in crate::broker) fn oldest_live(&self, now: Instant) -> Option<u64> {
        // Offsets grow in the order keys are remembered; skip entries a reuse replaced.
        self.order
            .iter()
            .filter(|(expires, _)| *expires > now)
            .find_map(|(expires, key)| {
                self.offsets
                    .get(key)
                    .filter(|(_, e, _)| e == expires)
                    .map(|(offset, _, _)| *offset)
            })
    }

    fn trim(&mut self, now: Instant) {
        while self
            .order
            .front()
            .is_some_and(|(expires, _)| *expires <= now)
        {
            self.pop();
        }
    }

    fn pop(&mut self) {
        if let Some((expires, key)) = self.order.pop_front() {
            self.bytes -= key.len() + KEY_OVERHEAD;
            // A key used again after it expired has a newer entry: keep that one.
            if self
                .offsets
                .get(&key)
                .is_some_and(|(_, e, _)| *e == expires)
            {
                self.offsets.remove(&key);
            }
        }
    }
}

#[derive(Debug, Default)]
pub(in crate::broker) struct ChannelState {
    pub(in crate::broker) stream: Stream,
    /// Node subscriptions minus unsubscriptions (see the trait's counting contract).
    pub(in crate::broker) subscribed: u32,
    presence: HashMap<ClientId, ClientInfo>,
    pub(in crate::broker) limits: Option<HistoryLimits>,
    pub(in crate::broker) keys: Keys,
    /// Durable channels: the highest offset the log writer has written (it raises it before
    /// live delivery). Reads report nothing past it: a crash loses what is not written, and a
    /// client must never hold a position the restarted server would assign again.
    pub(in crate::broker) written: Option<Arc<AtomicU64>>,
}

impl ChannelState {
    pub(in crate::broker) fn idle(&self) -> bool {
        self.subscribed == 0
            && !self.stream.has_history()
            && self.presence.is_empty()
            && self.keys.order.is_empty()
    }

    pub(in crate::broker) fn trim(&mut self, now: Instant) {
        if let Some(limits) = self.limits {
            self.stream.trim(limits, now);
        }
        self.keys.trim(now);
    }

    /// Bytes counted against the server-wide budget: history and idempotency keys.
    pub(in crate::broker) fn cost(&self) -> usize {
        self.stream.cost() + self.keys.bytes
    }
}

#[derive(Debug, Default)]
pub(in crate::broker) struct Stripe {
    pub(in crate::broker) channels: HashMap<String, ChannelState>,
    ops: u32,
}

impl Stripe {
    /// Runs `f` on the channel's state (creating it), frees it if idle, and keeps the
    /// server-wide history total up to date.
    fn with<T>(
        &mut self,
        channel: &str,
        total: &AtomicUsize,
        f: impl FnOnce(&mut ChannelState) -> T,
    ) -> T {
        self.ops = self.ops.wrapping_add(1);
        let now = Instant::now();
        if self.ops.is_multiple_of(SWEEP_EVERY) {
            self.channels.retain(|_, state| {
                let before = state.cost();
                state.trim(now);
                total.fetch_sub(before - state.cost(), Ordering::Relaxed);
                !state.idle()
            });
        }
        let state = self.channels.entry(channel.to_owned()).or_default();
        let before = state.cost();
        state.trim(now);
        let out = f(state);
        let after = state.cost();
        if after >= before {
            total.fetch_add(after - before, Ordering::Relaxed);
        } else {
            total.fetch_sub(before - after, Ordering::Relaxed);
        }
        if state.idle() {
            self.channels.remove(channel);
        }
        out
    }
}

/// Broker for one node.
pub struct MemoryBroker {
    pub(in crate::broker) events: Arc<dyn BrokerEvents>,
    hasher: RandomState,
    stripes: Box<[Mutex<Stripe>]>,
    /// History bytes retained across all channels (see [`Stream::cost`]), idempotency keys
    /// included.
    pub(in crate::broker) history_total: AtomicUsize,
    /// Server-wide bound on `history_total`: past it, publications are still delivered but
    /// no longer stored, so publishing to endless new channels cannot exhaust memory.
    pub(in crate::broker) history_budget: usize,
    /// `RUSTY_SOCKS_DATA_DIR`: the log that makes history durable (see `broker::durable`).
    pub(in crate::broker) durable: Option<crate::broker::durable::Durable>,
    /// What this node holds ([`Broker::track`]): one node, so the cluster-wide state is this
    /// set, and a transition is an insert or removal that changed it.
    holdings: Mutex<HashSet<Holding>>,
    /// `RUSTY_SOCKS_DATA_DIR`: `holdings` on disk, so the next life releases what a crash left
    /// (see `broker::durable::holdings`).
    pub(in crate::broker) journal: Option<crate::broker::durable::holdings::Journal>,
    /// Numbers the transitions this node decides (their `seq` and id).
    decisions: crate::broker::transition::LocalDecisions,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

impl MemoryBroker {
    /// A broker delivering to `events`, retaining at most `history_budget` bytes of history
    /// in all (data plus bookkeeping, see [`Stream::cost`]).
    pub fn new(events: Arc<dyn BrokerEvents>, history_budget: usize) -> Self {
        Self {
            events,
            hasher: RandomState::new(),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
            history_total: AtomicUsize::new(0),
            history_budget,
            durable: None,
            holdings: Mutex::default(),
            journal: None,
            decisions: Default::default(),
        }
    }

    /// History bytes retained across all channels.
    pub fn history_bytes(&self) -> usize {
        self.history_total.load(Ordering::Relaxed)
    }

    pub(in crate::broker) fn with<T>(
        &self,
        channel: &str,
        f: impl FnOnce(&mut ChannelState) -> T,
    ) -> T {
        self.stripe(channel).with(channel, &self.history_total, f)
    }

    pub(in crate::broker) fn stripe(&self, channel: &str) -> MutexGuard<'_, Stripe> {
        let index = self.hasher.hash_one(channel) as usize % STRIPES;
        // Every update leaves the maps consistent, so a poisoned lock is still usable.
        self.stripes[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether a publication is stored at all: past the server-wide budget it is not, and
    /// its key is not remembered either (memory stays bounded, and a retry is then published
    /// again, as it would be without a key).
    pub(in crate::broker) fn stores(&self, request: &PublishRequest) -> bool {
        self.stores_after(self.history_bytes(), request).is_some()
    }

    /// [`Self::stores`] with `total` bytes of history held: the total after storing it, if
    /// it is stored.
    fn stores_after(&self, total: usize, request: &PublishRequest) -> Option<usize> {
        let after = total + request.data.get().len() + ENTRY_OVERHEAD;
        (after <= self.history_budget).then_some(after)
    }

    /// Publishes in memory only, under the channel's lock: assign, append, deliver.
    pub(in crate::broker) fn publish_now(
        &self,
        channel: &str,
        state: &mut ChannelState,
        request: PublishRequest,
        now: Instant,
        store: bool,
    ) -> Published {
        let (published, publication) = Self::append_now(state, request, now, store);
        if let Some(publication) = publication {
            self.events
                .on_publication(channel, state.stream.epoch(), &publication);
        }
        published
    }

    /// Publishes several requests in memory only, in their order, under the channel's lock
    /// once: assign and append each, then deliver them together, so the node fans them out
    /// member by member ([`BrokerEvents::on_publications`]).
    pub(in crate::broker) fn publish_batch_now(
        &self,
        channel: &str,
        requests: Vec<PublishRequest>,
    ) -> Vec<Published> {
        let now = Instant::now();
        // Each request is checked against the budget as the ones before it would leave it.
        let mut total = self.history_bytes();
        let stores: Vec<bool> = requests
            .iter()
            .map(|request| match self.stores_after(total, request) {
                Some(after) => {
                    total = after;
                    true
                }
                None => false,
            })
            .collect();
        self.with(channel, |state| {
            let mut publications = Vec::with_capacity(requests.len());
            let published = requests
                .into_iter()
                .zip(stores)
                .map(|(request, store)| {
                    let (published, publication) = Self::append_now(state, request, now, store);
                    publications.extend(publication);
                    published
                })
                .collect();
            if !publications.is_empty() {
                self.events
                    .on_publications(channel, state.stream.epoch(), &publications);
            }
            published
        })
    }

    /// Assigns and appends one publication; returns it too when the channel has subscribers
    /// to deliver it to (a duplicate appends nothing).
    fn append_now(
        state: &mut ChannelState,
        request: PublishRequest,
        now: Instant,
        store: bool,
    ) -> (Published, Option<Publication>) {
        if let Some(idempotency) = &request.idempotency
            && let Some(offset) = state.keys.get(&idempotency.key, now)
        {
            let published = Published {
                position: StreamPosition {
                    offset,
                    epoch: state.stream.position().epoch,
                },
                duplicate: true,
            };
            return (published, None);
        }
        state.limits = Some(request.history);
        let publication =
            state
                .stream
                .append(request.data, request.client_id, request.history, now, store);
        if let Some(idempotency) = request.idempotency
            && store
        {
            let expires = now + idempotency.window;
            state
                .keys
                .insert(idempotency.key, publication.offset, expires);
        }
        let published = Published::new(state.stream.position());
        (published, (state.subscribed > 0).then_some(publication))
    }

    fn now<'a, T: Send + 'a>(value: T) -> BrokerFuture<'a, T> {
        Box::pin(std::future::ready(Ok(value)))
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        request: PublishRequest,
    ) -> BrokerFuture<'a, Published> {
        if let Some(durable) = &self.durable {
            // Decides under the channel's lock whether the publication is logged (see
            // `publish_durable`): one path per channel and epoch.
            return Box::pin(self.publish_durable(durable, channel, request));
        }
        let now = Instant::now();
        let store = self.stores(&request);
        let published = self.with(channel, |state| {
            self.publish_now(channel, state, request, now, store)
        });
        Self::now(published)
    }

    fn publish_batch<'a>(
        &'a self,
        channel: &'a str,
        requests: Vec<PublishRequest>,
    ) -> BrokerFuture<'a, Vec<Result<Published, BrokerError>>> {
        if self.durable.is_some() {
            // One by one, each through its log record (not gathered: `pipelines_publish`).
            return Box::pin(super::publish_one_by_one(self, channel, requests));
        }
        let published = self.publish_batch_now(channel, requests);
        Self::now(published.into_iter().map(Ok).collect())
    }

    fn pipelines_publish(&self) -> bool {
        self.durable.is_none()
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        self.with(channel, |state| state.subscribed += 1);
        Self::now(())
    }

    fn track<'a>(
        &'a self,
        holding: &'a Holding,
        held: bool,
    ) -> BrokerFuture<'a, Option<Transition>> {
        let mut holdings = self
            .holdings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let changed = if held {
            holdings.insert(holding.clone())
        } else {
            holdings.remove(holding)
        };
        // Handed to the journal under the lock, so its records follow the set's order. A
        // release is written only once its event is stored (`release_stored`): until then the
        // journal still holds it, and a crash releases it again after the restart.
        let written = (changed && held)
            .then(|| self.journal.as_ref().map(|j| j.record(holding, held)))
            .flatten();
        // Decided under the lock, so `seq` follows the order of the decisions.
        let transition = changed.then(|| self.decisions.decide(holding, held));
        drop(holdings);
        match written {
            // A gained holding is reported only once the journal can release it.
            Some(written) => Box::pin(async move {
                written.await;
                Ok(transition)
            }),
            None => Self::now(transition),
        }
    }

    /// The first sweep releases the holdings a previous life left (the journal's).
    fn sweep(&self) -> BrokerFuture<'_, Swept> {
        let transitions = self
            .journal
            .as_ref()
            .map(|j| j.release_left(&self.decisions))
            .unwrap_or_default();
        Self::now(Swept {
            transitions,
            ..Swept::default()
        })
    }

    fn keeps_releases(&self) -> bool {
        self.journal.is_some()
    }

    fn release_stored<'a>(&'a self, holding: &'a Holding, durably: bool) -> BrokerFuture<'a, ()> {
        let Some(journal) = &self.journal else {
            return Self::now(());
        };
        if !durably {
            // Kept: the next life reports it again (a duplicate, never a loss).
            return Self::now(());
        }
        let holdings = self
            .holdings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        // Held again meanwhile: the journal's record of it is right as it is.
        let written = (!holdings.contains(holding)).then(|| journal.record(holding, false));
        drop(holdings);
        Box::pin(async move {
            if let Some(written) = written {
                written.await;
            }
            Ok(())
        })
    }

    fn claimed_stored(&self, durably: bool) -> BrokerFuture<'_, ()> {
        match &self.journal {
            Some(journal) => Box::pin(async move {
                journal.forget_left(durably).await;
                Ok(())
            }),
            None => Self::now(()),
        }
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        self.with(channel, |state| {
            state.subscribed = state.subscribed.saturating_sub(1);
        });
        Self::now(())
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<u64>,
        limit: usize,
    ) -> BrokerFuture<'a, HistoryPage> {
        let page = self.with(channel, |state| {
            let mut position = state.stream.position();
            let through = state
                .written
                .as_ref()
                .map_or(u64::MAX, |w| w.load(Ordering::Acquire));
            position.offset = position.offset.min(through);
            HistoryPage {
                position,
                publications: state.stream.read_through(since, limit, through),
            }
        });
        Self::now(page)
    }

    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.with(channel, |state| {
            state.presence.insert(client.client_id, client);
        });
        Self::now(())
    }

    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> BrokerFuture<'a, ()> {
        self.with(channel, |state| {
            state.presence.remove(&client);
        });
        Self::now(())
    }

    fn presence<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, Vec<ClientInfo>> {
        let clients = self.with(channel, |state| state.presence.values().cloned().collect());
        Self::now(clients)
    }

    fn publish_join<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.with(channel, |state| {
            if state.subscribed > 0 {
                self.events.on_join(channel, &client);
            }
        });
        Self::now(())
    }

    fn publish_leave<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.with(channel, |state| {
            if state.subscribed > 0 {
                self.events.on_leave(channel, &client);
            }
        });
        Self::now(())
    }

    fn status(&self) -> BrokerStatus {
        BrokerStatus {
            kind: "memory",
            connected: true,
        }
    }

    fn ping(&self) -> BrokerFuture<'_, ()> {
        // In this process: always answering.
        Self::now(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::conformance;

    #[tokio::test]
    async fn memory_broker_passes_the_conformance_suite() {
        conformance::run_all(|events| async move {
            Arc::new(MemoryBroker::new(events, 1 << 30)) as Arc<dyn Broker>
        })
        .await;
    }

    #[tokio::test]
    async fn idle_channels_are_freed_and_start_a_new_epoch() {
        let events = Arc::new(conformance::Recorder::default());
        let broker = MemoryBroker::new(events, 1 << 30);
        let limits = HistoryLimits {
            size: 0,
            ttl: None,
            max_bytes: 1024,
        };
        let request = PublishRequest {
            data: conformance::json("1"),
            client_id: None,
            history: limits,
            idempotency: None,
        };
        let first = broker.publish("c", request.clone()).await.expect("memory");
        let second = broker.publish("c", request).await.expect("memory");
        assert_eq!(first.position.offset, 1);
        assert_eq!(
            second.position.offset, 1,
            "no history, nobody subscribed: state was freed"
        );
        assert_ne!(first.position.epoch, second.position.epoch);
        let total: usize = broker
            .stripes
            .iter()
            .map(|s| s.lock().map(|s| s.channels.len()).unwrap_or(0))
            .sum();
        assert_eq!(total, 0);
    }

    fn channels(broker: &MemoryBroker) -> usize {
        broker
            .stripes
            .iter()
            .map(|s| s.lock().map(|s| s.channels.len()).unwrap_or(0))
            .sum()
    }

    #[tokio::test]
    async fn reading_a_never_published_channel_keeps_no_state() {
        let broker = MemoryBroker::new(Arc::new(conformance::Recorder::default()), 1 << 30);
        for n in 0..1000 {
            let c = format!("c{n}");
            let page = broker.history(&c, Some(0), 10).await.expect("memory");
            assert_eq!(page.position, StreamPosition::start());
            assert!(broker.presence(&c).await.expect("memory").is_empty());
            broker.subscribe(&c).await.expect("memory");
            broker.unsubscribe(&c).await.expect("memory");
        }
        assert_eq!(channels(&broker), 0);
        assert_eq!(broker.history_bytes(), 0);
    }

    #[tokio::test]
    async fn a_batch_is_appended_in_order_and_handed_to_the_node_in_one_go() {
        let events = Arc::new(conformance::Recorder::default());
        let broker = MemoryBroker::new(events.clone(), 1 << 20);
        assert!(broker.pipelines_publish(), "worth gathering for");
        broker.subscribe("room").await.expect("memory");
        let limits = HistoryLimits {
            size: 100,
            ttl: None,
            max_bytes: 1 << 20,
        };
        let request = |n: u32, key: Option<&str>| PublishRequest {
            data: conformance::json(&n.to_string()),
            client_id: None,
            history: limits,
            idempotency: key.map(|key| super::super::Idempotency {
                key: key.to_owned(),
                window: std::time::Duration::from_secs(60),
            }),
        };
        let batch = vec![
            request(1, None),
            request(2, Some("k")),
            request(3, None),
            request(4, Some("k")),
        ];
        let results = broker.publish_batch("room", batch).await.expect("memory");
        let offsets: Vec<(u64, bool)> = results
            .into_iter()
            .map(|r| r.map(|p| (p.position.offset, p.duplicate)).expect("memory"))
            .collect();
        assert_eq!(offsets, [(1, false), (2, false), (3, false), (2, true)]);
        assert_eq!(
            events.runs("room"),
            [3],
            "one hand-over, the duplicate left out"
        );
        let page = broker.history("room", None, 10).await.expect("memory");
        let data: Vec<String> = page
            .publications
            .iter()
            .map(|p| p.data.get().to_owned())
            .collect();
        assert_eq!(data, ["1", "2", "3"]);
    }

    #[tokio::test]
    async fn the_server_wide_budget_stops_storing_but_not_delivering() {
        let events = Arc::new(conformance::Recorder::default());
        let broker = MemoryBroker::new(events.clone(), 3 * (ENTRY_OVERHEAD + 1));
        let limits = HistoryLimits {
            size: 100,
            ttl: None,
            max_bytes: 1 << 20,
        };
        for n in 0..10 {
            let channel = format!("c{n}");
            broker.subscribe(&channel).await.expect("memory");
            let request = PublishRequest {
                data: conformance::json("1"),
                client_id: None,
                history: limits,
                idempotency: None,
            };
            let position = broker.publish(&channel, request).await.expect("memory");
            assert_eq!(
                position.position.offset, 1,
                "offsets are assigned regardless"
            );
        }
        assert_eq!(events.taken("c").len(), 10, "every publication delivered");
        assert_eq!(broker.history_bytes(), 3 * (ENTRY_OVERHEAD + 1));
        let stored: usize = futures_util::future::join_all(
            (0..10).map(|n| broker.history(Box::leak(format!("c{n}").into_boxed_str()), None, 10)),
        )
        .await
        .into_iter()
        .map(|page| page.expect("memory").publications.len())
        .sum();
        assert_eq!(stored, 3);
    }
}
