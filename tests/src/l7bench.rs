//! `lb-bench`'s L7 comparison: our proxy against HAProxy, one thread each, in
//! front of the same lab backends, loaded by `wrk` from the client namespace in
//! the same run. Printed as ratios ours/HAProxy: requests/s, p99 latency and
//! the CPU time each proxy spent per request (utime + stime from /proc).
//!
//! Both proxies listen on the balancer's client-facing address, which the
//! client reaches directly; no XDP service is involved (no agent runs).

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use lb_proxy::{Algorithm, CertPair, Frontend, Pool, Proxy, ProxyConfig, ServerSpec, TlsConfig};
use lb_userspace::lab::{
    BALANCER_CLIENT_V4, Lab, LabOptions, TCP_PORT, client::http_get, run_in_ns,
};

/// Backends behind both proxies (round robin).
const BACKENDS: usize = 2;
/// Ports of the proxies on the balancer's client-facing address.
const OURS_HTTP: u16 = 8081;
const HAPROXY_HTTP: u16 = 8082;
const OURS_HTTPS: u16 = 8443;
const HAPROXY_HTTPS: u16 = 8444;
/// wrk's open connections (one wrk thread drives them), but for the loaded row.
const CONNECTIONS: u32 = 2;
/// wrk's connections in the loaded new-connection row (its name says 16): at
/// two, neither proxy is busy more than about three quarters of the time and
/// the rate is the round trip's; from about four on, the two cores are the limit.
const LOADED: u32 = 16;
/// Measured runs per proxy and scenario, alternating between the proxies
/// (five: a row's ratio moved by up to ±8 % between runs of three).
const ROUNDS: usize = 5;
/// Length of each measured wrk run, and of the warm-up run per proxy.
const WINDOW: Duration = Duration::from_secs(5);
const WARMUP: Duration = Duration::from_secs(1);
/// Longest a wrk run may take beyond its duration before it is killed.
const WRK_GRACE: Duration = Duration::from_secs(10);
/// wrk's per-request timeout (a slower request counts as an error).
const REQUEST_TIMEOUT: &str = "2s";
/// Connection limit of both proxies (ours' default), unless the open-file
/// limit is lower: HAProxy needs two descriptors per connection plus some.
const MAX_CONNECTIONS: usize = 10_000;
/// How long a proxy gets to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// One row of the comparison: how wrk connects and what it sends.
struct Scenario {
    name: &'static str,
    https: bool,
    close: bool,
    /// wrk's open connections.
    connections: u32,
}

/// The warm-up rows, also measured.
const HTTP_KEEP_ALIVE: Scenario = Scenario {
    name: "HTTP keep-alive",
    https: false,
    close: false,
    connections: CONNECTIONS,
};
const HTTPS_KEEP_ALIVE: Scenario = Scenario {
    name: "HTTPS keep-alive (TLS at the proxy)",
    https: true,
    close: false,
    connections: CONNECTIONS,
};

const SCENARIOS: [Scenario; 5] = [
    HTTP_KEEP_ALIVE,
    Scenario {
        name: "HTTP new connection per request",
        https: false,
        close: true,
        connections: CONNECTIONS,
    },
    Scenario {
        name: "HTTP new connection, wrk -c16",
        https: false,
        close: true,
        connections: LOADED,
    },
    HTTPS_KEEP_ALIVE,
    Scenario {
        name: "HTTPS new connection per request",
        https: true,
        close: true,
        connections: CONNECTIONS,
    },
];

/// What one wrk run measured, with the proxy's CPU time over the same run.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Measure {
    pub(crate) requests: u64,
    pub(crate) seconds: f64,
    pub(crate) p99_ms: f64,
    pub(crate) errors: u64,
    cpu_seconds: f64,
    /// The user-mode part of `cpu_seconds` (the rest is the kernel's).
    user_seconds: f64,
}

impl Measure {
    /// Several runs as one: requests, time and CPU summed; p99 the median run's.
    fn pooled(runs: &[Measure]) -> Measure {
        let mut p99: Vec<f64> = runs.iter().map(|m| m.p99_ms).collect();
        p99.sort_by(f64::total_cmp);
        Measure {
            requests: runs.iter().map(|m| m.requests).sum(),
            seconds: runs.iter().map(|m| m.seconds).sum(),
            p99_ms: p99.get(p99.len() / 2).copied().unwrap_or(f64::NAN),
            errors: runs.iter().map(|m| m.errors).sum(),
            cpu_seconds: runs.iter().map(|m| m.cpu_seconds).sum(),
            user_seconds: runs.iter().map(|m| m.user_seconds).sum(),
        }
    }

