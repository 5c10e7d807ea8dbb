//! Moving bytes with time limits: a lazy timer for one wait at a time, and
//! the relay that copies a message body from one stream to another by its
//! framing (Content-Length, chunked, or up to the close).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::io::poll_read_buf;

use super::codec::BodyKind;
use crate::deadline::Deadline;
use crate::error::Failure;
use crate::hardening::{self, Chunk};

/// Bytes asked of a stream per read.
pub(super) const READ_SIZE: usize = 16 * 1024;
/// Bytes asked per read for the rest of a long body of known length: a
/// 64 KiB response then takes two reads and two writes instead of five of
/// each (the buffer is released after the body, see `relay`).
const LONG_READ_SIZE: usize = 64 * 1024;
/// Longest message whose head waits for the rest of its body (of known
/// length, already received) so that both leave in one write: each write
/// is a trip through the TCP stack and a wake-up of the reader.
const GATHER: u64 = 128 * 1024;
/// Capacity an output buffer keeps after a big body went through it.
const KEEP_CAPACITY: usize = 64 * 1024;

/// Reads more into `buf`: Ok(0) at end of stream.
pub(super) async fn read_more<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut BytesMut,
) -> io::Result<usize> {
    buf.reserve(READ_SIZE);
    poll_fn(|cx| poll_read_buf(Pin::new(&mut *io), cx, buf)).await
}

/// Writes all of `bytes` (advancing it) and flushes (TLS streams buffer):
/// a plain function for `poll_fn`, inlined where it is polled (tokio's
/// `write_all` then `flush`, or an async fn around them, are futures of
/// their own, which stopped being inlined once a second caller used them).
#[inline]
fn poll_write_all<W: AsyncWrite + Unpin>(
    io: &mut W,
    cx: &mut Context<'_>,
    bytes: &mut &[u8],
) -> Poll<io::Result<()>> {
    while !bytes.is_empty() {
        let n = ready!(Pin::new(&mut *io).poll_write(cx, bytes))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        *bytes = &bytes[n..];
    }
    Pin::new(&mut *io).poll_flush(cx)
}

/// Writes all of `a` then all of `b` (advancing them) in vectored writes,
/// and flushes.
#[inline]
fn poll_write_both<W: AsyncWrite + Unpin>(
    io: &mut W,
    cx: &mut Context<'_>,
    a: &mut &[u8],
    b: &mut &[u8],
) -> Poll<io::Result<()>> {
    while !a.is_empty() && !b.is_empty() {
        let slices = [io::IoSlice::new(a), io::IoSlice::new(b)];
        let mut n = ready!(Pin::new(&mut *io).poll_write_vectored(cx, &slices))?;
        if n == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        let from_a = n.min(a.len());
        *a = &a[from_a..];
        n -= from_a;
        *b = &b[n..];
    }
    if a.is_empty() {
        poll_write_all(io, cx, b)
    } else {
        poll_write_all(io, cx, a)
    }
}

/// Writes all of `out` and flushes (TLS streams buffer), then empties it.
pub(super) async fn write_out<W: AsyncWrite + Unpin>(
    io: &mut W,
    out: &mut Vec<u8>,
) -> io::Result<()> {
    let mut bytes = &out[..];
    poll_fn(|cx| poll_write_all(io, cx, &mut bytes)).await?;
    out.clear();
    Ok(())
}

/// Writes all of `a`, then all of `b`, in vectored writes, and flushes: a
/// head and the body behind it, without copying one after the other.
pub(super) async fn write_both<W: AsyncWrite + Unpin>(
    io: &mut W,
    mut a: &[u8],
    mut b: &[u8],
) -> io::Result<()> {
    poll_fn(|cx| poll_write_both(io, cx, &mut a, &mut b)).await
}

/// Why a body could not be relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Fail {
    /// The source closed or failed before the body's end.
    Read,
    /// Nothing came from the source in time.
    ReadTimeout,
    /// Writing to the destination failed.
    Write,
    /// The destination did not take the bytes in time.
    WriteTimeout,
    /// Broken chunk framing.
    Framing,
}

