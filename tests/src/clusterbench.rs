//! `lb-bench`'s `cluster` section: two `lb` nodes behind the lab's ECMP
//! router (`LabOptions::with_cluster`), each agent announcing through its
//! BIRD (`[bgp]`). How long the router takes to stop sending to a node after
//! `lb drain-node`, against BIRD withdrawing the same routes by itself
//! (`disable` of the node's session: no agent involved); after a backend
//! health change, against the configured detection time; and how many
//! connections one node's failure under load costs, against the same load
//! without the failure. Every figure is the median of [`ROUNDS`].

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_userspace::bgp::bird;
use lb_userspace::lab::services::{self, Forwarding};
use lb_userspace::lab::{VIP_V4, VIP_V6, client::tcp_ask, cluster::NODE_BGP_PROTOCOL, run_in_ns};

use crate::RunningCluster;
use crate::cluster::Prober;

/// Measured repetitions per figure.
const ROUNDS: usize = 3;
/// Health checks of the bench's services.
const CHECK_INTERVAL: Duration = Duration::from_millis(500);
/// Failed checks before a backend is down.
const CHECK_FALL: u32 = 2;
/// Longest wait for a route change.
const ROUTE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long node 1 stays unplugged in the failure run.
const OUTAGE: Duration = Duration::from_secs(3);

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the section.
pub fn run() -> Result<()> {
    println!("\n== cluster: two nodes behind an ECMP router, BGP through BIRD ==");
    let health = format!(
        "kind = \"tcp\"\ninterval = \"{}ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = {CHECK_FALL}",
        CHECK_INTERVAL.as_millis()
    );
    let c = RunningCluster::start("clbench", 2, &[1, 1, 1], Forwarding::Ipip, Some(&health))?;
    let v4 = IpAddr::V4(VIP_V4);
    let v6 = IpAddr::V6(VIP_V6);
    for vip in [v4, v6] {
        c.lab.wait_router_next_hops(vip, 2, ROUTE_TIMEOUT)?;
    }

    timings(&c, v4, v6)?;

    // One node failing under load, against the same load without it.
    let quiet = load(&c, false)?;
    let failing = load(&c, true)?;
    println!(
        "  {:<58} {:>5} of {:<6} (new {} of {})",
        "baseline: connections lost, no failure",
        quiet.lost_long,
        quiet.long,
        quiet.new_failed,
        quiet.new
    );
    println!(
        "  {:<58} {:>5} of {:<6} (new {} of {}; target 0)",
        "connections lost, node 1 unplugged mid-load",
        failing.lost_long,
        failing.long,
        failing.new_failed,
        failing.new
    );
    if let Some(w) = failing.withdrawn {
        println!(
            "  {:<58} {:>8.1} ms",
            "  node 1 withdrawn by BFD after",
            ms(w)
        );
    }
    Ok(())
}

/// How fast the router follows BIRD alone, `lb drain-node` and a health
/// change, each against its baseline.
fn timings(c: &RunningCluster, v4: IpAddr, v6: IpAddr) -> Result<()> {
    // BIRD alone: the node's session shut down and brought back.
    let socket = c.lab.node_bird_socket(1)?;
    let session = timed(
        c,
        v4,
        || Ok(bird::command(&socket, &format!("disable {NODE_BGP_PROTOCOL}")).map(drop)?),
        || Ok(bird::command(&socket, &format!("enable {NODE_BGP_PROTOCOL}")).map(drop)?),
    )?;
    // The agent: drain-node, then undrain-node.
    let drain = timed(
        c,
        v4,
        || ensure_ok(c, 1, &["drain-node"]),
        || ensure_ok(c, 1, &["undrain-node"]),
    )?;
    // A health change: node 1's checks of the backends' IPv6 addresses fail.
    let node1 = c.lab.node_ns(1)?;
    let health_times = timed(
        c,
        v6,
        || {
            c.lab.nft(
                &node1,
                "table inet lbhcblock {\n chain out {\n  type filter hook output priority 0;\n  ip6 daddr fd00:18:2::/64 meta l4proto tcp reject with tcp reset\n }\n}\n",
            )
        },
        || c.lab.nft(&node1, "delete table inet lbhcblock\n"),
    )?;
    let detection = CHECK_INTERVAL * CHECK_FALL;
    let detection_row = format!("baseline: health detection ({CHECK_FALL} x {CHECK_INTERVAL:?})");
    for (row, time, baseline) in [
        (
            "baseline: BIRD disables the node's session",
            session,
            session,
        ),
        (
            "lb drain-node -> router stops using the node",
            drain,
            session,
        ),
        (detection_row.as_str(), detection, detection),
        (
            "backends down on node 1 -> its VIP withdrawn on the router",
            health_times,
            detection,
        ),
    ] {
        let ratio = ms(time) / ms(baseline);
        println!("  {row:<58} {:>8.1} ms   {ratio:.2}x", ms(time));
    }
    Ok(())
}

