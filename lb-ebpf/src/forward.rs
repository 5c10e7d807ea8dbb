//! Next hop from the kernel FIB, then XDP_TX or XDP_REDIRECT.

use aya_ebpf::{
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        bpf_fib_lookup as FibParams, xdp_action, xdp_md,
    },
    helpers::{bpf_fib_lookup, bpf_ktime_get_coarse_ns, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{Addr, FAMILY_V4, NEXTHOP_TTL_NS, NextHop, Reason, client_hop_slot};
use network_types::{eth::EthHdr, ip::Ipv4Hdr};

use crate::{
    icmp,
    maps::{BACKEND_PATHS, CLIENT_HOPS},
    nat::{self, Side},
    parse::{Packet, ptr_at},
    verdict::Verdict,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;
/// IPv4 "don't fragment" flag in the flags/offset word.
const IP_DF: u16 = 0x4000;

/// Where a packet is going: to a backend (its id selects the per-backend
/// next-hop cache) or back to a client.
#[derive(Clone, Copy)]
pub enum Toward {
    /// A client's packet to the backend with this id.
    Backend(u32),
    /// A backend's reply to a client.
    Client,
}

/// NATs `side` of the packet to `addr:port` and sends it toward its new
/// destination.
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    pkt: &Packet,
    addr: &Addr,
    port: u16,
    side: Side,
    toward: Toward,
) -> Verdict {
    if pkt.ttl <= 1 {
        // A backend's reply (a packet to a VIP was answered before it got
        // here): the stack sends ICMP time exceeded to the backend.
        return Verdict::new(xdp_action::XDP_PASS, Reason::PassTtlExpired);
    }
    let (src, dst) = match side {
        Side::Destination => (&pkt.key.src, addr),
        Side::Source => (addr, &pkt.key.dst),
    };
    let mut hop = NextHop::default();
    let lookup = match toward {
        Toward::Backend(id) => backend_hop(ctx.ctx, pkt, id, dst, &mut hop),
        Toward::Client => next_hop(ctx.ctx, pkt, dst, src, &mut hop),
    };
    match lookup {
        Lookup::Found if pkt.ip_len > hop.mtu => {
            return too_big(ctx, pkt, addr, port, side, hop.mtu);
        }
        Lookup::Found => {}
        Lookup::TooBig => return too_big(ctx, pkt, addr, port, side, hop.mtu),
        Lookup::NoNeighbour => {
            // The stack resolves the neighbour and forwards this (already NATed) packet.
            return match nat::rewrite(ctx, pkt, side, addr, port, false) {
                Ok(()) => Verdict::new(xdp_action::XDP_PASS, Reason::PassNoNeighbour),
                Err(reason) => Verdict::new(xdp_action::XDP_PASS, reason),
            };
        }
        Lookup::Failed => return Verdict::new(xdp_action::XDP_DROP, Reason::DropFibFailed),
    }
    deliver(ctx, pkt, addr, port, side, toward, &hop)
}

/// NATs `side` of a packet that fits `hop` (its TTL above 1) and sends it there.
#[inline(always)]
pub fn deliver(
    ctx: &XdpContext,
    pkt: &Packet,
    addr: &Addr,
    port: u16,
    side: Side,
    toward: Toward,
    hop: &NextHop,
) -> Verdict {
    if let Err(reason) = nat::rewrite(ctx, pkt, side, addr, port, true) {
        return Verdict::new(xdp_action::XDP_PASS, reason);
    }
    match toward {
        Toward::Backend(_) => transmit(ctx, hop, Reason::TxForward, Reason::RedirectForward),
        Toward::Client => transmit(ctx, hop, Reason::TxReply, Reason::RedirectReply),
    }
}

/// A packet larger than the egress `mtu`. IPv4 without DF may be
/// fragmented: NATed and passed, the stack fragments and forwards it. With
/// DF, or IPv6: a client's packet to a VIP is answered from the VIP (the
/// stack has no route for the VIP and could not answer); a backend's reply
/// is passed untouched, and the stack answers the backend, as the router
/// on its path.
#[inline(always)]
fn too_big(
    ctx: &XdpContext,
    pkt: &Packet,
    addr: &Addr,
    port: u16,
    side: Side,
    mtu: u16,
) -> Verdict {
    let may_fragment = pkt.key.family == FAMILY_V4
        && match ptr_at::<Ipv4Hdr>(ctx, pkt.l3) {
            // SAFETY: bounds-checked by ptr_at.
            Some(ip) => u16::from_be_bytes(unsafe { (*ip).frags }) & IP_DF == 0,
            None => false,
        };
    if may_fragment {
        return match nat::rewrite(ctx, pkt, side, addr, port, false) {
            Ok(()) => Verdict::new(xdp_action::XDP_PASS, Reason::PassTooBig),
            Err(reason) => Verdict::new(xdp_action::XDP_PASS, reason),
        };
    }
    match side {
        Side::Destination => icmp::too_big(ctx, pkt, mtu),
        Side::Source => Verdict::new(xdp_action::XDP_PASS, Reason::PassTooBig),
    }
}

/// Outcome of a next-hop lookup.
#[repr(u32)]
pub enum Lookup {
    /// Next hop written to the out parameter.
    Found,
    /// Route found but the neighbour is not resolved yet (or the egress
    /// interface's index does not fit `NextHop`): the stack forwards it.
    NoNeighbour,
    /// The packet is larger than the route's MTU, written to the out
    /// parameter's `mtu`.
    TooBig,
    /// No usable route.
    Failed,
}

/// This CPU's cached next hop toward `dst` (a client), into `out`, if it
/// is fresh at `now` and for that address.
#[inline(always)]
pub fn cached_client_hop(pkt: &Packet, dst: &Addr, now: u64, out: &mut NextHop) -> bool {
    let Some(slot) = CLIENT_HOPS.get(client_hop_slot(dst)) else {
        return false;
    };
    if slot.hop.expires_ns > now
        && slot.hop.mtu != 0
        && slot.family == pkt.key.family
        && slot.addr == *dst
    {
        *out = slot.hop;
        return true;
    }
    false
}

/// This CPU's cached next hop toward backend `id` at `dst`, into `out`, if
/// it is fresh at `now` and still for that address.
#[inline(always)]
pub fn cached_backend_hop(id: u32, dst: &Addr, now: u64, out: &mut NextHop) -> bool {
    let Some(slot) = BACKEND_PATHS.get(id) else {
        return false;
    };
    if slot.hop.expires_ns > now && slot.hop.mtu != 0 && slot.addr == *dst {
        *out = slot.hop;
        return true;
    }
    false
}

/// The next hop toward `dst` (a client): from this CPU's `CLIENT_HOPS`
/// slot while it is fresh and for that address, else from `bpf_fib_lookup`
/// (whose answer then takes the slot).
#[inline(always)]
fn next_hop(ctx: *mut xdp_md, pkt: &Packet, dst: &Addr, src: &Addr, out: &mut NextHop) -> Lookup {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if cached_client_hop(pkt, dst, now, out) {
        return Lookup::Found;
    }
    let found = fib(ctx, pkt, dst, src, now, out);
    if let Lookup::Found = found
        && let Some(slot) = CLIENT_HOPS.get_ptr_mut(client_hop_slot(dst))
    {
        // SAFETY: per-CPU slot: only this program on this CPU uses it.
        let slot = unsafe { &mut *slot };
        slot.addr = *dst;
        slot.family = pkt.key.family;
        slot.hop = *out;
    }
    found
}

/// The next hop toward backend `id` at `dst`: one per-CPU array read while
/// the entry is fresh and still for that address, else `bpf_fib_lookup`
/// (whose answer is then cached in the slot).
#[inline(always)]
pub fn backend_hop(
    ctx: *mut xdp_md,
    pkt: &Packet,
    id: u32,
    dst: &Addr,
    out: &mut NextHop,
) -> Lookup {
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if cached_backend_hop(id, dst, now, out) {
        return Lookup::Found;
    }
    let found = fib(ctx, pkt, dst, &pkt.key.src, now, out);
    if let Lookup::Found = found
        && let Some(slot) = BACKEND_PATHS.get_ptr_mut(id)
    {
        // SAFETY: per-CPU slot: only this program on this CPU uses it.
        let slot = unsafe { &mut *slot };
        slot.addr = *dst;
        slot.hop = *out;
    }
    found
}

/// Asks `bpf_fib_lookup` for the next hop toward `dst` and the route's MTU.
#[inline(always)]
fn fib(
    ctx: *mut xdp_md,
    pkt: &Packet,
    dst: &Addr,
    src: &Addr,
    now: u64,
    out: &mut NextHop,
) -> Lookup {
    // SAFETY: plain-old-data struct; all-zero is a valid request.
    let mut fib: FibParams = unsafe { core::mem::zeroed() };
    if pkt.key.family == FAMILY_V4 {
        fib.family = AF_INET;
        fib.__bindgen_anon_3.ipv4_src = src[0];
        fib.__bindgen_anon_4.ipv4_dst = dst[0];
    } else {
        fib.family = AF_INET6;
        fib.__bindgen_anon_3.ipv6_src = *src;
        fib.__bindgen_anon_4.ipv6_dst = *dst;
    }
    fib.l4_protocol = pkt.key.proto;
    fib.__bindgen_anon_1.tot_len = pkt.ip_len;
    // SAFETY: ctx is the program's context pointer.
    fib.ifindex = unsafe { (*ctx).ingress_ifindex };
    // SAFETY: helper call with a correctly sized parameter block.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_NO_NEIGH as i64 {
        return Lookup::NoNeighbour;
    }
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: the helper wrote the MTU into this union member.
        out.mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
        return Lookup::TooBig;
    }
    if rc != BPF_FIB_LKUP_RET_SUCCESS as i64 {
        return Lookup::Failed;
    }
    let egress = fib.ifindex;
    if egress > u16::MAX as u32 {
        // Does not fit NextHop (see there): the stack forwards this one.
        return Lookup::NoNeighbour;
    }
    *out = NextHop {
        expires_ns: now + NEXTHOP_TTL_NS,
        ifindex: egress as u16,
        mtu: pkt.ip_len,
        smac: fib.smac,
        dmac: fib.dmac,
    };
    // The route's MTU, for the packets that will use this entry: the helper
    // reports it only for a packet that exceeds it, so ask for the largest.
    // SAFETY: ctx is the program's context pointer.
    fib.ifindex = unsafe { (*ctx).ingress_ifindex };
    fib.__bindgen_anon_1.tot_len = u16::MAX;
    // SAFETY: as above.
    let rc = unsafe {
        bpf_fib_lookup(
            ctx as *mut _,
            &mut fib,
            core::mem::size_of::<FibParams>() as i32,
            0,
        )
    };
    if rc == BPF_FIB_LKUP_RET_FRAG_NEEDED as i64 {
        // SAFETY: as above.
        out.mtu = unsafe { fib.__bindgen_anon_1.mtu_result };
    } else if rc == BPF_FIB_LKUP_RET_SUCCESS as i64 {
        out.mtu = u16::MAX;
    }
    Lookup::Found
}

