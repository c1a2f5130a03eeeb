//! Server settings: embedded defaults, overridden by a config file (TOML, YAML or JSON), then by
//! `RUSTY_SOCKS_*` environment variables, then by command-line flags ([`load`]).
//!
//! This is the one place that reads the process environment. The layers below never see
//! [`Config`]: they take typed options, built here for the broker and the token verifier
//! (`Config::broker_choice`, `Config::key_options`) and by the server for the engine
//! (`engine::node::NodeOptions`, `engine::session::SessionConfig`).
//!
//! Every setting is validated at startup. A value that does not parse or is out of range is a
//! [`ConfigError`] naming the variable, the value and what is accepted; `main` turns it into
//! exit code 2. Silently falling back to a default (as the original server did) would leave an
//! operator believing a limit is in force when it is not.

mod generate;
mod options;
mod proxy;
mod read;
mod sources;
mod table;
mod webhook;

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

pub use crate::auth::JwksSource;
use crate::engine::namespace::Namespaces;
pub use crate::types::net::IpRange;
pub use crate::types::secret::Secret;
pub use generate::{FileFormat, gen_config};
pub use sources::{LoadError, Loaded, Origin, Sources, load};
pub use table::{CONFIG_VAR, Kind, PREFIX, SETTINGS, Setting, unknown_variables};

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
    /// `RUSTY_SOCKS_WRITE_DELAY_MS`: how long a connection that wrote less than this ago
    /// waits for more messages before writing again (0: never waits); see
    /// [`crate::engine::session::SessionConfig::with_write_delay`].
    pub write_delay: Duration,
    /// `RUSTY_SOCKS_BUSY_WRITE_DELAY_MS`: the same, but only while the server is saturated
    /// (its CPU time says so; see `engine/load.rs`), when it takes the load off (0: never);
    /// see [`crate::engine::session::SessionConfig::with_busy_write_delay`].
    pub busy_write_delay: Duration,
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
    /// `RUSTY_SOCKS_COMPRESSION`: whether permessage-deflate is negotiated.
    pub compression: bool,
    /// `RUSTY_SOCKS_COMPRESSION_MIN_SIZE`: messages shorter than this go uncompressed.
    pub compression_min_size: usize,
    /// `RUSTY_SOCKS_COMPRESSION_LEVEL`: deflate level, 1-9.
    pub compression_level: u32,
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
    /// `RUSTY_SOCKS_BROKER_TIMEOUT`: the deadline of every broker call (commands, requests,
    /// subscription changes, health probes); a broker that misses it is reported down.
    pub broker_timeout: Duration,
    /// `RUSTY_SOCKS_PRESENCE_TTL`: how long a node's presence entries outlive its last refresh
    /// (with a networked broker), which bounds how long a dead node's clients stay listed.
    pub presence_ttl: Duration,
    /// `RUSTY_SOCKS_DATA_DIR`: where the memory broker keeps durable history and any broker the
    /// webhook queue (`None`: memory only).
    pub data_dir: Option<PathBuf>,
    /// `RUSTY_SOCKS_FSYNC` with `RUSTY_SOCKS_FSYNC_INTERVAL_MS`.
    pub fsync: crate::broker::durable::FsyncMode,
    /// `RUSTY_SOCKS_DATA_MAX_BYTES`: most bytes of history files (0 = unbounded).
    pub data_max_bytes: u64,
    /// `RUSTY_SOCKS_DATA_SEGMENT_BYTES`: a history file is sealed past this size.
    pub data_segment_bytes: u64,
    /// `RUSTY_SOCKS_IDEMPOTENCY_WINDOW`: how long a publish's `idempotency_key` is remembered
    /// per channel: a retry within it returns the first publish's offset and publishes nothing.
    pub idempotency_window: Duration,
    /// `RUSTY_SOCKS_JWT_SECRET`: HS256 secret for connection tokens.
    pub jwt_secret: Option<Secret>,
    /// `RUSTY_SOCKS_JWT_PUBLIC_KEY`: PEM file with an RSA (RS256) or P-256 (ES256) public key.
    pub jwt_public_key: Option<PathBuf>,
    /// `RUSTY_SOCKS_JWT_JWKS`: a JWKS document (file path or http(s) URL) with keys chosen by
    /// the token's `kid`, refreshed so keys rotate without a restart.
    pub jwt_jwks: Option<JwksSource>,
    /// `RUSTY_SOCKS_JWT_JWKS_REFRESH`: period of JWKS refreshes.
    pub jwt_jwks_refresh: Duration,
    /// `RUSTY_SOCKS_JWT_JWKS_COOLDOWN`: least time between two JWKS fetches caused by tokens
    /// with unknown `kid`s (which anyone can send).
    pub jwt_jwks_cooldown: Duration,
    /// `RUSTY_SOCKS_JWT_ISSUER`: the `iss` every token must carry (unset: not checked).
    pub jwt_issuer: Option<String>,
    /// `RUSTY_SOCKS_JWT_AUDIENCE`: audiences a token's `aud` must name one of (empty: a token
    /// with `aud` is refused, as it was meant for another service).
    pub jwt_audience: Vec<String>,
    /// `RUSTY_SOCKS_JWT_REQUIRE_EXP`: refuse tokens without `exp`.
    pub jwt_require_exp: bool,
    /// `RUSTY_SOCKS_ALLOW_ANONYMOUS`: let connections without a token in when a key is set.
    pub allow_anonymous: bool,
    /// `RUSTY_SOCKS_REFRESH_WINDOW`: how long before a token expires the client is asked for
    /// a new one.
    pub refresh_window: Duration,
    /// `RUSTY_SOCKS_API_KEY`: key of the server HTTP API under `/api` (unset: API off).
    pub api_key: Option<Secret>,
    /// `RUSTY_SOCKS_API_TIMEOUT`: how long one `/api` request may take, reading its body and
    /// doing the work; it replaces the handshake deadline once the request headers are in.
    pub api_timeout: Duration,
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
    /// `RUSTY_SOCKS_MAX_CONN_PER_IP`: sockets one client address may hold at once, pending
    /// handshakes included (0: no bound). The default keeps one address below `MAX_CONN`'s and
    /// `MAX_QUEUED_TASKS`' defaults (see [`DEFAULT_MAX_CONN_PER_IP`]).
    pub max_conn_per_ip: usize,
    /// `RUSTY_SOCKS_IPV6_PREFIX`: IPv6 addresses sharing this many leading bits count as one
    /// address for the per-address limits.
    pub ipv6_prefix: u8,
    /// `RUSTY_SOCKS_TRUSTED_PROXIES`: peers whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpRange>,
    /// `RUSTY_SOCKS_WEBHOOK_*`: where and how webhook events are sent (off without a URL).
    pub webhook: crate::engine::webhook::WebhookOptions,
    /// `RUSTY_SOCKS_DEMO`: serve the demo page at `/` and the client at `/rusty-socks.js`.
    pub demo: bool,
    /// `RUSTY_SOCKS_LOG_FORMAT`: how log lines are written.
    pub log_format: LogFormat,
    /// `RUSTY_SOCKS_LOG_LEVEL`: the log filter (`RUST_LOG` syntax); `RUST_LOG`, when set, wins.
    pub log_level: String,
    /// `RUSTY_SOCKS_PROXY_*`: the backend's connect, subscribe and publish proxy.
    pub proxy: crate::engine::backend::ProxyOptions,
}

