//! Channel history on the JetStream stream: the message format (`Rs-*` headers, decoded as
//! [`Stored`]), offsets and epochs published with `Nats-Expected-Last-Subject-Sequence` and
//! retried on conflict, the periodic purge, and history reads (following `Rs-Prev` for short
//! ones, a consumer scan for long ones) with the memory broker's retention applied.
//!
//! Kept apart from live delivery and presence because everything here is about what the
//! stream stores and how a position is agreed on between nodes.

use std::sync::Arc;
use std::time::Duration;

use async_nats::header::{HeaderName, HeaderValue};
use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::DirectGetErrorKind;
use async_nats::{HeaderMap, header};
use bytes::Bytes;
use serde_json::value::RawValue;
use time::OffsetDateTime;

use super::{Inner, ensure, read, token, unavailable};

mod pipeline;
use crate::broker::history::{HistoryLimits, new_epoch};
use crate::broker::{BrokerError, HistoryPage, PublishRequest, Published};
use crate::types::ClientId;
use crate::types::{Publication, StreamPosition};

/// Publish attempts per call under contention before giving up.
const PUBLISH_ATTEMPTS: u32 = 100;
/// Every this many offsets, the publisher purges the channel's subject.
const PURGE_EVERY: u64 = 64;
/// History reads needing at most this many messages follow `Rs-Prev` with direct gets;
/// longer ones read the subject through a consumer.
const WALK_MAX: u64 = 16;
/// Cached channel heads kept before idle ones are dropped.
const HEADS_MAX: usize = 4096;

// Names built once: a name given as `&str` is validated and copied on every insert and get.
const H_EPOCH: HeaderName = HeaderName::from_static("Rs-Epoch");
const H_OFFSET: HeaderName = HeaderName::from_static("Rs-Offset");
const H_CLIENT: HeaderName = HeaderName::from_static("Rs-Client");
const H_PREV: HeaderName = HeaderName::from_static("Rs-Prev");
const H_LIMITS: HeaderName = HeaderName::from_static("Rs-Limits");
/// On the first append of a pipeline only: how many publications it starts (itself
/// included), all sent right after its ack. A feed holding it waits for the others (see
/// `live`), so the pipeline reaches subscribers as one batch. Readers that do not know it
/// ignore it.
const H_RUN: HeaderName = HeaderName::from_static("Rs-Run");

pub(super) fn encode_limits(limits: HistoryLimits) -> String {
    let ttl = limits
        .ttl
        .map_or_else(|| "-".to_owned(), |ttl| ttl.as_millis().to_string());
    format!("{} {} {ttl}", limits.size, limits.max_bytes)
}

