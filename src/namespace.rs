//! Channel names and the per-namespace options they inherit.
//!
//! A channel `ns:name` takes the options of namespace `ns`; a channel without `:` takes those of
//! the default namespace. Options come from `RUSTY_SOCKS_NAMESPACES` (a JSON object keyed by
//! namespace name, `""` for the default namespace). A channel in a namespace that is not
//! configured is refused with `unknown_namespace`, so a typo never silently creates state.

use std::collections::HashMap;
use std::time::Duration;

use serde::Deserialize;

/// Longest channel name accepted, in bytes.
pub const MAX_CHANNEL_LEN: usize = 255;

/// What happens to a subscriber whose outbox overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SlowPolicy {
    /// Close the connection with 4001.
    Disconnect,
    /// Drop this client's backlog for the channel and send one `gap` frame; the client catches
    /// up with `history`. Needs history; without it the namespace behaves as `disconnect`.
    Gap,
}

/// Who may do something in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Access {
    /// Every connection, anonymous ones included.
    Anyone,
    /// Connections with a valid token.
    Authenticated,
    /// Connections whose token's `channels` claim lists the channel.
    Listed,
    /// No client (the server API still may).
    Nobody,
}

impl Access {
    /// Whether a connection authenticated as `who` (`None`: anonymous) may act on `channel`.
    pub fn allows(self, who: Option<&crate::auth::Identity>, channel: &str) -> bool {
        match self {
            Self::Anyone => true,
            Self::Authenticated => who.is_some(),
            Self::Listed => who.is_some_and(|id| id.lists(channel)),
            Self::Nobody => false,
        }
    }
}

/// `publish` also accepts the booleans of earlier versions: `true` is `anyone`, `false` is
/// `nobody`.
fn access_or_bool<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Access, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Either {
        Bool(bool),
        Access(Access),
    }
    Ok(match Either::deserialize(d)? {
        Either::Bool(true) => Access::Anyone,
        Either::Bool(false) => Access::Nobody,
        Either::Access(access) => access,
    })
}

/// Options of one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NamespaceOptions {
    /// Publications kept per channel for history and recovery (0 = none).
    pub history_size: usize,
    /// Seconds a publication stays in history (0 = no age limit).
    pub history_ttl_s: u64,
    /// Whether `presence` is answered.
    pub presence: bool,
    /// Whether subscribers get `join`/`leave` pushes.
    pub join_leave: bool,
    /// Who may publish from a connection (the server API always may).
    #[serde(deserialize_with = "access_or_bool")]
    pub publish: Access,
    /// Who may subscribe.
    pub subscribe: Access,
    /// Who may read presence (when `presence` is on).
    pub read_presence: Access,
    /// Who may read history (and recover with `since`).
    pub read_history: Access,
    /// Slow-subscriber policy.
    pub slow_policy: SlowPolicy,
}

impl Default for NamespaceOptions {
    fn default() -> Self {
        Self {
            history_size: 100,
            history_ttl_s: 300,
            presence: true,
            join_leave: false,
            publish: Access::Anyone,
            subscribe: Access::Anyone,
            read_presence: Access::Anyone,
            read_history: Access::Anyone,
            slow_policy: SlowPolicy::Disconnect,
        }
    }
}

impl NamespaceOptions {
    /// History age limit, if any.
    pub fn history_ttl(&self) -> Option<Duration> {
        (self.history_ttl_s > 0).then(|| Duration::from_secs(self.history_ttl_s))
    }

    /// The policy actually applied: `gap` needs history to catch up from.
    pub fn effective_slow_policy(&self) -> SlowPolicy {
        if self.history_size == 0 {
            SlowPolicy::Disconnect
        } else {
            self.slow_policy
        }
    }
}

/// Every configured namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Namespaces {
    by_name: HashMap<String, NamespaceOptions>,
}

impl Default for Namespaces {
    fn default() -> Self {
        let mut by_name = HashMap::new();
        by_name.insert(String::new(), NamespaceOptions::default());
        Self { by_name }
    }
}

