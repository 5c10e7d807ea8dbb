//! ICMP and ICMPv6 echo requests ("ping") to an `l4` VIP's address,
//! answered from XDP with an echo reply from the VIP, as Katran does.
//!
//! The stack cannot answer them: an `l4` VIP is not one of its local
//! addresses (in NAT mode it is on no interface; in the DSR modes it is on
//! the backends' loopbacks), so a ping to a VIP, the first thing an operator
//! tries, would be routed on or dropped. The addresses come from
//! `VIP_ADDRS`, which the agent fills with the address of every `l4`
//! service; an `l7` VIP is local, and the stack answers for it.
//!
//! Only what the stack would answer is: an echo request (type 8 code 0,
//! ICMPv6 128 code 0) in an unfragmented IPv4 packet without options or an
//! IPv6 packet without extension headers, to this interface's MAC, with a
//! correct IPv4 header checksum, from a source that is neither a martian,
//! a VIP address nor in the deny list. Anything else is passed untouched
//! (and goes on to `icmp_nat`). The answer is the request turned around in
//! place: MACs and addresses swapped, TTL / hop limit 64, the type changed,
//! both checksums patched incrementally (RFC 1624; swapping the addresses
//! leaves every sum as it was). Not rate-limited, as Linux does not limit
//! echo replies: an answer is never larger than its request.

