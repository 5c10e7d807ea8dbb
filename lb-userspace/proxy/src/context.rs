//! What a request runs in, from the widest to the narrowest: the pools of the
//! proxy (`Shared`, `PoolRuntime`), the frontend a connection came in on
//! (`FrontendRuntime` for serving it, `FrontendCtx` for its requests), and the
//! client connection itself (`ConnCtx`, `Activity`). Both request paths, ours
//! (`h1`) and hyper's (`forward::handle`), read them; they depend on nothing
//! of either path.

use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, AtomicUsize};
use std::sync::{Arc, Mutex};
use std::task::Waker;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use http::uri::Scheme;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::sync::Semaphore;

use crate::acl;
use crate::actions::CompiledActions;
use crate::balance::Balancer;
use crate::connpool::ConnPool;
use crate::log::LogFormat;
use crate::model::{Frontend, Pool};
use crate::request_rate::RequestRate;
use crate::routing::Router;
use crate::source_limit::SourceLimit;
use crate::stats::Counters;
use crate::tls::{TlsFacts, TlsTerminator};
use crate::upstream;

/// A pool with its balancer and its server connections.
pub(crate) struct PoolRuntime {
    pub name: Arc<str>,
    /// Shared by every serving thread (see `crate::threads`): leastconn
    /// counts, maxconn and the queue are the pool's, not a thread's.
    pub balancer: Arc<Balancer>,
    /// Keep-alive connections to the servers (proxy/connpool.rs), the
    /// serving thread's own: a socket belongs to the runtime that registered it.
    pub conns: Arc<ConnPool>,
    /// `https` for `tls = true` pools (the :scheme of HTTP/2 requests), else `http`.
    pub scheme: Scheme,
    pub timeout_server: Duration,
    pub retries: u32,
    /// `timeout_tunnel` of the pool, if set (proxy/tunnel.rs).
    pub timeout_tunnel: Option<Duration>,
    /// HTTP/2 to the servers (`h2`): only hyper's path forwards there.
    pub h2: bool,
    /// The pool's request counters (its balancer's: one set for every serving thread).
    pub stats: Arc<Counters>,
    /// Its persistence cookie's name (`cookie`), if it has one.
    pub cookie: Option<Arc<str>>,
}

impl PoolRuntime {
    /// The pool of `cfg` choosing with `balancer`; its connection pool's
    /// sweeper runs on the current runtime.
    pub fn new(cfg: &Pool, balancer: Arc<Balancer>) -> anyhow::Result<Self> {
        let connector = upstream::Connector::new(cfg)?;
        // send_proxy: a server connection carries one client's address, so none is reused.
        let idle = match cfg.send_proxy {
            Some(_) => Duration::ZERO,
            None => cfg.timeout_server_idle,
        };
        let conns = ConnPool::new(connector, cfg.h2, idle);
        Ok(PoolRuntime {
            name: cfg.name.as_str().into(),
            stats: balancer.counters().clone(),
            balancer,
            conns,
            scheme: if cfg.tls { Scheme::HTTPS } else { Scheme::HTTP },
            timeout_server: cfg.timeout_server,
            retries: cfg.retries,
            timeout_tunnel: cfg.timeout_tunnel,
            h2: cfg.h2,
            cookie: cfg.cookie.as_deref().map(Arc::from),
        })
    }

    /// Idle keep-alive connections kept for `server`.
    pub(crate) fn idle_connections(&self, server: SocketAddr) -> usize {
        self.conns.idle_count(server)
    }
}

/// Shared by all frontends of one serving thread.
pub(crate) struct Shared {
    pub pools: Vec<PoolRuntime>,
    pub route: Option<Router>,
}

impl Shared {
    /// The pool (index) `frontend`'s `use_pool` rules choose for `req`,
    /// else its default pool: for requests and `tcp` sessions alike.
    pub(crate) fn pool_for(&self, frontend: &FrontendCtx, req: &acl::Request<'_>) -> usize {
        self.route
            .as_ref()
            .and_then(|route| route(frontend.index, req))
            .filter(|&i| i < self.pools.len())
            .unwrap_or(frontend.default_pool)
    }

