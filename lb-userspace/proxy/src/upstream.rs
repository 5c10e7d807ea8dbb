//! Connections to servers: TCP, then the PROXY header of `send_proxy`, then
//! TLS when the pool has `tls = true` (verified against `ca` unless
//! `verify = false`), and HTTP/1.1 or HTTP/2 (`h2 = true`: prior knowledge on
//! plain connections, ALPN `h2` on TLS ones).

use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use anyhow::Context as _;
use rustls::client::ResolvesClientCert;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::sign::CertifiedKey;
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::model::{Pool, TlsVersion};
use super::{proxy_protocol, tls};

/// The rustls client configuration of a `tls = true` pool, None for plain pools.
pub(crate) fn client_config(pool: &Pool) -> anyhow::Result<Option<Arc<rustls::ClientConfig>>> {
    ClientTls::of(pool)
        .map(|client| client.config(alpn(pool.h2)))
        .transpose()
}

/// The protocols offered servers in ALPN by a pool with `h2` or without.
pub(crate) fn alpn(h2: bool) -> &'static [&'static [u8]] {
    if h2 {
        &[b"h2", b"http/1.1"]
    } else {
        &[b"http/1.1"]
    }
}

/// The TLS settings of a `tls = true` pool: how it verifies servers, the
/// certificate it shows them, the versions it offers and the name it sends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ClientTls {
    verify: bool,
    ca: Option<PathBuf>,
    /// `cert` and `key`, set together (validate() checks it).
    client_cert: Option<(PathBuf, PathBuf)>,
    min_version: TlsVersion,
    sni: Option<String>,
}

impl ClientTls {
    /// The settings of `pool`; None when it speaks plain TCP.
    pub(crate) fn of(pool: &Pool) -> Option<Self> {
        pool.tls.then(|| ClientTls {
            verify: pool.verify,
            ca: pool.ca.clone(),
            client_cert: pool.cert.clone().zip(pool.key.clone()),
            min_version: pool.min_version,
            sni: pool.sni.clone(),
        })
    }

    /// A client configuration offering `alpn`; fails on unreadable files
    /// (the error names the key of the file: `ca`, `cert` or `key`).
    pub(crate) fn config(&self, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        let provider = tls::provider();
        let versions: &[&rustls::SupportedProtocolVersion] = match self.min_version {
            TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
            TlsVersion::Tls13 => &[&rustls::version::TLS13],
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)?;
        let builder = if self.verify {
            // validate() guarantees `ca` with verify; checked again rather than unwrapped.
            let path = self
                .ca
                .as_deref()
                .context("verify = true needs ca (there is no built-in root store)")?;
            let roots =
                read_roots(path).with_context(|| format!("reading ca {}", path.display()))?;
            let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
                Arc::new(roots),
                provider.clone(),
            )
            .build()
            .with_context(|| format!("ca {}", path.display()))?;
            builder.with_webpki_verifier(verifier)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerify(provider.clone())))
        };
        let mut cfg = match &self.client_cert {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let ck = tls::certified_key(&provider, cert, key).context("cert/key")?;
                builder.with_client_cert_resolver(Arc::new(ClientCert(Arc::new(ck))))
            }
        };
        cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        Ok(Arc::new(cfg))
    }

    /// The files the configuration is read from: `ca`, `cert`, `key`.
    pub(crate) fn files(&self) -> impl Iterator<Item = &std::path::Path> {
        let pair = self.client_cert.as_ref();
        let cert_key = pair
            .into_iter()
            .flat_map(|(c, k)| [c.as_path(), k.as_path()]);
        self.ca.as_deref().into_iter().chain(cert_key)
    }

    /// The pool's `sni`, if it names the servers.
    pub(crate) fn sni(&self) -> Option<&str> {
        self.sni.as_deref()
    }

    /// The name to send and verify: `sni`, else the server's IP address.
    pub(crate) fn name(&self, server: SocketAddr) -> ServerName<'static> {
        // validate() checked the name; an invalid one falls back to the IP.
        self.sni
            .as_deref()
            .and_then(|n| ServerName::try_from(n.to_string()).ok())
            .unwrap_or_else(|| ServerName::IpAddress(server.ip().into()))
    }
}

