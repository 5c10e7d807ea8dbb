//! `lb-bench l7`: the L7 proxy as users run it, `lb run` (release binary, a
//! config file, the XDP program attached and passing the l7 VIP up to the
//! stack), against HAProxy (`nbthread N`, `http-reuse safe`) and nginx (`N`
//! workers, upstream keepalive), all three in the balancer namespace behind
//! the same l7 VIP, for `threads = 1` and `2`. wrk loads each from the
//! client namespace; rounds alternate between the three so a burst of noise
//! on this shared 2-core VM hits all of them; each figure is the median of
//! `ROUNDS` runs of `WINDOW`.
//!
//! Per row: requests/s, CPU µs per request (utime + stime from
//! /proc/<pid>/stat of each proxy's processes, nginx's master and workers
//! summed, over the run), p99 latency (wrk --latency), and the ratios
//! lb/HAProxy (req/s, CPU per request) and lb/nginx (MB/s on the 64 KiB
//! row). Then the resident memory each proxy grows by per idle keep-alive
//! client connection (`IDLE` connections, one request each).
//!
//! Measurement notes (issue #16, six runs on the 2-core VM while another
//! build ran on the same cores; figures and tables in tests/BENCHMARKS.md):
//!
//! - Keep-alive: every proxy spends 24-36 µs of CPU per request, of which
//!   only 4-7 µs are user mode (lb 3.8-5.9, HAProxy 5.1-7.0, nginx
//!   3.9-7.0); the rest is the kernel's TCP, veth and XDP work done in the
//!   proxy's process, the same for all three. Requests/s are level
//!   (0.77-1.22x HAProxy over the runs), bounded by the two cores that wrk,
//!   the backends and the proxy share. The target (1.3x at <= 0.75x CPU per
//!   request) would need lb's user time to go below zero: not met.
//! - New connection per request: 2.1-2.9x HAProxy at 0.38-0.48x its CPU;
//!   with `http-reuse safe` HAProxy opens a server connection for the first
//!   request of each client connection, lb reuses its kept ones.
//! - HTTPS new connection: 1.6-2.8x HAProxy (whose OpenSSL 3.0 handshakes
//!   cost 500+ µs), 0.39-0.94x nginx: lb's handshake (rustls, ring) costs
//!   222-287 µs of CPU to nginx's 157-239, and its p99 is higher. Not
//!   profiled yet.
//! - 64 KiB responses: 1.2-1.7x HAProxy; against nginx 0.73-1.03x at one
//!   thread and 0.80-1.16x at two, run to run.
//! - Idle memory: in the full agent lb's resident memory did not grow over
//!   the measured connections in any run (presumably freed memory of its
//!   start, Maglev tables and map contents, absorbed them), so it is
//!   measured on `lb run` with the proxy's tables only: 2.0 KiB per idle
//!   connection at one thread, 3.1 at two, HAProxy 1.1, nginx 0.5.
//!
//! The gzip row asks each proxy's compressing listener (lb's
//! `[frontend.compression]`, HAProxy's `compression algo gzip` with its
//! libslz, nginx's `gzip on` with zlib, all at level 1) for 64 KiB of HTML
//! (`/text/N` of the lab backend, which deflate shrinks to about a
//! quarter): 1.2-1.33x HAProxy and 0.87-1.05x nginx in its first two runs;
//! lb's p99 at one thread fell from 78 to 28 ms once an answer read whole
//! was compressed a 16 KiB slice per poll (compress.rs).
//!
//! The HTTP/2 row loads the HTTPS ports over HTTP/2 (ALPN h2) with nghttp2's
//! h2load, `H2_CONNECTIONS` connections of `STREAMS` streams each, as
//! browsers and CDNs multiplex; its p99 comes from h2load's per-request log.
//!
//! Access logging is off for all three (`RUST_LOG=warn,rustls=error` for
//! lb: its access log is `tracing` target `access` at INFO, and rustls warns
//! once per handshake about wrk's IP address as SNI). Nothing is pinned: on
//! 2 cores pinning the proxy leaves wrk and the backends fighting over the
//! other one.

use std::ffi::OsString;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use lb_proxy::{Frontend, Pool};
use lb_userspace::lab::{
    Lab, LabOptions, VIP_V4, client::http_get, ns_command, run_in_ns, services::lab_config,
};

/// Backends behind the three proxies (round robin).
const BACKENDS: usize = 2;
/// Serving threads (HAProxy's nbthread, nginx's workers) of the two passes.
const THREADS: [usize; 2] = [1, 2];
/// wrk's open connections, but for the "-c400" row.
const CONNECTIONS: u32 = 50;
/// The many-connections row.
const MANY: u32 = 400;
/// Measured runs per proxy and row: the median is printed.
const ROUNDS: usize = 3;
/// Length of each measured wrk run, and of the warm-up run per proxy.
const WINDOW: Duration = Duration::from_secs(2);
const WARMUP: Duration = Duration::from_secs(1);
/// Longest a wrk run may take beyond its duration before it is killed.
const WRK_GRACE: Duration = Duration::from_secs(10);
/// wrk's per-request timeout (a slower request counts as an error).
const REQUEST_TIMEOUT: &str = "2s";
/// Connection limit of the proxies (ours' default), unless the open-file
/// limit is lower: HAProxy needs two descriptors per connection plus some.
const MAX_CONNECTIONS: usize = 10_000;
/// How long a proxy gets to start answering.
const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Idle keep-alive client connections measured per proxy for the memory
/// row, after as many opened first: those take up whatever memory the
/// process had free (its allocator's, HAProxy's pools), which would
/// otherwise hide the growth of a fresh process.
const IDLE: usize = 2000;
/// Idle keep-alive limit of lb and HAProxy (nginx's default is 75 s): the
/// idle connections are opened one after another through the lab, and none
/// may close before the memory is read.
const KEEP_ALIVE: &str = "60s";
/// Size of the large responses.
const LARGE: u64 = 64 * 1024;

