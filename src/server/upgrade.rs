//! The WebSocket upgrade: every admission decision made while HTTP metadata is at hand (origin,
//! per-address rate, token, connection bound), the 101, and the start of the session on the
//! upgraded socket.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming as IncomingBody;
use hyper::header::{CONNECTION, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use uuid::Uuid;

use crate::auth::{self, Identity};
use crate::engine::admission::{AddressPermit, ConnectionPermit, Overload};
use crate::engine::backend::proxy::CONNECT_HEADERS;
use crate::engine::backend::{ConnectRefusal, ConnectRequest, Proxy};
use crate::engine::chat::{ChatHandler, Dialect};
use crate::engine::echo::EchoHandler;
use crate::engine::outbox::Outbox;
use crate::engine::session::{Guards, Handler, SessionConfig, SessionParts};
use crate::engine::stats::Refusal;
use crate::server::AppState;
use crate::server::http::HttpError;
use crate::server::limits::{client_ip, is_trusted};
use crate::types::ClientId;
use crate::ws::handshake;
use crate::ws::transport::Buffered;

/// Which WebSocket endpoint a request is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Endpoint {
    /// `/ws`: chat.
    Chat,
    /// `/echo`: conformance testing.
    Echo,
}

/// Answers an upgrade request: 101 and a spawned session, or the HTTP error that refuses it.
///
/// This is the last place with HTTP metadata, so every admission decision is made here, before
/// the 101 is sent. Async only for the token: a `kid` the server does not know yet makes it
/// fetch the JWKS again (bounded by a cooldown and a deadline) before answering.
pub async fn upgrade(
    mut req: Request<IncomingBody>,
    state: &Arc<AppState>,
    endpoint: Endpoint,
    peer: SocketAddr,
    slot: &UpgradeSlot,
) -> Result<Response<Full<Bytes>>, HttpError> {
    let accept = handshake::accept(req.headers()).map_err(HttpError::Handshake)?;
    let refused = |why: Refusal, err: HttpError| {
        state.stats.refused(why);
        err
    };
    // The list in force now: a reload may have changed it.
    check_origin(req.headers(), &state.live.load().allowed_origins)
        .map_err(|err| refused(Refusal::Origin, err))?;
    let ip = client_ip(
        peer.ip(),
        req.headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok()),
        &state.config.trusted_proxies,
    );
    let per_address = state.admission.per_address();
    if !state.connect_limiter.allow(per_address.group(ip)) {
        return Err(refused(Refusal::RateLimited, HttpError::RateLimited));
    }
    // A trusted proxy's sockets were not counted at accept (its address carries all its
    // clients): the connection counts under the forwarded client address instead, from here
    // until its session ends.
    let address = if is_trusted(peer.ip(), &state.config.trusted_proxies) {
        per_address
            .try_acquire(ip)
            .map_err(|_| refused(Refusal::Address, HttpError::Overloaded(Overload::Address)))?
    } else {
        None
    };
    // The connection bound before the identity: a full server answers 503 at once, without
    // asking the connect proxy or fetching keys for a connection it cannot take.
    let mut permit = state
        .admission
        .try_connection()
        .map_err(|err| refused(Refusal::Overload, HttpError::Overloaded(err)))?;
    let presented = super::token::presented(req.headers(), req.uri().query());
    let client_id = Uuid::new_v4();
    let proxy = &state.chat.proxy;
    let identity = if endpoint == Endpoint::Chat && proxy.options().connect_url.is_some() {
        // A valid token admits as before; anything else (no token, a bad one, no keys, or
        // every upgrade with CONNECT_ALWAYS) is the backend's decision.
        let verified = match (state.node.verifier(), &presented.token) {
            (Some(verifier), Some(token)) if !proxy.options().connect_always => {
                Box::pin(verifier.verify_fresh(token)).await.ok()
            }
            _ => None,
        };
        match verified {
            Some(identity) => Some(Box::new(identity)),
            _ => Box::pin(ask_backend(proxy, &req, ip, client_id))
                .await
                .map_err(|err| refused(Refusal::Proxy, err))?
                .map(Box::new),
        }
    } else {
        // The keys in force now (a reload may replace them); the identity stays the
        // connection's.
        match (state.node.verifier(), endpoint) {
            (Some(verifier), Endpoint::Chat) => match &presented.token {
                // Boxed: the JWKS wait is rare, and inline it would enlarge every HTTP phase.
                Some(token) => Some(
                    Box::pin(verifier.verify_fresh(token))
                        .await
                        .map(Box::new)
                        .map_err(|err| {
                            tracing::debug!(%err, %ip, "token refused");
                            refused(Refusal::Unauthorized, HttpError::Unauthorized(err))
                        })?,
                ),
                None if verifier.allow_anonymous => None,
                None => {
                    return Err(refused(
                        Refusal::Unauthorized,
                        HttpError::Unauthorized(auth::AuthError::Missing),
                    ));
                }
            },
            _ => None,
        }
    };
    permit.hold(address);
    state.stats.connected();
    let deflate = if state.config.compression {
        handshake::negotiate_deflate(
            req.headers(),
            crate::ws::deflate::DeflateSettings {
                level: u8::try_from(state.config.compression_level).unwrap_or(1),
                min_size: u32::try_from(state.config.compression_min_size).unwrap_or(u32::MAX),
            },
        )
    } else {
        None
    };
    let pending = Pending {
        on_upgrade: hyper::upgrade::on(&mut req),
        deflate: deflate.as_ref().map(|(d, _)| *d),
        endpoint,
        identity,
        v1: presented.v1,
        permit,
        client_id,
    };
    *slot
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = Some(pending);
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header("sec-websocket-accept", accept);
    if let Some(subprotocol) = presented.subprotocol {
        // A browser fails the handshake unless the server selects one of the offered ones.
        response = response.header(SEC_WEBSOCKET_PROTOCOL, subprotocol);
    }
    if let Some((_, answer)) = deflate {
        response = response.header("sec-websocket-extensions", answer);
    }
    response
        .body(Full::default())
        .map_err(|_| HttpError::Internal)
}

