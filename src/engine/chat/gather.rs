//! Legacy chat messages of one read, published together.
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
use crate::types::error::ClientError;

/// Legacy chat messages gathered during one read, in arrival order: what to publish, and
/// the errors to answer in between (a message refused by validation or the rate limit), so
/// every error frame keeps its place among the others.
#[derive(Debug, Default)]
pub(super) struct Gathered {
    data: Vec<Arc<RawValue>>,
    /// Each error with the number of messages gathered to publish before it.
    refused: Vec<(usize, ClientError)>,
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

    /// Publishes the gathered legacy chat messages as one pipeline and answers, in order,
    /// every error among them.
    pub(super) async fn publish_gathered(&mut self, out: &mut Replies<'_>) {
        let Some(gathered) = self.gathered.take() else {
            return;
        };
        let Gathered { data, refused } = *gathered;
        let results = if data.is_empty() {
            Vec::new()
        } else {
            let published = self.shared.node.publish_batch(
                DEFAULT_CHANNEL,
                data,
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
}