impl Fail {
    /// What failed when relaying a request body, client to server.
    pub(super) fn in_request(self) -> Failure {
        match self {
            Fail::Read => Failure::ClientAborted,
            Fail::ReadTimeout => Failure::ClientTimeout,
            Fail::Write => Failure::ServerClosed,
            Fail::WriteTimeout => Failure::ServerTimeout,
            Fail::Framing => Failure::BadBodyFraming,
        }
    }

    /// What failed when relaying a response body, server to client.
    pub(super) fn in_response(self) -> Failure {
        match self {
            Fail::Read => Failure::ServerAborted,
            Fail::ReadTimeout => Failure::ServerDataTimeout,
            Fail::Write => Failure::ClientAborted,
            Fail::WriteTimeout => Failure::ClientTimeout,
            Fail::Framing => Failure::BadResponseFraming,
        }
    }
}

/// One side of a relay: a stream, the bytes read ahead from it, and how long
/// a wait on it may take.
pub(super) struct End<'a, S> {
    pub io: &'a mut S,
    pub limit: Duration,
}

/// The body a relay copies: its framing, whether chunks are unwrapped, and
/// where the payload bytes written so far are counted (read by a caller
/// whose relay was dropped midway: a hard stop still logs them).
pub(super) struct Message<'a> {
    pub body: BodyKind,
    pub dechunk: bool,
    pub written: &'a AtomicU64,
    /// A request's body: its trailers are checked as a request's
    /// (`trailers::request_trailer_allowed`).
    pub request: bool,
}

impl<'a> Message<'a> {
    /// A body framed by `body`, unwrapped if `dechunk`, counted in `written`.
    pub fn new(body: BodyKind, dechunk: bool, written: &'a AtomicU64) -> Self {
        Message {
            body,
            dechunk,
            written,
            request: false,
        }
    }
}

/// Where a body's relay stands, by its framing.
struct Progress {
    body: BodyKind,
    dechunk: bool,
    /// Which trailer fields the body may carry.
    trailer_ok: fn(&[u8]) -> bool,
    /// Bytes of a `Fixed` body not yet taken.
    left: u64,
    chunk: Chunk,
    payload: u64,
    /// The head may wait for the rest of a short body that is already here.
    may_hold: bool,
}

/// What one pass over the bytes read ahead leaves to do.
struct Step {
    done: bool,
    /// Body bytes written straight from `buf` (after `out`, the head, if it
    /// is still there), without copying them into `out`.
    direct: usize,
    /// Body bytes waiting in `buf` for the rest, behind a held head.
    held: usize,
}

impl Progress {
    /// Takes the body bytes in `buf`: chunk framing and bodies up to the
    /// close are copied into `out`, a `Fixed` body's are left in `buf`.
    fn take(&mut self, buf: &mut BytesMut, out: &mut Vec<u8>) -> Result<Step, Fail> {
        let (mut direct, mut held) = (0, 0);
        let done = match self.body {
            BodyKind::Fixed(_) => {
                let take = self.left.min(buf.len() as u64) as usize;
                if self.may_hold
                    && !out.is_empty()
                    && (take as u64) < self.left
                    && holds(out, self.left)
                {
                    held = take;
                    false
                } else {
                    direct = take;
                    self.left -= take as u64;
                    self.payload += take as u64;
                    self.left == 0
                }
            }
            BodyKind::Chunked => {
                let (dechunk, payload) = (self.dechunk, &mut self.payload);
                let on_data = |d: &[u8]| {
                    *payload += d.len() as u64;
                    if dechunk {
                        out.extend_from_slice(d);
                    }
                };
                let (used, next) =
                    hardening::scan_chunked_with(self.chunk, buf, on_data, self.trailer_ok)
                        .map_err(|()| Fail::Framing)?;
                if !dechunk {
                    out.extend_from_slice(&buf[..used]);
                }
                buf.advance(used);
                self.chunk = next;
                next == Chunk::Done
            }
            BodyKind::Close => {
                self.payload += buf.len() as u64;
                out.extend_from_slice(buf);
                buf.clear();
                false
            }
        };
        Ok(Step { done, direct, held })
    }

    /// How much the next read asks for, and whether that is a long read.
    fn read_size(&self, buffered: usize, held: usize) -> (usize, bool) {
        let rest = self.left - held as u64;
        if buffered == held && rest > READ_SIZE as u64 {
            // One byte more than the rest: the read that takes it all then
            // comes back short, which tells tokio the socket is drained (a
            // full one would cost an EAGAIN read when the connection is
            // next checked, `RawConn::alive`).
            ((rest + 1).min(LONG_READ_SIZE as u64) as usize, true)
        } else {
            (READ_SIZE, false)
        }
    }
}

