//! Several server processes sharing one broker (Redis and NATS): fan-out across nodes,
//! recovery on another node, presence across nodes without ghosts, and a broker restart.
//!
//! Each test runs once per broker whose URL is set (`RUSTY_SOCKS_TEST_REDIS_URL`,
//! `RUSTY_SOCKS_TEST_NATS_URL`; `.ci/run` sets both) and reports itself skipped otherwise.
//! The broker-restart tests start their own `redis-server` / `nats-server` on a free port, so
//! the shared ones are never touched; they are skipped when the binary is missing.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// Presence TTL the nodes run with, in seconds.
const PRESENCE_TTL: u64 = 3;

#[derive(Clone, Copy, Debug)]
enum Kind {
    Redis,
    Nats,
}

impl Kind {
    fn shared_url(self) -> Option<String> {
        let var = match self {
            Kind::Redis => "RUSTY_SOCKS_TEST_REDIS_URL",
            Kind::Nats => "RUSTY_SOCKS_TEST_NATS_URL",
        };
        let url = std::env::var(var).ok();
        if url.is_none() {
            eprintln!("skipped: {var} not set");
        }
        url
    }
}

/// One `rusty_socks` process.
struct Node {
    child: Child,
    addr: SocketAddr,
}

impl Node {
    async fn start(broker: &str, prefix: &str) -> Node {
        let mut child = Command::new(env!("CARGO_BIN_EXE_rusty_socks"))
            .env("RUSTY_SOCKS_HOST", "127.0.0.1")
            .env("RUSTY_SOCKS_PORT", "0")
            .env("RUSTY_SOCKS_BROKER", broker)
            .env("RUSTY_SOCKS_BROKER_PREFIX", prefix)
            .env("RUSTY_SOCKS_PRESENCE_TTL", PRESENCE_TTL.to_string())
            .env("RUST_LOG", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("start rusty_socks");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let addr = tokio::time::timeout(Duration::from_secs(15), async {
            while let Some(line) = lines.next_line().await.unwrap() {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap();
                    return addr.parse::<SocketAddr>().unwrap();
                }
            }
            panic!("rusty_socks exited before listening");
        })
        .await
        .expect("rusty_socks did not start within 15 s");
        // Keep draining its output so it never blocks on a full pipe.
        // Warnings are shown with the test's output (on failure).
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if line.contains("WARN") || line.contains("ERROR") {
                    println!("node: {line}");
                }
            }
        });
        Node { child, addr }
    }

    fn ws(&self) -> String {
        format!("ws://{}/ws", self.addr)
    }

    async fn client(&self) -> (Ws, String) {
        v1_client_url(&self.ws()).await
    }

    async fn health(&self) -> u16 {
        http(self.addr, "GET", "/health", &[]).await.0
    }

    /// SIGKILL: no goodbye to the broker.
    async fn kill(&mut self) {
        self.child.start_kill().unwrap();
        let _ = self.child.wait().await;
    }
}

