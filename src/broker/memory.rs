//! The single-node broker: delivery straight into the local [`Hub`], history in a
//! [`MessageStore`].

use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex};

use bytes::Bytes;

use super::{Broker, BrokerFuture, Publication};
use crate::hub::Hub;
use crate::store::MessageStore;
use crate::ws::outbox::{ClientId, Outbox};

const LOCK_SHARDS: usize = 64;

/// Broker for one node. Per-channel atomicity comes from a striped lock: publishes on
/// different channels rarely share a stripe, and the lock is only held for synchronous work.
#[derive(Debug)]
pub struct MemoryBroker {
    hub: Arc<Hub>,
    store: Arc<dyn MessageStore>,
    hasher: RandomState,
    stripes: Box<[Mutex<()>]>,
}

impl MemoryBroker {
    /// A broker delivering to `hub` and keeping history in `store`.
    pub fn new(hub: Arc<Hub>, store: Arc<dyn MessageStore>) -> Self {
        Self {
            hub,
            store,
            hasher: RandomState::new(),
            stripes: (0..LOCK_SHARDS).map(|_| Mutex::new(())).collect(),
        }
    }

    fn stripe(&self, channel: &str) -> std::sync::MutexGuard<'_, ()> {
        let index = self.hasher.hash_one(channel) as usize % LOCK_SHARDS;
        self.stripes[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn publish_now(&self, publication: Publication) -> usize {
        let _atomic = self.stripe(&publication.channel);
        if publication.persist {
            self.store
                .append(&publication.channel, publication.frame.clone());
        }
        self.hub
            .deliver(&publication.channel, &publication.frame, publication.skip)
            .queued
    }
}

impl Broker for MemoryBroker {
    fn publish(&self, publication: Publication) -> BrokerFuture<'_, usize> {
        let queued = self.publish_now(publication);
        Box::pin(async move { Ok(queued) })
    }

    fn subscribe<'a>(
        &'a self,
        channel: &'a str,
        outbox: Outbox,
        replay: usize,
    ) -> BrokerFuture<'a, Vec<Bytes>> {
        let frames = {
            let _atomic = self.stripe(channel);
            self.hub.subscribe(channel, outbox);
            self.store.recent(channel, replay)
        };
        Box::pin(async move { Ok(frames) })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str, client: ClientId) -> BrokerFuture<'a, ()> {
        self.hub.unsubscribe(channel, client);
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::MemoryStore;
    use uuid::Uuid;

    #[tokio::test]
    async fn a_subscriber_gets_each_message_once_in_replay_or_live() {
        let hub = Arc::new(Hub::new());
        let broker = MemoryBroker::new(Arc::clone(&hub), Arc::new(MemoryStore::new(10, 1 << 20)));
        let publication = |n: u8| Publication {
            channel: "c".into(),
            frame: Bytes::from(vec![n]),
            skip: None,
            persist: true,
        };
        broker.publish(publication(1)).await.expect("memory broker");
        let (outbox, mut rx, _) = Outbox::new(Uuid::new_v4(), 8);
        let replay = broker
            .subscribe("c", outbox, 10)
            .await
            .expect("memory broker");
        broker.publish(publication(2)).await.expect("memory broker");
        assert_eq!(replay, vec![Bytes::from(vec![1])]);
        assert_eq!(rx.recv().await, Some(Bytes::from(vec![2])));
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn unpersisted_publications_are_not_replayed() {
        let hub = Arc::new(Hub::new());
        let broker = MemoryBroker::new(hub, Arc::new(MemoryStore::new(10, 1 << 20)));
        let p = Publication {
            channel: "c".into(),
            frame: Bytes::from_static(b"bye"),
            skip: None,
            persist: false,
        };
        assert_eq!(broker.publish(p).await.expect("memory broker"), 0);
        let (outbox, _rx, _) = Outbox::new(Uuid::new_v4(), 8);
        assert!(
            broker
                .subscribe("c", outbox, 10)
                .await
                .expect("memory")
                .is_empty()
        );
    }
}
