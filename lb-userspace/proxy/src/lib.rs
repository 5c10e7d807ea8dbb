//! The userspace L7 proxy (HAProxy-like): frontends terminate HTTP/1.1, HTTP/2
//! (h2c prior knowledge on plain binds, ALPN on TLS binds) and TLS, route each
//! request to a pool, balance over the pool's servers and forward over pooled
//! HTTP/1.1 keep-alive connections, or HTTP/2 ones (`h2`), plain or TLS (`tls`).
//!
//! Two paths serve requests. HTTP/1 clients of a frontend whose pools all
//! speak HTTP/1.1 to their servers take our own (`h1`): heads parsed once,
//! bodies relayed by their framing, about half the instructions of hyper's.
//! HTTP/2 clients, and frontends that can route to an `h2` pool, are served
//! by hyper (`server::serve_io`, `forward::handle`). Actions, routing, the
//! balancer, retries and the access log are shared (`prepare`).
//!
//! # Layout
//!
//! In the order a request meets them (the module graph has no cycle):
//!
//! - `threads`: the serving threads `lb run` uses (`Proxy::start_threads`),
//!   each a current-thread runtime with its own SO_REUSEPORT listeners, and
//!   what they share (balancers, connection limits) and do not (server
//!   connections); `Proxy::start` serves on the caller's runtime instead.
//! - `accept`: client sockets; `accept_errors`: what a failed accept does
//!   (shared with the agent's listeners); `source_limit`: connections per
//!   source (`max_connections_per_source`); `proxy_protocol`: the PROXY header;
//!   `tls`: certificates by SNI; `server`: the accept loop, client timeouts,
//!   and the choice between the two paths.
//! - `h1`: our HTTP/1.1 path; `forward`: hyper's path; `hardening`: request
//!   smuggling checks of both; `tunnel`: WebSocket/Upgrade tunnels.
//! - `prepare`: what both paths share per request (headers, actions, routing,
//!   attempts); `actions`, `acl`, `routing`: the rules it runs (`basic_auth`:
//!   the `auth` action's credentials, at a bounded cost).
//! - `balance`: server choice and queues; `connpool`: kept server
//!   connections; `upstream`: new ones (TCP, PROXY header, TLS).
//! - `context`: the proxy's, a frontend's and a connection's state; `error`:
//!   error pages; `log`: the access log; `model`: the configuration;
//!   `deadline`, `shutdown`, `request_body`: small helpers of the paths;
//!   `stats`: the request counters of frontends, pools and servers.
//!
//! Configuration shape (inside the main config file):
//!
//! ```toml
//! [[frontend]]
//! name = "web"
//! binds = ["0.0.0.0:443", "[::]:443"]
//! default_pool = "app"
//! max_connections = 10000        # default
//! max_connections_per_source = 0 # per IPv4 address or IPv6 /64 (TCP peer), 0..=max_connections;
//!                                # one more is closed unread; 0: no limit (default)
//! request_header_limit = 16384   # bytes, default 16 KiB
//! send_buffer = 0               # SO_SNDBUF of client connections, bytes: 0 (default) leaves
//!                                # the kernel's autotuning, else 4096..=4 MiB
//! timeout_client = "30s"         # HTTP/2 idle (from its last stream's end: PINGs or stray bytes
//!                                # do not extend it); HTTP/1: each wait on the client during a request;
//!                                # both: each write to the client, each wait for a request body,
//!                                # and an answer held back by a client that takes none of it
//!                                # durations: "500ms", "10s", "2m" or "1h" (a unit is required)
//! timeout_http_request = "10s"   # whole request head (and TLS handshake); 408 after it
//! timeout_http_keep_alive = "10s"
//! forwarded_headers = true       # X-Forwarded-For, X-Forwarded-Proto, Forwarded
//! timeout_tunnel = "1h"          # idle limit of WebSocket/Upgrade tunnels (the pool's wins; default 1h)
//! accept_proxy = false           # true: every connection must start with a PROXY v1/v2 header,
//!                                # whose client address ACLs, X-Forwarded-For and logs see
//! accept_proxy_from = []         # only these peers' connections do (others are direct clients)
//! log_format = "httplog"         # access log lines: "httplog" (HAProxy's, default) | "json" (one object)
//! [frontend.tls]
//! default_cert = 0               # index into certs for unknown or missing SNI
//! certs = [
//!   { cert = "/etc/lb/a.pem", key = "/etc/lb/a.key" },              # names from the SAN
//!   { cert = "/etc/lb/b.pem", key = "/etc/lb/b.key", names = ["b.example"] },
//! ]
//!
//! [[frontend.acl]]              # HAProxy-style ACLs, see `crate::acl`
//! name = "is_api"
//! path_prefix = "/api/"
//! [[frontend.use_pool]]         # use_backend: first matching rule wins
//! pool = "api"
//! if = "is_api"
//!
//! # http-request rules (`actions`), in order, before use_pool; `if` is optional.
//! # The first terminal one (deny, redirect, return, failed auth) answers the client.
//! [[frontend.request]]
//! action = "deny"                # status = 403 (default)
//! if = "blocked"
//! [[frontend.request]]
//! action = "redirect"            # exactly one of: location = "https://x/" |
//! scheme = "https"               # prefix = "https://new.example" (keeps path and query) |
//! code = 301                     # scheme = "https" (same host, path, query); code 301|302 (default)|303|307|308
//! [[frontend.request]]
//! action = "set-header"          # also add-header (append) and del-header (name only)
//! name = "x-env"
//! value = "prod"
//! [[frontend.request]]
//! action = "set-path"            # the query is kept
//! path = "/v2/index"
//! [[frontend.request]]
//! action = "return"              # status (default 200), content_type (default text/plain), body
//! body = "ok"
//! [[frontend.request]]
//! action = "auth"                # 401 + WWW-Authenticate unless valid Basic credentials
//! userlist = "admins"
//! realm = "lb"                   # default: the frontend's name
//! [[frontend.response]]          # http-response: set-header, add-header, del-header;
//! action = "del-header"          # `if` is evaluated on the request
//! name = "server"
//!
//! [[userlist]]                   # top level; passwords are SHA-512 crypt (`mkpasswd -m sha-512`)
//! name = "admins"
//! users = [{ name = "alice", password = "$6$salt$..." }]
//!
//! [[pool]]
//! name = "app"
//! algorithm = "roundrobin"       # roundrobin | leastconn | random2 | first | source | uri | header
//! # source, uri, header: consistent hash (weighted Maglev, 4099 entries) of the client IP,
//! # the path or a header; a server going down moves only its own keys.
//! hash_query = false             # uri: hash path and query (default: path only)
//! hash_header = "X-User"         # header (required there): without it a request goes roundrobin
//! timeout_connect = "5s"
//! timeout_server = "30s"         # until the response head, then each wait on the server for
//!                                # the response body (HTTP/1 clients: for the request body too)
//! timeout_server_idle = "30s"    # idle keep-alive server connections kept this long; "0s" = none
//!                                # (HTTP/1.1 ones, and shared HTTP/2 ones with no request in flight)
//! timeout_queue = "5s"           # longest wait for a server below maxconn; then 503 (sQ)
//! # (hash algorithms wait for the request's own server; the others for any eligible one)
//! retries = 3                    # on connect failure only, each on another server
//! timeout_tunnel = "1h"          # idle limit of WebSocket/Upgrade tunnels (default: the frontend's, else 1h)
//! send_proxy = "v2"              # "v1" | "v2": PROXY header on each server connection (no reuse then)
//! tls = true                     # TLS to the servers (after the PROXY header); default false
//! verify = true                  # check the server certificate (default true); false accepts any
//! ca = "/etc/lb/server-ca.pem"   # trust anchors; required while verify is on (no system roots)
//! sni = "app.internal"           # name sent and verified; default: the server's IP, as an IP SAN
//! h2 = true                      # HTTP/2 to servers: prior knowledge (h2c) without tls,
//!                                # ALPN h2 (else http/1.1) with tls; default false: HTTP/1.1
//! servers = [
//!   { address = "10.0.0.1:8080", weight = 2, maxconn = 100 },  # maxconn: 0 (default) = unlimited;
//!   { address = "10.0.0.9:8080", backup = true },             # above it requests queue (FIFO, per pool)
//! ]
//! [pool.health]                  # the keys of [service.health]
//! [pool.discovery]               # the keys of [service.discovery]: servers also from DNS
//! name = "_http._tcp.app.internal" # (SRV records of a worse priority become backup servers)
//! nameservers = ["10.0.0.53"]
//! ```
//!
//! HTTP/1 request heads are checked for request smuggling before hyper parses
//! them (`hardening`): Content-Length with Transfer-Encoding, repeated
//! Content-Length (even equal), any Transfer-Encoding but one `chunked`, bad
//! chunk framing, obs-fold, `Host : x`, missing or repeated Host get a 400 and
//! the connection is closed; nothing of such a request is forwarded.
// Functions stay short enough to read at once (threshold in clippy.toml);
// tests, which read as one scenario each, are exempt.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

