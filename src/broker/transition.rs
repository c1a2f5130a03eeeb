//! Cluster-wide transitions of a channel's occupancy and of a user's membership: what the
//! backend's webhooks report (`channel_occupied`, `channel_vacated`, `member_added`,
//! `member_removed`).
//!
//! A transition is decided once for the whole cluster: the memory broker decides it alone,
//! networked brokers decide it atomically in Redis or NATS, so exactly one node reports each
//! one, including the transitions a dead node's subscribers cause once its entries expire.
//! Whoever decides hands it to a [`TransitionSink`]; the sink (the webhook queue) must not
//! block.
//!
//! Every decision carries a `seq` the broker assigned atomically with it, increasing across
//! the cluster (one counter per broker prefix, seeded from the clock in microseconds so it
//! keeps increasing when the counter is lost), and an id derived from it ([`decision_id`]):
//! a decision reported twice (its answer was lost and the call repeated, or a claim handed
//! out again) carries the same id, and a receiver orders a channel's events by `seq`.

use std::sync::Arc;

/// What changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TransitionKind {
    /// The channel's first subscriber anywhere in the cluster arrived.
    ChannelOccupied,
    /// The channel's last subscriber anywhere in the cluster left (or its node died).
    ChannelVacated,
    /// A user's first subscription to a presence channel, across all their connections.
    MemberAdded,
    /// A user's last subscription to a presence channel ended (or its node died).
    MemberRemoved,
}

impl TransitionKind {
    /// The event name the webhooks carry.
    pub fn name(self) -> &'static str {
        match self {
            TransitionKind::ChannelOccupied => "channel_occupied",
            TransitionKind::ChannelVacated => "channel_vacated",
            TransitionKind::MemberAdded => "member_added",
            TransitionKind::MemberRemoved => "member_removed",
        }
    }
}

/// One transition, as decided by the broker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Transition {
    /// What changed.
    pub kind: TransitionKind,
    /// The channel it happened on.
    pub channel: Arc<str>,
    /// The user, for `MemberAdded` and `MemberRemoved`; `None` for channel transitions.
    pub user: Option<Arc<str>>,
    /// When it was decided, in wall-clock milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// The decision's place in the cluster-wide order: larger for every later decision of
    /// the same broker (prefix), whichever node made it.
    pub seq: u64,
    /// The decision's id ([`decision_id`] of the broker's scope and `seq`): the same however
    /// often the decision is reported.
    pub id: uuid::Uuid,
}

/// The namespace of [`decision_id`]'s name-based (v5) UUIDs.
const DECISIONS: uuid::Uuid = uuid::Uuid::from_u128(0x5f1c_2a67_9d0e_4b8a_b3c4_7e21_0a9f_6d13);

/// The id of decision `seq` of the broker `scope` (`redis/<prefix>`, `nats/<prefix>`, or
/// `memory/<random>`): a UUID v5 (SHA-1 of the scope and `seq`), so every report of one
/// decision carries the same id and decisions of different scopes never share one.
pub fn decision_id(scope: &str, seq: u64) -> uuid::Uuid {
    use sha1::Digest;
    let mut hash = sha1::Sha1::new();
    hash.update(DECISIONS.as_bytes());
    hash.update(scope.as_bytes());
    hash.update(b"/");
    hash.update(seq.to_string().as_bytes());
    let digest = hash.finalize();
    let mut bytes = [0u8; 16];
    bytes.copy_from_slice(&digest[..16]);
    uuid::Builder::from_sha1_bytes(bytes).into_uuid()
}

/// A clock-seeded start for a decision counter: microseconds since the Unix epoch, so a
/// counter started later (a restart, a lost key) starts above every value an earlier one
/// reached (unless it made more than one decision per microsecond).
pub fn seq_seed() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX))
}

/// Where decided transitions go. Called from broker and engine tasks; must not block.
pub trait TransitionSink: Send + Sync {
    /// Takes one transition. Per channel, calls arrive in the order the transitions happened.
    fn on_transition(&self, transition: Transition);

    /// Takes `transitions` in order, as [`TransitionSink::on_transition`] does, and resolves
    /// once they are stored: `true` if they survive a crash (on disk), `false` if not (kept in
    /// memory only, or some were dropped). A caller keeping its own record of them until they
    /// are safe (the memory broker's holdings of a previous life) forgets it only on `true`.
    /// The default keeps nothing on disk.
    fn on_transitions_stored(&self, transitions: Vec<Transition>) -> StoredFuture<'_> {
        for transition in transitions {
            self.on_transition(transition);
        }
        Box::pin(std::future::ready(false))
    }
}

/// What [`TransitionSink::on_transitions_stored`] returns: whether the transitions are durable.
pub type StoredFuture<'a> = std::pin::Pin<Box<dyn Future<Output = bool> + Send + 'a>>;

/// What a node holds and reports to the broker through [`super::Broker::track`]: a channel
/// (it has local subscribers), or a user's membership of a presence channel (the user has a
/// local connection subscribed to it).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Holding {
    /// The channel.
    pub channel: Arc<str>,
    /// The user, for a membership; `None` for the channel itself.
    pub user: Option<Arc<str>>,
}

