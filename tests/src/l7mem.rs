//! `lb-bench l7mem`: memory per idle HTTP keep-alive client connection, ours
//! against HAProxy, on loopback: `CONNECTIONS` clients each send one request,
//! read the answer and stay connected; the proxy's resident memory grows by
//! what it keeps per idle connection (kernel socket memory is not counted).
//! Once over HTTP/1.1, once over HTTP/2 (prior knowledge: HAProxy's bind says
//! `proto h2`, ours detects the preface), each proxy a fresh process.

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

/// Opens `CONNECTIONS` keep-alive connections to `addr` (HTTP/2 if `h2`),
/// one answered request each, and returns them (still open) with the RSS
/// growth of `pid`.
fn idle_growth(addr: SocketAddr, pid: u32, h2: bool) -> Result<(Vec<TcpStream>, u64)> {
    let before = rss_kib(pid)?;
    let mut open = Vec::with_capacity(CONNECTIONS);
    if h2 {
        open_idle_h2(addr, CONNECTIONS, &mut open)?;
    } else {
        super::l7bench::open_idle(addr, CONNECTIONS, &mut open)?;
    }
    std::thread::sleep(Duration::from_millis(500));
    Ok((open, rss_kib(pid)?.saturating_sub(before)))
}

/// Opens `count` HTTP/2 connections (prior knowledge) to `addr`, each with
/// one GET answered in full (a frame with END_STREAM), into `open`.
fn open_idle_h2(addr: SocketAddr, count: usize, open: &mut Vec<TcpStream>) -> Result<()> {
    use std::io::{Read, Write};
    // The preface, an empty SETTINGS, then HEADERS (END_STREAM, END_HEADERS)
    // on stream 1: GET, http, /, and `:authority: x` (HPACK, no indexing).
    const HELLO: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\
        \x00\x00\x00\x04\x00\x00\x00\x00\x00\
        \x00\x00\x06\x01\x05\x00\x00\x00\x01\x82\x86\x84\x01\x01x";
    const SETTINGS_ACK: &[u8] = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00";
    for i in 0..count {
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connection {i}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(HELLO)?;
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            let n = s.read(&mut buf)?;
            anyhow::ensure!(n > 0, "connection {i} closed before its answer");
            got.extend_from_slice(&buf[..n]);
            if stream_one_ended(&got) {
                break;
            }
        }
        s.write_all(SETTINGS_ACK)?;
        open.push(s);
    }
    Ok(())
}

/// Whether the frames in `data` (from the start of the server's side)
/// include one on stream 1 with END_STREAM.
fn stream_one_ended(data: &[u8]) -> bool {
    let mut at = 0;
    while let Some(head) = data.get(at..at + 9) {
        let len = usize::from(head[0]) << 16 | usize::from(head[1]) << 8 | usize::from(head[2]);
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        // DATA or HEADERS carry END_STREAM in flag 0x1.
        if stream == 1 && (kind == 0 || kind == 1) && flags & 1 != 0 {
            return true;
        }
        at += 9 + len;
    }
    false
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
    let measure = |mut cmd: Command, listen: SocketAddr, h2: bool| -> Result<u64> {
        let mut proxy = Proc(
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()?,
        );
        wait_listening(listen, Some(&mut proxy.0))?;
        let (open, grew) = idle_growth(listen, proxy.0.id(), h2)?;
        drop(open);
        Ok(grew)
    };
    let result = (|| -> Result<Vec<(u64, u64)>> {
        let mut rows = Vec::new();
        for h2 in [false, true] {
            let listen = free_port()?;
            let cfg = dir.join("haproxy.cfg");
            std::fs::write(&cfg, haproxy_config(listen, backend_addr, h2))?;
            let mut h = Command::new(&haproxy);
            h.arg("-db").arg("-f").arg(&cfg);
            let h = measure(h, listen, h2)?;
            let listen = free_port()?;
            let mut o = Command::new(std::env::current_exe()?);
            o.args([
                "serve-proxy",
                &listen.to_string(),
                &backend_addr.to_string(),
            ]);
            let o = measure(o, listen, h2)?;
            rows.push((h, o));
        }
        Ok(rows)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    let rows = result?;
    let per = |kib: u64| kib as f64 / CONNECTIONS as f64;
    println!(
        "Resident memory per idle HTTP keep-alive client connection ({CONNECTIONS} connections, \
         one request each, loopback; each proxy a fresh process):"
    );
    for ((h, o), label) in rows.into_iter().zip(["HTTP/1.1", "HTTP/2 (h2c)"]) {
        println!("  {label}:");
        println!(
            "    baseline: HAProxy (nbthread 1)         {:>6.1} KiB   1.00x",
            per(h)
        );
        println!(
            "    ours (one tokio thread)                {:>6.1} KiB   {:.2}x",
            per(o),
            per(o) / per(h).max(0.1)
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_end_of_stream_one() {
        let settings = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00";
        let headers = b"\x00\x00\x01\x01\x04\x00\x00\x00\x01\x88";
        let data_end = b"\x00\x00\x03\x00\x01\x00\x00\x00\x01be1";
        let mut got = [&settings[..], &headers[..]].concat();
        assert!(!stream_one_ended(&got));
        got.extend_from_slice(&data_end[..5]);
        assert!(!stream_one_ended(&got), "a frame head cut short");
        got.extend_from_slice(&data_end[5..]);
        assert!(stream_one_ended(&got));
    }
}
