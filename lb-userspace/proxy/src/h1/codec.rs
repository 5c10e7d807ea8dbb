//! HTTP/1.1 heads for our own path: parsed once with httparse straight off
//! the connection's buffer into `http` types (header values share the
//! buffer's memory), and written back out for the next hop.

use std::mem::MaybeUninit;

use bytes::{Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, StatusCode, Uri, Version, request};

use crate::hardening::{self, BodyLen, MAX_HEADERS};
use crate::prepare::HOP_BY_HOP;

/// Bytes reserved before writing a head: enough for a typical one.
const HEAD_RESERVE: usize = 1024;
/// The largest response head read from a server (HAProxy's whole buffer is
/// 16 KiB): past it, an unfinished head is refused rather than buffered on.
pub(crate) const RESPONSE_HEAD_LIMIT: usize = 64 * 1024;

/// How a message body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    /// This many bytes (0: no body).
    Fixed(u64),
    /// Transfer-Encoding: chunked.
    Chunked,
    /// Until the sender closes the connection (responses only).
    Close,
}

/// Where a header's name and value lie in the head, by offset.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Span {
    name: (usize, usize),
    value: (usize, usize),
}

/// A request head taken off a client connection.
#[derive(Debug)]
pub(crate) struct RequestHead {
    pub parts: request::Parts,
    pub body: BodyKind,
    /// The client waits for `100 Continue` before sending its body.
    pub expect_continue: bool,
    /// The client keeps the connection after this exchange (HTTP/1.1 unless
    /// `Connection: close`; HTTP/1.0 only with `Connection: keep-alive`).
    pub keep_alive: bool,
    /// The protocol of an HTTP/1.1 Upgrade request (`Connection: upgrade`).
    pub upgrade: Option<HeaderValue>,
}

/// A response head taken off a server connection. Its fields stay as the
/// server sent them: they are copied out line by line, and a header map is
/// built only for response actions (building one per response was a tenth
/// of a proxied request's instructions).
#[derive(Debug)]
pub(crate) struct ResponseHead {
    pub status: StatusCode,
    /// The head's bytes; `reason` and `fields` lie in them.
    head: Bytes,
    reason: (usize, usize),
    fields: Vec<Span>,
    pub body: BodyKind,
    /// The Content-Length the server declared (sent on as parsed, never copied).
    pub length: Option<u64>,
    /// The server keeps the connection after this exchange.
    pub keep_alive: bool,
    /// The protocol a 101 switches to.
    pub upgrade: Option<HeaderValue>,
    /// Connection names fields beyond `close` and `keep-alive` (they are hop-by-hop too).
    connection_names: bool,
}

impl ResponseHead {
    /// The reason phrase as the server sent it.
    pub(crate) fn reason(&self) -> &[u8] {
        &self.head[self.reason.0..self.reason.0 + self.reason.1]
    }

    fn field(&self, s: &Span) -> (&[u8], &[u8]) {
        (
            &self.head[s.name.0..s.name.0 + s.name.1],
            &self.head[s.value.0..s.value.0 + s.value.1],
        )
    }

    /// The fields as a header map (for response actions).
    pub(crate) fn header_map(&self) -> Result<HeaderMap, &'static str> {
        header_map(&self.head, &self.fields)
    }

    /// Number of header fields.
    pub(crate) fn field_count(&self) -> usize {
        self.fields.len()
    }

    /// The header fields, name and value, as the server sent them.
    pub(crate) fn fields(&self) -> impl Iterator<Item = (&[u8], &[u8])> {
        self.fields.iter().map(|s| self.field(s))
    }

    /// The span list, for the next head to reuse.
    pub(crate) fn into_fields(self) -> Vec<Span> {
        self.fields
    }

    /// The values of the fields named `name`.
    pub(crate) fn field_values<'a>(&'a self, name: &'a [u8]) -> impl Iterator<Item = &'a [u8]> {
        self.fields
            .iter()
            .map(|s| self.field(s))
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v)
    }

    /// Whether `name` is listed in a Connection field.
    fn named_by_connection(&self, name: &[u8]) -> bool {
        self.fields
            .iter()
            .map(|s| self.field(s))
            .filter(|(n, _)| n.eq_ignore_ascii_case(b"connection"))
            .flat_map(|(_, v)| v.split(|&b| b == b','))
            .any(|t| t.trim_ascii().eq_ignore_ascii_case(name))
    }
}

