//! Configuration model of the L7 proxy: frontends, pools and their servers.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

use crate::duration;

/// Everything the proxy needs: the `[[frontend]]` and `[[pool]]` tables.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Listeners, from `[[frontend]]` tables.
    #[serde(default, rename = "frontend")]
    pub frontends: Vec<Frontend>,
    /// Server groups, from `[[pool]]` tables.
    #[serde(default, rename = "pool")]
    pub pools: Vec<Pool>,
    /// Users for `auth` actions, from top-level `[[userlist]]` tables.
    #[serde(default, rename = "userlist")]
    pub userlists: Vec<UserList>,
}

/// Checks a frontend's or pool's name as HAProxy checks a proxy's: letters,
/// digits, `-`, `_`, `.` and `:` only, so that it reads the same in an
/// access log line, a metric label, the stats page and a command line.
fn check_name(kind: &'static str, name: &str) -> Result<(), ConfigError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::BadName {
            kind,
            name: name.to_string(),
        })
    }
}

/// A set of listening addresses sharing TLS settings, limits and timeouts.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frontend {
    /// Name used in logs.
    pub name: String,
    /// Addresses to listen on.
    pub binds: Vec<SocketAddr>,
    /// `http` (default) or `tcp`: relay bytes, as HAProxy's `mode tcp`.
    #[serde(default)]
    pub mode: FrontendMode,
    /// Terminate TLS on every bind when present.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Pool used when the router picks none.
    pub default_pool: String,
    /// Connections served at once; further ones wait in the kernel's backlog.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Connections open at once from one source (an IPv4 address or an IPv6
    /// /64, the TCP peer before any PROXY header), 0..=`max_connections`; 0: no limit.
    #[serde(default)]
    pub max_connections_per_source: usize,
    /// Largest request head in bytes (HTTP/1 buffer, HTTP/2 header list).
    #[serde(default = "defaults::request_header_limit")]
    pub request_header_limit: usize,
    /// SO_SNDBUF of client connections in bytes (HAProxy's
    /// `tune.sndbuf.client`, nginx's `sndbuf`): 0 leaves the kernel's
    /// autotuning, else `MIN_SEND_BUFFER..=MAX_SEND_BUFFER` (the kernel
    /// doubles it, within `net.core.wmem_max`).
    #[serde(default)]
    pub send_buffer: usize,
    /// Idle limit of an HTTP/2 connection with no request in flight; on
    /// HTTP/1, the limit of each wait on the client while a request is served.
    #[serde(default = "defaults::timeout_client", with = "duration")]
    pub timeout_client: Duration,
    /// Time allowed for a whole request head (and for the TLS handshake).
    #[serde(default = "defaults::timeout_10s", with = "duration")]
    pub timeout_http_request: Duration,
    /// Idle limit of an HTTP/1 connection between two requests.
    #[serde(default = "defaults::timeout_10s", with = "duration")]
    pub timeout_http_keep_alive: Duration,
    /// Add `X-Forwarded-For`, `X-Forwarded-Proto` and `Forwarded` to requests.
    #[serde(default = "defaults::yes")]
    pub forwarded_headers: bool,
    /// Give each request a unique ID (32 hex digits) in this header, to
    /// the server (a client's own value replaced) and in the answer, and
    /// log it (HAProxy's `unique-id-header`, nginx's `$request_id`).
    #[serde(default)]
    pub request_id_header: Option<String>,
    /// Named ACLs (`[[frontend.acl]]`); entries with the same name are OR-ed.
    #[serde(default)]
    pub acl: Vec<crate::acl::AclSpec>,
    /// `use_backend` rules in order (`[[frontend.use_pool]] pool = "api", if = "is_api"`);
    /// the first whose condition holds picks the pool, else `default_pool`.
    #[serde(default)]
    pub use_pool: Vec<UsePool>,
    /// Idle limit of an upgraded (WebSocket) tunnel; the pool's setting wins (default 1h).
    #[serde(default, deserialize_with = "opt_duration")]
    pub timeout_tunnel: Option<Duration>,
    /// Require a PROXY protocol v1/v2 header on every connection; its client address is used.
    #[serde(default)]
    pub accept_proxy: bool,
    /// Peers (addresses or networks) that may send a PROXY header (HAProxy's
    /// `tcp-request connection expect-proxy layer4 if { src ... }`); others
    /// are served as direct clients. Implies `accept_proxy`; empty: anyone.
    #[serde(default)]
    pub accept_proxy_from: Vec<String>,
    /// `http-request` rules in order (`[[frontend.request]]`), see `proxy::actions`.
    #[serde(default)]
    pub request: Vec<HttpAction>,
    /// `http-response` rules in order (`[[frontend.response]]`): header edits only.
    #[serde(default)]
    pub response: Vec<HttpAction>,
    /// Access log format: `httplog` (default) or `json`.
    #[serde(default)]
    pub log_format: super::log::LogFormat,
    /// Pages (HTML files) the proxy answers with in place of its own, by
    /// status (HAProxy's `errorfile`, the body only): `{ 503 = "/path" }`.
    #[serde(default)]
    pub error_pages: std::collections::BTreeMap<String, PathBuf>,
    /// `[frontend.compression]`: gzip of servers' responses for clients
    /// that accept it (HAProxy's `compression algo gzip`, nginx's `gzip on`).
    #[serde(default)]
    pub compression: Option<Compression>,
}

/// Which responses a frontend compresses, and how hard.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Compression {
    /// Media types compressed: `type/subtype`, or `type/*` (HAProxy's `compression type`).
    #[serde(default = "defaults::compression_types")]
    pub types: Vec<String>,
    /// Responses whose Content-Length is below this many bytes go as they are.
    #[serde(default = "defaults::compression_min_size")]
    pub min_size: u64,
    /// zlib level, 1 (fastest, the default, as HAProxy's and nginx's) to 9.
    #[serde(default = "defaults::compression_level")]
    pub level: u32,
}

impl Default for Compression {
    fn default() -> Self {
        Compression {
            types: defaults::compression_types(),
            min_size: defaults::compression_min_size(),
            level: defaults::compression_level(),
        }
    }
}

