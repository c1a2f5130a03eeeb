//! Cluster-wide transitions in JetStream KV (see [`crate::broker::Broker::track`]).
//!
//! A bucket `<prefix>_transitions` (no expiry) holds, with `H` a holding
//! (`Holding::encode`, base64url) and `N` a node id:
//! - `h.H`: the JSON list of the nodes that hold `H`, changed only by compare-and-set on the
//!   key's revision (retried on a conflict): the change that makes it non-empty or empty
//!   decides the transition, so exactly one node reports it;
//! - `of.N.H`: written by node `N` before it joins `h.H` and removed after it leaves it, so a
//!   survivor knows what a dead node held;
//! - `claim.N`: created (create-if-absent, so one survivor wins) by the survivor that claims
//!   dead node `N`; it stays, so `N`, if it was only silent, learns it was declared dead.
//!
//! Heartbeats are `_hb.N` keys in the presence bucket, which expires entries after the
//! presence TTL: a node whose heartbeat is gone is dead. (`_hb` is never a channel's token:
//! unpadded base64 never ends that way.) A claim whose claimer's heartbeat is gone too is
//! taken over, so a survivor dying mid-claim loses nothing but the transitions it had
//! decided and not yet handed on. Node ids are random per process start.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use super::{Inner, NatsBroker, unavailable};
use crate::broker::transition::NodeIdentity;
use crate::broker::{BrokerError, Holding, Swept, Transition};

/// Compare-and-set attempts before a change is given up as failed (the caller retries).
const CAS_ATTEMPTS: usize = 32;

/// This node's identity for transitions, and the bucket (opened at first use).
pub(super) struct Tracking {
    node: NodeIdentity,
    /// Whether this node's heartbeat has been written under its current id.
    beating: AtomicBool,
    bucket: OnceCell<kv::Store>,
}

fn encode(holding: &Holding) -> String {
    URL_SAFE_NO_PAD.encode(holding.encode())
}

fn decode(token: &str) -> Option<Holding> {
    let bytes = URL_SAFE_NO_PAD.decode(token).ok()?;
    Holding::decode(std::str::from_utf8(&bytes).ok()?)
}

fn heartbeat_key(node: &str) -> String {
    format!("_hb.{node}")
}

impl Tracking {
    pub(super) fn new() -> Self {
        Self {
            node: NodeIdentity::default(),
            beating: AtomicBool::new(false),
            bucket: OnceCell::new(),
        }
    }

    fn node(&self) -> String {
        self.node.current()
    }

    fn declared_dead(&self, old: &str) {
        if self.node.declared_dead(old, "nats") {
            self.beating.store(false, Ordering::Release);
        }
    }
}

/// The holders list at `key` and its revision (0: no such key).
async fn holders(bucket: &kv::Store, key: &str) -> Result<(Vec<String>, u64), BrokerError> {
    match bucket.entry(key).await.map_err(unavailable)? {
        Some(entry) if entry.operation == Operation::Put => {
            let list = serde_json::from_slice(&entry.value).unwrap_or_default();
            Ok((list, entry.revision))
        }
        Some(entry) => Ok((Vec::new(), entry.revision)),
        None => Ok((Vec::new(), 0)),
    }
}

/// Adds (`held`) or removes `node` in the holders list at `key` by compare-and-set; returns
/// whether this change made the list non-empty or empty.
async fn change(
    bucket: &kv::Store,
    key: &str,
    node: &str,
    held: bool,
) -> Result<bool, BrokerError> {
    for _ in 0..CAS_ATTEMPTS {
        let (mut list, revision) = holders(bucket, key).await?;
        let present = list.iter().any(|n| n == node);
        if present == held {
            return Ok(false);
        }
        if held {
            list.push(node.to_owned());
        } else {
            list.retain(|n| n != node);
        }
        let written = if list.is_empty() {
            bucket
                .delete_expect_revision(key, Some(revision))
                .await
                .map_err(|e| e.to_string())
        } else {
            let value = serde_json::to_vec(&list).map_err(unavailable)?;
            bucket
                .update(key, Bytes::from(value), revision)
                .await
                .map(drop)
                .map_err(|e| e.to_string())
        };
        match written {
            Ok(()) => {
                return Ok(if held {
                    list.len() == 1
                } else {
                    list.is_empty()
                });
            }
            Err(err) => tracing::debug!(key, err, "NATS: holders changed meanwhile; retrying"),
        }
    }
    Err(unavailable(format!(
        "{key}: no compare-and-set succeeded in {CAS_ATTEMPTS} attempts"
    )))
}

