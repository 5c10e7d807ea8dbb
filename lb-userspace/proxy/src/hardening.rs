//! Request smuggling hardening: a guard between a client's HTTP/1 stream and
//! hyper that checks every request head, and follows every body's framing to
//! find the next head, before hyper sees a byte of it.
//!
//! hyper 1 (through httparse) already refuses obs-fold, whitespace before the
//! colon (`Host : x`) and control characters with a 400, and bad chunk sizes,
//! differing Content-Lengths and `Transfer-Encoding: chunked, identity` by
//! closing silently (the head of a chunked request is already forwarded by
//! then). It accepts Content-Length with Transfer-Encoding (chunked wins), equal
//! duplicate Content-Lengths and `Transfer-Encoding: gzip, chunked`. This guard
//! rejects, before anything is forwarded:
//!
//! - anything httparse refuses (the same parser and settings as hyper's);
//! - Content-Length together with Transfer-Encoding;
//! - more than one Content-Length line, even with equal values (HAProxy merges
//!   equal ones; we keep exactly one framing per message), and any value that is
//!   not `1*DIGIT` (`+5`, `5, 5`, empty);
//! - Transfer-Encoding other than one line of exactly `chunked`
//!   (`gzip, chunked`, `chunked, identity`, two lines), or in HTTP/1.0;
//! - an HTTP/1.1 request without exactly one Host line (RFC 9112 3.2);
//! - a head larger than the frontend's `request_header_limit` (at least 8 KiB);
//! - a chunked body whose chunk framing is broken in any bytes already received
//!   with the head: the head is held until its first chunk-size line has
//!   arrived (unless the client waits for `100-continue`) and checked with it.
//!
//! A rejected head never reaches hyper: hyper gets a byte it cannot parse
//! instead, so it answers `400 Bad Request` in order after earlier responses
//! and closes the connection. Broken chunk framing found later, after the head
//! went through, fails the stream with an error (the forwarded request is
//! aborted and the connection closed). HTTP/2 and upgraded connections pass
//! through unchecked.

use std::io;
use std::mem::MaybeUninit;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::task::{Context, Poll, ready};

use bytes::{Buf, BytesMut};
use http::HeaderValue;
use tokio::io::{AsyncRead, ReadBuf};
use tokio_util::io::poll_read_buf;

use super::context::Activity;
use super::error::Failure;
use super::log::{AccessRecord, LogFormat};

/// What hyper is given instead of a rejected head: an invalid method, which it answers with 400.
const POISON: &[u8] = b"\0 / HTTP/1.1\r\n\r\n";
/// Headers parsed at most per head (hyper's default limit).
pub(crate) const MAX_HEADERS: usize = 100;
/// Longest chunk-size line (with extensions) or trailer line.
const MAX_LINE: usize = 4096;
/// Most bytes of trailer lines after a chunked body (hyper's limit): a peer
/// could otherwise send trailers for ever, each line within `MAX_LINE`.
const MAX_TRAILERS: usize = 16 * 1024;
/// Bytes asked of the client stream per read.
const READ_SIZE: usize = 8192;
/// Start of the HTTP/2 connection preface.
pub(crate) const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0";

/// How a request body is framed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyLen {
    /// Content-Length bytes (0 without Content-Length).
    Fixed(u64),
    /// Transfer-Encoding: chunked.
    Chunked,
}

/// What a valid request head says about what follows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Framing {
    /// The body's framing.
    pub body: BodyLen,
    /// The client waits for `100 Continue` before sending its body.
    pub expect_continue: bool,
}

/// Parses and checks one request head at the start of `data`.
/// Ok(None) while incomplete; Ok(Some((head length, framing))) when acceptable.
pub(crate) fn check_request(data: &[u8]) -> Result<Option<(usize, Framing)>, &'static str> {
    // Uninitialised: zeroing 100 header slots per parse showed in profiles.
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    Ok(parse_request(data, &mut slots)?.map(|(len, framing, _)| (len, framing)))
}

/// `check_request` keeping the parsed head (its headers in `slots`), for
/// our own HTTP/1 path (proxy/h1).
pub(crate) fn parse_request<'h, 'b>(
    data: &'b [u8],
    slots: &'h mut [MaybeUninit<httparse::Header<'b>>],
) -> Result<Option<(usize, Framing, httparse::Request<'h, 'b>)>, &'static str> {
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(data, slots) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err("too many headers"),
        Err(_) => return Err("malformed request head"),
    };
    check_target(req.method.unwrap_or(""), req.path.unwrap_or(""))?;
    let framing = framing_of(&req)?;
    Ok(Some((len, framing, req)))
}

