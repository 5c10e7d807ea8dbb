//! Namespace lab: a client, the balancer, an L2 switch and N backends wired
//! with veth pairs in their own network namespaces. The demo, the end-to-end
//! tests and the benchmarks all build their topology with this one helper.
//!
//! ```text
//!  cli                 lb                       sw                    be{i}
//!  c0 ───────────── lbc      lbb ──────────── up ─ br0 ─ p{i} ────────── eth0
//!  198.18.1.2       198.18.1.1  198.18.2.1            (bridge)           198.18.2.{10+i}
//!  fd00:18:1::2     fd00:18:1::1 fd00:18:2::1                            fd00:18:2::{10+i}
//! ```
//!
//! Addresses come from the RFC 2544 benchmarking range (198.18.0.0/15) and
//! the ULA prefix fd00:18::/32, so nothing can leak to a real network. The VIPs
//! are on no interface: the client reaches them through its default route and
//! only the XDP program on `lb` answers for them. Kernel forwarding in `lb` is
//! on (bpf_fib_lookup refuses to work without it) but an nftables rule drops
//! and counts everything the kernel would forward, so a packet the XDP
//! program did not handle shows up in [`Lab::kernel_forwarded_packets`].
//!
//! ## The DSR return path (`LabOptions::with_dsr`)
//!
//! For direct server return the switch is also a router with a link of its
//! own to the client, and backends answer the client straight through it:
//!
//! ```text
//!  cli                 lb                       sw                    be{i}
//!  c0 ───────────── lbc      lbb ──────────── up ─ br0 ─ p{i} ────────── eth0
//!                                                  198.18.2.2            VIPs on lo
//!                                                  fd00:18:2::2
//!  c1 ─────────────────────────────────────── swc   (forwarding on)
//!  198.18.3.2                                 198.18.3.1
//!  fd00:18:3::2                               fd00:18:3::1
//! ```
//!
//! - `sw` routes the client's prefixes (198.18.1.0/24, fd00:18:1::/64) over
//!   `swc` and the VIP prefixes (198.18.100.0/24, fd00:18:100::/64) to the
//!   balancer's `lbb` address, so an ICMP "fragmentation needed" / "packet too
//!   big" it sends to a VIP reaches the balancer. Its ICMP rate limits are off.
//! - Backends hold [`VIP_V4`]/32 and [`VIP_V6`]/128 on `lo`, never answer ARP
//!   for them (`arp_ignore=1`, `arp_announce=2`), and route the client's
//!   prefixes via `sw` ([`ReturnPath::Switch`]) or, switchable at run time
//!   with [`Lab::set_return_path`], via the balancer as in the default lab
//!   ([`ReturnPath::Balancer`], what NAT needs). Their servers also serve the
//!   VIP ports ([`services::VIP_TCP_PORT`] on the wildcard, UDP bound to
//!   VIP:[`services::VIP_UDP_PORT`] so answers leave from the VIP).
//! - The client still sends to the VIPs through `c0` and accepts answers from
//!   them on `c1` (`rp_filter` is off in the client, `sw` and the backends).
//!   [`Lab::vip_reply_paths`] counts which way answers from a VIP came.
//! - [`LabOptions::with_client_path_mtu`] lowers the MTU of the `sw`-`c1`
//!   link, so backends' 1500-byte answers make `sw` send "fragmentation
//!   needed" / "packet too big" to the VIP.
//!
//! ## A cluster of balancers (`LabOptions::with_cluster`)
//!
//! A DSR lab where `sw` is the ECMP router in front of several balancer
//! nodes, each running BIRD and announcing the VIPs to it over BGP:
//!
//! ```text
//!  cli              sw: router, AS 65000            nodes, AS 65001                  be{i}
//!  c1 ────────── swc 198.18.3.1                 ┌─ up ──── lbb  lb  (node 1) 198.18.2.1
//!  198.18.3.2       br0 198.18.2.2 ─ bridge ────┼─ up2 ─── lbb  lb2 (node 2) 198.18.2.3
//!  (VIPs via sw)    BIRD; VIP routes are        ├─ up{n} (nodes 3..)  BIRD, `lb run` on lbb
//!                   kernel multipath routes     └─ p{i} ──────────────────────────────── eth0
//!  c0 ────────── lbc (node 1's; unused in a cluster)              VIPs on lo, lb decap
//! ```
//!
//! - The client sends to the VIPs through `c1` and `sw` (from its `c0`
//!   address); `sw` has no static VIP route: BIRD learns one per VIP from
//!   each node that announces it and installs one multipath kernel route,
//!   spread by the L4 hash (`fib_multipath_hash_policy=1`).
//! - Node 1 is the `lb` namespace; nodes 2.. (`lb2`, ...) have only `lbb`
//!   on the bridge (198.18.2.{n+1}, [`cluster::node_v4`]), with the guard,
//!   forwarding, permanent neighbour entries for every backend, a default
//!   route via `sw`, and the pass program on their bridge port. The agent
//!   attaches to `lbb` alone ([`Lab::agent_interfaces`]): a node takes the
//!   client's packet there and sends it on, encapsulated, out of the same
//!   interface; backends answer through `sw` ([`ReturnPath::Switch`]).
//! - Every node has its own directory with `bird.conf`, BIRD's socket and
//!   log, and the VIP include file ([`Lab::node_vips_include`]) that
//!   [`Lab::announce`] writes; its agent takes [`Lab::node_socket`] and
//!   [`Lab::node_pin_dir`] (`lb run --netns`, [`Lab::spawn_node_agent`]).
//! - BFD (100 ms × 3) on every session, hold time 3 s: a node taken away
//!   ([`Lab::disconnect_node`]) leaves the router's route in about 0.3 s.
//!   `create` returns once every BGP and BFD session is up. Details in
//!   [`cluster`].

//! ## Extra hosts (`Lab::add_host`)
//!
//! A service the balancer itself talks to (a DNS server for discovery, a
//! router, ...) gets a namespace of its own, `host{n}`, either on the
//! backends' segment (a port of `br0`, 198.18.2.{240+n}, fd00:18:2::24n)
//! or on a link of its own to the balancer (`h{n}` there, 198.18.{20+n}.0/24
//! and fd00:18:2n::/64, the balancer `.1`/`::1`, the host `.2`/`::2`).
//! Like every namespace of the lab it is removed on drop, with the
//! processes started in it.

pub mod backend_server;
pub mod client;
pub mod cluster;
mod netns;
pub mod services;
pub mod testrun;

use std::collections::HashMap;
use std::ffi::OsString;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub use cluster::{BfdSession, LabNode};
pub use netns::{command as ns_command, list_ns, run_in_ns, sweep_stale};

use backend_server::BackendArgs;

/// Client address on `c0`.
pub const CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 2);
/// Client IPv6 address on `c0`.
pub const CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x1, 0, 0, 0, 0, 0x2);
/// Client MAC on `c0`.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0x18, 0x01, 0x00, 0x00, 0x02];
/// Balancer address on its client-side interface `lbc` (the client's gateway).
pub const BALANCER_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 1);
/// Balancer IPv6 address on `lbc`.
pub const BALANCER_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x1, 0, 0, 0, 0, 0x1);
/// Balancer MAC on `lbc`.
pub const BALANCER_CLIENT_MAC: [u8; 6] = [0x02, 0x18, 0x01, 0x00, 0x00, 0x01];
/// Balancer address on its backend-side interface `lbb` (the backends' gateway).
pub const BALANCER_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// Balancer IPv6 address on `lbb`.
pub const BALANCER_BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x2, 0, 0, 0, 0, 0x1);
/// Balancer MAC on `lbb`.
pub const BALANCER_BACKEND_MAC: [u8; 6] = [0x02, 0x18, 0x02, 0x00, 0x00, 0x01];
/// IPv4 VIP (assigned to no interface).
pub const VIP_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 1);
/// IPv6 VIP (assigned to no interface).
pub const VIP_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x100, 0, 0, 0, 0, 0x1);
/// TCP port the backend servers listen on.
pub const TCP_PORT: u16 = 8080;
/// UDP port the backend servers listen on.
pub const UDP_PORT: u16 = 5353;
/// DSR labs: the switch's address on its bridge (the backends' way back to the client).
pub const SWITCH_BACKEND_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 2);
/// DSR labs: the switch's IPv6 address on its bridge.
pub const SWITCH_BACKEND_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x2, 0, 0, 0, 0, 0x2);
/// DSR labs: the MAC of the switch's bridge `br0`.
pub const SWITCH_BACKEND_MAC: [u8; 6] = [0x02, 0x18, 0x02, 0x00, 0x00, 0x02];
/// DSR labs: the switch's address on `swc`, its link to the client.
pub const SWITCH_CLIENT_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 1);
/// DSR labs: the switch's IPv6 address on `swc`.
pub const SWITCH_CLIENT_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x3, 0, 0, 0, 0, 0x1);
/// DSR labs: the MAC of `swc`.
pub const SWITCH_CLIENT_MAC: [u8; 6] = [0x02, 0x18, 0x03, 0x00, 0x00, 0x01];
/// DSR labs: the client's address on `c1`, where backends' direct answers arrive.
pub const CLIENT_RETURN_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 3, 2);
/// DSR labs: the client's IPv6 address on `c1`.
pub const CLIENT_RETURN_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x3, 0, 0, 0, 0, 0x2);
/// DSR labs: the MAC of `c1`.
pub const CLIENT_RETURN_MAC: [u8; 6] = [0x02, 0x18, 0x03, 0x00, 0x00, 0x02];
/// The client's IPv4 prefix (on `c0`), as routes name it.
pub const CLIENT_PREFIX_V4: &str = "198.18.1.0/24";
/// The client's IPv6 prefix (on `c0`).
pub const CLIENT_PREFIX_V6: &str = "fd00:18:1::/64";
/// The prefix the IPv4 VIPs come from.
pub const VIP_PREFIX_V4: &str = "198.18.100.0/24";
/// The prefix the IPv6 VIPs come from.
pub const VIP_PREFIX_V6: &str = "fd00:18:100::/64";
/// Lowest MTU `LabOptions::client_path_mtu` may set (IPv6's minimum).
pub const MIN_CLIENT_PATH_MTU: u32 = 1280;
/// Most backends a lab holds (their host part `10 + i` must stay a valid address).
pub const MAX_BACKENDS: usize = 200;
/// How long `create`/`add_backend`/`start_backend_server` wait for a server to answer.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Sysctls of the namespaces that open many short connections (client,
/// balancer nodes): the whole port range, and TIME_WAIT ports reused, as on
/// any load-generating host; otherwise a few seconds of new connections
/// exhaust the ~28k default ports for a minute.
const CHURN_SYSCTLS: [(&str, &str); 2] = [
    ("net.ipv4.ip_local_port_range", "1024 65535"),
    ("net.ipv4.tcp_tw_reuse", "1"),
];
/// Forwarding on in a balancer namespace: `bpf_fib_lookup` refuses to work without it.
const FORWARDING_SYSCTLS: [(&str, &str); 3] = [
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv6.conf.all.forwarding", "1"),
    ("net.ipv6.conf.default.forwarding", "1"),
];
/// Most hosts [`Lab::add_host`] adds (their addresses `240 + n` and `20 + n` stay in range).
pub const MAX_HOSTS: usize = 9;

