//! Map layouts shared by kernel and userspace.
//!
//! Every map the XDP program uses is declared here by name, with its key and
//! value types. Addresses are `Addr`: the 16 bytes of the address in network
//! order, held as four `u32` words (so the data plane copies words, not bytes);
//! an IPv4 address is the first word and the rest are zero, told apart by the
//! `family` field. Ports are stored in host byte order.

/// An IPv4 or IPv6 address: its network-order bytes viewed as native `u32` words.
pub type Addr = [u32; 4];

/// `Addr` from the address's 16 network-order bytes (IPv4: 4 bytes then zeros).
#[inline(always)]
pub fn addr_from_bytes(b: [u8; 16]) -> Addr {
    [
        u32::from_ne_bytes([b[0], b[1], b[2], b[3]]),
        u32::from_ne_bytes([b[4], b[5], b[6], b[7]]),
        u32::from_ne_bytes([b[8], b[9], b[10], b[11]]),
        u32::from_ne_bytes([b[12], b[13], b[14], b[15]]),
    ]
}

/// The 16 network-order bytes of an `Addr`.
#[inline(always)]
pub fn addr_to_bytes(a: &Addr) -> [u8; 16] {
    let mut out = [0u8; 16];
    let mut i = 0;
    while i < 4 {
        let w = a[i].to_ne_bytes();
        out[4 * i] = w[0];
        out[4 * i + 1] = w[1];
        out[4 * i + 2] = w[2];
        out[4 * i + 3] = w[3];
        i += 1;
    }
    out
}

/// IPv4 family tag used in keys and values.
pub const FAMILY_V4: u8 = 4;
/// IPv6 family tag used in keys and values.
pub const FAMILY_V6: u8 = 6;
/// IP protocol number of TCP.
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP.
pub const PROTO_UDP: u8 = 17;

/// Most VIPs (services) one data plane holds; also the size of the VIP stats array.
pub const MAX_VIPS: u32 = 512;
/// Most backends across all VIPs; backend ids are `0..MAX_BACKENDS`. Not
/// 4096: with the kernel's array header, the pointer table of a per-CPU
/// array of 4096 entries (`BACKEND_PATHS`, read by every forwarded
/// packet) is just over the 32 KiB the kernel allocates from its direct
/// map (huge pages); larger ones are vmalloc'd in 4 KiB pages, a TLB miss
/// per packet under load.
pub const MAX_BACKENDS: u32 = 4032;
/// Largest backend weight, in the file, the CLI and DNS answers alike: the
/// Maglev builder's credits stay small and SRV weights (u16) always fit.
pub const MAX_WEIGHT: u32 = 65535;
/// Largest Maglev ring (a prime); the `Ring` value always has room for this many entries.
pub const MAX_RING_SIZE: usize = 65537;
/// Ring size used when a service does not choose one.
pub const DEFAULT_RING_SIZE: u32 = 65537;
/// Entries in the LRU flow table: two per connection (one per direction),
/// so about 262 144 connections.
pub const FLOW_TABLE_SIZE: u32 = 1 << 19;
/// Entries in the LRU table of UDP flows (`UDP_FLOWS`): two per NATed flow
/// (one per direction), one per DSR flow, so 131 072 to 262 144 flows.
pub const UDP_FLOW_TABLE_SIZE: u32 = 1 << 18;
/// Entries in the LRU table of unconfirmed TCP flows (`PENDING`): two per
/// handshake in progress, so about 32 768 of them. An eighth of `FLOWS`:
/// a legitimate handshake lives there for one round trip, so a flood must
/// send more than 32 768 SYNs per round trip to push one out (the client's
/// retransmitted SYN then simply makes it again).
pub const PENDING_TABLE_SIZE: u32 = 1 << 16;
/// Source prefixes tracked by the new-flow rate limit (`NEW_FLOW_RATE`, LRU).
pub const RATE_TABLE_SIZE: u32 = 1 << 16;
/// Prefix length the new-flow rate limit counts IPv4 sources by (a /24).
pub const RATE_PREFIX_V4: u32 = 24;
/// Prefix length the new-flow rate limit counts IPv6 sources by (a /64).
pub const RATE_PREFIX_V6: u32 = 64;
/// Length of the rate limit's fixed window.
pub const RATE_WINDOW_NS: u64 = 1_000_000_000;
/// Most prefixes in each deny list (`DENY_V4`, `DENY_V6`).
pub const MAX_DENY_PREFIXES: u32 = 16384;