/// The statuses an `error_pages` entry may replace: those the proxy answers
/// itself with its own page (408 is written from a timer, always its own).
pub const ERROR_PAGE_STATUSES: &[u16] = &[400, 401, 403, 404, 405, 429, 500, 502, 503, 504];

/// What a frontend speaks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FrontendMode {
    /// HTTP/1.1 and HTTP/2: requests are parsed, ruled and routed one by one.
    #[default]
    Http,
    /// Bytes relayed both ways to one server per connection (HAProxy's `mode
    /// tcp`), TLS terminated (`tls`) or passed through with its SNI read
    /// for the `sni` ACLs; only connection rules apply.
    Tcp,
}

/// The ACL keys a `tcp` frontend can evaluate: what its connection shows.
pub const TCP_ACL_KEYS: &[&str] = &[
    "src",
    "sni",
    "sni_suffix",
    "client_cert",
    "src_request_rate",
];

/// One `[[frontend.request]]` or `[[frontend.response]]` rule; which fields apply depends on `action`.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HttpAction {
    /// deny, reject (at accept, `src` ACLs only), redirect, set-header,
    /// add-header, del-header, set-path, return or auth.
    pub action: String,
    /// Condition over the frontend's ACLs; the rule always applies without one.
    #[serde(default, rename = "if")]
    pub condition: Option<String>,
    /// Status of `deny` (default 403) and `return` (default 200).
    #[serde(default)]
    pub status: Option<u16>,
    /// Status of `redirect`: 301, 302 (default), 303, 307 or 308.
    #[serde(default)]
    pub code: Option<u16>,
    /// `redirect` to this exact Location.
    #[serde(default)]
    pub location: Option<String>,
    /// `redirect` to this prefix followed by the request's path and query.
    #[serde(default)]
    pub prefix: Option<String>,
    /// `redirect` to the same host, path and query with this scheme.
    #[serde(default)]
    pub scheme: Option<String>,
    /// Header name of set-header, add-header and del-header.
    #[serde(default)]
    pub name: Option<String>,
    /// Header value of set-header and add-header.
    #[serde(default)]
    pub value: Option<String>,
    /// New path of `set-path` (the query is kept).
    #[serde(default)]
    pub path: Option<String>,
    /// Content-Type of `return` (default text/plain).
    #[serde(default)]
    pub content_type: Option<String>,
    /// Body of `return` (default empty).
    #[serde(default)]
    pub body: Option<String>,
    /// Userlist of `auth`.
    #[serde(default)]
    pub userlist: Option<String>,
    /// Realm of `auth` (default the frontend's name).
    #[serde(default)]
    pub realm: Option<String>,
}

/// A `[[userlist]]`: users that `auth` actions accept.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UserList {
    /// Name used by `auth` actions.
    pub name: String,
    /// Its users.
    #[serde(default)]
    pub users: Vec<User>,
}

/// A user of a userlist.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct User {
    /// Login name.
    pub name: String,
    /// SHA-512 crypt hash (`$6$salt$hash`, as `mkpasswd -m sha-512` makes).
    pub password: String,
}

/// One `use_backend`-style rule.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsePool {
    /// Pool to use.
    pub pool: String,
    /// Condition over the frontend's ACLs (`and`, `or`, `not`, parentheses).
    #[serde(rename = "if")]
    pub condition: String,
}

/// TLS settings of a frontend.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificates offered, chosen by SNI.
    pub certs: Vec<CertPair>,
    /// Index into `certs` of the certificate for unknown or missing SNI (default 0).
    #[serde(default)]
    pub default_cert: Option<usize>,
    /// PEM trust anchors of client certificates: set, the handshake asks
    /// every client for a certificate (HAProxy's `ca-file` on a bind).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: whether a client must present a certificate.
    #[serde(default)]
    pub verify_client: VerifyClient,
    /// With `client_ca`: PEM CRLs; a certificate they revoke is refused.
    #[serde(default)]
    pub client_crl: Vec<PathBuf>,
    /// With `client_ca`: the request header that carries the client's
    /// verified certificate (base64 DER) to servers; a client's own header
    /// of that name is always removed.
    #[serde(default)]
    pub client_cert_header: Option<String>,
    /// The oldest TLS version a client may use (HAProxy's `ssl-min-ver`):
    /// "1.2" (default) or "1.3".
    #[serde(default)]
    pub min_version: TlsVersion,
    /// Let requests name hosts the connection's certificate does not serve
    /// (another than its SNI; domain fronting). Default false: a 421.
    #[serde(default)]
    pub allow_misdirected: bool,
}

/// A TLS protocol version, as `min_version` names it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
pub enum TlsVersion {
    /// TLS 1.2 (and 1.3).
    #[default]
    #[serde(rename = "1.2")]
    Tls12,
    /// TLS 1.3 only.
    #[serde(rename = "1.3")]
    Tls13,
}

impl TlsConfig {
    /// Checks that the client certificate settings come with `client_ca` and
    /// that `client_cert_header` is a header name a client could not use to
    /// smuggle anything (not a hop-by-hop or framing header).
    fn validate_client_auth(&self) -> Result<(), &'static str> {
        if self.client_ca.is_none()
            && (self.verify_client != VerifyClient::default()
                || !self.client_crl.is_empty()
                || self.client_cert_header.is_some())
        {
            return Err("verify_client, client_crl and client_cert_header need client_ca");
        }
        if let Some(name) = &self.client_cert_header {
            let Ok(name) = http::HeaderName::from_bytes(name.as_bytes()) else {
                return Err("client_cert_header is not a valid header name");
            };
            if reserved_header(&name) {
                return Err(
                    "client_cert_header must not be a framing, hop-by-hop or forwarded header",
                );
            }
        }
        Ok(())
    }
}

/// Whether a header the proxy sets for servers would meddle with framing,
/// hop-by-hop fields or the forwarded headers.
fn reserved_header(name: &http::HeaderName) -> bool {
    const RESERVED: &[&str] = &[
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "upgrade",
        "te",
        "trailer",
        "proxy-connection",
        "x-forwarded-for",
        "x-forwarded-proto",
        "forwarded",
    ];
    RESERVED.contains(&name.as_str())
}

