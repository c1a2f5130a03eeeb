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

use crate::admission::ConnectionPermit;
use crate::http::HttpError;
use crate::server::AppState;
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
            match on_upgrade.await {
                Ok(upgraded) => run(upgraded, state2, endpoint, client_id, permit).await,
                Err(err) => tracing::debug!(%err, "upgrade did not complete"),
            }
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

async fn run(
    upgraded: hyper::upgrade::Upgraded,
    state: Arc<AppState>,
    endpoint: Endpoint,
    client_id: Uuid,
    _permit: ConnectionPermit,
) {
    let _task = state.stats.task();
    let config = &state.config;
    let (outbox, rx) = Outbox::new(client_id, config.buffer);
    let session_config = SessionConfig {
        max_message: match endpoint {
            Endpoint::Chat => config.max_message_size,
            Endpoint::Echo => config.echo_max_message_size,
        },
        ping_interval: match endpoint {
            Endpoint::Chat => Some(config.ping_interval),
            Endpoint::Echo => None,
        },
        timeout: config.timeout,
        close_grace: config.shutdown_grace,
    };
    tracing::debug!("connected");
    match endpoint {
        Endpoint::Chat => {
            let limits = ChatLimits {
                replay: config.replay_count,
                max_channels: config.max_channels,
                max_data: config.max_data_size,
            };
            let handler = ChatHandler::new(client_id, outbox, Arc::clone(&state.node), limits);
            let parts = SessionParts::new(rx, handler, session_config, &state);
            drive(upgraded, parts).await;
        }
        Endpoint::Echo => {
            // The echo endpoint has no fan-out; its outbox sender only keeps the queue open.
            let _keep = outbox;
            // The test-only endpoint is boxed so it does not enlarge every `/ws` task.
            let parts = SessionParts::new(rx, EchoHandler, session_config, &state);
            Box::pin(drive(upgraded, parts)).await;
        }
    }
    tracing::debug!("disconnected");
}

/// Runs a session on an upgraded connection. `parts` arrives boxed: arguments of an async fn
/// stay in its state for its whole life, and this one lives as long as the connection.
async fn drive<H: Handler>(upgraded: hyper::upgrade::Upgraded, parts: Box<SessionParts<H>>) {
    // Plain TCP: take the socket back from hyper and use its zero-cost owned halves.
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(raw) => {
            let (reader, writer) = raw.io.into_inner().into_split();
            let mut session = parts.into_session(reader, writer);
            session.run(raw.read_buf).await;
        }
        Err(upgraded) => {
            // Never taken for plain TCP; boxed so it does not enlarge every TCP session's task.
            Box::pin(async move {
                let (reader, writer) = tokio::io::split(TokioIo::new(upgraded));
                let mut session = parts.into_session(Buffered::new(reader), writer);
                session.run(Bytes::new()).await;
            })
            .await;
        }
    }
}
