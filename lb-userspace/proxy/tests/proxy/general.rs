//! End-to-end tests of the proxy on 127.0.0.1 with real clients and servers.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backends::{JsonBackend, counting_server, json_backend, serve_http1, server};
use crate::support::{
    TempDir, capture_access_log, dead_addr, exchange_until_closed, h1_client, h2_handshake, idle,
    json_access_records, local_frontend, provider, start_proxy,
};
use lb_proxy::*;

fn pool(algorithm: Algorithm, servers: &[SocketAddr]) -> Pool {
    Pool::new(
        "app",
        algorithm,
        servers.iter().map(|&a| ServerSpec::new(a)).collect(),
    )
}

struct Answer {
    status: StatusCode,
    server: Option<String>,
    body: String,
}

impl Answer {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
}

/// A response's status, `x-server` header and body.
async fn into_answer(resp: hyper::Response<hyper::body::Incoming>) -> Answer {
    let status = resp.status();
    let server = resp
        .headers()
        .get("x-server")
        .map(|v| v.to_str().unwrap().to_string());
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    Answer {
        status,
        server,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

async fn send(client: &Client<HttpConnector, Empty<Bytes>>, url: String) -> Answer {
    let resp = client.get(url.parse().unwrap()).await.unwrap();
    into_answer(resp).await
}

async fn get(proxy: &Proxy, path: &str) -> Answer {
    send(
        &h1_client(),
        format!("http://{}{path}", proxy.local_addrs()[0]),
    )
    .await
}

#[tokio::test]
async fn plain_http1_and_forwarded_headers() {
    let a = json_backend("a").await;
    let proxy = start_proxy(local_frontend(), pool(Algorithm::RoundRobin, &[a.addr])).await;
    let r = get(&proxy, "/x?y=1").await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(r.server.as_deref(), Some("a"));
    let h = &r.json()["headers"];
    assert_eq!(h["x-forwarded-for"], "127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["forwarded"], "for=127.0.0.1;proto=http");
    assert_eq!(h["host"], proxy.local_addrs()[0].to_string());
}

#[tokio::test]
async fn each_request_gets_a_unique_id_to_the_server_in_the_answer_and_the_log() {
    capture_access_log();
    let a = json_backend("a").await;
    let with_id = |fe: &mut Frontend| {
        fe.request_id_header = Some("X-Request-ID".into());
        fe.acl = vec![toml::from_str("name = \"no\"\npath_prefix = \"/no\"").unwrap()];
        fe.request = vec![
            toml::from_str("action = \"deny\"\nif = \"no\"").unwrap(),
            // Rules may name it too.
            toml::from_str(
                "action = \"set-header\"\nname = \"x-trace\"\nvalue = \"t-%[unique-id]\"",
            )
            .unwrap(),
        ];
    };
    let mut fe = local_frontend();
    with_id(&mut fe);
    let own = start_proxy(fe, pool(Algorithm::RoundRobin, &[a.addr])).await;
    let hyper = crate::support::hyper_path_proxy(a.addr, with_id, |_| {}).await;
    let mut seen = std::collections::HashSet::new();
    for (path, proxy) in [("own", &own), ("hyper", &hyper)] {
        for _ in 0..3 {
            let req = Request::get(format!("http://{}/id", proxy.local_addrs()[0]))
                .header("x-request-id", "chosen-by-the-client")
                // Hop-by-hop fields named by the client do not take ours away.
                .header("connection", "keep-alive, x-request-id")
                .body(Empty::new())
                .unwrap();
            let resp = h1_client().request(req).await.unwrap();
            let answered = resp.headers().get_all("x-request-id").iter().count();
            let id = resp.headers()["x-request-id"].to_str().unwrap().to_string();
            let r = into_answer(resp).await;
            assert_eq!(answered, 1, "{path}");
            assert_eq!(
                r.json()["headers"]["x-request-id"],
                *id,
                "{path}: the server's"
            );
            assert_eq!(r.json()["headers"]["x-trace"], format!("t-{id}"), "{path}");
            assert!(
                id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
                "{id}"
            );
            assert!(seen.insert(id.clone()), "{path}: {id} twice");
            let logged = format!("{{{id}}} \"GET /id ");
            let mut found = false;
            for _ in 0..100 {
                found = crate::support::access_lines()
                    .iter()
                    .any(|l| l.contains(&logged));
                if found {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            assert!(found, "{path}: no line with {id}");
        }
        // The proxy's own answers carry one too.
        let denied = h1_client()
            .get(
                format!("http://{}/no", proxy.local_addrs()[0])
                    .parse()
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(denied.status(), StatusCode::FORBIDDEN, "{path}");
        assert_eq!(denied.headers()["x-request-id"].len(), 32, "{path}");
    }
}

#[tokio::test]
async fn h2c_prior_knowledge() {
    let a = json_backend("a").await;
    let proxy = start_proxy(local_frontend(), pool(Algorithm::RoundRobin, &[a.addr])).await;
    let client: Client<HttpConnector, Empty<Bytes>> = Client::builder(TokioExecutor::new())
        .http2_only(true)
        .build(HttpConnector::new());
    let url: http::Uri = format!("http://{}/h2", proxy.local_addrs()[0])
        .parse()
        .unwrap();
    let resp = client.get(url).await.unwrap();
    assert_eq!(resp.version(), http::Version::HTTP_2);
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["server"], "a");
    // The :authority became a Host header for the HTTP/1.1 server.
    assert_eq!(j["headers"]["host"], proxy.local_addrs()[0].to_string());
}

#[tokio::test]
async fn round_robin_weights_one_to_two() {
    let (a, b) = (json_backend("a").await, json_backend("b").await);
    let mut p = pool(Algorithm::RoundRobin, &[a.addr, b.addr]);
    p.servers[1].weight = 2;
    let proxy = start_proxy(local_frontend(), p).await;
    let mut seq = String::new();
    for _ in 0..6 {
        seq += &get(&proxy, "/").await.server.unwrap();
    }
    assert_eq!(seq, "babbab");
}

#[tokio::test]
async fn least_conn_prefers_idle_server() {
    let (a, b) = (json_backend("a").await, json_backend("b").await);
    let proxy = Arc::new(
        start_proxy(
            local_frontend(),
            pool(Algorithm::LeastConn, &[a.addr, b.addr]),
        )
        .await,
    );
    let p2 = proxy.clone();
    let slow = tokio::spawn(async move { get(&p2, "/sleep/700").await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let mut fast = Vec::new();
    for _ in 0..4 {
        fast.push(get(&proxy, "/").await.server.unwrap());
    }
    let slow = slow.await.unwrap().server.unwrap();
    assert!(
        fast.iter().all(|s| *s != slow),
        "slow {slow}, fast {fast:?}"
    );
}

#[tokio::test]
async fn first_down_and_backup() {
    let (a, b, c) = (
        json_backend("a").await,
        json_backend("b").await,
        json_backend("c").await,
    );
    let mut p = pool(Algorithm::First, &[a.addr, b.addr, c.addr]);
    p.servers[2].backup = true;
    let proxy = start_proxy(local_frontend(), p).await;
    for _ in 0..3 {
        assert_eq!(get(&proxy, "/").await.server.as_deref(), Some("a"));
    }
    assert!(proxy.set_server_up("app", a.addr, false));
    assert_eq!(get(&proxy, "/").await.server.as_deref(), Some("b"));
    proxy.set_server_up("app", b.addr, false);
    assert_eq!(get(&proxy, "/").await.server.as_deref(), Some("c"));
    proxy.set_server_up("app", c.addr, false);
    let r = get(&proxy, "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.contains("503"));
    proxy.set_server_up("app", b.addr, true);
    assert_eq!(get(&proxy, "/").await.server.as_deref(), Some("b"));
    assert!(!proxy.set_server_up("nope", b.addr, true));
}

#[tokio::test]
async fn no_server_is_503() {
    let proxy = start_proxy(local_frontend(), pool(Algorithm::RoundRobin, &[])).await;
    assert_eq!(
        get(&proxy, "/").await.status,
        StatusCode::SERVICE_UNAVAILABLE
    );
}

#[tokio::test]
async fn server_closing_is_502() {
    // Reads the request, then closes without a word.
    let addr = server(|mut s| async move {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
    })
    .await;
    let proxy = start_proxy(local_frontend(), pool(Algorithm::RoundRobin, &[addr])).await;
    let r = get(&proxy, "/").await;
    assert_eq!(r.status, StatusCode::BAD_GATEWAY);
    assert!(r.body.contains("502 Bad Gateway"));
}

#[tokio::test]
async fn slow_server_is_504() {
    let a = json_backend("a").await;
    let mut p = pool(Algorithm::RoundRobin, &[a.addr]);
    p.timeout_server = Duration::from_millis(200);
    let proxy = start_proxy(local_frontend(), p).await;
    assert_eq!(
        get(&proxy, "/sleep/2000").await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
    // On a reused connection, whose timer was armed for an earlier request,
    // the timeout still counts from this request.
    assert_eq!(get(&proxy, "/").await.status, StatusCode::OK);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = std::time::Instant::now();
    assert_eq!(
        get(&proxy, "/sleep/2000").await.status,
        StatusCode::GATEWAY_TIMEOUT
    );
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(190) && took < Duration::from_millis(1500),
        "{took:?}"
    );
}

#[tokio::test]
async fn connect_failure_redispatches() {
    let a = json_backend("a").await;
    let dead = dead_addr().await;
    let proxy = start_proxy(
        local_frontend(),
        pool(Algorithm::RoundRobin, &[dead, a.addr]),
    )
    .await;
    for _ in 0..10 {
        let r = get(&proxy, "/").await;
        assert_eq!(r.status, StatusCode::OK);
        assert_eq!(r.server.as_deref(), Some("a"));
    }
    // Only dead servers: 503 after the retries, as HAProxy answers (SC).
    let proxy = start_proxy(local_frontend(), pool(Algorithm::RoundRobin, &[dead])).await;
    let r = get(&proxy, "/").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.contains("503 Service Unavailable"));
}

#[tokio::test]
async fn a_server_failing_max_fails_times_is_taken_out_for_fail_timeout_on_both_paths() {
    let a = json_backend("a").await;
    let dead = dead_addr().await;
    let mut failing = pool(Algorithm::RoundRobin, &[dead, a.addr]);
    failing.max_fails = 2;
    failing.fail_timeout = Duration::from_secs(1);
    // Our HTTP/1 path, and hyper's (a frontend that may route to an h2 pool).
    let own = start_proxy(local_frontend(), failing.clone()).await;
    let rules = "[[frontend.acl]]\nname = \"never\"\npath_prefix = \"/never/\"\n\
                 [[frontend.use_pool]]\npool = \"api\"\nif = \"never\"\n";
    let mut cfg = crate::support::two_pool_config(a.addr, a.addr, rules, "");
    cfg.pools[0] = failing;
    cfg.pools[1].h2 = true;
    let hyper = Proxy::start(cfg, None).await.unwrap();
    for (path, proxy) in [("own", &own), ("hyper", &hyper)] {
        let dead_figures = || {
            let pools = proxy.stats().pools();
            let s = pools[0].servers.iter().find(|s| s.address == dead).cloned();
            let s = s.expect("the dead server");
            (s.counters.connect_errors, s.counters.taken_out, s.up)
        };
        // Round robin would try the dead server for every other request:
        // it is out after its second failure, and tried no more.
        for _ in 0..10 {
            let r = get(proxy, "/").await;
            assert_eq!(r.status, StatusCode::OK, "{path}");
            assert_eq!(r.server.as_deref(), Some("a"), "{path}");
        }
        assert_eq!(dead_figures(), (2, 1, false), "{path}");
        // After fail_timeout it is tried again; one failure takes it out.
        tokio::time::sleep(Duration::from_millis(1100)).await;
        for _ in 0..6 {
            assert_eq!(get(proxy, "/").await.status, StatusCode::OK, "{path}");
        }
        assert_eq!(dead_figures(), (3, 2, false), "{path}");
    }
    // Every server out: they are still tried (503 after the retries only
    // because they fail), never refused unasked.
    let mut alone = pool(Algorithm::RoundRobin, &[dead]);
    alone.max_fails = 1;
    alone.retries = 0;
    let proxy = start_proxy(local_frontend(), alone).await;
    for _ in 0..3 {
        assert_eq!(
            get(&proxy, "/").await.status,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }
    let pools = proxy.stats().pools();
    assert_eq!(pools[0].servers[0].counters.connect_errors, 3);
}

#[tokio::test]
async fn a_server_back_up_takes_its_share_over_slowstart() {
    let (a, b) = (json_backend("a").await, json_backend("b").await);
    let mut slow = pool(Algorithm::RoundRobin, &[a.addr, b.addr]);
    slow.slowstart = Duration::from_millis(1500);
    let proxy = start_proxy(local_frontend(), slow).await;
    let from_b = |n: usize| {
        let proxy = &proxy;
        async move {
            let mut count = 0;
            for _ in 0..n {
                count += usize::from(get(proxy, "/").await.server.as_deref() == Some("b"));
            }
            count
        }
    };
    assert_eq!(from_b(10).await, 5, "both serve from the start");
    // b went down and came back (its health check): it starts slowly.
    assert!(proxy.set_server_use("app", b.addr, ServerUse::Off));
    assert!(proxy.set_server_use("app", b.addr, ServerUse::Serving));
    assert!(from_b(10).await <= 2, "just back");
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(from_b(10).await, 5, "its whole share after slowstart");
}

#[tokio::test]
async fn stalled_request_head_is_408() {
    let a = json_backend("a").await;
    let mut fe = local_frontend();
    fe.timeout_http_request = Duration::from_millis(300);
    let proxy = start_proxy(fe, pool(Algorithm::RoundRobin, &[a.addr])).await;
    let out = exchange_until_closed(proxy.local_addrs()[0], b"GET / HTTP/1.1\r\nHost: x\r\n").await;
    assert!(out.starts_with("HTTP/1.1 408"), "{out}");
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed_quietly() {
    let a = json_backend("a").await;
    let mut fe = local_frontend();
    fe.timeout_http_keep_alive = Duration::from_millis(300);
    let proxy = start_proxy(fe, pool(Algorithm::RoundRobin, &[a.addr])).await;
    let front = proxy.local_addrs()[0];
    let out = exchange_until_closed(front, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(!out.contains("408"));
}

#[tokio::test]
async fn server_connections_are_reused() {
    let a = json_backend("a").await;
    let proxy = start_proxy(local_frontend(), pool(Algorithm::RoundRobin, &[a.addr])).await;
    let client = h1_client();
    for _ in 0..20 {
        let r = send(&client, format!("http://{}/", proxy.local_addrs()[0])).await;
        assert_eq!(r.status, StatusCode::OK);
    }
    assert_eq!(a.accepted.load(Ordering::SeqCst), 1);
    assert_eq!(idle(&proxy, a.addr), 1);
}

#[tokio::test]
async fn idle_server_connections_close_after_timeout_server_idle() {
    let a = json_backend("a").await;
    let mut p = pool(Algorithm::RoundRobin, &[a.addr]);
    p.timeout_server_idle = Duration::from_millis(600);
    let proxy = start_proxy(local_frontend(), p).await;
    let url = format!("http://{}/", proxy.local_addrs()[0]);
    let idle_a = || idle(&proxy, a.addr);
    assert_eq!(send(&h1_client(), url.clone()).await.status, StatusCode::OK);
    assert_eq!(idle_a(), 1);
    // Swept within the limit plus half of it: closed, so the next request opens one.
    tokio::time::sleep(Duration::from_millis(1200)).await;
    assert_eq!(idle_a(), 0, "still kept after timeout_server_idle");
    assert_eq!(send(&h1_client(), url.clone()).await.status, StatusCode::OK);
    assert_eq!(a.accepted.load(Ordering::SeqCst), 2);

    // 0 keeps none: every request opens its own server connection.
    let b = json_backend("b").await;
    let mut p = pool(Algorithm::RoundRobin, &[b.addr]);
    p.timeout_server_idle = Duration::ZERO;
    let proxy = start_proxy(local_frontend(), p).await;
    let url = format!("http://{}/", proxy.local_addrs()[0]);
    for _ in 0..3 {
        assert_eq!(send(&h1_client(), url.clone()).await.status, StatusCode::OK);
    }
    assert_eq!(idle(&proxy, b.addr), 0);
    assert_eq!(b.accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn stats_show_requests_in_flight_and_idle_connections() {
    let a = json_backend("a").await;
    let proxy = start_proxy(local_frontend(), pool(Algorithm::RoundRobin, &[a.addr])).await;
    let stats = proxy.stats();
    let server = |stats: &ProxyStats| stats.pools()[0].servers[0].clone();
    assert_eq!(
        (server(&stats).current, server(&stats).idle_connections),
        (0, 0)
    );
    let url = format!("http://{}/sleep/400", proxy.local_addrs()[0]);
    let slow = tokio::spawn(async move { send(&h1_client(), url).await });
    // While the server sleeps, the request is in flight.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    while server(&stats).current == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "never seen in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    let s = server(&stats);
    assert_eq!((s.address, s.current, s.idle_connections), (a.addr, 0, 1));
    assert_eq!(stats.pools()[0].name, "app");
    assert_eq!(stats.pools()[0].queued, 0);
}

#[tokio::test]
async fn large_bodies_stream_both_ways_and_the_connection_is_reused() {
    // The server streams each request body straight back.
    let (addr, accepted) = counting_server(|s, _| {
        serve_http1(s, |req: Request<Incoming>| async move {
            Ok::<_, std::convert::Infallible>(hyper::Response::new(req.into_body()))
        })
    })
    .await;
    let proxy = start_proxy(local_frontend(), pool(Algorithm::RoundRobin, &[addr])).await;
    let client: Client<HttpConnector, Full<Bytes>> =
        Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let url = format!("http://{}/echo", proxy.local_addrs()[0]);
    for len in [2 << 20, 3 << 20, 10] {
        let body: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        let req = Request::post(&url)
            .body(Full::new(Bytes::from(body.clone())))
            .unwrap();
        let resp = client.request(req).await.unwrap();
        assert_eq!(resp.status(), StatusCode::OK);
        let got = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(got.len(), len);
        assert!(got[..] == body[..], "{len} bytes came back changed");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        1,
        "one server connection for all"
    );
    assert_eq!(idle(&proxy, addr), 1);

    // A client that leaves mid-response: that server connection is not reused.
    let raw = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    let (mut rd, mut wr) = raw.into_split();
    // More than loopback socket buffers can hold, so the exchange cannot end on its own.
    let len = 32 << 20;
    // Written from another task: the echo comes back while the body still goes out.
    let writer = tokio::spawn(async move {
        let head = format!("POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
        wr.write_all(head.as_bytes()).await?;
        wr.write_all(&vec![7u8; len]).await?;
        Ok::<_, std::io::Error>(wr)
    });
    let mut first = [0u8; 4096];
    let n = rd.read(&mut first).await.unwrap();
    assert!(first[..n].starts_with(b"HTTP/1.1 200"));
    writer.abort();
    let _ = writer.await;
    drop(rd);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let req = Request::post(&url)
        .body(Full::new(Bytes::from_static(b"again")))
        .unwrap();
    let resp = client.request(req).await.unwrap();
    let got = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(&got[..], b"again");
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        2,
        "the aborted exchange's connection was closed, not reused"
    );
}

#[tokio::test]
async fn a_client_leaving_mid_answer_is_logged_with_the_bytes_it_got_on_both_paths() {
    capture_access_log();
    // 64 KiB at once, then more for as long as anyone reads (at most 10 s).
    let server = crate::backends::server(|mut s| async move {
        let _ = crate::backends::read_head(&mut s).await;
        let head = b"HTTP/1.1 200 OK\r\ncontent-length: 100000000\r\n\r\n";
        let chunk = vec![b'x'; 64 << 10];
        if s.write_all(head).await.is_err() || s.write_all(&chunk).await.is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let until = tokio::time::Instant::now() + Duration::from_secs(10);
        while tokio::time::Instant::now() < until && s.write_all(&chunk).await.is_ok() {}
    })
    .await;
    let own = start_proxy(local_frontend(), crate::support::one_server_pool(server)).await;
    let hyper = crate::support::hyper_path_proxy(server, |_| {}, |_| {}).await;
    for (path, proxy) in [("own", &own), ("hyper", &hyper)] {
        let mut c = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
        let me = c.local_addr().unwrap();
        c.write_all(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut got = 0;
        let mut buf = vec![0u8; 16 << 10];
        while got < 64 << 10 {
            let n = tokio::time::timeout(crate::support::GIVE_UP, c.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            assert_ne!(n, 0, "{path}");
            got += n;
        }
        drop(c);
        let line = crate::support::access_line_of(me, server)
            .await
            .unwrap_or_else(|| panic!("{path}: no line"));
        // client [date] frontend pool/server Tq/Tw/Tc/Tr/Tt status bytes flags "request"
        let f: Vec<&str> = line.split_whitespace().collect();
        let bytes: u64 = f[6].parse().unwrap();
        assert_eq!((f[5], &f[7][..2]), ("200", "CD"), "{path}: {line}");
        assert!(
            (64 << 10..100_000_000).contains(&bytes),
            "{path}: the bytes the client got, at least what it read: {line}"
        );
    }
}

#[tokio::test]
async fn a_client_leaving_before_the_answer_on_hypers_path_is_logged() {
    capture_access_log();
    // Takes the request, answers nothing for 10 s.
    let server = crate::backends::server(|mut s| async move {
        let _ = crate::backends::read_head(&mut s).await;
        tokio::time::sleep(Duration::from_secs(10)).await;
    })
    .await;
    let hyper = crate::support::hyper_path_proxy(server, |_| {}, |_| {}).await;
    let mut c = TcpStream::connect(hyper.local_addrs()[0]).await.unwrap();
    let me = c.local_addr().unwrap();
    c.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    // Gone once the request is with the server: hyper drops the exchange,
    // which used to leave no line (nor a count).
    let until = tokio::time::Instant::now() + crate::support::GIVE_UP;
    while hyper.stats().pools()[0].servers[0].current == 0 {
        assert!(tokio::time::Instant::now() < until, "never sent");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    drop(c);
    let line = crate::support::access_line_of(me, server)
        .await
        .expect("a line for the request its client left");
    assert!(line.contains(" -1 0 CH"), "{line}");
}

#[tokio::test]
async fn server_closing_an_idle_connection_gets_a_new_one() {
    // Answers one request per connection with keep-alive, then closes it shortly after.
    let (addr, accepted) = counting_server(|mut s, _| async move {
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
            .await;
        tokio::time::sleep(Duration::from_millis(50)).await;
    })
    .await;
    let proxy = start_proxy(local_frontend(), pool(Algorithm::RoundRobin, &[addr])).await;
    for _ in 0..3 {
        let r = get(&proxy, "/").await;
        assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "ok"));
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn curl_http1_and_h2c() {
    let a = json_backend("a").await;
    let proxy = start_proxy(local_frontend(), pool(Algorithm::RoundRobin, &[a.addr])).await;
    let url = format!("http://{}/curl", proxy.local_addrs()[0]);
    let version = std::process::Command::new("curl").arg("-V").output();
    let Ok(version) = version else {
        eprintln!("curl not installed; skipped");
        return;
    };
    let mut modes = vec!["--http1.1"];
    if String::from_utf8_lossy(&version.stdout).contains("HTTP2") {
        modes.push("--http2-prior-knowledge");
    }
    for mode in modes {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", mode, "-w", "\n%{http_code} %{http_version}", &url])
            .output()
            .await
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let last = text.lines().last().unwrap_or("").to_string();
        assert!(last.starts_with("200 "), "{mode}: {text}");
        assert!(text.contains("\"server\":\"a\""), "{mode}: {text}");
        if mode == "--http2-prior-knowledge" {
            assert_eq!(last, "200 2");
        }
    }
}

// --- TLS ---------------------------------------------------------------

/// Writes a self-signed certificate for `names` to `<stem>.pem`/`<stem>.key`; returns the pair and its DER.
pub(super) fn write_cert(dir: &TempDir, stem: &str, names: &[&str]) -> (CertPair, Vec<u8>) {
    let ck =
        rcgen::generate_simple_self_signed(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
            .unwrap();
    let cert = dir.0.join(format!("{stem}.pem"));
    let key = dir.0.join(format!("{stem}.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    (
        CertPair {
            cert,
            key,
            names: Vec::new(),
        },
        ck.cert.der().to_vec(),
    )
}

/// Connects with TLS (SNI `sni`, or an IP name for none); returns the stream and the presented leaf.
pub(super) async fn tls_connect(
    addr: SocketAddr,
    sni: Option<&str>,
    alpn: &[&[u8]],
    tls12: bool,
) -> (tokio_rustls::client::TlsStream<TcpStream>, Vec<u8>) {
    let provider = provider();
    let versions: &[&rustls::SupportedProtocolVersion] = if tls12 {
        &[&rustls::version::TLS12]
    } else {
        &[&rustls::version::TLS13]
    };
    // Any certificate is accepted: the tests check which one was presented.
    let mut cfg = crate::support::any_cert_client(provider, versions);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // An IP address as server name sends no SNI extension.
    let name = match sni {
        Some(s) => ServerName::try_from(s.to_string()).unwrap(),
        None => ServerName::IpAddress(addr.ip().into()),
    };
    let tcp = TcpStream::connect(addr).await.unwrap();
    let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
        .connect(name, tcp)
        .await
        .unwrap();
    let leaf = stream.get_ref().1.peer_certificates().unwrap()[0].to_vec();
    (stream, leaf)
}

/// A proxy with one TLS frontend (one certificate, for one.test) in front of
/// a backend; the backend and the certificate's directory come with it.
async fn one_cert_proxy(tag: &str) -> (Proxy, JsonBackend, TempDir) {
    let a = json_backend("a").await;
    let dir = TempDir::new(tag);
    let (one, _) = write_cert(&dir, "one", &["one.test"]);
    let mut fe = local_frontend();
    fe.tls = Some(TlsConfig {
        certs: vec![one],
        default_cert: None,
        ..TlsConfig::default()
    });
    let proxy = start_proxy(fe, pool(Algorithm::RoundRobin, &[a.addr])).await;
    (proxy, a, dir)
}

#[tokio::test]
async fn a_client_resumes_its_tls_session_after_hundreds_of_others() {
    let (proxy, _a, _dir) = one_cert_proxy("tls-resume").await;
    let addr = proxy.local_addrs()[0];
    for version in [&rustls::version::TLS13, &rustls::version::TLS12] {
        let first = resuming_client(version);
        let kind = tls_get(addr, &first).await.0;
        assert_eq!(kind, Some(rustls::HandshakeKind::Full));
        // More clients than rustls' default session cache (256) holds.
        for _ in 0..300 {
            tls_get(addr, &resuming_client(version)).await;
        }
        assert_eq!(
            tls_get(addr, &first).await.0,
            Some(rustls::HandshakeKind::Resumed),
            "{version:?}"
        );
    }
}

#[tokio::test]
async fn min_version_1_3_refuses_tls_1_2_clients() {
    let a = json_backend("a").await;
    let dir = TempDir::new("tls-min");
    let (one, _) = write_cert(&dir, "one", &["one.test"]);
    let mut fe = local_frontend();
    fe.tls = Some(TlsConfig {
        certs: vec![one],
        min_version: TlsVersion::Tls13,
        ..TlsConfig::default()
    });
    let proxy = start_proxy(fe, pool(Algorithm::RoundRobin, &[a.addr])).await;
    let addr = proxy.local_addrs()[0];
    let handshake = |version: &'static rustls::SupportedProtocolVersion| async move {
        let cfg = crate::support::any_cert_client(provider(), &[version]);
        let tcp = TcpStream::connect(addr).await.unwrap();
        tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("one.test").unwrap(), tcp)
            .await
    };
    let tls13 = handshake(&rustls::version::TLS13).await.expect("TLS 1.3");
    assert_eq!(
        tls13.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    let refused = handshake(&rustls::version::TLS12).await;
    assert!(refused.is_err(), "a TLS 1.2 client is refused");
    // The default takes both.
    let (proxy, _a, _dir) = one_cert_proxy("tls-min-default").await;
    let (tls12, _) = tls_connect(proxy.local_addrs()[0], Some("one.test"), &[], true).await;
    assert_eq!(
        tls12.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
}

#[tokio::test]
async fn tls_server_cipher_order_wins() {
    use rustls::crypto::ring::cipher_suite as cs;
    let (proxy, _a, _dir) = one_cert_proxy("tls-order").await;
    let addr = proxy.local_addrs()[0];
    // The client prefers ChaCha20; the server's order puts AES-GCM first.
    for (version, suites, expected) in [
        (
            &rustls::version::TLS13,
            vec![
                cs::TLS13_CHACHA20_POLY1305_SHA256,
                cs::TLS13_AES_128_GCM_SHA256,
            ],
            cs::TLS13_AES_128_GCM_SHA256,
        ),
        (
            &rustls::version::TLS12,
            vec![
                cs::TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256,
                cs::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256,
                cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
            ],
            cs::TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256,
        ),
    ] {
        let mut provider = rustls::crypto::ring::default_provider();
        provider.cipher_suites = suites;
        let provider = Arc::new(provider);
        let cfg = crate::support::any_cert_client(provider, &[version]);
        let tcp = TcpStream::connect(addr).await.unwrap();
        let stream = tokio_rustls::TlsConnector::from(Arc::new(cfg))
            .connect(ServerName::try_from("one.test").unwrap(), tcp)
            .await
            .unwrap();
        let got = stream.get_ref().1.negotiated_cipher_suite().unwrap();
        assert_eq!(got.suite(), expected.suite(), "{version:?}");
    }
}

#[tokio::test]
async fn a_request_for_a_host_its_tls_connection_does_not_serve_is_a_421() {
    let a = json_backend("a").await;
    let dir = TempDir::new("tls421");
    let (one, _) = write_cert(&dir, "one", &["one.test", "shared.test"]);
    let (two, _) = write_cert(&dir, "two", &["*.two.test"]);
    let (dflt, _) = write_cert(&dir, "default", &["default.test"]);
    let mut fe = local_frontend();
    fe.tls = Some(TlsConfig {
        certs: vec![one, two, dflt],
        default_cert: Some(2),
        ..TlsConfig::default()
    });
    let proxy = start_proxy(fe, pool(Algorithm::RoundRobin, &[a.addr])).await;
    let addr = proxy.local_addrs()[0];
    let status = |sni: Option<&'static str>, host: &'static str| async move {
        let req = format!("GET / HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        let (out, _) = tls_exchange(addr, sni, b"http/1.1", req.as_bytes()).await;
        String::from_utf8_lossy(&out[..12.min(out.len())]).into_owned()
    };
    for (sni, host, want) in [
        (Some("one.test"), "one.test", "HTTP/1.1 200"),
        (Some("one.test"), "ONE.test.:443", "HTTP/1.1 200"),
        // Coalescing: another name of the same certificate.
        (Some("one.test"), "shared.test", "HTTP/1.1 200"),
        (Some("one.test"), "x.two.test", "HTTP/1.1 421"),
        (Some("one.test"), "default.test", "HTTP/1.1 421"),
        (Some("x.two.test"), "one.test", "HTTP/1.1 421"),
        // A name no certificate has: the default served it; its own name only.
        (Some("other.test"), "other.test", "HTTP/1.1 200"),
        (Some("other.test"), "one.test", "HTTP/1.1 421"),
        // Without an SNI there is nothing to compare.
        (None, "x.two.test", "HTTP/1.1 200"),
    ] {
        assert_eq!(status(sni, host).await, want, "{sni:?} {host}");
    }
    // HTTP/2: the :authority is the host.
    let (stream, _) = tls_connect(addr, Some("one.test"), &[b"h2"], false).await;
    let (mut sender, _conn) = h2_handshake(stream).await;
    for (uri, want) in [
        ("https://x.two.test/", StatusCode::MISDIRECTED_REQUEST),
        ("https://shared.test/", StatusCode::OK),
    ] {
        let req = Request::get(uri).body(Empty::<Bytes>::new()).unwrap();
        let resp = sender.send_request(req).await.unwrap();
        assert_eq!(resp.status(), want, "{uri}");
    }
    // Unless the frontend allows it.
    let mut fe = local_frontend();
    fe.tls = Some(TlsConfig {
        allow_misdirected: true,
        ..proxy_tls_of(&dir)
    });
    let proxy = start_proxy(fe, pool(Algorithm::RoundRobin, &[a.addr])).await;
    let req = b"GET / HTTP/1.1\r\nHost: x.two.test\r\nConnection: close\r\n\r\n";
    let (out, _) = tls_exchange(proxy.local_addrs()[0], Some("one.test"), b"http/1.1", req).await;
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );
}

/// Sends `request` over TLS to `addr` (SNI `sni`, ALPN `alpn` alone) and
/// reads to the close: the answer and the ALPN agreed.
async fn tls_exchange(
    addr: SocketAddr,
    sni: Option<&str>,
    alpn: &[u8],
    request: &[u8],
) -> (Vec<u8>, Option<Vec<u8>>) {
    let (mut stream, _) = tls_connect(addr, sni, &[alpn], false).await;
    let agreed = stream.get_ref().1.alpn_protocol().map(<[u8]>::to_vec);
    stream.write_all(request).await.unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    (out, agreed)
}

/// The certificates `a_request_for_a_host_its_tls_connection_does_not_serve_is_a_421` wrote.
fn proxy_tls_of(dir: &TempDir) -> TlsConfig {
    let pair = |stem: &str| CertPair {
        cert: dir.0.join(format!("{stem}.pem")),
        key: dir.0.join(format!("{stem}.key")),
        names: Vec::new(),
    };
    TlsConfig {
        certs: vec![pair("one"), pair("two"), pair("default")],
        default_cert: Some(2),
        ..TlsConfig::default()
    }
}

#[tokio::test]
async fn tls_sni_default_alpn_h2_and_reload() {
    let a = json_backend("a").await;
    let dir = TempDir::new("tls");
    let (one, one_der) = write_cert(&dir, "one", &["one.test"]);
    let (two, two_der) = write_cert(&dir, "two", &["*.two.test"]);
    let (dflt, dflt_der) = write_cert(&dir, "default", &["default.test"]);
    let mut fe = local_frontend();
    fe.tls = Some(TlsConfig {
        certs: vec![one.clone(), two, dflt.clone()],
        default_cert: Some(2),
        ..TlsConfig::default()
    });
    let proxy = start_proxy(fe, pool(Algorithm::RoundRobin, &[a.addr])).await;
    let addr = proxy.local_addrs()[0];

    assert_eq!(
        tls_connect(addr, Some("one.test"), &[], false).await.1,
        one_der
    );
    assert_eq!(
        tls_connect(addr, Some("x.two.test"), &[], true).await.1,
        two_der
    );
    assert_eq!(
        tls_connect(addr, Some("other.test"), &[], false).await.1,
        dflt_der
    );
    assert_eq!(tls_connect(addr, None, &[], false).await.1, dflt_der);

    // ALPN h2, then a request over it.
    let (stream, _) = tls_connect(addr, Some("one.test"), &[b"h2", b"http/1.1"], false).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut sender, _conn) = h2_handshake(stream).await;
    let req = Request::get("https://one.test/tls")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(j["headers"]["x-forwarded-proto"], "https");
    assert_eq!(j["headers"]["host"], "one.test");

    // ALPN http/1.1 only.
    let (mut stream, _) = tls_connect(addr, Some("one.test"), &[b"http/1.1"], true).await;
    assert_eq!(stream.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    stream
        .write_all(b"GET / HTTP/1.1\r\nHost: one.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = stream.read_to_end(&mut out).await;
    assert!(out.starts_with(b"HTTP/1.1 200"));

    // ALPN http/1.0 only (curl --http1.0): served, not refused.
    let req = b"GET / HTTP/1.0\r\nHost: one.test\r\n\r\n";
    let (out, alpn) = tls_exchange(addr, Some("one.test"), b"http/1.0", req).await;
    assert_eq!(alpn.as_deref(), Some(&b"http/1.0"[..]));
    assert!(
        out.starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&out)
    );

    // Replace the files of the first certificate and reload.
    let (_, new_der) = write_cert(&dir, "one", &["one.test"]);
    assert_eq!(
        tls_connect(addr, Some("one.test"), &[], false).await.1,
        one_der
    );
    proxy.reload_files().unwrap();
    assert_eq!(
        tls_connect(addr, Some("one.test"), &[], false).await.1,
        new_der
    );

    // A broken file fails the reload and keeps the loaded certificates.
    std::fs::write(&one.key, "garbage").unwrap();
    assert!(proxy.reload_files().is_err());
    assert_eq!(
        tls_connect(addr, Some("one.test"), &[], false).await.1,
        new_der
    );
    let _ = dflt;
}

/// A reload shuts the old proxy down while connections it accepted may not
/// have sent a request yet: each still gets its first one answered (here an
/// HTTP/2 connection whose TLS handshake is done and whose preface is not
/// sent when the shutdown comes; hyper alone would close it, a reset).
#[tokio::test]
async fn a_connection_accepted_before_a_shutdown_gets_its_first_request_served() {
    let (proxy, _a, _dir) = one_cert_proxy("tlsdown").await;
    let addr = proxy.local_addrs()[0];
    let (stream, _) = tls_connect(addr, Some("one.test"), &[b"h2"], false).await;
    drop(proxy);
    // The connection's task sees the shutdown before the client speaks.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let (mut sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .expect("HTTP/2 handshake after the shutdown");
    tokio::spawn(conn);
    let req = Request::get("https://one.test/first")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.expect("the first request");
    assert_eq!(resp.status(), StatusCode::OK);
}

#[test]
fn config_from_toml() {
    let cfg: ProxyConfig = toml::from_str(
        r#"
        [[frontend]]
        name = "web"
        binds = ["127.0.0.1:8080"]
        default_pool = "app"
        timeout_http_request = "5s"
        timeout_client = "1500ms"

        [[pool]]
        name = "app"
        algorithm = "leastconn"
        servers = [{ address = "10.0.0.1:80", weight = 2 }, { address = "10.0.0.2:80", backup = true }]
        "#,
    )
    .unwrap();
    cfg.validate().unwrap();
    let fe = &cfg.frontends[0];
    assert_eq!(fe.timeout_http_request, Duration::from_secs(5));
    assert_eq!(fe.timeout_client, Duration::from_millis(1500));
    assert_eq!(fe.max_connections, 10_000);
    assert_eq!(fe.request_header_limit, 16 * 1024);
    assert!(fe.forwarded_headers);
    let p = &cfg.pools[0];
    assert_eq!(p.algorithm, Algorithm::LeastConn);
    assert_eq!(p.retries, 3);
    assert_eq!(p.timeout_server, Duration::from_secs(30));
    assert_eq!((p.servers[0].weight, p.servers[1].backup), (2, true));

    let mut bad = cfg.clone();
    bad.frontends[0].default_pool = "nope".into();
    assert!(matches!(
        bad.validate(),
        Err(ConfigError::UnknownPool { .. })
    ));
    assert!(
        toml::from_str::<ProxyConfig>("[[pool]]\nname='x'\ntimeout_server='5 parsecs'").is_err()
    );
    let bare = toml::from_str::<ProxyConfig>("[[pool]]\nname='x'\ntimeout_server=500");
    assert!(bare.unwrap_err().to_string().contains("has no unit"));
}

/// A client whose connections leave from `src` (any 127.0.0.x exists on loopback).
fn client_from(src: [u8; 4]) -> Client<HttpConnector, Empty<Bytes>> {
    let mut conn = HttpConnector::new();
    conn.set_local_address(Some(std::net::IpAddr::from(src)));
    Client::builder(TokioExecutor::new()).build(conn)
}

async fn get_with(proxy: &Proxy, path: &str, header: Option<(&str, &str)>) -> Answer {
    let mut req = Request::get(format!("http://{}{path}", proxy.local_addrs()[0]));
    if let Some((k, v)) = header {
        req = req.header(k, v);
    }
    let resp = h1_client()
        .request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    into_answer(resp).await
}

async fn three_backends() -> (Vec<JsonBackend>, Vec<SocketAddr>) {
    let b = vec![
        json_backend("a").await,
        json_backend("b").await,
        json_backend("c").await,
    ];
    let addrs = b.iter().map(|b| b.addr).collect();
    (b, addrs)
}

#[tokio::test]
async fn source_hash_keeps_a_client_on_one_server() {
    let (_b, addrs) = three_backends().await;
    let proxy = start_proxy(local_frontend(), pool(Algorithm::Source, &addrs)).await;
    let url = format!("http://{}/", proxy.local_addrs()[0]);
    let mut used = std::collections::HashSet::new();
    for last in 2..=21u8 {
        let client = client_from([127, 0, 0, last]);
        let first = send(&client, url.clone()).await.server.unwrap();
        for _ in 0..3 {
            // A new connection each time: only the source address is kept.
            let again = send(&client_from([127, 0, 0, last]), url.clone()).await;
            assert_eq!(
                again.server.as_deref(),
                Some(first.as_str()),
                "127.0.0.{last}"
            );
        }
        used.insert(first);
    }
    assert!(used.len() >= 2, "20 clients all on {used:?}");
}

#[tokio::test]
async fn uri_hash_and_header_hash() {
    let (_b, addrs) = three_backends().await;
    let proxy = start_proxy(local_frontend(), pool(Algorithm::Uri, &addrs)).await;
    let mut used = std::collections::HashSet::new();
    for i in 0..20 {
        let path = format!("/item/{i}");
        let s = get(&proxy, &path).await.server.unwrap();
        // The query does not count by default.
        let q = get(&proxy, &format!("{path}?v={i}")).await.server.unwrap();
        assert_eq!(s, q, "{path}");
        used.insert(s);
    }
    assert!(used.len() >= 2, "{used:?}");

    let mut p = pool(Algorithm::Header, &addrs);
    p.hash_header = Some("X-User".into());
    let proxy = start_proxy(local_frontend(), p).await;
    let mut used = std::collections::HashSet::new();
    for i in 0..20 {
        let user = format!("user{i}");
        let s = get_with(&proxy, "/", Some(("x-user", &user))).await;
        let s = s.server.unwrap();
        for path in ["/x", "/y"] {
            let again = get_with(&proxy, path, Some(("X-User", &user))).await;
            assert_eq!(again.server.as_deref(), Some(s.as_str()), "{user}");
        }
        used.insert(s);
    }
    assert!(used.len() >= 2, "{used:?}");
    // Without the header: round robin over all three.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..3 {
        seen.insert(get(&proxy, "/").await.server.unwrap());
    }
    assert_eq!(seen.len(), 3, "{seen:?}");
}

#[tokio::test]
async fn hash_server_down_moves_only_its_keys() {
    let b = [
        json_backend("a").await,
        json_backend("b").await,
        json_backend("c").await,
        json_backend("d").await,
    ];
    let addrs: Vec<SocketAddr> = b.iter().map(|b| b.addr).collect();
    let proxy = start_proxy(local_frontend(), pool(Algorithm::Uri, &addrs)).await;
    let paths: Vec<String> = (0..200).map(|i| format!("/k/{i}")).collect();
    let mut before = Vec::new();
    for p in &paths {
        before.push(get(&proxy, p).await.server.unwrap());
    }
    assert!(proxy.set_server_up("app", b[1].addr, false));
    let mut moved = 0;
    for (p, old) in paths.iter().zip(&before) {
        let now = get(&proxy, p).await.server.unwrap();
        assert_ne!(now, "b");
        if now != *old {
            assert_eq!(old, "b", "{p} moved off a live server");
            moved += 1;
        }
    }
    // About a quarter of the keys (those of b) move, and nothing else.
    let on_b = before.iter().filter(|s| *s == "b").count();
    assert_eq!(moved, on_b);
    assert!((25..=75).contains(&moved), "{moved}");
}

/// `(status, Tw)` of the JSON access log lines for `uri` (`json_access_records`).
async fn tw(uri: &str) -> Vec<(u16, i64)> {
    json_access_records(uri)
        .await
        .iter()
        .filter_map(|j| {
            Some((
                u16::try_from(j["status"].as_u64()?).ok()?,
                j["tw"].as_i64()?,
            ))
        })
        .collect()
}

/// A frontend whose access log is kept (JSON lines), for `tw`.
fn logged_frontend() -> Frontend {
    capture_access_log();
    let mut fe = local_frontend();
    fe.log_format = LogFormat::Json;
    fe
}

/// Waits (bounded) until the pool's first server has `n` requests in flight,
/// so tests order their requests by state rather than by sleeping.
async fn until_active(proxy: &Proxy, n: usize) {
    for _ in 0..500 {
        if proxy.stats().pools()[0].servers[0].current >= n {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("the server never had {n} requests in flight");
}

#[tokio::test]
async fn maxconn_queues_then_serves_with_tw() {
    let a = json_backend("a").await;
    let mut p = pool(Algorithm::RoundRobin, &[a.addr]);
    p.servers[0].maxconn = 1;
    let proxy = Arc::new(start_proxy(logged_frontend(), p).await);
    let p2 = proxy.clone();
    let first = tokio::spawn(async move { get(&p2, "/sleep/300?first").await });
    until_active(&proxy, 1).await;
    let started = std::time::Instant::now();
    let second = get(&proxy, "/sleep/300?second").await;
    assert_eq!(second.status, StatusCode::OK);
    // It waited for the first (about 250 ms) and then ran its own 300 ms.
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert_eq!(first.await.unwrap().status, StatusCode::OK);
    let first_tw = tw("/sleep/300?first").await;
    let second_tw = tw("/sleep/300?second").await;
    assert_eq!(first_tw, [(200, 0)], "{second_tw:?}");
    assert_eq!(second_tw.len(), 1, "{second_tw:?}");
    assert!(second_tw[0].1 >= 150, "{second_tw:?}");
}

#[tokio::test]
async fn queue_timeout_is_503() {
    let a = json_backend("a").await;
    let mut p = pool(Algorithm::LeastConn, &[a.addr]);
    p.servers[0].maxconn = 1;
    p.timeout_queue = Duration::from_millis(200);
    let proxy = Arc::new(start_proxy(logged_frontend(), p).await);
    let p2 = proxy.clone();
    let slow = tokio::spawn(async move { get(&p2, "/sleep/1000").await });
    until_active(&proxy, 1).await;
    let r = get(&proxy, "/queued").await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert!(r.body.contains("503"));
    assert_eq!(slow.await.unwrap().status, StatusCode::OK);
    let tw = tw("/queued").await;
    assert_eq!(tw.len(), 1, "{tw:?}");
    assert_eq!(tw[0].0, 503);
    assert!(tw[0].1 >= 190, "{tw:?}");
}

#[tokio::test]
async fn first_fills_server_to_maxconn() {
    let (a, b) = (json_backend("a").await, json_backend("b").await);
    let mut p = pool(Algorithm::First, &[a.addr, b.addr]);
    p.servers[0].maxconn = 2;
    p.servers[1].maxconn = 2;
    let proxy = Arc::new(start_proxy(local_frontend(), p).await);
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let p = proxy.clone();
        tasks.push(tokio::spawn(async move { get(&p, "/sleep/400").await }));
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let mut servers = Vec::new();
    for t in tasks {
        servers.push(t.await.unwrap().server.unwrap());
    }
    assert_eq!(servers, ["a", "a", "b"]);
    // Idle again: everything goes to the first server.
    assert_eq!(get(&proxy, "/").await.server.as_deref(), Some("a"));
}

#[test]
fn hash_and_queue_config() {
    let cfg: ProxyConfig = toml::from_str(
        r#"
        [[pool]]
        name = "h"
        algorithm = "header"
        hash_header = "X-User"
        timeout_queue = "2s"
        servers = [{ address = "10.0.0.1:80", maxconn = 10 }, { address = "10.0.0.2:80" }]
        [[pool]]
        name = "u"
        algorithm = "uri"
        hash_query = true
        timeout_server_idle = "0s"
        [[pool]]
        name = "s"
        algorithm = "source"
        "#,
    )
    .unwrap();
    cfg.validate().unwrap();
    let p = &cfg.pools[0];
    assert_eq!(p.algorithm, Algorithm::Header);
    assert_eq!(p.timeout_queue, Duration::from_secs(2));
    assert_eq!((p.servers[0].maxconn, p.servers[1].maxconn), (10, 0));
    assert_eq!(cfg.pools[1].timeout_queue, Duration::from_secs(5));
    assert!(cfg.pools[1].hash_query);
    assert_eq!(p.timeout_server_idle, Duration::from_secs(30));
    assert_eq!(cfg.pools[1].timeout_server_idle, Duration::ZERO);
    assert_eq!(cfg.pools[2].algorithm, Algorithm::Source);

    let bad = |edit: &dyn Fn(&mut ProxyConfig)| {
        let mut c = cfg.clone();
        edit(&mut c);
        matches!(c.validate(), Err(ConfigError::BadHash { .. }))
    };
    assert!(bad(&|c| c.pools[0].hash_header = None));
    assert!(bad(&|c| c.pools[0].hash_header = Some("bad header".into())));
    assert!(bad(&|c| c.pools[1].hash_header = Some("x".into())));
    assert!(bad(&|c| c.pools[2].hash_query = true));
    // A pool lists a server once, whatever its algorithm.
    for algorithm in [Algorithm::Header, Algorithm::RoundRobin] {
        let mut c = cfg.clone();
        c.pools[0].algorithm = algorithm;
        let s = c.pools[0].servers[0].clone();
        c.pools[0].servers.push(s);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::DuplicateServer { .. })
        ));
    }
}

/// A client of TLS `version` that resumes its sessions, accepting any certificate.
fn resuming_client(
    version: &'static rustls::SupportedProtocolVersion,
) -> tokio_rustls::TlsConnector {
    let cfg = crate::support::any_cert_client(provider(), &[version]);
    tokio_rustls::TlsConnector::from(Arc::new(cfg))
}

/// One request to one.test over `client`: how the handshake went, and the
/// answer (read to its end: TLS 1.3 tickets come after the handshake).
async fn tls_get(
    addr: SocketAddr,
    client: &tokio_rustls::TlsConnector,
) -> (Option<rustls::HandshakeKind>, String) {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("one.test").unwrap();
    let mut s = client.connect(name, tcp).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: one.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = s.read_to_end(&mut out).await;
    let kind = s.get_ref().1.handshake_kind();
    (kind, String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_sessions_resume_across_a_restart_that_keeps_the_tls_settings() {
    let (a, b) = (json_backend("a").await, json_backend("b").await);
    let dir = TempDir::new("tls-restart");
    let (one, _) = write_cert(&dir, "one", &["one.test"]);
    let (two, _) = write_cert(&dir, "two", &["one.test"]);
    let cfg = |cert: &CertPair, server| {
        let mut fe = local_frontend();
        fe.tls = Some(TlsConfig {
            certs: vec![cert.clone()],
            ..TlsConfig::default()
        });
        ProxyConfig {
            frontends: vec![fe],
            pools: vec![crate::support::one_server_pool(server)],
            ..Default::default()
        }
    };
    let threads = Threads {
        count: 1,
        ..Threads::default()
    };
    let first = Proxy::start_threads(cfg(&one, a.addr), None, &threads, None).unwrap();
    let addr = first.local_addrs()[0];
    let client = resuming_client(&rustls::version::TLS13);
    assert_eq!(
        tls_get(addr, &client).await.0,
        Some(rustls::HandshakeKind::Full)
    );
    // A pool change restarts the proxy (as `lb add backend pool:...` does):
    // the session resumes, on the new pool.
    let second = Proxy::start_threads(cfg(&one, b.addr), None, &threads, Some(&first)).unwrap();
    drop(first);
    // (The old threads stop accepting within milliseconds.)
    tokio::time::sleep(Duration::from_millis(150)).await;
    let (kind, answer) = tls_get(addr, &client).await;
    assert_eq!(kind, Some(rustls::HandshakeKind::Resumed));
    assert!(answer.contains("\"server\":\"b\""), "{answer}");
    // Other TLS settings: a fresh start.
    let third = Proxy::start_threads(cfg(&two, b.addr), None, &threads, Some(&second)).unwrap();
    drop(second);
    tokio::time::sleep(Duration::from_millis(150)).await;
    assert_eq!(
        tls_get(addr, &client).await.0,
        Some(rustls::HandshakeKind::Full)
    );
    drop(third);
}
