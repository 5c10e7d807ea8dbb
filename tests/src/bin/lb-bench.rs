//! `cargo xtask bench`: per-packet cost of the XDP program against a minimal
//! bounce program, and requests/s through the balancer against the same client
//! talking to the backend directly. Everything is measured in one run and
//! printed as ratios, because these machines are noisy.
// Functions stay short enough to read at once (threshold in clippy.toml);
// tests, which read as one scenario each, are exempt.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use etherparse::PacketBuilder;
use lb_common::PROG_BOUNCE;
use lb_tests::{RunningLab, balancer_with, run_xdp, xdp_md};
use lb_userspace::lab::{
    CLIENT_V4, TCP_PORT, VIP_V4, backend_v4,
    client::{TcpSession, tcp_ask},
    run_in_ns, services,
    testrun::{CLIENT_MAC, LBC_MAC, TestRunNet},
};

/// Single test runs per measured path.
const RUNS: u32 = 100_000;
/// Repeat count of the amortised measurements.
const REPEAT: u32 = 1_000_000;
/// The port of the `l2` (DSR) service of the cold-cache rows.
const DSR_PORT: u16 = 8080;
/// Wall-clock budget of each request-rate measurement.
const WINDOW: Duration = Duration::from_secs(3);
/// Upper bound on requests in one window (keeps the loop bounded in count too).
const MAX_REQUESTS: usize = 200_000;

fn frame(sport: u16) -> Vec<u8> {
    frame_to(sport, 80)
}

fn frame_to(sport: u16, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
        .ipv4(CLIENT_V4.octets(), VIP_V4.octets(), 64)
        .tcp(sport, dport, 1, 8192)
        .ack(1)
        .write(&mut v, &[0u8; 64])
        .expect("frame");
    v
}

/// A client's SYN from `sport` to the VIP's port 80.
fn syn(sport: u16) -> Vec<u8> {
    syn_to(sport, 80)
}

/// A client's SYN from `sport` to the VIP's port `dport`.
fn syn_to(sport: u16, dport: u16) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
        .ipv4(CLIENT_V4.octets(), VIP_V4.octets(), 64)
        .tcp(sport, dport, 1, 8192)
        .syn()
        .write(&mut v, &[])
        .expect("frame");
    v
}

/// Mean kernel-measured ns of the ACK that confirms a handshake (PENDING to
/// FLOWS): each run's SYN, untimed, comes first.
fn confirm_ns(prog: &Xdp, ingress: u32) -> Result<f64> {
    let mut total = Duration::ZERO;
    let mut out = vec![0u8; 2048];
    for i in 0..RUNS {
        let sport = 1024 + (i % 60000) as u16;
        run_once(prog, ingress, &syn(sport), &mut out)?;
        total += run_once(prog, ingress, &frame(sport), &mut out)?;
    }
    Ok(total.as_nanos() as f64 / RUNS as f64)
}

/// One BPF_PROG_TEST_RUN of `prog` over `frame`: its kernel-measured time.
fn run_once(prog: &Xdp, ingress: u32, frame: &[u8], out: &mut [u8]) -> Result<Duration> {
    let md = xdp_md(ingress, frame.len());
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(out),
        ctx_in: Some(&md),
        ..TestRunOptions::default()
    })?;
    Ok(r.duration)
}

/// Mean kernel-measured ns of one run of `prog` over `frames(i)`, one
/// BPF_PROG_TEST_RUN per frame (a repeated run would re-process the frame the
/// previous run already rewrote, which is not the path being measured).
fn mean_ns(prog: &Xdp, ingress: u32, frames: impl Fn(u32) -> Vec<u8>) -> Result<f64> {
    let mut total = Duration::ZERO;
    let mut out = vec![0u8; 2048];
    for i in 0..RUNS {
        total += run_once(prog, ingress, &frames(i), &mut out)?;
    }
    Ok(total.as_nanos() as f64 / RUNS as f64)
}