/// Offset of `part` (a slice of `base`) in `base`. httparse gives a static
/// `""`, not a slice of the buffer, for a status line without a reason
/// phrase (`HTTP/1.1 200`): a part outside `base` is the empty span.
fn offset(base: &[u8], part: &[u8]) -> (usize, usize) {
    match (part.as_ptr() as usize).checked_sub(base.as_ptr() as usize) {
        Some(at) if at + part.len() <= base.len() => (at, part.len()),
        _ => (0, 0),
    }
}

/// The header map of a head, its values slices of the head's bytes.
fn header_map(head: &Bytes, spans: &[Span]) -> Result<HeaderMap, &'static str> {
    let mut headers = HeaderMap::with_capacity(spans.len());
    for s in spans {
        let name = HeaderName::from_bytes(&head[s.name.0..s.name.0 + s.name.1])
            .map_err(|_| "bad header name")?;
        let value = HeaderValue::from_maybe_shared(head.slice(s.value.0..s.value.0 + s.value.1))
            .map_err(|_| "bad header value")?;
        headers.append(name, value);
    }
    Ok(headers)
}

/// What the Connection fields of a head say.
#[derive(Debug, Default, Clone, Copy)]
struct ConnectionField {
    close: bool,
    keep_alive: bool,
    upgrade: bool,
    /// A token other than `close` and `keep-alive`: a field name, hop-by-hop.
    names: bool,
}

impl ConnectionField {
    /// Adds the tokens of one field's value, if `name` is Connection.
    fn add(&mut self, name: &[u8], value: &[u8]) {
        if !name.eq_ignore_ascii_case(b"connection") {
            return;
        }
        for t in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
            if t.eq_ignore_ascii_case(b"close") {
                self.close = true;
            } else if t.eq_ignore_ascii_case(b"keep-alive") {
                self.keep_alive = true;
            } else if !t.is_empty() {
                self.names = true;
                self.upgrade |= t.eq_ignore_ascii_case(b"upgrade");
            }
        }
    }

    /// Whether the connection stays open after the message: HTTP/1.1 unless
    /// `close`, HTTP/1.0 only with `keep-alive`.
    fn persists(&self, http10: bool) -> bool {
        if http10 { self.keep_alive } else { !self.close }
    }
}

/// Parses and checks (`hardening::parse_request`) and takes the request head
/// at the start of `buf`; Ok(None) while incomplete or held
/// (`hardening::head_ready`).
pub(crate) fn take_request(
    buf: &mut BytesMut,
    spans: &mut Vec<Span>,
) -> Result<Option<RequestHead>, &'static str> {
    let (len, framing, method, path, version, connection) = {
        // Uninitialised: zeroing 100 header slots per parse showed in profiles.
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let Some((len, framing, req)) = hardening::parse_request(buf, &mut slots)? else {
            return Ok(None);
        };
        if !hardening::head_ready(framing, &buf[len..])? {
            return Ok(None);
        }
        let method = req.method.ok_or("no method")?;
        let method = Method::from_bytes(method.as_bytes()).map_err(|_| "bad method")?;
        let path = offset(buf, req.path.ok_or("no target")?.as_bytes());
        let version = match req.version {
            Some(0) => Version::HTTP_10,
            _ => Version::HTTP_11,
        };
        let mut connection = ConnectionField::default();
        spans.clear();
        spans.extend(req.headers.iter().map(|h| {
            connection.add(h.name.as_bytes(), h.value);
            Span {
                name: offset(buf, h.name.as_bytes()),
                value: offset(buf, h.value),
            }
        }));
        (len, framing, method, path, version, connection)
    };
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(path.0..path.0 + path.1))
        .map_err(|_| "bad request target")?;
    let headers = header_map(&head, spans)?;
    let keep_alive = connection.persists(version == Version::HTTP_10);
    let upgrade = match version {
        Version::HTTP_11 if connection.upgrade => headers
            .get(header::UPGRADE)
            .and_then(hardening::tunnelable_upgrade),
        _ => None,
    };
    let (mut parts, ()) = http::Request::new(()).into_parts();
    parts.method = method;
    parts.uri = uri;
    parts.version = version;
    parts.headers = headers;
    Ok(Some(RequestHead {
        parts,
        body: match framing.body {
            BodyLen::Fixed(n) => BodyKind::Fixed(n),
            BodyLen::Chunked => BodyKind::Chunked,
        },
        expect_continue: framing.expect_continue,
        keep_alive,
        upgrade,
    }))
}

