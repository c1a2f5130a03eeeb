//! Unit tests of the hub: fan-out, recovery buffers, gaps and slow members.

use super::*;
use uuid::Uuid;

fn member(
    hub: &Hub,
    channel: &str,
    capacity: usize,
    policy: SlowPolicy,
) -> (
    Outbox,
    crate::engine::outbox::OutboxReceiver,
    Arc<MemberState>,
) {
    let (outbox, rx) = Outbox::new(Uuid::new_v4(), capacity);
    let state = MemberState::recovering(channel, policy, 8);
    hub.subscribe(&outbox, Arc::clone(&state));
    hub.finish_recovery(&state, 0, 0);
    (outbox, rx, state)
}

#[tokio::test]
async fn delivers_to_members_but_the_skipped_one() {
    let hub = Hub::new();
    let (a, mut ra, _) = member(&hub, "room", 4, SlowPolicy::Disconnect);
    let (_b, mut rb, _) = member(&hub, "room", 4, SlowPolicy::Disconnect);
    let d = hub.deliver(
        "room",
        Some((0, 1)),
        &Bytes::from_static(b"x"),
        Some(a.id()),
    );
    assert_eq!(
        d,
        Delivery {
            queued: 1,
            dropped: 0,
            notices_dropped: 0,
        }
    );
    assert_eq!(rb.try_recv().as_deref(), Some(&b"x"[..]));
    assert!(ra.try_recv().is_none());
    assert_eq!(
        hub.deliver("other", None, &Bytes::new(), None),
        Delivery::default()
    );
}

#[test]
fn first_and_last_members_are_reported() {
    let hub = Hub::new();
    let (outbox, _rx) = Outbox::new(Uuid::new_v4(), 1);
    let state = MemberState::recovering("room", SlowPolicy::Disconnect, 1);
    assert!(matches!(
        hub.subscribe(&outbox, Arc::clone(&state)),
        Joined::First(_)
    ));
    assert!(matches!(hub.subscribe(&outbox, state), Joined::Already));
    let (_b, _rb, _) = member(&hub, "room", 1, SlowPolicy::Disconnect);
    assert_eq!(hub.channel_count(), 1);
    assert_eq!(hub.member_count("room"), 2);
    assert_eq!(hub.unsubscribe("room", outbox.id()), Left::Removed);
    assert_eq!(hub.unsubscribe("room", outbox.id()), Left::NotMember);
    assert_eq!(hub.unsubscribe("room", _b.id()), Left::Last);
    assert_eq!(hub.channel_count(), 0);
}

#[tokio::test]
async fn later_members_wait_for_the_first_ones_broker_subscription() {
    let hub = Hub::new();
    let (a, _ra) = Outbox::new(Uuid::new_v4(), 1);
    let (b, _rb) = Outbox::new(Uuid::new_v4(), 1);
    let Joined::First(first) =
        hub.subscribe(&a, MemberState::recovering("c", SlowPolicy::Disconnect, 1))
    else {
        panic!("first member");
    };
    let Joined::Added(second) =
        hub.subscribe(&b, MemberState::recovering("c", SlowPolicy::Disconnect, 1))
    else {
        panic!("second member");
    };
    let waiting = tokio::spawn(async move { second.wait().await });
    tokio::task::yield_now().await;
    assert!(
        !waiting.is_finished(),
        "waits while the broker subscription is pending"
    );
    first.set(true);
    assert!(waiting.await.expect("waiter"));
}

#[test]
fn recovering_members_buffer_until_recovery_ends() {
    let hub = Hub::new();
    let (outbox, mut rx) = Outbox::new(Uuid::new_v4(), 4);
    let state = MemberState::recovering("room", SlowPolicy::Disconnect, 8);
    hub.subscribe(&outbox, Arc::clone(&state));
    hub.deliver("room", Some((0, 7)), &Bytes::from_static(b"7"), None);
    assert!(rx.try_recv().is_none(), "buffered, not queued");
    let buffered = hub.finish_recovery(&state, 0, 0);
    assert_eq!(buffered, vec![(Some((0, 7)), Bytes::from_static(b"7"))]);
    hub.deliver("room", Some((0, 8)), &Bytes::from_static(b"8"), None);
    assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"8")));
}

