//! What connections cost the server's memory. A client can make it reserve for reading only
//! the bytes it actually sent: a frame header declares a length, and believing it before the
//! bytes arrive would let a few hundred connections that send only headers make the server
//! reserve gigabytes. And an idle connection costs a small, bounded footprint.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::{Duration, Instant};

use common::process::*;
use common::*;
use tokio::io::AsyncWriteExt;

/// Connections that each declare a maximum-size frame.
const CONNECTIONS: usize = 500;
/// The server's message limit in this test, and the length every header declares.
const MAX_MESSAGE: u64 = 1024 * 1024;

/// A `/proc/<pid>/status` field, in KiB.
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
}

/// The server's `rusty_socks_bytes_in_total`.
async fn bytes_in(addr: std::net::SocketAddr) -> u64 {
    let (status, _, body) = http(addr, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    body.lines()
        .find_map(|l| l.strip_prefix("rusty_socks_bytes_in_total "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no bytes_in counter in {body}"))
}

/// Welcomed legacy `/ws` connections held idle in the footprint test.
const IDLE: usize = 2000;
/// The most one idle legacy `/ws` connection may add to the server's RSS in the test build:
/// with mimalloc (the default allocator) the issue's 1 KiB. Connected one at a time, this
/// measures 741-751 B (2026-12-03: the session task carved at its exact 384 bytes, a 112-byte
/// outbox, the welcome's buffers given back at once; release builds measure 894-959 B with
/// `loadgen connect`, 200 handshakes at a time, see docs/BENCHMARKS.md, "Idle memory, fourth
/// pass"). It was 1,173 B before that pass, 1,210-1,260 B before the third. On the system
/// allocator (`--no-default-features`) about 1,370 B were measured before the third pass. A
/// session that kept a read or write buffer (4 KiB at least) or a timer while idle fails this.
/// (With transparent huge pages, which mimalloc asks for unless built with its `no_thp`
/// feature, RSS grew in 2 MiB steps and this measured anywhere from 750 to 2,100 B.)
const IDLE_BYTES_LIMIT: u64 = if cfg!(feature = "mimalloc") {
    1024
} else {
    1664
};

/// `count` legacy `/ws` connections, each once its `Connect` welcome arrived.
async fn welcomed_raw(addr: std::net::SocketAddr, count: usize) -> Vec<RawClient> {
    let mut clients = Vec::with_capacity(count);
    for _ in 0..count {
        let mut client = RawClient::connect(addr, "/ws").await;
        let (opcode, welcome) = client.read_frame().await.expect("a welcome");
        assert_eq!(opcode, 0x1);
        assert!(
            String::from_utf8_lossy(&welcome).contains(r#""type":"Connect""#),
            "{}",
            String::from_utf8_lossy(&welcome)
        );
        clients.push(client);
    }
    clients
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_chat_connection_costs_a_small_bounded_footprint() {
    let mut server = Logged::start(&[
        ("RUSTY_SOCKS_MAX_CONN", "5000"),
        ("RUSTY_SOCKS_MAX_CONN_PER_IP", "0"),
        ("RUSTY_SOCKS_THREAD_POOL_SIZE", "1"),
    ]);
    let addr = server.address();
    let pid = server.child.id();
    // Warm up: the runtime's, the hub's and the registry's lasting state, and the allocator's
    // pools for the handshake's temporary buffers.
    let warm = welcomed_raw(addr, 200).await;
    // Idle sessions give their buffers back on the next heartbeat tick (once a second).
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before = status_kib(pid, "VmRSS:");
    let idle = welcomed_raw(addr, IDLE).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let after = status_kib(pid, "VmRSS:");
    let per_connection = after.saturating_sub(before) * 1024 / IDLE as u64;
    eprintln!("RSS {before} -> {after} KiB over {IDLE} idle connections: {per_connection} B each");
    assert!(
        per_connection <= IDLE_BYTES_LIMIT,
        "an idle connection costs {per_connection} B (limit {IDLE_BYTES_LIMIT} B)"
    );
    // Still live: the last one is answered (past whatever else came first: pings, notices).
    let mut last = idle.into_iter().last().expect("connections");
    last.send_frame(0x89, b"still there", true).await;
    loop {
        match last.read_frame().await {
            Some((0xA, payload)) => break assert_eq!(payload, b"still there"),
            Some(_) => {}
            None => panic!("the connection closed instead of answering"),
        }
    }
    drop((warm, last));
    signal(&server.child, "TERM");
    wait_exit(&mut server.child, Duration::from_secs(10));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn headers_declaring_maximum_frames_do_not_make_the_server_reserve_them() {
    let max = MAX_MESSAGE.to_string();
    let mut server = Logged::start(&[
        ("RUSTY_SOCKS_ECHO_ENDPOINT", "true"),
        ("RUSTY_SOCKS_ECHO_MAX_MESSAGE_SIZE", max.as_str()),
        ("RUSTY_SOCKS_MAX_CONN", "1000"),
        ("RUSTY_SOCKS_MAX_CONN_PER_IP", "0"),
        ("RUSTY_SOCKS_THREAD_POOL_SIZE", "2"),
    ]);
    let addr = server.address();
    let pid = server.child.id();

    // Warm up: the first connections allocate the runtime's and the hub's lasting state.
    let mut clients = Vec::new();
    for _ in 0..20 {
        clients.push(RawClient::connect(addr, "/echo").await);
    }
    let before_in = bytes_in(addr).await;
    let rss_before = status_kib(pid, "VmRSS:");
    let data_before = status_kib(pid, "VmData:");

    // A masked binary frame header declaring MAX_MESSAGE bytes, and not one byte of payload.
    let mut header = vec![0x82, 0x80 | 127];
    header.extend_from_slice(&MAX_MESSAGE.to_be_bytes());
    header.extend_from_slice(&[1, 2, 3, 4]);
    let mut declaring = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut client = RawClient::connect(addr, "/echo").await;
        client.stream.write_all(&header).await.unwrap();
        declaring.push(client);
    }
    // Every header has reached the server's read path once its byte counter shows them.
    let expected = before_in + (CONNECTIONS * header.len()) as u64;
    let deadline = Instant::now() + WAIT;
    while bytes_in(addr).await < expected {
        assert!(
            Instant::now() < deadline,
            "the server never read every header"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss = status_kib(pid, "VmRSS:").saturating_sub(rss_before);
    let data = status_kib(pid, "VmData:").saturating_sub(data_before);
    eprintln!("growth for {CONNECTIONS} connections: VmRSS {rss} KiB, VmData {data} KiB");

    // Believing the headers would cost CONNECTIONS x MAX_MESSAGE = 500 MiB; a connection's
    // own state and the few bytes it sent cost a few KiB each. Both measures count: Linux
    // backs reserved pages lazily, so reservations show in VmData (the address space the
    // process holds, what strict overcommit and address-space limits refuse) long before
    // VmRSS; before the fix VmData grew by the whole 500 MiB here while VmRSS did not.
    let declared_kib = CONNECTIONS as u64 * MAX_MESSAGE / 1024;
    assert!(rss < declared_kib / 10, "VmRSS grew by {rss} KiB");
    assert!(data < declared_kib / 10, "VmData grew by {data} KiB");

    // The buffer grows as the payload really arrives: the frame completes and comes back.
    let payload: Vec<u8> = (0..MAX_MESSAGE).map(|i| (i % 251) as u8).collect();
    let masked: Vec<u8> = payload
        .iter()
        .enumerate()
        .map(|(i, b)| b ^ [1, 2, 3, 4][i % 4])
        .collect();
    let client = &mut declaring[0];
    client.stream.write_all(&masked).await.unwrap();
    let (opcode, echoed) = client.read_frame().await.unwrap();
    assert_eq!(opcode, 0x2);
    assert!(echoed == payload, "the echo differs from what was sent");

    drop(declaring);
    drop(clients);
    signal(&server.child, "TERM");
    wait_exit(&mut server.child, Duration::from_secs(10));
}

/// An idle session gives its buffers and its parser back on the heartbeat tick (once a
/// second); a message still under way must keep them. A fragmented message, a character split
/// between fragments and a frame cut in two, each completed after two ticks, come back whole.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_under_way_survives_the_ticks_that_release_idle_buffers() {
    let mut server = Logged::start(&[("RUSTY_SOCKS_ECHO_ENDPOINT", "true")]);
    let addr = server.address();
    let mut fragmented = RawClient::connect(addr, "/echo").await;
    fragmented.send_frame(0x01, b"hello ", true).await;
    let word = "w\u{f6}rld".as_bytes();
    let mut split_char = RawClient::connect(addr, "/echo").await;
    // Ends between the two bytes of the umlaut.
    split_char.send_frame(0x01, &word[..2], true).await;
    let mut cut = RawClient::connect(addr, "/echo").await;
    let frame = client_frame(0x82, b"0123456789", true);
    cut.stream.write_all(&frame[..7]).await.unwrap();

    tokio::time::sleep(Duration::from_millis(2500)).await;
    fragmented.send_frame(0x80, b"again", true).await;
    split_char.send_frame(0x80, &word[2..], true).await;
    cut.stream.write_all(&frame[7..]).await.unwrap();
    assert_eq!(
        fragmented.read_frame().await,
        Some((0x1, b"hello again".to_vec()))
    );
    assert_eq!(split_char.read_frame().await, Some((0x1, word.to_vec())));
    assert_eq!(cut.read_frame().await, Some((0x2, b"0123456789".to_vec())));

    signal(&server.child, "TERM");
    wait_exit(&mut server.child, Duration::from_secs(10));
}
