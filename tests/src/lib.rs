//! Support for the end-to-end and packet-level tests: running the loaded XDP
//! program on crafted frames, and checking frames with an independent parser.
//!
//! # Layout
//!
//! - This file: the packet-level fixture (`with_fixture`, `run_xdp`,
//!   checksum checks), `RunningLab` / `RunningCluster` (the namespace lab
//!   with `lb run` in it, as users run it), `tally` and `wait_for`.
//! - `frames`: the frame builder (`Frame`) and constants the packet-level
//!   tests (packet, icmp, dsr, decap) share.
//! - `cluster`: the prober of long-lived connections the cluster tests and
//!   bench share.
//! - `l4bench`, `l7bench`, `l7instr`, `l7mem`, `clusterbench`: the sections
//!   of `lb-bench` (`src/bin/lb-bench.rs`, run by `cargo xtask bench`).
//! - `tests/*.rs`: one file per area (packet, icmp, dsr, decap, e2e,
//!   dsr_e2e, runtime, cli, l7, bgp, cluster, discovery, admin, top); what each covers
//!   is in `TESTS.md`.
// Functions stay short enough to read at once (threshold in clippy.toml);
// tests, which read as one scenario each, are exempt.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

use anyhow::{Context, Result};
use aya::programs::{TestRun, TestRunOptions};
use etherparse::{NetSlice, SlicedPacket, TransportSlice};
use lb_userspace::{balancer::Balancer, config, dataplane::Dataplane, lab::services::Forwarding};

/// Loads the `lb-xdp` object and applies a config given as TOML text.
pub fn balancer_with(config_text: &str) -> Result<Balancer> {
    let object = lb_userspace::dataplane::default_object_path()?;
    let config = config::parse(config_text, "test.toml").map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut balancer = Balancer::new(Dataplane::load(&object)?);
    balancer.apply(&config)?;
    Ok(balancer)
}

/// The kernel's `struct xdp_md` as BPF_PROG_TEST_RUN takes it: the frame
/// starts at 0, ends at `len`, and arrived on `ingress_ifindex`.
pub fn xdp_md(ingress_ifindex: u32, len: usize) -> [u8; 24] {
    let mut md = [0u8; 24];
    md[4..8].copy_from_slice(&(len as u32).to_ne_bytes());
    md[12..16].copy_from_slice(&ingress_ifindex.to_ne_bytes());
    md
}

/// Each of `frames` (what, frame, ingress) through the full program
/// (`forwarded_alike`), then, with it taken out of `PROGS`, through the
/// attached program's hit path alone: redirected with the same bytes.
pub fn assert_hit_path_forwards_alike(b: &mut Balancer, frames: &[(&str, &[u8], u32)]) {
    let full: Vec<Vec<u8>> = frames
        .iter()
        .map(|(what, frame, ingress)| forwarded_alike(b, frame, *ingress, what))
        .collect();
    b.dataplane().unload_full_program().expect("emptying PROGS");
    for ((what, frame, ingress), full) in frames.iter().zip(&full) {
        let (action, out) = run_xdp(b, frame, *ingress).expect("test run");
        assert_eq!(
            (action, &out),
            (xdp_action::XDP_REDIRECT, full),
            "{what}: the hit path's bytes are the full program's"
        );
    }
}

/// Runs `frame` three times on `ingress` with the full program in place: a
/// new TCP flow's first packet goes to PENDING, the next confirms it, the
/// third fills this CPU's flow cache (a UDP flow's first creates it, the
/// next fills the cache, the third is a hit). Every run must redirect it
/// with the first run's bytes, the full program's; returns them.
fn forwarded_alike(b: &mut Balancer, frame: &[u8], ingress: u32, what: &str) -> Vec<u8> {
    let (action, first) = run_xdp(b, frame, ingress).expect("test run");
    assert_eq!(action, xdp_action::XDP_REDIRECT, "{what}: first run");
    for run in 2..=3 {
        let (action, out) = run_xdp(b, frame, ingress).expect("test run");
        assert_eq!(
            (action, &out),
            (xdp_action::XDP_REDIRECT, &first),
            "{what}: run {run}"
        );
    }
    first
}