/// Whether a TLS frontend with `client_ca` requires a client certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyClient {
    /// A handshake without a valid certificate fails (HAProxy's `verify required`).
    #[default]
    Required,
    /// A client may present none; one that does not verify still fails the
    /// handshake (HAProxy's `verify optional`). The `client_cert` ACL tells them apart.
    Optional,
}

/// A PEM certificate chain and its PEM private key.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertPair {
    /// Chain, leaf first.
    pub cert: PathBuf,
    /// PKCS#8, PKCS#1 or SEC1 key.
    pub key: PathBuf,
    /// SNI names served with it; empty means the DNS names of the leaf's SAN.
    #[serde(default)]
    pub names: Vec<String>,
}

/// A group of servers and how to balance over them.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pool {
    /// Name used by frontends, routes and logs.
    pub name: String,
    /// Server choice.
    #[serde(default)]
    pub algorithm: Algorithm,
    /// Servers, in order (which matters for `first`).
    #[serde(default)]
    pub servers: Vec<ServerSpec>,
    /// Time allowed to establish a TCP connection to a server.
    #[serde(default = "defaults::timeout_connect", with = "duration")]
    pub timeout_connect: Duration,
    /// Time allowed for a server's response head once the request is sent
    /// (HTTP/1 clients: also for each wait on the server during the bodies).
    #[serde(default = "defaults::timeout_server", with = "duration")]
    pub timeout_server: Duration,
    /// How long an idle keep-alive connection to a server is kept for the
    /// next request (nginx's upstream `keepalive_timeout`); 0 keeps none.
    /// A shared HTTP/2 connection is idle while no request is in flight on it.
    #[serde(default = "defaults::timeout_server_idle", with = "duration")]
    pub timeout_server_idle: Duration,
    /// Extra attempts on another server when connecting fails.
    #[serde(default = "defaults::retries")]
    pub retries: u32,
    /// `uri` algorithm: hash the query string too, not just the path.
    #[serde(default)]
    pub hash_query: bool,
    /// `header` algorithm: the request header whose value is hashed.
    #[serde(default)]
    pub hash_header: Option<String>,
    /// Longest wait in the queue for a server below its `maxconn`; 503 after it.
    #[serde(default = "defaults::timeout_queue", with = "duration")]
    pub timeout_queue: Duration,
    /// Idle limit of an upgraded (WebSocket) tunnel (default: the frontend's, else 1h).
    #[serde(default, deserialize_with = "opt_duration")]
    pub timeout_tunnel: Option<Duration>,
    /// Send a PROXY protocol header (`"v1"` or `"v2"`) on each new server connection.
    #[serde(default)]
    pub send_proxy: Option<super::proxy_protocol::Version>,
    /// `[pool.health]`, the same keys as a service's `[service.health]`; read
    /// and validated by the agent's config loader, which runs the checks and
    /// marks servers up or down (`Proxy::set_server_up`).
    #[serde(default)]
    pub health: Option<toml::Value>,
    /// `[pool.discovery]`, the keys of `[service.discovery]`; read and
    /// validated by the agent's config loader, whose discovery adds and
    /// removes servers as DNS answers change (lb-userspace's `discovery`).
    #[serde(default)]
    pub discovery: Option<toml::Value>,
    /// Speak TLS to the servers (after the PROXY header of `send_proxy`).
    #[serde(default)]
    pub tls: bool,
    /// With `tls`: verify the server's certificate against `ca` and `sni` (default true).
    #[serde(default = "defaults::yes")]
    pub verify: bool,
    /// With `tls`: PEM file of the trust anchors; required while `verify` is on.
    #[serde(default)]
    pub ca: Option<PathBuf>,
    /// With `tls`: server name sent and verified (default: the server's IP, as an IP SAN).
    #[serde(default)]
    pub sni: Option<String>,
    /// With `tls`: PEM chain (leaf first) shown to servers that ask for a
    /// client certificate, with `key` (HAProxy's `crt` on a server line).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// With `cert`: its PEM private key.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// With `tls`: the oldest TLS version offered to servers, "1.2"
    /// (default) or "1.3" (HAProxy's `ssl-min-ver` on a server line).
    #[serde(default)]
    pub min_version: TlsVersion,
    /// HTTP/2 to the servers: prior knowledge on plain connections, ALPN `h2` with `tls`.
    #[serde(default)]
    pub h2: bool,
    /// Persistence cookie name: a client's first response sets it to its
    /// server's value, and its later requests go back there (HAProxy's
    /// `cookie NAME insert indirect nocache httponly`, `secure` over TLS).
    #[serde(default)]
    pub cookie: Option<String>,
    /// Failed attempts in a row (no response: connect refused or timed
    /// out, TLS, closed or timed out before the head) that take a server
    /// out for `fail_timeout` (nginx's `max_fails`, HAProxy's `observe
    /// layer4` with `on-error mark-down`); 0: never (the default).
    #[serde(default)]
    pub max_fails: u32,
    /// How long a server stays out after `max_fails`; then one failure
    /// takes it out again, one answer brings it back (default 10s).
    #[serde(default = "defaults::timeout_10s", with = "duration")]
    pub fail_timeout: Duration,
    /// A server that starts taking requests again (back up, enabled, added)
    /// has its weight ramp up from almost 0 over this long (HAProxy's
    /// `slowstart`; roundrobin, leastconn, random2); 0s: at once (default).
    #[serde(default, with = "duration")]
    pub slowstart: Duration,
    /// What a server's health checks marking it down does to its open
    /// `tcp` sessions and tunnels: nothing (default), or
    /// "shutdown-sessions" (HAProxy's `on-marked-down shutdown-sessions`).
    #[serde(default)]
    pub on_marked_down: Option<OnMarkedDown>,
}

