//! Webhooks against a real HTTP receiver on a free port: signed batches, retries with the same
//! event ids after failures and while the receiver is away, order, the max age, and `kill -9`
//! of the real binary with undelivered events kept in `RUSTY_SOCKS_DATA_DIR`, and the channels
//! and members such a killed single node held, released after its restart.
#![allow(clippy::unwrap_used)]

mod common;
#[path = "common/receiver.rs"]
mod receiver;

use std::time::Duration;

use common::process::{Logged, signal, wait_exit};
use common::*;
use receiver::Receiver;
use rusty_socks::engine::backend::BackendUrl;
use rusty_socks::engine::webhook::{EventName, EventSet, WebhookOptions};
use rusty_socks::settings::{Config, Secret};
use serde_json::Value;

const SECRET: &str = "webhook-secret-0123456789";

/// Long enough for a few retries (the first ones come within a second).
const DELIVERY: Duration = Duration::from_secs(10);

fn webhooks(receiver: &Receiver, batch: usize) -> impl FnOnce(&mut Config) {
    let url = BackendUrl::parse(&receiver.url()).unwrap();
    move |config: &mut Config| {
        config.webhook = WebhookOptions {
            url: Some(url),
            secret: Some(Secret(SECRET.to_owned())),
            events: EventSet::of([EventName::ClientConnected, EventName::ClientDisconnected]),
            batch,
            ..WebhookOptions::default()
        };
    }
}

/// Opens a `/ws` connection and closes it: a `client_connected` and a `client_disconnected`.
async fn visit(url: &str) {
    let mut ws = connect_url(url).await;
    ws.close(None).await.unwrap();
    // The server's close answer: the session is over once it arrives.
    while let Ok(Some(Ok(_))) =
        tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut ws)).await
    {}
}

fn names(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["name"].as_str().unwrap()).collect()
}

/// Every client's `client_connected` comes before its `client_disconnected`, each exactly once.
fn assert_paired_in_order(events: &[Value], clients: usize) {
    let mut seen = std::collections::HashMap::new();
    for event in events {
        let client = event["client"].as_str().unwrap().to_owned();
        let step = seen.entry(client).or_insert(0);
        let expected = if *step == 0 {
            "client_connected"
        } else {
            "client_disconnected"
        };
        assert_eq!(event["name"], expected, "{events:#?}");
        *step += 1;
    }
    assert_eq!(seen.len(), clients, "{events:#?}");
    assert!(seen.values().all(|n| *n == 2), "{events:#?}");
}