    pub(crate) fn rps(&self) -> f64 {
        self.requests as f64 / self.seconds
    }
    fn cpu_us_per_request(&self) -> f64 {
        self.cpu_seconds * 1e6 / self.requests.max(1) as f64
    }
    fn user_us_per_request(&self) -> f64 {
        self.user_seconds * 1e6 / self.requests.max(1) as f64
    }
    fn cpu_share(&self) -> f64 {
        self.cpu_seconds / self.seconds * 100.0
    }
}

/// Runs the comparison and prints it.
pub fn run() -> Result<()> {
    let haproxy = which("haproxy").ok_or_else(|| {
        anyhow!("haproxy is not installed (Debian package `haproxy`; `cargo xtask setup`)")
    })?;
    let wrk = which("wrk").ok_or_else(|| {
        anyhow!("wrk is not installed (Debian package `wrk`; `cargo xtask setup`)")
    })?;
    let version = haproxy_version(&haproxy)?;

    let mut lab = Lab::create("l7bench", LabOptions::from_env(BACKENDS)?)?;
    let dir = Workdir::new(std::env::temp_dir().join(format!("{}-l7", lab.balancer_ns())))?;
    let servers: Vec<SocketAddr> = lab
        .backends()
        .iter()
        .map(|b| SocketAddr::new(b.v4.into(), TCP_PORT))
        .collect();
    let (cert, key, pem) = write_certificate(&dir.0)?;

    let max = max_connections();
    let ours = OurProxy::start(lab.balancer_ns(), proxy_config(&servers, cert, key, max))?;
    let haproxy_cfg = dir.0.join("haproxy.cfg");
    std::fs::write(&haproxy_cfg, haproxy_config(&servers, &pem, max))?;
    check_haproxy_config(&haproxy, &haproxy_cfg)?;
    let balancer_ns = lab.balancer_ns().to_string();
    let args = ["-db".into(), "-f".into(), haproxy_cfg.into_os_string()];
    let haproxy_pid = lab.spawn_in_ns(&balancer_ns, &haproxy, &args)?;
    let result = compare(&mut lab, &wrk, &ours, haproxy_pid, &version);
    // Stop both before the lab goes (it would stop HAProxy too, as its child).
    drop(ours);
    let stopped = lab.stop(haproxy_pid);
    result?;
    stopped?;
    Ok(())
}

