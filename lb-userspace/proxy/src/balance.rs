//! Server choice within a pool: state per server, the algorithms (round robin,
//! leastconn, random2, first, and Maglev consistent hashes of the source, the
//! URI or a header), per-server `maxconn` and the pool's FIFO queue.
//!
//! Hash algorithms look the request's key (`jhash_bytes`) up in a Maglev table
//! of `HASH_TABLE_SIZE` entries built by `lb_common::maglev` over every
//! regular server (its "home" server). A key whose home is not usable goes to
//! a second table built over the usable servers only, rebuilt whenever a
//! server goes up or down. So a server going down moves exactly its own keys,
//! spread over the others, and they come back when it does.
//!
//! A pool with a persistence `cookie` names each server by a value derived
//! from its address (`ServerState::cookie`); a request whose cookie names a
//! server goes there while it serves or drains (`Pick::sticky`), else it is
//! balanced as any other (HAProxy's `cookie ... insert indirect` with
//! `option redispatch`).
//!
//! With any `maxconn` set, taking and giving back a server's slot happen under
//! the pool's queue lock: a finishing request hands its slot straight to the
//! oldest queued request that can use it, so queued requests go first.
//!
//! A pool's servers change in place (`Balancer::set_servers`: the CLI, the
//! REST API, DNS discovery), as with HAProxy's `add server`: a server that
//! stays keeps its `ServerState` (health, requests in flight, counters), and
//! choices made afterwards see the new set. Requests name servers by address
//! (`Pick::sticky`, the servers a retry avoids), so a request queued or
//! retrying across a change still means the same server.
//!
//! With `slowstart`, a server that starts taking requests again (back up,
//! out of maintenance, or added at runtime) has its weight ramp up from almost nothing
//! to its own over that time under roundrobin, leastconn and random2
//! (HAProxy's `slowstart`), so a cold server is not handed its full share
//! at once. Weights are compared in 1/256ths for it.
//!
//! With `max_fails`, a server whose attempts fail that many times in a row
//! (no response at all) is out of every choice for `fail_timeout`, as with
//! nginx's `max_fails`; then one failed attempt takes it out again and one
//! answer brings it back. Being out never empties a pool: when every usable
//! server is out, they are all chosen from as if none were (Envoy's panic
//! threshold), since a request tried on them may succeed, and none cannot.

use std::collections::VecDeque;
use std::hash::{BuildHasher, RandomState};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, Uri};
use lb_common::hash::jhash_bytes;
use lb_common::maglev::{self, MaglevInput};
use tokio::sync::oneshot;

use super::model::{Algorithm, OnMarkedDown, Pool, ServerSpec, identity};

/// Entries of a pool's Maglev table: a prime, about 40 per server for 100
/// servers, small enough (16 KiB) to rebuild on every up/down change.
pub const HASH_TABLE_SIZE: u32 = 4099;

/// Seed of the request key hash (`jhash_bytes`), "l7hk".
const KEY_SEED: u32 = 0x6c37_686b;

/// Live state of one server.
#[derive(Debug)]
pub struct ServerState {
    /// Where to connect.
    pub addr: SocketAddr,
    /// `addr` as text, for log records (formatted once, not per request).
    pub label: Arc<str>,
    /// Its value of the pool's persistence cookie: a hash of its address,
    /// the same on every node and after restarts, and no address on the wire.
    pub cookie: Arc<str>,
    /// Configured weight (atomic: a change of the pool sets it in place).
    weight: AtomicU32,
    /// Backup server.
    backup: AtomicBool,
    /// Requests in flight at most; 0 is unlimited.
    maxconn: AtomicUsize,
    /// A `ServerUse`.
    state: AtomicU8,
    active: AtomicUsize,
    /// Failed attempts in a row (`Balancer::failed`), under `max_fails`.
    fails: AtomicU32,
    /// When it last started serving (`clock_ms`), for `slowstart`; 0: at start.
    serving_since: AtomicU64,
    /// Out of every choice until this `clock_ms`; 0: in.
    /// (Left set once passed, until it answers: one failure is then enough.)
    out_until: AtomicU64,
    /// Its request counters.
    pub stats: Arc<crate::stats::Counters>,
    /// Wakes its sessions and tunnels when it is marked down under
    /// `on_marked_down = "shutdown-sessions"`.
    marked_down: tokio::sync::Notify,
}

impl ServerState {
    /// A server of `spec`, taking requests.
    fn new(spec: &ServerSpec) -> Self {
        ServerState {
            addr: spec.address,
            label: spec.address.to_string().into(),
            cookie: server_cookie(spec).into(),
            weight: AtomicU32::new(spec.weight),
            backup: AtomicBool::new(spec.backup),
            maxconn: AtomicUsize::new(spec.maxconn),
            state: AtomicU8::new(ServerUse::Serving as u8),
            active: AtomicUsize::new(0),
            fails: AtomicU32::new(0),
            serving_since: AtomicU64::new(0),
            out_until: AtomicU64::new(0),
            stats: Default::default(),
            marked_down: tokio::sync::Notify::new(),
        }
    }

    /// Resolves when its sessions are to be shut down (it was marked down,
    /// under `on_marked_down = "shutdown-sessions"`); a future created
    /// before that moment resolves even if first polled after it.
    pub(crate) fn sessions_shut_down(&self) -> tokio::sync::futures::Notified<'_> {
        self.marked_down.notified()
    }

    /// Takes `spec`'s weight, backup flag and maxconn (same address).
    fn configure(&self, spec: &ServerSpec) {
        self.weight.store(spec.weight, Ordering::Relaxed);
        self.backup.store(spec.backup, Ordering::Relaxed);
        self.maxconn.store(spec.maxconn, Ordering::Relaxed);
    }

    /// Configured weight.
    pub fn weight(&self) -> u32 {
        self.weight.load(Ordering::Relaxed)
    }

    /// Whether it is a backup server.
    pub fn backup(&self) -> bool {
        self.backup.load(Ordering::Relaxed)
    }

    /// Requests in flight at most; 0 is unlimited.
    pub fn maxconn(&self) -> usize {
        self.maxconn.load(Ordering::Relaxed)
    }

    /// Whether it takes new requests (health checks and admin state agree).
    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == ServerUse::Serving as u8
    }

    /// Whether it takes the requests whose persistence cookie names it: while
    /// it serves, and while it drains.
    pub(crate) fn takes_sticky(&self) -> bool {
        self.state.load(Ordering::Relaxed) != ServerUse::Off as u8
    }

    /// Requests currently in flight to it.
    pub fn active(&self) -> usize {
        self.active.load(Ordering::Relaxed)
    }

    /// Whether it is out after failed attempts at `now` (ms, `clock_ms`).
    pub(crate) fn is_out(&self, now: u64) -> bool {
        self.out_until.load(Ordering::Relaxed) > now
    }

    /// Whether one more request fits under `maxconn`.
    fn has_room(&self) -> bool {
        let maxconn = self.maxconn();
        maxconn == 0 || self.active() < maxconn
    }
}

