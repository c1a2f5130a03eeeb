//! Slow consumers, graceful shutdown and the conformance endpoint, over real sockets.
#![allow(clippy::unwrap_used)]

mod common;

use common::*;
use futures_util::SinkExt;
use tokio_tungstenite::tungstenite::Message;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_closed_and_nobody_else_loses_a_message() {
    const TOTAL: usize = 6000;
    const WINDOW: usize = 64;
    let server = TestServer::start(|c| {
        c.buffer = 128;
        // The close frame waits behind everything already in the stalled client's buffers;
        // the grace must outlast a loaded machine scheduling this test's reader below.
        c.shutdown_grace = std::time::Duration::from_secs(60);
    })
    .await;
    let (mut publisher, _) = join(&server).await;
    let (mut reader, _) = join(&server).await;
    // Joins, reads its welcome, then reads nothing until the server has given up on it.
    let mut stalled = RawClient::connect(server.addr, "/ws").await;
    let addr = server.addr;
    let stalled_close = tokio::spawn(async move {
        // The event that ends the stall: the server counted this client as a slow consumer.
        // Only then does it read, so the close frame behind its full buffers can get through.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            let (_, _, body) = http(addr, "GET", "/stats", &[]).await;
            let stats: serde_json::Value = serde_json::from_str(&body).unwrap();
            if stats["slow_consumer_closes_total"] == 1 {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "never slow: {stats}");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        stalled.close_code().await
    });

    let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel();
    let reading = tokio::spawn(async move {
        for n in 0..TOTAL {
            let got = recv_json(&mut reader).await;
            if got["type"] == "Disconnect" {
                // The stalled client's departure may arrive at any point; it is not a chat.
                let again = recv_json(&mut reader).await;
                assert_eq!(again["content"].as_str().unwrap()[..8], format!("{n:08}"));
            } else {
                assert_eq!(
                    got["content"].as_str().unwrap()[..8],
                    format!("{n:08}"),
                    "in order, none lost"
                );
            }
            let _ = progress_tx.send(n);
        }
        reader
    });
    let filler = "x".repeat(4000);
    for n in 0..TOTAL {
        publisher
            .send(Message::text(format!(
                r#"{{"sender":"p","content":"{n:08}{filler}"}}"#
            )))
            .await
            .unwrap();
        // Stay within the healthy reader's outbox: never more than WINDOW ahead of it.
        if n >= WINDOW {
            while let Some(seen) = progress.recv().await {
                if seen + WINDOW >= n {
                    break;
                }
            }
        }
    }
    let _reader = reading.await.unwrap();

    // The stalled client gets what fit in its buffers, then a 4001 close.
    assert_eq!(stalled_close.await.unwrap(), 4001);
    // Its slot is freed once its close handshake has had its chance.
    let stats = server.wait_for_stat("connections", 2).await;
    assert_eq!(stats["slow_consumer_closes_total"], 1, "{stats}");
    // The others leave first, so the long close grace above never delays the stop.
    drop((publisher, _reader));
    server.wait_for_stat("connections", 0).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_flushes_queued_messages_then_closes_with_1001() {
    const TOTAL: usize = 3000;
    let mut server = TestServer::start(|c| c.buffer = 4096).await;
    let (mut a, _) = join(&server).await;
    // `b` does not read yet, so its socket buffers fill and frames wait in its outbox.
    let mut b = RawClient::connect(server.addr, "/ws").await;
    let filler = "z".repeat(4000);
    for n in 0..TOTAL {
        send_text(
            &mut a,
            &format!(r#"{{"sender":"a","content":"{n:05}{filler}"}}"#),
        )
        .await;
    }
    // Round trip on `a`: every message is now queued for `b` (in its outbox or its socket).
    send_text(&mut a, "[]").await;
    assert_eq!(recv_json(&mut a).await["code"], "invalid_message");

    let started = std::time::Instant::now();
    let stopping = server.begin_stop();
    let mut got = 0;
    let code = loop {
        let (opcode, payload) = b.read_frame().await.expect("closed before the close frame");
        match opcode {
            0x1 => {
                let chat: serde_json::Value = serde_json::from_slice(&payload).unwrap();
                if chat["type"] == "Connect" {
                    continue;
                }
                assert_eq!(chat["content"].as_str().unwrap()[..5], format!("{got:05}"));
                got += 1;
            }
            0x8 => break u16::from_be_bytes([payload[0], payload[1]]),
            _ => {}
        }
    };
    assert_eq!(
        got, TOTAL,
        "everything queued was delivered before the close"
    );
    assert_eq!(code, 1001);
    assert_eq!(recv_close_code(&mut a).await, 1001);
    tokio::time::timeout(std::time::Duration::from_secs(5), stopping)
        .await
        .expect("run() returned within 5 s")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(5));
    // Nothing listens any more.
    assert!(tokio::net::TcpStream::connect(server.addr).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_flooding_its_own_input_still_gets_its_messages() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const TOTAL: usize = 2000;
    const WINDOW: usize = 64;
    let server = TestServer::start(|c| c.buffer = 256).await;
    let (mut publisher, _) = join(&server).await;
    // `busy` reads everything it is sent while its write half floods the server with
    // publishes nobody receives: its session must keep draining its outbox regardless.
    let busy = RawClient::connect(server.addr, "/ws").await;
    let (mut rd, mut wr) = busy.stream.into_split();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flooding = {
        let stop = stop.clone();
        tokio::spawn(async move {
            let payload = br#"{"type":"publish","channel":"sink","data":0}"#;
            let mut frame = vec![0x81, 0x80 | payload.len() as u8, 0, 0, 0, 0];
            frame.extend_from_slice(payload);
            let batch = frame.repeat(100);
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if wr.write_all(&batch).await.is_err() {
                    break;
                }
            }
            wr
        })
    };
    let (progress_tx, mut progress) = tokio::sync::mpsc::unbounded_channel();
    let reading = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut chunk = vec![0u8; 1 << 16];
        let mut chats = 0;
        while chats < TOTAL {
            let n = tokio::time::timeout(WAIT, rd.read(&mut chunk))
                .await
                .expect("starved")
                .unwrap();
            assert!(n > 0, "closed after {chats} chats");
            buf.extend_from_slice(&chunk[..n]);
            while let Some((opcode, payload)) = take_frame(&mut buf) {
                let payload = String::from_utf8_lossy(&payload).into_owned();
                assert_ne!(opcode, 0x8, "closed: {payload}");
                if payload.contains("\"Chat\"") {
                    chats += 1;
                    let _ = progress_tx.send(chats);
                }
            }
        }
        chats
    });
    for n in 1..=TOTAL {
        send_text(
            &mut publisher,
            &format!(r#"{{"sender":"p","content":"{n}"}}"#),
        )
        .await;
        if n > WINDOW {
            while let Some(seen) = progress.recv().await {
                if seen + WINDOW >= n {
                    break;
                }
            }
        }
    }
    assert_eq!(reading.await.unwrap(), TOTAL);
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _wr = flooding.await.unwrap();
    assert_eq!(server.stats().await["slow_consumer_closes_total"], 0);
    server.stop().await;
}

#[tokio::test]
async fn echo_endpoint_is_off_by_default_and_echoes_exactly_when_on() {
    let server = TestServer::start(|_| {}).await;
    let (status, _, _) = http(server.addr, "GET", "/echo", &[]).await;
    assert_eq!(status, 404);
    server.stop().await;

    let server = TestServer::start(|c| c.echo_endpoint = true).await;
    let mut ws = connect(&server, "/echo").await;
    ws.send(Message::text("not even json")).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text("not even json"));
    ws.send(Message::binary(vec![0u8, 255, 7])).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::binary(vec![0u8, 255, 7]));
    // Larger than /ws allows: /echo has its own limit for the conformance suite.
    let big = "é".repeat(100_000);
    ws.send(Message::text(big.clone())).await.unwrap();
    assert_eq!(recv(&mut ws).await, Message::text(big));
    ws.close(None).await.unwrap();
    server.stop().await;
}
