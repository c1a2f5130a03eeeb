//! Deadlines and health around a networked broker.
//!
//! [`Guarded`] wraps any broker (built by [`super::connect`] around Redis and NATS) and:
//!
//! - puts `RUSTY_SOCKS_BROKER_TIMEOUT` on every call: a call that takes longer fails as
//!   [`BrokerError::Unavailable`] and marks the broker down;
//! - probes the broker every second with [`Broker::ping`] (under the same deadline): a probe
//!   that fails marks it down too;
//! - while the broker is known down, fails calls at once instead of letting each wait for its
//!   deadline, and reports `connected: false` (so `/health` answers 503), as it does while the
//!   inner broker's own live delivery is down;
//! - when a probe succeeds again, asks the inner broker to [`Broker::catch_up`] and, unless it
//!   proves it checked every channel, reports [`BrokerEvents::on_gap`] on every channel this
//!   node is subscribed to before reporting itself up: no loss is silent.
//!
//! Cancellation: a subscription change is never dropped half-way. `subscribe` and
//! `unsubscribe` run the inner call to completion (in a task of its own once it has to wait)
//! and only stop *waiting* at the deadline; a subscribe that succeeds after its caller gave up is undone with an
//! `unsubscribe`, so the inner broker's per-channel counts stay exact, and an unsubscribe
//! always takes effect eventually. `remove_presence` runs the same way, so the inner broker
//! always forgets the entry (and stops refreshing it).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::oneshot;
use tokio_util::sync::{CancellationToken, DropGuard};

use super::local::Subscriptions;
use super::{
    Broker, BrokerError, BrokerEvents, BrokerFuture, BrokerStatus, ClientInfo, HistoryPage,
    Holding, PublishRequest, Published, Swept, Transition,
};
use crate::types::ClientId;

/// The catch-up after an outage may take this many call deadlines (it reads the position of
/// every subscribed channel) before every channel is reported as a gap instead.
const CATCH_UP_CALLS: u32 = 10;

/// A sweep (several calls) may take this many call deadlines.
const SWEEP_DEADLINES: u32 = 2;

/// How often the broker is probed.
pub const PROBE_EVERY: Duration = Duration::from_secs(1);

/// Runs `call` to completion whatever happens to the caller: polled once here, so what it
/// does before its first wait (the inner broker's bookkeeping) happens in the caller's order,
/// then, if not done, in a task of its own.
fn detach(call: impl Future<Output = ()> + Send + 'static) {
    let mut call = Box::pin(call);
    if (&mut call).now_or_never().is_none() {
        tokio::spawn(call);
    }
}

struct Health {
    inner: Arc<dyn Broker>,
    events: Arc<dyn BrokerEvents>,
    timeout: Duration,
    /// Whether the last probe (and every call since) got its answer in time.
    up: AtomicBool,
    /// Channels this node is subscribed to through this wrapper, counted like the trait's
    /// contract: the ones told about a gap after an outage.
    channels: Subscriptions,
}