/// `on_marked_down`: what happens to a server's sessions when it is marked down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum OnMarkedDown {
    /// Its `tcp` sessions and tunnels are closed, logged `DD`.
    #[serde(rename = "shutdown-sessions")]
    ShutdownSessions,
}

/// Server choice within a pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Algorithm {
    /// Smooth weighted round robin (nginx's): weights honoured, picks interleaved.
    #[default]
    #[serde(alias = "roundrobin", alias = "round-robin")]
    RoundRobin,
    /// Fewest requests in flight relative to weight.
    #[serde(alias = "leastconn", alias = "least-conn")]
    LeastConn,
    /// Power of two random choices, the less loaded of the two.
    #[serde(alias = "random2", alias = "random")]
    Random2,
    /// The first usable server in configuration order below its `maxconn`.
    First,
    /// Consistent hash (Maglev) of the client IP.
    Source,
    /// Consistent hash (Maglev) of the path, with the query if `hash_query`.
    Uri,
    /// Consistent hash (Maglev) of the `hash_header` request header; roundrobin without it.
    #[serde(alias = "hdr")]
    Header,
}

impl Algorithm {
    /// Whether the server comes from a consistent hash of the request.
    pub fn is_hash(self) -> bool {
        matches!(self, Algorithm::Source | Algorithm::Uri | Algorithm::Header)
    }
}

/// One server of a pool.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSpec {
    /// Where to connect (plain HTTP/1.1).
    pub address: SocketAddr,
    /// Relative share of requests; 0 takes none.
    #[serde(default = "defaults::weight")]
    pub weight: u32,
    /// Used only while every non-backup server is down.
    #[serde(default)]
    pub backup: bool,
    /// Requests in flight at most (0: unlimited); more wait in the pool's queue.
    #[serde(default)]
    pub maxconn: usize,
    /// Its value of the pool's persistence cookie (HAProxy's `cookie` on a
    /// server line: clients' cookies keep working across a migration);
    /// default: 8 hex digits of a hash of its address.
    #[serde(default)]
    pub cookie: Option<String>,
}

/// Most `max_connections` of a frontend: Linux's ceiling on a process's open
/// files (`fs.nr_open` at most). Its semaphore (tokio's, at most
/// `usize::MAX >> 3` permits) would panic on a larger one.
pub const MAX_CONNECTIONS: usize = 1 << 30;

/// Smallest non-zero `send_buffer` (below it every write of a response
/// would be a few segments).
pub const MIN_SEND_BUFFER: usize = 4096;
/// Largest `send_buffer`: `net.ipv4.tcp_wmem`'s default ceiling.
pub const MAX_SEND_BUFFER: usize = 4 << 20;

/// A configuration the proxy refuses to start with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A frontend's or pool's name has characters HAProxy's would not.
    #[error(
        "{kind} name {name:?}: use 1 to 64 letters, digits, '-', '_', '.' or ':' \
         (names go into logs, metrics, the stats page and `lb` commands)"
    )]
    BadName {
        /// `frontend` or `pool`.
        kind: &'static str,
        /// The name as written.
        name: String,
    },
    /// Two frontends or two pools share a name.
    #[error("duplicate {kind} name {name:?}")]
    Duplicate {
        /// `frontend` or `pool`.
        kind: &'static str,
        /// The repeated name.
        name: String,
    },
    /// A frontend's `request_id_header` is no header name it may set.
    #[error(
        "frontend {0:?}: request_id_header must be a header name, not a framing, hop-by-hop or \
         forwarded one, on a mode http frontend"
    )]
    BadRequestIdHeader(String),
    /// An entry of a frontend's `accept_proxy_from` is not an address or network.
    #[error("frontend {frontend:?}: accept_proxy_from: `{entry}`: {reason}")]
    BadAcceptProxyFrom {
        /// Frontend name.
        frontend: String,
        /// The entry as written.
        entry: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A frontend's `compression` is out of range.
    #[error("frontend {frontend:?}: compression: {problem}")]
    BadCompression {
        /// Frontend name.
        frontend: String,
        /// What is wrong.
        problem: String,
    },
    /// A pool lists one server address twice (servers are known by address).
    #[error("pool {pool:?} lists server {server} twice")]
    DuplicateServer {
        /// The pool.
        pool: String,
        /// The repeated address.
        server: SocketAddr,
    },
    /// A frontend's default pool does not exist.
    #[error("frontend {frontend:?}: unknown default_pool {pool:?}")]
    UnknownPool {
        /// The frontend.
        frontend: String,
        /// The missing pool.
        pool: String,
    },
    /// A frontend has nothing to listen on.
    #[error("frontend {0:?}: no binds")]
    NoBinds(String),
    /// A TLS frontend has no certificate or a default index out of range.
    #[error("frontend {0:?}: tls needs at least one cert and default_cert within certs")]
    BadTls(String),
    /// An `error_pages` key is not a status the proxy answers with a page.
    #[error(
        "frontend {frontend:?}: error_pages has {status:?}; expected one of {}",
        ERROR_PAGE_STATUSES.iter().map(u16::to_string).collect::<Vec<_>>().join(", ")
    )]
    BadErrorPage {
        /// The frontend.
        frontend: String,
        /// The key as written.
        status: String,
    },
    /// A `tcp` frontend has a rule or a pool that needs HTTP.
    #[error("frontend {frontend:?}: {problem}")]
    TcpMode {
        /// The frontend.
        frontend: String,
        /// What is wrong.
        problem: String,
    },
    /// A TLS frontend's client certificate settings do not fit together.
    #[error("frontend {frontend:?}: {problem}")]
    BadClientAuth {
        /// The frontend.
        frontend: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// A frontend allows zero connections.
    #[error("frontend {0:?}: max_connections must be 1..={MAX_CONNECTIONS}")]
    NoConnections(String),
    /// A frontend's per-source limit exceeds its `max_connections`.
    #[error(
        "frontend {frontend:?}: max_connections_per_source {per_source} is out of range; \
         expected 0 (no limit)..={max} (its max_connections)"
    )]
    PerSourceAboveMax {
        /// The frontend.
        frontend: String,
        /// Its `max_connections_per_source`.
        per_source: usize,
        /// Its `max_connections`.
        max: usize,
    },
    /// A frontend's `send_buffer` is out of range.
    #[error(
        "frontend {frontend:?}: send_buffer {bytes} is out of range; expected 0 (the kernel's \
         autotuning) or {MIN_SEND_BUFFER}..={MAX_SEND_BUFFER} bytes"
    )]
    BadSendBuffer {
        /// The frontend.
        frontend: String,
        /// Its `send_buffer`.
        bytes: usize,
    },
    /// A pool's `slowstart` is out of range.
    #[error("pool {0:?}: slowstart must be at most 1h")]
    BadSlowstart(String),
    /// A pool's `fail_timeout` is out of range.
    #[error("pool {0:?}: fail_timeout must be within 1s..=1h")]
    BadFailTimeout(String),
    /// A server's `cookie` value is not one, or is another's.
    #[error("pool {pool:?}: server {}: {problem}", index + 1)]
    BadServerCookie {
        /// The pool.
        pool: String,
        /// The server's index in `servers`.
        index: usize,
        /// What is wrong.
        problem: &'static str,
    },
    /// A pool's `cookie` is not a cookie name.
    #[error("pool {0:?}: cookie must be a cookie name (letters, digits and !#$%&'*+-.^_`|~)")]
    BadCookie(String),
    /// A pool's hash settings do not fit its algorithm.
    #[error("pool {pool:?}: {problem}")]
    BadHash {
        /// The pool.
        pool: String,
        /// What is wrong.
        problem: &'static str,
    },
    /// A pool's `tls`, `verify`, `ca`, `sni`, `cert`, `key` or
    /// `min_version` settings do not fit together.
    #[error("pool {pool:?}: {problem}")]
    BadServerTls {
        /// The pool.
        pool: String,
        /// The key the problem is reported at.
        key: &'static str,
        /// What is wrong.
        problem: &'static str,
    },
}

