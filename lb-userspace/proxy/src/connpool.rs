//! Keep-alive connections to a pool's servers (HAProxy's connection reuse).
//!
//! An HTTP/1.1 connection carries one request at a time: it is taken for a
//! request and given back to its server's idle list only once the response
//! body has ended cleanly, most recently used first. An HTTP/2 connection is
//! shared by every request to its server. Idle connections close after the
//! pool's `timeout_server_idle`: an HTTP/2 one once it has had no request in
//! flight for that long (counted by `Busy`, as hyper does not say). Pools
//! with `send_proxy` never reuse a connection, since it carries the address
//! of the client whose request opened it.
//!
//! An HTTP/1.1 connection has no task of its own: the task of the request
//! using it drives it (`H1::drive`), from sending the head to the last body
//! byte, as HAProxy runs a whole stream in one place. That saves a task wake-up
//! and a hand-off per step of every request. Idle connections are driven by
//! the sweeper, so a server's close is noticed while they wait. A request
//! that upgrades (WebSocket) moves its connection to a task of its own.
//!
//! This replaces hyper-util's general-purpose client, whose per-request costs
//! (a pool key hashed per request, a task spawned per request to watch the
//! connection become idle) showed up in the proxy's profile.

use std::collections::HashMap;
use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use bytes::BytesMut;
use hyper::body::Incoming;

use super::request_body::RequestBody;
use hyper::client::conn::{TrySendError, http1, http2};
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::time::Instant;
use tokio_util::either::Either;

use super::deadline::Deadline;
use super::upstream::{Connector, ServerIo};

/// How often idle lists are swept for expired or closed connections (or
/// every half idle limit, when that is sooner).
const SWEEP_EVERY: Duration = Duration::from_secs(5);
/// How long a reused HTTP/1.1 connection may take to finish its previous
/// exchange (it usually has already) before a new one is opened instead.
const READY_WAIT: Duration = Duration::from_millis(100);

/// An HTTP/1.1 server connection: hyper's dispatcher and its sending half.
type H1Conn = http1::Connection<TokioIo<ServerIo>, RequestBody>;

/// An HTTP/1.1 connection driven by whoever uses it.
pub(crate) struct H1 {
    sender: http1::SendRequest<RequestBody>,
    /// None once the connection has ended.
    conn: Option<Pin<Box<H1Conn>>>,
    /// `timeout server` of the request in flight, a lazy timer kept with the
    /// connection: moved in the wheel only when a deadline is earlier than the
    /// registered one (a timer per request showed in profiles).
    timer: Deadline,
}

/// The server did not answer within `timeout server`.
#[derive(Debug)]
pub(crate) struct TimedOut;

/// What sending a request gives: the response, the request back if it never
/// left, or a timeout.
pub(crate) type SendResult =
    Result<Result<Response<Incoming>, TrySendError<Request<RequestBody>>>, TimedOut>;

impl H1 {
    /// Lets the connection make progress (read, write, notice a close).
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) {
        if let Some(conn) = &mut self.conn
            && let Poll::Ready(r) = conn.as_mut().poll(cx)
        {
            if let Err(e) = r {
                tracing::debug!(error = %e, "server connection ended");
            }
            self.conn = None;
        }
    }

    /// Drives the connection until it can take a request, or has ended.
    async fn ready(&mut self) -> bool {
        poll_fn(|cx| {
            self.drive(cx);
            if self.conn.is_none() {
                return Poll::Ready(false);
            }
            self.sender.poll_ready(cx).map(|r| r.is_ok())
        })
        .await
    }

    /// Sends `req` and drives the connection until the response head, within `limit`.
    ///
    /// Not an `async fn`: one would keep a copy of `req` beside hyper's for
    /// its whole life, and request futures are moved by value (HTTP/2
    /// streams' tasks), so every copy costs on every request.
    fn send(
        &mut self,
        req: Request<RequestBody>,
        limit: Duration,
    ) -> impl Future<Output = SendResult> + '_ {
        let due = Instant::now() + limit;
        self.timer.arm(due);
        let response = self.sender.try_send_request(req);
        async move {
            let mut response = pin!(response);
            poll_fn(|cx| {
                self.drive(cx);
                if let Poll::Ready(r) = response.as_mut().poll(cx) {
                    return Poll::Ready(Ok(r));
                }
                if self.timer.poll_expired(cx, due) {
                    Poll::Ready(Err(TimedOut))
                } else {
                    Poll::Pending
                }
            })
            .await
        }
    }
}

