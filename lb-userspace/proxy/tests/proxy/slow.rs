//! A peer that is slow or stops: every wait on a client or a server ends
//! within the timeout that covers it, and the connection (its task, its
//! memory) is freed. Real sockets; the limit under test is set to `LIMIT`
//! and every other one keeps its default (5 s and more), so a missing limit
//! shows as a test that waits past `GIVE_UP`.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::backends::{
    WS_ACCEPT, WS_UPGRADE, http1_server, read_head, serve_on, server, ws_switching,
};
use crate::general::{tls_connect, write_cert};
use crate::support::{
    GIVE_UP, TempDir, access_lines, capture_access_log, h2_handshake_window, hyper_path_proxy,
    local_frontend, one_server_pool, read_until_gone, start_proxy,
};
use lb_proxy::*;

/// The limit under test.
const LIMIT: Duration = Duration::from_millis(300);

fn pool(server: SocketAddr) -> Pool {
    one_server_pool(server)
}

/// Which code serves an HTTP/1 client: ours, or hyper's (a frontend that can
/// also reach an `h2` pool). A limit that must hold on both is checked by one
/// scenario taking the path, called by one test per path, so that a failure
/// names its path.
#[derive(Clone, Copy, Debug)]
enum Path {
    Ours,
    Hyper,
}

impl std::fmt::Display for Path {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Path::Ours => "ours",
            Path::Hyper => "hyper",
        })
    }
}

/// A proxy on `path` sending every request to `server`; `configure_frontend`
/// and `configure_pool` set the timeouts of the frontend and of the pool used.
async fn start(
    path: Path,
    server: SocketAddr,
    configure_frontend: impl FnOnce(&mut Frontend),
    configure_pool: impl FnOnce(&mut Pool),
) -> Proxy {
    match path {
        Path::Ours => {
            let mut fe = local_frontend();
            configure_frontend(&mut fe);
            let mut p = pool(server);
            configure_pool(&mut p);
            start_proxy(fe, p).await
        }
        Path::Hyper => hyper_path_proxy(server, configure_frontend, configure_pool).await,
    }
}

/// An HTTP/1.1 server answering every request with `size` bytes.
async fn big_server(size: usize) -> SocketAddr {
    let body = Bytes::from(vec![b'x'; size]);
    http1_server(move |_req| {
        let body = body.clone();
        async move { Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(body))) }
    })
    .await
}

/// Reads until the proxy closes the connection (a reset counts) and
/// returns what came; fails if it is still open after `GIVE_UP`.
async fn until_closed<S: AsyncRead + Unpin>(s: &mut S) -> String {
    read_until_gone(s, 300).await
}

/// Sends `front` a GET on a new connection that asks to be closed after it,
/// and returns what comes until the proxy closes it.
async fn get_once(front: SocketAddr) -> String {
    let mut s = TcpStream::connect(front).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    until_closed(&mut s).await
}