/// Kernel-timed ns per run of one BPF_PROG_TEST_RUN with `repeat` runs: only
/// meaningful for paths that leave the frame as it found it.
fn repeated_ns(prog: &Xdp, ingress: u32, frame: &[u8], repeat: u32) -> Result<f64> {
    let mut out = vec![0u8; 2048];
    let md = xdp_md(ingress, frame.len());
    let r = prog.test_run(TestRunOptions {
        data_in: Some(frame),
        data_out: Some(&mut out),
        ctx_in: Some(&md),
        repeat,
        ..TestRunOptions::default()
    })?;
    Ok(r.duration.as_nanos() as f64)
}

/// The lab's pass/bounce object, as `cargo xtask bench` names it.
fn lab_object() -> Result<std::ffi::OsString> {
    std::env::var_os("LB_LAB_BPF_OBJECT")
        .ok_or_else(|| anyhow!("LB_LAB_BPF_OBJECT is not set; run via `cargo xtask bench`"))
}

/// `xdp_bounce` from the lab object, loaded: the baseline of the XDP rows.
fn load_bounce(bpf: &mut aya::Ebpf) -> Result<&mut Xdp> {
    let bounce: &mut Xdp = bpf
        .program_mut(PROG_BOUNCE)
        .ok_or_else(|| anyhow!("no {PROG_BOUNCE} program"))?
        .try_into()?;
    bounce.load()?;
    Ok(bounce)
}

/// Mean ns per run of each measured path.
struct Costs {
    bounce: f64,
    hit: f64,
    miss: f64,
    confirm: f64,
    l7: f64,
    other: f64,
    bounce_repeated: f64,
    l7_repeated: f64,
}

fn xdp_costs() -> Result<()> {
    let net = TestRunNet::create("bench")?;
    let ns = net.ns().to_string();
    let (lbc, _) = (net.lbc, net.lbb);
    let lab_object = lab_object()?;
    let config = format!(
        // No rate limit: the new-flow rows send far more than a prefix may.
        "interfaces = [\"lbc\"]\nnew_flow_limit = 0\n[[service]]\nname = \"tls\"\nvip = \"{VIP_V4}:443\"\nmode = \"l7\"\n[[service]]\nname = \"web\"\nvip = \"{VIP_V4}:80\"\n{}",
        (1..=3)
            .map(|i| format!(
                "[[service.backend]]\naddress = \"{}:{TCP_PORT}\"\n",
                backend_v4(i)
            ))
            .collect::<String>()
    );
    let c = run_in_ns(&ns, move || -> Result<Costs> {
        let mut bpf = aya::Ebpf::load_file(&lab_object).context("loading lab-xdp")?;
        let bounce = load_bounce(&mut bpf)?;
        let bounce_ns = mean_ns(bounce, lbc, |_| frame(40000))?;
        let bounce_rep = repeated_ns(bounce, lbc, &frame(40000), REPEAT)?;

        let mut balancer = balancer_with(&config)?;
        // Warm one flow into the connection table (SYN, then the ACK that
        // confirms it): every later run is a hit.
        for f in [syn(40000), frame(40000)] {
            let (action, _) = run_xdp(&mut balancer, &f, lbc)?;
            anyhow::ensure!(
                action == 4,
                "VIP frame was not redirected (action {action})"
            );
        }
        let prog = balancer.dataplane().program()?;
        let hit_ns = mean_ns(prog, lbc, |_| frame(40000))?;
        // A SYN from a new source port every run: Maglev lookup plus two
        // PENDING inserts (what each SYN of a flood costs too).
        let miss_ns = mean_ns(prog, lbc, |i| syn(1024 + (i % 60000) as u16))?;
        // The ACK of each: two FLOWS inserts and two PENDING deletes.
        let confirm = confirm_ns(prog, lbc)?;
        let l7_ns = mean_ns(prog, lbc, |_| frame_to(40000, 443))?;
        let other_ns = mean_ns(prog, lbc, |_| frame_to(40000, 9999))?;
        // Paths that leave the frame unchanged can also be timed with one
        // repeated run, which amortises the per-run timing overhead.
        let l7_rep = repeated_ns(prog, lbc, &frame_to(40000, 443), REPEAT)?;
        Ok(Costs {
            bounce: bounce_ns,
            hit: hit_ns,
            miss: miss_ns,
            confirm,
            l7: l7_ns,
            other: other_ns,
            bounce_repeated: bounce_rep,
            l7_repeated: l7_rep,
        })
    })??;
    println!(
        "XDP cost per packet (BPF_PROG_TEST_RUN, {RUNS} single runs each, kernel-timed mean):"
    );
    let row = |what: &str, ns: f64, note: &str| {
        println!("  {what:<46} {ns:>7.1} ns   {:.2}x{note}", ns / c.bounce);
    };
    row("baseline: xdp_bounce (swap MACs, XDP_TX)", c.bounce, "");
    row(
        "lb_xdp, connection-table hit",
        c.hit,
        "   (target <= 1.50x)",
    );
    row("lb_xdp, new flow: SYN (Maglev + PENDING)", c.miss, "");
    row("lb_xdp, its ACK (PENDING -> FLOWS)", c.confirm, "");
    row("lb_xdp, L7 VIP passed to the stack", c.l7, "");
    row("lb_xdp, not a VIP (passed untouched)", c.other, "");
    println!(
        "  one run with repeat={REPEAT} (amortises the timer): xdp_bounce {:.1} ns, lb_xdp L7 pass {:.1} ns, {:.2}x",
        c.bounce_repeated,
        c.l7_repeated,
        c.l7_repeated / c.bounce_repeated
    );
    xdp_cold_costs()
}

