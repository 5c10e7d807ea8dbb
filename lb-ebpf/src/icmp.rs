//! ICMP errors built in place and sent back with XDP_TX: "time exceeded"
//! for a packet to a VIP whose TTL/hop limit runs out here, and
//! "fragmentation needed" / "packet too big" for one larger than the
//! egress MTU (RFC 1191, RFC 8201).
//!
//! Passing it to the stack, as before, made the client get "destination
//! unreachable" instead: the stack has no route for the VIP (it is not a
//! local address). The answer comes from the VIP, goes back to the MAC the
//! packet came from, and quotes the packet as RFC 792 / RFC 4443 ask: the IP
//! header and 8 bytes for IPv4, as much as fits in 1280 bytes for IPv6.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use lb_common::{FAMILY_V4, Reason};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

use crate::{parse::Packet, verdict::Verdict};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const IPPROTO_ICMP: u8 = 1;
const IPPROTO_ICMPV6: u8 = 58;
/// ICMP and ICMPv6 headers: type, code, checksum, 4 unused bytes.
const ICMP_HDR_LEN: usize = 8;
/// TTL / hop limit of the answer (Linux's default).
const ANSWER_TTL: u8 = 64;
/// Most bytes of the original an ICMPv6 error quotes: the whole answer within
/// the IPv6 minimum MTU (RFC 4443 2.4 (c)).
const V6_MAX_QUOTE: usize = 1280 - Ipv6Hdr::LEN - ICMP_HDR_LEN;
/// Largest frame these offsets are ever checked against; keeps them bounded
/// for the verifier.
const MAX_OFFSET: usize = 1600;

/// Pointer to a `T` at `offset` if the frame holds it (as `parse::ptr_at`, with
/// room for a whole answer).
#[inline(always)]
fn at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if offset > MAX_OFFSET || start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// `at` for offsets that vary at run time (the checksum loop). The pointer
/// goes through `black_box`, so LLVM keeps the check as `p + size > end` on
/// the very register it then dereferences; otherwise it moves the constant
/// onto `end` (no arithmetic on pkt_end, says the verifier) or checks a copy
/// of `p` that it recomputes for the access. Costs a stack slot, so only here.
#[inline(always)]
fn at_var<T>(ctx: &XdpContext, offset: usize) -> Option<*const T> {
    if offset > MAX_OFFSET {
        return None;
    }
    let p = core::hint::black_box(ctx.data() + offset);
    if p + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some(p as *const T)
}

/// Ones'-complement sum of `len` bytes from `offset`, as native-order 16-bit
/// words (the sum is byte-order independent; callers store its complement
/// with `to_ne_bytes`). An odd last byte is padded with zero.
#[inline(always)]
fn sum_bytes(ctx: &XdpContext, offset: usize, len: usize) -> Option<u32> {
    let mut sum: u32 = 0;
    let words = len / 2;
    let mut i = 0;
    while i < (ICMP_HDR_LEN + V6_MAX_QUOTE) / 2 {
        if i >= words {
            break;
        }
        let w: *const [u8; 2] = at_var(ctx, offset + 2 * i)?;
        // SAFETY: bounds-checked by `at`.
        sum += u16::from_ne_bytes(unsafe { *w }) as u32;
        i += 1;
    }
    if len % 2 == 1 {
        let b: *const u8 = at_var(ctx, offset + len - 1)?;
        // SAFETY: bounds-checked by `at`.
        sum += u16::from_ne_bytes([unsafe { *b }, 0]) as u32;
    }
    Some(sum)
}

/// Folds a ones'-complement sum to 16 bits and complements it.
#[inline(always)]
fn finish(mut sum: u32) -> [u8; 2] {
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    (!(sum as u16)).to_ne_bytes()
}

/// Sum of an address's 16-bit words, in the native order `sum_bytes` uses.
#[inline(always)]
fn sum_addr<const N: usize>(a: &[u8; N]) -> u32 {
    let mut sum = 0;
    for w in a.chunks_exact(2) {
        if let &[x, y] = w {
            sum += u16::from_ne_bytes([x, y]) as u32;
        }
    }
    sum
}

