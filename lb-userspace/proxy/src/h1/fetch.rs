//! One HTTP/1.1 request and its answer, read with the proxy's own codec: the
//! agent's HTTP health checks use it, so a server's answer is judged the way
//! the proxy would parse it (strict head, framing checks, chunked bodies).

use std::io;
use std::pin::Pin;
use std::sync::atomic::AtomicU64;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::BytesMut;
use http::{Method, StatusCode};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

use super::codec::{self, BodyKind};
use super::relay::{End, Fail, Message, read_more, relay};
use crate::deadline::Deadline;

/// A server's answer; its body decoded from its framing, cut at the limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fetched {
    /// The final status (interim 1xx answers are skipped).
    pub status: StatusCode,
    /// The body's payload, at most the limit asked for.
    pub body: Vec<u8>,
}

/// Why no answer could be read.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// The server closed the connection before any byte of an answer.
    #[error("connection closed without a response")]
    Closed,
    /// The answer is malformed, or ended inside its head or body.
    #[error("bad response: {0}")]
    Bad(&'static str),
    /// The method is not a valid token.
    #[error("invalid request method")]
    Method,
    /// Reading or writing failed.
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Writes `request` (a whole HTTP/1.1 request, with `method`) to `io` and reads
/// the answer; with `body_limit` > 0 also its body, keeping at most that many
/// bytes. Unbounded in time: the caller bounds the exchange.
pub async fn fetch<S>(
    io: &mut S,
    request: &[u8],
    method: &str,
    body_limit: usize,
) -> Result<Fetched, FetchError>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    // The answer to HEAD has no body, whatever its framing says.
    let method = Method::from_bytes(method.as_bytes()).map_err(|_| FetchError::Method)?;
    io.write_all(request).await?;
    io.flush().await?;
    let mut buf = BytesMut::new();
    let mut spans = Vec::new();
    let head = loop {
        // take_response refuses a head longer than RESPONSE_HEAD_LIMIT.
        match codec::take_response(&mut buf, &mut spans, &method).map_err(FetchError::Bad)? {
            Some(r) if r.status.is_informational() => spans = r.into_fields(),
            Some(r) => break r,
            None if read_more(io, &mut buf).await? > 0 => {}
            None if buf.is_empty() => return Err(FetchError::Closed),
            None => return Err(FetchError::Bad("the connection ended inside the head")),
        }
    };
    let mut body = Capped {
        kept: Vec::new(),
        limit: body_limit,
    };
    if body_limit > 0 && head.body != BodyKind::Fixed(0) {
        // No deadline of its own: the caller's bounds the whole exchange.
        let forever = Duration::from_secs(24 * 3600);
        let relayed = relay(
            End { io, limit: forever },
            &mut buf,
            End {
                io: &mut body,
                limit: forever,
            },
            &mut Vec::new(),
            Message {
                body: head.body,
                dechunk: true,
                written: &AtomicU64::new(0),
                request: false,
            },
            &mut Deadline::new(),
        )
        .await;
        match relayed {
            // Full: the rest is not looked at.
            Ok(_) | Err(Fail::Write) => {}
            Err(Fail::Framing) => return Err(FetchError::Bad("bad chunked framing")),
            Err(_) => return Err(FetchError::Bad("the connection ended inside the body")),
        }
    }
    Ok(Fetched {
        status: head.status,
        body: body.kept,
    })
}

/// A sink that keeps up to `limit` bytes, then refuses more.
struct Capped {
    kept: Vec<u8>,
    limit: usize,
}

impl AsyncWrite for Capped {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let room = self.limit - self.kept.len();
        if room == 0 {
            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
        }
        let n = room.min(data.len());
        self.kept.extend_from_slice(&data[..n]);
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
