//! Runtime changes pushed by the operator: applied on top of the configuration
//! file, and kept in a journal next to it so a restart or a reload does not
//! lose them (HAProxy's runtime API forgets them on reload).
//!
//! The effective state is always "file, then journal replayed in order": a
//! reload re-reads the file and replays the journal on top; a change that no
//! longer applies (its service is gone from the file) is skipped with a warning.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use lb_common::{DEFAULT_RING_SIZE, MAX_RING_SIZE, maglev::is_prime};
use tracing::warn;

use crate::config::{BackendConfig, Config, Mode, Service, dsr_backend_problem};
use crate::control::protocol::{AdminState, Request};

/// Service-name prefix that addresses an L7 pool (`lb drain pool:web ADDR`).
const POOL_PREFIX: &str = "pool:";

/// What a backend group name in the control protocol, the journal, admin
/// states and health targets refers to: an L4 service by its name, or an L7
/// pool as `pool:NAME`. The one place that knows the convention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Group<'a> {
    /// An L4/L7 service of `[[service]]`.
    Service(&'a str),
    /// A `[[pool]]` of the L7 proxy.
    Pool(&'a str),
}

impl<'a> Group<'a> {
    /// Reads a group name as the CLI and the protocol spell it.
    pub fn parse(name: &'a str) -> Self {
        match name.strip_prefix(POOL_PREFIX) {
            Some(pool) => Group::Pool(pool),
            None => Group::Service(name),
        }
    }

    /// The group name of L7 pool `pool`.
    pub fn pool_name(pool: &str) -> String {
        format!("{POOL_PREFIX}{pool}")
    }
}

/// Largest weight a backend may have (the Maglev builder's range).
pub const MAX_WEIGHT: u32 = 65535;

/// The state the data plane should be in, before health is taken into account.
#[derive(Debug, Clone, PartialEq)]
pub struct Desired {
    /// Services and backends: the file's, with runtime changes applied.
    pub config: Config,
    /// Administrative state of backends that are not `Ready`.
    pub admin: BTreeMap<(String, SocketAddr), AdminState>,
}

impl Desired {
    /// The state described by a configuration file alone.
    pub fn from_config(config: Config) -> Self {
        Self {
            config,
            admin: BTreeMap::new(),
        }
    }

    /// Administrative state of a backend.
    pub fn admin_state(&self, service: &str, address: SocketAddr) -> AdminState {
        self.admin
            .get(&(service.to_string(), address))
            .copied()
            .unwrap_or_default()
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
        let pools = &mut self.config.proxy.0.pools;
        let p = pools
            .iter_mut()
            .find(|p| p.name == pool)
            .ok_or_else(|| format!("unknown pool {pool:?}"))?;
        let has = |p: &crate::proxy::Pool, a: SocketAddr| p.servers.iter().any(|s| s.address == a);
        match request {
            Request::AddBackend {
                address, weight, ..
            } => {
                check_address(*address, "server")?;
                check_weight(*weight)?;
                if has(p, *address) {
                    return Err(format!("pool {pool:?} already has server {address}"));
                }
                let mut server = crate::proxy::ServerSpec::new(*address);
                server.weight = *weight;
                p.servers.push(server);
            }
            Request::RemoveBackend { address, .. } => {
                if !has(p, *address) {
                    return Err(format!("pool {pool:?} has no server {address}"));
                }
                p.servers.retain(|s| s.address != *address);
                self.admin.remove(&(Group::pool_name(pool), *address));
            }
            Request::SetWeight {
                address, weight, ..
            } => {
                check_weight(*weight)?;
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
                let key = (Group::pool_name(pool), *address);
                if *state == AdminState::Ready {
                    self.admin.remove(&key);
                } else {
                    self.admin.insert(key, *state);
                }
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
                ring_size,
            } => {
                if name.is_empty()
                    || !name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c))
                {
                    return Err(format!("bad service name {name:?}: use [A-Za-z0-9_.-]+"));
                }
                if self.config.services.iter().any(|s| &s.name == name) {
                    return Err(format!("service {name:?} already exists"));
                }
                if let Some(other) = self
                    .config
                    .services
                    .iter()
                    .find(|s| s.vip == *vip && s.protocol == *protocol)
                {
                    return Err(format!(
                        "VIP {vip} is already used by service {:?}",
                        other.name
                    ));
                }
                check_address(*vip, "VIP")?;
                if *mode == Mode::L7 && forwarding.is_dsr() {
                    return Err("forwarding applies to l4 services only".into());
                }
                let ring_size = ring_size.unwrap_or(DEFAULT_RING_SIZE);
                if !(2..=MAX_RING_SIZE as u32).contains(&ring_size) || !is_prime(ring_size) {
                    return Err(format!(
                        "ring size {ring_size} must be a prime between 2 and {MAX_RING_SIZE}"
                    ));
                }
                self.config.services.push(Service {
                    name: name.clone(),
                    vip: *vip,
                    protocol: *protocol,
                    mode: *mode,
                    forwarding: *forwarding,
                    mss_clamp: false,
                    ring_size,
                    backends: Vec::new(),
                    line: 0,
                    health: None,
                    discovery: None,
                });
                Ok(())
            }
            Request::RemoveService { name } => {
                let before = self.config.services.len();
                self.config.services.retain(|s| &s.name != name);
                if self.config.services.len() == before {
                    return Err(format!("unknown service {name:?}"));
                }
                self.admin.retain(|(s, _), _| s != name);
                Ok(())
            }
            Request::AddBackend {
                service,
                address,
                weight,
            } => {
                check_address(*address, "backend")?;
                check_weight(*weight)?;
                let s = self.service_mut(service)?;
                if s.vip.is_ipv4() != address.is_ipv4() {
                    return Err(format!(
                        "backend {address} and VIP {} are of different address families; NAT does not translate between them",
                        s.vip
                    ));
                }
                if let Some(why) = dsr_backend_problem(s.forwarding, s.vip, *address) {
                    return Err(why);
                }
                if s.backends.iter().any(|b| b.address == *address) {
                    return Err(format!("service {service:?} already has backend {address}"));
                }
                if s.backends.len() >= s.ring_size as usize {
                    return Err(format!(
                        "service {service:?} cannot hold more backends than its ring size"
                    ));
                }
                s.backends.push(BackendConfig {
                    address: *address,
                    weight: *weight,
                    line: 0,
                });
                Ok(())
            }
            Request::RemoveBackend { service, address } => {
                let s = self.service_mut(service)?;
                let before = s.backends.len();
                s.backends.retain(|b| b.address != *address);
                if s.backends.len() == before {
                    return Err(format!("service {service:?} has no backend {address}"));
                }
                self.admin.remove(&(service.clone(), *address));
                Ok(())
            }
            Request::SetBackendState {
                service,
                address,
                state,
            } => {
                self.backend_mut(service, *address)?;
                let key = (service.clone(), *address);
                if *state == AdminState::Ready {
                    self.admin.remove(&key);
                } else {
                    self.admin.insert(key, *state);
                }
                Ok(())
            }
            Request::SetWeight {
                service,
                address,
                weight,
            } => {
                check_weight(*weight)?;
                self.backend_mut(service, *address)?.weight = *weight;
                Ok(())
            }
            Request::ShowServices
            | Request::ShowBackends { .. }
            | Request::ShowStats
            | Request::Reload
            | Request::Stop { .. } => Ok(()),
        }
    }
}

