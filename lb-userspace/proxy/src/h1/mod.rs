//! Our own HTTP/1.1 path: serves an HTTP/1 client connection and forwards
//! its requests over plain HTTP/1.1 server connections, without hyper.
//!
//! hyper's path runs two HTTP/1 state machines per request (its server for
//! the client, its client for the server) and moves heads and bodies through
//! `Request`/`Response`/`Body` values; that was about two thirds of the
//! user-space instructions of a proxied keep-alive request. Here each head is
//! parsed once off the connection's buffer (with the request-smuggling checks
//! of `hardening`), actions and routing run on the same `http` types as on
//! hyper's path (`prepare::prepare`), the head is written out again for the
//! next hop, and the body follows byte for byte by its framing. A whole
//! exchange runs in the client connection's task.
//!
//! Used for HTTP/1 clients of frontends whose pools all speak HTTP/1.1 to
//! their servers (`FrontendRuntime::own_h1`). HTTP/2 clients (ALPN `h2`, or
//! the h2c preface, handed over with the bytes already read) and frontends
//! that can reach an `h2` pool are served by hyper (`server::serve_io`).
//!
//! Differences from hyper's path: a request body is sent whole before the
//! response is read; `timeout_server` applies to every wait on the server,
//! body included, and `timeout_client` to every wait on the client once a
//! request is in, as in HAProxy.

pub(crate) mod client;
mod codec;
pub(crate) mod fetch;
mod relay;

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderValue};
use http::{StatusCode, Version};
use http_body_util::{BodyExt, Full};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;

use super::accept::HoldForFin;
use super::actions;
use super::balance::Active;
use super::connpool::RawConn;
use super::context::{FrontendRuntime, PoolRuntime, Shared};
use super::deadline::Deadline;
use super::error::{Failure, Phase, timeout_408};
use super::hardening::H2_PREFACE;
use super::log::AccessRecord;
use super::prepare::{self, Attempts, ClientSide, Forwarding, Prepared};
use super::shutdown::ShutdownWatch;
use super::tls::TlsFacts;
use super::tunnel;
use codec::{BodyKind, RequestHead, ResponseHead, Span};
use relay::{End, Fail, Message, READ_SIZE, read_more, relay, write_out};

/// How long, and how many bytes, a closing connection is read and dropped.
const LINGER: Duration = Duration::from_millis(500);
const LINGER_BYTES: usize = 256 * 1024;

/// Buffers of idle connections, kept per thread for the next connection that
/// has something to read (allocating and freeing 2 × 16 KiB per keep-alive
/// request cost 5 % of its instructions).
mod spare {
    use std::cell::RefCell;

    use bytes::BytesMut;

    use super::READ_SIZE;
    use super::codec::Span;

    /// Spare buffer sets kept at most per thread.
    const KEEP: usize = 256;

    /// A connection's buffers: bytes read, output, and the header spans of
    /// the head being parsed.
    pub(super) type Buffers = (BytesMut, Vec<u8>, Vec<Span>);

    thread_local! {
        static SPARE: RefCell<Vec<Buffers>> = const { RefCell::new(Vec::new()) };
    }

    /// A read buffer, an output buffer and a span list, empty, with room for a read.
    pub(super) fn take() -> Buffers {
        let mut set = SPARE
            .with(|s| s.borrow_mut().pop())
            .unwrap_or_else(|| (BytesMut::new(), Vec::new(), Vec::new()));
        // Also reclaims the room of a read buffer whose old heads are gone.
        set.0.reserve(READ_SIZE);
        set
    }

    /// Keeps empty buffers for `take`.
    pub(super) fn give((rbuf, mut out, mut spans): Buffers) {
        if !rbuf.is_empty() || rbuf.capacity() == 0 {
            return;
        }
        out.clear();
        spans.clear();
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP {
                s.push((rbuf, out, spans));
            }
        });
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn idle_buffers_are_reused_and_busy_ones_kept() {
            let (rbuf, out, spans) = take();
            assert!(rbuf.capacity() >= READ_SIZE && rbuf.is_empty());
            let at = rbuf.as_ptr();
            give((rbuf, out, spans));
            let (again, out, spans) = take();
            assert_eq!(again.as_ptr(), at, "the same buffer comes back");
            // A buffer still holding a client's bytes is not anybody's spare.
            let spares = || SPARE.with(|s| s.borrow().len());
            let before = spares();
            let mut busy = again;
            busy.extend_from_slice(b"GET");
            give((busy, out, spans));
            assert_eq!(spares(), before);
        }
    }
}

