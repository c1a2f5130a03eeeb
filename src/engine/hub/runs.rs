//! A batch's frames laid end to end ([`SharedFrame::run`]), for the members that take the
//! whole batch.
//!
//! Why: fanning a batch out frame by frame costs, per delivery, a reference count taken on
//! the shared frame, a queue entry, and the same again dropped by the writer; with two worker
//! threads the count also moves between cores. In a profile of burst broadcast to 1,000
//! subscribers that was a third of the server's own work per delivery (issue 19,
//! docs/BENCHMARKS.md). A run is built once per batch, and each member gets one entry and one
//! count per run instead of per frame; its writer sends it as one slice.
//!
//! Only the common case goes as runs: a batch of one epoch with offsets in order and the same
//! member skipped by every frame (a legacy publisher does not get its own messages), to a
//! member that is neither recovering nor gapped and is past the batch in no replay. Anything
//! else goes frame by frame, as before ([`super::deliver_frames`]). A run goes whole or not at
//! all: where the next one does not fit, the rest of the batch goes frame by frame under the
//! same lock of the member's queue, so the queue's limit is met at the same frame either way.

use std::sync::atomic::Ordering;

use super::{Delivery, Member, Outgoing, overflowed, push_frames};
use crate::engine::outbox::Push;
use crate::types::ClientId;
use crate::ws::deflate::SharedFrame;

/// Plain bytes a run holds at most: a batch of large frames goes as several runs, so a
/// writer that may take one entry past its limit takes at most this much more.
const RUN_BYTES: usize = 16 * 1024;

/// Frames a batch needs for runs: building them copies the batch once.
const MIN_FRAMES: usize = 2;

/// Members a batch goes to (the skipped one not counted) for runs: for one, the copy would
/// buy nothing.
const MIN_MEMBERS: usize = 2;

/// What every frame of a batch that can go as runs has in common.
#[derive(Debug, Clone, Copy)]
struct Shape {
    epoch: u64,
    /// The lowest offset (the first: offsets do not go down).
    first: u64,
    skip: Option<ClientId>,
}

/// One batch's runs, built when the first member takes them.
pub(super) struct Runs<'a> {
    batch: &'a [Outgoing],
    frames: &'a [SharedFrame],
    shape: Option<Shape>,
    /// Each run, with the index in the batch just past its last frame.
    runs: Vec<(SharedFrame, usize)>,
}

impl<'a> Runs<'a> {
    /// Runs for `batch` (whose frames are `frames`), fanned out to `members` members.
    pub(super) fn new(batch: &'a [Outgoing], frames: &'a [SharedFrame], members: usize) -> Self {
        let shape = if batch.len() >= MIN_FRAMES {
            shape(batch).filter(|s| members >= MIN_MEMBERS + usize::from(s.skip.is_some()))
        } else {
            None
        };
        Self {
            batch,
            frames,
            shape,
            runs: Vec::new(),
        }
    }

    /// Delivers the whole batch to `member` (neither recovering nor gapped), as runs where
    /// it can; `false` if the batch cannot go as runs to it, and the caller goes frame by
    /// frame (nothing was queued; the member's epoch may have been entered, as it would be).
    pub(super) fn deliver(
        &mut self,
        member: &Member,
        id: ClientId,
        delivery: &mut Delivery,
    ) -> bool {
        let Some(shape) = self.shape else {
            return false;
        };
        if shape.skip == Some(id) {
            return true; // every frame skips this member
        }
        let state = &member.state;
        state.enter_epoch(shape.epoch);
        if shape.first <= state.replayed_through.load(Ordering::Acquire) {
            return false; // part of the batch reached it in a replay
        }
        if self.runs.is_empty() {
            self.runs = build(self.frames);
        }
        let mut pushing = member.outbox.pushing();
        let mut start = 0;
        for (run, end) in &self.runs {
            if state.gapped.load(Ordering::Acquire) {
                break; // a broker's gap, meanwhile: the rest is dropped frame by frame
            }
            match pushing.push_run(run.clone()) {
                Push::Queued => {
                    state.delivered_in_order(self.batch[end - 1].place.1);
                    delivery.queued += end - start;
                    start = *end;
                }
                Push::Closed | Push::NoticeDropped => {
                    delivery.dropped += self.batch.len() - start;
                    return true;
                }
                Push::Full | Push::QueuedOverNotice => break,
            }
        }
        // What did not go as runs: frame by frame under the same lock, up to the queue's
        // limit (dropping notices to make room, as one by one).
        let rest = start..self.batch.len();
        let full = push_frames(
            &mut pushing,
            state,
            id,
            &self.batch[rest.clone()],
            &self.frames[rest],
            delivery,
        );
        drop(pushing);
        if full {
            overflowed(member);
        }
        true
    }
}

