//! Legacy chat messages of one read are published as one pipeline (issue 19 item 6): sent to
//! the broker back to back, then the answers awaited.
//!
//! The node talks to the shared Redis (`RUSTY_SOCKS_TEST_REDIS_URL`) or NATS
//! (`RUSTY_SOCKS_TEST_NATS_URL`) through a [`FaultProxy`] that can hold the answers back
//! until it has seen a number of publish requests: published one at a time, the first answer
//! never comes (the publish fails at the broker deadline); pipelined, every request is out
//! before any answer is needed. Not a timing test: it fails by the deadline, never by being
//! slow. The last tests run two nodes pipelining on one channel at once (no proxy): offsets
//! and each publisher's order must survive the contention.
#![cfg(all(feature = "redis", feature = "nats"))]
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::proxy::FaultProxy;
use common::*;
use futures_util::SinkExt;
use rusty_socks::settings::{BrokerUrl, Config};
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message;

/// The broker deadline the node runs with.
const TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Clone, Copy, Debug)]
enum Kind {
    Redis,
    Nats,
}

impl Kind {
    fn url(self) -> String {
        let (var, example) = match self {
            Kind::Redis => ("RUSTY_SOCKS_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
            Kind::Nats => ("RUSTY_SOCKS_TEST_NATS_URL", "nats://127.0.0.1:4222"),
        };
        std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: this test needs a {self:?} broker, e.g. {var}={example}")
        })
    }

    /// How many publishes of a pipeline go alone before the rest are sent back to back
    /// (NATS sends its first alone, the rest chained to its stream sequence, unless the
    /// channel's previous pipeline found the stream its alone: see
    /// `nats_sends_a_pipeline_whole_when_its_channel_had_the_stream_alone`).
    fn alone(self) -> usize {
        match self {
            Kind::Redis => 0,
            Kind::Nats => 1,
        }
    }

    fn scheme(self) -> &'static str {
        match self {
            Kind::Redis => "redis",
            Kind::Nats => "nats",
        }
    }

    /// The `host:port` the broker listens on.
    fn addr(self) -> std::net::SocketAddr {
        let url = self.url();
        let rest = url.split("://").nth(1).unwrap();
        let host = rest.rsplit('@').next().unwrap().split('/').next().unwrap();
        std::net::ToSocketAddrs::to_socket_addrs(host)
            .unwrap()
            .next()
            .unwrap()
    }
}

/// A node on the broker at `url`, under `prefix`.
async fn node(kind: Kind, url: String, prefix: &str) -> TestServer {
    let prefix = prefix.to_owned();
    TestServer::start(move |config: &mut Config| {
        config.broker = match kind {
            Kind::Redis => BrokerUrl::Redis(url),
            Kind::Nats => BrokerUrl::Nats(url),
        };
        config.broker_prefix = prefix;
        config.broker_timeout = TIMEOUT;
        // Room for everything `contended` publishes.
        config.history_size = 1000;
    })
    .await
}

/// What a test leaves behind on a shared NATS (its stream and buckets) goes with it.
struct Cleanup(Kind, String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        if let Kind::Nats = self.0 {
            delete_nats_prefix(&self.0.url(), &self.1);
        }
    }
}