/// A stream whose first reads return bytes read from it before its protocol
/// was known (the HTTP/2 preface, handed to hyper).
pub(crate) struct Prefixed<T> {
    prefix: Bytes,
    inner: T,
}

impl<T: AsyncRead + Unpin> AsyncRead for Prefixed<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if self.prefix.is_empty() {
            return Pin::new(&mut self.inner).poll_read(cx, buf);
        }
        let n = self.prefix.len().min(buf.remaining());
        buf.put_slice(&self.prefix[..n]);
        self.prefix.advance(n);
        if self.prefix.is_empty() {
            // Its memory goes now, not with the connection.
            self.prefix = Bytes::new();
        }
        Poll::Ready(Ok(()))
    }
}

write_through!(Prefixed<T>);

/// What comes after an exchange.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    KeepAlive,
    Close,
}

/// What waiting for a request head gave.
enum Wait {
    Head(Box<RequestHead>),
    /// The connection ends (closed, idle timeout, shutdown, or answered 408/400).
    End,
    /// HTTP/2 prior knowledge: hyper takes over.
    H2,
}

/// A client connection on our path. It owns what it needs, so that the
/// task serving it can hold it in place (see `server::serve_plain`).
pub(crate) struct Client<T> {
    io: T,
    /// Bytes read from the client and not yet used.
    rbuf: BytesMut,
    /// Output being assembled (heads, then body bytes).
    out: Vec<u8>,
    spans: Vec<Span>,
    timer: Deadline,
    /// The client may have sent bytes not read yet (a body not relayed, a refused head).
    unread: bool,
    /// Our FIN has gone out (it is sent once).
    shut: bool,
    fe: Arc<FrontendRuntime>,
    shared: Arc<Shared>,
    peer: SocketAddr,
    local: SocketAddr,
    tls: Option<Box<TlsFacts>>,
}

impl<T> Client<T> {
    /// A client connection `io` from `peer` to `local` (`tls`: what its
    /// handshake established) on frontend `fe`, before its first request.
    pub(crate) fn new(
        io: T,
        (peer, local): (SocketAddr, SocketAddr),
        tls: Option<Box<TlsFacts>>,
        fe: Arc<FrontendRuntime>,
        shared: Arc<Shared>,
    ) -> Self {
        Client {
            io,
            rbuf: BytesMut::new(),
            out: Vec::new(),
            spans: Vec::new(),
            timer: Deadline::new(),
            unread: false,
            shut: false,
            fe,
            shared,
            peer,
            local,
            tls,
        }
    }

    /// The stream, with the bytes read from it (an HTTP/2 preface), for hyper;
    /// with the frontend and the pools.
    pub(crate) fn into_h2(self) -> (Prefixed<T>, Arc<FrontendRuntime>, Arc<Shared>) {
        // A copy of the few bytes read: the read buffer (16 KiB) goes back to
        // the thread's spares instead of living as long as the HTTP/2
        // connection (it was a quarter of an idle one's memory).
        let prefixed = Prefixed {
            prefix: Bytes::copy_from_slice(&self.rbuf),
            inner: self.io,
        };
        let mut rbuf = self.rbuf;
        rbuf.clear();
        spare::give((rbuf, self.out, self.spans));
        (prefixed, self.fe, self.shared)
    }
}

