//! Test support: a real server on 127.0.0.1:0 that really shuts down, and real clients.
#![allow(dead_code, clippy::unwrap_used)]

pub mod backend;
pub mod process;
pub mod proxy;
pub mod recording;

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use rusty_socks::settings::Config;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

/// A WebSocket client over plain TCP.
pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// How long any single wait in a test may take before it fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// The server under test, running `rusty_socks::server::run` in this runtime.
pub struct TestServer {
    pub addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl TestServer {
    /// Starts a server with test-friendly defaults changed by `tweak`.
    pub async fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let mut config = Config {
            host: "127.0.0.1".parse().unwrap(),
            port: 0,
            // The busy write delay measures the CPU of the whole process, here the test
            // binary with every test running in it: off unless a test asks for it, so that
            // no test's timing depends on its neighbours.
            busy_write_delay: Duration::ZERO,
            ..Config::default()
        };
        tweak(&mut config);
        let listener = TcpListener::bind((config.host, 0)).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(rusty_socks::server::run(listener, config, async move {
            let _ = stopped.await;
        }));
        Self {
            addr,
            stop: Some(stop),
            task: Some(task),
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("ws://{}{}", self.addr, path)
    }

    /// Triggers a graceful shutdown; `run` must return within 5 seconds.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(5), task)
                .await
                .expect("server did not stop within 5 s")
                .expect("server task panicked")
                .expect("server returned an error");
        }
    }

    /// Starts the shutdown without waiting for it.
    pub fn begin_stop(&mut self) -> JoinHandle<std::io::Result<()>> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        self.task.take().expect("server already stopped")
    }

    /// Polls `/stats` until `key` equals `value`, failing after [`WAIT`].
    pub async fn wait_for_stat(&self, key: &str, value: u64) -> Value {
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let stats = self.stats().await;
            if stats[key] == value {
                return stats;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{key} never became {value}: {stats}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `/stats` as JSON.
    pub async fn stats(&self) -> Value {
        let (status, _, body) = http(self.addr, "GET", "/stats", &[]).await;
        assert_eq!(status, 200);
        serde_json::from_str(&body).unwrap()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Connects a WebSocket client to `path`.
pub async fn connect(server: &TestServer, path: &str) -> Ws {
    connect_url(&server.url(path)).await
}

/// Connects a WebSocket client to `url`.
pub async fn connect_url(url: &str) -> Ws {
    let (ws, response) = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(url))
        .await
        .expect("connect timed out")
        .expect("connect failed");
    assert_eq!(response.status(), 101);
    ws
}

/// Connects to `/ws` and consumes the welcome, returning the client id.
pub async fn join(server: &TestServer) -> (Ws, String) {
    join_url(&server.url("/ws")).await
}

/// Connects to a `/ws` URL and consumes the welcome, returning the client id.
pub async fn join_url(url: &str) -> (Ws, String) {
    let mut ws = connect_url(url).await;
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "Connect", "{welcome}");
    let id = welcome["client_id"].as_str().unwrap().to_owned();
    (ws, id)
}

/// Next data message (pings are answered by the client and skipped), within [`WAIT`].
pub async fn recv(ws: &mut Ws) -> Message {
    loop {
        let msg = tokio::time::timeout(WAIT, ws.next())
            .await
            .expect("no message within the wait")
            .expect("stream ended")
            .expect("websocket error");
        match msg {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Next message, parsed as JSON text.
pub async fn recv_json(ws: &mut Ws) -> Value {
    match recv(ws).await {
        Message::Text(text) => serde_json::from_str(&text).unwrap(),
        other => panic!("expected a text message, got {other:?}"),
    }
}

pub async fn send_text(ws: &mut Ws, text: &str) {
    ws.send(Message::text(text)).await.unwrap();
}

/// Waits for the close frame and returns its code.
pub async fn recv_close_code(ws: &mut Ws) -> u16 {
    loop {
        match recv(ws).await {
            Message::Close(Some(frame)) => return frame.code.into(),
            Message::Close(None) => panic!("close frame without a code"),
            _ => continue,
        }
    }
}

/// The headers of a valid WebSocket upgrade request (version, then key, at indexes 2 and 3).
pub const UPGRADE_HEADERS: [(&str, &str); 4] = [
    ("upgrade", "websocket"),
    ("connection", "upgrade"),
    ("sec-websocket-version", "13"),
    ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
];

/// The offsets of a JSON array of publications, in order.
pub fn offsets(publications: &Value) -> Vec<u64> {
    publications
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["offset"].as_u64().unwrap())
        .collect()
}

/// A request head with `headers`, optionally asking the server to close after answering.
fn request_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    close: bool,
) -> String {
    let mut request = format!("{method} {path} HTTP/1.1\r\nhost: {addr}\r\n");
    if close {
        request.push_str("connection: close\r\n");
    }
    for (k, v) in headers {
        request.push_str(&format!("{k}: {v}\r\n"));
    }
    request.push_str("\r\n");
    request
}

/// The client ids `presence` lists for `channel`, sorted.
pub async fn presence_of(ws: &mut Ws, channel: &str) -> Vec<String> {
    let reply = call(
        ws,
        serde_json::json!({"type":"presence","id":"p","channel":channel}),
    )
    .await;
    assert_eq!(reply["type"], "presence", "{reply}");
    let mut ids: Vec<String> = reply["clients"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["client_id"].as_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids
}

/// Sends a request and reads only the response head: (status, raw headers). For upgrades,
/// whose connection stays open after a 101.
pub async fn http_head(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = request_head(addr, method, path, headers, false);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    let mut byte = [0u8; 1];
    while !raw.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(WAIT, stream.read(&mut byte))
            .await
            .expect("http response timed out")
            .unwrap();
        if n == 0 {
            break;
        }
        raw.push(byte[0]);
    }
    let (status, head, _) = split_response(&raw);
    (status, head)
}

/// A minimal HTTP/1.1 request over a fresh socket: (status, raw headers, body).
pub async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let request = request_head(addr, method, path, headers, true);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .expect("http response timed out")
        .unwrap();
    split_response(&raw)
}

/// One server API `POST` of a JSON body with API key `key`; returns (status, JSON body).
pub async fn api_post_keyed(
    key: &str,
    server: &TestServer,
    path: &str,
    body: &serde_json::Value,
) -> (u16, serde_json::Value) {
    let body = body.to_string();
    let request = format!(
        "POST {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\nauthorization: apikey {key}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    );
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, stream.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let (status, _, text) = split_response(&raw);
    (
        status,
        serde_json::from_str(&text).unwrap_or(serde_json::Value::Null),
    )
}
pub fn split_response(raw: &[u8]) -> (u16, String, String) {
    let text = String::from_utf8_lossy(raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, head.to_ascii_lowercase(), body.to_owned())
}

/// Sends an upgrade request for `path` with `headers` added, and reads the `101` response head:
/// the stream, the bytes that came after the head, and the head in lower case.
pub async fn raw_upgrade(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (TcpStream, Vec<u8>, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    let mut request = format!(
        "GET {path} HTTP/1.1\r\nhost: {addr}\r\nupgrade: websocket\r\nconnection: Upgrade\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let end = loop {
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "server closed during handshake");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break pos + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    buf.drain(..end);
    (stream, buf, head)
}

/// One client frame with `first_byte` (FIN, RSV and opcode) and the shortest length
/// encoding; `masked` (key 12 34 56 78) for a well-behaved client.
pub fn client_frame(first_byte: u8, payload: &[u8], masked: bool) -> Vec<u8> {
    let mut out = vec![first_byte];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        n if n < 126 => out.push(mask_bit | n as u8),
        n if n <= 0xFFFF => {
            out.push(mask_bit | 126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(mask_bit | 127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    let key = [0x12, 0x34, 0x56, 0x78];
    if masked {
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A hand-driven WebSocket client for what real clients refuse to send.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl RawClient {
    pub async fn connect(addr: SocketAddr, path: &str) -> Self {
        let (stream, buf, head) = raw_upgrade(addr, path, &[]).await;
        assert!(
            head.contains("sec-websocket-accept: s3pplmbitxaq9kygzzhzrbk+xoo="),
            "{head}"
        );
        Self { stream, buf }
    }

    /// Sends one frame; `masked` should be true for a well-behaved client.
    pub async fn send_frame(&mut self, first_byte: u8, payload: &[u8], masked: bool) {
        self.stream
            .write_all(&client_frame(first_byte, payload, masked))
            .await
            .unwrap();
    }

    pub async fn send_text(&mut self, text: &str) {
        self.send_frame(0x81, text.as_bytes(), true).await;
    }

    /// Next frame as (opcode, payload), or `None` at EOF.
    pub async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if let Some(frame) = take_frame(&mut self.buf) {
                return Some(frame);
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = match tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("read timed out")
            {
                Ok(n) => n,
                Err(_) => return None,
            };
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// Reads frames until a close frame and returns its code (skipping everything else).
    pub async fn close_code(&mut self) -> u16 {
        loop {
            match self.read_frame().await {
                Some((0x8, payload)) => {
                    assert!(payload.len() >= 2, "close without code");
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }
}

/// A `/ws` client that offered the `rusty-socks.v1` subprotocol, so it only sees v1 traffic;
/// returns it with the id from its `welcome`.
pub async fn v1_client(server: &TestServer) -> (Ws, String) {
    v1_client_url(&server.url("/ws")).await
}

/// [`v1_client`] for a `/ws` URL.
pub async fn v1_client_url(url: &str) -> (Ws, String) {
    let (mut ws, response) =
        tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(v1_request(url)))
            .await
            .expect("connect timed out")
            .expect("connect failed");
    assert_eq!(response.status(), 101);
    assert_eq!(
        response.headers()["sec-websocket-protocol"],
        "rusty-socks.v1"
    );
    let welcome = recv_json(&mut ws).await;
    assert_eq!(welcome["type"], "welcome", "{welcome}");
    let id = welcome["client_id"].as_str().unwrap().to_owned();
    (ws, id)
}

/// Completes a `/ws` upgrade within [`WAIT`]: the client once its `welcome` arrived, or the
/// HTTP status the server refused the upgrade with.
pub async fn welcomed<R>(
    handshake: impl std::future::Future<Output = Result<(Ws, R), tokio_tungstenite::tungstenite::Error>>,
) -> Result<Ws, u16> {
    match tokio::time::timeout(WAIT, handshake)
        .await
        .expect("upgrade timed out")
    {
        Ok((mut ws, _)) => {
            let welcome = recv_json(&mut ws).await;
            assert_eq!(welcome["type"], "welcome", "{welcome}");
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(err) => panic!("upgrade failed: {err}"),
    }
}

/// An upgrade request for `url` that offers the `rusty-socks.v1` subprotocol.
pub fn v1_request(url: &str) -> tokio_tungstenite::tungstenite::handshake::client::Request {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("sec-websocket-protocol", "rusty-socks.v1".parse().unwrap());
    request
}

/// Sends a JSON command and returns the next frame (which must be its reply or error).
pub async fn call(ws: &mut Ws, command: Value) -> Value {
    send_text(ws, &command.to_string()).await;
    let reply = recv_json(ws).await;
    if let Some(id) = command.get("id") {
        assert_eq!(&reply["id"], id, "reply to {command}: {reply}");
    }
    reply
}

/// Subscribes and returns the `subscribed` reply.
pub async fn subscribe(ws: &mut Ws, channel: &str) -> Value {
    let reply = call(
        ws,
        serde_json::json!({"type":"subscribe","id":"sub","channel":channel}),
    )
    .await;
    assert_eq!(reply["type"], "subscribed", "{reply}");
    reply
}

/// Publishes `data` and returns the offset.
pub async fn publish(ws: &mut Ws, channel: &str, data: Value) -> u64 {
    let reply = call(
        ws,
        serde_json::json!({"type":"publish","id":"pub","channel":channel,"data":data}),
    )
    .await;
    assert_eq!(reply["type"], "published", "{reply}");
    reply["offset"].as_u64().unwrap()
}

/// Takes one complete server frame from the front of `buf`: (opcode, payload).
pub fn take_frame(buf: &mut Vec<u8>) -> Option<(u8, Vec<u8>)> {
    if buf.len() < 2 {
        return None;
    }
    assert_eq!(buf[1] & 0x80, 0, "server frames must not be masked");
    let (len, header) = match buf[1] & 0x7F {
        126 if buf.len() >= 4 => (u16::from_be_bytes([buf[2], buf[3]]) as usize, 4),
        127 if buf.len() >= 10 => {
            let mut be = [0u8; 8];
            be.copy_from_slice(&buf[2..10]);
            (u64::from_be_bytes(be) as usize, 10)
        }
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if buf.len() < header + len {
        return None;
    }
    let opcode = buf[0] & 0x0F;
    let payload = buf[header..header + len].to_vec();
    buf.drain(..header + len);
    Some((opcode, payload))
}

/// Clients publishing to one channel without pause, each keeping `in_flight` publishes
/// pipelined, until stopped; the highest offset their `published` replies carried is watched.
pub struct Publishing {
    stop: tokio::sync::watch::Sender<bool>,
    acked: tokio::sync::watch::Receiver<u64>,
    tasks: Vec<tokio::task::JoinHandle<Ws>>,
}

impl Publishing {
    pub fn start(publishers: Vec<Ws>, channel: &'static str, in_flight: usize) -> Self {
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let (acked_tx, acked) = tokio::sync::watch::channel(0);
        let tasks = publishers
            .into_iter()
            .map(|mut ws| {
                let (stopped, acked_tx) = (stopped.clone(), acked_tx.clone());
                tokio::spawn(async move {
                    // 1 KB of data: each publication keeps the channel busy a little longer.
                    let command =
                        serde_json::json!({"type":"publish","channel":channel,"data":"x".repeat(1000)});
                    let command = command.to_string();
                    let mut pending = 0;
                    loop {
                        if !*stopped.borrow() && pending < in_flight {
                            send_text(&mut ws, &command).await;
                            pending += 1;
                        } else if pending > 0 {
                            let reply = recv_json(&mut ws).await;
                            assert_eq!(reply["type"], "published", "{reply}");
                            pending -= 1;
                            let offset = reply["offset"].as_u64().unwrap();
                            acked_tx.send_modify(|acked| *acked = offset.max(*acked));
                        } else {
                            return ws;
                        }
                    }
                })
            })
            .collect();
        Publishing { stop, acked, tasks }
    }

    /// Waits until a publication at `offset` or later is acknowledged; returns the latest.
    pub async fn reached(&self, offset: u64) -> u64 {
        let mut acked = self.acked.clone();
        let acked = tokio::time::timeout(WAIT, acked.wait_for(|&acked| acked >= offset))
            .await
            .expect("the publishers stalled");
        *acked.expect("the publishers failed")
    }

    pub fn latest(&self) -> u64 {
        *self.acked.borrow()
    }

    pub async fn stop(self) {
        self.stop.send_replace(true);
        for task in self.tasks {
            task.await.expect("a publisher failed");
        }
    }
}

/// Fails unless `got` is exactly `expected`, naming the first difference (whole sequences
/// would be too long to read).
pub fn assert_sequence(got: &[u64], expected: std::ops::RangeInclusive<u64>, context: &str) {
    let expected: Vec<u64> = expected.collect();
    if got != expected {
        let at = got
            .iter()
            .zip(&expected)
            .position(|(g, e)| g != e)
            .unwrap_or(got.len().min(expected.len()));
        let window = |v: &[u64]| v[at.saturating_sub(3)..(at + 4).min(v.len())].to_vec();
        let mut sorted = got.to_vec();
        sorted.sort_unstable();
        let twice: Vec<u64> = sorted
            .windows(2)
            .filter(|w| w[0] == w[1])
            .map(|w| w[0])
            .collect();
        let missing: Vec<u64> = expected
            .iter()
            .filter(|o| sorted.binary_search(o).is_err())
            .copied()
            .collect();
        panic!(
            "{context}: got {} offsets, expected {} ({}..={}); first difference at #{at}: got \
             ...{:?}..., expected ...{:?}...; delivered twice: {twice:?}; missing: {missing:?}",
            got.len(),
            expected.len(),
            expected[0],
            expected[expected.len() - 1],
            window(got),
            window(&expected),
        );
    }
}

/// One client recovering while `publishing` goes on before, during and after its `subscribe`
/// (it waits for new acknowledgements before subscribing and after the reply): it last saw
/// `missed` publications behind the head, and the replay plus the live publications after it
/// must be every offset from there on, each once, in order.
pub async fn recover_while_publishing(
    ws: &mut Ws,
    channel: &str,
    publishing: &Publishing,
    epoch: &Value,
    missed: u64,
    live: u64,
    attempt: u64,
) {
    let head = publishing.reached(publishing.latest() + 1).await;
    let since = head - missed;
    let sub = call(
        ws,
        serde_json::json!({"type":"subscribe","id":attempt,"channel":channel,"since":{"offset":since,"epoch":epoch}}),
    )
    .await;
    assert_eq!(sub["type"], "subscribed", "attempt {attempt}: {sub}");
    assert_eq!(sub["recovered"], true, "attempt {attempt}: {sub}");
    let position = sub["offset"].as_u64().unwrap();
    assert!(
        position >= head,
        "attempt {attempt}: the replay covers what was acknowledged before: {sub}"
    );
    let mut got = offsets(&sub["publications"]);
    // Live publications follow the replay, up to one acknowledged after the reply.
    let until = publishing.reached(position + live).await;
    while (got.len() as u64) < until - since {
        let push = recv_json(ws).await;
        if matches!(push["type"].as_str(), Some("join" | "leave")) {
            continue;
        }
        assert_eq!(push["type"], "publication", "attempt {attempt}: {push}");
        got.push(push["offset"].as_u64().unwrap());
    }
    assert_sequence(
        &got,
        since + 1..=until,
        &format!("attempt {attempt} (since {since}, replay up to {position})"),
    );
}

/// Deletes the JetStream stream and buckets a NATS run under `prefix` created (each reserves
/// JetStream storage): history, presence and transitions. Runs on a thread of its own, since
/// it is called from `Drop` inside a test's runtime, which cannot be blocked on; bounded by 5 s.
#[cfg(feature = "nats")]
pub fn delete_nats_prefix(url: &str, prefix: &str) {
    let (url, prefix) = (url.to_owned(), prefix.to_owned());
    let _ = std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async {
            let cleanup = async {
                let client = async_nats::connect(url).await.ok()?;
                let js = async_nats::jetstream::new(client);
                let _ = js.delete_stream(format!("{prefix}_history")).await;
                let _ = js.delete_key_value(format!("{prefix}_presence")).await;
                let _ = js.delete_key_value(format!("{prefix}_transitions")).await;
                Some(())
            };
            let _ = tokio::time::timeout(Duration::from_secs(5), cleanup).await;
        });
    })
    .join();
}

/// A fresh directory under the system's temporary directory (not created), removed with
/// everything in it when dropped.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new() -> Self {
        Self(std::env::temp_dir().join(format!("rusty-socks-test-{}", uuid::Uuid::new_v4())))
    }

    /// The path, for a setting.
    pub fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
