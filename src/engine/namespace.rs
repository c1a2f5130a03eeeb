//! Channel names and the per-namespace options they inherit.
//!
//! A channel `ns:name` takes the options of namespace `ns`; a channel without `:` takes those of
//! the default namespace. Options come from `RUSTY_SOCKS_NAMESPACES` (a JSON object keyed by
//! namespace name, `""` for the default namespace). A channel in a namespace that is not
//! configured is refused with `unknown_namespace`, so a typo never silently creates state.

use std::collections::HashMap;
use std::time::Duration;

use crate::types::ChannelError;
use crate::types::channel::{is_name_byte, namespace_of, validate_name};

/// What happens to a subscriber whose outbox overflows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlowPolicy {
    /// Close the connection with 4001.
    Disconnect,
    /// Drop this client's backlog for the channel and send one `gap` frame; the client catches
    /// up with `history`. Needs history; without it the namespace behaves as `disconnect`.
    Gap,
}

impl SlowPolicy {
    /// The words accepted in `RUSTY_SOCKS_NAMESPACES`.
    const NAMES: &'static str = "\"disconnect\" or \"gap\"";

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "disconnect" => Some(Self::Disconnect),
            "gap" => Some(Self::Gap),
            _ => None,
        }
    }
}

/// Who may do something in a namespace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
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
    /// The words accepted in `RUSTY_SOCKS_NAMESPACES`.
    const NAMES: &'static str = "\"anyone\", \"authenticated\", \"listed\" or \"nobody\"";

    fn from_name(name: &str) -> Option<Self> {
        match name {
            "anyone" => Some(Self::Anyone),
            "authenticated" => Some(Self::Authenticated),
            "listed" => Some(Self::Listed),
            "nobody" => Some(Self::Nobody),
            _ => None,
        }
    }

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

/// Options of one namespace.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    pub publish: Access,
    /// Who may subscribe.
    pub subscribe: Access,
    /// Who may read presence (when `presence` is on).
    pub read_presence: Access,
    /// Who may read history (and recover with `since`).
    pub read_history: Access,
    /// Slow-subscriber policy.
    pub slow_policy: SlowPolicy,
    /// Subscriptions are asked of the backend (`RUSTY_SOCKS_PROXY_SUBSCRIBE_URL`) first.
    pub proxy_subscribe: bool,
    /// Publications from connections are asked of the backend
    /// (`RUSTY_SOCKS_PROXY_PUBLISH_URL`) first.
    pub proxy_publish: bool,
}

/// Every option a namespace accepts, as listed in an error about an unknown one.
const OPTION_NAMES: &str = "history_size, history_ttl_s, presence, join_leave, publish, \
     subscribe, read_presence, read_history, slow_policy, proxy_subscribe, proxy_publish";

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
            proxy_subscribe: false,
            proxy_publish: false,
        }
    }
}

impl NamespaceOptions {
    /// One namespace's options: unset options keep their defaults.
    fn from_json_value(value: &serde_json::Value) -> Result<Self, String> {
        use serde_json::Value;
        let Value::Object(map) = value else {
            return Err("options must be a JSON object, like {\"history_size\":50}".into());
        };
        let mut options = Self::default();
        for (key, value) in map {
            let wrong = |expected: &str| format!("option {key:?} must be {expected}, not {value}");
            let count = || value.as_u64().ok_or_else(|| wrong("a whole number from 0"));
            let flag = || value.as_bool().ok_or_else(|| wrong("true or false"));
            let access = || {
                match value {
                    Value::String(name) => Access::from_name(name),
                    _ => None,
                }
                .ok_or_else(|| wrong(Access::NAMES))
            };
            match key.as_str() {
                "history_size" => {
                    options.history_size =
                        usize::try_from(count()?).map_err(|_| wrong("a smaller number"))?;
                }
                "history_ttl_s" => options.history_ttl_s = count()?,
                "presence" => options.presence = flag()?,
                "join_leave" => options.join_leave = flag()?,
                // Earlier versions took a boolean: `true` is `anyone`, `false` is `nobody`.
                "publish" => {
                    options.publish = match value {
                        Value::Bool(true) => Access::Anyone,
                        Value::Bool(false) => Access::Nobody,
                        _ => access()
                            .map_err(|_| wrong(&format!("{}, true or false", Access::NAMES)))?,
                    };
                }
                "subscribe" => options.subscribe = access()?,
                "proxy_subscribe" => options.proxy_subscribe = flag()?,
                "proxy_publish" => options.proxy_publish = flag()?,
                "read_presence" => options.read_presence = access()?,
                "read_history" => options.read_history = access()?,
                "slow_policy" => {
                    options.slow_policy = value
                        .as_str()
                        .and_then(SlowPolicy::from_name)
                        .ok_or_else(|| wrong(SlowPolicy::NAMES))?;
                }
                other => {
                    return Err(format!(
                        "unknown option {other:?}; the options are {OPTION_NAMES}"
                    ));
                }
            }
        }
        Ok(options)
    }

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

