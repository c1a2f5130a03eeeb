//! Publishing several messages of one connection together (see [`Broker::publish_batch`]).

use std::sync::Arc;

use serde_json::value::RawValue;

use super::{Caller, Node};
use crate::broker::{Idempotency, PublishRequest, Published};
use crate::types::ClientId;
use crate::types::error::ClientError;

impl Node {
    /// Whether a connection should gather its messages for [`Node::publish_batch`] (the
    /// broker pipelines them) rather than publish each as it comes.
    pub fn pipelines_publish(&self) -> bool {
        self.broker.pipelines_publish()
    }

    /// Publishes `items` (data, idempotency key) on `channel`, in order, as one pipeline;
    /// one result per item, in order, each what [`Node::publish`] would have answered. The
    /// permission check is the same for every item (one channel, one caller), so it is made
    /// once.
    pub async fn publish_batch(
        &self,
        channel: &str,
        items: Vec<(Arc<RawValue>, Option<String>)>,
        client_id: Option<ClientId>,
        caller: Caller<'_>,
    ) -> Vec<Result<Published, ClientError>> {
        let count = items.len();
        let all = |err: ClientError| vec![Err(err); count];
        let options = match self.options(channel) {
            Ok(options) => options,
            Err(err) => return all(err),
        };
        if let Err(err) = caller.check(
            options.publish,
            channel,
            "this connection may not publish to this channel",
        ) {
            return all(err);
        }
        // One count for the batch: shutdown waits for its one broker call.
        let _in_flight = match self.enter_publish() {
            Ok(in_flight) => in_flight,
            Err(err) => return all(err),
        };
        let history = self.limits(&options);
        let requests = items
            .into_iter()
            .map(|(data, key)| PublishRequest {
                data,
                client_id,
                history,
                idempotency: key.map(|key| Idempotency {
                    key,
                    window: self.options.idempotency_window,
                }),
            })
            .collect();
        match self.broker.publish_batch(channel, requests).await {
            Ok(results) => results
                .into_iter()
                .map(|result| {
                    result
                        .map_err(|err| self.unavailable(&err))
                        .and_then(|published| self.confirm(published))
                })
                .collect(),
            // Counted once per message, as one by one.
            Err(err) => (0..count).map(|_| Err(self.unavailable(&err))).collect(),
        }
    }
}
