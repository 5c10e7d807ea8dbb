//! Direct server return: a client's packet goes to its backend untouched,
//! inside an outer IP header (`ipip`) or with only its destination MAC
//! changed (`l2`). The backend answers the client itself, so nothing about
//! the reply direction is kept or seen here.
//!
//! Cost of an established flow's packet on top of the flow lookup: one
//! per-CPU array read for the next hop (`BACKEND_PATHS`); for `ipip` one
//! `bpf_xdp_adjust_head`, an array read for the outer source and a 20-byte
//! header checksum (IPv6 has none).

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_load_bytes, bpf_xdp_store_bytes},
    programs::XdpContext,
};
use lb_common::{
    Backend, ENCAP_SRC_V4, ENCAP_SRC_V6, ENCAP_TTL, ENCAP_V4_OVERHEAD, ENCAP_V6_OVERHEAD,
    FAMILY_V4, NextHop, PROTO_TCP, Reason, VIP_F_IPIP, VIP_F_MSS_CLAMP, addr_to_bytes,
    csum::CsumDelta,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
};

use crate::{
    forward::{self, Lookup},
    icmp,
    maps::{ENCAP_SOURCES, scratch},
    parse::{Packet, TCP_SYN, ptr_at},
    verdict::Verdict,
};

/// IPv4 "don't fragment" flag in the flags/offset word.
const IP_DF: u16 = 0x4000;
/// IP protocol number of IPv4-in-IPv4.
const IPPROTO_IPIP: u8 = 4;
/// IPv6 next header of IPv6-in-IPv6.
const IPPROTO_IPV6: u8 = 41;
/// TCP option kinds.
const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
/// Most TCP option bytes (data offset 15).
pub const TCP_OPTIONS_MAX: usize = 40;
/// Most TCP options (NOPs included) looked at for the MSS; every common
/// stack puts it first.
const MAX_TCP_OPTIONS: usize = 16;

/// Sends a client's packet to `backend` in the VIP's DSR mode (`flags`).
#[inline(always)]
pub fn send(
    ctx: &XdpContext,
    pkt: &Packet,
    backend_id: u32,
    backend: &Backend,
    flags: u32,
) -> Verdict {
    let mut hop = NextHop::default();
    let overhead = overhead(pkt, flags);
    match forward::backend_hop(ctx.ctx, pkt, backend_id, &backend.addr, &mut hop) {
        Lookup::Found => {}
        // The FIB checked our small request against the route's MTU.
        Lookup::TooBig => return too_big(ctx, pkt, hop.mtu, overhead),
        // The stack cannot send a packet for a VIP anywhere useful; wait
        // for the neighbour (the agent's health checks resolve it).
        Lookup::NoNeighbour | Lookup::Failed => {
            return Verdict::new(xdp_action::XDP_DROP, Reason::DropFibFailed);
        }
    }
    if pkt.ip_len as u32 + overhead as u32 > hop.mtu as u32 {
        return too_big(ctx, pkt, hop.mtu, overhead);
    }
    if overhead != 0 && clamps(pkt, flags) {
        let headers = if pkt.key.family == FAMILY_V4 { 40 } else { 60 };
        clamp_mss(ctx, pkt, hop.mtu.saturating_sub(overhead + headers));
    }
    deliver(ctx, pkt, &backend.addr, overhead, &hop, FORWARDED)
}

/// How a client's packet sent to its backend is counted.
pub const FORWARDED: (Reason, Reason) = (Reason::TxForward, Reason::RedirectForward);

/// Whether `pkt` is a SYN whose MSS `flags` say to clamp (`ipip` only).
#[inline(always)]
pub fn clamps(pkt: &Packet, flags: u32) -> bool {
    flags & VIP_F_MSS_CLAMP != 0 && pkt.key.proto == PROTO_TCP && pkt.tcp_flags & TCP_SYN != 0
}

