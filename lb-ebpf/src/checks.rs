//! Checks before a packet is NATed and forwarded: what the stack would refuse
//! to forward, XDP must not forward either.
//!
//! Cost per packet: `forwardable` runs on every packet about to be forwarded
//! (new and established flows, both directions): one IF_MACS lookup (an array,
//! inlined by the verifier: no helper call) and a 6-byte compare, plus for
//! IPv4 the header checksum (10 16-bit adds for a header without options).
//! `new_flow_source` runs only when a flow is created: a few compares and one
//! BACKEND_ADDRS hash lookup. An established flow's key includes its source,
//! which was checked when the flow was created, so it needs no source check.

use aya_ebpf::programs::XdpContext;
use lb_common::{AddrKey, FAMILY_V4, Reason, is_martian_source};
use network_types::eth::EthHdr;

use crate::{
    maps::{BACKEND_ADDRS, IF_MACS},
    parse::{Packet, ptr_at},
};

/// Most 16-bit words in an IPv4 header (IHL 15).
const MAX_IPV4_HEADER_WORDS: usize = 30;

/// Whether a packet about to be forwarded may be: sent to the receiving
/// interface's own MAC, and (IPv4) with a correct header checksum.
#[inline(always)]
pub fn forwardable(ctx: &XdpContext, pkt: &Packet) -> Result<(), Reason> {
    let ingress = ctx.ingress_ifindex() as u32;
    if let Some(own) = IF_MACS.get(ingress)
        && own.set != 0
    {
        let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds-checked by ptr_at.
        if unsafe { (*eth).dst_addr } != own.mac {
            return Err(Reason::DropOtherHost);
        }
    }
    if pkt.key.family == FAMILY_V4 && !ipv4_header_checksum_ok(ctx, pkt) {
        return Err(Reason::DropBadIpChecksum);
    }
    Ok(())
}

/// Whether the IPv4 header (`pkt.l3..pkt.l4`) sums to 0xffff, as a correct
/// one does (RFC 1071). Words are read in host order: the ones'-complement
/// sum is byte-order independent, and 0xffff reads the same either way.
#[inline(always)]
fn ipv4_header_checksum_ok(ctx: &XdpContext, pkt: &Packet) -> bool {
    let words = (pkt.l4 - pkt.l3) / 2;
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < MAX_IPV4_HEADER_WORDS {
        if i >= words {
            break;
        }
        // The IP header starts at an even offset (14), so u16 reads are aligned.
        let Some(w) = ptr_at::<u16>(ctx, pkt.l3 + 2 * i) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at.
        sum += unsafe { *w } as u32;
        i += 1;
    }
    // 30 words of at most 0xffff fit in 21 bits: two folds reach 16.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// Whether the source of a packet that would create a flow may: not a martian,
/// not the VIP itself, not a backend's address (destination-only NAT hands
/// the backend the client's address; one that is a backend's would plant a
/// reply entry hijacking that backend's own traffic).
#[inline(always)]
pub fn new_flow_source(pkt: &Packet) -> Result<(), Reason> {
    let src = &pkt.key.src;
    if is_martian_source(src, pkt.key.family) {
        return Err(Reason::DropMartianSource);
    }
    if *src == pkt.key.dst {
        return Err(Reason::DropSpoofedSource);
    }
    let key = AddrKey {
        addr: *src,
        family: pkt.key.family,
        pad: [0; 3],
    };
    // SAFETY: read-only probe of a map userspace updates whole-element.
    if unsafe { BACKEND_ADDRS.get(key) }.is_some() {
        return Err(Reason::DropSpoofedSource);
    }
    Ok(())
}
