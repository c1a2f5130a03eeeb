//! The conformance suite every [`Broker`] implementation must pass.
//!
//! Call [`run_all`] with a factory that builds the broker around the given events sink. The
//! suite uses channel names with a random prefix, so it can run against a shared Redis or NATS
//! server, and it waits (bounded) for deliveries, so networked brokers can pass it too.

use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::value::RawValue;

use super::{Broker, BrokerEvents, ClientInfo, Idempotency, PublishRequest};
use crate::broker::history::HistoryLimits;
use crate::types::position::is_complete_replay;
use crate::types::{ClientId, Publication, StreamPosition};

/// What a broker delivered, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// `on_publication(channel, offset)`.
    Publication(String, u64),
    /// `on_join(channel, client)`.
    Join(String, ClientId),
    /// `on_leave(channel, client)`.
    Leave(String, ClientId),
    /// `on_gap(channel)`.
    Gap(String),
}

/// An events sink that records everything.
#[derive(Debug, Default)]
pub struct Recorder {
    events: Mutex<Vec<Event>>,
    /// `(channel, offset, epoch)` of every publication delivered, in order.
    epochs: Mutex<Vec<(String, u64, String)>>,
    /// `(channel, count)` of every hand-over of publications, in order.
    runs: Mutex<Vec<(String, usize)>>,
}

impl Recorder {
    fn push(&self, event: Event) {
        self.events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(event);
    }

