//! This node's part in cluster-wide transitions (the webhooks' `channel_occupied`,
//! `channel_vacated`, `member_added`, `member_removed`).
//!
//! The [`Tracker`] counts, synchronously with the hub's membership changes, this node's
//! subscribers per channel and, on presence channels, each user's subscriptions. When a count
//! goes 0 → 1 or 1 → 0 the [`Holding`] is marked dirty and a single worker task tells the
//! broker ([`Broker::track`]), which decides whether the cluster-wide state moved and returns
//! the transition to report; the worker hands it to the [`TransitionSink`]. One worker per
//! node keeps every channel's transitions in order, and the message path never waits for it.
//!
//! The worker reconciles rather than replays: it compares what the node holds now with what
//! the broker was last told, so a burst of joins and leaves while the broker is down costs one
//! call per holding once it answers again (a channel occupied and vacated again meanwhile
//! reports nothing). A failed call is logged, counted as a broker error and retried with
//! backoff until it succeeds, so no transition is lost while the broker is out. Every
//! [`Broker::sweep_every`] it calls [`Broker::sweep`]: the heartbeat, and the transitions of
//! dead nodes this node claimed.
//!
//! Connections without a user have no membership: they count towards the channel's
//! occupancy but produce no member events.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::{Broker, Holding, TransitionSink};
use crate::engine::stats::Stats;
use crate::types::ClientId;

/// The first retry of a failed `track` waits this long, doubling up to [`MAX_BACKOFF`].
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Default)]
struct State {
    /// Each local membership (channel, hub member) and the user it counts for, if any.
    members: HashMap<(Arc<str>, ClientId), Option<Arc<str>>>,
    /// Local holders per holding (never 0: a holding at 0 is removed).
    counts: HashMap<Holding, u32>,
    /// What the broker was told this node holds.
    reported: HashSet<Holding>,
    /// Holdings whose count crossed 0 since they were last reconciled, oldest first.
    dirty: VecDeque<Holding>,
    queued: HashSet<Holding>,
    /// A `track` call is under way.
    in_flight: bool,
    /// Holdings whose last call failed, with the state it asked for: the broker may or may
    /// not have applied it (a reply lost, a deadline passed while the call ran on). Their
    /// next call repeats that state, whatever the holding's state is now: the broker
    /// answers a repeated call with the decision it made the first time, so a transition
    /// decided with a lost answer is still reported (once). Then the holding is reconciled
    /// as usual, so a change applied late is undone instead of left as a ghost holder.
    uncertain: HashMap<Holding, bool>,
}

impl State {
    fn mark(&mut self, holding: Holding) {
        if self.queued.insert(holding.clone()) {
            self.dirty.push_back(holding);
        }
    }

    fn up(&mut self, holding: Holding) {
        let count = self.counts.entry(holding.clone()).or_insert(0);
        *count += 1;
        if *count == 1 {
            self.mark(holding);
        }
    }

    fn down(&mut self, holding: Holding) {
        if let Some(count) = self.counts.get_mut(&holding) {
            *count -= 1;
            if *count == 0 {
                self.counts.remove(&holding);
                self.mark(holding);
            }
        }
    }
}

/// This node's holdings and the worker's queue; see the module docs.
pub struct Tracker {
    state: Mutex<State>,
    wake: Notify,
    sink: Arc<dyn TransitionSink>,
}

impl std::fmt::Debug for Tracker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracker").finish_non_exhaustive()
    }
}

