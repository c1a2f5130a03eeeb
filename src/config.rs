//! Server settings: embedded defaults overridden by `RUSTY_SOCKS_*` environment variables.
//!
//! Every setting is validated at startup. A value that does not parse or is out of range is a
//! [`ConfigError`] naming the variable, the value and what is accepted; `main` turns it into
//! exit code 2. Silently falling back to a default (as the original server did) would leave an
//! operator believing a limit is in force when it is not.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use crate::namespace::Namespaces;

/// A setting that could not be honoured.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {var}={value:?}: expected {expected}")]
pub struct ConfigError {
    /// The environment variable at fault.
    pub var: &'static str,
    /// The value it held.
    pub value: String,
    /// What would have been accepted.
    pub expected: String,
}

/// A secret setting: compared and used like a string, never printed.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

impl Secret {
    /// The secret's text.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

/// An address range: `10.0.0.0/8`, `::1/128`, or one address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpRange {
    /// First address of the range.
    pub network: IpAddr,
    /// Prefix length in bits.
    pub prefix: u8,
}

impl IpRange {
    /// Parses `addr` or `addr/prefix`.
    pub fn parse(text: &str) -> Option<Self> {
        let (addr, prefix) = match text.split_once('/') {
            Some((addr, prefix)) => (addr, Some(prefix.parse::<u8>().ok()?)),
            None => (text, None),
        };
        let network: IpAddr = addr.trim().parse().ok()?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix = prefix.unwrap_or(max);
        (prefix <= max).then_some(Self { network, prefix })
    }

    /// Whether `ip` is in the range (IPv4-mapped IPv6 addresses count as IPv4).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            v4 => v4,
        };
        match (self.network, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

/// Which broker distributes messages (`RUSTY_SOCKS_BROKER`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum BrokerUrl {
    /// One node, everything in this process.
    #[default]
    Memory,
    /// Redis at this URL (`redis://host:port[/db]`).
    Redis(String),
    /// NATS with JetStream at this URL (`nats://host:port`).
    Nats(String),
}

impl BrokerUrl {
    fn parse(var: &'static str, value: &str) -> Result<Self, ConfigError> {
        let value = value.trim();
        let err = |expected: &str| ConfigError {
            var,
            value: value.to_owned(),
            expected: expected.to_owned(),
        };
        let host_part = |url: &str| -> bool {
            url.split_once("://")
                .map(|(_, rest)| rest.rsplit('@').next().unwrap_or(rest))
                .is_some_and(|rest| !rest.is_empty() && !rest.starts_with('/'))
        };
        if value == "memory" {
            Ok(Self::Memory)
        } else if value.starts_with("redis://") || value.starts_with("rediss://") {
            if !cfg!(feature = "redis") {
                return Err(err(
                    "memory or nats://... (this build has no `redis` feature)",
                ));
            }
            if !host_part(value) {
                return Err(err("redis://host:port[/db]"));
            }
            Ok(Self::Redis(value.to_owned()))
        } else if value.starts_with("nats://") {
            if !cfg!(feature = "nats") {
                return Err(err(
                    "memory or redis://... (this build has no `nats` feature)",
                ));
            }
            if !host_part(value) {
                return Err(err("nats://host:port"));
            }
            Ok(Self::Nats(value.to_owned()))
        } else {
            Err(err("memory, redis://host:port[/db] or nats://host:port"))
        }
    }
}

