//! Request bodies on their way to a server through hyper. An HTTP/2
//! request without content-length whose end arrives within `WHOLE_WAIT` of
//! its head (clients send the DATA frames of a small body right behind it)
//! and within `WHOLE_LIMIT` bytes goes out whole, with a Content-Length, as
//! HAProxy's `http-buffer-request` would; any other body streams as it
//! comes, chunked.

use std::collections::VecDeque;
use std::future::poll_fn;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use crate::deadline::WaitLimit;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Largest body gathered to be sent with a known length.
pub(crate) const WHOLE_LIMIT: usize = 64 * 1024;
/// Longest wait for the end of such a body before streaming it instead.
const WHOLE_WAIT: std::time::Duration = std::time::Duration::from_millis(100);

/// A request body as hyper sends it to a server.
pub(crate) enum RequestBody {
    /// Streamed from the client, after the frames already read from it.
    Stream {
        read: VecDeque<Frame<Bytes>>,
        rest: Incoming,
        /// An error met while reading ahead, given after `read`.
        error: Option<hyper::Error>,
        /// `timeout_client` on each wait for more of the body.
        wait: WaitLimit,
        /// Whose turn it is, for `timeout_server` (`BodyClock`), once
        /// the request is sent (`RequestBody::clock`).
        clock: Option<std::sync::Arc<BodyClock>>,
    },
    /// The whole body, in hand (taken when sent).
    Whole(Option<Bytes>),
}

/// Whose turn it is while a streamed request body goes to a server: the
/// client's (its next bytes are awaited: `timeout_client` limits that) or
/// the server's since an instant (it is to take what was handed to it, or
/// to answer once the body ended). `timeout_server` counts only the
/// server's turns, as HAProxy's: an upload longer than `timeout_server` is
/// no server timeout (it was cut, or answered 504, and counted against the
/// server by `max_fails`).
#[derive(Debug)]
pub(crate) struct BodyClock(std::sync::Mutex<Option<std::time::Instant>>);

impl BodyClock {
    fn new() -> Self {
        BodyClock(std::sync::Mutex::new(Some(std::time::Instant::now())))
    }

    fn set(&self, server_since: Option<std::time::Instant>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = server_since;
    }

    /// Since when the server is awaited, if it is.
    fn server_since(&self) -> Option<std::time::Instant> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Resolves once the server has been awaited for `limit` without a
    /// turn of the client's in between.
    pub(crate) async fn server_silent(&self, limit: std::time::Duration) {
        loop {
            match self.server_since() {
                Some(since) => {
                    tokio::time::sleep_until((since + limit).into()).await;
                    if self.server_since() == Some(since) {
                        return;
                    }
                }
                // The client's turn: looked at again a limit later.
                None => tokio::time::sleep(limit).await,
            }
        }
    }
}

/// A client's request body that sent nothing more for `timeout_client`.
#[derive(Debug)]
pub(crate) struct ClientTimedOut;

impl std::fmt::Display for ClientTimedOut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("timeout client during the request body")
    }
}

impl std::error::Error for ClientTimedOut {}

/// The client's request body broke off (its connection closed or was reset).
#[derive(Debug)]
pub(crate) struct ClientBodyFailed(hyper::Error);

impl std::fmt::Display for ClientBodyFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "the client's request body broke off: {}", self.0)
    }
}

impl std::error::Error for ClientBodyFailed {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
    }
}

/// The client's failure, when a request to a server failed because of its
/// body: it stopped coming (`ClientTimeout`) or broke off
/// (`ClientAborted`). The server is not to blame (nor counted by
/// `max_fails`), whatever hyper's error says.
pub(crate) fn client_failure(e: &hyper::Error) -> Option<crate::error::Failure> {
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        if c.is::<ClientTimedOut>() {
            return Some(crate::error::Failure::ClientTimeout);
        }
        if c.is::<ClientBodyFailed>() {
            return Some(crate::error::Failure::ClientAborted);
        }
        cause = c.source();
    }
    None
}

impl RequestBody {
    /// `rest`, streamed as it comes, each wait limited to `limit`.
    pub(crate) fn stream(rest: Incoming, limit: std::time::Duration) -> Self {
        RequestBody::Stream {
            read: VecDeque::new(),
            rest,
            error: None,
            wait: WaitLimit::new(limit),
            clock: None,
        }
    }

    /// The clock of a streamed body, started (the server's turn: the head
    /// goes out); None for a body in hand, which hyper sends at once.
    pub(crate) fn clock(&mut self) -> Option<std::sync::Arc<BodyClock>> {
        match self {
            RequestBody::Stream { clock, .. } => {
                let c = clock.get_or_insert_with(|| std::sync::Arc::new(BodyClock::new()));
                c.set(Some(std::time::Instant::now()));
                Some(c.clone())
            }
            RequestBody::Whole(_) => None,
        }
    }
}

