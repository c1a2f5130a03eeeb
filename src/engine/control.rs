//! Control messages between nodes (the [`CONTROL_CHANNEL`]): applying each once, and
//! recovering the ones this node missed while its link to the broker was down.
//!
//! A control message (today: "disconnect this user") must reach every node, not only those
//! whose broker link happened to be up when it was sent. So control messages are published
//! like any publication, into a bounded history ([`CONTROL_HISTORY`]), and this node keeps a
//! cursor: the last control offset it applied. Live deliveries are applied when they follow
//! the cursor. When the broker reports a gap on the control channel (a reconnect found it
//! moved, its offsets jumped, or its stream restarted), or a live delivery skips offsets, the
//! node stops applying live deliveries and a recovery task, which holds the broker handle the
//! broker's delivery path does not have, reads everything after the cursor from history,
//! applies it in order, and hands back to live delivery once it has caught up with it.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde_json::value::RawValue;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::broker::history::HistoryLimits;
use crate::broker::{Broker, BrokerError, HistoryPage};
use crate::engine::node::CONTROL_CHANNEL;
use crate::engine::sessions::Sessions;
use crate::types::{Publication, StreamPosition};

/// History of the control channel: enough to cover a broker outage of a few minutes, bounded
/// so it costs little. A node cut off for longer recovers what is left and logs the rest.
pub const CONTROL_HISTORY: HistoryLimits = HistoryLimits {
    size: 1000,
    ttl: Some(Duration::from_secs(300)),
    max_bytes: 1 << 20,
};

/// Longest wait for one history read of a recovery.
const READ_TIMEOUT: Duration = Duration::from_secs(10);
/// First and longest pause before a failed recovery is tried again.
const RETRY_FIRST: Duration = Duration::from_millis(250);
const RETRY_MAX: Duration = Duration::from_secs(5);

/// Where this node stands in the control stream.
#[derive(Debug, Default)]
struct Cursor {
    /// The control stream's epoch `offset` belongs to (`None`: not known yet).
    epoch: Option<String>,
    /// The last control offset applied, or known to predate this node (the baseline).
    offset: Option<u64>,
    /// Something may have been missed: live deliveries are left to the recovery.
    recovering: bool,
    /// The highest offset delivered live while recovering: the recovery reads until it has
    /// covered it.
    seen_live: u64,
}

/// This node's side of the control channel; see the module docs.
#[derive(Debug)]
pub struct Control {
    sessions: Arc<Sessions>,
    cursor: Mutex<Cursor>,
    wake: Notify,
}

impl Control {
    /// Control messages applied to `sessions`.
    pub fn new(sessions: Arc<Sessions>) -> Self {
        Self {
            sessions,
            cursor: Mutex::default(),
            wake: Notify::new(),
        }
    }

    fn cursor(&self) -> MutexGuard<'_, Cursor> {
        // Every update leaves the cursor consistent, so a poisoned lock is still usable.
        self.cursor
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A control publication delivered live by the broker, in the stream's `epoch`.
    pub fn on_publication(&self, epoch: &str, publication: &Publication) {
        let mut cursor = self.cursor();
        let offset = publication.offset;
        if cursor.recovering {
            cursor.seen_live = cursor.seen_live.max(offset);
            return;
        }
        // A cursor taken before the first control message (`{0, ""}`) is the start of the
        // epoch that message began: from here on its offsets count in that epoch.
        if cursor.epoch.as_deref() == Some("") && cursor.offset.unwrap_or(0) == 0 {
            cursor.epoch = Some(epoch.to_owned());
        }
        if cursor.epoch.as_deref().is_some_and(|known| known != epoch) {
            // The control stream restarted (the broker lost it): its offsets say nothing
            // about what was applied, so the recovery reads the new life from its start.
            cursor.recovering = true;
            cursor.seen_live = offset;
            drop(cursor);
            self.wake.notify_one();
            return;
        }
        match cursor.offset {
            Some(last) if offset <= last => {} // applied already, by a recovery
            Some(last) if offset > last + 1 => {
                // A hole the broker did not report: recover it from history, in order.
                cursor.recovering = true;
                cursor.seen_live = offset;
                drop(cursor);
                self.wake.notify_one();
            }
            _ => {
                cursor.offset = Some(offset);
                self.apply(&publication.data, false);
            }
        }
    }

    /// The broker says control messages may have been missed.
    pub fn on_gap(&self) {
        self.cursor().recovering = true;
        self.wake.notify_one();
    }

    /// Control messages up to `position` were sent before this node started: none of them
    /// concerns it.
    pub fn baseline(&self, position: StreamPosition) {
        let mut cursor = self.cursor();
        if cursor.epoch.is_none() {
            cursor.offset = Some(cursor.offset.unwrap_or(0).max(position.offset));
            cursor.epoch = Some(position.epoch);
        }
    }