impl Inner {
    async fn transitions_bucket(&self) -> Result<kv::Store, String> {
        let bucket = format!("{}_transitions", self.names.prefix);
        self.js
            .create_or_update_stream(stream::Config {
                name: format!("KV_{bucket}"),
                subjects: vec![format!("$KV.{bucket}.>")],
                max_messages_per_subject: 1,
                storage: StorageType::File,
                allow_rollup: true,
                deny_delete: true,
                allow_direct: true,
                discard: DiscardPolicy::New,
                ..Default::default()
            })
            .await
            .map_err(|err| format!("bucket {bucket}: {err}"))?;
        self.js
            .get_key_value(&bucket)
            .await
            .map_err(|err| format!("bucket {bucket}: {err}"))
    }

    /// Whether `node`'s heartbeat is current.
    async fn alive(&self, node: &str) -> Result<bool, BrokerError> {
        Ok(self
            .kv
            .entry(heartbeat_key(node))
            .await
            .map_err(unavailable)?
            .is_some_and(|entry| entry.operation == Operation::Put))
    }

    /// Subject tokens after `filter`'s prefix, for the subjects present in `bucket`.
    async fn subjects(&self, bucket: &kv::Store, filter: &str) -> Result<Vec<String>, BrokerError> {
        let full = format!("{}{filter}", bucket.prefix);
        let mut found = bucket
            .stream
            .info_with_subjects(&full)
            .await
            .map_err(unavailable)?;
        let mut out = Vec::new();
        while let Some(subject) = found.next().await {
            let (subject, _) = subject.map_err(unavailable)?;
            if let Some(key) = subject.strip_prefix(bucket.prefix.as_str()) {
                out.push(key.to_owned());
            }
        }
        Ok(out)
    }

    async fn forget(&self, bucket: &kv::Store, key: &str) -> Result<(), BrokerError> {
        bucket
            .stream
            .purge()
            .filter(format!("{}{key}", bucket.prefix))
            .await
            .map(drop)
            .map_err(unavailable)
    }
}

impl NatsBroker {
    async fn bucket(&self) -> Result<&kv::Store, BrokerError> {
        self.tracking
            .bucket
            .get_or_try_init(|| async {
                self.inner.transitions_bucket().await.map_err(unavailable)
            })
            .await
    }

    async fn beat(&self, node: &str) -> Result<(), BrokerError> {
        self.inner
            .kv
            .put(heartbeat_key(node), Bytes::from_static(b"1"))
            .await
            .map_err(unavailable)?;
        self.tracking.beating.store(true, Ordering::Release);
        Ok(())
    }

    async fn claimed(&self, bucket: &kv::Store, node: &str) -> Result<bool, BrokerError> {
        Ok(bucket
            .entry(format!("claim.{node}"))
            .await
            .map_err(unavailable)?
            .is_some())
    }

