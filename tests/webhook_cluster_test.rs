//! Webhooks of real server processes on Redis and NATS (issue 15, items 5 and 6):
//!
//! - a node on Redis with `RUSTY_SOCKS_DATA_DIR` keeps its undelivered events on disk: after a
//!   `kill -9` and a restart on the same directory they arrive, with the same ids;
//! - three nodes share one receiver; one of them is killed with `kill -9` and a survivor sends
//!   its members' `member_removed` and its channels' `channel_vacated`, each exactly once,
//!   within the presence TTL and a margin.
//!
//! Needs the brokers at `RUSTY_SOCKS_TEST_REDIS_URL` and `RUSTY_SOCKS_TEST_NATS_URL`, so the
//! tests are `#[ignore]`d. Every run uses a key prefix (and NATS stream names) of its own.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/receiver.rs"]
mod receiver;

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use common::process::Logged;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
use receiver::Receiver;
use serde_json::{Value, json};

const JWT: &str = "cluster-jwt-secret-0123456789";
const HOOK_SECRET: &str = "webhook-secret-0123456789";
/// `RUSTY_SOCKS_PRESENCE_TTL` of every node (its smallest allowed value).
const TTL: Duration = Duration::from_secs(3);
/// Long enough for a few webhook retries.
const DELIVERY: Duration = Duration::from_secs(10);

/// (name, channel, user) of a webhook event.
type Transition = (String, String, Option<String>);

fn token(user: &str) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &json!({ "sub": user }),
        &EncodingKey::from_secret(JWT.as_bytes()),
    )
    .unwrap()
}

fn transition(event: &Value) -> Transition {
    (
        event["name"].as_str().unwrap().to_owned(),
        event["channel"].as_str().unwrap().to_owned(),
        event["user"].as_str().map(str::to_owned),
    )
}

fn tr(name: &str, channel: &str, user: Option<&str>) -> Transition {
    (name.to_owned(), channel.to_owned(), user.map(str::to_owned))
}

/// A node process on `broker` under `prefix`, sending webhooks to `receiver`.
fn node(broker: &str, prefix: &str, receiver: &Receiver, data_dir: Option<&str>) -> Logged {
    let url = receiver.url();
    let ttl = TTL.as_secs().to_string();
    let mut envs = vec![
        ("RUSTY_SOCKS_BROKER", broker),
        ("RUSTY_SOCKS_BROKER_PREFIX", prefix),
        ("RUSTY_SOCKS_PRESENCE_TTL", ttl.as_str()),
        ("RUSTY_SOCKS_JWT_SECRET", JWT),
        ("RUSTY_SOCKS_WEBHOOK_URL", url.as_str()),
        ("RUSTY_SOCKS_WEBHOOK_SECRET", HOOK_SECRET),
    ];
    if let Some(dir) = data_dir {
        envs.push(("RUSTY_SOCKS_DATA_DIR", dir));
    }
    Logged::start(&envs)
}

/// A client of user `user` on the node at `addr`, subscribed to `channels`.
async fn member(addr: std::net::SocketAddr, user: &str, channels: &[&str]) -> Ws {
    let (mut ws, _) = v1_client_url(&format!("ws://{addr}/ws?token={}", token(user))).await;
    for channel in channels {
        assert_eq!(subscribe(&mut ws, channel).await["type"], "subscribed");
    }
    ws
}

