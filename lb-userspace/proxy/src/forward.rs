//! Per-request work: route, pick a server, rewrite headers, forward with a
//! pooled client, retry on connect failure, answer errors, log.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, UNIX_EPOCH};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::Authority;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::{Body, Frame, Incoming, SizeHint};

use super::actions;
use super::balance::{Active, Unavailable};
use super::connpool::{Reusable, Sender};
use super::context::{ConnCtx, FrontendCtx, PoolRuntime, Shared};
use super::error;
use super::hardening;
use super::log::{self, AccessRecord, LogFormat};
use super::request_body::{self, RequestBody};
use super::tunnel;
use crate::acl;

/// Body of every response the proxy sends.
pub type ProxyBody = LoggedBody;

type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Headers that describe one hop only (RFC 9110 7.6.1) and never cross the proxy.
/// Typed names: removing by `&str` would parse each name on every request.
pub(crate) const HOP_BY_HOP: [HeaderName; 8] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::PROXY_AUTHENTICATE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
];

/// Removes hop-by-hop headers, including those the Connection header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // A message has a handful of headers: one pass finds which hop-by-hop
    // names are there, and only those are removed (each removal hashes).
    let mut present = 0u8;
    for k in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == k) {
            present |= 1 << i;
        }
    }
    if present == 0 {
        return;
    }
    // Names listed in Connection, beyond its usual `close` and `keep-alive`.
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|v| v.as_bytes().split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|t| {
            !t.is_empty()
                && !t.eq_ignore_ascii_case(b"close")
                && !t.eq_ignore_ascii_case(b"keep-alive")
                && hardening::connection_may_remove(t)
        })
        .filter_map(|t| HeaderName::from_bytes(t).ok())
        .collect();
    for name in &named {
        headers.remove(name);
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`, and sets `X-Forwarded-Proto`.
pub fn add_forwarded(headers: &mut HeaderMap, client: SocketAddr, https: bool) {
    let ip = client.ip();
    let proto = if https { "https" } else { "http" };
    let xff = match headers.get("x-forwarded-for").and_then(|v| v.to_str().ok()) {
        Some(prev) => format!("{prev}, {ip}"),
        None => ip.to_string(),
    };
    // IPv6 in Forwarded must be bracketed and quoted (RFC 7239 section 6).
    let node = if ip.is_ipv6() {
        format!("\"[{ip}]\"")
    } else {
        ip.to_string()
    };
    let fwd = format!("for={node};proto={proto}");
    if let Ok(v) = HeaderValue::from_str(&xff) {
        headers.insert("x-forwarded-for", v);
    }
    headers.insert("x-forwarded-proto", HeaderValue::from_static(proto));
    if let Ok(v) = HeaderValue::from_str(&fwd) {
        headers.append(header::FORWARDED, v);
    }
}

/// The client side of a request, as actions and routing see it.
pub(crate) struct ClientSide<'a> {
    pub frontend: &'a FrontendCtx,
    pub peer: SocketAddr,
    /// The address the client connected to: the authority of a request that names none.
    pub local: SocketAddr,
    pub sni: Option<&'a str>,
}

/// What the proxy does with a request once its actions and routing have run.
pub(crate) enum Prepared {
    /// A request action answered it (deny, redirect, return, auth); it is not forwarded.
    Answer(Response<Full<Bytes>>, AccessRecord),
    /// It cannot be forwarded: answer with this status and termination state.
    Refuse(StatusCode, AccessRecord, [char; 2]),
    /// Forward it to a server of a pool.
    Forward(Forwarding),
}

/// A request ready to go to a pool: its head is rewritten for the server.
pub(crate) struct Forwarding {
    /// Index of the pool in `Shared::pools`.
    pub pool: usize,
    pub rec: AccessRecord,
    /// Hash key for the hashing algorithms.
    pub key: Option<u32>,
    /// Response header edits whose condition held.
    pub response_ops: Vec<actions::HeaderOp>,
    /// The `Sec-WebSocket-Accept` a `101` must carry (WebSocket upgrades).
    pub ws_accept: Option<HeaderValue>,
}

/// Runs a request's actions, routes it and rewrites its head for the server
/// (hop-by-hop headers out, forwarded headers in, Host, origin-form URI,
/// HTTP/1.1). `upgrade` is the protocol of an Upgrade request, whose headers
/// are kept. Shared by hyper's path and ours (proxy/h1.rs).
pub(crate) async fn prepare(
    shared: &Shared,
    client: ClientSide<'_>,
    parts: &mut http::request::Parts,
    tq: i64,
    upgrade: Option<&HeaderValue>,
) -> Prepared {
    let frontend = client.frontend;
    let checked = settle_authority(parts, client.local).and_then(|()| match upgrade {
        Some(proto) => tunnel::websocket_accept(&parts.headers, proto),
        None => Ok(None),
    });
    let ws_accept = match checked {
        Ok(accept) => accept,
        Err(why) => {
            tracing::debug!(frontend = %frontend.name, peer = %client.peer, reason = why, "request rejected");
            let rec = record(frontend, frontend.name.clone(), client.peer, parts, tq);
            return Prepared::Refuse(StatusCode::BAD_REQUEST, rec, ['P', 'R']);
        }
    };
    // --- request actions (proxy/actions.rs): rewrite `parts` before routing, or answer ---
    let acted = match &frontend.actions {
        Some(a) => a.run_request(parts, client.peer, client.sni).await,
        None => actions::Outcome::default(),
    };
    // --- end request actions ---
    // The authority settled above (actions may have changed it since): a refcounted copy.
    let host: Option<HeaderValue> = parts.headers.get(header::HOST).cloned();
    let pool_idx = shared
        .route
        .as_ref()
        .and_then(|route| {
            route(
                frontend.index,
                &acl::Request {
                    method: parts.method.as_str(),
                    path: parts.uri.path(),
                    query: parts.uri.query(),
                    host: host.as_ref().and_then(|h| h.to_str().ok()),
                    headers: &parts.headers,
                    src: client.peer.ip(),
                    sni: client.sni,
                },
            )
        })
        .filter(|&i| i < shared.pools.len())
        .unwrap_or(frontend.default_pool);
    let pool = &shared.pools[pool_idx];
    let mut rec = record(frontend, pool.name.clone(), client.peer, parts, tq);
    // --- terminal request action (proxy/actions.rs): answered here, never forwarded ---
    if let Some((answer, term)) = acted.answer {
        rec.pool = frontend.name.clone();
        rec.status = answer.status().as_u16();
        rec.termination = term;
        return Prepared::Answer(answer, rec);
    }
    // --- end terminal request action ---

    strip_hop_by_hop(&mut parts.headers);
    if let Some(proto) = upgrade {
        tunnel::restore(&mut parts.headers, proto);
    }
    if frontend.forwarded_headers {
        add_forwarded(&mut parts.headers, client.peer, frontend.https);
    }
    // A `del-header host` action leaves the server none: put the settled one back.
    if !parts.headers.contains_key(header::HOST)
        && let Some(v) = host
    {
        parts.headers.insert(header::HOST, v);
    }

    let key = pool
        .balancer
        .hash_key(client.peer.ip(), &parts.uri, &parts.headers);
    // HTTP/1.1 servers get origin-form (`/path?query`); CONNECT keeps its authority-form.
    if parts.method != Method::CONNECT
        && (parts.uri.scheme().is_some() || parts.uri.authority().is_some())
    {
        let origin = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        match Uri::try_from(origin) {
            Ok(u) => parts.uri = u,
            Err(_) => return Prepared::Refuse(StatusCode::BAD_REQUEST, rec, ['P', 'R']),
        }
    }
    parts.version = Version::HTTP_11;
    Prepared::Forward(Forwarding {
        pool: pool_idx,
        rec,
        key,
        response_ops: acted.response,
        ws_accept,
    })
}

/// The access log record of a request to `pool`, before a server is known.
fn record(
    frontend: &FrontendCtx,
    pool: Arc<str>,
    client: SocketAddr,
    parts: &http::request::Parts,
    tq: i64,
) -> AccessRecord {
    AccessRecord {
        client,
        // Set when the record is emitted (then minus Tt): no clock read per request unlogged.
        date: UNIX_EPOCH,
        frontend: frontend.name.clone(),
        pool,
        server: log::no_server(),
        tq,
        tw: 0,
        tc: -1,
        tr: -1,
        tt: -1,
        status: 0,
        bytes: 0,
        termination: ['-', '-'],
        method: Some(parts.method.clone()),
        uri: Some(parts.uri.clone()),
        version: Some(parts.version),
    }
}

/// Settles which authority a request is for, before anything looks at it
/// (RFC 9112 3.2.2, RFC 9113 8.3.1): the target's authority (absolute-form,
/// or HTTP/2's `:authority`) wins over Host, and Host is rewritten to it;
/// a request that names none (HTTP/1.0 without Host) gets the address the
/// client connected to. Either must be `host[:port]`. Also refuses HTTP/2 `PRI` and `CONNECT`
/// and joins HTTP/2's split `cookie` fields into one (RFC 9113 8.2.3), as
/// HTTP/1.1 servers expect.
pub(crate) fn settle_authority(
    parts: &mut http::request::Parts,
    local: SocketAddr,
) -> Result<(), &'static str> {
    // An HTTP/1 head's method, target and Host were checked as it was parsed
    // (`hardening::check_target`, `framing_of`): only HTTP/2's are checked here.
    let h2 = parts.version == Version::HTTP_2;
    if h2 && (parts.method.as_str() == "PRI" || parts.method == Method::CONNECT) {
        return Err("PRI or CONNECT");
    }
    let valid = |v: &[u8]| !h2 || hardening::valid_authority(v);
    if let Some(authority) = parts.uri.authority() {
        let authority = authority.as_str();
        if !valid(authority.as_bytes()) {
            return Err("bad authority");
        }
        let mut hosts = parts.headers.get_all(header::HOST).iter();
        let same = matches!((hosts.next(), hosts.next()), (Some(h), None) if h == authority);
        if !same {
            let value = HeaderValue::from_str(authority).map_err(|_| "bad authority")?;
            parts.headers.insert(header::HOST, value);
        }
    } else {
        let mut hosts = parts.headers.get_all(header::HOST).iter();
        match (hosts.next(), hosts.next()) {
            (Some(h), None) if valid(h.as_bytes()) => {}
            (Some(_), _) => return Err("bad or repeated Host"),
            (None, _) => {
                let value = HeaderValue::from_str(&local.to_string()).map_err(|_| "bad address")?;
                parts.headers.insert(header::HOST, value);
            }
        }
    }
    if h2 {
        let mut cookies = parts.headers.get_all(header::COOKIE).iter();
        if let (Some(_), Some(_)) = (cookies.next(), cookies.next()) {
            let joined = parts
                .headers
                .get_all(header::COOKIE)
                .iter()
                .map(HeaderValue::as_bytes)
                .collect::<Vec<_>>()
                .join(&b"; "[..]);
            let value = HeaderValue::from_bytes(&joined).map_err(|_| "bad cookie")?;
            parts.headers.insert(header::COOKIE, value);
        }
    }
    Ok(())
}

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
        sni: conn.sni.as_deref(),
    };
    let prepared = prepare(
        &shared,
        client,
        &mut parts,
        tq,
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
        Prepared::Refuse(status, rec, term) => {
            return Ok(error_response(status, rec, term, done));
        }
    };
    if !h2_client {
        let body = body.into();
        return Ok(forward(&shared, &conn, parts, body, fwd, upgrade, done, None).await);
    }
    let body = request_body::in_hand(body).await;
    // An HTTP/2 stream can be reset at any time, which drops this future:
    // the exchange with the server runs in a task of its own, so a reset
    // neither abandons a connection being opened nor one whose response is
    // under way (both go back to the pool), and a request not sent yet is
    // not sent at all (rapid reset, CVE-2023-44487).
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task_shared = shared.clone();
    let pool_idx = fwd.pool;
    tokio::spawn(async move {
        let resp = forward(
            &task_shared,
            &conn,
            parts,
            body,
            fwd,
            upgrade,
            done,
            Some(&tx),
        )
        .await;
        if let Err(resp) = tx.send(resp) {
            drain(resp.into_body(), task_shared.pools[pool_idx].timeout_server).await;
        }
    });
    Ok(match rx.await {
        Ok(resp) => resp,
        // The task panicked: nothing was logged for it.
        Err(_) => {
            let mut resp = Response::new(LoggedBody::empty());
            *resp.status_mut() = StatusCode::BAD_GATEWAY;
            resp
        }
    })
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
#[allow(clippy::too_many_arguments)]
async fn forward(
    shared: &Shared,
    conn: &Arc<ConnCtx>,
    parts: http::request::Parts,
    body: RequestBody,
    fwd: Forwarding,
    mut upgrade: Option<tunnel::Upgrade>,
    done: Done,
    gone: Option<&tokio::sync::oneshot::Sender<Response<ProxyBody>>>,
) -> Response<ProxyBody> {
    let Forwarding {
        pool: pool_idx,
        mut rec,
        key,
        response_ops,
        ws_accept,
    } = fwd;
    let pool = &shared.pools[pool_idx];
    // The request travels by value; it comes back from a connection that could not send it.
    let mut req = Some(Request::from_parts(parts, body));
    let mut attempts = Attempts::new(pool);
    loop {
        let active = match attempts.acquire(pool, key, &mut rec).await {
            Ok(a) => a,
            Err((status, term)) => return error_response(status, rec, term, done),
        };
        let addr = active.server().addr;
        let mut server = match pool.conns.get(addr, conn.peer, conn.local).await {
            // The connection will become the tunnel's: it needs a task of its own.
            Ok(mut c) if upgrade.is_some() => {
                c.sender = c.sender.for_upgrade();
                c
            }
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(pool = %pool.name, server = %addr, error = %e, "connect failed");
                if attempts.redispatch() {
                    continue;
                }
                // Like HAProxy: a server that cannot be reached is a 503 (SC).
                return error_response(StatusCode::SERVICE_UNAVAILABLE, rec, ['S', 'C'], done);
            }
        };
        rec.tc = server.connect_time.map_or(0, |d| d.as_millis() as i64);
        let Some(mut out) = req.take() else {
            // Unreachable: `req` is put back before every retry.
            return error_response(StatusCode::BAD_GATEWAY, rec, ['P', 'H'], done);
        };
        if server.sender.is_h2() {
            // HTTP/2 needs :scheme and :authority: the request's own (its Host,
            // settled by `prepare`), never one that disagrees with its Host.
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

        if gone.is_some_and(|tx| tx.is_closed()) {
            // Reset before it was sent: the connection serves another request instead.
            if let Sender::H1(h1) = server.sender {
                pool.conns.put(addr, h1);
            }
            return error_response(StatusCode::BAD_GATEWAY, rec, ['C', 'C'], done);
        }
        // hyper would send a body of unknown length (HTTP/2 without
        // content-length, a chunked HTTP/1 one) chunked, but drop it for
        // GET, HEAD and CONNECT: say chunked, so no byte is lost.
        let body = out.body();
        if !server.sender.is_h2() && !body.is_end_stream() && body.size_hint().exact().is_none() {
            out.headers_mut().insert(
                header::TRANSFER_ENCODING,
                HeaderValue::from_static("chunked"),
            );
        }
        let sent = Instant::now();
        match server.sender.send(out, pool.timeout_server).await {
            Ok(Ok(resp)) => {
                rec.tr = sent.elapsed().as_millis() as i64;
                let (mut rparts, rbody) = resp.into_parts();
                // Invalid framing (TE with CL, TE not ending in one chunked) is a 502;
                // the connection is dropped, not reused.
                let te = rparts.headers.get_all(header::TRANSFER_ENCODING);
                let te = te.iter().map(HeaderValue::as_bytes);
                let has_length = rparts.headers.contains_key(header::CONTENT_LENGTH);
                let handshake = rparts.status != StatusCode::SWITCHING_PROTOCOLS
                    || tunnel::accept_matches(
                        ws_accept.as_ref(),
                        rparts
                            .headers
                            .get_all("sec-websocket-accept")
                            .iter()
                            .map(HeaderValue::as_bytes),
                    );
                let framing = hardening::response_te(te, has_length)
                    .and_then(|_| handshake.then_some(()).ok_or("bad Sec-WebSocket-Accept"));
                if let Err(why) = framing {
                    tracing::debug!(pool = %pool.name, server = %addr, reason = why, "bad response framing");
                    return error_response(StatusCode::BAD_GATEWAY, rec, ['S', 'H'], done);
                }
                strip_hop_by_hop(&mut rparts.headers);
                let (active, reusable) = match upgrade.take() {
                    Some(u) => {
                        let idle = pool.timeout_tunnel.or(conn.frontend.timeout_tunnel);
                        let idle = idle.unwrap_or(tunnel::DEFAULT_TIMEOUT_TUNNEL);
                        // An upgraded connection is the tunnel's, never reused.
                        (u.answer(&mut rparts, &conn.activity, idle, active), None)
                    }
                    None => {
                        let reusable = match server.sender {
                            Sender::H1(h1) => Some(Reusable {
                                pool: pool.conns.clone(),
                                server: addr,
                                h1,
                            }),
                            Sender::H1Tunnel(_) | Sender::H2(_) => None,
                        };
                        (Some(active), reusable)
                    }
                };
                actions::apply_response(&response_ops, &mut rparts.headers); // response actions
                rec.status = rparts.status.as_u16();
                let mut body = LoggedBody::new(
                    rbody.map_err(BoxError::from).boxed_unsync(),
                    rec,
                    active,
                    done,
                );
                body.reusable = reusable;
                return Response::from_parts(rparts, body);
            }
            Ok(Err(mut e)) => {
                tracing::debug!(pool = %pool.name, server = %addr, error = %e.error(), "forward failed");
                // A reused connection that closed before the request went out
                // (the server's keep-alive ended): send it again on another one.
                if let Some(back) = e.take_message()
                    && server.connect_time.is_none()
                    && attempts.more()
                {
                    req = Some(back);
                    continue;
                }
                rec.tr = sent.elapsed().as_millis() as i64;
                return error_response(StatusCode::BAD_GATEWAY, rec, ['S', 'H'], done);
            }
            Err(_) => {
                return error_response(StatusCode::GATEWAY_TIMEOUT, rec, ['s', 'H'], done);
            }
        }
    }
}

/// The tries of one request at a pool's servers: `retries` more after the
/// first, each connect failure redispatched to a server not tried yet.
pub(crate) struct Attempts {
    /// Servers (indexes) whose connection failed.
    tried: Vec<usize>,
    /// Attempts left after the current one.
    left: u32,
    /// The server of the current attempt.
    current: usize,
}

impl Attempts {
    pub(crate) fn new(pool: &PoolRuntime) -> Self {
        Attempts {
            tried: Vec::new(),
            left: pool.retries.saturating_add(1),
            current: 0,
        }
    }

    /// Starts an attempt: a server below its maxconn (waiting in the pool's
    /// queue for one), recorded in `rec` with the wait; Err is the answer
    /// when there is none.
    pub(crate) async fn acquire(
        &mut self,
        pool: &PoolRuntime,
        key: Option<u32>,
        rec: &mut AccessRecord,
    ) -> Result<Active, (StatusCode, [char; 2])> {
        self.left = self.left.saturating_sub(1);
        match pool.balancer.acquire(key, &self.tried).await {
            Ok(a) => {
                rec.tw += a.queued.as_millis() as i64;
                rec.server = a.active.server().label.clone();
                self.current = a.index;
                Ok(a.active)
            }
            Err(e) => Err(unavailable(e, rec)),
        }
    }

    /// After a failed connect: whether to try again, avoiding this server.
    pub(crate) fn redispatch(&mut self) -> bool {
        self.tried.push(self.current);
        self.more()
    }

    /// Whether another attempt is allowed.
    pub(crate) fn more(&self) -> bool {
        self.left > 0
    }
}

/// The answer to a request no server could take: 503, with why (no server
/// up: SC; the queue timed out: sQ, its wait added to Tw).
fn unavailable(e: Unavailable, rec: &mut AccessRecord) -> (StatusCode, [char; 2]) {
    let term = match e {
        Unavailable::NoServer => ['S', 'C'],
        Unavailable::QueueTimeout(waited) => {
            rec.tw += waited.as_millis() as i64;
            ['s', 'Q']
        }
    };
    (StatusCode::SERVICE_UNAVAILABLE, term)
}

fn error_response(
    status: StatusCode,
    mut rec: AccessRecord,
    term: [char; 2],
    done: Done,
) -> Response<ProxyBody> {
    rec.status = status.as_u16();
    rec.termination = term;
    let page = error::page(status);
    let body = Full::new(Bytes::from(page))
        .map_err(|never| match never {})
        .boxed_unsync();
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
}

impl LoggedBody {
    /// An empty body with nothing to log (the answer when a forwarding task failed).
    fn empty() -> Self {
        LoggedBody {
            inner: Full::new(Bytes::new())
                .map_err(|never| match never {})
                .boxed_unsync(),
            rec: None,
            _active: None,
            done: None,
            reusable: None,
        }
    }

    fn new(
        inner: UnsyncBoxBody<Bytes, BoxError>,
        rec: AccessRecord,
        active: Option<Active>,
        done: Done,
    ) -> Self {
        LoggedBody {
            inner,
            rec: Some(rec),
            _active: active,
            done: Some(done),
            reusable: None,
        }
    }

    fn finish(&mut self, term: Option<[char; 2]>) {
        if let Some(r) = self.reusable.take()
            && term.is_none()
        {
            r.give_back();
        }
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
                    rec.finish(tt, done.conn.frontend.log_format);
                }
                None => rec.emit_as(LogFormat::default()),
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
            }
            Poll::Ready(Some(Err(_))) => self.finish(Some(['S', 'D'])),
            Poll::Ready(None) => self.finish(None),
            Poll::Pending => {}
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
        // Dropped before its end: the client went away mid-response.
        let term = if self.inner.is_end_stream() {
            None
        } else {
            Some(['C', 'D'])
        };
        self.finish(term);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_removed() {
        let mut h = HeaderMap::new();
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("x-kept", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("x-kept"));
        // Connection never removes the framing fields or Host.
        for named in [
            "content-length",
            "close, Content-Length",
            "host",
            "keep-alive, host",
        ] {
            let mut h = HeaderMap::new();
            h.insert("connection", HeaderValue::from_static(named));
            h.insert("content-length", HeaderValue::from_static("5"));
            h.insert("host", HeaderValue::from_static("x"));
            strip_hop_by_hop(&mut h);
            assert!(
                h.contains_key("content-length") && h.contains_key("host"),
                "{named}"
            );
        }
    }

    #[test]
    fn forwarded_appends() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("1.1.1.1"));
        add_forwarded(&mut h, "[2001:db8::1]:5000".parse().unwrap(), true);
        assert_eq!(h["x-forwarded-for"], "1.1.1.1, 2001:db8::1");
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["forwarded"], "for=\"[2001:db8::1]\";proto=https");
    }
}
