//! Runtime changes pushed by the operator: applied on top of the configuration
//! file, and kept in a journal next to it so a restart or a reload does not
//! lose them (HAProxy's runtime API forgets them on reload).
//!
//! The effective state is always "file, then journal replayed in order": a
//! reload re-reads the file and replays the journal on top; a change that no
//! longer applies (its service is gone from the file) is skipped with a warning.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lb_common::DEFAULT_RING_SIZE;
use tracing::warn;

use crate::config::{
    BackendConfig, Config, FlowHash, Forwarding, Group, Mode, Protocol, Service, rules,
};
use crate::control::protocol::{AdminState, Request};
use crate::discovery::{self, Found};

/// The state the data plane should be in, before health is taken into account.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// Services and backends: the file's, with runtime changes applied.
    pub config: Config,
    /// Administrative state of backends that are not `Ready`.
    pub admin: BTreeMap<(String, SocketAddr), AdminState>,
    /// The node is drained: no VIP is announced (`lb drain-node`).
    pub drained: bool,
    /// The addresses in `config` that DNS discovery put there, per group:
    /// derived state, never journaled (a start or reload resolves again).
    pub discovered: BTreeMap<String, BTreeSet<SocketAddr>>,
}

impl Desired {
    /// The state described by a configuration file alone.
    pub fn from_config(config: Config) -> Self {
        Self {
            config,
            admin: BTreeMap::new(),
            drained: false,
            discovered: BTreeMap::new(),
        }
    }

    /// Whether `address` of `group` came from DNS discovery.
    pub fn is_discovered(&self, group: &str, address: SocketAddr) -> bool {
        self.discovered
            .get(group)
            .is_some_and(|set| set.contains(&address))
    }

    /// Whether `group` (a service or `pool:NAME`) has a DNS discovery.
    pub fn has_discovery(&self, group: &str) -> bool {
        match Group::parse(group) {
            Group::Service(name) => self
                .config
                .services
                .iter()
                .any(|s| s.name == name && s.discovery.is_some()),
            Group::Pool(pool) => self.config.proxy.2.iter().any(|(p, _)| p == pool),
        }
    }

    /// Refuses a change to a backend DNS discovery manages (its presence
    /// and weight come from the records).
    fn refuse_discovered(
        &self,
        group: &str,
        address: SocketAddr,
        what: &str,
    ) -> Result<(), String> {
        if self.is_discovered(group, address) {
            return Err(format!(
                "{address} of {group:?} comes from DNS discovery: its {what} follows the DNS records (`lb disable` takes it out of service)"
            ));
        }
        Ok(())
    }

    /// Makes the discovered backends of `group` exactly `wanted`; static
    /// backends stay as they are (an address that is both stays static).
    /// Addresses a service cannot take (another family, a DSR service's
    /// other port, the balancer itself) are left out and listed in the
    /// second result.
    pub fn set_discovered(
        &mut self,
        group: &str,
        wanted: &[Found],
    ) -> Result<(discovery::Diff, Vec<(SocketAddr, String)>), String> {
        let discovered = self.discovered.get(group).cloned().unwrap_or_default();
        let mut skipped = Vec::new();
        let d = match Group::parse(group) {
            Group::Service(name) => {
                self.discover_backends(name, &discovered, wanted, &mut skipped)?
            }
            Group::Pool(pool) => self.discover_servers(pool, &discovered, wanted, &mut skipped)?,
        };
        let set = self.discovered.entry(group.to_string()).or_default();
        for a in &d.remove {
            set.remove(a);
        }
        set.extend(d.add.iter().map(|f| f.address));
        // Admin states of discovered addresses stay: a backend disabled
        // while the DNS briefly forgot it comes back disabled.
        Ok((d, skipped))
    }

    /// Discovered backends of service `name`: the addresses it can take
    /// (others go to `skipped` with the reason), within the ring and the
    /// data plane's slots; what changed.
    fn discover_backends(
        &mut self,
        name: &str,
        discovered: &BTreeSet<SocketAddr>,
        wanted: &[Found],
        skipped: &mut Vec<(SocketAddr, String)>,
    ) -> Result<discovery::Diff, String> {
        let services = &self.config.services;
        let s = self.service(name)?;
        let mut usable = Vec::new();
        let local = crate::config::local_addresses();
        for f in wanted {
            let usable_here = discovered_endpoint(f.address)
                .and_then(|()| rules::backend_for_vip(s.vip, s.forwarding, f.address))
                .and_then(|()| rules::backend_not_a_vip(f.address, s.protocol, services))
                .and_then(|()| rules::backend_not_local(f.address, &local));
            match usable_here {
                Err(why) => skipped.push((f.address, why)),
                Ok(()) => usable.push(*f),
            }
        }
        none_usable(wanted, &usable, skipped)?;
        let present: Vec<Found> = s
            .backends
            .iter()
            .map(|b| Found {
                address: b.address,
                weight: b.weight,
                backup: false,
            })
            .collect();
        let d = discovery::diff(&present, discovered, &usable);
        // The weights the service would have, checked before anything changes.
        let weights = s
            .backends
            .iter()
            .filter(|b| !d.remove.contains(&b.address))
            .map(|b| {
                d.update
                    .iter()
                    .find(|u| u.address == b.address)
                    .map_or(b.weight, |u| u.weight)
            })
            .chain(d.add.iter().map(|f| f.weight));
        rules::ring_capacity(name, rules::active(weights), s.ring_size)?;
        let others = self.backend_total() - self.service(name)?.backends.len();
        rules::backend_count(others + present.len() + d.add.len() - d.remove.len())?;
        let s = self.service_mut(name)?;
        s.backends.retain(|b| !d.remove.contains(&b.address));
        for u in &d.update {
            if let Some(b) = s.backends.iter_mut().find(|b| b.address == u.address) {
                b.weight = u.weight;
            }
        }
        s.backends.extend(d.add.iter().map(|f| BackendConfig {
            address: f.address,
            weight: f.weight,
            line: 0,
        }));
        Ok(d)
    }

