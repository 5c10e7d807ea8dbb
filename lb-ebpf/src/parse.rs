//! Header parsing. Every header is bounds-checked against `data_end` before it is
//! read; anything inconsistent is reported as a pass reason and never rewritten.

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Addr, FAMILY_V4, FAMILY_V6, FlowKey, PROTO_TCP, PROTO_UDP, Reason, addr_from_bytes,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// Largest L4 offset we accept: Ethernet + IPv4 with full options.
/// Also keeps offsets visibly bounded for the verifier.
pub const MAX_L4_OFFSET: usize = EthHdr::LEN + 60;

/// A parsed TCP/UDP packet: its 5-tuple and where its headers are.
pub struct Packet {
    /// The 5-tuple as it arrived.
    pub key: FlowKey,
    /// Offset of the IP header.
    pub l3: usize,
    /// Offset of the TCP/UDP header.
    pub l4: usize,
    /// IPv4 TTL or IPv6 hop limit.
    pub ttl: u8,
    /// IP length (IPv4 total length, IPv6 payload + 40), for the FIB's MTU check.
    pub ip_len: u16,
    /// TCP's SYN and RST flags (`TCP_SYN`, `TCP_RST`); 0 for UDP.
    pub tcp_flags: u8,
}

/// `Packet::tcp_flags` bit: SYN.
pub const TCP_SYN: u8 = 0x02;
/// `Packet::tcp_flags` bit: RST.
pub const TCP_RST: u8 = 0x04;

/// Pointer to a `T` at `offset`, if the packet is long enough to hold it.
#[inline(always)]
pub fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    let end = ctx.data_end();
    if offset > MAX_L4_OFFSET || start + offset + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// IPv4 header: version 4, IHL 5 (no options), as its first byte.
const IPV4_PLAIN: u8 = 0x45;
/// Ethernet + IPv4 without options + UDP.
const PLAIN_V4_UDP_END: usize = EthHdr::LEN + Ipv4Hdr::LEN + UdpHdr::LEN;
/// Ethernet + IPv4 without options + TCP without options.
const PLAIN_V4_TCP_END: usize = EthHdr::LEN + Ipv4Hdr::LEN + TcpHdr::LEN;

/// An IPv4 packet without IP options, read at fixed offsets in 16-bit
/// words, in about half the instructions of `parse`; `None` for anything
/// else (other packets, and ones `parse` would refuse). For the hit path
/// (`fast`), which parses other packets with `parse`.
#[inline(always)]
pub fn parse_plain_v4(ctx: &XdpContext) -> Option<Packet> {
    let start = ctx.data();
    let end = ctx.data_end();
    if start + PLAIN_V4_UDP_END > end {
        return None;
    }
    // SAFETY (every `word`): `off + 2` is at most PLAIN_V4_UDP_END, or
    // PLAIN_V4_TCP_END after that check; `off` is even and so is a frame's
    // start (XDP leaves headroom of 256 bytes, NET_IP_ALIGN is 0 or 2), so
    // the u16 reads are aligned (as `checks` assumes too).
    let word = |off: usize| unsafe { *((start + off) as *const u16) };
    if word(12) != ETH_P_IP.to_be() || word(14).to_ne_bytes()[0] != IPV4_PLAIN {
        return None;
    }
    let total = u16::from_be(word(16)) as usize;
    let avail = end - start - EthHdr::LEN;
    if total < Ipv4Hdr::LEN || total > avail || u16::from_be(word(20)) & 0x3fff != 0 {
        return None;
    }
    let l4_len = total - Ipv4Hdr::LEN;
    let [ttl, proto] = word(22).to_ne_bytes();
    let tcp_flags = match proto {
        PROTO_TCP => {
            if start + PLAIN_V4_TCP_END > end {
                return None;
            }
            let [doff, flags] = word(46).to_ne_bytes();
            let doff = (doff >> 4) as usize * 4;
            if doff < TcpHdr::LEN || doff > l4_len {
                return None;
            }
            flags & (TCP_SYN | TCP_RST)
        }
        PROTO_UDP => {
            let len = u16::from_be(word(38)) as usize;
            if len < UdpHdr::LEN || len > l4_len {
                return None;
            }
            0
        }
        _ => return None,
    };
    let addr = |off: usize| {
        let (lo, hi) = (word(off).to_ne_bytes(), word(off + 2).to_ne_bytes());
        u32::from_ne_bytes([lo[0], lo[1], hi[0], hi[1]])
    };
    Some(Packet {
        key: FlowKey {
            src: [addr(26), 0, 0, 0],
            dst: [addr(30), 0, 0, 0],
            sport: u16::from_be(word(34)),
            dport: u16::from_be(word(36)),
            proto,
            family: FAMILY_V4,
            pad: [0; 2],
        },
        l3: EthHdr::LEN,
        l4: EthHdr::LEN + Ipv4Hdr::LEN,
        ttl,
        ip_len: total as u16,
        tcp_flags,
    })
}

