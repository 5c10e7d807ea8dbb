//! `mode = "tcp"` frontends: TLS passed through and routed by its SNI, TLS
//! offloaded, plain bytes relayed; sessions balanced, retried, denied and
//! logged as HAProxy's tcplog.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backends::server;
use crate::general::tls_connect;
use crate::support::{
    GIVE_UP, TempDir, access_lines, capture_access_log, dead_addr, provider, two_pool_config,
};
use lb_proxy::*;

/// A plain TCP server that greets with `name\n`, then echoes what it gets.
async fn echo(name: &'static str) -> SocketAddr {
    server(move |mut s| async move {
        let _ = s.write_all(format!("{name}\n").as_bytes()).await;
        let (mut r, mut w) = s.split();
        let _ = tokio::io::copy(&mut r, &mut w).await;
    })
    .await
}

/// A TLS server for `name` (its own self-signed certificate, whose DER comes
/// back) that writes `name` once the handshake is done, then echoes.
async fn tls_echo(name: &'static str) -> (SocketAddr, Vec<u8>) {
    let ck = rcgen::generate_simple_self_signed(vec![name.to_string()]).unwrap();
    let der = ck.cert.der().to_vec();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(ck.key_pair.serialize_der()));
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![CertificateDer::from(der.clone())], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
    let addr = server(move |s| {
        let acceptor = acceptor.clone();
        async move {
            let Ok(mut tls) = acceptor.accept(s).await else {
                return;
            };
            let _ = tls.write_all(name.as_bytes()).await;
            let _ = tls.shutdown().await;
        }
    })
    .await;
    (addr, der)
}

/// A config with a tcp frontend `web` (its extra keys: `frontend`) over
/// pools `app` and `api`, then `top`.
fn tcp_config(app: SocketAddr, api: SocketAddr, frontend: &str, top: &str) -> ProxyConfig {
    two_pool_config(app, api, &format!("mode = \"tcp\"\n{frontend}"), top)
}

/// Reads a first line (a backend's greeting).
async fn greeting(s: &mut TcpStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        let n = tokio::time::timeout(GIVE_UP, s.read(&mut b))
            .await
            .unwrap()
            .unwrap();
        assert!(n > 0, "closed after {line:?}");
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap().trim().to_string()
}

#[tokio::test]
async fn tls_passes_through_to_the_pool_its_sni_names() {
    let (a, a_der) = tls_echo("a.test").await;
    let (b, b_der) = tls_echo("b.test").await;
    let rules = r#"
timeout_http_request = "500ms"
[[frontend.acl]]
name = "is_b"
sni_suffix = "b.test"
[[frontend.use_pool]]
pool = "api"
if = "is_b"
"#;
    let cfg = tcp_config(a, b, rules, "");
    let router = routing::router(&cfg).unwrap();
    let proxy = Proxy::start(cfg, Some(router)).await.unwrap();
    let addr = proxy.local_addrs()[0];
    for (sni, der, name) in [
        (Some("b.test"), &b_der, "b.test"),
        (Some("x.b.test"), &b_der, "b.test"),
        (Some("a.test"), &a_der, "a.test"),
        (None, &a_der, "a.test"),
    ] {
        // The backend's own certificate: TLS went through untouched.
        let (mut tls, leaf) = tls_connect(addr, sni, &[], false).await;
        assert_eq!(&leaf, der, "{sni:?}");
        let mut got = String::new();
        tls.read_to_string(&mut got).await.unwrap();
        assert_eq!(got, name, "{sni:?}");
    }
    // First bytes that are no whole, well-formed ClientHello within
    // timeout_http_request are closed, never sent on without a name (the
    // server might read the name the rules did not).
    let hello_begins = [0x16, 3, 1, 0, 200, 1, 0, 0, 196, 3, 3];
    let cases: [(&str, &[u8]); 3] = [
        ("not TLS", b"GET / HTTP/1.1\r\nHost: b.test\r\n\r\n"),
        (
            "an empty record first",
            &[0x16, 3, 1, 0, 0, 0x16, 3, 1, 0, 4, 1, 0, 0, 0],
        ),
        ("half a ClientHello", &hello_begins),
    ];
    for (what, bytes) in cases {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(bytes).await.unwrap();
        let mut got = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut got)).await;
        assert!(read.is_ok(), "{what}: still open");
        assert!(got.is_empty(), "{what}: the server answered {got:?}");
    }
    assert_eq!(proxy.stats().frontends()[0].counters.denied_connections, 3);
}

