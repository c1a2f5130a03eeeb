//! What a session has waiting for its socket: frames taken from the outbox, still shared and
//! uncopied, followed by the session's write buffer (its own replies, pings, notices, and
//! outbox frames copied in while that buffer already held something).
//!
//! On a transport that writes several slices per system call (plain TCP), the frames go to
//! the kernel straight from the bytes every subscriber shares: no copy per connection, and no
//! per-connection buffer that grows with a slow client. At 10,000 subscribers those copies
//! were 40-60 KB per connection in flight, hundreds of megabytes touched fresh during a burst
//! (page faults, cache misses; docs/BENCHMARKS.md, "Vectored writes").
//!
//! Order: everything in [`Frames`] was queued before anything in the write buffer. Frames move
//! here only while the write buffer is empty; once it holds something, later outbox frames are
//! copied in behind it, as they were before.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::{self, IoSlice};
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};

use crate::engine::outbox::OutboxReceiver;
use crate::ws::deflate::{Deflate, SharedFrame};
use crate::ws::transport::Transport;

/// Most slices one write hands the kernel (Linux accepts up to 1,024).
const MAX_SLICES: usize = 256;
/// Frames this large on average go to the kernel as they are, one slice each (`writev`).
/// Smaller ones are gathered into the worker's scratch buffer first: the kernel copies a
/// short slice several times slower than a long one (71-92 ns per 171-byte frame measured,
/// against 18-23 ns for the same bytes in one piece), while copying them into a buffer that
/// stays in cache costs a few nanoseconds.
const GATHER_BELOW: usize = 1024;
/// The most one gathered write carries. A burst's write carries 150-250 small frames,
/// 30-50 KB; the scratch buffer stays in the worker's cache.
const SCRATCH: usize = 64 * 1024;

