//! Reading the webhook settings (`RUSTY_SOCKS_WEBHOOK_*`).

use std::time::Duration;

use super::ConfigError;
use super::read::{parse_int, secret};
use crate::engine::backend::BackendUrl;
use crate::engine::webhook::{EventName, EventSet, WebhookOptions};

/// Reads and checks the webhook settings through `get`; a URL without a secret is an error
/// naming `RUSTY_SOCKS_WEBHOOK_SECRET` (unsigned webhooks could be forged by anyone who can
/// reach the backend).
pub(super) fn read(
    get: &impl Fn(&'static str) -> Option<(&'static str, String)>,
) -> Result<WebhookOptions, ConfigError> {
    let d = WebhookOptions::default();
    let url = match get("RUSTY_SOCKS_WEBHOOK_URL") {
        None => None,
        Some((_, v)) if v.trim().is_empty() => None,
        Some((var, v)) => Some(BackendUrl::parse(&v).map_err(|why| ConfigError {
            var,
            value: v.clone(),
            expected: format!("an http://host[:port]/path URL ({why})"),
        })?),
    };
    let secret = secret(get("RUSTY_SOCKS_WEBHOOK_SECRET"), 16)?;
    let events = match get("RUSTY_SOCKS_WEBHOOK_EVENTS") {
        None => d.events,
        Some((var, v)) => {
            let names: Vec<&str> = v.split(',').map(str::trim).collect();
            let parsed: Option<Vec<EventName>> =
                names.iter().map(|n| EventName::parse(n)).collect();
            match parsed {
                Some(list) if !list.is_empty() => EventSet::of(list),
                _ => {
                    let all: Vec<&str> =
                        EventName::ALL.into_iter().map(EventName::as_str).collect();
                    return Err(ConfigError {
                        var,
                        value: v.clone(),
                        expected: format!("a comma-separated list of {}", all.join(", ")),
                    });
                }
            }
        }
    };
    let secs = |var: &'static str, default: Duration, max: u64| match get(var) {
        None => Ok(default),
        Some((var, v)) => parse_int(var, &v, 1, max).map(Duration::from_secs),
    };
    let batch = match get("RUSTY_SOCKS_WEBHOOK_BATCH") {
        None => d.batch,
        Some((var, v)) => parse_int(var, &v, 1, 10_000)? as usize,
    };
    let max_age = secs("RUSTY_SOCKS_WEBHOOK_MAX_AGE", d.max_age, 7 * 86_400)?;
    let timeout = secs("RUSTY_SOCKS_WEBHOOK_TIMEOUT", d.timeout, 300)?;
    // Checked last, so the other settings' mistakes are reported along with it.
    if url.is_some() && secret.is_none() {
        return Err(ConfigError {
            var: "RUSTY_SOCKS_WEBHOOK_SECRET",
            value: String::new(),
            expected: "a secret of at least 16 bytes when RUSTY_SOCKS_WEBHOOK_URL is set (it signs every POST)".into(),
        });
    }
    Ok(WebhookOptions {
        url,
        secret,
        events,
        batch,
        max_age,
        timeout,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn with(pairs: &[(&'static str, &str)]) -> Result<WebhookOptions, ConfigError> {
        let map: HashMap<&'static str, String> =
            pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect();
        read(&|var| map.get(var).map(|v| (var, v.clone())))
    }

    #[test]
    fn defaults_are_off_with_the_four_channel_and_member_events() {
        let options = with(&[]).expect("test setup");
        assert_eq!(options, WebhookOptions::default());
        assert!(options.url.is_none());
        assert_eq!(options.events, EventSet::DEFAULT);
    }

    #[test]
    fn a_url_needs_a_secret_of_sixteen_bytes() {
        let err =
            with(&[("RUSTY_SOCKS_WEBHOOK_URL", "http://127.0.0.1:9/hook")]).expect_err("an error");
        assert_eq!(err.var, "RUSTY_SOCKS_WEBHOOK_SECRET");
        let err = with(&[
            ("RUSTY_SOCKS_WEBHOOK_URL", "http://127.0.0.1:9/hook"),
            ("RUSTY_SOCKS_WEBHOOK_SECRET", "short"),
        ])
        .expect_err("an error");
        assert_eq!(err.var, "RUSTY_SOCKS_WEBHOOK_SECRET");
        assert_eq!(err.value, "***");
        let ok = with(&[
            ("RUSTY_SOCKS_WEBHOOK_URL", "http://127.0.0.1:9/hook"),
            ("RUSTY_SOCKS_WEBHOOK_SECRET", "0123456789abcdef"),
        ])
        .expect("test setup");
        assert_eq!(
            ok.url.expect("test setup").as_str(),
            "http://127.0.0.1:9/hook"
        );
    }

    #[test]
    fn bad_urls_unknown_events_and_ranges_name_their_setting() {
        for (var, value) in [
            ("RUSTY_SOCKS_WEBHOOK_URL", "ftp://x/"),
            ("RUSTY_SOCKS_WEBHOOK_URL", "https://example.com/hook"),
            (
                "RUSTY_SOCKS_WEBHOOK_EVENTS",
                "channel_occupied,channel_exploded",
            ),
            ("RUSTY_SOCKS_WEBHOOK_EVENTS", ""),
            ("RUSTY_SOCKS_WEBHOOK_BATCH", "0"),
            ("RUSTY_SOCKS_WEBHOOK_MAX_AGE", "0"),
            ("RUSTY_SOCKS_WEBHOOK_TIMEOUT", "301"),
        ] {
            let err = with(&[(var, value)]).expect_err("an error");
            assert_eq!(err.var, var, "{value}");
        }
        let events = with(&[(
            "RUSTY_SOCKS_WEBHOOK_EVENTS",
            " client_connected , member_added",
        )])
        .expect("test setup")
        .events;
        assert!(events.contains(EventName::ClientConnected));
        assert!(events.contains(EventName::MemberAdded));
        assert!(!events.contains(EventName::ChannelOccupied));
    }
}
