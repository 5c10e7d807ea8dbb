//! HAProxy-style ACLs for the L7 proxy: named request matchers and the
//! `if` conditions that combine them. Pure: no I/O, compiled once at config time.
//!
//! # Configuration
//!
//! Each `[[frontend.acl]]` entry has a `name` and exactly one matcher key.
//! Several entries with the same name are OR-ed, as in HAProxy:
//!
//! ```toml
//! [[frontend.acl]]
//! name = "is_api"
//! path_prefix = "/api/"
//! [[frontend.acl]]
//! name = "is_api"
//! host = "api.example.org"          # is_api: path starts with /api/ OR host is api.example.org
//! ```
//!
//! | key | value | matches when |
//! |---|---|---|
//! | `path` | `"/x"` | the path (without query) equals it |
//! | `path_prefix` | `"/api/"` | the path starts with it |
//! | `path_suffix` | `".css"` | the path ends with it |
//! | `path_regex` | `"^/v[0-9]+/"` | the regex matches somewhere in the path (anchor with `^`/`$`) |
//! | `path_raw_regex` | `"^/admin"` | the regex matches somewhere in the path as received, not normalized |
//! | `host` | `"admin.example.org"` | the Host, without `:port` or a trailing dot, equals it, ASCII case-insensitively |
//! | `host_suffix` | `".example.org"` | the Host ends with it, case-insensitively (`.example.org` does not match `example.org`) |
//! | `header_present` | `"X-Name"` | the header is present (names are case-insensitive) |
//! | `header` | `{ name = "X-Env", value = "prod" }` | one field line of that header equals the value, case-sensitively |
//! | `header_regex` | `{ name = "X-Env", regex = "^prod" }` | the regex matches one field line of that header |
//! | `method` | `"GET"` or `["GET", "HEAD"]` | the method is one of them (case-sensitive, as in HTTP) |
//! | `src` | `["10.0.0.0/8", "2001:db8::/32", "198.18.1.2"]` | the client address is in one of the networks |
//! | `sni` | `"a.example"` | the TLS SNI equals it, case-insensitively |
//! | `sni_suffix` | `".example"` | the TLS SNI ends with it, case-insensitively |
//! | `client_cert` | `true` | the client presented a TLS certificate that verified against the frontend's `client_ca` (HAProxy's `ssl_c_used`); `false`: it did not |
//! | `query` | `{ name = "debug", value = "1" }` | a query parameter has that name (and value, if given) |
//! | `cookie` | `{ name = "session", value = "x" }` | a cookie has that name (and value, if given) |
//! | `src_request_rate` | `{ above = 100, period = "10s" }` | the client's source (IPv4 address, IPv6 /64) sent more than `above` requests to this frontend within `period`, this one included (HAProxy's `sc_http_req_rate`; see `request_rate`) |
//!
//! ACL names consist of ASCII letters, digits, `_`, `-`, `.` and `:`, and are
//! not `and`, `or` or `not`.
//!
//! Details: `path`, `path_prefix`, `path_suffix` and `path_regex` see the path
//! normalized ([`normalize_path`]: percent-encoded unreserved characters
//! decoded, other escapes upper-cased, runs of `/` merged, `.` and `..`
//! segments removed), so `//admin`, `/./admin`, `/%61dmin` and `/x/../admin`
//! all match `path_prefix = "/admin"`, as after HAProxy's `normalize-uri`;
//! case is kept unless the entry has `ignore_case = true` (HAProxy's `-i`,
//! path keys only). `path_raw_regex` sees the path as received. The server gets
//! the path as received either way.
//! Query names and values are form-decoded (`%xx`, `+` as space) before they are
//! compared, so `value = "a b"` matches `a+b` and `a%20b`. Cookies are compared
//! raw. IPv4-mapped IPv6 clients (`::ffff:10.0.0.1`) count as IPv4 and
//! `::ffff:a.b.c.d/n` networks (n ≥ 96) as IPv4 networks; otherwise IPv4 sources
//! never match IPv6 networks (not even `::/0`) and vice versa. Networks must not
//! have host bits set (`10.1.0.0/8` is an error).
//!
//! # Conditions
//!
//! `if = "is_api and not admin_host or is_static"`: ACL names, `and` (or `&&`, or
//! nothing: `is_api !admin_host` is an implicit AND as in HAProxy), `or` (`||`),
//! `not` (`!`) and parentheses, with precedence `not` > `and` > `or`. Parse them
//! with [`parse_condition`] once, evaluate with [`Condition::eval`].

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

use http::{HeaderMap, HeaderName, Method};
use serde::Deserialize;

/// The matcher keys, in the order they are documented.
pub const MATCHER_KEYS: &[&str] = &[
    "path",
    "path_prefix",
    "path_suffix",
    "path_regex",
    "path_raw_regex",
    "host",
    "host_suffix",
    "header_present",
    "header",
    "header_regex",
    "method",
    "src",
    "sni",
    "sni_suffix",
    "client_cert",
    "query",
    "cookie",
    "src_request_rate",
];

/// Nesting limit of parentheses and `not`s in a condition.
const MAX_DEPTH: usize = 64;

/// An error in an ACL definition or a condition.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum AclError {
    /// An ACL entry has an empty name.
    #[error("ACL name must not be empty")]
    EmptyName,
    /// An ACL name has characters a condition could not refer to, or is a keyword.
    #[error(
        "ACL name `{0}` is invalid: use ASCII letters, digits, `_`, `-`, `.` and `:`, and not `and`, `or` or `not`"
    )]
    BadName(String),
    /// An ACL entry has no matcher key or several.
    #[error("ACL `{name}` needs exactly one matcher key (one of {}), found {}", MATCHER_KEYS.join(", "), found_keys(.found))]
    Matchers {
        /// The ACL's name.
        name: String,
        /// The matcher keys the entry had.
        found: Vec<&'static str>,
    },
    /// A `path_regex` or `header_regex` does not compile.
    #[error("ACL `{name}`: invalid regex: {error}")]
    BadRegex {
        /// The ACL's name.
        name: String,
        /// What the regex crate said.
        error: regex::Error,
    },
    /// An entry of `src` is not an address or network.
    #[error("ACL `{name}`: invalid network `{cidr}` in `src`: {reason}")]
    BadCidr {
        /// The ACL's name.
        name: String,
        /// The entry as written.
        cidr: String,
        /// What is wrong with it.
        reason: String,
    },
    /// Any other invalid matcher value (empty, bad header name, bad method, ...).
    #[error("ACL `{name}`: {reason}")]
    BadValue {
        /// The ACL's name.
        name: String,
        /// What is wrong.
        reason: String,
    },
    /// A condition names an ACL that is not defined.
    #[error("unknown ACL `{name}` in condition at column {column}")]
    UnknownAcl {
        /// The name as written.
        name: String,
        /// 1-based character column in the condition.
        column: usize,
    },
    /// A condition is not well-formed.
    #[error("syntax error in condition at column {column}: {message}")]
    Syntax {
        /// 1-based character column in the condition.
        column: usize,
        /// What was expected or found.
        message: String,
    },
}

fn found_keys(found: &[&str]) -> String {
    if found.is_empty() {
        "none".to_owned()
    } else {
        found
            .iter()
            .map(|k| format!("`{k}`"))
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One ACL entry as configured: a name and one matcher.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AclSpec {
    /// The ACL's name; entries sharing it are OR-ed.
    pub name: String,
    /// What the entry matches.
    pub matcher: MatcherSpec,
    /// `ignore_case = true`: a path key compares ASCII case-insensitively (HAProxy's `-i`).
    pub ignore_case: bool,
}

/// A matcher as configured, before compilation; see the module doc for each key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MatcherSpec {
    /// `path`: exact path.
    Path(String),
    /// `path_prefix`: path prefix.
    PathPrefix(String),
    /// `path_suffix`: path suffix.
    PathSuffix(String),
    /// `path_regex`: regex searched in the path.
    PathRegex(String),
    /// `path_raw_regex`: regex searched in the path as received.
    PathRawRegex(String),
    /// `host`: exact host, case-insensitive, port ignored.
    Host(String),
    /// `host_suffix`: host suffix, case-insensitive, port ignored.
    HostSuffix(String),
    /// `header_present`: a header name.
    HeaderPresent(String),
    /// `header`: a header field line equal to a value.
    Header {
        /// Header name, case-insensitive.
        name: String,
        /// Exact value, case-sensitive.
        value: String,
    },
    /// `header_regex`: a header field line matching a regex.
    HeaderRegex {
        /// Header name, case-insensitive.
        name: String,
        /// Regex searched in each field line.
        regex: String,
    },
    /// `method`: one of these methods.
    Method(Vec<String>),
    /// `src`: client address in one of these networks.
    Src(Vec<String>),
    /// `sni`: exact SNI, case-insensitive.
    Sni(String),
    /// `sni_suffix`: SNI suffix, case-insensitive.
    SniSuffix(String),
    /// `client_cert`: whether the client presented a verified TLS certificate.
    ClientCert(bool),
    /// `query`: a query parameter, with a value or just present.
    Query {
        /// Parameter name (decoded).
        name: String,
        /// Parameter value (decoded); `None` matches presence.
        value: Option<String>,
    },
    /// `cookie`: a cookie, with a value or just present.
    Cookie {
        /// Cookie name.
        name: String,
        /// Cookie value; `None` matches presence.
        value: Option<String>,
    },
    /// `src_request_rate`: the client's source sent more requests than this.
    SrcRequestRate {
        /// Requests within the period that are still fine.
        above: u32,
        /// The sliding period they are counted over.
        period: Duration,
    },
}

impl MatcherSpec {
    /// The TOML key of this matcher.
    pub fn key(&self) -> &'static str {
        match self {
            MatcherSpec::Path(_) => "path",
            MatcherSpec::PathPrefix(_) => "path_prefix",
            MatcherSpec::PathSuffix(_) => "path_suffix",
            MatcherSpec::PathRegex(_) => "path_regex",
            MatcherSpec::PathRawRegex(_) => "path_raw_regex",
            MatcherSpec::Host(_) => "host",
            MatcherSpec::HostSuffix(_) => "host_suffix",
            MatcherSpec::HeaderPresent(_) => "header_present",
            MatcherSpec::Header { .. } => "header",
            MatcherSpec::HeaderRegex { .. } => "header_regex",
            MatcherSpec::Method(_) => "method",
            MatcherSpec::Src(_) => "src",
            MatcherSpec::Sni(_) => "sni",
            MatcherSpec::SniSuffix(_) => "sni_suffix",
            MatcherSpec::ClientCert(_) => "client_cert",
            MatcherSpec::Query { .. } => "query",
            MatcherSpec::Cookie { .. } => "cookie",
            MatcherSpec::SrcRequestRate { .. } => "src_request_rate",
        }
    }
}

