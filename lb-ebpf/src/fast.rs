//! The attached program's own work (`lb_xdp`): a packet of an established
//! flow whose copy in this CPU's flow cache (`flows::cached`) says all it needs, with a fresh
//! next hop in this CPU's cache, forwarded exactly as the full program
//! would. Anything else (new flows, ICMP, other traffic, stale next hops,
//! packets too big, expiring TTLs, SYNs) is left untouched and
//! uncounted for the full program (`lb_xdp_full`), which `lb_xdp`
//! tail-calls.
//!
//! Why two programs: the full one is about 85 KB of machine code, and an
//! established flow's path through it touches instruction cache lines all
//! over it. Under load, between two packets of a flow, the CPU runs the
//! TCP stack, the backends and the clients, and those lines are gone: the
//! live cost per packet was three times the warm one. This program is the
//! hot path alone, compact enough to stay cached.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, programs::XdpContext};
use lb_common::{FAMILY_V4, FLOW_TO_CLIENT, NextHop, VIP_F_DSR};

use crate::{
    checks, dsr, flows,
    forward::{self, Toward},
    nat::Side,
    parse::{self, Packet, TCP_SYN},
    stats,
    verdict::Verdict,
};

/// The verdict for an established flow's packet, or `None` (nothing
/// touched) for the full program to decide.
#[inline(always)]
pub fn forward(ctx: &XdpContext) -> Option<Verdict> {
    // Two copies of `hit`: in the one for plain IPv4, the common case, the
    // compiler drops every IPv6 branch and the key's zero words, which
    // halves the instructions (and cold cache lines) a packet runs through.
    match parse::parse_plain_v4(ctx) {
        Some(pkt) => hit(ctx, &pkt),
        None => hit(ctx, &parse::parse(ctx).ok()?),
    }
}

/// `forward` for a parsed packet.
#[inline(always)]
fn hit(ctx: &XdpContext, pkt: &Packet) -> Option<Verdict> {
    // The full program answers expiring packets.
    if pkt.ttl <= 1 {
        return None;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    let cached = flows::cached(&pkt.key, now)?;
    let mut hop = NextHop::default();
    if cached.resolved == 0 {
        // A backend's reply (NAT): back to the client from the VIP.
        if cached.flow.direction != FLOW_TO_CLIENT {
            return None;
        }
        let (vip, port) = (cached.flow.vip_addr, cached.flow.vip_port);
        checks::forwardable(ctx, pkt, true).ok()?;
        if !forward::cached_client_hop(pkt, &pkt.key.dst, now, &mut hop) || pkt.ip_len > hop.mtu {
            return None;
        }
        let side = Side::Source;
        return Some(forward::deliver(
            ctx,
            pkt,
            &vip,
            port,
            side,
            Toward::Client,
            &hop,
        ));
    }
    // A client's SYN is a new connection, whatever the slot says (see
    // `Older` in main.rs): the full program decides.
    if pkt.tcp_flags & TCP_SYN != 0 {
        return None;
    }
    // A resolved slot's backend is of the packet's family. A plain IPv4
    // flow's DSR hit reads only the slot's first line.
    let flags = cached.vip_flags;
    let backend_id = cached.backend_id;
    let addr = if pkt.key.family == FAMILY_V4 {
        [cached.backend_addr0, 0, 0, 0]
    } else {
        cached.backend.addr
    };
    let dsr = flags & VIP_F_DSR != 0;
    checks::forwardable(ctx, pkt, !dsr).ok()?;
    if !forward::cached_backend_hop(backend_id, &addr, now, &mut hop) {
        return None;
    }
    let len = (ctx.data_end() - ctx.data()) as u64;
    let verdict = if dsr {
        let overhead = dsr::overhead(pkt, flags);
        if pkt.ip_len as u32 + overhead as u32 > hop.mtu as u32 {
            return None;
        }
        dsr::deliver(ctx, pkt, &addr, overhead, &hop, dsr::FORWARDED)
    } else {
        if pkt.ip_len > hop.mtu {
            return None;
        }
        let toward = Toward::Backend(backend_id);
        let port = cached.backend.port;
        forward::deliver(ctx, pkt, &addr, port, Side::Destination, toward, &hop)
    };
    stats::count_forwarded(verdict, backend_id, len);
    Some(verdict)
}
