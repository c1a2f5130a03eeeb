//! Reloading settings without a restart: on SIGHUP and on `POST /api/reload`.
//!
//! A reload reads the settings again through the [`ReloadSource`] `main` hands in (the same
//! reader as at startup), compares them with the settings in force field by field, and:
//!
//! - applies the settings that can change live ([`FIELDS`] marks them): the namespaces and
//!   their options, the per-connection message rate and the per-address connect rate, the
//!   allowed origins, the JWT keys and claims rules, and the log filter ([`LogLevel`]);
//! - reports the others that changed as needing a restart, and leaves them as they are;
//! - changes nothing at all when the new settings are invalid (or a new key cannot be
//!   loaded), and reports why.
//!
//! Every decision reads the snapshot in force when it is made (a subscribe, a publish, an
//! upgrade), so existing connections keep what they have: their subscriptions, their identity.
//! Reloads run one at a time in one task (`run`), so two never interleave.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::Serialize;
use tokio::sync::{mpsc, oneshot};

use crate::auth::Verifier;
use crate::engine::namespace::NamespaceOptions;
use crate::engine::node::NodeLive;
use crate::server::AppState;
use crate::settings::Config;

/// Reads the settings again, as at startup: the settings, or every problem found.
pub type ReloadSource = Box<dyn Fn() -> Result<Config, Vec<String>> + Send + Sync>;

/// The log filter the reloaded settings ask for (`None`: leave the filter in force).
pub type WantedFilter = Box<dyn Fn(&Config) -> Option<String> + Send + Sync>;

/// Puts a log filter in force; an invalid one is an error and changes nothing.
pub type SetFilter = Box<dyn Fn(&str) -> Result<(), String> + Send + Sync>;

/// The log filter, which lives outside [`Config`] (the tracing subscriber `main` sets up).
pub struct LogLevel {
    /// The setting's name in reports and logs (`RUSTY_SOCKS_LOG_LEVEL`).
    pub name: &'static str,
    /// The filter the reloaded settings ask for; `None` leaves the filter in force.
    pub wanted: WantedFilter,
    /// Puts a filter in force; an invalid one is an error and changes nothing.
    pub set: SetFilter,
    /// The filter in force, as last set (or as at startup).
    pub current: String,
}

impl std::fmt::Debug for LogLevel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LogLevel")
            .field("name", &self.name)
            .field("current", &self.current)
            .finish_non_exhaustive()
    }
}

/// What a reload did, as `POST /api/reload` answers it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct ReloadReport {
    /// Settings that changed and are now in force.
    pub applied: Vec<String>,
    /// Settings that changed but need a restart; they keep their old values.
    pub needs_restart: Vec<String>,
}

/// Why a reload changed nothing.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ReloadError {
    /// The new settings are invalid (or a new key could not be loaded).
    #[error("the new settings are invalid, nothing changed: {}", .0.join("; "))]
    Invalid(Vec<String>),
    /// This server was started without a way to read its settings again.
    #[error("this server cannot reload its settings")]
    Unavailable,
}

/// Counts of reloads, for `/metrics`.
#[derive(Debug, Default)]
pub struct ReloadCounts {
    ok: AtomicU64,
    failed: AtomicU64,
}

impl ReloadCounts {
    /// Appends the Prometheus text of the counters to `out`.
    pub fn render(&self, out: &mut String) {
        out.push_str(
            "# HELP rusty_socks_reloads_total Settings reloads (SIGHUP, POST /api/reload) by outcome\n\
             # TYPE rusty_socks_reloads_total counter\n",
        );
        for (result, count) in [("ok", &self.ok), ("failed", &self.failed)] {
            out.push_str(&format!(
                "rusty_socks_reloads_total{{result=\"{result}\"}} {}\n",
                count.load(Ordering::Relaxed)
            ));
        }
    }
}

/// A reply to one reload request.
type Reply = oneshot::Sender<Result<ReloadReport, ReloadError>>;

/// Asks the reload task for a reload (cheap to clone; `POST /api/reload` holds one).
#[derive(Debug, Clone)]
pub struct Reloads {
    requests: mpsc::Sender<Reply>,
}