/// One row: how wrk connects and what it asks.
struct Scenario {
    name: &'static str,
    https: bool,
    close: bool,
    connections: u32,
    path: &'static str,
    /// Loaded by h2load over HTTP/2 (ALPN h2), `STREAMS` requests at a time
    /// per connection, instead of wrk.
    h2: bool,
    /// Through each proxy's TCP relay (lb's `mode = "tcp"` frontend,
    /// HAProxy's `mode tcp`, nginx's `stream`) instead of its HTTP one.
    tcp: bool,
    /// Through each proxy's compressing listener (lb's `[frontend.compression]`,
    /// HAProxy's `compression algo gzip`, nginx's `gzip on`), asking for gzip.
    gzip: bool,
}

/// Requests in flight per connection on the HTTP/2 row (h2load -m).
const STREAMS: u32 = 10;
/// Connections of the HTTP/2 row: with `STREAMS` each, about as many
/// requests in flight as wrk's -c50 rows.
const H2_CONNECTIONS: u32 = 5;
/// Index of the 64 KiB row in `SCENARIOS`.
const LARGE_ROW: usize = 5;

const SCENARIOS: [Scenario; 9] = [
    Scenario {
        name: "HTTP keep-alive",
        https: false,
        close: false,
        connections: CONNECTIONS,
        path: "/",
        h2: false,
        tcp: false,
        gzip: false,
    },
    Scenario {
        name: "HTTP keep-alive -c400",
        https: false,
        close: false,
        connections: MANY,
        path: "/",
        h2: false,
        tcp: false,
        gzip: false,
    },
    Scenario {
        name: "HTTP new connection per request",
        https: false,
        close: true,
        connections: CONNECTIONS,
        path: "/",
        h2: false,
        tcp: false,
        gzip: false,
    },
    Scenario {
        name: "HTTPS keep-alive",
        https: true,
        close: false,
        connections: CONNECTIONS,
        path: "/",
        h2: false,
        tcp: false,
        gzip: false,
    },
    Scenario {
        name: "HTTPS new connection per request",
        https: true,
        close: true,
        connections: CONNECTIONS,
        path: "/",
        h2: false,
        tcp: false,
        gzip: false,
    },
    Scenario {
        name: "64 KiB responses, keep-alive",
        https: false,
        close: false,
        connections: CONNECTIONS,
        path: "/bytes/65536",
        h2: false,
        tcp: false,
        gzip: false,
    },
    Scenario {
        name: "HTTPS HTTP/2, 10 streams per conn",
        https: true,
        close: false,
        connections: H2_CONNECTIONS,
        path: "/",
        h2: true,
        tcp: false,
        gzip: false,
    },
    Scenario {
        name: "TCP relay (mode tcp), keep-alive",
        https: false,
        close: false,
        connections: CONNECTIONS,
        path: "/",
        h2: false,
        tcp: true,
        gzip: false,
    },
    Scenario {
        name: "64 KiB HTML gzipped, keep-alive",
        https: false,
        close: false,
        connections: CONNECTIONS,
        path: "/text/65536",
        h2: false,
        tcp: false,
        gzip: true,
    },
];

/// The three proxies, in column order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Lb,
    HaProxy,
    Nginx,
}

impl Kind {
    const ALL: [Kind; 3] = [Kind::Lb, Kind::HaProxy, Kind::Nginx];

    /// Its HTTP and HTTPS ports on the VIP (each an l7 service of the XDP program).
    fn ports(self) -> (u16, u16) {
        match self {
            Kind::Lb => (8081, 8443),
            Kind::HaProxy => (8082, 8444),
            Kind::Nginx => (8083, 8445),
        }
    }

    /// Its TCP relay's port on the VIP.
    fn tcp_port(self) -> u16 {
        self.ports().0 + 10
    }

    /// Its compressing HTTP listener's port on the VIP.
    fn gzip_port(self) -> u16 {
        self.ports().0 + 20
    }

    fn label(self) -> &'static str {
        match self {
            Kind::Lb => "lb",
            Kind::HaProxy => "HAProxy",
            Kind::Nginx => "nginx",
        }
    }
}

/// A started proxy: its main process (the others are its children).
struct Running {
    kind: Kind,
    pid: u32,
}

/// Programs and files of the run.
struct Setup {
    haproxy: PathBuf,
    nginx: PathBuf,
    wrk: PathBuf,
    h2load: PathBuf,
    lb: PathBuf,
    dir: PathBuf,
    cert: PathBuf,
    key: PathBuf,
    pem: PathBuf,
    servers: Vec<SocketAddr>,
    max: usize,
}

/// Figures of one proxy in one row: medians of its runs.
#[derive(Debug, Clone, Copy)]
struct Figures {
    rps: f64,
    cpu_us: f64,
    /// The user-mode part of `cpu_us`.
    user_us: f64,
    p99_ms: f64,
    errors: u64,
}

/// One pass's results: per row, per proxy (column order); then idle KiB per connection.
struct Pass {
    threads: usize,
    rows: Vec<[Figures; 3]>,
    idle_kib: [f64; 3],
    /// The TLS version and cipher suite all three negotiated with OpenSSL.
    tls: String,
}

