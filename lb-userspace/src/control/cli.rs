//! The `lb` subcommands that control a running agent, flattened into the `lb` CLI.

use std::ffi::OsString;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde::Serialize;

use super::client;
use super::protocol::{
    AdminState, BackendInfo, BgpInfo, DEFAULT_SOCKET, DiscoveryInfo, DiscoveryState, ProxyInfo,
    ReasonCount, Request, Response, ServiceInfo,
};
use crate::config::{FlowHash, Forwarding, Mode, Protocol};

/// Environment variable naming the control socket when `--socket` is not given.
pub const SOCKET_ENV: &str = "LB_SOCKET";

/// The global `--socket PATH` argument.
#[derive(Debug, Clone, Default, PartialEq, Args)]
pub struct SocketArg {
    /// The agent's control socket [env: LB_SOCKET] [default: /run/lb/lb.sock].
    #[arg(long = "socket", global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
}

impl SocketArg {
    /// The socket path: `--socket`, else `$LB_SOCKET`, else `DEFAULT_SOCKET`.
    pub fn path(&self) -> PathBuf {
        resolve_socket(self.socket.clone(), std::env::var_os(SOCKET_ENV))
    }
}

/// Picks the socket path from the flag, then the environment, then the default.
fn resolve_socket(flag: Option<PathBuf>, env: Option<OsString>) -> PathBuf {
    // An empty variable counts as unset, as clap's own `env` does.
    flag.or_else(|| env.filter(|v| !v.is_empty()).map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_SOCKET))
}

/// Commands sent to a running agent over its control socket.
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum ControlCommand {
    /// Add a service or a backend to the running agent.
    #[command(subcommand)]
    Add(AddCommand),
    /// Remove a service or a backend from the running agent.
    #[command(subcommand)]
    Remove(RemoveCommand),
    /// Stop sending new flows to a backend; established flows keep going.
    Drain {
        /// Service name.
        service: String,
        /// Backend address, e.g. 198.18.2.11:8080.
        backend: SocketAddr,
    },
    /// Put a drained or disabled backend back into service.
    Enable {
        /// Service name.
        service: String,
        /// Backend address.
        backend: SocketAddr,
    },
    /// Take a backend out entirely; its established flows move elsewhere.
    Disable {
        /// Service name.
        service: String,
        /// Backend address.
        backend: SocketAddr,
    },
    /// Set a backend's weight (0 = no new flows).
    Weight {
        /// Service name.
        service: String,
        /// Backend address.
        backend: SocketAddr,
        /// New weight, 0 to 65535.
        #[arg(value_parser = clap::value_parser!(u32).range(0..=i64::from(lb_common::MAX_WEIGHT)))]
        weight: u32,
    },
    /// Close the open tcp sessions and WebSocket tunnels of an L7 pool
    /// server (HAProxy's `shutdown sessions server`), e.g. after disable.
    ShutdownSessions {
        /// pool:NAME.
        service: String,
        /// Server address.
        backend: SocketAddr,
    },
    /// Withdraw every VIP of this node from BGP; what still arrives is forwarded.
    DrainNode,
    /// Announce this node's VIPs again after drain-node.
    UndrainNode,
    /// Show services, backends, data-plane counters or BGP state.
    #[command(subcommand)]
    Show(ShowCommand),
    /// Make the agent re-read its configuration file.
    Reload,
    /// Stop the agent. The XDP program keeps forwarding with the last tables
    /// (the next `lb run` adopts them) unless --detach is given.
    Stop {
        /// Also detach the XDP program and remove its pinned maps.
        #[arg(long)]
        detach: bool,
        /// Let the L7 proxy's connections end first (HAProxy's soft stop,
        /// as SIGUSR1): its listeners close at once, requests in flight are
        /// answered, within `hard_stop_after`.
        #[arg(long, conflicts_with = "detach")]
        soft: bool,
    },
}

