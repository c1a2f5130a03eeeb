//! Transitions across a three-node cluster (Redis and NATS): each transition is reported by
//! exactly one node, and when a node dies its members' `member_removed` and its channels'
//! `channel_vacated` (where it was the last holder) are reported by one survivor within the
//! presence TTL.
//!
//! Each node runs in this process on a Tokio runtime of its own with a recording
//! `TransitionSink`. A node is killed by shutting its runtime down in the background: its
//! tasks are dropped where they stand (no unsubscribe, no heartbeat, no broker call again), its
//! sockets close, as with `kill -9`. Needs the brokers at `RUSTY_SOCKS_TEST_REDIS_URL` and
//! `RUSTY_SOCKS_TEST_NATS_URL`, so the tests are `#[ignore]`d.
#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::recording::*;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use rusty_socks::server::Prepared;
use rusty_socks::settings::{BrokerUrl, Config, Secret};
use serde_json::json;
use tokio::runtime::Runtime;

const SECRET: &str = "test-secret-0123456789";
const TTL: Duration = Duration::from_secs(2);

struct ClusterNode {
    runtime: Option<Runtime>,
    url: String,
    recording: Arc<Recording>,
}

impl ClusterNode {
    fn start(broker: &BrokerUrl, prefix: &str) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let recording = Arc::new(Recording::default());
        let mut config = Config {
            host: "127.0.0.1".parse().unwrap(),
            port: 0,
            broker: broker.clone(),
            broker_prefix: prefix.to_owned(),
            presence_ttl: TTL,
            ..Config::default()
        };
        config.jwt_secret = Some(Secret(SECRET.into()));
        let sink = recording.clone();
        let url = runtime.block_on(async move {
            let prepared = Prepared::new(config).await.unwrap();
            prepared.node().set_transition_sink(sink).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("ws://{}/ws", listener.local_addr().unwrap());
            tokio::spawn(prepared.serve(listener, std::future::pending()));
            url
        });
        Self {
            runtime: Some(runtime),
            url,
            recording,
        }
    }

    /// Kills the node: every task dropped where it stands, nothing said to the broker.
    fn kill(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

impl Drop for ClusterNode {
    fn drop(&mut self) {
        self.kill();
    }
}

fn token(user: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({ "sub": user }),
        &EncodingKey::from_secret(SECRET.as_bytes()),
    )
    .unwrap()
}

/// Every transition any of `nodes` reported, counted.
fn reported(nodes: &[&ClusterNode]) -> HashMap<Event, usize> {
    let mut counts = HashMap::new();
    for node in nodes {
        for event in node.recording.all().iter() {
            *counts.entry(event.clone()).or_insert(0) += 1;
        }
    }
    counts
}

fn ev(name: &str, channel: &str, user: Option<&str>) -> Event {
    (name.to_owned(), channel.to_owned(), user.map(str::to_owned))
}

