//! Frontends: listeners, the accept loop with its connection limit, TLS
//! handshakes, HTTP/1.1 + HTTP/2 serving, and client-side timeouts.

use std::future::{Future, poll_fn};
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, TryAcquireError, watch};

use super::accept::{ClientStream, Listener};
use super::accept_errors::AcceptErrors;
use super::context::{Activity, ClientTimeouts, ConnCtx, FrontendRuntime, Shared};
use super::deadline::{Deadline, WaitLimit};
use super::error::{Failure, timeout_408};
use super::forward;
use super::h1;
use super::hardening::GuardIo;
use super::log::{AccessRecord, LogFormat};
use super::proxy_protocol;
use super::shutdown::ShutdownWatch;
use super::source_limit::SourceSlot;
use super::tcp;
use super::tls::{TlsFacts, TlsTerminator};

/// A permit an accept loop holds with no client yet, counted while it lives.
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Accepts connections until `shutdown`'s sender is dropped.
pub(crate) async fn accept_loop(
    listener: Listener,
    fe: Arc<FrontendRuntime>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<()>,
) {
    // A listener bound to one address knows every connection's local address;
    // only a wildcard one needs getsockname per connection.
    let bound = listener
        .local_addr()
        .ok()
        .filter(|a| !a.ip().is_unspecified());
    let handed = shutdown.clone();
    let probe = shutdown.clone();
    let changed = pin!(shutdown.changed());
    let mut shutdown = ShutdownWatch::new(probe, changed);
    let mut errors = AcceptErrors::new(format!("frontend {}", fe.ctx.name));
    loop {
        // Wait for a free slot before accepting, so excess clients queue in the backlog.
        let Some(permit) = free_permit(&fe, &mut shutdown).await else {
            return;
        };
        // Counted out of the connections open until a client takes it.
        let waiting = Waiting::new(&fe.accepting);
        let accepted = poll_fn(|cx| match listener.poll_accept(cx) {
            Poll::Ready(r) => Poll::Ready(Some(r)),
            Poll::Pending if shutdown.poll_come(cx) => Poll::Ready(None),
            Poll::Pending => Poll::Pending,
        })
        .await;
        let (stream, peer) = match accepted {
            None => return,
            Some(Ok(x)) => x,
            Some(Err(e)) => {
                errors.pause(&e).await;
                continue;
            }
        };
        drop(waiting);
        // Closed unread: HAProxy's `tcp-request connection reject`, on the
        // TCP peer (a PROXY header's client is looked at again once read).
        // Its permit goes back as the loop takes the next one.
        if rejected(&fe, peer) {
            drop(stream);
            continue;
        }
        let Ok(source) = count_source(&fe, peer) else {
            drop(stream);
            continue;
        };
        if fe.send_buffer != 0
            && let Err(e) = stream.set_send_buffer(fe.send_buffer)
        {
            tracing::debug!(frontend = %fe.ctx.name, %peer, "send_buffer not set: {e}");
        }
        let slot = Slot {
            _source: source,
            _permit: permit,
        };
        fe.ctx.stats.connection();
        let open = (fe.max_connections)
            .saturating_sub(fe.limit.available_permits())
            .saturating_sub(fe.accepting.load(std::sync::atomic::Ordering::Relaxed));
        fe.ctx.stats.observe_current(open as u64);
        let (fe, shared, shutdown) = (fe.clone(), shared.clone(), handed.clone());
        // Boxed: tokio moves a spawned future several times before it runs;
        // a pointer is cheaper to move than the connection's state. Spawned
        // as it is (no wrapping block, which would keep a second copy of
        // its arguments for as long as the connection lives).
        let at = (peer, bound);
        if fe.tls.is_none() && fe.own_h1 && !fe.expects_proxy(peer.ip()) {
            tokio::spawn(Box::pin(serve_plain(
                stream, at, fe, shared, shutdown, slot,
            )));
        } else {
            tokio::spawn(Box::pin(serve_connection(
                stream, at, fe, shared, shutdown, slot,
            )));
        }
    }
}

/// A permit of the frontend's `max_connections`, once one is free; `None`
/// when the shutdown comes first.
async fn free_permit(
    fe: &FrontendRuntime,
    shutdown: &mut ShutdownWatch<'_>,
) -> Option<OwnedSemaphorePermit> {
    match fe.limit.clone().try_acquire_owned() {
        Ok(p) => Some(p),
        Err(TryAcquireError::Closed) => None,
        Err(TryAcquireError::NoPermits) => {
            let mut wait = pin!(fe.limit.clone().acquire_owned());
            poll_fn(|cx| match wait.as_mut().poll(cx) {
                Poll::Ready(p) => Poll::Ready(p.ok()),
                Poll::Pending if shutdown.poll_come(cx) => Poll::Ready(None),
                Poll::Pending => Poll::Pending,
            })
            .await
        }
    }
}

