//! Applies a configuration to the data plane: allocates VIP and backend ids,
//! builds each service's Maglev table and publishes it. Applying a new
//! configuration changes only what differs, in an order that never leaves a
//! packet without a valid path (backends before rings, rings before VIPs).

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};

use anyhow::{Context, Result, anyhow};
use lb_common::{
    AddrKey, BACKEND_F_VALID, Backend, ENCAP_SRC_V4, ENCAP_SRC_V6, EncapSource, FAMILY_V4,
    MAX_BACKENDS, MAX_VIPS, Settings, VIP_ADDR_L4, VIP_ADDR_LOCAL, VIP_F_HASH_SOURCE, VIP_F_IPIP,
    VIP_F_L2, VIP_F_L7, VIP_F_MSS_CLAMP, VipKey, VipMeta, VipState, addr_to_bytes,
    hash::backend_identity,
    maglev::{self, MaglevInput},
};
use tracing::info;

use crate::{
    config::{Config, FlowHash, Forwarding, IpPrefix, Mode, Protocol, Service},
    dataplane::{AddrSet, Dataplane, PinnedState, addr_to_ip, ip_to_addr},
};

/// The VIP map key of a service address.
pub fn vip_key(vip: SocketAddr, protocol: Protocol) -> VipKey {
    let (addr, family) = ip_to_addr(vip.ip());
    VipKey {
        addr,
        port: vip.port(),
        proto: protocol.number(),
        family,
    }
}

/// What `VIP_ADDRS` must hold for VIPs of these addresses and `VIP_F_*`
/// flags: every address an `l4` service has, `VIP_ADDR_LOCAL` too where an
/// `l7` service shares it (the stack has it then).
fn vip_addrs(vips: impl Iterator<Item = (IpAddr, u32)>) -> BTreeMap<AddrKey, u8> {
    let mut by_addr: BTreeMap<AddrKey, u8> = BTreeMap::new();
    for (ip, flags) in vips {
        let (addr, family) = ip_to_addr(ip);
        let bit = if flags & VIP_F_L7 != 0 {
            VIP_ADDR_LOCAL
        } else {
            VIP_ADDR_L4
        };
        *by_addr.entry(addr_key(addr, family)).or_default() |= bit;
    }
    by_addr.retain(|_, v| *v & VIP_ADDR_L4 != 0);
    by_addr
}

/// Whether two sets of `VIP_F_*` flags send established flows the same
/// way: they differ at most in what picks new flows' backends.
fn same_mode(a: u32, b: u32) -> bool {
    a & !VIP_F_HASH_SOURCE == b & !VIP_F_HASH_SOURCE
}

/// The key of an address in the data plane's address sets.
fn addr_key(addr: lb_common::Addr, family: u8) -> AddrKey {
    AddrKey {
        addr,
        family,
        pad: [0; 3],
    }
}

/// The backend map value of a backend address of VIP `vip_id`.
pub fn backend_value(addr: SocketAddr, vip_id: u32) -> Backend {
    let (bytes, family) = ip_to_addr(addr.ip());
    Backend {
        addr: bytes,
        port: addr.port(),
        family,
        flags: BACKEND_F_VALID,
        vip_id,
    }
}

/// The data plane's `VIP_F_*` bits for a service: where its packets go,
/// and what picks their backend.
pub fn vip_flags(service: &Service) -> u32 {
    let hash = match service.hash {
        FlowHash::Flow => 0,
        FlowHash::Source => VIP_F_HASH_SOURCE,
    };
    hash | match (service.mode, service.forwarding) {
        (Mode::L7, _) => VIP_F_L7,
        (Mode::L4, Forwarding::Nat) => 0,
        (Mode::L4, Forwarding::L2) => VIP_F_L2,
        (Mode::L4, Forwarding::Ipip) if service.mss_clamp => VIP_F_IPIP | VIP_F_MSS_CLAMP,
        (Mode::L4, Forwarding::Ipip) => VIP_F_IPIP,
    }
}

/// The `ENCAP_SOURCES` entry of a configured outer source: the prefix's
/// address, and a mask over its host bits in the last 32-bit word.
pub fn encap_source(prefix: &IpPrefix) -> EncapSource {
    let (addr, family) = ip_to_addr(prefix.addr);
    let word_bits = if family == FAMILY_V4 {
        u32::from(prefix.len)
    } else {
        u32::from(prefix.len).saturating_sub(96)
    };
    let host = u32::MAX.checked_shr(word_bits).unwrap_or(0);
    EncapSource {
        addr,
        host_mask: u32::from_ne_bytes(host.to_be_bytes()),
        set: 1,
    }
}

