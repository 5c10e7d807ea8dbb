//! Cluster labs ([`LabOptions::with_cluster`](super::LabOptions::with_cluster)):
//! several balancer nodes behind an ECMP router that learns the VIPs from
//! them over BGP, with BIRD 2 as the speaker in the router and in every
//! node. The topology is drawn in the module doc of [`super`].
//!
//! What BIRD runs with (numbers in [`BFD_INTERVAL`], [`BFD_MULTIPLIER`],
//! [`BGP_HOLD_TIME`], ...):
//!
//! - The router (`sw`, AS [`ROUTER_AS`]) has one eBGP session per node
//!   (protocol `lb{n}`, the node in AS [`NODE_AS`]), imports everything the
//!   nodes send and exports nothing to them; its `kernel` protocols have
//!   `merge paths on`, so equal routes from several nodes become one kernel
//!   multipath route, spread by the kernel's L4 hash
//!   (`fib_multipath_hash_policy=1`).
//! - Every node (protocol `uplink`) exports only the routes of the two static
//!   protocols [`VIPS_PROTOCOL_V4`] and [`VIPS_PROTOCOL_V6`], defined in the
//!   file [`Lab::node_vips_include`] that its `bird.conf` includes; the
//!   ipv6 channel rides the IPv4 session with the node's IPv6 address as
//!   next hop. `lb run` with `[bgp]` ([`node_bgp_config`]) writes that
//!   file and asks BIRD to `configure`; [`Lab::announce`] does the same
//!   without an agent.
//! - BFD on every session: 100 ms × 3, so a node that vanishes (link, host)
//!   is withdrawn in about 0.3 s; a hold time of 3 s (keepalive 1 s) if BFD
//!   itself fails. After a session error BIRD waits 1 s (at most 2 s) before
//!   it reconnects, and it retries a failed connect every second.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

use crate::bgp::bird::{self, Protocol};
use crate::config::{BgpConfig, DEFAULT_BGP_PROTOCOL};

use super::{
    CLIENT_V4, CLIENT_V6, Lab, SWITCH_BACKEND_MAC, SWITCH_BACKEND_V4, SWITCH_BACKEND_V6,
    SWITCH_CLIENT_V4, SWITCH_CLIENT_V6, VIP_PREFIX_V4, VIP_PREFIX_V6, neigh, netns,
};

/// Most balancer nodes a cluster lab holds (their addresses 198.18.2.{1,3..=10}
/// stay below the backends' 198.18.2.11 and up).
pub const MAX_CLUSTER_NODES: usize = 9;
/// The router's AS.
pub const ROUTER_AS: u32 = 65000;
/// Every node's AS.
pub const NODE_AS: u32 = 65001;
/// BFD transmit and receive interval on every session.
pub const BFD_INTERVAL: Duration = Duration::from_millis(100);
/// BFD packets missed before a session is declared down.
pub const BFD_MULTIPLIER: u32 = 3;
/// BGP hold time (the fallback if BFD itself fails; 3 s is BGP's minimum).
pub const BGP_HOLD_TIME: Duration = Duration::from_secs(3);
/// BGP keepalive interval.
pub const BGP_KEEPALIVE: Duration = Duration::from_secs(1);
/// Name of the file, in each node's directory, holding its VIP routes.
pub const VIPS_INCLUDE: &str = "lb-vips.conf";
/// The static protocol of a node's IPv4 VIP routes (the only routes its ipv4 channel exports).
pub const VIPS_PROTOCOL_V4: &str = "lb_vips_v4";
/// The static protocol of a node's IPv6 VIP routes (the only routes its ipv6 channel exports).
pub const VIPS_PROTOCOL_V6: &str = "lb_vips_v6";
/// A node's BGP protocol (its session to the router).
pub const NODE_BGP_PROTOCOL: &str = "uplink";
/// How long `create` waits for every BGP session and BFD session to come up.
pub const CLUSTER_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a started BIRD gets to answer on its control socket.
const BIRD_READY_TIMEOUT: Duration = Duration::from_secs(5);

