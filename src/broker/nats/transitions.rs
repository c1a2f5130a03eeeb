//! Cluster-wide transitions in JetStream KV (see [`crate::broker::Broker::track`]).
//!
//! A bucket `<prefix>_transitions` (no expiry) holds, with `H` a holding
//! (`Holding::encode`, base64url) and `N` a node id:
//! - `h.H`: a JSON object: `nodes`, the nodes that hold `H`, and `last`, each node's last
//!   call on `H` (its state, call number, time, and the decision it made, if any). It is
//!   changed only by compare-and-set on the key's revision (retried on a conflict): the change
//!   that makes `nodes` non-empty or empty decides the transition, so exactly one node
//!   reports it, and the decision's `seq` is that write's revision (the bucket's sequence,
//!   increasing across all keys) plus the bucket's creation time in µs (so a recreated
//!   bucket keeps increasing). Because the call's record is part of the decisive write, a
//!   call repeated for the same state (its answer was lost) finds it and returns the same
//!   decision, and a call older than the recorded one (stuck on a dropped connection) is
//!   refused. Records of nodes that no longer hold `H` are dropped after twice the presence
//!   TTL (a node cut off that long was declared dead and tracks everything again anyway).
//!   An older list-only value (`["N", ...]`) is read as holders without records;
//! - `of.N.H`: written by node `N` before it joins `h.H` and removed after it leaves it, so a
//!   survivor knows what a dead node held;
//! - `claim.N`: created (create-if-absent, so one survivor wins) by the survivor that claims
//!   dead node `N`; it stays, so `N`, if it was only silent, learns it was declared dead;
//! - `pend.N.S`: a transition with `seq` `S` that node `N` claimed from a dead node and has
//!   not yet acknowledged. Written before the dead node's `of.` key is removed; every sweep
//!   returns all of them and the next sweep removes the ones returned (the node handed them
//!   on). A survivor that claims `N` takes over its `pend.` keys too.
//!
//! Heartbeats are `_hb.N` keys in the presence bucket, which expires entries after the
//! presence TTL: a node whose heartbeat is gone is dead. (`_hb` is never a channel's token:
//! unpadded base64 never ends that way.) A claim whose claimer's heartbeat is gone too is
//! taken over; the taker repeats the dead node's removals (each finds its record and returns
//! the same decision) for the `of.` keys still there, so a survivor dying mid-claim loses
//! nothing. Node ids are random per process start.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_nats::jetstream::kv::{self, Operation};
use async_nats::jetstream::stream::{self, DiscardPolicy, StorageType};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::OnceCell;

use serde::{Deserialize, Serialize};

use super::{Inner, NatsBroker, unavailable};
use crate::broker::transition::{NodeIdentity, now_ms};
use crate::broker::{BrokerError, Holding, Swept, Transition};

/// Pending transitions a sweep returns at most (each is one read, and its acknowledgement one
/// purge, in the next sweep); see `pending`.
const PENDING_PER_SWEEP: usize = 256;

/// Compare-and-set attempts before a change is given up as failed (the caller retries).
const CAS_ATTEMPTS: usize = 32;

/// This node's identity for transitions, the bucket (opened at first use) with its `seq`
/// base, and what the last sweep returned.
pub(super) struct Tracking {
    node: NodeIdentity,
    /// Whether this node's heartbeat has been written under its current id.
    beating: AtomicBool,
    bucket: OnceCell<(kv::Store, u64)>,
    /// The `pend.` keys the last sweep returned (the node handed them on): the next sweep
    /// removes them.
    handed: std::sync::Mutex<Vec<String>>,
}

/// A node's last call on a holding, kept in the holding's entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Last {
    /// The state the call asked for.
    held: bool,
    /// Its number ([`NodeIdentity::next_call`]; `u64::MAX` for a dead node's removal).
    call: u64,
    /// When it was applied (this node's clock, ms).
    time_ms: u64,
    /// The revision of the write that decided a transition: `Some(0)` is the entry's own
    /// write (its revision is known only once written), resolved by the next writer.
    decided: Option<u64>,
}

/// The value of `h.H`.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Holders {
    nodes: Vec<String>,
    #[serde(default)]
    last: BTreeMap<String, Last>,
}

/// A decision read back or made: the revision of its write and its time.
type Decided = Option<(u64, u64)>;

/// The value of a `pend.` key.
#[derive(Debug, Serialize, Deserialize)]
struct Pending {
    /// The holding's token.
    h: String,
    /// When it was decided (ms).
    t: u64,
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
            handed: std::sync::Mutex::default(),
        }
    }

    fn handed(&self) -> std::sync::MutexGuard<'_, Vec<String>> {
        self.handed
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
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

