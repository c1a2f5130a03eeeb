//! How publications reach every node: the seam between this node and message distribution.
//!
//! A broker is the only part of the server that may know other nodes exist. The in-memory
//! broker ([`memory::MemoryBroker`]) serves a single node; the Redis and NATS brokers (cargo
//! features `redis` and `nats`) connect several nodes through those servers. All of them
//! implement the same trait, and [`conformance`] is the test suite every one must pass.
//!
//! History lives with the broker because assigning an offset, appending to history and
//! delivering must be one atomic step per channel: that is what lets a subscriber recover
//! exactly what it missed.

#[cfg(any(feature = "redis", feature = "nats"))]
pub mod batch;
pub mod cluster_cases;
pub mod conformance;
pub mod durable;
pub mod guard;
pub mod history;
pub mod local;
pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;
pub mod transition;
pub mod wire;

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde_json::value::RawValue;

pub use crate::types::ClientInfo;
use crate::types::{ClientId, Publication, StreamPosition};
use history::HistoryLimits;
pub use transition::{Holding, Swept, Transition, TransitionKind, TransitionSink};

/// A boxed future returned by broker methods (the trait is used as `Arc<dyn Broker>`).
pub type BrokerFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, BrokerError>> + Send + 'a>>;

/// A broker could not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    /// The backend is unreachable or refused the operation.
    #[error("broker unavailable: {0}")]
    Unavailable(String),
    /// The publication cannot be stored: `RUSTY_SOCKS_DATA_MAX_BYTES` is reached or the disk
    /// is full. Nothing was published; delivery and reads go on.
    #[error("{0}")]
    StorageFull(String),
    /// The data directory cannot be used at startup (the message names the setting).
    #[error("{0}")]
    Storage(String),
    /// The broker could not be reached at startup (the server does not start).
    #[error("RUSTY_SOCKS_BROKER: cannot connect to {url}: {reason}")]
    Connect {
        /// The configured URL, without credentials.
        url: String,
        /// What went wrong.
        reason: String,
    },
}

/// How a broker is doing, for `/health` and `/stats`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BrokerStatus {
    /// `memory`, `redis` or `nats`.
    pub kind: &'static str,
    /// Whether live delivery from the backend is up. While it is not, publishing fails with
    /// an error reply and `/health` answers 503; it never silently falls back to one node.
    pub connected: bool,
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
    /// Makes a retried publish safe: see [`Idempotency`].
    pub idempotency: Option<Idempotency>,
}

/// An idempotency key on a publish. A publisher that got no answer (a timeout, `unavailable`)
/// cannot know whether its publication was stored; retrying with the same key is safe: the
/// same key on the same channel within `window` returns the first publish's position and
/// publishes nothing. A key is remembered only within the stream's epoch it was used in, so
/// it never returns an offset of another life of the channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Idempotency {
    /// The client's key (1 to 128 bytes, no control characters; checked by the protocol).
    pub key: String,
    /// How long the key is remembered (`RUSTY_SOCKS_IDEMPOTENCY_WINDOW`). The NATS broker
    /// uses its stream's duplicate window instead, set from the same setting.
    pub window: Duration,
}

/// What a publish did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Published {
    /// The publication's position: a new one, or the first publish's for a duplicate.
    pub position: StreamPosition,
    /// The idempotency key was seen before: nothing was published this time.
    pub duplicate: bool,
}

