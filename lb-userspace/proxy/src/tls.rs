//! TLS termination: certificates chosen by SNI, a default one, client
//! certificates (mutual TLS), resumption by tickets and a session cache, and
//! reloading the PEM files without a restart.
//!
//! A certificate serves the names listed in its `CertPair::names`, or when that
//! is empty the DNS names of its leaf's subjectAltName, read with a small DER
//! scan (no X.509 crate). `*.example.com` matches exactly one extra label.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::model::{TlsConfig, TlsVersion, VerifyClient};

/// Why certificates could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A PEM file could not be read.
    #[error("reading {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// A certificate file holds no certificate.
    #[error("{0}: no certificate found")]
    NoCertificate(PathBuf),
    /// A key file holds no private key.
    #[error("{0}: no private key found")]
    NoKey(PathBuf),
    /// rustls rejected a key or a certificate/key pair.
    #[error("{path}: {source}")]
    Rustls {
        /// The key file.
        path: PathBuf,
        /// The cause.
        source: rustls::Error,
    },
    /// No certificate configured, or `default_cert` out of range.
    #[error("tls needs at least one certificate and default_cert within them")]
    BadConfig,
    /// A `client_crl` file holds no CRL.
    #[error("{0}: no certificate revocation list found")]
    NoCrl(PathBuf),
    /// rustls refused a setting: the client CA or CRLs (e.g. no usable
    /// trust anchor), the protocol versions, session tickets.
    #[error("TLS settings: {0}")]
    Settings(String),
}

/// TLS sessions a frontend keeps for resumption (HAProxy's `tune.ssl.cachesize`).
const SESSION_CACHE: usize = 20_000;

/// The crypto provider used everywhere in the proxy (ring, no aws-lc).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Loaded certificates with the names each serves.
#[derive(Debug)]
struct CertStore {
    entries: Vec<(Arc<[String]>, Arc<CertifiedKey>)>,
    default: usize,
}

impl CertStore {
    fn load(cfg: &TlsConfig) -> Result<Self, TlsError> {
        let default = cfg.default_cert.unwrap_or(0);
        if cfg.certs.is_empty() || default >= cfg.certs.len() {
            return Err(TlsError::BadConfig);
        }
        let provider = provider();
        let mut entries = Vec::with_capacity(cfg.certs.len());
        for pair in &cfg.certs {
            let ck = certified_key(&provider, &pair.cert, &pair.key)?;
            let names = if pair.names.is_empty() {
                dns_names(&ck.cert[0])
            } else {
                pair.names.iter().map(|n| n.to_ascii_lowercase()).collect()
            };
            entries.push((names.into(), Arc::new(ck)));
        }
        Ok(CertStore { entries, default })
    }

    /// The names and certificate served for `sni`.
    fn select(&self, sni: Option<&str>) -> &(Arc<[String]>, Arc<CertifiedKey>) {
        let found = sni.and_then(|sni| {
            let sni = sni.to_ascii_lowercase();
            self.entries
                .iter()
                .find(|(names, _)| names.iter().any(|n| name_matches(n, &sni)))
        });
        found.unwrap_or(&self.entries[self.default])
    }
}

/// The chain in `cert` (leaf first) with the key in `key`, checked to match.
pub(crate) fn certified_key(
    provider: &CryptoProvider,
    cert: &Path,
    key: &Path,
) -> Result<CertifiedKey, TlsError> {
    let chain = read_certs(cert)?;
    let rustls_err = |source| TlsError::Rustls {
        path: key.to_path_buf(),
        source,
    };
    let signer = provider
        .key_provider
        .load_private_key(read_key(key)?)
        .map_err(rustls_err)?;
    let ck = CertifiedKey::new(chain, signer);
    ck.keys_match().map_err(rustls_err)?;
    Ok(ck)
}

/// True when certificate name `pattern` covers host `sni` (both lowercase).
fn name_matches(pattern: &str, sni: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => sni
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == sni,
    }
}

fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    read_pem(
        path,
        |r| rustls_pemfile::certs(r).collect(),
        TlsError::NoCertificate,
    )
}

/// The PEM items of `path` that `items` reads; `none(path)` if there are none.
fn read_pem<T>(
    path: &Path,
    items: impl FnOnce(&mut &[u8]) -> std::io::Result<Vec<T>>,
    none: fn(PathBuf) -> TlsError,
) -> Result<Vec<T>, TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = crate::config_file::read(path, crate::config_file::MAX_PEM).map_err(io)?;
    let found = items(&mut text.as_slice()).map_err(io)?;
    if found.is_empty() {
        return Err(none(path.to_path_buf()));
    }
    Ok(found)
}

fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let io = |source| TlsError::Io {
        path: path.to_path_buf(),
        source,
    };
    let text = crate::config_file::read(path, crate::config_file::MAX_PEM).map_err(io)?;
    rustls_pemfile::private_key(&mut text.as_slice())
        .map_err(io)?
        .ok_or_else(|| TlsError::NoKey(path.to_path_buf()))
}

/// Chooses a frontend's certificate by SNI; `reload` swaps the set atomically.
#[derive(Debug)]
pub struct CertResolver {
    cfg: TlsConfig,
    store: RwLock<Arc<CertStore>>,
}

impl CertResolver {
    /// Reads every certificate and key of `cfg`.
    pub fn load(cfg: &TlsConfig) -> Result<Self, TlsError> {
        Ok(CertResolver {
            store: RwLock::new(Arc::new(CertStore::load(cfg)?)),
            cfg: cfg.clone(),
        })
    }

    /// Re-reads the PEM files; on error the previous certificates stay in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        self.install(self.fresh()?);
        Ok(())
    }

    /// The certificates as the PEM files hold them now.
    fn fresh(&self) -> Result<Arc<CertStore>, TlsError> {
        Ok(Arc::new(CertStore::load(&self.cfg)?))
    }

    fn install(&self, store: Arc<CertStore>) {
        *self.store.write().unwrap_or_else(|e| e.into_inner()) = store;
    }

    /// The certificate served for `sni`.
    pub fn select(&self, sni: Option<&str>) -> Arc<CertifiedKey> {
        let store = self.store.read().unwrap_or_else(|e| e.into_inner()).clone();
        store.select(sni).1.clone()
    }

    /// The names of the certificate served for `sni`.
    fn names_for(&self, sni: Option<&str>) -> Arc<[String]> {
        let store = self.store.read().unwrap_or_else(|e| e.into_inner()).clone();
        store.select(sni).0.clone()
    }
}

impl ResolvesServerCert for CertResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.select(hello.server_name()))
    }
}

/// What a client connection's TLS handshake established, for ACLs and servers.
#[derive(Debug, Default)]
pub(crate) struct TlsFacts {
    /// The server name the client asked for.
    pub sni: Option<String>,
    /// The client presented a certificate that verified.
    pub client_cert: bool,
    /// That certificate, base64 DER, when the frontend forwards it
    /// (`client_cert_header`).
    pub cert_value: Option<http::HeaderValue>,
    /// With an SNI: the names of the certificate served for it.
    pub served_names: Option<Arc<[String]>>,
}

impl TlsFacts {
    /// Whether a request for `host` (a Host value, port allowed) came on a
    /// connection that does not serve it: neither the SNI nor a name of the
    /// certificate the handshake served. Such a request could dodge rules
    /// keyed on the SNI (a client certificate required for one name, as
    /// nginx and HAProxy users write them); RFC 9110 7.4 answers it 421.
    /// Connection coalescing (HTTP/2 clients reusing a connection for
    /// another name its certificate covers) is kept. Without an SNI
    /// nothing is known to compare.
    pub(crate) fn misdirected(&self, host: &str) -> bool {
        let (Some(sni), Some(names)) = (&self.sni, &self.served_names) else {
            return false;
        };
        // Host is `host[:port]` (checked before), `[v6]` literals included.
        let name = match host.strip_prefix('[') {
            Some(v6) => v6.split(']').next().unwrap_or(v6),
            None => host.split(':').next().unwrap_or(host),
        };
        let name = name.trim_end_matches('.');
        // The common case (Host is the SNI) allocates nothing.
        if name.eq_ignore_ascii_case(sni.trim_end_matches('.')) {
            return false;
        }
        let name = name.to_ascii_lowercase();
        !names.iter().any(|n| name_matches(n, &name))
    }
}

/// A frontend's TLS termination: its certificates, chosen by SNI, and its
/// rustls configuration (client certificate verification included), all
/// re-read from their files by `reload`.
pub struct TlsTerminator {
    resolver: Arc<CertResolver>,
    cfg: TlsConfig,
    /// ALPN for HTTP.
    http: bool,
    /// Replaced when a reload brings a new client CA or CRL; a connection
    /// takes a copy when it starts its handshake.
    acceptor: RwLock<TlsAcceptor>,
}

