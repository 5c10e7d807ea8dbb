//! `lb-bench`'s `l4` section: HTTP through the namespace lab's L4 paths,
//! loaded by `wrk` from the client namespace, against baselines measured in
//! the same run: the client talking to the backend through plain kernel
//! routing, and an nftables DNAT in the balancer namespace. Then the XDP
//! program's own cost per packet on that live traffic, read from the
//! kernel's BPF run-time statistics, against the pass-only programs on the
//! far ends of the same veths.
//!
//! The lab is built with the DSR return path (`LabOptions::with_dsr`), so
//! rows for the DSR forwarding modes need only their [`Forwarding`] value in
//! [`LB_FORWARDING_MODES`]; NAT rows route the backends' answers back
//! through the balancer ([`ReturnPath::Balancer`]).
//!
//! The backend is the lab's own server (`lb lab-backend`), one thread per
//! connection: the same server behind every row, so the rows differ only in
//! the path between client and backend, and the DSR rows can use it as is
//! (it serves the VIP ports with UDP bound to the VIP). All rows load the
//! same two cores, so the figures are of the whole path (wrk, kernel, veths,
//! backend), not of the balancer alone; the live XDP cost isolates that.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use lb_userspace::lab::{
    Lab, LabOptions, ReturnPath, TCP_PORT, VIP_V4,
    backend_server::BYTES_PATH,
    backend_v4, ns_command,
    services::{self, Forwarding},
};

use crate::l7bench::{Measure, parse_wrk, which};

/// Connections wrk keeps open (one wrk thread drives them).
const CONNECTIONS: u32 = 50;
/// Measured runs per row and scenario; the median is printed.
const ROUNDS: usize = 3;
/// Length of each measured wrk run, and of the warm-up run per row.
const WINDOW: Duration = Duration::from_secs(3);
const WARMUP: Duration = Duration::from_secs(1);
/// Longest a wrk run may take beyond its duration before it is killed.
const WRK_GRACE: Duration = Duration::from_secs(10);
/// wrk's per-request timeout (a slower request counts as an error).
const REQUEST_TIMEOUT: &str = "2s";
/// Size of the bulk responses.
const BULK_BYTES: u64 = 64 * 1024;
/// The kernel's switch for BPF run-time statistics.
const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";
/// nftables table of the DNAT baseline (balancer namespace).
const DNAT_TABLE: &str = "lbbench_dnat";

/// The forwarding modes measured as "lb XDP" rows, in this order.
pub const LB_FORWARDING_MODES: &[Forwarding] = &[Forwarding::Nat, Forwarding::Ipip, Forwarding::L2];

/// The name of a row measuring the agent with `forwarding`.
pub fn lb_row_name(forwarding: Forwarding) -> &'static str {
    match forwarding {
        Forwarding::Nat => "lb XDP NAT",
        Forwarding::Ipip => "lb XDP ipip (DSR)",
        Forwarding::L2 => "lb XDP l2 (DSR)",
    }
}

/// One row of the table: the path from the client to the backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Row {
    /// The client asks the backend's own address; the balancer's kernel routes.
    Direct,
    /// The client asks the VIP; an nftables DNAT rule in the balancer's kernel.
    NftDnat,
    /// The client asks the VIP; the agent (`lb run` from a config file).
    Lb(Forwarding),
}

impl Row {
    fn name(self) -> &'static str {
        match self {
            Row::Direct => "baseline: direct (kernel routing, no LB)",
            Row::NftDnat => "nftables DNAT (kernel forwarding)",
            Row::Lb(f) => lb_row_name(f),
        }
    }

    /// Where wrk sends its requests.
    fn target(self) -> SocketAddr {
        match self {
            Row::Direct => SocketAddr::new(backend_v4(1).into(), TCP_PORT),
            Row::NftDnat | Row::Lb(_) => services::vip_tcp4(),
        }
    }
}

/// What wrk does in a measured run.
#[derive(Clone, Copy, Debug)]
enum Scenario {
    /// `GET /` on kept-alive connections.
    KeepAlive,
    /// `GET /` with `Connection: close`: a new connection per request.
    NewConnection,
    /// `GET /bytes/65536` on kept-alive connections.
    Bulk,
}