// The TOML shape: every matcher key optional, so that "none" and "several" get
// one clear error instead of serde's untagged/flatten messages; unknown keys
// (typos) are rejected.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAclSpec {
    name: String,
    #[serde(default)]
    ignore_case: bool,
    path: Option<String>,
    path_prefix: Option<String>,
    path_suffix: Option<String>,
    path_regex: Option<String>,
    path_raw_regex: Option<String>,
    host: Option<String>,
    host_suffix: Option<String>,
    header_present: Option<String>,
    header: Option<RawHeader>,
    header_regex: Option<RawHeaderRegex>,
    method: Option<OneOrMany>,
    src: Option<OneOrMany>,
    sni: Option<String>,
    sni_suffix: Option<String>,
    client_cert: Option<bool>,
    query: Option<RawNameValue>,
    cookie: Option<RawNameValue>,
    src_request_rate: Option<RawRate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRate {
    above: u32,
    #[serde(with = "crate::duration")]
    period: Duration,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeader {
    name: String,
    value: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHeaderRegex {
    name: String,
    regex: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawNameValue {
    name: String,
    value: Option<String>,
}

/// A string or an array of strings.
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string or an array of strings")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![v.to_owned()]))
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<OneOrMany, A::Error> {
                let mut out = Vec::new();
                while let Some(s) = seq.next_element::<String>()? {
                    out.push(s);
                }
                Ok(OneOrMany(out))
            }
        }
        d.deserialize_any(Visitor)
    }
}

impl TryFrom<RawAclSpec> for AclSpec {
    type Error = AclError;

    fn try_from(raw: RawAclSpec) -> Result<AclSpec, AclError> {
        use MatcherSpec as M;
        let candidates = [
            raw.path.map(M::Path),
            raw.path_prefix.map(M::PathPrefix),
            raw.path_suffix.map(M::PathSuffix),
            raw.path_regex.map(M::PathRegex),
            raw.path_raw_regex.map(M::PathRawRegex),
            raw.host.map(M::Host),
            raw.host_suffix.map(M::HostSuffix),
            raw.header_present.map(M::HeaderPresent),
            raw.header.map(|h| M::Header {
                name: h.name,
                value: h.value,
            }),
            raw.header_regex.map(|h| M::HeaderRegex {
                name: h.name,
                regex: h.regex,
            }),
            raw.method.map(|m| M::Method(m.0)),
            raw.src.map(|s| M::Src(s.0)),
            raw.sni.map(M::Sni),
            raw.sni_suffix.map(M::SniSuffix),
            raw.client_cert.map(M::ClientCert),
            raw.query.map(|q| M::Query {
                name: q.name,
                value: q.value,
            }),
            raw.cookie.map(|c| M::Cookie {
                name: c.name,
                value: c.value,
            }),
            raw.src_request_rate.map(|r| M::SrcRequestRate {
                above: r.above,
                period: r.period,
            }),
        ];
        let mut found: Vec<MatcherSpec> = candidates.into_iter().flatten().collect();
        if found.len() == 1
            && let Some(matcher) = found.pop()
        {
            let path_key = matches!(
                matcher,
                M::Path(_)
                    | M::PathPrefix(_)
                    | M::PathSuffix(_)
                    | M::PathRegex(_)
                    | M::PathRawRegex(_)
            );
            if raw.ignore_case && !path_key {
                return Err(AclError::BadValue {
                    name: raw.name,
                    reason: "`ignore_case` applies to the path keys only".to_owned(),
                });
            }
            return Ok(AclSpec {
                name: raw.name,
                matcher,
                ignore_case: raw.ignore_case,
            });
        }
        Err(AclError::Matchers {
            name: raw.name,
            found: found.iter().map(MatcherSpec::key).collect(),
        })
    }
}

impl<'de> Deserialize<'de> for AclSpec {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = RawAclSpec::deserialize(d)?;
        AclSpec::try_from(raw).map_err(serde::de::Error::custom)
    }
}

/// The parts of an HTTP request (and its connection) that ACLs look at.
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// The method, e.g. `GET`.
    pub method: &'a str,
    /// The path; anything from a `?` on is treated as the query.
    pub path: &'a str,
    /// The query string without `?`, if any.
    pub query: Option<&'a str>,
    /// The Host header or URI authority, possibly with `:port`.
    pub host: Option<&'a str>,
    /// The request headers.
    pub headers: &'a HeaderMap,
    /// The client's address.
    pub src: IpAddr,
    /// The TLS server name, if the connection is TLS with SNI.
    pub sni: Option<&'a str>,
    /// The client presented a TLS certificate that verified.
    pub client_cert: bool,
    /// The client's source's request rate over each period a
    /// `src_request_rate` ACL of the frontend names (empty without one).
    pub src_request_rates: &'a [(Duration, u32)],
}

/// No headers: what a connection shows before any request.
static NO_HEADERS: std::sync::LazyLock<HeaderMap> = std::sync::LazyLock::new(HeaderMap::new);

impl<'a> Request<'a> {
    /// What a connection from `src` shows before any request: its source
    /// alone (no TLS facts, no request rates).
    pub fn connection(src: IpAddr) -> Self {
        Request {
            method: "",
            path: "",
            query: None,
            host: None,
            headers: &NO_HEADERS,
            src,
            sni: None,
            client_cert: false,
            src_request_rates: &[],
        }
    }

    fn path_only(&self) -> &'a str {
        match self.path.split_once('?') {
            Some((path, _)) => path,
            None => self.path,
        }
    }

    fn query_string(&self) -> Option<&'a str> {
        self.query
            .or_else(|| self.path.split_once('?').map(|(_, q)| q))
    }
}

/// A network of `src`, IPv4-mapped IPv6 networks stored as IPv4.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Cidr {
    V4 { net: u32, mask: u32 },
    V6 { net: u128, mask: u128 },
}

impl Cidr {
    /// An address or `address/prefix`; the reason when it is neither.
    pub(crate) fn parse(text: &str) -> Result<Cidr, String> {
        let (addr, prefix) = match text.split_once('/') {
            Some((a, p)) => (a, Some(p)),
            None => (text, None),
        };
        let addr: IpAddr = addr
            .parse()
            .map_err(|_| format!("`{addr}` is not an IPv4 or IPv6 address"))?;
        let max: u32 = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            None => max,
            Some(p) => {
                if p.is_empty() || p.len() > 3 || !p.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(format!("prefix length `{p}` is not a number"));
                }
                let n: u32 = p
                    .parse()
                    .map_err(|_| format!("prefix length `{p}` is not a number"))?;
                if n > max {
                    return Err(format!("prefix length {n} is longer than {max}"));
                }
                n
            }
        };
        let cidr = match addr {
            IpAddr::V4(a) => {
                let bits = u32::from(a);
                let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
                if bits & mask != bits {
                    return Err(format!(
                        "host bits are set; the network is {}/{prefix}",
                        std::net::Ipv4Addr::from(bits & mask)
                    ));
                }
                Cidr::V4 { net: bits, mask }
            }
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
                if bits & mask != bits {
                    return Err(format!(
                        "host bits are set; the network is {}/{prefix}",
                        std::net::Ipv6Addr::from(bits & mask)
                    ));
                }
                if prefix >= 96 && bits >> 32 == 0xffff {
                    // ::ffff:a.b.c.d/n is the IPv4 network a.b.c.d/(n-96).
                    Cidr::V4 {
                        net: bits as u32,
                        mask: mask as u32,
                    }
                } else {
                    Cidr::V6 { net: bits, mask }
                }
            }
        };
        Ok(cidr)
    }

    /// Whether `addr` (IPv4-mapped: as IPv4) is in it.
    pub(crate) fn contains(&self, addr: IpAddr) -> bool {
        match (self, addr.to_canonical()) {
            (Cidr::V4 { net, mask }, IpAddr::V4(a)) => u32::from(a) & mask == *net,
            (Cidr::V6 { net, mask }, IpAddr::V6(a)) => u128::from(a) & mask == *net,
            _ => false,
        }
    }
}

/// A compiled matcher.
#[derive(Debug, Clone)]
enum Matcher {
    Path(String),
    PathPrefix(String),
    PathSuffix(String),
    PathRegex(regex::Regex),
    PathRawRegex(regex::Regex),
    /// A path matcher compiled lower-case, applied to the lower-cased path.
    CaseFolded(Box<Matcher>),
    Host(String),
    HostSuffix(String),
    HeaderPresent(HeaderName),
    Header {
        name: HeaderName,
        value: String,
    },
    HeaderRegex {
        name: HeaderName,
        regex: regex::bytes::Regex,
    },
    Method(Vec<String>),
    Src(Vec<Cidr>),
    Sni(String),
    SniSuffix(String),
    ClientCert(bool),
    Query {
        name: String,
        value: Option<String>,
    },
    Cookie {
        name: String,
        value: Option<String>,
    },
    SrcRequestRate {
        above: u32,
        period: Duration,
    },
}

/// The checks of one matcher's values, with errors naming its ACL and key.
struct Check<'a> {
    acl: &'a str,
    key: &'static str,
}

