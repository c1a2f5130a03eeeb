//! The `/ws` endpoint's behaviour: the legacy chat dialect over the default channel.
//!
//! Every connection joins [`DEFAULT_CHANNEL`] on open. A chat message is stored and published
//! there; the sender gets no copy unless `RUSTY_SOCKS_ECHO_TO_SENDER` is set. Mistakes get an
//! `Error` frame and the connection stays open.

use std::sync::Arc;

use bytes::Bytes;
use time::OffsetDateTime;

use super::frame::{OpCode, encode};
use super::outbox::{ClientId, Outbox};
use super::session::{Handler, Replies};
use crate::broker::{Broker, Publication};
use crate::error::ClientError;
use crate::protocol::legacy::{ServerFrame, parse_chat};

/// The channel every `/ws` connection joins; legacy chat is published here.
pub const DEFAULT_CHANNEL: &str = "default";

/// Handler for one `/ws` connection.
#[derive(Debug)]
pub struct ChatHandler {
    /// This connection's id, sent in the welcome.
    pub client_id: ClientId,
    /// Sending side of this connection's own outbox, registered with the broker on open.
    pub outbox: Option<Outbox>,
    /// Where publications go.
    pub broker: Arc<dyn Broker>,
    /// Stored messages replayed after the welcome.
    pub replay: usize,
    /// Whether the sender gets its own messages back.
    pub echo_to_sender: bool,
}

impl ChatHandler {
    fn error(out: &mut Replies<'_>, err: &ClientError) {
        out.text(&ServerFrame::error(err).to_json());
    }
}

impl Handler for ChatHandler {
    async fn on_open(&mut self, out: &mut Replies<'_>) {
        out.text(
            &ServerFrame::Connect {
                client_id: self.client_id,
            }
            .to_json(),
        );
        let Some(outbox) = self.outbox.take() else {
            return;
        };
        match self
            .broker
            .subscribe(DEFAULT_CHANNEL, outbox, self.replay)
            .await
        {
            Ok(frames) => frames.iter().for_each(|f| out.frame(f)),
            Err(err) => {
                tracing::warn!(%err, "could not join the default channel");
                Self::error(out, &ClientError::Unavailable(err.to_string()));
            }
        }
    }

    async fn on_text(&mut self, text: Bytes, out: &mut Replies<'_>) {
        let Ok(text) = std::str::from_utf8(&text) else {
            // The session only hands over validated UTF-8; this is unreachable in practice.
            return Self::error(out, &ClientError::InvalidJson("not UTF-8".into()));
        };
        let chat = match parse_chat(text, OffsetDateTime::now_utc()) {
            Ok(chat) => chat,
            Err(err) => return Self::error(out, &err),
        };
        let frame = encode(OpCode::Text, ServerFrame::Chat(&chat).to_json().as_bytes());
        let publication = Publication {
            channel: DEFAULT_CHANNEL.to_owned(),
            frame,
            skip: (!self.echo_to_sender).then_some(self.client_id),
            persist: true,
        };
        if let Err(err) = self.broker.publish(publication).await {
            tracing::warn!(%err, "publish failed");
            Self::error(out, &ClientError::Unavailable(err.to_string()));
        }
    }

    async fn on_binary(&mut self, _data: Bytes, out: &mut Replies<'_>) {
        Self::error(out, &ClientError::BinaryNotSupported);
    }

    async fn on_close(&mut self, server_shutting_down: bool) {
        if let Err(err) = self
            .broker
            .unsubscribe(DEFAULT_CHANNEL, self.client_id)
            .await
        {
            tracing::warn!(%err, "unsubscribe failed");
        }
        // On shutdown every client is leaving at once; N disconnect notices to N clients would
        // be N² frames for nobody.
        if server_shutting_down {
            return;
        }
        let frame = encode(
            OpCode::Text,
            ServerFrame::Disconnect {
                client_id: self.client_id,
            }
            .to_json()
            .as_bytes(),
        );
        let publication = Publication {
            channel: DEFAULT_CHANNEL.to_owned(),
            frame,
            skip: Some(self.client_id),
            persist: false,
        };
        if let Err(err) = self.broker.publish(publication).await {
            tracing::warn!(%err, "could not announce disconnect");
        }
    }
}
