//! What a reload may change in a running node: the namespaces (with the legacy channel's
//! options, derived from `""`) and the token verifier.
//!
//! They are one immutable snapshot behind an [`ArcSwap`]: a subscribe, publish or token check
//! loads the current snapshot (no lock, no waiting on a reload) and decides with it, and a
//! reload swaps in a new one. A connection that decided under the old snapshot keeps what it
//! got (its subscriptions, its identity), which is how existing connections keep working.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use arc_swap::ArcSwap;

use super::{DEFAULT_CHANNEL, Node};
use crate::auth::Verifier;
use crate::engine::namespace::{NamespaceOptions, Namespaces};
use crate::types::ChannelError;
use crate::types::channel::namespace_of;
use crate::types::error::ClientError;

/// The settings of a node that a reload may replace.
#[derive(Debug, Clone)]
pub struct NodeLive {
    /// Per-namespace options.
    pub namespaces: Namespaces,
    /// Options of [`DEFAULT_CHANNEL`]: [`NamespaceOptions::legacy_channel`] of the `""` namespace.
    pub legacy: NamespaceOptions,
    /// Verifies tokens (at connect and `refresh`), when authentication is configured.
    pub verifier: Option<Arc<Verifier>>,
}

/// One snapshot: the live settings, plus what earlier snapshots leave behind.
#[derive(Debug)]
pub(super) struct Snapshot {
    pub(super) live: NodeLive,
    /// Namespaces removed by a reload, with their last options. A new subscription there is
    /// refused (`unknown_namespace`), but the subscriptions made before the reload keep their
    /// channel's rules: publishing, history, presence and leaving work as they did, so a
    /// removal never breaks a connection that is already there.
    pub(super) retired: HashMap<String, NamespaceOptions>,
    /// Local subscriptions per namespace (the legacy channel counts as `default`), for the
    /// metrics. Counters are carried from snapshot to snapshot, retired namespaces' included,
    /// so a subscription counted under one snapshot is uncounted under the next.
    pub(super) counts: HashMap<String, Arc<AtomicI64>>,
    /// Namespaces that had `presence` on in this snapshot or an earlier one: a member leaving
    /// one removes its presence entry even if a reload turned presence off after it joined
    /// (the entry would otherwise stay behind, and show again if presence came back).
    pub(super) presence_once: HashSet<String>,
}

impl Snapshot {
    pub(super) fn first(live: NodeLive) -> ArcSwap<Self> {
        let counts = live
            .namespaces
            .names()
            .chain([DEFAULT_CHANNEL])
            .map(|name| (name.to_owned(), Arc::default()))
            .collect();
        let presence_once = with_presence(&live.namespaces).collect();
        ArcSwap::from_pointee(Self {
            live,
            retired: HashMap::new(),
            counts,
            presence_once,
        })
    }

    /// The snapshot after `self` with `live` in force.
    fn next(&self, live: NodeLive) -> Self {
        let mut retired = self.retired.clone();
        for name in self.live.namespaces.names() {
            if live.namespaces.get(name).is_none()
                && let Some(options) = self.live.namespaces.get(name)
            {
                retired.insert(name.to_owned(), options.clone());
            }
        }
        // A namespace configured again takes its new options, not its retired ones.
        retired.retain(|name, _| live.namespaces.get(name).is_none());
        let mut counts = self.counts.clone();
        for name in live.namespaces.names() {
            counts.entry(name.to_owned()).or_default();
        }
        let mut presence_once = self.presence_once.clone();
        presence_once.extend(with_presence(&live.namespaces));
        Self {
            live,
            retired,
            counts,
            presence_once,
        }
    }
}

/// Names of the namespaces with `presence` on.
fn with_presence(namespaces: &Namespaces) -> impl Iterator<Item = String> + '_ {
    namespaces
        .names()
        .filter(|name| namespaces.get(name).is_some_and(|o| o.presence))
        .map(str::to_owned)
}

impl Node {
    /// Puts `live` in force for every decision from now on (see the module docs).
    pub fn replace_live(&self, live: NodeLive) {
        let next = self.live.load().next(live);
        self.live.store(Arc::new(next));
    }

    /// The token verifier in force, if authentication is configured.
    pub fn verifier(&self) -> Option<Arc<Verifier>> {
        self.live.load().live.verifier.clone()
    }

    /// Validates a channel and returns its options, those of a namespace retired by a reload
    /// included (for what its existing subscriptions do).
    pub fn options(&self, channel: &str) -> Result<NamespaceOptions, ClientError> {
        let snapshot = self.live.load();
        if channel == DEFAULT_CHANNEL {
            return Ok(snapshot.live.legacy.clone());
        }
        match snapshot.live.namespaces.resolve(channel) {
            Ok(options) => Ok(options.clone()),
            Err(ChannelError::UnknownNamespace(name)) => snapshot
                .retired
                .get(&name)
                .cloned()
                .ok_or_else(|| ChannelError::UnknownNamespace(name).into()),
            Err(err) => Err(err.into()),
        }
    }

    /// The options a member leaving `channel` leaves with: [`Node::options`], with `presence`
    /// on if it was on at any time (see `Snapshot::presence_once`).
    pub(super) fn leave_options(&self, channel: &str) -> Result<NamespaceOptions, ClientError> {
        let mut options = self.options(channel)?;
        if channel != DEFAULT_CHANNEL
            && self
                .live
                .load()
                .presence_once
                .contains(namespace_of(channel))
        {
            options.presence = true;
        }
        Ok(options)
    }

    /// The options a new subscription to `channel` gets: a retired namespace has none.
    pub(super) fn subscribe_options(&self, channel: &str) -> Result<NamespaceOptions, ClientError> {
        let snapshot = self.live.load();
        if channel == DEFAULT_CHANNEL {
            return Ok(snapshot.live.legacy.clone());
        }
        Ok(snapshot.live.namespaces.resolve(channel)?.clone())
    }

    pub(super) fn count_subscription(&self, channel: &str, delta: i64) {
        let name = if channel == DEFAULT_CHANNEL {
            DEFAULT_CHANNEL
        } else {
            namespace_of(channel)
        };
        if let Some(count) = self.live.load().counts.get(name) {
            count.fetch_add(delta, Ordering::Relaxed);
        }
    }

    /// Local subscriptions per namespace (`default` is the legacy channel), by name.
    pub fn subscription_counts(&self) -> Vec<(String, i64)> {
        let mut counts: Vec<(String, i64)> = self
            .live
            .load()
            .counts
            .iter()
            .map(|(name, count)| (name.clone(), count.load(Ordering::Relaxed)))
            .collect();
        counts.sort_unstable();
        counts
    }
}
