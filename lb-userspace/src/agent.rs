//! `lb run`: load and attach the data plane, fill it from the config and the
//! runtime journal, run health checks, serve the control socket and metrics,
//! reload on SIGHUP or `lb reload`, detach cleanly on SIGINT/SIGTERM.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use lb_common::Reason;
use tokio::net::TcpListener;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::{
    admin,
    balancer::{Availability, Balancer},
    bgp,
    config::{self, Config},
    control::{
        protocol::{
            AdminState, BackendInfo, BgpInfo, DiscoveryState, Health, ProxyInfo, ReasonCount,
            Request, Response, ServiceInfo,
        },
        server::{self, Handler},
    },
    dataplane::{self, Counters, Dataplane, pin},
    discovery::{self, Tracker, Verdict, dns},
    health::{HealthChecker, HealthEvent, Target},
    metrics,
    runtime::{self, Desired},
};

/// Options of `lb run`.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Path of the TOML configuration.
    pub config: PathBuf,
    /// Path of the `lb-xdp` object; found automatically when `None`.
    pub bpf_object: Option<PathBuf>,
    /// Path of the control socket.
    pub socket: PathBuf,
    /// bpffs directory where maps and attachments are pinned.
    pub pin_dir: PathBuf,
    /// Take over from the agent on `socket` (`takeover`).
    pub takeover: bool,
}

fn load_config(path: &Path) -> Result<Config> {
    config::load(path).map_err(|errors| anyhow!("invalid configuration:\n{errors}"))
}

/// As `load_config`, and the interfaces must exist: checked before anything is
/// loaded or attached, so a typo is reported at its line and changes nothing.
fn load_config_for_start(path: &Path) -> Result<Config> {
    config::load_for_this_host(path).map_err(|errors| anyhow!("invalid configuration:\n{errors}"))
}

/// What a reload to `file` listens on: its frontends' binds, and the
/// running `metrics` and `[admin]` (those change on restart only).
fn reload_listeners(running: &Config, file: &Config) -> Vec<(SocketAddr, String)> {
    let mut bound = file.clone();
    bound.metrics = running.metrics;
    bound.admin.clone_from(&running.admin);
    bound.listeners()
}

/// Told by the main loop whether the L7 proxy took a change or reload.
type ProxyApplied = std::sync::mpsc::SyncSender<Result<(), String>>;

/// How long an operator's change or reload waits for the L7 proxy to take
/// it (milliseconds, unless its serving threads are stuck).
const PROXY_APPLY_WAIT: Duration = Duration::from_secs(10);

/// Everything the agent's tasks share, behind one lock.
pub struct Agent {
    config_path: PathBuf,
    journal_path: PathBuf,
    journal: Vec<Request>,
    desired: Desired,
    /// The data plane, unless the file has no `interfaces` (the proxy alone).
    balancer: Option<Balancer>,
    health: HealthChecker,
    /// Tells the main loop to stop, and how.
    stop: mpsc::UnboundedSender<Ending>,
    /// Tells the main loop a reload happened (the L7 proxy lives there).
    reloaded: mpsc::UnboundedSender<Option<ProxyApplied>>,
    /// How the proxy took the last change or reload, for its answer
    /// (taken by `Shared::handle`).
    applying: Option<std::sync::mpsc::Receiver<Result<(), String>>>,
    /// Live figures of the running L7 proxy, if one runs (set by the main loop).
    proxy_stats: Option<lb_proxy::ProxyStats>,
    /// Keeps BIRD announcing what `bgp::announcements` says (its task runs in the main loop).
    bgp: bgp::Speaker,
    /// Each DNS discovery's state and set in force, by group.
    discovery: BTreeMap<String, Tracker>,
    /// Where the discovered sets are kept for a start while the DNS fails.
    discovery_cache: PathBuf,
    /// The addresses it listens on, kept from a second agent.
    claims: crate::claims::Claims,
    /// The admin listener's credentials in force, if it runs (a reload renews them).
    admin_auth: Option<Arc<admin::AuthSlot>>,
}

