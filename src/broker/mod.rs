//! How publications reach every node: the seam between this node and message distribution.
//!
//! A broker is the only part of the server that may know other nodes exist. The in-memory
//! broker ([`memory::MemoryBroker`]) serves a single node; Redis and NATS brokers plug in behind
//! the same trait, and [`conformance`] is the test suite every implementation must pass.
//!
//! History lives with the broker because assigning an offset, appending to history and
//! delivering must be one atomic step per channel: that is what lets a subscriber recover
//! exactly what it missed.

pub mod conformance;
pub mod memory;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde::Serialize;
use serde_json::value::RawValue;

use crate::history::{HistoryLimits, Publication, StreamPosition};
use crate::ws::outbox::ClientId;

/// A boxed future returned by broker methods (the trait is used as `Arc<dyn Broker>`).
pub type BrokerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'a>>;

/// A broker could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The backend is unreachable or refused the operation.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// Who is subscribed: one entry per connection.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ClientInfo {
    /// The connection.
    pub client_id: ClientId,
    /// The authenticated user, if any (`null` for anonymous connections).
    pub user: Option<Arc<str>>,
}

/// What to publish.
#[derive(Debug, Clone)]
pub struct PublishRequest {
    /// The JSON value, verbatim.
    pub data: Arc<RawValue>,
    /// The publishing connection, if a client published it.
    pub client_id: Option<ClientId>,
    /// History bounds of the channel's namespace.
    pub history: HistoryLimits,
}

/// What `history` returns: the stream's current position and the requested publications.
#[derive(Debug, Clone)]
pub struct HistoryPage {
    /// Where the stream is now (taken atomically with `publications`).
    pub position: StreamPosition,
    /// Oldest first.
    pub publications: Vec<Publication>,
}

/// Where a broker delivers what was published: the node's dispatcher.
///
/// Called synchronously by the memory broker while it holds the channel's lock, and from a
/// receive task by networked brokers; implementations must not block.
pub trait BrokerEvents: Send + Sync {
    /// A publication on a channel this node subscribed to, in offset order.
    fn on_publication(&self, channel: &str, publication: &Publication);
    /// A client joined a channel this node subscribed to.
    fn on_join(&self, channel: &str, client: &ClientInfo);
    /// A client left a channel this node subscribed to.
    fn on_leave(&self, channel: &str, client: &ClientInfo);
}

/// Distributes publications, keeps history and presence.
///
/// Contract (checked by [`conformance`]):
/// - `publish` assigns the channel's next offset (1, 2, 3, ... with no gap or reuse within an
///   epoch), appends to history within the request's limits, and delivers to every subscribed
///   node's [`BrokerEvents`] in offset order. It returns the new position.
/// - `subscribe`/`unsubscribe` are per node and per channel: a node subscribes when its first
///   local subscriber arrives and unsubscribes when the last leaves. Calls are counted, so a
///   racing "last leaves" and "first arrives" commute: delivery continues while the node has
///   made more `subscribe` than `unsubscribe` calls.
/// - `history` returns the current position and, atomically with it, the publications after
///   `since` (at most `limit`, oldest first) or, without `since`, the newest `limit`.
/// - Presence is a set of [`ClientInfo`] per channel; join/leave are delivered like
///   publications but never stored.
pub trait Broker: Send + Sync + std::fmt::Debug {
    /// Publishes on `channel` and returns its new position.
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        request: PublishRequest,
    ) -> BrokerFuture<'a, StreamPosition>;
    /// Starts delivering `channel` to this node.
    fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()>;
    /// Stops delivering `channel` to this node.
    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()>;
    /// Reads history; see the trait docs.
    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<u64>,
        limit: usize,
    ) -> BrokerFuture<'a, HistoryPage>;
    /// Adds (or refreshes) a presence entry.
    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()>;
    /// Removes a presence entry.
    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> BrokerFuture<'a, ()>;
    /// Everyone present on `channel`.
    fn presence<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, Vec<ClientInfo>>;
    /// Announces a join to every subscribed node.
    fn publish_join<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()>;
    /// Announces a leave to every subscribed node.
    fn publish_leave<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()>;
}
