//! Tests of server-side TLS, HTTP/2 to servers and the JSON access log, with real backends.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};
use tokio::net::TcpListener;

use crate::backends::{serve_http1, server};
use crate::support::{
    GIVE_UP, PausedBody, TempDir, access_lines, capture_access_log, h1_client, h2_handshake, idle,
    json_access_records, local_frontend, one_server_pool, provider, reset_streams, start_proxy,
};
use lb_proxy::*;

/// A test CA; `ca.pem` in `dir` holds its certificate.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem: PathBuf,
}

fn ca(dir: &TempDir, stem: &str) -> Ca {
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let key = KeyPair::generate().unwrap();
    let cert = params.self_signed(&key).unwrap();
    let pem = dir.0.join(format!("{stem}.pem"));
    std::fs::write(&pem, cert.pem()).unwrap();
    Ca { cert, key, pem }
}

/// A rustls server config with a leaf for `names` (DNS names or IPs) signed by `ca`.
fn server_tls(ca: &Ca, names: &[&str], alpn: &[&[u8]]) -> Arc<rustls::ServerConfig> {
    server_tls_with(ca, names, alpn, rustls::DEFAULT_VERSIONS, None)
}

/// [`server_tls`] speaking only `versions`, and with `clients`, requiring
/// a client certificate that CA signed.
fn server_tls_with(
    ca: &Ca,
    names: &[&str],
    alpn: &[&[u8]],
    versions: &[&'static rustls::SupportedProtocolVersion],
    clients: Option<&Ca>,
) -> Arc<rustls::ServerConfig> {
    let params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).unwrap();
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .unwrap();
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(clients) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(clients.cert.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider(),
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut cfg = builder
        .with_single_cert(vec![cert.der().clone()], der)
        .unwrap();
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(cfg)
}

/// A backend speaking HTTP/1.1 and HTTP/2 (h2c or ALPN), plain or over TLS; it answers
/// with `x-version` (the request's version) and `x-host` (its Host header or authority).
async fn backend(tls: Option<Arc<rustls::ServerConfig>>) -> SocketAddr {
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    server(move |stream| {
        let acceptor = acceptor.clone();
        async move {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let host = req
                    .headers()
                    .get("host")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_string)
                    .or_else(|| req.uri().authority().map(|a| a.to_string()))
                    .unwrap_or_default();
                Ok::<_, std::convert::Infallible>(
                    hyper::Response::builder()
                        .header("x-version", format!("{:?}", req.version()))
                        .header("x-host", host)
                        .body(Full::new(Bytes::from_static(b"ok")))
                        .unwrap(),
                )
            });
            let builder = auto::Builder::new(TokioExecutor::new());
            match acceptor {
                Some(a) => {
                    let Ok(s) = a.accept(stream).await else {
                        return;
                    };
                    let _ = builder.serve_connection(TokioIo::new(s), svc).await;
                }
                None => {
                    let _ = builder.serve_connection(TokioIo::new(stream), svc).await;
                }
            }
        }
    })
    .await
}

async fn start(pool: Pool, log_format: LogFormat) -> Proxy {
    let mut fe = local_frontend();
    fe.log_format = log_format;
    start_proxy(fe, pool).await
}

fn pool(server: SocketAddr) -> Pool {
    let mut p = one_server_pool(server);
    p.retries = 0;
    p
}

/// Status, `x-version` and `x-host` of a GET through the proxy.
async fn get(proxy: &Proxy, path: &str) -> (StatusCode, String, String) {
    let url = format!("http://{}{path}", proxy.local_addrs()[0]);
    let resp = h1_client().get(url.parse().unwrap()).await.unwrap();
    let h = |n: &str| {
        resp.headers()
            .get(n)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    };
    let out = (resp.status(), h("x-version"), h("x-host"));
    let _ = resp.into_body().collect().await;
    out
}

