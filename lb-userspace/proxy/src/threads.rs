//! Serving threads: the proxy as `lb run` runs it. Each of `threads` OS
//! threads (`lb-proxy-0`, `lb-proxy-1`, ...) runs a current-thread tokio
//! runtime with a SO_REUSEPORT listener of its own per bind, as HAProxy,
//! nginx and Envoy do: the kernel spreads new connections over the
//! listeners, and a connection stays on the thread that accepted it, with
//! no work stealing and no cross-thread wake-ups on the request path.
//!
//! What the threads share, and what it costs:
//!
//! - The frontends (`FrontendRuntime`): certificates, actions, and the
//!   `max_connections` semaphore, one per frontend for all threads (an
//!   atomic per accepted connection).
//! - The balancers (`Balancer`): one per pool. Leastconn counts are one
//!   atomic per server, so each request does two atomic read-modify-writes
//!   on a cache line other threads also write (tens of nanoseconds when it
//!   bounces between cores). With any `maxconn` in the pool, taking and
//!   giving back a slot happen under the pool's queue mutex, so `maxconn`
//!   and the FIFO queue hold for the whole process, and a slot freed on one
//!   thread goes to the oldest waiter of any thread (woken through a
//!   oneshot channel, which works across runtimes).
//! - The request counters (`crate::stats`) of frontends, pools and
//!   servers, split into one shard per serving thread (summed when read):
//!   a request adds to its thread's shard with relaxed atomics, on cache
//!   lines no other serving thread writes.
//! - Not the server connections: each thread keeps its own pools
//!   (`ConnPool`), as a socket belongs to the runtime that registered it. A
//!   server may so see up to `threads` times as many idle connections.
//!
//! A dropped proxy's threads stop accepting, let their connections finish
//! (they are told to close gracefully), then end. Their listening sockets
//! are kept by the `Proxy` and handed to the next one on a reload, so a
//! connection waiting in a backlog is never reset by a listener closing.
//! Connections that outlive the reload (tunnels, `tcp` sessions) are closed
//! `hard_stop_after` it (HAProxy's `hard-stop-after`), or as soon as more
//! than `MAX_DRAINING` dropped proxies of its line (each started with the
//! previous one's sockets) are still draining, the oldest first
//! (as HAProxy's `mworker-max-reloads`): reloads cannot pile up threads.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio::sync::watch;

use crate::accept;
use crate::balance::Balancer;
use crate::context::{FrontendRuntime, Shared};
use crate::model::ProxyConfig;
use crate::routing::Router;
use crate::server;

/// How many serving threads run the proxy, and on which CPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Threads {
    /// Serving threads (at least one).
    pub count: usize,
    /// Thread `i` runs on CPU `cpu_map[i % len]`; empty: not pinned.
    pub cpu_map: Vec<usize>,
    /// How long a dropped proxy's connections may go on before they are
    /// closed (HAProxy's `hard-stop-after`).
    pub hard_stop_after: Duration,
}

impl Default for Threads {
    fn default() -> Self {
        Threads {
            count: Threads::available(),
            cpu_map: Vec::new(),
            hard_stop_after: DEFAULT_HARD_STOP_AFTER,
        }
    }
}

impl Threads {
    /// CPUs the process may run on (its affinity mask, cgroup quota): the default count.
    pub fn available() -> usize {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    }
}

/// A serving thread's listening sockets, each with its frontend.
pub(crate) type Listeners = Vec<(TcpListener, Arc<FrontendRuntime>)>;

/// What every serving thread builds its own part of the proxy from.
pub(crate) struct Plan {
    pub cfg: ProxyConfig,
    /// `Threads::hard_stop_after`.
    pub hard_stop_after: Duration,
    /// Set when this proxy, dropped, is to close its connections now.
    pub stop_now: watch::Receiver<bool>,
    /// Tells the connections left at the hard stop to end and log (`FrontendCtx::kill`).
    pub kill: watch::Sender<bool>,
    pub balancers: Vec<Arc<Balancer>>,
    pub route: Option<Router>,
    /// Every frontend: all their connections must end before a thread does.
    pub frontends: Vec<Arc<FrontendRuntime>>,
}