#[tokio::test]
async fn plain_sessions_are_relayed_balanced_retried_and_logged() {
    capture_access_log();
    let x = echo("x").await;
    let y = echo("y").await;
    let mut cfg = tcp_config(x, y, "", "");
    cfg.pools[0].servers = vec![ServerSpec::new(x), ServerSpec::new(y)];
    cfg.pools[0].algorithm = Algorithm::LeastConn;
    let proxy = Proxy::start(cfg, None).await.unwrap();
    let addr = proxy.local_addrs()[0];

    // A server that speaks first is heard at once: no rule waits for bytes.
    let began = Instant::now();
    let mut held = TcpStream::connect(addr).await.unwrap();
    let first = greeting(&mut held).await;
    assert!(began.elapsed() < Duration::from_secs(2));
    // leastconn counts sessions: with one held open, the next goes to the other.
    let mut other = TcpStream::connect(addr).await.unwrap();
    let second = greeting(&mut other).await;
    assert_ne!(first, second, "leastconn with {first} busy");

    // Bytes both ways, a megabyte each, and a half-close that lets the
    // server finish (it echoes, then closes).
    let data: Vec<u8> = (0..1_000_000u32).map(|i| (i % 251) as u8).collect();
    let (mut r, mut w) = other.into_split();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        w.write_all(&sent).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), r.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    writer.await.unwrap();
    assert_eq!(back, data);
    drop(held);

    // One tcplog line per session: pool/server, Tw/Tc/Tt, bytes out, state.
    let mut lines = Vec::new();
    for _ in 0..100 {
        lines = access_lines()
            .into_iter()
            .filter(|l| l.contains(" web app/") && l.ends_with(" 1000002 --"))
            .collect();
        if !lines.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let line = lines
        .first()
        .unwrap_or_else(|| panic!("{:#?}", access_lines()));
    let fields: Vec<&str> = line.split_whitespace().collect();
    // client [date] frontend pool/server Tw/Tc/Tt bytes state
    assert_eq!(fields.len(), 7, "{line}");
    let expected = if second == "x" { x } else { y };
    assert_eq!(fields[3], format!("app/{expected}"));
    assert_eq!(fields[4].split('/').count(), 3, "{line}");

    // A server that refuses the connection: the session is retried on the next.
    let dead = dead_addr().await;
    let mut cfg = tcp_config(x, y, "", "");
    cfg.pools[0].servers = vec![ServerSpec::new(dead), ServerSpec::new(x)];
    cfg.pools[0].algorithm = Algorithm::First;
    let proxy = Proxy::start(cfg, None).await.unwrap();
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    assert_eq!(greeting(&mut s).await, "x");
    let pools = proxy.stats().pools();
    let dead_stats = pools[0].servers.iter().find(|s| s.address == dead).unwrap();
    assert_eq!(dead_stats.counters.connect_errors, 1, "{dead_stats:?}");
}

#[tokio::test]
async fn tls_is_offloaded_and_connections_are_denied_by_sni() {
    let x = echo("x").await;
    let dir = TempDir::new("tcp-tls");
    let (cert, _) = crate::general::write_cert(&dir, "one", &["ok.test", "bad.test"]);
    let rules = format!(
        r#"
[frontend.tls]
certs = [{{ cert = "{}", key = "{}" }}]
[[frontend.acl]]
name = "bad"
sni = "bad.test"
[[frontend.request]]
action = "deny"
if = "bad"
"#,
        cert.cert.display(),
        cert.key.display()
    );
    let cfg = tcp_config(x, x, &rules, "");
    let router = routing::router(&cfg).unwrap();
    let proxy = Proxy::start(cfg, Some(router)).await.unwrap();
    let addr = proxy.local_addrs()[0];
    // The server gets plaintext; no ALPN is agreed (the proxy relays bytes).
    let (mut tls, _) = tls_connect(addr, Some("ok.test"), &[b"h2", b"http/1.1"], false).await;
    assert_eq!(tls.get_ref().1.alpn_protocol(), None);
    let mut line = [0u8; 2];
    tls.read_exact(&mut line).await.unwrap();
    assert_eq!(&line, b"x\n");
    tls.write_all(b"ping").await.unwrap();
    let mut pong = [0u8; 4];
    tls.read_exact(&mut pong).await.unwrap();
    assert_eq!(&pong, b"ping");
    // Denied: closed without a byte of the server's.
    let (mut tls, _) = tls_connect(addr, Some("bad.test"), &[], false).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(GIVE_UP, tls.read_to_end(&mut rest))
        .await
        .unwrap();
    assert!(rest.is_empty(), "{rest:?}");
}