/// Turns the packet into an ICMP time exceeded from the VIP to its sender
/// and returns XDP_TX; if the frame cannot be reshaped it is passed to the
/// stack as before (its answer is then the wrong kind, but one is sent).
#[inline(always)]
pub fn time_exceeded(ctx: &XdpContext, pkt: &Packet) -> Verdict {
    // Type 11 code 0 (IPv4) / type 3 code 0 (IPv6): exceeded in transit.
    let built = if pkt.key.family == FAMILY_V4 {
        answer_v4(ctx, pkt, [11, 0, 0, 0, 0, 0, 0, 0])
    } else {
        answer_v6(ctx, pkt, [3, 0, 0, 0, 0, 0, 0, 0])
    };
    match built {
        Some(()) => Verdict::new(xdp_action::XDP_TX, Reason::TxTimeExceeded),
        None => Verdict::new(xdp_action::XDP_PASS, Reason::PassTtlExpired),
    }
}

/// Turns a packet to a VIP that is larger than `mtu`, the egress MTU, into
/// ICMP "fragmentation needed" (type 3 code 4, RFC 1191) or ICMPv6 "packet
/// too big" (type 2) from the VIP, carrying `mtu`, and returns XDP_TX. If
/// the frame cannot be reshaped it is passed to the stack untouched (which
/// has no route for the VIP and drops it).
#[inline(always)]
pub fn too_big(ctx: &XdpContext, pkt: &Packet, mtu: u16) -> Verdict {
    let [hi, lo] = mtu.to_be_bytes();
    let built = if pkt.key.family == FAMILY_V4 {
        answer_v4(ctx, pkt, [3, 4, 0, 0, 0, 0, hi, lo])
    } else {
        answer_v6(ctx, pkt, [2, 0, 0, 0, 0, 0, hi, lo])
    };
    match built {
        Some(()) => Verdict::new(xdp_action::XDP_TX, Reason::TxTooBig),
        None => Verdict::new(xdp_action::XDP_PASS, Reason::PassTooBig),
    }
}

/// The Ethernet header of the answer: back to where the packet came from.
#[inline(always)]
fn reply_macs(ctx: &XdpContext) -> Option<([u8; 6], [u8; 6])> {
    let eth: *const EthHdr = at(ctx, 0)?;
    // SAFETY: bounds-checked by `at`.
    unsafe { Some(((*eth).dst_addr, (*eth).src_addr)) }
}

#[inline(always)]
fn write_eth(ctx: &XdpContext, src: [u8; 6], dst: [u8; 6], ether_type: u16) -> Option<()> {
    let eth: *mut EthHdr = at(ctx, 0)?;
    // SAFETY: bounds-checked by `at`.
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
        (*eth).ether_type = ether_type.to_be();
    }
    Some(())
}

/// Grows the frame at the front by `grow` bytes and cuts it to `total`.
#[inline(always)]
fn reshape(ctx: &XdpContext, grow: usize, total: usize) -> Option<()> {
    // SAFETY: helper calls on our own context; every pointer is re-derived after.
    unsafe {
        if bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) != 0 {
            return None;
        }
        let len = ctx.data_end() - ctx.data();
        if total > len || bpf_xdp_adjust_tail(ctx.ctx, total as i32 - len as i32) != 0 {
            return None;
        }
    }
    Some(())
}