/// Runs the comparison at every thread count and prints it.
pub fn run() -> Result<()> {
    let tool = |name: &str, package: &str| {
        which(name).ok_or_else(|| {
            anyhow!("{name} is not installed (Debian package `{package}`; `cargo xtask setup`)")
        })
    };
    let (haproxy, nginx, wrk, h2load) = (
        tool("haproxy", "haproxy")?,
        tool("nginx", "nginx-light")?,
        tool("wrk", "wrk")?,
        tool("h2load", "nghttp2-client")?,
    );
    let version = haproxy_version(&haproxy)?;
    let opts = LabOptions::from_env(BACKENDS)?;
    let lb = opts.lb_bin.clone();
    raise_open_files((4 * IDLE + 1024) as u64);
    let mut lab = Lab::create("l7bench", opts)?;
    lab.make_local_on_balancer(VIP_V4.into())?;
    let dir = Workdir::new(std::env::temp_dir().join(format!("{}-l7", lab.balancer_ns())))?;
    let (cert, key, pem) = write_certificate(&dir.0)?;
    let setup = Setup {
        haproxy,
        nginx,
        wrk,
        h2load,
        lb,
        dir: dir.0.clone(),
        cert,
        key,
        pem,
        servers: lab
            .backends()
            .iter()
            .map(|b| SocketAddr::new(b.v4.into(), lb_userspace::lab::TCP_PORT))
            .collect(),
        max: max_connections(),
    };
    let mut passes = Vec::new();
    for threads in THREADS {
        passes
            .push(pass(&mut lab, &setup, threads).with_context(|| format!("threads = {threads}"))?);
    }
    print_passes(&passes, &version);
    Ok(())
}

/// Starts the three proxies with `threads` each, measures every row and the
/// idle memory, and stops them.
fn pass(lab: &mut Lab, setup: &Setup, threads: usize) -> Result<Pass> {
    let lb_alone = lb_alone_idle_kib(lab, setup, threads).context("lb's idle memory")?;
    let mut running = Vec::new();
    let started = (|| -> Result<()> {
        for kind in Kind::ALL {
            running.push(start(lab, setup, kind, threads)?);
        }
        Ok(())
    })();
    let result = started.and_then(|()| measure_pass(lab, setup, &running, threads));
    let result = result.map(|mut p| {
        p.idle_kib[0] = lb_alone;
        p
    });
    for r in running {
        let _ = lab.stop(r.pid);
    }
    result
}

/// Waits for, warms up and measures the running proxies.
fn measure_pass(lab: &mut Lab, setup: &Setup, running: &[Running], threads: usize) -> Result<Pass> {
    let client_ns = lab.client_ns().to_string();
    for r in running {
        let addr = SocketAddr::new(VIP_V4.into(), r.kind.ports().0);
        wait_ready(lab, &client_ns, addr, Some(r.pid))
            .with_context(|| format!("{} is not answering", r.kind.label()))?;
    }
    // The HTTPS rows compare like with like only if every proxy speaks the
    // same TLS version and cipher suite to wrk's OpenSSL.
    let versions = running
        .iter()
        .map(|r| tls_version(&client_ns, SocketAddr::new(VIP_V4.into(), r.kind.ports().1)))
        .collect::<Result<Vec<_>>>()?;
    ensure!(
        versions.iter().all(|v| *v == versions[0]),
        "the proxies negotiate different TLS (lb, HAProxy, nginx): {versions:?}"
    );
    // Idle memory first, on fresh processes: once loaded, HAProxy and nginx
    // keep their pools' memory, and would grow by nothing.
    // lb's is measured apart (`lb_alone_idle_kib`).
    let mut idle_kib = [0.0; 3];
    for (i, r) in running.iter().enumerate().skip(1) {
        let addr = SocketAddr::new(VIP_V4.into(), r.kind.ports().0);
        let pid = r.pid;
        let grew = run_in_ns(&client_ns, move || idle_growth(addr, pid))??;
        idle_kib[i] = grew as f64 / IDLE as f64;
    }
    let load = |r: &Running, s: &Scenario, window: Duration| {
        let (http, https) = r.kind.ports();
        let port = match (s.tcp, s.gzip, s.https) {
            (true, _, _) => r.kind.tcp_port(),
            (_, true, _) => r.kind.gzip_port(),
            (false, false, true) => https,
            (false, false, false) => http,
        };
        let scheme = if s.https { "https" } else { "http" };
        let url = format!("{scheme}://{VIP_V4}:{port}{}", s.path);
        let pid = r.pid;
        let cpu = || tree_cpu_seconds(pid);
        let run = Run {
            client_ns: &client_ns,
            url: &url,
            threads,
            window,
            cpu: &cpu,
        };
        if s.h2 {
            let log = setup.dir.join("h2load.log");
            run_h2load(&setup.h2load, &run, s, &log)
        } else {
            run_wrk(&setup.wrk, &run, s)
        }
        .with_context(|| format!("{}: {}", s.name, r.kind.label()))
    };
    // Warm-up: server connections open, caches and TLS state built.
    for r in running {
        load(r, &SCENARIOS[0], WARMUP)?;
        load(r, &SCENARIOS[3], WARMUP)?;
    }
    let mut rows = Vec::new();
    for s in &SCENARIOS {
        let mut runs: [Vec<Measure>; 3] = Default::default();
        for _ in 0..ROUNDS {
            for (i, r) in running.iter().enumerate() {
                runs[i].push(load(r, s, WINDOW)?);
            }
        }
        for r in running {
            ensure!(lab.try_wait(r.pid)?.is_none(), "{} exited", r.kind.label());
        }
        rows.push(runs.map(|m| medians(&m)));
    }
    Ok(Pass {
        threads,
        rows,
        idle_kib,
        tls: versions[0].clone(),
    })
}

/// The median of each figure over `runs`.
fn medians(runs: &[Measure]) -> Figures {
    let median = |f: &dyn Fn(&Measure) -> f64| {
        let mut v: Vec<f64> = runs.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
    };
    Figures {
        rps: median(&|m| m.rps()),
        cpu_us: median(&|m| m.cpu_us_per_request()),
        user_us: median(&|m| m.user_us_per_request()),
        p99_ms: median(&|m| m.p99_ms),
        errors: runs.iter().map(|m| m.errors).sum(),
    }
}

