//! The proxy's metrics: calls by kind and outcome, and their latency.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Which proxy a call went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CallKind {
    /// Before an upgrade.
    Connect,
    /// Before a subscription.
    Subscribe,
    /// Before a publication.
    Publish,
}

impl CallKind {
    /// Every kind, in metric order.
    pub const ALL: [Self; 3] = [Self::Connect, Self::Subscribe, Self::Publish];

    /// The `kind` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Connect => "connect",
            Self::Subscribe => "subscribe",
            Self::Publish => "publish",
        }
    }
}

/// How a call ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A `result` answer.
    Allowed,
    /// An `error` answer.
    Refused,
    /// A non-2xx, an unusable answer, or a failed connection.
    Error,
    /// No answer within the deadline (or no free slot before it).
    Timeout,
}

impl Outcome {
    /// Every outcome, in metric order.
    pub const ALL: [Self; 4] = [Self::Allowed, Self::Refused, Self::Error, Self::Timeout];

    /// The `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::Refused => "refused",
            Self::Error => "error",
            Self::Timeout => "timeout",
        }
    }
}

/// Upper bounds of the proxy latency histogram, in seconds.
pub const PROXY_BUCKETS: [f64; 11] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];

/// Counters and the latency histogram of proxy calls.
#[derive(Debug)]
pub struct ProxyStats {
    calls: [[AtomicU64; Outcome::ALL.len()]; CallKind::ALL.len()],
    latency: prometheus::HistogramVec,
}

impl Default for ProxyStats {
    fn default() -> Self {
        Self {
            calls: Default::default(),
            latency: prometheus::HistogramVec::new(
                prometheus::HistogramOpts::new(
                    "rusty_socks_proxy_call_seconds",
                    "Duration of proxy calls to the backend, by kind (connect, subscribe, publish)",
                )
                .buckets(PROXY_BUCKETS.to_vec()),
                &["kind"],
            )
            .expect("static histogram options are valid"),
        }
    }
}

impl ProxyStats {
    /// Counts one call.
    pub fn record(&self, kind: CallKind, outcome: Outcome, took: Duration) {
        self.calls[kind as usize][outcome as usize].fetch_add(1, Ordering::Relaxed);
        self.latency
            .with_label_values(&[kind.label()])
            .observe(took.as_secs_f64());
    }

    /// Calls of `kind` that ended with `outcome` so far.
    pub fn calls(&self, kind: CallKind, outcome: Outcome) -> u64 {
        self.calls[kind as usize][outcome as usize].load(Ordering::Relaxed)
    }

    /// Appends the Prometheus text of these metrics to `out`.
    pub fn render(&self, out: &mut String) {
        crate::engine::stats::family(
            out,
            "rusty_socks_proxy_calls_total",
            "counter",
            "Proxy calls to the backend by kind and outcome (allowed, refused, error, timeout)",
        );
        for kind in CallKind::ALL {
            for outcome in Outcome::ALL {
                out.push_str(&format!(
                    "rusty_socks_proxy_calls_total{{kind=\"{}\",outcome=\"{}\"}} {}\n",
                    kind.label(),
                    outcome.label(),
                    self.calls(kind, outcome)
                ));
            }
        }
        let encoder = prometheus::TextEncoder::new();
        if let Ok(text) =
            encoder.encode_to_string(&prometheus::core::Collector::collect(&self.latency))
        {
            out.push_str(&text);
        }
    }
}
