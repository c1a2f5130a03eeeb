//! Clocks: a cheap monotonic one for latency stamps, and Unix time for token claims.

use std::sync::OnceLock;
use std::time::Instant;

/// Microseconds since the first call: a cheap monotonic clock for latency stamps (never 0
/// once running, so 0 can mean "none").
pub fn now_us() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    let base = BASE.get_or_init(Instant::now);
    u64::try_from(base.elapsed().as_micros()).unwrap_or(u64::MAX) + 1
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