/// A frame with the trailer fields a request may not carry
/// (`trailers::request_trailer_allowed`) dropped: hyper's path has the
/// fields in hand (our HTTP/1 path, which relays bytes, refuses them).
fn allowed_trailers(frame: Frame<Bytes>) -> Frame<Bytes> {
    if !frame.is_trailers() {
        return frame;
    }
    match frame.into_trailers() {
        Ok(mut fields) => {
            let banned: Vec<http::HeaderName> = fields
                .keys()
                .filter(|k| !crate::trailers::request_trailer_allowed(k.as_str().as_bytes()))
                .cloned()
                .collect();
            for name in &banned {
                fields.remove(name);
            }
            Frame::trailers(fields)
        }
        Err(frame) => frame,
    }
}

/// What reading ahead without waiting gave.
enum Ahead {
    /// The body ended: all of it is in the buffer.
    Ended,
    /// The end did not come within `WHOLE_WAIT`, or more than `WHOLE_LIMIT` came.
    More,
    /// A trailers frame (it ends the body, but cannot go with a Content-Length).
    Trailers(Frame<Bytes>),
    Failed(hyper::Error),
}

/// Reads `body` for up to `WHOLE_WAIT`: the whole body when its end comes
/// within that time and `WHOLE_LIMIT` bytes, else a stream that gives what
/// was read first, each later wait limited to `limit`. Bodies of known
/// length or none at all are left as they are.
pub(crate) async fn in_hand(mut body: Incoming, limit: std::time::Duration) -> RequestBody {
    if body.is_end_stream() || body.size_hint().exact().is_some() {
        return RequestBody::stream(body, limit);
    }
    let mut data = BytesMut::new();
    let gather = poll_fn(|cx: &mut Context<'_>| {
        loop {
            if data.len() > WHOLE_LIMIT {
                return Poll::Ready(Ahead::More);
            }
            match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(Some(Ok(frame))) => match frame.into_data() {
                    Ok(d) => data.extend_from_slice(&d),
                    Err(other) => return Poll::Ready(Ahead::Trailers(allowed_trailers(other))),
                },
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Ahead::Failed(e)),
                Poll::Ready(None) => return Poll::Ready(Ahead::Ended),
                Poll::Pending => return Poll::Pending,
            }
        }
    });
    let ahead = tokio::time::timeout(WHOLE_WAIT, gather)
        .await
        .unwrap_or(Ahead::More);
    let data = data.freeze();
    let mut read = VecDeque::new();
    if !data.is_empty() {
        read.push_back(Frame::data(data.clone()));
    }
    let error = match ahead {
        Ahead::Ended => return RequestBody::Whole(Some(data)),
        Ahead::More => None,
        Ahead::Trailers(t) => {
            read.push_back(t);
            None
        }
        Ahead::Failed(e) => Some(e),
    };
    RequestBody::Stream {
        read,
        rest: body,
        error,
        wait: WaitLimit::new(limit),
        clock: None,
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            RequestBody::Stream {
                read,
                rest,
                error,
                wait,
                clock,
            } => {
                // Asked for more: what was handed went out, and the server
                // is awaited again unless the client is (below).
                if let Some(c) = clock {
                    c.set(Some(std::time::Instant::now()));
                }
                if let Some(f) = read.pop_front() {
                    return Poll::Ready(Some(Ok(f)));
                }
                if let Some(e) = error.take() {
                    return Poll::Ready(Some(Err(ClientBodyFailed(e).into())));
                }
                match Pin::new(rest).poll_frame(cx) {
                    Poll::Pending if wait.poll_expired(cx) => {
                        Poll::Ready(Some(Err(ClientTimedOut.into())))
                    }
                    Poll::Pending => {
                        // The client's turn (`timeout_client` limits it).
                        if let Some(c) = clock {
                            c.set(None);
                        }
                        Poll::Pending
                    }
                    Poll::Ready(r) => {
                        wait.progress();
                        Poll::Ready(r.map(|r| {
                            r.map(allowed_trailers)
                                .map_err(|e| BoxError::from(ClientBodyFailed(e)))
                        }))
                    }
                }
            }
            RequestBody::Whole(data) => Poll::Ready(data.take().map(|d| Ok(Frame::data(d)))),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            RequestBody::Stream {
                read, rest, error, ..
            } => read.is_empty() && error.is_none() && rest.is_end_stream(),
            RequestBody::Whole(data) => data.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            RequestBody::Stream { read, rest, .. } if read.is_empty() => rest.size_hint(),
            RequestBody::Stream { .. } => SizeHint::default(),
            RequestBody::Whole(data) => {
                SizeHint::with_exact(data.as_ref().map_or(0, |d| d.len() as u64))
            }
        }
    }
}
