//! Messages that a proxy and a server could frame differently (issue #12's
//! audit), sent with raw sockets through both HTTP/1 paths: ours (proxy/h1)
//! and hyper's (behind `hardening::GuardIo`, used when a frontend can reach
//! an HTTP/2 pool). The servers are scripted raw TCP: they frame requests by
//! Content-Length only, so anything smuggled shows up as an extra head.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backends::{Seen, counting_server, http1_server, scripted_server, server_answering};
use crate::support::{
    PausedBody, h2_handshake, hyper_path_proxy, idle, local_frontend, one_server_pool, proxy_to,
    reset_streams, start_proxy, two_pool_config,
};
use lb_proxy::*;

/// One proxy per HTTP/1 path in front of `server`: ("ours", ..), ("hyper", ..).
async fn both_paths(server: SocketAddr) -> [(&'static str, Proxy); 2] {
    let ours = proxy_to(server).await;
    let hyper = hyper_path_proxy(server, |_| {}, |_| {}).await;
    [("ours", ours), ("hyper", hyper)]
}

/// Writes `bytes`, then reads what comes until the proxy closes or 1 s of quiet.
async fn exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(bytes).await.unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(Ok(n)) = tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
        if n == 0 {
            break;
        }
        out.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Waits for in-flight forwarding to settle, then returns the heads seen.
async fn seen_after_a_moment(seen: &Seen) -> Vec<String> {
    tokio::time::sleep(Duration::from_millis(100)).await;
    seen.lock().unwrap().clone()
}

const OK: &str = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok";

#[tokio::test]
async fn connection_never_removes_a_requests_framing() {
    let smuggled = "GET /SMUGGLED HTTP/1.1\r\nHost: x\r\n\r\n";
    let n = smuggled.len();
    let cases = [
        format!(
            "POST / HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nContent-Length: {n}\r\n\r\n{smuggled}"
        ),
        format!(
            "POST / HTTP/1.1\r\nHost: x\r\nConnection: close, Content-Length\r\nContent-Length: {n}\r\n\r\n{smuggled}"
        ),
        format!(
            "POST / HTTP/1.0\r\nHost: x\r\nConnection: keep-alive, content-length\r\nContent-Length: {n}\r\n\r\n{smuggled}"
        ),
        format!(
            "POST / HTTP/1.1\r\nHost: x\r\nConnection: content-length\r\nExpect: 100-continue\r\nContent-Length: {n}\r\n\r\n{smuggled}"
        ),
        format!(
            "POST / HTTP/1.1\r\nHost: x\r\nConnection: host, transfer-encoding\r\nContent-Length: {n}\r\n\r\n{smuggled}"
        ),
    ];
    let (server, seen) = server_answering(OK).await;
    for (path, proxy) in both_paths(server).await {
        for req in &cases {
            seen.lock().unwrap().clear();
            let out = exchange(proxy.local_addrs()[0], req.as_bytes()).await;
            assert!(out.contains("200 OK"), "{path}: {req:?}: {out}");
            let heads = seen_after_a_moment(&seen).await;
            assert_eq!(heads.len(), 1, "{path}: {req:?}: {heads:?}");
            let head = heads[0].to_ascii_lowercase();
            assert!(
                head.contains(&format!("content-length: {n}\r\n")),
                "{path}: {head}"
            );
            assert!(head.contains("host: x\r\n"), "{path}: {head}");
        }
    }
}

#[tokio::test]
async fn connection_never_removes_a_responses_framing() {
    let (server, _) = server_answering(
        "HTTP/1.1 200 OK\r\nConnection: content-length\r\nContent-Length: 5\r\n\r\nhello",
    )
    .await;
    for (path, proxy) in both_paths(server).await {
        let out = exchange(proxy.local_addrs()[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        assert!(
            out.to_ascii_lowercase().contains("content-length: 5\r\n"),
            "{path}: {out}"
        );
        assert!(out.ends_with("\r\n\r\nhello"), "{path}: {out}");
    }
}

#[tokio::test]
async fn bare_cr_and_bad_trailers_never_reach_the_server() {
    let head = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let hidden = "GET /HIDDEN HTTP/1.1\r\nHost: x\r\n\r\n";
    let bodies = [
        format!("0\r\nX: y\r\r{hidden}"),
        format!("0\r\nX: y\r\n\r{hidden}"),
        format!("1;a\rb\r\nz\r\n0\r\n\r\n{hidden}"),
        format!("0\r\nX: a\0b\r\n\r\n{hidden}"),
        format!("0\r\n folded: x\r\n\r\n{hidden}"),
        format!("0\r\nno-colon\r\n\r\n{hidden}"),
    ];
    let (server, seen) = server_answering(OK).await;
    for (path, proxy) in both_paths(server).await {
        for body in &bodies {
            seen.lock().unwrap().clear();
            let out = exchange(proxy.local_addrs()[0], format!("{head}{body}").as_bytes()).await;
            let heads = seen_after_a_moment(&seen).await;
            assert!(
                !heads.iter().any(|h| h.contains("HIDDEN")),
                "{path}: {body:?}: {heads:?}"
            );
            assert!(!out.contains("HIDDEN"), "{path}: {out}");
        }
    }
}

#[tokio::test]
async fn request_trailers_carry_no_field_the_proxy_or_the_framing_owns() {
    let head = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
    let banned = [
        "X-Forwarded-For: 6.6.6.6",
        "x_forwarded_for: 6.6.6.6",
        "X-SSL-Client-Cert: 6.6.6.6",
        "Authorization: 6.6.6.6",
        "Content-Length: 6",
        "Host: 6.6.6.6",
    ];
    let (server, seen) = server_answering(OK).await;
    for (path, proxy) in both_paths(server).await {
        for field in &banned {
            seen.lock().unwrap().clear();
            let req = format!("{head}1\r\na\r\n0\r\n{field}\r\n\r\n");
            exchange(proxy.local_addrs()[0], req.as_bytes()).await;
            let heads = seen_after_a_moment(&seen).await;
            assert!(
                !heads
                    .iter()
                    .any(|h| h.contains("6.6.6.6") || h.contains(": 6\r")),
                "{path}: {field}: {heads:?}"
            );
        }
        // Others go through, as before.
        seen.lock().unwrap().clear();
        let req = format!("{head}1\r\na\r\n0\r\nX-Sum: 7.7.7.7\r\n\r\n");
        let out = exchange(proxy.local_addrs()[0], req.as_bytes()).await;
        assert!(out.contains("200 OK"), "{path}: {out}");
    }
}

#[tokio::test]
async fn a_body_broken_before_any_byte_left_is_a_502() {
    // Bad chunk framing, and a body cut short by the server's close, both
    // in the first bytes after the head: nothing was sent to the client yet.
    for answer in [
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZ\r\nabc\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
    ] {
        let server =
            scripted_server(Arc::new(move |_, _, _| (answer.as_bytes().to_vec(), true))).await;
        let proxy = proxy_to(server.0).await;
        let mut got = Vec::new();
        for _ in 0..5 {
            got.push(exchange(proxy.local_addrs()[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await);
        }
        // The close may come after the proxy looked for the rest: the head
        // and "abc" then left, and the connection is cut (never a whole 200).
        let is_502 = |o: &String| o.starts_with("HTTP/1.1 502");
        assert!(got.iter().any(is_502), "{answer:?}: {got:?}");
        assert!(
            got.iter().all(|o| is_502(o) || o.ends_with("\r\n\r\nabc")),
            "{answer:?}: {got:?}"
        );
    }
}

#[tokio::test]
async fn invalid_response_framing_is_a_502_on_both_paths() {
    for answer in [
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n0\r\n\r\n",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\nxyz",
        "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n0\r\n\r\n",
    ] {
        let (server, _) = server_answering(answer).await;
        for (path, proxy) in both_paths(server).await {
            let out = exchange(proxy.local_addrs()[0], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
            assert!(out.starts_with("HTTP/1.1 502"), "{path}: {answer:?}: {out}");
        }
    }
}

#[tokio::test]
async fn request_targets_and_hosts_are_checked_and_the_authority_wins() {
    let (server, seen) = server_answering(OK).await;
    for (path, proxy) in both_paths(server).await {
        let front = proxy.local_addrs()[0];
        for bad in [
            "GET * HTTP/1.1\r\nHost: x\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
            "CONNECT / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET x:80 HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET admin HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a#frag HTTP/1.1\r\nHost: x\r\n\r\n",
            "PRI / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: user@x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x/admin\r\n\r\n",
            "GET http://u@x/ HTTP/1.1\r\nHost: x\r\n\r\n",
        ] {
            seen.lock().unwrap().clear();
            let out = exchange(front, bad.as_bytes()).await;
            assert!(out.starts_with("HTTP/1.1 400"), "{path}: {bad:?}: {out}");
            assert!(
                seen_after_a_moment(&seen).await.is_empty(),
                "{path}: {bad:?} forwarded"
            );
        }
        let host_of = |head: &str| {
            head.lines()
                .filter_map(|l| l.split_once(':'))
                .filter(|(k, _)| k.eq_ignore_ascii_case("host"))
                .map(|(_, v)| v.trim().to_string())
                .collect::<Vec<_>>()
        };
        for (req, host) in [
            (
                "GET http://b.example:8080/p HTTP/1.1\r\nHost: a.example\r\n\r\n",
                "b.example:8080".to_string(),
            ),
            (
                "OPTIONS * HTTP/1.1\r\nHost: a.example\r\n\r\n",
                "a.example".to_string(),
            ),
            ("GET / HTTP/1.0\r\n\r\n", front.to_string()),
        ] {
            seen.lock().unwrap().clear();
            let out = exchange(front, req.as_bytes()).await;
            assert!(out.contains("200 OK"), "{path}: {req:?}: {out}");
            let heads = seen_after_a_moment(&seen).await;
            assert_eq!(heads.len(), 1, "{path}: {req:?}");
            assert_eq!(
                host_of(&heads[0]),
                vec![host],
                "{path}: {req:?}: {}",
                heads[0]
            );
        }
        // An absolute URI with an empty path goes out with "/" (RFC 9112
        // 3.2.1): `?q=1` alone is no request-target (it used to be a 400).
        for (req, line) in [
            (
                "GET http://b.example?q=1 HTTP/1.1\r\nHost: b.example\r\n\r\n",
                "GET /?q=1 HTTP/1.1\r\n",
            ),
            (
                "GET http://b.example HTTP/1.1\r\nHost: b.example\r\n\r\n",
                "GET / HTTP/1.1\r\n",
            ),
        ] {
            seen.lock().unwrap().clear();
            let out = exchange(front, req.as_bytes()).await;
            assert!(out.contains("200 OK"), "{path}: {req:?}: {out}");
            let heads = seen_after_a_moment(&seen).await;
            assert_eq!(heads.len(), 1, "{path}: {req:?}");
            assert!(heads[0].starts_with(line), "{path}: {req:?}: {}", heads[0]);
        }
    }
}

#[tokio::test]
async fn acl_paths_are_normalized_before_a_deny() {
    let (server, seen) = server_answering(OK).await;
    let deny_admin = r#"
[[frontend.acl]]
name = "admin"
path_prefix = "/admin"
[[frontend.request]]
action = "deny"
if = "admin"
"#;
    let unused = "127.0.0.1:9".parse().unwrap();
    let cfg = two_pool_config(server, unused, deny_admin, "");
    let proxy = Proxy::start(cfg, None).await.unwrap();
    for path in [
        "/admin",
        "//admin",
        "/./admin",
        "/%61dmin",
        "/x/../admin",
        "/%2e%2e/admin/",
    ] {
        let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
        let out = exchange(proxy.local_addrs()[0], req.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 403"), "{path}: {out}");
    }
    assert!(seen_after_a_moment(&seen).await.is_empty());
    let out = exchange(
        proxy.local_addrs()[0],
        b"GET /administrator/../public HTTP/1.1\r\nHost: x\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test]
async fn a_server_connection_with_an_unsent_body_is_not_reused() {
    // The first connection answers at once, then reads nothing more for a
    // while; later ones answer "second" to each request.
    let (server, accepted) = counting_server(|mut s, nth| async move {
        let mut buf = vec![0u8; 65536];
        if nth == 0 {
            let _ = s.read(&mut buf).await;
            let _ = s
                .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nearly")
                .await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            return;
        }
        while let Ok(n) = s.read(&mut buf).await {
            if n == 0
                || s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\nsecond")
                    .await
                    .is_err()
            {
                return;
            }
        }
    })
    .await;
    let mut pool = one_server_pool(server);
    pool.timeout_server = Duration::from_millis(300);
    let proxy = start_proxy(local_frontend(), pool).await;
    let front = proxy.local_addrs()[0];
    // A body far larger than the socket buffers: its write to the server times out.
    let len = 64 << 20;
    let s = TcpStream::connect(front).await.unwrap();
    let (mut r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let head = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
        let _ = w.write_all(head.as_bytes()).await;
        let _ = w.write_all(&vec![b'x'; len]).await;
    });
    let mut first = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut first)).await;
    assert!(
        String::from_utf8_lossy(&first).ends_with("early"),
        "{:?}",
        String::from_utf8_lossy(&first)
    );
    writer.abort();
    // The connection still holds the body's unsent rest: it is not kept for
    // another request (whose server would read that rest as a request).
    assert_eq!(idle(&proxy, server), 0);
    let out = exchange(front, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(out.ends_with("second"), "{out}");
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
}

#[tokio::test]
async fn http2_requests_keep_their_bodies_and_join_their_cookies() {
    use http_body_util::{BodyExt, Full};
    use hyper::body::Incoming;
    // An HTTP/1.1 server echoing the body, and the cookie lines joined by `|`.
    let server = http1_server(|req: http::Request<Incoming>| async move {
        let cookies: Vec<_> = req
            .headers()
            .get_all("cookie")
            .iter()
            .map(|v| v.to_str().unwrap_or("?").to_string())
            .collect();
        let framing = format!(
            "cl={:?} te={:?}",
            req.headers().get("content-length"),
            req.headers().get("transfer-encoding")
        );
        let body = req.into_body().collect().await?.to_bytes();
        Ok::<_, hyper::Error>(
            http::Response::builder()
                .header("x-cookies", cookies.join("|"))
                .header("x-framing", framing)
                .body(Full::new(body))
                .unwrap(),
        )
    })
    .await;
    let proxy = proxy_to(server).await;
    let tcp = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    let (mut send, _conn) = h2_handshake(tcp).await;
    // Two DATA frames and no content-length: a body of unknown length. When
    // it has all arrived by the time it is forwarded it goes with a length;
    // when its second frame comes later, chunked. No byte is lost either way.
    for (method, pause, framing) in [
        ("GET", 0, r#"cl=Some("11") te=None"#),
        ("POST", 0, r#"cl=Some("11") te=None"#),
        ("GET", 200, r#"cl=None te=Some("chunked")"#),
        ("POST", 200, r#"cl=None te=Some("chunked")"#),
    ] {
        let req = http::Request::builder()
            .method(method)
            .uri(format!("http://{}/", proxy.local_addrs()[0]))
            .header("cookie", "a=1")
            .header("cookie", "b=2")
            .body(PausedBody::new(
                b"hello ",
                Duration::from_millis(pause),
                b"world",
            ))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200, "{method}");
        assert_eq!(resp.headers()["x-cookies"], "a=1; b=2", "{method}");
        assert_eq!(resp.headers()["x-framing"], framing, "{method} {pause}");
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(&body[..], b"hello world", "{method}");
    }
}

#[tokio::test]
async fn http2_streams_reset_after_sending_do_not_cost_server_connections() {
    // A server that answers each request after 100 ms, counting its connections.
    let (server, accepted) = counting_server(|s, _| {
        crate::backends::serve_http1(s, |_req| async {
            tokio::time::sleep(Duration::from_millis(100)).await;
            Ok::<_, hyper::Error>(http::Response::new(http_body_util::Full::new(
                bytes::Bytes::from_static(b"slow"),
            )))
        })
    })
    .await;
    let proxy = proxy_to(server).await;
    let front = proxy.local_addrs()[0];
    let (send, _conn) = h2_handshake(TcpStream::connect(front).await.unwrap()).await;
    // 60 streams, each reset 20 ms after it was sent (while its server works
    // on it): at most five are in flight at the server at once.
    let resets = 60;
    reset_streams(&send, front, resets, Duration::from_millis(20)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let opened = accepted.load(Ordering::SeqCst);
    assert!(
        opened <= 10,
        "{opened} server connections for {resets} reset streams"
    );
    assert!(idle(&proxy, server) >= 1);
}

/// What an HTTP/2 client gets for `path` (method `method`) on `send`: the
/// status, the named headers, and the body or the error that ended it.
async fn h2_get(
    send: &mut hyper::client::conn::http2::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    front: SocketAddr,
    method: &str,
    path: &str,
) -> (u16, String, Result<Vec<u8>, String>) {
    use http_body_util::BodyExt;
    let req = http::Request::builder()
        .method(method)
        .uri(format!("http://{front}{path}"))
        .body(http_body_util::Empty::new())
        .unwrap();
    // A stream reset before its head reached the client: status 0.
    let resp = match send.send_request(req).await {
        Ok(resp) => resp,
        Err(e) => return (0, String::new(), Err(e.to_string())),
    };
    let status = resp.status().as_u16();
    let headers = ["content-length", "transfer-encoding", "x-n"]
        .iter()
        .map(|h| {
            format!(
                "{h}={:?}",
                resp.headers().get(*h).map(|v| v.to_str().unwrap())
            )
        })
        .collect::<Vec<_>>()
        .join(" ");
    let body = resp.into_body().collect().await;
    (
        status,
        headers,
        body.map(|b| b.to_bytes().to_vec())
            .map_err(|e| e.to_string()),
    )
}

#[tokio::test]
async fn http2_clients_get_every_framing_of_an_http1_servers_answer() {
    // One answer per path; `x-n` says which request of its connection it
    // answered, so the client sees which connections were reused.
    let big = "b".repeat(300_000);
    let sent = big.clone();
    let answer = move |n: usize, head: &str, _: &[u8]| -> (Vec<u8>, bool) {
        let path = head.split(' ').nth(1).unwrap_or("");
        let h = |rest: &str| format!("HTTP/1.1 200 OK\r\nx-n: {n}\r\n{rest}").into_bytes();
        match path {
            "/fixed" if head.starts_with("HEAD") => (h("Content-Length: 5\r\n\r\n"), false),
            "/fixed" => (h("Content-Length: 5\r\n\r\nhello"), false),
            "/chunked" => (
                h(
                    "Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6; ext=1\r\n world\r\n0\r\nx-t: 1\r\n\r\n",
                ),
                false,
            ),
            "/big" => (
                h(&format!("Content-Length: {}\r\n\r\n{sent}", sent.len())),
                false,
            ),
            "/empty" => (b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), false),
            "/close" => (h("\r\nuntil the close"), true),
            // Closes a kept connection without an answer: the request is
            // sent again on a new one.
            "/flaky" if n > 0 => (Vec::new(), true),
            "/flaky" => (h("Content-Length: 2\r\n\r\nok"), false),
            "/conflict" => (
                h("Content-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"),
                true,
            ),
            "/cut" => (h("Content-Length: 100\r\n\r\nshort"), true),
            "/badchunk" => (
                h("Transfer-Encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n"),
                true,
            ),
            _ => (h("Content-Length: 0\r\n\r\n"), false),
        }
    };
    let (server, seen) = scripted_server(Arc::new(answer)).await;
    let proxy = proxy_to(server).await;
    let front = proxy.local_addrs()[0];
    let tcp = TcpStream::connect(front).await.unwrap();
    let (mut send, _conn) = h2_handshake(tcp).await;
    let ok = |b: &str| Ok(b.as_bytes().to_vec());
    // The framing fields the client got, and which request of its server
    // connection the answer was (no Transfer-Encoding ever reaches HTTP/2).
    let fields = |cl: Option<&str>, n: usize| {
        format!(r#"content-length={cl:?} transfer-encoding=None x-n=Some("{n}")"#)
    };

    let got = h2_get(&mut send, front, "GET", "/fixed").await;
    assert_eq!(got, (200, fields(Some("5"), 0), ok("hello")));
    // Chunks decoded (extension and trailer dropped), no Transfer-Encoding.
    let got = h2_get(&mut send, front, "GET", "/chunked").await;
    assert_eq!(got, (200, fields(None, 1), ok("hello world")));
    // Longer than a read: streamed as it comes, then the connection is kept.
    let (status, headers, body) = h2_get(&mut send, front, "GET", "/big").await;
    assert_eq!((status, headers), (200, fields(Some("300000"), 2)));
    assert_eq!(body.unwrap(), big.as_bytes());
    let got = h2_get(&mut send, front, "HEAD", "/fixed").await;
    assert_eq!(got, (200, fields(Some("5"), 3), ok("")));
    let got = h2_get(&mut send, front, "GET", "/empty").await;
    assert_eq!(got.0, 204);
    assert_eq!(got.2, ok(""));
    let got = h2_get(&mut send, front, "GET", "/fixed").await;
    assert_eq!(got.1, fields(Some("5"), 5));
    // Delimited by the server's close: all of it, then a new connection.
    let got = h2_get(&mut send, front, "GET", "/close").await;
    assert_eq!(got.2, ok("until the close"));
    let got = h2_get(&mut send, front, "GET", "/fixed").await;
    assert_eq!(got.1, fields(Some("5"), 0));
    // The kept connection closes under the request: answered on a new one.
    let got = h2_get(&mut send, front, "GET", "/flaky").await;
    assert_eq!((got.0, got.2), (200, ok("ok")));
    assert!(got.1.ends_with(r#"x-n=Some("0")"#), "{}", got.1);

    // Broken answers: a 502 before any byte; once the head went out, a
    // reset stream (which may overtake the head).
    let got = h2_get(&mut send, front, "GET", "/conflict").await;
    assert_eq!(got.0, 502);
    for path in ["/cut", "/badchunk"] {
        let (status, _, body) = h2_get(&mut send, front, "GET", path).await;
        assert!(status == 200 || status == 0, "{path}: {status}");
        assert!(body.is_err(), "{path}: {body:?}");
    }
    // The client's connection carries on.
    let got = h2_get(&mut send, front, "GET", "/fixed").await;
    assert_eq!(got.2, ok("hello"));
    let heads = seen.lock().unwrap().len();
    assert_eq!(heads, 14, "13 requests, /flaky sent twice");
}

#[tokio::test]
async fn http2_requests_are_held_to_what_rfc_9113_leaves_to_the_recipient() {
    let (server, seen) = server_answering(OK).await;
    let proxy = proxy_to(server).await;
    let front = proxy.local_addrs()[0];
    let io = TcpStream::connect(front).await.unwrap();
    let (mut send, _conn) = h2_handshake(io).await;
    let get = |uri: &str| {
        hyper::Request::get(uri)
            .body(http_body_util::Empty::<bytes::Bytes>::new())
            .unwrap()
    };
    let padded = |value: &'static str| {
        let mut req = get("http://x/");
        req.headers_mut()
            .insert("x-role", http::HeaderValue::from_static(value));
        req
    };
    let mut many = get("http://x/");
    for i in 0..=hardening_max_headers() {
        many.headers_mut().insert(
            http::HeaderName::from_bytes(format!("x-f{i}").as_bytes()).unwrap(),
            http::HeaderValue::from_static("1"),
        );
    }
    for (what, req) in [
        ("a value ending in a space", padded("admin ")),
        ("a value starting with a tab", padded("\tadmin")),
        ("a :scheme of its own", get("foo://x/")),
        ("too many fields", many),
    ] {
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 400, "{what}");
    }
    assert!(
        seen.lock().unwrap().is_empty(),
        "{:?}",
        seen.lock().unwrap()
    );
    let resp = send.send_request(padded("admin")).await.unwrap();
    assert_eq!(resp.status(), 200);
}

/// The most header fields a request may have (`hardening::MAX_HEADERS`).
fn hardening_max_headers() -> usize {
    100
}

#[tokio::test]
async fn a_status_outside_1xx_to_5xx_is_a_502_on_both_paths() {
    for answer in [
        "HTTP/1.1 999 Weird\r\ncontent-length: 2\r\n\r\nok",
        "HTTP/1.1 600 Six\r\ncontent-length: 2\r\n\r\nok",
    ] {
        let (server, _) = server_answering(answer).await;
        for (path, proxy) in both_paths(server).await {
            let out = exchange(
                proxy.local_addrs()[0],
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            assert!(out.starts_with("HTTP/1.1 502"), "{path}: {answer}: {out}");
        }
    }
}

#[tokio::test]
async fn interim_answers_reach_http11_clients_on_our_path() {
    let (server, _) = server_answering(
        "HTTP/1.1 100 Continue\r\n\r\n\
         HTTP/1.1 103 Early Hints\r\nLink: </s.css>; rel=preload\r\n\r\n\
         HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok",
    )
    .await;
    let proxy = proxy_to(server).await;
    let front = proxy.local_addrs()[0];
    // RFC 9110 15.2: forwarded as they come; the server's 100 (the proxy
    // answers Expect itself) is not.
    let out = exchange(
        front,
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let lower = out.to_ascii_lowercase();
    assert!(
        lower.starts_with(
            "http/1.1 103 early hints\r\nlink: </s.css>; rel=preload\r\n\r\nhttp/1.1 200 ok\r\n"
        ),
        "{out}"
    );
    assert!(out.ends_with("\r\n\r\nok"), "{out}");
    // Never to an HTTP/1.0 client.
    let out = exchange(front, b"GET / HTTP/1.0\r\nHost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
}

#[tokio::test]
async fn an_upload_is_no_server_silence_and_an_aborted_one_is_the_clients_doing() {
    let (server, seen) = server_answering(OK).await;
    let configure = |p: &mut Pool| {
        p.timeout_server = Duration::from_millis(400);
        p.max_fails = 1;
        p.fail_timeout = Duration::from_secs(60);
    };
    let mut pool = one_server_pool(server);
    configure(&mut pool);
    let ours = start_proxy(local_frontend(), pool).await;
    let hyper = hyper_path_proxy(server, |_| {}, configure).await;
    for (path, proxy) in [("ours", ours), ("hyper", hyper)] {
        let front = proxy.local_addrs()[0];
        // 6 bytes, one every 150 ms: the upload lasts twice timeout_server,
        // the server answers as soon as it has them all.
        let mut s = TcpStream::connect(front).await.unwrap();
        s.write_all(
            b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 6\r\nConnection: close\r\n\r\n",
        )
        .await
        .unwrap();
        for b in b"abcdef" {
            tokio::time::sleep(Duration::from_millis(150)).await;
            s.write_all(&[*b]).await.unwrap();
        }
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out)).await;
        let out = String::from_utf8_lossy(&out);
        assert!(out.starts_with("HTTP/1.1 200"), "{path}: {out}");
        // Clients that leave mid-upload: their doing, not the server's
        // (max_fails = 1 would take the only server out).
        for _ in 0..2 {
            let mut s = TcpStream::connect(front).await.unwrap();
            s.write_all(b"POST /cut HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n0123456789")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(200)).await;
            drop(s);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let out = exchange(
            front,
            b"GET /after HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 200"), "{path}: {out}");
    }
    assert!(
        seen.lock()
            .unwrap()
            .iter()
            .any(|h| h.starts_with("GET /after"))
    );
}