/// Everything the server needs to know to run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// `RUSTY_SOCKS_HOST`: address to listen on.
    pub host: IpAddr,
    /// `RUSTY_SOCKS_PORT`: port to listen on (0 asks the OS for a free one).
    pub port: u16,
    /// `RUSTY_SOCKS_MAX_CONN`: concurrent WebSocket connections; one more is refused with 503.
    pub max_connections: usize,
    /// `RUSTY_SOCKS_BUFFER`: per-connection outbound queue, in messages.
    pub buffer: usize,
    /// `RUSTY_SOCKS_TIMEOUT`: silence (no frame at all, pongs included) before a close.
    pub timeout: Duration,
    /// `RUSTY_SOCKS_PING`: interval between server pings.
    pub ping_interval: Duration,
    /// `RUSTY_SOCKS_THREAD_POOL_SIZE`: worker threads of the tokio runtime.
    pub worker_threads: usize,
    /// `RUSTY_SOCKS_MAX_QUEUED_TASKS`: accepted sockets allowed to be mid-handshake at once.
    pub max_queued_tasks: usize,
    /// `RUSTY_SOCKS_MAX_MESSAGE_SIZE`: largest message accepted on `/ws`, in bytes.
    pub max_message_size: usize,
    /// `RUSTY_SOCKS_HISTORY_SIZE`: stored chat messages kept per channel.
    pub history_size: usize,
    /// `RUSTY_SOCKS_HISTORY_BYTES`: bytes of history kept per channel.
    pub history_bytes: usize,
    /// `RUSTY_SOCKS_HISTORY_TOTAL_BYTES`: bytes of history kept across all channels.
    pub history_total_bytes: usize,
    /// `RUSTY_SOCKS_REPLAY`: stored messages sent to a newcomer after the welcome.
    pub replay_count: usize,
    /// `RUSTY_SOCKS_ECHO_TO_SENDER`: whether a chat message is also sent back to its sender.
    pub echo_to_sender: bool,
    /// `RUSTY_SOCKS_ECHO_ENDPOINT`: whether `/echo` (for conformance testing) is served.
    pub echo_endpoint: bool,
    /// `RUSTY_SOCKS_ECHO_MAX_MESSAGE_SIZE`: largest message accepted on `/echo`, in bytes.
    pub echo_max_message_size: usize,
    /// `RUSTY_SOCKS_HANDSHAKE_TIMEOUT`: time a new socket has to send its HTTP request headers.
    pub handshake_timeout: Duration,
    /// `RUSTY_SOCKS_SHUTDOWN_GRACE`: time given to clients to drain on shutdown.
    pub shutdown_grace: Duration,
    /// `RUSTY_SOCKS_NAMESPACES`: per-namespace channel options (JSON).
    pub namespaces: Namespaces,
    /// `RUSTY_SOCKS_MAX_CHANNELS`: channels one connection may be subscribed to.
    pub max_channels: usize,
    /// `RUSTY_SOCKS_MAX_DATA_SIZE`: largest `data` of a v1 publish, in bytes.
    pub max_data_size: usize,
    /// `RUSTY_SOCKS_BROKER`: how nodes share messages.
    pub broker: BrokerUrl,
    /// `RUSTY_SOCKS_BROKER_PREFIX`: prefix of every Redis key and NATS subject the server uses.
    pub broker_prefix: String,
    /// `RUSTY_SOCKS_PRESENCE_TTL`: how long a node's presence entries outlive its last refresh
    /// (with a networked broker), which bounds how long a dead node's clients stay listed.
    pub presence_ttl: Duration,
    /// `RUSTY_SOCKS_JWT_SECRET`: HS256 secret for connection tokens.
    pub jwt_secret: Option<Secret>,
    /// `RUSTY_SOCKS_JWT_PUBLIC_KEY`: PEM file with an RSA (RS256) or P-256 (ES256) public key.
    pub jwt_public_key: Option<PathBuf>,
    /// `RUSTY_SOCKS_ALLOW_ANONYMOUS`: let connections without a token in when a key is set.
    pub allow_anonymous: bool,
    /// `RUSTY_SOCKS_REFRESH_WINDOW`: how long before a token expires the client is asked for
    /// a new one.
    pub refresh_window: Duration,
    /// `RUSTY_SOCKS_API_KEY`: key of the server HTTP API under `/api` (unset: API off).
    pub api_key: Option<Secret>,
    /// `RUSTY_SOCKS_ALLOWED_ORIGINS`: origins browsers may connect from (empty: any).
    pub allowed_origins: Vec<String>,
    /// `RUSTY_SOCKS_TLS_CERT`: PEM certificate chain; with `TLS_KEY`, serve wss:// and https://.
    pub tls_cert: Option<PathBuf>,
    /// `RUSTY_SOCKS_TLS_KEY`: PEM private key for `TLS_CERT`.
    pub tls_key: Option<PathBuf>,
    /// `RUSTY_SOCKS_METRICS_ADDR`: serve `/metrics` on this address instead of the main port.
    pub metrics_addr: Option<SocketAddr>,
    /// `RUSTY_SOCKS_CLIENT_RATE`: messages per second one connection may send (0: no limit).
    pub client_rate: u32,
    /// `RUSTY_SOCKS_CLIENT_BURST`: messages a connection may send at once above the rate.
    pub client_burst: u32,
    /// `RUSTY_SOCKS_CONNECT_RATE`: connections per second one IP may open (0: no limit).
    pub connect_rate: u32,
    /// `RUSTY_SOCKS_CONNECT_BURST`: connections an IP may open at once above the rate.
    pub connect_burst: u32,
    /// `RUSTY_SOCKS_TRUSTED_PROXIES`: peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpRange>,
    /// `RUSTY_SOCKS_DEMO`: serve the demo page at `/` and the client at `/rusty-socks.js`.
    pub demo: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            host: IpAddr::from([0, 0, 0, 0]),
            port: 3030,
            max_connections: 100,
            buffer: 1024,
            timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(30),
            worker_threads: 4,
            max_queued_tasks: 1000,
            max_message_size: 64 * 1024,
            history_size: 100,
            history_bytes: 1024 * 1024,
            history_total_bytes: 256 * 1024 * 1024,
            replay_count: 10,
            echo_to_sender: false,
            echo_endpoint: false,
            echo_max_message_size: 16 * 1024 * 1024,
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(3),
            namespaces: Namespaces::default(),
            max_channels: 128,
            max_data_size: 32 * 1024,
            broker: BrokerUrl::Memory,
            broker_prefix: "rusty_socks".to_owned(),
            presence_ttl: Duration::from_secs(30),
            jwt_secret: None,
            jwt_public_key: None,
            allow_anonymous: false,
            refresh_window: Duration::from_secs(30),
            api_key: None,
            allowed_origins: Vec::new(),
            tls_cert: None,
            tls_key: None,
            metrics_addr: None,
            client_rate: 0,
            client_burst: 50,
            connect_rate: 0,
            connect_burst: 20,
            trusted_proxies: Vec::new(),
            demo: true,
        }
    }
}