#[tokio::test]
async fn tls_to_server_verified_by_ca_and_name() {
    let dir = TempDir::new("upstream");
    let good = ca(&dir, "good");
    let other = ca(&dir, "other");
    let server = backend(Some(server_tls(
        &good,
        &["app.test", "127.0.0.1"],
        &[b"http/1.1"],
    )))
    .await;

    // Right CA, right SNI.
    let mut p = pool(server);
    p.tls = true;
    p.ca = Some(good.pem.clone());
    p.sni = Some("app.test".into());
    let proxy = start(p.clone(), LogFormat::Httplog).await;
    let (status, version, host) = get(&proxy, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, "HTTP/1.1");
    assert_eq!(host, proxy.local_addrs()[0].to_string());

    // Default name: the server's IP, verified as an IP SAN.
    let mut ip = p.clone();
    ip.sni = None;
    let proxy = start(ip, LogFormat::Httplog).await;
    assert_eq!(get(&proxy, "/").await.0, StatusCode::OK);

    // Wrong name.
    let mut wrong_name = p.clone();
    wrong_name.sni = Some("other.test".into());
    let proxy = start(wrong_name, LogFormat::Httplog).await;
    // A failed TLS handshake is a failed connection: 503 (SC), as in HAProxy.
    assert_eq!(get(&proxy, "/").await.0, StatusCode::SERVICE_UNAVAILABLE);

    // Wrong CA.
    let mut wrong_ca = p.clone();
    wrong_ca.ca = Some(other.pem.clone());
    let proxy = start(wrong_ca.clone(), LogFormat::Httplog).await;
    // A failed TLS handshake is a failed connection: 503 (SC), as in HAProxy.
    assert_eq!(get(&proxy, "/").await.0, StatusCode::SERVICE_UNAVAILABLE);

    // verify = false accepts any certificate and name.
    let mut any = wrong_ca;
    any.verify = false;
    any.ca = None;
    any.sni = Some("whatever.test".into());
    let proxy = start(any, LogFormat::Httplog).await;
    assert_eq!(get(&proxy, "/").await.0, StatusCode::OK);
}

/// A leaf for `names` signed by `ca`, written as `STEM.pem` and `STEM.key` in `dir`.
fn leaf_files(dir: &TempDir, ca: &Ca, stem: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let params =
        CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>()).unwrap();
    let key = KeyPair::generate().unwrap();
    let cert = params.signed_by(&key, &ca.cert, &ca.key).unwrap();
    let (c, k) = (
        dir.0.join(format!("{stem}.pem")),
        dir.0.join(format!("{stem}.key")),
    );
    std::fs::write(&c, cert.pem()).unwrap();
    std::fs::write(&k, key.serialize_pem()).unwrap();
    (c, k)
}

#[tokio::test]
async fn a_pool_shows_its_client_certificate_to_servers_that_require_one() {
    let dir = TempDir::new("upstream-mtls");
    let servers = ca(&dir, "servers");
    let clients = ca(&dir, "clients");
    let strangers = ca(&dir, "strangers");
    // A server that requires a certificate signed by `clients`.
    let cfg = server_tls_with(
        &servers,
        &["127.0.0.1"],
        &[b"http/1.1"],
        rustls::DEFAULT_VERSIONS,
        Some(&clients),
    );
    let server = backend(Some(cfg)).await;

    let mut p = pool(server);
    p.tls = true;
    p.ca = Some(servers.pem.clone());
    // Without a certificate: refused. Under TLS 1.3 the server's alert
    // comes after the client's handshake has finished, with the first
    // read: 502 (a broken answer) rather than 503 (a failed connect).
    let refused = |status: StatusCode| {
        assert!(
            [StatusCode::BAD_GATEWAY, StatusCode::SERVICE_UNAVAILABLE].contains(&status),
            "{status}"
        );
    };
    let proxy = start(p.clone(), LogFormat::Httplog).await;
    refused(get(&proxy, "/").await.0);
    // One the server's CA signed: served.
    let (c, k) = leaf_files(&dir, &clients, "lb", &["lb.test"]);
    p.cert = Some(c);
    p.key = Some(k);
    let proxy = start(p.clone(), LogFormat::Httplog).await;
    assert_eq!(get(&proxy, "/").await.0, StatusCode::OK);
    // One it does not trust: refused.
    let (c, k) = leaf_files(&dir, &strangers, "stranger", &["lb.test"]);
    p.cert = Some(c);
    p.key = Some(k.clone());
    let proxy = start(p.clone(), LogFormat::Httplog).await;
    refused(get(&proxy, "/").await.0);

    // A key that is not the certificate's fails at start, naming the pool.
    let (c, _) = leaf_files(&dir, &clients, "other", &["lb.test"]);
    p.cert = Some(c);
    let cfg = ProxyConfig {
        frontends: vec![local_frontend()],
        pools: vec![p.clone()],
        ..Default::default()
    };
    let problem = pool_host_problems(&p).expect("a mismatched key");
    assert_eq!(problem.key, "key", "{}", problem.reason);
    let err = Proxy::start(cfg, None).await.err().unwrap();
    assert!(format!("{err:#}").contains("pool app"), "{err:#}");
}

