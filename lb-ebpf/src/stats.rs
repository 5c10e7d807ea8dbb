//! Per-CPU counters: no atomics needed, userspace sums the CPUs. A
//! forwarded packet updates two: its reason's and its backend's.

use aya_ebpf::maps::PerCpuArray;
use lb_common::{Reason, Traffic};

use crate::{
    maps::{BACKEND_PATHS, REASON_STATS},
    verdict::Verdict,
};

#[inline(always)]
fn add(map: &PerCpuArray<Traffic>, index: u32, len: u64) {
    if let Some(t) = map.get_ptr_mut(index) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += len;
        }
    }
}

/// Counts one packet against the decision taken for it (`Reason` index).
#[inline(always)]
pub fn count_reason(reason: u32, len: u64) {
    add(&REASON_STATS, reason, len);
}

/// Counts a client packet `verdict` forwarded to backend `backend_id` (and
/// so for its VIP: backend ids are per VIP, the agent sums them), in the
/// backend's `BACKEND_PATHS` slot, which the hit path has just read for
/// the next hop.
#[inline(always)]
pub fn count_forwarded(verdict: Verdict, backend_id: u32, len: u64) {
    if (verdict.is(Reason::TxForward) || verdict.is(Reason::RedirectForward))
        && let Some(path) = BACKEND_PATHS.get_ptr_mut(backend_id)
    {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*path).traffic.packets += 1;
            (*path).traffic.bytes += len;
        }
    }
}
