//! Request preparation shared by our HTTP/1 path (`h1`) and hyper's
//! (`forward`): hop-by-hop and forwarding headers, the request's actions and
//! routing (`prepare`), and its attempts at the pool's servers (`Attempts`).

use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Response, Uri, Version};
use http_body_util::Full;

use super::actions;
use super::balance::{Active, Pick, ServerState, Unavailable};
use super::context::{FrontendCtx, PoolRuntime, Shared};
use super::error::{Failure, Phase, Retry};
use super::hardening;
use super::log::{AccessRecord, RequestId, Unfinished};
use super::tls::TlsFacts;
use super::tunnel;
use crate::acl;
use crate::stats::Tally;

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
    strip_connection_named(headers);
    remove_hop_by_hop_fields(headers);
}

/// Removes the fields the Connection header names, beyond its usual
/// `close` and `keep-alive` (never the framing fields or Host), leaving
/// Connection itself. A request's go before the proxy adds its own, which
/// a client's Connection must not name away.
pub(crate) fn strip_connection_named(headers: &mut HeaderMap) {
    if !headers.contains_key(header::CONNECTION) {
        return;
    }
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
        // Hop-by-hop fields of their own go with the rest.
        .filter(|n| !HOP_BY_HOP.contains(n))
        .collect();
    for name in &named {
        headers.remove(name);
    }
}

/// Removes the hop-by-hop fields of `HOP_BY_HOP`.
pub(crate) fn remove_hop_by_hop_fields(headers: &mut HeaderMap) {
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
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
}

/// Removes a client's fields whose names differ from one in `owned` (the
/// proxy's to write) only by `_` for `-`, as `X_SSL_Client_Cert`: servers
/// behind CGI-style interfaces (PHP, WSGI, Rack) read both as one
/// variable, and the client's could win. nginx drops every such field by
/// default (`underscores_in_headers off`); these are the ones that matter.
pub(crate) fn drop_look_alikes(headers: &mut HeaderMap, owned: &[HeaderName]) {
    let twin = |k: &HeaderName| {
        let k = k.as_str();
        k.contains('_')
            && owned.iter().any(|o| {
                let o = o.as_str();
                o.len() == k.len()
                    && o.bytes()
                        .zip(k.bytes())
                        .all(|(a, b)| a == b || (a == b'-' && b == b'_'))
            })
    };
    if owned.is_empty() || !headers.keys().any(twin) {
        return;
    }
    let twins: Vec<HeaderName> = headers.keys().filter(|k| twin(k)).cloned().collect();
    for name in &twins {
        headers.remove(name);
    }
}

/// Appends the client to `X-Forwarded-For` and `Forwarded`, and sets `X-Forwarded-Proto`.
pub fn add_forwarded(headers: &mut HeaderMap, client: SocketAddr, https: bool) {
    // IPv4-mapped IPv6 (a dual-stack bind) is the IPv4 client it maps.
    let ip = client.ip().to_canonical();
    let proto = if https { "https" } else { "http" };
    // Every field line of the client's, in order (RFC 9110 5.3): each
    // may be a hop's.
    let mut prev = headers
        .get_all("x-forwarded-for")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .fold(String::new(), |mut all, v| {
            if !all.is_empty() {
                all.push_str(", ");
            }
            all.push_str(v);
            all
        });
    let xff = if prev.is_empty() {
        ip.to_string()
    } else {
        prev.push_str(", ");
        prev.push_str(&ip.to_string());
        prev
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
    /// What the TLS handshake established (None: cleartext).
    pub tls: Option<&'a TlsFacts>,
    /// The request body's length as its head declared it, when the caller
    /// has parsed that already (our HTTP/1 path; 0 for chunked): the
    /// access record's bytes in, without looking Content-Length up again.
    pub body_length: Option<u64>,
}

impl ClientSide<'_> {
    /// The TLS server name the client asked for.
    fn sni(&self) -> Option<&str> {
        self.tls.and_then(|t| t.sni.as_deref())
    }

    /// Whether the client presented a verified certificate.
    fn client_cert(&self) -> bool {
        self.tls.is_some_and(|t| t.client_cert)
    }

    /// The frontend's `client_cert_header`: the verified client
    /// certificate, never the client's own claim of one.
    fn set_cert_header(&self, headers: &mut HeaderMap) {
        if let Some(name) = &self.frontend.client_cert_header {
            headers.remove(name);
            if let Some(v) = self.tls.and_then(|t| t.cert_value.clone()) {
                headers.insert(name.clone(), v);
            }
        }
    }
}