/// Waits until the receiver got every one of `expected` (among the events `since`), within
/// `within`, then a little longer (a sweep round of every node) to catch a duplicate: each is
/// then there exactly once, nothing else arrived, and no id came twice. Returns how long the
/// last one took.
async fn expect_exactly(
    receiver: &Receiver,
    since: usize,
    expected: &[Transition],
    within: Duration,
) -> Duration {
    let started = Instant::now();
    let want: HashMap<Transition, usize> = expected.iter().map(|t| (t.clone(), 1)).collect();
    // At least once: an event may come again with the same id (a sweep's acknowledgement
    // lost, a batch whose answer was late), and is counted once. Two ids for the same
    // transition would be two decisions: counted twice.
    let count = |events: &[Value]| {
        let mut seen: HashMap<&str, &Value> = HashMap::new();
        let mut got: HashMap<Transition, usize> = HashMap::new();
        for event in events {
            let id = event["id"].as_str().unwrap();
            if let Some(first) = seen.insert(id, event) {
                assert_eq!(first, event, "one id, two different events");
                continue;
            }
            *got.entry(transition(event)).or_default() += 1;
        }
        got
    };
    let took = loop {
        let events = receiver.events();
        let got = count(&events[since.min(events.len())..]);
        if want.keys().all(|t| got.contains_key(t)) {
            break started.elapsed();
        }
        assert!(
            started.elapsed() < within,
            "after {:?} expected {want:?}, got {got:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    tokio::time::sleep(TTL + Duration::from_millis(500)).await;
    let events = receiver.events();
    assert_eq!(count(&events[since..]), want, "{:#?}", &events[since..]);
    assert!(receiver.attempts().iter().all(|a| a.signed));
    took
}

/// Deletes what a NATS run created when dropped (each stream reserves JetStream storage).
#[cfg_attr(not(feature = "nats"), allow(dead_code))]
struct Cleanup(String, String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        #[cfg(feature = "nats")]
        if self.0.starts_with("nats://") {
            delete_nats_prefix(&self.0, &self.1);
        }
    }
}

fn prefix() -> String {
    format!("whc{}", &uuid::Uuid::new_v4().simple().to_string()[..10])
}

fn broker_url(var: &str, example: &str) -> String {
    std::env::var(var).unwrap_or_else(|_| {
        panic!("{var} is not set: this test needs the broker, e.g. {var}={example}")
    })
}

fn redis() -> String {
    broker_url("RUSTY_SOCKS_TEST_REDIS_URL", "redis://127.0.0.1:6379")
}

fn nats() -> String {
    broker_url("RUSTY_SOCKS_TEST_NATS_URL", "nats://127.0.0.1:4222")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn redis_node_with_data_dir_keeps_undelivered_events_across_kill_9() {
    let broker = redis();
    let prefix = prefix();
    let dir = TempDir::new();
    let receiver = Receiver::start(HOOK_SECRET).await;
    receiver.fail_next(usize::MAX);
    let mut server = node(&broker, &prefix, &receiver, Some(dir.path()));
    let addr = server.address();
    let client = member(addr, "u1", &["room"]).await;
    // Both were attempted (so they were on disk: only synced events are sent), none delivered.
    let deadline = Instant::now() + DELIVERY;
    let attempted = loop {
        let ids: BTreeSet<String> = receiver.attempts().iter().flat_map(|a| a.ids()).collect();
        if ids.len() == 2 {
            break ids;
        }
        assert!(Instant::now() < deadline, "{:#?}", receiver.attempts());
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(client);
    receiver.fail_next(0);
    let mut server = node(&broker, &prefix, &receiver, Some(dir.path()));
    server.wait_for("webhook events from before the restart are sent first");
    let events = receiver.wait_events(2, DELIVERY).await;
    let first: BTreeSet<String> = events[..2]
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(first, attempted, "{events:#?}");
    assert_eq!(
        events[..2].iter().map(transition).collect::<Vec<_>>(),
        [
            tr("channel_occupied", "room", None),
            tr("member_added", "room", Some("u1")),
        ]
    );
    // The dead process's holdings expire in the broker: the restarted node sweeps them, so the
    // channel's story ends once and nothing of it repeats.
    let took = expect_exactly(
        &receiver,
        0,
        &[
            tr("channel_occupied", "room", None),
            tr("member_added", "room", Some("u1")),
            tr("member_removed", "room", Some("u1")),
            tr("channel_vacated", "room", None),
        ],
        TTL * 2 + Duration::from_secs(5),
    )
    .await;
    eprintln!("the dead process's room emptied {took:?} after the restart");
    // The directory's lock is the durable history's: a second process on it is refused.
    let (code, stdout, stderr) = common::process::run(
        &[],
        &[
            ("RUSTY_SOCKS_HOST", "127.0.0.1"),
            ("RUSTY_SOCKS_PORT", "0"),
            ("RUSTY_SOCKS_BROKER", "redis://127.0.0.1:9"),
            ("RUSTY_SOCKS_DATA_DIR", "/nonexistent/rusty-socks"),
        ],
    );
    assert_eq!(code, 2);
    let text = format!("{stdout}{stderr}");
    assert!(text.contains("RUSTY_SOCKS_DATA_DIR"), "{text}");
    assert!(text.contains("RUSTY_SOCKS_WEBHOOK_URL"), "{text}");
}

/// Three real processes on `broker`; u3 is connected only to node C, which alone holds "solo".
/// C is killed with `kill -9`: a survivor sends u3's `member_removed` on both channels and
/// "solo"'s `channel_vacated`, once each.
async fn a_killed_node_is_reported_once_by_a_survivor(broker: &str) {
    let prefix = prefix();
    let _cleanup = Cleanup(broker.to_owned(), prefix.clone());
    let receiver = Receiver::start(HOOK_SECRET).await;
    // One after another: each node is listening before the next starts, so three processes
    // do not create the same JetStream stream and buckets at once on a busy machine.
    let mut nodes = Vec::new();
    let mut addrs = Vec::new();
    for _ in 0..3 {
        let mut started = node(broker, &prefix, &receiver, None);
        addrs.push(started.address());
        nodes.push(started);
    }
    let a = member(addrs[0], "u1", &["room"]).await;
    let b = member(addrs[1], "u2", &["room"]).await;
    let c = member(addrs[2], "u3", &["room", "solo"]).await;
    expect_exactly(
        &receiver,
        0,
        &[
            tr("channel_occupied", "room", None),
            tr("channel_occupied", "solo", None),
            tr("member_added", "room", Some("u1")),
            tr("member_added", "room", Some("u2")),
            tr("member_added", "room", Some("u3")),
            tr("member_added", "solo", Some("u3")),
        ],
        DELIVERY,
    )
    .await;
    let before = receiver.events().len();
    let mut dead = nodes.pop().unwrap();
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    let killed = Instant::now();
    drop(c);
    let took = expect_exactly(
        &receiver,
        before,
        &[
            tr("member_removed", "room", Some("u3")),
            tr("member_removed", "solo", Some("u3")),
            tr("channel_vacated", "solo", None),
        ],
        TTL * 2 + Duration::from_secs(3),
    )
    .await;
    eprintln!(
        "the killed node's transitions arrived {took:?} after kill -9 (TTL {TTL:?}; checked for duplicates until {:?})",
        killed.elapsed()
    );
    // Per channel in order: the member before the channel it vacated.
    let solo: Vec<Transition> = receiver.events()[before..]
        .iter()
        .map(transition)
        .filter(|t| t.1 == "solo")
        .collect();
    assert_eq!(solo[1].0, "channel_vacated", "{solo:?}");
    // Across nodes (C occupied "solo", a survivor vacated it), ordered by the broker's `seq`:
    // the channel's whole story in the order it happened.
    let mut solo: Vec<(u64, Transition)> = receiver
        .events()
        .iter()
        .filter(|e| e["channel"] == "solo")
        .map(|e| (e["seq"].as_u64().expect("a seq"), transition(e)))
        .collect();
    solo.sort_by_key(|(seq, _)| *seq);
    assert_eq!(
        solo.into_iter().map(|(_, t)| t).collect::<Vec<_>>(),
        [
            tr("channel_occupied", "solo", None),
            tr("member_added", "solo", Some("u3")),
            tr("member_removed", "solo", Some("u3")),
            tr("channel_vacated", "solo", None),
        ]
    );
    drop((a, b));
    for node in nodes {
        node.stop();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn redis_three_processes_a_killed_nodes_transitions_arrive_once() {
    a_killed_node_is_reported_once_by_a_survivor(&redis()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn nats_three_processes_a_killed_nodes_transitions_arrive_once() {
    a_killed_node_is_reported_once_by_a_survivor(&nats()).await;
}