/// The holders at `key` (their records' own decisions resolved to its revision) and its
/// revision (0: no such key).
async fn holders(bucket: &kv::Store, key: &str) -> Result<(Holders, u64), BrokerError> {
    let Some(entry) = bucket.entry(key).await.map_err(unavailable)? else {
        return Ok((Holders::default(), 0));
    };
    if entry.operation != Operation::Put {
        return Ok((Holders::default(), entry.revision));
    }
    let mut holders = serde_json::from_slice::<Holders>(&entry.value)
        .or_else(|_| {
            serde_json::from_slice::<Vec<String>>(&entry.value).map(|nodes| Holders {
                nodes,
                last: BTreeMap::new(),
            })
        })
        .unwrap_or_default();
    for last in holders.last.values_mut() {
        if last.decided == Some(0) {
            last.decided = Some(entry.revision);
        }
    }
    Ok((holders, entry.revision))
}

/// Adds (`held`) or removes `node` in the holders at `key` by compare-and-set, as `node`'s
/// call number `call`; returns the decision if this change made the list non-empty or empty,
/// or if it was made already by an earlier call for the same state (a lost answer). Records
/// of nodes gone for longer than `keep` ms are dropped.
async fn change(
    bucket: &kv::Store,
    key: &str,
    node: &str,
    held: bool,
    call: u64,
    keep: u64,
) -> Result<Decided, BrokerError> {
    for _ in 0..CAS_ATTEMPTS {
        let (mut holders, revision) = holders(bucket, key).await?;
        if let Some(last) = holders.last.get(node) {
            if last.call > call {
                return Err(unavailable(format!(
                    "{key}: a later call of this node came first; this one is void"
                )));
            }
            if last.held == held {
                return Ok(last.decided.map(|rev| (rev, last.time_ms)));
            }
        }
        let present = holders.nodes.iter().any(|n| n == node);
        if present == held {
            return Ok(None);
        }
        if held {
            holders.nodes.push(node.to_owned());
        } else {
            holders.nodes.retain(|n| n != node);
        }
        let decided = if held {
            holders.nodes.len() == 1
        } else {
            holders.nodes.is_empty()
        };
        let now = now_ms();
        let nodes = &holders.nodes;
        holders
            .last
            .retain(|n, last| nodes.contains(n) || last.time_ms.saturating_add(keep) > now);
        holders.last.insert(
            node.to_owned(),
            Last {
                held,
                call,
                time_ms: now,
                decided: decided.then_some(0),
            },
        );
        let value = serde_json::to_vec(&holders).map_err(unavailable)?;
        match bucket.update(key, Bytes::from(value), revision).await {
            Ok(written) => return Ok(decided.then_some((written, now))),
            // A conflict, or an answer lost: the next read shows which (our record).
            Err(err) => tracing::debug!(key, %err, "NATS: holders changed meanwhile; retrying"),
        }
    }
    Err(unavailable(format!(
        "{key}: no compare-and-set succeeded in {CAS_ATTEMPTS} attempts"
    )))
}

