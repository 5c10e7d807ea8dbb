//! Agent configuration: TOML parsing and validation.
//!
//! The file looks like this:
//!
//! ```toml
//! # Interfaces the XDP program attaches to (client side and backend side).
//! interfaces = ["eth0", "eth1"]
//! # Attach mode: "driver" (native, default; falls back to generic with a warning), "generic", or "auto".
//! xdp_mode = "driver"
//! # Optional: Prometheus metrics endpoint served by the agent.
//! metrics = "127.0.0.1:9100"
//! new_flow_limit = 10000       # new flows per second per client /24 (IPv4) or /64 (IPv6); 0 = no limit
//! deny = ["203.0.113.0/24", "2001:db8:bad::/48"]   # sources whose packets to any VIP are dropped
//! encap_source_v4 = "198.18.2.1"   # outer source of ipip packets: an address, or a prefix whose
//! encap_source_v6 = "fd00:18:2::/120" # host bits come from each flow; default: the interfaces' first
//!
//! [[service]]
//! name = "web"
//! vip = "198.18.100.1:80"       # IPv6: "[fd00:18:100::1]:80"
//! protocol = "tcp"             # "tcp" (default) or "udp"
//! mode = "l4"                  # "l4" (default, forwarded by XDP) or "l7" (passed to the kernel for the L7 proxy)
//! ring_size = 65537            # optional, must be a prime <= 65537; default 65537
//! forwarding = "nat"           # l4 only: "nat" (default), "ipip" or "l2" (direct server return)
//! mss_clamp = false            # ipip only: lower the MSS of SYNs so encapsulated segments fit
//!
//! [[service.backend]]
//! address = "198.18.2.11:8080"
//! weight = 1                   # optional, default 1; 0 = takes no new flows
//!
//! [service.health]             # optional; without it backends are never marked down
//! kind = "http"                # "tcp" (connect, default) or "http"
//! interval = "2s"              # between checks; "500ms", "2s", "1m"; 100ms..=1h, default 2s
//! timeout = "1s"               # per check, <= interval; default: the interval
//! rise = 2                     # consecutive successes to become UP (1..=100, default 2)
//! fall = 3                     # consecutive failures to become DOWN (1..=100, default 3)
//! method = "GET"               # http only: default GET
//! path = "/health"             # http only: default "/"
//! host = "example.org"         # http only: Host header, default the backend's address
//! status = "200-399"           # http only: a range (default) or a list, e.g. [200, 204]
//! body = "ok"                  # http only: a substring the body must contain
//!
//! [bgp]                        # optional: announce VIPs through BIRD 2 (see `crate::bgp`)
//! bird_socket = "/run/bird/bird.ctl"     # BIRD's control socket
//! include_file = "/etc/bird/lb-vips.conf" # written by the agent, included by bird.conf
//! protocol = "lb_vips"         # optional: static protocols lb_vips_v4 and lb_vips_v6
//! [service.discovery]          # optional; backends also come from DNS (see `crate::discovery`)
//! name = "_http._tcp.web.example.org"  # the name queried
//! type = "srv"                 # "srv" (default: targets, ports, weights), "a" or "aaaa"
//! nameservers = ["198.18.2.53", "[fd00::53]:5353"]  # asked, and nothing else; port 53 by default
//! interval = "5s"              # between queries; 100ms..=1h, default 5s
//! timeout = "2s"               # one round (SRV and its targets); <= interval, default min(interval, 2s)
//! hold = "30s"                 # how long an empty answer (NXDOMAIN, no records) must last
//!                              # before the discovered backends go; 0s..=1h, default 30s
//! port = 8080                  # "a"/"aaaa" only, required: the port of every address
//! weight = 1                   # "a"/"aaaa" only: the weight of every address (default 1)
//! ```
//!
//! Serde only reads the file into private "raw" structs whose fields keep their
//! byte spans; every semantic rule is then checked by hand so that all mistakes
//! are reported at once, each at the line of the offending value.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use lb_common::{DEFAULT_RING_SIZE, MAX_DENY_PREFIXES, MAX_VIPS, PROTO_TCP, PROTO_UDP};
use serde::Deserialize;
use toml::Spanned;

pub mod rules;

use rules::family;

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
const MAX_IFNAME_LEN: usize = 15;
/// Weight of a backend that does not set one.
const DEFAULT_WEIGHT: u32 = 1;
/// Hint appended to every address error.
const ADDR_FORM: &str = "expected \"a.b.c.d:port\" or \"[ipv6]:port\"";
/// Health-check interval when none is given (HAProxy's `inter` default).
const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Shortest health-check interval; faster checks load backends for little gain.
const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);
/// Longest health-check interval; beyond it a dead backend goes unnoticed too long.
const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(3600);
/// Default `rise` (HAProxy's).
const DEFAULT_RISE: u32 = 2;
/// Default `fall` (HAProxy's).
const DEFAULT_FALL: u32 = 3;
/// Largest `rise` or `fall`.
const MAX_RISE_FALL: i64 = 100;
/// HTTP status codes that pass by default: success and redirects, as HAProxy.
const DEFAULT_STATUS: StatusMatch = StatusMatch::Range(200, 399);
/// New flows per second a client prefix (/24, /64) may open when the file
/// does not say: far above one client's needs (the lab's benchmark opens
/// under 5 000 connections per second from one address) and a large NAT's,
/// yet one prefix alone cannot take the whole new-flow path.
pub const DEFAULT_NEW_FLOW_LIMIT: u32 = 10_000;
/// Largest `new_flow_limit`.
const MAX_NEW_FLOW_LIMIT: i64 = 100_000_000;
/// Time between DNS discovery queries when none is given.
const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);
/// Longest default time for one discovery round (shorter when the interval is).
const DEFAULT_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an empty DNS answer must last before discovered backends go
/// (HAProxy's `hold nx` default): a zone being rewritten does not empty a service.
const DEFAULT_DISCOVERY_HOLD: Duration = Duration::from_secs(30);
/// Longest name a DNS query may carry, without the root's dot (RFC 1035).
const MAX_DNS_NAME: usize = 253;
/// Hint appended to every duration error.
const DURATION_FORM: &str =
    "expected a whole number with a unit: \"500ms\", \"2s\", \"1m\" or \"1h\"";

/// A validated agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// Interfaces the XDP program attaches to.
    pub interfaces: Vec<String>,
    /// How the XDP program is attached.
    pub xdp_mode: XdpModeSetting,
    /// Address of the Prometheus metrics endpoint, if any.
    pub metrics: Option<SocketAddr>,
    /// New flows per second per client /24 or /64; 0 = no limit.
    pub new_flow_limit: u32,
    /// Source networks whose packets to a VIP are dropped, in file order.
    pub deny: Vec<DenyPrefix>,
    /// Outer IPv4 source of `ipip` packets (an address or a prefix whose
    /// host bits come from the flow); `None`: an address of the interfaces.
    pub encap_source_v4: Option<DenyPrefix>,
    /// Outer IPv6 source of `ipip` packets, as `encap_source_v4` (at least a /96).
    pub encap_source_v6: Option<DenyPrefix>,
    /// Load-balanced services, in file order.
    pub services: Vec<Service>,
    /// How VIPs are announced by BGP through BIRD (`[bgp]`), if at all.
    pub bgp: Option<BgpConfig>,
    /// The L7 proxy's `[[frontend]]` and `[[pool]]` tables.
    pub proxy: ProxySection,
}

/// The L7 proxy's part of the file (see `crate::proxy`), already validated,
/// with the health checks of its pools (pool name, check) and their DNS
/// discoveries (pool name, discovery).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxySection(
    pub crate::proxy::ProxyConfig,
    pub Vec<(String, HealthCheck)>,
    pub Vec<(String, Discovery)>,
);

/// One `deny` entry: a network, host bits zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DenyPrefix {
    /// The network address.
    pub addr: std::net::IpAddr,
    /// Prefix length in bits (32 or 128 for a single address).
    pub len: u8,
}

impl DenyPrefix {
    /// Parses `a.b.c.d/n`, `ipv6/n` or a bare address; host bits must be zero.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (addr_text, len_text) = match text.split_once('/') {
            Some((a, l)) => (a, Some(l)),
            None => (text, None),
        };
        let addr: std::net::IpAddr = addr_text
            .parse()
            .map_err(|_| format!("\"{addr_text}\" is not an IPv4 or IPv6 address"))?;
        let max: u32 = if addr.is_ipv4() { 32 } else { 128 };
        let len = match len_text {
            None => max,
            Some(l) => match l.parse::<u32>() {
                Ok(n) if n <= max && !l.starts_with('+') => n,
                _ => return Err(format!("prefix length \"{l}\" is not a number 0..={max}")),
            },
        };
        let network = match addr {
            std::net::IpAddr::V4(a) => {
                let mask = u32::MAX.checked_shl(32 - len).unwrap_or(0);
                std::net::IpAddr::V4((u32::from(a) & mask).into())
            }
            std::net::IpAddr::V6(a) => {
                let mask = u128::MAX.checked_shl(128 - len).unwrap_or(0);
                std::net::IpAddr::V6((u128::from(a) & mask).into())
            }
        };
        if network != addr {
            // Likely a typo in the length or the address: say which network it would be.
            return Err(format!("host bits are set; the network is {network}/{len}"));
        }
        Ok(Self {
            addr,
            len: len as u8,
        })
    }
}

impl DenyPrefix {
    /// Whether `ip` is in this network.
    pub fn contains(&self, ip: std::net::IpAddr) -> bool {
        match (self.addr, ip) {
            (std::net::IpAddr::V4(net), std::net::IpAddr::V4(a)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.len)).unwrap_or(0);
                u32::from(a) & mask == u32::from(net)
            }
            (std::net::IpAddr::V6(net), std::net::IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.len))
                    .unwrap_or(0);
                u128::from(a) & mask == u128::from(net)
            }
            _ => false,
        }
    }
}

impl std::fmt::Display for DenyPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// XDP attach mode requested in the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum XdpModeSetting {
    /// Native driver mode; falls back to generic with a warning.
    #[default]
    Driver,
    /// Generic (skb) mode.
    Generic,
    /// Let the kernel choose.
    Auto,
}

/// `[bgp]`: the agent announces VIPs through a running BIRD 2 (see `crate::bgp`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BgpConfig {
    /// BIRD's control socket (`bird -s`).
    pub bird_socket: std::path::PathBuf,
    /// The file the agent writes and BIRD's configuration includes.
    pub include_file: std::path::PathBuf,
    /// Name prefix of the two static protocols in that file (`<name>_v4`, `<name>_v6`).
    pub protocol: String,
    /// Line of the `[bgp]` header, for later messages.
    pub line: usize,
}

/// Default `[bgp] protocol`.
pub const DEFAULT_BGP_PROTOCOL: &str = "lb_vips";

/// One virtual service: a VIP and the backends behind it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    /// Unique service name (`[A-Za-z0-9_.-]+`).
    pub name: String,
    /// Virtual address and port clients connect to.
    pub vip: SocketAddr,
    /// Transport protocol of the VIP.
    pub protocol: Protocol,
    /// Whether XDP forwards the traffic (L4) or passes it to the kernel (L7).
    pub mode: Mode,
    /// How an L4 service's packets reach its backends.
    pub forwarding: Forwarding,
    /// Lower the MSS of SYNs so encapsulated segments fit (`ipip` only).
    pub mss_clamp: bool,
    /// Maglev ring size (a prime).
    pub ring_size: u32,
    /// Backends, in file order.
    pub backends: Vec<BackendConfig>,
    /// Health check of every backend, if `[service.health]` is given.
    pub health: Option<HealthCheck>,
    /// Backends found in DNS besides the static ones, if `[service.discovery]` is given.
    pub discovery: Option<Discovery>,
    /// Line of the `[[service]]` header, for later messages.
    pub line: usize,
}

/// Where a service's or pool's backends are found in DNS
/// (`[service.discovery]`, `[pool.discovery]`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Discovery {
    /// The name queried, fully qualified (ends with '.').
    pub name: String,
    /// SRV records, or address records of one family.
    pub record: RecordKind,
    /// The servers asked, and nothing else (no resolv.conf).
    pub nameservers: Vec<SocketAddr>,
    /// Time between the start of one round of queries and the next.
    pub interval: Duration,
    /// Limit on one whole round (the SRV query and its targets' addresses).
    pub timeout: Duration,
    /// How long an empty answer must last before the discovered backends go.
    pub hold: Duration,
    /// Port of every address (`a`/`aaaa` only).
    pub port: Option<u16>,
    /// Weight of every address (`a`/`aaaa` only; SRV records carry their own).
    pub weight: u32,
}