/// How a backend may be used right now, from its administrative state and health.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Availability {
    /// It is in the Maglev table: new flows may go to it.
    pub new_flows: bool,
    /// Its slot stays valid: established flows keep going to it.
    pub established: bool,
}

impl Availability {
    /// A backend in normal service.
    pub const FULL: Self = Self {
        new_flows: true,
        established: true,
    };
}

/// Every backend of `config` as its `BACKENDS` value, by (service, address):
/// not valid when its established flows must move elsewhere.
fn wanted_backends(
    config: &Config,
    vip_ids: &BTreeMap<(SocketAddr, u8), u32>,
    availability: &dyn Fn(&str, SocketAddr) -> Availability,
) -> BTreeMap<(String, SocketAddr), Backend> {
    let mut wanted = BTreeMap::new();
    for service in &config.services {
        let vip_id = vip_ids[&(service.vip, service.protocol.number())];
        for b in &service.backends {
            let mut value = backend_value(b.address, vip_id);
            if !availability(&service.name, b.address).established {
                value.flags = 0;
            }
            wanted.insert((service.name.clone(), b.address), value);
        }
    }
    wanted
}

/// Builds a service's Maglev table over backend ids; backends that take no new
/// flows are left out.
pub fn build_ring(
    service: &Service,
    ids: &BTreeMap<(String, SocketAddr), (u32, Backend)>,
    availability: &dyn Fn(&str, SocketAddr) -> Availability,
) -> Result<Vec<u32>> {
    let identities: Vec<(u32, [u8; 20], u32)> = service
        .backends
        .iter()
        .map(|b| {
            let (id, v) = ids
                .get(&(service.name.clone(), b.address))
                .copied()
                .ok_or_else(|| anyhow!("backend {} has no id", b.address))?;
            let weight = if availability(&service.name, b.address).new_flows {
                b.weight
            } else {
                0
            };
            Ok((
                id,
                backend_identity(&addr_to_bytes(&v.addr), v.port, v.family),
                weight,
            ))
        })
        .collect::<Result<_>>()?;
    let inputs: Vec<MaglevInput<'_>> = identities
        .iter()
        .map(|(id, identity, weight)| MaglevInput {
            id: *id,
            identity,
            weight: *weight,
        })
        .collect();
    maglev::build(&inputs, service.ring_size)
        .map_err(|e| anyhow!("service {}: Maglev table: {e}", service.name))
}

/// Hands out small integer ids, preferring ones never used before so that a
/// freed id is not reused while stale connection-table entries may point at it.
#[derive(Debug)]
struct IdPool {
    limit: u32,
    next_fresh: u32,
    freed: BTreeSet<u32>,
}

impl IdPool {
    fn new(limit: u32) -> Self {
        Self {
            limit,
            next_fresh: 0,
            freed: BTreeSet::new(),
        }
    }

    fn alloc(&mut self) -> Option<u32> {
        if self.next_fresh < self.limit {
            self.next_fresh += 1;
            return Some(self.next_fresh - 1);
        }
        self.freed.pop_first()
    }

    fn free(&mut self, id: u32) {
        self.freed.insert(id);
    }

    /// Marks `id` as in use (taken over from a previous agent).
    fn take(&mut self, id: u32) {
        if id >= self.next_fresh {
            self.freed.extend(self.next_fresh..id);
            self.next_fresh = id + 1;
        } else {
            self.freed.remove(&id);
        }
    }
}

/// What one `apply` changed, for logs and tests.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ApplySummary {
    /// Services that were new or whose table or flags changed.
    pub services_changed: usize,
    /// Services removed.
    pub services_removed: usize,
    /// Backends added.
    pub backends_added: usize,
    /// Backends removed.
    pub backends_removed: usize,
}

/// The configuration currently in the data plane, with its id assignments.
pub struct Balancer {
    dataplane: Dataplane,
    vip_pool: IdPool,
    backend_pool: IdPool,
    /// (VIP address, protocol number) -> (id, published table, flags).
    vips: BTreeMap<(SocketAddr, u8), (u32, Vec<u32>, u32)>,
    /// (service, backend address) -> (id, value written to its slot).
    backends: BTreeMap<(String, SocketAddr), (u32, Backend)>,
    /// Current generation of each VIP id (see `VipState`).
    generations: Vec<u32>,
    /// What `BACKEND_ADDRS` holds; `None` until read from the map (a previous
    /// agent may have left entries there).
    backend_addrs: Option<BTreeMap<AddrKey, u8>>,
    /// What `VIP_ADDRS` holds; `None` until read from the map.
    vip_addrs: Option<BTreeMap<AddrKey, u8>>,
    /// What the deny lists hold; `None` until read from the maps.
    deny: Option<BTreeSet<IpPrefix>>,
    config: Option<Config>,
}