/// The sending half of a server connection.
pub(crate) enum Sender {
    /// HTTP/1.1 driven by the request's task.
    H1(H1),
    /// HTTP/1.1 driven by a task of its own, with upgrades (WebSocket).
    H1Tunnel(http1::SendRequest<RequestBody>),
    /// HTTP/2: shared, requests multiplexed, driven by its own task.
    H2(H2),
}

/// A server's shared HTTP/2 connection taken for one request, with the
/// number that tells it from a later one to the same server
/// (`ConnPool::retire`), and the request counted in flight on it.
pub(crate) struct H2 {
    sender: http2::SendRequest<RequestBody>,
    id: u64,
    busy: Busy,
}

/// A shared HTTP/2 connection as its pool keeps it.
struct SharedConn {
    sender: http2::SendRequest<RequestBody>,
    id: u64,
    usage: Arc<H2Usage>,
}

impl SharedConn {
    /// The connection for one more request (under the pool's lock, so the
    /// sweeper never sees it idle while a request is taking it).
    fn take(&self) -> H2 {
        H2 {
            sender: self.sender.clone(),
            id: self.id,
            busy: Busy::new(self.usage.clone()),
        }
    }
}

/// Requests in flight on an HTTP/2 connection, and when the last one
/// ended: hyper's `SendRequest` tells neither, and the sweeper closes a
/// connection idle for `timeout_server_idle`. Atomics, not the pool's
/// lock, so a request costs no lock more.
struct H2Usage {
    in_flight: AtomicUsize,
    /// Milliseconds from `opened` to the end of the latest request.
    last_end: AtomicU64,
    opened: Instant,
}

impl H2Usage {
    fn new() -> Arc<Self> {
        Arc::new(H2Usage {
            in_flight: AtomicUsize::new(0),
            last_end: AtomicU64::new(0),
            opened: Instant::now(),
        })
    }

    /// No request in flight, and none ended within `limit`.
    fn idle_for(&self, limit: Duration) -> bool {
        // Acquire: sees the `last_end` of every request counted out.
        if self.in_flight.load(Ordering::Acquire) != 0 {
            return false;
        }
        let last_end = Duration::from_millis(self.last_end.load(Ordering::Relaxed));
        self.opened.elapsed() > last_end.saturating_add(limit)
    }
}

/// A request counted in flight on an HTTP/2 connection until dropped
/// (with the response body, `SharedH2`, or earlier if it failed).
pub(crate) struct Busy(Arc<H2Usage>);

impl Busy {
    fn new(usage: Arc<H2Usage>) -> Self {
        usage.in_flight.fetch_add(1, Ordering::Relaxed);
        Busy(usage)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        let u = &self.0;
        // Before the count falls: a sweeper that sees it at 0 sees this end.
        let end = u.opened.elapsed().as_millis() as u64;
        u.last_end.fetch_max(end, Ordering::Relaxed);
        u.in_flight.fetch_sub(1, Ordering::Release);
    }
}

