//! ICMP errors about NATed flows, translated in both directions.
//!
//! An ICMP error quotes the packet that caused it; the host it reaches
//! matches the quote against its sockets. With NAT the quote names the
//! wrong end, so without translation a client never learns that its
//! datagram was refused (port unreachable) and a backend never learns the
//! path MTU toward a client. Handled here (everything else ICMP is passed):
//! ICMPv4 destination unreachable (type 3, every code, 4 = fragmentation
//! needed included) and time exceeded (11); ICMPv6 destination unreachable
//! (1), packet too big (2) and time exceeded (3), quoting a TCP or UDP
//! packet. The quote reversed is the 5-tuple of the other direction of its
//! connection, so one lookup (`FLOWS` or `UDP_FLOWS`, then `PENDING` for TCP) tells which
//! case it is:
//!
//! - It quotes a client's packet to a backend (the backend's port
//!   unreachable, a router's error between the balancer and the backend):
//!   the reversed quote is the backend's reply 5-tuple, a `FLOW_TO_CLIENT`
//!   entry holding the VIP. The quoted destination address and port become
//!   the VIP's; so does the outer source if it is the backend (the client
//!   must see the VIP answer). It goes on to the client.
//! - It quotes the VIP's reply to a client (a router on the client's path,
//!   addressed to the VIP: fragmentation needed, packet too big): the
//!   reversed quote is the client's 5-tuple, a `FLOW_TO_BACKEND` entry
//!   pinned to a backend. The quoted source address and port and the outer
//!   destination become the backend's. It goes on to the backend.
//!
//! Checksums are patched incrementally (RFC 1624): the outer IPv4 header,
//! the quoted IPv4 header, the quoted UDP checksum (in the first 8 bytes; an
//! IPv4 zero stays zero) and TCP's (at offset 16, only if quoted), and the
//! ICMP checksum (for ICMPv6 the outer addresses too, in its pseudo-header).
//! The TTL / hop limit is decremented as for any forwarded packet; one that
//! would expire is passed. The outer destination must be the quoted
//! source (where an ICMP error is always sent). An error that finds no flow
//! is passed untouched, as any ICMP; one whose quote is too short to hold
//! its ports, or inconsistent, is passed untouched as malformed. Everything
//! is checked before the first byte is written.