impl Balancer {
    /// Wraps a loaded data plane that has no services yet.
    pub fn new(dataplane: Dataplane) -> Self {
        Self {
            dataplane,
            vip_pool: IdPool::new(MAX_VIPS),
            backend_pool: IdPool::new(MAX_BACKENDS),
            vips: BTreeMap::new(),
            backends: BTreeMap::new(),
            generations: vec![0; MAX_VIPS as usize],
            backend_addrs: None,
            vip_addrs: None,
            deny: None,
            config: None,
        }
    }

    /// Takes over the ids, tables and generations a previous agent left in
    /// pinned maps, so that applying the same configuration changes nothing
    /// and established flows keep their backends. Entries that `config` no
    /// longer names are kept under placeholder names and removed by the next
    /// `apply`.
    pub fn adopt(&mut self, state: &PinnedState, config: &Config) {
        for (key, meta) in &state.vips {
            let vip = SocketAddr::new(addr_to_ip(&key.addr, key.family), key.port);
            let ring = state
                .rings
                .iter()
                .find(|(id, _)| *id == meta.vip_id)
                .map(|(_, r)| r.clone())
                .unwrap_or_default();
            self.vips
                .insert((vip, key.proto), (meta.vip_id, ring, meta.flags));
            self.vip_pool.take(meta.vip_id);
        }
        for &(id, generation) in &state.generations {
            if let Some(g) = self.generations.get_mut(id as usize) {
                *g = generation;
            }
        }
        for (id, b) in &state.backends {
            let service = config
                .services
                .iter()
                .find(|s| self.vip_id(s.vip, s.protocol) == Some(b.vip_id))
                .map(|s| s.name.clone())
                .unwrap_or_else(|| format!("#gone-{}", b.vip_id));
            let addr = SocketAddr::new(addr_to_ip(&b.addr, b.family), b.port);
            self.backends.insert((service, addr), (*id, *b));
            self.backend_pool.take(*id);
        }
    }

    /// The data plane, for counters and test runs.
    pub fn dataplane(&mut self) -> &mut Dataplane {
        &mut self.dataplane
    }

    /// The configuration in force, if any.
    pub fn config(&self) -> Option<&Config> {
        self.config.as_ref()
    }

    /// VIP id of a service address, if it is configured.
    pub fn vip_id(&self, vip: SocketAddr, protocol: Protocol) -> Option<u32> {
        self.vips.get(&(vip, protocol.number())).map(|v| v.0)
    }

    /// Backend id of a service's backend, if it is configured.
    pub fn backend_id(&self, service: &str, addr: SocketAddr) -> Option<u32> {
        self.backends
            .get(&(service.to_string(), addr))
            .map(|(id, _)| *id)
    }

    /// Makes the data plane match `config` with every backend in full service.
    pub fn apply(&mut self, config: &Config) -> Result<ApplySummary> {
        self.apply_with(config, &|_, _| Availability::FULL)
    }

    /// Makes the data plane match `config` and each backend's availability,
    /// touching only what differs.
    pub fn apply_with(
        &mut self,
        config: &Config,
        availability: &dyn Fn(&str, SocketAddr) -> Availability,
    ) -> Result<ApplySummary> {
        let mut summary = ApplySummary::default();
        // Outer sources first: an ipip VIP must never be published without one.
        self.sync_encap_sources(config)?;
        let vip_ids = self.vip_ids(config)?;
        let wanted = wanted_backends(config, &vip_ids, availability);
        self.add_backends(&wanted, &mut summary)?;
        let keep = self.publish_services(config, &vip_ids, availability, &mut summary)?;
        self.remove_services(&keep, &mut summary)?;
        self.retire_backends(&wanted, &mut summary)?;
        self.sync_addr_sets()?;
        self.sync_deny_and_settings(config)?;
        self.config = Some(config.clone());
        Ok(summary)
    }

