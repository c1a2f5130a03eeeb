//! The NATS broker: nodes share channels through a NATS server with JetStream.
//!
//! For a broker prefix `p`, and `t` a channel's subject token (its name in base64url without
//! padding, so dots, wildcards and spaces are safe; `_` for the empty name):
//!
//! - Stream `p_history` (file storage, subjects `p.h.>`, 24 h max age, direct get) holds one
//!   subject `p.h.t` per channel. A message is one publication: the data JSON verbatim, with
//!   headers `Rs-Epoch`, `Rs-Offset`, `Rs-Client` (optional), `Rs-Prev` (stream sequence of the
//!   subject's previous message) and `Rs-Limits` (the history limits it was published with).
//!   Reads write nothing: a subject without messages has the position offset 0 with the
//!   empty epoch, which offset 1 of any epoch follows (see [`StreamPosition::start`]).
//!   (Offset 0 without limits is an epoch marker, which earlier versions wrote when history
//!   was read before anything was published; it is still read correctly, never delivered.)
//! - Offsets use optimistic concurrency: a publisher takes the subject's last message (cached
//!   per channel), publishes offset + 1 in its epoch with `Nats-Expected-Last-Subject-Sequence`
//!   set to its sequence, and on "wrong last sequence" reads again and retries. A new epoch
//!   starts only when the subject has no message left (history aged out, or the stream was lost).
//! - Several publishes of one channel at once ([`Broker::publish_batch`]) are appended back to
//!   back, each expecting the one before it (its message id), and the acks
//!   awaited after; the first one's ack is awaited before the others are sent unless the
//!   channel had the stream to itself last time (then the first also expects the stream's
//!   last sequence, and a refusal sends the pipeline again that way). Whatever was refused
//!   because something else came in between is published again one by one
//!   (`history/pipeline.rs`). The first append of such a pipeline carries `Rs-Run` (how many
//!   it starts), so live delivery can hand the pipeline on in one go.
//! - Idempotency keys: a keyed publish carries `Nats-Msg-Id` (the channel's token and the
//!   key), and the stream's duplicate window is `RUSTY_SOCKS_IDEMPOTENCY_WINDOW`; JetStream
//!   acknowledges a duplicate with the first message's sequence, which is read back for its
//!   offset and epoch.
//! - History limits are applied on read, newest first like the memory broker trims; every 64
//!   offsets the publisher also purges the subject down to `size` + 64 messages.
//! - Live delivery: per subscribed channel an ordered push consumer on `p.h.t` starting right
//!   after the message read at subscribe time (from the subject's first message if it had
//!   none), checked by [`Subscriptions::observe`], held in a batch and handed to the node
//!   in one go (a pipeline announced by `Rs-Run` not before its last offset arrived, or
//!   20 ms after its first). It is removed at unsubscribe. Ordered
//!   consumers resume by themselves after a reconnect; when the stream itself was recreated
//!   (the server lost its data) every feed restarts and reports a gap.
//! - Join/leave: core NATS subject `p.e.t` in the [`wire`] format, never stored.
//! - Presence: KV bucket `p_presence` (max age = presence TTL, file storage), key
//!   `t.<client id>`, re-put by the node that wrote it every TTL / 3, so a dead node's entries
//!   expire within the TTL. A presence read asks the stream which keys of the channel exist
//!   first, so reading a channel nobody was present on creates no consumer.
//! - Transitions (webhooks' occupied/vacated/member events): KV bucket `p_transitions`, per
//!   holding the list of nodes holding it changed by compare-and-set, heartbeats in the
//!   presence bucket, dead nodes claimed with create-if-absent; see `transitions`.
//!
//! The code is split by job: `history` (offsets and epochs, publishing, history reads and
//! purging), `live` (per-channel feeds, join/leave, gap reporting) and `presence` (the KV
//! bucket and its refresh); this file holds the options, the connection, the shared state
//! and the [`Broker`] implementation.
//!
//! [`wire`]: super::wire
//! [`StreamPosition::start`]: crate::types::StreamPosition::start

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use async_nats::jetstream::{self, kv};
use async_nats::{Client, ConnectOptions, Event};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use futures_util::StreamExt;
use time::OffsetDateTime;
use tokio::sync::{Mutex as AsyncMutex, Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use self::history::Head;
use self::live::Feed;
use super::local::{PresenceEntries, Subscriptions};
use super::{
    Broker, BrokerError, BrokerEvents, BrokerFuture, BrokerStatus, ClientInfo, HistoryPage,
    PublishRequest, Published,
};
use crate::types::ClientId;

mod history;
mod live;
mod presence;
#[cfg(test)]
mod tests;
mod transitions;

const HISTORY_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
/// Longest pause between reconnect attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(1);
const READ_BATCH: u64 = 1024;

/// Where the NATS broker connects and how it names what it keeps there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NatsOptions {
    /// `nats://[user:password@]host:port`.
    pub url: String,
    /// Prefix of every subject, stream and bucket (`RUSTY_SOCKS_BROKER_PREFIX`).
    pub prefix: String,
    /// How long presence entries outlive their node's last refresh.
    pub presence_ttl: Duration,
    /// Bound on the history stream on the server, in bytes, oldest dropped first (0: none).
    pub history_max_bytes: usize,
    /// The history stream's duplicate window: how long an idempotency key is remembered
    /// (`RUSTY_SOCKS_IDEMPOTENCY_WINDOW`; at most the stream's 24 h maximum age).
    pub idempotency_window: Duration,
    /// Deadline of every request, acknowledgement, read and connection attempt
    /// (`RUSTY_SOCKS_BROKER_TIMEOUT`).
    pub timeout: Duration,
}