impl Agent {
    /// Availability of every backend from its administrative state and health.
    fn availability(&self) -> impl Fn(&str, SocketAddr) -> Availability + '_ {
        move |service, address| {
            let admin = self.desired.admin_state(service, address);
            let down = self
                .health
                .status(service, address)
                .is_some_and(|s| s.health == Health::Down);
            Availability {
                new_flows: admin == AdminState::Ready && !down,
                established: admin != AdminState::Maint && !down,
            }
        }
    }

    /// Pushes `desired` (and current health) to the data plane.
    fn sync(&mut self) -> Result<()> {
        let config = self.desired.config.clone();
        let availability = {
            let f = self.availability();
            // Evaluated up front so the balancer can be borrowed mutably below.
            let mut m = std::collections::HashMap::new();
            for s in &config.services {
                for b in &s.backends {
                    m.insert((s.name.clone(), b.address), f(&s.name, b.address));
                }
            }
            m
        };
        let Some(balancer) = self.balancer.as_mut() else {
            if !config.services.is_empty() {
                anyhow::bail!("{NO_DATA_PLANE}");
            }
            self.health.set_targets(health_targets(&config));
            self.announce();
            return Ok(());
        };
        balancer.apply_with(&config, &|s, a| {
            availability
                .get(&(s.to_string(), a))
                .copied()
                .unwrap_or(Availability::FULL)
        })?;
        self.health.set_targets(health_targets(&config));
        self.announce();
        Ok(())
    }

    /// The first sync of a start. A DNS answer must not keep the agent from
    /// starting (say, more backends than the data plane holds): if the
    /// discovered backends cannot be applied, it starts with `without`
    /// them and says so; the sets in force are cached for the next start.
    fn first_sync(&mut self, without: Desired) -> Result<()> {
        if let Err(e) = self.sync() {
            if self.discovery.is_empty() {
                return Err(e);
            }
            warn!("the discovered backends cannot be applied, starting without them: {e:#}");
            self.desired = without;
            for t in self.discovery.values_mut() {
                t.seed(Vec::new());
                t.refused(format!("applying at start: {e:#}"));
            }
            self.sync()?;
        }
        if !self.discovery.is_empty()
            && let Err(e) =
                discovery::save_cache(&self.discovery_cache, &discovery::cache_of(&self.discovery))
        {
            warn!("saving the discovered backends: {e:#}");
        }
        Ok(())
    }

    /// Every VIP and whether this node announces it now.
    fn announcements(&self) -> Vec<bgp::VipAnnouncement> {
        let available = self.availability();
        bgp::announcements(&self.desired.config, self.desired.drained, |s, b| {
            available(&s.name, b.address).new_flows
        })
    }

    /// Tells the BGP speaker what to announce (after the tables are in place,
    /// so a VIP is never announced before it can be served).
    fn announce(&self) {
        let vips = self
            .announcements()
            .into_iter()
            .filter(|a| a.announced)
            .map(|a| a.vip)
            .collect();
        self.bgp.want(bgp::Wanted {
            config: self.desired.config.bgp.clone(),
            vips,
        });
    }

    /// `lb show bgp` without BIRD's side (read by `Shared` outside the lock).
    fn bgp_info(&self) -> BgpInfo {
        let cfg = self.desired.config.bgp.as_ref();
        BgpInfo {
            enabled: cfg.is_some(),
            drained: self.desired.drained,
            bird_socket: cfg.map(|c| c.bird_socket.display().to_string()),
            include_file: cfg.map(|c| c.include_file.display().to_string()),
            vips: self.announcements(),
            speaker: self.bgp.status(),
            protocols: Vec::new(),
            bird_error: None,
        }
    }

    /// Applies an operator's change: validated on a copy, pushed, then journaled.
    fn change(&mut self, request: Request) -> Response {
        let mut next = self.desired.clone();
        if let Err(e) = next.apply(&request) {
            return Response::Error(e);
        }
        let previous = std::mem::replace(&mut self.desired, next);
        let node_only = matches!(request, Request::DrainNode | Request::UndrainNode);
        // Draining changes announcements only: no table is rebuilt for it.
        let synced = if node_only {
            self.announce();
            Ok(())
        } else {
            self.sync()
        };
        if let Err(e) = synced {
            // Put the old state back so what runs matches what we report.
            self.desired = previous;
            if let Err(e2) = self.sync() {
                error!("restoring the previous state failed: {e2:#}");
            }
            return Response::Error(format!("{e:#}"));
        }
        // Compacted as it grows: the net state, not the history.
        runtime::record(&mut self.journal, request);
        // A removed service takes its discovery along.
        self.discovery = discovery::reconcile(&self.discovery, &self.desired.config);
        // The proxy (in the main loop) picks up pool changes and states.
        self.follow_proxy();
        if let Err(e) = runtime::save_journal(&self.journal_path, &self.journal) {
            error!("the change is live but could not be saved: {e:#}");
            return Response::Error(format!(
                "applied, but not saved (it will be lost on restart): {e:#}"
            ));
        }
        Response::Ok
    }

    /// Applies the configuration file as re-read (`Shared::reload`, which
    /// reads it without the lock); a bad one leaves everything as it is.
    fn reload(&mut self, file: Result<Config>) -> Response {
        let file = match file {
            Ok(c) => c,
            Err(e) => {
                error!("reload rejected, keeping the running configuration: {e:#}");
                return Response::Error(format!(
                    "reload rejected, the running configuration stays: {e:#}"
                ));
            }
        };
        crate::fd_limit::raise_for(&file);
        let old = &self.desired.config;
        let bind = |c: &Config| c.admin.as_ref().map(|a| a.bind);
        if old.interfaces != file.interfaces
            || old.metrics != file.metrics
            || bind(old) != bind(&file)
        {
            warn!("interfaces, metrics and the [admin] bind take effect on restart only");
        }
        if let Err(e) = self.claims.hold(&reload_listeners(old, &file)) {
            error!("reload rejected, keeping the running configuration: {e:#}");
            return Response::Error(format!(
                "reload rejected, the running configuration stays: {e:#}"
            ));
        }

        let (mut desired, kept) = runtime::replay(file, &self.journal);
        // Discovered backends are not in the file: the sets in force go on
        // top again (a changed discovery keeps its set until it answers).
        let trackers = discovery::reconcile(&self.discovery, &desired.config);
        merge_discovered(&trackers, &mut desired);
        let previous = std::mem::replace(&mut self.desired, desired);
        if let Err(e) = self.sync() {
            self.desired = previous;
            let _ = self.sync();
            // Back to the running file's addresses (held before: no refusal).
            let running = self.desired.config.listeners();
            if let Err(e) = self.claims.hold(&running) {
                warn!("claiming the running listeners again: {e:#}");
            }
            return Response::Error(format!("reload failed: {e:#}"));
        }
        if previous.config.syslog != self.desired.config.syslog {
            point_access_log(self.desired.config.syslog.as_ref());
        }
        self.discovery = trackers;
        if kept.len() != self.journal.len() {
            self.journal = kept;
            if let Err(e) = runtime::save_journal(&self.journal_path, &self.journal) {
                warn!("saving the runtime state: {e:#}");
            }
        }
        self.renew_admin_auth();
        self.follow_proxy();
        info!("configuration reloaded");
        Response::Ok
    }

    /// Puts the reloaded file's admin users and token in force: a user
    /// removed or a token replaced is refused from now on. An `[admin]`
    /// removed from the file leaves the listener admitting nobody.
    fn renew_admin_auth(&self) {
        let Some(slot) = &self.admin_auth else {
            return;
        };
        let config = &self.desired.config;
        let (users, token) = match &config.admin {
            Some(a) => admin_credentials(a, config),
            None => (HashMap::new(), None),
        };
        if slot.update(users, token) {
            if config.admin.is_none() {
                warn!("[admin] removed: the admin listener admits nobody until a restart");
            } else {
                info!("admin listener: users and token reloaded");
            }
        }
    }

    /// Has the main loop bring the L7 proxy to `desired`; the answer to
    /// the operator waits for it (`Shared::handle`), so that what the CLI
    /// says is done is in force, and a proxy that could not take it is said.
    fn follow_proxy(&mut self) {
        let (done, applying) = std::sync::mpsc::sync_channel(1);
        self.applying = Some(applying);
        let _ = self.reloaded.send(Some(done));
    }

    fn show_services(&mut self) -> Result<Response> {
        let Some(balancer) = self.balancer.as_mut() else {
            return Ok(Response::Services(Vec::new()));
        };
        let counters = balancer.dataplane().counters()?;
        let now = Instant::now();
        let services = self
            .desired
            .config
            .services
            .iter()
            .map(|s| {
                let t = balancer
                    .vip_id(s.vip, s.protocol)
                    .and_then(|id| counters.vips.get(id as usize).copied())
                    .unwrap_or_default();
                ServiceInfo {
                    name: s.name.clone(),
                    vip: s.vip,
                    protocol: s.protocol,
                    mode: s.mode,
                    forwarding: s.forwarding,
                    hash: s.hash,
                    backends: s.backends.len(),
                    packets: t.packets,
                    bytes: t.bytes,
                    discovery: self.discovery.get(&s.name).map(|d| d.info(&s.name, now)),
                }
            })
            .collect();
        Ok(Response::Services(services))
    }

    fn show_backends(&mut self, only: Option<&str>) -> Result<Response> {
        let pools = &self.desired.config.proxy.0.pools;
        if let Some(name) = only
            && !self.desired.config.services.iter().any(|s| s.name == name)
            && !pools
                .iter()
                .any(|p| Group::parse(name) == Group::Pool(&p.name))
        {
            return Ok(Response::Error(format!("unknown service {name:?}")));
        }
        let data = self.data_plane_figures()?;
        Ok(Response::Backends(self.backend_infos(only, data.as_ref())))
    }

    /// The data plane's counters and flows per backend id (`None`: the proxy runs alone).
    fn data_plane_figures(&mut self) -> Result<Option<(Counters, HashMap<u32, u64>)>> {
        let Some(balancer) = self.balancer.as_mut() else {
            return Ok(None);
        };
        let counters = balancer.dataplane().counters()?;
        let flows = balancer.dataplane().flow_counts()?;
        Ok(Some((counters, flows)))
    }

    /// Every backend (of `only`, if given) and pool server as `lb show backends` lists it.
    fn backend_infos(
        &self,
        only: Option<&str>,
        data: Option<&(Counters, HashMap<u32, u64>)>,
    ) -> Vec<BackendInfo> {
        let mut out = Vec::new();
        // Without a data plane there are no services, only pools.
        if let (Some(balancer), Some((counters, flows))) = (self.balancer.as_ref(), data) {
            for s in &self.desired.config.services {
                if only.is_some_and(|n| n != s.name) {
                    continue;
                }
                for b in &s.backends {
                    let id = balancer.backend_id(&s.name, b.address);
                    let t = id
                        .and_then(|id| counters.backends.get(id as usize).copied())
                        .unwrap_or_default();
                    let status = self.health.status(&s.name, b.address);
                    out.push(BackendInfo {
                        service: s.name.clone(),
                        address: b.address,
                        weight: b.weight,
                        admin: self.desired.admin_state(&s.name, b.address),
                        health: status.as_ref().map(|c| c.health).unwrap_or_default(),
                        last_check: status.map(|c| c.last),
                        active_flows: id.and_then(|id| flows.get(&id).copied()).unwrap_or(0),
                        max_flows: 0,
                        packets: t.packets,
                        bytes: t.bytes,
                    });
                }
            }
        }
        out.extend(self.pool_server_infos(only));
        out
    }

    /// The L7 pool servers (of `only`, if given) as `lb show backends` lists them.
    fn pool_server_infos(&self, only: Option<&str>) -> Vec<BackendInfo> {
        let mut out = Vec::new();
        // L7 pool servers, as `pool:NAME` (their request counters: `lb show proxy`);
        // their FLOWS column is the requests in flight (HAProxy's scur).
        let live = self
            .proxy_stats
            .as_ref()
            .map(lb_proxy::ProxyStats::pools)
            .unwrap_or_default();
        for p in &self.desired.config.proxy.0.pools {
            let service = Group::pool_name(&p.name);
            if only.is_some_and(|n| n != service) {
                continue;
            }
            for server in &p.servers {
                let status = self.health.status(&service, server.address);
                let running = live
                    .iter()
                    .find(|l| l.name == p.name)
                    .and_then(|l| l.servers.iter().find(|s| s.address == server.address));
                let mut health = status.as_ref().map(|c| c.health).unwrap_or_default();
                let mut last_check = status.map(|c| c.last);
                // The proxy's passive check (max_fails) has it down for now.
                if running.is_some_and(|s| s.taken_out) {
                    health = Health::Down;
                    last_check = Some("out after failed requests (max_fails)".into());
                }
                out.push(BackendInfo {
                    service: service.clone(),
                    address: server.address,
                    weight: server.weight,
                    admin: self.desired.admin_state(&service, server.address),
                    health,
                    last_check,
                    active_flows: running.map_or(0, |s| s.current as u64),
                    max_flows: server.maxconn as u64,
                    packets: 0,
                    bytes: 0,
                });
            }
        }
        out
    }

    fn show_stats(&mut self) -> Result<Response> {
        let Some(balancer) = self.balancer.as_mut() else {
            return Ok(Response::Error(NO_DATA_PLANE.into()));
        };
        let counters = balancer.dataplane().counters()?;
        Ok(Response::Stats(
            Reason::ALL
                .iter()
                .map(|&r| ReasonCount {
                    reason: r.name().to_string(),
                    packets: counters.reason(r).packets,
                    bytes: counters.reason(r).bytes,
                })
                .collect(),
        ))
    }

    fn handle(&mut self, request: Request) -> Response {
        let shown = match &request {
            Request::ShowServices => self.show_services(),
            Request::ShowBackends { service } => self.show_backends(service.clone().as_deref()),
            Request::ShowStats => self.show_stats(),
            Request::ShowProxy => return Response::Proxy(self.proxy_info()),
            Request::ShowBgp => return Response::Bgp(self.bgp_info()),
            Request::ShowDiscovery => {
                let now = Instant::now();
                return Response::Discovery(
                    self.discovery
                        .iter()
                        .map(|(group, t)| t.info(group, now))
                        .collect(),
                );
            }
            Request::Reload => {
                return self.reload(load_config(&self.config_path));
            }
            Request::ShutdownSessions { service, address } => {
                return self.shutdown_sessions(service, *address);
            }
            Request::Stop { detach } => {
                let _ = self.stop.send(Ending::Stop { detach: *detach });
                return Response::Ok;
            }
            Request::SoftStop => {
                let _ = self.stop.send(Ending::Soft);
                return Response::Ok;
            }
            _ => return self.change(request),
        };
        shown.unwrap_or_else(|e| Response::Error(format!("{e:#}")))
    }

    /// Closes a pool server's `tcp` sessions and tunnels (an operator's
    /// `lb shutdown-sessions pool:NAME ADDR`).
    fn shutdown_sessions(&self, group: &str, address: SocketAddr) -> Response {
        let Group::Pool(pool) = Group::parse(group) else {
            return Response::Error(format!(
                "{group} is not pool:NAME: only L7 pool servers have sessions to shut down \
                 (an L4 backend's flows move with `lb disable`)"
            ));
        };
        match &self.proxy_stats {
            Some(s) if s.shutdown_sessions(pool, address) => {
                info!(%pool, server = %address, "tcp sessions and tunnels shut down by request");
                Response::Ok
            }
            Some(_) => Response::Error(format!("pool {pool} has no server {address}")),
            None => Response::Error("no L7 proxy runs".to_string()),
        }
    }

    /// A backend's health changed: rebuild what it affects.
    fn on_health(&mut self, event: &HealthEvent) {
        info!(service = %event.service, backend = %event.address, health = ?event.health, reason = %event.reason, "health changed");
        if let Err(e) = self.sync() {
            error!("applying a health change failed: {e:#}");
        }
    }

    /// One round of a DNS discovery answered (or failed): keep the set in
    /// force, or apply the new one through the same path as a CLI change.
    /// Returns whether an L7 pool's servers changed (the proxy follows).
    fn on_discovery(&mut self, event: dns::Event) -> bool {
        let group = event.group;
        let Some(tracker) = self.discovery.get_mut(&group) else {
            return false;
        };
        if tracker.spec() != &event.spec || tracker.family() != event.family {
            // From a task that a reload has replaced.
            return false;
        }
        let (was, previous_error) = (tracker.state(), tracker.last_error().map(str::to_owned));
        let verdict = tracker.observe(event.answer, Instant::now());
        log_discovery_state(&group, tracker, was, previous_error.as_deref());
        let Verdict::Apply(set) = verdict else {
            return false;
        };
        let mut next = self.desired.clone();
        let (diff, skipped) = match next.set_discovered(&group, &set) {
            Ok(d) => d,
            Err(e) => {
                warn!(%group, "DNS discovery found backends that cannot be applied, keeping the last good set: {e}");
                if let Some(t) = self.discovery.get_mut(&group) {
                    t.refused(e);
                }
                return false;
            }
        };
        for (address, why) in skipped {
            warn!(%group, %address, "discovered backend left out: {why}");
        }
        let previous = std::mem::replace(&mut self.desired, next);
        if let Err(e) = self.sync() {
            self.desired = previous;
            if let Err(e2) = self.sync() {
                error!("restoring the previous state failed: {e2:#}");
            }
            warn!(%group, "applying the discovered backends failed, keeping the last good set: {e:#}");
            if let Some(t) = self.discovery.get_mut(&group) {
                t.refused(format!("applying: {e:#}"));
            }
            return false;
        }
        if let Some(t) = self.discovery.get_mut(&group) {
            t.commit(set);
        }
        info!(
            %group,
            added = ?diff.add.iter().map(|f| f.address).collect::<Vec<_>>(),
            removed = ?diff.remove,
            reweighted = diff.update.len(),
            "DNS discovery changed the backends"
        );
        if let Err(e) =
            discovery::save_cache(&self.discovery_cache, &discovery::cache_of(&self.discovery))
        {
            warn!("saving the discovered backends: {e:#}");
        }
        matches!(Group::parse(&group), Group::Pool(_))
    }

    /// Every discovery, for its tasks.
    fn discovery_wanted(&self) -> Vec<(String, config::Discovery, discovery::Family)> {
        self.discovery
            .iter()
            .map(|(group, t)| (group.clone(), t.spec().clone(), t.family()))
            .collect()
    }

    /// Whether each L7 pool server should take requests: administratively
    /// ready and not failing its health checks.
    fn pool_server_states(&self) -> Vec<(String, SocketAddr, lb_proxy::ServerUse)> {
        let mut out = Vec::new();
        for p in &self.desired.config.proxy.0.pools {
            let service = Group::pool_name(&p.name);
            for s in &p.servers {
                let admin = self.desired.admin_state(&service, s.address);
                let down = self
                    .health
                    .status(&service, s.address)
                    .is_some_and(|c| c.health == Health::Down);
                // A draining server keeps the clients its persistence cookie names.
                let state = match admin {
                    _ if down => lb_proxy::ServerUse::Off,
                    AdminState::Ready => lb_proxy::ServerUse::Serving,
                    AdminState::Drain => lb_proxy::ServerUse::Draining,
                    AdminState::Maint => lb_proxy::ServerUse::Off,
                };
                out.push((p.name.clone(), s.address, state));
            }
        }
        out
    }

    /// The L7 proxy's frontends and pools with their counters (empty without a proxy).
    fn proxy_info(&self) -> ProxyInfo {
        match &self.proxy_stats {
            Some(s) => ProxyInfo {
                frontends: s.frontends(),
                pools: s.pools(),
            },
            None => ProxyInfo::default(),
        }
    }

    /// The balancer, for metrics (`None`: the proxy runs alone).
    pub fn balancer(&mut self) -> Option<&mut Balancer> {
        self.balancer.as_mut()
    }

    /// The running L7 proxy's figures, for metrics.
    pub fn proxy_stats(&self) -> Option<lb_proxy::ProxyStats> {
        self.proxy_stats.clone()
    }
}

