//! Rusty Socks: a real-time WebSocket messaging server.
//!
//! # Layout
//! - [`config`]: settings from `RUSTY_SOCKS_*` variables, validated at startup.
//! - [`server`]: accept loop, per-socket HTTP serving, graceful shutdown; [`server::run`] is
//!   the entry point for `main` and tests.
//! - [`http`]: routes (`/health`, `/stats`, `/ws`, `/echo`) and the status of every refusal.
//! - [`admission`]: the connection and handshake bounds (HTTP 503 past them).
//! - [`sessions`]: every live session, for the heartbeat tick and shutdown.
//! - [`ws`]: the WebSocket stack: handshake, frame codec, message reader, one task per
//!   session, bounded outboxes, close codes, and the endpoints' handlers.
//! - [`protocol`]: JSON dialects carried in messages: legacy and v1.
//! - [`node`]: wires hub and broker; subscribe with loss-free recovery, publish, presence.
//! - [`hub`]: local members by channel; fan-out, recovery buffers, gaps.
//! - [`broker`]: the distribution seam (in-memory now; Redis/NATS later) and its
//!   conformance suite.
//! - [`history`]: stream positions (offset, epoch) and bounded history.
//! - [`namespace`]: channel names and per-namespace options.
//! - [`stats`]: counters for `/stats`.
//! - [`error`]: client mistakes and their error codes.

pub mod admission;
pub mod api;
pub mod auth;
pub mod broker;
pub mod config;
pub mod demo;
pub mod error;
pub mod history;
pub mod http;
pub mod hub;
pub mod limits;
pub mod metrics;
pub mod namespace;
pub mod node;
pub mod protocol;
pub mod server;
pub mod sessions;
pub mod stats;
pub mod tls;
pub mod ws;