impl ProxyConfig {
    /// Whether `other` differs from this in its pools' servers at most (and
    /// their `health` and `discovery` tables, which the agent acts on):
    /// what `Proxy::update_servers` applies in place.
    pub fn same_but_servers(&self, other: &ProxyConfig) -> bool {
        let without = |c: &ProxyConfig| {
            let mut c = c.clone();
            for p in &mut c.pools {
                p.servers.clear();
                p.health = None;
                p.discovery = None;
            }
            c
        };
        without(self) == without(other)
    }

    /// Index of the pool named `name` in `pools`.
    pub fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    /// Checks names and references; `Proxy::start` calls it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for f in &self.frontends {
            check_name("frontend", &f.name)?;
            if !seen.insert(f.name.as_str()) {
                return Err(ConfigError::Duplicate {
                    kind: "frontend",
                    name: f.name.clone(),
                });
            }
        }
        let mut seen = HashSet::new();
        for p in &self.pools {
            check_name("pool", &p.name)?;
            if !seen.insert(p.name.as_str()) {
                return Err(ConfigError::Duplicate {
                    kind: "pool",
                    name: p.name.clone(),
                });
            }
        }
        for p in &self.pools {
            p.validate_servers()?;
            p.validate_hash()?;
            p.validate_cookie()?;
            p.validate_server_tls()?;
            if !(Duration::from_secs(1)..=Duration::from_secs(3600)).contains(&p.fail_timeout) {
                return Err(ConfigError::BadFailTimeout(p.name.clone()));
            }
            if p.slowstart > Duration::from_secs(3600) {
                return Err(ConfigError::BadSlowstart(p.name.clone()));
            }
        }
        for f in &self.frontends {
            if self.pool_index(&f.default_pool).is_none() {
                return Err(ConfigError::UnknownPool {
                    frontend: f.name.clone(),
                    pool: f.default_pool.clone(),
                });
            }
            f.validate()?;
            if f.mode == FrontendMode::Tcp {
                self.validate_tcp(f)
                    .map_err(|problem| ConfigError::TcpMode {
                        frontend: f.name.clone(),
                        problem,
                    })?;
            }
        }
        Ok(())
    }

    /// A `tcp` frontend's rules look only at the connection, and its pools
    /// take bytes (HTTP/1.1 or TLS servers, no HTTP/2).
    fn validate_tcp(&self, f: &Frontend) -> Result<(), String> {
        if let Some(acl) = f
            .acl
            .iter()
            .find(|a| !TCP_ACL_KEYS.contains(&a.matcher.key()))
        {
            return Err(format!(
                "ACL `{}` uses `{}`, which needs mode http; a tcp frontend has {}",
                acl.name,
                acl.matcher.key(),
                TCP_ACL_KEYS.join(", ")
            ));
        }
        if let Some(rule) = f
            .request
            .iter()
            .find(|r| r.action != "deny" && r.action != "reject")
        {
            return Err(format!(
                "request action `{}` needs mode http; a tcp frontend can only reject or deny (close) a connection",
                rule.action
            ));
        }
        if !f.response.is_empty() {
            return Err("response actions need mode http".to_string());
        }
        let pools = std::iter::once(&f.default_pool).chain(f.use_pool.iter().map(|u| &u.pool));
        for name in pools {
            if let Some(p) = self.pool_index(name).map(|i| &self.pools[i])
                && p.h2
            {
                return Err(format!(
                    "pool {:?} speaks HTTP/2 (h2), which a tcp frontend cannot relay",
                    p.name
                ));
            }
        }
        Ok(())
    }
}

impl Frontend {
    /// `request_id_header` as a header name (None when unset or invalid).
    pub fn request_id_name(&self) -> Option<http::HeaderName> {
        let name = self.request_id_header.as_deref()?;
        http::HeaderName::from_bytes(name.as_bytes()).ok()
    }