// Health-check targets of L7 pools are named `pool:<name>` (config::Group) so
// their events can be told apart from services' and sent to the proxy.
use crate::config::Group;

/// Puts each tracker's set in force into `desired` (after a replay, which
/// starts from the file alone).
fn merge_discovered(trackers: &BTreeMap<String, Tracker>, desired: &mut runtime::Desired) {
    for (group, t) in trackers {
        match desired.set_discovered(group, t.current()) {
            Ok((_, skipped)) => {
                for (address, why) in skipped {
                    warn!(%group, %address, "discovered backend left out: {why}");
                }
            }
            Err(e) => warn!(%group, "discovered backends left out: {e}"),
        }
    }
}

/// Says what a round changed in a discovery's state: a warning when it
/// starts failing (or fails differently), when the DNS goes empty, and a
/// note when it answers again; repeats go to debug.
fn log_discovery_state(
    group: &str,
    t: &Tracker,
    was: DiscoveryState,
    previous_error: Option<&str>,
) {
    let name = &t.spec().name;
    let kept = t.current().len();
    match t.state() {
        DiscoveryState::Failing => {
            let error = t.last_error().unwrap_or("unknown error");
            if was != DiscoveryState::Failing || previous_error != Some(error) {
                warn!(%group, %name, %error, failures = t.failures(), kept, "DNS discovery failing; keeping the last good backends");
            } else {
                debug!(%group, %name, %error, failures = t.failures(), "DNS discovery still failing");
            }
        }
        DiscoveryState::Holding if was != DiscoveryState::Holding => {
            warn!(%group, %name, kept, hold = ?t.spec().hold, "DNS has no records any more; keeping the last backends until the hold ends");
        }
        DiscoveryState::Ok if matches!(was, DiscoveryState::Failing | DiscoveryState::Pending) => {
            info!(%group, %name, "DNS discovery answers");
        }
        _ => {}
    }
}

