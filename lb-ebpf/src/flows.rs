//! The flow lookup of every packet: this CPU's `FLOW_CACHE` slot first,
//! `FLOWS` on a miss (see `MAP_FLOW_CACHE` in lb-common for why and how the
//! cache stays coherent).

use lb_common::{Flow, FlowKey, flow_cache_slot};

use crate::maps::{FLOW_CACHE, FLOW_EPOCH, FLOWS, SETTINGS};

/// The two epochs a cached copy must have been read under.
#[inline(always)]
fn epochs() -> (u32, u32) {
    let agent = SETTINGS.get(0).map_or(0, |s| s.flow_epoch);
    let dp = FLOW_EPOCH.get(0).copied().unwrap_or(0) as u32;
    (agent, dp)
}

/// The `FLOWS` entry of `key`, from this CPU's cache when it holds a copy
/// of the current epochs (a `FLOWS` hit refills the slot).
#[inline(always)]
pub fn lookup(key: &FlowKey) -> Option<Flow> {
    let (agent, dp) = epochs();
    let slot = FLOW_CACHE.get_ptr_mut(flow_cache_slot(key))?;
    // SAFETY: a per-CPU slot: only this program on this CPU uses it.
    let slot = unsafe { &mut *slot };
    if slot.agent_epoch == agent && slot.dp_epoch == dp && slot.key == *key {
        return Some(slot.flow);
    }
    // SAFETY: LRU entries are written whole by this program; a racing update
    // at worst yields the previous value for the same 5-tuple.
    let flow = *unsafe { FLOWS.get(key) }?;
    slot.key = *key;
    slot.flow = flow;
    slot.agent_epoch = agent;
    slot.dp_epoch = dp;
    Some(flow)
}

/// Records in this CPU's cache that `key`'s `FLOWS` entry is now `flow`
/// (the data plane just wrote it), if the slot holds that key.
#[inline(always)]
pub fn written(key: &FlowKey, flow: &Flow) {
    if let Some(slot) = FLOW_CACHE.get_ptr_mut(flow_cache_slot(key)) {
        // SAFETY: as in `lookup`.
        let slot = unsafe { &mut *slot };
        if slot.key == *key {
            slot.flow = *flow;
        }
    }
}

/// Writes a reply entry into `FLOWS` (and this CPU's cache). When it
/// replaces another VIP's entry (a dead connection's, see
/// `reply_collides`), every CPU's copies are made stale after the write.
// By reference on purpose, as the callers in main.rs.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn insert_reply(key: &FlowKey, flow: &Flow) {
    // SAFETY: LRU entries are written whole by this program.
    let replaces = match unsafe { FLOWS.get(key) } {
        Some(old) => old.vip_addr != flow.vip_addr || old.vip_port != flow.vip_port,
        None => false,
    };
    let _ = FLOWS.insert(key, flow, 0);
    written(key, flow);
    if replaces {
        bump_epoch();
    }
}

/// Makes every CPU's cached copies stale: the data plane has just given an
/// existing `FLOWS` entry another meaning. Called after the write, so a
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