fn unavailable(err: impl std::fmt::Display) -> BrokerError {
    BrokerError::Unavailable(format!("NATS: {err}"))
}

/// A channel's subject token.
fn token(channel: &str) -> String {
    if channel.is_empty() {
        // Never the encoding of anything: unpadded base64 is never one character long.
        "_".to_owned()
    } else {
        URL_SAFE_NO_PAD.encode(channel)
    }
}

#[derive(Debug, Clone)]
struct Names {
    prefix: String,
}

impl Names {
    fn stream(&self) -> String {
        format!("{}_history", self.prefix)
    }
    fn bucket(&self) -> String {
        format!("{}_presence", self.prefix)
    }
    fn history(&self, channel: &str) -> String {
        format!("{}.h.{}", self.prefix, token(channel))
    }
    fn events(&self, channel: &str) -> String {
        format!("{}.e.{}", self.prefix, token(channel))
    }
}

/// Per-channel async state, each behind its own lock; the map's lock is held only briefly.
struct Slots<T> {
    map: Mutex<HashMap<String, Arc<AsyncMutex<T>>>>,
}

impl<T: Default> Slots<T> {
    fn new() -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<String, Arc<AsyncMutex<T>>>> {
        self.map
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn get(&self, key: &str) -> Arc<AsyncMutex<T>> {
        Arc::clone(self.lock().entry(key.to_owned()).or_default())
    }

    /// Forgets `key` if nobody else holds it and its state is `idle`.
    fn release(&self, key: &str, idle: impl Fn(&T) -> bool) {
        let mut map = self.lock();
        let unused = map.get(key).is_some_and(|slot| {
            Arc::strong_count(slot) == 1 && slot.try_lock().is_ok_and(|state| idle(&state))
        });
        if unused {
            map.remove(key);
        }
    }

    /// Drops every unused entry once there are more than `max`.
    fn shrink(&self, max: usize) {
        let mut map = self.lock();
        if map.len() > max {
            map.retain(|_, slot| Arc::strong_count(slot) > 1);
        }
    }
}

struct Inner {
    client: Client,
    js: jetstream::Context,
    stream: stream::Stream,
    kv: kv::Store,
    names: Names,
    options: NatsOptions,
    events: Arc<dyn BrokerEvents>,
    subs: Subscriptions,
    entries: PresenceEntries,
    heads: Slots<Option<Head>>,
    feeds: Slots<Option<Feed>>,
    /// Bumped when the history stream was found recreated: every feed restarts.
    resets: watch::Sender<u64>,
    created: Mutex<Option<OffsetDateTime>>,
    stop: CancellationToken,
    /// Connections made so far (counted by the client's event callback).
    connects: Arc<AtomicU64>,
    /// [`Self::connects`] when the health probe forced a reconnect that has not connected
    /// yet, or [`NOT_RECONNECTING`].
    reconnect_at: AtomicU64,
}

const NOT_RECONNECTING: u64 = u64::MAX;

/// Broker for nodes sharing a NATS server; see the module docs.
pub struct NatsBroker {
    inner: Arc<Inner>,
    /// This node's id and bucket for cluster-wide transitions.
    tracking: transitions::Tracking,
    _stop: DropGuard,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker")
            .field("url", &super::redact(&self.inner.options.url))
            .field("prefix", &self.inner.options.prefix)
            .finish_non_exhaustive()
    }
}