/// What a served connection holds until it closes: its slot of the
/// frontend's `max_connections`, and its source's count if the frontend
/// has `max_connections_per_source`.
struct Slot {
    // Dropped in this order: once a connection no longer shows in the
    // frontend's current ones, its source's count is down too.
    _source: Option<SourceSlot>,
    _permit: OwnedSemaphorePermit,
}

/// Whether a `reject` rule closes the connection from `peer` (counted as
/// denied; debug only in the log, so a flood does not flood it).
fn rejected(fe: &FrontendRuntime, peer: SocketAddr) -> bool {
    let reject = fe
        .ctx
        .actions
        .as_ref()
        .is_some_and(|a| a.rejects(peer.ip()));
    if reject {
        fe.ctx.stats.denied_connection();
        tracing::debug!(frontend = %fe.ctx.name, %peer, "rejected: connection closed");
    }
    reject
}

/// Counts a connection from `peer` against its source's limit, if the
/// frontend has one (no lock without). `Err` when the source is at it: the
/// connection is to be closed, and is counted as denied.
fn count_source(fe: &FrontendRuntime, peer: SocketAddr) -> Result<Option<SourceSlot>, ()> {
    let Some(limit) = &fe.per_source else {
        return Ok(None);
    };
    match limit.open(peer.ip()) {
        Some(slot) => Ok(Some(slot)),
        None => {
            fe.ctx.stats.denied_connection();
            // Debug only: a flood from one source must not flood the log
            // (lb_frontend_denied_connections_total counts them).
            tracing::debug!(frontend = %fe.ctx.name, %peer, "max_connections_per_source reached: connection closed");
            Err(())
        }
    }
}

/// Serves a connection of a plain frontend on our HTTP/1 path (no TLS,
/// HTTP/1.1 pools; `serve_connection` reads a PROXY header first), in one
/// allocation for an idle keep-alive connection: the client is made before
/// the future and captured by it (an async fn would keep its arguments
/// twice), and `h1::serve`'s future is inline.
fn serve_plain(
    stream: ClientStream,
    (peer, bound): (SocketAddr, Option<SocketAddr>),
    fe: Arc<FrontendRuntime>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<()>,
    slot: Slot,
) -> impl Future<Output = ()> + Send {
    let local = match bound {
        Some(a) => a,
        None => stream.local_addr().unwrap_or(peer),
    };
    let mut client = h1::Client::new(stream, (peer, local), None, fe, shared);
    async move {
        let mut sd = shutdown.clone();
        if h1::serve(&mut client, true, &mut sd).await {
            // HTTP/2 prior knowledge: hyper serves it, from the bytes already read.
            let (io, fe, shared) = client.into_h2();
            let addrs = (peer, local);
            Box::pin(serve_io(io, addrs, None, Some(true), fe, shared, shutdown)).await
        }
        // The connection's slot is free once it is served.
        drop(slot);
    }
}