/// `AsyncWrite` for a stream wrapper whose writes all go to its `inner` field unchanged.
macro_rules! write_through {
    ($ty:ident<T>) => {
        impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for $ty<T> {
            fn poll_write(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                buf: &[u8],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
            }

            fn poll_write_vectored(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
                bufs: &[std::io::IoSlice<'_>],
            ) -> std::task::Poll<std::io::Result<usize>> {
                std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
            }

            fn is_write_vectored(&self) -> bool {
                self.inner.is_write_vectored()
            }

            fn poll_flush(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_flush(cx)
            }

            fn poll_shutdown(
                mut self: std::pin::Pin<&mut Self>,
                cx: &mut std::task::Context<'_>,
            ) -> std::task::Poll<std::io::Result<()>> {
                std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
            }
        }
    };
}

mod accept;
pub mod accept_errors;
pub mod acl;
pub mod actions;
mod balance;
pub mod basic_auth;
mod check;
mod client_hello;
mod compress;
pub mod config_file;
mod connpool;
mod context;
mod deadline;
pub mod duration;
mod error;
mod forward;
mod h1;
mod hardening;
mod log;
mod model;
mod prepare;
pub mod proxy_protocol;
mod request_body;
mod request_rate;
pub mod routing;
mod server;
mod shutdown;
mod source_limit;
pub mod stats;
mod tcp;
mod threads;
mod tls;
mod trailers;
mod tunnel;
mod upstream;

use std::net::SocketAddr;
use std::sync::{Arc, Weak};

use anyhow::Context as _;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use balance::{
    Acquired, Active, Balancer, HASH_TABLE_SIZE, Pick, ServerState, ServerUse, Unavailable,
};
pub use check::{CheckTransport, fetch_h2};
pub use forward::ProxyBody;
pub use h1::fetch::{FetchError, Fetched, fetch};
pub use log::{AccessRecord, LogFormat, RequestId, haproxy_date, rfc3164_date, rfc5424_date};
pub use model::{
    Algorithm, CertPair, Compression, ConfigError, Frontend, FrontendMode, HttpAction,
    MAX_CONNECTIONS, OnMarkedDown, Pool, ProxyConfig, ServerSpec, TCP_ACL_KEYS, TlsConfig,
    TlsVersion, UsePool, User, UserList, VerifyClient,
};
pub use prepare::{add_forwarded, strip_hop_by_hop};
pub use routing::Router;
pub use threads::{Threads, may_run_on};
pub use tls::{CertResolver, TlsError, TlsTerminator, dns_names};
pub use upstream::{NoVerify, ServerIo};

use context::{FrontendRuntime, Shared};

/// Binds with SO_REUSEPORT so a reloaded proxy can listen on the same
/// addresses before the old one stops (no connection is refused in
/// between), and so each serving thread has a listener of its own.
fn reuseport_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = reuseport_socket(addr)?;
    socket.set_nonblocking(true)?;
    // Accepted sockets inherit it: no setsockopt per connection.
    socket.set_tcp_nodelay(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    // As HAProxy's `tcp-smart-accept`: accepted sockets start with delayed
    // ACKs, so a request answered within the delayed-ACK time is acknowledged
    // by the answer rather than by a packet of its own. (After listen(),
    // which resets the socket's ACK state.)
    socket.set_tcp_quickack(false)?;
    Ok(socket.into())
}

/// Whether `addr` can be bound the way this proxy's listeners (and the
/// agent's, [`shared_listener`]) bind it: next to a running `lb` that
/// already listens there, but not where another program does.
pub fn can_bind(addr: SocketAddr) -> std::io::Result<()> {
    reuseport_socket(addr).and_then(|s| s.bind(&addr.into()))
}

/// A non-blocking listener for the agent's own HTTP endpoints (metrics,
/// admin), bound as the proxy's are so that `lb check` and a reload can
/// test the address while this process holds it ([`can_bind`]).
pub fn shared_listener(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = reuseport_socket(addr)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(128)?;
    Ok(socket.into())
}

/// An unbound TCP socket for `addr` that may share its port with this
/// proxy's listeners (SO_REUSEADDR, SO_REUSEPORT; IPv6 only for IPv6).
fn reuseport_socket(addr: SocketAddr) -> std::io::Result<socket2::Socket> {
    let domain = if addr.is_ipv4() {
        socket2::Domain::IPV4
    } else {
        socket2::Domain::IPV6
    };
    let socket = socket2::Socket::new(domain, socket2::Type::STREAM, Some(socket2::Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    Ok(socket)
}

/// What both ways of running share, ready before anything listens.
struct Prepared {
    /// Each frontend with its binds.
    frontends: Vec<(Arc<FrontendRuntime>, Vec<SocketAddr>)>,
    terminators: Vec<(String, Arc<TlsTerminator>)>,
    /// One per pool, shared by every serving thread.
    balancers: Vec<Arc<Balancer>>,
    /// Set when the proxy, dropped, closes what is left (`hard_stop_after`):
    /// each frontend's `FrontendCtx::kill` sees it.
    kill: watch::Sender<bool>,
}

/// Something a frontend or pool needs from this host that it would not get
/// (a file, an address to bind): the key that names it, and why.
#[derive(Debug)]
pub struct HostProblem {
    /// The frontend's or pool's key (`tls`, `error_pages`, `binds`, `ca`).
    pub key: &'static str,
    /// The entry of that key's array, for `binds`.
    pub index: Option<usize>,
    /// What is wrong, the file or address named.
    pub reason: String,
}

/// Reads every file frontend `fe` names (certificates, keys, client CA and
/// CRLs, error pages) as a start would, and tries to bind its addresses
/// beside any listener of this proxy (SO_REUSEPORT, not listening), so that
/// a configuration this host cannot run is refused before anything runs it.
pub fn frontend_host_problems(fe: &Frontend) -> Vec<HostProblem> {
    let mut problems = Vec::new();
    if let Some(tls) = &fe.tls
        && let Err(e) = TlsTerminator::load(tls, fe.mode == FrontendMode::Http)
    {
        problems.push(HostProblem {
            key: "tls",
            index: None,
            reason: format!("frontend \"{}\": {e}", fe.name),
        });
    }
    if let Err(e) = context::read_error_pages(&fe.name, &fe.error_pages) {
        problems.push(HostProblem {
            key: "error_pages",
            index: None,
            reason: format!("{e:#}"),
        });
    }
    for (i, bind) in fe.binds.iter().enumerate() {
        if let Err(e) = can_bind(*bind) {
            problems.push(HostProblem {
                key: "binds",
                index: Some(i),
                reason: format!("frontend \"{}\": cannot bind {bind}: {e}", fe.name),
            });
        }
    }
    problems
}

/// As [`frontend_host_problems`], for the files of a TLS pool: its client
/// certificate (`cert`, `key`) and trust anchors (`ca`).
pub fn pool_host_problems(pool: &Pool) -> Option<HostProblem> {
    let problem = |key, e: &dyn std::fmt::Display| HostProblem {
        key,
        index: None,
        reason: format!("pool \"{}\": {e:#}", pool.name),
    };
    if pool.tls
        && let (Some(cert), Some(key)) = (&pool.cert, &pool.key)
        && let Err(e) = tls::certified_key(&tls::provider(), cert, key)
    {
        let in_cert = match &e {
            TlsError::Io { path, .. } => path == cert,
            TlsError::NoCertificate(_) => true,
            _ => false,
        };
        return Some(problem(if in_cert { "cert" } else { "key" }, &e));
    }
    upstream::client_config(pool)
        .err()
        .map(|e| problem("ca", &format!("{e:#}")))
}

/// Shuts the sessions of `server` of `pool` down in the proxies of `older`
/// whose threads still run.
fn shutdown_older(older: &[Weak<Shared>], pool: &str, server: SocketAddr) {
    for shared in older.iter().filter_map(Weak::upgrade) {
        if let Some(b) = balancer_of(std::slice::from_ref(&shared), pool) {
            b.shutdown_sessions(server);
        }
    }
}

/// The balancer of pool `pool`: the first thread's, as every thread shares it.
fn balancer_of<'a>(shared: &'a [Arc<Shared>], pool: &str) -> Option<&'a Balancer> {
    let first = shared.first()?;
    let found = first.pools.iter().find(|p| &*p.name == pool)?;
    Some(&found.balancer)
}

/// Validates `cfg`, loads certificates and builds the frontends and balancers.
fn prepare(cfg: &ProxyConfig, previous: Option<&Proxy>) -> anyhow::Result<Prepared> {
    cfg.validate()?;
    let mut actions = actions::compile(cfg)?;
    let (kill, killed) = watch::channel(false);
    let mut prepared = Prepared {
        kill,
        frontends: Vec::new(),
        terminators: Vec::new(),
        balancers: cfg
            .pools
            .iter()
            .map(|p| Arc::new(Balancer::from_pool(p)))
            .collect(),
    };
    for (index, fe) in cfg.frontends.iter().enumerate() {
        let acceptor = match &fe.tls {
            Some(tls) => {
                let http = fe.mode == FrontendMode::Http;
                let kept = previous
                    .and_then(|p| p.terminator_of(&fe.name))
                    .filter(|t| t.serves(tls, http));
                let terminator = match kept {
                    // The same TLS settings: its ticket keys and session
                    // cache go on, so clients resume across the restart
                    // (a pool change from the CLI or DNS is one); its files
                    // are read again.
                    Some(t) => {
                        t.reload()
                            .with_context(|| format!("frontend {}: TLS", fe.name))?;
                        t.clone()
                    }
                    None => Arc::new(
                        TlsTerminator::load(tls, http)
                            .with_context(|| format!("frontend {}: TLS", fe.name))?,
                    ),
                };
                prepared
                    .terminators
                    .push((fe.name.clone(), terminator.clone()));
                Some(terminator)
            }
            None => None,
        };
        // validate() checked that the default pool exists.
        let default_pool = cfg.pool_index(&fe.default_pool).unwrap_or(0);
        // Our own HTTP/1 path forwards to HTTP/1.1 servers only (proxy/h1).
        // (Compressed answers are made on hyper's path: compress.rs.)
        let own_h1 = fe.mode == FrontendMode::Http
            && fe.compression.is_none()
            && std::iter::once(&fe.default_pool)
                .chain(fe.use_pool.iter().map(|u| &u.pool))
                .filter_map(|name| cfg.pool_index(name))
                .all(|i| !cfg.pools[i].h2);
        let loaded = context::Loaded {
            tls: acceptor,
            kept_rates: previous.map_or(&[][..], |p| p.request_rates_of(&fe.name)),
            error_pages: context::read_error_pages(&fe.name, &fe.error_pages)?,
            kill: killed.clone(),
        };
        let runtime = Arc::new(FrontendRuntime::new(
            fe,
            index,
            default_pool,
            actions.remove(&fe.name),
            loaded,
            own_h1,
        ));
        prepared.frontends.push((runtime, fe.binds.clone()));
    }
    Ok(prepared)
}

/// A running proxy; dropping it stops accepting and gracefully closes client connections.
pub struct Proxy {
    /// What it runs (its servers as last updated).
    config: ProxyConfig,
    /// One per serving thread (one when running on the caller's runtime).
    shared: Vec<Arc<Shared>>,
    terminators: Vec<(String, Arc<TlsTerminator>)>,
    addrs: Vec<SocketAddr>,
    /// Each frontend's counters and connection limit, for `stats`.
    frontends: Vec<FrontendEntry>,
    /// Accept loops on the caller's runtime (`start`).
    tasks: Vec<JoinHandle<()>>,
    /// Serving threads (`start_threads`): each bind's listening sockets, one
    /// per thread, handed over to the next proxy on a reload.
    sockets: Vec<(SocketAddr, Vec<std::net::TcpListener>)>,
    /// Serving threads: tells them, once dropped, to close their
    /// connections now (`threads::draining`).
    stop_now: Option<watch::Sender<bool>>,
    /// Its line's dropped proxies still draining, shared with those it
    /// succeeds and those that succeed it.
    draining: threads::Draining,
    /// The state of the proxies it succeeded, while their threads still
    /// drain: their tunnels and sessions are shut down with their servers too.
    older: Vec<Weak<Shared>>,
    /// Dropped with the proxy, which tells every connection to shut down.
    _shutdown: watch::Sender<()>,
}

impl Proxy {
    /// Validates `cfg`, loads certificates, binds every address and starts
    /// serving on the caller's runtime (in-process use: tests, benches).
    /// `route` picks a pool per request; None sends everything to each frontend's default pool.
    pub async fn start(cfg: ProxyConfig, route: Option<Router>) -> anyhow::Result<Proxy> {
        let prepared = prepare(&cfg, None)?;
        let shared = Arc::new(Shared::new(&cfg, &prepared.balancers, route)?);
        let (tx, rx) = watch::channel(());
        let mut proxy = Proxy {
            config: cfg,
            shared: vec![shared.clone()],
            terminators: prepared.terminators,
            addrs: Vec::new(),
            frontends: prepared
                .frontends
                .iter()
                .map(|(fe, _)| FrontendEntry::of(fe))
                .collect(),
            tasks: Vec::new(),
            sockets: Vec::new(),
            stop_now: None,
            draining: threads::Draining::default(),
            older: Vec::new(),
            _shutdown: tx,
        };
        for (fe, binds) in prepared.frontends {
            for bind in binds {
                let listener = reuseport_listener(bind)
                    .and_then(accept::Listener::from_std)
                    .with_context(|| format!("frontend {}: binding {bind}", fe.ctx.name))?;
                proxy.addrs.push(listener.local_addr()?);
                proxy.tasks.push(tokio::spawn(server::accept_loop(
                    listener,
                    fe.clone(),
                    shared.clone(),
                    rx.clone(),
                )));
            }
        }
        Ok(proxy)
    }

    /// As `start`, but served by `threads.count` threads of their own
    /// (`lb-proxy-0`, ...), each a current-thread runtime with its own
    /// SO_REUSEPORT listener per bind (see `threads`). Listening sockets of
    /// `previous` with the same bind are taken over rather than bound anew,
    /// so no connection waiting in their backlog is lost on a reload.
    pub fn start_threads(
        cfg: ProxyConfig,
        route: Option<Router>,
        threads: &Threads,
        previous: Option<&Proxy>,
    ) -> anyhow::Result<Proxy> {
        let prepared = prepare(&cfg, previous)?;
        let count = threads.count.max(1);
        let (tx, rx) = watch::channel(());
        let mut addrs = Vec::new();
        let mut sockets = Vec::new();
        let mut per_thread: Vec<threads::Listeners> = (0..count).map(|_| Vec::new()).collect();
        for (fe, binds) in &prepared.frontends {
            for bind in binds {
                let kept = previous.map_or(&[][..], |p| p.sockets_of(*bind));
                let set = threads::listeners(*bind, count, kept)
                    .with_context(|| format!("frontend {}: binding {bind}", fe.ctx.name))?;
                addrs.push(set[0].local_addr()?);
                for (mine, listener) in per_thread.iter_mut().zip(&set) {
                    mine.push((listener.try_clone()?, fe.clone()));
                }
                sockets.push((*bind, set));
            }
        }
        let frontends = prepared
            .frontends
            .iter()
            .map(|(fe, _)| FrontendEntry::of(fe))
            .collect();
        let (stop_now, stop_rx) = watch::channel(false);
        let plan = threads::Plan {
            cfg: cfg.clone(),
            hard_stop_after: threads.hard_stop_after,
            stop_now: stop_rx,
            kill: prepared.kill,
            balancers: prepared.balancers,
            route,
            frontends: prepared.frontends.into_iter().map(|(fe, _)| fe).collect(),
        };
        let shared = threads::spawn(Arc::new(plan), per_thread, &threads.cpu_map, rx)?;
        Ok(Proxy {
            config: cfg,
            shared,
            terminators: prepared.terminators,
            addrs,
            frontends,
            tasks: Vec::new(),
            sockets,
            stop_now: Some(stop_now),
            draining: previous.map(|p| p.draining.clone()).unwrap_or_default(),
            older: previous.map(Proxy::lineage).unwrap_or_default(),
            _shutdown: tx,
        })
    }

    /// This proxy's state and that of the proxies it succeeded whose
    /// threads still run (weakly: a proxy whose threads have ended is gone).
    fn lineage(&self) -> Vec<Weak<Shared>> {
        let mine = self.shared.first().map(Arc::downgrade);
        let live = self.older.iter().filter(|w| w.strong_count() > 0).cloned();
        live.chain(mine).collect()
    }

    /// The listening sockets of `bind`, one per serving thread (none in-process).
    fn sockets_of(&self, bind: SocketAddr) -> &[std::net::TcpListener] {
        self.sockets
            .iter()
            .find(|(b, _)| *b == bind)
            .map_or(&[][..], |(_, set)| set.as_slice())
    }

    /// The TLS termination of frontend `name`, if it has one.
    fn terminator_of(&self, name: &str) -> Option<&Arc<TlsTerminator>> {
        self.terminators
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, t)| t)
    }

    /// The request rate tables of frontend `name`, empty if it has none.
    fn request_rates_of(&self, name: &str) -> &[Arc<request_rate::RequestRate>] {
        self.frontends
            .iter()
            .find(|f| f.name == name)
            .map_or(&[][..], |f| f.request_rates.as_slice())
    }

    /// Marks a server of a pool up or down (driven by health checks); false if unknown.
    pub fn set_server_up(&self, pool: &str, server: SocketAddr, up: bool) -> bool {
        let state = if up {
            ServerUse::Serving
        } else {
            ServerUse::Off
        };
        self.set_server_use(pool, server, state)
    }

    /// Sets what a server of a pool takes (health checks and admin state:
    /// a draining server keeps its persistent clients); false if unknown.
    pub fn set_server_use(&self, pool: &str, server: SocketAddr, state: ServerUse) -> bool {
        balancer_of(&self.shared, pool).is_some_and(|b| b.set_use(server, state))
    }

    /// A server of a pool was marked down by its health checks: under the
    /// pool's `on_marked_down = "shutdown-sessions"` its open `tcp` sessions
    /// and tunnels are closed. Whether they were.
    pub fn server_marked_down(&self, pool: &str, server: SocketAddr) -> bool {
        let shut = balancer_of(&self.shared, pool).is_some_and(|b| b.marked_down(server));
        if shut {
            // Those of the proxies still draining too.
            shutdown_older(&self.older, pool, server);
        }
        shut
    }

    /// Takes the pool servers of `cfg` in place when it differs from the
    /// running configuration in nothing else (`ProxyConfig::same_but_servers`),
    /// as HAProxy's runtime `add server` and `del server`: connections,
    /// serving threads, queues, TLS sessions and the servers that stay go on
    /// untouched (`Balancer::set_servers`). False, changing nothing, when
    /// anything else differs or `cfg` is not valid.
    pub fn update_servers(&mut self, cfg: &ProxyConfig) -> bool {
        if !self.config.same_but_servers(cfg) || cfg.validate().is_err() {
            return false;
        }
        // Balancers are shared by the threads: the first thread's are everyone's.
        let Some(shared) = self.shared.first() else {
            return false;
        };
        for (i, pool) in cfg.pools.iter().enumerate() {
            // Pools whose servers did not change keep their tables as they are
            // (smooth round robin's place in its cycle too).
            if self
                .config
                .pools
                .get(i)
                .is_some_and(|p| p.servers == pool.servers)
            {
                continue;
            }
            if let Some(running) = shared.pools.get(i) {
                running.balancer.set_servers(&pool.servers);
            }
            let addrs: Vec<SocketAddr> = pool.servers.iter().map(|s| s.address).collect();
            // Each thread keeps connections of its own.
            for thread in &self.shared {
                if let Some(running) = thread.pools.get(i) {
                    running.conns.keep_only(&addrs);
                }
            }
        }
        self.config = cfg.clone();
        true
    }

    /// Re-reads every frontend's files: certificates, client CA and CRLs,
    /// error pages; all or nothing per frontend, the ones in use kept on error.
    pub fn reload_files(&self) -> anyhow::Result<()> {
        for (name, terminator) in &self.terminators {
            terminator.reload().with_context(|| {
                format!("frontend {name}: reloading certificates, client CA and CRLs")
            })?;
        }
        for fe in &self.frontends {
            fe.ctx.reload_error_pages()?;
        }
        Ok(())
    }

    /// Bound addresses, in frontend then bind order (real ports when binding port 0).
    pub fn local_addrs(&self) -> Vec<SocketAddr> {
        self.addrs.clone()
    }

    /// A handle on the live figures of the frontends and pools, for metrics and `lb show`.
    pub fn stats(&self) -> ProxyStats {
        ProxyStats {
            shared: self.shared.clone(),
            older: self.older.clone(),
            frontends: Arc::new(self.frontends.clone()),
        }
    }
}

