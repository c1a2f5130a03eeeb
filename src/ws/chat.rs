//! The `/ws` endpoint's behaviour: the legacy chat dialect and protocol v1 on one connection.
//!
//! Every connection joins [`DEFAULT_CHANNEL`] on open and gets the legacy welcome and replay.
//! A legacy chat message is published there; a v1 command acts on any channel. Mistakes get an
//! error frame (legacy `Error` or v1 `error`, matching what the client sent) and the connection
//! stays open.

use std::sync::Arc;

use bytes::Bytes;
use serde_json::value::RawValue;
use time::OffsetDateTime;

use super::outbox::{ClientId, Outbox};
use super::session::{Handler, Replies};
use crate::broker::ClientInfo;
use crate::error::ClientError;
use crate::history::continues_from;
use crate::hub::MemberState;
use crate::node::{DEFAULT_CHANNEL, Node};
use crate::protocol::legacy::{ServerFrame, parse_chat};
use crate::protocol::v1::{self, Command, Frame, Parsed};

/// Per-connection limits of the `/ws` endpoint.
#[derive(Debug, Clone, Copy)]
pub struct ChatLimits {
    /// Stored messages replayed after the welcome.
    pub replay: u32,
    /// Most channels one connection may be subscribed to.
    pub max_channels: u32,
    /// Largest `data` accepted in a v1 publish, in bytes.
    pub max_data: u32,
}

/// Handler for one `/ws` connection.
#[derive(Debug)]
pub struct ChatHandler {
    client: ClientInfo,
    outbox: Outbox,
    node: Arc<Node>,
    limits: ChatLimits,
    /// The membership of the default channel, which nearly every connection has: kept apart
    /// so the usual connection needs no list allocation at all.
    default: Option<Arc<MemberState>>,
    /// Other memberships (a few at most: a list beats a map here, and costs nothing until
    /// the first v1 subscription).
    others: Vec<Arc<MemberState>>,
}

impl ChatHandler {
    /// A handler for connection `client_id` whose fan-out goes to `outbox`.
    pub fn new(client_id: ClientId, outbox: Outbox, node: Arc<Node>, limits: ChatLimits) -> Self {
        Self {
            client: ClientInfo {
                client_id,
                user: None,
            },
            outbox,
            node,
            limits,
            default: None,
            others: Vec::new(),
        }
    }

    fn client_id(&self) -> ClientId {
        self.client.client_id
    }

    fn subscription_count(&self) -> usize {
        usize::from(self.default.is_some()) + self.others.len()
    }

    fn remember(&mut self, state: Arc<MemberState>) {
        if &*state.channel == DEFAULT_CHANNEL {
            self.default = Some(state);
        } else {
            self.others.push(state);
        }
    }

    fn forget(&mut self, channel: &str) {
        if channel == DEFAULT_CHANNEL {
            self.default = None;
        } else {
            self.others.retain(|s| &*s.channel != channel);
        }
    }

    fn membership(&self, channel: &str) -> Option<&Arc<MemberState>> {
        self.default
            .iter()
            .chain(self.others.iter())
            .find(|s| &*s.channel == channel)
    }

    async fn legacy_chat(&mut self, text: &str, out: &mut Replies<'_>) {
        let chat = match parse_chat(text, OffsetDateTime::now_utc()) {
            Ok(chat) => chat,
            Err(err) => return out.text(&ServerFrame::error(&err).to_json()),
        };
        // The legacy frame itself is the publication's data: stored once, replayed verbatim.
        let data = match RawValue::from_string(ServerFrame::Chat(&chat).to_json()) {
            Ok(raw) => Arc::from(raw),
            Err(_) => return,
        };
        let published = self
            .node
            .publish(DEFAULT_CHANNEL, data, Some(self.client_id()), false)
            .await;
        if let Err(err) = published {
            tracing::warn!(%err, "legacy publish failed");
            out.text(&ServerFrame::error(&err).to_json());
        }
    }

