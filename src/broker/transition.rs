//! Cluster-wide transitions of a channel's occupancy and of a user's membership: what the
//! backend's webhooks report (`channel_occupied`, `channel_vacated`, `member_added`,
//! `member_removed`).
//!
//! A transition is decided once for the whole cluster: the memory broker decides it alone,
//! networked brokers decide it atomically in Redis or NATS, so exactly one node reports each
//! one, including the transitions a dead node's subscribers cause once its entries expire.
//! Whoever decides hands it to a [`TransitionSink`]; the sink (the webhook queue) must not
//! block.

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
}

/// Where decided transitions go. Called from broker and engine tasks; must not block.
pub trait TransitionSink: Send + Sync {
    /// Takes one transition. Per channel, calls arrive in the order the transitions happened.
    fn on_transition(&self, transition: Transition);
}
