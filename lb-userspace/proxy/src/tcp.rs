//! `mode = "tcp"` frontends, as HAProxy's `mode tcp`: each connection is
//! relayed, bytes both ways, to one server of a pool, over a connection of
//! its own (never pooled or reused).
//!
//! With `tls` the proxy terminates TLS (TLS offload: the server gets the
//! plaintext, or TLS again with the pool's `tls`); without, bytes pass
//! through untouched, and when a rule looks at `sni` the ClientHello is read
//! first (within `timeout_http_request`, HAProxy's `tcp-request
//! inspect-delay`) and sent on ahead of the rest. A connection whose first
//! bytes are no whole, well-formed ClientHello by then is closed, not
//! routed without a name: the rules could not judge it, and the server
//! behind might read a name from it that they would have denied (what
//! HAProxy's users add `req.ssl_hello_type 1` rules for). Rules see the connection
//! only: `src`, `sni`, `sni_suffix`, `client_cert`, `src_request_rate`
//! (sessions, here); `deny` closes it, `use_pool` picks the pool. The
//! session holds its server slot until it ends, so `leastconn` and
//! `maxconn` count sessions, and a connect failure is retried on another
//! server. The relay ends when both sides have closed, or after
//! `timeout_tunnel` (the pool's, else the frontend's, else
//! `timeout_client`) without a byte either way.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::acl;
use super::balance::{Active, Pick};
use super::client_hello::{self, Hello};
use super::context::{FrontendRuntime, PoolRuntime, Shared};
use super::error::Failure;
use super::log::AccessRecord;
use super::prepare::Attempts;
use super::stats::Tally;
use super::tls::TlsFacts;
use super::tunnel;
use super::upstream::ServerIo;

/// Serves one connection of a `tcp` frontend (after any PROXY header).
pub(crate) async fn serve<S>(
    mut stream: S,
    addrs: (SocketAddr, SocketAddr),
    fe: &FrontendRuntime,
    shared: &Shared,
) where
    S: AsyncRead + AsyncWrite + Unpin + Send,
{
    let start = Instant::now();
    let peer = addrs.0;
    if let Some(terminator) = &fe.tls {
        let limit = fe.timeouts.http_request;
        let who = (&*fe.ctx.name, peer);
        let Some((tls, facts)) = terminator.handshake(stream, limit, false, who).await else {
            return;
        };
        return relay(tls, Vec::new(), Some(&facts), addrs, (fe, shared), start).await;
    }
    if !fe.inspect_sni {
        return relay(stream, Vec::new(), None, addrs, (fe, shared), start).await;
    }
    let (first, sni) = match read_hello(&mut stream, fe.timeouts.http_request).await {
        Ok(hello) => hello,
        Err(why) => {
            tracing::debug!(frontend = %fe.ctx.name, %peer, "closed: {why}");
            if why != NoHello::Closed {
                // Counted and logged as a rule's denial: the same outcome.
                fe.ctx.stats.denied_connection();
                let mut rec = session_record(peer, &fe.ctx);
                rec.termination = ['P', 'R'];
                rec.finish(start.elapsed(), fe.ctx.log_format);
            }
            return;
        }
    };
    let facts = TlsFacts {
        sni,
        ..TlsFacts::default()
    };
    relay(stream, first, Some(&facts), addrs, (fe, shared), start).await
}

/// Why a connection's first bytes gave no ClientHello to route by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
enum NoHello {
    /// The client closed (or failed) before a whole ClientHello came.
    #[error("the client left before its ClientHello was whole")]
    Closed,
    /// Not TLS, a malformed ClientHello, or one over `MAX_HELLO`.
    #[error("its first bytes are no well-formed ClientHello")]
    NotHello,
    /// No whole ClientHello within the wait.
    #[error("no whole ClientHello within timeout_http_request")]
    TimedOut,
}

/// The client's first bytes, up to a whole ClientHello, and the name it
/// asks for, if any; else why there is none.
async fn read_hello<S: AsyncRead + Unpin>(
    stream: &mut S,
    wait: Duration,
) -> Result<(Vec<u8>, Option<String>), NoHello> {
    let mut buf = Vec::with_capacity(2048);
    let read = async {
        loop {
            match client_hello::parse(&buf) {
                Hello::Sni(name) => return Ok(name),
                Hello::NotTls => return Err(NoHello::NotHello),
                Hello::Incomplete if buf.len() > client_hello::MAX_HELLO + 64 => {
                    return Err(NoHello::NotHello);
                }
                Hello::Incomplete => {}
            }
            buf.reserve(2048);
            match stream.read_buf(&mut buf).await {
                Ok(0) | Err(_) => return Err(NoHello::Closed),
                Ok(_) => {}
            }
        }
    };
    match tokio::time::timeout(wait, read).await {
        Ok(name) => name.map(|name| (buf, name)),
        Err(_) => Err(NoHello::TimedOut),
    }
}

