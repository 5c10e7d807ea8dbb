//! HTTP/1.1 Upgrade (WebSocket) tunnels: the Upgrade request goes to the server
//! with its `Connection: upgrade` and `Upgrade` headers; on `101 Switching
//! Protocols` both upgraded connections are spliced byte for byte until either
//! side closes or nothing moves for `timeout_tunnel` (default 1h). Protocols
//! that carry HTTP (h2c and the like) are never tunnelled
//! (`hardening::tunnelable_upgrade`): the proxy could not see their requests.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use http::header::{self, HeaderMap, HeaderValue};
use http::{StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::balance::{Active, ServerState};
use super::context::Activity;
use super::log::{AccessRecord, LogFormat};

/// Idle limit of a tunnel when neither the pool nor the frontend sets `timeout_tunnel`.
pub(crate) const DEFAULT_TIMEOUT_TUNNEL: Duration = Duration::from_secs(3600);

/// A client's request to switch protocols, taken from its request.
pub(crate) struct Upgrade {
    /// The protocol asked for (the Upgrade header).
    pub proto: HeaderValue,
    client: OnUpgrade,
}

impl Upgrade {
    /// Takes the client side of an HTTP/1.1 upgrade (`Connection: upgrade` and `Upgrade`), if asked for.
    pub(crate) fn take(parts: &mut http::request::Parts) -> Option<Upgrade> {
        if parts.version != Version::HTTP_11 || !connection_has_upgrade(&parts.headers) {
            return None;
        }
        let proto = super::hardening::tunnelable_upgrade(parts.headers.get(header::UPGRADE)?)?;
        let client = parts.extensions.remove::<OnUpgrade>()?;
        Some(Upgrade { proto, client })
    }

    /// On a `101` answer: restores its upgrade headers, marks the client
    /// connection as a tunnel and splices both sides in a task that keeps
    /// `active` (the server's in-flight count). Otherwise gives `active` back.
    /// The tunnel logs the request when it ends, once its 101 hands the
    /// record over (`log`).
    pub(crate) fn answer(
        self,
        resp: &mut http::response::Parts,
        activity: &Arc<Activity>,
        (idle, kill): (Duration, watch::Receiver<bool>),
        (active, log): (Active, tokio::sync::oneshot::Receiver<TunnelLog>),
    ) -> Option<Active> {
        if resp.status != StatusCode::SWITCHING_PROTOCOLS {
            return Some(active);
        }
        let Some(server) = resp.extensions.remove::<OnUpgrade>() else {
            return Some(active);
        };
        // `proto` is what the server switched to (`switched_to`).
        resp.headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        resp.headers.insert(header::UPGRADE, self.proto.clone());
        activity.upgraded.store(true, Ordering::SeqCst);
        let client = self.client;
        let activity = activity.clone();
        tokio::spawn(async move {
            let _ended = Ended(activity.clone());
            // The 101 is written within timeout_client (`ClientIo`) before
            // the client's side is handed over: this ends then.
            let spliced = match tokio::try_join!(client, server) {
                Ok((client, server)) => {
                    activity.spliced.store(true, Ordering::SeqCst);
                    let (mut c, mut s) = (TokioIo::new(client), TokioIo::new(server));
                    splice(&mut c, &mut s, idle, (kill, Some(active.server()))).await
                }
                Err(e) => {
                    tracing::debug!(error = %e, "upgrade failed");
                    Spliced {
                        ended: Err(io::Error::other(e)),
                        from_a: 0,
                        to_a: 0,
                        a_failed: false,
                    }
                }
            };
            spliced.debug();
            // The 101's answer has ended (or was dropped, and nothing is logged).
            if let Ok(log) = log.await {
                log.ended(&spliced);
            }
        });
        None
    }
}

/// Tells the connection its tunnel ended when dropped (the task ended, or was
/// cancelled with its runtime): `notify_one` keeps the news for a waiter yet
/// to come.
struct Ended(Arc<Activity>);

impl Drop for Ended {
    fn drop(&mut self) {
        self.0.tunnel_ended.notify_one();
    }
}

/// Puts back the upgrade headers that hop-by-hop stripping removed.
pub(crate) fn restore(headers: &mut HeaderMap, proto: &HeaderValue) {
    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    headers.insert(header::UPGRADE, proto.clone());
}

/// What a WebSocket handshake's answer must carry (RFC 6455 4.2): the
/// `Sec-WebSocket-Accept` value for a request that asks `Upgrade: websocket`
/// (None for other upgrades), or why the request is refused: a key that is
/// not 16 bytes in base64, or a version other than 13.
pub(crate) fn websocket_accept(
    headers: &HeaderMap,
    proto: &HeaderValue,
) -> Result<Option<HeaderValue>, &'static str> {
    use base64::Engine;
    use base64::engine::general_purpose::STANDARD;
    let websocket = proto
        .as_bytes()
        .split(|&b| b == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(b"websocket"));
    if !websocket {
        return Ok(None);
    }
    let mut keys = headers.get_all("sec-websocket-key").iter();
    let key = match (keys.next(), keys.next()) {
        (Some(k), None) => k.as_bytes().trim_ascii(),
        _ => return Err("WebSocket upgrade without one Sec-WebSocket-Key"),
    };
    if STANDARD.decode(key).map(|k| k.len()) != Ok(16) {
        return Err("Sec-WebSocket-Key is not 16 bytes in base64");
    }
    let version = headers
        .get("sec-websocket-version")
        .map(HeaderValue::as_bytes);
    if version.map(<[u8]>::trim_ascii) != Some(b"13") {
        return Err("WebSocket upgrade without Sec-WebSocket-Version: 13");
    }
    const GUID: &[u8] = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA1_FOR_LEGACY_USE_ONLY);
    ctx.update(key);
    ctx.update(GUID);
    let accept = STANDARD.encode(ctx.finish().as_ref());
    Ok(HeaderValue::from_str(&accept).ok())
}

