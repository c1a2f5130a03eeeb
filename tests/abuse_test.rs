//! Playing the attacker over real sockets: one address holding too many sockets, request heads
//! too large, heads dribbled a byte at a time. Every refusal is clear (429, 431, or a close at
//! the handshake deadline) and another address is never affected.
//!
//! Two loopback source addresses stand for two hosts: Linux accepts any 127.0.0.0/8 address as
//! a source on `lo`, so a socket bound to 127.0.0.2 before it connects is another client
//! address to the server.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use common::*;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::MaybeTlsStream;

const OTHER_HOST: [u8; 4] = [127, 0, 0, 2];

/// A TCP connection to `server` from the local address `source`.
async fn tcp_from(source: IpAddr, server: SocketAddr) -> TcpStream {
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4().unwrap(),
        IpAddr::V6(_) => TcpSocket::new_v6().unwrap(),
    };
    socket.bind(SocketAddr::new(source, 0)).unwrap();
    tokio::time::timeout(WAIT, socket.connect(server))
        .await
        .expect("connect timed out")
        .unwrap()
}

/// A v1 WebSocket client of `server` connecting from `source`; `Err` with the HTTP status if
/// the upgrade is refused.
async fn v1_client_from(source: IpAddr, server: SocketAddr) -> Result<Ws, u16> {
    let tcp = tcp_from(source, server).await;
    let url = format!("ws://{server}/ws");
    match tokio::time::timeout(
        WAIT,
        tokio_tungstenite::client_async(v1_request(&url), MaybeTlsStream::Plain(tcp)),
    )
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

/// Subscribes `ws` to a fresh channel, publishes on it, and waits for the publication.
async fn exchange(ws: &mut Ws, channel: &str) {
    subscribe(ws, channel).await;
    let offset = publish(ws, channel, json!({"text":"hi"})).await;
    let publication = recv_json(ws).await;
    assert_eq!(publication["type"], "publication", "{publication}");
    assert_eq!(publication["offset"], offset);
}

/// Sends a raw request from `source` and reads the whole answer until the server closes.
async fn raw_request(source: IpAddr, server: SocketAddr, request: &[u8]) -> Vec<u8> {
    let mut tcp = tcp_from(source, server).await;
    tcp.write_all(request).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(WAIT, tcp.read_to_end(&mut raw))
        .await
        .expect("the server neither answered nor closed")
        .unwrap();
    raw
}

fn refusals(metrics: &str, reason: &str) -> u64 {
    let line = format!("rusty_socks_refusals_total{{reason=\"{reason}\"}} ");
    metrics
        .lines()
        .find_map(|l| l.strip_prefix(line.as_str()))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no {line} in metrics"))
}

#[tokio::test]
async fn sockets_past_max_conn_per_ip_get_429_and_another_address_is_still_admitted() {
    let server = TestServer::start(|c| c.max_conn_per_ip = 3).await;
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    let other = IpAddr::from(OTHER_HOST);
    // Two sessions and one socket that has not sent its request yet: pending handshakes count.
    let mut first = v1_client_from(local, server.addr).await.unwrap();
    let _second = v1_client_from(local, server.addr).await.unwrap();
    let _pending = tcp_from(local, server.addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;

    let raw = raw_request(
        local,
        server.addr,
        b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    let (status, head, body) = split_response(&raw);
    assert_eq!(status, 429, "{head}\n{body}");
    assert!(head.contains("retry-after: 1"), "{head}");
    assert!(body.contains("RUSTY_SOCKS_MAX_CONN_PER_IP"), "{body}");
    assert_eq!(
        v1_client_from(local, server.addr).await.err(),
        Some(429),
        "a WebSocket upgrade is refused the same way"
    );

    // Another address is not affected, and the sessions of the first one keep working.
    let mut stranger = v1_client_from(other, server.addr).await.unwrap();
    exchange(&mut stranger, "stranger").await;
    exchange(&mut first, "first").await;

    // A socket's count is given back when its task ends: closing a session makes room.
    first.close(None).await.unwrap();
    let deadline = Instant::now() + WAIT;
    let mut again = loop {
        match v1_client_from(local, server.addr).await {
            Ok(ws) => break ws,
            Err(status) => assert_eq!(status, 429),
        }
        assert!(
            Instant::now() < deadline,
            "the closed session's slot never came back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    exchange(&mut again, "again").await;

    // 127.0.0.1 is at its bound again: ask from the other address.
    let raw = raw_request(
        other,
        server.addr,
        b"GET /metrics HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    let (status, _, metrics) = split_response(&raw);
    assert_eq!(status, 200);
    assert!(refusals(&metrics, "per_address") >= 2, "{metrics}");
    let raw = raw_request(
        other,
        server.addr,
        b"GET /stats HTTP/1.1\r\nhost: x\r\n\r\n",
    )
    .await;
    let stats: serde_json::Value = serde_json::from_str(&split_response(&raw).2).unwrap();
    assert_eq!(stats["rejected_total"], 0, "429s are not overload refusals");
    server.stop().await;
}

#[tokio::test]
async fn the_per_address_bound_holds_over_ipv6_loopback() {
    let Ok(probe) = std::net::TcpListener::bind("[::1]:0") else {
        panic!("this test needs IPv6 on the loopback interface (::1)");
    };
    drop(probe);
    let server = TestServer::start(|c| {
        c.host = "::1".parse().unwrap();
        c.max_conn_per_ip = 2;
    })
    .await;
    let local: IpAddr = "::1".parse().unwrap();
    let _a = v1_client_from(local, server.addr).await.unwrap();
    let _b = tcp_from(local, server.addr).await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(v1_client_from(local, server.addr).await.err(), Some(429));
    server.stop().await;
}

/// A v1 upgrade through a proxy at 127.0.0.1 that forwards for `client`.
async fn v1_client_forwarded_for(server: &TestServer, client: &str) -> Result<Ws, u16> {
    let mut request = v1_request(&server.url("/ws"));
    request
        .headers_mut()
        .insert("x-forwarded-for", client.parse().unwrap());
    match tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("upgrade timed out")
    {
        Ok((mut ws, _)) => {
            assert_eq!(recv_json(&mut ws).await["type"], "welcome");
            Ok(ws)
        }
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            Err(response.status().as_u16())
        }
        Err(err) => panic!("upgrade failed: {err}"),
    }
}

#[tokio::test]
async fn behind_a_trusted_proxy_connections_count_under_the_forwarded_address() {
    let server = TestServer::start(|c| {
        c.trusted_proxies = vec![rusty_socks::settings::IpRange::parse("127.0.0.1").unwrap()];
        c.max_conn_per_ip = 2;
    })
    .await;
    // The proxy's own address is not bounded: it carries every client.
    let mut held = Vec::new();
    for client in ["203.0.113.7", "203.0.113.7", "203.0.113.8", "2001:db8::1"] {
        held.push(v1_client_forwarded_for(&server, client).await.unwrap());
    }
    // Each client is: a third connection from 203.0.113.7 (or 2001:db8::/64) is refused.
    assert_eq!(
        v1_client_forwarded_for(&server, "203.0.113.7").await.err(),
        Some(429)
    );
    let _second = v1_client_forwarded_for(&server, "2001:db8::2")
        .await
        .unwrap();
    assert_eq!(
        v1_client_forwarded_for(&server, "2001:db8::ffff")
            .await
            .err(),
        Some(429),
        "one IPv6 /64 is one address"
    );
    exchange(&mut held[0], "proxied").await;
    // A session's end gives its forwarded address's slot back.
    held.remove(0).close(None).await.unwrap();
    let deadline = Instant::now() + WAIT;
    while v1_client_forwarded_for(&server, "203.0.113.7")
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "the slot never came back");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server.stop().await;
}
