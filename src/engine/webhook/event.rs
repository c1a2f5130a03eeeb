//! One webhook event, the POST body that carries a batch of them, and its signature.

use std::sync::Arc;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::broker::transition::{Transition, TransitionKind};

/// The kinds of event a webhook can report (`RUSTY_SOCKS_WEBHOOK_EVENTS`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventName {
    /// A channel's first subscriber anywhere in the cluster.
    ChannelOccupied,
    /// A channel's last subscriber anywhere in the cluster left.
    ChannelVacated,
    /// A user's first subscription to a presence channel.
    MemberAdded,
    /// A user's last subscription to a presence channel ended.
    MemberRemoved,
    /// A WebSocket session started on this node (opt-in).
    ClientConnected,
    /// A WebSocket session on this node ended (opt-in).
    ClientDisconnected,
}

impl EventName {
    /// Every name, in the order the docs list them.
    pub const ALL: [EventName; 6] = [
        Self::ChannelOccupied,
        Self::ChannelVacated,
        Self::MemberAdded,
        Self::MemberRemoved,
        Self::ClientConnected,
        Self::ClientDisconnected,
    ];

    /// The name the body carries.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ChannelOccupied => "channel_occupied",
            Self::ChannelVacated => "channel_vacated",
            Self::MemberAdded => "member_added",
            Self::MemberRemoved => "member_removed",
            Self::ClientConnected => "client_connected",
            Self::ClientDisconnected => "client_disconnected",
        }
    }

    /// The name called `text`, if there is one.
    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|n| n.as_str() == text)
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl From<TransitionKind> for EventName {
    fn from(kind: TransitionKind) -> Self {
        match kind {
            TransitionKind::ChannelOccupied => Self::ChannelOccupied,
            TransitionKind::ChannelVacated => Self::ChannelVacated,
            TransitionKind::MemberAdded => Self::MemberAdded,
            TransitionKind::MemberRemoved => Self::MemberRemoved,
        }
    }
}

/// A set of event names: the ones a webhook reports.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EventSet(u8);

impl EventSet {
    /// The default: the four channel and member events.
    pub const DEFAULT: EventSet = EventSet(0b1111);

    /// The set of `names`.
    pub fn of(names: impl IntoIterator<Item = EventName>) -> Self {
        Self(names.into_iter().fold(0, |bits, n| bits | n.bit()))
    }

    /// Whether `name` is in the set.
    pub fn contains(self, name: EventName) -> bool {
        self.0 & name.bit() != 0
    }
}

impl Default for EventSet {
    fn default() -> Self {
        Self::DEFAULT
    }
}

impl std::fmt::Debug for EventSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = EventName::ALL
            .into_iter()
            .filter(|n| self.contains(*n))
            .map(EventName::as_str)
            .collect();
        write!(f, "{}", names.join(","))
    }
}

/// One event, as delivered (and as kept on disk until it is).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Event {
    /// Unique, and the same on every attempt and after a restart: receivers drop duplicates
    /// by it. For channel and member events it is derived from the broker's decision, so a
    /// decision reported twice (a lost answer repeated, a dead node's claim handed out again)
    /// carries the same id too.
    pub id: Uuid,
    /// What happened.
    pub name: EventName,
    /// The channel, for channel and member events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub channel: Option<Arc<str>>,
    /// The user, for member events and authenticated clients.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<Arc<str>>,
    /// The client (session) id, for client events.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<Uuid>,
    /// When it happened, in wall-clock milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Channel and member events: the decision's place in the cluster-wide order, larger for
    /// every later decision whichever node made it; receivers order a channel's events by
    /// it. Absent for client events (and in records written before it existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
}

impl Event {
    /// The event reporting `transition`, with the decision's id and `seq`.
    pub fn from_transition(transition: Transition) -> Self {
        Self {
            id: transition.id,
            name: transition.kind.into(),
            channel: Some(transition.channel),
            user: transition.user,
            client: None,
            time_ms: transition.time_ms,
            seq: Some(transition.seq),
        }
    }

