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
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming as IncomingBody;
use hyper::header::{CONNECTION, UPGRADE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::Instrument;
use uuid::Uuid;

use crate::http::HttpError;
use crate::server::AppState;
use crate::sessions::Registration;
use chat::{ChatHandler, ChatLimits};
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
) -> Result<Response<Full<Bytes>>, HttpError> {
    let accept = handshake::accept(req.headers()).map_err(HttpError::Handshake)?;
    let permit = state
        .admission
        .try_connection()
        .map_err(HttpError::Overloaded)?;
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
            let (session, _registration) = session(upgraded, &state2, endpoint, client_id);
            session.await;
            tracing::debug!("disconnected");
        }
        .instrument(span),
    );
    Response::builder()
        .status(StatusCode::SWITCHING_PROTOCOLS)
        .header(UPGRADE, "websocket")
        .header(CONNECTION, "Upgrade")
        .header("sec-websocket-accept", accept)
        .body(Full::default())
        .map_err(|_| HttpError::Internal)
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
            // All three are bounded by configuration validation well below u32::MAX.
            let limits = ChatLimits {
                replay: u32::try_from(config.replay_count).unwrap_or(u32::MAX),
                max_channels: u32::try_from(config.max_channels).unwrap_or(u32::MAX),
                max_data: u32::try_from(config.max_data_size).unwrap_or(u32::MAX),
            };
            let handler = ChatHandler::new(client_id, outbox, Arc::clone(&state.node), limits);
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
