//! What faces the internet: TLS, the origin allow-list, and abuse limits, over real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::*;
use rusty_socks::settings::{Config, IpRange};
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_rustls::rustls;

/// A self-signed certificate for `localhost`, written to a fresh directory.
struct TestCert {
    dir: std::path::PathBuf,
    der: rustls::pki_types::CertificateDer<'static>,
}

impl TestCert {
    fn new() -> Self {
        let certified = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
        let dir = std::env::temp_dir().join(format!("rusty-socks-tls-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("cert.pem"), certified.cert.pem()).unwrap();
        std::fs::write(dir.join("key.pem"), certified.signing_key.serialize_pem()).unwrap();
        Self {
            dir,
            der: certified.cert.der().clone(),
        }
    }

    fn apply(&self, config: &mut Config) {
        config.tls_cert = Some(self.dir.join("cert.pem"));
        config.tls_key = Some(self.dir.join("key.pem"));
    }

    async fn connect(
        &self,
        addr: std::net::SocketAddr,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        self.handshake(tcp).await.unwrap()
    }

    /// Like [`TestCert::connect`], with the small segments and receive buffer of a real
    /// network: on loopback (64 KB segments) the kernel buffers megabytes for a client that
    /// stops reading, which would hide a server that stops writing to it.
    async fn connect_small(
        &self,
        addr: std::net::SocketAddr,
    ) -> tokio_rustls::client::TlsStream<TcpStream> {
        let socket = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::STREAM,
            Some(socket2::Protocol::TCP),
        )
        .unwrap();
        socket.set_tcp_mss(1400).unwrap();
        socket.set_recv_buffer_size(32 * 1024).unwrap();
        socket.set_nonblocking(true).unwrap();
        let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
        let tcp = socket.connect(addr).await.unwrap();
        self.handshake(tcp).await.unwrap()
    }

    /// The client's TLS handshake on `tcp`, which may fail.
    async fn handshake(
        &self,
        tcp: TcpStream,
    ) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.der.clone()).unwrap();
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        tokio::time::timeout(WAIT, connector.connect(name, tcp))
            .await
            .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
    }
}

impl Drop for TestCert {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test]
async fn tls_serves_wss_and_https() {
    let cert = TestCert::new();
    let server = TestServer::start(|c| cert.apply(c)).await;
    // https://
    let mut tls = cert.connect(server.addr).await;
    tls.write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tls.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let (status, _, body) = split_response(&raw);
    assert_eq!((status, body.as_str()), (200, "OK"));
    // wss://: chat between a TLS client and another.
    let mut clients = Vec::new();
    for _ in 0..2 {
        let tls = cert.connect(server.addr).await;
        let (mut ws, _) = tokio_tungstenite::client_async("wss://localhost/ws", tls)
            .await
            .unwrap();
        let welcome: serde_json::Value = serde_json::from_str(&ws.next_text().await).unwrap();
        assert_eq!(welcome["type"], "Connect");
        clients.push(ws);
    }
    use futures_util::SinkExt;
    clients[0]
        .send(tokio_tungstenite::tungstenite::Message::text(
            r#"{"sender":"a","content":"over tls"}"#,
        ))
        .await
        .unwrap();
    let chat: serde_json::Value = serde_json::from_str(&clients[1].next_text().await).unwrap();
    assert_eq!(chat["content"], "over tls");
    // Plain HTTP on the TLS port gets nowhere (and does not hang).
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    plain
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut sink = Vec::new();
    let read = tokio::time::timeout(WAIT, plain.read_to_end(&mut sink)).await;
    assert!(read.is_ok(), "the server closes a non-TLS client");
    assert!(!String::from_utf8_lossy(&sink).contains("200 OK"));
    server.stop().await;
}

/// Reads text frames, skipping control frames.
trait NextText {
    async fn next_text(&mut self) -> String;
}

impl<S> NextText for tokio_tungstenite::WebSocketStream<S>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    async fn next_text(&mut self) -> String {
        use futures_util::StreamExt;
        loop {
            let message = tokio::time::timeout(WAIT, self.next())
                .await
                .expect("no message within the wait")
                .expect("stream ended")
                .expect("websocket error");
            if let tokio_tungstenite::tungstenite::Message::Text(text) = message {
                return text.to_string();
            }
        }
    }
}