    /// Discovered servers of L7 pool `pool`, backups included (those it
    /// cannot take go to `skipped` with the reason); what changed.
    fn discover_servers(
        &mut self,
        pool: &str,
        discovered: &BTreeSet<SocketAddr>,
        wanted: &[Found],
        skipped: &mut Vec<(SocketAddr, String)>,
    ) -> Result<discovery::Diff, String> {
        let own = self.own_listeners();
        let lb_proxy::ProxyConfig {
            pools, frontends, ..
        } = &mut self.config.proxy.0;
        let mut usable = Vec::new();
        let local = crate::config::local_addresses();
        for f in wanted {
            let usable_here = discovered_endpoint(f.address)
                .and_then(|()| rules::server_not_a_listener(f.address, frontends, &local))
                .and_then(|()| rules::not_own_listener(f.address, &own, &local));
            match usable_here {
                Err(why) => skipped.push((f.address, why)),
                Ok(()) => usable.push(*f),
            }
        }
        none_usable(wanted, &usable, skipped)?;
        rules::pool_servers(pool, usable.len())?;
        let wanted = &usable[..];
        let p = pools
            .iter_mut()
            .find(|p| p.name == pool)
            .ok_or_else(|| format!("unknown pool {pool:?}"))?;
        let present: Vec<Found> = p
            .servers
            .iter()
            .map(|s| Found {
                address: s.address,
                weight: s.weight,
                backup: s.backup,
            })
            .collect();
        let d = discovery::diff(&present, discovered, wanted);
        p.servers.retain(|s| !d.remove.contains(&s.address));
        for u in &d.update {
            if let Some(s) = p.servers.iter_mut().find(|s| s.address == u.address) {
                s.weight = u.weight;
                s.backup = u.backup;
            }
        }
        p.servers.extend(d.add.iter().map(|f| {
            let mut server = lb_proxy::ServerSpec::new(f.address);
            server.weight = f.weight;
            server.backup = f.backup;
            server
        }));
        Ok(d)
    }

    /// The agent's own listeners (metrics, admin): no pool server may be one
    /// (a loop, or `/metrics` and the admin API served through a frontend).
    fn own_listeners(&self) -> Vec<SocketAddr> {
        let admin = self.config.admin.as_ref().map(|a| a.bind);
        self.config.metrics.into_iter().chain(admin).collect()
    }

    /// Administrative state of a backend.
    pub fn admin_state(&self, service: &str, address: SocketAddr) -> AdminState {
        self.admin
            .get(&(service.to_string(), address))
            .copied()
            .unwrap_or_default()
    }

    fn service(&self, name: &str) -> Result<&Service, String> {
        self.config
            .services
            .iter()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("unknown service {name:?}"))
    }

    /// Backends summed over services: the data plane's slots in use.
    fn backend_total(&self) -> usize {
        self.config.services.iter().map(|s| s.backends.len()).sum()
    }

    fn service_mut(&mut self, name: &str) -> Result<&mut Service, String> {
        self.config
            .services
            .iter_mut()
            .find(|s| s.name == name)
            .ok_or_else(|| format!("unknown service {name:?}"))
    }

    fn backend_mut(
        &mut self,
        service: &str,
        address: SocketAddr,
    ) -> Result<&mut BackendConfig, String> {
        self.service_mut(service)?
            .backends
            .iter_mut()
            .find(|b| b.address == address)
            .ok_or_else(|| format!("service {service:?} has no backend {address}"))
    }

    /// Applies a backend change to an L7 pool, named `pool:NAME`.
    fn apply_pool(&mut self, pool: &str, request: &Request) -> Result<(), String> {
        let group = Group::pool_name(pool);
        let discovered = self.discovered.get(&group).cloned().unwrap_or_default();
        let refused = |address: &SocketAddr, what: &str| {
            format!(
                "{address} of {group:?} comes from DNS discovery: its {what} follows the DNS records (`lb disable` takes it out of service)"
            )
        };
        let own = self.own_listeners();
        let lb_proxy::ProxyConfig {
            pools, frontends, ..
        } = &mut self.config.proxy.0;
        let p = pools
            .iter_mut()
            .find(|p| p.name == pool)
            .ok_or_else(|| format!("unknown pool {pool:?}"))?;
        let has = |p: &lb_proxy::Pool, a: SocketAddr| p.servers.iter().any(|s| s.address == a);
        match request {
            Request::AddBackend {
                address, weight, ..
            } => {
                check_address(*address, "server")?;
                rules::weight(i64::from(*weight))?;
                let local = crate::config::local_addresses();
                rules::server_not_a_listener(*address, frontends, &local)?;
                rules::not_own_listener(*address, &own, &local)?;
                if has(p, *address) {
                    return Err(format!("pool {pool:?} already has server {address}"));
                }
                rules::pool_servers(pool, p.servers.len() + 1)?;
                let mut server = lb_proxy::ServerSpec::new(*address);
                server.weight = *weight;
                p.servers.push(server);
            }
            Request::RemoveBackend { address, .. } => {
                if !has(p, *address) {
                    return Err(format!("pool {pool:?} has no server {address}"));
                }
                if discovered.contains(address) {
                    return Err(refused(address, "presence"));
                }
                p.servers.retain(|s| s.address != *address);
                self.admin.remove(&(Group::pool_name(pool), *address));
            }
            Request::SetWeight {
                address, weight, ..
            } => {
                rules::weight(i64::from(*weight))?;
                if discovered.contains(address) {
                    return Err(refused(address, "weight"));
                }
                let s = p
                    .servers
                    .iter_mut()
                    .find(|s| s.address == *address)
                    .ok_or_else(|| format!("pool {pool:?} has no server {address}"))?;
                s.weight = *weight;
            }
            Request::SetBackendState { address, state, .. } => {
                if !has(p, *address) {
                    return Err(format!("pool {pool:?} has no server {address}"));
                }
                self.set_admin((Group::pool_name(pool), *address), *state);
            }
            _ => return Err("L7 pools are added and removed in the configuration file".into()),
        }
        Ok(())
    }

    /// Applies one change; on error nothing is changed. Read-only requests are no-ops.
    pub fn apply(&mut self, request: &Request) -> Result<(), String> {
        let target = match request {
            Request::AddBackend { service, .. }
            | Request::RemoveBackend { service, .. }
            | Request::SetBackendState { service, .. }
            | Request::SetWeight { service, .. } => Some(service),
            Request::RemoveService { name } => Some(name),
            _ => None,
        };
        if let Some(Group::Pool(pool)) = target.map(|s| Group::parse(s)) {
            return self.apply_pool(pool, request);
        }
        match request {
            Request::AddService {
                name,
                vip,
                protocol,
                mode,
                forwarding,
                hash,
                ring_size,
            } => self.add_service(
                name,
                *vip,
                *protocol,
                *mode,
                (*forwarding, *hash),
                *ring_size,
            ),
            Request::RemoveService { name } => self.remove_service(name),
            Request::AddBackend {
                service,
                address,
                weight,
            } => self.add_backend(service, *address, *weight),
            Request::RemoveBackend { service, address } => self.remove_backend(service, *address),
            Request::SetBackendState {
                service,
                address,
                state,
            } => {
                self.backend_mut(service, *address)?;
                self.set_admin((service.clone(), *address), *state);
                Ok(())
            }
            Request::SetWeight {
                service,
                address,
                weight,
            } => self.set_weight(service, *address, *weight),
            Request::DrainNode => {
                self.drained = true;
                Ok(())
            }
            Request::UndrainNode => {
                self.drained = false;
                Ok(())
            }
            Request::ShowServices
            | Request::ShowBackends { .. }
            | Request::ShowStats
            | Request::ShowProxy
            | Request::ShowBgp
            | Request::ShowDiscovery
            | Request::Reload
            | Request::Stop { .. }
            | Request::SoftStop
            | Request::ShutdownSessions { .. } => Ok(()),
        }
    }
}

