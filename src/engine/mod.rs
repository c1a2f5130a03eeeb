//! The engine: ties the WebSocket codec, the JSON protocol and the broker together.
//!
//! - [`node`]: channels through the broker; subscribe with loss-free recovery, publish,
//!   presence; the [`node::Dispatcher`] that receives what the broker delivers.
//! - [`control`]: control messages between nodes, applied once and recovered after a gap.
//! - [`hub`]: this node's members by channel; fan-out, recovery buffers, gaps.
//! - [`session`]: one task per connection, driving the codec; [`chat`] and [`echo`] are what
//!   the `/ws` and `/echo` endpoints do with its messages.
//! - [`outbox`]: the bounded queue between fan-out and one connection.
//! - [`sessions`]: every live session, for the heartbeat tick and shutdown.
//! - [`admission`]: the connection and handshake bounds; [`per_address`]: sockets per client
//!   address.
//! - [`namespace`]: per-namespace channel options.
//! - [`stats`]: counters for `/stats` and `/metrics`; [`load`]: whether the server is
//!   saturated (its CPU time).
//! - [`webhook`]: channel, member and client events POSTed to the backend, at least once.
//! - [`backend`]: calls to the application's backend (HTTP client, proxy).
//! - [`transitions`]: this node's part in cluster-wide transitions (webhook events).

pub mod admission;
pub mod backend;
pub mod chat;
pub mod control;
pub mod echo;
pub mod hub;
pub mod load;
pub mod namespace;
pub mod node;
#[cfg(test)]
mod node_tests;
#[cfg(test)]
mod open_tests;
pub mod outbox;
pub mod per_address;
pub mod session;
pub mod sessions;
pub mod stats;
pub mod transitions;
pub mod webhook;