impl Reloads {
    /// Reloads now (after any reload under way) and returns what it did.
    pub async fn reload(&self) -> Result<ReloadReport, ReloadError> {
        let (reply, answer) = oneshot::channel();
        self.requests
            .send(reply)
            .await
            .map_err(|_| ReloadError::Unavailable)?;
        answer.await.unwrap_or(Err(ReloadError::Unavailable))
    }
}

/// What the reload task owns: how to read the settings, the log filter, what asks for reloads.
pub struct Reloader {
    source: ReloadSource,
    log: Option<LogLevel>,
    requests: mpsc::Receiver<Reply>,
    #[cfg(unix)]
    hangup: Option<tokio::signal::unix::Signal>,
}

impl Reloader {
    /// A reloader reading through `source`, and the handle that asks it to reload. On Unix,
    /// the SIGHUP handler is installed now: a SIGHUP from here on reloads instead of killing
    /// the process (once [`run`] runs; until then it waits).
    pub fn new(source: ReloadSource, log: Option<LogLevel>) -> (Self, Reloads) {
        let (tx, requests) = mpsc::channel(8);
        #[cfg(unix)]
        let hangup = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(err) => {
                tracing::warn!(%err, "cannot handle SIGHUP: reload with POST /api/reload");
                None
            }
        };
        let reloader = Self {
            source,
            log,
            requests,
            #[cfg(unix)]
            hangup,
        };
        (reloader, Reloads { requests: tx })
    }

    /// The next reload asked for: `Some(Some(reply))` from the API, `Some(None)` for a
    /// SIGHUP; `None` once nothing can ask any more.
    async fn next(&mut self) -> Option<Option<Reply>> {
        #[cfg(unix)]
        if let Some(hangup) = self.hangup.as_mut() {
            return tokio::select! {
                reply = self.requests.recv() => reply.map(Some),
                hup = hangup.recv() => hup.map(|()| None),
            };
        }
        self.requests.recv().await.map(Some)
    }
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("log", &self.log)
            .finish_non_exhaustive()
    }
}

/// Runs reloads, one at a time, until the server shuts down.
pub async fn run(state: Arc<AppState>, mut reloader: Reloader) {
    loop {
        let asked = tokio::select! {
            () = state.shutdown.cancelled() => return,
            asked = reloader.next() => asked,
        };
        let Some(reply) = asked else { return };
        if reply.is_none() {
            tracing::info!("SIGHUP received: reloading the settings");
        }
        let result = reload(&state, &mut reloader).await;
        match &result {
            Ok(_) => state.reload_counts.ok.fetch_add(1, Ordering::Relaxed),
            Err(_) => state.reload_counts.failed.fetch_add(1, Ordering::Relaxed),
        };
        if let Some(reply) = reply {
            // The asker may have given up (its API deadline); the reload stands anyway.
            let _ = reply.send(result);
        }
    }
}