/// Starts one proxy with `threads` in the balancer namespace.
fn start(lab: &mut Lab, setup: &Setup, kind: Kind, threads: usize) -> Result<Running> {
    let ns = lab.balancer_ns().to_string();
    let dir = &setup.dir;
    let pid = match kind {
        Kind::Lb => {
            let text = lb_config(lab, setup, threads);
            spawn_lb(lab, setup, &format!("lb-{threads}"), &text)?
        }
        Kind::HaProxy => {
            let cfg = dir.join(format!("haproxy-{threads}.cfg"));
            std::fs::write(&cfg, haproxy_config(setup, threads))?;
            check_config(&ns, &setup.haproxy, &["-c", "-q", "-f"], &cfg)?;
            let args = ["-db".into(), "-f".into(), cfg.into_os_string()];
            lab.spawn_in_ns(&ns, &setup.haproxy, &args)?
        }
        Kind::Nginx => {
            let cfg = dir.join(format!("nginx-{threads}.conf"));
            std::fs::write(&cfg, nginx_config(setup, threads))?;
            let prefix = format!("{}/", dir.display());
            check_config(&ns, &setup.nginx, &["-q", "-p", &prefix, "-t", "-c"], &cfg)?;
            let args = [
                "-p".into(),
                prefix.into(),
                "-c".into(),
                cfg.into_os_string(),
            ];
            lab.spawn_in_ns(&ns, &setup.nginx, &args)?
        }
    };
    Ok(Running { kind, pid })
}

/// Starts `lb run` with `text` as its file `NAME.toml` (socket `NAME.sock`).
fn spawn_lb(lab: &mut Lab, setup: &Setup, name: &str, text: &str) -> Result<u32> {
    let ns = lab.balancer_ns().to_string();
    let cfg = setup.dir.join(format!("{name}.toml"));
    std::fs::write(&cfg, text)?;
    let args: Vec<OsString> = vec![
        // The access log is `tracing` target `access` at INFO: off; so are
        // rustls' warnings about wrk's IP address as SNI.
        "RUST_LOG=warn,rustls=error".into(),
        setup.lb.clone().into(),
        "run".into(),
        "--config".into(),
        cfg.into(),
        "--socket".into(),
        setup.dir.join(format!("{name}.sock")).into(),
        "--pin-dir".into(),
        lab.node_pin_dir(1)?.into(),
    ];
    lab.spawn_in_ns(&ns, Path::new("/usr/bin/env"), &args)
}

/// lb's memory per idle keep-alive connection, measured on `lb run` with
/// the proxy's tables only, before anything else starts: the full agent's
/// start (the lab's L4 services: Maglev tables, map contents) leaves freed
/// memory resident that the connections then used, so its RSS did not grow.
/// Nothing is attached yet: the VIP, local on the balancer, reaches it.
fn lb_alone_idle_kib(lab: &mut Lab, setup: &Setup, threads: usize) -> Result<f64> {
    let pid = spawn_lb(
        lab,
        setup,
        &format!("lb-alone-{threads}"),
        &proxy_tables(setup, threads),
    )?;
    let client_ns = lab.client_ns().to_string();
    let addr = SocketAddr::new(VIP_V4.into(), Kind::Lb.ports().0);
    let grew = wait_ready(lab, &client_ns, addr, Some(pid))
        .and_then(|()| run_in_ns(&client_ns, move || idle_growth(addr, pid))?);
    let stopped = lab.stop(pid);
    let grew = grew?;
    stopped?;
    Ok(grew as f64 / IDLE as f64)
}

/// `lb run`'s file: the lab's L4 services and an l7 service per port of
/// the three proxies (XDP passes them up), no new-flow limit, `[proxy] threads`, a plain and a
/// TLS frontend over one round-robin pool; HAProxy's and nginx's settings
/// are the same (no forwarding headers, same timeouts and limits).
fn lb_config(lab: &Lab, setup: &Setup, threads: usize) -> String {
    // No per-client new-flow limit (it counts the l7 VIPs' SYNs too): wrk's
    // new connections, over 10 000 a second, come from one client.
    let mut text = format!(
        "new_flow_limit = 0\n{}",
        lab_config(lab, &[1; BACKENDS], lb_common::DEFAULT_RING_SIZE, None)
    );
    for kind in Kind::ALL {
        let (http, https) = kind.ports();
        for port in [http, https, kind.tcp_port(), kind.gzip_port()] {
            text.push_str(&format!(
                "\n[[service]]\nname = \"l7-{port}\"\nvip = \"{VIP_V4}:{port}\"\nmode = \"l7\"\n"
            ));
        }
    }
    text.push_str(&proxy_tables(setup, threads));
    text
}

/// The proxy's part of lb's file: `[proxy] threads`, the frontends, the pool.
fn proxy_tables(setup: &Setup, threads: usize) -> String {
    let mut text = String::new();
    let (http, https) = Kind::Lb.ports();
    let servers: Vec<String> = setup
        .servers
        .iter()
        .map(|s| format!("{{ address = \"{s}\" }}"))
        .collect();
    let frontend = |name: &str, port: u16| {
        format!(
            "\n[[frontend]]\nname = \"{name}\"\nbinds = [\"{VIP_V4}:{port}\"]\ndefault_pool = \"app\"\n\
             forwarded_headers = false\nmax_connections = {}\ntimeout_http_keep_alive = \"{KEEP_ALIVE}\"\n",
            setup.max
        )
    };
    text.push_str(&format!("\n[proxy]\nthreads = {threads}\n"));
    text.push_str(&frontend("http", http));
    text.push_str(&frontend("https", https));
    text.push_str(&format!(
        "[frontend.tls]\ncerts = [{{ cert = \"{}\", key = \"{}\" }}]\n",
        setup.cert.display(),
        setup.key.display()
    ));
    text.push_str(&frontend("tcp", Kind::Lb.tcp_port()));
    text.push_str("mode = \"tcp\"\n");
    // gzip of text/html & co, level 1, from 1 KiB: the defaults.
    text.push_str(&frontend("gzip", Kind::Lb.gzip_port()));
    text.push_str("[frontend.compression]\n");
    text.push_str(&format!(
        "\n[[pool]]\nname = \"app\"\nservers = [{}]\n",
        servers.join(", ")
    ));
    text
}

