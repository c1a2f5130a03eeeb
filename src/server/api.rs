//! The server HTTP API under `/api`, for the application's backend.
//!
//! Enabled by `RUSTY_SOCKS_API_KEY`; every request must carry `Authorization: apikey <key>`,
//! compared in constant time. Bodies are JSON, at most [`MAX_BODY`] bytes. Every error is
//! `{"error":{"code":..,"message":..}}` with a status from [`ApiError::status`], the one
//! mapping. `docs/openapi.yaml` describes every route; a test checks the server against it.

use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, WWW_AUTHENTICATE};
use hyper::{Method, Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use subtle::ConstantTimeEq;

use crate::broker::Published;
use crate::engine::node::Caller;
use crate::server::AppState;
use crate::types::error::ClientError;

/// Largest request body accepted, in bytes.
pub const MAX_BODY: usize = 1024 * 1024;

/// Most channels one `broadcast` may name.
pub const MAX_BROADCAST: usize = 1000;

/// Why an API request failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No `RUSTY_SOCKS_API_KEY` is configured.
    #[error("the server API is disabled (set RUSTY_SOCKS_API_KEY)")]
    Disabled,
    /// Missing or wrong `Authorization: apikey <key>`.
    #[error("missing or wrong API key (Authorization: apikey <key>)")]
    Unauthorized,
    /// No such route.
    #[error("no such API route")]
    NotFound,
    /// The route exists for other methods.
    #[error("method not allowed; use {0}")]
    MethodNotAllowed(&'static str),
    /// The body is larger than [`MAX_BODY`].
    #[error("request body larger than {MAX_BODY} bytes")]
    BodyTooLarge,
    /// The body is not JSON of the expected shape.
    #[error("bad JSON: {0}")]
    BadJson(String),
    /// A channel, namespace, limit or data value is not acceptable.
    #[error(transparent)]
    Client(#[from] ClientError),
    /// The request (its body and the work) took longer than `RUSTY_SOCKS_API_TIMEOUT`. A
    /// publish cut off this way may or may not have taken effect.
    #[error(
        "the request did not finish within RUSTY_SOCKS_API_TIMEOUT ({0} s); a publish or broadcast may or may not have taken effect"
    )]
    Timeout(u64),
    /// `POST /api/reload` on a server started without a way to read its settings again.
    #[error("this server cannot reload its settings")]
    ReloadUnavailable,
    /// `POST /api/reload` found the settings invalid (or a new key unloadable): nothing
    /// changed. Each entry names a problem (the setting, the value, what is accepted).
    #[error("the settings are invalid; nothing changed: {}", .0.join("; "))]
    InvalidConfig(Vec<String>),
}

impl ApiError {
    /// The HTTP status for this error.
    pub fn status(&self) -> StatusCode {
        match self {
            Self::Disabled | Self::NotFound | Self::ReloadUnavailable => StatusCode::NOT_FOUND,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::MethodNotAllowed(_) => StatusCode::METHOD_NOT_ALLOWED,
            Self::BodyTooLarge | Self::Client(ClientError::DataTooBig(_)) => {
                StatusCode::PAYLOAD_TOO_LARGE
            }
            Self::BadJson(_) => StatusCode::BAD_REQUEST,
            Self::Client(ClientError::Unavailable(_) | ClientError::ShuttingDown) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Client(ClientError::PresenceDisabled) => StatusCode::CONFLICT,
            Self::Client(ClientError::StorageFull(_)) => StatusCode::INSUFFICIENT_STORAGE,
            Self::Client(_) => StatusCode::BAD_REQUEST,
            Self::Timeout(_) => StatusCode::GATEWAY_TIMEOUT,
            // The request is fine; the settings it asks to load are not.
            Self::InvalidConfig(_) => StatusCode::UNPROCESSABLE_ENTITY,
        }
    }

    /// The stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Disabled => "api_disabled",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not_found",
            Self::MethodNotAllowed(_) => "method_not_allowed",
            Self::BodyTooLarge => "body_too_large",
            Self::BadJson(_) => "bad_json",
            Self::Client(err) => err.code(),
            Self::Timeout(_) => "timeout",
            Self::ReloadUnavailable => "reload_unavailable",
            Self::InvalidConfig(_) => "invalid_config",
        }
    }

    fn into_response(self) -> Response<Full<Bytes>> {
        let mut body =
            serde_json::json!({"error": {"code": self.code(), "message": self.to_string()}});
        if let Self::InvalidConfig(errors) = &self {
            body["error"]["errors"] = serde_json::json!(errors);
        }
        let mut response = json(self.status(), &body);
        let headers = response.headers_mut();
        match self {
            Self::MethodNotAllowed(allow) => {
                headers.insert(ALLOW, hyper::header::HeaderValue::from_static(allow));
            }
            Self::Unauthorized => {
                headers.insert(
                    WWW_AUTHENTICATE,
                    hyper::header::HeaderValue::from_static("apikey"),
                );
            }
            _ => {}
        }
        response
    }
}