use aya_ebpf::{bindings::xdp_action, macros::map, maps::PerCpuArray, programs::XdpContext};
use lb_common::{
    Addr, BACKEND_F_VALID, FAMILY_V4, FAMILY_V6, FLOW_TO_BACKEND, FLOW_TO_CLIENT, Flow, FlowKey,
    NextHop, PROTO_TCP, PROTO_UDP, Reason, VIP_F_DSR, VipKey, addr_from_bytes, addr_to_bytes,
    csum::{CsumDelta, udp_checksum_fixup},
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    checks, dsr, flows, forward,
    maps::{BACKENDS, PENDING, VIP_STATE, VIPS},
    nat::Side,
    parse::Packet,
    verdict::Verdict,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// ICMP and ICMPv6 headers: type, code, checksum, 4 more bytes.
const ICMP_HDR_LEN: usize = 8;
/// Bytes of the quoted transport header an error must carry to be
/// translated (RFC 792 asks for 8): both ports, and UDP's checksum.
const QUOTED_L4_MIN: usize = 8;
/// Offset of the UDP checksum in its header.
const UDP_CHECK: usize = 6;
/// Offset of the TCP checksum in its header.
const TCP_CHECK: usize = 16;
/// Largest offset looked at: Ethernet, IPv4 with options, ICMP, quoted
/// IPv4 with options, up to the quoted TCP checksum. Keeps offsets bounded
/// for the verifier.
const MAX_OFFSET: usize = EthHdr::LEN + 60 + ICMP_HDR_LEN + 60 + TCP_CHECK;

/// Pointer to a `T` at `offset`, if the frame holds it.
#[inline(always)]
fn at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if offset > MAX_OFFSET || start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// Room for what an ICMP error is translated with: the program's one
/// stack frame has none left (see `maps::Scratch`).
struct IcmpScratch {
    /// The outer packet as it will leave (its addresses, for the next hop).
    pkt: Packet,
    /// Where its quote is.
    quote: Quote,
    /// The other direction of the quoted packet's connection.
    key: FlowKey,
    /// The address the rewritten end of the quote (and of the outer header,
    /// with `outer_too`) gets.
    addr: Addr,
    /// The port the rewritten end of the quote gets.
    port: u16,
    /// Which end of the quote is rewritten: `Destination` for an error on
    /// its way to a client, `Source` for one to a backend.
    quoted: Side,
    /// Whether the outer header's other end (the quote's destination was
    /// the outer source, its source the outer destination) becomes `addr`
    /// too.
    outer_too: bool,
    /// The next hop.
    hop: NextHop,
}

/// One `IcmpScratch` per CPU.
#[map]
static ICMP_SCRATCH: PerCpuArray<IcmpScratch> = PerCpuArray::with_max_entries(1, 0);

/// Where the quoted packet is.
struct Quote {
    /// Offset of the ICMP header.
    icmp: usize,
    /// Offset of the quoted IP header.
    ip: usize,
    /// Offset of the quoted TCP/UDP header.
    l4: usize,
    /// Offset of the quoted TCP/UDP checksum; 0 when it is not quoted (a
    /// TCP header cut before it).
    check: usize,
    /// `PROTO_TCP` or `PROTO_UDP`.
    proto: u8,
}

/// An ICMP packet (`parse` reported `PassOtherProto` for it, having checked
/// its IP header): translated and sent on if it is an error about a NATed
/// flow, otherwise passed untouched.
#[inline(always)]
pub fn translate(ctx: &XdpContext) -> Verdict {
    match translate_checked(ctx) {
        Ok(verdict) => verdict,
        Err(reason) => Verdict::new(xdp_action::XDP_PASS, reason),
    }
}

#[inline(always)]
fn translate_checked(ctx: &XdpContext) -> Result<Verdict, Reason> {
    let eth: *const EthHdr = at(ctx, 0).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let s = ICMP_SCRATCH.get_ptr_mut(0).ok_or(Reason::PassOtherProto)?;
    // SAFETY: a per-CPU slot: only this program on this CPU uses it, and the
    // program does not run nested on one CPU.
    let s = unsafe { &mut *s };
    // The outer packet (its addresses updated below to those it leaves
    // with), the quote, and the other direction of the quoted packet's
    // connection.
    match ether_type {
        ETH_P_IP => {
            outer_v4(ctx, &mut s.pkt, &mut s.quote)?;
            quoted_key_v4(ctx, &s.quote, &mut s.key)?;
        }
        ETH_P_IPV6 => {
            outer_v6(ctx, &mut s.pkt, &mut s.quote)?;
            quoted_key_v6(ctx, &s.quote, &mut s.key)?;
        }
        _ => return Err(Reason::PassOtherProto),
    }
    // An error goes to the quoted packet's source.
    if s.key.dst != s.pkt.key.dst {
        return Err(Reason::PassOtherProto);
    }
    if let Some(verdict) = to_dsr_backend(ctx, s) {
        return Ok(verdict);
    }
    let pkt = &mut s.pkt;
    let flow = lookup(&s.key).ok_or(Reason::PassOtherProto)?;
    // What the quote's end becomes, and which end: see the module comment.
    if flow.direction == FLOW_TO_CLIENT {
        s.addr = flow.vip_addr;
        s.port = flow.vip_port;
        s.quoted = Side::Destination;
        // The outer source is the backend (the quoted destination) or a router.
        s.outer_too = pkt.key.src == s.key.src;
        if s.outer_too {
            pkt.key.src = flow.vip_addr;
        }
    } else if flow.direction == FLOW_TO_BACKEND {
        let live = VIP_STATE
            .get(flow.vip_id)
            .is_some_and(|st| st.generation == flow.vip_generation);
        let backend = match BACKENDS.get(flow.backend_id) {
            Some(b) if live && b.flags & BACKEND_F_VALID != 0 && b.family == flow.family => b,
            _ => return Err(Reason::PassOtherProto),
        };
        s.addr = backend.addr;
        s.port = backend.port;
        s.quoted = Side::Source;
        s.outer_too = true;
        pkt.key.dst = backend.addr;
    } else {
        return Err(Reason::PassOtherProto);
    }
    let pkt = &s.pkt;
    // What the stack would not forward, XDP does not either.
    if let Err(reason) = checks::forwardable(ctx, pkt, true) {
        return Ok(Verdict::new(xdp_action::XDP_DROP, reason));
    }
    if pkt.ttl <= 1 {
        // The stack drops it (no ICMP error answers another).
        return Err(Reason::PassTtlExpired);
    }
    let (tx, redirect) = match s.quoted {
        Side::Destination => (Reason::TxIcmpToClient, Reason::RedirectIcmpToClient),
        Side::Source => (Reason::TxIcmpToBackend, Reason::RedirectIcmpToBackend),
    };
    let found = match forward::route(ctx, &s.pkt, &mut s.hop) {
        Ok(found) => found,
        Err(verdict) => return Ok(verdict),
    };
    if s.pkt.key.family == FAMILY_V4 {
        rewrite_v4(ctx, s, found)?;
    } else {
        rewrite_v6(ctx, s, found)?;
    }
    if !found {
        return Err(Reason::PassNoNeighbour);
    }
    Ok(forward::transmit(ctx, &s.hop, tx, redirect))
}

/// An error addressed to a DSR VIP, quoting what a backend sent the client
/// from it (fragmentation needed / packet too big from a router on the
/// client's path, the client's port unreachable, ...): it belongs to the
/// backend that serves the quoted flow, which is sent it untouched in the
/// VIP's mode (`dsr::send`). That backend is the flow's entry's, or, with
/// none (the flow is pinned on another balancer node, or its entry was
/// evicted), the one Maglev gives the reversed quote, as Katran does: the
/// one the flow's own packets get. `None` when the quote is not about a
/// DSR VIP.
#[inline(always)]
fn to_dsr_backend(ctx: &XdpContext, s: &mut IcmpScratch) -> Option<Verdict> {
    let vip = VipKey {
        addr: s.key.dst,
        port: s.key.dport,
        proto: s.key.proto,
        family: s.key.family,
    };
    // SAFETY: VIPS is updated whole-element by userspace.
    let meta = unsafe { VIPS.get(vip) }?;
    let flags = meta.flags;
    if flags & VIP_F_DSR == 0 {
        return None;
    }
    let vip_id = meta.vip_id;
    let generation = VIP_STATE.get(vip_id)?.generation;
    let pinned = lookup(&s.key).and_then(|flow| {
        (flow.direction == FLOW_TO_BACKEND
            && flow.vip_id == vip_id
            && flow.vip_generation == generation)
            .then_some(flow.backend_id)
    });
    let chosen = match pinned {
        Some(id) => match BACKENDS.get(id) {
            Some(b) if b.flags & BACKEND_F_VALID != 0 => Ok((id, b)),
            _ => crate::choose(vip_id, &s.key, flags),
        },
        None => crate::choose(vip_id, &s.key, flags),
    };
    let (backend_id, backend) = match chosen {
        Ok(found) => found,
        Err(reason) => return Some(Verdict::new(xdp_action::XDP_DROP, reason)),
    };
    if backend.family != s.pkt.key.family {
        return Some(Verdict::new(xdp_action::XDP_DROP, Reason::DropNoBackend));
    }
    if let Err(reason) = checks::forwardable(ctx, &s.pkt, false) {
        return Some(Verdict::new(xdp_action::XDP_DROP, reason));
    }
    let backend = *backend;
    Some(dsr::send_error(
        ctx,
        &s.pkt,
        backend_id,
        &backend,
        flags,
        Reason::TxIcmpToBackend,
        Reason::RedirectIcmpToBackend,
    ))
}

/// The flow entry of `key`: in its flow table, else (TCP) in `PENDING`.
#[inline(always)]
fn lookup(key: &FlowKey) -> Option<&'static Flow> {
    // SAFETY: LRU entries are written whole by this program.
    if let Some(flow) = unsafe { flows::table(key.proto).get(key) } {
        return Some(flow);
    }
    if key.proto == PROTO_TCP {
        // SAFETY: as above.
        return unsafe { PENDING.get(key) };
    }
    None
}