/// A node on the broker through a fresh proxy, a legacy subscriber and a legacy publisher on
/// it, and a marker unique to this test (in every message's content; also the prefix).
async fn setup(kind: Kind) -> (FaultProxy, TestServer, Ws, Ws, String, Cleanup) {
    let proxy = FaultProxy::start(kind.addr()).await;
    let marker = format!("pl{}-", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let prefix = marker.trim_end_matches('-').to_owned();
    let cleanup = Cleanup(kind, prefix.clone());
    let server = node(kind, proxy.url(kind.scheme()), &prefix).await;
    let (mut subscriber, _) = join(&server).await;
    let (mut publisher, _) = join(&server).await;
    // The channel's first publication starts its epoch alone (NATS: nothing to chain to);
    // it is made before the proxy holds anything.
    send_text(&mut publisher, &chat("warm-up ", 0)).await;
    assert_eq!(contents(&mut subscriber, 1).await, ["warm-up 0"]);
    (proxy, server, subscriber, publisher, marker, cleanup)
}

fn chat(marker: &str, n: usize) -> String {
    json!({"sender": "pipe", "content": format!("{marker}{n}")}).to_string()
}

/// Sends `texts` as one write (each a frame of its own), so they arrive in one read.
async fn send_all(ws: &mut Ws, texts: &[String]) {
    for text in texts {
        ws.feed(Message::text(text.clone())).await.unwrap();
    }
    ws.flush().await.unwrap();
}

/// The next `n` chat contents `ws` receives.
async fn contents(ws: &mut Ws, n: usize) -> Vec<String> {
    let mut got = Vec::new();
    while got.len() < n {
        let frame = recv_json(ws).await;
        assert_eq!(frame["type"], "Chat", "{frame}; got so far {got:?}");
        got.push(frame["content"].as_str().unwrap().to_owned());
    }
    got
}

/// The frames `ws` receives up to and including the error frame the sentinel (a message
/// that is not JSON) is answered with: every error of what it sent before, in order.
async fn errors_until_sentinel(ws: &mut Ws) -> Vec<Value> {
    send_text(ws, "sentinel, not json").await;
    let mut errors = Vec::new();
    loop {
        let frame = recv_json(ws).await;
        if frame["type"] == "Chat" {
            continue; // someone else's message
        }
        assert_eq!(frame["type"], "Error", "{frame}");
        if frame["code"] == "invalid_json" {
            return errors;
        }
        errors.push(frame);
    }
}

/// N chat messages in one write; the proxy answers none of the node's broker requests
/// until it has seen all N publishes.
async fn one_pipeline(kind: Kind) {
    const N: usize = 8;
    let (proxy, server, mut subscriber, mut publisher, marker, _cleanup) = setup(kind).await;
    proxy.hold_replies_after(marker.as_bytes(), kind.alone(), N);
    let texts: Vec<String> = (1..=N).map(|n| chat(&marker, n)).collect();
    send_all(&mut publisher, &texts).await;
    let expected: Vec<String> = (1..=N).map(|n| format!("{marker}{n}")).collect();
    assert_eq!(contents(&mut subscriber, N).await, expected);
    assert_eq!(proxy.held_requests(), N);
    // Every publish was confirmed: no error frame before the sentinel's.
    assert_eq!(
        errors_until_sentinel(&mut publisher).await,
        Vec::<Value>::new()
    );
    server.stop().await;
}

/// Another channel of the same JetStream stream was written since this channel's last
/// publication: the stream's sequence moved on. The pipeline still goes out as one (its first
/// append alone, the rest chained to that one's real sequence), with nothing refused and sent
/// again: exactly N publish requests.
#[tokio::test]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn nats_pipelines_on_a_stream_that_other_channels_write_to() {
    const N: usize = 8;
    let kind = Kind::Nats;
    let (proxy, server, mut subscriber, mut publisher, marker, _cleanup) = setup(kind).await;
    let (mut other, _) = v1_client(&server).await;
    publish(&mut other, "elsewhere", json!("moves the stream on")).await;
    proxy.hold_replies_after(marker.as_bytes(), kind.alone(), N);
    let texts: Vec<String> = (1..=N).map(|n| chat(&marker, n)).collect();
    send_all(&mut publisher, &texts).await;
    let expected: Vec<String> = (1..=N).map(|n| format!("{marker}{n}")).collect();
    assert_eq!(contents(&mut subscriber, N).await, expected);
    assert_eq!(proxy.held_requests(), N, "none refused and published again");
    server.stop().await;
}