/// `lb add ...`
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum AddCommand {
    /// Add a service (without backends).
    Service {
        /// Unique service name.
        name: String,
        /// Virtual address and port, e.g. 198.18.100.1:80 or [fd00::1]:80.
        #[arg(long)]
        vip: SocketAddr,
        /// tcp or udp.
        #[arg(long, default_value = "tcp", value_parser = parse_protocol)]
        protocol: Protocol,
        /// l4 (forwarded by XDP) or l7 (passed to the kernel stack).
        #[arg(long, default_value = "l4", value_parser = parse_mode)]
        mode: Mode,
        /// nat, ipip or l2 (l4 services; ipip and l2 are direct server return).
        #[arg(long, default_value = "nat", value_parser = Forwarding::parse)]
        forwarding: Forwarding,
        /// flow or source: what picks a new flow's backend (l4 services;
        /// source keeps a client's flows on one backend).
        #[arg(long, default_value = "flow", value_parser = FlowHash::parse)]
        hash: FlowHash,
        /// Maglev table size, a prime (default: the agent's, 65537).
        #[arg(long)]
        ring_size: Option<u32>,
    },
    /// Add a backend to a service.
    Backend {
        /// Service name.
        service: String,
        /// Backend address, e.g. 198.18.2.11:8080.
        backend: SocketAddr,
        /// Weight, 0 to 65535 (0 = no new flows).
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(0..=i64::from(lb_common::MAX_WEIGHT)))]
        weight: u32,
    },
}

/// `lb remove ...`
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum RemoveCommand {
    /// Remove a service and its backends.
    Service {
        /// Service name.
        name: String,
    },
    /// Remove a backend from a service.
    Backend {
        /// Service name.
        service: String,
        /// Backend address.
        backend: SocketAddr,
    },
}

