//! Admission control: how many connections may exist and how many may be mid-handshake.
//!
//! Both bounds are checked with a compare-and-swap and refuse at once: a client past a bound
//! gets HTTP 503 with `Retry-After` immediately instead of waiting for a slot, so it can tell
//! overload from a network fault and back off, and existing connections are never disturbed.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

/// The two admission bounds and their counters.
#[derive(Debug)]
pub struct Admission {
    max_connections: usize,
    connections: AtomicUsize,
    max_pending: usize,
    pending: AtomicUsize,
    rejected_total: AtomicU64,
}

/// Which bound refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// `RUSTY_SOCKS_MAX_CONN` WebSocket connections already exist.
    Connections,
    /// `RUSTY_SOCKS_MAX_QUEUED_TASKS` sockets are already mid-handshake.
    Handshakes,
}

impl Overload {
    /// Body of the 503 response.
    pub fn message(self) -> &'static str {
        match self {
            Self::Connections => {
                "server at its connection limit (RUSTY_SOCKS_MAX_CONN); retry later\n"
            }
            Self::Handshakes => {
                "too many connection attempts in progress (RUSTY_SOCKS_MAX_QUEUED_TASKS); retry later\n"
            }
        }
    }
}

fn try_take(counter: &AtomicUsize, max: usize) -> bool {
    counter
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
            (n < max).then_some(n + 1)
        })
        .is_ok()
}

impl Admission {
    /// Bounds from the configuration.
    pub fn new(max_connections: usize, max_pending: usize) -> Arc<Self> {
        Arc::new(Self {
            max_connections,
            connections: AtomicUsize::new(0),
            max_pending,
            pending: AtomicUsize::new(0),
            rejected_total: AtomicU64::new(0),
        })
    }

    /// A slot for one WebSocket connection, or the overload that refuses it (counted).
    pub fn try_connection(self: &Arc<Self>) -> Result<ConnectionPermit, Overload> {
        if try_take(&self.connections, self.max_connections) {
            Ok(ConnectionPermit(Arc::clone(self)))
        } else {
            self.rejected_total.fetch_add(1, Ordering::Relaxed);
            Err(Overload::Connections)
        }
    }

    /// A slot for one socket whose HTTP request has not arrived yet, or the overload.
    pub fn try_handshake(self: &Arc<Self>) -> Result<HandshakePermit, Overload> {
        if try_take(&self.pending, self.max_pending) {
            Ok(HandshakePermit {
                admission: Arc::clone(self),
                released: AtomicBool::new(false),
            })
        } else {
            self.rejected_total.fetch_add(1, Ordering::Relaxed);
            Err(Overload::Handshakes)
        }
    }

    /// Open WebSocket connections.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }

    /// Sockets mid-handshake.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    /// Attempts refused by either bound since startup.
    pub fn rejected_total(&self) -> u64 {
        self.rejected_total.load(Ordering::Relaxed)
    }

    /// `RUSTY_SOCKS_MAX_CONN`.
    pub fn max_connections(&self) -> usize {
        self.max_connections
    }

    /// `RUSTY_SOCKS_MAX_QUEUED_TASKS`.
    pub fn max_pending(&self) -> usize {
        self.max_pending
    }
}

/// Holds one connection slot for as long as the WebSocket session lives.
#[derive(Debug)]
pub struct ConnectionPermit(Arc<Admission>);

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Holds one handshake slot until the request headers have arrived or the socket is gone.
#[derive(Debug)]
pub struct HandshakePermit {
    admission: Arc<Admission>,
    released: AtomicBool,
}

impl HandshakePermit {
    /// Gives the slot back now (idempotent); called when the request has been read.
    pub fn release(&self) {
        if !self.released.swap(true, Ordering::AcqRel) {
            self.admission.pending.fetch_sub(1, Ordering::AcqRel);
        }
    }
}

impl Drop for HandshakePermit {
    fn drop(&mut self) {
        self.release();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounds_refuse_at_once_and_count() {
        let a = Admission::new(1, 1);
        let c = a.try_connection().expect("first");
        assert_eq!(a.try_connection().err(), Some(Overload::Connections));
        drop(c);
        assert!(a.try_connection().is_ok());
        let h = a.try_handshake().expect("first");
        assert_eq!(a.try_handshake().err(), Some(Overload::Handshakes));
        h.release();
        h.release();
        assert_eq!(a.pending(), 0);
        drop(h);
        assert_eq!(a.pending(), 0, "release then drop frees the slot once");
        assert_eq!(a.rejected_total(), 2);
    }
}