thread_local! {
    /// Each worker's scratch buffer for gathered writes (see [`GATHER_BELOW`]): one per
    /// thread, not one per connection, and only for the length of one write.
    static SCRATCH_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Outbox frames waiting for the socket, in order, uncopied.
#[derive(Debug, Default)]
pub(super) struct Frames {
    queue: VecDeque<SharedFrame>,
    /// Bytes of the first frame already written.
    written: usize,
    /// Bytes not yet written.
    bytes: usize,
    /// Bytes the queued frames keep alive (their plain form, which a compressed frame keeps
    /// too): what the high mark bounds.
    held: usize,
}

impl Frames {
    /// Bytes the queued frames keep alive, for the high mark: at least what is left to
    /// write, more when the frames go out compressed.
    pub(super) fn len(&self) -> usize {
        self.held
    }

    pub(super) fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Moves frames from the outbox while fewer than `limit` bytes wait here (at least one, if
    /// fewer wait already);
    /// returns how many and since when the oldest waited.
    pub(super) fn take(
        &mut self,
        outbox: &OutboxReceiver,
        limit: usize,
        deflate: Option<Deflate>,
    ) -> (u64, u32) {
        if !self.is_empty() && self.held >= limit {
            return (0, 0);
        }
        let room = limit.saturating_sub(self.held);
        let drained = outbox.drain_frames(&mut self.queue, room, deflate);
        self.bytes += drained.sent;
        self.held += drained.held;
        (drained.count, drained.since)
    }

    /// Accounts for `n` written bytes; returns how many of them lay beyond the frames (in the
    /// write buffer that follows them).
    fn advance(&mut self, mut n: usize, deflate: Option<Deflate>) -> usize {
        while n > 0 {
            let Some(front) = self.queue.front() else {
                break;
            };
            let left = front.for_connection(deflate).len() - self.written;
            if n < left {
                self.written += n;
                self.bytes -= n;
                return 0;
            }
            n -= left;
            self.bytes -= left;
            self.written = 0;
            self.held -= front.plain().len();
            self.queue.pop_front();
        }
        n
    }

    /// What is left to write of each frame, in order: the first from where the last write
    /// stopped, the others whole.
    fn unwritten(&self, deflate: Option<Deflate>) -> impl Iterator<Item = &[u8]> {
        self.queue.iter().enumerate().map(move |(i, frame)| {
            let bytes = frame.for_connection(deflate);
            if i == 0 {
                &bytes[self.written..]
            } else {
                bytes
            }
        })
    }

    /// Gives back the queue's slots once it is empty.
    pub(super) fn release(&mut self) {
        if self.queue.is_empty() && self.queue.capacity() > 0 {
            self.queue = VecDeque::new();
        }
    }

    /// Copies what is left of the frames in front of `wbuf`, so that one buffer holds all
    /// that waits (closing writes a single buffer).
    pub(super) fn flatten_into(&mut self, wbuf: &mut BytesMut, deflate: Option<Deflate>) {
        if self.queue.is_empty() {
            return;
        }
        let mut all = BytesMut::with_capacity(self.bytes + wbuf.len());
        for bytes in self.unwritten(deflate) {
            all.extend_from_slice(bytes);
        }
        all.extend_from_slice(wbuf);
        *wbuf = all;
        self.queue.clear();
        self.written = 0;
        self.bytes = 0;
        self.held = 0;
    }
}

/// Writes some of what waits, frames first, then `wbuf`, waiting for the socket to take it.
pub(super) fn poll_write<T: Transport>(
    io: &T,
    cx: &mut Context<'_>,
    frames: &Frames,
    wbuf: &BytesMut,
    deflate: Option<Deflate>,
) -> Poll<io::Result<usize>> {
    if frames.is_empty() {
        return io.poll_write(cx, wbuf);
    }
    if frames.bytes < GATHER_BELOW.saturating_mul(frames.queue.len()) {
        // Gathered only once the socket can take them: a socket that is full costs no copy.
        ready!(io.poll_write_ready(cx))?;
        return SCRATCH_BUF.with_borrow_mut(|scratch| {
            scratch.clear();
            scratch.reserve(SCRATCH);
            gather(frames, wbuf, deflate, scratch);
            io.poll_write(cx, scratch)
        });
    }
    let mut slices = [IoSlice::new(&[]); MAX_SLICES];
    let mut n = 0;
    for (slot, bytes) in slices.iter_mut().zip(frames.unwritten(deflate)) {
        *slot = IoSlice::new(bytes);
        n += 1;
    }
    if n < MAX_SLICES && !wbuf.is_empty() {
        slices[n] = IoSlice::new(wbuf);
        n += 1;
    }
    io.poll_write_vectored(cx, &slices[..n])
}

/// Copies what waits, in order, into `out` until it holds [`SCRATCH`] bytes.
fn gather(frames: &Frames, wbuf: &BytesMut, deflate: Option<Deflate>, out: &mut Vec<u8>) {
    let rest = frames.unwritten(deflate);
    for bytes in rest.chain(std::iter::once(&wbuf[..])) {
        let room = SCRATCH.saturating_sub(out.len());
        if bytes.len() >= room {
            out.extend_from_slice(&bytes[..room]);
            return;
        }
        out.extend_from_slice(bytes);
    }
}

/// Accounts for `n` bytes that [`poll_write`] wrote.
pub(super) fn advance(
    frames: &mut Frames,
    wbuf: &mut BytesMut,
    n: usize,
    deflate: Option<Deflate>,
) {
    let rest = frames.advance(n, deflate);
    wbuf.advance(rest);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::outbox::Outbox;
    use bytes::Bytes;

    fn frame(text: &str) -> SharedFrame {
        SharedFrame::new(Bytes::copy_from_slice(text.as_bytes()))
    }

    /// A transport that takes at most `per_call` bytes per write, gathering slices the way
    /// `writev` does, into `sent`.
    struct Trickle {
        per_call: usize,
        sent: std::sync::Mutex<Vec<u8>>,
    }

    impl Transport for Trickle {
        fn poll_read_ready(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Pending
        }
        fn try_read_buf(&self, _: &mut BytesMut) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn try_read(&self, _: &mut [u8]) -> io::Result<usize> {
            Err(io::ErrorKind::WouldBlock.into())
        }
        fn poll_write(&self, _: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
            let n = buf.len().min(self.per_call);
            self.sent
                .lock()
                .expect("not poisoned")
                .extend_from_slice(&buf[..n]);
            Poll::Ready(Ok(n))
        }
        fn writes_vectored(&self) -> bool {
            true
        }
        fn poll_write_vectored(
            &self,
            _: &mut Context<'_>,
            bufs: &[IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let mut sent = self.sent.lock().expect("not poisoned");
            let mut n = 0;
            for buf in bufs {
                let take = buf.len().min(self.per_call - n);
                sent.extend_from_slice(&buf[..take]);
                n += take;
                if n == self.per_call {
                    break;
                }
            }
            Poll::Ready(Ok(n))
        }
        fn poll_shutdown(&mut self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Writes everything that waits, `per_call` bytes at a time; returns what the socket got.
    fn write_all(frames: &mut Frames, wbuf: &mut BytesMut, per_call: usize) -> Vec<u8> {
        let io = Trickle {
            per_call,
            sent: std::sync::Mutex::new(Vec::new()),
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut calls = 0;
        while frames.len() + wbuf.len() > 0 {
            let Poll::Ready(Ok(n)) = poll_write(&io, &mut cx, frames, wbuf, None) else {
                panic!("the trickle always takes something");
            };
            advance(frames, wbuf, n, None);
            calls += 1;
            assert!(calls < 10_000, "no progress");
        }
        assert!(frames.is_empty());
        io.sent.into_inner().expect("not poisoned")
    }

    #[test]
    fn frames_then_the_buffer_arrive_whole_and_in_order_across_partial_writes() {
        for per_call in [1, 2, 3, 5, 7, 64, 1000] {
            let (outbox, rx) = Outbox::new(uuid::Uuid::new_v4(), 64);
            for text in ["alpha", "", "bravo-charlie", "d"] {
                let _ = outbox.try_push(frame(text));
            }
            let mut frames = Frames::default();
            assert_eq!(frames.take(&rx, usize::MAX, None).0, 4);
            assert_eq!(frames.len(), 19);
            let mut wbuf = BytesMut::from(&b"+reply"[..]);
            let sent = write_all(&mut frames, &mut wbuf, per_call);
            assert_eq!(sent, b"alphabravo-charlied+reply", "per_call {per_call}");
            assert_eq!(frames.len(), 0);
            assert!(wbuf.is_empty());
        }
    }

    #[test]
    fn take_stops_at_the_room_but_moves_at_least_one_frame() {
        let (outbox, rx) = Outbox::new(uuid::Uuid::new_v4(), 64);
        for text in ["0123456789", "abcdefghij", "KLMNOPQRST"] {
            let _ = outbox.try_push(frame(text));
        }
        let mut frames = Frames::default();
        assert_eq!(frames.take(&rx, 0, None).0, 1, "at least one");
        assert_eq!(
            frames.take(&rx, 15, None).0,
            1,
            "10 bytes wait: room for one more"
        );
        assert_eq!(frames.len(), 20);
        assert_eq!(frames.take(&rx, 20, None).0, 0, "20 bytes wait: none");
        assert_eq!(frames.take(&rx, 100, None).0, 1);
        assert!(rx.is_empty());
        assert_eq!(frames.len(), 30);
    }

    #[test]
    fn more_large_frames_than_one_writev_takes_need_several_writes() {
        let count = MAX_SLICES + 40;
        let (outbox, rx) = Outbox::new(uuid::Uuid::new_v4(), 2 * count);
        let mut expected = Vec::new();
        for i in 0..count {
            let text = format!("<{i}>").repeat(GATHER_BELOW / 4 + 1);
            expected.extend_from_slice(text.as_bytes());
            let _ = outbox.try_push(frame(&text));
        }
        let mut frames = Frames::default();
        assert_eq!(frames.take(&rx, usize::MAX, None).0, count as u64);
        let mut wbuf = BytesMut::from(&b"end"[..]);
        expected.extend_from_slice(b"end");
        let io = Trickle {
            per_call: usize::MAX,
            sent: std::sync::Mutex::new(Vec::new()),
        };
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let Poll::Ready(Ok(n)) = poll_write(&io, &mut cx, &frames, &wbuf, None) else {
            panic!("the trickle always takes something");
        };
        let first_slices: usize = expected.len() - b"end".len();
        assert!(
            n < first_slices,
            "one writev carries at most {MAX_SLICES} frames"
        );
        advance(&mut frames, &mut wbuf, n, None);
        let mut sent = io.sent.into_inner().expect("not poisoned");
        sent.extend(write_all(&mut frames, &mut wbuf, usize::MAX));
        assert_eq!(sent, expected, "the buffer only after the last frame");
    }

    #[test]
    fn more_than_the_scratch_buffer_takes_several_gathered_writes() {
        let (outbox, rx) = Outbox::new(uuid::Uuid::new_v4(), 4096);
        let mut expected = Vec::new();
        let mut i = 0;
        while expected.len() < 3 * SCRATCH {
            let text = format!("[{i:0>100}]");
            expected.extend_from_slice(text.as_bytes());
            let _ = outbox.try_push(frame(&text));
            i += 1;
        }
        let mut frames = Frames::default();
        frames.take(&rx, usize::MAX, None);
        let mut wbuf = BytesMut::from(&b"!"[..]);
        expected.push(b'!');
        assert_eq!(write_all(&mut frames, &mut wbuf, usize::MAX), expected);
    }

    #[test]
    fn flattening_keeps_the_unwritten_rest_in_front_of_the_buffer() {
        let (outbox, rx) = Outbox::new(uuid::Uuid::new_v4(), 64);
        let _ = outbox.try_push(frame("hello"));
        let _ = outbox.try_push(frame("world"));
        let mut frames = Frames::default();
        frames.take(&rx, usize::MAX, None);
        let mut wbuf = BytesMut::from(&b"!"[..]);
        advance(&mut frames, &mut wbuf, 3, None);
        frames.flatten_into(&mut wbuf, None);
        assert!(frames.is_empty());
        assert_eq!(frames.len(), 0);
        assert_eq!(&wbuf[..], b"loworld!");
    }
}