    /// The pools of `cfg` over `balancers` (one per pool, in order).
    pub fn new(
        cfg: &crate::ProxyConfig,
        balancers: &[Arc<Balancer>],
        route: Option<Router>,
    ) -> anyhow::Result<Shared> {
        let pools = cfg
            .pools
            .iter()
            .zip(balancers)
            .map(|(p, b)| {
                PoolRuntime::new(p, b.clone()).with_context(|| format!("pool {}", p.name))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(Shared { pools, route })
    }
}

/// Settings of the frontend a connection came in on.
pub(crate) struct FrontendCtx {
    pub name: Arc<str>,
    /// Index in `ProxyConfig::frontends`, which the router is called with.
    pub index: usize,
    pub default_pool: usize,
    /// The frontend's request and response actions, if it has any.
    pub actions: Option<CompiledActions>,
    pub forwarded_headers: bool,
    /// `request_id_header`: each request's unique ID goes in it (`log::RequestId`).
    pub request_id_header: Option<http::HeaderName>,
    pub https: bool,
    /// `timeout_tunnel` of the frontend, if set; the pool's wins.
    pub timeout_tunnel: Option<Duration>,
    /// `timeout_client`: on hyper's path, each wait for a request body.
    pub timeout_client: Duration,
    /// Access log format of the frontend.
    pub log_format: LogFormat,
    /// The frontend's request counters.
    pub stats: Arc<Counters>,
    /// Exchanges with servers under way in tasks of their own for HTTP/2
    /// streams (forward.rs), those of streams the client reset included.
    pub exchanges: AtomicUsize,
    /// Its `max_connections`, which bounds the exchanges of reset streams.
    pub max_connections: usize,
    /// The request rates its `src_request_rate` ACLs look at, one per
    /// period (shared by every serving thread, and kept over a reload).
    pub request_rates: Vec<Arc<RequestRate>>,
    /// `client_cert_header` of its TLS settings: removed from every
    /// request, then set to the client's verified certificate, if any.
    pub client_cert_header: Option<http::HeaderName>,
    /// The request fields the proxy writes (forwarded headers, the client
    /// certificate's, the request ID's, those its rules edit), whose
    /// `_`-for-`-` look-alikes a client sends are dropped.
    pub owned_headers: Box<[http::HeaderName]>,
    /// Its `error_pages` as configured, and as read (at start, and again by
    /// `Proxy::reload_files`): the body of each status it replaces.
    pub error_page_files: ErrorPageFiles,
    pub error_pages: std::sync::RwLock<Vec<(u16, bytes::Bytes)>>,
    /// `[frontend.compression]`, if set (compress.rs).
    pub compression: Option<crate::model::Compression>,
    /// True once its proxy's hard stop (`hard_stop_after`) came: what is
    /// still open ends, logged as killed (HAProxy's `K`).
    pub kill: tokio::sync::watch::Receiver<bool>,
}

/// A frontend's `error_pages`: status (as written) to file.
pub(crate) type ErrorPageFiles = std::collections::BTreeMap<String, std::path::PathBuf>;

/// Largest `error_pages` file: a page, not a download.
const MAX_ERROR_PAGE: u64 = 64 * 1024;

/// Reads the `error_pages` of frontend `name` (validate() checked the statuses).
pub(crate) fn read_error_pages(
    name: &str,
    files: &ErrorPageFiles,
) -> anyhow::Result<Vec<(u16, bytes::Bytes)>> {
    let mut pages = Vec::new();
    for (status, path) in files {
        let what = || format!("frontend {name}: error page {status} ({})", path.display());
        let page = crate::config_file::read(path, MAX_ERROR_PAGE).with_context(what)?;
        pages.push((status.parse().with_context(what)?, bytes::Bytes::from(page)));
    }
    Ok(pages)
}

impl FrontendCtx {
    /// The frontend's own page for `status`, if `error_pages` has one.
    pub(crate) fn error_page(&self, status: http::StatusCode) -> Option<bytes::Bytes> {
        if self.error_page_files.is_empty() {
            return None;
        }
        let pages = self.error_pages.read().unwrap_or_else(|e| e.into_inner());
        pages
            .iter()
            .find(|(s, _)| *s == status.as_u16())
            .map(|(_, page)| page.clone())
    }

    /// Reads the `error_pages` files again; on error the pages in use stay.
    pub(crate) fn reload_error_pages(&self) -> anyhow::Result<()> {
        let fresh = read_error_pages(&self.name, &self.error_page_files)?;
        *self.error_pages.write().unwrap_or_else(|e| e.into_inner()) = fresh;
        Ok(())
    }

    /// Counts a request from `src` in each of the frontend's request rates:
    /// the source's rates, for its ACLs (`acl::Request::src_request_rates`).
    pub(crate) fn count_request(&self, src: IpAddr) -> Vec<(Duration, u32)> {
        if self.request_rates.is_empty() {
            return Vec::new();
        }
        let now = Instant::now();
        self.request_rates
            .iter()
            .map(|r| (r.period(), r.hit(src, now)))
            .collect()
    }
}

/// Requests in flight on a client connection, read by its timeout watcher.
#[derive(Debug, Default)]
pub(crate) struct Activity {
    /// Requests dispatched and not yet answered to the end.
    pub active: AtomicUsize,
    /// Requests dispatched so far.
    pub dispatched: AtomicU64,
    /// Woken when the last request in flight ends, so idle timeouts get armed.
    pub idle_waker: Mutex<Option<Waker>>,
    /// Set once a `101 Switching Protocols` went out: the stream is a tunnel now.
    pub upgraded: std::sync::atomic::AtomicBool,
    /// Set once the 101 is written and the tunnel has the stream: its
    /// writes are then the tunnel's (`timeout_tunnel`), not timed by `ClientIo`.
    pub spliced: std::sync::atomic::AtomicBool,
    /// Notified when the task of an `upgraded` connection's tunnel ends:
    /// until then the connection keeps its slot (`max_connections`).
    pub tunnel_ended: tokio::sync::Notify,
    /// Set when `ClientIo` ended the connection for `timeout_client`: the
    /// answers cut with it are logged `cD`, not `CD`.
    pub client_timed_out: std::sync::atomic::AtomicBool,
    /// Response bodies that handed hyper data and have not been asked for
    /// more since: hyper waits for room to send (the client is not reading,
    /// or gives no HTTP/2 flow-control window).
    pub stalled: AtomicUsize,
    /// Bumped whenever such a body is asked for more: its data went out.
    pub moved: AtomicU64,
}

/// One client connection.
pub(crate) struct ConnCtx {
    pub frontend: Arc<FrontendCtx>,
    pub peer: SocketAddr,
    /// Address the client connected to (from the PROXY header with `accept_proxy`).
    pub local: SocketAddr,
    /// What its TLS handshake established (None: cleartext).
    pub tls: Option<Box<TlsFacts>>,
    pub activity: Arc<Activity>,
    /// When the connection last became ready for a request (accept or end of a response).
    pub ready_since: Mutex<Instant>,
}

/// Client-side timeouts of a frontend.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ClientTimeouts {
    pub http_request: Duration,
    pub keep_alive: Duration,
    pub client: Duration,
}

/// What `prepare` read or kept for a frontend before it starts.
pub(crate) struct Loaded<'a> {
    /// Its TLS termination, if it has `tls`.
    pub tls: Option<Arc<TlsTerminator>>,
    /// Request rates of the frontend of the same name before a reload,
    /// whose tables it goes on counting in.
    pub kept_rates: &'a [Arc<RequestRate>],
    /// Its `error_pages`, read.
    pub error_pages: Vec<(u16, bytes::Bytes)>,
    /// Its proxy's hard stop (`FrontendCtx::kill`).
    pub kill: tokio::sync::watch::Receiver<bool>,
}

