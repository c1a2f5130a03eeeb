//! The NATS broker: nodes share channels through a NATS server with JetStream.
//!
//! For a broker prefix `p`, and `t` a channel's subject token (its name in base64url without
//! padding, so dots, wildcards and spaces are safe; `_` for the empty name):
//!
//! - Stream `p_history` (file storage, subjects `p.h.>`, 24 h max age, direct get) holds one
//!   subject `p.h.t` per channel. A message is one publication: the data JSON verbatim, with
//!   headers `Rs-Epoch`, `Rs-Offset`, `Rs-Client` (optional), `Rs-Prev` (stream sequence of the
//!   subject's previous message) and `Rs-Limits` (the history limits it was published with).
//!   Offset 0 without limits is an epoch marker, written when history is read before anything
//!   was published, so the epoch a reader is told is durable.
//! - Offsets use optimistic concurrency: a publisher takes the subject's last message (cached
//!   per channel), publishes offset + 1 in its epoch with `Nats-Expected-Last-Subject-Sequence`
//!   set to its sequence, and on "wrong last sequence" reads again and retries. A new epoch
//!   starts only when the subject has no message left (history aged out, or the stream was lost).
//! - History limits are applied on read, newest first like the memory broker trims; every 64
//!   offsets the publisher also purges the subject down to `size` + 64 messages.
//! - Live delivery: per subscribed channel an ordered push consumer on `p.h.t` starting right
//!   after the message read at subscribe time, checked by [`Subscriptions::observe`]. Ordered
//!   consumers resume by themselves after a reconnect; when the stream itself was recreated
//!   (the server lost its data) every feed restarts and reports a gap.
//! - Join/leave: core NATS subject `p.e.t` in the [`wire`] format, never stored.
//! - Presence: KV bucket `p_presence` (max age = presence TTL, file storage), key
//!   `t.<client id>`, re-put by the node that wrote it every TTL / 3, so a dead node's entries
//!   expire within the TTL.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_nats::connection::State;
use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull, push};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::{self, DirectGetErrorKind, DiscardPolicy, StorageType};
use async_nats::jetstream::{self, kv};
use async_nats::{Client, ConnectOptions, Event, HeaderMap, header};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures_util::StreamExt;
use serde_json::value::RawValue;
use time::OffsetDateTime;
use tokio::sync::{Mutex as AsyncMutex, Notify, watch};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::local::{Continuity, PresenceEntries, Subscriptions};
use super::{
    Broker, BrokerError, BrokerEvents, BrokerFuture, BrokerStatus, ClientInfo, HistoryPage,
    PublishRequest, wire,
};
use crate::config::Config;
use crate::history::{HistoryLimits, Publication, StreamPosition};
use crate::ws::outbox::ClientId;

const HISTORY_MAX_AGE: Duration = Duration::from_secs(24 * 60 * 60);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
const READ_TIMEOUT: Duration = Duration::from_secs(5);
/// Publish attempts per call under contention before giving up.
const PUBLISH_ATTEMPTS: u32 = 100;
/// Every this many offsets, the publisher purges the channel's subject.
const PURGE_EVERY: u64 = 64;
/// History reads needing at most this many messages follow `Rs-Prev` with direct gets;
/// longer ones read the subject through a consumer.
const WALK_MAX: u64 = 16;
const READ_BATCH: u64 = 1024;
/// Cached channel heads kept before idle ones are dropped.
const HEADS_MAX: usize = 4096;

const H_EPOCH: &str = "Rs-Epoch";
const H_OFFSET: &str = "Rs-Offset";
const H_CLIENT: &str = "Rs-Client";
const H_PREV: &str = "Rs-Prev";
const H_LIMITS: &str = "Rs-Limits";

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
}