/// `count` listening sockets on `bind`: those of `kept` first (a previous
/// proxy's, duplicated), then new ones on the first one's address (the real
/// port when `bind` asks for port 0).
pub(crate) fn listeners(
    bind: SocketAddr,
    count: usize,
    kept: &[TcpListener],
) -> std::io::Result<Vec<TcpListener>> {
    let mut out: Vec<TcpListener> = Vec::with_capacity(count);
    for i in 0..count {
        let listener = match kept.get(i) {
            Some(old) => old.try_clone()?,
            None => {
                let at = match out.first() {
                    Some(first) => first.local_addr()?,
                    None => bind,
                };
                crate::reuseport_listener(at)?
            }
        };
        out.push(listener);
    }
    Ok(out)
}

/// `Threads::hard_stop_after` by default: long enough for any request or
/// download, short enough that a reload's threads are gone within the hour.
pub const DEFAULT_HARD_STOP_AFTER: Duration = Duration::from_secs(3600);

/// Dropped proxies that may be draining at once; past it the oldest closes
/// its connections now.
pub const MAX_DRAINING: usize = 4;

/// The `stop_now` senders of a line of proxies (each started with the
/// previous one's sockets) that are dropped and still draining, oldest first.
pub(crate) type Draining = Arc<std::sync::Mutex<std::collections::VecDeque<watch::Sender<bool>>>>;

/// Counts a dropped proxy among its line's draining ones (its threads hold
/// the receivers of `stop_now`); tells the oldest to stop if too many are.
pub(crate) fn draining(line: &Draining, stop_now: watch::Sender<bool>) {
    let mut list = line.lock().unwrap_or_else(|e| e.into_inner());
    // Those whose threads have ended hold no receiver any more.
    list.retain(|s| !s.is_closed());
    list.push_back(stop_now);
    while list.len() > MAX_DRAINING {
        if let Some(oldest) = list.pop_front() {
            tracing::info!(
                "more than {MAX_DRAINING} reloads still draining: the oldest closes its connections"
            );
            let _ = oldest.send(true);
        }
    }
}

/// Longest wait for a setting-up thread to say it serves.
const READY_WITHIN: Duration = Duration::from_secs(10);

/// Starts one serving thread per entry of `per_thread` and waits until
/// each serves; returns their per-thread state, in thread order.
pub(crate) fn spawn(
    plan: Arc<Plan>,
    per_thread: Vec<Listeners>,
    cpu_map: &[usize],
    shutdown: watch::Receiver<()>,
) -> anyhow::Result<Vec<Arc<Shared>>> {
    let (ready_tx, ready_rx) = mpsc::channel();
    let count = per_thread.len();
    for (index, listeners) in per_thread.into_iter().enumerate() {
        let cpu = (!cpu_map.is_empty()).then(|| cpu_map[index % cpu_map.len()]);
        let (plan, shutdown, ready) = (plan.clone(), shutdown.clone(), ready_tx.clone());
        std::thread::Builder::new()
            .name(format!("lb-proxy-{index}"))
            .spawn(move || serve(index, plan, listeners, cpu, shutdown, ready))
            .context("starting a serving thread")?;
    }
    let mut shared: Vec<Option<Arc<Shared>>> = vec![None; count];
    for _ in 0..count {
        let (index, result) = ready_rx
            .recv_timeout(READY_WITHIN)
            .context("a serving thread did not start")?;
        let got = result.with_context(|| format!("serving thread {index}"))?;
        if let Some(slot) = shared.get_mut(index) {
            *slot = Some(got);
        }
    }
    Ok(shared.into_iter().flatten().collect())
}

/// What a thread tells `spawn` once set up.
type Ready = mpsc::Sender<(usize, anyhow::Result<Arc<Shared>>)>;