impl Sender {
    /// Sends `req` and waits for the response head at most `limit` (with a
    /// streamed body's `clock`: `limit` of the server's turns only, not the
    /// client's upload); the request comes back in the error if it never
    /// left. Not an `async fn`, for the reason given at [`H1::send`].
    pub(crate) fn send(
        &mut self,
        req: Request<RequestBody>,
        limit: Duration,
        clock: Option<std::sync::Arc<crate::request_body::BodyClock>>,
    ) -> impl Future<Output = SendResult> + '_ {
        // With a clock, the clock's deadline is the one that counts.
        const FOREVER: Duration = Duration::from_secs(365 * 24 * 3600);
        let sending = self.send_within(req, if clock.is_some() { FOREVER } else { limit });
        async move {
            match clock {
                None => sending.await,
                Some(clock) => tokio::select! {
                    r = sending => r,
                    () = clock.server_silent(limit) => Err(TimedOut),
                },
            }
        }
    }

    /// `send` with a fixed deadline, `limit` from now.
    fn send_within(
        &mut self,
        req: Request<RequestBody>,
        limit: Duration,
    ) -> impl Future<Output = SendResult> + '_ {
        // Not an `async fn` either: one would hold `f` twice.
        #[allow(clippy::manual_async_fn)]
        fn timed<F: Future>(
            f: tokio::time::Timeout<F>,
        ) -> impl Future<Output = Result<F::Output, TimedOut>> {
            async move { f.await.map_err(|_| TimedOut) }
        }
        match self {
            Sender::H1(h) => Either::Left(h.send(req, limit)),
            Sender::H1Tunnel(s) => Either::Right(Either::Left(timed(tokio::time::timeout(
                limit,
                s.try_send_request(req),
            )))),
            Sender::H2(h) => Either::Right(Either::Right(timed(tokio::time::timeout(
                limit,
                h.sender.try_send_request(req),
            )))),
        }
    }

    /// Whether requests on it need an absolute URI (HTTP/2's :scheme and :authority).
    pub(crate) fn is_h2(&self) -> bool {
        matches!(self, Sender::H2(_))
    }

    /// Gives an HTTP/1.1 connection a task of its own that completes upgrades:
    /// the request will switch protocols, and the connection becomes the tunnel's.
    pub(crate) fn for_upgrade(self) -> Sender {
        match self {
            Sender::H1(H1 {
                sender,
                conn: Some(conn),
                ..
            }) => {
                // Unpin, so it can leave its box for `with_upgrades`, which takes it by value.
                let conn = *Pin::into_inner(conn);
                tokio::spawn(async move {
                    if let Err(e) = conn.with_upgrades().await {
                        tracing::debug!(error = %e, "server connection ended");
                    }
                });
                Sender::H1Tunnel(sender)
            }
            other => other,
        }
    }
}

/// A connection taken for one request.
pub(crate) struct Conn {
    /// Where requests go.
    pub sender: Sender,
    /// Time spent opening it; None when it was reused.
    pub connect_time: Option<Duration>,
}

/// A server connection of our own HTTP/1.1 path (proxy/h1.rs): the stream
/// and the bytes read from it but not yet used.
pub(crate) struct RawConn {
    /// The stream.
    pub io: ServerIo,
    /// Read ahead; empty whenever the connection is idle.
    pub buf: BytesMut,
    /// `timeout server` of hyper's path's exchanges on it (`h1::client`),
    /// made at its first one: moved in tokio's wheel only when a deadline
    /// is earlier than the registered one.
    pub timer: Option<Deadline>,
}

impl RawConn {
    /// Whether an idle connection is still usable: the server has not closed
    /// it nor sent anything unasked. Costs no system call while nothing came
    /// (tokio knows the socket is not readable).
    fn alive(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        self.buf.reserve(64);
        matches!(
            tokio_util::io::poll_read_buf(Pin::new(&mut self.io), &mut cx, &mut self.buf),
            Poll::Pending
        )
    }
}

/// A raw connection waiting for its next request.
struct IdleRaw {
    conn: RawConn,
    since: Instant,
}

/// An HTTP/1.1 connection waiting for its next request.
struct Idle {
    h1: H1,
    since: Instant,
}

/// A server's address to what is kept for it: looked up twice per request,
/// where SipHash (std's default) cost some 230 instructions a lookup. The
/// keys are the configured servers', not an attacker's choice.
type ByServer<V> = HashMap<SocketAddr, V, foldhash::fast::FixedState>;

#[derive(Default)]
struct Lists {
    /// HTTP/1.1 connections by server, most recently used last.
    idle: ByServer<Vec<Idle>>,
    /// The same for our own HTTP/1.1 path's connections.
    raw: ByServer<Vec<IdleRaw>>,
    /// The shared HTTP/2 connection of each server.
    shared: ByServer<SharedConn>,
    /// Number of the next HTTP/2 connection opened.
    next_h2: u64,
}

