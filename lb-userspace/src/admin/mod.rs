//! The admin listener (`[admin]`): a REST API over the control protocol
//! (`api`, described by `openapi.json` at `/api/openapi.json`) and a stats
//! page in the spirit of HAProxy's (`page`, at `/stats`), both behind
//! `auth`. Every change goes through the control socket's `Handler`, so
//! validation and the journal are the same as for `lb drain` and friends.
//!
//! Writes are refused unless they cannot come from another site's page:
//! API writes need a Bearer token or `Content-Type: application/json`
//! (which a cross-site form cannot send), the page's forms the CSRF token
//! it embeds (403 otherwise).

mod api;
mod auth;
mod page;

use std::convert::Infallible;
use std::future::Future;
use std::io;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;

use anyhow::Result;
use bytes::Bytes;
use http::{HeaderValue, Method, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::time::Sleep;
use tracing::{debug, warn};

pub use auth::{Auth, AuthSlot, Credential, Login, constant_time_eq};

use crate::control::{Handler, Request, Response};

/// Largest request body read (JSON bodies and forms are small).
const MAX_BODY: usize = 64 * 1024;
/// How long a client may take to send a request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long an authenticated client may take to send a request body.
const BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take nothing of what is written to it.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// An answer of the admin listener.
pub type Answer = http::Response<Full<Bytes>>;

/// What the admin listener serves with.
pub struct Admin {
    handler: Arc<dyn Handler>,
    /// The credentials in force (a reload replaces them).
    auth: Arc<AuthSlot>,
    /// `BODY_TIMEOUT`, shorter in tests.
    body_timeout: Duration,
}

impl Admin {
    /// Serves with `handler` (the agent's control handler), admitting
    /// what `auth` holds at each request.
    pub fn new(handler: Arc<dyn Handler>, auth: Arc<AuthSlot>) -> Self {
        Admin {
            handler,
            auth,
            body_timeout: BODY_TIMEOUT,
        }
    }

    /// Carries out a control request on a blocking thread, as the control socket does.
    async fn ask(&self, request: Request) -> Response {
        let handler = Arc::clone(&self.handler);
        tokio::task::spawn_blocking(move || handler.handle(request))
            .await
            .unwrap_or_else(|e| {
                warn!("admin handler failed: {e}");
                Response::Error("internal error while handling the request".into())
            })
    }

    /// Authenticates, then routes one request.
    async fn answer(&self, req: http::Request<Incoming>, peer: IpAddr) -> Answer {
        let auth = self.auth.current();
        let Some(login) = auth.check(req.headers(), Some(peer)).await else {
            let mut resp = text(StatusCode::UNAUTHORIZED, "authentication required\n");
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static(auth.challenge()),
            );
            return resp;
        };
        if let Err(why) = same_origin(req.method(), req.headers()) {
            return text(StatusCode::FORBIDDEN, why);
        }
        let (parts, body) = req.into_parts();
        // A body that trickles in would hold the connection and its task.
        let collect = Limited::new(body, MAX_BODY).collect();
        let body = match tokio::time::timeout(self.body_timeout, collect).await {
            Ok(Ok(b)) => b.to_bytes(),
            Ok(Err(e)) => return text(StatusCode::PAYLOAD_TOO_LARGE, &format!("{e}\n")),
            Err(_) => return text(StatusCode::REQUEST_TIMEOUT, "request body too slow\n"),
        };
        let path = parts.uri.path();
        match (&parts.method, path) {
            (&Method::GET, "/") => redirect("/stats"),
            (&Method::GET, "/stats") => page::render(self, parts.uri.query(), &login).await,
            (&Method::POST, "/stats/action") => page::action(self, &body, &login).await,
            (_, p) if p == "/api" || p.starts_with("/api/") => {
                let json = parts
                    .headers
                    .get(header::CONTENT_TYPE)
                    .and_then(|v| v.to_str().ok())
                    .is_some_and(|v| v.starts_with("application/json"));
                let cross_site_safe = login.credential == Credential::Bearer || json;
                api::route(self, &parts.method, &parts.uri, &body, cross_site_safe).await
            }
            _ => text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

/// Refuses a request that changes state from a page of another origin
/// (its `Origin` is not `http://` + its `Host`, or the browser says it is
/// cross-site): a second line behind the CSRF token and the JSON type.
fn same_origin(method: &Method, headers: &http::HeaderMap) -> Result<(), &'static str> {
    if matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS) {
        return Ok(());
    }
    let get = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    if get("sec-fetch-site").is_some_and(|s| s.eq_ignore_ascii_case("cross-site")) {
        return Err("cross-site request refused\n");
    }
    let Some(origin) = get("origin") else {
        // Not sent by a browser (curl, scripts), or an old one.
        return Ok(());
    };
    let own = get("host").map(|host| format!("http://{host}"));
    if own.is_some_and(|own| origin.eq_ignore_ascii_case(&own)) {
        Ok(())
    } else {
        Err("request from another origin refused\n")
    }
}

/// The Content-Security-Policy of answers other than the stats page:
/// nothing loads, nothing may frame them.
const CSP_NONE: &str =
    "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'";

/// A plain text answer.
pub fn text(status: StatusCode, body: &str) -> Answer {
    with_type(status, "text/plain; charset=utf-8", body.to_string())
}

/// An answer of `content_type`.
pub fn with_type(status: StatusCode, content_type: &'static str, body: String) -> Answer {
    let mut resp = http::Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // No other site may frame the page (clickjacking of its buttons), nor
    // have an answer taken for another type.
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP_NONE),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    // Not `no-referrer`: with it a browser sends `Origin: null` on the
    // page's own form posts, which `same_origin` refuses.
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    resp
}