    /// The epoch each publication on `channel` was delivered with, as `(offset, epoch)`.
    pub fn epochs(&self, channel: &str) -> Vec<(u64, String)> {
        self.epochs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(c, _, _)| c == channel)
            .map(|(_, offset, epoch)| (*offset, epoch.clone()))
            .collect()
    }

    /// How many publications each hand-over to `channel` carried, in order
    /// ([`BrokerEvents::on_publications`] or one [`BrokerEvents::on_publication`]).
    pub fn runs(&self, channel: &str) -> Vec<usize> {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(c, _)| c == channel)
            .map(|(_, count)| *count)
            .collect()
    }

    fn record(&self, channel: &str, epoch: &str, publication: &Publication) {
        self.epochs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((channel.to_owned(), publication.offset, epoch.to_owned()));
        self.push(Event::Publication(channel.to_owned(), publication.offset));
    }

    fn handed_over(&self, channel: &str, count: usize) {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push((channel.to_owned(), count));
    }

    /// Everything recorded for channels starting with `prefix`.
    pub fn taken(&self, prefix: &str) -> Vec<Event> {
        let events = self
            .events
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        events
            .iter()
            .filter(|e| match e {
                Event::Publication(c, _)
                | Event::Join(c, _)
                | Event::Leave(c, _)
                | Event::Gap(c) => c.starts_with(prefix),
            })
            .cloned()
            .collect()
    }

    /// Waits up to five seconds for `count` events under `prefix`.
    pub async fn wait_for(&self, prefix: &str, count: usize) -> Vec<Event> {
        self.wait_until(prefix, |got| got.len() >= count).await
    }

    /// Waits up to five seconds for `count` publications under `prefix`; all its events.
    pub async fn wait_for_publications(&self, prefix: &str, count: usize) -> Vec<Event> {
        let published = |e: &&Event| matches!(e, Event::Publication(..));
        let done = |got: &[Event]| got.iter().filter(published).count() >= count;
        self.wait_until(prefix, done).await
    }

    /// Waits up to five seconds until the events under `prefix` satisfy `done`.
    pub async fn wait_until(&self, prefix: &str, done: impl Fn(&[Event]) -> bool) -> Vec<Event> {
        for _ in 0..500 {
            let got = self.taken(prefix);
            if done(&got) {
                return got;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.taken(prefix)
    }
}

impl BrokerEvents for Recorder {
    fn on_publication(&self, channel: &str, epoch: &str, publication: &Publication) {
        self.handed_over(channel, 1);
        self.record(channel, epoch, publication);
    }
    fn on_publications(&self, channel: &str, epoch: &str, publications: &[Publication]) {
        self.handed_over(channel, publications.len());
        for publication in publications {
            self.record(channel, epoch, publication);
        }
    }
    fn on_join(&self, channel: &str, client: &ClientInfo) {
        self.push(Event::Join(channel.to_owned(), client.client_id));
    }
    fn on_leave(&self, channel: &str, client: &ClientInfo) {
        self.push(Event::Leave(channel.to_owned(), client.client_id));
    }
    fn on_gap(&self, channel: &str) {
        self.push(Event::Gap(channel.to_owned()));
    }
}

/// A JSON value for test data.
pub fn json(text: &str) -> Arc<RawValue> {
    match RawValue::from_string(text.to_owned()) {
        Ok(raw) => Arc::from(raw),
        Err(_) => Arc::from(RawValue::NULL.to_owned()),
    }
}

const LIMITS: HistoryLimits = HistoryLimits {
    size: 10,
    ttl: None,
    max_bytes: 1 << 20,
};

/// A request publishing `data` (JSON) with the suite's history bounds and no key.
pub fn request_for_tests(data: &str) -> PublishRequest {
    PublishRequest {
        data: json(data),
        client_id: None,
        history: LIMITS,
        idempotency: None,
    }
}

fn request(n: u64) -> PublishRequest {
    PublishRequest {
        data: json(&n.to_string()),
        client_id: None,
        history: LIMITS,
        idempotency: None,
    }
}

pub(crate) fn prefix() -> String {
    format!("conf{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

/// Runs every case against fresh brokers from `make` (async, so networked brokers can
/// connect). Panics on the first violation.
pub async fn run_all<F, Fut>(make: F)
where
    F: Fn(Arc<dyn BrokerEvents>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    offsets_are_gapless_per_channel(&make).await;
    delivery_follows_node_subscription_in_order(&make).await;
    history_since_and_limit(&make).await;
    presence_and_join_leave(&make).await;
    concurrent_publishers_get_unique_offsets(&make).await;
    history_ages_out_but_offsets_and_epoch_stay(&make).await;
    idempotency_keys_publish_once_per_channel(&make).await;
    idempotency_keys_are_forgotten_after_their_window(&make).await;
    live_publications_carry_their_epoch(&make).await;
    a_never_published_channel_reads_as_the_start_and_recovers_from_it(&make).await;
    transitions_are_decided_once_per_change(&make).await;
}

/// Every live delivery names the epoch its offset belongs to: the one `publish` and
/// `history` report for the channel.
async fn live_publications_carry_their_epoch<F, Fut>(make: &F)
where
    F: Fn(Arc<dyn BrokerEvents>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let events = Arc::new(Recorder::default());
    let broker = make(events.clone()).await;
    let p = prefix();
    let c = format!("{p}:epoch");
    broker.subscribe(&c).await.expect("subscribe");
    let mut epoch = String::new();
    for n in 1..=3 {
        epoch = broker
            .publish(&c, request(n))
            .await
            .expect("publish")
            .position
            .epoch;
    }
    events.wait_for(&p, 3).await;
    assert!(!epoch.is_empty());
    let page = broker.history(&c, None, 0).await.expect("history");
    assert_eq!(page.position.epoch, epoch);
    assert_eq!(
        events.epochs(&c),
        (1..=3).map(|n| (n, epoch.clone())).collect::<Vec<_>>(),
        "each live publication with its stream's epoch"
    );
    broker.unsubscribe(&c).await.expect("unsubscribe");
}

/// The idempotency window the suite publishes with. A broker that takes its window from its
/// own options (NATS: the stream's duplicate window) must be built with this one.
pub const IDEMPOTENCY_WINDOW: Duration = Duration::from_secs(2);

fn keyed(n: u64, key: &str) -> PublishRequest {
    PublishRequest {
        idempotency: Some(Idempotency {
            key: key.to_owned(),
            window: IDEMPOTENCY_WINDOW,
        }),
        ..request(n)
    }
}

async fn idempotency_keys_publish_once_per_channel<F, Fut>(make: &F)
where
    F: Fn(Arc<dyn BrokerEvents>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let events = Arc::new(Recorder::default());
    let broker = make(events.clone()).await;
    let p = prefix();
    let (c, other) = (format!("{p}:idem"), format!("{p}:idem2"));
    broker.subscribe(&c).await.expect("subscribe");
    let first = broker.publish(&c, keyed(1, "k1")).await.expect("publish");
    assert!(!first.duplicate, "a new key publishes");
    assert_eq!(first.position.offset, 1);
    let again = broker.publish(&c, keyed(2, "k1")).await.expect("publish");
    assert!(again.duplicate, "the same key again is a duplicate");
    assert_eq!(
        again.position, first.position,
        "the first publish's position"
    );
    let second = broker.publish(&c, keyed(3, "k2")).await.expect("publish");
    assert_eq!((second.position.offset, second.duplicate), (2, false));
    let plain = broker.publish(&c, request(4)).await.expect("publish");
    assert_eq!((plain.position.offset, plain.duplicate), (3, false));
    let once_more = broker.publish(&c, keyed(5, "k1")).await.expect("publish");
    assert_eq!(
        once_more.position, first.position,
        "still within the window"
    );
    assert!(once_more.duplicate);
    let elsewhere = broker
        .publish(&other, keyed(6, "k1"))
        .await
        .expect("publish");
    assert!(!elsewhere.duplicate, "keys are per channel");
    assert_eq!(elsewhere.position.offset, 1);
    // A marker after the duplicates: anything they delivered would come before it.
    broker.publish(&c, request(7)).await.expect("publish");
    let got = events.wait_for(&p, 4).await;
    let expected: Vec<Event> = (1..=4).map(|n| Event::Publication(c.clone(), n)).collect();
    assert_eq!(got, expected, "duplicates deliver nothing");
    let page = broker.history(&c, None, 10).await.expect("history");
    let data: Vec<&str> = page.publications.iter().map(|p| p.data.get()).collect();
    assert_eq!(data, vec!["1", "3", "4", "7"], "duplicates store nothing");
    assert_eq!(page.position.epoch, first.position.epoch);
    broker.unsubscribe(&c).await.expect("unsubscribe");
}

async fn idempotency_keys_are_forgotten_after_their_window<F, Fut>(make: &F)
where
    F: Fn(Arc<dyn BrokerEvents>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let broker = make(Arc::new(Recorder::default())).await;
    let c = format!("{}:idemttl", prefix());
    let started = std::time::Instant::now();
    // Redis expires keys by its wall clock: a step of the machine's clock (a VM's clock
    // set after a pause) makes a key expire early by the monotonic clock, not by the wall
    // clock. A broker forgets early only if it does so by both.
    let wall_started = std::time::SystemTime::now();
    let first = broker.publish(&c, keyed(1, "k")).await.expect("publish");
    assert!(!first.duplicate);
    // Retried until the key is forgotten: each retry inside the window publishes nothing, and
    // the first one past it publishes the next offset of the same stream.
    let mut retries = 0;
    let fresh = loop {
        let retry = broker.publish(&c, keyed(2, "k")).await.expect("publish");
        if !retry.duplicate {
            break retry;
        }
        assert_eq!(retry.position, first.position);
        retries += 1;
        assert!(
            started.elapsed() < IDEMPOTENCY_WINDOW + Duration::from_secs(5),
            "the key is still remembered long after its window"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(retries > 0, "the key was remembered at first");
    let wall_elapsed = wall_started.elapsed().unwrap_or_default();
    assert!(
        started.elapsed().max(wall_elapsed) >= IDEMPOTENCY_WINDOW - Duration::from_millis(100),
        "the key was forgotten before its window ended ({:?} monotonic, {wall_elapsed:?} wall)",
        started.elapsed()
    );
    assert_eq!(fresh.position.offset, 2, "the next offset, once");
    assert_eq!(fresh.position.epoch, first.position.epoch);
}

async fn offsets_are_gapless_per_channel<F, Fut>(make: &F)
where
    F: Fn(Arc<dyn BrokerEvents>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let broker = make(Arc::new(Recorder::default())).await;
    let p = prefix();
    let (a, b) = (format!("{p}:a"), format!("{p}:b"));
    let mut epoch = None;
    for n in 1..=5 {
        let pos = broker
            .publish(&a, request(n))
            .await
            .expect("publish")
            .position;
        assert_eq!(pos.offset, n, "offsets of one channel are 1, 2, 3, ...");
        assert!(
            epoch.get_or_insert(pos.epoch.clone()) == &pos.epoch,
            "epoch is stable"
        );
    }
    let pos = broker
        .publish(&b, request(1))
        .await
        .expect("publish")
        .position;
    assert_eq!(pos.offset, 1, "each channel has its own offsets");
}

async fn delivery_follows_node_subscription_in_order<F, Fut>(make: &F)
where
    F: Fn(Arc<dyn BrokerEvents>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let events = Arc::new(Recorder::default());
    let broker = make(events.clone()).await;
    let p = prefix();
    let c = format!("{p}:c");
    broker.publish(&c, request(1)).await.expect("publish");
    broker.subscribe(&c).await.expect("subscribe");
    for n in 2..=101 {
        broker.publish(&c, request(n)).await.expect("publish");
    }
    let got = events.wait_for(&p, 100).await;
    let expected: Vec<Event> = (2..=101)
        .map(|n| Event::Publication(c.clone(), n))
        .collect();
    assert_eq!(got, expected, "only while subscribed, every one, in order");
    // Subscriptions are counted: one more subscribe needs one more unsubscribe.
    broker.subscribe(&c).await.expect("subscribe");
    broker.unsubscribe(&c).await.expect("unsubscribe");
    broker.publish(&c, request(102)).await.expect("publish");
    assert_eq!(
        events.wait_for(&p, 101).await.len(),
        101,
        "still subscribed once"
    );
    broker.unsubscribe(&c).await.expect("unsubscribe");
    broker.publish(&c, request(103)).await.expect("publish");
    // 103 must never be delivered. A marker on the same channel, after subscribing again, is
    // delivered in offset order: anything of 103 still on its way would come before it.
    broker.subscribe(&c).await.expect("subscribe");
    broker.publish(&c, request(104)).await.expect("publish");
    let marker = Event::Publication(c.clone(), 104);
    let got = events.wait_until(&p, |got| got.contains(&marker)).await;
    let expected: Vec<Event> = (2..=102)
        .chain([104])
        .map(|n| Event::Publication(c.clone(), n))
        .collect();
    assert_eq!(
        got, expected,
        "nothing between the last unsubscribe and resubscribing"
    );
    broker.unsubscribe(&c).await.expect("unsubscribe");
}

async fn history_since_and_limit<F, Fut>(make: &F)
where
    F: Fn(Arc<dyn BrokerEvents>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let broker = make(Arc::new(Recorder::default())).await;
    let c = format!("{}:h", prefix());
    for n in 1..=15 {
        broker.publish(&c, request(n)).await.expect("publish");
    }
    let offsets = |page: &super::HistoryPage| -> Vec<u64> {
        page.publications.iter().map(|p| p.offset).collect()
    };
    let all = broker.history(&c, None, 100).await.expect("history");
    assert_eq!(all.position.offset, 15);
    assert_eq!(
        offsets(&all),
        (6..=15).collect::<Vec<_>>(),
        "bounded to the newest 10"
    );
    assert_eq!(all.publications[0].data.get(), "6", "data is kept verbatim");
    let newest = broker.history(&c, None, 3).await.expect("history");
    assert_eq!(offsets(&newest), vec![13, 14, 15]);
    let since = broker.history(&c, Some(11), 100).await.expect("history");
    assert_eq!(offsets(&since), vec![12, 13, 14, 15]);
    let since_limited = broker.history(&c, Some(11), 2).await.expect("history");
    assert_eq!(offsets(&since_limited), vec![12, 13]);
    let position_only = broker.history(&c, None, 0).await.expect("history");
    assert!(position_only.publications.is_empty());
    assert_eq!(position_only.position, all.position);
}

async fn presence_and_join_leave<F, Fut>(make: &F)
where
    F: Fn(Arc<dyn BrokerEvents>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let events = Arc::new(Recorder::default());
    let broker = make(events.clone()).await;
    let p = prefix();
    let c = format!("{p}:p");
    broker.subscribe(&c).await.expect("subscribe");
    let alice = ClientInfo {
        client_id: uuid::Uuid::new_v4(),
        user: Some("alice".into()),
        info: None,
    };
    let anon = ClientInfo {
        client_id: uuid::Uuid::new_v4(),
        user: None,
        info: None,
    };
    broker
        .add_presence(&c, alice.clone())
        .await
        .expect("presence");
    broker
        .add_presence(&c, anon.clone())
        .await
        .expect("presence");
    broker
        .add_presence(&c, anon.clone())
        .await
        .expect("idempotent");
    let mut present = broker.presence(&c).await.expect("presence");
    present.sort_by_key(|i| i.user.clone());
    assert_eq!(present, vec![anon.clone(), alice.clone()]);
    broker
        .remove_presence(&c, anon.client_id)
        .await
        .expect("remove");
    assert_eq!(
        broker.presence(&c).await.expect("presence"),
        vec![alice.clone()]
    );
    broker.publish_join(&c, alice.clone()).await.expect("join");
    broker
        .publish_leave(&c, alice.clone())
        .await
        .expect("leave");
    let got = events.wait_for(&p, 2).await;
    assert_eq!(
        got,
        vec![
            Event::Join(c.clone(), alice.client_id),
            Event::Leave(c.clone(), alice.client_id)
        ]
    );
    assert!(
        broker
            .presence(&format!("{p}:empty"))
            .await
            .expect("presence")
            .is_empty()
    );
}

async fn concurrent_publishers_get_unique_offsets<F, Fut>(make: &F)
where
    F: Fn(Arc<dyn BrokerEvents>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let events = Arc::new(Recorder::default());
    let broker = make(events.clone()).await;
    let p = prefix();
    let c = format!("{p}:race");
    broker.subscribe(&c).await.expect("subscribe");
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let broker = Arc::clone(&broker);
            let c = c.clone();
            tokio::spawn(async move {
                let mut offsets = Vec::new();
                for n in 0..50 {
                    offsets.push(
                        broker
                            .publish(&c, request(n))
                            .await
                            .expect("publish")
                            .position
                            .offset,
                    );
                }
                offsets
            })
        })
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await.expect("publisher task"));
    }
    all.sort_unstable();
    assert_eq!(all, (1..=200).collect::<Vec<_>>(), "unique and gapless");
    let delivered: Vec<u64> = events
        .wait_for(&p, 200)
        .await
        .into_iter()
        .map(|e| match e {
            Event::Publication(_, offset) => offset,
            other => panic!("unexpected {other:?}"),
        })
        .collect();
    assert_eq!(
        delivered,
        (1..=200).collect::<Vec<_>>(),
        "delivered in offset order"
    );
}

async fn history_ages_out_but_offsets_and_epoch_stay<F, Fut>(make: &F)
where
    F: Fn(Arc<dyn BrokerEvents>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let broker = make(Arc::new(Recorder::default())).await;
    let ttl = Duration::from_millis(300);
    let short = HistoryLimits {
        size: 10,
        ttl: Some(ttl),
        max_bytes: 1 << 20,
    };
    // Whether all three are still there can only be seen within the TTL of the first: a try
    // that a loaded machine slowed down past it proves nothing and is made again, on a new
    // channel.
    let mut tries = 0;
    let (c, first) = loop {
        tries += 1;
        let c = format!("{}:ttl", prefix());
        // A subscribed node keeps the stream alive while its history ages out.
        broker.subscribe(&c).await.expect("subscribe");
        let started = std::time::Instant::now();
        let mut first = None;
        for n in 1..=3 {
            let request = PublishRequest {
                data: json(&n.to_string()),
                client_id: None,
                history: short,
                idempotency: None,
            };
            let pos = broker.publish(&c, request).await.expect("publish");
            first.get_or_insert(pos.position);
        }
        let before = broker.history(&c, None, 10).await.expect("history");
        if started.elapsed() < ttl {
            assert_eq!(before.publications.len(), 3, "none aged out before the TTL");
            break (c, first);
        }
        broker.unsubscribe(&c).await.expect("unsubscribe");
        assert!(tries < 10, "every try took longer than the TTL");
    };
    tokio::time::sleep(Duration::from_millis(600)).await;
    let after = broker.history(&c, None, 10).await.expect("history");
    assert!(
        after.publications.is_empty(),
        "publications older than the TTL are gone"
    );
    assert_eq!(after.position.offset, 3, "offsets are not reused");
    assert_eq!(
        Some(after.position.epoch),
        first.map(|p| p.epoch),
        "the stream's life did not end"
    );
    broker.unsubscribe(&c).await.expect("unsubscribe");
}

/// A channel without publications is at [`StreamPosition::start`] for every read (reads store
/// nothing, so there is no epoch to tell), and a subscriber holding that position after
/// publications started recovers all of them while offset 1 is still in history, and not
/// once it is gone. Live delivery from the start position reports no gap.
async fn a_never_published_channel_reads_as_the_start_and_recovers_from_it<F, Fut>(make: &F)
where
    F: Fn(Arc<dyn BrokerEvents>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    let events = Arc::new(Recorder::default());
    let broker = make(events.clone()).await;
    let p = prefix();
    let c = format!("{p}:never");
    for _ in 0..2 {
        let page = broker.history(&c, None, 10).await.expect("history");
        assert_eq!(page.position, StreamPosition::start(), "no publication yet");
        assert!(page.publications.is_empty());
        let page = broker.history(&c, Some(0), 10).await.expect("history");
        assert_eq!(page.position, StreamPosition::start());
        assert!(broker.presence(&c).await.expect("presence").is_empty());
    }
    broker.subscribe(&c).await.expect("subscribe");
    let page = broker.history(&c, None, 0).await.expect("history");
    assert_eq!(
        page.position,
        StreamPosition::start(),
        "subscribing stores nothing"
    );
    let start = page.position;
    for n in 1..=3 {
        broker.publish(&c, request(n)).await.expect("publish");
    }
    let got = events.wait_for(&p, 3).await;
    let expected: Vec<Event> = (1..=3).map(|n| Event::Publication(c.clone(), n)).collect();
    assert_eq!(got, expected, "delivered from offset 1, no gap reported");
    let page = broker
        .history(&c, Some(0), usize::MAX)
        .await
        .expect("history");
    assert_eq!(page.position.offset, 3);
    assert!(
        !page.position.epoch.is_empty(),
        "publishing starts an epoch"
    );
    assert_eq!(
        events.epochs(&c),
        (1..=3)
            .map(|n| (n, page.position.epoch.clone()))
            .collect::<Vec<_>>(),
        "live deliveries carry the epoch the first publication started"
    );
    let kept_empty = StreamPosition {
        offset: 3,
        epoch: String::new(),
    };
    assert!(
        !is_complete_replay(&kept_empty, &page.position, &[]),
        "offsets above 0 with the empty epoch are read in no epoch"
    );
    assert!(
        is_complete_replay(&start, &page.position, &page.publications),
        "everything from offset 1 is recovered"
    );
    for n in 4..=15 {
        broker.publish(&c, request(n)).await.expect("publish");
    }
    let page = broker
        .history(&c, Some(0), usize::MAX)
        .await
        .expect("history");
    assert_eq!(page.position.offset, 15);
    assert!(
        !is_complete_replay(&start, &page.position, &page.publications),
        "offset 1 left history (10 kept): not recovered"
    );
    let gaps = events
        .wait_for(&p, 15)
        .await
        .into_iter()
        .filter(|e| matches!(e, Event::Gap(_)))
        .count();
    assert_eq!(gaps, 0);
    broker.unsubscribe(&c).await.expect("unsubscribe");
}

pub(crate) fn holding(channel: &str, user: Option<&str>) -> super::Holding {
    super::Holding {
        channel: Arc::from(channel),
        user: user.map(Arc::from),
    }
}

/// `track` decides a transition only when the holding's state moves: the first holder gives
/// `channel_occupied` / `member_added`, the last one gone gives `channel_vacated` /
/// `member_removed`. A repeated call decides nothing new: it returns nothing or (networked
/// brokers, which remember a node's last call so a lost answer can be asked again) the same
/// decision, with the same `seq` and id. Decisions carry increasing `seq`s and distinct ids.
async fn transitions_are_decided_once_per_change<F, Fut>(make: &F)
where
    F: Fn(Arc<dyn BrokerEvents>) -> Fut,
    Fut: Future<Output = Arc<dyn Broker>>,
{
    use super::TransitionKind::{ChannelOccupied, ChannelVacated, MemberAdded, MemberRemoved};
    let broker = make(Arc::new(Recorder::default())).await;
    let c = format!("{}:occupancy", prefix());
    let mut decided = Vec::new();
    let mut kind = |t: Option<super::Transition>| {
        decided.extend(t.clone());
        t.map(|t| (t.kind, t.channel, t.user))
    };
    // A repeat returns nothing or exactly the first call's decision.
    let repeat = |first: &Option<super::Transition>, again: Option<super::Transition>| {
        assert!(
            again.is_none() || again == *first,
            "a repeated call decided something new: {again:?} after {first:?}"
        );
    };
    let channel = holding(&c, None);
    let first = broker.track(&channel, true).await.expect("track");
    assert!(first.as_ref().is_some_and(|t| t.time_ms > 0));
    assert_eq!(
        kind(first.clone()),
        Some((ChannelOccupied, Arc::from(&*c), None))
    );
    repeat(&first, broker.track(&channel, true).await.expect("again"));
    let (u1, u2) = (holding(&c, Some("u1")), holding(&c, Some("u:2")));
    let added = broker.track(&u1, true).await.expect("u1");
    assert_eq!(
        kind(added.clone()),
        Some((MemberAdded, Arc::from(&*c), Some(Arc::from("u1"))))
    );
    assert_eq!(
        kind(broker.track(&u2, true).await.expect("u2")),
        Some((MemberAdded, Arc::from(&*c), Some(Arc::from("u:2"))))
    );
    repeat(&added, broker.track(&u1, true).await.expect("u1 again"));
    let removed = broker.track(&u1, false).await.expect("u1 gone");
    assert_eq!(
        kind(removed.clone()),
        Some((MemberRemoved, Arc::from(&*c), Some(Arc::from("u1"))))
    );
    repeat(&removed, broker.track(&u1, false).await.expect("twice"));
    assert_eq!(
        kind(broker.track(&u2, false).await.expect("u2 gone")),
        Some((MemberRemoved, Arc::from(&*c), Some(Arc::from("u:2"))))
    );
    let vacated = broker.track(&channel, false).await.expect("vacate");
    assert_eq!(
        kind(vacated.clone()),
        Some((ChannelVacated, Arc::from(&*c), None))
    );
    repeat(
        &vacated,
        broker.track(&channel, false).await.expect("again"),
    );
    // A channel that was vacated is occupied again by its next holder.
    assert_eq!(
        kind(broker.track(&channel, true).await.expect("reoccupy")),
        Some((ChannelOccupied, Arc::from(&*c), None))
    );
    kind(broker.track(&channel, false).await.expect("vacate"));
    assert_eq!(decided.len(), 8, "{decided:?}");
    assert!(
        decided.windows(2).all(|w| w[0].seq < w[1].seq),
        "seq increases with every decision: {decided:?}"
    );
    let ids: std::collections::HashSet<_> = decided.iter().map(|t| t.id).collect();
    assert_eq!(ids.len(), decided.len(), "one id per decision");
    let swept = broker.sweep().await.expect("sweep");
    assert!(
        swept
            .transitions
            .iter()
            .all(|t| !t.channel.starts_with(&*c))
    );
}
