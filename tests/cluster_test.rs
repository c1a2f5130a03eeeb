//! Several server processes sharing one broker (Redis and NATS): fan-out across nodes,
//! recovery on another node, presence across nodes without ghosts, and a broker restart.
//!
//! Every test here but the last needs a broker, so it is `#[ignore]`d: a plain `cargo test`
//! lists it as ignored with the reason, and `cargo test -- --include-ignored` runs it. Each runs
//! once per broker: the shared ones at `RUSTY_SOCKS_TEST_REDIS_URL` and
//! `RUSTY_SOCKS_TEST_NATS_URL` (`.ci/run` sets both), and the broker-restart tests on a
//! `redis-server` / `nats-server` of their own on a free port, so the shared ones are never
//! touched. Run without its URL variable or program, a test fails saying which is missing; it
//! never passes without having run.
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
use tokio_tungstenite::tungstenite::Message;

/// Presence TTL the nodes run with, in seconds.
const PRESENCE_TTL: u64 = 3;
/// Namespaces the nodes run with: the default one, and `busy` with a long history (up to
/// 10,000 publications or 16 MiB).
const NAMESPACES: &str = r#"{"":{},"busy":{"history_size":10000}}"#;
const HISTORY_BYTES: &str = "16777216";

#[derive(Clone, Copy, Debug)]
enum Kind {
    Redis,
    Nats,
}

