//! Map definitions; layouts and meanings are documented in `lb_common::maps`.

use aya_ebpf::{
    bindings::{BPF_F_MMAPABLE, BPF_F_NO_PREALLOC},
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray, ProgramArray, lpm_trie::Key},
};
use lb_common::{
    AddrKey, Backend, BackendHop, CLIENT_HOP_SLOTS, CachedFlow, ClientHop, DenyKeyV4, DenyKeyV6,
    EncapSource, FLOW_CACHE_SLOTS, FLOW_TABLE_SIZE, Flow, FlowKey, IF_MAC_SLOTS, IfMac,
    MAX_BACKENDS, MAX_DENY_PREFIXES, MAX_VIPS, PENDING_TABLE_SIZE, RATE_TABLE_SIZE, REASON_COUNT,
    RateWindow, Reason, Ring, Settings, Traffic, UDP_FLOW_TABLE_SIZE, VipKey, VipMeta, VipState,
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

/// 5-tuple of either direction of a TCP connection -> what to do with it.
#[map]
pub static FLOWS: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(FLOW_TABLE_SIZE, 0);

/// As `FLOWS`, for UDP flows: see `lb_common::MAP_UDP_FLOWS` for why apart.
#[map]
pub static UDP_FLOWS: LruHashMap<FlowKey, Flow> =
    LruHashMap::with_max_entries(UDP_FLOW_TABLE_SIZE, 0);

/// TCP flows whose handshake is not confirmed yet, both directions; see
/// `lb_common::MAP_PENDING` for why they are kept apart from `FLOWS`.
#[map]
pub static PENDING: LruHashMap<FlowKey, Flow> = LruHashMap::with_max_entries(PENDING_TABLE_SIZE, 0);

/// Source prefix -> new flows in the current window (the per-prefix rate limit).
#[map]
pub static NEW_FLOW_RATE: LruHashMap<AddrKey, RateWindow> =
    LruHashMap::with_max_entries(RATE_TABLE_SIZE, 0);

/// IPv4 prefixes denied from reaching any VIP.
#[map]
pub static DENY_V4: LpmTrie<DenyKeyV4, u8> = LpmTrie::with_max_entries(MAX_DENY_PREFIXES, 0);

/// IPv6 prefixes denied from reaching any VIP.
#[map]
pub static DENY_V6: LpmTrie<DenyKeyV6, u8> = LpmTrie::with_max_entries(MAX_DENY_PREFIXES, 0);

/// Settings from the config (one element), read by packets to a VIP that
/// miss FLOWS (an array: the verifier inlines the lookup).
#[map]
pub static SETTINGS: Array<Settings> = Array::with_max_entries(1, 0);

/// VIP id -> generation and flags, to validate flows without a VIPS lookup.
#[map]
pub static VIP_STATE: Array<VipState> = Array::with_max_entries(MAX_VIPS, 0);

/// Client address slot -> cached FIB answer, per CPU (no locking, no torn
/// entries); refreshed every `NEXTHOP_TTL_NS` so the FIB stays authoritative
/// (see `MAP_CLIENT_HOPS`).
#[map]
pub static CLIENT_HOPS: PerCpuArray<ClientHop> = PerCpuArray::with_max_entries(CLIENT_HOP_SLOTS, 0);

/// Recent `FLOWS` hits, `FLOW_CACHE_SLOTS` per CPU, direct-mapped (see
/// `MAP_FLOW_CACHE`); the agent sizes it for every possible CPU.
#[map]
pub static FLOW_CACHE: Array<CachedFlow> =
    Array::with_max_entries(FLOW_CACHE_SLOTS, BPF_F_MMAPABLE);

/// The data plane's flow epoch (see `MAP_FLOW_CACHE`).
#[map]
pub static FLOW_EPOCH: Array<u64> = Array::with_max_entries(1, 0);

/// Backend id -> next hop toward it and what was forwarded there, per CPU
/// (see `MAP_BACKEND_PATHS`).
#[map]
pub static BACKEND_PATHS: PerCpuArray<BackendHop> = PerCpuArray::with_max_entries(MAX_BACKENDS, 0);

/// Outer source of `ipip` packets, per family (see `MAP_ENCAP_SOURCES`).
#[map]
pub static ENCAP_SOURCES: Array<EncapSource> = Array::with_max_entries(2, 0);

/// Per-VIP packets/bytes of retired backends (written by the agent; see
/// `MAP_VIP_STATS`).
#[map]
pub static VIP_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(MAX_VIPS, 0);

/// Per-`Reason` packets/bytes: why each packet was passed, dropped or sent.
#[map]
pub static REASON_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(REASON_COUNT, 0);

/// Address of every configured backend, to refuse new flows spoofing one.
#[map]
pub static BACKEND_ADDRS: HashMap<AddrKey, u8> = HashMap::with_max_entries(MAX_BACKENDS, 0);

/// Address of every `l4` VIP: pings to it are answered, new flows may not
/// come from it (see `MAP_VIP_ADDRS`).
#[map]
pub static VIP_ADDRS: HashMap<AddrKey, u8> = HashMap::with_max_entries(MAX_VIPS, 0);

/// Slot -> an interface's own MAC, filled by the agent before it attaches
/// (see `MAP_IF_MACS`).
#[map]
pub static IF_MAC_TABLE: Array<IfMac> = Array::with_max_entries(IF_MAC_SLOTS, 0);

/// Room for the keys and values a new flow writes into the flow tables:
/// map helpers take pointers to map values as keys and values, and the
/// program's one stack frame has no room left for them (the verifier
/// allows 512 bytes).
#[repr(C)]
pub struct Scratch {
    /// A reply 5-tuple being recorded.
    pub reply: FlowKey,
    /// A flow being recorded.
    pub flow: Flow,
    /// Another connection's client 5-tuple (reply collision check).
    pub other: FlowKey,
    /// A source prefix (rate limit).
    pub prefix: AddrKey,
    /// A new rate-limit window.
    pub window: RateWindow,
    /// An IPv4 deny-list lookup.
    pub deny_v4: Key<DenyKeyV4>,
    /// An IPv6 deny-list lookup.
    pub deny_v6: Key<DenyKeyV6>,
    /// A SYN's TCP options (MSS clamping).
    pub tcp_options: [u8; crate::dsr::TCP_OPTIONS_MAX],
}

/// This CPU's `Scratch`; `DropNoBackend` if the map cannot give it (it
/// always can: an array's element 0 exists; the verifier wants the check).
#[inline(always)]
pub fn scratch() -> Result<&'static mut Scratch, Reason> {
    let s = SCRATCH.get_ptr_mut(0).ok_or(Reason::DropNoBackend)?;
    // SAFETY: a per-CPU slot: only this program on this CPU uses it, and the
    // program does not run nested on one CPU.
    Ok(unsafe { &mut *s })
}

/// `PROG_FULL_SLOT` -> `lb_xdp_full`, which `lb_xdp` tail-calls for every
/// packet its fast path leaves (see `MAP_PROGS`).
#[map]
pub static PROGS: ProgramArray = ProgramArray::with_max_entries(1, 0);

/// One `Scratch` per CPU.
#[map]
pub static SCRATCH: PerCpuArray<Scratch> = PerCpuArray::with_max_entries(1, 0);