impl Check<'_> {
    fn bad(&self, reason: String) -> AclError {
        AclError::BadValue {
            name: self.acl.to_owned(),
            reason,
        }
    }

    fn non_empty(&self, v: &str) -> Result<String, AclError> {
        if v.is_empty() {
            return Err(self.bad(format!("`{}` must not be empty", self.key)));
        }
        Ok(v.to_owned())
    }

    fn rate_period(&self, period: Duration) -> Result<Duration, AclError> {
        if !RATE_PERIODS.contains(&period) {
            return Err(self.bad(format!(
                "`{}` period {period:?} is out of range; expected 1s..=1h",
                self.key
            )));
        }
        Ok(period)
    }

    fn header_name(&self, n: &str) -> Result<HeaderName, AclError> {
        HeaderName::from_bytes(n.as_bytes())
            .map_err(|_| self.bad(format!("`{n}` is not a valid header name")))
    }

    /// A host or SNI name: lower case, without the root's dot, no port.
    fn host_like(&self, v: &str) -> Result<String, AclError> {
        let v = v.strip_suffix('.').unwrap_or(v);
        if v.is_empty() {
            return Err(self.bad(format!("`{}` must not be empty", self.key)));
        }
        if v.contains(':') && !v.starts_with('[') {
            return Err(self.bad(format!(
                "`{}` must not contain a port (`{v}`): the port is ignored",
                self.key
            )));
        }
        Ok(v.to_ascii_lowercase())
    }
}

impl Matcher {
    fn compile(acl: &str, spec: &MatcherSpec) -> Result<Matcher, AclError> {
        let check = Check {
            acl,
            key: spec.key(),
        };
        let regex_error = |error| AclError::BadRegex {
            name: acl.to_owned(),
            error,
        };
        let bad = |reason: String| check.bad(reason);
        let non_empty = |v: &str| check.non_empty(v);
        let header_name = |n: &str| check.header_name(n);
        let host_like = |v: &str| check.host_like(v);
        Ok(match spec {
            MatcherSpec::Path(p) => Matcher::Path(non_empty(p)?),
            MatcherSpec::PathPrefix(p) => Matcher::PathPrefix(non_empty(p)?),
            MatcherSpec::PathSuffix(p) => Matcher::PathSuffix(non_empty(p)?),
            MatcherSpec::PathRegex(r) => {
                Matcher::PathRegex(regex::Regex::new(r).map_err(regex_error)?)
            }
            MatcherSpec::PathRawRegex(r) => {
                Matcher::PathRawRegex(regex::Regex::new(r).map_err(regex_error)?)
            }
            MatcherSpec::Host(h) => Matcher::Host(host_like(h)?),
            MatcherSpec::HostSuffix(h) => Matcher::HostSuffix(host_like(h)?),
            MatcherSpec::HeaderPresent(n) => Matcher::HeaderPresent(header_name(n)?),
            MatcherSpec::Header { name, value } => Matcher::Header {
                name: header_name(name)?,
                value: value.clone(),
            },
            MatcherSpec::HeaderRegex { name, regex } => Matcher::HeaderRegex {
                name: header_name(name)?,
                regex: regex::bytes::Regex::new(regex).map_err(regex_error)?,
            },
            MatcherSpec::Method(methods) => {
                if methods.is_empty() {
                    return Err(bad("`method` must list at least one method".to_owned()));
                }
                for m in methods {
                    Method::from_bytes(m.as_bytes())
                        .map_err(|_| bad(format!("`{m}` is not a valid HTTP method")))?;
                }
                Matcher::Method(methods.clone())
            }
            MatcherSpec::Src(cidrs) => {
                if cidrs.is_empty() {
                    return Err(bad("`src` must list at least one network".to_owned()));
                }
                let parsed = cidrs
                    .iter()
                    .map(|c| {
                        Cidr::parse(c).map_err(|reason| AclError::BadCidr {
                            name: acl.to_owned(),
                            cidr: c.clone(),
                            reason,
                        })
                    })
                    .collect::<Result<Vec<_>, _>>()?;
                Matcher::Src(parsed)
            }
            MatcherSpec::Sni(s) => Matcher::Sni(host_like(s)?),
            MatcherSpec::SniSuffix(s) => Matcher::SniSuffix(host_like(s)?),
            MatcherSpec::ClientCert(b) => Matcher::ClientCert(*b),
            MatcherSpec::Query { name, value } => Matcher::Query {
                name: non_empty(name)?,
                value: value.clone(),
            },
            MatcherSpec::Cookie { name, value } => Matcher::Cookie {
                name: non_empty(name)?,
                value: value.clone(),
            },
            MatcherSpec::SrcRequestRate { above, period } => Matcher::SrcRequestRate {
                above: *above,
                period: check.rate_period(*period)?,
            },
        })
    }

    /// This path matcher made ASCII case-insensitive.
    fn case_folded(self) -> Matcher {
        let fold = |p: String| p.to_ascii_lowercase();
        let with_i =
            |r: regex::Regex| regex::Regex::new(&format!("(?i:{})", r.as_str())).unwrap_or(r);
        match self {
            Matcher::Path(p) => Matcher::CaseFolded(Box::new(Matcher::Path(fold(p)))),
            Matcher::PathPrefix(p) => Matcher::CaseFolded(Box::new(Matcher::PathPrefix(fold(p)))),
            Matcher::PathSuffix(p) => Matcher::CaseFolded(Box::new(Matcher::PathSuffix(fold(p)))),
            Matcher::PathRegex(r) => Matcher::PathRegex(with_i(r)),
            Matcher::PathRawRegex(r) => Matcher::PathRawRegex(with_i(r)),
            other => other,
        }
    }

    fn matches(&self, req: &Request) -> bool {
        match self {
            Matcher::CaseFolded(inner) => {
                // Normalized first: an escape may decode to an upper-case letter.
                let lower = normalize_path(req.path_only()).to_ascii_lowercase();
                inner.matches(&Request {
                    path: &lower,
                    ..*req
                })
            }
            // Normalizing borrows the path unless it has escapes, `//` or dot segments.
            Matcher::Path(p) => normalize_path(req.path_only()) == p.as_str(),
            Matcher::PathPrefix(p) => normalize_path(req.path_only()).starts_with(p.as_str()),
            Matcher::PathSuffix(p) => normalize_path(req.path_only()).ends_with(p.as_str()),
            Matcher::PathRegex(r) => r.is_match(&normalize_path(req.path_only())),
            Matcher::PathRawRegex(r) => r.is_match(req.path_only()),
            Matcher::Host(h) => req
                .host
                .is_some_and(|v| host_only(v).eq_ignore_ascii_case(h)),
            Matcher::HostSuffix(h) => req.host.is_some_and(|v| ends_with_ci(host_only(v), h)),
            Matcher::HeaderPresent(n) => req.headers.contains_key(n),
            Matcher::Header { name, value } => req
                .headers
                .get_all(name)
                .iter()
                .any(|v| v.as_bytes() == value.as_bytes()),
            Matcher::HeaderRegex { name, regex } => req
                .headers
                .get_all(name)
                .iter()
                .any(|v| regex.is_match(v.as_bytes())),
            Matcher::Method(ms) => ms.iter().any(|m| m == req.method),
            Matcher::Src(cidrs) => cidrs.iter().any(|c| c.contains(req.src)),
            Matcher::Sni(s) => req.sni.is_some_and(|v| trim_dot(v).eq_ignore_ascii_case(s)),
            Matcher::SniSuffix(s) => req.sni.is_some_and(|v| ends_with_ci(trim_dot(v), s)),
            Matcher::ClientCert(b) => req.client_cert == *b,
            Matcher::Query { name, value } => req.query_string().is_some_and(|q| {
                q.split('&').filter(|p| !p.is_empty()).any(|pair| {
                    let (n, v) = pair.split_once('=').unwrap_or((pair, ""));
                    form_decoded_eq(n.as_bytes(), name.as_bytes())
                        && value
                            .as_ref()
                            .is_none_or(|want| form_decoded_eq(v.as_bytes(), want.as_bytes()))
                })
            }),
            Matcher::SrcRequestRate { above, period } => req
                .src_request_rates
                .iter()
                .any(|(p, rate)| p == period && rate > above),
            Matcher::Cookie { name, value } => {
                req.headers.get_all(http::header::COOKIE).iter().any(|h| {
                    h.as_bytes().split(|&b| b == b';').any(|pair| {
                        let pair = pair.trim_ascii();
                        let Some(eq) = pair.iter().position(|&b| b == b'=') else {
                            return false;
                        };
                        let (n, v) = (pair[..eq].trim_ascii(), pair[eq + 1..].trim_ascii());
                        n == name.as_bytes()
                            && value.as_ref().is_none_or(|want| v == want.as_bytes())
                    })
                })
            }
        }
    }
}

/// The host without `:port` and without a trailing dot; IPv6 literals keep their brackets.
fn host_only(host: &str) -> &str {
    let host = if host.starts_with('[') {
        match host.find(']') {
            Some(i) => &host[..=i],
            None => host,
        }
    } else {
        match host.split_once(':') {
            Some((h, _)) => h,
            None => host,
        }
    };
    trim_dot(host)
}

fn trim_dot(name: &str) -> &str {
    name.strip_suffix('.').unwrap_or(name)
}

fn ends_with_ci(s: &str, suffix: &str) -> bool {
    let (s, x) = (s.as_bytes(), suffix.as_bytes());
    s.len() >= x.len() && s[s.len() - x.len()..].eq_ignore_ascii_case(x)
}

/// Whether form-decoding `raw` (`%xx`, `+` as space) gives exactly `want`, without allocating.
fn form_decoded_eq(raw: &[u8], want: &[u8]) -> bool {
    fn hex(b: u8) -> Option<u8> {
        match b {
            b'0'..=b'9' => Some(b - b'0'),
            b'a'..=b'f' => Some(b - b'a' + 10),
            b'A'..=b'F' => Some(b - b'A' + 10),
            _ => None,
        }
    }
    let (mut i, mut j) = (0, 0);
    while i < raw.len() {
        let (byte, used) = match raw[i] {
            b'+' => (b' ', 1),
            b'%' => match (
                raw.get(i + 1).and_then(|&b| hex(b)),
                raw.get(i + 2).and_then(|&b| hex(b)),
            ) {
                (Some(h), Some(l)) => (h << 4 | l, 3),
                _ => (b'%', 1),
            },
            b => (b, 1),
        };
        if want.get(j) != Some(&byte) {
            return false;
        }
        i += used;
        j += 1;
    }
    j == want.len()
}

fn valid_name(name: &str) -> bool {
    !matches!(name, "and" | "or" | "not") && name.chars().all(is_name_char)
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')
}

/// The periods a `src_request_rate` may count over.
const RATE_PERIODS: std::ops::RangeInclusive<Duration> =
    Duration::from_secs(1)..=Duration::from_secs(3600);