/// The destination address and family of an untagged IPv4 or IPv6 packet,
/// if the frame holds its header (for packets `parse` refused).
#[inline(always)]
pub fn destination(ctx: &XdpContext) -> Option<(Addr, u8)> {
    let eth: *const EthHdr = ptr_at(ctx, 0)?;
    // SAFETY (all three reads): bounds-checked by ptr_at.
    match u16::from_be(unsafe { (*eth).ether_type }) {
        ETH_P_IP => {
            let ip: *const Ipv4Hdr = ptr_at(ctx, EthHdr::LEN)?;
            let dst = u32::from_ne_bytes(unsafe { (*ip).dst_addr });
            Some(([dst, 0, 0, 0], FAMILY_V4))
        }
        ETH_P_IPV6 => {
            let ip: *const Ipv6Hdr = ptr_at(ctx, EthHdr::LEN)?;
            Some((addr_from_bytes(unsafe { (*ip).dst_addr }), FAMILY_V6))
        }
        _ => None,
    }
}

/// Whether the packet is IPv6 neighbour discovery (ICMPv6 133 to 137, no
/// extension header): the stack's business whatever its address (an
/// operator may have it answer for VIPs with `proxy_ndp`).
#[inline(always)]
pub fn neighbour_discovery(ctx: &XdpContext) -> bool {
    const ICMPV6: u8 = 58;
    let (Some(ip), Some(icmp)) = (
        ptr_at::<Ipv6Hdr>(ctx, EthHdr::LEN),
        ptr_at::<u8>(ctx, EthHdr::LEN + Ipv6Hdr::LEN),
    ) else {
        return false;
    };
    // SAFETY: both bounds-checked by ptr_at.
    unsafe { (*ip).next_hdr == ICMPV6 && (133..=137).contains(&*icmp) }
}

/// Parses Ethernet, IPv4/IPv6 and TCP/UDP.
///
/// VLAN-tagged frames are passed to the stack: NAT would send them on toward
/// the backend (or client) with the other side's tag, on a link that may be
/// untagged or another VLAN. The stack handles them as it would without us
/// (a VLAN device on the interface takes them, or they are dropped).
#[inline(always)]
pub fn parse(ctx: &XdpContext) -> Result<Packet, Reason> {
    let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by ptr_at.
    let ether_type = u16::from_be(unsafe { (*eth).ether_type });
    let l3 = EthHdr::LEN;
    match ether_type {
        ETH_P_8021Q | ETH_P_8021AD => Err(Reason::PassVlan),
        ETH_P_IP => parse_v4(ctx, l3),
        ETH_P_IPV6 => parse_v6(ctx, l3),
        _ => Err(Reason::PassNotIp),
    }
}

