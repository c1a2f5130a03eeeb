//! The write delay (`RUSTY_SOCKS_WRITE_DELAY_MS`, [`SessionConfig::with_write_delay`]).
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

use std::task::Context;
use std::time::Duration;

use super::busy::Busy;
use crate::types::clock::micros_since;

/// Whether frames the outbox woke the session for wait for more instead of being taken now
/// (`delay_us` 0: never; `outbox_empty`: nothing to wait with). If they start waiting, the
/// timer is armed for the delay since the last write ([`poll_due`]). With no [`Busy`] state
/// nothing was written within the delay: it is kept while the delay counts
/// ([`wrote_recently`]).
pub(super) fn hold_for_more(busy: Option<&mut Busy>, delay_us: u64, outbox_empty: bool) -> bool {
    if delay_us == 0 || outbox_empty {
        return false;
    }
    let Some(busy) = busy else {
        return false;
    };
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