/// Map name: `VipKey` -> `VipMeta` (HASH).
pub const MAP_VIPS: &str = "VIPS";
/// Map name: VIP id (`u32`) -> `Ring` (HASH, no prealloc: an update swaps the whole
/// ring in under RCU, so a packet sees either the old or the new table, never a mix).
pub const MAP_RINGS: &str = "RINGS";
/// Map name: backend id (`u32`) -> `Backend` (ARRAY).
pub const MAP_BACKENDS: &str = "BACKENDS";
/// Map name: `FlowKey` of either direction of a TCP connection -> `Flow`
/// (LRU_HASH, `FLOW_TABLE_SIZE`). One lookup per packet finds both a
/// client's flow (pinned backend) and a backend's reply (the VIP to
/// translate back to). Only connections whose handshake was confirmed are
/// here (see `MAP_PENDING`); UDP flows have their own table
/// (`MAP_UDP_FLOWS`).
pub const MAP_FLOWS: &str = "FLOWS";
/// Map name: `FlowKey` of either direction of a UDP flow -> `Flow`
/// (LRU_HASH, `UDP_FLOW_TABLE_SIZE`), as `FLOWS` for TCP.
///
/// Why a table of its own: UDP has no handshake, so its first packet makes
/// a flow, and a spoofed packet makes one for the price of one packet (the
/// per-prefix new-flow limit only bounds each prefix). In `FLOWS` a flood
/// of them from many prefixes would push established TCP connections out
/// of the LRU (they would then be re-hashed, and reset after a backend
/// change). Here it only churns other UDP flows, which a stateless
/// protocol's client tolerates best (an evicted flow is re-hashed to the
/// same backend unless the table changed). The packet's protocol picks the
/// table, so the hit path still makes one lookup.
pub const MAP_UDP_FLOWS: &str = "UDP_FLOWS";
/// Map name: `FlowKey` -> `Flow` (LRU_HASH, `PENDING_TABLE_SIZE`): TCP flows
/// whose handshake the balancer has not seen completed, both directions.
///
/// Why a second table: a SYN costs an attacker one spoofed packet, and if it
/// went into `FLOWS` a flood would push idle established connections out of
/// that LRU (they would then be re-hashed, and reset after a backend change).
/// So, as in Katran and Unimog, a SYN to an `l4` VIP gets its backend from
/// Maglev as before but is recorded only here, client direction and reply
/// direction (so the backend's SYN-ACK, or RST, is translated back from
/// here). The client's first packet without SYN (its ACK) finds the entry,
/// moves both directions to `FLOWS` and deletes them here. A SYN, even a
/// retransmitted one or one whose 5-tuple an older connection left in
/// `FLOWS`, always takes its backend from Maglev (Katran's SYNs skip its
/// LRU too): a drained backend gets no new connection. A flood of
/// spoofed SYNs, which never send that ACK, only churns this table. A TCP
/// packet without SYN that finds nothing anywhere (a connection whose entry
/// was evicted, or that predates the balancer) is sent by Maglev and
/// recorded here the same way (the backend's answers are translated back
/// from here meanwhile); the client's next packet confirms it. So spoofed
/// single packets without SYN cannot fill `FLOWS` either. UDP flows go
/// straight to `UDP_FLOWS`.
pub const MAP_PENDING: &str = "PENDING";
/// Map name: `AddrKey` of a source prefix (address masked to
/// `RATE_PREFIX_V4`/`_V6`) -> `RateWindow` (LRU_HASH, `RATE_TABLE_SIZE`):
/// new flows counted in the current one-second window.
pub const MAP_NEW_FLOW_RATE: &str = "NEW_FLOW_RATE";
/// Map name: `DenyKeyV4` -> `u8` (LPM_TRIE, `MAX_DENY_PREFIXES`): IPv4
/// prefixes whose packets to a VIP are dropped (value unused, 1).
pub const MAP_DENY_V4: &str = "DENY_V4";
/// Map name: `DenyKeyV6` -> `u8` (LPM_TRIE, `MAX_DENY_PREFIXES`): as `DENY_V4`.
pub const MAP_DENY_V6: &str = "DENY_V6";
/// Map name: 0 -> `Settings` (ARRAY, 1): data-plane settings from the config.
pub const MAP_SETTINGS: &str = "SETTINGS";
/// Map name: VIP id -> `VipState` (ARRAY, `MAX_VIPS`).
pub const MAP_VIP_STATE: &str = "VIP_STATE";
/// Map name: slot (`client_hop_slot` of the destination) -> `ClientHop`
/// (PERCPU_ARRAY, `CLIENT_HOP_SLOTS`): the next hop toward clients (a
/// backend's reply after NAT, an ICMP error), cached per CPU in a
/// direct-mapped table. A slot holding another address is a miss: the FIB
/// is asked and the slot overwritten. An array and not a hash map (as
/// `NEXTHOPS` was before): a small table read at a computed index stays in
/// the cache and the TLB, where a hash map's buckets and elements are spread
/// over many pages, and in a VM every TLB miss is a nested page walk; this
/// took about 60 ns off each reply packet.
pub const MAP_CLIENT_HOPS: &str = "CLIENT_HOPS";
/// Slots of `CLIENT_HOPS` per CPU (a power of two).
pub const CLIENT_HOP_SLOTS: u32 = 1024;

/// The `CLIENT_HOPS` slot of a destination address: a multiplicative hash
/// of its words, top bits (`CLIENT_HOP_SLOTS` = 2^10).
#[inline(always)]
pub fn client_hop_slot(addr: &Addr) -> u32 {
    let x = addr[0] ^ addr[1] ^ addr[2] ^ addr[3];
    x.wrapping_mul(0x9e37_79b1) >> 22
}
/// How long a cached next hop is used before the FIB is asked again, so route
/// and neighbour changes are picked up within this time.
pub const NEXTHOP_TTL_NS: u64 = 1_000_000_000;
/// Map name: CPU x `FLOW_CACHE_SLOTS` + slot (`flow_cache_slot` of a
/// 5-tuple) -> `CachedFlow` (ARRAY, `BPF_F_MMAPABLE`, `FLOW_CACHE_SLOTS`
/// per possible CPU, sized by the agent at load): a per-CPU, direct-mapped
/// cache of recent `FLOWS` hits, read before `FLOWS`. A hit costs a few
/// reads of a small table; `FLOWS`, sized for 262 144 connections, spreads
/// its buckets and entries over tens of MB of 4 KiB pages, and in a VM each
/// TLB miss is a nested page walk. A plain array with a run of slots per
/// CPU rather than a PERCPU_ARRAY: a per-CPU element's lookup first reads
/// its per-CPU pointer, one more dependent cache miss on a packet whose
/// slot is cold anyway (sampled live, the slot's first read is a third of
/// the hit path's time; BENCHMARKS.md). Mmapable (never mapped) because
/// the kernel then starts the values on a page, so every 128-byte slot
/// starts on a cache line and its first line is all a hit reads.
///
/// Coherence: a slot holds a copy of a `FLOWS` entry with the two epochs it
/// was read under, `Settings::flow_epoch` (bumped by the agent after any
/// change of backends, tables, VIPs or removed flows) and the data plane's
/// (`dp_epoch`): `FLOW_EPOCH[0]`, bumped when the data plane overwrites
/// another VIP's dead reply entry or deletes an older connection's entry
/// for a SYN, plus the clock in `FLOW_CACHE_PERIOD_SHIFT` units, so that
/// every slot is read again from `FLOWS` at least that often (which keeps
/// UDP flows' `last_seen` current there); a slot of an older epoch is a
/// miss. Every other `FLOWS` write
/// leaves the meaning of an entry as it was (a new flow gets what Maglev
/// gave before, unless the table changed, which bumps the epoch), and the
/// data plane drops its own CPU's copy of an entry it rewrites.
///
/// Not pinned: a new program (a restarted agent's) starts with an empty
/// cache of its own, which is correct by construction, and the value may
/// change between versions.
pub const MAP_FLOW_CACHE: &str = "FLOW_CACHE";
/// `FLOW_CACHE` slots are read again from `FLOWS` at least every
/// 2^`FLOW_CACHE_PERIOD_SHIFT` ns (about 8.6 s; see `MAP_FLOW_CACHE`).
pub const FLOW_CACHE_PERIOD_SHIFT: u32 = 33;
/// `Flow::last_seen` counts 2^`FLOW_TIME_SHIFT` ns (about 1.07 s) of the
/// coarse monotonic clock (`bpf_ktime_get_coarse_ns`, CLOCK_MONOTONIC_COARSE).
pub const FLOW_TIME_SHIFT: u32 = 30;
/// A UDP flow whose client sent nothing for more than this many
/// `FLOW_TIME_SHIFT` units (about 30 s, Katran's `LRU_UDP_TIMEOUT`) is a new
/// flow: its backend comes from the table again, so a drained or
/// re-weighted backend loses flows of clients that keep their port (NTP,
/// syslog, SIP) once they pause. Longer than a cache period and a unit,
/// the most `last_seen` in `FLOWS` lags behind a busy flow's packets.
pub const UDP_IDLE_UNITS: u32 = 28;

