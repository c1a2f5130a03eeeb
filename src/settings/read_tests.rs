//! Tests of reading the settings (`read.rs`).

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

#[test]
fn the_write_delay_is_read_in_milliseconds_and_checked() {
    assert_eq!(with(&[]).expect("defaults").write_delay, Duration::ZERO);
    let c = with(&[("RUSTY_SOCKS_WRITE_DELAY_MS", "5")]).expect("valid");
    assert_eq!(c.write_delay, Duration::from_millis(5));
    assert_eq!(
        with(&[]).expect("defaults").busy_write_delay,
        Duration::from_millis(10)
    );
    let c = with(&[("RUSTY_SOCKS_BUSY_WRITE_DELAY_MS", "0")]).expect("valid");
    assert_eq!(c.busy_write_delay, Duration::ZERO);
    for var in [
        "RUSTY_SOCKS_WRITE_DELAY_MS",
        "RUSTY_SOCKS_BUSY_WRITE_DELAY_MS",
    ] {
        for value in ["101", "-1", "2ms", ""] {
            let err = with(&[(var, value)]).expect_err(value);
            assert_eq!(err.var, var);
            assert!(err.to_string().contains(var), "{err}");
        }
    }
}