impl Proxy {
    /// Stops the proxy softly (HAProxy's soft stop): its listeners close at
    /// once, its connections end as after a reload (idle ones closed,
    /// requests in flight answered; what is left closed at
    /// `hard_stop_after`), and so do those of the proxies it succeeded.
    pub fn stop_softly(self) -> Drained {
        let line = self.draining.clone();
        drop(self);
        Drained(line)
    }
}

/// The serving threads of a proxy stopped softly, and of the ones it
/// succeeded, until they end.
pub struct Drained(threads::Draining);

impl Drained {
    /// Whether every one of those threads has ended.
    pub fn done(&self) -> bool {
        let mut list = self.0.lock().unwrap_or_else(|e| e.into_inner());
        // Threads that ended hold no receiver of their stop signal.
        list.retain(|s| !s.is_closed());
        list.is_empty()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        if let Some(stop_now) = self.stop_now.take() {
            threads::draining(&self.draining, stop_now);
        }
    }
}

/// What `ProxyStats` reads of a frontend (shared by its serving threads).
#[derive(Clone)]
struct FrontendEntry {
    name: String,
    /// Its settings, for `reload_files`.
    ctx: Arc<context::FrontendCtx>,
    /// Its request rate tables, for the frontend of the same name after a reload.
    request_rates: Vec<Arc<request_rate::RequestRate>>,
    counters: Arc<stats::Counters>,
    limit: Arc<tokio::sync::Semaphore>,
    /// Permits held by accept loops waiting for a client.
    accepting: Arc<std::sync::atomic::AtomicUsize>,
    max_connections: usize,
}