#[tokio::test]
async fn min_version_1_3_refuses_servers_that_only_speak_tls_1_2() {
    let dir = TempDir::new("upstream-version");
    let good = ca(&dir, "ca");
    let tls12 = &[&rustls::version::TLS12];
    let cfg = server_tls_with(&good, &["127.0.0.1"], &[b"http/1.1"], tls12, None);
    let server = backend(Some(cfg)).await;
    let mut p = pool(server);
    p.tls = true;
    p.ca = Some(good.pem.clone());
    let proxy = start(p.clone(), LogFormat::Httplog).await;
    assert_eq!(get(&proxy, "/").await.0, StatusCode::OK, "1.2 by default");
    p.min_version = TlsVersion::Tls13;
    let proxy = start(p, LogFormat::Httplog).await;
    assert_eq!(get(&proxy, "/").await.0, StatusCode::SERVICE_UNAVAILABLE);
}

#[tokio::test]
async fn tls_pool_validation() {
    let check = |p: Pool| {
        ProxyConfig {
            frontends: vec![local_frontend()],
            pools: vec![p],
            ..Default::default()
        }
        .validate()
    };
    let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let mut p = pool(addr);
    p.tls = true;
    let err = check(p.clone()).unwrap_err().to_string();
    assert!(err.contains("needs ca"), "{err}");
    p.verify = false;
    assert!(check(p.clone()).is_ok());
    p.sni = Some("bad name!".into());
    assert!(check(p.clone()).is_err());
    let mut plain = pool(addr);
    plain.sni = Some("a.test".into());
    assert!(check(plain).is_err());
    let mut plain = pool(addr);
    plain.min_version = TlsVersion::Tls13;
    let err = check(plain).unwrap_err().to_string();
    assert!(err.contains("need tls = true"), "{err}");
    let mut half = p.clone();
    half.sni = None;
    half.cert = Some("/etc/lb/client.pem".into());
    let err = check(half.clone()).unwrap_err().to_string();
    assert!(err.contains("cert needs key"), "{err}");
    half.key = Some("/etc/lb/client.key".into());
    assert!(check(half.clone()).is_ok());
    half.cert = None;
    let err = check(half).unwrap_err().to_string();
    assert!(err.contains("key needs cert"), "{err}");

    let toml_cfg: ProxyConfig = toml::from_str(
        r#"
        [[frontend]]
        name = "web"
        binds = ["127.0.0.1:0"]
        default_pool = "app"
        log_format = "json"
        [[pool]]
        name = "app"
        tls = true
        ca = "/etc/lb/ca.pem"
        sni = "app.internal"
        h2 = true
        servers = [{ address = "127.0.0.1:8443" }]
        "#,
    )
    .unwrap();
    assert!(toml_cfg.validate().is_ok());
    assert_eq!(toml_cfg.frontends[0].log_format, LogFormat::Json);
    let pool = &toml_cfg.pools[0];
    assert!(pool.tls && pool.verify && pool.h2);
    // A missing CA file fails at start, naming the pool.
    let err = Proxy::start(toml_cfg, None).await.err().unwrap();
    assert!(format!("{err:#}").contains("pool app"), "{err:#}");
}

