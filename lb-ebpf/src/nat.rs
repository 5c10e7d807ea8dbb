//! Address/port rewriting with incremental checksum updates (RFC 1624).

use aya_ebpf::programs::XdpContext;
use lb_common::{
    Addr, FAMILY_V4, PROTO_TCP, Reason, addr_to_bytes, csum::CsumDelta, csum::udp_checksum_fixup,
};
use network_types::{
    ip::{Ipv4Hdr, Ipv6Hdr},
    tcp::TcpHdr,
    udp::UdpHdr,
};

use crate::parse::{Packet, ptr_at};

/// Which end of the packet NAT rewrites.
#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// Client -> VIP becomes client -> backend.
    Destination,
    /// Backend -> client becomes VIP -> client.
    Source,
}

/// Rewrites one end's address and port, optionally decrements TTL/hop limit, and
/// patches the IPv4 header and TCP/UDP checksums (pseudo-header included).
#[inline(always)]
pub fn rewrite(
    ctx: &XdpContext,
    pkt: &Packet,
    side: Side,
    addr: &Addr,
    port: u16,
    dec_ttl: bool,
) -> Result<(), Reason> {
    let mut l4sum = CsumDelta::new();
    if pkt.key.family == FAMILY_V4 {
        let ip: *mut Ipv4Hdr = ptr_at(ctx, pkt.l3).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds-checked by ptr_at; XDP owns the frame.
        let ip = unsafe { &mut *ip };
        let mut ipsum = CsumDelta::new();
        let new = addr[0].to_ne_bytes();
        let field = match side {
            Side::Destination => &mut ip.dst_addr,
            Side::Source => &mut ip.src_addr,
        };
        ipsum.replace_bytes(field, &new);
        l4sum.replace_bytes(field, &new);
        *field = new;
        if dec_ttl {
            // TTL shares a 16-bit checksum word with the protocol byte.
            let old = u16::from_be_bytes([ip.ttl, ip.proto]);
            ip.ttl = ip.ttl.wrapping_sub(1);
            ipsum.replace_u16(old, u16::from_be_bytes([ip.ttl, ip.proto]));
        }
        ip.check = ipsum.apply(u16::from_be_bytes(ip.check)).to_be_bytes();
    } else {
        let ip: *mut Ipv6Hdr = ptr_at(ctx, pkt.l3).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds-checked by ptr_at; XDP owns the frame.
        let ip = unsafe { &mut *ip };
        let field = match side {
            Side::Destination => &mut ip.dst_addr,
            Side::Source => &mut ip.src_addr,
        };
        let new = addr_to_bytes(addr);
        l4sum.replace_bytes(field, &new);
        *field = new;
        if dec_ttl {
            ip.hop_limit = ip.hop_limit.wrapping_sub(1);
        }
    }
    let new_port = port.to_be_bytes();
    if pkt.key.proto == PROTO_TCP {
        let tcp: *mut TcpHdr = ptr_at(ctx, pkt.l4).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds-checked by ptr_at.
        let tcp = unsafe { &mut *tcp };
        let field = match side {
            Side::Destination => &mut tcp.dest,
            Side::Source => &mut tcp.source,
        };
        l4sum.replace_bytes(field, &new_port);
        *field = new_port;
        tcp.check = l4sum.apply(u16::from_be_bytes(tcp.check)).to_be_bytes();
    } else {
        let udp: *mut UdpHdr = ptr_at(ctx, pkt.l4).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds-checked by ptr_at.
        let udp = unsafe { &mut *udp };
        let field = match side {
            Side::Destination => &mut udp.dst,
            Side::Source => &mut udp.src,
        };
        l4sum.replace_bytes(field, &new_port);
        *field = new_port;
        let check = u16::from_be_bytes(udp.check);
        // An IPv4 UDP checksum of 0 means "none" and must stay 0.
        if check != 0 || pkt.key.family != FAMILY_V4 {
            udp.check = udp_checksum_fixup(l4sum.apply(check)).to_be_bytes();
        }
    }
    Ok(())
}
