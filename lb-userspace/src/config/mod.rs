//! Agent configuration: the TOML file, read and validated.
//!
//! Every key, with its default and a comment, is in
//! `lb-userspace/lb.example.toml`; a unit test parses it and fails when a
//! key the code accepts is missing there.
//!
//! # Layout
//!
//! - `raw`: what serde reads, each value with its byte span; the file is
//!   parsed once.
//! - `settings`, `services`, `health`, `discovery`, `bgp`, `l7`: one concern
//!   each, turning raw values into this module's model and recording every
//!   mistake at its `file:line:column` (all of them, not the first).
//! - `rules`: the L4 rules shared with runtime changes (`crate::runtime`).
//!
//! The L7 proxy's tables are typed by the proxy's own model
//! (`lb_proxy`), one table at a time, so that its errors too come all at
//! once, each at its key.

use std::net::SocketAddr;
use std::ops::Range;
use std::path::Path;
use std::time::Duration;

use lb_common::{PROTO_TCP, PROTO_UDP};
use toml::Spanned;

use lb_proxy::duration;

mod admin;
mod bgp;
mod discovery;
mod health;
mod l7;
mod listeners;
mod raw;
pub mod rules;
mod services;
mod settings;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests;

pub use admin::{AdminToken, MIN_TOKEN_LEN, read_token};
pub use listeners::{host_addresses, local_addresses};
use raw::RawConfig;

/// Service-name prefix that addresses an L7 pool (`lb drain pool:web ADDR`).
const POOL_PREFIX: &str = "pool:";

/// What a backend group name in the control protocol, the journal, admin
/// states and health targets refers to: an L4 service by its name, or an L7
/// pool as `pool:NAME`. The one place that knows the convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group<'a> {
    /// An L4/L7 service of `[[service]]`.
    Service(&'a str),
    /// A `[[pool]]` of the L7 proxy.
    Pool(&'a str),
}

impl<'a> Group<'a> {
    /// Reads a group name as the CLI and the protocol spell it.
    pub fn parse(name: &'a str) -> Self {
        match name.strip_prefix(POOL_PREFIX) {
            Some(pool) => Group::Pool(pool),
            None => Group::Service(name),
        }
    }

    /// The group name of L7 pool `pool`.
    pub fn pool_name(pool: &str) -> String {
        format!("{POOL_PREFIX}{pool}")
    }
}

/// Weight of a backend that does not set one.
const DEFAULT_WEIGHT: u32 = 1;
/// Hint appended to every address error.
const ADDR_FORM: &str = "expected \"a.b.c.d:port\" or \"[ipv6]:port\"";
/// New flows per second a client prefix (/24, /64) may open when the file
/// does not say: far above one client's needs (the lab's benchmark opens
/// under 5 000 connections per second from one address) and a large NAT's,
/// yet one prefix alone cannot take the whole new-flow path.
pub const DEFAULT_NEW_FLOW_LIMIT: u32 = 10_000;
/// Largest `new_flow_limit`.
const MAX_NEW_FLOW_LIMIT: i64 = 100_000_000;

/// The spellings of `xdp_mode`, the default first.
const XDP_MODES: &[(&str, XdpModeSetting)] = &[
    ("driver", XdpModeSetting::Driver),
    ("generic", XdpModeSetting::Generic),
    ("auto", XdpModeSetting::Auto),
];

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
    pub deny: Vec<IpPrefix>,
    /// Outer IPv4 source of `ipip` packets (an address or a prefix whose
    /// host bits come from the flow); `None`: an address of the interfaces.
    pub encap_source_v4: Option<IpPrefix>,
    /// Outer IPv6 source of `ipip` packets, as `encap_source_v4` (at least a /96).
    pub encap_source_v6: Option<IpPrefix>,
    /// Load-balanced services, in file order.
    pub services: Vec<Service>,
    /// How VIPs are announced by BGP through BIRD (`[bgp]`), if at all.
    pub bgp: Option<BgpConfig>,
    /// The L7 proxy's `[[frontend]]` and `[[pool]]` tables.
    pub proxy: ProxySection,
    /// The admin listener (`[admin]`), off when absent.
    pub admin: Option<AdminConfig>,
    /// Where the access log goes instead of standard output (`[proxy] syslog`).
    pub syslog: Option<SyslogConfig>,
}

/// `[proxy] syslog`: the access log sent to a syslog daemon, as HAProxy's
/// `log` (one datagram per line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SyslogConfig {
    /// Where the datagrams go.
    pub target: SyslogTarget,
    /// The facility's number (`local0` is 16).
    pub facility: u8,
    /// The header before each line (`syslog_format`).
    pub format: SyslogFormat,
}

/// The syslog header format, as HAProxy's `log ... format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum SyslogFormat {
    /// `<PRI>Mmm dd hh:mm:ss lb[PID]: ` (BSD syslog, the default).
    #[default]
    Rfc3164,
    /// `<PRI>1 TIMESTAMP HOSTNAME lb PID - - ` (structured syslog).
    Rfc5424,
}

