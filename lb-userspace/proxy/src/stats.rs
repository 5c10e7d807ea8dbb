//! Request counters of frontends, pools and pool servers (HAProxy's stats):
//! requests, responses by status class, bytes, denials, connect errors,
//! retries, queue time and histograms of the connect, first-byte and total
//! times. One `Counters` per frontend, pool and server is allocated when the
//! proxy starts; a request adds to them with relaxed atomics when its access
//! log record is finished (`Tally`), without a lock or an allocation.
//!
//! Each `Counters` is split into per-thread shards (`Shard`), summed when
//! read: a serving thread adds to its own shard, and its requests take a
//! reference to that shard only, so no cache line (counter or reference
//! count) goes back and forth between serving threads per request.
//!
//! Counters live as long as the proxy: a restart of the proxy (changed
//! frontends or pools) starts them from zero, as a reload does in HAProxy.

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

/// Upper bounds (milliseconds) of the time histograms' buckets; a last,
/// unbounded one (`+Inf`) follows. Times are measured in whole milliseconds.
pub const BUCKETS_MS: [u64; 12] = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000];

/// Status classes of `Counters::responses`, in order.
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "other"];

/// A histogram of durations in milliseconds, Prometheus style.
#[derive(Debug, Default)]
pub struct Histogram {
    /// Per bucket of `BUCKETS_MS` (not cumulative), then the `+Inf` one.
    buckets: [AtomicU64; BUCKETS_MS.len() + 1],
    sum_ms: AtomicU64,
}

/// A histogram read at one moment.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct HistogramSnapshot {
    /// Cumulative counts: observations <= `BUCKETS_MS[i]`, then all of them.
    pub cumulative: Vec<u64>,
    /// Sum of the observations, milliseconds.
    pub sum_ms: u64,
}

impl HistogramSnapshot {
    /// A histogram with no observation (every bucket present).
    fn zero() -> Self {
        HistogramSnapshot {
            cumulative: vec![0; BUCKETS_MS.len() + 1],
            sum_ms: 0,
        }
    }

    /// Number of observations.
    pub fn count(&self) -> u64 {
        self.cumulative.last().copied().unwrap_or(0)
    }
}

impl Histogram {
    /// Adds one observation; negative ones (not measured) are skipped.
    pub fn observe(&self, ms: i64) {
        let Ok(ms) = u64::try_from(ms) else { return };
        let i = BUCKETS_MS.partition_point(|&b| b < ms);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum_ms.fetch_add(ms, Ordering::Relaxed);
    }

    /// Adds this histogram's counts to `s` (cumulated, as `snapshot`'s).
    fn add_to(&self, s: &mut HistogramSnapshot) {
        let mut total = 0;
        for (t, b) in s.cumulative.iter_mut().zip(&self.buckets) {
            total += b.load(Ordering::Relaxed);
            *t += total;
        }
        s.sum_ms += self.sum_ms.load(Ordering::Relaxed);
    }

    /// The counts now, cumulated.
    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let cumulative = self
            .buckets
            .iter()
            .map(|b| {
                total += b.load(Ordering::Relaxed);
                total
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            sum_ms: self.sum_ms.load(Ordering::Relaxed),
        }
    }
}

/// Shards a `Counters` has at most: more serving threads share them (the
/// adds stay atomic, so that is correct, only slower).
const MAX_SHARDS: usize = 16;

thread_local! {
    /// The shard this thread adds to (its serving thread's index; 0 elsewhere).
    static SHARD: Cell<usize> = const { Cell::new(0) };
}

/// Makes the calling thread, serving thread `index`, add to shard `index`
/// (modulo the shard count) of every `Counters`.
pub(crate) fn enter_thread(index: usize) {
    SHARD.set(index);
}

/// Shards per `Counters`: one per CPU the process may run on (serving
/// threads default to that many), at most `MAX_SHARDS`.
fn shard_count() -> usize {
    static COUNT: OnceLock<usize> = OnceLock::new();
    *COUNT
        .get_or_init(|| std::thread::available_parallelism().map_or(1, |n| n.get().min(MAX_SHARDS)))
}

