//! Moving bytes with time limits: a lazy timer for one wait at a time, and
//! the relay that copies a message body from one stream to another by its
//! framing (Content-Length, chunked, or up to the close).

use std::future::poll_fn;
use std::io;
use std::pin::Pin;
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
            Fail::Framing => Failure::BadBodyFraming,
        }
    }
}

/// One side of a relay: a stream, the bytes read ahead from it, and how long
/// a wait on it may take.
pub(super) struct End<'a, S> {
    pub io: &'a mut S,
    pub limit: Duration,
}

/// Copies one message body from `src` (starting with `buf`, its bytes read
/// ahead) to `dst`, after whatever `out` already holds (the head, so that a
/// small message leaves in one write). `dechunk` writes chunk data only.
/// Returns the body's payload bytes.
pub(super) async fn relay<R, W>(
    src: End<'_, R>,
    buf: &mut BytesMut,
    dst: End<'_, W>,
    out: &mut Vec<u8>,
    body: BodyKind,
    dechunk: bool,
    timer: &mut Deadline,
) -> Result<u64, Fail>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut left = match body {
        BodyKind::Fixed(n) => n,
        _ => 0,
    };
    let mut chunk = Chunk::Size;
    let mut payload = 0u64;
    // A long read made `buf` big: it is released at the end.
    let mut grown = false;
    loop {
        // Body bytes written straight from `buf` (once `out` is empty: the
        // head left with the first ones), without copying them into `out`.
        let mut direct = 0;
        let done = match body {
            BodyKind::Fixed(_) => {
                let take = left.min(buf.len() as u64) as usize;
                if out.is_empty() {
                    direct = take;
                } else {
                    out.extend_from_slice(&buf[..take]);
                    buf.advance(take);
                }
                left -= take as u64;
                payload += take as u64;
                left == 0
            }
            BodyKind::Chunked => {
                let (used, next) = hardening::scan_chunked_data(chunk, buf, |d| {
                    payload += d.len() as u64;
                    if dechunk {
                        out.extend_from_slice(d);
                    }
                })
                .map_err(|()| Fail::Framing)?;
                if !dechunk {
                    out.extend_from_slice(&buf[..used]);
                }
                buf.advance(used);
                chunk = next;
                chunk == Chunk::Done
            }
            BodyKind::Close => {
                payload += buf.len() as u64;
                out.extend_from_slice(buf);
                buf.clear();
                false
            }
        };
        // Pending bytes go out before waiting for more, so the body flows.
        if done || direct > 0 || !out.is_empty() {
            let mut bytes = if direct > 0 { &buf[..direct] } else { &out[..] };
            let write = poll_fn(|cx| poll_write_all(dst.io, cx, &mut bytes));
            match timer.limit(dst.limit, write).await {
                Some(Ok(())) if direct > 0 => buf.advance(direct),
                Some(Ok(())) => out.clear(),
                Some(Err(_)) => return Err(Fail::Write),
                None => return Err(Fail::WriteTimeout),
            }
        }
        if done {
            return Ok(release(buf, grown, payload));
        }
        let size = if buf.is_empty() && left > READ_SIZE as u64 {
            grown = true;
            // One byte more than the rest: the read that takes it all then
            // comes back short, which tells tokio the socket is drained (a
            // full one would cost an EAGAIN read when the connection is
            // next checked, `RawConn::alive`).
            (left + 1).min(LONG_READ_SIZE as u64) as usize
        } else {
            READ_SIZE
        };
        buf.reserve(size);
        let read = poll_fn(|cx| poll_read_buf(Pin::new(&mut *src.io), cx, buf));
        match timer.limit(src.limit, read).await {
            Some(Ok(0)) if body == BodyKind::Close => return Ok(release(buf, grown, payload)),
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
            body,
            dechunk,
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
