//! Tests of [`Node`] with brokers that misbehave on purpose: racing publications, failing
//! or stalling calls.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::broker::BrokerFuture;
use crate::broker::conformance::json;
use crate::broker::history::HistoryLimits;
use crate::broker::memory::MemoryBroker;
use crate::broker::{Broker, HistoryPage, PublishRequest, Published};
use crate::engine::hub::Hub;
use crate::engine::namespace::{NamespaceOptions, Namespaces};
use crate::engine::node::{Caller, Dispatcher, Node, NodeOptions};
use crate::engine::outbox::Outbox;
use crate::engine::stats::Stats;
use crate::types::error::ClientError;
use crate::types::{ClientId, ClientInfo, StreamPosition};
use uuid::Uuid;

/// A broker whose `history` lets publications race it: one lands just before the read,
/// one just after, as they would with a networked broker.
#[derive(Debug)]
struct Racing {
    inner: MemoryBroker,
}

fn request() -> PublishRequest {
    PublishRequest {
        data: json("0"),
        client_id: None,
        history: HistoryLimits {
            size: 100,
            ttl: None,
            max_bytes: 1 << 20,
        },
        idempotency: None,
    }
}

impl Broker for Racing {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        request: PublishRequest,
    ) -> BrokerFuture<'a, Published> {
        self.inner.publish(channel, request)
    }
    fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        self.inner.subscribe(channel)
    }
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        self.inner.unsubscribe(channel)
    }
    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<u64>,
        limit: usize,
    ) -> BrokerFuture<'a, HistoryPage> {
        Box::pin(async move {
            self.inner.publish(channel, request()).await?;
            let page = self.inner.history(channel, since, limit).await?;
            self.inner.publish(channel, request()).await?;
            Ok(page)
        })
    }
    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.inner.add_presence(channel, client)
    }
    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> BrokerFuture<'a, ()> {
        self.inner.remove_presence(channel, client)
    }
    fn presence<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, Vec<ClientInfo>> {
        self.inner.presence(channel)
    }
    fn publish_join<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.inner.publish_join(channel, client)
    }
    fn publish_leave<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.inner.publish_leave(channel, client)
    }
    fn track<'a>(
        &'a self,
        holding: &'a crate::broker::Holding,
        held: bool,
    ) -> BrokerFuture<'a, Option<crate::broker::Transition>> {
        self.inner.track(holding, held)
    }
    fn status(&self) -> crate::broker::BrokerStatus {
        self.inner.status()
    }
}

/// The offset in an encoded (unmasked, short) server text frame.
fn offset_of(frame: &Bytes) -> u64 {
    let header = if frame[1] == 126 { 4 } else { 2 };
    let value: serde_json::Value = serde_json::from_slice(&frame[header..]).unwrap_or_default();
    value["offset"].as_u64().unwrap_or(0)
}

#[tokio::test]
async fn publications_racing_a_recovery_arrive_exactly_once() {
    let hub = Arc::new(Hub::new());
    let stats = Arc::new(Stats::default());
    let dispatcher = Arc::new(Dispatcher::new(
        Arc::clone(&hub),
        false,
        Arc::clone(&stats),
        Arc::default(),
    ));
    let broker = Arc::new(Racing {
        inner: MemoryBroker::new(dispatcher, 1 << 30),
    });
    let node = Node::new(
        Arc::clone(&hub),
        broker.clone(),
        NodeOptions {
            namespaces: Namespaces::default(),
            legacy: NamespaceOptions::default(),
            history_bytes: 1 << 20,
            recovery_buffer: 64,
            verifier: None,
            refresh_window: Duration::from_secs(30),
            idempotency_window: Duration::from_secs(300),
        },
        stats,
    );
    for _ in 0..5 {
        node.publish("room", json("0"), None, None, Caller::Server)
            .await
            .expect("publish");
    }
    let epoch = broker
        .inner
        .history("room", None, 0)
        .await
        .expect("history")
        .position
        .epoch;
    let (outbox, mut rx) = Outbox::new(Uuid::new_v4(), 64);
    let client = ClientInfo {
        client_id: outbox.id(),
        user: None,
        info: None,
    };
    let since = StreamPosition { offset: 2, epoch };
    let sub = node
        .subscribe(&outbox, &client, "room", Some(&since), 0, Caller::Server)
        .await
        .expect("subscribe");
    assert_eq!(sub.recovered, Some(true));
    // 3..5 existed, 6 raced in before the history read, 7 after it, 8 is plain live.
    let mut seen: Vec<u64> = sub.publications.iter().map(|p| p.offset).collect();
    seen.extend(sub.live.iter().map(offset_of));
    node.publish("room", json("0"), None, None, Caller::Server)
        .await
        .expect("publish");
    while let Some(frame) = rx.try_recv() {
        seen.push(offset_of(&frame));
    }
    assert_eq!(seen, vec![3, 4, 5, 6, 7, 8], "each exactly once, in order");
}