/// A pipeline whose channel had the stream to itself last time (the previous pipeline's
/// first append was stored right after the channel's message before it) predicts that it
/// still does and sends every append before any answer: the proxy answers none of them
/// until it has seen all N (one round trip, not two). When the stream has moved on after
/// all (another channel was written), the prediction is refused, nothing of it is stored,
/// and the pipeline goes again the usual way: every message stored once, in order.
#[tokio::test]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn nats_sends_a_pipeline_whole_when_its_channel_had_the_stream_alone() {
    const N: usize = 8;
    let kind = Kind::Nats;
    let (proxy, server, mut subscriber, mut publisher, marker, _cleanup) = setup(kind).await;
    let read = |reads: usize| -> (Vec<String>, Vec<String>) {
        let numbers = reads * N + 1..=(reads + 1) * N;
        let texts = numbers.clone().map(|n| chat(&marker, n)).collect();
        (texts, numbers.map(|n| format!("{marker}{n}")).collect())
    };
    // After the warm-up (a single publish), the first append goes alone and finds the
    // stream unmoved.
    proxy.hold_replies_after(marker.as_bytes(), kind.alone(), N);
    let (texts, expected) = read(0);
    send_all(&mut publisher, &texts).await;
    assert_eq!(contents(&mut subscriber, N).await, expected);
    // Now every append goes out before any answer.
    proxy.hold_replies_after(marker.as_bytes(), 0, N);
    let (texts, expected) = read(1);
    send_all(&mut publisher, &texts).await;
    assert_eq!(contents(&mut subscriber, N).await, expected);
    assert_eq!(
        proxy.held_requests(),
        N,
        "one pipeline, nothing published again"
    );
    assert_eq!(
        errors_until_sentinel(&mut publisher).await,
        Vec::<Value>::new()
    );
    // Another channel moves the stream on: the predicted pipeline is refused whole and sent
    // again (the proxy holds nothing once it has seen N).
    let (mut other, _) = v1_client(&server).await;
    publish(&mut other, "elsewhere", json!("moves the stream on")).await;
    let (texts, expected) = read(2);
    send_all(&mut publisher, &texts).await;
    assert_eq!(contents(&mut subscriber, N).await, expected);
    assert_eq!(
        errors_until_sentinel(&mut publisher).await,
        Vec::<Value>::new()
    );
    let stored = history(&mut publisher).await;
    let offsets: Vec<u64> = stored.iter().map(|(offset, _)| *offset).collect();
    assert_eq!(offsets, (1..=3 * N as u64 + 1).collect::<Vec<_>>());
    let contents: Vec<String> = stored.into_iter().skip(1).map(|(_, c)| c).collect();
    let all: Vec<String> = (1..=3 * N).map(|n| format!("{marker}{n}")).collect();
    assert_eq!(contents, all, "each stored once, in order");
    server.stop().await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn redis_gets_the_chat_messages_of_one_read_as_one_pipeline() {
    one_pipeline(Kind::Redis).await;
}

#[tokio::test]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn nats_gets_the_chat_messages_of_one_read_as_one_pipeline() {
    one_pipeline(Kind::Nats).await;
}

/// Three valid messages around two invalid ones, all in one read: still one pipeline, and
/// each invalid one answered in its place.
async fn invalid_in_the_middle(kind: Kind) {
    let (proxy, server, mut subscriber, mut publisher, marker, _cleanup) = setup(kind).await;
    proxy.hold_replies_after(marker.as_bytes(), kind.alone(), 3);
    let texts = vec![
        chat(&marker, 1),
        json!({"sender": "pipe", "content": 5}).to_string(),
        chat(&marker, 2),
        json!({"content": "no sender"}).to_string(),
        chat(&marker, 3),
    ];
    send_all(&mut publisher, &texts).await;
    let expected: Vec<String> = (1..=3).map(|n| format!("{marker}{n}")).collect();
    assert_eq!(contents(&mut subscriber, 3).await, expected);
    let errors = errors_until_sentinel(&mut publisher).await;
    assert_eq!(errors.len(), 2, "{errors:?}");
    assert!(
        errors[0]["message"].as_str().unwrap().contains("content"),
        "the first error is the bad content's: {errors:?}"
    );
    assert_eq!(errors[1]["code"], "missing_field", "{errors:?}");
    server.stop().await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn redis_answers_an_invalid_message_in_a_pipelined_read_in_its_place() {
    invalid_in_the_middle(Kind::Redis).await;
}

#[tokio::test]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn nats_answers_an_invalid_message_in_a_pipelined_read_in_its_place() {
    invalid_in_the_middle(Kind::Nats).await;
}