/// Creates or updates the history stream and the presence bucket; returns when the stream
/// was created (its identity) and the bucket.
async fn ensure(
    js: &jetstream::Context,
    names: &Names,
    options: &NatsOptions,
) -> Result<(OffsetDateTime, kv::Store), String> {
    let info = js
        .create_or_update_stream(stream::Config {
            name: names.stream(),
            subjects: vec![format!("{}.h.>", names.prefix)],
            storage: StorageType::File,
            max_age: HISTORY_MAX_AGE,
            max_bytes: match options.history_max_bytes {
                0 => -1,
                bytes => i64::try_from(bytes).unwrap_or(i64::MAX),
            },
            discard: DiscardPolicy::Old,
            allow_direct: true,
            duplicate_window: options.idempotency_window.min(HISTORY_MAX_AGE),
            ..Default::default()
        })
        .await
        .map_err(|err| format!("stream {}: {err}", names.stream()))?;
    // The bucket's stream, as `create_key_value` would make it (which cannot be used here: it
    // fails to parse a 2.9 server's account info).
    let bucket = names.bucket();
    js.create_or_update_stream(stream::Config {
        name: format!("KV_{bucket}"),
        subjects: vec![format!("$KV.{bucket}.>")],
        max_messages_per_subject: 1,
        max_age: options.presence_ttl,
        storage: StorageType::File,
        allow_rollup: true,
        deny_delete: true,
        allow_direct: true,
        discard: DiscardPolicy::New,
        ..Default::default()
    })
    .await
    .map_err(|err| format!("bucket {bucket}: {err}"))?;
    let store = js
        .get_key_value(&bucket)
        .await
        .map_err(|err| format!("bucket {bucket}: {err}"))?;
    Ok((info.created, store))
}

/// Reads `filter` on `stream` through a short-lived consumer: everything up to what was there
/// when it started (or up to stream sequence `until`), oldest first.
async fn read(
    js: &jetstream::Context,
    stream: &stream::Stream,
    filter: String,
    deliver_policy: DeliverPolicy,
    until: Option<u64>,
    timeout: Duration,
) -> Result<Vec<jetstream::Message>, BrokerError> {
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: filter,
            deliver_policy,
            ack_policy: AckPolicy::None,
            inactive_threshold: Duration::from_secs(10),
            memory_storage: true,
            ..Default::default()
        })
        .await
        .map_err(unavailable)?;
    let mut left = consumer.cached_info().num_pending;
    let collect = async {
        let mut out = Vec::new();
        while left > 0 {
            let batch = usize::try_from(left.min(READ_BATCH)).unwrap_or(1);
            let mut messages = consumer
                .fetch()
                .max_messages(batch)
                .messages()
                .await
                .map_err(unavailable)?;
            let mut got = false;
            while let Some(message) = messages.next().await {
                let message = message.map_err(unavailable)?;
                let info = message.info().map_err(unavailable)?;
                let (seq, pending) = (info.stream_sequence, info.pending);
                got = true;
                left = pending;
                if until.is_some_and(|until| seq > until) {
                    return Ok(out);
                }
                out.push(message);
                if pending == 0 || until.is_some_and(|until| seq >= until) {
                    return Ok(out);
                }
            }
            if !got {
                break;
            }
        }
        Ok(out)
    };
    let result = tokio::time::timeout(timeout, collect)
        .await
        .unwrap_or_else(|_| Err(unavailable("reading timed out")));
    let (js, name, stream_name) = (
        js.clone(),
        consumer.cached_info().name.clone(),
        stream.cached_info().config.name.clone(),
    );
    // It would expire by itself; deleting it keeps the server tidy.
    tokio::spawn(async move { js.delete_consumer_from_stream(name, stream_name).await });
    result
}