/// Which records a discovery asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RecordKind {
    /// SRV: targets, ports and weights; targets resolved to addresses.
    Srv,
    /// A records (IPv4) with a configured port.
    A,
    /// AAAA records (IPv6) with a configured port.
    Aaaa,
}

impl RecordKind {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            RecordKind::Srv => "srv",
            RecordKind::A => "a",
            RecordKind::Aaaa => "aaaa",
        }
    }
}

/// How a service's backends are health checked (`[service.health]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthCheck {
    /// TCP connect or HTTP request.
    pub kind: CheckKind,
    /// Time between the end of one check and the start of the next.
    pub interval: Duration,
    /// Limit on one whole check; never more than `interval`.
    pub timeout: Duration,
    /// Consecutive successes that make a backend UP.
    pub rise: u32,
    /// Consecutive failures that make a backend DOWN.
    pub fall: u32,
    /// TCP port to check instead of the backend's own (required for UDP services).
    pub port: Option<u16>,
}

/// What one health check does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckKind {
    /// Passes when a TCP connection is established.
    Tcp,
    /// Passes when an HTTP request gets a matching response.
    Http(HttpCheck),
}

/// The request an HTTP health check sends and the response it expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpCheck {
    /// Request method (an uppercase token such as `GET`).
    pub method: String,
    /// Request target; starts with '/'.
    pub path: String,
    /// Host header; the backend's address when `None`.
    pub host: Option<String>,
    /// Status codes that pass.
    pub status: StatusMatch,
    /// Substring the response body must contain, if any.
    pub body: Option<String>,
}

/// HTTP status codes a health check accepts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StatusMatch {
    /// Every code from the first to the second, inclusive.
    Range(u16, u16),
    /// Exactly these codes.
    List(Vec<u16>),
}

impl StatusMatch {
    /// Whether `code` passes.
    pub fn matches(&self, code: u16) -> bool {
        match self {
            StatusMatch::Range(lo, hi) => (*lo..=*hi).contains(&code),
            StatusMatch::List(codes) => codes.contains(&code),
        }
    }
}

/// Transport protocol of a service.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl Protocol {
    /// IP protocol number (6 for TCP, 17 for UDP).
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => PROTO_TCP,
            Protocol::Udp => PROTO_UDP,
        }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        }
    }
}

/// Where a service's packets are handled.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Forwarded by the XDP program.
    #[default]
    L4,
    /// Passed to the kernel stack for the L7 proxy.
    L7,
}

/// How an L4 service's packets reach its backends (`forwarding = ...`).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Destination rewritten to the backend; replies come back through the
    /// balancer and are rewritten back (backends route via the balancer).
    #[default]
    Nat,
    /// Direct server return: the packet, untouched, inside an outer IP header
    /// to the backend, which decapsulates it and answers the client itself.
    Ipip,
    /// Direct server return on one L2 segment: only the destination MAC changes.
    L2,
}

impl Forwarding {
    /// Parses the config and CLI spelling.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "nat" => Ok(Forwarding::Nat),
            "ipip" => Ok(Forwarding::Ipip),
            "l2" => Ok(Forwarding::L2),
            other => Err(format!(
                "unknown forwarding \"{other}\"; expected \"nat\", \"ipip\" or \"l2\""
            )),
        }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Forwarding::Nat => "nat",
            Forwarding::Ipip => "ipip",
            Forwarding::L2 => "l2",
        }
    }

    /// Whether backends answer clients directly (the packet reaches them untouched).
    pub fn is_dsr(self) -> bool {
        self != Forwarding::Nat
    }
}

/// One backend of a service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendConfig {
    /// Backend address and port; same family as the VIP.
    pub address: SocketAddr,
    /// Maglev weight, 0..=65535; 0 takes no new flows.
    pub weight: u32,
    /// Line of the `[[service.backend]]` header, for later messages.
    pub line: usize,
}

/// One configuration problem, located in the file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}:{} {reason}", position(*.line, *.column))]
pub struct ConfigError {
    /// File name as given to [`parse`] or [`load`].
    pub file: String,
    /// 1-based line; 0 when the problem concerns the whole file.
    pub line: usize,
    /// 1-based column in characters; 0 when unknown.
    pub column: usize,
    /// What is wrong, in words.
    pub reason: String,
}

/// Renders `line:column:` the way rustc and gcc do, leaving out unknown parts.
fn position(line: usize, column: usize) -> String {
    match (line, column) {
        (0, _) => String::new(),
        (l, 0) => format!("{l}:"),
        (l, c) => format!("{l}:{c}:"),
    }
}

/// Every problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", join_lines(.0))]
pub struct ConfigErrors(pub Vec<ConfigError>);

fn join_lines(errors: &[ConfigError]) -> String {
    errors
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Reads and validates the configuration file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, Host::Any)
}

/// Like [`load`], and every interface must exist in this network namespace:
/// what `lb check` and `lb run` use, so that a missing interface is reported at
/// its line before anything is loaded or attached.
pub fn load_for_this_host(path: &Path) -> Result<Config, ConfigErrors> {
    load_with(path, Host::This)
}

/// Whether validation looks at the machine it runs on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Host {
    /// The file alone (tests, reloads: interfaces only change on restart).
    Any,
    /// Also the interfaces of the current network namespace.
    This,
}

fn load_with(path: &Path, host: Host) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => parse_with(&text, &file, host),
        Err(e) => Err(ConfigErrors(vec![ConfigError {
            file,
            line: 0,
            column: 0,
            reason: format!("cannot read configuration: {e}"),
        }])),
    }
}

/// Parses and validates configuration `text`; `file` names it in errors.
pub fn parse(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    parse_with(text, file, Host::Any)
}

/// Like [`parse`], and every interface must exist in this network namespace.
pub fn parse_for_this_host(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    parse_with(text, file, Host::This)
}

fn parse_with(text: &str, file: &str, host: Host) -> Result<Config, ConfigErrors> {
    let mut checker = Checker {
        file,
        lines: LineIndex::new(text),
        errors: Vec::new(),
        host,
    };
    let raw: RawConfig = match toml::from_str(text) {
        Ok(raw) => raw,
        Err(e) => {
            // toml's messages may span several lines; keep one error per line of output.
            let reason = e.message().trim().replace('\n', ": ");
            match e.span() {
                Some(span) => checker.at(&span, reason),
                None => checker.whole(reason),
            }
            return Err(ConfigErrors(checker.errors));
        }
    };
    let has_proxy = raw.frontend.is_some() || raw.pool.is_some() || raw.userlist.is_some();
    let service_tables = raw.service.as_ref().map_or(0, Vec::len);
    let mut config = checker.config(raw);
    if has_proxy {
        config.proxy = checker.proxy_section(text);
    }
    if service_tables == 0 && config.proxy.0.frontends.is_empty() {
        checker.whole("no services; add at least one [[service]] (or [[frontend]]) table");
    }
    if checker.errors.is_empty() {
        Ok(config)
    } else {
        // Sorted by position so the output reads top to bottom like the file.
        checker.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(checker.errors))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    interfaces: Option<Spanned<Vec<Spanned<String>>>>,
    xdp_mode: Option<Spanned<String>>,
    metrics: Option<Spanned<String>>,
    new_flow_limit: Option<Spanned<i64>>,
    deny: Option<Spanned<Vec<Spanned<String>>>>,
    encap_source_v4: Option<Spanned<String>>,
    encap_source_v6: Option<Spanned<String>>,
    service: Option<Vec<Spanned<RawService>>>,
    bgp: Option<Spanned<RawBgp>>,
    // Read again, typed, by `proxy_section`; here they only need to be allowed.
    frontend: Option<Spanned<toml::Value>>,
    pool: Option<Spanned<toml::Value>>,
    userlist: Option<Spanned<toml::Value>>,
}

/// The proxy's tables, read with spans so errors point at their entry.
#[derive(Deserialize)]
struct RawProxy {
    #[serde(default)]
    frontend: Vec<Spanned<crate::proxy::Frontend>>,
    #[serde(default)]
    pool: Vec<Spanned<crate::proxy::Pool>>,
    #[serde(default)]
    userlist: Vec<crate::proxy::UserList>,
}

/// Just the `[pool.health]` tables, with their spans (other keys are ignored here).
#[derive(Deserialize)]
struct RawPoolChecks {
    #[serde(default)]
    pool: Vec<RawPoolCheck>,
}

#[derive(Deserialize)]
struct RawPoolCheck {
    name: Option<String>,
    health: Option<Spanned<RawHealth>>,
    discovery: Option<Spanned<RawDiscovery>>,
}

