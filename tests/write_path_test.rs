//! The session's write path over a real socket that fills up: frames stay shared until the
//! socket takes them (small ones gathered into one write, large ones written as slices), and
//! a write the kernel takes only part of must resume exactly where it stopped.
mod common;

use std::time::Duration;

use common::*;
use serde_json::{Value, json};

/// Content of the `i`-th message: small, large, or alternating, by phase, so that every
/// write path (gathered, sliced, and the switch between them) runs, most of the stream
/// against a socket that is full.
fn content(i: usize) -> String {
    let len = match i / 300 {
        0 => 10 + i % 50,               // small frames: gathered
        1 => 3_000 + (i * 37) % 9_000,  // large frames: written as slices
        _ if i.is_multiple_of(2) => 20, // alternating
        _ => 6_000 + i % 1_000,
    };
    let stamp = format!("<{i}>");
    let fill = char::from(b'a' + (i % 26) as u8);
    format!(
        "{stamp}{}",
        fill.to_string().repeat(len - stamp.len().min(len))
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_pauses_reading_gets_every_frame_whole_and_in_order() {
    const MESSAGES: usize = 1_200;
    let server = TestServer::start(|c| {
        c.buffer = 4 * MESSAGES;
    })
    .await;
    let mut subscriber = RawClient::connect(server.addr, "/ws").await;
    // A small receive window: the server's writes stop part-way through frames long before
    // the test reads anything.
    socket2::SockRef::from(&subscriber.stream)
        .set_recv_buffer_size(32 * 1024)
        .expect("SO_RCVBUF");
    let (_, welcome) = subscriber.read_frame().await.expect("welcome");
    let welcome: Value = serde_json::from_slice(&welcome).expect("welcome JSON");
    assert_eq!(welcome["type"], "Connect", "{welcome}");

    let (mut publisher, _) = join(&server).await;
    let mut sent_bytes = 0;
    for i in 0..MESSAGES {
        let text = json!({"sender": "p", "content": content(i)}).to_string();
        sent_bytes += text.len();
        send_text(&mut publisher, &text).await;
    }
    // All of it is queued or in flight while the subscriber reads nothing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        sent_bytes > 4_000_000,
        "{sent_bytes} bytes: more than the socket holds"
    );

    let mut next = 0;
    while next < MESSAGES {
        let (opcode, payload) = subscriber.read_frame().await.expect("a frame, not EOF");
        if opcode != 0x1 {
            continue; // pings
        }
        let chat: Value = serde_json::from_slice(&payload)
            .unwrap_or_else(|e| panic!("frame {next} is not whole JSON ({e}): {payload:?}"));
        if chat["type"] != "Chat" {
            continue;
        }
        assert_eq!(
            chat["content"],
            content(next),
            "message {next} intact, in order"
        );
        next += 1;
    }
    server.stop().await;
}

/// Frames the session holds uncopied go out before its own replies only when they were queued
/// before them: a `published` reply is written before the publication it announces, which
/// reaches the publisher (a subscriber of its channel) only after its publish was handled.
#[tokio::test]
async fn a_reply_is_never_overtaken_by_frames_queued_after_it() {
    let server = TestServer::start(|_| {}).await;
    let (mut client, _) = v1_client(&server).await;
    subscribe(&mut client, "c").await;
    const PUBLISHES: u64 = 50;
    for i in 0..PUBLISHES {
        let command = json!({"type": "publish", "id": i, "channel": "c", "data": {"i": i}});
        send_text(&mut client, &command.to_string()).await;
    }
    let mut replied = std::collections::HashSet::new();
    let mut published = 0;
    while published < PUBLISHES || replied.len() < PUBLISHES as usize {
        let frame = recv_json(&mut client).await;
        match frame["type"].as_str() {
            Some("published") => {
                replied.insert(frame["offset"].as_u64().expect("offset"));
            }
            Some("publication") => {
                let offset = frame["offset"].as_u64().expect("offset");
                assert!(
                    replied.contains(&offset),
                    "publication {offset} arrived before the reply that announced it"
                );
                published += 1;
            }
            _ => panic!("unexpected frame {frame}"),
        }
    }
    server.stop().await;
}

/// `RUSTY_SOCKS_WRITE_DELAY_MS`: a subscriber that was just written to waits for more. What is
/// published once the first message has reached it arrives no sooner than the delay after
/// that first message was sent (the server cannot have written it earlier, and what follows
/// waits for the delay since that write), all of it and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_write_delay_what_follows_a_write_waits_for_the_delay() {
    const DELAY: Duration = Duration::from_millis(100);
    const FOLLOWING: usize = 20;
    let server = TestServer::start(|c| c.write_delay = DELAY).await;
    let mut subscriber = RawClient::connect(server.addr, "/ws").await;
    let (_, welcome) = subscriber.read_frame().await.expect("welcome");
    let welcome: Value = serde_json::from_slice(&welcome).expect("welcome JSON");
    assert_eq!(welcome["type"], "Connect", "{welcome}");
    let (mut publisher, _) = join(&server).await;

    let chat = |i: usize| json!({"sender": "p", "content": format!("m{i}")}).to_string();
    let content = |frame: Option<(u8, Vec<u8>)>| {
        let (_, payload) = frame.expect("a frame");
        let chat: Value = serde_json::from_slice(&payload).expect("chat JSON");
        chat["content"].as_str().expect("content").to_owned()
    };
    let sent = std::time::Instant::now();
    send_text(&mut publisher, &chat(0)).await;
    assert_eq!(content(subscriber.read_frame().await), "m0");
    for i in 1..=FOLLOWING {
        send_text(&mut publisher, &chat(i)).await;
    }
    for i in 1..=FOLLOWING {
        assert_eq!(content(subscriber.read_frame().await), format!("m{i}"));
        assert!(
            sent.elapsed() >= DELAY,
            "m{i} arrived {:?} after m0 was sent, before the delay",
            sent.elapsed()
        );
    }
    server.stop().await;
}
