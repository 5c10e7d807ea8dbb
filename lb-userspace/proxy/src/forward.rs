//! hyper's path (HTTP/2 clients, and HTTP/1 ones of frontends that can reach an
//! `h2` pool): one request from hyper's server to a pooled client and back,
//! after `prepare` ran its actions and routing; retries, error answers, and
//! the response body that writes the access log when it ends.

use std::convert::Infallible;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::Authority;
use http::{Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::actions;
use super::balance::Active;
use super::compress;
use super::connpool::{Conn, RawConn, Reusable, Sender, SharedH2};
use super::context::{ConnCtx, FrontendCtx, PoolRuntime, Shared};
use super::deadline::WaitLimit;
use super::error::{Failure, Phase};
use super::h1::client;
use super::hardening;
use super::log::{AccessRecord, LogFormat};
use super::prepare::{self, Attempts, ClientSide, Forwarding, Prepared};
use super::request_body::{self, RequestBody};
use super::tunnel;

/// Body of every response the proxy sends.
pub type ProxyBody = LoggedBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Handles one request from a client; never fails, errors become HTTP answers.
pub(crate) async fn handle(
    shared: Arc<Shared>,
    conn: Arc<ConnCtx>,
    req: Request<Incoming>,
) -> Result<Response<ProxyBody>, Infallible> {
    let start = Instant::now();
    conn.activity.active.fetch_add(1, Ordering::SeqCst);
    conn.activity.dispatched.fetch_add(1, Ordering::SeqCst);
    let tq = {
        let since = *conn.ready_since.lock().unwrap_or_else(|e| e.into_inner());
        start.saturating_duration_since(since).as_millis() as i64
    };
    let (mut parts, body) = req.into_parts();
    let h2_client = parts.version == Version::HTTP_2;
    let upgrade = tunnel::Upgrade::take(&mut parts); // WebSocket & co (proxy/tunnel.rs)
    let client = ClientSide {
        frontend: &conn.frontend,
        peer: conn.peer,
        local: conn.local,
        tls: conn.tls.as_deref(),
        body_length: None,
    };
    let prepared = prepare::prepare(
        &shared,
        client,
        &mut parts,
        (tq, start),
        upgrade.as_ref().map(|u| &u.proto),
    )
    .await;
    let done = Done {
        conn: conn.clone(),
        start,
        end: None,
    };
    let fwd = match prepared {
        Prepared::Forward(f) => f,
        Prepared::Answer(answer, rec) => {
            let (head, body) = answer.into_parts();
            let body = body.map_err(|never| match never {}).boxed_unsync();
            return Ok(Response::from_parts(
                head,
                LoggedBody::new(body, rec, None, done),
            ));
        }
        Prepared::Refuse(failure, rec) => {
            return Ok(error_response(failure, rec, done));
        }
    };
    let limit = conn.frontend.timeout_client;
    if !h2_client {
        let mut body = RequestBody::stream(body, limit);
        // Boxed, or every HTTP/2 stream's future (this one) would be as large.
        return Ok(
            match whole_body(&shared.pools[fwd.pool], &upgrade, &mut body) {
                Some(whole) => {
                    Box::pin(forward_raw(&shared, &conn, parts, whole, fwd, done, None)).await
                }
                None => {
                    Box::pin(forward(
                        &shared, &conn, parts, body, fwd, upgrade, done, None,
                    ))
                    .await
                }
            },
        );
    }
    let body = request_body::in_hand(body, limit).await;
    Ok(in_task(shared, conn, parts, body, fwd, upgrade, done).await)
}

/// Starts an HTTP/2 stream's exchange in a task of its own; its answer.
///
/// An HTTP/2 stream can be reset at any time, which drops the stream's
/// future: in a task, a reset neither abandons a connection being opened nor
/// one whose response is under way (both go back to the pool), and a request
/// not sent yet is not sent at all (rapid reset, CVE-2023-44487).
fn in_task(
    shared: Arc<Shared>,
    conn: Arc<ConnCtx>,
    parts: http::request::Parts,
    body: RequestBody,
    fwd: Forwarding,
    upgrade: Option<tunnel::Upgrade>,
    done: Done,
) -> impl Future<Output = Response<ProxyBody>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let pool_idx = fwd.pool;
    let fe = conn.frontend.clone();
    let counted = InFlight::new(fe.clone());
    // Boxed, as the service's future (server.rs): written once, not copied.
    let task = tokio::spawn(Box::pin(async move {
        let _counted = counted;
        let mut body = body;
        let resp = match whole_body(&shared.pools[pool_idx], &upgrade, &mut body) {
            // Its header values have bytes of their own already.
            Some(whole) => forward_raw(&shared, &conn, parts, whole, fwd, done, Some(&tx)).await,
            None => {
                let mut resp =
                    forward(&shared, &conn, parts, body, fwd, upgrade, done, Some(&tx)).await;
                own_values(resp.headers_mut());
                resp
            }
        };
        if let Err(resp) = tx.send(resp) {
            // Boxed: rare (the client reset the stream), and large.
            let limit = shared.pools[pool_idx].timeout_server;
            Box::pin(drain(resp.into_body(), limit)).await;
        }
    }));
    answer_of(rx, Reset(Some(task.abort_handle()), fe))
}