/// Host part of node `n`'s addresses: 1 for node 1 (the lab's `lb`), then
/// 3, 4, ... (2 is the router).
fn node_host(n: usize) -> u8 {
    assert!(
        (1..=MAX_CLUSTER_NODES).contains(&n),
        "node index {n} out of 1..={MAX_CLUSTER_NODES}"
    );
    if n == 1 { 1 } else { (n + 1) as u8 }
}

/// IPv4 address of node `n`'s `lbb` (node 1: [`super::BALANCER_BACKEND_V4`]).
pub fn node_v4(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(198, 18, 2, node_host(n))
}

/// IPv6 address of node `n`'s `lbb`: `fd00:18:2::` and the decimal host part.
pub fn node_v6(n: usize) -> Ipv6Addr {
    super::segment_v6(node_host(n))
}

/// MAC address of node `n`'s `lbb`.
pub fn node_mac(n: usize) -> [u8; 6] {
    [0x02, 0x18, 0x02, 0x00, 0x00, node_host(n)]
}

/// One balancer node of a cluster lab.
#[derive(Clone, Debug)]
pub struct LabNode {
    /// 1-based index; node 1 is the lab's `lb` namespace.
    pub index: usize,
    /// `lb{index}`: its BGP protocol's name on the router, its directory's name.
    pub name: String,
    /// Namespace name.
    pub ns: String,
    /// IPv4 address of its `lbb` (its BGP session and next hop).
    pub v4: Ipv4Addr,
    /// IPv6 address of its `lbb` (the next hop of its IPv6 routes).
    pub v6: Ipv6Addr,
    /// MAC address of its `lbb`.
    pub mac: [u8; 6],
    /// The bridge port in `sw` its `lbb` is plugged into (`up`, `up2`, ...).
    pub switch_port: String,
    /// Its directory: `bird.conf`, `bird.ctl`, `bird.log`, [`VIPS_INCLUDE`],
    /// and the agent's socket [`Lab::node_socket`].
    pub dir: PathBuf,
    /// Pid of its BIRD while the lab runs one.
    pub bird_pid: Option<u32>,
}

impl LabNode {
    /// BIRD's control socket.
    pub fn bird_socket(&self) -> PathBuf {
        self.dir.join("bird.ctl")
    }

    /// The file of VIP routes its `bird.conf` includes.
    pub fn vips_include(&self) -> PathBuf {
        self.dir.join(VIPS_INCLUDE)
    }
}

/// One line of `birdc show bfd sessions`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BfdSession {
    /// The neighbour.
    pub peer: IpAddr,
    /// Interface.
    pub interface: String,
    /// `Up`, `Down`, `Init`, `AdminDown`.
    pub state: String,
}

/// The router's and the nodes' BGP timers (see the module doc).
fn bgp_timers() -> String {
    format!(
        "  hold time {}; keepalive time {};\n  connect delay time 1; connect retry time 1;\n  error wait time 1, 2; error forget time 10;\n  bfd on;\n",
        BGP_HOLD_TIME.as_secs(),
        BGP_KEEPALIVE.as_secs()
    )
}

/// `protocol bfd` on `interface`.
fn bfd_protocol(interface: &str) -> String {
    let ms = BFD_INTERVAL.as_millis();
    format!(
        "protocol bfd {{\n  interface \"{interface}\" {{ min rx interval {ms} ms; min tx interval {ms} ms; multiplier {BFD_MULTIPLIER}; }};\n}}\n"
    )
}