/// Single test runs per cold-cache row (each follows a `Thrash::run`).
const COLD_RUNS: u32 = 2_000;

/// Memory touched between cold runs: on a loaded machine the program runs
/// between other work that evicts its data from the caches and its pages
/// from the TLB; a single warm test run hides that. One write per cache
/// line over more than an L2 cache, and one per page over more pages than
/// a second-level TLB holds.
struct Thrash {
    lines: Vec<u8>,
    pages: Vec<u8>,
}

impl Thrash {
    fn new() -> Self {
        Self {
            lines: vec![1; 4 << 20],
            pages: vec![1; 64 << 20],
        }
    }

    fn run(&mut self, i: u32) {
        for b in self.lines.iter_mut().step_by(64) {
            *b = b.wrapping_add(i as u8);
        }
        for b in self.pages.iter_mut().step_by(4096) {
            *b = b.wrapping_add(i as u8);
        }
    }
}

/// Mean kernel-measured ns of single runs over `frame`, each after a thrash.
fn cold_ns(prog: &Xdp, ingress: u32, frame: &[u8], thrash: &mut Thrash) -> Result<f64> {
    let mut total = Duration::ZERO;
    let mut out = vec![0u8; 2048];
    for i in 0..COLD_RUNS {
        thrash.run(i);
        total += run_once(prog, ingress, frame, &mut out)?;
    }
    Ok(total.as_nanos() as f64 / COLD_RUNS as f64)
}

/// Established-flow hits with cold caches and TLB, NAT and `l2` (DSR),
/// against `xdp_bounce` measured the same way.
fn xdp_cold_costs() -> Result<()> {
    let net = TestRunNet::create("benchcold")?;
    let ns = net.ns().to_string();
    let lbc = net.lbc;
    let lab_object = lab_object()?;
    let config = format!(
        "interfaces = [\"lbc\"]\nnew_flow_limit = 0\n[[service]]\nname = \"web\"\nvip = \"{VIP_V4}:80\"\n[[service.backend]]\naddress = \"{b}:{TCP_PORT}\"\n[[service]]\nname = \"dsr\"\nvip = \"{VIP_V4}:{DSR_PORT}\"\nforwarding = \"l2\"\n[[service.backend]]\naddress = \"{b}:{DSR_PORT}\"\n",
        b = backend_v4(1),
    );
    let (bounce, nat, l2) = run_in_ns(&ns, move || -> Result<(f64, f64, f64)> {
        let mut thrash = Thrash::new();
        let mut bpf = aya::Ebpf::load_file(&lab_object).context("loading lab-xdp")?;
        let bounce = load_bounce(&mut bpf)?;
        let bounce_ns = cold_ns(bounce, lbc, &frame(40000), &mut thrash)?;
        let mut balancer = balancer_with(&config)?;
        for port in [80, DSR_PORT] {
            for f in [syn_to(40000, port), frame_to(40000, port)] {
                let (action, _) = run_xdp(&mut balancer, &f, lbc)?;
                anyhow::ensure!(action == 4, "port {port}: not redirected ({action})");
            }
        }
        let prog = balancer.dataplane().program()?;
        let nat = cold_ns(prog, lbc, &frame(40000), &mut thrash)?;
        let l2 = cold_ns(prog, lbc, &frame_to(40000, DSR_PORT), &mut thrash)?;
        Ok((bounce_ns, nat, l2))
    })??;
    println!(
        "  cold caches and TLB ({COLD_RUNS} single runs, each after writing 4 MiB line by line and 64 MiB page by page):"
    );
    println!("    baseline: xdp_bounce                         {bounce:>7.1} ns   1.00x");
    for (what, ns) in [
        ("connection-table hit, NAT", nat),
        ("connection-table hit, l2 (DSR)", l2),
    ] {
        println!("    lb_xdp, {what:<36} {ns:>7.1} ns   {:.2}x", ns / bounce);
    }
    Ok(())
}

