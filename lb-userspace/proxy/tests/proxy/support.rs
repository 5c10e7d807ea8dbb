//! Helpers shared by the proxy's test files: a temporary directory, a proxy
//! with one frontend on 127.0.0.1 and one pool, its figures, its access log,
//! and the clients that talk to it (the servers behind it are in `backends`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Empty;
use hyper::client::conn::http2::SendRequest;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use lb_proxy::{Algorithm, Frontend, Pool, Proxy, ProxyConfig, ServerSpec};
use rustls::crypto::CryptoProvider;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber, span};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new, empty directory whose name has `tag`, this process and a counter.
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lb-proxy-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Frontend "web" on 127.0.0.1 (any port), default pool "app".
pub fn local_frontend() -> Frontend {
    Frontend::new("web", vec!["127.0.0.1:0".parse().unwrap()], "app")
}

/// Starts a proxy with `fe` and `pool` only, routing everything to the default pool.
pub async fn start_proxy(fe: Frontend, pool: Pool) -> Proxy {
    Proxy::start(
        ProxyConfig {
            frontends: vec![fe],
            pools: vec![pool],
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap()
}

/// Pool "app" of the one server `server`, round robin.
pub fn one_server_pool(server: SocketAddr) -> Pool {
    Pool::new("app", Algorithm::RoundRobin, vec![ServerSpec::new(server)])
}

/// A proxy on our HTTP/1 path sending every request to `server`, all else by default.
pub async fn proxy_to(server: SocketAddr) -> Proxy {
    start_proxy(local_frontend(), one_server_pool(server)).await
}

/// A proxy whose frontend may route to an `h2` pool (never, in fact: every
/// request goes to `server`), so that hyper serves its clients; `fe` and
/// `pool` set the timeouts of the frontend and of the pool used.
pub async fn hyper_path_proxy(
    server: SocketAddr,
    fe: impl FnOnce(&mut Frontend),
    pool: impl FnOnce(&mut Pool),
) -> Proxy {
    let rules = "[[frontend.acl]]\nname = \"never\"\npath_prefix = \"/never/\"\n\
                 [[frontend.use_pool]]\npool = \"api\"\nif = \"never\"\n";
    let mut cfg = two_pool_config(server, server, rules, "");
    cfg.pools[1].h2 = true;
    fe(&mut cfg.frontends[0]);
    pool(&mut cfg.pools[0]);
    Proxy::start(cfg, None).await.unwrap()
}

/// An address that refuses connections: bound, then released.
pub async fn dead_addr() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    l.local_addr().unwrap()
}

/// Frontend "web" on 127.0.0.1 with `frontend` (TOML) appended to its table,
/// pools "app" (server `app`) and "api" (server `api`), then `top`.
pub fn two_pool_config(app: SocketAddr, api: SocketAddr, frontend: &str, top: &str) -> ProxyConfig {
    let text = format!(
        r#"
[[frontend]]
name = "web"
binds = ["127.0.0.1:0"]
default_pool = "app"
{frontend}

[[pool]]
name = "app"
servers = [{{ address = "{app}" }}]

[[pool]]
name = "api"
servers = [{{ address = "{api}" }}]

{top}
"#
    );
    toml::from_str(&text).unwrap()
}

/// Idle keep-alive connections of the first pool to `server`.
pub fn idle(proxy: &Proxy, server: SocketAddr) -> usize {
    proxy.stats().pools()[0]
        .servers
        .iter()
        .find(|s| s.address == server)
        .map_or(0, |s| s.idle_connections)
}

/// How long a test waits for an answer, a close, or the proxy to give up.
pub const GIVE_UP: Duration = Duration::from_secs(3);

/// An HTTP/1.1 client (hyper's pooled one) sending requests without a body.
pub fn h1_client() -> Client<HttpConnector, Empty<Bytes>> {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// Reads `s` until the peer closes it, and returns what came; panics if
/// it is still open after 5 s (a guard against hanging, not a limit under
/// test: those use `GIVE_UP`), or if it ends with an error (a reset).
pub async fn read_until_closed<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the proxy did not close the connection")
        .expect("the connection was reset instead of closed");
    String::from_utf8_lossy(&out).into_owned()
}

/// Reads `s` until the peer closes it (a reset counts), within `GIVE_UP`
/// (else panics), and returns the first `keep` bytes of what came as text:
/// the callers' answers may be megabytes, and only their start is checked.
pub async fn read_until_gone<S: AsyncRead + Unpin>(s: &mut S, keep: usize) -> String {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 64 * 1024];
    let read = tokio::time::timeout(GIVE_UP, async {
        while let Ok(n @ 1..) = s.read(&mut buf).await {
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&out[..out.len().min(keep)]).into_owned();
    assert!(read.is_ok(), "the connection is still open; got {text:?}");
    text
}

/// Writes `bytes` on a new connection to `addr`, then `read_until_closed`.
pub async fn exchange_until_closed(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    read_until_closed(&mut s).await
}

/// An HTTP/2 client connection over `io` with hyper's default settings, and
/// the task that drives it.
pub async fn h2_handshake<I, B>(io: I) -> (SendRequest<B>, JoinHandle<hyper::Result<()>>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    h2_handshake_window(io, None).await
}

/// Like `h2_handshake`, with both flow-control windows (stream and
/// connection) set to `window` if given.
pub async fn h2_handshake_window<I, B>(
    io: I,
    window: Option<u32>,
) -> (SendRequest<B>, JoinHandle<hyper::Result<()>>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = hyper::client::conn::http2::Builder::new(TokioExecutor::new());
    if let Some(window) = window {
        builder
            .initial_stream_window_size(window)
            .initial_connection_window_size(window);
    }
    let (send, conn) = builder.handshake(TokioIo::new(io)).await.unwrap();
    (send, tokio::spawn(conn))
}

/// Sends `n` GETs of `/` to `front` on `send`, each reset `pause` after it
/// was sent: dropping a response future resets its stream (RST_STREAM CANCEL).
pub async fn reset_streams(
    send: &SendRequest<Empty<Bytes>>,
    front: SocketAddr,
    n: usize,
    pause: Duration,
) {
    for _ in 0..n {
        let mut send = send.clone();
        let req = http::Request::get(format!("http://{front}/"))
            .body(Empty::<Bytes>::new())
            .unwrap();
        let pending = tokio::spawn(async move { send.send_request(req).await });
        tokio::time::sleep(pause).await;
        pending.abort();
    }
}

/// A response or request body of `first`, then after `pause` (counted from
/// its making) of `second`: a body of unknown length sent in two frames.
pub struct PausedBody {
    frames: std::collections::VecDeque<Bytes>,
    pause: std::pin::Pin<Box<tokio::time::Sleep>>,
    sent: usize,
}

impl PausedBody {
    /// `first`, then `second` once `pause` has passed.
    pub fn new(first: &'static [u8], pause: Duration, second: &'static [u8]) -> Self {
        PausedBody {
            frames: [first, second].map(Bytes::from_static).into(),
            pause: Box::pin(tokio::time::sleep(pause)),
            sent: 0,
        }
    }
}

impl hyper::body::Body for PausedBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if self.sent == 1 && self.pause.as_mut().poll(cx).is_pending() {
            return std::task::Poll::Pending;
        }
        self.sent += 1;
        std::task::Poll::Ready(
            self.frames
                .pop_front()
                .map(|d| Ok(hyper::body::Frame::data(d))),
        )
    }
}

