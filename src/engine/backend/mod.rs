//! Calls to the application's backend: the HTTP client they share ([`client`]), the
//! connect/subscribe/publish proxy ([`proxy`]) and its metrics ([`stats`]).

pub mod client;
pub mod proxy;
pub mod stats;

pub use client::{BackendClient, BackendError, BackendResponse, BackendUrl, ClientOptions};
pub use proxy::{ConnectRefusal, ConnectRequest, Proxy, ProxyOptions};