/// Counts a request in flight on a server until dropped; with a queue, the
/// slot then goes to the oldest queued request that can use it.
#[derive(Debug)]
pub struct Active {
    server: Arc<ServerState>,
    pool: Option<Arc<Inner>>,
}

impl Active {
    /// Starts counting on `server`.
    pub fn new(server: Arc<ServerState>) -> Self {
        let before = server.active.fetch_add(1, Ordering::Relaxed);
        server.stats.observe_current(before as u64 + 1);
        Active { server, pool: None }
    }

    /// The server counted.
    pub fn server(&self) -> &Arc<ServerState> {
        &self.server
    }
}

impl Drop for Active {
    fn drop(&mut self) {
        match &self.pool {
            None => {
                self.server.active.fetch_sub(1, Ordering::Relaxed);
            }
            Some(inner) => {
                let mut lost = Vec::new();
                {
                    let mut q = inner.lock_queue();
                    self.server.active.fetch_sub(1, Ordering::Relaxed);
                    inner.dispatch(&mut q, &mut lost);
                }
                // Slots whose waiter vanished are given back here, outside the lock.
                drop(lost);
            }
        }
    }
}

/// A server slot taken by `Balancer::acquire`.
#[derive(Debug)]
pub struct Acquired {
    /// The slot on its server; dropping it ends the request on the server.
    pub active: Active,
    /// Time spent in the queue (HAProxy's Tw).
    pub queued: Duration,
}

/// Why `Balancer::acquire` found no server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unavailable {
    /// No usable server at all (all down, or none configured).
    NoServer,
    /// Every eligible server stayed at `maxconn` for the whole `timeout_queue`.
    QueueTimeout(Duration),
}

/// What a server takes (HAProxy's ready, drain and maint states).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ServerUse {
    /// Every request.
    Serving = 0,
    /// Only requests whose persistence cookie names it.
    Draining = 1,
    /// None: down, or out for maintenance.
    Off = 2,
}

/// What a request brings to the choice of its server.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pick {
    /// Its key under a hash algorithm (`Balancer::hash_key`).
    pub key: Option<u32>,
    /// The server its persistence cookie names (`Balancer::by_cookie`):
    /// taken while it serves or drains, waited for at its `maxconn`.
    pub sticky: Option<SocketAddr>,
}

/// Outcome of one choice.
enum Choice {
    Server(Arc<ServerState>),
    Full,
    Nothing,
}

/// A request waiting for a slot.
#[derive(Debug)]
struct Waiter {
    id: u64,
    pick: Pick,
    exclude: Vec<SocketAddr>,
    tx: oneshot::Sender<Active>,
}

#[derive(Debug, Default)]
struct Queue {
    waiters: VecDeque<Waiter>,
    next_id: u64,
}

/// A pool's servers at one time, with what choosing among them keeps
/// (indexes below are into `servers`).
#[derive(Debug)]
struct Set {
    servers: Vec<Arc<ServerState>>,
    /// Smooth round robin's current weights, one per server.
    current: Mutex<Vec<i64>>,
    /// Maglev table of server indices over all regular servers (hash algorithms only).
    home: Vec<u32>,
    /// Maglev table over the usable servers, for keys whose home is not usable.
    table: RwLock<Vec<u32>>,
}

/// Everything a pool's balancer shares with the slots it hands out.
#[derive(Debug)]
struct Inner {
    algorithm: Algorithm,
    /// The servers; replaced whole by `Balancer::set_servers`.
    set: RwLock<Arc<Set>>,
    /// Rotates the start of leastconn's scan so equal loads share the work.
    rotor: AtomicUsize,
    rng: AtomicU64,
    hash_query: bool,
    hash_header: Option<HeaderName>,
    /// Any server has a `maxconn`: slots are taken under the queue lock.
    limited: AtomicBool,
    /// The pool's name, for the log.
    name: Arc<str>,
    /// `max_fails` (0: off) and `fail_timeout`.
    fails: (u32, Duration),
    /// `slowstart` in ms (0: off).
    slowstart: u64,
    /// `on_marked_down = "shutdown-sessions"`.
    shutdown_sessions: bool,
    timeout_queue: Duration,
    queue: Mutex<Queue>,
    /// The pool's request counters: here, as the balancer is shared by
    /// every serving thread.
    counters: Arc<crate::stats::Counters>,
}

/// Picks servers of one pool.
#[derive(Debug)]
pub struct Balancer {
    inner: Arc<Inner>,
}

impl Balancer {
    /// All servers start up; no hash options, queue timeout 5 s.
    pub fn new(algorithm: Algorithm, specs: &[ServerSpec]) -> Self {
        Self::from_pool(&Pool::new("", algorithm, specs.to_vec()))
    }

    /// The balancer of a configured pool; all servers start up.
    pub fn from_pool(pool: &Pool) -> Self {
        let servers: Vec<_> = pool
            .servers
            .iter()
            .map(|s| Arc::new(ServerState::new(s)))
            .collect();
        let seed = RandomState::new().hash_one(0u8) | 1;
        let inner = Inner {
            algorithm: pool.algorithm,
            limited: AtomicBool::new(servers.iter().any(|s| s.maxconn() > 0)),
            name: pool.name.as_str().into(),
            fails: (pool.max_fails, pool.fail_timeout),
            slowstart: pool.slowstart.as_millis() as u64,
            shutdown_sessions: pool.on_marked_down == Some(OnMarkedDown::ShutdownSessions),
            set: RwLock::new(Arc::new(Set::new(pool.algorithm, servers))),
            rotor: AtomicUsize::new(0),
            rng: AtomicU64::new(seed),
            hash_query: pool.hash_query,
            // validate() rejects bad names; a bad one here just means roundrobin.
            hash_header: pool
                .hash_header
                .as_deref()
                .and_then(|h| HeaderName::from_bytes(h.as_bytes()).ok()),
            timeout_queue: pool.timeout_queue,
            queue: Mutex::new(Queue::default()),
            counters: Arc::default(),
        };
        Balancer {
            inner: Arc::new(inner),
        }
    }

    /// An attempt on `server` got a response head: its failures in a row
    /// start again from 0, and if it was out, it is back.
    pub(crate) fn answered(&self, server: &ServerState) {
        if self.inner.fails.0 == 0
            || (server.fails.load(Ordering::Relaxed) == 0
                && server.out_until.load(Ordering::Relaxed) == 0)
        {
            return;
        }
        server.fails.store(0, Ordering::Relaxed);
        if server.out_until.swap(0, Ordering::Relaxed) != 0 {
            tracing::info!(pool = %self.inner.name, server = %server.addr, "server answers again after being taken out");
        }
    }

