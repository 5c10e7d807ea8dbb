//! Checks before a packet is NATed and forwarded: what the stack would refuse
//! to forward, XDP must not forward either.
//!
//! Cost per packet: `forwardable` runs on every packet about to be forwarded
//! (new and established flows, both directions): one IF_MAC_TABLE lookup (an array,
//! inlined by the verifier: no helper call) and a 6-byte compare, plus for
//! IPv4 the header checksum (10 16-bit adds for a header without options).
//! `new_flow_source` runs only when a flow is created: a few compares and
//! two hash lookups (BACKEND_ADDRS, VIP_ADDRS). An established flow's key includes its source,
//! which was checked when the flow was created, so it needs no source check.
//! `not_denied` runs on packets to a VIP that miss the flow tables (new flows, the
//! handshake's ACK, L7 traffic): a SETTINGS read (array, inlined) and, only
//! while the deny list of that family is not empty, one LPM_TRIE lookup.
//! `new_flow_rate` runs when a flow is about to be recorded: a SETTINGS read
//! and, with a limit set, one LRU lookup (and an insert for a new prefix).
//! Neither costs an established flow anything: the agent removes the flow
//! entries of newly denied prefixes itself.

use aya_ebpf::{helpers::bpf_ktime_get_coarse_ns, maps::lpm_trie::Key, programs::XdpContext};
use lb_common::{
    Addr, AddrKey, FAMILY_V4, IF_MAC_PROBES, RATE_PREFIX_V4, RATE_PREFIX_V6, RATE_WINDOW_NS,
    RateWindow, Reason, VIP_ADDR_LOCAL, addr_to_bytes, if_mac_slot, is_martian_source,
};
use network_types::eth::EthHdr;

use crate::{
    maps::{
        BACKEND_ADDRS, DENY_V4, DENY_V6, IF_MAC_TABLE, NEW_FLOW_RATE, SETTINGS, VIP_ADDRS, scratch,
    },
    parse::{Packet, ptr_at},
};

/// The IPv4 rate-limit prefix as a mask over the address's network-order
/// bytes held in a native word (as `Addr` holds them).
const RATE_MASK_V4: u32 = u32::from_ne_bytes((u32::MAX << (32 - RATE_PREFIX_V4)).to_be_bytes());
// IPv6 sources are counted by their first two words.
const _: () = assert!(RATE_PREFIX_V6 == 64);

/// 16-bit words in an IPv4 header without options.
const IPV4_FIXED_WORDS: usize = 10;
/// Most 16-bit words in an IPv4 header (IHL 15).
const MAX_IPV4_HEADER_WORDS: usize = 30;

/// Whether a packet about to be forwarded may be: sent to the receiving
/// interface's own MAC, and (IPv4, when `rewritten`) with a correct header
/// checksum. A packet sent on untouched (DSR) keeps a wrong checksum wrong
/// for the backend's stack to drop, so only rewritten ones need the sum.
#[inline(always)]
pub fn forwardable(ctx: &XdpContext, pkt: &Packet, rewritten: bool) -> Result<(), Reason> {
    let ingress = ctx.ingress_ifindex() as u32;
    if let Some(own) = own_mac(ingress) {
        let eth: *const EthHdr = ptr_at(ctx, 0).ok_or(Reason::PassMalformed)?;
        // SAFETY: bounds-checked by ptr_at.
        if unsafe { (*eth).dst_addr } != own {
            return Err(Reason::DropOtherHost);
        }
    }
    if rewritten && pkt.key.family == FAMILY_V4 && !ipv4_header_checksum_ok(ctx, pkt) {
        return Err(Reason::DropBadIpChecksum);
    }
    Ok(())
}

/// Interface `ifindex`'s own MAC, if the agent recorded it (see
/// `MAP_IF_MACS`): almost always in the first slot looked at.
#[inline(always)]
fn own_mac(ifindex: u32) -> Option<[u8; 6]> {
    for k in 0..IF_MAC_PROBES {
        let slot = IF_MAC_TABLE.get(if_mac_slot(ifindex, k))?;
        if slot.set == 0 {
            return None;
        }
        if slot.ifindex == ifindex {
            return Some(slot.mac);
        }
    }
    None
}