const SCENARIOS: [Scenario; 3] = [Scenario::KeepAlive, Scenario::NewConnection, Scenario::Bulk];

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::KeepAlive => "keep-alive",
            Scenario::NewConnection => "new connection per request",
            Scenario::Bulk => "64 KiB responses",
        }
    }

    fn path(self) -> String {
        match self {
            Scenario::Bulk => format!("{BYTES_PATH}{BULK_BYTES}"),
            _ => "/".into(),
        }
    }
}

/// A row's medians.
struct RowResult {
    row: Row,
    /// Per scenario, the run with the median rate.
    medians: Vec<Measure>,
}

impl RowResult {
    fn rate(&self, s: usize) -> f64 {
        self.medians[s].rps()
    }
}

/// Runs the section and prints it.
pub fn run() -> Result<()> {
    let (rows, costs) = in_lab("l4bench", measure_all)?;
    print_rows(&rows);
    for cost in &costs {
        cost.print();
    }
    Ok(())
}

/// Only the live XDP cost of each lb row (`cargo xtask bench l4live`): the
/// figure the data plane is judged on, in about a minute, without the
/// throughput rows.
pub fn run_live() -> Result<()> {
    in_lab("l4live", |lab, wrk, dir| {
        for &forwarding in LB_FORWARDING_MODES {
            let row = Row::Lb(forwarding);
            let agent = start_lb(lab, forwarding, dir)?;
            let cost = warm_up(lab, wrk, row).and_then(|()| live_xdp_cost(lab, wrk, row));
            let stopped = lab.stop(agent);
            let cost = cost?;
            stopped?;
            cost.print();
        }
        Ok(())
    })
}

