//! `lb`: the load balancer's agent and command-line interface.
// Functions stay short enough to read at once (threshold in clippy.toml);
// tests, which read as one scenario each, are exempt.
#![cfg_attr(not(test), warn(clippy::too_many_lines))]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb_userspace::{
    agent, config,
    control::{self, ControlCommand, SocketArg},
    dataplane::pin,
    decap::{self, DecapArgs},
    demo,
    lab::backend_server::BackendArgs,
};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::prelude::*;

/// XDP L4 load balancer with a userspace L7 proxy.
#[derive(Parser)]
#[command(name = "lb", version, about)]
struct Cli {
    #[command(flatten)]
    socket: SocketArg,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load the XDP program, attach it to the configured interfaces and balance
    /// until SIGINT/SIGTERM (SIGHUP or `lb reload` reloads the config); serves
    /// the control socket given by --socket.
    Run {
        /// Configuration file (TOML).
        #[arg(long, short)]
        config: PathBuf,
        /// The lb-xdp eBPF object (default: $LB_BPF_OBJECT, next to this binary, or the build tree).
        #[arg(long)]
        bpf_object: Option<PathBuf>,
        /// bpffs directory for the pinned maps and attachments that let the XDP
        /// program outlive the agent (default: /sys/fs/bpf/lb/<config name>-<hash>).
        #[arg(long)]
        pin_dir: Option<PathBuf>,
        /// Run inside this network namespace (as `ip netns exec` would, but
        /// keeping the host's /sys/fs/bpf so pins survive the agent).
        #[arg(long)]
        netns: Option<String>,
        /// Take over from the agent running on --socket (HAProxy's -sf):
        /// start this one's L7 proxy beside it, then stop it softly, so
        /// that no connection is refused or cut.
        #[arg(long)]
        takeover: bool,
    },
    /// Talk to the running agent (see `lb help add`, `lb help show`, ...).
    #[command(flatten)]
    Control(ControlCommand),
    /// Live dashboard of the running agent: rates, states and health of
    /// services, backends, frontends and pool servers; select a backend and
    /// drain (d), enable (e) or disable (m) it; q quits.
    Top {
        /// Time between refreshes, e.g. "1s" or "500ms".
        #[arg(long, default_value = "1s", value_parser = parse_duration)]
        interval: std::time::Duration,
        /// Quit by itself after this long (e.g. "10m"); runs until q without it.
        #[arg(long = "for", value_parser = parse_duration)]
        limit: Option<std::time::Duration>,
    },
    /// Validate configuration files as `lb run` would take them here
    /// (interfaces must exist, the proxy's files load, its binds bind);
    /// report every error with file, line and reason.
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// Check as `lb run --netns NAME` would run (its interfaces, its addresses).
        #[arg(long)]
        netns: Option<String>,
    },
    /// Self-contained demo: a client, the balancer and backends in network
    /// namespaces; removed again on Ctrl-C.
    Demo {
        /// Number of backends.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=20))]
        backends: u8,
    },
    /// Backend side of ipip mode: strip the balancer's IP-in-IP header from
    /// packets to the given VIPs (XDP on IF, pinned so it outlives this
    /// command); run again to replace the VIP set, --detach to remove it,
    /// --stats to see its counters.
    Decap(DecapArgs),
    /// Tiny server that names itself (used by the namespace lab).
    #[command(hide = true, name = "lab-backend")]
    LabBackend {
        /// Name to answer with.
        #[arg(long)]
        name: String,
        /// TCP address to listen on (repeatable).
        #[arg(long)]
        tcp: Vec<SocketAddr>,
        /// UDP address to listen on (repeatable).
        #[arg(long)]
        udp: Vec<SocketAddr>,
    },
}

/// Parses "500ms", "1s", "2m": the configuration file's duration syntax.
fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    lb_proxy::duration::parse(s).ok_or_else(|| lb_proxy::duration::FORM.to_string())
}

fn check(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for file in files {
        // Interfaces are checked against this host (network namespace) too.
        match config::load_for_this_host(file) {
            Ok(c) => {
                let backends: usize = c.services.iter().map(|s| s.backends.len()).sum();
                let proxy = &c.proxy.0;
                // The L7 half only when there is one, so L4 files read as before.
                let l7 = match (proxy.frontends.len(), proxy.pools.len()) {
                    (0, 0) => String::new(),
                    (f, p) => format!(", {f} frontends, {p} pools"),
                };
                println!(
                    "{}: OK ({} services, {backends} backends{l7})",
                    file.display(),
                    c.services.len()
                );
                ok &= check_journal(file, c);
            }
            Err(errors) => {
                ok = false;
                eprintln!("{errors}");
            }
        }
    }
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// Checks the runtime journal beside `file` (`<file>.state`) as `lb run`
/// replays it: one it cannot read fails (`lb run` refuses to start on it),
/// entries it would drop are said. False if it cannot be read.
fn check_journal(file: &std::path::Path, config: config::Config) -> bool {
    let path = lb_userspace::runtime::journal_path(file);
    if !path.exists() {
        return true;
    }
    let journal = match lb_userspace::runtime::load_journal(&path) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("{e:#} (lb run refuses to start on it)");
            return false;
        }
    };
    let replayed = lb_userspace::runtime::replay_reporting(config, &journal);
    for (request, why) in &replayed.dropped {
        eprintln!(
            "{}: warning: entry dropped on replay: {request:?}: {why}",
            path.display()
        );
    }
    println!(
        "{}: OK ({} entries, {} kept after compaction, {} dropped)",
        path.display(),
        journal.len(),
        replayed.kept.len(),
        replayed.dropped.len()
    );
    true
}