/// The median over `ROUNDS` of how long the router takes to drop to one
/// next hop for `vip` after `change`; `undo` brings the second back between
/// rounds.
fn timed(
    c: &RunningCluster,
    vip: IpAddr,
    change: impl Fn() -> Result<()>,
    undo: impl Fn() -> Result<()>,
) -> Result<Duration> {
    let mut times = Vec::new();
    for _ in 0..ROUNDS {
        let start = Instant::now();
        change()?;
        c.lab.wait_router_next_hops(vip, 1, ROUTE_TIMEOUT)?;
        times.push(start.elapsed());
        undo()?;
        c.lab.wait_router_next_hops(vip, 2, ROUTE_TIMEOUT)?;
    }
    Ok(median(times))
}

fn ensure_ok(c: &RunningCluster, node: usize, args: &[&str]) -> Result<()> {
    let out = c.lb(node, args);
    if !out.status.success() {
        bail!(
            "lb {} on node {node}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// What one load run cost.
struct Load {
    long: usize,
    lost_long: usize,
    new: usize,
    new_failed: usize,
    withdrawn: Option<Duration>,
}

/// 100 long-lived connections asked in rounds, and new connections opened
/// one after another, for the length of an outage; with `fail`, node 1 is
/// unplugged for [`OUTAGE`] and plugged back in.
fn load(c: &RunningCluster, fail: bool) -> Result<Load> {
    let prober = Prober::start(c);
    let stop = Arc::new(AtomicBool::new(false));
    let (opened, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let client = c.lab.client_ns().to_string();
    let (stop2, opened2, failed2) = (stop.clone(), opened.clone(), failed.clone());
    let opener = std::thread::spawn(move || {
        run_in_ns(&client, move || {
            let vip = services::vip_tcp4();
            let deadline = Instant::now() + Duration::from_secs(60);
            while !stop2.load(Ordering::SeqCst) && Instant::now() < deadline {
                if tcp_ask(vip, Duration::from_secs(3)).is_err() {
                    failed2.fetch_add(1, Ordering::SeqCst);
                }
                opened2.fetch_add(1, Ordering::SeqCst);
            }
        })
    });
    let mut withdrawn = None;
    if fail {
        let start = Instant::now();
        c.lab.disconnect_node(1)?;
        withdrawn = Some(
            c.lab
                .wait_router_next_hops(IpAddr::V4(VIP_V4), 1, ROUTE_TIMEOUT)?,
        );
        std::thread::sleep(OUTAGE.saturating_sub(start.elapsed()));
        c.lab.reconnect_node(1)?;
        c.lab.wait_cluster_ready(ROUTE_TIMEOUT)?;
        c.lab
            .wait_router_next_hops(IpAddr::V4(VIP_V4), 2, ROUTE_TIMEOUT)?;
    } else {
        std::thread::sleep(OUTAGE + Duration::from_secs(2));
    }
    prober.wait_rounds(2);
    stop.store(true, Ordering::SeqCst);
    opener
        .join()
        .map_err(|_| anyhow::anyhow!("the opener panicked"))?
        .context("client namespace")?;
    let report = prober.finish();
    Ok(Load {
        long: report.connections,
        lost_long: report
            .failures
            .iter()
            .filter_map(|f| f.split(':').next())
            .collect::<std::collections::BTreeSet<_>>()
            .len(),
        new: opened.load(Ordering::SeqCst),
        new_failed: failed.load(Ordering::SeqCst),
        withdrawn,
    })
}