/// Name of the nftables table in `lb` that blocks kernel forwarding.
const GUARD_TABLE: &str = "lbguard";
/// Name of the nftables counter of packets the kernel tried to forward.
const GUARD_COUNTER: &str = "kernel_forwarded";
/// DSR labs: the nftables table (client and balancer) counting answers from the VIPs.
const PATHS_TABLE: &str = "lbpaths";

/// Host part `10 + i` of backend `i` (1-based); panics past [`MAX_BACKENDS`].
fn backend_host(i: usize) -> u8 {
    assert!(
        (1..=MAX_BACKENDS).contains(&i),
        "backend index {i} out of 1..={MAX_BACKENDS}"
    );
    u8::try_from(10 + i).unwrap_or(u8::MAX)
}

/// IPv4 address of backend `i` (1-based): 198.18.2.{10+i}.
pub fn backend_v4(i: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, backend_host(i))
}

/// The lab's IPv6 address on the backend segment whose last group reads as
/// the decimal `host` (`fd00:18:2::11` beside 198.18.2.11).
fn segment_v6(host: u8) -> Ipv6Addr {
    // The decimal digits are reused as hex digits so the text reads like the v4 host part.
    let group = host
        .to_string()
        .bytes()
        .fold(0u16, |acc, d| acc * 16 + u16::from(d - b'0'));
    Ipv6Addr::new(0xfd00, 0x18, 0x2, 0, 0, 0, 0, group)
}

/// IPv6 address of backend `i` (1-based): `fd00:18:2::` followed by the decimal digits of 10+i.
pub fn backend_v6(i: usize) -> Ipv6Addr {
    segment_v6(backend_host(i))
}

/// MAC address of backend `i` (1-based): 02:18:02:00:00:{10+i in hex}.
pub fn backend_mac(i: usize) -> [u8; 6] {
    [0x02, 0x18, 0x02, 0x00, 0x00, backend_host(i)]
}

/// Formats a MAC address the way `ip` expects it.
fn mac_str(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// The `ip` command making `addr` a permanent neighbour at `mac` on `dev`, so
/// neither the kernel nor `bpf_fib_lookup` ever waits for ARP/ND.
fn neigh(addr: impl std::fmt::Display, mac: [u8; 6], dev: &str) -> String {
    format!(
        "neigh replace {addr} lladdr {} dev {dev} nud permanent",
        mac_str(mac)
    )
}

/// `ip` commands that give the balancer's `lbc` and `lbb` (already created,
/// with their MACs) their addresses and a permanent neighbour entry for the
/// client, so `bpf_fib_lookup` finds the next hop without waiting for ARP/ND.
pub(crate) fn balancer_side_commands() -> Vec<String> {
    vec![
        "link set lo up".into(),
        format!("addr add {BALANCER_CLIENT_V4}/24 dev lbc"),
        format!("addr add {BALANCER_CLIENT_V6}/64 dev lbc nodad"),
        format!("addr add {BALANCER_BACKEND_V4}/24 dev lbb"),
        format!("addr add {BALANCER_BACKEND_V6}/64 dev lbb nodad"),
        "link set lbc up".into(),
        "link set lbb up".into(),
        neigh(CLIENT_V4, CLIENT_MAC, "lbc"),
        neigh(CLIENT_V6, CLIENT_MAC, "lbc"),
    ]
}

/// `ip` commands for the balancer's permanent neighbour entries of backend `i`.
pub(crate) fn backend_neighbour_commands(i: usize) -> [String; 2] {
    [
        neigh(backend_v4(i), backend_mac(i), "lbb"),
        neigh(backend_v6(i), backend_mac(i), "lbb"),
    ]
}

/// Paths and sizes a lab is built from.
#[derive(Clone, Debug)]
pub struct LabOptions {
    /// Number of backends created up front.
    pub backends: usize,
    /// The `lb` binary, used to run backend servers (`lb lab-backend ...`).
    pub lb_bin: PathBuf,
    /// The `lab-xdp` eBPF object holding the pass-only program for veth peers.
    pub lab_bpf_object: PathBuf,
    /// Build the DSR return path (see the module doc); off by default.
    pub dsr: bool,
    /// DSR labs: the MTU of the `sw`-`c1` link (default: 1500, unchanged).
    pub client_path_mtu: Option<u32>,
    /// Balancer nodes behind an ECMP router speaking BGP (see the module
    /// doc); 0, the default, for the single balancer of the other labs.
    pub cluster_nodes: usize,
}

/// Which way backends route their answers to the client's prefixes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReturnPath {
    /// Via the balancer's `lbb` address (the default lab; what NAT needs).
    Balancer,
    /// Via the switch's bridge address and its own link to the client (DSR).
    Switch,
}

impl ReturnPath {
    /// The backends' next hop to the client's prefixes.
    pub fn gateways(self) -> (Ipv4Addr, Ipv6Addr) {
        match self {
            ReturnPath::Balancer => (BALANCER_BACKEND_V4, BALANCER_BACKEND_V6),
            ReturnPath::Switch => (SWITCH_BACKEND_V4, SWITCH_BACKEND_V6),
        }
    }
}

/// Packets from a VIP address counted on their way in (DSR labs only).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipReplyPaths {
    /// Arrived at the client on `c0`, from the balancer.
    pub via_balancer: u64,
    /// Arrived at the client on `c1`, from the switch (direct server return).
    pub via_switch: u64,
    /// Reached the balancer's kernel on `lbb` (what its XDP program passed up,
    /// or everything when none is attached).
    pub balancer_lbb: u64,
}

impl LabOptions {
    /// Reads `LB_BIN` (default: this executable if it is named `lb`) and `LB_LAB_BPF_OBJECT`.
    pub fn from_env(backends: usize) -> Result<Self> {
        const HINT: &str = "run via `cargo xtask test`, which builds the binaries and sets it";
        let lb_bin = match std::env::var_os("LB_BIN") {
            Some(path) => PathBuf::from(path),
            None => {
                let exe = std::env::current_exe().context("finding the current executable")?;
                if exe.file_name().is_some_and(|n| n == "lb") {
                    exe
                } else {
                    bail!("LB_BIN is not set (path of the `lb` binary); {HINT}");
                }
            }
        };
        let lab_bpf_object = std::env::var_os("LB_LAB_BPF_OBJECT")
            .map(PathBuf::from)
            .ok_or_else(|| {
                anyhow!("LB_LAB_BPF_OBJECT is not set (path of the `lab-xdp` eBPF object); {HINT}")
            })?;
        Ok(Self {
            backends,
            lb_bin,
            lab_bpf_object,
            dsr: false,
            client_path_mtu: None,
            cluster_nodes: 0,
        })
    }

    /// With the DSR return path (see the module doc).
    pub fn with_dsr(mut self) -> Self {
        self.dsr = true;
        self
    }

    /// A cluster of `nodes` balancer nodes (1..=[`cluster::MAX_CLUSTER_NODES`])
    /// behind `sw` as an ECMP router that learns the VIPs from them with BGP
    /// (BIRD); implies the DSR return path (see the module doc).
    pub fn with_cluster(mut self, nodes: usize) -> Self {
        self.dsr = true;
        self.cluster_nodes = nodes;
        self
    }

    /// With the DSR return path and the `sw`-`c1` link's MTU lowered to `mtu`.
    pub fn with_client_path_mtu(mut self, mtu: u32) -> Self {
        self.dsr = true;
        self.client_path_mtu = Some(mtu);
        self
    }
}

/// One backend namespace of a lab.
#[derive(Clone, Debug)]
pub struct LabBackend {
    /// 1-based index, as in `be{index}`.
    pub index: usize,
    /// Role name, e.g. `be1`; also the name its server answers with.
    pub name: String,
    /// Namespace name.
    pub ns: String,
    /// IPv4 address on `eth0`.
    pub v4: Ipv4Addr,
    /// IPv6 address on `eth0`.
    pub v6: Ipv6Addr,
    /// MAC address of `eth0`.
    pub mac: [u8; 6],
    /// Pid of its running backend server, if the lab started one.
    pub server_pid: Option<u32>,
}

/// Where [`Lab::add_host`] plugs a host in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostLink {
    /// A port of the switch's bridge: on the backends' segment, reached
    /// from the balancer's `lbb` like a backend.
    Switch,
    /// A veth of its own to the balancer namespace (`h{n}` there), off the
    /// interfaces the XDP program is attached to.
    Balancer,
}

/// A namespace added with [`Lab::add_host`].
#[derive(Clone, Debug)]
pub struct LabHost {
    /// 1-based index, as in `host{index}`.
    pub index: usize,
    /// Namespace name.
    pub ns: String,
    /// Where it is plugged in.
    pub link: HostLink,
    /// IPv4 address on its `eth0`.
    pub v4: Ipv4Addr,
    /// IPv6 address on its `eth0`.
    pub v6: Ipv6Addr,
    /// The balancer's address on the host's link (its default gateway).
    pub gateway_v4: Ipv4Addr,
    /// The balancer's IPv6 address on the host's link.
    pub gateway_v6: Ipv6Addr,
}

/// Addresses of host `n` on `link`: its own, then the balancer's on that link.
fn host_addresses(n: usize, link: HostLink) -> (Ipv4Addr, Ipv6Addr, Ipv4Addr, Ipv6Addr) {
    let n8 = u8::try_from(n).unwrap_or(u8::MAX);
    match link {
        HostLink::Switch => (
            Ipv4Addr::new(198, 18, 2, 240 + n8),
            // Decimal digits read as hex, like the backends' (fd00:18:2::241).
            Ipv6Addr::new(0xfd00, 0x18, 0x2, 0, 0, 0, 0, 0x240 + u16::from(n8)),
            BALANCER_BACKEND_V4,
            BALANCER_BACKEND_V6,
        ),
        HostLink::Balancer => {
            let net = 0x20 + u16::from(n8);
            (
                Ipv4Addr::new(198, 18, 20 + n8, 2),
                Ipv6Addr::new(0xfd00, 0x18, net, 0, 0, 0, 0, 2),
                Ipv4Addr::new(198, 18, 20 + n8, 1),
                Ipv6Addr::new(0xfd00, 0x18, net, 0, 0, 0, 0, 1),
            )
        }
    }
}