/// Gives each header value its own bytes. hyper's HTTP/1 client hands out
/// values that are slices of its 8 KiB read buffer, and HTTP/2's HPACK
/// encoder keeps the values it indexes for the life of the client's
/// connection: each idle HTTP/2 connection held one such buffer.
fn own_values(headers: &mut http::HeaderMap) {
    for v in headers.values_mut() {
        if let Ok(mut owned) = HeaderValue::from_bytes(v.as_bytes()) {
            owned.set_sensitive(v.is_sensitive());
            *v = owned;
        }
    }
}

/// The answer of an HTTP/2 stream's exchange task; `reset` acts if this
/// future is dropped first (the stream was reset).
async fn answer_of(
    rx: tokio::sync::oneshot::Receiver<Response<ProxyBody>>,
    mut reset: Reset,
) -> Response<ProxyBody> {
    let got = rx.await;
    reset.0 = None;
    match got {
        Ok(resp) => resp,
        // The task panicked: nothing was logged for it.
        Err(_) => {
            let mut resp = Response::new(LoggedBody::empty());
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            resp
        }
    }
}

/// Counts an HTTP/2 stream's exchange task in its frontend's `exchanges`
/// while it lives.
struct InFlight(Arc<FrontendCtx>);

impl InFlight {
    fn new(fe: Arc<FrontendCtx>) -> Self {
        fe.exchanges.fetch_add(1, Ordering::Relaxed);
        InFlight(fe)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.exchanges.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Dropped with the exchange task still set when the client reset the stream:
/// the task goes on (its server connection is reused) only while the
/// frontend has at most `max_connections` of them. Past that it is aborted,
/// which closes its server connection: a client resetting streams without
/// end made the proxy hold a server connection for each, each up to
/// `timeout_server`, after the client's connection had closed too.
struct Reset(Option<tokio::task::AbortHandle>, Arc<FrontendCtx>);

impl Drop for Reset {
    fn drop(&mut self) {
        if let Some(task) = self.0.take()
            && self.1.exchanges.load(Ordering::Relaxed) > self.1.max_connections
        {
            task.abort();
        }
    }
}

/// Largest response body read to the end for a request whose client went
/// away, so its server connection can serve another one.
const DRAIN_LIMIT: u64 = 1 << 20;

/// Reads `body` to its end (then its server connection goes back to the
/// pool) within `limit` and `DRAIN_LIMIT` bytes; past either it is dropped,
/// which closes the connection.
async fn drain(mut body: ProxyBody, limit: Duration) {
    let mut bytes = 0u64;
    let _ = tokio::time::timeout(limit, async {
        while let Some(Ok(frame)) = body.frame().await {
            bytes += frame.data_ref().map_or(0, |d| d.len() as u64);
            if bytes > DRAIN_LIMIT {
                return;
            }
        }
    })
    .await;
}

/// Forwards a prepared request to its pool's servers, with retries: the
/// response, or an error answer. `gone` is the channel the answer goes back
/// on when the exchange runs in a task of its own: once its receiver is
/// dropped (the client reset the stream), a request not sent yet is not sent.
///
/// Not an `async fn`: one keeps its arguments twice (as passed, and moved
/// into its body), and this future is moved by value on HTTP/2 (its task).
#[allow(clippy::too_many_arguments)]
fn forward<'a>(
    shared: &'a Shared,
    conn: &'a Arc<ConnCtx>,
    parts: http::request::Parts,
    body: RequestBody,
    mut fwd: Forwarding,
    upgrade: Option<tunnel::Upgrade>,
    done: Done,
    gone: Option<&'a tokio::sync::oneshot::Sender<Response<ProxyBody>>>,
) -> impl Future<Output = Response<ProxyBody>> + 'a {
    let tries = Attempts::new(&shared.pools[fwd.pool]).for_method(&parts.method);
    // The request travels by value; it comes back from a connection that could not send it.
    let mut req = Some(Request::from_parts(parts, body));
    async move {
        let pool = &shared.pools[fwd.pool];
        let mut attempts = tries;
        loop {
            let attempt = match attempts
                .acquire_forwarded(pool, fwd.pick, &mut fwd.rec)
                .await
            {
                Ok(active) => connect(pool, conn, active, upgrade.is_some()).await,
                Err(failure) => Err(failure),
            };
            let (active, server) = match attempt {
                Ok(a) => a,
                Err(f) if attempts.retry(pool, f, false) => continue,
                Err(f) => return error_response(f, fwd.rec, done),
            };
            fwd.rec.tc = server.connect_time.map_or(0, |d| d.as_millis() as i64);
            if gone.is_some_and(|tx| tx.is_closed()) {
                // Reset before it was sent: the connection serves another request instead.
                if let Sender::H1(h1) = server.sender {
                    pool.conns.put(active.server().addr, h1);
                }
                return error_response(Failure::ClientGone, fwd.rec, done);
            }
            // hyper sends the body and reads the answer as one step: the
            // request is the server's from here.
            fwd.rec.phase = Phase::Headers;
            let sent = Instant::now();
            let reused = server.connect_time.is_none();
            let mut sender = server.sender;
            let h2 = sender.is_h2();
            // No binding for the request being sent: one would keep its
            // storage in this future after the request moved into the send.
            let Some(sending) = req.take().map(|mut out| {
                for_server(&mut out, h2, pool, &fwd.rec);
                let clock = out.body_mut().clock();
                sender.send(out, pool.timeout_server, clock)
            }) else {
                // Unreachable: `req` is put back before every retry.
                return error_response(Failure::Internal, fwd.rec, done);
            };
            let failure = match sending.await {
                Ok(Ok(resp)) => {
                    Attempts::answered(pool, &active);
                    fwd.rec.tr = sent.elapsed().as_millis() as i64;
                    let exchange = Exchange {
                        pool,
                        conn,
                        sender,
                        active,
                        upgrade,
                    };
                    return respond(resp, exchange, fwd, done);
                }
                Ok(Err(mut e)) => {
                    // The client's body broke off or stalled: its doing.
                    if let Some(f) = request_body::client_failure(e.error()) {
                        attempts.ended(pool, f);
                        return error_response(f, fwd.rec, done);
                    }
                    let server = active.server().addr;
                    tracing::debug!(pool = %pool.name, %server, error = %e.error(), "forward failed");
                    // A reused connection that closed before the request went out
                    // (the server's keep-alive ended): sent again on another one.
                    match e.take_message() {
                        Some(back) if attempts.retry(pool, Failure::ServerClosed, reused) => {
                            req = Some(back);
                            continue;
                        }
                        _ => {
                            fwd.rec.tr = sent.elapsed().as_millis() as i64;
                            Failure::BadResponse
                        }
                    }
                }
                Err(_) => {
                    if let Sender::H2(h2) = &sender {
                        pool.conns.retire(active.server().addr, h2);
                    }
                    Failure::ServerTimeout
                }
            };
            attempts.ended(pool, failure);
            return error_response(failure, fwd.rec, done);
        }
    }
}

