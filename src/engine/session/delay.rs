//! The write delay (`RUSTY_SOCKS_WRITE_DELAY_MS`, [`SessionConfig::with_write_delay`]), and
//! the busy one that applies only while the server is saturated
//! (`RUSTY_SOCKS_BUSY_WRITE_DELAY_MS`, [`SessionConfig::with_busy_write_delay`]; on by
//! default, see `engine/load.rs`).
//!
//! Why: on a busy server every write is a system call and, on loopback or a LAN, most of a
//! delivery's cost. A subscriber of a high-rate channel is otherwise written to once per
//! publication (or per burst the server happened to gather), and when that saturates the
//! server, queueing sets the latency tail. With a delay, frames the outbox wakes a session for
//! wait until the delay has passed since its last write, if that was more recent: a
//! connection that streams is written to about once per delay, each write carrying what
//! arrived meanwhile, and one that was quiet for the delay is written to at once
//! (docs/BENCHMARKS.md, "Write delay").
//!
//! What never waits: a write already under way (what arrives joins it at no cost), replies to
//! the client's own messages (handling input takes queued frames along), gap reports, closes
//! and pings. Frames that wait count against the outbox's limit (`RUSTY_SOCKS_BUFFER`), and
//! go out before a close other than a slow consumer's or a protocol violation's. The timer
//! is the runtime's, so a delay is rounded up to its millisecond.
//!
//! [`SessionConfig::with_write_delay`]: super::SessionConfig::with_write_delay
//! [`SessionConfig::with_busy_write_delay`]: super::SessionConfig::with_busy_write_delay

use std::task::Context;
use std::time::Duration;

use super::SessionConfig;
use super::busy::Busy;
use crate::types::clock::micros_since;

impl SessionConfig {
    /// The same settings with a write delay (`RUSTY_SOCKS_WRITE_DELAY_MS`): a connection written
    /// to less than `delay` ago waits until then before its next write. Zero writes at once.
    /// Whole milliseconds, rounded up, up to 255 (the settings allow 100).
    pub fn with_write_delay(mut self, delay: Duration) -> Self {
        self.write_delay_ms = whole_millis(delay);
        self
    }

    /// The same settings with a write delay that applies only while the server is saturated
    /// (`RUSTY_SOCKS_BUSY_WRITE_DELAY_MS`); a longer one of
    /// [`with_write_delay`](Self::with_write_delay) applies always. Whole milliseconds, up to
    /// 255, rounded up.
    pub fn with_busy_write_delay(mut self, delay: Duration) -> Self {
        self.busy_write_delay_ms = whole_millis(delay);
        self
    }

    /// The write delay in effect, in microseconds: the busy one only while `saturated` says
    /// so (asked only when it would be the longer).
    pub(super) fn write_delay_us(&self, saturated: impl FnOnce() -> bool) -> u64 {
        let mut ms = self.write_delay_ms;
        if self.busy_write_delay_ms > ms && saturated() {
            ms = self.busy_write_delay_ms;
        }
        u64::from(ms) * 1000
    }

    /// Whether writes are stamped for a write delay (one may come into effect).
    pub(super) fn delays_writes(&self) -> bool {
        self.write_delay_ms > 0 || self.busy_write_delay_ms > 0
    }
}

/// `delay` in whole milliseconds, rounded up (a delay is never shortened to nothing), at most
/// 255.
fn whole_millis(delay: Duration) -> u8 {
    u8::try_from(delay.as_micros().div_ceil(1000)).unwrap_or(u8::MAX)
}

/// Whether frames the outbox woke the session for wait for more instead of being taken now
/// (`delay_us` 0: never; `outbox_empty`: nothing to wait with). If they start waiting, the
/// timer is armed for the delay since the last write ([`poll_due`]). With no [`Busy`] state
/// nothing was written within the delay: it is kept while the delay counts
/// ([`wrote_recently`]).
pub(super) fn hold_for_more(busy: Option<&mut Busy>, delay_us: u64, outbox_empty: bool) -> bool {
    let Some(busy) = busy else {
        return false;
    };
    if delay_us == 0 || outbox_empty {
        // A delay that ended (the server is no longer saturated) holds nothing any more.
        busy.held = false;
        return false;
    }
    if busy.held {
        return true;
    }
    if !busy.wbuf.is_empty() || !busy.frames.is_empty() || !wrote_recently(busy, delay_us) {
        return false;
    }
    let since = micros_since(busy.last_write);
    let due = tokio::time::Instant::now() + Duration::from_micros(delay_us.saturating_sub(since));
    match busy.timer.as_mut() {
        Some(timer) => timer.as_mut().reset(due),
        None => busy.timer = Some(Box::pin(tokio::time::sleep_until(due))),
    }
    busy.held = true;
    true
}

/// Whether the last write was less than `delay_us` ago (never without a delay).
pub(super) fn wrote_recently(busy: &Busy, delay_us: u64) -> bool {
    delay_us > 0 && busy.last_write != 0 && micros_since(busy.last_write) < delay_us
}

/// Whether the delay of held-back frames has passed (use only while `busy.held`); if so, they
/// are held no longer.
pub(super) fn poll_due(busy: &mut Busy, cx: &mut Context<'_>) -> bool {
    let due = busy
        .timer
        .as_mut()
        .is_none_or(|timer| timer.as_mut().poll(cx).is_ready());
    if due {
        busy.held = false;
    }
    due
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(fixed_ms: u64, busy_ms: u64) -> SessionConfig {
        let second = Duration::from_secs(1);
        SessionConfig::new(1024, None, second, second)
            .with_write_delay(Duration::from_millis(fixed_ms))
            .with_busy_write_delay(Duration::from_millis(busy_ms))
    }

    #[test]
    fn the_busy_delay_applies_only_while_saturated_and_only_when_longer() {
        assert_eq!(config(0, 10).write_delay_us(|| false), 0);
        assert_eq!(config(0, 10).write_delay_us(|| true), 10_000);
        assert_eq!(config(5, 10).write_delay_us(|| false), 5_000);
        assert_eq!(config(5, 10).write_delay_us(|| true), 10_000);
        let never = || panic!("a shorter busy delay cannot matter: not asked");
        assert_eq!(config(20, 10).write_delay_us(never), 20_000);
        assert_eq!(config(0, 0).write_delay_us(never), 0);
        assert!(!config(0, 0).delays_writes());
        assert!(config(0, 10).delays_writes() && config(3, 0).delays_writes());
        assert_eq!(config(0, 300).write_delay_us(|| true), 255_000, "saturates");
        let rounded = SessionConfig::new(1024, None, Duration::ZERO, Duration::ZERO)
            .with_write_delay(Duration::from_micros(1_500))
            .with_busy_write_delay(Duration::from_micros(1));
        assert_eq!(rounded.write_delay_us(|| true), 2_000, "rounded up");
        assert_eq!(rounded.write_delay_us(|| false), 2_000);
        let busy_only = SessionConfig::new(1024, None, Duration::ZERO, Duration::ZERO)
            .with_busy_write_delay(Duration::from_micros(1));
        assert_eq!(
            busy_only.write_delay_us(|| true),
            1_000,
            "not shortened to nothing"
        );
    }
}