/// What the proxy does with a request once its actions and routing have run.
pub(crate) enum Prepared {
    /// A request action answered it (deny, redirect, return, auth); it is not forwarded.
    Answer(Response<Full<Bytes>>, AccessRecord),
    /// It cannot be forwarded: answer the failure.
    Refuse(Failure, AccessRecord),
    /// Forward it to a server of a pool.
    Forward(Forwarding),
}

/// A request ready to go to a pool: its head is rewritten for the server.
pub(crate) struct Forwarding {
    /// Index of the pool in `Shared::pools`.
    pub pool: usize,
    /// Logged as cut if dropped before an answer or failure takes it.
    pub rec: Unfinished,
    /// How its server is chosen: the hash key of the hashing algorithms,
    /// the server its persistence cookie names.
    pub pick: Pick,
    /// Response header edits whose condition held.
    pub response_ops: Vec<actions::HeaderOp>,
    /// The `Sec-WebSocket-Accept` a `101` must carry (WebSocket upgrades).
    pub ws_accept: Option<HeaderValue>,
    /// The client takes a gzip answer and the frontend compresses (compress.rs).
    pub gzip: bool,
}

/// The pool the frontend's `use_pool` rules choose, else its default pool.
fn route(
    shared: &Shared,
    client: &ClientSide<'_>,
    parts: &http::request::Parts,
    host: Option<&HeaderValue>,
    rates: &[(std::time::Duration, u32)],
) -> usize {
    let req = acl::Request {
        method: parts.method.as_str(),
        path: parts.uri.path(),
        query: parts.uri.query(),
        host: host.and_then(|h| h.to_str().ok()),
        headers: &parts.headers,
        src: client.peer.ip(),
        sni: client.sni(),
        client_cert: client.client_cert(),
        src_request_rates: rates,
    };
    shared.pool_for(client.frontend, &req)
}

