//! The Redis broker: several nodes share channels through one Redis server.
//!
//! - **Offsets and history**: one Lua script per publish assigns the channel's next offset
//!   (`HINCRBY` on a meta hash that also holds the epoch), appends to a Redis Stream whose
//!   entry IDs are the offsets, trims it to the namespace's bounds, and `PUBLISH`es the
//!   publication, all atomically. Scripts run one at a time, so every node receives a
//!   channel's publications in offset order.
//! - **Pipelines**: [`Broker::publish_batch`] sends the scripts of several publishes back to
//!   back on the command connection and then reads the answers (`pipeline.rs`): Redis runs
//!   them in that order, and they reach the other nodes together, the first announced with
//!   their number (`r|<n>|<offset>`, see [`super::wire`]).
//! - **Live delivery**: Redis pub/sub, one Redis channel per channel, subscribed on one
//!   connection per node only while the node has local subscribers. Each publication crosses
//!   Redis once per subscribed node.
//! - **Presence**: a hash of entries and a sorted set of their expiry times per channel. Each
//!   node refreshes its own entries every third of `RUSTY_SOCKS_PRESENCE_TTL`; a node that dies
//!   stops refreshing, and its entries are dropped by the next read after the TTL.
//! - **Transitions** (webhooks' occupied/vacated/member events): per holding a set of the
//!   nodes that hold it, changed by one script per call, and a heartbeat per node; survivors
//!   claim dead nodes atomically. See `transitions.rs`.
//! - **Deadlines**: every command, connection attempt and subscription change waits at most
//!   [`RedisOptions::timeout`]. A command connection whose command timed out (or was abandoned
//!   at a caller's deadline) is replaced, so a link that went silently dead recovers.
//! - **Failure**: pub/sub is at-most-once. When the pub/sub connection drops, this node
//!   reports itself unavailable, reconnects with capped exponential backoff, resubscribes,
//!   and compares every channel's position with the last one it delivered: channels that moved
//!   meanwhile get [`BrokerEvents::on_gap`], so their clients recover from history instead of
//!   losing messages quietly. Offsets that jump in the live stream are reported the same way.
//!
//! Keys (`P` is `RUSTY_SOCKS_BROKER_PREFIX`, `C` the channel): `P:{C}:meta` (epoch, offset,
//! history bytes and bounds), `P:{C}:history` (stream), `P:{C}:presence` (hash),
//! `P:{C}:presence-exp` (sorted set), `P:{C}:idem:K` (idempotency key `K`: `epoch|offset`,
//! expiring after `RUSTY_SOCKS_IDEMPOTENCY_WINDOW`); pub/sub channel `P:live:C`. Channel keys expire after a
//! day without publications or reads (or the history TTL, if longer); a later publication
//! starts a new epoch. Reads and subscriptions of a channel that has no keys create none: its
//! position is offset 0 with the empty epoch until its first publication.

mod commands;
mod pipeline;
mod scripts;
mod transitions;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::Script;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::{CancellationToken, DropGuard};

use super::batch::Batch;
use super::local::{PresenceEntries, Subscriptions};
use super::wire::{self, WireEvent};
use super::{
    Broker, BrokerError, BrokerEvents, BrokerFuture, BrokerStatus, ClientInfo, HistoryPage,
    PublishRequest, Published,
};
use crate::types::ClientId;
use crate::types::{Publication, StreamPosition};
use scripts::{HISTORY, PRESENCE_ADD, PRESENCE_READ, PUBLISH, script};

/// Position reads in flight at once while catching up after a reconnect.
const CATCH_UP_READS: usize = 32;
/// How long a channel's stream outlives its last publication or read.
const STREAM_KEEP: Duration = Duration::from_secs(24 * 3600);
/// Longest pause between reconnect attempts.
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// How often the pub/sub connection is checked with a `PING`: a silently dead connection is
/// noticed within this interval plus [`RedisOptions::timeout`].
const PING_EVERY: Duration = Duration::from_secs(1);
/// Expired presence entries removed per script call (Lua's `unpack` takes at most a few
/// thousand values, and one call must stay short: Redis runs nothing else meanwhile).
const PRESENCE_CHUNK: usize = 1000;
/// Cap on a history read (Lua numbers are doubles; `usize::MAX` would not survive).
const MAX_READ: usize = 1_000_000_000;

