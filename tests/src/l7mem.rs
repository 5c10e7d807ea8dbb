//! `lb-bench l7mem`: memory per idle HTTP keep-alive client connection, ours
//! against HAProxy, on loopback: `CONNECTIONS` clients each send one request,
//! read the answer and stay connected; the proxy's resident memory grows by
//! what it keeps per idle connection (kernel socket memory is not counted).

use std::net::{SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};

use super::l7instr::{Proc, free_port, haproxy_config, start_backend, wait_listening};

/// Idle client connections opened per proxy.
const CONNECTIONS: usize = 2000;

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow!("no VmRSS for pid {pid}"))
}

/// Opens `CONNECTIONS` keep-alive connections to `addr`, one answered
/// request each, and returns them (still open) with the RSS growth of `pid`.
fn idle_growth(addr: SocketAddr, pid: u32) -> Result<(Vec<TcpStream>, u64)> {
    let before = rss_kib(pid)?;
    let mut open = Vec::with_capacity(CONNECTIONS);
    super::l7bench::open_idle(addr, CONNECTIONS, &mut open)?;
    std::thread::sleep(Duration::from_millis(500));
    Ok((open, rss_kib(pid)?.saturating_sub(before)))
}

/// Runs the comparison and prints it.
pub fn run() -> Result<()> {
    let haproxy = super::l7bench::which("haproxy")
        .ok_or_else(|| anyhow!("haproxy is not installed (`cargo xtask setup`)"))?;
    let lb = std::env::var_os("LB_BIN")
        .map(PathBuf::from)
        .context("LB_BIN is not set (path of the `lb` binary; run via `cargo xtask bench`)")?;
    // Two file descriptors per client connection in this process, one in the proxy.
    let want = (2 * CONNECTIONS + 256) as u64;
    super::l7bench::raise_open_files(want);
    let (_backend, backend_addr) = start_backend(&lb)?;
    let dir = std::env::temp_dir().join(format!("lb-l7mem-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let measure = |mut cmd: Command, listen: SocketAddr| -> Result<u64> {
        let mut proxy = Proc(
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        wait_listening(listen, Some(&mut proxy.0))?;
        let (open, grew) = idle_growth(listen, proxy.0.id())?;
        drop(open);
        Ok(grew)
    };
    let result = (|| -> Result<(u64, u64)> {
        let listen = free_port()?;
        let cfg = dir.join("haproxy.cfg");
        std::fs::write(&cfg, haproxy_config(listen, backend_addr))?;
        let mut h = Command::new(&haproxy);
        h.arg("-db").arg("-f").arg(&cfg);
        let h = measure(h, listen)?;
        let listen = free_port()?;
        let mut o = Command::new(std::env::current_exe()?);
        o.args([
            "serve-proxy",
            &listen.to_string(),
            &backend_addr.to_string(),
        ]);
        let o = measure(o, listen)?;
        Ok((h, o))
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let (h, o) = result?;
    let per = |kib: u64| kib as f64 / CONNECTIONS as f64;
    println!(
        "Resident memory per idle HTTP keep-alive client connection ({CONNECTIONS} connections, \
         one request each, loopback):"
    );
    println!(
        "  baseline: HAProxy (nbthread 1)           {:>6.1} KiB   1.00x",
        per(h)
    );
    println!(
        "  ours (one tokio thread)                  {:>6.1} KiB   {:.2}x",
        per(o),
        per(o) / per(h).max(0.1)
    );
    Ok(())
}
