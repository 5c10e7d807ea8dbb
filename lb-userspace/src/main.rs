//! `lb`: the load balancer's agent and command-line interface.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Result;
use clap::{Parser, Subcommand};
use lb_userspace::{
    agent, config,
    control::{self, ControlCommand, SocketArg},
    demo,
    lab::backend_server::BackendArgs,
};
use tracing_subscriber::EnvFilter;

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
    },
    /// Talk to the running agent (see `lb help add`, `lb help show`, ...).
    #[command(flatten)]
    Control(ControlCommand),
    /// Validate configuration files; report every error with file, line and reason.
    Check {
        /// Files to check.
        #[arg(required = true)]
        files: Vec<PathBuf>,
    },
    /// Self-contained demo: a client, the balancer and backends in network
    /// namespaces; removed again on Ctrl-C.
    Demo {
        /// Number of backends.
        #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u8).range(1..=20))]
        backends: u8,
    },
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

fn check(files: &[PathBuf]) -> ExitCode {
    let mut ok = true;
    for file in files {
        match config::load(file) {
            Ok(c) => {
                let backends: usize = c.services.iter().map(|s| s.backends.len()).sum();
                println!(
                    "{}: OK ({} services, {backends} backends)",
                    file.display(),
                    c.services.len()
                );
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

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")),
        )
        .with_target(false)
        .init();
    let cli = Cli::parse();
    let result: Result<()> = match cli.command {
        Command::Run { config, bpf_object } => {
            agent::run(agent::RunOptions {
                config,
                bpf_object,
                socket: cli.socket.path(),
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
        Command::Check { files } => return check(&files),
        Command::Demo { backends } => demo::run(backends.into()).await,
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
