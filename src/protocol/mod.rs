//! What travels inside WebSocket messages.
//!
//! Today there is one dialect, [`legacy`], the JSON shapes of the original Rusty Socks. Newer
//! dialects are added beside it and dispatched on the `type` field, so legacy clients keep
//! working unchanged on the same endpoint.

pub mod legacy;
