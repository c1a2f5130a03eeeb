//! Unit tests of the outbox: limits, notices, wake-ups and size.

use super::*;

/// Every connection holds one outbox for its whole life: past 96 bytes (112 with the
/// reference counts) it lands in the allocator's next size class, 128 bytes.
#[test]
fn an_outbox_fits_the_112_byte_size_class() {
    let size = std::mem::size_of::<Shared>() + 2 * std::mem::size_of::<usize>();
    assert!(size <= 112, "{size} bytes with the reference counts");
}

#[tokio::test]
async fn queues_up_to_capacity_and_wakes_on_the_first_frame() {
    let (outbox, rx) = Outbox::new(uuid::Uuid::new_v4(), 2);
    assert_eq!(outbox.try_push(Bytes::from_static(b"1")), Push::Queued);
    std::future::poll_fn(|cx| rx.poll_woken(cx)).await;
    assert_eq!(outbox.try_push(Bytes::from_static(b"2")), Push::Queued);
    assert_eq!(outbox.try_push(Bytes::from_static(b"3")), Push::Full);
    let mut buf = BytesMut::new();
    assert_eq!(rx.drain_into(&mut buf, 1, None).0, 1, "stops at the limit");
    assert_eq!(rx.drain_into(&mut buf, 100, None).0, 1);
    assert_eq!(&buf[..], b"12");
    assert!(rx.is_empty());
    drop(rx);
    assert_eq!(outbox.try_push(Bytes::new()), Push::Closed);
}

#[test]
fn notices_fill_half_the_queue_at_most_and_make_room_for_publications() {
    let (outbox, mut rx) = Outbox::new(uuid::Uuid::new_v4(), 4);
    assert_eq!(
        outbox.try_push_notice(Bytes::from_static(b"n1")),
        Push::Queued
    );
    assert_eq!(outbox.try_push(Bytes::from_static(b"p1")), Push::Queued);
    assert_eq!(
        outbox.try_push_notice(Bytes::from_static(b"n2")),
        Push::NoticeDropped,
        "half full: no more notices"
    );
    assert_eq!(outbox.try_push(Bytes::from_static(b"p2")), Push::Queued);
    assert_eq!(outbox.try_push(Bytes::from_static(b"p3")), Push::Queued);
    assert_eq!(
        outbox.try_push(Bytes::from_static(b"p4")),
        Push::QueuedOverNotice,
        "the notice gives way"
    );
    assert_eq!(outbox.try_push(Bytes::from_static(b"p5")), Push::Full);
    let got: Vec<Bytes> = std::iter::from_fn(|| rx.try_recv()).collect();
    assert_eq!(got, [&b"p1"[..], b"p2", b"p3", b"p4"]);
    assert_eq!(
        outbox.try_push_notice(Bytes::from_static(b"n3")),
        Push::Queued
    );
}

/// Whether `rx` was woken, without waiting.
fn woken(rx: &OutboxReceiver) -> bool {
    let waker = futures_util::task::noop_waker();
    rx.poll_woken(&mut Context::from_waker(&waker)).is_ready()
}

/// Pushes `frame` inside `batch`, as a handler would.
async fn push_held(batch: &mut WakeBatch, outbox: &Outbox, frame: &'static [u8]) {
    batch
        .hold(async {
            assert_eq!(outbox.try_push(Bytes::from_static(frame)), Push::Queued);
        })
        .await;
}

#[tokio::test]
async fn a_batch_holds_wake_ups_until_released_and_frames_are_queued_at_once() {
    let (outbox, rx) = Outbox::new(uuid::Uuid::new_v4(), 8);
    let mut batch = WakeBatch::default();
    push_held(&mut batch, &outbox, b"1").await;
    assert!(!woken(&rx), "held back");
    assert!(!rx.is_empty(), "but queued");
    push_held(&mut batch, &outbox, b"2").await;
    batch.release();
    assert!(woken(&rx), "released");
    let mut buf = BytesMut::new();
    assert_eq!(rx.drain_into(&mut buf, usize::MAX, None).0, 2);
    // Outside a batch, a push wakes at once again.
    assert_eq!(outbox.try_push(Bytes::from_static(b"3")), Push::Queued);
    assert!(woken(&rx));
}

#[tokio::test]
async fn a_batch_releases_before_its_future_waits_and_when_dropped() {
    let (outbox, rx) = Outbox::new(uuid::Uuid::new_v4(), 8);
    let mut batch = WakeBatch::default();
    batch
        .hold(async {
            assert_eq!(outbox.try_push(Bytes::from_static(b"1")), Push::Queued);
            // Suspended: nothing may stay held while the task waits.
            tokio::task::yield_now().await;
            assert!(woken(&rx), "released when the future had to wait");
        })
        .await;
    let mut buf = BytesMut::new();
    rx.drain_into(&mut buf, usize::MAX, None);
    push_held(&mut batch, &outbox, b"2").await;
    assert!(!woken(&rx));
    drop(batch);
    assert!(woken(&rx), "released when dropped");
}

#[tokio::test]
async fn only_the_first_close_request_counts_and_it_wakes() {
    let (outbox, rx) = Outbox::new(uuid::Uuid::new_v4(), 1);
    outbox.close(CloseCode::SlowConsumer);
    outbox.close(CloseCode::GoingAway);
    std::future::poll_fn(|cx| rx.poll_woken(cx)).await;
    assert_eq!(rx.close_requested(), Some(CloseCode::SlowConsumer));
    assert!(outbox.is_closing());
}