    /// Its own settings, apart from the pools it names.
    fn validate(&self) -> Result<(), ConfigError> {
        if self.binds.is_empty() {
            return Err(ConfigError::NoBinds(self.name.clone()));
        }
        if !(1..=MAX_CONNECTIONS).contains(&self.max_connections) {
            return Err(ConfigError::NoConnections(self.name.clone()));
        }
        if self.max_connections_per_source > self.max_connections {
            return Err(ConfigError::PerSourceAboveMax {
                frontend: self.name.clone(),
                per_source: self.max_connections_per_source,
                max: self.max_connections,
            });
        }
        if self.send_buffer != 0 && !(MIN_SEND_BUFFER..=MAX_SEND_BUFFER).contains(&self.send_buffer)
        {
            return Err(ConfigError::BadSendBuffer {
                frontend: self.name.clone(),
                bytes: self.send_buffer,
            });
        }
        if let Some(tls) = &self.tls
            && (tls.certs.is_empty() || tls.default_cert.unwrap_or(0) >= tls.certs.len())
        {
            return Err(ConfigError::BadTls(self.name.clone()));
        }
        if let Some(tls) = &self.tls {
            tls.validate_client_auth()
                .map_err(|problem| ConfigError::BadClientAuth {
                    frontend: self.name.clone(),
                    problem,
                })?;
        }
        if let Some(key) = self.error_pages.keys().find(|k| {
            k.parse::<u16>()
                .map_or(true, |s| !ERROR_PAGE_STATUSES.contains(&s))
        }) {
            return Err(ConfigError::BadErrorPage {
                frontend: self.name.clone(),
                status: key.clone(),
            });
        }
        if let Some(c) = &self.compression {
            c.validate(self.mode)
                .map_err(|problem| ConfigError::BadCompression {
                    frontend: self.name.clone(),
                    problem,
                })?;
        }
        if self.request_id_header.is_some()
            && !self
                .request_id_name()
                .is_some_and(|n| !reserved_header(&n) && self.mode == FrontendMode::Http)
        {
            return Err(ConfigError::BadRequestIdHeader(self.name.clone()));
        }
        if let Some((entry, reason)) = self.accept_proxy_from.iter().find_map(|c| {
            crate::acl::Cidr::parse(c)
                .err()
                .map(|reason| (c.clone(), reason))
        }) {
            return Err(ConfigError::BadAcceptProxyFrom {
                frontend: self.name.clone(),
                entry,
                reason,
            });
        }
        Ok(())
    }

    /// Whether connections (some or all) start with a PROXY header.
    pub fn expects_proxy(&self) -> bool {
        self.accept_proxy || !self.accept_proxy_from.is_empty()
    }

    /// The peers whose connections start with a PROXY header (empty: all),
    /// if any do.
    pub(crate) fn proxy_peers(&self) -> Option<Box<[crate::acl::Cidr]>> {
        // validate() checked every entry.
        self.expects_proxy().then(|| {
            self.accept_proxy_from
                .iter()
                .filter_map(|c| crate::acl::Cidr::parse(c).ok())
                .collect()
        })
    }

    /// A frontend with every optional setting at its default.
    pub fn new(name: &str, binds: Vec<SocketAddr>, default_pool: &str) -> Self {
        Frontend {
            name: name.to_string(),
            binds,
            mode: FrontendMode::Http,
            tls: None,
            default_pool: default_pool.to_string(),
            max_connections: defaults::max_connections(),
            max_connections_per_source: 0,
            request_header_limit: defaults::request_header_limit(),
            send_buffer: 0,
            timeout_client: defaults::timeout_client(),
            timeout_http_request: defaults::timeout_10s(),
            timeout_http_keep_alive: defaults::timeout_10s(),
            forwarded_headers: true,
            request_id_header: None,
            acl: Vec::new(),
            use_pool: Vec::new(),
            timeout_tunnel: None,
            accept_proxy: false,
            accept_proxy_from: Vec::new(),
            request: Vec::new(),
            response: Vec::new(),
            log_format: Default::default(),
            error_pages: Default::default(),
            compression: None,
        }
    }
}

impl Pool {
    /// A pool with every optional setting at its default.
    pub fn new(name: &str, algorithm: Algorithm, servers: Vec<ServerSpec>) -> Self {
        Pool {
            name: name.to_string(),
            algorithm,
            servers,
            timeout_connect: defaults::timeout_connect(),
            timeout_server: defaults::timeout_server(),
            timeout_server_idle: defaults::timeout_server_idle(),
            retries: defaults::retries(),
            hash_query: false,
            hash_header: None,
            timeout_queue: defaults::timeout_queue(),
            timeout_tunnel: None,
            send_proxy: None,
            health: None,
            discovery: None,
            tls: false,
            verify: true,
            ca: None,
            sni: None,
            cert: None,
            key: None,
            min_version: TlsVersion::Tls12,
            h2: false,
            cookie: None,
            max_fails: 0,
            fail_timeout: defaults::timeout_10s(),
            slowstart: Duration::ZERO,
            on_marked_down: None,
        }
    }

    /// Checks `ca`/`sni`/`cert`/`key`/`min_version` need `tls`, `cert` and
    /// `key` come together, `verify` needs `ca`, and `sni` is a valid server name.
    fn validate_server_tls(&self) -> Result<(), ConfigError> {
        let bad = |key, problem| {
            Err(ConfigError::BadServerTls {
                pool: self.name.clone(),
                key,
                problem,
            })
        };
        if !self.tls {
            let set = [
                ("ca", self.ca.is_some()),
                ("sni", self.sni.is_some()),
                ("cert", self.cert.is_some()),
                ("key", self.key.is_some()),
                ("min_version", self.min_version != TlsVersion::default()),
            ];
            if let Some((key, _)) = set.into_iter().find(|(_, set)| *set) {
                return bad(key, "ca, sni, cert, key and min_version need tls = true");
            }
            return Ok(());
        }
        match (&self.cert, &self.key) {
            (Some(_), None) => return bad("cert", "cert needs key, its private key"),
            (None, Some(_)) => return bad("key", "key needs cert, the certificate it signs for"),
            _ => {}
        }
        if self.verify && self.ca.is_none() {
            return bad(
                "tls",
                "tls with verify = true (the default) needs ca = \"/path/ca.pem\" \
                 (there is no built-in system root store); or set verify = false",
            );
        }
        if let Some(sni) = &self.sni
            && rustls::pki_types::ServerName::try_from(sni.as_str()).is_err()
        {
            return bad("sni", "sni is not a valid DNS name or IP address");
        }
        Ok(())
    }