/// A memory broker whose calls can be made to fail or to hang on demand, as a broker that
/// stops answering would.
#[derive(Debug)]
pub(super) struct Faulty {
    inner: MemoryBroker,
    fail_history: AtomicBool,
    stall_history: AtomicBool,
    pub(super) stall_subscribe: AtomicBool,
    /// Publishes take this long (milliseconds) before the memory broker does them.
    slow_publish_ms: std::sync::atomic::AtomicU64,
}

fn unavailable() -> crate::broker::BrokerError {
    crate::broker::BrokerError::Unavailable("history refused on purpose".into())
}

impl Broker for Faulty {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        request: PublishRequest,
    ) -> BrokerFuture<'a, Published> {
        let delay = Duration::from_millis(self.slow_publish_ms.load(Ordering::SeqCst));
        Box::pin(async move {
            tokio::time::sleep(delay).await;
            self.inner.publish(channel, request).await
        })
    }
    fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        if self.stall_subscribe.load(Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        self.inner.subscribe(channel)
    }
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        self.inner.unsubscribe(channel)
    }
    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<u64>,
        limit: usize,
    ) -> BrokerFuture<'a, HistoryPage> {
        if self.stall_history.load(Ordering::SeqCst) {
            return Box::pin(std::future::pending());
        }
        if self.fail_history.load(Ordering::SeqCst) {
            return Box::pin(async { Err(unavailable()) });
        }
        self.inner.history(channel, since, limit)
    }
    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.inner.add_presence(channel, client)
    }
    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> BrokerFuture<'a, ()> {
        self.inner.remove_presence(channel, client)
    }
    fn presence<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, Vec<ClientInfo>> {
        self.inner.presence(channel)
    }
    fn publish_join<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.inner.publish_join(channel, client)
    }
    fn publish_leave<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.inner.publish_leave(channel, client)
    }
    fn track<'a>(
        &'a self,
        holding: &'a crate::broker::Holding,
        held: bool,
    ) -> BrokerFuture<'a, Option<crate::broker::Transition>> {
        self.inner.track(holding, held)
    }
    fn status(&self) -> crate::broker::BrokerStatus {
        self.inner.status()
    }
}

/// A node on a [`Faulty`] broker whose default namespace has presence and join/leave.
pub(super) fn faulty_node() -> (Node, Arc<Faulty>) {
    let hub = Arc::new(Hub::new());
    let stats = Arc::new(Stats::default());
    let dispatcher = Arc::new(Dispatcher::new(
        Arc::clone(&hub),
        false,
        Arc::clone(&stats),
        Arc::default(),
    ));
    let broker = Arc::new(Faulty {
        inner: MemoryBroker::new(dispatcher, 1 << 30),
        fail_history: AtomicBool::new(false),
        stall_history: AtomicBool::new(false),
        stall_subscribe: AtomicBool::new(false),
        slow_publish_ms: std::sync::atomic::AtomicU64::new(0),
    });
    let mut namespaces = Namespaces::default();
    namespaces.insert(
        "",
        NamespaceOptions {
            presence: true,
            join_leave: true,
            ..NamespaceOptions::default()
        },
    );
    let options = NodeOptions {
        namespaces,
        legacy: NamespaceOptions::default(),
        history_bytes: 1 << 20,
        recovery_buffer: 64,
        verifier: None,
        refresh_window: Duration::from_secs(30),
        idempotency_window: Duration::from_secs(300),
    };
    let node = Node::new(hub, broker.clone(), options, stats);
    (node, broker)
}

