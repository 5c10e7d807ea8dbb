//! A frontend's `max_connections_per_source`: client connections open at
//! once from one source, counted for every serving thread together, as
//! HAProxy's `tcp-request connection reject if { src_conn_cur ge N }`.
//!
//! A source is an IPv4 address or an IPv6 /64 (one host may use a whole
//! /64), of the TCP peer as accepted: a PROXY header's client is not known
//! yet, as for HAProxy's `tcp-request connection` rules. The counts live in
//! one map under a mutex, taken once when a connection opens and once when
//! it closes; a source with no connection left has no entry, so the map
//! holds at most one entry per open connection.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

/// The source a connection is counted against.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum SourceKey {
    /// An IPv4 address (an IPv4-mapped IPv6 peer of a dual-stack listener too).
    V4(u32),
    /// The /64 prefix of an IPv6 address.
    V6(u64),
}

impl SourceKey {
    /// The source of a peer at `ip`.
    pub(crate) fn of(ip: IpAddr) -> SourceKey {
        match ip {
            IpAddr::V4(v4) => SourceKey::V4(v4.to_bits()),
            // On a [::] listener IPv4 clients come as ::ffff:a.b.c.d, all in
            // one /64: each is its own address.
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => SourceKey::V4(v4.to_bits()),
                None => SourceKey::V6((v6.to_bits() >> 64) as u64),
            },
        }
    }
}

/// The open connections of each source of one frontend, shared by its serving threads.
#[derive(Debug)]
pub(crate) struct SourceLimit {
    /// Connections a source may have open at once.
    max: u32,
    open: Mutex<HashMap<SourceKey, u32>>,
}

impl SourceLimit {
    /// A limit of `max` connections per source, or `None` for 0 (no limit).
    pub(crate) fn new(max: usize) -> Option<Arc<SourceLimit>> {
        // validate() keeps it within max_connections (at most 2^30).
        let max = u32::try_from(max).unwrap_or(u32::MAX);
        (max > 0).then(|| {
            Arc::new(SourceLimit {
                max,
                open: Mutex::default(),
            })
        })
    }

    /// Counts a connection from `ip`, or `None` if its source is at the limit.
    pub(crate) fn open(self: &Arc<Self>, ip: IpAddr) -> Option<SourceSlot> {
        let key = SourceKey::of(ip);
        let mut open = self.lock();
        let n = open.entry(key).or_insert(0);
        if *n >= self.max {
            return None;
        }
        *n += 1;
        Some(SourceSlot {
            limit: self.clone(),
            key,
        })
    }

    /// Connections open from the source of `ip`.
    #[cfg(test)]
    fn count(&self, ip: IpAddr) -> u32 {
        self.lock().get(&SourceKey::of(ip)).copied().unwrap_or(0)
    }

    /// Sources with a connection open.
    #[cfg(test)]
    fn sources(&self) -> usize {
        self.lock().len()
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<SourceKey, u32>> {
        // The map is consistent between statements: a panic cannot leave it half-changed.
        self.open.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// One open connection of a source, counted until dropped.
#[derive(Debug)]
pub(crate) struct SourceSlot {
    limit: Arc<SourceLimit>,
    key: SourceKey,
}

impl Drop for SourceSlot {
    fn drop(&mut self) {
        let mut open = self.limit.lock();
        if let Some(n) = open.get_mut(&self.key) {
            *n = n.saturating_sub(1);
            if *n == 0 {
                open.remove(&self.key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn no_limit_is_none() {
        assert!(SourceLimit::new(0).is_none());
    }

    #[test]
    fn a_source_gets_max_slots_and_one_back_when_one_closes() {
        let limit = SourceLimit::new(3).unwrap();
        let a = ip("192.0.2.1");
        let mut slots: Vec<_> = (0..3).map(|_| limit.open(a).unwrap()).collect();
        assert!(limit.open(a).is_none(), "a fourth from the same address");
        let other = limit.open(ip("192.0.2.2"));
        assert!(other.is_some(), "another address has its own count");
        assert_eq!(limit.count(a), 3, "a refusal counts nothing");
        slots.pop();
        assert_eq!(limit.count(a), 2);
        slots.push(limit.open(a).unwrap());
        assert!(limit.open(a).is_none());
        drop(slots);
        drop(other);
        assert_eq!(limit.sources(), 0, "no entry left for closed sources");
    }

    #[test]
    fn ipv6_sources_are_64s_and_mapped_ipv4_is_ipv4() {
        let limit = SourceLimit::new(1).unwrap();
        let _one = limit.open(ip("2001:db8:1:2::1")).unwrap();
        assert!(limit.open(ip("2001:db8:1:2:ffff::9")).is_none(), "same /64");
        let _next = limit.open(ip("2001:db8:1:3::1")).unwrap();
        let _v4 = limit.open(ip("::ffff:192.0.2.1")).unwrap();
        assert!(limit.open(ip("192.0.2.1")).is_none(), "mapped is the same");
        let _v4b = limit.open(ip("::ffff:192.0.2.2")).unwrap();
        assert_eq!(limit.sources(), 4);
    }

    #[test]
    fn threads_share_the_counts() {
        let limit = SourceLimit::new(5).unwrap();
        let a = ip("198.51.100.7");
        // 4 threads try 3 each at once: exactly 5 get in.
        let got: Vec<Vec<SourceSlot>> = std::thread::scope(|s| {
            let tries: Vec<_> = (0..4)
                .map(|_| s.spawn(|| (0..3).filter_map(|_| limit.open(a)).collect()))
                .collect();
            tries.into_iter().map(|t| t.join().unwrap()).collect()
        });
        assert_eq!(got.iter().map(Vec::len).sum::<usize>(), 5);
        assert_eq!(limit.count(a), 5);
        drop(got);
        assert_eq!(limit.sources(), 0);
    }
}