/// Settings of a [`RedisBroker`].
#[derive(Debug, Clone)]
pub struct RedisOptions {
    /// `redis://host:port[/db]`.
    pub url: String,
    /// Prefix of every key and pub/sub channel.
    pub prefix: String,
    /// How long presence entries outlive their node's last refresh.
    pub presence_ttl: Duration,
    /// Deadline of every command, connection attempt and subscription change
    /// (`RUSTY_SOCKS_BROKER_TIMEOUT`).
    pub timeout: Duration,
}

/// A request to the pub/sub task: make the connection's subscription to a channel match
/// [`Subscriptions::wanted`], then answer.
struct Sync {
    channel: String,
    done: Option<oneshot::Sender<Result<(), BrokerError>>>,
}

struct Shared {
    options: RedisOptions,
    client: redis::Client,
    commands: commands::Commands,
    events: Arc<dyn BrokerEvents>,
    subscriptions: Subscriptions,
    presence: PresenceEntries,
    connected: AtomicBool,
    sync: mpsc::UnboundedSender<Sync>,
    publish: Script,
    history: Script,
    presence_add: Script,
    presence_read: Script,
}

/// Broker over Redis; see the module docs.
pub struct RedisBroker {
    shared: Arc<Shared>,
    /// This node's id and scripts for cluster-wide transitions.
    tracking: transitions::Tracking,
    /// Stops the background tasks when the broker is dropped.
    _stop: DropGuard,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("url", &super::redact(&self.shared.options.url))
            .field("prefix", &self.shared.options.prefix)
            .finish_non_exhaustive()
    }
}

fn unavailable(err: redis::RedisError) -> BrokerError {
    BrokerError::Unavailable(format!("redis: {err}"))
}

/// What the [`PUBLISH`] script returns: epoch, offset, and `1` for a duplicate.
type PublishReply = (String, u64, u8);

fn published((epoch, offset, duplicate): PublishReply) -> Published {
    Published {
        position: StreamPosition { offset, epoch },
        duplicate: duplicate == 1,
    }
}

fn millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

impl RedisBroker {
    /// Connects (both the command and the pub/sub connection must come up within a few
    /// seconds) and starts the pub/sub and presence-refresh tasks.
    pub async fn connect(
        options: RedisOptions,
        events: Arc<dyn BrokerEvents>,
    ) -> Result<Self, BrokerError> {
        let failed = |reason: String| BrokerError::Connect {
            url: super::redact(&options.url),
            reason,
        };
        let client =
            redis::Client::open(options.url.as_str()).map_err(|e| failed(e.to_string()))?;
        let timeout = options.timeout;
        let commands = commands::Commands::connect(client.clone(), timeout)
            .await
            .map_err(|e| failed(e.to_string()))?;
        let pubsub = tokio::time::timeout(timeout, client.get_async_pubsub())
            .await
            .map_err(|_| failed("timed out".into()))?
            .map_err(|e| failed(e.to_string()))?;
        let (sync, requests) = mpsc::unbounded_channel();
        let shared = Arc::new(Shared {
            options,
            client,
            commands,
            events,
            subscriptions: Subscriptions::default(),
            presence: PresenceEntries::default(),
            connected: AtomicBool::new(true),
            sync,
            publish: script(PUBLISH),
            history: script(HISTORY),
            presence_add: script(PRESENCE_ADD),
            presence_read: script(PRESENCE_READ),
        });
        let stop = CancellationToken::new();
        tokio::spawn(pubsub_task(
            Arc::clone(&shared),
            pubsub,
            requests,
            stop.clone(),
        ));
        tokio::spawn(refresh_presence(Arc::clone(&shared), stop.clone()));
        Ok(Self {
            shared,
            tracking: transitions::Tracking::new(),
            _stop: stop.drop_guard(),
        })
    }
}

impl Shared {
    fn key(&self, channel: &str, what: &str) -> String {
        format!("{}:{{{channel}}}:{what}", self.options.prefix)
    }

