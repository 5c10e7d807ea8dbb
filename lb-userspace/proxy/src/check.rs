//! How the agent's health checks reach a pool's servers: as its requests
//! do (HAProxy's default for servers with `ssl`, `send-proxy` or `proto h2`
//! and no check port), and an HTTP/2 exchange for servers that speak it.

use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::h1::fetch::{FetchError, Fetched};
use super::model::Pool;
use super::proxy_protocol;
use super::upstream::{ClientTls, ServerIo, alpn};

/// How checks reach a pool's servers: after its PROXY header (v1
/// `UNKNOWN`, v2 `LOCAL`: the proxy's own connection, no client to claim),
/// through TLS with its `ca`, `verify`, `cert`/`key`, `min_version` and
/// `sni`, in HTTP/2 when it has `h2` (prior knowledge on plain connections,
/// ALPN on TLS ones, as its requests).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckTransport {
    send_proxy: Option<proxy_protocol::Version>,
    tls: Option<ClientTls>,
    h2: bool,
    /// Shared by the clones of a pool's transport (one per server).
    config: ConfigCache,
}

/// The TLS client configuration checks use, built once per pool and again
/// when a file it was read from changes (its size, time or inode: a `ca`
/// replaced in place is read at the next check). Building it per check read
/// and parsed the files each time and left rustls no session to resume, so
/// every check was a full handshake for the server too; now the checks of
/// a pool's servers stat the files and resume their sessions.
#[derive(Clone, Default)]
struct ConfigCache(Arc<Mutex<Option<Cached>>>);

/// A configuration and the stamps of the files it was read from (None: a
/// file that could not be stat'ed, never taken as unchanged).
type Cached = (Vec<Option<Stamp>>, Arc<rustls::ClientConfig>);

/// What tells a file changed: modification time, length, inode.
type Stamp = (Option<std::time::SystemTime>, u64, u64);

impl ConfigCache {
    /// The configuration for `tls` offering `alpn`, from the cache while
    /// its files are unchanged.
    fn get(&self, tls: &ClientTls, alpn: &[&[u8]]) -> anyhow::Result<Arc<rustls::ClientConfig>> {
        use std::os::unix::fs::MetadataExt as _;
        let stamps: Vec<Option<Stamp>> = tls
            .files()
            .map(|f| {
                let m = std::fs::metadata(f).ok()?;
                Some((m.modified().ok(), m.len(), m.ino()))
            })
            .collect();
        let mut slot = self.0.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some((seen, config)) = slot.as_ref()
            && *seen == stamps
            && stamps.iter().all(Option::is_some)
        {
            return Ok(config.clone());
        }
        let config = tls.config(alpn)?;
        *slot = Some((stamps, config.clone()));
        Ok(config)
    }
}

/// A cache is no setting: transports with the same settings are equal.
impl PartialEq for ConfigCache {
    fn eq(&self, _: &Self) -> bool {
        true
    }
}

impl Eq for ConfigCache {}

impl std::fmt::Debug for ConfigCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ConfigCache")
    }
}

impl CheckTransport {
    /// How checks reach `pool`'s servers; None when they are plain HTTP/1.1 over TCP.
    pub fn of(pool: &Pool) -> Option<Self> {
        let tls = ClientTls::of(pool);
        (tls.is_some() || pool.send_proxy.is_some() || pool.h2).then(|| CheckTransport {
            send_proxy: pool.send_proxy,
            tls,
            h2: pool.h2,
            config: ConfigCache::default(),
        })
    }

    /// Whether checks complete a TLS handshake.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The servers' name (the pool's `sni`): the Host an HTTP check sends
    /// unless it names one, so name-based virtual hosts answer as they
    /// answer the pool's requests.
    pub fn server_name(&self) -> Option<&str> {
        self.tls.as_ref().and_then(ClientTls::sni)
    }

    /// Whether an HTTP check on `io` (opened by [`Self::open`]) speaks HTTP/2.
    pub fn speaks_h2(&self, io: &ServerIo) -> bool {
        self.h2
            && match io {
                ServerIo::Plain(_) => true,
                ServerIo::Tls(_) => io.alpn_h2(),
            }
    }

    /// Sends the PROXY header and completes the TLS handshake on `tcp`,
    /// connected to `server` (resuming the session of an earlier check
    /// when the server allows it). A `ca` file replaced in place is read at
    /// the next check.
    pub async fn open(&self, mut tcp: TcpStream, server: SocketAddr) -> io::Result<ServerIo> {
        if let Some(version) = self.send_proxy {
            tcp.write_all(&proxy_protocol::encode_local(version))
                .await?;
        }
        let Some(settings) = &self.tls else {
            return Ok(ServerIo::Plain(tcp));
        };
        let config = self
            .config
            .get(settings, alpn(self.h2))
            .map_err(|e| io::Error::other(format!("{e:#}")))?;
        let stream = TlsConnector::from(config)
            .connect(settings.name(server), tcp)
            .await
            .map_err(|e| io::Error::new(e.kind(), format!("TLS handshake: {e}")))?;
        Ok(ServerIo::Tls(Box::new(stream)))
    }
}

/// One HTTP/2 request on `io` (`method` `path` for `authority`, over TLS
/// or not) and its answer, the body cut at `body_limit` bytes.
pub async fn fetch_h2(
    io: ServerIo,
    method: &str,
    authority: &str,
    path: &str,
    body_limit: usize,
) -> Result<Fetched, FetchError> {
    let method = http::Method::from_bytes(method.as_bytes()).map_err(|_| FetchError::Method)?;
    let scheme = if matches!(io, ServerIo::Tls(_)) {
        "https"
    } else {
        "http"
    };
    let h2 = |e: hyper::Error| FetchError::Io(io::Error::other(format!("HTTP/2: {e}")));
    let request = http::Request::builder()
        .method(method)
        .uri(format!("{scheme}://{authority}{path}"))
        .header(http::header::USER_AGENT, "lb-health")
        .body(Empty::<Bytes>::new())
        .map_err(|_| FetchError::Bad("bad check request"))?;
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io))
            .await
            .map_err(h2)?;
    let exchange = async {
        let response = send.send_request(request).await.map_err(h2)?;
        let status = response.status();
        let mut body = response.into_body();
        let mut kept = Vec::new();
        while kept.len() < body_limit {
            match body.frame().await {
                None => break,
                Some(frame) => {
                    if let Ok(data) = frame.map_err(h2)?.into_data() {
                        let room = body_limit - kept.len();
                        kept.extend_from_slice(&data[..data.len().min(room)]);
                    }
                }
            }
        }
        Ok(Fetched { status, body: kept })
    };
    // The connection is driven beside the exchange and dropped with it.
    let (mut exchange, mut conn) = (std::pin::pin!(exchange), std::pin::pin!(conn));
    tokio::select! {
        biased;
        fetched = &mut exchange => fetched,
        ended = &mut conn => match ended {
            // Closed cleanly (a GOAWAY after the answer): what it delivered is read.
            Ok(()) => exchange.await,
            Err(e) => Err(h2(e)),
        },
    }
}
