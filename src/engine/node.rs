//! The node: wires the local [`Hub`] to the [`Broker`] and applies namespace options.
//!
//! Sessions talk to the node, never to the broker directly. The node decides when this node
//! subscribes to a channel at the broker (first local member) and unsubscribes (last one), runs
//! the recovery protocol that makes `subscribe` with `since` loss-free, and renders what the
//! broker delivers into frames, encoding each publication once for all local subscribers.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize};

use bytes::Bytes;
use serde_json::value::RawValue;
use tokio_util::sync::CancellationToken;

use crate::auth::{Identity, Verifier};
use crate::broker::history::HistoryLimits;
use crate::broker::{Broker, HistoryPage, Idempotency, PublishRequest, Published};
use crate::engine::control::{CONTROL_HISTORY, Control};
use crate::engine::hub::{BrokerReady, Hub, Joined, Left, MemberState, epoch_tag};
use crate::engine::namespace::{Access, NamespaceOptions, Namespaces};
use crate::engine::outbox::Outbox;
use crate::engine::stats::Stats;
use crate::protocol::v1::MAX_HISTORY_LIMIT;
use crate::types::error::ClientError;
use crate::types::position::is_complete_replay;
use crate::types::{ClientId, ClientInfo, Publication, StreamPosition};

/// The channel every `/ws` connection joins on connect; legacy chat is published here and its
/// frames are rendered in the legacy shapes (`Chat`, `Disconnect`).
pub const DEFAULT_CHANNEL: &str = "default";

/// The internal channel nodes use to tell each other things (a user to disconnect). Its
/// name is not a valid client channel name, so no client can subscribe or publish to it.
/// Its messages are kept in history and recovered after a gap (see [`Control`]).
pub const CONTROL_CHANNEL: &str = "$control";

mod batch;
mod closing;
mod dispatcher;
mod live;

pub use dispatcher::Dispatcher;
pub use live::NodeLive;

/// Who is asking the node to act, for the namespace permissions.
#[derive(Debug, Clone, Copy)]
pub enum Caller<'a> {
    /// The application's backend through `/api`: may do anything.
    Server,
    /// A connection, authenticated as this identity (`None`: anonymous).
    Client(Option<&'a Identity>),
}

impl Caller<'_> {
    fn allows(self, access: Access, channel: &str) -> bool {
        match self {
            Self::Server => true,
            Self::Client(who) => access.allows(who, channel),
        }
    }

    fn check(self, access: Access, channel: &str, what: &'static str) -> Result<(), ClientError> {
        if self.allows(access, channel) {
            Ok(())
        } else {
            Err(ClientError::PermissionDenied(what))
        }
    }
}

/// Settings the node applies.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Per-namespace options.
    pub namespaces: Namespaces,
    /// Options of [`DEFAULT_CHANNEL`]: [`NamespaceOptions::legacy_channel`] of the `""` namespace.
    pub legacy: NamespaceOptions,
    /// Most bytes of history kept per channel.
    pub history_bytes: usize,
    /// Most frames buffered for a member while its recovery is prepared.
    pub recovery_buffer: usize,
    /// Verifies tokens (for `refresh`), when authentication is configured.
    pub verifier: Option<Arc<Verifier>>,
    /// How long before a token expires its connection is asked to refresh it.
    pub refresh_window: std::time::Duration,
    /// How long a publish's idempotency key is remembered per channel.
    pub idempotency_window: std::time::Duration,
}

/// A successful subscription.
#[derive(Debug)]
pub struct Subscription {
    /// The membership, kept by the session.
    pub state: Arc<MemberState>,
    /// Where the stream was when live delivery took over.
    pub position: StreamPosition,
    /// `Some(true)` if `since` was given and fully recovered, `Some(false)` if not.
    pub recovered: Option<bool>,
    /// Missed (or replayed) publications, oldest first, to send before `live`.
    pub publications: Vec<Publication>,
    /// Frames that arrived during recovery, to send right after the reply.
    pub live: Vec<Bytes>,
}