    /// A `client_connected` or `client_disconnected` event, now.
    pub fn client(name: EventName, client: Uuid, user: Option<Arc<str>>) -> Self {
        Self {
            id: Uuid::new_v4(),
            name,
            channel: None,
            user,
            client: Some(client),
            time_ms: wall_ms(),
            seq: None,
        }
    }
}

/// Wall-clock milliseconds since the Unix epoch.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

#[derive(Serialize)]
struct Body<'a> {
    time_ms: u64,
    events: &'a [Event],
}

/// The POST body of a batch: `{"time_ms":<n>,"events":[...]}`.
pub fn body(events: &[Event], time_ms: u64) -> Vec<u8> {
    // Serializing plain data (strings, numbers, uuids) into a Vec cannot fail.
    serde_json::to_vec(&Body { time_ms, events }).unwrap_or_default()
}

/// The `X-Rusty-Socks-Signature` header's value: `sha256=<hex HMAC-SHA256 of body>`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, body);
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for byte in tag.as_ref() {
        out.push_str(&format!("{byte:02x}"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_none() {
        for name in EventName::ALL {
            assert_eq!(EventName::parse(name.as_str()), Some(name));
            let json = serde_json::to_string(&name).expect("test setup");
            assert_eq!(json, format!("\"{}\"", name.as_str()));
        }
        assert_eq!(EventName::parse("channel_created"), None);
    }

    #[test]
    fn the_default_set_is_the_four_channel_and_member_events() {
        let set = EventSet::DEFAULT;
        assert!(set.contains(EventName::ChannelOccupied));
        assert!(set.contains(EventName::MemberRemoved));
        assert!(!set.contains(EventName::ClientConnected));
        assert!(!set.contains(EventName::ClientDisconnected));
        let client = EventSet::of([EventName::ClientDisconnected]);
        assert!(client.contains(EventName::ClientDisconnected));
        assert!(!client.contains(EventName::ChannelOccupied));
        assert_eq!(format!("{client:?}"), "client_disconnected");
    }

    #[test]
    fn the_body_holds_only_meaningful_fields() {
        let occupied = Event::from_transition(Transition {
            kind: TransitionKind::ChannelOccupied,
            channel: Arc::from("news"),
            user: None,
            time_ms: 7,
            seq: 42,
            id: crate::broker::transition::decision_id("redis/app", 42),
        });
        let body: serde_json::Value =
            serde_json::from_slice(&body(std::slice::from_ref(&occupied), 9)).expect("test setup");
        assert_eq!(body["time_ms"], 9);
        let event = &body["events"][0];
        assert_eq!(event["name"], "channel_occupied");
        assert_eq!(event["channel"], "news");
        assert_eq!(event["id"], occupied.id.to_string());
        assert_eq!(event["time_ms"], 7);
        assert_eq!(event["seq"], 42);
        assert!(event.get("user").is_none() && event.get("client").is_none());
        let connected = Event::client(EventName::ClientConnected, Uuid::new_v4(), None);
        let client: serde_json::Value =
            serde_json::from_slice(&super::body(std::slice::from_ref(&connected), 9))
                .expect("test setup");
        assert!(
            client["events"][0].get("seq").is_none(),
            "client events have no seq"
        );
    }

    #[test]
    fn a_decision_has_one_id_per_scope_and_seq() {
        use crate::broker::transition::decision_id;
        let id = decision_id("redis/app", 42);
        assert_eq!(
            id,
            decision_id("redis/app", 42),
            "a replayed decision: same id"
        );
        assert_eq!(id.get_version_num(), 5);
        assert_ne!(id, decision_id("redis/app", 43));
        assert_ne!(id, decision_id("nats/app", 42));
        assert_ne!(
            id,
            decision_id("redis/app4", 2),
            "scope and seq never run together"
        );
    }

    /// RFC 4231, test case 2.
    #[test]
    fn the_signature_is_hmac_sha256_in_hex() {
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