/// Copies one message body from `src` (starting with `buf`, its bytes read
/// ahead) to `dst`, after whatever `out` already holds (the head, so that a
/// small message leaves in one write). `dechunk` writes chunk data only.
/// Returns the body's payload bytes. On failure `out` is left non-empty
/// only if nothing of the message was written (the head is still there).
pub(super) async fn relay<R, W>(
    src: End<'_, R>,
    buf: &mut BytesMut,
    dst: End<'_, W>,
    out: &mut Vec<u8>,
    msg: Message<'_>,
    timer: &mut Deadline,
) -> Result<u64, Fail>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let Message {
        body,
        dechunk,
        written: counted,
        request,
    } = msg;
    let left = match body {
        BodyKind::Fixed(n) => n,
        _ => 0,
    };
    let mut p = Progress {
        body,
        dechunk,
        trailer_ok: if request {
            crate::trailers::request_trailer_allowed
        } else {
            |_| true
        },
        left,
        chunk: Chunk::Size,
        payload: 0,
        may_hold: true,
    };
    // A long read made `buf` big: it is released at the end.
    let mut grown = false;
    // Something of the message (its head first) has been written.
    let mut written = false;
    loop {
        let Step { done, direct, held } = match p.take(buf, out) {
            Ok(step) => step,
            Err(fail) => {
                if written {
                    out.clear();
                }
                return Err(fail);
            }
        };
        // Pending bytes go out before waiting for more, so the body flows.
        if done || direct > 0 || (!out.is_empty() && held == 0) {
            let (mut head, mut bytes) = (&out[..], &buf[..direct]);
            let write = poll_fn(|cx| poll_write_both(dst.io, cx, &mut head, &mut bytes));
            match timer.limit(dst.limit, write).await {
                Some(Ok(())) => {
                    buf.advance(direct);
                    out.clear();
                    written = true;
                    counted.store(p.payload, Ordering::Relaxed);
                }
                Some(Err(_)) => return Err(Fail::Write),
                None => return Err(Fail::WriteTimeout),
            }
        }
        if done {
            return Ok(release(buf, grown, p.payload));
        }
        let (size, long) = p.read_size(buf.len(), held);
        grown |= long;
        buf.reserve(size);
        let mut read = |cx: &mut Context<'_>| poll_read_buf(Pin::new(&mut *src.io), cx, buf);
        let got = if held > 0 {
            // A held head waits for nothing that is not here yet.
            match poll_fn(|cx| Poll::Ready(read(cx))).await {
                Poll::Ready(got) => Some(got),
                Poll::Pending => {
                    p.may_hold = false;
                    continue;
                }
            }
        } else {
            timer.limit(src.limit, poll_fn(read)).await
        };
        match got {
            Some(Ok(0)) if body == BodyKind::Close => return Ok(release(buf, grown, p.payload)),
            Some(Ok(0)) | Some(Err(_)) => return Err(Fail::Read),
            Some(Ok(_)) => {}
            None => return Err(Fail::ReadTimeout),
        }
        if out.capacity() > KEEP_CAPACITY && out.is_empty() {
            // A big body passed: give the memory back.
            out.shrink_to(KEEP_CAPACITY);
        }
    }
}

/// Whether a head in `out` may wait for the `left` bytes of its body.
fn holds(out: &[u8], left: u64) -> bool {
    out.len() as u64 + left <= GATHER
}