/// Serves HTTP/1 requests on `c` until the client or the proxy ends the
/// connection. `plain` binds may carry HTTP/2 prior knowledge instead: then
/// true, and `Client::into_h2` hands the connection to hyper.
///
/// The client is borrowed, not taken: an async fn keeps its arguments twice
/// (as given, and moved into its body), which for the client (its stream,
/// kilobytes with TLS) was most of what an idle connection held.
pub(crate) async fn serve<T>(
    c: &mut Client<T>,
    plain: bool,
    shutdown: &mut watch::Receiver<()>,
) -> bool
where
    T: AsyncRead + AsyncWrite + Unpin + HoldForFin,
{
    // Polled while idle only.
    let probe = shutdown.clone();
    let changed = pin!(shutdown.changed());
    let mut shutdown = ShutdownWatch::new(probe, changed);
    let mut first = true;
    let mut ready_since = Instant::now();
    loop {
        let head = match c.wait_head(first && plain, first, &mut shutdown).await {
            Wait::Head(h) => h,
            Wait::End => {
                c.close().await;
                return false;
            }
            Wait::H2 => return true,
        };
        first = false;
        let start = Instant::now();
        let tq = start.saturating_duration_since(ready_since).as_millis() as i64;
        // Boxed per request: the exchange's state (several KiB) then exists
        // only while a request is served, not while the connection idles.
        let next = Box::pin(c.exchange(*head, start, tq)).await;
        ready_since = Instant::now();
        if next == Next::Close || shutdown.has_come() {
            c.close().await;
            return false;
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + HoldForFin> Client<T> {
    /// Closes our side. When the client may still be sending (an unread
    /// body, a refused head, bytes beyond the last request), reads and drops
    /// what comes for a moment (bounded) first: closing with unread bytes
    /// would reset the connection, and the client could lose the answer.
    async fn close(&mut self) {
        if !self.unread && self.rbuf.is_empty() {
            self.shut_down().await;
            return;
        }
        // Boxed: only connections with unread bytes linger.
        Box::pin(self.linger()).await;
    }

    /// Shuts our side and drops what the client still sends, for a moment.
    async fn linger(&mut self) {
        let shut = std::mem::replace(&mut self.shut, true);
        let _ = self
            .timer
            .limit(LINGER, async {
                if !shut {
                    let _ = self.io.shutdown().await;
                }
                let mut drained = 0;
                while drained < LINGER_BYTES {
                    self.rbuf.clear();
                    match read_more(&mut self.io, &mut self.rbuf).await {
                        Ok(n) if n > 0 => drained += n,
                        _ => break,
                    }
                }
            })
            .await;
    }

    /// Sends our FIN after what is written (bounded, once). Called as soon
    /// as a closing answer is out, before the bookkeeping: an answer held
    /// for the FIN (`HoldForFin`) leaves only with it.
    async fn shut_down(&mut self) {
        if std::mem::replace(&mut self.shut, true) {
            return;
        }
        let _ = self
            .timer
            .limit(
                LINGER,
                poll_fn(|cx| Pin::new(&mut self.io).poll_shutdown(cx)),
            )
            .await;
    }

    /// Waits for the next request head: the first request and a head under
    /// way get `timeout_http_request` (then 408), an idle keep-alive
    /// connection `timeout_http_keep_alive` (then a quiet close).
    async fn wait_head(
        &mut self,
        preface: bool,
        first: bool,
        shutdown: &mut ShutdownWatch<'_>,
    ) -> Wait {
        let mut head_due: Option<Instant> = None;
        loop {
            if !self.rbuf.is_empty() {
                if preface {
                    let n = self.rbuf.len().min(H2_PREFACE.len());
                    if self.rbuf[..n] == H2_PREFACE[..n] {
                        if n == H2_PREFACE.len() {
                            return Wait::H2;
                        }
                    } else if let Some(w) = self.parse_head().await {
                        return w;
                    }
                } else if let Some(w) = self.parse_head().await {
                    return w;
                }
                if head_due.is_none() {
                    head_due = Some(Instant::now() + self.fe.timeouts.http_request);
                }
            }
            let idle = self.rbuf.is_empty();
            // A shutdown (a reload) closes idle keep-alive connections, but
            // a new one gets its first request served: its client has sent
            // it, or is about to, and could not tell a close from a failure.
            let closable = idle && !first;
            if closable && shutdown.has_come() {
                return Wait::End;
            }
            let mut due = head_due;
            let limit = if first {
                self.fe.timeouts.http_request
            } else {
                self.fe.timeouts.keep_alive
            };
            let (io, rbuf, timer) = (&mut self.io, &mut self.rbuf, &mut self.timer);
            let (out, spans) = (&mut self.out, &mut self.spans);
            let read = poll_fn(|cx| {
                if rbuf.capacity() == 0 {
                    (*rbuf, *out, *spans) = spare::take();
                }
                if let Poll::Ready(r) = poll_read_buf(Pin::new(&mut *io), cx, rbuf) {
                    return Poll::Ready(Some(r));
                }
                if idle {
                    // Nothing to do until the client speaks: the buffers go
                    // back to this thread's spares meanwhile, as HAProxy's go
                    // back to its pools, so an idle keep-alive connection
                    // holds no buffer (nor span list).
                    spare::give((
                        std::mem::take(rbuf),
                        std::mem::take(out),
                        std::mem::take(spans),
                    ));
                }
                if closable && shutdown.poll_come(cx) {
                    return Poll::Ready(None);
                }
                let d = *due.get_or_insert_with(|| Instant::now() + limit);
                timer.arm(d);
                if timer.poll_expired(cx, d) {
                    return Poll::Ready(Some(Err(io::ErrorKind::TimedOut.into())));
                }
                Poll::Pending
            })
            .await;
            match read {
                Some(Ok(0)) | None => return Wait::End,
                Some(Ok(_)) => {}
                Some(Err(e)) if e.kind() == io::ErrorKind::TimedOut && !idle => {
                    AccessRecord::bad_request(
                        self.peer,
                        self.fe.ctx.name.clone(),
                        Failure::HeadTimeout,
                        timeout_408().len() as u64,
                    )
                    .counted_in(&self.fe.ctx.stats)
                    .emit_as(self.fe.ctx.log_format);
                    self.out.clear();
                    self.out.extend_from_slice(timeout_408());
                    // Boxed: rare, and waiting is what an idle connection does.
                    let _ = Box::pin(self.write_client()).await;
                    self.unread = true;
                    return Wait::End;
                }
                Some(Err(_)) => return Wait::End,
            }
        }
    }

    /// Tries to take a complete head off `rbuf`; answers 400 to a bad one.
    async fn parse_head(&mut self) -> Option<Wait> {
        // The parse result is gone before the await, and the rare 400 is
        // boxed: this future is part of every idle connection's state.
        let why = match codec::take_request(&mut self.rbuf, &mut self.spans) {
            Ok(Some(h)) => return Some(Wait::Head(Box::new(h))),
            Ok(None) if self.rbuf.len() <= self.fe.head_limit => return None,
            Ok(None) => "request head too large",
            Err(why) => why,
        };
        Some(Box::pin(self.bad_request(why)).await)
    }

    /// Answers 400 and ends the connection; nothing of the request is forwarded.
    async fn bad_request(&mut self, why: &str) -> Wait {
        tracing::debug!(frontend = %self.fe.ctx.name, peer = %self.peer, reason = why, "request rejected");
        let failure = Failure::BadRequest;
        let custom = self.fe.ctx.error_page(failure.status());
        let page = failure.put_http1_answer(&mut self.out, true, custom.as_deref());
        AccessRecord::bad_request(self.peer, self.fe.ctx.name.clone(), failure, page as u64)
            .counted_in(&self.fe.ctx.stats)
            .emit_as(self.fe.ctx.log_format);
        let _ = self.write_client().await;
        self.unread = true;
        Wait::End
    }

    /// Writes `out` to the client within `timeout_client`.
    async fn write_client(&mut self) -> Result<(), Fail> {
        match self
            .timer
            .limit(
                self.fe.timeouts.client,
                write_out(&mut self.io, &mut self.out),
            )
            .await
        {
            Some(Ok(())) => Ok(()),
            Some(Err(_)) => Err(Fail::Write),
            None => Err(Fail::WriteTimeout),
        }
    }

    /// Answers an error page, logs, and says whether the connection goes on:
    /// not when the request's body was not read.
    async fn answer_error(
        &mut self,
        failure: Failure,
        rec: impl Into<AccessRecord>,
        keep_alive: bool,
        start: Instant,
    ) -> Next {
        let mut rec = rec.into();
        rec.status = failure.status().as_u16();
        rec.termination = failure.termination();
        let custom = self.fe.ctx.error_page(failure.status());
        rec.bytes = failure.put_http1_answer(&mut self.out, !keep_alive, custom.as_deref()) as u64;
        self.send_answer(rec, keep_alive, start).await
    }

    /// Answers with a request action's response (deny, redirect, return, auth).
    async fn answer(
        &mut self,
        answer: http::Response<Full<Bytes>>,
        mut rec: AccessRecord,
        keep_alive: bool,
        start: Instant,
    ) -> Next {
        let (head, body) = answer.into_parts();
        let body = match body.collect().await {
            Ok(b) => b.to_bytes(),
            Err(never) => match never {},
        };
        // The length of what is sent, whatever an action set.
        let length = body.len().to_string();
        let mut extra = Vec::with_capacity(2);
        extra.push(("content-length", length.as_str()));
        if !keep_alive {
            extra.push(("connection", "close"));
        }
        codec::put_response(&mut self.out, head.status, b"", &head.headers, &extra);
        self.out.extend_from_slice(&body);
        rec.bytes = body.len() as u64;
        self.send_answer(rec, keep_alive, start).await
    }

    /// Writes the answer assembled in `out`, logs it, and says what comes next.
    async fn send_answer(
        &mut self,
        mut rec: AccessRecord,
        keep_alive: bool,
        start: Instant,
    ) -> Next {
        if self.write_client().await.is_err() {
            rec.termination = ['C', 'D'];
        }
        finish(rec, start, &self.fe);
        if keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
        }
    }

    /// Who sent the request, with a body framed as `body`, for `prepare`.
    fn client_side(&self, body: BodyKind) -> ClientSide<'_> {
        ClientSide {
            frontend: &self.fe.ctx,
            peer: self.peer,
            local: self.local,
            tls: self.tls.as_deref(),
            body_length: Some(match body {
                BodyKind::Fixed(n) => n,
                // A chunked request has no Content-Length (`hardening`).
                _ => 0,
            }),
        }
    }

    /// Serves one request: actions, routing, a server, the response.
    async fn exchange(&mut self, head: RequestHead, start: Instant, tq: i64) -> Next {
        let RequestHead {
            mut parts,
            body,
            expect_continue,
            keep_alive,
            upgrade,
        } = head;
        // Before `prepare` makes it the server's (HTTP/1.1).
        let client_version = parts.version;
        // An unread body would be taken for the next head: answers given
        // before reading it close the connection.
        let bodiless = body == BodyKind::Fixed(0);
        // Cleared once the body has been relayed.
        self.unread = !bodiless;
        let client = self.client_side(body);
        let prepared = prepare::prepare(
            &self.shared,
            client,
            &mut parts,
            (tq, start.into_std()),
            upgrade.as_ref(),
        )
        .await;
        let mut fwd = match prepared {
            Prepared::Forward(f) => f,
            Prepared::Refuse(failure, rec) => {
                // A malformed request (400) ends the connection, as a refused head does.
                let keep = keep_alive && bodiless && failure.status() != StatusCode::BAD_REQUEST;
                return self.answer_error(failure, rec, keep, start).await;
            }
            Prepared::Answer(answer, rec) => {
                return self
                    .answer(answer, rec, keep_alive && bodiless, start)
                    .await;
            }
        };
        // The pool is looked up again after each `&mut self` call (the
        // client owns the pools' `Arc`), rather than holding a clone.
        let pool_idx = fwd.pool;
        let mut attempts = Attempts::new(&self.shared.pools[pool_idx]).for_method(&parts.method);
        loop {
            let pool = &self.shared.pools[pool_idx];
            let attempt = self.reach(pool, &mut attempts, &mut fwd).await;
            let (active, mut server, reused) = match attempt {
                Ok(a) => a,
                Err(f) if attempts.retry(pool, f, false) => continue,
                Err(f) => {
                    let keep = keep_alive && bodiless;
                    return self.answer_error(f, fwd.rec, keep, start).await;
                }
            };
            let sent = Instant::now();
            // HTTP/1.0 clients get no 1xx (RFC 9110 15.2).
            let interim = client_version == Version::HTTP_11;
            let request = (&parts, body, expect_continue, interim);
            let limit = (pool.timeout_server, &mut fwd.rec.phase);
            let r = self.send(request, &mut server, limit, reused && bodiless);
            let r = r.await;
            let pool = &self.shared.pools[pool_idx];
            let (resp, body_sent) = match r {
                Ok(r) => r,
                Err((f, _)) if attempts.retry(pool, f, reused && bodiless) => continue,
                Err((f, body_sent)) => {
                    let server = active.server().addr;
                    tracing::debug!(pool = %pool.name, %server, failure = ?f, "no response");
                    fwd.rec.tr = sent.elapsed().as_millis() as i64;
                    let keep = keep_alive && body_sent;
                    return self.answer_error(f, fwd.rec, keep, start).await;
                }
            };
            Attempts::answered(pool, &active);
            fwd.rec.tr = sent.elapsed().as_millis() as i64;
            let ctx = ResponseCtx {
                server,
                addr: active.server().addr,
                active,
                fwd,
                upgrade,
                keep_alive: keep_alive && body_sent,
                body_sent,
                client_version,
                start,
            };
            return self.respond(resp, ctx).await;
        }
    }

    /// A server of the pool (after its queue, if it has one) and a
    /// connection to it, as `connect`.
    async fn reach(
        &self,
        pool: &PoolRuntime,
        attempts: &mut Attempts,
        fwd: &mut Forwarding,
    ) -> Result<(Active, RawConn, bool), Failure> {
        let active = attempts
            .acquire_forwarded(pool, fwd.pick, &mut fwd.rec)
            .await?;
        self.connect(pool, active, &mut fwd.rec).await
    }

    /// A connection to the attempt's server (a kept one, or a new one), and
    /// whether it was reused.
    async fn connect(
        &self,
        pool: &PoolRuntime,
        active: Active,
        rec: &mut AccessRecord,
    ) -> Result<(Active, RawConn, bool), Failure> {
        if pool.h2 {
            // Only a router that ignores the frontend's `use_pool` rules gets here
            // (own_h1 frontends reach HTTP/1.1 pools only).
            tracing::warn!(pool = %pool.name, "HTTP/2 pool reached on the HTTP/1 path");
            return Err(Failure::Internal);
        }
        let addr = active.server().addr;
        match pool.conns.get_raw(addr, self.peer, self.local).await {
            Ok((server, connect_time)) => {
                rec.tc = connect_time.map_or(0, |d| d.as_millis() as i64);
                Ok((active, server, connect_time.is_none()))
            }
            Err(e) => {
                tracing::debug!(pool = %pool.name, server = %addr, error = %e, "connect failed");
                Err(Failure::ConnectFailed)
            }
        }
    }

    /// One attempt: the request to `server` (head, then the body by its
    /// framing), then its response head. A failure comes with whether the
    /// whole request went out. `retriable`: a server that stops taking the
    /// request is a kept connection closed under us (`ServerClosed`), to be
    /// retried; otherwise it may have answered why, and its answer is read.
    async fn send(
        &mut self,
        (parts, body, expect_continue, interim): (&http::request::Parts, BodyKind, bool, bool),
        server: &mut RawConn,
        (timeout_server, phase): (Duration, &mut Phase),
        retriable: bool,
    ) -> Result<(ResponseHead, bool), (Failure, bool)> {
        *phase = match body {
            BodyKind::Fixed(0) => Phase::Headers,
            _ => Phase::Data,
        };
        if expect_continue && body != BodyKind::Fixed(0) {
            self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
            if self.write_client().await.is_err() {
                return Err((Failure::ClientAborted, false));
            }
        }
        // The client's output buffer is empty between answers: the
        // request goes out through it (written again on a retry).
        codec::put_request(&mut self.out, parts, body);
        let relayed = relay(
            End {
                io: &mut self.io,
                limit: self.fe.timeouts.client,
            },
            &mut self.rbuf,
            End {
                io: &mut server.io,
                limit: timeout_server,
            },
            &mut self.out,
            Message {
                body,
                dechunk: false,
                written: &AtomicU64::new(0),
                request: true,
            },
            &mut self.timer,
        )
        .await;
        // Whatever of the request was not sent must not reach the client.
        self.out.clear();
        let body_sent = match relayed {
            Ok(_) => {
                self.unread = false;
                true
            }
            Err(Fail::Write | Fail::WriteTimeout) if retriable => {
                return Err((Failure::ServerClosed, false));
            }
            Err(Fail::Write | Fail::WriteTimeout) => false,
            Err(fail) => return Err((fail.in_request(), false)),
        };
        *phase = Phase::Headers;
        let RawConn { io, buf, .. } = server;
        // timeout_server counts from the end of the body, as HAProxy's: a
        // long upload is no server's silence (each wait of the relay above
        // on the server was limited by it already).
        let due = Instant::now() + timeout_server;
        loop {
            let resp = client::response_head(
                io,
                buf,
                &mut self.spans,
                &parts.method,
                due,
                &mut self.timer,
                interim,
            )
            .await;
            match resp {
                // 102, 103 (Early Hints) and the like go to the client as
                // they come (RFC 9110 15.2: a proxy forwards 1xx answers;
                // its own 100 Continue went above, the server's is dropped).
                Ok(r)
                    if r.status.is_informational()
                        && r.status != StatusCode::SWITCHING_PROTOCOLS =>
                {
                    codec::put_response_fields(&mut self.out, &r, false, &[]);
                    self.spans = r.into_fields();
                    if self.write_client().await.is_err() {
                        return Err((Failure::ClientAborted, body_sent));
                    }
                }
                resp => return resp.map(|r| (r, body_sent)).map_err(|f| (f, body_sent)),
            }
        }
    }

    /// Sends a server's response to the client: head (rewritten), then body.
    async fn respond(&mut self, resp: ResponseHead, mut ctx: ResponseCtx) -> Next {
        let pool_idx = ctx.fwd.pool;
        let pool = &self.shared.pools[pool_idx];
        let timeout_server = pool.timeout_server;
        ctx.fwd.rec.status = resp.status.as_u16();
        prepare::persist(&mut ctx.fwd, (pool, ctx.active.server()), self.fe.ctx.https);
        let Ok(head) = OutHead::new(&resp, &ctx.fwd.response_ops) else {
            return self
                .answer_error(Failure::Internal, ctx.fwd.rec, false, ctx.start)
                .await;
        };
        if resp.status == StatusCode::SWITCHING_PROTOCOLS {
            return self.tunnel(resp, head, ctx).await;
        }
        let body = resp.body;
        let http10 = ctx.client_version == Version::HTTP_10;
        let (dechunk, close, connection) = client_framing(body, http10, ctx.keep_alive);
        let keep_te = body == BodyKind::Chunked && !dechunk;
        head.put(&mut self.out, &resp, keep_te, connection);
        let server_keep_alive = resp.keep_alive;
        self.spans = resp.into_fields();
        let ResponseCtx {
            mut server,
            addr,
            active,
            fwd,
            body_sent,
            start,
            ..
        } = ctx;
        if close && matches!(body, BodyKind::Fixed(n) if server.buf.len() as u64 >= n) {
            // The whole answer is in hand and the connection closes after it.
            self.io.hold_for_fin();
        }
        // Logged `KD` if the task ends within the relay (a hard stop).
        let relaying = Relaying::new(fwd.rec.into_record(), start, &self.fe);
        let (limit, buf) = (self.fe.timeouts.client, &mut server.buf);
        let from = End {
            io: &mut server.io,
            limit: timeout_server,
        };
        let to = End {
            io: &mut self.io,
            limit,
        };
        let msg = Message::new(body, dechunk, &relaying.written);
        let relayed = relay(from, buf, to, &mut self.out, msg, &mut self.timer).await;
        let Some((mut rec, written)) = relaying.into_parts() else {
            return Next::Close;
        };
        // All of the body on success; what the client got of it otherwise.
        rec.bytes = written;
        let next = match relayed {
            Ok(_) => {
                if close {
                    self.shut_down().await;
                }
                if server_keep_alive && body_sent && body != BodyKind::Close {
                    self.shared.pools[pool_idx].conns.put_raw(addr, server);
                }
                if close { Next::Close } else { Next::KeepAlive }
            }
            // Nothing reached the client (the head waited for the rest of
            // the body, or the first bytes were broken): it gets a 502.
            Err(fail @ (Fail::Read | Fail::ReadTimeout | Fail::Framing))
                if !self.out.is_empty() =>
            {
                self.out.clear();
                drop(active);
                return self
                    .answer_error(fail.in_response(), rec, false, start)
                    .await;
            }
            Err(fail) => {
                self.out.clear();
                rec.termination = fail.in_response().termination();
                Next::Close
            }
        };
        drop(active);
        finish(rec, start, &self.fe);
        next
    }

    /// Answers a `101` and becomes a byte-for-byte tunnel (proxy/tunnel.rs),
    /// if the server switched to what the client asked for.
    async fn tunnel(&mut self, resp: ResponseHead, head: OutHead, ctx: ResponseCtx) -> Next {
        let ResponseCtx {
            mut server,
            active,
            fwd,
            upgrade,
            start,
            ..
        } = ctx;
        let mut rec = fwd.rec.into_record();
        let accepted = tunnel::accept_matches(
            fwd.ws_accept.as_ref(),
            resp.field_values(b"sec-websocket-accept"),
        );
        let switched = upgrade
            .filter(|_| accepted)
            .and_then(|asked| tunnel::switched_to(&asked, resp.upgrade.as_ref()));
        let Some(proto_out) = switched else {
            return self
                .answer_error(Failure::BadResponse, rec, false, start)
                .await;
        };
        let proto_text = String::from_utf8_lossy(proto_out.as_bytes()).into_owned();
        let extra = [("connection", "upgrade"), ("upgrade", proto_text.as_str())];
        head.put(&mut self.out, &resp, false, &extra);
        self.out.extend_from_slice(&server.buf);
        server.buf.clear();
        if self.write_client().await.is_err() {
            rec.termination = Failure::ClientAborted.termination();
            finish(rec, start, &self.fe);
            return Next::Close;
        }
        // Counted at its 101, logged when the tunnel ends.
        let log = tunnel::TunnelLog::at_101(
            rec,
            (start.into_std(), start.elapsed()),
            self.fe.ctx.log_format,
        );
        // What the client sent behind its request goes first (and counts as sent).
        let mut early = std::mem::take(&mut self.rbuf).to_vec();
        let early_len = early.len() as u64;
        let mut spliced = match write_out(&mut server.io, &mut early).await {
            Ok(()) => {
                let idle = self.shared.pools[fwd.pool]
                    .timeout_tunnel
                    .or(self.fe.ctx.timeout_tunnel)
                    .unwrap_or(tunnel::DEFAULT_TIMEOUT_TUNNEL);
                let stops = (self.fe.ctx.kill.clone(), Some(&**active.server()));
                tunnel::splice(&mut self.io, &mut server.io, idle, stops).await
            }
            Err(e) => tunnel::Spliced {
                ended: Err(e),
                from_a: 0,
                to_a: 0,
                a_failed: false,
            },
        };
        spliced.from_a += early_len;
        spliced.debug();
        log.ended(&spliced);
        Next::Close
    }
}

/// A server's response head as the client gets it: with response actions
/// the fields go through a header map; without, they are copied as the
/// server sent them.
struct OutHead {
    /// The fields after the actions, and the Transfer-Encoding to keep.
    mapped: Option<(http::HeaderMap, String)>,
    /// The parsed Content-Length, written once.
    length: Option<String>,
}

impl OutHead {
    /// Runs the response actions; Err when the fields are not valid headers.
    fn new(resp: &ResponseHead, ops: &[actions::HeaderOp]) -> Result<Self, &'static str> {
        let length = resp.length.map(|n| n.to_string());
        if ops.is_empty() {
            return Ok(OutHead {
                mapped: None,
                length,
            });
        }
        let mut headers = resp.header_map()?;
        // Codings before `chunked` (e.g. gzip) stay: the client gets them as sent.
        let te = headers
            .get_all(header::TRANSFER_ENCODING)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .collect::<Vec<_>>()
            .join(", ");
        // (Only used when the body is chunked, so chunked is its last coding.)
        let te = if te.is_empty() { "chunked".into() } else { te };
        prepare::strip_hop_by_hop(&mut headers);
        actions::apply_response(ops, &mut headers);
        Ok(OutHead {
            mapped: Some((headers, te)),
            length,
        })
    }

    /// Appends the head to `out`, with Transfer-Encoding if `keep_te`, and `extra`.
    fn put(&self, out: &mut Vec<u8>, resp: &ResponseHead, keep_te: bool, extra: &[(&str, &str)]) {
        let Some((headers, te)) = &self.mapped else {
            return codec::put_response_fields(out, resp, keep_te, extra);
        };
        let mut all = Vec::with_capacity(extra.len() + 2);
        if keep_te {
            all.push(("transfer-encoding", te.as_str()));
        }
        if let Some(n) = &self.length {
            all.push(("content-length", n.as_str()));
        }
        all.extend_from_slice(extra);
        codec::put_response(out, resp.status, resp.reason(), headers, &all);
    }
}