/// Serves one accepted connection; `bound` is the listener's address unless
/// it is a wildcard. The connection's slot is freed at the end.
async fn serve_connection(
    mut stream: ClientStream,
    (mut peer, bound): (SocketAddr, Option<SocketAddr>),
    fe: Arc<FrontendRuntime>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<()>,
    slot: Slot,
) {
    let mut local = match bound {
        Some(a) => a,
        None => stream.local_addr().unwrap_or(peer),
    };
    if fe.expects_proxy(peer.ip()) {
        // PROXY protocol (proxy/proxy_protocol.rs): the claimed client replaces the peer.
        // Boxed, as the handshake below: a future's state is as big as its
        // biggest await, and this task lives as long as the connection.
        let header = Box::pin(proxy_protocol::read_header(&mut stream));
        match tokio::time::timeout(fe.timeouts.http_request, header).await {
            Ok(Ok(Some((src, dst)))) => (peer, local) = (src, dst),
            Ok(Ok(None)) => {}
            Ok(Err(e)) => {
                tracing::debug!(frontend = %fe.ctx.name, %peer, error = %e, "bad PROXY header");
                return;
            }
            Err(_) => {
                tracing::debug!(frontend = %fe.ctx.name, %peer, "PROXY header timed out");
                return;
            }
        }
        // The source the header names is looked at too: `reject` keeps out
        // the peer (above) and the client it speaks for.
        if rejected(&fe, peer) {
            return;
        }
    }
    if fe.tcp {
        // Boxed, as below: the relay's state lives as long as the session.
        return Box::pin(tcp::serve(stream, (peer, local), &fe, &shared)).await;
    }
    match &fe.tls {
        None if fe.own_h1 => {
            // After a PROXY header (plain connections without one start
            // there directly). Boxed, as every big future below: the task's
            // own future stays small, and tokio moves it a few times when
            // spawning (copying kilobytes per connection showed in profiles).
            let at = (peer, Some(local));
            Box::pin(serve_plain(stream, at, fe.clone(), shared, shutdown, slot)).await
        }
        None => {
            let addrs = (peer, local);
            Box::pin(serve_io(
                stream,
                addrs,
                None,
                None,
                fe.clone(),
                shared,
                shutdown,
            ))
            .await
        }
        Some(terminator) => {
            // A function of its own, boxed: the TLS stream (kilobytes, held
            // across awaits) would otherwise make every connection's future
            // as big, plain ones too (2.9 KiB instead of under 0.5).
            Box::pin(serve_tls(
                terminator,
                stream,
                (peer, local),
                fe.clone(),
                shared,
                shutdown,
            ))
            .await
        }
    }
}

/// Completes the TLS handshake (within `timeout http-request`), then serves
/// the connection on our HTTP/1 path or hyper's, as ALPN chose.
async fn serve_tls(
    terminator: &TlsTerminator,
    stream: ClientStream,
    (peer, local): (SocketAddr, SocketAddr),
    fe: Arc<FrontendRuntime>,
    shared: Arc<Shared>,
    shutdown: watch::Receiver<()>,
) {
    let limit = fe.timeouts.http_request;
    let cert_value = fe.ctx.client_cert_header.is_some();
    let who = (&*fe.ctx.name, peer);
    let Some((tls, facts)) = terminator.handshake(stream, limit, cert_value, who).await else {
        return;
    };
    let facts = Some(Box::new(facts));
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    if fe.own_h1 && !h2 {
        let mut sd = shutdown.clone();
        // ALPN said HTTP/1.1 (or nothing): no preface to look for. The
        // client (its TLS stream: kilobytes) lives in this future, which
        // `serve_connection` boxed.
        let mut client = h1::Client::new(tls, (peer, local), facts, fe, shared);
        h1::serve(&mut client, false, &mut sd).await;
        return;
    }
    let addrs = (peer, local);
    Box::pin(serve_io(tls, addrs, facts, Some(h2), fe, shared, shutdown)).await
}

async fn serve_io<T>(
    io: T,
    (peer, local): (SocketAddr, SocketAddr),
    tls: Option<Box<TlsFacts>>,
    h2: Option<bool>,
    fe: Arc<FrontendRuntime>,
    shared: Arc<Shared>,
    mut shutdown: watch::Receiver<()>,
) where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity::default());
    let seen = activity.clone();
    let conn = Arc::new(ConnCtx {
        frontend: fe.ctx.clone(),
        peer,
        local,
        tls,
        activity: activity.clone(),
        ready_since: Mutex::new(Instant::now()),
    });
    let io = ClientIo::new(
        io,
        activity.clone(),
        fe.timeouts,
        h2,
        peer,
        fe.ctx.name.clone(),
        fe.ctx.log_format,
    );
    // Request smuggling checks sit above ClientIo, which must see the raw bytes for its timeouts.
    let io = GuardIo::new(io, activity, fe.head_limit, h2, peer, fe.ctx.name.clone())
        .log_format(fe.ctx.log_format);
    // Boxed: hyper moves an HTTP/2 stream's future several times (its task,
    // then its state change when the answer is ready); a ~5 KiB future
    // moved by value cost a tenth of the proxy's CPU under h2load.
    let service =
        service_fn(move |req| Box::pin(forward::handle(shared.clone(), conn.clone(), req)));
    // In a block: hyper's connection (which holds a 101's pending upgrade
    // until dropped) must be gone before the wait for its tunnel below.
    let result = {
        // With upgrades: HTTP/1.1 Upgrade requests become tunnels (proxy/tunnel.rs).
        let served = fe
            .builder
            .serve_connection_with_upgrades(TokioIo::new(io), service);
        tokio::pin!(served);
        let probe = shutdown.clone();
        let changed = pin!(shutdown.changed());
        let mut shutdown = ShutdownWatch::new(probe, changed);
        let first = std::future::poll_fn(|cx| {
            if let Poll::Ready(r) = served.as_mut().poll(cx) {
                return Poll::Ready(Some(r));
            }
            if shutdown.poll_come(cx) {
                return Poll::Ready(None);
            }
            Poll::Pending
        })
        .await;
        match first {
            Some(r) => r,
            None => match first_request(served.as_mut(), &seen, fe.timeouts.http_request).await {
                Some(r) => r,
                None => {
                    served.as_mut().graceful_shutdown();
                    served.await
                }
            },
        }
    };
    if let Err(e) = result {
        tracing::debug!(frontend = %fe.ctx.name, %peer, error = %e, "client connection ended with an error");
    }
    if seen.upgraded.load(Ordering::SeqCst) {
        // hyper handed the stream to the tunnel's task (proxy/tunnel.rs): the
        // connection is open until it ends, and keeps its slot (the caller's
        // `Slot`) and its place in current_connections, as on our path.
        seen.tunnel_ended.notified().await;
    }
}