/// A built lab; dropping it stops its processes and deletes its namespaces.
pub struct Lab {
    prefix: String,
    opts: LabOptions,
    /// Every namespace created so far, in creation order (deleted in reverse).
    namespaces: Vec<String>,
    backends: Vec<LabBackend>,
    /// Processes started by this lab and not yet reaped.
    children: HashMap<u32, Child>,
    /// Pids this lab started and already reaped, with how they ended.
    reaped: HashMap<u32, ExitStatus>,
    /// Loaded pass programs; dropping them detaches them.
    xdp: Vec<aya::Ebpf>,
    /// Backend namespaces where `lb decap` attached to `eth0` (detached on drop).
    decap: Vec<String>,
    /// How backends route to the client (always `Balancer` outside DSR labs).
    return_path: ReturnPath,
    /// Cluster labs: the balancer nodes, node 1 (`lb`) first.
    nodes: Vec<LabNode>,
    /// Files of this lab (BIRD configurations, sockets, logs), removed on drop.
    dir: Option<PathBuf>,
    /// Extra hosts added with `add_host`.
    hosts: Vec<LabHost>,
}

impl Lab {
    /// Sweeps stale labs, builds the topology, attaches the pass programs,
    /// starts a server in every backend and waits until each answers.
    pub fn create(tag: &str, opts: LabOptions) -> Result<Lab> {
        if tag.is_empty()
            || tag.len() > 16
            || !tag.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
        {
            bail!("lab tag {tag:?} must be 1-16 characters of [A-Za-z0-9_]");
        }
        if let Some(mtu) = opts.client_path_mtu {
            if !opts.dsr {
                bail!("client_path_mtu needs the DSR topology (dsr = true)");
            }
            if !(MIN_CLIENT_PATH_MTU..=1500).contains(&mtu) {
                bail!("client_path_mtu {mtu} is outside {MIN_CLIENT_PATH_MTU}..=1500");
            }
        }
        if opts.cluster_nodes > cluster::MAX_CLUSTER_NODES {
            bail!(
                "a cluster lab holds at most {} nodes, {} asked",
                cluster::MAX_CLUSTER_NODES,
                opts.cluster_nodes
            );
        }
        if opts.cluster_nodes > 0 && !opts.dsr {
            bail!("a cluster needs the DSR topology (dsr = true)");
        }
        if opts.backends > MAX_BACKENDS {
            bail!(
                "a lab holds at most {MAX_BACKENDS} backends, {} asked",
                opts.backends
            );
        }
        for (what, path) in [
            ("LB_BIN", &opts.lb_bin),
            ("LB_LAB_BPF_OBJECT", &opts.lab_bpf_object),
        ] {
            if !path.is_file() {
                bail!(
                    "{what}: {} does not exist; build it first (`cargo xtask build`)",
                    path.display()
                );
            }
        }
        if let Err(e) = sweep_stale() {
            tracing::warn!("sweeping stale labs: {e:#}");
        }
        sweep_stale_dirs();
        let backends = opts.backends;
        let return_path = if opts.dsr {
            ReturnPath::Switch
        } else {
            ReturnPath::Balancer
        };
        let mut lab = Lab {
            prefix: format!("{}{tag}-{}", netns::NS_PREFIX, std::process::id()),
            opts,
            namespaces: Vec::new(),
            backends: Vec::new(),
            children: HashMap::new(),
            reaped: HashMap::new(),
            xdp: Vec::new(),
            decap: Vec::new(),
            return_path,
            nodes: Vec::new(),
            dir: None,
            hosts: Vec::new(),
        };
        // Any `?` below drops `lab`, which removes whatever was built so far.
        lab.build_core().context("building the lab")?;
        if lab.opts.dsr {
            lab.build_dsr()
                .context("building the lab's DSR return path")?;
        }
        if lab.opts.cluster_nodes > 0 {
            lab.build_cluster()
                .context("building the lab's cluster (router, nodes, BIRD)")?;
        }
        for _ in 0..backends {
            lab.add_backend()?;
        }
        Ok(lab)
    }

    /// Namespace name for a role.
    fn ns_name(&self, role: &str) -> String {
        format!("{}-{role}", self.prefix)
    }

    /// Creates a namespace, records it for cleanup, and quiets IPv6 autoconfiguration.
    fn add_namespace(&mut self, role: &str, extra_sysctls: &[(&str, &str)]) -> Result<String> {
        let ns = self.ns_name(role);
        netns::add_ns(&ns)?;
        self.namespaces.push(ns.clone());
        // `default` is copied into interfaces created later, so set it before any links.
        let mut settings = vec![
            ("net.ipv6.conf.all.accept_ra", "0"),
            ("net.ipv6.conf.default.accept_ra", "0"),
            ("net.ipv6.conf.all.router_solicitations", "0"),
            ("net.ipv6.conf.default.router_solicitations", "0"),
        ];
        settings.extend_from_slice(extra_sysctls);
        netns::sysctls_in(&ns, &settings)?;
        Ok(ns)
    }

    /// Builds client, balancer and switch, and attaches the pass programs.
    fn build_core(&mut self) -> Result<()> {
        // The client and the balancer open many short connections (load
        // generators, proxies).
        let cli = self.add_namespace("cli", &CHURN_SYSCTLS)?;
        let lb = self.add_namespace("lb", &CHURN_SYSCTLS)?;
        // The switch is pure L2; without IPv6 its ports send no MLD/RS noise.
        // (A DSR lab's switch routes too: IPv6 goes back on for its bridge
        // and client link in `build_dsr`, the ports stay without.)
        let sw_sysctls: &[(&str, &str)] = if self.opts.dsr {
            &[("net.ipv6.conf.default.disable_ipv6", "1")]
        } else {
            &[
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
            ]
        };
        let sw = self.add_namespace("sw", sw_sysctls)?;

        netns::veth(
            ("c0", &cli, Some(CLIENT_MAC)),
            ("lbc", &lb, Some(BALANCER_CLIENT_MAC)),
        )?;
        netns::veth(("lbb", &lb, Some(BALANCER_BACKEND_MAC)), ("up", &sw, None))?;

        netns::ip_batch(
            &cli,
            &[
                "link set lo up".into(),
                format!("addr add {CLIENT_V4}/24 dev c0"),
                format!("addr add {CLIENT_V6}/64 dev c0 nodad"),
                "link set c0 up".into(),
                format!("route add default via {BALANCER_CLIENT_V4}"),
                format!("route add default via {BALANCER_CLIENT_V6}"),
                neigh(BALANCER_CLIENT_V4, BALANCER_CLIENT_MAC, "c0"),
                neigh(BALANCER_CLIENT_V6, BALANCER_CLIENT_MAC, "c0"),
            ],
        )?;
        netns::ip_batch(&lb, &balancer_side_commands())?;
        netns::ip_batch(
            &sw,
            &[
                "link set lo up".into(),
                // No STP and no forward delay: ports forward the moment they are up.
                "link add br0 type bridge stp_state 0 forward_delay 0 mcast_snooping 0".into(),
                "link set br0 up".into(),
                "link set dev up master br0".into(),
                "link set dev up up".into(),
            ],
        )?;
        netns::sysctls_in(&lb, &FORWARDING_SYSCTLS)?;
        netns::nft_in(&lb, &guard_ruleset(false))?;

        netns::full_tx_checksums(&cli, "c0")?;
        // XDP_TX/REDIRECT frames out of a veth only arrive if the peer runs XDP too.
        self.attach_pass(&cli, "c0")?;
        self.attach_pass(&sw, "up")?;
        Ok(())
    }

    /// Adds the DSR return path to a built core: the `c1`-`swc` link, routing
    /// in `sw`, the client's acceptance of answers on `c1`, and the counters
    /// of [`Lab::vip_reply_paths`]. Backends get their part in `add_backend`.
    fn build_dsr(&mut self) -> Result<()> {
        let cli = self.client_ns().to_string();
        let lb = self.balancer_ns().to_string();
        let sw = self.switch_ns().to_string();
        netns::veth(
            ("c1", &cli, Some(CLIENT_RETURN_MAC)),
            ("swc", &sw, Some(SWITCH_CLIENT_MAC)),
        )?;
        netns::sysctls_in(
            &sw,
            &[
                ("net.ipv6.conf.br0.disable_ipv6", "0"),
                ("net.ipv6.conf.swc.disable_ipv6", "0"),
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                // Every "fragmentation needed" goes to the same VIP: no per-destination limit.
                ("net.ipv4.icmp_ratelimit", "0"),
                ("net.ipv6.icmp.ratelimit", "0"),
            ],
        )?;
        let mut commands = vec![
            format!("link set br0 address {}", mac_str(SWITCH_BACKEND_MAC)),
            format!("addr add {SWITCH_BACKEND_V4}/24 dev br0"),
            format!("addr add {SWITCH_BACKEND_V6}/64 dev br0 nodad"),
            format!("addr add {SWITCH_CLIENT_V4}/24 dev swc"),
            format!("addr add {SWITCH_CLIENT_V6}/64 dev swc nodad"),
            "link set swc up".into(),
            format!("route add {CLIENT_PREFIX_V4} via {CLIENT_RETURN_V4}"),
            format!("route add {CLIENT_PREFIX_V6} via {CLIENT_RETURN_V6}"),
            neigh(CLIENT_RETURN_V4, CLIENT_RETURN_MAC, "swc"),
            neigh(CLIENT_RETURN_V6, CLIENT_RETURN_MAC, "swc"),
            neigh(BALANCER_BACKEND_V4, BALANCER_BACKEND_MAC, "br0"),
            neigh(BALANCER_BACKEND_V6, BALANCER_BACKEND_MAC, "br0"),
        ];
        // A cluster's router learns its VIP routes from the nodes (BGP).
        if self.opts.cluster_nodes == 0 {
            commands.extend([
                format!("route add {VIP_PREFIX_V4} via {BALANCER_BACKEND_V4}"),
                format!("route add {VIP_PREFIX_V6} via {BALANCER_BACKEND_V6}"),
            ]);
        }
        netns::ip_batch(&sw, &commands)?;
        netns::sysctls_in(
            &cli,
            &[
                ("net.ipv4.conf.all.rp_filter", "0"),
                ("net.ipv4.conf.default.rp_filter", "0"),
                ("net.ipv4.conf.c0.rp_filter", "0"),
                ("net.ipv4.conf.c1.rp_filter", "0"),
            ],
        )?;
        netns::ip_batch(
            &cli,
            &[
                format!("addr add {CLIENT_RETURN_V4}/24 dev c1"),
                format!("addr add {CLIENT_RETURN_V6}/64 dev c1 nodad"),
                "link set c1 up".into(),
                neigh(SWITCH_CLIENT_V4, SWITCH_CLIENT_MAC, "c1"),
                neigh(SWITCH_CLIENT_V6, SWITCH_CLIENT_MAC, "c1"),
            ],
        )?;
        if let Some(mtu) = self.opts.client_path_mtu {
            self.set_client_path_mtu(mtu)?;
        }
        netns::nft_in(&cli, &client_paths_ruleset())?;
        netns::nft_in(&lb, &balancer_paths_ruleset())?;
        Ok(())
    }