/// The counters of one frontend, pool or server (each uses the fields that
/// apply to it; the others stay zero), one shard per serving thread.
#[derive(Debug)]
pub struct Counters {
    shards: Box<[Arc<Shard>]>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            shards: (0..shard_count()).map(|_| Arc::default()).collect(),
        }
    }
}

/// One thread's part of a `Counters`, on cache lines of its own.
#[derive(Debug, Default)]
#[repr(align(128))]
pub struct Shard {
    /// Requests seen (frontend) or forwarded (pool, server).
    pub requests: AtomicU64,
    /// Responses by `STATUS_CLASSES`.
    pub responses: [AtomicU64; STATUS_CLASSES.len()],
    /// Request body bytes, as declared by Content-Length.
    pub bytes_in: AtomicU64,
    /// Response body bytes sent to clients.
    pub bytes_out: AtomicU64,
    /// Requests refused by a request rule (deny, failed auth): HAProxy's `dreq`.
    pub denied: AtomicU64,
    /// Client connections accepted (frontends).
    pub connections: AtomicU64,
    /// Client connections closed unserved by `max_connections_per_source`
    /// or a `reject` rule (frontends; not in `connections`): HAProxy's `dcon`.
    pub denied_connections: AtomicU64,
    /// Response body bytes given to the compressor (frontends): HAProxy's `comp_in`.
    pub comp_in: AtomicU64,
    /// Compressed bytes it made of them: HAProxy's `comp_out`.
    pub comp_out: AtomicU64,
    /// Responses compressed: HAProxy's `comp_rsp`.
    pub comp_responses: AtomicU64,
    /// Connections to servers that failed (pools, servers).
    pub connect_errors: AtomicU64,
    /// Times taken out after `max_fails` failed attempts in a row (servers).
    pub taken_out: AtomicU64,
    /// Attempts made again after a failure (pools, servers).
    pub retries: AtomicU64,
    /// Retries sent to another server (pools).
    pub redispatches: AtomicU64,
    /// Sum of the time requests waited in the pool's queue, milliseconds.
    pub queue_ms: AtomicU64,
    /// Most connections open (frontends) or requests in flight (servers) at
    /// once: HAProxy's `smax`.
    pub max_current: AtomicU64,
    /// Time to connect to the server (new connections only).
    pub connect_time: Histogram,
    /// Time from sending the request to the response head.
    pub first_byte_time: Histogram,
    /// Time of the whole request, to its last response byte.
    pub total_time: Histogram,
}

/// `Counters` read at one moment (each value on its own: no lock holds them still).
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CounterSnapshot {
    /// See `Counters::requests`.
    pub requests: u64,
    /// See `Counters::responses`, by `STATUS_CLASSES`.
    pub responses: [u64; STATUS_CLASSES.len()],
    /// See `Counters::bytes_in`.
    pub bytes_in: u64,
    /// See `Counters::bytes_out`.
    pub bytes_out: u64,
    /// See `Counters::denied`.
    pub denied: u64,
    /// See `Counters::connections`.
    pub connections: u64,
    /// See `Counters::denied_connections` (absent from an older agent's figures).
    #[serde(default)]
    pub denied_connections: u64,
    /// See `Shard::comp_in` (absent from an older agent's figures, as the two below).
    #[serde(default)]
    pub comp_in: u64,
    /// See `Shard::comp_out`.
    #[serde(default)]
    pub comp_out: u64,
    /// See `Shard::comp_responses`.
    #[serde(default)]
    pub comp_responses: u64,
    /// See `Counters::connect_errors`.
    pub connect_errors: u64,
    /// See `Shard::taken_out`.
    pub taken_out: u64,
    /// See `Counters::retries`.
    pub retries: u64,
    /// See `Counters::redispatches`.
    pub redispatches: u64,
    /// See `Counters::queue_ms`.
    pub queue_ms: u64,
    /// See `Counters::max_current`.
    pub max_current: u64,
    /// See `Counters::connect_time`.
    pub connect_time: HistogramSnapshot,
    /// See `Counters::first_byte_time`.
    pub first_byte_time: HistogramSnapshot,
    /// See `Counters::total_time`.
    pub total_time: HistogramSnapshot,
}

