//! The XDP data plane as seen from userspace: loads the `lb-xdp` object, attaches
//! it, and reads and writes its maps. Map layouts are defined in `lb_common::maps`.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result, anyhow, bail};
use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::{Xdp, XdpMode},
};
use lb_common::{
    Backend, FLOW_TO_BACKEND, Flow, FlowKey, MAP_BACKEND_STATS, MAP_BACKENDS, MAP_FLOWS,
    MAP_REASON_STATS, MAP_RINGS, MAP_VIP_STATE, MAP_VIP_STATS, MAP_VIPS, MAX_BACKENDS,
    MAX_RING_SIZE, MAX_VIPS, PROG_LB, REASON_COUNT, Reason, Ring, Traffic, VipKey, VipMeta,
    VipState,
};
use tracing::warn;

use crate::config::XdpModeSetting;

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
    vips: HashMap<MapData, VipKey, VipMeta>,
    rings: HashMap<MapData, u32, Ring>,
    backends: Array<MapData, Backend>,
    vip_state: Array<MapData, VipState>,
    flows: HashMap<MapData, FlowKey, Flow>,
    vip_stats: PerCpuArray<MapData, Traffic>,
    backend_stats: PerCpuArray<MapData, Traffic>,
    reason_stats: PerCpuArray<MapData, Traffic>,
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
        let mut bpf = Ebpf::load_file(path)
            .with_context(|| format!("loading eBPF object {}", path.display()))?;
        let prog: &mut Xdp = bpf
            .program_mut(PROG_LB)
            .ok_or_else(|| anyhow!("eBPF object has no program {PROG_LB}"))?
            .try_into()?;
        prog.load().context("the kernel refused the XDP program")?;
        Ok(Self {
            vips: take(&mut bpf, MAP_VIPS)?,
            rings: take(&mut bpf, MAP_RINGS)?,
            backends: take(&mut bpf, MAP_BACKENDS)?,
            vip_state: take(&mut bpf, MAP_VIP_STATE)?,
            flows: take(&mut bpf, MAP_FLOWS)?,
            vip_stats: take(&mut bpf, MAP_VIP_STATS)?,
            backend_stats: take(&mut bpf, MAP_BACKEND_STATS)?,
            reason_stats: take(&mut bpf, MAP_REASON_STATS)?,
            bpf,
        })
    }

    /// The XDP program, e.g. for `aya::programs::TestRun`.
    pub fn program(&mut self) -> Result<&mut Xdp> {
        Ok(self
            .bpf
            .program_mut(PROG_LB)
            .ok_or_else(|| anyhow!("eBPF object has no program {PROG_LB}"))?
            .try_into()?)
    }

    /// Attaches to `iface`; in driver mode falls back to generic with a warning.
    pub fn attach(&mut self, iface: &str, mode: XdpModeSetting) -> Result<AttachedMode> {
        let prog = self.program()?;
        match mode {
            XdpModeSetting::Generic => {
                prog.attach(iface, XdpMode::Skb)
                    .with_context(|| format!("attaching XDP (generic) to {iface}"))?;
                Ok(AttachedMode::Generic)
            }
            XdpModeSetting::Auto => {
                prog.attach(iface, XdpMode::Default)
                    .with_context(|| format!("attaching XDP to {iface}"))?;
                Ok(AttachedMode::Auto)
            }
            XdpModeSetting::Driver => match prog.attach(iface, XdpMode::Driver) {
                Ok(_) => Ok(AttachedMode::Driver),
                Err(err) => {
                    warn!(%iface, error = %err, "native XDP attach failed; falling back to generic (skb) mode, which is slower");
                    prog.attach(iface, XdpMode::Skb)
                        .with_context(|| format!("attaching XDP (generic) to {iface}"))?;
                    Ok(AttachedMode::Generic)
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
            Ok(ring) => Ok(Some(ring.entries[..ring.size as usize].to_vec())),
            Err(aya::maps::MapError::KeyNotFound) => Ok(None),
            Err(e) => Err(e).context("reading ring"),
        }
    }

    /// Connections per backend id currently in the flow table (client direction).
    pub fn flow_counts(&self) -> Result<std::collections::HashMap<u32, u64>> {
        let mut counts = std::collections::HashMap::new();
        for entry in self.flows.iter() {
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
        fn sum(map: &PerCpuArray<MapData, Traffic>, n: u32) -> Result<Vec<Traffic>> {
            (0..n)
                .map(|i| {
                    let per_cpu = map.get(&i, 0).context("reading counters")?;
                    Ok(per_cpu.iter().fold(Traffic::default(), |a, t| Traffic {
                        packets: a.packets + t.packets,
                        bytes: a.bytes + t.bytes,
                    }))
                })
                .collect()
        }
        Ok(Counters {
            vips: sum(&self.vip_stats, MAX_VIPS)?,
            backends: sum(&self.backend_stats, MAX_BACKENDS)?,
            reasons: sum(&self.reason_stats, REASON_COUNT)?,
        })
    }
}