/// Rules, pool and server for the connection, then the relay; one tcplog
/// record at the end. `first`: bytes already read from the client.
async fn relay<C>(
    mut client: C,
    first: Vec<u8>,
    tls: Option<&TlsFacts>,
    (peer, local): (SocketAddr, SocketAddr),
    (fe, shared): (&FrontendRuntime, &Shared),
    start: Instant,
) where
    C: AsyncRead + AsyncWrite + Unpin,
{
    let frontend = &fe.ctx;
    let rates = frontend.count_request(peer.ip());
    let req = acl::Request {
        sni: tls.and_then(|t| t.sni.as_deref()),
        client_cert: tls.is_some_and(|t| t.client_cert),
        src_request_rates: &rates,
        ..acl::Request::connection(peer.ip())
    };
    let mut rec = session_record(peer, frontend);
    let format = frontend.log_format;
    if frontend
        .actions
        .as_ref()
        .is_some_and(|a| a.denies_connection(&req))
    {
        // HAProxy's `tcp-request content reject`: closed, nothing sent.
        rec.termination = ['P', 'R'];
        return rec.finish(start.elapsed(), format);
    }
    let pool = &shared.pools[shared.pool_for(frontend, &req)];
    rec.pool = pool.name.clone();
    rec.tally.pool = Some(pool.stats.shard());
    let (active, mut server) = match connect(pool, (peer, local), &mut rec).await {
        Ok(connected) => connected,
        Err(failure) => {
            rec.termination = failure.termination();
            return rec.finish(start.elapsed(), format);
        }
    };
    let idle = pool
        .timeout_tunnel
        .or(frontend.timeout_tunnel)
        .unwrap_or(frontend.timeout_client);
    let inspected = first.len() as u64;
    // What was read to find the SNI goes first, and is freed: a session may
    // last hours.
    let spliced = match server.write_all(&first).await {
        Ok(()) => {
            drop(first);
            let stops = (frontend.kill.clone(), Some(&**active.server()));
            tunnel::splice(&mut client, &mut server, idle, stops).await
        }
        Err(e) => tunnel::Spliced {
            ended: Err(e),
            from_a: 0,
            to_a: 0,
            a_failed: false,
        },
    };
    rec.termination = spliced.termination();
    rec.bytes_in = inspected + spliced.from_a;
    rec.bytes = spliced.to_a;
    drop(active);
    rec.finish(start.elapsed(), format);
}

/// A slot on a server of `pool` and a new connection to it, for a session
/// from `peer` to `local`; a connect failure is retried on another server
/// (HAProxy's `retries` with `option redispatch`).
async fn connect(
    pool: &PoolRuntime,
    (peer, local): (SocketAddr, SocketAddr),
    rec: &mut AccessRecord,
) -> Result<(Active, ServerIo), Failure> {
    let pick = Pick {
        key: pool.balancer.connection_key(peer.ip()),
        sticky: None,
    };
    let mut attempts = Attempts::new(pool);
    loop {
        let active = attempts.acquire(pool, pick, rec).await?;
        let began = Instant::now();
        let addr = active.server().addr;
        match pool.conns.connect_new(addr, peer, local).await {
            Ok(io) => {
                Attempts::answered(pool, &active);
                rec.tc = began.elapsed().as_millis() as i64;
                return Ok((active, io));
            }
            Err(e) => {
                tracing::debug!(pool = %pool.name, server = %addr, error = %e, "connect failed");
                drop(active);
                if !attempts.retry(pool, Failure::ConnectFailed, false) {
                    return Err(Failure::ConnectFailed);
                }
            }
        }
    }
}

/// The access log record of a session, before a pool is chosen.
fn session_record(peer: SocketAddr, frontend: &super::context::FrontendCtx) -> AccessRecord {
    AccessRecord {
        tcp: true,
        tally: Tally {
            frontend: Some(frontend.stats.shard()),
            pool: None,
            server: None,
        },
        ..AccessRecord::begin(peer, frontend.name.clone(), frontend.name.clone())
    }
}