/// A connection to the attempt's server, kept or new (one of its own for a
/// tunnel, which needs a task of its own).
async fn connect(
    pool: &PoolRuntime,
    conn: &ConnCtx,
    active: Active,
    tunnel: bool,
) -> Result<(Active, Conn), Failure> {
    let addr = active.server().addr;
    match pool.conns.get(addr, conn.peer, conn.local).await {
        Ok(mut c) => {
            if tunnel {
                c.sender = c.sender.for_upgrade();
            }
            Ok((active, c))
        }
        Err(e) => {
            tracing::debug!(pool = %pool.name, server = %addr, error = %e, "connect failed");
            Err(Failure::ConnectFailed)
        }
    }
}

/// The request's whole body, taken out of `body`, when our HTTP/1.1 client
/// (`h1::client`) can send the request: to a pool of HTTP/1.1 servers, not
/// an upgrade, its body in hand (none, or gathered by `request_body`).
/// Otherwise None, and `body` is left as it was for hyper's client.
fn whole_body(
    pool: &PoolRuntime,
    upgrade: &Option<tunnel::Upgrade>,
    body: &mut RequestBody,
) -> Option<Bytes> {
    if pool.h2 || upgrade.is_some() {
        return None;
    }
    match body {
        RequestBody::Whole(data) => Some(data.take().unwrap_or_default()),
        stream if stream.is_end_stream() => Some(Bytes::new()),
        RequestBody::Stream { .. } => None,
    }
}

