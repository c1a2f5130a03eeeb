//! Admission control: how many connections may exist, how many may be mid-handshake, and how
//! many sockets one client address may hold.
//!
//! The two global bounds are checked with a compare-and-swap and refuse at once: a client past a
//! bound gets HTTP 503 with `Retry-After` immediately instead of waiting for a slot, so it can
//! tell overload from a network fault and back off, and existing connections are never
//! disturbed. The per-address bound ([`PerAddress`]) is checked first, when a socket is
//! accepted, so one address past its share never takes a global slot (429 instead).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

pub use crate::engine::per_address::{AddressPermit, AddressRefused, PerAddress, address_group};

/// The admission bounds and their counters.
#[derive(Debug)]
pub struct Admission {
    max_connections: usize,
    connections: AtomicUsize,
    max_pending: usize,
    pending: AtomicUsize,
    rejected_total: AtomicU64,
    per_address: Arc<PerAddress>,
}

/// Which bound refused an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overload {
    /// `RUSTY_SOCKS_MAX_CONN` WebSocket connections already exist.
    Connections,
    /// `RUSTY_SOCKS_MAX_QUEUED_TASKS` sockets are already mid-handshake.
    Handshakes,
    /// The client's address already holds `RUSTY_SOCKS_MAX_CONN_PER_IP` sockets (429, not 503:
    /// the server has room, this client has used its share).
    Address,
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
            Self::Address => {
                "too many connections from this address (RUSTY_SOCKS_MAX_CONN_PER_IP); close one or retry later\n"
            }
        }
    }

    /// The HTTP status line this refusal is answered with.
    pub fn status_line(self) -> &'static str {
        match self {
            Self::Connections | Self::Handshakes => "503 Service Unavailable",
            Self::Address => "429 Too Many Requests",
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
    /// Global bounds from the configuration, without a per-address bound.
    pub fn new(max_connections: usize, max_pending: usize) -> Arc<Self> {
        Self::with_per_address(max_connections, max_pending, PerAddress::new(0, 64))
    }

    /// Global bounds and the per-address bound.
    pub fn with_per_address(
        max_connections: usize,
        max_pending: usize,
        per_address: PerAddress,
    ) -> Arc<Self> {
        Arc::new(Self {
            max_connections,
            connections: AtomicUsize::new(0),
            max_pending,
            pending: AtomicUsize::new(0),
            rejected_total: AtomicU64::new(0),
            per_address: Arc::new(per_address),
        })
    }

    /// The per-address bound (`RUSTY_SOCKS_MAX_CONN_PER_IP`).
    pub fn per_address(&self) -> &Arc<PerAddress> {
        &self.per_address
    }

    /// A slot for one WebSocket connection, or the overload that refuses it (counted).
    pub fn try_connection(self: &Arc<Self>) -> Result<ConnectionPermit, Overload> {
        if try_take(&self.connections, self.max_connections) {
            Ok(ConnectionPermit {
                admission: Arc::clone(self),
                address: None,
            })
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

/// Holds one connection slot for as long as the WebSocket session lives, and the socket's
/// count under its address, so both are given back when the session's task ends.
#[derive(Debug)]
pub struct ConnectionPermit {
    admission: Arc<Admission>,
    /// Boxed: the permit lives in every connection's task, and inline the address's 32 bytes
    /// would put an idle chat session's task in the next 128-byte size class (see
    /// `session::tests`); out of line they cost 32 bytes, and only where a per-address limit
    /// is set.
    address: Option<Box<AddressPermit>>,
}

impl ConnectionPermit {
    /// Keeps `address` (the socket's count under its client address) until the session ends.
    pub fn hold(&mut self, address: Option<AddressPermit>) {
        if let Some(address) = address {
            self.address = Some(Box::new(address));
        }
    }
}

impl Drop for ConnectionPermit {
    fn drop(&mut self) {
        self.admission.connections.fetch_sub(1, Ordering::AcqRel);
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