/// One reload; see the module docs.
async fn reload(state: &AppState, reloader: &mut Reloader) -> Result<ReloadReport, ReloadError> {
    let next = match (reloader.source)() {
        Ok(next) => next,
        Err(errors) => {
            tracing::error!("reload refused, nothing changed: {}", errors.join("; "));
            return Err(ReloadError::Invalid(errors));
        }
    };
    let old = state.live.load_full();
    let mut report = ReloadReport::default();
    let mut applied = (*old).clone();
    let mut lines = Vec::new();
    for field in FIELDS {
        if !(field.differs)(&old, &next) {
            continue;
        }
        if field.log {
            // Reported below, once the filter is known to be in force.
            (field.take)(&mut applied, &next);
            continue;
        }
        let change = if field.secret {
            "(value redacted)".to_owned()
        } else if field.name == "namespaces" {
            old.namespaces.changes(&next.namespaces).join(", ")
        } else {
            format!("{} -> {}", (field.show)(&old), (field.show)(&next))
        };
        if field.live {
            (field.take)(&mut applied, &next);
            report.applied.push(field.var.to_owned());
            lines.push((true, field.var, change));
        } else {
            report.needs_restart.push(field.var.to_owned());
            lines.push((false, field.var, change));
        }
    }
    // Everything that can fail comes first, so a failure leaves every setting as it was.
    let keys_changed = FIELDS
        .iter()
        .any(|f| f.keys && report.applied.iter().any(|a| a == f.var));
    // A PEM key file replaced in place (same path, new key) is read again too: rotating it
    // and sending SIGHUP must put the new key in force.
    let reread = !keys_changed && applied.jwt_public_key.is_some();
    let verifier = if keys_changed || reread {
        match Verifier::load(&applied.key_options()).await {
            Ok(verifier) => Some(verifier.map(Arc::new)),
            Err(err) => {
                let errors = vec![err.to_string()];
                tracing::error!("reload refused, nothing changed: {}", errors[0]);
                return Err(ReloadError::Invalid(errors));
            }
        }
    } else {
        None
    };
    if let Some(log) = reloader.log.as_mut()
        && let Some(wanted) = (log.wanted)(&next).filter(|w| *w != log.current)
    {
        if let Err(err) = (log.set)(&wanted) {
            let errors = vec![format!("{}={wanted:?}: {err}", log.name)];
            tracing::error!("reload refused, nothing changed: {}", errors[0]);
            return Err(ReloadError::Invalid(errors));
        }
        let change = format!("{:?} -> {wanted:?}", log.current);
        log.current = wanted;
        report.applied.push(log.name.to_owned());
        lines.push((true, log.name, change));
    }
    apply(state, &applied, verifier);
    if reread {
        tracing::info!("reload: the RUSTY_SOCKS_JWT_PUBLIC_KEY file was read again");
    }
    for (live, var, change) in lines {
        if live {
            tracing::info!(setting = var, "reload: {var} applied: {change}");
        } else {
            tracing::warn!(
                setting = var,
                "reload: {var} changed but needs a restart; the old value stays: {change}"
            );
        }
    }
    tracing::info!(
        applied = report.applied.len(),
        needs_restart = report.needs_restart.len(),
        "reload done: {} applied, {} need a restart",
        report.applied.len(),
        report.needs_restart.len()
    );
    Ok(report)
}

/// Puts `applied` in force. `verifier` is `Some` when the keys changed (its inner `None`:
/// authentication is now off).
fn apply(state: &AppState, applied: &Config, verifier: Option<Option<Arc<Verifier>>>) {
    let keys_changed = verifier.is_some();
    let verifier = verifier.unwrap_or_else(|| state.node.verifier());
    if keys_changed {
        state.restart_jwks_refresh(verifier.as_deref());
    }
    state.node.replace_live(NodeLive {
        namespaces: applied.namespaces.clone(),
        legacy: NamespaceOptions::legacy_channel(
            &applied.namespaces.unnamed(),
            applied.history_size,
        ),
        verifier,
    });
    let limits = crate::engine::chat::ChatLimits {
        rate: applied.client_rate,
        burst: applied.client_burst,
        ..**state.chat.limits.load()
    };
    state.chat.limits.store(Arc::new(limits));
    state
        .connect_limiter
        .set(applied.connect_rate, applied.connect_burst);
    state.live.store(Arc::new(applied.clone()));
}

/// One [`Config`] field as a reload sees it.
pub struct Field {
    /// The field's name in [`Config`].
    pub name: &'static str,
    /// The setting's name in reports and logs.
    pub var: &'static str,
    /// Applied by a reload; otherwise it needs a restart.
    pub live: bool,
    /// One of the JWT settings: a change loads the keys again.
    keys: bool,
    /// The log filter: put in force (and reported) through [`LogLevel`], not by copying.
    log: bool,
    /// Its value is never logged.
    secret: bool,
    differs: fn(&Config, &Config) -> bool,
    take: fn(&mut Config, &Config),
    show: fn(&Config) -> String,
}