fn read(c: &AtomicU64) -> u64 {
    c.load(Ordering::Relaxed)
}

fn add(c: &AtomicU64, n: u64) {
    c.fetch_add(n, Ordering::Relaxed);
}

impl Counters {
    /// This thread's shard.
    fn local(&self) -> &Arc<Shard> {
        &self.shards[SHARD.get() % self.shards.len()]
    }

    /// This thread's shard, for a request's `Tally`.
    pub(crate) fn shard(&self) -> Arc<Shard> {
        self.local().clone()
    }

    /// The values now: the shards summed (`max_current`: their maximum).
    pub fn snapshot(&self) -> CounterSnapshot {
        let mut s = CounterSnapshot {
            connect_time: HistogramSnapshot::zero(),
            first_byte_time: HistogramSnapshot::zero(),
            total_time: HistogramSnapshot::zero(),
            ..CounterSnapshot::default()
        };
        for shard in self.shards.iter() {
            shard.add_to(&mut s);
        }
        s
    }

    /// Counts a server taken out after `max_fails` failed attempts.
    pub(crate) fn taken_out(&self) {
        add(&self.local().taken_out, 1);
    }

    /// Counts a connect failure.
    pub(crate) fn connect_error(&self) {
        add(&self.local().connect_errors, 1);
    }

    /// Counts a retry, and a redispatch if it goes to another server.
    pub(crate) fn retry(&self, redispatch: bool) {
        let local = self.local();
        add(&local.retries, 1);
        if redispatch {
            add(&local.redispatches, 1);
        }
    }

    /// Raises `max_current` to `n` if it is below (a plain read first: the
    /// maximum rarely moves, and a read does not take the cache line away).
    pub(crate) fn observe_current(&self, n: u64) {
        let local = self.local();
        if n > read(&local.max_current) {
            local.max_current.fetch_max(n, Ordering::Relaxed);
        }
    }

    /// Counts an accepted client connection.
    pub(crate) fn connection(&self) {
        add(&self.local().connections, 1);
    }

    /// Counts a client connection refused by the per-source limit or a `reject` rule.
    pub(crate) fn denied_connection(&self) {
        add(&self.local().denied_connections, 1);
    }
}

impl Shard {
    /// Counts `bytes_in` given to the compressor and the `bytes_out` it made.
    pub(crate) fn compressed(&self, bytes_in: u64, bytes_out: u64) {
        add(&self.comp_in, bytes_in);
        add(&self.comp_out, bytes_out);
    }

    /// Counts a response that is compressed.
    pub(crate) fn compressed_response(&self) {
        add(&self.comp_responses, 1);
    }

    /// Adds this shard's values to `s`.
    fn add_to(&self, s: &mut CounterSnapshot) {
        s.requests += read(&self.requests);
        for (t, c) in s.responses.iter_mut().zip(&self.responses) {
            *t += read(c);
        }
        s.bytes_in += read(&self.bytes_in);
        s.bytes_out += read(&self.bytes_out);
        s.denied += read(&self.denied);
        s.connections += read(&self.connections);
        s.denied_connections += read(&self.denied_connections);
        s.comp_in += read(&self.comp_in);
        s.comp_out += read(&self.comp_out);
        s.comp_responses += read(&self.comp_responses);
        s.connect_errors += read(&self.connect_errors);
        s.taken_out += read(&self.taken_out);
        s.retries += read(&self.retries);
        s.redispatches += read(&self.redispatches);
        s.queue_ms += read(&self.queue_ms);
        s.max_current = s.max_current.max(read(&self.max_current));
        self.connect_time.add_to(&mut s.connect_time);
        self.first_byte_time.add_to(&mut s.first_byte_time);
        self.total_time.add_to(&mut s.total_time);
    }