impl Published {
    /// A publication that was stored and delivered now.
    pub fn new(position: StreamPosition) -> Self {
        Self {
            position,
            duplicate: false,
        }
    }
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
    /// A publication on a channel this node subscribed to, in offset order, with the epoch of
    /// the stream it belongs to: a subscriber that read the channel before its first
    /// publication (position `{offset: 0, epoch: ""}`) learns the epoch from it, and one that
    /// outlived a restart can tell the new stream's offsets from the old one's.
    fn on_publication(&self, channel: &str, epoch: &str, publication: &Publication);
    /// Several publications of one channel and epoch, in offset order, delivered together:
    /// a node with many subscribers on the channel then touches each of them once for all of
    /// them (see `Hub::deliver_batch`). The default hands them over one by one.
    fn on_publications(&self, channel: &str, epoch: &str, publications: &[Publication]) {
        for publication in publications {
            self.on_publication(channel, epoch, publication);
        }
    }
    /// A client joined a channel this node subscribed to.
    fn on_join(&self, channel: &str, client: &ClientInfo);
    /// A client left a channel this node subscribed to.
    fn on_leave(&self, channel: &str, client: &ClientInfo);
    /// Publications on `channel` may have been missed (the broker connection dropped, or the
    /// channel's stream restarted). Local subscribers must be told, so they can recover the
    /// missed ones from history; live delivery goes on.
    fn on_gap(&self, channel: &str);
}

/// [`Broker::publish_batch`] one request after another (the default, and the memory broker
/// with a data directory, where each publish waits for its own log record).
pub async fn publish_one_by_one<B: Broker + ?Sized>(
    broker: &B,
    channel: &str,
    requests: Vec<PublishRequest>,
) -> Result<Vec<Result<Published, BrokerError>>, BrokerError> {
    let mut results = Vec::with_capacity(requests.len());
    for request in requests {
        results.push(broker.publish(channel, request).await);
    }
    Ok(results)
}

