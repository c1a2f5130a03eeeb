//! Counters behind `/stats`.
//!
//! Plain relaxed atomics: each is independent, readers only need a recent value, and the hot
//! path adds per batch (one `fetch_add` per fan-out or per write), not per frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// Why a connection attempt was refused, for the metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `MAX_CONN` or `MAX_QUEUED_TASKS`.
    Overload,
    /// No valid token.
    Unauthorized,
    /// Origin not allowed.
    Origin,
    /// Per-IP connection rate.
    RateLimited,
    /// Sockets per client address (`RUSTY_SOCKS_MAX_CONN_PER_IP`).
    Address,
    /// The connect proxy refused, or did not answer.
    Proxy,
}

impl Refusal {
    /// Every reason, in metric order.
    pub const ALL: [Refusal; 6] = [
        Self::Overload,
        Self::Unauthorized,
        Self::Origin,
        Self::RateLimited,
        Self::Address,
        Self::Proxy,
    ];

    /// The `reason` label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Overload => "overload",
            Self::Unauthorized => "unauthorized",
            Self::Origin => "origin",
            Self::RateLimited => "rate_limited",
            Self::Address => "per_address",
            Self::Proxy => "proxy",
        }
    }
}

/// Upper bounds of the queue-to-socket latency histogram, in seconds.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 2.5,
];

/// Server-wide counters.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    active_tasks: AtomicUsize,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    slow_consumer_closes: AtomicU64,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
    connects: AtomicU64,
    refusals: [AtomicU64; Refusal::ALL.len()],
    gaps: AtomicU64,
    broker_errors: AtomicU64,
    rate_limited_messages: AtomicU64,
    notices_dropped: AtomicU64,
    write_delay: prometheus::Histogram,
    load: crate::engine::load::Load,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            active_tasks: AtomicUsize::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            slow_consumer_closes: AtomicU64::new(0),
            bytes_in: AtomicU64::new(0),
            bytes_out: AtomicU64::new(0),
            connects: AtomicU64::new(0),
            refusals: Default::default(),
            gaps: AtomicU64::new(0),
            broker_errors: AtomicU64::new(0),
            rate_limited_messages: AtomicU64::new(0),
            notices_dropped: AtomicU64::new(0),
            write_delay: prometheus::Histogram::with_opts(
                prometheus::HistogramOpts::new(
                    "rusty_socks_queue_to_socket_seconds",
                    "Time from a frame entering a connection's outbox to its write completing",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
            )
            .expect("static histogram options are valid"),
            load: crate::engine::load::Load::default(),
        }
    }
}

/// Keeps a task counted in `active_tasks` while it lives.
#[derive(Debug)]
pub struct TaskGuard(Arc<Stats>);

impl TaskGuard {
    /// The counters this guard counts in: the session reaches them through it rather than
    /// through a second pointer in every connection's task.
    pub fn stats(&self) -> &Stats {
        &self.0
    }
}