/// HAProxy's equivalent (same timeouts, retries, limit and balancing),
/// `nbthread`, `http-reuse safe` (its default), no logging.
fn haproxy_config(setup: &Setup, threads: usize) -> String {
    let defaults = Frontend::new("x", Vec::new(), "x");
    let pool = Pool::new("x", lb_proxy::Algorithm::RoundRobin, Vec::new());
    let ms = |d: Duration| format!("{}ms", d.as_millis());
    let (http, https) = Kind::HaProxy.ports();
    let max = setup.max;
    let mut text = format!(
        "global\n    nbthread {threads}\n    maxconn {max}\n\
         defaults\n    mode http\n    option http-keep-alive\n    maxconn {max}\n\
         \x20   timeout connect {connect}\n    timeout client {client}\n    timeout server {server}\n\
         \x20   timeout http-request {request}\n    timeout http-keep-alive {keep_alive}\n\
         \x20   retries {retries}\n    option redispatch 1\n\
         frontend web\n    bind {VIP_V4}:{http}\n    bind {VIP_V4}:{https} ssl crt {pem} alpn h2,http/1.1\n\
         \x20   default_backend app\n\
         frontend gzip\n    bind {VIP_V4}:{gzip}\n    compression algo gzip\n    compression type text/html\n\
         \x20   default_backend app\n\
         backend app\n    balance roundrobin\n    http-reuse safe\n",
        connect = ms(pool.timeout_connect),
        client = ms(defaults.timeout_client),
        server = ms(pool.timeout_server),
        request = ms(defaults.timeout_http_request),
        keep_alive = KEEP_ALIVE,
        retries = pool.retries,
        pem = setup.pem.display(),
        gzip = Kind::HaProxy.gzip_port(),
    );
    for (i, s) in setup.servers.iter().enumerate() {
        text.push_str(&format!("    server be{} {s}\n", i + 1));
    }
    // The TCP relay (its timeouts: the defaults' client and server ones).
    let tcp = Kind::HaProxy.tcp_port();
    text.push_str(&format!(
        "listen tcp\n    mode tcp\n    bind {VIP_V4}:{tcp}\n    balance roundrobin\n"
    ));
    for (i, s) in setup.servers.iter().enumerate() {
        text.push_str(&format!("    server be{} {s}\n", i + 1));
    }
    text
}

/// nginx's equivalent: `threads` workers (SO_REUSEPORT listeners, as ours),
/// upstream keep-alive connections, no limit on requests per connection
/// either way, no access log, responses buffered in memory (64 KiB fit),
/// TLS 1.3 offered as by lb and HAProxy (nginx 1.22 offers only up to 1.2
/// unless told: wrk then resumed its sessions with TLS 1.2 tickets, which
/// skip the key exchange that a TLS 1.3 resumption still makes).
fn nginx_config(setup: &Setup, threads: usize) -> String {
    let (http, https) = Kind::Nginx.ports();
    let dir = setup.dir.display();
    let servers: String = setup
        .servers
        .iter()
        .map(|s| format!("        server {s};\n"))
        .collect();
    let tcp = Kind::Nginx.tcp_port();
    format!(
        "load_module {STREAM_MODULE};\n\
         daemon off;\nuser root;\nworker_processes {threads};\nworker_rlimit_nofile {files};\n\
         pid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log warn;\n\
         events {{\n    worker_connections {max};\n}}\n\
         http {{\n    access_log off;\n    keepalive_requests 1000000000;\n\
         \x20   client_body_temp_path {dir}/nginx-body;\n    proxy_temp_path {dir}/nginx-proxy;\n\
         \x20   fastcgi_temp_path {dir}/nginx-fcgi;\n    uwsgi_temp_path {dir}/nginx-uwsgi;\n\
         \x20   scgi_temp_path {dir}/nginx-scgi;\n\
         \x20   upstream app {{\n{servers}        keepalive 256;\n        keepalive_requests 1000000000;\n    }}\n\
         \x20   server {{\n        listen {VIP_V4}:{http} reuseport;\n        listen {VIP_V4}:{https} ssl http2 reuseport;\n\
         \x20       ssl_certificate {cert};\n        ssl_certificate_key {key};\n\
         \x20       ssl_protocols TLSv1.2 TLSv1.3;\n\
         \x20       location / {{\n            proxy_pass http://app;\n            proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n            proxy_buffers 8 16k;\n\
         \x20           proxy_buffer_size 16k;\n        }}\n    }}\n\
         \x20   server {{\n        listen {VIP_V4}:{gzip} reuseport;\n\
         \x20       gzip on;\n        gzip_comp_level 1;\n        gzip_min_length 1024;\n\
         \x20       location / {{\n            proxy_pass http://app;\n            proxy_http_version 1.1;\n\
         \x20           proxy_set_header Connection \"\";\n            proxy_buffers 8 16k;\n\
         \x20           proxy_buffer_size 16k;\n        }}\n    }}\n}}\n\
         stream {{\n    upstream app_tcp {{\n{servers}    }}\n\
         \x20   server {{\n        listen {VIP_V4}:{tcp} reuseport;\n        proxy_pass app_tcp;\n    }}\n}}\n",
        files = setup.max * 2 + 1000,
        max = setup.max,
        cert = setup.cert.display(),
        key = setup.key.display(),
        gzip = Kind::Nginx.gzip_port(),
    )
}

