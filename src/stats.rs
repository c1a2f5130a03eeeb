//! Counters behind `/stats`.
//!
//! Plain relaxed atomics: each is independent, readers only need a recent value, and the hot
//! path adds per batch (one `fetch_add` per fan-out or per write), not per frame.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Instant;

/// Server-wide counters.
#[derive(Debug)]
pub struct Stats {
    started: Instant,
    active_tasks: AtomicUsize,
    messages_in: AtomicU64,
    messages_out: AtomicU64,
    slow_consumer_closes: AtomicU64,
}

impl Default for Stats {
    fn default() -> Self {
        Self {
            started: Instant::now(),
            active_tasks: AtomicUsize::new(0),
            messages_in: AtomicU64::new(0),
            messages_out: AtomicU64::new(0),
            slow_consumer_closes: AtomicU64::new(0),
        }
    }
}

/// Keeps a task counted in `active_tasks` while it lives.
#[derive(Debug)]
pub struct TaskGuard(Arc<Stats>);

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

    /// Whole seconds since the server started.
    pub fn uptime_s(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}