fn health_targets(config: &Config) -> Vec<Target> {
    let services = config
        .services
        .iter()
        .filter_map(|s| s.health.as_ref().map(|h| (s, h)))
        .flat_map(|(s, h)| {
            s.backends.iter().map(move |b| Target {
                service: s.name.clone(),
                address: b.address,
                check: h.clone(),
                transport: None,
            })
        });
    let pools = config.proxy.1.iter().flat_map(|(name, check)| {
        let servers = config
            .proxy
            .0
            .pools
            .iter()
            .filter(move |p| &p.name == name)
            .flat_map(|p| {
                let transport = lb_proxy::CheckTransport::of(p);
                p.servers.iter().map(move |s| (s, transport.clone()))
            });
        servers.map(move |(server, transport)| Target {
            service: Group::pool_name(name),
            address: server.address,
            check: check.clone(),
            transport,
        })
    });
    services.chain(pools).collect()
}

/// The agent state shared by its tasks.
#[derive(Clone)]
pub struct Shared(Arc<Mutex<Agent>>);

impl Shared {
    /// Locks the agent state (a poisoned lock is still usable: every change is
    /// validated before it is committed).
    pub fn lock(&self) -> MutexGuard<'_, Agent> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl metrics::Source for Shared {
    fn render(&self) -> Result<String> {
        let mut agent = self.lock();
        // Read once, for the L4 families and the backends' states alike.
        let data = agent.data_plane_figures()?;
        // The proxy alone (no `interfaces`) has no L4 counters.
        let mut text = match (agent.balancer.as_ref(), &data) {
            (Some(balancer), Some((counters, _))) => metrics::snapshot(balancer, counters),
            _ => String::new(),
        };
        text.push_str(&metrics::render_backends(
            &agent.backend_infos(None, data.as_ref()),
        ));
        if let Some(stats) = agent.proxy_stats() {
            text.push_str(&metrics::render_proxy(&stats.frontends(), &stats.pools()));
        }
        if agent.desired.config.syslog.is_some() {
            let mut out = metrics::Exposition::default();
            out.family(
                "lb_access_log_syslog_dropped_total",
                "Access log lines the syslog socket could not take at once, dropped",
                metrics::Kind::Counter,
                vec![(String::new(), crate::syslog::dropped())],
            );
            text.push_str(&out.into_text());
        }
        Ok(text)
    }
}