#[tokio::test]
async fn unreadable_tls_files_stop_startup_naming_the_setting() {
    let cert = TestCert::new();
    for (cert_path, key_path, var) in [
        (
            "/nonexistent/cert.pem".into(),
            cert.dir.join("key.pem"),
            "RUSTY_SOCKS_TLS_CERT",
        ),
        (
            cert.dir.join("cert.pem"),
            "/nonexistent/key.pem".into(),
            "RUSTY_SOCKS_TLS_KEY",
        ),
        (
            cert.dir.join("key.pem"),
            cert.dir.join("key.pem"),
            "RUSTY_SOCKS_TLS_CERT",
        ),
    ] {
        let config = Config {
            host: "127.0.0.1".parse().unwrap(),
            port: 0,
            tls_cert: Some(cert_path),
            tls_key: Some(key_path),
            ..Config::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let err = rusty_socks::server::run(listener, config, std::future::pending())
            .await
            .expect_err("bad TLS files");
        assert!(err.to_string().contains(var), "{var}: {err}");
    }
}

#[tokio::test]
async fn browsers_from_other_origins_are_refused_before_the_upgrade() {
    let server = TestServer::start(|c| {
        c.allowed_origins = vec!["https://app.example.com".into()];
    })
    .await;
    let with_origin = |origin: &'static str| {
        let mut headers = UPGRADE_HEADERS.to_vec();
        headers.push(("origin", origin));
        headers
    };
    let (status, _) = http_head(
        server.addr,
        "GET",
        "/ws",
        &with_origin("https://evil.example"),
    )
    .await;
    assert_eq!(status, 403);
    let (status, _) = http_head(
        server.addr,
        "GET",
        "/ws",
        &with_origin("https://app.example.com"),
    )
    .await;
    assert_eq!(status, 101);
    // No Origin: not a browser (a server, a CLI); it keeps working whatever its User-Agent.
    let (status, _) = http_head(server.addr, "GET", "/ws", &UPGRADE_HEADERS).await;
    assert_eq!(status, 101);
    server.stop().await;
}

#[tokio::test]
async fn a_client_sending_too_fast_gets_errors_then_4004() {
    let server = TestServer::start(|c| {
        c.client_rate = 1;
        c.client_burst = 3;
    })
    .await;
    let (mut ws, _) = v1_client(&server).await;
    // The burst passes.
    for n in 0..3 {
        let reply = call(
            &mut ws,
            json!({"type":"publish","id":n,"channel":"a","data":n}),
        )
        .await;
        assert_eq!(reply["type"], "published", "{reply}");
    }
    // Then errors carrying the command's id...
    let reply = call(
        &mut ws,
        json!({"type":"publish","id":"late","channel":"a","data":0}),
    )
    .await;
    assert_eq!(reply["code"], "rate_limited", "{reply}");
    // ...and a client that keeps going is closed.
    for _ in 0..10 {
        send_text(&mut ws, r#"{"type":"publish","channel":"a","data":0}"#).await;
    }
    assert_eq!(recv_close_code(&mut ws).await, 4004);
    server.stop().await;
}

#[tokio::test]
async fn connection_rate_is_per_real_client_address() {
    let server = TestServer::start(|c| {
        c.connect_rate = 1;
        c.connect_burst = 2;
        c.trusted_proxies = vec![IpRange::parse("127.0.0.1").unwrap()];
    })
    .await;
    fn from(ip: &str) -> Vec<(&str, &str)> {
        let mut headers: Vec<(&str, &str)> = UPGRADE_HEADERS.to_vec();
        headers.push(("x-forwarded-for", ip));
        headers
    }
    // One refill per second: a round shows the limit only if it takes less than a second, so
    // a round slowed down past that by a loaded machine proves nothing and is run again (with
    // fresh addresses).
    let mut limited = None;
    for round in 0..5 {
        let (client, other) = (format!("203.0.113.{round}"), format!("198.51.100.{round}"));
        let started = std::time::Instant::now();
        let mut statuses = Vec::new();
        for _ in 0..2 {
            statuses.push(http_head(server.addr, "GET", "/ws", &from(&client)).await);
        }
        let (third, head) = http_head(server.addr, "GET", "/ws", &from(&client)).await;
        // Behind the same (trusted) proxy, another client is not affected.
        let (another, _) = http_head(server.addr, "GET", "/ws", &from(&other)).await;
        // A forged left-most entry does not help: the right-most untrusted hop counts.
        let forged = format!("192.0.2.99, {client}");
        let (forged, _) = http_head(server.addr, "GET", "/ws", &from(&forged)).await;
        let within_a_second = started.elapsed() < Duration::from_secs(1);
        assert_eq!(statuses[0].0, 101);
        assert_eq!(statuses[1].0, 101);
        assert_eq!(another, 101);
        if (third, forged) == (429, 429) {
            assert!(head.contains("retry-after"), "{head}");
            limited = Some(client);
            break;
        }
        assert!(
            !within_a_second,
            "not limited: third attempt {third}, forged {forged}"
        );
    }
    let client = limited.expect("every round took over a second");
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let (status, _) = http_head(server.addr, "GET", "/ws", &from(&client)).await;
    assert_eq!(status, 101, "the bucket refills");
    server.stop().await;
}

/// A legacy `/ws` client over TLS, its welcome consumed.
async fn wss_join(
    tls: tokio_rustls::client::TlsStream<TcpStream>,
) -> tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<TcpStream>> {
    let (mut ws, _) = tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async("wss://localhost/ws", tls),
    )
    .await
    .unwrap()
    .unwrap();
    let welcome: serde_json::Value = serde_json::from_str(&ws.next_text().await).unwrap();
    assert_eq!(welcome["type"], "Connect", "{welcome}");
    ws
}

