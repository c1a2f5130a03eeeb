//! Live delivery to this node: per subscribed channel an ordered push consumer on its history
//! subject plus a core subscription to its join/leave subject, run by one task that checks
//! continuity with [`Subscriptions::observe`](crate::broker::local::Subscriptions::observe),
//! reports gaps, and reopens both when they end or the history stream was recreated.
//!
//! Kept apart from history reads and presence: this is the only code that runs per
//! subscription and delivers to the broker's events.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{DeliverPolicy, push};
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::history::Arrived;
use super::{Inner, unavailable};
use crate::broker::batch::Batch;
use crate::broker::{BrokerError, ClientInfo, wire};
use crate::types::StreamPosition;

/// Live delivery of one channel to this node; dropping it stops the task.
pub(super) struct Feed {
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
    /// The history consumer's name as created, to delete it when the feed stops rather than
    /// leave it on the server until its inactivity threshold (30 s for ordered consumers).
    /// If the client recreated it after a failure, that one expires by itself.
    consumer: String,
    events: async_nats::Subscriber,
}

impl Inner {
    /// [`Self::open_now`] under the deadline.
    async fn open(&self, channel: &str, live: &Live) -> Result<Streams, BrokerError> {
        tokio::time::timeout(self.options.timeout, self.open_now(channel, live))
            .await
            .unwrap_or_else(|_| Err(unavailable("opening the live feed timed out")))
    }

    /// Starts the channel's core subscription and history consumer, right after its current
    /// last message, and records that position.
    async fn open_now(&self, channel: &str, live: &Live) -> Result<Streams, BrokerError> {
        let events = self
            .client
            .subscribe(self.names.events(channel))
            .await
            .map_err(unavailable)?;
        let subject = self.names.history(channel);
        // An empty subject is read as it is, writing nothing (no epoch marker): the feed then
        // delivers the subject from its first message, which is offset 1 of the epoch its
        // first publication starts, and follows the start position.
        let last = self.last(&subject).await?;
        let (deliver_policy, position) = match &last {
            Some(last) => (
                DeliverPolicy::ByStartSequence {
                    start_sequence: last.seq + 1,
                },
                last.position(),
            ),
            None => (DeliverPolicy::All, StreamPosition::start()),
        };
        let consumer = self
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.client.new_inbox(),
                filter_subject: subject,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(unavailable)?;
        let name = consumer.cached_info().name.clone();
        let history = consumer.messages().await.map_err(unavailable)?;
        // Only differs from what was delivered last when reopening after a failure.
        live.run(|| {
            if self.subs.catch_up(channel, position) {
                self.events.on_gap(channel);
            }
        });
        Ok(Streams {
            history,
            consumer: name,
            events,
        })
    }

    pub(super) async fn subscribe(self: &Arc<Self>, channel: &str) -> Result<(), BrokerError> {
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

    pub(super) async fn unsubscribe(&self, channel: &str) {
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
        let mut batch = Batch::default();
        loop {
            // In this order: whatever the feed has received already is taken into the batch
            // before a due batch is delivered, so a task that was kept from running (a busy
            // worker) does not flush a pipeline's first publication while the rest waits in
            // its queue. The batch stays bounded (a full one is delivered at once).
            let reopen = tokio::select! {
                biased;
                () = stop.cancelled() => {
                    self.delete_consumer(streams.consumer);
                    return;
                }
                changed = resets.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    true
                }
                message = streams.history.next() => match message {
                    Some(Ok(message)) => {
                        if self.deliver(&channel, &message, &live, &mut batch) {
                            self.flush(&mut batch, &live);
                        }
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
                        if self.deliver_event(&channel, &message.payload, &mut batch) {
                            self.flush(&mut batch, &live);
                        }
                        false
                    }
                    None => true,
                },
                () = batch.due(), if batch.holding() => {
                    self.flush(&mut batch, &live);
                    false
                }
            };
            if !reopen {
                continue;
            }
            // What arrived before goes out before any gap the reopening reports.
            self.flush(&mut batch, &live);
            self.delete_consumer(std::mem::take(&mut streams.consumer));
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
                backoff = (backoff * 2).min(Duration::from_secs(1));
            };
        }
    }

    /// Deletes a feed's history consumer in the background, within the broker's deadline.
    fn delete_consumer(&self, name: String) {
        if name.is_empty() {
            return;
        }
        let (js, stream, timeout) = (self.js.clone(), self.names.stream(), self.options.timeout);
        tokio::spawn(async move {
            let deleted =
                tokio::time::timeout(timeout, js.delete_consumer_from_stream(name, stream));
            if let Ok(Err(err)) = deleted.await {
                tracing::debug!(%err, "NATS feed consumer not deleted; it expires by itself");
            }
        });
    }

    /// Delivers what `batch` holds, unless the feed was stopped meanwhile. A pipeline not
    /// complete by then is no longer waited for.
    fn flush(&self, batch: &mut Batch, live: &Live) {
        live.run(|| batch.flush(&*self.events));
        batch.discard();
    }

    /// Takes one publication into `batch`; `true` if the batch must be delivered now.
    ///
    /// The first publication of a pipeline says how many were sent together (`Rs-Run`): the
    /// batch waits for the rest ([`Batch::arrived`]), so the pipeline wakes each subscriber
    /// once, as the memory broker's gathered publish does.
    fn deliver(
        &self,
        channel: &str,
        message: &jetstream::Message,
        live: &Live,
        batch: &mut Batch,
    ) -> bool {
        let (epoch, publication, run) = match Arrived::decode(message) {
            Ok(Arrived {
                epoch,
                publication: Some(publication),
                run,
            }) => (epoch, publication, run),
            // Epoch markers (offset 0) are not publications.
            Ok(Arrived {
                publication: None, ..
            }) => return false,
            Err(why) => {
                tracing::warn!(channel, why, "dropped a malformed history message");
                return false;
            }
        };
        let mut now = false;
        live.run(|| {
            let continuity = self.subs.observe(channel, epoch, publication.offset);
            now = batch.take(&*self.events, channel, epoch, publication, continuity, run);
        });
        now
    }

    /// Takes one join or leave into `batch`; `true` if the batch must be delivered now.
    fn deliver_event(&self, channel: &str, payload: &[u8], batch: &mut Batch) -> bool {
        match wire::decode(payload) {
            Ok(wire::WireEvent::Join(client)) => batch.join(channel, client),
            Ok(wire::WireEvent::Leave(client)) => batch.leave(channel, client),
            Ok(wire::WireEvent::Publication { .. } | wire::WireEvent::Run { .. }) => false,
            Err(err) => {
                tracing::warn!(%err, channel, "dropped a join/leave message");
                false
            }
        }
    }

    pub(super) async fn announce(
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
}
