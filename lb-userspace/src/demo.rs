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

/// Writes the demo's `lb.toml` into `dir` (the lab's L4 services weighted
/// 1, 2, ..., plus the HTTPS frontend of [`services::demo_l7_config`]) and
/// makes the l7 VIP local on the balancer, as an operator would; returns
/// the config's path.
pub fn prepare(lab: &Lab, dir: &std::path::Path) -> Result<PathBuf> {
    let weights: Vec<u32> = (1..=lab.backends().len() as u32).collect();
    let mut text = services::lab_config(lab, &weights, DEFAULT_RING_SIZE, Some(DEMO_HEALTH));
    text.push_str(&services::demo_l7_config(lab, dir)?);
    let path = dir.join("lb.toml");
    std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    lab.make_local_on_balancer(services::vip_l7().ip())?;
    Ok(path)
}

/// A command the demo prints for its user, run as printed by its test.
pub struct TryCommand {
    /// What it shows.
    pub what: String,
    /// The shell command.
    pub shell: String,
}

/// The demo's commands for the L7 proxy, the UDP services and a ping.
pub fn try_commands(lab: &Lab) -> Vec<TryCommand> {
    let cli = lab.client_ns();
    let l7 = services::vip_l7();
    let curl = format!(
        "ip netns exec {cli} curl -sk --http2 --resolve {host}:{port}:{ip}",
        host = services::DEMO_HOST,
        port = l7.port(),
        ip = l7.ip()
    );
    let url = |path: &str| format!("https://{}{path}", services::DEMO_HOST);
    let web: Vec<String> = lab
        .backends()
        .iter()
        .skip(1)
        .map(|b| b.name.clone())
        .collect();
    let api = lab
        .backends()
        .first()
        .map_or("be1".into(), |b| b.name.clone());
    vec![
        TryCommand {
            what: format!(
                "HTTPS, HTTP/2 over ALPN, pool web ({}): the name, then the HTTP version",
                web.join(", ")
            ),
            shell: format!("{curl} -w '%{{http_version}}\\n' {}", url("/")),
        },
        TryCommand {
            what: format!("{} routed to pool api ({api})", services::DEMO_API_PREFIX),
            shell: format!("{curl} {}", url("/api/users")),
        },
        TryCommand {
            what: format!("{} denied by a rule: 403", services::DEMO_DENIED_PREFIX),
            shell: format!(
                "{curl} -o /dev/null -w '%{{http_code}}\\n' {}",
                url("/admin")
            ),
        },
        TryCommand {
            what: "UDP to the VIP: a backend's name".into(),
            shell: format!(
                "ip netns exec {cli} bash -c 'exec 3<>/dev/udp/{ip}/{port}; echo hi >&3; timeout 2 head -n1 <&3'",
                ip = services::vip_udp4().ip(),
                port = services::vip_udp4().port()
            ),
        },
        TryCommand {
            what: "ping the IPv6 VIP: XDP answers (the stack has no such address)".into(),
            shell: format!(
                "ip netns exec {cli} ping -n -c 2 -i 0.2 -W 2 {} | grep -c 'bytes from'",
                services::vip_tcp6().ip()
            ),
        },
    ]
}

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
    let weights: Vec<u32> = (1..=backends as u32).collect();
    let result = match prepare(&lab, &dir)
        .and_then(|config_path| demo_body(&mut lab, &config_path, &weights))
    {
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
         \x20 {lb} --socket {sock} drain tcp4 {be1}",
        services::vip_tcp6(),
        sock = socket.display(),
        lb = lab.options().lb_bin.display(),
        be1 = std::net::SocketAddr::new(lab.backends()[0].v4.into(), lab::TCP_PORT),
    );
    println!(
        "\nThe L7 proxy on {} (its access log lines appear below):",
        services::vip_l7()
    );
    for c in try_commands(lab) {
        println!("  # {}\n  {}", c.what, c.shell);
    }
    println!(
        "\nConfig in force: {}\nPress Ctrl-C to stop and remove the lab.",
        config_path.display()
    );
    Ok(())
}