impl Holding {
    /// The transition that the first holder anywhere (`held`) or the last one gone (`!held`)
    /// causes, decided by broker `scope` as its decision `seq` at `time_ms`.
    pub fn transition(&self, held: bool, scope: &str, seq: u64, time_ms: u64) -> Transition {
        let kind = match (self.user.is_some(), held) {
            (false, true) => TransitionKind::ChannelOccupied,
            (false, false) => TransitionKind::ChannelVacated,
            (true, true) => TransitionKind::MemberAdded,
            (true, false) => TransitionKind::MemberRemoved,
        };
        Transition {
            kind,
            channel: Arc::clone(&self.channel),
            user: self.user.clone(),
            time_ms,
            seq,
            id: decision_id(scope, seq),
        }
    }

    /// A compact text form, `c:<channel>` or `m:<user length>:<user><channel>`, that networked
    /// brokers use in their keys; [`Holding::decode`] reads it back.
    pub fn encode(&self) -> String {
        match &self.user {
            None => format!("c:{}", self.channel),
            Some(user) => format!("m:{}:{}{}", user.len(), user, self.channel),
        }
    }

    /// Reads [`Holding::encode`]'s form; `None` if it is not one.
    pub fn decode(text: &str) -> Option<Self> {
        if let Some(channel) = text.strip_prefix("c:") {
            return Some(Self {
                channel: Arc::from(channel),
                user: None,
            });
        }
        let rest = text.strip_prefix("m:")?;
        let (len, rest) = rest.split_once(':')?;
        let len: usize = len.parse().ok()?;
        let user = rest.get(..len)?;
        let channel = rest.get(len..)?;
        Some(Self {
            channel: Arc::from(channel),
            user: Some(Arc::from(user)),
        })
    }
}

/// The decision counter of a broker that decides alone (the memory broker): node-wide,
/// seeded from the clock in microseconds at start ([`seq_seed`]), so it keeps increasing
/// across restarts; its scope is random per start, so ids never repeat across restarts.
#[derive(Debug)]
pub struct LocalDecisions {
    scope: String,
    next: std::sync::atomic::AtomicU64,
}

impl Default for LocalDecisions {
    fn default() -> Self {
        Self {
            scope: format!("memory/{}", uuid::Uuid::new_v4().simple()),
            next: std::sync::atomic::AtomicU64::new(seq_seed()),
        }
    }
}

impl LocalDecisions {
    /// The transition of `holding` now held (or no longer held), as the next decision. Called
    /// under the lock that orders the decisions, so `seq` follows their order.
    pub fn decide(&self, holding: &Holding, held: bool) -> Transition {
        let seq = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
        holding.transition(held, &self.scope, seq, now_ms())
    }
}

/// What [`super::Broker::sweep`] found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Swept {
    /// Transitions that dead nodes' holdings caused, claimed by this node: it reports them.
    /// Networked brokers keep them in the broker until the next sweep acknowledges them, so
    /// a sweep whose answer is lost (or cut short) loses none: the next one returns them.
    pub transitions: Vec<Transition>,
    /// The broker had declared this node dead (it missed its heartbeats for the presence
    /// TTL) and its holdings are gone: the node must [`super::Broker::track`] everything it
    /// holds again.
    pub rejoined: bool,
    /// More transitions are pending than one sweep returns: the caller sweeps again soon
    /// (after handing these on), instead of waiting for the next interval.
    pub more: bool,
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// This node's id in a networked broker's transition bookkeeping: random, drawn at start, so a
/// restarted node is never taken for its old self, and drawn again when the node learns that
/// the others declared it dead (it was alive but missed its heartbeats), so it joins afresh.
#[derive(Debug)]
pub struct NodeIdentity {
    id: std::sync::Mutex<String>,
    /// Set when a new id was drawn; the next sweep tells the engine to report its holdings again.
    rejoined: std::sync::atomic::AtomicBool,
    /// Numbers this node's `track` calls in the order they were made, so the broker can
    /// refuse one that arrives after a later one (a request stuck on a dropped connection).
    calls: std::sync::atomic::AtomicU64,
}

impl Default for NodeIdentity {
    fn default() -> Self {
        Self {
            id: std::sync::Mutex::new(Self::fresh()),
            rejoined: std::sync::atomic::AtomicBool::new(false),
            calls: std::sync::atomic::AtomicU64::new(0),
        }
    }
}

impl NodeIdentity {
    fn fresh() -> String {
        uuid::Uuid::new_v4().simple().to_string()
    }

    /// The current id.
    pub fn current(&self) -> String {
        self.id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// This node was declared dead under `old`: draws a new id, once however many calls found
    /// out (a call that still used `old` after the new id was drawn changes nothing). Returns
    /// whether this call drew it.
    pub fn declared_dead(&self, old: &str, broker: &str) -> bool {
        let mut id = self
            .id
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if *id != old {
            return false;
        }
        *id = Self::fresh();
        self.rejoined
            .store(true, std::sync::atomic::Ordering::Release);
        tracing::warn!(old, new = %*id, broker, "this node was declared dead; new node id");
        true
    }

    /// The number of this node's next `track` call: larger than every earlier one's.
    pub fn next_call(&self) -> u64 {
        self.calls
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
            + 1
    }

    /// Whether a new id was drawn since the last call.
    pub fn take_rejoined(&self) -> bool {
        self.rejoined
            .swap(false, std::sync::atomic::Ordering::AcqRel)
    }
}