/// After a shutdown (a reload), before hyper's graceful one: a connection
/// that has not dispatched a request yet gets its first one served, as on
/// our HTTP/1 path (`h1::serve`). Its client has sent it or is about to and
/// could not tell a close from a failure, and hyper closes an HTTP/2
/// connection still in its handshake outright (a reset, when the client's
/// bytes are unread). Serves `served` until a request is dispatched or
/// `grace` (`timeout http-request`) has passed: `Some` if it ended first.
async fn first_request<F: Future>(
    mut served: Pin<&mut F>,
    seen: &Activity,
    grace: Duration,
) -> Option<F::Output> {
    let dispatched = || seen.dispatched.load(Ordering::Relaxed) > 0;
    if dispatched() {
        return None;
    }
    let mut until = pin!(tokio::time::sleep(grace));
    std::future::poll_fn(|cx| {
        if let Poll::Ready(r) = served.as_mut().poll(cx) {
            return Poll::Ready(Some(r));
        }
        if dispatched() || until.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        Poll::Pending
    })
    .await
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the first byte of a request.
    Idle,
    /// Part of an HTTP/1 request head received.
    Head,
}

/// Client stream that enforces the request-head and idle timeouts:
/// a stalled HTTP/1 head gets a 408 written here (hyper would close silently),
/// an idle connection is closed as if the client had.
struct ClientIo<T> {
    inner: T,
    activity: Arc<Activity>,
    timeouts: ClientTimeouts,
    /// None until the first bytes tell HTTP/2's preface from HTTP/1.
    h2: Option<bool>,
    /// `dispatched` count when the current head started, if one has.
    head_started: Option<u64>,
    armed: Option<Phase>,
    /// When the armed phase times out.
    due: tokio::time::Instant,
    /// Registered timer; may be set earlier than `due`, never later.
    deadline: Deadline,
    /// Bytes of the 408 answer already written, while answering.
    answering: Option<usize>,
    /// `timeout_client` on each write that cannot go on (the client reads nothing).
    write_wait: WaitLimit,
    /// `timeout_client` on answers that wait for room (`Activity::stalled`),
    /// and the `Activity::moved` count it was armed at.
    body_wait: (WaitLimit, u64),
    peer: SocketAddr,
    frontend: Arc<str>,
    log_format: LogFormat,
}

impl<T> ClientIo<T> {
    fn new(
        inner: T,
        activity: Arc<Activity>,
        timeouts: ClientTimeouts,
        h2: Option<bool>,
        peer: SocketAddr,
        frontend: Arc<str>,
        log_format: LogFormat,
    ) -> Self {
        ClientIo {
            inner,
            activity,
            timeouts,
            h2,
            head_started: None,
            armed: None,
            due: tokio::time::Instant::now(),
            deadline: Deadline::new(),
            answering: None,
            write_wait: WaitLimit::new(timeouts.client),
            body_wait: (WaitLimit::new(timeouts.client), 0),
            peer,
            frontend,
            log_format,
        }
    }

    /// Whether an answer has waited `timeout_client` for the client to take
    /// more of it: written data that would not go out is caught by the
    /// writes, but HTTP/2 flow control stops hyper before it writes. Called
    /// while the connection waits to read with requests in flight.
    fn poll_answers_stalled(&mut self, cx: &mut Context<'_>) -> bool {
        let (wait, at) = &mut self.body_wait;
        if self.activity.stalled.load(Ordering::SeqCst) == 0 {
            wait.progress();
            return false;
        }
        let moved = self.activity.moved.load(Ordering::SeqCst);
        if moved != *at {
            *at = moved;
            wait.progress();
        }
        wait.poll_expired(cx)
    }