impl Desired {
    /// Records an operator's state for a backend or pool server (`Ready` is the default).
    fn set_admin(&mut self, key: (String, SocketAddr), state: AdminState) {
        if state == AdminState::Ready {
            self.admin.remove(&key);
        } else {
            self.admin.insert(key, state);
        }
    }

    /// `lb remove service`, with its operator states and discovered backends.
    fn remove_service(&mut self, name: &str) -> Result<(), String> {
        let mut services = self.config.services.clone();
        services.retain(|s| s.name != name);
        if services.len() == self.config.services.len() {
            return Err(format!("unknown service {name:?}"));
        }
        // The last l7 service of an l4 VIP's address lets its other ports up.
        self.config.listeners_reachable(&services)?;
        self.config.services = services;
        self.admin.retain(|(s, _), _| s != name);
        self.discovered.remove(name);
        Ok(())
    }

    /// `lb remove backend`; a discovered one is DNS's to remove.
    fn remove_backend(&mut self, service: &str, address: SocketAddr) -> Result<(), String> {
        self.refuse_discovered(service, address, "presence")?;
        let s = self.service_mut(service)?;
        let before = s.backends.len();
        s.backends.retain(|b| b.address != address);
        if s.backends.len() == before {
            return Err(format!("service {service:?} has no backend {address}"));
        }
        self.admin.remove(&(service.to_owned(), address));
        Ok(())
    }

    /// `lb add service`: the file's rules, and no backend yet.
    fn add_service(
        &mut self,
        name: &str,
        vip: SocketAddr,
        protocol: Protocol,
        mode: Mode,
        (forwarding, hash): (Forwarding, FlowHash),
        ring_size: Option<u32>,
    ) -> Result<(), String> {
        rules::service_name(name)?;
        if self.config.services.iter().any(|s| s.name == name) {
            return Err(rules::name_taken(name, None));
        }
        if let Some(other) = self
            .config
            .services
            .iter()
            .find(|s| s.vip == vip && s.protocol == protocol)
        {
            return Err(rules::vip_taken(vip, protocol, &other.name, None));
        }
        check_address(vip, "VIP")?;
        rules::forwarding(name, mode, forwarding)?;
        rules::flow_hash(name, mode, hash)?;
        let ring_size = match ring_size {
            Some(n) => rules::ring_size(i64::from(n))?,
            None => DEFAULT_RING_SIZE,
        };
        rules::service_count(self.config.services.len() + 1)?;
        let mut services = self.config.services.clone();
        services.push(Service {
            name: name.to_string(),
            vip,
            protocol,
            mode,
            forwarding,
            mss_clamp: false,
            hash,
            ring_size,
            backends: Vec::new(),
            line: 0,
            health: None,
            discovery: None,
        });
        self.config.listeners_reachable(&services)?;
        // The new VIP may be another service's backend.
        for s in &services {
            for b in &s.backends {
                rules::backend_not_a_vip(b.address, s.protocol, &services)?;
            }
        }
        self.config.services = services;
        Ok(())
    }

    /// `lb add backend`: the file's rules, ring capacity and backend slots included.
    fn add_backend(
        &mut self,
        service: &str,
        address: SocketAddr,
        weight: u32,
    ) -> Result<(), String> {
        check_address(address, "backend")?;
        rules::weight(i64::from(weight))?;
        rules::backend_count(self.backend_total() + 1)?;
        let protocol = self.service(service)?.protocol;
        rules::backend_not_a_vip(address, protocol, &self.config.services)?;
        rules::backend_not_local(address, &crate::config::local_addresses())?;
        let s = self.service_mut(service)?;
        rules::backend_for_vip(s.vip, s.forwarding, address)?;
        if s.backends.iter().any(|b| b.address == address) {
            return Err(rules::backend_taken(service, address, None));
        }
        let weights = s.backends.iter().map(|b| b.weight);
        let active = rules::active(weights.chain([weight]));
        rules::ring_capacity(service, active, s.ring_size)?;
        s.backends.push(BackendConfig {
            address,
            weight,
            line: 0,
        });
        Ok(())
    }