impl Handler for Shared {
    fn handle(&self, request: Request) -> Response {
        if request == Request::ShowBgp {
            // BIRD is asked without holding the agent's lock: it may be slow.
            let mut info = self.lock().bgp_info();
            if let Some(socket) = info.bird_socket.clone() {
                match bgp::bird::show_protocols(Path::new(&socket)) {
                    Ok(protocols) => info.protocols = protocols,
                    Err(e) => info.bird_error = Some(e.to_string()),
                }
            }
            return Response::Bgp(info);
        }
        if request == Request::Reload {
            return self.reload();
        }
        self.answer(request)
    }
}

impl Shared {
    /// Re-reads the configuration file, then applies it: the files it
    /// names are read before the lock is taken, so a slow or stuck file
    /// stops no other use of the agent (metrics, the control socket).
    pub fn reload(&self) -> Response {
        let file = self.read_config();
        self.answer_with(|agent| agent.reload(file))
    }

    /// The configuration file, read and checked without the lock.
    fn read_config(&self) -> Result<Config> {
        let path = self.lock().config_path.clone();
        load_config(&path)
    }

    /// Carries out `request` and waits for the L7 proxy to take it.
    fn answer(&self, request: Request) -> Response {
        self.answer_with(|agent| agent.handle(request))
    }

    /// Runs `act` under the lock, then waits (without it) for the L7 proxy.
    fn answer_with(&self, act: impl FnOnce(&mut Agent) -> Response) -> Response {
        let (response, applying) = {
            let mut agent = self.lock();
            // One a SIGHUP left is no business of this request.
            agent.applying = None;
            let response = act(&mut agent);
            (response, agent.applying.take())
        };
        // Waited for without the lock: the main loop takes it to apply.
        match (response, applying) {
            (Response::Ok, Some(applying)) => match applying.recv_timeout(PROXY_APPLY_WAIT) {
                Ok(Err(e)) => Response::Error(e),
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Response::Error(format!(
                    "applied to the data plane, but the L7 proxy has not taken it within {}s (see the log)",
                    PROXY_APPLY_WAIT.as_secs()
                )),
                // Done, or the agent is stopping.
                Ok(Ok(())) | Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => Response::Ok,
            },
            (response, _) => response,
        }
    }
}

/// Starts the L7 proxy on its serving threads if the configuration has
/// frontends, taking over the listening sockets of `previous` (a reload).
/// It blocks until the threads serve: milliseconds, at start and reload only.
async fn start_proxy(
    section: &config::ProxySection,
    previous: Option<&lb_proxy::Proxy>,
) -> Result<Option<lb_proxy::Proxy>> {
    if section.0.frontends.is_empty() {
        return Ok(None);
    }
    let router = lb_proxy::routing::router(&section.0)?;
    let started =
        lb_proxy::Proxy::start_threads(section.0.clone(), Some(router), &section.3, previous)?;
    info!(
        listening = ?started.local_addrs(),
        threads = section.3.count,
        "L7 proxy running"
    );
    Ok(Some(started))
}

/// The discoveries of `desired`, each after one round of queries (or, if
/// that failed, holding the set cached by the previous agent).
async fn first_discovery(
    desired: &runtime::Desired,
    cache_path: &Path,
) -> BTreeMap<String, Tracker> {
    let mut trackers = discovery::reconcile(&BTreeMap::new(), &desired.config);
    if trackers.is_empty() {
        return trackers;
    }
    let cache = discovery::load_cache(cache_path).unwrap_or_else(|e| {
        warn!("ignoring the discovery cache: {e:#}");
        discovery::Cache::new()
    });
    for (group, t) in &mut trackers {
        if let Some(set) = discovery::cached_set(&cache, group, t.spec()) {
            t.seed(set);
        }
    }
    let wanted = trackers
        .iter()
        .map(|(g, t)| (g.clone(), t.spec().clone(), t.family()))
        .collect();
    let now = Instant::now();
    for (group, answer) in dns::first_round(wanted).await {
        let Some(t) = trackers.get_mut(&group) else {
            continue;
        };
        let was = t.state();
        if let Verdict::Apply(set) = t.observe(answer, now) {
            // The first sync puts it in force.
            t.commit(set);
        }
        log_discovery_state(&group, t, was, None);
        info!(%group, name = %t.spec().name, backends = t.current().len(), state = ?t.state(), "DNS discovery at start");
    }
    trackers
}

/// Loads the XDP program and its maps, reusing what a previous agent left
/// pinned (flows, tables and counters survive a restart); the guard undoes
/// what this start pins if it fails before running, the lock keeps a second
/// agent off these pins.
fn load_data_plane(
    opts: &RunOptions,
    config: &Config,
) -> Result<(Balancer, pin::StartGuard, pin::DirLock)> {
    let object = match &opts.bpf_object {
        Some(p) => p.clone(),
        None => dataplane::default_object_path()?,
    };
    let mut start = pin::StartGuard::new(&opts.pin_dir)?;
    let lock = crate::takeover::when_free(opts.takeover, || pin::lock(&opts.pin_dir))?;
    for map in lb_common::ALL_MAPS {
        start.will_create(&opts.pin_dir.join(map));
    }
    // Maps agents before 2026-12 pinned that this one does not use: a
    // program still using one holds its own reference, so the pin only
    // kept its memory.
    for retired in lb_common::RETIRED_MAPS {
        let _ = std::fs::remove_file(opts.pin_dir.join(retired));
    }
    let dataplane = Dataplane::load_pinned(&object, &opts.pin_dir)?;
    let pinned = dataplane.pinned_state()?;
    let mut balancer = Balancer::new(dataplane);
    if !pinned.is_empty() {
        balancer.adopt(&pinned, config);
        info!(pin_dir = %opts.pin_dir.display(), services = pinned.vips.len(), backends = pinned.backends.len(), "adopted the state a previous agent left pinned");
    }
    Ok((balancer, start, lock))
}