    /// Applies one control message (called under the cursor's lock, so in offset order).
    fn apply(&self, data: &RawValue, recovered: bool) {
        #[derive(serde::Deserialize)]
        struct Message {
            disconnect: Option<String>,
        }
        match serde_json::from_str::<Message>(data.get()) {
            Ok(Message {
                disconnect: Some(user),
            }) => {
                let closed = self.sessions.disconnect_user(&user);
                tracing::info!(
                    user,
                    closed,
                    recovered,
                    "disconnected through the server API"
                );
            }
            _ => tracing::warn!(data = data.get(), "unknown control message"),
        }
    }

    /// Runs recoveries whenever one is needed, until `stop`.
    pub async fn run_recovery(self: Arc<Self>, broker: Arc<dyn Broker>, stop: CancellationToken) {
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                () = self.wake.notified() => {}
            }
            let mut pause = RETRY_FIRST;
            while let Err(err) = self.recover(broker.as_ref()).await {
                tracing::warn!(%err, ?pause, "control messages could not be recovered yet");
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep(pause) => {}
                }
                pause = (pause * 2).min(RETRY_MAX);
            }
        }
    }

    async fn read(broker: &dyn Broker, since: u64) -> Result<HistoryPage, BrokerError> {
        let limit = CONTROL_HISTORY.size;
        tokio::time::timeout(
            READ_TIMEOUT,
            broker.history(CONTROL_CHANNEL, Some(since), limit),
        )
        .await
        .unwrap_or_else(|_| {
            Err(BrokerError::Unavailable(
                "control history read timed out".into(),
            ))
        })
    }

    /// Reads what was missed after the cursor and applies it, until live delivery can take
    /// over again.
    async fn recover(&self, broker: &dyn Broker) -> Result<(), BrokerError> {
        loop {
            let (epoch, since) = {
                let cursor = self.cursor();
                (cursor.epoch.clone(), cursor.offset.unwrap_or(0))
            };
            let mut page = Self::read(broker, since).await?;
            let mut from = since;
            if epoch.is_some_and(|epoch| epoch != page.position.epoch) {
                // The control stream began a new life (the broker lost it): all of it is new.
                page = Self::read(broker, 0).await?;
                from = 0;
            }
            let aged_out = match page.publications.first() {
                Some(first) => first.offset > from + 1,
                None => page.position.offset > from,
            };
            if aged_out {
                tracing::warn!(
                    since = from,
                    now = page.position.offset,
                    "some control messages aged out of history before this node could \
                     recover them"
                );
            }
            let mut cursor = self.cursor();
            if cursor.epoch.as_deref() != Some(page.position.epoch.as_str()) {
                cursor.epoch = Some(page.position.epoch.clone());
                cursor.offset = Some(from);
            }
            let mut last = cursor.offset.unwrap_or(0);
            for publication in &page.publications {
                if publication.offset > last {
                    self.apply(&publication.data, true);
                    last = publication.offset;
                }
            }
            // A full page may stop short of the position: read on from where it ended.
            if page.publications.len() >= CONTROL_HISTORY.size && last < page.position.offset {
                cursor.offset = Some(last);
                continue;
            }
            cursor.offset = Some(last.max(page.position.offset));
            if cursor.seen_live <= page.position.offset {
                cursor.recovering = false;
                cursor.seen_live = 0;
                return Ok(());
            }
            // More was delivered live meanwhile than this page held: read on.
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::PublishRequest;
    use crate::broker::conformance::{Recorder, json};
    use crate::broker::memory::MemoryBroker;
    use crate::engine::outbox::{Outbox, OutboxReceiver};
    use crate::engine::sessions::Registration;
    use crate::ws::close::CloseCode;

    /// A session of `user`, to see whether a disconnect reached it.
    fn session(sessions: &Arc<Sessions>, user: &str) -> (Registration, OutboxReceiver) {
        let (outbox, rx) = Outbox::new(uuid::Uuid::new_v4(), 4);
        let registration = sessions.register(outbox);
        sessions.set_user(&registration, Arc::from(user));
        (registration, rx)
    }

    /// A control message as the broker delivers it live: its epoch and the publication.
    type Sent = (String, Publication);

    fn live(control: &Control, (epoch, publication): &Sent) {
        control.on_publication(epoch, publication);
    }

    async fn send(broker: &MemoryBroker, user: &str) -> Sent {
        let request = PublishRequest {
            data: json(&serde_json::json!({ "disconnect": user }).to_string()),
            client_id: None,
            history: CONTROL_HISTORY,
            idempotency: None,
        };
        let position = broker
            .publish(CONTROL_CHANNEL, request)
            .await
            .expect("memory")
            .position;
        let page = broker
            .history(CONTROL_CHANNEL, Some(position.offset - 1), 1)
            .await
            .expect("memory");
        (position.epoch, page.publications[0].clone())
    }

    async fn closed(rx: &OutboxReceiver) -> bool {
        for _ in 0..200 {
            if rx.close_requested() == Some(CloseCode::Disconnected) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        false
    }

    #[tokio::test]
    async fn missed_control_messages_are_recovered_and_each_applied_once() {
        let broker = Arc::new(MemoryBroker::new(Arc::new(Recorder::default()), 1 << 30));
        broker.subscribe(CONTROL_CHANNEL).await.expect("memory");
        let sessions = Arc::new(Sessions::default());
        let control = Arc::new(Control::new(Arc::clone(&sessions)));
        let old = send(&broker, "before").await;
        let (_before, before_rx) = session(&sessions, "before");
        let position = broker
            .history(CONTROL_CHANNEL, None, 0)
            .await
            .expect("memory");
        control.baseline(position.position);
        let stop = CancellationToken::new();
        let _stopped = stop.clone().drop_guard();
        tokio::spawn(Arc::clone(&control).run_recovery(broker.clone(), stop));

        // Live, in order.
        let (_u1, u1) = session(&sessions, "u1");
        live(&control, &send(&broker, "u1").await);
        assert!(closed(&u1).await);
        // Missed while the link was down, then a gap; one more arrives live meanwhile.
        let (_u2, u2) = session(&sessions, "u2");
        let (_u3, u3) = session(&sessions, "u3");
        let (_u4, u4) = session(&sessions, "u4");
        send(&broker, "u2").await;
        let late = send(&broker, "u3").await;
        control.on_gap();
        live(&control, &send(&broker, "u4").await);
        assert!(closed(&u2).await && closed(&u3).await && closed(&u4).await);
        // A hole in live delivery that nobody reported is recovered too.
        let (_u5, u5) = session(&sessions, "u5");
        let (_u6, u6) = session(&sessions, "u6");
        send(&broker, "u5").await;
        live(&control, &send(&broker, "u6").await);
        assert!(closed(&u5).await && closed(&u6).await);
        // Once: a late copy of an applied message, and anything from before the node
        // started, close nobody (these users reconnected).
        let (_again, again) = session(&sessions, "u3");
        live(&control, &late);
        live(&control, &old);
        control.on_gap();
        let (_u7, u7) = session(&sessions, "u7");
        live(&control, &send(&broker, "u7").await);
        assert!(
            closed(&u7).await,
            "what arrived during the recovery is applied too"
        );
        assert_eq!(again.close_requested(), None, "applied once");
        assert_eq!(
            before_rx.close_requested(),
            None,
            "sent before the node started"
        );
    }

    #[tokio::test]
    async fn a_gap_after_the_first_control_messages_applies_none_of_them_again() {
        let broker = Arc::new(MemoryBroker::new(Arc::new(Recorder::default()), 1 << 30));
        broker.subscribe(CONTROL_CHANNEL).await.expect("memory");
        let sessions = Arc::new(Sessions::default());
        let control = Arc::new(Control::new(Arc::clone(&sessions)));
        let page = broker
            .history(CONTROL_CHANNEL, None, 0)
            .await
            .expect("memory");
        assert_eq!(page.position, StreamPosition::start(), "nothing sent yet");
        control.baseline(page.position);
        let stop = CancellationToken::new();
        let _stopped = stop.clone().drop_guard();
        tokio::spawn(Arc::clone(&control).run_recovery(broker.clone(), stop));
        let (_u1, u1) = session(&sessions, "u1");
        live(&control, &send(&broker, "u1").await);
        assert!(closed(&u1).await);
        // u1 reconnects; a gap makes the node recover from its cursor, which took the epoch
        // of the first message.
        let (_again, again) = session(&sessions, "u1");
        control.on_gap();
        let (_u2, u2) = session(&sessions, "u2");
        send(&broker, "u2").await;
        assert!(closed(&u2).await, "what was missed is recovered");
        assert_eq!(again.close_requested(), None, "u1's message applied once");
    }

    #[tokio::test]
    async fn a_restarted_control_stream_is_applied_from_its_start_not_taken_as_applied() {
        // `old` is the control stream this node followed; `new` the one after the broker
        // lost it (a new epoch, offsets from 1 again).
        let old = Arc::new(MemoryBroker::new(Arc::new(Recorder::default()), 1 << 30));
        let new = Arc::new(MemoryBroker::new(Arc::new(Recorder::default()), 1 << 30));
        new.subscribe(CONTROL_CHANNEL).await.expect("memory");
        let sessions = Arc::new(Sessions::default());
        let control = Arc::new(Control::new(Arc::clone(&sessions)));
        control.baseline(StreamPosition::start());
        let stop = CancellationToken::new();
        let _stopped = stop.clone().drop_guard();
        tokio::spawn(Arc::clone(&control).run_recovery(new.clone(), stop));
        let (_u1, u1) = session(&sessions, "u1");
        live(&control, &send(&old, "u1").await);
        assert!(closed(&u1).await);
        let (_again, again) = session(&sessions, "u1");
        // Offset 1 again, of the new epoch: a new message, not the one applied.
        let (_u2, u2) = session(&sessions, "u2");
        live(&control, &send(&new, "u2").await);
        assert!(closed(&u2).await, "the new stream's offset 1 is applied");
        assert_eq!(again.close_requested(), None, "u1's message is not in it");
    }
}