    /// Step 0: every service's VIP id, new ones allocated (published in step 2).
    fn vip_ids(&mut self, config: &Config) -> Result<BTreeMap<(SocketAddr, u8), u32>> {
        let mut vip_ids = BTreeMap::new();
        for service in &config.services {
            let key = (service.vip, service.protocol.number());
            let id = match self.vips.get(&key) {
                Some((id, ..)) => *id,
                None => self
                    .vip_pool
                    .alloc()
                    .ok_or_else(|| anyhow!("more than {MAX_VIPS} services"))?,
            };
            vip_ids.insert(key, id);
        }
        Ok(vip_ids)
    }

    /// Step 1: new backends, and backends becoming usable again, get a valid
    /// slot before any table names them.
    fn add_backends(
        &mut self,
        wanted: &BTreeMap<(String, SocketAddr), Backend>,
        summary: &mut ApplySummary,
    ) -> Result<()> {
        for (key, value) in wanted {
            match self.backends.get(key).copied() {
                None => {
                    let id = self
                        .backend_pool
                        .alloc()
                        .ok_or_else(|| anyhow!("more than {MAX_BACKENDS} backends"))?;
                    self.dataplane.set_backend(id, value)?;
                    self.backends.insert(key.clone(), (id, *value));
                    summary.backends_added += 1;
                }
                Some((id, old)) if old != *value && value.flags == BACKEND_F_VALID => {
                    self.dataplane.set_backend(id, value)?;
                    self.backends.insert(key.clone(), (id, *value));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Step 2: each changed service's table first, then the VIP entry that
    /// makes it reachable; returns the services in force.
    fn publish_services(
        &mut self,
        config: &Config,
        vip_ids: &BTreeMap<(SocketAddr, u8), u32>,
        availability: &dyn Fn(&str, SocketAddr) -> Availability,
        summary: &mut ApplySummary,
    ) -> Result<BTreeSet<(SocketAddr, u8)>> {
        let mut keep = BTreeSet::new();
        for service in &config.services {
            let key = (service.vip, service.protocol.number());
            keep.insert(key);
            let ring = build_ring(service, &self.backends, availability)?;
            let flags = vip_flags(service);
            let (id, new_generation, old_flags) = match self.vips.get(&key) {
                Some((_, old_ring, old_flags)) if *old_ring == ring && *old_flags == flags => {
                    continue;
                }
                // Only the table or the hash changed: flows stay pinned
                // where they are (new ones get the new hash).
                Some((id, _, old_flags)) if same_mode(*old_flags, flags) => {
                    (*id, false, *old_flags)
                }
                // The mode changed: established flows must be looked up afresh.
                Some((id, _, old_flags)) => (*id, true, *old_flags),
                None => (vip_ids[&key], true, flags),
            };
            if new_generation {
                self.bump_generation(id, flags)?;
            } else if old_flags != flags {
                self.set_flags(id, flags)?;
            }
            self.dataplane
                .publish_ring(id, &ring)
                .with_context(|| format!("service {}", service.name))?;
            self.dataplane.set_vip(
                &vip_key(service.vip, service.protocol),
                &VipMeta { vip_id: id, flags },
            )?;
            info!(service = %service.name, vip = %service.vip, vip_id = id, backends = service.backends.len(), "service published");
            self.vips.insert(key, (id, ring, flags));
            summary.services_changed += 1;
        }
        Ok(keep)
    }

    /// Step 3: services not in `keep`: unreachable first, then their tables.
    fn remove_services(
        &mut self,
        keep: &BTreeSet<(SocketAddr, u8)>,
        summary: &mut ApplySummary,
    ) -> Result<()> {
        let gone: Vec<_> = self
            .vips
            .keys()
            .filter(|k| !keep.contains(*k))
            .copied()
            .collect();
        for key in gone {
            if let Some((id, ..)) = self.vips.remove(&key) {
                let protocol = if key.1 == Protocol::Udp.number() {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                };
                self.dataplane.remove_vip(&vip_key(key.0, protocol))?;
                // Flows of the removed VIP stop being forwarded.
                self.bump_generation(id, 0)?;
                self.dataplane.remove_ring(id)?;
                self.vip_pool.free(id);
                info!(vip = %key.0, "service removed");
                summary.services_removed += 1;
            }
        }
        Ok(())
    }

    /// Step 4, now that no table names them: backends that left, and
    /// backends whose established flows must move, lose their valid slot,
    /// so flows pinned to them re-hash to live backends.
    fn retire_backends(
        &mut self,
        wanted: &BTreeMap<(String, SocketAddr), Backend>,
        summary: &mut ApplySummary,
    ) -> Result<()> {
        let current: Vec<_> = self.backends.iter().map(|(k, v)| (k.clone(), *v)).collect();
        for (key, (id, old)) in current {
            match wanted.get(&key) {
                None => {
                    self.dataplane.set_backend(id, &Backend::default())?;
                    self.dataplane.retire_backend_stats(id, old.vip_id)?;
                    self.backends.remove(&key);
                    self.backend_pool.free(id);
                    summary.backends_removed += 1;
                }
                Some(value) if *value != old => {
                    self.dataplane.set_backend(id, value)?;
                    self.backends.insert(key, (id, *value));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Writes the outer source of `ipip` packets for each family: the
    /// configured one, else (when an ipip service of that family needs it)
    /// the first address of that family on the attached interfaces.
    fn sync_encap_sources(&mut self, config: &Config) -> Result<()> {
        for (v6, configured, index) in [
            (false, config.encap_source_v4, ENCAP_SRC_V4),
            (true, config.encap_source_v6, ENCAP_SRC_V6),
        ] {
            let needed = config
                .services
                .iter()
                .any(|s| s.forwarding == Forwarding::Ipip && s.vip.is_ipv6() == v6);
            let prefix = match configured {
                Some(p) => Some(p),
                None if needed => {
                    let ip = crate::dataplane::interface_addresses(&config.interfaces)?
                        .into_iter()
                        .find(|ip| ip.is_ipv6() == v6)
                        .ok_or_else(|| {
                            anyhow!(
                                "an ipip service is IPv{} but no interface in `interfaces` has an IPv{} address to send from; set encap_source_v{}",
                                if v6 { 6 } else { 4 },
                                if v6 { 6 } else { 4 },
                                if v6 { 6 } else { 4 }
                            )
                        })?;
                    Some(IpPrefix {
                        addr: ip,
                        len: if v6 { 128 } else { 32 },
                    })
                }
                None => None,
            };
            if let Some(prefix) = prefix {
                self.dataplane
                    .set_encap_source(index, &encap_source(&prefix))?;
            }
        }
        Ok(())
    }

    /// Makes the deny lists hold exactly `config.deny` and writes `SETTINGS`.
    /// New prefixes go in before the settings say the list is not empty, and
    /// their clients' established flows are removed after (the data plane
    /// checks the list only on packets that miss FLOWS).
    fn sync_deny_and_settings(&mut self, config: &Config) -> Result<()> {
        let wanted: BTreeSet<IpPrefix> = config.deny.iter().copied().collect();
        let current = match self.deny.take() {
            Some(set) => set,
            None => self.dataplane.deny_list()?,
        };
        let added: Vec<IpPrefix> = wanted.difference(&current).copied().collect();
        for prefix in &added {
            self.dataplane.add_deny(prefix)?;
        }
        let settings = Settings {
            new_flow_limit: config.new_flow_limit,
            deny_v4: wanted.iter().filter(|p| p.addr.is_ipv4()).count() as u32,
            deny_v6: wanted.iter().filter(|p| p.addr.is_ipv6()).count() as u32,
            // Kept here; bumped below, once everything else is in place.
            flow_epoch: self.dataplane.flow_epoch()?,
        };
        self.dataplane.set_settings(&settings)?;
        for prefix in current.difference(&wanted) {
            self.dataplane.remove_deny(prefix)?;
        }
        self.deny = Some(wanted);
        if !added.is_empty() {
            let removed = self.dataplane.remove_flows_from(&added)?;
            info!(
                prefixes = added.len(),
                flow_entries = removed,
                "deny list extended; the denied clients' flows were removed"
            );
        }
        // Last: the data plane's flow caches stop trusting what they copied
        // before any of this apply's changes.
        self.dataplane.bump_flow_epoch()
    }

    /// Makes `BACKEND_ADDRS` hold exactly the configured backends' addresses
    /// (whatever their state: a drained backend is still not a client), and
    /// `VIP_ADDRS` the `l4` VIPs' (pings to them are answered from XDP).
    fn sync_addr_sets(&mut self) -> Result<()> {
        let backends: BTreeMap<AddrKey, u8> = self
            .backends
            .values()
            .map(|(_, b)| (addr_key(b.addr, b.family), 1))
            .collect();
        let vips = vip_addrs(self.vips.iter().map(|((vip, _), (_, _, f))| (vip.ip(), *f)));
        for (set, wanted) in [(AddrSet::Backends, backends), (AddrSet::Vips, vips)] {
            let known = match set {
                AddrSet::Backends => &mut self.backend_addrs,
                AddrSet::Vips => &mut self.vip_addrs,
            };
            let current = match known.take() {
                Some(known) => known,
                None => self.dataplane.addrs(set)?.into_iter().collect(),
            };
            for (key, value) in &wanted {
                if current.get(key) != Some(value) {
                    self.dataplane.add_addr(set, key, *value)?;
                }
            }
            for key in current.keys().filter(|k| !wanted.contains_key(k)) {
                self.dataplane.remove_addr(set, key)?;
            }
            match set {
                AddrSet::Backends => self.backend_addrs = Some(wanted),
                AddrSet::Vips => self.vip_addrs = Some(wanted),
            }
        }
        Ok(())
    }

    /// Gives a VIP id's state new flags in its current generation: its flows stay valid.
    fn set_flags(&mut self, vip_id: u32, flags: u32) -> Result<()> {
        let generation = *self
            .generations
            .get(vip_id as usize)
            .ok_or_else(|| anyhow!("VIP id {vip_id} out of range"))?;
        self.dataplane
            .set_vip_state(vip_id, &VipState { generation, flags })
    }

    /// Starts a new generation of a VIP id, invalidating flows created under the old one.
    fn bump_generation(&mut self, vip_id: u32, flags: u32) -> Result<()> {
        let generation = self
            .generations
            .get_mut(vip_id as usize)
            .ok_or_else(|| anyhow!("VIP id {vip_id} out of range"))?;
        *generation = generation.wrapping_add(1);
        let state = VipState {
            generation: *generation,
            flags,
        };
        self.dataplane.set_vip_state(vip_id, &state)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use lb_common::FAMILY_V6;

    #[test]
    fn vip_addresses_are_the_l4_ones_marked_local_where_an_l7_shares_them() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let key = |s: &str| {
            let (addr, family) = ip_to_addr(ip(s));
            addr_key(addr, family)
        };
        let got = vip_addrs(
            [
                (ip("198.18.100.1"), 0),
                (ip("198.18.100.1"), VIP_F_L7),
                (ip("198.18.100.2"), VIP_F_L2),
                (ip("198.18.100.2"), VIP_F_IPIP),
                (ip("fd00:18:100::1"), VIP_F_L7),
            ]
            .into_iter(),
        );
        let want = BTreeMap::from([
            (key("198.18.100.1"), VIP_ADDR_L4 | VIP_ADDR_LOCAL),
            (key("198.18.100.2"), VIP_ADDR_L4),
        ]);
        assert_eq!(got, want, "an l7-only address is the stack's alone");
    }

    #[test]
    fn id_pool_takes_over_ids_in_use() {
        let mut pool = IdPool::new(10);
        pool.take(3);
        pool.take(1);
        let got: Vec<_> = (0..3).filter_map(|_| pool.alloc()).collect();
        assert_eq!(got, vec![4, 5, 6], "fresh ids first, above those in use");
        let mut pool = IdPool::new(5);
        pool.take(2);
        let got: Vec<_> = (0..4).filter_map(|_| pool.alloc()).collect();
        assert_eq!(got, vec![3, 4, 0, 1]);
    }

    #[test]
    fn id_pool_prefers_fresh_ids() {
        let mut pool = IdPool::new(3);
        assert_eq!(pool.alloc(), Some(0));
        assert_eq!(pool.alloc(), Some(1));
        pool.free(0);
        assert_eq!(pool.alloc(), Some(2));
        assert_eq!(pool.alloc(), Some(0));
        assert_eq!(pool.alloc(), None);
    }

    #[test]
    fn addresses_use_the_shared_layout() {
        let (b, f) = ip_to_addr("198.18.2.11".parse().unwrap());
        assert_eq!(f, FAMILY_V4);
        let b = addr_to_bytes(&b);
        assert_eq!(&b[..4], &[198, 18, 2, 11]);
        assert!(b[4..].iter().all(|&x| x == 0));
        let key = vip_key("[fd00:18:100::1]:80".parse().unwrap(), Protocol::Udp);
        assert_eq!(key.family, FAMILY_V6);
        assert_eq!(key.port, 80);
        assert_eq!(key.proto, 17);
        assert_eq!(addr_to_bytes(&key.addr)[0], 0xfd);
    }
}