    /// DSR labs: sets the MTU of the `sw`-`c1` link (both ends); 1500 is the default.
    pub fn set_client_path_mtu(&self, mtu: u32) -> Result<()> {
        self.require_dsr()?;
        if !(MIN_CLIENT_PATH_MTU..=1500).contains(&mtu) {
            bail!("client path MTU {mtu} is outside {MIN_CLIENT_PATH_MTU}..=1500");
        }
        netns::ip_batch(self.switch_ns(), &[format!("link set swc mtu {mtu}")])?;
        netns::ip_batch(self.client_ns(), &[format!("link set c1 mtu {mtu}")])
    }

    fn require_dsr(&self) -> Result<()> {
        if !self.opts.dsr {
            bail!("this lab has no DSR return path (LabOptions::with_dsr)");
        }
        Ok(())
    }

    /// How backends route to the client now.
    pub fn return_path(&self) -> ReturnPath {
        self.return_path
    }

    /// DSR labs: makes every backend (and those added later) route the
    /// client's prefixes via `path`. `Balancer` is what NAT needs (answers
    /// come back through the balancer to be translated); `Switch` is DSR.
    pub fn set_return_path(&mut self, path: ReturnPath) -> Result<()> {
        self.require_dsr()?;
        for b in &self.backends {
            netns::ip_batch(&b.ns, &return_route_commands(path))?;
        }
        self.return_path = path;
        Ok(())
    }

    /// DSR labs: packets from the VIP prefixes counted so far at the client,
    /// by the interface they came in on, and on the balancer's `lbb`.
    pub fn vip_reply_paths(&self) -> Result<VipReplyPaths> {
        self.require_dsr()?;
        let count = |ns: &str, name: &str| -> Result<u64> {
            let text = netns::nft_output(ns, &["list", "counter", "inet", PATHS_TABLE, name])?;
            parse_packets(&text).ok_or_else(|| anyhow!("no packet count in nft output: {text}"))
        };
        Ok(VipReplyPaths {
            via_balancer: count(self.client_ns(), "via_balancer")?,
            via_switch: count(self.client_ns(), "via_switch")?,
            balancer_lbb: count(self.balancer_ns(), "lbb_from_vip")?,
        })
    }

    /// Id of the XDP program attached to `iface` in namespace `ns`, if any
    /// (from `ip -d link show`): e.g. the pass programs on `c0` (client) and
    /// `up` (switch), or the agent's `lb_xdp` on `lbc`/`lbb` (balancer).
    pub fn xdp_program_id(&self, ns: &str, iface: &str) -> Result<Option<u32>> {
        let out = netns::ip(&["-n", ns, "-d", "link", "show", "dev", iface])?;
        Ok(parse_xdp_prog_id(&String::from_utf8_lossy(&out.stdout)))
    }

    /// The addresses a balancer of this lab can send `ipip` packets from
    /// (the agents take the first of each family on their interfaces): node
    /// 1's `lbc` and `lbb`, and every further cluster node's `lbb`.
    pub fn encap_sources(&self) -> Vec<IpAddr> {
        let mut out: Vec<IpAddr> = vec![
            BALANCER_BACKEND_V4.into(),
            BALANCER_BACKEND_V6.into(),
            BALANCER_CLIENT_V4.into(),
            BALANCER_CLIENT_V6.into(),
        ];
        for n in 2..=self.opts.cluster_nodes {
            out.push(cluster::node_v4(n).into());
            out.push(cluster::node_v6(n).into());
        }
        out
    }

    /// Runs `lb decap` on every backend's `eth0` for the lab's VIPs, as a
    /// backend of an `ipip` service is set up (see `lb-ebpf/DECAP.md`),
    /// accepting tunnelled packets from the balancers only (`--from`).
    pub fn start_decap(&mut self) -> Result<()> {
        let from: Vec<String> = self.encap_sources().iter().map(IpAddr::to_string).collect();
        for ns in self
            .backends
            .iter()
            .map(|b| b.ns.clone())
            .collect::<Vec<_>>()
        {
            if self.decap.contains(&ns) {
                continue;
            }
            let out = Command::new(&self.opts.lb_bin)
                .args(["decap", "--netns", &ns, "--interface", "eth0", "--vip"])
                .arg(format!("{VIP_V4},{VIP_V6}"))
                .arg("--from")
                .arg(from.join(","))
                .output()
                .context("running lb decap")?;
            if !out.status.success() {
                bail!(
                    "lb decap in {ns}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                );
            }
            self.decap.push(ns);
        }
        Ok(())
    }

    /// Loads the pass-only program and attaches it to `iface` inside `ns`.
    fn attach_pass(&mut self, ns: &str, iface: &str) -> Result<()> {
        let object = self.opts.lab_bpf_object.clone();
        let iface_owned = iface.to_string();
        let ebpf = run_in_ns(ns, move || -> Result<aya::Ebpf> {
            let mut ebpf = aya::Ebpf::load_file(&object)
                .with_context(|| format!("loading {}", object.display()))?;
            let prog: &mut aya::programs::Xdp = ebpf
                .program_mut(lb_common::maps::PROG_PASS)
                .ok_or_else(|| {
                    anyhow!(
                        "no program {} in {}",
                        lb_common::maps::PROG_PASS,
                        object.display()
                    )
                })?
                .try_into()?;
            prog.load()?;
            prog.attach(&iface_owned, aya::programs::XdpMode::Driver)?;
            Ok(ebpf)
        })?
        .with_context(|| {
            format!(
                "attaching {} to {iface} in {ns}",
                lb_common::maps::PROG_PASS
            )
        })?;
        self.xdp.push(ebpf);
        Ok(())
    }

    /// Detaches the pass program the lab attached to `iface` in `ns`, if it
    /// attached one there, so that another XDP program (e.g. `lb decap` on a
    /// backend's `eth0`) can take the interface; returns whether it did.
    pub fn detach_pass(&mut self, ns: &str, iface: &str) -> Result<bool> {
        let Some(attached) = self.xdp_program_id(ns, iface)? else {
            return Ok(false);
        };
        let ours = self.xdp.iter().position(|ebpf| {
            ebpf.program(lb_common::maps::PROG_PASS)
                .and_then(|p| p.info().ok())
                .is_some_and(|info| info.id() == attached)
        });
        // Dropping the loaded object detaches its program.
        Ok(ours.map(|i| self.xdp.remove(i)).is_some())
    }

    /// Client namespace name.
    pub fn client_ns(&self) -> &str {
        &self.namespaces[0]
    }

    /// Balancer namespace name.
    pub fn balancer_ns(&self) -> &str {
        &self.namespaces[1]
    }

    /// Switch namespace name.
    pub fn switch_ns(&self) -> &str {
        &self.namespaces[2]
    }

    /// The balancer's interfaces: client side, backend side.
    pub fn balancer_interfaces() -> [&'static str; 2] {
        ["lbc", "lbb"]
    }

    /// The interfaces the agent attaches to: [`Lab::balancer_interfaces`],
    /// or in a cluster only `lbb`, where every node receives clients' packets
    /// from the router and sends them on to the backends.
    pub fn agent_interfaces(&self) -> Vec<&'static str> {
        if self.nodes.is_empty() {
            Self::balancer_interfaces().to_vec()
        } else {
            vec!["lbb"]
        }
    }

    /// All backends, in index order.
    pub fn backends(&self) -> &[LabBackend] {
        &self.backends
    }

    /// Adds backend `be{n+1}`: namespace, bridge port, neighbours in `lb`, running server.
    pub fn add_backend(&mut self) -> Result<usize> {
        let index = self.backends.len() + 1;
        if index > MAX_BACKENDS {
            bail!("a lab holds at most {MAX_BACKENDS} backends");
        }
        let name = format!("be{index}");
        let (v4, v6, mac) = (backend_v4(index), backend_v6(index), backend_mac(index));
        let dsr = self.opts.dsr;
        // DSR: the VIPs go on `lo`; never answer ARP for them on the segment,
        // and accept packets whose way back is not the way they came.
        let dsr_sysctls: &[(&str, &str)] = &[
            ("net.ipv4.conf.all.arp_ignore", "1"),
            ("net.ipv4.conf.default.arp_ignore", "1"),
            ("net.ipv4.conf.all.arp_announce", "2"),
            ("net.ipv4.conf.default.arp_announce", "2"),
            ("net.ipv4.conf.all.rp_filter", "0"),
            ("net.ipv4.conf.default.rp_filter", "0"),
        ];
        let ns = self.add_namespace(&name, if dsr { dsr_sysctls } else { &[] })?;
        let port = format!("p{index}");
        let sw = self.switch_ns().to_string();
        netns::veth(("eth0", &ns, Some(mac)), (&port, &sw, None))?;
        netns::ip_batch(
            &sw,
            &[
                format!("link set {port} master br0"),
                format!("link set {port} up"),
            ],
        )?;
        netns::ip_batch(
            &ns,
            &[
                "link set lo up".into(),
                format!("addr add {v4}/24 dev eth0"),
                format!("addr add {v6}/64 dev eth0 nodad"),
                "link set eth0 up".into(),
                format!("route add default via {BALANCER_BACKEND_V4}"),
                format!("route add default via {BALANCER_BACKEND_V6}"),
            ],
        )?;
        if dsr {
            netns::sysctls_in(
                &ns,
                &[
                    ("net.ipv4.conf.eth0.arp_ignore", "1"),
                    ("net.ipv4.conf.eth0.arp_announce", "2"),
                    ("net.ipv4.conf.eth0.rp_filter", "0"),
                ],
            )?;
            let mut cmds = vec![
                format!("addr add {VIP_V4}/32 dev lo"),
                format!("addr add {VIP_V6}/128 dev lo nodad"),
                neigh(SWITCH_BACKEND_V4, SWITCH_BACKEND_MAC, "eth0"),
                neigh(SWITCH_BACKEND_V6, SWITCH_BACKEND_MAC, "eth0"),
            ];
            cmds.extend(return_route_commands(self.return_path));
            netns::ip_batch(&ns, &cmds)?;
        }
        netns::full_tx_checksums(&ns, "eth0")?;
        // Permanent, so bpf_fib_lookup always finds the next hop without
        // waiting for ARP/ND; in every balancer node of a cluster.
        let mut balancers = vec![self.balancer_ns().to_string()];
        balancers.extend(self.nodes.iter().skip(1).map(|n| n.ns.clone()));
        for lb in balancers {
            netns::ip_batch(&lb, &backend_neighbour_commands(index))?;
        }
        self.backends.push(LabBackend {
            index,
            name,
            ns,
            v4,
            v6,
            mac,
            server_pid: None,
        });
        self.start_backend_server(index)?;
        Ok(index)
    }