/// (new connections/s, keep-alive requests/s) from the client to `target`.
fn rates(lab: &RunningLab, target: SocketAddr) -> Result<(f64, f64)> {
    run_in_ns(lab.lab.client_ns(), move || -> Result<(f64, f64)> {
        let timeout = Duration::from_secs(2);
        let start = Instant::now();
        let mut n = 0usize;
        while start.elapsed() < WINDOW && n < MAX_REQUESTS {
            tcp_ask(target, timeout).with_context(|| format!("connection {n} to {target}"))?;
            n += 1;
        }
        let conns = n as f64 / start.elapsed().as_secs_f64();
        let mut session = TcpSession::connect(target, timeout)?;
        let start = Instant::now();
        let mut n = 0usize;
        while start.elapsed() < WINDOW && n < MAX_REQUESTS {
            session.ask()?;
            n += 1;
        }
        Ok((conns, n as f64 / start.elapsed().as_secs_f64()))
    })?
}

fn request_rates() -> Result<()> {
    // One backend in the service, so both paths end at the same server.
    let lab = RunningLab::start("bench", 1, &[1])?;
    let direct = SocketAddr::new(backend_v4(1).into(), TCP_PORT);
    lab.lab.set_kernel_forwarding(true)?;
    let (d_conn, d_req) = rates(&lab, direct)?;
    lab.lab.set_kernel_forwarding(false)?;
    let (v_conn, v_req) = rates(&lab, services::vip_tcp4())?;
    println!(
        "Requests through the namespace lab (1 client thread, {} s per figure):",
        WINDOW.as_secs()
    );
    println!(
        "  {:<46} {d_conn:>9.0} conn/s   {d_req:>9.0} req/s keep-alive   1.00x",
        "baseline: client -> be1 directly (kernel routing)"
    );
    println!(
        "  {:<46} {v_conn:>9.0} conn/s   {v_req:>9.0} req/s keep-alive   {:.2}x / {:.2}x",
        "client -> VIP -> be1 (XDP NAT both ways)",
        v_conn / d_conn,
        v_req / d_req
    );
    Ok(())
}

/// Maglev table for 100 backends at the default size: build, then publish.
fn table_costs() -> Result<()> {
    use lb_common::{DEFAULT_RING_SIZE, hash::backend_identity, maglev};
    let identities: Vec<[u8; 20]> = (0..100u32)
        .map(|i| {
            let mut a = [0u8; 16];
            a[..4].copy_from_slice(&[198, 18, 2 + (i / 200) as u8, (i % 200) as u8 + 10]);
            backend_identity(&a, 8080, 4)
        })
        .collect();
    let inputs: Vec<maglev::MaglevInput<'_>> = identities
        .iter()
        .enumerate()
        .map(|(i, id)| maglev::MaglevInput {
            id: i as u32,
            identity: id,
            weight: 1,
        })
        .collect();
    let object = lb_userspace::dataplane::default_object_path()?;
    let mut dp = lb_userspace::dataplane::Dataplane::load(&object)?;
    let rounds = 20u32;
    let (mut build, mut publish) = (Duration::ZERO, Duration::ZERO);
    for _ in 0..rounds {
        let t = Instant::now();
        let table = maglev::build(&inputs, DEFAULT_RING_SIZE).map_err(|e| anyhow!("{e}"))?;
        build += t.elapsed();
        let t = Instant::now();
        dp.publish_ring(0, &table)?;
        publish += t.elapsed();
    }
    let build_ms = build.as_secs_f64() * 1e3 / f64::from(rounds);
    let publish_ms = publish.as_secs_f64() * 1e3 / f64::from(rounds);
    println!("Maglev table, 100 backends, {DEFAULT_RING_SIZE} entries (mean of {rounds}):");
    println!(
        "  {:<46} {publish_ms:>7.2} ms   1.00x",
        "baseline: publish a ready table (one map update)"
    );
    println!(
        "  {:<46} {build_ms:>7.2} ms   {:.2}x   (Maglev paper: 1.8 ms)",
        "build the table",
        build_ms / publish_ms
    );
    Ok(())
}