async fn metric(addr: std::net::SocketAddr, name: &str) -> u64 {
    let (status, _, body) = http(addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or_else(|| panic!("no {name} in {body}"))
}

#[tokio::test]
async fn client_events_arrive_signed_with_ids_and_the_documented_fields() {
    let receiver = Receiver::start(SECRET).await;
    let server = TestServer::start(webhooks(&receiver, 100)).await;
    visit(&server.url("/ws")).await;
    let events = receiver.wait_events(2, DELIVERY).await;
    assert_eq!(names(&events), ["client_connected", "client_disconnected"]);
    for event in &events {
        uuid::Uuid::parse_str(event["id"].as_str().unwrap()).unwrap();
        assert!(
            event["time_ms"].as_u64().unwrap() > 1_700_000_000_000,
            "{event}"
        );
        assert!(event.get("channel").is_none(), "{event}");
        // Anonymous: no user.
        assert!(event.get("user").is_none(), "{event}");
    }
    assert_eq!(events[0]["client"], events[1]["client"]);
    assert_ne!(events[0]["id"], events[1]["id"]);
    for attempt in receiver.attempts() {
        assert!(attempt.signed, "{attempt:?}");
        assert!(attempt.body["time_ms"].is_u64());
    }
    assert_eq!(
        metric(server.addr, "rusty_socks_webhook_events_sent_total").await,
        2
    );
    server.stop().await;
}

#[tokio::test]
async fn a_failed_post_is_retried_with_the_same_ids_until_it_succeeds() {
    let receiver = Receiver::start(SECRET).await;
    receiver.fail_next(3);
    let server = TestServer::start(webhooks(&receiver, 100)).await;
    visit(&server.url("/ws")).await;
    let events = receiver.wait_events(2, DELIVERY).await;
    let attempts = receiver.attempts();
    assert!(attempts.len() >= 4, "{attempts:#?}");
    assert!(attempts[..3].iter().all(|a| a.status == 500));
    // Every attempt carried the events from the first one on, in order, under the same ids.
    let first = attempts[0].ids();
    for attempt in &attempts {
        assert!(attempt.signed);
        assert_eq!(attempt.ids()[..first.len()], first[..], "{attempts:#?}");
    }
    assert_paired_in_order(&events, 1);
    let ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(
        ids[..first.len()],
        first.iter().map(String::as_str).collect::<Vec<_>>()[..]
    );
    assert!(metric(server.addr, "rusty_socks_webhook_events_retried_total").await >= 3);
    server.stop().await;
}

#[tokio::test]
async fn while_the_receiver_is_away_events_wait_then_arrive_in_order_in_full_batches() {
    let mut receiver = Receiver::start(SECRET).await;
    receiver.go_away().await;
    let server = TestServer::start(webhooks(&receiver, 3)).await;
    let url = server.url("/ws");
    for _ in 0..4 {
        visit(&url).await;
    }
    // Eight events queued, none deliverable.
    let deadline = std::time::Instant::now() + WAIT;
    while metric(server.addr, "rusty_socks_webhook_events_queued_total").await < 8 {
        assert!(std::time::Instant::now() < deadline, "events never queued");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(metric(server.addr, "rusty_socks_webhook_events_retried_total").await > 0);
    assert_eq!(
        metric(server.addr, "rusty_socks_webhook_events_pending").await,
        8
    );
    receiver.come_back().await;
    let events = receiver.wait_events(8, Duration::from_secs(40)).await;
    assert_eq!(events.len(), 8);
    assert_paired_in_order(&events, 4);
    // Delivered head-first, BATCH at a time: 3, 3, 2.
    let sizes: Vec<usize> = receiver.delivered().iter().map(|a| a.ids().len()).collect();
    assert_eq!(sizes, [3, 3, 2]);
    assert_eq!(
        metric(server.addr, "rusty_socks_webhook_events_pending").await,
        0
    );
    server.stop().await;
}

#[tokio::test]
async fn events_older_than_the_max_age_are_dropped_and_counted() {
    let receiver = Receiver::start(SECRET).await;
    receiver.fail_next(usize::MAX);
    let tweak = webhooks(&receiver, 100);
    let server = TestServer::start(|config| {
        tweak(config);
        config.webhook.max_age = Duration::from_secs(1);
    })
    .await;
    visit(&server.url("/ws")).await;
    let deadline = std::time::Instant::now() + DELIVERY;
    while metric(server.addr, "rusty_socks_webhook_events_dropped_total").await < 2 {
        assert!(std::time::Instant::now() < deadline, "never dropped");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let old: Vec<String> = receiver.attempts().iter().flat_map(|a| a.ids()).collect();
    assert!(!old.is_empty());
    // The receiver recovers: new events arrive, the dropped ones never do.
    receiver.fail_next(0);
    visit(&server.url("/ws")).await;
    let events = receiver.wait_events(2, DELIVERY).await;
    assert_paired_in_order(&events, 1);
    assert!(
        events
            .iter()
            .all(|e| !old.contains(&e["id"].as_str().unwrap().to_owned()))
    );
    assert_eq!(
        metric(server.addr, "rusty_socks_webhook_events_sent_total").await,
        2
    );
    server.stop().await;
}

#[tokio::test]
async fn a_graceful_shutdown_delivers_the_last_disconnects() {
    let receiver = Receiver::start(SECRET).await;
    let server = TestServer::start(webhooks(&receiver, 100)).await;
    let url = server.url("/ws");
    let _a = connect_url(&url).await;
    let _b = connect_url(&url).await;
    receiver.wait_events(2, DELIVERY).await;
    // The shutdown closes both sessions; their disconnects go out before it returns.
    server.stop().await;
    let events = receiver.events();
    assert_paired_in_order(&events, 2);
}

fn token(user: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &serde_json::json!({ "sub": user }),
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .unwrap()
}

const JWT_SECRET: &str = "jwt-secret-0123456789abcdef";

/// Channel and member transitions (memory broker) reach the receiver, each channel's in the
/// order they happened, with the users; client events carry the token's user.
#[tokio::test]
async fn channel_and_member_events_arrive_in_order_per_channel() {
    let receiver = Receiver::start(SECRET).await;
    let tweak = webhooks(&receiver, 100);
    let server = TestServer::start(|config| {
        tweak(config);
        config.webhook.events = EventSet::of(EventName::ALL);
        config.jwt_secret = Some(Secret(JWT_SECRET.to_owned()));
    })
    .await;
    let url = server.url("/ws");
    let (mut u1, _) = v1_client_url(&format!("{url}?token={}", token("u1"))).await;
    let (mut u2, _) = v1_client_url(&format!("{url}?token={}", token("u2"))).await;
    let unsubscribe =
        |channel: &'static str| serde_json::json!({"type":"unsubscribe","id":99,"channel":channel});
    assert_eq!(subscribe(&mut u1, "room").await["type"], "subscribed");
    assert_eq!(subscribe(&mut u2, "room").await["type"], "subscribed");
    assert_eq!(subscribe(&mut u2, "other").await["type"], "subscribed");
    assert_eq!(
        call(&mut u1, unsubscribe("room")).await["type"],
        "unsubscribed"
    );
    assert_eq!(
        call(&mut u2, unsubscribe("room")).await["type"],
        "unsubscribed"
    );
    drop(u2);
    // 2 connected + room: 6 + other: 4 + 1 disconnected.
    let events = receiver.wait_events(13, DELIVERY).await;
    let of = |channel: &str| -> Vec<(String, Option<String>)> {
        events
            .iter()
            .filter(|e| e["channel"] == channel)
            .map(|e| {
                (
                    e["name"].as_str().unwrap().to_owned(),
                    e["user"].as_str().map(str::to_owned),
                )
            })
            .collect()
    };
    let step = |name: &str, user: Option<&str>| (name.to_owned(), user.map(str::to_owned));
    assert_eq!(
        of("room"),
        [
            step("channel_occupied", None),
            step("member_added", Some("u1")),
            step("member_added", Some("u2")),
            step("member_removed", Some("u1")),
            step("member_removed", Some("u2")),
            step("channel_vacated", None),
        ]
    );
    assert_eq!(
        of("other"),
        [
            step("channel_occupied", None),
            step("member_added", Some("u2")),
            step("member_removed", Some("u2")),
            step("channel_vacated", None),
        ]
    );
    let clients: Vec<_> = events
        .iter()
        .filter(|e| e.get("client").is_some())
        .collect();
    assert_eq!(clients[0]["name"], "client_connected");
    assert_eq!(clients[0]["user"], "u1");
    assert!(clients.iter().all(|e| e.get("channel").is_none()));
    assert!(receiver.attempts().iter().all(|a| a.signed));
    // The shutdown closes u1: its channel's vacancy is delivered before the server is gone.
    assert_eq!(subscribe(&mut u1, "last").await["type"], "subscribed");
    receiver.wait_events(15, DELIVERY).await;
    server.stop().await;
    let names_on_last: Vec<String> = receiver
        .events()
        .iter()
        .filter(|e| e["channel"] == "last")
        .map(|e| e["name"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        names_on_last,
        [
            "channel_occupied",
            "member_added",
            "member_removed",
            "channel_vacated"
        ]
    );
}

fn start_binary(dir: &TempDir, receiver: &Receiver) -> (Logged, std::net::SocketAddr) {
    start_binary_with(
        dir,
        receiver,
        &[(
            "RUSTY_SOCKS_WEBHOOK_EVENTS",
            "client_connected,client_disconnected",
        )],
    )
}

/// The binary on `dir`, reporting to `receiver`, with `extra` settings.
fn start_binary_with(
    dir: &TempDir,
    receiver: &Receiver,
    extra: &[(&str, &str)],
) -> (Logged, std::net::SocketAddr) {
    let url = receiver.url();
    let mut envs = vec![
        ("RUSTY_SOCKS_DATA_DIR", dir.path()),
        ("RUSTY_SOCKS_WEBHOOK_URL", url.as_str()),
        ("RUSTY_SOCKS_WEBHOOK_SECRET", SECRET),
    ];
    envs.extend_from_slice(extra);
    let mut server = Logged::start(&envs);
    let addr = server.address();
    (server, addr)
}

#[tokio::test]
async fn kill_9_with_undelivered_events_and_a_restart_sends_them_with_the_same_ids() {
    let dir = TempDir::new();
    let receiver = Receiver::start(SECRET).await;
    receiver.fail_next(usize::MAX);
    let (mut server, addr) = start_binary(&dir, &receiver);
    let url = format!("ws://{addr}/ws");
    for _ in 0..3 {
        visit(&url).await;
    }
    // All six were attempted (so they were on disk: only synced events are sent), none
    // delivered.
    let deadline = std::time::Instant::now() + DELIVERY;
    let attempted = loop {
        let ids: std::collections::BTreeSet<String> =
            receiver.attempts().iter().flat_map(|a| a.ids()).collect();
        if ids.len() == 6 {
            break ids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{:#?}",
            receiver.attempts()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    let before = receiver.attempts().len();
    receiver.fail_next(0);
    let (mut server, _) = start_binary(&dir, &receiver);
    server.wait_for("webhook events from before the restart are sent first");
    let events = receiver.wait_events(6, DELIVERY).await;
    let delivered: std::collections::BTreeSet<String> = events
        .iter()
        .map(|e| e["id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(delivered, attempted);
    assert_eq!(events.len(), 6, "each once: {events:#?}");
    assert_paired_in_order(&events, 3);
    assert!(receiver.attempts()[before..].iter().all(|a| a.signed));
    // Delivered and marked done: a second restart sends nothing again.
    signal(&server.child, "TERM");
    assert!(wait_exit(&mut server.child, WAIT).success());
    let (mut server, addr) = start_binary(&dir, &receiver);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(receiver.events().len(), 6);
    assert_eq!(metric(addr, "rusty_socks_webhook_events_pending").await, 0);
    signal(&server.child, "TERM");
    assert!(wait_exit(&mut server.child, WAIT).success());
}

/// What the receiver got, each id once (at least once allows a duplicate), as
/// (name, channel, user).
fn distinct(receiver: &Receiver) -> Vec<(String, String, Option<String>)> {
    let mut seen = std::collections::HashSet::new();
    receiver
        .events()
        .into_iter()
        .filter(|e| seen.insert(e["id"].as_str().unwrap().to_owned()))
        .map(|e| {
            (
                e["name"].as_str().unwrap().to_owned(),
                e["channel"].as_str().unwrap_or_default().to_owned(),
                e["user"].as_str().map(str::to_owned),
            )
        })
        .collect()
}

/// Waits until the receiver has `n` distinct events.
async fn wait_distinct(receiver: &Receiver, n: usize) -> Vec<(String, String, Option<String>)> {
    let deadline = std::time::Instant::now() + DELIVERY;
    loop {
        let got = distinct(receiver);
        if got.len() >= n {
            return got;
        }
        assert!(std::time::Instant::now() < deadline, "{got:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Issue 15, one node: what a `kill -9` left held (a member of a presence channel, the
/// channel) is released after the restart, members first, before the channel is occupied
/// again; a second `kill -9` releases only what the second life held; a graceful stop releases
/// what it held itself and leaves nothing to release.
#[tokio::test]
async fn kill_9_of_a_single_node_releases_its_channels_and_members_after_the_restart() {
    let dir = TempDir::new();
    let receiver = Receiver::start(SECRET).await;
    let events = [
        (
            "RUSTY_SOCKS_WEBHOOK_EVENTS",
            "channel_occupied,channel_vacated,member_added,member_removed",
        ),
        ("RUSTY_SOCKS_JWT_SECRET", JWT_SECRET),
    ];
    let step = |name: &str, user: Option<&str>| {
        (name.to_owned(), "room".to_owned(), user.map(str::to_owned))
    };
    let (mut server, addr) = start_binary_with(&dir, &receiver, &events);
    let url = format!("ws://{addr}/ws?token={}", token("u1"));
    let (mut u1, _) = v1_client_url(&url).await;
    subscribe(&mut u1, "room").await;
    assert_eq!(
        wait_distinct(&receiver, 2).await,
        [
            step("channel_occupied", None),
            step("member_added", Some("u1"))
        ]
    );
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(u1);

    let (mut server, addr) = start_binary_with(&dir, &receiver, &events);
    server.wait_for("holdings of the previous run");
    // A client back at once: its occupation follows the old life's vacancy.
    let url = format!("ws://{addr}/ws?token={}", token("u2"));
    let (mut u2, _) = v1_client_url(&url).await;
    subscribe(&mut u2, "room").await;
    assert_eq!(
        wait_distinct(&receiver, 6).await,
        [
            step("channel_occupied", None),
            step("member_added", Some("u1")),
            step("member_removed", Some("u1")),
            step("channel_vacated", None),
            step("channel_occupied", None),
            step("member_added", Some("u2")),
        ]
    );
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(u2);

    // The first life's releases were stored, so only the second's come now.
    let (mut server, addr) = start_binary_with(&dir, &receiver, &events);
    let got = wait_distinct(&receiver, 8).await;
    assert_eq!(
        got[6..],
        [
            step("member_removed", Some("u2")),
            step("channel_vacated", None)
        ]
    );
    assert!(receiver.attempts().iter().all(|a| a.signed));
    // A graceful stop releases what its sessions held itself ...
    let url = format!("ws://{addr}/ws?token={}", token("u3"));
    let (mut u3, _) = v1_client_url(&url).await;
    subscribe(&mut u3, "room").await;
    wait_distinct(&receiver, 10).await;
    // The client answers the server's close (1001) while the server stops.
    let closing = tokio::spawn(async move {
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(WAIT, futures_util::StreamExt::next(&mut u3)).await
        {}
    });
    signal(&server.child, "TERM");
    let deadline = std::time::Instant::now() + WAIT;
    while server.child.try_wait().unwrap().is_none() {
        assert!(std::time::Instant::now() < deadline, "no exit after TERM");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(server.child.try_wait().unwrap().unwrap().success());
    closing.await.unwrap();
    assert_eq!(
        distinct(&receiver)[10..],
        [
            step("member_removed", Some("u3")),
            step("channel_vacated", None)
        ]
    );

    // ... so the next start has nothing to release.
    let (mut server, _) = start_binary_with(&dir, &receiver, &events);
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(distinct(&receiver).len(), 12, "{:#?}", distinct(&receiver));
    assert!(
        !server
            .seen
            .iter()
            .any(|l| l.contains("holdings of the previous run")),
        "{:#?}",
        server.seen
    );
    signal(&server.child, "TERM");
    assert!(wait_exit(&mut server.child, WAIT).success());
}

#[test]
fn a_webhook_url_without_a_secret_is_a_startup_error_naming_the_setting() {
    let (code, stdout, stderr) = common::process::run(
        &[],
        &[
            ("RUSTY_SOCKS_HOST", "127.0.0.1"),
            ("RUSTY_SOCKS_PORT", "0"),
            ("RUSTY_SOCKS_WEBHOOK_URL", "http://127.0.0.1:9/hooks"),
            ("RUSTY_SOCKS_WEBHOOK_EVENTS", "channel_occupied,bogus"),
        ],
    );
    assert_eq!(code, 2);
    let text = format!("{stdout}{stderr}");
    assert!(text.contains("RUSTY_SOCKS_WEBHOOK_SECRET"), "{text}");
    assert!(text.contains("RUSTY_SOCKS_WEBHOOK_EVENTS"), "{text}");
}

/// Two nodes on one Redis, both sending webhooks to the same receiver: each channel transition
/// is delivered once, by one node.
#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn redis_two_nodes_deliver_each_transition_once() {
    let redis = std::env::var("RUSTY_SOCKS_TEST_REDIS_URL").expect(
        "RUSTY_SOCKS_TEST_REDIS_URL is not set: this test needs Redis, \
         e.g. RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379",
    );
    let prefix = format!("wh{}", uuid::Uuid::new_v4().simple());
    let receiver = Receiver::start(SECRET).await;
    let mut nodes = Vec::new();
    for _ in 0..2 {
        let tweak = webhooks(&receiver, 100);
        let (redis, prefix) = (redis.clone(), prefix.clone());
        nodes.push(
            TestServer::start(move |config| {
                tweak(config);
                config.webhook.events = EventSet::DEFAULT;
                config.broker = rusty_socks::settings::BrokerUrl::Redis(redis);
                config.broker_prefix = prefix;
            })
            .await,
        );
    }
    let (mut a, _) = v1_client_url(&nodes[0].url("/ws")).await;
    let (mut b, _) = v1_client_url(&nodes[1].url("/ws")).await;
    assert_eq!(subscribe(&mut a, "room").await["type"], "subscribed");
    receiver.wait_events(1, DELIVERY).await;
    assert_eq!(subscribe(&mut b, "room").await["type"], "subscribed");
    let unsubscribe = serde_json::json!({"type":"unsubscribe","id":99,"channel":"room"});
    assert_eq!(
        call(&mut a, unsubscribe.clone()).await["type"],
        "unsubscribed"
    );
    assert_eq!(call(&mut b, unsubscribe).await["type"], "unsubscribed");
    let events = receiver.wait_events(2, DELIVERY).await;
    // Anything sent twice would have arrived by now.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let events_now = receiver.events();
    assert_eq!(events_now.len(), events.len(), "{events_now:#?}");
    assert_eq!(names(&events_now), ["channel_occupied", "channel_vacated"]);
    for node in nodes {
        node.stop().await;
    }
}