/// Runs the program once on `frame` as if it arrived on `ingress`; returns the
/// XDP action and the frame as the program left it.
pub fn run_xdp(balancer: &mut Balancer, frame: &[u8], ingress: u32) -> Result<(u32, Vec<u8>)> {
    let prog = balancer.dataplane().program()?;
    let mut out = vec![0u8; frame.len() + 512];
    let md = xdp_md(ingress, frame.len());
    let result = prog
        .test_run(TestRunOptions {
            data_in: Some(frame),
            data_out: Some(&mut out),
            ctx_in: Some(&md),
            ..TestRunOptions::default()
        })
        .context("BPF_PROG_TEST_RUN")?;
    out.truncate(result.data_size_out as usize);
    Ok((result.return_value, out))
}

/// Checks every checksum in an Ethernet frame by recomputing it with etherparse.
pub fn assert_checksums_valid(frame: &[u8]) {
    let sliced = SlicedPacket::from_ethernet(frame).expect("frame parses");
    let payload;
    match (&sliced.net, &sliced.transport) {
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Tcp(tcp))) => {
            let header = ip.header().to_header();
            assert_eq!(
                header.calc_header_checksum(),
                header.header_checksum,
                "IPv4 header checksum"
            );
            payload = tcp.payload();
            let expect = tcp
                .to_header()
                .calc_checksum_ipv4(&header, payload)
                .expect("tcp sum");
            assert_eq!(tcp.checksum(), expect, "TCP/IPv4 checksum");
        }
        (Some(NetSlice::Ipv4(ip)), Some(TransportSlice::Udp(udp))) => {
            let header = ip.header().to_header();
            assert_eq!(
                header.calc_header_checksum(),
                header.header_checksum,
                "IPv4 header checksum"
            );
            if udp.checksum() != 0 {
                payload = udp.payload();
                let expect = udp
                    .to_header()
                    .calc_checksum_ipv4(&header, payload)
                    .expect("udp sum");
                assert_eq!(udp.checksum(), expect, "UDP/IPv4 checksum");
            }
        }
        (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Tcp(tcp))) => {
            let header = ip.header().to_header();
            payload = tcp.payload();
            let expect = tcp
                .to_header()
                .calc_checksum_ipv6(&header, payload)
                .expect("tcp sum");
            assert_eq!(tcp.checksum(), expect, "TCP/IPv6 checksum");
        }
        (Some(NetSlice::Ipv6(ip)), Some(TransportSlice::Udp(udp))) => {
            let header = ip.header().to_header();
            payload = udp.payload();
            let expect = udp
                .to_header()
                .calc_checksum_ipv6(&header, payload)
                .expect("udp sum");
            assert_eq!(udp.checksum(), expect, "UDP/IPv6 checksum");
        }
        other => panic!("unexpected frame layout: {other:?}"),
    }
}

/// A namespace lab with the agent running in its balancer namespace.
pub struct RunningLab {
    /// The lab (dropped last: stops the agent and servers, removes namespaces).
    pub lab: lb_userspace::lab::Lab,
    /// Pid of the agent (`lb run`).
    pub agent: u32,
    /// The config file the agent runs with.
    pub config_path: std::path::PathBuf,
    /// The agent's control socket.
    pub socket: std::path::PathBuf,
}

impl RunningLab {
    /// Builds a lab with `backends` backends and runs the agent over the first
    /// `weights.len()` of them with those weights.
    pub fn start(tag: &str, backends: usize, weights: &[u32]) -> Result<Self> {
        Self::start_with_health(tag, backends, weights, None)
    }

    /// Like `start`, with a `[service.health]` body for every L4 service.
    pub fn start_with_health(
        tag: &str,
        backends: usize,
        weights: &[u32],
        health: Option<&str>,
    ) -> Result<Self> {
        Self::start_custom(tag, backends, weights, health, |_, _| Ok(String::new()))
    }

    /// The general form: `extra(lab, dir)` returns TOML appended to the
    /// generated config (it may write files, e.g. certificates, into `dir`).
    pub fn start_custom(
        tag: &str,
        backends: usize,
        weights: &[u32],
        health: Option<&str>,
        extra: impl FnOnce(&lb_userspace::lab::Lab, &std::path::Path) -> Result<String>,
    ) -> Result<Self> {
        let opts = lb_userspace::lab::LabOptions::from_env(backends)?;
        Self::start_with(opts, tag, weights, health, Forwarding::Nat, extra)
    }