/// Messages of about 32 KB: 64 of them are 2 MB, far more than the socket buffers of a
/// client that does not read.
const BIG: usize = 32 * 1024;
const BIG_COUNT: usize = 64;

/// `sender` sends [`BIG_COUNT`] chat messages tagged `round`, then waits until they are
/// surely queued for the other client (which is not reading).
async fn flood<S>(sender: &mut tokio_tungstenite::WebSocketStream<S>, round: usize)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::SinkExt;
    let filler = "x".repeat(BIG);
    for n in 0..BIG_COUNT {
        let chat = json!({"sender":"b","content":format!("{round}:{n}:{filler}")});
        sender
            .send(tokio_tungstenite::tungstenite::Message::text(
                chat.to_string(),
            ))
            .await
            .unwrap();
    }
    // Not a measurement: only lets the server move everything it can towards the reader.
    tokio::time::sleep(Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_wss_client_that_pauses_reading_gets_everything_and_the_close_frame() {
    let cert = TestCert::new();
    // Pings every 30 s: no ping comes along to push stuck bytes out during the test.
    let server = TestServer::start(|c| {
        cert.apply(c);
        c.ping_interval = Duration::from_secs(30);
    })
    .await;
    let mut reader = wss_join(cert.connect_small(server.addr).await).await;
    let mut sender = wss_join(cert.connect(server.addr).await).await;
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;

    // 2 MB queued while the reader reads nothing; then it reads everything, in order.
    flood(&mut sender, 0).await;
    for n in 0..BIG_COUNT {
        let chat: serde_json::Value = serde_json::from_str(&reader.next_text().await).unwrap();
        let content = chat["content"].as_str().unwrap_or_default();
        assert!(
            content.starts_with(&format!("0:{n}:")),
            "message {n}: {}",
            &content[..content.len().min(20)]
        );
    }

    // Again, and this time the reader closes before reading: the server's close reply comes
    // after whatever it still had to write, and is not lost in the TLS layer.
    flood(&mut sender, 1).await;
    reader.send(Message::Close(None)).await.unwrap();
    let mut texts = 0;
    let close = loop {
        match tokio::time::timeout(WAIT, reader.next()).await {
            Ok(Some(Ok(Message::Text(_)))) => texts += 1,
            Ok(Some(Ok(Message::Close(frame)))) => break frame,
            Ok(Some(Ok(_))) => {}
            other => panic!("no close frame after {texts} messages: {other:?}"),
        }
    };
    assert_eq!(close.map(|f| u16::from(f.code)), Some(1000));
    server.stop().await;
}

#[tokio::test]
async fn overload_refusals_on_a_tls_port_are_answered_inside_tls() {
    let cert = TestCert::new();
    let server = TestServer::start(|c| {
        cert.apply(c);
        c.max_queued_tasks = 1;
    })
    .await;
    // A socket that never starts its TLS handshake holds the only handshake slot.
    let _idle = TcpStream::connect(server.addr).await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    let (status, head, body) = loop {
        // The refusal is written before any request is read: a TLS client gets it after its
        // handshake, encrypted, instead of plaintext that breaks the handshake.
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let mut tls = cert
            .handshake(tcp)
            .await
            .expect("the TLS handshake completes even when the server is overloaded");
        let _ = tls
            .write_all(b"GET /health HTTP/1.1\r\nhost: localhost\r\n\r\n")
            .await;
        let mut raw = Vec::new();
        let _ = tokio::time::timeout(WAIT, tls.read_to_end(&mut raw)).await;
        let response = split_response(&raw);
        if response.0 == 503 {
            break response;
        }
        // The accept loop may not have seen the idle socket yet.
        assert!(
            std::time::Instant::now() < deadline,
            "never refused: {response:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(status, 503);
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(body.contains("RUSTY_SOCKS_MAX_QUEUED_TASKS"), "{body}");
    // A client speaking plain HTTP to the TLS port is refused too, without plaintext.
    let mut plain = TcpStream::connect(server.addr).await.unwrap();
    let _ = plain
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await;
    let mut raw = Vec::new();
    let read = tokio::time::timeout(WAIT, plain.read_to_end(&mut raw)).await;
    assert!(read.is_ok(), "the server closes a plaintext client");
    assert!(
        !String::from_utf8_lossy(&raw).contains("HTTP/1.1"),
        "plaintext on a TLS port: {}",
        String::from_utf8_lossy(&raw)
    );
    server.stop().await;
}