#[tokio::test]
async fn h2_to_plain_h2c_server() {
    let server = backend(None).await;
    let mut p = pool(server);
    p.h2 = true;
    let proxy = start(p, LogFormat::Httplog).await;
    for _ in 0..3 {
        let (status, version, host) = get(&proxy, "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(version, "HTTP/2.0");
        assert_eq!(host, proxy.local_addrs()[0].to_string());
    }
}

#[tokio::test]
async fn h2_to_tls_server_by_alpn() {
    let dir = TempDir::new("upstream");
    let good = ca(&dir, "ca");
    let h2_server = backend(Some(server_tls(
        &good,
        &["127.0.0.1"],
        &[b"h2", b"http/1.1"],
    )))
    .await;
    let mut p = pool(h2_server);
    p.tls = true;
    p.ca = Some(good.pem.clone());
    p.h2 = true;
    let proxy = start(p.clone(), LogFormat::Httplog).await;
    let (status, version, _) = get(&proxy, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, "HTTP/2.0");

    // A TLS server without h2 in its ALPN: HTTP/1.1 is negotiated instead.
    let h1_server = backend(Some(server_tls(&good, &["127.0.0.1"], &[b"http/1.1"]))).await;
    p.servers = vec![ServerSpec::new(h1_server)];
    let proxy = start(p, LogFormat::Httplog).await;
    let (status, version, _) = get(&proxy, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, "HTTP/1.1");
}

#[tokio::test]
async fn json_access_log() {
    capture_access_log();
    let server = backend(None).await;
    let proxy = start(pool(server), LogFormat::Json).await;
    assert_eq!(get(&proxy, "/json-log?x=1").await.0, StatusCode::OK);
    let found = json_access_records("/json-log?x=1")
        .await
        .into_iter()
        .next();
    let j = found.expect("no JSON access log line");
    assert_eq!(j["client_ip"], "127.0.0.1");
    assert_eq!(j["frontend"], "web");
    assert_eq!(j["pool"], "app");
    assert_eq!(j["server"], server.to_string());
    assert_eq!(j["status"], 200);
    assert_eq!(j["method"], "GET");
    assert_eq!(j["version"], "HTTP/1.1");
    assert_eq!(j["termination_state"], "----");
    for k in [
        "tq",
        "tw",
        "tc",
        "tr",
        "tt",
        "bytes",
        "timestamp_ms",
        "date",
    ] {
        assert!(!j[k].is_null(), "{k} missing");
    }
    // httplog frontends keep the text line.
    let proxy = start(pool(server), LogFormat::Httplog).await;
    assert_eq!(get(&proxy, "/text-log").await.0, StatusCode::OK);
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let lines = access_lines();
    assert!(
        lines
            .iter()
            .any(|l| l.contains("\"GET /text-log HTTP/1.1\"") && !l.starts_with('{'))
    );
}

#[tokio::test]
async fn send_proxy_header_then_tls() {
    let dir = TempDir::new("upstream");
    let good = ca(&dir, "ca");
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(&good, &["127.0.0.1"], &[b"h2"]));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut stream, _) = listener.accept().await.unwrap();
        // The PROXY header comes in the clear, before the TLS handshake.
        let header = proxy_protocol::read_header(&mut stream).await.unwrap();
        let _ = tx.send(header);
        let tls = acceptor.accept(stream).await.unwrap();
        let svc = service_fn(|req: Request<Incoming>| async move {
            Ok::<_, std::convert::Infallible>(
                hyper::Response::builder()
                    .header("x-version", format!("{:?}", req.version()))
                    .body(Full::new(Bytes::from_static(b"ok")))
                    .unwrap(),
            )
        });
        let _ = auto::Builder::new(TokioExecutor::new())
            .serve_connection(TokioIo::new(tls), svc)
            .await;
    });
    let mut p = pool(addr);
    p.tls = true;
    p.ca = Some(good.pem.clone());
    p.h2 = true;
    p.send_proxy = Some(proxy_protocol::Version::V2);
    let proxy = start(p, LogFormat::Httplog).await;
    let (status, version, _) = get(&proxy, "/").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(version, "HTTP/2.0");
    let (src, dst) = rx.await.unwrap().unwrap();
    assert_eq!(src.ip().to_string(), "127.0.0.1");
    assert_eq!(dst, proxy.local_addrs()[0]);
}