/// Asks the connect proxy about this upgrade: `Ok(None)` admits an anonymous connection.
async fn ask_backend(
    proxy: &Proxy,
    req: &Request<IncomingBody>,
    ip: IpAddr,
    client_id: ClientId,
) -> Result<Option<Identity>, HttpError> {
    let request = ConnectRequest {
        client: client_id,
        remote_addr: ip.to_string(),
        headers: CONNECT_HEADERS
            .iter()
            .filter_map(|name| {
                let value = req.headers().get(*name)?.to_str().ok()?;
                Some((*name, value.to_owned()))
            })
            .collect(),
        query: req.uri().query().unwrap_or_default().to_owned(),
    };
    proxy.connect(&request).await.map_err(|err| {
        tracing::debug!(%err, %ip, "connect proxy did not admit");
        match err {
            ConnectRefusal::Refused(why) => HttpError::ProxyRefused(why),
            ConnectRefusal::Unavailable(_) => HttpError::ProxyUnavailable,
        }
    })
}

/// Refuses a browser page from an origin not on the allow-list. Requests without `Origin`
/// (servers, command-line tools, native apps) are not browsers' and pass: the list protects
/// users' browsers from other sites, it is not authentication.
fn check_origin(headers: &hyper::HeaderMap, allowed: &[String]) -> Result<(), HttpError> {
    if allowed.is_empty() {
        return Ok(());
    }
    match headers.get(hyper::header::ORIGIN).map(|v| v.to_str()) {
        None => Ok(()),
        Some(Ok(origin))
            if allowed
                .iter()
                .any(|a| a.eq_ignore_ascii_case(origin.trim_end_matches('/'))) =>
        {
            Ok(())
        }
        Some(_) => Err(HttpError::OriginNotAllowed),
    }
}

