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
    welcomed(tokio_tungstenite::client_async(
        v1_request(&url),
        MaybeTlsStream::Plain(tcp),
    ))
    .await
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

#[tokio::test]
async fn a_request_head_over_16_kib_gets_431_and_the_socket_is_closed() {
    let server = TestServer::start(|_| {}).await;
    let local: IpAddr = "127.0.0.1".parse().unwrap();
    let head = |padding: usize| {
        format!(
            "GET /health HTTP/1.1\r\nhost: x\r\nx-padding: {}\r\n\r\n",
            "a".repeat(padding)
        )
    };
    let big = head(17 * 1024);
    assert!(big.len() > 17 * 1024);
    let raw = raw_request(local, server.addr, big.as_bytes()).await;
    let (status, _, _) = split_response(&raw);
    assert_eq!(status, 431, "{}", String::from_utf8_lossy(&raw));

    // So is a head of more than 100 headers, however short.
    let many: String = (0..101).map(|n| format!("x-h{n}: v\r\n")).collect();
    let raw = raw_request(
        local,
        server.addr,
        format!("GET /health HTTP/1.1\r\nhost: x\r\n{many}\r\n").as_bytes(),
    )
    .await;
    assert_eq!(split_response(&raw).0, 431);

    // Just under the bound is an ordinary request.
    let fits = head(15 * 1024);
    let raw = raw_request(local, server.addr, fits.as_bytes()).await;
    let (status, _, body) = split_response(&raw);
    assert_eq!((status, body.as_str()), (200, "OK"));

    // A WebSocket client with a huge header is refused the same way; others are not affected.
    let mut request = v1_request(&server.url("/ws"));
    request
        .headers_mut()
        .insert("x-padding", "b".repeat(20 * 1024).parse().unwrap());
    let refused = tokio::time::timeout(WAIT, tokio_tungstenite::connect_async(request))
        .await
        .expect("upgrade timed out");
    match refused {
        Err(tokio_tungstenite::tungstenite::Error::Http(response)) => {
            assert_eq!(response.status(), 431);
        }
        other => panic!("expected 431, got {:?}", other.map(|(_, r)| r.status())),
    }
    let (mut ws, _) = v1_client(&server).await;
    exchange(&mut ws, "fine").await;
    server.stop().await;
}

/// What became of one dribbling socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Dribbled {
    /// Answered 429 at once.
    Refused,
    /// Closed without an answer, after this long.
    Closed(Duration),
    /// Still open when the test stopped watching.
    Open,
}

