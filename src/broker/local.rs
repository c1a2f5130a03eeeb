//! What this node has asked of a networked broker, kept so it can be redone and checked.
//!
//! A networked broker loses its subscriptions when its connection drops, and presence entries
//! it wrote expire unless refreshed. This module holds the node's side of both, plus the last
//! stream position seen per channel, which is how a broker notices that live delivery skipped
//! publications (an offset jump, an epoch change, or a position that moved while it was
//! disconnected) and must report a gap instead of losing them quietly.
//!
//! Every lock here guards synchronous map updates only; none is held across an `.await`.

use std::collections::HashMap;
use std::sync::{Mutex, MutexGuard};

use super::ClientInfo;
use crate::types::ClientId;
use crate::types::StreamPosition;

/// What a received publication means for a channel's continuity.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Continuity {
    /// The next offset (or the first one seen): deliver.
    Next,
    /// Already seen (a duplicate after a resubscribe): drop.
    Seen,
    /// Publications were skipped, or the stream restarted: report a gap, then deliver.
    Gap,
    /// Not subscribed any more: drop.
    Unwanted,
}

#[derive(Debug, Default)]
struct Channel {
    /// `subscribe` calls minus `unsubscribe` calls (the trait's counting contract).
    count: u32,
    /// The newest position delivered (or read when the node subscribed).
    last: Option<StreamPosition>,
    /// The position could not be read when the node subscribed: with nothing to compare,
    /// the first publication received (or the first catch-up) reports a gap.
    doubt: bool,
}

/// The node's broker subscriptions, counted, with their last positions.
#[derive(Debug, Default)]
pub struct Subscriptions {
    channels: Mutex<HashMap<String, Channel>>,
}

impl Subscriptions {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Channel>> {
        // Each update is a single map operation: a poisoned lock is still consistent.
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more subscription; `true` if it is the first.
    pub fn add(&self, channel: &str) -> bool {
        let mut channels = self.lock();
        let entry = channels.entry(channel.to_owned()).or_default();
        entry.count += 1;
        entry.count == 1
    }

    /// Counts one subscription less; `true` if it was the last (the channel is forgotten).
    pub fn remove(&self, channel: &str) -> bool {
        let mut channels = self.lock();
        let Some(entry) = channels.get_mut(channel) else {
            return false;
        };
        entry.count = entry.count.saturating_sub(1);
        if entry.count == 0 {
            channels.remove(channel);
            true
        } else {
            false
        }
    }

    /// Whether the node wants `channel` delivered.
    pub fn wanted(&self, channel: &str) -> bool {
        self.lock().get(channel).is_some_and(|c| c.count > 0)
    }

    /// Every channel the node wants delivered.
    pub fn channels(&self) -> Vec<String> {
        self.lock().keys().cloned().collect()
    }

    /// Records where the stream was when the node subscribed, unless something newer was
    /// already seen.
    pub fn baseline(&self, channel: &str, position: StreamPosition) {
        if let Some(entry) = self.lock().get_mut(channel)
            && entry.last.is_none()
        {
            entry.last = Some(position);
            entry.doubt = false;
        }
    }

    /// The baseline could not be read: until a position is known, assume publications were
    /// missed (a failed read never counts as "nothing missed").
    pub fn doubt(&self, channel: &str) {
        if let Some(entry) = self.lock().get_mut(channel)
            && entry.last.is_none()
        {
            entry.doubt = true;
        }
    }

    /// Classifies a received publication and records it.
    pub fn observe(&self, channel: &str, epoch: &str, offset: u64) -> Continuity {
        let mut channels = self.lock();
        let Some(entry) = channels.get_mut(channel) else {
            return Continuity::Unwanted;
        };
        let verdict = match &entry.last {
            None if entry.doubt => Continuity::Gap,
            None => Continuity::Next,
            // Read before the first publication: offset 1 of any epoch is the next one.
            Some(last) if last.is_start() && offset == 1 => Continuity::Next,
            Some(last) if last.epoch != epoch => Continuity::Gap,
            Some(last) if offset <= last.offset => return Continuity::Seen,
            Some(last) if offset == last.offset + 1 => Continuity::Next,
            Some(_) => Continuity::Gap,
        };
        match &mut entry.last {
            // Every publication of an epoch but its first: no new copy of the epoch.
            Some(last) if last.epoch == epoch => last.offset = offset,
            last => {
                *last = Some(StreamPosition {
                    offset,
                    epoch: epoch.to_owned(),
                });
            }
        }
        entry.doubt = false;
        verdict
    }

