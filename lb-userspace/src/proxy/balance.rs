//! Server choice within a pool: state per server and the four algorithms.

use std::hash::{BuildHasher, RandomState};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use super::model::{Algorithm, ServerSpec};

/// Live state of one server.
#[derive(Debug)]
pub struct ServerState {
    /// Where to connect.
    pub addr: SocketAddr,
    /// Configured weight.
    pub weight: u32,
    /// Backup server.
    pub backup: bool,
    up: AtomicBool,
    active: AtomicUsize,
}

impl ServerState {
    /// Whether health checks consider it usable.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Requests currently in flight to it.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }
}

/// Counts a request in flight on a server until dropped.
#[derive(Debug)]
pub struct Active(Arc<ServerState>);

impl Active {
    /// Starts counting on `server`.
    pub fn new(server: Arc<ServerState>) -> Self {
        server.active.fetch_add(1, Ordering::Relaxed);
        Active(server)
    }

    /// The server counted.
    pub fn server(&self) -> &Arc<ServerState> {
        &self.0
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Picks servers of one pool.
#[derive(Debug)]
pub struct Balancer {
    algorithm: Algorithm,
    servers: Vec<Arc<ServerState>>,
    /// Smooth round robin's current weights, one per server.
    current: Mutex<Vec<i64>>,
    /// Rotates the start of leastconn's scan so equal loads share the work.
    rotor: AtomicUsize,
    rng: AtomicU64,
}

impl Balancer {
    /// All servers start up.
    pub fn new(algorithm: Algorithm, specs: &[ServerSpec]) -> Self {
        let servers: Vec<_> = specs
            .iter()
            .map(|s| {
                Arc::new(ServerState {
                    addr: s.address,
                    weight: s.weight,
                    backup: s.backup,
                    up: AtomicBool::new(true),
                    active: AtomicUsize::new(0),
                })
            })
            .collect();
        let seed = RandomState::new().hash_one(0u8) | 1;
        Balancer {
            algorithm,
            current: Mutex::new(vec![0; servers.len()]),
            servers,
            rotor: AtomicUsize::new(0),
            rng: AtomicU64::new(seed),
        }
    }

    /// Server `i` as returned by `pick`.
    pub fn server(&self, i: usize) -> &Arc<ServerState> {
        &self.servers[i]
    }

    /// All servers, in configuration order.
    pub fn servers(&self) -> &[Arc<ServerState>] {
        &self.servers
    }

    /// Marks every server at `addr` up or down; false if there is none.
    pub fn set_up(&self, addr: SocketAddr, up: bool) -> bool {
        let mut found = false;
        for s in self.servers.iter().filter(|s| s.addr == addr) {
            s.up.store(up, Ordering::Relaxed);
            found = true;
        }
        found
    }

    /// Chooses a server index, avoiding `exclude`; backups only when no
    /// regular server is usable; None when nothing is.
    pub fn pick(&self, exclude: &[usize]) -> Option<usize> {
        let usable = |backup: bool| -> Vec<usize> {
            (0..self.servers.len())
                .filter(|&i| {
                    let s = &self.servers[i];
                    s.backup == backup && s.weight > 0 && s.is_up() && !exclude.contains(&i)
                })
                .collect()
        };
        let mut cands = usable(false);
        if cands.is_empty() {
            cands = usable(true);
        }
        if cands.is_empty() {
            return None;
        }
        Some(match self.algorithm {
            Algorithm::First => cands[0],
            Algorithm::RoundRobin => self.smooth_rr(&cands),
            Algorithm::LeastConn => self.least_conn(&cands),
            Algorithm::Random2 => self.random2(&cands),
        })
    }

    fn smooth_rr(&self, cands: &[usize]) -> usize {
        // A poisoned lock only means another picker panicked; the weights are still valid numbers.
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0i64;
        let mut best = cands[0];
        for &i in cands {
            let w = i64::from(self.servers[i].weight);
            cur[i] += w;
            total += w;
            if cur[i] > cur[best] {
                best = i;
            }
        }
        cur[best] -= total;
        best
    }

    /// True when `a` is less loaded than `b` relative to their weights.
    fn lighter(&self, a: usize, b: usize) -> bool {
        let (sa, sb) = (&self.servers[a], &self.servers[b]);
        (sa.active() as u128) * u128::from(sb.weight)
            < (sb.active() as u128) * u128::from(sa.weight)
    }

    fn least_conn(&self, cands: &[usize]) -> usize {
        let start = self.rotor.fetch_add(1, Ordering::Relaxed) % cands.len();
        let mut best = cands[start];
        for k in 1..cands.len() {
            let i = cands[(start + k) % cands.len()];
            if self.lighter(i, best) {
                best = i;
            }
        }
        best
    }

    fn next_random(&self) -> u64 {
        // xorshift64*: plenty for spreading load, and lock-free.
        let step = |mut x: u64| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            x
        };
        let prev = self
            .rng
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |x| Some(step(x)))
            .unwrap_or_else(|x| x);
        step(prev).wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn random2(&self, cands: &[usize]) -> usize {
        let n = cands.len() as u64;
        if n == 1 {
            return cands[0];
        }
        let r = self.next_random();
        let a = (r % n) as usize;
        // Second choice distinct from the first.
        let b = (a + 1 + ((r >> 32) % (n - 1)) as usize) % cands.len();
        let (a, b) = (cands[a], cands[b]);
        if self.lighter(b, a) { b } else { a }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn specs(weights: &[(u32, bool)]) -> Vec<ServerSpec> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &(weight, backup))| ServerSpec {
                address: SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                weight,
                backup,
            })
            .collect()
    }

    #[test]
    fn smooth_round_robin_interleaves_by_weight() {
        let b = Balancer::new(
            Algorithm::RoundRobin,
            &specs(&[(5, false), (1, false), (1, false)]),
        );
        let seq: Vec<usize> = (0..7).map(|_| b.pick(&[]).unwrap()).collect();
        // nginx's documented sequence for weights 5,1,1.
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn round_robin_one_to_two() {
        let b = Balancer::new(Algorithm::RoundRobin, &specs(&[(1, false), (2, false)]));
        let seq: Vec<usize> = (0..6).map(|_| b.pick(&[]).unwrap()).collect();
        assert_eq!(seq, vec![1, 0, 1, 1, 0, 1]);
    }

    #[test]
    fn least_conn_prefers_idle() {
        let b = Balancer::new(Algorithm::LeastConn, &specs(&[(1, false), (1, false)]));
        let _busy = Active::new(b.server(0).clone());
        for _ in 0..5 {
            assert_eq!(b.pick(&[]), Some(1));
        }
    }

    #[test]
    fn random2_avoids_the_loaded_server() {
        let b = Balancer::new(Algorithm::Random2, &specs(&[(1, false), (1, false)]));
        let _busy: Vec<_> = (0..3).map(|_| Active::new(b.server(1).clone())).collect();
        for _ in 0..20 {
            assert_eq!(b.pick(&[]), Some(0));
        }
        let b = Balancer::new(Algorithm::Random2, &specs(&[(1, false); 4]));
        let mut seen = [0; 4];
        for _ in 0..400 {
            seen[b.pick(&[]).unwrap()] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }

    #[test]
    fn first_down_backup_and_exclusion() {
        let s = specs(&[(1, false), (1, false), (1, true)]);
        let b = Balancer::new(Algorithm::First, &s);
        assert_eq!(b.pick(&[]), Some(0));
        assert_eq!(b.pick(&[0]), Some(1));
        assert!(b.set_up(s[0].address, false));
        assert_eq!(b.pick(&[]), Some(1));
        b.set_up(s[1].address, false);
        assert_eq!(b.pick(&[]), Some(2));
        b.set_up(s[2].address, false);
        assert_eq!(b.pick(&[]), None);
        b.set_up(s[0].address, true);
        assert_eq!(b.pick(&[]), Some(0));
        assert!(!b.set_up(SocketAddr::from(([10, 0, 0, 1], 1)), true));
    }

    #[test]
    fn zero_weight_takes_nothing() {
        let b = Balancer::new(Algorithm::RoundRobin, &specs(&[(0, false), (1, false)]));
        assert!((0..5).all(|_| b.pick(&[]) == Some(1)));
    }
}