/// Runs `body` with wrk's path, a lab built for these rows (DSR return
/// path included) and a scratch directory, removed after.
fn in_lab<T>(tag: &str, body: impl FnOnce(&mut Lab, &Path, &Path) -> Result<T>) -> Result<T> {
    let wrk = which("wrk").ok_or_else(|| {
        anyhow!("wrk is not installed (Debian package `wrk`; `cargo xtask setup`)")
    })?;
    let mut lab = Lab::create(tag, LabOptions::from_env(1)?.with_dsr())?;
    let dir = std::env::temp_dir().join(format!("{}-l4", lab.balancer_ns()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let result = body(&mut lab, &wrk, &dir);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

/// Waits until `row`'s target answers, then loads it for `WARMUP`.
fn warm_up(lab: &mut Lab, wrk: &Path, row: Row) -> Result<()> {
    let client_ns = lab.client_ns().to_string();
    crate::l7bench::wait_ready(lab, &client_ns, row.target(), None)?;
    run_wrk(wrk, &client_ns, row.target(), Scenario::KeepAlive, WARMUP)
        .with_context(|| format!("{}: warm-up", row.name()))?;
    Ok(())
}

fn measure_all(lab: &mut Lab, wrk: &Path, dir: &Path) -> Result<(Vec<RowResult>, Vec<XdpCost>)> {
    let mut rows = Vec::new();
    let mut costs = Vec::new();
    // The kernel rows first: the agent leaves its program attached (pinned,
    // for a hitless restart) when it stops.
    for row in [Row::Direct, Row::NftDnat] {
        setup_kernel_row(lab, row)?;
        let measured = measure_row(lab, wrk, row);
        teardown_kernel_row(lab, row)?;
        rows.push(measured?);
    }
    for &forwarding in LB_FORWARDING_MODES {
        let row = Row::Lb(forwarding);
        let agent = start_lb(lab, forwarding, dir)?;
        let measured = measure_row(lab, wrk, row)
            .and_then(|r| Ok((r, live_xdp_cost(lab, wrk, row)?)))
            .and_then(|r| {
                ensure!(
                    lab.try_wait(agent)?.is_none(),
                    "the agent exited during the run"
                );
                Ok(r)
            });
        let stopped = lab.stop(agent);
        let (r, cost) = measured?;
        stopped?;
        rows.push(r);
        costs.push(cost);
    }
    Ok((rows, costs))
}

/// Kernel forwarding in the balancer (both kernel rows), answers routed back
/// through it, and for DNAT the rule with conntrack translating the answers.
fn setup_kernel_row(lab: &mut Lab, row: Row) -> Result<()> {
    lab.set_return_path(ReturnPath::Balancer)?;
    lab.set_kernel_forwarding(true)?;
    if row == Row::NftDnat {
        lab.nft(lab.balancer_ns(), &dnat_ruleset())?;
    }
    Ok(())
}

fn teardown_kernel_row(lab: &mut Lab, row: Row) -> Result<()> {
    if row == Row::NftDnat {
        lab.nft(
            lab.balancer_ns(),
            &format!("delete table ip {DNAT_TABLE}\n"),
        )?;
    }
    lab.set_kernel_forwarding(false)
}

/// The DNAT baseline: VIP:80 to be1's server, as an operator would write it.
fn dnat_ruleset() -> String {
    format!(
        "table ip {DNAT_TABLE} {{\n  chain prerouting {{\n    type nat hook prerouting priority dstnat; policy accept;\n    ip daddr {VIP_V4} tcp dport {} dnat to {}:{TCP_PORT}\n  }}\n  chain postrouting {{\n    type nat hook postrouting priority srcnat; policy accept;\n  }}\n}}\n",
        services::VIP_TCP_PORT,
        backend_v4(1),
    )
}

/// Prepares the backends for a forwarding mode: nothing for NAT and L2; for
/// IP-in-IP each backend runs `lb decap` on `eth0` for the VIPs.
fn prepare_backends(lab: &mut Lab, forwarding: Forwarding) -> Result<()> {
    match forwarding {
        Forwarding::Nat | Forwarding::L2 => Ok(()),
        Forwarding::Ipip => lab.start_decap(),
    }
}

/// Starts the agent as users run it: the `lb` binary with a config file
/// (the lab's services with `forwarding`, one backend), in the balancer namespace.
fn start_lb(lab: &mut Lab, forwarding: Forwarding, dir: &Path) -> Result<u32> {
    lab.set_return_path(if forwarding.is_dsr() {
        ReturnPath::Switch
    } else {
        ReturnPath::Balancer
    })?;
    prepare_backends(lab, forwarding)?;
    let config_path = dir.join("lb.toml");
    // No per-client new-flow limit: wrk's new connections come from one client.
    let text = format!(
        "new_flow_limit = 0\n{}",
        services::lab_config_forwarding(lab, &[1], lb_common::DEFAULT_RING_SIZE, None, forwarding)
    );
    std::fs::write(&config_path, text)?;
    let socket = dir.join("lb.sock");
    lb_userspace::demo::start_agent(lab, &config_path, &socket)
}

/// Warm-up, then `ROUNDS` runs of each scenario; keeps each scenario's median.
fn measure_row(lab: &mut Lab, wrk: &Path, row: Row) -> Result<RowResult> {
    let client_ns = lab.client_ns().to_string();
    warm_up(lab, wrk, row)?;
    let mut medians = Vec::new();
    for s in SCENARIOS {
        let mut runs = Vec::new();
        for _ in 0..ROUNDS {
            runs.push(
                run_wrk(wrk, &client_ns, row.target(), s, WINDOW)
                    .with_context(|| format!("{}: {}", row.name(), s.name()))?,
            );
        }
        runs.sort_by(|a, b| a.rps().total_cmp(&b.rps()));
        medians.push(runs[runs.len() / 2]);
    }
    Ok(RowResult { row, medians })
}

fn print_rows(rows: &[RowResult]) {
    println!(
        "L4 paths through the namespace lab (1 backend: the lab's server; wrk -t1 -c{CONNECTIONS} \
         from the client namespace, median of {ROUNDS} runs of {} s; ratios against the direct row):",
        WINDOW.as_secs()
    );
    println!(
        "  {:<42} {:>15}   {:>15}   {:>15}   {:>17}",
        "", "keep-alive", "new conn", "64 KiB", "p99 ms"
    );
    println!(
        "  {:<42} {:>15}   {:>15}   {:>15}   {:>8} {:>8}",
        "", "req/s", "conn/s", "MB/s", "k-alive", "new conn"
    );
    let Some(base) = rows.first() else {
        return;
    };
    let mb = |r: &RowResult| r.rate(2) * BULK_BYTES as f64 / 1e6;
    for r in rows {
        println!(
            "  {:<42} {:>8.0} {:>5.2}x   {:>8.0} {:>5.2}x   {:>8.0} {:>5.2}x   {:>8.3} {:>8.3}",
            r.row.name(),
            r.rate(0),
            r.rate(0) / base.rate(0),
            r.rate(1),
            r.rate(1) / base.rate(1),
            mb(r),
            mb(r) / mb(base),
            r.medians[0].p99_ms,
            r.medians[1].p99_ms,
        );
    }
    let errors: Vec<String> = rows
        .iter()
        .flat_map(|r| {
            SCENARIOS
                .iter()
                .zip(&r.medians)
                .filter(|(_, m)| m.errors > 0)
                .map(move |(s, m)| format!("{} {}: {}", r.row.name(), s.name(), m.errors))
        })
        .collect();
    if !errors.is_empty() {
        println!(
            "  errors in the median runs (socket errors + non-2xx): {}",
            errors.join("; ")
        );
    }
}

/// One wrk run from the client namespace, killed if it overruns.
fn run_wrk(
    wrk: &Path,
    client_ns: &str,
    target: SocketAddr,
    s: Scenario,
    window: Duration,
) -> Result<Measure> {
    let url = format!("http://{target}{}", s.path());
    let mut cmd = ns_command(client_ns, wrk);
    cmd.args(["-t1", &format!("-c{CONNECTIONS}")])
        .arg(format!("-d{}s", window.as_secs()))
        .args(["--latency", "--timeout", REQUEST_TIMEOUT]);
    if matches!(s, Scenario::NewConnection) {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(&url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting wrk")?;
    // wrk's output is a few hundred bytes: the pipes cannot fill up.
    let deadline = Instant::now() + window + WRK_GRACE;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("wrk did not finish within {:?}", window + WRK_GRACE);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk {url} failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let m = parse_wrk(&text).with_context(|| format!("wrk {url} output:\n{text}"))?;
    ensure!(m.requests > 0, "no request completed: {text}");
    Ok(m)
}

/// `kernel.bpf_stats_enabled` set to 1 while this lives, then put back.
struct BpfStats {
    previous: String,
}

impl BpfStats {
    fn enable() -> Result<Self> {
        let previous = std::fs::read_to_string(BPF_STATS_SYSCTL)
            .with_context(|| format!("reading {BPF_STATS_SYSCTL}"))?;
        std::fs::write(BPF_STATS_SYSCTL, "1")
            .with_context(|| format!("writing 1 to {BPF_STATS_SYSCTL}"))?;
        Ok(Self {
            previous: previous.trim().to_string(),
        })
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        if let Err(e) = std::fs::write(BPF_STATS_SYSCTL, &self.previous) {
            eprintln!(
                "warning: restoring {BPF_STATS_SYSCTL} to {}: {e}",
                self.previous
            );
        }
    }
}

/// Run time and run count of a set of programs, summed.
#[derive(Clone, Copy, Debug, Default)]
struct Runs {
    ns: u64,
    count: u64,
}

impl Runs {
    fn of(ids: &[u32]) -> Result<Runs> {
        let mut total = Runs::default();
        let mut found = 0;
        for info in aya::programs::loaded_programs() {
            let info = info.context("reading a loaded program's info")?;
            if ids.contains(&info.id()) {
                total.ns += info.run_time().as_nanos() as u64;
                total.count += info.run_count();
                found += 1;
            }
        }
        ensure!(found == ids.len(), "programs {ids:?}: found {found}");
        Ok(total)
    }

    fn since(self, before: Runs) -> Runs {
        Runs {
            ns: self.ns.saturating_sub(before.ns),
            count: self.count.saturating_sub(before.count),
        }
    }

    fn add(&mut self, other: Runs) {
        self.ns += other.ns;
        self.count += other.count;
    }

    fn ns_per_run(self) -> f64 {
        self.ns as f64 / self.count.max(1) as f64
    }
}

/// The live cost of the agent's program against the pass programs, per scenario.
struct XdpCost {
    row: Row,
    lb_ids: Vec<u32>,
    pass_ids: Vec<u32>,
    /// Per scenario: (lb_xdp, xdp_pass) deltas.
    scenarios: Vec<(Scenario, Runs, Runs)>,
}

impl XdpCost {
    fn print(&self) {
        println!(
            "Live XDP cost during the {} row (kernel.bpf_stats_enabled=1 over one more {} s run of each scenario; \
             lb_xdp {:?} on lbc+lbb against xdp_pass {:?} on c0+up, the far ends of the same veths; deltas over each run):",
            self.row.name(),
            WINDOW.as_secs(),
            self.lb_ids,
            self.pass_ids
        );
        println!(
            "  {:<42} {:>10} {:>11}   {:>10} {:>11}   {:>6}",
            "", "lb_xdp", "packets", "xdp_pass", "packets", "ratio"
        );
        let mut all = (Runs::default(), Runs::default());
        // Keep-alive and 64 KiB packets belong to established flows (but
        // for wrk's first 50 handshakes): the figure the target is on.
        let mut established = (Runs::default(), Runs::default());
        for (s, lb, pass) in &self.scenarios {
            all.0.add(*lb);
            all.1.add(*pass);
            if !matches!(s, Scenario::NewConnection) {
                established.0.add(*lb);
                established.1.add(*pass);
            }
            self.line(s.name(), *lb, *pass, "");
        }
        self.line(
            "established flows (keep-alive + 64 KiB)",
            established.0,
            established.1,
            "",
        );
        self.line(
            "all three",
            all.0,
            all.1,
            "   (lb_xdp ns/packet / xdp_pass ns/packet)",
        );
    }

    fn line(&self, what: &str, lb: Runs, pass: Runs, note: &str) {
        println!(
            "  {what:<42} {:>7.1} ns {:>11}   {:>7.1} ns {:>11}   {:>5.2}x{note}",
            lb.ns_per_run(),
            lb.count,
            pass.ns_per_run(),
            pass.count,
            lb.ns_per_run() / pass.ns_per_run()
        );
    }
}

/// With BPF statistics on, one more run of each scenario against the lb
/// row's target; the deltas of the programs' run time and count over each.
fn live_xdp_cost(lab: &Lab, wrk: &Path, row: Row) -> Result<XdpCost> {
    let ids = |pairs: &[(&str, &str)]| -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        for (ns, iface) in pairs {
            let id = lab
                .xdp_program_id(ns, iface)?
                .ok_or_else(|| anyhow!("no XDP program on {iface} in {ns}"))?;
            if !ids.contains(&id) {
                ids.push(id);
            }
        }
        Ok(ids)
    };
    let lb_ids = ids(&[(lab.balancer_ns(), "lbc"), (lab.balancer_ns(), "lbb")])?;
    let pass_ids = ids(&[(lab.client_ns(), "c0"), (lab.switch_ns(), "up")])?;
    let client_ns = lab.client_ns().to_string();
    let _stats = BpfStats::enable()?;
    let mut scenarios = Vec::new();
    for s in SCENARIOS {
        let (lb0, pass0) = (Runs::of(&lb_ids)?, Runs::of(&pass_ids)?);
        run_wrk(wrk, &client_ns, row.target(), s, WINDOW)
            .with_context(|| format!("{} with BPF statistics: {}", row.name(), s.name()))?;
        let (lb1, pass1) = (Runs::of(&lb_ids)?, Runs::of(&pass_ids)?);
        scenarios.push((s, lb1.since(lb0), pass1.since(pass0)));
    }
    Ok(XdpCost {
        row,
        lb_ids,
        pass_ids,
        scenarios,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dnat_rule_names_the_vip_and_backend() {
        let text = dnat_ruleset();
        assert!(
            text.contains("ip daddr 198.18.100.1 tcp dport 80 dnat to 198.18.2.11:8080"),
            "{text}"
        );
    }

    #[test]
    fn rows_are_named_by_forwarding_mode() {
        assert_eq!(lb_row_name(Forwarding::Nat), "lb XDP NAT");
        assert_eq!(Row::Lb(Forwarding::L2).target(), services::vip_tcp4());
        assert_eq!(Row::Direct.target().port(), TCP_PORT);
        assert!(LB_FORWARDING_MODES.contains(&Forwarding::Nat));
    }

    #[test]
    fn runs_subtract() {
        let a = Runs {
            ns: 1000,
            count: 10,
        };
        let b = Runs {
            ns: 4000,
            count: 30,
        };
        let d = b.since(a);
        assert_eq!((d.ns, d.count), (3000, 20));
        assert!((d.ns_per_run() - 150.0).abs() < 1e-9);
    }
}
