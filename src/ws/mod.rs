//! RFC 6455: the handshake's accept key, frames, the message reader, close codes, and the
//! transports a session reads and writes through. Knows bytes only: no JSON, no sessions, no
//! server.
//!
//! The server speaks RFC 6455 with its own small codec ([`frame`], [`reader`]) instead of a
//! general-purpose library; `docs/ARCHITECTURE.md` explains why.

pub mod close;
pub mod deflate;
pub mod frame;
pub mod handshake;
pub mod reader;
pub mod transport;
