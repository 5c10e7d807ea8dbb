//! The XDP data plane as seen from userspace: loads the `lb-xdp` object, attaches
//! it, and reads and writes its maps. Map layouts are defined in `lb_common::maps`.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{
        Array, HashMap, MapData, PerCpuArray, PerCpuValues, ProgramArray,
        lpm_trie::{Key, LpmTrie},
    },
    programs::{Xdp, XdpMode},
};
use lb_common::{
    ALL_MAPS, Addr, AddrKey, Backend, BackendHop, DenyKeyV4, DenyKeyV6, EncapSource, FAMILY_V4,
    FAMILY_V6, FLOW_CACHE_SLOTS, FLOW_TO_BACKEND, Flow, FlowKey, IF_MAC_PROBES, IfMac,
    MAP_BACKEND_ADDRS, MAP_BACKEND_PATHS, MAP_BACKENDS, MAP_DENY_V4, MAP_DENY_V6,
    MAP_ENCAP_SOURCES, MAP_FLOW_CACHE, MAP_FLOWS, MAP_IF_MACS, MAP_PENDING, MAP_PROGS,
    MAP_REASON_STATS, MAP_RINGS, MAP_SETTINGS, MAP_UDP_FLOWS, MAP_VIP_ADDRS, MAP_VIP_STATE,
    MAP_VIP_STATS, MAP_VIPS, MAX_BACKENDS, MAX_RING_SIZE, MAX_VIPS, PROG_FULL_SLOT, PROG_LB,
    PROG_LB_FULL, PROTO_UDP, REASON_COUNT, Reason, Ring, Settings, Traffic, VipKey, VipMeta,
    VipState, addr_from_bytes, addr_to_bytes, if_mac_slot,
};
use tracing::warn;

use crate::config::{IpPrefix, XdpModeSetting};

/// An IP address and its family in the data plane's layout.
pub fn ip_to_addr(ip: IpAddr) -> (Addr, u8) {
    let mut bytes = [0u8; 16];
    let family = match ip {
        IpAddr::V4(v4) => {
            bytes[..4].copy_from_slice(&v4.octets());
            FAMILY_V4
        }
        IpAddr::V6(v6) => {
            bytes = v6.octets();
            FAMILY_V6
        }
    };
    (addr_from_bytes(bytes), family)
}

/// The IP address of an `Addr` of the given family.
pub fn addr_to_ip(addr: &Addr, family: u8) -> IpAddr {
    let b = addr_to_bytes(addr);
    if family == FAMILY_V4 {
        IpAddr::from([b[0], b[1], b[2], b[3]])
    } else {
        IpAddr::from(b)
    }
}

/// The data plane's sets of addresses (hash maps of `AddrKey`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddrSet {
    /// Every configured backend's address (`BACKEND_ADDRS`).
    Backends,
    /// Every `l4` VIP's address (`VIP_ADDRS`), valued `VIP_ADDR_*`.
    Vips,
}

/// Where the `lb-xdp` object is looked for when no path is given.
pub fn default_object_path() -> Result<PathBuf> {
    if let Some(path) = std::env::var_os("LB_BPF_OBJECT") {
        return Ok(PathBuf::from(path));
    }
    // Installed next to the `lb` binary, or in the workspace's xtask output.
    let mut candidates = Vec::new();
    if let Ok(exe) = std::env::current_exe()
        && let Some(dir) = exe.parent()
    {
        candidates.push(dir.join("lb-xdp"));
    }
    candidates.push(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../target/ebpf/bpfel-unknown-none/release/lb-xdp"),
    );
    candidates.into_iter().find(|p| p.exists()).ok_or_else(|| {
        anyhow!("cannot find the lb-xdp eBPF object: build it with `cargo xtask build` or set LB_BPF_OBJECT")
    })
}

/// How an interface ended up attached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttachedMode {
    /// Native (driver) XDP.
    Driver,
    /// Generic (skb) XDP: works everywhere, slower.
    Generic,
    /// Whatever the kernel chose.
    Auto,
}

/// Contents of pinned maps that identify what a previous agent set up.
#[derive(Debug, Clone, Default)]
pub struct PinnedState {
    /// VIP map entries.
    pub vips: Vec<(VipKey, VipMeta)>,
    /// Non-zero VIP generations by VIP id.
    pub generations: Vec<(u32, u32)>,
    /// Occupied backend slots.
    pub backends: Vec<(u32, Backend)>,
    /// Published rings by VIP id.
    pub rings: Vec<(u32, Vec<u32>)>,
}

impl PinnedState {
    /// True when nothing was set up (fresh maps).
    pub fn is_empty(&self) -> bool {
        self.vips.is_empty() && self.backends.is_empty() && self.generations.is_empty()
    }
}

/// Per-CPU counters summed over CPUs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Counters {
    /// Indexed by VIP id.
    pub vips: Vec<Traffic>,
    /// Indexed by backend id.
    pub backends: Vec<Traffic>,
    /// Indexed by `Reason as usize`.
    pub reasons: Vec<Traffic>,
}

impl Counters {
    /// Counter of one decision reason.
    pub fn reason(&self, reason: Reason) -> Traffic {
        self.reasons
            .get(reason as usize)
            .copied()
            .unwrap_or_default()
    }
}