/// After a relayed body: a buffer a long read made big is not kept with an
/// idle connection (nor among the spares), the next read allocates a usual
/// one. Passes `payload` through.
fn release(buf: &mut BytesMut, grown: bool, payload: u64) -> u64 {
    if grown && buf.is_empty() {
        *buf = BytesMut::new();
    }
    payload
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Relays `input` (all read ahead, then end of stream) as `body`; the
    /// bytes written out and the result.
    async fn run(input: &[u8], body: BodyKind, dechunk: bool) -> (Vec<u8>, Result<u64, Fail>) {
        let (mut src, _src_peer) = tokio::io::duplex(64);
        drop(_src_peer);
        let mut buf = BytesMut::from(input);
        relay_from(&mut src, &mut buf, body, dechunk).await
    }

    /// Relays `body` from `src`, `buf` holding what was read ahead; the
    /// bytes written out (after a pretend head) and the result.
    async fn relay_from(
        src: &mut tokio::io::DuplexStream,
        buf: &mut BytesMut,
        body: BodyKind,
        dechunk: bool,
    ) -> (Vec<u8>, Result<u64, Fail>) {
        let (mut dst, mut dst_peer) = tokio::io::duplex(1 << 18);
        let mut out = b"HEAD|".to_vec();
        let limit = Duration::from_secs(5);
        let writer = tokio::spawn(async move {
            let mut written = Vec::new();
            dst_peer.read_to_end(&mut written).await.unwrap();
            written
        });
        let r = relay(
            End { io: src, limit },
            buf,
            End {
                io: &mut dst,
                limit,
            },
            &mut out,
            Message {
                body,
                dechunk,
                written: &AtomicU64::new(0),
                request: false,
            },
            &mut Deadline::new(),
        )
        .await;
        drop(dst);
        (writer.await.unwrap(), r)
    }

    #[tokio::test]
    async fn bodies_by_their_framing() {
        // Fixed: exactly its length, the rest (next message) stays unread.
        let (w, r) = run(b"abcdeNEXT", BodyKind::Fixed(5), false).await;
        assert_eq!((w.as_slice(), r), (&b"HEAD|abcde"[..], Ok(5)));
        // Chunked, passed as is, or dechunked; trailers end it.
        let chunked = b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\nT: 1\r\n\r\n";
        let (w, r) = run(chunked, BodyKind::Chunked, false).await;
        assert_eq!(w, [&b"HEAD|"[..], &chunked[..]].concat());
        assert_eq!(r, Ok(5));
        let (w, r) = run(chunked, BodyKind::Chunked, true).await;
        assert_eq!((w.as_slice(), r), (&b"HEAD|abcde"[..], Ok(5)));
        // Up to the close.
        let (w, r) = run(b"all of it", BodyKind::Close, false).await;
        assert_eq!((w.as_slice(), r), (&b"HEAD|all of it"[..], Ok(9)));
    }

    #[tokio::test]
    async fn a_long_body_is_read_in_big_reads_whose_buffer_is_released() {
        let body: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let (mut src, mut src_peer) = tokio::io::duplex(1 << 18);
        src_peer.write_all(&body).await.unwrap();
        let mut buf = BytesMut::new();
        let kind = BodyKind::Fixed(body.len() as u64);
        let (written, r) = relay_from(&mut src, &mut buf, kind, false).await;
        assert_eq!(r, Ok(body.len() as u64));
        assert_eq!(buf.capacity(), 0, "the long read's buffer is not kept");
        assert_eq!(written, [&b"HEAD|"[..], &body].concat());
    }

    /// A destination that records each write call's bytes.
    #[derive(Clone, Default)]
    struct Writes(std::sync::Arc<std::sync::Mutex<Vec<Vec<u8>>>>);

    impl Writes {
        fn calls(&self) -> Vec<Vec<u8>> {
            self.0.lock().unwrap().clone()
        }
    }

    impl AsyncWrite for Writes {
        fn poll_write(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            b: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.0.lock().unwrap().push(b.to_vec());
            Poll::Ready(Ok(b.len()))
        }
        fn poll_write_vectored(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            bufs: &[io::IoSlice<'_>],
        ) -> Poll<io::Result<usize>> {
            let all: Vec<u8> = bufs.iter().flat_map(|b| b.iter().copied()).collect();
            let n = all.len();
            self.0.lock().unwrap().push(all);
            Poll::Ready(Ok(n))
        }
        fn is_write_vectored(&self) -> bool {
            true
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// Relays a `Fixed(len)` body from `src` after `buf` into `dst`.
    async fn relay_fixed(
        src: &mut tokio::io::DuplexStream,
        mut buf: BytesMut,
        len: u64,
        mut dst: Writes,
    ) -> Result<u64, Fail> {
        let limit = Duration::from_secs(5);
        let mut out = b"HEAD|".to_vec();
        let (src, dst) = (
            End { io: src, limit },
            End {
                io: &mut dst,
                limit,
            },
        );
        let kind = BodyKind::Fixed(len);
        relay(
            src,
            &mut buf,
            dst,
            &mut out,
            Message {
                body: kind,
                dechunk: false,
                written: &AtomicU64::new(0),
                request: false,
            },
            &mut Deadline::new(),
        )
        .await
    }

    #[tokio::test]
    async fn a_short_body_already_here_leaves_with_its_head_in_one_write() {
        let body: Vec<u8> = (0..70_000u32).map(|i| i as u8).collect();
        let (mut src, mut src_peer) = tokio::io::duplex(1 << 18);
        src_peer.write_all(&body[1000..]).await.unwrap();
        let dst = Writes::default();
        let buf = BytesMut::from(&body[..1000]);
        let r = relay_fixed(&mut src, buf, body.len() as u64, dst.clone()).await;
        assert_eq!(r, Ok(body.len() as u64));
        assert_eq!(dst.calls(), vec![[&b"HEAD|"[..], &body].concat()]);
    }

    #[tokio::test]
    async fn a_head_does_not_wait_for_body_bytes_still_on_the_way() {
        let (mut src, mut src_peer) = tokio::io::duplex(1 << 18);
        let dst = Writes::default();
        let (task_dst, buf) = (dst.clone(), BytesMut::from(&b"abc"[..]));
        let task = tokio::spawn(async move { relay_fixed(&mut src, buf, 6, task_dst).await });
        // The head and the bytes at hand leave while the rest is awaited.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while dst.calls().is_empty() {
            assert!(tokio::time::Instant::now() < deadline, "the head was held");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        assert_eq!(dst.calls(), vec![b"HEAD|abc".to_vec()]);
        src_peer.write_all(b"def").await.unwrap();
        assert_eq!(task.await.unwrap(), Ok(6));
        assert_eq!(dst.calls(), vec![b"HEAD|abc".to_vec(), b"def".to_vec()]);
        // Too long a message is not held either, even when it is all here.
        let (mut src, mut src_peer) = tokio::io::duplex(1 << 20);
        let body = vec![7u8; GATHER as usize];
        src_peer.write_all(&body[1..]).await.unwrap();
        let dst = Writes::default();
        let buf = BytesMut::from(&body[..1]);
        let r = relay_fixed(&mut src, buf, GATHER, dst.clone()).await;
        assert_eq!(r, Ok(GATHER));
        assert_eq!(dst.calls()[0], b"HEAD|\x07".to_vec());
    }

    #[tokio::test]
    async fn out_keeps_the_head_on_failure_only_if_nothing_was_written() {
        let limit = Duration::from_secs(5);
        for (ahead, later, head_kept) in [
            (&b"ZZ\r\n"[..], &b""[..], true),
            // Dechunking, "de" is taken into `out` before the bad size.
            (&b"3\r\nabc\r\n"[..], &b"2\r\nde\r\nZZ\r\n"[..], false),
        ] {
            let (mut src, mut src_peer) = tokio::io::duplex(1 << 16);
            src_peer.write_all(later).await.unwrap();
            let (mut dst, mut out) = (Writes::default(), b"HEAD|".to_vec());
            let mut buf = BytesMut::from(ahead);
            let (src, dst) = (
                End {
                    io: &mut src,
                    limit,
                },
                End {
                    io: &mut dst,
                    limit,
                },
            );
            let kind = BodyKind::Chunked;
            let r = relay(
                src,
                &mut buf,
                dst,
                &mut out,
                Message {
                    body: kind,
                    dechunk: true,
                    written: &AtomicU64::new(0),
                    request: false,
                },
                &mut Deadline::new(),
            )
            .await;
            assert_eq!(r, Err(Fail::Framing));
            assert_eq!(!out.is_empty(), head_kept, "{ahead:?} then {later:?}");
        }
    }

    #[tokio::test]
    async fn short_and_broken_bodies_fail() {
        assert_eq!(
            run(b"abc", BodyKind::Fixed(5), false).await.1,
            Err(Fail::Read)
        );
        assert_eq!(
            run(b"3\r\nab", BodyKind::Chunked, false).await.1,
            Err(Fail::Read)
        );
        let broken = run(b"3\r\nabcX\r\n", BodyKind::Chunked, false).await;
        assert_eq!(broken.1, Err(Fail::Framing));
    }
}