// Everything is optional and loosely typed (strings, i64) so that missing or
// out-of-range values become located semantic errors instead of one serde error.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: Option<Spanned<String>>,
    vip: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
    mode: Option<Spanned<String>>,
    forwarding: Option<Spanned<String>>,
    mss_clamp: Option<Spanned<bool>>,
    ring_size: Option<Spanned<i64>>,
    backend: Option<Vec<Spanned<RawBackend>>>,
    health: Option<Spanned<RawHealth>>,
    discovery: Option<Spanned<RawDiscovery>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDiscovery {
    name: Option<Spanned<String>>,
    #[serde(rename = "type")]
    kind: Option<Spanned<String>>,
    nameservers: Option<Spanned<Vec<Spanned<String>>>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    hold: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
    weight: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawHealth {
    kind: Option<Spanned<String>>,
    interval: Option<Spanned<String>>,
    timeout: Option<Spanned<String>>,
    rise: Option<Spanned<i64>>,
    fall: Option<Spanned<i64>>,
    method: Option<Spanned<String>>,
    path: Option<Spanned<String>>,
    host: Option<Spanned<String>>,
    // A range string, one code or a list of codes: checked by hand for a clear message.
    status: Option<Spanned<toml::Value>>,
    body: Option<Spanned<String>>,
    port: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBgp {
    bird_socket: Option<Spanned<String>>,
    include_file: Option<Spanned<String>>,
    protocol: Option<Spanned<String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBackend {
    address: Option<Spanned<String>>,
    weight: Option<Spanned<i64>>,
}

/// Collects errors while turning raw values into the model.
struct Checker<'a> {
    file: &'a str,
    lines: LineIndex<'a>,
    errors: Vec<ConfigError>,
    host: Host,
}

impl Checker<'_> {
    /// Records an error at the start of byte range `span`.
    fn at(&mut self, span: &Range<usize>, reason: impl Into<String>) {
        let (line, column) = self.lines.locate(span.start);
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            column,
            reason: reason.into(),
        });
    }

    /// Records an error about the file as a whole.
    fn whole(&mut self, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line: 0,
            column: 0,
            reason: reason.into(),
        });
    }

    fn line(&self, span: &Range<usize>) -> usize {
        self.lines.locate(span.start).0
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let interfaces = self.interfaces(raw.interfaces);
        let xdp_mode = raw
            .xdp_mode
            .and_then(|m| match m.get_ref().as_str() {
                "driver" => Some(XdpModeSetting::Driver),
                "generic" => Some(XdpModeSetting::Generic),
                "auto" => Some(XdpModeSetting::Auto),
                other => {
                    self.at(
                        &m.span(),
                        format!(
                            "unknown xdp_mode \"{other}\"; expected \"driver\", \"generic\" or \"auto\""
                        ),
                    );
                    None
                }
            })
            .unwrap_or_default();
        let metrics = raw.metrics.and_then(|m| match m.get_ref().parse() {
            Ok(addr) => Some(addr),
            Err(_) => {
                self.at(
                    &m.span(),
                    format!(
                        "metrics \"{}\" is not a socket address; {ADDR_FORM}",
                        m.get_ref()
                    ),
                );
                None
            }
        });
        let new_flow_limit = match raw.new_flow_limit {
            None => DEFAULT_NEW_FLOW_LIMIT,
            Some(n) if (0..=MAX_NEW_FLOW_LIMIT).contains(n.get_ref()) => *n.get_ref() as u32,
            Some(n) => {
                self.at(
                    &n.span(),
                    format!(
                        "new_flow_limit {} is out of range; expected 0 (no limit)..={MAX_NEW_FLOW_LIMIT} new flows per second per prefix",
                        n.get_ref()
                    ),
                );
                DEFAULT_NEW_FLOW_LIMIT
            }
        };
        let deny = self.deny(raw.deny);
        let encap_source_v4 = self.encap_source(raw.encap_source_v4, false);
        let encap_source_v6 = self.encap_source(raw.encap_source_v6, true);
        let services = self.services(raw.service.unwrap_or_default());
        let bgp = raw.bgp.and_then(|b| self.bgp(b));
        Config {
            interfaces,
            xdp_mode,
            metrics,
            new_flow_limit,
            deny,
            encap_source_v4,
            encap_source_v6,
            services,
            bgp,
            proxy: ProxySection::default(),
        }
    }

    /// Checks `[bgp]`: both paths absolute, the protocol a BIRD symbol.
    fn bgp(&mut self, raw: Spanned<RawBgp>) -> Option<BgpConfig> {
        let span = raw.span();
        let line = self.line(&span);
        let raw = raw.into_inner();
        let bird_socket = self.absolute_path(raw.bird_socket, "bird_socket", &span);
        let include_file = self.absolute_path(raw.include_file, "include_file", &span);
        let protocol = match raw.protocol {
            None => DEFAULT_BGP_PROTOCOL.to_string(),
            Some(p) => {
                let name = p.get_ref();
                // `_v4`/`_v6` are appended; BIRD symbols are letters, digits, `_`.
                let valid = name.len() <= 60
                    && name.starts_with(|c: char| c.is_ascii_alphabetic())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    self.at(
                        &p.span(),
                        format!(
                            "bgp protocol \"{name}\" is not a BIRD protocol name; expected a letter, then letters, digits or '_' (at most 60)"
                        ),
                    );
                    return None;
                }
                name.clone()
            }
        };
        Some(BgpConfig {
            bird_socket: bird_socket?,
            include_file: include_file?,
            protocol,
            line,
        })
    }

    /// A required absolute path of `[bgp]`.
    fn absolute_path(
        &mut self,
        raw: Option<Spanned<String>>,
        key: &str,
        table: &Range<usize>,
    ) -> Option<std::path::PathBuf> {
        let Some(raw) = raw else {
            self.at(table, format!("[bgp] needs `{key}`, an absolute path"));
            return None;
        };
        let path = std::path::PathBuf::from(raw.get_ref());
        if !path.is_absolute() || raw.get_ref().contains('"') {
            self.at(
                &raw.span(),
                format!(
                    "{key} \"{}\" must be an absolute path (without '\"')",
                    raw.get_ref()
                ),
            );
            return None;
        }
        Some(path)
    }

    /// Reads and checks the `[[frontend]]` and `[[pool]]` tables.
    fn proxy_section(&mut self, text: &str) -> ProxySection {
        let raw: RawProxy = match toml::from_str(text) {
            Ok(raw) => raw,
            Err(e) => {
                let reason = e.message().trim().replace('\n', ": ");
                match e.span() {
                    Some(span) => self.at(&span, reason),
                    None => self.whole(reason),
                }
                return ProxySection::default();
            }
        };
        let first = raw
            .frontend
            .first()
            .map(Spanned::span)
            .or_else(|| raw.pool.first().map(Spanned::span));
        // `[pool.health]` uses the service health checks' keys and rules; read
        // again from the text so errors point at their own lines.
        let mut checks = Vec::new();
        let mut discoveries = Vec::new();
        if let Ok(pools) = toml::from_str::<RawPoolChecks>(text) {
            for pool in pools.pool {
                let Some(name) = pool.name else { continue };
                if let Some(h) = pool.health
                    && let Some(check) = self.health(h)
                {
                    checks.push((name.clone(), check));
                }
                if let Some(d) = pool.discovery
                    && let Some(discovery) = self.discovery(d, None, Forwarding::Nat)
                {
                    discoveries.push((name, discovery));
                }
            }
        }
        let cfg = crate::proxy::ProxyConfig {
            frontends: raw.frontend.into_iter().map(Spanned::into_inner).collect(),
            pools: raw.pool.into_iter().map(Spanned::into_inner).collect(),
            userlists: raw.userlist,
        };
        let problem = cfg
            .validate()
            .map_err(|e| e.to_string())
            .and_then(|()| crate::proxy::routing::router(&cfg).map_err(|e| e.to_string()))
            .and_then(|_| crate::proxy::actions::compile(&cfg).map_err(|e| e.to_string()))
            .map(drop);
        if let Err(reason) = problem {
            match first {
                Some(span) => self.at(&span, reason),
                None => self.whole(reason),
            }
        }
        ProxySection(cfg, checks, discoveries)
    }

    /// Checks an `encap_source_v4`/`_v6` value: an address or prefix of the
    /// right family; for IPv6 at least a /96, as only the last 32 bits vary.
    fn encap_source(&mut self, raw: Option<Spanned<String>>, v6: bool) -> Option<DenyPrefix> {
        let raw = raw?;
        let key = if v6 {
            "encap_source_v6"
        } else {
            "encap_source_v4"
        };
        let text = raw.get_ref();
        match DenyPrefix::parse(text) {
            Err(why) => self.at(&raw.span(), format!("{key} \"{text}\": {why}")),
            Ok(p) if p.addr.is_ipv6() != v6 => self.at(
                &raw.span(),
                format!(
                    "{key} \"{text}\" is {}; expected an {} address or prefix",
                    if v6 { "IPv4" } else { "IPv6" },
                    if v6 { "IPv6" } else { "IPv4" }
                ),
            ),
            Ok(p) if v6 && p.len < 96 => self.at(
                &raw.span(),
                format!("{key} \"{text}\": only the last 32 bits come from the flow; use a /96 or longer"),
            ),
            Ok(p) => return Some(p),
        }
        None
    }

    /// Checks the `deny` list: networks, no duplicates, within the data
    /// plane's size per family.
    fn deny(&mut self, raw: Option<Spanned<Vec<Spanned<String>>>>) -> Vec<DenyPrefix> {
        let Some(list) = raw else {
            return Vec::new();
        };
        let mut seen: HashMap<DenyPrefix, usize> = HashMap::new();
        let (mut v4, mut v6) = (0u32, 0u32);
        let mut out = Vec::new();
        for entry in list.into_inner() {
            let span = entry.span();
            let text = entry.get_ref();
            let prefix = match DenyPrefix::parse(text) {
                Ok(p) => p,
                Err(why) => {
                    self.at(&span, format!("deny \"{text}\": {why}"));
                    continue;
                }
            };
            if let Some(first) = seen.get(&prefix) {
                self.at(
                    &span,
                    format!("deny \"{text}\" is listed twice (first on line {first})"),
                );
                continue;
            }
            seen.insert(prefix, self.line(&span));
            let count = if prefix.addr.is_ipv4() {
                &mut v4
            } else {
                &mut v6
            };
            *count += 1;
            if *count == MAX_DENY_PREFIXES + 1 {
                self.at(
                    &span,
                    format!(
                        "too many deny prefixes of this family; the data plane holds at most {MAX_DENY_PREFIXES} (MAX_DENY_PREFIXES)"
                    ),
                );
            }
            out.push(prefix);
        }
        out
    }

    fn interfaces(&mut self, raw: Option<Spanned<Vec<Spanned<String>>>>) -> Vec<String> {
        let Some(list) = raw else {
            self.whole("missing `interfaces`; list the interfaces to attach to, e.g. interfaces = [\"eth0\"]");
            return Vec::new();
        };
        if list.get_ref().is_empty() {
            self.at(
                &list.span(),
                "`interfaces` is empty; list at least one interface to attach to",
            );
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for name in list.get_ref() {
            let span = name.span();
            let n = name.get_ref().as_str();
            if n.is_empty() {
                self.at(&span, "interface name is empty");
            } else if n.len() > MAX_IFNAME_LEN {
                self.at(
                    &span,
                    format!(
                        "interface name \"{n}\" is {} bytes long; Linux allows at most {MAX_IFNAME_LEN} (IFNAMSIZ - 1)",
                        n.len()
                    ),
                );
            } else if n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
                // The kernel's dev_valid_name() rejects these characters.
                self.at(
                    &span,
                    format!("interface name \"{n}\" must not contain '/', ':' or whitespace"),
                );
            } else if let Some(first) = seen.get(n) {
                self.at(
                    &span,
                    format!("interface \"{n}\" is listed twice (first on line {first})"),
                );
            } else {
                seen.insert(n, self.line(&span));
                if self.host == Host::This && !interface_exists(n) {
                    self.at(
                        &span,
                        format!(
                            "interface \"{n}\" does not exist in this network namespace (`ip link` lists those that do)"
                        ),
                    );
                }
            }
        }
        list.into_inner()
            .into_iter()
            .map(Spanned::into_inner)
            .collect()
    }

    fn services(&mut self, raw: Vec<Spanned<RawService>>) -> Vec<Service> {
        if raw.is_empty() {
            // Checked once the proxy's tables are known (a pure L7 file is fine).
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut vips: HashMap<(SocketAddr, Protocol), (String, usize)> = HashMap::new();
        let mut all_backends = 0;
        let mut services = Vec::new();
        for (index, svc) in raw.into_iter().enumerate() {
            let span = svc.span();
            let line = self.line(&span);
            // Reported once, at the service that crosses the limit.
            if index == MAX_VIPS as usize
                && let Err(why) = rules::service_count(index + 1)
            {
                self.at(&span, why);
            }
            let svc = svc.into_inner();

            let name = match &svc.name {
                None => {
                    self.at(&span, "service has no `name`");
                    None
                }
                Some(n) => self.service_name(n, &mut names),
            };
            // Messages name the service as written even if the name itself was rejected.
            let label = svc
                .name
                .as_ref()
                .map_or_else(|| "<unnamed>".to_string(), |n| n.get_ref().clone());

            let protocol =
                svc.protocol
                    .as_ref()
                    .map_or(Some(Protocol::Tcp), |p| match p.get_ref().as_str() {
                        "tcp" => Some(Protocol::Tcp),
                        "udp" => Some(Protocol::Udp),
                        other => {
                            self.at(
                                &p.span(),
                                format!(
                                    "unknown protocol \"{other}\"; expected \"tcp\" or \"udp\""
                                ),
                            );
                            None
                        }
                    });
            let mode = svc
                .mode
                .as_ref()
                .map_or(Some(Mode::L4), |m| match m.get_ref().as_str() {
                    "l4" => Some(Mode::L4),
                    "l7" => Some(Mode::L7),
                    other => {
                        self.at(
                            &m.span(),
                            format!("unknown mode \"{other}\"; expected \"l4\" or \"l7\""),
                        );
                        None
                    }
                });

            let forwarding = match &svc.forwarding {
                None => Some(Forwarding::Nat),
                Some(f) => match Forwarding::parse(f.get_ref()).and_then(|forwarding| {
                    rules::forwarding(&label, mode.unwrap_or_default(), forwarding)
                        .map(|()| forwarding)
                }) {
                    Ok(f) => Some(f),
                    Err(why) => {
                        self.at(&f.span(), why);
                        None
                    }
                },
            };
            let mss_clamp = match (&svc.mss_clamp, forwarding) {
                (Some(m), Some(f)) if *m.get_ref() && f != Forwarding::Ipip => {
                    self.at(
                        &m.span(),
                        format!("mss_clamp applies to forwarding = \"ipip\" only (the mode that makes packets bigger); service \"{label}\" uses \"{}\"", f.as_str()),
                    );
                    false
                }
                (m, _) => m.as_ref().is_some_and(|m| *m.get_ref()),
            };

            let vip = match &svc.vip {
                None => {
                    self.at(&span, format!("service \"{label}\" has no `vip`"));
                    None
                }
                Some(v) => self.endpoint(v, "vip"),
            };
            if let (Some(vip), Some(protocol), Some(v)) = (vip, protocol, &svc.vip) {
                if let Some((other, other_line)) = vips.get(&(vip, protocol)) {
                    self.at(
                        &v.span(),
                        rules::vip_taken(vip, protocol, other, Some(*other_line)),
                    );
                } else {
                    vips.insert((vip, protocol), (label.clone(), line));
                }
            }

            let ring_size = match &svc.ring_size {
                None => Some(DEFAULT_RING_SIZE),
                Some(r) => self.ring_size(r),
            };

            let raw_backends = svc.backend.unwrap_or_default();
            let backends = self.backends(
                raw_backends,
                vip,
                forwarding.unwrap_or_default(),
                &label,
                &mut all_backends,
            );

            // Outer None: the table is invalid (already reported); Some(None): no table.
            let discovery = match svc.discovery {
                None => Some(None),
                Some(d) => self
                    .discovery(d, vip, forwarding.unwrap_or_default())
                    .map(Some),
            };
            // An l4 service without backends is allowed (see `rules`): they
            // may come from `lb add backend` or a discovery.
            if let Some(ring) = ring_size {
                let active = rules::active(backends.iter().map(|b| b.weight));
                if let Err(why) = rules::ring_capacity(&label, active, ring) {
                    let at = svc.ring_size.as_ref().map_or(span.clone(), Spanned::span);
                    self.at(&at, why);
                }
            }

            // Outer None: the table is invalid (already reported); Some(None): no table.
            let health_span = svc.health.as_ref().map(Spanned::span);
            let health = match svc.health {
                None => Some(None),
                Some(h) => self.health(h).map(Some),
            };
            // Checks are TCP or HTTP: a UDP service's own port cannot answer them.
            let health = match (health, protocol, health_span) {
                (Some(Some(h)), Some(Protocol::Udp), Some(span)) if h.port.is_none() => {
                    self.at(
                        &span,
                        "health checks of a udp service need `port`, a TCP port on the backends to check",
                    );
                    None
                }
                (h, ..) => h,
            };

            if let (
                Some(name),
                Some(vip),
                Some(protocol),
                Some(mode),
                Some(forwarding),
                Some(ring_size),
                Some(health),
                Some(discovery),
            ) = (
                name, vip, protocol, mode, forwarding, ring_size, health, discovery,
            ) {
                services.push(Service {
                    name,
                    vip,
                    protocol,
                    mode,
                    forwarding,
                    mss_clamp,
                    ring_size,
                    backends,
                    health,
                    discovery,
                    line,
                });
            }
        }
        services
    }

    fn service_name(
        &mut self,
        name: &Spanned<String>,
        names: &mut HashMap<String, usize>,
    ) -> Option<String> {
        let span = name.span();
        let n = name.get_ref();
        if let Err(why) = rules::service_name(n) {
            self.at(&span, why);
            return None;
        }
        if let Some(first) = names.get(n) {
            self.at(&span, rules::name_taken(n, Some(*first)));
            return None;
        }
        names.insert(n.clone(), self.line(&span));
        Some(n.clone())
    }

    /// Parses a VIP or backend address: a socket address with a usable unicast IP and port.
    fn endpoint(&mut self, value: &Spanned<String>, what: &str) -> Option<SocketAddr> {
        let span = value.span();
        let s = value.get_ref();
        let addr: SocketAddr = match s.parse() {
            Ok(a) => a,
            Err(_) => {
                let why = match s.parse::<std::net::IpAddr>() {
                    // "fd00::1:80" is a valid IPv6 address, so the missing brackets are the likely mistake.
                    Ok(std::net::IpAddr::V6(_)) => "has no port (IPv6 needs brackets)",
                    Ok(std::net::IpAddr::V4(_)) => "has no port",
                    Err(_) => "is not a socket address",
                };
                self.at(&span, format!("{what} \"{s}\" {why}; {ADDR_FORM}"));
                return None;
            }
        };
        match rules::endpoint(addr) {
            Ok(()) => Some(addr),
            Err(reason) => {
                self.at(&span, format!("{what} \"{s}\" {reason}"));
                None
            }
        }
    }

    fn ring_size(&mut self, value: &Spanned<i64>) -> Option<u32> {
        rules::ring_size(*value.get_ref())
            .map_err(|why| self.at(&value.span(), why))
            .ok()
    }

    fn backends(
        &mut self,
        raw: Vec<Spanned<RawBackend>>,
        vip: Option<SocketAddr>,
        forwarding: Forwarding,
        service: &str,
        all: &mut usize,
    ) -> Vec<BackendConfig> {
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        let mut backends = Vec::new();
        for b in raw {
            let span = b.span();
            let line = self.line(&span);
            let b = b.into_inner();
            let weight = match &b.weight {
                None => Some(DEFAULT_WEIGHT),
                Some(w) => self.weight(w),
            };
            let address = match &b.address {
                None => {
                    self.at(&span, "backend has no `address`");
                    continue;
                }
                Some(a) => a,
            };
            let Some(addr) = self.endpoint(address, "backend address") else {
                continue;
            };
            if let Some(vip) = vip
                && let Err(why) = rules::backend_for_vip(vip, forwarding, addr)
            {
                self.at(&address.span(), why);
                continue;
            }
            if let Some(first) = seen.get(&addr) {
                self.at(
                    &address.span(),
                    rules::backend_taken(service, addr, Some(*first)),
                );
                continue;
            }
            seen.insert(addr, line);
            // Report the global limit once, at the backend that crosses it.
            *all += 1;
            if *all == lb_common::MAX_BACKENDS as usize + 1
                && let Err(why) = rules::backend_count(*all)
            {
                self.at(&address.span(), why);
            }
            if let Some(weight) = weight {
                backends.push(BackendConfig {
                    address: addr,
                    weight,
                    line,
                });
            }
        }
        backends
    }
}