/// Whether an ICMP (`v6`: ICMPv6) type is an error this module translates.
#[inline(always)]
fn is_error(ty: u8, v6: bool) -> bool {
    if v6 {
        // Destination unreachable, packet too big, time exceeded.
        ty == 1 || ty == 2 || ty == 3
    } else {
        // Destination unreachable, time exceeded.
        ty == 3 || ty == 11
    }
}

/// The outer IPv4 packet of an ICMP error and where its quote is.
#[inline(always)]
fn outer_v4(ctx: &XdpContext, pkt: &mut Packet, q: &mut Quote) -> Result<(), Reason> {
    let l3 = EthHdr::LEN;
    let ip: *const Ipv4Hdr = at(ctx, l3).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let ip = unsafe { &*ip };
    if ip.proto != IPPROTO_ICMP {
        return Err(Reason::PassOtherProto);
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes(ip.tot_len) as usize;
    let avail = ctx.data_end() - ctx.data() - l3;
    // As parse checked; a fragment is never looked into.
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || total < ihl || total > avail {
        return Err(Reason::PassMalformed);
    }
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(Reason::PassFragment);
    }
    let icmp = l3 + ihl;
    let msg_len = total - ihl;
    // The whole header: a 1-byte check compiles to `p >= end`, which the
    // verifier does not take as a bound.
    let hdr: *const [u8; ICMP_HDR_LEN] = at(ctx, icmp).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    if msg_len < ICMP_HDR_LEN || !is_error(unsafe { (*hdr)[0] }, false) {
        return Err(Reason::PassOtherProto);
    }
    let qip = icmp + ICMP_HDR_LEN;
    let quoted: *const Ipv4Hdr = at(ctx, qip).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let quoted = unsafe { &*quoted };
    let qihl = ((quoted.vihl & 0x0f) as usize) * 4;
    if msg_len < ICMP_HDR_LEN + Ipv4Hdr::LEN
        || quoted.vihl >> 4 != 4
        || qihl < Ipv4Hdr::LEN
        || msg_len < ICMP_HDR_LEN + qihl + QUOTED_L4_MIN
    {
        return Err(Reason::PassMalformed);
    }
    // A later fragment quoted has no ports: nothing to match.
    if u16::from_be_bytes(quoted.frags) & 0x1fff != 0 {
        return Err(Reason::PassOtherProto);
    }
    quote(q, icmp, qip, qihl, quoted.proto, msg_len)?;
    pkt.key.src = [u32::from_ne_bytes(ip.src_addr), 0, 0, 0];
    pkt.key.dst = [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0];
    pkt.key.proto = IPPROTO_ICMP;
    pkt.key.family = FAMILY_V4;
    pkt.l3 = l3;
    pkt.l4 = icmp;
    pkt.ttl = ip.ttl;
    pkt.ip_len = total as u16;
    Ok(())
}

