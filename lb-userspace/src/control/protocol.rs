//! The control protocol between `lb` subcommands and the running agent.
//!
//! Frames on the Unix socket are a 4-byte big-endian length followed by that
//! many bytes of bincode: an `Envelope<Request>` from the client, answered by
//! one `Envelope<Response>`. The version lets an agent refuse a client it does
//! not understand instead of misreading it.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use crate::config::{FlowHash, Forwarding, Mode, Protocol};

/// Version of this protocol; bumped on any incompatible change.
pub const PROTOCOL_VERSION: u32 = 6;
/// Largest request frame the agent accepts (requests are small).
pub const MAX_FRAME: u32 = 1 << 20;
/// Largest answer frame: listings of thousands of backends and pool
/// servers (`lb show proxy` is about 560 bytes per pool server).
pub const MAX_ANSWER_FRAME: u32 = 64 << 20;
/// Default path of the agent's control socket.
pub const DEFAULT_SOCKET: &str = "/run/lb/lb.sock";

/// A versioned message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope<T> {
    /// `PROTOCOL_VERSION` of the sender.
    pub version: u32,
    /// The message.
    pub body: T,
}

/// What an operator can ask the agent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Request {
    /// Adds a service (no backends yet).
    AddService {
        /// Unique name.
        name: String,
        /// VIP address and port.
        vip: SocketAddr,
        /// TCP or UDP.
        protocol: Protocol,
        /// L4 (XDP) or L7 (passed to the stack).
        mode: Mode,
        /// How an L4 service's packets reach its backends.
        forwarding: Forwarding,
        /// What picks an L4 service's backend for a new flow (journals of
        /// versions without it replay as `flow`).
        #[serde(default)]
        hash: FlowHash,
        /// Maglev table size (a prime); default when `None`.
        ring_size: Option<u32>,
    },
    /// Removes a service and its backends.
    RemoveService {
        /// Service name.
        name: String,
    },
    /// Adds a backend to a service.
    AddBackend {
        /// Service name.
        service: String,
        /// Backend address and port.
        address: SocketAddr,
        /// Weight (0 = drain).
        weight: u32,
    },
    /// Removes a backend from a service.
    RemoveBackend {
        /// Service name.
        service: String,
        /// Backend address and port.
        address: SocketAddr,
    },
    /// Sets a backend's administrative state.
    SetBackendState {
        /// Service name.
        service: String,
        /// Backend address and port.
        address: SocketAddr,
        /// `Ready` (enable), `Drain` or `Maint` (disable).
        state: AdminState,
    },
    /// Sets a backend's weight.
    SetWeight {
        /// Service name.
        service: String,
        /// Backend address and port.
        address: SocketAddr,
        /// New weight, 0..=65535 (0 = drain).
        weight: u32,
    },
    /// Lists services.
    ShowServices,
    /// Lists backends, of one service or of all.
    ShowBackends {
        /// Only this service, if given.
        service: Option<String>,
    },
    /// Data-plane counters by decision.
    ShowStats,
    /// State of every DNS discovery (services and pools).
    ShowDiscovery,
    /// Re-reads the configuration file and applies the difference.
    Reload,
    /// Withdraws every VIP of this node from BGP; forwarding goes on.
    DrainNode,
    /// Announces this node's VIPs again after `DrainNode`.
    UndrainNode,
    /// BGP announcement state and BIRD's protocols.
    ShowBgp,
    /// The L7 proxy's frontends, pools and servers with their request counters.
    ShowProxy,
    /// Stops the agent. Without `detach` the XDP program keeps forwarding with
    /// the last tables (a new agent adopts them); with it, everything is removed.
    Stop {
        /// Detach the program and remove its pinned state too.
        detach: bool,
    },
    /// Closes the open `tcp` sessions and tunnels of an L7 pool server
    /// (HAProxy's `shutdown sessions server`); changes no state.
    ShutdownSessions {
        /// `pool:NAME`.
        service: String,
        /// The server's address.
        address: SocketAddr,
    },
    /// Stops the agent softly (HAProxy's soft stop, as SIGUSR1): as `Stop`
    /// without `detach`, but the L7 proxy closes its listeners at once and
    /// lets its connections end (idle ones closed, requests in flight
    /// answered) within `hard_stop_after` before the process exits; its
    /// control socket, pins and addresses are free for a new agent
    /// meanwhile. (Last, so that an agent older than it refuses only it.)
    SoftStop,
}

/// Administrative state of a backend, set by the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum AdminState {
    /// Takes new flows (when healthy and weight > 0).
    #[default]
    Ready,
    /// No new flows; established flows keep going.
    Drain,
    /// Out entirely: established flows are re-hashed elsewhere.
    Maint,
}

impl AdminState {
    /// Its name, as `lb`, the stats page, the metrics and serde spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            AdminState::Ready => "ready",
            AdminState::Drain => "drain",
            AdminState::Maint => "maint",
        }
    }
}

impl std::fmt::Display for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Result of health checking a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    /// No checks configured, or none finished yet.
    #[default]
    Unchecked,
    /// Passing.
    Up,
    /// Failed `fall` times in a row.
    Down,
}

impl Health {
    /// Its name, as `lb`, the stats page, the metrics and serde spell it.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Unchecked => "unchecked",
            Health::Up => "up",
            Health::Down => "down",
        }
    }
}