    /// Checks that `cookie` is an RFC 6265 cookie-name (an RFC 9110 token),
    /// and the servers' own values: cookie-values, only with the pool's
    /// `cookie`, none shared (nor with another server's default).
    fn validate_cookie(&self) -> Result<(), ConfigError> {
        let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
        if let Some(name) = &self.cookie
            && (name.is_empty() || !name.bytes().all(token))
        {
            return Err(ConfigError::BadCookie(self.name.clone()));
        }
        // RFC 6265 cookie-octet: no controls, space, '"', ',', ';' or '\\'.
        let octet = |c: u8| (0x21..=0x7e).contains(&c) && !b"\",;\\".contains(&c);
        let mut seen = HashSet::new();
        for (index, s) in self.servers.iter().enumerate() {
            let bad = |problem| {
                Err(ConfigError::BadServerCookie {
                    pool: self.name.clone(),
                    index,
                    problem,
                })
            };
            match &s.cookie {
                Some(_) if self.cookie.is_none() => {
                    return bad("a server's cookie needs the pool's cookie (its name)");
                }
                Some(v) if v.is_empty() || v.len() > 64 || !v.bytes().all(octet) => {
                    return bad(
                        "a server's cookie is 1 to 64 characters, no spaces, quotes, \
                         commas, semicolons or backslashes",
                    );
                }
                _ => {}
            }
            // Values written in the file must differ. The default values (a
            // 32-bit hash of the address) are not held to it: two servers
            // from DNS whose hashes meet would otherwise freeze the pool's
            // discovery (any answer refused), and without `cookie` they
            // mean nothing; a collision sends a sticky client to the first.
            if s.cookie.is_some() && !seen.insert(s.cookie_value()) {
                return bad("another server of the pool has this cookie value");
            }
        }
        Ok(())
    }

    /// Checks `hash_header`/`hash_query` against the algorithm, and that hashed servers are distinct.
    fn validate_hash(&self) -> Result<(), ConfigError> {
        let bad = |problem| {
            Err(ConfigError::BadHash {
                pool: self.name.clone(),
                problem,
            })
        };
        match (&self.hash_header, self.algorithm) {
            (None, Algorithm::Header) => return bad("algorithm header needs hash_header"),
            (Some(_), a) if a != Algorithm::Header => {
                return bad("hash_header needs algorithm header");
            }
            (Some(h), _) if http::HeaderName::from_bytes(h.as_bytes()).is_err() => {
                return bad("hash_header is not a valid header name");
            }
            _ => {}
        }
        if self.hash_query && self.algorithm != Algorithm::Uri {
            return bad("hash_query needs algorithm uri");
        }
        Ok(())
    }

    /// Servers are known by address (health, admin state, persistence,
    /// changes in place): each may be listed once.
    fn validate_servers(&self) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        match self.servers.iter().find(|s| !seen.insert(s.address)) {
            Some(s) => Err(ConfigError::DuplicateServer {
                pool: self.name.clone(),
                server: s.address,
            }),
            None => Ok(()),
        }
    }
}

impl Compression {
    /// Levels within zlib's, media types that can match, HTTP frontends only.
    fn validate(&self, mode: FrontendMode) -> Result<(), String> {
        if mode == FrontendMode::Tcp {
            return Err("a tcp frontend relays bytes: compression needs mode http".into());
        }
        if !(1..=9).contains(&self.level) {
            return Err(format!(
                "level {} is out of range; expected 1..=9",
                self.level
            ));
        }
        if self.types.is_empty() {
            return Err("types is empty: nothing would be compressed".into());
        }
        let valid = |t: &str| {
            t.split_once('/').is_some_and(|(a, b)| {
                let token = |s: &str| {
                    !s.is_empty()
                        && s.bytes()
                            .all(|c| c.is_ascii_alphanumeric() || b"!#$&-^_.+".contains(&c))
                };
                token(a) && (b == "*" || token(b))
            })
        };
        match self.types.iter().find(|t| !valid(t)) {
            Some(t) => Err(format!(
                "type {t:?} is not a media type (`type/subtype` or `type/*`)"
            )),
            None => Ok(()),
        }
    }
}

/// A server's identity in hashes (Maglev, its cookie): its address bytes and port.
pub(crate) fn identity(addr: SocketAddr) -> Vec<u8> {
    let mut v = match addr.ip() {
        std::net::IpAddr::V4(a) => a.octets().to_vec(),
        std::net::IpAddr::V6(a) => a.octets().to_vec(),
    };
    v.extend_from_slice(&addr.port().to_be_bytes());
    v
}

impl ServerSpec {
    /// Its value of the pool's persistence cookie: its own `cookie`, else
    /// 8 hex digits of a hash of its address (the same on every node and
    /// after restarts; no address on the wire).
    pub fn cookie_value(&self) -> String {
        /// "l7ck".
        const COOKIE_SEED: u32 = 0x6c37_636b;
        self.cookie.clone().unwrap_or_else(|| {
            format!(
                "{:08x}",
                lb_common::hash::jhash_bytes(&identity(self.address), COOKIE_SEED)
            )
        })
    }

    /// A non-backup server of weight 1.
    pub fn new(address: SocketAddr) -> Self {
        ServerSpec {
            address,
            weight: 1,
            backup: false,
            maxconn: 0,
            cookie: None,
        }
    }
}

mod defaults {
    use std::time::Duration;

    pub fn compression_types() -> Vec<String> {
        [
            "text/html",
            "text/plain",
            "text/css",
            "text/javascript",
            "application/javascript",
            "application/json",
            "application/xml",
            "image/svg+xml",
        ]
        .map(String::from)
        .to_vec()
    }

    pub fn compression_min_size() -> u64 {
        1024
    }

    pub fn compression_level() -> u32 {
        1
    }