/// nginx's stream module (Debian's `libnginx-mod-stream`), for its TCP relay.
const STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// Prints each pass's table, the idle memory and which targets were met.
fn print_passes(passes: &[Pass], version: &str) {
    println!(
        "L7 proxy through the binaries: lb run against {version} and nginx, each behind the XDP l7 pass, \
         {BACKENDS} backends round robin; wrk -tN -c{CONNECTIONS} from the client namespace; \
         medians of {ROUNDS} alternating runs of {} s; CPU = each proxy's processes' utime+stime:",
        WINDOW.as_secs()
    );
    for p in passes {
        println!(
            "  threads = {} (nbthread / worker_processes {}; HTTPS rows: {} for all three):",
            p.threads, p.threads, p.tls
        );
        println!(
            "    {:<34} {:>23}   {:>20}   {:>17}   {:>14}   {:>8}",
            "", "req/s", "CPU us/req", "p99 ms", "lb/HAProxy", "lb/nginx"
        );
        println!(
            "    {:<34} {:>7} {:>7} {:>7}   {:>6} {:>6} {:>6}   {:>5} {:>5} {:>5}   {:>6} {:>7}   {:>8}",
            "",
            "lb",
            "HAProxy",
            "nginx",
            "lb",
            "HAPrx",
            "nginx",
            "lb",
            "HAPrx",
            "nginx",
            "req/s",
            "CPU/req",
            "req/s"
        );
        for (s, [o, h, n]) in SCENARIOS.iter().zip(&p.rows) {
            println!(
                "    {:<34} {:>7.0} {:>7.0} {:>7.0}   {:>6.1} {:>6.1} {:>6.1}   {:>5.2} {:>5.2} {:>5.2}   {:>5.2}x {:>6.2}x   {:>7.2}x",
                s.name,
                o.rps,
                h.rps,
                n.rps,
                o.cpu_us,
                h.cpu_us,
                n.cpu_us,
                o.p99_ms,
                h.p99_ms,
                n.p99_ms,
                o.rps / h.rps,
                o.cpu_us / h.cpu_us,
                o.rps / n.rps
            );
        }
        print_extras(p);
        println!("    targets: {}", targets(p).join("; "));
    }
}

/// A pass's lines below its table: user-mode CPU, 64 KiB MB/s, idle
/// memory, errors.
fn print_extras(p: &Pass) {
    println!(
        "    of which user-mode CPU us/req (lb / HAProxy / nginx; the rest is kernel: TCP, veths, XDP): {}",
        p.rows
            .iter()
            .map(|[o, h, n]| format!("{:.1}/{:.1}/{:.1}", o.user_us, h.user_us, n.user_us))
            .collect::<Vec<_>>()
            .join(", ")
    );
    if let Some([o, h, n]) = p.rows.get(LARGE_ROW) {
        let mb = |f: &Figures| f.rps * LARGE as f64 / 1e6;
        println!(
            "    64 KiB MB/s: lb {:.0}, HAProxy {:.0}, nginx {:.0} (lb/nginx {:.2}x)",
            mb(o),
            mb(h),
            mb(n),
            mb(o) / mb(n)
        );
    }
    let kib = |k: f64| {
        if k > 0.0 {
            format!("{k:.1} KiB")
        } else {
            "n/a (RSS did not grow)".to_string()
        }
    };
    let [o, h, n] = p.idle_kib;
    println!(
        "    idle memory per keep-alive connection ({IDLE} connections): lb {} (lb run with the proxy's tables only), HAProxy {}, nginx {}",
        kib(o),
        kib(h),
        kib(n)
    );
    let errors: Vec<String> = SCENARIOS
        .iter()
        .zip(&p.rows)
        .filter(|(_, f)| f.iter().any(|x| x.errors > 0))
        .map(|(s, [o, h, n])| {
            format!(
                "{}: lb {}, HAProxy {}, nginx {}",
                s.name, o.errors, h.errors, n.errors
            )
        })
        .collect();
    if !errors.is_empty() {
        println!(
            "    errors (socket errors + non-2xx): {}",
            errors.join("; ")
        );
    }
}

/// The targets, each "met" or "not met" with its figure.
fn targets(p: &Pass) -> Vec<String> {
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let row = |i: usize| p.rows[i];
    let ka = row(0);
    let (ka_rps, ka_cpu) = (ka[0].rps / ka[1].rps, ka[0].cpu_us / ka[1].cpu_us);
    let newconn = row(2)[0].rps / row(2)[1].rps;
    let https = row(3)[0].rps / row(3)[1].rps;
    let large = row(LARGE_ROW)[0].rps / row(LARGE_ROW)[2].rps;
    let idle = p.idle_kib[0] / p.idle_kib[1];
    vec![
        format!(
            "keep-alive >=1.3x HAProxy at <=0.75x CPU/req: {} ({ka_rps:.2}x, {ka_cpu:.2}x)",
            verdict(ka_rps >= 1.3 && ka_cpu <= 0.75)
        ),
        format!(
            "new connections >=1.3x: {} ({newconn:.2}x)",
            verdict(newconn >= 1.3)
        ),
        format!(
            "HTTPS keep-alive >=1.3x: {} ({https:.2}x)",
            verdict(https >= 1.3)
        ),
        format!(
            "64 KiB >= nginx MB/s: {} ({large:.2}x)",
            verdict(large >= 1.0)
        ),
        if p.idle_kib[0] > 0.0 && p.idle_kib[1] > 0.0 {
            format!(
                "idle memory <= HAProxy's: {} ({idle:.2}x)",
                verdict(idle <= 1.0)
            )
        } else {
            "idle memory <= HAProxy's: not measured".to_string()
        },
    ]
}

