//! The proxy settings (`RUSTY_SOCKS_PROXY_*`), read and checked against the namespaces.

use std::time::Duration;

use super::ConfigError;
use super::read::{parse_bool, parse_int};
use crate::engine::backend::{BackendUrl, ProxyOptions};
use crate::engine::namespace::Namespaces;

/// Reads the proxy settings through `get`; an error names the variable.
pub(super) fn read(
    get: &impl Fn(&'static str) -> Option<(&'static str, String)>,
) -> Result<ProxyOptions, ConfigError> {
    let d = ProxyOptions::default();
    let url = |var: &'static str| -> Result<Option<BackendUrl>, ConfigError> {
        match get(var) {
            None => Ok(None),
            Some((_, v)) if v.trim().is_empty() => Ok(None),
            Some((var, v)) => BackendUrl::parse(&v).map(Some).map_err(|why| ConfigError {
                var,
                value: v.clone(),
                expected: format!("an http://host[:port]/path URL ({why})"),
            }),
        }
    };
    Ok(ProxyOptions {
        connect_url: url("RUSTY_SOCKS_PROXY_CONNECT_URL")?,
        connect_always: match get("RUSTY_SOCKS_PROXY_CONNECT_ALWAYS") {
            None => d.connect_always,
            Some((var, v)) => parse_bool(var, &v)?,
        },
        subscribe_url: url("RUSTY_SOCKS_PROXY_SUBSCRIBE_URL")?,
        publish_url: url("RUSTY_SOCKS_PROXY_PUBLISH_URL")?,
        timeout: match get("RUSTY_SOCKS_PROXY_TIMEOUT") {
            None => d.timeout,
            Some((var, v)) => Duration::from_secs(parse_int(var, &v, 1, 60)?),
        },
        max_concurrency: match get("RUSTY_SOCKS_PROXY_MAX_CONCURRENCY") {
            None => d.max_concurrency,
            Some((var, v)) => parse_int(var, &v, 1, 10_000)? as usize,
        },
    })
}

/// A namespace asking for a proxy whose URL is unset is a mistake: its subscriptions or
/// publications would all be refused.
pub(super) fn check_namespaces(
    proxy: &ProxyOptions,
    namespaces: &Namespaces,
) -> Result<(), ConfigError> {
    let (subscribe, publish) = namespaces.proxied();
    let missing = [
        (
            subscribe,
            "proxy_subscribe",
            &proxy.subscribe_url,
            "RUSTY_SOCKS_PROXY_SUBSCRIBE_URL",
        ),
        (
            publish,
            "proxy_publish",
            &proxy.publish_url,
            "RUSTY_SOCKS_PROXY_PUBLISH_URL",
        ),
    ];
    for (names, option, url, var) in missing {
        if url.is_none() && !names.is_empty() {
            return Err(ConfigError {
                var: "RUSTY_SOCKS_NAMESPACES",
                value: format!("namespaces {names:?} with \"{option}\": true"),
                expected: format!("{var} set, or no namespace with \"{option}\""),
            });
        }
    }
    if proxy.connect_always && proxy.connect_url.is_none() {
        return Err(ConfigError {
            var: "RUSTY_SOCKS_PROXY_CONNECT_ALWAYS",
            value: "true".into(),
            expected: "false unless RUSTY_SOCKS_PROXY_CONNECT_URL is set".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use crate::settings::Config;

    fn with(pairs: &[(&str, &str)]) -> Result<Config, crate::settings::ConfigError> {
        let map: HashMap<String, String> = pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        Config::from_lookup(|var| map.get(var).cloned())
    }

    #[test]
    fn proxy_settings_are_read_and_validated() {
        let c = with(&[
            (
                "RUSTY_SOCKS_PROXY_CONNECT_URL",
                "http://127.0.0.1:9000/connect",
            ),
            ("RUSTY_SOCKS_PROXY_CONNECT_ALWAYS", "true"),
            ("RUSTY_SOCKS_PROXY_SUBSCRIBE_URL", "http://backend/sub"),
            ("RUSTY_SOCKS_PROXY_TIMEOUT", "5"),
            ("RUSTY_SOCKS_PROXY_MAX_CONCURRENCY", "8"),
            (
                "RUSTY_SOCKS_NAMESPACES",
                r#"{"chat":{"proxy_subscribe":true}}"#,
            ),
        ])
        .expect("valid");
        assert_eq!(
            c.proxy.connect_url.as_ref().map(|u| u.as_str()),
            Some("http://127.0.0.1:9000/connect")
        );
        assert!(c.proxy.connect_always && c.proxy.publish_url.is_none());
        assert_eq!(c.proxy.timeout, std::time::Duration::from_secs(5));
        assert_eq!(c.proxy.max_concurrency, 8);
        let d = Config::default().proxy;
        assert_eq!((d.timeout.as_secs(), d.max_concurrency), (2, 64));
        assert!(d.connect_url.is_none() && !d.connect_always);

        for (var, value) in [
            ("RUSTY_SOCKS_PROXY_CONNECT_URL", "https://backend/connect"),
            ("RUSTY_SOCKS_PROXY_SUBSCRIBE_URL", "backend/sub"),
            ("RUSTY_SOCKS_PROXY_PUBLISH_URL", "http://"),
            ("RUSTY_SOCKS_PROXY_CONNECT_ALWAYS", "maybe"),
            ("RUSTY_SOCKS_PROXY_TIMEOUT", "0"),
            ("RUSTY_SOCKS_PROXY_TIMEOUT", "2s"),
            ("RUSTY_SOCKS_PROXY_MAX_CONCURRENCY", "0"),
        ] {
            let err = with(&[(var, value)]).expect_err(value);
            assert_eq!(err.var, var, "{value}");
        }
    }

    #[test]
    fn a_namespace_asking_for_an_unset_proxy_is_a_startup_error() {
        let err = with(&[(
            "RUSTY_SOCKS_NAMESPACES",
            r#"{"chat":{"proxy_publish":true}}"#,
        )])
        .expect_err("no publish URL");
        assert_eq!(err.var, "RUSTY_SOCKS_NAMESPACES");
        assert!(
            err.to_string().contains("RUSTY_SOCKS_PROXY_PUBLISH_URL"),
            "{err}"
        );
        let err = with(&[("RUSTY_SOCKS_PROXY_CONNECT_ALWAYS", "true")]).expect_err("no URL");
        assert_eq!(err.var, "RUSTY_SOCKS_PROXY_CONNECT_ALWAYS");
        assert!(
            err.to_string().contains("RUSTY_SOCKS_PROXY_CONNECT_URL"),
            "{err}"
        );
    }
}