/// The broker stops answering with a whole pipeline in flight: every message of it gets an
/// `unavailable` error within the deadline, none hangs.
async fn stalled(kind: Kind) {
    const N: usize = 5;
    let (proxy, server, mut subscriber, mut publisher, marker, _cleanup) = setup(kind).await;
    // More are awaited than sent: the answers are held for good.
    proxy.hold_replies(marker.as_bytes(), N + 1);
    let started = Instant::now();
    let texts: Vec<String> = (1..=N).map(|n| chat(&marker, n)).collect();
    send_all(&mut publisher, &texts).await;
    for _ in 0..N {
        let frame = recv_json(&mut publisher).await;
        assert_eq!(frame["type"], "Error", "{frame}");
        assert_eq!(frame["code"], "unavailable", "{frame}");
    }
    let took = started.elapsed();
    assert!(took < TIMEOUT * 2, "{took:?}");
    if let Kind::Redis = kind {
        // Redis ran them (only its answers were held), and its pub/sub connection carried
        // no publish: the subscriber gets them, in order.
        let expected: Vec<String> = (1..=N).map(|n| format!("{marker}{n}")).collect();
        assert_eq!(contents(&mut subscriber, N).await, expected);
    }
    drop(subscriber);
    server.stop().await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn redis_fails_every_message_of_a_stalled_pipeline_in_time() {
    stalled(Kind::Redis).await;
}

#[tokio::test]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn nats_fails_every_message_of_a_stalled_pipeline_in_time() {
    stalled(Kind::Nats).await;
}

/// Offsets of the `default` channel's history, with each publication's content.
async fn history(ws: &mut Ws) -> Vec<(u64, String)> {
    let command = json!({"type": "history", "id": "h", "channel": "default", "limit": 1000});
    send_text(ws, &command.to_string()).await;
    loop {
        let frame = recv_json(ws).await;
        if frame["id"] == "h" {
            assert_eq!(frame["type"], "history", "{frame}");
            return frame["publications"]
                .as_array()
                .unwrap()
                .iter()
                .map(|p| {
                    let content = p["data"]["content"].as_str().unwrap().to_owned();
                    (p["offset"].as_u64().unwrap(), content)
                })
                .collect();
        }
    }
}

