//! The node: wires the local [`Hub`] to the [`Broker`] and applies namespace options.
//!
//! Sessions talk to the node, never to the broker directly. The node decides when this node
//! subscribes to a channel at the broker (first local member) and unsubscribes (last one), runs
//! the recovery protocol that makes `subscribe` with `since` loss-free, and renders what the
//! broker delivers into frames, encoding each publication once for all local subscribers.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;

use crate::broker::{Broker, BrokerEvents, ClientInfo, HistoryPage, PublishRequest};
use crate::error::ClientError;
use crate::history::{HistoryLimits, Publication, StreamPosition, is_complete_replay};
use crate::hub::{Hub, Joined, Left, MemberState};
use crate::namespace::{NamespaceOptions, Namespaces};
use crate::protocol::legacy::ServerFrame;
use crate::protocol::v1::{Frame, MAX_HISTORY_LIMIT};
use crate::ws::frame::{OpCode, encode};
use crate::ws::outbox::{ClientId, Outbox};

/// The channel every `/ws` connection joins on connect; legacy chat is published here and its
/// frames are rendered in the legacy shapes (`Chat`, `Disconnect`).
pub const DEFAULT_CHANNEL: &str = "default";

/// Renders broker deliveries into frames for the local hub.
#[derive(Debug)]
pub struct Dispatcher {
    hub: Arc<Hub>,
    echo_to_sender: bool,
}

impl Dispatcher {
    /// A dispatcher feeding `hub`.
    pub fn new(hub: Arc<Hub>, echo_to_sender: bool) -> Self {
        Self {
            hub,
            echo_to_sender,
        }
    }
}

fn text_frame(json: &str) -> Bytes {
    encode(OpCode::Text, json.as_bytes())
}

impl BrokerEvents for Dispatcher {
    fn on_publication(&self, channel: &str, publication: &Publication) {
        if channel == DEFAULT_CHANNEL {
            // Legacy chat: the stored data *is* the legacy Chat frame; the sender gets no copy.
            let frame = text_frame(publication.data.get());
            let skip = publication.client_id.filter(|_| !self.echo_to_sender);
            self.hub
                .deliver(channel, Some(publication.offset), &frame, skip);
            return;
        }
        let frame = text_frame(
            &Frame::Publication {
                channel,
                offset: publication.offset,
                data: &publication.data,
                client_id: publication.client_id,
            }
            .to_json(),
        );
        self.hub
            .deliver(channel, Some(publication.offset), &frame, None);
    }

    fn on_join(&self, channel: &str, client: &ClientInfo) {
        if channel == DEFAULT_CHANNEL {
            return; // The legacy dialect has no join notice.
        }
        let frame = text_frame(&Frame::Join { channel, client }.to_json());
        self.hub
            .deliver(channel, None, &frame, Some(client.client_id));
    }

    fn on_leave(&self, channel: &str, client: &ClientInfo) {
        let json = if channel == DEFAULT_CHANNEL {
            ServerFrame::Disconnect {
                client_id: client.client_id,
            }
            .to_json()
        } else {
            Frame::Leave { channel, client }.to_json()
        };
        self.hub
            .deliver(channel, None, &text_frame(&json), Some(client.client_id));
    }

    fn on_gap(&self, channel: &str) {
        // The legacy dialect has no gap frame: its clients are closed so they reconnect.
        let told = self.hub.gap(channel, channel == DEFAULT_CHANNEL);
        tracing::warn!(channel, told, "publications may have been missed; subscribers told");
    }
}

/// Settings the node applies.
#[derive(Debug, Clone)]
pub struct NodeOptions {
    /// Per-namespace options.
    pub namespaces: Namespaces,
    /// Options of [`DEFAULT_CHANNEL`].
    pub legacy: NamespaceOptions,
    /// Most bytes of history kept per channel.
    pub history_bytes: usize,
    /// Most frames buffered for a member while its recovery is prepared.
    pub recovery_buffer: usize,
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
}

impl Node {
    /// A node over `hub` and `broker` (whose events sink must be a [`Dispatcher`] on `hub`).
    pub fn new(hub: Arc<Hub>, broker: Arc<dyn Broker>, options: NodeOptions) -> Self {
        Self {
            hub,
            broker,
            options,
            default_name: Arc::from(DEFAULT_CHANNEL),
        }
    }

    /// The local hub.
    pub fn hub(&self) -> &Arc<Hub> {
        &self.hub
    }

    /// The broker this node distributes through.
    pub fn broker(&self) -> &Arc<dyn Broker> {
        &self.broker
    }