    /// A lab built for direct server return (backends answer the client via
    /// the switch; see `LabOptions::with_dsr`) running every L4 service with
    /// `forwarding`; for `ipip` every backend runs `lb decap`.
    /// `client_path_mtu` lowers the MTU of the switch's link to the client.
    pub fn start_dsr(
        tag: &str,
        backends: usize,
        weights: &[u32],
        forwarding: Forwarding,
        health: Option<&str>,
        client_path_mtu: Option<u32>,
    ) -> Result<Self> {
        let mut opts = lb_userspace::lab::LabOptions::from_env(backends)?.with_dsr();
        if let Some(mtu) = client_path_mtu {
            opts = opts.with_client_path_mtu(mtu);
        }
        Self::start_with(opts, tag, weights, health, forwarding, |_, _| {
            Ok(String::new())
        })
    }

    fn start_with(
        opts: lb_userspace::lab::LabOptions,
        tag: &str,
        weights: &[u32],
        health: Option<&str>,
        forwarding: Forwarding,
        extra: impl FnOnce(&lb_userspace::lab::Lab, &std::path::Path) -> Result<String>,
    ) -> Result<Self> {
        let mut lab = lb_userspace::lab::Lab::create(tag, opts)?;
        if forwarding == Forwarding::Ipip {
            lab.start_decap()?;
        }
        let dir = std::env::temp_dir().join(lab.balancer_ns());
        std::fs::create_dir_all(&dir)?;
        let config_path = dir.join("lb.toml");
        let mut text = lb_userspace::lab::services::lab_config_forwarding(
            &lab,
            weights,
            lb_common::DEFAULT_RING_SIZE,
            health,
            forwarding,
        );
        text.push_str(&extra(&lab, &dir)?);
        std::fs::write(&config_path, text)?;
        let socket = dir.join("lb.sock");
        let agent = lb_userspace::demo::start_agent(&mut lab, &config_path, &socket)?;
        Ok(Self {
            lab,
            agent,
            config_path,
            socket,
        })
    }

