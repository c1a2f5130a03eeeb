//! The memory broker's durable side: opening the data directory into its stripes, the
//! durable publish, and the sweep that deletes segments nothing retains any more.
//!
//! Kept apart from `memory.rs` so the single-node broker reads the same with and without a
//! data directory: channels that keep history (`size > 0`) are logged, and so is every later
//! publication of an epoch that logged one (see `MemoryBroker::publish_durable`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use tokio::time::Instant;

use super::record::Record;
use super::recovery::RecoveredChannel;
use super::{Durable, DurableOptions, StorageError, wall_ms};
use futures_util::FutureExt;

use crate::broker::history::Stream;
use crate::broker::memory::{ChannelState, Keys, MemoryBroker, Stored};
use crate::broker::{BrokerError, BrokerEvents, PublishRequest, Published};
use crate::types::{Publication, StreamPosition};

/// What the locked step of a durable publish decided.
enum Step {
    /// Published in memory only (nothing of the channel's epoch is logged).
    Done(Published),
    /// A key already used: the first publish's position and, if written by this process,
    /// its write's outcome.
    Duplicate(StreamPosition, Option<Stored>),
    /// Queued for the log: the new position and the write's outcome.
    Queued(StreamPosition, Stored),
}

/// How often sealed segments are checked for deletion.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl From<StorageError> for BrokerError {
    fn from(err: StorageError) -> Self {
        match err {
            StorageError::Full(why) => BrokerError::StorageFull(why),
            StorageError::Io(why) => BrokerError::Unavailable(format!("storage failed: {why}")),
        }
    }
}

impl MemoryBroker {
    /// A memory broker whose history lives in `options.dir` too: recovers what is there
    /// (blocking: this is startup), then starts the writer and the segment sweep.
    pub fn open(
        events: Arc<dyn BrokerEvents>,
        history_budget: usize,
        options: DurableOptions,
    ) -> Result<Arc<Self>, BrokerError> {
        let dir = options.dir.clone();
        let fsync = options.fsync;
        let (durable, recovered) =
            Durable::open(options, Arc::clone(&events)).map_err(BrokerError::Storage)?;
        let mut broker = Self::new(events, history_budget);
        // After the history: it holds the directory's lock.
        let journal = super::holdings::Journal::open(&dir, fsync).map_err(|e| {
            BrokerError::Storage(format!(
                "RUSTY_SOCKS_DATA_DIR: cannot open the holdings journal in {}: {e}",
                dir.display()
            ))
        })?;
        broker.journal = Some(journal);
        let now = Instant::now();
        let wall = wall_ms();
        let mut restored = 0usize;
        for channel in recovered.channels {
            let name = channel.name.clone();
            let mut state = restore(channel, now, wall);
            state.trim(now);
            if state.idle() {
                continue;
            }
            broker
                .history_total
                .fetch_add(state.cost(), Ordering::Relaxed);
            broker.stripe(&name).channels.insert(name, state);
            restored += 1;
        }
        if broker.history_bytes() > history_budget {
            tracing::warn!(
                bytes = broker.history_bytes(),
                "RUSTY_SOCKS_DATA_DIR: recovered history exceeds RUSTY_SOCKS_HISTORY_TOTAL_BYTES; new publications are not stored until it shrinks"
            );
        }
        tracing::info!(channels = restored, "durable history restored");
        broker.durable = Some(durable);
        let broker = Arc::new(broker);
        let weak = Arc::downgrade(&broker);
        tokio::spawn(sweep(weak));
        Ok(broker)
    }

    /// Publish with a data directory. A channel takes one path for a whole epoch, decided
    /// under its lock: once a publication of the epoch is logged, every later one is logged
    /// too (without history, as an offset marker), so a reload that switches `history_size`
    /// to 0 neither reorders delivery nor hands out offsets the log does not know of. A
    /// channel that has logged nothing in its epoch publishes in memory while it keeps no
    /// history. A duplicate whose original failed to be stored is published again.
    pub(in crate::broker) async fn publish_durable(
        &self,
        durable: &Durable,
        channel: &str,
        request: PublishRequest,
    ) -> Result<Published, BrokerError> {
        // Each round that finds a failed original renews the channel (forgetting its keys);
        // only a concurrent retry of the same key can need another.
        for _ in 0..4 {
            match self
                .publish_logged(durable, channel, request.clone())
                .await?
            {
                Some(published) => return Ok(published),
                None => continue,
            }
        }
        Err(BrokerError::Unavailable(
            "storage failed: the publication with this idempotency key kept failing".into(),
        ))
    }