/// A 303 to `location` (after a form POST, so a reload does not repeat it).
pub fn redirect(location: &'static str) -> Answer {
    let mut resp = text(StatusCode::SEE_OTHER, "");
    resp.headers_mut()
        .insert(header::LOCATION, HeaderValue::from_static(location));
    resp
}

/// Serves HTTP/1.1 on `listener` until the task is dropped.
pub async fn serve(listener: TcpListener, admin: Arc<Admin>) -> Result<()> {
    serve_with(listener, admin, WRITE_TIMEOUT).await
}

/// `serve`, a connection closed once its client takes nothing for `write_timeout`.
async fn serve_with(
    listener: TcpListener,
    admin: Arc<Admin>,
    write_timeout: Duration,
) -> Result<()> {
    let mut errors = lb_proxy::accept_errors::AcceptErrors::new("admin listener");
    let limit =
        crate::conn_limit::ConnLimit::new("admin listener", crate::conn_limit::MAX_AUX_CONNECTIONS);
    loop {
        let (sock, peer) = errors.accept(|| listener.accept()).await;
        // Past the cap, closed at once: its fd is back for the data path.
        let Some(slot) = limit.admit(peer) else {
            continue;
        };
        let admin = Arc::clone(&admin);
        tokio::spawn(async move {
            let _slot = slot;
            let service = hyper::service::service_fn(move |req| {
                let admin = Arc::clone(&admin);
                async move { Ok::<_, Infallible>(admin.answer(req, peer.ip()).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEAD_TIMEOUT)
                .serve_connection(
                    TokioIo::new(WriteDeadline::new(sock, write_timeout)),
                    service,
                );
            if let Err(e) = conn.await {
                debug!(%peer, error = %e, "admin connection");
            }
        });
    }
}

/// A stream whose writes may not stall: once the peer has taken nothing for
/// `limit`, writing fails (and hyper closes the connection). hyper has no
/// write timeout, and its header timeout runs only while it reads: a client
/// that pipelines requests and never reads the answers would hold its
/// connection, and a task, for ever.
struct WriteDeadline<T> {
    inner: T,
    limit: Duration,
    /// Started when a write or flush first waits; cleared by any progress.
    stalled: Option<Pin<Box<Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(inner: T, limit: Duration) -> Self {
        WriteDeadline {
            inner,
            limit,
            stalled: None,
        }
    }

    /// Passes on a write's result; a wait longer than `limit` in a row is an error.
    fn guard<R>(
        &mut self,
        cx: &mut TaskContext<'_>,
        r: Poll<io::Result<R>>,
    ) -> Poll<io::Result<R>> {
        if r.is_ready() {
            self.stalled = None;
            return r;
        }
        let limit = self.limit;
        let sleep = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client took nothing of the answer in time",
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.guard(cx, r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.guard(cx, r)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_flush(cx);
        self.guard(cx, r)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        let r = Pin::new(&mut self.inner).poll_shutdown(cx);
        self.guard(cx, r)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    use super::*;

    struct Nobody;

    const TOKEN: &str = "0123456789abcdef-token-0123456789";

    impl Handler for Nobody {
        fn handle(&self, _: Request) -> Response {
            Response::Ok
        }
    }

    #[test]
    fn writes_from_another_origin_are_refused() {
        let headers = |pairs: &[(&'static str, &'static str)]| {
            let mut h = http::HeaderMap::new();
            for (k, v) in pairs {
                h.insert(*k, HeaderValue::from_static(v));
            }
            h
        };
        let host = ("host", "127.0.0.1:8404");
        let evil = headers(&[host, ("origin", "http://evil.example")]);
        let own = headers(&[host, ("origin", "http://127.0.0.1:8404")]);
        let cross = headers(&[host, ("sec-fetch-site", "cross-site")]);
        let plain = headers(&[host]);
        assert!(same_origin(&Method::POST, &evil).is_err());
        assert!(same_origin(&Method::DELETE, &cross).is_err());
        assert!(same_origin(&Method::POST, &own).is_ok());
        // curl and scripts send no Origin.
        assert!(same_origin(&Method::PUT, &plain).is_ok());
        // Reading changes nothing (and a framed page is stopped by its headers).
        assert!(same_origin(&Method::GET, &evil).is_ok());
        let null = headers(&[host, ("origin", "null")]);
        assert!(same_origin(&Method::POST, &null).is_err());
    }

    #[test]
    fn answers_may_not_be_framed_sniffed_or_cached() {
        let answer = text(StatusCode::OK, "x");
        let h = answer.headers();
        assert_eq!(h["x-frame-options"], "DENY");
        assert_eq!(h["x-content-type-options"], "nosniff");
        assert_eq!(h["cache-control"], "no-store");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
        assert!(csp.contains("default-src 'none'"), "{csp}");
    }

    #[tokio::test]
    async fn connections_past_the_limit_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let auth = Arc::new(AuthSlot::new(Auth::new(HashMap::new(), None).unwrap()));
        let admin = Arc::new(Admin::new(Arc::new(Nobody), auth));
        let server = tokio::spawn(serve_with(listener, admin, WRITE_TIMEOUT));
        let mut idle = crate::conn_limit::testing::fill_and_one_more_is_closed(addr).await;
        let mut buf = [0u8; 16];
        // One closed: a new one is served again.
        drop(idle.pop());
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut next = TcpStream::connect(addr).await.unwrap();
        next.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let n = next.read(&mut buf).await.unwrap();
        assert!(buf[..n].starts_with(b"HTTP/1.1 401"));
        server.abort();
    }

    #[tokio::test]
    async fn a_client_that_never_reads_is_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let auth = Arc::new(AuthSlot::new(Auth::new(HashMap::new(), None).unwrap()));
        let admin = Arc::new(Admin::new(Arc::new(Nobody), auth));
        let server = tokio::spawn(serve_with(listener, admin, Duration::from_millis(300)));
        // Pipelined requests whose 401 answers are far more than the socket
        // buffers hold, and no reading until long after the write timeout.
        let count = 200_000;
        let requests = b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n".repeat(count);
        let (mut rd, mut wr) = TcpStream::connect(addr).await.unwrap().into_split();
        let writer = tokio::spawn(async move {
            let _ = wr.write_all(&requests).await;
            let _ = wr.shutdown().await;
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(60), rd.read_to_end(&mut got)).await;
        let answers = got.windows(12).filter(|w| w == b"HTTP/1.1 401").count();
        // Cut off after what the socket buffers held, not answered to the end.
        assert!(read.is_ok() && answers < count / 2, "{answers} answers");
        writer.abort();
        server.abort();
    }

    #[tokio::test]
    async fn an_authenticated_body_that_trickles_gets_a_408() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let auth = Auth::new(HashMap::new(), Some(TOKEN.into())).unwrap();
        let auth = Arc::new(AuthSlot::new(auth));
        let mut admin = Admin::new(Arc::new(Nobody), auth);
        admin.body_timeout = Duration::from_millis(300);
        let server = tokio::spawn(serve_with(listener, Arc::new(admin), WRITE_TIMEOUT));
        let mut client = TcpStream::connect(addr).await.unwrap();
        let head = "POST /api/backends HTTP/1.1\r\nHost: x\r\n\
                    Authorization: Bearer 0123456789abcdef-token-0123456789\r\n\
                    Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"a\"";
        client.write_all(head.as_bytes()).await.unwrap();
        // The rest of the body never comes; the answer must, well before 10 s.
        let mut got = vec![0u8; 512];
        let n = tokio::time::timeout(Duration::from_secs(5), client.read(&mut got))
            .await
            .expect("an answer to a stalled body")
            .unwrap();
        let answer = String::from_utf8_lossy(&got[..n]);
        assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
        server.abort();
    }
}