/// The loaded program and its maps.
pub struct Dataplane {
    bpf: Ebpf,
    /// Links owned here rather than by the program, so dropping the data plane
    /// leaves pinned attachments in place (closing a pinned link's fd does not
    /// detach it; an unpinned one detaches).
    links: Vec<aya::programs::links::FdLink>,
    vips: HashMap<MapData, VipKey, VipMeta>,
    rings: HashMap<MapData, u32, Ring>,
    backends: Array<MapData, Backend>,
    vip_state: Array<MapData, VipState>,
    /// TCP connections (`FLOWS`).
    flows: HashMap<MapData, FlowKey, Flow>,
    /// UDP flows (`UDP_FLOWS`).
    udp_flows: HashMap<MapData, FlowKey, Flow>,
    pending: HashMap<MapData, FlowKey, Flow>,
    settings: Array<MapData, Settings>,
    encap_sources: Array<MapData, EncapSource>,
    deny_v4: LpmTrie<MapData, DenyKeyV4, u8>,
    deny_v6: LpmTrie<MapData, DenyKeyV6, u8>,
    vip_stats: PerCpuArray<MapData, Traffic>,
    backend_paths: PerCpuArray<MapData, BackendHop>,
    reason_stats: PerCpuArray<MapData, Traffic>,
    /// Slots of REASON_STATS as the kernel has it: fewer than `REASON_COUNT`
    /// when an older agent pinned it (aya reuses a pinned map as it is).
    reason_slots: u32,
    backend_addrs: HashMap<MapData, AddrKey, u8>,
    vip_addrs: HashMap<MapData, AddrKey, u8>,
    if_macs: Array<MapData, IfMac>,
    /// Holds `lb_xdp_full` while this data plane lives (pinned too, for after).
    progs: ProgramArray<MapData>,
}

/// A zeroed `Ring` built directly on the heap: at 256 KiB it would overflow
/// a thread's stack if built there first.
fn zeroed_ring() -> Box<Ring> {
    let layout = std::alloc::Layout::new::<Ring>();
    // SAFETY: Ring is plain old data for which all-zero bytes are a valid value,
    // and the layout is Ring's own, so Box may own and free the allocation.
    unsafe {
        let ptr = std::alloc::alloc_zeroed(layout).cast::<Ring>();
        if ptr.is_null() {
            std::alloc::handle_alloc_error(layout);
        }
        Box::from_raw(ptr)
    }
}

fn take<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    bpf: &mut Ebpf,
    name: &str,
) -> Result<T> {
    let map = bpf
        .take_map(name)
        .ok_or_else(|| anyhow!("eBPF object has no map {name}"))?;
    T::try_from(map).with_context(|| format!("map {name} has an unexpected type"))
}

impl Dataplane {
    /// Loads the object at `path` into the kernel (verifier included) without attaching it.
    pub fn load(path: &Path) -> Result<Self> {
        Self::load_with(path, None)
    }

    /// Like `load`, with every map pinned in `pin_dir`: maps already pinned
    /// there (by a previous agent) are reused with their contents, the others
    /// are created and pinned.
    pub fn load_pinned(path: &Path, pin_dir: &Path) -> Result<Self> {
        pin::ensure_dir(pin_dir)?;
        Self::load_with(path, Some(pin_dir))
    }

    /// Whether the object at `path` can adopt the maps pinned in `pin_dir`
    /// (`pin::check_compatible`), without loading anything.
    pub fn check_pins(path: &Path, pin_dir: &Path) -> Result<()> {
        // REASON_STATS: an older agent's has fewer slots (`reason_slots`).
        let any_entries = [MAP_FLOW_CACHE, MAP_REASON_STATS];
        pin::check_compatible(path, pin_dir, &ALL_MAPS, &any_entries, "lb stop --detach")
    }

    fn load_with(path: &Path, pin_dir: Option<&Path>) -> Result<Self> {
        let mut loader = aya::EbpfLoader::new();
        // FLOW_CACHE_SLOTS for every CPU that may run the program.
        let cpus = aya::util::nr_cpus().map_err(|(what, e)| anyhow!("{what}: {e}"))?;
        loader.map_max_entries(MAP_FLOW_CACHE, FLOW_CACHE_SLOTS * cpus as u32);
        let pins: Vec<(&str, PathBuf)> = pin_dir
            .map(|dir| ALL_MAPS.iter().map(|m| (*m, dir.join(m))).collect())
            .unwrap_or_default();
        if let Some(dir) = pin_dir {
            Self::check_pins(path, dir)?;
        }
        for (name, pin) in &pins {
            loader.map_pin_path(name, pin.as_path());
        }
        let mut bpf = loader
            .load_file(path)
            .with_context(|| format!("loading eBPF object {}", path.display()))?;
        // The full data plane first: the attached program tail-calls it.
        let full: &mut Xdp = bpf
            .program_mut(PROG_LB_FULL)
            .ok_or_else(|| anyhow!("eBPF object has no program {PROG_LB_FULL}"))?
            .try_into()?;
        full.load()
            .context("the kernel refused the XDP program (lb_xdp_full)")?;
        let full_fd = full.fd()?.try_clone()?;
        let mut progs: ProgramArray<MapData> = take(&mut bpf, MAP_PROGS)?;
        progs
            .set(PROG_FULL_SLOT, &full_fd, 0)
            .context("putting lb_xdp_full into PROGS")?;
        let prog: &mut Xdp = bpf
            .program_mut(PROG_LB)
            .ok_or_else(|| anyhow!("eBPF object has no program {PROG_LB}"))?
            .try_into()?;
        prog.load().context("the kernel refused the XDP program")?;
        let reasons = bpf
            .take_map(MAP_REASON_STATS)
            .ok_or_else(|| anyhow!("eBPF object has no map {MAP_REASON_STATS}"))?;
        let reason_slots = match &reasons {
            aya::maps::Map::PerCpuArray(data) => data
                .info()
                .map_or(REASON_COUNT, |i| i.max_entries().min(REASON_COUNT)),
            _ => REASON_COUNT,
        };
        let reason_stats = PerCpuArray::try_from(reasons)
            .with_context(|| format!("map {MAP_REASON_STATS} has an unexpected type"))?;
        Ok(Self {
            vips: take(&mut bpf, MAP_VIPS)?,
            rings: take(&mut bpf, MAP_RINGS)?,
            backends: take(&mut bpf, MAP_BACKENDS)?,
            vip_state: take(&mut bpf, MAP_VIP_STATE)?,
            flows: take(&mut bpf, MAP_FLOWS)?,
            udp_flows: take(&mut bpf, MAP_UDP_FLOWS)?,
            pending: take(&mut bpf, MAP_PENDING)?,
            settings: take(&mut bpf, MAP_SETTINGS)?,
            encap_sources: take(&mut bpf, MAP_ENCAP_SOURCES)?,
            deny_v4: take(&mut bpf, MAP_DENY_V4)?,
            deny_v6: take(&mut bpf, MAP_DENY_V6)?,
            vip_stats: take(&mut bpf, MAP_VIP_STATS)?,
            backend_paths: take(&mut bpf, MAP_BACKEND_PATHS)?,
            reason_stats,
            reason_slots,
            backend_addrs: take(&mut bpf, MAP_BACKEND_ADDRS)?,
            vip_addrs: take(&mut bpf, MAP_VIP_ADDRS)?,
            if_macs: take(&mut bpf, MAP_IF_MACS)?,
            progs,
            bpf,
            links: Vec::new(),
        })
    }