impl NatsBroker {
    /// Connects to NATS (failing within about three seconds), creates or updates the stream
    /// and bucket, and starts the presence refresher. Delivers to `events`.
    pub async fn connect(
        options: NatsOptions,
        events: Arc<dyn BrokerEvents>,
    ) -> Result<Self, BrokerError> {
        let names = Names {
            prefix: options.prefix.clone(),
        };
        let reconnected = Arc::new(Notify::new());
        let notify = Arc::clone(&reconnected);
        let connects = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&connects);
        let setup = async {
            let client = ConnectOptions::new()
                .name("rusty-socks")
                .connection_timeout(options.timeout)
                .request_timeout(Some(options.timeout))
                .reconnect_delay_callback(|attempts| {
                    let exponent = u32::try_from(attempts.min(10)).unwrap_or(10);
                    (Duration::from_millis(50) * 2u32.pow(exponent)).min(MAX_RECONNECT_DELAY)
                })
                .event_callback(move |event| {
                    let notify = Arc::clone(&notify);
                    if matches!(event, Event::Connected) {
                        counter.fetch_add(1, Ordering::AcqRel);
                    }
                    async move {
                        match event {
                            Event::Connected => {
                                tracing::info!("NATS connected");
                                notify.notify_one();
                            }
                            Event::Disconnected => tracing::warn!("NATS disconnected"),
                            other => tracing::debug!(%other, "NATS event"),
                        }
                    }
                })
                .connect(options.url.as_str())
                .await
                .map_err(|err| err.to_string())?;
            let js = jetstream::ContextBuilder::new()
                .timeout(options.timeout)
                .ack_timeout(options.timeout)
                .build(client.clone());
            let (created, kv) = ensure(&js, &names, &options).await?;
            let stream = js
                .get_stream(names.stream())
                .await
                .map_err(|err| err.to_string())?;
            Ok::<_, String>((client, js, stream, kv, created))
        };
        let deadline = options.timeout;
        let (client, js, stream, kv, created) = tokio::time::timeout(deadline, setup)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {deadline:?}")))
            .map_err(|reason| BrokerError::Connect {
                url: super::redact(&options.url),
                reason,
            })?;
        let stop = CancellationToken::new();
        let inner = Arc::new(Inner {
            client,
            js,
            stream,
            kv,
            names,
            options,
            events,
            subs: Subscriptions::default(),
            entries: PresenceEntries::default(),
            heads: Slots::new(),
            feeds: Slots::new(),
            resets: watch::Sender::new(0),
            created: Mutex::new(Some(created)),
            stop: stop.clone(),
            connects,
            reconnect_at: AtomicU64::new(NOT_RECONNECTING),
        });
        tokio::spawn(Arc::clone(&inner).maintain(reconnected));
        Ok(Self {
            inner,
            tracking: transitions::Tracking::new(),
            _stop: stop.drop_guard(),
        })
    }
}

impl Inner {
    fn ready(&self) -> Result<(), BrokerError> {
        match self.client.connection_state() {
            State::Connected => Ok(()),
            _ => Err(unavailable("not connected")),
        }
    }
    /// Recreates the stream if it is gone, and restarts every feed if it was recreated.
    async fn check_stream(&self) {
        let created = match self.js.get_stream(self.names.stream()).await {
            Ok(stream) => stream.cached_info().created,
            Err(_) if self.ready().is_err() => return,
            Err(_) => match ensure(&self.js, &self.names, &self.options).await {
                Ok((created, _)) => created,
                Err(err) => {
                    tracing::warn!(err, "NATS history stream unavailable");
                    return;
                }
            },
        };
        let previous = self
            .created
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .replace(created);
        if previous.is_some_and(|previous| previous != created) {
            tracing::warn!("NATS history stream was recreated; restarting live delivery");
            self.resets.send_modify(|n| *n = n.wrapping_add(1));
        }
    }

    async fn maintain(self: Arc<Self>, reconnected: Arc<Notify>) {
        let period = (self.options.presence_ttl / 3).max(Duration::from_millis(500));
        let mut tick = tokio::time::interval(period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = self.stop.cancelled() => return,
                _ = tick.tick() => {
                    self.refresh_presence().await;
                    self.check_stream().await;
                }
                () = reconnected.notified() => self.check_stream().await,
            }
        }
    }
}