/// Bytes `flags`' mode adds in front of a packet of `pkt`'s family.
#[inline(always)]
pub fn overhead(pkt: &Packet, flags: u32) -> u16 {
    match (flags & VIP_F_IPIP != 0, pkt.key.family == FAMILY_V4) {
        (false, _) => 0,
        (true, true) => ENCAP_V4_OVERHEAD,
        (true, false) => ENCAP_V6_OVERHEAD,
    }
}

/// Sends a packet that fits `hop` with `overhead` (0: `l2`; else `ipip`,
/// encapsulated) to `backend`, counted under `reasons` (XDP_TX, XDP_REDIRECT).
#[inline(always)]
pub fn deliver(
    ctx: &XdpContext,
    pkt: &Packet,
    backend: &lb_common::Addr,
    overhead: u16,
    hop: &NextHop,
    reasons: (Reason, Reason),
) -> Verdict {
    if overhead != 0 {
        let built = if pkt.key.family == FAMILY_V4 {
            encap_v4(ctx, pkt, backend, hop)
        } else {
            encap_v6(ctx, pkt, backend, hop)
        };
        if let Err(reason) = built {
            return Verdict::new(xdp_action::XDP_DROP, reason);
        }
    }
    forward::transmit(ctx, hop, reasons.0, reasons.1)
}

/// Sends an ICMP error about a flow of a DSR VIP (see `icmp_nat`) to the
/// flow's backend in the VIP's mode. Errors are small (at most 576 bytes
/// for IPv4, 1280 for IPv6): one that does not fit is dropped rather than
/// answered. Reported as `tx`/`redirect`.
///
/// Not `send` itself: inlined into the ICMP branch, `send`'s MSS clamping
/// and ICMP answer (which an error must never get) took the verifier near
/// its million-instruction limit, and this path needs neither.
#[inline(always)]
pub fn send_error(
    ctx: &XdpContext,
    pkt: &Packet,
    backend_id: u32,
    backend: &Backend,
    flags: u32,
    tx: Reason,
    redirect: Reason,
) -> Verdict {
    let mut hop = NextHop::default();
    let overhead = overhead(pkt, flags);
    let fits = matches!(
        forward::backend_hop(ctx.ctx, pkt, backend_id, &backend.addr, &mut hop),
        Lookup::Found
    ) && pkt.ip_len as u32 + overhead as u32 <= hop.mtu as u32;
    if !fits {
        return Verdict::new(xdp_action::XDP_DROP, Reason::DropTooBig);
    }
    deliver(ctx, pkt, &backend.addr, overhead, &hop, (tx, redirect))
}

/// A client's packet that does not fit the egress MTU once encapsulated:
/// answered with "fragmentation needed" / "packet too big" carrying the
/// room left (IPv6, IPv4 with DF); IPv4 without DF is dropped, since the
/// encapsulated packet can neither be fragmented here nor sent whole.
#[inline(always)]
fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u16, overhead: u16) -> Verdict {
    if pkt.key.family == FAMILY_V4 {
        let df = match ptr_at::<Ipv4Hdr>(ctx, pkt.l3) {
            // SAFETY: bounds-checked by ptr_at.
            Some(ip) => u16::from_be_bytes(unsafe { (*ip).frags }) & IP_DF != 0,
            None => false,
        };
        if !df {
            return Verdict::new(xdp_action::XDP_DROP, Reason::DropTooBig);
        }
    }
    icmp::too_big(ctx, pkt, mtu.saturating_sub(overhead))
}

/// The outer source for a flow from `word` (the client address's last word)
/// and `sport`, or `None` if the family has none configured.
#[inline(always)]
fn outer_source(index: u32, word: u32, sport: u16) -> Option<(lb_common::Addr, u32)> {
    let src = ENCAP_SOURCES.get(index)?;
    if src.set == 0 {
        return None;
    }
    // The port in both halves, so any host bits of the mask see it.
    let mix = word ^ (sport as u32).wrapping_mul(0x0001_0001);
    Some((src.addr, mix & src.host_mask))
}