impl Health {
    fn kind(&self) -> &'static str {
        self.inner.status().kind
    }

    /// Whether calls are worth trying. Only a broker that stopped answering fails them at
    /// once: an inner broker whose live delivery is reconnecting (status not connected) still
    /// takes commands, and reports its own gaps once it delivers again.
    fn ready(&self) -> Result<(), BrokerError> {
        if self.up.load(Ordering::Acquire) {
            Ok(())
        } else {
            Err(BrokerError::Unavailable(format!(
                "{} is down (failing at once until it answers again)",
                self.kind()
            )))
        }
    }

    fn mark_down(&self, why: &str) {
        if self.up.swap(false, Ordering::AcqRel) {
            tracing::warn!(broker = self.kind(), why, "broker down");
        }
    }

    fn timed_out(&self, what: &str) -> BrokerError {
        self.mark_down(&format!("{what} timed out"));
        BrokerError::Unavailable(format!(
            "{}: {what} got no answer within {:?}",
            self.kind(),
            self.timeout
        ))
    }

    /// Runs `call` under the deadline, failing at once while the broker is known down.
    async fn call<T>(&self, what: &str, call: BrokerFuture<'_, T>) -> Result<T, BrokerError> {
        self.ready()?;
        match tokio::time::timeout(self.timeout, call).await {
            Ok(outcome) => outcome,
            Err(_) => Err(self.timed_out(what)),
        }
    }

    /// Waits for a call running in its own task, up to the deadline (not at all while the
    /// broker is known down). `None`: the caller stopped waiting and the task goes on.
    async fn wait<T>(
        &self,
        what: &str,
        mut answer: oneshot::Receiver<Result<T, BrokerError>>,
    ) -> Result<Result<T, BrokerError>, BrokerError> {
        if let Err(down) = self.ready() {
            answer.close();
            return match answer.try_recv() {
                Ok(outcome) => Ok(outcome),
                Err(_) => Err(down),
            };
        }
        match tokio::time::timeout(self.timeout, &mut answer).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Err(BrokerError::Unavailable(format!(
                "{}: the call was abandoned",
                self.kind()
            ))),
            Err(_) => {
                // Closed first: after this the task either sees its answer refused (and acts
                // on it) or has already sent it, and it is read here. Nothing falls between.
                answer.close();
                match answer.try_recv() {
                    Ok(outcome) => Ok(outcome),
                    Err(_) => Err(self.timed_out(what)),
                }
            }
        }
    }

    /// After the probe found the broker answering again.
    async fn recover(&self) {
        // Up first: a client told of a gap recovers from history at once, and must not be
        // refused because the node still counts its broker as down.
        self.up.store(true, Ordering::Release);
        // The catch-up reads every subscribed channel's position: longer than one call.
        let checked = matches!(
            tokio::time::timeout(self.timeout * CATCH_UP_CALLS, self.inner.catch_up()).await,
            Ok(Ok(true))
        );
        let channels = if checked {
            Vec::new()
        } else {
            self.channels.channels()
        };
        for channel in &channels {
            self.events.on_gap(channel);
        }
        tracing::info!(
            broker = self.kind(),
            gaps_reported = channels.len(),
            checked,
            "broker answering again"
        );
    }
}

/// Probes the broker every [`PROBE_EVERY`] until stopped.
async fn probe(health: Arc<Health>, stop: CancellationToken) {
    let mut ticks = tokio::time::interval(PROBE_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            _ = ticks.tick() => {}
        }
        let answered = tokio::select! {
            () = stop.cancelled() => return,
            pinged = tokio::time::timeout(health.timeout, health.inner.ping()) => pinged,
        };
        match answered {
            // Up again once live delivery is back too, so the catch-up can be trusted.
            Ok(Ok(())) => {
                if !health.up.load(Ordering::Acquire) && health.inner.status().connected {
                    health.recover().await;
                }
            }
            Ok(Err(err)) => health.mark_down(&err.to_string()),
            Err(_) => health.mark_down("the health probe timed out"),
        }
    }
}

/// A broker with deadlines and health tracking; see the module docs.
pub struct Guarded {
    health: Arc<Health>,
    _stop: DropGuard,
}

impl std::fmt::Debug for Guarded {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Guarded")
            .field("inner", &self.health.inner)
            .field("timeout", &self.health.timeout)
            .field("up", &self.health.up)
            .finish_non_exhaustive()
    }
}

impl Guarded {
    /// Wraps `inner` (which delivers to `events`), putting `timeout` on every call, and starts
    /// the probe. Must be called within a Tokio runtime.
    pub fn new(inner: Arc<dyn Broker>, events: Arc<dyn BrokerEvents>, timeout: Duration) -> Self {
        let health = Arc::new(Health {
            inner,
            events,
            timeout,
            up: AtomicBool::new(true),
            channels: Subscriptions::default(),
        });
        let stop = CancellationToken::new();
        tokio::spawn(probe(Arc::clone(&health), stop.clone()));
        Self {
            health,
            _stop: stop.drop_guard(),
        }
    }
}

