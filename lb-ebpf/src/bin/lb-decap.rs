//! Backend-side decapsulation of the balancer's `ipip` mode.
//!
//! The balancer sends a client's packet untouched inside an outer IPv4 header
//! (protocol 4) or IPv6 header (next header 41). This kernel has no ipip
//! module, so the backend strips that header here: a frame whose outer header
//! is whole and consistent and whose inner header (same family) is addressed
//! to one of `DECAP_VIPS` loses its outer header (`bpf_xdp_adjust_head`), gets
//! its Ethernet header back in front of the inner one (same MACs) and goes to
//! the stack as if it had arrived directly. While the outer sources are
//! restricted (`DECAP_SETTINGS`), such a frame from an outer source in no
//! prefix of `DECAP_SOURCES_V4`/`_V6` is dropped; while `DECAP_LOCAL`
//! lists addresses, one whose outer destination is none of them passes as
//! it came. Everything else passes
//! untouched. Every decision is counted per CPU in `DECAP_STATS`. The
//! contract (names, reasons, limits) is `lb_common::decap`.
//!
//! Self-contained rather than sharing `lb-xdp`'s parser: that one stops at
//! TCP/UDP of a single IP header and reports `lb-xdp`'s reasons; this program
//! reads two IP headers and nothing beyond them.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_xdp_adjust_head,
    macros::{map, xdp},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::XdpContext,
};
use lb_common::{
    AddrKey, DECAP_REASON_COUNT, DecapLocal, DecapReason, DecapSettings, DecapSourceV4,
    DecapSourceV6, FAMILY_V4, FAMILY_V6, MAX_DECAP_LOCAL, MAX_DECAP_SOURCES, MAX_DECAP_VIPS,
    PROTO_IPIP, PROTO_IPV6_ENCAP, Traffic, addr_from_bytes,
};
use network_types::{
    eth::EthHdr,
    ip::{Ipv4Hdr, Ipv6Hdr},
};

const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88a8;
/// Offset of the outer IP header.
const L3: usize = EthHdr::LEN;
/// Largest offset anything is read at: the inner IPv4 header behind an outer
/// one with full options. Also keeps offsets visibly bounded for the verifier.
const MAX_OFFSET: usize = L3 + 60;
/// Most 16-bit words in an IPv4 header (IHL 15).
const MAX_IPV4_HEADER_WORDS: usize = 30;

/// Inner destinations (VIPs) whose encapsulated packets are decapsulated.
#[map]
static DECAP_VIPS: HashMap<AddrKey, u8> = HashMap::with_max_entries(MAX_DECAP_VIPS, 0);

/// Whether outer sources are restricted (one element).
#[map]
static DECAP_SETTINGS: Array<DecapSettings> = Array::with_max_entries(1, 0);

/// The outer destinations decapsulated, when it lists any (one element).
#[map]
static DECAP_LOCAL: Array<DecapLocal> = Array::with_max_entries(1, 0);

/// Outer IPv4 source prefixes allowed while restricted.
#[map]
static DECAP_SOURCES_V4: LpmTrie<DecapSourceV4, u8> =
    LpmTrie::with_max_entries(MAX_DECAP_SOURCES, 0);

/// Outer IPv6 source prefixes allowed while restricted.
#[map]
static DECAP_SOURCES_V6: LpmTrie<DecapSourceV6, u8> =
    LpmTrie::with_max_entries(MAX_DECAP_SOURCES, 0);

/// Per-`DecapReason` packets/bytes.
#[map]
static DECAP_STATS: PerCpuArray<Traffic> = PerCpuArray::with_max_entries(DECAP_REASON_COUNT, 0);

/// Entry point attached to a backend's interface.
#[xdp]
pub fn lb_decap(ctx: XdpContext) -> u32 {
    let len = (ctx.data_end() - ctx.data()) as u64;
    let (action, reason) = process(&ctx);
    if let Some(t) = DECAP_STATS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*t).packets += 1;
            (*t).bytes += len;
        }
    }
    action
}

/// Pointer to a `T` at `offset`, if the frame is long enough to hold it.
#[inline(always)]
fn ptr_at<T>(ctx: &XdpContext, offset: usize) -> Option<*mut T> {
    let start = ctx.data();
    if offset > MAX_OFFSET || start + offset + core::mem::size_of::<T>() > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *mut T)
}