    /// Adds one finished request.
    fn request(&self, r: &Outcome, forwarded: bool) {
        add(&self.requests, 1);
        let class = match r.status {
            100..=599 => usize::from(r.status / 100 - 1),
            _ => STATUS_CLASSES.len() - 1,
        };
        add(&self.responses[class], 1);
        add(&self.bytes_in, r.bytes_in);
        add(&self.bytes_out, r.bytes);
        if forwarded {
            add(&self.queue_ms, u64::try_from(r.tw).unwrap_or(0));
            // A reused connection reports 0, as in HAProxy's Tc.
            self.connect_time.observe(r.tc);
            self.first_byte_time.observe(r.tr);
        }
        self.total_time.observe(r.tt);
    }
}

/// A finished request as its access log record tells it (times in
/// milliseconds, -1 when not reached).
pub(crate) struct Outcome {
    pub status: u16,
    pub bytes_in: u64,
    pub bytes: u64,
    pub tw: i64,
    pub tc: i64,
    pub tr: i64,
    pub tt: i64,
    /// Refused by a request rule (termination `PR`).
    pub denied: bool,
}

/// Where a request's figures go: its frontend, its pool and its server, as
/// far as it got. Carried by its access log record.
#[derive(Debug, Clone, Default)]
pub(crate) struct Tally {
    pub frontend: Option<Arc<Shard>>,
    pub pool: Option<Arc<Shard>>,
    pub server: Option<Arc<Shard>>,
}

// What a record says is its fields; where it is counted is not part of it.
impl PartialEq for Tally {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for Tally {}

impl Tally {
    /// Adds the finished request `r` to every counter it reached.
    pub(crate) fn count(&self, r: &Outcome) {
        if let Some(f) = &self.frontend {
            f.request(r, false);
            if r.denied {
                add(&f.denied, 1);
            }
        }
        if let Some(p) = &self.pool {
            p.request(r, true);
        }
        if let Some(s) = &self.server {
            s.request(r, true);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        for ms in [0, 1, 2, 7, 20_000, -1] {
            h.observe(ms);
        }
        let s = h.snapshot();
        assert_eq!(s.cumulative[0], 2, "0 and 1 ms are <= 1 ms");
        assert_eq!(s.cumulative[1], 3, "2 ms is <= 5 ms");
        assert_eq!(s.cumulative[2], 4, "7 ms is <= 10 ms");
        assert_eq!(s.cumulative[BUCKETS_MS.len() - 1], 4);
        assert_eq!(s.count(), 5, "the unmeasured -1 is not counted");
        assert_eq!(s.sum_ms, 20_010);
    }

    #[test]
    fn shards_of_every_thread_are_summed() {
        let c = Arc::new(Counters::default());
        let outcome = |status, tt| Outcome {
            status,
            bytes_in: 3,
            bytes: 10,
            tw: 0,
            tc: 0,
            tr: 2,
            tt,
            denied: false,
        };
        let threads: Vec<_> = (0..3)
            .map(|i| {
                let c = c.clone();
                std::thread::spawn(move || {
                    enter_thread(i);
                    let tally = Tally {
                        frontend: None,
                        pool: Some(c.shard()),
                        server: None,
                    };
                    tally.count(&outcome(200 + 300 * (i as u16 % 2), 7));
                    c.observe_current(5 + i as u64);
                    c.connection();
                    c.denied_connection();
                    c.retry(true);
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let s = c.snapshot();
        assert_eq!((s.requests, s.responses[1], s.responses[4]), (3, 2, 1));
        assert_eq!((s.bytes_in, s.bytes_out), (9, 30));
        assert_eq!((s.connections, s.retries, s.redispatches), (3, 3, 3));
        assert_eq!(s.denied_connections, 3);
        assert_eq!(s.max_current, 7, "the most any thread saw");
        assert_eq!(s.total_time.cumulative[2], 3, "7 ms is <= 10 ms");
        assert_eq!((s.total_time.count(), s.total_time.sum_ms), (3, 21));
        assert_eq!(s.first_byte_time.count(), 3);
        assert_eq!(
            Counters::default().snapshot().connect_time.cumulative.len(),
            13
        );
    }
}