#[test]
fn a_late_live_copy_of_a_replayed_publication_is_dropped_until_a_gap() {
    let hub = Hub::new();
    let (_outbox, mut rx, state) = member(&hub, "room", 8, SlowPolicy::Gap);
    // Recovery replayed 1..=5; a networked broker's live delivery of 5 comes afterwards.
    state.replayed_through(5);
    hub.deliver("room", Some((0, 5)), &Bytes::from_static(b"5"), None);
    hub.deliver("room", Some((0, 6)), &Bytes::from_static(b"6"), None);
    assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"6")));
    assert!(rx.try_recv().is_none(), "5 reached the client twice");
    // A gap of its own (an overflow) keeps the bound: late copies may still come.
    state.clear_gap();
    hub.deliver("room", Some((0, 4)), &Bytes::from_static(b"4"), None);
    assert!(rx.try_recv().is_none(), "4 was replayed");
    // After a broker's gap the client recovers by itself, and a restarted stream counts
    // from 1.
    hub.gap("room", false);
    state.clear_gap();
    hub.deliver("room", Some((0, 1)), &Bytes::from_static(b"1"), None);
    assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"1")));
}

#[test]
fn a_publication_of_another_epoch_is_never_taken_for_a_late_copy() {
    let hub = Hub::new();
    let (outbox, mut rx) = Outbox::new(Uuid::new_v4(), 8);
    let state = MemberState::recovering("room", SlowPolicy::Gap, 8);
    hub.subscribe(&outbox, Arc::clone(&state));
    let (old, new) = (epoch_tag("old"), epoch_tag("new"));
    assert_ne!(old, new);
    assert_eq!(epoch_tag(""), 0);
    hub.finish_recovery(&state, old, 5);
    hub.deliver("room", Some((old, 5)), &Bytes::from_static(b"o5"), None);
    assert!(rx.try_recv().is_none(), "a late copy of the replay");
    hub.deliver("room", Some((old, 6)), &Bytes::from_static(b"o6"), None);
    assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"o6")));
    assert_eq!(state.last_offset(), 6);
    // The stream restarted: offsets 1 and 2 of the new epoch are new publications.
    hub.deliver("room", Some((new, 1)), &Bytes::from_static(b"n1"), None);
    hub.deliver("room", Some((new, 2)), &Bytes::from_static(b"n2"), None);
    assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"n1")));
    assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"n2")));
    assert_eq!(state.last_offset(), 2, "counted in the new epoch");
    // Recovered at a channel's start (`{0, ""}`): its first publication is delivered.
    let (outbox, mut rx) = Outbox::new(Uuid::new_v4(), 8);
    let state = MemberState::recovering("fresh", SlowPolicy::Gap, 8);
    hub.subscribe(&outbox, Arc::clone(&state));
    hub.finish_recovery(&state, epoch_tag(""), 0);
    hub.deliver("fresh", Some((new, 1)), &Bytes::from_static(b"n1"), None);
    assert_eq!(rx.try_recv(), Some(Bytes::from_static(b"n1")));
}

#[test]
fn overflow_disconnects_or_gaps_by_policy() {
    let hub = Hub::new();
    let (slow, _keep, _) = member(&hub, "d", 1, SlowPolicy::Disconnect);
    let frame = Bytes::from_static(b"m");
    assert_eq!(hub.deliver("d", Some((0, 1)), &frame, None).queued, 1);
    assert_eq!(hub.deliver("d", Some((0, 2)), &frame, None).dropped, 1);
    assert!(slow.is_closing());

    let (gappy, mut rx, state) = member(&hub, "g", 1, SlowPolicy::Gap);
    assert_eq!(hub.deliver("g", Some((0, 1)), &frame, None).queued, 1);
    assert_eq!(hub.deliver("g", Some((0, 2)), &frame, None).dropped, 1);
    assert!(!gappy.is_closing(), "gap policy keeps the connection");
    assert_eq!(state.last_offset(), 1);
    assert!(state.is_gapped());
    assert!(gappy.take_gap_report(), "the gap is reported");
    assert!(!gappy.take_gap_report(), "once");
    // Room again, but the gap is not reported yet: still dropped.
    let _ = rx.try_recv();
    assert_eq!(hub.deliver("g", Some((0, 3)), &frame, None).dropped, 1);
    state.clear_gap();
    assert_eq!(hub.deliver("g", Some((0, 4)), &frame, None).queued, 1);
    assert_eq!(state.last_offset(), 4);
}

#[test]
fn notices_never_make_a_slow_consumer_in_the_outbox_or_the_recovery_buffer() {
    let hub = Hub::new();
    let (_live, live_rx, _) = member(&hub, "n", 4, SlowPolicy::Disconnect);
    // Recovering: a buffer of 8, so at most 4 notices.
    let (outbox, rx) = Outbox::new(Uuid::new_v4(), 4);
    let recovering = MemberState::recovering("n", SlowPolicy::Disconnect, 8);
    hub.subscribe(&outbox, Arc::clone(&recovering));
    let notice = Bytes::from_static(b"leave");
    let mut dropped = 0;
    for _ in 0..10 {
        dropped += hub.deliver("n", None, &notice, None).notices_dropped;
    }
    assert_eq!(
        dropped,
        (10 - 2) + (10 - 4),
        "2 fit the outbox, 4 the buffer"
    );
    for offset in 1..=8 {
        hub.deliver("n", Some((0, offset)), &Bytes::from_static(b"p"), None);
    }
    assert_eq!(live_rx.close_requested(), Some(CloseCode::SlowConsumer));
    assert_eq!(
        rx.close_requested(),
        None,
        "the buffer's notices made room for 8 publications"
    );
    let buffered = hub.finish_recovery(&recovering, 0, 0);
    let offsets: Vec<Option<u64>> = buffered.iter().map(|(p, _)| p.map(|p| p.1)).collect();
    assert_eq!(offsets, (1..=8).map(Some).collect::<Vec<_>>());
    hub.deliver("n", Some((0, 9)), &Bytes::from_static(b"p"), None);
    assert_eq!(rx.close_requested(), None);
}