/// The action and the reason counted for it.
#[inline(always)]
fn process(ctx: &XdpContext) -> (u32, DecapReason) {
    let decision = match ptr_at::<EthHdr>(ctx, 0) {
        // SAFETY: bounds-checked by ptr_at.
        Some(eth) => match u16::from_be(unsafe { (*eth).ether_type }) {
            ETH_P_IP => outer_v4(ctx),
            ETH_P_IPV6 => outer_v6(ctx),
            ETH_P_8021Q | ETH_P_8021AD => Err(DecapReason::PassVlan),
            _ => Err(DecapReason::PassNotEncap),
        },
        None => Err(DecapReason::PassMalformed),
    };
    match decision {
        Ok((outer_len, family)) => strip(ctx, outer_len, family),
        Err(DecapReason::DropForeignSource) => {
            (xdp_action::XDP_DROP, DecapReason::DropForeignSource)
        }
        Err(reason) => (xdp_action::XDP_PASS, reason),
    }
}

/// An outer IPv4 header: the length of the outer header to strip and the
/// inner family, or why the frame passes untouched.
#[inline(always)]
fn outer_v4(ctx: &XdpContext) -> Result<(usize, u8), DecapReason> {
    let ip: *const Ipv4Hdr = ptr_at(ctx, L3).ok_or(DecapReason::PassMalformed)?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    // The protocol first: it is all most of a backend's traffic costs.
    match ip.proto {
        PROTO_IPIP => {}
        PROTO_IPV6_ENCAP => return Err(DecapReason::PassOtherFamily),
        _ => return Err(DecapReason::PassNotEncap),
    }
    let ihl = ((ip.vihl & 0x0f) as usize) * 4;
    let total = u16::from_be_bytes(ip.tot_len) as usize;
    let avail = ctx.data_end() - ctx.data() - L3;
    if ip.vihl >> 4 != 4 || ihl < Ipv4Hdr::LEN || total < ihl || total > avail {
        return Err(DecapReason::PassMalformed);
    }
    // More-fragments flag or an offset: the inner packet is not whole here.
    if u16::from_be_bytes(ip.frags) & 0x3fff != 0 {
        return Err(DecapReason::PassFragment);
    }
    // The stack drops an outer header with a bad checksum; stripping it would
    // deliver what the kernel's own tunnel never would.
    if !ipv4_header_checksum_ok(ctx, ihl) {
        return Err(DecapReason::PassMalformed);
    }
    let inner: *const Ipv4Hdr = ptr_at(ctx, L3 + ihl).ok_or(DecapReason::PassMalformed)?;
    // SAFETY: bounds-checked by ptr_at.
    let inner = unsafe { &*inner };
    let inner_ihl = ((inner.vihl & 0x0f) as usize) * 4;
    let inner_total = u16::from_be_bytes(inner.tot_len) as usize;
    if inner.vihl >> 4 != 4
        || inner_ihl < Ipv4Hdr::LEN
        || inner_total < inner_ihl
        || inner_total > total - ihl
    {
        return Err(DecapReason::PassMalformed);
    }
    let key = AddrKey {
        addr: [u32::from_ne_bytes(inner.dst_addr), 0, 0, 0],
        family: FAMILY_V4,
        pad: [0; 3],
    };
    is_vip(&key)?;
    // Last: only a frame that would be decapsulated pays for the lookups.
    if restricted() && DECAP_SOURCES_V4.get(Key::new(32, ip.src_addr)).is_none() {
        return Err(DecapReason::DropForeignSource);
    }
    local_destination([u32::from_ne_bytes(ip.dst_addr), 0, 0, 0], FAMILY_V4)?;
    Ok((ihl, FAMILY_V4))
}

/// An outer IPv6 header, as `outer_v4`. Only a tunnelled header right behind
/// the outer one counts: extension headers first (a fragment header included)
/// make the packet `PassNotEncap`.
#[inline(always)]
fn outer_v6(ctx: &XdpContext) -> Result<(usize, u8), DecapReason> {
    let ip: *const Ipv6Hdr = ptr_at(ctx, L3).ok_or(DecapReason::PassMalformed)?;
    // SAFETY: bounds-checked by ptr_at.
    let ip = unsafe { &*ip };
    match ip.next_hdr {
        PROTO_IPV6_ENCAP => {}
        PROTO_IPIP => return Err(DecapReason::PassOtherFamily),
        _ => return Err(DecapReason::PassNotEncap),
    }
    let payload = u16::from_be_bytes(ip.payload_len) as usize;
    let avail = ctx.data_end() - ctx.data() - L3;
    if ip.vcf[0] >> 4 != 6 || Ipv6Hdr::LEN + payload > avail {
        return Err(DecapReason::PassMalformed);
    }
    let inner: *const Ipv6Hdr = ptr_at(ctx, L3 + Ipv6Hdr::LEN).ok_or(DecapReason::PassMalformed)?;
    // SAFETY: bounds-checked by ptr_at.
    let inner = unsafe { &*inner };
    let inner_payload = u16::from_be_bytes(inner.payload_len) as usize;
    if inner.vcf[0] >> 4 != 6 || Ipv6Hdr::LEN + inner_payload > payload {
        return Err(DecapReason::PassMalformed);
    }
    let key = AddrKey {
        addr: addr_from_bytes(inner.dst_addr),
        family: FAMILY_V6,
        pad: [0; 3],
    };
    is_vip(&key)?;
    if restricted() && DECAP_SOURCES_V6.get(Key::new(128, ip.src_addr)).is_none() {
        return Err(DecapReason::DropForeignSource);
    }
    local_destination(addr_from_bytes(ip.dst_addr), FAMILY_V6)?;
    Ok((Ipv6Hdr::LEN, FAMILY_V6))
}