/// Prepends Ethernet + outer IPv4 (protocol 4) to the packet's IPv4 header.
#[inline(always)]
fn encap_v4(
    ctx: &XdpContext,
    pkt: &Packet,
    dst: &lb_common::Addr,
    hop: &NextHop,
) -> Result<(), Reason> {
    let (base, bits) = outer_source(ENCAP_SRC_V4, pkt.key.src[0], pkt.key.sport)
        .ok_or(Reason::DropNoEncapSource)?;
    let inner: *const Ipv4Hdr = ptr_at(ctx, pkt.l3).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by ptr_at.
    let (tos, frags) = unsafe { ((*inner).tos, (*inner).frags) };
    // SAFETY: helper call on our own context; pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(ENCAP_V4_OVERHEAD as i32)) } != 0 {
        return Err(Reason::DropTooBig);
    }
    let outer: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by ptr_at; XDP owns the frame.
    let ip = unsafe { &mut *outer };
    ip.vihl = 0x45;
    ip.tos = tos; // DSCP and ECN, as RFC 6040's normal mode copies them
    ip.tot_len = (pkt.ip_len + ENCAP_V4_OVERHEAD).to_be_bytes();
    ip.id = [0; 2];
    ip.frags = (u16::from_be_bytes(frags) & IP_DF).to_be_bytes();
    ip.ttl = ENCAP_TTL;
    ip.proto = IPPROTO_IPIP;
    ip.check = [0; 2];
    ip.src_addr = (base[0] | bits).to_ne_bytes();
    ip.dst_addr = dst[0].to_ne_bytes();
    ip.check = header_checksum(ip).to_ne_bytes();
    write_eth(ctx, hop, 0x0800)
}

/// Prepends Ethernet + outer IPv6 (next header 41) to the packet's IPv6 header.
#[inline(always)]
fn encap_v6(
    ctx: &XdpContext,
    pkt: &Packet,
    dst: &lb_common::Addr,
    hop: &NextHop,
) -> Result<(), Reason> {
    let (mut src, bits) = outer_source(ENCAP_SRC_V6, pkt.key.src[3], pkt.key.sport)
        .ok_or(Reason::DropNoEncapSource)?;
    src[3] |= bits;
    let inner: *const Ipv6Hdr = ptr_at(ctx, pkt.l3).ok_or(Reason::PassMalformed)?;
    // Version, traffic class (DSCP, ECN) and flow label, copied whole.
    // SAFETY: bounds-checked by ptr_at.
    let vcf = unsafe { (*inner).vcf };
    // SAFETY: helper call on our own context; pointers are re-derived after it.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, -(ENCAP_V6_OVERHEAD as i32)) } != 0 {
        return Err(Reason::DropTooBig);
    }
    let outer: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by ptr_at; XDP owns the frame.
    let ip = unsafe { &mut *outer };
    ip.vcf = vcf;
    ip.payload_len = pkt.ip_len.to_be_bytes();
    ip.next_hdr = IPPROTO_IPV6;
    ip.hop_limit = ENCAP_TTL;
    ip.src_addr = addr_to_bytes(&src);
    ip.dst_addr = addr_to_bytes(dst);
    write_eth(ctx, hop, 0x86dd)
}

/// Writes the Ethernet header of an encapsulated frame (MACs come later,
/// from `forward::transmit`; the type is the outer header's).
#[inline(always)]
fn write_eth(ctx: &XdpContext, hop: &NextHop, ether_type: u16) -> Result<(), Reason> {
    let eth: *mut EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        (*eth).dst_addr = hop.dmac;
        (*eth).src_addr = hop.smac;
        (*eth).ether_type = ether_type.to_be();
    }
    Ok(())
}

