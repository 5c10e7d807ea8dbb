//! The flow lookup of every packet: this CPU's `FLOW_CACHE` slot first,
//! the protocol's flow table (`table`) on a miss (see `MAP_FLOW_CACHE` in
//! lb-common for why and how the cache stays coherent).

use aya_ebpf::helpers::{bpf_get_smp_processor_id, bpf_ktime_get_coarse_ns};
use lb_common::{
    BACKEND_F_VALID, CachedFlow, FAMILY_V4, FLOW_CACHE_PERIOD_SHIFT, FLOW_CACHE_SLOTS,
    FLOW_TO_BACKEND, Flow, FlowKey, PROTO_UDP, UDP_IDLE_UNITS, flow_cache_slot, flow_time,
};

use aya_ebpf::maps::LruHashMap;

use crate::maps::{BACKENDS, FLOW_CACHE, FLOW_EPOCH, FLOWS, SETTINGS, UDP_FLOWS, VIP_STATE};

/// The flow table of a protocol: `UDP_FLOWS` for UDP, `FLOWS` for TCP (see
/// `MAP_UDP_FLOWS` in lb-common for why they are apart).
#[inline(always)]
pub fn table(proto: u8) -> &'static LruHashMap<FlowKey, Flow> {
    if proto == PROTO_UDP {
        &UDP_FLOWS
    } else {
        &FLOWS
    }
}

/// This CPU's `FLOW_CACHE` slot for `key`: CPUs own consecutive runs of
/// `FLOW_CACHE_SLOTS`.
#[inline(always)]
fn slot_index(key: &FlowKey) -> u32 {
    // SAFETY: helper without arguments (inlined by the verifier).
    let cpu = unsafe { bpf_get_smp_processor_id() };
    cpu * FLOW_CACHE_SLOTS + flow_cache_slot(key)
}

/// The two epochs a cached copy must have been read under, at `now` (ns,
/// coarse monotonic): the data plane's moves on with the clock too.
#[inline(always)]
fn epochs(now: u64) -> (u32, u32) {
    let agent = SETTINGS.get(0).map_or(0, |s| s.flow_epoch);
    let dp = FLOW_EPOCH.get(0).copied().unwrap_or(0) as u32;
    (
        agent,
        dp.wrapping_add((now >> FLOW_CACHE_PERIOD_SHIFT) as u32),
    )
}

/// This CPU's cached copy of `key`'s flow entry if it holds one of the
/// current epochs at `now`; never reads a flow table (the fast path leaves a
/// miss to the full program, which refills the slot).
#[inline(always)]
pub fn cached(key: &FlowKey, now: u64) -> Option<&'static CachedFlow> {
    let (agent, dp) = epochs(now);
    let slot = FLOW_CACHE.get(slot_index(key))?;
    if slot.agent_epoch == agent && slot.dp_epoch == dp && same_key(&slot.key, key) {
        return Some(slot);
    }
    None
}

/// `a == b` in fewer instructions: ports, protocol and family first, then
/// the addresses' first words, then (IPv6 only) the rest. An IPv4 key's
/// other address words are zero, in a slot as in a parsed packet.
#[inline(always)]
fn same_key(a: &FlowKey, b: &FlowKey) -> bool {
    let tail = |k: &FlowKey| (k.sport, k.dport, k.proto, k.family);
    if tail(a) != tail(b) || a.src[0] != b.src[0] || a.dst[0] != b.dst[0] {
        return false;
    }
    b.family == FAMILY_V4
        || (a.src[1] == b.src[1]
            && a.src[2] == b.src[2]
            && a.src[3] == b.src[3]
            && a.dst[1] == b.dst[1]
            && a.dst[2] == b.dst[2]
            && a.dst[3] == b.dst[3])
}

/// This CPU's cached copy of `key`'s flow entry, filled from its `table`
/// (and resolved, see `CachedFlow`) when it does not hold one of the
/// current epochs. A UDP client's entry idle for over `UDP_IDLE_UNITS` is
/// none (the flow is new again); one seen in an earlier unit is brought
/// up to date. The reference stays valid until this program writes the
/// cache again (`written`): callers copy what they need before that.
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<&'static CachedFlow> {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let (agent, dp) = epochs(now);
    let slot = FLOW_CACHE.get_ptr_mut(slot_index(key))?;
    // SAFETY: this CPU's slot: only this program on this CPU uses it.
    let slot = unsafe { &mut *slot };
    if slot.agent_epoch == agent && slot.dp_epoch == dp && slot.key == *key {
        return Some(slot);
    }
    let flow = table(key.proto).get_ptr_mut(key)?;
    // SAFETY: LRU entries are written whole by this program; a racing update
    // at worst yields the previous value for the same 5-tuple, and
    // `last_seen` is one aligned word.
    let flow = unsafe { &mut *flow };
    if key.proto == PROTO_UDP && flow.direction == FLOW_TO_BACKEND {
        let seen = flow_time(now);
        if seen.wrapping_sub(flow.last_seen) > UDP_IDLE_UNITS {
            return None;
        }
        if flow.last_seen != seen {
            flow.last_seen = seen;
        }
    }
    slot.key = *key;
    slot.flow = *flow;
    slot.agent_epoch = agent;
    slot.dp_epoch = dp;
    slot.resolved = 0;
    if flow.direction == FLOW_TO_BACKEND
        && let Some(state) = VIP_STATE.get(flow.vip_id)
        && state.generation == flow.vip_generation
        && let Some(backend) = BACKENDS.get(flow.backend_id)
        && backend.flags & BACKEND_F_VALID != 0
        && backend.family == key.family
    {
        slot.vip_flags = state.flags;
        slot.backend = *backend;
        slot.backend_id = flow.backend_id;
        slot.backend_addr0 = backend.addr[0];
        slot.resolved = 1;
    }
    Some(slot)
}

/// Drops this CPU's cached copy of `key`'s flow entry (the data plane
/// is rewriting it); the next packet reads and resolves it afresh.
#[inline(always)]
pub fn written(key: &FlowKey) {
    if let Some(slot) = FLOW_CACHE.get_ptr_mut(slot_index(key)) {
        // SAFETY: as in `lookup`.
        let slot = unsafe { &mut *slot };
        if slot.key == *key {
            slot.key.family = 0;
        }
    }
}

/// Writes a reply entry into its flow `table` (and this CPU's cache). When it
/// replaces another VIP's entry (a dead connection's, see
/// `reply_collides`), every CPU's copies are made stale after the write.
// By reference on purpose, as the callers in main.rs.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn insert_reply(key: &FlowKey, flow: &Flow) {
    // SAFETY: LRU entries are written whole by this program.
    let flows = table(key.proto);
    let replaces = match unsafe { flows.get(key) } {
        Some(old) => old.vip_addr != flow.vip_addr || old.vip_port != flow.vip_port,
        None => false,
    };
    let _ = flows.insert(key, flow, 0);
    written(key);
    if replaces {
        bump_epoch();
    }
}

/// Makes every CPU's cached copies stale: the data plane has just given an
/// existing flow entry another meaning. Called after the write, so a
/// copy read before it carries the old epoch. Not atomic (this target has
/// no atomic add in `core`): two CPUs bumping at once may add one instead
/// of two, but the epoch still moves past every copy read before.
#[inline(always)]
pub fn bump_epoch() {
    if let Some(epoch) = FLOW_EPOCH.get_ptr_mut(0) {
        // SAFETY: a valid, aligned u64 in the map.
        unsafe { *epoch = (*epoch).wrapping_add(1) };
    }
}
