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

pub mod backend_server;
pub mod client;
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

pub use netns::{list_ns, run_in_ns, sweep_stale};

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
/// Most backends a lab holds (their host part `10 + i` must stay a valid address).
pub const MAX_BACKENDS: usize = 200;
/// How long `create`/`add_backend`/`start_backend_server` wait for a server to answer.
pub const SERVER_READY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `stop` waits after SIGTERM before SIGKILL.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

/// Name of the nftables table in `lb` that blocks kernel forwarding.
const GUARD_TABLE: &str = "lbguard";
/// Name of the nftables counter of packets the kernel tried to forward.
const GUARD_COUNTER: &str = "kernel_forwarded";

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

/// IPv6 address of backend `i` (1-based): `fd00:18:2::` followed by the decimal digits of 10+i.
pub fn backend_v6(i: usize) -> Ipv6Addr {
    // The decimal digits are reused as hex digits so the text reads like the v4 host part.
    let segment = backend_host(i)
        .to_string()
        .bytes()
        .fold(0u16, |acc, d| acc * 16 + u16::from(d - b'0'));
    Ipv6Addr::new(0xfd00, 0x18, 0x2, 0, 0, 0, 0, segment)
}

/// MAC address of backend `i` (1-based): 02:18:02:00:00:{10+i in hex}.
pub fn backend_mac(i: usize) -> [u8; 6] {
    [0x02, 0x18, 0x02, 0x00, 0x00, backend_host(i)]
}

/// Formats a MAC address the way `ip` expects it.
fn mac_str(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
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
        format!(
            "neigh replace {CLIENT_V4} lladdr {} dev lbc nud permanent",
            mac_str(CLIENT_MAC)
        ),
        format!(
            "neigh replace {CLIENT_V6} lladdr {} dev lbc nud permanent",
            mac_str(CLIENT_MAC)
        ),
    ]
}