/// The request-target forms RFC 9112 3.2 allows for a method: origin-form
/// (`/path?query`) or absolute-form (`http://authority/path`) for every
/// method but CONNECT, `*` for OPTIONS only. CONNECT (authority-form) is
/// refused: the proxy is no tunnel to arbitrary hosts. A `#` never belongs
/// in a target; the authority of an absolute-form must be a valid Host.
pub(crate) fn check_target(method: &str, target: &str) -> Result<(), &'static str> {
    if method.eq_ignore_ascii_case("CONNECT") {
        return Err("CONNECT is not served");
    }
    if method == "PRI" {
        return Err("PRI is the HTTP/2 preface, not a request");
    }
    if target.contains('#') {
        return Err("fragment in request target");
    }
    odd_target(target)?;
    if target == "*" {
        return if method == "OPTIONS" {
            Ok(())
        } else {
            Err("asterisk-form for a method other than OPTIONS")
        };
    }
    if target.starts_with('/') {
        return Ok(());
    }
    let rest = strip_prefix_ignore_case(target, "http://")
        .or_else(|| strip_prefix_ignore_case(target, "https://"))
        .ok_or("request target is neither origin-form nor absolute-form")?;
    let end = rest.find(['/', '?']).unwrap_or(rest.len());
    if !valid_authority(&rest.as_bytes()[..end]) {
        return Err("bad authority in request target");
    }
    Ok(())
}

/// What no URI holds and servers read in ways of their own, refused in
/// any request target (both HTTP versions): a raw backslash (a `/` to some
/// servers, so `/\admin` would dodge a rule on `/admin`; browsers never
/// send one) and an encoded NUL (`%00`, which ends a C string: `.php%00`).
pub(crate) fn odd_target(target: &str) -> Result<(), &'static str> {
    if target.contains('\\') {
        return Err("backslash in request target");
    }
    let b = target.as_bytes();
    if b.windows(3)
        .any(|w| w[0] == b'%' && w[1] == b'0' && w[2] == b'0')
    {
        return Err("%00 in request target");
    }
    Ok(())
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
}

/// Whether `v` is `host [ ":" port ]` (RFC 9110 7.2): a reg-name
/// (unreserved, pct-encoded, sub-delims), an IPv4 address or a bracketed
/// IPv6 literal, then up to five port digits. No userinfo, spaces, paths.
pub(crate) fn valid_authority(v: &[u8]) -> bool {
    let (host_ok, rest) = if let Some(inner) = v.strip_prefix(b"[") {
        let Some(close) = inner.iter().position(|&b| b == b']') else {
            return false;
        };
        let ip = std::str::from_utf8(&inner[..close])
            .ok()
            .and_then(|t| t.parse::<std::net::Ipv6Addr>().ok());
        (ip.is_some(), &inner[close + 1..])
    } else {
        let end = v.iter().position(|&b| b == b':').unwrap_or(v.len());
        let name = &v[..end];
        (!name.is_empty() && valid_reg_name(name), &v[end..])
    };
    let port_ok = match rest {
        [] => true,
        [b':', port @ ..] => {
            port.len() <= 5
                && port.iter().all(u8::is_ascii_digit)
                && std::str::from_utf8(port).is_ok_and(|p| p.is_empty() || p.parse::<u16>().is_ok())
        }
        _ => false,
    };
    host_ok && port_ok
}

/// reg-name characters, without `%XX` escapes: RFC 3986 allows them, but
/// no host name has one, and a Host rule would not see `%61pi.test` as
/// `api.test` while a server that decodes it would.
fn valid_reg_name(name: &[u8]) -> bool {
    name.iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=".contains(b))
}

/// Whether a server's status is of a class RFC 9110 15 defines (1xx to
/// 5xx): a 600 or 999 means nothing to a client, and is a bad answer (502).
pub(crate) fn status_defined(status: http::StatusCode) -> bool {
    (100..=599).contains(&status.as_u16())
}