/// How a response body framed as `body` goes to the client: dechunked or
/// not, whether the connection closes after it, and the Connection field
/// that says what the client would not assume.
fn client_framing(
    body: BodyKind,
    http10: bool,
    keep_alive: bool,
) -> (bool, bool, &'static [(&'static str, &'static str)]) {
    let (dechunk, close) = match body {
        BodyKind::Fixed(_) => (false, !keep_alive),
        // An HTTP/1.0 client cannot read chunks: data only, to the close.
        BodyKind::Chunked if http10 => (true, true),
        BodyKind::Chunked => (false, !keep_alive),
        BodyKind::Close => (false, true),
    };
    let connection: &'static [(&'static str, &'static str)] = if close {
        &[("connection", "close")]
    } else if http10 {
        &[("connection", "keep-alive")]
    } else {
        &[]
    };
    (dechunk, close, connection)
}

/// What `respond` needs of the exchange.
struct ResponseCtx {
    server: RawConn,
    addr: SocketAddr,
    active: Active,
    /// The request's pool, access record and response actions.
    fwd: Forwarding,
    upgrade: Option<HeaderValue>,
    /// The client connection may stay open (as far as the request goes).
    keep_alive: bool,
    /// The whole request went to the server: only then may its connection
    /// be reused (an unsent rest would be read as the next client's request).
    body_sent: bool,
    client_version: Version,
    start: Instant,
}