    /// One attempt of [`Self::publish_durable`]: assign, append in memory and queue the record
    /// under the channel's lock (so records reach the log in offset order), then wait for the
    /// log's acknowledgement outside it. Subscribers get the publication from the writer once
    /// it is written. `None`: the key's original publish failed; the channel is renewed.
    async fn publish_logged(
        &self,
        durable: &Durable,
        channel: &str,
        request: PublishRequest,
    ) -> Result<Option<Published>, BrokerError> {
        let store = self.stores(&request);
        let now = Instant::now();
        let wall = wall_ms();
        let step = self.with(channel, |state| {
            if request.history.size == 0 && state.written.is_none() {
                // Nothing of this epoch is logged: it stays in memory.
                return Ok(Step::Done(
                    self.publish_now(channel, state, request, now, store),
                ));
            }
            if let Some(idempotency) = &request.idempotency
                && let Some((offset, stored)) = state.keys.entry(&idempotency.key, now)
            {
                let position = StreamPosition {
                    offset,
                    epoch: state.stream.epoch().to_owned(),
                };
                // Its original may still be on its way to the disk.
                return Ok(Step::Duplicate(position, stored));
            }
            let position = state.stream.position();
            let kept = Stream::keeps(request.data.get().len(), request.history, store);
            // Before the first publication the stream has no epoch yet (reads create none);
            // the record must carry the one this publication starts.
            let epoch = if position.epoch.is_empty() {
                crate::broker::history::new_epoch()
            } else {
                position.epoch.clone()
            };
            let record = Record {
                channel: channel.to_owned(),
                epoch: epoch.clone(),
                offset: position.offset + 1,
                time_ms: wall,
                limits: request.history,
                client_id: request.client_id,
                key: request.idempotency.as_ref().filter(|_| store).map(|i| {
                    (
                        i.key.clone(),
                        wall.saturating_add(i.window.as_millis() as u64),
                    )
                }),
                data: kept.then(|| request.data.get().to_owned()),
            };
            let mut bytes = Vec::with_capacity(record.data.as_ref().map_or(0, String::len) + 96);
            record.encode(&mut bytes);
            // Refused before anything changes.
            durable.reserve(bytes.len(), false)?;
            state.limits = Some(request.history);
            if position.epoch.is_empty() {
                state.stream.adopt_epoch(epoch);
            }
            let publication =
                state
                    .stream
                    .append(request.data, request.client_id, request.history, now, store);
            let deliver = (state.subscribed > 0).then(|| publication.clone());
            let written = Arc::clone(
                state
                    .written
                    .get_or_insert_with(|| Arc::new(AtomicU64::new(position.offset))),
            );
            let epoch: Arc<str> = Arc::from(record.epoch.as_str());
            match durable.append(
                bytes,
                Arc::from(channel),
                epoch,
                record.offset,
                deliver,
                Some(written),
            ) {
                Ok(ack) => {
                    let ack = ack.shared();
                    if let Some(idempotency) = request.idempotency
                        && store
                    {
                        let expires = now + idempotency.window;
                        state.keys.insert_stored(
                            idempotency.key,
                            publication.offset,
                            expires,
                            Some(ack.clone()),
                        );
                    }
                    Ok(Step::Queued(state.stream.position(), ack))
                }
                Err(err) => {
                    self.new_life(channel, state);
                    Err(err)
                }
            }
        });
        let (position, stored, duplicate) = match step? {
            Step::Done(published) => return Ok(Some(published)),
            Step::Duplicate(position, stored) => (position, stored, true),
            Step::Queued(position, ack) => (position, Some(ack), false),
        };
        // Keys brought back from disk are stored already.
        let answer = match stored {
            None => Ok(()),
            Some(ack) => ack
                .await
                .unwrap_or_else(|_| Err(StorageError::Io("the log writer stopped".into()))),
        };
        if let Err(err) = answer {
            // The publication may differ from the disk: renew the channel (once, whoever
            // sees the failure first), which forgets the failed publish's key.
            self.with(channel, |state| {
                if state.stream.epoch() == position.epoch {
                    self.new_life(channel, state);
                }
            });
            if duplicate {
                // Its original was not stored: this retry publishes for real.
                return Ok(None);
            }
            return Err(err.into());
        }
        Ok(Some(Published {
            position,
            duplicate,
        }))
    }

    /// The channel's stream may now differ from the disk (a record was assigned but not
    /// written): start a new epoch, so no offset is ever reused with other data, and tell
    /// subscribers to recover.
    fn new_life(&self, channel: &str, state: &mut ChannelState) {
        state.stream = Stream::new();
        state.keys = Keys::default();
        // Records of the old epoch still queued raise the old marker, not this one.
        state.written = None;
        if state.subscribed > 0 {
            self.events.on_gap(channel);
        }
    }