async fn nodes(broker: &str, count: usize) -> Vec<Node> {
    let prefix = format!("ct{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut nodes = Vec::new();
    for _ in 0..count {
        nodes.push(Node::start(broker, &prefix).await);
    }
    nodes
}

/// Reads pushes until `count` publications on `channel` arrived; returns their (offset, data).
async fn publications(ws: &mut Ws, channel: &str, count: usize) -> Vec<(u64, Value)> {
    let mut got = Vec::new();
    while got.len() < count {
        let frame = recv_json(ws).await;
        if frame["type"] == "publication" && frame["channel"] == channel {
            got.push((frame["offset"].as_u64().unwrap(), frame["data"].clone()));
        }
    }
    got
}

/// Asserts nothing more arrives for a while.
async fn quiet(ws: &mut Ws) {
    if let Ok(Some(Ok(extra))) = tokio::time::timeout(Duration::from_millis(300), ws.next()).await {
        panic!("unexpected frame {extra:?}");
    }
}

async fn fan_out_reaches_every_node_once_in_order(kind: Kind) {
    let Some(url) = kind.shared_url() else { return };
    let cluster = nodes(&url, 3).await;
    let (mut publisher, _) = cluster[0].client().await;
    let mut subscribers = Vec::new();
    // Two subscribers on B, one on C: B still receives each publication from the broker once.
    for node in [&cluster[1], &cluster[1], &cluster[2]] {
        let (mut ws, _) = node.client().await;
        subscribe(&mut ws, "room").await;
        subscribers.push(ws);
    }
    for n in 1..=50 {
        publish(&mut publisher, "room", json!({ "n": n })).await;
    }
    for ws in &mut subscribers {
        let got = publications(ws, "room", 50).await;
        let expected: Vec<(u64, Value)> = (1..=50).map(|n| (n, json!({ "n": n }))).collect();
        assert_eq!(got, expected, "every publication once, in order");
        quiet(ws).await;
    }
}

async fn a_client_moving_to_another_node_recovers_what_it_missed(kind: Kind) {
    let Some(url) = kind.shared_url() else { return };
    let cluster = nodes(&url, 3).await;
    let (mut publisher, _) = cluster[2].client().await;
    let (mut on_a, _) = cluster[0].client().await;
    let reply = subscribe(&mut on_a, "room").await;
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    for n in 1..=5 {
        publish(&mut publisher, "room", json!(n)).await;
    }
    let seen = publications(&mut on_a, "room", 5).await;
    let last = seen.last().unwrap().0;
    drop(on_a);
    for n in 6..=10 {
        publish(&mut publisher, "room", json!(n)).await;
    }
    let (mut on_b, _) = cluster[1].client().await;
    let reply = call(
        &mut on_b,
        json!({"type":"subscribe","id":1,"channel":"room","since":{"offset":last,"epoch":epoch}}),
    )
    .await;
    assert_eq!(reply["recovered"], true, "{reply}");
    assert_eq!(offsets(&reply["publications"]), vec![6, 7, 8, 9, 10]);
    publish(&mut publisher, "room", json!(11)).await;
    assert_eq!(publications(&mut on_b, "room", 1).await[0].0, 11);
}

async fn presence_spans_nodes_and_a_killed_node_leaves_no_ghosts(kind: Kind) {
    let Some(url) = kind.shared_url() else { return };
    let mut cluster = nodes(&url, 3).await;
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for node in &cluster {
        let (mut ws, id) = node.client().await;
        subscribe(&mut ws, "room").await;
        clients.push(ws);
        ids.push(id);
    }
    ids.sort();
    assert_eq!(presence_of(&mut clients[0], "room").await, ids);
    drop(clients.pop()); // its node is about to die with it
    cluster[2].kill().await;
    let started = Instant::now();
    let deadline = Duration::from_secs(PRESENCE_TTL + 3);
    loop {
        let present = presence_of(&mut clients[0], "room").await;
        if present.len() == 2 {
            break;
        }
        assert!(
            started.elapsed() < deadline,
            "the killed node's client was still present after {:?}: {present:?}",
            started.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert_eq!(presence_of(&mut clients[1], "room").await.len(), 2);
}

/// A broker process of our own, restartable on the same port and data directory.
struct OwnBroker {
    kind: Kind,
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl OwnBroker {
    async fn start(kind: Kind) -> Option<OwnBroker> {
        let binary = match kind {
            Kind::Redis => "redis-server",
            Kind::Nats => "nats-server",
        };
        if Command::new(binary)
            .arg("--version")
            .output()
            .await
            .is_err()
        {
            eprintln!("skipped: {binary} not installed");
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("rusty-socks-{binary}-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut broker = OwnBroker {
            kind,
            port,
            dir,
            child: None,
        };
        broker.up().await;
        Some(broker)
    }

    fn url(&self) -> String {
        match self.kind {
            Kind::Redis => format!("redis://127.0.0.1:{}", self.port),
            Kind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    async fn up(&mut self) {
        let port = self.port.to_string();
        let dir = self.dir.to_str().unwrap().to_owned();
        let mut command = match self.kind {
            Kind::Redis => {
                let mut c = Command::new("redis-server");
                c.args(["--port", &port, "--bind", "127.0.0.1", "--save", ""])
                    .args(["--appendonly", "yes", "--appendfsync", "always"])
                    .args(["--dir", &dir]);
                c
            }
            Kind::Nats => {
                let mut c = Command::new("nats-server");
                c.args(["-a", "127.0.0.1", "-p", &port, "-js", "-sd", &dir]);
                c
            }
        };
        let child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        self.child = Some(child);
        let started = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .is_err()
        {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "broker did not start"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.wait_ready().await;
    }

    /// JetStream answers some time after the port opens (longer on a busy machine).
    #[cfg(feature = "nats")]
    async fn wait_ready(&self) {
        if !matches!(self.kind, Kind::Nats) {
            return;
        }
        let started = Instant::now();
        loop {
            if let Ok(client) = async_nats::connect(self.url()).await {
                // Any JetStream API answer without an error means it is up.
                let reply = client.request("$JS.API.INFO", "".into()).await;
                if let Ok(reply) = reply {
                    let info: Value = serde_json::from_slice(&reply.payload).unwrap_or_default();
                    if info.get("error").is_none() && info.get("type").is_some() {
                        return;
                    }
                }
            }
            assert!(
                started.elapsed() < Duration::from_secs(20),
                "JetStream not ready"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    #[cfg(not(feature = "nats"))]
    async fn wait_ready(&self) {
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    /// SIGTERM and wait: the broker stops the way an operator restarts it.
    async fn down(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Some(pid) = child.id() {
                let _ = Command::new("kill")
                    .args(["-TERM", &pid.to_string()])
                    .status()
                    .await;
            }
            let _ = tokio::time::timeout(Duration::from_secs(10), child.wait()).await;
        }
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.start_kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

async fn wait_health(node: &Node, status: u16) {
    let started = Instant::now();
    while node.health().await != status {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "/health never answered {status}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn a_broker_restart_is_survived_with_recovery(kind: Kind) {
    let Some(mut broker) = OwnBroker::start(kind).await else {
        return;
    };
    let cluster = nodes(&broker.url(), 2).await;
    let (mut publisher, _) = cluster[0].client().await;
    let (mut subscriber, _) = cluster[1].client().await;
    let reply = subscribe(&mut subscriber, "room").await;
    let epoch = reply["epoch"].as_str().unwrap().to_owned();
    for n in 1..=3 {
        publish(&mut publisher, "room", json!(n)).await;
    }
    assert_eq!(publications(&mut subscriber, "room", 3).await.len(), 3);

    broker.down().await;
    wait_health(&cluster[0], 503).await;
    // Publishing without a broker is refused, never accepted and dropped.
    let refused = call(
        &mut publisher,
        json!({"type":"publish","id":"x","channel":"room","data":0}),
    )
    .await;
    assert_eq!(refused["type"], "error", "{refused}");
    broker.up().await;
    wait_health(&cluster[0], 200).await;

    // Publish 4..=6 as soon as the publisher's node accepts again.
    let mut next = 4;
    let started = Instant::now();
    while next <= 6 {
        let reply = call(
            &mut publisher,
            json!({"type":"publish","id":"x","channel":"room","data":next}),
        )
        .await;
        if reply["type"] == "published" {
            next += 1;
        } else {
            assert!(started.elapsed() < Duration::from_secs(20), "{reply}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    // The subscriber gets 4..=6 live, or a gap and then recovers them from history.
    let mut have: Vec<u64> = vec![1, 2, 3];
    let started = Instant::now();
    while have.last() != Some(&6) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "stuck at {have:?}"
        );
        let frame = recv_json(&mut subscriber).await;
        match frame["type"].as_str() {
            Some("publication") => {
                let offset = frame["offset"].as_u64().unwrap();
                if offset > *have.last().unwrap() {
                    have.push(offset);
                }
            }
            Some("gap") => {
                // Live pushes go on meanwhile; the reply is handled when it comes.
                let since = *have.last().unwrap();
                let request = json!({"type":"history","id":"h","channel":"room",
                                     "since":{"offset":since,"epoch":epoch}});
                send_text(&mut subscriber, &request.to_string()).await;
            }
            Some("history") => {
                assert_eq!(frame["complete"], true, "{frame}");
                for p in frame["publications"].as_array().unwrap() {
                    let offset = p["offset"].as_u64().unwrap();
                    if offset > *have.last().unwrap() {
                        have.push(offset);
                    }
                }
            }
            _ => {}
        }
    }
    assert_eq!(have, vec![1, 2, 3, 4, 5, 6], "nothing lost, nothing twice");
}

/// Redis-only checks that look inside Redis.
#[cfg(feature = "redis")]
mod redis_only {
    use super::*;
    use ::redis::AsyncCommands;

    async fn numsub(conn: &mut ::redis::aio::MultiplexedConnection, channel: &str) -> i64 {
        let reply: Vec<(String, i64)> = ::redis::cmd("PUBSUB")
            .arg("NUMSUB")
            .arg(channel)
            .query_async(conn)
            .await
            .unwrap();
        reply[0].1
    }

    /// Each node subscribes to a channel once, however many local clients it has, and only
    /// while it has some: a publication crosses Redis once per interested node.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_subscribes_once_and_only_while_it_has_subscribers() {
        let Some(url) = Kind::Redis.shared_url() else {
            return;
        };
        let prefix = format!("ct{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let a = Node::start(&url, &prefix).await;
        let b = Node::start(&url, &prefix).await;
        let mut conn = ::redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let live = format!("{prefix}:live:room");
        assert_eq!(numsub(&mut conn, &live).await, 0);
        let mut on_a = Vec::new();
        for _ in 0..3 {
            let (mut ws, _) = a.client().await;
            subscribe(&mut ws, "room").await;
            on_a.push(ws);
        }
        assert_eq!(
            numsub(&mut conn, &live).await,
            1,
            "three clients, one subscription"
        );
        let (mut on_b, _) = b.client().await;
        subscribe(&mut on_b, "room").await;
        assert_eq!(numsub(&mut conn, &live).await, 2, "one per node");
        // What crosses Redis for one publication: exactly one message per subscribed node.
        let receivers: i64 = conn.publish(&live, "x|probe").await.unwrap();
        assert_eq!(receivers, 2);
        let reply = call(
            &mut on_b,
            json!({"type":"unsubscribe","id":"u","channel":"room"}),
        )
        .await;
        assert_eq!(reply["type"], "unsubscribed", "{reply}");
        let started = Instant::now();
        while numsub(&mut conn, &live).await != 1 {
            assert!(started.elapsed() < WAIT, "node B kept its subscription");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// A node whose pub/sub connection drops while another node publishes tells its clients:
    /// v1 subscribers get a `gap` and recover from history, legacy clients are closed with
    /// 4002. Runs on a Redis of its own, since it kills pub/sub connections.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn missed_publications_are_reported_never_lost_quietly() {
        let Some(broker) = OwnBroker::start(Kind::Redis).await else {
            return;
        };
        let cluster = nodes(&broker.url(), 2).await;
        let (mut publisher, _) = cluster[0].client().await;
        let (mut legacy_publisher, _) = join_url(&cluster[0].ws()).await;
        let (mut subscriber, _) = cluster[1].client().await;
        let (mut legacy, _) = join_url(&cluster[1].ws()).await;
        let reply = subscribe(&mut subscriber, "room").await;
        let epoch = reply["epoch"].as_str().unwrap().to_owned();
        publish(&mut publisher, "room", json!(1)).await;
        assert_eq!(publications(&mut subscriber, "room", 1).await[0].0, 1);

        let mut conn = ::redis::Client::open(broker.url().as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let killed: i64 = ::redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("pubsub")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(killed, 2, "both nodes' pub/sub connections");
        // Published while node B is not listening (it waits at least 100 ms to reconnect).
        for n in 2..=4 {
            publish(&mut publisher, "room", json!(n)).await;
        }
        send_text(
            &mut legacy_publisher,
            r#"{"sender":"a","content":"while you were away"}"#,
        )
        .await;

        let gap = loop {
            let frame = recv_json(&mut subscriber).await;
            if frame["type"] == "gap" {
                break frame;
            }
            assert_eq!(frame["type"], "publication", "{frame}");
        };
        assert_eq!(gap["channel"], "room");
        assert_eq!(gap["offset"], 1, "it got everything up to 1");
        let page = call(
            &mut subscriber,
            json!({"type":"history","id":"h","channel":"room",
                   "since":{"offset":1,"epoch":epoch}}),
        )
        .await;
        assert_eq!(page["complete"], true, "{page}");
        assert_eq!(offsets(&page["publications"]), vec![2, 3, 4]);
        assert_eq!(recv_close_code(&mut legacy).await, 4002);
        // Live delivery goes on after the reconnect.
        publish(&mut publisher, "room", json!(5)).await;
        let next = publications(&mut subscriber, "room", 1).await;
        assert_eq!(next[0].0, 5);
    }
}

/// NATS-only checks that look inside JetStream.
#[cfg(feature = "nats")]
mod nats_only {
    use super::*;
    use base64::Engine;

    /// The consumers on one channel's subject that something listens to (push-bound): one per
    /// node with subscribers. A node that stops listening leaves its consumer unbound at once
    /// (nothing more is delivered to it); the server deletes it 30 s later.
    async fn consumers_on(url: &str, prefix: &str, channel: &str) -> usize {
        let client = async_nats::connect(url).await.unwrap();
        let js = async_nats::jetstream::new(client);
        let stream = js.get_stream(format!("{prefix}_history")).await.unwrap();
        let subject = format!(
            "{prefix}.h.{}",
            base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(channel)
        );
        let mut count = 0;
        let mut consumers = stream.consumers();
        while let Some(info) = consumers.next().await {
            let info = info.unwrap();
            if info.config.filter_subject == subject && info.push_bound {
                count += 1;
            }
        }
        count
    }

    /// Each node consumes a channel once, however many local clients it has, and only while it
    /// has some: a publication crosses NATS once per interested node.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_consumes_once_and_only_while_it_has_subscribers() {
        let Some(url) = Kind::Nats.shared_url() else {
            return;
        };
        let prefix = format!("ct{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
        let a = Node::start(&url, &prefix).await;
        let b = Node::start(&url, &prefix).await;
        let mut on_a = Vec::new();
        for _ in 0..3 {
            let (mut ws, _) = a.client().await;
            subscribe(&mut ws, "room").await;
            on_a.push(ws);
        }
        assert_eq!(
            consumers_on(&url, &prefix, "room").await,
            1,
            "three clients, one consumer"
        );
        let (mut on_b, _) = b.client().await;
        subscribe(&mut on_b, "room").await;
        assert_eq!(consumers_on(&url, &prefix, "room").await, 2, "one per node");
        let reply = call(
            &mut on_b,
            json!({"type":"unsubscribe","id":"u","channel":"room"}),
        )
        .await;
        assert_eq!(reply["type"], "unsubscribed", "{reply}");
        let started = Instant::now();
        while consumers_on(&url, &prefix, "room").await != 1 {
            assert!(started.elapsed() < WAIT, "node B kept listening");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

macro_rules! for_each_broker {
    ($($test:ident),* $(,)?) => {
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Kind::Redis).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $test() {
                    super::$test(super::Kind::Nats).await;
                }
            )*
        }
    };
}

for_each_broker!(
    fan_out_reaches_every_node_once_in_order,
    a_client_moving_to_another_node_recovers_what_it_missed,
    presence_spans_nodes_and_a_killed_node_leaves_no_ghosts,
    a_broker_restart_is_survived_with_recovery,
);

/// A broker that cannot be reached stops startup with a message naming the setting; the node
/// never runs alone.
#[tokio::test]
async fn an_unreachable_broker_stops_startup() {
    for url in ["redis://127.0.0.1:1", "nats://127.0.0.1:1"] {
        let output = Command::new(env!("CARGO_BIN_EXE_rusty_socks"))
            .env("RUSTY_SOCKS_HOST", "127.0.0.1")
            .env("RUSTY_SOCKS_PORT", "0")
            .env("RUSTY_SOCKS_BROKER", url)
            .output();
        let output = tokio::time::timeout(Duration::from_secs(20), output)
            .await
            .expect("startup failed within 20 s")
            .unwrap();
        assert!(
            !output.status.success(),
            "{url}: exited {:?}",
            output.status
        );
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("RUSTY_SOCKS_BROKER") && stderr.contains("127.0.0.1:1"),
            "{url}: {stderr}"
        );
    }
}
