//! `lb-bench l7instr`: user-space instructions per proxied HTTP request, on
//! one keep-alive connection and with a new connection per request, ours
//! against HAProxy, counted by valgrind's callgrind on loopback.
//!
//! Instruction counts do not depend on what else the machine is doing, so
//! this comparison holds on a noisy VM where CPU-time ratios move by ±20 %
//! between runs. Each proxy runs under callgrind twice, serving `SHORT` and
//! then `LONG` requests (from one keep-alive client connection, or each on a
//! connection of its own); the difference divided by `LONG - SHORT` removes
//! start-up and shutdown. The kernel's share
//! (the TCP path, about the same for both) is not counted.
//!
//! Both run with glibc's `rep movsb` threshold raised
//! ([`MEMCPY_TUNABLE`]): callgrind counts each byte a `rep movsb` moves as
//! an instruction, so a copy past the threshold (4 KiB here: our per-request
//! box of the HTTP/1 exchange's future, 8.7 KiB) read as 8 700
//! "instructions" for what the CPU does in a few hundred cycles, and a
//! struct growing past it looked like a 50 % regression. Copied by the
//! vector loop instead, that copy counts a few hundred instructions, closer
//! to its cost.
//!
//! A third row loads both with HTTP/2 (cleartext, prior knowledge) from
//! nghttp2's `h2load`, one connection with ten streams at a time, as
//! browsers and CDNs multiplex: the proxy's HTTP/2 server side (hyper's, for
//! us) in front of the same HTTP/1.1 server.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use lb_proxy::{Algorithm, Frontend, Pool, Proxy, ProxyConfig, ServerSpec};

/// Set for both proxies under callgrind (see the module's doc).
const MEMCPY_TUNABLE: (&str, &str) = (
    "GLIBC_TUNABLES",
    "glibc.cpu.x86_rep_movsb_threshold=1073741824",
);

/// Requests of the short and the long run (keep-alive, one connection).
const SHORT: u64 = 500;
const LONG: u64 = 2500;
/// How long a proxy under valgrind may take to start listening or to exit.
const START_TIMEOUT: Duration = Duration::from_secs(120);

/// A child process stopped (SIGTERM, then SIGKILL) when dropped.
pub(crate) struct Proc(pub(crate) Child);

impl Drop for Proc {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            // SAFETY: kill on our own child's pid.
            unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = self.0.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A free loopback port (bound, then released).
pub(crate) fn free_port() -> Result<SocketAddr> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?)
}

/// Runs the comparison and prints it; skipped with a note when valgrind is missing.
pub fn run() -> Result<()> {
    let Some(valgrind) = super::l7bench::which("valgrind") else {
        println!("Instructions per L7 request: skipped (valgrind is not installed)");
        return Ok(());
    };
    let haproxy = super::l7bench::which("haproxy")
        .ok_or_else(|| anyhow!("haproxy is not installed (`cargo xtask setup`)"))?;
    let lb = std::env::var_os("LB_BIN")
        .map(PathBuf::from)
        .context("LB_BIN is not set (path of the `lb` binary; run via `cargo xtask bench`)")?;
    let h2load = super::l7bench::which("h2load");
    let me = std::env::current_exe()?;
    let dir = std::env::temp_dir().join(format!("lb-l7instr-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let result = (|| -> Result<Vec<(Load, f64, f64)>> {
        let (_backend, backend_addr) = start_backend(&lb)?;
        let per_request =
            |name: &str, cmd: &dyn Fn(SocketAddr) -> Command, load: Load| -> Result<f64> {
                let mut counts = Vec::new();
                for n in [SHORT, LONG] {
                    let listen = free_port()?;
                    let out = dir.join(format!("{name}-{n}-{load:?}.callgrind"));
                    let inner = cmd(listen);
                    let mut c = Command::new(&valgrind);
                    c.env(MEMCPY_TUNABLE.0, MEMCPY_TUNABLE.1)
                        .arg("--tool=callgrind")
                        .arg(format!("--callgrind-out-file={}", out.display()))
                        .arg(inner.get_program())
                        .args(inner.get_args())
                        .stdin(Stdio::piped())
                        .stdout(Stdio::null())
                        .stderr(Stdio::null());
                    let mut proxy = Proc(c.spawn().with_context(|| format!("starting {name}"))?);
                    wait_listening(listen, Some(&mut proxy.0))?;
                    load.run(listen, n, h2load.as_deref())
                        .with_context(|| format!("{name}: {n} requests"))?;
                    stop(&mut proxy.0)?;
                    counts.push(total_instructions(&out)?);
                }
                Ok((counts[1] - counts[0]) as f64 / (LONG - SHORT) as f64)
            };
        let cfg = dir.join("haproxy.cfg");
        let haproxy_cmd = |listen: SocketAddr, h2: bool| {
            let _ = std::fs::write(&cfg, haproxy_config(listen, backend_addr, h2));
            let mut c = Command::new(&haproxy);
            c.arg("-db").arg("-f").arg(&cfg);
            c
        };
        let ours_cmd = |listen: SocketAddr| {
            let mut c = Command::new(&me);
            c.args([
                "serve-proxy",
                &listen.to_string(),
                &backend_addr.to_string(),
            ]);
            c
        };
        let mut out = Vec::new();
        for load in Load::ALL {
            if load == Load::H2 && h2load.is_none() {
                continue;
            }
            let h2 = load == Load::H2;
            let h = per_request("haproxy", &|l| haproxy_cmd(l, h2), load)?;
            let o = per_request("ours", &ours_cmd, load)?;
            out.push((load, h, o));
        }
        Ok(out)
    })();
    let _ = std::fs::remove_dir_all(&dir);
    print_figures(&result?, h2load.is_none());
    Ok(())
}