/// The outer IPv6 packet of an ICMPv6 error and where its quote is.
#[inline(always)]
fn outer_v6(ctx: &XdpContext, pkt: &mut Packet, q: &mut Quote) -> Result<(), Reason> {
    let l3 = EthHdr::LEN;
    let ip: *const Ipv6Hdr = at(ctx, l3).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let ip = unsafe { &*ip };
    // Extension headers before ICMPv6 are not looked through.
    if ip.next_hdr != IPPROTO_ICMPV6 {
        return Err(Reason::PassOtherProto);
    }
    let msg_len = u16::from_be_bytes(ip.payload_len) as usize;
    let avail = ctx.data_end() - ctx.data() - l3;
    if ip.vcf[0] >> 4 != 6 || Ipv6Hdr::LEN + msg_len > avail {
        return Err(Reason::PassMalformed);
    }
    let icmp = l3 + Ipv6Hdr::LEN;
    // The whole header: a 1-byte check compiles to `p >= end`, which the
    // verifier does not take as a bound.
    let hdr: *const [u8; ICMP_HDR_LEN] = at(ctx, icmp).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    if msg_len < ICMP_HDR_LEN || !is_error(unsafe { (*hdr)[0] }, true) {
        return Err(Reason::PassOtherProto);
    }
    let qip = icmp + ICMP_HDR_LEN;
    let quoted: *const Ipv6Hdr = at(ctx, qip).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let quoted = unsafe { &*quoted };
    if msg_len < ICMP_HDR_LEN + Ipv6Hdr::LEN + QUOTED_L4_MIN || quoted.vcf[0] >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    quote(q, icmp, qip, Ipv6Hdr::LEN, quoted.next_hdr, msg_len)?;
    pkt.key.src = addr_from_bytes(ip.src_addr);
    pkt.key.dst = addr_from_bytes(ip.dst_addr);
    pkt.key.proto = IPPROTO_ICMPV6;
    pkt.key.family = FAMILY_V6;
    pkt.l3 = l3;
    pkt.l4 = icmp;
    pkt.ttl = ip.hop_limit;
    pkt.ip_len = (Ipv6Hdr::LEN + msg_len) as u16;
    Ok(())
}