    pub(super) async fn track_holding(
        &self,
        holding: &Holding,
        held: bool,
    ) -> Result<Option<Transition>, BrokerError> {
        self.inner.ready()?;
        let bucket = self.bucket().await?;
        let node = self.tracking.node();
        if !self.tracking.beating.load(Ordering::Acquire) {
            // Before anything names this node: a survivor must never see its holdings
            // without a heartbeat.
            self.beat(&node).await?;
        }
        let token = encode(holding);
        let (of, key) = (format!("of.{node}.{token}"), format!("h.{token}"));
        if held {
            bucket
                .put(&of, Bytes::from_static(b"1"))
                .await
                .map_err(unavailable)?;
        }
        let decided = change(bucket, &key, &node, held).await?;
        if !held {
            self.inner.forget(bucket, &of).await?;
        }
        if held && self.claimed(bucket, &node).await? {
            // Declared dead meanwhile: the claim may not have seen this holding. Undone, so
            // nothing is left behind (a transition it decided is undone too).
            change(bucket, &key, &node, false).await?;
            self.inner.forget(bucket, &of).await?;
            self.tracking.declared_dead(&node);
            return Err(unavailable(
                "this node was declared dead; it tracks again under a new id",
            ));
        }
        Ok(decided.then(|| holding.transition(held)))
    }

    pub(super) async fn sweep_nodes(&self) -> Result<Swept, BrokerError> {
        self.inner.ready()?;
        let bucket = self.bucket().await?;
        let node = self.tracking.node();
        if self.claimed(bucket, &node).await? {
            self.tracking.declared_dead(&node);
        } else {
            self.beat(&node).await?;
        }
        let mut swept = Swept::default();
        let mut nodes: Vec<String> = self
            .inner
            .subjects(bucket, "of.*.*")
            .await?
            .into_iter()
            .filter_map(|key| key.split('.').nth(1).map(str::to_owned))
            .collect();
        nodes.sort();
        nodes.dedup();
        let me = self.tracking.node();
        for other in nodes.into_iter().filter(|n| *n != me) {
            if self.inner.alive(&other).await? || !self.claim(bucket, &other, &me).await? {
                continue;
            }
            swept
                .transitions
                .extend(self.release_dead(bucket, &other).await?);
        }
        swept.rejoined = self.tracking.node.take_rejoined();
        Ok(swept)
    }

    /// Claims dead node `dead` for `me`: create-if-absent, or take over a claim whose
    /// claimer died too.
    async fn claim(&self, bucket: &kv::Store, dead: &str, me: &str) -> Result<bool, BrokerError> {
        let key = format!("claim.{dead}");
        let value = Bytes::from(me.to_owned());
        match bucket.entry(&key).await.map_err(unavailable)? {
            None => Ok(bucket.create(&key, value).await.is_ok()),
            Some(entry) => {
                let claimer = String::from_utf8_lossy(&entry.value).into_owned();
                if claimer == me {
                    return Ok(true);
                }
                if self.inner.alive(&claimer).await? {
                    return Ok(false);
                }
                Ok(bucket.update(&key, value, entry.revision).await.is_ok())
            }
        }
    }

    /// Removes claimed node `dead` from everything it held; returns the transitions of the
    /// holdings it was the last holder of.
    async fn release_dead(
        &self,
        bucket: &kv::Store,
        dead: &str,
    ) -> Result<Vec<Transition>, BrokerError> {
        let mut out = Vec::new();
        let keys = self.inner.subjects(bucket, &format!("of.{dead}.*")).await?;
        // Memberships first, so `member_removed` goes before its channel's `channel_vacated`.
        let mut holdings: Vec<(String, Holding)> = keys
            .into_iter()
            .filter_map(|key| {
                let token = key.rsplit('.').next()?.to_owned();
                let holding = decode(&token)?;
                Some((token, holding))
            })
            .collect();
        holdings.sort_by_key(|(_, h)| h.user.is_none());
        for (token, holding) in holdings {
            if change(bucket, &format!("h.{token}"), dead, false).await? {
                out.push(holding.transition(false));
            }
            self.inner
                .forget(bucket, &format!("of.{dead}.{token}"))
                .await?;
        }
        Ok(out)
    }
}

/// How often a node sweeps: a third of the presence TTL.
pub(super) fn sweep_every(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(50))
}
