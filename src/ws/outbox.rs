//! The bounded queue between fan-out and one connection's writer, and the signals that travel
//! beside it.
//!
//! Fan-out never waits: it `try_send`s an already-encoded frame (a cheap `Bytes` clone). When a
//! connection's queue is full, the client is not keeping up, and the hub applies the channel's
//! slow-client policy: close the connection with [`CloseCode::SlowConsumer`] (4001), or, on a
//! `gap` namespace, drop that channel's frames and report a gap once the queue has drained.
//! Waiting instead would let one client that stops reading stall every other subscriber, and
//! growing the queue would let it grow the server's memory without bound.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use super::close::CloseCode;
use crate::hub::MemberState;

/// Identifies one WebSocket connection for its whole life.
pub type ClientId = Uuid;

/// Requests that reach a session from outside its task.
#[derive(Debug, Default)]
pub struct Signals {
    /// 0 while open; otherwise the index + 1 in [`SIGNAL_CODES`] of the first close request.
    close: AtomicU8,
    notify: Notify,
    gap_notify: Notify,
    has_gaps: AtomicBool,
    gaps: Mutex<Vec<Arc<MemberState>>>,
}

/// The close codes that can be requested from outside a session.
const SIGNAL_CODES: [CloseCode; 3] = [
    CloseCode::SlowConsumer,
    CloseCode::GoingAway,
    CloseCode::InternalError,
];

impl Signals {
    /// Requests a close; only the first request counts. Returns whether this one did.
    pub fn close(&self, code: CloseCode) -> bool {
        let Some(index) = SIGNAL_CODES.iter().position(|c| *c == code) else {
            return false;
        };
        let first = self
            .close
            .compare_exchange(0, index as u8 + 1, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if first {
            // notify_one stores a permit, so a session not yet waiting still sees it.
            self.notify.notify_one();
        }
        first
    }

    /// The close requested so far, if any.
    pub fn requested(&self) -> Option<CloseCode> {
        match self.close.load(Ordering::Acquire) {
            0 => None,
            n => SIGNAL_CODES.get(usize::from(n) - 1).copied(),
        }
    }

    /// Resolves once a close has been requested.
    pub async fn wait(&self) -> CloseCode {
        loop {
            if let Some(code) = self.requested() {
                return code;
            }
            self.notify.notified().await;
        }
    }

    /// Whether a gap is waiting to be reported.
    pub fn has_gaps(&self) -> bool {
        self.has_gaps.load(Ordering::Acquire)
    }

    /// Takes the memberships whose gaps must be reported now.
    pub fn take_gaps(&self) -> Vec<Arc<MemberState>> {
        if !self.has_gaps() {
            return Vec::new();
        }
        let mut gaps = self
            .gaps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        self.has_gaps.store(false, Ordering::Release);
        std::mem::take(&mut *gaps)
    }

    fn report_gap(&self, state: Arc<MemberState>) {
        let mut gaps = self
            .gaps
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        gaps.push(state);
        self.has_gaps.store(true, Ordering::Release);
        // Wake the session: if its outbox is already empty, nothing else would.
        self.gap_notify.notify_one();
    }

    /// Resolves when a gap has been reported since the last call.
    pub async fn gap_reported(&self) {
        self.gap_notify.notified().await;
    }
}

/// The sending side of one connection's queue, held by the hub.
#[derive(Debug, Clone)]
pub struct Outbox {
    id: ClientId,
    tx: mpsc::Sender<Bytes>,
    signals: Arc<Signals>,
}

/// What happened to one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// The frame is queued.
    Queued,
    /// The queue is full: the client is not keeping up.
    Full,
    /// The session is gone.
    Closed,
}

impl Outbox {
    /// A queue of `capacity` frames for client `id`, and its receiving end.
    pub fn new(id: ClientId, capacity: usize) -> (Self, mpsc::Receiver<Bytes>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        (
            Self {
                id,
                tx,
                signals: Arc::default(),
            },
            rx,
        )
    }

    /// The client this queue feeds.
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// The session's signals.
    pub fn signals(&self) -> &Arc<Signals> {
        &self.signals
    }

    /// Queues an encoded frame without waiting.
    pub fn try_push(&self, frame: Bytes) -> Push {
        match self.tx.try_send(frame) {
            Ok(()) => Push::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => Push::Full,
            Err(mpsc::error::TrySendError::Closed(_)) => Push::Closed,
        }
    }

    /// Asks the session to close with `code` (the first request wins).
    pub fn close(&self, code: CloseCode) {
        if self.signals.close(code) {
            tracing::info!(client_id = %self.id, code = code.code(), reason = code.reason(), "closing connection");
        }
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        self.signals.requested().is_some()
    }

    /// Records that a membership overflowed on a `gap` namespace.
    pub fn report_gap(&self, state: Arc<MemberState>) {
        tracing::debug!(client_id = %self.id, channel = %state.channel, "outbox overflow: gap");
        self.signals.report_gap(state);
    }

    /// Takes the gaps to report (see [`Signals::take_gaps`]).
    pub fn take_gaps(&self) -> Vec<Arc<MemberState>> {
        self.signals.take_gaps()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn only_the_first_close_request_counts() {
        let (outbox, mut rx) = Outbox::new(Uuid::new_v4(), 1);
        assert_eq!(outbox.try_push(Bytes::from_static(b"1")), Push::Queued);
        assert_eq!(outbox.try_push(Bytes::from_static(b"2")), Push::Full);
        assert!(!outbox.is_closing());
        outbox.close(CloseCode::SlowConsumer);
        outbox.close(CloseCode::GoingAway);
        assert_eq!(outbox.signals().wait().await, CloseCode::SlowConsumer);
        assert_eq!(rx.recv().await.as_deref(), Some(&b"1"[..]));
        drop(rx);
        assert_eq!(outbox.try_push(Bytes::new()), Push::Closed);
    }
}
