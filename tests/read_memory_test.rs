//! What a client can make the server reserve for reading: only the bytes it actually sent.
//! A frame header declares a length; believing it before the bytes arrive would let a few
//! hundred connections that send only headers make the server reserve gigabytes.
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
