//! Sockets per client address (`RUSTY_SOCKS_MAX_CONN_PER_IP`).
//!
//! Every socket of one address counts from the moment it is accepted (so pending handshakes
//! count, and a client that only opens sockets and dribbles its headers is bounded too) until
//! its task ends. IPv6 addresses are grouped by prefix (`RUSTY_SOCKS_IPV6_PREFIX`, /64 by
//! default): one host usually owns a whole /64, and counting single IPv6 addresses would let it
//! open one socket from each of 2^64 addresses.
//!
//! The state is a map from address group to count, split into [`SHARDS`] independently locked
//! shards chosen by a keyed hash: a connect locks one shard for one lookup, never the whole
//! map, and never scans anything. An entry exists only while its address has a live socket (or
//! a refusal being answered) and is removed when that count reaches zero, so the state is
//! bounded by the sockets the server holds, however many addresses have come and gone.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};

/// Independently locked parts of the map: enough that concurrent connects from different
/// addresses rarely meet on one lock, few enough to cost nothing when idle.
pub const SHARDS: usize = 64;

/// Refusals one address may have being answered (429 written, input drained, at most a
/// second each) at once. Past it, its sockets are closed without an answer, so a flood from
/// one address cannot make the server hold thousands of refusals.
pub const REFUSALS_IN_FLIGHT: u32 = 8;

/// The group `ip` is counted under: IPv4 as is (IPv4-mapped IPv6 counts as its IPv4 address),
/// IPv6 cut to its first `ipv6_prefix` bits.
pub fn address_group(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let bits = u32::from(ipv6_prefix.clamp(1, 128));
                let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
                IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
            }
        },
    }
}

/// What one address holds.
#[derive(Debug, Default, Clone, Copy)]
struct Entry {
    /// Live sockets (pending handshakes, HTTP requests, WebSocket sessions).
    sockets: u32,
    /// Refusals being answered.
    refusing: u32,
}

type Shard = Mutex<HashMap<IpAddr, Entry>>;

/// The per-address socket bound and its state.
#[derive(Debug)]
pub struct PerAddress {
    /// 0: no bound (and no state).
    max: u32,
    ipv6_prefix: u8,
    hasher: std::collections::hash_map::RandomState,
    shards: Box<[Shard]>,
}

/// Why a socket was refused by [`PerAddress::try_acquire`].
#[derive(Debug)]
pub enum AddressRefused {
    /// Answer it (429): the slot is held until the answer is done.
    Answer(AddressPermit),
    /// Too many refusals of this address are being answered already: close it at once.
    Close,
}

impl PerAddress {
    /// `max` sockets per address group (0: no bound), IPv6 grouped by `ipv6_prefix` bits.
    pub fn new(max: usize, ipv6_prefix: u8) -> Self {
        Self {
            max: u32::try_from(max).unwrap_or(u32::MAX),
            ipv6_prefix,
            hasher: std::collections::hash_map::RandomState::new(),
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
        }
    }

    /// The bound (0: none).
    pub fn max(&self) -> usize {
        self.max as usize
    }

    /// The group `ip` is counted under.
    pub fn group(&self, ip: IpAddr) -> IpAddr {
        address_group(ip, self.ipv6_prefix)
    }

    fn shard(&self, key: &IpAddr) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Entry>> {
        // The hash is keyed per process, so a client cannot pick addresses that share a shard.
        let index = usize::try_from(self.hasher.hash_one(key) % SHARDS as u64).unwrap_or(0);
        self.shards[index]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Counts one more socket of `ip`: `Ok(None)` when there is no bound, `Ok(Some)` with the
    /// count held until the permit drops, or the refusal.
    pub fn try_acquire(
        self: &Arc<Self>,
        ip: IpAddr,
    ) -> Result<Option<AddressPermit>, AddressRefused> {
        if self.max == 0 {
            return Ok(None);
        }
        let key = self.group(ip);
        let mut shard = self.shard(&key);
        let entry = shard.entry(key).or_default();
        if entry.sockets < self.max {
            entry.sockets += 1;
            drop(shard);
            return Ok(Some(AddressPermit {
                limiter: Arc::clone(self),
                key,
                refusal: false,
            }));
        }
        if entry.refusing < REFUSALS_IN_FLIGHT {
            entry.refusing += 1;
            drop(shard);
            return Err(AddressRefused::Answer(AddressPermit {
                limiter: Arc::clone(self),
                key,
                refusal: true,
            }));
        }
        Err(AddressRefused::Close)
    }

    fn release(&self, key: &IpAddr, refusal: bool) {
        let mut shard = self.shard(key);
        if let Some(entry) = shard.get_mut(key) {
            if refusal {
                entry.refusing = entry.refusing.saturating_sub(1);
            } else {
                entry.sockets = entry.sockets.saturating_sub(1);
            }
            if entry.sockets == 0 && entry.refusing == 0 {
                shard.remove(key);
                // Give back what a burst of addresses grew the shard to.
                if shard.capacity() > 64 && shard.len() * 4 < shard.capacity() {
                    let keep = shard.len() * 2;
                    shard.shrink_to(keep);
                }
            }
        }
    }

    /// Sockets counted under `ip`'s group (tests and diagnostics).
    pub fn count(&self, ip: IpAddr) -> usize {
        let key = self.group(ip);
        self.shard(&key).get(&key).map_or(0, |e| e.sockets as usize)
    }

    /// Address groups with state (tests of the bound on the state).
    pub fn tracked(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .len()
            })
            .sum()
    }
}

