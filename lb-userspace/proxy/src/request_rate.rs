//! Requests per source over a sliding period, for the `src_request_rate`
//! ACL: HAProxy's `http_req_rate(period)` in a stick table tracked by
//! `src` (`http-request track-sc0 src`), so that a client flooding one
//! keep-alive connection can be answered 429 before any server sees it.
//!
//! A source is an IPv4 address or an IPv6 /64, as for
//! `max_connections_per_source`. Each request of a frontend that has such
//! an ACL counts once, whatever rules it meets, before the request rules
//! run; every serving thread counts into the same table. The rate is
//! HAProxy's estimate over two fixed windows of one period: the requests of
//! the current window plus the previous window's, weighted by how much of
//! it the sliding period still covers. A table holds at most
//! `TRACKED_SOURCES` sources (HAProxy's `size`); when it is full, sources
//! idle for two periods are dropped first (at most once a second), and a
//! new source that still finds no room is not counted (warned once). A reload hands the tables
//! of a frontend to its successor of the same name, period by period.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use crate::source_limit::SourceKey;

/// Sources one table tracks at most (about 50 bytes each).
pub(crate) const TRACKED_SOURCES: usize = 100_000;

/// A full table is swept for idle sources at most this often: a sweep
/// walks every source, and new sources arriving at a full table must not
/// each pay for one.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// One source's requests in the current and the previous window.
#[derive(Debug, Clone, Copy)]
struct Window {
    /// Start of the current window.
    start: Instant,
    current: u32,
    previous: u32,
}

impl Window {
    /// A window starting at `now` with one request.
    fn first(now: Instant) -> Window {
        Window {
            start: now,
            current: 1,
            previous: 0,
        }
    }

    /// Counts a request at `now`; the rate over the `period` before it.
    fn hit(&mut self, now: Instant, period: Duration) -> u32 {
        let since = now.saturating_duration_since(self.start);
        if since >= 2 * period {
            *self = Window::first(now);
            return 1;
        }
        if since >= period {
            self.previous = self.current;
            self.current = 0;
            self.start += period;
        }
        self.current = self.current.saturating_add(1);
        self.rate(now, period)
    }

    /// The current window's requests plus the previous one's share of the
    /// sliding period (HAProxy's `freq_ctr`), as `hit` would see the
    /// windows at `now`: a read must age them too, or a source that only
    /// reads (refused, so not counted) would keep its rate for ever.
    fn rate(&self, now: Instant, period: Duration) -> u32 {
        let since = now.saturating_duration_since(self.start);
        let (current, previous, into) = if since >= 2 * period {
            return 0;
        } else if since >= period {
            (0, self.current, since - period)
        } else {
            (self.current, self.previous, since)
        };
        let left = (period - into).as_nanos();
        let share = u128::from(previous) * left / period.as_nanos().max(1);
        current.saturating_add(u32::try_from(share).unwrap_or(u32::MAX))
    }
}

/// The request rates of one frontend's sources over one period.
#[derive(Debug)]
pub(crate) struct RequestRate {
    period: Duration,
    table: Mutex<Table>,
    full_warned: AtomicBool,
}

/// The sources of a [`RequestRate`] and when a full table was last swept.
#[derive(Debug, Default)]
struct Table {
    sources: HashMap<SourceKey, Window>,
    swept: Option<Instant>,
}

impl RequestRate {
    /// An empty table counting over `period`.
    pub(crate) fn new(period: Duration) -> RequestRate {
        RequestRate {
            period,
            table: Mutex::default(),
            full_warned: AtomicBool::new(false),
        }
    }

    /// The period it counts over.
    pub(crate) fn period(&self) -> Duration {
        self.period
    }

    /// Counts a request from `src` at `now`; its source's rate, this request included.
    pub(crate) fn hit(&self, src: IpAddr, now: Instant) -> u32 {
        self.hit_within(src, now, TRACKED_SOURCES)
    }

    /// `src`'s rate at `now` without counting (0 for a source not tracked).
    pub(crate) fn rate(&self, src: IpAddr, now: Instant) -> u32 {
        let table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        table
            .sources
            .get(&SourceKey::of(src))
            .map_or(0, |w| w.rate(now, self.period))
    }

