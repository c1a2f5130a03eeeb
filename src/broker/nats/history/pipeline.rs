//! Several publishes on one channel sent to JetStream back to back, then the acks awaited.
//!
//! Each append follows the subject's previous message (its `Rs-Prev`), whose stream sequence
//! JetStream assigns across every channel of the stream: an append cannot know the one
//! before it's sequence before that one's ack, only predict it. Every append but the first
//! is sent predicting the previous one's sequence (the first's plus one per append: nothing
//! else was appended in between), and the prediction is made checkable: every append but the
//! last carries a `Nats-Msg-Id` of its own (unique per pipeline), and every append but the
//! first expects the stream's last message id to be the previous append's
//! (`Nats-Expected-Last-Msg-Id`; JetStream compares it with the id of the stream's last
//! message, empty if that one had none). An append is then stored only if the one before it
//! was stored, and stored right before it, so its sequence is the predicted one and its
//! offset and `Rs-Prev` are right; once one is refused, every later one is refused too. (So
//! the later appends need no sequence or subject check: the stream's last message being the
//! append before implies both. Each header left out is one less to store and to parse on
//! every node.)
//!
//! The first append expects the subject's last message (`Nats-Expected-Last-Subject-Sequence`).
//! Its own sequence is known in one of two ways:
//!
//! - **Predicted** (one round trip): when the channel's previous pipeline or publish from
//!   this node was stored right after the channel's message before it (nothing else of the
//!   stream in between: `Head::alone`), the stream is taken to still end with that
//!   message: the first append also expects it as the stream's last
//!   (`Nats-Expected-Last-Sequence`), so it lands right after it, and every append goes out
//!   at once. If the stream moved on (another channel or node appended meanwhile), the first
//!   is refused, so is everything after it, nothing was stored, and the pipeline goes again
//!   confirmed: a round trip lost, never order or offsets. A confirmed pipeline whose first
//!   append lands right after the head makes the next one predicted again, so on a stream
//!   other channels keep writing to most pipelines are confirmed and few predictions fail.
//! - **Confirmed** (two round trips): the first goes alone and its ack is awaited; the others
//!   chain to its real sequence.
//!
//! Appends refused for any other reason (anything else appended in the middle of the
//! pipeline) are published again one by one, in order, as [`Inner::publish`] does, so
//! contention costs round trips, never order or offsets.
//!
//! The first append carries `Rs-Run: n`, so every node's feed that receives it holds it
//! until the other `n - 1` have arrived (right behind it, or a round trip later), at most
//! `RUN_WAIT`, and delivers the pipeline to its subscribers as one batch instead of as the
//! first and then the rest.
//!
//! The ids live in the stream's duplicate window (`RUSTY_SOCKS_IDEMPOTENCY_WINDOW`) like
//! idempotency keys; a pipeline of `n` messages stores `n - 1` of them.

use async_nats::header;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use bytes::Bytes;

use super::{Encoded, H_RUN, HEADS_MAX, Head, PURGE_EVERY, headers};
use crate::broker::nats::{Inner, unavailable};
use crate::broker::{BrokerError, PublishRequest, Published};
use crate::types::StreamPosition;

/// What one append of a pipeline expects JetStream to find before storing it.
enum Chain {
    /// The first: the subject's last message is the one it follows. It announces the
    /// pipeline's size (`Rs-Run`) when that is more than one. `predicted`: the stream's last
    /// message is that one too (the later appends are sent before its ack, predicting its
    /// sequence).
    First { run: u64, predicted: bool },
    /// A later one: the stream's last message is the append before it, told by its message
    /// id (unique, and JetStream's "last message id" is the id of the stream's last message,
    /// empty when that one had none). That implies its sequence (the one before it was
    /// stored at a known sequence, by induction from the first) and the subject's last
    /// message too, so neither is checked: two headers less to store and to deliver to
    /// every node.
    After(String),
}

/// What became of one append of a pipeline.
enum Outcome {
    Stored(Published),
    /// Refused because something else was appended first: to publish again.
    Refused,
    Failed(BrokerError),
}