/// One pool's server connections.
pub(crate) struct ConnPool {
    connector: Connector,
    /// HTTP/2 with prior knowledge on plain connections (`h2 = true` without TLS).
    h2_prior_knowledge: bool,
    /// How long an idle connection is kept for a later request; zero keeps
    /// none (`timeout_server_idle = "0s"`, and `send_proxy` pools).
    idle_limit: Duration,
    lists: Mutex<Lists>,
}

impl ConnPool {
    /// A pool of connections opened by `connector`; idle ones are kept for
    /// up to `idle_limit` (none when zero), swept by a background task while
    /// the pool lives.
    pub(crate) fn new(connector: Connector, h2: bool, idle_limit: Duration) -> Arc<Self> {
        let pool = Arc::new(ConnPool {
            h2_prior_knowledge: h2 && !connector.is_tls(),
            connector,
            idle_limit,
            lists: Mutex::new(Lists::default()),
        });
        if pool.reuse()
            && let Ok(rt) = tokio::runtime::Handle::try_current()
        {
            let every = SWEEP_EVERY
                .min(idle_limit / 2)
                .max(Duration::from_millis(1));
            rt.spawn(sweep(Arc::downgrade(&pool), every));
        }
        pool
    }

    /// Whether connections are kept for later requests.
    fn reuse(&self) -> bool {
        !self.idle_limit.is_zero()
    }

    fn lists(&self) -> MutexGuard<'_, Lists> {
        self.lists.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A connection to `server` for a request of `client` that connected to
    /// `local`: an idle or shared one if there is one, else a new one.
    pub(crate) async fn get(
        &self,
        server: SocketAddr,
        client: SocketAddr,
        local: SocketAddr,
    ) -> io::Result<Conn> {
        if self.reuse()
            && let Some(sender) = self.reusable(server).await
        {
            return Ok(Conn {
                sender,
                connect_time: None,
            });
        }
        // Boxed: a new connection is the rare case, and its future would
        // make every request's (moved by value on HTTP/2) four times larger.
        Box::pin(self.open(server, client, local)).await
    }

    /// A new connection to `server`.
    async fn open(
        &self,
        server: SocketAddr,
        client: SocketAddr,
        local: SocketAddr,
    ) -> io::Result<Conn> {
        let start = Instant::now();
        let io = self.connector.connect(server, client, local).await?;
        let h2 = io.alpn_h2() || self.h2_prior_knowledge;
        let io = TokioIo::new(io);
        let sender = if h2 {
            Sender::H2(self.open_h2(server, io).await?)
        } else {
            let (sender, conn) = http1::Builder::new()
                .writev(false)
                .handshake(io)
                .await
                .map_err(io::Error::other)?;
            Sender::H1(H1 {
                sender,
                conn: Some(Box::pin(conn)),
                timer: Deadline::new(),
            })
        };
        Ok(Conn {
            sender,
            connect_time: Some(start.elapsed()),
        })
    }