/// Whether the IPv4 header (`pkt.l3..pkt.l4`) sums to 0xffff, as a correct
/// one does (RFC 1071). Words are read in host order: the ones'-complement
/// sum is byte-order independent, and 0xffff reads the same either way.
#[inline(always)]
fn ipv4_header_checksum_ok(ctx: &XdpContext, pkt: &Packet) -> bool {
    // The fixed 20 bytes with one bounds check, then any options word by
    // word (one check for all: a loop of per-word checks over a known
    // length gets turned into arithmetic on the packet's end, which the
    // verifier refuses).
    let Some(fixed) = ptr_at::<[u16; IPV4_FIXED_WORDS]>(ctx, pkt.l3) else {
        return false;
    };
    let mut sum: u32 = 0;
    // SAFETY: bounds-checked by ptr_at; the IP header starts at an even
    // offset (14) of an even frame start, so u16 reads are aligned.
    for w in unsafe { *fixed } {
        sum += w as u32;
    }
    let words = (pkt.l4 - pkt.l3) / 2;
    let mut i = IPV4_FIXED_WORDS;
    while i < MAX_IPV4_HEADER_WORDS {
        if i >= words {
            break;
        }
        let Some(w) = ptr_at::<u16>(ctx, pkt.l3 + 2 * i) else {
            return false;
        };
        // SAFETY: bounds-checked by ptr_at; aligned as above.
        sum += unsafe { *w } as u32;
        i += 1;
    }
    // 30 words of at most 0xffff fit in 21 bits: two folds reach 16.
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum == 0xffff
}

/// Whether the source of a packet that would create a flow may: not a martian,
/// not the VIP itself nor another `l4` VIP's address (no client has one),
/// not a backend's address (destination-only NAT hands
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
    if unsafe { BACKEND_ADDRS.get(key) }.is_some() || unsafe { VIP_ADDRS.get(key) }.is_some() {
        return Err(Reason::DropSpoofedSource);
    }
    Ok(())
}

/// Whether `addr` is an `l4` VIP's address that no `l7` service shares: the
/// stack does not have it, so what XDP does not take must not reach the
/// stack, which would route it back out (see `MAP_VIP_ADDRS`).
#[inline(always)]
pub fn vip_only(addr: &Addr, family: u8) -> bool {
    let key = AddrKey {
        addr: *addr,
        family,
        pad: [0; 3],
    };
    // SAFETY: read-only probe of a map userspace updates whole-element.
    unsafe { VIP_ADDRS.get(key) }.is_some_and(|v| v & VIP_ADDR_LOCAL == 0)
}

/// Whether the source may reach a VIP at all: not in the deny list.
// By reference on purpose: the map helpers then get pointers into SCRATCH
// (or the packet's key); by value each key and flow would be copied onto a
// stack that has no room left.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn not_denied(pkt: &Packet) -> Result<(), Reason> {
    let Some(settings) = SETTINGS.get(0) else {
        return Ok(());
    };
    // Keys are built in the scratch space: the stack has no room for them.
    let denied = if pkt.key.family == FAMILY_V4 {
        if settings.deny_v4 == 0 {
            return Ok(());
        }
        let s = scratch()?;
        s.deny_v4 = Key::new(32, pkt.key.src[0].to_ne_bytes());
        DENY_V4.get(&s.deny_v4).is_some()
    } else {
        if settings.deny_v6 == 0 {
            return Ok(());
        }
        let s = scratch()?;
        s.deny_v6 = Key::new(128, addr_to_bytes(&pkt.key.src));
        DENY_V6.get(&s.deny_v6).is_some()
    };
    if denied {
        return Err(Reason::DropDenied);
    }
    Ok(())
}

/// Counts a new flow against its source prefix (/24, /64) in a fixed
/// one-second window; `DropRateLimited` once the window holds the limit.
/// Windows are shared by all CPUs and updated without atomics: CPUs racing
/// on one prefix may admit a few flows more than the limit, never fewer.
// By reference on purpose: the map helpers then get pointers into SCRATCH
// (or the packet's key); by value each key and flow would be copied onto a
// stack that has no room left.
#[allow(clippy::needless_borrows_for_generic_args)]
#[inline(always)]
pub fn new_flow_rate(pkt: &Packet) -> Result<(), Reason> {
    let limit = match SETTINGS.get(0) {
        Some(s) if s.new_flow_limit != 0 => s.new_flow_limit,
        _ => return Ok(()),
    };
    let s = scratch()?;
    let key = &mut s.prefix;
    key.addr = pkt.key.src;
    key.family = pkt.key.family;
    key.pad = [0; 3];
    if pkt.key.family == FAMILY_V4 {
        key.addr[0] &= RATE_MASK_V4;
    } else {
        key.addr[2] = 0;
        key.addr[3] = 0;
    }
    // SAFETY: helper without arguments.
    let now = unsafe { bpf_ktime_get_coarse_ns() };
    if let Some(w) = NEW_FLOW_RATE.get_ptr_mut(&*key) {
        // SAFETY: a live element of the map; plain word stores (see above).
        let w = unsafe { &mut *w };
        if now.wrapping_sub(w.start_ns) >= RATE_WINDOW_NS {
            w.start_ns = now;
            w.count = 1;
            return Ok(());
        }
        if w.count >= limit {
            return Err(Reason::DropRateLimited);
        }
        w.count += 1;
        return Ok(());
    }
    s.window = RateWindow {
        start_ns: now,
        count: 1,
        pad: 0,
    };
    let _ = NEW_FLOW_RATE.insert(&s.prefix, &s.window, 0);
    Ok(())
}