    /// Adds namespace `host{n}` plugged in where `link` says (see the
    /// module doc for its addresses), with a default route via the
    /// balancer; start its programs with [`Lab::spawn_in_ns`].
    pub fn add_host(&mut self, link: HostLink) -> Result<LabHost> {
        let index = self.hosts.len() + 1;
        if index > MAX_HOSTS {
            bail!("a lab holds at most {MAX_HOSTS} extra hosts");
        }
        let (v4, v6, gateway_v4, gateway_v6) = host_addresses(index, link);
        let ns = self.add_namespace(&format!("host{index}"), &[])?;
        let (peer_ns, peer) = match link {
            HostLink::Switch => (self.switch_ns().to_string(), format!("ph{index}")),
            HostLink::Balancer => (self.balancer_ns().to_string(), format!("h{index}")),
        };
        netns::veth(("eth0", &ns, None), (&peer, &peer_ns, None))?;
        let peer_cmds = match link {
            HostLink::Switch => vec![
                format!("link set {peer} master br0"),
                format!("link set {peer} up"),
            ],
            HostLink::Balancer => vec![
                format!("addr add {gateway_v4}/24 dev {peer}"),
                format!("addr add {gateway_v6}/64 dev {peer} nodad"),
                format!("link set {peer} up"),
            ],
        };
        netns::ip_batch(&peer_ns, &peer_cmds)?;
        netns::ip_batch(
            &ns,
            &[
                "link set lo up".into(),
                format!("addr add {v4}/24 dev eth0"),
                format!("addr add {v6}/64 dev eth0 nodad"),
                "link set eth0 up".into(),
                format!("route add default via {gateway_v4}"),
                format!("route add default via {gateway_v6}"),
            ],
        )?;
        // Its answers may cross the balancer's XDP program (on `lbb`),
        // which needs complete checksums (see `netns::full_tx_checksums`).
        netns::full_tx_checksums(&ns, "eth0")?;
        let host = LabHost {
            index,
            ns,
            link,
            v4,
            v6,
            gateway_v4,
            gateway_v6,
        };
        self.hosts.push(host.clone());
        Ok(host)
    }

    /// The hosts added with [`Lab::add_host`], in index order.
    pub fn hosts(&self) -> &[LabHost] {
        &self.hosts
    }

    /// Looks up a backend by its 1-based index.
    fn backend_pos(&self, index: usize) -> Result<usize> {
        self.backends
            .iter()
            .position(|b| b.index == index)
            .ok_or_else(|| anyhow!("no backend {index} in this lab"))
    }

    /// Kills backend `index`'s server with SIGKILL (a crash, not a shutdown).
    pub fn stop_backend_server(&mut self, index: usize) -> Result<()> {
        let pos = self.backend_pos(index)?;
        match self.backends[pos].server_pid.take() {
            Some(pid) => self.kill_child(pid),
            None => Ok(()),
        }
    }

    /// Kills a process this lab started with SIGKILL and reaps it.
    fn kill_child(&mut self, pid: u32) -> Result<()> {
        if let Some(mut child) = self.children.remove(&pid) {
            // Ignored: it may have died on its own already; wait() below still reaps it.
            let _ = child.kill();
            let status = child.wait().with_context(|| format!("reaping pid {pid}"))?;
            self.reaped.insert(pid, status);
        }
        Ok(())
    }

    /// Starts backend `index`'s server (no-op if running) and waits until it answers.
    pub fn start_backend_server(&mut self, index: usize) -> Result<()> {
        let pos = self.backend_pos(index)?;
        if let Some(pid) = self.backends[pos].server_pid
            && let Some(child) = self.children.get_mut(&pid)
            && child.try_wait()?.is_none()
        {
            return Ok(());
        }
        let backend = &self.backends[pos];
        let args = backend_server_args(&backend.name, self.opts.dsr);
        let (ns, name) = (backend.ns.clone(), backend.name.clone());
        let program = self.opts.lb_bin.clone();
        let pid = self.spawn_in_ns(&ns, &program, &args.to_args())?;
        self.backends[pos].server_pid = Some(pid);
        self.wait_server_ready(pid, &ns, &name)
            .with_context(|| format!("backend server {name} (pid {pid}) did not come up"))
    }