/// The distinct periods of the `src_request_rate` ACLs among `specs`: the
/// request rates a frontend keeps (`request_rate`).
pub fn request_rate_periods(specs: &[AclSpec]) -> Vec<Duration> {
    let mut periods = Vec::new();
    for spec in specs {
        if let MatcherSpec::SrcRequestRate { period, .. } = spec.matcher
            && !periods.contains(&period)
        {
            periods.push(period);
        }
    }
    periods
}

/// Compiled ACLs by name; entries sharing a name are OR-ed.
#[derive(Debug, Clone, Default)]
pub struct AclSet {
    by_name: HashMap<String, Vec<Matcher>>,
}

impl AclSet {
    /// Validates and compiles ACL entries (regexes, networks, header names) once.
    pub fn compile(specs: &[AclSpec]) -> Result<AclSet, AclError> {
        let mut by_name: HashMap<String, Vec<Matcher>> = HashMap::new();
        for spec in specs {
            if spec.name.is_empty() {
                return Err(AclError::EmptyName);
            }
            if !valid_name(&spec.name) {
                return Err(AclError::BadName(spec.name.clone()));
            }
            let mut matcher = Matcher::compile(&spec.name, &spec.matcher)?;
            if spec.ignore_case {
                matcher = matcher.case_folded();
            }
            by_name.entry(spec.name.clone()).or_default().push(matcher);
        }
        Ok(AclSet { by_name })
    }

    /// Whether an ACL of this name is defined.
    pub fn contains(&self, name: &str) -> bool {
        self.by_name.contains_key(name)
    }

    /// Whether any entry of the named ACL matches; an undefined name never matches.
    pub fn matches(&self, name: &str, req: &Request) -> bool {
        self.by_name
            .get(name)
            .is_some_and(|ms| ms.iter().any(|m| m.matches(req)))
    }
}

/// A request's target in origin-form (`/path?query`), as servers get it
/// and the log shows it: an absolute URI's empty path is "/" (RFC 9112
/// 3.2.1; `http://h?q` is `/?q`, where `path_and_query` alone says `?q`).
pub(crate) fn origin_target(uri: &http::Uri) -> std::borrow::Cow<'_, str> {
    match uri.path_and_query().map(http::uri::PathAndQuery::as_str) {
        Some(pq) if pq.starts_with('?') => format!("/{pq}").into(),
        Some(pq) => pq.into(),
        None => "/".into(),
    }
}

/// The path as path ACLs see it (RFC 3986 6.2.2, 6.2.2.3): `%XX` escapes of
/// unreserved characters decoded and the others' hex upper-cased, runs of
/// `/` merged, then `.` and `..` segments removed (`..` never climbs above
/// the root). Beyond RFC 3986, what some server would read as the same
/// path is read so too, so that a rule cannot be dodged by a spelling its
/// server takes for the one it guards: `;` parameters of a segment are
/// dropped (Java servers: `/x/..;/admin`, `/admin;jsessionid=1`), and an
/// encoded `/` or `\` (`%2F`, `%5C`) is a `/` (servers that decode before
/// they route). Borrowed when there is nothing to change (the common case).
pub fn normalize_path(path: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    let odd = path.contains('%')
        || path.contains("//")
        || path.contains(';')
        || path.split('/').any(|s| s == "." || s == "..");
    if !odd || !path.starts_with('/') {
        return Cow::Borrowed(path);
    }
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |at: usize| b.get(at).and_then(|c| (*c as char).to_digit(16));
        if b[i] == b';' {
            // A segment's parameters: up to the next `/`.
            i = path[i..].find('/').map_or(b.len(), |n| i + n);
            continue;
        }
        if let (b'%', Some(hi), Some(lo)) = (b[i], hex(i + 1), hex(i + 2)) {
            let c = (hi * 16 + lo) as u8;
            if c.is_ascii_alphanumeric() || b"-._~".contains(&c) {
                decoded.push(c as char);
            } else if c == b'/' || c == b'\\' {
                decoded.push('/');
            } else {
                decoded.push('%');
                decoded.push_str(&path[i + 1..i + 3].to_ascii_uppercase());
            }
            i += 3;
            continue;
        }
        // Multi-byte characters are copied whole.
        let len = path[i..].chars().next().map_or(1, char::len_utf8);
        decoded.push_str(&path[i..i + len]);
        i += len;
    }
    let mut segments: Vec<&str> = Vec::new();
    let last = decoded.rsplit('/').next().unwrap_or("");
    let trailing_slash = last.is_empty() || last == "." || last == "..";
    for seg in decoded.split('/') {
        match seg {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for seg in &segments {
        out.push('/');
        out.push_str(seg);
    }
    if trailing_slash || segments.is_empty() {
        out.push('/');
    }
    Cow::Owned(out)
}

/// A parsed `if` condition over ACL names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Condition {
    /// True when the named ACL matches.
    Acl(String),
    /// True when the inner condition is false.
    Not(Box<Condition>),
    /// True when all are true (an empty list is true).
    And(Vec<Condition>),
    /// True when any is true (an empty list is false).
    Or(Vec<Condition>),
}

impl Condition {
    /// The ACL names it uses.
    pub fn names(&self) -> Vec<&str> {
        match self {
            Condition::Acl(name) => vec![name.as_str()],
            Condition::Not(c) => c.names(),
            Condition::And(cs) | Condition::Or(cs) => cs.iter().flat_map(|c| c.names()).collect(),
        }
    }

    /// Evaluates the condition for a request, short-circuiting left to right.
    pub fn eval(&self, acls: &AclSet, req: &Request) -> bool {
        match self {
            Condition::Acl(name) => acls.matches(name, req),
            Condition::Not(c) => !c.eval(acls, req),
            Condition::And(cs) => cs.iter().all(|c| c.eval(acls, req)),
            Condition::Or(cs) => cs.iter().any(|c| c.eval(acls, req)),
        }
    }
}

/// Minimal parentheses, keywords spelled out: parses back to the same condition.
impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Condition::Acl(name) => f.write_str(name),
            Condition::Not(c) => match **c {
                Condition::And(_) | Condition::Or(_) => write!(f, "not ({c})"),
                _ => write!(f, "not {c}"),
            },
            Condition::And(cs) => {
                for (i, c) in cs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" and ")?;
                    }
                    match c {
                        Condition::Or(_) | Condition::And(_) => write!(f, "({c})")?,
                        _ => write!(f, "{c}")?,
                    }
                }
                Ok(())
            }
            Condition::Or(cs) => {
                for (i, c) in cs.iter().enumerate() {
                    if i > 0 {
                        f.write_str(" or ")?;
                    }
                    match c {
                        Condition::Or(_) => write!(f, "({c})")?,
                        _ => write!(f, "{c}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tok<'a> {
    Name(&'a str),
    And,
    Or,
    Not,
    Open,
    Close,
}

impl fmt::Display for Tok<'_> {
    fn fmt(&self, f: &mut fmt::Formatter) -> fmt::Result {
        match self {
            Tok::Name(n) => write!(f, "`{n}`"),
            Tok::And => f.write_str("`and`"),
            Tok::Or => f.write_str("`or`"),
            Tok::Not => f.write_str("`not`"),
            Tok::Open => f.write_str("`(`"),
            Tok::Close => f.write_str("`)`"),
        }
    }
}

fn syntax(column: usize, message: impl Into<String>) -> AclError {
    AclError::Syntax {
        column,
        message: message.into(),
    }
}

/// Splits a condition into tokens with their 1-based character columns.
fn tokenize(text: &str) -> Result<Vec<(Tok<'_>, usize)>, AclError> {
    let mut tokens = Vec::new();
    let mut chars = text.char_indices().enumerate().peekable();
    while let Some((col0, (start, c))) = chars.next() {
        let column = col0 + 1;
        let next_is = |chars: &mut std::iter::Peekable<_>, want: char| matches!(chars.peek(), Some((_, (_, n))) if *n == want);
        let tok = match c {
            c if c.is_whitespace() => continue,
            '(' => Tok::Open,
            ')' => Tok::Close,
            '!' => Tok::Not,
            '|' | '&' => {
                if !next_is(&mut chars, c) {
                    let word = if c == '|' { "or" } else { "and" };
                    return Err(syntax(
                        column,
                        format!("unexpected `{c}`: write `{c}{c}` or `{word}`"),
                    ));
                }
                chars.next();
                if c == '|' { Tok::Or } else { Tok::And }
            }
            '{' => {
                return Err(syntax(
                    column,
                    "anonymous ACLs `{ ... }` are not supported: define a named ACL",
                ));
            }
            c if is_name_char(c) => {
                let mut end = start + c.len_utf8();
                while let Some((_, (i, n))) = chars.peek() {
                    if !is_name_char(*n) {
                        break;
                    }
                    end = i + n.len_utf8();
                    chars.next();
                }
                match &text[start..end] {
                    "and" => Tok::And,
                    "or" => Tok::Or,
                    "not" => Tok::Not,
                    name => Tok::Name(name),
                }
            }
            c => return Err(syntax(column, format!("unexpected character `{c}`"))),
        };
        tokens.push((tok, column));
    }
    Ok(tokens)
}

struct Parser<'t, 'k> {
    tokens: Vec<(Tok<'t>, usize)>,
    at: usize,
    end_column: usize,
    depth: usize,
    known: &'k dyn Fn(&str) -> bool,
}

impl<'t> Parser<'t, '_> {
    fn peek(&self) -> Option<Tok<'t>> {
        self.tokens.get(self.at).map(|&(t, _)| t)
    }

    fn column(&self) -> usize {
        self.tokens
            .get(self.at)
            .map_or(self.end_column, |&(_, c)| c)
    }

    fn eat(&mut self, tok: Tok) -> bool {
        let hit = self.peek() == Some(tok);
        if hit {
            self.at += 1;
        }
        hit
    }

    fn enter(&mut self) -> Result<(), AclError> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(syntax(
                self.column(),
                format!("nested deeper than {MAX_DEPTH} levels"),
            ));
        }
        Ok(())
    }

    fn or(&mut self) -> Result<Condition, AclError> {
        let mut terms = vec![self.and()?];
        while self.eat(Tok::Or) {
            terms.push(self.and()?);
        }
        Ok(join(terms, false))
    }

    fn and(&mut self) -> Result<Condition, AclError> {
        let mut terms = vec![self.unary()?];
        loop {
            if self.eat(Tok::And) {
                terms.push(self.unary()?);
            } else if matches!(self.peek(), Some(Tok::Name(_) | Tok::Not | Tok::Open)) {
                // HAProxy's implicit AND: `if a !b`.
                terms.push(self.unary()?);
            } else {
                break;
            }
        }
        Ok(join(terms, true))
    }

    fn unary(&mut self) -> Result<Condition, AclError> {
        if self.eat(Tok::Not) {
            self.enter()?;
            let inner = self.unary()?;
            self.depth -= 1;
            Ok(Condition::Not(Box::new(inner)))
        } else {
            self.primary()
        }
    }

    fn primary(&mut self) -> Result<Condition, AclError> {
        let column = self.column();
        match self.peek() {
            Some(Tok::Name(name)) => {
                self.at += 1;
                if !(self.known)(name) {
                    return Err(AclError::UnknownAcl {
                        name: name.to_owned(),
                        column,
                    });
                }
                Ok(Condition::Acl(name.to_owned()))
            }
            Some(Tok::Open) => {
                self.at += 1;
                self.enter()?;
                let inner = self.or()?;
                self.depth -= 1;
                if !self.eat(Tok::Close) {
                    return Err(syntax(
                        self.column(),
                        format!("expected `)` to close the `(` at column {column}"),
                    ));
                }
                Ok(inner)
            }
            Some(tok) => Err(syntax(
                column,
                format!("expected an ACL name, `not`, `!` or `(`, found {tok}"),
            )),
            None => Err(syntax(
                column,
                "expected an ACL name, `not`, `!` or `(` at the end of the condition",
            )),
        }
    }
}

