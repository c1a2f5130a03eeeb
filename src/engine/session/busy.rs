//! What a session holds only while it has something to do, and the helpers that reach it.

use std::pin::Pin;

use bytes::BytesMut;
use tokio::time::Sleep;

use super::output::Frames;
use super::{Replies, SessionConfig};
use crate::ws::reader::MessageReader;

/// What a session holds only while it has something to do: its buffers, the parser's state
/// between frames, the queue-to-socket stamp, the write delay's state. Allocated for the
/// welcome, when bytes arrive, when frames are queued or a tick has something to send, and for
/// closing; dropped on the heartbeat tick once all of it is empty, no input is pending and the
/// write delay no longer counts from the last write, so an idle connection's task carries one
/// pointer for it instead of all of it (104 bytes before the write delay's fields, which put
/// every idle connection's task in the next 128-byte size class).
pub(super) struct Busy {
    /// Bytes read and not yet parsed.
    pub(super) rbuf: BytesMut,
    /// Frames waiting for the socket, behind [`Busy::frames`].
    pub(super) wbuf: BytesMut,
    /// Outbox frames waiting for the socket, uncopied, ahead of `wbuf`.
    pub(super) frames: Frames,
    /// The state that spans frames (a fragmented message).
    pub(super) parser: MessageReader,
    /// When the oldest frame waiting for the socket was queued (a
    /// [`stamp_us`](crate::types::clock::stamp_us); 0: none), for the queue-to-socket
    /// latency histogram.
    pub(super) batch_since: u32,
    /// When the last write went out (a [`stamp_us`](crate::types::clock::stamp_us); 0: none
    /// since this state was made), kept only with a write delay.
    pub(super) last_write: u32,
    /// Whether queued frames are held back for more until `timer` fires (the write delay).
    pub(super) held: bool,
    /// The write delay's timer, made the first time frames are held back and reused.
    pub(super) timer: Option<Pin<Box<Sleep>>>,
}

impl Busy {
    /// Whether dropping this loses nothing: a fresh one is the same.
    pub(super) fn is_idle(&self) -> bool {
        self.rbuf.is_empty()
            && self.wbuf.is_empty()
            && self.frames.is_empty()
            && self.batch_since == 0
            && !self.held
            && self.parser.between_messages()
    }
}

/// The session's [`Busy`] state, made when first needed. A function of the two fields rather
/// than a method, so the handler and the outbox stay borrowable beside it.
pub(super) fn busy<'a>(slot: &'a mut Option<Box<Busy>>, config: &SessionConfig) -> &'a mut Busy {
    slot.get_or_insert_with(|| {
        Box::new(Busy {
            rbuf: BytesMut::new(),
            wbuf: BytesMut::new(),
            frames: Frames::default(),
            parser: MessageReader::with_deflate(config.max_message(), config.deflate.is_some()),
            batch_since: 0,
            last_write: 0,
            held: false,
            timer: None,
        })
    })
}

/// Replies into the write buffer.
pub(super) fn replies_in<'a>(
    slot: &'a mut Option<Box<Busy>>,
    config: &SessionConfig,
) -> Replies<'a> {
    Replies {
        buf: &mut busy(slot, config).wbuf,
        count: 0,
        deflate: config.deflate,
    }
}

/// The [`Busy`] state, if it has bytes waiting for the socket.
pub(super) fn pending_write(slot: &Option<Box<Busy>>) -> Option<&Busy> {
    slot.as_deref()
        .filter(|busy| !busy.wbuf.is_empty() || !busy.frames.is_empty())
}