impl FrontendEntry {
    fn of(fe: &FrontendRuntime) -> Self {
        FrontendEntry {
            name: fe.ctx.name.to_string(),
            ctx: fe.ctx.clone(),
            request_rates: fe.ctx.request_rates.clone(),
            counters: fe.ctx.stats.clone(),
            limit: fe.limit.clone(),
            accepting: fe.accepting.clone(),
            max_connections: fe.max_connections,
        }
    }
}

/// Live figures of a running proxy's frontends and pools, readable from any task.
#[derive(Clone)]
pub struct ProxyStats {
    /// One per serving thread.
    shared: Vec<Arc<Shared>>,
    /// The proxies it succeeded, while they drain (`Proxy::older`).
    older: Vec<Weak<Shared>>,
    frontends: Arc<Vec<FrontendEntry>>,
}

/// Figures of one frontend.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct FrontendStats {
    /// Frontend name.
    pub name: String,
    /// Client connections open now.
    pub current_connections: usize,
    /// Its `max_connections`.
    pub max_connections: usize,
    /// Its request counters.
    pub counters: stats::CounterSnapshot,
}

/// Figures of one pool.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PoolStats {
    /// Pool name.
    pub name: String,
    /// Requests waiting in the pool's queue for a server below its `maxconn`.
    pub queued: usize,
    /// Its servers, in configuration order.
    pub servers: Vec<ServerStats>,
    /// Its request counters.
    pub counters: stats::CounterSnapshot,
}