impl Default for Loaded<'_> {
    /// Nothing loaded, and no hard stop ever (the sender is gone at once).
    fn default() -> Self {
        Loaded {
            tls: None,
            kept_rates: &[],
            error_pages: Vec::new(),
            kill: tokio::sync::watch::channel(false).1,
        }
    }
}

/// A frontend ready to serve connections from its listeners.
pub(crate) struct FrontendRuntime {
    pub ctx: Arc<FrontendCtx>,
    pub tls: Option<Arc<TlsTerminator>>,
    /// Connections served at once, by every serving thread together.
    pub limit: Arc<Semaphore>,
    /// Permits of `limit` its accept loops hold while waiting for a
    /// connection: taken, but no client's (see `ProxyStats::frontends`).
    pub accepting: Arc<AtomicUsize>,
    /// The limit's size: all permits back means no connection left.
    pub max_connections: usize,
    /// `max_connections_per_source`, if set: shared by every serving thread, as `limit`.
    pub per_source: Option<Arc<SourceLimit>>,
    /// SO_SNDBUF of accepted connections; 0: the kernel's autotuning.
    pub send_buffer: usize,
    pub timeouts: ClientTimeouts,
    pub builder: auto::Builder<TokioExecutor>,
    /// Largest HTTP/1 request head, for `GuardIo`.
    pub head_limit: usize,
    /// Read a PROXY protocol header first: from every peer (`Some([])`)
    /// or from these networks only (`accept_proxy_from`).
    pub accept_proxy: Option<Box<[crate::acl::Cidr]>>,
    /// HTTP/1 clients take our own path (proxy/h1): every pool the frontend
    /// routes to speaks HTTP/1.1 to its servers.
    pub own_h1: bool,
    /// A `tcp` frontend (proxy/tcp.rs).
    pub tcp: bool,
    /// A `tcp` frontend passing TLS through whose rules look at the SNI:
    /// it reads the ClientHello before choosing a server.
    pub inspect_sni: bool,
}