/// A serving thread's body: pinned if asked, a current-thread runtime
/// serving its listeners until the proxy is dropped and its connections end.
fn serve(
    index: usize,
    plan: Arc<Plan>,
    listeners: Listeners,
    cpu: Option<usize>,
    shutdown: watch::Receiver<()>,
    ready: Ready,
) {
    if let Some(cpu) = cpu
        && let Err(e) = pin_to(cpu)
    {
        tracing::warn!(thread = index, cpu, error = %e, "could not pin a serving thread");
    }
    crate::stats::enter_thread(index);
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send((index, Err(e.into())));
            return;
        }
    };
    rt.block_on(run(index, plan, listeners, shutdown, ready));
}

/// Serves until `shutdown`'s sender is dropped, then waits for the connections.
async fn run(
    index: usize,
    plan: Arc<Plan>,
    listeners: Listeners,
    mut shutdown: watch::Receiver<()>,
    ready: Ready,
) {
    // Built here: connection pools sweep on the runtime they are made on.
    let shared = match Shared::new(&plan.cfg, &plan.balancers, plan.route.clone()) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            let _ = ready.send((index, Err(e)));
            return;
        }
    };
    let mut accepting = Vec::new();
    for (listener, fe) in listeners {
        match accept::Listener::from_std(listener) {
            Ok(l) => accepting.push(tokio::spawn(server::accept_loop(
                l,
                fe,
                shared.clone(),
                shutdown.clone(),
            ))),
            Err(e) => {
                let _ = ready.send((index, Err(e.into())));
                return;
            }
        }
    }
    if ready.send((index, Ok(shared.clone()))).is_err() {
        return;
    }
    // Nothing is ever sent: this returns when the proxy is dropped.
    let _ = shutdown.changed().await;
    for task in accepting {
        let _ = task.await;
    }
    drop(shared);
    let mut stop_now = plan.stop_now.clone();
    let hard_stop = async {
        let _ = tokio::time::timeout(plan.hard_stop_after, stop_now.wait_for(|now| *now)).await;
    };
    tokio::select! {
        () = drain(&plan.frontends) => return,
        () = hard_stop => {
            tracing::info!(thread = index, "closing the connections left by a reload");
        }
    }
    // What notices (tcp sessions, tunnels, answers on hyper's path) ends
    // and is logged as killed (`K`), as HAProxy's; the rest goes with the runtime.
    plan.kill.send_replace(true);
    let _ = tokio::time::timeout(KILL_WITHIN, drain(&plan.frontends)).await;
    // Returning drops the runtime: connections still open are closed.
}

/// Longest wait, at the hard stop, for the connections told to end.
const KILL_WITHIN: Duration = Duration::from_secs(1);

/// Longest wait, once every client connection has ended, for what they
/// left running (tunnels, server connections being closed).
const DRAIN_TASKS_WITHIN: Duration = Duration::from_secs(60);

/// Waits until every connection of the proxy has ended (each holds a permit
/// of its frontend's limit), then, within a bound, for the runtime's tasks.
async fn drain(frontends: &[Arc<FrontendRuntime>]) {
    let every = Duration::from_millis(20);
    while frontends
        .iter()
        .any(|fe| fe.limit.available_permits() < fe.max_connections)
    {
        tokio::time::sleep(every).await;
    }
    let until = Instant::now() + DRAIN_TASKS_WITHIN;
    let metrics = tokio::runtime::Handle::current().metrics();
    while metrics.num_alive_tasks() > 0 && Instant::now() < until {
        tokio::time::sleep(every).await;
    }
}

/// Whether this process may run on `cpu` (its affinity mask), so that
/// `cpu_map` can be checked before threads are pinned (or fail to be).
pub fn may_run_on(cpu: usize) -> bool {
    if cpu >= libc::CPU_SETSIZE as usize {
        return false;
    }
    // SAFETY: a zeroed cpu_set_t is valid; the kernel fills at most its size.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0
            && libc::CPU_ISSET(cpu, &set)
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> std::io::Result<()> {
    if cpu >= libc::CPU_SETSIZE as usize {
        return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
    }
    // SAFETY: a zeroed cpu_set_t is a valid empty set; `cpu` is within it.
    let rc = unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
