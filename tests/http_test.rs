//! HTTP endpoints and admission control over real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

#[tokio::test]
async fn health_is_ok_as_plain_text() {
    let server = TestServer::start(|_| {}).await;
    let (status, head, body) = http(server.addr, "GET", "/health", &[]).await;
    assert_eq!((status, body.as_str()), (200, "OK"));
    assert!(head.contains("content-type: text/plain"), "{head}");
    let (status, _, body) = http(server.addr, "HEAD", "/health", &[]).await;
    assert_eq!((status, body.as_str()), (200, ""));
    server.stop().await;
}

#[tokio::test]
async fn stats_reports_the_contract_keys_with_live_values() {
    let server = TestServer::start(|c| c.worker_threads = 7).await;
    let (mut a, _) = join(&server).await;
    let (mut b, _) = join(&server).await;
    send_text(&mut a, r#"{"sender":"a","content":"hi"}"#).await;
    recv_json(&mut b).await;
    let stats = server.stats().await;
    for key in [
        "worker_threads",
        "active_tasks",
        "connections",
        "queued",
        "rejected_total",
        "messages_in",
        "messages_out",
        "uptime_s",
        "version",
    ] {
        assert!(stats.get(key).is_some(), "missing {key} in {stats}");
    }
    assert_eq!(stats["worker_threads"], 7);
    assert_eq!(stats["connections"], 2);
    // Two sessions plus the HTTP connection asking for the stats.
    assert_eq!(stats["active_tasks"], 3);
    assert_eq!(stats["queued"], 0);
    assert_eq!(stats["messages_in"], 1);
    // Two welcomes, a Disconnect-free broadcast to b.
    assert_eq!(stats["messages_out"], 3);
    assert_eq!(stats["version"], env!("CARGO_PKG_VERSION"));
    server.stop().await;
}

#[tokio::test]
async fn paths_are_exact_and_methods_checked() {
    let server = TestServer::start(|_| {}).await;
    for path in [
        "/healthz",
        "/health/x",
        "/stats/",
        "/echo",
        "/wss",
        "/index.htm",
    ] {
        let (status, _, _) = http(server.addr, "GET", path, &[]).await;
        assert_eq!(status, 404, "{path}");
    }
    for (method, path) in [("POST", "/health"), ("DELETE", "/stats"), ("POST", "/ws")] {
        let (status, head, _) = http(server.addr, method, path, &[]).await;
        assert_eq!(status, 405, "{method} {path}");
        assert!(head.contains("allow: get"), "{head}");
    }
    server.stop().await;
}

#[tokio::test]
async fn plain_get_on_the_websocket_endpoint_is_426() {
    let server = TestServer::start(|_| {}).await;
    let (status, head, body) = http(server.addr, "GET", "/ws", &[]).await;
    assert_eq!(status, 426);
    assert!(head.contains("upgrade: websocket"), "{head}");
    assert!(body.contains("WebSocket"), "{body}");
    let mut headers = UPGRADE_HEADERS;
    headers[2].1 = "8";
    let (status, head, _) = http(server.addr, "GET", "/ws", &headers).await;
    assert_eq!(status, 426);
    assert!(head.contains("sec-websocket-version: 13"), "{head}");
    let mut headers = UPGRADE_HEADERS;
    headers[3].1 = "too-short";
    let (status, _, _) = http(server.addr, "GET", "/ws", &headers).await;
    assert_eq!(status, 400);
    server.stop().await;
}

#[tokio::test]
async fn max_conn_refuses_at_once_with_503_and_spares_existing_clients() {
    let server = TestServer::start(|c| c.max_connections = 2).await;
    let (mut a, _) = join(&server).await;
    let (mut b, b_id) = join(&server).await;

    // Refused at once: `a` and `b` stay connected throughout, so the answer cannot have waited
    // for a slot to free up (and it comes within the wait of `http`).
    let (status, head, body) = http(server.addr, "GET", "/ws", &UPGRADE_HEADERS).await;
    assert_eq!(status, 503, "{head}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(body.contains("RUSTY_SOCKS_MAX_CONN"), "{body}");
    // tungstenite sees the refusal as an HTTP error, not a network fault.
    match tokio_tungstenite::connect_async(server.url("/ws")).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 503)
        }
        other => panic!("expected HTTP 503, got {other:?}"),
    }
    assert_eq!(server.stats().await["rejected_total"], 2);

    // The existing clients were not disturbed.
    send_text(&mut a, r#"{"sender":"a","content":"still fine"}"#).await;
    assert_eq!(recv_json(&mut b).await["content"], "still fine");

    // A slot frees up when a client leaves.
    drop(b);
    assert_eq!(recv_json(&mut a).await["client_id"], b_id.as_str());
    let (_c, _) = join(&server).await;
    server.stop().await;
}

