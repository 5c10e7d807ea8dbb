//! End-to-end tests of the proxy's edges: request smuggling defences (raw TCP),
//! WebSocket tunnels and the PROXY protocol.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backends::{
    WS_ACCEPT, WS_KEY, WS_UPGRADE, http1_server, read_head, serve_http1, server, ws_switching,
};
use crate::support::{local_frontend, one_server_pool, read_until_closed, start_proxy};
use lb_proxy::*;

/// A backend that counts the requests it receives and answers with their body
/// and `X-Forwarded-For`.
async fn counting_backend() -> (SocketAddr, Arc<AtomicUsize>) {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    let addr = http1_server(move |req: Request<Incoming>| {
        seen.fetch_add(1, Ordering::SeqCst);
        async move {
            let xff = req
                .headers()
                .get("x-forwarded-for")
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string();
            let body = req.into_body().collect().await?.to_bytes();
            Ok::<_, hyper::Error>(
                hyper::Response::builder()
                    .header("x-xff", xff)
                    .body(Full::new(body))
                    .unwrap(),
            )
        }
    })
    .await;
    (addr, count)
}

/// Writes `bytes`, then reads until the proxy closes the connection (5 s at most).
async fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
    assert!(
        read.is_ok(),
        "connection not closed; got {:?}",
        String::from_utf8_lossy(&out)
    );
    String::from_utf8_lossy(&out).into_owned()
}

// --- request smuggling -------------------------------------------------------