/// A coarse monotonic time in ns as `Flow::last_seen` counts it.
#[inline(always)]
pub fn flow_time(ns: u64) -> u32 {
    (ns >> FLOW_TIME_SHIFT) as u32
}
/// Slots of `FLOW_CACHE` per CPU (a power of two: `flow_cache_slot` keeps
/// the top 10 bits).
pub const FLOW_CACHE_SLOTS: u32 = 1024;
/// Map name: 0 -> `u64` (ARRAY, 1): the data plane's own flow epoch (see
/// `MAP_FLOW_CACHE`), bumped atomically; slots keep its low 32 bits.
pub const MAP_FLOW_EPOCH: &str = "FLOW_EPOCH";

/// The `FLOW_CACHE` slot of a 5-tuple: a multiplicative hash of its words.
#[inline(always)]
pub fn flow_cache_slot(key: &FlowKey) -> u32 {
    let x = key.src[0]
        ^ key.src[1]
        ^ key.src[2]
        ^ key.src[3].rotate_left(7)
        ^ key.dst[0].rotate_left(13)
        ^ key.dst[3].rotate_left(19)
        ^ ((key.sport as u32) << 16 | key.dport as u32)
        ^ key.proto as u32;
    x.wrapping_mul(0x9e37_79b1) >> 22
}

/// Value of `FLOW_CACHE`: a copy of a `FLOWS` entry and the epochs it was
/// read under and, for a client's direction that was valid then, what
/// forwarding it needs (its VIP's flags and its backend), so that a hit
/// reads neither `VIP_STATE` nor `BACKENDS`: the agent bumps its epoch
/// after changing either.
///
/// 128 bytes, two cache lines (the map's values start on a page, see
/// `MAP_FLOW_CACHE`); the first holds everything a hit of a plain IPv4
/// flow in a DSR mode reads, so that its packet waits for one line.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CachedFlow {
    /// `Settings::flow_epoch` when it was read.
    pub agent_epoch: u32,
    /// The data plane's epoch when it was read: `FLOW_EPOCH[0]` (its low
    /// 32 bits) plus the clock in `FLOW_CACHE_PERIOD_SHIFT` units.
    pub dp_epoch: u32,
    /// 1 when `vip_flags` and `backend` hold the flow's VIP flags and
    /// backend (a `FLOW_TO_BACKEND` entry under its VIP's generation, whose
    /// backend was valid and of the flow's family); 0 otherwise.
    pub resolved: u32,
    /// The VIP's `VIP_F_*` bits.
    pub vip_flags: u32,
    /// The 5-tuple (an all-zero key, family 0, never matches a packet's).
    pub key: FlowKey,
    /// `flow.backend_id`, in the first line.
    pub backend_id: u32,
    /// `backend.addr[0]` (an IPv4 backend's whole address), in the first line.
    pub backend_addr0: u32,
    /// Its `FLOWS` entry.
    pub flow: Flow,
    /// `BACKENDS[flow.backend_id]`.
    pub backend: Backend,
    /// Zero.
    pub pad: [u8; 4],
}

/// Map name: backend id -> `BackendHop` (PERCPU_ARRAY, `MAX_BACKENDS`): the
/// next hop toward each backend and what was forwarded to it. The hop is
/// cached per backend rather than per flow, so an established flow's packet
/// costs one array read, and its counters share that value (one per-CPU
/// value per forwarded packet). Per CPU, so an entry is never read
/// half-written; the hop is refreshed from `bpf_fib_lookup` every
/// `NEXTHOP_TTL_NS`, and ignored when its address is not the slot's current
/// backend (slots are reused; the agent zeroes a retired backend's slot).
pub const MAP_BACKEND_PATHS: &str = "BACKEND_PATHS";
/// Map name: family index (`ENCAP_SRC_V4`, `ENCAP_SRC_V6`) -> `EncapSource`
/// (ARRAY, 2): the outer source addresses of `ipip` mode.
pub const MAP_ENCAP_SOURCES: &str = "ENCAP_SOURCES";
/// `ENCAP_SOURCES` index of the IPv4 outer source.
pub const ENCAP_SRC_V4: u32 = 0;
/// `ENCAP_SOURCES` index of the IPv6 outer source.
pub const ENCAP_SRC_V6: u32 = 1;
/// Map name: VIP id -> `Traffic` (PERCPU_ARRAY, `MAX_VIPS`): what the VIP's
/// retired backends were counted (the agent moves a backend's
/// counters here when it retires it). The data plane counts a
/// forwarded packet once, for its backend (ids are per VIP), so a VIP's
/// total is this plus its current backends'.
pub const MAP_VIP_STATS: &str = "VIP_STATS";
/// Maps agents before 2026-12 pinned that this one does not use: its
/// predecessors' flow cache, MAC table, next hops and backend counters.
pub const RETIRED_MAPS: [&str; 4] = ["FLOW_CACHE", "IF_MACS", "BACKEND_HOPS", "BACKEND_STATS"];
/// Map name: `Reason` as u32 -> `Traffic` (PERCPU_ARRAY, `REASON_COUNT`).
pub const MAP_REASON_STATS: &str = "REASON_STATS";