pub(super) fn decode_limits(text: &str) -> Result<HistoryLimits, String> {
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
pub(super) struct Stored {
    pub(super) seq: u64,
    pub(super) epoch: String,
    pub(super) offset: u64,
    pub(super) prev: u64,
    pub(super) client_id: Option<ClientId>,
    /// `None` on an epoch marker.
    pub(super) limits: Option<HistoryLimits>,
    pub(super) time: OffsetDateTime,
    pub(super) data: Bytes,
}

impl Stored {
    fn parse(
        seq: u64,
        time: OffsetDateTime,
        headers: Option<&HeaderMap>,
        data: Bytes,
    ) -> Result<Self, String> {
        let headers = headers.ok_or("no headers")?;
        let get = |name: HeaderName| headers.get(name).map(HeaderValue::as_str);
        let number = |name: HeaderName| get(name).map(str::parse::<u64>).transpose();
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

    pub(super) fn from_consumer(message: &jetstream::Message) -> Result<Self, String> {
        let info = message.info().map_err(|err| err.to_string())?;
        Self::parse(
            info.stream_sequence,
            info.published,
            message.headers.as_ref(),
            message.payload.clone(),
        )
    }

    pub(super) fn position(&self) -> StreamPosition {
        StreamPosition {
            offset: self.offset,
            epoch: self.epoch.clone(),
        }
    }

    pub(super) fn publication(&self) -> Result<Publication, String> {
        Ok(Publication {
            offset: self.offset,
            data: json_data(&self.data)?,
            client_id: self.client_id,
        })
    }
}

/// A publication's data as stored: JSON text, checked.
fn json_data(data: &[u8]) -> Result<Arc<RawValue>, String> {
    let text = String::from_utf8(data.to_vec()).map_err(|_| "data is not UTF-8")?;
    let data = RawValue::from_string(text).map_err(|_| "data is not JSON")?;
    Ok(Arc::from(data))
}

/// What live delivery needs of a message from a feed's consumer: decoded without the stream
/// sequence, time, previous sequence and limits that only history reads use, and borrowing
/// the epoch from the message, since every message of a feed is decoded.
#[derive(Debug)]
pub(super) struct Arrived<'a> {
    pub(super) epoch: &'a str,
    /// `None` for an epoch marker (offset 0), which is not a publication.
    pub(super) publication: Option<Publication>,
    /// How many publications this one starts, sent together (`Rs-Run`; 1 if absent).
    pub(super) run: u64,
}

impl<'a> Arrived<'a> {
    pub(super) fn decode(message: &'a jetstream::Message) -> Result<Self, String> {
        let headers = message.headers.as_ref().ok_or("no headers")?;
        let get = |name: HeaderName| headers.get(name).map(HeaderValue::as_str);
        let epoch = get(H_EPOCH).ok_or("no epoch")?;
        let offset = get(H_OFFSET)
            .and_then(|offset| offset.parse::<u64>().ok())
            .ok_or("bad offset")?;
        if offset == 0 {
            return Ok(Self {
                epoch,
                publication: None,
                run: 1,
            });
        }
        let client_id = get(H_CLIENT)
            .map(str::parse)
            .transpose()
            .map_err(|_| "bad client id")?;
        let run = get(H_RUN)
            .map(str::parse::<u64>)
            .transpose()
            .map_err(|_| "bad run")?
            .unwrap_or(1);
        Ok(Self {
            epoch,
            publication: Some(Publication {
                offset,
                data: json_data(&message.payload)?,
                client_id,
            }),
            run,
        })
    }
}

/// A request's limits and client id as header values, kept across the appends of a pipeline
/// (the requests of one connection share them), so each is formatted once, not per append.
#[derive(Debug, Default)]
pub(super) struct Encoded {
    of: Option<(HistoryLimits, Option<ClientId>)>,
    limits: HeaderValue,
    client: Option<HeaderValue>,
}

impl Encoded {
    fn of(&mut self, request: &PublishRequest) -> (&HeaderValue, Option<&HeaderValue>) {
        let key = (request.history, request.client_id);
        if self.of != Some(key) {
            self.limits = HeaderValue::from(encode_limits(request.history));
            self.client = request
                .client_id
                .map(|client| HeaderValue::from(client.to_string()));
            self.of = Some(key);
        }
        (&self.limits, self.client.as_ref())
    }
}

/// The headers of a publication at `offset` of `epoch`, following stream sequence `prev`.
/// The caller adds what JetStream must check before storing it.
fn headers(
    epoch: &str,
    offset: u64,
    prev: u64,
    request: &PublishRequest,
    encoded: &mut Encoded,
) -> HeaderMap {
    let (limits, client) = encoded.of(request);
    let mut headers = HeaderMap::new();
    headers.insert(H_EPOCH, epoch);
    headers.insert(H_OFFSET, offset.to_string());
    headers.insert(H_PREV, prev.to_string());
    headers.insert(H_LIMITS, limits.clone());
    if let Some(client) = client {
        headers.insert(H_CLIENT, client.clone());
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

/// The last message of a channel's subject, as this node last published it.
#[derive(Debug, Clone)]
pub(super) struct Head {
    seq: u64,
    offset: u64,
    epoch: String,
    /// Whether it was stored right after the channel's message before it (no other
    /// channel's or node's message in between): the stream was this channel's alone then, so
    /// the next pipeline predicts that it still is and does not wait for its first ack (see
    /// `pipeline`). `false` when read from the stream.
    alone: bool,
}

impl Head {
    fn read(last: Stored) -> Self {
        Self {
            seq: last.seq,
            offset: last.offset,
            epoch: last.epoch,
            alone: false,
        }
    }
}

enum Append {
    Done(u64),
    /// The stream already holds a message with this `Nats-Msg-Id`, at this sequence.
    Duplicate(u64),
    Conflict,
}

impl Inner {
    /// The subject's last message, if any.
    pub(super) async fn last(&self, subject: &str) -> Result<Option<Stored>, BrokerError> {
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
            Ok(ack) if ack.duplicate => Ok(Append::Duplicate(ack.sequence)),
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

    pub(super) async fn publish(
        &self,
        channel: &str,
        request: PublishRequest,
    ) -> Result<Published, BrokerError> {
        self.ready()?;
        self.heads.shrink(HEADS_MAX);
        let subject = self.names.history(channel);
        let slot = self.heads.get(channel);
        let mut head = slot.lock().await;
        let payload = Bytes::from(request.data.get().to_owned());
        for attempt in 0..PUBLISH_ATTEMPTS {
            let last = match head.take() {
                Some(head) => Some(head),
                None => self.last(&subject).await?.map(Head::read),
            };
            let (prev, offset, epoch) = match last {
                Some(last) => (last.seq, last.offset + 1, last.epoch),
                None => (0, 1, new_epoch()),
            };
            let mut headers = headers(&epoch, offset, prev, &request, &mut Encoded::default());
            headers.insert(
                header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
                prev.to_string(),
            );
            if let Some(idempotency) = &request.idempotency {
                // Deduplication is stream-wide: the channel's token makes the key per channel.
                let id = format!("{}:{}", token(channel), idempotency.key);
                headers.insert(header::NATS_MESSAGE_ID, id.as_str());
            }
            match self.append(&subject, headers, payload.clone()).await? {
                Append::Duplicate(seq) => return self.first_publish(seq).await,
                Append::Done(seq) => {
                    *head = Some(Head {
                        seq,
                        offset,
                        epoch: epoch.clone(),
                        alone: prev != 0 && seq == prev + 1,
                    });
                    if offset.is_multiple_of(PURGE_EVERY) {
                        let keep = (request.history.size as u64).saturating_add(PURGE_EVERY);
                        let purge = self.stream.purge().filter(subject.as_str()).keep(keep);
                        if let Err(err) = purge.await {
                            tracing::debug!(%err, channel, "history purge failed");
                        }
                    }
                    return Ok(Published::new(StreamPosition { offset, epoch }));
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

    /// The position of the message a duplicate publish was acknowledged with: the first
    /// publish with that key. If the stream no longer holds it (its channel keeps little
    /// history and many publications followed), its offset cannot be told: an error, rather
    /// than publishing twice or naming a wrong offset.
    async fn first_publish(&self, seq: u64) -> Result<Published, BrokerError> {
        match self.stream.direct_get(seq).await {
            Ok(message) => {
                let first = Stored::from_stream(message).map_err(unavailable)?;
                Ok(Published {
                    position: first.position(),
                    duplicate: true,
                })
            }
            Err(err) if matches!(err.kind(), DirectGetErrorKind::NotFound) => Err(unavailable(
                "this idempotency key was used already, but its first publication is no longer \
                 stored, so its offset is unknown; nothing was published",
            )),
            Err(err) => Err(unavailable(err)),
        }
    }

    pub(super) async fn history(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError> {
        self.ready()?;
        let subject = self.names.history(channel);
        // Nothing published (or all of it aged out): nothing is written either, so reading
        // a channel stores nothing.
        let Some(last) = self.last(&subject).await? else {
            return Ok(HistoryPage {
                position: StreamPosition::start(),
                publications: Vec::new(),
            });
        };
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
            self.options.timeout,
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
}
