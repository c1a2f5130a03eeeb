//! The one token bucket behind every rate limit: messages per connection
//! (`RUSTY_SOCKS_CLIENT_RATE`) and connection attempts per address (`RUSTY_SOCKS_CONNECT_RATE`).
//!
//! Time is a parameter (microseconds of a monotonic clock, [`crate::types::clock::now_us`] in
//! production), so tests can move it anywhere, months ahead included. The credit is an integer
//! count of millionths of a token, so a refill is exact at any rate and any uptime: no 32-bit
//! millisecond count that stops at 49.7 days, no float that loses small refills next to large
//! stamps.

/// Millionths of a token in one token: a microsecond at one token a second.
const UNIT: u64 = 1_000_000;

/// How fast a bucket refills and how much it holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Tokens added per second.
    pub per_second: u32,
    /// Most tokens held (at least 1): how many may be spent at once.
    pub burst: u32,
}

impl Rate {
    /// The credit of a full bucket.
    fn cap(self) -> u64 {
        u64::from(self.burst.max(1)) * UNIT
    }
}

/// One bucket's state: 16 bytes, the rate kept by the owner (one per server, not per bucket).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenBucket {
    /// Millionths of a token available.
    credit: u64,
    /// When `credit` was last brought up to date (microseconds, the caller's clock).
    at_us: u64,
}

impl TokenBucket {
    /// A full bucket at `now_us`.
    pub fn full(rate: Rate, now_us: u64) -> Self {
        Self {
            credit: rate.cap(),
            at_us: now_us,
        }
    }

    /// Adds what the time since the last refill earned, up to the burst. A stamp older than
    /// the last one (callers of a shared bucket that read the clock before waiting for its
    /// lock) adds nothing and does not move the bucket's clock back.
    pub fn refill(&mut self, rate: Rate, now_us: u64) {
        let elapsed = now_us.saturating_sub(self.at_us);
        self.at_us = self.at_us.max(now_us);
        let earned = elapsed.saturating_mul(u64::from(rate.per_second));
        self.credit = self.credit.saturating_add(earned).min(rate.cap());
    }

    /// Whether the bucket is full (as of its last refill).
    pub fn is_full(&self, rate: Rate) -> bool {
        self.credit >= rate.cap()
    }

    /// Spends one token if there is one (no refill: see [`TokenBucket::try_take_at`]).
    pub fn try_take(&mut self) -> bool {
        if self.credit >= UNIT {
            self.credit -= UNIT;
            true
        } else {
            false
        }
    }

    /// Refills to `now_us`, then spends one token if there is one.
    pub fn try_take_at(&mut self, rate: Rate, now_us: u64) -> bool {
        self.refill(rate, now_us);
        self.try_take()
    }

    /// Whether the bucket would be full at `now_us` (a quiet bucket that can be forgotten:
    /// a new full one is the same).
    pub fn full_at(&self, rate: Rate, now_us: u64) -> bool {
        let mut later = *self;
        later.refill(rate, now_us);
        later.is_full(rate)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = 1_000_000;
    const DAY: u64 = 86_400 * SECOND;

    fn take_all(bucket: &mut TokenBucket, rate: Rate, now: u64) -> u32 {
        let mut taken = 0;
        while bucket.try_take_at(rate, now) {
            taken += 1;
        }
        taken
    }

    #[test]
    fn refills_at_the_rate_up_to_the_burst_at_any_uptime() {
        let rate = Rate {
            per_second: 2,
            burst: 3,
        };
        // Starting at boot, before and after 49.7 days (2^32 ms), and after years.
        for start in [0, 1, 49 * DAY, 50 * DAY, 3 * 365 * DAY] {
            let mut bucket = TokenBucket::full(rate, start);
            assert_eq!(
                take_all(&mut bucket, rate, start),
                3,
                "the burst at {start}"
            );
            assert_eq!(take_all(&mut bucket, rate, start + SECOND / 2), 1);
            assert_eq!(take_all(&mut bucket, rate, start + SECOND / 2), 0);
            // A quarter of a second earns half a token: nothing yet, but it is kept.
            assert_eq!(take_all(&mut bucket, rate, start + 3 * SECOND / 4), 0);
            assert_eq!(take_all(&mut bucket, rate, start + SECOND), 1);
            // Long quiet periods fill the bucket, never beyond the burst.
            let later = start + 60 * DAY;
            assert!(bucket.full_at(rate, later));
            assert_eq!(
                take_all(&mut bucket, rate, later),
                3,
                "the burst 60 days on"
            );
            assert_eq!(take_all(&mut bucket, rate, later + SECOND), 2);
        }
    }

    #[test]
    fn a_clock_read_before_an_older_refill_neither_earns_nor_rewinds() {
        let rate = Rate {
            per_second: 1,
            burst: 1,
        };
        let mut bucket = TokenBucket::full(rate, 10 * SECOND);
        assert!(bucket.try_take_at(rate, 10 * SECOND));
        assert!(
            !bucket.try_take_at(rate, 9 * SECOND),
            "an older stamp earns nothing"
        );
        assert!(!bucket.try_take_at(rate, 10 * SECOND + SECOND / 2));
        assert!(
            bucket.try_take_at(rate, 11 * SECOND),
            "one second after the spend"
        );
    }

    #[test]
    fn extreme_rates_and_stamps_saturate_instead_of_wrapping() {
        let rate = Rate {
            per_second: u32::MAX,
            burst: u32::MAX,
        };
        let mut bucket = TokenBucket::full(rate, 0);
        assert!(bucket.try_take_at(rate, 1));
        assert!(!bucket.is_full(rate));
        assert!(bucket.full_at(rate, u64::MAX), "refilled, not wrapped");
        assert!(bucket.try_take_at(rate, u64::MAX));
        let none = Rate {
            per_second: 0,
            burst: 0,
        };
        let mut bucket = TokenBucket::full(none, 0);
        assert!(
            bucket.try_take_at(none, 0),
            "a burst of 0 still lets one through"
        );
        assert!(!bucket.try_take_at(none, u64::MAX), "rate 0 never refills");
    }
}