/// An upgrade that was answered with 101; its session starts once hyper hands the socket over.
#[derive(Debug)]
pub struct Pending {
    on_upgrade: hyper::upgrade::OnUpgrade,
    endpoint: Endpoint,
    identity: Option<Box<Identity>>,
    /// The client offered `rusty-socks.v1`: a v1-only connection (see `ChatHandler::new`).
    v1: bool,
    permit: ConnectionPermit,
    /// permessage-deflate, as negotiated in the 101 answer.
    deflate: Option<crate::ws::deflate::Deflate>,
    /// The connection's id (chosen before the upgrade: the connect proxy is told it).
    client_id: ClientId,
}

/// Where [`upgrade`] leaves the accepted upgrade for the connection's HTTP task.
pub type UpgradeSlot = Arc<std::sync::Mutex<Option<Pending>>>;

/// Starts the session of an accepted upgrade as a task of its own; it keeps `address` (the
/// socket's count under its client address) until it ends.
///
/// The task's future is the session itself, unboxed, holding its guards: one allocation per
/// connection for its whole life. (A wrapper task awaiting a boxed session would cost a second
/// allocation and keep the wrapper's captures, and an async fn keeps its arguments in its state
/// for its whole life.) The HTTP task that calls this ends right after, freeing hyper's state.
pub async fn start(pending: Pending, state: &Arc<AppState>, address: Option<AddressPermit>) {
    let Pending {
        on_upgrade,
        endpoint,
        identity,
        v1,
        mut permit,
        deflate,
        client_id,
    } = pending;
    permit.hold(address);
    let upgraded = match on_upgrade.await {
        Ok(upgraded) => upgraded,
        Err(err) => return tracing::debug!(%err, "upgrade did not complete"),
    };
    let config = &state.config;
    let (outbox, rx) = Outbox::new(client_id, config.buffer);
    let registration = state.sessions.register(outbox.clone());
    if let Some(identity) = &identity {
        state
            .sessions
            .set_user(&registration, Arc::clone(&identity.user));
    }
    state.sessions.connected(&registration);
    let guards = Guards {
        registration,
        permit,
        task: state.stats.task(),
    };
    tracing::debug!(%client_id, ?endpoint, "connected");
    match endpoint {
        Endpoint::Chat => {
            let session_config = SessionConfig::new(
                config.max_message_size,
                Some(config.ping_interval),
                config.timeout,
                config.shutdown_grace,
            )
            .with_deflate(deflate)
            .with_write_delay(config.write_delay)
            .with_busy_write_delay(config.busy_write_delay);
            let dialect = if v1 { Dialect::V1 } else { Dialect::Legacy };
            let handler = ChatHandler::new(outbox, Arc::clone(&state.chat), identity, dialect);
            spawn_on_socket(upgraded, rx, handler, session_config, guards, state);
        }
        Endpoint::Echo => {
            // The echo endpoint has no fan-out; its outbox only carries signals.
            drop(outbox);
            let session_config = SessionConfig::new(
                config.echo_max_message_size,
                None,
                config.timeout,
                config.shutdown_grace,
            )
            .with_deflate(deflate);
            spawn_on_socket(upgraded, rx, EchoHandler, session_config, guards, state);
        }
    }
}

/// Puts a session of `handler` on the upgraded socket and spawns it: for plain TCP, hyper gives
/// the `TcpStream` back and the session polls it directly; anything else (TLS) goes through
/// `Buffered`.
fn spawn_on_socket<H: Handler + 'static>(
    upgraded: hyper::upgrade::Upgraded,
    rx: crate::engine::outbox::OutboxReceiver,
    handler: H,
    config: SessionConfig,
    guards: Guards,
    state: &AppState,
) {
    let parts = SessionParts::new(rx, handler, config, guards);
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(raw) => {
            let session = parts.into_session(raw.io.into_inner());
            state.tracker.spawn(session.run(raw.read_buf));
        }
        Err(upgraded) => {
            let session = parts.into_session(Buffered::new(TokioIo::new(upgraded)));
            state.tracker.spawn(session.run(Bytes::new()));
        }
    }
}