/// Declares [`FIELDS`]: `live`, `keys` (live, and loads the keys again), `log` (live, through
/// [`LogLevel`]) or `restart`, then
/// `secret` or `shown`, the setting's name and the field.
macro_rules! fields {
    ($($kind:ident $shown:ident $var:literal $field:ident,)*) => {
        /// Every [`Config`] field, whether a reload applies it, and how it is shown.
        pub const FIELDS: &[Field] = &[$(Field {
            name: stringify!($field),
            var: $var,
            live: fields!(@live $kind),
            keys: fields!(@keys $kind),
            log: fields!(@log $kind),
            secret: fields!(@secret $shown),
            differs: |a, b| a.$field != b.$field,
            take: |to, from| to.$field = from.$field.clone(),
            show: |c| format!("{:?}", c.$field),
        },)*];
    };
    (@live restart) => { false };
    (@live $other:ident) => { true };
    (@keys keys) => { true };
    (@keys $other:ident) => { false };
    (@log log) => { true };
    (@log $other:ident) => { false };
    (@secret secret) => { true };
    (@secret shown) => { false };
}

fields! {
    restart shown "RUSTY_SOCKS_HOST" host,
    restart shown "RUSTY_SOCKS_PORT" port,
    restart shown "RUSTY_SOCKS_MAX_CONN" max_connections,
    restart shown "RUSTY_SOCKS_BUFFER" buffer,
    restart shown "RUSTY_SOCKS_TIMEOUT" timeout,
    restart shown "RUSTY_SOCKS_PING" ping_interval,
    restart shown "RUSTY_SOCKS_WRITE_DELAY_MS" write_delay,
    restart shown "RUSTY_SOCKS_BUSY_WRITE_DELAY_MS" busy_write_delay,
    restart shown "RUSTY_SOCKS_THREAD_POOL_SIZE" worker_threads,
    restart shown "RUSTY_SOCKS_MAX_QUEUED_TASKS" max_queued_tasks,
    restart shown "RUSTY_SOCKS_MAX_MESSAGE_SIZE" max_message_size,
    restart shown "RUSTY_SOCKS_HISTORY_SIZE" history_size,
    restart shown "RUSTY_SOCKS_HISTORY_BYTES" history_bytes,
    restart shown "RUSTY_SOCKS_HISTORY_TOTAL_BYTES" history_total_bytes,
    restart shown "RUSTY_SOCKS_DATA_DIR" data_dir,
    restart shown "RUSTY_SOCKS_FSYNC" fsync,
    restart shown "RUSTY_SOCKS_DATA_MAX_BYTES" data_max_bytes,
    restart shown "RUSTY_SOCKS_DATA_SEGMENT_BYTES" data_segment_bytes,
    restart shown "RUSTY_SOCKS_REPLAY" replay_count,
    restart shown "RUSTY_SOCKS_ECHO_TO_SENDER" echo_to_sender,
    restart shown "RUSTY_SOCKS_ECHO_ENDPOINT" echo_endpoint,
    restart shown "RUSTY_SOCKS_ECHO_MAX_MESSAGE_SIZE" echo_max_message_size,
    restart shown "RUSTY_SOCKS_COMPRESSION" compression,
    restart shown "RUSTY_SOCKS_COMPRESSION_MIN_SIZE" compression_min_size,
    restart shown "RUSTY_SOCKS_COMPRESSION_LEVEL" compression_level,
    restart shown "RUSTY_SOCKS_HANDSHAKE_TIMEOUT" handshake_timeout,
    restart shown "RUSTY_SOCKS_SHUTDOWN_GRACE" shutdown_grace,
    live shown "RUSTY_SOCKS_NAMESPACES" namespaces,
    restart shown "RUSTY_SOCKS_MAX_CHANNELS" max_channels,
    restart shown "RUSTY_SOCKS_MAX_DATA_SIZE" max_data_size,
    restart secret "RUSTY_SOCKS_BROKER" broker,
    restart shown "RUSTY_SOCKS_BROKER_PREFIX" broker_prefix,
    restart shown "RUSTY_SOCKS_BROKER_TIMEOUT" broker_timeout,
    restart shown "RUSTY_SOCKS_PRESENCE_TTL" presence_ttl,
    restart shown "RUSTY_SOCKS_IDEMPOTENCY_WINDOW" idempotency_window,
    keys secret "RUSTY_SOCKS_JWT_SECRET" jwt_secret,
    keys shown "RUSTY_SOCKS_JWT_PUBLIC_KEY" jwt_public_key,
    keys secret "RUSTY_SOCKS_JWT_JWKS" jwt_jwks,
    keys shown "RUSTY_SOCKS_JWT_JWKS_REFRESH" jwt_jwks_refresh,
    keys shown "RUSTY_SOCKS_JWT_JWKS_COOLDOWN" jwt_jwks_cooldown,
    keys shown "RUSTY_SOCKS_JWT_ISSUER" jwt_issuer,
    keys shown "RUSTY_SOCKS_JWT_AUDIENCE" jwt_audience,
    keys shown "RUSTY_SOCKS_JWT_REQUIRE_EXP" jwt_require_exp,
    keys shown "RUSTY_SOCKS_ALLOW_ANONYMOUS" allow_anonymous,
    restart shown "RUSTY_SOCKS_REFRESH_WINDOW" refresh_window,
    restart secret "RUSTY_SOCKS_API_KEY" api_key,
    restart shown "RUSTY_SOCKS_API_TIMEOUT" api_timeout,
    live shown "RUSTY_SOCKS_ALLOWED_ORIGINS" allowed_origins,
    restart shown "RUSTY_SOCKS_TLS_CERT" tls_cert,
    restart shown "RUSTY_SOCKS_TLS_KEY" tls_key,
    restart shown "RUSTY_SOCKS_METRICS_ADDR" metrics_addr,
    live shown "RUSTY_SOCKS_CLIENT_RATE" client_rate,
    live shown "RUSTY_SOCKS_CLIENT_BURST" client_burst,
    live shown "RUSTY_SOCKS_CONNECT_RATE" connect_rate,
    live shown "RUSTY_SOCKS_CONNECT_BURST" connect_burst,
    restart shown "RUSTY_SOCKS_MAX_CONN_PER_IP" max_conn_per_ip,
    restart shown "RUSTY_SOCKS_IPV6_PREFIX" ipv6_prefix,
    restart shown "RUSTY_SOCKS_TRUSTED_PROXIES" trusted_proxies,
    // Every RUSTY_SOCKS_WEBHOOK_* setting, reported under the URL's name.
    restart secret "RUSTY_SOCKS_WEBHOOK_URL" webhook,
    restart shown "RUSTY_SOCKS_DEMO" demo,
    restart shown "RUSTY_SOCKS_LOG_FORMAT" log_format,
    log shown "RUSTY_SOCKS_LOG_LEVEL" log_level,
    restart shown "RUSTY_SOCKS_PROXY_CONNECT_URL" proxy,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A field added to [`Config`] must be classified here, or a reload would silently ignore
    /// it: compare the list with the fields `Config`'s `Debug` shows.
    #[test]
    fn every_config_field_is_classified() {
        let shown = format!("{:#?}", Config::default());
        let mut in_config: Vec<&str> = shown
            .lines()
            .filter_map(|line| line.strip_prefix("    "))
            .filter(|line| !line.starts_with(' '))
            .filter_map(|line| line.split_once(':').map(|(name, _)| name))
            .collect();
        let mut listed: Vec<&str> = FIELDS.iter().map(|f| f.name).collect();
        in_config.sort_unstable();
        listed.sort_unstable();
        assert_eq!(in_config, listed);
    }

    /// Every listed name is a real setting (the table `--help` and README show).
    #[test]
    fn every_name_is_a_setting() {
        for field in FIELDS {
            assert!(
                crate::settings::SETTINGS.iter().any(|s| s.var == field.var),
                "{} is not in SETTINGS",
                field.var
            );
        }
    }

    #[test]
    fn secrets_are_never_shown() {
        let secret = FIELDS
            .iter()
            .find(|f| f.name == "jwt_secret")
            .expect("listed");
        assert!(secret.secret && secret.live);
        let port = FIELDS.iter().find(|f| f.name == "port").expect("listed");
        assert!(!port.live && !port.secret);
    }
}