/// Builds an ICMP error from the VIP to the sender whose first 8 bytes are
/// `header` (checksum bytes zero), quoting the packet as RFC 792 asks.
#[inline(always)]
fn answer_v4(ctx: &XdpContext, pkt: &Packet, header: [u8; ICMP_HDR_LEN]) -> Option<()> {
    let (our_mac, their_mac) = reply_macs(ctx)?;
    let ip: *const Ipv4Hdr = at(ctx, pkt.l3)?;
    // SAFETY: bounds-checked by `at`.
    let (vip, client, tos) = unsafe { ((*ip).dst_addr, (*ip).src_addr, (*ip).tos) };
    // The original IP header (with its options) and the first 8 bytes of data,
    // which parse checked are there (a TCP or UDP header).
    let quote = (pkt.l4 - pkt.l3) + 8;
    let grow = Ipv4Hdr::LEN + ICMP_HDR_LEN;
    let icmp_len = ICMP_HDR_LEN + quote;
    let ip_len = Ipv4Hdr::LEN + icmp_len;
    // The original now starts `grow` bytes further in: where the quote goes.
    reshape(ctx, grow, EthHdr::LEN + ip_len)?;
    write_eth(ctx, our_mac, their_mac, ETH_P_IP)?;

    let ip: *mut Ipv4Hdr = at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by `at`.
    let ip = unsafe { &mut *ip };
    ip.vihl = 0x45;
    // As Linux: the original's TOS bits with precedence "internetwork control".
    ip.tos = (tos & 0x1e) | 0xc0;
    ip.tot_len = (ip_len as u16).to_be_bytes();
    ip.id = [0, 0];
    ip.frags = [0, 0];
    ip.ttl = ANSWER_TTL;
    ip.proto = IPPROTO_ICMP;
    ip.check = [0, 0];
    ip.src_addr = vip;
    ip.dst_addr = client;
    ip.check = finish(sum_bytes(ctx, EthHdr::LEN, Ipv4Hdr::LEN)?);

    let icmp_at = EthHdr::LEN + Ipv4Hdr::LEN;
    let icmp: *mut [u8; ICMP_HDR_LEN] = at(ctx, icmp_at)?;
    // SAFETY: bounds-checked by `at`.
    unsafe { *icmp = header };
    let check = finish(sum_bytes(ctx, icmp_at, icmp_len)?);
    let icmp: *mut [u8; ICMP_HDR_LEN] = at(ctx, icmp_at)?;
    // SAFETY: bounds-checked by `at`.
    unsafe {
        (*icmp)[2] = check[0];
        (*icmp)[3] = check[1];
    }
    Some(())
}

/// As `answer_v4` for ICMPv6, quoting as much as fits in 1280 bytes (RFC 4443).
#[inline(always)]
fn answer_v6(ctx: &XdpContext, pkt: &Packet, header: [u8; ICMP_HDR_LEN]) -> Option<()> {
    let (our_mac, their_mac) = reply_macs(ctx)?;
    let ip: *const Ipv6Hdr = at(ctx, pkt.l3)?;
    // SAFETY: bounds-checked by `at`.
    let (vip, client) = unsafe { ((*ip).dst_addr, (*ip).src_addr) };
    let original = pkt.ip_len as usize;
    let quote = if original < V6_MAX_QUOTE {
        original
    } else {
        V6_MAX_QUOTE
    };
    let grow = Ipv6Hdr::LEN + ICMP_HDR_LEN;
    let icmp_len = ICMP_HDR_LEN + quote;
    reshape(ctx, grow, EthHdr::LEN + Ipv6Hdr::LEN + icmp_len)?;
    write_eth(ctx, our_mac, their_mac, ETH_P_IPV6)?;

    let ip: *mut Ipv6Hdr = at(ctx, EthHdr::LEN)?;
    // SAFETY: bounds-checked by `at`.
    let ip = unsafe { &mut *ip };
    ip.vcf = [0x60, 0, 0, 0];
    ip.payload_len = (icmp_len as u16).to_be_bytes();
    ip.next_hdr = IPPROTO_ICMPV6;
    ip.hop_limit = ANSWER_TTL;
    ip.src_addr = vip;
    ip.dst_addr = client;

    let icmp_at = EthHdr::LEN + Ipv6Hdr::LEN;
    let icmp: *mut [u8; ICMP_HDR_LEN] = at(ctx, icmp_at)?;
    // SAFETY: bounds-checked by `at`.
    unsafe { *icmp = header };
    // Pseudo-header: addresses, upper-layer length (32 bits), next header.
    let len = (icmp_len as u32).to_be_bytes();
    let pseudo = sum_addr(&vip)
        + sum_addr(&client)
        + sum_addr(&len)
        + u16::from_ne_bytes([0, IPPROTO_ICMPV6]) as u32;
    let check = finish(pseudo + sum_bytes(ctx, icmp_at, icmp_len)?);
    let icmp: *mut [u8; ICMP_HDR_LEN] = at(ctx, icmp_at)?;
    // SAFETY: bounds-checked by `at`.
    unsafe {
        (*icmp)[2] = check[0];
        (*icmp)[3] = check[1];
    }
    Some(())
}