    /// Runs `lb --socket <this lab's socket> ARGS`, as an operator would.
    pub fn lb(&self, args: &[&str]) -> std::process::Output {
        let bin = &self.lab.options().lb_bin;
        let out = std::process::Command::new(bin)
            .arg("--socket")
            .arg(&self.socket)
            .args(args)
            .output()
            .expect("run lb");
        eprintln!(
            "$ lb {} -> {}\n{}{}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }

    /// Restarts the agent with the same config and socket (not hitless: the
    /// program is detached while it is down).
    pub fn restart_agent(&mut self) -> Result<()> {
        self.lab.stop(self.agent)?;
        self.agent =
            lb_userspace::demo::start_agent(&mut self.lab, &self.config_path, &self.socket)?;
        Ok(())
    }

    /// Rewrites the config with new weights and sends SIGHUP.
    pub fn reload(&mut self, weights: &[u32]) -> Result<()> {
        std::fs::write(
            &self.config_path,
            lb_userspace::lab::services::lab_config(
                &self.lab,
                weights,
                lb_common::DEFAULT_RING_SIZE,
                None,
            ),
        )?;
        // SAFETY: plain kill(2) on a pid this lab started.
        if unsafe { libc::kill(self.agent as i32, libc::SIGHUP) } != 0 {
            anyhow::bail!("SIGHUP to agent: {}", std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// The agent's metrics text.
    pub fn metrics(&self) -> Result<String> {
        let addr = lb_userspace::lab::services::METRICS_ADDR.parse()?;
        let (status, body) = lb_userspace::lab::run_in_ns(self.lab.balancer_ns(), move || {
            lb_userspace::lab::client::http_get(addr, "/metrics", std::time::Duration::from_secs(2))
        })??;
        anyhow::ensure!(status == 200, "metrics answered {status}");
        Ok(body)
    }

    /// One sample of the agent's metrics (0 if absent).
    pub fn metric(&self, name: &str, labels: &str) -> Result<u64> {
        Ok(lb_userspace::metrics::sample(&self.metrics()?, name, labels).unwrap_or(0))
    }
}

impl Drop for RunningLab {
    fn drop(&mut self) {
        if let Some(dir) = self.config_path.parent() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}
/// A cluster lab (`LabOptions::with_cluster`): the ECMP router, BIRD in it
/// and in every node, and `lb run` on every node with the same config.
pub struct RunningCluster {
    /// The lab (dropped last: stops agents, BIRD and servers, removes
    /// namespaces, pins and files).
    pub lab: lb_userspace::lab::Lab,
    /// Pid of each node's agent, node 1 first.
    pub agents: Vec<u32>,
}

impl RunningCluster {
    /// Builds a cluster of `nodes` nodes over `weights.len()` backends (with
    /// `lb decap` for ipip) and runs the agent on every node, each with the
    /// same lab config (its `lb.toml` in the node's directory) plus a `[bgp]`
    /// table driving the node's BIRD, its own control socket and pin
    /// directory. The agents announce the VIPs as soon as they run.
    pub fn start(
        tag: &str,
        nodes: usize,
        weights: &[u32],
        forwarding: Forwarding,
        health: Option<&str>,
    ) -> Result<Self> {
        Self::start_custom(tag, nodes, weights, forwarding, health, |_, _| {
            Ok(String::new())
        })
    }

    /// Like `start`; `extra(lab, node)` returns TOML appended to node
    /// `node`'s config (e.g. a `[bgp]` table naming
    /// `lab.node_bird_socket(node)` and `lab.node_vips_include(node)`).
    pub fn start_custom(
        tag: &str,
        nodes: usize,
        weights: &[u32],
        forwarding: Forwarding,
        health: Option<&str>,
        extra: impl Fn(&lb_userspace::lab::Lab, usize) -> Result<String>,
    ) -> Result<Self> {
        let opts = lb_userspace::lab::LabOptions::from_env(weights.len())?.with_cluster(nodes);
        let mut lab = lb_userspace::lab::Lab::create(tag, opts)?;
        if forwarding == Forwarding::Ipip {
            lab.start_decap()?;
        }
        let text = lb_userspace::lab::services::lab_config_forwarding(
            &lab,
            weights,
            lb_common::DEFAULT_RING_SIZE,
            health,
            forwarding,
        );
        let mut agents = Vec::new();
        for n in 1..=nodes {
            let config = lab.node(n)?.dir.join("lb.toml");
            let bgp = lb_userspace::lab::cluster::node_bgp_table(lab.node(n)?);
            std::fs::write(&config, format!("{text}{bgp}{}", extra(&lab, n)?))?;
            let socket = lab.node_socket(n)?;
            agents.push(lb_userspace::demo::start_node_agent(
                &mut lab, n, &config, &socket,
            )?);
        }
        Ok(Self { lab, agents })
    }

    /// Runs `lb --socket <node's socket> ARGS`, as an operator on that node would.
    pub fn lb(&self, node: usize, args: &[&str]) -> std::process::Output {
        let out = std::process::Command::new(&self.lab.options().lb_bin)
            .arg("--socket")
            .arg(self.lab.node_socket(node).expect("node socket"))
            .args(args)
            .output()
            .expect("run lb");
        if !out.status.success() {
            eprintln!(
                "lb{node}$ lb {} -> {}\n{}{}",
                args.join(" "),
                out.status,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        out
    }

    /// `lb show backends SERVICE --json` on node `node`.
    pub fn backends(
        &self,
        node: usize,
        service: &str,
    ) -> Result<Vec<lb_userspace::control::protocol::BackendInfo>> {
        let out = self.lb(node, &["show", "backends", service, "--json"]);
        anyhow::ensure!(
            out.status.success(),
            "lb show backends on node {node}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

/// `n` fresh TCP connections (or UDP queries, each from its own port) to
/// `vip` from namespace `ns`, tallied by who answered (3 s each); panics on
/// one that fails.
pub fn tally(
    ns: &str,
    vip: std::net::SocketAddr,
    n: usize,
    udp: bool,
) -> std::collections::BTreeMap<String, usize> {
    use lb_userspace::lab::client::{tcp_ask, udp_ask};
    let limit = std::time::Duration::from_secs(3);
    lb_userspace::lab::run_in_ns(ns, move || {
        let mut tally = std::collections::BTreeMap::new();
        for i in 0..n {
            let name = if udp {
                udp_ask(vip, limit)
            } else {
                tcp_ask(vip, limit)
            }
            .unwrap_or_else(|e| panic!("request {i} to {vip}: {e}"));
            *tally.entry(name).or_insert(0) += 1;
        }
        tally
    })
    .expect("the client namespace")
}

/// Asserts that `tally` splits over "be1", "be2", ... as `weights` do, each
/// share within four standard deviations of a binomial draw of that many
/// flows (hashed 5-tuples are one). Four still tell 1:2:3 from an even
/// split at 300 flows; a fixed 0.06 or 0.07 (2.4 to 3.6 deviations at the
/// sizes the tests use) broke one run in a few dozen.
pub fn assert_weighted<N: Copy + TryInto<u64> + std::fmt::Debug>(
    tally: &std::collections::BTreeMap<String, N>,
    weights: &[u32],
    what: &str,
) {
    let count = |n: N| n.try_into().unwrap_or(u64::MAX);
    let total = tally.values().map(|&n| count(n)).sum::<u64>() as f64;
    let sum: u32 = weights.iter().sum();
    for (i, weight) in weights.iter().enumerate() {
        let name = format!("be{}", i + 1);
        let got = tally.get(&name).map_or(0, |&n| count(n)) as f64 / total;
        let expected = f64::from(*weight) / f64::from(sum);
        let tolerance = 4.0 * (expected * (1.0 - expected) / total).sqrt();
        println!("{what}: {name} {got:.3} of {total} (expected {expected:.3} ± {tolerance:.3})");
        assert!(
            (got - expected).abs() <= tolerance,
            "{what}: {name} got {got:.3}, expected {expected:.3} ± {tolerance:.3} ({tally:?})"
        );
    }
}

/// Asserts that a client's new connection from a port it used before goes
/// where the VIP's table says, not where the older connection's flow entry
/// points (clients cycle through their ports; the table keeps entries until
/// they age out). From each of a few source ports: ask, drain the backend
/// that answered, ask again (another backend must answer), enable it, ask
/// again (it must answer again). `address` gives a backend's address (for
/// the CLI) from the name it answers with.
pub fn assert_reused_ports_follow_the_table(
    lab: &RunningLab,
    vip: std::net::SocketAddr,
    service: &str,
    address: impl Fn(&str) -> String,
) {
    use lb_userspace::lab::client::tcp_ask_from;
    let limit = std::time::Duration::from_secs(3);
    let ask = |port: u16| {
        lb_userspace::lab::run_in_ns(lab.lab.client_ns(), move || tcp_ask_from(vip, port, limit))
            .expect("the client namespace")
            .unwrap_or_else(|e| panic!("{vip} from port {port}: {e}"))
    };
    let cli = |verb: &str, name: &str| {
        let out = lab.lb(&[verb, service, &address(name)]);
        assert!(out.status.success(), "lb {verb} {name}: {out:?}");
    };
    for port in [40_001, 40_102, 40_203] {
        let first = ask(port);
        cli("drain", &first);
        let second = ask(port);
        assert_ne!(
            second, first,
            "port {port}: a new connection to a drained backend"
        );
        cli("enable", &first);
        let third = ask(port);
        assert_eq!(
            third, first,
            "port {port}: the table's choice again, not {second}'s entry"
        );
    }
}

/// Waits (bounded by `limit`, polling every 100 ms) until `cond` holds;
/// returns how long it took.
pub fn wait_for(
    what: &str,
    limit: std::time::Duration,
    mut cond: impl FnMut() -> bool,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < limit,
            "timed out ({limit:?}) waiting for {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    start.elapsed()
}

pub mod cluster;
pub mod clusterbench;
pub mod frames;
pub mod fuzz;
pub mod l4bench;
pub mod l7bench;
pub mod l7instr;
pub mod l7mem;

/// Runs `cmd` to completion with its output captured, killing it (and
/// failing the test) if it still runs after `limit`: a command that should
/// fail at once must not hang a test.
pub fn output_within(
    cmd: &mut std::process::Command,
    limit: std::time::Duration,
) -> std::process::Output {
    use std::process::Stdio;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("the command starts");
    let deadline = std::time::Instant::now() + limit;
    while child.try_wait().expect("waitpid").is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("{cmd:?} kept running: {:?}", child.wait_with_output());
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    child.wait_with_output().expect("its output")
}

/// XDP actions as BPF_PROG_TEST_RUN returns them.
pub mod xdp_action {
    /// XDP_DROP.
    pub const XDP_DROP: u32 = 1;
    /// XDP_PASS.
    pub const XDP_PASS: u32 = 2;
    /// XDP_TX.
    pub const XDP_TX: u32 = 3;
    /// XDP_REDIRECT.
    pub const XDP_REDIRECT: u32 = 4;
}

/// Pins the calling thread to the CPU it runs on (the flow cache and next
/// hops the hit path reads are per CPU).
pub fn pin_to_this_cpu() {
    // SAFETY: plain syscalls on this thread with a zeroed, then filled, CPU set.
    unsafe {
        let cpu = libc::sched_getcpu();
        assert!(cpu >= 0, "sched_getcpu");
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu as usize, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "sched_setaffinity");
    }
}

/// The NAT services the packet-level tests share: TCP :80 and UDP :53 on
/// both VIPs, each to backend 1 (:8080, :5353), on `lbc` and `lbb`.
pub fn nat_services_config() -> String {
    use lb_userspace::lab::{VIP_V4, VIP_V6, backend_v4, backend_v6};
    format!(
        r#"
interfaces = ["lbc", "lbb"]

[[service]]
name = "tcp4"
vip = "{VIP_V4}:80"
ring_size = 13
[[service.backend]]
address = "{b4}:8080"

[[service]]
name = "udp4"
vip = "{VIP_V4}:53"
protocol = "udp"
ring_size = 13
[[service.backend]]
address = "{b4}:5353"

[[service]]
name = "tcp6"
vip = "[{VIP_V6}]:80"
ring_size = 13
[[service.backend]]
address = "[{b6}]:8080"

[[service]]
name = "udp6"
vip = "[{VIP_V6}]:53"
protocol = "udp"
ring_size = 13
[[service.backend]]
address = "[{b6}]:5353"
"#,
        b4 = backend_v4(1),
        b6 = backend_v6(1),
    )
}

/// Runs `body` in a fresh one-namespace fixture (`TestRunNet`, named after
/// `tag`) with the data plane loaded from `config` and each interface's
/// MAC recorded, as the agent does before it attaches.
pub fn with_fixture(
    tag: &str,
    config: String,
    body: impl FnOnce(&mut Balancer, &lb_userspace::lab::testrun::TestRunNet) + Send + 'static,
) {
    use lb_userspace::lab::testrun::{LBB_MAC, LBC_MAC, TestRunNet};
    let net = TestRunNet::create(tag).expect("fixture namespace");
    let ns = net.ns().to_string();
    lb_userspace::lab::run_in_ns(&ns, move || {
        let mut balancer = balancer_with(&config).expect("load and configure the data plane");
        for (name, ifindex, mac) in [("lbc", net.lbc, LBC_MAC), ("lbb", net.lbb, LBB_MAC)] {
            // Read the agent's way (SIOCGIFHWADDR in this namespace).
            let found = lb_userspace::dataplane::interface_mac(name).expect("interface MAC");
            assert_eq!(found, (ifindex, mac), "{name}");
            balancer
                .dataplane()
                .set_interface_mac(ifindex, mac)
                .expect("IF_MAC_TABLE");
        }
        body(&mut balancer, &net);
    })
    .expect("enter fixture namespace");
}

/// Packets counted under `reason` so far.
pub fn reason_count(b: &mut Balancer, reason: lb_common::Reason) -> u64 {
    b.dataplane()
        .counters()
        .expect("counters")
        .reason(reason)
        .packets
}

/// Sets interface `dev`'s MTU in the fixture namespace `ns`.
pub fn set_mtu(ns: &str, dev: &str, mtu: u16) {
    let status = std::process::Command::new("ip")
        .args(["-n", ns, "link", "set", dev, "mtu", &mtu.to_string()])
        .status()
        .expect("run ip");
    assert!(status.success(), "ip link set {dev} mtu {mtu}");
}

/// A CA ("lb test CA", at `dir/ca.pem`, returned) and a leaf certificate it
/// signs for each of `names`, written as `dir/NAME.pem` and `dir/NAME.key`.
pub fn write_certificates(
    dir: &std::path::Path,
    names: &[&str],
) -> anyhow::Result<std::path::PathBuf> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
    let ca_key = KeyPair::generate()?;
    let mut ca = CertificateParams::new(Vec::<String>::new())?;
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    // Distinct names: a leaf whose issuer equals its subject looks self-signed.
    ca.distinguished_name.push(DnType::CommonName, "lb test CA");
    let ca_cert = ca.self_signed(&ca_key)?;
    std::fs::write(dir.join("ca.pem"), ca_cert.pem())?;
    for name in names {
        let key = KeyPair::generate()?;
        let cert =
            CertificateParams::new(vec![name.to_string()])?.signed_by(&key, &ca_cert, &ca_key)?;
        std::fs::write(dir.join(format!("{name}.pem")), cert.pem())?;
        std::fs::write(dir.join(format!("{name}.key")), key.serialize_pem())?;
    }
    Ok(dir.join("ca.pem"))
}