/// `lb show ...`
#[derive(Debug, Clone, PartialEq, Subcommand)]
pub enum ShowCommand {
    /// List services with their counters.
    Services {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// List backends, of one service or of all.
    Backends {
        /// Only this service.
        service: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Data-plane packet and byte counters by decision.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Which VIPs this node announces through BIRD, and BIRD's sessions.
    Bgp {
        /// Print JSON instead of tables.
        #[arg(long)]
        json: bool,
    },
    /// DNS discoveries (services and pools): state, backends found, last error.
    Discovery {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The L7 proxy's frontends, pools and servers with their request counters.
    Proxy {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// Parses "tcp" or "udp" (any case).
pub fn parse_protocol(s: &str) -> Result<Protocol, String> {
    match s.to_ascii_lowercase().as_str() {
        "tcp" => Ok(Protocol::Tcp),
        "udp" => Ok(Protocol::Udp),
        _ => Err(format!("expected tcp or udp, not {s:?}")),
    }
}

/// Parses "l4" or "l7" (any case).
pub fn parse_mode(s: &str) -> Result<Mode, String> {
    match s.to_ascii_lowercase().as_str() {
        "l4" => Ok(Mode::L4),
        "l7" => Ok(Mode::L7),
        _ => Err(format!("expected l4 or l7, not {s:?}")),
    }
}

/// The request a command sends.
pub fn to_request(cmd: &ControlCommand) -> Request {
    let state = |service: &String, backend: &SocketAddr, state| Request::SetBackendState {
        service: service.clone(),
        address: *backend,
        state,
    };
    match cmd {
        ControlCommand::Add(AddCommand::Service {
            name,
            vip,
            protocol,
            mode,
            forwarding,
            hash,
            ring_size,
        }) => Request::AddService {
            name: name.clone(),
            vip: *vip,
            protocol: *protocol,
            mode: *mode,
            forwarding: *forwarding,
            hash: *hash,
            ring_size: *ring_size,
        },
        ControlCommand::Add(AddCommand::Backend {
            service,
            backend,
            weight,
        }) => Request::AddBackend {
            service: service.clone(),
            address: *backend,
            weight: *weight,
        },
        ControlCommand::Remove(RemoveCommand::Service { name }) => {
            Request::RemoveService { name: name.clone() }
        }
        ControlCommand::Remove(RemoveCommand::Backend { service, backend }) => {
            Request::RemoveBackend {
                service: service.clone(),
                address: *backend,
            }
        }
        ControlCommand::Drain { service, backend } => state(service, backend, AdminState::Drain),
        ControlCommand::Enable { service, backend } => state(service, backend, AdminState::Ready),
        ControlCommand::Disable { service, backend } => state(service, backend, AdminState::Maint),
        ControlCommand::Weight {
            service,
            backend,
            weight,
        } => Request::SetWeight {
            service: service.clone(),
            address: *backend,
            weight: *weight,
        },
        ControlCommand::Show(ShowCommand::Services { .. }) => Request::ShowServices,
        ControlCommand::Show(ShowCommand::Backends { service, .. }) => Request::ShowBackends {
            service: service.clone(),
        },
        ControlCommand::Show(ShowCommand::Stats { .. }) => Request::ShowStats,
        ControlCommand::Show(ShowCommand::Bgp { .. }) => Request::ShowBgp,
        ControlCommand::Show(ShowCommand::Proxy { .. }) => Request::ShowProxy,
        ControlCommand::ShutdownSessions { service, backend } => Request::ShutdownSessions {
            service: service.clone(),
            address: *backend,
        },
        ControlCommand::DrainNode => Request::DrainNode,
        ControlCommand::UndrainNode => Request::UndrainNode,
        ControlCommand::Show(ShowCommand::Discovery { .. }) => Request::ShowDiscovery,
        ControlCommand::Reload => Request::Reload,
        ControlCommand::Stop { soft: true, .. } => Request::SoftStop,
        ControlCommand::Stop { detach, .. } => Request::Stop { detach: *detach },
    }
}

/// Sends the command to the agent on `socket` and prints its answer.
pub fn run(cmd: ControlCommand, socket: &Path) -> anyhow::Result<ExitCode> {
    let response = client::request(socket, to_request(&cmd))?;
    let json = match &cmd {
        ControlCommand::Show(
            ShowCommand::Services { json }
            | ShowCommand::Backends { json, .. }
            | ShowCommand::Stats { json }
            | ShowCommand::Bgp { json }
            | ShowCommand::Discovery { json }
            | ShowCommand::Proxy { json },
        ) => *json,
        _ => false,
    };
    let output = match (&cmd, response) {
        (_, Response::Error(msg)) => {
            eprintln!("lb: {msg}");
            return Ok(ExitCode::FAILURE);
        }
        (ControlCommand::Show(ShowCommand::Services { .. }), Response::Services(list)) => {
            render(&list, json, services_table)?
        }
        (ControlCommand::Show(ShowCommand::Backends { .. }), Response::Backends(list)) => {
            render(&list, json, backends_table)?
        }
        (ControlCommand::Show(ShowCommand::Stats { .. }), Response::Stats(list)) => {
            render(&list, json, stats_table)?
        }
        (ControlCommand::Show(ShowCommand::Bgp { .. }), Response::Bgp(info)) => {
            if json {
                let mut s = serde_json::to_string_pretty(&info).context("encoding JSON")?;
                s.push('\n');
                s
            } else {
                bgp_tables(&info)
            }
        }
        (ControlCommand::Show(ShowCommand::Discovery { .. }), Response::Discovery(list)) => {
            render(&list, json, discovery_table)?
        }
        (ControlCommand::Show(ShowCommand::Proxy { .. }), Response::Proxy(info)) => {
            if json {
                let mut s = serde_json::to_string_pretty(&info).context("encoding JSON")?;
                s.push('\n');
                s
            } else {
                proxy_table(&info)
            }
        }
        (ControlCommand::Show(_), other)
        | (_, other @ Response::Services(_))
        | (_, other @ Response::Backends(_))
        | (_, other @ Response::Stats(_))
        | (_, other @ Response::Bgp(_))
        | (_, other @ Response::Discovery(_))
        | (_, other @ Response::Proxy(_)) => {
            bail!("unexpected answer from the agent: {other:?}")
        }
        (ControlCommand::DrainNode | ControlCommand::UndrainNode, Response::Ok) => {
            return bird_took_it(socket);
        }
        (_, Response::Ok) => return Ok(ExitCode::SUCCESS),
    };
    print!("{output}");
    Ok(ExitCode::SUCCESS)
}

/// After `drain-node`/`undrain-node`: waits (at most `BIRD_WAIT`) until BIRD
/// announces what the agent wants, and says so; a failure of BIRD's (a bad
/// bird.conf, no control socket) is an error, not a silent success while
/// BIRD goes on announcing what it did.
fn bird_took_it(socket: &Path) -> anyhow::Result<ExitCode> {
    const BIRD_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
    let until = std::time::Instant::now() + BIRD_WAIT;
    loop {
        let Response::Bgp(info) = client::request(socket, Request::ShowBgp)? else {
            bail!("unexpected answer from the agent to show bgp");
        };
        if !info.enabled {
            return Ok(ExitCode::SUCCESS);
        }
        let mut wanted: Vec<std::net::IpAddr> = info
            .vips
            .iter()
            .filter(|v| v.announced)
            .map(|v| v.vip)
            .collect();
        wanted.sort();
        let mut in_bird = info.speaker.in_bird.clone().unwrap_or_default();
        in_bird.sort();
        if info.speaker.in_bird.is_some() && in_bird == wanted && info.speaker.last_error.is_none()
        {
            println!("BIRD announces {} VIP(s)", wanted.len());
            return Ok(ExitCode::SUCCESS);
        }
        if std::time::Instant::now() > until {
            let why = info
                .speaker
                .last_error
                .unwrap_or_else(|| format!("no answer within {BIRD_WAIT:?}"));
            eprintln!(
                "lb: the change is made, but BIRD has not taken it ({why}); it goes on retrying (lb show bgp)"
            );
            return Ok(ExitCode::FAILURE);
        }
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn render<T: Serialize>(
    list: &[T],
    json: bool,
    table: fn(&[T]) -> String,
) -> anyhow::Result<String> {
    if json {
        let mut s = serde_json::to_string_pretty(list).context("encoding JSON")?;
        s.push('\n');
        Ok(s)
    } else {
        Ok(table(list))
    }
}

fn protocol_name(p: Protocol) -> &'static str {
    match p {
        Protocol::Tcp => "tcp",
        Protocol::Udp => "udp",
    }
}

fn mode_name(m: Mode) -> &'static str {
    match m {
        Mode::L4 => "l4",
        Mode::L7 => "l7",
    }
}

/// Column alignment.
#[derive(Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// Renders rows under headers, columns two spaces apart, without trailing spaces.
fn table(headers: &[(&str, Align)], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|(h, _)| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|(h, _)| h.to_string()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i > 0 {
                line.push_str("  ");
            }
            let width = widths[i];
            let _ = match headers[i].1 {
                Align::Left => write!(line, "{cell:<width$}"),
                Align::Right => write!(line, "{cell:>width$}"),
            };
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `lb show services` as a table.
pub fn services_table(list: &[ServiceInfo]) -> String {
    use Align::*;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|s| {
            vec![
                s.name.clone(),
                s.vip.to_string(),
                protocol_name(s.protocol).into(),
                mode_name(s.mode).into(),
                match s.mode {
                    Mode::L4 => s.forwarding.as_str().into(),
                    Mode::L7 => "-".into(),
                },
                match s.mode {
                    Mode::L4 => s.hash.as_str().into(),
                    Mode::L7 => "-".into(),
                },
                s.backends.to_string(),
                s.packets.to_string(),
                s.bytes.to_string(),
                s.discovery
                    .as_ref()
                    .map_or_else(|| "-".into(), |d| discovery_state_name(d.state).into()),
            ]
        })
        .collect();
    table(
        &[
            ("NAME", Left),
            ("VIP", Left),
            ("PROTO", Left),
            ("MODE", Left),
            ("FORWARDING", Left),
            ("HASH", Left),
            ("BACKENDS", Right),
            ("PACKETS", Right),
            ("BYTES", Right),
            ("DISCOVERY", Left),
        ],
        &rows,
    )
}

fn discovery_state_name(s: DiscoveryState) -> &'static str {
    match s {
        DiscoveryState::Pending => "pending",
        DiscoveryState::Ok => "ok",
        DiscoveryState::Holding => "holding",
        DiscoveryState::Failing => "failing",
    }
}

/// `lb show discovery` as a table.
pub fn discovery_table(list: &[DiscoveryInfo]) -> String {
    use Align::*;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|d| {
            vec![
                d.group.clone(),
                d.name.clone(),
                d.record.clone(),
                discovery_state_name(d.state).into(),
                d.backends.to_string(),
                d.failures.to_string(),
                d.since_success_ms.map_or_else(
                    || "never".into(),
                    |ms| format!("{:.1}s ago", ms as f64 / 1000.0),
                ),
                d.detail
                    .clone()
                    .or_else(|| d.last_error.clone())
                    .unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(
        &[
            ("GROUP", Left),
            ("NAME", Left),
            ("TYPE", Left),
            ("STATE", Left),
            ("BACKENDS", Right),
            ("FAILURES", Right),
            ("LAST ANSWER", Left),
            ("LAST ERROR", Left),
        ],
        &rows,
    )
}

/// `lb show backends` as a table.
pub fn backends_table(list: &[BackendInfo]) -> String {
    use Align::*;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|b| {
            vec![
                b.service.clone(),
                b.address.to_string(),
                b.weight.to_string(),
                b.admin.as_str().into(),
                b.health.as_str().into(),
                b.last_check.clone().unwrap_or_else(|| "-".into()),
                b.active_flows.to_string(),
                match b.max_flows {
                    0 => "-".into(),
                    n => n.to_string(),
                },
                b.packets.to_string(),
                b.bytes.to_string(),
            ]
        })
        .collect();
    table(
        &[
            ("SERVICE", Left),
            ("BACKEND", Left),
            ("WEIGHT", Right),
            ("ADMIN", Left),
            ("HEALTH", Left),
            ("LAST-CHECK", Left),
            ("FLOWS", Right),
            ("MAX", Right),
            ("PACKETS", Right),
            ("BYTES", Right),
        ],
        &rows,
    )
}

/// `lb show stats` as a table.
pub fn stats_table(list: &[ReasonCount]) -> String {
    use Align::*;
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| vec![r.reason.clone(), r.packets.to_string(), r.bytes.to_string()])
        .collect();
    table(
        &[("REASON", Left), ("PACKETS", Right), ("BYTES", Right)],
        &rows,
    )
}

/// A counter's cell: its value, or "-" where it does not apply to the row.
fn counter_cell(applies: bool, n: u64) -> String {
    if applies { n.to_string() } else { "-".into() }
}

/// `lb show proxy` as text: one line per frontend, pool and pool server.
/// Denials count at frontends only, connect errors at pools and servers
/// only: the others show "-", as the stats page leaves them out.
pub fn proxy_table(info: &ProxyInfo) -> String {
    use Align::*;
    let row = |kind: &str, name: String, cur: usize, c: &lb_proxy::stats::CounterSnapshot| {
        let [_, ok, redirect, client, server, _] = c.responses;
        let frontend = kind == "frontend";
        vec![
            kind.to_string(),
            name,
            cur.to_string(),
            c.requests.to_string(),
            ok.to_string(),
            redirect.to_string(),
            client.to_string(),
            server.to_string(),
            counter_cell(frontend, c.denied),
            counter_cell(frontend, c.denied_connections),
            counter_cell(!frontend, c.connect_errors),
            c.bytes_out.to_string(),
        ]
    };
    let mut rows = Vec::new();
    for f in &info.frontends {
        rows.push(row(
            "frontend",
            f.name.clone(),
            f.current_connections,
            &f.counters,
        ));
    }
    for p in &info.pools {
        let cur = p.servers.iter().map(|s| s.current).sum();
        rows.push(row("pool", p.name.clone(), cur, &p.counters));
        for s in &p.servers {
            let name = format!("{}/{}", p.name, s.address);
            rows.push(row("server", name, s.current, &s.counters));
        }
    }
    table(
        &[
            ("KIND", Left),
            ("NAME", Left),
            ("CUR", Right),
            ("REQUESTS", Right),
            ("2XX", Right),
            ("3XX", Right),
            ("4XX", Right),
            ("5XX", Right),
            ("DENIED_REQ", Right),
            ("DENIED_CONN", Right),
            ("CONN_ERR", Right),
            ("BYTES_OUT", Right),
        ],
        &rows,
    )
}

/// `lb show bgp` as text: the node, its VIPs, BIRD's protocols.
pub fn bgp_tables(info: &BgpInfo) -> String {
    let mut out = bgp_header(info);
    out.push_str(&bgp_vips_table(info));
    if info.enabled {
        out.push('\n');
        match &info.bird_error {
            Some(e) => {
                let _ = writeln!(out, "BIRD protocols: unavailable: {e}");
            }
            None => out.push_str(&bird_protocols_table(&info.protocols)),
        }
    }
    out
}

/// The lines above the tables: BIRD's socket and file, the last update, the node.
fn bgp_header(info: &BgpInfo) -> String {
    let mut out = String::new();
    if !info.enabled {
        out.push_str("bgp: not configured (no [bgp] section); nothing is announced\n");
    } else {
        let _ = writeln!(
            out,
            "bird: {}  include: {}",
            info.bird_socket.as_deref().unwrap_or("-"),
            info.include_file.as_deref().unwrap_or("-")
        );
        let _ = match (&info.speaker.last_error, info.speaker.last_ok) {
            (Some(e), _) => writeln!(out, "last update: FAILED, retrying: {e}"),
            (None, Some(t)) => writeln!(out, "last update: ok (unix time {t})"),
            (None, None) => writeln!(out, "last update: none yet"),
        };
    }
    let _ = writeln!(
        out,
        "node: {}\n",
        if info.drained { "DRAINED" } else { "active" }
    );
    out
}

/// Every VIP: announced or not, whether BIRD holds it, why, its services.
fn bgp_vips_table(info: &BgpInfo) -> String {
    use Align::*;
    let in_bird = |vip| {
        info.speaker
            .in_bird
            .as_ref()
            .is_some_and(|vips| vips.contains(vip))
    };
    let rows: Vec<Vec<String>> = info
        .vips
        .iter()
        .map(|v| {
            vec![
                v.vip.to_string(),
                if v.announced {
                    "announced"
                } else {
                    "withdrawn"
                }
                .into(),
                if in_bird(&v.vip) { "yes" } else { "no" }.into(),
                v.reason.clone(),
                v.services.join(","),
            ]
        })
        .collect();
    table(
        &[
            ("VIP", Left),
            ("STATE", Left),
            ("IN BIRD", Left),
            ("WHY", Left),
            ("SERVICES", Left),
        ],
        &rows,
    )
}

/// BIRD's protocols (its BGP sessions among them) with their states.
fn bird_protocols_table(protocols: &[crate::bgp::bird::Protocol]) -> String {
    use Align::*;
    let rows: Vec<Vec<String>> = protocols
        .iter()
        .map(|p| {
            vec![
                p.name.clone(),
                p.proto.clone(),
                p.state.clone(),
                p.since.clone(),
                p.info.clone(),
            ]
        })
        .collect();
    table(
        &[
            ("PROTOCOL", Left),
            ("KIND", Left),
            ("STATE", Left),
            ("SINCE", Left),
            ("INFO", Left),
        ],
        &rows,
    )
}

#[cfg(test)]
mod tests {
    use clap::{CommandFactory, Parser};

    use super::*;
    use crate::control::Health;

    #[derive(Debug, Parser)]
    #[command(name = "lb")]
    struct Cli {
        #[command(flatten)]
        socket: SocketArg,
        #[command(subcommand)]
        command: ControlCommand,
    }

    fn parse(args: &str) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("lb").chain(args.split_whitespace()))
    }

    fn request(args: &str) -> Request {
        to_request(&parse(args).unwrap().command)
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn every_command_maps_to_its_request() {
        let b = addr("198.18.2.11:8080");
        let cases = [
            (
                "add service web --vip 198.18.100.1:80",
                Request::AddService {
                    name: "web".into(),
                    vip: addr("198.18.100.1:80"),
                    protocol: Protocol::Tcp,
                    mode: Mode::L4,
                    forwarding: Forwarding::Nat,
                    hash: crate::config::FlowHash::Flow,
                    ring_size: None,
                },
            ),
            (
                "add service dns --vip [fd00::1]:53 --protocol udp --mode l7 --ring-size 997",
                Request::AddService {
                    name: "dns".into(),
                    vip: addr("[fd00::1]:53"),
                    protocol: Protocol::Udp,
                    mode: Mode::L7,
                    forwarding: Forwarding::Nat,
                    hash: crate::config::FlowHash::Flow,
                    ring_size: Some(997),
                },
            ),
            (
                "add service sticky --vip 198.18.100.2:443 --forwarding ipip --hash source",
                Request::AddService {
                    name: "sticky".into(),
                    vip: addr("198.18.100.2:443"),
                    protocol: Protocol::Tcp,
                    mode: Mode::L4,
                    forwarding: Forwarding::Ipip,
                    hash: crate::config::FlowHash::Source,
                    ring_size: None,
                },
            ),
            (
                "remove service web",
                Request::RemoveService { name: "web".into() },
            ),
            (
                "add backend web 198.18.2.11:8080",
                Request::AddBackend {
                    service: "web".into(),
                    address: b,
                    weight: 1,
                },
            ),
            (
                "add backend web 198.18.2.11:8080 --weight 5",
                Request::AddBackend {
                    service: "web".into(),
                    address: b,
                    weight: 5,
                },
            ),
            (
                "remove backend web 198.18.2.11:8080",
                Request::RemoveBackend {
                    service: "web".into(),
                    address: b,
                },
            ),
            (
                "drain web 198.18.2.11:8080",
                Request::SetBackendState {
                    service: "web".into(),
                    address: b,
                    state: AdminState::Drain,
                },
            ),
            (
                "enable web 198.18.2.11:8080",
                Request::SetBackendState {
                    service: "web".into(),
                    address: b,
                    state: AdminState::Ready,
                },
            ),
            (
                "disable web 198.18.2.11:8080",
                Request::SetBackendState {
                    service: "web".into(),
                    address: b,
                    state: AdminState::Maint,
                },
            ),
            (
                "shutdown-sessions pool:app 198.18.2.11:8080",
                Request::ShutdownSessions {
                    service: "pool:app".into(),
                    address: b,
                },
            ),
            (
                "weight web 198.18.2.11:8080 0",
                Request::SetWeight {
                    service: "web".into(),
                    address: b,
                    weight: 0,
                },
            ),
            ("show services", Request::ShowServices),
            ("show services --json", Request::ShowServices),
            ("show backends", Request::ShowBackends { service: None }),
            (
                "show backends web --json",
                Request::ShowBackends {
                    service: Some("web".into()),
                },
            ),
            ("show stats --json", Request::ShowStats),
            ("show discovery", Request::ShowDiscovery),
            ("show discovery --json", Request::ShowDiscovery),
            ("reload", Request::Reload),
            ("stop --detach", Request::Stop { detach: true }),
            ("stop --soft", Request::SoftStop),
            ("drain-node", Request::DrainNode),
            ("undrain-node", Request::UndrainNode),
            ("show bgp --json", Request::ShowBgp),
        ];
        for (args, want) in cases {
            assert_eq!(request(args), want, "{args}");
        }
    }

    #[test]
    fn bad_arguments_are_refused() {
        for args in [
            "add service web",
            "add service web --vip 1.2.3.4",
            "add service web --vip 1.2.3.4:80 --protocol sctp",
            "add service web --vip 1.2.3.4:80 --mode l3",
            "add backend web 1.2.3.4:80 --weight 65536",
            "weight web 1.2.3.4:80 -1",
            "drain web",
            "show",
        ] {
            assert!(parse(args).is_err(), "{args}");
        }
        let err = parse("add service web --vip 1.2.3.4:80 --protocol sctp").unwrap_err();
        assert!(err.to_string().contains("expected tcp or udp"), "{err}");
        assert_eq!(parse_protocol("UDP"), Ok(Protocol::Udp));
        assert_eq!(parse_mode("L7"), Ok(Mode::L7));
    }

    #[test]
    fn socket_flag_env_and_default() {
        let cli = parse("--socket /tmp/a.sock reload").unwrap();
        assert_eq!(cli.socket.socket, Some(PathBuf::from("/tmp/a.sock")));
        // Global: accepted after the subcommand too.
        let cli = parse("show stats --socket /tmp/b.sock").unwrap();
        assert_eq!(cli.socket.socket, Some(PathBuf::from("/tmp/b.sock")));
        let p = |s: &str| PathBuf::from(s);
        assert_eq!(resolve_socket(Some(p("/f")), Some("/e".into())), p("/f"));
        assert_eq!(resolve_socket(None, Some("/e".into())), p("/e"));
        assert_eq!(resolve_socket(None, Some("".into())), p(DEFAULT_SOCKET));
        assert_eq!(resolve_socket(None, None), p(DEFAULT_SOCKET));
    }

    #[test]
    fn services_table_is_aligned() {
        let list = [
            ServiceInfo {
                name: "web".into(),
                vip: addr("198.18.100.1:80"),
                protocol: Protocol::Tcp,
                mode: Mode::L4,
                forwarding: Forwarding::Ipip,
                hash: crate::config::FlowHash::Source,
                backends: 3,
                packets: 1234,
                bytes: 567890,
                discovery: Some(DiscoveryInfo {
                    group: "web".into(),
                    name: "_http._tcp.web.example.".into(),
                    record: "srv".into(),
                    state: DiscoveryState::Failing,
                    backends: 2,
                    failures: 4,
                    last_error: Some("no answer (timeout)".into()),
                    since_success_ms: Some(2500),
                    detail: None,
                }),
            },
            ServiceInfo {
                name: "dns-v6".into(),
                vip: addr("[fd00:18:100::1]:53"),
                protocol: Protocol::Udp,
                mode: Mode::L7,
                forwarding: Forwarding::Nat,
                hash: crate::config::FlowHash::Flow,
                backends: 12,
                packets: 0,
                bytes: 0,
                discovery: None,
            },
        ];
        assert_eq!(
            services_table(&list),
            "\
NAME    VIP                  PROTO  MODE  FORWARDING  HASH    BACKENDS  PACKETS   BYTES  DISCOVERY
web     198.18.100.1:80      tcp    l4    ipip        source         3     1234  567890  failing
dns-v6  [fd00:18:100::1]:53  udp    l7    -           -             12        0       0  -
"
        );
        let discoveries: Vec<DiscoveryInfo> =
            list.iter().filter_map(|s| s.discovery.clone()).collect();
        assert_eq!(
            discovery_table(&discoveries),
            "\
GROUP  NAME                     TYPE  STATE    BACKENDS  FAILURES  LAST ANSWER  LAST ERROR
web    _http._tcp.web.example.  srv   failing         2         4  2.5s ago     no answer (timeout)
"
        );
        let value: serde_json::Value =
            serde_json::from_str(&render(&list, true, services_table).unwrap()).unwrap();
        assert_eq!(value[0]["discovery"]["state"], "failing");
        assert_eq!(value[0]["discovery"]["last_error"], "no answer (timeout)");
        assert!(value[1]["discovery"].is_null());
    }

    #[test]
    fn backends_table_is_aligned() {
        let list = [
            BackendInfo {
                service: "web".into(),
                address: addr("198.18.2.11:8080"),
                weight: 1,
                admin: AdminState::Ready,
                health: Health::Up,
                last_check: Some("ok".into()),
                active_flows: 17,
                max_flows: 0,
                packets: 100,
                bytes: 6400,
            },
            BackendInfo {
                service: "pool:web".into(),
                address: addr("198.18.2.12:8080"),
                weight: 100,
                admin: AdminState::Maint,
                health: Health::Unchecked,
                last_check: None,
                active_flows: 0,
                max_flows: 50,
                packets: 0,
                bytes: 0,
            },
        ];
        assert_eq!(
            backends_table(&list),
            "\
SERVICE   BACKEND           WEIGHT  ADMIN  HEALTH     LAST-CHECK  FLOWS  MAX  PACKETS  BYTES
web       198.18.2.11:8080       1  ready  up         ok             17    -      100   6400
pool:web  198.18.2.12:8080     100  maint  unchecked  -               0   50        0      0
"
        );
    }

    #[test]
    fn stats_table_and_empty_tables() {
        let list = [
            ReasonCount {
                reason: "tx_forward".into(),
                packets: 5,
                bytes: 320,
            },
            ReasonCount {
                reason: "pass_not_vip".into(),
                packets: 12345,
                bytes: 0,
            },
        ];
        assert_eq!(
            stats_table(&list),
            "\
REASON        PACKETS  BYTES
tx_forward          5    320
pass_not_vip    12345      0
"
        );
        assert_eq!(stats_table(&[]), "REASON  PACKETS  BYTES\n");
        assert_eq!(
            services_table(&[]),
            "NAME  VIP  PROTO  MODE  FORWARDING  HASH  BACKENDS  PACKETS  BYTES  DISCOVERY\n"
        );
    }

    #[test]
    fn proxy_table_shows_denials_at_frontends_and_errors_at_pools() {
        use lb_proxy::stats::CounterSnapshot;
        let counters = |requests, denied, denied_connections, connect_errors| CounterSnapshot {
            requests,
            responses: [0, requests - denied, 0, denied, 0, 0],
            denied,
            denied_connections,
            connect_errors,
            bytes_out: requests * 100,
            ..CounterSnapshot::default()
        };
        let server = |address, current, counters| lb_proxy::ServerStats {
            address: addr(address),
            current,
            idle_connections: 0,
            weight: 1,
            up: true,
            taken_out: false,
            counters,
        };
        let info = ProxyInfo {
            frontends: vec![lb_proxy::FrontendStats {
                name: "web".into(),
                current_connections: 3,
                max_connections: 1000,
                counters: counters(120, 4, 37, 0),
            }],
            pools: vec![lb_proxy::PoolStats {
                name: "app".into(),
                queued: 0,
                servers: vec![
                    server("198.18.2.11:8080", 1, counters(70, 0, 0, 2)),
                    server("198.18.2.12:8080", 0, counters(46, 0, 0, 0)),
                ],
                counters: counters(116, 0, 0, 2),
            }],
        };
        assert_eq!(
            proxy_table(&info),
            "\
KIND      NAME                  CUR  REQUESTS  2XX  3XX  4XX  5XX  DENIED_REQ  DENIED_CONN  CONN_ERR  BYTES_OUT
frontend  web                     3       120  116    0    4    0           4           37         -      12000
pool      app                     1       116  116    0    0    0           -            -         2      11600
server    app/198.18.2.11:8080    1        70   70    0    0    0           -            -         2       7000
server    app/198.18.2.12:8080    0        46   46    0    0    0           -            -         0       4600
"
        );
        assert_eq!(
            proxy_table(&ProxyInfo::default()),
            "KIND  NAME  CUR  REQUESTS  2XX  3XX  4XX  5XX  DENIED_REQ  DENIED_CONN  CONN_ERR  BYTES_OUT\n"
        );
    }

    #[test]
    fn json_output_is_pretty_and_lowercase() {
        let list = [ServiceInfo {
            name: "web".into(),
            vip: addr("198.18.100.1:80"),
            protocol: Protocol::Udp,
            mode: Mode::L7,
            forwarding: Forwarding::Nat,
            hash: crate::config::FlowHash::Flow,
            backends: 1,
            packets: 2,
            bytes: 3,
            discovery: None,
        }];
        let out = render(&list, true, services_table).unwrap();
        let value: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(value[0]["vip"], "198.18.100.1:80");
        assert_eq!(value[0]["protocol"], "udp");
        assert_eq!(value[0]["mode"], "l7");
        assert!(out.contains("\n  {\n"), "{out}");
    }
}