/// Whether a `101` answer fits the handshake: its `Sec-WebSocket-Accept` is
/// the one `websocket_accept` computed (any 101 fits a non-WebSocket upgrade).
pub(crate) fn accept_matches<'a>(
    expected: Option<&HeaderValue>,
    mut got: impl Iterator<Item = &'a [u8]>,
) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    match (got.next(), got.next()) {
        (Some(v), None) => v.trim_ascii() == expected.as_bytes(),
        _ => false,
    }
}

/// The protocol a `101` switched to, as its `Upgrade` says (RFC 9110 7.8:
/// it must send one), if every protocol it names is one the client asked
/// for (`asked`, the tunnelable part of the request's list): a server must
/// not switch to another, and one that did (to h2c, say) would make the
/// tunnel carry what the rules never see. Tokens compare case-blind.
pub(crate) fn switched_to(
    asked: &HeaderValue,
    answered: Option<&HeaderValue>,
) -> Option<HeaderValue> {
    let answered = answered?;
    let tokens = |v: &HeaderValue| -> Vec<String> {
        String::from_utf8_lossy(v.as_bytes())
            .split(',')
            .map(|t| t.trim().to_ascii_lowercase())
            .filter(|t| !t.is_empty())
            .collect()
    };
    let asked = tokens(asked);
    let got = tokens(answered);
    (!got.is_empty() && got.iter().all(|p| asked.contains(p))).then(|| answered.clone())
}

/// Whether the Connection header lists the `upgrade` token.
pub(crate) fn connection_has_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// How a `splice` ended, and what moved through its side `a`.
#[derive(Debug)]
pub(crate) struct Spliced {
    /// Ok once both sides closed; TimedOut after the idle limit.
    pub ended: io::Result<()>,
    /// Bytes read from `a`, for `b`.
    pub from_a: u64,
    /// Bytes written to `a`, from `b`.
    pub to_a: u64,
    /// The error, if any, came from side `a` (the client's).
    pub a_failed: bool,
}

impl Spliced {
    /// Says at debug level how it ended.
    pub(crate) fn debug(&self) {
        let (up, down) = (self.from_a, self.to_a);
        match &self.ended {
            Ok(()) => tracing::debug!(up, down, "tunnel closed"),
            Err(e) => tracing::debug!(up, down, error = %e, "tunnel ended"),
        }
    }