fn member() -> (Outbox, crate::engine::outbox::OutboxReceiver, ClientInfo) {
    let (outbox, rx) = Outbox::new(Uuid::new_v4(), 64);
    let client = ClientInfo::anonymous(outbox.id());
    (outbox, rx, client)
}

/// The `type` and `client.client_id` of every frame queued in `rx`.
fn pushes(rx: &mut crate::engine::outbox::OutboxReceiver) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some(frame) = rx.try_recv() {
        let header = if frame[1] == 126 { 4 } else { 2 };
        let value: serde_json::Value = serde_json::from_slice(&frame[header..]).unwrap_or_default();
        out.push((
            value["type"].as_str().unwrap_or_default().to_owned(),
            value["client"]["client_id"]
                .as_str()
                .unwrap_or_default()
                .to_owned(),
        ));
    }
    out
}

async fn present(node: &Node, channel: &str) -> Vec<ClientId> {
    let clients = node
        .presence(channel, Caller::Server)
        .await
        .expect("presence");
    clients.into_iter().map(|c| c.client_id).collect()
}

/// Waits (bounded) until `channel`'s presence is exactly `expected`: an abandoned subscribe is
/// undone by a task of its own.
async fn presence_becomes(node: &Node, channel: &str, expected: &[ClientId]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let now = present(node, channel).await;
        if now == expected {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "presence of {channel} stayed {now:?}, expected {expected:?}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn a_subscribe_failing_after_its_join_announces_the_leave() {
    let (node, broker) = faulty_node();
    let (a, mut a_rx, a_client) = member();
    node.subscribe(&a, &a_client, "room", None, 0, Caller::Server)
        .await
        .expect("first member subscribes");
    broker.fail_history.store(true, Ordering::SeqCst);
    let (b, _b_rx, b_client) = member();
    let failed = node
        .subscribe(&b, &b_client, "room", None, 0, Caller::Server)
        .await;
    assert!(
        matches!(failed, Err(ClientError::Unavailable(_))),
        "{failed:?}"
    );
    let b_id = b.id().to_string();
    assert_eq!(
        pushes(&mut a_rx),
        [
            ("join".to_owned(), b_id.clone()),
            ("leave".to_owned(), b_id)
        ],
        "the others saw B join, so they must see it leave"
    );
    assert_eq!(node.hub().member_count("room"), 1);
    assert_eq!(present(&node, "room").await, [a.id()]);
}

#[tokio::test]
async fn a_subscribe_dropped_midway_leaves_no_member_and_no_presence() {
    let (node, broker) = faulty_node();
    let (a, mut a_rx, a_client) = member();
    node.subscribe(&a, &a_client, "room", None, 0, Caller::Server)
        .await
        .expect("first member subscribes");
    let counts_before = node.subscription_counts();
    // B's subscribe gets past the hub, presence and join, then waits on history forever; the
    // caller gives up (a timeout drops the future).
    broker.stall_history.store(true, Ordering::SeqCst);
    let (b, _b_rx, b_client) = member();
    let abandoned = tokio::time::timeout(
        Duration::from_millis(200),
        node.subscribe(&b, &b_client, "room", None, 0, Caller::Server),
    )
    .await;
    assert!(abandoned.is_err(), "the history read never answers");
    assert_eq!(
        node.hub().member_count("room"),
        1,
        "B is no member once its subscribe is dropped"
    );
    assert_eq!(node.subscription_counts(), counts_before);
    presence_becomes(&node, "room", &[a.id()]).await;
    let b_id = b.id().to_string();
    assert_eq!(
        pushes(&mut a_rx),
        [
            ("join".to_owned(), b_id.clone()),
            ("leave".to_owned(), b_id)
        ]
    );
    // B can subscribe again later: nothing of the abandoned attempt is in the way.
    broker.stall_history.store(false, Ordering::SeqCst);
    node.subscribe(&b, &b_client, "room", None, 0, Caller::Server)
        .await
        .expect("B subscribes again");
    assert_eq!(node.hub().member_count("room"), 2);
}

#[tokio::test]
async fn a_first_member_dropped_during_the_broker_subscribe_does_not_strand_the_next() {
    let (node, broker) = faulty_node();
    broker.stall_subscribe.store(true, Ordering::SeqCst);
    let (a, _a_rx, a_client) = member();
    let (b, _b_rx, b_client) = member();
    let mut first = Box::pin(node.subscribe(&a, &a_client, "room", None, 0, Caller::Server));
    let mut second = Box::pin(node.subscribe(&b, &b_client, "room", None, 0, Caller::Server));
    // A subscribes the node at the broker (which hangs); B waits for that to finish.
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut first)
            .await
            .is_err()
    );
    assert!(
        tokio::time::timeout(Duration::from_millis(50), &mut second)
            .await
            .is_err()
    );
    drop(first);
    let outcome = tokio::time::timeout(Duration::from_secs(5), second)
        .await
        .expect("B must not wait forever for a subscribe nobody finishes");
    assert!(
        matches!(outcome, Err(ClientError::Unavailable(_))),
        "{outcome:?}"
    );
    assert_eq!(node.hub().member_count("room"), 0);
    presence_becomes(&node, "room", &[]).await;
}

