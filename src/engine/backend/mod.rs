//! Calls to the application's backend: the HTTP client they share.

pub mod client;

pub use client::{BackendClient, BackendError, BackendResponse, BackendUrl, ClientOptions};