fn compare(
    lab: &mut Lab,
    wrk: &Path,
    ours: &OurProxy,
    haproxy_pid: u32,
    version: &str,
) -> Result<()> {
    let client_ns = lab.client_ns().to_string();
    let proxy_addr = |port| SocketAddr::new(BALANCER_CLIENT_V4.into(), port);
    // Both answer with a backend's name before anything is measured.
    wait_ready(lab, &client_ns, proxy_addr(OURS_HTTP), None)?;
    wait_ready(lab, &client_ns, proxy_addr(HAPROXY_HTTP), Some(haproxy_pid))?;
    let our_cpu = || thread_cpu_seconds(ours.tid);
    let haproxy_cpu = || process_cpu_seconds(haproxy_pid);

    let load = |port: u16, s: &Scenario, window: Duration, cpu: &dyn Fn() -> Result<Cpu>| {
        let url = format!(
            "{}://{}/",
            if s.https { "https" } else { "http" },
            proxy_addr(port)
        );
        run_wrk(wrk, &client_ns, &url, s, window, cpu)
    };
    // Warm-up: backend connections open, caches and TLS state built.
    for (http, https, cpu) in [
        (OURS_HTTP, OURS_HTTPS, &our_cpu as &dyn Fn() -> Result<Cpu>),
        (HAPROXY_HTTP, HAPROXY_HTTPS, &haproxy_cpu),
    ] {
        load(http, &HTTP_KEEP_ALIVE, WARMUP, cpu)?;
        load(https, &HTTPS_KEEP_ALIVE, WARMUP, cpu)?;
    }

    let mut rows = Vec::new();
    for s in &SCENARIOS {
        let (ours_port, haproxy_port) = if s.https {
            (OURS_HTTPS, HAPROXY_HTTPS)
        } else {
            (OURS_HTTP, HAPROXY_HTTP)
        };
        // Alternating rounds, pooled: a burst of noise on this shared VM hits both.
        let (mut hs, mut os) = (Vec::new(), Vec::new());
        for _ in 0..ROUNDS {
            hs.push(
                load(haproxy_port, s, WINDOW, &haproxy_cpu)
                    .with_context(|| format!("{}: HAProxy", s.name))?,
            );
            os.push(
                load(ours_port, s, WINDOW, &our_cpu)
                    .with_context(|| format!("{}: ours", s.name))?,
            );
            ensure!(
                lab.try_wait(haproxy_pid)?.is_none(),
                "HAProxy exited during the run"
            );
        }
        rows.push((
            s,
            Measure::pooled(&hs),
            Measure::pooled(&os),
            pair_ratios(&hs, &os),
        ));
    }

    println!(
        "L7 proxy against {version} (one proxy thread each, {BACKENDS} backends round robin; \
         wrk -t1 -c{CONNECTIONS} (-c{LOADED} where the row says) from the client namespace, {ROUNDS} alternating runs of {} s per figure, pooled; \
         CPU = the proxy's utime+stime over the runs):",
        WINDOW.as_secs()
    );
    println!(
        "  {:<36} {:>17}   {:>15}   {:>17}   {:>10}",
        "", "req/s", "p99 ms", "CPU us/req", "ours/HAProxy"
    );
    println!(
        "  {:<36} {:>8} {:>8}   {:>7} {:>7}   {:>8} {:>8}   {:>6} {:>5} {:>7}",
        "", "HAProxy", "ours", "HAProxy", "ours", "HAProxy", "ours", "req/s", "p99", "CPU/req"
    );
    for (s, h, o, _) in &rows {
        println!(
            "  {:<36} {:>8.0} {:>8.0}   {:>7.3} {:>7.3}   {:>8.1} {:>8.1}   {:>5.2}x {:>4.2}x {:>6.2}x",
            s.name,
            h.rps(),
            o.rps(),
            h.p99_ms,
            o.p99_ms,
            h.cpu_us_per_request(),
            o.cpu_us_per_request(),
            o.rps() / h.rps(),
            o.p99_ms / h.p99_ms,
            o.cpu_us_per_request() / h.cpu_us_per_request(),
        );
    }
    println!(
        "  proxy CPU busy during each run (HAProxy / ours): {}   (target: ours >= 1.00x req/s at <= 1.00x CPU/req)",
        rows.iter()
            .map(|(_, h, o, _)| format!("{:.0}%/{:.0}%", h.cpu_share(), o.cpu_share()))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  of which user-mode CPU us/req (HAProxy / ours; the rest is kernel, mostly the veth and TCP path): {}",
        rows.iter()
            .map(|(_, h, o, _)| format!(
                "{:.1}/{:.1}",
                h.user_us_per_request(),
                o.user_us_per_request()
            ))
            .collect::<Vec<_>>()
            .join(", ")
    );
    println!(
        "  ours/HAProxy req/s of each alternating pair of runs, lowest and highest: {}",
        rows.iter()
            .map(|(_, _, _, (lo, hi))| format!("{lo:.2}-{hi:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let errors: Vec<String> = rows
        .iter()
        .filter(|(_, h, o, _)| h.errors + o.errors > 0)
        .map(|(s, h, o, _)| format!("{}: HAProxy {}, ours {}", s.name, h.errors, o.errors))
        .collect();
    if !errors.is_empty() {
        println!("  errors (socket errors + non-2xx): {}", errors.join("; "));
    }
    Ok(())
}

/// The lowest and highest ours/HAProxy requests/s over pairs of runs made
/// one after the other: the spread of a row's ratio within one bench run.
fn pair_ratios(haproxy: &[Measure], ours: &[Measure]) -> (f64, f64) {
    haproxy
        .iter()
        .zip(ours)
        .map(|(h, o)| o.rps() / h.rps())
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), r| {
            (lo.min(r), hi.max(r))
        })
}

/// Our proxy on its own OS thread in the balancer namespace, driven by a
/// single-threaded tokio runtime: every task of the proxy runs on that thread.
struct OurProxy {
    tid: i32,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl OurProxy {
    fn start(ns: &str, config: ProxyConfig) -> Result<Self> {
        let ns = ns.to_string();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<i32>>();
        let thread = std::thread::Builder::new()
            .name("l7bench-ours".into())
            .spawn(move || {
                let ready = ready_tx.clone();
                let outcome = run_in_ns(&ns, move || -> Result<()> {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()?;
                    rt.block_on(async move {
                        let proxy = match Proxy::start(config, None).await {
                            Ok(p) => p,
                            Err(e) => {
                                let _ = ready.send(Err(e));
                                return;
                            }
                        };
                        // SAFETY: gettid has no preconditions.
                        let _ = ready.send(Ok(unsafe { libc::gettid() }));
                        // Serves until told to stop (or the sender is dropped).
                        let _ = stop_rx.await;
                        drop(proxy);
                    });
                    Ok(())
                });
                if let Err(e) = outcome.and_then(|r| r) {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .context("spawning the proxy thread")?;
        let mut proxy = OurProxy {
            tid: 0,
            stop: Some(stop_tx),
            thread: Some(thread),
        };
        proxy.tid = ready_rx
            .recv_timeout(READY_TIMEOUT)
            .context("our proxy did not start")??;
        Ok(proxy)
    }
}

impl Drop for OurProxy {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Our proxy's configuration: a plain and a TLS frontend on the balancer's
/// client-facing address, one round-robin pool over the lab's backends.
/// Timeouts are the defaults, which the HAProxy config repeats.
fn proxy_config(servers: &[SocketAddr], cert: PathBuf, key: PathBuf, max: usize) -> ProxyConfig {
    let bind = |port| SocketAddr::new(BALANCER_CLIENT_V4.into(), port);
    let mut http = Frontend::new("http", vec![bind(OURS_HTTP)], "app");
    // HAProxy adds no forwarding headers unless told (`option forwardfor`).
    http.forwarded_headers = false;
    http.max_connections = max;
    let mut https = Frontend::new("https", vec![bind(OURS_HTTPS)], "app");
    https.forwarded_headers = false;
    https.max_connections = max;
    https.tls = Some(TlsConfig {
        certs: vec![CertPair {
            cert,
            key,
            names: Vec::new(),
        }],
        default_cert: None,
    });
    ProxyConfig {
        frontends: vec![http, https],
        pools: vec![Pool::new(
            "app",
            Algorithm::RoundRobin,
            servers.iter().copied().map(ServerSpec::new).collect(),
        )],
        ..Default::default()
    }
}

/// The HAProxy equivalent of `proxy_config` (same timeouts, retries,
/// connection limit and balancing), single-threaded and without logging.
/// `http-reuse always` matches our pool, which sends any request over any idle
/// server connection (HAProxy's default, `safe`, opens a new server connection
/// for the first request of every client connection).
fn haproxy_config(servers: &[SocketAddr], pem: &Path, max: usize) -> String {
    let defaults = Frontend::new("x", Vec::new(), "x");
    let pool = Pool::new("x", Algorithm::RoundRobin, Vec::new());
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let mut text = format!(
        "global\n    nbthread 1\n    maxconn {max}\n\
         defaults\n    mode http\n    option http-keep-alive\n    maxconn {max}\n\
         \x20   timeout connect {connect}\n    timeout client {client}\n    timeout server {server}\n\
         \x20   timeout http-request {request}\n    timeout http-keep-alive {keep_alive}\n\
         \x20   retries {retries}\n    option redispatch 1\n\
         frontend web\n    bind {ip}:{HAPROXY_HTTP}\n    bind {ip}:{HAPROXY_HTTPS} ssl crt {pem}\n\
         \x20   default_backend app\n\
         backend app\n    balance roundrobin\n    http-reuse always\n",
        connect = ms(pool.timeout_connect),
        client = ms(defaults.timeout_client),
        server = ms(pool.timeout_server),
        request = ms(defaults.timeout_http_request),
        keep_alive = ms(defaults.timeout_http_keep_alive),
        retries = pool.retries,
        ip = BALANCER_CLIENT_V4,
        pem = pem.display(),
    );
    for (i, s) in servers.iter().enumerate() {
        text.push_str(&format!("    server be{} {s}\n", i + 1));
    }
    text
}

/// `MAX_CONNECTIONS`, or less if HAProxy could not raise its open-file limit
/// to two descriptors per connection (plus room for listeners and the like).
fn max_connections() -> usize {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes into the struct it is given.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return 1000;
    }
    let hard = usize::try_from(limit.rlim_max).unwrap_or(usize::MAX);
    MAX_CONNECTIONS.min(hard.saturating_sub(1000) / 2).max(100)
}

/// A self-signed certificate: (cert PEM, key PEM, both in one PEM for HAProxy).
fn write_certificate(dir: &Path) -> Result<(PathBuf, PathBuf, PathBuf)> {
    let ck = rcgen::generate_simple_self_signed(vec!["bench.test".to_string()])?;
    let (cert_pem, key_pem) = (ck.cert.pem(), ck.key_pair.serialize_pem());
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let both = dir.join("haproxy.pem");
    std::fs::write(&cert, &cert_pem)?;
    std::fs::write(&key, &key_pem)?;
    std::fs::write(&both, format!("{cert_pem}{key_pem}"))?;
    Ok((cert, key, both))
}

/// A directory removed on drop.
struct Workdir(PathBuf);

impl Workdir {
    fn new(path: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&path).with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }
}

impl Drop for Workdir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The full path of `program` if it is on PATH.
pub(crate) fn which(program: &str) -> Option<PathBuf> {
    std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .unwrap_or_default()
        .into_iter()
        .chain(["/usr/sbin".into(), "/usr/bin".into()])
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

fn haproxy_version(haproxy: &Path) -> Result<String> {
    let out = Command::new(haproxy).arg("-v").output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().unwrap_or("HAProxy");
    // "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/"
    Ok(first
        .split_whitespace()
        .nth(2)
        .map(|v| format!("HAProxy {v}"))
        .unwrap_or_else(|| "HAProxy".into()))
}

fn check_haproxy_config(haproxy: &Path, cfg: &Path) -> Result<()> {
    let out = Command::new(haproxy)
        .args([OsString::from("-c"), "-q".into(), "-f".into(), cfg.into()])
        .output()?;
    ensure!(
        out.status.success(),
        "haproxy rejects {}: {}{}",
        cfg.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// Waits until `addr` answers a GET from the client namespace with 200.
pub(crate) fn wait_ready(
    lab: &mut Lab,
    client_ns: &str,
    addr: SocketAddr,
    pid: Option<u32>,
) -> Result<()> {
    let start = Instant::now();
    loop {
        let answer = run_in_ns(client_ns, move || {
            http_get(addr, "/", Duration::from_millis(500))
        })?;
        match answer {
            Ok((200, body)) if body.starts_with("be") => return Ok(()),
            Ok((status, body)) if start.elapsed() > READY_TIMEOUT => {
                bail!("{addr} answered {status} {body:?}")
            }
            Err(e) if start.elapsed() > READY_TIMEOUT => {
                return Err(e).with_context(|| format!("{addr} is not answering"));
            }
            _ => {}
        }
        if let Some(pid) = pid
            && let Some(status) = lab.try_wait(pid)?
        {
            bail!("HAProxy exited ({status}) before answering");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Runs wrk against `url` from the client namespace for `window`; `cpu` reads
/// the proxy's CPU seconds, sampled just before and after the run.
fn run_wrk(
    wrk: &Path,
    client_ns: &str,
    url: &str,
    s: &Scenario,
    window: Duration,
    cpu: &dyn Fn() -> Result<Cpu>,
) -> Result<Measure> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", client_ns])
        .arg(wrk)
        .args(["-t1", &format!("-c{}", s.connections)])
        .arg(format!("-d{}s", window.as_secs()))
        .args(["--latency", "--timeout", REQUEST_TIMEOUT]);
    if s.close {
        cmd.args(["-H", "Connection: close"]);
    }
    cmd.arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let before = cpu()?;
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
    let after = cpu()?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "wrk {url} failed ({}): {text}{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let mut m = parse_wrk(&text).with_context(|| format!("wrk {url} output:\n{text}"))?;
    m.cpu_seconds = after.total() - before.total();
    m.user_seconds = after.user - before.user;
    ensure!(m.requests > 0, "no request completed: {text}");
    if m.errors > 0 {
        // Which kind: connect/read/write/timeout, or answers other than 2xx/3xx.
        let detail: Vec<&str> = text
            .lines()
            .map(str::trim)
            .filter(|l| l.starts_with("Socket errors:") || l.starts_with("Non-2xx"))
            .collect();
        println!("  (wrk {url}: {})", detail.join("; "));
    }
    Ok(m)
}

/// Requests, duration, p99 and error counts from wrk's `--latency` output.
pub(crate) fn parse_wrk(text: &str) -> Result<Measure> {
    let mut m = Measure {
        requests: 0,
        seconds: 0.0,
        p99_ms: f64::NAN,
        errors: 0,
        cpu_seconds: 0.0,
        user_seconds: 0.0,
    };
    let mut found = false;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        // "95963 requests in 5.00s, 9.33MB read"
        if words.len() >= 4 && words[1] == "requests" && words[2] == "in" {
            m.requests = words[0].parse()?;
            m.seconds = duration_ms(words[3].trim_end_matches(','))? / 1e3;
            found = true;
        } else if words.first() == Some(&"99%") && words.len() == 2 {
            m.p99_ms = duration_ms(words[1])?;
        } else if line.starts_with("Socket errors:") {
            // "Socket errors: connect 0, read 3, write 0, timeout 0"
            m.errors += words
                .iter()
                .filter_map(|w| w.trim_end_matches(',').parse::<u64>().ok())
                .sum::<u64>();
        } else if line.starts_with("Non-2xx or 3xx responses:") {
            m.errors += words.last().and_then(|w| w.parse().ok()).unwrap_or(0);
        }
    }
    ensure!(
        found && m.seconds > 0.0 && m.p99_ms.is_finite(),
        "unexpected wrk output"
    );
    Ok(m)
}

/// wrk's durations ("812.00us", "1.23ms", "5.00s", "1.02m") in milliseconds.
fn duration_ms(s: &str) -> Result<f64> {
    let split = s
        .find(|c: char| c.is_ascii_alphabetic())
        .ok_or_else(|| anyhow!("no unit in {s:?}"))?;
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().with_context(|| format!("duration {s:?}"))?;
    Ok(match unit {
        "us" => n / 1e3,
        "ms" => n,
        "s" => n * 1e3,
        "m" => n * 60e3,
        "h" => n * 3600e3,
        _ => bail!("unknown unit in {s:?}"),
    })
}

/// utime + stime, in seconds, from a /proc `stat` file.
/// CPU time used so far, in seconds.
#[derive(Debug, Clone, Copy)]
struct Cpu {
    user: f64,
    sys: f64,
}

impl Cpu {
    fn total(&self) -> f64 {
        self.user + self.sys
    }
}

fn stat_cpu_seconds(path: &str) -> Result<Cpu> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {path}"))?;
    // Fields after the command name, which is in parentheses and may hold spaces:
    // state is field 3, utime 14, stime 15.
    let rest = text
        .rsplit_once(')')
        .ok_or_else(|| anyhow!("{path}: no command name"))?
        .1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| -> Result<u64> {
        Ok(fields
            .get(i)
            .ok_or_else(|| anyhow!("{path}: short"))?
            .parse()?)
    };
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    ensure!(hz > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(Cpu {
        user: ticks(11)? as f64 / hz as f64,
        sys: ticks(12)? as f64 / hz as f64,
    })
}

fn thread_cpu_seconds(tid: i32) -> Result<Cpu> {
    stat_cpu_seconds(&format!("/proc/self/task/{tid}/stat"))
}

fn process_cpu_seconds(pid: u32) -> Result<Cpu> {
    stat_cpu_seconds(&format!("/proc/{pid}/stat"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pair_ratios_span_the_runs() {
        let run = |requests| Measure {
            requests,
            seconds: 1.0,
            p99_ms: 0.0,
            errors: 0,
            cpu_seconds: 0.0,
            user_seconds: 0.0,
        };
        let haproxy = [run(100), run(100), run(200)];
        let ours = [run(110), run(90), run(200)];
        let (lo, hi) = pair_ratios(&haproxy, &ours);
        assert!(
            (lo - 0.9).abs() < 1e-9 && (hi - 1.1).abs() < 1e-9,
            "{lo} {hi}"
        );
    }

    #[test]
    fn parses_wrk_output() {
        let text = "Running 5s test @ http://198.18.1.1:8081/\n  1 threads and 2 connections\n  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency   102.21us   50.10us   2.10ms   95.00%\n    Req/Sec    19.10k     1.00k   20.00k    70.00%\n  Latency Distribution\n     50%   95.00us\n     75%  110.00us\n     90%  130.00us\n     99%    1.23ms\n  95963 requests in 5.00s, 9.33MB read\n  Socket errors: connect 0, read 3, write 0, timeout 1\n  Non-2xx or 3xx responses: 2\nRequests/sec:  19190.12\nTransfer/sec:      1.87MB\n";
        let m = parse_wrk(text).unwrap();
        assert_eq!(m.requests, 95963);
        assert!((m.seconds - 5.0).abs() < 1e-9);
        assert!((m.p99_ms - 1.23).abs() < 1e-9);
        assert_eq!(m.errors, 6);
    }

    #[test]
    fn reads_own_thread_cpu() {
        // SAFETY: gettid has no preconditions.
        let tid = unsafe { libc::gettid() };
        assert!(thread_cpu_seconds(tid).unwrap().total() >= 0.0);
        assert!(process_cpu_seconds(std::process::id()).unwrap().user >= 0.0);
    }
}
