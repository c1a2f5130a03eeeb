//! How publications reach subscribers: the seam between this node and message distribution.
//!
//! A broker is the only part of the server that may know other nodes exist. The in-memory
//! broker ([`memory::MemoryBroker`]) serves a single node; Redis and NATS brokers plug in behind
//! the same trait. History lives with the broker because appending to a channel's history and
//! publishing to it must be atomic with respect to a subscriber joining: a newcomer must get
//! every message exactly once, either in its replay or live, never both and never neither.

pub mod memory;

use std::future::Future;
use std::pin::Pin;

use bytes::Bytes;

use crate::ws::outbox::{ClientId, Outbox};

/// A boxed future returned by broker methods (the trait is used as `Arc<dyn Broker>`).
pub type BrokerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'a>>;

/// A broker could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The backend is unreachable or refused the operation.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
}

/// One message to distribute on a channel.
#[derive(Debug, Clone)]
pub struct Publication {
    /// Channel name.
    pub channel: String,
    /// The complete encoded WebSocket frame, shared by every recipient.
    pub frame: Bytes,
    /// A client that must not receive it (the sender, unless echo is enabled).
    pub skip: Option<ClientId>,
    /// Whether it is appended to the channel's history for replay.
    pub persist: bool,
}

/// Distributes publications to subscribers and keeps channel history.
///
/// Ordering: publications on one channel are delivered to each subscriber in the order
/// `publish` calls completed. Atomicity: `subscribe` and `publish` on the same channel are
/// serialized, so a subscriber sees each persisted publication exactly once, in the replay
/// `subscribe` returns or in its outbox afterwards.
pub trait Broker: Send + Sync + std::fmt::Debug {
    /// Appends `publication` to history if asked, then delivers it to every subscriber.
    fn publish(&self, publication: Publication) -> BrokerFuture<'_, usize>;

    /// Subscribes a local session to `channel` and returns up to `replay` stored frames,
    /// oldest first.
    fn subscribe<'a>(
        &'a self,
        channel: &'a str,
        outbox: Outbox,
        replay: usize,
    ) -> BrokerFuture<'a, Vec<Bytes>>;

    /// Removes a local session from `channel`.
    fn unsubscribe<'a>(&'a self, channel: &'a str, client: ClientId) -> BrokerFuture<'a, ()>;
}