/// The router's `bird.conf`: one eBGP session per node, everything imported,
/// equal routes merged into kernel multipath routes.
pub fn router_bird_conf(nodes: &[(String, Ipv4Addr)], log: &Path) -> String {
    let mut out = format!(
        "# The lab router's BIRD (written by the namespace lab).\nrouter id {SWITCH_BACKEND_V4};\nlog \"{}\" all;\nprotocol device {{ }}\n",
        log.display()
    );
    out.push_str(&bfd_protocol("br0"));
    for (name, family) in [("kernel4", "ipv4"), ("kernel6", "ipv6")] {
        // merge paths: equal best routes from several nodes become one
        // multipath kernel route (ECMP).
        let _ = writeln!(
            out,
            "protocol kernel {name} {{\n  {family} {{ import none; export all; }};\n  merge paths on;\n}}"
        );
    }
    let _ = writeln!(
        out,
        "template bgp lb_node {{\n  local {SWITCH_BACKEND_V4} as {ROUTER_AS};\n{}  ipv4 {{ import all; export none; }};\n  ipv6 {{ import all; export none; }};\n}}",
        bgp_timers()
    );
    for (name, v4) in nodes {
        let _ = writeln!(
            out,
            "protocol bgp {name} from lb_node {{ neighbor {v4} as {NODE_AS}; }}"
        );
    }
    out
}

/// Node `n`'s `bird.conf`: one eBGP session to the router exporting only
/// the routes of [`VIPS_PROTOCOL_V4`]/[`VIPS_PROTOCOL_V6`], defined in `include`.
pub fn node_bird_conf(n: usize, include: &Path, log: &Path) -> String {
    let (v4, v6) = (node_v4(n), node_v6(n));
    let mut out = format!(
        "# BIRD of balancer node lb{n} (written by the namespace lab).\nrouter id {v4};\nlog \"{}\" all;\nprotocol device {{ }}\n",
        log.display()
    );
    out.push_str(&bfd_protocol("lbb"));
    let _ = writeln!(
        out,
        "# The VIP routes this node announces (protocols {VIPS_PROTOCOL_V4} and {VIPS_PROTOCOL_V6}).\ninclude \"{}\";",
        include.display()
    );
    // The ipv6 channel rides the IPv4 session; its next hop is named (BIRD
    // would take the global address of the session's interface anyway).
    let _ = writeln!(
        out,
        "protocol bgp {NODE_BGP_PROTOCOL} {{\n  local {v4} as {NODE_AS};\n  neighbor {SWITCH_BACKEND_V4} as {ROUTER_AS};\n{}  ipv4 {{ import none; export where proto = \"{VIPS_PROTOCOL_V4}\"; }};\n  ipv6 {{ import none; export where proto = \"{VIPS_PROTOCOL_V6}\"; next hop address {v6}; }};\n}}",
        bgp_timers()
    );
    out
}

/// Parses `birdc show bfd sessions` output.
pub fn parse_bfd_sessions(text: &str) -> Vec<BfdSession> {
    text.lines()
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            Some(BfdSession {
                peer: words.first()?.parse().ok()?,
                interface: words.get(1)?.to_string(),
                state: words.get(2)?.to_string(),
            })
        })
        .collect()
}

/// The gateways of the route to exactly `dst` in `ip -j route show` output
/// (one for a plain route, each `nexthops` entry's for a multipath one).
pub fn parse_route_gateways(json: &str, dst: IpAddr) -> Result<Vec<IpAddr>> {
    let routes: Vec<serde_json::Value> =
        serde_json::from_str(json).with_context(|| format!("parsing ip -j route: {json}"))?;
    let want = dst.to_string();
    let Some(route) = routes
        .iter()
        .find(|r| r.get("dst").and_then(|d| d.as_str()) == Some(&want))
    else {
        return Ok(Vec::new());
    };
    let gateway = |v: &serde_json::Value| -> Result<IpAddr> {
        v.get("gateway")
            .and_then(|g| g.as_str())
            .ok_or_else(|| anyhow!("route to {dst} without a gateway: {v}"))?
            .parse()
            .with_context(|| format!("gateway of the route to {dst}"))
    };
    match route.get("nexthops").and_then(|n| n.as_array()) {
        Some(hops) => hops.iter().map(gateway).collect(),
        None => Ok(vec![gateway(route)?]),
    }
}

/// Finds an administration binary (`bird`, `birdc`) on PATH or in the sbin directories.
fn find_program(name: &str) -> Result<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin"].map(PathBuf::from))
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            anyhow!("{name} not found: install BIRD 2 (Debian's bird2; `cargo xtask setup`)")
        })
}