/// `FrontendCtx::owned_headers` of a frontend.
fn owned_headers(cfg: &Frontend, actions: Option<&CompiledActions>) -> Box<[http::HeaderName]> {
    let mut names = Vec::new();
    if cfg.forwarded_headers {
        names.extend([
            http::HeaderName::from_static("x-forwarded-for"),
            http::HeaderName::from_static("x-forwarded-proto"),
            http::header::FORWARDED,
        ]);
    }
    // validate() checked these names.
    let cert = cfg
        .tls
        .as_ref()
        .and_then(|t| t.client_cert_header.as_deref());
    names.extend(cert.and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()));
    names.extend(cfg.request_id_name());
    names.extend(
        actions
            .into_iter()
            .flat_map(|a| a.request_header_names().cloned()),
    );
    // Only names with a `-` have look-alikes.
    names.retain(|n| n.as_str().contains('-'));
    names.sort_by(|a, b| a.as_str().cmp(b.as_str()));
    names.dedup();
    names.into()
}

impl FrontendRuntime {
    /// Whether a connection from `peer` starts with a PROXY header.
    pub fn expects_proxy(&self, peer: IpAddr) -> bool {
        self.accept_proxy
            .as_ref()
            .is_some_and(|from| from.is_empty() || from.iter().any(|c| c.contains(peer)))
    }

    /// `index` is the frontend's place in the configuration (see
    /// `routing::Router`).
    pub fn new(
        cfg: &Frontend,
        index: usize,
        default_pool: usize,
        actions: Option<CompiledActions>,
        loaded: Loaded<'_>,
        own_h1: bool,
    ) -> Self {
        let Loaded {
            tls,
            kept_rates,
            error_pages,
            kill,
        } = loaded;
        let tls_none = tls.is_none();
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // hyper's own header timeout closes silently; ClientIo answers 408 instead.
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .keep_alive(true)
            .writev(false)
            // hyper refuses buffers under 8 KiB.
            .max_buf_size(cfg.request_header_limit.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            // HAProxy-like memory per stream (hyper's 400 KiB x 200 streams let
            // a client that stops reading hold 80 MB); still several socket writes.
            .max_send_buf_size(64 * 1024)
            .max_concurrent_streams(100)
            .max_header_list_size(u32::try_from(cfg.request_header_limit).unwrap_or(u32::MAX));
        FrontendRuntime {
            ctx: Arc::new(FrontendCtx {
                owned_headers: owned_headers(cfg, actions.as_ref()),
                name: cfg.name.as_str().into(),
                index,
                default_pool,
                actions,
                forwarded_headers: cfg.forwarded_headers,
                request_id_header: cfg.request_id_name(),
                https: tls.is_some(),
                timeout_tunnel: cfg.timeout_tunnel,
                timeout_client: cfg.timeout_client,
                log_format: cfg.log_format,
                stats: Arc::default(),
                exchanges: AtomicUsize::new(0),
                max_connections: cfg.max_connections,
                request_rates: acl::request_rate_periods(&cfg.acl)
                    .into_iter()
                    .map(|period| {
                        kept_rates
                            .iter()
                            .find(|r| r.period() == period)
                            .cloned()
                            .unwrap_or_else(|| Arc::new(RequestRate::new(period)))
                    })
                    .collect(),
                // validate() checked the name.
                client_cert_header: cfg
                    .tls
                    .as_ref()
                    .and_then(|t| t.client_cert_header.as_deref())
                    .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
                error_page_files: cfg.error_pages.clone(),
                error_pages: std::sync::RwLock::new(error_pages),
                compression: cfg.compression.clone(),
                kill,
            }),
            tls,
            limit: Arc::new(Semaphore::new(cfg.max_connections)),
            accepting: Arc::default(),
            max_connections: cfg.max_connections,
            per_source: SourceLimit::new(cfg.max_connections_per_source),
            send_buffer: cfg.send_buffer,
            timeouts: ClientTimeouts {
                http_request: cfg.timeout_http_request,
                keep_alive: cfg.timeout_http_keep_alive,
                client: cfg.timeout_client,
            },
            builder,
            head_limit: cfg.request_header_limit.max(8192),
            accept_proxy: cfg.proxy_peers(),
            own_h1,
            tcp: cfg.mode == crate::model::FrontendMode::Tcp,
            inspect_sni: cfg.mode == crate::model::FrontendMode::Tcp
                && tls_none
                && cfg
                    .acl
                    .iter()
                    .any(|a| matches!(a.matcher.key(), "sni" | "sni_suffix")),
        }
    }
}