/// `count` failures with `err`'s message (one per request it failed).
fn failed_alike(err: &BrokerError, count: usize) -> Vec<Outcome> {
    let message = err.to_string();
    (0..count)
        .map(|_| Outcome::Failed(BrokerError::Unavailable(message.clone())))
        .collect()
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
                    // Its result is in: a failure now fails only the others.
                    outcomes = match self.append_all(channel, &requests[1..]).await {
                        Ok(outcomes) => outcomes,
                        Err(err) => Some(failed_alike(&err, requests.len() - 1)),
                    };
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
                Some(last) => Head::read(last),
                None => return Ok(None),
            },
        };
        let mut predicted = None;
        if last.alone {
            let acks = self.send_all(&subject, &last, requests, true).await;
            // Refused at the first append: then every later one was refused too (each
            // expects the one before it), nothing was stored, and the pipeline starts again
            // waiting for its first ack, which tells whether the stream is ours alone again.
            let moved = matches!(acks.first(), Some(Err(err)) if refused(err));
            if moved {
                tracing::trace!(channel, "NATS pipeline: the stream moved on; confirming");
            } else {
                predicted = Some(acks);
            }
        }
        let (acks, alone) = match predicted {
            // Stored at all means stored right after `last`.
            Some(acks) => (acks, true),
            None => {
                let acks = self.send_all(&subject, &last, requests, false).await;
                let next = last.seq + 1;
                let alone = matches!(acks.first(), Some(Ok(ack)) if ack.sequence == next);
                (acks, alone)
            }
        };
        let mut outcomes = Vec::with_capacity(requests.len());
        // The head after the pipeline, if every append was stored (else read again next time).
        let mut new_head = Some(Head {
            alone,
            ..last.clone()
        });
        let mut purge = false;
        for (i, acked) in (0u64..).zip(acks) {
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
        // Not sent, because the first was not stored: published one by one.
        outcomes.resize_with(requests.len(), || Outcome::Refused);
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

    /// Sends the pipeline after `last` and reads its acks, in order; fewer acks than
    /// requests if the first was not stored and the rest were therefore not sent.
    ///
    /// `predicted`: the first append's stream sequence is taken to be `last.seq + 1` (the
    /// stream's last message is still `last`, which its first append makes JetStream check),
    /// so every append goes out at once: one round trip. Otherwise the first goes alone and
    /// its ack is awaited, and the others chain to its real sequence: two round trips.
    async fn send_all(
        &self,
        subject: &str,
        last: &Head,
        requests: &[PublishRequest],
        predicted: bool,
    ) -> Vec<Result<PublishAck, PublishError>> {
        let ids = uuid::Uuid::new_v4().simple().to_string();
        let count = requests.len() as u64;
        let mut encoded = Encoded::default();
        let mut acks = Vec::with_capacity(requests.len());
        let first_id = format!("{ids}.0");
        let first = self
            .send_chained(
                subject,
                last,
                0,
                last.seq,
                Chain::First {
                    run: count,
                    predicted,
                },
                (count > 1).then_some(first_id.as_str()),
                &requests[0],
                &mut encoded,
            )
            .await;
        let mut pending = Vec::with_capacity(requests.len());
        let base = match first {
            Ok(ack) if predicted => {
                pending.push(Ok(ack));
                last.seq + 1
            }
            Ok(ack) => match ack.await {
                Ok(ack) => {
                    let base = ack.sequence;
                    acks.push(Ok(ack));
                    base
                }
                Err(err) => {
                    acks.push(Err(err));
                    return acks;
                }
            },
            Err(err) => {
                acks.push(Err(err));
                return acks;
            }
        };
        // Each append's id is what the next one expects: formatted once.
        let mut previous = first_id;
        for (i, request) in (1u64..).zip(&requests[1..]) {
            let prev = base + i - 1;
            let id = (i + 1 < count).then(|| format!("{ids}.{i}"));
            let expect = Chain::After(std::mem::take(&mut previous));
            pending.push(
                self.send_chained(
                    subject,
                    last,
                    i,
                    prev,
                    expect,
                    id.as_deref(),
                    request,
                    &mut encoded,
                )
                .await,
            );
            previous = id.unwrap_or_default();
        }
        for sent in pending {
            acks.push(match sent {
                Ok(ack) => ack.await,
                Err(err) => Err(err),
            });
        }
        acks
    }

    /// Sends the `i`-th append of a pipeline after `last` (`prev`: the stream sequence it
    /// follows); `expect`: what the stream must end with, `id`: its own message id (see the
    /// module docs).
    #[expect(clippy::too_many_arguments, reason = "one append's headers, named")]
    async fn send_chained(
        &self,
        subject: &str,
        last: &Head,
        i: u64,
        prev: u64,
        expect: Chain,
        id: Option<&str>,
        request: &PublishRequest,
        encoded: &mut Encoded,
    ) -> Result<PublishAckFuture, PublishError> {
        let mut headers = headers(&last.epoch, last.offset + 1 + i, prev, request, encoded);
        match expect {
            Chain::First { run, predicted } => {
                let prev = prev.to_string();
                if predicted {
                    headers.insert(header::NATS_EXPECTED_LAST_SEQUENCE, prev.as_str());
                }
                headers.insert(header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE, prev);
                if run > 1 {
                    headers.insert(H_RUN, run.to_string());
                }
            }
            Chain::After(message) => {
                headers.insert(header::NATS_EXPECTED_LAST_MESSAGE_ID, message.as_str());
            }
        }
        if let Some(id) = id {
            headers.insert(header::NATS_MESSAGE_ID, id);
        }
        let payload = Bytes::from(request.data.get().to_owned());
        self.js
            .publish_with_headers(subject.to_owned(), headers, payload)
            .await
    }
}