/// Map name: `AddrKey` -> `u8` (HASH, `MAX_BACKENDS`): the address of every
/// configured backend (value unused, 1), so that a packet to a VIP claiming to
/// come from a backend is refused when it would create a flow.
pub const MAP_BACKEND_ADDRS: &str = "BACKEND_ADDRS";
/// Map name: `AddrKey` -> `u8` (HASH, `MAX_VIPS`): the address of every
/// `l4` VIP, valued `VIP_ADDR_L4`, or `VIP_ADDR_L4 | VIP_ADDR_LOCAL` when
/// an `l7` service shares it. ICMP echo requests to one are answered from
/// XDP (a ping to a VIP is how operators check a balancer), a new flow may
/// not come from one, and on an address without `VIP_ADDR_LOCAL` whatever
/// no service or flow takes is dropped: the stack has no such local
/// address and would route it on (back to the router that sent it, when
/// its default route leads there: a loop until the TTL runs out).
pub const MAP_VIP_ADDRS: &str = "VIP_ADDRS";
/// `VIP_ADDRS` value bit: an `l4` service has the address.
pub const VIP_ADDR_L4: u8 = 1;
/// `VIP_ADDRS` value bit: an `l7` service has it too, so it is a local
/// address of the stack, which answers what XDP does not take.
pub const VIP_ADDR_LOCAL: u8 = 2;
/// Map name: slot -> `IfMac` (ARRAY, `IF_MAC_SLOTS`): the MAC address of
/// each interface the program is attached to, written by the agent before it
/// attaches, in the first free of `IF_MAC_PROBES` slots from
/// `if_mac_slot(ifindex)`. Every forwarded packet reads it: an array (the
/// verifier inlines the lookup) small enough (3 KiB) for the kernel to
/// allocate it in its direct map, whose huge pages rarely miss the TLB,
/// unlike the 512 KiB one-entry-per-ifindex array it replaces (`IF_MACS`,
/// vmalloc'd 4 KiB pages: a TLB miss on most packets under load).
pub const MAP_IF_MACS: &str = "IF_MAC_TABLE";
/// Slots of `IF_MAC_TABLE` (a power of two).
pub const IF_MAC_SLOTS: u32 = 256;
/// Slots an interface's entry may be in, from `if_mac_slot` on.
pub const IF_MAC_PROBES: u32 = 4;

/// The `k`-th slot (`k < IF_MAC_PROBES`) of `IF_MAC_TABLE` where interface
/// `ifindex`'s MAC may be.
#[inline(always)]
pub fn if_mac_slot(ifindex: u32, k: u32) -> u32 {
    ifindex.wrapping_add(k) & (IF_MAC_SLOTS - 1)
}

/// Map name: `PROG_FULL_SLOT` -> program (PROG_ARRAY, 1): `lb_xdp_full`,
/// which the attached `lb_xdp` tail-calls for every packet its fast path
/// (established flows) leaves. Pinned: a program array loses its entries
/// when no process or pin holds it, and the attached program outlives the
/// agent across a restart; the next agent puts its own `lb_xdp_full` in.
pub const MAP_PROGS: &str = "PROGS";
/// The slot of `lb_xdp_full` in `PROGS`.
pub const PROG_FULL_SLOT: u32 = 0;

/// The maps of the `lb-xdp` object the agent pins for a hitless restart
/// (all but the per-program `FLOW_CACHE`).
pub const ALL_MAPS: [&str; 21] = [
    MAP_VIPS,
    MAP_VIP_STATE,
    MAP_RINGS,
    MAP_BACKENDS,
    MAP_FLOWS,
    MAP_UDP_FLOWS,
    MAP_CLIENT_HOPS,
    MAP_FLOW_EPOCH,
    MAP_VIP_STATS,
    MAP_REASON_STATS,
    MAP_BACKEND_ADDRS,
    MAP_VIP_ADDRS,
    MAP_IF_MACS,
    MAP_PROGS,
    MAP_PENDING,
    MAP_NEW_FLOW_RATE,
    MAP_DENY_V4,
    MAP_DENY_V6,
    MAP_SETTINGS,
    MAP_BACKEND_PATHS,
    MAP_ENCAP_SOURCES,
];

/// Name of the load-balancing XDP program in the `lb-xdp` object.
pub const PROG_LB: &str = "lb_xdp";
/// Program name of the full data plane `lb_xdp` tail-calls (see `MAP_PROGS`).
pub const PROG_LB_FULL: &str = "lb_xdp_full";
/// Name of the pass-only XDP program in the `lab-xdp` object (for veth peers).
pub const PROG_PASS: &str = "xdp_pass";
/// Name of the MAC-swapping bounce program in the `lab-xdp` object (benchmark baseline).
pub const PROG_BOUNCE: &str = "xdp_bounce";

/// Key of the VIP map: destination address, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct VipKey {
    /// VIP address, network order; IPv4 in the first 4 bytes.
    pub addr: Addr,
    /// VIP port, host order.
    pub port: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
}

