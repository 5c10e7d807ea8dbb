//! Configuration model of the L7 proxy: frontends, pools and their servers.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// Everything the proxy needs: the `[[frontend]]` and `[[pool]]` tables.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProxyConfig {
    /// Listeners, from `[[frontend]]` tables.
    #[serde(default, rename = "frontend")]
    pub frontends: Vec<Frontend>,
    /// Server groups, from `[[pool]]` tables.
    #[serde(default, rename = "pool")]
    pub pools: Vec<Pool>,
}

/// A set of listening addresses sharing TLS settings, limits and timeouts.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Frontend {
    /// Name used in logs.
    pub name: String,
    /// Addresses to listen on.
    pub binds: Vec<SocketAddr>,
    /// Terminate TLS on every bind when present.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Pool used when the router picks none.
    pub default_pool: String,
    /// Connections served at once; further ones wait in the kernel's backlog.
    #[serde(default = "defaults::max_connections")]
    pub max_connections: usize,
    /// Largest request head in bytes (HTTP/1 buffer, HTTP/2 header list).
    #[serde(default = "defaults::request_header_limit")]
    pub request_header_limit: usize,
    /// Idle limit of an HTTP/2 connection with no request in flight.
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
    /// Named ACLs (`[[frontend.acl]]`); entries with the same name are OR-ed.
    #[serde(default)]
    pub acl: Vec<crate::acl::AclSpec>,
    /// `use_backend` rules in order (`[[frontend.use_pool]] pool = "api", if = "is_api"`);
    /// the first whose condition holds picks the pool, else `default_pool`.
    #[serde(default)]
    pub use_pool: Vec<UsePool>,
}

/// One `use_backend`-style rule.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UsePool {
    /// Pool to use.
    pub pool: String,
    /// Condition over the frontend's ACLs (`and`, `or`, `not`, parentheses).
    #[serde(rename = "if")]
    pub condition: String,
}

/// TLS settings of a frontend.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// Certificates offered, chosen by SNI.
    pub certs: Vec<CertPair>,
    /// Index into `certs` of the certificate for unknown or missing SNI (default 0).
    #[serde(default)]
    pub default_cert: Option<usize>,
}

/// A PEM certificate chain and its PEM private key.
#[derive(Debug, Clone, Deserialize)]
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
#[derive(Debug, Clone, Deserialize)]
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
    /// Time allowed for a server's response head once the request is sent.
    #[serde(default = "defaults::timeout_server", with = "duration")]
    pub timeout_server: Duration,
    /// Extra attempts on another server when connecting fails.
    #[serde(default = "defaults::retries")]
    pub retries: u32,
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
    /// The first usable server in configuration order.
    First,
}

/// One server of a pool.
#[derive(Debug, Clone, Deserialize)]
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
}

/// A configuration the proxy refuses to start with.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// Two frontends or two pools share a name.
    #[error("duplicate {kind} name {name:?}")]
    Duplicate {
        /// `frontend` or `pool`.
        kind: &'static str,
        /// The repeated name.
        name: String,
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
    /// A frontend allows zero connections.
    #[error("frontend {0:?}: max_connections must be at least 1")]
    NoConnections(String),
}

impl ProxyConfig {
    /// Index of the pool named `name` in `pools`.
    pub fn pool_index(&self, name: &str) -> Option<usize> {
        self.pools.iter().position(|p| p.name == name)
    }

    /// Checks names and references; `Proxy::start` calls it.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut seen = HashSet::new();
        for f in &self.frontends {
            if !seen.insert(f.name.as_str()) {
                return Err(ConfigError::Duplicate {
                    kind: "frontend",
                    name: f.name.clone(),
                });
            }
        }
        let mut seen = HashSet::new();
        for p in &self.pools {
            if !seen.insert(p.name.as_str()) {
                return Err(ConfigError::Duplicate {
                    kind: "pool",
                    name: p.name.clone(),
                });
            }
        }
        for f in &self.frontends {
            if self.pool_index(&f.default_pool).is_none() {
                return Err(ConfigError::UnknownPool {
                    frontend: f.name.clone(),
                    pool: f.default_pool.clone(),
                });
            }
            if f.binds.is_empty() {
                return Err(ConfigError::NoBinds(f.name.clone()));
            }
            if f.max_connections == 0 {
                return Err(ConfigError::NoConnections(f.name.clone()));
            }
            if let Some(tls) = &f.tls
                && (tls.certs.is_empty() || tls.default_cert.unwrap_or(0) >= tls.certs.len())
            {
                return Err(ConfigError::BadTls(f.name.clone()));
            }
        }
        Ok(())
    }
}

impl Frontend {
    /// A frontend with every optional setting at its default.
    pub fn new(name: &str, binds: Vec<SocketAddr>, default_pool: &str) -> Self {
        Frontend {
            name: name.to_string(),
            binds,
            tls: None,
            default_pool: default_pool.to_string(),
            max_connections: defaults::max_connections(),
            request_header_limit: defaults::request_header_limit(),
            timeout_client: defaults::timeout_client(),
            timeout_http_request: defaults::timeout_10s(),
            timeout_http_keep_alive: defaults::timeout_10s(),
            forwarded_headers: true,
            acl: Vec::new(),
            use_pool: Vec::new(),
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
            retries: defaults::retries(),
        }
    }
}

impl ServerSpec {
    /// A non-backup server of weight 1.
    pub fn new(address: SocketAddr) -> Self {
        ServerSpec {
            address,
            weight: 1,
            backup: false,
        }
    }
}

mod defaults {
    use std::time::Duration;

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
    pub fn retries() -> u32 {
        3
    }
    pub fn weight() -> u32 {
        1
    }
    pub fn yes() -> bool {
        true
    }
}

/// Durations as milliseconds (integer) or strings like `"500ms"`, `"10s"`, `"2m"`, `"1h"`.
pub(crate) mod duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, de::Error};

    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Raw {
        Millis(u64),
        Text(String),
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        match Raw::deserialize(d)? {
            Raw::Millis(ms) => Ok(Duration::from_millis(ms)),
            Raw::Text(s) => {
                parse(&s).ok_or_else(|| D::Error::custom(format!("bad duration {s:?}")))
            }
        }
    }

    /// Parses `<integer><unit>` with unit `ms`, `s`, `m` or `h` (bare integers are ms).
    pub fn parse(s: &str) -> Option<Duration> {
        let s = s.trim();
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().ok()?;
        let ms = match unit.trim() {
            "" | "ms" => n,
            "s" => n.checked_mul(1000)?,
            "m" => n.checked_mul(60_000)?,
            "h" => n.checked_mul(3_600_000)?,
            _ => return None,
        };
        Some(Duration::from_millis(ms))
    }
}
