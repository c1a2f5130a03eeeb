//! Abuse limits keyed by the client's real address.
//!
//! The per-IP connection rate is a token bucket per address. The address is the TCP peer,
//! unless the peer is a trusted proxy (`RUSTY_SOCKS_TRUSTED_PROXIES`): then `X-Forwarded-For`
//! is read from the right, skipping trusted hops, and the first untrusted address is the
//! client. Reading it from the left would let any client choose its own address.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Instant;

use crate::types::net::IpRange;

/// Past this many tracked addresses, full buckets (addresses that have been quiet) are
/// forgotten, so a scan from many addresses cannot grow the map without bound.
const SWEEP_AT: usize = 10_000;

/// The client's address for limits and logs; see the module docs.
pub fn client_ip<'a>(
    peer: IpAddr,
    forwarded_for: impl Iterator<Item = &'a str>,
    trusted: &[IpRange],
) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|range| range.contains(ip));
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

#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Connections per second per address.
#[derive(Debug)]
pub struct ConnectLimiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
}

impl ConnectLimiter {
    /// `rate` connections a second per address (0: no limit), `burst` at once.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: f64::from(rate),
            burst: f64::from(burst.max(1)),
            buckets: Mutex::default(),
        }
    }

    /// Whether `ip` may open one more connection now (and counts it).
    pub fn allow(&self, ip: IpAddr) -> bool {
        if self.rate == 0.0 {
            return true;
        }
        let now = Instant::now();
        let mut buckets = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if buckets.len() >= SWEEP_AT {
            let (rate, burst) = (self.rate, self.burst);
            buckets.retain(|_, b| b.tokens + now.duration_since(b.at).as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(ip).or_insert(Bucket {
            tokens: self.burst,
            at: now,
        });
        let elapsed = now.duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * self.rate).min(self.burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
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
}