#[tokio::test]
async fn an_offloaded_client_closing_without_close_notify_still_gets_the_answer() {
    // A server that answers once the client's side has ended (its EOF).
    let server = crate::backends::server(|mut s| async move {
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got).await;
        let _ = s.write_all(format!("got {}", got.len()).as_bytes()).await;
    })
    .await;
    let dir = TempDir::new("tcp-tls-eof");
    let (cert, _) = crate::general::write_cert(&dir, "one", &["ok.test"]);
    let rules = format!(
        "[frontend.tls]\ncerts = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        cert.cert.display(),
        cert.key.display()
    );
    let cfg = tcp_config(server, server, &rules, "");
    let proxy = Proxy::start(cfg, None).await.unwrap();
    let (mut tls, _) = tls_connect(proxy.local_addrs()[0], Some("ok.test"), &[], false).await;
    tls.write_all(b"ping").await.unwrap();
    tls.flush().await.unwrap();
    // A TCP half-close without TLS's close_notify (as many clients end):
    // the end of what it sends, not of what it reads.
    tls.get_mut().0.shutdown().await.unwrap();
    let mut answer = Vec::new();
    let _ = tokio::time::timeout(GIVE_UP, tls.read_to_end(&mut answer))
        .await
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&answer), "got 4");
}

#[test]
fn a_tcp_frontend_refuses_what_needs_http() {
    let any: SocketAddr = "127.0.0.1:1".parse().unwrap();
    for (extra, needle) in [
        (
            "[[frontend.acl]]\nname = \"p\"\npath = \"/x\"",
            "ACL `p` uses `path`",
        ),
        (
            "[[frontend.request]]\naction = \"set-header\"\nname = \"a\"\nvalue = \"b\"",
            "request action `set-header` needs mode http",
        ),
        (
            "[[frontend.response]]\naction = \"del-header\"\nname = \"a\"",
            "response actions need mode http",
        ),
    ] {
        let e = tcp_config(any, any, extra, "")
            .validate()
            .unwrap_err()
            .to_string();
        assert!(e.contains(needle), "{extra}: {e}");
    }
    let mut cfg = tcp_config(any, any, "", "");
    cfg.pools[0].h2 = true;
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("HTTP/2"), "{e}");
    // Connection ACLs are fine.
    let ok = "[[frontend.acl]]\nname = \"s\"\nsrc = \"10.0.0.0/8\"\n[[frontend.request]]\naction = \"deny\"\nif = \"s\"";
    tcp_config(any, any, ok, "").validate().unwrap();
}

/// Serving threads (one) whose proxy, once dropped, closes what is left after `hard_stop_after`.
fn one_thread(hard_stop_after: Duration) -> Threads {
    Threads {
        count: 1,
        hard_stop_after,
        ..Threads::default()
    }
}

/// Writes `ping` on `s` and reads it back from the echo server.
async fn echoes(s: &mut TcpStream) -> bool {
    let mut back = [0u8; 4];
    s.write_all(b"ping").await.is_ok()
        && tokio::time::timeout(GIVE_UP, s.read_exact(&mut back))
            .await
            .is_ok_and(|r| r.is_ok())
        && &back == b"ping"
}

/// Whether the proxy closes `s` within `wait`.
async fn closed_within(s: &mut TcpStream, wait: Duration) -> bool {
    let mut buf = [0u8; 64];
    matches!(
        tokio::time::timeout(wait, s.read(&mut buf)).await,
        Ok(Ok(0) | Err(_))
    )
}

