//! The proxy: the application's backend decides who connects (before the upgrade) and, per
//! namespace, who subscribes and what is published (see docs/BACKEND.md for the contract).
//!
//! Every call goes through the shared [`BackendClient`] (one deadline, bounded concurrency,
//! pooled connections). The answers map to one of two refusals: the backend said no (or its
//! answer was unusable) — HTTP 403 before an upgrade, `permission_denied` after — or the
//! backend could not be asked in time — HTTP 503 with `Retry-After`, `unavailable`.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

use super::client::{BackendClient, BackendError, BackendUrl, ClientOptions, DEFAULT_MAX_BODY};
use super::stats::{CallKind, Outcome, ProxyStats};
use crate::auth::Identity;
use crate::types::ClientId;
use crate::types::error::ClientError;

/// The proxy's settings (`RUSTY_SOCKS_PROXY_*`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProxyOptions {
    /// Asked about `/ws` upgrades without a valid token (or about all, with `connect_always`).
    pub connect_url: Option<BackendUrl>,
    /// Ask about every `/ws` upgrade, token or not.
    pub connect_always: bool,
    /// Asked about subscriptions in namespaces with `"proxy_subscribe": true`.
    pub subscribe_url: Option<BackendUrl>,
    /// Asked about publications in namespaces with `"proxy_publish": true`.
    pub publish_url: Option<BackendUrl>,
    /// Deadline of one call (waiting for a free slot included).
    pub timeout: Duration,
    /// Calls in flight at once toward the backend.
    pub max_concurrency: usize,
}

impl Default for ProxyOptions {
    fn default() -> Self {
        Self {
            connect_url: None,
            connect_always: false,
            subscribe_url: None,
            publish_url: None,
            timeout: Duration::from_secs(2),
            max_concurrency: 64,
        }
    }
}

/// Why the connect proxy did not admit a connection.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConnectRefusal {
    /// The backend refused (an `error` answer, a non-2xx status, an unusable answer): 403.
    #[error("refused by the backend: {0}")]
    Refused(String),
    /// The backend did not answer in time or could not be reached: 503 with `Retry-After`.
    #[error("the backend did not answer: {0}")]
    Unavailable(BackendError),
}

/// What an upgrade request shows the connect proxy.
#[derive(Debug, Serialize)]
pub struct ConnectRequest {
    /// The id the connection will have.
    pub client: ClientId,
    /// The client's address (the forwarded one behind a trusted proxy).
    pub remote_addr: String,
    /// `cookie`, `authorization`, `origin` and `user-agent`, those present.
    pub headers: BTreeMap<&'static str, String>,
    /// The raw query string (empty without one).
    pub query: String,
}

/// The request headers passed on to the connect proxy.
pub const CONNECT_HEADERS: [&str; 4] = ["cookie", "authorization", "origin", "user-agent"];

#[derive(Serialize)]
struct ChannelRequest<'a> {
    client: ClientId,
    user: Option<&'a str>,
    channel: &'a str,
    data: Option<&'a RawValue>,
}

/// `{"result":...}` or `{"error":...}`.
#[derive(Deserialize)]
struct Answer<R> {
    #[serde(default = "none")]
    result: Option<R>,
    #[serde(default = "none")]
    error: Option<BackendRefusal>,
}

fn none<T>() -> Option<T> {
    None
}

#[derive(Deserialize)]
struct BackendRefusal {
    #[serde(default)]
    code: Option<serde_json::Value>,
    #[serde(default)]
    message: Option<String>,
}

impl BackendRefusal {
    fn text(&self) -> String {
        match (&self.message, &self.code) {
            (Some(message), _) if !message.is_empty() => message.clone(),
            (_, Some(code)) => format!("refused by the backend (code {code})"),
            _ => "refused by the backend".to_owned(),
        }
    }
}

#[derive(Deserialize)]
struct ConnectResult {
    #[serde(default)]
    user: String,
    #[serde(default)]
    info: Option<Box<RawValue>>,
    #[serde(default)]
    channels: Vec<String>,
    #[serde(default)]
    expire_at: Option<u64>,
}

#[derive(Deserialize)]
struct ChannelResult {
    #[serde(default)]
    data: Option<Box<RawValue>>,
}

/// The proxy of one server: its options, the client toward the backend, its metrics.
#[derive(Debug)]
pub struct Proxy {
    options: ProxyOptions,
    client: BackendClient,
    stats: ProxyStats,
}

impl Proxy {
    /// A proxy calling the backend as `options` say.
    pub fn new(options: ProxyOptions) -> Self {
        let client = BackendClient::new(ClientOptions {
            timeout: options.timeout,
            max_concurrency: options.max_concurrency,
            max_body: DEFAULT_MAX_BODY,
        });
        Self {
            options,
            client,
            stats: ProxyStats::default(),
        }
    }

    /// Its options.
    pub fn options(&self) -> &ProxyOptions {
        &self.options
    }

    /// Its metrics.
    pub fn stats(&self) -> &ProxyStats {
        &self.stats
    }

