//! Micro-benchmark of the fan-out path, in process: one channel with N members, M frames
//! delivered through `Hub::deliver`, every outbox drained into a write buffer as a session
//! would. No sockets: this isolates the hub, the outboxes and the copy into write buffers, so
//! a regression there shows up in review.
//!
//! Run: `cargo bench --bench fanout` (CI builds it with `cargo bench --no-run`).

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use rusty_socks::engine::hub::{Hub, MemberState};
use rusty_socks::engine::namespace::SlowPolicy;
use rusty_socks::engine::outbox::Outbox;
use rusty_socks::ws::frame::{OpCode, encode};
use uuid::Uuid;

fn run(members: usize, messages: usize, size: usize) {
    let hub = Hub::new();
    let mut receivers = Vec::with_capacity(members);
    for _ in 0..members {
        let (outbox, rx) = Outbox::new(Uuid::new_v4(), 1024);
        let state = MemberState::recovering("bench", SlowPolicy::Disconnect, 1024);
        hub.subscribe(&outbox, Arc::clone(&state));
        hub.finish_recovery(&state, 0, 0);
        receivers.push(rx);
    }
    let frame: Bytes = encode(OpCode::Text, &vec![b'x'; size]);
    let mut wbuf = BytesMut::new();
    let batch = 256.min(messages);
    let started = Instant::now();
    let mut delivered = 0u64;
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
            let _ = rx.drain_into(&mut wbuf, usize::MAX);
            wbuf.clear();
        }
    }
    let elapsed = started.elapsed();
    println!(
        "fanout: {members:>6} members x {messages:>5} messages of {size:>4} B: {delivered:>9} deliveries in {:>7.1} ms = {:>6.2} M deliveries/s",
        elapsed.as_secs_f64() * 1e3,
        delivered as f64 / elapsed.as_secs_f64() / 1e6
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
}
