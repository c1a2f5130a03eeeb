//! The single-node broker: streams, history and presence in this process.
//!
//! Channels are spread over independently locked stripes. Publishing takes the channel's stripe
//! for the whole assign-offset / append / deliver step (synchronous work only, never across an
//! `.await`), which makes offsets gapless and delivery ordered. A channel's state is freed when
//! the node is not subscribed, no history is retained and nobody is present; the next use then
//! starts a new epoch, which is exactly what a client must be told.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::time::Instant;

use super::{Broker, BrokerEvents, BrokerFuture, ClientInfo, HistoryPage, PublishRequest};
use crate::history::{HistoryLimits, Stream, StreamPosition};
use crate::ws::outbox::ClientId;

const STRIPES: usize = 64;
/// Every this many operations on a stripe, its idle channels are swept.
const SWEEP_EVERY: u32 = 64;

#[derive(Debug, Default)]
struct ChannelState {
    stream: Stream,
    /// Node subscriptions minus unsubscriptions (see the trait's counting contract).
    subscribed: u32,
    presence: HashMap<ClientId, ClientInfo>,
    limits: Option<HistoryLimits>,
}

impl ChannelState {
    fn idle(&self) -> bool {
        self.subscribed == 0 && !self.stream.has_history() && self.presence.is_empty()
    }

    fn trim(&mut self, now: Instant) {
        if let Some(limits) = self.limits {
            self.stream.trim(limits, now);
        }
    }
}

#[derive(Debug, Default)]
struct Stripe {
    channels: HashMap<String, ChannelState>,
    ops: u32,
}

impl Stripe {
    /// Runs `f` on the channel's state (creating it), then frees it if idle.
    fn with<T>(&mut self, channel: &str, f: impl FnOnce(&mut ChannelState) -> T) -> T {
        self.ops = self.ops.wrapping_add(1);
        if self.ops % SWEEP_EVERY == 0 {
            let now = Instant::now();
            self.channels.retain(|_, state| {
                state.trim(now);
                !state.idle()
            });
        }
        let state = self.channels.entry(channel.to_owned()).or_default();
        state.trim(Instant::now());
        let out = f(state);
        if state.idle() {
            self.channels.remove(channel);
        }
        out
    }
}

/// Broker for one node.
pub struct MemoryBroker {
    events: Arc<dyn BrokerEvents>,
    hasher: RandomState,
    stripes: Box<[Mutex<Stripe>]>,
}

impl std::fmt::Debug for MemoryBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryBroker").finish_non_exhaustive()
    }
}

impl MemoryBroker {
    /// A broker delivering to `events`.
    pub fn new(events: Arc<dyn BrokerEvents>) -> Self {
        Self {
            events,
            hasher: RandomState::new(),
            stripes: (0..STRIPES).map(|_| Mutex::default()).collect(),
        }
    }

    fn stripe(&self, channel: &str) -> MutexGuard<'_, Stripe> {
        let index = self.hasher.hash_one(channel) as usize % STRIPES;
        // Every update leaves the maps consistent, so a poisoned lock is still usable.
        self.stripes[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn now<'a, T: Send + 'a>(value: T) -> BrokerFuture<'a, T> {
        Box::pin(std::future::ready(Ok(value)))
    }
}

impl Broker for MemoryBroker {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        request: PublishRequest,
    ) -> BrokerFuture<'a, StreamPosition> {
        let position = self.stripe(channel).with(channel, |state| {
            state.limits = Some(request.history);
            let publication = state.stream.append(
                request.data,
                request.client_id,
                request.history,
                Instant::now(),
            );
            if state.subscribed > 0 {
                self.events.on_publication(channel, &publication);
            }
            state.stream.position()
        });
        Self::now(position)
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        self.stripe(channel)
            .with(channel, |state| state.subscribed += 1);
        Self::now(())
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        self.stripe(channel).with(channel, |state| {
            state.subscribed = state.subscribed.saturating_sub(1);
        });
        Self::now(())
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<u64>,
        limit: usize,
    ) -> BrokerFuture<'a, HistoryPage> {
        let page = self.stripe(channel).with(channel, |state| HistoryPage {
            position: state.stream.position(),
            publications: state.stream.read(since, limit),
        });
        Self::now(page)
    }

    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.stripe(channel).with(channel, |state| {
            state.presence.insert(client.client_id, client);
        });
        Self::now(())
    }

    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> BrokerFuture<'a, ()> {
        self.stripe(channel).with(channel, |state| {
            state.presence.remove(&client);
        });
        Self::now(())
    }

    fn presence<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, Vec<ClientInfo>> {
        let clients = self
            .stripe(channel)
            .with(channel, |state| state.presence.values().cloned().collect());
        Self::now(clients)
    }

    fn publish_join<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.stripe(channel).with(channel, |state| {
            if state.subscribed > 0 {
                self.events.on_join(channel, &client);
            }
        });
        Self::now(())
    }

    fn publish_leave<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        self.stripe(channel).with(channel, |state| {
            if state.subscribed > 0 {
                self.events.on_leave(channel, &client);
            }
        });
        Self::now(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::conformance;

    #[tokio::test]
    async fn memory_broker_passes_the_conformance_suite() {
        conformance::run_all(|events| Arc::new(MemoryBroker::new(events)) as Arc<dyn Broker>).await;
    }

    #[tokio::test]
    async fn idle_channels_are_freed_and_start_a_new_epoch() {
        let events = Arc::new(conformance::Recorder::default());
        let broker = MemoryBroker::new(events);
        let limits = HistoryLimits {
            size: 0,
            ttl: None,
            max_bytes: 1024,
        };
        let request = PublishRequest {
            data: conformance::json("1"),
            client_id: None,
            history: limits,
        };
        let first = broker.publish("c", request.clone()).await.expect("memory");
        let second = broker.publish("c", request).await.expect("memory");
        assert_eq!(first.offset, 1);
        assert_eq!(
            second.offset, 1,
            "no history, nobody subscribed: state was freed"
        );
        assert_ne!(first.epoch, second.epoch);
        let total: usize = broker
            .stripes
            .iter()
            .map(|s| s.lock().map(|s| s.channels.len()).unwrap_or(0))
            .sum();
        assert_eq!(total, 0);
    }
}