/// Waits until the frontend has a connection open, then until it has none
/// (the proxy closed it and its task ended), which must come within `GIVE_UP`.
async fn until_freed(proxy: &Proxy) -> Duration {
    let current = || proxy.stats().frontends()[0].current_connections;
    let t = Instant::now();
    while current() == 0 {
        assert!(t.elapsed() < GIVE_UP, "the connection never came");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let t = Instant::now();
    while current() > 0 {
        assert!(t.elapsed() < GIVE_UP, "the connection is still served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    t.elapsed()
}

/// A TCP connection whose receive buffer is small (and not grown by the
/// kernel), so that a client that does not read stops the proxy's writes soon.
async fn small_window_connect(addr: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    socket.connect(addr).await.unwrap()
}

// --- clients -------------------------------------------------------------------

#[tokio::test]
async fn a_client_that_sends_nothing_is_closed_after_timeout_http_request() {
    let mut fe = local_frontend();
    fe.timeout_http_request = LIMIT;
    let proxy = start_proxy(fe, pool(big_server(10).await)).await;
    let t = Instant::now();
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    assert_eq!(until_closed(&mut s).await, "");
    assert!(t.elapsed() >= LIMIT - Duration::from_millis(50));
    // Nor a PROXY header where one is required.
    let mut fe = local_frontend();
    fe.timeout_http_request = LIMIT;
    fe.accept_proxy = true;
    let proxy = start_proxy(fe, pool(big_server(10).await)).await;
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    s.write_all(b"PROXY TCP4 1.2.3.4").await.unwrap();
    assert_eq!(until_closed(&mut s).await, "");
}

#[tokio::test]
async fn a_head_sent_byte_by_byte_gets_408_after_timeout_http_request() {
    head_sent_byte_by_byte(Path::Ours).await;
}

#[tokio::test]
async fn hyper_path_a_head_sent_byte_by_byte_gets_408_after_timeout_http_request() {
    head_sent_byte_by_byte(Path::Hyper).await;
}

async fn head_sent_byte_by_byte(path: Path) {
    // Each byte comes well within the limit: it bounds the whole head.
    let proxy = start(
        path,
        big_server(10).await,
        |fe| fe.timeout_http_request = LIMIT,
        |_| {},
    )
    .await;
    let s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    let (mut r, mut w) = s.into_split();
    tokio::spawn(async move {
        let head = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(500)
        );
        for b in head.bytes() {
            if w.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let out = until_closed(&mut r).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
}

#[tokio::test]
async fn a_request_body_that_stops_is_408_after_timeout_client() {
    request_body_that_stops(Path::Ours).await;
}

#[tokio::test]
async fn hyper_path_a_request_body_that_stops_is_408_after_timeout_client() {
    let proxy = request_body_that_stops(Path::Hyper).await;
    let front = proxy.local_addrs()[0];
    // HTTP/2: a stream whose body never ends.
    let (mut send, _conn) = h2c(front).await;
    let req = hyper::Request::post(format!("http://{front}/"))
        .body(Endless(false))
        .unwrap();
    let resp = tokio::time::timeout(GIVE_UP, send.send_request(req)).await;
    let resp = resp.expect("the stream still waits");
    assert_eq!(
        resp.map(|r| r.status()).ok(),
        Some(http::StatusCode::REQUEST_TIMEOUT)
    );
}

/// Returns the proxy, for hyper's path to go on over HTTP/2.
async fn request_body_that_stops(path: Path) -> Proxy {
    // The server waits for the whole body, within its default 30 s.
    let server = server(|mut s| async move {
        read_head(&mut s).await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    })
    .await;
    let proxy = start(path, server, |fe| fe.timeout_client = LIMIT, |_| {}).await;
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
        .await
        .unwrap();
    let out = until_closed(&mut s).await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
    proxy
}

/// Sends pipelined requests for a big answer on `s` and never reads.
async fn never_read<S: AsyncWrite + Unpin>(s: &mut S) {
    let one = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
    s.write_all(one.repeat(3).as_bytes()).await.unwrap();
    s.flush().await.unwrap();
}

#[tokio::test]
async fn a_client_that_never_reads_is_closed_after_timeout_client() {
    // 16 MiB answers: more than the socket buffers on both sides hold.
    let server = big_server(16 << 20).await;
    let mut fe = local_frontend();
    fe.timeout_client = LIMIT;
    let proxy = start_proxy(fe, pool(server)).await;
    let mut s = small_window_connect(proxy.local_addrs()[0]).await;
    never_read(&mut s).await;
    until_freed(&proxy).await;
    // The same over TLS.
    let dir = TempDir::new("slow-read");
    let (cert, _) = write_cert(&dir, "one", &["one.test"]);
    let mut fe = local_frontend();
    fe.timeout_client = LIMIT;
    fe.tls = Some(TlsConfig {
        certs: vec![cert],
        default_cert: None,
        ..TlsConfig::default()
    });
    let proxy = start_proxy(fe, pool(server)).await;
    let (mut tls, _) = tls_connect(proxy.local_addrs()[0], None, &[b"http/1.1"], false).await;
    never_read(&mut tls).await;
    until_freed(&proxy).await;
    drop((s, tls));
}

#[tokio::test]
async fn a_tls_handshake_that_stops_halfway_is_closed_after_timeout_http_request() {
    let dir = TempDir::new("slow-tls");
    let (cert, _) = write_cert(&dir, "one", &["one.test"]);
    let mut fe = local_frontend();
    fe.timeout_http_request = LIMIT;
    fe.tls = Some(TlsConfig {
        certs: vec![cert],
        default_cert: None,
        ..TlsConfig::default()
    });
    let proxy = start_proxy(fe, pool(big_server(10).await)).await;
    // A handshake record announcing 512 bytes, of which a few come.
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    s.write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03abcdefgh")
        .await
        .unwrap();
    assert_eq!(until_closed(&mut s).await, "");
}

// --- servers ---------------------------------------------------------------------

/// A server that answers with a head sent a byte every 50 ms, forever.
async fn trickling_head_server() -> SocketAddr {
    server(|mut s| async move {
        read_head(&mut s).await;
        let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
        loop {
            if s.write_all(b"X").await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await
}

/// A server that reads a request head only, and keeps the connection.
async fn deaf_server() -> SocketAddr {
    server(|mut s| async move {
        read_head(&mut s).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await
}

/// Sends a 64 MiB request body to `front` (as long as it is taken) and
/// returns what comes back until the proxy closes the connection.
async fn post_big_body(front: SocketAddr) -> String {
    let s = TcpStream::connect(front).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let size = 64 << 20;
    tokio::spawn(async move {
        let head = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n");
        w.write_all(head.as_bytes()).await.unwrap();
        let chunk = vec![0u8; 64 * 1024];
        for _ in 0..size / chunk.len() {
            if w.write_all(&chunk).await.is_err() {
                return;
            }
        }
    });
    until_closed(&mut r).await
}

#[tokio::test]
async fn a_server_that_trickles_its_head_is_504_after_timeout_server() {
    // A byte every 50 ms: each within the limit, which bounds the whole head.
    let mut p = pool(trickling_head_server().await);
    p.timeout_server = LIMIT;
    let proxy = start_proxy(local_frontend(), p).await;
    let out = get_once(proxy.local_addrs()[0]).await;
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
}

/// A server that answers a head and 10 bytes of a 100-byte body, then stalls.
async fn stalling_body_server() -> SocketAddr {
    server(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            .await;
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
    })
    .await
}

#[tokio::test]
async fn a_server_that_stops_mid_body_is_cut_after_timeout_server() {
    server_that_stops_mid_body(Path::Ours).await;
}

#[tokio::test]
async fn hyper_path_a_server_that_stops_mid_body_is_cut_after_timeout_server() {
    let proxy = server_that_stops_mid_body(Path::Hyper).await;
    let front = proxy.local_addrs()[0];
    // HTTP/2: the stream fails, the connection goes on.
    let (mut send, _conn) = h2c(front).await;
    let resp = send.send_request(get(front)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let body = tokio::time::timeout(GIVE_UP, resp.into_body().collect()).await;
    assert!(body.expect("the body still waits").is_err());
    assert!(!send.is_closed());
}

/// Returns the proxy, for hyper's path to go on over HTTP/2.
async fn server_that_stops_mid_body(path: Path) -> Proxy {
    let proxy = start(
        path,
        stalling_body_server().await,
        |_| {},
        |p| p.timeout_server = LIMIT,
    )
    .await;
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let out = until_closed(&mut s).await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("0123456789"),
        "{out}"
    );
    proxy
}

#[tokio::test]
async fn a_server_that_stops_reading_a_body_is_504_after_timeout_server() {
    big_body_is_504_after_timeout_server(Path::Ours, deaf_server().await).await;
}

#[tokio::test]
async fn hyper_path_servers_that_trickle_a_head_or_stop_reading_are_504_after_timeout_server() {
    // Ours has its own test for a trickled head, with a GET.
    for server in [trickling_head_server().await, deaf_server().await] {
        big_body_is_504_after_timeout_server(Path::Hyper, server).await;
    }
}

async fn big_body_is_504_after_timeout_server(path: Path, server: SocketAddr) {
    let proxy = start(path, server, |_| {}, |p| p.timeout_server = LIMIT).await;
    let out = post_big_body(proxy.local_addrs()[0]).await;
    assert!(out.starts_with("HTTP/1.1 504"), "{out}");
}

/// An h2c server that answers the first request of each connection, and
/// on the same connection then stops answering (the connection stays up,
/// PINGs are still answered): no head at all, or a head and 4 bytes of a
/// body that never ends. Counts the connections it accepted.
async fn h2_server_stalling_after_one(stall_body: bool) -> (SocketAddr, Arc<AtomicUsize>) {
    use http_body_util::Either;
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let addr = server(move |s| {
        count.fetch_add(1, Ordering::SeqCst);
        let served = Arc::new(AtomicUsize::new(0));
        async move {
            let svc = hyper::service::service_fn(move |_req| {
                let first = served.fetch_add(1, Ordering::SeqCst) == 0;
                async move {
                    let body = match (first, stall_body) {
                        (true, _) => Either::Left(Full::new(Bytes::from_static(b"ok"))),
                        (false, true) => Either::Right(Endless(false)),
                        (false, false) => std::future::pending().await,
                    };
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
                }
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(s), svc)
                .await;
        }
    })
    .await;
    (addr, accepted)
}

#[tokio::test]
async fn a_shared_h2_connection_that_stops_answering_is_replaced_after_timeout_server() {
    // Its stalled request is a 504 (no head) or cut (mid-body); the next
    // one must not be sent on the same connection again.
    for stall_body in [false, true] {
        let (server, accepted) = h2_server_stalling_after_one(stall_body).await;
        let mut p = pool(server);
        p.h2 = true;
        p.timeout_server = LIMIT;
        let proxy = start_proxy(local_frontend(), p).await;
        let front = proxy.local_addrs()[0];
        let mut answers = Vec::new();
        for _ in 0..3 {
            answers.push(get_once(front).await);
        }
        let [ok, stalled, next] = &answers[..] else {
            unreachable!()
        };
        assert!(ok.starts_with("HTTP/1.1 200") && ok.ends_with("ok"), "{ok}");
        match stall_body {
            false => assert!(stalled.starts_with("HTTP/1.1 504"), "{stalled}"),
            true => assert!(
                stalled.starts_with("HTTP/1.1 200") && !stalled.ends_with("0\r\n\r\n"),
                "{stalled}"
            ),
        }
        assert!(
            next.starts_with("HTTP/1.1 200") && next.ends_with("ok"),
            "body stall {stall_body}: {next}"
        );
        assert_eq!(accepted.load(Ordering::SeqCst), 2);
    }
}

#[tokio::test]
async fn a_tls_server_that_never_handshakes_is_503_after_timeout_server() {
    // Accepts, keeps the connection, says nothing.
    let held = Arc::new(Mutex::new(Vec::new()));
    let keep = held.clone();
    let server = server(move |s| {
        keep.lock().unwrap().push(s);
        async {}
    })
    .await;
    let mut p = pool(server);
    p.tls = true;
    p.verify = false;
    p.retries = 0;
    p.timeout_server = LIMIT;
    let proxy = start_proxy(local_frontend(), p).await;
    let out = get_once(proxy.local_addrs()[0]).await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert_eq!(held.lock().unwrap().len(), 1);
}

// --- tunnels -----------------------------------------------------------------------

/// A WebSocket server that floods the tunnel once it is open; how long
/// after its 101 the flood stopped (the tunnel closed) goes to `lasted`.
async fn flooding_server(lasted: Arc<Mutex<Option<Duration>>>) -> SocketAddr {
    server(move |mut s| {
        let lasted = lasted.clone();
        async move {
            read_head(&mut s).await;
            let _ = s.write_all(ws_switching(WS_ACCEPT).as_bytes()).await;
            let t = Instant::now();
            let chunk = vec![b'w'; 64 * 1024];
            while s.write_all(&chunk).await.is_ok() {}
            *lasted.lock().unwrap() = Some(t.elapsed());
        }
    })
    .await
}

#[tokio::test]
async fn a_tunnel_whose_client_never_reads_closes_after_timeout_tunnel() {
    let server = flooding_server(Arc::default()).await;
    let mut p = pool(server);
    p.timeout_tunnel = Some(LIMIT);
    let proxy = start_proxy(local_frontend(), p).await;
    let mut s = small_window_connect(proxy.local_addrs()[0]).await;
    s.write_all(WS_UPGRADE).await.unwrap();
    until_freed(&proxy).await;
    drop(s);
}

/// A server answering a WebSocket upgrade with 101, then echoing what comes
/// until the client closes, and any other request with `ok`.
async fn ws_or_ok_server() -> SocketAddr {
    server(|mut s| async move {
        loop {
            let head = read_head(&mut s).await.to_ascii_lowercase();
            if head.is_empty() {
                return;
            }
            if !head.contains("upgrade: websocket") {
                let ok = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";
                let _ = s.write_all(ok.as_bytes()).await;
                continue;
            }
            let _ = s.write_all(ws_switching(WS_ACCEPT).as_bytes()).await;
            let (mut r, mut w) = s.split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            return;
        }
    })
    .await
}

/// Checks that a connection to `front` (of a frontend with max_connections
/// = 1, its one slot taken) is not served, then returns it, its request sent.
async fn waits_for_a_slot(front: SocketAddr, what: &str) -> TcpStream {
    let mut s = TcpStream::connect(front).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut byte = [0u8; 1];
    let early = tokio::time::timeout(Duration::from_millis(500), s.read(&mut byte)).await;
    assert!(early.is_err(), "{what}: served beyond max_connections");
    s
}

#[tokio::test]
async fn an_open_tunnel_holds_its_connection_slot_on_both_paths() {
    let server = ws_or_ok_server().await;
    // One test for both: each message names its path.
    for path in [Path::Ours, Path::Hyper] {
        let proxy = start(path, server, |fe| fe.max_connections = 1, |_| {}).await;
        let front = proxy.local_addrs()[0];
        let current = || proxy.stats().frontends()[0].current_connections;
        // An open keep-alive connection holds the one slot...
        let mut kept = TcpStream::connect(front).await.unwrap();
        kept.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut kept).await;
        assert!(head.starts_with("HTTP/1.1 200"), "{path}: {head}");
        let mut second = waits_for_a_slot(front, &format!("{path}, keep-alive")).await;
        assert_eq!(current(), 1, "{path}, keep-alive");
        drop(kept);
        let out = until_closed(&mut second).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{path}: {out}");
        // ...and so does an open tunnel, until it closes.
        let mut tunnel = TcpStream::connect(front).await.unwrap();
        tunnel.write_all(WS_UPGRADE).await.unwrap();
        let head = read_head(&mut tunnel).await;
        assert!(head.starts_with("HTTP/1.1 101"), "{path}: {head}");
        tunnel.write_all(b"ping").await.unwrap();
        let mut back = [0u8; 4];
        tunnel.read_exact(&mut back).await.unwrap();
        assert_eq!(&back, b"ping");
        assert_eq!(current(), 1, "{path}, tunnel");
        let mut second = waits_for_a_slot(front, &format!("{path}, tunnel")).await;
        assert_eq!(current(), 1, "{path}, tunnel");
        drop(tunnel);
        let out = until_closed(&mut second).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{path}: {out}");
    }
}

// --- hyper's path --------------------------------------------------------------
//
// HTTP/2 clients, and HTTP/1 ones of a frontend that can reach an `h2` pool.

/// An HTTP/2 (prior knowledge) client connection to `addr` whose windows
/// stay at the protocol's initial 65535 bytes, and its task.
async fn h2c<B>(
    addr: SocketAddr,
) -> (
    hyper::client::conn::http2::SendRequest<B>,
    tokio::task::JoinHandle<hyper::Result<()>>,
)
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    h2_handshake_window(TcpStream::connect(addr).await.unwrap(), Some(65535)).await
}

fn get(addr: SocketAddr) -> hyper::Request<Empty<Bytes>> {
    hyper::Request::get(format!("http://{addr}/"))
        .body(Empty::new())
        .unwrap()
}

#[tokio::test]
async fn hyper_path_a_client_that_never_reads_is_closed_after_timeout_client() {
    capture_access_log();
    let server = big_server(16 << 20).await;
    let proxy = hyper_path_proxy(server, |fe| fe.timeout_client = LIMIT, |_| {}).await;
    let front = proxy.local_addrs()[0];
    let mut s = small_window_connect(front).await;
    s.write_all(b"GET /never-read HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    until_freed(&proxy).await;
    // Logged as a client timeout during the data, not a client that left.
    let lines = access_lines();
    let line = lines.iter().find(|l| l.contains("/never-read"));
    assert!(line.is_some_and(|l| l.contains(" cD")), "{line:?}");
    // HTTP/2: a client that takes the head and never opens its window
    // again (no WINDOW_UPDATE) for the body.
    let (mut send, conn) = h2c(front).await;
    let resp = send.send_request(get(front)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let ended = tokio::time::timeout(GIVE_UP, conn).await;
    assert!(ended.is_ok(), "the proxy kept the connection");
    drop((s, resp));
}

#[tokio::test]
async fn hyper_path_an_http2_client_giving_no_window_from_the_start_is_closed_after_timeout_client()
{
    // A stream window of 0 from the first SETTINGS: hyper sends the
    // answer's head and waits for room before it asks for any of the body.
    // PINGs every 100 ms keep the connection busy; the server connection
    // the answer holds must still be let go after timeout_client.
    let proxy = hyper_path_proxy(
        big_server(1 << 20).await,
        |fe| fe.timeout_client = LIMIT,
        |_| {},
    )
    .await;
    let front = proxy.local_addrs()[0];
    let io = TcpStream::connect(front).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::Builder::new(TokioExecutor::new())
        .timer(hyper_util::rt::TokioTimer::new())
        .initial_stream_window_size(0)
        .keep_alive_interval(Duration::from_millis(100))
        .keep_alive_while_idle(true)
        .handshake::<_, Empty<Bytes>>(TokioIo::new(io))
        .await
        .unwrap();
    let conn = tokio::spawn(conn);
    let resp = send.send_request(get(front)).await.unwrap();
    assert_eq!(resp.status(), 200);
    let t = Instant::now();
    let ended = tokio::time::timeout(GIVE_UP, conn).await;
    assert!(ended.is_ok(), "the proxy kept the connection");
    assert!(t.elapsed() >= LIMIT / 2, "closed after {:?}", t.elapsed());
    let t = Instant::now();
    while proxy.stats().frontends()[0].current_connections > 0 {
        assert!(t.elapsed() < GIVE_UP, "the connection is still served");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    drop(resp);
}

/// A request body that sends one frame and then never ends.
struct Endless(bool);

impl hyper::body::Body for Endless {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Bytes>, Self::Error>>> {
        if std::mem::replace(&mut self.0, true) {
            return std::task::Poll::Pending;
        }
        std::task::Poll::Ready(Some(Ok(hyper::body::Frame::data(Bytes::from_static(
            b"0123",
        )))))
    }
}

#[tokio::test]
async fn hyper_path_an_http2_client_that_stops_mid_frame_is_closed_after_timeout_client() {
    let proxy =
        hyper_path_proxy(big_server(10).await, |fe| fe.timeout_client = LIMIT, |_| {}).await;
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    // The preface, an empty SETTINGS frame, then 5 of a frame header's 9 bytes.
    s.write_all(
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00\x00\x00\x10\x01\x04",
    )
    .await
    .unwrap();
    until_closed(&mut s).await;
}

#[tokio::test]
async fn hyper_path_a_tunnel_whose_client_never_reads_closes_after_timeout_tunnel() {
    // timeout_client is shorter: a tunnel has timeout_tunnel instead.
    let lasted = Arc::new(Mutex::new(None));
    let server = flooding_server(lasted.clone()).await;
    let tunnel = Duration::from_millis(1200);
    let proxy = hyper_path_proxy(
        server,
        |fe| fe.timeout_client = LIMIT,
        |p| p.timeout_tunnel = Some(tunnel),
    )
    .await;
    let mut s = small_window_connect(proxy.local_addrs()[0]).await;
    s.write_all(WS_UPGRADE).await.unwrap();
    let t = Instant::now();
    while lasted.lock().unwrap().is_none() {
        assert!(t.elapsed() < GIVE_UP, "the tunnel is still open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let lasted = lasted.lock().unwrap().unwrap();
    assert!(lasted >= tunnel, "closed after {lasted:?}");
    drop(s);
}

#[tokio::test]
async fn a_tunnel_whose_server_never_reads_closes_after_timeout_tunnel() {
    // The client sends 1 MiB right behind its upgrade request; the server
    // (with a small receive buffer) reads none of it. What came with the
    // request head (one read, at most 16 KiB) is written before the tunnel
    // starts and fits in the socket's buffer; the rest stops the tunnel.
    let socket = TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(2048).unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let server = serve_on(socket.listen(16).unwrap(), |mut s| async move {
        read_head(&mut s).await;
        let _ = s.write_all(ws_switching(WS_ACCEPT).as_bytes()).await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    });
    let mut p = pool(server);
    p.timeout_tunnel = Some(LIMIT);
    let proxy = start_proxy(local_frontend(), p).await;
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    let mut bytes = WS_UPGRADE.to_vec();
    bytes.extend_from_slice(&[b'w'; 1 << 20]);
    let (mut r, mut w) = s.split();
    let (_, out) = tokio::join!(w.write_all(&bytes), until_closed(&mut r));
    assert!(out.starts_with("HTTP/1.1 101"), "{out}");
}

#[tokio::test]
async fn a_server_whose_backlog_is_full_is_503_after_timeout_connect() {
    // A listener that never accepts, its backlog filled: the kernel drops
    // further SYNs, so a connect waits.
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind("127.0.0.1:0".parse().unwrap()).unwrap();
    let listener = socket.listen(1).unwrap();
    let server = listener.local_addr().unwrap();
    let mut fillers = Vec::new();
    loop {
        let connect = TcpStream::connect(server);
        match tokio::time::timeout(Duration::from_millis(200), connect).await {
            Ok(s) => fillers.push(s.unwrap()),
            Err(_) => break,
        }
        assert!(fillers.len() < 64, "the backlog never filled");
    }
    let mut p = pool(server);
    p.timeout_connect = LIMIT;
    p.retries = 0;
    let proxy = start_proxy(local_frontend(), p).await;
    let t = Instant::now();
    let out = get_once(proxy.local_addrs()[0]).await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(t.elapsed() >= LIMIT - Duration::from_millis(50));
    drop((listener, fillers));
}

#[tokio::test]
async fn hyper_path_an_http2_client_trickling_frames_without_a_request_is_closed() {
    // The preface, then frames sent a byte every 20 ms, none a request: an
    // idle connection's limit counts from when it became idle.
    let proxy = hyper_path_proxy(
        big_server(10).await,
        |fe| {
            fe.timeout_client = LIMIT;
            fe.timeout_http_request = LIMIT;
        },
        |_| {},
    )
    .await;
    let s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    let (mut r, mut w) = s.into_split();
    tokio::spawn(async move {
        let mut bytes =
            b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00".to_vec();
        // PING frames.
        for _ in 0..20 {
            bytes.extend_from_slice(b"\x00\x00\x08\x06\x00\x00\x00\x00\x00pingping");
        }
        for b in bytes {
            if w.write_all(&[b]).await.is_err() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    until_closed(&mut r).await;
}