/// One term stays itself; several become an AND (or OR), same-kind terms flattened.
fn join(mut terms: Vec<Condition>, is_and: bool) -> Condition {
    if terms.len() == 1
        && let Some(t) = terms.pop()
    {
        return t;
    }
    let mut flat = Vec::with_capacity(terms.len());
    for t in terms {
        match t {
            Condition::And(inner) if is_and => flat.extend(inner),
            Condition::Or(inner) if !is_and => flat.extend(inner),
            t => flat.push(t),
        }
    }
    if is_and {
        Condition::And(flat)
    } else {
        Condition::Or(flat)
    }
}

/// Parses an `if` condition; `known` says which ACL names are defined.
pub fn parse_condition(text: &str, known: &dyn Fn(&str) -> bool) -> Result<Condition, AclError> {
    let tokens = tokenize(text)?;
    if tokens.is_empty() {
        return Err(syntax(1, "empty condition"));
    }
    let mut parser = Parser {
        tokens,
        at: 0,
        end_column: text.chars().count() + 1,
        depth: 0,
        known,
    };
    let condition = parser.or()?;
    match parser.peek() {
        None => Ok(condition),
        Some(Tok::Close) => Err(syntax(
            parser.column(),
            "unexpected `)` without a matching `(`",
        )),
        Some(tok) => Err(syntax(parser.column(), format!("unexpected {tok}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origin_targets_have_a_path() {
        let t = |u: &str| origin_target(&u.parse().unwrap()).into_owned();
        assert_eq!(t("http://h?q=1"), "/?q=1");
        assert_eq!(t("http://h"), "/");
        assert_eq!(t("http://h/p?q"), "/p?q");
        assert_eq!(t("/p"), "/p");
        assert_eq!(t("*"), "*");
    }
    use http::HeaderValue;
    use std::net::{Ipv4Addr, Ipv6Addr};

    /// An owned request to borrow a [`Request`] from.
    struct Req {
        method: &'static str,
        path: &'static str,
        query: Option<&'static str>,
        host: Option<&'static str>,
        headers: HeaderMap,
        src: IpAddr,
        sni: Option<&'static str>,
        client_cert: bool,
        rates: Vec<(Duration, u32)>,
    }

    impl Req {
        fn get(path: &'static str) -> Req {
            Req {
                method: "GET",
                path,
                query: None,
                host: None,
                headers: HeaderMap::new(),
                src: IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1)),
                sni: None,
                client_cert: false,
                rates: Vec::new(),
            }
        }

        fn header(mut self, name: &'static str, value: &'static str) -> Req {
            self.headers.append(
                HeaderName::from_static(name),
                HeaderValue::from_static(value),
            );
            self
        }

        fn r(&self) -> Request<'_> {
            Request {
                method: self.method,
                path: self.path,
                query: self.query,
                host: self.host,
                headers: &self.headers,
                src: self.src,
                sni: self.sni,
                client_cert: self.client_cert,
                src_request_rates: &self.rates,
            }
        }
    }

    #[derive(Deserialize)]
    struct Doc {
        acl: Vec<AclSpec>,
    }

    fn specs(toml_text: &str) -> Result<Vec<AclSpec>, toml::de::Error> {
        toml::from_str::<Doc>(toml_text).map(|d| d.acl)
    }

    /// An ACL set with one ACL `a` made of the given matcher line.
    fn one(matcher: &str) -> AclSet {
        let text = format!("[[acl]]\nname = \"a\"\n{matcher}\n");
        AclSet::compile(&specs(&text).unwrap()).unwrap()
    }

    fn compile_err(matcher: &str) -> AclError {
        let text = format!("[[acl]]\nname = \"a\"\n{matcher}\n");
        AclSet::compile(&specs(&text).unwrap()).unwrap_err()
    }

    fn hit(set: &AclSet, req: &Req) -> bool {
        set.matches("a", &req.r())
    }

    fn src(addr: &str) -> Req {
        let mut r = Req::get("/");
        r.src = addr.parse().unwrap();
        r
    }

    #[test]
    fn path_exact_ignores_query_and_is_case_sensitive() {
        let set = one(r#"path = "/login""#);
        assert!(hit(&set, &Req::get("/login")));
        assert!(hit(&set, &Req::get("/login?next=/")));
        let mut with_query = Req::get("/login");
        with_query.query = Some("a=1");
        assert!(hit(&set, &with_query));
        assert!(!hit(&set, &Req::get("/Login")));
        assert!(!hit(&set, &Req::get("/login/")));
        assert!(!hit(&set, &Req::get("/logi")));
    }

    #[test]
    fn paths_are_normalized_for_path_keys_but_not_for_the_raw_regex() {
        for (raw, normal) in [
            ("/admin", "/admin"),
            ("//admin", "/admin"),
            ("/./admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/%2e%2e/admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/x/..//.//admin/", "/admin/"),
            ("/../../admin", "/admin"),
            ("/a/.", "/a/"),
            ("/a/b/..", "/a/"),
            ("/..", "/"),
            // Read as the servers that decode them before routing would.
            ("/a%2fb", "/a/b"),
            ("/a%5C..%5Cadmin", "/admin"),
            // Segment parameters, as Java servers drop them.
            ("/public/..;/admin", "/admin"),
            ("/secret;jsessionid=1", "/secret"),
            ("/x.php;", "/x.php"),
            ("/a;b/c;d=e/", "/a/c/"),
            ("/%7Euser/%zz", "/~user/%zz"),
            ("/caf\u{e9}/%41", "/caf\u{e9}/A"),
        ] {
            assert_eq!(normalize_path(raw), normal, "{raw}");
        }
        let set = one(r#"path_prefix = "/admin""#);
        for sneaky in [
            "//admin",
            "/./admin",
            "/%61dmin",
            "/x/../admin",
            "/%2E%2E/admin/x",
            "/public/..;/admin",
            "/admin;jsessionid=1",
            "/x%2F..%2Fadmin",
        ] {
            assert!(hit(&set, &Req::get(sneaky)), "{sneaky}");
        }
        // Case is kept unless the entry says otherwise (HAProxy's -i).
        assert!(!hit(&set, &Req::get("/ADMIN")));
        let set = one("path_prefix = \"/Admin\"\nignore_case = true");
        for p in ["/admin/x", "/ADMIN", "//%41dmin", "/x/../aDmIn"] {
            assert!(hit(&set, &Req::get(p)), "{p}");
        }
        let set = one("path_regex = \"^/admin$\"\nignore_case = true");
        assert!(hit(&set, &Req::get("/Admin")));
        assert!(specs("[[acl]]\nname = \"a\"\nhost = \"x\"\nignore_case = true\n").is_err());
        let set = one(r#"path_raw_regex = "^/admin""#);
        assert!(hit(&set, &Req::get("/admin/x")));
        assert!(!hit(&set, &Req::get("//admin")));
        assert!(!hit(&set, &Req::get("/%61dmin")));
    }

    #[test]
    fn path_prefix_and_suffix() {
        let set = one(r#"path_prefix = "/api/""#);
        assert!(hit(&set, &Req::get("/api/")));
        assert!(hit(&set, &Req::get("/api/v1/users")));
        assert!(!hit(&set, &Req::get("/api")));
        assert!(!hit(&set, &Req::get("/API/x")));
        assert!(!hit(&set, &Req::get("/x?/api/")));
        let set = one(r#"path_suffix = ".css""#);
        assert!(hit(&set, &Req::get("/s/site.css")));
        assert!(hit(&set, &Req::get("/s/site.css?v=3")));
        assert!(!hit(&set, &Req::get("/s/site.css.map")));
        assert!(!hit(&set, &Req::get("/s/site.CSS")));
    }

    #[test]
    fn path_regex_is_unanchored_unless_anchored() {
        let set = one(r#"path_regex = "/v[0-9]+/""#);
        assert!(hit(&set, &Req::get("/api/v2/x")));
        assert!(!hit(&set, &Req::get("/api/vx/x")));
        let set = one(r#"path_regex = '^/v[0-9]+/\w+$'"#);
        assert!(hit(&set, &Req::get("/v10/items")));
        assert!(hit(&set, &Req::get("/v10/items?x=/y")));
        assert!(!hit(&set, &Req::get("/api/v10/items")));
    }

    #[test]
    fn bad_regex_names_the_acl() {
        for line in [
            r#"path_regex = "(""#,
            r#"header_regex = { name = "x", regex = "[" }"#,
        ] {
            let e = compile_err(line);
            assert!(
                matches!(&e, AclError::BadRegex { name, .. } if name == "a"),
                "{e}"
            );
            assert!(e.to_string().starts_with("ACL `a`: invalid regex"), "{e}");
        }
    }

    #[test]
    fn host_exact_is_case_insensitive_and_ignores_port() {
        let set = one(r#"host = "Admin.Example.org""#);
        let with = |h: &'static str| {
            let mut r = Req::get("/");
            r.host = Some(h);
            r
        };
        for h in [
            "admin.example.org",
            "ADMIN.EXAMPLE.ORG",
            "admin.example.org:8443",
            "admin.example.org.",
            "admin.example.org.:80",
        ] {
            assert!(hit(&set, &with(h)), "{h}");
        }
        for h in [
            "example.org",
            "x.admin.example.org",
            "admin.example.org.evil",
            "",
            "admin.example.or",
        ] {
            assert!(!hit(&set, &with(h)), "{h}");
        }
        assert!(!hit(&set, &Req::get("/")), "no host");
        let v6 = one(r#"host = "[2001:DB8::1]""#);
        assert!(hit(&v6, &with("[2001:db8::1]:8080")));
        assert!(hit(&v6, &with("[2001:db8::1]")));
        assert!(!hit(&v6, &with("[2001:db8::2]")));
    }

    #[test]
    fn host_suffix_is_case_insensitive() {
        let set = one(r#"host_suffix = ".example.org""#);
        let with = |h: &'static str| {
            let mut r = Req::get("/");
            r.host = Some(h);
            r
        };
        assert!(hit(&set, &with("www.example.org")));
        assert!(hit(&set, &with("a.b.EXAMPLE.Org:80")));
        assert!(!hit(&set, &with("example.org")));
        assert!(!hit(&set, &with("badexample.org")));
        assert!(!hit(&set, &with("org")));
        assert!(!hit(&set, &with("www.example.org.evil")));
        // Non-ASCII host bytes near the cut don't panic.
        assert!(!hit(&set, &with("ééééééééééé")));
    }

    #[test]
    fn host_values_are_validated() {
        assert!(matches!(
            compile_err(r#"host = "a.example:80""#),
            AclError::BadValue { .. }
        ));
        assert!(matches!(
            compile_err(r#"host = """#),
            AclError::BadValue { .. }
        ));
        assert!(matches!(
            compile_err(r#"sni_suffix = ".""#),
            AclError::BadValue { .. }
        ));
        assert!(matches!(
            compile_err(r#"path_prefix = """#),
            AclError::BadValue { .. }
        ));
    }

    #[test]
    fn header_present_name_is_case_insensitive() {
        let set = one(r#"header_present = "X-Debug""#);
        assert!(hit(&set, &Req::get("/").header("x-debug", "")));
        assert!(!hit(&set, &Req::get("/").header("x-debug2", "1")));
        assert!(!hit(&set, &Req::get("/")));
    }

    #[test]
    fn header_equals_value_case_sensitively_on_any_line() {
        let set = one(r#"header = { name = "X-Env", value = "prod" }"#);
        assert!(hit(&set, &Req::get("/").header("x-env", "prod")));
        assert!(hit(
            &set,
            &Req::get("/").header("x-env", "dev").header("x-env", "prod")
        ));
        assert!(!hit(&set, &Req::get("/").header("x-env", "Prod")));
        assert!(!hit(&set, &Req::get("/").header("x-env", "prod2")));
        assert!(!hit(&set, &Req::get("/").header("x-env", "dev, prod")));
        assert!(!hit(&set, &Req::get("/").header("x-other", "prod")));
        let empty = one(r#"header = { name = "X-Env", value = "" }"#);
        assert!(hit(&empty, &Req::get("/").header("x-env", "")));
        assert!(!hit(&empty, &Req::get("/")));
    }

    #[test]
    fn header_regex() {
        let set = one(r#"header_regex = { name = "User-Agent", regex = "(?i)bot" }"#);
        assert!(hit(
            &set,
            &Req::get("/").header("user-agent", "Googlebot/2.1")
        ));
        assert!(!hit(
            &set,
            &Req::get("/").header("user-agent", "Mozilla/5.0")
        ));
        assert!(!hit(&set, &Req::get("/")));
    }

    #[test]
    fn bad_header_name() {
        let e = compile_err(r#"header_present = "X Bad""#);
        assert!(matches!(e, AclError::BadValue { .. }), "{e}");
        assert!(matches!(
            compile_err(r#"header = { name = "", value = "x" }"#),
            AclError::BadValue { .. }
        ));
    }

    #[test]
    fn method_single_or_list_case_sensitive() {
        let set = one(r#"method = "POST""#);
        let with = |m: &'static str| {
            let mut r = Req::get("/");
            r.method = m;
            r
        };
        assert!(hit(&set, &with("POST")));
        assert!(!hit(&set, &with("post")));
        assert!(!hit(&set, &with("GET")));
        let set = one(r#"method = ["GET", "HEAD"]"#);
        assert!(hit(&set, &with("GET")));
        assert!(hit(&set, &with("HEAD")));
        assert!(!hit(&set, &with("PUT")));
        assert!(matches!(
            compile_err("method = []"),
            AclError::BadValue { .. }
        ));
        assert!(matches!(
            compile_err(r#"method = "GE T""#),
            AclError::BadValue { .. }
        ));
        assert!(specs("[[acl]]\nname = \"a\"\nmethod = 3\n").is_err());
    }

    #[test]
    fn src_ipv4_edges() {
        let set = one(r#"src = ["10.0.0.0/8", "198.18.1.2", "192.0.2.128/25"]"#);
        for a in [
            "10.0.0.0",
            "10.255.255.255",
            "198.18.1.2",
            "192.0.2.128",
            "192.0.2.255",
            "::ffff:10.1.2.3",
        ] {
            assert!(hit(&set, &src(a)), "{a}");
        }
        for a in [
            "11.0.0.0",
            "9.255.255.255",
            "198.18.1.3",
            "198.18.1.1",
            "192.0.2.127",
            "::a00:1",
            "2001:db8::1",
        ] {
            assert!(!hit(&set, &src(a)), "{a}");
        }
        let host = one(r#"src = "198.18.1.2/32""#);
        assert!(hit(&host, &src("198.18.1.2")));
        assert!(!hit(&host, &src("198.18.1.3")));
        let all = one(r#"src = ["0.0.0.0/0"]"#);
        assert!(hit(&all, &src("0.0.0.0")));
        assert!(hit(&all, &src("255.255.255.255")));
        assert!(!hit(&all, &src("::1")));
        assert!(!hit(&all, &src("2001:db8::1")));
    }

    #[test]
    fn src_request_rate_compares_the_rate_of_its_own_period() {
        let set = one(r#"src_request_rate = { above = 5, period = "10s" }"#);
        let ten = Duration::from_secs(10);
        let mut r = Req::get("/");
        assert!(!hit(&set, &r), "no rate counted: no match");
        for (rates, want) in [
            (vec![(ten, 5)], false),
            (vec![(ten, 6)], true),
            (vec![(Duration::from_secs(1), 60)], false),
            (vec![(Duration::from_secs(1), 60), (ten, 7)], true),
        ] {
            r.rates = rates;
            assert_eq!(hit(&set, &r), want, "{:?}", r.rates);
        }
        let specs = specs(
            "[[acl]]\nname = \"a\"\nsrc_request_rate = { above = 1, period = \"1m\" }\n\
             [[acl]]\nname = \"b\"\nsrc_request_rate = { above = 9, period = \"60s\" }\n\
             [[acl]]\nname = \"c\"\nsrc_request_rate = { above = 9, period = \"2s\" }\n",
        )
        .unwrap();
        assert_eq!(
            request_rate_periods(&specs),
            [Duration::from_secs(60), Duration::from_secs(2)],
            "one rate per distinct period"
        );
    }

    #[test]
    fn src_request_rate_needs_a_period_of_1s_to_1h() {
        for period in ["500ms", "2h"] {
            let e = compile_err(&format!(
                "src_request_rate = {{ above = 5, period = \"{period}\" }}"
            ));
            assert!(matches!(e, AclError::BadValue { .. }), "{period}: {e}");
            assert!(e.to_string().contains("1s..=1h"), "{e}");
        }
        for bad in [
            "src_request_rate = { above = 5 }",
            "src_request_rate = { above = -1, period = \"1s\" }",
            "src_request_rate = { above = 5, period = 10 }",
            "src_request_rate = { above = 5, period = \"1s\", burst = 2 }",
        ] {
            let text = format!("[[acl]]\nname = \"a\"\n{bad}\n");
            assert!(specs(&text).is_err(), "{bad}");
        }
    }

    #[test]
    fn src_ipv6_edges() {
        let set = one(r#"src = ["2001:db8::/32", "fe80::1/128"]"#);
        for a in [
            "2001:db8::",
            "2001:db8:ffff:ffff:ffff:ffff:ffff:ffff",
            "fe80::1",
        ] {
            assert!(hit(&set, &src(a)), "{a}");
        }
        for a in [
            "2001:db9::",
            "2001:db7:ffff::1",
            "fe80::2",
            "10.0.0.1",
            "32.1.13.184",
        ] {
            assert!(!hit(&set, &src(a)), "{a}");
        }
        let all = one(r#"src = ["::/0"]"#);
        assert!(hit(&all, &src("::")));
        assert!(hit(&all, &src("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff")));
        // An IPv4 client (also as a mapped address) is not in an IPv6 network.
        assert!(!hit(&all, &src("10.0.0.1")));
        assert!(!hit(&all, &src("::ffff:10.0.0.1")));
        // Mapped networks are IPv4 networks.
        let mapped = one(r#"src = ["::ffff:10.0.0.0/104"]"#);
        assert!(hit(&mapped, &src("10.9.9.9")));
        assert!(hit(&mapped, &src("::ffff:10.9.9.9")));
        assert!(!hit(&mapped, &src("11.0.0.0")));
    }

    #[test]
    fn src_cidr_parsing_errors() {
        for bad in [
            "10.0.0.0/33",
            "::/129",
            "10.1.0.0/8",
            "2001:db8::1/32",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "10.0.0.0/-1",
            "10.0.0.0/1000",
            "10.0.0/8",
            "010.0.0.1",
            "host.example",
            "",
            " 10.0.0.1",
            "10.0.0.0/8/8",
        ] {
            let text = format!("src = [{bad:?}]");
            let e = compile_err(&text);
            assert!(
                matches!(&e, AclError::BadCidr { name, cidr, .. } if name == "a" && cidr == bad),
                "{bad}: {e}"
            );
        }
        let e = compile_err(r#"src = "10.1.0.0/8""#);
        assert!(e.to_string().contains("10.0.0.0/8"), "{e}");
        assert!(matches!(compile_err("src = []"), AclError::BadValue { .. }));
        // Parsed values, edges included.
        assert_eq!(Cidr::parse("0.0.0.0/0"), Ok(Cidr::V4 { net: 0, mask: 0 }));
        assert_eq!(Cidr::parse("::/0"), Ok(Cidr::V6 { net: 0, mask: 0 }));
        assert_eq!(
            Cidr::parse("1.2.3.4"),
            Ok(Cidr::V4 {
                net: 0x0102_0304,
                mask: u32::MAX
            })
        );
        assert_eq!(
            Cidr::parse("::1/128"),
            Ok(Cidr::V6 {
                net: 1,
                mask: u128::MAX
            })
        );
        assert_eq!(
            Cidr::parse("::ffff:0:0/96"),
            Ok(Cidr::V4 { net: 0, mask: 0 })
        );
        assert_eq!(
            Cidr::parse("10.0.0.0/08"),
            Ok(Cidr::V4 {
                net: 0x0a00_0000,
                mask: 0xff00_0000
            })
        );
        assert!(
            Cidr::V6 {
                net: u128::from(Ipv6Addr::LOCALHOST),
                mask: u128::MAX
            }
            .contains(IpAddr::V6(Ipv6Addr::LOCALHOST))
        );
    }

    #[test]
    fn sni_exact_and_suffix() {
        let with = |s: Option<&'static str>| {
            let mut r = Req::get("/");
            r.sni = s;
            r
        };
        let set = one(r#"sni = "A.Example""#);
        assert!(hit(&set, &with(Some("a.example"))));
        assert!(hit(&set, &with(Some("A.EXAMPLE"))));
        assert!(!hit(&set, &with(Some("b.a.example"))));
        assert!(!hit(&set, &with(None)));
        let set = one(r#"sni_suffix = ".example""#);
        assert!(hit(&set, &with(Some("a.EXAMPLE"))));
        assert!(!hit(&set, &with(Some("example"))));
        assert!(!hit(&set, &with(None)));
        // SNI is not the Host header.
        let mut host_only = Req::get("/");
        host_only.host = Some("a.example");
        assert!(!hit(&set, &host_only));
    }

    #[test]
    fn client_cert_present_or_absent() {
        let with = |present: bool| {
            let mut r = Req::get("/");
            r.client_cert = present;
            r
        };
        let set = one("client_cert = true");
        assert!(hit(&set, &with(true)));
        assert!(!hit(&set, &with(false)));
        let set = one("client_cert = false");
        assert!(hit(&set, &with(false)));
        assert!(!hit(&set, &with(true)));
        // A header claiming a certificate is not one.
        let set = one("client_cert = true");
        assert!(!hit(&set, &with(false).header("x-ssl-client-cert", "MIIB")));
    }

    #[test]
    fn query_presence_value_and_decoding() {
        let with = |q: &'static str| {
            let mut r = Req::get("/p");
            r.query = Some(q);
            r
        };
        let present = one(r#"query = { name = "debug" }"#);
        for q in [
            "debug=1",
            "a=b&debug",
            "debug=",
            "x=1&debug=0&y",
            "%64ebug=1",
        ] {
            assert!(hit(&present, &with(q)), "{q}");
        }
        for q in ["", "debugx=1", "xdebug=1", "a=debug", "DEBUG=1"] {
            assert!(!hit(&present, &with(q)), "{q}");
        }
        assert!(!hit(&present, &Req::get("/p")));
        assert!(
            hit(&present, &Req::get("/p?debug")),
            "query left in the path"
        );
        let valued = one(r#"query = { name = "debug", value = "1" }"#);
        assert!(hit(&valued, &with("debug=1")));
        assert!(hit(&valued, &with("debug=0&debug=1")));
        assert!(hit(&valued, &with("debug=%31")));
        assert!(!hit(&valued, &with("debug=10")));
        assert!(!hit(&valued, &with("debug")));
        assert!(!hit(&valued, &with("debug=")));
        let spaced = one(r#"query = { name = "q", value = "a b%" }"#);
        assert!(hit(&spaced, &with("q=a+b%")));
        assert!(hit(&spaced, &with("q=a%20b%25")));
        assert!(!hit(&spaced, &with("q=a+b")));
        let empty = one(r#"query = { name = "q", value = "" }"#);
        assert!(hit(&empty, &with("q=")));
        assert!(hit(&empty, &with("q")));
        assert!(!hit(&empty, &with("q=1")));
        assert!(matches!(
            compile_err(r#"query = { name = "" }"#),
            AclError::BadValue { .. }
        ));
    }

    #[test]
    fn form_decoding() {
        assert!(form_decoded_eq(b"a%2Fb", b"a/b"));
        assert!(form_decoded_eq(b"a%2fb", b"a/b"));
        assert!(form_decoded_eq(b"%", b"%"));
        assert!(form_decoded_eq(b"%4", b"%4"));
        assert!(form_decoded_eq(b"%zz", b"%zz"));
        assert!(form_decoded_eq(b"", b""));
        assert!(!form_decoded_eq(b"ab", b"a"));
        assert!(!form_decoded_eq(b"a", b"ab"));
        assert!(form_decoded_eq(b"%C3%A9", "é".as_bytes()));
    }

    #[test]
    fn cookie_presence_and_value() {
        let present = one(r#"cookie = { name = "session" }"#);
        let valued = one(r#"cookie = { name = "session", value = "x" }"#);
        let c = |v: &'static str| Req::get("/").header("cookie", v);
        assert!(hit(&present, &c("session=abc")));
        assert!(hit(&present, &c("a=1; session=; b=2")));
        assert!(!hit(&present, &c("xsession=1; sessionx=2")));
        assert!(!hit(&present, &c("session")));
        assert!(!hit(&present, &c("Session=1")));
        assert!(!hit(&present, &Req::get("/")));
        assert!(hit(&valued, &c("a=1;session=x")));
        assert!(hit(&valued, &c("a=1; session=x ;b=2")));
        assert!(!hit(&valued, &c("session=X")));
        assert!(!hit(&valued, &c("session=xy")));
        // HTTP/2 sends one cookie per field line.
        assert!(hit(
            &valued,
            &Req::get("/")
                .header("cookie", "a=1")
                .header("cookie", "session=x")
        ));
        // Not another header.
        assert!(!hit(
            &valued,
            &Req::get("/").header("set-cookie", "session=x")
        ));
    }

    #[test]
    fn same_name_entries_are_ored_and_undefined_never_matches() {
        let text = r#"
            [[acl]]
            name = "static"
            path_prefix = "/static/"
            [[acl]]
            name = "static"
            path_suffix = ".png"
            [[acl]]
            name = "other"
            path = "/x"
        "#;
        let set = AclSet::compile(&specs(text).unwrap()).unwrap();
        assert!(set.contains("static") && set.contains("other") && !set.contains("nope"));
        assert!(set.matches("static", &Req::get("/static/a.js").r()));
        assert!(set.matches("static", &Req::get("/img/a.png").r()));
        assert!(!set.matches("static", &Req::get("/img/a.jpg").r()));
        assert!(!set.matches("nope", &Req::get("/x").r()));
    }

    #[test]
    fn names_are_validated() {
        let spec = |name: &str| AclSpec {
            name: name.to_owned(),
            matcher: MatcherSpec::Path("/".to_owned()),
            ignore_case: false,
        };
        assert!(matches!(
            AclSet::compile(&[spec("")]),
            Err(AclError::EmptyName)
        ));
        for bad in ["a b", "not", "and", "or", "a!", "(a)", "a|b", "é"] {
            assert!(
                matches!(AclSet::compile(&[spec(bad)]), Err(AclError::BadName(_))),
                "{bad}"
            );
        }
        for good in ["a", "is_api", "x-1", "v1.2", "ns:name", "NOT", "nota"] {
            assert!(AclSet::compile(&[spec(good)]).is_ok(), "{good}");
        }
    }

    #[test]
    fn serde_requires_exactly_one_known_matcher() {
        let e = specs("[[acl]]\nname = \"a\"\n").unwrap_err().to_string();
        assert!(
            e.contains("ACL `a` needs exactly one matcher key") && e.contains("found none"),
            "{e}"
        );
        let e = specs("[[acl]]\nname = \"a\"\npath = \"/\"\nhost = \"h\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("found `path`, `host`"), "{e}");
        let e = specs("[[acl]]\nname = \"a\"\npath_prefx = \"/\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("path_prefx"), "{e}");
        let e = specs("[[acl]]\npath = \"/\"\n").unwrap_err().to_string();
        assert!(e.contains("name"), "{e}");
        let e = specs("[[acl]]\nname = \"a\"\nquery = { value = \"1\" }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("name"), "{e}");
        let e = specs("[[acl]]\nname = \"a\"\nheader = { name = \"x\" }\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("value"), "{e}");
    }

    #[test]
    fn serde_forms_of_the_module_doc() {
        #[derive(Deserialize)]
        struct Config {
            frontend: Frontend,
        }
        #[derive(Deserialize)]
        struct Frontend {
            acl: Vec<AclSpec>,
        }
        let text = r#"
            [[frontend.acl]]
            name = "is_api"
            path_prefix = "/api/"
            [[frontend.acl]]
            name = "admin_host"
            host = "admin.example.org"
            [[frontend.acl]]
            name = "m"
            path = "/x"
            [[frontend.acl]]
            name = "m"
            path_suffix = ".css"
            [[frontend.acl]]
            name = "m"
            path_regex = "^/v[0-9]+/"
            [[frontend.acl]]
            name = "m"
            path_raw_regex = "^/admin"
            [[frontend.acl]]
            name = "m"
            host_suffix = ".example.org"
            [[frontend.acl]]
            name = "m"
            header_present = "X-Name"
            [[frontend.acl]]
            name = "m"
            header = { name = "X-Env", value = "prod" }
            [[frontend.acl]]
            name = "m"
            header_regex = { name = "X-Env", regex = "^prod" }
            [[frontend.acl]]
            name = "m"
            method = "GET"
            [[frontend.acl]]
            name = "m"
            method = ["GET", "HEAD"]
            [[frontend.acl]]
            name = "m"
            src = ["10.0.0.0/8", "2001:db8::/32", "198.18.1.2"]
            [[frontend.acl]]
            name = "m"
            sni = "a.example"
            [[frontend.acl]]
            name = "m"
            sni_suffix = ".example"
            [[frontend.acl]]
            name = "m"
            client_cert = true
            [[frontend.acl]]
            name = "m"
            query = { name = "debug", value = "1" }
            [[frontend.acl]]
            name = "m"
            query = { name = "debug" }
            [[frontend.acl]]
            name = "m"
            cookie = { name = "session", value = "x" }
            [[frontend.acl]]
            name = "m"
            cookie = { name = "session" }
            [[frontend.acl]]
            name = "m"
            src_request_rate = { above = 100, period = "10s" }
        "#;
        let specs = toml::from_str::<Config>(text).unwrap().frontend.acl;
        let s = |v: &str| v.to_owned();
        let expected = vec![
            MatcherSpec::PathPrefix(s("/api/")),
            MatcherSpec::Host(s("admin.example.org")),
            MatcherSpec::Path(s("/x")),
            MatcherSpec::PathSuffix(s(".css")),
            MatcherSpec::PathRegex(s("^/v[0-9]+/")),
            MatcherSpec::PathRawRegex(s("^/admin")),
            MatcherSpec::HostSuffix(s(".example.org")),
            MatcherSpec::HeaderPresent(s("X-Name")),
            MatcherSpec::Header {
                name: s("X-Env"),
                value: s("prod"),
            },
            MatcherSpec::HeaderRegex {
                name: s("X-Env"),
                regex: s("^prod"),
            },
            MatcherSpec::Method(vec![s("GET")]),
            MatcherSpec::Method(vec![s("GET"), s("HEAD")]),
            MatcherSpec::Src(vec![s("10.0.0.0/8"), s("2001:db8::/32"), s("198.18.1.2")]),
            MatcherSpec::Sni(s("a.example")),
            MatcherSpec::SniSuffix(s(".example")),
            MatcherSpec::ClientCert(true),
            MatcherSpec::Query {
                name: s("debug"),
                value: Some(s("1")),
            },
            MatcherSpec::Query {
                name: s("debug"),
                value: None,
            },
            MatcherSpec::Cookie {
                name: s("session"),
                value: Some(s("x")),
            },
            MatcherSpec::Cookie {
                name: s("session"),
                value: None,
            },
            MatcherSpec::SrcRequestRate {
                above: 100,
                period: Duration::from_secs(10),
            },
        ];
        assert_eq!(
            specs.iter().map(|a| a.matcher.clone()).collect::<Vec<_>>(),
            expected
        );
        assert_eq!(specs[0].name, "is_api");
        let keys: Vec<_> = expected.iter().map(MatcherSpec::key).collect();
        assert!(MATCHER_KEYS.iter().all(|k| keys.contains(k)));
        let set = AclSet::compile(&specs).unwrap();
        assert!(set.contains("is_api") && set.contains("admin_host") && set.contains("m"));
    }

    // --- conditions ---

    fn acl(n: &str) -> Condition {
        Condition::Acl(n.to_owned())
    }
    fn not(c: Condition) -> Condition {
        Condition::Not(Box::new(c))
    }
    fn and(cs: Vec<Condition>) -> Condition {
        Condition::And(cs)
    }
    fn or(cs: Vec<Condition>) -> Condition {
        Condition::Or(cs)
    }

    const KNOWN: &[&str] = &["a", "b", "c", "d", "is_api", "admin_host", "is_static"];

    fn parse(text: &str) -> Result<Condition, AclError> {
        parse_condition(text, &|n| KNOWN.contains(&n))
    }

    fn ok(text: &str) -> Condition {
        let c = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(
            parse(&c.to_string()).unwrap(),
            c,
            "display round trip of {text}"
        );
        c
    }

    #[test]
    fn precedence_not_and_or() {
        assert_eq!(
            ok("is_api and not admin_host or is_static"),
            or(vec![
                and(vec![acl("is_api"), not(acl("admin_host"))]),
                acl("is_static")
            ])
        );
        assert_eq!(
            ok("a or b and c"),
            or(vec![acl("a"), and(vec![acl("b"), acl("c")])])
        );
        assert_eq!(ok("not a and b"), and(vec![not(acl("a")), acl("b")]));
        assert_eq!(ok("a or b or c"), or(vec![acl("a"), acl("b"), acl("c")]));
        assert_eq!(ok("a and b and c"), and(vec![acl("a"), acl("b"), acl("c")]));
        assert_eq!(ok("a"), acl("a"));
        assert_eq!(ok("not not a"), not(not(acl("a"))));
    }

    #[test]
    fn parentheses() {
        assert_eq!(
            ok("(a or b) and c"),
            and(vec![or(vec![acl("a"), acl("b")]), acl("c")])
        );
        assert_eq!(ok("not (a or b)"), not(or(vec![acl("a"), acl("b")])));
        assert_eq!(ok("((a))"), acl("a"));
        assert_eq!(
            ok("(a and b) and (c and d)"),
            and(vec![acl("a"), acl("b"), acl("c"), acl("d")])
        );
        assert_eq!(
            ok("a and (b or (c and not d))"),
            and(vec![
                acl("a"),
                or(vec![acl("b"), and(vec![acl("c"), not(acl("d"))])])
            ])
        );
    }

    #[test]
    fn haproxy_syntax_implicit_and_bang_and_symbols() {
        assert_eq!(
            ok("is_api !admin_host"),
            and(vec![acl("is_api"), not(acl("admin_host"))])
        );
        assert_eq!(
            ok("a b || c"),
            or(vec![and(vec![acl("a"), acl("b")]), acl("c")])
        );
        assert_eq!(ok("a||b"), or(vec![acl("a"), acl("b")]));
        assert_eq!(ok("a&&!b"), and(vec![acl("a"), not(acl("b"))]));
        assert_eq!(
            ok("!a (b or c)"),
            and(vec![not(acl("a")), or(vec![acl("b"), acl("c")])])
        );
        assert_eq!(ok("! a"), not(acl("a")));
        assert_eq!(ok("!!a"), not(not(acl("a"))));
        assert_eq!(ok("  a\tor\nb  "), or(vec![acl("a"), acl("b")]));
    }

    #[test]
    fn unknown_acl_is_named_with_its_column() {
        match parse("a and nope") {
            Err(AclError::UnknownAcl { name, column }) => {
                assert_eq!((name.as_str(), column), ("nope", 7))
            }
            other => panic!("{other:?}"),
        }
        let e = parse("is_apii").unwrap_err();
        assert_eq!(
            e.to_string(),
            "unknown ACL `is_apii` in condition at column 1"
        );
        // Keywords are not names and names containing keywords are names.
        assert!(matches!(parse("nota"), Err(AclError::UnknownAcl { .. })));
    }

    #[test]
    fn syntax_errors_have_columns() {
        let col = |text: &str| match parse(text) {
            Err(AclError::Syntax { column, message }) => (column, message),
            other => panic!("{text}: {other:?}"),
        };
        assert_eq!(col("").0, 1);
        assert_eq!(col("   ").0, 1);
        assert_eq!(col("a or").0, 5);
        assert_eq!(col("a and or b").0, 7);
        assert_eq!(col("or a").0, 1);
        assert_eq!(col("a )").0, 3);
        assert_eq!(col("(a").0, 3);
        assert!(col("(a").1.contains("column 1"));
        assert_eq!(col("a (b").0, 5);
        assert_eq!(col("()").0, 2);
        assert_eq!(col("a | b").0, 3);
        assert_eq!(col("a & b").0, 3);
        assert_eq!(col("a { path /x }").0, 3);
        assert_eq!(col("a ; b").0, 3);
        assert_eq!(col("é a").0, 1);
        assert_eq!(col("a é").0, 3);
        assert_eq!(col("not").0, 4);
        assert_eq!(col("a !").0, 4);
        let deep = format!("{}a{}", "(".repeat(200), ")".repeat(200));
        assert!(col(&deep).1.contains("nested"));
        let nots = format!("{}a", "!".repeat(200));
        assert!(col(&nots).1.contains("nested"));
        assert!(parse(&format!("{}a{}", "(".repeat(60), ")".repeat(60))).is_ok());
        let e = parse("a or").unwrap_err().to_string();
        assert!(
            e.starts_with("syntax error in condition at column 5"),
            "{e}"
        );
    }

    #[test]
    fn eval_truth_table_and_short_circuit() {
        let text = r#"
            [[acl]]
            name = "is_api"
            path_prefix = "/api/"
            [[acl]]
            name = "admin_host"
            host = "admin.example.org"
            [[acl]]
            name = "is_static"
            path_suffix = ".css"
        "#;
        let set = AclSet::compile(&specs(text).unwrap()).unwrap();
        let known = |n: &str| set.contains(n);
        let cond = parse_condition("is_api and not admin_host or is_static", &known).unwrap();
        let req = |path: &'static str, host: Option<&'static str>| {
            let mut r = Req::get(path);
            r.host = host;
            r
        };
        assert!(cond.eval(&set, &req("/api/x", Some("www.example.org")).r()));
        assert!(!cond.eval(&set, &req("/api/x", Some("admin.example.org:443")).r()));
        assert!(cond.eval(&set, &req("/api/x.css", Some("admin.example.org")).r()));
        assert!(!cond.eval(&set, &req("/x", None).r()));
        assert!(cond.eval(&set, &req("/x.css", None).r()));
        let grouped = parse_condition("is_api and not (admin_host or is_static)", &known).unwrap();
        assert!(!grouped.eval(&set, &req("/api/x.css", None).r()));
        assert!(grouped.eval(&set, &req("/api/x", None).r()));
        // Empty lists, possible only when built by hand.
        assert!(and(vec![]).eval(&set, &req("/", None).r()));
        assert!(!or(vec![]).eval(&set, &req("/", None).r()));
        // A condition naming an ACL the set lacks is false there.
        assert!(!acl("gone").eval(&set, &req("/", None).r()));
    }
}