/// A syslog daemon's address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SyslogTarget {
    /// UDP, `ip:port` (or `udp@ip:port`).
    Udp(SocketAddr),
    /// TCP, `tcp@ip:port`: octet-counted frames (RFC 6587), as HAProxy's `log tcp@`.
    Tcp(SocketAddr),
    /// A Unix datagram socket, an absolute path (`/dev/log`).
    Unix(std::path::PathBuf),
}

/// `[admin]`: where the REST API and the stats page listen, and who may use them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    /// Listening address (keep it on a management network or loopback).
    pub bind: SocketAddr,
    /// Basic auth against this `[[userlist]]` (SHA-512 crypt hashes).
    pub userlist: Option<String>,
    /// Bearer auth with the token in this file (read at load and reload).
    pub token_file: Option<std::path::PathBuf>,
    /// The token `token_file` held when the file was loaded (None when
    /// only its text was checked, without the host's files).
    pub token: Option<AdminToken>,
    /// Line of the `[admin]` header.
    pub line: usize,
}

/// The L7 proxy's part of the file (see `lb_proxy`), already validated,
/// with the health checks of its pools (pool name, check), their DNS
/// discoveries (pool name, discovery) and its serving threads (`[proxy]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ProxySection(
    pub lb_proxy::ProxyConfig,
    pub Vec<(String, HealthCheck)>,
    pub Vec<(String, Discovery)>,
    pub lb_proxy::Threads,
);

/// A network, host bits zero: a `deny` entry, or an outer source `lb decap --from` accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpPrefix {
    /// The network address.
    pub addr: std::net::IpAddr,
    /// Prefix length in bits (32 or 128 for a single address).
    pub len: u8,
}

impl IpPrefix {
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

impl IpPrefix {
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

impl std::fmt::Display for IpPrefix {
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
    /// What a new flow's backend is picked by (`l4` only).
    pub hash: FlowHash,
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
    /// The same while the last result disagrees with the state, on the way
    /// up or down (HAProxy's `fastinter`; default: `interval`).
    pub fast_interval: Duration,
    /// The same while the backend is down (HAProxy's `downinter`; default: `interval`).
    pub down_interval: Duration,
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

/// What picks a new flow's backend in an L4 service's Maglev table (`hash = ...`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FlowHash {
    /// The whole 5-tuple: a client's flows spread over the backends.
    #[default]
    Flow,
    /// The 5-tuple without the client's port: every flow of a client goes
    /// to one backend while the table does not change (HAProxy's `balance
    /// source`, Katran's `F_HASH_NO_SRC_PORT`).
    Source,
}

impl FlowHash {
    /// Parses the config and CLI spelling.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "flow" => Ok(FlowHash::Flow),
            "source" => Ok(FlowHash::Source),
            other => Err(format!(
                "unknown hash \"{other}\"; expected \"flow\" or \"source\""
            )),
        }
    }

    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            FlowHash::Flow => "flow",
            FlowHash::Source => "source",
        }
    }
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

/// Reads and validates the configuration file at `path`, and what its proxy
/// tables need of this host: the files they name, the addresses they bind
/// (a missing certificate is refused at its line, before anything applies).
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

/// Largest configuration file read (thousands of services fit in far less).
const MAX_CONFIG_FILE: u64 = 16 << 20;