/// `forward` through our HTTP/1.1 client (`h1::client`), on the raw
/// connections of our HTTP/1 path, for a request whose whole body is in
/// hand (`whole_body`): retries, error answers and the client's reset as
/// there. Not an `async fn`, for the same reason.
fn forward_raw<'a>(
    shared: &'a Shared,
    conn: &'a Arc<ConnCtx>,
    parts: http::request::Parts,
    body: Bytes,
    mut fwd: Forwarding,
    done: Done,
    gone: Option<&'a tokio::sync::oneshot::Sender<Response<ProxyBody>>>,
) -> impl Future<Output = Response<ProxyBody>> + 'a {
    let pool = &shared.pools[fwd.pool];
    async move {
        let mut attempts = Attempts::new(pool).for_method(&parts.method);
        loop {
            let attempt = match attempts
                .acquire_forwarded(pool, fwd.pick, &mut fwd.rec)
                .await
            {
                Ok(active) => connect_raw(pool, conn, active).await,
                Err(failure) => Err(failure),
            };
            let (active, mut server, connect_time) = match attempt {
                Ok(a) => a,
                Err(f) if attempts.retry(pool, f, false) => continue,
                Err(f) => return error_response(f, fwd.rec, done),
            };
            fwd.rec.tc = connect_time.map_or(0, |d| d.as_millis() as i64);
            let addr = active.server().addr;
            if gone.is_some_and(|tx| tx.is_closed()) {
                // Reset before it was sent: the connection serves another request instead.
                pool.conns.put_raw(addr, server);
                return error_response(Failure::ClientGone, fwd.rec, done);
            }
            // The body (in hand) goes out with the head: what is left to wait for is the answer.
            fwd.rec.phase = Phase::Headers;
            let sent = Instant::now();
            let due = tokio::time::Instant::from_std(sent) + pool.timeout_server;
            let head = match client::exchange(&mut server, &parts, &body, due).await {
                Ok(head) => head,
                // A kept connection closed under us: sent again on another
                // one, when it had no body (as on our HTTP/1 path).
                Err(f) if attempts.retry(pool, f, connect_time.is_none() && body.is_empty()) => {
                    continue;
                }
                Err(f) => {
                    tracing::debug!(pool = %pool.name, server = %addr, failure = ?f, "no response");
                    fwd.rec.tr = sent.elapsed().as_millis() as i64;
                    return error_response(f, fwd.rec, done);
                }
            };
            Attempts::answered(pool, &active);
            fwd.rec.tr = sent.elapsed().as_millis() as i64;
            return respond_raw(head, server, pool, active, fwd, done);
        }
    }
}

