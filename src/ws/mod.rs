//! WebSocket: handshake, frames, sessions, outboxes and the endpoints' behaviour.
//!
//! The server speaks RFC 6455 with its own small codec ([`frame`], [`reader`]) instead of a
//! general-purpose library; `docs/ARCHITECTURE.md` explains why.

pub mod chat;
pub mod close;
pub mod echo;
pub mod frame;
pub mod handshake;
pub mod outbox;
pub mod reader;
pub mod session;
pub mod transport;

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming as IncomingBody;
use hyper::header::{CONNECTION, SEC_WEBSOCKET_PROTOCOL, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::Instrument;
use uuid::Uuid;

use crate::auth::{self, Identity};
use crate::http::HttpError;
use crate::limits::client_ip;
use crate::server::AppState;
use crate::sessions::Registration;
use crate::stats::Refusal;
use chat::ChatHandler;
use echo::EchoHandler;
use outbox::Outbox;
use session::{Handler, SessionConfig, SessionParts};
use transport::Buffered;

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
/// the 101 is sent.
pub fn upgrade(
    mut req: Request<IncomingBody>,
    state: &Arc<AppState>,
    endpoint: Endpoint,
    peer: SocketAddr,
) -> Result<Response<Full<Bytes>>, HttpError> {
    let accept = handshake::accept(req.headers()).map_err(HttpError::Handshake)?;
    let refused = |why: Refusal, err: HttpError| {
        state.stats.refused(why);
        err
    };
    check_origin(req.headers(), &state.config.allowed_origins)
        .map_err(|err| refused(Refusal::Origin, err))?;
    let ip = client_ip(
        peer.ip(),
        req.headers()
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok()),
        &state.config.trusted_proxies,
    );
    if !state.connect_limiter.allow(ip) {
        return Err(refused(Refusal::RateLimited, HttpError::RateLimited));
    }
    let presented = auth::presented(req.headers(), req.uri().query());
    let identity = match (&state.verifier, endpoint) {
        (Some(verifier), Endpoint::Chat) => match &presented.token {
            // Boxed: the connection's task holds this until its session starts.
            Some(token) => Some(verifier.verify(token).map(Box::new).map_err(|err| {
                tracing::debug!(%err, %ip, "token refused");
                refused(Refusal::Unauthorized, HttpError::Unauthorized(err))
            })?),
            None if verifier.allow_anonymous => None,
            None => {
                return Err(refused(
                    Refusal::Unauthorized,
                    HttpError::Unauthorized(auth::AuthError::Missing),
                ));
            }
        },
        _ => None,
    };
    let permit = state
        .admission
        .try_connection()
        .map_err(|err| refused(Refusal::Overload, HttpError::Overloaded(err)))?;
    state.stats.connected();
    let on_upgrade = hyper::upgrade::on(&mut req);
    let state2 = Arc::clone(state);
    let client_id = Uuid::new_v4();
    // Debug level: an enabled span costs memory per connection for its whole life.
    let span = tracing::debug_span!("session", %client_id, ?endpoint);
    state.tracker.spawn(
        async move {
            let upgraded = match on_upgrade.await {
                Ok(upgraded) => upgraded,
                Err(err) => return tracing::debug!(%err, "upgrade did not complete"),
            };
            let _task = state2.stats.task();
            let _permit = permit;
            tracing::debug!("connected");
            let (session, _registration) =
                session(upgraded, &state2, endpoint, client_id, identity);
            session.await;
            tracing::debug!("disconnected");
        }
        .instrument(span),
    );
    let mut response = Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header("sec-websocket-accept", accept);
    if let Some(subprotocol) = presented.subprotocol {
        // A browser fails the handshake unless the server selects one of the offered ones.
        response = response.header(SEC_WEBSOCKET_PROTOCOL, subprotocol);
    }
    response
        .body(Full::default())
        .map_err(|_| HttpError::Internal)
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

/// The connection's session, ready to run.
///
/// Built synchronously and boxed as one future: arguments and captures of an async fn stay in
/// its state for its whole life, so layers of async calls would each keep a copy of what they
/// were handed in every connection's task. One boxed future holds exactly the session.
type SessionFuture = Pin<Box<dyn Future<Output = ()> + Send>>;

fn session(
    upgraded: hyper::upgrade::Upgraded,
    state: &Arc<AppState>,
    endpoint: Endpoint,
    client_id: Uuid,
    identity: Option<Box<Identity>>,
) -> (SessionFuture, Registration) {
    let config = &state.config;
    let (outbox, rx) = Outbox::new(client_id, config.buffer);
    let registration = state.sessions.register(outbox.clone());
    let session_config = SessionConfig::new(
        match endpoint {
            Endpoint::Chat => config.max_message_size,
            Endpoint::Echo => config.echo_max_message_size,
        },
        match endpoint {
            Endpoint::Chat => Some(config.ping_interval),
            Endpoint::Echo => None,
        },
        config.timeout,
        config.shutdown_grace,
    );
    match endpoint {
        Endpoint::Chat => {
            if let Some(identity) = &identity {
                state
                    .sessions
                    .set_user(&registration, Arc::clone(&identity.user));
            }
            let handler = ChatHandler::new(client_id, outbox, Arc::clone(&state.chat), identity);
            let parts = SessionParts::new(rx, handler, session_config, state);
            (on_socket(upgraded, parts), registration)
        }
        Endpoint::Echo => {
            // The echo endpoint has no fan-out; its outbox only carries signals.
            drop(outbox);
            let parts = SessionParts::new(rx, EchoHandler, session_config, state);
            (on_socket(upgraded, parts), registration)
        }
    }
}

/// Puts `parts` on the upgraded socket: for plain TCP, hyper gives the `TcpStream` back and
/// the session uses its zero-cost owned halves; anything else goes through `Buffered`.
fn on_socket<H: Handler + 'static>(
    upgraded: hyper::upgrade::Upgraded,
    parts: Box<SessionParts<H>>,
) -> SessionFuture {
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(raw) => Box::pin(parts.into_session(raw.io.into_inner()).run(raw.read_buf)),
        Err(upgraded) => Box::pin(
            parts
                .into_session(Buffered::new(TokioIo::new(upgraded)))
                .run(Bytes::new()),
        ),
    }
}