/// Attaches the program to every interface of `config`, each interface's
/// own MAC recorded first (so it is known before a packet can arrive there).
fn attach(
    dataplane: &mut Dataplane,
    start: &mut pin::StartGuard,
    config: &Config,
    pin_dir: &Path,
) -> Result<()> {
    for iface in &config.interfaces {
        let (ifindex, mac) = dataplane::interface_mac(iface)?;
        dataplane
            .set_interface_mac(ifindex, mac)
            .with_context(|| format!("interface {iface}"))?;
    }
    for iface in &config.interfaces {
        let link = pin::link_path(pin_dir, iface);
        start.will_create(&link);
        match dataplane.attach_pinned(iface, config.xdp_mode, &link)? {
            Some(mode) => info!(%iface, ?mode, "XDP program attached"),
            None => info!(%iface, "took over the pinned attachment: program replaced in place"),
        }
    }
    Ok(())
}

/// Why L4 requests fail on an agent without `interfaces`.
const NO_DATA_PLANE: &str = "no data plane: this agent runs the L7 proxy alone (its file has no `interfaces`); add interfaces and restart for [[service]] tables";

/// What `start` built: the agent's state, its data plane attached, ready to serve.
struct Started {
    shared: Shared,
    /// The configuration it started with.
    config: Config,
    /// No `interfaces`: nothing loaded or pinned.
    proxy_only: bool,
    /// Undoes what this start pinned unless committed.
    start: Option<pin::StartGuard>,
    /// Keeps a second agent off these pins while this one runs.
    _lock: Option<pin::DirLock>,
    events: mpsc::UnboundedReceiver<HealthEvent>,
    stop: mpsc::UnboundedReceiver<Ending>,
    reloaded: mpsc::UnboundedReceiver<Option<ProxyApplied>>,
}

/// Reads the file and the journal, resolves the discoveries, loads and fills
/// the data plane (unless the proxy runs alone) and attaches it.
async fn start(opts: &RunOptions) -> Result<Started> {
    let file = load_config_for_start(&opts.config)?;
    crate::fd_limit::raise_for(&file);
    let journal_path = runtime::journal_path(&opts.config);
    let journal = runtime::load_journal(&journal_path)?;
    let (mut desired, journal) = runtime::replay(file, &journal);
    // Discovered backends are resolved before the data plane is filled, so
    // a (hitless) restart does not drop them; if the DNS fails now, the last
    // set in force (kept beside the config) stands in.
    let discovery_cache = discovery::cache_path(&opts.config);
    let trackers = first_discovery(&desired, &discovery_cache).await;
    let without_discovered = desired.clone();
    merge_discovered(&trackers, &mut desired);
    // Without interfaces the proxy runs alone: nothing is loaded or pinned.
    let proxy_only = desired.config.interfaces.is_empty();
    let (balancer, mut start, lock) = if proxy_only {
        info!("no `interfaces`: the L7 proxy runs alone, no XDP program is loaded");
        (None, None, None)
    } else {
        let (balancer, start, lock) = load_data_plane(opts, &desired.config)?;
        (Some(balancer), Some(start), Some(lock))
    };
    // After the pin lock, which names a second agent on the same pins.
    let mut claims = crate::claims::Claims::default();
    let listeners = desired.config.listeners();
    crate::takeover::when_free(opts.takeover, || claims.hold(&listeners))?;
    let (events_tx, events) = mpsc::unbounded_channel();
    let (stop_tx, stop) = mpsc::unbounded_channel();
    let (reloaded_tx, reloaded) = mpsc::unbounded_channel();
    let mut agent = Agent {
        config_path: opts.config.clone(),
        journal_path,
        journal,
        desired,
        balancer,
        health: HealthChecker::new(events_tx),
        stop: stop_tx,
        reloaded: reloaded_tx,
        applying: None,
        proxy_stats: None,
        bgp: bgp::Speaker::new(),
        discovery: trackers,
        discovery_cache,
        claims,
        admin_auth: None,
    };
    // Tables are complete before the first packet can reach the program.
    agent.first_sync(without_discovered)?;
    let config = agent.desired.config.clone();
    if let (Some(balancer), Some(start)) = (agent.balancer.as_mut(), start.as_mut()) {
        attach(balancer.dataplane(), start, &config, &opts.pin_dir)?;
    }
    Ok(Started {
        shared: Shared(Arc::new(Mutex::new(agent))),
        config,
        proxy_only,
        start,
        _lock: lock,
        events,
        stop,
        reloaded,
    })
}

/// The running L7 proxy and the frontends and pools it runs.
struct L7 {
    proxy: Option<lb_proxy::Proxy>,
    config: config::ProxySection,
}

impl L7 {
    /// Starts the proxy of `config` (none without frontends).
    async fn start(config: config::ProxySection, shared: &Shared) -> Result<L7> {
        let proxy = start_proxy(&config, None).await?;
        shared.lock().proxy_stats = proxy.as_ref().map(lb_proxy::Proxy::stats);
        Ok(L7 { proxy, config })
    }

    /// `lb run --takeover`, before the rest starts: checks that an agent
    /// runs on the socket, starts the file's proxy beside its proxy, then
    /// has it stop softly (`takeover`).
    async fn take_over(opts: &RunOptions) -> Result<L7> {
        let socket = opts.socket.clone();
        tokio::task::spawn_blocking(move || crate::takeover::running_agent(&socket)).await??;
        let file = load_config_for_start(&opts.config)?;
        crate::fd_limit::raise_for(&file);
        // What could refuse once the running agent is told to stop, first.
        if !file.interfaces.is_empty() && opts.pin_dir.exists() {
            let object = match &opts.bpf_object {
                Some(p) => p.clone(),
                None => dataplane::default_object_path()?,
            };
            Dataplane::check_pins(&object, &opts.pin_dir)?;
        }
        crate::takeover::migrate_queued_connections();
        let proxy = start_proxy(&file.proxy, None).await?;
        let socket = opts.socket.clone();
        tokio::task::spawn_blocking(move || crate::takeover::stop_running(&socket)).await??;
        Ok(L7 {
            proxy,
            config: file.proxy,
        })
    }

    /// The proxy `take_over` started, brought to what the agent starts
    /// with (the journal's and DNS's pool servers, made in place).
    async fn adopted(mut self, shared: &Shared) -> L7 {
        shared.lock().proxy_stats = self.proxy.as_ref().map(lb_proxy::Proxy::stats);
        if let Err(e) = self.reload(shared).await {
            error!("taking over: {e}");
        }
        self
    }