    /// `lb weight`: a weight raised from 0 takes a ring slot, like an addition.
    fn set_weight(
        &mut self,
        service: &str,
        address: SocketAddr,
        weight: u32,
    ) -> Result<(), String> {
        rules::weight(i64::from(weight))?;
        self.refuse_discovered(service, address, "weight")?;
        self.backend_mut(service, address)?;
        let s = self.service_mut(service)?;
        // Raising a weight from 0 takes a ring slot, like an addition.
        let weights = s.backends.iter().map(|b| {
            if b.address == address {
                weight
            } else {
                b.weight
            }
        });
        rules::ring_capacity(service, rules::active(weights), s.ring_size)?;
        self.backend_mut(service, address)?.weight = weight;
        Ok(())
    }

    /// During replay: records the admin state of an address a discovery may
    /// bring back, for a group that has one; whether it did.
    fn keep_for_discovery(&mut self, request: &Request) -> bool {
        let Request::SetBackendState {
            service,
            address,
            state,
        } = request
        else {
            return false;
        };
        if !self.has_discovery(service) {
            return false;
        }
        let key = (service.clone(), *address);
        if *state == AdminState::Ready {
            self.admin.remove(&key);
        } else {
            self.admin.insert(key, *state);
        }
        true
    }
}

/// Checks an address given to the CLI with the file's rule ([`rules::endpoint`]).
fn check_address(addr: SocketAddr, what: &str) -> Result<(), String> {
    rules::endpoint(addr).map_err(|reason| format!("{what} {addr} {reason}"))
}

/// A discovered address, held to the file's rule ([`rules::endpoint`]):
/// a DNS answer is input like any other.
fn discovered_endpoint(addr: SocketAddr) -> Result<(), String> {
    check_address(addr, "discovered address")
}

/// An answer none of whose addresses can be used is refused (the last
/// good set stays), not applied as an empty set: that would take every
/// server out at once, past the discovery's `hold`.
fn none_usable(
    wanted: &[Found],
    usable: &[Found],
    skipped: &[(SocketAddr, String)],
) -> Result<(), String> {
    match skipped.first() {
        Some((address, why)) if usable.is_empty() && !wanted.is_empty() => Err(format!(
            "none of the {} discovered addresses can be used ({address}: {why})",
            wanted.len()
        )),
        _ => Ok(()),
    }
}

/// Whether a request changes state (and so belongs in the journal).
pub fn is_change(request: &Request) -> bool {
    !matches!(
        request,
        Request::ShowServices
            | Request::ShowBackends { .. }
            | Request::ShowStats
            | Request::ShowProxy
            | Request::ShowDiscovery
            | Request::ShowBgp
            | Request::Reload
            | Request::Stop { .. }
            | Request::SoftStop
            | Request::ShutdownSessions { .. }
    )
}

/// The file's state with the journal replayed on top; changes that no longer
/// apply are skipped (and logged), the rest are kept, compacted ([`record`]).
pub fn replay(config: Config, journal: &[Request]) -> (Desired, Vec<Request>) {
    let replayed = replay_reporting(config, journal);
    for (request, why) in &replayed.dropped {
        warn!("runtime journal entry dropped: {request:?}: {why}");
    }
    (replayed.desired, replayed.kept)
}

/// A journal replayed on a file: what `lb run` and reloads do, and
/// `lb check` reports.
#[derive(Debug)]
pub struct Replayed {
    /// The file's state with the journal on top.
    pub desired: Desired,
    /// The entries kept, compacted.
    pub kept: Vec<Request>,
    /// The entries dropped, with why.
    pub dropped: Vec<(Request, String)>,
}

/// [`replay`], saying what it drops instead of logging it.
pub fn replay_reporting(config: Config, journal: &[Request]) -> Replayed {
    let mut desired = Desired::from_config(config);
    let (mut kept, mut dropped) = (Vec::new(), Vec::new());
    for request in journal {
        if !is_change(request) {
            dropped.push((request.clone(), "not a change (never journaled)".into()));
            continue;
        }
        match desired.apply(request) {
            Ok(()) => record(&mut kept, request.clone()),
            // Discovered backends are not there yet when the journal is
            // replayed (they come after it): their admin states are kept.
            Err(_) if desired.keep_for_discovery(request) => record(&mut kept, request.clone()),
            Err(e) => dropped.push((request.clone(), format!("no longer applies: {e}"))),
        }
    }
    Replayed {
        desired,
        kept,
        dropped,
    }
}

/// Appends an applied change to `journal`, dropping what it makes moot, so
/// the journal holds the net state rather than the history (drains and
/// enables of one server a thousand times are one entry): a later state or
/// weight of a backend replaces the earlier one; a removal drops the
/// changes to what it removes, and cancels the addition it undoes; only
/// the last node drain or undrain counts. Requests that change nothing
/// (shows, reload, stop) are never recorded.
pub fn record(journal: &mut Vec<Request>, request: Request) {
    if !is_change(&request) {
        return;
    }
    let backend = |r: &Request| match r {
        Request::AddBackend {
            service, address, ..
        }
        | Request::RemoveBackend { service, address }
        | Request::SetBackendState {
            service, address, ..
        }
        | Request::SetWeight {
            service, address, ..
        } => Some((service.clone(), *address)),
        _ => None,
    };
    let mut cancelled = false;
    match &request {
        Request::DrainNode | Request::UndrainNode => {
            journal.retain(|r| !matches!(r, Request::DrainNode | Request::UndrainNode));
        }
        Request::SetBackendState { .. } => {
            let key = backend(&request);
            journal
                .retain(|r| !(matches!(r, Request::SetBackendState { .. }) && backend(r) == key));
        }
        Request::SetWeight { .. } => {
            let key = backend(&request);
            journal.retain(|r| !(matches!(r, Request::SetWeight { .. }) && backend(r) == key));
        }
        Request::RemoveBackend { .. } => {
            let key = backend(&request);
            cancelled = journal
                .iter()
                .any(|r| matches!(r, Request::AddBackend { .. }) && backend(r) == key);
            journal.retain(|r| backend(r) != key);
        }
        Request::RemoveService { name } => {
            cancelled = journal
                .iter()
                .any(|r| matches!(r, Request::AddService { name: n, .. } if n == name));
            journal.retain(|r| match r {
                Request::AddService { name: n, .. } => n != name,
                other => backend(other).is_none_or(|(s, _)| &s != name),
            });
        }
        _ => {}
    }
    if !cancelled {
        journal.push(request);
    }
}