    /// The [`PUBLISH`] script's invocation for `request` on `channel`; `run` is how many
    /// publications it starts that are pipelined together (1: just itself), announced to the
    /// receiving nodes so they wake their subscribers once for all of them.
    fn publish_invocation(
        &self,
        channel: &str,
        request: &PublishRequest,
        run: usize,
    ) -> redis::ScriptInvocation<'_> {
        let limits = request.history;
        let keep = STREAM_KEEP.max(limits.ttl.unwrap_or_default());
        // The key shares the channel's hash tag, so the script may touch it in a cluster.
        let (idem, window) = match &request.idempotency {
            Some(i) => (
                format!("idem:{}", i.key),
                millis(i.window).max(1).to_string(),
            ),
            None => (String::from("idem"), String::new()),
        };
        let mut invocation = self.publish.prepare_invoke();
        invocation
            .key(self.key(channel, "meta"))
            .key(self.key(channel, "history"))
            .key(self.key(channel, &idem))
            .arg(self.live(channel))
            .arg(request.data.get())
            .arg(request.client_id.map(|c| c.to_string()).unwrap_or_default())
            .arg(limits.size.min(MAX_READ))
            .arg(limits.ttl.map_or(0, millis))
            .arg(limits.max_bytes.min(MAX_READ))
            .arg(millis(keep))
            .arg(crate::broker::history::new_epoch())
            .arg(window)
            .arg(if run > 1 {
                run.to_string()
            } else {
                String::new()
            });
        invocation
    }

    fn live_prefix(&self) -> String {
        format!("{}:live:", self.options.prefix)
    }

    fn live(&self, channel: &str) -> String {
        format!("{}{channel}", self.live_prefix())
    }

    /// Asks the pub/sub task to apply the channel's subscription state and waits for it.
    async fn sync(&self, channel: &str) -> Result<(), BrokerError> {
        let (done, answer) = oneshot::channel();
        let request = Sync {
            channel: channel.to_owned(),
            done: Some(done),
        };
        if self.sync.send(request).is_err() {
            return Err(BrokerError::Unavailable("redis broker stopped".into()));
        }
        // The request stays queued if this gives up: the pub/sub task applies whatever the
        // node wants when it gets to it.
        match tokio::time::timeout(self.options.timeout, answer).await {
            Ok(answer) => answer
                .unwrap_or_else(|_| Err(BrokerError::Unavailable("redis broker stopped".into()))),
            Err(_) => Err(BrokerError::Unavailable(
                "redis: subscription change timed out".into(),
            )),
        }
    }

    /// Position and history; `limit` 0 reads the position only.
    async fn read(
        &self,
        channel: &str,
        since: Option<u64>,
        limit: usize,
    ) -> Result<HistoryPage, BrokerError> {
        let (lease, mut conn) = self.commands.get().await?;
        let reply: Vec<String> = lease.finish(
            self.history
                .key(self.key(channel, "meta"))
                .key(self.key(channel, "history"))
                .arg(since.map(|s| s.to_string()).unwrap_or_default())
                .arg(limit.min(MAX_READ))
                .arg(millis(STREAM_KEEP))
                .invoke_async(&mut conn)
                .await,
        )?;
        let mut fields = reply.into_iter();
        let epoch = fields.next().unwrap_or_default();
        let offset = fields.next().and_then(|o| o.parse().ok()).unwrap_or(0);
        let mut publications = Vec::new();
        while let (Some(offset), Some(client), Some(data)) =
            (fields.next(), fields.next(), fields.next())
        {
            let publication = Publication {
                offset: offset.parse().unwrap_or(0),
                data: serde_json::value::RawValue::from_string(data)
                    .map_err(|e| BrokerError::Unavailable(format!("corrupt history: {e}")))?
                    .into(),
                client_id: client.parse().ok(),
            };
            publications.push(publication);
        }
        Ok(HistoryPage {
            position: StreamPosition { offset, epoch },
            publications,
        })
    }

    async fn write_presence(
        &self,
        channel: &str,
        clients: &[ClientInfo],
    ) -> Result<(), BrokerError> {
        if clients.is_empty() {
            return Ok(());
        }
        let mut invocation = self.presence_add.prepare_invoke();
        invocation
            .key(self.key(channel, "presence"))
            .key(self.key(channel, "presence-exp"))
            .arg(millis(self.options.presence_ttl));
        for client in clients {
            let info = serde_json::to_string(client)
                .map_err(|e| BrokerError::Unavailable(e.to_string()))?;
            invocation.arg(client.client_id.to_string()).arg(info);
        }
        let (lease, mut conn) = self.commands.get().await?;
        lease.finish(invocation.invoke_async::<i64>(&mut conn).await)?;
        Ok(())
    }

    /// Takes one pub/sub message into `batch`; `true` if the batch must be delivered now.
    fn receive(&self, message: &redis::Msg, batch: &mut Batch) -> bool {
        let Some(channel) = message
            .get_channel_name()
            .strip_prefix(self.live_prefix().as_str())
        else {
            return false;
        };
        let event = match wire::decode(message.get_payload_bytes()) {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(%err, channel, "dropping a message from redis");
                return false;
            }
        };
        match event {
            WireEvent::Publication { epoch, publication } => {
                let continuity = self
                    .subscriptions
                    .observe(channel, &epoch, publication.offset);
                batch.take(&*self.events, channel, &epoch, publication, continuity, 1)
            }
            WireEvent::Run { run, offset } => {
                if self.subscriptions.wanted(channel) {
                    batch.announce(channel, run, offset);
                }
                false
            }
            WireEvent::Join(client) if self.subscriptions.wanted(channel) => {
                batch.join(channel, client)
            }
            WireEvent::Leave(client) if self.subscriptions.wanted(channel) => {
                batch.leave(channel, client)
            }
            WireEvent::Join(_) | WireEvent::Leave(_) => false,
        }
    }

    /// After a reconnect: every channel whose stream moved while we were away gets a gap.
    async fn catch_up(&self, channels: &[String]) {
        // Several reads at once: a node with thousands of channels must finish well within
        // the guard's catch-up deadline, or every channel is reported as a gap.
        futures_util::stream::iter(channels)
            .for_each_concurrent(CATCH_UP_READS, |channel| async move {
                match self.read(channel, None, 0).await {
                    Ok(page) => {
                        if self.subscriptions.catch_up(channel, page.position) {
                            self.events.on_gap(channel);
                        }
                    }
                    // We cannot tell: assume the worst.
                    Err(_) => self.events.on_gap(channel),
                }
            })
            .await;
    }
}