    /// Empties `PROGS`: the attached program then forwards established
    /// flows alone and passes the rest (for tests of its fast path).
    pub fn unload_full_program(&mut self) -> Result<()> {
        self.progs
            .clear_index(&PROG_FULL_SLOT)
            .context("emptying PROGS")
    }

    /// The XDP program, e.g. for `aya::programs::TestRun`.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .bpf
            .program_mut(PROG_LB)
            .ok_or_else(|| anyhow!("eBPF object has no program {PROG_LB}"))?
            .try_into()?)
    }

    /// Attaches to `iface` and pins the attachment at `pin`; if a previous
    /// agent left one pinned there, the program in it is replaced atomically
    /// instead (no packet is missed). The attachment outlives this process.
    pub fn attach_pinned(
        &mut self,
        iface: &str,
        mode: XdpModeSetting,
        pin: &Path,
    ) -> Result<Option<AttachedMode>> {
        use aya::programs::links::{FdLink, PinnedLink};
        if pin.exists() {
            let link = PinnedLink::from_pin(pin)
                .with_context(|| format!("opening pinned link {}", pin.display()))?;
            let fd: FdLink = link.into();
            let xdp_link = aya::programs::xdp::XdpLink::try_from(fd)
                .map_err(|e| anyhow!("pinned link {} is not an XDP link: {e}", pin.display()))?;
            let prog = self.program()?;
            let id = prog
                .attach_to_link(xdp_link)
                .with_context(|| format!("replacing the program attached to {iface}"))?;
            let link = prog.take_link(id)?;
            self.links.push(FdLink::try_from(link)?);
            return Ok(None);
        }
        let (mode, id) = self.attach_link(iface, mode)?;
        let link = self.program()?.take_link(id)?;
        match FdLink::try_from(link) {
            Ok(fd) => {
                let pinned = fd
                    .pin(pin)
                    .with_context(|| format!("pinning the link of {iface} at {}", pin.display()))?;
                self.links.push(pinned.into());
            }
            Err(e) => {
                warn!(%iface, error = %e, "this attachment cannot be pinned; it ends with the agent")
            }
        }
        Ok(Some(mode))
    }

    /// Attaches to `iface`; in driver mode falls back to generic with a warning.
    fn attach_link(
        &mut self,
        iface: &str,
        mode: XdpModeSetting,
    ) -> Result<(AttachedMode, aya::programs::xdp::XdpLinkId)> {
        let prog = self.program()?;
        match mode {
            XdpModeSetting::Generic => {
                let id = prog
                    .attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP (generic) to {iface}"))?;
                Ok((AttachedMode::Generic, id))
            }
            XdpModeSetting::Auto => {
                let id = prog
                    .attach(iface, XdpMode::Default)
                    .with_context(|| format!("attaching XDP to {iface}"))?;
                Ok((AttachedMode::Auto, id))
            }
            XdpModeSetting::Driver => match prog.attach(iface, XdpMode::Driver) {
                Ok(id) => Ok((AttachedMode::Driver, id)),
                Err(err) => {
                    warn!(%iface, error = %err, "native XDP attach failed; falling back to generic (skb) mode, which is slower");
                    let id = prog
                        .attach(iface, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP (generic) to {iface}"))?;
                    Ok((AttachedMode::Generic, id))
                }
            },
        }
    }

    /// Inserts or replaces a VIP.
    pub fn set_vip(&mut self, key: &VipKey, meta: &VipMeta) -> Result<()> {
        if meta.vip_id >= MAX_VIPS {
            bail!("VIP id {} out of range", meta.vip_id);
        }
        self.vips.insert(key, meta, 0).context("updating VIPS")
    }

    /// Writes a VIP's generation and flags, against which flows are validated.
    pub fn set_vip_state(&mut self, vip_id: u32, state: &VipState) -> Result<()> {
        if vip_id >= MAX_VIPS {
            bail!("VIP id {vip_id} out of range");
        }
        self.vip_state
            .set(vip_id, state, 0)
            .context("updating VIP_STATE")
    }

    /// Removes a VIP; its packets pass to the kernel from now on.
    pub fn remove_vip(&mut self, key: &VipKey) -> Result<()> {
        self.vips.remove(key).context("removing from VIPS")
    }

    /// Writes one backend slot.
    pub fn set_backend(&mut self, id: u32, backend: &Backend) -> Result<()> {
        if id >= MAX_BACKENDS {
            bail!("backend id {id} out of range");
        }
        self.backends
            .set(id, backend, 0)
            .context("updating BACKENDS")
    }

    fn addr_map(&mut self, set: AddrSet) -> (&mut HashMap<MapData, AddrKey, u8>, &'static str) {
        match set {
            AddrSet::Backends => (&mut self.backend_addrs, MAP_BACKEND_ADDRS),
            AddrSet::Vips => (&mut self.vip_addrs, MAP_VIP_ADDRS),
        }
    }

    /// Puts an address, with its value, in one of the data plane's address sets.
    pub fn add_addr(&mut self, set: AddrSet, key: &AddrKey, value: u8) -> Result<()> {
        let (map, name) = self.addr_map(set);
        map.insert(key, value, 0)
            .with_context(|| format!("updating {name}"))
    }

    /// Removes an address from that set (absent is fine).
    pub fn remove_addr(&mut self, set: AddrSet, key: &AddrKey) -> Result<()> {
        let (map, name) = self.addr_map(set);
        match map.remove(key) {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing from {name}")),
        }
    }

    /// Every address in that set with its value (e.g. as a previous agent left it).
    pub fn addrs(&mut self, set: AddrSet) -> Result<Vec<(AddrKey, u8)>> {
        let (map, name) = self.addr_map(set);
        map.iter()
            .map(|kv| kv.with_context(|| format!("reading {name}")))
            .collect()
    }

    /// Records `mac` as the own address of interface `ifindex`: forwarded
    /// frames arriving there must be sent to it.
    pub fn set_interface_mac(&mut self, ifindex: u32, mac: [u8; 6]) -> Result<()> {
        let mut free = None;
        for k in 0..IF_MAC_PROBES {
            let slot = if_mac_slot(ifindex, k);
            let entry = self.if_macs.get(&slot, 0).context("reading IF_MAC_TABLE")?;
            if entry.set != 0 && entry.ifindex == ifindex {
                free = Some(slot);
                break;
            }
            if entry.set == 0 {
                // The data plane stops at the first empty slot.
                free = Some(slot);
                break;
            }
        }
        let Some(slot) = free else {
            bail!(
                "interface index {ifindex}: its {IF_MAC_PROBES} slots in {MAP_IF_MACS} are taken by other interfaces"
            );
        };
        let value = IfMac {
            ifindex,
            mac,
            set: 1,
            pad: 0,
        };
        self.if_macs
            .set(slot, value, 0)
            .context("updating IF_MAC_TABLE")
    }

    /// Publishes a VIP's Maglev table in one map update (an RCU swap of the whole
    /// element in the kernel), so no packet ever sees a half-written table.
    pub fn publish_ring(&mut self, vip_id: u32, entries: &[u32]) -> Result<()> {
        if entries.len() > MAX_RING_SIZE {
            bail!("ring of {} entries exceeds {MAX_RING_SIZE}", entries.len());
        }
        let mut ring = zeroed_ring();
        ring.size = entries.len() as u32;
        ring.entries[..entries.len()].copy_from_slice(entries);
        self.rings
            .insert(vip_id, ring.as_ref(), 0)
            .context("publishing ring")
    }

    /// Drops a VIP's table.
    pub fn remove_ring(&mut self, vip_id: u32) -> Result<()> {
        self.rings.remove(&vip_id).context("removing ring")
    }

    /// Reads the ring currently published for a VIP (`None` if none).
    pub fn ring(&self, vip_id: u32) -> Result<Option<Vec<u32>>> {
        match self.rings.get(&vip_id, 0) {
            // A size beyond the table (a damaged pin) is an error, not a panic.
            Ok(ring) => match ring.entries.get(..ring.size as usize) {
                Some(entries) => Ok(Some(entries.to_vec())),
                None => bail!("ring of VIP {vip_id} claims {} entries", ring.size),
            },
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading ring"),
        }
    }

    /// What a previous agent left in pinned maps, for a new agent to adopt.
    pub fn pinned_state(&self) -> Result<PinnedState> {
        let mut state = PinnedState::default();
        for entry in self.vips.iter() {
            let (key, meta) = entry.context("reading VIPS")?;
            state.vips.push((key, meta));
        }
        for id in 0..MAX_VIPS {
            let s = self.vip_state.get(&id, 0).context("reading VIP_STATE")?;
            if s.generation != 0 {
                state.generations.push((id, s.generation));
            }
        }
        for id in 0..MAX_BACKENDS {
            let b = self.backends.get(&id, 0).context("reading BACKENDS")?;
            if b.family != 0 {
                state.backends.push((id, b));
            }
        }
        for (_, meta) in &state.vips {
            if let Some(ring) = self.ring(meta.vip_id)? {
                state.rings.push((meta.vip_id, ring));
            }
        }
        Ok(state)
    }

    /// The flow table of `proto`'s flows, with its name (as the data plane
    /// picks it: `UDP_FLOWS` for UDP, `FLOWS` for the rest).
    fn flow_table(&self, proto: u8) -> (&HashMap<MapData, FlowKey, Flow>, &'static str) {
        if proto == PROTO_UDP {
            (&self.udp_flows, MAP_UDP_FLOWS)
        } else {
            (&self.flows, MAP_FLOWS)
        }
    }

    /// The flow entry of one direction of a connection, if there is one.
    pub fn flow(&self, key: &FlowKey) -> Result<Option<Flow>> {
        let (table, name) = self.flow_table(key.proto);
        match table.get(key, 0) {
            Ok(f) => Ok(Some(f)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {name}")),
        }
    }

    /// Writes the flow entry of one direction (the data plane writes its
    /// own; tests age one with this).
    pub fn set_flow(&mut self, key: &FlowKey, flow: &Flow) -> Result<()> {
        let (table, name) = if key.proto == PROTO_UDP {
            (&mut self.udp_flows, MAP_UDP_FLOWS)
        } else {
            (&mut self.flows, MAP_FLOWS)
        };
        table
            .insert(key, flow, 0)
            .with_context(|| format!("writing {name}"))
    }

    /// The PENDING entry (unconfirmed TCP handshake) of one direction, if any.
    pub fn pending_flow(&self, key: &FlowKey) -> Result<Option<Flow>> {
        match self.pending.get(key, 0) {
            Ok(f) => Ok(Some(f)),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading PENDING"),
        }
    }

    /// Writes the data plane's settings (rate limit, deny list present).
    pub fn set_settings(&mut self, settings: &Settings) -> Result<()> {
        self.settings
            .set(0, settings, 0)
            .context("updating SETTINGS")
    }

    /// Bumps `Settings::flow_epoch`, so every CPU's `FLOW_CACHE` reads
    /// `FLOWS` afresh (after a change of backends, tables, VIPs or flows).
    pub fn bump_flow_epoch(&mut self) -> Result<()> {
        let mut settings = self.settings.get(&0, 0).context("reading SETTINGS")?;
        settings.flow_epoch = settings.flow_epoch.wrapping_add(1);
        self.set_settings(&settings)
    }

    /// The agent's flow epoch as the data plane has it.
    pub fn flow_epoch(&self) -> Result<u32> {
        Ok(self
            .settings
            .get(&0, 0)
            .context("reading SETTINGS")?
            .flow_epoch)
    }

    /// Writes the outer source of `ipip` packets of one family
    /// (`ENCAP_SRC_V4` or `ENCAP_SRC_V6`).
    pub fn set_encap_source(&mut self, index: u32, source: &EncapSource) -> Result<()> {
        self.encap_sources
            .set(index, source, 0)
            .with_context(|| format!("writing {MAP_ENCAP_SOURCES}[{index}]"))
    }

    /// Every prefix in the deny lists (e.g. as a previous agent left them).
    pub fn deny_list(&self) -> Result<std::collections::BTreeSet<IpPrefix>> {
        let mut out = std::collections::BTreeSet::new();
        for key in self.deny_v4.keys() {
            let key = key.context("reading DENY_V4")?;
            out.insert(IpPrefix {
                addr: std::net::IpAddr::from(key.data()),
                len: key.prefix_len() as u8,
            });
        }
        for key in self.deny_v6.keys() {
            let key = key.context("reading DENY_V6")?;
            out.insert(IpPrefix {
                addr: std::net::IpAddr::from(key.data()),
                len: key.prefix_len() as u8,
            });
        }
        Ok(out)
    }

    /// Adds a prefix to the deny list of its family.
    pub fn add_deny(&mut self, prefix: &IpPrefix) -> Result<()> {
        match prefix.addr {
            std::net::IpAddr::V4(a) => self
                .deny_v4
                .insert(&Key::new(prefix.len.into(), a.octets()), 1, 0)
                .context("updating DENY_V4"),
            std::net::IpAddr::V6(a) => self
                .deny_v6
                .insert(&Key::new(prefix.len.into(), a.octets()), 1, 0)
                .context("updating DENY_V6"),
        }
    }

    /// Removes a prefix from the deny list of its family.
    pub fn remove_deny(&mut self, prefix: &IpPrefix) -> Result<()> {
        let result = match prefix.addr {
            std::net::IpAddr::V4(a) => self
                .deny_v4
                .remove(&Key::new(prefix.len.into(), a.octets())),
            std::net::IpAddr::V6(a) => self
                .deny_v6
                .remove(&Key::new(prefix.len.into(), a.octets())),
        };
        match result {
            Ok(()) | Err(aya::maps::MapError::KeyNotFound) => Ok(()),
            Err(e) => Err(e).context("removing from the deny list"),
        }
    }

    /// Removes from the flow tables and PENDING both directions of every connection
    /// whose client is in `prefixes`; returns how many entries went. The
    /// data plane checks the deny list only for packets that miss them (so
    /// established packets pay nothing for it); this makes a newly denied
    /// client's established connections miss too.
    pub fn remove_flows_from(&mut self, prefixes: &[IpPrefix]) -> Result<usize> {
        let denied = |addr: &lb_common::Addr, family: u8| {
            let ip = addr_to_ip(addr, family);
            prefixes.iter().any(|p| p.contains(ip))
        };
        let mut removed = 0;
        for table in [&mut self.flows, &mut self.udp_flows, &mut self.pending] {
            let doomed: Vec<FlowKey> = table
                .iter()
                // An entry evicted while we iterate is simply skipped.
                .filter_map(|e| e.ok())
                .filter(|(k, f)| {
                    let client = if f.direction == FLOW_TO_BACKEND {
                        &k.src
                    } else {
                        &k.dst
                    };
                    denied(client, k.family)
                })
                .map(|(k, _)| k)
                .collect();
            for key in doomed {
                match table.remove(&key) {
                    Ok(()) => removed += 1,
                    Err(aya::maps::MapError::KeyNotFound) => {}
                    Err(e) => return Err(e).context("removing a denied client's flow"),
                }
            }
        }
        Ok(removed)
    }

    /// Connections and UDP flows per backend id currently in the flow
    /// tables (client direction).
    pub fn flow_counts(&self) -> Result<std::collections::HashMap<u32, u64>> {
        let mut counts = std::collections::HashMap::new();
        for entry in self.flows.iter().chain(self.udp_flows.iter()) {
            // An entry evicted while we iterate is simply not counted.
            let Ok((_, flow)) = entry else { continue };
            if flow.direction == FLOW_TO_BACKEND {
                *counts.entry(flow.backend_id).or_insert(0) += 1;
            }
        }
        Ok(counts)
    }

    /// Sums every per-CPU counter.
    pub fn counters(&self) -> Result<Counters> {
        // `have`: the slots the map really has (see `reason_slots`); the
        // others read as zero.
        fn sum(map: &PerCpuArray<MapData, Traffic>, n: u32, have: u32) -> Result<Vec<Traffic>> {
            (0..n)
                .map(|i| {
                    if i >= have {
                        return Ok(Traffic::default());
                    }
                    let per_cpu = map.get(&i, 0).context("reading counters")?;
                    Ok(per_cpu.iter().fold(Traffic::default(), |a, t| Traffic {
                        packets: a.packets + t.packets,
                        bytes: a.bytes + t.bytes,
                    }))
                })
                .collect()
        }
        let backends = (0..MAX_BACKENDS)
            .map(|i| {
                let per_cpu = self.backend_paths.get(&i, 0).context("reading counters")?;
                Ok(per_cpu.iter().fold(Traffic::default(), |a, p| Traffic {
                    packets: a.packets + p.traffic.packets,
                    bytes: a.bytes + p.traffic.bytes,
                }))
            })
            .collect::<Result<Vec<Traffic>>>()?;
        // The data plane counts a forwarded packet for its backend only:
        // a VIP's total is its retired backends' plus its current ones'.
        let mut vips = sum(&self.vip_stats, MAX_VIPS, MAX_VIPS)?;
        for (id, traffic) in backends.iter().enumerate() {
            if traffic.packets == 0 {
                continue;
            }
            let backend = self
                .backends
                .get(&(id as u32), 0)
                .context("reading BACKENDS")?;
            if backend.family != 0
                && let Some(vip) = vips.get_mut(backend.vip_id as usize)
            {
                vip.packets += traffic.packets;
                vip.bytes += traffic.bytes;
            }
        }
        Ok(Counters {
            vips,
            backends,
            reasons: sum(&self.reason_stats, REASON_COUNT, self.reason_slots)?,
        })
    }

    /// Moves backend `id`'s counters to its VIP's (`MAP_VIP_STATS`) and
    /// zeroes its `BACKEND_PATHS` slot, before the slot is freed: the VIP's
    /// total stays whole and the slot's next backend starts from zero.
    pub fn retire_backend_stats(&mut self, id: u32, vip_id: u32) -> Result<()> {
        let paths = self
            .backend_paths
            .get(&id, 0)
            .context("reading BACKEND_PATHS")?;
        let counts: Vec<Traffic> = paths.iter().map(|p| p.traffic).collect();
        let mut vip = self
            .vip_stats
            .get(&vip_id, 0)
            .context("reading VIP_STATS")?;
        let zeroes: Vec<BackendHop> = counts.iter().map(|_| BackendHop::default()).collect();
        let mut moved: Vec<Traffic> = vip.iter().copied().collect();
        for (cpu, t) in counts.iter().enumerate() {
            if let Some(v) = moved.get_mut(cpu) {
                v.packets += t.packets;
                v.bytes += t.bytes;
            }
        }
        vip = PerCpuValues::try_from(moved).context("per-CPU values")?;
        self.vip_stats
            .set(vip_id, vip, 0)
            .context("updating VIP_STATS")?;
        self.backend_paths
            .set(
                id,
                PerCpuValues::try_from(zeroes).context("per-CPU values")?,
                0,
            )
            .context("zeroing BACKEND_PATHS")
    }
}

/// The global unicast addresses of the interfaces `names`, in the order
/// getifaddrs(3) lists them (link-local IPv6 is left out: a backend
/// elsewhere could not answer it).
pub fn interface_addresses(names: &[String]) -> Result<Vec<std::net::IpAddr>> {
    let all = crate::config::host_addresses().context("getifaddrs")?;
    Ok(all
        .into_iter()
        .filter(|(name, ip)| {
            let link_local =
                matches!(ip, std::net::IpAddr::V6(v6) if v6.segments()[0] & 0xffc0 == 0xfe80);
            names.contains(name) && !link_local
        })
        .map(|(_, ip)| ip)
        .collect())
}

/// Index and MAC address of interface `name` in the current network namespace.
pub fn interface_mac(name: &str) -> Result<(u32, [u8; 6])> {
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
    let c = std::ffi::CString::new(name).map_err(|_| anyhow!("bad interface name {name:?}"))?;
    // SAFETY: a valid NUL-terminated string.
    let ifindex = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if ifindex == 0 {
        bail!("interface {name}: {}", std::io::Error::last_os_error());
    }
    // SIOCGIFHWADDR rather than /sys/class/net: with `--netns` the agent has
    // entered the namespace with setns, but /sys still shows the host's.
    // SAFETY: plain socket(2); the fd is owned below.
    let raw = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        bail!(
            "socket for SIOCGIFHWADDR: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: a fresh fd nobody else owns.
    let sock = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: all-zero is a valid ifreq.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(c.as_bytes()) {
        *dst = *src as libc::c_char;
    }
    // SAFETY: ioctl with a properly sized ifreq we own.
    if unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCGIFHWADDR, &mut req) } != 0 {
        bail!(
            "reading the MAC address of {name}: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: SIOCGIFHWADDR filled the hardware-address member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (m, d) in mac.iter_mut().zip(data.iter()) {
        *m = *d as u8;
    }
    Ok((ifindex, mac))
}

/// bpffs housekeeping for pinned maps and links.
pub mod pin {
    use std::path::{Path, PathBuf};

    use anyhow::{Context, Result, bail};

    /// Where bpffs is normally mounted.
    pub const BPFFS: &str = "/sys/fs/bpf";
    const BPF_FS_MAGIC: i64 = 0xcafe_4a11;

    fn is_bpffs(path: &Path) -> bool {
        let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) else {
            return false;
        };
        // SAFETY: statfs writes into the zeroed struct we own.
        unsafe {
            let mut st: libc::statfs = std::mem::zeroed();
            libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == BPF_FS_MAGIC
        }
    }

    /// Refuses maps pinned in `dir` (of those `names`) that the eBPF object
    /// at `object` would not create alike: another type, key or value size,
    /// or entry count (not compared for `any_entries`: a cache the loader
    /// sizes from this machine's CPUs, slower if short, not wrong, and
    /// counter arrays whose missing slots read as zero).
    /// A previous version with another layout left them: reusing them would
    /// have the kernel refuse the program with a verifier dump, or the
    /// program read old values as new ones. `undo` is the command that
    /// removes them with the old version.
    pub fn check_compatible(
        object: &Path,
        dir: &Path,
        names: &[&str],
        any_entries: &[&str],
        undo: &str,
    ) -> Result<()> {
        let data = std::fs::read(object)
            .with_context(|| format!("reading eBPF object {}", object.display()))?;
        let obj = aya_obj::Object::parse(&data)
            .map_err(|e| anyhow::anyhow!("parsing eBPF object {}: {e}", object.display()))?;
        for name in names {
            let path = dir.join(name);
            let Some(def) = obj.maps.get(*name) else {
                continue;
            };
            if !path.exists() {
                continue;
            }
            let pinned = aya::maps::MapInfo::from_pin(&path)
                .with_context(|| format!("reading pinned map {}", path.display()))?;
            let wanted_entries = if any_entries.contains(name) {
                pinned.max_entries()
            } else {
                def.max_entries()
            };
            let wanted = Layout {
                kind: type_name(def.map_type()),
                key: def.key_size(),
                value: def.value_size(),
                entries: wanted_entries,
            };
            let found = Layout {
                kind: pinned
                    .map_type()
                    .map_or_else(|_| "unknown".to_string(), |t| format!("{t:?}")),
                key: pinned.key_size(),
                value: pinned.value_size(),
                entries: pinned.max_entries(),
            };
            if found != wanted {
                bail!(
                    "the map {name} pinned in {} has another layout than this build's (there: {found}; here: {wanted}): \
                     an earlier version left it; `{undo}` with that version \
                     (what the maps hold is then lost) or removing {} lets this one start",
                    dir.display(),
                    dir.display()
                );
            }
        }
        Ok(())
    }

    /// What must match between a pinned map and the object's definition.
    #[derive(PartialEq)]
    struct Layout {
        kind: String,
        key: u32,
        value: u32,
        entries: u32,
    }

    impl std::fmt::Display for Layout {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(
                f,
                "{}, key {} B, value {} B, {} entries",
                self.kind, self.key, self.value, self.entries
            )
        }
    }

    /// A `bpf_map_type` number in the words of aya's `MapType`.
    fn type_name(raw: u32) -> String {
        use aya_obj::generated::bpf_map_type;
        // Every type the data plane's objects use; others show as numbers.
        let known = [
            (bpf_map_type::BPF_MAP_TYPE_HASH, "Hash"),
            (bpf_map_type::BPF_MAP_TYPE_ARRAY, "Array"),
            (bpf_map_type::BPF_MAP_TYPE_PROG_ARRAY, "ProgramArray"),
            (bpf_map_type::BPF_MAP_TYPE_PERCPU_HASH, "PerCpuHash"),
            (bpf_map_type::BPF_MAP_TYPE_PERCPU_ARRAY, "PerCpuArray"),
            (bpf_map_type::BPF_MAP_TYPE_LRU_HASH, "LruHash"),
            (bpf_map_type::BPF_MAP_TYPE_LRU_PERCPU_HASH, "LruPerCpuHash"),
            (bpf_map_type::BPF_MAP_TYPE_LPM_TRIE, "LpmTrie"),
        ];
        known
            .iter()
            .find(|(t, _)| *t as u32 == raw)
            .map_or_else(|| format!("type {raw}"), |(_, n)| n.to_string())
    }

    /// Makes sure `dir` exists on a bpffs, mounting bpffs at /sys/fs/bpf if needed.
    pub fn ensure_dir(dir: &Path) -> Result<()> {
        if dir.starts_with(BPFFS) && !is_bpffs(Path::new(BPFFS)) {
            let src = c"bpf";
            let target = c"/sys/fs/bpf";
            // SAFETY: static NUL-terminated strings; no data argument.
            let rc = unsafe {
                libc::mount(
                    src.as_ptr(),
                    target.as_ptr(),
                    src.as_ptr(),
                    0,
                    std::ptr::null(),
                )
            };
            if rc != 0 {
                bail!(
                    "bpffs is not mounted at {BPFFS} and mounting it failed: {} (run `mount -t bpf bpf {BPFFS}`)",
                    std::io::Error::last_os_error()
                );
            }
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        if !is_bpffs(dir) {
            bail!("{} is not on a bpf filesystem", dir.display());
        }
        Ok(())
    }

    /// An exclusive lock on a pin directory, held while an agent uses it;
    /// released when dropped (or when the process exits, however it exits).
    #[derive(Debug)]
    pub struct DirLock {
        _dir: std::fs::File,
    }

    /// Locks `dir` (which must exist) for this agent: flock(2) on the
    /// directory itself, which bpffs supports like any filesystem. A second
    /// agent on the same pin directory would otherwise silently take over the
    /// running one's attachments and maps.
    pub fn lock(dir: &Path) -> Result<DirLock> {
        use std::os::fd::AsRawFd;
        use std::os::unix::fs::MetadataExt;
        // The directory can be removed and made again between our open and
        // flock (a failed start cleans up); then the lock is on a dead inode
        // and must be taken again on the new one.
        for _ in 0..3 {
            let file = std::fs::File::open(dir)
                .with_context(|| format!("opening pin directory {}", dir.display()))?;
            // SAFETY: flock on a file descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
                let err = std::io::Error::last_os_error();
                if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                    let meta = file.metadata().ok();
                    let holder = meta
                        .and_then(|m| lock_holder(m.dev(), m.ino()))
                        .map_or_else(|| "another process".to_string(), |pid| format!("pid {pid}"));
                    bail!(
                        "pin directory {} is in use by another lb agent ({holder}); stop it first (`lb stop`), or give this one another --pin-dir",
                        dir.display()
                    );
                }
                return Err(err).with_context(|| format!("locking {}", dir.display()));
            }
            let held = file
                .metadata()
                .with_context(|| format!("{}", dir.display()))?;
            match std::fs::metadata(dir) {
                Ok(now) if now.dev() == held.dev() && now.ino() == held.ino() => {
                    return Ok(DirLock { _dir: file });
                }
                _ => continue,
            }
        }
        bail!(
            "pin directory {} keeps being replaced; is another agent starting?",
            dir.display()
        )
    }

    /// The pid holding a flock on the file `dev`/`ino`, from /proc/locks
    /// (lines like `1: FLOCK  ADVISORY  WRITE 1234 00:28:14603 0 EOF`).
    fn lock_holder(dev: u64, ino: u64) -> Option<u32> {
        let text = std::fs::read_to_string("/proc/locks").ok()?;
        let want = format!("{:02x}:{:02x}:{ino}", libc::major(dev), libc::minor(dev));
        text.lines().find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields.as_slice() {
                [_, "FLOCK", _, _, pid, id, ..] if *id == want => pid.parse().ok(),
                _ => None,
            }
        })
    }

    /// What one agent start put into bpffs, undone on drop unless
    /// [`StartGuard::commit`] is called once the agent runs: a failed start
    /// leaves no new pin directory, map pin or attachment behind, whichever
    /// step failed. Pins a previous agent left are not touched.
    #[derive(Debug)]
    #[must_use = "dropping the guard undoes the start"]
    pub struct StartGuard {
        dir: PathBuf,
        created_dir: bool,
        new_pins: Vec<PathBuf>,
        committed: bool,
    }

    impl StartGuard {
        /// Makes sure `dir` exists (see [`ensure_dir`]) and remembers whether
        /// this start created it.
        pub fn new(dir: &Path) -> Result<Self> {
            let created_dir = !dir.exists();
            let guard = Self {
                dir: dir.to_path_buf(),
                created_dir,
                new_pins: Vec::new(),
                committed: false,
            };
            // From here on a failure removes what was made.
            ensure_dir(dir)?;
            Ok(guard)
        }

        /// Records `pin` as made by this start if it does not exist yet; call
        /// before whatever creates it.
        pub fn will_create(&mut self, pin: &Path) {
            if !pin.exists() {
                self.new_pins.push(pin.to_path_buf());
            }
        }

        /// The agent runs: what it pinned is its state now.
        pub fn commit(mut self) {
            self.committed = true;
        }
    }

    impl Drop for StartGuard {
        fn drop(&mut self) {
            if self.committed {
                return;
            }
            // An attachment or map goes with its last reference: its pin here,
            // and the loader's fds when the data plane is dropped.
            if self.created_dir {
                if let Err(e) = remove_all(&self.dir) {
                    tracing::error!("cleaning up after a failed start: {e:#}");
                }
                return;
            }
            for pin in &self.new_pins {
                match std::fs::remove_file(pin) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => tracing::error!(
                        "cleaning up after a failed start: removing {}: {e}",
                        pin.display()
                    ),
                }
            }
        }
    }

    /// Pin path of an interface's attachment.
    pub fn link_path(dir: &Path, iface: &str) -> PathBuf {
        dir.join(format!("link_{iface}"))
    }

    /// Removes every pin in `dir` (and `dir`): attachments whose last reference
    /// this was are detached, maps are freed once nothing uses them.
    pub fn remove_all(dir: &Path) -> Result<()> {
        match std::fs::remove_dir_all(dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(e).with_context(|| format!("removing {}", dir.display())),
        }
    }

    /// Default pin directory of the agent running `config`: one per
    /// configuration file, so several agents can run side by side.
    pub fn default_dir(config: &Path) -> PathBuf {
        let full = std::fs::canonicalize(config).unwrap_or_else(|_| config.to_path_buf());
        let stem = full
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "lb".into());
        let stem: String = stem
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        // FNV-1a of the full path tells apart files with the same name.
        let hash = full
            .as_os_str()
            .as_encoded_bytes()
            .iter()
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
            });
        Path::new(BPFFS)
            .join("lb")
            .join(format!("{stem}-{:08x}", hash as u32))
    }
}