/// Two nodes publish pipelined reads on the same channel at once. On NATS most appends of a
/// pipeline are refused whenever the other node's land in between, and are published again:
/// every message must be stored exactly once, each publisher's in its order, with offsets
/// 1, 2, 3, ... and no error.
async fn contended(kind: Kind) {
    const READS: usize = 10;
    const PER_READ: usize = 8;
    let marker = format!("pc{}-", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let prefix = marker.trim_end_matches('-').to_owned();
    let _cleanup = Cleanup(kind, prefix.clone());
    let a = node(kind, kind.url(), &prefix).await;
    let b = node(kind, kind.url(), &prefix).await;
    let mut publishers = Vec::new();
    for server in [&a, &b] {
        publishers.push(join(server).await.0);
    }
    let sends = publishers.into_iter().enumerate().map(|(p, mut ws)| {
        let marker = marker.clone();
        async move {
            for read in 0..READS {
                let texts: Vec<String> = (0..PER_READ)
                    .map(|i| chat(&format!("{marker}{p}-"), read * PER_READ + i))
                    .collect();
                send_all(&mut ws, &texts).await;
            }
            // Nothing failed: the sentinel's error comes first.
            assert_eq!(errors_until_sentinel(&mut ws).await, Vec::<Value>::new());
            ws
        }
    });
    let mut publishers = futures_util::future::join_all(sends).await;
    let stored = history(&mut publishers[0]).await;
    let total = 2 * READS * PER_READ;
    let offsets: Vec<u64> = stored.iter().map(|(offset, _)| *offset).collect();
    assert_eq!(offsets, (1..=total as u64).collect::<Vec<_>>());
    for p in 0..2 {
        let mine: Vec<String> = stored
            .iter()
            .filter_map(|(_, content)| content.strip_prefix(&format!("{marker}{p}-")))
            .map(str::to_owned)
            .collect();
        let expected: Vec<String> = (0..READS * PER_READ).map(|n| n.to_string()).collect();
        assert_eq!(mine, expected, "publisher {p}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn redis_keeps_offsets_and_order_of_two_nodes_pipelining_at_once() {
    contended(Kind::Redis).await;
}

#[tokio::test]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn nats_keeps_offsets_and_order_of_two_nodes_pipelining_at_once() {
    contended(Kind::Nats).await;
}

/// `redis-cli -p port args...`, which must succeed.
fn redis_cli(port: u16, args: &[&str]) {
    let status = std::process::Command::new("redis-cli")
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .unwrap_or_else(|err| panic!("redis-cli could not be run ({err}): this test needs it"));
    assert!(status.success(), "redis-cli {args:?}: {status:?}");
}

/// A Redis that does not know the publish script (a fresh server, then one whose scripts were
/// flushed, as after a restart): the pipeline is refused with NOSCRIPT, the script loaded and
/// the pipeline sent again, with nothing lost, doubled or reordered. Runs a `redis-server` of
/// its own, since flushing the shared one's scripts would touch other runs.
#[tokio::test]
#[ignore = "needs redis-server and redis-cli on the PATH (starts its own): cargo test -- --include-ignored"]
async fn a_redis_without_the_publish_script_gets_it_and_the_pipeline_again() {
    const N: usize = 6;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = std::process::Command::new("redis-server")
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap_or_else(|err| panic!("redis-server could not be run ({err}): this test needs it"));
    let _redis = common::process::Reap(child);
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "redis-server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let marker = format!("ns{}-", &uuid::Uuid::new_v4().simple().to_string()[..10]);
    let server = node(Kind::Redis, format!("redis://127.0.0.1:{port}"), "ns").await;
    let (mut subscriber, _) = join(&server).await;
    let (mut publisher, _) = join(&server).await;
    for round in 0..2 {
        if round == 1 {
            redis_cli(port, &["SCRIPT", "FLUSH"]);
        }
        let texts: Vec<String> = (0..N).map(|n| chat(&marker, round * N + n)).collect();
        send_all(&mut publisher, &texts).await;
        let expected: Vec<String> = (0..N)
            .map(|n| format!("{marker}{}", round * N + n))
            .collect();
        assert_eq!(
            contents(&mut subscriber, N).await,
            expected,
            "round {round}"
        );
        assert_eq!(
            errors_until_sentinel(&mut publisher).await,
            Vec::<Value>::new()
        );
    }
    let stored = history(&mut publisher).await;
    let offsets: Vec<u64> = stored.iter().map(|(offset, _)| *offset).collect();
    assert_eq!(offsets, (1..=2 * N as u64).collect::<Vec<_>>());
    server.stop().await;
}

/// The next `n` publication frames on `ws` (skipping anything else): their data.
async fn publications(ws: &mut Ws, n: usize) -> Vec<Value> {
    let mut got = Vec::new();
    while got.len() < n {
        let frame = recv_json(ws).await;
        if frame["type"] == "publication" {
            got.push(frame["data"].clone());
        }
    }
    got
}

/// v1 `publish` commands to one channel in one write go as one pipeline too, each answered
/// with its own id and offset, in order.
async fn v1_pipeline(kind: Kind) {
    const N: u64 = 6;
    let (proxy, server, _legacy_subscriber, _legacy_publisher, marker, _cleanup) =
        setup(kind).await;
    let (mut subscriber, _) = v1_client(&server).await;
    subscribe(&mut subscriber, "room").await;
    let (mut publisher, _) = v1_client(&server).await;
    // The channel's first publication goes alone (NATS: nothing to chain to).
    assert_eq!(publish(&mut publisher, "room", json!("warm-up")).await, 1);
    assert_eq!(publications(&mut subscriber, 1).await, [json!("warm-up")]);
    proxy.hold_replies_after(marker.as_bytes(), kind.alone(), N as usize);
    let commands: Vec<String> = (1..=N)
        .map(|n| {
            json!({"type": "publish", "id": n, "channel": "room", "data": format!("{marker}{n}")})
                .to_string()
        })
        .collect();
    send_all(&mut publisher, &commands).await;
    for n in 1..=N {
        let reply = recv_json(&mut publisher).await;
        assert_eq!(reply["type"], "published", "{reply}");
        assert_eq!(reply["id"], n, "{reply}");
        assert_eq!(reply["offset"], n + 1, "{reply}");
    }
    let expected: Vec<Value> = (1..=N).map(|n| json!(format!("{marker}{n}"))).collect();
    assert_eq!(publications(&mut subscriber, N as usize).await, expected);
    assert_eq!(proxy.held_requests(), N as usize);
    server.stop().await;
}

#[tokio::test]
#[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
async fn redis_gets_the_v1_publishes_of_one_read_as_one_pipeline() {
    v1_pipeline(Kind::Redis).await;
}

#[tokio::test]
#[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
async fn nats_gets_the_v1_publishes_of_one_read_as_one_pipeline() {
    v1_pipeline(Kind::Nats).await;
}

/// The memory broker gathers a read's v1 publishes too: every command still gets its own
/// answer, in order, whether it was gathered (a keyed retry is a duplicate) or not (one to
/// the default channel is refused, one to another channel ends the gathered run).
#[tokio::test]
async fn v1_publishes_of_one_read_are_answered_in_order_on_the_memory_broker() {
    let server = TestServer::start(|_| {}).await;
    let (mut subscriber, _) = v1_client(&server).await;
    subscribe(&mut subscriber, "room").await;
    let (mut publisher, _) = v1_client(&server).await;
    let publish = |id: u64, channel: &str, key: Option<&str>| {
        let mut command = json!({"type": "publish", "id": id, "channel": channel, "data": id});
        if let Some(key) = key {
            command["idempotency_key"] = json!(key);
        }
        command.to_string()
    };
    let commands = [
        publish(1, "room", None),
        publish(2, "room", Some("k")),
        publish(3, "default", None),
        publish(4, "room", Some("k")),
        publish(5, "other", None),
        publish(6, "room", None),
    ];
    send_all(&mut publisher, &commands).await;
    let mut replies = Vec::new();
    for _ in 0..commands.len() {
        let reply = recv_json(&mut publisher).await;
        replies.push((
            reply["id"].as_u64().unwrap(),
            reply["type"].as_str().unwrap().to_owned(),
            reply["offset"].as_u64(),
            // Present only on a duplicate.
            reply["duplicate"].as_bool().unwrap_or(false),
        ));
    }
    let published = |id, offset, duplicate| (id, "published".to_owned(), Some(offset), duplicate);
    assert_eq!(
        replies,
        [
            published(1, 1, false),
            published(2, 2, false),
            (3, "error".to_owned(), None, false),
            published(4, 2, true),
            published(5, 1, false),
            published(6, 3, false),
        ]
    );
    assert_eq!(
        publications(&mut subscriber, 3).await,
        [json!(1), json!(2), json!(6)]
    );
    server.stop().await;
}