/// Owns the pub/sub connection: applies subscription changes in order, delivers messages,
/// and reconnects with backoff when the connection is lost.
async fn pubsub_task(
    shared: Arc<Shared>,
    first: redis::aio::PubSub,
    mut requests: mpsc::UnboundedReceiver<Sync>,
    stop: CancellationToken,
) {
    let mut connection = Some(first);
    let mut backoff = Duration::from_millis(100);
    let mut batch = Batch::default();
    loop {
        let pubsub = match connection.take() {
            Some(pubsub) => Ok(pubsub),
            None => tokio::time::timeout(shared.options.timeout, shared.client.get_async_pubsub())
                .await
                .unwrap_or_else(|_| {
                    Err(redis::RedisError::from(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    )))
                }),
        };
        match pubsub {
            Ok(pubsub) => {
                let (sink, stream) = pubsub.split();
                let lost = serve(&shared, sink, stream, &mut requests, &stop, &mut batch).await;
                // What arrived before the loss goes out before any gap the reconnect reports.
                batch.flush(&*shared.events);
                shared.connected.store(false, Ordering::Release);
                match lost {
                    Ok(()) => return, // stopped
                    Err(err) => tracing::warn!(%err, "redis pub/sub connection lost; reconnecting"),
                }
                backoff = Duration::from_millis(100);
            }
            Err(err) => {
                tracing::warn!(%err, ?backoff, "redis unreachable; retrying");
            }
        }
        // Wait before the next attempt, refusing subscription changes meanwhile (the caller
        // gets an error reply; nothing is pretended).
        let jitter = Duration::from_millis(u64::from(uuid::Uuid::new_v4().as_bytes()[0]));
        let pause = tokio::time::sleep(backoff + jitter);
        tokio::pin!(pause);
        loop {
            tokio::select! {
                () = &mut pause => break,
                () = stop.cancelled() => return,
                request = requests.recv() => match request {
                    Some(mut request) => {
                        if let Some(done) = request.done.take() {
                            let _ = done.send(Err(BrokerError::Unavailable(
                                "redis pub/sub connection is down".into(),
                            )));
                        }
                    }
                    None => return,
                },
            }
        }
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Runs one pub/sub connection until it fails (`Err`) or the broker stops (`Ok`). Messages go
/// to the node through `batch` (see [`Batch`]); what it still holds on return is the
/// caller's to flush.
async fn serve(
    shared: &Shared,
    mut sink: PubSubSink,
    mut stream: PubSubStream,
    requests: &mut mpsc::UnboundedReceiver<Sync>,
    stop: &CancellationToken,
    batch: &mut Batch,
) -> Result<(), redis::RedisError> {
    let wanted = shared.subscriptions.channels();
    let mut active: HashSet<String> = HashSet::new();
    if !wanted.is_empty() {
        let names: Vec<String> = wanted.iter().map(|c| shared.live(c)).collect();
        within(shared, sink.subscribe(names)).await?;
        active.extend(wanted.iter().cloned());
        shared.catch_up(&wanted).await;
    }
    shared.connected.store(true, Ordering::Release);
    let mut ping = tokio::time::interval(PING_EVERY);
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return Ok(()),
            message = stream.next() => match message {
                Some(message) => if shared.receive(&message, batch) {
                    batch.flush(&*shared.events);
                },
                None => return Err(redis::RedisError::from(std::io::Error::from(
                    std::io::ErrorKind::ConnectionReset,
                ))),
            },
            () = batch.due(), if batch.holding() => batch.flush(&*shared.events),
            request = requests.recv() => {
                let Some(mut request) = request else { return Ok(()) };
                let outcome = apply(shared, &mut sink, &mut active, &request.channel).await;
                let failed = outcome.as_ref().err().map(|e| e.to_string());
                if let Some(done) = request.done.take() {
                    let _ = done.send(outcome.map_err(unavailable));
                }
                if let Some(err) = failed {
                    return Err(redis::RedisError::from(std::io::Error::other(err)));
                }
            }
            _ = ping.tick() => {
                within(shared, sink.ping::<redis::Value>()).await?;
            }
        }
    }
}

