//! Connections closed unread at accept. `max_connections_per_source`: one
//! client address may not hold more than that many of a frontend's
//! connections; one more is closed, and others are served as before.
//! `reject` rules: a source they name is closed before TLS and before any
//! request. Real sockets on 127.0.0.1 (and 127.0.0.2).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};

use crate::backends::server_answering;
use crate::support::{
    GIVE_UP, TempDir, access_lines, any_cert_client, capture_access_log, local_frontend,
    one_server_pool, provider, start_proxy, two_pool_config,
};
use lb_proxy::*;

/// A keep-alive request.
const REQUEST: &[u8] = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n";

/// A server answering `ok` to each request head it gets, keeping the connection.
async fn server() -> SocketAddr {
    server_answering("HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
        .await
        .0
}

/// Sends a request on `s` and returns its whole answer (`ok` ends it).
async fn ask(s: &mut TcpStream) -> String {
    s.write_all(REQUEST).await.unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(GIVE_UP, async {
        while !got.ends_with(b"\r\n\r\nok") {
            match s.read(&mut buf).await {
                Ok(n @ 1..) => got.extend_from_slice(&buf[..n]),
                _ => break,
            }
        }
    })
    .await;
    let text = String::from_utf8_lossy(&got).into_owned();
    assert!(read.is_ok(), "no whole answer in time; got {text:?}");
    text
}

/// Connects to `front` from `source` (any port).
async fn connect_from(source: &str, front: SocketAddr) -> TcpStream {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(format!("{source}:0").parse().unwrap()).unwrap();
    socket.connect(front).await.unwrap()
}

/// A proxy whose frontend has `rules` (TOML), both pools on `backend`.
async fn start_with(backend: SocketAddr, rules: &str) -> Proxy {
    let cfg = crate::support::two_pool_config(backend, backend, rules, "");
    let router = routing::router(&cfg).unwrap();
    Proxy::start(cfg, Some(router)).await.unwrap()
}

/// Sends `bytes` then `REQUEST` on `s`; the status line's first 12 bytes.
async fn status_after<S: AsyncReadExt + AsyncWriteExt + Unpin>(
    s: &mut S,
    bytes: &[u8],
) -> [u8; 12] {
    s.write_all(bytes).await.unwrap();
    s.write_all(REQUEST).await.unwrap();
    let mut got = [0u8; 12];
    s.read_exact(&mut got).await.unwrap();
    got
}

/// Checks that `s`, its request sent, is closed by the proxy with no answer.
async fn closed_unanswered(mut s: TcpStream, what: &str) {
    // The proxy may have closed it already: the write may fail.
    let _ = s.write_all(REQUEST).await;
    let mut buf = [0u8; 1024];
    match tokio::time::timeout(GIVE_UP, s.read(&mut buf)).await {
        Ok(Ok(0)) | Ok(Err(_)) => {}
        Ok(Ok(n)) => panic!("{what}: answered {:?}", String::from_utf8_lossy(&buf[..n])),
        Err(_) => panic!("{what}: still open after {GIVE_UP:?}"),
    }
}

/// Waits until the frontend has `n` connections open (a client's close is
/// seen by the proxy a moment later).
async fn until_open(proxy: &Proxy, n: usize) {
    let current = || proxy.stats().frontends()[0].current_connections;
    let waited = tokio::time::timeout(GIVE_UP, async {
        while current() != n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(waited.is_ok(), "{} open, not {n}", current());
}

#[tokio::test]
async fn a_source_past_its_limit_is_closed_unread_until_one_of_its_own_closes() {
    let pool = one_server_pool(server().await);
    let mut fe = local_frontend();
    fe.max_connections_per_source = 3;
    // One slot past the source's three: were a refused connection to keep
    // its slot, no other would be served after it.
    fe.max_connections = 4;
    let proxy = start_proxy(fe, pool).await;
    let front = proxy.local_addrs()[0];
    let mut three = Vec::new();
    for i in 0..3 {
        let mut s = connect_from("127.0.0.1", front).await;
        let got = ask(&mut s).await;
        assert!(got.starts_with("HTTP/1.1 200"), "connection {i}: {got:?}");
        three.push(s);
    }
    for i in 0..2 {
        let fourth = connect_from("127.0.0.1", front).await;
        closed_unanswered(fourth, &format!("fourth, try {i}")).await;
    }
    let counters = proxy.stats().frontends()[0].counters.clone();
    assert_eq!((counters.connections, counters.denied_connections), (3, 2));
    // Another address has a count of its own (and the frontend a free slot).
    let mut other = connect_from("127.0.0.2", front).await;
    assert!(ask(&mut other).await.starts_with("HTTP/1.1 200"));
    drop(other);
    // The first three are still served, on their kept connections.
    for s in &mut three {
        assert!(ask(s).await.starts_with("HTTP/1.1 200"));
    }
    drop(three.pop());
    until_open(&proxy, 2).await;
    let mut again = connect_from("127.0.0.1", front).await;
    let got = ask(&mut again).await;
    assert!(got.starts_with("HTTP/1.1 200"), "after a close: {got:?}");
    let fifth = connect_from("127.0.0.1", front).await;
    closed_unanswered(fifth, "at the limit again").await;
    assert_eq!(proxy.stats().frontends()[0].counters.denied_connections, 3);
}

#[tokio::test]
async fn without_a_limit_a_source_takes_every_slot() {
    let pool = one_server_pool(server().await);
    let mut fe = local_frontend();
    fe.max_connections = 8;
    let proxy = start_proxy(fe, pool).await;
    let front = proxy.local_addrs()[0];
    let mut all = Vec::new();
    for i in 0..8 {
        let mut s = connect_from("127.0.0.1", front).await;
        let got = ask(&mut s).await;
        assert!(got.starts_with("HTTP/1.1 200"), "connection {i}: {got:?}");
        all.push(s);
    }
    assert_eq!(proxy.stats().frontends()[0].counters.denied_connections, 0);
}

/// Status codes of `n` GETs from `source` (one client, keep-alive), over
/// HTTP/1.1 or, with `h2`, HTTP/2 (h2c).
async fn statuses(front: SocketAddr, source: &str, n: usize, h2: bool) -> Vec<u16> {
    use http_body_util::{BodyExt, Empty};
    let mut out = Vec::new();
    if h2 {
        let (mut send, _conn) =
            crate::support::h2_handshake(connect_from(source, front).await).await;
        for _ in 0..n {
            let req = http::Request::get(format!("http://{front}/"))
                .body(Empty::<bytes::Bytes>::new())
                .unwrap();
            let resp = send.send_request(req).await.unwrap();
            out.push(resp.status().as_u16());
            resp.into_body().collect().await.unwrap();
        }
        return out;
    }
    let mut s = connect_from(source, front).await;
    for _ in 0..n {
        s.write_all(REQUEST).await.unwrap();
        // Both answers are short and end their head with a Content-Length.
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        let whole = |got: &[u8]| {
            let text = String::from_utf8_lossy(got);
            let Some((head, body)) = text.split_once("\r\n\r\n") else {
                return false;
            };
            let length = head
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("content-length:")
                        .map(|v| v.trim().to_string())
                })
                .and_then(|v| v.parse::<usize>().ok())
                .unwrap_or(0);
            body.len() >= length
        };
        while !whole(&got) {
            match tokio::time::timeout(GIVE_UP, s.read(&mut buf)).await {
                Ok(Ok(n @ 1..)) => got.extend_from_slice(&buf[..n]),
                other => panic!("no whole answer: {other:?} after {got:?}"),
            }
        }
        let status = String::from_utf8_lossy(&got[9..12]).parse().unwrap();
        out.push(status);
    }
    out
}

#[tokio::test]
async fn a_source_past_its_request_rate_is_answered_429_on_either_protocol() {
    let rules = r#"
[[frontend.acl]]
name = "too_fast"
src_request_rate = { above = 3, period = "1m" }
[[frontend.acl]]
name = "exempt"
src = "127.0.0.3"
[[frontend.request]]
action = "deny"
if = "too_fast !exempt"
status = 429
"#;
    let server = server().await;
    let proxy = start_with(server, rules).await;
    let front = proxy.local_addrs()[0];
    // Three within the minute, then 429, on the same connection and on a new one.
    assert_eq!(
        statuses(front, "127.0.0.1", 5, false).await,
        [200, 200, 200, 429, 429]
    );
    assert_eq!(statuses(front, "127.0.0.1", 1, false).await, [429]);
    assert_eq!(
        statuses(front, "127.0.0.1", 1, true).await,
        [429],
        "HTTP/2 too"
    );
    // Other sources have rates of their own; HTTP/2 counts each request.
    assert_eq!(
        statuses(front, "127.0.0.2", 5, true).await,
        [200, 200, 200, 429, 429]
    );
    assert_eq!(
        statuses(front, "127.0.0.3", 5, false).await,
        [200; 5],
        "exempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_rates_are_kept_over_a_reload() {
    let rules = |period: &str| {
        format!(
            r#"
[[frontend.acl]]
name = "too_fast"
src_request_rate = {{ above = 3, period = "{period}" }}
[[frontend.request]]
action = "deny"
if = "too_fast"
status = 429
"#
        )
    };
    let server = server().await;
    let threads = Threads {
        count: 2,
        ..Threads::default()
    };
    let start = |period: &str, previous: Option<&Proxy>| {
        let cfg = crate::support::two_pool_config(server, server, &rules(period), "");
        let router = routing::router(&cfg).unwrap();
        Proxy::start_threads(cfg, Some(router), &threads, previous).unwrap()
    };
    let first = start("1m", None);
    let front = first.local_addrs()[0];
    assert_eq!(statuses(front, "127.0.0.4", 3, false).await, [200; 3]);
    // A reload (new serving threads, the same listening socket): the source
    // has used its three already.
    let second = start("1m", Some(&first));
    drop(first);
    assert_eq!(second.local_addrs()[0], front);
    // (Also once the old threads have stopped taking connections.)
    for _ in 0..5 {
        assert_eq!(statuses(front, "127.0.0.4", 1, false).await, [429]);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A rule over another period counts from nothing. The old threads may
    // still take a connection or two as they stop (and answer 429 from the
    // old table, or close after one answer, as HAProxy's soft stop does):
    // a connection per request, until the new ones answer.
    let third = start("2m", Some(&second));
    drop(second);
    let deadline = Instant::now() + GIVE_UP;
    while statuses(front, "127.0.0.4", 1, false).await != [200] {
        assert!(Instant::now() < deadline, "the new rule never took");
    }
    for expected in [200, 200, 429] {
        assert_eq!(statuses(front, "127.0.0.4", 1, false).await, [expected]);
    }
    drop(third);
}

/// A TLS handshake (any certificate accepted) on `tcp`.
async fn tls_over(tcp: TcpStream) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let versions = [&rustls::version::TLS13, &rustls::version::TLS12];
    let cfg = any_cert_client(provider(), &versions);
    let name = rustls::pki_types::ServerName::try_from("one.test").unwrap();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(cfg));
    tokio::time::timeout(GIVE_UP, connector.connect(name, tcp))
        .await
        .map_err(|_| std::io::ErrorKind::TimedOut)?
}

#[tokio::test]
async fn a_rejected_source_is_closed_before_tls_and_not_logged() {
    capture_access_log();
    let dir = TempDir::new("reject");
    let (cert, _) = crate::general::write_cert(&dir, "one", &["one.test"]);
    let rules = format!(
        r#"
[frontend.tls]
certs = [{{ cert = "{}", key = "{}" }}]
[[frontend.acl]]
name = "blocked"
src = ["127.0.0.2/32", "10.0.0.0/8"]
[[frontend.acl]]
name = "admin"
path_prefix = "/admin"
[[frontend.request]]
action = "deny"
if = "admin"
[[frontend.request]]
action = "reject"
if = "blocked"
"#,
        cert.cert.display(),
        cert.key.display()
    );
    let backend = server().await;
    let proxy = start_with(backend, &rules).await;
    let front = proxy.local_addrs()[0];
    // Closed before the handshake: not even a ServerHello comes back.
    for _ in 0..3 {
        let tcp = connect_from("127.0.0.2", front).await;
        assert!(
            tls_over(tcp).await.is_err(),
            "a handshake with a rejected source"
        );
    }
    // Others are served, whatever rule comes first in the list.
    let mut ok = tls_over(connect_from("127.0.0.1", front).await)
        .await
        .unwrap();
    ok.write_all(b"GET / HTTP/1.1\r\nHost: one.test\r\n\r\n")
        .await
        .unwrap();
    let mut got = [0u8; 12];
    ok.read_exact(&mut got).await.unwrap();
    assert_eq!(&got, b"HTTP/1.1 200");
    let counters = &proxy.stats().frontends()[0].counters;
    assert_eq!((counters.connections, counters.denied_connections), (1, 3));
    // Counted, not logged: a flood does not flood the log. (Other tests
    // log too: this one's lines name its server.)
    let ours: Vec<String> = access_lines()
        .into_iter()
        .filter(|l| l.contains(&format!("app/{backend} ")))
        .collect();
    assert_eq!(ours.len(), 1, "{ours:?}");
    assert!(ours[0].starts_with("127.0.0.1:"), "{ours:?}");
}

#[tokio::test]
async fn reject_looks_at_the_peer_and_at_the_source_a_proxy_header_names() {
    let rules = r#"
accept_proxy = true
[[frontend.acl]]
name = "blocked"
src = ["192.0.2.7", "127.0.0.2"]
[[frontend.request]]
action = "reject"
if = "blocked"
"#;
    let backend = server().await;
    let proxy = start_with(backend, rules).await;
    let front = proxy.local_addrs()[0];
    let from = |client: &str| format!("PROXY TCP4 {client} 127.0.0.1 4000 80\r\n");
    let mut s = TcpStream::connect(front).await.unwrap();
    s.write_all(from("192.0.2.8").as_bytes()).await.unwrap();
    assert!(ask(&mut s).await.ends_with("ok"));
    let mut s = TcpStream::connect(front).await.unwrap();
    s.write_all(from("192.0.2.7").as_bytes()).await.unwrap();
    closed_unanswered(s, "a rejected claimed source").await;
    // A rejected peer cannot claim to be someone else (as HAProxy's
    // `tcp-request connection` rules, which see the real address).
    let mut s = connect_from("127.0.0.2", front).await;
    let _ = s.write_all(from("192.0.2.8").as_bytes()).await;
    closed_unanswered(s, "a rejected peer with a PROXY header").await;
    assert_eq!(proxy.stats().frontends()[0].counters.denied_connections, 2);
}

#[tokio::test]
async fn only_peers_of_accept_proxy_from_may_name_another_client() {
    let rules = r#"
accept_proxy_from = ["127.0.0.2/32", "10.0.0.0/8"]
[[frontend.acl]]
name = "claimed"
src = "192.0.2.8"
[[frontend.request]]
action = "deny"
if = "claimed"
"#;
    let backend = server().await;
    let proxy = start_with(backend, rules).await;
    let front = proxy.local_addrs()[0];
    let header = b"PROXY TCP4 192.0.2.8 127.0.0.1 4000 80\r\n";
    // A trusted peer's header names the client rules see: denied as 192.0.2.8.
    let mut s = connect_from("127.0.0.2", front).await;
    assert_eq!(&status_after(&mut s, header).await, b"HTTP/1.1 403");
    // Anyone else is a direct client: served without a header...
    let mut s = connect_from("127.0.0.1", front).await;
    assert!(ask(&mut s).await.ends_with("ok"));
    // ... and one it sends is no request (400), its claim worth nothing.
    let mut s = connect_from("127.0.0.1", front).await;
    assert_eq!(&status_after(&mut s, header).await, b"HTTP/1.1 400");
    // A bad entry is refused with the frontend and the reason.
    let any: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let bad = two_pool_config(any, any, "accept_proxy_from = [\"10.0.0.1/8\"]", "");
    let e = bad.validate().unwrap_err().to_string();
    assert!(
        e.contains("accept_proxy_from: `10.0.0.1/8`: host bits"),
        "{e}"
    );
}

#[test]
fn reject_takes_source_conditions_only() {
    let text = |acl: &str| {
        format!(
            "[[frontend.acl]]\nname = \"a\"\n{acl}\n[[frontend.request]]\naction = \"reject\"\nif = \"a\""
        )
    };
    let any: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let ok = two_pool_config(any, any, &text("src = \"10.0.0.0/8\""), "");
    actions::compile(&ok).unwrap();
    for key in [
        "path_prefix = \"/x\"",
        "sni = \"a.test\"",
        "src_request_rate = { period = \"10s\", above = 5 }",
    ] {
        let bad = two_pool_config(any, any, &text(key), "");
        let e = actions::compile(&bad).unwrap_err().to_string();
        assert!(e.contains("`src` ACLs only"), "{key}: {e}");
    }
    // Nothing more than the condition.
    let extra = two_pool_config(
        any,
        any,
        "[[frontend.request]]\naction = \"reject\"\nstatus = 403",
        "",
    );
    assert!(actions::compile(&extra).is_err());
}