    /// After a reload or change: a change of pool servers alone (the CLI,
    /// the REST API, DNS) is made in place; other changes of frontends and
    /// pools restart the proxy beside the old one (SO_REUSEPORT: no
    /// connection is refused; requests in flight finish on the old one);
    /// otherwise the files are re-read. A proxy that fails to start leaves
    /// the old; the error says so.
    async fn reload(&mut self, shared: &Shared) -> Result<(), String> {
        let next = shared.lock().desired.config.proxy.clone();
        let in_place = next != self.config
            && next.3 == self.config.3
            && self
                .proxy
                .as_mut()
                .is_some_and(|p| p.update_servers(&next.0));
        if in_place {
            // The files are read again below, as for any reload.
            self.config = next.clone();
            info!("L7 pool servers changed in place");
        }
        let mut outcome = Ok(());
        if next != self.config {
            match start_proxy(&next, self.proxy.as_ref()).await {
                Ok(p) => {
                    let old = std::mem::replace(&mut self.proxy, p);
                    shared.lock().proxy_stats = self.proxy.as_ref().map(lb_proxy::Proxy::stats);
                    drop(old);
                    self.config = next;
                    info!("L7 proxy restarted with the new frontends and pools");
                }
                Err(e) => {
                    error!("the new L7 configuration failed to start, keeping the old one: {e:#}");
                    outcome = Err(format!(
                        "the L7 proxy could not start the new frontends and pools and serves the previous ones: {e:#}"
                    ));
                }
            }
        } else if let Some(p) = &self.proxy
            && let Err(e) = p.reload_files()
        {
            error!(
                "reloading the proxy's files (certificates, CRLs, error pages) failed, keeping the ones in use: {e:#}"
            );
            outcome = Err(format!(
                "the L7 proxy could not re-read its files and keeps the ones in use: {e:#}"
            ));
        }
        self.push_server_states(shared);
        outcome
    }

    /// A pool server's checks marked it down: its sessions are shut down if
    /// the pool says so (`on_marked_down`).
    fn marked_down(&self, pool: &str, server: SocketAddr) {
        if let Some(p) = &self.proxy
            && p.server_marked_down(pool, server)
        {
            info!(%pool, %server, "server marked down: its tcp sessions and tunnels are shut down");
        }
    }

    /// Tells the proxy which pool servers take requests (admin state, health).
    fn push_server_states(&self, shared: &Shared) {
        if let Some(p) = &self.proxy {
            for (pool, server, state) in shared.lock().pool_server_states() {
                p.set_server_use(&pool, server, state);
            }
        }
    }
}

/// The HTTP endpoints, bound before anything is spawned (a taken port fails the start).
struct HttpListeners {
    metrics: Option<TcpListener>,
    admin: Option<(TcpListener, Arc<admin::AuthSlot>)>,
}

impl HttpListeners {
    fn bind(config: &Config) -> Result<Self> {
        let metrics = match config.metrics {
            Some(addr) => Some(Self::listen(addr, "the metrics endpoint")?),
            None => None,
        };
        let admin = match &config.admin {
            Some(a) => {
                let (users, token) = admin_credentials(a, config);
                Some((
                    Self::listen(a.bind, "the admin listener")?,
                    Arc::new(admin::AuthSlot::new(admin::Auth::new(users, token)?)),
                ))
            }
            None => None,
        };
        Ok(HttpListeners { metrics, admin })
    }

    /// Binds `addr` as the proxy binds its frontends (SO_REUSEPORT), so that
    /// `lb check` and reloads can test it while this agent holds it.
    fn listen(addr: SocketAddr, what: &str) -> Result<TcpListener> {
        lb_proxy::shared_listener(addr)
            .and_then(TcpListener::from_std)
            .with_context(|| format!("binding {what} {addr}"))
    }

    /// Serves metrics and the admin listener, each in a task of its own.
    fn spawn(self, shared: &Shared) -> Vec<tokio::task::JoinHandle<Result<()>>> {
        let mut tasks = Vec::new();
        if let Some(listener) = self.metrics {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "serving metrics");
            }
            let source = Arc::new(shared.clone()) as Arc<dyn metrics::Source>;
            tasks.push(tokio::spawn(metrics::serve(listener, source)));
        }
        if let Some((listener, auth)) = self.admin {
            if let Ok(addr) = listener.local_addr() {
                info!(%addr, "serving the admin API and stats page");
            }
            shared.lock().admin_auth = Some(Arc::clone(&auth));
            let handler = Arc::new(shared.clone()) as Arc<dyn Handler>;
            let admin = Arc::new(admin::Admin::new(handler, auth));
            tasks.push(tokio::spawn(admin::serve(listener, admin)));
        }
        tasks
    }
}

/// Who may use the admin listener: the users of its userlist (name to
/// hash), its token (read when the file was loaded).
fn admin_credentials(
    admin: &config::AdminConfig,
    config: &Config,
) -> (HashMap<String, String>, Option<String>) {
    let users = admin
        .userlist
        .as_ref()
        .and_then(|name| config.proxy.0.userlists.iter().find(|l| &l.name == name))
        .map(|l| {
            l.users
                .iter()
                .map(|u| (u.name.clone(), u.password.clone()))
                .collect()
        })
        .unwrap_or_default();
    let token = admin.token.as_ref().map(|t| t.expose().to_string());
    (users, token)
}

/// Sends the access log to `syslog` (None: standard output); a socket that
/// cannot be opened leaves it where it was, with a warning.
fn point_access_log(syslog: Option<&crate::config::SyslogConfig>) {
    match crate::syslog::configure(syslog) {
        Ok(()) if syslog.is_some() => {
            info!(target = ?syslog.map(|s| &s.target), "access log to syslog")
        }
        Ok(()) => {}
        Err(e) => warn!("access log to syslog: {e}; it stays where it was"),
    }
}

/// Runs the agent until SIGINT or SIGTERM.
pub async fn run(opts: RunOptions) -> Result<()> {
    let early = match opts.takeover {
        true => Some(L7::take_over(&opts).await?),
        false => None,
    };
    let Started {
        shared,
        config,
        proxy_only,
        start,
        _lock: lock,
        events,
        stop,
        reloaded,
    } = start(&opts).await?;
    point_access_log(config.syslog.as_ref());
    // Announced only now that the program is attached and the tables are full.
    let speaker = shared.lock().bgp.clone();
    // The L7 proxy serves what XDP passes up (l7 VIPs and everything else).
    let mut l7 = match early {
        Some(l7) => l7.adopted(&shared).await,
        None => L7::start(config.proxy.clone(), &shared).await?,
    };
    // The last steps that can fail come before anything is spawned, so a
    // failure leaves no task (nor control socket) behind either.
    let http = HttpListeners::bind(&config)?;
    let (discovered_tx, discovered) = mpsc::unbounded_channel();
    let mut inputs = Inputs {
        sigint: signal(SignalKind::interrupt())?,
        sigterm: signal(SignalKind::terminate())?,
        sighup: signal(SignalKind::hangup())?,
        sigusr1: signal(SignalKind::user_defined1())?,
        events,
        stop,
        reloaded,
        discovered,
    };
    let control_listener = server::bind(&opts.socket)?;
    info!("control socket listening on {}", opts.socket.display());
    if let Some(start) = start {
        start.commit();
    }
    let mut control = tokio::spawn(server::serve_listener(
        control_listener,
        Arc::new(shared.clone()) as Arc<dyn Handler>,
    ));
    let mut discovery_tasks = dns::Tasks::new(discovered_tx);
    discovery_tasks.reconcile(shared.lock().discovery_wanted(), |d| {
        discovery::first_delay(d, true)
    });
    let http_tasks = http.spawn(&shared);
    let speaker_task = tokio::spawn(speaker.clone().run());
    info!(services = config.services.len(), socket = %opts.socket.display(), "load balancer running");

    let served = serve(
        &shared,
        &mut l7,
        &mut discovery_tasks,
        &mut control,
        &mut inputs,
    )
    .await;
    control.abort();
    speaker_task.abort();
    let ending = served?;
    let detach = ending == Ending::Stop { detach: true };
    withdraw_if_detached(&speaker, detach).await;
    drop(discovery_tasks);
    // A soft stop closes the listeners now and lets the connections end below.
    let drained = l7.proxy.take().filter(|_| ending == Ending::Soft);
    let drained = drained.map(|p| (p.stop_softly(), l7.config.3.hard_stop_after));
    drop(l7);
    server::remove_socket(&opts.socket);
    for task in http_tasks {
        task.abort();
    }
    // Let aborted tasks drop their handles on the shared state.
    tokio::task::yield_now().await;
    // The addresses it listened on and its pins are free from here, for a
    // new agent while a soft stop drains: released by name, not left to
    // whichever task drops the shared state last.
    shared.lock().claims = crate::claims::Claims::default();
    drop(shared);
    drop(lock);
    finish(&opts, proxy_only, detach)?;
    if let Some((drained, hard_stop_after)) = drained {
        wait_drained(&drained, hard_stop_after).await;
    }
    Ok(())
}