/// VIP flag: pass this VIP's packets to the kernel stack (the L7 proxy serves it).
pub const VIP_F_L7: u32 = 1;
/// VIP flag (`forwarding = "ipip"`): a client's packet is sent to its backend
/// untouched inside an outer IPv4 (IPIP) or IPv6 (IP6IP6) header; the backend
/// answers the client directly, so no reply state is kept.
pub const VIP_F_IPIP: u32 = 2;
/// VIP flag (`forwarding = "l2"`): only the destination MAC is changed to the
/// backend's (on the balancer's L2 segment); replies bypass the balancer.
pub const VIP_F_L2: u32 = 4;
/// VIP flag (`mss_clamp = true`, ipip only): the MSS option of a client's SYN
/// is lowered so that the encapsulated segments fit the egress MTU.
pub const VIP_F_MSS_CLAMP: u32 = 8;
/// VIP flag (`hash = "source"`): a new flow's backend comes from the
/// client's address, not its port (`hash::source_hash`), so every flow of a
/// client goes to one backend while the VIP's table does not change
/// (Katran's `F_HASH_NO_SRC_PORT`, IPVS's `sh`, HAProxy's `balance source`).
pub const VIP_F_HASH_SOURCE: u32 = 16;
/// Either direct-server-return mode: the backend replies to the client itself.
pub const VIP_F_DSR: u32 = VIP_F_IPIP | VIP_F_L2;
/// Bytes an outer IPv4 header adds in `ipip` mode.
pub const ENCAP_V4_OVERHEAD: u16 = 20;
/// Bytes an outer IPv6 header adds in `ipip` mode.
pub const ENCAP_V6_OVERHEAD: u16 = 40;
/// TTL / hop limit of the outer header in `ipip` mode.
pub const ENCAP_TTL: u8 = 64;

/// Per-VIP state the data plane checks flows against: a flow created under an
/// older generation is looked up afresh (the VIP was removed, re-added or
/// switched to L7).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipState {
    /// Bumped by userspace whenever the VIP is added, removed or changes mode.
    pub generation: u32,
    /// `VIP_F_*` bits, as in `VipMeta`.
    pub flags: u32,
}

/// Value of the VIP map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VipMeta {
    /// Index into `RINGS` and `VIP_STATS`; below `MAX_VIPS`.
    pub vip_id: u32,
    /// `VIP_F_*` bits.
    pub flags: u32,
}

/// Backend flag: the slot holds a live backend. Flows pinned to a slot without it are re-hashed.
pub const BACKEND_F_VALID: u8 = 1;

/// Value of the backend array: where NAT sends a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Backend {
    /// Backend address, network order; IPv4 in the first 4 bytes.
    pub addr: Addr,
    /// Backend port, host order.
    pub port: u16,
    /// `FAMILY_V4` or `FAMILY_V6`; always the VIP's family (NAT does not translate families).
    pub family: u8,
    /// `BACKEND_F_*` bits.
    pub flags: u8,
    /// VIP id of the service the backend belongs to. The data plane does not
    /// read it; a restarted agent uses it to recognise the slot.
    pub vip_id: u32,
}

/// A Maglev lookup table: `entries[hash % size]` is a backend id.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Ring {
    /// Number of used entries: a prime not above `MAX_RING_SIZE`; 0 means no backend.
    pub size: u32,
    /// Backend ids; only the first `size` are meaningful.
    pub entries: [u32; MAX_RING_SIZE],
}

/// A 5-tuple as seen in one direction of a flow.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    /// Source address, network order.
    pub src: Addr,
    /// Destination address, network order.
    pub dst: Addr,
    /// Source port, host order.
    pub sport: u16,
    /// Destination port, host order.
    pub dport: u16,
    /// `PROTO_TCP` or `PROTO_UDP`.
    pub proto: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Zero; keeps the key free of uninitialised padding.
    pub pad: [u8; 2],
}

/// `Flow::direction` of a client's packets: NAT the destination to the backend.
pub const FLOW_TO_BACKEND: u8 = 1;
/// `Flow::direction` of a backend's replies: NAT the source back to the VIP.
pub const FLOW_TO_CLIENT: u8 = 2;

/// Value of the flow table: one entry per direction of a connection.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Flow {
    /// `FLOW_TO_BACKEND` or `FLOW_TO_CLIENT`.
    pub direction: u8,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// VIP port, host order (the source port a reply gets back).
    pub vip_port: u16,
    /// VIP address (the source address a reply gets back).
    pub vip_addr: Addr,
    /// VIP id, for validation and accounting.
    pub vip_id: u32,
    /// Backend id the connection is pinned to.
    pub backend_id: u32,
    /// `VipState::generation` the flow was created under.
    pub vip_generation: u32,
    /// `flow_time` of the client's latest packet the full program saw (a
    /// UDP flow's, kept current within a cache period; see `UDP_IDLE_UNITS`).
    pub last_seen: u32,
}

/// Value of `CLIENT_HOPS`: the next hop toward one client address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ClientHop {
    /// The destination the hop was looked up for.
    pub addr: Addr,
    /// `FAMILY_V4` or `FAMILY_V6`; 0 = empty slot.
    pub family: u8,
    /// Zero.
    pub pad: [u8; 7],
    /// The cached FIB answer.
    pub hop: NextHop,
}

/// Value of the next-hop cache: where `bpf_fib_lookup` said to send a packet.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NextHop {
    /// `bpf_ktime_get_coarse_ns` after which the entry is stale.
    pub expires_ns: u64,
    /// Egress interface. 16 bits, so that `mtu` fits in the 24 bytes this
    /// value has always had: a cache pinned by an older agent stays usable
    /// (its entries read as this ifindex with `mtu` 0, "unknown", and are
    /// looked up again). An egress interface with a larger ifindex is not
    /// cached.
    pub ifindex: u16,
    /// MTU of the route to the destination (what `bpf_fib_lookup` checks
    /// packets against); 0 = unknown.
    pub mtu: u16,
    /// Source MAC (the egress interface's).
    pub smac: [u8; 6],
    /// Destination MAC (the next hop's).
    pub dmac: [u8; 6],
}

