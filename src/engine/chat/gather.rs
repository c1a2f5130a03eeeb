//! Legacy chat messages (or v1 `publish` commands to one channel) of one read, published
//! together.
//!
//! With a networked broker each publish is a round trip. A client that sends several chat
//! messages at once has them gathered while the read is handled (rate limit and validation
//! still per message, as they come) and published as one pipeline at the read's end
//! ([`crate::engine::session::Handler::on_read_end`]), or before any other kind of message is handled: the
//! publications then reach every node together, and are delivered there in one batch.

use std::sync::Arc;

use serde_json::value::RawValue;

use super::ChatHandler;
use crate::engine::node::DEFAULT_CHANNEL;
use crate::engine::session::Replies;
use crate::protocol::legacy::ServerFrame;
use crate::protocol::v1::{Command, Frame, Parsed};
use crate::types::error::ClientError;

/// Legacy chat messages gathered during one read, in arrival order: what to publish, and
/// the errors to answer in between (a message refused by validation or the rate limit), so
/// every error frame keeps its place among the others. Or, for a v1 connection, its
/// consecutive `publish` commands to one channel, each answered with its own id.
#[derive(Debug, Default)]
pub(super) struct Gathered {
    data: Vec<Arc<RawValue>>,
    /// Each error with the number of messages gathered to publish before it.
    refused: Vec<(usize, ClientError)>,
    /// `Some` for v1 `publish` commands: their channel, and per command its id and key.
    v1: Option<V1Publishes>,
}

/// The v1 side of [`Gathered`].
#[derive(Debug)]
struct V1Publishes {
    channel: String,
    /// Per gathered command (in the order of `Gathered::data`): its id and idempotency key.
    commands: Vec<(Option<Box<RawValue>>, Option<String>)>,
}

impl ChatHandler {
    /// A legacy chat message of a read whose messages are published together: checked now
    /// (rate limit, validation), published by [`ChatHandler::publish_gathered`].
    pub(super) fn gather_legacy(&mut self, text: &str) {
        let outcome = match self.admission() {
            Ok(()) => self.legacy_data(text),
            Err(Some(err)) => Err(err),
            Err(None) => return,
        };
        let gathered = self.gathered.get_or_insert_with(Box::default);
        match outcome {
            Ok(Some(data)) => gathered.data.push(data),
            Ok(None) => {}
            Err(err) => gathered.refused.push((gathered.data.len(), err)),
        }
    }

    /// Gathers `parsed` if it is a v1 `publish` command that [`ChatHandler::gathers_v1`]
    /// takes, or answers its refusal by the rate limit (after what was gathered before it);
    /// `false`: it is for the ordinary way.
    pub(super) async fn gather_publish(
        &mut self,
        parsed: &Parsed<'_>,
        out: &mut Replies<'_>,
    ) -> bool {
        let Parsed::Command(
            id,
            Command::Publish {
                channel,
                data,
                idempotency_key,
            },
        ) = parsed
        else {
            return false;
        };
        if !self.gathers_v1(channel, data) {
            return false;
        }
        let refusal = match self.admission() {
            Ok(()) => {
                self.gather_v1(*id, channel, data, idempotency_key.clone());
                return true;
            }
            Err(refusal) => refusal,
        };
        if self.gathered.is_some() {
            Box::pin(self.publish_gathered(out)).await;
        }
        if let Some(err) = refusal {
            out.text(&Frame::error(*id, &err).to_json());
        }
        true
    }

    /// Whether a v1 `publish` command joins the ones gathered: `false` sends it the ordinary
    /// way (after those are published). Checks here only what the ordinary way would refuse
    /// it for at once, so its error is the same.
    pub(super) fn gathers_v1(&self, channel: &str, data: &RawValue) -> bool {
        self.check_publish(channel, data).is_ok()
            && self
                .node()
                .options(channel)
                .is_ok_and(|options| !options.proxy_publish)
            && self
                .gathered
                .as_ref()
                .is_none_or(|g| g.v1.as_ref().is_some_and(|v1| v1.channel == channel))
    }

    /// Gathers a v1 `publish` command that [`ChatHandler::gathers_v1`] took.
    pub(super) fn gather_v1(
        &mut self,
        id: Option<&RawValue>,
        channel: &str,
        data: &RawValue,
        idempotency_key: Option<String>,
    ) {
        let gathered = self.gathered.get_or_insert_with(|| {
            Box::new(Gathered {
                v1: Some(V1Publishes {
                    channel: channel.to_owned(),
                    commands: Vec::new(),
                }),
                ..Gathered::default()
            })
        });
        gathered.data.push(Arc::from(data.to_owned()));
        if let Some(v1) = &mut gathered.v1 {
            v1.commands
                .push((id.map(RawValue::to_owned), idempotency_key));
        }
    }

    /// Publishes what was gathered as one pipeline and answers, in order: for legacy chat,
    /// every error among them; for v1, every command.
    pub(super) async fn publish_gathered(&mut self, out: &mut Replies<'_>) {
        let Some(gathered) = self.gathered.take() else {
            return;
        };
        let Gathered { data, refused, v1 } = *gathered;
        if let Some(v1) = v1 {
            return self.publish_gathered_v1(data, v1, out).await;
        }
        let results = if data.is_empty() {
            Vec::new()
        } else {
            let published = self.shared.node.publish_batch(
                DEFAULT_CHANNEL,
                data.into_iter().map(|data| (data, None)).collect(),
                Some(self.client_id()),
                self.caller(),
            );
            Box::pin(published).await
        };
        let mut refused = refused.into_iter().peekable();
        for (index, result) in results.into_iter().map(Some).chain([None]).enumerate() {
            while let Some((_, err)) = refused.next_if(|(before, _)| *before <= index) {
                out.text(&ServerFrame::error(&err).to_json());
            }
            if let Some(Err(err)) = result {
                if matches!(err, ClientError::Unavailable(_)) {
                    tracing::warn!(%err, "legacy publish failed");
                }
                out.text(&ServerFrame::error(&err).to_json());
            }
        }
    }

    async fn publish_gathered_v1(
        &mut self,
        data: Vec<Arc<RawValue>>,
        v1: V1Publishes,
        out: &mut Replies<'_>,
    ) {
        let V1Publishes { channel, commands } = v1;
        let (ids, keys): (Vec<_>, Vec<_>) = commands.into_iter().unzip();
        let published = self.shared.node.publish_batch(
            &channel,
            data.into_iter().zip(keys).collect(),
            Some(self.client_id()),
            self.caller(),
        );
        let results = Box::pin(published).await;
        for (id, result) in ids.iter().zip(results) {
            let id = id.as_deref();
            match result {
                Ok(published) => out.text(&super::published_reply(id, &channel, &published)),
                Err(err) => out.text(&Frame::error(id, &err).to_json()),
            }
        }
    }
}