/// `PassNotVip` unless `key` is in `DECAP_VIPS`.
#[inline(always)]
fn is_vip(key: &AddrKey) -> Result<(), DecapReason> {
    // SAFETY: only the presence of the key is used, not the value.
    match unsafe { DECAP_VIPS.get(key) } {
        Some(_) => Ok(()),
        None => Err(DecapReason::PassNotVip),
    }
}

/// `PassNotLocal` when `DECAP_LOCAL` lists addresses and the outer
/// destination `dst` (of `family`) is none of them.
#[inline(always)]
fn local_destination(dst: [u32; 4], family: u8) -> Result<(), DecapReason> {
    let Some(local) = DECAP_LOCAL.get(0) else {
        return Ok(());
    };
    let count = local.count as usize;
    if count == 0 {
        return Ok(());
    }
    let mut i = 0;
    while i < MAX_DECAP_LOCAL {
        if i >= count {
            break;
        }
        let a = &local.addrs[i];
        if a.family == family && a.addr == dst {
            return Ok(());
        }
        i += 1;
    }
    Err(DecapReason::PassNotLocal)
}

/// Whether only outer sources in `DECAP_SOURCES_V4`/`_V6` are decapsulated.
#[inline(always)]
fn restricted() -> bool {
    DECAP_SETTINGS
        .get(0)
        .is_some_and(|s| s.restrict_sources != 0)
}

/// Whether the outer IPv4 header (`ihl` bytes at `L3`) sums to 0xffff, as a
/// correct one does (RFC 1071). Words are read in host order: the
/// ones'-complement sum is byte-order independent and 0xffff reads the same.
#[inline(always)]
fn ipv4_header_checksum_ok(ctx: &XdpContext, ihl: usize) -> bool {
    let words = ihl / 2;
    let mut sum: u32 = 0;
    let mut i = 0;
    while i < MAX_IPV4_HEADER_WORDS {
        if i >= words {
            break;
        }
        // The IP header starts at an even offset (14), so u16 reads are aligned.
        let Some(w) = word_at(ctx, L3 + 2 * i) else {
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

/// Pointer to the 16-bit word at `offset`, as `ptr_at`, for loops.
///
/// In a loop LLVM would turn `ptr_at`'s check into a trip count computed
/// from the frame's length, a number the verifier cannot tie to the packet;
/// hiding where the frame starts keeps the check a pointer comparison.
#[inline(always)]
fn word_at(ctx: &XdpContext, offset: usize) -> Option<*const u16> {
    let start = core::hint::black_box(ctx.data());
    if offset > MAX_OFFSET || start + offset + 2 > ctx.data_end() {
        return None;
    }
    Some((start + offset) as *const u16)
}

/// Removes the `outer_len`-byte outer header: the frame then starts
/// `outer_len` bytes further in, where the Ethernet header is written again
/// (same MACs, the inner family's ethertype) right before the inner header.
#[inline(always)]
fn strip(ctx: &XdpContext, outer_len: usize, family: u8) -> (u32, DecapReason) {
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        return (xdp_action::XDP_PASS, DecapReason::PassMalformed);
    };
    // SAFETY: bounds-checked by ptr_at; read before the old header is cut off.
    let (dst, src) = unsafe { ((*eth).dst_addr, (*eth).src_addr) };
    // SAFETY: a helper call on our own context; every pointer is re-derived after.
    if unsafe { bpf_xdp_adjust_head(ctx.ctx, outer_len as i32) } != 0 {
        // Nothing was changed (the inner header checked above makes this
        // unreachable): the frame passes as it came.
        return (xdp_action::XDP_PASS, DecapReason::PassMalformed);
    }
    let Some(eth) = ptr_at::<EthHdr>(ctx, 0) else {
        // Unreachable as well (the inner header follows), but the outer
        // header is gone: not a frame to hand to the stack.
        return (xdp_action::XDP_ABORTED, DecapReason::PassMalformed);
    };
    let ether_type = if family == FAMILY_V6 {
        ETH_P_IPV6
    } else {
        ETH_P_IP
    };
    // SAFETY: bounds-checked by ptr_at.
    unsafe {
        (*eth).dst_addr = dst;
        (*eth).src_addr = src;
        (*eth).ether_type = ether_type.to_be();
    }
    (xdp_action::XDP_PASS, DecapReason::decap(family))
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
