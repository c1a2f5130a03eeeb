//! What travels inside WebSocket messages.
//!
//! Two dialects share `/ws`: [`legacy`], the JSON shapes of the original Rusty Socks, and
//! [`v1`], channels with presence and history. They are told apart by the `type` field, so
//! legacy clients keep working unchanged.

pub mod legacy;
pub mod v1;