fn json(status: StatusCode, body: &impl Serialize) -> Response<Full<Bytes>> {
    let text = serde_json::to_vec(body).unwrap_or_default();
    let mut response = Response::new(Full::new(Bytes::from(text)));
    *response.status_mut() = status;
    response.headers_mut().insert(
        CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    response
}

/// Answers one `/api` request within `RUSTY_SOCKS_API_TIMEOUT`, counted from the moment its
/// headers are in: a slow body or slow work gets a 504, never a silently closed socket.
pub async fn handle(req: Request<Incoming>, state: &Arc<AppState>) -> Response<Full<Bytes>> {
    let limit = state.config.api_timeout;
    let answered = tokio::time::timeout(limit, route(req, state))
        .await
        .unwrap_or_else(|_| Err(ApiError::Timeout(limit.as_secs())));
    match answered {
        Ok(response) => response,
        Err(err) => {
            tracing::debug!(%err, "api request refused");
            err.into_response()
        }
    }
}

fn authorized(req: &Request<Incoming>, key: &str) -> bool {
    let Some(given) = req
        .headers()
        .get(hyper::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("apikey "))
    else {
        return false;
    };
    bool::from(given.trim().as_bytes().ct_eq(key.as_bytes()))
}

async fn route(
    req: Request<Incoming>,
    state: &Arc<AppState>,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let key = state.config.api_key.as_ref().ok_or(ApiError::Disabled)?;
    if !authorized(&req, key.expose()) {
        return Err(ApiError::Unauthorized);
    }
    let path = req.uri().path().to_owned();
    let query = req.uri().query().map(str::to_owned);
    let method = req.method().clone();
    let route = path.strip_prefix("/api/").unwrap_or("");
    // Channel names may contain '/': everything after the route name is the channel.
    let (name, channel) = match route.split_once('/') {
        Some((name, channel)) => (name, Some(channel)),
        None => (route, None),
    };
    let get = method == Method::GET || method == Method::HEAD;
    match (name, channel) {
        ("publish" | "broadcast" | "disconnect" | "reload", None) if method != Method::POST => {
            Err(ApiError::MethodNotAllowed("POST"))
        }
        ("publish", None) => publish(body(req).await?, state).await,
        ("broadcast", None) => broadcast(body(req).await?, state).await,
        ("disconnect", None) => disconnect(body(req).await?, state).await,
        ("reload", None) => reload(state).await,
        ("presence" | "history", Some(_)) | ("channels", None) if !get => {
            Err(ApiError::MethodNotAllowed("GET"))
        }
        ("presence", Some(channel)) => presence(channel, state).await,
        ("history", Some(channel)) => history(channel, query.as_deref(), state).await,
        ("channels", None) => Ok(channels(state)),
        _ => Err(ApiError::NotFound),
    }
}

/// Reads the body, refusing more than [`MAX_BODY`] bytes (by `Content-Length` before reading,
/// and while reading for chunked bodies).
async fn body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(ApiError::BodyTooLarge);
    }
    let collected = Limited::new(req.into_body(), MAX_BODY)
        .collect()
        .await
        .map_err(|err| {
            if err.is::<http_body_util::LengthLimitError>() {
                ApiError::BodyTooLarge
            } else {
                ApiError::BadJson(format!("could not read the body: {err}"))
            }
        })?;
    Ok(collected.to_bytes())
}

fn parse<'a, T: Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    // Every request body is an object: serde would also fill a struct from an array of its
    // fields in order (`["alice"]` as `{"user":"alice"}`), which no client means.
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::BadJson(
            "the body must be a JSON object".to_owned(),
        ));
    }
    serde_json::from_slice(body).map_err(|e| ApiError::BadJson(e.to_string()))
}

fn checked_data(state: &AppState, data: &RawValue) -> Result<Arc<RawValue>, ApiError> {
    // As on the WebSocket: `null` is no data, and a publication always carries some.
    if data.get() == "null" {
        return Err(ClientError::MissingField("data").into());
    }
    if data.get().len() > state.config.max_data_size {
        return Err(ClientError::DataTooBig(state.config.max_data_size).into());
    }
    // Held to the WebSocket's rules: what is stored must parse again for every reader.
    crate::protocol::data::check_data(data.get()).map_err(ClientError::InvalidData)?;
    Ok(Arc::from(data.to_owned()))
}

/// An `idempotency_key`, checked as on the WebSocket (`invalid_field`, 400, if bad).
fn checked_key(key: Option<String>) -> Result<Option<String>, ApiError> {
    if let Some(key) = &key {
        crate::protocol::v1::check_idempotency_key(key)?;
    }
    Ok(key)
}

/// A publish's result: its position, and `"duplicate": true` when an idempotency key made it
/// return an earlier publish's position instead of publishing.
fn published_json(published: &Published) -> serde_json::Value {
    let mut body = serde_json::json!({
        "offset": published.position.offset,
        "epoch": published.position.epoch,
    });
    if published.duplicate {
        body["duplicate"] = serde_json::Value::Bool(true);
    }
    body
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishBody<'a> {
    channel: String,
    #[serde(borrow)]
    data: &'a RawValue,
    idempotency_key: Option<String>,
}