impl TlsTerminator {
    /// Reads every certificate, key, client CA and CRL of `cfg`; `http`
    /// offers ALPN `h2` and `http/1.1` (a `tcp` frontend offers none: it
    /// does not know what it relays).
    pub fn load(cfg: &TlsConfig, http: bool) -> Result<Self, TlsError> {
        let resolver = Arc::new(CertResolver::load(cfg)?);
        let acceptor = TlsAcceptor::from(Arc::new(server_config(resolver.clone(), cfg, http)?));
        Ok(TlsTerminator {
            resolver,
            cfg: cfg.clone(),
            http,
            acceptor: RwLock::new(acceptor),
        })
    }

    /// Whether it terminates TLS as `cfg` says, with ALPN for HTTP if `http`.
    pub(crate) fn serves(&self, cfg: &TlsConfig, http: bool) -> bool {
        self.cfg == *cfg && self.http == http
    }

    /// Completes a client's handshake within `limit`: the stream and what
    /// it established (with the certificate as `client_cert_header` carries
    /// it if `cert_value`); None when it failed or ran out of time (logged
    /// at debug level for `frontend`).
    pub(crate) async fn handshake<S>(
        &self,
        stream: S,
        limit: Duration,
        cert_value: bool,
        (frontend, peer): (&str, SocketAddr),
    ) -> Option<(TlsStream<S>, TlsFacts)>
    where
        S: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = self
            .acceptor
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        // Boxed: rustls' handshake state is kilobytes, needed only until it ends.
        let accept = Box::pin(acceptor.accept(stream));
        let tls = match tokio::time::timeout(limit, accept).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%frontend, %peer, error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                tracing::debug!(%frontend, %peer, "TLS handshake timed out");
                return None;
            }
        };
        let session = tls.get_ref().1;
        let facts = TlsFacts {
            sni: session.server_name().map(str::to_string),
            client_cert: session.peer_certificates().is_some_and(|c| !c.is_empty()),
            cert_value: cert_value.then(|| client_cert_value(session)).flatten(),
            served_names: session
                .server_name()
                .filter(|_| !self.cfg.allow_misdirected)
                .map(|sni| self.resolver.names_for(Some(sni))),
        };
        Some((tls, facts))
    }

    /// Re-reads the certificates and, with client certificates, the client
    /// CA and CRLs (a CRL updated in place takes effect, as on HAProxy's
    /// reload). All or nothing: on error everything loaded stays in use.
    pub fn reload(&self) -> Result<(), TlsError> {
        let store = self.resolver.fresh()?;
        if self.cfg.client_ca.is_some() {
            // With a session cache of its own: a resumed session skips the
            // certificate check, so one kept over would let a client whose
            // certificate the new CRL revokes back in.
            let fresh = server_config(self.resolver.clone(), &self.cfg, self.http)?;
            *self.acceptor.write().unwrap_or_else(|e| e.into_inner()) =
                TlsAcceptor::from(Arc::new(fresh));
        }
        self.resolver.install(store);
        Ok(())
    }
}

/// A rustls server configuration: TLS 1.3 and, unless `min_version` is
/// 1.3, 1.2; ALPN `h2` then `http/1.1` with `http`, client certificates
/// verified as `tls` says.
pub fn server_config(
    resolver: Arc<CertResolver>,
    tls: &TlsConfig,
    http: bool,
) -> Result<rustls::ServerConfig, TlsError> {
    let versions: &[&rustls::SupportedProtocolVersion] = match tls.min_version {
        TlsVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        TlsVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(versions)
        .map_err(|e| TlsError::Settings(e.to_string()))?;
    let builder = match client_verifier(tls)? {
        Some(verifier) => builder.with_client_cert_verifier(verifier),
        None => builder.with_no_client_auth(),
    };
    let mut cfg = builder.with_cert_resolver(resolver);
    // Resumption at an edge's scale, as HAProxy's defaults: stateless
    // tickets (keys random per start and reload, rotated every 6 h) and a
    // session cache of `SESSION_CACHE` for clients without tickets;
    // rustls' default cache of 256 sessions would make most clients of a
    // busy frontend do a full handshake every time.
    cfg.session_storage = rustls::server::ServerSessionMemoryCache::new(SESSION_CACHE);
    cfg.ticketer = rustls::crypto::ring::Ticketer::new()
        .map_err(|e| TlsError::Settings(format!("session tickets: {e}")))?;
    if http {
        // http/1.0 last: a client offering only it (curl --http1.0) would
        // otherwise fail the handshake (rustls refuses a client whose
        // offer shares nothing with ours; OpenSSL servers just pick none).
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec(), b"http/1.0".to_vec()];
    }
    // The provider's order (AES-256-GCM, AES-128-GCM, then ChaCha20) decides,
    // not the client's, as with HAProxy's `prefer-server-ciphers`.
    cfg.ignore_client_order = true;
    Ok(cfg)
}