#[tokio::test]
async fn http2_streams_reset_before_sending_are_not_sent_and_keep_their_connection() {
    use std::sync::atomic::{AtomicUsize, Ordering};
    // A TLS server that takes 300 ms to start its handshake: requests reset
    // within that time are reset while their connection is being opened.
    let dir = TempDir::new("reset");
    let ca = ca(&dir, "ca");
    let acceptor = tokio_rustls::TlsAcceptor::from(server_tls(&ca, &["127.0.0.1"], &[b"http/1.1"]));
    let requests = Arc::new(AtomicUsize::new(0));
    let seen = requests.clone();
    let server = server(move |stream| {
        let (acceptor, seen) = (acceptor.clone(), seen.clone());
        async move {
            tokio::time::sleep(Duration::from_millis(300)).await;
            let Ok(s) = acceptor.accept(stream).await else {
                return;
            };
            serve_http1(s, move |_req: Request<Incoming>| {
                seen.fetch_add(1, Ordering::SeqCst);
                async {
                    Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                        Bytes::from_static(b"ok"),
                    )))
                }
            })
            .await;
        }
    })
    .await;
    let mut p = pool(server);
    p.tls = true;
    p.verify = false;
    let proxy = start(p, LogFormat::Httplog).await;
    let front = proxy.local_addrs()[0];
    let tcp = tokio::net::TcpStream::connect(front).await.unwrap();
    let (send, _conn) = h2_handshake(tcp).await;
    reset_streams(&send, front, 5, Duration::from_millis(30)).await;
    // The connections finish opening: none carries a reset request, all are kept.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(
        requests.load(Ordering::SeqCst),
        0,
        "a reset request was sent"
    );
    assert_eq!(idle(&proxy, server), 5);
    // The next request uses one of them.
    let mut send = send.clone();
    let req = Request::get(format!("http://{front}/"))
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = send.send_request(req).await.unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(requests.load(Ordering::SeqCst), 1);
}

/// Connections an h2c server accepted and saw end.
#[derive(Default)]
struct Seen {
    accepted: std::sync::atomic::AtomicUsize,
    closed: std::sync::atomic::AtomicUsize,
}

impl Seen {
    fn get(&self) -> (usize, usize) {
        use std::sync::atomic::Ordering::SeqCst;
        (self.accepted.load(SeqCst), self.closed.load(SeqCst))
    }