impl NatsOptions {
    /// The options `config` gives for the server at `url`.
    pub fn from_config(url: &str, config: &Config) -> Self {
        Self {
            url: url.to_owned(),
            prefix: config.broker_prefix.clone(),
            presence_ttl: config.presence_ttl,
            history_max_bytes: config.history_total_bytes,
        }
    }
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

fn encode_limits(limits: HistoryLimits) -> String {
    let ttl = limits
        .ttl
        .map_or_else(|| "-".to_owned(), |ttl| ttl.as_millis().to_string());
    format!("{} {} {ttl}", limits.size, limits.max_bytes)
}

fn decode_limits(text: &str) -> Result<HistoryLimits, String> {
    let bad = || format!("bad limits {text:?}");
    let parts: Vec<&str> = text.split(' ').collect();
    let [size, max_bytes, ttl] = parts.as_slice() else {
        return Err(bad());
    };
    Ok(HistoryLimits {
        size: size.parse().map_err(|_| bad())?,
        max_bytes: max_bytes.parse().map_err(|_| bad())?,
        ttl: match *ttl {
            "-" => None,
            ms => Some(Duration::from_millis(ms.parse().map_err(|_| bad())?)),
        },
    })
}

/// One message of a channel's subject, decoded.
#[derive(Debug, Clone)]
struct Stored {
    seq: u64,
    epoch: String,
    offset: u64,
    prev: u64,
    client_id: Option<ClientId>,
    /// `None` on an epoch marker.
    limits: Option<HistoryLimits>,
    time: OffsetDateTime,
    data: Bytes,
}

impl Stored {
    fn parse(
        seq: u64,
        time: OffsetDateTime,
        headers: Option<&HeaderMap>,
        data: Bytes,
    ) -> Result<Self, String> {
        let headers = headers.ok_or("no headers")?;
        let get = |name: &str| headers.get(name).map(|value| value.as_str());
        let number = |name: &str| get(name).map(str::parse::<u64>).transpose();
        Ok(Self {
            seq,
            epoch: get(H_EPOCH).ok_or("no epoch")?.to_owned(),
            offset: number(H_OFFSET).ok().flatten().ok_or("bad offset")?,
            prev: number(H_PREV)
                .map_err(|_| "bad previous sequence")?
                .unwrap_or(0),
            client_id: get(H_CLIENT)
                .map(str::parse)
                .transpose()
                .map_err(|_| "bad client id")?,
            limits: get(H_LIMITS).map(decode_limits).transpose()?,
            time,
            data,
        })
    }

    fn from_stream(message: StreamMessage) -> Result<Self, String> {
        Self::parse(
            message.sequence,
            message.time,
            Some(&message.headers),
            message.payload,
        )
    }

    fn from_consumer(message: &jetstream::Message) -> Result<Self, String> {
        let info = message.info().map_err(|err| err.to_string())?;
        Self::parse(
            info.stream_sequence,
            info.published,
            message.headers.as_ref(),
            message.payload.clone(),
        )
    }

    fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }

    fn publication(&self) -> Result<Publication, String> {
        let text = String::from_utf8(self.data.to_vec()).map_err(|_| "data is not UTF-8")?;
        let data = RawValue::from_string(text).map_err(|_| "data is not JSON")?;
        Ok(Publication {
            offset: self.offset,
            data: Arc::from(data),
            client_id: self.client_id,
        })
    }
}

fn headers(epoch: &str, offset: u64, prev: u64, request: Option<&PublishRequest>) -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(H_EPOCH, epoch);
    headers.insert(H_OFFSET, offset.to_string());
    headers.insert(H_PREV, prev.to_string());
    headers.insert(
        header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        prev.to_string(),
    );
    if let Some(request) = request {
        headers.insert(H_LIMITS, encode_limits(request.history));
        if let Some(client) = request.client_id {
            headers.insert(H_CLIENT, client.to_string());
        }
    }
    headers
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Admit {
    Take,
    Skip,
    Stop,
}

/// What a history read keeps, fed the subject's messages newest first: the memory broker's
/// retention (count, bytes, age; oversized publications never stored), then `since`/`limit`.
#[derive(Debug, Clone)]
struct Window {
    epoch: String,
    below: u64,
    limits: HistoryLimits,
    since: Option<u64>,
    limit: usize,
    now: OffsetDateTime,
    count: usize,
    bytes: usize,
}

impl Window {
    fn new(last: &Stored, limits: HistoryLimits, since: Option<u64>, limit: usize) -> Self {
        Self {
            epoch: last.epoch.clone(),
            below: last.offset.saturating_add(1),
            limits,
            since,
            limit,
            now: OffsetDateTime::now_utc(),
            count: 0,
            bytes: 0,
        }
    }