impl Broker for Guarded {
    fn publish<'a>(
        &'a self,
        channel: &'a str,
        request: PublishRequest,
    ) -> BrokerFuture<'a, Published> {
        let call = self.health.inner.publish(channel, request);
        Box::pin(self.health.call("publish", call))
    }

    fn publish_batch<'a>(
        &'a self,
        channel: &'a str,
        requests: Vec<PublishRequest>,
    ) -> BrokerFuture<'a, Vec<Result<Published, BrokerError>>> {
        // One deadline for the whole batch: it is one round trip, not one per request.
        let call = self.health.inner.publish_batch(channel, requests);
        Box::pin(self.health.call("publish", call))
    }

    fn pipelines_publish(&self) -> bool {
        self.health.inner.pipelines_publish()
    }

    fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            let health = &self.health;
            health.ready()?;
            let (inner, name) = (Arc::clone(&health.inner), channel.to_owned());
            let (done, answer) = oneshot::channel();
            detach(async move {
                let outcome = inner.subscribe(&name).await;
                if let Err(Ok(())) = done.send(outcome) {
                    // Succeeded after the caller was told it failed: undo it.
                    if let Err(err) = inner.unsubscribe(&name).await {
                        tracing::warn!(%err, channel = name, "undoing a late subscribe failed");
                    }
                }
            });
            health.wait("subscribe", answer).await??;
            health.channels.add(channel);
            Ok(())
        })
    }

    fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            let health = &self.health;
            health.channels.remove(channel);
            let (inner, name) = (Arc::clone(&health.inner), channel.to_owned());
            let (done, answer) = oneshot::channel();
            detach(async move {
                let _ = done.send(inner.unsubscribe(&name).await);
            });
            health.wait("unsubscribe", answer).await?
        })
    }

    fn history<'a>(
        &'a self,
        channel: &'a str,
        since: Option<u64>,
        limit: usize,
    ) -> BrokerFuture<'a, HistoryPage> {
        let call = self.health.inner.history(channel, since, limit);
        Box::pin(self.health.call("history", call))
    }

    fn add_presence<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            let health = &self.health;
            let call = health.inner.add_presence(channel, client);
            if let Err(down) = health.ready() {
                // Polled once, so the inner broker records the entry (before its first wait):
                // its refresher writes it once the broker answers again.
                let _ = call.now_or_never();
                return Err(down);
            }
            match tokio::time::timeout(health.timeout, call).await {
                Ok(outcome) => outcome,
                Err(_) => Err(health.timed_out("presence add")),
            }
        })
    }

    fn remove_presence<'a>(&'a self, channel: &'a str, client: ClientId) -> BrokerFuture<'a, ()> {
        Box::pin(async move {
            let health = &self.health;
            let (inner, name) = (Arc::clone(&health.inner), channel.to_owned());
            let (done, answer) = oneshot::channel();
            detach(async move {
                let _ = done.send(inner.remove_presence(&name, client).await);
            });
            health.wait("presence remove", answer).await?
        })
    }

    fn presence<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, Vec<ClientInfo>> {
        let call = self.health.inner.presence(channel);
        Box::pin(self.health.call("presence", call))
    }

    fn publish_join<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        let call = self.health.inner.publish_join(channel, client);
        Box::pin(self.health.call("join notice", call))
    }

    fn publish_leave<'a>(&'a self, channel: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
        let call = self.health.inner.publish_leave(channel, client);
        Box::pin(self.health.call("leave notice", call))
    }

    fn track<'a>(
        &'a self,
        holding: &'a Holding,
        held: bool,
    ) -> BrokerFuture<'a, Option<Transition>> {
        // Run to completion like a subscription change. A call that decides a transition
        // after its caller stopped waiting drops its answer: the caller's retry (for the same
        // state) gets the same decision from the broker, which remembers it.
        Box::pin(async move {
            let health = &self.health;
            health.ready()?;
            let inner = Arc::clone(&health.inner);
            let (holding, (done, answer)) = (holding.clone(), oneshot::channel());
            detach(async move {
                let _ = done.send(inner.track(&holding, held).await);
            });
            health.wait("track", answer).await?
        })
    }

    fn sweep_every(&self) -> Duration {
        self.health.inner.sweep_every()
    }

    fn keeps_releases(&self) -> bool {
        self.health.inner.keeps_releases()
    }

    fn release_stored<'a>(&'a self, holding: &'a Holding, durably: bool) -> BrokerFuture<'a, ()> {
        let call = self.health.inner.release_stored(holding, durably);
        Box::pin(self.health.call("release stored", call))
    }

    fn claimed_stored(&self, durably: bool) -> BrokerFuture<'_, ()> {
        let call = self.health.inner.claimed_stored(durably);
        Box::pin(self.health.call("claims stored", call))
    }

    fn sweep(&self) -> BrokerFuture<'_, Swept> {
        // Several calls (one claim each), each under the inner broker's own deadline; the
        // inner broker stops claiming after half a deadline, so two deadlines bound the
        // whole. Claims are kept in the broker until acknowledged: a sweep cut short here
        // loses none, the next one returns them.
        let call = self.health.inner.sweep();
        Box::pin(async move {
            let health = &self.health;
            health.ready()?;
            match tokio::time::timeout(health.timeout * SWEEP_DEADLINES, call).await {
                Ok(outcome) => outcome,
                Err(_) => Err(health.timed_out("sweep")),
            }
        })
    }

    fn status(&self) -> BrokerStatus {
        let inner = self.health.inner.status();
        BrokerStatus {
            kind: inner.kind,
            connected: inner.connected && self.health.up.load(Ordering::Acquire),
        }
    }

    fn ping(&self) -> BrokerFuture<'_, ()> {
        let call = self.health.inner.ping();
        Box::pin(async move {
            match tokio::time::timeout(self.health.timeout, call).await {
                Ok(outcome) => outcome,
                Err(_) => Err(self.health.timed_out("ping")),
            }
        })
    }

    fn catch_up(&self) -> BrokerFuture<'_, bool> {
        self.health.inner.catch_up()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicI64;

    use tokio::sync::Notify;

    use super::*;
    use crate::broker::conformance::{self, Event, Recorder};
    use crate::broker::memory::MemoryBroker;

    /// A memory broker whose calls can be made to hang (like a stopped Redis), counting the
    /// subscriptions that reached it.
    #[derive(Debug)]
    struct Stalling {
        inner: MemoryBroker,
        stalled: AtomicBool,
        resume: Notify,
        subscriptions: AtomicI64,
    }

    impl Stalling {
        async fn wait(&self) {
            while self.stalled.load(Ordering::Acquire) {
                let resumed = self.resume.notified();
                if !self.stalled.load(Ordering::Acquire) {
                    break;
                }
                resumed.await;
            }
        }

        fn set(&self, stalled: bool) {
            self.stalled.store(stalled, Ordering::Release);
            self.resume.notify_waiters();
        }
    }

    impl Broker for Stalling {
        fn publish<'a>(
            &'a self,
            channel: &'a str,
            request: PublishRequest,
        ) -> BrokerFuture<'a, Published> {
            Box::pin(async move {
                self.wait().await;
                self.inner.publish(channel, request).await
            })
        }
        fn subscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
            Box::pin(async move {
                self.wait().await;
                self.subscriptions.fetch_add(1, Ordering::SeqCst);
                self.inner.subscribe(channel).await
            })
        }
        fn unsubscribe<'a>(&'a self, channel: &'a str) -> BrokerFuture<'a, ()> {
            Box::pin(async move {
                self.wait().await;
                self.subscriptions.fetch_sub(1, Ordering::SeqCst);
                self.inner.unsubscribe(channel).await
            })
        }
        fn history<'a>(
            &'a self,
            channel: &'a str,
            since: Option<u64>,
            limit: usize,
        ) -> BrokerFuture<'a, HistoryPage> {
            self.inner.history(channel, since, limit)
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
        fn track<'a>(
            &'a self,
            holding: &'a Holding,
            held: bool,
        ) -> BrokerFuture<'a, Option<Transition>> {
            Box::pin(async move {
                self.wait().await;
                self.inner.track(holding, held).await
            })
        }
        fn status(&self) -> BrokerStatus {
            BrokerStatus {
                kind: "stalling",
                connected: true,
            }
        }
        fn ping(&self) -> BrokerFuture<'_, ()> {
            Box::pin(async move {
                self.wait().await;
                Ok(())
            })
        }
    }

    const DEADLINE: Duration = Duration::from_millis(200);

    fn guarded(events: &Arc<Recorder>) -> (Arc<Stalling>, Guarded) {
        let inner = Arc::new(Stalling {
            inner: MemoryBroker::new(Arc::clone(events) as Arc<dyn BrokerEvents>, 1 << 20),
            stalled: AtomicBool::new(false),
            resume: Notify::new(),
            subscriptions: AtomicI64::new(0),
        });
        let guarded = Guarded::new(
            Arc::clone(&inner) as Arc<dyn Broker>,
            Arc::clone(events) as Arc<dyn BrokerEvents>,
            DEADLINE,
        );
        (inner, guarded)
    }

    fn request() -> PublishRequest {
        PublishRequest {
            data: conformance::json("1"),
            client_id: None,
            history: crate::broker::history::HistoryLimits {
                size: 10,
                ttl: None,
                max_bytes: 1024,
            },
            idempotency: None,
        }
    }

    #[tokio::test]
    async fn a_stalled_broker_fails_calls_by_the_deadline_then_at_once_then_recovers() {
        let events = Arc::new(Recorder::default());
        let (inner, broker) = guarded(&events);
        broker.subscribe("room").await.expect("up");
        inner.set(true);
        let started = tokio::time::Instant::now();
        let err = broker
            .publish("room", request())
            .await
            .expect_err("stalled");
        assert!(started.elapsed() < DEADLINE * 2, "{:?}", started.elapsed());
        assert!(err.to_string().contains("no answer within"), "{err}");
        assert!(!broker.status().connected);
        let started = tokio::time::Instant::now();
        let err = broker.publish("room", request()).await.expect_err("down");
        assert!(started.elapsed() < DEADLINE / 4, "known down: at once");
        assert!(err.to_string().contains("is down"), "{err}");
        assert!(broker.subscribe("other").await.is_err());

        inner.set(false);
        for _ in 0..50 {
            if broker.status().connected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(broker.status().connected, "the probe saw it answer again");
        assert_eq!(
            events.taken("room"),
            vec![Event::Gap("room".into())],
            "no proof that nothing was missed: every subscribed channel is told"
        );
        assert!(events.taken("other").is_empty(), "never subscribed");
        broker.publish("room", request()).await.expect("up again");
    }

    #[tokio::test]
    async fn a_subscribe_abandoned_at_the_deadline_is_undone_when_it_completes() {
        let events = Arc::new(Recorder::default());
        let (inner, broker) = guarded(&events);
        inner.set(true);
        broker.subscribe("room").await.expect_err("stalled");
        assert_eq!(inner.subscriptions.load(Ordering::SeqCst), 0);
        inner.set(false);
        for _ in 0..50 {
            if broker.status().connected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(broker.status().connected);
        assert_eq!(
            inner.subscriptions.load(Ordering::SeqCst),
            0,
            "the late subscribe was undone: the inner count is exact"
        );
        broker.publish("room", request()).await.expect("up");
        assert!(
            events.taken("room").is_empty(),
            "not delivered: not subscribed"
        );
    }

    #[tokio::test]
    async fn an_unsubscribe_takes_effect_even_when_its_caller_stops_waiting() {
        let events = Arc::new(Recorder::default());
        let (inner, broker) = guarded(&events);
        broker.subscribe("room").await.expect("up");
        inner.set(true);
        broker.unsubscribe("room").await.expect_err("stalled");
        inner.set(false);
        for _ in 0..50 {
            if inner.subscriptions.load(Ordering::SeqCst) == 0 && broker.status().connected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert_eq!(inner.subscriptions.load(Ordering::SeqCst), 0);
        assert!(
            events.taken("room").is_empty(),
            "unsubscribed before the outage ended: no gap for it"
        );
    }

    #[tokio::test]
    async fn a_track_abandoned_at_the_deadline_still_completes() {
        let events = Arc::new(Recorder::default());
        let (inner, broker) = guarded(&events);
        let holding = conformance::holding("room", None);
        inner.set(true);
        broker.track(&holding, true).await.expect_err("stalled");
        inner.set(false);
        for _ in 0..50 {
            if broker.status().connected {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(broker.status().connected);
        // The abandoned call was applied when the stall ended: the holding is held, and
        // its release decides `channel_vacated`. (Its own decision went with the abandoned
        // answer; networked brokers return it again to the caller's retry.)
        assert_eq!(
            broker
                .track(&holding, false)
                .await
                .expect("up")
                .map(|t| t.kind),
            Some(crate::broker::TransitionKind::ChannelVacated)
        );
    }
}
