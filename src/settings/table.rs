//! The table of settings: every variable, its default, kind and meaning, for `--help`, README,
//! the command-line flags, the config file's keys and the warning about variables that are not
//! settings. One table behind every source, so a variable, its flag and its file key cannot drift.

/// One row of the settings table: the variable, its default as text, its kind and meaning.
#[derive(Debug)]
pub struct Setting {
    /// The environment variable.
    pub var: &'static str,
    /// Default, as written in the docs.
    pub default: &'static str,
    /// What a config file must hold for it (the variable and the flag always hold text).
    pub kind: Kind,
    /// One-line meaning.
    pub meaning: &'static str,
}

/// The type a setting takes in a config file. The variable and the flag are text parsed by
/// the same rules; the file is typed, so `port = "x"` and `demo = 3` are caught as wrong types
/// with the key's line before any value is validated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A whole number (seconds, bytes, counts).
    Int,
    /// `true` or `false`.
    Bool,
    /// Text.
    Text,
    /// Text that is never printed back (`print-config` shows `***`).
    Secret,
    /// A list of text (the variable takes it comma-separated).
    List,
    /// A nested table (the variable takes it as a JSON object).
    Map,
}

/// Prefix of every setting's variable.
pub const PREFIX: &str = "RUSTY_SOCKS_";

/// The variable naming the config file (`--config`); not a setting itself, as a file cannot
/// name another file.
pub const CONFIG_VAR: &str = "RUSTY_SOCKS_CONFIG";

impl Setting {
    /// The config file's key: the variable without `RUSTY_SOCKS_`, lowercased (`max_conn`).
    pub fn file_key(&self) -> String {
        self.var.trim_start_matches(PREFIX).to_ascii_lowercase()
    }

    /// The command-line flag without its dashes: the file key with `-` for `_` (`max-conn`).
    pub fn flag(&self) -> String {
        self.file_key().replace('_', "-")
    }

    /// The row of `var`, if it is a setting.
    pub fn find(var: &str) -> Option<&'static Setting> {
        SETTINGS.iter().find(|s| s.var == var)
    }
}