/// A raw connection to the attempt's server (kept or new), and its connect
/// time when new.
async fn connect_raw(
    pool: &PoolRuntime,
    conn: &ConnCtx,
    active: Active,
) -> Result<(Active, RawConn, Option<Duration>), Failure> {
    let addr = active.server().addr;
    match pool.conns.get_raw(addr, conn.peer, conn.local).await {
        Ok((raw, connect_time)) => Ok((active, raw, connect_time)),
        Err(e) => {
            tracing::debug!(pool = %pool.name, server = %addr, error = %e, "connect failed");
            Err(Failure::ConnectFailed)
        }
    }
}

/// The client's response from a head our HTTP/1.1 client read (its framing
/// checked by the codec): a 101 nobody asked for is a 502, hop-by-hop
/// fields out, response actions applied; the body read off `server`, which
/// goes back to its pool once the body has ended cleanly.
fn respond_raw(
    head: client::ResponseHead,
    server: RawConn,
    pool: &PoolRuntime,
    active: Active,
    mut fwd: Forwarding,
    done: Done,
) -> Response<ProxyBody> {
    let addr = active.server().addr;
    let headers = if head.status == StatusCode::SWITCHING_PROTOCOLS {
        Err("101 to a request that asked for no upgrade")
    } else {
        client::headers(&head)
    };
    let mut headers = match headers {
        Ok(h) => h,
        Err(why) => {
            tracing::debug!(pool = %pool.name, server = %addr, reason = why, "bad response");
            return error_response(Failure::BadResponse, fwd.rec, done);
        }
    };
    let https = done.conn.frontend.https;
    prepare::persist(&mut fwd, (pool, active.server()), https);
    let Forwarding {
        rec,
        response_ops,
        gzip,
        ..
    } = fwd;
    let mut rec = rec.into_record();
    actions::apply_response(&response_ops, &mut headers); // response actions
    rec.status = head.status.as_u16();
    let back = client::GiveBack {
        pool: pool.conns.clone(),
        server: addr,
        keep_alive: head.keep_alive,
    };
    let (body, streams) = match client::RawBody::of(server, &head, back) {
        client::ResponseBody::InHand(bytes) => (whole(bytes), false),
        client::ResponseBody::Read(raw) => (raw.boxed_unsync(), true),
    };
    let frontend = &done.conn.frontend;
    let compression = (frontend.compression.as_ref(), &*frontend.stats);
    let body = compress::response(compression, gzip, head.status, &mut headers, body);
    let mut body = LoggedBody::new(body, rec, Some(active), done);
    if streams {
        body.server_wait = Some(WaitLimit::new(pool.timeout_server));
    }
    let mut resp = Response::new(body);
    *resp.status_mut() = head.status;
    *resp.headers_mut() = headers;
    resp
}

/// Makes the request fit its server connection: HTTP/2 needs :scheme and
/// :authority (the request's own, from its Host settled by `prepare`, never
/// one that disagrees with it); HTTP/1 bodies of unknown length go chunked
/// (hyper would drop them for GET, HEAD and CONNECT).
fn for_server(out: &mut Request<RequestBody>, h2: bool, pool: &PoolRuntime, rec: &AccessRecord) {
    if !h2 {
        let body = out.body();
        if !body.is_end_stream() && body.size_hint().exact().is_none() {
            out.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        return;
    }
    let authority = match out.headers().get(header::HOST) {
        Some(h) => Authority::try_from(h.as_bytes()),
        None => Authority::try_from(rec.server.as_ref()),
    };
    let pq = out.uri().path_and_query().cloned();
    if let (Ok(authority), Some(pq)) = (authority, pq) {
        let mut p = http::uri::Parts::default();
        p.scheme = Some(pool.scheme.clone());
        p.authority = Some(authority);
        p.path_and_query = Some(pq);
        if let Ok(u) = Uri::from_parts(p) {
            *out.uri_mut() = u;
        }
    }
}

/// What answering with a server's response needs of the attempt.
struct Exchange<'a> {
    pool: &'a PoolRuntime,
    conn: &'a ConnCtx,
    sender: Sender,
    active: Active,
    upgrade: Option<tunnel::Upgrade>,
}