/// The text of BIRD's answer to `command` on `socket`.
pub fn birdc(socket: &Path, command: &str) -> Result<String> {
    Ok(bird::text(&bird::command(socket, command)?))
}

/// The protocols of the BIRD behind `socket`.
pub fn bird_protocols(socket: &Path) -> Result<Vec<Protocol>> {
    Ok(bird::show_protocols(socket)?)
}

/// The `[bgp]` table of a node's `lb.toml` (what [`node_bgp_config`] parses from).
pub fn node_bgp_table(node: &LabNode) -> String {
    format!(
        "\n[bgp]\nbird_socket = \"{}\"\ninclude_file = \"{}\"\n",
        node.bird_socket().display(),
        node.vips_include().display()
    )
}

/// The `[bgp]` settings of a node's agent, as the lab's BIRD expects them.
pub fn node_bgp_config(node: &LabNode) -> BgpConfig {
    BgpConfig {
        bird_socket: node.bird_socket(),
        include_file: node.vips_include(),
        protocol: DEFAULT_BGP_PROTOCOL.to_string(),
        line: 0,
    }
}

/// The last lines of a file (BIRD's log, for an error message).
fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

impl Lab {
    /// Turns a built DSR lab into a cluster: ECMP in `sw`, the client's VIP
    /// routes through `sw`, nodes 2.. on the bridge, and BIRD everywhere;
    /// returns once every BGP and BFD session is up.
    pub(super) fn build_cluster(&mut self) -> Result<()> {
        let cli = self.client_ns().to_string();
        let sw = self.switch_ns().to_string();
        let dir = std::env::temp_dir().join(format!("{}-files", self.prefix));
        // A previous process with the same pid may have left it.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        self.dir = Some(dir.clone());

        // ECMP by the L4 hash (addresses, protocol, ports), both families.
        netns::sysctls_in(
            &sw,
            &[
                ("net.ipv4.fib_multipath_hash_policy", "1"),
                ("net.ipv6.fib_multipath_hash_policy", "1"),
            ],
        )?;
        // The client reaches the VIPs through the router, from its usual address.
        netns::ip_batch(
            &cli,
            &[
                format!("route add {VIP_PREFIX_V4} via {SWITCH_CLIENT_V4} dev c1 src {CLIENT_V4}"),
                format!("route add {VIP_PREFIX_V6} via {SWITCH_CLIENT_V6} dev c1 src {CLIENT_V6}"),
            ],
        )?;
        // Its packets reach the nodes' XDP, as c0's do in the other labs.
        netns::full_tx_checksums(&cli, "c1")?;

        for n in 1..=self.opts.cluster_nodes {
            let name = format!("lb{n}");
            let (ns, port) = if n == 1 {
                (self.balancer_ns().to_string(), "up".to_string())
            } else {
                self.add_node_namespace(n)?
            };
            netns::ip_batch(
                &ns,
                &[
                    neigh(SWITCH_BACKEND_V4, SWITCH_BACKEND_MAC, "lbb"),
                    neigh(SWITCH_BACKEND_V6, SWITCH_BACKEND_MAC, "lbb"),
                    // Toward clients (ICMP errors the data plane answers) via the router.
                    format!("route add default via {SWITCH_BACKEND_V4}"),
                    format!("route add default via {SWITCH_BACKEND_V6}"),
                ],
            )?;
            netns::ip_batch(
                &sw,
                &[
                    neigh(node_v4(n), node_mac(n), "br0"),
                    neigh(node_v6(n), node_mac(n), "br0"),
                ],
            )?;
            let node_dir = dir.join(&name);
            std::fs::create_dir_all(&node_dir)
                .with_context(|| format!("creating {}", node_dir.display()))?;
            let node = LabNode {
                index: n,
                name,
                ns,
                v4: node_v4(n),
                v6: node_v6(n),
                mac: node_mac(n),
                switch_port: port,
                dir: node_dir,
                bird_pid: None,
            };
            // BIRD refuses to start on a missing include: an empty one first.
            crate::bgp::write_include(&node_bgp_config(&node), &[]).map_err(|e| anyhow!(e))?;
            std::fs::write(
                node.dir.join("bird.conf"),
                node_bird_conf(n, &node.vips_include(), &node.dir.join("bird.log")),
            )?;
            self.nodes.push(node);
        }

        let router_dir = dir.join("sw");
        std::fs::create_dir_all(&router_dir)?;
        let peers: Vec<(String, Ipv4Addr)> =
            self.nodes.iter().map(|n| (n.name.clone(), n.v4)).collect();
        std::fs::write(
            router_dir.join("bird.conf"),
            router_bird_conf(&peers, &router_dir.join("bird.log")),
        )?;
        // Tracked like every lab process (stopped on drop), by pid.
        self.start_bird(&sw, &router_dir)?;
        for n in 1..=self.nodes.len() {
            self.start_node_bird(n)?;
        }
        self.wait_cluster_ready(CLUSTER_READY_TIMEOUT)?;
        Ok(())
    }