/// One row of the settings table: the variable, its default as text, and its meaning.
pub struct Setting {
    /// The environment variable.
    pub var: &'static str,
    /// Default, as written in the docs.
    pub default: &'static str,
    /// One-line meaning.
    pub meaning: &'static str,
}

/// The settings table, printed by `rusty_socks --help` and mirrored in README.md.
pub const SETTINGS: &[Setting] = &[
    Setting {
        var: "RUSTY_SOCKS_HOST",
        default: "0.0.0.0",
        meaning: "listen address (an IPv4 or IPv6 literal)",
    },
    Setting {
        var: "RUSTY_SOCKS_PORT",
        default: "3030",
        meaning: "listen port, 0-65535 (0 = any free port)",
    },
    Setting {
        var: "RUSTY_SOCKS_MAX_CONN",
        default: "100",
        meaning: "concurrent WebSocket connections; more get HTTP 503",
    },
    Setting {
        var: "RUSTY_SOCKS_BUFFER",
        default: "1024",
        meaning: "per-connection outbound queue (messages); overflow closes with 4001",
    },
    Setting {
        var: "RUSTY_SOCKS_TIMEOUT",
        default: "60",
        meaning: "seconds without any frame from a client before close 4000",
    },
    Setting {
        var: "RUSTY_SOCKS_PING",
        default: "30",
        meaning: "seconds between server pings (must be below TIMEOUT)",
    },
    Setting {
        var: "RUSTY_SOCKS_THREAD_POOL_SIZE",
        default: "4",
        meaning: "worker threads of the runtime, 1-1024",
    },
    Setting {
        var: "RUSTY_SOCKS_MAX_QUEUED_TASKS",
        default: "1000",
        meaning: "connection attempts mid-handshake at once; more get HTTP 503",
    },
    Setting {
        var: "RUSTY_SOCKS_MAX_MESSAGE_SIZE",
        default: "65536",
        meaning: "largest message on /ws in bytes; larger closes with 1009",
    },
    Setting {
        var: "RUSTY_SOCKS_HISTORY_SIZE",
        default: "100",
        meaning: "chat messages kept for the legacy default channel (0 disables storage)",
    },
    Setting {
        var: "RUSTY_SOCKS_HISTORY_BYTES",
        default: "1048576",
        meaning: "bytes of history kept per channel",
    },
    Setting {
        var: "RUSTY_SOCKS_HISTORY_TOTAL_BYTES",
        default: "268435456",
        meaning: "bytes of history kept across all channels; past it publications are not stored",
    },
    Setting {
        var: "RUSTY_SOCKS_REPLAY",
        default: "10",
        meaning: "stored messages replayed to a newcomer after the welcome",
    },
    Setting {
        var: "RUSTY_SOCKS_ECHO_TO_SENDER",
        default: "false",
        meaning: "also send a chat message back to its sender",
    },
    Setting {
        var: "RUSTY_SOCKS_ECHO_ENDPOINT",
        default: "false",
        meaning: "serve the /echo conformance endpoint",
    },
    Setting {
        var: "RUSTY_SOCKS_ECHO_MAX_MESSAGE_SIZE",
        default: "16777216",
        meaning: "largest message on /echo in bytes",
    },
    Setting {
        var: "RUSTY_SOCKS_HANDSHAKE_TIMEOUT",
        default: "10",
        meaning: "seconds a new socket has to send its request headers",
    },
    Setting {
        var: "RUSTY_SOCKS_SHUTDOWN_GRACE",
        default: "3",
        meaning: "seconds clients get to drain on SIGINT/SIGTERM, 1-4",
    },
    Setting {
        var: "RUSTY_SOCKS_NAMESPACES",
        default: "{\"\":{}}",
        meaning: "JSON object of per-namespace channel options (see docs/protocol.md)",
    },
    Setting {
        var: "RUSTY_SOCKS_MAX_CHANNELS",
        default: "128",
        meaning: "channels one connection may be subscribed to",
    },
    Setting {
        var: "RUSTY_SOCKS_MAX_DATA_SIZE",
        default: "32768",
        meaning: "largest data of a v1 publish or /api publish, in bytes",
    },
    Setting {
        var: "RUSTY_SOCKS_BROKER",
        default: "memory",
        meaning: "memory (one node), redis://host:port[/db] or nats://host:port",
    },
    Setting {
        var: "RUSTY_SOCKS_BROKER_PREFIX",
        default: "rusty_socks",
        meaning: "prefix of Redis keys and NATS subjects (letters, digits, _ and -)",
    },
    Setting {
        var: "RUSTY_SOCKS_PRESENCE_TTL",
        default: "30",
        meaning: "seconds a dead node's presence entries remain (networked brokers), 3-3600",
    },
    Setting {
        var: "RUSTY_SOCKS_JWT_SECRET",
        default: "(unset)",
        meaning: "HS256 secret for connection tokens (set a key to require tokens)",
    },
    Setting {
        var: "RUSTY_SOCKS_JWT_PUBLIC_KEY",
        default: "(unset)",
        meaning: "PEM file: RSA public key (RS256) or P-256 public key (ES256)",
    },
    Setting {
        var: "RUSTY_SOCKS_ALLOW_ANONYMOUS",
        default: "false",
        meaning: "with a key set, still let connections without a token in",
    },
    Setting {
        var: "RUSTY_SOCKS_REFRESH_WINDOW",
        default: "30",
        meaning: "seconds before a token expires that the client is asked to refresh it",
    },
    Setting {
        var: "RUSTY_SOCKS_API_KEY",
        default: "(unset)",
        meaning: "key of the /api server API (Authorization: apikey <key>); unset: API off",
    },
    Setting {
        var: "RUSTY_SOCKS_ALLOWED_ORIGINS",
        default: "(any)",
        meaning: "comma-separated origins browsers may connect from; others get 403",
    },
    Setting {
        var: "RUSTY_SOCKS_TLS_CERT",
        default: "(unset)",
        meaning: "PEM certificate chain; with TLS_KEY, serve wss:// and https://",
    },
    Setting {
        var: "RUSTY_SOCKS_TLS_KEY",
        default: "(unset)",
        meaning: "PEM private key of TLS_CERT",
    },
    Setting {
        var: "RUSTY_SOCKS_METRICS_ADDR",
        default: "(main port)",
        meaning: "serve /metrics on this host:port instead of the main port",
    },
    Setting {
        var: "RUSTY_SOCKS_CLIENT_RATE",
        default: "0",
        meaning: "messages per second per connection (0 = no limit)",
    },
    Setting {
        var: "RUSTY_SOCKS_CLIENT_BURST",
        default: "50",
        meaning: "messages a connection may send at once above CLIENT_RATE",
    },
    Setting {
        var: "RUSTY_SOCKS_CONNECT_RATE",
        default: "0",
        meaning: "new connections per second per client IP (0 = no limit)",
    },
    Setting {
        var: "RUSTY_SOCKS_CONNECT_BURST",
        default: "20",
        meaning: "connections an IP may open at once above CONNECT_RATE",
    },
    Setting {
        var: "RUSTY_SOCKS_TRUSTED_PROXIES",
        default: "(none)",
        meaning: "comma-separated proxy IPs/CIDRs whose X-Forwarded-For is believed",
    },
    Setting {
        var: "RUSTY_SOCKS_DEMO",
        default: "true",
        meaning: "serve the demo page at / and the browser client at /rusty-socks.js",
    },
];