/// The shape of a batch that can go as runs: one epoch, offsets that do not go down, one
/// member (or none) skipped by every frame.
fn shape(batch: &[Outgoing]) -> Option<Shape> {
    let first = batch.first()?;
    let mut previous = first.place.1;
    for outgoing in batch {
        if outgoing.place.0 != first.place.0
            || outgoing.skip != first.skip
            || outgoing.place.1 < previous
        {
            return None;
        }
        previous = outgoing.place.1;
    }
    Some(Shape {
        epoch: first.place.0,
        first: first.place.1,
        skip: first.skip,
    })
}

/// The batch's frames as runs of at most [`RUN_BYTES`] (a frame larger than that is a run of
/// its own, as it is), each with the index just past its last frame.
fn build(frames: &[SharedFrame]) -> Vec<(SharedFrame, usize)> {
    let mut runs = Vec::new();
    let (mut start, mut bytes) = (0, 0);
    for (i, frame) in frames.iter().enumerate() {
        let len = frame.plain().len();
        if i > start && bytes + len > RUN_BYTES {
            runs.push((run_of(&frames[start..i]), i));
            (start, bytes) = (i, 0);
        }
        bytes += len;
    }
    runs.push((run_of(&frames[start..]), frames.len()));
    runs
}

fn run_of(frames: &[SharedFrame]) -> SharedFrame {
    match frames {
        [one] => one.clone(),
        _ => SharedFrame::run(frames),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::VecDeque;
    use std::sync::Arc;

    use bytes::Bytes;
    use uuid::Uuid;

    use super::super::{Hub, MemberState};
    use super::*;
    use crate::engine::namespace::SlowPolicy;
    use crate::engine::outbox::{Outbox, OutboxReceiver};
    use crate::ws::close::CloseCode;

    fn member(hub: &Hub, capacity: usize) -> (Outbox, OutboxReceiver, Arc<MemberState>) {
        let (outbox, rx) = Outbox::new(Uuid::new_v4(), capacity);
        let state = MemberState::recovering("room", SlowPolicy::Disconnect, 8);
        hub.subscribe(&outbox, Arc::clone(&state));
        hub.finish_recovery(&state, 0, 0);
        (outbox, rx, state)
    }

    fn batch(frames: &[Bytes], skip: Option<ClientId>) -> Vec<Outgoing> {
        (1..)
            .zip(frames)
            .map(|(offset, frame)| Outgoing {
                place: (7, offset),
                frame: frame.clone(),
                skip,
            })
            .collect()
    }

    #[test]
    fn a_batch_reaches_each_member_as_one_entry_with_the_same_bytes() {
        let hub = Hub::new();
        let (publisher, publisher_rx, _) = member(&hub, 64);
        let (_b, b_rx, b) = member(&hub, 64);
        let (_c, c_rx, _) = member(&hub, 64);
        let frames: Vec<Bytes> = (0..10)
            .map(|i| Bytes::from(format!("frame {i};")))
            .collect();
        let delivery = hub.deliver_batch("room", &batch(&frames, Some(publisher.id())));
        assert_eq!((delivery.queued, delivery.dropped), (20, 0));
        assert_eq!(
            c_rx.drain_frames(&mut VecDeque::new(), usize::MAX, None)
                .count,
            10
        );
        assert!(publisher_rx.is_empty(), "a publisher skips its own");
        let mut out = VecDeque::new();
        let drained = b_rx.drain_frames(&mut out, usize::MAX, None);
        assert_eq!(drained.count, 10, "counted as its frames");
        assert_eq!(out.len(), 1, "one queue entry for the batch");
        assert_eq!(out[0].plain(), &frames.concat()[..]);
        assert_eq!(b.last_offset(), 10);
        assert!(b_rx.is_empty());
    }

    #[test]
    fn a_single_recipient_besides_the_publisher_gets_frames_as_they_are() {
        let hub = Hub::new();
        let (publisher, _publisher_rx, _) = member(&hub, 64);
        let (_b, b_rx, _) = member(&hub, 64);
        let frames: Vec<Bytes> = (0..3).map(|i| Bytes::from(format!("frame {i};"))).collect();
        hub.deliver_batch("room", &batch(&frames, Some(publisher.id())));
        let mut out = VecDeque::new();
        assert_eq!(b_rx.drain_frames(&mut out, usize::MAX, None).count, 3);
        assert_eq!(out.len(), 3, "no run copied for one recipient");
    }

    #[test]
    fn a_queue_filling_part_way_through_a_batch_stops_at_the_same_frame() {
        let hub = Hub::new();
        // 6,000-byte frames: runs of two (16 KiB at most). Room for five: two runs, then
        // one frame by itself, then the slow-client policy.
        let (_a, a_rx, a) = member(&hub, 5);
        let (_b, mut b_rx, _) = member(&hub, 64);
        let frames: Vec<Bytes> = (0..6u8)
            .map(|i| Bytes::from(vec![b'a' + i; 6000]))
            .collect();
        let delivery = hub.deliver_batch("room", &batch(&frames, None));
        assert_eq!((delivery.queued, delivery.dropped), (6 + 5, 1));
        assert_eq!(a_rx.close_requested(), Some(CloseCode::SlowConsumer));
        assert_eq!(a.last_offset(), 5);
        let mut out = VecDeque::new();
        assert_eq!(a_rx.drain_frames(&mut out, usize::MAX, None).count, 5);
        assert_eq!(
            out.iter().map(SharedFrame::frames).collect::<Vec<_>>(),
            [2, 2, 1],
            "two runs, then the fifth frame by itself"
        );
        let sent: Vec<u8> = out.iter().flat_map(|f| f.plain().to_vec()).collect();
        assert_eq!(sent, frames[..5].concat(), "whole frames, in order");
        let got: Vec<Bytes> = std::iter::from_fn(|| b_rx.try_recv()).collect();
        assert_eq!(got, frames, "and one by one");
    }

    #[test]
    fn a_run_that_fills_the_queue_exactly_goes_whole() {
        let hub = Hub::new();
        let (_a, a_rx, _) = member(&hub, 6);
        let (_b, _b_rx, _) = member(&hub, 6);
        let frames: Vec<Bytes> = (0..6u8).map(|i| Bytes::from(vec![i; 10])).collect();
        let delivery = hub.deliver_batch("room", &batch(&frames, None));
        assert_eq!((delivery.queued, delivery.dropped), (12, 0));
        assert_eq!(a_rx.close_requested(), None);
        let mut out = VecDeque::new();
        assert_eq!(a_rx.drain_frames(&mut out, usize::MAX, None).count, 6);
        assert_eq!(out.len(), 1);
    }

    #[test]
    fn notices_make_room_for_the_rest_of_a_batch_one_by_one() {
        let hub = Hub::new();
        let (a, a_rx, _) = member(&hub, 8);
        let (_b, _b_rx, _) = member(&hub, 8);
        for _ in 0..2 {
            assert_eq!(a.try_push_notice(Bytes::from_static(b"join")), Push::Queued);
        }
        let frames: Vec<Bytes> = (0..8u8).map(|i| Bytes::from(vec![i; 10])).collect();
        let delivery = hub.deliver_batch("room", &batch(&frames, None));
        assert_eq!(
            (delivery.queued, delivery.dropped, delivery.notices_dropped),
            (16, 0, 2),
            "the run did not fit; frame by frame, the notices gave way"
        );
        assert_eq!(a_rx.close_requested(), None);
        let mut out = VecDeque::new();
        assert_eq!(a_rx.drain_frames(&mut out, usize::MAX, None).count, 8);
        let sent: Vec<u8> = out.iter().flat_map(|f| f.plain().to_vec()).collect();
        assert_eq!(sent, frames.concat());
    }

    #[test]
    fn a_gone_session_drops_the_batch_and_a_tls_writer_copies_a_run_whole() {
        let hub = Hub::new();
        let (_a, a_rx, _) = member(&hub, 64);
        let (_b, b_rx, _) = member(&hub, 64);
        drop(a_rx);
        let frames: Vec<Bytes> = (0..5u8).map(|i| Bytes::from(vec![i; 10])).collect();
        let delivery = hub.deliver_batch("room", &batch(&frames, None));
        assert_eq!((delivery.queued, delivery.dropped), (5, 5));
        let mut buf = bytes::BytesMut::new();
        assert_eq!(b_rx.drain_into(&mut buf, usize::MAX, None).0, 5);
        assert_eq!(&buf[..], &frames.concat()[..]);
        assert!(b_rx.is_empty());
    }

    #[test]
    fn a_queue_counts_a_run_as_its_frames() {
        let (outbox, rx) = Outbox::new(Uuid::new_v4(), 8);
        let parts: Vec<SharedFrame> = (0..3u8).map(|i| Bytes::from(vec![i; 4]).into()).collect();
        assert_eq!(
            outbox.pushing().push_run(SharedFrame::run(&parts)),
            Push::Queued
        );
        let notice = || SharedFrame::from(Bytes::from_static(b"notice"));
        // Notices stop at half the capacity (4): counted in frames, not queue entries.
        assert_eq!(outbox.try_push_notice(notice()), Push::Queued);
        assert_eq!(outbox.try_push_notice(notice()), Push::NoticeDropped);
        let mut pushing = outbox.pushing();
        assert_eq!(pushing.push_run(SharedFrame::run(&parts)), Push::Queued);
        assert_eq!(
            pushing.push_run(SharedFrame::run(&parts[..2])),
            Push::Full,
            "all or nothing, and no notice dropped for it"
        );
        assert_eq!(pushing.push(parts[0].clone()), Push::Queued);
        assert_eq!(pushing.push(parts[1].clone()), Push::QueuedOverNotice);
        assert_eq!(pushing.push(parts[2].clone()), Push::Full);
        drop(pushing);
        let mut out = VecDeque::new();
        assert_eq!(rx.drain_frames(&mut out, usize::MAX, None).count, 8);
        assert_eq!(out.len(), 4, "two runs and two frames");
        assert!(rx.is_empty());
    }
}