/// Prints the table: per load, HAProxy's and our instructions per request.
fn print_figures(figures: &[(Load, f64, f64)], no_h2load: bool) {
    println!(
        "User-space instructions per HTTP request (callgrind, loopback, {LONG} - {SHORT} requests; \
         HAProxy nbthread 1, ours one tokio thread):"
    );
    println!(
        "                                   HAProxy       ours   ours/HAProxy (target <= 1.00x)"
    );
    for (load, h, o) in figures {
        println!("  {:<30} {h:>9.0}  {o:>9.0}   {:.2}x", load.label(), o / h);
    }
    if no_h2load {
        println!(
            "  (HTTP/2 row skipped: h2load is not installed; `cargo xtask setup` installs it)"
        );
    }
}

/// How the requests of a run reach the proxy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Load {
    /// One HTTP/1.1 keep-alive connection.
    KeepAlive,
    /// A new HTTP/1.1 connection per request.
    NewConnection,
    /// One HTTP/2 connection (h2c), ten streams at a time, from h2load.
    H2,
}

impl Load {
    const ALL: [Load; 3] = [Load::KeepAlive, Load::NewConnection, Load::H2];

    fn label(self) -> &'static str {
        match self {
            Load::KeepAlive => "one keep-alive connection",
            Load::NewConnection => "a new connection each",
            Load::H2 => "HTTP/2, 10 streams at a time",
        }
    }

    fn run(self, addr: SocketAddr, n: u64, h2load: Option<&Path>) -> Result<()> {
        match (self, h2load) {
            (Load::KeepAlive, _) => requests(addr, n, true),
            (Load::NewConnection, _) => requests(addr, n, false),
            (Load::H2, Some(h2load)) => h2_requests(h2load, addr, n),
            (Load::H2, None) => bail!("h2load is not installed"),
        }
    }
}

/// `n` GETs over one HTTP/2 connection, ten streams at a time, by h2load;
/// fails unless every one succeeded.
fn h2_requests(h2load: &Path, addr: SocketAddr, n: u64) -> Result<()> {
    let out = Command::new(h2load)
        .args(["-c", "1", "-t", "1", "-m", "10", "-n", &n.to_string()])
        .arg(format!("http://{addr}/"))
        .output()
        .context("running h2load")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let want = format!("{n} succeeded, 0 failed");
    ensure!(
        out.status.success() && text.contains(&want),
        "h2load: not all of {n} requests succeeded:\n{text}"
    );
    Ok(())
}

/// HAProxy in front of `backend`, as `l7bench` configures it for plain HTTP;
/// with `h2`, its bind speaks HTTP/2 without TLS (prior knowledge, as h2load
/// and our tests' clients do).
pub(crate) fn haproxy_config(listen: SocketAddr, backend: SocketAddr, h2: bool) -> String {
    let proto = if h2 { " proto h2" } else { "" };
    format!(
        "global\n    nbthread 1\n\
         defaults\n    mode http\n    option http-keep-alive\n\
         \x20   timeout connect 5s\n    timeout client 30s\n    timeout server 30s\n\
         frontend web\n    bind {listen}{proto}\n    default_backend app\n\
         backend app\n    http-reuse always\n    server be1 {backend}\n"
    )
}