/// Prefix of the variables the test suite reads; they are not server settings.
const TEST_PREFIX: &str = "RUSTY_SOCKS_TEST_";

/// The `RUSTY_SOCKS_*` names among `names` that are not settings, each with the setting it was
/// probably meant to be. A misspelt variable is otherwise silently ignored, leaving a default in
/// force that the operator believes they changed.
pub fn unknown_variables(
    names: impl IntoIterator<Item = String>,
) -> Vec<(String, Option<&'static str>)> {
    let mut unknown: Vec<_> = names
        .into_iter()
        .filter(|name| name.starts_with("RUSTY_SOCKS_") && !name.starts_with(TEST_PREFIX))
        .filter(|name| !SETTINGS.iter().any(|s| s.var == name))
        .map(|name| {
            let closest = SETTINGS
                .iter()
                .map(|s| (edit_distance(&name, s.var), s.var))
                .min()
                .filter(|(distance, _)| *distance <= 3)
                .map(|(_, var)| var);
            (name, closest)
        })
        .collect();
    unknown.sort();
    unknown
}

/// Levenshtein distance over bytes (names are ASCII).
fn edit_distance(a: &str, b: &str) -> usize {
    let b = b.as_bytes();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.bytes().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

impl Config {
    /// Reads the process environment over the defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// Reads settings through `lookup` (the environment in production, a map in tests).
    pub fn from_lookup(lookup: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let d = Self::default();
        let get = |var: &'static str| lookup(var).map(|value| (var, value));
        let secs = |var, default: Duration, max| -> Result<Duration, ConfigError> {
            match get(var) {
                None => Ok(default),
                Some((var, v)) => parse_int(var, &v, 1, max).map(Duration::from_secs),
            }
        };
        let int = |var, default: usize, min, max| -> Result<usize, ConfigError> {
            match get(var) {
                None => Ok(default),
                Some((var, v)) => parse_int(var, &v, min, max).map(|n| n as usize),
            }
        };
        let flag = |var, default: bool| match get(var) {
            None => Ok(default),
            Some((var, v)) => parse_bool(var, &v),
        };
        let config = Self {
            host: match get("RUSTY_SOCKS_HOST") {
                None => d.host,
                Some((var, v)) => v.trim().parse().map_err(|_| ConfigError {
                    var,
                    value: v.clone(),
                    expected: "an IP address such as 0.0.0.0, 127.0.0.1 or ::".into(),
                })?,
            },
            port: int("RUSTY_SOCKS_PORT", usize::from(d.port), 0, 65_535)? as u16,
            max_connections: int("RUSTY_SOCKS_MAX_CONN", d.max_connections, 1, 10_000_000)?,
            buffer: int("RUSTY_SOCKS_BUFFER", d.buffer, 1, 1_000_000)?,
            timeout: secs("RUSTY_SOCKS_TIMEOUT", d.timeout, 86_400)?,
            ping_interval: secs("RUSTY_SOCKS_PING", d.ping_interval, 86_400)?,
            worker_threads: int("RUSTY_SOCKS_THREAD_POOL_SIZE", d.worker_threads, 1, 1024)?,
            max_queued_tasks: int(
                "RUSTY_SOCKS_MAX_QUEUED_TASKS",
                d.max_queued_tasks,
                1,
                10_000_000,
            )?,
            max_message_size: int(
                "RUSTY_SOCKS_MAX_MESSAGE_SIZE",
                d.max_message_size,
                128,
                64 << 20,
            )?,
            history_size: int("RUSTY_SOCKS_HISTORY_SIZE", d.history_size, 0, 1_000_000)?,
            history_bytes: int("RUSTY_SOCKS_HISTORY_BYTES", d.history_bytes, 0, 1 << 32)?,
            history_total_bytes: int(
                "RUSTY_SOCKS_HISTORY_TOTAL_BYTES",
                d.history_total_bytes,
                0,
                1 << 40,
            )?,
            replay_count: int("RUSTY_SOCKS_REPLAY", d.replay_count, 0, 1000)?,
            echo_to_sender: flag("RUSTY_SOCKS_ECHO_TO_SENDER", d.echo_to_sender)?,
            echo_endpoint: flag("RUSTY_SOCKS_ECHO_ENDPOINT", d.echo_endpoint)?,
            echo_max_message_size: int(
                "RUSTY_SOCKS_ECHO_MAX_MESSAGE_SIZE",
                d.echo_max_message_size,
                128,
                64 << 20,
            )?,
            handshake_timeout: secs("RUSTY_SOCKS_HANDSHAKE_TIMEOUT", d.handshake_timeout, 3600)?,
            shutdown_grace: secs("RUSTY_SOCKS_SHUTDOWN_GRACE", d.shutdown_grace, 4)?,
            namespaces: match get("RUSTY_SOCKS_NAMESPACES") {
                None => d.namespaces,
                Some((var, v)) => Namespaces::from_json(&v).map_err(|why| ConfigError {
                    var,
                    value: v.clone(),
                    expected: format!(
                        "a JSON object of namespace options, like {{\"chat\":{{\"history_size\":50}}}} ({why})"
                    ),
                })?,
            },
            max_channels: int("RUSTY_SOCKS_MAX_CHANNELS", d.max_channels, 1, 100_000)?,
            max_data_size: int("RUSTY_SOCKS_MAX_DATA_SIZE", d.max_data_size, 1, 64 << 20)?,
            broker: match get("RUSTY_SOCKS_BROKER") {
                None => d.broker,
                Some((var, v)) => BrokerUrl::parse(var, &v)?,
            },
            broker_prefix: match get("RUSTY_SOCKS_BROKER_PREFIX") {
                None => d.broker_prefix,
                Some((var, v)) => {
                    let ok = !v.is_empty()
                        && v.len() <= 64
                        && v
                            .bytes()
                            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
                    if !ok {
                        return Err(ConfigError {
                            var,
                            value: v,
                            expected: "1-64 letters, digits, _ or -".into(),
                        });
                    }
                    v
                }
            },
            presence_ttl: match get("RUSTY_SOCKS_PRESENCE_TTL") {
                None => d.presence_ttl,
                Some((var, v)) => parse_int(var, &v, 3, 3600).map(Duration::from_secs)?,
            },
            jwt_secret: secret(get("RUSTY_SOCKS_JWT_SECRET"), 16)?,
            jwt_public_key: path(get("RUSTY_SOCKS_JWT_PUBLIC_KEY")),
            allow_anonymous: flag("RUSTY_SOCKS_ALLOW_ANONYMOUS", d.allow_anonymous)?,
            refresh_window: secs("RUSTY_SOCKS_REFRESH_WINDOW", d.refresh_window, 3600)?,
            api_key: secret(get("RUSTY_SOCKS_API_KEY"), 16)?,
            allowed_origins: match get("RUSTY_SOCKS_ALLOWED_ORIGINS") {
                None => d.allowed_origins,
                Some((var, v)) => parse_origins(var, &v)?,
            },
            tls_cert: path(get("RUSTY_SOCKS_TLS_CERT")),
            tls_key: path(get("RUSTY_SOCKS_TLS_KEY")),
            metrics_addr: match get("RUSTY_SOCKS_METRICS_ADDR") {
                None => None,
                Some((_, v)) if v.trim().is_empty() => None,
                Some((var, v)) => Some(v.trim().parse().map_err(|_| ConfigError {
                    var,
                    value: v.clone(),
                    expected: "host:port, like 127.0.0.1:9090 or [::1]:9090".into(),
                })?),
            },
            client_rate: int("RUSTY_SOCKS_CLIENT_RATE", 0, 0, 1_000_000)? as u32,
            client_burst: int("RUSTY_SOCKS_CLIENT_BURST", d.client_burst as usize, 1, 1_000_000)?
                as u32,
            connect_rate: int("RUSTY_SOCKS_CONNECT_RATE", 0, 0, 1_000_000)? as u32,
            connect_burst: int(
                "RUSTY_SOCKS_CONNECT_BURST",
                d.connect_burst as usize,
                1,
                1_000_000,
            )? as u32,
            trusted_proxies: match get("RUSTY_SOCKS_TRUSTED_PROXIES") {
                None => d.trusted_proxies,
                Some((var, v)) => v
                    .split(',')
                    .map(str::trim)
                    .filter(|t| !t.is_empty())
                    .map(|t| {
                        IpRange::parse(t).ok_or_else(|| ConfigError {
                            var,
                            value: v.clone(),
                            expected: "comma-separated IP addresses or CIDR ranges".into(),
                        })
                    })
                    .collect::<Result<_, _>>()?,
            },
            demo: flag("RUSTY_SOCKS_DEMO", d.demo)?,
        };
        if config.tls_cert.is_some() != config.tls_key.is_some() {
            let (var, value) = match &config.tls_cert {
                Some(cert) => ("RUSTY_SOCKS_TLS_CERT", cert.display().to_string()),
                None => ("RUSTY_SOCKS_TLS_KEY", String::new()),
            };
            return Err(ConfigError {
                var,
                value,
                expected: "both RUSTY_SOCKS_TLS_CERT and RUSTY_SOCKS_TLS_KEY, or neither".into(),
            });
        }
        if config.ping_interval >= config.timeout {
            return Err(ConfigError {
                var: "RUSTY_SOCKS_PING",
                value: config.ping_interval.as_secs().to_string(),
                expected: format!(
                    "fewer seconds than RUSTY_SOCKS_TIMEOUT ({}), or live clients would time out",
                    config.timeout.as_secs()
                ),
            });
        }
        Ok(config)
    }
}

/// An optional secret: unset or empty means none; set, it must be at least `min` bytes.
fn secret(
    found: Option<(&'static str, String)>,
    min: usize,
) -> Result<Option<Secret>, ConfigError> {
    match found {
        None => Ok(None),
        Some((_, v)) if v.is_empty() => Ok(None),
        Some((var, v)) if v.len() < min => Err(ConfigError {
            var,
            value: "***".into(),
            expected: format!("at least {min} bytes (a short secret can be guessed)"),
        }),
        Some((_, v)) => Ok(Some(Secret(v))),
    }
}

fn path(found: Option<(&'static str, String)>) -> Option<PathBuf> {
    found
        .map(|(_, v)| v.trim().to_owned())
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Origins as browsers send them: `scheme://host[:port]`, no path.
fn parse_origins(var: &'static str, value: &str) -> Result<Vec<String>, ConfigError> {
    value
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(|origin| {
            let origin = origin.trim_end_matches('/');
            let host = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            if host.is_some_and(|h| !h.is_empty() && !h.contains('/')) {
                Ok(origin.to_ascii_lowercase())
            } else {
                Err(ConfigError {
                    var,
                    value: value.to_owned(),
                    expected: "comma-separated origins like https://app.example.com".into(),
                })
            }
        })
        .collect()
}

fn parse_int(var: &'static str, value: &str, min: u64, max: u64) -> Result<u64, ConfigError> {
    match value.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError {
            var,
            value: value.to_owned(),
            expected: format!("a whole number from {min} to {max}"),
        }),
    }
}

fn parse_bool(var: &'static str, value: &str) -> Result<bool, ConfigError> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Ok(true),
        "false" | "0" | "no" | "off" => Ok(false),
        _ => Err(ConfigError {
            var,
            value: value.to_owned(),
            expected: "true or false".into(),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(pairs: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|k| map.get(k).cloned())
    }

    #[test]
    fn defaults_match_the_original_readme() {
        let c = with(&[]).expect("defaults are valid");
        assert_eq!(c, Config::default());
        assert_eq!(c.host.to_string(), "0.0.0.0");
        assert_eq!(c.port, 3030);
        assert_eq!(c.max_connections, 100);
        assert_eq!(c.buffer, 1024);
        assert_eq!(c.timeout, Duration::from_secs(60));
        assert_eq!(c.ping_interval, Duration::from_secs(30));
        assert_eq!(c.worker_threads, 4);
        assert_eq!(c.max_queued_tasks, 1000);
        assert_eq!(c.max_message_size, 65536);
    }

    #[test]
    fn every_variable_is_read() {
        let c = with(&[
            ("RUSTY_SOCKS_HOST", "::1"),
            ("RUSTY_SOCKS_PORT", "8080"),
            ("RUSTY_SOCKS_MAX_CONN", "7"),
            ("RUSTY_SOCKS_BUFFER", "8"),
            ("RUSTY_SOCKS_TIMEOUT", "9"),
            ("RUSTY_SOCKS_PING", "2"),
            ("RUSTY_SOCKS_THREAD_POOL_SIZE", "3"),
            ("RUSTY_SOCKS_MAX_QUEUED_TASKS", "11"),
            ("RUSTY_SOCKS_MAX_MESSAGE_SIZE", "4096"),
            ("RUSTY_SOCKS_ECHO_ENDPOINT", "true"),
            ("RUSTY_SOCKS_ECHO_TO_SENDER", "yes"),
            ("RUSTY_SOCKS_NAMESPACES", r#"{"chat":{"history_size":5}}"#),
            ("RUSTY_SOCKS_MAX_CHANNELS", "3"),
            ("RUSTY_SOCKS_MAX_DATA_SIZE", "100"),
            ("RUSTY_SOCKS_BROKER", "redis://127.0.0.1:6379/2"),
            ("RUSTY_SOCKS_BROKER_PREFIX", "app-1"),
            ("RUSTY_SOCKS_PRESENCE_TTL", "5"),
        ])
        .expect("valid");
        assert_eq!(c.host.to_string(), "::1");
        assert_eq!(
            (
                c.port,
                c.max_connections,
                c.buffer,
                c.worker_threads,
                c.max_queued_tasks
            ),
            (8080, 7, 8, 3, 11)
        );
        assert_eq!(c.timeout, Duration::from_secs(9));
        assert_eq!(c.ping_interval, Duration::from_secs(2));
        assert_eq!(c.max_message_size, 4096);
        assert!(c.echo_endpoint && c.echo_to_sender);
        assert_eq!(
            c.namespaces.resolve("chat:x").map(|o| o.history_size),
            Ok(5)
        );
        assert_eq!((c.max_channels, c.max_data_size), (3, 100));
        assert_eq!(
            c.broker,
            BrokerUrl::Redis("redis://127.0.0.1:6379/2".into())
        );
        assert_eq!(c.broker_prefix, "app-1");
        assert_eq!(c.presence_ttl, Duration::from_secs(5));
        if cfg!(feature = "nats") {
            let nats = with(&[("RUSTY_SOCKS_BROKER", "nats://127.0.0.1:4222")]).expect("valid");
            assert_eq!(nats.broker, BrokerUrl::Nats("nats://127.0.0.1:4222".into()));
        }
    }

    #[test]
    fn bad_values_name_the_variable_and_the_value() {
        let cases = [
            ("RUSTY_SOCKS_THREAD_POOL_SIZE", "0"),
            ("RUSTY_SOCKS_PORT", "70000"),
            ("RUSTY_SOCKS_MAX_CONN", "-5"),
            ("RUSTY_SOCKS_BUFFER", "lots"),
            ("RUSTY_SOCKS_TIMEOUT", ""),
            ("RUSTY_SOCKS_HOST", "not-an-ip"),
            ("RUSTY_SOCKS_ECHO_ENDPOINT", "maybe"),
            ("RUSTY_SOCKS_MAX_QUEUED_TASKS", "1.5"),
            ("RUSTY_SOCKS_NAMESPACES", r#"{"chat":{"histroy_size":5}}"#),
            ("RUSTY_SOCKS_BROKER", "kafka://x"),
            ("RUSTY_SOCKS_BROKER", "redis://"),
            ("RUSTY_SOCKS_BROKER", "nats:///x"),
            ("RUSTY_SOCKS_BROKER_PREFIX", "a.b"),
            ("RUSTY_SOCKS_PRESENCE_TTL", "1"),
        ];
        for (var, value) in cases {
            let err = with(&[(var, value)]).expect_err(var);
            assert_eq!(err.var, var);
            assert_eq!(err.value, value);
            let text = err.to_string();
            assert!(text.contains(var) && text.contains("expected"), "{text}");
        }
    }

    #[test]
    fn the_settings_table_lists_exactly_the_variables_that_are_read() {
        let asked = std::cell::RefCell::new(Vec::new());
        Config::from_lookup(|var| {
            asked.borrow_mut().push(var.to_owned());
            None
        })
        .expect("defaults are valid");
        let mut asked = asked.into_inner();
        asked.sort();
        asked.dedup();
        let mut listed: Vec<String> = SETTINGS.iter().map(|s| s.var.to_owned()).collect();
        listed.sort();
        assert_eq!(asked, listed);
    }

    #[test]
    fn unknown_variables_are_found_with_what_they_were_probably_meant_to_be() {
        let names = [
            "RUSTY_SOCKS_PORT",
            "RUSTY_SOCKS_MAX_CONNS",
            "RUSTY_SOCKS_FROBNICATE",
            "RUSTY_SOCKS_TEST_REDIS_URL",
            "HOME",
        ]
        .map(String::from);
        assert_eq!(
            unknown_variables(names),
            vec![
                ("RUSTY_SOCKS_FROBNICATE".to_owned(), None),
                (
                    "RUSTY_SOCKS_MAX_CONNS".to_owned(),
                    Some("RUSTY_SOCKS_MAX_CONN")
                ),
            ]
        );
    }

    #[test]
    fn ping_must_be_shorter_than_timeout() {
        let err = with(&[("RUSTY_SOCKS_PING", "60")]).expect_err("ping == timeout");
        assert_eq!(err.var, "RUSTY_SOCKS_PING");
    }
}
