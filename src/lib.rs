//! Rusty Socks: a real-time WebSocket messaging server.
//!
//! # Layers
//! Each module uses only the ones listed before it (checked by `tests/layers_test.rs`; drawn
//! in `docs/ARCHITECTURE.md`):
//! - [`types`]: plain shared types (client ids, positions, channel names, client errors).
//! - [`ws`]: RFC 6455 (handshake, frames, reader, close codes, transports); bytes only.
//! - [`protocol`]: the JSON dialects carried in messages: legacy and v1.
//! - [`auth`]: connection tokens (JWT) and the identities they carry.
//! - [`broker`]: channels and publications across nodes (memory, Redis, NATS), history.
//! - [`engine`]: hub, node, sessions, outboxes; the chat and echo endpoints' behaviour.
//! - [`settings`]: every `RUSTY_SOCKS_*` setting, read and validated in one place.
//! - [`server`]: accept loop, HTTP, upgrade, admission, TLS, server API, metrics, demo;
//!   `main` prepares with [`server::Prepared`], tests call [`server::run`].

pub mod auth;
pub mod broker;
pub mod engine;
pub mod protocol;
pub mod server;
pub mod settings;
pub mod types;
pub mod ws;
