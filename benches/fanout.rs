//! Micro-benchmark of the fan-out path, in process: one channel with N members, M frames
//! delivered through `Hub::deliver`, every outbox drained into a write buffer as a session
//! would. No sockets: this isolates the hub, the outboxes and the copy into write buffers, so
//! a regression there shows up in review.
//!
//! The last runs compare permessage-deflate on and off for 1 KiB of JSON to 1,000 members:
//! with it on, every session takes the publication's shared compressed frame (compressed once,
//! by the first session that needs it), so what grows is one compression per publication,
//! not one per delivery.
//!
//! Run: `cargo bench --bench fanout` (CI builds it with `cargo bench --no-run`).

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rusty_socks::engine::hub::{Hub, MemberState};
use rusty_socks::engine::namespace::SlowPolicy;
use rusty_socks::engine::outbox::Outbox;
use rusty_socks::ws::deflate::Deflate;
use rusty_socks::ws::frame::{OpCode, encode};
use uuid::Uuid;

fn run(members: usize, messages: usize, size: usize) {
    run_with(members, messages, &vec![b'x'; size], None, "");
}

/// One run: `payload` published `messages` times to `members` members whose sessions use
/// `deflate`; prints deliveries per second of this (single) thread and bytes written.
fn run_with(
    members: usize,
    messages: usize,
    payload: &[u8],
    deflate: Option<Deflate>,
    label: &str,
) {
    let size = payload.len();
    let hub = Hub::new();
    let mut receivers = Vec::with_capacity(members);
    for _ in 0..members {
        let (outbox, rx) = Outbox::new(Uuid::new_v4(), 1024);
        let state = MemberState::recovering("bench", SlowPolicy::Disconnect, 1024);
        hub.subscribe(&outbox, Arc::clone(&state));
        hub.finish_recovery(&state, 0, 0);
        receivers.push(rx);
    }
    let frame: Bytes = encode(OpCode::Text, payload);
    let mut wbuf = BytesMut::new();
    let batch = 256.min(messages);
    let started = Instant::now();
    let mut delivered = 0u64;
    let mut written = 0u64;
    let mut sent = 0;
    while sent < messages {
        for _ in 0..batch.min(messages - sent) {
            delivered += hub
                .deliver("bench", Some((0, sent as u64)), &frame, None)
                .queued as u64;
            sent += 1;
        }
        // Each session drains its outbox into its write buffer, then "writes" it.
        for rx in &receivers {
            let _ = rx.drain_into(&mut wbuf, usize::MAX, deflate);
            written += wbuf.len() as u64;
            wbuf.clear();
        }
    }
    let elapsed = started.elapsed();
    println!(
        "fanout{label}: {members:>6} members x {messages:>5} messages of {size:>4} B: {delivered:>9} deliveries in {:>7.1} ms = {:>6.2} M deliveries/s, {:>6.0} B written per delivery",
        elapsed.as_secs_f64() * 1e3,
        delivered as f64 / elapsed.as_secs_f64() / 1e6,
        written as f64 / delivered.max(1) as f64
    );
    assert_eq!(
        delivered,
        (members * messages) as u64,
        "every delivery was queued"
    );
}

fn main() {
    for (members, messages) in [(100, 10_000), (1_000, 2_000), (10_000, 256)] {
        run(members, messages, 64);
    }
    run(1_000, 2_000, 4096);
    // About 1 KiB of JSON, as a feed publishes it, to 1,000 members: deflate off, then on.
    let json = format!(
        "{{\"type\":\"publication\",\"channel\":\"prices\",\"offset\":1,\"data\":[{}]}}",
        (0..35)
            .map(|i| format!("{{\"sym\":\"S{i:03}\",\"px\":{}.25}}", 100 + i * 7))
            .collect::<Vec<_>>()
            .join(",")
    );
    let deflate = Deflate {
        level: 1,
        window_bits: 15,
        min_size: 256,
    };
    for _ in 0..2 {
        run_with(1_000, 2_000, json.as_bytes(), None, " deflate=off");
        run_with(1_000, 2_000, json.as_bytes(), Some(deflate), " deflate=on ");
    }
}