/// Where the quoted transport header and its checksum are, for a quoted IP
/// header of `ip_len` bytes at `ip` in an ICMP message of `msg_len` bytes at
/// `icmp`. Only TCP and UDP are translated (not errors about ICMP).
#[inline(always)]
fn quote(
    q: &mut Quote,
    icmp: usize,
    ip: usize,
    ip_len: usize,
    proto: u8,
    msg_len: usize,
) -> Result<(), Reason> {
    let l4 = ip + ip_len;
    // Bytes of the transport header quoted.
    let quoted = msg_len - ICMP_HDR_LEN - ip_len;
    let check = match proto {
        PROTO_UDP => l4 + UDP_CHECK,
        PROTO_TCP if quoted >= TCP_CHECK + 2 => l4 + TCP_CHECK,
        PROTO_TCP => 0,
        _ => return Err(Reason::PassOtherProto),
    };
    q.icmp = icmp;
    q.ip = ip;
    q.l4 = l4;
    q.check = check;
    q.proto = proto;
    Ok(())
}

/// Writes the reversed 5-tuple of the quoted IPv4 packet into `out`.
#[inline(always)]
fn quoted_key_v4(ctx: &XdpContext, q: &Quote, out: &mut FlowKey) -> Result<(), Reason> {
    let ip: *const Ipv4Hdr = at(ctx, q.ip).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let (src, dst) = unsafe { ((*ip).src_addr, (*ip).dst_addr) };
    out.src = [u32::from_ne_bytes(dst), 0, 0, 0];
    out.dst = [u32::from_ne_bytes(src), 0, 0, 0];
    out.family = FAMILY_V4;
    quoted_ports(ctx, q, out)
}

/// Writes the reversed 5-tuple of the quoted IPv6 packet into `out`.
#[inline(always)]
fn quoted_key_v6(ctx: &XdpContext, q: &Quote, out: &mut FlowKey) -> Result<(), Reason> {
    let ip: *const Ipv6Hdr = at(ctx, q.ip).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let ip = unsafe { &*ip };
    out.src = addr_from_bytes(ip.dst_addr);
    out.dst = addr_from_bytes(ip.src_addr);
    out.family = FAMILY_V6;
    quoted_ports(ctx, q, out)
}

#[inline(always)]
fn quoted_ports(ctx: &XdpContext, q: &Quote, out: &mut FlowKey) -> Result<(), Reason> {
    let ports: *const [[u8; 2]; 2] = at(ctx, q.l4).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let [sport, dport] = unsafe { *ports };
    out.sport = u16::from_be_bytes(dport);
    out.dport = u16::from_be_bytes(sport);
    out.proto = q.proto;
    out.pad = [0; 2];
    Ok(())
}