/// Value of `BACKEND_PATHS`: the next hop toward one backend, and what
/// this CPU forwarded to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BackendHop {
    /// The backend address the hop was looked up for (a reused slot's old
    /// entry does not match and is looked up again).
    pub addr: Addr,
    /// The cached FIB answer; `expires_ns` 0 = empty.
    pub hop: NextHop,
    /// Client packets forwarded to the backend.
    pub traffic: Traffic,
}

/// Value of `ENCAP_SOURCES`: where the outer source of `ipip` packets comes from.
///
/// Outer source = `addr | (client's source address ^ source port) & host_mask`
/// on the address's last word (IPv4: its only word; IPv6: the low 32 bits).
/// A zero mask gives one fixed address; a mask over the host bits of a
/// prefix gives each client flow its own source in that prefix, so backends
/// whose NICs spread IPIP traffic over receive queues by outer addresses (as
/// most do) spread it by flow, as Katran does.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EncapSource {
    /// Base address, network order.
    pub addr: Addr,
    /// Host bits taken from the flow, as a network-order word.
    pub host_mask: u32,
    /// 1 when configured; `ipip` packets of a family without one are dropped
    /// (`DropNoEncapSource`).
    pub set: u32,
}

/// An address alone (key of `BACKEND_ADDRS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AddrKey {
    /// Address, network order; IPv4 in the first 4 bytes.
    pub addr: Addr,
    /// `FAMILY_V4` or `FAMILY_V6`.
    pub family: u8,
    /// Zero.
    pub pad: [u8; 3],
}

/// Value of `IF_MACS`: an interface's own MAC address.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IfMac {
    /// The interface the slot is for.
    pub ifindex: u32,
    /// The MAC address frames to this interface carry as destination.
    pub mac: [u8; 6],
    /// 1 when set; an interface without a slot (one the agent did not
    /// attach to) skips the check rather than dropping everything.
    pub set: u8,
    /// Zero.
    pub pad: u8,
}

/// Value of `NEW_FLOW_RATE`: one source prefix's new flows in a fixed window.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RateWindow {
    /// `bpf_ktime_get_coarse_ns` when the window began.
    pub start_ns: u64,
    /// New flows admitted in it.
    pub count: u32,
    /// Zero.
    pub pad: u32,
}

/// Address part of a `DENY_V4` key: its network-order bytes (the LPM key
/// is the prefix length in bits, then these).
pub type DenyKeyV4 = [u8; 4];
/// Address part of a `DENY_V6` key, as `DenyKeyV4`.
pub type DenyKeyV6 = [u8; 16];

/// Value of `SETTINGS[0]`: what the agent tells the data plane from the config.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Settings {
    /// New flows per second per source prefix; 0 = no limit.
    pub new_flow_limit: u32,
    /// Non-zero when `DENY_V4` has entries (an empty trie is then not looked up).
    pub deny_v4: u32,
    /// Non-zero when `DENY_V6` has entries.
    pub deny_v6: u32,
    /// Bumped by the agent after every change that can change what a
    /// `FLOWS` entry means (backends, tables, VIPs, removed flows):
    /// `FLOW_CACHE` slots of another epoch are ignored. (Once `pad`, zero.)
    pub flow_epoch: u32,
}

/// Whether `addr` can never be the source of a packet a client sends: this
/// network (0.0.0.0/8), loopback (127.0.0.0/8), multicast (224.0.0.0/4) and
/// reserved (240.0.0.0/4, broadcast included); for IPv6 the unspecified
/// address, loopback, multicast (ff00::/8) and IPv4-mapped (::ffff:0:0/96).
/// The stack drops these as martians; the data plane must not forward them.
#[inline(always)]
pub fn is_martian_source(addr: &Addr, family: u8) -> bool {
    let b = addr[0].to_ne_bytes();
    if family == FAMILY_V4 {
        return b[0] == 0 || b[0] == 127 || b[0] >= 224;
    }
    if b[0] == 0xff {
        return true;
    }
    if addr[0] != 0 || addr[1] != 0 {
        return false;
    }
    let w3 = addr[3].to_ne_bytes();
    // ::ffff:a.b.c.d
    (addr[2] == u32::from_ne_bytes([0, 0, 0xff, 0xff]))
        // :: and ::1
        || (addr[2] == 0 && w3[0] == 0 && w3[1] == 0 && w3[2] == 0 && w3[3] <= 1)
}

/// Packet and byte counters (one per CPU in the stats maps; userspace sums them).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Traffic {
    /// Packets seen.
    pub packets: u64,
    /// Bytes seen (whole frames).
    pub bytes: u64,
}

