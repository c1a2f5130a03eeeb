//! permessage-deflate (RFC 7692) over real sockets: negotiation, compressed echo, one shared
//! compressed frame per publication, and the close codes for what a client may get wrong.
#![allow(clippy::unwrap_used)]

mod common;

use std::net::SocketAddr;

use common::{TestServer, WAIT};
use flate2::{Compress, Compression, Decompress, FlushCompress, FlushDecompress};
use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OFFER: &str = "permessage-deflate; client_max_window_bits";

/// A hand-driven client that speaks permessage-deflate (no context takeover, as agreed).
struct DeflateClient {
    stream: TcpStream,
    buf: Vec<u8>,
}

/// Connects with `extensions` offered (if any); returns the client and the response head.
async fn connect(
    addr: SocketAddr,
    path: &str,
    protocol: Option<&str>,
    extensions: Option<&str>,
) -> (DeflateClient, String) {
    let headers: Vec<(&str, &str)> = [
        protocol.map(|p| ("sec-websocket-protocol", p)),
        extensions.map(|e| ("sec-websocket-extensions", e)),
    ]
    .into_iter()
    .flatten()
    .collect();
    let (stream, buf, head) = common::raw_upgrade(addr, path, &headers).await;
    (DeflateClient { stream, buf }, head)
}

fn extension_header(head: &str) -> Option<&str> {
    head.lines()
        .find_map(|l| l.strip_prefix("sec-websocket-extensions:"))
        .map(str::trim)
}

/// Compresses one message as RFC 7692 §7.2.1 says: raw deflate, sync flush, tail removed.
fn deflate(data: &[u8]) -> Vec<u8> {
    let mut c = Compress::new(Compression::new(6), false);
    let mut out = Vec::with_capacity(data.len() + 64);
    c.compress_vec(data, &mut out, FlushCompress::Sync).unwrap();
    assert_eq!(c.total_in() as usize, data.len());
    assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
    out.truncate(out.len() - 4);
    out
}

fn inflate(data: &[u8]) -> Vec<u8> {
    let mut d = Decompress::new(false);
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut out = Vec::with_capacity(1 << 20);
    d.decompress_vec(&input, &mut out, FlushDecompress::Sync)
        .unwrap();
    out
}

impl DeflateClient {
    async fn send_frame(&mut self, first_byte: u8, payload: &[u8]) {
        self.stream
            .write_all(&common::client_frame(first_byte, payload, true))
            .await
            .unwrap();
    }

    async fn send_compressed_text(&mut self, text: &str) {
        self.send_frame(0xC1, &deflate(text.as_bytes())).await;
    }