/// Parses and takes the response head at the start of `buf`, the answer to a
/// request with method `method`; its field spans go into `spans`' storage.
/// Ok(None) while incomplete, an error once an incomplete head is longer
/// than `RESPONSE_HEAD_LIMIT`.
pub(crate) fn take_response(
    buf: &mut BytesMut,
    spans: &mut Vec<Span>,
    method: &Method,
) -> Result<Option<ResponseHead>, &'static str> {
    let (len, code, reason, version) = {
        let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
        let mut resp = httparse::Response::new(&mut []);
        let parsed = httparse::ParserConfig::default()
            .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
        let len = match parsed {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) if buf.len() > RESPONSE_HEAD_LIMIT => {
                return Err("response head too large");
            }
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(_) => return Err("malformed response head"),
        };
        let reason = offset(buf, resp.reason.unwrap_or("").as_bytes());
        spans.clear();
        spans.extend(resp.headers.iter().map(|h| Span {
            name: offset(buf, h.name.as_bytes()),
            value: offset(buf, h.value),
        }));
        (len, resp.code.ok_or("no status")?, reason, resp.version)
    };
    let status = StatusCode::from_u16(code).map_err(|_| "bad status")?;
    // RFC 9110 15: three digits, 1xx to 5xx; hyper's path holds to it too.
    if !hardening::status_defined(status) {
        return Err("status outside 100..=599");
    }
    let mut resp = ResponseHead {
        status,
        head: buf.split_to(len).freeze(),
        reason,
        fields: std::mem::take(spans),
        body: BodyKind::Close,
        length: None,
        keep_alive: false,
        upgrade: None,
        connection_names: false,
    };
    // One pass over the fields for what framing and forwarding need.
    let (mut te, mut length) = (false, None);
    let mut connection = ConnectionField::default();
    let mut upgrade = None;
    for s in &resp.fields {
        let (name, value) = resp.field(s);
        connection.add(name, value);
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            te = true;
        } else if name.eq_ignore_ascii_case(b"content-length") {
            for item in value.split(|&b| b == b',') {
                let n = content_length(item.trim_ascii()).ok_or("bad Content-Length")?;
                if length.is_some_and(|l| l != n) {
                    return Err("conflicting Content-Length");
                }
                length = Some(n);
            }
        } else if name.eq_ignore_ascii_case(b"upgrade") && upgrade.is_none() {
            let value = resp.head.slice(s.value.0..s.value.0 + s.value.1);
            upgrade = HeaderValue::from_maybe_shared(value).ok();
        }
    }
    (resp.connection_names, resp.upgrade) = (connection.names, upgrade);
    // Invalid framing is a 502, and the connection is not reused (RFC 9112 6.3).
    let chunked =
        hardening::response_te(resp.field_values(b"transfer-encoding"), length.is_some())?;
    if te && !chunked {
        return Err("empty Transfer-Encoding");
    }
    resp.length = length;
    resp.body = if method == Method::HEAD
        || status.is_informational()
        || status == StatusCode::NO_CONTENT
        || status == StatusCode::NOT_MODIFIED
    {
        BodyKind::Fixed(0)
    } else if chunked {
        BodyKind::Chunked
    } else {
        length.map_or(BodyKind::Close, BodyKind::Fixed)
    };
    resp.keep_alive = resp.body != BodyKind::Close && connection.persists(version == Some(0));
    Ok(Some(resp))
}