/// The access log line of the client at `addr` to `server`.
async fn access_line_of(addr: &str, server: SocketAddr) -> String {
    let line = crate::support::access_line_of(addr, server).await;
    line.unwrap_or_else(|| panic!("no log line for {addr} to {server}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_that_outlives_a_reload_is_closed_after_hard_stop_after() {
    capture_access_log();
    let x = echo("x").await;
    let start = |hard, previous: Option<&Proxy>| {
        Proxy::start_threads(tcp_config(x, x, "", ""), None, &one_thread(hard), previous).unwrap()
    };
    let first = start(Duration::from_millis(600), None);
    let front = first.local_addrs()[0];
    let mut old = TcpStream::connect(front).await.unwrap();
    assert_eq!(greeting(&mut old).await, "x");
    let second = start(Duration::from_secs(3600), Some(&first));
    let dropped = Instant::now();
    drop(first);
    // (A connection made at once may still be taken by the old threads,
    // which stop accepting within milliseconds.)
    tokio::time::sleep(Duration::from_millis(150)).await;
    // The old session goes on for a while, new ones are served...
    let mut new = TcpStream::connect(front).await.unwrap();
    assert_eq!(greeting(&mut new).await, "x");
    assert!(echoes(&mut old).await);
    // ... then it is closed, the new one is not.
    assert!(closed_within(&mut old, Duration::from_secs(5)).await);
    assert!(
        dropped.elapsed() >= Duration::from_millis(500),
        "{:?}",
        dropped.elapsed()
    );
    assert!(echoes(&mut new).await);
    // Logged as killed (HAProxy's `K`), its bytes counted.
    let me = old.local_addr().unwrap().to_string();
    let line = access_line_of(&me, x).await;
    assert!(line.ends_with(" KD"), "{line}");
    assert!(line.contains(" 6 "), "x\n then ping: {line}");
    drop(second);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_cut_at_the_hard_stop_is_logged_as_killed() {
    capture_access_log();
    // A server that starts a long answer and never finishes it.
    let slow = server(|mut s| async move {
        let _ = crate::backends::read_head(&mut s).await;
        let _ = s
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 1000000\r\n\r\nfirst")
            .await;
        tokio::time::sleep(Duration::from_secs(30)).await;
    })
    .await;
    let cfg = two_pool_config(slow, slow, "", "");
    let first = Proxy::start_threads(
        cfg.clone(),
        None,
        &one_thread(Duration::from_millis(300)),
        None,
    )
    .unwrap();
    let front = first.local_addrs()[0];
    // HTTP/2 (hyper's path), from a port of our own to find the line by.
    let tcp = TcpStream::connect(front).await.unwrap();
    let me = tcp.local_addr().unwrap().to_string();
    let (mut send, _conn) =
        crate::support::h2_handshake::<_, http_body_util::Empty<bytes::Bytes>>(tcp).await;
    let req = http::Request::get(format!("http://{front}/long"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), 200);
    // HTTP/1.1 (our own path), its answer begun.
    let mut h1 = TcpStream::connect(front).await.unwrap();
    let me_h1 = h1.local_addr().unwrap().to_string();
    h1.write_all(b"GET /long HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut got = Vec::new();
    while !got.ends_with(b"first") {
        let mut buf = [0u8; 256];
        let n = tokio::time::timeout(GIVE_UP, h1.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_ne!(n, 0, "{}", String::from_utf8_lossy(&got));
        got.extend_from_slice(&buf[..n]);
    }
    let second = Proxy::start_threads(
        cfg,
        None,
        &one_thread(Duration::from_secs(3600)),
        Some(&first),
    )
    .unwrap();
    drop(first);
    let line = access_line_of(&me, slow).await;
    assert!(line.contains(" KD"), "killed, not a client abort: {line}");
    let line = access_line_of(&me_h1, slow).await;
    assert!(
        line.contains(" 200 5 ") && line.contains(" KD"),
        "HTTP/1.1, with the 5 body bytes the client got: {line}"
    );
    drop((resp, second, h1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_at_the_hard_stop_are_logged_as_killed_in_their_phase() {
    capture_access_log();
    // Servers that take a request's head and never answer; "app"'s takes
    // one request at a time (maxconn 1), so a second one waits in the queue.
    let heads = Arc::new(tokio::sync::Semaphore::new(0));
    let mute = |heads: Arc<tokio::sync::Semaphore>| {
        server(move |mut s| {
            let heads = heads.clone();
            async move {
                let _ = crate::backends::read_head(&mut s).await;
                heads.add_permits(1);
                tokio::time::sleep(Duration::from_secs(30)).await;
            }
        })
    };
    let (app, api) = (mute(heads.clone()).await, mute(heads.clone()).await);
    // A server whose accept queue is full: its SYNs are dropped, a connect
    // to it waits (pool "syn", for /syn/).
    let full = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    full.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())
        .unwrap();
    full.listen(0).unwrap();
    let syn = full.local_addr().unwrap().as_socket().unwrap();
    let fillers: Vec<_> = (0..3)
        .filter_map(|_| std::net::TcpStream::connect_timeout(&syn, Duration::from_millis(200)).ok())
        .collect();
    let rules = "[[frontend.acl]]\nname = \"is_api\"\npath_prefix = \"/api/\"\n\
                 [[frontend.acl]]\nname = \"is_syn\"\npath_prefix = \"/syn/\"\n\
                 [[frontend.use_pool]]\npool = \"api\"\nif = \"is_api\"\n\
                 [[frontend.use_pool]]\npool = \"syn\"\nif = \"is_syn\"\n";
    let mut cfg = two_pool_config(app, api, rules, "");
    cfg.pools[0].servers[0].maxconn = 1;
    let mut syn_pool = Pool::new("syn", Algorithm::RoundRobin, vec![ServerSpec::new(syn)]);
    (syn_pool.timeout_connect, syn_pool.retries) = (Duration::from_secs(30), 0);
    cfg.pools.push(syn_pool);
    let hard = one_thread(Duration::from_millis(300));
    let route = || Some(lb_proxy::routing::router(&cfg).unwrap());
    let first = Proxy::start_threads(cfg.clone(), route(), &hard, None).unwrap();
    let front = first.local_addrs()[0];
    let h1 = |request: &'static str| async move {
        let mut s = TcpStream::connect(front).await.unwrap();
        s.write_all(request.as_bytes()).await.unwrap();
        s
    };
    // Our HTTP/1 path: waiting for its answer (H), in the queue behind it
    // (Q), sending its body (10 bytes of 100: D).
    let waiting = h1("GET /hard-stop/waits HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let got = |n| tokio::time::timeout(GIVE_UP, heads.acquire_many(n));
    got(1).await.unwrap().unwrap().forget();
    let queued = h1("GET /hard-stop/queued HTTP/1.1\r\nHost: x\r\n\r\n").await;
    let uploading =
        h1("POST /api/hard-stop/up HTTP/1.1\r\nHost: x\r\ncontent-length: 100\r\n\r\n0123456789")
            .await;
    got(1).await.expect("the upload's head").unwrap().forget();
    // HTTP/2 (hyper's path), waiting for its answer.
    let tcp = TcpStream::connect(front).await.unwrap();
    let h2_me = tcp.local_addr().unwrap();
    let (mut send, _conn) =
        crate::support::h2_handshake::<_, http_body_util::Empty<bytes::Bytes>>(tcp).await;
    let req = http::Request::get(format!("http://{front}/api/hard-stop/h2"))
        .body(http_body_util::Empty::new())
        .unwrap();
    let h2_answer = tokio::spawn(send.send_request(req));
    got(1)
        .await
        .expect("the HTTP/2 request's head")
        .unwrap()
        .forget();
    // Connecting (C), once the proxy counts it on its server.
    let connecting = h1("GET /syn/hard-stop/connect HTTP/1.1\r\nHost: x\r\n\r\n").await;
    // The queued request in the queue, the connecting one on its server.
    let until = Instant::now() + GIVE_UP;
    while first.stats().pools()[0].queued == 0 || first.stats().pools()[2].servers[0].current == 0 {
        assert!(
            Instant::now() < until,
            "the requests never queued or connected"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let hour = one_thread(Duration::from_secs(3600));
    let second = Proxy::start_threads(cfg.clone(), route(), &hour, Some(&first)).unwrap();
    drop(first);
    // By client and request (other tests' clients may have had the port).
    let line_of = |client: SocketAddr, path: &'static str| async move {
        let (prefix, request) = (format!("{client} "), format!(" {path} HTTP/"));
        let until = Instant::now() + Duration::from_secs(5);
        loop {
            let lines = access_lines().into_iter();
            if let Some(l) = lines
                .filter(|l| l.contains(&request))
                .find(|l| l.starts_with(&prefix))
            {
                return l;
            }
            assert!(Instant::now() < until, "no log line for {client}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    };
    // No answer: status -1 (HAProxy's), no byte; the server where one was given.
    let line = line_of(waiting.local_addr().unwrap(), "/hard-stop/waits").await;
    assert!(
        line.contains(&format!(" web app/{app} ")) && line.contains(" -1 0 KH"),
        "{line}"
    );
    assert!(
        line.ends_with("\"GET /hard-stop/waits HTTP/1.1\""),
        "{line}"
    );
    let line = line_of(connecting.local_addr().unwrap(), "/syn/hard-stop/connect").await;
    assert!(
        line.contains(&format!(" web syn/{syn} ")) && line.contains(" -1 0 KC"),
        "{line}"
    );
    let line = line_of(queued.local_addr().unwrap(), "/hard-stop/queued").await;
    assert!(
        line.contains(" web app/<NOSRV> ") && line.contains(" -1 0 KQ"),
        "{line}"
    );
    let line = line_of(uploading.local_addr().unwrap(), "/api/hard-stop/up").await;
    assert!(
        line.contains(&format!(" web api/{api} ")) && line.contains(" -1 0 KD"),
        "{line}"
    );
    let line = line_of(h2_me, "/api/hard-stop/h2").await;
    assert!(
        line.contains(&format!(" web api/{api} ")) && line.contains(" -1 0 KH"),
        "{line}"
    );
    assert!(
        line.ends_with("\"GET /api/hard-stop/h2 HTTP/2.0\""),
        "{line}"
    );
    drop((waiting, queued, uploading, connecting, h2_answer, second));
    drop((fillers, full));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn more_reloads_draining_than_allowed_close_the_oldest() {
    let x = echo("x").await;
    let hour = Duration::from_secs(3600);
    let start = |previous: Option<&Proxy>| {
        Proxy::start_threads(tcp_config(x, x, "", ""), None, &one_thread(hour), previous).unwrap()
    };
    let mut live = start(None);
    let front = live.local_addrs()[0];
    let mut sessions = Vec::new();
    // A session held open on each proxy, then a reload: MAX_DRAINING + 1 of them.
    for _ in 0..=5 {
        let mut s = TcpStream::connect(front).await.unwrap();
        assert_eq!(greeting(&mut s).await, "x");
        sessions.push(s);
        let next = start(Some(&live));
        drop(std::mem::replace(&mut live, next));
    }
    // The oldest proxy closed its session at once, not an hour later.
    assert!(closed_within(&mut sessions[0], Duration::from_secs(5)).await);
    let last = sessions.last_mut().unwrap();
    assert!(echoes(last).await, "the latest reloads' sessions go on");
    drop(live);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pool_servers_change_in_place_without_touching_sessions() {
    let (x, y) = (echo("x").await, echo("y").await);
    let cfg = tcp_config(x, x, "", "");
    let hour = Duration::from_secs(3600);
    let mut proxy = Proxy::start_threads(cfg.clone(), None, &one_thread(hour), None).unwrap();
    let front = proxy.local_addrs()[0];
    let mut held = TcpStream::connect(front).await.unwrap();
    assert_eq!(greeting(&mut held).await, "x");
    // More changes than dropped proxies may drain (a restart each would
    // close `held` at the fifth): y joins and leaves the pool in turn.
    let mut with_y = cfg.clone();
    with_y.pools[0].servers.push(ServerSpec::new(y));
    for round in 0..8 {
        let next = if round % 2 == 0 { &with_y } else { &cfg };
        assert!(proxy.update_servers(next), "round {round}");
    }
    assert!(proxy.update_servers(&with_y));
    let names: std::collections::BTreeSet<String> = {
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..6 {
            let mut s = TcpStream::connect(front).await.unwrap();
            seen.insert(greeting(&mut s).await);
        }
        seen
    };
    assert_eq!(names, ["x".to_string(), "y".to_string()].into());
    assert!(echoes(&mut held).await, "the session went on");
    // The pool's session counts carried over: `held` is still counted on x
    // (once the proxy has seen the probes above close).
    let on_x = || proxy.stats().pools()[0].servers[0].current;
    let until = Instant::now() + GIVE_UP;
    while on_x() != 1 && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(on_x(), 1, "{:?}", proxy.stats().pools());
    // Anything else changed is not done in place.
    let mut other = with_y.clone();
    other.pools[0].retries = 9;
    assert!(!proxy.update_servers(&other));
    let mut bad = with_y.clone();
    bad.pools[0].servers.push(ServerSpec::new(y));
    assert!(!proxy.update_servers(&bad), "a duplicate server is refused");
    drop(proxy);
}