impl Checker<'_> {
    /// Validates a `[service.health]` table; `None` when anything in it is wrong.
    fn health(&mut self, raw: Spanned<RawHealth>) -> Option<HealthCheck> {
        let before = self.errors.len();
        let h = raw.into_inner();

        let http = match h.kind.as_ref().map(|k| (k, k.get_ref().as_str())) {
            None | Some((_, "tcp")) => Some(false),
            Some((_, "http")) => Some(true),
            Some((k, other)) => {
                self.at(
                    &k.span(),
                    format!("unknown health kind \"{other}\"; expected \"tcp\" or \"http\""),
                );
                None
            }
        };

        let interval = match &h.interval {
            None => Some(DEFAULT_HEALTH_INTERVAL),
            Some(i) => self.duration(i, "interval").and_then(|d| {
                if (MIN_HEALTH_INTERVAL..=MAX_HEALTH_INTERVAL).contains(&d) {
                    Some(d)
                } else {
                    self.at(
                        &i.span(),
                        format!(
                            "interval \"{}\" is out of range; expected 100ms..=1h",
                            i.get_ref()
                        ),
                    );
                    None
                }
            }),
        };
        let timeout = match &h.timeout {
            // HAProxy uses `inter` when `timeout check` is unset.
            None => interval,
            Some(t) => self.duration(t, "timeout").and_then(|d| {
                if d.is_zero() {
                    self.at(&t.span(), "timeout must be greater than zero");
                    None
                } else if let Some(interval) = interval.filter(|&i| d > i) {
                    // A check still running when the next is due would overlap it.
                    self.at(
                        &t.span(),
                        format!(
                            "timeout {d:?} is longer than the interval {interval:?}; it must be <= interval"
                        ),
                    );
                    None
                } else {
                    Some(d)
                }
            }),
        };
        let rise = self.count(h.rise.as_ref(), "rise", DEFAULT_RISE);
        let fall = self.count(h.fall.as_ref(), "fall", DEFAULT_FALL);
        let port = match &h.port {
            None => Some(None),
            Some(p) if (1..=65535).contains(p.get_ref()) => Some(Some(*p.get_ref() as u16)),
            Some(p) => {
                self.at(
                    &p.span(),
                    format!("port {} is out of range; expected 1..=65535", p.get_ref()),
                );
                None
            }
        };

        let kind = match http {
            Some(true) => Some(CheckKind::Http(self.http_check(&h))),
            Some(false) => {
                for (field, span) in [
                    ("method", h.method.as_ref().map(Spanned::span)),
                    ("path", h.path.as_ref().map(Spanned::span)),
                    ("host", h.host.as_ref().map(Spanned::span)),
                    ("status", h.status.as_ref().map(Spanned::span)),
                    ("body", h.body.as_ref().map(Spanned::span)),
                ] {
                    if let Some(span) = span {
                        self.at(
                            &span,
                            format!(
                                "`{field}` only applies to kind = \"http\"; this check is \"tcp\""
                            ),
                        );
                    }
                }
                Some(CheckKind::Tcp)
            }
            None => None,
        };

        if self.errors.len() != before {
            return None;
        }
        Some(HealthCheck {
            kind: kind?,
            interval: interval?,
            timeout: timeout?,
            rise: rise?,
            fall: fall?,
            port: port?,
        })
    }

    /// Validates the http-only fields; errors are recorded, defaults fill the gaps.
    fn http_check(&mut self, h: &RawHealth) -> HttpCheck {
        let method = match &h.method {
            None => "GET".to_string(),
            Some(m) => {
                let s = m.get_ref();
                if s.is_empty() || !s.chars().all(|c| c.is_ascii_uppercase()) {
                    self.at(
                        &m.span(),
                        format!("method \"{s}\" is not an uppercase token; expected e.g. \"GET\" or \"HEAD\""),
                    );
                }
                s.clone()
            }
        };
        let path = match &h.path {
            None => "/".to_string(),
            Some(p) => {
                let s = p.get_ref();
                if !s.starts_with('/') {
                    self.at(&p.span(), format!("path \"{s}\" must start with '/'"));
                } else if has_space_or_control(s) {
                    // It goes into the request line verbatim.
                    self.at(
                        &p.span(),
                        format!("path \"{s}\" must not contain spaces or control characters"),
                    );
                }
                s.clone()
            }
        };
        let host = h.host.as_ref().map(|v| {
            let s = v.get_ref();
            if s.is_empty() || has_space_or_control(s) {
                // It goes into a header line verbatim.
                self.at(
                    &v.span(),
                    format!("host \"{s}\" must be non-empty without spaces or control characters"),
                );
            }
            s.clone()
        });
        let status = h
            .status
            .as_ref()
            .map_or(DEFAULT_STATUS, |s| self.status(s).unwrap_or(DEFAULT_STATUS));
        HttpCheck {
            method,
            path,
            host,
            status,
            body: h.body.as_ref().map(|b| b.get_ref().clone()),
        }
    }

    /// Parses `status`: "200-399", "200", 200 or [200, 204].
    fn status(&mut self, value: &Spanned<toml::Value>) -> Option<StatusMatch> {
        let span = value.span();
        let result = match value.get_ref() {
            toml::Value::String(s) => {
                let (lo, hi) = s.split_once('-').unwrap_or((s, s));
                match (lo.trim().parse::<i64>(), hi.trim().parse::<i64>()) {
                    (Ok(lo), Ok(hi)) if !valid_status(lo) || !valid_status(hi) => Err(format!(
                        "status range \"{s}\" is out of range; codes are 100..=599"
                    )),
                    (Ok(lo), Ok(hi)) if lo > hi => Err(format!(
                        "status range \"{s}\" is backwards; expected \"low-high\""
                    )),
                    (Ok(lo), Ok(hi)) => Ok(StatusMatch::Range(lo as u16, hi as u16)),
                    _ => Err(format!(
                        "status \"{s}\" is not a range; expected e.g. \"200-399\" or a list such as [200, 204]"
                    )),
                }
            }
            toml::Value::Integer(code) => status_list(std::slice::from_ref(value.get_ref()))
                .map_err(|_| format!("status {code} is out of range; codes are 100..=599")),
            toml::Value::Array(codes) if codes.is_empty() => {
                Err("status list is empty; list at least one code".to_string())
            }
            toml::Value::Array(codes) => status_list(codes),
            other => Err(format!(
                "status must be a range string or a list of codes, not a {}",
                other.type_str()
            )),
        };
        result.map_err(|reason| self.at(&span, reason)).ok()
    }

    /// Parses a duration field such as "500ms", "2s" or "1m".
    fn duration(&mut self, value: &Spanned<String>, what: &str) -> Option<Duration> {
        let s = value.get_ref();
        let parsed = parse_duration(s);
        if parsed.is_none() {
            self.at(
                &value.span(),
                format!("{what} \"{s}\" is not a duration; {DURATION_FORM}"),
            );
        }
        parsed
    }

    /// Validates a backend weight (see [`rules::weight`]).
    fn weight(&mut self, value: &Spanned<i64>) -> Option<u32> {
        rules::weight(*value.get_ref())
            .map_err(|why| self.at(&value.span(), why))
            .ok()
    }

    /// Validates `rise` or `fall`: 1..=100, `default` when absent.
    fn count(&mut self, value: Option<&Spanned<i64>>, what: &str, default: u32) -> Option<u32> {
        let Some(v) = value else {
            return Some(default);
        };
        let n = *v.get_ref();
        if (1..=MAX_RISE_FALL).contains(&n) {
            Some(n as u32)
        } else {
            self.at(
                &v.span(),
                format!("{what} {n} is out of range; expected 1..=100"),
            );
            None
        }
    }
}