/// `ip` commands for the balancer's permanent neighbour entries of backend `i`.
pub(crate) fn backend_neighbour_commands(i: usize) -> [String; 2] {
    let mac = mac_str(backend_mac(i));
    [
        format!(
            "neigh replace {} lladdr {mac} dev lbb nud permanent",
            backend_v4(i)
        ),
        format!(
            "neigh replace {} lladdr {mac} dev lbb nud permanent",
            backend_v6(i)
        ),
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
        })
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
        let backends = opts.backends;
        let mut lab = Lab {
            prefix: format!("{}{tag}-{}", netns::NS_PREFIX, std::process::id()),
            opts,
            namespaces: Vec::new(),
            backends: Vec::new(),
            children: HashMap::new(),
            reaped: HashMap::new(),
            xdp: Vec::new(),
        };
        // Any `?` below drops `lab`, which removes whatever was built so far.
        lab.build_core().context("building the lab")?;
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
        // generators, proxies): the whole port range, and TIME_WAIT ports
        // reused, as on any load-generating host; otherwise a few seconds of
        // new connections exhaust the ~28k default ports for a minute.
        let churn = [
            ("net.ipv4.ip_local_port_range", "1024 65535"),
            ("net.ipv4.tcp_tw_reuse", "1"),
        ];
        let cli = self.add_namespace("cli", &churn)?;
        let lb = self.add_namespace("lb", &churn)?;
        // The switch is pure L2; without IPv6 its ports send no MLD/RS noise.
        let sw = self.add_namespace(
            "sw",
            &[
                ("net.ipv6.conf.all.disable_ipv6", "1"),
                ("net.ipv6.conf.default.disable_ipv6", "1"),
            ],
        )?;

        // Created straight inside the namespaces, so no name ever exists in the root namespace.
        netns::ip(&[
            "link",
            "add",
            "c0",
            "netns",
            &cli,
            "address",
            &mac_str(CLIENT_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "lbc",
            "netns",
            &lb,
            "address",
            &mac_str(BALANCER_CLIENT_MAC),
        ])?;
        netns::ip(&[
            "link",
            "add",
            "lbb",
            "netns",
            &lb,
            "address",
            &mac_str(BALANCER_BACKEND_MAC),
            "type",
            "veth",
            "peer",
            "name",
            "up",
            "netns",
            &sw,
        ])?;

        netns::ip_batch(
            &cli,
            &[
                "link set lo up".into(),
                format!("addr add {CLIENT_V4}/24 dev c0"),
                format!("addr add {CLIENT_V6}/64 dev c0 nodad"),
                "link set c0 up".into(),
                format!("route add default via {BALANCER_CLIENT_V4}"),
                format!("route add default via {BALANCER_CLIENT_V6}"),
                format!(
                    "neigh replace {BALANCER_CLIENT_V4} lladdr {} dev c0 nud permanent",
                    mac_str(BALANCER_CLIENT_MAC)
                ),
                format!(
                    "neigh replace {BALANCER_CLIENT_V6} lladdr {} dev c0 nud permanent",
                    mac_str(BALANCER_CLIENT_MAC)
                ),
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
        netns::sysctls_in(
            &lb,
            &[
                ("net.ipv4.ip_forward", "1"),
                ("net.ipv6.conf.all.forwarding", "1"),
                ("net.ipv6.conf.default.forwarding", "1"),
            ],
        )?;
        netns::nft_in(&lb, &guard_ruleset(false))?;

        netns::full_tx_checksums(&cli, "c0")?;
        // XDP_TX/REDIRECT frames out of a veth only arrive if the peer runs XDP too.
        self.attach_pass(&cli, "c0")?;
        self.attach_pass(&sw, "up")?;
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
        let Some(attached) = xdp_prog_id(ns, iface)? else {
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
        let ns = self.add_namespace(&name, &[])?;
        let port = format!("p{index}");
        let sw = self.switch_ns().to_string();
        netns::ip(&[
            "link",
            "add",
            "eth0",
            "netns",
            &ns,
            "address",
            &mac_str(mac),
            "type",
            "veth",
            "peer",
            "name",
            &port,
            "netns",
            &sw,
        ])?;
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
        netns::full_tx_checksums(&ns, "eth0")?;
        let lb = self.balancer_ns().to_string();
        // Permanent, so bpf_fib_lookup always finds the next hop without waiting for ARP/ND.
        netns::ip_batch(&lb, &backend_neighbour_commands(index))?;
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
        let Some(pid) = self.backends[pos].server_pid.take() else {
            return Ok(());
        };
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
        let args = BackendArgs {
            name: backend.name.clone(),
            tcp: vec![
                (Ipv4Addr::UNSPECIFIED, TCP_PORT).into(),
                (Ipv6Addr::UNSPECIFIED, TCP_PORT).into(),
            ],
            udp: vec![
                (Ipv4Addr::UNSPECIFIED, UDP_PORT).into(),
                (Ipv6Addr::UNSPECIFIED, UDP_PORT).into(),
            ],
        };
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
            let ready = run_in_ns(ns, move || probe_server(&expected))??;
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
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
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
        let ns = self.balancer_ns().to_string();
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
        let text = netns::nft_output(
            self.balancer_ns(),
            &["list", "counter", "inet", GUARD_TABLE, GUARD_COUNTER],
        )?;
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

/// Id of the XDP program attached to `iface` in `ns`, if any (from `ip -j -d link`).
fn xdp_prog_id(ns: &str, iface: &str) -> Result<Option<u32>> {
    let out = netns::ip(&["-n", ns, "-j", "-d", "link", "show", "dev", iface])?;
    let links: serde_json::Value =
        serde_json::from_slice(&out.stdout).context("parsing `ip -j link` output")?;
    let id = links
        .get(0)
        .and_then(|l| l.get("xdp"))
        .and_then(|x| x.get("prog"))
        .and_then(|p| p.get("id"))
        .and_then(serde_json::Value::as_u64);
    Ok(id.and_then(|id| u32::try_from(id).ok()))
}

/// One readiness probe from inside a backend namespace: TCP and UDP, v4 and v6, over loopback.
fn probe_server(expected: &str) -> Result<bool> {
    let t = Duration::from_millis(200);
    for ip in [
        IpAddr::V4(Ipv4Addr::LOCALHOST),
        IpAddr::V6(Ipv6Addr::LOCALHOST),
    ] {
        let tcp = match client::tcp_ask(SocketAddr::new(ip, TCP_PORT), t) {
            Ok(name) => name,
            Err(_) => return Ok(false),
        };
        let udp = match client::udp_ask(SocketAddr::new(ip, UDP_PORT), t) {
            Ok(name) => name,
            Err(_) => return Ok(false),
        };
        if tcp != expected || udp != expected {
            bail!("a server answers as {tcp:?}/{udp:?}, expected {expected:?}");
        }
    }
    Ok(true)
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
        if let Err(e) = crate::dataplane::pin::remove_all(&self.agent_pin_dir()) {
            tracing::warn!("removing the agent's pins: {e:#}");
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