/// How the agent was told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// At once (SIGINT, SIGTERM, `lb stop`); `detach`: `lb stop --detach`.
    Stop {
        /// Detach the XDP program and remove its pins.
        detach: bool,
    },
    /// Softly (SIGUSR1, `lb stop --soft`): the L7 connections end first.
    Soft,
}

/// Waits, after a soft stop, until the L7 proxy's serving threads have
/// ended (their connections closed, at the latest at `hard_stop_after`),
/// with a margin for the threads' own last waits.
async fn wait_drained(drained: &lb_proxy::Drained, hard_stop_after: Duration) {
    info!(
        ?hard_stop_after,
        "soft stop: the L7 proxy's listeners are closed; waiting for its connections to end"
    );
    let until = Instant::now() + hard_stop_after + Duration::from_secs(90);
    while !drained.done() && Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    info!("soft stop: done");
}

/// What the running agent waits on: signals, `lb stop`, health events,
/// reloads and changes, DNS answers.
struct Inputs {
    sigint: tokio::signal::unix::Signal,
    sigterm: tokio::signal::unix::Signal,
    sighup: tokio::signal::unix::Signal,
    sigusr1: tokio::signal::unix::Signal,
    events: mpsc::UnboundedReceiver<HealthEvent>,
    stop: mpsc::UnboundedReceiver<Ending>,
    reloaded: mpsc::UnboundedReceiver<Option<ProxyApplied>>,
    discovered: mpsc::UnboundedReceiver<dns::Event>,
}

/// Handles the agent's inputs until it is told to stop; how. An error:
/// the control socket failed.
async fn serve(
    shared: &Shared,
    l7: &mut L7,
    discovery_tasks: &mut dns::Tasks,
    control: &mut tokio::task::JoinHandle<Result<()>>,
    inputs: &mut Inputs,
) -> Result<Ending> {
    loop {
        tokio::select! {
            _ = inputs.sigint.recv() => return Ok(Ending::Stop { detach: false }),
            _ = inputs.sigterm.recv() => return Ok(Ending::Stop { detach: false }),
            _ = inputs.sigusr1.recv() => return Ok(Ending::Soft),
            Some(ending) = inputs.stop.recv() => {
                // The request came over the control socket: let its answer
                // be written before the server task is stopped.
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                return Ok(ending);
            }
            Some(event) = inputs.discovered.recv() => {
                let s = shared.clone();
                let pools_changed = tokio::task::spawn_blocking(move || s.lock().on_discovery(event))
                    .await
                    .unwrap_or(false);
                if pools_changed {
                    // The proxy takes the new servers as after a reload.
                    let _ = shared.lock().reloaded.send(None);
                }
            }
            Some(done) = inputs.reloaded.recv() => {
                // Discoveries added, changed or removed by the reload or change.
                discovery_tasks.reconcile(shared.lock().discovery_wanted(), |d| {
                    discovery::first_delay(d, false)
                });
                let outcome = l7.reload(shared).await;
                if let Some(done) = done {
                    let _ = done.try_send(outcome);
                }
            }
            _ = inputs.sighup.recv() => {
                let s = shared.clone();
                // Not `Shared::reload`: that waits for this loop to apply it.
                let _ = tokio::task::spawn_blocking(move || {
                    let file = s.read_config();
                    s.lock().reload(file)
                })
                .await;
            }
            Some(event) = inputs.events.recv() => {
                if let Group::Pool(pool) = Group::parse(&event.service) {
                    info!(%pool, server = %event.address, health = ?event.health, reason = %event.reason, "L7 server health changed");
                    l7.push_server_states(shared);
                    if event.health == Health::Down {
                        l7.marked_down(pool, event.address);
                    }
                    continue;
                }
                let s = shared.clone();
                let _ = tokio::task::spawn_blocking(move || s.lock().on_health(&event)).await;
            }
            result = &mut *control => {
                let e = match result {
                    Ok(Ok(())) => anyhow!("control socket closed"),
                    Ok(Err(e)) => e,
                    Err(e) => e.into(),
                };
                return Err(e.context("control socket"));
            }
        }
    }
}

/// A plain stop leaves the routes announced: the program keeps forwarding
/// and the next agent announces the same. `--detach` withdraws them first.
async fn withdraw_if_detached(speaker: &bgp::Speaker, detach: bool) {
    let Some(cfg) = speaker.wanted().config.filter(|_| detach) else {
        return;
    };
    match tokio::task::spawn_blocking(move || bgp::apply(&cfg, &[])).await {
        Ok(Ok(())) => info!("withdrew every VIP from BGP"),
        Ok(Err(e)) => error!("withdrawing the VIPs from BGP failed: {e}"),
        Err(e) => error!("withdrawing the VIPs from BGP failed: {e}"),
    }
}

/// The last step of a stop: with `detach`, the pins (and so the program)
/// go; otherwise the program keeps forwarding for the next agent.
fn finish(opts: &RunOptions, proxy_only: bool, detach: bool) -> Result<()> {
    if proxy_only {
        info!("stopped");
    } else if detach {
        // The last references to the links and maps go with their pins.
        pin::remove_all(&opts.pin_dir)?;
        info!("XDP program detached and pinned state removed; bye");
    } else {
        info!(
            pin_dir = %opts.pin_dir.display(),
            "stopped; the XDP program keeps forwarding with the last tables (the next `lb run` adopts them; `lb stop --detach` removes them)"
        );
    }
    Ok(())
}