    /// Next frame as (first header byte, payload as sent), or `None` at EOF.
    async fn read_frame(&mut self) -> Option<(u8, Vec<u8>)> {
        loop {
            if self.buf.len() >= 2 {
                let (len, header) = match self.buf[1] & 0x7F {
                    126 if self.buf.len() >= 4 => {
                        (u16::from_be_bytes([self.buf[2], self.buf[3]]) as usize, 4)
                    }
                    127 if self.buf.len() >= 10 => {
                        let mut be = [0u8; 8];
                        be.copy_from_slice(&self.buf[2..10]);
                        (u64::from_be_bytes(be) as usize, 10)
                    }
                    126 | 127 => (usize::MAX, 0),
                    n => (n as usize, 2),
                };
                if len != usize::MAX && self.buf.len() >= header + len {
                    let first = self.buf[0];
                    let payload = self.buf[header..header + len].to_vec();
                    self.buf.drain(..header + len);
                    return Some((first, payload));
                }
            }
            let mut chunk = vec![0u8; 64 * 1024];
            let n = tokio::time::timeout(WAIT, self.stream.read(&mut chunk))
                .await
                .expect("read timed out")
                .unwrap_or(0);
            if n == 0 {
                return None;
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    /// The next text message as JSON, inflated if it came compressed.
    async fn recv_json(&mut self) -> Value {
        let (first, payload) = self.read_frame().await.expect("a frame");
        assert_eq!(
            first & 0x0F,
            1,
            "a text frame: {:?}",
            String::from_utf8_lossy(&payload)
        );
        let text = if first & 0x40 != 0 {
            inflate(&payload)
        } else {
            payload
        };
        serde_json::from_slice(&text).expect("JSON")
    }

    async fn close_code(&mut self) -> u16 {
        loop {
            match self.read_frame().await {
                Some((first, payload)) if first & 0x0F == 8 => {
                    return u16::from_be_bytes([payload[0], payload[1]]);
                }
                Some(_) => continue,
                None => panic!("connection ended without a close frame"),
            }
        }
    }
}

async fn server(compression: bool) -> TestServer {
    TestServer::start(|c| {
        c.echo_endpoint = true;
        c.compression = compression;
        c.max_message_size = 64 * 1024;
        c.echo_max_message_size = 64 * 1024;
    })
    .await
}

#[tokio::test]
async fn negotiates_only_when_enabled_and_offered_acceptably() {
    let on = server(true).await;
    let (_, head) = connect(on.addr, "/echo", None, Some(OFFER)).await;
    assert_eq!(
        extension_header(&head),
        Some("permessage-deflate; server_no_context_takeover; client_no_context_takeover")
    );
    let (_, head) = connect(
        on.addr,
        "/ws",
        None,
        Some("permessage-deflate; unknown_param, permessage-deflate; server_max_window_bits=10"),
    )
    .await;
    assert_eq!(
        extension_header(&head),
        Some(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; server_max_window_bits=10"
        )
    );
    let (_, head) = connect(on.addr, "/echo", None, Some("permessage-deflate; x=1")).await;
    assert_eq!(extension_header(&head), None, "the only offer is declined");
    let (_, head) = connect(on.addr, "/echo", None, None).await;
    assert_eq!(extension_header(&head), None);
    on.stop().await;

    let off = server(false).await;
    let (_, head) = connect(off.addr, "/echo", None, Some(OFFER)).await;
    assert_eq!(extension_header(&head), None, "off by default");
    off.stop().await;
}

#[tokio::test]
async fn echo_inflates_what_arrives_and_compresses_what_it_sends() {
    let server = server(true).await;
    let (mut client, _) = connect(server.addr, "/echo", None, Some(OFFER)).await;
    let text = json!({"user": "ana", "items": vec!["some repeated words"; 60]}).to_string();
    assert!(text.len() > 1000);
    client.send_compressed_text(&text).await;
    let (first, payload) = client.read_frame().await.expect("echo");
    assert_eq!(first, 0xC1, "FIN + RSV1 + text: compressed");
    assert!(payload.len() < text.len() / 4, "{} bytes", payload.len());
    assert_eq!(inflate(&payload), text.as_bytes());

    // Short messages go uncompressed, in both directions.
    client.send_frame(0x81, b"short").await;
    assert_eq!(client.read_frame().await, Some((0x81, b"short".to_vec())));
    client.send_compressed_text("tiny").await;
    assert_eq!(client.read_frame().await, Some((0x81, b"tiny".to_vec())));

    // A compressed message in fragments, a ping between them.
    let data = deflate(text.as_bytes());
    client.send_frame(0x41, &data[..10]).await;
    client.send_frame(0x89, b"p").await;
    client.send_frame(0x80, &data[10..]).await;
    assert_eq!(client.read_frame().await, Some((0x8A, b"p".to_vec())));
    let (first, payload) = client.read_frame().await.expect("echo");
    assert_eq!(first, 0xC1);
    assert_eq!(inflate(&payload), text.as_bytes());
    server.stop().await;
}

#[tokio::test]
async fn a_publication_reaches_deflate_subscribers_compressed_and_others_plain() {
    let server = server(true).await;
    let v1 = Some("rusty-socks.v1");
    let mut subscribers = Vec::new();
    for offer in [Some(OFFER), Some(OFFER), None] {
        let (mut client, head) = connect(server.addr, "/ws", v1, offer).await;
        assert_eq!(extension_header(&head).is_some(), offer.is_some());
        assert_eq!(client.recv_json().await["type"], "welcome");
        let subscribe = json!({"type":"subscribe","id":"s","channel":"feed"}).to_string();
        if offer.is_some() {
            client.send_compressed_text(&subscribe).await;
        } else {
            client.send_frame(0x81, subscribe.as_bytes()).await;
        }
        let reply = client.recv_json().await;
        assert_eq!(reply["type"], "subscribed", "{reply}");
        subscribers.push(client);
    }
    let (mut publisher, _) = common::v1_client(&server).await;
    // About 1 KiB of JSON, as a feed would publish.
    let data = json!({"prices": (0..40).map(|i| json!({"sym": format!("S{i}"), "px": 100 + i})).collect::<Vec<_>>()});
    common::publish(&mut publisher, "feed", data.clone()).await;

    let mut compressed = Vec::new();
    for (i, client) in subscribers.iter_mut().enumerate() {
        let (first, payload) = client.read_frame().await.expect("publication");
        let text = if i < 2 {
            assert_eq!(first, 0xC1, "subscriber {i}: RSV1 set");
            compressed.push(payload.clone());
            inflate(&payload)
        } else {
            assert_eq!(first, 0x81, "no deflate: plain");
            payload
        };
        let publication: Value = serde_json::from_slice(&text).unwrap();
        assert_eq!(publication["type"], "publication");
        assert_eq!(publication["data"], data);
        if i == 2 {
            assert!(
                compressed[0].len() * 2 < text.len(),
                "{} compressed vs {} plain",
                compressed[0].len(),
                text.len()
            );
        }
    }
    assert_eq!(
        compressed[0], compressed[1],
        "the same bytes for every receiver"
    );
    server.stop().await;
}

/// A publisher's pipelined messages are fanned out together (a batch, laid end to end once for
/// all subscribers): each must still reach a deflate subscriber as a message of its own,
/// compressed or not by its own size, in order.
#[tokio::test]
async fn pipelined_publications_reach_deflate_subscribers_one_message_each() {
    let server = server(true).await;
    let v1 = Some("rusty-socks.v1");
    let mut subscribers = Vec::new();
    for offer in [Some(OFFER), Some(OFFER), None] {
        let (mut client, _) = connect(server.addr, "/ws", v1, offer).await;
        assert_eq!(client.recv_json().await["type"], "welcome");
        let subscribe = json!({"type":"subscribe","id":"s","channel":"feed"}).to_string();
        client.send_frame(0x81, subscribe.as_bytes()).await;
        assert_eq!(client.recv_json().await["type"], "subscribed");
        subscribers.push(client);
    }
    let (mut publisher, _) = connect(server.addr, "/ws", v1, None).await;
    assert_eq!(publisher.recv_json().await["type"], "welcome");
    // Large (compressed) and small (below the 256-byte minimum: plain) alternating.
    let data = |i: usize| {
        if i.is_multiple_of(2) {
            json!({"i": i, "text": "abcdefgh".repeat(100)})
        } else {
            json!({"i": i})
        }
    };
    let mut pipeline = Vec::new();
    for i in 0..20 {
        let publish = json!({"type":"publish","id":i.to_string(),"channel":"feed","data":data(i)});
        pipeline.extend(common::client_frame(
            0x81,
            publish.to_string().as_bytes(),
            true,
        ));
    }
    publisher.stream.write_all(&pipeline).await.unwrap();
    for (n, client) in subscribers.iter_mut().enumerate() {
        for i in 0..20usize {
            let (first, payload) = client.read_frame().await.expect("publication");
            let compressed = n < 2 && i.is_multiple_of(2);
            assert_eq!(
                first,
                if compressed { 0xC1 } else { 0x81 },
                "subscriber {n}, message {i}"
            );
            let text = if compressed {
                inflate(&payload)
            } else {
                payload
            };
            let publication: Value = serde_json::from_slice(&text).expect("one whole message");
            assert_eq!(publication["data"], data(i), "subscriber {n}, in order");
        }
    }
    server.stop().await;
}

#[tokio::test]
async fn rsv1_without_the_extension_is_a_protocol_error() {
    let server = server(true).await;
    let (mut client, head) = connect(server.addr, "/echo", None, None).await;
    assert_eq!(extension_header(&head), None);
    client.send_frame(0xC1, &deflate(b"hello")).await;
    assert_eq!(client.close_code().await, 1002);
    server.stop().await;
}

#[tokio::test]
async fn rsv1_on_a_continuation_or_control_frame_is_a_protocol_error() {
    let server = server(true).await;
    let (mut client, _) = connect(server.addr, "/echo", None, Some(OFFER)).await;
    let data = deflate(b"hello hello hello");
    client.send_frame(0x41, &data[..4]).await;
    client.send_frame(0xC0, &data[4..]).await;
    assert_eq!(client.close_code().await, 1002);
    let (mut client, _) = connect(server.addr, "/echo", None, Some(OFFER)).await;
    client.send_frame(0xC9, b"").await;
    assert_eq!(client.close_code().await, 1002);
    server.stop().await;
}

#[tokio::test]
async fn a_zip_bomb_is_refused_with_1009_and_garbage_with_1007() {
    let server = server(true).await;
    let (mut client, _) = connect(server.addr, "/echo", None, Some(OFFER)).await;
    // 8 MiB of zeros in about 8 KB: refused once the output passes the 64 KiB limit.
    let bomb = deflate(&vec![0u8; 8 << 20]);
    assert!(bomb.len() < 10_000, "{}", bomb.len());
    client.send_frame(0xC2, &bomb).await;
    assert_eq!(client.close_code().await, 1009);

    let (mut client, _) = connect(server.addr, "/echo", None, Some(OFFER)).await;
    client.send_frame(0xC1, &[0xff, 0xee, 0xdd, 0xcc]).await;
    assert_eq!(client.close_code().await, 1007);

    let (mut client, _) = connect(server.addr, "/echo", None, Some(OFFER)).await;
    client.send_frame(0xC1, &deflate(&[0xc0, 0xaf, 0x41])).await;
    assert_eq!(
        client.close_code().await,
        1007,
        "inflated text must be UTF-8"
    );
    server.stop().await;
}

#[tokio::test]
async fn invalid_utf8_fails_before_the_frame_completes() {
    let server = server(false).await;
    let (mut client, _) = connect(server.addr, "/echo", None, None).await;
    // A 20-byte text frame of which only the invalid start arrives.
    let payload: Vec<u8> = [b'o', b'k', 0xf4, 0x90, 0x80, 0x80]
        .into_iter()
        .chain(std::iter::repeat_n(b'x', 14))
        .collect();
    let key = [1u8, 2, 3, 4];
    let mut frame = vec![0x81, 0x80 | 20];
    frame.extend_from_slice(&key);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    client.stream.write_all(&frame[..6 + 6]).await.unwrap();
    assert_eq!(client.close_code().await, 1007);
    server.stop().await;
}

/// `VmRSS` of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap()
}

/// Opens `n` idle `/echo` connections, each after one exchange of about 1 KB (compressed when
/// `offer`), and returns them once the server has released their buffers (a heartbeat tick).
async fn idle_connections(addr: SocketAddr, n: usize, offer: Option<&str>) -> Vec<DeflateClient> {
    let text = json!({"items": vec!["some repeated words"; 50]}).to_string();
    let mut clients = Vec::with_capacity(n);
    for _ in 0..n {
        let (mut client, _) = connect(addr, "/echo", None, offer).await;
        if offer.is_some() {
            client.send_compressed_text(&text).await;
            assert_eq!(client.read_frame().await.expect("echo").0, 0xC1);
        } else {
            client.send_frame(0x81, text.as_bytes()).await;
            assert_eq!(client.read_frame().await.expect("echo").0, 0x81);
        }
        clients.push(client);
    }
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    clients
}

/// An idle connection that negotiated deflate costs at most 1 KiB more than one that did not:
/// compressors are per worker thread, never per connection.
#[tokio::test]
async fn an_idle_deflate_connection_costs_no_more_than_a_plain_one() {
    const N: usize = 2000;
    let mut server = common::process::Logged::start(&[
        ("RUSTY_SOCKS_ECHO_ENDPOINT", "true"),
        ("RUSTY_SOCKS_COMPRESSION", "true"),
        ("RUSTY_SOCKS_MAX_CONN", "10000"),
        ("RUSTY_SOCKS_MAX_CONN_PER_IP", "0"),
        ("RUSTY_SOCKS_THREAD_POOL_SIZE", "2"),
    ]);
    let addr = server.address();
    let pid = server.child.id();
    // Warm-up: every worker thread's compressor and decompressor exist from here on.
    let warm = idle_connections(addr, 50, Some(OFFER)).await;
    let warm_plain = idle_connections(addr, 50, None).await;
    let before = rss_kib(pid);
    let plain = idle_connections(addr, N, None).await;
    let after_plain = rss_kib(pid);
    let deflate = idle_connections(addr, N, Some(OFFER)).await;
    let after_deflate = rss_kib(pid);
    let plain_bytes = (after_plain.saturating_sub(before) * 1024) as f64 / N as f64;
    let deflate_bytes = (after_deflate.saturating_sub(after_plain) * 1024) as f64 / N as f64;
    eprintln!(
        "per idle connection: plain {plain_bytes:.0} B, deflate {deflate_bytes:.0} B (RSS growth over {N})"
    );
    assert!(
        deflate_bytes <= plain_bytes + 1024.0,
        "deflate {deflate_bytes:.0} B vs plain {plain_bytes:.0} B per idle connection"
    );
    drop((warm, warm_plain, plain, deflate));
}
