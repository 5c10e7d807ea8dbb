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

mod codec;
mod relay;

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
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
use super::connpool::RawConn;
use super::context::{FrontendRuntime, Shared};
use super::deadline::Deadline;
use super::error::{Failure, TIMEOUT_408};
use super::hardening::H2_PREFACE;
use super::log::AccessRecord;
use super::prepare::{self, Attempts, ClientSide, Forwarding, Prepared};
use super::shutdown::ShutdownWatch;
use super::tunnel;
use codec::{BodyKind, RequestHead, ResponseHead, Span};
use relay::{End, Fail, READ_SIZE, read_more, relay, write_out};

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

    /// Spare buffer pairs kept at most per thread.
    const KEEP: usize = 256;

    thread_local! {
        static SPARE: RefCell<Vec<(BytesMut, Vec<u8>)>> = const { RefCell::new(Vec::new()) };
    }

    /// A read buffer and an output buffer, empty, with room for a read.
    pub(super) fn take() -> (BytesMut, Vec<u8>) {
        let mut pair = SPARE
            .with(|s| s.borrow_mut().pop())
            .unwrap_or_else(|| (BytesMut::new(), Vec::new()));
        // Also reclaims the room of a read buffer whose old heads are gone.
        pair.0.reserve(READ_SIZE);
        pair
    }

    /// Keeps empty buffers for `take`.
    pub(super) fn give(rbuf: BytesMut, mut out: Vec<u8>) {
        if !rbuf.is_empty() || rbuf.capacity() == 0 {
            return;
        }
        out.clear();
        SPARE.with(|s| {
            let mut s = s.borrow_mut();
            if s.len() < KEEP {
                s.push((rbuf, out));
            }
        });
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn idle_buffers_are_reused_and_busy_ones_kept() {
            let (rbuf, out) = take();
            assert!(rbuf.capacity() >= READ_SIZE && rbuf.is_empty());
            let at = rbuf.as_ptr();
            give(rbuf, out);
            let (again, out) = take();
            assert_eq!(again.as_ptr(), at, "the same buffer comes back");
            // A buffer still holding a client's bytes is not anybody's spare.
            let spares = || SPARE.with(|s| s.borrow().len());
            let before = spares();
            let mut busy = again;
            busy.extend_from_slice(b"GET");
            give(busy, out);
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
        Poll::Ready(Ok(()))
    }
}

write_through!(Prefixed<T>);

/// Why no response head came.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum HeadFail {
    /// Malformed, or the connection ended inside it.
    Bad,
    /// The connection ended before any byte of it.
    Silent,
    /// Not within `timeout_server`.
    TimedOut,
}

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

/// A client connection on our path.
struct Client<'a, T> {
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
    fe: &'a FrontendRuntime,
    shared: &'a Shared,
    peer: SocketAddr,
    local: SocketAddr,
    sni: Option<String>,
}

/// Serves HTTP/1 requests on `io` until the client or the proxy ends the
/// connection. `plain` binds may carry HTTP/2 prior knowledge instead: then
/// the stream and the bytes read are returned, for hyper.
pub(crate) async fn serve<T>(
    io: T,
    (peer, local): (SocketAddr, SocketAddr),
    sni: Option<String>,
    plain: bool,
    fe: &FrontendRuntime,
    shared: &Shared,
    shutdown: &mut watch::Receiver<()>,
) -> Option<Prefixed<T>>
where
    T: AsyncRead + AsyncWrite + Unpin + HoldForFin,
{
    let mut c = Client {
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
        sni,
    };
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
                return None;
            }
            Wait::H2 => {
                return Some(Prefixed {
                    prefix: std::mem::take(&mut c.rbuf).freeze(),
                    inner: c.io,
                });
            }
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
            return None;
        }
    }
}