    /// Bytes that went out are progress for the answers waiting for room
    /// too: a client reading slowly is not one that stopped. Not on HTTP/2,
    /// where bytes may be PING or SETTINGS acknowledgements a client gets
    /// while it gives no window: there an answer's progress is its body
    /// asked for more (`Activity::moved`).
    fn wrote(&mut self, r: &Poll<io::Result<usize>>) {
        if self.h2 != Some(true) && matches!(r, Poll::Ready(Ok(n)) if *n > 0) {
            self.body_wait.0.progress();
        }
    }

    /// A write's result, failed once it has waited `timeout_client`.
    fn watch_write<R>(
        &mut self,
        cx: &mut Context<'_>,
        r: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if self.activity.spliced.load(Ordering::SeqCst) {
            // A tunnel: timeout_tunnel limits it (proxy/tunnel.rs).
            return r;
        }
        match r {
            Poll::Pending if self.write_wait.poll_expired(cx) => {
                Poll::Ready(Err(client_timed_out(&self.activity)))
            }
            Poll::Pending => Poll::Pending,
            r => {
                self.write_wait.progress();
                r
            }
        }
    }

    fn log_408(&self) {
        AccessRecord::bad_request(
            self.peer,
            self.frontend.clone(),
            Failure::HeadTimeout,
            timeout_408().len() as u64,
        )
        .emit_as(self.log_format);
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> ClientIo<T> {
    /// Writes the 408 answer, then reports end of stream to hyper.
    /// (Within `timeout_client`, as every write.)
    fn poll_answer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while let Some(done) = self.answering {
            if done < timeout_408().len() {
                let r = Pin::new(&mut self.inner).poll_write(cx, &timeout_408()[done..]);
                let n = ready!(self.watch_write(cx, r))?;
                if n == 0 {
                    return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                }
                self.answering = Some(done + n);
            } else {
                let r = Pin::new(&mut self.inner).poll_flush(cx);
                ready!(self.watch_write(cx, r))?;
                let _ = Pin::new(&mut self.inner).poll_shutdown(cx);
                return Poll::Ready(Ok(()));
            }
        }
        Poll::Ready(Ok(()))
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin> AsyncRead for ClientIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.answering.is_some() {
            return this.poll_answer(cx);
        }
        if this.activity.upgraded.load(Ordering::SeqCst) {
            // A tunnel now, with its own idle limit (timeout_tunnel).
            return Pin::new(&mut this.inner).poll_read(cx, buf);
        }
        let before = buf.filled().len();
        let dispatched = this.activity.dispatched.load(Ordering::SeqCst);
        if this.head_started.is_some_and(|d| d != dispatched) {
            // The head that started was parsed and dispatched since.
            this.head_started = None;
            this.armed = None;
        }
        match Pin::new(&mut this.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = &buf.filled()[before..];
                if !got.is_empty() {
                    if this.h2.is_none() {
                        let preface = b"PRI * HTTP/2.0";
                        let n = got.len().min(preface.len());
                        this.h2 = Some(got[..n] == preface[..n]);
                    }
                    if this.h2 == Some(false)
                        && this.head_started.is_none()
                        && this.activity.active.load(Ordering::SeqCst) == 0
                    {
                        this.head_started = Some(dispatched);
                    }
                    // Bytes end an HTTP/1 idle wait, but a head's limit
                    // counts from its start, and an HTTP/2 connection's idle
                    // one from the end of its last stream (as HAProxy's):
                    // bytes sent one by one, or frames that are no request
                    // (PING), do not move them.
                    if this.armed != Some(Phase::Head) && this.h2 != Some(true) {
                        this.armed = None;
                    }
                }
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => {
                if this.activity.active.load(Ordering::SeqCst) > 0 {
                    if this.poll_answers_stalled(cx) {
                        return Poll::Ready(Err(client_timed_out(&this.activity)));
                    }
                    // A request is being served: other timeouts belong to the server side.
                    this.armed = None;
                    if let Ok(mut w) = this.activity.idle_waker.lock() {
                        *w = Some(cx.waker().clone());
                    }
                    // Re-check: the request may have ended before the waker was stored.
                    if this.activity.active.load(Ordering::SeqCst) > 0 {
                        return Poll::Pending;
                    }
                    cx.waker().wake_by_ref();
                    return Poll::Pending;
                }
                let phase = if this.head_started.is_some() {
                    Phase::Head
                } else {
                    Phase::Idle
                };
                if this.armed != Some(phase) {
                    let limit = match (phase, this.h2) {
                        (Phase::Head, _) => this.timeouts.http_request,
                        (Phase::Idle, Some(true)) => this.timeouts.client,
                        (Phase::Idle, _) if dispatched == 0 => this.timeouts.http_request,
                        (Phase::Idle, _) => this.timeouts.keep_alive,
                    };
                    this.due = tokio::time::Instant::now() + limit;
                    // Lazy timer: the registered one is moved only when the new
                    // deadline is earlier; a later one is caught when it fires.
                    // Keep-alive requests re-arm on every request, and moving a
                    // timer in the wheel each time showed in profiles.
                    this.deadline.arm(this.due);
                    this.armed = Some(phase);
                }
                if !this.deadline.poll_expired(cx, this.due) {
                    return Poll::Pending;
                }
                match phase {
                    Phase::Head => {
                        this.log_408();
                        this.answering = Some(0);
                        this.poll_answer(cx)
                    }
                    // End of stream: hyper closes an idle connection quietly.
                    Phase::Idle => Poll::Ready(Ok(())),
                }
            }
        }
    }
}

/// The error that ends a connection for `timeout_client`, noted in `activity`.
fn client_timed_out(activity: &Activity) -> io::Error {
    activity.client_timed_out.store(true, Ordering::SeqCst);
    io::Error::new(
        io::ErrorKind::TimedOut,
        "timeout client: the client takes no more of the answer",
    )
}

// Writes go to the client untouched, each limited by `timeout_client`.
impl<T: AsyncRead + AsyncWrite + Unpin> AsyncWrite for ClientIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.wrote(&r);
        self.watch_write(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.wrote(&r);
        self.watch_write(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.watch_write(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch_write(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use tokio::sync::Semaphore;

    use super::*;
    use crate::model::Frontend;

    /// What a served connection starts from: an accepted socket (with its
    /// client, kept open), its peer, a frontend and an empty `Shared`.
    fn connection_parts() -> (
        std::net::TcpStream,
        ClientStream,
        SocketAddr,
        FrontendRuntime,
        Shared,
    ) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (stream, peer) = l.accept().unwrap();
        let fe = Frontend::new("f", Vec::new(), "p");
        let fe = FrontendRuntime::new(&fe, 0, 0, None, crate::context::Loaded::default(), true);
        let shared = Shared {
            pools: Vec::new(),
            route: None,
        };
        (client, ClientStream::new(stream), peer, fe, shared)
    }

    /// A connection's slot, with a source's count (the bigger case).
    fn slot() -> Slot {
        let limit = crate::source_limit::SourceLimit::new(1).unwrap();
        Slot {
            _source: limit.open("192.0.2.1".parse().unwrap()),
            _permit: Arc::new(Semaphore::new(1)).try_acquire_owned().unwrap(),
        }
    }

    #[test]
    fn a_connection_task_future_stays_small() {
        // Every connection's task holds this future; its big parts are boxed
        // (it was 2.9 KiB when the TLS path's stream was part of it).
        let (_client, stream, peer, fe, shared) = connection_parts();
        let (_tx, rx) = watch::channel(());
        let slot = slot();
        let (fe, shared) = (Arc::new(fe), Arc::new(shared));
        let fut = serve_connection(stream, (peer, Some(peer)), fe, shared, rx, slot);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 1024, "a connection's future is {size} bytes");
    }

    #[tokio::test]
    async fn a_plain_http1_connection_is_one_small_future() {
        // The whole state of a plain HTTP/1 connection's task, kept while it
        // idles; the rare answers (400, 408, lingering) are boxed apart. It
        // was 520 + 816 bytes (release) in two boxes when `h1::serve` took
        // the stream by value and kept it twice.
        let (_client, stream, peer, fe, shared) = connection_parts();
        let (_tx, rx) = watch::channel(());
        let slot = slot();
        let (fe, shared) = (Arc::new(fe), Arc::new(shared));
        let fut = serve_plain(stream, (peer, Some(peer)), fe, shared, rx, slot);
        let size = std::mem::size_of_val(&fut);
        assert!(size <= 900, "an HTTP/1 connection's future is {size} bytes");
    }
}