/// Figures of one pool server.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ServerStats {
    /// Server address.
    pub address: SocketAddr,
    /// Requests in flight to it (HAProxy's `scur`).
    pub current: usize,
    /// Idle keep-alive connections to it.
    pub idle_connections: usize,
    /// Its weight in the running proxy.
    pub weight: u32,
    /// Whether it takes requests (administratively ready, healthy, and
    /// not out after failed attempts).
    pub up: bool,
    /// Out after `max_fails` failed attempts in a row, for now.
    #[serde(default)]
    pub taken_out: bool,
    /// Its request counters.
    pub counters: stats::CounterSnapshot,
}

impl ProxyStats {
    /// Closes the `tcp` sessions and tunnels of a pool's server (the
    /// agent's handle on the running proxy's pools); false if unknown.
    pub fn shutdown_sessions(&self, pool: &str, server: SocketAddr) -> bool {
        let found = balancer_of(&self.shared, pool).is_some_and(|b| b.shutdown_sessions(server));
        if found {
            shutdown_older(&self.older, pool, server);
        }
        found
    }

    /// Every frontend's figures.
    pub fn frontends(&self) -> Vec<FrontendStats> {
        self.frontends
            .iter()
            .map(|f| FrontendStats {
                name: f.name.clone(),
                current_connections: f
                    .max_connections
                    .saturating_sub(f.limit.available_permits())
                    .saturating_sub(f.accepting.load(std::sync::atomic::Ordering::Relaxed)),
                max_connections: f.max_connections,
                counters: f.counters.snapshot(),
            })
            .collect()
    }

    /// Every pool's figures.
    pub fn pools(&self) -> Vec<PoolStats> {
        let Some(first) = self.shared.first() else {
            return Vec::new();
        };
        // Balancers and counters are shared by the serving threads; kept
        // connections are each thread's own, so those are summed.
        first
            .pools
            .iter()
            .enumerate()
            .map(|(i, p)| PoolStats {
                name: p.name.to_string(),
                queued: p.balancer.queued(),
                servers: p
                    .balancer
                    .servers()
                    .iter()
                    .map(|s| (s, s.is_out(balance::clock_ms())))
                    .map(|(s, out)| ServerStats {
                        address: s.addr,
                        current: s.active(),
                        idle_connections: self
                            .shared
                            .iter()
                            .filter_map(|shared| shared.pools.get(i))
                            .map(|pool| pool.idle_connections(s.addr))
                            .sum(),
                        weight: s.weight(),
                        // Out after failed attempts (max_fails) counts as down.
                        up: s.is_up() && !out,
                        taken_out: out,
                        counters: s.stats.snapshot(),
                    })
                    .collect(),
                counters: p.stats.snapshot(),
            })
            .collect()
    }
}
