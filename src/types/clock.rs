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

/// A [`now_us`] reading in 32 bits, for spans under an hour kept where every byte counts
/// (one per connection): it wraps every 71 minutes, and [`micros_since`] measures from it.
/// Never 0, which marks "none" where it is kept.
pub fn stamp_us() -> u32 {
    // Truncation on purpose: only the low bits matter for a span measured by wrapping.
    let low = now_us() as u32;
    low.max(1)
}

/// Microseconds since `stamp` ([`stamp_us`]); right for spans under 35 minutes. A span that
/// wrapped past half the range reads as 0 rather than as a long wait that never happened.
pub fn micros_since(stamp: u32) -> u64 {
    let span = stamp_us().wrapping_sub(stamp);
    if span > u32::MAX / 2 {
        0
    } else {
        u64::from(span)
    }
}

/// Seconds since the Unix epoch.
pub fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