    /// HAProxy's termination state of the session: `--` closed by either
    /// side, `cD` idle for the tunnel timeout, `KD` closed at the hard stop,
    /// `DD` closed as its server went down, `CD`/`SD` broken on the
    /// client's/server's side.
    pub(crate) fn termination(&self) -> [char; 2] {
        let stopped = |e: &io::Error| {
            e.get_ref()
                .and_then(|i| i.downcast_ref::<Stopped>())
                .copied()
        };
        match &self.ended {
            Ok(()) => ['-', '-'],
            Err(e) if e.kind() == io::ErrorKind::TimedOut => ['c', 'D'],
            Err(e) => match stopped(e) {
                Some(Stopped::HardStop) => ['K', 'D'],
                Some(Stopped::ServerDown) => ['D', 'D'],
                None if self.a_failed => ['C', 'D'],
                None => ['S', 'D'],
            },
        }
    }
}

/// A tunnel's request (a WebSocket's), logged when the tunnel ends as
/// HAProxy logs it: Tt the whole session, the bytes each way, how it
/// ended. Its statistics count it at its 101 (response times stay those of
/// the handshake).
pub(crate) struct TunnelLog {
    rec: AccessRecord,
    start: std::time::Instant,
    format: LogFormat,
}

impl TunnelLog {
    /// `rec`, answered with its 101 `tt` after `start`: counted now, logged at the end.
    pub(crate) fn at_101(
        mut rec: AccessRecord,
        (start, tt): (std::time::Instant, Duration),
        format: LogFormat,
    ) -> Self {
        rec.tt = tt.as_millis() as i64;
        rec.count();
        TunnelLog { rec, start, format }
    }

    /// Logs the session as `spliced` ended it.
    pub(crate) fn ended(mut self, spliced: &Spliced) {
        if !super::log::enabled() {
            return;
        }
        let rec = &mut self.rec;
        rec.bytes += spliced.to_a;
        rec.bytes_in += spliced.from_a;
        if rec.termination == ['-', '-'] {
            rec.termination = spliced.termination();
        }
        let tt = self.start.elapsed();
        rec.tt = tt.as_millis() as i64;
        rec.date = std::time::SystemTime::now()
            .checked_sub(tt)
            .unwrap_or(std::time::UNIX_EPOCH);
        rec.emit_as(self.format);
    }
}