impl std::fmt::Display for Health {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The agent's answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Response {
    /// Done; nothing to report.
    Ok,
    /// Refused or failed; nothing was changed.
    Error(String),
    /// Answer to `ShowServices`.
    Services(Vec<ServiceInfo>),
    /// Answer to `ShowBackends`.
    Backends(Vec<BackendInfo>),
    /// Answer to `ShowStats`.
    Stats(Vec<ReasonCount>),
    /// Answer to `ShowBgp`.
    Bgp(BgpInfo),
    /// Answer to `ShowDiscovery`.
    Discovery(Vec<DiscoveryInfo>),
    /// Answer to `ShowProxy`.
    Proxy(ProxyInfo),
}

/// `ShowProxy`: the L7 proxy's live figures (empty when no proxy runs).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ProxyInfo {
    /// Frontends, in configuration order.
    pub frontends: Vec<lb_proxy::FrontendStats>,
    /// Pools and their servers, in configuration order.
    pub pools: Vec<lb_proxy::PoolStats>,
}

/// `lb show bgp`: what this node announces and how BIRD is doing.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BgpInfo {
    /// Whether the configuration has a `[bgp]` section.
    pub enabled: bool,
    /// Whether the node is drained (`lb drain-node`).
    pub drained: bool,
    /// BIRD's control socket, if `[bgp]` is set.
    pub bird_socket: Option<String>,
    /// The include file the agent writes, if `[bgp]` is set.
    pub include_file: Option<String>,
    /// Every VIP address and whether it is announced.
    pub vips: Vec<crate::bgp::VipAnnouncement>,
    /// What BIRD last accepted, and the last error.
    pub speaker: crate::bgp::SpeakerStatus,
    /// BIRD's protocols (sessions) now.
    pub protocols: Vec<crate::bgp::bird::Protocol>,
    /// Why `protocols` could not be read, if it could not.
    pub bird_error: Option<String>,
}

/// One service as `lb show services` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ServiceInfo {
    /// Name.
    pub name: String,
    /// VIP address and port.
    pub vip: SocketAddr,
    /// TCP or UDP.
    pub protocol: Protocol,
    /// L4 or L7.
    pub mode: Mode,
    /// NAT or a DSR mode (L4 only).
    pub forwarding: Forwarding,
    /// What picks a new flow's backend (L4 only).
    pub hash: FlowHash,
    /// Number of backends.
    pub backends: usize,
    /// Client packets forwarded.
    pub packets: u64,
    /// Client bytes forwarded.
    pub bytes: u64,
    /// Its DNS discovery, if it has one.
    pub discovery: Option<DiscoveryInfo>,
}

/// Where a DNS discovery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum DiscoveryState {
    /// No answer yet.
    #[default]
    Pending,
    /// The last round answered; its backends are in force.
    Ok,
    /// The name has no records; the last good backends stay until `hold` ends.
    Holding,
    /// The last round failed (timeout, SERVFAIL, ...); the last good backends stay.
    Failing,
}

/// One DNS discovery as `lb show discovery` (and `lb show services`) shows it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiscoveryInfo {
    /// The service, or `pool:NAME`.
    pub group: String,
    /// The name queried.
    pub name: String,
    /// `srv`, `a` or `aaaa`.
    pub record: String,
    /// Where it stands.
    pub state: DiscoveryState,
    /// Discovered backends in force.
    pub backends: usize,
    /// Failed rounds in a row.
    pub failures: u32,
    /// The last failure, even if a later round answered.
    pub last_error: Option<String>,
    /// Milliseconds since the last answer (records or an empty one).
    pub since_success_ms: Option<u64>,
    /// While holding: why, and until when.
    pub detail: Option<String>,
}

/// One backend as `lb show backends` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BackendInfo {
    /// Service it belongs to.
    pub service: String,
    /// Address and port.
    pub address: SocketAddr,
    /// Weight.
    pub weight: u32,
    /// Administrative state.
    pub admin: AdminState,
    /// Health-check result.
    pub health: Health,
    /// Outcome of the last check (e.g. "ok", "refused", "timeout", "status 503").
    pub last_check: Option<String>,
    /// Connections currently pinned to it in the flow table (L7 pool
    /// servers: requests in flight).
    pub active_flows: u64,
    /// L7 pool servers: `maxconn`, requests in flight at most; 0 = no limit.
    pub max_flows: u64,
    /// Client packets forwarded to it.
    pub packets: u64,
    /// Client bytes forwarded to it.
    pub bytes: u64,
}

/// One decision counter as `lb show stats` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReasonCount {
    /// Reason name (`lb_common::Reason::name`).
    pub reason: String,
    /// Packets.
    pub packets: u64,
    /// Bytes.
    pub bytes: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn state_names_are_those_serde_uses() {
        for a in [AdminState::Ready, AdminState::Drain, AdminState::Maint] {
            assert_eq!(serde_json::to_value(a).unwrap(), a.as_str());
            assert_eq!(a.to_string(), a.as_str());
        }
        for h in [Health::Unchecked, Health::Up, Health::Down] {
            assert_eq!(serde_json::to_value(h).unwrap(), h.as_str());
            assert_eq!(h.to_string(), h.as_str());
        }
    }
}
