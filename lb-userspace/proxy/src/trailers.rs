//! Which fields a request's trailers may carry: a policy of its own, read
//! by both HTTP/1 body scanners (`hardening`) and hyper's request bodies
//! (`request_body`).

/// Fields a request's trailers must not carry (RFC 9110 6.5.1: framing,
/// routing, authentication, request modifiers, content description) and
/// those a proxy writes in its place: a server that merges trailers into
/// the header section would take the client's for the proxy's. Lower
/// case, `-` for `_`; names holding `client-cert` or `ssl-client` (the
/// usual spellings of a client certificate's field) too.
const NOT_IN_REQUEST_TRAILERS: &[&str] = &[
    "authorization",
    "cache-control",
    "connection",
    "content-encoding",
    "content-length",
    "content-range",
    "content-type",
    "cookie",
    "expect",
    "forwarded",
    "host",
    "keep-alive",
    "max-forwards",
    "pragma",
    "proxy-authorization",
    "proxy-connection",
    "range",
    "set-cookie",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
    "x-real-ip",
    "x-request-id",
];

/// Whether a request may carry a trailer field of this name (see
/// `NOT_IN_REQUEST_TRAILERS`).
pub(crate) fn request_trailer_allowed(name: &[u8]) -> bool {
    let folded: Vec<u8> = name
        .iter()
        .map(|b| {
            if *b == b'_' {
                b'-'
            } else {
                b.to_ascii_lowercase()
            }
        })
        .collect();
    let holds = |part: &[u8]| folded.windows(part.len()).any(|w| w == part);
    !(NOT_IN_REQUEST_TRAILERS
        .iter()
        .any(|n| n.as_bytes() == folded.as_slice())
        || holds(b"client-cert")
        || holds(b"ssl-client"))
}