/// One socket's count under its address group, given back on drop.
#[derive(Debug)]
pub struct AddressPermit {
    limiter: Arc<PerAddress>,
    key: IpAddr,
    /// Counts a refusal being answered, not a live socket.
    refusal: bool,
}

impl Drop for AddressPermit {
    fn drop(&mut self) {
        self.limiter.release(&self.key, self.refusal);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap_or(IpAddr::from([0, 0, 0, 0]))
    }

    #[test]
    fn ipv6_addresses_are_grouped_by_prefix_and_ipv4_is_not() {
        let a = ip("2001:db8:1:2:aaaa::1");
        let b = ip("2001:db8:1:2:ffff:ffff:ffff:ffff");
        let other = ip("2001:db8:1:3::1");
        assert_eq!(address_group(a, 64), ip("2001:db8:1:2::"));
        assert_eq!(address_group(a, 64), address_group(b, 64));
        assert_ne!(address_group(a, 64), address_group(other, 64));
        assert_eq!(address_group(a, 48), address_group(other, 48));
        assert_eq!(address_group(a, 128), a);
        assert_eq!(address_group(a, 1), ip("::"));
        assert_eq!(address_group(ip("10.1.2.3"), 64), ip("10.1.2.3"));
        assert_eq!(address_group(ip("::ffff:10.1.2.3"), 64), ip("10.1.2.3"));
        assert_eq!(address_group(ip("::1"), 64), ip("::"));
    }

    #[test]
    fn one_group_is_bounded_and_others_are_not_affected() {
        let limiter = Arc::new(PerAddress::new(2, 64));
        let first = limiter.try_acquire(ip("2001:db8::1"));
        let second = limiter.try_acquire(ip("2001:db8::2"));
        assert!(matches!(first, Ok(Some(_))) && matches!(second, Ok(Some(_))));
        assert_eq!(limiter.count(ip("2001:db8::ffff")), 2, "one /64");
        let refused = limiter.try_acquire(ip("2001:db8::3"));
        assert!(matches!(refused, Err(AddressRefused::Answer(_))));
        assert!(matches!(
            limiter.try_acquire(ip("2001:db8:0:1::1")),
            Ok(Some(_))
        ));
        assert!(matches!(limiter.try_acquire(ip("10.0.0.1")), Ok(Some(_))));
        drop(first);
        drop(refused);
        assert!(matches!(
            limiter.try_acquire(ip("2001:db8::9")),
            Ok(Some(_))
        ));
        let unbounded = Arc::new(PerAddress::new(0, 64));
        assert!(matches!(unbounded.try_acquire(ip("10.0.0.1")), Ok(None)));
        assert_eq!(unbounded.tracked(), 0);
    }

    #[test]
    fn refusals_being_answered_are_bounded_too() {
        let limiter = Arc::new(PerAddress::new(1, 64));
        let _held = limiter.try_acquire(ip("10.0.0.1"));
        let answering: Vec<_> = (0..REFUSALS_IN_FLIGHT)
            .map(|_| limiter.try_acquire(ip("10.0.0.1")))
            .collect();
        assert!(
            answering
                .iter()
                .all(|r| matches!(r, Err(AddressRefused::Answer(_))))
        );
        assert!(matches!(
            limiter.try_acquire(ip("10.0.0.1")),
            Err(AddressRefused::Close)
        ));
        drop(answering);
        assert!(matches!(
            limiter.try_acquire(ip("10.0.0.1")),
            Err(AddressRefused::Answer(_))
        ));
    }

    #[test]
    fn state_exists_only_for_addresses_with_live_sockets() {
        let limiter = Arc::new(PerAddress::new(3, 64));
        let mut held = Vec::new();
        for n in 0..5000u32 {
            let ip = IpAddr::from((0x0a00_0000 + n).to_be_bytes());
            held.push(limiter.try_acquire(ip));
        }
        assert_eq!(limiter.tracked(), 5000);
        held.truncate(10);
        assert_eq!(limiter.tracked(), 10);
        drop(held);
        assert_eq!(limiter.tracked(), 0, "removed at zero");
        let capacity: usize = limiter
            .shards
            .iter()
            .map(|s| s.lock().map(|m| m.capacity()).unwrap_or(0))
            .sum();
        assert!(capacity <= SHARDS * 64, "shards shrank back: {capacity}");
    }
}