async fn publish(body: Bytes, state: &AppState) -> Result<Response<Full<Bytes>>, ApiError> {
    let request: PublishBody<'_> = parse(&body)?;
    let data = checked_data(state, request.data)?;
    let key = checked_key(request.idempotency_key)?;
    let published = state
        .node
        .publish(&request.channel, data, None, key, Caller::Server)
        .await?;
    Ok(json(StatusCode::OK, &published_json(&published)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BroadcastBody<'a> {
    channels: Vec<String>,
    #[serde(borrow)]
    data: &'a RawValue,
    /// Applies to each channel on its own: a retried broadcast publishes only where the
    /// first attempt did not.
    idempotency_key: Option<String>,
}

async fn broadcast(body: Bytes, state: &AppState) -> Result<Response<Full<Bytes>>, ApiError> {
    let request: BroadcastBody<'_> = parse(&body)?;
    if request.channels.is_empty() || request.channels.len() > MAX_BROADCAST {
        return Err(ApiError::BadJson(format!(
            "channels must list 1 to {MAX_BROADCAST} channels"
        )));
    }
    // What is wrong with the request as a whole fails it; what is wrong with one channel (a
    // bad name, an unknown namespace, the broker refusing it) is that channel's result, so a
    // caller learns exactly which channels got the publication and can retry only the rest.
    let data = checked_data(state, request.data)?;
    let key = checked_key(request.idempotency_key)?;
    let mut results = Vec::with_capacity(request.channels.len());
    for channel in &request.channels {
        let result = match state
            .node
            .publish(
                channel,
                Arc::clone(&data),
                None,
                key.clone(),
                Caller::Server,
            )
            .await
        {
            Ok(published) => {
                let mut result = published_json(&published);
                result["channel"] = serde_json::Value::from(channel.as_str());
                result
            }
            Err(err) => {
                serde_json::json!({"channel": channel, "error": {"code": err.code(), "message": err.to_string()}})
            }
        };
        results.push(result);
    }
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"results": results}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DisconnectBody {
    user: String,
}

async fn disconnect(body: Bytes, state: &AppState) -> Result<Response<Full<Bytes>>, ApiError> {
    let request: DisconnectBody = parse(&body)?;
    if request.user.is_empty() {
        return Err(ApiError::BadJson("user must not be empty".into()));
    }
    let here = state.sessions.disconnect_user(&request.user);
    // Other nodes close theirs when the notice reaches them through the broker.
    state.node.announce_disconnect(&request.user).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"user": request.user, "disconnected_here": here}),
    ))
}

async fn presence(channel: &str, state: &AppState) -> Result<Response<Full<Bytes>>, ApiError> {
    let channel = percent_decoded(channel)?;
    let clients = state.node.presence(&channel, Caller::Server).await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({"channel": channel, "clients": clients}),
    ))
}

async fn history(
    channel: &str,
    query: Option<&str>,
    state: &AppState,
) -> Result<Response<Full<Bytes>>, ApiError> {
    let channel = percent_decoded(channel)?;
    let limit = match crate::server::query::query_param(query, "limit") {
        None => None,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if n <= crate::protocol::v1::MAX_HISTORY_LIMIT => Some(n),
            _ => {
                return Err(ClientError::InvalidField {
                    field: "limit",
                    expected: "a whole number from 0 to 1000",
                }
                .into());
            }
        },
    };
    let page = state
        .node
        .history(&channel, None, limit, Caller::Server)
        .await?;
    Ok(json(
        StatusCode::OK,
        &serde_json::json!({
            "channel": channel,
            "offset": page.position.offset,
            "epoch": page.position.epoch,
            "publications": page.publications,
        }),
    ))
}

fn channels(state: &AppState) -> Response<Full<Bytes>> {
    let channels: Vec<serde_json::Value> = state
        .hub
        .channels()
        .into_iter()
        .map(|(channel, subscribers)| serde_json::json!({"channel": channel, "subscribers": subscribers}))
        .collect();
    json(StatusCode::OK, &serde_json::json!({"channels": channels}))
}

/// Channel names may contain `/` and `:`, which clients escape in a path segment.
fn percent_decoded(segment: &str) -> Result<String, ApiError> {
    crate::server::query::percent_decode(segment)
        .ok_or_else(|| ApiError::BadJson("bad %-escape in the channel name, or not UTF-8".into()))
}

/// `POST /api/reload`: reads the settings again and applies what can change live (see
/// `server::reload`). The body, if any, is ignored.
async fn reload(state: &Arc<AppState>) -> Result<Response<Full<Bytes>>, ApiError> {
    let reloads = state.reloads.get().ok_or(ApiError::ReloadUnavailable)?;
    match reloads.reload().await {
        Ok(report) => Ok(json(StatusCode::OK, &report)),
        Err(crate::server::reload::ReloadError::Invalid(errors)) => {
            Err(ApiError::InvalidConfig(errors))
        }
        Err(crate::server::reload::ReloadError::Unavailable) => Err(ApiError::ReloadUnavailable),
    }
}
