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
    let server = TestServer::start(|c| c.write_delay = DELAY).await;
    what_follows_a_write_waits_for(&server, DELAY).await;
    server.stop().await;
}

/// `RUSTY_SOCKS_BUSY_WRITE_DELAY_MS`: while the server's CPU is the limit, its busy write delay
/// applies as `RUSTY_SOCKS_WRITE_DELAY_MS` would. The server runs in this test's process,
/// whose CPU time it measures, against the capacity of one worker thread (its setting; the
/// test's runtime has two); two threads spinning here use more than that, until the server
/// reports itself saturated on `/metrics` and to the end of the test.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_the_server_is_saturated_the_busy_write_delay_applies() {
    const DELAY: Duration = Duration::from_millis(100);
    let server = TestServer::start(|c| {
        c.busy_write_delay = DELAY;
        c.worker_threads = 1;
    })
    .await;
    let spinning = Spinners::start(2);
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let (status, _, metrics) = http(server.addr, "GET", "/metrics", &[]).await;
        assert_eq!(status, 200, "{metrics}");
        let windows = metrics
            .lines()
            .find_map(|l| l.strip_prefix("rusty_socks_saturated_windows_total "))
            .expect("the saturation counter");
        if windows != "0" {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "not saturated after 20 s of spinning: {metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    what_follows_a_write_waits_for(&server, DELAY).await;
    drop(spinning);
    server.stop().await;
}

/// Threads that keep CPUs busy until dropped.
struct Spinners {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Spinners {
    fn start(n: usize) -> Self {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let threads = (0..n)
            .map(|_| {
                let stop = std::sync::Arc::clone(&stop);
                std::thread::spawn(move || {
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        std::hint::spin_loop();
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for Spinners {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// Sends one chat message and, once it has arrived, twenty more: each of those must arrive,
/// in order, no sooner than `delay` after the first was sent.
async fn what_follows_a_write_waits_for(server: &TestServer, delay: Duration) {
    const FOLLOWING: usize = 20;
    let mut subscriber = RawClient::connect(server.addr, "/ws").await;
    let (_, welcome) = subscriber.read_frame().await.expect("welcome");
    let welcome: Value = serde_json::from_slice(&welcome).expect("welcome JSON");
    assert_eq!(welcome["type"], "Connect", "{welcome}");
    let (mut publisher, _) = join(server).await;

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
            sent.elapsed() >= delay,
            "m{i} arrived {:?} after m0 was sent, before the delay",
            sent.elapsed()
        );
    }
}