/// A lab backend server (`lb lab-backend`) on a free loopback port, listening.
pub(crate) fn start_backend(lb: &Path) -> Result<(Proc, SocketAddr)> {
    let addr = free_port()?;
    let mut backend = Proc(
        Command::new(lb)
            .args(["lab-backend", "--name", "be1", "--tcp"])
            .arg(addr.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting the lab backend")?,
    );
    wait_listening(addr, Some(&mut backend.0))?;
    Ok((backend, addr))
}

/// Waits until `addr` accepts connections (or `child` exits).
pub(crate) fn wait_listening(addr: SocketAddr, mut child: Option<&mut Child>) -> Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return Ok(());
        }
        if let Some(c) = child.as_deref_mut()
            && let Some(status) = c.try_wait()?
        {
            bail!("exited ({status}) before listening on {addr}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("nothing listening on {addr} after {START_TIMEOUT:?}")
}

/// Sends `n` GETs, on one keep-alive connection or each on a new one
/// (`Connection: close`), reading each answer in full.
fn requests(addr: SocketAddr, n: u64, keep_alive: bool) -> Result<()> {
    let connect = || -> Result<(TcpStream, BufReader<TcpStream>)> {
        let stream = TcpStream::connect(addr)?;
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        Ok((stream.try_clone()?, BufReader::new(stream)))
    };
    let request: &[u8] = if keep_alive {
        b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: lb-bench\r\nAccept: */*\r\n\r\n"
    } else {
        b"GET / HTTP/1.1\r\nHost: bench\r\nUser-Agent: lb-bench\r\nAccept: */*\r\nConnection: close\r\n\r\n"
    };
    let (mut w, mut r) = connect()?;
    let mut line = String::new();
    let mut body = Vec::new();
    for i in 0..n {
        if !keep_alive && i > 0 {
            (w, r) = connect()?;
        }
        w.write_all(request)?;
        let mut length = None;
        let mut first = true;
        loop {
            line.clear();
            ensure!(r.read_line(&mut line)? > 0, "closed after {i} requests");
            if first {
                ensure!(line.starts_with("HTTP/1.1 200"), "answer {i}: {line:?}");
                first = false;
            }
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            if let Some((k, v)) = l.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                length = Some(v.trim().parse::<usize>()?);
            }
        }
        let length = length.ok_or_else(|| anyhow!("answer {i} without Content-Length"))?;
        body.resize(length, 0);
        r.read_exact(&mut body)?;
    }
    Ok(())
}

/// Stops a proxy under valgrind cleanly, so callgrind writes its counts:
/// our serve mode exits when its stdin closes, HAProxy on SIGUSR1 (soft stop).
fn stop(child: &mut Child) -> Result<()> {
    drop(child.stdin.take());
    // SAFETY: signal to our own child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGUSR1) };
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if child.try_wait()?.is_some() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!("did not exit after {START_TIMEOUT:?}")
}

/// The `summary:` (or `totals:`) line of a callgrind output file.
fn total_instructions(path: &Path) -> Result<u64> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    text.lines()
        .find_map(|l| {
            l.strip_prefix("summary:")
                .or_else(|| l.strip_prefix("totals:"))
        })
        .and_then(|v| v.trim().parse().ok())
        .ok_or_else(|| anyhow!("{}: no instruction total", path.display()))
}

/// `lb-bench serve-proxy LISTEN BACKEND`: our proxy as the bench runs it (one
/// tokio thread, the `l7bench` defaults), until stdin closes or SIGUSR1.
pub fn serve_proxy(listen: SocketAddr, backend: SocketAddr) -> Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut fe = Frontend::new("http", vec![listen], "app");
        fe.forwarded_headers = false;
        let cfg = ProxyConfig {
            frontends: vec![fe],
            pools: vec![Pool::new(
                "app",
                Algorithm::RoundRobin,
                vec![ServerSpec::new(backend)],
            )],
            ..Default::default()
        };
        let proxy = Proxy::start(cfg, None).await?;
        let mut usr1 =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())?;
        let mut stdin = tokio::io::stdin();
        let mut buf = [0u8; 64];
        tokio::select! {
            _ = usr1.recv() => {}
            _ = tokio::io::AsyncReadExt::read(&mut stdin, &mut buf) => {}
        }
        drop(proxy);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_callgrind_totals() {
        let dir = std::env::temp_dir().join(format!("l7instr-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("out");
        std::fs::write(&f, "version: 1\nevents: Ir\nfl=x\n0 5\nsummary: 123456\n").unwrap();
        assert_eq!(total_instructions(&f).unwrap(), 123_456);
        std::fs::write(&f, "events: Ir\n").unwrap();
        assert!(total_instructions(&f).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
