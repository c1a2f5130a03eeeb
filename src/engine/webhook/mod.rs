//! Webhooks: channel, member and (opt-in) client events POSTed to the application's backend,
//! at least once, in order, across crashes (docs/WEBHOOKS.md).
//!
//! - [`event`]: the event, the batch body and its HMAC-SHA256 signature.
//! - [`queue`]: [`WebhookQueue`], the one ordered queue every event joins; it is the
//!   [`TransitionSink`](crate::broker::transition::TransitionSink) the broker's transitions go to
//!   and the [`SessionEvents`](crate::engine::sessions::SessionEvents) of the session registry.
//! - [`store`]: the queue on disk with `RUSTY_SOCKS_DATA_DIR` (checksummed records, a
//!   done-marker, compaction).
//! - [`sender`]: the delivery task: batches from the head of the queue, retries with backoff
//!   and jitter until `RUSTY_SOCKS_WEBHOOK_MAX_AGE`.

pub mod event;
pub mod queue;
pub mod sender;
pub mod store;

use std::time::Duration;

use crate::engine::backend::BackendUrl;
use crate::types::secret::Secret;

pub use event::{Event, EventName, EventSet};
pub use queue::WebhookQueue;

/// The webhook settings (`RUSTY_SOCKS_WEBHOOK_*`); webhooks are off while `url` is `None`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WebhookOptions {
    /// `RUSTY_SOCKS_WEBHOOK_URL`: where batches are POSTed.
    pub url: Option<BackendUrl>,
    /// `RUSTY_SOCKS_WEBHOOK_SECRET`: the HMAC key of the signature header.
    pub secret: Option<Secret>,
    /// `RUSTY_SOCKS_WEBHOOK_EVENTS`: which events are reported.
    pub events: EventSet,
    /// `RUSTY_SOCKS_WEBHOOK_BATCH`: most events in one POST.
    pub batch: usize,
    /// `RUSTY_SOCKS_WEBHOOK_MAX_AGE`: how long an undelivered event is retried.
    pub max_age: Duration,
    /// `RUSTY_SOCKS_WEBHOOK_TIMEOUT`: the deadline of one POST.
    pub timeout: Duration,
}

impl Default for WebhookOptions {
    fn default() -> Self {
        Self {
            url: None,
            secret: None,
            events: EventSet::DEFAULT,
            batch: 100,
            max_age: Duration::from_secs(3600),
            timeout: Duration::from_secs(5),
        }
    }
}

/// A running webhook pipeline: the queue and its delivery task.
#[derive(Debug)]
pub struct Webhooks {
    /// The queue events join.
    pub queue: std::sync::Arc<WebhookQueue>,
    /// Stops the delivery task (dropping the handle stops it too).
    stop: tokio_util::sync::DropGuard,
    /// The data directory's lock, when the queue took it itself (Redis or NATS broker: no
    /// durable history holds it). Released when the pipeline goes.
    _lock: Option<std::fs::File>,
}

impl Webhooks {
    /// Starts the pipeline `options` describe (`None` when no URL is set): opens the store in
    /// `<data_dir>/webhooks` when `data_dir` is set, then spawns the delivery task. With
    /// `take_lock` (no durable history holds the directory: the broker is Redis or NATS) the
    /// directory's lock is taken here, the same `<data_dir>/LOCK` the history uses. The error
    /// says why the store cannot be opened.
    pub fn start(
        options: &WebhookOptions,
        data_dir: Option<&std::path::Path>,
        take_lock: bool,
    ) -> Result<Option<Self>, String> {
        let (Some(url), Some(secret)) = (&options.url, &options.secret) else {
            return Ok(None);
        };
        let mut lock = None;
        let (store, recovered) = match data_dir {
            Some(dir) => {
                if take_lock {
                    lock = Some(crate::broker::durable::lock_dir(dir)?);
                }
                let dir = dir.join("webhooks");
                let (store, recovered) = store::Store::open(&dir).map_err(|e| {
                    format!(
                        "RUSTY_SOCKS_DATA_DIR: cannot open the webhook queue in {}: {e}",
                        dir.display()
                    )
                })?;
                (Some(store), recovered)
            }
            None => (None, Vec::new()),
        };
        let queue = std::sync::Arc::new(WebhookQueue::new(options.events, store, recovered));
        let stop = tokio_util::sync::CancellationToken::new();
        let target = sender::Target {
            url: url.clone(),
            secret: secret.expose().as_bytes().to_vec(),
            batch: options.batch,
            max_age: options.max_age,
            timeout: options.timeout,
        };
        tokio::spawn(sender::run(
            std::sync::Arc::clone(queue.shared()),
            target,
            stop.clone(),
        ));
        tracing::info!(
            url = url.for_logs(),
            events = ?options.events,
            durable = data_dir.is_some(),
            "webhooks on"
        );
        Ok(Some(Self {
            queue,
            stop: stop.drop_guard(),
            _lock: lock,
        }))
    }

    /// Delivers what is queued until `deadline`, then stops the delivery task; returns how
    /// many events were left (on disk with a store, lost without one).
    pub async fn shutdown(self, deadline: tokio::time::Instant) -> usize {
        let left = self.queue.flush(deadline).await;
        drop(self.stop);
        left
    }
}