/// The verifier of client certificates `tls.client_ca` asks for: chains to
/// its anchors, not revoked by `client_crl`, for client authentication.
fn client_verifier(
    tls: &TlsConfig,
) -> Result<Option<Arc<dyn rustls::server::danger::ClientCertVerifier>>, TlsError> {
    let Some(ca) = &tls.client_ca else {
        return Ok(None);
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in read_certs(ca)? {
        roots
            .add(cert)
            .map_err(|e| TlsError::Settings(format!("{}: {e}", ca.display())))?;
    }
    let mut crls = Vec::new();
    for path in &tls.client_crl {
        crls.extend(read_pem(
            path,
            |r| rustls_pemfile::crls(r).collect(),
            TlsError::NoCrl,
        )?);
    }
    let builder =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(crls);
    let builder = match tls.verify_client {
        VerifyClient::Required => builder,
        VerifyClient::Optional => builder.allow_unauthenticated(),
    };
    let verifier = builder
        .build()
        .map_err(|e| TlsError::Settings(e.to_string()))?;
    Ok(Some(verifier))
}

/// The leaf certificate a TLS client presented (verified by the handshake),
/// base64 DER as `client_cert_header` carries it.
fn client_cert_value(session: &rustls::ServerConnection) -> Option<http::HeaderValue> {
    use base64::Engine;
    let leaf = session.peer_certificates()?.first()?;
    let text = base64::engine::general_purpose::STANDARD.encode(leaf.as_ref());
    http::HeaderValue::from_str(&text).ok()
}

/// DNS names (lowercase) in the subjectAltName extension of a DER certificate.
pub fn dns_names(der: &[u8]) -> Vec<String> {
    // OID 2.5.29.17 (subjectAltName), DER-encoded with its tag and length.
    const SAN_OID: [u8; 5] = [0x06, 0x03, 0x55, 0x1d, 0x11];
    let Some(pos) = der.windows(SAN_OID.len()).position(|w| w == SAN_OID) else {
        return Vec::new();
    };
    let mut rest = &der[pos + SAN_OID.len()..];
    // Optional `critical` BOOLEAN.
    if let Some((0x01, _, after)) = tlv(rest) {
        rest = after;
    }
    let Some((0x04, octets, _)) = tlv(rest) else {
        return Vec::new();
    };
    let Some((0x30, mut names, _)) = tlv(octets) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    while let Some((tag, value, after)) = tlv(names) {
        // [2] IMPLICIT IA5String: dNSName.
        if tag == 0x82
            && let Ok(s) = std::str::from_utf8(value)
        {
            out.push(s.to_ascii_lowercase());
        }
        names = after;
    }
    out
}

/// Splits one DER tag-length-value off `b`: (tag, value, rest).
fn tlv(b: &[u8]) -> Option<(u8, &[u8], &[u8])> {
    let (&tag, b) = b.split_first()?;
    let (&first, mut b) = b.split_first()?;
    let len = if first < 0x80 {
        usize::from(first)
    } else {
        let n = usize::from(first & 0x7f);
        if n == 0 || n > 4 || b.len() < n {
            return None;
        }
        let len = b[..n]
            .iter()
            .fold(0usize, |acc, &x| (acc << 8) | usize::from(x));
        b = &b[n..];
        len
    };
    if b.len() < len {
        return None;
    }
    Some((tag, &b[..len], &b[len..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wildcard_matching() {
        assert!(name_matches("a.example.com", "a.example.com"));
        assert!(name_matches("*.example.com", "a.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
    }

    #[test]
    fn reads_san_names() {
        let ck = rcgen::generate_simple_self_signed(vec![
            "One.example".to_string(),
            "*.two.example".to_string(),
        ])
        .unwrap();
        assert_eq!(
            dns_names(ck.cert.der()),
            vec!["one.example".to_string(), "*.two.example".to_string()]
        );
        assert!(dns_names(b"\x30\x03\x02\x01").is_empty());
    }

    #[test]
    fn tlv_long_lengths_and_truncation() {
        let mut long = vec![0x04, 0x81, 200];
        long.extend(std::iter::repeat_n(7u8, 200));
        let (tag, v, rest) = tlv(&long).unwrap();
        assert_eq!((tag, v.len(), rest.len()), (4, 200, 0));
        assert!(tlv(&long[..100]).is_none());
        assert!(tlv(&[0x04]).is_none());
    }
}