/// A pool's `cert`/`key`: shown to every server that asks for a certificate
/// (HAProxy's `crt` on a server line, nginx's `proxy_ssl_certificate`).
#[derive(Debug)]
struct ClientCert(Arc<CertifiedKey>);

impl ResolvesClientCert for ClientCert {
    fn resolve(&self, _hints: &[&[u8]], _schemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        Some(Arc::clone(&self.0))
    }

    fn has_certs(&self) -> bool {
        true
    }
}

/// Trust anchors from a PEM file of one or more certificates.
fn read_roots(path: &Path) -> anyhow::Result<RootCertStore> {
    let text = crate::config_file::read(path, crate::config_file::MAX_PEM)?;
    let mut roots = RootCertStore::empty();
    for cert in rustls_pemfile::certs(&mut text.as_slice()) {
        roots.add(cert?)?;
    }
    if roots.is_empty() {
        anyhow::bail!("no certificate found");
    }
    Ok(roots)
}

/// `verify = false`: any certificate is accepted (signatures are still checked).
#[derive(Debug)]
pub struct NoVerify(pub Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerify {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// TLS settings of a pool's connector.
#[derive(Clone)]
pub(crate) struct TlsSettings {
    /// Handshakes with the pool's client configuration.
    pub connector: TlsConnector,
    /// The pool's settings (the name to send).
    pub client: ClientTls,
}

/// How a pool opens server connections: TCP within `timeout_connect`, the
/// PROXY header of `send_proxy`, then TLS within `timeout_server`.
pub(crate) struct Connector {
    timeout_connect: Duration,
    timeout_server: Duration,
    send_proxy: Option<proxy_protocol::Version>,
    tls: Option<TlsSettings>,
}

impl Connector {
    /// The connector of `pool`; fails on unreadable `ca` files.
    pub fn new(pool: &Pool) -> anyhow::Result<Self> {
        let tls = match ClientTls::of(pool) {
            Some(client) => Some(TlsSettings {
                connector: TlsConnector::from(client.config(alpn(pool.h2))?),
                client,
            }),
            None => None,
        };
        Ok(Connector {
            timeout_connect: pool.timeout_connect,
            timeout_server: pool.timeout_server,
            send_proxy: pool.send_proxy,
            tls,
        })
    }

    /// Whether connections are TLS (ALPN then decides between HTTP/1.1 and HTTP/2).
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Opens a connection to `server` for a request of `client` (PROXY header
    /// source) that connected to `local` (PROXY header destination).
    pub async fn connect(
        &self,
        server: SocketAddr,
        client: SocketAddr,
        local: SocketAddr,
    ) -> io::Result<ServerIo> {
        let tcp = tokio::time::timeout(self.timeout_connect, TcpStream::connect(server))
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "timeout connect"))??;
        tcp.set_nodelay(true)?;
        let mut tcp = tcp;
        if let Some(version) = self.send_proxy {
            tcp.write_all(&proxy_protocol::encode(version, client, local))
                .await?;
        }
        let Some(tls) = &self.tls else {
            return Ok(ServerIo::Plain(tcp));
        };
        let name = tls.client.name(server);
        // Boxed: rustls' handshake state is kilobytes, and would otherwise
        // be part of every request's future (copied when it is boxed).
        let handshake = Box::pin(tls.connector.connect(name, tcp));
        let stream = tokio::time::timeout(self.timeout_server, handshake)
            .await
            .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "TLS handshake timed out"))??;
        Ok(ServerIo::Tls(Box::new(stream)))
    }
}

/// A server connection, plain or TLS.
pub enum ServerIo {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS over TCP.
    Tls(Box<TlsStream<TcpStream>>),
}

impl ServerIo {
    /// Whether TLS's ALPN chose HTTP/2.
    pub fn alpn_h2(&self) -> bool {
        match self {
            ServerIo::Plain(_) => false,
            ServerIo::Tls(s) => s.get_ref().1.alpn_protocol() == Some(b"h2"),
        }
    }
}

impl AsyncRead for ServerIo {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_read(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for ServerIo {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_write(cx, buf),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            ServerIo::Plain(s) => s.is_write_vectored(),
            ServerIo::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_flush(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            ServerIo::Plain(s) => Pin::new(s).poll_shutdown(cx),
            ServerIo::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}