/// What RFC 9113 leaves to the recipient of an HTTP/2 request, which h2
/// does not check: `:scheme` is http or https (8.3.1), no field value
/// starts or ends with whitespace (8.2.1; an HTTP/1 server would trim it
/// and see another value than the rules did), and no more fields than an
/// HTTP/1 request may have (`MAX_HEADERS`), as HAProxy's `tune.http.maxhdr`.
pub(crate) fn check_h2_request(parts: &http::request::Parts) -> Result<(), &'static str> {
    if parts.headers.len() > MAX_HEADERS {
        return Err("more header fields than MAX_HEADERS");
    }
    if let Some(pq) = parts.uri.path_and_query() {
        odd_target(pq.as_str())?;
    }
    if parts.method != http::Method::CONNECT
        && !matches!(parts.uri.scheme_str(), Some("http" | "https"))
    {
        return Err(":scheme is neither http nor https");
    }
    let padded = |v: &HeaderValue| {
        let b = v.as_bytes();
        [b.first(), b.last()]
            .into_iter()
            .flatten()
            .any(|c| *c == b' ' || *c == b'\t')
    };
    if parts.headers.values().any(padded) {
        return Err("a field value starts or ends with whitespace");
    }
    Ok(())
}

/// Whether a `Connection` token may remove the field it names. The framing
/// fields never: a message's length must be read and sent by the same
/// fields, and a proxy that dropped `Content-Length` on a client's say-so
/// while relaying the body by it would smuggle the body in as a request.
/// (Transfer-Encoding is always re-derived by the proxy anyway.)
pub(crate) fn connection_may_remove(name: &[u8]) -> bool {
    !(name.eq_ignore_ascii_case(b"content-length")
        || name.eq_ignore_ascii_case(b"transfer-encoding")
        || name.eq_ignore_ascii_case(b"host"))
}

/// What of a request's `Upgrade` list may become a tunnel: every protocol
/// but those that carry HTTP, which the proxy could no longer see once the
/// connection is spliced. `h2c` is the known one ("h2c smuggling": the
/// client speaks HTTP/2 straight to the server, past the frontend's ACLs,
/// routing and limits); `h2`, `HTTP/*` and `TLS/*` (RFC 2817: HTTP inside
/// TLS) are the same class. None when nothing is left: the request is
/// forwarded as a plain one, its Upgrade and Connection fields dropped
/// (mitmproxy does the same; RFC 9113 deprecated the h2c upgrade).
pub(crate) fn tunnelable_upgrade(proto: &HeaderValue) -> Option<HeaderValue> {
    let carries_http = |t: &[u8]| {
        let t = t.to_ascii_lowercase();
        t == b"h2c" || t == b"h2" || t.starts_with(b"http/") || t.starts_with(b"tls/")
    };
    let tokens = proto
        .as_bytes()
        .split(|&b| b == b',')
        .map(<[u8]>::trim_ascii);
    if !tokens.clone().any(carries_http) {
        return Some(proto.clone());
    }
    let kept: Vec<&[u8]> = tokens
        .filter(|t| !t.is_empty() && !carries_http(t))
        .collect();
    tracing::debug!(upgrade = ?proto, "upgrade to a protocol that carries HTTP: not tunnelled");
    if kept.is_empty() {
        return None;
    }
    HeaderValue::from_bytes(&kept.join(&b", "[..])).ok()
}

/// A server response's framing fields (RFC 9112 6.3): Transfer-Encoding
/// must end in exactly one `chunked` and never come with Content-Length
/// (HAProxy answers 502 to both). Returns the Transfer-Encoding verdict:
/// Ok(true) when the body is chunked.
pub(crate) fn response_te<'a>(
    te: impl Iterator<Item = &'a [u8]>,
    has_length: bool,
) -> Result<bool, &'static str> {
    let mut codings = 0;
    let mut chunked_at = None;
    for t in te
        .flat_map(|v| v.split(|&b| b == b','))
        .map(<[u8]>::trim_ascii)
    {
        if t.is_empty() {
            continue;
        }
        if t.eq_ignore_ascii_case(b"chunked") {
            if chunked_at.is_some() {
                return Err("chunked applied twice");
            }
            chunked_at = Some(codings);
        }
        codings += 1;
    }
    if codings == 0 {
        return Ok(false);
    }
    if has_length {
        return Err("both Transfer-Encoding and Content-Length");
    }
    match chunked_at {
        Some(i) if i + 1 == codings => Ok(true),
        _ => Err("Transfer-Encoding does not end in chunked"),
    }
}