#[tokio::test]
async fn a_publish_that_outlives_the_shutdown_wait_is_not_acknowledged() {
    let (node, broker) = faulty_node();
    let node = Arc::new(node);
    broker.slow_publish_ms.store(300, Ordering::SeqCst);
    let publishing = tokio::spawn({
        let node = Arc::clone(&node);
        async move {
            node.publish("room", json("1"), None, None, Caller::Server)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    // Shutdown waits 20 ms for it, then stops waiting; the publish returns 250 ms later.
    node.begin_shutdown(Duration::from_millis(20)).await;
    let answer = publishing.await.expect("task");
    assert!(
        matches!(answer, Err(ClientError::Unavailable(_))),
        "a publish confirmed after shutdown stopped waiting must not be acknowledged: {answer:?}"
    );
    // One that finishes within the wait is acknowledged as usual.
    let (node, broker) = faulty_node();
    let node = Arc::new(node);
    broker.slow_publish_ms.store(30, Ordering::SeqCst);
    let publishing = tokio::spawn({
        let node = Arc::clone(&node);
        async move {
            node.publish("room", json("1"), None, None, Caller::Server)
                .await
        }
    });
    tokio::time::sleep(Duration::from_millis(5)).await;
    node.begin_shutdown(Duration::from_secs(5)).await;
    assert!(publishing.await.expect("task").is_ok());
}

#[tokio::test]
async fn a_publish_after_shutdown_begins_is_refused() {
    let (node, _broker) = faulty_node();
    node.begin_shutdown(Duration::from_millis(20)).await;
    let answer = node
        .publish("room", json("1"), None, None, Caller::Server)
        .await;
    assert!(
        matches!(answer, Err(ClientError::ShuttingDown)),
        "{answer:?}"
    );
    let answers = node
        .publish_batch(
            "room",
            vec![(json("1"), None), (json("2"), None)],
            None,
            Caller::Server,
        )
        .await;
    assert!(
        answers
            .iter()
            .all(|a| matches!(a, Err(ClientError::ShuttingDown))),
        "{answers:?}"
    );
}