impl<T: AsyncRead + AsyncWrite + Unpin + HoldForFin> Client<'_, T> {
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
            let out = &mut self.out;
            let read = poll_fn(|cx| {
                if rbuf.capacity() == 0 {
                    (*rbuf, *out) = spare::take();
                }
                if let Poll::Ready(r) = poll_read_buf(Pin::new(&mut *io), cx, rbuf) {
                    return Poll::Ready(Some(r));
                }
                if idle {
                    // Nothing to do until the client speaks: the buffers go
                    // back to this thread's spares meanwhile, as HAProxy's go
                    // back to its pools, so an idle keep-alive connection
                    // holds no buffer.
                    spare::give(std::mem::take(rbuf), std::mem::take(out));
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
                        TIMEOUT_408.len() as u64,
                    )
                    .emit_as(self.fe.ctx.log_format);
                    self.out.clear();
                    self.out.extend_from_slice(TIMEOUT_408);
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
        let page = failure.page();
        AccessRecord::bad_request(
            self.peer,
            self.fe.ctx.name.clone(),
            failure,
            page.len() as u64,
        )
        .emit_as(self.fe.ctx.log_format);
        self.put_error(failure.status(), &page, true);
        let _ = self.write_client().await;
        self.unread = true;
        Wait::End
    }

    /// Appends an HAProxy-like error answer to `out`.
    fn put_error(&mut self, status: StatusCode, page: &str, close: bool) {
        let length = page.len().to_string();
        let mut extra = vec![
            ("content-length", length.as_str()),
            ("cache-control", "no-cache"),
            ("content-type", "text/html"),
        ];
        if close {
            extra.push(("connection", "close"));
        }
        codec::put_response(&mut self.out, status, b"", &http::HeaderMap::new(), &extra);
        self.out.extend_from_slice(page.as_bytes());
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
        mut rec: AccessRecord,
        keep_alive: bool,
        start: Instant,
    ) -> Next {
        let status = failure.status();
        let page = failure.page();
        rec.status = status.as_u16();
        rec.termination = failure.termination();
        rec.bytes = page.len() as u64;
        self.put_error(status, &page, !keep_alive);
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
        finish(rec, start, self.fe);
        if keep_alive {
            Next::KeepAlive
        } else {
            Next::Close
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
        let client_version = parts.version;
        // An unread body would be taken for the next head: answers given
        // before reading it close the connection.
        let bodiless = body == BodyKind::Fixed(0);
        // Cleared once the body has been relayed.
        self.unread = !bodiless;
        let client = ClientSide {
            frontend: &self.fe.ctx,
            peer: self.peer,
            local: self.local,
            sni: self.sni.as_deref(),
        };
        let prepared =
            prepare::prepare(self.shared, client, &mut parts, tq, upgrade.as_ref()).await;
        let fwd = match prepared {
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
        let Forwarding {
            pool: pool_idx,
            mut rec,
            key,
            response_ops,
            ws_accept,
        } = fwd;
        let pool = &self.shared.pools[pool_idx];
        if pool.h2 {
            // Only a router that ignores the frontend's `use_pool` rules gets here
            // (own_h1 frontends reach HTTP/1.1 pools only).
            tracing::warn!(pool = %pool.name, "HTTP/2 pool reached on the HTTP/1 path");
            return self
                .answer_error(Failure::Internal, rec, false, start)
                .await;
        }
        let mut attempts = Attempts::new(pool);
        loop {
            let active = match attempts.acquire(pool, key, &mut rec).await {
                Ok(a) => a,
                Err(failure) => {
                    return self
                        .answer_error(failure, rec, keep_alive && bodiless, start)
                        .await;
                }
            };
            let addr = active.server().addr;
            let conn = pool.conns.get_raw(addr, self.peer, self.local).await;
            let (mut server, connect_time) = match conn {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(pool = %pool.name, server = %addr, error = %e, "connect failed");
                    if attempts.retry(Failure::ConnectFailed, false) {
                        continue;
                    }
                    return self
                        .answer_error(Failure::ConnectFailed, rec, keep_alive && bodiless, start)
                        .await;
                }
            };
            let reused = connect_time.is_none();
            rec.tc = connect_time.map_or(0, |d| d.as_millis() as i64);
            let sent = Instant::now();
            let timeout_server = pool.timeout_server;
            // --- request: head, then the body by its framing ---
            if expect_continue && !bodiless {
                self.out.extend_from_slice(b"HTTP/1.1 100 Continue\r\n\r\n");
                if self.write_client().await.is_err() {
                    rec.termination = ['C', 'D'];
                    finish(rec, start, self.fe);
                    return Next::Close;
                }
            }
            // The client's output buffer is empty between answers: the
            // request goes out through it (written again on a retry).
            codec::put_request(&mut self.out, &parts, body);
            let sent_whole = relay(
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
                body,
                false,
                &mut self.timer,
            )
            .await;
            // Whatever of the request was not sent must not reach the client.
            self.out.clear();
            match sent_whole {
                Ok(_) => self.unread = false,
                Err(Fail::Read | Fail::ReadTimeout | Fail::Framing) => {
                    // The client broke off its body: nothing sensible to forward or answer.
                    let failure = match sent_whole {
                        Err(Fail::ReadTimeout) => Failure::ClientTimeout,
                        Err(Fail::Framing) => Failure::BadBodyFraming,
                        _ => Failure::ClientAborted,
                    };
                    return self.answer_error(failure, rec, false, start).await;
                }
                Err(Fail::Write | Fail::WriteTimeout)
                    if attempts.retry(Failure::ServerClosed, reused && bodiless) =>
                {
                    // A kept connection the server had closed: send it again on another one.
                    continue;
                }
                // The server stopped taking the body; it may have answered why.
                Err(Fail::Write | Fail::WriteTimeout) => {}
            }
            let body_sent = sent_whole.is_ok();
            // --- response head (interim 1xx answers skipped) ---
            let due = sent + timeout_server;
            let resp = self.response_head(&mut server, &parts.method, due).await;
            let resp = match resp {
                Ok(r) => r,
                Err(HeadFail::Silent)
                    if attempts.retry(Failure::ServerClosed, reused && bodiless) =>
                {
                    // Closed before answering anything: the server's keep-alive ended.
                    continue;
                }
                Err(fail) => {
                    tracing::debug!(pool = %pool.name, server = %addr, ?fail, "no response head");
                    rec.tr = sent.elapsed().as_millis() as i64;
                    let failure = match fail {
                        HeadFail::TimedOut => Failure::ServerTimeout,
                        HeadFail::Silent => Failure::ServerClosed,
                        HeadFail::Bad => Failure::BadResponse,
                    };
                    let keep = keep_alive && body_sent;
                    return self.answer_error(failure, rec, keep, start).await;
                }
            };
            rec.tr = sent.elapsed().as_millis() as i64;
            return self
                .respond(
                    resp,
                    ResponseCtx {
                        server,
                        addr,
                        pool: pool_idx,
                        active,
                        rec,
                        response_ops,
                        upgrade,
                        ws_accept,
                        keep_alive: keep_alive && body_sent,
                        body_sent,
                        client_version,
                        start,
                    },
                )
                .await;
        }
    }

    /// Reads a server's response head by `due`, skipping interim 1xx answers
    /// (but 101, which starts a tunnel).
    async fn response_head(
        &mut self,
        server: &mut RawConn,
        method: &http::Method,
        due: Instant,
    ) -> Result<ResponseHead, HeadFail> {
        loop {
            match codec::take_response(&mut server.buf, &mut self.spans, method) {
                Ok(Some(r))
                    if r.status.is_informational()
                        && r.status != StatusCode::SWITCHING_PROTOCOLS =>
                {
                    self.spans = r.into_fields();
                    continue;
                }
                Ok(Some(r)) => return Ok(r),
                Ok(None) => {}
                Err(why) => {
                    tracing::debug!(reason = why, "bad response head");
                    return Err(HeadFail::Bad);
                }
            }
            let wait = due.saturating_duration_since(Instant::now());
            let read = self
                .timer
                .limit(wait, read_more(&mut server.io, &mut server.buf))
                .await;
            match read {
                Some(Ok(n)) if n > 0 => {}
                Some(_) if server.buf.is_empty() => return Err(HeadFail::Silent),
                Some(_) => return Err(HeadFail::Bad),
                None => return Err(HeadFail::TimedOut),
            }
        }
    }

    /// Sends a server's response to the client: head (rewritten), then body.
    async fn respond(&mut self, resp: ResponseHead, ctx: ResponseCtx) -> Next {
        let ResponseCtx {
            mut server,
            addr,
            pool,
            active,
            mut rec,
            response_ops,
            upgrade,
            ws_accept,
            keep_alive,
            body_sent,
            client_version,
            start,
        } = ctx;
        let pool = &self.shared.pools[pool];
        rec.status = resp.status.as_u16();
        // With response actions the fields go through a header map; without,
        // they are copied as the server sent them.
        let mapped = if response_ops.is_empty() {
            None
        } else {
            let Ok(mut headers) = resp.header_map() else {
                return self
                    .answer_error(Failure::Internal, rec, false, start)
                    .await;
            };
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
            actions::apply_response(&response_ops, &mut headers);
            Some((headers, te))
        };
        let length = resp.length.map(|n| n.to_string());
        let put_head = |out: &mut Vec<u8>, keep_te: bool, extra: &[(&str, &str)]| match &mapped {
            None => codec::put_response_fields(out, &resp, keep_te, extra),
            Some((headers, te)) => {
                let mut all = Vec::with_capacity(extra.len() + 2);
                if keep_te {
                    all.push(("transfer-encoding", te.as_str()));
                }
                if let Some(n) = &length {
                    all.push(("content-length", n.as_str()));
                }
                all.extend_from_slice(extra);
                codec::put_response(out, resp.status, resp.reason(), headers, &all);
            }
        };
        if resp.status == StatusCode::SWITCHING_PROTOCOLS {
            let accepted = tunnel::accept_matches(
                ws_accept.as_ref(),
                resp.field_values(b"sec-websocket-accept"),
            );
            let Some(proto) = upgrade.filter(|_| accepted) else {
                return self
                    .answer_error(Failure::BadResponse, rec, false, start)
                    .await;
            };
            // --- upgrade: 101 to the client, then a byte-for-byte tunnel (proxy/tunnel.rs) ---
            let proto_out = resp.upgrade.clone().unwrap_or(proto);
            let proto_text = String::from_utf8_lossy(proto_out.as_bytes()).into_owned();
            let extra = [("connection", "upgrade"), ("upgrade", proto_text.as_str())];
            put_head(&mut self.out, false, &extra);
            self.out.extend_from_slice(&server.buf);
            server.buf.clear();
            if self.write_client().await.is_err() {
                rec.termination = ['C', 'D'];
                finish(rec, start, self.fe);
                return Next::Close;
            }
            finish(rec, start, self.fe);
            let mut early = std::mem::take(&mut self.rbuf).to_vec();
            if !early.is_empty() && write_out(&mut server.io, &mut early).await.is_err() {
                return Next::Close;
            }
            let idle = pool
                .timeout_tunnel
                .or(self.fe.ctx.timeout_tunnel)
                .unwrap_or(tunnel::DEFAULT_TIMEOUT_TUNNEL);
            let _active = active;
            match tunnel::splice(&mut self.io, &mut server.io, idle).await {
                Ok((up, down)) => tracing::debug!(up, down, "tunnel closed"),
                Err(e) => tracing::debug!(error = %e, "tunnel ended"),
            }
            return Next::Close;
        }
        // --- framing toward the client ---
        let body = resp.body;
        let http10 = client_version == Version::HTTP_10;
        let (dechunk, close) = match body {
            BodyKind::Fixed(_) => (false, !keep_alive),
            // An HTTP/1.0 client cannot read chunks: data only, to the close.
            BodyKind::Chunked if http10 => (true, true),
            BodyKind::Chunked => (false, !keep_alive),
            BodyKind::Close => (false, true),
        };
        let connection: &[(&str, &str)] = if close {
            &[("connection", "close")]
        } else if http10 {
            &[("connection", "keep-alive")]
        } else {
            &[]
        };
        put_head(
            &mut self.out,
            body == BodyKind::Chunked && !dechunk,
            connection,
        );
        let server_keep_alive = resp.keep_alive;
        self.spans = resp.into_fields();
        if close && matches!(body, BodyKind::Fixed(n) if server.buf.len() as u64 >= n) {
            // The whole answer is in hand and the connection closes after it.
            self.io.hold_for_fin();
        }
        let relayed = relay(
            End {
                io: &mut server.io,
                limit: pool.timeout_server,
            },
            &mut server.buf,
            End {
                io: &mut self.io,
                limit: self.fe.timeouts.client,
            },
            &mut self.out,
            body,
            dechunk,
            &mut self.timer,
        )
        .await;
        let next = match relayed {
            Ok(bytes) => {
                rec.bytes = bytes;
                if close {
                    self.shut_down().await;
                }
                if server_keep_alive && body_sent && body != BodyKind::Close {
                    pool.conns.put_raw(addr, server);
                }
                if close { Next::Close } else { Next::KeepAlive }
            }
            Err(fail) => {
                self.out.clear();
                rec.termination = match fail {
                    Fail::Read => ['S', 'D'],
                    Fail::ReadTimeout => ['s', 'D'],
                    Fail::Write => ['C', 'D'],
                    Fail::WriteTimeout => ['c', 'D'],
                    Fail::Framing => ['P', 'D'],
                };
                Next::Close
            }
        };
        drop(active);
        finish(rec, start, self.fe);
        next
    }
}

/// What `respond` needs of the exchange.
struct ResponseCtx {
    server: RawConn,
    addr: SocketAddr,
    pool: usize,
    active: super::balance::Active,
    rec: AccessRecord,
    response_ops: Vec<actions::HeaderOp>,
    upgrade: Option<HeaderValue>,
    /// The `Sec-WebSocket-Accept` a `101` must carry.
    ws_accept: Option<HeaderValue>,
    /// The client connection may stay open (as far as the request goes).
    keep_alive: bool,
    /// The whole request went to the server: only then may its connection
    /// be reused (an unsent rest would be read as the next client's request).
    body_sent: bool,
    client_version: Version,
    start: Instant,
}

/// Completes and emits a request's access log record.
fn finish(rec: AccessRecord, start: Instant, fe: &FrontendRuntime) {
    rec.finish(start.elapsed(), fe.ctx.log_format);
}