impl Broker for NatsBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        request: PublishRequest,
    ) -> BrokerFuture<'a, Published> {
        Box::pin(self.inner.publish(channel, request))
    }

    fn publish_batch<'a>(
        &'a self,
        channel: &'a str,
        requests: Vec<PublishRequest>,
    ) -> BrokerFuture<'a, Vec<Result<Published, BrokerError>>> {
        Box::pin(self.inner.publish_pipelined(channel, requests))
    }

    fn pipelines_publish(&self) -> bool {
        true
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        Box::pin(self.inner.subscribe(channel))
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            self.inner.unsubscribe(channel).await;
            Ok(())
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<u64>,
        limit: usize,
    ) -> BrokerFuture<'a, HistoryPage> {
        Box::pin(self.inner.history(channel, since, limit))
    }

    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            // Recorded first: if the put fails, the next refresh retries it.
            self.inner.entries.add(channel, client.clone());
            self.inner.ready()?;
            self.inner.put_presence(channel, &client).await
        })
    }

    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> BrokerFuture<'a, ()> {
        Box::pin(self.inner.remove_presence(channel, client))
    }

    fn presence<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, Vec<ClientInfo>> {
        Box::pin(self.inner.presence(channel))
    }

    fn publish_join<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        Box::pin(async move { self.inner.announce(channel, &client, false).await })
    }

    fn publish_leave<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        Box::pin(async move { self.inner.announce(channel, &client, true).await })
    }

    fn track<'a>(
        &'a self,
        holding: &'a crate::broker::Holding,
        held: bool,
    ) -> BrokerFuture<'a, Option<crate::broker::Transition>> {
        Box::pin(self.track_holding(holding, held))
    }

    fn sweep(&self) -> BrokerFuture<'_, crate::broker::Swept> {
        Box::pin(self.sweep_nodes())
    }

    fn sweep_every(&self) -> Duration {
        transitions::sweep_every(self.inner.options.presence_ttl)
    }

    fn status(&self) -> BrokerStatus {
        BrokerStatus {
            kind: "nats",
            connected: self.inner.ready().is_ok(),
        }
    }

    fn ping(&self) -> BrokerFuture<'_, ()> {
        Box::pin(async move {
            let inner = &self.inner;
            inner.ready()?;
            let forced = inner.reconnect_at.load(Ordering::Acquire);
            if forced != NOT_RECONNECTING {
                if inner.connects.load(Ordering::Acquire) == forced {
                    return Err(unavailable("reconnecting"));
                }
                inner
                    .reconnect_at
                    .store(NOT_RECONNECTING, Ordering::Release);
            }
            // A JetStream request is the round trip: the server and JetStream both answer.
            let timeout = inner.options.timeout;
            let asked = inner.js.get_stream(inner.names.stream());
            let failure = match tokio::time::timeout(timeout, asked).await {
                Ok(Ok(_)) => return Ok(()),
                // JetStream answered, with an error (the stream is gone, say): the link is
                // fine, so no reconnect is forced, but the broker cannot serve until the
                // stream is back, so the probe fails.
                Ok(Err(err)) if err.kind() != GetStreamErrorKind::Request => {
                    return Err(unavailable(err));
                }
                Ok(Err(err)) => err.to_string(),
                Err(_) => "no answer".to_owned(),
            };
            // A link that silently dropped everything is only noticed by the client's own
            // pings, much later: reconnect now (new connections pass as soon as the link
            // is back; a stopped server is reached again once it resumes).
            // A request made while the client reconnects can be written to the dead
            // connection: probes wait (failing) until the new one is up.
            tracing::warn!(
                failure,
                "NATS did not answer the health probe; reconnecting"
            );
            inner
                .reconnect_at
                .store(inner.connects.load(Ordering::Acquire), Ordering::Release);
            let client = inner.client.clone();
            tokio::spawn(async move { client.force_reconnect().await });
            Err(unavailable(format!("health probe: {failure}")))
        })
    }

    fn catch_up(&self) -> BrokerFuture<'_, bool> {
        Box::pin(async move {
            // Every feed reopens right after the head of its subject and compares that with
            // what it delivered last, reporting a gap if the stream moved (see `live`).
            self.inner.resets.send_modify(|n| *n = n.wrapping_add(1));
            Ok(true)
        })
    }
}