fn outgoing(offset: u64, skip: Option<ClientId>) -> Outgoing {
    Outgoing {
        place: (0, offset),
        frame: Bytes::from(offset.to_string()),
        skip,
    }
}

#[test]
fn a_batch_reaches_every_member_in_order_but_each_publisher_skips_its_own() {
    let hub = Hub::new();
    let (a, mut ra, _) = member(&hub, "room", 8, SlowPolicy::Disconnect);
    let (b, mut rb, _) = member(&hub, "room", 8, SlowPolicy::Disconnect);
    let (_c, mut rc, _) = member(&hub, "room", 8, SlowPolicy::Disconnect);
    let batch = [
        outgoing(1, Some(a.id())),
        outgoing(2, Some(b.id())),
        outgoing(3, None),
    ];
    let d = hub.deliver_batch("room", &batch);
    assert_eq!(d.queued, 7);
    let drain = |rx: &mut crate::engine::outbox::OutboxReceiver| {
        std::iter::from_fn(|| rx.try_recv()).collect::<Vec<_>>()
    };
    assert_eq!(drain(&mut ra), [Bytes::from("2"), Bytes::from("3")]);
    assert_eq!(drain(&mut rb), [Bytes::from("1"), Bytes::from("3")]);
    assert_eq!(
        drain(&mut rc),
        [Bytes::from("1"), Bytes::from("2"), Bytes::from("3")]
    );
    assert_eq!(hub.deliver_batch("other", &batch), Delivery::default());
}

#[test]
fn a_batch_keeps_the_per_member_rules_recovery_late_copies_and_overflow() {
    let hub = Hub::new();
    // Recovering: buffered, in order, for the merge after its replay.
    let (outbox, mut recovering_rx) = Outbox::new(Uuid::new_v4(), 8);
    let recovering = MemberState::recovering("room", SlowPolicy::Disconnect, 8);
    hub.subscribe(&outbox, Arc::clone(&recovering));
    // Replayed through 2: the batch's copies of 1 and 2 are late.
    let (_l, mut late_rx, late) = member(&hub, "room", 8, SlowPolicy::Gap);
    late.replayed_through(2);
    // Room for two frames on a gap namespace: the third makes a gap, the rest is dropped.
    let (_s, mut slow_rx, slow) = member(&hub, "room", 2, SlowPolicy::Gap);
    let batch: Vec<Outgoing> = (1..=4).map(|o| outgoing(o, None)).collect();
    hub.deliver_batch("room", &batch);
    assert!(recovering_rx.try_recv().is_none(), "buffered, not queued");
    let buffered = hub.finish_recovery(&recovering, 0, 0);
    assert_eq!(
        buffered
            .iter()
            .map(|(p, _)| p.map_or(0, |(_, offset)| offset))
            .collect::<Vec<_>>(),
        [1, 2, 3, 4]
    );
    assert_eq!(late_rx.try_recv(), Some(Bytes::from("3")));
    assert_eq!(late_rx.try_recv(), Some(Bytes::from("4")));
    assert!(late_rx.try_recv().is_none());
    assert_eq!(slow_rx.try_recv(), Some(Bytes::from("1")));
    assert_eq!(slow_rx.try_recv(), Some(Bytes::from("2")));
    assert!(slow_rx.try_recv().is_none());
    assert!(slow.gapped.load(Ordering::Acquire), "the overflow is a gap");
}

/// Every subscription holds one `MemberState` for its whole life (every legacy connection
/// has one, for the default channel). mimalloc v2, the default allocator, serves exactly 80
/// bytes from its 80-byte class and 81-96 from the 96-byte one (measured: 20,000 blocks of
/// each size, docs/BENCHMARKS.md "Idle memory, fourth pass"), so with its reference counts
/// the state must stay within 80 bytes.
#[test]
fn a_membership_fits_the_80_byte_size_class() {
    let size = std::mem::size_of::<MemberState>() + 2 * std::mem::size_of::<usize>();
    assert!(size <= 80, "{size} bytes with the reference counts");
}
