//! Rusty Socks: a real-time WebSocket messaging server.
//!
//! # Layout
//! - [`config`]: settings from `RUSTY_SOCKS_*` variables, validated at startup.
//! - [`server`]: accept loop, per-socket HTTP serving, graceful shutdown; [`server::run`] is
//!   the entry point for `main` and tests.
//! - [`http`]: routes (`/health`, `/stats`, `/ws`, `/echo`) and the status of every refusal.
//! - [`admission`]: the connection and handshake bounds (HTTP 503 past them).
//! - [`ws`]: the WebSocket stack: handshake, frame codec, message reader, one task per
//!   session, bounded outboxes, close codes, and the endpoints' handlers.
//! - [`protocol`]: JSON dialects carried in messages (today: the legacy one).
//! - [`hub`]: local sessions by channel; fan-out.
//! - [`broker`]: the distribution seam (in-memory now; Redis/NATS later).
//! - [`store`]: stored messages for replay.
//! - [`stats`]: counters for `/stats`.
//! - [`error`]: client mistakes and their error codes.

pub mod admission;
pub mod broker;
pub mod config;
pub mod error;
pub mod http;
pub mod hub;
pub mod protocol;
pub mod server;
pub mod stats;
pub mod store;
pub mod ws;