/// The next hop for a packet its caller rewrites itself (an ICMP error
/// about a NATed flow, see `icmp_nat`), toward `pkt.key.dst` from
/// `pkt.key.src` (the addresses it will leave with), found as `send` finds
/// it and written to `hop`. `Ok(true)`: rewrite it (TTL decremented) and
/// `transmit` it. `Ok(false)`: no neighbour yet, rewrite it without the
/// TTL decrement and pass it (`PassNoNeighbour`): the stack forwards it.
/// `Err`: what to do with it untouched: larger than the route's MTU, passed
/// (nothing answers an ICMP error with another); no route, dropped.
#[inline(always)]
pub fn route(ctx: &XdpContext, pkt: &Packet, hop: &mut NextHop) -> Result<bool, Verdict> {
    match next_hop(ctx.ctx, pkt, &pkt.key.dst, &pkt.key.src, hop) {
        Lookup::Found if pkt.ip_len > hop.mtu => {
            Err(Verdict::new(xdp_action::XDP_PASS, Reason::PassTooBig))
        }
        Lookup::Found => Ok(true),
        Lookup::TooBig => Err(Verdict::new(xdp_action::XDP_PASS, Reason::PassTooBig)),
        Lookup::NoNeighbour => Ok(false),
        Lookup::Failed => Err(Verdict::new(xdp_action::XDP_DROP, Reason::DropFibFailed)),
    }
}

/// Sends a rewritten packet to the next hop `route` found: its MAC
/// addresses, then XDP_TX (counted as `tx`) out of the interface it came
/// in on, or XDP_REDIRECT (`redirect`) to another.
#[inline(always)]
pub fn transmit(ctx: &XdpContext, hop: &NextHop, tx: Reason, redirect: Reason) -> Verdict {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return Verdict::new(xdp_action::XDP_PASS, Reason::PassMalformed);
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        (*eth).dst_addr = hop.dmac;
        (*eth).src_addr = hop.smac;
    }
    let egress = hop.ifindex as u32;
    if egress == ctx.ingress_ifindex() as u32 {
        return Verdict::new(xdp_action::XDP_TX, tx);
    }
    // SAFETY: helper call; returns XDP_REDIRECT, or XDP_ABORTED on a bad ifindex.
    Verdict::new(unsafe { bpf_redirect(egress, 0) } as u32, redirect)
}