fn check_address(addr: SocketAddr, what: &str) -> Result<(), String> {
    if addr.port() == 0 {
        return Err(format!("{what} {addr} has port 0"));
    }
    if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        return Err(format!("{what} {addr} is not a unicast address"));
    }
    Ok(())
}

fn check_weight(weight: u32) -> Result<(), String> {
    if weight > MAX_WEIGHT {
        return Err(format!("weight {weight} is out of range 0..={MAX_WEIGHT}"));
    }
    Ok(())
}

/// Whether a request changes state (and so belongs in the journal).
pub fn is_change(request: &Request) -> bool {
    !matches!(
        request,
        Request::ShowServices
            | Request::ShowBackends { .. }
            | Request::ShowStats
            | Request::Reload
            | Request::Stop { .. }
    )
}

/// The file's state with the journal replayed on top; changes that no longer
/// apply are skipped (and logged), the rest are kept.
pub fn replay(config: Config, journal: &[Request]) -> (Desired, Vec<Request>) {
    let mut desired = Desired::from_config(config);
    let mut kept = Vec::new();
    for request in journal {
        match desired.apply(request) {
            Ok(()) => kept.push(request.clone()),
            Err(e) => warn!("runtime change no longer applies, dropped: {request:?}: {e}"),
        }
    }
    (desired, kept)
}

/// The journal file that belongs to a configuration file: `lb.toml` -> `lb.toml.state`.
pub fn journal_path(config: &Path) -> PathBuf {
    let mut name = config.as_os_str().to_owned();
    name.push(".state");
    PathBuf::from(name)
}

/// Reads a journal; a missing file is an empty journal.
pub fn load_journal(path: &Path) -> Result<Vec<Request>> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid runtime state file", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes a journal atomically (temporary file, then rename).
pub fn save_journal(path: &Path, journal: &[Request]) -> Result<()> {
    let tmp = path.with_extension("state.tmp");
    let text = serde_json::to_string_pretty(journal)?;
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Mode, Protocol};

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
    fn dsr_services_added_at_runtime_take_only_backends_on_the_vip_port() {
        use crate::config::Forwarding;
        let mut d = Desired::from_config(base());
        let add = |forwarding, mode| Request::AddService {
            name: "dsr".into(),
            vip: "198.18.100.9:80".parse().unwrap(),
            protocol: Protocol::Tcp,
            mode,
            forwarding,
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
        assert_eq!(kept.len(), 2);
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
}