    /// An attempt on `server` got no response (connect refused or timed
    /// out, TLS, closed or timed out before the head): at `max_fails` in a
    /// row it is out for `fail_timeout`, and one more failure after that
    /// takes it out again.
    pub(crate) fn failed(&self, server: &ServerState) {
        let (max_fails, fail_timeout) = self.inner.fails;
        if max_fails == 0 {
            return;
        }
        let fails = server.fails.fetch_add(1, Ordering::Relaxed) + 1;
        if fails < max_fails {
            return;
        }
        let now = clock_ms();
        // Another thread's failure may have taken it out already.
        if server.is_out(now) {
            return;
        }
        server.fails.store(max_fails - 1, Ordering::Relaxed);
        let until = now + fail_timeout.as_millis() as u64;
        server.out_until.store(until, Ordering::Relaxed);
        server.stats.taken_out();
        tracing::warn!(
            pool = %self.inner.name,
            server = %server.addr,
            fails,
            out_for = ?fail_timeout,
            "server taken out after failed attempts in a row (max_fails)"
        );
        // Marked down, as HAProxy's `on-error mark-down`: its sessions too.
        if self.inner.shutdown_sessions {
            server.marked_down.notify_waiters();
        }
    }

    /// The pool's request counters (`crate::stats`).
    pub(crate) fn counters(&self) -> &Arc<crate::stats::Counters> {
        &self.inner.counters
    }

    /// All servers, in configuration order (those of this moment).
    pub fn servers(&self) -> Vec<Arc<ServerState>> {
        self.inner.read_set().servers.clone()
    }

    /// Makes `specs` the pool's servers, in place: a server whose address
    /// stays keeps its state, requests in flight and counters, and takes the
    /// new weight, backup flag and maxconn; a new one starts taking requests;
    /// one left out takes no more (its requests in flight finish). Queued
    /// requests are dispatched again over the new set.
    pub fn set_servers(&self, specs: &[ServerSpec]) {
        let inner = &self.inner;
        {
            let mut set = inner.set.write().unwrap_or_else(|e| e.into_inner());
            let servers: Vec<_> = specs
                .iter()
                .map(
                    // A server whose cookie value changed is a new one (its
                    // value is fixed for the state's life).
                    |spec| match set
                        .servers
                        .iter()
                        .find(|s| s.addr == spec.address && *s.cookie == *server_cookie(spec))
                    {
                        Some(kept) => {
                            kept.configure(spec);
                            kept.clone()
                        }
                        None => {
                            // A server added at runtime starts slowly too.
                            let added = ServerState::new(spec);
                            added.serving_since.store(clock_ms(), Ordering::Relaxed);
                            Arc::new(added)
                        }
                    },
                )
                .collect();
            inner
                .limited
                .store(servers.iter().any(|s| s.maxconn() > 0), Ordering::Relaxed);
            *set = Arc::new(Set::new(inner.algorithm, servers));
        }
        inner.redispatch();
    }

    /// Marks every server at `addr` up or down; false if there is none.
    pub fn set_up(&self, addr: SocketAddr, up: bool) -> bool {
        self.set_use(
            addr,
            if up {
                ServerUse::Serving
            } else {
                ServerUse::Off
            },
        )
    }

    /// A server at `addr` was marked down by its health checks (or taken
    /// out by `max_fails`, `Balancer::failed`): with
    /// `on_marked_down = "shutdown-sessions"` its `tcp` sessions and
    /// tunnels are closed (HAProxy's `on-marked-down shutdown-sessions`).
    /// Whether the pool shuts sessions down.
    pub fn marked_down(&self, addr: SocketAddr) -> bool {
        self.inner.shutdown_sessions && self.shutdown_sessions(addr)
    }

    /// Closes the `tcp` sessions and tunnels of the servers at `addr`
    /// (HAProxy's `shutdown sessions server`); false if there is none.
    pub fn shutdown_sessions(&self, addr: SocketAddr) -> bool {
        let set = self.inner.read_set().clone();
        let mut found = false;
        for s in set.servers.iter().filter(|s| s.addr == addr) {
            s.marked_down.notify_waiters();
            found = true;
        }
        found
    }

    /// Sets what every server at `addr` takes; false if there is none. A
    /// change rebuilds the hash table and re-dispatches queued requests (a
    /// server came up, or a hashed or sticky request's server went away).
    pub fn set_use(&self, addr: SocketAddr, state: ServerUse) -> bool {
        let inner = &self.inner;
        let set = inner.read_set().clone();
        let mut found = false;
        let mut changed = false;
        for s in set.servers.iter().filter(|s| s.addr == addr) {
            let before = s.state.swap(state as u8, Ordering::Relaxed);
            changed |= before != state as u8;
            // Back from down or maintenance (not from draining: it served on).
            if before == ServerUse::Off as u8 && state == ServerUse::Serving {
                s.serving_since.store(clock_ms(), Ordering::Relaxed);
            }
            found = true;
        }
        if changed {
            set.rebuild_table(inner.algorithm);
            inner.redispatch();
        }
        found
    }

    /// The request's hash key under this pool's algorithm; None for other
    /// algorithms and for `header` when the request lacks the header.
    pub fn hash_key(&self, src: IpAddr, uri: &Uri, headers: &HeaderMap) -> Option<u32> {
        let inner = &self.inner;
        match inner.algorithm {
            Algorithm::Source => Some(match src.to_canonical() {
                IpAddr::V4(a) => jhash_bytes(&a.octets(), KEY_SEED),
                IpAddr::V6(a) => jhash_bytes(&a.octets(), KEY_SEED),
            }),
            Algorithm::Uri => {
                let path = uri.path();
                Some(match uri.query().filter(|_| inner.hash_query) {
                    Some(q) => jhash_bytes(format!("{path}?{q}").as_bytes(), KEY_SEED),
                    None => jhash_bytes(path.as_bytes(), KEY_SEED),
                })
            }
            Algorithm::Header => inner
                .hash_header
                .as_ref()
                .and_then(|h| headers.get(h))
                .map(|v| jhash_bytes(v.as_bytes(), KEY_SEED)),
            _ => None,
        }
    }

    /// The hash key of a `tcp` session from `src`: the source's under
    /// `source`; none under the other algorithms (no URI or header to hash:
    /// they balance sessions round robin, as HAProxy's do in `mode tcp`).
    pub fn connection_key(&self, src: IpAddr) -> Option<u32> {
        match self.inner.algorithm {
            Algorithm::Source => self.hash_key(src, &Uri::default(), &HeaderMap::new()),
            _ => None,
        }
    }

    /// The server whose persistence cookie value is `value`.
    pub fn by_cookie(&self, value: &str) -> Option<Arc<ServerState>> {
        // A scan: pools are small, and only requests with the cookie look.
        self.find(|s| &*s.cookie == value)
    }