/// Runs a request's actions, routes it and rewrites its head for the server
/// (hop-by-hop headers out, forwarded headers in, Host, origin-form URI,
/// HTTP/1.1). `tq` is the request's Tq, `start` when its Tt began;
/// `upgrade` is the protocol of an Upgrade request, whose headers
/// are kept. Shared by hyper's path and ours (proxy/h1.rs).
pub(crate) async fn prepare(
    shared: &Shared,
    client: ClientSide<'_>,
    parts: &mut http::request::Parts,
    (tq, start): (i64, std::time::Instant),
    upgrade: Option<&HeaderValue>,
) -> Prepared {
    let frontend = client.frontend;
    let ws_accept = match checked(&client, parts, upgrade) {
        Ok(accept) => accept,
        Err(failure) => {
            let rec = record(&client, frontend.name.clone(), parts, tq);
            return Prepared::Refuse(failure, rec);
        }
    };
    // What the client's Connection names goes before the proxy adds its
    // own fields (the certificate's, the rules'), which it must not name away.
    strip_connection_named(&mut parts.headers);
    drop_look_alikes(&mut parts.headers, &frontend.owned_headers);
    client.set_cert_header(&mut parts.headers);
    // Counted before any rule looks, whichever rules the request meets.
    let rates = frontend.count_request(client.peer.ip());
    // Made before the rules, which may name it (`%[unique-id]`).
    let unique_id = frontend
        .request_id_header
        .as_ref()
        .map(|_| RequestId::new());
    // --- request actions (proxy/actions.rs): rewrite `parts` before routing, or answer ---
    let acted = match &frontend.actions {
        Some(a) => {
            let conn = actions::Connection {
                peer: client.peer,
                local: client.local,
                tls: client.tls.map(|t| t.sni.as_deref()),
                unique_id,
            };
            a.run_request(parts, conn, (client.sni(), client.client_cert()), &rates)
                .await
        }
        None => actions::Outcome::default(),
    };
    // --- end request actions ---
    // The authority settled above (actions may have changed it since): a refcounted copy.
    let host: Option<HeaderValue> = parts.headers.get(header::HOST).cloned();
    let pool_idx = route(shared, &client, parts, host.as_ref(), &rates);
    let pool = &shared.pools[pool_idx];
    let mut rec = record(&client, pool.name.clone(), parts, tq);
    rec.tally.pool = Some(pool.stats.shard());
    let mut response_ops = acted.response;
    let id = request_id(frontend, unique_id, &mut rec, &mut response_ops);
    // --- terminal request action (proxy/actions.rs): answered here, never forwarded ---
    if let Some(answered) = acted.answer {
        return local_answer(frontend, answered, rec, id);
    }
    // --- end terminal request action ---

    remove_hop_by_hop_fields(&mut parts.headers);
    if let Some(proto) = upgrade {
        tunnel::restore(&mut parts.headers, proto);
    }
    if frontend.forwarded_headers {
        add_forwarded(&mut parts.headers, client.peer, frontend.https);
    }
    // A client's own is replaced (only ours is unique), after the
    // hop-by-hop fields went: its Connection cannot name ours away.
    actions::apply_response(id.as_slice(), &mut parts.headers);
    // A `del-header host` action leaves the server none: put the settled one back.
    if !parts.headers.contains_key(header::HOST)
        && let Some(v) = host
    {
        parts.headers.insert(header::HOST, v);
    }

    let pick = pick(pool, client.peer, parts, &mut rec);
    // HTTP/1.1 servers get origin-form (`/path?query`); CONNECT keeps its authority-form.
    if parts.method != Method::CONNECT
        && (parts.uri.scheme().is_some() || parts.uri.authority().is_some())
    {
        match origin_form(&parts.uri) {
            Ok(u) => parts.uri = u,
            Err(_) => return Prepared::Refuse(Failure::BadRequest, rec),
        }
    }
    parts.version = Version::HTTP_11;
    let rec = Unfinished::new(rec, start, frontend.log_format, &frontend.kill);
    Prepared::Forward(Forwarding {
        pool: pool_idx,
        rec,
        pick,
        response_ops,
        gzip: upgrade.is_none()
            && frontend.compression.is_some()
            && super::compress::wanted(&parts.method, &parts.headers),
        ws_accept,
    })
}

/// The request's authority settled (`settle_authority`), then checked
/// against the connection's TLS certificate (`TlsFacts::misdirected`), and
/// its upgrade's: the WebSocket accept value, if any, or the failure that
/// answers it.
fn checked(
    client: &ClientSide<'_>,
    parts: &mut http::request::Parts,
    upgrade: Option<&HeaderValue>,
) -> Result<Option<HeaderValue>, Failure> {
    let h2 = match parts.version {
        Version::HTTP_2 => hardening::check_h2_request(parts),
        _ => Ok(()),
    };
    let checked = h2
        .and_then(|()| settle_authority(parts, client.local))
        .and_then(|()| match upgrade {
            Some(proto) => tunnel::websocket_accept(&parts.headers, proto),
            None => Ok(None),
        });
    let accept = checked.map_err(|why| {
        tracing::debug!(frontend = %client.frontend.name, peer = %client.peer, reason = why, "request rejected");
        Failure::BadRequest
    })?;
    if let Some(tls) = client.tls
        && let Some(host) = parts.headers.get(header::HOST)
        && tls.misdirected(host.to_str().unwrap_or(""))
    {
        return Err(Failure::Misdirected);
    }
    Ok(accept)
}

/// The origin-form (`/path?query`) of an absolute-form target. An empty
/// path is sent as "/" (RFC 9112 3.2.1): `http://h?q` is `/?q`, which
/// `path_and_query` alone (`?q`) is not.
fn origin_form(uri: &Uri) -> Result<Uri, http::uri::InvalidUri> {
    Uri::try_from(crate::acl::origin_target(uri).as_ref())
}