/// The settings table, printed by `rusty_socks --help` and mirrored in README.md.
pub const SETTINGS: &[Setting] = &[
    Setting {
        var: "RUSTY_SOCKS_HOST",
        default: "0.0.0.0",
        kind: Kind::Text,
        meaning: "listen address (an IPv4 or IPv6 literal)",
    },
    Setting {
        var: "RUSTY_SOCKS_PORT",
        default: "3030",
        kind: Kind::Int,
        meaning: "listen port, 0-65535 (0 = any free port)",
    },
    Setting {
        var: "RUSTY_SOCKS_MAX_CONN",
        default: "100",
        kind: Kind::Int,
        meaning: "concurrent WebSocket connections; more get HTTP 503",
    },
    Setting {
        var: "RUSTY_SOCKS_BUFFER",
        default: "1024",
        kind: Kind::Int,
        meaning: "per-connection outbound queue (messages); overflow closes with 4001",
    },
    Setting {
        var: "RUSTY_SOCKS_TIMEOUT",
        default: "60",
        kind: Kind::Int,
        meaning: "seconds without any frame from a client before close 4000",
    },
    Setting {
        var: "RUSTY_SOCKS_PING",
        default: "30",
        kind: Kind::Int,
        meaning: "seconds between server pings (must be below TIMEOUT)",
    },
    Setting {
        var: "RUSTY_SOCKS_WRITE_DELAY_MS",
        default: "0",
        kind: Kind::Int,
        meaning: "milliseconds a streaming connection's writer waits for more messages before writing, 0-100 (0: at once)",
    },
    Setting {
        var: "RUSTY_SOCKS_BUSY_WRITE_DELAY_MS",
        default: "10",
        kind: Kind::Int,
        meaning: "the same, only while the server is saturated (a 100 ms window at 90 % of its workers' CPU, until a second below 75 %), 0-100 (0: never)",
    },
    Setting {
        var: "RUSTY_SOCKS_THREAD_POOL_SIZE",
        default: "4",
        kind: Kind::Int,
        meaning: "worker threads of the runtime, 1-1024",
    },
    Setting {
        var: "RUSTY_SOCKS_MAX_QUEUED_TASKS",
        default: "1000",
        kind: Kind::Int,
        meaning: "connection attempts mid-handshake at once; more get HTTP 503",
    },
    Setting {
        var: "RUSTY_SOCKS_MAX_MESSAGE_SIZE",
        default: "65536",
        kind: Kind::Int,
        meaning: "largest message on /ws in bytes; larger closes with 1009",
    },
    Setting {
        var: "RUSTY_SOCKS_HISTORY_SIZE",
        default: "100",
        kind: Kind::Int,
        meaning: "chat messages kept for the legacy default channel (0 disables storage)",
    },
    Setting {
        var: "RUSTY_SOCKS_HISTORY_BYTES",
        default: "1048576",
        kind: Kind::Int,
        meaning: "bytes of history kept per channel",
    },
    Setting {
        var: "RUSTY_SOCKS_HISTORY_TOTAL_BYTES",
        default: "268435456",
        kind: Kind::Int,
        meaning: "bytes of history kept across all channels; past it publications are not stored",
    },
    Setting {
        var: "RUSTY_SOCKS_DATA_DIR",
        default: "",
        kind: Kind::Text,
        meaning: "directory for durable history and holdings (memory broker) and the webhook queue (any broker)",
    },
    Setting {
        var: "RUSTY_SOCKS_FSYNC",
        default: "always",
        kind: Kind::Text,
        meaning: "when an acknowledged publication is synced to disk: always, interval or never",
    },
    Setting {
        var: "RUSTY_SOCKS_FSYNC_INTERVAL_MS",
        default: "100",
        kind: Kind::Int,
        meaning: "milliseconds between syncs with RUSTY_SOCKS_FSYNC=interval, 1-60000",
    },
    Setting {
        var: "RUSTY_SOCKS_DATA_MAX_BYTES",
        default: "0",
        kind: Kind::Int,
        meaning: "most bytes of history files in RUSTY_SOCKS_DATA_DIR (0 = no bound but the disk)",
    },
    Setting {
        var: "RUSTY_SOCKS_DATA_SEGMENT_BYTES",
        default: "16777216",
        kind: Kind::Int,
        meaning: "size at which a history file is sealed; files are deleted whole",
    },
    Setting {
        var: "RUSTY_SOCKS_REPLAY",
        default: "10",
        kind: Kind::Int,
        meaning: "stored messages replayed to a newcomer after the welcome",
    },
    Setting {
        var: "RUSTY_SOCKS_ECHO_TO_SENDER",
        default: "false",
        kind: Kind::Bool,
        meaning: "also send a chat message back to its sender",
    },
    Setting {
        var: "RUSTY_SOCKS_ECHO_ENDPOINT",
        default: "false",
        kind: Kind::Bool,
        meaning: "serve the /echo conformance endpoint",
    },
    Setting {
        var: "RUSTY_SOCKS_ECHO_MAX_MESSAGE_SIZE",
        default: "16777216",
        kind: Kind::Int,
        meaning: "largest message on /echo in bytes",
    },
    Setting {
        var: "RUSTY_SOCKS_COMPRESSION",
        default: "false",
        kind: Kind::Bool,
        meaning: "negotiate permessage-deflate (RFC 7692) on /ws and /echo",
    },
    Setting {
        var: "RUSTY_SOCKS_COMPRESSION_MIN_SIZE",
        default: "256",
        kind: Kind::Int,
        meaning: "messages shorter than this many bytes are sent uncompressed",
    },
    Setting {
        var: "RUSTY_SOCKS_COMPRESSION_LEVEL",
        default: "1",
        kind: Kind::Int,
        meaning: "deflate level, 1 (fastest) to 9 (smallest)",
    },
    Setting {
        var: "RUSTY_SOCKS_HANDSHAKE_TIMEOUT",
        default: "10",
        kind: Kind::Int,
        meaning: "seconds a new socket has to send its request headers",
    },
    Setting {
        var: "RUSTY_SOCKS_SHUTDOWN_GRACE",
        default: "3",
        kind: Kind::Int,
        meaning: "seconds clients get to drain on SIGINT/SIGTERM, 1-4",
    },
    Setting {
        var: "RUSTY_SOCKS_NAMESPACES",
        default: "{\"\":{}}",
        kind: Kind::Map,
        meaning: "JSON object of per-namespace channel options (see docs/protocol.md)",
    },
    Setting {
        var: "RUSTY_SOCKS_MAX_CHANNELS",
        default: "128",
        kind: Kind::Int,
        meaning: "channels one connection may be subscribed to",
    },
    Setting {
        var: "RUSTY_SOCKS_MAX_DATA_SIZE",
        default: "32768",
        kind: Kind::Int,
        meaning: "largest data of a v1 publish or /api publish, in bytes",
    },
    Setting {
        var: "RUSTY_SOCKS_BROKER",
        default: "memory",
        kind: Kind::Text,
        meaning: "memory (one node), redis://host:port[/db] or nats://host:port",
    },
    Setting {
        var: "RUSTY_SOCKS_BROKER_PREFIX",
        default: "rusty_socks",
        kind: Kind::Text,
        meaning: "prefix of Redis keys and NATS subjects (letters, digits, _ and -)",
    },
    Setting {
        var: "RUSTY_SOCKS_BROKER_TIMEOUT",
        default: "3",
        kind: Kind::Int,
        meaning: "seconds any one broker call may take before it fails as unavailable, 1-60",
    },
    Setting {
        var: "RUSTY_SOCKS_PRESENCE_TTL",
        default: "30",
        kind: Kind::Int,
        meaning: "seconds a dead node's presence entries remain (networked brokers), 3-3600",
    },
    Setting {
        var: "RUSTY_SOCKS_IDEMPOTENCY_WINDOW",
        default: "300",
        kind: Kind::Int,
        meaning: "seconds a publish's idempotency_key is remembered per channel, 1-86400",
    },
    Setting {
        var: "RUSTY_SOCKS_JWT_SECRET",
        default: "(unset)",
        kind: Kind::Secret,
        meaning: "HS256 secret for connection tokens (set a key to require tokens)",
    },
    Setting {
        var: "RUSTY_SOCKS_JWT_PUBLIC_KEY",
        default: "(unset)",
        kind: Kind::Text,
        meaning: "PEM file: RSA public key (RS256) or P-256 public key (ES256)",
    },
    Setting {
        var: "RUSTY_SOCKS_JWT_JWKS",
        default: "(unset)",
        kind: Kind::Text,
        meaning: "JWKS document (file path or http(s) URL): keys chosen by the token's kid",
    },
    Setting {
        var: "RUSTY_SOCKS_JWT_JWKS_REFRESH",
        default: "300",
        kind: Kind::Int,
        meaning: "seconds between JWKS refreshes, 1-86400",
    },
    Setting {
        var: "RUSTY_SOCKS_JWT_JWKS_COOLDOWN",
        default: "30",
        kind: Kind::Int,
        meaning: "least seconds between JWKS fetches caused by an unknown kid, 1-3600",
    },
    Setting {
        var: "RUSTY_SOCKS_JWT_ISSUER",
        default: "(unset)",
        kind: Kind::Text,
        meaning: "the iss every token must carry (unset: not checked)",
    },
    Setting {
        var: "RUSTY_SOCKS_JWT_AUDIENCE",
        default: "(unset)",
        kind: Kind::List,
        meaning: "comma-separated audiences; a token's aud must name one (unset: aud refused)",
    },
    Setting {
        var: "RUSTY_SOCKS_JWT_REQUIRE_EXP",
        default: "false",
        kind: Kind::Bool,
        meaning: "refuse tokens without exp (off: tokens without exp never expire)",
    },
    Setting {
        var: "RUSTY_SOCKS_ALLOW_ANONYMOUS",
        default: "false",
        kind: Kind::Bool,
        meaning: "with a key set, still let connections without a token in",
    },
    Setting {
        var: "RUSTY_SOCKS_REFRESH_WINDOW",
        default: "30",
        kind: Kind::Int,
        meaning: "seconds before a token expires that the client is asked to refresh it",
    },
    Setting {
        var: "RUSTY_SOCKS_API_KEY",
        default: "(unset)",
        kind: Kind::Secret,
        meaning: "key of the /api server API (Authorization: apikey <key>); unset: API off",
    },
    Setting {
        var: "RUSTY_SOCKS_API_TIMEOUT",
        default: "10",
        kind: Kind::Int,
        meaning: "seconds an /api request may take, body and work included (then 504)",
    },
    Setting {
        var: "RUSTY_SOCKS_ALLOWED_ORIGINS",
        default: "(any)",
        kind: Kind::List,
        meaning: "comma-separated origins browsers may connect from; others get 403",
    },
    Setting {
        var: "RUSTY_SOCKS_TLS_CERT",
        default: "(unset)",
        kind: Kind::Text,
        meaning: "PEM certificate chain; with TLS_KEY, serve wss:// and https://",
    },
    Setting {
        var: "RUSTY_SOCKS_TLS_KEY",
        default: "(unset)",
        kind: Kind::Text,
        meaning: "PEM private key of TLS_CERT",
    },
    Setting {
        var: "RUSTY_SOCKS_METRICS_ADDR",
        default: "(main port)",
        kind: Kind::Text,
        meaning: "serve /metrics on this host:port instead of the main port",
    },
    Setting {
        var: "RUSTY_SOCKS_CLIENT_RATE",
        default: "0",
        kind: Kind::Int,
        meaning: "messages per second per connection (0 = no limit)",
    },
    Setting {
        var: "RUSTY_SOCKS_CLIENT_BURST",
        default: "50",
        kind: Kind::Int,
        meaning: "messages a connection may send at once above CLIENT_RATE",
    },
    Setting {
        var: "RUSTY_SOCKS_CONNECT_RATE",
        default: "0",
        kind: Kind::Int,
        meaning: "new connections per second per client IP (0 = no limit)",
    },
    Setting {
        var: "RUSTY_SOCKS_CONNECT_BURST",
        default: "20",
        kind: Kind::Int,
        meaning: "connections an IP may open at once above CONNECT_RATE",
    },
    Setting {
        var: "RUSTY_SOCKS_MAX_CONN_PER_IP",
        default: "32",
        kind: Kind::Int,
        meaning: "sockets one client address may hold, pending handshakes included; more get 429 (0 = no limit)",
    },
    Setting {
        var: "RUSTY_SOCKS_IPV6_PREFIX",
        default: "64",
        kind: Kind::Int,
        meaning: "IPv6 addresses sharing this prefix (1-128 bits) count as one address",
    },
    Setting {
        var: "RUSTY_SOCKS_TRUSTED_PROXIES",
        default: "(none)",
        kind: Kind::List,
        meaning: "comma-separated proxy IPs/CIDRs whose X-Forwarded-For is believed",
    },
    Setting {
        var: "RUSTY_SOCKS_WEBHOOK_URL",
        default: "(unset)",
        kind: Kind::Text,
        meaning: "http:// URL the webhook events are POSTed to (unset = no webhooks)",
    },
    Setting {
        var: "RUSTY_SOCKS_WEBHOOK_SECRET",
        default: "(unset)",
        kind: Kind::Secret,
        meaning: "HMAC-SHA256 key of the X-Rusty-Socks-Signature header, at least 16 bytes; required with WEBHOOK_URL",
    },
    Setting {
        var: "RUSTY_SOCKS_WEBHOOK_EVENTS",
        default: "channel_occupied,channel_vacated,member_added,member_removed",
        kind: Kind::List,
        meaning: "events sent; client_connected and client_disconnected are opt-in",
    },
    Setting {
        var: "RUSTY_SOCKS_WEBHOOK_BATCH",
        default: "100",
        kind: Kind::Int,
        meaning: "most events in one webhook POST (a batch waits at most 250 ms to fill)",
    },
    Setting {
        var: "RUSTY_SOCKS_WEBHOOK_MAX_AGE",
        default: "3600",
        kind: Kind::Int,
        meaning: "seconds an undelivered webhook event is retried before it is dropped",
    },
    Setting {
        var: "RUSTY_SOCKS_WEBHOOK_TIMEOUT",
        default: "5",
        kind: Kind::Int,
        meaning: "seconds one webhook POST may take before it counts as failed",
    },
    Setting {
        var: "RUSTY_SOCKS_DEMO",
        default: "true",
        kind: Kind::Bool,
        meaning: "serve the demo page at / and the browser client at /rusty-socks.js",
    },
    Setting {
        var: "RUSTY_SOCKS_LOG_FORMAT",
        default: "text",
        kind: Kind::Text,
        meaning: "log lines as text, or json: one object per line with level, target, message and fields",
    },
    Setting {
        var: "RUSTY_SOCKS_LOG_LEVEL",
        default: "info",
        kind: Kind::Text,
        meaning: "log filter in RUST_LOG syntax (debug, rusty_socks=debug,info, ...); a reload applies it; RUST_LOG, when set, wins",
    },
    Setting {
        var: "RUSTY_SOCKS_PROXY_CONNECT_URL",
        default: "(none)",
        kind: Kind::Text,
        meaning: "http:// URL the backend decides /ws upgrades at (without a valid token) before the 101: 403 refused, 503 unreachable",
    },
    Setting {
        var: "RUSTY_SOCKS_PROXY_CONNECT_ALWAYS",
        default: "false",
        kind: Kind::Bool,
        meaning: "ask PROXY_CONNECT_URL about every /ws upgrade, also those with a valid token",
    },
    Setting {
        var: "RUSTY_SOCKS_PROXY_SUBSCRIBE_URL",
        default: "(none)",
        kind: Kind::Text,
        meaning: "http:// URL asked about subscriptions in namespaces with \"proxy_subscribe\": true",
    },
    Setting {
        var: "RUSTY_SOCKS_PROXY_PUBLISH_URL",
        default: "(none)",
        kind: Kind::Text,
        meaning: "http:// URL asked about client publications in namespaces with \"proxy_publish\": true",
    },
    Setting {
        var: "RUSTY_SOCKS_PROXY_TIMEOUT",
        default: "2",
        kind: Kind::Int,
        meaning: "seconds one proxy call may take, waiting for a free slot included, 1-60",
    },
    Setting {
        var: "RUSTY_SOCKS_PROXY_MAX_CONCURRENCY",
        default: "64",
        kind: Kind::Int,
        meaning: "proxy calls in flight at once toward the backend, 1-10000",
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
        .filter(|name| {
            name.starts_with(PREFIX) && !name.starts_with(TEST_PREFIX) && name != CONFIG_VAR
        })
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