impl Inner {
    /// The bucket, and the base of its decisions' `seq`: the bucket's creation time in µs.
    async fn transitions_bucket(&self) -> Result<(kv::Store, u64), String> {
        let bucket = format!("{}_transitions", self.names.prefix);
        let info = self
            .js
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
        let base = u64::try_from(info.created.unix_timestamp_nanos() / 1000).unwrap_or(0);
        let store = self
            .js
            .get_key_value(&bucket)
            .await
            .map_err(|err| format!("bucket {bucket}: {err}"))?;
        Ok((store, base))
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
    async fn bucket(&self) -> Result<&(kv::Store, u64), BrokerError> {
        self.tracking
            .bucket
            .get_or_try_init(|| async {
                self.inner.transitions_bucket().await.map_err(unavailable)
            })
            .await
    }

    /// The scope of this broker's decision ids.
    fn scope(&self) -> String {
        format!("nats/{}", self.inner.names.prefix)
    }

    /// How long a node's record in a holding's entry outlives its last call.
    fn keep_ms(&self) -> u64 {
        u64::try_from((self.inner.options.presence_ttl * 2).as_millis())
            .unwrap_or(u64::MAX)
            .max(10_000)
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
        let (bucket, base) = self.bucket().await?;
        let node = self.tracking.node();
        let call = self.tracking.node.next_call();
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
        let decided = change(bucket, &key, &node, held, call, self.keep_ms()).await?;
        if !held {
            self.inner.forget(bucket, &of).await?;
        }
        if held && self.claimed(bucket, &node).await? {
            // Declared dead meanwhile: the claim may not have seen this holding. Undone, so
            // nothing is left behind (a transition it decided is undone too).
            let undo = self.tracking.node.next_call();
            change(bucket, &key, &node, false, undo, self.keep_ms()).await?;
            self.inner.forget(bucket, &of).await?;
            self.tracking.declared_dead(&node);
            return Err(unavailable(
                "this node was declared dead; it tracks again under a new id",
            ));
        }
        Ok(decided.map(|(revision, time_ms)| {
            holding.transition(held, &self.scope(), base + revision, time_ms)
        }))
    }

    pub(super) async fn sweep_nodes(&self) -> Result<Swept, BrokerError> {
        self.inner.ready()?;
        let started = std::time::Instant::now();
        let (bucket, base) = self.bucket().await?;
        // What the last sweep returned was handed on: acknowledged first.
        let acks = self.tracking.handed().clone();
        for key in &acks {
            self.inner.forget(bucket, key).await?;
        }
        self.tracking.handed().clear();
        let node = self.tracking.node();
        if self.claimed(bucket, &node).await? {
            self.tracking.declared_dead(&node);
        } else {
            self.beat(&node).await?;
        }
        let mut nodes: Vec<String> = self
            .inner
            .subjects(bucket, "of.*.*")
            .await?
            .into_iter()
            .chain(self.inner.subjects(bucket, "pend.*.*").await?)
            .filter_map(|key| key.split('.').nth(1).map(str::to_owned))
            .collect();
        nodes.sort();
        nodes.dedup();
        let me = self.tracking.node();
        for other in nodes.into_iter().filter(|n| *n != me) {
            // Claims stay pending in the bucket (and a claim half done is finished by the
            // next sweep): stopping early loses nothing and keeps the sweep short.
            if started.elapsed() >= self.inner.options.timeout / 2 {
                break;
            }
            let outcome: Result<(), BrokerError> = async {
                if self.inner.alive(&other).await? || !self.claim(bucket, &other, &me).await? {
                    return Ok(());
                }
                self.release_dead(bucket, *base, &other, &me).await
            }
            .await;
            if let Err(err) = outcome {
                // Nothing is returned while a claim is half done: the next sweep finishes it
                // (repeating its removals returns the same decisions, written to the same
                // pending keys), and only then are they read, once.
                tracing::warn!(%err, dead = other, "NATS: claiming a dead node stopped; the next sweep goes on");
                return Err(err);
            }
        }
        let (transitions, handed, more) = self.pending(bucket, &me).await?;
        *self.tracking.handed() = handed;
        Ok(Swept {
            transitions,
            rejoined: self.tracking.node.take_rejoined(),
            more,
        })
    }

    /// The oldest transitions pending for `me` (at most [`PENDING_PER_SWEEP`]), by `seq`,
    /// their keys, and whether more are pending. Bounded so that a sweep after the death of a
    /// node that held tens of thousands of memberships (one read each) stays inside its
    /// deadline and makes progress, instead of timing out on every try.
    async fn pending(
        &self,
        bucket: &kv::Store,
        me: &str,
    ) -> Result<(Vec<Transition>, Vec<String>, bool), BrokerError> {
        let mut keys: Vec<(u64, String)> = self
            .inner
            .subjects(bucket, &format!("pend.{me}.*"))
            .await?
            .into_iter()
            .filter_map(|key| Some((key.rsplit('.').next()?.parse().ok()?, key)))
            .collect();
        keys.sort();
        let more = keys.len() > PENDING_PER_SWEEP;
        keys.truncate(PENDING_PER_SWEEP);
        let scope = self.scope();
        let mut out = Vec::with_capacity(keys.len());
        for (seq, key) in &keys {
            let Some(value) = bucket.get(key).await.map_err(unavailable)? else {
                continue;
            };
            let transition = serde_json::from_slice::<Pending>(&value)
                .ok()
                .and_then(|p| Some((decode(&p.h)?, p.t)))
                .map(|(holding, time_ms)| holding.transition(false, &scope, *seq, time_ms));
            match transition {
                Some(transition) => out.push(transition),
                None => tracing::warn!(key, "unreadable pending transition of a dead node"),
            }
        }
        Ok((out, keys.into_iter().map(|(_, key)| key).collect(), more))
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

    /// Removes claimed node `dead` from everything it held, adding the transitions of the
    /// holdings it was the last holder of to `me`'s pending ones, and takes over `dead`'s own
    /// pending transitions.
    async fn release_dead(
        &self,
        bucket: &kv::Store,
        base: u64,
        dead: &str,
        me: &str,
    ) -> Result<(), BrokerError> {
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
        let keep = self.keep_ms();
        for (token, _) in holdings {
            // As the dead node's last call: a removal repeated by whoever finishes the claim
            // returns the same decision.
            let decided =
                change(bucket, &format!("h.{token}"), dead, false, u64::MAX, keep).await?;
            if let Some((revision, time_ms)) = decided {
                let value = serde_json::to_vec(&Pending {
                    h: token.clone(),
                    t: time_ms,
                })
                .map_err(unavailable)?;
                bucket
                    .put(format!("pend.{me}.{}", base + revision), Bytes::from(value))
                    .await
                    .map_err(unavailable)?;
            }
            self.inner
                .forget(bucket, &format!("of.{dead}.{token}"))
                .await?;
        }
        for key in self
            .inner
            .subjects(bucket, &format!("pend.{dead}.*"))
            .await?
        {
            let Some(seq) = key.rsplit('.').next() else {
                continue;
            };
            if let Some(value) = bucket.get(&key).await.map_err(unavailable)? {
                bucket
                    .put(format!("pend.{me}.{seq}"), value)
                    .await
                    .map_err(unavailable)?;
            }
            self.inner.forget(bucket, &key).await?;
        }
        Ok(())
    }
}

/// How often a node sweeps: a third of the presence TTL.
pub(super) fn sweep_every(ttl: Duration) -> Duration {
    (ttl / 3).max(Duration::from_millis(50))
}
