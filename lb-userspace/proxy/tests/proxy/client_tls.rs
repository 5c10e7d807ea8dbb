//! Client certificates (mutual TLS) on a TLS frontend: required or optional,
//! verified against `client_ca` and `client_crl`, seen by the `client_cert`
//! ACL and forwarded in `client_cert_header`, never taken from the client.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use base64::Engine;
use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Empty};
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, IsCa, KeyIdMethod,
    KeyPair, RevokedCertParams, SerialNumber,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backends::json_backend;
use crate::general::write_cert;
use crate::support::{TempDir, h2_handshake, local_frontend, provider, start_proxy};
use lb_proxy::*;

/// A client certificate: its DER and key.
struct ClientCert {
    der: Vec<u8>,
    key: Vec<u8>,
}

/// A CA that signs client certificates and revokes them.
struct Ca {
    cert: rcgen::Certificate,
    key: KeyPair,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        Ca { cert, key }
    }

    /// A client certificate with serial number `serial`.
    fn client(&self, serial: u64) -> ClientCert {
        let mut params = CertificateParams::new(vec!["client.test".to_string()]).unwrap();
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        ClientCert {
            der: cert.der().to_vec(),
            key: key.serialize_der(),
        }
    }

    /// A PEM CRL revoking `serial`.
    fn crl(&self, serial: u64) -> String {
        let now = rcgen::date_time_ymd(2026, 1, 1);
        CertificateRevocationListParams {
            this_update: now,
            next_update: rcgen::date_time_ymd(2036, 1, 1),
            crl_number: SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: vec![RevokedCertParams {
                serial_number: SerialNumber::from(serial),
                revocation_time: now,
                reason_code: None,
                invalidity_date: None,
            }],
            key_identifier_method: KeyIdMethod::Sha256,
        }
        .signed_by(&self.cert, &self.key)
        .unwrap()
        .pem()
        .unwrap()
    }
}

/// A TLS frontend asking for client certificates of `ca` (revoking serial
/// 666), forwarding them in X-Client-Cert, with `verify`; answers 403 to
/// `/private` without a certificate.
async fn mtls_proxy(
    tag: &str,
    ca: &Ca,
    verify: VerifyClient,
) -> (Proxy, crate::backends::JsonBackend, TempDir) {
    let backend = json_backend("a").await;
    let dir = TempDir::new(tag);
    let (cert, _) = write_cert(&dir, "server", &["one.test"]);
    let ca_file: PathBuf = dir.0.join("clients-ca.pem");
    std::fs::write(&ca_file, ca.cert.pem()).unwrap();
    let crl_file: PathBuf = dir.0.join("clients.crl");
    std::fs::write(&crl_file, ca.crl(666)).unwrap();
    let mut fe = local_frontend();
    fe.tls = Some(TlsConfig {
        certs: vec![cert],
        client_ca: Some(ca_file),
        verify_client: verify,
        client_crl: vec![crl_file],
        client_cert_header: Some("X-Client-Cert".to_string()),
        ..TlsConfig::default()
    });
    let rules = r#"
        [[acl]]
        name = "private"
        path_prefix = "/private"
        [[acl]]
        name = "has_cert"
        client_cert = true
        [[request]]
        action = "deny"
        if = "private !has_cert"
    "#;
    #[derive(serde::Deserialize)]
    struct Rules {
        acl: Vec<acl::AclSpec>,
        request: Vec<HttpAction>,
    }
    let rules: Rules = toml::from_str(rules).unwrap();
    fe.acl = rules.acl;
    fe.request = rules.request;
    let pool = crate::support::one_server_pool(backend.addr);
    let proxy = start_proxy(fe, pool).await;
    (proxy, backend, dir)
}

/// A TLS client configuration presenting `cert`, if any, offering `alpn`.
fn client_config(cert: Option<&ClientCert>, alpn: &[u8]) -> Arc<rustls::ClientConfig> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(NoVerify(provider)));
    let mut cfg = match cert {
        Some(c) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from(c.der.clone())],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(c.key.clone())),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    cfg.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(cfg)
}

/// A TLS connection with a fresh client presenting `cert`, offering `alpn`.
async fn connect(
    addr: SocketAddr,
    cert: Option<&ClientCert>,
    alpn: &[u8],
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    connect_with(addr, client_config(cert, alpn)).await
}

