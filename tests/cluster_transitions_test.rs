//! Transitions across a three-node cluster (Redis and NATS): each transition is reported by
//! exactly one node, and when a node dies its members' `member_removed` and its channels'
//! `channel_vacated` (where it was the last holder) are reported by one survivor within the
//! presence TTL.
//!
//! A decision whose answer is lost (a fault proxy between a node and the broker forwards the
//! request, then cuts the connection before the answer comes back) is still reported
//! exactly once: a `track` the broker applied, and a dead node's claim.
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

use common::proxy::FaultProxy;
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

/// Every transition any of `nodes` reported, counted once per decision: a claimed transition
/// handed out again (its acknowledgement lost) carries the same id and counts once; two ids
/// for one transition are two decisions and count twice.
fn reported(nodes: &[&ClusterNode]) -> HashMap<Event, usize> {
    let mut counts = HashMap::new();
    let mut ids = std::collections::HashSet::new();
    for node in nodes {
        for t in node.recording.transitions() {
            if !ids.insert(t.id) {
                continue;
            }
            let event = ev(t.kind.name(), &t.channel, t.user.as_deref());
            *counts.entry(event).or_insert(0) += 1;
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

/// `broker`, reached through a fault proxy started on `runtime`.
fn proxied(broker: &BrokerUrl, runtime: &Runtime) -> (FaultProxy, BrokerUrl) {
    let (scheme, url) = match broker {
        BrokerUrl::Redis(url) => ("redis", url),
        BrokerUrl::Nats(url) => ("nats", url),
        other => panic!("not a networked broker: {other:?}"),
    };
    let target: std::net::SocketAddr = url
        .rsplit('/')
        .find(|part| !part.is_empty())
        .and_then(|host| std::net::ToSocketAddrs::to_socket_addrs(host).ok()?.next())
        .unwrap_or_else(|| panic!("{url}: no host:port"));
    let proxy = runtime.block_on(FaultProxy::start(target));
    let url = proxy.url(scheme);
    let proxied = match broker {
        BrokerUrl::Redis(_) => BrokerUrl::Redis(url),
        _ => BrokerUrl::Nats(url),
    };
    (proxy, proxied)
}

/// What a node sends when it changes a holding's holders (so its answer can be cut):
/// Redis, the `track` script's key of the node's last call; NATS, the compare-and-set
/// publish on the holding's key.
fn track_request(broker: &BrokerUrl, prefix: &str) -> Vec<u8> {
    match broker {
        BrokerUrl::Redis(_) => format!("{prefix}:tr:d:").into_bytes(),
        _ => format!("PUB $KV.{prefix}_transitions.h.").into_bytes(),
    }
}

/// What a claim sends: Redis, the sweep script (its pending-claims key; every sweep, claiming
/// or not); NATS, the write of a claimed transition to the claimer's pending ones.
fn claim_request(broker: &BrokerUrl, prefix: &str) -> Vec<u8> {
    match broker {
        BrokerUrl::Redis(_) => format!("{prefix}:tr:pend:").into_bytes(),
        _ => format!("PUB $KV.{prefix}_transitions.pend.").into_bytes(),
    }
}

/// `channel`'s transitions as `node` recorded them.
fn story(node: &ClusterNode, channel: &str) -> Vec<rusty_socks::broker::Transition> {
    node.recording
        .transitions()
        .into_iter()
        .filter(|t| &*t.channel == channel)
        .collect()
}

/// A channel's story as one node told it is consistent: no decision twice (ids), `seq` in the
/// order told, and the channel's and each user's events alternate, starting with
/// `channel_occupied` / `member_added`. Returns whether it ends held (`channel_occupied` and
/// `member_added` last) or released.
fn consistent(story: &[rusty_socks::broker::Transition]) -> Option<bool> {
    let ids: std::collections::HashSet<_> = story.iter().map(|t| t.id).collect();
    assert_eq!(ids.len(), story.len(), "a decision told twice: {story:#?}");
    assert!(story.windows(2).all(|w| w[0].seq < w[1].seq), "{story:#?}");
    let mut ends = None;
    for user in [None, Some("u1")] {
        let kinds: Vec<&str> = story
            .iter()
            .filter(|t| t.user.as_deref() == user)
            .map(|t| t.kind.name())
            .collect();
        let (held, released) = match user {
            None => ("channel_occupied", "channel_vacated"),
            Some(_) => ("member_added", "member_removed"),
        };
        for (i, kind) in kinds.iter().enumerate() {
            let want = if i % 2 == 0 { held } else { released };
            assert_eq!(*kind, want, "{user:?}: {kinds:?}");
        }
        let end = kinds.last().map(|k| *k == held);
        if ends.is_some() && end != ends {
            return None;
        }
        ends = end;
    }
    ends
}

/// Waits (up to `within`) until `node`'s story of `channel` ends `held` (see [`consistent`]),
/// then a little longer for a duplicate, and checks it once more.
fn wait_story(node: &ClusterNode, channel: &str, held: bool, within: Duration) {
    let started = Instant::now();
    while consistent(&story(node, channel)) != Some(held) {
        assert!(
            started.elapsed() < within,
            "{channel} never ended held={held}: {:#?}",
            story(node, channel)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(consistent(&story(node, channel)), Some(held));
}

/// A `track` that Redis or NATS applied and whose answer was lost: the node's retry gets
/// the same decision back, so `channel_occupied` is reported exactly once (with the `seq` of
/// the decision), and the channel's story stays consistent. (With NATS the cut connection
/// carries everything, so the client's subscribe may fail meanwhile; it subscribes again.)
fn a_lost_track_answer_still_reports_once(broker: BrokerUrl) {
    let prefix = format!("trlost{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _cleanup = Cleanup(broker.clone(), prefix.clone());
    let clients = Runtime::new().unwrap();
    let (proxy, through) = proxied(&broker, &clients);
    let node = ClusterNode::start(&through, &prefix);
    let mut ws = clients.block_on(async {
        let (mut ws, _) = v1_client_url(&format!("{}?token={}", node.url, token("u1"))).await;
        // Scripts loaded and the bucket open before the fault: the request cut is the one
        // that changes the holders.
        assert_eq!(subscribe(&mut ws, "warm").await["type"], "subscribed");
        ws
    });
    wait_story(&node, "warm", true, WAIT);
    proxy.cut_replies(&track_request(&broker, &prefix), 1);
    clients.block_on(async {
        let started = Instant::now();
        loop {
            let reply = call(
                &mut ws,
                json!({"type":"subscribe","id":"sub","channel":"room"}),
            )
            .await;
            if reply["type"] == "subscribed" {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(20), "{reply}");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    });
    wait_story(&node, "room", true, Duration::from_secs(20));
    assert_eq!(proxy.cuts(), 1, "the answer of the decisive call was lost");
    // The channel is tracked first: its `channel_occupied` was the decision whose answer was
    // lost, and it is there once, first.
    assert_eq!(story(&node, "room")[0].kind.name(), "channel_occupied");
    clients.block_on(async {
        let reply = call(
            &mut ws,
            json!({"type":"unsubscribe","id":9,"channel":"room"}),
        )
        .await;
        assert_eq!(reply["type"], "unsubscribed");
    });
    wait_story(&node, "room", false, WAIT);
    clients.block_on(async move { drop(ws) });
}

/// A survivor's claim of a dead node is applied but its answer is lost: the claimed
/// transitions stay pending in the broker and the survivor's next sweep reports them,
/// exactly once.
fn a_lost_claim_answer_still_reports_once(broker: BrokerUrl) {
    let prefix = format!("trclaim{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _cleanup = Cleanup(broker.clone(), prefix.clone());
    let clients = Runtime::new().unwrap();
    let (proxy, through) = proxied(&broker, &clients);
    let mut dying = ClusterNode::start(&broker, &prefix);
    let survivor = ClusterNode::start(&through, &prefix);
    let ws = clients.block_on(async {
        let (mut ws, _) = v1_client_url(&format!("{}?token={}", dying.url, token("u1"))).await;
        assert_eq!(subscribe(&mut ws, "room").await["type"], "subscribed");
        ws
    });
    expect_exactly(
        &[&dying, &survivor],
        &[
            ev("channel_occupied", "room", None),
            ev("member_added", "room", Some("u1")),
        ],
        WAIT,
    );
    survivor.recording.clear();
    // Every claim request loses its answer until the claim is seen applied.
    proxy.cut_replies(&claim_request(&broker, &prefix), usize::MAX);
    dying.kill();
    let killed = Instant::now();
    loop {
        let claimed = match &broker {
            BrokerUrl::Redis(url) => {
                !clients.block_on(redis_has(url, &format!("{prefix}:tr:h:c:room")))
                    && proxy.cuts() > 0
            }
            // Only a claim writes pending transitions: one cut means one claim applied.
            _ => proxy.cuts() > 0,
        };
        if claimed {
            break;
        }
        assert!(
            killed.elapsed() < TTL * 3 + Duration::from_secs(5),
            "never claimed"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    proxy.stop_cutting();
    if matches!(broker, BrokerUrl::Redis(_)) {
        // (NATS: the sweep goes on after the lost write, and may read it back at once.)
        assert!(
            survivor.recording.all().is_empty(),
            "nothing reported while every claim answer was lost: {:?}",
            survivor.recording.all()
        );
    }
    expect_exactly(
        &[&survivor],
        &[
            ev("member_removed", "room", Some("u1")),
            ev("channel_vacated", "room", None),
        ],
        Duration::from_secs(20),
    );
    clients.block_on(async move { drop(ws) });
}

/// Whether Redis at `url` has `key` (read directly, not through the proxy).
#[cfg(feature = "redis")]
async fn redis_has(url: &str, key: &str) -> bool {
    let client = redis::Client::open(url).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let found: i64 = redis::cmd("EXISTS")
        .arg(key)
        .query_async(&mut conn)
        .await
        .unwrap();
    found == 1
}

#[cfg(not(feature = "redis"))]
async fn redis_has(_: &str, _: &str) -> bool {
    panic!("this test needs the `redis` feature")
}

#[test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
fn redis_a_lost_track_answer_still_reports_once() {
    a_lost_track_answer_still_reports_once(redis());
}

#[test]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
fn nats_a_lost_track_answer_still_reports_once() {
    a_lost_track_answer_still_reports_once(nats());
}

#[test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
fn redis_a_lost_claim_answer_still_reports_once() {
    a_lost_claim_answer_still_reports_once(redis());
}

#[test]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
fn nats_a_lost_claim_answer_still_reports_once() {
    a_lost_claim_answer_still_reports_once(nats());
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