/// How log lines are written (`RUSTY_SOCKS_LOG_FORMAT`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event.
    #[default]
    Text,
    /// One JSON object per line (level, target, message and the event's fields), for log
    /// shippers that would otherwise have to parse text.
    Json,
}

/// Default of `RUSTY_SOCKS_MAX_CONN_PER_IP`: under a third of `MAX_CONN`'s default (100) and a
/// thirtieth of `MAX_QUEUED_TASKS`' (1000), so with default settings one address can hold
/// neither all connections nor all handshake slots: at least four addresses are needed to fill
/// `MAX_CONN`, and more than thirty to fill the handshake slots. 32 is still plenty for one
/// browser (a tab needs one socket) or a small office behind one NAT.
pub const DEFAULT_MAX_CONN_PER_IP: usize = 32;

impl Default for Config {
    fn default() -> Self {
        Self {
            host: IpAddr::from([0, 0, 0, 0]),
            port: 3030,
            max_connections: 100,
            buffer: 1024,
            timeout: Duration::from_secs(60),
            ping_interval: Duration::from_secs(30),
            write_delay: Duration::ZERO,
            busy_write_delay: Duration::from_millis(10),
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
            compression: false,
            compression_min_size: 256,
            compression_level: 1,
            handshake_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(3),
            namespaces: Namespaces::default(),
            max_channels: 128,
            max_data_size: 32 * 1024,
            broker: BrokerUrl::Memory,
            broker_prefix: "rusty_socks".to_owned(),
            broker_timeout: Duration::from_secs(3),
            presence_ttl: Duration::from_secs(30),
            idempotency_window: Duration::from_secs(300),
            data_dir: None,
            fsync: crate::broker::durable::FsyncMode::Always,
            data_max_bytes: 0,
            data_segment_bytes: 16 << 20,
            jwt_secret: None,
            jwt_public_key: None,
            jwt_jwks: None,
            jwt_jwks_refresh: Duration::from_secs(300),
            jwt_jwks_cooldown: Duration::from_secs(30),
            jwt_issuer: None,
            jwt_audience: Vec::new(),
            jwt_require_exp: false,
            allow_anonymous: false,
            refresh_window: Duration::from_secs(30),
            api_key: None,
            api_timeout: Duration::from_secs(10),
            allowed_origins: Vec::new(),
            tls_cert: None,
            tls_key: None,
            metrics_addr: None,
            client_rate: 0,
            client_burst: 50,
            connect_rate: 0,
            connect_burst: 20,
            max_conn_per_ip: DEFAULT_MAX_CONN_PER_IP,
            ipv6_prefix: 64,
            trusted_proxies: Vec::new(),
            webhook: crate::engine::webhook::WebhookOptions::default(),
            demo: true,
            log_format: LogFormat::Text,
            log_level: "info".to_owned(),
            proxy: crate::engine::backend::ProxyOptions::default(),
        }
    }
}