/// With `request_id_header`: the request's unique ID, in the log and in
/// the answer (after the response actions, so it is the one the client
/// sees: pushed on `response_ops`); the header to set for the server.
fn request_id(
    frontend: &FrontendCtx,
    id: Option<RequestId>,
    rec: &mut AccessRecord,
    response_ops: &mut Vec<actions::HeaderOp>,
) -> Option<actions::HeaderOp> {
    let (name, id) = (frontend.request_id_header.as_ref()?, id?);
    rec.request_id = Some(id);
    let value = HeaderValue::from_str(&id.to_string()).ok()?;
    let op = actions::HeaderOp::Set(name.clone(), value);
    response_ops.push(op.clone());
    Some(op)
}

/// A request answered by a request action (deny, auth, redirect, return):
/// a page of ours gets the frontend's own, if it has one.
fn local_answer(
    frontend: &FrontendCtx,
    (mut answer, term): (Response<Full<Bytes>>, [char; 2]),
    mut rec: AccessRecord,
    id: Option<actions::HeaderOp>,
) -> Prepared {
    actions::apply_response(id.as_slice(), answer.headers_mut());
    if term == ['P', 'R']
        && let Some(page) = frontend.error_page(answer.status())
    {
        *answer.body_mut() = Full::new(page);
    }
    rec.pool = frontend.name.clone();
    rec.tally.pool = None;
    rec.status = answer.status().as_u16();
    rec.termination = term;
    Prepared::Answer(answer, rec)
}

/// How the request's server is to be chosen in `pool`: its hash key, the
/// server its persistence cookie names.
fn pick(
    pool: &PoolRuntime,
    peer: SocketAddr,
    parts: &mut http::request::Parts,
    rec: &mut AccessRecord,
) -> Pick {
    let sticky = pool
        .cookie
        .as_deref()
        .and_then(|name| sticky_server(pool, name, &mut parts.headers, rec));
    Pick {
        key: pool
            .balancer
            .hash_key(peer.ip(), &parts.uri, &parts.headers),
        sticky,
    }
}

/// The server a request's persistence cookie `name` names, if it takes
/// requests, noted in `rec` (HAProxy's third termination character). The
/// cookie is taken out of the request: it is ours, not the server's
/// (HAProxy's `indirect`).
fn sticky_server(
    pool: &PoolRuntime,
    name: &str,
    headers: &mut HeaderMap,
    rec: &mut AccessRecord,
) -> Option<SocketAddr> {
    let value = take_cookie(headers, name);
    let named = value.as_deref().map(|v| pool.balancer.by_cookie(v));
    let (state, sticky) = match named {
        None => ('N', None),
        Some(None) => ('I', None),
        Some(Some(s)) if s.takes_sticky() => ('V', Some(s.addr)),
        Some(Some(_)) => ('D', None),
    };
    rec.persistence = [state, 'N'];
    sticky
}

/// Removes every `name=value` pair from the Cookie fields of `headers`
/// (a field left empty goes too); the first one's value.
pub(crate) fn take_cookie(headers: &mut HeaderMap, name: &str) -> Option<String> {
    let pair = |p: &str| -> Option<String> {
        let (n, v) = p.trim().split_once('=')?;
        (n.trim() == name).then(|| v.trim().trim_matches('"').to_string())
    };
    let fields = headers.get_all(header::COOKIE);
    let present = fields
        .iter()
        .filter_map(|f| f.to_str().ok())
        .any(|f| f.split(';').any(|p| pair(p).is_some()));
    if !present {
        return None;
    }
    let mut found = None;
    let mut kept = Vec::new();
    for field in headers.get_all(header::COOKIE) {
        let Ok(text) = field.to_str() else {
            kept.push(field.clone());
            continue;
        };
        let mut rest = Vec::new();
        for p in text.split(';') {
            match pair(p) {
                Some(v) => {
                    found.get_or_insert(v);
                }
                None if !p.trim().is_empty() => rest.push(p.trim()),
                None => {}
            }
        }
        if !rest.is_empty()
            && let Ok(v) = HeaderValue::from_str(&rest.join("; "))
        {
            kept.push(v);
        }
    }
    headers.remove(header::COOKIE);
    for v in kept {
        headers.append(header::COOKIE, v);
    }
    found
}

