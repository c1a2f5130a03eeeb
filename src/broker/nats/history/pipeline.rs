//! Several publishes on one channel sent to JetStream back to back, then the acks awaited.
//!
//! Each append names the subject's previous message (`Nats-Expected-Last-Subject-Sequence`),
//! whose stream sequence JetStream assigns across every channel of the stream: the second
//! append of a pipeline cannot know the first one's sequence before its ack. So it predicts
//! it (the previous one's plus one: nothing else was appended in between) and makes the
//! prediction checkable: every append but the last carries a `Nats-Msg-Id` of its own, and
//! every append but the first expects the stream's last sequence to be the predicted one
//! (`Nats-Expected-Last-Sequence`) and its last message id to be the previous append's
//! (`Nats-Expected-Last-Msg-Id`). An append is then stored only if the one before it was
//! stored, and stored right before it, so its offset and `Rs-Prev` are right; once one is
//! refused, every later one is refused too. The refused ones (anything else was appended
//! meanwhile: another channel, another node) are published again one by one, in order, as
//! [`Inner::publish`] does, so contention costs one extra round trip, never order or offsets.
//!
//! The ids live in the stream's duplicate window (`RUSTY_SOCKS_IDEMPOTENCY_WINDOW`) like
//! idempotency keys; a pipeline of `n` messages stores `n - 1` of them.

use async_nats::header;
use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use bytes::Bytes;

use super::{HEADS_MAX, Head, PURGE_EVERY, headers};
use crate::broker::nats::{Inner, unavailable};
use crate::broker::{BrokerError, PublishRequest, Published};
use crate::types::StreamPosition;

/// What became of one append of a pipeline.
enum Outcome {
    Stored(Published),
    /// Refused because something else was appended first: to publish again.
    Refused,
    Failed(BrokerError),
}

fn refused(err: &PublishError) -> bool {
    matches!(
        err.kind(),
        PublishErrorKind::WrongLastSequence
            | PublishErrorKind::WrongLastMessageId
            | PublishErrorKind::StreamNotFound
    )
}

impl Inner {
    /// See the module docs: one result per request, in order.
    pub(in crate::broker::nats) async fn publish_pipelined(
        &self,
        channel: &str,
        requests: Vec<PublishRequest>,
    ) -> Result<Vec<Result<Published, BrokerError>>, BrokerError> {
        // A keyed publish has a message id of its own, and a duplicate answer to read back:
        // those go one by one.
        let chained = requests.iter().all(|r| r.idempotency.is_none());
        let mut results = Vec::with_capacity(requests.len());
        let mut outcomes = None;
        if chained && requests.len() > 1 {
            outcomes = self.append_all(channel, &requests).await?;
            if outcomes.is_none() {
                // The channel's first publication starts its epoch, with nothing to chain
                // to: it goes alone, and the others chain to it.
                results.push(self.publish(channel, requests[0].clone()).await);
                if requests.len() > 2 {
                    outcomes = self.append_all(channel, &requests[1..]).await?;
                }
            }
        }
        let rest = requests.len() - results.len();
        let outcomes = outcomes.unwrap_or_else(|| {
            std::iter::repeat_with(|| Outcome::Refused)
                .take(rest)
                .collect()
        });
        let skip = results.len();
        for (outcome, request) in outcomes.into_iter().zip(requests.into_iter().skip(skip)) {
            results.push(match outcome {
                Outcome::Stored(published) => Ok(published),
                Outcome::Failed(err) => Err(err),
                Outcome::Refused => self.publish(channel, request).await,
            });
        }
        Ok(results)
    }

    /// Sends every request chained to the one before (see the module docs) and reads the
    /// acks; `None` if the subject has no message yet (nothing to chain the first to).
    async fn append_all(
        &self,
        channel: &str,
        requests: &[PublishRequest],
    ) -> Result<Option<Vec<Outcome>>, BrokerError> {
        self.ready()?;
        self.heads.shrink(HEADS_MAX);
        let subject = self.names.history(channel);
        let slot = self.heads.get(channel);
        let mut head = slot.lock().await;
        let last = match head.take() {
            Some(head) => head,
            None => match self.last(&subject).await? {
                Some(last) => Head {
                    seq: last.seq,
                    offset: last.offset,
                    epoch: last.epoch,
                },
                None => return Ok(None),
            },
        };
        let ids = uuid::Uuid::new_v4().simple().to_string();
        let mut sent = Vec::with_capacity(requests.len());
        for (i, request) in (0u64..).zip(requests) {
            let prev = last.seq + i;
            let mut headers = headers(&last.epoch, last.offset + 1 + i, prev, Some(request));
            if i > 0 {
                headers.insert(header::NATS_EXPECTED_LAST_SEQUENCE, prev.to_string());
                let expected = format!("{ids}.{}", i - 1);
                headers.insert(header::NATS_EXPECTED_LAST_MESSAGE_ID, expected.as_str());
            }
            if i + 1 < requests.len() as u64 {
                let id = format!("{ids}.{i}");
                headers.insert(header::NATS_MESSAGE_ID, id.as_str());
            }
            let payload = Bytes::from(request.data.get().to_owned());
            sent.push(
                self.js
                    .publish_with_headers(subject.clone(), headers, payload)
                    .await,
            );
        }
        let mut outcomes = Vec::with_capacity(sent.len());
        // The head after the pipeline, if every append was stored (else read again next time).
        let mut new_head = Some(last.clone());
        let mut purge = false;
        for (i, sent) in (0u64..).zip(sent) {
            let acked = match sent {
                Ok(ack) => ack.await,
                Err(err) => Err(err),
            };
            let offset = last.offset + 1 + i;
            outcomes.push(match acked {
                Ok(ack) => {
                    if let Some(head) = &mut new_head {
                        head.seq = ack.sequence;
                        head.offset = offset;
                    }
                    purge |= offset.is_multiple_of(PURGE_EVERY);
                    Outcome::Stored(Published::new(StreamPosition {
                        offset,
                        epoch: last.epoch.clone(),
                    }))
                }
                Err(err) => {
                    new_head = None;
                    if refused(&err) {
                        Outcome::Refused
                    } else {
                        Outcome::Failed(unavailable(err))
                    }
                }
            });
        }
        *head = new_head;
        drop(head);
        if purge && let Some(request) = requests.last() {
            let keep = (request.history.size as u64).saturating_add(PURGE_EVERY);
            let purge = self.stream.purge().filter(subject.as_str()).keep(keep);
            if let Err(err) = purge.await {
                tracing::debug!(%err, channel, "history purge failed");
            }
        }
        Ok(Some(outcomes))
    }
}
