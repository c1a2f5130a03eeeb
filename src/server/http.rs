//! HTTP routing: `/health`, `/stats`, and the WebSocket endpoints.
//!
//! Paths match exactly. [`HttpError`] is the one mapping from every refusal to its status.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONNECTION, CONTENT_TYPE, RETRY_AFTER, UPGRADE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};

use crate::auth::AuthError;
use crate::engine::admission::Overload;
use crate::server::AppState;
use crate::server::upgrade::{self, Endpoint};
use crate::ws::handshake::HandshakeError;

/// Every way an HTTP request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HttpError {
    /// No such path.
    #[error("not found")]
    NotFound,
    /// The path exists but not for this method; holds the methods it allows.
    #[error("method not allowed; use {0}")]
    MethodNotAllowed(&'static str),
    /// A WebSocket endpoint got a request it cannot upgrade.
    #[error("{0}")]
    Handshake(HandshakeError),
    /// An admission bound is reached.
    #[error("{}", .0.message())]
    Overloaded(Overload),
    /// The broker connection is down: this node cannot deliver across nodes right now.
    #[error("broker unavailable")]
    BrokerDown,
    /// No valid token where one is required, or an invalid one.
    #[error("unauthorized: {0}")]
    Unauthorized(AuthError),
    /// A browser page from an origin not in `RUSTY_SOCKS_ALLOWED_ORIGINS`.
    #[error("origin not allowed")]
    OriginNotAllowed,
    /// This client address opened connections faster than `RUSTY_SOCKS_CONNECT_RATE`.
    #[error("too many connection attempts from this address")]
    RateLimited,
    /// The connect proxy refused the upgrade (an `error` answer, a non-2xx, an unusable one).
    #[error("{0}")]
    ProxyRefused(String),
    /// The connect proxy did not answer within `RUSTY_SOCKS_PROXY_TIMEOUT` or is unreachable.
    #[error("the backend deciding connections is unavailable; try again later")]
    ProxyUnavailable,
    /// A response could not be built.
    #[error("internal error")]
    Internal,
}

impl HttpError {
    /// The status this refusal is answered with.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::Handshake(HandshakeError::NotAnUpgrade | HandshakeError::UnsupportedVersion) => {
                StatusCode::UPGRADE_REQUIRED
            }
            Self::Handshake(HandshakeError::MissingConnectionUpgrade | HandshakeError::BadKey) => {
                StatusCode::BAD_REQUEST
            }
            Self::Overloaded(Overload::Address) => StatusCode::TOO_MANY_REQUESTS,
            Self::Overloaded(_) | Self::BrokerDown => StatusCode::SERVICE_UNAVAILABLE,
            Self::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Self::OriginNotAllowed | Self::ProxyRefused(_) => StatusCode::FORBIDDEN,
            Self::ProxyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The plain-text response for this refusal.
    fn into_response(self) -> Response<Full<Bytes>> {
        let mut body = self.to_string();
        if !body.ends_with('\n') {
            body.push('\n');
        }
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(
            CONTENT_TYPE,
            "text/plain; charset=utf-8".parse().expect_static(),
        );
        match self {
            Self::MethodNotAllowed(allow) => {
                headers.insert(ALLOW, allow.parse().expect_static());
            }
            Self::Handshake(HandshakeError::NotAnUpgrade) => {
                headers.insert(UPGRADE, "websocket".parse().expect_static());
            }
            Self::Handshake(HandshakeError::UnsupportedVersion) => {
                headers.insert("sec-websocket-version", "13".parse().expect_static());
            }
            Self::Overloaded(_) | Self::BrokerDown | Self::RateLimited | Self::ProxyUnavailable => {
                headers.insert(RETRY_AFTER, "1".parse().expect_static());
            }
            Self::Unauthorized(_) => {
                headers.insert(WWW_AUTHENTICATE, "Bearer".parse().expect_static());
            }
            _ => {}
        }
        response
    }
}

/// Parsing a literal header value cannot fail; this keeps `unwrap` out of the code anyway.
trait ExpectStatic {
    fn expect_static(self) -> hyper::header::HeaderValue;
}