/// One node: local hub, broker, namespace options.
#[derive(Debug)]
pub struct Node {
    hub: Arc<Hub>,
    broker: Arc<dyn Broker>,
    options: NodeOptions,
    default_name: Arc<str>,
    stats: Arc<Stats>,
    /// What a reload may change: namespaces and the verifier (`live.rs`). The copies in
    /// `options` are moved here at construction and not read again.
    live: arc_swap::ArcSwap<live::Snapshot>,
    /// Set when shutdown begins: every publish is refused from then on.
    shutting_down: AtomicBool,
    /// Publishes past their shutdown check whose broker call has not returned yet.
    publishing: AtomicUsize,
    /// Set when shutdown stopped waiting for those: a publish returning later is not
    /// acknowledged, since its subscribers here may already be closed.
    stopped_waiting: AtomicBool,
    /// Stops the control recovery task when the node goes.
    stop: CancellationToken,
    /// Set by [`Node::set_transition_sink`]: this node's holdings, reported to the broker.
    transitions: std::sync::OnceLock<Arc<crate::engine::transitions::Tracker>>,
}

impl Drop for Node {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl Node {
    /// A node over `hub` and `broker` (whose events sink must be a [`Dispatcher`] on `hub`).
    pub fn new(
        hub: Arc<Hub>,
        broker: Arc<dyn Broker>,
        mut options: NodeOptions,
        stats: Arc<Stats>,
    ) -> Self {
        let live = live::Snapshot::first(NodeLive {
            namespaces: std::mem::take(&mut options.namespaces),
            legacy: options.legacy.clone(),
            verifier: options.verifier.take(),
        });
        Self {
            hub,
            broker,
            options,
            default_name: Arc::from(DEFAULT_CHANNEL),
            stats,
            live,
            shutting_down: AtomicBool::new(false),
            publishing: AtomicUsize::new(0),
            stopped_waiting: AtomicBool::new(false),
            stop: CancellationToken::new(),
            transitions: std::sync::OnceLock::new(),
        }
    }

    /// Starts reporting cluster-wide transitions (occupied/vacated channels, added/removed
    /// members of presence channels) to `sink`: from now on this node tracks its holdings at
    /// the broker (see [`crate::engine::transitions`]). Set it before the node serves
    /// anyone: subscriptions made before are not counted. Call once, within a Tokio runtime;
    /// a second call is refused.
    pub fn set_transition_sink(
        &self,
        sink: Arc<dyn crate::broker::TransitionSink>,
    ) -> Result<(), &'static str> {
        let runtime = tokio::runtime::Handle::try_current()
            .map_err(|_| "set_transition_sink needs a Tokio runtime")?;
        let tracker = Arc::new(crate::engine::transitions::Tracker::new(sink));
        self.transitions
            .set(Arc::clone(&tracker))
            .map_err(|_| "a transition sink is set already")?;
        runtime.spawn(tracker.run(
            Arc::clone(&self.broker),
            Arc::clone(&self.stats),
            self.stop.child_token(),
        ));
        Ok(())
    }