/// Whether an accepted head may go on, given the bytes that came after it:
/// a chunked one waits (false) until its first chunk-size line is in too
/// (unless the client waits for `100 Continue`), and every chunk byte already
/// received must be well framed. Both HTTP/1 paths hold heads by this rule.
pub(crate) fn head_ready(framing: Framing, after: &[u8]) -> Result<bool, &'static str> {
    if framing.body != BodyLen::Chunked {
        return Ok(true);
    }
    match scan_chunked(Chunk::Size, after) {
        Err(()) => Err("bad chunked body"),
        Ok((0, Chunk::Size)) => Ok(framing.expect_continue),
        Ok(_) => Ok(true),
    }
}

/// The checks above on a parsed request head: its body's framing, or why it is refused.
pub(crate) fn framing_of(req: &httparse::Request<'_, '_>) -> Result<Framing, &'static str> {
    let http11 = req.version == Some(1);
    let (mut cl, mut te, mut host) = (Vec::new(), Vec::new(), Vec::new());
    let mut expect_continue = false;
    for h in req.headers.iter() {
        let value = h.value.trim_ascii();
        if h.name.eq_ignore_ascii_case("content-length") {
            cl.push(value);
        } else if h.name.eq_ignore_ascii_case("transfer-encoding") {
            te.push(value);
        } else if h.name.eq_ignore_ascii_case("host") {
            host.push(value);
        } else if h.name.eq_ignore_ascii_case("expect") {
            expect_continue = value.eq_ignore_ascii_case(b"100-continue");
        }
    }
    if host.len() > 1 || (http11 && host.is_empty()) {
        return Err("missing or repeated Host");
    }
    if host.first().is_some_and(|h| !valid_authority(h)) {
        return Err("bad Host");
    }
    if !cl.is_empty() && !te.is_empty() {
        return Err("both Content-Length and Transfer-Encoding");
    }
    if cl.len() > 1 {
        return Err("repeated Content-Length");
    }
    if !te.is_empty() && !http11 {
        return Err("Transfer-Encoding in HTTP/1.0");
    }
    if te.len() > 1
        || te
            .first()
            .is_some_and(|v| !v.eq_ignore_ascii_case(b"chunked"))
    {
        return Err("Transfer-Encoding other than chunked");
    }
    let body = match (cl.first(), te.first()) {
        (_, Some(_)) => BodyLen::Chunked,
        (Some(v), None) => BodyLen::Fixed(parse_content_length(v).ok_or("bad Content-Length")?),
        (None, None) => BodyLen::Fixed(0),
    };
    Ok(Framing {
        body,
        expect_continue,
    })
}

/// `1*DIGIT` that fits in a u64.
fn parse_content_length(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(v).ok()?.parse().ok()
}

/// Where a chunked body's reader is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Chunk {
    /// Before a chunk-size line.
    Size,
    /// Inside a chunk's data, bytes left.
    Data(u64),
    /// Expecting the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines until an empty one (their bytes so far).
    Trailers(usize),
    /// The body is complete.
    Done,
}

/// Index just past the first CRLF in `data`, if any; Err on a bare LF or an over-long line.
fn line_end(data: &[u8]) -> Result<Option<usize>, ()> {
    match data.iter().position(|&b| b == b'\n') {
        Some(i) if i > 0 && data[i - 1] == b'\r' => Ok(Some(i + 1)),
        Some(_) => Err(()),
        None if data.len() > MAX_LINE => Err(()),
        None => Ok(None),
    }
}

/// A trailer line (CRLF excluded) checked like a header field: a token
/// name, a colon, then a value without control characters (HTAB allowed).
/// A bare CR, NUL or obs-fold in a trailer is refused: a server that took
/// CR for a line end would read what follows as a new request.
fn check_field_line(line: &[u8]) -> Result<(), ()> {
    let colon = line.iter().position(|&b| b == b':').ok_or(())?;
    let (name, value) = (&line[..colon], &line[colon + 1..]);
    let tchar = |b: &u8| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(b);
    if name.is_empty() || !name.iter().all(tchar) {
        return Err(());
    }
    if value.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f) {
        return Err(());
    }
    Ok(())
}

