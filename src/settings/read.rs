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
mod tests {
    use super::*;
    use crate::settings::{SETTINGS, unknown_variables};
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
            ("RUSTY_SOCKS_IDEMPOTENCY_WINDOW", "60"),
            ("RUSTY_SOCKS_BROKER_TIMEOUT", "7"),
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
        assert_eq!(c.idempotency_window, Duration::from_secs(60));
        assert_eq!(c.broker_timeout, Duration::from_secs(7));
        if cfg!(feature = "nats") {
            let nats = with(&[("RUSTY_SOCKS_BROKER", "nats://127.0.0.1:4222")]).expect("valid");
            assert_eq!(nats.broker, BrokerUrl::Nats("nats://127.0.0.1:4222".into()));
        }
    }

    #[test]
    fn compression_settings_are_read_and_checked() {
        let c = with(&[
            ("RUSTY_SOCKS_COMPRESSION", "true"),
            ("RUSTY_SOCKS_COMPRESSION_MIN_SIZE", "0"),
            ("RUSTY_SOCKS_COMPRESSION_LEVEL", "9"),
        ])
        .expect("valid");
        assert!(c.compression);
        assert_eq!((c.compression_min_size, c.compression_level), (0, 9));
        for (var, value) in [
            ("RUSTY_SOCKS_COMPRESSION_LEVEL", "0"),
            ("RUSTY_SOCKS_COMPRESSION_LEVEL", "10"),
            ("RUSTY_SOCKS_COMPRESSION_MIN_SIZE", "-1"),
            ("RUSTY_SOCKS_COMPRESSION", "maybe"),
        ] {
            let err = with(&[(var, value)]).expect_err("invalid");
            assert_eq!(err.var, var);
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
            ("RUSTY_SOCKS_IDEMPOTENCY_WINDOW", "0"),
            ("RUSTY_SOCKS_IDEMPOTENCY_WINDOW", "86401"),
            ("RUSTY_SOCKS_IDEMPOTENCY_WINDOW", "5m"),
            ("RUSTY_SOCKS_BROKER_TIMEOUT", "0"),
            ("RUSTY_SOCKS_BROKER_TIMEOUT", "61"),
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
    fn the_api_timeout_is_read_and_bad_values_name_it() {
        let c = with(&[("RUSTY_SOCKS_API_TIMEOUT", "25")]).expect("valid");
        assert_eq!(c.api_timeout, Duration::from_secs(25));
        assert_eq!(
            with(&[]).map(|c| c.api_timeout),
            Ok(Duration::from_secs(10))
        );
        for value in ["0", "-1", "3601", "ten", ""] {
            let err = with(&[("RUSTY_SOCKS_API_TIMEOUT", value)]).expect_err(value);
            assert_eq!(
                (err.var, err.value.as_str()),
                ("RUSTY_SOCKS_API_TIMEOUT", value)
            );
            assert!(err.to_string().contains("RUSTY_SOCKS_API_TIMEOUT"), "{err}");
        }
    }

    #[test]
    fn the_per_address_limits_are_read_and_bad_values_name_them() {
        let c = with(&[]).expect("defaults are valid");
        assert_eq!((c.max_conn_per_ip, c.ipv6_prefix), (32, 64));
        assert!(
            c.max_conn_per_ip < c.max_connections && c.max_conn_per_ip < c.max_queued_tasks,
            "by default one address cannot take every connection or handshake slot"
        );
        let c = with(&[
            ("RUSTY_SOCKS_MAX_CONN_PER_IP", "0"),
            ("RUSTY_SOCKS_IPV6_PREFIX", "128"),
        ])
        .expect("valid");
        assert_eq!((c.max_conn_per_ip, c.ipv6_prefix), (0, 128));
        let cases = [
            ("RUSTY_SOCKS_MAX_CONN_PER_IP", "-1"),
            ("RUSTY_SOCKS_MAX_CONN_PER_IP", "many"),
            ("RUSTY_SOCKS_MAX_CONN_PER_IP", "10000001"),
            ("RUSTY_SOCKS_IPV6_PREFIX", "0"),
            ("RUSTY_SOCKS_IPV6_PREFIX", "129"),
            ("RUSTY_SOCKS_IPV6_PREFIX", "/64"),
            ("RUSTY_SOCKS_IPV6_PREFIX", ""),
        ];
        for (var, value) in cases {
            let err = with(&[(var, value)]).expect_err(value);
            assert_eq!((err.var, err.value.as_str()), (var, value));
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn jwt_claims_and_jwks_settings_are_read() {
        let c = with(&[
            ("RUSTY_SOCKS_JWT_ISSUER", " https://idp.example/ "),
            ("RUSTY_SOCKS_JWT_AUDIENCE", "chat, admin"),
            ("RUSTY_SOCKS_JWT_REQUIRE_EXP", "true"),
            ("RUSTY_SOCKS_JWT_JWKS", "https://idp.example/jwks.json"),
            ("RUSTY_SOCKS_JWT_JWKS_REFRESH", "60"),
            ("RUSTY_SOCKS_JWT_JWKS_COOLDOWN", "5"),
        ])
        .expect("valid");
        assert_eq!(c.jwt_issuer.as_deref(), Some("https://idp.example/"));
        assert_eq!(c.jwt_audience, ["chat", "admin"]);
        assert!(c.jwt_require_exp);
        assert_eq!(
            c.jwt_jwks,
            Some(JwksSource::Url("https://idp.example/jwks.json".into()))
        );
        assert_eq!(
            (c.jwt_jwks_refresh, c.jwt_jwks_cooldown),
            (Duration::from_secs(60), Duration::from_secs(5))
        );
        let file = with(&[("RUSTY_SOCKS_JWT_JWKS", "/etc/rusty/jwks.json")]).expect("valid");
        assert_eq!(
            file.jwt_jwks,
            Some(JwksSource::File("/etc/rusty/jwks.json".into()))
        );
        let d = with(&[]).expect("defaults");
        assert!(!d.jwt_require_exp && d.jwt_audience.is_empty() && d.jwt_jwks.is_none());
    }

    #[test]
    fn bad_jwt_settings_name_the_variable() {
        let cases = [
            ("RUSTY_SOCKS_JWT_AUDIENCE", "a,,b"),
            ("RUSTY_SOCKS_JWT_REQUIRE_EXP", "sometimes"),
            ("RUSTY_SOCKS_JWT_JWKS", "https://"),
            ("RUSTY_SOCKS_JWT_JWKS", "http:///path-only"),
            ("RUSTY_SOCKS_JWT_JWKS_REFRESH", "0"),
            ("RUSTY_SOCKS_JWT_JWKS_REFRESH", "86401"),
            ("RUSTY_SOCKS_JWT_JWKS_COOLDOWN", "0"),
            ("RUSTY_SOCKS_JWT_JWKS_COOLDOWN", "30s"),
        ];
        for (var, value) in cases {
            let err = with(&[(var, value)]).expect_err(value);
            assert_eq!((err.var, err.value.as_str()), (var, value));
            assert!(err.to_string().contains(var), "{err}");
        }
    }

    #[test]
    fn ping_must_be_shorter_than_timeout() {
        let err = with(&[("RUSTY_SOCKS_PING", "60")]).expect_err("ping == timeout");
        assert_eq!(err.var, "RUSTY_SOCKS_PING");
    }

    #[test]
    fn data_dir_settings_are_read_and_checked() {
        let c = with(&[
            ("RUSTY_SOCKS_DATA_DIR", "/var/lib/rs"),
            ("RUSTY_SOCKS_FSYNC", "interval"),
            ("RUSTY_SOCKS_FSYNC_INTERVAL_MS", "250"),
            ("RUSTY_SOCKS_DATA_MAX_BYTES", "1000000"),
        ])
        .expect("valid");
        assert_eq!(c.data_dir, Some(PathBuf::from("/var/lib/rs")));
        assert_eq!(c.fsync, FsyncMode::Interval(Duration::from_millis(250)));
        assert_eq!(c.data_max_bytes, 1_000_000);
        assert_eq!(with(&[]).expect("defaults").fsync, FsyncMode::Always);
        for (var, value) in [
            ("RUSTY_SOCKS_FSYNC", "sometimes"),
            ("RUSTY_SOCKS_FSYNC_INTERVAL_MS", "0"),
            ("RUSTY_SOCKS_DATA_MAX_BYTES", "-1"),
            ("RUSTY_SOCKS_DATA_SEGMENT_BYTES", "10"),
        ] {
            assert_eq!(with(&[(var, value)]).expect_err(value).var, var);
        }
        let err = with(&[
            ("RUSTY_SOCKS_DATA_DIR", "/d"),
            ("RUSTY_SOCKS_BROKER", "redis://127.0.0.1:6379"),
        ])
        .expect_err("a networked broker keeps its own history");
        assert_eq!(err.var, "RUSTY_SOCKS_DATA_DIR");
        assert!(err.expected.contains("RUSTY_SOCKS_WEBHOOK_URL"), "{err:?}");
        with(&[
            ("RUSTY_SOCKS_DATA_DIR", "/d"),
            ("RUSTY_SOCKS_BROKER", "redis://127.0.0.1:6379"),
            ("RUSTY_SOCKS_WEBHOOK_URL", "http://127.0.0.1:9/hooks"),
            ("RUSTY_SOCKS_WEBHOOK_SECRET", "0123456789abcdef"),
        ])
        .expect("with webhooks it holds their queue");
    }
}
