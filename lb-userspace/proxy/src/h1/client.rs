//! Our HTTP/1.1 client on hyper's path. A request of an HTTP/2 client (or
//! of an HTTP/1 client that hyper serves) to a server of an HTTP/1.1 pool
//! goes out on the raw connections, and through the codec, of our HTTP/1
//! path: answers are parsed as strictly on both paths, a server has one
//! idle list, and an HTTP/2 request costs a fifth fewer instructions
//! (hyper's client, with its dispatcher, channel and oneshot per request,
//! was a quarter of one). A request whose body is still streaming, and an
//! upgrade, keep hyper's client (`forward`).

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use http::header::{HeaderMap, HeaderName, HeaderValue};
use http::{StatusCode, request};
use hyper::body::{Body, Frame, SizeHint};
use tokio::time::Instant;
use tokio_util::io::poll_read_buf;

pub(crate) use super::codec::ResponseHead;
use super::codec::{self, BodyKind, Span};
use super::relay::{READ_SIZE, read_more, write_both};
use crate::connpool::{ConnPool, RawConn};
use crate::deadline::Deadline;
use crate::error::Failure;
use crate::hardening::{self, Chunk};
use crate::upstream::ServerIo;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Writes a request, its whole `body` after its head, on `conn`, and reads
/// the response head by `due` (interim 1xx answers skipped; a 101 is
/// returned, for the caller to refuse). `ServerClosed` when the connection
/// turns out closed before any byte of an answer (a kept one whose
/// keep-alive ended), as on our HTTP/1 path.
pub(crate) async fn exchange(
    conn: &mut RawConn,
    parts: &request::Parts,
    body: &[u8],
    due: Instant,
) -> Result<ResponseHead, Failure> {
    let mut head = Vec::new();
    codec::put_request(&mut head, parts, BodyKind::Fixed(body.len() as u64));
    let RawConn { io, buf, timer } = conn;
    let timer = timer.get_or_insert_with(Deadline::new);
    let wait = due.saturating_duration_since(Instant::now());
    match timer.limit(wait, write_both(io, &head, body)).await {
        Some(Ok(())) => {}
        Some(Err(_)) => return Err(Failure::ServerClosed),
        None => return Err(Failure::ServerTimeout),
    }
    response_head(io, buf, &mut Vec::new(), &parts.method, due, timer, false).await
}

/// Reads a server's response head off `io` (`buf` holding what was read
/// ahead) by `due`, skipping interim 1xx answers (but 101, which starts a
/// tunnel; and but those other than 100 when `interim`, for the caller to
/// relay). A connection that ends before any byte of it is `ServerClosed`
/// (a kept one whose keep-alive ended). Both HTTP/1 clients read heads so.
pub(super) async fn response_head(
    io: &mut ServerIo,
    buf: &mut BytesMut,
    spans: &mut Vec<Span>,
    method: &http::Method,
    due: Instant,
    timer: &mut Deadline,
    interim: bool,
) -> Result<ResponseHead, Failure> {
    loop {
        match codec::take_response(buf, spans, method) {
            Ok(Some(r))
                if r.status.is_informational()
                    && r.status != StatusCode::SWITCHING_PROTOCOLS
                    && !(interim && r.status != StatusCode::CONTINUE) =>
            {
                *spans = r.into_fields();
                continue;
            }
            Ok(Some(r)) => return Ok(r),
            Ok(None) => {}
            Err(why) => {
                tracing::debug!(reason = why, "bad response head");
                return Err(Failure::BadResponse);
            }
        }
        let wait = due.saturating_duration_since(Instant::now());
        match timer.limit(wait, read_more(io, buf)).await {
            Some(Ok(n)) if n > 0 => {}
            Some(_) if buf.is_empty() => return Err(Failure::ServerClosed),
            Some(_) => return Err(Failure::BadResponse),
            None => return Err(Failure::ServerTimeout),
        }
    }
}

/// The response's header map for hyper, hop-by-hop fields left out; each
/// value has bytes of its own (not a slice of the connection's read
/// buffer, which HTTP/2's HPACK table would keep alive with the values it
/// indexes).
pub(crate) fn headers(resp: &ResponseHead) -> Result<HeaderMap, &'static str> {
    let mut headers = HeaderMap::with_capacity(resp.field_count());
    for (name, value) in resp.fields() {
        let name = HeaderName::from_bytes(name).map_err(|_| "bad header name")?;
        let value = HeaderValue::from_bytes(value).map_err(|_| "bad header value")?;
        headers.append(name, value);
    }
    crate::prepare::strip_hop_by_hop(&mut headers);
    // One value, as parsed (`Content-Length: 2, 2` is allowed, and agreed).
    if let Some(n) = resp.length {
        headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(n));
    }
    Ok(headers)
}