/// `chunk-size [ chunk-ext ] CRLF` from `line` (CRLF included): the size.
fn chunk_size(line: &[u8]) -> Result<u64, ()> {
    let line = &line[..line.len() - 2];
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 || digits > 16 {
        return Err(());
    }
    let rest = &line[digits..];
    // Only BWS (spaces, tabs) before an extension: trim_ascii would pass a bare CR.
    let ext = match rest.iter().position(|&b| b != b' ' && b != b'\t') {
        Some(i) => &rest[i..],
        None => &rest[rest.len()..],
    };
    if !rest.is_empty() && !ext.starts_with(b";") {
        return Err(());
    }
    if ext.iter().any(|&b| b != b'\t' && (b < 0x20 || b == 0x7f)) {
        return Err(());
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| ())?;
    u64::from_str_radix(text, 16).map_err(|_| ())
}

/// Follows chunked framing over `data` from `state` as far as it goes:
/// bytes consumed and the state reached, or Err on broken framing.
pub(crate) fn scan_chunked(state: Chunk, data: &[u8]) -> Result<(usize, Chunk), ()> {
    scan_chunked_data(state, data, |_| {})
}

/// `scan_chunked` for a request's body: trailers are checked against
/// `trailers::request_trailer_allowed` too.
pub(crate) fn scan_chunked_request(state: Chunk, data: &[u8]) -> Result<(usize, Chunk), ()> {
    scan_chunked_with(
        state,
        data,
        |_| {},
        crate::trailers::request_trailer_allowed,
    )
}

/// `scan_chunked` that also hands each piece of chunk data to `on_data` (for dechunking).
pub(crate) fn scan_chunked_data(
    state: Chunk,
    data: &[u8],
    on_data: impl FnMut(&[u8]),
) -> Result<(usize, Chunk), ()> {
    scan_chunked_with(state, data, on_data, |_| true)
}