impl Drop for TaskGuard {
    fn drop(&mut self) {
        self.0.active_tasks.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Stats {
    /// Counts a connection task (HTTP connection or WebSocket session) until the guard drops.
    pub fn task(self: &Arc<Self>) -> TaskGuard {
        self.active_tasks.fetch_add(1, Ordering::Relaxed);
        TaskGuard(Arc::clone(self))
    }

    /// Data messages received from clients.
    pub fn add_in(&self, n: u64) {
        self.messages_in.fetch_add(n, Ordering::Relaxed);
    }

    /// Data messages queued to clients.
    pub fn add_out(&self, n: u64) {
        if n > 0 {
            self.messages_out.fetch_add(n, Ordering::Relaxed);
        }
    }

    /// A connection closed for falling behind.
    pub fn slow_consumer_closed(&self) {
        self.slow_consumer_closes.fetch_add(1, Ordering::Relaxed);
    }

    /// Live connection tasks.
    pub fn active_tasks(&self) -> usize {
        self.active_tasks.load(Ordering::Relaxed)
    }

    /// Total data messages received.
    pub fn messages_in(&self) -> u64 {
        self.messages_in.load(Ordering::Relaxed)
    }

    /// Total data messages queued to clients.
    pub fn messages_out(&self) -> u64 {
        self.messages_out.load(Ordering::Relaxed)
    }

    /// Total slow-consumer closes.
    pub fn slow_consumer_closes(&self) -> u64 {
        self.slow_consumer_closes.load(Ordering::Relaxed)
    }

    /// Bytes read from clients.
    pub fn add_bytes_in(&self, n: usize) {
        self.bytes_in.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// Bytes written to clients.
    pub fn add_bytes_out(&self, n: usize) {
        self.bytes_out.fetch_add(n as u64, Ordering::Relaxed);
    }

    /// A WebSocket connection was accepted (101 sent).
    pub fn connected(&self) {
        self.connects.fetch_add(1, Ordering::Relaxed);
    }

    /// A connection attempt was refused.
    pub fn refused(&self, why: Refusal) {
        self.refusals[why as usize].fetch_add(1, Ordering::Relaxed);
    }

    /// Subscribers were told publications may be missing (`gap`).
    pub fn gap(&self, members: usize) {
        self.gaps.fetch_add(members as u64, Ordering::Relaxed);
    }

    /// A broker operation failed.
    pub fn broker_error(&self) {
        self.broker_errors.fetch_add(1, Ordering::Relaxed);
    }

    /// A client message was refused by the per-connection rate limit.
    pub fn rate_limited(&self) {
        self.rate_limited_messages.fetch_add(1, Ordering::Relaxed);
    }

    /// Join/leave/`Disconnect` notice frames that were dropped instead of queued (see
    /// `Hub::deliver`).
    pub fn notices_dropped(&self, frames: usize) {
        if frames > 0 {
            self.notices_dropped
                .fetch_add(frames as u64, Ordering::Relaxed);
        }
    }

    /// Total notice frames dropped.
    pub fn notices_dropped_total(&self) -> u64 {
        self.notices_dropped.load(Ordering::Relaxed)
    }

    /// Records how long the oldest frame of a written batch waited (`since` from
    /// [`stamp_us`](crate::types::clock::stamp_us)).
    pub fn observe_write_delay(&self, since: u32) {
        let waited = crate::types::clock::micros_since(since);
        self.write_delay.observe(waited as f64 / 1e6);
    }

    /// Whether the server is saturated, as the CPU probe last found
    /// ([`crate::engine::load`]): kept here because every session already reaches the
    /// counters, and `/metrics` shows it.
    pub fn load(&self) -> &crate::engine::load::Load {
        &self.load
    }

    /// Whole seconds since the server started.
    pub fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }

    /// Appends every counter in the Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
        counter(
            out,
            "rusty_socks_connects_total",
            "WebSocket connections accepted",
            load(&self.connects),
        );
        family(
            out,
            "rusty_socks_refusals_total",
            "counter",
            "Connection attempts refused, by reason",
        );
        for why in Refusal::ALL {
            out.push_str(&format!(
                "rusty_socks_refusals_total{{reason=\"{}\"}} {}\n",
                why.label(),
                load(&self.refusals[why as usize])
            ));
        }
        counter(
            out,
            "rusty_socks_messages_in_total",
            "Data messages received from clients",
            self.messages_in(),
        );
        counter(
            out,
            "rusty_socks_messages_out_total",
            "Data messages queued to clients",
            self.messages_out(),
        );
        counter(
            out,
            "rusty_socks_bytes_in_total",
            "Bytes read from clients",
            load(&self.bytes_in),
        );
        counter(
            out,
            "rusty_socks_bytes_out_total",
            "Bytes written to clients",
            load(&self.bytes_out),
        );
        counter(
            out,
            "rusty_socks_slow_consumer_closes_total",
            "Connections closed for reading too slowly (4001)",
            self.slow_consumer_closes(),
        );
        counter(
            out,
            "rusty_socks_gaps_total",
            "Gap notices sent to subscribers",
            load(&self.gaps),
        );
        counter(
            out,
            "rusty_socks_broker_errors_total",
            "Broker operations that failed",
            load(&self.broker_errors),
        );
        counter(
            out,
            "rusty_socks_rate_limited_messages_total",
            "Client messages refused by the per-connection rate limit",
            load(&self.rate_limited_messages),
        );
        counter(
            out,
            "rusty_socks_notices_dropped_total",
            "Join, leave and Disconnect notice frames dropped instead of queued (a burst past a channel's budget, or a connection already behind)",
            self.notices_dropped_total(),
        );
        gauge(
            out,
            "rusty_socks_cpu_busy_percent",
            "Share of the worker threads' CPU the server used in the last 100 ms",
            i64::try_from(self.load.busy_pct()).unwrap_or(i64::MAX),
        );
        counter(
            out,
            "rusty_socks_saturated_windows_total",
            "100 ms windows busy enough to make or keep the server saturated (when the busy write delay applies)",
            self.load.saturated_windows(),
        );
        let encoder = prometheus::TextEncoder::new();
        if let Ok(text) =
            encoder.encode_to_string(&prometheus::core::Collector::collect(&self.write_delay))
        {
            out.push_str(&text);
        }
    }
}

/// Writes the HELP and TYPE lines of a metric family.
pub fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
}

/// Writes one unlabelled counter.
pub fn counter(out: &mut String, name: &str, help: &str, value: u64) {
    family(out, name, "counter", help);
    out.push_str(&format!("{name} {value}\n"));
}

/// Writes one unlabelled gauge.
pub fn gauge(out: &mut String, name: &str, help: &str, value: i64) {
    family(out, name, "gauge", help);
    out.push_str(&format!("{name} {value}\n"));
}