    /// The server at `addr`, if it is still one of the pool's.
    pub fn server_at(&self, addr: SocketAddr) -> Option<Arc<ServerState>> {
        self.find(|s| s.addr == addr)
    }

    /// The first current server `wanted` takes.
    fn find(&self, wanted: impl Fn(&ServerState) -> bool) -> Option<Arc<ServerState>> {
        self.inner
            .read_set()
            .servers
            .iter()
            .find(|s| wanted(s))
            .cloned()
    }

    /// Takes a slot on a server for a request, avoiding the servers at
    /// `exclude` unless that leaves nothing; backups only when no regular
    /// server is usable. Waits in the pool's FIFO queue while every eligible
    /// server is at `maxconn`, up to `timeout_queue`.
    pub async fn acquire(
        &self,
        pick: Pick,
        exclude: &[SocketAddr],
    ) -> Result<Acquired, Unavailable> {
        let inner = &self.inner;
        let start = Instant::now();
        let now = |active| Acquired {
            active,
            queued: Duration::ZERO,
        };
        if !inner.limited.load(Ordering::Relaxed) {
            let pick_now = |exclude| match inner.choose(pick, exclude) {
                Choice::Server(s) => Some(s),
                Choice::Full | Choice::Nothing => None,
            };
            let server = pick_now(exclude)
                .or_else(|| (!exclude.is_empty()).then(|| pick_now(&[])).flatten())
                .ok_or(Unavailable::NoServer)?;
            return Ok(now(Active::new(server)));
        }
        let (id, rx) = {
            let mut q = inner.lock_queue();
            let mut exclude = exclude;
            let mut choice = inner.choose(pick, exclude);
            if matches!(choice, Choice::Nothing) && !exclude.is_empty() {
                exclude = &[];
                choice = inner.choose(pick, exclude);
            }
            match choice {
                Choice::Server(s) => return Ok(now(inner.take(s))),
                Choice::Nothing => return Err(Unavailable::NoServer),
                Choice::Full => {}
            }
            let (tx, rx) = oneshot::channel();
            let id = q.next_id;
            q.next_id += 1;
            q.waiters.push_back(Waiter {
                id,
                pick,
                exclude: exclude.to_vec(),
                tx,
            });
            (id, rx)
        };
        // Leaves the queue however this future ends (timeout, client gone).
        let _leave = Leave { inner, id };
        match tokio::time::timeout(inner.timeout_queue, rx).await {
            Ok(Ok(active)) => Ok(Acquired {
                active,
                queued: start.elapsed(),
            }),
            _ => Err(Unavailable::QueueTimeout(start.elapsed())),
        }
    }

    /// Requests waiting in the queue.
    pub fn queued(&self) -> usize {
        self.inner.lock_queue().waiters.len()
    }
}

/// Removes a waiter from the queue when dropped.
struct Leave<'a> {
    inner: &'a Inner,
    id: u64,
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        let gone = {
            let mut q = self.inner.lock_queue();
            q.waiters
                .iter()
                .position(|w| w.id == self.id)
                .and_then(|i| q.waiters.remove(i))
        };
        drop(gone);
    }
}

