//! Abuse limits keyed by the client's real address.
//!
//! The per-IP connection rate is a token bucket per address (IPv6 grouped like the socket
//! bound, `engine::per_address`). The address is the TCP peer,
//! unless the peer is a trusted proxy (`RUSTY_SOCKS_TRUSTED_PROXIES`): then `X-Forwarded-For`
//! is read from the right, skipping trusted hops, and the first untrusted address is the
//! client. Reading it from the left would let any client choose its own address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use crate::types::clock::now_us;
use crate::types::net::IpRange;
use crate::types::rate::{Rate, TokenBucket};

/// Past this many tracked addresses, full buckets (addresses that have been quiet) are
/// forgotten, so a scan from many addresses cannot grow the map without bound.
const SWEEP_AT: usize = 10_000;

/// Whether `peer` is one of the trusted proxies (whose `X-Forwarded-For` is believed).
pub fn is_trusted(peer: IpAddr, trusted: &[IpRange]) -> bool {
    trusted.iter().any(|range| range.contains(peer))
}

/// The client's address for limits and logs; see the module docs.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &[IpRange],
) -> IpAddr {
    let is_trusted = |ip: IpAddr| is_trusted(ip, trusted);
    if !is_trusted(peer) {
        return peer;
    }
    let hops: Vec<&str> = forwarded_for.flat_map(|h| h.split(',')).collect();
    let mut client = peer;
    for hop in hops.iter().rev() {
        let Ok(ip) = hop.trim().parse::<IpAddr>() else {
            // A malformed entry: everything left of it may be forged.
            break;
        };
        client = ip;
        if !is_trusted(ip) {
            break;
        }
    }
    client
}

/// Connections per second per address.
#[derive(Debug)]
pub struct ConnectLimiter {
    /// `None`: no limit.
    rate: Option<Rate>,
    buckets: Mutex<HashMap<IpAddr, TokenBucket>>,
}

impl ConnectLimiter {
    /// `rate` connections a second per address (0: no limit), `burst` at once.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: (rate > 0).then_some(Rate {
                per_second: rate,
                burst: burst.max(1),
            }),
            buckets: Mutex::default(),
        }
    }

    /// Whether `ip` may open one more connection now (and counts it).
    pub fn allow(&self, ip: IpAddr) -> bool {
        self.allow_at(ip, now_us())
    }

    /// [`ConnectLimiter::allow`] at `now_us` (microseconds, [`now_us`]'s clock).
    pub fn allow_at(&self, ip: IpAddr, now_us: u64) -> bool {
        let Some(rate) = self.rate else {
            return true;
        };
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= SWEEP_AT {
            buckets.retain(|_, bucket| !bucket.full_at(rate, now_us));
        }
        buckets
            .entry(ip)
            .or_insert_with(|| TokenBucket::full(rate, now_us))
            .try_take_at(rate, now_us)
    }

    /// How many addresses are tracked (tests of the sweep).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn forwarded_for_is_read_only_from_trusted_proxies_and_from_the_right() {
        let trusted = [IpRange::parse("10.0.0.0/8").unwrap_or(IpRange {
            network: ip("10.0.0.0"),
            prefix: 8,
        })];
        let xff = ["1.1.1.1, 2.2.2.2, 10.0.0.7"];
        assert_eq!(
            client_ip(ip("10.0.0.1"), xff.iter().copied(), &trusted),
            ip("2.2.2.2"),
            "the right-most untrusted hop; 1.1.1.1 may be forged"
        );
        assert_eq!(
            client_ip(ip("3.3.3.3"), xff.iter().copied(), &trusted),
            ip("3.3.3.3"),
            "an untrusted peer's header is ignored"
        );
        assert_eq!(
            client_ip(ip("10.0.0.1"), ["junk, 10.0.0.9"].into_iter(), &trusted),
            ip("10.0.0.9")
        );
    }

    #[test]
    fn the_connect_rate_is_per_address() {
        let limiter = ConnectLimiter::new(1, 2);
        let a = ip("1.2.3.4");
        assert!(limiter.allow(a) && limiter.allow(a));
        assert!(!limiter.allow(a), "burst spent");
        assert!(
            limiter.allow(ip("5.6.7.8")),
            "another address is not affected"
        );
        assert!(ConnectLimiter::new(0, 1).allow(a), "0 means no limit");
    }

    #[test]
    fn the_connect_rate_refills_past_fifty_days_and_quiet_addresses_are_forgotten() {
        const SECOND: u64 = 1_000_000;
        const DAY: u64 = 86_400 * SECOND;
        let limiter = ConnectLimiter::new(1, 2);
        let a = ip("1.2.3.4");
        for now in [SECOND, 49 * DAY, 50 * DAY, 51 * DAY, 400 * DAY] {
            assert!(
                limiter.allow_at(a, now) && limiter.allow_at(a, now),
                "burst at {now}"
            );
            assert!(!limiter.allow_at(a, now), "burst spent at {now}");
            assert!(limiter.allow_at(a, now + SECOND), "refilled at {now}");
            assert!(!limiter.allow_at(a, now + SECOND));
        }
        // Past the sweep threshold, addresses whose buckets refilled are dropped.
        let start = 500 * DAY;
        for n in 0..SWEEP_AT {
            let octets = u32::try_from(n).unwrap_or(0).to_be_bytes();
            assert!(limiter.allow_at(IpAddr::from(octets), start));
        }
        assert!(limiter.tracked() >= SWEEP_AT);
        assert!(limiter.allow_at(ip("9.9.9.9"), start + 10 * SECOND));
        assert!(
            limiter.tracked() <= 2,
            "{} still tracked",
            limiter.tracked()
        );
    }
}
