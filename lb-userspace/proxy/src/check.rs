//! How the agent's health checks reach a pool's servers: as its requests
//! do (HAProxy's default for servers with `ssl`, `send-proxy` or `proto h2`
//! and no check port), and an HTTP/2 exchange for servers that speak it.

use std::io;
use std::net::SocketAddr;

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
}

impl CheckTransport {
    /// How checks reach `pool`'s servers; None when they are plain HTTP/1.1 over TCP.
    pub fn of(pool: &Pool) -> Option<Self> {
        let tls = ClientTls::of(pool);
        (tls.is_some() || pool.send_proxy.is_some() || pool.h2).then_some(CheckTransport {
            send_proxy: pool.send_proxy,
            tls,
            h2: pool.h2,
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
    /// connected to `server`. The TLS configuration is built for each check,
    /// so a `ca` file replaced in place is read at the next one.
    pub async fn open(&self, mut tcp: TcpStream, server: SocketAddr) -> io::Result<ServerIo> {
        if let Some(version) = self.send_proxy {
            tcp.write_all(&proxy_protocol::encode_local(version))
                .await?;
        }
        let Some(settings) = &self.tls else {
            return Ok(ServerIo::Plain(tcp));
        };
        let config = settings
            .config(alpn(self.h2))
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