    /// Opens an HTTP/2 connection on `io` and shares it (when connections
    /// are kept), numbered so that `retire` can tell it from a later one.
    /// No keep-alive PINGs (hyper's `keep_alive_interval`): HAProxy sends
    /// them only with its opt-in `idle-ping`, and servers that police PINGs
    /// (gRPC's, by default) close connections that send them every
    /// `timeout_server` with ENHANCE_YOUR_CALM. A silent connection is found
    /// by the first request that times out on it (`retire`).
    async fn open_h2(&self, server: SocketAddr, io: TokioIo<ServerIo>) -> io::Result<H2> {
        let (sender, conn) = http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .handshake(io)
            .await
            .map_err(io::Error::other)?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(%server, error = %e, "server connection ended");
            }
        });
        let usage = H2Usage::new();
        if !self.reuse() {
            // Not kept: closes once its only request has ended (hyper closes
            // a connection without streams whose senders are all dropped).
            let busy = Busy::new(usage);
            return Ok(H2 {
                sender,
                id: 0,
                busy,
            });
        }
        let mut lists = self.lists();
        lists.next_h2 += 1;
        let shared = SharedConn {
            sender,
            id: lists.next_h2,
            usage,
        };
        let h2 = shared.take();
        lists.shared.insert(server, shared);
        Ok(h2)
    }

    /// Takes `server`'s shared HTTP/2 connection `h2` out of the pool (if
    /// it is still the one shared): a request on it got no answer within
    /// `timeout_server`. The connection may be alive while the server or
    /// the path to it is not, and TCP would take hours to tell; later
    /// requests open a new one. Streams under way on it go on, and it
    /// closes when the last one ends.
    pub(crate) fn retire(&self, server: SocketAddr, h2: &H2) {
        self.retire_id(server, h2.id);
    }

    fn retire_id(&self, server: SocketAddr, id: u64) {
        let mut lists = self.lists();
        if lists.shared.get(&server).is_some_and(|s| s.id == id) {
            lists.shared.remove(&server);
            tracing::debug!(%server, "shared HTTP/2 connection timed out: no longer used");
        }
    }

    /// A new connection of its own, never pooled: a `tcp` session's.
    pub(crate) async fn connect_new(
        &self,
        server: SocketAddr,
        client: SocketAddr,
        local: SocketAddr,
    ) -> io::Result<ServerIo> {
        self.connector.connect(server, client, local).await
    }

    /// A connection for our own HTTP/1.1 path (never HTTP/2): the server's most
    /// recent idle one that still works, else a new one with its connect time.
    pub(crate) async fn get_raw(
        &self,
        server: SocketAddr,
        client: SocketAddr,
        local: SocketAddr,
    ) -> io::Result<(RawConn, Option<Duration>)> {
        if self.reuse() {
            let mut lists = self.lists();
            if let Some(list) = lists.raw.get_mut(&server) {
                while let Some(IdleRaw { mut conn, since }) = list.pop() {
                    if since.elapsed() <= self.idle_limit && conn.alive() {
                        return Ok((conn, None));
                    }
                }
            }
        }
        let start = Instant::now();
        let io = self.connector.connect(server, client, local).await?;
        if io.alpn_h2() {
            return Err(io::Error::other("server chose HTTP/2 for an HTTP/1.1 pool"));
        }
        let conn = RawConn {
            io,
            buf: BytesMut::with_capacity(8192),
            timer: None,
        };
        Ok((conn, Some(start.elapsed())))
    }

    /// Gives back a raw connection whose exchange ended cleanly.
    pub(crate) fn put_raw(&self, server: SocketAddr, conn: RawConn) {
        if !self.reuse() || !conn.buf.is_empty() {
            return;
        }
        self.lists().raw.entry(server).or_default().push(IdleRaw {
            conn,
            since: Instant::now(),
        });
    }

    /// The server's shared HTTP/2 connection, or its most recent idle HTTP/1.1 one that still works.
    async fn reusable(&self, server: SocketAddr) -> Option<Sender> {
        loop {
            let idle = {
                let mut lists = self.lists();
                if let Some(s) = lists.shared.get(&server) {
                    if !s.sender.is_closed() {
                        return Some(Sender::H2(s.take()));
                    }
                    lists.shared.remove(&server);
                }
                lists.idle.get_mut(&server)?.pop()?
            };
            let Idle { mut h1, since } = idle;
            if since.elapsed() > self.idle_limit {
                continue;
            }
            if matches!(tokio::time::timeout(READY_WAIT, h1.ready()).await, Ok(true)) {
                return Some(Sender::H1(h1));
            }
        }
    }

    /// Gives back an HTTP/1.1 connection whose response ended cleanly.
    pub(crate) fn put(&self, server: SocketAddr, h1: H1) {
        if !self.reuse() || h1.conn.is_none() || h1.sender.is_closed() {
            return;
        }
        self.lists().idle.entry(server).or_default().push(Idle {
            h1,
            since: Instant::now(),
        });
    }

    /// Idle HTTP/1.1 connections kept for `server`.
    pub(crate) fn idle_count(&self, server: SocketAddr) -> usize {
        let lists = self.lists();
        // The shared HTTP/2 connection counts while no request is in flight.
        let h2 = lists
            .shared
            .get(&server)
            .is_some_and(|c| c.usage.in_flight.load(Ordering::Acquire) == 0);
        lists.idle.get(&server).map_or(0, Vec::len)
            + lists.raw.get(&server).map_or(0, Vec::len)
            + usize::from(h2)
    }

    /// Closes the kept connections to servers not in `servers` (they left
    /// the pool); a shared HTTP/2 one once its streams under way have ended.
    pub(crate) fn keep_only(&self, servers: &[SocketAddr]) {
        let gone = {
            let mut lists = self.lists();
            let Lists {
                idle, raw, shared, ..
            } = &mut *lists;
            let kept = |addr: &SocketAddr| servers.contains(addr);
            (
                idle.extract_if(|a, _| !kept(a)).count(),
                raw.extract_if(|a, _| !kept(a)).count(),
                shared.extract_if(|a, _| !kept(a)).count(),
            )
        };
        if gone != (0, 0, 0) {
            tracing::debug!(
                ?gone,
                "closed kept connections to servers that left the pool"
            );
        }
    }

    /// Drives idle connections once (a server's close is read and the
    /// connection ends) and drops ended and expired ones, which closes them.
    fn sweep_once(&self) {
        let limit = self.idle_limit;
        let mut cx = Context::from_waker(Waker::noop());
        let mut lists = self.lists();
        for list in lists.idle.values_mut() {
            list.retain_mut(|i| {
                i.h1.drive(&mut cx);
                i.h1.conn.is_some() && i.since.elapsed() <= limit
            });
        }
        lists.idle.retain(|_, l| !l.is_empty());
        for list in lists.raw.values_mut() {
            list.retain_mut(|i| i.since.elapsed() <= limit && i.conn.alive());
        }
        lists.raw.retain(|_, l| !l.is_empty());
        // Dropping the pool's sender closes the connection once its last
        // stream has ended (requests under way hold senders of their own).
        lists
            .shared
            .retain(|_, s| !s.sender.is_closed() && !s.usage.idle_for(limit));
    }
}