impl Tracker {
    /// A tracker handing transitions to `sink`.
    pub fn new(sink: Arc<dyn TransitionSink>) -> Self {
        Self {
            state: Mutex::default(),
            wake: Notify::new(),
            sink,
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every update leaves the maps consistent, so a poisoned lock is still usable.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A member (`member` is its key in the hub) joined `channel` on this node; `user` is the
    /// user it counts for on a presence channel (`None` elsewhere and for anonymous ones).
    pub fn join(&self, channel: &str, member: ClientId, user: Option<Arc<str>>) {
        let channel: Arc<str> = Arc::from(channel);
        let mut state = self.state();
        let key = (Arc::clone(&channel), member);
        if state.members.contains_key(&key) {
            return;
        }
        state.members.insert(key, user.clone());
        state.up(Holding {
            channel: Arc::clone(&channel),
            user: None,
        });
        if let Some(user) = user {
            state.up(Holding {
                channel,
                user: Some(user),
            });
        }
        drop(state);
        self.wake.notify_one();
    }

    /// A member left `channel` on this node (nothing if it was not counted).
    pub fn leave(&self, channel: &str, member: ClientId) {
        let mut state = self.state();
        let channel: Arc<str> = Arc::from(channel);
        let Some(user) = state.members.remove(&(Arc::clone(&channel), member)) else {
            return;
        };
        // The membership first: `member_removed` goes before `channel_vacated`.
        if let Some(user) = user {
            state.down(Holding {
                channel: Arc::clone(&channel),
                user: Some(user),
            });
        }
        state.down(Holding {
            channel,
            user: None,
        });
        drop(state);
        self.wake.notify_one();
    }

    /// The next holding whose state the broker must hear, with that state.
    fn next(&self) -> Option<(Holding, bool)> {
        let mut state = self.state();
        while let Some(holding) = state.dirty.pop_front() {
            state.queued.remove(&holding);
            if let Some(held) = state.uncertain.remove(&holding) {
                state.in_flight = true;
                return Some((holding, held));
            }
            let held = state.counts.contains_key(&holding);
            if held != state.reported.contains(&holding) {
                state.in_flight = true;
                return Some((holding, held));
            }
        }
        None
    }

    fn reported(&self, holding: Holding, held: bool) {
        let mut state = self.state();
        state.in_flight = false;
        if held {
            state.reported.insert(holding.clone());
        } else {
            state.reported.remove(&holding);
        }
        // A repeated call (after a failure) may have told an older state: the current one
        // goes next, before other holdings, so the channel's order holds.
        if held != state.counts.contains_key(&holding) && state.queued.insert(holding.clone()) {
            state.dirty.push_front(holding);
        }
    }

    /// Puts a holding whose call (for state `held`) failed back at the front of the queue.
    fn retry(&self, holding: Holding, held: bool) {
        let mut state = self.state();
        state.in_flight = false;
        state.uncertain.insert(holding.clone(), held);
        if state.queued.insert(holding.clone()) {
            state.dirty.push_front(holding);
        }
    }

    /// Whether the broker has been told everything (nothing queued, no call under way).
    pub fn settled(&self) -> bool {
        let state = self.state();
        !state.in_flight && state.dirty.is_empty()
    }

    /// The broker forgot this node (declared dead): everything it holds is told again.
    fn rejoin(&self) {
        let mut state = self.state();
        state.reported.clear();
        // The calls made under the old id are moot: the survivors released all it held.
        state.uncertain.clear();
        let held: Vec<Holding> = state.counts.keys().cloned().collect();
        for holding in held {
            state.mark(holding);
        }
    }

    /// Reconciles with the broker until `stop`; see the module docs.
    pub async fn run(
        self: Arc<Self>,
        broker: Arc<dyn Broker>,
        stats: Arc<Stats>,
        stop: CancellationToken,
    ) {
        let every = broker.sweep_every();
        // The first sweep at once: it writes the heartbeat.
        let mut next_sweep = tokio::time::Instant::now();
        let mut backoff = FIRST_BACKOFF;
        loop {
            while let Some((holding, held)) = self.next() {
                // A long queue (thousands of channels at once) must not stop the heartbeat.
                if tokio::time::Instant::now() >= next_sweep {
                    next_sweep = self.sweep(&*broker, &stats, every).await;
                }
                match broker.track(&holding, held).await {
                    Ok(transition) => {
                        backoff = FIRST_BACKOFF;
                        if let Some(transition) = transition {
                            tracing::debug!(
                                event = transition.kind.name(),
                                channel = &*transition.channel,
                                "transition decided here"
                            );
                            if !held && broker.keeps_releases() {
                                // Confirmed once stored: the broker keeps the holding until
                                // then, so a crash in between reports it again, not never.
                                let durably =
                                    self.sink.on_transitions_stored(vec![transition]).await;
                                if let Err(err) = broker.release_stored(&holding, durably).await {
                                    tracing::warn!(%err, "could not confirm a release as stored");
                                }
                            } else {
                                self.sink.on_transition(transition);
                            }
                        }
                        // Only now, once the transition is with the sink (and a release
                        // confirmed): until then `settled` says no, so a graceful stop waits.
                        self.reported(holding, held);
                    }
                    Err(err) => {
                        tracing::warn!(
                            %err,
                            channel = &*holding.channel,
                            retry_in = ?backoff,
                            "transition tracking failed; retrying"
                        );
                        stats.broker_error();
                        self.retry(holding, held);
                        tokio::select! {
                            () = stop.cancelled() => return,
                            () = tokio::time::sleep(backoff) => {}
                        }
                        backoff = (backoff * 2).min(MAX_BACKOFF);
                    }
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
                () = tokio::time::sleep_until(next_sweep) => {
                    next_sweep = self.sweep(&*broker, &stats, every).await;
                }
            }
        }
    }

    /// One sweep; returns when the next is due: after `every`, or at once when the broker has
    /// more pending transitions than one sweep returns.
    async fn sweep(
        &self,
        broker: &dyn Broker,
        stats: &Stats,
        every: Duration,
    ) -> tokio::time::Instant {
        let mut next = tokio::time::Instant::now() + every;
        match broker.sweep().await {
            Ok(swept) => {
                if swept.rejoined {
                    tracing::warn!("the broker had declared this node dead; tracking again");
                    self.rejoin();
                }
                if swept.more {
                    next = tokio::time::Instant::now();
                }
                if swept.transitions.is_empty() {
                    return next;
                }
                for transition in &swept.transitions {
                    tracing::info!(
                        event = transition.kind.name(),
                        channel = &*transition.channel,
                        "transition of a dead node, claimed here"
                    );
                }
                // Before any later transition: with the memory broker these release what the
                // previous life held, and must come before this life occupies the channels.
                let durably = self.sink.on_transitions_stored(swept.transitions).await;
                if let Err(err) = broker.claimed_stored(durably).await {
                    tracing::warn!(%err, "could not confirm the claimed transitions as stored");
                }
            }
            Err(err) => {
                tracing::warn!(%err, "transition sweep failed");
                stats.broker_error();
            }
        }
        next
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, AtomicUsize};

    use super::*;
    use crate::broker::conformance::Recorder;
    use crate::broker::memory::MemoryBroker;
    use crate::broker::{
        BrokerError, BrokerFuture, BrokerStatus, ClientInfo, HistoryPage, PublishRequest,
        Published, Transition,
    };

    /// A memory broker whose `track` fails while `failing` is set.
    #[derive(Debug)]
    struct Flaky {
        inner: MemoryBroker,
        failing: AtomicBool,
        /// `track` is applied, but its answer is lost (an error comes back).
        lost_reply: AtomicBool,
        calls: AtomicUsize,
        /// The state each `track` call asked for, in order.
        asked: Mutex<Vec<bool>>,
    }

    impl Broker for Flaky {
        fn publish<'a>(&'a self, c: &'a str, r: PublishRequest) -> BrokerFuture<'a, Published> {
            self.inner.publish(c, r)
        }
        fn subscribe<'a>(&'a self, c: &'a str) -> BrokerFuture<'a, ()> {
            self.inner.subscribe(c)
        }
        fn unsubscribe<'a>(&'a self, c: &'a str) -> BrokerFuture<'a, ()> {
            self.inner.unsubscribe(c)
        }
        fn history<'a>(
            &'a self,
            c: &'a str,
            since: Option<u64>,
            limit: usize,
        ) -> BrokerFuture<'a, HistoryPage> {
            self.inner.history(c, since, limit)
        }
        fn add_presence<'a>(&'a self, c: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
            self.inner.add_presence(c, client)
        }
        fn remove_presence<'a>(&'a self, c: &'a str, client: ClientId) -> BrokerFuture<'a, ()> {
            self.inner.remove_presence(c, client)
        }
        fn presence<'a>(&'a self, c: &'a str) -> BrokerFuture<'a, Vec<ClientInfo>> {
            self.inner.presence(c)
        }
        fn publish_join<'a>(&'a self, c: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
            self.inner.publish_join(c, client)
        }
        fn publish_leave<'a>(&'a self, c: &'a str, client: ClientInfo) -> BrokerFuture<'a, ()> {
            self.inner.publish_leave(c, client)
        }
        fn track<'a>(
            &'a self,
            holding: &'a Holding,
            held: bool,
        ) -> BrokerFuture<'a, Option<Transition>> {
            self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            self.asked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push(held);
            if self.failing.load(std::sync::atomic::Ordering::SeqCst) {
                return Box::pin(std::future::ready(Err(BrokerError::Unavailable(
                    "down".into(),
                ))));
            }
            if self.lost_reply.load(std::sync::atomic::Ordering::SeqCst) {
                return Box::pin(async move {
                    let _ = self.inner.track(holding, held).await;
                    Err(BrokerError::Unavailable("the answer was lost".into()))
                });
            }
            self.inner.track(holding, held)
        }
        fn status(&self) -> BrokerStatus {
            self.inner.status()
        }
    }

    #[derive(Default)]
    struct Sink(Mutex<Vec<(&'static str, String, Option<String>)>>);

    impl TransitionSink for Sink {
        fn on_transition(&self, t: crate::broker::Transition) {
            self.0
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push((
                    t.kind.name(),
                    t.channel.to_string(),
                    t.user.map(|u| u.to_string()),
                ));
        }
    }

    impl Sink {
        async fn wait_for(&self, count: usize) -> Vec<(&'static str, String, Option<String>)> {
            for _ in 0..500 {
                let got = self
                    .0
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                if got.len() >= count {
                    return got;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            panic!("fewer than {count} transitions");
        }
    }

    /// A tracker reconciling with a [`Flaky`] broker that starts `failing` (or losing its
    /// answers), reporting into a [`Sink`]; `stop` ends it.
    fn running(
        failing: bool,
        lost_reply: bool,
    ) -> (Arc<Flaky>, Arc<Sink>, Arc<Tracker>, CancellationToken) {
        let broker = Arc::new(Flaky {
            inner: MemoryBroker::new(Arc::new(Recorder::default()), 1 << 20),
            failing: AtomicBool::new(failing),
            lost_reply: AtomicBool::new(lost_reply),
            calls: AtomicUsize::new(0),
            asked: Mutex::default(),
        });
        let sink = Arc::new(Sink::default());
        let tracker = Arc::new(Tracker::new(sink.clone()));
        let stop = CancellationToken::new();
        tokio::spawn(Arc::clone(&tracker).run(
            broker.clone(),
            Arc::new(Stats::default()),
            stop.clone(),
        ));
        (broker, sink, tracker, stop)
    }

    #[tokio::test]
    async fn a_failing_broker_delays_transitions_but_loses_none() {
        let (broker, sink, tracker, stop) = running(true, false);
        let (m1, m2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        tracker.join("room", m1, Some(Arc::from("u1")));
        // A channel that comes and goes while the broker fails: reconciled away, never told.
        tracker.join("brief", m2, None);
        tracker.leave("brief", m2);
        while broker.calls.load(std::sync::atomic::Ordering::SeqCst) < 2 {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(sink.0.lock().unwrap_or_else(|e| e.into_inner()).is_empty());
        broker
            .failing
            .store(false, std::sync::atomic::Ordering::SeqCst);
        let got = sink.wait_for(2).await;
        assert_eq!(
            got,
            vec![
                ("channel_occupied", "room".to_owned(), None),
                ("member_added", "room".to_owned(), Some("u1".to_owned())),
            ]
        );
        tracker.leave("room", m1);
        tracker.leave("room", m1);
        let got = sink.wait_for(4).await;
        assert_eq!(
            got[2..],
            [
                ("member_removed", "room".to_owned(), Some("u1".to_owned())),
                ("channel_vacated", "room".to_owned(), None),
            ]
        );
        stop.cancel();
    }

    /// The retry of a call whose answer was lost asks for the same state first (a networked
    /// broker answers it with the decision it made, so that transition is still reported),
    /// and only then for the holding's state now.
    #[tokio::test]
    async fn a_call_applied_but_unanswered_is_made_again_so_no_ghost_holder_stays() {
        let (broker, sink, tracker, stop) = running(false, true);
        // The broker records this node as a holder, but the answer is lost; the subscriber
        // leaves before the retry.
        let (m1, m2) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
        tracker.join("ghost", m1, None);
        while broker.calls.load(std::sync::atomic::Ordering::SeqCst) < 1 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        broker
            .lost_reply
            .store(false, std::sync::atomic::Ordering::SeqCst);
        tracker.leave("ghost", m1);
        // The retry repeats the lost call (the memory broker, which cannot lose answers,
        // remembers no decisions: it decides nothing), then tells the broker the holding is
        // gone: `channel_vacated` ...
        let got = sink.wait_for(1).await;
        assert_eq!(got, vec![("channel_vacated", "ghost".to_owned(), None)]);
        assert_eq!(
            *broker
                .asked
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
            vec![true, true, false],
            "the lost call is repeated as it was, then the state now is told"
        );
        // ... so the next subscriber occupies the channel again, instead of joining a ghost.
        tracker.join("ghost", m2, None);
        let got = sink.wait_for(2).await;
        assert_eq!(got[1], ("channel_occupied", "ghost".to_owned(), None));
        stop.cancel();
    }
}