/// One `GET /health` on a fresh socket, tolerating a refusal written before the request is
/// read: (status, headers, body).
async fn probe_health(addr: std::net::SocketAddr) -> (u16, String, String) {
    let mut probe = TcpStream::connect(addr).await.unwrap();
    let _ = probe
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .await;
    let mut raw = Vec::new();
    let _ = tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut probe, &mut raw),
    )
    .await;
    split_response(&raw)
}

#[tokio::test]
async fn max_queued_tasks_bounds_pending_handshakes() {
    let server = TestServer::start(|c| c.max_queued_tasks = 2).await;
    let (mut a, _) = join(&server).await;
    // Two sockets that connect and never send a request hold both handshake slots.
    let idle1 = TcpStream::connect(server.addr).await.unwrap();
    let idle2 = TcpStream::connect(server.addr).await.unwrap();
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        // The refusal is written before the request is read, so any request gets it.
        let (status, head, body) = probe_health(server.addr).await;
        if status == 503 {
            assert!(head.contains("retry-after: 1"), "{head}");
            assert!(body.contains("RUSTY_SOCKS_MAX_QUEUED_TASKS"), "{body}");
            break;
        }
        // The accept loop may not have seen both idle sockets yet.
        assert!(
            std::time::Instant::now() < deadline,
            "never refused: {status}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    // The existing WebSocket is undisturbed.
    send_text(&mut a, "[]").await;
    assert_eq!(recv_json(&mut a).await["code"], "invalid_message");

    // Freeing the slots admits new attempts again.
    drop((idle1, idle2));
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        if probe_health(server.addr).await.0 == 200 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "slots never freed");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let stats = server.stats().await;
    assert!(stats["rejected_total"].as_u64().unwrap() >= 1, "{stats}");
    server.stop().await;
}

#[tokio::test]
async fn a_silent_socket_loses_its_handshake_slot_after_the_timeout() {
    let server = TestServer::start(|c| {
        c.max_queued_tasks = 1;
        c.handshake_timeout = std::time::Duration::from_secs(1);
    })
    .await;
    let mut idle = TcpStream::connect(server.addr).await.unwrap();
    let mut buf = Vec::new();
    // The server gives up on the silent socket by itself.
    let n = tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut idle, &mut buf),
    )
    .await;
    assert!(n.is_ok(), "silent socket was never closed");
    let (status, _, _) = http(server.addr, "GET", "/health", &[]).await;
    assert_eq!(status, 200);
    server.stop().await;
}

#[tokio::test]
async fn plain_http_connections_serve_one_request_then_close() {
    let server = TestServer::start(|_| {}).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // HTTP/1.1 defaults to keep-alive; the server still closes after answering.
    stream
        .write_all(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
        .await
        .unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(
        WAIT,
        tokio::io::AsyncReadExt::read_to_end(&mut stream, &mut raw),
    )
    .await
    .expect("server closed the connection")
    .unwrap();
    let (status, head, body) = split_response(&raw);
    assert_eq!((status, body.as_str()), (200, "OK"));
    assert!(head.contains("connection: close"), "{head}");
    server.stop().await;
}

#[tokio::test]
async fn the_demo_page_and_its_client_are_served_unless_switched_off() {
    let server = TestServer::start(|_| {}).await;
    let (status, head, body) = http(server.addr, "GET", "/", &[]).await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/html"), "{head}");
    for hook in [
        "channel-input",
        "join-button",
        "message-input",
        "send-button",
        "messages",
        "presence",
        "status",
    ] {
        assert!(
            body.contains(&format!("data-testid=\"{hook}\"")),
            "missing {hook}"
        );
    }
    assert!(
        body.contains("rusty-socks.js"),
        "the page loads the client module"
    );
    let (status, head, body) = http(server.addr, "GET", "/rusty-socks.js", &[]).await;
    assert_eq!(status, 200);
    assert!(head.contains("content-type: text/javascript"), "{head}");
    assert!(body.contains("export"), "an ES module");
    server.stop().await;
    let off = TestServer::start(|c| c.demo = false).await;
    for path in ["/", "/rusty-socks.js"] {
        let (status, _, _) = http(off.addr, "GET", path, &[]).await;
        assert_eq!(status, 404, "{path}");
    }
    off.stop().await;
}