    /// Polls the server over loopback until all four sockets answer with its name.
    fn wait_server_ready(&mut self, pid: u32, ns: &str, name: &str) -> Result<()> {
        let deadline = Instant::now() + SERVER_READY_TIMEOUT;
        loop {
            if let Some(child) = self.children.get_mut(&pid)
                && let Some(status) = child.try_wait()?
            {
                bail!("it exited with {status}");
            }
            let expected = name.to_string();
            let dsr = self.opts.dsr;
            let ready = run_in_ns(ns, move || probe_server(&expected, dsr))??;
            if ready {
                return Ok(());
            }
            if Instant::now() >= deadline {
                bail!("no answer within {SERVER_READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Runs `ip netns exec ns program args` with inherited stdout/stderr; returns its pid.
    ///
    /// `ip netns exec` replaces itself with `program`, so the pid is the program's.
    pub fn spawn_in_ns(&mut self, ns: &str, program: &Path, args: &[OsString]) -> Result<u32> {
        if !self.namespaces.iter().any(|n| n == ns) {
            bail!("{ns} is not a namespace of this lab");
        }
        let child = netns::command(ns, program)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting {} in {ns}", program.display()))?;
        let pid = child.id();
        self.reaped.remove(&pid);
        self.children.insert(pid, child);
        Ok(pid)
    }

    /// Makes `ip` a local address of the balancer (on its loopback), so the
    /// stack accepts packets to it that XDP passes up: what an operator does
    /// for a VIP served by the L7 proxy.
    pub fn make_local_on_balancer(&self, ip: IpAddr) -> Result<()> {
        let prefix = if ip.is_ipv4() { 32 } else { 128 };
        netns::ip_batch(
            self.balancer_ns(),
            &[format!("addr replace {ip}/{prefix} dev lo")],
        )
    }

    /// Runs `nft -f -` with `ruleset` in one of this lab's namespaces (e.g. a
    /// DNAT baseline in the balancer namespace).
    pub fn nft(&self, ns: &str, ruleset: &str) -> Result<()> {
        if !self.namespaces.iter().any(|n| n == ns) {
            bail!("{ns} is not a namespace of this lab");
        }
        netns::nft_in(ns, ruleset)
    }

    /// Where the lab's agent pins its maps and attachments.
    pub fn agent_pin_dir(&self) -> PathBuf {
        Path::new(crate::dataplane::pin::BPFFS)
            .join("lb")
            .join(self.balancer_ns())
    }

    /// Starts the load-balancer agent for this lab's balancer namespace:
    /// `lb run --netns <lb> ARGS` from the host namespace, so that its pinned
    /// state lives in the host's /sys/fs/bpf (under `ip netns exec` /sys is
    /// remounted and pins would vanish with the process). Tracked like any child.
    pub fn spawn_agent(&mut self, args: &[OsString]) -> Result<u32> {
        self.spawn_node_agent(1, args)
    }

    /// [`Lab::spawn_agent`] for balancer node `n` of a cluster (node 1 is the
    /// balancer namespace); give it [`Lab::node_pin_dir`] and [`Lab::node_socket`].
    pub fn spawn_node_agent(&mut self, n: usize, args: &[OsString]) -> Result<u32> {
        let ns = self.node_ns(n)?;
        let child = Command::new(&self.opts.lb_bin)
            .arg("run")
            .arg("--netns")
            .arg(&ns)
            .args(args)
            .stdin(Stdio::null())
            .spawn()
            .with_context(|| format!("starting the agent for {ns}"))?;
        let pid = child.id();
        self.reaped.remove(&pid);
        self.children.insert(pid, child);
        Ok(pid)
    }

    /// Stops a process this lab started: SIGTERM, up to 5 s grace, then SIGKILL.
    ///
    /// Returns its exit status, or `None` if it was already stopped and reaped
    /// earlier; a pid this lab never started is an error and is not signalled.
    pub fn stop(&mut self, pid: u32) -> Result<Option<ExitStatus>> {
        let Some(mut child) = self.children.remove(&pid) else {
            if self.reaped.contains_key(&pid) {
                return Ok(None);
            }
            bail!("pid {pid} was not started by this lab");
        };
        for b in &mut self.backends {
            if b.server_pid == Some(pid) {
                b.server_pid = None;
            }
        }
        for node in &mut self.nodes {
            if node.bird_pid == Some(pid) {
                node.bird_pid = None;
            }
        }
        let status = terminate(&mut child, STOP_GRACE)?;
        self.reaped.insert(pid, status);
        Ok(Some(status))
    }

    /// Exit status of a process this lab started, or `None` while it still runs.
    pub fn try_wait(&mut self, pid: u32) -> Result<Option<ExitStatus>> {
        if let Some(child) = self.children.get_mut(&pid) {
            return Ok(child.try_wait()?);
        }
        match self.reaped.get(&pid) {
            Some(status) => Ok(Some(*status)),
            None => bail!("pid {pid} was not started by this lab"),
        }
    }

    /// The options the lab was built with.
    pub fn options(&self) -> &LabOptions {
        &self.opts
    }

    /// Packets the kernel tried to forward in `lb` (and the guard dropped):
    /// anything here is traffic the XDP program did not handle.
    pub fn kernel_forwarded_packets(&self) -> Result<u64> {
        self.kernel_forwarded_packets_in(self.balancer_ns())
    }

    /// The guard's counter in a balancer namespace.
    fn kernel_forwarded_packets_in(&self, ns: &str) -> Result<u64> {
        let text = netns::nft_output(ns, &["list", "counter", "inet", GUARD_TABLE, GUARD_COUNTER])?;
        parse_packets(&text).ok_or_else(|| anyhow!("no packet count in nft output: {text}"))
    }

    /// Lets the kernel in `lb` forward (still counted) or blocks it again (the default).
    ///
    /// Forwarding allowed makes the lab a plain routed network, which checks
    /// the wiring without a balancer and gives benchmarks a kernel baseline.
    pub fn set_kernel_forwarding(&self, allow: bool) -> Result<()> {
        let rules = format!(
            "flush chain inet {GUARD_TABLE} forward\nadd rule inet {GUARD_TABLE} forward counter name {GUARD_COUNTER} {}\n",
            if allow { "accept" } else { "drop" }
        );
        netns::nft_in(self.balancer_ns(), &rules)
    }
}

/// The `lbguard` table: forwarding hook, every packet counted, then dropped (or accepted).
fn guard_ruleset(allow: bool) -> String {
    let verdict = if allow { "accept" } else { "drop" };
    format!(
        "table inet {GUARD_TABLE} {{\n  counter {GUARD_COUNTER} {{ }}\n  chain forward {{\n    type filter hook forward priority 0; policy accept;\n    counter name {GUARD_COUNTER} {verdict}\n  }}\n}}\n"
    )
}

/// Finds `prog/xdp id N` in `ip -d link show` output.
fn parse_xdp_prog_id(text: &str) -> Option<u32> {
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w.starts_with("prog/xdp") && words.next() == Some("id") {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// Finds `packets N` in `nft list counter` output.
fn parse_packets(text: &str) -> Option<u64> {
    let mut words = text.split_whitespace();
    while let Some(w) = words.next() {
        if w == "packets" {
            return words.next()?.parse().ok();
        }
    }
    None
}

/// The backend server's sockets: TCP and UDP on the wildcards of both
/// families; in DSR labs also TCP on the VIP port (wildcard) and UDP bound to
/// VIP:port, so that its answers leave with the VIP as source.
fn backend_server_args(name: &str, dsr: bool) -> BackendArgs {
    let mut args = BackendArgs {
        name: name.to_string(),
        tcp: vec![
            (Ipv4Addr::UNSPECIFIED, TCP_PORT).into(),
            (Ipv6Addr::UNSPECIFIED, TCP_PORT).into(),
        ],
        udp: vec![
            (Ipv4Addr::UNSPECIFIED, UDP_PORT).into(),
            (Ipv6Addr::UNSPECIFIED, UDP_PORT).into(),
        ],
    };
    if dsr {
        args.tcp.extend([
            SocketAddr::from((Ipv4Addr::UNSPECIFIED, services::VIP_TCP_PORT)),
            SocketAddr::from((Ipv6Addr::UNSPECIFIED, services::VIP_TCP_PORT)),
        ]);
        args.udp.extend([
            SocketAddr::from((VIP_V4, services::VIP_UDP_PORT)),
            SocketAddr::from((VIP_V6, services::VIP_UDP_PORT)),
        ]);
    }
    args
}

/// `ip` commands for a backend's routes to the client's prefixes.
fn return_route_commands(path: ReturnPath) -> [String; 2] {
    let (v4, v6) = path.gateways();
    [
        format!("route replace {CLIENT_PREFIX_V4} via {v4}"),
        format!("route replace {CLIENT_PREFIX_V6} via {v6}"),
    ]
}

/// DSR labs, client: answers from the VIPs counted by the interface they arrive on.
fn client_paths_ruleset() -> String {
    format!(
        "table inet {PATHS_TABLE} {{\n  counter via_balancer {{ }}\n  counter via_switch {{ }}\n  chain prerouting {{\n    type filter hook prerouting priority -300; policy accept;\n    iifname \"c0\" ip saddr {VIP_PREFIX_V4} counter name via_balancer\n    iifname \"c0\" ip6 saddr {VIP_PREFIX_V6} counter name via_balancer\n    iifname \"c1\" ip saddr {VIP_PREFIX_V4} counter name via_switch\n    iifname \"c1\" ip6 saddr {VIP_PREFIX_V6} counter name via_switch\n  }}\n}}\n"
    )
}

/// DSR labs, balancer: packets from the VIPs that reach its kernel on `lbb`.
fn balancer_paths_ruleset() -> String {
    format!(
        "table inet {PATHS_TABLE} {{\n  counter lbb_from_vip {{ }}\n  chain prerouting {{\n    type filter hook prerouting priority -300; policy accept;\n    iifname \"lbb\" ip saddr {VIP_PREFIX_V4} counter name lbb_from_vip\n    iifname \"lbb\" ip6 saddr {VIP_PREFIX_V6} counter name lbb_from_vip\n  }}\n}}\n"
    )
}

/// One readiness probe from inside a backend namespace: TCP and UDP, v4 and
/// v6, over loopback; in DSR labs also the VIP ports on the VIPs (local there).
fn probe_server(expected: &str, dsr: bool) -> Result<bool> {
    let t = Duration::from_millis(200);
    let mut targets = vec![
        (IpAddr::V4(Ipv4Addr::LOCALHOST), TCP_PORT, UDP_PORT),
        (IpAddr::V6(Ipv6Addr::LOCALHOST), TCP_PORT, UDP_PORT),
    ];
    if dsr {
        for ip in [IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6)] {
            targets.push((ip, services::VIP_TCP_PORT, services::VIP_UDP_PORT));
        }
    }
    for (ip, tcp_port, udp_port) in targets {
        let tcp = match client::tcp_ask(SocketAddr::new(ip, tcp_port), t) {
            Ok(name) => name,
            Err(_) => return Ok(false),
        };
        let udp = match client::udp_ask(SocketAddr::new(ip, udp_port), t) {
            Ok(name) => name,
            Err(_) => return Ok(false),
        };
        if tcp != expected || udp != expected {
            bail!("a server answers as {tcp:?}/{udp:?}, expected {expected:?}");
        }
    }
    Ok(true)
}

/// Removes the file directories (`$TMPDIR/lbl-{tag}-{pid}-{role}`) of labs
/// whose process is gone, as [`sweep_stale`] removes their namespaces.
fn sweep_stale_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(netns::owner_pid) else {
            continue;
        };
        if netns::pid_alive(pid) || !entry.path().is_dir() {
            continue;
        }
        if let Err(e) = std::fs::remove_dir_all(entry.path()) {
            tracing::warn!("removing {}: {e:#}", entry.path().display());
        }
    }
}

/// SIGTERM, wait up to `grace`, then SIGKILL; always reaps.
fn terminate(child: &mut Child, grace: Duration) -> Result<ExitStatus> {
    if let Some(status) = child.try_wait()? {
        return Ok(status);
    }
    send_sigterm(child);
    let deadline = Instant::now() + grace;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    // Ignored: it may have exited between the last poll and now.
    let _ = child.kill();
    Ok(child.wait()?)
}

/// Sends SIGTERM to a child we own (its pid cannot be reused before we reap it).
fn send_sigterm(child: &Child) {
    if let Ok(pid) = libc::pid_t::try_from(child.id()) {
        // SAFETY: plain kill(2) on our own unreaped child.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        // Signal everything first so the grace periods run in parallel.
        let mut children: Vec<(u32, Child)> = self.children.drain().collect();
        for (_, child) in &children {
            send_sigterm(child);
        }
        let deadline = Instant::now() + STOP_GRACE;
        while !children.is_empty() && Instant::now() < deadline {
            children.retain_mut(|(_, c)| !matches!(c.try_wait(), Ok(Some(_)) | Err(_)));
            if !children.is_empty() {
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        for (pid, mut child) in children {
            tracing::warn!(pid, "lab process ignored SIGTERM; killing it");
            let _ = child.kill();
            let _ = child.wait();
        }
        // Detach before the interfaces vanish with their namespaces; the
        // agent's pins (it leaves them when stopped, for a hitless restart)
        // go too.
        self.xdp.clear();
        for ns in self.decap.drain(..) {
            let pins = crate::decap::default_pin_dir("eth0", Some(&ns));
            if let Err(e) = crate::decap::detach(&pins) {
                tracing::warn!("detaching lb decap in {ns}: {e:#}");
            }
        }
        let mut pins = vec![self.agent_pin_dir()];
        pins.extend((2..=self.nodes.len()).filter_map(|n| self.node_pin_dir(n).ok()));
        for dir in pins {
            if let Err(e) = crate::dataplane::pin::remove_all(&dir) {
                tracing::warn!("removing the agent's pins in {}: {e:#}", dir.display());
            }
        }
        if let Some(dir) = self.dir.take()
            && let Err(e) = std::fs::remove_dir_all(&dir)
        {
            tracing::warn!("removing {}: {e:#}", dir.display());
        }
        for ns in self.namespaces.drain(..).rev() {
            if let Err(e) = netns::del_ns(&ns) {
                tracing::warn!("deleting namespace {ns}: {e:#}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::client::{http_get, tcp_ask, udp_ask};
    use super::*;

    const T: Duration = Duration::from_secs(2);

    /// These tests change the host's namespaces; CI runs as root.
    fn require_root() {
        // SAFETY: geteuid has no preconditions.
        let euid = unsafe { libc::geteuid() };
        assert_eq!(
            euid, 0,
            "lab tests need root (network namespaces, XDP); run them as root"
        );
    }

    /// Names of this process's namespaces with `tag`.
    fn namespaces_of(tag: &str) -> Vec<String> {
        let prefix = format!("lbl-{tag}-{}-", std::process::id());
        netns::list_ns()
            .expect("listing namespaces")
            .into_iter()
            .filter(|n| n.starts_with(&prefix))
            .collect()
    }

    #[test]
    fn addresses_follow_the_plan() {
        assert_eq!(backend_v4(1), Ipv4Addr::new(198, 18, 2, 11));
        assert_eq!(backend_v6(1).to_string(), "fd00:18:2::11");
        assert_eq!(backend_v6(12).to_string(), "fd00:18:2::22");
        assert_eq!(backend_v6(200).to_string(), "fd00:18:2::210");
        assert_eq!(mac_str(backend_mac(6)), "02:18:02:00:00:10");
        assert_eq!(VIP_V6.to_string(), "fd00:18:100::1");
        assert_eq!(CLIENT_V6.to_string(), "fd00:18:1::2");
    }

    #[test]
    fn parses_nft_counter() {
        let text = "table inet lbguard {\n\tcounter kernel_forwarded {\n\t\tpackets 42 bytes 4200\n\t}\n}\n";
        assert_eq!(parse_packets(text), Some(42));
        assert_eq!(parse_packets("nothing"), None);
    }

    #[test]
    fn parses_xdp_prog_id() {
        let text = "5: c0@if4: <BROADCAST,MULTICAST,UP,LOWER_UP> mtu 1500 xdp qdisc noqueue state UP\n    link/ether 02:18:01:00:00:02 brd ff:ff:ff:ff:ff:ff link-netns x promiscuity 0\n    veth\n    prog/xdp id 1234 name xdp_pass tag 3b185187f1855c4c jited\n";
        assert_eq!(parse_xdp_prog_id(text), Some(1234));
        assert_eq!(parse_xdp_prog_id("5: c0: <UP> mtu 1500"), None);
    }

    #[test]
    fn dsr_server_serves_the_vip_ports() {
        let plain = backend_server_args("be1", false);
        assert_eq!((plain.tcp.len(), plain.udp.len()), (2, 2));
        let dsr = backend_server_args("be1", true);
        assert!(
            dsr.tcp
                .contains(&SocketAddr::from((Ipv4Addr::UNSPECIFIED, 80)))
        );
        assert!(
            dsr.tcp
                .contains(&SocketAddr::from((Ipv6Addr::UNSPECIFIED, 80)))
        );
        // UDP answers must leave from the VIP: bound to it, not to a wildcard.
        assert!(dsr.udp.contains(&SocketAddr::from((VIP_V4, 53))));
        assert!(dsr.udp.contains(&SocketAddr::from((VIP_V6, 53))));
        assert_eq!(
            return_route_commands(ReturnPath::Switch),
            [
                "route replace 198.18.1.0/24 via 198.18.2.2",
                "route replace fd00:18:1::/64 via fd00:18:2::2"
            ]
        );
    }

    #[test]
    fn sweep_removes_only_dead_owners() {
        require_root();
        // A pid that surely existed and is now gone: a child we started and reaped.
        let mut child = Command::new("true").spawn().expect("spawn true");
        let dead = child.id();
        child.wait().expect("wait true");
        let stale = format!("lbl-sweeptest-{dead}-cli");
        let live = format!("lbl-sweeptest-{}-cli", std::process::id());
        netns::add_ns(&stale).expect("add stale ns");
        netns::add_ns(&live).expect("add live ns");
        // A leftover process of the dead lab, which would otherwise pin the namespace.
        let mut leftover = Command::new("ip")
            .args(["netns", "exec", &stale, "sleep", "60"])
            .spawn()
            .expect("spawn leftover");
        let deadline = Instant::now() + T;
        while Instant::now() < deadline
            && netns::ip(&["netns", "pids", &stale]).is_ok_and(|o| o.stdout.is_empty())
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        let result = sweep_stale();
        let killed = leftover.wait().expect("wait leftover");
        let remaining = netns::list_ns().expect("list");
        let _ = netns::del_ns(&live);
        let _ = netns::del_ns(&stale);
        result.expect("sweep_stale");
        assert!(
            !remaining.contains(&stale),
            "stale namespace survived the sweep"
        );
        assert!(
            remaining.contains(&live),
            "namespace of a live process was swept"
        );
        assert!(!killed.success(), "leftover process was not killed");
    }

    #[test]
    fn lab_reaches_backends_and_cleans_up() {
        require_root();
        let opts = LabOptions::from_env(2).expect("lab options");
        let tag = "unitlab";
        let lab = Lab::create(tag, opts).expect("creating the lab");
        assert_eq!(namespaces_of(tag).len(), 5);
        assert_eq!(lab.backends().len(), 2);
        assert!(lab.backends().iter().all(|b| b.server_pid.is_some()));
        for (ns, iface) in [(lab.client_ns(), "c0"), (lab.switch_ns(), "up")] {
            let out =
                netns::ip(&["-n", ns, "-d", "link", "show", "dev", iface]).expect("ip link show");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(
                text.contains("prog/xdp"),
                "no XDP program on {iface} in {ns}: {text}"
            );
        }
        let root = netns::ip(&["-o", "link", "show"]).expect("ip link show");
        let root = String::from_utf8_lossy(&root.stdout);
        for name in ["c0", "lbc", "lbb", "br0", "p1", "p2"] {
            assert!(
                !root.contains(&format!(": {name}")),
                "{name} exists in the root namespace"
            );
        }
        let targets: Vec<(String, Ipv4Addr, Ipv6Addr)> = lab
            .backends()
            .iter()
            .map(|b| (b.name.clone(), b.v4, b.v6))
            .collect();

        // With the guard in place the kernel must not forward client traffic.
        let first = targets[0].1;
        let blocked = run_in_ns(lab.client_ns(), move || {
            tcp_ask((first, TCP_PORT).into(), Duration::from_millis(300))
        })
        .expect("run_in_ns");
        assert!(
            blocked.is_err(),
            "kernel forwarded despite the guard: {blocked:?}"
        );
        assert!(lab.kernel_forwarded_packets().expect("counter") > 0);

        // The balancer namespace sits on the backends' segment, so it reaches them without routing.
        let direct = targets.clone();
        run_in_ns(lab.balancer_ns(), move || {
            for (name, v4, v6) in direct {
                for ip in [IpAddr::V4(v4), IpAddr::V6(v6)] {
                    assert_eq!(
                        tcp_ask((ip, TCP_PORT).into(), T).expect("tcp from lb"),
                        name
                    );
                    assert_eq!(
                        udp_ask((ip, UDP_PORT).into(), T).expect("udp from lb"),
                        name
                    );
                }
            }
        })
        .expect("run_in_ns");

        // From the client, through kernel forwarding in lb (no balancer program yet).
        lab.set_kernel_forwarding(true).expect("allow forwarding");
        let before = lab.kernel_forwarded_packets().expect("counter");
        run_in_ns(lab.client_ns(), move || {
            for (name, v4, v6) in targets {
                for ip in [IpAddr::V4(v4), IpAddr::V6(v6)] {
                    assert_eq!(tcp_ask((ip, TCP_PORT).into(), T).expect("tcp_ask"), name);
                    assert_eq!(udp_ask((ip, UDP_PORT).into(), T).expect("udp_ask"), name);
                    let (status, body) = http_get((ip, TCP_PORT).into(), "/", T).expect("http_get");
                    assert_eq!((status, body.trim()), (200, name.as_str()));
                }
            }
        })
        .expect("run_in_ns");
        assert!(lab.kernel_forwarded_packets().expect("counter") > before);
        lab.set_kernel_forwarding(false).expect("block forwarding");

        drop(lab);
        assert_eq!(
            namespaces_of(tag),
            Vec::<String>::new(),
            "namespaces left after drop"
        );
    }

    /// 10 MB, the size the DSR self-test downloads.
    const DOWNLOAD: u64 = 10_000_000;

    /// Downloads `len` bytes from the VIP's TCP port (v4 and v6) from the client.
    fn download_from_vips(lab: &Lab, len: u64) {
        run_in_ns(lab.client_ns(), move || {
            for ip in [IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6)] {
                let path = format!("{}{len}", backend_server::BYTES_PATH);
                let got = client::http_download(
                    (ip, services::VIP_TCP_PORT).into(),
                    &path,
                    Duration::from_secs(5),
                )
                .unwrap_or_else(|e| panic!("download of {len} bytes from {ip}: {e}"));
                assert_eq!(got, (200, len), "download from {ip}");
            }
        })
        .expect("run_in_ns");
    }

    /// What a backend's kernel says about its route from the VIP to the client.
    fn route_to_client(ns: &str, v6: bool) -> String {
        let (to, from) = if v6 {
            (CLIENT_V6.to_string(), VIP_V6.to_string())
        } else {
            (CLIENT_V4.to_string(), VIP_V4.to_string())
        };
        let out = netns::ip(&["-n", ns, "route", "get", &to, "from", &from]).expect("ip route get");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The DSR topology with kernel routing only (no XDP data plane): the
    /// balancer's kernel routes the VIPs to be1, be1 answers from the VIP
    /// straight to the client through `sw`, and `sw`'s "fragmentation needed"
    /// reaches be1 through the balancer once the client's link is narrower.
    #[test]
    fn dsr_lab_answers_bypass_the_balancer() {
        require_root();
        let opts = LabOptions::from_env(1).expect("lab options").with_dsr();
        let tag = "unitdsr";
        let mut lab = Lab::create(tag, opts).expect("creating the DSR lab");
        assert_eq!(namespaces_of(tag).len(), 4);
        assert_eq!(lab.return_path(), ReturnPath::Switch);
        let be1 = lab.backends()[0].clone();
        netns::ip_batch(
            lab.balancer_ns(),
            &[
                format!("route add {VIP_V4}/32 via {}", be1.v4),
                format!("route add {VIP_V6}/128 via {}", be1.v6),
            ],
        )
        .expect("routing the VIPs to be1");
        lab.set_kernel_forwarding(true).expect("allow forwarding");

        let before = lab.vip_reply_paths().expect("counters");
        run_in_ns(lab.client_ns(), move || {
            for ip in [IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6)] {
                let tcp = (ip, services::VIP_TCP_PORT).into();
                assert_eq!(tcp_ask(tcp, T).expect("TCP to the VIP"), "be1");
                // udp_ask refuses an answer from any address but the VIP asked.
                let udp = (ip, services::VIP_UDP_PORT).into();
                assert_eq!(udp_ask(udp, T).expect("UDP to the VIP"), "be1");
            }
        })
        .expect("run_in_ns");
        let after = lab.vip_reply_paths().expect("counters");
        assert!(
            after.via_switch >= before.via_switch + 8,
            "answers did not arrive on c1: {before:?} -> {after:?}"
        );
        assert_eq!(
            (after.via_balancer, after.balancer_lbb),
            (before.via_balancer, before.balancer_lbb),
            "answers went through the balancer"
        );

        download_from_vips(&lab, DOWNLOAD);
        for v6 in [false, true] {
            let route = route_to_client(&be1.ns, v6);
            assert!(
                route.contains(&format!(
                    "via {}",
                    if v6 {
                        SWITCH_BACKEND_V6.to_string()
                    } else {
                        SWITCH_BACKEND_V4.to_string()
                    }
                )),
                "{route}"
            );
            assert!(!route.contains("mtu 1280"), "{route}");
        }
        let after_download = lab.vip_reply_paths().expect("counters");
        assert_eq!(after_download.balancer_lbb, before.balancer_lbb);

        // A narrower client link: sw's ICMP errors to the VIP go to the
        // balancer, whose kernel route takes them to be1.
        lab.set_client_path_mtu(1280).expect("lower the MTU");
        download_from_vips(&lab, DOWNLOAD);
        for v6 in [false, true] {
            let route = route_to_client(&be1.ns, v6);
            assert!(
                route.contains("mtu 1280"),
                "be1 learnt no path MTU: {route}"
            );
        }

        // The same lab can route answers through the balancer again (NAT).
        lab.set_return_path(ReturnPath::Balancer)
            .expect("return via the balancer");
        let before = lab.vip_reply_paths().expect("counters");
        run_in_ns(lab.client_ns(), move || {
            tcp_ask((VIP_V4, services::VIP_TCP_PORT).into(), T)
        })
        .expect("run_in_ns")
        .expect("TCP to the VIP");
        let after = lab.vip_reply_paths().expect("counters");
        assert!(after.via_balancer > before.via_balancer, "{after:?}");
        assert_eq!(after.via_switch, before.via_switch);

        drop(lab);
        assert_eq!(
            namespaces_of(tag),
            Vec::<String>::new(),
            "namespaces left after drop"
        );
    }

    /// `with_client_path_mtu` builds the narrower link from the start.
    #[test]
    fn dsr_lab_with_a_client_path_mtu() {
        require_root();
        let opts = LabOptions::from_env(1)
            .expect("lab options")
            .with_client_path_mtu(1400);
        assert!(opts.dsr);
        let lab = Lab::create("unitmtu", opts).expect("creating the DSR lab");
        for (ns, iface) in [(lab.client_ns(), "c1"), (lab.switch_ns(), "swc")] {
            let out = netns::ip(&["-n", ns, "link", "show", "dev", iface]).expect("ip link");
            let text = String::from_utf8_lossy(&out.stdout);
            assert!(text.contains("mtu 1400"), "{iface}: {text}");
        }
        let be1 = lab.backends()[0].clone();
        netns::ip_batch(
            lab.balancer_ns(),
            &[
                format!("route add {VIP_V4}/32 via {}", be1.v4),
                format!("route add {VIP_V6}/128 via {}", be1.v6),
            ],
        )
        .expect("routing the VIPs to be1");
        lab.set_kernel_forwarding(true).expect("allow forwarding");
        download_from_vips(&lab, 1_000_000);
        assert!(route_to_client(&be1.ns, false).contains("mtu 1400"));
        assert!(
            Lab::create(
                "unitbad",
                LabOptions::from_env(1)
                    .expect("opts")
                    .with_client_path_mtu(1000)
            )
            .is_err()
        );
    }

    /// The cluster topology with BGP alone (no agents): what both nodes
    /// announce becomes one multipath route in the router; a withdrawal, a
    /// node unplugged (BFD) and a killed BIRD each take one next hop away,
    /// and it comes back; dropping the lab leaves no namespace, file or BIRD.
    #[test]
    fn cluster_lab_learns_the_vips_over_bgp() {
        require_root();
        let opts = LabOptions::from_env(1)
            .expect("lab options")
            .with_cluster(2);
        let tag = "unitclu";
        let mut lab = Lab::create(tag, opts).expect("creating the cluster lab");
        assert_eq!(namespaces_of(tag).len(), 5, "cli, lb, sw, lb2, be1");
        assert_eq!(lab.nodes().len(), 2);
        assert_eq!(lab.agent_interfaces(), ["lbb"]);
        let (v4, v6) = (IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6));
        let hops = |lab: &Lab, vip: IpAddr| {
            let mut h = lab.router_next_hops(vip).expect("router route");
            h.sort();
            h
        };
        assert!(
            hops(&lab, v4).is_empty(),
            "a static VIP route in the router"
        );
        for n in 1..=2 {
            lab.announce(n, &[v4, v6]).expect("announce");
        }
        for vip in [v4, v6] {
            lab.wait_router_next_hops(vip, 2, T * 5)
                .expect("two next hops");
        }
        assert_eq!(
            hops(&lab, v4),
            [cluster::node_v4(1), cluster::node_v4(2)].map(IpAddr::V4)
        );
        assert_eq!(
            hops(&lab, v6),
            [cluster::node_v6(1), cluster::node_v6(2)].map(IpAddr::V6)
        );
        let node2 = lab.node_protocols(2).expect("node 2's protocols");
        for name in [cluster::NODE_BGP_PROTOCOL, "lb_vips_v4", "lb_vips_v6"] {
            assert!(
                node2.iter().any(|p| p.name == name && p.state == "up"),
                "{name}: {node2:?}"
            );
        }
        let include = std::fs::read_to_string(lab.node_vips_include(2).unwrap()).unwrap();
        assert!(
            include.contains("route 198.18.100.1/32 blackhole;"),
            "{include}"
        );

        // Node 2 withdraws the IPv4 VIP only.
        lab.announce(2, &[v6]).expect("announce");
        lab.wait_router_next_hops(v4, 1, T).expect("withdrawn");
        assert_eq!(hops(&lab, v4), [IpAddr::V4(cluster::node_v4(1))]);
        assert_eq!(hops(&lab, v6).len(), 2);
        lab.announce(2, &[v4, v6]).expect("announce");
        lab.wait_router_next_hops(v4, 2, T)
            .expect("announced again");

        // Node 1 unplugged: BFD takes it out within a second.
        lab.disconnect_node(1).expect("disconnect");
        let took = lab.wait_router_next_hops(v4, 1, T).expect("withdrawn");
        assert!(took < Duration::from_secs(1), "withdrawn after {took:?}");
        assert_eq!(hops(&lab, v4), [IpAddr::V4(cluster::node_v4(2))]);
        lab.wait_router_next_hops(v6, 1, T).expect("v6 withdrawn");
        lab.reconnect_node(1).expect("reconnect");
        lab.wait_cluster_ready(Duration::from_secs(15))
            .expect("sessions back");
        lab.wait_router_next_hops(v4, 2, T).expect("node 1 back");

        // Node 2's BIRD killed: its session is reset at once; restarted, it
        // announces what its include file says.
        lab.kill_node_bird(2).expect("kill bird");
        lab.wait_router_next_hops(v4, 1, T).expect("withdrawn");
        lab.start_node_bird(2).expect("restart bird");
        lab.wait_router_next_hops(v4, 2, Duration::from_secs(15))
            .expect("node 2 back");

        let dir = lab.node(1).unwrap().dir.parent().unwrap().to_path_buf();
        let birds: Vec<u32> = lab.nodes().iter().filter_map(|n| n.bird_pid).collect();
        assert_eq!(birds.len(), 2);
        drop(lab);
        assert_eq!(namespaces_of(tag), Vec::<String>::new());
        assert!(!dir.exists(), "{} left after drop", dir.display());
        assert!(
            birds.iter().all(|&pid| !netns::pid_alive(pid)),
            "a BIRD survived the lab"
        );
    }

    #[test]
    fn host_addresses_follow_the_plan() {
        let (v4, v6, gw4, gw6) = host_addresses(1, HostLink::Switch);
        assert_eq!(
            (v4.to_string(), v6.to_string()),
            ("198.18.2.241".into(), "fd00:18:2::241".into())
        );
        assert_eq!((gw4, gw6), (BALANCER_BACKEND_V4, BALANCER_BACKEND_V6));
        let (v4, v6, gw4, gw6) = host_addresses(MAX_HOSTS, HostLink::Balancer);
        assert_eq!(v4.to_string(), "198.18.29.2");
        assert_eq!(v6.to_string(), "fd00:18:29::2");
        assert_eq!(
            (gw4.to_string(), gw6.to_string()),
            ("198.18.29.1".into(), "fd00:18:29::1".into())
        );
    }

    /// Hosts on the switch and on their own link answer the balancer, and go with the lab.
    #[test]
    fn lab_hosts_reach_the_balancer_and_are_removed() {
        require_root();
        let opts = LabOptions::from_env(0).expect("lab options");
        let tag = "unithost";
        let mut lab = Lab::create(tag, opts).expect("creating the lab");
        let on_switch = lab.add_host(HostLink::Switch).expect("host on the switch");
        let own_link = lab
            .add_host(HostLink::Balancer)
            .expect("host on its own link");
        assert_eq!(
            on_switch.ns,
            format!("lbl-{tag}-{}-host1", std::process::id())
        );
        assert_eq!(lab.hosts().len(), 2);
        // Each host serves the lab's line protocol; the balancer asks it.
        let mut servers = Vec::new();
        for (host, name) in [(&on_switch, "h1"), (&own_link, "h2")] {
            let args = backend_server_args(name, false);
            let program = lab.options().lb_bin.clone();
            let pid = lab
                .spawn_in_ns(&host.ns, &program, &args.to_args())
                .expect("server in the host");
            servers.push((pid, host.clone(), name));
        }
        for (pid, host, name) in servers {
            lab.wait_server_ready(pid, &host.ns, name)
                .expect("server ready");
            let targets = [
                SocketAddr::new(host.v4.into(), TCP_PORT),
                SocketAddr::new(host.v6.into(), TCP_PORT),
            ];
            let answers = run_in_ns(lab.balancer_ns(), move || {
                targets.map(|t| tcp_ask(t, T).expect("the balancer reaches the host"))
            })
            .expect("run_in_ns");
            assert_eq!(answers, [name, name]);
        }
        drop(lab);
        assert_eq!(
            namespaces_of(tag),
            Vec::<String>::new(),
            "namespaces left after drop"
        );
    }

    #[test]
    fn lab_is_removed_on_panic() {
        require_root();
        let opts = LabOptions::from_env(1).expect("lab options");
        let tag = "unitpanic";
        let result = std::panic::catch_unwind(move || {
            let _lab = Lab::create(tag, opts).expect("creating the lab");
            panic!("test panic while the lab is up");
        });
        assert!(result.is_err());
        assert_eq!(
            namespaces_of(tag),
            Vec::<String>::new(),
            "namespaces left after unwind"
        );
    }

    #[test]
    fn lab_manages_backend_servers() {
        require_root();
        let opts = LabOptions::from_env(1).expect("lab options");
        let tag = "unitsrv";
        let mut lab = Lab::create(tag, opts).expect("creating the lab");
        let index = lab.add_backend().expect("add_backend");
        assert_eq!(index, 2);
        let be2 = lab.backends()[1].clone();
        assert_eq!((be2.name.as_str(), be2.v4), ("be2", backend_v4(2)));
        let ask = |lab: &Lab, ip: Ipv4Addr| {
            run_in_ns(lab.balancer_ns(), move || {
                tcp_ask((ip, TCP_PORT).into(), Duration::from_millis(500))
            })
            .expect("run_in_ns")
        };
        assert_eq!(ask(&lab, be2.v4).expect("be2 answers"), "be2");

        let pid = be2.server_pid.expect("server pid");
        lab.stop_backend_server(2).expect("stop server");
        assert!(ask(&lab, be2.v4).is_err(), "stopped server still answers");
        assert_eq!(lab.stop(pid).expect("stop reaped pid"), None);
        lab.start_backend_server(2).expect("restart server");
        assert_eq!(ask(&lab, be2.v4).expect("be2 answers again"), "be2");

        let sleeper = lab
            .spawn_in_ns(&be2.ns, Path::new("sleep"), &["60".into()])
            .expect("spawn sleep");
        let status = lab.stop(sleeper).expect("stop sleep").expect("status");
        assert!(!status.success(), "sleep was terminated, not finished");
        assert!(lab.stop(1).is_err(), "pid 1 is not ours");

        drop(lab);
        assert_eq!(
            namespaces_of(tag),
            Vec::<String>::new(),
            "namespaces left after drop"
        );
    }
}
