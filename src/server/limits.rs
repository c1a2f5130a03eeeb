//! Abuse limits keyed by the client's real address.
//!
//! The per-IP connection rate is a token bucket per address (IPv6 grouped like the socket
//! bound, `engine::per_address`: the caller passes the grouped address). The address is the TCP peer,
//! unless the peer is a trusted proxy (`RUSTY_SOCKS_TRUSTED_PROXIES`): then `X-Forwarded-For`
//! is read from the right, skipping trusted hops, and the first untrusted address is the
//! client. Reading it from the left would let any client choose its own address.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};

use crate::types::clock::now_us;
use crate::types::net::IpRange;
use crate::types::rate::{Rate, TokenBucket};

/// Independently locked shards of the connect-rate state: a connect locks one of them.
const SHARDS: usize = 64;
/// Addresses one shard's current generation holds before it becomes the previous one (and the
/// previous one is dropped whole). A shard holds at most twice this, so the limiter tracks at
/// most `2 * SHARDS * GENERATION` (131,072) addresses, and nothing is ever scanned.
const GENERATION: usize = 1024;

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

/// One shard's buckets in two generations. A connect moves its address's bucket into
/// `current`; when `current` is full it becomes `previous` and the old `previous` is dropped,
/// so an address is forgotten only after a whole generation of other addresses arrived in its
/// shard without it connecting. Forgetting gives an address a full bucket again, which is
/// what it would have after a quiet second or two anyway; an address that keeps connecting
/// keeps its bucket however many others come and go.
#[derive(Debug, Default)]
struct Shard {
    current: HashMap<IpAddr, TokenBucket>,
    previous: HashMap<IpAddr, TokenBucket>,
}

impl Shard {
    fn bucket(&mut self, ip: IpAddr, rate: Rate, now_us: u64) -> &mut TokenBucket {
        if !self.current.contains_key(&ip) {
            let bucket = self
                .previous
                .remove(&ip)
                .unwrap_or_else(|| TokenBucket::full(rate, now_us));
            if self.current.len() >= GENERATION {
                self.previous = std::mem::take(&mut self.current);
            }
            self.current.insert(ip, bucket);
        }
        self.current
            .entry(ip)
            .or_insert_with(|| TokenBucket::full(rate, now_us))
    }
}

/// Connections per second per address. Its state is bounded and a connect costs one short
/// lock on one of 64 shards, never a pass over every tracked address: an attacker
/// with many addresses cannot make every other client's connect slow.
#[derive(Debug)]
pub struct ConnectLimiter {
    /// `None`: no limit. Swapped by a reload ([`ConnectLimiter::set`]); the buckets stay, so
    /// an address keeps what it spent.
    rate: arc_swap::ArcSwap<Option<Rate>>,
    hasher: RandomState,
    shards: Box<[Mutex<Shard>]>,
}

impl ConnectLimiter {
    /// `rate` connections a second per address (0: no limit), `burst` at once.
    pub fn new(rate: u32, burst: u32) -> Self {
        Self {
            rate: arc_swap::ArcSwap::from_pointee(Self::rate(rate, burst)),
            hasher: RandomState::new(),
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
        }
    }

    fn rate(rate: u32, burst: u32) -> Option<Rate> {
        (rate > 0).then_some(Rate {
            per_second: rate,
            burst: burst.max(1),
        })
    }

    /// Puts a new rate in force (a reload): `rate` connections a second (0: no limit),
    /// `burst` at once.
    pub fn set(&self, rate: u32, burst: u32) {
        self.rate
            .store(std::sync::Arc::new(Self::rate(rate, burst)));
    }

    /// Whether `ip` may open one more connection now (and counts it).
    pub fn allow(&self, ip: IpAddr) -> bool {
        self.allow_at(ip, now_us())
    }

    /// [`ConnectLimiter::allow`] at `now_us` (microseconds, [`now_us`]'s clock).
    pub fn allow_at(&self, ip: IpAddr, now_us: u64) -> bool {
        let Some(rate) = **self.rate.load() else {
            return true;
        };
        self.shard(ip)
            .bucket(ip, rate, now_us)
            .try_take_at(rate, now_us)
    }

    fn shard(&self, ip: IpAddr) -> MutexGuard<'_, Shard> {
        let index = usize::try_from(self.hasher.hash_one(ip) % SHARDS as u64).unwrap_or(0);
        // Every update leaves the maps consistent, so a poisoned lock is still usable.
        self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// How many addresses are tracked (tests of the bound).
    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| {
                let shard = shard
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                shard.current.len() + shard.previous.len()
            })
            .sum()
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
    fn the_connect_rate_refills_past_fifty_days() {
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
    }

    fn nth(n: u32) -> IpAddr {
        IpAddr::from(n.to_be_bytes())
    }

    #[test]
    fn the_connect_rate_state_stays_bounded_and_busy_addresses_keep_their_buckets() {
        const SECOND: u64 = 1_000_000;
        let limiter = ConnectLimiter::new(1, 2);
        let busy = ip("9.9.9.9");
        let now = SECOND;
        assert!(limiter.allow_at(busy, now) && limiter.allow_at(busy, now));
        let bound = 2 * SHARDS * GENERATION;
        // Far more addresses than the bound, all within the same second (no bucket refills,
        // so nothing could be swept as "quiet"): the state still stays bounded.
        for n in 0..u32::try_from(4 * bound).unwrap_or(u32::MAX) {
            assert!(limiter.allow_at(nth(n), now), "a new address may connect");
            if n % 100 == 0 {
                assert!(
                    !limiter.allow_at(busy, now),
                    "an address that keeps connecting keeps its spent bucket ({n} others)"
                );
            }
            if n % 1000 == 0 {
                assert!(
                    limiter.tracked() <= bound,
                    "{} tracked at {n}",
                    limiter.tracked()
                );
            }
        }
        assert!(
            limiter.tracked() <= bound,
            "{} tracked, bound {bound}",
            limiter.tracked()
        );
        assert!(
            limiter.tracked() >= SHARDS * GENERATION / 2,
            "recent addresses are tracked: {}",
            limiter.tracked()
        );
        // An address seen recently, among fewer newcomers than a generation, is remembered.
        let recent = nth(7);
        let later = now + SECOND / 100;
        assert!(limiter.allow_at(recent, later) && limiter.allow_at(recent, later));
        assert!(!limiter.allow_at(recent, later), "burst spent");
        assert!(limiter.allow_at(recent, later + SECOND), "refilled");
    }
}