/// How long a CLI change takes to be in the data plane (the agent answers only
/// once it has published), against a read-only request on the same path.
fn control_latency() -> Result<()> {
    let lab = RunningLab::start("benchc", 3, &[1, 1, 1])?;
    let rounds = 20u32;
    // Mean ms of `rounds` runs of `lb --socket S ARGS(i)`.
    let time = |args: &dyn Fn(u32) -> Vec<String>| -> Result<f64> {
        let t = Instant::now();
        for i in 0..rounds {
            let args = args(i);
            let out = std::process::Command::new(&lab.lab.options().lb_bin)
                .arg("--socket")
                .arg(&lab.socket)
                .args(&args)
                .output()?;
            anyhow::ensure!(out.status.success(), "lb {args:?} failed");
        }
        Ok(t.elapsed().as_secs_f64() * 1e3 / f64::from(rounds))
    };
    let be1 = SocketAddr::new(backend_v4(1).into(), TCP_PORT).to_string();
    let read = time(&|_| vec!["show".into(), "stats".into()])?;
    // Alternate the weight so every run really rebuilds and publishes.
    let change = time(&|i| {
        vec![
            "weight".into(),
            "tcp4".into(),
            be1.clone(),
            (2 + i % 2).to_string(),
        ]
    })?;
    println!(
        "Control path, `lb` CLI to the agent (mean of {rounds} runs, process start included):"
    );
    println!(
        "  {:<46} {read:>7.2} ms   1.00x",
        "baseline: lb show stats (read only)"
    );
    println!(
        "  {:<46} {change:>7.2} ms   {:.2}x",
        "lb weight (table rebuilt and published)",
        change / read
    );
    Ok(())
}

/// The benchmark's sections, by the name that selects them on the command line.
type Section = (&'static str, fn() -> Result<()>);

const SECTIONS: [Section; 10] = [
    ("xdp", xdp_costs),
    ("rates", request_rates),
    ("l4", lb_tests::l4bench::run),
    ("l4live", lb_tests::l4bench::run_live),
    ("tables", table_costs),
    ("control", control_latency),
    ("l7", lb_tests::l7bench::run),
    ("l7instr", lb_tests::l7instr::run),
    ("l7mem", lb_tests::l7mem::run),
    ("cluster", lb_tests::clusterbench::run),
];

#[global_allocator]
static ALLOCATOR: lb_userspace::Allocator = lb_userspace::ALLOCATOR;

fn main() -> Result<()> {
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    // The proxy alone, for `l7instr` to run under valgrind.
    if wanted.first().map(String::as_str) == Some("serve-proxy") {
        let addr = |i: usize| -> Result<SocketAddr> {
            let text = wanted.get(i).context("serve-proxy LISTEN BACKEND")?;
            text.parse().with_context(|| format!("address {text:?}"))
        };
        return lb_tests::l7instr::serve_proxy(addr(1)?, addr(2)?);
    }
    // `lb-bench [SECTION...]`: all sections when none is named (but
    // `l4live`, which `l4` includes).
    for name in &wanted {
        anyhow::ensure!(
            SECTIONS.iter().any(|(n, _)| n == name),
            "unknown section {name:?}; sections: {}",
            SECTIONS.map(|(n, _)| n).join(", ")
        );
    }
    for (name, run) in SECTIONS {
        if (wanted.is_empty() && name != "l4live") || wanted.iter().any(|w| w == name) {
            run()?;
        }
    }
    Ok(())
}
