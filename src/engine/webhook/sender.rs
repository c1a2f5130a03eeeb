//! The delivery task: POSTs batches from the head of the queue, signed; retries a failed
//! batch with exponential backoff and jitter; drops events older than the max age.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::sync::CancellationToken;

use crate::engine::backend::{BackendClient, BackendUrl, ClientOptions};

use super::event::{body, signature, wall_ms};
use super::queue::Shared;

/// How long the first event of a batch waits for others to join it.
pub const BATCH_WAIT: Duration = Duration::from_millis(250);

/// The first retry's delay; each failure doubles it, up to [`MAX_BACKOFF`].
pub const FIRST_BACKOFF: Duration = Duration::from_millis(250);

/// The longest delay between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-rusty-socks-signature";

/// Where and how batches are sent.
#[derive(Debug, Clone)]
pub struct Target {
    /// The backend's webhook URL.
    pub url: BackendUrl,
    /// The HMAC key.
    pub secret: Vec<u8>,
    /// Most events per POST.
    pub batch: usize,
    /// How long an event is retried.
    pub max_age: Duration,
    /// The deadline of one POST.
    pub timeout: Duration,
}

/// The delay before attempt `failures + 1`: `FIRST_BACKOFF * 2^(failures-1)`, capped, with
/// jitter taking it down to as little as half (so nodes that failed together spread out).
pub fn backoff(failures: u32, random: u64) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    let full = FIRST_BACKOFF.saturating_mul(1 << exp).min(MAX_BACKOFF);
    let full_ms = u64::try_from(full.as_millis()).unwrap_or(u64::MAX);
    let half = full_ms / 2;
    Duration::from_millis(half + random % (full_ms - half + 1))
}

/// Delivers the queue until `stop` is cancelled.
pub async fn run(shared: Arc<Shared>, target: Target, stop: CancellationToken) {
    let client = BackendClient::new(ClientOptions {
        timeout: target.timeout,
        max_concurrency: 1,
        max_body: crate::engine::backend::client::DEFAULT_MAX_BODY,
    });
    let mut failures: u32 = 0;
    loop {
        // Wait for a first event.
        while shared.is_empty() {
            tokio::select! {
                () = stop.cancelled() => return,
                () = shared.wake.notified() => {}
            }
        }
        // Let a batch fill, unless shutting down or retrying (a retry goes as soon as due).
        if failures == 0 && !shared.closing.load(Ordering::Acquire) {
            let until = tokio::time::Instant::now() + BATCH_WAIT;
            while shared.len() < target.batch && !shared.closing.load(Ordering::Acquire) {
                tokio::select! {
                    () = stop.cancelled() => return,
                    () = tokio::time::sleep_until(until) => break,
                    () = shared.wake.notified() => {}
                }
            }
        }
        drop_expired(&shared, target.max_age);
        let batch = shared.head(target.batch);
        if batch.is_empty() {
            continue;
        }
        let events: Vec<_> = batch.into_iter().map(|p| p.event).collect();
        let payload = body(&events, wall_ms());
        let signed = signature(&target.secret, &payload);
        let headers = [(SIGNATURE_HEADER, signed.as_str())];
        let outcome = tokio::select! {
            () = stop.cancelled() => return,
            outcome = client.post(&target.url, Bytes::from(payload), &headers) => outcome,
        };
        let n = events.len();
        let why = match outcome {
            Ok(response) if response.is_success() => {
                shared.done(n);
                shared.counters.sent.fetch_add(n as u64, Ordering::Relaxed);
                if failures > 0 {
                    tracing::info!(events = n, failures, "webhook delivered after retries");
                }
                failures = 0;
                continue;
            }
            Ok(response) => format!("HTTP {}", response.status),
            Err(err) => err.to_string(),
        };
        failures = failures.saturating_add(1);
        shared
            .counters
            .retried
            .fetch_add(n as u64, Ordering::Relaxed);
        let delay = backoff(failures, uuid::Uuid::new_v4().as_u64_pair().0);
        tracing::warn!(
            url = target.url.for_logs(),
            events = n,
            attempt = failures,
            retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
            "webhook POST failed: {why}"
        );
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(delay) => {}
        }
    }
}

/// Drops the events at the head older than `max_age`, with a log line each.
fn drop_expired(shared: &Shared, max_age: Duration) {
    let now = wall_ms();
    let max_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX);
    let expired = shared.head_while(|p| now.saturating_sub(p.event.time_ms) > max_ms);
    if expired.is_empty() {
        return;
    }
    for p in &expired {
        tracing::warn!(
            id = %p.event.id,
            name = p.event.name.as_str(),
            channel = p.event.channel.as_deref(),
            age_ms = now.saturating_sub(p.event.time_ms),
            "webhook event dropped: undelivered for longer than RUSTY_SOCKS_WEBHOOK_MAX_AGE"
        );
    }
    shared
        .counters
        .dropped
        .fetch_add(expired.len() as u64, Ordering::Relaxed);
    shared.done(expired.len());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_jitter_down_to_half() {
        assert_eq!(backoff(1, 0), Duration::from_millis(125));
        assert_eq!(backoff(1, 125), Duration::from_millis(250));
        assert_eq!(backoff(2, 250), Duration::from_millis(500));
        assert_eq!(backoff(3, 500), Duration::from_millis(1000));
        for failures in [8, 20, u32::MAX] {
            for random in [0, 7, u64::MAX] {
                let d = backoff(failures, random);
                assert!(d >= MAX_BACKOFF / 2 && d <= MAX_BACKOFF, "{d:?}");
            }
        }
    }
}