/// A TLS connection with client `cfg` (which resumes its earlier sessions).
async fn connect_with(
    addr: SocketAddr,
    cfg: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    tokio_rustls::TlsConnector::from(cfg)
        .connect(ServerName::try_from("one.test").unwrap(), tcp)
        .await
}

/// One HTTP/1.1 request for `path` on `s`; see `get_h1`.
async fn request_h1(
    mut s: tokio_rustls::client::TlsStream<TcpStream>,
    path: &str,
) -> Option<(u16, serde_json::Value)> {
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: one.test\r\nX-Client-Cert: forged\r\nConnection: close\r\n\r\n"
    );
    // TLS 1.3: a refused certificate shows on the first read, as an alert.
    s.write_all(req.as_bytes()).await.ok()?;
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.ok()?;
    let text = String::from_utf8_lossy(&out);
    let status = text.get(9..12)?.parse().ok()?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Some((status, serde_json::from_str(body).unwrap_or_default()))
}

/// One HTTP/1.1 request for `path` (claiming a client certificate of its
/// own in X-Client-Cert); the answer's status and body, or None when the
/// handshake or the connection failed.
async fn get_h1(
    addr: SocketAddr,
    cert: Option<&ClientCert>,
    path: &str,
) -> Option<(u16, serde_json::Value)> {
    request_h1(connect(addr, cert, b"http/1.1").await.ok()?, path).await
}

/// The same over HTTP/2 (hyper's path).
async fn get_h2(
    addr: SocketAddr,
    cert: Option<&ClientCert>,
    path: &str,
) -> Option<(u16, serde_json::Value)> {
    let s = connect(addr, cert, b"h2").await.ok()?;
    let (mut sender, _conn) = h2_handshake(s).await;
    let req = Request::get(format!("https://one.test{path}"))
        .header("x-client-cert", "forged")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = sender.send_request(req).await.ok()?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some((status, serde_json::from_slice(&body).unwrap_or_default()))
}

/// Over HTTP/2 (`h2`) or HTTP/1.1.
async fn get(
    addr: SocketAddr,
    cert: Option<&ClientCert>,
    path: &str,
    h2: bool,
) -> Option<(u16, serde_json::Value)> {
    if h2 {
        get_h2(addr, cert, path).await
    } else {
        get_h1(addr, cert, path).await
    }
}

fn b64(der: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(der)
}

#[tokio::test]
async fn required_client_certificates_are_verified_and_forwarded_on_both_paths() {
    let ca = Ca::new("clients");
    let (proxy, backend, _dir) = mtls_proxy("mtls-req", &ca, VerifyClient::Required).await;
    let addr = proxy.local_addrs()[0];
    let good = ca.client(7);
    let revoked = ca.client(666);
    let foreign = Ca::new("someone else").client(7);

    for h2 in [false, true] {
        let (status, j) = get(addr, Some(&good), "/private/x", h2)
            .await
            .expect("served");
        assert_eq!(status, 200);
        // The verified certificate, not the client's forged header.
        assert_eq!(j["headers"]["x-client-cert"], b64(&good.der));
    }
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
    // No certificate, a revoked one, one of another CA: no request gets through.
    for (what, cert) in [
        ("none", None),
        ("revoked", Some(&revoked)),
        ("foreign", Some(&foreign)),
    ] {
        assert_eq!(get_h1(addr, cert, "/").await, None, "{what} over HTTP/1.1");
        assert_eq!(get_h2(addr, cert, "/").await, None, "{what} over HTTP/2");
    }
    assert_eq!(
        backend.requests.load(std::sync::atomic::Ordering::SeqCst),
        2
    );
}