/// Where a response body's connection goes once the body has ended cleanly.
pub(crate) struct GiveBack {
    pub pool: Arc<ConnPool>,
    pub server: SocketAddr,
    /// The server keeps the connection after this exchange.
    pub keep_alive: bool,
}

impl GiveBack {
    fn give(self, conn: RawConn) {
        if self.keep_alive {
            self.pool.put_raw(self.server, conn);
        }
    }
}

/// A response body read off a raw server connection by its framing, as
/// data frames (chunked bodies decoded); the connection goes back to its
/// pool when the body has ended cleanly, and is closed with the body
/// otherwise. Timeouts are the caller's (`LoggedBody`'s `timeout_server`).
pub(crate) struct RawBody {
    /// None once the body has ended.
    conn: Option<RawConn>,
    kind: BodyKind,
    /// Bytes of a `Fixed` body not yet handed out.
    left: u64,
    chunk: Chunk,
    back: Option<GiveBack>,
}

/// A response body as `RawBody::of` finds it.
pub(crate) enum ResponseBody {
    /// All of it is in hand already (none, or a short one read with its
    /// head); the connection has been given back.
    InHand(Bytes),
    /// The rest is read as the client takes it.
    Read(RawBody),
}

impl RawBody {
    /// The body of `resp`, whose head was read off `conn`.
    pub(crate) fn of(mut conn: RawConn, resp: &ResponseHead, back: GiveBack) -> ResponseBody {
        if let BodyKind::Fixed(n) = resp.body
            && n <= conn.buf.len() as u64
        {
            let bytes = conn.buf.split_to(n as usize).freeze();
            // Bytes read past the answer: the server sent something
            // unasked, and the connection is not reused.
            if conn.buf.is_empty() {
                back.give(conn);
            }
            return ResponseBody::InHand(bytes);
        }
        ResponseBody::Read(RawBody {
            left: match resp.body {
                BodyKind::Fixed(n) => n,
                _ => 0,
            },
            conn: Some(conn),
            kind: resp.body,
            chunk: Chunk::Size,
            back: Some(back),
        })
    }

    /// The body ended cleanly: its connection goes back to the pool.
    fn end(&mut self) {
        if let (Some(conn), Some(back)) = (self.conn.take(), self.back.take()) {
            back.give(conn);
        }
    }

    /// The next frame from the bytes at hand, if they make one.
    fn take(&mut self) -> Result<Option<Bytes>, BoxError> {
        let Some(conn) = self.conn.as_mut() else {
            return Ok(None);
        };
        let buf = &mut conn.buf;
        match self.kind {
            BodyKind::Fixed(_) => {
                let n = self.left.min(buf.len() as u64) as usize;
                if n == 0 {
                    return Ok(None);
                }
                self.left -= n as u64;
                let data = buf.split_to(n).freeze();
                if self.left == 0 {
                    self.end();
                }
                Ok(Some(data))
            }
            BodyKind::Chunked => {
                let mut data = BytesMut::new();
                let (used, next) =
                    hardening::scan_chunked_data(self.chunk, buf, |d| data.extend_from_slice(d))
                        .map_err(|()| "bad chunked framing from the server")?;
                bytes::Buf::advance(buf, used);
                self.chunk = next;
                if next == Chunk::Done {
                    self.end();
                }
                Ok((!data.is_empty()).then(|| data.freeze()))
            }
            BodyKind::Close => Ok((!buf.is_empty()).then(|| buf.split().freeze())),
        }
    }
}

impl Body for RawBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        loop {
            match self.take() {
                Ok(Some(data)) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(None) => {}
                Err(e) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e)));
                }
            }
            let kind = self.kind;
            let Some(conn) = self.conn.as_mut() else {
                return Poll::Ready(None);
            };
            conn.buf.reserve(READ_SIZE);
            match poll_read_buf(Pin::new(&mut conn.io), cx, &mut conn.buf) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Ok(0)) if kind == BodyKind::Close => {
                    self.conn = None;
                    return Poll::Ready(None);
                }
                Poll::Ready(Ok(0)) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err("the server closed inside the body".into())));
                }
                Poll::Ready(Ok(_)) => {}
                Poll::Ready(Err(e)) => {
                    self.conn = None;
                    return Poll::Ready(Some(Err(e.into())));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.conn.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        match self.kind {
            BodyKind::Fixed(_) => SizeHint::with_exact(self.left),
            _ => SizeHint::default(),
        }
    }
}
