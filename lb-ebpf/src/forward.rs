//! Next hop from the kernel FIB, then XDP_TX or XDP_REDIRECT.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS, bpf_fib_lookup as FibParams,
        xdp_action,
    },
    helpers::{bpf_fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, Reason};
use network_types::eth::EthHdr;

use crate::{
    nat::{self, Side},
    parse::{Packet, ptr_at},
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

#[inline(always)]
fn words(a: &[u8; 16]) -> [u32; 4] {
    [
        u32::from_ne_bytes([a[0], a[1], a[2], a[3]]),
        u32::from_ne_bytes([a[4], a[5], a[6], a[7]]),
        u32::from_ne_bytes([a[8], a[9], a[10], a[11]]),
        u32::from_ne_bytes([a[12], a[13], a[14], a[15]]),
    ]
}

/// NATs `side` of the packet to `addr:port` and sends it toward its new
/// destination. `to_backend` selects which pair of reasons is reported.
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    pkt: &Packet,
    addr: &[u8; 16],
    port: u16,
    side: Side,
    to_backend: bool,
) -> (u32, Reason) {
    if pkt.ttl <= 1 {
        // Let the stack answer with ICMP time exceeded.
        return (xdp_action::XDP_PASS, Reason::PassTtlExpired);
    }
    let (src, dst) = match side {
        Side::Destination => (&pkt.key.src, addr),
        Side::Source => (addr, &pkt.key.dst),
    };
    // SAFETY: plain-old-data struct; all-zero is a valid request.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    if pkt.key.family == FAMILY_V4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = words(src)[0];
        fib.__bindgen_anon_4.ipv4_dst = words(dst)[0];
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = words(src);
        fib.__bindgen_anon_4.ipv6_dst = words(dst);
    }
    fib.l4_protocol = pkt.key.proto;
    fib.__bindgen_anon_1.tot_len = pkt.ip_len;
    let ingress = ctx.ingress_ifindex() as u32;
    fib.ifindex = ingress;
    // SAFETY: helper call with a correctly sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx.ctx as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        // The stack resolves the neighbour and forwards this (already NATed) packet.
        return match nat::rewrite(ctx, pkt, side, addr, port, false) {
            Ok(()) => (xdp_action::XDP_PASS, Reason::PassNoNeighbour),
            Err(reason) => (xdp_action::XDP_PASS, reason),
        };
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return (xdp_action::XDP_DROP, Reason::DropFibFailed);
    }
    if let Err(reason) = nat::rewrite(ctx, pkt, side, addr, port, true) {
        return (xdp_action::XDP_PASS, reason);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_PASS, Reason::PassMalformed);
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        (*eth).dst_addr = fib.dmac;
        (*eth).src_addr = fib.smac;
    }
    if fib.ifindex == ingress {
        let reason = if to_backend {
            Reason::TxForward
        } else {
            Reason::TxReply
        };
        return (xdp_action::XDP_TX, reason);
    }
    let reason = if to_backend {
        Reason::RedirectForward
    } else {
        Reason::RedirectReply
    };
    // SAFETY: helper call; returns XDP_REDIRECT, or XDP_ABORTED on a bad ifindex.
    (unsafe { bpf_redirect(fib.ifindex, 0) } as u32, reason)
}