    /// Waits up to `within` until the broker was told every holding change (on shutdown,
    /// after the sessions left their channels, so their transitions are decided here rather
    /// than by a survivor after the presence TTL, or, on one node, not at all).
    pub async fn settle_transitions(&self, within: std::time::Duration) {
        let Some(tracker) = self.transitions.get() else {
            return;
        };
        let deadline = tokio::time::Instant::now() + within;
        while !tracker.settled() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    /// Counts a member that joined `channel` here, when transitions are reported.
    fn track_join(&self, channel: &str, member: ClientId, client: &ClientInfo, presence: bool) {
        if let Some(tracker) = self.transitions.get() {
            let user = client.user.clone().filter(|_| presence);
            tracker.join(channel, member, user);
        }
    }

    /// Counts a member that left `channel` here, when transitions are reported.
    pub(super) fn track_leave(&self, channel: &str, member: ClientId) {
        if let Some(tracker) = self.transitions.get() {
            tracker.leave(channel, member);
        }
    }

    /// Starts listening to the other nodes' control messages (`control` is the dispatcher's,
    /// [`Dispatcher::control`]): subscribes, takes the control stream's position as the
    /// baseline (what was sent before this node started is not for it), and starts the task
    /// that recovers control messages missed in a gap.
    pub async fn start(&self, control: Arc<Control>) -> Result<(), crate::broker::BrokerError> {
        self.broker.subscribe(CONTROL_CHANNEL).await?;
        let page = self.broker.history(CONTROL_CHANNEL, None, 0).await?;
        control.baseline(page.position);
        let broker = Arc::clone(&self.broker);
        tokio::spawn(control.run_recovery(broker, self.stop.clone()));
        Ok(())
    }

    /// Asks every node (this one included) to disconnect `user`'s connections.
    pub async fn announce_disconnect(&self, user: &str) -> Result<(), ClientError> {
        let text = serde_json::json!({ "disconnect": user }).to_string();
        let data =
            RawValue::from_string(text).map_err(|e| ClientError::Unavailable(e.to_string()))?;
        let request = PublishRequest {
            data: Arc::from(data),
            client_id: None,
            // Kept, so a node whose broker link is down now can recover it later.
            history: CONTROL_HISTORY,
            idempotency: None,
        };
        self.broker
            .publish(CONTROL_CHANNEL, request)
            .await
            .map(|_| ())
            .map_err(|err| self.unavailable(&err))
    }

    fn unavailable(&self, err: &crate::broker::BrokerError) -> ClientError {
        if let crate::broker::BrokerError::StorageFull(why) = err {
            return ClientError::StorageFull(why.clone());
        }
        self.stats.broker_error();
        ClientError::Unavailable(err.to_string())
    }

    /// The local hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The broker this node distributes through.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// The server's counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }

    /// How long before a token expires its connection is asked to refresh it.
    pub fn refresh_window(&self) -> std::time::Duration {
        self.options.refresh_window
    }

    fn limits(&self, options: &NamespaceOptions) -> HistoryLimits {
        HistoryLimits {
            size: options.history_size,
            ttl: options.history_ttl(),
            max_bytes: self.options.history_bytes,
        }
    }

    /// Subscribes a connection. Live frames are buffered while the replay is read and merged
    /// by offset afterwards, so every publication reaches the client exactly once: in
    /// `publications`, in `live`, or through the outbox.
    ///
    /// With `since`, recovery is all or nothing: either every publication after it is
    /// returned (`recovered: Some(true)`) or none is (`Some(false)`). Without `since`, the
    /// newest `replay` publications are returned.
    pub async fn subscribe(
        &self,
        outbox: &Outbox,
        client: &ClientInfo,
        channel: &str,
        since: Option<&StreamPosition>,
        replay: usize,
        caller: Caller<'_>,
    ) -> Result<Subscription, ClientError> {
        let options = self.subscribe_options(channel)?;
        caller.check(
            options.subscribe,
            channel,
            "this connection may not subscribe to this channel",
        )?;
        // Recovery and replay read history: without that right the client only gets live.
        let (since, replay) = if caller.allows(options.read_history, channel) {
            (since, replay)
        } else {
            (None, 0)
        };
        let policy = options.effective_slow_policy();
        // Every legacy connection is on the default channel: share one copy of its name.
        let name: Arc<str> = if channel == DEFAULT_CHANNEL {
            Arc::clone(&self.default_name)
        } else {
            Arc::from(channel)
        };
        let state = MemberState::recovering(name, policy, self.options.recovery_buffer);
        let (ready, first) = match self.hub.subscribe(outbox, Arc::clone(&state)) {
            Joined::Already => return Err(ClientError::AlreadySubscribed(channel.to_owned())),
            Joined::First(ready) => (ready, true),
            Joined::Added(ready) => (ready, false),
        };
        // The membership exists from here, before any `.await`: `joining` takes it back out
        // (with its presence entry and a `leave` for its `join`) unless it is kept, also when
        // this future is dropped (a caller's timeout) or panics.
        self.count_subscription(channel, 1);
        self.track_join(channel, outbox.id(), client, options.presence);
        let mut joining = Joining {
            node: self,
            member: outbox.id(),
            client,
            channel,
            options: &options,
            first: None,
            broker_subscribed: true,
            presence: false,
            announced: false,
            armed: true,
        };
        let subscribed = if first {
            joining.first = Some(Arc::clone(&ready));
            // Not counted as subscribed until the broker says so: a broker call dropped
            // midway is undone by the broker itself (brokers are cancellation-safe; see
            // `broker::guard`), and a second undo here would take a later member's count.
            joining.broker_subscribed = false;
            let outcome = self.broker.subscribe(channel).await;
            joining.broker_subscribed = outcome.is_ok();
            joining.first = None;
            ready.set(outcome.is_ok());
            outcome.map_err(|err| err.to_string())
        } else if ready.wait().await {
            Ok(())
        } else {
            Err("the node could not subscribe at the broker".to_owned())
        };
        if let Err(why) = subscribed {
            joining.broker_subscribed = false;
            joining.undo().await;
            self.stats.broker_error();
            return Err(ClientError::Unavailable(why));
        }
        if options.presence {
            joining.presence = true;
            if let Err(err) = self.broker.add_presence(channel, client.clone()).await {
                tracing::warn!(%err, channel, "presence add failed");
            }
        }
        // The legacy dialect has no join notice: nothing to announce on the default channel.
        if options.join_leave && channel != DEFAULT_CHANNEL {
            joining.announced = true;
            if let Err(err) = self.broker.publish_join(channel, client.clone()).await {
                tracing::warn!(%err, channel, "join notice failed");
            }
        }
        let page = match since {
            Some(since) => {
                self.broker
                    .history(channel, Some(since.offset), usize::MAX)
                    .await
            }
            None => self.broker.history(channel, None, replay).await,
        };
        // Anything at or below the position read is in this reply (or, when recovery fails,
        // behind the position the client is told): a later live copy of it is dropped.
        let (epoch, replayed) = page.as_ref().map_or((0, 0), |page| {
            (epoch_tag(&page.position.epoch), page.position.offset)
        });
        let buffered = self.hub.finish_recovery(&state, epoch, replayed);
        let HistoryPage {
            position,
            mut publications,
        } = match page {
            Ok(page) => page,
            Err(err) => {
                joining.undo().await;
                return Err(self.unavailable(&err));
            }
        };
        joining.armed = false;
        let recovered = since.map(|since| is_complete_replay(since, &position, &publications));
        if recovered == Some(false) {
            publications.clear();
        }
        // Buffered publications of the position's epoch are in the reply up to its offset;
        // those of another epoch (its first publication, after a position `{0, ""}`, or a
        // stream that restarted meanwhile, which the broker reports as a gap) all go out.
        let mut last = (epoch, position.offset);
        let live = buffered
            .into_iter()
            .filter(|(place, _)| place.is_none_or(|(e, o)| e != epoch || o > position.offset))
            .map(|(place, frame)| {
                if let Some((e, o)) = place {
                    last = if e == last.0 {
                        (e, last.1.max(o))
                    } else {
                        (e, o)
                    };
                }
                frame
            })
            .collect();
        state.enter_epoch(last.0);
        state.replayed_through(last.1);
        Ok(Subscription {
            state,
            position,
            recovered,
            publications,
            live,
        })
    }

    /// Unsubscribes a connection; `announce` sends the leave notice (skipped on shutdown,
    /// when everyone leaves at once).
    pub async fn unsubscribe(
        &self,
        client_id: ClientId,
        client: &ClientInfo,
        channel: &str,
        announce: bool,
    ) -> Result<(), ClientError> {
        let options = self.leave_options(channel)?;
        if self
            .leave(client_id, client, channel, &options, announce)
            .await
        {
            Ok(())
        } else {
            Err(ClientError::NotSubscribed(channel.to_owned()))
        }
    }

    async fn leave(
        &self,
        client_id: ClientId,
        client: &ClientInfo,
        channel: &str,
        options: &NamespaceOptions,
        announce: bool,
    ) -> bool {
        let left = self.detach_channel(channel, client_id);
        if left == Left::NotMember {
            return false;
        }
        self.release(left, client, channel, options, announce, false)
            .await;
        true
    }

    /// Publishes `data` on `channel`, if `caller` may.
    pub async fn publish(
        &self,
        channel: &str,
        data: Arc<RawValue>,
        client_id: Option<ClientId>,
        idempotency_key: Option<String>,
        caller: Caller<'_>,
    ) -> Result<Published, ClientError> {
        let options = self.options(channel)?;
        caller.check(
            options.publish,
            channel,
            "this connection may not publish to this channel",
        )?;
        let _in_flight = self.enter_publish()?;
        let request = PublishRequest {
            data,
            client_id,
            history: self.limits(&options),
            idempotency: idempotency_key.map(|key| Idempotency {
                key,
                window: self.options.idempotency_window,
            }),
        };
        let published = self
            .broker
            .publish(channel, request)
            .await
            .map_err(|err| self.unavailable(&err))?;
        self.confirm(published)
    }

    /// Everyone present on `channel`.
    pub async fn presence(
        &self,
        channel: &str,
        caller: Caller<'_>,
    ) -> Result<Vec<ClientInfo>, ClientError> {
        let options = self.options(channel)?;
        if !options.presence {
            return Err(ClientError::PresenceDisabled);
        }
        caller.check(
            options.read_presence,
            channel,
            "this connection may not read this channel's presence",
        )?;
        self.broker
            .presence(channel)
            .await
            .map_err(|err| self.unavailable(&err))
    }

    /// History of `channel`: after `since`, or the newest `limit`.
    pub async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: Option<usize>,
        caller: Caller<'_>,
    ) -> Result<HistoryPage, ClientError> {
        let options = self.options(channel)?;
        caller.check(
            options.read_history,
            channel,
            "this connection may not read this channel's history",
        )?;
        let limit = limit.unwrap_or(options.history_size.min(MAX_HISTORY_LIMIT));
        self.broker
            .history(channel, since.map(|s| s.offset), limit)
            .await
            .map_err(|err| self.unavailable(&err))
    }
}