    /// Validates a channel and returns its options.
    pub fn options(&self, channel: &str) -> Result<&NamespaceOptions, ClientError> {
        if channel == DEFAULT_CHANNEL {
            return Ok(&self.options.legacy);
        }
        Ok(self.options.namespaces.resolve(channel)?)
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
    ) -> Result<Subscription, ClientError> {
        let options = self.options(channel)?.clone();
        let policy = options.effective_slow_policy();
        // Every connection is on the default channel: share one copy of its name.
        let name: Arc<str> = if channel == DEFAULT_CHANNEL {
            Arc::clone(&self.default_name)
        } else {
            Arc::from(channel)
        };
        let state = MemberState::recovering(name, policy, self.options.recovery_buffer);
        let subscribed = match self.hub.subscribe(outbox, Arc::clone(&state)) {
            Joined::Already => return Err(ClientError::AlreadySubscribed(channel.to_owned())),
            Joined::First(ready) => {
                let outcome = self.broker.subscribe(channel).await;
                ready.set(outcome.is_ok());
                outcome.map_err(|err| err.to_string())
            }
            Joined::Added(ready) => {
                if ready.wait().await {
                    Ok(())
                } else {
                    Err("the node could not subscribe at the broker".to_owned())
                }
            }
        };
        if let Err(why) = subscribed {
            self.hub.unsubscribe(channel, outbox.id());
            return Err(ClientError::Unavailable(why));
        }
        if options.presence {
            if let Err(err) = self.broker.add_presence(channel, client.clone()).await {
                tracing::warn!(%err, channel, "presence add failed");
            }
        }
        // The legacy dialect has no join notice: nothing to announce on the default channel.
        if options.join_leave && channel != DEFAULT_CHANNEL {
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
        let buffered = self.hub.finish_recovery(&state);
        let HistoryPage {
            position,
            mut publications,
        } = match page {
            Ok(page) => page,
            Err(err) => {
                self.leave(outbox.id(), client, channel, &options, false)
                    .await;
                return Err(ClientError::Unavailable(err.to_string()));
            }
        };
        let recovered = since.map(|since| is_complete_replay(since, &position, &publications));
        if recovered == Some(false) {
            publications.clear();
        }
        let mut last = position.offset;
        let live = buffered
            .into_iter()
            .filter(|(offset, _)| offset.is_none_or(|o| o > position.offset))
            .map(|(offset, frame)| {
                last = last.max(offset.unwrap_or(0));
                frame
            })
            .collect();
        state.delivered_up_to(last);
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
        let options = self.options(channel)?.clone();
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
        match self.hub.unsubscribe(channel, client_id) {
            Left::NotMember => return false,
            Left::Last => {
                if let Err(err) = self.broker.unsubscribe(channel).await {
                    tracing::warn!(%err, channel, "broker unsubscribe failed");
                }
            }
            Left::Removed => {}
        }
        if options.presence {
            if let Err(err) = self.broker.remove_presence(channel, client_id).await {
                tracing::warn!(%err, channel, "presence remove failed");
            }
        }
        if options.join_leave && announce {
            if let Err(err) = self.broker.publish_leave(channel, client.clone()).await {
                tracing::warn!(%err, channel, "leave notice failed");
            }
        }
        true
    }

    /// Publishes `data` on `channel`. `from_client` applies the namespace's `publish` switch.
    pub async fn publish(
        &self,
        channel: &str,
        data: Arc<RawValue>,
        client_id: Option<ClientId>,
        from_client: bool,
    ) -> Result<StreamPosition, ClientError> {
        let options = self.options(channel)?;
        if from_client && !options.publish {
            return Err(ClientError::PermissionDenied(
                "clients may not publish in this channel's namespace",
            ));
        }
        let request = PublishRequest {
            data,
            client_id,
            history: self.limits(options),
        };
        self.broker
            .publish(channel, request)
            .await
            .map_err(|err| ClientError::Unavailable(err.to_string()))
    }

    /// Everyone present on `channel`.
    pub async fn presence(&self, channel: &str) -> Result<Vec<ClientInfo>, ClientError> {
        if !self.options(channel)?.presence {
            return Err(ClientError::PresenceDisabled);
        }
        self.broker
            .presence(channel)
            .await
            .map_err(|err| ClientError::Unavailable(err.to_string()))
    }

    /// History of `channel`: after `since`, or the newest `limit`.
    pub async fn history(
        &self,
        channel: &str,
        since: Option<&StreamPosition>,
        limit: Option<usize>,
    ) -> Result<HistoryPage, ClientError> {
        let options = self.options(channel)?;
        let limit = limit.unwrap_or(options.history_size.min(MAX_HISTORY_LIMIT));
        self.broker
            .history(channel, since.map(|s| s.offset), limit)
            .await
            .map_err(|err| ClientError::Unavailable(err.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BrokerFuture;
    use crate::broker::conformance::json;
    use crate::broker::memory::MemoryBroker;
    use uuid::Uuid;

    /// A broker whose `history` lets publications race it: one lands just before the read,
    /// one just after, as they would with a networked broker.
    #[derive(Debug)]
    struct Racing {
        inner: MemoryBroker,
    }

    fn request() -> PublishRequest {
        PublishRequest {
            data: json("0"),
            client_id: None,
            history: HistoryLimits {
                size: 100,
                ttl: None,
                max_bytes: 1 << 20,
            },
        }
    }

    impl Broker for Racing {
        fn publish<'a>(
            &'a self,
            channel: &'a str,
            request: PublishRequest,
        ) -> BrokerFuture<'a, StreamPosition> {
            self.inner.publish(channel, request)
        }
        fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
            self.inner.subscribe(channel)
        }
        fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
            self.inner.unsubscribe(channel)
        }
        fn history<'a>(
            &'a self,
            channel: &'a str,
            since: Option<u64>,
            limit: usize,
        ) -> BrokerFuture<'a, HistoryPage> {
            Box::pin(async move {
                self.inner.publish(channel, request()).await?;
                let page = self.inner.history(channel, since, limit).await?;
                self.inner.publish(channel, request()).await?;
                Ok(page)
            })
        }
        fn add_presence<'a>(
            &'a self,
            channel: &'a str,
            client: ClientInfo,
        ) -> BrokerFuture<'a, ()> {
            self.inner.add_presence(channel, client)
        }
        fn remove_presence<'a>(
            &'a self,
            channel: &'a str,
            client: ClientId,
        ) -> BrokerFuture<'a, ()> {
            self.inner.remove_presence(channel, client)
        }
        fn presence<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, Vec<ClientInfo>> {
            self.inner.presence(channel)
        }
        fn publish_join<'a>(
            &'a self,
            channel: &'a str,
            client: ClientInfo,
        ) -> BrokerFuture<'a, ()> {
            self.inner.publish_join(channel, client)
        }
        fn publish_leave<'a>(
            &'a self,
            channel: &'a str,
            client: ClientInfo,
        ) -> BrokerFuture<'a, ()> {
            self.inner.publish_leave(channel, client)
        }
        fn status(&self) -> crate::broker::BrokerStatus {
            self.inner.status()
        }
    }

    /// The offset in an encoded (unmasked, short) server text frame.
    fn offset_of(frame: &Bytes) -> u64 {
        let header = if frame[1] == 126 { 4 } else { 2 };
        let value: serde_json::Value = serde_json::from_slice(&frame[header..]).unwrap_or_default();
        value["offset"].as_u64().unwrap_or(0)
    }

    #[tokio::test]
    async fn publications_racing_a_recovery_arrive_exactly_once() {
        let hub = Arc::new(Hub::new());
        let dispatcher = Arc::new(Dispatcher::new(Arc::clone(&hub), false));
        let broker = Arc::new(Racing {
            inner: MemoryBroker::new(dispatcher, 1 << 30),
        });
        let node = Node::new(
            Arc::clone(&hub),
            broker.clone(),
            NodeOptions {
                namespaces: Namespaces::default(),
                legacy: NamespaceOptions::default(),
                history_bytes: 1 << 20,
                recovery_buffer: 64,
            },
        );
        for _ in 0..5 {
            node.publish("room", json("0"), None, false)
                .await
                .expect("publish");
        }
        let epoch = broker
            .inner
            .history("room", None, 0)
            .await
            .expect("history")
            .position
            .epoch;
        let (outbox, mut rx) = Outbox::new(Uuid::new_v4(), 64);
        let client = ClientInfo {
            client_id: outbox.id(),
            user: None,
        };
        let since = StreamPosition { offset: 2, epoch };
        let sub = node
            .subscribe(&outbox, &client, "room", Some(&since), 0)
            .await
            .expect("subscribe");
        assert_eq!(sub.recovered, Some(true));
        // 3..5 existed, 6 raced in before the history read, 7 after it, 8 is plain live.
        let mut seen: Vec<u64> = sub.publications.iter().map(|p| p.offset).collect();
        seen.extend(sub.live.iter().map(offset_of));
        node.publish("room", json("0"), None, false)
            .await
            .expect("publish");
        while let Some(frame) = rx.try_recv() {
            seen.push(offset_of(&frame));
        }
        assert_eq!(seen, vec![3, 4, 5, 6, 7, 8], "each exactly once, in order");
    }
}