impl ExpectStatic for Result<hyper::header::HeaderValue, hyper::header::InvalidHeaderValue> {
    fn expect_static(self) -> hyper::header::HeaderValue {
        self.unwrap_or_else(|_| hyper::header::HeaderValue::from_static(""))
    }
}

/// The raw response written to a socket refused before its request is read: 503 for a global
/// bound, 429 for the client address's own bound, both with `Retry-After`.
pub fn raw_overload_response(overload: Overload) -> Vec<u8> {
    let body = overload.message();
    format!(
        "HTTP/1.1 {}\r\nretry-after: 1\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{}",
        overload.status_line(),
        body.len(),
        body
    )
    .into_bytes()
}

/// Routes one request from `peer`; an accepted WebSocket upgrade is left in `slot`.
pub async fn handle(
    req: Request<Incoming>,
    state: Arc<AppState>,
    peer: SocketAddr,
    slot: crate::server::upgrade::UpgradeSlot,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let mut response = route(req, &state, peer, &slot)
        .await
        .unwrap_or_else(HttpError::into_response);
    if response.status() != StatusCode::SWITCHING_PROTOCOLS {
        // One request per connection: an idle keep-alive socket would hold a task without
        // counting against either admission bound.
        response
            .headers_mut()
            .insert(CONNECTION, hyper::header::HeaderValue::from_static("close"));
    }
    Ok(response)
}

/// Whether `path` belongs to the server API (which has its own time bound).
pub fn is_api(path: &str) -> bool {
    path == "/api" || path.starts_with("/api/")
}

async fn route(
    req: Request<Incoming>,
    state: &Arc<AppState>,
    peer: SocketAddr,
    slot: &crate::server::upgrade::UpgradeSlot,
) -> Result<Response<Full<Bytes>>, HttpError> {
    let path = req.uri().path();
    if is_api(path) {
        // Boxed: inline, the API's future would enlarge every connection's HTTP phase.
        return Ok(Box::pin(crate::server::api::handle(req, state)).await);
    }
    if state.config.demo
        && let Some(page) = crate::server::demo::asset(path)
    {
        return get_only(&req).map(|()| page);
    }
    let endpoint = match path {
        "/health" => {
            get_only(&req)?;
            // Readiness: a node that lost its broker must not get new clients from a load
            // balancer, since what they publish would not reach other nodes.
            return if state.node.broker().status().connected {
                Ok(text("OK"))
            } else {
                Err(HttpError::BrokerDown)
            };
        }
        "/stats" => return get_only(&req).map(|()| stats(state)),
        "/metrics" if state.config.metrics_addr.is_none() => {
            return get_only(&req).map(|()| crate::server::metrics::response(state));
        }
        "/ws" => Endpoint::Chat,
        "/echo" if state.config.echo_endpoint => Endpoint::Echo,
        _ => return Err(HttpError::NotFound),
    };
    if req.method() != Method::GET {
        return Err(HttpError::MethodNotAllowed("GET"));
    }
    upgrade::upgrade(req, state, endpoint, peer, slot).await
}

fn get_only(req: &Request<Incoming>) -> Result<(), HttpError> {
    match *req.method() {
        Method::GET | Method::HEAD => Ok(()),
        _ => Err(HttpError::MethodNotAllowed("GET, HEAD")),
    }
}

fn text(body: &'static str) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    response
}

fn stats(state: &AppState) -> Response<Full<Bytes>> {
    let admission = &state.admission;
    let stats = &state.stats;
    let body = serde_json::json!({
        "worker_threads": state.config.worker_threads,
        "active_tasks": stats.active_tasks(),
        "connections": admission.connections(),
        "max_connections": admission.max_connections(),
        "queued": admission.pending(),
        "max_queued_tasks": admission.max_pending(),
        "rejected_total": admission.rejected_total(),
        "messages_in": stats.messages_in(),
        "messages_out": stats.messages_out(),
        "slow_consumer_closes_total": stats.slow_consumer_closes(),
        "notices_dropped_total": stats.notices_dropped_total(),
        "channels": state.hub.channel_count(),
        "broker": state.node.broker().status(),
        "uptime_s": stats.uptime_s(),
        "version": env!("CARGO_PKG_VERSION"),
    });
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}
