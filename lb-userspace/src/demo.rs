//! `lb demo` (what `cargo xtask run` does with no arguments): builds the
//! namespace lab, runs the agent in its balancer namespace, shows a few
//! requests being balanced, and removes everything on Ctrl-C.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use lb_common::DEFAULT_RING_SIZE;
use tokio::signal::unix::{SignalKind, signal};

use crate::lab::{
    self, Lab, LabOptions,
    client::{http_get, tcp_ask},
    services::{self, METRICS_ADDR},
};

/// Starts the agent in the lab's balancer namespace with `config_path`, its
/// control socket at `socket`, and waits until its metrics endpoint answers
/// (so the program is attached).
pub fn start_agent(
    lab: &mut Lab,
    config_path: &std::path::Path,
    socket: &std::path::Path,
) -> Result<u32> {
    start_node_agent(lab, 1, config_path, socket)
}

/// [`start_agent`] for balancer node `node` of a cluster lab (node 1 is the
/// balancer namespace), pinned in the node's own directory.
pub fn start_node_agent(
    lab: &mut Lab,
    node: usize,
    config_path: &std::path::Path,
    socket: &std::path::Path,
) -> Result<u32> {
    let ns = lab.node_ns(node)?;
    let pin_dir = lab.node_pin_dir(node)?;
    let pid = lab.spawn_node_agent(
        node,
        &[
            "--config".into(),
            config_path.into(),
            "--socket".into(),
            socket.into(),
            "--pin-dir".into(),
            pin_dir.into(),
        ],
    )?;
    let deadline = Instant::now() + Duration::from_secs(20);
    let metrics = METRICS_ADDR.parse()?;
    loop {
        let up = lab::run_in_ns(&ns, move || {
            http_get(metrics, "/metrics", Duration::from_millis(500)).is_ok()
        })?;
        if up {
            return Ok(pid);
        }
        if let Some(status) = lab.try_wait(pid)? {
            bail!("the agent exited during start-up ({status})");
        }
        if Instant::now() > deadline {
            bail!("the agent did not come up within 20 s");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Health checks the demo runs on every backend.
const DEMO_HEALTH: &str = "kind = \"http\"\ninterval = \"1s\"\npath = \"/\"";

/// Runs the demo until Ctrl-C.
pub async fn run(backends: usize) -> Result<()> {
    // Registered before anything is built, so a Ctrl-C at any point is held
    // until the lab can be removed instead of killing the process mid-way.
    let mut sigint = signal(SignalKind::interrupt())?;
    let mut sigterm = signal(SignalKind::terminate())?;
    let opts = LabOptions::from_env(backends)?;
    println!("demo: building a namespace lab with {backends} backends ...");
    let mut lab = Lab::create("demo", opts)?;
    let dir = PathBuf::from(format!("/tmp/{}", lab.balancer_ns()));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let config_path = dir.join("lb.toml");
    let weights: Vec<u32> = (1..=backends as u32).collect();
    std::fs::write(
        &config_path,
        services::lab_config(&lab, &weights, DEFAULT_RING_SIZE, Some(DEMO_HEALTH)),
    )?;
    let result = match demo_body(&mut lab, &config_path, &weights) {
        Ok(()) => {
            tokio::select! {
                _ = sigint.recv() => {}
                _ = sigterm.recv() => {}
            }
            println!("\ndemo: stopping");
            Ok(())
        }
        Err(e) => Err(e),
    };
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
    println!("demo: lab removed");
    result
}

fn demo_body(lab: &mut Lab, config_path: &std::path::Path, weights: &[u32]) -> Result<()> {
    let socket = config_path.with_file_name("lb.sock");
    start_agent(lab, config_path, &socket)?;
    let vip = services::vip_tcp4();
    let tally = lab::run_in_ns(lab.client_ns(), move || {
        let mut tally = BTreeMap::<String, usize>::new();
        for _ in 0..60 {
            let name =
                tcp_ask(vip, Duration::from_secs(2)).unwrap_or_else(|e| format!("error: {e}"));
            *tally.entry(name).or_default() += 1;
        }
        tally
    })?;
    println!("\ndemo: 60 new TCP connections from the client to {vip} (weights {weights:?}):");
    for (name, n) in &tally {
        println!("  {name:>8}: {n}");
    }
    let cli = lab.client_ns();
    let bal = lab.balancer_ns();
    println!(
        "\nTry it yourself (as root, in another terminal):\n\
         \x20 ip netns exec {cli} curl -s http://{vip}/\n\
         \x20 ip netns exec {cli} curl -s http://{}/\n\
         \x20 ip netns exec {bal} curl -s http://{METRICS_ADDR}/metrics\n\
         \x20 {lb} --socket {sock} show backends\n\
         \x20 {lb} --socket {sock} drain tcp4 {be1}\n\
         Config in force: {}\n\
         Press Ctrl-C to stop and remove the lab.",
        services::vip_tcp6(),
        config_path.display(),
        sock = socket.display(),
        lb = lab.options().lb_bin.display(),
        be1 = std::net::SocketAddr::new(lab.backends()[0].v4.into(), lab::TCP_PORT),
    );
    Ok(())
}