    /// After a reconnect: compares the stream's current position with the last one seen.
    /// `true` if publications were missed meanwhile (the caller reports a gap); the current
    /// position becomes the new baseline either way.
    pub fn catch_up(&self, channel: &str, current: StreamPosition) -> bool {
        let mut channels = self.lock();
        let Some(entry) = channels.get_mut(channel) else {
            return false;
        };
        let missed = match &entry.last {
            Some(last) => last.epoch != current.epoch || current.offset > last.offset,
            None => entry.doubt,
        };
        if missed || entry.last.is_none() {
            entry.last = Some(current);
        }
        entry.doubt = false;
        missed
    }
}

/// Presence entries this node wrote, so it can refresh them before they expire.
#[derive(Debug, Default)]
pub struct PresenceEntries {
    channels: Mutex<HashMap<String, HashMap<ClientId, ClientInfo>>>,
}

impl PresenceEntries {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, HashMap<ClientId, ClientInfo>>> {
        self.channels
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Remembers an entry.
    pub fn add(&self, channel: &str, client: ClientInfo) {
        self.lock()
            .entry(channel.to_owned())
            .or_default()
            .insert(client.client_id, client);
    }

    /// Forgets an entry.
    pub fn remove(&self, channel: &str, client: ClientId) {
        let mut channels = self.lock();
        if let Some(clients) = channels.get_mut(channel) {
            clients.remove(&client);
            if clients.is_empty() {
                channels.remove(channel);
            }
        }
    }

    /// Everything to refresh, by channel.
    pub fn snapshot(&self) -> Vec<(String, Vec<ClientInfo>)> {
        self.lock()
            .iter()
            .map(|(channel, clients)| (channel.clone(), clients.values().cloned().collect()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(offset: u64, epoch: &str) -> StreamPosition {
        StreamPosition {
            offset,
            epoch: epoch.into(),
        }
    }

    #[test]
    fn subscriptions_are_counted() {
        let subs = Subscriptions::default();
        assert!(subs.add("c"));
        assert!(!subs.add("c"));
        assert!(!subs.remove("c"));
        assert!(subs.wanted("c"));
        assert!(subs.remove("c"));
        assert!(!subs.wanted("c"));
        assert!(!subs.remove("c"), "never below zero");
    }

    #[test]
    fn continuity_spots_skips_duplicates_and_new_epochs() {
        let subs = Subscriptions::default();
        assert_eq!(subs.observe("c", "e", 1), Continuity::Unwanted);
        subs.add("c");
        subs.baseline("c", at(3, "e"));
        assert_eq!(subs.observe("c", "e", 4), Continuity::Next);
        assert_eq!(subs.observe("c", "e", 4), Continuity::Seen);
        assert_eq!(subs.observe("c", "e", 6), Continuity::Gap);
        assert_eq!(subs.observe("c", "e", 7), Continuity::Next);
        assert_eq!(subs.observe("c", "f", 1), Continuity::Gap);
    }

    #[test]
    fn a_channel_read_before_its_first_publication_continues_into_any_epoch() {
        let subs = Subscriptions::default();
        subs.add("c");
        subs.baseline("c", StreamPosition::start());
        assert_eq!(subs.observe("c", "e", 1), Continuity::Next);
        assert_eq!(subs.observe("c", "e", 2), Continuity::Next);
        subs.add("d");
        subs.baseline("d", StreamPosition::start());
        assert_eq!(
            subs.observe("d", "e", 2),
            Continuity::Gap,
            "offset 1 was skipped"
        );
        subs.add("f");
        subs.baseline("f", StreamPosition::start());
        assert!(!subs.catch_up("f", StreamPosition::start()));
        assert!(subs.catch_up("f", at(1, "e")), "published meanwhile");
    }

    #[test]
    fn catching_up_reports_what_moved_while_away() {
        let subs = Subscriptions::default();
        subs.add("c");
        assert!(
            !subs.catch_up("c", at(5, "e")),
            "no baseline: nothing to compare"
        );
        assert!(!subs.catch_up("c", at(5, "e")));
        assert!(subs.catch_up("c", at(7, "e")));
        assert_eq!(subs.observe("c", "e", 8), Continuity::Next);
        assert!(subs.catch_up("c", at(1, "x")), "the stream restarted");
    }

    #[test]
    fn a_failed_baseline_read_counts_as_a_gap() {
        let subs = Subscriptions::default();
        subs.add("c");
        subs.doubt("c");
        assert_eq!(
            subs.observe("c", "e", 1),
            Continuity::Gap,
            "never 'nothing missed'"
        );
        assert_eq!(subs.observe("c", "e", 2), Continuity::Next);
        subs.add("d");
        subs.doubt("d");
        assert!(
            subs.catch_up("d", at(0, "e")),
            "nothing to compare with: a gap"
        );
        assert!(!subs.catch_up("d", at(0, "e")));
    }

    #[test]
    fn presence_entries_are_kept_per_channel() {
        let entries = PresenceEntries::default();
        let client = ClientInfo {
            client_id: uuid::Uuid::new_v4(),
            user: None,
            info: None,
        };
        entries.add("c", client.clone());
        assert_eq!(
            entries.snapshot(),
            vec![("c".to_owned(), vec![client.clone()])]
        );
        entries.remove("c", client.client_id);
        assert!(entries.snapshot().is_empty());
    }
}