/// Rewrites an ICMPv4 error as `s` says: the `quoted` end of the quote
/// becomes `addr:port` and, with `outer_too`, the other end of the outer
/// header becomes `addr`; the TTL is decremented with `dec_ttl`.
#[inline(always)]
fn rewrite_v4(ctx: &XdpContext, s: &IcmpScratch, dec_ttl: bool) -> Result<(), Reason> {
    let (q, quoted, addr) = (&s.quote, s.quoted, &s.addr);
    let new = addr[0].to_ne_bytes();
    let ip: *mut Ipv4Hdr = at(ctx, EthHdr::LEN).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`; XDP owns the frame.
    let ip = unsafe { &mut *ip };
    let mut ipsum = CsumDelta::new();
    if s.outer_too {
        let field = match quoted {
            Side::Destination => &mut ip.src_addr,
            Side::Source => &mut ip.dst_addr,
        };
        ipsum.replace_bytes(field, &new);
        *field = new;
    }
    if dec_ttl {
        // TTL shares a 16-bit checksum word with the protocol byte.
        let old = u16::from_be_bytes([ip.ttl, ip.proto]);
        ip.ttl = ip.ttl.wrapping_sub(1);
        ipsum.replace_u16(old, u16::from_be_bytes([ip.ttl, ip.proto]));
    }
    ip.check = ipsum.apply(u16::from_be_bytes(ip.check)).to_be_bytes();

    // The quoted header, its checksum, and what both change in the ICMP sum.
    let mut icmpsum = CsumDelta::new();
    let mut l4sum = CsumDelta::new();
    let qip: *mut Ipv4Hdr = at(ctx, q.ip).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let qip = unsafe { &mut *qip };
    let field = match quoted {
        Side::Destination => &mut qip.dst_addr,
        Side::Source => &mut qip.src_addr,
    };
    let mut qsum = CsumDelta::new();
    qsum.replace_bytes(field, &new);
    l4sum.replace_bytes(field, &new);
    icmpsum.replace_bytes(field, &new);
    *field = new;
    let old = qip.check;
    qip.check = qsum.apply(u16::from_be_bytes(old)).to_be_bytes();
    icmpsum.replace_bytes(&old, &qip.check);
    quoted_l4(ctx, s, true, &mut l4sum, &mut icmpsum)?;
    finish_icmp(ctx, q, &icmpsum)
}

/// As `rewrite_v4` for ICMPv6, whose checksum covers the outer addresses.
#[inline(always)]
fn rewrite_v6(ctx: &XdpContext, s: &IcmpScratch, dec_ttl: bool) -> Result<(), Reason> {
    let (q, quoted, addr) = (&s.quote, s.quoted, &s.addr);
    let new = addr_to_bytes(addr);
    let mut icmpsum = CsumDelta::new();
    let ip: *mut Ipv6Hdr = at(ctx, EthHdr::LEN).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`; XDP owns the frame.
    let ip = unsafe { &mut *ip };
    if s.outer_too {
        let field = match quoted {
            Side::Destination => &mut ip.src_addr,
            Side::Source => &mut ip.dst_addr,
        };
        icmpsum.replace_bytes(field, &new);
        *field = new;
    }
    if dec_ttl {
        ip.hop_limit = ip.hop_limit.wrapping_sub(1);
    }
    let mut l4sum = CsumDelta::new();
    let qip: *mut Ipv6Hdr = at(ctx, q.ip).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let qip = unsafe { &mut *qip };
    let field = match quoted {
        Side::Destination => &mut qip.dst_addr,
        Side::Source => &mut qip.src_addr,
    };
    l4sum.replace_bytes(field, &new);
    icmpsum.replace_bytes(field, &new);
    *field = new;
    quoted_l4(ctx, s, false, &mut l4sum, &mut icmpsum)?;
    finish_icmp(ctx, q, &icmpsum)
}

/// Rewrites the quoted port and, when quoted, the transport checksum
/// (`l4sum` holds the address change of its pseudo-header); records what
/// changed in `icmpsum`.
#[inline(always)]
fn quoted_l4(
    ctx: &XdpContext,
    s: &IcmpScratch,
    v4: bool,
    l4sum: &mut CsumDelta,
    icmpsum: &mut CsumDelta,
) -> Result<(), Reason> {
    let q = &s.quote;
    let ports: *mut [[u8; 2]; 2] = at(ctx, q.l4).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let ports = unsafe { &mut *ports };
    let field = match s.quoted {
        Side::Source => &mut ports[0],
        Side::Destination => &mut ports[1],
    };
    let new = s.port.to_be_bytes();
    l4sum.replace_bytes(field, &new);
    icmpsum.replace_bytes(field, &new);
    *field = new;
    if q.check == 0 {
        return Ok(());
    }
    let check: *mut [u8; 2] = at(ctx, q.check).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let check = unsafe { &mut *check };
    let old = u16::from_be_bytes(*check);
    let new = if q.proto == PROTO_UDP {
        // An IPv4 UDP checksum of 0 means "none" and stays 0.
        if old == 0 && v4 {
            return Ok(());
        }
        udp_checksum_fixup(l4sum.apply(old))
    } else {
        l4sum.apply(old)
    };
    icmpsum.replace_u16(old, new);
    *check = new.to_be_bytes();
    Ok(())
}

/// Patches the ICMP checksum with every change recorded in `icmpsum`.
#[inline(always)]
fn finish_icmp(ctx: &XdpContext, q: &Quote, icmpsum: &CsumDelta) -> Result<(), Reason> {
    let hdr: *mut [u8; 4] = at(ctx, q.icmp).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by `at`.
    let hdr = unsafe { &mut *hdr };
    let old = u16::from_be_bytes([hdr[2], hdr[3]]);
    let [hi, lo] = icmpsum.apply(old).to_be_bytes();
    hdr[2] = hi;
    hdr[3] = lo;
    Ok(())
}