/// Why a channel name or namespace was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChannelError {
    /// Empty, too long, or with characters outside the allowed set.
    #[error(
        "channel names are 1-255 characters from A-Z a-z 0-9 and _ - . : @ / = +, with a non-empty namespace before ':'"
    )]
    InvalidName,
    /// The namespace is not configured.
    #[error("namespace {0:?} is not configured")]
    UnknownNamespace(String),
}

impl Namespaces {
    /// Parses `RUSTY_SOCKS_NAMESPACES`. The default namespace (`""`) keeps its built-in options
    /// unless the object configures it.
    pub fn from_json(json: &str) -> Result<Self, String> {
        let parsed: HashMap<String, NamespaceOptions> =
            serde_json::from_str(json).map_err(|e| e.to_string())?;
        let mut namespaces = Self::default();
        for (name, options) in parsed {
            if !name.is_empty() && !name.bytes().all(is_name_byte) || name.contains(':') {
                return Err(format!(
                    "namespace name {name:?} has characters that are not allowed"
                ));
            }
            namespaces.by_name.insert(name, options);
        }
        Ok(namespaces)
    }

    /// Adds or replaces a namespace (used by tests and embedders).
    pub fn insert(&mut self, name: &str, options: NamespaceOptions) {
        self.by_name.insert(name.to_owned(), options);
    }

    /// Names of every configured namespace (`""` is the default one).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// Validates a channel name and returns its namespace's options.
    pub fn resolve(&self, channel: &str) -> Result<&NamespaceOptions, ChannelError> {
        validate_name(channel)?;
        let namespace = namespace_of(channel);
        self.by_name
            .get(namespace)
            .ok_or_else(|| ChannelError::UnknownNamespace(namespace.to_owned()))
    }
}

/// The namespace a channel belongs to: the part before its first `:`, or `""`.
pub fn namespace_of(channel: &str) -> &str {
    channel.split_once(':').map_or("", |(ns, _)| ns)
}

fn is_name_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"_-.:@/=+".contains(&b)
}

/// Checks length, characters, and that a `:` has a namespace before it.
pub fn validate_name(channel: &str) -> Result<(), ChannelError> {
    let ok = !channel.is_empty()
        && channel.len() <= MAX_CHANNEL_LEN
        && channel.bytes().all(is_name_byte)
        && !channel.starts_with(':');
    if ok {
        Ok(())
    } else {
        Err(ChannelError::InvalidName)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channels_take_their_namespace_options() {
        let ns = Namespaces::from_json(
            r#"{"chat":{"history_size":5,"join_leave":true,"slow_policy":"gap"},"":{"presence":false}}"#,
        )
        .expect("valid");
        let chat = ns.resolve("chat:lobby").expect("configured");
        assert_eq!(chat.history_size, 5);
        assert!(chat.join_leave && chat.presence);
        assert_eq!(chat.effective_slow_policy(), SlowPolicy::Gap);
        assert!(!ns.resolve("lobby").expect("default ns").presence);
        assert_eq!(
            ns.resolve("news:today"),
            Err(ChannelError::UnknownNamespace("news".into()))
        );
    }

    #[test]
    fn names_are_validated() {
        let ns = Namespaces::default();
        for bad in ["", ":x", "a b", "ünï", "x\"y", &"a".repeat(256)] {
            assert_eq!(ns.resolve(bad), Err(ChannelError::InvalidName), "{bad:?}");
        }
        for good in ["a", "user/42", "a.b-c_d@e=f+g", &"a".repeat(255)] {
            assert!(ns.resolve(good).is_ok(), "{good}");
        }
    }

    #[test]
    fn bad_configuration_is_refused() {
        assert!(Namespaces::from_json("[]").is_err());
        assert!(Namespaces::from_json(r#"{"x":{"history":1}}"#).is_err());
        assert!(Namespaces::from_json(r#"{"x":{"slow_policy":"ignore"}}"#).is_err());
        assert!(Namespaces::from_json(r#"{"a b":{}}"#).is_err());
    }

    #[test]
    fn gap_without_history_means_disconnect() {
        let options = NamespaceOptions {
            history_size: 0,
            slow_policy: SlowPolicy::Gap,
            ..NamespaceOptions::default()
        };
        assert_eq!(options.effective_slow_policy(), SlowPolicy::Disconnect);
    }
}