/// A Content-Length value: digits only.
fn content_length(text: &[u8]) -> Option<u64> {
    if text.is_empty() || !text.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(text).ok()?.parse().ok()
}

/// Appends a header line.
fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// Appends every header of `headers` but the framing ones (Content-Length,
/// Transfer-Encoding: the caller derives them from what it sends), then
/// `extra`, then the blank line.
fn put_headers(out: &mut Vec<u8>, headers: &HeaderMap, extra: &[(&str, &str)]) {
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
    for (name, value) in extra {
        put_header(out, name.as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends an HTTP/1.1 request head for a server, its framing derived from
/// `body`, the body that follows it (never from fields a client could have
/// had removed or added): `Transfer-Encoding: chunked`, or Content-Length
/// when there is a body or the client sent one.
pub(crate) fn put_request(out: &mut Vec<u8>, parts: &request::Parts, body: BodyKind) {
    // One allocation for a typical head (the buffer may have been released while idle).
    out.reserve(HEAD_RESERVE);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    let target = match parts.uri.authority() {
        // CONNECT's authority-form.
        Some(a) if parts.uri.path_and_query().is_none() => a.as_str().into(),
        _ => crate::acl::origin_target(&parts.uri),
    };
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    let length;
    let extra: &[(&str, &str)] = match body {
        BodyKind::Chunked => &[("transfer-encoding", "chunked")],
        BodyKind::Fixed(n) if n > 0 || parts.headers.contains_key(header::CONTENT_LENGTH) => {
            length = n.to_string();
            &[("content-length", length.as_str())]
        }
        BodyKind::Fixed(_) | BodyKind::Close => &[],
    };
    put_headers(out, &parts.headers, extra);
}

/// Appends a response's status line.
fn put_status_line(out: &mut Vec<u8>, status: StatusCode, reason: &[u8]) {
    out.reserve(HEAD_RESERVE);
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    if reason.is_empty() {
        out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    } else {
        out.extend_from_slice(reason);
    }
    out.extend_from_slice(b"\r\n");
}

/// Appends an HTTP/1.1 response head for a client, with `extra` headers.
pub(crate) fn put_response(
    out: &mut Vec<u8>,
    status: StatusCode,
    reason: &[u8],
    headers: &HeaderMap,
    extra: &[(&str, &str)],
) {
    put_status_line(out, status, reason);
    put_headers(out, headers, extra);
}

/// Appends a server's response head for a client as the server sent it,
/// without its hop-by-hop fields (but Transfer-Encoding when `keep_te`),
/// its Content-Length as parsed, with `extra` headers.
pub(crate) fn put_response_fields(
    out: &mut Vec<u8>,
    resp: &ResponseHead,
    keep_te: bool,
    extra: &[(&str, &str)],
) {
    put_status_line(out, resp.status, resp.reason());
    for s in &resp.fields {
        let (name, value) = resp.field(s);
        let hop = if name.eq_ignore_ascii_case(b"transfer-encoding") {
            !keep_te
        } else if name.eq_ignore_ascii_case(b"content-length") {
            // Written once below, from the parsed value.
            true
        } else {
            HOP_BY_HOP
                .iter()
                .any(|h| name.eq_ignore_ascii_case(h.as_str().as_bytes()))
                || (resp.connection_names
                    && hardening::connection_may_remove(name)
                    && resp.named_by_connection(name))
        };
        if !hop {
            // Lower case, as from a header map (and as HAProxy sends them):
            // the same output whether or not response actions ran.
            let at = out.len();
            out.extend_from_slice(name);
            out[at..].make_ascii_lowercase();
            out.extend_from_slice(b": ");
            out.extend_from_slice(value);
            out.extend_from_slice(b"\r\n");
        }
    }
    if let Some(n) = resp.length {
        put_header(out, b"content-length", n.to_string().as_bytes());
    }
    for (name, value) in extra {
        put_header(out, name.as_bytes(), value.as_bytes());
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(text: &str) -> Result<Option<RequestHead>, &'static str> {
        let mut buf = BytesMut::from(text.as_bytes());
        take_request(&mut buf, &mut Vec::new())
    }

    #[test]
    fn request_head_is_parsed_and_taken() {
        let mut buf = BytesMut::from(
            &b"POST /a?b=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nX-A: 1\r\n\r\nabcGET"[..],
        );
        let head = take_request(&mut buf, &mut Vec::new()).unwrap().unwrap();
        assert_eq!(head.parts.method, Method::POST);
        assert_eq!(head.parts.uri, "/a?b=1");
        assert_eq!(head.parts.headers["x-a"], "1");
        assert_eq!(head.body, BodyKind::Fixed(3));
        assert!(head.keep_alive);
        assert!(head.upgrade.is_none());
        assert_eq!(&buf[..], b"abcGET");
    }

    #[test]
    fn incomplete_and_refused_heads() {
        assert!(request("GET / HTTP/1.1\r\nHost: x\r\n").unwrap().is_none());
        assert!(request("GET / HTTP/1.1\r\nHost : x\r\n\r\n").is_err());
        assert!(
            request("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n")
                .is_err()
        );
        // A chunked head waits for its first chunk-size line, which must be valid.
        let chunked = "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(request(chunked).unwrap().is_none());
        assert!(request(&format!("{chunked}zz\r\n")).is_err());
        let head = request(&format!("{chunked}5\r\n")).unwrap().unwrap();
        assert_eq!(head.body, BodyKind::Chunked);
    }

    #[test]
    fn keep_alive_and_upgrade() {
        let h = request("GET / HTTP/1.0\r\n\r\n").unwrap().unwrap();
        assert!(!h.keep_alive);
        let h = request("GET / HTTP/1.0\r\nConnection: Keep-Alive\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(h.keep_alive);
        let h = request("GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert!(!h.keep_alive);
        let h = request(
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n",
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.upgrade.unwrap(), "websocket");
    }

    fn response(text: &str, method: Method) -> Result<Option<ResponseHead>, &'static str> {
        let mut buf = BytesMut::from(text.as_bytes());
        take_response(&mut buf, &mut Vec::new(), &method)
    }

    #[test]
    fn response_framing() {
        let r = |t: &str| response(t, Method::GET).unwrap().unwrap();
        let fixed = r("HTTP/1.1 200 Fine\r\nContent-Length: 5\r\n\r\n");
        assert_eq!(fixed.body, BodyKind::Fixed(5));
        assert_eq!(fixed.reason(), b"Fine");
        assert!(fixed.keep_alive);
        assert_eq!(
            r("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").body,
            BodyKind::Chunked
        );
        let close = r("HTTP/1.1 200 OK\r\n\r\n");
        assert_eq!(close.body, BodyKind::Close);
        assert!(!close.keep_alive);
        assert!(!r("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n").keep_alive);
        assert!(!r("HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n").keep_alive);
        assert_eq!(
            r("HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n").body,
            BodyKind::Fixed(0)
        );
        let head = response("HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", Method::HEAD);
        assert_eq!(head.unwrap().unwrap().body, BodyKind::Fixed(0));
        assert!(
            response(
                "HTTP/1.1 200 OK\r\nContent-Length: 1, 2\r\n\r\n",
                Method::GET
            )
            .is_err()
        );
        assert!(
            response("HTTP/1.1 200 OK\r\n", Method::GET)
                .unwrap()
                .is_none()
        );
        // Invalid framing: refused (a 502), whatever the method.
        for bad in [
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "HTTP/1.1 200 OK\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked, gzip\r\n\r\n",
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: \r\n\r\n",
        ] {
            assert!(response(bad, Method::GET).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn endless_response_head_is_refused() {
        // A server that never ends its head must not grow the buffer for ever.
        let mut text = String::from("HTTP/1.1 200 OK\r\nX-A: ");
        text.push_str(&"a".repeat(RESPONSE_HEAD_LIMIT));
        assert_eq!(
            response(&text, Method::GET).unwrap_err(),
            "response head too large"
        );
        text.truncate(RESPONSE_HEAD_LIMIT - 100);
        assert!(response(&text, Method::GET).unwrap().is_none());
    }

    #[test]
    fn status_line_without_reason_phrase() {
        // httparse's reason is then a static "" outside the buffer.
        for text in [
            "HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n",
            "HTTP/1.1 404\nContent-Length: 0\n\n",
        ] {
            let resp = response(text, Method::GET).unwrap().unwrap();
            assert_eq!(resp.reason(), b"");
            let mut out = Vec::new();
            put_response_fields(&mut out, &resp, false, &[]);
            let status = resp.status.as_str();
            let reason = resp.status.canonical_reason().unwrap();
            let want = format!("HTTP/1.1 {status} {reason}\r\ncontent-length: 0\r\n\r\n");
            assert_eq!(String::from_utf8(out).unwrap(), want);
        }
    }

    #[test]
    fn framing_fields_are_derived_never_dropped_by_connection() {
        // A response whose Connection names Content-Length keeps its length.
        let resp = response(
            "HTTP/1.1 200 OK\r\nConnection: content-length, x-a\r\nX-A: 1\r\nContent-Length: 5\r\n\r\n",
            Method::GET,
        )
        .unwrap()
        .unwrap();
        let mut out = Vec::new();
        put_response_fields(&mut out, &resp, false, &[]);
        assert_eq!(out, b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\n");
        // A request's Content-Length is written from the body that follows,
        // whatever its fields say.
        let mut h = request("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\n")
            .unwrap()
            .unwrap();
        h.parts.headers.remove(header::CONTENT_LENGTH);
        let mut out = Vec::new();
        put_request(&mut out, &h.parts, BodyKind::Fixed(3));
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nhost: a\r\ncontent-length: 3\r\n\r\n"
        );
        h.parts
            .headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from_static("9"));
        let mut out = Vec::new();
        put_request(&mut out, &h.parts, BodyKind::Chunked);
        assert_eq!(
            out,
            b"POST / HTTP/1.1\r\nhost: a\r\ntransfer-encoding: chunked\r\n\r\n"
        );
    }

    #[test]
    fn response_fields_go_out_without_hop_by_hop_ones() {
        let text = "HTTP/1.1 200 Fine\r\nX-Keep: a\r\nConnection: keep-alive, X-Hop\r\n\
                    X-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: gzip, chunked\r\n\
                    Upgrade: h2c\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\n\r\n";
        let resp = response(text, Method::GET).unwrap().unwrap();
        assert_eq!(resp.body, BodyKind::Chunked);
        let mut out = Vec::new();
        put_response_fields(&mut out, &resp, true, &[("connection", "close")]);
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 200 Fine\r\nx-keep: a\r\ntransfer-encoding: gzip, chunked\r\n\
             set-cookie: a=1\r\nset-cookie: b=2\r\nconnection: close\r\n\r\n"
        );
        // Dechunked for an HTTP/1.0 client: no Transfer-Encoding.
        let mut out = Vec::new();
        put_response_fields(&mut out, &resp, false, &[]);
        assert!(
            !String::from_utf8(out)
                .unwrap()
                .contains("transfer-encoding")
        );
        // The same fields through a header map (response actions) give the same head.
        let mut map = resp.header_map().unwrap();
        crate::strip_hop_by_hop(&mut map);
        let mut via_map = Vec::new();
        put_response(&mut via_map, resp.status, resp.reason(), &map, &[]);
        let mut direct = Vec::new();
        put_response_fields(&mut direct, &resp, false, &[]);
        assert_eq!(via_map, direct);
    }

    #[test]
    fn heads_are_written_back() {
        let h = request("GET /x HTTP/1.1\r\nHost: a\r\nX-B: 2\r\n\r\n")
            .unwrap()
            .unwrap();
        let mut out = Vec::new();
        put_request(&mut out, &h.parts, BodyKind::Chunked);
        assert_eq!(
            out,
            b"GET /x HTTP/1.1\r\nhost: a\r\nx-b: 2\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let mut out = Vec::new();
        put_response(
            &mut out,
            StatusCode::OK,
            b"",
            &HeaderMap::new(),
            &[("connection", "close")],
        );
        assert_eq!(out, b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n");
    }

    /// Bytes that have split HTTP parsers, for the mutations below.
    const ODD: &[u8] = b" \t\r\n:,;=09aZ\x00\x7f\x80\xff\"%/?#@\\-";

    /// `base` with one to three random edits (a byte replaced, inserted or
    /// removed, a line repeated), from `next`.
    fn mutate_head(base: &[u8], next: &mut impl FnMut(usize) -> usize) -> Vec<u8> {
        let mut m = base.to_vec();
        for _ in 0..=next(3) {
            let at = next(m.len());
            match next(4) {
                0 => m[at] = ODD[next(ODD.len())],
                1 => m.insert(at, ODD[next(ODD.len())]),
                2 if m.len() > 4 => {
                    m.remove(at);
                }
                _ => {
                    // Repeat the line holding `at` (a second Host, CL, TE...).
                    let start = m[..at]
                        .iter()
                        .rposition(|&b| b == b'\n')
                        .map_or(0, |i| i + 1);
                    if let Some(len) = m[start..].iter().position(|&b| b == b'\n') {
                        let line = m[start..=start + len].to_vec();
                        m.splice(start..start, line);
                    }
                }
            }
        }
        m
    }

    fn xorshift(seed: u64) -> impl FnMut(usize) -> usize {
        let mut state = seed;
        move |n| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state % n.max(1) as u64) as usize
        }
    }

    /// A head map without the framing fields we write ourselves.
    fn unframed(headers: &HeaderMap) -> HeaderMap {
        let mut h = headers.clone();
        h.remove(header::CONTENT_LENGTH);
        h.remove(header::TRANSFER_ENCODING);
        h
    }

    /// Mutation fuzzing of the request side: whatever head `take_request`
    /// accepts, `put_request` writes as one head that it (and httparse,
    /// strictly) reads back as the same request: method, target, fields
    /// and body framing, nothing left over that could be read as more.
    #[test]
    fn mutated_request_heads_go_out_as_they_were_read() {
        let bases: [&[u8]; 5] = [
            b"GET /a?b=c HTTP/1.1\r\nHost: x\r\nUser-Agent: t\r\nAccept: */*\r\n\r\n",
            b"POST /p HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: keep-alive\r\n\r\n",
            b"PUT http://h:8/p HTTP/1.1\r\nHost: h:8\r\nTransfer-Encoding: chunked\r\nX-A: 1\r\n\r\n",
            b"GET / HTTP/1.0\r\nConnection: keep-alive\r\nHost: z\r\n\r\n",
            b"OPTIONS * HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n",
        ];
        let mut next = xorshift(0x6831_636f_6465);
        let mut taken = 0;
        for base in bases {
            for _ in 0..3000 {
                let input = mutate_head(base, &mut next);
                let mut buf = BytesMut::from(&input[..]);
                let Ok(Some(mut head)) = take_request(&mut buf, &mut Vec::new()) else {
                    continue;
                };
                taken += 1;
                // An HTTP/1.0 request without Host is given the address it
                // came to (prepare), as every request going out has one.
                if !head.parts.headers.contains_key(header::HOST) {
                    let to = HeaderValue::from_static("192.0.2.1:80");
                    head.parts.headers.insert(header::HOST, to);
                }
                let mut out = Vec::new();
                put_request(&mut out, &head.parts, head.body);
                let shown = String::from_utf8_lossy(&input);
                let mut again = BytesMut::from(&out[..]);
                let back = take_request(&mut again, &mut Vec::new())
                    .unwrap_or_else(|e| panic!("{shown:?}: we refuse what we wrote ({e})"))
                    .unwrap_or_else(|| panic!("{shown:?}: what we wrote is unfinished"));
                assert!(again.is_empty(), "{shown:?}: bytes past the head");
                assert_eq!(back.parts.method, head.parts.method, "{shown:?}");
                let target = |u: &Uri| (u.path().to_string(), u.query().map(String::from));
                assert_eq!(
                    target(&back.parts.uri),
                    target(&head.parts.uri),
                    "{shown:?}"
                );
                assert_eq!(back.body, head.body, "{shown:?}");
                assert_eq!(
                    unframed(&back.parts.headers),
                    unframed(&head.parts.headers),
                    "{shown:?}"
                );
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
                let mut strict = httparse::Request::new(&mut fields);
                assert_eq!(
                    strict.parse(&out),
                    Ok(httparse::Status::Complete(out.len())),
                    "{shown:?}"
                );
            }
        }
        assert!(taken > 2000, "only {taken} mutants taken");
    }

    /// The response side: whatever head `take_response` accepts,
    /// `put_response_fields` writes as one head read back with the same
    /// status, framing and end-to-end fields.
    #[test]
    fn mutated_response_heads_go_out_as_they_were_read() {
        let bases: [&[u8]; 4] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: 1\r\nSet-Cookie: a=b\r\n\r\n",
            b"HTTP/1.1 404 Not Found\r\nTransfer-Encoding: chunked\r\nConnection: keep-alive\r\n\r\n",
            b"HTTP/1.0 200 OK\r\nServer: s\r\n\r\n",
            b"HTTP/1.1 304 Not Modified\r\nETag: \"x\"\r\nContent-Length: 10\r\n\r\n",
        ];
        let mut next = xorshift(0x7265_7370_6f6e);
        let mut taken = 0;
        for base in bases {
            for _ in 0..3000 {
                let input = mutate_head(base, &mut next);
                let mut buf = BytesMut::from(&input[..]);
                let Ok(Some(resp)) = take_response(&mut buf, &mut Vec::new(), &Method::GET) else {
                    continue;
                };
                taken += 1;
                let keep_te = resp.body == BodyKind::Chunked;
                let mut out = Vec::new();
                put_response_fields(&mut out, &resp, keep_te, &[]);
                let shown = String::from_utf8_lossy(&input);
                let mut again = BytesMut::from(&out[..]);
                let back = take_response(&mut again, &mut Vec::new(), &Method::GET)
                    .unwrap_or_else(|e| panic!("{shown:?}: we refuse what we wrote ({e})"))
                    .unwrap_or_else(|| panic!("{shown:?}: what we wrote is unfinished"));
                assert!(again.is_empty(), "{shown:?}: bytes past the head");
                assert_eq!(back.status, resp.status, "{shown:?}");
                assert_eq!(back.body, resp.body, "{shown:?}");
                assert_eq!(back.length, resp.length, "{shown:?}");
                let ends = |r: &ResponseHead| {
                    let mut h = unframed(&r.header_map().unwrap_or_default());
                    for hop in HOP_BY_HOP.iter() {
                        h.remove(hop);
                    }
                    h
                };
                if !resp.connection_names {
                    assert_eq!(ends(&back), ends(&resp), "{shown:?}");
                }
                let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS + 2];
                let mut strict = httparse::Response::new(&mut fields);
                assert_eq!(
                    strict.parse(&out),
                    Ok(httparse::Status::Complete(out.len())),
                    "{shown:?}"
                );
            }
        }
        assert!(taken > 2000, "only {taken} mutants taken");
    }
}