/// The crypto provider of the test clients and servers (the proxy's own: ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS client configuration of `provider` for `versions` that accepts
/// any server certificate (the tests check which one was presented, or
/// none at all) and presents none.
pub fn any_cert_client(
    provider: Arc<CryptoProvider>,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> rustls::ClientConfig {
    rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(lb_proxy::NoVerify(provider)))
        .with_no_client_auth()
}

/// Every access log line (`tracing` target `access`) written in this test
/// binary so far, once `capture_access_log` has run.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs, once for the whole binary, a subscriber keeping the access log
/// lines: one global subscriber, because tests run in parallel on threads of
/// their own (a per-thread one would miss the proxy's tasks).
pub fn capture_access_log() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing::subscriber::set_global_default(AccessLog)
            .expect("no other global subscriber in the proxy's tests");
    });
}

/// The access log lines written so far (`capture_access_log` first).
pub fn access_lines() -> Vec<String> {
    LINES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// The access log line of the client at `client` (`ip:port`) to `server`,
/// once written (within `GIVE_UP`). Both are matched: other tests log
/// too, and ports come round again.
pub async fn access_line_of(client: impl std::fmt::Display, server: SocketAddr) -> Option<String> {
    let (prefix, to) = (format!("{client} "), format!("/{server} "));
    let until = tokio::time::Instant::now() + GIVE_UP;
    loop {
        let found = access_lines()
            .into_iter()
            .find(|l| l.starts_with(&prefix) && l.contains(&to));
        if found.is_some() || tokio::time::Instant::now() >= until {
            return found;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The JSON access log lines (parsed) for `uri`, waiting up to 2 s for one:
/// a record is written when the proxy drops the response body, which may be
/// just after the client has it all.
pub async fn json_access_records(uri: &str) -> Vec<serde_json::Value> {
    for _ in 0..100 {
        let recs: Vec<serde_json::Value> = access_lines()
            .iter()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|j| j["uri"] == uri)
            .collect();
        if !recs.is_empty() {
            return recs;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Vec::new()
}

/// A subscriber that keeps the message of each `access` event in `LINES`.
struct AccessLog;

impl Subscriber for AccessLog {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        meta.target() == "access"
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        // Never called: no span is enabled.
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        LINES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(message.0);
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

/// The `message` field of an event (the log line).
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}