/// RFC 1071 checksum of a 20-byte IPv4 header whose checksum field is 0.
/// Words are summed in host order: the sum is byte-order independent.
#[inline(always)]
fn header_checksum(ip: &Ipv4Hdr) -> u16 {
    let words = ip as *const Ipv4Hdr as *const [u16; 10];
    // SAFETY: Ipv4Hdr is 20 bytes and 2-aligned in the frame (offset 14).
    let words = unsafe { core::ptr::read_unaligned(words) };
    let mut sum: u32 = 0;
    for w in words {
        sum += w as u32;
    }
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// Lowers the MSS option of a TCP SYN to `max` if it is larger, with the
/// checksum updated; a SYN without one (RFC 9293's default, 536) or with
/// malformed options is left as it is. The options are copied out with
/// `bpf_xdp_load_bytes` and walked in the per-CPU scratch space: indexes
/// into a fixed buffer are easier for the verifier than packet pointers at
/// a variable offset.
#[inline(always)]
fn clamp_mss(ctx: &XdpContext, pkt: &Packet, max: u16) {
    let Some(tcp) = ptr_at::<TcpHdr>(ctx, pkt.l4) else {
        return;
    };
    // SAFETY: bounds-checked by ptr_at.
    let len = (unsafe { (*tcp).doff() } as usize * 4).saturating_sub(TcpHdr::LEN);
    if len == 0 || len > TCP_OPTIONS_MAX {
        return;
    }
    let Ok(s) = scratch() else {
        return;
    };
    let start = (pkt.l4 + TcpHdr::LEN) as u32;
    // Options come in 4-byte words (the data offset counts words): copied a
    // word at a time, so every helper call has a constant size.
    for word in 0..TCP_OPTIONS_MAX / 4 {
        if word * 4 >= len {
            break;
        }
        // SAFETY: the helper checks the range against the frame; the buffer
        // has room for the word.
        let rc = unsafe {
            bpf_xdp_load_bytes(
                ctx.ctx,
                start + (word * 4) as u32,
                s.tcp_options[word * 4..].as_mut_ptr() as *mut _,
                4,
            )
        };
        if rc != 0 {
            return;
        }
    }
    let mut i = 0usize;
    for _ in 0..MAX_TCP_OPTIONS {
        if i >= len || i >= TCP_OPTIONS_MAX - 1 {
            return;
        }
        let kind = s.tcp_options[i];
        if kind == TCPOPT_EOL {
            return;
        }
        if kind == TCPOPT_NOP {
            i += 1;
            continue;
        }
        let opt_len = s.tcp_options[i + 1] as usize;
        if opt_len < 2 || i + opt_len > len {
            return;
        }
        if kind == TCPOPT_MSS && opt_len == 4 && i + 3 < TCP_OPTIONS_MAX {
            let old = [s.tcp_options[i + 2], s.tcp_options[i + 3]];
            if u16::from_be_bytes(old) > max {
                set_mss(ctx, pkt.l4, start + i as u32 + 2, old, max);
            }
            return;
        }
        i += opt_len;
    }
}

/// Writes `max` over the MSS value `old` at frame offset `off` and patches
/// the TCP checksum.
#[inline(always)]
fn set_mss(ctx: &XdpContext, l4: usize, off: u32, old: [u8; 2], max: u16) {
    let mut new = max.to_be_bytes();
    // SAFETY: the helper checks the range against the frame.
    if unsafe { bpf_xdp_store_bytes(ctx.ctx, off, new.as_mut_ptr() as *mut _, 2) } != 0 {
        return;
    }
    let mut delta = CsumDelta::new();
    // A field at an odd offset from the header straddles two checksum
    // words: its bytes count swapped.
    if (off as usize - l4).is_multiple_of(2) {
        delta.replace_bytes(&old, &new);
    } else {
        delta.replace_bytes(&[old[1], old[0]], &[new[1], new[0]]);
    }
    if let Some(tcp) = ptr_at::<TcpHdr>(ctx, l4) {
        // SAFETY: bounds-checked by ptr_at.
        unsafe {
            (*tcp).check = delta.apply(u16::from_be_bytes((*tcp).check)).to_be_bytes();
        }
    }
}