/// The journal file that belongs to a configuration file: `lb.toml` -> `lb.toml.state`.
pub fn journal_path(config: &Path) -> PathBuf {
    let mut name = config.as_os_str().to_owned();
    name.push(".state");
    PathBuf::from(name)
}

/// Largest journal read (the runtime limits keep it far smaller).
const MAX_JOURNAL_FILE: u64 = 64 << 20;

/// Reads a journal; a missing file is an empty journal.
pub fn load_journal(path: &Path) -> Result<Vec<Request>> {
    match lb_proxy::config_file::read_to_string(path, MAX_JOURNAL_FILE) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid runtime state file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes a journal whole and durably (`atomic_file`).
pub fn save_journal(path: &Path, journal: &[Request]) -> Result<()> {
    let text = serde_json::to_string_pretty(journal)?;
    crate::atomic_file::replace(path, text.as_bytes(), crate::atomic_file::PRIVATE)
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Mode, Protocol};

    #[test]
    fn the_journal_keeps_the_net_state_and_replays_to_the_same() {
        use crate::config::FlowHash;
        let state = |address: &str, state| Request::SetBackendState {
            service: "web".into(),
            address: address.parse().unwrap(),
            state,
        };
        let weight = |address: &str, weight| Request::SetWeight {
            service: "web".into(),
            address: address.parse().unwrap(),
            weight,
        };
        let remove = |address: &str| Request::RemoveBackend {
            service: "web".into(),
            address: address.parse().unwrap(),
        };
        let other = Request::AddService {
            name: "other".into(),
            vip: "198.18.100.9:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            mode: Mode::L4,
            forwarding: crate::config::Forwarding::Nat,
            hash: FlowHash::Flow,
            ring_size: None,
        };
        let other_backend = Request::AddBackend {
            service: "other".into(),
            address: "198.18.2.30:80".parse().unwrap(),
            weight: 1,
        };
        let (file, new) = ("198.18.2.11:8080", "198.18.2.12:8080");
        let mut steps = Vec::new();
        for _ in 0..1000 {
            steps.push(state(file, AdminState::Drain));
            steps.push(state(file, AdminState::Ready));
        }
        steps.extend([
            Request::DrainNode,
            Request::UndrainNode,
            Request::DrainNode,
            weight(file, 3),
            weight(file, 5),
            add_backend(new),
            state(new, AdminState::Maint),
            weight(new, 2),
            remove(new),
            add_backend(new),
            other,
            other_backend,
            Request::RemoveService {
                name: "other".into(),
            },
            Request::Reload,
            Request::Stop { detach: false },
            Request::ShowServices,
        ]);
        let mut live = Desired::from_config(base());
        let mut journal = Vec::new();
        for step in steps {
            live.apply(&step).unwrap();
            record(&mut journal, step);
        }
        assert_eq!(
            journal,
            [
                state(file, AdminState::Ready),
                Request::DrainNode,
                weight(file, 5),
                add_backend(new),
            ]
        );
        let (replayed, kept) = replay(base(), &journal);
        assert_eq!(replayed, live);
        assert_eq!(kept, journal);
        // A file backend removed stays removed; a state set before is moot.
        let mut journal = vec![state(file, AdminState::Drain)];
        record(&mut journal, remove(file));
        assert_eq!(journal, [remove(file)]);
        // Non-changes in an old journal are dropped at replay.
        let (_, kept) = replay(base(), &[Request::Reload, Request::Stop { detach: true }]);
        assert!(kept.is_empty());
    }

    #[test]
    fn a_pool_takes_at_most_its_server_limit_at_runtime() {
        let mut d = Desired::from_config(discovering());
        let mut added = 0;
        let err = loop {
            let address =
                SocketAddr::from(([198, 18, 3, (added / 250) as u8], 1000 + added as u16));
            let add = Request::AddBackend {
                service: "pool:app".into(),
                address,
                weight: 1,
            };
            match d.apply(&add) {
                Ok(()) => added += 1,
                Err(e) => break e,
            }
            assert!(added <= rules::MAX_POOL_SERVERS, "no limit");
        };
        assert!(err.contains("at most 1000"), "{err}");
    }

    #[test]
    fn group_names() {
        assert_eq!(Group::parse("web"), Group::Service("web"));
        assert_eq!(Group::parse("pool:api"), Group::Pool("api"));
        assert_eq!(Group::parse(&Group::pool_name("api")), Group::Pool("api"));
    }

    fn base() -> Config {
        crate::config::parse(
            r#"interfaces = ["eth0"]
[[service]]
name = "web"
vip = "198.18.100.1:80"
[[service.backend]]
address = "198.18.2.11:8080"
"#,
            "t.toml",
        )
        .unwrap()
    }

    fn add_backend(addr: &str) -> Request {
        Request::AddBackend {
            service: "web".into(),
            address: addr.parse().unwrap(),
            weight: 1,
        }
    }

    #[test]
    fn a_service_added_at_runtime_may_hash_by_source_if_it_is_l4() {
        use crate::config::FlowHash;
        let mut d = Desired::from_config(base());
        let add = |name: &str, mode| Request::AddService {
            name: name.into(),
            vip: "198.18.100.9:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            mode,
            forwarding: crate::config::Forwarding::Nat,
            hash: FlowHash::Source,
            ring_size: None,
        };
        let err = d.apply(&add("proxy", Mode::L7)).unwrap_err();
        assert!(err.contains("hash applies to l4 services"), "{err}");
        d.apply(&add("sticky", Mode::L4)).unwrap();
        assert_eq!(d.config.services[1].hash, FlowHash::Source);
        // Journaled as JSON; a journal written before `hash` replays as `flow`.
        let text = serde_json::to_string(&add("sticky", Mode::L4)).unwrap();
        assert!(text.contains(r#""hash":"source""#), "{text}");
        let old = text.replace(r#","hash":"source""#, "");
        let back: Request = serde_json::from_str(&old).unwrap();
        assert!(matches!(
            back,
            Request::AddService {
                hash: FlowHash::Flow,
                ..
            }
        ));
    }

    #[test]
    fn a_service_change_that_would_cut_a_listener_off_is_refused() {
        let config = crate::config::parse(
            r#"interfaces = ["eth0"]
metrics = "198.18.100.9:9100"
[[service]]
name = "proxy"
vip = "198.18.100.9:443"
mode = "l7"
[[frontend]]
name = "f"
binds = ["198.18.100.9:443", "198.18.100.9:80"]
default_pool = "app"
[[pool]]
name = "app"
servers = [{ address = "198.18.2.11:8080" }]
"#,
            "t.toml",
        )
        .unwrap();
        let mut d = Desired::from_config(config);
        let add = |name: &str, port: u16, mode| Request::AddService {
            name: name.into(),
            vip: std::net::SocketAddr::from(([198, 18, 100, 9], port)),
            protocol: Protocol::Tcp,
            mode,
            forwarding: crate::config::Forwarding::Nat,
            hash: crate::config::FlowHash::Flow,
            ring_size: None,
        };
        let before = d.clone();
        // XDP would forward the frontend's connections on :80 elsewhere.
        let err = d.apply(&add("web", 80, Mode::L4)).unwrap_err();
        assert!(
            err.contains(
                "frontend \"f\" binds 198.18.100.9:80, but it is the VIP of l4 service \"web\""
            ),
            "{err}"
        );
        assert_eq!(d.config, before.config, "a refused change changes nothing");
        // Another port of the address: the l7 service keeps it passed up...
        d.apply(&add("ssh", 22, Mode::L4)).unwrap();
        // ...so removing that service would drop the frontend's and metrics' packets.
        let remove = Request::RemoveService {
            name: "proxy".into(),
        };
        let err = d.apply(&remove).unwrap_err();
        assert!(err.contains("of no l7 service"), "{err}");
        d.apply(&Request::RemoveService { name: "ssh".into() })
            .unwrap();
        d.apply(&remove).unwrap();
        assert!(d.config.services.is_empty());
    }

    #[test]
    fn dsr_services_added_at_runtime_take_only_backends_on_the_vip_port() {
        use crate::config::Forwarding;
        let mut d = Desired::from_config(base());
        let add = |forwarding, mode| Request::AddService {
            name: "dsr".into(),
            vip: "198.18.100.9:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            mode,
            forwarding,
            hash: crate::config::FlowHash::Flow,
            ring_size: None,
        };
        let err = d.apply(&add(Forwarding::Ipip, Mode::L7)).unwrap_err();
        assert!(err.contains("l4 services only"), "{err}");
        d.apply(&add(Forwarding::Ipip, Mode::L4)).unwrap();
        assert_eq!(d.config.services[1].forwarding, Forwarding::Ipip);
        let backend = |addr: &str| Request::AddBackend {
            service: "dsr".into(),
            address: addr.parse().unwrap(),
            weight: 1,
        };
        let before = d.clone();
        let err = d.apply(&backend("198.18.2.11:8080")).unwrap_err();
        assert!(err.contains("must use the VIP's port 80"), "{err}");
        assert_eq!(d.config, before.config, "a refused change changes nothing");
        d.apply(&backend("198.18.2.11:80")).unwrap();
        assert_eq!(d.config.services[1].backends.len(), 1);
    }

    #[test]
    fn changes_apply_and_bad_ones_change_nothing() {
        let mut d = Desired::from_config(base());
        d.apply(&add_backend("198.18.2.12:8080")).unwrap();
        assert_eq!(d.config.services[0].backends.len(), 2);
        let before = d.clone();
        for (bad, why) in [
            (add_backend("198.18.2.12:8080"), "already has"),
            (add_backend("[fd00::1]:80"), "address families"),
            (add_backend("0.0.0.0:80"), "unicast"),
            (
                Request::AddBackend {
                    service: "nope".into(),
                    address: "198.18.2.13:80".parse().unwrap(),
                    weight: 1,
                },
                "unknown service",
            ),
            (
                Request::SetWeight {
                    service: "web".into(),
                    address: "198.18.2.11:8080".parse().unwrap(),
                    weight: 70000,
                },
                "out of range",
            ),
            (
                Request::RemoveBackend {
                    service: "web".into(),
                    address: "198.18.2.99:8080".parse().unwrap(),
                },
                "no backend",
            ),
            (
                Request::AddService {
                    name: "web".into(),
                    vip: "198.18.100.2:80".parse().unwrap(),
                    protocol: Protocol::Tcp,
                    mode: Mode::L4,
                    forwarding: crate::config::Forwarding::Nat,
                    hash: crate::config::FlowHash::Flow,
                    ring_size: None,
                },
                "already exists",
            ),
            (
                Request::AddService {
                    name: "other".into(),
                    vip: "198.18.100.1:80".parse().unwrap(),
                    protocol: Protocol::Tcp,
                    mode: Mode::L4,
                    forwarding: crate::config::Forwarding::Nat,
                    hash: crate::config::FlowHash::Flow,
                    ring_size: None,
                },
                "already used",
            ),
            (
                Request::AddService {
                    name: "odd".into(),
                    vip: "198.18.100.3:80".parse().unwrap(),
                    protocol: Protocol::Tcp,
                    mode: Mode::L4,
                    forwarding: crate::config::Forwarding::Nat,
                    hash: crate::config::FlowHash::Flow,
                    ring_size: Some(1000),
                },
                "prime",
            ),
        ] {
            let err = d.apply(&bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert_eq!(d, before, "{bad:?} changed nothing");
        }
    }

    #[test]
    fn ring_capacity_counts_backends_with_weight_like_the_file() {
        let mut d = Desired::from_config(base());
        d.apply(&Request::AddService {
            name: "small".into(),
            vip: "198.18.100.5:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            mode: Mode::L4,
            forwarding: crate::config::Forwarding::Nat,
            hash: crate::config::FlowHash::Flow,
            ring_size: Some(2),
        })
        .unwrap();
        let add = |addr: &str, weight| Request::AddBackend {
            service: "small".into(),
            address: addr.parse().unwrap(),
            weight,
        };
        d.apply(&add("198.18.2.11:80", 1)).unwrap();
        d.apply(&add("198.18.2.12:80", 1)).unwrap();
        // A drained backend takes no slot...
        d.apply(&add("198.18.2.13:80", 0)).unwrap();
        let before = d.clone();
        let err = d.apply(&add("198.18.2.14:80", 1)).unwrap_err();
        assert!(
            err.contains("3 backends with weight > 0 but ring_size is 2"),
            "{err}"
        );
        // ...until its weight is raised.
        let err = d
            .apply(&Request::SetWeight {
                service: "small".into(),
                address: "198.18.2.13:80".parse().unwrap(),
                weight: 1,
            })
            .unwrap_err();
        assert!(err.contains("ring size"), "{err}");
        assert_eq!(d, before);
    }

    #[test]
    fn admin_state_is_tracked_and_cleared() {
        let mut d = Desired::from_config(base());
        let addr: SocketAddr = "198.18.2.11:8080".parse().unwrap();
        d.apply(&Request::SetBackendState {
            service: "web".into(),
            address: addr,
            state: AdminState::Drain,
        })
        .unwrap();
        assert_eq!(d.admin_state("web", addr), AdminState::Drain);
        d.apply(&Request::SetBackendState {
            service: "web".into(),
            address: addr,
            state: AdminState::Ready,
        })
        .unwrap();
        assert_eq!(d.admin_state("web", addr), AdminState::Ready);
        assert!(d.admin.is_empty());
    }

    #[test]
    fn replay_skips_changes_that_no_longer_apply() {
        let journal = vec![
            add_backend("198.18.2.12:8080"),
            Request::RemoveService { name: "web".into() },
            add_backend("198.18.2.13:8080"),
        ];
        let (d, kept) = replay(base(), &journal);
        assert!(d.config.services.is_empty());
        // The backend added to the service removed after it is moot too.
        assert_eq!(kept, [Request::RemoveService { name: "web".into() }]);
    }

    #[test]
    fn journal_round_trips_through_its_file() {
        let dir = std::env::temp_dir().join(format!("lb-journal-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = journal_path(&dir.join("lb.toml"));
        assert!(path.ends_with("lb.toml.state"));
        assert!(load_journal(&path).unwrap().is_empty());
        let journal = vec![add_backend("198.18.2.12:8080")];
        save_journal(&path, &journal).unwrap();
        assert_eq!(load_journal(&path).unwrap(), journal);
        std::fs::write(&path, "not json").unwrap();
        assert!(load_journal(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn discovering() -> Config {
        crate::config::parse(
            r#"interfaces = ["eth0"]
[[service]]
name = "web"
vip = "198.18.100.1:80"
ring_size = 5
[[service.backend]]
address = "198.18.2.11:80"
[service.discovery]
name = "_http._tcp.web.lab.test"
nameservers = ["198.18.2.241"]
[[frontend]]
name = "f"
binds = ["198.18.100.2:443"]
default_pool = "app"
[[pool]]
name = "app"
servers = [{ address = "198.18.2.11:8080" }]
[pool.discovery]
name = "_http._tcp.app.lab.test"
nameservers = ["198.18.2.241"]
"#,
            "t.toml",
        )
        .unwrap()
    }

    fn found(addr: &str, weight: u32) -> Found {
        Found {
            address: addr.parse().unwrap(),
            weight,
            backup: false,
        }
    }

    fn addresses(d: &Desired, service: &str) -> Vec<(String, u32)> {
        let s = d
            .config
            .services
            .iter()
            .find(|s| s.name == service)
            .unwrap();
        s.backends
            .iter()
            .map(|b| (b.address.to_string(), b.weight))
            .collect()
    }

    #[test]
    fn a_backend_that_is_the_balancer_itself_is_refused_at_runtime_and_from_dns() {
        let mut d = Desired::from_config(discovering());
        let before = d.clone();
        let refused = |d: &mut Desired, r: Request| d.apply(&r).unwrap_err();
        let add = |service: &str, address: &str| Request::AddBackend {
            service: service.into(),
            address: address.parse().unwrap(),
            weight: 1,
        };
        // An l4 service's own VIP; a pool server where the frontend listens.
        let err = refused(&mut d, add("web", "198.18.100.1:80"));
        assert!(err.contains("is the VIP of service \"web\""), "{err}");
        let err = refused(&mut d, add("pool:app", "198.18.100.2:443"));
        assert!(err.contains("is where frontend \"f\" listens"), "{err}");
        // The same spelt as IPv4-mapped IPv6 addresses.
        for group in ["pool:app", "web"] {
            let err = refused(&mut d, add(group, "[::ffff:198.18.100.2]:443"));
            assert!(err.contains("IPv4-mapped"), "{err}");
        }
        // A new VIP that is a backend already.
        let vip = Request::AddService {
            name: "other".into(),
            vip: "198.18.2.11:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            mode: Mode::L4,
            forwarding: crate::config::Forwarding::Nat,
            hash: crate::config::FlowHash::Flow,
            ring_size: None,
        };
        let err = refused(&mut d, vip);
        assert!(
            err.contains("backend 198.18.2.11:80 is the VIP of service \"other\""),
            "{err}"
        );
        assert_eq!(d, before, "refused changes change nothing");
        // From DNS: left out, with the reason; an answer with nothing
        // usable is refused (the last good set stays), not applied empty.
        let err = d
            .set_discovered("web", &[found("198.18.100.1:80", 1)])
            .unwrap_err();
        assert!(
            err.contains("none of the 1") && err.contains("a loop"),
            "{err}"
        );
        let (_, skipped) = d
            .set_discovered(
                "pool:app",
                &[
                    found("198.18.100.2:443", 1),
                    found("198.18.2.12:8080", 1),
                    found("0.0.0.0:8080", 1),
                    found("224.0.0.1:8080", 1),
                    found("255.255.255.255:8080", 1),
                ],
            )
            .unwrap();
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        assert!(
            skipped.iter().any(|s| s.1.contains("a loop")),
            "{skipped:?}"
        );
        for why in ["unspecified", "multicast", "broadcast"] {
            assert!(
                skipped.iter().any(|s| s.1.contains(why)),
                "{why}: {skipped:?}"
            );
        }
        // The file's cap holds for DNS too.
        let many: Vec<Found> = (0..=rules::MAX_POOL_SERVERS)
            .map(|i| found(&format!("10.{}.{}.1:8080", i / 256, i % 256), 1))
            .collect();
        let err = d.set_discovered("pool:app", &many).unwrap_err();
        assert!(err.contains("at most 1000"), "{err}");
    }

    #[test]
    fn discovered_backends_come_and_go_beside_the_static_ones() {
        let mut d = Desired::from_config(discovering());
        assert!(d.has_discovery("web") && d.has_discovery("pool:app"));
        let (diff, skipped) = d
            .set_discovered(
                "web",
                &[
                    found("198.18.2.11:80", 7), // the static one stays as configured
                    found("198.18.2.12:80", 2),
                    found("[fd00:18:2::13]:80", 1),
                ],
            )
            .unwrap();
        assert_eq!(diff.shadowed, vec!["198.18.2.11:80".parse().unwrap()]);
        assert_eq!(skipped.len(), 1, "the IPv6 one does not fit an IPv4 VIP");
        assert_eq!(
            addresses(&d, "web"),
            [("198.18.2.11:80".into(), 1), ("198.18.2.12:80".into(), 2)]
        );
        assert!(d.is_discovered("web", "198.18.2.12:80".parse().unwrap()));
        assert!(!d.is_discovered("web", "198.18.2.11:80".parse().unwrap()));
        d.set_discovered("web", &[found("198.18.2.13:80", 1)])
            .unwrap();
        assert_eq!(
            addresses(&d, "web"),
            [("198.18.2.11:80".into(), 1), ("198.18.2.13:80".into(), 1)]
        );
        d.set_discovered("web", &[]).unwrap();
        assert_eq!(addresses(&d, "web"), [("198.18.2.11:80".into(), 1)]);
        assert!(d.discovered["web"].is_empty());
        // More than the ring holds: refused, nothing changed.
        let many: Vec<Found> = (12..=17)
            .map(|i| found(&format!("198.18.2.{i}:80"), 1))
            .collect();
        let before = d.clone();
        assert!(
            d.set_discovered("web", &many)
                .unwrap_err()
                .contains("ring size")
        );
        assert_eq!(d, before);
    }

    #[test]
    fn pools_take_discovered_servers_with_backups() {
        let mut d = Desired::from_config(discovering());
        let mut spare = found("198.18.2.13:8080", 5);
        spare.backup = true;
        d.set_discovered("pool:app", &[found("198.18.2.12:8080", 2), spare])
            .unwrap();
        let servers: Vec<(String, u32, bool)> = d.config.proxy.0.pools[0]
            .servers
            .iter()
            .map(|s| (s.address.to_string(), s.weight, s.backup))
            .collect();
        assert_eq!(
            servers,
            [
                ("198.18.2.11:8080".into(), 1, false),
                ("198.18.2.12:8080".into(), 2, false),
                ("198.18.2.13:8080".into(), 5, true),
            ]
        );
        let err = d
            .apply(&Request::RemoveBackend {
                service: "pool:app".into(),
                address: "198.18.2.12:8080".parse().unwrap(),
            })
            .unwrap_err();
        assert!(err.contains("comes from DNS discovery"), "{err}");
    }

    #[test]
    fn the_cli_may_not_remove_or_reweight_discovered_backends_but_may_disable_them() {
        let mut d = Desired::from_config(discovering());
        d.set_discovered("web", &[found("198.18.2.12:80", 2)])
            .unwrap();
        let addr: SocketAddr = "198.18.2.12:80".parse().unwrap();
        let before = d.clone();
        for (bad, why) in [
            (
                Request::RemoveBackend {
                    service: "web".into(),
                    address: addr,
                },
                "its presence follows the DNS records",
            ),
            (
                Request::SetWeight {
                    service: "web".into(),
                    address: addr,
                    weight: 9,
                },
                "its weight follows the DNS records",
            ),
            (add_backend("198.18.2.12:80"), "already has"),
        ] {
            let err = d.apply(&bad).unwrap_err();
            assert!(err.contains(why), "{bad:?}: {err}");
            assert_eq!(d, before);
        }
        let disable = Request::SetBackendState {
            service: "web".into(),
            address: addr,
            state: AdminState::Maint,
        };
        d.apply(&disable).unwrap();
        assert_eq!(d.admin_state("web", addr), AdminState::Maint);
        // A static backend added at runtime stays beside the discovered ones.
        d.apply(&add_backend("198.18.2.14:80")).unwrap();
        d.set_discovered("web", &[]).unwrap();
        assert_eq!(
            addresses(&d, "web"),
            [("198.18.2.11:80".into(), 1), ("198.18.2.14:80".into(), 1)]
        );
        // The admin state outlives the address's absence from the DNS.
        assert_eq!(d.admin_state("web", addr), AdminState::Maint);
    }

    #[test]
    fn replay_keeps_admin_states_of_backends_discovery_brings_later() {
        let addr: SocketAddr = "198.18.2.12:80".parse().unwrap();
        let journal = vec![
            Request::SetBackendState {
                service: "web".into(),
                address: addr,
                state: AdminState::Drain,
            },
            Request::SetBackendState {
                service: "pool:app".into(),
                address: addr,
                state: AdminState::Drain,
            },
        ];
        let (d, kept) = replay(discovering(), &journal);
        assert_eq!(kept.len(), 2, "both groups discover");
        assert_eq!(d.admin_state("web", addr), AdminState::Drain);
        let (_, kept) = replay(base(), &journal[..1]);
        assert!(kept.is_empty(), "web has no discovery in this file");
    }
}