/// Distributes publications, keeps history and presence.
///
/// Contract (checked by [`conformance`]):
/// - `publish` assigns the channel's next offset (1, 2, 3, ... with no gap or reuse within an
///   epoch), appends to history within the request's limits, and delivers to every subscribed
///   node's [`BrokerEvents`] in offset order. It returns the new position. With an
///   [`Idempotency`] key already used on the channel within its window (and in the current
///   epoch), it does none of that and returns the first publish's position as a duplicate.
/// - `subscribe`/`unsubscribe` are per node and per channel: a node subscribes when its first
///   local subscriber arrives and unsubscribes when the last leaves. Calls are counted, so a
///   racing "last leaves" and "first arrives" commute: delivery continues while the node has
///   made more `subscribe` than `unsubscribe` calls.
/// - `history` returns the current position and, atomically with it, the publications after
///   `since` (at most `limit`, oldest first) or, without `since`, the newest `limit`.
/// - Presence is a set of [`ClientInfo`] per channel; join/leave are delivered like
///   publications but never stored. Networked brokers expire a node's entries when the node
///   stops refreshing them (it died), so presence has no ghosts.
/// - Nothing is lost silently: if live delivery may have missed publications, the broker calls
///   [`BrokerEvents::on_gap`] for every affected channel once it can deliver again.
/// - Transitions (the webhooks' `channel_occupied`, `channel_vacated`, `member_added`,
///   `member_removed`): a node `track`s each [`Holding`] it gains (its first local subscriber
///   of a channel, a user's first local subscription to a presence channel) and loses. The
///   broker keeps, per holding, the set of nodes that hold it; the call that makes the set
///   non-empty or empty returns the transition, so exactly one node in the cluster reports
///   each one. Every decision carries a `seq`, assigned atomically with it and increasing
///   across the cluster (per broker prefix), and an id derived from it. A repeated call for
///   the same state changes nothing and decides nothing new: networked brokers, whose answers
///   can be lost after they applied a call, remember each node's last call per holding (for
///   twice the presence TTL) and return the same decision (same `seq`, same id) to the
///   repeat, so a caller that retries a failed call with the same state reports the decision
///   once; the memory broker answers in process and returns nothing for a repeat. A call
///   older than the node's last one (stuck on a dropped connection) is refused. `sweep`,
///   called periodically, refreshes this node's heartbeat and claims dead nodes (no heartbeat
///   for the presence TTL) atomically, one survivor each; the transitions their holdings
///   cause are kept in the broker, pending for the claimer, and every sweep returns all that
///   are pending: the caller hands them on, and the next sweep acknowledges (removes) what the
///   last one returned. So a claim whose answer is lost, or a sweep cut short, loses nothing,
///   and a claimer that dies before acknowledging has its pending transitions taken over by
///   whoever claims it (same ids). A node declared dead that comes back is told to track
///   everything again ([`Swept::rejoined`]). The memory broker with a data directory treats
///   its own previous life as the dead node: its first sweep returns the releases of what that
///   life held when it ended, and forgets them once [`Broker::claimed_stored`] says they are
///   stored durably.
pub trait Broker: Send + Sync + std::fmt::Debug {
    /// Publishes on `channel` and returns its new position (or a duplicate's first one).
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        request: PublishRequest,
    ) -> BrokerFuture<'a, Published>;
    /// Publishes `requests` on `channel` in their order, each as [`Broker::publish`] would,
    /// and returns one result per request, in the same order. A request that fails does not
    /// stop the ones after it. Networked brokers send them back to back on one connection
    /// and then wait for the answers ([`Broker::pipelines_publish`]): the publications reach
    /// every node's subscription together, so the receiving node delivers them in one batch
    /// instead of one round trip each. `Err` fails every request alike (the deadline passed,
    /// the broker is known down): whether any was stored is then unknown, as for a publish
    /// whose answer was lost. The default publishes one after another.
    fn publish_batch<'a>(
        &'a self,
        channel: &'a str,
        requests: Vec<PublishRequest>,
    ) -> BrokerFuture<'a, Vec<Result<Published, BrokerError>>> {
        Box::pin(publish_one_by_one(self, channel, requests))
    }
    /// Whether [`Broker::publish_batch`] is worth gathering messages for: `true` where a
    /// publish waits for a round trip to another server (one pipeline instead of one round
    /// trip each), and for the memory broker without a data directory, which appends a batch
    /// under one lock of the channel and hands it to the node in one go, fanned out member by
    /// member ([`BrokerEvents::on_publications`]). The default `false`: a connection's
    /// messages go one by one, as they come.
    fn pipelines_publish(&self) -> bool {
        false
    }
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
    /// Records whether this node holds `holding` and returns the transition if this call
    /// moved the cluster-wide state (the first holder arrived, or the last one left), or if
    /// an earlier call of this node for the same state did (see the trait docs).
    fn track<'a>(
        &'a self,
        holding: &'a Holding,
        held: bool,
    ) -> BrokerFuture<'a, Option<Transition>>;
    /// Acknowledges what the last sweep returned, refreshes this node's heartbeat, claims
    /// dead nodes' holdings and returns every pending claimed transition; see the trait docs.
    /// A single-node broker has nothing to do (the default).
    fn sweep(&self) -> BrokerFuture<'_, Swept> {
        Box::pin(std::future::ready(Ok(Swept::default())))
    }
    /// The transitions the last [`Broker::sweep`] returned are with the sink now; `durably`
    /// says whether they survive a crash there ([`TransitionSink::on_transitions_stored`]). A
    /// broker that keeps its own record of them until then (the memory broker: what its
    /// previous life held, in `RUSTY_SOCKS_DATA_DIR`) forgets it on `true` and keeps it on
    /// `false` (reported again after the next restart: a duplicate, never a loss). Nothing to
    /// do for the others (the default).
    fn claimed_stored(&self, durably: bool) -> BrokerFuture<'_, ()> {
        let _ = durably;
        Box::pin(std::future::ready(Ok(())))
    }
    /// Whether a release (`track(_, false)` that decided a transition) must be confirmed with
    /// [`Broker::release_stored`] once its event is stored: the memory broker with a data
    /// directory keeps a holding in its journal until then, so a crash between the decision and
    /// the event reaching the webhook queue's disk releases it again after the restart instead
    /// of losing the event. `false` for the others (the default).
    fn keeps_releases(&self) -> bool {
        false
    }
    /// The release of `holding` that `track` decided is with the sink; `durably` says whether it
    /// survives a crash there. See [`Broker::keeps_releases`]; nothing to do by default.
    fn release_stored<'a>(&'a self, holding: &'a Holding, durably: bool) -> BrokerFuture<'a, ()> {
        let _ = (holding, durably);
        Box::pin(std::future::ready(Ok(())))
    }
    /// How often the node calls [`Broker::sweep`] (networked brokers: a third of the
    /// presence TTL, so a live node never looks dead).
    fn sweep_every(&self) -> Duration {
        Duration::from_secs(1)
    }
    /// Where the broker stands now.
    fn status(&self) -> BrokerStatus;
    /// Checks that the backend answers (Redis `PING`, a NATS flush and a JetStream request).
    /// [`guard::Guarded`] probes with it every second.
    fn ping(&self) -> BrokerFuture<'_, ()> {
        Box::pin(std::future::ready(Ok(())))
    }
    /// After an outage: compares every subscribed channel's stream with what this node
    /// delivered last, and calls [`BrokerEvents::on_gap`] itself for each one that moved (or
    /// that it cannot check). `Ok(true)` means the broker took that on for every channel, so
    /// the caller reports nothing: done before returning (Redis), or started for every channel
    /// and finished by the channel's own feed as it reopens, with the same comparison (NATS;
    /// until then the feed delivers nothing, so nothing is delivered out of order).
    /// `Ok(false)` (the default) says the broker cannot tell, and the caller must report a
    /// gap on every subscribed channel.
    fn catch_up(&self) -> BrokerFuture<'_, bool> {
        Box::pin(std::future::ready(Ok(false)))
    }
}