    fn hit_within(&self, src: IpAddr, now: Instant, capacity: usize) -> u32 {
        let key = SourceKey::of(src);
        let period = self.period;
        let mut table = self.table.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(w) = table.sources.get_mut(&key) {
            return w.hit(now, period);
        }
        let sweep_due = table
            .swept
            .is_none_or(|at| now.saturating_duration_since(at) >= SWEEP_EVERY);
        if table.sources.len() >= capacity && sweep_due {
            table.swept = Some(now);
            table
                .sources
                .retain(|_, w| now.saturating_duration_since(w.start) < 2 * period);
        }
        if table.sources.len() >= capacity {
            if !self.full_warned.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    sources = capacity,
                    "src_request_rate table full: new sources are not counted until some go idle"
                );
            }
            return 1;
        }
        table.sources.insert(key, Window::first(now));
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Duration = Duration::from_secs(10);

    fn at(base: Instant, ms: u64) -> Instant {
        base + Duration::from_millis(ms)
    }

    #[test]
    fn counts_within_a_period_then_slides() {
        let t0 = Instant::now();
        let mut w = Window::first(t0);
        for i in 2..=10 {
            assert_eq!(w.hit(at(t0, i * 100), P), i as u32);
        }
        // Half way into the next window: 10 before, weighted by half, plus this one.
        assert_eq!(w.hit(at(t0, 15_000), P), 1 + 5);
        // The next window but one: the previous is this one request.
        assert_eq!(w.hit(at(t0, 20_000), P), 1 + 1);
        // Two idle periods later it starts afresh.
        assert_eq!(w.hit(at(t0, 45_000), P), 1);
    }

    #[test]
    fn a_rate_read_without_hits_falls_as_time_passes() {
        let t0 = Instant::now();
        let mut w = Window::first(t0);
        for i in 2..=10 {
            w.hit(at(t0, i * 100), P);
        }
        assert_eq!(w.rate(at(t0, 5_000), P), 10);
        // A quarter into the next window: three quarters of the 10 before.
        assert_eq!(w.rate(at(t0, 12_500), P), 7);
        assert_eq!(w.rate(at(t0, 19_999), P), 0);
        assert_eq!(w.rate(at(t0, 25_000), P), 0);
        assert_eq!(w.rate(at(t0, 3_600_000), P), 0);
        let r = RequestRate::new(P);
        let src = "192.0.2.9".parse().unwrap();
        for i in 0..10 {
            r.hit(src, at(t0, i));
        }
        assert_eq!(r.rate(src, at(t0, 10)), 10);
        assert_eq!(r.rate(src, at(t0, 20_000)), 0, "read only, never hit again");
    }

    #[test]
    fn sources_are_addresses_and_ipv6_prefixes() {
        let r = RequestRate::new(P);
        let t0 = Instant::now();
        let hit = |ip: &str, n: u64| r.hit(ip.parse().unwrap(), at(t0, n));
        assert_eq!(hit("192.0.2.1", 0), 1);
        assert_eq!(hit("192.0.2.1", 1), 2);
        assert_eq!(hit("192.0.2.2", 2), 1, "another IPv4 address");
        assert_eq!(
            hit("::ffff:192.0.2.1", 3),
            3,
            "IPv4-mapped is the IPv4 address"
        );
        assert_eq!(hit("2001:db8:1:2::1", 4), 1);
        assert_eq!(hit("2001:db8:1:2::ff", 5), 2, "same /64");
        assert_eq!(hit("2001:db8:1:3::1", 6), 1, "another /64");
    }

    #[test]
    fn a_full_table_drops_idle_sources_first() {
        let r = RequestRate::new(P);
        let t0 = Instant::now();
        let hit = |ip: &str, ms: u64| r.hit_within(ip.parse().unwrap(), at(t0, ms), 2);
        assert_eq!(hit("192.0.2.1", 0), 1);
        assert_eq!(hit("192.0.2.2", 15_000), 1);
        // Full, nobody idle for two periods (the sweep finds no one): a
        // new source is not counted.
        for _ in 0..3 {
            assert_eq!(hit("192.0.2.3", 19_800), 1);
        }
        // 192.0.2.1 is now idle for two periods, but the last sweep was
        // too recent for another: still not counted.
        assert_eq!(hit("192.0.2.3", 20_100), 1);
        assert_eq!(hit("192.0.2.3", 20_200), 1);
        // A sweep later, 192.0.2.1 makes room.
        assert_eq!(hit("192.0.2.3", 20_800), 1);
        assert_eq!(hit("192.0.2.3", 20_900), 2);
        assert_eq!(hit("192.0.2.2", 21_000), 2);
    }
}