/// Moves the whole process into a named network namespace; must run before
/// any thread is started, since setns only moves the calling thread.
fn enter_netns(name: &str) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    let path = std::path::Path::new("/run/netns").join(name);
    let file =
        std::fs::File::open(&path).map_err(|e| anyhow::anyhow!("network namespace {name}: {e}"))?;
    // SAFETY: a valid namespace fd; single-threaded at this point.
    if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        anyhow::bail!(
            "entering network namespace {name}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

#[global_allocator]
static ALLOCATOR: lb_userspace::Allocator = lb_userspace::ALLOCATOR;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let netns = match &cli.command {
        Command::Run { netns, .. } => netns.as_deref(),
        Command::Decap(args) => args.netns.as_deref(),
        Command::Check { netns, .. } => netns.as_deref(),
        _ => None,
    };
    if let Some(ns) = netns
        && let Err(e) = enter_netns(ns)
    {
        eprintln!("lb: {e:#}");
        return ExitCode::FAILURE;
    }
    // `lb run`: the agent's own work (health checks, control socket,
    // metrics, BGP, reloads) on one small runtime of its own; the L7 proxy
    // serves on threads of its own (lb_proxy::Threads), never delayed by it.
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if matches!(cli.command, Command::Run { .. }) {
        builder.worker_threads(1).thread_name("lb-agent");
    }
    match builder.enable_all().build() {
        Ok(rt) => rt.block_on(async_main(cli)),
        Err(e) => {
            eprintln!("lb: starting the runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Whether the log on standard output may be coloured: a terminal, and no
/// `NO_COLOR` (no-color.org).
fn colours() -> bool {
    std::io::IsTerminal::is_terminal(&std::io::stdout()) && std::env::var_os("NO_COLOR").is_none()
}

async fn async_main(cli: Cli) -> ExitCode {
    // rustls warns about each client's own mistakes (an IP address as
    // SNI, as wrk and some clients send): one line per handshake.
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,rustls=error"));
    // The access log leaves standard output while it goes to syslog: its
    // events are filtered one by one, as that can change at a reload.
    let stdout = tracing_subscriber::filter::DynFilterFn::new(|meta, _| {
        lb_userspace::syslog::to_stdout(meta.target())
    })
    .with_callsite_filter(|meta| {
        if meta.target() == lb_userspace::syslog::ACCESS_TARGET {
            tracing::subscriber::Interest::sometimes()
        } else {
            tracing::subscriber::Interest::always()
        }
    });
    tracing_subscriber::registry()
        .with(filter)
        .with(
            tracing_subscriber::fmt::layer()
                .with_target(false)
                // Colours for a terminal only: in a file or a pipe (journald,
                // a log shipper) the escape codes break grep and parsers.
                .with_ansi(colours())
                .with_filter(stdout),
        )
        .with(lb_userspace::syslog::SyslogLayer)
        .init();
    let result: Result<()> = match cli.command {
        Command::Run {
            config,
            bpf_object,
            pin_dir,
            netns: _,
            takeover,
        } => {
            let pin_dir = pin_dir.unwrap_or_else(|| pin::default_dir(&config));
            agent::run(agent::RunOptions {
                config,
                bpf_object,
                socket: cli.socket.path(),
                pin_dir,
                takeover,
            })
            .await
        }
        Command::Control(cmd) => {
            let socket = cli.socket.path();
            return tokio::task::spawn_blocking(move || control::cli::run(cmd, &socket))
                .await
                .unwrap_or_else(|e| Err(e.into()))
                .unwrap_or_else(|e| {
                    eprintln!("lb: {e:#}");
                    ExitCode::FAILURE
                });
        }
        Command::Top { interval, limit } => {
            let socket = cli.socket.path();
            tokio::task::spawn_blocking(move || lb_userspace::top::run(&socket, interval, limit))
                .await
                .unwrap_or_else(|e| Err(e.into()))
        }
        Command::Check { files, netns: _ } => return check(&files),
        Command::Demo { backends } => demo::run(backends.into()).await,
        Command::Decap(args) => decap::run(&args),
        Command::LabBackend { name, tcp, udp } => {
            tokio::task::spawn_blocking(move || BackendArgs { name, tcp, udp }.run())
                .await
                .unwrap_or_else(|e| Err(e.into()))
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lb: {e:#}");
            ExitCode::FAILURE
        }
    }
}