/// Which broker this node runs, with that broker's own options (built from the settings).
#[derive(Debug, Clone)]
pub enum BrokerChoice {
    /// One node, everything in this process, history bounded to this many bytes in all.
    Memory {
        /// `RUSTY_SOCKS_HISTORY_TOTAL_BYTES`.
        history_total_bytes: usize,
        /// `RUSTY_SOCKS_DATA_DIR` and its options: history survives restarts.
        durable: Option<durable::DurableOptions>,
    },
    /// Redis.
    #[cfg(feature = "redis")]
    Redis(redis::RedisOptions),
    /// NATS with JetStream.
    #[cfg(feature = "nats")]
    Nats(nats::NatsOptions),
}

/// Builds the broker `choice` names, delivering to `events`. A networked broker must be
/// reachable now: failing here stops startup rather than running as a lone node. It is
/// wrapped in [`guard::Guarded`], which puts its deadline on every call and tracks its health.
pub async fn connect(
    choice: BrokerChoice,
    events: Arc<dyn BrokerEvents>,
) -> Result<Arc<dyn Broker>, BrokerError> {
    match choice {
        BrokerChoice::Memory {
            history_total_bytes,
            durable: None,
        } => Ok(Arc::new(memory::MemoryBroker::new(
            events,
            history_total_bytes,
        ))),
        BrokerChoice::Memory {
            history_total_bytes,
            durable: Some(options),
        } => Ok(memory::MemoryBroker::open(
            events,
            history_total_bytes,
            options,
        )?),
        #[cfg(feature = "redis")]
        BrokerChoice::Redis(options) => {
            let timeout = options.timeout;
            let inner = Arc::new(redis::RedisBroker::connect(options, Arc::clone(&events)).await?);
            Ok(Arc::new(guard::Guarded::new(inner, events, timeout)))
        }
        #[cfg(feature = "nats")]
        BrokerChoice::Nats(options) => {
            let timeout = options.timeout;
            let inner = Arc::new(nats::NatsBroker::connect(options, Arc::clone(&events)).await?);
            Ok(Arc::new(guard::Guarded::new(inner, events, timeout)))
        }
    }
}

/// `url` without a password, for messages and logs.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}