/// What the broker must hear when a member leaves.
#[derive(Debug, Clone, Copy)]
struct Departure {
    /// It was the node's last member: stop delivery to this node.
    unsubscribe: bool,
    /// Remove its presence entry.
    presence: bool,
    /// Tell the others (`leave`).
    leave_notice: bool,
}

impl Departure {
    /// Tells the broker. `quiet` logs failures at debug level (on shutdown every connection
    /// leaves at once, and one line per connection would drown the log).
    async fn run(self, broker: &dyn Broker, channel: &str, client: &ClientInfo, quiet: bool) {
        let failed = |err: &crate::broker::BrokerError, what: &str| {
            if quiet {
                tracing::debug!(%err, channel, "{what} failed");
            } else {
                tracing::warn!(%err, channel, "{what} failed");
            }
        };
        if self.unsubscribe
            && let Err(err) = broker.unsubscribe(channel).await
        {
            failed(&err, "broker unsubscribe");
        }
        if self.presence
            && let Err(err) = broker.remove_presence(channel, client.client_id).await
        {
            failed(&err, "presence remove");
        }
        if self.leave_notice
            && let Err(err) = broker.publish_leave(channel, client.clone()).await
        {
            failed(&err, "leave notice");
        }
    }
}

/// A membership `Node::subscribe` is still setting up. Unless kept (`armed` cleared), it is
/// taken back out: by [`Joining::undo`] on an error, or on drop, when the subscribe future was
/// dropped or panicked in the middle of an `.await`. Without this, a caller's timeout would
/// leave a member in the hub that no session knows of, and a presence entry nobody removes.
struct Joining<'a> {
    node: &'a Node,
    /// The member's key in the hub (its outbox).
    member: ClientId,
    client: &'a ClientInfo,
    channel: &'a str,
    options: &'a NamespaceOptions,
    /// Set while this first member's broker subscribe is under way: the members waiting on it
    /// must hear that it will not happen, or they would wait forever.
    first: Option<Arc<BrokerReady>>,
    /// Whether the node may be subscribed at the broker for this member (false once that
    /// subscribe failed).
    broker_subscribed: bool,
    /// Whether its presence entry may have been written.
    presence: bool,
    /// Whether its `join` may have been announced (and so needs a `leave`).
    announced: bool,
    armed: bool,
}