/// Raises this process's open-file limit to `want` (as far as its hard
/// limit allows): idle connections and wrk need many.
pub(crate) fn raise_open_files(want: u64) {
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < want {
            lim.rlim_cur = want.min(lim.rlim_max);
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// Opens `IDLE` keep-alive connections to `addr`, then `IDLE` more, one
/// answered request each; returns how much the resident memory of `pid`
/// and its children grew (KiB) over the second `IDLE`, all still open.
fn idle_growth(addr: SocketAddr, pid: u32) -> Result<u64> {
    let mut open = Vec::with_capacity(2 * IDLE);
    open_idle(addr, IDLE, &mut open)?;
    let before = settled_rss_kib(pid)?;
    open_idle(addr, IDLE, &mut open)?;
    let grew = settled_rss_kib(pid)?.saturating_sub(before);
    drop(open);
    Ok(grew)
}

/// Resident memory of `pid` and its children, read after a pause.
fn settled_rss_kib(pid: u32) -> Result<u64> {
    std::thread::sleep(Duration::from_millis(300));
    tree_rss_kib(pid)
}

/// Opens `count` connections to `addr` into `open`, each after its answer.
pub(crate) fn open_idle(
    addr: SocketAddr,
    count: usize,
    open: &mut Vec<std::net::TcpStream>,
) -> Result<()> {
    use std::io::{Read, Write};
    for i in 0..count {
        let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
            .with_context(|| format!("connection {i}"))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf)?;
            ensure!(n > 0, "connection {i} closed before its answer");
            head.extend_from_slice(&buf[..n]);
        }
        open.push(s);
    }
    Ok(())
}

/// `pid` and its children (nginx's workers).
fn process_tree(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return pids;
    };
    for e in entries.filter_map(Result::ok) {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // The parent pid is the second field after the command name.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            pids.push(child);
        }
    }
    pids
}

/// Resident memory of `pid` and its children, in KiB.
fn tree_rss_kib(pid: u32) -> Result<u64> {
    let mut total = 0;
    for p in process_tree(pid) {
        let status = std::fs::read_to_string(format!("/proc/{p}/status"))?;
        total += status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .ok_or_else(|| anyhow!("no VmRSS for pid {p}"))?;
    }
    Ok(total)
}