    /// Asks the connect proxy; `Ok(None)` admits an anonymous connection (an empty `user`).
    pub async fn connect(
        &self,
        request: &ConnectRequest,
    ) -> Result<Option<Identity>, ConnectRefusal> {
        let Some(url) = &self.options.connect_url else {
            return Err(ConnectRefusal::Refused("no connect proxy".into()));
        };
        let body = serde_json::to_vec(request).unwrap_or_default();
        let answer = self
            .call::<ConnectResult>(CallKind::Connect, url, body)
            .await;
        let result = match answer {
            Ok(result) => result,
            Err(CallError::Refused(why)) => return Err(ConnectRefusal::Refused(why)),
            Err(CallError::Unavailable(err)) => return Err(ConnectRefusal::Unavailable(err)),
        };
        // 0 means "no expiry", as other servers' connect proxies answer it.
        let expire_at = result.expire_at.filter(|&at| at != 0);
        if let Some(expire_at) = expire_at
            && expire_at <= crate::types::clock::now_s()
        {
            return Err(ConnectRefusal::Refused(
                "the backend's expire_at has passed".into(),
            ));
        }
        if result.user.is_empty() {
            return Ok(None);
        }
        Ok(Some(Identity {
            user: Arc::from(result.user),
            channels: Arc::from(result.channels),
            info: result.info.map(Arc::from),
            expires_at: expire_at,
        }))
    }

    /// Asks the subscribe proxy whether `client` (as `user`) may subscribe to `channel`.
    pub async fn subscribe(
        &self,
        client: ClientId,
        user: Option<&str>,
        channel: &str,
        data: Option<&RawValue>,
    ) -> Result<(), ClientError> {
        let Some(url) = &self.options.subscribe_url else {
            return Err(not_configured("RUSTY_SOCKS_PROXY_SUBSCRIBE_URL"));
        };
        let body = serde_json::to_vec(&ChannelRequest {
            client,
            user,
            channel,
            data,
        })
        .unwrap_or_default();
        self.call::<ChannelResult>(CallKind::Subscribe, url, body)
            .await
            .map(drop)
            .map_err(CallError::into_client_error)
    }

    /// Asks the publish proxy whether `client` may publish `data` on `channel`; `Some` is the
    /// data the backend publishes instead.
    pub async fn publish(
        &self,
        client: ClientId,
        user: Option<&str>,
        channel: &str,
        data: &RawValue,
    ) -> Result<Option<Box<RawValue>>, ClientError> {
        let Some(url) = &self.options.publish_url else {
            return Err(not_configured("RUSTY_SOCKS_PROXY_PUBLISH_URL"));
        };
        let body = serde_json::to_vec(&ChannelRequest {
            client,
            user,
            channel,
            data: Some(data),
        })
        .unwrap_or_default();
        let result = self
            .call::<ChannelResult>(CallKind::Publish, url, body)
            .await
            .map_err(CallError::into_client_error)?;
        if let Some(data) = &result.data {
            crate::protocol::data::check_data(data.get()).map_err(ClientError::InvalidData)?;
        }
        Ok(result.data)
    }

    /// One call: the answer's `result`, or why there is none; counted and timed.
    async fn call<R: serde::de::DeserializeOwned>(
        &self,
        kind: CallKind,
        url: &BackendUrl,
        body: Vec<u8>,
    ) -> Result<R, CallError> {
        let started = Instant::now();
        let answer = self
            .client
            .post_json::<Answer<R>>(url, Bytes::from(body), &[])
            .await;
        let (outcome, result) = match answer {
            Ok(Answer {
                error: Some(refusal),
                ..
            }) => (Outcome::Refused, Err(CallError::Refused(refusal.text()))),
            Ok(Answer {
                result: Some(result),
                ..
            }) => (Outcome::Allowed, Ok(result)),
            Ok(Answer { .. }) => (
                Outcome::Error,
                Err(CallError::Refused(
                    "the backend's answer has neither result nor error".into(),
                )),
            ),
            Err(err) if err.is_timeout() => (Outcome::Timeout, Err(CallError::Unavailable(err))),
            Err(err) if err.is_unavailable() => (Outcome::Error, Err(CallError::Unavailable(err))),
            Err(err) => (Outcome::Error, Err(CallError::Refused(err.to_string()))),
        };
        self.stats.record(kind, outcome, started.elapsed());
        if let Err(err) = &result {
            tracing::debug!(
                kind = kind.label(),
                url = url.for_logs(),
                ?err,
                "proxy call did not allow"
            );
        }
        result
    }
}

#[derive(Debug)]
enum CallError {
    Refused(String),
    Unavailable(BackendError),
}

impl CallError {
    fn into_client_error(self) -> ClientError {
        match self {
            Self::Refused(why) => ClientError::RefusedByBackend(why),
            Self::Unavailable(err) => ClientError::Unavailable(err.to_string()),
        }
    }
}

/// A namespace asks for a proxy whose URL a reload set but a restart has not applied yet.
fn not_configured(var: &str) -> ClientError {
    ClientError::Unavailable(format!(
        "the namespace asks the backend, but {var} is not in force (restart to apply it)"
    ))
}