/// Waits until `nodes` together reported `expected` (each once, nothing else), within
/// `within`, then a little longer to catch a duplicate.
fn expect_exactly(nodes: &[&ClusterNode], expected: &[Event], within: Duration) {
    let started = Instant::now();
    let want: HashMap<Event, usize> = expected.iter().map(|e| (e.clone(), 1)).collect();
    loop {
        let got = reported(nodes);
        if want.keys().all(|e| got.contains_key(e)) {
            break;
        }
        assert!(
            started.elapsed() < within,
            "after {:?} expected {want:?}, got {got:?}",
            started.elapsed()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    // Another sweep round of every node: a duplicate would show now.
    std::thread::sleep(TTL / 2);
    assert_eq!(reported(nodes), want);
}

fn node_dies_and_a_survivor_reports_once(broker: BrokerUrl) {
    let prefix = format!("trtest{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _cleanup = Cleanup(broker.clone(), prefix.clone());
    let mut n1 = ClusterNode::start(&broker, &prefix);
    let n2 = ClusterNode::start(&broker, &prefix);
    let n3 = ClusterNode::start(&broker, &prefix);
    let clients = Runtime::new().unwrap();
    let (a, mut b) = clients.block_on(async {
        let (mut a, _) = v1_client_url(&format!("{}?token={}", n1.url, token("u1"))).await;
        let (mut b, _) = v1_client_url(&format!("{}?token={}", n2.url, token("u2"))).await;
        let (mut c, _) = v1_client_url(&format!("{}?token={}", n3.url, token("u2"))).await;
        for channel in ["room", "solo"] {
            assert_eq!(subscribe(&mut a, channel).await["type"], "subscribed");
        }
        assert_eq!(subscribe(&mut b, "room").await["type"], "subscribed");
        assert_eq!(subscribe(&mut c, "room").await["type"], "subscribed");
        // c leaves again: u2 still has b on room.
        let reply = call(
            &mut c,
            json!({"type":"unsubscribe","id":9,"channel":"room"}),
        )
        .await;
        assert_eq!(reply["type"], "unsubscribed");
        (a, b)
    });
    let all = [&n1, &n2, &n3];
    expect_exactly(
        &all,
        &[
            ev("channel_occupied", "room", None),
            ev("channel_occupied", "solo", None),
            ev("member_added", "room", Some("u1")),
            ev("member_added", "solo", Some("u1")),
            ev("member_added", "room", Some("u2")),
        ],
        WAIT,
    );
    for node in all {
        node.recording.clear();
    }
    n1.kill();
    let killed = Instant::now();
    let survivors = [&n2, &n3];
    expect_exactly(
        &survivors,
        &[
            ev("member_removed", "room", Some("u1")),
            ev("member_removed", "solo", Some("u1")),
            ev("channel_vacated", "solo", None),
        ],
        TTL * 2 + Duration::from_secs(3),
    );
    eprintln!(
        "dead node's transitions reported within {:?}",
        killed.elapsed()
    );
    // Per channel in order: the member before the channel it vacated.
    let solo: Vec<Event> = survivors
        .iter()
        .flat_map(|n| n.recording.all())
        .filter(|e| e.1 == "solo")
        .collect();
    assert_eq!(solo[1].0, "channel_vacated", "{solo:?}");
    for node in survivors {
        node.recording.clear();
    }
    // The survivors' own state is intact: room empties when its last subscriber leaves.
    clients.block_on(async {
        let reply = call(
            &mut b,
            json!({"type":"unsubscribe","id":9,"channel":"room"}),
        )
        .await;
        assert_eq!(reply["type"], "unsubscribed");
    });
    expect_exactly(
        &survivors,
        &[
            ev("member_removed", "room", Some("u2")),
            ev("channel_vacated", "room", None),
        ],
        WAIT,
    );
    clients.block_on(async move {
        drop(a);
        drop(b);
    });
}

/// Deletes what a NATS run created when dropped (each stream reserves JetStream storage).
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
struct Cleanup(BrokerUrl, String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        #[cfg(feature = "nats")]
        if let BrokerUrl::Nats(url) = &self.0 {
            delete_nats_prefix(url, &self.1);
        }
    }
}

fn redis() -> BrokerUrl {
    BrokerUrl::Redis(std::env::var("RUSTY_SOCKS_TEST_REDIS_URL").expect(
        "RUSTY_SOCKS_TEST_REDIS_URL is not set: this test needs Redis, \
         e.g. RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379",
    ))
}

fn nats() -> BrokerUrl {
    BrokerUrl::Nats(std::env::var("RUSTY_SOCKS_TEST_NATS_URL").expect(
        "RUSTY_SOCKS_TEST_NATS_URL is not set: this test needs NATS with JetStream, \
         e.g. RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222",
    ))
}

#[test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
fn redis_a_dead_nodes_members_and_channels_are_reported_once_by_a_survivor() {
    node_dies_and_a_survivor_reports_once(redis());
}

#[test]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
fn nats_a_dead_nodes_members_and_channels_are_reported_once_by_a_survivor() {
    node_dies_and_a_survivor_reports_once(nats());
}