/// `scan_chunked_data` taking only trailer fields whose names `trailer_ok` allows.
pub(crate) fn scan_chunked_with(
    mut state: Chunk,
    data: &[u8],
    mut on_data: impl FnMut(&[u8]),
    trailer_ok: fn(&[u8]) -> bool,
) -> Result<(usize, Chunk), ()> {
    let mut at = 0;
    loop {
        let rest = &data[at..];
        match state {
            Chunk::Done => return Ok((at, state)),
            Chunk::Size => match line_end(rest)? {
                Some(n) => {
                    let size = chunk_size(&rest[..n])?;
                    at += n;
                    state = if size == 0 {
                        Chunk::Trailers(0)
                    } else {
                        Chunk::Data(size)
                    };
                }
                None => return Ok((at, state)),
            },
            Chunk::Data(left) => {
                let take = left.min(rest.len() as u64);
                if take == 0 {
                    return Ok((at, state));
                }
                on_data(&rest[..take as usize]);
                at += take as usize;
                state = if take == left {
                    Chunk::DataEnd
                } else {
                    Chunk::Data(left - take)
                };
            }
            Chunk::DataEnd => match rest {
                [b'\r', b'\n', ..] => {
                    at += 2;
                    state = Chunk::Size;
                }
                [] | [b'\r'] => return Ok((at, state)),
                _ => return Err(()),
            },
            Chunk::Trailers(seen) => match line_end(rest)? {
                Some(2) => {
                    at += 2;
                    state = Chunk::Done;
                }
                Some(n) if seen + n > MAX_TRAILERS => return Err(()),
                Some(n) => {
                    let line = &rest[..n - 2];
                    check_field_line(line)?;
                    let name = line.split(|&b| b == b':').next().unwrap_or(line);
                    if !trailer_ok(name) {
                        return Err(());
                    }
                    at += n;
                    state = Chunk::Trailers(seen + n);
                }
                None => return Ok((at, state)),
            },
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Expecting a request head.
    Head,
    /// Inside a Content-Length body, bytes left.
    Body(u64),
    /// Inside a chunked body.
    Chunked(Chunk),
    /// HTTP/2 or an upgraded connection: bytes go through unchecked.
    Pass,
    /// Nothing more for hyper (after a rejection, or at end of stream).
    Closed,
    /// Broken body framing after its head went through: fail the stream.
    Broken,
}

enum Step {
    Progress,
    NeedMore,
}

/// Client stream as hyper's HTTP/1 side reads it: only checked request bytes get through.
pub(crate) struct GuardIo<T> {
    inner: T,
    /// Bytes read from `inner` and not yet handed to hyper.
    buf: BytesMut,
    /// Leading bytes of `buf` checked and ready for hyper.
    ready: usize,
    state: State,
    /// Largest request head.
    limit: usize,
    /// Still before the first request (HTTP/2 preface detection).
    first: bool,
    activity: Arc<Activity>,
    peer: SocketAddr,
    frontend: Arc<str>,
    /// Format of the 400 log line.
    log_format: LogFormat,
}

impl<T> GuardIo<T> {
    /// Guards `inner`; `h2` is Some(true) when ALPN already chose HTTP/2.
    pub(crate) fn new(
        inner: T,
        activity: Arc<Activity>,
        limit: usize,
        h2: Option<bool>,
        peer: SocketAddr,
        frontend: Arc<str>,
    ) -> Self {
        GuardIo {
            inner,
            buf: BytesMut::new(),
            ready: 0,
            state: if h2 == Some(true) {
                State::Pass
            } else {
                State::Head
            },
            limit,
            first: true,
            activity,
            peer,
            frontend,
            log_format: LogFormat::default(),
        }
    }

    /// Sets the format of the access log line of a rejected request.
    pub(crate) fn log_format(mut self, format: LogFormat) -> Self {
        self.log_format = format;
        self
    }

    /// Replaces the pending head with `POISON` and logs the rejection.
    fn reject(&mut self, why: &str) {
        tracing::debug!(frontend = %self.frontend, peer = %self.peer, reason = why, "request rejected");
        AccessRecord::bad_request(self.peer, self.frontend.clone(), Failure::BadRequest, 0)
            .emit_as(self.log_format);
        self.buf.truncate(self.ready);
        self.buf.extend_from_slice(POISON);
        self.ready = self.buf.len();
        self.state = State::Closed;
    }

    /// Checks as much of the unchecked bytes as possible.
    fn advance(&mut self) -> Step {
        let data = &self.buf[self.ready..];
        match self.state {
            State::Head => {
                if self.first {
                    let n = data.len().min(H2_PREFACE.len());
                    if data[..n] == H2_PREFACE[..n] {
                        if n < H2_PREFACE.len() {
                            return Step::NeedMore;
                        }
                        self.state = State::Pass;
                        self.ready = self.buf.len();
                        return Step::Progress;
                    }
                }
                let (len, framing) = match check_request(data) {
                    Ok(Some(x)) => x,
                    Ok(None) if data.len() > self.limit => {
                        self.reject("request head too large");
                        return Step::Progress;
                    }
                    Ok(None) => return Step::NeedMore,
                    Err(why) => {
                        self.reject(why);
                        return Step::Progress;
                    }
                };
                // Hold the head until its first chunk-size line is here, and check all that came with it.
                match head_ready(framing, &data[len..]) {
                    Ok(true) => {}
                    Ok(false) => return Step::NeedMore,
                    Err(why) => {
                        self.reject(why);
                        return Step::Progress;
                    }
                }
                self.first = false;
                self.ready += len;
                self.state = match framing.body {
                    BodyLen::Fixed(0) => State::Head,
                    BodyLen::Fixed(n) => State::Body(n),
                    BodyLen::Chunked => State::Chunked(Chunk::Size),
                };
                Step::Progress
            }
            State::Body(left) => {
                let take = left.min(data.len() as u64);
                if take == 0 {
                    return Step::NeedMore;
                }
                self.ready += take as usize;
                self.state = if take == left {
                    State::Head
                } else {
                    State::Body(left - take)
                };
                Step::Progress
            }
            State::Chunked(chunk) => match scan_chunked_request(chunk, data) {
                Ok((used, Chunk::Done)) => {
                    // Only the bytes up to the end of the body; the rest is the next head.
                    self.ready += used;
                    self.state = State::Head;
                    Step::Progress
                }
                Ok((0, _)) => Step::NeedMore,
                Ok((used, next)) => {
                    self.ready += used;
                    self.state = State::Chunked(next);
                    Step::Progress
                }
                Err(()) => {
                    self.state = State::Broken;
                    Step::Progress
                }
            },
            State::Pass | State::Closed | State::Broken => Step::Progress,
        }
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for GuardIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if matches!(this.state, State::Head | State::Body(_) | State::Chunked(_))
            && this.activity.upgraded.load(Ordering::SeqCst)
        {
            // 101 sent: what follows is the tunnel's, not HTTP.
            this.state = State::Pass;
            this.ready = this.buf.len();
        }
        loop {
            if this.ready > 0 {
                let n = this.ready.min(out.remaining());
                out.put_slice(&this.buf[..n]);
                this.buf.advance(n);
                this.ready -= n;
                return Poll::Ready(Ok(()));
            }
            match this.state {
                State::Pass => return Pin::new(&mut this.inner).poll_read(cx, out),
                State::Closed => return Poll::Ready(Ok(())),
                State::Broken => {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "malformed chunked request body",
                    )));
                }
                State::Head | State::Body(_) | State::Chunked(_) => {}
            }
            if let Step::Progress = this.advance() {
                continue;
            }
            // Read straight into the buffer's spare room: no zeroing, no extra copy.
            this.buf.reserve(READ_SIZE);
            let got = ready!(poll_read_buf(Pin::new(&mut this.inner), cx, &mut this.buf))?;
            if got == 0 {
                // End of stream: a partial head is dropped (hyper closes quietly),
                // a partial body goes through (hyper fails it).
                if this.state == State::Head {
                    this.buf.clear();
                }
                this.ready = this.buf.len();
                this.state = State::Closed;
                continue;
            }
        }
    }
}