use aya_ebpf::{bindings::xdp_action, programs::XdpContext};
use lb_common::{
    AddrKey, FAMILY_V4, FAMILY_V6, FlowKey, Reason, addr_from_bytes, csum::CsumDelta,
    is_martian_source,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{
    checks,
    maps::VIP_ADDRS,
    parse::{Packet, ptr_at},
    verdict::Verdict,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// IPv4 version 4, IHL 5: no options.
const IPV4_PLAIN: u8 = 0x45;
const ICMP_ECHO_REQUEST: u8 = 8;
const ICMP_ECHO_REPLY: u8 = 0;
const ICMPV6_ECHO_REQUEST: u8 = 128;
const ICMPV6_ECHO_REPLY: u8 = 129;
/// Type, code, checksum, identifier, sequence number.
const ECHO_HDR_LEN: usize = 8;
/// TTL / hop limit of the answer (Linux's default).
const ANSWER_TTL: u8 = 64;

/// The answer to an echo request to an `l4` VIP (XDP_TX), a drop for one
/// the checks refuse, or `None` for every other packet (left untouched).
#[inline(always)]
pub fn reply(ctx: &XdpContext) -> Option<Verdict> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let pkt = match u16::from_be(unsafe { (*eth).ether_type }) {
        ETH_P_IP => request_v4(ctx)?,
        ETH_P_IPV6 => request_v6(ctx)?,
        _ => return None,
    };
    let vip = AddrKey {
        addr: pkt.key.dst,
        family: pkt.key.family,
        pad: [0; 3],
    };
    // SAFETY: read-only probe of a map userspace updates whole-element.
    unsafe { VIP_ADDRS.get(vip) }?;
    if let Err(reason) = source_may_ask(&pkt)
        .and_then(|()| checks::not_denied(&pkt))
        .and_then(|()| checks::forwardable(ctx, &pkt, true))
    {
        return Some(Verdict::new(xdp_action::XDP_DROP, reason));
    }
    let done = if pkt.key.family == FAMILY_V4 {
        turn_v4(ctx)
    } else {
        turn_v6(ctx)
    };
    Some(match done {
        Some(()) => Verdict::new(xdp_action::XDP_TX, Reason::TxEchoReply),
        None => Verdict::new(xdp_action::XDP_PASS, Reason::PassMalformed),
    })
}

/// Whether the source may be answered: not a martian (a broadcast or
/// multicast source would make us answer many), not a VIP's address.
#[inline(always)]
fn source_may_ask(pkt: &Packet) -> Result<(), Reason> {
    if is_martian_source(&pkt.key.src, pkt.key.family) {
        return Err(Reason::DropMartianSource);
    }
    let src = AddrKey {
        addr: pkt.key.src,
        family: pkt.key.family,
        pad: [0; 3],
    };
    // SAFETY: as above.
    if unsafe { VIP_ADDRS.get(src) }.is_some() {
        return Err(Reason::DropSpoofedSource);
    }
    Ok(())
}

/// An IPv4 echo request, as a `Packet` (ports 0) for the checks.
#[inline(always)]
fn request_v4(ctx: &XdpContext) -> Option<Packet> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let ip = unsafe { &*ip };
    let total = u16::from_be_bytes(ip.tot_len) as usize;
    let avail = ctx.data_end() - ctx.data() - EthHdr::LEN;
    if ip.vihl != IPV4_PLAIN
        || ip.proto != IPPROTO_ICMP
        || total < Ipv4Hdr::LEN + ECHO_HDR_LEN
        || total > avail
        || u16::from_be_bytes(ip.frags) & 0x3fff != 0
    {
        return None;
    }
    let icmp: *const [u8; 2] = ptr_at(ctx, EthHdr::LEN + Ipv4Hdr::LEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    if unsafe { *icmp } != [ICMP_ECHO_REQUEST, 0] {
        return None;
    }
    Some(Packet {
        key: FlowKey {
            src: [u32::from_ne_bytes(ip.src_addr), 0, 0, 0],
            dst: [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0],
            sport: 0,
            dport: 0,
            proto: IPPROTO_ICMP,
            family: FAMILY_V4,
            pad: [0; 2],
        },
        l3: EthHdr::LEN,
        l4: EthHdr::LEN + Ipv4Hdr::LEN,
        ttl: ip.ttl,
        ip_len: total as u16,
        tcp_flags: 0,
    })
}

/// An IPv6 echo request (no extension headers), as a `Packet` for the checks.
#[inline(always)]
fn request_v6(ctx: &XdpContext) -> Option<Packet> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let ip = unsafe { &*ip };
    let payload = u16::from_be_bytes(ip.payload_len) as usize;
    let avail = ctx.data_end() - ctx.data() - EthHdr::LEN;
    if ip.vcf[0] >> 4 != 6
        || ip.next_hdr != IPPROTO_ICMPV6
        || payload < ECHO_HDR_LEN
        || Ipv6Hdr::LEN + payload > avail
    {
        return None;
    }
    let icmp: *const [u8; 2] = ptr_at(ctx, EthHdr::LEN + Ipv6Hdr::LEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    if unsafe { *icmp } != [ICMPV6_ECHO_REQUEST, 0] {
        return None;
    }
    Some(Packet {
        key: FlowKey {
            src: addr_from_bytes(ip.src_addr),
            dst: addr_from_bytes(ip.dst_addr),
            sport: 0,
            dport: 0,
            proto: IPPROTO_ICMPV6,
            family: FAMILY_V6,
            pad: [0; 2],
        },
        l3: EthHdr::LEN,
        l4: EthHdr::LEN + Ipv6Hdr::LEN,
        ttl: ip.hop_limit,
        ip_len: (Ipv6Hdr::LEN + payload) as u16,
        tcp_flags: 0,
    })
}

/// Sends the frame back where it came from.
#[inline(always)]
fn swap_macs(ctx: &XdpContext) -> Option<()> {
    let eth: *mut EthHdr = ptr_at(ctx, 0)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let eth = unsafe { &mut *eth };
    core::mem::swap(&mut eth.src_addr, &mut eth.dst_addr);
    Some(())
}

/// Patches the checksum at `check` for the type byte `from` -> `to`, its
/// word's other byte (the code) being 0.
#[inline(always)]
fn retype(check: &mut [u8; 2], from: u8, to: u8) {
    let mut delta = CsumDelta::new();
    delta.replace_u16(u16::from_be_bytes([from, 0]), u16::from_be_bytes([to, 0]));
    *check = delta.apply(u16::from_be_bytes(*check)).to_be_bytes();
}

#[inline(always)]
fn turn_v4(ctx: &XdpContext) -> Option<()> {
    swap_macs(ctx)?;
    let ip: *mut Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let ip = unsafe { &mut *ip };
    core::mem::swap(&mut ip.src_addr, &mut ip.dst_addr);
    // TTL shares a 16-bit checksum word with the protocol byte.
    let mut delta = CsumDelta::new();
    delta.replace_u16(
        u16::from_be_bytes([ip.ttl, ip.proto]),
        u16::from_be_bytes([ANSWER_TTL, ip.proto]),
    );
    ip.ttl = ANSWER_TTL;
    ip.check = delta.apply(u16::from_be_bytes(ip.check)).to_be_bytes();
    let icmp: *mut [u8; 4] = ptr_at(ctx, EthHdr::LEN + Ipv4Hdr::LEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let icmp = unsafe { &mut *icmp };
    icmp[0] = ICMP_ECHO_REPLY;
    let mut check = [icmp[2], icmp[3]];
    retype(&mut check, ICMP_ECHO_REQUEST, ICMP_ECHO_REPLY);
    [icmp[2], icmp[3]] = check;
    Some(())
}

#[inline(always)]
fn turn_v6(ctx: &XdpContext) -> Option<()> {
    swap_macs(ctx)?;
    let ip: *mut Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let ip = unsafe { &mut *ip };
    core::mem::swap(&mut ip.src_addr, &mut ip.dst_addr);
    // Not in any checksum (ICMPv6's pseudo-header has no hop limit).
    ip.hop_limit = ANSWER_TTL;
    let icmp: *mut [u8; 4] = ptr_at(ctx, EthHdr::LEN + Ipv6Hdr::LEN)?;
    // SAFETY: bounds-checked by `ptr_at`.
    let icmp = unsafe { &mut *icmp };
    icmp[0] = ICMPV6_ECHO_REPLY;
    let mut check = [icmp[2], icmp[3]];
    retype(&mut check, ICMPV6_ECHO_REQUEST, ICMPV6_ECHO_REPLY);
    [icmp[2], icmp[3]] = check;
    Some(())
}