#[inline(always)]
fn parse_v4(ctx: &XdpContext, l3: usize) -> Result<Packet, Reason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, l3).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vihl >> 4 != 4 {
        return Err(Reason::PassMalformed);
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes(ip.tot_len) as usize;
    let avail = ctx.data_end() - ctx.data() - l3;
    if ihl < Ipv4Hdr::LEN || total < ihl || total > avail {
        return Err(Reason::PassMalformed);
    }
    // More-fragments flag or a fragment offset: the ports are not in every piece.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(Reason::PassFragment);
    }
    let l4 = l3 + ihl;
    let src = [u32::from_ne_bytes(ip.src_addr), 0, 0, 0];
    let dst = [u32::from_ne_bytes(ip.dst_addr), 0, 0, 0];
    let (sport, dport, tcp_flags) = ports(ctx, l4, ip.proto, total - ihl)?;
    Ok(Packet {
        key: FlowKey {
            src,
            dst,
            sport,
            dport,
            proto: ip.proto,
            family: FAMILY_V4,
            pad: [0; 2],
        },
        l3,
        l4,
        ttl: ip.ttl,
        ip_len: total as u16,
        tcp_flags,
    })
}

#[inline(always)]
fn parse_v6(ctx: &XdpContext, l3: usize) -> Result<Packet, Reason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, l3).ok_or(Reason::PassMalformed)?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    if ip.vcf[0] >> 4 != 6 {
        return Err(Reason::PassMalformed);
    }
    let payload = u16::from_be_bytes(ip.payload_len) as usize;
    let avail = ctx.data_end() - ctx.data() - l3;
    if Ipv6Hdr::LEN + payload > avail {
        return Err(Reason::PassMalformed);
    }
    // Extension headers (and ICMPv6, which carries neighbour discovery) go to the stack.
    let proto = ip.next_hdr;
    let l4 = l3 + Ipv6Hdr::LEN;
    let (sport, dport, tcp_flags) = ports(ctx, l4, proto, payload)?;
    Ok(Packet {
        key: FlowKey {
            src: addr_from_bytes(ip.src_addr),
            dst: addr_from_bytes(ip.dst_addr),
            sport,
            dport,
            proto,
            family: FAMILY_V6,
            pad: [0; 2],
        },
        l3,
        l4,
        ttl: ip.hop_limit,
        ip_len: (Ipv6Hdr::LEN + payload) as u16,
        tcp_flags,
    })
}

/// Source and destination port of a TCP or UDP header of `l4_len` bytes, and
/// TCP's SYN/RST flags.
#[inline(always)]
fn ports(ctx: &XdpContext, l4: usize, proto: u8, l4_len: usize) -> Result<(u16, u16, u8), Reason> {
    match proto {
        PROTO_TCP => {
            let tcp: *const TcpHdr = ptr_at(ctx, l4).ok_or(Reason::PassMalformed)?;
            // SAFETY: bounds-checked by ptr_at.
            let tcp = unsafe { &*tcp };
            let doff = tcp.doff() as usize * 4;
            if doff < TcpHdr::LEN || doff > l4_len {
                return Err(Reason::PassMalformed);
            }
            let flags = (tcp.syn() as u8) << 1 | (tcp.rst() as u8) << 2;
            Ok((
                u16::from_be_bytes(tcp.source),
                u16::from_be_bytes(tcp.dest),
                flags,
            ))
        }
        PROTO_UDP => {
            let udp: *const UdpHdr = ptr_at(ctx, l4).ok_or(Reason::PassMalformed)?;
            // SAFETY: bounds-checked by ptr_at.
            let udp = unsafe { &*udp };
            let len = u16::from_be_bytes(udp.len) as usize;
            if len < UdpHdr::LEN || len > l4_len {
                return Err(Reason::PassMalformed);
            }
            Ok((u16::from_be_bytes(udp.src), u16::from_be_bytes(udp.dst), 0))
        }
        _ => Err(Reason::PassOtherProto),
    }
}