/// Why the program returned what it returned; each has a counter in `REASON_STATS`.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reason {
    /// VIP packet sent to its backend (NATed, or in a DSR mode encapsulated
    /// or re-addressed at L2) out of the interface it came in on.
    TxForward = 0,
    /// VIP packet sent to its backend, as `TxForward`, through another interface.
    RedirectForward = 1,
    /// Backend reply translated back to the VIP and sent out the same interface.
    TxReply = 2,
    /// Backend reply translated back to the VIP and redirected to another interface.
    RedirectReply = 3,
    /// Not IPv4/IPv6 (ARP, LLDP, ...): passed.
    PassNotIp = 4,
    /// IP but not for a VIP nor a reply of a NATed flow: passed.
    PassNotVip = 5,
    /// VIP served by the L7 proxy: passed to the stack.
    PassL7 = 6,
    /// IPv4 fragment: passed (ports are unknown).
    PassFragment = 7,
    /// IPv6 with extension headers, or a protocol other than TCP/UDP: passed.
    /// ICMP too, except the errors about NATed flows that are translated
    /// (`TxIcmpToClient`, ...); one that finds no flow is passed untouched.
    PassOtherProto = 8,
    /// Truncated or inconsistent headers: passed untouched for the stack to drop.
    /// (Also an ICMP error whose quoted packet is too short to hold its
    /// ports, or inconsistent.)
    PassMalformed = 9,
    /// Backend reply whose TTL or hop limit would reach zero: passed so the
    /// stack sends ICMP time exceeded to the backend. (For a packet to a VIP,
    /// also when an ICMP answer could not be built.)
    PassTtlExpired = 10,
    /// Rewritten packet whose next hop has no neighbour entry yet: passed for the stack to resolve.
    PassNoNeighbour = 11,
    /// FIB lookup failed (no route, forwarding disabled, ...): dropped.
    DropFibFailed = 12,
    /// VIP without any backend: dropped.
    DropNoBackend = 13,
    /// IPv4 header checksum wrong on a packet that would be NATed: dropped,
    /// as the stack drops it (NAT would otherwise fix it up into a valid one).
    DropBadIpChecksum = 14,
    /// Source that no client can have (0/8, 127/8, 224/4, 240/4; ::, ::1,
    /// ff00::/8, ::ffff:0:0/96) on a new flow to a VIP: dropped.
    DropMartianSource = 15,
    /// New flow to a VIP whose source is the VIP itself or a backend's address: dropped.
    DropSpoofedSource = 16,
    /// Frame to forward whose destination MAC is not the receiving interface's: dropped.
    DropOtherHost = 17,
    /// 802.1Q/802.1ad-tagged frame: passed untouched (NAT would send it to an
    /// untagged link with the client side's tag).
    PassVlan = 18,
    /// Packet to a VIP whose TTL or hop limit runs out here: answered with
    /// ICMP time exceeded from the VIP (XDP_TX).
    TxTimeExceeded = 19,
    /// New flow whose backend reply 5-tuple is that of a live flow of another
    /// VIP (same client address and port, same backend): dropped, since with
    /// destination-only NAT the replies could not be told apart.
    DropReplyCollision = 20,
    /// Packet to a VIP from a source in the configured deny list: dropped.
    DropDenied = 21,
    /// New flow from a source prefix that already opened `new_flow_limit`
    /// flows this second: dropped.
    DropRateLimited = 22,
    /// Packet to a VIP larger than the egress MTU (IPv4 with DF, or IPv6):
    /// answered with ICMP "fragmentation needed" / "packet too big" from the
    /// VIP, carrying the MTU (XDP_TX).
    TxTooBig = 23,
    /// Packet larger than the egress MTU that the stack handles: IPv4
    /// without DF NATed and passed for the stack to fragment; a backend's
    /// reply with DF or IPv6 passed untouched, for the stack to send the
    /// backend "fragmentation needed" / "packet too big".
    PassTooBig = 24,
    /// Packet to an `ipip` VIP that would not fit the egress MTU once
    /// encapsulated and may not be answered with "fragmentation needed"
    /// (IPv4 without DF): dropped, as a router without room to fragment would.
    DropTooBig = 25,
    /// Packet to an `ipip` VIP of a family with no outer source configured
    /// (the agent always sets one; seen only while it starts): dropped.
    DropNoEncapSource = 26,
    /// ICMP error quoting a client's packet to a backend of a NATed flow
    /// (sent by the backend, e.g. port unreachable, or by a router toward
    /// it): translated to quote the client's packet to the VIP (and to come
    /// from the VIP if the backend sent it) and sent out the same interface.
    TxIcmpToClient = 27,
    /// As `TxIcmpToClient`, redirected to another interface.
    RedirectIcmpToClient = 28,
    /// ICMP error addressed to a VIP quoting its reply to a client of a
    /// NATed flow (a router on the client's path, e.g. fragmentation needed
    /// / packet too big): translated to quote the backend's reply and sent
    /// to the backend, out of the same interface.
    TxIcmpToBackend = 29,
    /// As `TxIcmpToBackend`, redirected to another interface.
    RedirectIcmpToBackend = 30,
    /// ICMP or ICMPv6 echo request to an `l4` VIP's address: answered from
    /// the VIP with an echo reply (XDP_TX), as Katran does.
    TxEchoReply = 31,
    /// Packet to an `l4` VIP's address (one no `l7` service shares) that no
    /// service or flow takes: another port or protocol, a fragment, ICMP
    /// that is neither answered nor translated. Dropped: the stack does
    /// not have the address and would route it back out.
    DropVipUnserved = 32,
}

/// Number of `Reason` values (size of `REASON_STATS`).
pub const REASON_COUNT: u32 = 33;

impl Reason {
    /// All reasons, in counter-index order.
    pub const ALL: [Reason; REASON_COUNT as usize] = [
        Reason::TxForward,
        Reason::RedirectForward,
        Reason::TxReply,
        Reason::RedirectReply,
        Reason::PassNotIp,
        Reason::PassNotVip,
        Reason::PassL7,
        Reason::PassFragment,
        Reason::PassOtherProto,
        Reason::PassMalformed,
        Reason::PassTtlExpired,
        Reason::PassNoNeighbour,
        Reason::DropFibFailed,
        Reason::DropNoBackend,
        Reason::DropBadIpChecksum,
        Reason::DropMartianSource,
        Reason::DropSpoofedSource,
        Reason::DropOtherHost,
        Reason::PassVlan,
        Reason::TxTimeExceeded,
        Reason::DropReplyCollision,
        Reason::DropDenied,
        Reason::DropRateLimited,
        Reason::TxTooBig,
        Reason::PassTooBig,
        Reason::DropTooBig,
        Reason::DropNoEncapSource,
        Reason::TxIcmpToClient,
        Reason::RedirectIcmpToClient,
        Reason::TxIcmpToBackend,
        Reason::RedirectIcmpToBackend,
        Reason::TxEchoReply,
        Reason::DropVipUnserved,
    ];