impl Checker<'_> {
    /// Validates a `[service.discovery]` or `[pool.discovery]` table; `vip`
    /// is the service's (pools have none); `None` when anything in it is wrong.
    fn discovery(
        &mut self,
        raw: Spanned<RawDiscovery>,
        vip: Option<SocketAddr>,
        forwarding: Forwarding,
    ) -> Option<Discovery> {
        let before = self.errors.len();
        let span = raw.span();
        let d = raw.into_inner();

        let name = match &d.name {
            None => {
                self.at(
                    &span,
                    "discovery has no `name`; give the DNS name to query, e.g. \"_http._tcp.web.example.org\"",
                );
                None
            }
            Some(n) => match dns_name(n.get_ref()) {
                Ok(fqdn) => Some(fqdn),
                Err(why) => {
                    self.at(&n.span(), format!("name \"{}\" {why}", n.get_ref()));
                    None
                }
            },
        };

        let record = match d.kind.as_ref().map(|k| (k, k.get_ref().as_str())) {
            None | Some((_, "srv")) => Some(RecordKind::Srv),
            Some((k, kind @ ("a" | "aaaa"))) => {
                let record = if kind == "a" {
                    RecordKind::A
                } else {
                    RecordKind::Aaaa
                };
                // NAT does not translate families: the records must be the VIP's.
                match vip {
                    Some(vip) if vip.is_ipv4() != (record == RecordKind::A) => {
                        self.at(
                            &k.span(),
                            format!(
                                "type \"{kind}\" finds {} addresses but the VIP {vip} is {}; use type = \"{}\"",
                                if record == RecordKind::A { "IPv4" } else { "IPv6" },
                                family(vip),
                                if vip.is_ipv4() { "a" } else { "aaaa" }
                            ),
                        );
                        None
                    }
                    _ => Some(record),
                }
            }
            Some((k, other)) => {
                self.at(
                    &k.span(),
                    format!(
                        "unknown discovery type \"{other}\"; expected \"srv\", \"a\" or \"aaaa\""
                    ),
                );
                None
            }
        };

        let nameservers = self.nameservers(d.nameservers.as_ref(), &span);

        let interval = match &d.interval {
            None => Some(DEFAULT_DISCOVERY_INTERVAL),
            Some(i) => self.duration(i, "interval").and_then(|v| {
                if (MIN_HEALTH_INTERVAL..=MAX_HEALTH_INTERVAL).contains(&v) {
                    Some(v)
                } else {
                    self.at(
                        &i.span(),
                        format!(
                            "interval \"{}\" is out of range; expected 100ms..=1h",
                            i.get_ref()
                        ),
                    );
                    None
                }
            }),
        };
        let timeout = match &d.timeout {
            None => interval.map(|i| i.min(DEFAULT_DISCOVERY_TIMEOUT)),
            Some(t) => self.duration(t, "timeout").and_then(|v| {
                if v.is_zero() {
                    self.at(&t.span(), "timeout must be greater than zero");
                    None
                } else if let Some(interval) = interval.filter(|&i| v > i) {
                    // A round still running when the next is due would overlap it.
                    self.at(
                        &t.span(),
                        format!(
                            "timeout {v:?} is longer than the interval {interval:?}; it must be <= interval"
                        ),
                    );
                    None
                } else {
                    Some(v)
                }
            }),
        };
        let hold = match &d.hold {
            None => Some(DEFAULT_DISCOVERY_HOLD),
            Some(h) => self.duration(h, "hold").and_then(|v| {
                if v <= MAX_HEALTH_INTERVAL {
                    Some(v)
                } else {
                    self.at(
                        &h.span(),
                        format!("hold \"{}\" is out of range; expected 0s..=1h", h.get_ref()),
                    );
                    None
                }
            }),
        };

        let (port, weight) = match record {
            Some(RecordKind::Srv) => {
                for (field, value) in [("port", &d.port), ("weight", &d.weight)] {
                    if let Some(v) = value {
                        self.at(
                            &v.span(),
                            format!("`{field}` applies to type = \"a\" or \"aaaa\"; SRV records carry their own ports and weights"),
                        );
                    }
                }
                (None, DEFAULT_WEIGHT)
            }
            Some(_) => {
                let port = match &d.port {
                    None => {
                        self.at(
                            &span,
                            "discovery of address records needs `port`, the port of every address found",
                        );
                        None
                    }
                    Some(p) if (1..=65535).contains(p.get_ref()) => {
                        let port = *p.get_ref() as u16;
                        if let Some(vip) = vip
                            && forwarding.is_dsr()
                            && port != vip.port()
                        {
                            self.at(
                                &p.span(),
                                format!(
                                    "port {port} must be the VIP's port {} with forwarding = \"{}\" (the packet reaches the backend untouched)",
                                    vip.port(),
                                    forwarding.as_str()
                                ),
                            );
                        }
                        Some(port)
                    }
                    Some(p) => {
                        self.at(
                            &p.span(),
                            format!("port {} is out of range; expected 1..=65535", p.get_ref()),
                        );
                        None
                    }
                };
                let weight = match &d.weight {
                    None => DEFAULT_WEIGHT,
                    Some(w) => self.weight(w).unwrap_or(DEFAULT_WEIGHT),
                };
                (port, weight)
            }
            None => (None, DEFAULT_WEIGHT),
        };

        if self.errors.len() != before {
            return None;
        }
        Some(Discovery {
            name: name?,
            record: record?,
            nameservers: nameservers?,
            interval: interval?,
            timeout: timeout?,
            hold: hold?,
            port,
            weight,
        })
    }

    /// Checks `nameservers`: at least one, each an address with an optional
    /// port (53 by default), no duplicates.
    fn nameservers(
        &mut self,
        raw: Option<&Spanned<Vec<Spanned<String>>>>,
        table: &Range<usize>,
    ) -> Option<Vec<SocketAddr>> {
        let Some(list) = raw else {
            // No fallback to /etc/resolv.conf: the servers asked are the ones written here.
            self.at(
                table,
                "discovery has no `nameservers`; list the DNS servers to ask, e.g. nameservers = [\"198.18.2.53\"]",
            );
            return None;
        };
        if list.get_ref().is_empty() {
            self.at(
                &list.span(),
                "`nameservers` is empty; list at least one DNS server",
            );
            return None;
        }
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        let mut out = Vec::new();
        for entry in list.get_ref() {
            let text = entry.get_ref();
            let addr = match nameserver(text) {
                Ok(a) => a,
                Err(why) => {
                    self.at(&entry.span(), format!("nameserver \"{text}\" {why}"));
                    continue;
                }
            };
            if let Some(first) = seen.get(&addr) {
                self.at(
                    &entry.span(),
                    format!("nameserver {addr} is listed twice (first on line {first})"),
                );
                continue;
            }
            seen.insert(addr, self.line(&entry.span()));
            out.push(addr);
        }
        (out.len() == list.get_ref().len()).then_some(out)
    }
}

/// Parses a nameserver: "ip", "ip:port" or "[ipv6]:port"; port 53 by default.
fn nameserver(text: &str) -> Result<SocketAddr, String> {
    let addr = match text.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => match text.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, 53),
            Err(_) => {
                return Err(
                    "is not an address; expected \"a.b.c.d\", \"a.b.c.d:port\", \"ipv6\" or \"[ipv6]:port\""
                        .into(),
                );
            }
        },
    };
    if addr.port() == 0 {
        Err("has port 0".into())
    } else if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        Err("is not a unicast address".into())
    } else {
        Ok(addr)
    }
}

/// Checks a DNS name (labels of letters, digits, '-' and '_', which SRV
/// names use) and returns it fully qualified, with the root's dot.
fn dns_name(text: &str) -> Result<String, &'static str> {
    let bare = text.strip_suffix('.').unwrap_or(text);
    if bare.is_empty() {
        return Err("is empty; give the DNS name to query");
    }
    if bare.len() > MAX_DNS_NAME {
        return Err("is longer than 253 characters, the most a DNS name holds");
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err("has an empty label (two dots in a row, or a leading dot)");
        }
        if label.len() > 63 {
            return Err("has a label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("may only contain letters, digits, '-', '_' and dots");
        }
    }
    // Relative names would be completed by a search list, which discovery never uses.
    Ok(format!("{bare}."))
}

fn valid_status(code: i64) -> bool {
    (100..=599).contains(&code)
}

