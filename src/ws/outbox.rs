//! The bounded queue between fan-out and one connection's writer, and the slow-client policy.
//!
//! Fan-out never waits: it `try_send`s an already-encoded frame (a cheap `Bytes` clone). When a
//! connection's queue is full, the client is not keeping up; it is told to close with
//! [`CloseCode::SlowConsumer`] (4001) and every later push to it is dropped. Waiting instead
//! would let one client that stops reading stall every other subscriber, and growing the queue
//! would let it grow the server's memory without bound.

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};

use bytes::Bytes;
use tokio::sync::{Notify, mpsc};
use uuid::Uuid;

use super::close::CloseCode;

/// Identifies one WebSocket connection for its whole life.
pub type ClientId = Uuid;

/// Asks a session to close from outside its task (slow consumer, administrative close).
#[derive(Debug, Default)]
pub struct CloseSignal {
    /// 0 while open; otherwise the [`CloseCode`] index + 1 of the first request.
    requested: AtomicU8,
    notify: Notify,
}

const SIGNAL_CODES: [CloseCode; 3] = [
    CloseCode::SlowConsumer,
    CloseCode::GoingAway,
    CloseCode::InternalError,
];

impl CloseSignal {
    /// Requests a close; only the first request counts. Returns whether this one did.
    pub fn request(&self, code: CloseCode) -> bool {
        let Some(index) = SIGNAL_CODES.iter().position(|c| *c == code) else {
            return false;
        };
        let first = self
            .requested
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
        match self.requested.load(Ordering::Acquire) {
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
}

/// The sending side of one connection's queue, held by the hub.
#[derive(Debug, Clone)]
pub struct Outbox {
    id: ClientId,
    tx: mpsc::Sender<Bytes>,
    signal: Arc<CloseSignal>,
}

/// What happened to one push.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Push {
    /// The frame is queued.
    Queued,
    /// The queue was full (the client was told to close) or the session is gone.
    Dropped,
}

impl Outbox {
    /// A queue of `capacity` frames for client `id`, and its receiving end.
    pub fn new(id: ClientId, capacity: usize) -> (Self, mpsc::Receiver<Bytes>, Arc<CloseSignal>) {
        let (tx, rx) = mpsc::channel(capacity.max(1));
        let signal = Arc::new(CloseSignal::default());
        (
            Self {
                id,
                tx,
                signal: Arc::clone(&signal),
            },
            rx,
            signal,
        )
    }

    /// The client this queue feeds.
    pub fn id(&self) -> ClientId {
        self.id
    }

    /// Queues an encoded frame without waiting; a full queue triggers the slow-client close.
    pub fn push(&self, frame: Bytes) -> Push {
        match self.tx.try_send(frame) {
            Ok(()) => Push::Queued,
            Err(mpsc::error::TrySendError::Full(_)) => {
                if self.signal.request(CloseCode::SlowConsumer) {
                    tracing::info!(client_id = %self.id, "closing slow consumer: outbox full");
                }
                Push::Dropped
            }
            Err(mpsc::error::TrySendError::Closed(_)) => Push::Dropped,
        }
    }

    /// Whether a close was requested (by overflow or otherwise).
    pub fn is_closing(&self) -> bool {
        self.signal.requested().is_some()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn overflow_requests_a_slow_consumer_close_once() {
        let (outbox, mut rx, signal) = Outbox::new(Uuid::new_v4(), 2);
        assert_eq!(outbox.push(Bytes::from_static(b"1")), Push::Queued);
        assert_eq!(outbox.push(Bytes::from_static(b"2")), Push::Queued);
        assert!(!outbox.is_closing());
        assert_eq!(outbox.push(Bytes::from_static(b"3")), Push::Dropped);
        assert_eq!(signal.wait().await, CloseCode::SlowConsumer);
        assert!(!signal.request(CloseCode::GoingAway), "first request wins");
        assert_eq!(rx.recv().await.as_deref(), Some(&b"1"[..]));
    }
}