/// Makes the connection's subscription to `channel` match what the node wants now.
async fn apply(
    shared: &Shared,
    sink: &mut PubSubSink,
    active: &mut HashSet<String>,
    channel: &str,
) -> Result<(), redis::RedisError> {
    let wanted = shared.subscriptions.wanted(channel);
    let have = active.contains(channel);
    if wanted && !have {
        within(shared, sink.subscribe(shared.live(channel))).await?;
        active.insert(channel.to_owned());
    } else if !wanted && have {
        within(shared, sink.unsubscribe(shared.live(channel))).await?;
        active.remove(channel);
    }
    Ok(())
}

/// `call` on the pub/sub connection under the deadline; a timeout is an error that makes the
/// task drop the connection and reconnect.
async fn within<T>(
    shared: &Shared,
    call: impl Future<Output = Result<T, redis::RedisError>>,
) -> Result<T, redis::RedisError> {
    tokio::time::timeout(shared.options.timeout, call)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from(std::io::Error::from(
                std::io::ErrorKind::TimedOut,
            )))
        })
}

/// Re-writes this node's presence entries well before they expire.
async fn refresh_presence(shared: Arc<Shared>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(shared.options.presence_ttl / 3);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        for (channel, clients) in shared.presence.snapshot() {
            if let Err(err) = shared.write_presence(&channel, &clients).await {
                tracing::warn!(%err, channel, "presence refresh failed");
            }
        }
    }
}