/// The client's response from the server's: its framing checked (invalid
/// framing, TE with CL or not ending in chunked, is a 502 and the connection
/// is dropped), hop-by-hop fields and response actions applied, a tunnel
/// for an accepted upgrade, and the server connection to give back.
fn respond(
    resp: Response<Incoming>,
    x: Exchange<'_>,
    mut fwd: Forwarding,
    done: Done,
) -> Response<ProxyBody> {
    let (mut rparts, rbody) = resp.into_parts();
    let te = rparts.headers.get_all(header::TRANSFER_ENCODING);
    let te = te.iter().map(HeaderValue::as_bytes);
    let has_length = rparts.headers.contains_key(header::CONTENT_LENGTH);
    let handshake = switch_checked(&rparts, x.upgrade.as_ref(), fwd.ws_accept.as_ref());
    let defined = match hardening::status_defined(rparts.status) {
        true => Ok(()),
        false => Err("status outside 100..=599"),
    };
    let framing = hardening::response_te(te, has_length)
        .and(handshake)
        .and(defined);
    let addr = x.active.server().addr;
    if let Err(why) = framing {
        tracing::debug!(pool = %x.pool.name, server = %addr, reason = why, "bad response framing");
        return error_response(Failure::BadResponse, fwd.rec, done);
    }
    let https = x.conn.frontend.https;
    prepare::persist(&mut fwd, (x.pool, x.active.server()), https);
    let Forwarding {
        rec,
        response_ops,
        gzip,
        ..
    } = fwd;
    let mut rec = rec.into_record();
    // A 101's protocol, checked above, goes back to the client.
    let switched = rparts.headers.get(header::UPGRADE).cloned();
    prepare::strip_hop_by_hop(&mut rparts.headers);
    let mut shared = None;
    let mut tunnel_log = None;
    let (active, reusable) = match x.upgrade {
        Some(mut u) => {
            if let Some(proto) = switched {
                u.proto = proto;
            }
            let idle = x.pool.timeout_tunnel.or(x.conn.frontend.timeout_tunnel);
            let idle = idle.unwrap_or(tunnel::DEFAULT_TIMEOUT_TUNNEL);
            // An upgraded connection is the tunnel's, never reused.
            let kill = x.conn.frontend.kill.clone();
            let (log_tx, log) = tokio::sync::oneshot::channel();
            let active = u.answer(&mut rparts, &x.conn.activity, (idle, kill), (x.active, log));
            // A tunnel (no Active back) logs the request when it ends.
            tunnel_log = active.is_none().then_some(log_tx);
            (active, None)
        }
        None => {
            let reusable = match x.sender {
                Sender::H1(h1) => Some(Reusable {
                    pool: x.pool.conns.clone(),
                    server: addr,
                    h1,
                }),
                Sender::H2(h2) => {
                    shared = Some(SharedH2::new(x.pool.conns.clone(), addr, h2));
                    None
                }
                Sender::H1Tunnel(_) => None,
            };
            (Some(x.active), reusable)
        }
    };
    actions::apply_response(&response_ops, &mut rparts.headers); // response actions
    rec.status = rparts.status.as_u16();
    let body = rbody.map_err(BoxError::from).boxed_unsync();
    let compression = (
        x.conn.frontend.compression.as_ref(),
        &*x.conn.frontend.stats,
    );
    let body = compress::response(compression, gzip, rparts.status, &mut rparts.headers, body);
    let mut body = LoggedBody::new(body, rec, active, done);
    body.reusable = reusable;
    body.shared = shared;
    body.tunnel = tunnel_log;
    body.server_wait = Some(WaitLimit::new(x.pool.timeout_server));
    Response::from_parts(rparts, body)
}