/// Copies both ways until both sides close; fails with TimedOut after `idle` without a byte moving.
pub(crate) async fn splice<A, B>(
    a: &mut A,
    b: &mut B,
    idle: Duration,
    (kill, server): (watch::Receiver<bool>, Option<&ServerState>),
) -> Spliced
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let start = Instant::now();
    let last = Arc::new(AtomicU64::new(0));
    let mut a = Touch {
        inner: a,
        start,
        last: last.clone(),
        read: 0,
        written: 0,
        failed: false,
    };
    let ended = {
        let copy = tokio::io::copy_bidirectional(&mut a, b);
        tokio::pin!(copy);
        let killed = killed(kill);
        tokio::pin!(killed);
        let down = async {
            match server {
                Some(s) => s.sessions_shut_down().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(down);
        loop {
            let since = Duration::from_millis(last.load(Ordering::Relaxed));
            let deadline = start + since + idle;
            tokio::select! {
                r = &mut copy => break r.map(drop),
                () = &mut killed => break Err(io::Error::new(io::ErrorKind::ConnectionAborted, Stopped::HardStop)),
                () = &mut down => break Err(io::Error::new(io::ErrorKind::ConnectionAborted, Stopped::ServerDown)),
                _ = tokio::time::sleep_until(deadline) => {
                    let now = Duration::from_millis(last.load(Ordering::Relaxed));
                    if now == since {
                        break Err(io::ErrorKind::TimedOut.into());
                    }
                }
            }
        }
    };
    Spliced {
        ended,
        from_a: a.read,
        to_a: a.written,
        a_failed: a.failed,
    }
}

/// Resolves once `kill` is set (its proxy's hard stop); never when the
/// proxy cannot have one (its sender is gone: `Proxy::start`).
pub(crate) async fn killed(mut kill: watch::Receiver<bool>) {
    if kill.wait_for(|k| *k).await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Why the proxy itself ended a splice.
#[derive(Debug, Clone, Copy, thiserror::Error)]
enum Stopped {
    /// Its proxy's hard stop.
    #[error("closed at the proxy's hard stop")]
    HardStop,
    /// Its server was marked down (`on_marked_down`).
    #[error("closed: its server was marked down")]
    ServerDown,
}

/// A stream that records when bytes last moved through it, in ms since
/// `start`, and how many moved each way.
struct Touch<'a, T> {
    inner: &'a mut T,
    start: Instant,
    last: Arc<AtomicU64>,
    read: u64,
    written: u64,
    /// One of its reads or writes failed.
    failed: bool,
}

impl<T> Touch<'_, T> {
    fn touch(&self) {
        let ms = self.start.elapsed().as_millis() as u64;
        self.last.fetch_max(ms, Ordering::Relaxed);
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Touch<'_, T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let r = match Pin::new(&mut *self.inner).poll_read(cx, buf) {
            // A TLS client's TCP close without close_notify (many clients
            // end so): the end of what it sends, as HAProxy takes it, not
            // of the server's answer still on its way to it.
            Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::UnexpectedEof => Poll::Ready(Ok(())),
            r => r,
        };
        let got = buf.filled().len() - before;
        if got != 0 {
            self.read += got as u64;
            self.touch();
        }
        self.failed |= matches!(r, Poll::Ready(Err(_)));
        r
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Touch<'_, T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut *self.inner).poll_write(cx, buf);
        match r {
            Poll::Ready(Ok(n @ 1..)) => {
                self.written += n as u64;
                self.touch();
            }
            Poll::Ready(Err(_)) => self.failed = true,
            _ => {}
        }
        r
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut *self.inner).poll_flush(cx);
        self.failed |= matches!(r, Poll::Ready(Err(_)));
        r
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut *self.inner).poll_shutdown(cx);
        self.failed |= matches!(r, Poll::Ready(Err(_)));
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn websocket_handshake_is_checked() {
        let ws = HeaderValue::from_static("websocket");
        let mut h = HeaderMap::new();
        assert!(websocket_accept(&h, &ws).is_err(), "no key");
        // RFC 6455 1.3's example.
        h.insert(
            "sec-websocket-key",
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert!(websocket_accept(&h, &ws).is_err(), "no version");
        h.insert("sec-websocket-version", HeaderValue::from_static("13"));
        let accept = websocket_accept(&h, &ws).unwrap().unwrap();
        assert_eq!(accept, "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=");
        assert!(accept_matches(
            Some(&accept),
            [&b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="[..]].into_iter()
        ));
        assert!(!accept_matches(Some(&accept), std::iter::empty()));
        assert!(!accept_matches(Some(&accept), [&b"x"[..]].into_iter()));
        h.insert("sec-websocket-key", HeaderValue::from_static("c2hvcnQ="));
        assert!(websocket_accept(&h, &ws).is_err(), "short key");
        // Other protocols are not WebSocket's business.
        assert_eq!(
            websocket_accept(&HeaderMap::new(), &HeaderValue::from_static("h2c")),
            Ok(None)
        );
        assert!(accept_matches(None, std::iter::empty()));
    }

    #[tokio::test]
    async fn idle_splice_times_out_and_traffic_keeps_it_open() {
        let (mut a, mut a_peer) = tokio::io::duplex(64);
        let (mut b, mut b_peer) = tokio::io::duplex(64);
        let task = tokio::spawn(async move {
            let (_keep, never) = watch::channel(false);
            splice(&mut a, &mut b, Duration::from_millis(200), (never, None)).await
        });
        for _ in 0..4 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            a_peer.write_all(b"x").await.unwrap();
            let mut one = [0u8; 1];
            b_peer.read_exact(&mut one).await.unwrap();
        }
        assert!(!task.is_finished());
        let r = tokio::time::timeout(Duration::from_secs(2), task)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(r.ended.unwrap_err().kind(), io::ErrorKind::TimedOut);
        assert_eq!((r.from_a, r.to_a), (4, 0));
    }
}
