//! Presence in the KV bucket: one key per channel and client, written, removed and listed
//! here, and re-put every TTL / 3 by the node that wrote it (the refresh run by the
//! maintenance task), so a dead node's entries expire within the TTL.
//!
//! Kept apart because presence shares nothing with history or live delivery but the
//! connection.

use std::collections::HashSet;

use async_nats::jetstream;
use async_nats::jetstream::consumer::DeliverPolicy;
use futures_util::StreamExt;

use super::{Inner, ensure, read, token, unavailable};
use crate::broker::{BrokerError, ClientInfo};
use crate::types::ClientId;

fn is_kv_removal(message: &jetstream::Message) -> bool {
    message
        .headers
        .as_ref()
        .and_then(|headers| headers.get("KV-Operation"))
        .is_some_and(|op| matches!(op.as_str(), "DEL" | "PURGE"))
}

impl Inner {
    fn presence_key(channel: &str, client: ClientId) -> String {
        format!("{}.{client}", token(channel))
    }

    pub(super) async fn put_presence(
        &self,
        channel: &str,
        client: &ClientInfo,
    ) -> Result<(), BrokerError> {
        let value = serde_json::to_vec(client).map_err(unavailable)?;
        self.kv
            .put(Self::presence_key(channel, client.client_id), value.into())
            .await
            .map(drop)
            .map_err(unavailable)
    }

    pub(super) async fn remove_presence(
        &self,
        channel: &str,
        client: ClientId,
    ) -> Result<(), BrokerError> {
        self.entries.remove(channel, client);
        self.ready()?;
        self.kv
            .purge(Self::presence_key(channel, client))
            .await
            .map_err(unavailable)
    }

    pub(super) async fn presence(&self, channel: &str) -> Result<Vec<ClientInfo>, BrokerError> {
        self.ready()?;
        let filter = format!("{}{}.*", self.kv.prefix, token(channel));
        // Asked first, so a channel nobody was ever present on costs no consumer: a stream
        // info request lists the subjects the filter matches.
        let mut subjects = self
            .kv
            .stream
            .info_with_subjects(&filter)
            .await
            .map_err(unavailable)?;
        match subjects.next().await {
            None => return Ok(Vec::new()),
            Some(Err(err)) => return Err(unavailable(err)),
            Some(Ok(_)) => {}
        }
        let messages = read(
            &self.js,
            &self.kv.stream,
            filter,
            DeliverPolicy::LastPerSubject,
            None,
            self.options.timeout,
        )
        .await?;
        Ok(messages
            .iter()
            .filter(|message| !is_kv_removal(message))
            .filter_map(|message| serde_json::from_slice(&message.payload).ok())
            .collect())
    }

    /// Re-puts every entry this node wrote, then takes back any removed meanwhile.
    pub(super) async fn refresh_presence(&self) {
        let before = self.entries.snapshot();
        if before.is_empty() || self.ready().is_err() {
            return;
        }
        let puts: Vec<(String, ClientInfo)> = before
            .iter()
            .flat_map(|(channel, clients)| {
                clients
                    .iter()
                    .map(|client| (channel.clone(), client.clone()))
            })
            .collect();
        let failed = futures_util::stream::iter(puts)
            .map(|(channel, client)| async move { self.put_presence(&channel, &client).await })
            .buffer_unordered(64)
            .filter(|result| std::future::ready(result.is_err()))
            .count()
            .await;
        if failed > 0 {
            tracing::warn!(failed, "NATS presence refresh failed; checking the bucket");
            if let Err(err) = ensure(&self.js, &self.names, &self.options).await {
                tracing::warn!(err, "NATS presence bucket unavailable");
            }
        }
        let after: HashSet<(String, ClientId)> = self
            .entries
            .snapshot()
            .into_iter()
            .flat_map(|(channel, clients)| {
                clients
                    .into_iter()
                    .map(move |c| (channel.clone(), c.client_id))
            })
            .collect();
        for (channel, clients) in before {
            for client in clients {
                if !after.contains(&(channel.clone(), client.client_id)) {
                    let _ = self
                        .kv
                        .purge(Self::presence_key(&channel, client.client_id))
                        .await;
                }
            }
        }
    }
}