/// A 101 must answer an upgrade the client asked for (and HTTP/2 has no
/// 101 at all), switch to a protocol it asked for, and carry the right
/// `Sec-WebSocket-Accept`: otherwise it is the server's error, a 502, as on
/// our HTTP/1 path.
fn switch_checked(
    rparts: &http::response::Parts,
    upgrade: Option<&tunnel::Upgrade>,
    ws_accept: Option<&HeaderValue>,
) -> Result<(), &'static str> {
    if rparts.status != StatusCode::SWITCHING_PROTOCOLS {
        return Ok(());
    }
    let u = upgrade.ok_or("101 to a request that asked for no upgrade")?;
    let accepts = rparts.headers.get_all("sec-websocket-accept");
    if !tunnel::accept_matches(ws_accept, accepts.iter().map(HeaderValue::as_bytes)) {
        return Err("bad Sec-WebSocket-Accept");
    }
    tunnel::switched_to(&u.proto, rparts.headers.get(header::UPGRADE))
        .map(drop)
        .ok_or("101 to a protocol the client did not ask for")
}

/// A body of bytes in hand, as `LoggedBody` wraps them.
fn whole(bytes: Bytes) -> UnsyncBoxBody<Bytes, BoxError> {
    Full::new(bytes)
        .map_err(|never| match never {})
        .boxed_unsync()
}