    /// The options of the legacy channel `default`. Who may chat there (`publish`), be on it
    /// (`subscribe`) and get its replay (`read_history`) is decided by the unnamed namespace
    /// `unnamed` (`""`), exactly as for v1 channels without `:`, so an operator who locks down
    /// `""` does not leave legacy chat open beside it. The rest is the legacy contract's:
    /// `history_size` messages (`RUSTY_SOCKS_HISTORY_SIZE`) with no age limit; no presence
    /// (every legacy connection is there: the list would be every connection, and cost each
    /// one an entry); leave notices on, because they are the legacy `Disconnect` frames; and
    /// `disconnect` for slow clients, since the legacy dialect has no `gap` frame.
    pub fn legacy_channel(unnamed: &Self, history_size: usize) -> Self {
        Self {
            history_size,
            history_ttl_s: 0,
            presence: false,
            join_leave: true,
            publish: unnamed.publish,
            subscribe: unnamed.subscribe,
            read_presence: unnamed.read_presence,
            read_history: unnamed.read_history,
            slow_policy: SlowPolicy::Disconnect,
            // Legacy chat is not proxied (docs/BACKEND.md).
            proxy_subscribe: false,
            proxy_publish: false,
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

impl Namespaces {
    /// Parses `RUSTY_SOCKS_NAMESPACES`. The default namespace (`""`) keeps its built-in options
    /// unless the object configures it. An error names the namespace, the option and the
    /// values it accepts, so an operator can fix the setting without reading the source.
    pub fn from_json(json: &str) -> Result<Self, String> {
        let parsed: serde_json::Map<String, serde_json::Value> = match serde_json::from_str(json) {
            Ok(serde_json::Value::Object(map)) => map,
            Ok(_) => return Err("the value must be a JSON object keyed by namespace name".into()),
            Err(err) => return Err(format!("not valid JSON: {err}")),
        };
        let mut namespaces = Self::default();
        for (name, options) in parsed {
            if !name.is_empty() && !name.bytes().all(is_name_byte) || name.contains(':') {
                return Err(format!(
                    "namespace name {name:?} has characters that are not allowed"
                ));
            }
            let options = NamespaceOptions::from_json_value(&options)
                .map_err(|why| format!("namespace {name:?}: {why}"))?;
            namespaces.by_name.insert(name, options);
        }
        Ok(namespaces)
    }

    /// Names of the namespaces with `proxy_subscribe` (first) and `proxy_publish` (second).
    pub fn proxied(&self) -> (Vec<&str>, Vec<&str>) {
        let mut names: Vec<&str> = self.names().collect();
        names.sort_unstable();
        let with = |f: fn(&NamespaceOptions) -> bool| {
            names
                .iter()
                .copied()
                .filter(|n| self.by_name.get(*n).is_some_and(f))
                .collect()
        };
        (with(|o| o.proxy_subscribe), with(|o| o.proxy_publish))
    }

    /// Adds or replaces a namespace (used by tests and embedders).
    pub fn insert(&mut self, name: &str, options: NamespaceOptions) {
        self.by_name.insert(name.to_owned(), options);
    }

    /// The options of the unnamed namespace `""` (it always exists: configured, or with its
    /// built-in options).
    pub fn unnamed(&self) -> NamespaceOptions {
        self.by_name.get("").cloned().unwrap_or_default()
    }

    /// Names of every configured namespace (`""` is the default one).
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.by_name.keys().map(String::as_str)
    }

    /// The options of namespace `name`, if it is configured.
    pub fn get(&self, name: &str) -> Option<&NamespaceOptions> {
        self.by_name.get(name)
    }

    /// What changed from `self` to `next`, one entry per namespace (`+name` added, `-name`
    /// removed, `~name` options changed; `""` is the unnamed one), sorted, for reload logs.
    pub fn changes(&self, next: &Self) -> Vec<String> {
        let mut changes: Vec<String> = Vec::new();
        for (name, options) in &self.by_name {
            match next.by_name.get(name) {
                None => changes.push(format!("-{name:?}")),
                Some(new) if new != options => changes.push(format!("~{name:?}")),
                Some(_) => {}
            }
        }
        for name in next.by_name.keys() {
            if !self.by_name.contains_key(name) {
                changes.push(format!("+{name:?}"));
            }
        }
        changes.sort_unstable_by(|a, b| a[1..].cmp(&b[1..]));
        changes
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
    fn bad_configuration_is_refused_naming_the_option_and_what_it_accepts() {
        let refused = |json: &str, words: &[&str]| {
            let why = Namespaces::from_json(json).expect_err(json);
            for word in words {
                assert!(why.contains(word), "{json}: {why:?} lacks {word:?}");
            }
        };
        refused("[]", &["JSON object"]);
        refused("{", &["not valid JSON"]);
        refused(r#"{"x":[]}"#, &["\"x\"", "JSON object"]);
        refused(
            r#"{"x":{"history":1}}"#,
            &["\"x\"", "\"history\"", "history_size"],
        );
        refused(
            r#"{"x":{"slow_policy":"ignore"}}"#,
            &["slow_policy", "\"disconnect\" or \"gap\"", "\"ignore\""],
        );
        refused(
            r#"{"x":{"publish":"everyone"}}"#,
            &["publish", "\"anyone\"", "\"nobody\"", "true or false"],
        );
        refused(r#"{"x":{"subscribe":true}}"#, &["subscribe", "\"listed\""]);
        refused(
            r#"{"x":{"history_size":-1}}"#,
            &["history_size", "whole number"],
        );
        refused(
            r#"{"x":{"presence":"yes"}}"#,
            &["presence", "true or false"],
        );
        refused(r#"{"a b":{}}"#, &["not allowed"]);
    }

    #[test]
    fn every_option_is_read() {
        let ns = Namespaces::from_json(
            r#"{"x":{"history_size":7,"history_ttl_s":9,"presence":false,"join_leave":true,
                "publish":false,"subscribe":"authenticated","read_presence":"listed",
                "read_history":"nobody","slow_policy":"gap","proxy_subscribe":true,
                "proxy_publish":true}}"#,
        )
        .expect("valid");
        let expected = NamespaceOptions {
            history_size: 7,
            history_ttl_s: 9,
            presence: false,
            join_leave: true,
            publish: Access::Nobody,
            subscribe: Access::Authenticated,
            read_presence: Access::Listed,
            read_history: Access::Nobody,
            slow_policy: SlowPolicy::Gap,
            proxy_subscribe: true,
            proxy_publish: true,
        };
        assert_eq!(ns.resolve("x:y"), Ok(&expected));
        assert_eq!(ns.proxied(), (vec!["x"], vec!["x"]));
        let wrong = Namespaces::from_json(r#"{"x":{"proxy_publish":"yes"}}"#).expect_err("bad");
        assert!(
            wrong.contains("proxy_publish") && wrong.contains("true or false"),
            "{wrong}"
        );
        let ns = Namespaces::from_json(r#"{"x":{"publish":true}}"#).expect("valid");
        assert_eq!(ns.resolve("x:y").map(|o| o.publish), Ok(Access::Anyone));
    }

    #[test]
    fn an_unknown_namespace_says_how_to_configure_it() {
        let why = Namespaces::default()
            .resolve("chat:lobby")
            .expect_err("unknown");
        let text = why.to_string();
        assert!(text.contains("RUSTY_SOCKS_NAMESPACES"), "{text}");
        assert!(text.contains(r#"'{"chat":{}}'"#), "{text}");
    }

    #[test]
    fn the_legacy_channel_takes_the_unnamed_namespace_permissions_only() {
        let ns = Namespaces::from_json(
            r#"{"":{"publish":"authenticated","subscribe":"listed","read_history":"nobody",
                "read_presence":"authenticated","history_size":7,"history_ttl_s":9,
                "join_leave":false,"slow_policy":"gap"}}"#,
        )
        .expect("valid");
        let legacy = NamespaceOptions::legacy_channel(&ns.unnamed(), 42);
        let expected = NamespaceOptions {
            history_size: 42,
            history_ttl_s: 0,
            presence: false,
            join_leave: true,
            publish: Access::Authenticated,
            subscribe: Access::Listed,
            read_presence: Access::Authenticated,
            read_history: Access::Nobody,
            slow_policy: SlowPolicy::Disconnect,
            proxy_subscribe: false,
            proxy_publish: false,
        };
        assert_eq!(legacy, expected);
        // Unconfigured, `""` lets anyone chat: the original server's behaviour.
        let legacy = NamespaceOptions::legacy_channel(&Namespaces::default().unnamed(), 100);
        assert_eq!(
            (legacy.publish, legacy.subscribe, legacy.read_history),
            (Access::Anyone, Access::Anyone, Access::Anyone)
        );
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