    /// Node `n` (2..): its namespace, its `lbb` plugged into the bridge as
    /// `up{n}` (with the pass program there), addresses, forwarding, and the
    /// guard and counters node 1 has. Returns the namespace and port.
    fn add_node_namespace(&mut self, n: usize) -> Result<(String, String)> {
        let ns = self.add_namespace(&format!("lb{n}"), &super::CHURN_SYSCTLS)?;
        let sw = self.switch_ns().to_string();
        let port = format!("up{n}");
        netns::veth(("lbb", &ns, Some(node_mac(n))), (&port, &sw, None))?;
        netns::ip_batch(
            &sw,
            &[
                format!("link set dev {port} master br0"),
                format!("link set dev {port} up"),
            ],
        )?;
        netns::ip_batch(
            &ns,
            &[
                "link set lo up".into(),
                format!("addr add {}/24 dev lbb", node_v4(n)),
                format!("addr add {}/64 dev lbb nodad", node_v6(n)),
                "link set lbb up".into(),
            ],
        )?;
        netns::sysctls_in(&ns, &super::FORWARDING_SYSCTLS)?;
        netns::nft_in(&ns, &super::guard_ruleset(false))?;
        netns::nft_in(&ns, &super::balancer_paths_ruleset())?;
        // (Backends come later: `add_backend` gives every node their neighbour entries.)
        // XDP_TX out of lbb only arrives if the peer runs XDP.
        self.attach_pass(&sw, &port)?;
        Ok((ns, port))
    }