/// Sweeps `pool` `every` so often until it is dropped.
async fn sweep(pool: Weak<ConnPool>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match pool.upgrade() {
            Some(p) => p.sweep_once(),
            None => return,
        }
    }
}

/// An HTTP/1.1 connection carrying a response body: driven while the body is
/// read, given back to its pool when the body has ended cleanly.
pub(crate) struct Reusable {
    /// The pool it came from.
    pub pool: Arc<ConnPool>,
    /// Its server.
    pub server: SocketAddr,
    /// The connection.
    pub h1: H1,
}

impl Reusable {
    /// Lets the connection read more of the body.
    pub(crate) fn drive(&mut self, cx: &mut Context<'_>) {
        self.h1.drive(cx);
    }

    /// Puts the connection back in its pool's idle list.
    pub(crate) fn give_back(self) {
        self.pool.put(self.server, self.h1);
    }
}

/// A shared HTTP/2 connection carrying a response body, to be taken out of
/// its pool if the body stops coming for `timeout_server`; the request
/// counts as in flight on it until this is dropped. Only its number is
/// kept, not a sending half, which would keep the connection open.
pub(crate) struct SharedH2 {
    pool: Arc<ConnPool>,
    server: SocketAddr,
    id: u64,
    _busy: Busy,
}

impl SharedH2 {
    /// Connection `h2` of `pool` to `server`.
    pub(crate) fn new(pool: Arc<ConnPool>, server: SocketAddr, h2: H2) -> Self {
        SharedH2 {
            pool,
            server,
            id: h2.id,
            _busy: h2.busy,
        }
    }

    /// See `ConnPool::retire`.
    pub(crate) fn retire(self) {
        self.pool.retire_id(self.server, self.id);
    }
}
