//! Per-CPU counters: no atomics needed, userspace sums the CPUs.

use aya_ebpf::maps::PerCpuArray;
use lb_common::Traffic;

use crate::maps::{BACKEND_STATS, REASON_STATS, VIP_STATS};

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

/// Counts one client packet forwarded for a VIP.
#[inline(always)]
pub fn count_vip(vip_id: u32, len: u64) {
    add(&VIP_STATS, vip_id, len);
}

/// Counts one client packet forwarded to a backend.
#[inline(always)]
pub fn count_backend(backend_id: u32, len: u64) {
    add(&BACKEND_STATS, backend_id, len);
}
