//! Reading settings from the environment (or any lookup), validating each one.

use std::path::PathBuf;
use std::time::Duration;

use super::{BrokerUrl, Config, ConfigError, IpRange, JwksSource, LogFormat, Secret};
use crate::broker::durable::FsyncMode;
use crate::engine::namespace::Namespaces;

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

impl Config {
    /// Reads the process environment over the defaults.
    pub fn from_env() -> Result<Self, ConfigError> {
        Self::from_lookup(|var| std::env::var(var).ok())
    }

    /// [`Config::from_lookup`] that reports every invalid setting, not only the first: a
    /// setting found invalid is reported and then read as unset, and the rest read again, until
    /// no error is left (at most one pass per setting). Checks across settings (PING below
    /// TIMEOUT, TLS_CERT with TLS_KEY) run on the valid values.
    pub fn from_lookup_all(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, Vec<ConfigError>> {
        let mut errors: Vec<ConfigError> = Vec::new();
        loop {
            let skipped = |var: &str| errors.iter().any(|e| e.var == var);
            match Self::from_lookup(|var| if skipped(var) { None } else { lookup(var) }) {
                Ok(config) if errors.is_empty() => return Ok(config),
                Ok(_) => return Err(errors),
                Err(err) => {
                    // A check across settings may name a variable that is unset: reading it
                    // as unset again would find the same error forever.
                    let last = skipped(err.var) || lookup(err.var).is_none();
                    errors.push(err);
                    if last {
                        return Err(errors);
                    }
                }
            }
        }
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
            write_delay: Duration::from_millis(int(
                "RUSTY_SOCKS_WRITE_DELAY_MS",
                d.write_delay.as_millis() as usize,
                0,
                100,
            )? as u64),
            busy_write_delay: Duration::from_millis(int(
                "RUSTY_SOCKS_BUSY_WRITE_DELAY_MS",
                d.busy_write_delay.as_millis() as usize,
                0,
                100,
            )? as u64),
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
            compression: flag("RUSTY_SOCKS_COMPRESSION", d.compression)?,
            compression_min_size: int(
                "RUSTY_SOCKS_COMPRESSION_MIN_SIZE",
                d.compression_min_size,
                0,
                64 << 20,
            )?,
            compression_level: int(
                "RUSTY_SOCKS_COMPRESSION_LEVEL",
                d.compression_level as usize,
                1,
                9,
            )? as u32,
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
            broker_timeout: match get("RUSTY_SOCKS_BROKER_TIMEOUT") {
                None => d.broker_timeout,
                Some((var, v)) => parse_int(var, &v, 1, 60).map(Duration::from_secs)?,
            },
            presence_ttl: match get("RUSTY_SOCKS_PRESENCE_TTL") {
                None => d.presence_ttl,
                Some((var, v)) => parse_int(var, &v, 3, 3600).map(Duration::from_secs)?,
            },
            // At most a day: NATS refuses a duplicate window longer than the history stream's
            // maximum age (24 h), and no retry needs longer.
            idempotency_window: match get("RUSTY_SOCKS_IDEMPOTENCY_WINDOW") {
                None => d.idempotency_window,
                Some((var, v)) => parse_int(var, &v, 1, 86_400).map(Duration::from_secs)?,
            },
            data_dir: path(get("RUSTY_SOCKS_DATA_DIR")),
            fsync: {
                let every = match get("RUSTY_SOCKS_FSYNC_INTERVAL_MS") {
                    None => Duration::from_millis(100),
                    Some((var, v)) => parse_int(var, &v, 1, 60_000).map(Duration::from_millis)?,
                };
                match get("RUSTY_SOCKS_FSYNC") {
                    None => d.fsync,
                    Some((var, v)) => match v.trim() {
                        "always" => FsyncMode::Always,
                        "interval" => FsyncMode::Interval(every),
                        "never" => FsyncMode::Never,
                        _ => {
                            return Err(ConfigError {
                                var,
                                value: v,
                                expected: "always, interval or never".into(),
                            });
                        }
                    },
                }
            },
            data_max_bytes: match get("RUSTY_SOCKS_DATA_MAX_BYTES") {
                None => d.data_max_bytes,
                Some((var, v)) => parse_int(var, &v, 0, u64::MAX >> 1)?,
            },
            data_segment_bytes: match get("RUSTY_SOCKS_DATA_SEGMENT_BYTES") {
                None => d.data_segment_bytes,
                Some((var, v)) => parse_int(var, &v, 4096, 1 << 30)?,
            },
            jwt_secret: secret(get("RUSTY_SOCKS_JWT_SECRET"), 16)?,
            jwt_public_key: path(get("RUSTY_SOCKS_JWT_PUBLIC_KEY")),
            jwt_jwks: match get("RUSTY_SOCKS_JWT_JWKS") {
                None => None,
                Some((_, v)) if v.trim().is_empty() => None,
                Some((var, v)) => Some(JwksSource::parse(&v).map_err(|expected| ConfigError {
                    var,
                    value: v.clone(),
                    expected,
                })?),
            },
            jwt_jwks_refresh: secs("RUSTY_SOCKS_JWT_JWKS_REFRESH", d.jwt_jwks_refresh, 86_400)?,
            jwt_jwks_cooldown: secs("RUSTY_SOCKS_JWT_JWKS_COOLDOWN", d.jwt_jwks_cooldown, 3600)?,
            jwt_issuer: get("RUSTY_SOCKS_JWT_ISSUER")
                .map(|(_, v)| v.trim().to_owned())
                .filter(|v| !v.is_empty()),
            jwt_audience: match get("RUSTY_SOCKS_JWT_AUDIENCE") {
                None => d.jwt_audience,
                Some((var, v)) => parse_list(var, &v, "comma-separated audiences, like my-app")?,
            },
            jwt_require_exp: flag("RUSTY_SOCKS_JWT_REQUIRE_EXP", d.jwt_require_exp)?,
            allow_anonymous: flag("RUSTY_SOCKS_ALLOW_ANONYMOUS", d.allow_anonymous)?,
            refresh_window: secs("RUSTY_SOCKS_REFRESH_WINDOW", d.refresh_window, 3600)?,
            api_key: secret(get("RUSTY_SOCKS_API_KEY"), 16)?,
            api_timeout: secs("RUSTY_SOCKS_API_TIMEOUT", d.api_timeout, 3600)?,
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
            max_conn_per_ip: int(
                "RUSTY_SOCKS_MAX_CONN_PER_IP",
                d.max_conn_per_ip,
                0,
                10_000_000,
            )?,
            ipv6_prefix: int("RUSTY_SOCKS_IPV6_PREFIX", usize::from(d.ipv6_prefix), 1, 128)? as u8,
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
            webhook: super::webhook::read(&get)?,
            demo: flag("RUSTY_SOCKS_DEMO", d.demo)?,
            log_format: match get("RUSTY_SOCKS_LOG_FORMAT") {
                None => d.log_format,
                Some((var, v)) => match v.trim().to_ascii_lowercase().as_str() {
                    "text" => LogFormat::Text,
                    "json" => LogFormat::Json,
                    _ => {
                        return Err(ConfigError {
                            var,
                            value: v,
                            expected: "text or json".into(),
                        });
                    }
                },
            },
            proxy: super::proxy::read(&get)?,
            log_level: match get("RUSTY_SOCKS_LOG_LEVEL") {
                None => d.log_level,
                Some((var, v)) => {
                    // Checked here, so a reload with a bad filter is refused before anything
                    // changes, naming the setting.
                    if let Err(err) = tracing_subscriber::EnvFilter::try_new(v.trim()) {
                        return Err(ConfigError {
                            var,
                            value: v,
                            expected: format!("a log filter such as info or rusty_socks=debug ({err})"),
                        });
                    }
                    v.trim().to_owned()
                }
            },
        };
        super::proxy::check_namespaces(&config.proxy, &config.namespaces)?;
        if let Some(dir) = &config.data_dir
            && config.broker != BrokerUrl::Memory
            && config.webhook.url.is_none()
        {
            return Err(ConfigError {
                var: "RUSTY_SOCKS_DATA_DIR",
                value: dir.display().to_string(),
                expected:
                    "unset, or set with RUSTY_SOCKS_WEBHOOK_URL: with a Redis or NATS broker \
                           it holds only the webhook queue (history stays in the broker)"
                        .into(),
            });
        }
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
pub(super) fn secret(
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

/// A comma-separated list; blank means empty, but an empty entry (`a,,b`) is a mistake.
fn parse_list(var: &'static str, value: &str, expected: &str) -> Result<Vec<String>, ConfigError> {
    if value.trim().is_empty() {
        return Ok(Vec::new());
    }
    value
        .split(',')
        .map(|item| {
            let item = item.trim();
            if item.is_empty() {
                Err(ConfigError {
                    var,
                    value: value.to_owned(),
                    expected: expected.to_owned(),
                })
            } else {
                Ok(item.to_owned())
            }
        })
        .collect()
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

pub(super) fn parse_int(
    var: &'static str,
    value: &str,
    min: u64,
    max: u64,
) -> Result<u64, ConfigError> {
    match value.trim().parse::<u64>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(ConfigError {
            var,
            value: value.to_owned(),
            expected: format!("a whole number from {min} to {max}"),
        }),
    }
}

pub(super) fn parse_bool(var: &'static str, value: &str) -> Result<bool, ConfigError> {
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
#[path = "read_tests.rs"]
mod tests;