    fn admit(&mut self, message: &Stored) -> Admit {
        let age = self.now - message.time;
        let size = message.data.len();
        if message.offset == 0
            || message.offset >= self.below
            || message.epoch != self.epoch
            || self.since.is_some_and(|since| message.offset <= since)
            || self
                .limits
                .ttl
                .is_some_and(|ttl| age.is_positive() && age.unsigned_abs() > ttl)
        {
            return Admit::Stop;
        }
        self.below = message.offset;
        if size > self.limits.max_bytes {
            return Admit::Skip;
        }
        if self.count >= self.limits.size
            || self.bytes + size > self.limits.max_bytes
            || (self.since.is_none() && self.count >= self.limit)
        {
            return Admit::Stop;
        }
        self.count += 1;
        self.bytes += size;
        Admit::Take
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

/// The last message of a channel's subject, as this node last published it.
#[derive(Debug, Clone)]
struct Head {
    seq: u64,
    offset: u64,
    epoch: String,
}

/// Live delivery of one channel to this node; dropping it stops the task.
struct Feed {
    _stop: DropGuard,
    live: Arc<Live>,
}

/// Whether a feed may still deliver, checked and acted on under one lock: a stopped feed's
/// task never touches the channel's next subscription.
struct Live(Mutex<bool>);

impl Live {
    fn run(&self, act: impl FnOnce()) {
        let live = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *live {
            act();
        }
    }

    fn end(&self) {
        *self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = false;
    }
}

struct Streams {
    history: push::Ordered,
    events: async_nats::Subscriber,
}

enum Append {
    Done(u64),
    Conflict,
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
}

/// Broker for nodes sharing a NATS server; see the module docs.
pub struct NatsBroker {
    inner: Arc<Inner>,
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
    let result = tokio::time::timeout(READ_TIMEOUT, collect)
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

fn is_kv_removal(message: &jetstream::Message) -> bool {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get("KV-Operation"))
        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
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
        let setup = async {
            let client = ConnectOptions::new()
                .name("rusty-socks")
                .connection_timeout(CONNECT_TIMEOUT)
                .event_callback(move |event| {
                    let notify = Arc::clone(&notify);
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
            let js = jetstream::new(client.clone());
            let (created, kv) = ensure(&js, &names, &options).await?;
            let stream = js
                .get_stream(names.stream())
                .await
                .map_err(|err| err.to_string())?;
            Ok::<_, String>((client, js, stream, kv, created))
        };
        let (client, js, stream, kv, created) = tokio::time::timeout(CONNECT_TIMEOUT, setup)
            .await
            .unwrap_or_else(|_| Err(format!("no answer within {CONNECT_TIMEOUT:?}")))
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
        });
        tokio::spawn(Arc::clone(&inner).maintain(reconnected));
        Ok(Self {
            inner,
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

    /// The subject's last message, if any.
    async fn last(&self, subject: &str) -> Result<Option<Stored>, BrokerError> {
        match self.stream.direct_get_last_for_subject(subject).await {
            Ok(message) => Stored::from_stream(message).map(Some).map_err(unavailable),
            Err(err) if matches!(err.kind(), DirectGetErrorKind::NotFound) => Ok(None),
            Err(err) => Err(unavailable(err)),
        }
    }

    /// Appends to `subject` if its last message is still `prev` (0: none).
    async fn append(
        &self,
        subject: &str,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<Append, BrokerError> {
        let ack = self
            .js
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
            .map_err(unavailable)?
            .await;
        match ack {
            Ok(ack) => Ok(Append::Done(ack.sequence)),
            Err(err) if err.kind() == PublishErrorKind::WrongLastSequence => Ok(Append::Conflict),
            Err(err) if err.kind() == PublishErrorKind::StreamNotFound => {
                tracing::warn!("NATS history stream missing; recreating it");
                ensure(&self.js, &self.names, &self.options)
                    .await
                    .map_err(unavailable)?;
                Ok(Append::Conflict)
            }
            Err(err) => Err(unavailable(err)),
        }
    }

    async fn publish(
        &self,
        channel: &str,
        request: PublishRequest,
    ) -> Result<StreamPosition, BrokerError> {
        self.ready()?;
        self.heads.shrink(HEADS_MAX);
        let subject = self.names.history(channel);
        let slot = self.heads.get(channel);
        let mut head = slot.lock().await;
        let payload = Bytes::from(request.data.get().to_owned());
        for attempt in 0..PUBLISH_ATTEMPTS {
            let last = match head.take() {
                Some(head) => Some(head),
                None => self.last(&subject).await?.map(|last| Head {
                    seq: last.seq,
                    offset: last.offset,
                    epoch: last.epoch,
                }),
            };
            let (prev, offset, epoch) = match last {
                Some(last) => (last.seq, last.offset + 1, last.epoch),
                None => (0, 1, wire::new_epoch()),
            };
            let headers = headers(&epoch, offset, prev, Some(&request));
            match self.append(&subject, headers, payload.clone()).await? {
                Append::Done(seq) => {
                    *head = Some(Head {
                        seq,
                        offset,
                        epoch: epoch.clone(),
                    });
                    if offset.is_multiple_of(PURGE_EVERY) {
                        let keep = (request.history.size as u64).saturating_add(PURGE_EVERY);
                        let purge = self.stream.purge().filter(subject.as_str()).keep(keep);
                        if let Err(err) = purge.await {
                            tracing::debug!(%err, channel, "history purge failed");
                        }
                    }
                    return Ok(StreamPosition { offset, epoch });
                }
                Append::Conflict if attempt >= 2 => {
                    let jitter = uuid::Uuid::new_v4().as_u128() % 4_000;
                    tokio::time::sleep(Duration::from_micros(jitter as u64)).await;
                }
                Append::Conflict => {}
            }
        }
        Err(unavailable(format!(
            "{channel}: gave up after {PUBLISH_ATTEMPTS} concurrent publish attempts"
        )))
    }

    /// The subject's last message, writing an epoch marker first if it has none.
    async fn head(&self, subject: &str) -> Result<Stored, BrokerError> {
        for _ in 0..PUBLISH_ATTEMPTS {
            if let Some(last) = self.last(subject).await? {
                return Ok(last);
            }
            let epoch = wire::new_epoch();
            if let Append::Done(seq) = self
                .append(subject, headers(&epoch, 0, 0, None), Bytes::new())
                .await?
            {
                return Ok(Stored {
                    seq,
                    epoch,
                    offset: 0,
                    prev: 0,
                    client_id: None,
                    limits: None,
                    time: OffsetDateTime::now_utc(),
                    data: Bytes::new(),
                });
            }
        }
        Err(unavailable("could not read the channel's position"))
    }

    async fn history(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError> {
        self.ready()?;
        let subject = self.names.history(channel);
        let last = self.head(&subject).await?;
        let mut page = HistoryPage {
            position: last.position(),
            publications: Vec::new(),
        };
        let Some(limits) = last.limits else {
            return Ok(page);
        };
        let mut span = (last.offset.saturating_sub(since.unwrap_or(0))).min(limits.size as u64);
        if since.is_none() {
            span = span.min(limit as u64);
        }
        if span == 0 || limit == 0 {
            return Ok(page);
        }
        let window = Window::new(&last, limits, since, limit);
        let walked = if span <= WALK_MAX {
            self.walk(&last, window.clone()).await?
        } else {
            None
        };
        let newest_first = match walked {
            Some(picked) => picked,
            None => self.scan(&subject, &last, window).await?,
        };
        page.publications = newest_first
            .iter()
            .rev()
            .filter_map(|stored| match stored.publication() {
                Ok(publication) => Some(publication),
                Err(why) => {
                    tracing::warn!(channel, why, "skipped a malformed history message");
                    None
                }
            })
            .take(limit)
            .collect();
        Ok(page)
    }

    /// History by following `Rs-Prev` from the last message; `None` if that is too long.
    async fn walk(
        &self,
        last: &Stored,
        mut window: Window,
    ) -> Result<Option<Vec<Stored>>, BrokerError> {
        let mut picked = Vec::new();
        let mut current = last.clone();
        for _ in 0..WALK_MAX * 2 {
            match window.admit(&current) {
                Admit::Stop => return Ok(Some(picked)),
                Admit::Skip => {}
                Admit::Take => picked.push(current.clone()),
            }
            if current.prev == 0 {
                return Ok(Some(picked));
            }
            current = match self.stream.direct_get(current.prev).await {
                Ok(message) => match Stored::from_stream(message) {
                    Ok(stored) => stored,
                    Err(_) => return Ok(Some(picked)),
                },
                // Purged or aged out: so is everything older.
                Err(err) if matches!(err.kind(), DirectGetErrorKind::NotFound) => {
                    return Ok(Some(picked));
                }
                Err(err) => return Err(unavailable(err)),
            };
        }
        Ok(None)
    }

    /// History by reading the whole subject (up to the last message) through a consumer.
    async fn scan(
        &self,
        subject: &str,
        last: &Stored,
        mut window: Window,
    ) -> Result<Vec<Stored>, BrokerError> {
        let start = window
            .limits
            .ttl
            .and_then(|ttl| time::Duration::try_from(ttl).ok())
            .and_then(|ttl| window.now.checked_sub(ttl));
        let policy = match start {
            Some(start_time) => DeliverPolicy::ByStartTime { start_time },
            None => DeliverPolicy::All,
        };
        let messages = read(
            &self.js,
            &self.stream,
            subject.to_owned(),
            policy,
            Some(last.seq),
        )
        .await?;
        let mut picked = Vec::new();
        for message in messages.iter().rev() {
            let Ok(stored) = Stored::from_consumer(message) else {
                continue;
            };
            if stored.seq > last.seq {
                continue;
            }
            match window.admit(&stored) {
                Admit::Stop => break,
                Admit::Skip => {}
                Admit::Take => picked.push(stored),
            }
        }
        Ok(picked)
    }

    /// Starts the channel's core subscription and history consumer, right after its current
    /// last message, and records that position.
    async fn open(&self, channel: &str, live: &Live) -> Result<Streams, BrokerError> {
        let events = self
            .client
            .subscribe(self.names.events(channel))
            .await
            .map_err(unavailable)?;
        let subject = self.names.history(channel);
        // With a marker in an empty subject there is always a position to start from.
        let last = self.head(&subject).await?;
        let consumer = self
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: subject,
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: last.seq + 1,
                },
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let history = consumer.messages().await.map_err(unavailable)?;
        // Only differs from what was delivered last when reopening after a failure.
        live.run(|| {
            if self.subs.catch_up(channel, last.position()) {
                self.events.on_gap(channel);
            }
        });
        Ok(Streams { history, events })
    }

    async fn subscribe(self: &Arc<Self>, channel: &str) -> Result<(), BrokerError> {
        self.ready()?;
        let slot = self.feeds.get(channel);
        let mut feed = slot.lock().await;
        if !self.subs.add(channel) {
            return Ok(());
        }
        let resets = self.resets.subscribe();
        let live = Arc::new(Live(Mutex::new(true)));
        match self.open(channel, &live).await {
            Ok(streams) => {
                let stop = self.stop.child_token();
                let (name, task_live) = (channel.to_owned(), Arc::clone(&live));
                let task =
                    Arc::clone(self).run_feed(name, streams, resets, task_live, stop.clone());
                tokio::spawn(task);
                *feed = Some(Feed {
                    _stop: stop.drop_guard(),
                    live,
                });
                Ok(())
            }
            Err(err) => {
                self.subs.remove(channel);
                drop(feed);
                drop(slot);
                self.feeds.release(channel, Option::is_none);
                Err(err)
            }
        }
    }

    async fn unsubscribe(&self, channel: &str) {
        let slot = self.feeds.get(channel);
        let mut feed = slot.lock().await;
        if self.subs.remove(channel)
            && let Some(stopped) = feed.take()
        {
            stopped.live.end();
        }
        drop(feed);
        drop(slot);
        self.feeds.release(channel, Option::is_none);
    }

    /// Delivers one channel until stopped, reopening its streams when they end for good or
    /// the history stream was recreated.
    async fn run_feed(
        self: Arc<Self>,
        channel: String,
        mut streams: Streams,
        mut resets: watch::Receiver<u64>,
        live: Arc<Live>,
        stop: CancellationToken,
    ) {
        loop {
            let reopen = tokio::select! {
                () = stop.cancelled() => return,
                changed = resets.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    true
                }
                message = streams.history.next() => match message {
                    Some(Ok(message)) => {
                        self.deliver(&channel, &message, &live);
                        false
                    }
                    Some(Err(err)) => {
                        tracing::debug!(%err, channel, "NATS consumer recovering");
                        false
                    }
                    None => true,
                },
                message = streams.events.next() => match message {
                    Some(message) => {
                        self.deliver_event(&channel, &message.payload, &live);
                        false
                    }
                    None => true,
                },
            };
            if !reopen {
                continue;
            }
            let mut backoff = Duration::from_millis(100);
            streams = loop {
                match self.open(&channel, &live).await {
                    Ok(streams) => break streams,
                    Err(err) => tracing::warn!(%err, channel, "NATS feed restart failed"),
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            };
        }
    }

    fn deliver(&self, channel: &str, message: &jetstream::Message, live: &Live) {
        let decoded = Stored::from_consumer(message).and_then(|stored| {
            // Epoch markers (offset 0) are not publications.
            let publication = (stored.offset > 0)
                .then(|| stored.publication())
                .transpose()?;
            Ok((stored, publication))
        });
        let (stored, publication) = match decoded {
            Ok((stored, Some(publication))) => (stored, publication),
            Ok((_, None)) => return,
            Err(why) => {
                tracing::warn!(channel, why, "dropped a malformed history message");
                return;
            }
        };
        live.run(
            || match self.subs.observe(channel, &stored.epoch, stored.offset) {
                Continuity::Next => self.events.on_publication(channel, &publication),
                Continuity::Gap => {
                    self.events.on_gap(channel);
                    self.events.on_publication(channel, &publication);
                }
                Continuity::Seen | Continuity::Unwanted => {}
            },
        );
    }

    fn deliver_event(&self, channel: &str, payload: &[u8], live: &Live) {
        match wire::decode(payload) {
            Ok(wire::WireEvent::Join(client)) => {
                live.run(|| self.events.on_join(channel, &client));
            }
            Ok(wire::WireEvent::Leave(client)) => {
                live.run(|| self.events.on_leave(channel, &client));
            }
            Ok(wire::WireEvent::Publication { .. }) => {}
            Err(err) => tracing::warn!(%err, channel, "dropped a join/leave message"),
        }
    }

    async fn announce(
        &self,
        channel: &str,
        client: &ClientInfo,
        leave: bool,
    ) -> Result<(), BrokerError> {
        self.ready()?;
        let payload = wire::presence_change(client, leave);
        self.client
            .publish(self.names.events(channel), payload.into())
            .await
            .map_err(unavailable)
    }

    fn presence_key(channel: &str, client: ClientId) -> String {
        format!("{}.{client}", token(channel))
    }

    async fn put_presence(&self, channel: &str, client: &ClientInfo) -> Result<(), BrokerError> {
        let value = serde_json::to_vec(client).map_err(unavailable)?;
        self.kv
            .put(Self::presence_key(channel, client.client_id), value.into())
            .await
            .map(drop)
            .map_err(unavailable)
    }

    async fn remove_presence(&self, channel: &str, client: ClientId) -> Result<(), BrokerError> {
        self.entries.remove(channel, client);
        self.ready()?;
        self.kv
            .purge(Self::presence_key(channel, client))
            .await
            .map_err(unavailable)
    }

    async fn presence(&self, channel: &str) -> Result<Vec<ClientInfo>, BrokerError> {
        self.ready()?;
        let filter = format!("{}{}.*", self.kv.prefix, token(channel));
        let messages = read(
            &self.js,
            &self.kv.stream,
            filter,
            DeliverPolicy::LastPerSubject,
            None,
        )
        .await?;
        Ok(messages
            .iter()
            .filter(|message| !is_kv_removal(message))
            .filter_map(|message| serde_json::from_slice(&message.payload).ok())
            .collect())
    }

    /// Re-puts every entry this node wrote, then takes back any removed meanwhile.
    async fn refresh_presence(&self) {
        let before = self.entries.snapshot();
        if before.is_empty() || self.ready().is_err() {
            return;
        }
        let puts: Vec<(String, ClientInfo)> = before
            .iter()
            .flat_map(|(channel, clients)| {
                clients
                    .iter()
                    .map(|client| (channel.clone(), client.clone()))
            })
            .collect();
        let failed = futures_util::stream::iter(puts)
            .map(|(channel, client)| async move { self.put_presence(&channel, &client).await })
            .buffer_unordered(64)
            .filter(|result| std::future::ready(result.is_err()))
            .count()
            .await;
        if failed > 0 {
            tracing::warn!(failed, "NATS presence refresh failed; checking the bucket");
            if let Err(err) = ensure(&self.js, &self.names, &self.options).await {
                tracing::warn!(err, "NATS presence bucket unavailable");
            }
        }
        let after: HashSet<(String, ClientId)> = self
            .entries
            .snapshot()
            .into_iter()
            .flat_map(|(channel, clients)| {
                clients
                    .into_iter()
                    .map(move |c| (channel.clone(), c.client_id))
            })
            .collect();
        for (channel, clients) in before {
            for client in clients {
                if !after.contains(&(channel.clone(), client.client_id)) {
                    let _ = self
                        .kv
                        .purge(Self::presence_key(&channel, client.client_id))
                        .await;
                }
            }
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
    ) -> BrokerFuture<'a, StreamPosition> {
        Box::pin(self.inner.publish(channel, request))
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

    fn status(&self) -> BrokerStatus {
        BrokerStatus {
            kind: "nats",
            connected: self.inner.ready().is_ok(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::conformance::{self, Event, Recorder, json};

    fn url() -> Option<String> {
        let url = std::env::var("RUSTY_SOCKS_TEST_NATS_URL").ok();
        if url.is_none() {
            println!("skipped: RUSTY_SOCKS_TEST_NATS_URL not set");
        }
        url
    }

    /// Options with a fresh prefix, so runs never share a stream.
    fn options(url: &str) -> NatsOptions {
        NatsOptions {
            url: url.to_owned(),
            prefix: format!("test{}", &uuid::Uuid::new_v4().simple().to_string()[..10]),
            presence_ttl: Duration::from_secs(3),
            history_max_bytes: 64 << 20,
        }
    }

    async fn connect(options: &NatsOptions, events: Arc<Recorder>) -> Arc<NatsBroker> {
        Arc::new(
            NatsBroker::connect(options.clone(), events)
                .await
                .expect("connect to NATS"),
        )
    }

    /// Deletes what a run created on the server.
    async fn cleanup(options: &NatsOptions) {
        if let Ok(client) = async_nats::connect(options.url.as_str()).await {
            let js = jetstream::new(client);
            let names = Names {
                prefix: options.prefix.clone(),
            };
            let _ = js.delete_stream(names.stream()).await;
            let _ = js.delete_key_value(names.bucket()).await;
        }
    }

    fn request(data: &str, size: usize, max_bytes: usize) -> PublishRequest {
        PublishRequest {
            data: json(data),
            client_id: None,
            history: HistoryLimits {
                size,
                ttl: None,
                max_bytes,
            },
        }
    }

    fn offsets(page: &HistoryPage) -> Vec<u64> {
        page.publications.iter().map(|p| p.offset).collect()
    }

    #[test]
    fn tokens_and_limits_round_trip() {
        assert_eq!(token(""), "_");
        assert!(!token("a.b *>").contains(['.', '*', '>', ' ']));
        for limits in [
            HistoryLimits {
                size: 3,
                ttl: None,
                max_bytes: 10,
            },
            HistoryLimits {
                size: 0,
                ttl: Some(Duration::from_millis(1500)),
                max_bytes: 0,
            },
        ] {
            assert_eq!(decode_limits(&encode_limits(limits)), Ok(limits));
        }
        assert!(decode_limits("1 2").is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn nats_broker_passes_the_conformance_suite() {
        let Some(url) = url() else { return };
        let options = options(&url);
        conformance::run_all(|events| {
            let options = options.clone();
            async move {
                let broker = NatsBroker::connect(options, events).await;
                Arc::new(broker.expect("connect to NATS")) as Arc<dyn Broker>
            }
        })
        .await;
        cleanup(&options).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_histories_byte_limits_and_empty_histories() {
        let Some(url) = url() else { return };
        let options = options(&url);
        let broker = connect(&options, Arc::new(Recorder::default())).await;
        let c = "long.*>";
        for n in 1..=50 {
            let position = broker
                .publish(c, request(&n.to_string(), 40, 1 << 20))
                .await;
            assert_eq!(position.expect("publish").offset, n);
        }
        let all = broker.history(c, None, 100).await.expect("history");
        assert_eq!(
            offsets(&all),
            (11..=50).collect::<Vec<_>>(),
            "read through a consumer"
        );
        assert_eq!(all.publications[0].data.get(), "11");
        let since = broker.history(c, Some(20), 5).await.expect("history");
        assert_eq!(offsets(&since), vec![21, 22, 23, 24, 25]);
        let recent = broker
            .history(c, Some(45), usize::MAX)
            .await
            .expect("history");
        assert_eq!(offsets(&recent), vec![46, 47, 48, 49, 50], "read backwards");

        let b = "bytes";
        for data in ["11", "22", "33", "123456"] {
            broker
                .publish(b, request(data, 10, 5))
                .await
                .expect("publish");
        }
        let page = broker.history(b, None, 10).await.expect("history");
        assert_eq!(page.position.offset, 4);
        assert_eq!(
            offsets(&page),
            vec![2, 3],
            "5 bytes at most; oversized never kept"
        );

        let z = "size zero";
        broker
            .publish(z, request("1", 0, 100))
            .await
            .expect("publish");
        let page = broker.history(z, None, 10).await.expect("history");
        assert_eq!((page.position.offset, page.publications.len()), (1, 0));

        let empty = broker.history("empty", None, 10).await.expect("history");
        let again = broker.history("empty", None, 10).await.expect("history");
        assert_eq!(empty.position.offset, 0);
        assert_eq!(
            empty.position, again.position,
            "the epoch marker makes it stable"
        );
        let first = broker
            .publish("empty", request("1", 10, 100))
            .await
            .expect("publish");
        assert_eq!(
            first,
            StreamPosition {
                offset: 1,
                epoch: empty.position.epoch
            }
        );
        cleanup(&options).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn two_nodes_share_publications_and_presence() {
        let Some(url) = url() else { return };
        let options = options(&url);
        let (events_a, events_b) = (Arc::new(Recorder::default()), Arc::new(Recorder::default()));
        let a = connect(&options, events_a.clone()).await;
        let b = connect(&options, events_b.clone()).await;
        let c = "shared room.>";
        a.subscribe(c).await.expect("subscribe");
        b.subscribe(c).await.expect("subscribe");
        let tasks: Vec<_> = [&a, &b]
            .into_iter()
            .map(|node| {
                let node = Arc::clone(node);
                tokio::spawn(async move {
                    for n in 0..30 {
                        node.publish(c, request(&n.to_string(), 100, 1 << 20))
                            .await
                            .expect("publish");
                    }
                })
            })
            .collect();
        for task in tasks {
            task.await.expect("publisher");
        }
        let expected: Vec<Event> = (1..=60).map(|n| Event::Publication(c.into(), n)).collect();
        assert_eq!(
            events_a.wait_for(c, 60).await,
            expected,
            "in order, exactly once"
        );
        assert_eq!(
            events_b.wait_for(c, 60).await,
            expected,
            "in order, exactly once"
        );

        let alice = ClientInfo {
            client_id: uuid::Uuid::new_v4(),
            user: Some("alice".into()),
            info: None,
        };
        let bob = ClientInfo {
            client_id: uuid::Uuid::new_v4(),
            user: Some("bob".into()),
            info: None,
        };
        a.add_presence(c, alice.clone()).await.expect("presence");
        b.add_presence(c, bob.clone()).await.expect("presence");
        for node in [&a, &b] {
            let mut present = node.presence(c).await.expect("presence");
            present.sort_by_key(|client| client.user.clone());
            assert_eq!(present, vec![alice.clone(), bob.clone()]);
        }
        a.publish_join(c, alice.clone()).await.expect("join");
        let got = events_b.wait_for(c, 61).await;
        assert_eq!(got.last(), Some(&Event::Join(c.into(), alice.client_id)));

        // Node b dies without removing its entry: it expires; a's own is refreshed.
        drop(b);
        tokio::time::sleep(options.presence_ttl + Duration::from_secs(2)).await;
        assert_eq!(a.presence(c).await.expect("presence"), vec![alice]);
        cleanup(&options).await;
    }

    #[tokio::test]
    async fn an_unreachable_server_fails_fast() {
        let started = std::time::Instant::now();
        let mut options = options("nats://127.0.0.1:1");
        options.url = "nats://127.0.0.1:1".into();
        let result = NatsBroker::connect(options, Arc::new(Recorder::default())).await;
        assert!(
            matches!(&result, Err(BrokerError::Connect { url, .. }) if url == "nats://127.0.0.1:1"),
            "{result:?}"
        );
        assert!(started.elapsed() < Duration::from_secs(4));
    }
}
