//! Contract of the backend-side decapsulation object (`lb-decap`).
//!
//! In `ipip` mode the balancer sends a client's packet to a backend untouched,
//! inside an outer IPv4 header (protocol 4, IPv4-in-IPv4) or an outer IPv6
//! header (next header 41, IPv6-in-IPv6). The backend has the VIP on a
//! loopback; `lb_decap`, attached to the backend's interface, strips the outer
//! header of packets whose inner destination is one of `DECAP_VIPS` and passes
//! the inner packet to the stack as if it had arrived directly. When the
//! outer sources are restricted (`lb decap --from`), such a packet from any
//! other outer source is dropped instead: passed, the kernel's own ipip
//! module (if loaded) could still decapsulate it. Everything else passes
//! untouched. `lb decap` loads it, fills `DECAP_VIPS`, `DECAP_SOURCES_V4`/
//! `_V6` and `DECAP_SETTINGS`, and reads `DECAP_STATS`.
//!
//! The program keeps no other state: the same object serves any number of
//! interfaces, each with its own maps (one `lb decap` per interface).

use crate::maps::FAMILY_V6;

/// Name of the decapsulating XDP program in the `lb-decap` object.
pub const PROG_DECAP: &str = "lb_decap";

/// Map name: `AddrKey` -> `u8` (HASH, `MAX_DECAP_VIPS`): the VIPs whose
/// encapsulated packets are decapsulated (value unused, 1). The key's family
/// is that of the inner header (`FAMILY_V4` or `FAMILY_V6`), its address the
/// inner destination. A packet whose inner destination is not here is passed
/// with its outer header (the stack drops it: no ipip device takes it), so a
/// backend only accepts tunnelled traffic for the VIPs it serves.
pub const MAP_DECAP_VIPS: &str = "DECAP_VIPS";
/// Map name: 0 -> `DecapSettings` (ARRAY, 1): whether the outer sources
/// are restricted. An array read is all an unrestricted interface pays per
/// tunnelled packet to a VIP; the tries below are looked up only when set.
pub const MAP_DECAP_SETTINGS: &str = "DECAP_SETTINGS";
/// Map name: `DecapSourceV4` -> `u8` (LPM_TRIE, `MAX_DECAP_SOURCES`): the
/// outer IPv4 source prefixes allowed when `DecapSettings::restrict_sources`
/// is set (value unused, 1). The lookup key is the outer source as a /32; an
/// LPM trie so one entry can cover a balancer fleet's prefix.
pub const MAP_DECAP_SOURCES_V4: &str = "DECAP_SOURCES_V4";
/// Map name: `DecapSourceV6` -> `u8` (LPM_TRIE, `MAX_DECAP_SOURCES`): as
/// `DECAP_SOURCES_V4` for outer IPv6 sources (looked up as a /128).
pub const MAP_DECAP_SOURCES_V6: &str = "DECAP_SOURCES_V6";
/// Map name: 0 -> `DecapLocal` (ARRAY, 1): with a non-zero count, only
/// packets whose outer destination is one of its addresses are
/// decapsulated (`lb decap --local-only`: the interface's own addresses, as
/// the kernel's own tunnel takes only what is addressed to the host); the
/// others pass untouched (`PassNotLocal`), for the stack to forward or
/// drop. A list in one array element rather than a FIB lookup: the kernel
/// answers `bpf_fib_lookup` with FWD_DISABLED on a host that does not
/// forward, which is every ordinary backend. A map of its own, so that an
/// older object's pins are adopted (`DECAP_SETTINGS` keeps its size).
pub const MAP_DECAP_LOCAL: &str = "DECAP_LOCAL";
/// Map name: `DecapReason` as u32 -> `Traffic` (PERCPU_ARRAY,
/// `DECAP_REASON_COUNT`): packets and bytes per decision, bytes being the
/// whole frame as it arrived (outer header included).
pub const MAP_DECAP_STATS: &str = "DECAP_STATS";

/// Every map of the `lb-decap` object (what `lb decap` pins per interface).
pub const DECAP_MAPS: [&str; 6] = [
    MAP_DECAP_VIPS,
    MAP_DECAP_SETTINGS,
    MAP_DECAP_LOCAL,
    MAP_DECAP_SOURCES_V4,
    MAP_DECAP_SOURCES_V6,
    MAP_DECAP_STATS,
];

/// Most VIPs one decapsulating interface accepts.
pub const MAX_DECAP_VIPS: u32 = 1024;
/// Most allowed outer source prefixes per family: a fleet's balancers are a
/// few addresses or prefixes; the tries allocate per entry, so the bound
/// only stops a runaway list.
pub const MAX_DECAP_SOURCES: u32 = 256;

/// Address part of a `DECAP_SOURCES_V4` key: its network-order bytes (the
/// LPM key is the prefix length in bits, then these).
pub type DecapSourceV4 = [u8; 4];
/// Address part of a `DECAP_SOURCES_V6` key, as `DecapSourceV4`.
pub type DecapSourceV6 = [u8; 16];

/// Value of `DECAP_SETTINGS[0]`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapSettings {
    /// Non-zero: only outer sources in `DECAP_SOURCES_V4`/`_V6` are
    /// decapsulated; one for both families, so a family without prefixes
    /// accepts no tunnelled packet rather than any (zero: any source).
    pub restrict_sources: u32,
}

