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
    let span = tracing::info_span!("session", %client_id, ?endpoint);
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
    let signal = Arc::clone(outbox.signals());
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
            drive(upgraded, &state, rx, signal, handler, session_config).await;
        }
        Endpoint::Echo => {
            // The echo endpoint has no fan-out; its outbox sender only keeps the queue open.
            let _keep = outbox;
            drive(upgraded, &state, rx, signal, EchoHandler, session_config).await;
        }
    }
    tracing::debug!("disconnected");
}

async fn drive<H: Handler>(
    upgraded: hyper::upgrade::Upgraded,
    state: &Arc<AppState>,
    outbox: tokio::sync::mpsc::Receiver<Bytes>,
    signal: Arc<outbox::Signals>,
    handler: H,
    config: SessionConfig,
) {
    let parts = SessionParts {
        outbox,
        signal,
        handler,
        config,
        shutdown: state.shutdown.clone(),
        stats: Arc::clone(&state.stats),
    };
    // Plain TCP: take the socket back from hyper and use its zero-cost owned halves.
    match upgraded.downcast::<TokioIo<TcpStream>>() {
        Ok(raw) => {
            let (reader, writer) = raw.io.into_inner().into_split();
            parts.run(reader, writer, raw.read_buf).await;
        }
        Err(upgraded) => {
            let (reader, writer) = tokio::io::split(TokioIo::new(upgraded));
            parts.run(reader, writer, Bytes::new()).await;
        }
    }
}