/// Turns a list of TOML values into a status list, or says which element is wrong.
fn status_list(codes: &[toml::Value]) -> Result<StatusMatch, String> {
    codes
        .iter()
        .map(|c| match c {
            toml::Value::Integer(n) if valid_status(*n) => Ok(*n as u16),
            toml::Value::Integer(n) => {
                Err(format!("status {n} is out of range; codes are 100..=599"))
            }
            other => Err(format!(
                "status list holds a {}; expected integer codes such as [200, 204]",
                other.type_str()
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(StatusMatch::List)
}

/// Parses "<whole number><unit>" with unit ms, s, m or h.
fn parse_duration(s: &str) -> Option<Duration> {
    let digits = s.find(|c: char| !c.is_ascii_digit())?;
    let (number, unit) = s.split_at(digits);
    let n: u64 = number.parse().ok()?;
    let millis = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        _ => None,
    }?;
    Some(Duration::from_millis(millis))
}

/// Whether the current network namespace has an interface called `name`.
fn interface_exists(name: &str) -> bool {
    // A name with a NUL byte cannot name an interface.
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

fn has_space_or_control(s: &str) -> bool {
    s.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Maps byte offsets to 1-based line and character column.
struct LineIndex<'a> {
    text: &'a str,
    /// Byte offset where each line starts; a lookup is a binary search, not a rescan.
    starts: Vec<usize>,
}

impl<'a> LineIndex<'a> {
    fn new(text: &'a str) -> Self {
        let starts = std::iter::once(0)
            .chain(text.match_indices('\n').map(|(i, _)| i + 1))
            .collect();
        Self { text, starts }
    }

    fn locate(&self, offset: usize) -> (usize, usize) {
        let offset = offset.min(self.text.len());
        let line = self.starts.partition_point(|&s| s <= offset);
        let start = self.starts[line - 1];
        let column = self
            .text
            .get(start..offset)
            .map_or(offset - start, |s| s.chars().count());
        (line, column + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Joins lines with '\n' so a test's line numbers are its slice indices + 1.
    fn text(lines: &[&str]) -> String {
        lines.join("\n") + "\n"
    }

    fn errors(lines: &[&str]) -> Vec<ConfigError> {
        match parse(&text(lines), "lb.toml") {
            Ok(c) => panic!("expected errors, got {c:?}"),
            Err(ConfigErrors(e)) => e,
        }
    }

    /// Asserts exactly one error, on `line`, whose reason contains `needle`.
    #[track_caller]
    fn expect_one(lines: &[&str], line: usize, needle: &str) {
        let errs = errors(lines);
        assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
        assert_eq!(errs[0].line, line, "{errs:#?}");
        assert!(
            errs[0].reason.contains(needle),
            "{:?} does not contain {needle:?}",
            errs[0].reason
        );
    }

    /// A minimal valid service, lines 2..=6 after the `interfaces` line.
    const HEAD: &str = "interfaces = [\"eth0\"]";

    fn svc(extra: &[&'static str]) -> Vec<&'static str> {
        let mut v = vec![
            HEAD,
            "[[service]]",
            "name = \"web\"",
            "vip = \"198.18.100.1:80\"",
            "[[service.backend]]",
            "address = \"198.18.2.11:8080\"",
        ];
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn full_example_parses() {
        let t = text(&[
            "interfaces = [\"eth0\", \"eth1\"]",
            "xdp_mode = \"generic\"",
            "metrics = \"127.0.0.1:9100\"",
            "",
            "[[service]]",
            "name = \"web\"",
            "vip = \"198.18.100.1:80\"",
            "ring_size = 251",
            "[[service.backend]]",
            "address = \"198.18.2.11:8080\"",
            "[[service.backend]]",
            "address = \"198.18.2.12:8080\"",
            "weight = 0",
            "",
            "[[service]]",
            "name = \"dns6\"",
            "vip = \"[fd00:18:100::1]:53\"",
            "protocol = \"udp\"",
            "[[service.backend]]",
            "address = \"[fd00:18:2::11]:5353\"",
            "weight = 65535",
            "",
            "[[service]]",
            "name = \"proxy\"",
            "vip = \"198.18.100.2:443\"",
            "mode = \"l7\"",
        ]);
        let c = parse(&t, "lb.toml").unwrap();
        let expected = Config {
            interfaces: vec!["eth0".into(), "eth1".into()],
            xdp_mode: XdpModeSetting::Generic,
            metrics: Some("127.0.0.1:9100".parse().unwrap()),
            new_flow_limit: DEFAULT_NEW_FLOW_LIMIT,
            deny: Vec::new(),
            encap_source_v4: None,
            encap_source_v6: None,
            services: vec![
                Service {
                    name: "web".into(),
                    vip: "198.18.100.1:80".parse().unwrap(),
                    protocol: Protocol::Tcp,
                    mode: Mode::L4,
                    forwarding: Forwarding::Nat,
                    mss_clamp: false,
                    ring_size: 251,
                    backends: vec![
                        BackendConfig {
                            address: "198.18.2.11:8080".parse().unwrap(),
                            weight: 1,
                            line: 9,
                        },
                        BackendConfig {
                            address: "198.18.2.12:8080".parse().unwrap(),
                            weight: 0,
                            line: 11,
                        },
                    ],
                    health: None,
                    discovery: None,
                    line: 5,
                },
                Service {
                    name: "dns6".into(),
                    vip: "[fd00:18:100::1]:53".parse().unwrap(),
                    protocol: Protocol::Udp,
                    mode: Mode::L4,
                    forwarding: Forwarding::Nat,
                    mss_clamp: false,
                    ring_size: DEFAULT_RING_SIZE,
                    backends: vec![BackendConfig {
                        address: "[fd00:18:2::11]:5353".parse().unwrap(),
                        weight: 65535,
                        line: 19,
                    }],
                    health: None,
                    discovery: None,
                    line: 15,
                },
                Service {
                    name: "proxy".into(),
                    vip: "198.18.100.2:443".parse().unwrap(),
                    protocol: Protocol::Tcp,
                    mode: Mode::L7,
                    forwarding: Forwarding::Nat,
                    mss_clamp: false,
                    ring_size: DEFAULT_RING_SIZE,
                    backends: vec![],
                    health: None,
                    discovery: None,
                    line: 23,
                },
            ],
            bgp: None,
            proxy: ProxySection::default(),
        };
        assert_eq!(c, expected);
        assert_eq!(c.services[1].protocol.number(), 17);
        assert_eq!(c.services[0].protocol.number(), 6);
    }

    #[test]
    fn bgp_section() {
        let mut lines = svc(&[]);
        lines.extend([
            "[bgp]",
            "bird_socket = \"/run/bird/bird.ctl\"",
            "include_file = \"/etc/bird/lb-vips.conf\"",
        ]);
        let c = parse(&text(&lines), "lb.toml").unwrap();
        let bgp = c.bgp.unwrap();
        assert_eq!(bgp.bird_socket, std::path::Path::new("/run/bird/bird.ctl"));
        assert_eq!(bgp.protocol, DEFAULT_BGP_PROTOCOL);
        assert_eq!(bgp.line, 7);

        let mut lines = svc(&[]);
        lines.extend([
            "[bgp]",
            "bird_socket = \"bird.ctl\"",
            "include_file = \"/etc/bird/lb-vips.conf\"",
        ]);
        expect_one(&lines, 8, "must be an absolute path");
        let mut lines = svc(&[]);
        lines.extend(["[bgp]", "bird_socket = \"/run/bird.ctl\""]);
        expect_one(&lines, 7, "needs `include_file`");
        let mut lines = svc(&[]);
        lines.extend([
            "[bgp]",
            "bird_socket = \"/run/bird.ctl\"",
            "include_file = \"/etc/bird/lb.conf\"",
            "protocol = \"lb-vips\"",
        ]);
        expect_one(&lines, 10, "not a BIRD protocol name");
        let mut lines = svc(&[]);
        lines.extend(["[bgp]", "socket = \"/run/bird.ctl\""]);
        expect_one(&lines, 8, "unknown field");
    }

    #[test]
    fn doc_example_parses_with_defaults() {
        let c = parse(&text(&svc(&[])), "lb.toml").unwrap();
        assert_eq!(c.xdp_mode, XdpModeSetting::Driver);
        assert_eq!(c.metrics, None);
        assert_eq!(c.services[0].ring_size, 65537);
        assert_eq!(c.services[0].backends[0].weight, 1);
    }

    #[test]
    fn new_flow_limit_and_deny_list() {
        let c = parse(&text(&svc(&[])), "lb.toml").unwrap();
        assert_eq!(c.new_flow_limit, DEFAULT_NEW_FLOW_LIMIT);
        assert!(c.deny.is_empty());
        let mut lines = svc(&[]);
        lines.insert(1, "new_flow_limit = 0");
        lines.insert(
            2,
            "deny = [\"203.0.113.0/24\", \"2001:db8::/32\", \"198.51.100.7\"]",
        );
        let c = parse(&text(&lines), "lb.toml").unwrap();
        assert_eq!(c.new_flow_limit, 0);
        let shown: Vec<String> = c.deny.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7/32"]
        );

        let mut lines = svc(&[]);
        lines.insert(1, "new_flow_limit = -1");
        expect_one(&lines, 2, "new_flow_limit -1 is out of range");
        for (entry, needle) in [
            (
                "\"203.0.113.5/24\"",
                "host bits are set; the network is 203.0.113.0/24",
            ),
            (
                "\"203.0.113.0/33\"",
                "prefix length \"33\" is not a number 0..=32",
            ),
            ("\"2001:db8::/129\"", "0..=128"),
            (
                "\"example.org/24\"",
                "\"example.org\" is not an IPv4 or IPv6 address",
            ),
            (
                "\"10.0.0.0/8\", \"10.0.0.0/8\"",
                "is listed twice (first on line 2)",
            ),
        ] {
            let line = format!("deny = [{entry}]");
            let mut lines = svc(&[]);
            lines.insert(1, Box::leak(line.into_boxed_str()));
            expect_one(&lines, 2, needle);
        }
    }

    #[test]
    fn display_is_file_line_column_reason() {
        let errs = parse(&text(&["interfaces = [\"a/b\"]"]), "lb.toml").unwrap_err();
        let s = errs.to_string();
        // Whole-file errors (line 0) sort first and leave out the position.
        assert!(s.starts_with("lb.toml: no services"), "{s}");
        assert!(s.contains("\nlb.toml:1:15: interface name \"a/b\""), "{s}");
    }

    #[test]
    fn load_missing_file() {
        let errs = load(Path::new("/nonexistent/lb.toml")).unwrap_err();
        assert_eq!(errs.0.len(), 1);
        assert_eq!(errs.0[0].line, 0);
        assert!(
            errs.to_string()
                .starts_with("/nonexistent/lb.toml: cannot read")
        );
    }

    #[test]
    fn interfaces_missing() {
        let mut lines = svc(&[]);
        lines[0] = "";
        expect_one(&lines, 0, "missing `interfaces`");
    }

    #[test]
    fn interfaces_empty() {
        let mut lines = svc(&[]);
        lines[0] = "interfaces = []";
        expect_one(&lines, 1, "is empty");
    }

    #[test]
    fn interface_names() {
        for (list, needle) in [
            ("interfaces = [\"\"]", "name is empty"),
            ("interfaces = [\"abcdefghijklmnop\"]", "at most 15"),
            ("interfaces = [\"a b\"]", "whitespace"),
            ("interfaces = [\"a/b\"]", "'/'"),
            (
                "interfaces = [\"eth0\", \"eth0\"]",
                "listed twice (first on line 1)",
            ),
        ] {
            let mut lines = svc(&[]);
            lines[0] = list;
            expect_one(&lines, 1, needle);
        }
        // 15 bytes is fine.
        let mut lines = svc(&[]);
        lines[0] = "interfaces = [\"abcdefghijklmno\"]";
        assert!(parse(&text(&lines), "f").is_ok());
    }

    #[test]
    fn a_missing_interface_is_reported_at_its_position_when_checking_this_host() {
        let mut lines = svc(&[]);
        lines[0] = "interfaces = [\"lo\", \"lbnosuch0\"]";
        let t = text(&lines);
        // The file alone is fine; on this host the second name is not.
        assert!(parse(&t, "lb.toml").is_ok());
        let errs = parse_for_this_host(&t, "lb.toml").unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!((errs.0[0].line, errs.0[0].column), (1, 21));
        assert!(
            errs.to_string()
                .starts_with("lb.toml:1:21: interface \"lbnosuch0\" does not exist"),
            "{errs}"
        );
        lines[0] = "interfaces = [\"lo\"]";
        assert!(parse_for_this_host(&text(&lines), "lb.toml").is_ok());
    }

    #[test]
    fn interfaces_on_several_lines() {
        let mut lines = svc(&[]);
        lines[0] = "interfaces = [\n  \"eth0\",\n  \"eth0\",\n]";
        let errs = parse(&text(&lines), "f").unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!((errs[0].line, errs[0].column), (3, 3));
    }

    #[test]
    fn bad_xdp_mode() {
        let mut lines = svc(&[]);
        lines.insert(1, "xdp_mode = \"native\"");
        expect_one(&lines, 2, "unknown xdp_mode \"native\"");
    }

    #[test]
    fn bad_metrics() {
        let mut lines = svc(&[]);
        lines.insert(1, "metrics = \"localhost:9100\"");
        expect_one(
            &lines,
            2,
            "metrics \"localhost:9100\" is not a socket address",
        );
    }

    #[test]
    fn no_services() {
        expect_one(&[HEAD], 0, "no services");
    }

    #[test]
    fn service_name_rules() {
        let mut lines = svc(&[]);
        lines[2] = "name = \"\"";
        expect_one(&lines, 3, "service name is empty");

        let mut lines = svc(&[]);
        lines[2] = "name = \"web site\"";
        expect_one(&lines, 3, "may only contain");

        let mut lines = svc(&[]);
        lines.remove(2);
        expect_one(&lines, 2, "has no `name`");

        let lines = svc(&[
            "[[service]]",
            "name = \"web\"",
            "vip = \"198.18.100.2:80\"",
            "[[service.backend]]",
            "address = \"198.18.2.11:8080\"",
        ]);
        expect_one(&lines, 8, "\"web\" is already used (line 3)");
    }

    #[test]
    fn vip_rules() {
        for (vip, needle) in [
            (
                "vip = \"198.18.100.1\"",
                "has no port; expected \"a.b.c.d:port\"",
            ),
            ("vip = \"fd00::1:80\"", "has no port (IPv6 needs brackets)"),
            (
                "vip = \"198.18.100.1:http\"",
                "is not a socket address; expected",
            ),
            ("vip = \"web:80\"", "[ipv6]:port"),
            ("vip = \"198.18.100.1:0\"", "port 0"),
            ("vip = \"0.0.0.0:80\"", "unspecified"),
            ("vip = \"[::]:80\"", "unspecified"),
            ("vip = \"224.0.0.1:80\"", "multicast"),
            ("vip = \"[ff02::1]:80\"", "multicast"),
        ] {
            let mut lines = svc(&[]);
            lines[3] = vip;
            expect_one(&lines, 4, needle);
        }
        let mut lines = svc(&[]);
        lines.remove(3);
        expect_one(&lines, 2, "has no `vip`");
    }

    #[test]
    fn duplicate_vip() {
        let dup = svc(&[
            "[[service]]",
            "name = \"web2\"",
            "vip = \"198.18.100.1:80\"",
            "[[service.backend]]",
            "address = \"198.18.2.11:8080\"",
        ]);
        expect_one(&dup, 9, "already used by service \"web\" (line 2)");
        // The same address and port with another protocol is a different VIP.
        let mut other = dup.clone();
        other.insert(9, "protocol = \"udp\"");
        assert!(parse(&text(&other), "f").is_ok());
    }

    #[test]
    fn bad_protocol_and_mode() {
        let mut lines = svc(&[]);
        lines.insert(4, "protocol = \"sctp\"");
        expect_one(&lines, 5, "unknown protocol \"sctp\"");
        let mut lines = svc(&[]);
        lines.insert(4, "mode = \"l3\"");
        expect_one(&lines, 5, "unknown mode \"l3\"");
    }

    #[test]
    fn forwarding_modes_and_their_rules() {
        // Line numbers: 1 HEAD, 2 [[service]], 3 name, 4 vip, 5 inserted,
        // 6 [[service.backend]], 7 address.
        let dsr = |mode: &'static str, port: &'static str| {
            let mut lines = svc(&[]);
            lines.insert(4, mode);
            lines[6] = port;
            lines
        };
        let ok = parse(
            &text(&dsr(
                "forwarding = \"ipip\"",
                "address = \"198.18.2.11:80\"",
            )),
            "t.toml",
        )
        .expect("ipip with the VIP's port");
        assert_eq!(ok.services[0].forwarding, Forwarding::Ipip);
        assert!(!ok.services[0].mss_clamp);
        let ok = parse(&text(&svc(&[])), "t.toml").expect("default");
        assert_eq!(ok.services[0].forwarding, Forwarding::Nat);
        expect_one(
            &dsr("forwarding = \"l2\"", "address = \"198.18.2.11:8080\""),
            7,
            "must use the VIP's port 80 with forwarding = \"l2\"",
        );
        expect_one(
            &dsr("forwarding = \"dsr\"", "address = \"198.18.2.11:80\""),
            5,
            "unknown forwarding \"dsr\"; expected \"nat\", \"ipip\" or \"l2\"",
        );
        let mut lines = dsr("forwarding = \"l2\"", "address = \"198.18.2.11:80\"");
        lines.insert(5, "mss_clamp = true");
        expect_one(&lines, 6, "mss_clamp applies to forwarding = \"ipip\" only");
        let mut lines = svc(&[]);
        lines.insert(4, "mode = \"l7\"");
        lines.insert(5, "forwarding = \"ipip\"");
        expect_one(&lines, 6, "`forwarding` applies to l4 services only");
    }

    #[test]
    fn encap_sources_are_checked_by_family_and_length() {
        let with = |line: &'static str| {
            let mut lines = svc(&[]);
            lines.insert(1, line);
            lines
        };
        let ok = parse(&text(&with("encap_source_v4 = \"10.1.0.0/24\"")), "t.toml").expect("v4");
        assert_eq!(ok.encap_source_v4.map(|p| p.len), Some(24));
        let ok = parse(&text(&with("encap_source_v6 = \"fd00::1\"")), "t.toml").expect("v6");
        assert_eq!(ok.encap_source_v6.map(|p| p.len), Some(128));
        expect_one(
            &with("encap_source_v4 = \"fd00::1\""),
            2,
            "expected an IPv4 address",
        );
        expect_one(
            &with("encap_source_v6 = \"10.0.0.1\""),
            2,
            "expected an IPv6 address",
        );
        expect_one(
            &with("encap_source_v6 = \"fd00::/64\""),
            2,
            "use a /96 or longer",
        );
        expect_one(
            &with("encap_source_v4 = \"10.1.0.1/24\""),
            2,
            "host bits are set",
        );
    }

    #[test]
    fn ring_size_rules() {
        for (ring, needle) in [
            ("ring_size = 1", "too small"),
            ("ring_size = -7", "too small"),
            ("ring_size = 65539", "too large"),
            (
                "ring_size = 1000",
                "not a prime; Maglev needs a prime table size (e.g. 997)",
            ),
        ] {
            let mut lines = svc(&[]);
            lines.insert(4, ring);
            expect_one(&lines, 5, needle);
        }
        let mut lines = svc(&[]);
        lines.insert(4, "ring_size = 2");
        assert_eq!(parse(&text(&lines), "f").unwrap().services[0].ring_size, 2);
    }

    #[test]
    fn l4_and_l7_services_may_have_no_backend() {
        // Backends may come later from `lb add backend` (see `rules`).
        let lines = &svc(&[])[..4];
        let c = parse(&text(lines), "f").unwrap();
        assert!(c.services[0].backends.is_empty());
        let mut l7 = lines.to_vec();
        l7.push("mode = \"l7\"");
        assert!(parse(&text(&l7), "f").is_ok());
    }

    #[test]
    fn backend_address_rules() {
        for (addr, needle) in [
            ("address = \"198.18.2.11\"", "has no port"),
            ("address = \"198.18.2.11:0\"", "port 0"),
            ("address = \"0.0.0.0:80\"", "unspecified"),
            ("address = \"239.1.1.1:80\"", "multicast"),
            (
                "address = \"[fd00::11]:80\"",
                "NAT does not translate between address families",
            ),
        ] {
            let mut lines = svc(&[]);
            lines[5] = addr;
            expect_one(&lines, 6, needle);
        }
        let mut lines = svc(&[]);
        lines.remove(5);
        expect_one(&lines, 5, "backend has no `address`");
    }

    #[test]
    fn duplicate_backend() {
        let lines = svc(&["[[service.backend]]", "address = \"198.18.2.11:8080\""]);
        expect_one(
            &lines,
            8,
            "listed twice in service \"web\" (first on line 5)",
        );
    }

    #[test]
    fn weight_rules() {
        for (w, ok) in [
            ("weight = 0", true),
            ("weight = 65535", true),
            ("weight = 65536", false),
            ("weight = -1", false),
        ] {
            let lines = svc(&[w]);
            if ok {
                assert!(parse(&text(&lines), "f").is_ok(), "{w}");
            } else {
                expect_one(&lines, 7, "out of range; expected 0..=65535");
            }
        }
    }

    #[test]
    fn more_active_backends_than_ring_slots() {
        let lines = svc(&[
            "[[service.backend]]",
            "address = \"198.18.2.12:8080\"",
            "[[service.backend]]",
            "address = \"198.18.2.13:8080\"",
            "[[service.backend]]",
            "address = \"198.18.2.14:8080\"",
            "weight = 0",
        ]);
        let mut small = lines.clone();
        small.insert(4, "ring_size = 2");
        expect_one(&small, 5, "3 backends with weight > 0 but ring_size is 2");
        let mut fits = lines;
        fits.insert(4, "ring_size = 3");
        assert!(parse(&text(&fits), "f").is_ok());
    }

    #[test]
    fn too_many_services() {
        let mut t = format!("{HEAD}\n");
        for i in 0..=MAX_VIPS {
            t += &format!(
                "[[service]]\nname = \"s{i}\"\nvip = \"10.1.{}.{}:80\"\n[[service.backend]]\naddress = \"10.2.0.1:80\"\n",
                i / 256,
                i % 256
            );
        }
        let errs = parse(&t, "f").unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].line, 2 + 5 * MAX_VIPS as usize);
        assert!(errs[0].reason.contains("at most 512 (MAX_VIPS)"));
    }

    #[test]
    fn too_many_backends() {
        let mut t = format!("{HEAD}\n");
        for s in 0..2 {
            // Inline tables, one per line: thousands of [[service.backend]] headers parse slowly.
            t += &format!("[[service]]\nname = \"s{s}\"\nvip = \"10.1.0.{s}:80\"\nbackend = [\n");
            // Service 1 repeats one of service 0's addresses: the data plane
            // gives each (service, backend) pair a slot, so it is one too many.
            let n = if s == 0 { lb_common::MAX_BACKENDS } else { 1 };
            for i in 0..n {
                t += &format!("{{ address = \"10.2.{}.{}:80\" }},\n", i / 256, i % 256);
            }
            t += "]\n";
        }
        let errs = parse(&t, "f").unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        // The closing bracket is the last line; the crossing backend is just above it.
        assert_eq!(errs[0].line, t.lines().count() - 1);
        assert!(errs[0].reason.contains("at most 4096 (MAX_BACKENDS)"));
    }

    #[test]
    fn reports_every_mistake() {
        let lines = [
            "interfaces = [\"eth0\"]",
            "xdp_mode = \"fast\"",
            "[[service]]",
            "name = \"web\"",
            "vip = \"198.18.100.1:80\"",
            "ring_size = 100",
            "[[service.backend]]",
            "address = \"[fd00::1]:80\"",
        ];
        let errs = errors(&lines);
        let got: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(got, [2, 6, 8], "{errs:#?}");
        assert!(errs[0].reason.contains("xdp_mode"));
        assert!(errs[1].reason.contains("not a prime"));
        assert!(errs[2].reason.contains("address families"));
    }

    #[test]
    fn syntax_error_has_line() {
        let mut lines = svc(&[]);
        lines[3] = "vip = \"198.18.100.1:80";
        let errs = errors(&lines);
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 4, "{errs:?}");
        assert!(!errs[0].reason.contains('\n'));
    }

    #[test]
    fn wrong_type_has_line() {
        let mut lines = svc(&[]);
        lines.push("weight = \"heavy\"");
        expect_one(&lines, 7, "invalid type");
    }

    /// The minimal service plus a `[service.health]` table on line 7, its fields from line 8.
    fn with_health(fields: &[&'static str]) -> Vec<&'static str> {
        let mut lines = svc(&["[service.health]"]);
        lines.extend_from_slice(fields);
        lines
    }

    fn health_of(fields: &[&'static str]) -> HealthCheck {
        let c = parse(&text(&with_health(fields)), "f").unwrap();
        c.services[0].health.clone().unwrap()
    }

    #[test]
    fn health_defaults() {
        assert_eq!(
            parse(&text(&svc(&[])), "f").unwrap().services[0].health,
            None
        );
        assert_eq!(
            health_of(&[]),
            HealthCheck {
                kind: CheckKind::Tcp,
                interval: Duration::from_secs(2),
                timeout: Duration::from_secs(2),
                rise: 2,
                fall: 3,
                port: None,
            }
        );
        let h = health_of(&["kind = \"http\"", "interval = \"500ms\""]);
        assert_eq!(
            h.timeout,
            Duration::from_millis(500),
            "timeout defaults to the interval"
        );
        assert_eq!(
            h.kind,
            CheckKind::Http(HttpCheck {
                method: "GET".into(),
                path: "/".into(),
                host: None,
                status: StatusMatch::Range(200, 399),
                body: None,
            })
        );
    }

    #[test]
    fn health_full_http() {
        let h = health_of(&[
            "kind = \"http\"",
            "interval = \"1m\"",
            "timeout = \"1s\"",
            "rise = 1",
            "fall = 100",
            "method = \"HEAD\"",
            "path = \"/health?full=1\"",
            "host = \"example.org\"",
            "status = [200, 204]",
            "body = \"ok\"",
        ]);
        assert_eq!(
            h,
            HealthCheck {
                kind: CheckKind::Http(HttpCheck {
                    method: "HEAD".into(),
                    path: "/health?full=1".into(),
                    host: Some("example.org".into()),
                    status: StatusMatch::List(vec![200, 204]),
                    body: Some("ok".into()),
                }),
                interval: Duration::from_secs(60),
                timeout: Duration::from_secs(1),
                rise: 1,
                fall: 100,
                port: None,
            }
        );
    }

    #[test]
    fn health_inline_table() {
        let lines = svc(&[]);
        let mut lines = lines[..4].to_vec();
        lines.push("health = { kind = \"tcp\", rise = 0 }");
        lines.push("[[service.backend]]");
        lines.push("address = \"198.18.2.11:8080\"");
        expect_one(&lines, 5, "rise 0 is out of range");
    }

    #[test]
    fn health_status_forms() {
        for (status, expected) in [
            ("status = \"200-299\"", StatusMatch::Range(200, 299)),
            ("status = \"204\"", StatusMatch::Range(204, 204)),
            ("status = 204", StatusMatch::List(vec![204])),
            ("status = [200, 301]", StatusMatch::List(vec![200, 301])),
        ] {
            let fields = ["kind = \"http\"", status];
            match health_of(&fields).kind {
                CheckKind::Http(h) => assert_eq!(h.status, expected, "{status}"),
                CheckKind::Tcp => panic!("not http"),
            }
        }
    }

    #[test]
    fn status_matches() {
        let range = StatusMatch::Range(200, 399);
        assert!(range.matches(200) && range.matches(399) && range.matches(302));
        assert!(!range.matches(199) && !range.matches(400) && !range.matches(503));
        let list = StatusMatch::List(vec![200, 204]);
        assert!(list.matches(204) && !list.matches(201));
    }

    #[test]
    fn health_kind_rules() {
        expect_one(
            &with_health(&["kind = \"icmp\""]),
            8,
            "unknown health kind \"icmp\"; expected \"tcp\" or \"http\"",
        );
    }

    #[test]
    fn health_duration_rules() {
        for (field, needle) in [
            ("interval = \"2\"", "interval \"2\" is not a duration"),
            ("interval = \"2 s\"", "is not a duration"),
            ("interval = \"1.5s\"", "is not a duration"),
            ("interval = \"s\"", "is not a duration"),
            ("interval = \"2d\"", "is not a duration"),
            ("interval = \"99999999999999999999ms\"", "is not a duration"),
            ("interval = \"99ms\"", "out of range; expected 100ms..=1h"),
            ("interval = \"61m\"", "out of range; expected 100ms..=1h"),
            ("timeout = \"soon\"", "timeout \"soon\" is not a duration"),
            ("timeout = \"0ms\"", "greater than zero"),
            (
                "timeout = \"3s\"",
                "longer than the interval 2s; it must be <= interval",
            ),
        ] {
            expect_one(&with_health(&[field]), 8, needle);
        }
        let h = health_of(&["interval = \"1h\"", "timeout = \"100ms\""]);
        assert_eq!(h.interval, Duration::from_secs(3600));
        assert_eq!(h.timeout, Duration::from_millis(100));
        assert_eq!(
            health_of(&["interval = \"100ms\""]).interval,
            Duration::from_millis(100)
        );
        // Equal to the interval is allowed.
        health_of(&["interval = \"1s\"", "timeout = \"1000ms\""]);
        // The comparison uses the given interval, on the timeout's line.
        expect_one(
            &with_health(&["interval = \"500ms\"", "timeout = \"1s\""]),
            9,
            "longer than the interval 500ms",
        );
        expect_one(&with_health(&["interval = 2"]), 8, "invalid type");
    }

    #[test]
    fn udp_health_checks_need_a_tcp_port() {
        let base = "interfaces = [\"eth0\"]\n[[service]]\nname = \"dns\"\nvip = \"198.18.100.1:53\"\nprotocol = \"udp\"\n[[service.backend]]\naddress = \"198.18.2.11:53\"\n[service.health]\nkind = \"tcp\"\n";
        let errs = parse(base, "t.toml").unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].line, 8);
        assert!(errs.0[0].reason.contains("need `port`"), "{errs}");
        let ok = parse(&format!("{base}port = 8080\n"), "t.toml").unwrap();
        assert_eq!(ok.services[0].health.as_ref().unwrap().port, Some(8080));
        let errs = parse(&format!("{base}port = 70000\n"), "t.toml").unwrap_err();
        assert!(errs.0[0].reason.contains("out of range"), "{errs}");
    }

    #[test]
    fn health_rise_fall_rules() {
        for (field, needle) in [
            ("rise = 0", "rise 0 is out of range; expected 1..=100"),
            ("rise = 101", "rise 101 is out of range"),
            ("fall = 0", "fall 0 is out of range"),
            ("fall = -3", "fall -3 is out of range"),
        ] {
            expect_one(&with_health(&[field]), 8, needle);
        }
    }

    #[test]
    fn health_http_fields_need_http() {
        for field in [
            "method = \"GET\"",
            "path = \"/\"",
            "host = \"a\"",
            "status = 200",
            "body = \"ok\"",
        ] {
            expect_one(&with_health(&[field]), 8, "only applies to kind = \"http\"");
            let mut explicit = vec!["kind = \"tcp\""];
            explicit.push(field);
            expect_one(
                &with_health(&explicit),
                9,
                "only applies to kind = \"http\"",
            );
        }
    }

    #[test]
    fn health_http_field_rules() {
        for (field, needle) in [
            (
                "method = \"get\"",
                "method \"get\" is not an uppercase token",
            ),
            ("method = \"\"", "is not an uppercase token"),
            ("method = \"GET /\"", "is not an uppercase token"),
            ("path = \"health\"", "path \"health\" must start with '/'"),
            ("path = \"\"", "must start with '/'"),
            ("path = \"/a b\"", "must not contain spaces"),
            ("host = \"a\\r\\nX: y\"", "control characters"),
            ("host = \"\"", "must be non-empty"),
            ("status = \"99-200\"", "out of range; codes are 100..=599"),
            ("status = \"200-600\"", "out of range; codes are 100..=599"),
            ("status = \"399-200\"", "is backwards"),
            ("status = \"2xx\"", "is not a range"),
            ("status = \"200-\"", "is not a range"),
            ("status = 600", "status 600 is out of range"),
            ("status = [200, 99]", "status 99 is out of range"),
            ("status = [\"200\"]", "status list holds a string"),
            ("status = []", "status list is empty"),
            ("status = true", "not a boolean"),
        ] {
            expect_one(&with_health(&["kind = \"http\"", field]), 9, needle);
        }
    }

    #[test]
    fn health_reports_every_mistake() {
        let errs = errors(&with_health(&[
            "kind = \"http\"",
            "interval = \"10ms\"",
            "rise = 0",
            "path = \"x\"",
            "status = \"500-400\"",
        ]));
        let got: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(got, [9, 10, 11, 12], "{errs:#?}");
    }

    #[test]
    fn health_unknown_field() {
        expect_one(
            &with_health(&["intervall = \"2s\""]),
            8,
            "unknown field `intervall`",
        );
    }

    #[test]
    fn unknown_field_has_line() {
        let mut lines = svc(&[]);
        lines[5] = "adress = \"198.18.2.11:8080\"";
        expect_one(&lines, 6, "unknown field `adress`");
        let mut lines = svc(&[]);
        lines.insert(1, "interface = [\"eth1\"]");
        expect_one(&lines, 2, "unknown field `interface`");
    }

    /// A service with only a `[service.discovery]` table (lines 5.. are its keys).
    fn discovering(fields: &[&'static str]) -> Vec<&'static str> {
        let mut v = vec![
            HEAD,
            "[[service]]",
            "name = \"web\"",
            "vip = \"198.18.100.1:80\"",
            "[service.discovery]",
        ];
        v.extend_from_slice(fields);
        v
    }

    fn discovery_of(fields: &[&'static str]) -> Discovery {
        parse(&text(&discovering(fields)), "lb.toml")
            .unwrap()
            .services
            .remove(0)
            .discovery
            .expect("a discovery")
    }

    const NS: &str = "nameservers = [\"198.18.2.241\"]";

    #[test]
    fn discovery_defaults_and_full_form() {
        let d = discovery_of(&["name = \"_http._tcp.web.lab.test\"", NS]);
        assert_eq!(
            d,
            Discovery {
                name: "_http._tcp.web.lab.test.".into(),
                record: RecordKind::Srv,
                nameservers: vec!["198.18.2.241:53".parse().unwrap()],
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                hold: Duration::from_secs(30),
                port: None,
                weight: 1,
            }
        );
        let d = discovery_of(&[
            "name = \"web.lab.test.\"",
            "type = \"a\"",
            "nameservers = [\"198.18.2.241:5353\", \"[fd00:18:2::241]:53\", \"fd00::53\"]",
            "interval = \"500ms\"",
            "hold = \"0s\"",
            "port = 8080",
            "weight = 3",
        ]);
        assert_eq!(d.name, "web.lab.test.");
        assert_eq!(d.record, RecordKind::A);
        assert_eq!(d.nameservers.len(), 3);
        assert_eq!(d.nameservers[2], "[fd00::53]:53".parse().unwrap());
        // The timeout defaults to the interval when that is shorter than 2s.
        assert_eq!(
            (d.interval, d.timeout, d.hold),
            (
                Duration::from_millis(500),
                Duration::from_millis(500),
                Duration::ZERO
            )
        );
        assert_eq!((d.port, d.weight), (Some(8080), 3));
    }

    #[test]
    fn a_service_with_discovery_needs_no_static_backend_and_may_have_some() {
        let c = parse(
            &text(&discovering(&["name = \"_http._tcp.web.lab.test\"", NS])),
            "lb.toml",
        )
        .unwrap();
        assert!(c.services[0].backends.is_empty());
        let mut lines = svc(&[]);
        lines.extend(["[service.discovery]", "name = \"web.lab.test\"", NS]);
        let c = parse(&text(&lines), "lb.toml").unwrap();
        assert_eq!(c.services[0].backends.len(), 1);
        assert!(c.services[0].discovery.is_some());
    }

    #[test]
    fn discovery_rules_with_their_lines() {
        let name = "name = \"_http._tcp.web.lab.test\"";
        expect_one(&discovering(&[NS]), 5, "has no `name`");
        expect_one(&discovering(&[name]), 5, "has no `nameservers`");
        expect_one(
            &discovering(&[name, "nameservers = []"]),
            7,
            "`nameservers` is empty",
        );
        for (bad, why) in [
            ("name = \"\"", "is empty"),
            ("name = \"a..b\"", "empty label"),
            ("name = \"web lab\"", "may only contain"),
            ("name = \"_http._tcp.web/lab\"", "may only contain"),
        ] {
            expect_one(&discovering(&[bad, NS]), 6, why);
        }
        let long = format!("name = \"{}.test\"", "a".repeat(64));
        let lines: Vec<&str> = discovering(&[NS])
            .into_iter()
            .chain([long.as_str()])
            .collect();
        expect_one(&lines, 7, "longer than 63");
        for (bad, why) in [
            ("nameservers = [\"dns.example\"]", "is not an address"),
            ("nameservers = [\"0.0.0.0\"]", "not a unicast"),
            ("nameservers = [\"198.18.2.241:0\"]", "port 0"),
            (
                "nameservers = [\"198.18.2.241\", \"198.18.2.241:53\"]",
                "listed twice",
            ),
        ] {
            expect_one(&discovering(&[name, bad]), 7, why);
        }
        for (bad, why) in [
            ("type = \"txt\"", "unknown discovery type"),
            (
                "type = \"aaaa\"",
                "the VIP 198.18.100.1:80 is IPv4; use type = \"a\"",
            ),
            ("interval = \"50ms\"", "out of range"),
            ("interval = \"soon\"", "not a duration"),
            ("timeout = \"0s\"", "greater than zero"),
            ("timeout = \"10s\"", "longer than the interval"),
            ("hold = \"2h\"", "out of range"),
            ("port = 80", "SRV records carry their own"),
            ("weight = 2", "SRV records carry their own"),
            ("ttl = 3", "unknown field `ttl`"),
        ] {
            expect_one(&discovering(&[name, NS, bad]), 8, why);
        }
        let a = "type = \"a\"";
        expect_one(&discovering(&[name, NS, a]), 5, "needs `port`");
        expect_one(
            &discovering(&[name, NS, a, "port = 70000"]),
            9,
            "out of range",
        );
        expect_one(
            &discovering(&[name, NS, a, "port = 80", "weight = -1"]),
            10,
            "out of range",
        );
    }

    #[test]
    fn dsr_discovery_of_addresses_must_use_the_vip_port() {
        let mut lines =
            discovering(&["name = \"web.lab.test\"", NS, "type = \"a\"", "port = 8080"]);
        lines.insert(4, "forwarding = \"ipip\"");
        expect_one(&lines, 10, "must be the VIP's port 80");
        lines[9] = "port = 80";
        assert!(parse(&text(&lines), "lb.toml").is_ok());
    }

    #[test]
    fn an_l4_service_without_backends_or_discovery_waits_for_the_cli() {
        let lines = [
            HEAD,
            "[[service]]",
            "name = \"web\"",
            "vip = \"198.18.100.1:80\"",
        ];
        let c = parse(&text(&lines), "lb.toml").unwrap();
        assert!(c.services[0].backends.is_empty() && c.services[0].discovery.is_none());
    }

    #[test]
    fn pools_have_discovery_too() {
        let t = text(&[
            HEAD,
            "[[frontend]]",
            "name = \"web\"",
            "binds = [\"198.18.100.1:80\"]",
            "default_pool = \"app\"",
            "[[pool]]",
            "name = \"app\"",
            "[pool.discovery]",
            "name = \"_http._tcp.app.lab.test\"",
            "nameservers = [\"198.18.2.241\"]",
            "interval = \"1s\"",
        ]);
        let c = parse(&t, "lb.toml").unwrap();
        assert_eq!(c.proxy.2.len(), 1);
        assert_eq!(c.proxy.2[0].0, "app");
        assert_eq!(c.proxy.2[0].1.interval, Duration::from_secs(1));
        let bad = t.replace("interval = \"1s\"", "interval = \"1 s\"");
        let errs = parse(&bad, "lb.toml").unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].line, 11);
        assert!(errs[0].reason.contains("not a duration"), "{errs:?}");
    }
}