fn error_response(
    failure: Failure,
    rec: impl Into<AccessRecord>,
    done: Done,
) -> Response<ProxyBody> {
    let mut rec = rec.into();
    let status = failure.status();
    rec.status = status.as_u16();
    rec.termination = failure.termination();
    // The frontend's own page for it (`error_pages`), else ours.
    let page = match done.conn.frontend.error_page(status) {
        Some(page) => page,
        None => Bytes::from(failure.page()),
    };
    let body = whole(page);
    let mut resp = Response::new(LoggedBody::new(body, rec, None, done));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

/// Marks the end of a request on its connection.
struct Done {
    conn: Arc<ConnCtx>,
    start: Instant,
    /// When the response ended, if known already (saves reading the clock again).
    end: Option<Instant>,
}

impl Drop for Done {
    fn drop(&mut self) {
        *self
            .conn
            .ready_since
            .lock()
            .unwrap_or_else(|e| e.into_inner()) = self.end.unwrap_or_else(Instant::now);
        let activity = &self.conn.activity;
        if activity.active.fetch_sub(1, Ordering::SeqCst) == 1
            && let Some(w) = activity.idle_waker.lock().ok().and_then(|mut w| w.take())
        {
            w.wake();
        }
    }
}

/// A response body that counts bytes, keeps the server's in-flight count,
/// and writes the access log line when it ends or is dropped.
pub struct LoggedBody {
    inner: UnsyncBoxBody<Bytes, BoxError>,
    rec: Option<AccessRecord>,
    _active: Option<Active>,
    done: Option<Done>,
    /// The server connection, given back to its pool when the body ends cleanly.
    reusable: Option<Reusable>,
    /// The shared HTTP/2 connection the body comes on, taken out of its
    /// pool if a wait for more of the body times out.
    shared: Option<SharedH2>,
    /// `timeout_server` on each wait for more of a server's body (as on
    /// our HTTP/1 path); None for the proxy's own answers.
    server_wait: Option<WaitLimit>,
    /// Data was handed to hyper and no more asked for since: counted in
    /// `Activity::stalled`, where `ClientIo` limits the wait.
    handed: bool,
    /// A 101's: the tunnel it opened, which logs the request at its end.
    tunnel: Option<tokio::sync::oneshot::Sender<tunnel::TunnelLog>>,
}

impl LoggedBody {
    /// An empty body with nothing to log (the answer when a forwarding task failed).
    fn empty() -> Self {
        LoggedBody {
            inner: whole(Bytes::new()),
            rec: None,
            _active: None,
            done: None,
            reusable: None,
            shared: None,
            server_wait: None,
            handed: false,
            tunnel: None,
        }
    }

    fn new(
        inner: UnsyncBoxBody<Bytes, BoxError>,
        rec: AccessRecord,
        active: Option<Active>,
        done: Done,
    ) -> Self {
        let more = !inner.is_end_stream();
        let mut body = LoggedBody {
            inner,
            rec: Some(rec),
            _active: active,
            done: Some(done),
            reusable: None,
            shared: None,
            server_wait: None,
            handed: false,
            tunnel: None,
        };
        // Handed with the head: an HTTP/2 client giving no window from the
        // start has hyper wait for room before it ever asks for the body,
        // and that wait is limited as any other.
        body.hand(more);
        body
    }

    /// Counts the body in or out of its connection's `Activity::stalled`.
    fn hand(&mut self, handed: bool) {
        if self.handed == handed {
            return;
        }
        self.handed = handed;
        if let Some(done) = &self.done {
            let activity = &done.conn.activity;
            if handed {
                activity.stalled.fetch_add(1, Ordering::SeqCst);
            } else {
                activity.stalled.fetch_sub(1, Ordering::SeqCst);
                activity.moved.fetch_add(1, Ordering::SeqCst);
            }
        }
    }

    fn finish(&mut self, term: Option<[char; 2]>) {
        if let Some(r) = self.reusable.take()
            && term.is_none()
        {
            r.give_back();
        }
        // The stream has ended: no longer in flight on its shared connection.
        self.shared = None;
        if let Some(mut rec) = self.rec.take() {
            if let Some(t) = term
                && rec.termination == ['-', '-']
            {
                rec.termination = t;
            }
            match &mut self.done {
                Some(done) => {
                    let now = Instant::now();
                    done.end = Some(now);
                    let tt = now.saturating_duration_since(done.start);
                    let format = done.conn.frontend.log_format;
                    match self.tunnel.take().filter(|_| term.is_none()) {
                        Some(tunnel) => {
                            let log = tunnel::TunnelLog::at_101(rec, (done.start, tt), format);
                            let _ = tunnel.send(log);
                        }
                        None => rec.finish(tt, format),
                    }
                }
                None => {
                    rec.count();
                    rec.emit_as(LogFormat::default());
                }
            }
        }
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.hand(false);
        // The server connection runs in this task: let it read before the body is polled.
        if let Some(r) = &mut self.reusable {
            r.drive(cx);
        }
        let r = Pin::new(&mut self.inner).poll_frame(cx);
        match &r {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(rec), Some(d)) = (self.rec.as_mut(), frame.data_ref()) {
                    rec.bytes += d.len() as u64;
                }
                if self.inner.is_end_stream() {
                    self.finish(None);
                }
                if let Some(w) = &mut self.server_wait {
                    w.progress();
                }
                let more = !self.inner.is_end_stream();
                self.hand(more);
            }
            Poll::Ready(Some(Err(_))) => self.finish(Some(Failure::ServerAborted.termination())),
            Poll::Ready(None) => self.finish(None),
            Poll::Pending => {
                if self
                    .server_wait
                    .as_mut()
                    .is_some_and(|w| w.poll_expired(cx))
                {
                    // The server connection is dropped with the rest of its
                    // body; a shared one is no longer used.
                    if let Some(h2) = self.shared.take() {
                        h2.retire();
                    }
                    self.finish(Some(Failure::ServerDataTimeout.termination()));
                    return Poll::Ready(Some(Err("timeout server during the body".into())));
                }
            }
        }
        r
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.hand(false);
        // Dropped before its end: the client went away mid-response, or
        // took nothing of it for timeout_client.
        // (The hard stop's flag, shared by the proxy's threads, is read only
        // then: not for every answer that ended.)
        let done = self.done.as_ref();
        let term = if self.inner.is_end_stream() {
            None
        } else if done.is_some_and(|d| *d.conn.frontend.kill.borrow()) {
            // Closed at the hard stop after a reload, as HAProxy's.
            Some(['K', 'D'])
        } else if done.is_some_and(|d| d.conn.activity.client_timed_out.load(Ordering::SeqCst)) {
            Some(Failure::ClientTimeout.termination())
        } else {
            Some(Failure::ClientAborted.termination())
        };
        self.finish(term);
    }
}
