//! Test servers shared by the proxy's test files: an accept loop that hands
//! each connection to a closure, hyper HTTP/1.1 service on a connection, a
//! scripted raw HTTP/1.1 server, and the WebSocket handshake's fixed values.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A server on 127.0.0.1 (any port) that hands each accepted connection to `serve`.
pub async fn server<F, Fut>(serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    serve_on(TcpListener::bind("127.0.0.1:0").await.unwrap(), serve)
}

/// Like `server`, on a listener set up by the caller (socket buffer sizes).
pub fn serve_on<F, Fut>(listener: TcpListener, serve: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((s, _)) = listener.accept().await {
            tokio::spawn(serve(s));
        }
    });
    addr
}

/// Like `server`, counting the connections it accepted; `serve` is also
/// given the connection's place (0 for the first).
pub async fn counting_server<F, Fut>(serve: F) -> (SocketAddr, Arc<AtomicUsize>)
where
    F: Fn(TcpStream, usize) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    // Counted in the accept loop, before the connection's task runs.
    let addr = server(move |s| serve(s, count.fetch_add(1, Ordering::SeqCst))).await;
    (addr, accepted)
}

/// Serves HTTP/1.1 on `io` with hyper, each request answered by `handle`, until it closes.
pub async fn serve_http1<I, F, Fut, B, E>(io: I, handle: F)
where
    I: AsyncRead + AsyncWrite + Unpin,
    F: Fn(Request<Incoming>) -> Fut,
    Fut: Future<Output = Result<Response<B>, E>>,
    B: hyper::body::Body + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let _ = hyper::server::conn::http1::Builder::new()
        .serve_connection(TokioIo::new(io), service_fn(handle))
        .await;
}

/// A hyper HTTP/1.1 server answering every request with `handle`.
pub async fn http1_server<F, Fut, B, E>(handle: F) -> SocketAddr
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<Response<B>, E>> + Send + 'static,
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    E: Into<Box<dyn std::error::Error + Send + Sync>> + Send + 'static,
{
    server(move |s| serve_http1(s, handle.clone())).await
}

/// A `json_backend`: where it listens, the requests it served and the
/// connections it accepted.
pub struct JsonBackend {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Requests it has served.
    pub requests: Arc<AtomicUsize>,
    /// Connections it has accepted.
    pub accepted: Arc<AtomicUsize>,
}

/// A backend answering each request with `echo_json` of it, and headers
/// `server: test` and `x-server: name`; `/sleep/N` waits N ms first.
pub async fn json_backend(name: &'static str) -> JsonBackend {
    let requests = Arc::new(AtomicUsize::new(0));
    let served = requests.clone();
    let (addr, accepted) = counting_server(move |s, _| {
        let served = served.clone();
        serve_http1(s, move |req: Request<Incoming>| {
            served.fetch_add(1, Ordering::SeqCst);
            async move {
                if let Some(ms) = req.uri().path().strip_prefix("/sleep/") {
                    let ms: u64 = ms.parse().unwrap_or(0);
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let body = echo_json(name, &req).to_string();
                Ok::<_, std::convert::Infallible>(
                    Response::builder()
                        .header("server", "test")
                        .header("x-server", name)
                        .body(Full::new(Bytes::from(body)))
                        .unwrap(),
                )
            }
        })
    })
    .await;
    JsonBackend {
        addr,
        requests,
        accepted,
    }
}

/// `{"server": name, "path": path and query, "headers": {name: last value},
/// "header_lists": {name: [every value]}}` of `req`.
fn echo_json(name: &str, req: &Request<Incoming>) -> serde_json::Value {
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").into()))
        .collect();
    let mut lists = serde_json::Map::new();
    for (k, v) in req.headers() {
        let entry = lists
            .entry(k.to_string())
            .or_insert_with(|| serde_json::Value::Array(Vec::new()));
        if let serde_json::Value::Array(a) = entry {
            a.push(v.to_str().unwrap_or("").into());
        }
    }
    let path = req.uri().path_and_query().map(|p| p.to_string());
    serde_json::json!({"server": name, "path": path, "headers": headers, "header_lists": lists})
}

/// Reads a request or response head (up to `\r\n\r\n`), byte by byte, so
/// that nothing after it is taken; a read error ends it like a close.
pub async fn read_head<S: AsyncRead + Unpin>(s: &mut S) -> String {
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        if s.read(&mut b).await.unwrap_or(0) == 0 {
            break;
        }
        head.push(b[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

/// Request heads a scripted server received, in order.
pub type Seen = Arc<Mutex<Vec<String>>>;

/// What a scripted server answers to one request: given the request's place
/// on its connection (0 for the first), its head and body as received, the
/// bytes to send and whether to close after them.
pub type Script = dyn Fn(usize, &str, &[u8]) -> (Vec<u8>, bool) + Send + Sync;

/// A raw HTTP/1.1 server: reads each request head and its Content-Length
/// body, writes what `script` returns, and closes when it says so. Every
/// request it receives is recorded.
pub async fn scripted_server(script: Arc<Script>) -> (SocketAddr, Seen) {
    let seen = Seen::default();
    let log = seen.clone();
    let addr = server(move |s| run_script(s, script.clone(), log.clone())).await;
    (addr, seen)
}

/// A scripted server answering every request with `answer`, keeping the connection.
pub async fn server_answering(answer: &'static str) -> (SocketAddr, Seen) {
    scripted_server(Arc::new(move |_, _, _| (answer.as_bytes().to_vec(), false))).await
}

/// One connection of `scripted_server`.
async fn run_script(mut s: TcpStream, script: Arc<Script>, log: Seen) {
    let mut buf = Vec::new();
    for n in 0.. {
        let end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if !read_more(&mut s, &mut buf).await {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..end]).into_owned();
        buf.drain(..end);
        let length = head
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.eq_ignore_ascii_case("content-length"))
            .and_then(|(_, v)| v.trim().parse::<usize>().ok())
            .unwrap_or(0);
        while buf.len() < length {
            if !read_more(&mut s, &mut buf).await {
                return;
            }
        }
        let body: Vec<u8> = buf.drain(..length).collect();
        log.lock().unwrap().push(head.clone());
        let (answer, close) = script(n, &head, &body);
        if s.write_all(&answer).await.is_err() || close {
            let _ = s.shutdown().await;
            return;
        }
    }
}

/// Appends what one read of `s` brings to `buf`; false at the close or an error.
async fn read_more(s: &mut TcpStream, buf: &mut Vec<u8>) -> bool {
    let mut chunk = [0u8; 4096];
    match s.read(&mut chunk).await {
        Ok(n) if n > 0 => {
            buf.extend_from_slice(&chunk[..n]);
            true
        }
        _ => false,
    }
}

/// The key of RFC 6455 1.3's example handshake.
pub const WS_KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
/// The Sec-WebSocket-Accept value that answers `WS_KEY`.
pub const WS_ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// A WebSocket upgrade request for `/chat` with `WS_KEY` (spelled out: a
/// const cannot be formatted) and version 13.
pub const WS_UPGRADE: &[u8] = b"GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

/// A 101 answer to a WebSocket upgrade carrying `accept` as
/// Sec-WebSocket-Accept (none if empty).
pub fn ws_switching(accept: &str) -> String {
    let accept = match accept {
        "" => String::new(),
        a => format!("Sec-WebSocket-Accept: {a}\r\n"),
    };
    format!(
        "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{accept}\r\n"
    )
}
