//! Map definitions; layouts and meanings are documented in `lb_common::maps`.

use aya_ebpf::{
    bindings::BPF_F_NO_PREALLOC,
    macros::map,
    maps::{Array, HashMap, LruHashMap, LruPerCpuHashMap, PerCpuArray},
};
use lb_common::{
    AddrKey, Backend, FLOW_TABLE_SIZE, Flow, FlowKey, IfMac, MAX_BACKENDS, MAX_IFINDEX, MAX_VIPS,
    NEXTHOP_CACHE_SIZE, NextHop, NextHopKey, REASON_COUNT, Ring, Traffic, VipKey, VipMeta,
    VipState,
};

/// VIP (address, port, protocol) -> id and flags.
#[map]
pub static VIPS: HashMap<VipKey, VipMeta> = HashMap::with_max_entries(MAX_VIPS, 0);

/// VIP id -> Maglev ring of backend ids. No prealloc, so that replacing a ring is
/// an RCU swap of the whole element: readers never see a half-written table.
#[map]
pub static RINGS: HashMap<u32, Ring> = HashMap::with_max_entries(MAX_VIPS, BPF_F_NO_PREALLOC);

/// Backend id -> address, port, flags.
#[map]
pub static BACKENDS: Array<Backend> = Array::with_max_entries(MAX_BACKENDS, 0);

/// 5-tuple of either direction of a connection -> what to do with it.
#[map]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(FLOW_TABLE_SIZE, 0);

/// VIP id -> generation and flags, to validate flows without a VIPS lookup.
#[map]
pub static VIP_STATE: Array<VipState> = Array::with_max_entries(MAX_VIPS, 0);

/// Destination after NAT -> cached FIB answer, per CPU (no locking, no torn
/// entries); refreshed every `NEXTHOP_TTL_NS` so the FIB stays authoritative.
#[map]
pub static NEXTHOPS: LruPerCpuHashMap<NextHopKey, NextHop> =
    LruPerCpuHashMap::with_max_entries(NEXTHOP_CACHE_SIZE, 0);

/// Per-VIP packets/bytes received from clients and forwarded.
#[map]
pub static VIP_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Per-backend packets/bytes forwarded to it.
#[map]
pub static BACKEND_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Per-`Reason` packets/bytes: why each packet was passed, dropped or sent.
#[map]
pub static REASON_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(REASON_COUNT, 0);

/// Address of every configured backend, to refuse new flows spoofing one.
#[map]
pub static BACKEND_ADDRS: HashMap<AddrKey, u8> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// ifindex -> the interface's own MAC, filled by the agent before it attaches.
#[map]
pub static IF_MACS: Array<IfMac> = Array::with_max_entries(MAX_IFINDEX, 0);