/// CPU time of `pid` and its children so far.
fn tree_cpu_seconds(pid: u32) -> Result<Cpu> {
    let mut total = Cpu {
        user: 0.0,
        sys: 0.0,
    };
    for p in process_tree(pid) {
        let c = stat_cpu_seconds(&format!("/proc/{p}/stat"))?;
        total.user += c.user;
        total.sys += c.sys;
    }
    Ok(total)
}

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
    /// Nothing counted yet, no p99.
    fn empty() -> Self {
        Measure {
            requests: 0,
            seconds: 0.0,
            p99_ms: f64::NAN,
            errors: 0,
            cpu_seconds: 0.0,
            user_seconds: 0.0,
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

/// Runs `program ARGS cfg` in namespace `ns` (nginx binds its addresses to
/// check them), a configuration check, which must pass.
fn check_config(ns: &str, program: &Path, args: &[&str], cfg: &Path) -> Result<()> {
    let out = ns_command(ns, program).args(args).arg(cfg).output()?;
    ensure!(
        out.status.success(),
        "{} rejects {}: {}{}",
        program.display(),
        cfg.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The TLS version and cipher suite OpenSSL (wrk's library) negotiates
/// with `addr`, from namespace `ns`.
fn tls_version(ns: &str, addr: SocketAddr) -> Result<String> {
    let mut cmd = ns_command(ns, "openssl");
    cmd.args(["s_client", "-brief", "-connect"])
        .arg(addr.to_string());
    // A proxy that accepts but never answers must not hang the bench.
    let out = crate::output_within(&mut cmd, Duration::from_secs(10));
    // -brief prints "Protocol version: TLSv1.3" and "Ciphersuite: ..." on stderr.
    let text = String::from_utf8_lossy(&out.stderr);
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
            .ok_or_else(|| anyhow!("no TLS handshake with {addr}: {text}"))
    };
    Ok(format!(
        "{} {}",
        field("Protocol version: ")?,
        field("Ciphersuite: ")?
    ))
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

/// One measured run: where the load comes from and goes, for how long, and
/// how the proxy's CPU time is read.
struct Run<'a> {
    client_ns: &'a str,
    url: &'a str,
    /// The load generator's threads (the proxies' serving threads).
    threads: usize,
    window: Duration,
    /// The proxy's CPU seconds, sampled just before and after the run.
    cpu: &'a dyn Fn() -> Result<Cpu>,
}

/// Runs `cmd` (a load generator in the client namespace) for the run's
/// window plus `WRK_GRACE` at most, with the proxy's CPU time sampled
/// around it; its stdout.
fn timed_load(mut cmd: Command, run: &Run<'_>, what: &str) -> Result<(String, Cpu)> {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let before = (run.cpu)()?;
    let mut child = cmd.spawn().with_context(|| format!("starting {what}"))?;
    // The output is a few hundred bytes: the pipes cannot fill up.
    let deadline = Instant::now() + run.window + WRK_GRACE;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("{what} did not finish within {:?}", run.window + WRK_GRACE);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let after = (run.cpu)()?;
    let out = child.wait_with_output()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    ensure!(
        out.status.success(),
        "{what} {} failed ({}): {text}{}",
        run.url,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    Ok((
        text,
        Cpu {
            user: after.user - before.user,
            sys: after.sys - before.sys,
        },
    ))
}

/// Runs h2load against the run's URL over HTTP/2 (ALPN h2): `connections`
/// of the row, `STREAMS` requests in flight on each; p99 from its
/// per-request log (`log`).
fn run_h2load(h2load: &Path, run: &Run<'_>, s: &Scenario, log: &Path) -> Result<Measure> {
    let _ = std::fs::remove_file(log);
    let mut cmd = ns_command(run.client_ns, h2load);
    cmd.args([
        format!("-t{}", run.threads),
        format!("-c{}", s.connections),
        format!("-m{STREAMS}"),
        format!("-D{}", run.window.as_secs()),
    ])
    .arg(format!("--log-file={}", log.display()))
    .arg(run.url);
    let (text, cpu) = timed_load(cmd, run, "h2load")?;
    ensure!(
        text.contains("Application protocol: h2"),
        "h2load did not speak HTTP/2 to {}: {text}",
        run.url
    );
    let mut m = parse_h2load(&text).with_context(|| format!("h2load output:\n{text}"))?;
    let log_text = std::fs::read_to_string(log).context("reading h2load's log")?;
    m.p99_ms = h2load_p99_ms(&log_text)?;
    m.cpu_seconds = cpu.total();
    m.user_seconds = cpu.user;
    ensure!(m.requests > 0, "no request completed: {text}");
    Ok(m)
}

/// Requests, duration and errors from h2load's summary: its failed requests
/// (network errors and timeouts included), or its 4xx and 5xx answers if
/// those are more (whether h2load counts them as failed differs by version).
fn parse_h2load(text: &str) -> Result<Measure> {
    let mut m = Measure::empty();
    let number = |w: &str| w.trim_end_matches(',').parse::<u64>();
    let (mut failed, mut refused) = (0, 0);
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(rest) = line.strip_prefix("finished in ") {
            // "finished in 2.00s, 22788.20 req/s, 646.15KB/s"
            let secs = rest.split(',').next().unwrap_or_default();
            m.seconds = duration_ms(secs.trim())? / 1e3;
        } else if line.starts_with("requests:") {
            // "requests: 1000 total, 1000 started, 990 done, 990 succeeded, 10 failed, 10 errored, 0 timeout"
            for pair in words[1..].chunks(2) {
                if let [n, what] = pair {
                    match what.trim_end_matches(',') {
                        "succeeded" => m.requests = number(n)?,
                        "failed" => failed = number(n)?,
                        _ => {}
                    }
                }
            }
        } else if line.starts_with("status codes:") {
            // "status codes: 990 2xx, 0 3xx, 0 4xx, 0 5xx"
            for pair in words[2..].chunks(2) {
                if let [n, class] = pair
                    && matches!(class.trim_end_matches(','), "4xx" | "5xx")
                {
                    refused += number(n)?;
                }
            }
        }
    }
    ensure!(m.seconds > 0.0, "unexpected h2load output");
    m.errors = failed.max(refused);
    Ok(m)
}

/// The 99th percentile of the durations in h2load's `--log-file` (tab
/// separated: start time, status, microseconds to the end of the response).
fn h2load_p99_ms(log: &str) -> Result<f64> {
    let mut us: Vec<u64> = log
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    ensure!(!us.is_empty(), "h2load's log has no request");
    us.sort_unstable();
    let i = (us.len() * 99 / 100).min(us.len() - 1);
    Ok(us[i] as f64 / 1e3)
}

/// Runs wrk against the run's URL from the client namespace.
fn run_wrk(wrk: &Path, run: &Run<'_>, s: &Scenario) -> Result<Measure> {
    let (client_ns, url, threads, window) = (run.client_ns, run.url, run.threads, run.window);
    let mut cmd = ns_command(client_ns, wrk);
    cmd.args([format!("-t{threads}"), format!("-c{}", s.connections)])
        .arg(format!("-d{}s", window.as_secs()))
        .args(["--latency", "--timeout", REQUEST_TIMEOUT]);
    if s.close {
        cmd.args(["-H", "Connection: close"]);
    }
    if s.gzip {
        cmd.args(["-H", "Accept-Encoding: gzip"]);
    }
    cmd.arg(url);
    let (text, cpu) = timed_load(cmd, run, "wrk")?;
    let mut m = parse_wrk(&text).with_context(|| format!("wrk {url} output:\n{text}"))?;
    m.cpu_seconds = cpu.total();
    m.user_seconds = cpu.user;
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
    let mut m = Measure::empty();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_h2load_output_and_log() {
        let text = "starting benchmark...\nApplication protocol: h2\nprogress: 100% done\n\nfinished in 2.00s, 22788.20 req/s, 646.15KB/s\nrequests: 45600 total, 45610 started, 45590 done, 45570 succeeded, 20 failed, 12 errored, 8 timeout\nstatus codes: 45570 2xx, 0 3xx, 3 4xx, 0 5xx\n";
        let m = parse_h2load(text).unwrap();
        assert_eq!(m.requests, 45570);
        assert!((m.seconds - 2.0).abs() < 1e-9);
        assert_eq!(m.errors, 20);
        let text = text.replace("20 failed", "0 failed");
        assert_eq!(parse_h2load(&text).unwrap().errors, 3);
        assert!(parse_h2load("Application protocol: h2\n").is_err());
        let log: String = (1..=200)
            .map(|i| format!("1796618285375027\t200\t{}\n", i * 1000))
            .collect();
        assert!((h2load_p99_ms(&log).unwrap() - 199.0).abs() < 1e-9);
        assert!(h2load_p99_ms("").is_err());
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
    fn reads_own_cpu_and_memory() {
        assert!(tree_cpu_seconds(std::process::id()).unwrap().total() >= 0.0);
        assert!(tree_rss_kib(std::process::id()).unwrap() > 0);
    }
}