impl Broker for RedisBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        request: PublishRequest,
    ) -> BrokerFuture<'a, Published> {
        Box::pin(async move {
            let shared = &self.shared;
            let invocation = shared.publish_invocation(channel, &request, 1);
            let (lease, mut conn) = shared.commands.get().await?;
            let reply: PublishReply = lease.finish(invocation.invoke_async(&mut conn).await)?;
            Ok(published(reply))
        })
    }

    fn publish_batch<'a>(
        &'a self,
        channel: &'a str,
        requests: Vec<PublishRequest>,
    ) -> BrokerFuture<'a, Vec<Result<Published, BrokerError>>> {
        Box::pin(self.shared.publish_pipelined(channel, requests))
    }

    fn pipelines_publish(&self) -> bool {
        true
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            let shared = &self.shared;
            let first = shared.subscriptions.add(channel);
            if let Err(err) = shared.sync(channel).await {
                if shared.subscriptions.remove(channel) {
                    let _ = shared.sync.send(Sync {
                        channel: channel.to_owned(),
                        done: None,
                    });
                }
                return Err(err);
            }
            if first {
                // The baseline for spotting skipped offsets (the empty epoch at offset 0 if
                // nothing was published: offset 1 of any epoch follows it). Without it
                // nothing can be compared: the first publication received reports a gap.
                match shared.read(channel, None, 0).await {
                    Ok(page) => shared.subscriptions.baseline(channel, page.position),
                    Err(err) => {
                        tracing::warn!(%err, channel, "redis baseline read failed; a gap will be reported");
                        shared.subscriptions.doubt(channel);
                    }
                }
            }
            Ok(())
        })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            if self.shared.subscriptions.remove(channel) {
                // A failure means the connection is gone, and with it the subscription.
                let _ = self.shared.sync(channel).await;
            }
            Ok(())
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<u64>,
        limit: usize,
    ) -> BrokerFuture<'a, HistoryPage> {
        Box::pin(self.shared.read(channel, since, limit))
    }

    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        // Recorded before anything is awaited: if the write fails (or is abandoned), the
        // refresher writes the entry on its next round.
        self.shared.presence.add(channel, client.clone());
        Box::pin(async move {
            self.shared
                .write_presence(channel, std::slice::from_ref(&client))
                .await
        })
    }

    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            let shared = &self.shared;
            shared.presence.remove(channel, client);
            let id = client.to_string();
            let (lease, mut conn) = shared.commands.get().await?;
            lease.finish(
                redis::pipe()
                    .atomic()
                    .hdel(shared.key(channel, "presence"), &id)
                    .zrem(shared.key(channel, "presence-exp"), &id)
                    .exec_async(&mut conn)
                    .await,
            )
        })
    }

    fn presence<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, Vec<ClientInfo>> {
        Box::pin(async move {
            let shared = &self.shared;
            // Each call removes at most a chunk of expired entries and says whether more are
            // left; the entries are returned by the call that finds none.
            loop {
                let (lease, mut conn) = shared.commands.get().await?;
                let reply: Vec<String> = lease.finish(
                    shared
                        .presence_read
                        .key(shared.key(channel, "presence"))
                        .key(shared.key(channel, "presence-exp"))
                        .arg(PRESENCE_CHUNK)
                        .invoke_async(&mut conn)
                        .await,
                )?;
                let mut reply = reply.into_iter();
                if reply.next().as_deref() == Some("more") {
                    continue;
                }
                return Ok(reply
                    .filter_map(|entry| serde_json::from_str(&entry).ok())
                    .collect());
            }
        })
    }

    fn publish_join<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.announce(channel, wire::presence_change(&client, false))
    }

    fn publish_leave<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.announce(channel, wire::presence_change(&client, true))
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
        (self.shared.options.presence_ttl / 3).max(Duration::from_millis(50))
    }

    fn status(&self) -> BrokerStatus {
        BrokerStatus {
            kind: "redis",
            connected: self.shared.connected.load(Ordering::Acquire),
        }
    }

    fn ping(&self) -> BrokerFuture<'_, ()> {
        Box::pin(async move {
            let (lease, mut conn) = self.shared.commands.get().await?;
            lease.finish(redis::cmd("PING").query_async::<()>(&mut conn).await)
        })
    }

    fn catch_up(&self) -> BrokerFuture<'_, bool> {
        Box::pin(async move {
            let channels = self.shared.subscriptions.channels();
            self.shared.catch_up(&channels).await;
            Ok(true)
        })
    }
}

impl RedisBroker {
    fn announce<'a>(&'a self, channel: &'a str, message: Vec<u8>) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            let (lease, mut conn) = self.shared.commands.get().await?;
            lease.finish(
                redis::cmd("PUBLISH")
                    .arg(self.shared.live(channel))
                    .arg(message)
                    .query_async::<i64>(&mut conn)
                    .await,
            )?;
            Ok(())
        })
    }
}

#[cfg(test)]
mod tests;