    async fn command(
        &mut self,
        id: Option<&RawValue>,
        command: Command<'_>,
        out: &mut Replies<'_>,
    ) -> Result<(), ClientError> {
        match command {
            Command::Subscribe { channel, since } => {
                if self.subscription_count() >= self.limits.max_channels as usize
                    && self.membership(&channel).is_none()
                {
                    return Err(ClientError::TooManyChannels(
                        self.limits.max_channels as usize,
                    ));
                }
                let sub = self
                    .node
                    .subscribe(&self.outbox, &self.client, &channel, since.as_ref(), 0)
                    .await?;
                out.text(
                    &Frame::Subscribed {
                        id,
                        channel: &channel,
                        offset: sub.position.offset,
                        epoch: &sub.position.epoch,
                        recovered: sub.recovered.unwrap_or(false),
                        publications: &sub.publications,
                    }
                    .to_json(),
                );
                sub.live.iter().for_each(|frame| out.frame(frame));
                self.remember(sub.state);
            }
            Command::Unsubscribe { channel } => {
                self.node
                    .unsubscribe(self.client_id(), &self.client, &channel, true)
                    .await?;
                self.forget(&channel);
                out.text(
                    &Frame::Unsubscribed {
                        id,
                        channel: &channel,
                    }
                    .to_json(),
                );
            }
            Command::Publish { channel, data } => {
                if data.get().len() > self.limits.max_data as usize {
                    return Err(ClientError::DataTooBig(self.limits.max_data as usize));
                }
                if channel == DEFAULT_CHANNEL {
                    return Err(ClientError::PermissionDenied(
                        "the default channel carries legacy chat; send a legacy message",
                    ));
                }
                let position = self
                    .node
                    .publish(
                        &channel,
                        Arc::from(data.to_owned()),
                        Some(self.client_id()),
                        true,
                    )
                    .await?;
                out.text(
                    &Frame::Published {
                        id,
                        channel: &channel,
                        offset: position.offset,
                    }
                    .to_json(),
                );
            }
            Command::Presence { channel } => {
                let clients = self.node.presence(&channel).await?;
                out.text(
                    &Frame::Presence {
                        id,
                        channel: &channel,
                        clients: &clients,
                    }
                    .to_json(),
                );
            }
            Command::History {
                channel,
                limit,
                since,
            } => {
                let page = self.node.history(&channel, since.as_ref(), limit).await?;
                let complete = since
                    .as_ref()
                    .map(|since| continues_from(since, &page.position, &page.publications));
                out.text(
                    &Frame::History {
                        id,
                        channel: &channel,
                        offset: page.position.offset,
                        epoch: &page.position.epoch,
                        publications: &page.publications,
                        complete,
                    }
                    .to_json(),
                );
            }
        }
        Ok(())
    }
}

impl Handler for ChatHandler {
    async fn on_open(&mut self, out: &mut Replies<'_>) {
        // Boxed: a connection's task would otherwise be as large as its biggest command
        // for its whole life, most of which is spent idle.
        Box::pin(async move {
            out.text(
                &ServerFrame::Connect {
                    client_id: self.client_id(),
                }
                .to_json(),
            );
            let joined = self
                .node
                .subscribe(
                    &self.outbox,
                    &self.client,
                    DEFAULT_CHANNEL,
                    None,
                    self.limits.replay as usize,
                )
                .await;
            match joined {
                Ok(sub) => {
                    for publication in &sub.publications {
                        out.text(publication.data.get());
                    }
                    sub.live.iter().for_each(|frame| out.frame(frame));
                    self.remember(sub.state);
                }
                Err(err) => {
                    tracing::warn!(%err, "could not join the default channel");
                    out.text(&ServerFrame::error(&err).to_json());
                }
            }
        })
        .await
    }

    async fn on_text(&mut self, text: Bytes, out: &mut Replies<'_>) {
        // Boxed: a connection's task would otherwise be as large as its biggest command
        // for its whole life, most of which is spent idle.
        Box::pin(async move {
            let Ok(text) = std::str::from_utf8(&text) else {
                return; // The session only hands over validated UTF-8.
            };
            match v1::parse(text) {
                Parsed::Legacy => self.legacy_chat(text, out).await,
                Parsed::Invalid(err) => out.text(&ServerFrame::error(&err).to_json()),
                Parsed::BadCommand(id, err) => out.text(&Frame::error(id, &err).to_json()),
                Parsed::Command(id, command) => {
                    if let Err(err) = self.command(id, command, out).await {
                        out.text(&Frame::error(id, &err).to_json());
                    }
                }
            }
        })
        .await
    }

    async fn on_binary(&mut self, _data: Bytes, out: &mut Replies<'_>) {
        out.text(&ServerFrame::error(&ClientError::BinaryNotSupported).to_json());
    }

    fn on_gaps(&mut self, out: &mut Replies<'_>) {
        for state in self.outbox.take_gaps() {
            let current = self.membership(&state.channel);
            if current.is_some_and(|s| Arc::ptr_eq(s, &state)) {
                out.text(
                    &Frame::Gap {
                        channel: &state.channel,
                        offset: state.last_offset(),
                    }
                    .to_json(),
                );
            }
            state.clear_gap();
        }
    }

    async fn on_close(&mut self, server_shutting_down: bool) {
        // Boxed: a connection's task would otherwise be as large as its biggest command
        // for its whole life, most of which is spent idle.
        Box::pin(async move {
            // On shutdown every client is leaving at once; N leave notices to N clients would be
            // N² frames for nobody.
            let announce = !server_shutting_down;
            let all = self
                .default
                .take()
                .into_iter()
                .chain(std::mem::take(&mut self.others));
            for state in all {
                let channel = &*state.channel;
                if let Err(err) = self
                    .node
                    .unsubscribe(self.client_id(), &self.client, channel, announce)
                    .await
                {
                    tracing::warn!(%err, channel, "unsubscribe on close failed");
                }
            }
        })
        .await
    }
}