// Writes go to the client untouched.
write_through!(GuardIo<T>);

#[cfg(test)]
mod tests {
    use super::*;

    fn check(s: &str) -> Result<Option<(usize, Framing)>, &'static str> {
        check_request(s.as_bytes())
    }

    fn body(s: &str) -> BodyLen {
        check(s).unwrap().unwrap().1.body
    }

    #[test]
    fn heads() {
        assert_eq!(body("GET / HTTP/1.1\r\nHost: x\r\n\r\n"), BodyLen::Fixed(0));
        assert_eq!(
            body("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 12\r\n\r\n"),
            BodyLen::Fixed(12)
        );
        assert_eq!(
            body("POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: Chunked \r\n\r\n"),
            BodyLen::Chunked
        );
        assert_eq!(body("GET / HTTP/1.0\r\n\r\n"), BodyLen::Fixed(0));
        assert_eq!(check("GET / HTTP/1.1\r\nHost: x\r\n"), Ok(None));
        for bad in [
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5, 5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +5\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length:\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nX-A: 1\r\n continued\r\n\r\n",
            "GET / HTTP/1.1\r\nHost : x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "GET / HTTP/1.1\r\n\r\n",
            // Bare CR anywhere in the head.
            "GET / HTTP/1.1\r\nHost: x\r\nX-A: a\rb\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\rX-A: 1\r\n\r\n",
            "GET /\r HTTP/1.1\r\nHost: x\r\n\r\n",
            // Request-target forms.
            "GET * HTTP/1.1\r\nHost: x\r\n\r\n",
            "CONNECT x:443 HTTP/1.1\r\nHost: x:443\r\n\r\n",
            "CONNECT / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET x:80 HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET admin HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET /a#b HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET ftp://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET http://u@x/ HTTP/1.1\r\nHost: x\r\n\r\n",
            "PRI / HTTP/1.1\r\nHost: x\r\n\r\n",
            // Host that is not host[:port].
            "GET / HTTP/1.1\r\nHost: u@x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: a b\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x/y\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x:80:80\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x:123456\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: \r\n\r\n",
        ] {
            assert!(check(bad).is_err(), "{bad:?}");
        }
        for good in [
            "OPTIONS * HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET http://x:80/a?b HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET HTTPS://x HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: www.ex-ample.com:443\r\n\r\n",
        ] {
            assert!(check(good).unwrap().is_some(), "{good:?}");
        }
    }

    #[test]
    fn response_transfer_encodings() {
        let te = |v: &str, cl| response_te(std::iter::once(v.as_bytes()), cl);
        assert_eq!(te("chunked", false), Ok(true));
        assert_eq!(te("gzip, chunked", false), Ok(true));
        assert_eq!(response_te(std::iter::empty(), true), Ok(false));
        for bad in ["chunked, chunked", "gzip", "chunked, gzip", "identity"] {
            assert!(te(bad, false).is_err(), "{bad}");
        }
        assert!(te("chunked", true).is_err());
        let two = [&b"gzip"[..], b"chunked"];
        assert_eq!(response_te(two.into_iter(), false), Ok(true));
    }

    #[test]
    fn chunked_framing() {
        let body = b"5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\nGET";
        assert_eq!(
            scan_chunked(Chunk::Size, body),
            Ok((body.len() - 3, Chunk::Done))
        );
        // Piece by piece gets to the same place.
        let (mut state, mut at) = (Chunk::Size, 0);
        for end in 1..=body.len() - 3 {
            let (used, next) = scan_chunked(state, &body[at..end]).unwrap();
            at += used;
            state = next;
        }
        assert_eq!((at, state), (body.len() - 3, Chunk::Done));
        assert_eq!(
            scan_chunked(Chunk::Size, b"5\r\nhel"),
            Ok((6, Chunk::Data(2)))
        );
        for bad in [
            &b"zz\r\n"[..],
            b"5\nhello",
            b"5\r\nhelloXX",
            b"5 x\r\n",
            b"11111111111111111\r\n",
            b"-1\r\n",
            // Bare CR in a chunk line, a trailer that is no field.
            b"5\r;x\r\nhello\r\n",
            b"0\r\nX: y\r\rGET /HIDDEN HTTP/1.1\r\nHost: x\r\n\r\n",
            b"0\r\nX: a\x00b\r\n\r\n",
            b"0\r\nno colon\r\n\r\n",
            b"0\r\n folded\r\n\r\n",
            b"0\r\nX y: 1\r\n\r\n",
        ] {
            assert!(scan_chunked(Chunk::Size, bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn upgrades_that_carry_http_are_never_tunnelled() {
        let up = |v: &'static str| tunnelable_upgrade(&HeaderValue::from_static(v));
        for v in [
            "h2c",
            "H2C",
            " h2c ",
            "HTTP/2.0",
            "http/1.1",
            "TLS/1.0",
            "h2",
            "h2c, TLS/1.2",
        ] {
            assert_eq!(up(v), None, "{v}");
        }
        assert_eq!(up("websocket"), Some(HeaderValue::from_static("websocket")));
        assert_eq!(
            up("custom/2, foo"),
            Some(HeaderValue::from_static("custom/2, foo"))
        );
        assert_eq!(
            up("h2c, websocket"),
            Some(HeaderValue::from_static("websocket"))
        );
        assert_eq!(
            up("websocket,, HTTP/2.0, x"),
            Some(HeaderValue::from_static("websocket, x"))
        );
    }

    #[test]
    fn authorities_are_host_names_or_addresses_with_a_real_port() {
        for good in [
            "a.test",
            "a.test:65535",
            "10.0.0.1:80",
            "[::1]:443",
            "a.test:",
        ] {
            assert!(valid_authority(good.as_bytes()), "{good}");
        }
        for bad in [
            "a.test:65536",
            "a.test:99999",
            "%61pi.test",
            "a b",
            "u@a.test",
            "a/b",
        ] {
            assert!(!valid_authority(bad.as_bytes()), "{bad}");
        }
        for bad in ["/\\admin", "/x.php%00", "/a\\b"] {
            assert!(odd_target(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_trailers_leave_out_what_the_framing_or_the_proxy_owns() {
        for name in [
            "X-Forwarded-For",
            "x_forwarded_for",
            "Content-Length",
            "HOST",
            "X-SSL-Client-Cert",
            "SSL_CLIENT_CERT",
            "X-Forwarded-Client-Cert",
            "Authorization",
        ] {
            assert!(
                !crate::trailers::request_trailer_allowed(name.as_bytes()),
                "{name}"
            );
        }
        for name in ["X-Checksum", "grpc-status", "Server-Timing", "X-Forwarded"] {
            assert!(
                crate::trailers::request_trailer_allowed(name.as_bytes()),
                "{name}"
            );
        }
        // Only a request's body is held to it.
        let body = b"1\r\na\r\n0\r\nX-Real-IP: 1.2.3.4\r\n\r\n";
        assert!(scan_chunked_request(Chunk::Size, body).is_err());
        assert_eq!(
            scan_chunked(Chunk::Size, body),
            Ok((body.len(), Chunk::Done))
        );
    }

    #[test]
    fn trailers_add_up_to_max_trailers() {
        let line = b"a: b\r\n";
        let fit = [
            &b"0\r\n"[..],
            &line.repeat(MAX_TRAILERS / line.len()),
            b"\r\n",
        ]
        .concat();
        assert_eq!(
            scan_chunked(Chunk::Size, &fit),
            Ok((fit.len(), Chunk::Done))
        );
        // Line by line, as they come in separate reads.
        let mut state = Chunk::Trailers(0);
        let err = (0..=MAX_TRAILERS / line.len()).try_for_each(|_| {
            state = scan_chunked(state, line)?.1;
            Ok(())
        });
        assert_eq!(err, Err(()));
    }
}