    /// Stable snake_case name, used as a metrics label.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::TxForward => "tx_forward",
            Reason::RedirectForward => "redirect_forward",
            Reason::TxReply => "tx_reply",
            Reason::RedirectReply => "redirect_reply",
            Reason::PassNotIp => "pass_not_ip",
            Reason::PassNotVip => "pass_not_vip",
            Reason::PassL7 => "pass_l7",
            Reason::PassFragment => "pass_fragment",
            Reason::PassOtherProto => "pass_other_proto",
            Reason::PassMalformed => "pass_malformed",
            Reason::PassTtlExpired => "pass_ttl_expired",
            Reason::PassNoNeighbour => "pass_no_neighbour",
            Reason::DropFibFailed => "drop_fib_failed",
            Reason::DropNoBackend => "drop_no_backend",
            Reason::DropBadIpChecksum => "drop_bad_ip_checksum",
            Reason::DropMartianSource => "drop_martian_source",
            Reason::DropSpoofedSource => "drop_spoofed_source",
            Reason::DropOtherHost => "drop_other_host",
            Reason::PassVlan => "pass_vlan",
            Reason::TxTimeExceeded => "tx_time_exceeded",
            Reason::DropReplyCollision => "drop_reply_collision",
            Reason::DropDenied => "drop_denied",
            Reason::DropRateLimited => "drop_rate_limited",
            Reason::TxTooBig => "tx_too_big",
            Reason::PassTooBig => "pass_too_big",
            Reason::DropTooBig => "drop_too_big",
            Reason::DropNoEncapSource => "drop_no_encap_source",
            Reason::TxIcmpToClient => "tx_icmp_to_client",
            Reason::RedirectIcmpToClient => "redirect_icmp_to_client",
            Reason::TxIcmpToBackend => "tx_icmp_to_backend",
            Reason::RedirectIcmpToBackend => "redirect_icmp_to_backend",
            Reason::TxEchoReply => "tx_echo_reply",
            Reason::DropVipUnserved => "drop_vip_unserved",
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: all of these are #[repr(C)] plain data with no padding bytes and no
    // invalid bit patterns, which is what aya::Pod requires.
    unsafe impl aya::Pod for super::VipKey {}
    unsafe impl aya::Pod for super::VipMeta {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::Ring {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::VipState {}
    unsafe impl aya::Pod for super::Traffic {}
    unsafe impl aya::Pod for super::ClientHop {}
    unsafe impl aya::Pod for super::CachedFlow {}
    unsafe impl aya::Pod for super::NextHop {}
    unsafe impl aya::Pod for super::AddrKey {}
    unsafe impl aya::Pod for super::IfMac {}
    unsafe impl aya::Pod for super::RateWindow {}
    unsafe impl aya::Pod for super::Settings {}
    unsafe impl aya::Pod for super::BackendHop {}
    unsafe impl aya::Pod for super::EncapSource {}
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::mem::size_of;

    #[test]
    fn layouts_have_no_padding() {
        // The kernel compares keys bytewise: padding would make equal keys differ.
        assert_eq!(size_of::<VipKey>(), 16 + 2 + 1 + 1);
        assert_eq!(size_of::<VipMeta>(), 8);
        assert_eq!(size_of::<Backend>(), 24);
        assert_eq!(size_of::<FlowKey>(), 16 + 16 + 2 + 2 + 1 + 1 + 2);
        assert_eq!(size_of::<Flow>(), 1 + 1 + 2 + 16 + 4 + 4 + 4 + 4);
        assert_eq!(size_of::<VipState>(), 8);
        assert_eq!(size_of::<Ring>(), 4 + 4 * MAX_RING_SIZE);
        assert_eq!(size_of::<ClientHop>(), 16 + 8 + 24);
        assert_eq!(size_of::<CachedFlow>(), 128);
        assert_eq!(core::mem::offset_of!(CachedFlow, flow), 64);
        assert_eq!(size_of::<NextHop>(), 24);
        assert_eq!(size_of::<AddrKey>(), 20);
        assert_eq!(size_of::<IfMac>(), 12);
        assert_eq!(size_of::<RateWindow>(), 16);
        assert_eq!(size_of::<Settings>(), 16);
        assert_eq!(size_of::<BackendHop>(), 16 + 24 + 16);
        assert_eq!(size_of::<EncapSource>(), 16 + 4 + 4);
    }

    fn v4(s: &str) -> Addr {
        let ip: std::net::Ipv4Addr = s.parse().unwrap();
        let o = ip.octets();
        addr_from_bytes([o[0], o[1], o[2], o[3], 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0])
    }

    fn v6(s: &str) -> Addr {
        let ip: std::net::Ipv6Addr = s.parse().unwrap();
        addr_from_bytes(ip.octets())
    }

    #[test]
    fn martian_sources() {
        for bad in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "224.0.0.1",
            "239.255.255.255",
            "240.0.0.1",
            "255.255.255.255",
        ] {
            assert!(is_martian_source(&v4(bad), FAMILY_V4), "{bad}");
        }
        for good in [
            "1.0.0.0",
            "126.255.255.255",
            "128.0.0.1",
            "198.18.1.2",
            "223.255.255.255",
        ] {
            assert!(!is_martian_source(&v4(good), FAMILY_V4), "{good}");
        }
        for bad in [
            "::",
            "::1",
            "ff02::1",
            "ff0e::1234",
            "::ffff:1.2.3.4",
            "::ffff:0.0.0.0",
        ] {
            assert!(is_martian_source(&v6(bad), FAMILY_V6), "{bad}");
        }
        for good in [
            "::2",
            "fd00:18:1::2",
            "2001:db8::1",
            "fe80::1",
            "::fffe:1.2.3.4",
            "1::1",
        ] {
            assert!(!is_martian_source(&v6(good), FAMILY_V6), "{good}");
        }
    }

    #[test]
    fn reasons_are_indexed_in_order() {
        for (i, r) in Reason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }
}