    pub fn max_connections() -> usize {
        10_000
    }
    pub fn request_header_limit() -> usize {
        16 * 1024
    }
    pub fn timeout_client() -> Duration {
        Duration::from_secs(30)
    }
    pub fn timeout_10s() -> Duration {
        Duration::from_secs(10)
    }
    pub fn timeout_connect() -> Duration {
        Duration::from_secs(5)
    }
    pub fn timeout_server() -> Duration {
        Duration::from_secs(30)
    }
    pub fn timeout_server_idle() -> Duration {
        Duration::from_secs(30)
    }
    pub fn retries() -> u32 {
        3
    }
    pub fn timeout_queue() -> Duration {
        Duration::from_secs(5)
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn yes() -> bool {
        true
    }
}

/// Deserializes an optional duration (`"1h"`, `"30s"`, `"500ms"`).
fn opt_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    #[derive(Deserialize)]
    struct Wrap(#[serde(with = "duration")] Duration);
    Wrap::deserialize(d).map(|w| Some(w.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn servers_alone_can_change_in_place() {
        let cfg: ProxyConfig = toml::from_str(
            "[[frontend]]\nname = 'f'\nbinds = ['127.0.0.1:80']\ndefault_pool = 'p'\n\
             [[pool]]\nname = 'p'\nservers = [{ address = '127.0.0.1:81' }]\n",
        )
        .unwrap();
        let mut other = cfg.clone();
        other.pools[0]
            .servers
            .push(ServerSpec::new(([127, 0, 0, 1], 82).into()));
        other.pools[0].servers[0].weight = 5;
        other.pools[0].health = Some(toml::Value::Boolean(true));
        assert!(cfg.same_but_servers(&other));
        other.pools[0].retries = 7;
        assert!(!cfg.same_but_servers(&other));
        let mut other = cfg.clone();
        other.frontends[0].max_connections = 9;
        assert!(!cfg.same_but_servers(&other));
        let mut other = cfg.clone();
        other.pools[0].name = "q".into();
        assert!(!cfg.same_but_servers(&other));
    }

    #[test]
    fn max_connections_must_fit_a_semaphore() {
        let mut cfg: ProxyConfig = toml::from_str(
            "[[frontend]]\nname = 'f'\nbinds = ['127.0.0.1:80']\ndefault_pool = 'p'\n\
             [[pool]]\nname = 'p'\nservers = [{ address = '127.0.0.1:81' }]\n",
        )
        .unwrap();
        assert_eq!(cfg.validate(), Ok(()));
        for bad in [0, MAX_CONNECTIONS + 1, usize::MAX >> 2] {
            cfg.frontends[0].max_connections = bad;
            assert_eq!(
                cfg.validate(),
                Err(ConfigError::NoConnections("f".into())),
                "{bad}"
            );
        }
        cfg.frontends[0].max_connections = MAX_CONNECTIONS;
        assert_eq!(cfg.validate(), Ok(()));
    }

    #[test]
    fn names_are_what_haproxy_allows() {
        let cfg = |fe: &str, pool: &str| -> ProxyConfig {
            let mut c = ProxyConfig::default();
            c.frontends.push(Frontend::new(
                fe,
                vec!["127.0.0.1:80".parse().unwrap()],
                pool,
            ));
            let mut p: Pool = toml::from_str("name = 'x'").unwrap();
            p.name = pool.to_string();
            c.pools.push(p);
            c
        };
        for good in ["web", "web-1_a.b:c", &"a".repeat(64)] {
            assert_eq!(cfg(good, good).validate(), Ok(()), "{good}");
        }
        for bad in ["", "a b", "a\nb", "a\"b", "café", "a/b", &"a".repeat(65)] {
            let e = cfg(bad, "p").validate().unwrap_err();
            assert!(
                matches!(
                    e,
                    ConfigError::BadName {
                        kind: "frontend",
                        ..
                    }
                ),
                "{bad:?}: {e}"
            );
            let e = cfg("f", bad).validate().unwrap_err();
            assert!(
                matches!(e, ConfigError::BadName { kind: "pool", .. }),
                "{bad:?}: {e}"
            );
        }
    }

    #[test]
    fn max_connections_per_source_is_at_most_max_connections() {
        let mut cfg: ProxyConfig = toml::from_str(
            "[[frontend]]\nname = 'f'\nbinds = ['127.0.0.1:80']\ndefault_pool = 'p'\n\
             max_connections = 10\n\
             [[pool]]\nname = 'p'\nservers = [{ address = '127.0.0.1:81' }]\n",
        )
        .unwrap();
        assert_eq!(
            cfg.frontends[0].max_connections_per_source, 0,
            "no limit by default"
        );
        for good in [0, 1, 10] {
            cfg.frontends[0].max_connections_per_source = good;
            assert_eq!(cfg.validate(), Ok(()), "{good}");
        }
        cfg.frontends[0].max_connections_per_source = 11;
        let expected = ConfigError::PerSourceAboveMax {
            frontend: "f".into(),
            per_source: 11,
            max: 10,
        };
        assert_eq!(cfg.validate(), Err(expected));
    }

    #[test]
    fn send_buffer_is_off_or_within_its_range() {
        let mut cfg: ProxyConfig = toml::from_str(
            "[[frontend]]\nname = 'f'\nbinds = ['127.0.0.1:80']\ndefault_pool = 'p'\n\
             [[pool]]\nname = 'p'\nservers = [{ address = '127.0.0.1:81' }]\n",
        )
        .unwrap();
        assert_eq!(cfg.frontends[0].send_buffer, 0, "autotuning by default");
        for good in [0, MIN_SEND_BUFFER, 65536, MAX_SEND_BUFFER] {
            cfg.frontends[0].send_buffer = good;
            assert_eq!(cfg.validate(), Ok(()), "{good}");
        }
        for bad in [1, MIN_SEND_BUFFER - 1, MAX_SEND_BUFFER + 1] {
            cfg.frontends[0].send_buffer = bad;
            let expected = ConfigError::BadSendBuffer {
                frontend: "f".into(),
                bytes: bad,
            };
            assert_eq!(cfg.validate(), Err(expected));
        }
    }
}