const SMUGGLING: &[(&str, &str)] = &[
    (
        "CL and TE",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE and CL",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
    ),
    (
        "two different CL",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
    ),
    (
        "two equal CL",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhello",
    ),
    (
        "CL list",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\nhello",
    ),
    (
        "signed CL",
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\nhello",
    ),
    (
        "bad chunk size",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "bad second chunk",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n0\r\n\r\n",
    ),
    (
        "chunk data overrun",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhello\r\n0\r\n\r\n",
    ),
    (
        "obs-fold",
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n continued\r\n\r\n",
    ),
    (
        "obs-fold tab",
        "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n\tcontinued\r\n\r\n",
    ),
    ("space before colon", "GET / HTTP/1.1\r\nHost : x\r\n\r\n"),
    (
        "TE gzip, chunked",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE chunked, identity",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE twice",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE xchunked",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    ),
    (
        "TE in HTTP/1.0",
        "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    ),
    ("two Host", "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n"),
    ("no Host", "GET / HTTP/1.1\r\n\r\n"),
];

#[tokio::test]
async fn smuggling_attempts_get_400_and_are_never_forwarded() {
    let (addr, count) = counting_backend().await;
    let proxy = start_proxy(local_frontend(), one_server_pool(addr)).await;
    let front = proxy.local_addrs()[0];
    for (name, req) in SMUGGLING {
        let out = raw_exchange(front, req.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{name}: {out:?}");
        assert_eq!(count.load(Ordering::SeqCst), 0, "{name} was forwarded");
    }
}

#[tokio::test]
async fn smuggling_after_a_good_request_on_the_same_connection() {
    let (addr, count) = counting_backend().await;
    let proxy = start_proxy(local_frontend(), one_server_pool(addr)).await;
    let front = proxy.local_addrs()[0];
    for (name, bad) in SMUGGLING {
        count.store(0, Ordering::SeqCst);
        let good = "POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n";
        let out = raw_exchange(front, format!("{good}{bad}").as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{name}: {out:?}");
        assert!(out.contains("hello"), "{name}: {out:?}");
        let second = out.find("\r\n\r\nhello").map(|i| &out[i..]).unwrap_or("");
        assert!(second.contains("HTTP/1.1 400"), "{name}: {out:?}");
        assert_eq!(count.load(Ordering::SeqCst), 1, "{name} was forwarded");
    }
}

#[tokio::test]
async fn valid_framings_still_work() {
    let (addr, count) = counting_backend().await;
    let proxy = start_proxy(local_frontend(), one_server_pool(addr)).await;
    let front = proxy.local_addrs()[0];
    // Content-Length, chunked with extension and trailer, then a bodiless GET, pipelined.
    let reqs = concat!(
        "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc",
        "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n",
        "3;x=y\r\ndef\r\n2\r\ngh\r\n0\r\nX-Trailer: 1\r\n\r\n",
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    );
    let out = raw_exchange(front, reqs.as_bytes()).await;
    assert_eq!(out.matches("HTTP/1.1 200").count(), 3, "{out}");
    assert!(out.contains("abc") && out.contains("defgh"), "{out}");
    assert_eq!(count.load(Ordering::SeqCst), 3);

    // A chunked body trickling in byte by byte, after the head.
    let mut s = TcpStream::connect(front).await.unwrap();
    s.write_all(
        b"POST / HTTP/1.1\r\nHost: x\r\nConnection: close\r\nTransfer-Encoding: chunked\r\n\r\n",
    )
    .await
    .unwrap();
    for b in b"4\r\nslow\r\n0\r\n\r\n" {
        tokio::time::sleep(Duration::from_millis(5)).await;
        s.write_all(&[*b]).await.unwrap();
    }
    let out = read_until_closed(&mut s).await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("slow"),
        "{out}"
    );
}

// --- WebSocket tunnels --------------------------------------------------------

/// A WebSocket request head for `/chat` with `extra` lines, Connection: Upgrade.
fn ws_request(extra: &str) -> String {
    format!(
        "GET /chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n{extra}\r\n"
    )
}

/// A WebSocket-ish backend: answers an `Upgrade: websocket` request with 101
/// carrying `accept` as Sec-WebSocket-Accept (none if empty), then echoes bytes.
async fn ws_echo_backend(accept: &'static str) -> SocketAddr {
    server(move |mut s| async move {
        let head = read_head(&mut s).await.to_ascii_lowercase();
        if !head.contains("upgrade: websocket") || !head.contains("connection: upgrade") {
            let _ = s
                .write_all(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
                .await;
            return;
        }
        if s.write_all(ws_switching(accept).as_bytes()).await.is_err() {
            return;
        }
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

#[tokio::test]
async fn websocket_upgrade_is_tunnelled_until_idle() {
    let backend = ws_echo_backend(WS_ACCEPT).await;
    let mut fe = local_frontend();
    // Shorter than the pauses below: a tunnel is not an idle keep-alive connection.
    fe.timeout_http_keep_alive = Duration::from_millis(150);
    let mut pool = one_server_pool(backend);
    pool.timeout_tunnel = Some(Duration::from_millis(600));
    let proxy = start_proxy(fe, pool).await;
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    s.write_all(WS_UPGRADE).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(
        head.to_ascii_lowercase().contains("upgrade: websocket"),
        "{head}"
    );
    for msg in [&b"hello"[..], b"\x81\x05world", b"GET / HTTP/1.1\r\n\r\n"] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    // Idle for longer than timeout_tunnel: the proxy closes the tunnel.
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut rest)).await;
    assert!(closed.is_ok() && rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn a_websocket_is_logged_when_its_tunnel_ends_on_both_paths() {
    crate::support::capture_access_log();
    let backend = ws_echo_backend(WS_ACCEPT).await;
    let short = |pool: &mut Pool| pool.timeout_tunnel = Some(Duration::from_millis(1000));
    let own = {
        let mut pool = one_server_pool(backend);
        short(&mut pool);
        start_proxy(local_frontend(), pool).await
    };
    let hyper = crate::support::hyper_path_proxy(backend, |_| {}, short).await;
    for (path, proxy) in [("own", &own), ("hyper", &hyper)] {
        // Closed by the client after 5 bytes each way and 300 ms.
        let (mut s, me) = open_websocket(proxy, path).await;
        echoes(&mut s).await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        // By client and server: another test's client may have had this port.
        let (prefix, to) = (format!("{me} "), format!("/{backend} "));
        let early = crate::support::access_lines();
        let early = early
            .iter()
            .find(|l| l.starts_with(&prefix) && l.contains(&to));
        assert_eq!(early, None, "{path}: logged while the tunnel is open");
        drop(s);
        let line = crate::support::access_line_of(me, backend).await;
        let line = line.unwrap_or_else(|| panic!("{path}: no line"));
        let f: Vec<&str> = line.split_whitespace().collect();
        // client [date] frontend pool/server Tq/Tw/Tc/Tr/Tt status bytes flags "request"
        let tt: i64 = f[4].rsplit('/').next().unwrap().parse().unwrap();
        assert!(
            (300..1000).contains(&tt),
            "{path}: Tt is the session's: {line}"
        );
        assert_eq!((f[5], f[6], f[7]), ("101", "5", "----"), "{path}: {line}");
        // Left idle: closed after timeout_tunnel, a client-side data timeout.
        let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
        let me = s.local_addr().unwrap();
        s.write_all(WS_UPGRADE).await.unwrap();
        read_head(&mut s).await;
        let rest = read_until_closed(&mut s).await;
        assert!(rest.is_empty(), "{rest}");
        let line = crate::support::access_line_of(me, backend).await;
        let line = line.unwrap_or_else(|| panic!("{path}: no line after the timeout"));
        let f: Vec<&str> = line.split_whitespace().collect();
        assert_eq!((f[5], f[6], f[7]), ("101", "0", "cD--"), "{path}: {line}");
    }
}

#[tokio::test]
async fn upgrade_refused_by_the_server_is_a_plain_response() {
    let (addr, count) = counting_backend().await;
    let proxy = start_proxy(local_frontend(), one_server_pool(addr)).await;
    let out = raw_exchange(
        proxy.local_addrs()[0],
        format!("GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes(),
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert_eq!(count.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn websocket_handshakes_are_checked_both_ways() {
    // A request without a key or version: 400, never forwarded.
    let (addr, count) = counting_backend().await;
    let proxy = start_proxy(local_frontend(), one_server_pool(addr)).await;
    for extra in [
        String::new(),
        "Sec-WebSocket-Version: 13\r\n".to_string(),
        format!("Sec-WebSocket-Key: {WS_KEY}\r\n"),
        "Sec-WebSocket-Key: c2hvcnQ=\r\nSec-WebSocket-Version: 13\r\n".to_string(),
        format!("Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 8\r\n"),
    ] {
        let out = raw_exchange(proxy.local_addrs()[0], ws_request(&extra).as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 400"), "{extra:?}: {out}");
    }
    assert_eq!(count.load(Ordering::SeqCst), 0);
    // A 101 whose Sec-WebSocket-Accept is missing or wrong: 502, no tunnel.
    for accept in ["", "AAAAAAAAAAAAAAAAAAAAAAAAAAA="] {
        let backend = ws_echo_backend(accept).await;
        let proxy = start_proxy(local_frontend(), one_server_pool(backend)).await;
        let out = raw_exchange(proxy.local_addrs()[0], WS_UPGRADE).await;
        assert!(out.starts_with("HTTP/1.1 502"), "{accept:?}: {out}");
    }
}

/// An h2c-upgrading server, as the smuggling attack needs one: answers a
/// request that asks `Upgrade: h2c` with 101 and then echoes whatever comes
/// (the client's HTTP/2, unseen by the proxy), any other with 200 "plain".
/// Each request head it got goes to the returned list.
async fn h2c_upgrading_server() -> (SocketAddr, Arc<std::sync::Mutex<Vec<String>>>) {
    let heads = Arc::new(std::sync::Mutex::new(Vec::new()));
    let seen = heads.clone();
    let addr = server(move |mut s| {
        let seen = seen.clone();
        async move {
            let head = read_head(&mut s).await.to_ascii_lowercase();
            seen.lock().unwrap().push(head.clone());
            if head.contains("upgrade: h2c") {
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n\r\n")
                    .await;
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            } else {
                let _ = s
                    .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain")
                    .await;
            }
        }
    })
    .await;
    (addr, heads)
}

#[tokio::test]
async fn upgrades_to_h2c_or_other_http_are_forwarded_as_plain_requests() {
    // h2c smuggling: a tunnel to a server that speaks HTTP/2 in it would let
    // the client send requests no ACL of the frontend ever sees.
    let (addr, heads) = h2c_upgrading_server().await;
    let own = start_proxy(local_frontend(), one_server_pool(addr)).await;
    let hyper = crate::support::hyper_path_proxy(addr, |_| {}, |_| {}).await;
    for proxy in [&own, &hyper] {
        for (upgrade, connection) in [
            ("h2c", "Upgrade, HTTP2-Settings, close"),
            ("H2C", "upgrade, close"),
            ("h2c, TLS/1.2", "Upgrade, close"),
            ("HTTP/2.0", "Upgrade, close"),
            // Upgrade without `Connection: upgrade`: hop-by-hop all the same.
            ("h2c", "close"),
        ] {
            let out = raw_exchange(
                proxy.local_addrs()[0],
                format!(
                    "GET /x HTTP/1.1\r\nHost: x\r\nUpgrade: {upgrade}\r\nConnection: {connection}\r\n\
                     HTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
                )
                .as_bytes(),
            )
            .await;
            assert!(out.starts_with("HTTP/1.1 200"), "{upgrade}: {out}");
            assert!(out.ends_with("plain"), "{upgrade}: {out}");
            let head = heads.lock().unwrap().pop().unwrap();
            assert!(!head.contains("upgrade"), "{upgrade}: forwarded {head}");
        }
    }
    // WebSocket beside h2c still upgrades, as WebSocket only.
    let addr = ws_echo_backend(WS_ACCEPT).await;
    let proxy = start_proxy(local_frontend(), one_server_pool(addr)).await;
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    let ws = String::from_utf8_lossy(WS_UPGRADE)
        .replace("Upgrade: websocket", "Upgrade: h2c, websocket");
    s.write_all(ws.as_bytes()).await.unwrap();
    let head = read_head(&mut s).await.to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 101"), "{head}");
    assert!(head.contains("upgrade: websocket"), "{head}");
}

#[tokio::test]
async fn a_101_nobody_asked_for_is_a_502_on_every_path() {
    // A server that switches protocols whatever it is asked.
    let addr = server(|mut s| async move {
        read_head(&mut s).await;
        let _ = s
            .write_all(
                b"HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: x\r\n\r\n",
            )
            .await;
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let own = start_proxy(local_frontend(), one_server_pool(addr)).await;
    let hyper = crate::support::hyper_path_proxy(addr, |_| {}, |_| {}).await;
    for proxy in [&own, &hyper] {
        let out = raw_exchange(
            proxy.local_addrs()[0],
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 502"), "{out}");
        // Nor to a protocol the client did not ask for (RFC 9110 7.8).
        let out = raw_exchange(
            proxy.local_addrs()[0],
            b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade, close\r\nUpgrade: foo\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 502"), "{out}");
        // The one asked for becomes a tunnel, its client told what it is.
        let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: upgrade\r\nUpgrade: foo, X\r\n\r\n")
            .await
            .unwrap();
        let head = read_head(&mut s).await.to_ascii_lowercase();
        assert!(head.starts_with("http/1.1 101"), "{head}");
        assert!(head.contains("upgrade: x\r\n"), "{head}");
    }
    // HTTP/2 has no 101: the stream's answer is a 502 too.
    let io = TcpStream::connect(hyper.local_addrs()[0]).await.unwrap();
    let (mut send, _conn) = crate::support::h2_handshake(io).await;
    let req = Request::get(format!("http://{}/", hyper.local_addrs()[0]))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = tokio::time::timeout(Duration::from_secs(5), send.send_request(req))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(resp.status(), 502);
}

// --- PROXY protocol -----------------------------------------------------------

#[tokio::test]
async fn accept_proxy_v1_and_v2_set_the_client_address() {
    let (addr, count) = counting_backend().await;
    let mut fe = local_frontend();
    fe.accept_proxy = true;
    let proxy = start_proxy(fe, one_server_pool(addr)).await;
    let front = proxy.local_addrs()[0];
    let get = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    let cases = [
        (
            proxy_protocol::Version::V1,
            "203.0.113.7:5555",
            "203.0.113.7",
        ),
        (
            proxy_protocol::Version::V2,
            "203.0.113.8:5555",
            "203.0.113.8",
        ),
        (
            proxy_protocol::Version::V2,
            "[2001:db8::5]:5555",
            "2001:db8::5",
        ),
    ];
    for (v, src, want) in cases {
        let mut bytes = proxy_protocol::encode(v, src.parse().unwrap(), front);
        bytes.extend_from_slice(get);
        let out = raw_exchange(front, &bytes).await;
        assert!(out.starts_with("HTTP/1.1 200"), "{v:?}: {out}");
        assert!(out.contains(&format!("x-xff: {want}\r\n")), "{v:?}: {out}");
    }
    // No header, or a broken one: closed without an answer, nothing forwarded.
    let before = count.load(Ordering::SeqCst);
    for bytes in [&get[..], b"PROXY TCP4 1.2.3.4\r\nGET / HTTP/1.1\r\n\r\n"] {
        assert_eq!(raw_exchange(front, bytes).await, "");
    }
    assert_eq!(count.load(Ordering::SeqCst), before);
}

/// A backend that reads a PROXY header on each connection and answers with its source address.
async fn proxy_protocol_backend() -> SocketAddr {
    server(|mut stream| async move {
        let src = match proxy_protocol::read_header(&mut stream).await {
            Ok(Some((src, _))) => src.to_string(),
            other => format!("{other:?}"),
        };
        serve_http1(stream, move |_req: Request<Incoming>| {
            let src = src.clone();
            async move {
                Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                    bytes::Bytes::from(src),
                )))
            }
        })
        .await;
    })
    .await
}

#[tokio::test]
async fn send_proxy_v1_and_v2_carry_the_real_client() {
    let backend = proxy_protocol_backend().await;
    for v in [proxy_protocol::Version::V1, proxy_protocol::Version::V2] {
        let mut pool = one_server_pool(backend);
        pool.send_proxy = Some(v);
        let proxy = start_proxy(local_frontend(), pool).await;
        for _ in 0..2 {
            let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
            let me = s.local_addr().unwrap();
            s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let out = read_until_closed(&mut s).await;
            assert!(out.starts_with("HTTP/1.1 200"), "{v:?}: {out}");
            assert!(out.ends_with(&format!("\r\n\r\n{me}")), "{v:?}: {out}");
        }
    }
    // accept_proxy in front, send_proxy behind: the claimed client goes through.
    let mut fe = local_frontend();
    fe.accept_proxy = true;
    let mut pool = one_server_pool(backend);
    pool.send_proxy = Some(proxy_protocol::Version::V2);
    let proxy = start_proxy(fe, pool).await;
    let front = proxy.local_addrs()[0];
    let mut bytes = proxy_protocol::encode(
        proxy_protocol::Version::V1,
        "198.51.100.9:4242".parse().unwrap(),
        front,
    );
    bytes.extend_from_slice(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let out = raw_exchange(front, &bytes).await;
    assert!(out.ends_with("\r\n\r\n198.51.100.9:4242"), "{out}");
}

// --- fields the proxy writes ---------------------------------------------------

#[tokio::test]
async fn a_client_can_neither_name_away_nor_shadow_the_fields_the_proxy_writes() {
    let (backend, seen) =
        crate::backends::server_answering("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let rules = r#"
request_id_header = "X-Request-ID"
[[frontend.request]]
action = "set-header"
name = "X-Real-IP"
value = "%[src]"
"#;
    let cfg = crate::support::two_pool_config(backend, backend, rules, "");
    let router = routing::router(&cfg).unwrap();
    let proxy = Proxy::start(cfg, Some(router)).await.unwrap();
    let front = proxy.local_addrs()[0];
    let out = raw_exchange(
        front,
        b"GET / HTTP/1.1\r\nHost: x\r\n\
          Connection: close, X-Real-IP, X-Request-ID, X-Forwarded-Proto, Forwarded, X-Mine\r\n\
          X_Real_IP: 6.6.6.6\r\nX_Forwarded_For: 6.6.6.6\r\nX_Request_ID: forged\r\n\
          X-Forwarded-For: 10.9.9.9\r\nX-Forwarded-For: 10.8.8.8\r\n\
          X-Mine: hop\r\nX_Other: kept\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    let head = seen.lock().unwrap()[0].to_ascii_lowercase();
    // The proxy's own fields arrive, whatever the client's Connection named.
    assert!(head.contains("x-real-ip: 127.0.0.1\r\n"), "{head}");
    assert!(head.contains("x-forwarded-proto: http\r\n"), "{head}");
    assert!(
        head.contains("forwarded: for=127.0.0.1;proto=http\r\n"),
        "{head}"
    );
    assert_eq!(head.matches("x-request-id: ").count(), 1, "{head}");
    // Every X-Forwarded-For line of the client's is kept, ours appended.
    assert!(
        head.contains("x-forwarded-for: 10.9.9.9, 10.8.8.8, 127.0.0.1\r\n"),
        "{head}"
    );
    // Look-alikes of the proxy's fields are dropped; other fields named in
    // Connection go as hop-by-hop; an unrelated underscore field stays.
    for gone in [
        "x_real_ip",
        "x_forwarded_for",
        "x_request_id",
        "forged",
        "6.6.6.6",
        "x-mine",
    ] {
        assert!(!head.contains(gone), "{gone}: {head}");
    }
    assert!(head.contains("x_other: kept\r\n"), "{head}");
}

#[test]
fn edge_settings_from_toml() {
    let cfg: ProxyConfig = toml::from_str(
        r#"
        [[frontend]]
        name = "web"
        binds = ["127.0.0.1:8080"]
        default_pool = "app"
        accept_proxy = true
        timeout_tunnel = "2m"

        [[pool]]
        name = "app"
        send_proxy = "v1"
        timeout_tunnel = "1500ms"
        "#,
    )
    .unwrap();
    let (fe, p) = (&cfg.frontends[0], &cfg.pools[0]);
    assert!(fe.accept_proxy);
    assert_eq!(fe.timeout_tunnel, Some(Duration::from_secs(120)));
    assert_eq!(p.send_proxy, Some(proxy_protocol::Version::V1));
    assert_eq!(p.timeout_tunnel, Some(Duration::from_millis(1500)));
    let d: ProxyConfig = toml::from_str("[[pool]]\nname = 'x'").unwrap();
    assert_eq!(
        (d.pools[0].send_proxy, d.pools[0].timeout_tunnel),
        (None, None)
    );
    assert!(toml::from_str::<ProxyConfig>("[[pool]]\nname='x'\nsend_proxy='v3'").is_err());
}

/// A WebSocket through `proxy` (switched: its 101 read), and its client address.
async fn open_websocket(proxy: &Proxy, path: &str) -> (TcpStream, SocketAddr) {
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    let me = s.local_addr().unwrap();
    s.write_all(WS_UPGRADE).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{path}: {head}");
    (s, me)
}

/// Waits until the proxy closes `s` (nothing more read), then the access
/// line of its client `me` to `server`.
async fn closed_and_logged(
    s: &mut TcpStream,
    me: SocketAddr,
    server: SocketAddr,
    what: &str,
) -> String {
    let rest = tokio::time::timeout(crate::support::GIVE_UP, read_until_closed(s)).await;
    assert_eq!(rest.as_deref(), Ok(""), "{what}: closed");
    crate::support::access_line_of(me, server)
        .await
        .unwrap_or_else(|| panic!("{what}: no line"))
}

/// Sends "hello" and reads it back.
async fn echoes(s: &mut TcpStream) {
    s.write_all(b"hello").await.unwrap();
    let mut back = [0u8; 5];
    tokio::time::timeout(crate::support::GIVE_UP, s.read_exact(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(&back, b"hello");
}

#[tokio::test]
async fn a_server_marked_down_has_its_tunnels_and_sessions_shut_down_if_its_pool_says_so() {
    crate::support::capture_access_log();
    let backend = ws_echo_backend(WS_ACCEPT).await;
    let shut = |pool: &mut Pool| pool.on_marked_down = Some(OnMarkedDown::ShutdownSessions);
    let own = {
        let mut pool = one_server_pool(backend);
        shut(&mut pool);
        start_proxy(local_frontend(), pool).await
    };
    let hyper = crate::support::hyper_path_proxy(backend, |_| {}, shut).await;
    let left_alone = start_proxy(local_frontend(), one_server_pool(backend)).await;
    let mut kept = TcpStream::connect(left_alone.local_addrs()[0])
        .await
        .unwrap();
    kept.write_all(WS_UPGRADE).await.unwrap();
    assert!(read_head(&mut kept).await.starts_with("HTTP/1.1 101"));
    for (path, proxy) in [("own", &own), ("hyper", &hyper)] {
        let (mut s, me) = open_websocket(proxy, path).await;
        echoes(&mut s).await;
        assert!(proxy.server_marked_down("app", backend), "{path}");
        let line = closed_and_logged(&mut s, me, backend, path).await;
        let f: Vec<&str> = line.split_whitespace().collect();
        // client [date] frontend pool/server Tq/Tw/Tc/Tr/Tt status bytes flags "request"
        assert_eq!((f[5], &f[7][..2]), ("101", "DD"), "{path}: {line}");
    }
    // A pool without `on_marked_down` leaves its tunnels be.
    assert!(!left_alone.server_marked_down("app", backend));
    echoes(&mut kept).await;

    // A tcp session.
    let echo = server(|mut s| async move {
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await;
    let mut cfg = crate::support::two_pool_config(echo, echo, "mode = \"tcp\"", "");
    shut(&mut cfg.pools[0]);
    let tcp = Proxy::start(cfg, None).await.unwrap();
    let mut s = TcpStream::connect(tcp.local_addrs()[0]).await.unwrap();
    let me = s.local_addr().unwrap();
    echoes(&mut s).await;
    assert!(tcp.server_marked_down("app", echo));
    let line = closed_and_logged(&mut s, me, echo, "tcp").await;
    assert!(line.ends_with(" DD"), "tcp: {line}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tunnel_of_a_proxy_still_draining_after_a_reload_is_shut_down_with_its_server() {
    crate::support::capture_access_log();
    let backend = ws_echo_backend(WS_ACCEPT).await;
    let mut pool = one_server_pool(backend);
    pool.on_marked_down = Some(OnMarkedDown::ShutdownSessions);
    let cfg = ProxyConfig {
        frontends: vec![local_frontend()],
        pools: vec![pool],
        ..Default::default()
    };
    let threads = Threads {
        count: 1,
        hard_stop_after: Duration::from_secs(3600),
        ..Threads::default()
    };
    let first = Proxy::start_threads(cfg.clone(), None, &threads, None).unwrap();
    let (mut s, me) = open_websocket(&first, "first").await;
    echoes(&mut s).await;
    // A reload: the first proxy drains, its tunnel goes on.
    let second = Proxy::start_threads(cfg.clone(), None, &threads, Some(&first)).unwrap();
    drop(first);
    echoes(&mut s).await;
    assert!(second.server_marked_down("app", backend));
    let line = closed_and_logged(&mut s, me, backend, "draining").await;
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((f[5], &f[7][..2]), ("101", "DD"), "{line}");
    // By hand (`lb shutdown-sessions`, through the agent's ProxyStats):
    // a tunnel of the second proxy, draining after another reload.
    let (mut s, me) = open_websocket(&second, "second").await;
    echoes(&mut s).await;
    let third = Proxy::start_threads(cfg, None, &threads, Some(&second)).unwrap();
    drop(second);
    echoes(&mut s).await;
    assert!(third.stats().shutdown_sessions("app", backend));
    let line = closed_and_logged(&mut s, me, backend, "by hand").await;
    let f: Vec<&str> = line.split_whitespace().collect();
    assert_eq!((f[5], &f[7][..2]), ("101", "DD"), "{line}");
    drop(third);
}