impl Inner {
    fn lock_queue(&self) -> MutexGuard<'_, Queue> {
        // A poisoned lock only means another request panicked; the queue is still consistent.
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The current servers. (Lock order: the queue's lock, then this one.)
    fn read_set(&self) -> RwLockReadGuard<'_, Arc<Set>> {
        // A poisoned lock only means a writer panicked; the set it left is whole.
        self.set.read().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a slot on `server` (under the queue lock when limited).
    fn take(self: &Arc<Self>, server: Arc<ServerState>) -> Active {
        let before = server.active.fetch_add(1, Ordering::Relaxed);
        server.stats.observe_current(before as u64 + 1);
        Active {
            server,
            pool: Some(self.clone()),
        }
    }

    /// After a change of the servers or their states: queued requests may
    /// now have one.
    fn redispatch(self: &Arc<Self>) {
        let mut lost = Vec::new();
        {
            let mut q = self.lock_queue();
            if !q.waiters.is_empty() {
                self.dispatch(&mut q, &mut lost);
            }
        }
        // Slots whose waiter vanished are given back here, outside the lock.
        drop(lost);
    }

    /// Hands free slots to queued requests, oldest first; slots that could not
    /// be delivered go to `lost`, to be dropped once the lock is released.
    fn dispatch(self: &Arc<Self>, q: &mut Queue, lost: &mut Vec<Active>) {
        let mut k = 0;
        while k < q.waiters.len() {
            if q.waiters[k].tx.is_closed() {
                q.waiters.remove(k);
                continue;
            }
            let w = &q.waiters[k];
            match self.choose(w.pick, &w.exclude) {
                Choice::Server(s) => {
                    let active = self.take(s);
                    if let Some(w) = q.waiters.remove(k)
                        && let Err(active) = w.tx.send(active)
                    {
                        lost.push(active);
                    }
                }
                Choice::Full | Choice::Nothing => k += 1,
            }
        }
    }

    /// The clock and `slowstart` for `Set::weight_of`, when it ramps weights.
    fn ramp(&self) -> Option<(u64, u64)> {
        (self.slowstart > 0).then(|| (clock_ms(), self.slowstart))
    }

    fn choose(&self, Pick { key, sticky }: Pick, exclude: &[SocketAddr]) -> Choice {
        let set = self.read_set();
        let room = |s: &Arc<ServerState>| {
            if s.has_room() {
                Choice::Server(s.clone())
            } else {
                Choice::Full
            }
        };
        // A server out after failed attempts is down for its cookie too.
        let named = sticky
            .filter(|a| !exclude.contains(a))
            .and_then(|a| set.servers.iter().find(|s| s.addr == a && s.takes_sticky()))
            .filter(|s| s.out_until.load(Ordering::Relaxed) == 0 || !s.is_out(clock_ms()));
        if let Some(s) = named {
            return room(s);
        }
        let cands = set.usable(exclude, self.fails.0 > 0);
        if cands.is_empty() {
            return Choice::Nothing;
        }
        // An excluded target (retry after a failed connect) falls back to round robin.
        if let Some(i) = key
            .filter(|_| self.algorithm.is_hash())
            .and_then(|k| set.hashed(k, &cands))
        {
            return room(&set.servers[i]);
        }
        let free: Vec<usize> = cands
            .into_iter()
            .filter(|&i| set.servers[i].has_room())
            .collect();
        if free.is_empty() {
            return Choice::Full;
        }
        let i = match self.algorithm {
            Algorithm::First => free[0],
            Algorithm::LeastConn => self.least_conn(&set, &free),
            Algorithm::Random2 => self.random2(&set, &free),
            Algorithm::RoundRobin | Algorithm::Source | Algorithm::Uri | Algorithm::Header => {
                set.smooth_rr(&free, self.ramp())
            }
        };
        Choice::Server(set.servers[i].clone())
    }

    fn least_conn(&self, set: &Set, cands: &[usize]) -> usize {
        let start = self.rotor.fetch_add(1, Ordering::Relaxed) % cands.len();
        let ramp = self.ramp();
        let mut best = cands[start];
        for k in 1..cands.len() {
            let i = cands[(start + k) % cands.len()];
            if set.lighter(i, best, ramp) {
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

    fn random2(&self, set: &Set, cands: &[usize]) -> usize {
        let n = cands.len() as u64;
        if n == 1 {
            return cands[0];
        }
        let r = self.next_random();
        let a = (r % n) as usize;
        // Second choice distinct from the first.
        let b = (a + 1 + ((r >> 32) % (n - 1)) as usize) % cands.len();
        let (a, b) = (cands[a], cands[b]);
        if set.lighter(b, a, self.ramp()) { b } else { a }
    }
}

impl Set {
    /// `servers` with their hash tables under `algorithm`.
    fn new(algorithm: Algorithm, servers: Vec<Arc<ServerState>>) -> Self {
        let mut set = Set {
            current: Mutex::new(vec![0; servers.len()]),
            servers,
            home: Vec::new(),
            table: RwLock::new(Vec::new()),
        };
        if algorithm.is_hash() {
            let all: Vec<usize> = (0..set.servers.len())
                .filter(|&i| !set.servers[i].backup())
                .collect();
            set.home = set.build_table(&all);
        }
        set.rebuild_table(algorithm);
        set
    }

    /// Usable servers of the tier in use: regular ones, or backups when no
    /// regular one is up; with `max_fails` (`observed`), those out after
    /// failed attempts only when every other is too (see the module's comment).
    fn usable(&self, exclude: &[SocketAddr], observed: bool) -> Vec<usize> {
        // The clock is read only while some server has been out.
        let any_out = observed
            && self
                .servers
                .iter()
                .any(|s| s.out_until.load(Ordering::Relaxed) != 0);
        if any_out {
            let now = clock_ms();
            let fine = self.usable_at(exclude, Some(now));
            if !fine.is_empty() {
                return fine;
            }
        }
        self.usable_at(exclude, None)
    }

    /// As `usable`, leaving out those out at `now` if given.
    fn usable_at(&self, exclude: &[SocketAddr], now: Option<u64>) -> Vec<usize> {
        let tier = |backup: bool| -> Vec<usize> {
            (0..self.servers.len())
                .filter(|&i| {
                    let s = &self.servers[i];
                    s.backup() == backup
                        && s.weight() > 0
                        && s.is_up()
                        && !exclude.contains(&s.addr)
                        && !now.is_some_and(|now| s.is_out(now))
                })
                .collect()
        };
        let regular = tier(false);
        if regular.is_empty() {
            tier(true)
        } else {
            regular
        }
    }

    /// Rebuilds the Maglev table over the usable servers (hash algorithms only).
    fn rebuild_table(&self, algorithm: Algorithm) {
        if !algorithm.is_hash() {
            return;
        }
        // Built under the write lock so concurrent rebuilds end with the latest states.
        let mut table = self.table.write().unwrap_or_else(|e| e.into_inner());
        // (Servers out after failures stay in: they are out for seconds.)
        *table = self.build_table(&self.usable_at(&[], None));
    }

    /// A Maglev table over `servers` (indices); empty if it cannot be built.
    fn build_table(&self, servers: &[usize]) -> Vec<u32> {
        let idents: Vec<(usize, Vec<u8>)> = servers
            .iter()
            .map(|&i| (i, identity(self.servers[i].addr)))
            .collect();
        let inputs: Vec<MaglevInput<'_>> = idents
            .iter()
            .map(|(i, id)| MaglevInput {
                id: *i as u32,
                identity: id,
                weight: self.servers[*i].weight(),
            })
            .collect();
        match maglev::build(&inputs, HASH_TABLE_SIZE) {
            Ok(t) => t,
            Err(e) => {
                // Only duplicate addresses (rejected by validate()) or > 4099 servers get here.
                tracing::warn!(error = %e, "hash table not built; balancing round robin");
                Vec::new()
            }
        }
    }

    /// The server for hash `key`: its home if usable, else from the table of usable servers.
    fn hashed(&self, key: u32, cands: &[usize]) -> Option<usize> {
        let at = |t: &[u32]| (!t.is_empty()).then(|| t[key as usize % t.len()] as usize);
        if let Some(i) = at(&self.home).filter(|i| cands.contains(i)) {
            return Some(i);
        }
        let table = self.table.read().unwrap_or_else(|e| e.into_inner());
        at(&table).filter(|i| cands.contains(i))
    }

    /// Server `i`'s weight in 1/256ths, ramped up over `slowstart` since
    /// it started serving when `ramp` (now, slowstart) says so; at least 1.
    fn weight_of(&self, i: usize, ramp: Option<(u64, u64)>) -> u64 {
        let s = &self.servers[i];
        let full = u64::from(s.weight()) * 256;
        let Some((now, span)) = ramp else {
            return full;
        };
        let since = s.serving_since.load(Ordering::Relaxed);
        match now.saturating_sub(since) {
            _ if since == 0 => full,
            elapsed if elapsed >= span => full,
            elapsed => (full * elapsed / span).max(1),
        }
    }

    fn smooth_rr(&self, cands: &[usize], ramp: Option<(u64, u64)>) -> usize {
        // A poisoned lock only means another picker panicked; the weights are still valid numbers.
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        let mut total = 0i64;
        let mut best = cands[0];
        for &i in cands {
            let w = self.weight_of(i, ramp) as i64;
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
    fn lighter(&self, a: usize, b: usize, ramp: Option<(u64, u64)>) -> bool {
        let (sa, sb) = (&self.servers[a], &self.servers[b]);
        let (wa, wb) = (self.weight_of(a, ramp), self.weight_of(b, ramp));
        (sa.active() as u128) * u128::from(wb) < (sb.active() as u128) * u128::from(wa)
    }
}

/// Milliseconds since the first call in this process (never 0), for
/// `ServerState::out_until` and `serving_since`.
pub fn clock_ms() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    epoch.elapsed().as_millis() as u64 + 1
}

/// A server's persistence cookie value ([`ServerSpec::cookie_value`]).
fn server_cookie(spec: &ServerSpec) -> String {
    spec.cookie_value()
}

/// Tests name servers by their index in the current set.
#[cfg(test)]
impl Balancer {
    fn server(&self, i: usize) -> Arc<ServerState> {
        self.servers()[i].clone()
    }

    fn addrs(&self, indexes: &[usize]) -> Vec<SocketAddr> {
        indexes.iter().map(|&i| self.server(i).addr).collect()
    }

    fn index_of(&self, server: &ServerState) -> usize {
        let found = self.servers().iter().position(|s| s.addr == server.addr);
        found.expect("a server of the set")
    }

    fn index(&self, a: &Acquired) -> usize {
        self.index_of(a.active.server())
    }

    /// The server a request without a key would get, taking no slot.
    fn pick(&self, exclude: &[usize]) -> Option<usize> {
        self.pick_key(None, exclude)
    }

    fn pick_key(&self, key: Option<u32>, exclude: &[usize]) -> Option<usize> {
        let pick = Pick { key, sticky: None };
        match self.inner.choose(pick, &self.addrs(exclude)) {
            Choice::Server(s) => Some(self.index_of(&s)),
            Choice::Full | Choice::Nothing => None,
        }
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
                maxconn: 0,
                cookie: None,
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
        let _busy = Active::new(b.server(0));
        for _ in 0..5 {
            assert_eq!(b.pick(&[]), Some(1));
        }
    }

    #[test]
    fn random2_avoids_the_loaded_server() {
        let b = Balancer::new(Algorithm::Random2, &specs(&[(1, false), (1, false)]));
        let _busy: Vec<_> = (0..3).map(|_| Active::new(b.server(1))).collect();
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

    #[tokio::test]
    async fn a_server_marked_down_or_taken_out_shuts_its_sessions_down_if_the_pool_says_so() {
        /// Whether `act` on the first server of `pool` ends its sessions.
        async fn shut(pool: &Pool, act: fn(&Balancer, &Arc<ServerState>)) -> bool {
            let b = Balancer::from_pool(pool);
            let server = b.server(0);
            let ended = server.sessions_shut_down();
            act(&b, &server);
            // Resolved at once if notified, never otherwise.
            tokio::time::timeout(Duration::from_millis(50), ended)
                .await
                .is_ok()
        }
        let by_checks: fn(&Balancer, &Arc<ServerState>) = |b, s| {
            assert_eq!(b.marked_down(s.addr), b.inner.shutdown_sessions);
        };
        let by_failures: fn(&Balancer, &Arc<ServerState>) = |b, s| b.failed(s);
        let mut pool = Pool::new("p", Algorithm::First, specs(&[(1, false), (1, false)]));
        pool.max_fails = 1;
        assert!(!shut(&pool, by_checks).await);
        assert!(!shut(&pool, by_failures).await);
        pool.on_marked_down = Some(OnMarkedDown::ShutdownSessions);
        assert!(shut(&pool, by_checks).await);
        assert!(shut(&pool, by_failures).await);
    }

    #[test]
    fn max_fails_take_a_server_out_for_fail_timeout_but_never_empty_the_pool() {
        let s = specs(&[(1, false), (1, false)]);
        let mut pool = Pool::new("p", Algorithm::First, s.clone());
        pool.max_fails = 2;
        pool.fail_timeout = Duration::from_millis(150);
        let b = Balancer::from_pool(&pool);
        let (first, second) = (b.server(0), b.server(1));
        // An answer between failures starts the count again.
        b.failed(&first);
        b.answered(&first);
        b.failed(&first);
        assert_eq!(b.pick(&[]), Some(0));
        b.failed(&first);
        assert_eq!(b.pick(&[]), Some(1), "out after 2 in a row");
        assert_eq!(first.stats.snapshot().taken_out, 1);
        // Every server out: chosen from all the same.
        b.failed(&second);
        b.failed(&second);
        assert_eq!(b.pick(&[]), Some(0));
        std::thread::sleep(Duration::from_millis(200));
        assert_eq!(b.pick(&[]), Some(0), "back after fail_timeout");
        // One failure then takes it out again; an answer brings it back for good.
        b.answered(&second);
        b.failed(&first);
        assert_eq!(b.pick(&[]), Some(1));
        b.answered(&first);
        assert_eq!(b.pick(&[]), Some(0));
        b.failed(&first);
        assert_eq!(
            b.pick(&[]),
            Some(0),
            "one failure after an answer is not enough"
        );
        // A cookie naming a server that is out is balanced as without one.
        pool.max_fails = 2;
        let b = Balancer::from_pool(&pool);
        let second = b.server(1);
        let sticky = |b: &Balancer| match b.inner.choose(
            Pick {
                key: None,
                sticky: Some(s[1].address),
            },
            &[],
        ) {
            Choice::Server(s) => s.addr,
            _ => panic!("no server"),
        };
        assert_eq!(sticky(&b), s[1].address);
        b.failed(&second);
        b.failed(&second);
        assert_eq!(sticky(&b), s[0].address);
        // max_fails = 1: an answer after the timeout clears the server's mark too.
        pool.max_fails = 1;
        let b = Balancer::from_pool(&pool);
        let first = b.server(0);
        b.failed(&first);
        assert_eq!(b.pick(&[]), Some(1));
        std::thread::sleep(Duration::from_millis(200));
        b.answered(&first);
        assert_eq!(first.out_until.load(Ordering::Relaxed), 0);
    }

    #[test]
    fn slowstart_ramps_a_returning_server_up_from_almost_nothing() {
        for algorithm in [
            Algorithm::RoundRobin,
            Algorithm::LeastConn,
            Algorithm::Random2,
        ] {
            let s = specs(&[(1, false), (1, false)]);
            let mut pool = Pool::new("p", algorithm, s.clone());
            pool.slowstart = Duration::from_millis(400);
            let b = Balancer::from_pool(&pool);
            let share = |b: &Balancer| {
                // Slots held, so that leastconn and random2 see the load.
                let mut held = Vec::new();
                for _ in 0..64 {
                    let Choice::Server(s) = b.inner.choose(Pick::default(), &[]) else {
                        panic!("no server");
                    };
                    held.push(Active::new(s));
                }
                held.iter()
                    .filter(|a| a.server().addr == s[1].address)
                    .count()
            };
            // At start: no ramp.
            assert_eq!(share(&b), 32, "{algorithm:?}");
            b.set_up(s[1].address, false);
            b.set_up(s[1].address, true);
            assert!(share(&b) <= 4, "{algorithm:?}: just back");
            std::thread::sleep(Duration::from_millis(450));
            assert_eq!(share(&b), 32, "{algorithm:?}: ramped up");
            // A server added at runtime ramps too.
            let mut more = s.clone();
            more.push(ServerSpec::new(SocketAddr::from(([10, 0, 0, 9], 80))));
            b.set_servers(&more);
            let mut held = Vec::new();
            for _ in 0..60 {
                if let Choice::Server(s) = b.inner.choose(Pick::default(), &[]) {
                    held.push(Active::new(s));
                }
            }
            let new = held.iter().filter(|a| a.server().addr == more[2].address);
            assert!(new.count() <= 4, "{algorithm:?}: just added");
        }
    }

    #[test]
    fn zero_weight_takes_nothing() {
        let b = Balancer::new(Algorithm::RoundRobin, &specs(&[(0, false), (1, false)]));
        assert!((0..5).all(|_| b.pick(&[]) == Some(1)));
    }
}

#[cfg(test)]
mod hash_and_queue_tests {
    use super::*;

    fn pool(algorithm: Algorithm, n: usize, maxconn: usize) -> Pool {
        let servers = (0..n)
            .map(|i| ServerSpec {
                maxconn,
                ..ServerSpec::new(SocketAddr::from(([10, 0, 0, 1 + i as u8], 80)))
            })
            .collect();
        Pool::new("p", algorithm, servers)
    }

    fn key_of(b: &Balancer, k: u32) -> usize {
        b.pick_key(Some(jhash_bytes(&k.to_be_bytes(), 7)), &[])
            .unwrap()
    }

    #[test]
    fn hash_is_stable_and_spreads() {
        let b = Balancer::from_pool(&pool(Algorithm::Source, 4, 0));
        let mut seen = [0usize; 4];
        for k in 0..4000 {
            let s = key_of(&b, k);
            assert_eq!(s, key_of(&b, k));
            seen[s] += 1;
        }
        assert!(seen.iter().all(|&n| n > 800), "{seen:?}");
    }

    #[test]
    fn down_server_moves_only_its_keys() {
        let p = pool(Algorithm::Uri, 5, 0);
        let b = Balancer::from_pool(&p);
        let before: Vec<usize> = (0..10_000).map(|k| key_of(&b, k)).collect();
        assert!(b.set_up(p.servers[2].address, false));
        let after: Vec<usize> = (0..10_000).map(|k| key_of(&b, k)).collect();
        let mut moved = 0;
        for (x, y) in before.iter().zip(&after) {
            assert_ne!(*y, 2);
            if x != y {
                moved += 1;
                assert_eq!(*x, 2, "a key of a live server moved");
            }
        }
        // Exactly the keys of server 2, about 1/5 of them.
        assert_eq!(moved, before.iter().filter(|&&s| s == 2).count());
        assert!((1700..=2300).contains(&moved), "{moved}");
        // They spread over the other four.
        let mut to = [0usize; 5];
        for (x, y) in before.iter().zip(&after) {
            if *x == 2 {
                to[*y] += 1;
            }
        }
        assert!(to.iter().filter(|&&n| n > moved / 8).count() == 4, "{to:?}");
        b.set_up(p.servers[2].address, true);
        let back: Vec<usize> = (0..10_000).map(|k| key_of(&b, k)).collect();
        assert_eq!(back, before);
    }

    #[test]
    fn hash_keys() {
        let mut p = pool(Algorithm::Uri, 2, 0);
        let uri = |s: &str| s.parse::<Uri>().unwrap();
        let ip: IpAddr = [127, 0, 0, 1].into();
        let h = HeaderMap::new();
        let b = Balancer::from_pool(&p);
        assert_eq!(
            b.hash_key(ip, &uri("/a?x=1"), &h),
            b.hash_key(ip, &uri("/a?x=2"), &h)
        );
        p.hash_query = true;
        let b = Balancer::from_pool(&p);
        assert_ne!(
            b.hash_key(ip, &uri("/a?x=1"), &h),
            b.hash_key(ip, &uri("/a?x=2"), &h)
        );
        p.algorithm = Algorithm::Header;
        p.hash_header = Some("X-User".into());
        let b = Balancer::from_pool(&p);
        assert_eq!(b.hash_key(ip, &uri("/"), &h), None);
        let mut h = HeaderMap::new();
        h.insert("x-user", http::HeaderValue::from_static("alice"));
        assert!(b.hash_key(ip, &uri("/"), &h).is_some());
        // Without a key the header algorithm goes round robin.
        assert_eq!((b.pick(&[]), b.pick(&[])), (Some(0), Some(1)));
        p.algorithm = Algorithm::Source;
        p.hash_header = None;
        let b = Balancer::from_pool(&p);
        let v4 = b.hash_key(ip, &uri("/"), &h);
        let mapped: IpAddr = "::ffff:127.0.0.1".parse().unwrap();
        assert_eq!(b.hash_key(mapped, &uri("/"), &h), v4);
        assert_ne!(b.hash_key([127, 0, 0, 2].into(), &uri("/"), &h), v4);
    }

    #[tokio::test]
    async fn a_sticky_request_goes_to_its_server_while_it_serves_or_drains() {
        let b = Balancer::from_pool(&pool(Algorithm::RoundRobin, 3, 0));
        let values: Vec<Arc<str>> = b.servers().iter().map(|s| s.cookie.clone()).collect();
        // Distinct, stable (a function of the address), no address in them.
        assert_eq!(values.len(), 3);
        assert!(values[0] != values[1] && values[1] != values[2] && values[0] != values[2]);
        let again = Balancer::from_pool(&pool(Algorithm::RoundRobin, 3, 0));
        assert_eq!(again.server(1).cookie, values[1]);
        assert!(values.iter().all(|v| v.len() == 8 && !v.contains("10.0")));
        assert_eq!(
            b.by_cookie(&values[2]).map(|s| s.addr),
            Some(b.server(2).addr)
        );
        assert!(b.by_cookie("nope").is_none());

        let sticky = |i| Pick {
            key: None,
            sticky: Some(b.server(i).addr),
        };
        let on = |a: Acquired| b.index(&a);
        let addr = b.server(2).addr;
        for _ in 0..5 {
            assert_eq!(on(b.acquire(sticky(2), &[]).await.unwrap()), 2);
        }
        // Draining: its own clients only.
        b.set_use(addr, ServerUse::Draining);
        assert_eq!(on(b.acquire(sticky(2), &[]).await.unwrap()), 2);
        for _ in 0..6 {
            assert_ne!(on(b.acquire(Pick::default(), &[]).await.unwrap()), 2);
        }
        // Down (or failed to connect: excluded): balanced like anyone else.
        b.set_use(addr, ServerUse::Off);
        assert_ne!(on(b.acquire(sticky(2), &[]).await.unwrap()), 2);
        b.set_use(addr, ServerUse::Serving);
        assert_ne!(on(b.acquire(sticky(2), &[addr]).await.unwrap()), 2);
    }

    #[tokio::test]
    async fn a_sticky_request_waits_for_its_full_server() {
        let mut p = pool(Algorithm::RoundRobin, 2, 1);
        p.timeout_queue = Duration::from_secs(5);
        let b = Arc::new(Balancer::from_pool(&p));
        let sticky = Pick {
            key: None,
            sticky: Some(b.server(1).addr),
        };
        let held = b.acquire(sticky, &[]).await.unwrap();
        assert_eq!(b.index(&held), 1);
        let b1 = b.clone();
        let waiter = tokio::spawn(async move { b1.acquire(sticky, &[]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        // Server 0 has room, but the sticky request waits for server 1.
        assert_eq!(b.queued(), 1);
        drop(held);
        assert_eq!(b.index(&waiter.await.unwrap().unwrap()), 1);
    }

    #[tokio::test]
    async fn first_fills_to_maxconn() {
        let b = Balancer::from_pool(&pool(Algorithm::First, 2, 2));
        let a: Vec<Acquired> = futures_ready(&b, 4).await;
        let idx: Vec<usize> = a.iter().map(|a| b.index(a)).collect();
        assert_eq!(idx, [0, 0, 1, 1]);
        assert_eq!(b.pick(&[]), None);
    }

    async fn futures_ready(b: &Balancer, n: usize) -> Vec<Acquired> {
        let mut v = Vec::new();
        for _ in 0..n {
            v.push(b.acquire(Pick::default(), &[]).await.unwrap());
        }
        v
    }

    #[tokio::test]
    async fn queue_is_fifo_and_times_out() {
        let mut p = pool(Algorithm::RoundRobin, 1, 1);
        p.timeout_queue = Duration::from_millis(300);
        let b = Arc::new(Balancer::from_pool(&p));
        let first = b.acquire(Pick::default(), &[]).await.unwrap();
        assert_eq!(first.queued, Duration::ZERO);
        let (b1, b2) = (b.clone(), b.clone());
        let second = tokio::spawn(async move { b1.acquire(Pick::default(), &[]).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let third = tokio::spawn(async move { b2.acquire(Pick::default(), &[]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(b.queued(), 2);
        drop(first);
        let second = second.await.unwrap().unwrap();
        assert!(second.queued >= Duration::from_millis(50), "{second:?}");
        assert_eq!(b.server(0).active(), 1);
        // The third is still queued behind the second's slot, then gives up.
        match third.await.unwrap() {
            Err(Unavailable::QueueTimeout(w)) => assert!(w >= Duration::from_millis(250)),
            other => panic!("{other:?}"),
        }
        assert_eq!(b.queued(), 0);
        drop(second);
        assert_eq!(b.server(0).active(), 0);
        // A down pool answers at once instead of queueing.
        b.set_up(p.servers[0].address, false);
        assert_eq!(
            b.acquire(Pick::default(), &[]).await.err(),
            Some(Unavailable::NoServer)
        );
    }

    #[tokio::test]
    async fn abandoned_waiter_leaves_the_queue() {
        let b = Arc::new(Balancer::from_pool(&pool(Algorithm::LeastConn, 1, 1)));
        let held = b.acquire(Pick::default(), &[]).await.unwrap();
        let b1 = b.clone();
        let waiter = tokio::spawn(async move { b1.acquire(Pick::default(), &[]).await });
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert_eq!(b.queued(), 1);
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(b.queued(), 0);
        drop(held);
        assert_eq!(b.server(0).active(), 0);
    }

    #[tokio::test]
    async fn servers_change_in_place_and_keep_their_state() {
        let p = pool(Algorithm::LeastConn, 2, 0);
        let b = Balancer::from_pool(&p);
        let (a, c) = (p.servers[0].address, p.servers[1].address);
        let busy = b.acquire(Pick::default(), &[]).await.unwrap();
        let on = busy.active.server().addr;
        b.set_use(c, ServerUse::Draining);
        let kept = b.server(b.index(&busy));
        let mut next = p.servers.clone();
        let new = SocketAddr::from(([10, 0, 0, 9], 80));
        next.push(ServerSpec {
            weight: 3,
            ..ServerSpec::new(new)
        });
        next[0].weight = 2;
        b.set_servers(&next);
        // The same states: in flight, drain, counters; the new weight.
        assert!(Arc::ptr_eq(&kept, &b.server(b.index_of(&kept))));
        assert_eq!(kept.active(), 1);
        assert_eq!(b.server(0).weight(), 2);
        assert!(!b.server(1).is_up() && b.server(1).takes_sticky());
        assert_eq!(b.servers().len(), 3);
        // leastconn sees the request in flight from before the change.
        let idle = if on == a { new } else { a };
        let got = b.acquire(Pick::default(), &[]).await.unwrap();
        assert_eq!(got.active.server().addr, idle, "{on} is busy, {c} drains");
        // A server left out takes nothing more; its requests in flight end normally.
        b.set_servers(&next[1..]);
        assert!(b.servers().iter().all(|s| s.addr != a));
        for _ in 0..4 {
            assert_eq!(b.pick(&[]).map(|i| b.server(i).addr), Some(new));
        }
        drop((busy, got));
        assert_eq!(kept.active(), 0);
        // A new cookie value is a new server (the value is fixed for a state's life).
        let mut renamed = next[1..].to_vec();
        renamed[0].cookie = Some("s2".into());
        let before = b.server(0);
        b.set_servers(&renamed);
        assert!(!Arc::ptr_eq(&before, &b.server(0)));
        assert_eq!(&*b.server(0).cookie, "s2");
        assert_eq!(b.by_cookie("s2").map(|s| s.addr), Some(renamed[0].address));
    }

    #[test]
    fn an_added_server_takes_keys_mostly_from_the_others_alike() {
        let p = pool(Algorithm::Source, 4, 0);
        let b = Balancer::from_pool(&p);
        let addr_of = |b: &Balancer, k| b.server(key_of(b, k)).addr;
        let before: Vec<SocketAddr> = (0..10_000).map(|k| addr_of(&b, k)).collect();
        let mut next = p.servers.clone();
        let new = SocketAddr::from(([10, 0, 0, 9], 80));
        next.push(ServerSpec::new(new));
        b.set_servers(&next);
        let after: Vec<SocketAddr> = (0..10_000).map(|k| addr_of(&b, k)).collect();
        let to_new = after.iter().filter(|&&a| a == new).count();
        let elsewhere = before
            .iter()
            .zip(&after)
            .filter(|(x, y)| x != y && **y != new)
            .count();
        // About a fifth go to the new server; Maglev moves few others.
        assert!((1700..=2300).contains(&to_new), "{to_new}");
        assert!(
            elsewhere < 600,
            "{elsewhere} keys moved between old servers"
        );
    }

    #[tokio::test]
    async fn a_queued_request_gets_a_server_added_meanwhile() {
        let mut p = pool(Algorithm::RoundRobin, 1, 1);
        p.timeout_queue = Duration::from_secs(5);
        let b = Arc::new(Balancer::from_pool(&p));
        let held = b.acquire(Pick::default(), &[]).await.unwrap();
        let b1 = b.clone();
        let waiter = tokio::spawn(async move { b1.acquire(Pick::default(), &[]).await });
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert_eq!(b.queued(), 1);
        let mut next = p.servers.clone();
        next.push(ServerSpec {
            maxconn: 1,
            ..ServerSpec::new(SocketAddr::from(([10, 0, 0, 9], 80)))
        });
        b.set_servers(&next);
        let got = waiter.await.unwrap().unwrap();
        assert_eq!(got.active.server().addr, next[1].address);
        assert_eq!(b.queued(), 0);
        drop(held);
    }
}