impl Joining<'_> {
    /// Takes the membership out of the hub (synchronously) and says what the broker must hear.
    fn take_out(&mut self) -> Option<Departure> {
        self.armed = false;
        if let Some(ready) = self.first.take() {
            ready.set(false);
        }
        let left = self.node.hub.unsubscribe(self.channel, self.member);
        if left == Left::NotMember {
            return None;
        }
        self.node.count_subscription(self.channel, -1);
        self.node.track_leave(self.channel, self.member);
        Some(Departure {
            unsubscribe: left == Left::Last && self.broker_subscribed,
            presence: self.options.presence && self.presence,
            leave_notice: self.options.join_leave && self.announced,
        })
    }

    /// Undoes the membership after an error, waiting for the broker's part.
    async fn undo(mut self) {
        if let Some(departure) = self.take_out() {
            departure
                .run(&*self.node.broker, self.channel, self.client, false)
                .await;
        }
    }
}

impl Drop for Joining<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Some(departure) = self.take_out() else {
            return;
        };
        tracing::debug!(channel = self.channel, "subscribe abandoned; undoing it");
        // Drop cannot wait: the broker's part runs as a task of its own.
        let broker = Arc::clone(&self.node.broker);
        let channel = self.channel.to_owned();
        let client = self.client.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime
                    .spawn(async move { departure.run(&*broker, &channel, &client, false).await });
            }
            Err(_) => tracing::warn!(channel, "no runtime to undo an abandoned subscribe"),
        }
    }
}