/// Most outer destinations `DECAP_LOCAL` holds (an interface's addresses).
pub const MAX_DECAP_LOCAL: usize = 16;

/// Value of `DECAP_LOCAL[0]`: the outer destinations decapsulated, if any.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DecapLocal {
    /// How many of `addrs` are in use; 0: any outer destination.
    pub count: u32,
    /// The addresses (`AddrKey`: family and network-order bytes).
    pub addrs: [crate::maps::AddrKey; MAX_DECAP_LOCAL],
}

/// IP protocol number of IPv4-in-IPv4 (outer IPv4 `protocol`, RFC 2003).
pub const PROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6 encapsulation (outer IPv6 `next header`, RFC 2473).
pub const PROTO_IPV6_ENCAP: u8 = 41;

/// Why `lb_decap` returned what it returned; each has a counter in `DECAP_STATS`.
/// Every decision but `DropForeignSource` (XDP_DROP) is XDP_PASS; only
/// `Decap*` packets are changed.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecapReason {
    /// IPv4-in-IPv4 to a VIP: outer header stripped, inner packet passed.
    DecapV4 = 0,
    /// IPv6-in-IPv6 to a VIP: outer header stripped, inner packet passed.
    DecapV6 = 1,
    /// Not IP-in-IP (ARP, plain IPv4/IPv6, IPv6 with extension headers before
    /// the tunnelled header, ...): passed untouched.
    PassNotEncap = 2,
    /// IP-in-IP whose inner destination is not in `DECAP_VIPS`: passed untouched.
    PassNotVip = 3,
    /// IPv6-in-IPv4 or IPv4-in-IPv6: passed untouched (the balancer never
    /// changes the family, so this is not ours).
    PassOtherFamily = 4,
    /// Outer IPv4 header that is a fragment: passed untouched (the inner
    /// packet is not whole in it; the stack reassembles and drops it).
    PassFragment = 5,
    /// Truncated or inconsistent outer or inner header (version, IHL, lengths
    /// beyond the frame or the outer payload, outer IPv4 checksum): passed
    /// untouched, for the stack to drop and count.
    PassMalformed = 6,
    /// 802.1Q/802.1ad-tagged frame: passed untouched (a VLAN device on the
    /// interface takes it as it would without us).
    PassVlan = 7,
    /// IP-in-IP to a VIP, whole and consistent, from an outer source outside
    /// every allowed prefix while sources are restricted: dropped (a spoofed
    /// inner client source must reach neither this stack nor an ipip device).
    DropForeignSource = 8,
    /// IP-in-IP to a VIP whose outer destination is not in `DECAP_LOCAL`
    /// while it lists any: passed untouched (the kernel's own tunnel would
    /// not take it either; the stack forwards or drops it).
    PassNotLocal = 9,
}

/// Number of `DecapReason` values (size of `DECAP_STATS`).
pub const DECAP_REASON_COUNT: u32 = 10;

impl DecapReason {
    /// All reasons, in counter-index order.
    pub const ALL: [DecapReason; DECAP_REASON_COUNT as usize] = [
        DecapReason::DecapV4,
        DecapReason::DecapV6,
        DecapReason::PassNotEncap,
        DecapReason::PassNotVip,
        DecapReason::PassOtherFamily,
        DecapReason::PassFragment,
        DecapReason::PassMalformed,
        DecapReason::PassVlan,
        DecapReason::DropForeignSource,
        DecapReason::PassNotLocal,
    ];

    /// Stable snake_case name, as `lb decap --stats` prints it.
    pub const fn name(self) -> &'static str {
        match self {
            DecapReason::DecapV4 => "decap_v4",
            DecapReason::DecapV6 => "decap_v6",
            DecapReason::PassNotEncap => "pass_not_encap",
            DecapReason::PassNotVip => "pass_not_vip",
            DecapReason::PassOtherFamily => "pass_other_family",
            DecapReason::PassFragment => "pass_fragment",
            DecapReason::PassMalformed => "pass_malformed",
            DecapReason::PassVlan => "pass_vlan",
            DecapReason::DropForeignSource => "drop_foreign_source",
            DecapReason::PassNotLocal => "pass_not_local",
        }
    }

    /// The decapsulation counted for an inner header of `family`.
    #[inline(always)]
    pub const fn decap(family: u8) -> DecapReason {
        if family == FAMILY_V6 {
            DecapReason::DecapV6
        } else {
            DecapReason::DecapV4
        }
    }
}

#[cfg(feature = "user")]
mod pod {
    // SAFETY: #[repr(C)] plain data with no padding bytes and no invalid bit
    // patterns, which is what aya::Pod requires.
    unsafe impl aya::Pod for super::DecapSettings {}
    // SAFETY: as above (a u32, then 20-byte AddrKeys: no padding).
    unsafe impl aya::Pod for super::DecapLocal {}
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decap_reasons_are_indexed_in_order() {
        for (i, r) in DecapReason::ALL.iter().enumerate() {
            assert_eq!(*r as usize, i);
        }
    }

    #[test]
    fn decap_reason_names_are_unique() {
        for (i, a) in DecapReason::ALL.iter().enumerate() {
            for b in &DecapReason::ALL[i + 1..] {
                assert_ne!(a.name(), b.name());
            }
        }
    }
}