impl Kind {
    /// The shared broker's URL; a test that needs it and runs without it fails.
    fn shared_url(self) -> String {
        let (var, example) = match self {
            Kind::Redis => ("RUSTY_SOCKS_TEST_REDIS_URL", "redis://127.0.0.1:6379"),
            Kind::Nats => ("RUSTY_SOCKS_TEST_NATS_URL", "nats://127.0.0.1:4222"),
        };
        std::env::var(var).unwrap_or_else(|_| {
            panic!("{var} is not set: this test needs a {self:?} broker, e.g. {var}={example}")
        })
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
            .env("RUSTY_SOCKS_NAMESPACES", NAMESPACES)
            .env("RUSTY_SOCKS_HISTORY_BYTES", HISTORY_BYTES)
            // Queues (and recovery buffers) for 8,192 frames instead of 1,024: publishers here
            // run flat out (a NATS pipeline takes one round trip since 2026-12-03), and a test
            // client that is not scheduled for a moment on a loaded CI machine must not be
            // closed as a slow consumer (4001) in tests about ordering and recovery.
            .env("RUSTY_SOCKS_BUFFER", "8192")
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

/// Nodes sharing one broker under a fresh prefix. Dropping it kills them, then deletes what
/// they left on a shared NATS server: each prefix's history stream reserves JetStream storage,
/// and leaked ones end up exhausting it ("insufficient storage resources"). Redis keys expire
/// by themselves.
struct Cluster {
    nodes: Vec<Node>,
    prefix: String,
    #[cfg_attr(not(feature = "nats"), allow(dead_code))]
    broker: String,
}

async fn nodes(broker: &str, count: usize) -> Cluster {
    let prefix = format!("ct{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut cluster = Cluster {
        nodes: Vec::new(),
        prefix,
        broker: broker.to_owned(),
    };
    for _ in 0..count {
        let node = Node::start(broker, &cluster.prefix).await;
        cluster.nodes.push(node);
    }
    cluster
}

impl std::ops::Deref for Cluster {
    type Target = Vec<Node>;
    fn deref(&self) -> &Vec<Node> {
        &self.nodes
    }
}

impl std::ops::DerefMut for Cluster {
    fn deref_mut(&mut self) -> &mut Vec<Node> {
        &mut self.nodes
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            let _ = node.child.start_kill();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        for node in &mut self.nodes {
            while matches!(node.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        #[cfg(feature = "nats")]
        if self.broker.starts_with("nats://") {
            delete_nats_prefix(&self.broker, &self.prefix);
        }
    }
}

/// Reads pushes until `count` publications on `channel` arrived; returns their (offset, data).
async fn publications(ws: &mut Ws, channel: &str, count: usize) -> Vec<(u64, Value)> {
    publications_in_epoch(ws, channel, count).await.0
}

/// [`publications`] with the epoch of the last one (what a client keeps as its position).
async fn publications_in_epoch(
    ws: &mut Ws,
    channel: &str,
    count: usize,
) -> (Vec<(u64, Value)>, String) {
    let mut got = Vec::new();
    let mut epoch = String::new();
    while got.len() < count {
        let frame = recv_json(ws).await;
        if frame["type"] == "publication" && frame["channel"] == channel {
            got.push((frame["offset"].as_u64().unwrap(), frame["data"].clone()));
            epoch = frame["epoch"].as_str().unwrap().to_owned();
        }
    }
    (got, epoch)
}

async fn fan_out_reaches_every_node_once_in_order(kind: Kind) {
    let url = kind.shared_url();
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
    }
    // Nothing more came after 50: a marker published last is the very next frame each gets
    // (a channel's publications reach a node in order, so a late copy would come before it).
    publish(&mut publisher, "room", json!("marker")).await;
    for ws in &mut subscribers {
        let next = recv_json(ws).await;
        assert_eq!(
            (&next["type"], &next["offset"], &next["data"]),
            (&json!("publication"), &json!(51), &json!("marker")),
            "nothing between the 50th publication and the marker: {next}"
        );
    }
}

/// Publications in the burst of [`a_burst_crosses_nodes_in_order_without_loss`].
const BURST: u64 = 10_000;

/// Reads publications on `channel` until `count` arrived, telling `progress` how many so far;
/// fails on anything but a publication or a `published` reply (a gap above all).
async fn burst_received(
    mut ws: Ws,
    count: u64,
    progress: tokio::sync::watch::Sender<u64>,
) -> Vec<(u64, Value)> {
    let mut got = Vec::new();
    while (got.len() as u64) < count {
        let frame = recv_json(&mut ws).await;
        assert_eq!(frame["type"], "publication", "only publications: {frame}");
        got.push((frame["offset"].as_u64().unwrap(), frame["data"].clone()));
        progress.send_replace(got.len() as u64);
    }
    got
}

/// A burst of publications that a node receives from the broker as fast as the publisher can
/// make them (the node holds them briefly and hands them on in batches) reaches the
/// subscribers of both nodes whole, in order, without a gap.
async fn a_burst_crosses_nodes_in_order_without_loss(kind: Kind) {
    let url = kind.shared_url();
    let cluster = nodes(&url, 2).await;
    let (mut publisher, _) = cluster[0].client().await;
    let mut progress = Vec::new();
    let mut readers = Vec::new();
    for node in [&cluster[0], &cluster[1]] {
        let (mut ws, _) = node.client().await;
        subscribe(&mut ws, "burst").await;
        let (tell, watch) = tokio::sync::watch::channel(0);
        progress.push(watch);
        readers.push(tokio::spawn(burst_received(ws, BURST, tell)));
    }
    // As fast as the publisher goes: 64 publishes awaiting their reply at a time, and at most
    // 1,000 publications ahead of the slower subscriber (whose queue must not overflow).
    let (mut sent, mut acked) = (0, 0);
    let started = Instant::now();
    while acked < BURST {
        assert!(
            started.elapsed() < Duration::from_secs(120),
            "stalled: {sent} sent, {acked} acknowledged"
        );
        let behind = progress.iter().map(|p| *p.borrow()).min().unwrap_or(0);
        if sent < BURST && sent - acked < 64 && sent < behind + 1000 {
            sent += 1;
            let command = json!({"type": "publish", "channel": "burst", "data": {"n": sent}});
            send_text(&mut publisher, &command.to_string()).await;
            continue;
        }
        if sent == acked {
            // Waiting for the subscribers to catch up.
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let reply = tokio::time::timeout(Duration::from_secs(30), recv_json(&mut publisher))
            .await
            .expect("publishing stalled");
        assert_eq!(reply["type"], "published", "{reply}");
        acked += 1;
    }
    let expected: Vec<(u64, Value)> = (1..=BURST).map(|n| (n, json!({ "n": n }))).collect();
    for (node, reader) in readers.into_iter().enumerate() {
        let got = tokio::time::timeout(Duration::from_secs(60), reader)
            .await
            .expect("a subscriber did not get the whole burst within 60 s")
            .unwrap();
        assert!(
            got == expected,
            "node {node}: every publication once, in order"
        );
    }
}

async fn a_client_moving_to_another_node_recovers_what_it_missed(kind: Kind) {
    let url = kind.shared_url();
    let cluster = nodes(&url, 3).await;
    let (mut publisher, _) = cluster[2].client().await;
    let (mut on_a, _) = cluster[0].client().await;
    let reply = subscribe(&mut on_a, "room").await;
    assert_eq!(reply["epoch"], "", "nothing published yet: {reply}");
    for n in 1..=5 {
        publish(&mut publisher, "room", json!(n)).await;
    }
    let (seen, epoch) = publications_in_epoch(&mut on_a, "room", 5).await;
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
    let url = kind.shared_url();
    let mut cluster = nodes(&url, 3).await;
    let mut clients = Vec::new();
    let mut ids = Vec::new();
    for node in cluster.iter() {
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

/// Clients recovering on another node than the one publishing, while publications keep
/// arriving: here the window between starting to buffer live pushes and reading history spans
/// broker round trips, so publications land in it in every recovery.
async fn recovery_on_another_node_while_publications_keep_arriving(kind: Kind) {
    const ATTEMPTS: u64 = 10;
    const CLIENTS: u64 = 2;
    let url = kind.shared_url();
    let cluster = nodes(&url, 3).await;
    let mut publishers = Vec::new();
    for _ in 0..2 {
        publishers.push(cluster[0].client().await.0);
    }
    let publishing = Publishing::start(publishers, "busy:room", 4);
    publishing.reached(20).await;
    let (mut probe, _) = cluster[1].client().await;
    let epoch = call(
        &mut probe,
        json!({"type":"history","id":0,"channel":"busy:room","limit":0}),
    )
    .await["epoch"]
        .clone();
    for attempt in 0..ATTEMPTS {
        // Clients that last saw an offset 10 behind the head come back on node B or C, which
        // the previous ones left: a recovery usually also subscribes its node at the broker.
        let node = &cluster[1 + attempt as usize % 2];
        let mut clients = Vec::new();
        for _ in 0..CLIENTS {
            clients.push(node.client().await.0);
        }
        let recoveries = clients.iter_mut().zip(0..).map(|(ws, n)| {
            recover_while_publishing(
                ws,
                "busy:room",
                &publishing,
                &epoch,
                10,
                10,
                attempt * CLIENTS + n,
            )
        });
        futures_util::future::join_all(recoveries).await;
    }
    publishing.stop().await;
}

/// A broker process of our own, restartable on the same port and data directory.
struct OwnBroker {
    kind: Kind,
    port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
}

impl OwnBroker {
    /// Starts it; a test that needs it fails if the program is not installed.
    async fn start(kind: Kind) -> OwnBroker {
        let binary = match kind {
            Kind::Redis => "redis-server",
            Kind::Nats => "nats-server",
        };
        if let Err(err) = Command::new(binary).arg("--version").output().await {
            panic!(
                "{binary} could not be run ({err}): this test starts a {kind:?} broker of its own and needs {binary} on the PATH"
            );
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
        broker
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

/// Next frame, waiting up to `within` (longer than [`WAIT`], for reconnects).
async fn recv_json_within(ws: &mut Ws, within: Duration) -> Value {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        let message = tokio::time::timeout_at(deadline, ws.next())
            .await
            .unwrap_or_else(|_| panic!("no frame within {within:?}"))
            .expect("stream ended")
            .expect("websocket error");
        match message {
            Message::Text(text) => return serde_json::from_str(&text).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("expected a text frame, got {other:?}"),
        }
    }
}

/// Everything one v1 subscriber of `channel` receives, checked frame by frame, nothing
/// filtered out: live publications come in strictly increasing offset order (never one twice)
/// and skip offsets only right after a `gap` naming the last one received; each `gap` is
/// answered with a history request, whose page must be complete and continue right after the
/// gap. A client may merge live pushes and pages by offset, but the server must never send the
/// same live publication twice or skip one silently.
struct Received {
    channel: &'static str,
    epoch: String,
    /// Offsets of the live publications, in arrival order.
    live: Vec<u64>,
    /// Offsets named by `gap` frames.
    gaps: Vec<u64>,
    /// The `since` of each history request not answered yet, oldest first.
    asked: std::collections::VecDeque<u64>,
    /// Every offset the client has, live or from history.
    has: std::collections::BTreeSet<u64>,
}

impl Received {
    fn new(channel: &'static str, epoch: String) -> Self {
        Received {
            channel,
            epoch,
            live: Vec::new(),
            gaps: Vec::new(),
            asked: Default::default(),
            has: Default::default(),
        }
    }

    fn has_all(&self, upto: u64) -> bool {
        (1..=upto).all(|offset| self.has.contains(&offset))
    }

    async fn ask_history(&mut self, ws: &mut Ws, since: u64) {
        let request = json!({"type":"history","id":"h","channel":self.channel,
                             "since":{"offset":since,"epoch":self.epoch}});
        send_text(ws, &request.to_string()).await;
    }

    /// Reads and checks one frame.
    async fn next(&mut self, ws: &mut Ws) {
        let frame = recv_json_within(ws, Duration::from_secs(20)).await;
        let last = self.live.last().copied().unwrap_or(0);
        match frame["type"].as_str() {
            Some("publication") => {
                assert_eq!(frame["channel"], self.channel, "{frame}");
                let offset = frame["offset"].as_u64().unwrap();
                // A client keeps the epoch of the publications it gets.
                if let Some(epoch) = frame["epoch"].as_str() {
                    self.epoch = epoch.to_owned();
                }
                assert!(
                    offset > last,
                    "publication {offset} after {last}: delivered twice or out of order \
                     (live so far {:?}, gaps {:?})",
                    self.live,
                    self.gaps
                );
                assert!(
                    offset == last + 1 || self.gaps.last() == Some(&last),
                    "live offsets jumped from {last} to {offset} without a gap \
                     (live so far {:?}, gaps {:?})",
                    self.live,
                    self.gaps
                );
                self.live.push(offset);
                self.has.insert(offset);
            }
            Some("gap") => {
                assert_eq!(frame["channel"], self.channel, "{frame}");
                assert_eq!(
                    frame["offset"].as_u64(),
                    Some(last),
                    "a gap names the last offset received: {frame}"
                );
                self.gaps.push(last);
                // Live pushes go on meanwhile; the page is checked when it comes.
                self.asked.push_back(last);
                self.ask_history(ws, last).await;
            }
            Some("history") => {
                let since = self
                    .asked
                    .pop_front()
                    .expect("a history reply nobody asked for");
                assert_eq!(frame["complete"], true, "history since {since}: {frame}");
                let page = offsets(&frame["publications"]);
                let expected: Vec<u64> = (since + 1..since + 1 + page.len() as u64).collect();
                assert_eq!(
                    page, expected,
                    "history since {since}: contiguous, in order"
                );
                assert_eq!(
                    page.last().copied().unwrap_or(since),
                    frame["offset"].as_u64().unwrap(),
                    "the page reaches the channel's position: {frame}"
                );
                self.has.extend(page);
            }
            Some("error") if frame["id"] == "h" => {
                // The node may still be reconnecting to the broker: ask again.
                let since = *self.asked.front().expect("an error nobody asked for");
                tokio::time::sleep(Duration::from_millis(100)).await;
                self.ask_history(ws, since).await;
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
}

async fn a_broker_restart_is_survived_with_recovery(kind: Kind) {
    let mut broker = OwnBroker::start(kind).await;
    let cluster = nodes(&broker.url(), 2).await;
    let (mut publisher, _) = cluster[0].client().await;
    let (mut subscriber, _) = cluster[1].client().await;
    let reply = subscribe(&mut subscriber, "room").await;
    let mut received = Received::new("room", reply["epoch"].as_str().unwrap().to_owned());
    for n in 1..=3 {
        publish(&mut publisher, "room", json!(n)).await;
    }
    while !received.has_all(3) {
        received.next(&mut subscriber).await;
    }
    assert_eq!(
        received.live,
        vec![1, 2, 3],
        "all live, each once, in order"
    );

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
    wait_health(&cluster[1], 200).await;

    // Publish three more as soon as the publisher's node accepts again.
    let mut published = Vec::new();
    let started = Instant::now();
    while published.len() < 3 {
        let reply = call(
            &mut publisher,
            json!({"type":"publish","id":"x","channel":"room","data":published.len() + 4}),
        )
        .await;
        if reply["type"] == "published" {
            published.push(reply["offset"].as_u64().unwrap());
        } else {
            assert!(started.elapsed() < Duration::from_secs(20), "{reply}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Offsets go on after the restart (a publish that failed while the node was reconnecting
    // may still have taken one: the subscriber must then get that one too).
    assert!(published.is_sorted() && published[0] > 3, "{published:?}");
    let last = published[2];

    // The subscriber gets them live, or a gap and then recovers them from history.
    let started = Instant::now();
    while !received.has_all(last) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "stuck: live {:?}, gaps {:?}, has {:?}",
            received.live,
            received.gaps,
            received.has
        );
        received.next(&mut subscriber).await;
    }
    // Nothing more was on its way: a marker published last arrives live, after every frame
    // sent before it (each checked), and no answer is left pending.
    let marker = publish(&mut publisher, "room", json!("marker")).await;
    assert_eq!(marker, last + 1);
    while received.live.last() != Some(&marker) || !received.asked.is_empty() {
        received.next(&mut subscriber).await;
    }
    assert_eq!(
        received.has.iter().copied().collect::<Vec<_>>(),
        (1..=marker).collect::<Vec<_>>(),
        "nothing lost (live {:?}, gaps {:?})",
        received.live,
        received.gaps
    );
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
    #[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
    async fn a_node_subscribes_once_and_only_while_it_has_subscribers() {
        let url = Kind::Redis.shared_url();
        let cluster = nodes(&url, 2).await;
        let (a, b, prefix) = (&cluster[0], &cluster[1], cluster.prefix.clone());
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
    #[ignore = "needs redis-server on the PATH (starts its own): cargo test -- --include-ignored"]
    async fn missed_publications_are_reported_never_lost_quietly() {
        let broker = OwnBroker::start(Kind::Redis).await;
        let cluster = nodes(&broker.url(), 2).await;
        let (mut publisher, _) = cluster[0].client().await;
        let (mut legacy_publisher, _) = join_url(&cluster[0].ws()).await;
        let (mut subscriber, _) = cluster[1].client().await;
        let (mut legacy, _) = join_url(&cluster[1].ws()).await;
        // A v1 connection on no channel at all: a gap on `default` is none of its business.
        let (mut bystander, _) = cluster[1].client().await;
        subscribe(&mut subscriber, "room").await;
        publish(&mut publisher, "room", json!(1)).await;
        let (first, epoch) = publications_in_epoch(&mut subscriber, "room", 1).await;
        assert_eq!(first[0].0, 1);

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
        // Only legacy clients are closed for it: the v1 ones are not on `default`.
        let reply = call(
            &mut bystander,
            json!({"type":"history","id":"b","channel":"room","limit":1}),
        )
        .await;
        assert_eq!(
            reply["type"], "history",
            "still open, nothing else came: {reply}"
        );
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
    #[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
    async fn a_node_consumes_once_and_only_while_it_has_subscribers() {
        let url = Kind::Nats.shared_url();
        let cluster = nodes(&url, 2).await;
        let (a, b, prefix) = (&cluster[0], &cluster[1], cluster.prefix.clone());
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

/// One test per broker and case, each `#[ignore]`d with what it needs: `shared` cases run on
/// the broker at `RUSTY_SOCKS_TEST_REDIS_URL` / `RUSTY_SOCKS_TEST_NATS_URL`, `own` cases start a
/// `redis-server` / `nats-server` of their own.
macro_rules! for_each_broker {
    (shared: [$($shared:ident),* $(,)?], own: [$($own:ident),* $(,)?] $(,)?) => {
        mod redis {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs Redis: RUSTY_SOCKS_TEST_REDIS_URL=redis://127.0.0.1:6379 cargo test -- --include-ignored"]
                async fn $shared() {
                    super::$shared(super::Kind::Redis).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs redis-server on the PATH (starts its own): cargo test -- --include-ignored"]
                async fn $own() {
                    super::$own(super::Kind::Redis).await;
                }
            )*
        }
        mod nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs NATS: RUSTY_SOCKS_TEST_NATS_URL=nats://127.0.0.1:4222 cargo test -- --include-ignored"]
                async fn $shared() {
                    super::$shared(super::Kind::Nats).await;
                }
            )*
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                #[ignore = "needs nats-server on the PATH (starts its own): cargo test -- --include-ignored"]
                async fn $own() {
                    super::$own(super::Kind::Nats).await;
                }
            )*
        }
    };
}

for_each_broker!(
    shared: [
        fan_out_reaches_every_node_once_in_order,
        a_burst_crosses_nodes_in_order_without_loss,
        a_client_moving_to_another_node_recovers_what_it_missed,
        recovery_on_another_node_while_publications_keep_arriving,
        presence_spans_nodes_and_a_killed_node_leaves_no_ghosts,
    ],
    own: [a_broker_restart_is_survived_with_recovery],
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