#[tokio::test]
async fn a_reload_reads_the_client_crl_again_all_or_nothing() {
    let ca = Ca::new("clients");
    let (proxy, _backend, dir) = mtls_proxy("mtls-crl", &ca, VerifyClient::Required).await;
    let addr = proxy.local_addrs()[0];
    let good = ca.client(7);
    let crl = dir.0.join("clients.crl");
    // A client that resumes its session (as curl and browsers do).
    let resuming = client_config(Some(&good), b"http/1.1");
    for _ in 0..2 {
        let s = connect_with(addr, resuming.clone()).await.unwrap();
        assert!(request_h1(s, "/").await.is_some());
    }
    let s = connect_with(addr, resuming.clone()).await.unwrap();
    let kind = s.get_ref().1.handshake_kind();
    assert_eq!(kind, Some(rustls::HandshakeKind::Resumed));
    // A resumed session still carries the certificate it was verified with.
    let (status, j) = request_h1(s, "/private/x").await.expect("served");
    assert_eq!(status, 200);
    assert_eq!(j["headers"]["x-client-cert"], b64(&good.der));
    // A broken CRL fails the reload; the loaded one stays in force.
    std::fs::write(&crl, "not a CRL").unwrap();
    let e = proxy.reload_files().unwrap_err();
    assert!(format!("{e:#}").contains("clients.crl"), "{e:#}");
    assert!(get(addr, Some(&good), "/", true).await.is_some());
    // A CRL that revokes the certificate: refused from the next handshake on.
    std::fs::write(&crl, ca.crl(7)).unwrap();
    proxy.reload_files().unwrap();
    assert_eq!(get(addr, Some(&good), "/", false).await, None);
    assert_eq!(get(addr, Some(&good), "/", true).await, None);
    // Resuming a session of before the reload does not get around it.
    let resumed = match connect_with(addr, resuming).await {
        Ok(s) => request_h1(s, "/").await,
        Err(_) => None,
    };
    assert_eq!(resumed, None);
    assert!(get(addr, Some(&ca.client(666)), "/", false).await.is_some());
}

#[tokio::test]
async fn optional_client_certificates_leave_the_acl_to_decide() {
    let ca = Ca::new("clients");
    let (proxy, _backend, _dir) = mtls_proxy("mtls-opt", &ca, VerifyClient::Optional).await;
    let addr = proxy.local_addrs()[0];
    let good = ca.client(7);
    for h2 in [false, true] {
        // Without a certificate: served, the forged header removed...
        let (status, j) = get(addr, None, "/open", h2).await.expect("served");
        assert_eq!(status, 200);
        assert!(j["headers"].get("x-client-cert").is_none(), "{j}");
        // ... and denied where the ACL asks for one.
        assert_eq!(
            get(addr, None, "/private/x", h2).await.expect("answered").0,
            403
        );
        let (status, j) = get(addr, Some(&good), "/private/x", h2)
            .await
            .expect("served");
        assert_eq!(status, 200);
        assert_eq!(j["headers"]["x-client-cert"], b64(&good.der));
        // A certificate that does not verify is refused even here.
        assert_eq!(get(addr, Some(&ca.client(666)), "/open", h2).await, None);
    }
}

#[test]
fn client_certificate_settings_need_client_ca_and_a_safe_header() {
    let bad = |tls: TlsConfig| {
        let mut cfg = ProxyConfig::default();
        let mut fe = local_frontend();
        fe.default_pool = "p".into();
        fe.tls = Some(TlsConfig {
            certs: vec![CertPair {
                cert: "c.pem".into(),
                key: "k.pem".into(),
                names: Vec::new(),
            }],
            ..tls
        });
        cfg.frontends.push(fe);
        cfg.pools.push(crate::support::one_server_pool(
            "127.0.0.1:1".parse().unwrap(),
        ));
        cfg.pools[0].name = "p".into();
        cfg.validate().err().map(|e| e.to_string())
    };
    let with_ca = || TlsConfig {
        client_ca: Some("ca.pem".into()),
        ..TlsConfig::default()
    };
    assert_eq!(bad(with_ca()), None);
    for tls in [
        TlsConfig {
            verify_client: VerifyClient::Optional,
            ..TlsConfig::default()
        },
        TlsConfig {
            client_crl: vec!["x.crl".into()],
            ..TlsConfig::default()
        },
        TlsConfig {
            client_cert_header: Some("X-Cert".into()),
            ..TlsConfig::default()
        },
    ] {
        let e = bad(tls).expect("refused");
        assert!(e.contains("need client_ca"), "{e}");
    }
    for header in ["Bad Header", "Content-Length", "x-forwarded-for", "Host"] {
        let e = bad(TlsConfig {
            client_cert_header: Some(header.into()),
            ..with_ca()
        })
        .expect(header);
        assert!(e.contains("client_cert_header"), "{header}: {e}");
    }
}