/// Sends a request head one byte a second, never finishing it, and reports how it ended.
async fn dribble(server: SocketAddr, watch: Duration) -> Dribbled {
    let mut tcp = tcp_from(IpAddr::from(OTHER_HOST), server).await;
    // Timed from the connection, not from the attempt: 500 connects at once can overflow the
    // listen backlog, and a SYN the kernel dropped is sent again 1 s, then 3 s later. A socket
    // refused at once after such a retry must not read as one held to the handshake deadline
    // (this failed once on a loaded machine: refusals at 1.0 s and 2.05 s).
    let started = Instant::now();
    let head = b"GET /ws HTTP/1.1\r\nhost: x\r\nx-slow: "
        .iter()
        .chain([b'a'; 64].iter());
    let mut head = head.copied();
    let mut answer = Vec::new();
    let mut buf = [0u8; 512];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let byte = head.next().unwrap_or(b'a');
                if tcp.write_all(&[byte]).await.is_err() {
                    return Dribbled::Closed(started.elapsed());
                }
            }
            read = tcp.read(&mut buf) => match read {
                Ok(0) | Err(_) => {
                    return if answer.starts_with(b"HTTP/1.1 429") {
                        Dribbled::Refused
                    } else {
                        assert!(answer.is_empty(), "{}", String::from_utf8_lossy(&answer));
                        Dribbled::Closed(started.elapsed())
                    };
                }
                Ok(n) => answer.extend_from_slice(&buf[..n]),
            },
            () = tokio::time::sleep_until((started + watch).into()) => return Dribbled::Open,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dribbling_sockets_from_one_address_cannot_starve_another() {
    const DRIBBLERS: usize = 500;
    const TIMEOUT: Duration = Duration::from_secs(3);
    // Fewer handshake slots than dribblers: without a per-address bound they would all be taken.
    let server = TestServer::start(|c| {
        c.max_queued_tasks = 200;
        c.handshake_timeout = TIMEOUT;
    })
    .await;
    let per_ip = rusty_socks::settings::DEFAULT_MAX_CONN_PER_IP;
    let addr = server.addr;
    let dribblers: Vec<_> = (0..DRIBBLERS)
        .map(|_| tokio::spawn(dribble(addr, TIMEOUT + Duration::from_secs(4))))
        .collect();
    // Let them connect and start dribbling; the first of them hold their slots by now.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let queued = server.stats().await["queued"].as_u64().unwrap();
    assert!(
        (1..=per_ip as u64).contains(&queued),
        "at most {per_ip} of the dribblers hold a slot: {queued}"
    );

    // Meanwhile a client from another address connects and exchanges a message.
    let started = Instant::now();
    let mut ws = v1_client_from("127.0.0.1".parse().unwrap(), addr)
        .await
        .expect("the other address is admitted");
    exchange(&mut ws, "meanwhile").await;
    let took = started.elapsed();
    eprintln!("connect, subscribe, publish and receive took {took:?} among {DRIBBLERS} dribblers");
    // The issue asks for under a second; this is loopback, so a second is a generous bound.
    assert!(took < Duration::from_secs(1), "took {took:?}");

    let mut outcomes = Vec::new();
    for dribbler in dribblers {
        outcomes.push(dribbler.await.unwrap());
    }
    let refused = outcomes.iter().filter(|o| **o == Dribbled::Refused).count();
    let open = outcomes.iter().filter(|o| **o == Dribbled::Open).count();
    let at_deadline: Vec<Duration> = outcomes
        .iter()
        .filter_map(|o| match o {
            // Held until the deadline (3 s after the server accepted it), not refused, even
            // if the refusal was only noticed at the next one-second write.
            Dribbled::Closed(after) if *after >= TIMEOUT - Duration::from_millis(500) => {
                Some(*after)
            }
            _ => None,
        })
        .collect();
    let closed_early = DRIBBLERS - refused - open - at_deadline.len();
    assert_eq!(
        open, 0,
        "every dribbler is closed by the handshake deadline"
    );
    assert_eq!(
        at_deadline.len(),
        per_ip,
        "exactly MAX_CONN_PER_IP were admitted and then closed at the deadline: {outcomes:?}"
    );
    assert!(
        at_deadline
            .iter()
            .all(|after| *after < TIMEOUT + Duration::from_secs(2)),
        "closed at the deadline on the whole head, though they kept sending: {at_deadline:?}"
    );
    assert!(refused >= 1, "some got a 429 to read");
    assert_eq!(
        refused + closed_early,
        DRIBBLERS - per_ip,
        "the rest were refused at once"
    );
    let (_, _, metrics) = http(addr, "GET", "/metrics", &[]).await;
    assert_eq!(
        refusals(&metrics, "per_address"),
        (DRIBBLERS - per_ip) as u64
    );
    // The client from the other address was never disturbed.
    exchange(&mut ws, "after").await;
    server.stop().await;
}

/// A v1 upgrade through a proxy at 127.0.0.1 that forwards for `client`.
async fn v1_client_forwarded_for(server: &TestServer, client: &str) -> Result<Ws, u16> {
    let mut request = v1_request(&server.url("/ws"));
    request
        .headers_mut()
        .insert("x-forwarded-for", client.parse().unwrap());
    welcomed(tokio_tungstenite::connect_async(request)).await
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