/// A request's record while its answer is relayed, so that a task dropped
/// there (its runtime's end, a hard stop's last step) still logs it, `KD`,
/// with the body bytes the client got.
struct Relaying<'a> {
    rec: Option<AccessRecord>,
    start: Instant,
    fe: &'a FrontendRuntime,
    /// Body bytes written to the client so far (the relay counts them).
    written: AtomicU64,
}

impl<'a> Relaying<'a> {
    fn new(rec: AccessRecord, start: Instant, fe: &'a FrontendRuntime) -> Self {
        Relaying {
            rec: Some(rec),
            start,
            fe,
            written: AtomicU64::new(0),
        }
    }

    /// The record back with the bytes written, the relay over (None only
    /// if taken already).
    fn into_parts(mut self) -> Option<(AccessRecord, u64)> {
        self.rec
            .take()
            .map(|rec| (rec, self.written.load(Ordering::Relaxed)))
    }
}

impl Drop for Relaying<'_> {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            rec.termination = match *self.fe.ctx.kill.borrow() {
                true => ['K', 'D'],
                false => Failure::ClientAborted.termination(),
            };
            rec.bytes = self.written.load(Ordering::Relaxed);
            finish(rec, self.start, self.fe);
        }
    }
}

/// Completes and emits a request's access log record.
fn finish(rec: AccessRecord, start: Instant, fe: &FrontendRuntime) {
    rec.finish(start.elapsed(), fe.ctx.log_format);
}