/// Before a server's response goes to the client: with a persistence
/// cookie, sets it to `server`'s value unless the request named that server
/// already, and marks the response private (HAProxy's `insert nocache
/// httponly`, `secure` over TLS: `https`), before the pool's response actions.
pub(crate) fn persist(
    fwd: &mut Forwarding,
    (pool, server): (&PoolRuntime, &Arc<ServerState>),
    https: bool,
) {
    let Some(name) = &pool.cookie else {
        return;
    };
    if fwd.pick.sticky == Some(server.addr) {
        return;
    }
    let secure = if https { "; Secure" } else { "" };
    let cookie = format!("{name}={}; Path=/; HttpOnly{secure}", server.cookie);
    let Ok(cookie) = HeaderValue::from_str(&cookie) else {
        return;
    };
    // A shared cache must not hand this client's cookie to others.
    let private = HeaderValue::from_static("private");
    fwd.response_ops.splice(
        0..0,
        [
            actions::HeaderOp::Add(header::SET_COOKIE, cookie),
            actions::HeaderOp::Add(header::CACHE_CONTROL, private),
        ],
    );
    fwd.rec.persistence[1] = 'I';
}

/// The access log record of a request to `pool`, before a server is known.
fn record(
    client: &ClientSide<'_>,
    pool: Arc<str>,
    parts: &http::request::Parts,
    tq: i64,
) -> AccessRecord {
    let frontend = client.frontend;
    let bytes_in = client.body_length.unwrap_or_else(|| {
        parts
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    });
    AccessRecord {
        tq,
        bytes_in,
        method: Some(parts.method.clone()),
        uri: Some(parts.uri.clone()),
        version: Some(parts.version),
        tally: Tally {
            frontend: Some(frontend.stats.shard()),
            pool: None,
            server: None,
        },
        // Its date is set when it is emitted (then minus Tt): no clock read
        // per request unlogged.
        ..AccessRecord::begin(client.peer, frontend.name.clone(), pool)
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

/// The tries of one request at a pool's servers: `retries` more after the
/// first, each connect failure redispatched to a server not tried yet.
pub(crate) struct Attempts {
    /// Servers whose connection failed.
    tried: Vec<SocketAddr>,
    /// Attempts left after the current one.
    left: u32,
    /// The server of the current attempt (its address: no reference
    /// count of a server every thread shares is taken per request).
    current: Option<SocketAddr>,
    /// `retry` counted the current attempt's failure for `max_fails`.
    reported: bool,
    /// The request may be sent again after a kept connection closed under
    /// it (`Retry::OnReusedConnection`): only an idempotent one (RFC 9110
    /// 9.2.2), since the server may have acted on it before closing.
    resend: bool,
}

impl Attempts {
    pub(crate) fn new(pool: &PoolRuntime) -> Self {
        Attempts {
            tried: Vec::new(),
            left: pool.retries.saturating_add(1),
            current: None,
            reported: false,
            resend: true,
        }
    }

    /// The tries of a request with this method (`resend`).
    pub(crate) fn for_method(self, method: &Method) -> Self {
        Attempts {
            resend: method.is_idempotent(),
            ..self
        }
    }

    /// Starts an attempt: a server below its maxconn (waiting in the pool's
    /// queue for one), recorded in `rec` with the wait; Err is the answer
    /// when there is none.
    pub(crate) async fn acquire(
        &mut self,
        pool: &PoolRuntime,
        pick: Pick,
        rec: &mut AccessRecord,
    ) -> Result<Active, Failure> {
        self.left = self.left.saturating_sub(1);
        match pool.balancer.acquire(pick, &self.tried).await {
            Ok(a) => {
                rec.tw += a.queued.as_millis() as i64;
                rec.server = a.active.server().label.clone();
                rec.tally.server = Some(a.active.server().stats.shard());
                self.current = Some(a.active.server().addr);
                self.reported = false;
                Ok(a.active)
            }
            Err(e) => Err(unavailable(e, rec)),
        }
    }

    /// [`Attempts::acquire`] for a forwarded request, whose record then
    /// says where it is: in the queue, then (a server picked) connecting.
    pub(crate) async fn acquire_forwarded(
        &mut self,
        pool: &PoolRuntime,
        pick: Pick,
        rec: &mut Unfinished,
    ) -> Result<Active, Failure> {
        rec.phase = Phase::Queue;
        let active = self.acquire(pool, pick, rec).await?;
        rec.phase = Phase::Connect;
        Ok(active)
    }

    /// The attempt ended with `failure`, not retried: counted for
    /// `max_fails` unless `retry` saw it already.
    pub(crate) fn ended(&mut self, pool: &PoolRuntime, failure: Failure) {
        if !std::mem::take(&mut self.reported) && failure.no_response() {
            let server = self.current.and_then(|a| pool.balancer.server_at(a));
            if let Some(s) = server {
                pool.balancer.failed(&s);
            }
        }
    }

    /// The attempt on `active`'s server got its response head (a `tcp`
    /// session: connected), for `max_fails`.
    pub(crate) fn answered(pool: &PoolRuntime, active: &Active) {
        pool.balancer.answered(active.server());
    }

    /// After a failed attempt: whether to make another, by the failure's
    /// `Retry` (`reused`: the request went out on a kept connection and
    /// nothing of it can have been processed). A redispatch avoids this server.
    /// Counts the failure, and the retry, in `pool`'s and the server's counters.
    pub(crate) fn retry(&mut self, pool: &PoolRuntime, failure: Failure, reused: bool) -> bool {
        // A failure only: the server is looked up (it may have left the pool since).
        let server = self.current.and_then(|a| pool.balancer.server_at(a));
        if let Some(s) = server.as_ref().filter(|_| failure.no_response()) {
            pool.balancer.failed(s);
        }
        self.reported = failure.no_response();
        let again = match failure.retry() {
            Retry::Never => false,
            Retry::OnReusedConnection => reused && self.resend && self.left > 0,
            Retry::Redispatch => {
                pool.stats.connect_error();
                if let Some(s) = &server {
                    s.stats.connect_error();
                }
                self.tried.extend(self.current);
                self.left > 0
            }
        };
        if again {
            let redispatch = failure.retry() == Retry::Redispatch;
            pool.stats.retry(redispatch);
            if let Some(s) = &server {
                s.stats.retry(redispatch);
            }
        }
        again
    }
}

/// Why no server could take a request; a queue timeout's wait is added to Tw.
fn unavailable(e: Unavailable, rec: &mut AccessRecord) -> Failure {
    match e {
        Unavailable::NoServer => Failure::NoServer,
        Unavailable::QueueTimeout(waited) => {
            rec.tw += waited.as_millis() as i64;
            Failure::QueueTimeout
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_persistence_cookie_is_taken_out_of_every_cookie_field() {
        let take = |fields: &[&'static str]| {
            let mut h = HeaderMap::new();
            for f in fields {
                h.append(header::COOKIE, HeaderValue::from_static(f));
            }
            let v = take_cookie(&mut h, "SRV");
            let left: Vec<String> = h
                .get_all(header::COOKIE)
                .iter()
                .map(|v| v.to_str().unwrap().to_string())
                .collect();
            (v, left)
        };
        assert_eq!(take(&["a=1; b=2"]), (None, vec!["a=1; b=2".into()]));
        assert_eq!(take(&["SRV=abc"]), (Some("abc".into()), vec![]));
        assert_eq!(
            take(&["a=1;SRV=abc ; b=2", "SRV=def; c=3"]),
            (Some("abc".into()), vec!["a=1; b=2".into(), "c=3".into()])
        );
        assert_eq!(
            take(&["SRV=\"q\"; SRVX=1"]),
            (Some("q".into()), vec!["SRVX=1".into()])
        );
        // Names are case-sensitive, as cookies are.
        assert_eq!(take(&["srv=1"]), (None, vec!["srv=1".into()]));
        assert_eq!(take(&[]), (None, vec![]));
    }

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