    /// Whether `channel` still retains offset `offset` of `epoch` (trimming it first, and
    /// freeing it if it became idle).
    pub(super) fn retains(&self, channel: &str, epoch: &str, offset: u64) -> bool {
        self.retains_then(channel, epoch, offset, || ()).is_some()
    }

    /// If `channel` still retains offset `offset` of `epoch`, runs `then` under the
    /// channel's lock (so nothing is published on it meanwhile) and returns its result.
    pub(super) fn retains_then<T>(
        &self,
        channel: &str,
        epoch: &str,
        offset: u64,
        then: impl FnOnce() -> T,
    ) -> Option<T> {
        let mut stripe = self.stripe(channel);
        let state = stripe.channels.get_mut(channel)?;
        let before = state.cost();
        state.trim(Instant::now());
        let after = state.cost();
        self.history_total
            .fetch_sub(before.saturating_sub(after), Ordering::Relaxed);
        // A record is retained while it is in history or its idempotency key is live.
        let live = state.stream.epoch() == epoch
            && (state
                .stream
                .first_offset()
                .is_some_and(|first| first <= offset)
                || state
                    .keys
                    .oldest_live(Instant::now())
                    .is_some_and(|first| first <= offset));
        if state.idle() {
            stripe.channels.remove(channel);
        }
        live.then(then)
    }

    /// Deletes sealed segments, oldest first, while nothing they hold is retained; compacts
    /// the oldest one that is still retained when that is worth it (see [`super::compact`]).
    /// Blocking (file reads, waits for the writer): run off the async workers.
    pub(super) fn sweep_once(&self) {
        let Some(durable) = &self.durable else {
            return;
        };
        // Holds no channel lock: publishes go on meanwhile.
        let _sweeping = durable
            .sweeping
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let sealed = durable.sealed();
        let pinned = |channels: &[super::Held]| {
            channels
                .iter()
                .any(|(channel, epoch, offset)| self.retains(channel, epoch, *offset))
        };
        let mut index = 0;
        while let Some((seq, bytes, channels)) = sealed.get(index) {
            let seq = *seq;
            if pinned(channels) {
                if !super::compact::compaction_due(durable, seq) {
                    return;
                }
                // The segments behind it that nothing retains are freed with it.
                let behind: u64 = sealed[index + 1..]
                    .iter()
                    .take_while(|(_, _, channels)| !pinned(channels))
                    .map(|(_, bytes, _)| *bytes)
                    .sum();
                if !self.compact_oldest(durable, seq, bytes + behind) {
                    return;
                }
                index += 1;
                continue;
            }
            match durable.delete_oldest(seq) {
                Ok(true) => tracing::debug!(segment = seq, "deleted a segment nothing retains"),
                Ok(false) => return,
                Err(err) => {
                    tracing::warn!(%err, segment = seq, "RUSTY_SOCKS_DATA_DIR: cannot delete a segment");
                    return;
                }
            }
            index += 1;
        }
    }
}

async fn sweep(broker: Weak<MemoryBroker>) {
    // The first sweep a period after startup, not during it (it may read a segment).
    let mut tick = tokio::time::interval_at(Instant::now() + SWEEP_EVERY, SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(broker) = broker.upgrade() else {
            return;
        };
        // Reads a segment and waits for the writer when it compacts.
        let _ = tokio::task::spawn_blocking(move || broker.sweep_once()).await;
    }
}

/// A channel's state from what recovery found.
fn restore(channel: RecoveredChannel, now: Instant, wall: u64) -> ChannelState {
    let at = |ms: u64| {
        let age = Duration::from_millis(wall.saturating_sub(ms));
        now.checked_sub(age).unwrap_or(now)
    };
    let mut entries = Vec::with_capacity(channel.entries.len());
    for (ms, offset, client_id, data) in channel.entries {
        entries.push((
            at(ms),
            Publication {
                offset,
                data,
                client_id,
            },
        ));
    }
    let mut state = ChannelState::default();
    state.stream = Stream::restore(channel.epoch, channel.offset, entries);
    state.limits = Some(channel.limits);
    state.written = Some(Arc::new(AtomicU64::new(channel.offset)));
    for (key, offset, expires) in channel.keys {
        if expires > wall {
            let expires = now + Duration::from_millis(expires - wall);
            state.keys.insert(key, offset, expires);
        }
    }
    state
}