    /// Starts `bird -f` in `ns` with `dir/bird.conf`, its socket and pid file
    /// in `dir`, tracked like every lab process; waits until it answers.
    fn start_bird(&mut self, ns: &str, dir: &Path) -> Result<u32> {
        let socket = dir.join("bird.ctl");
        let _ = std::fs::remove_file(&socket);
        let bird = find_program("bird")?;
        let pid = self.spawn_in_ns(
            ns,
            &bird,
            &[
                "-f".into(),
                "-c".into(),
                dir.join("bird.conf").into(),
                "-s".into(),
                socket.clone().into(),
                "-P".into(),
                dir.join("bird.pid").into(),
            ],
        )?;
        let deadline = Instant::now() + BIRD_READY_TIMEOUT;
        loop {
            if let Some(status) = self.try_wait(pid)? {
                bail!(
                    "bird in {ns} exited ({status}); its log:\n{}",
                    tail(&dir.join("bird.log"), 20)
                );
            }
            if socket.exists()
                && birdc(&socket, "show status")
                    .is_ok_and(|s| s.contains("Daemon is up and running"))
            {
                return Ok(pid);
            }
            if Instant::now() > deadline {
                bail!("bird in {ns} did not answer within {BIRD_READY_TIMEOUT:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Cluster labs: every balancer node, node 1 (the `lb` namespace) first.
    pub fn nodes(&self) -> &[LabNode] {
        &self.nodes
    }

    /// Cluster labs: node `n` (1-based).
    pub fn node(&self, n: usize) -> Result<&LabNode> {
        if self.nodes.is_empty() {
            bail!("this lab has no cluster (LabOptions::with_cluster)");
        }
        self.nodes
            .get(n.wrapping_sub(1))
            .ok_or_else(|| anyhow!("no node {n} in this lab ({} nodes)", self.nodes.len()))
    }

    /// Namespace of node `n`; node 1 is the balancer namespace of every lab.
    pub fn node_ns(&self, n: usize) -> Result<String> {
        if n == 1 {
            return Ok(self.balancer_ns().to_string());
        }
        Ok(self.node(n)?.ns.clone())
    }

    /// Where node `n`'s agent pins its maps and attachments (bpffs is one for
    /// all namespaces, so each node needs its own); node 1's is [`Lab::agent_pin_dir`].
    pub fn node_pin_dir(&self, n: usize) -> Result<PathBuf> {
        Ok(Path::new(crate::dataplane::pin::BPFFS)
            .join("lb")
            .join(self.node_ns(n)?))
    }

    /// Cluster labs: the control socket for node `n`'s agent (in its directory).
    pub fn node_socket(&self, n: usize) -> Result<PathBuf> {
        Ok(self.node(n)?.dir.join("lb.sock"))
    }

    /// Cluster labs: node `n`'s BIRD control socket.
    pub fn node_bird_socket(&self, n: usize) -> Result<PathBuf> {
        Ok(self.node(n)?.bird_socket())
    }

    /// Cluster labs: the file of VIP routes node `n`'s `bird.conf` includes.
    pub fn node_vips_include(&self, n: usize) -> Result<PathBuf> {
        Ok(self.node(n)?.vips_include())
    }

    /// Cluster labs: the router's BIRD control socket.
    pub fn router_bird_socket(&self) -> Result<PathBuf> {
        let dir = self
            .dir
            .as_ref()
            .filter(|_| !self.nodes.is_empty())
            .ok_or_else(|| anyhow!("this lab has no cluster (LabOptions::with_cluster)"))?;
        Ok(dir.join("sw").join("bird.ctl"))
    }

    /// Cluster labs: makes node `n` announce exactly `vips` (an empty list
    /// withdraws all) without an agent, as `lb run` with `[bgp]` does.
    pub fn announce(&self, n: usize, vips: &[IpAddr]) -> Result<()> {
        let node = self.node(n)?;
        crate::bgp::apply(&node_bgp_config(node), vips)
            .map_err(|e| anyhow!("BIRD of {}: {e}", node.name))
    }

    /// Cluster labs: the next hops of the router's kernel route to `vip`
    /// (`ip -j route show VIP/32|128` in `sw`); empty without a route.
    pub fn router_next_hops(&self, vip: IpAddr) -> Result<Vec<IpAddr>> {
        let family = if vip.is_ipv4() { "-4" } else { "-6" };
        let prefix = format!("{vip}/{}", if vip.is_ipv4() { 32 } else { 128 });
        let out = netns::ip(&[
            "-n",
            self.switch_ns(),
            family,
            "-j",
            "route",
            "show",
            &prefix,
        ])?;
        parse_route_gateways(&String::from_utf8_lossy(&out.stdout), vip)
    }

    /// Polls (every 5 ms) until the router's route to `vip` has `count` next
    /// hops; returns how long that took.
    pub fn wait_router_next_hops(
        &self,
        vip: IpAddr,
        count: usize,
        timeout: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let hops = self.router_next_hops(vip)?;
            if hops.len() == count {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the router's route to {vip} has next hops {hops:?}, not {count}, after {timeout:?}"
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Cluster labs: the router's protocols (`birdc show protocols`).
    pub fn router_protocols(&self) -> Result<Vec<Protocol>> {
        bird_protocols(&self.router_bird_socket()?)
    }

    /// Cluster labs: node `n`'s protocols (`birdc show protocols`).
    pub fn node_protocols(&self, n: usize) -> Result<Vec<Protocol>> {
        bird_protocols(&self.node_bird_socket(n)?)
    }

    /// Cluster labs: the router's BFD sessions.
    pub fn router_bfd_sessions(&self) -> Result<Vec<BfdSession>> {
        Ok(parse_bfd_sessions(&birdc(
            &self.router_bird_socket()?,
            "show bfd sessions",
        )?))
    }

    /// Whether the router has every node's BGP session Established and its
    /// BFD session Up.
    pub fn cluster_ready(&self) -> Result<bool> {
        let protocols = self.router_protocols()?;
        let bfd = self.router_bfd_sessions()?;
        Ok(self.nodes.iter().all(|node| {
            protocols
                .iter()
                .any(|p| p.name == node.name && p.is_established())
                && bfd
                    .iter()
                    .any(|s| s.peer == IpAddr::V4(node.v4) && s.state == "Up")
        }))
    }

    /// Polls until [`Lab::cluster_ready`]; returns how long that took.
    pub fn wait_cluster_ready(&self, timeout: Duration) -> Result<Duration> {
        let start = Instant::now();
        loop {
            if self.cluster_ready()? {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "BGP/BFD not up after {timeout:?}: {:?} {:?}",
                    self.router_protocols()?,
                    self.router_bfd_sessions()?
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Cluster labs: takes node `n` away abruptly, as a cable pulled at the
    /// switch: its bridge port goes down, both ends lose carrier, and only
    /// BFD (or the hold time) tells the router. The node's processes run on.
    pub fn disconnect_node(&self, n: usize) -> Result<()> {
        let port = self.node(n)?.switch_port.clone();
        netns::ip_batch(self.switch_ns(), &[format!("link set dev {port} down")])
    }

    /// Cluster labs: plugs node `n` back in (its sessions come back by themselves).
    pub fn reconnect_node(&self, n: usize) -> Result<()> {
        let port = self.node(n)?.switch_port.clone();
        netns::ip_batch(self.switch_ns(), &[format!("link set dev {port} up")])
    }

    /// Cluster labs: kills node `n`'s BIRD with SIGKILL (a crash: its TCP
    /// session is reset by the kernel, so the router notices at once).
    pub fn kill_node_bird(&mut self, n: usize) -> Result<()> {
        let pos = self.node(n)?.index - 1;
        match self.nodes[pos].bird_pid.take() {
            Some(pid) => self.kill_child(pid),
            None => Ok(()),
        }
    }

    /// Cluster labs: starts node `n`'s BIRD (no-op if it runs) with its
    /// current include file, and waits until it answers.
    pub fn start_node_bird(&mut self, n: usize) -> Result<()> {
        let node = self.node(n)?.clone();
        if let Some(pid) = node.bird_pid
            && self.try_wait(pid)?.is_none()
        {
            return Ok(());
        }
        let pid = self.start_bird(&node.ns, &node.dir)?;
        self.nodes[node.index - 1].bird_pid = Some(pid);
        Ok(())
    }

    /// Packets the kernel of node `n` tried to forward (and the guard dropped).
    pub fn node_kernel_forwarded_packets(&self, n: usize) -> Result<u64> {
        self.kernel_forwarded_packets_in(&self.node_ns(n)?)
    }
}

#[cfg(test)]
mod tests {
    use super::super::{BALANCER_BACKEND_MAC, BALANCER_BACKEND_V4, BALANCER_BACKEND_V6};
    use super::*;

    #[test]
    fn node_addresses_follow_the_plan() {
        assert_eq!(node_v4(1), BALANCER_BACKEND_V4);
        assert_eq!(node_v6(1), BALANCER_BACKEND_V6);
        assert_eq!(node_mac(1), BALANCER_BACKEND_MAC);
        assert_eq!(node_v4(2), Ipv4Addr::new(198, 18, 2, 3));
        assert_eq!(node_v6(2).to_string(), "fd00:18:2::3");
        assert_eq!(node_v4(MAX_CLUSTER_NODES), Ipv4Addr::new(198, 18, 2, 10));
        assert_eq!(node_v6(MAX_CLUSTER_NODES).to_string(), "fd00:18:2::10");
        // Below every backend, and not the router.
        assert!(node_v4(MAX_CLUSTER_NODES) < super::super::backend_v4(1));
        assert!((1..=MAX_CLUSTER_NODES).all(|n| node_v4(n) != SWITCH_BACKEND_V4));
    }

    #[test]
    fn bird_configs_hold_the_contract() {
        let node = node_bird_conf(
            2,
            Path::new("/d/lb2/lb-vips.conf"),
            Path::new("/d/bird.log"),
        );
        for want in [
            "router id 198.18.2.3;",
            "include \"/d/lb2/lb-vips.conf\";",
            "local 198.18.2.3 as 65001;",
            "neighbor 198.18.2.2 as 65000;",
            "export where proto = \"lb_vips_v4\";",
            "export where proto = \"lb_vips_v6\"; next hop address fd00:18:2::3;",
            "interface \"lbb\" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };",
            "hold time 3; keepalive time 1;",
            "bfd on;",
        ] {
            assert!(node.contains(want), "{want} missing from:\n{node}");
        }
        let router = router_bird_conf(
            &[("lb1".into(), node_v4(1)), ("lb2".into(), node_v4(2))],
            Path::new("/d/bird.log"),
        );
        for want in [
            "merge paths on;",
            "protocol bgp lb1 from lb_node { neighbor 198.18.2.1 as 65001; }",
            "protocol bgp lb2 from lb_node { neighbor 198.18.2.3 as 65001; }",
            "ipv4 { import all; export none; };",
            "interface \"br0\"",
        ] {
            assert!(router.contains(want), "{want} missing from:\n{router}");
        }
    }

    /// Both files parse with the installed BIRD (`bird -p`), include and all.
    #[test]
    fn bird_accepts_the_configs() {
        let Ok(bird) = find_program("bird") else {
            panic!("bird is not installed (Debian's bird2; `cargo xtask setup`)");
        };
        let dir = std::env::temp_dir().join(format!("lb-birdconf-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let include = dir.join(VIPS_INCLUDE);
        std::fs::write(
            &include,
            crate::bgp::render(DEFAULT_BGP_PROTOCOL, &[IpAddr::V4(super::super::VIP_V4)]),
        )
        .unwrap();
        let configs = [
            node_bird_conf(1, &include, &dir.join("bird.log")),
            router_bird_conf(&[("lb1".into(), node_v4(1))], &dir.join("bird.log")),
        ];
        for (i, text) in configs.iter().enumerate() {
            let path = dir.join(format!("bird{i}.conf"));
            std::fs::write(&path, text).unwrap();
            let out = std::process::Command::new(&bird)
                .arg("-p")
                .arg("-c")
                .arg(&path)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{text}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn parses_bfd_sessions_output() {
        let bfd = "BIRD 2.0.12 ready.\nbfd1:\nIP address                Interface  State      Since         Interval  Timeout\n198.18.2.1                br0        Up         07:28:55.521    0.100    0.300\n198.18.2.3                br0        Down       07:28:55.521    1.000    0.000\n";
        let s = parse_bfd_sessions(bfd);
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].peer, IpAddr::V4(node_v4(1)));
        assert_eq!(
            (s[0].interface.as_str(), s[0].state.as_str()),
            ("br0", "Up")
        );
        assert_eq!(s[1].state, "Down");
    }

    #[test]
    fn parses_route_gateways() {
        let vip: IpAddr = "198.18.100.1".parse().unwrap();
        let multi = r#"[{"dst":"198.18.100.1","protocol":"bird","metric":32,"flags":[],"nexthops":[{"gateway":"198.18.2.1","dev":"br0","weight":1,"flags":[]},{"gateway":"198.18.2.3","dev":"br0","weight":1,"flags":[]}]}]"#;
        assert_eq!(
            parse_route_gateways(multi, vip).unwrap(),
            [node_v4(1), node_v4(2)].map(IpAddr::V4)
        );
        let single = r#"[{"dst":"198.18.100.1","gateway":"198.18.2.3","dev":"br0","protocol":"bird","metric":32,"flags":[]}]"#;
        assert_eq!(
            parse_route_gateways(single, vip).unwrap(),
            [IpAddr::V4(node_v4(2))]
        );
        assert!(parse_route_gateways("[]", vip).unwrap().is_empty());
        assert!(parse_route_gateways("nonsense", vip).is_err());
    }
}