    /// Accepted and closed once `closed` connections have ended, or after 2 s.
    async fn once_closed(&self, closed: usize) -> (usize, usize) {
        for _ in 0..100 {
            if self.get().1 >= closed {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.get()
    }
}

/// An h2c server answering `ok`, or on `/slow` `a` then 800 ms later `b`.
async fn h2c_server() -> (SocketAddr, Arc<Seen>) {
    use http_body_util::Either;
    use std::sync::atomic::Ordering::SeqCst;
    let seen = Arc::new(Seen::default());
    let counts = seen.clone();
    let addr = server(move |stream| {
        counts.accepted.fetch_add(1, SeqCst);
        let counts = counts.clone();
        async move {
            let svc = service_fn(|req: Request<Incoming>| async move {
                let body = match req.uri().path() {
                    "/slow" => {
                        Either::Right(PausedBody::new(b"a", Duration::from_millis(800), b"b"))
                    }
                    _ => Either::Left(Full::new(Bytes::from_static(b"ok"))),
                };
                Ok::<_, std::convert::Infallible>(hyper::Response::new(body))
            });
            let _ = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
            counts.closed.fetch_add(1, SeqCst);
        }
    })
    .await;
    (addr, seen)
}

/// An `h2` pool to `server` keeping idle connections 300 ms.
fn h2_pool(server: SocketAddr) -> Pool {
    let mut p = pool(server);
    p.h2 = true;
    p.timeout_server_idle = Duration::from_millis(300);
    p
}

/// Status and body of a GET through the proxy.
async fn get_body(proxy: &Proxy, path: &str) -> (StatusCode, Bytes) {
    get_from(proxy.local_addrs()[0], path).await
}

/// Status and body of a GET through the proxy listening on `front`.
async fn get_from(front: SocketAddr, path: &str) -> (StatusCode, Bytes) {
    let url = format!("http://{front}{path}");
    let resp = h1_client().get(url.parse().unwrap()).await.unwrap();
    let status = resp.status();
    (status, resp.into_body().collect().await.unwrap().to_bytes())
}

#[tokio::test]
async fn an_idle_shared_h2_connection_closes_after_timeout_server_idle() {
    let (server, seen) = h2c_server().await;
    let proxy = start(h2_pool(server), LogFormat::Httplog).await;
    assert_eq!(get_body(&proxy, "/").await.0, StatusCode::OK);
    assert_eq!(seen.get(), (1, 0));
    // Counted idle once its stream has ended (just after the client's
    // answer, at most), and no more once closed.
    let until = tokio::time::Instant::now() + GIVE_UP;
    while idle(&proxy, server) != 1 && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(idle(&proxy, server), 1, "the shared connection is idle");
    let closed = seen.once_closed(1).await;
    assert_eq!(closed, (1, 1), "the idle connection was not closed");
    assert_eq!(idle(&proxy, server), 0, "closed: not idle");
    // The next request opens a new one.
    assert_eq!(get_body(&proxy, "/").await, (StatusCode::OK, "ok".into()));
    assert_eq!(seen.get(), (2, 1));
}

#[tokio::test]
async fn a_shared_h2_connection_with_a_stream_in_flight_outlives_timeout_server_idle() {
    let (server, seen) = h2c_server().await;
    let proxy = Arc::new(start(h2_pool(server), LogFormat::Httplog).await);
    let front = proxy.clone();
    let slow = tokio::spawn(async move { get_body(&front, "/slow").await });
    // Past the idle limit with the slow response under way: still shared.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(get_body(&proxy, "/").await, (StatusCode::OK, "ok".into()));
    assert_eq!(seen.get(), (1, 0));
    assert_eq!(slow.await.unwrap(), (StatusCode::OK, "ab".into()));
    assert_eq!(seen.get(), (1, 0));
    // Idle once the slow response has ended: closed.
    let closed = seen.once_closed(1).await;
    assert_eq!(closed, (1, 1), "the idle connection was not closed");
}

/// A server leaves a pool by a reload (`lb remove` is one): the new proxy
/// has no connection to it, and the old one's shared HTTP/2 connection
/// closes when its last stream ends, with the old pool (hyper closes it
/// once its senders are dropped), as the old pool's idle HTTP/1.1 ones do.
#[tokio::test]
async fn a_removed_servers_shared_h2_connection_closes_once_its_streams_end() {
    a_removed_server_loses_its_h2_connection(false).await;
}

/// The same when the server leaves in place (`Proxy::update_servers`): the
/// proxy goes on, and drops its kept connections to the server.
#[tokio::test]
async fn a_server_removed_in_place_loses_its_kept_connections() {
    a_removed_server_loses_its_h2_connection(true).await;
}

/// A request to a pool's only server is under way when the server leaves
/// the pool, by a new proxy or `in_place`: the stream goes on to its end,
/// then the connection closes.
async fn a_removed_server_loses_its_h2_connection(in_place: bool) {
    let (server, seen) = h2c_server().await;
    let (other, _) = h2c_server().await;
    // Kept far longer than the test: only the removal can close it.
    let mut p = h2_pool(server);
    p.timeout_server_idle = Duration::from_secs(30);
    let cfg = |p: &Pool| ProxyConfig {
        frontends: vec![local_frontend()],
        pools: vec![p.clone()],
        ..Default::default()
    };
    let mut proxy = Proxy::start(cfg(&p), None).await.unwrap();
    let front = proxy.local_addrs()[0];
    let slow = tokio::spawn(async move { get_from(front, "/slow").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    p.servers = vec![ServerSpec::new(other)];
    if in_place {
        assert!(proxy.update_servers(&cfg(&p)));
    } else {
        let next = Proxy::start(cfg(&p), None).await.unwrap();
        drop(std::mem::replace(&mut proxy, next));
    }
    assert_eq!(get_body(&proxy, "/").await.0, StatusCode::OK);
    assert_eq!(seen.get(), (1, 0));
    assert_eq!(slow.await.unwrap(), (StatusCode::OK, "ab".into()));
    let closed = seen.once_closed(1).await;
    assert_eq!(
        closed,
        (1, 1),
        "the removed server's connection was not closed"
    );
}

/// `timeout_server_idle = "0s"` keeps no HTTP/2 connection either: each
/// request opens its own, closed once its response has ended.
#[tokio::test]
async fn with_no_idle_time_each_h2_request_has_a_connection_of_its_own() {
    let (server, seen) = h2c_server().await;
    let mut p = h2_pool(server);
    p.timeout_server_idle = Duration::ZERO;
    let proxy = start(p, LogFormat::Httplog).await;
    for _ in 0..2 {
        assert_eq!(get_body(&proxy, "/").await, (StatusCode::OK, "ok".into()));
    }
    assert_eq!(seen.once_closed(2).await, (2, 2));
}