fn load_with(path: &Path, host: Host) -> Result<Config, ConfigErrors> {
    let file = path.display().to_string();
    match lb_proxy::config_file::read_to_string(path, MAX_CONFIG_FILE) {
        Ok(text) => parse_with(&text, &file, host, true),
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
    parse_with(text, file, Host::Any, false)
}

/// Like [`parse`], and every interface must exist in this network namespace.
pub fn parse_for_this_host(text: &str, file: &str) -> Result<Config, ConfigErrors> {
    parse_with(text, file, Host::This, false)
}

/// `host_resources`: also read the files the proxy's tables name
/// (certificates, keys, CAs, error pages) and try their binds, as a start
/// would; off for text that is no file here (tests).
fn parse_with(
    text: &str,
    file: &str,
    host: Host,
    host_resources: bool,
) -> Result<Config, ConfigErrors> {
    let mut checker = Checker {
        file,
        lines: LineIndex::new(text),
        errors: Vec::new(),
        host,
        host_resources,
        listeners: Vec::new(),
        backend_spans: std::collections::HashMap::new(),
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
    let service_tables = raw.service.as_ref().map_or(0, Vec::len);
    let frontend_tables = raw.frontend.as_ref().map_or(0, Vec::len);
    let config = checker.config(raw);
    if service_tables == 0 && frontend_tables == 0 {
        checker.whole("nothing to serve: add [[service]] tables (L4 through XDP, with `interfaces`) or [[frontend]] and [[pool]] tables (the L7 proxy, which runs alone without `interfaces`)");
    }
    if checker.errors.is_empty() {
        Ok(config)
    } else {
        // Sorted by position so the output reads top to bottom like the file.
        checker.errors.sort_by_key(|e| (e.line, e.column));
        Err(ConfigErrors(checker.errors))
    }
}

/// Collects errors while turning raw values into the model.
struct Checker<'a> {
    file: &'a str,
    lines: LineIndex<'a>,
    errors: Vec<ConfigError>,
    host: Host,
    /// Read the files the proxy's tables name, try their binds (see `parse_with`).
    host_resources: bool,
    /// Addresses listened on, checked together at the end (`listeners`).
    listeners: Vec<listeners::Listener>,
    /// Where each backend (by group, `pool:NAME` for pool servers) and
    /// address is written, for the checks across tables at the end.
    backend_spans: std::collections::HashMap<(String, SocketAddr), Range<usize>>,
}

impl Checker<'_> {
    /// Records an error at the start of byte range `span`.
    pub(super) fn at(&mut self, span: &Range<usize>, reason: impl Into<String>) {
        let (line, column) = self.lines.locate(span.start);
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line,
            column,
            reason: reason.into(),
        });
    }

    /// Records an error about the file as a whole.
    pub(super) fn whole(&mut self, reason: impl Into<String>) {
        self.errors.push(ConfigError {
            file: self.file.to_string(),
            line: 0,
            column: 0,
            reason: reason.into(),
        });
    }

    pub(super) fn line(&self, span: &Range<usize>) -> usize {
        self.lines.locate(span.start).0
    }

    fn config(&mut self, raw: RawConfig) -> Config {
        let has_services = raw.service.as_ref().is_some_and(|s| !s.is_empty());
        let interfaces = self.interfaces(raw.interfaces, has_services);
        let xdp_mode = self
            .choice(raw.xdp_mode.as_ref(), "xdp_mode", XDP_MODES)
            .unwrap_or_default();
        let services = self.services(raw.service.unwrap_or_default());
        let bgp = raw.bgp.and_then(|b| self.bgp(b));
        let mut proxy = self.proxy_section(
            raw.frontend.unwrap_or_default(),
            raw.pool.unwrap_or_default(),
            raw.userlist.unwrap_or_default(),
        );
        let metrics = raw.metrics.and_then(|m| match m.get_ref().parse() {
            Ok(addr) => {
                self.listening(listeners::Listener {
                    addr,
                    span: m.span(),
                    owner: listeners::METRICS.into(),
                    try_bind: true,
                });
                Some(addr)
            }
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
        let admin = raw.admin.and_then(|a| self.admin(a, &proxy.0.userlists));
        self.check_listeners(&services);
        let own: Vec<SocketAddr> = metrics
            .into_iter()
            .chain(admin.as_ref().map(|a| a.bind))
            .collect();
        self.check_loops(&services, &proxy.0, &own);
        let syslog = raw.proxy.as_ref().and_then(|p| self.syslog(p.get_ref()));
        proxy.3 = self.threads(raw.proxy);
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
            proxy,
            admin,
            syslog,
        }
    }

    /// Reads one of `options` (spelling, value; the default first), the
    /// default when absent.
    pub(super) fn choice<T: Copy>(
        &mut self,
        raw: Option<&Spanned<String>>,
        what: &str,
        options: &[(&str, T)],
    ) -> Option<T> {
        let Some(raw) = raw else {
            return options.first().map(|(_, v)| *v);
        };
        let text = raw.get_ref();
        if let Some((_, v)) = options.iter().find(|(s, _)| s == text) {
            return Some(*v);
        }
        let quoted: Vec<String> = options.iter().map(|(s, _)| format!("\"{s}\"")).collect();
        let expected = match quoted.split_last() {
            Some((last, [])) => last.clone(),
            Some((last, rest)) => format!("{} or {last}", rest.join(", ")),
            None => String::new(),
        };
        self.at(
            &raw.span(),
            format!("unknown {what} \"{text}\"; expected {expected}"),
        );
        None
    }

    /// Parses a duration field such as "500ms", "2s" or "1m".
    pub(super) fn duration(&mut self, value: &Spanned<String>, what: &str) -> Option<Duration> {
        let s = value.get_ref();
        // The proxy's parser: one duration syntax for the whole file.
        let parsed = duration::parse(s);
        if parsed.is_none() {
            self.at(
                &value.span(),
                format!("{what} \"{s}\" is not a duration; {}", duration::FORM),
            );
        }
        parsed
    }

    /// Validates a backend weight (see [`rules::weight`]).
    pub(super) fn weight(&mut self, value: &Spanned<i64>) -> Option<u32> {
        rules::weight(*value.get_ref())
            .map_err(|why| self.at(&value.span(), why))
            .ok()
    }
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
