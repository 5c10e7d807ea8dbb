//! Contract of the backend-side decapsulation object (`lb-decap`).
//!
//! In `ipip` mode the balancer sends a client's packet to a backend untouched,
//! inside an outer IPv4 header (protocol 4, IPv4-in-IPv4) or an outer IPv6
//! header (next header 41, IPv6-in-IPv6). The backend has the VIP on a
//! loopback; `lb_decap`, attached to the backend's interface, strips the outer
//! header of packets whose inner destination is one of `DECAP_VIPS` and passes
//! the inner packet to the stack as if it had arrived directly. Everything
//! else passes untouched. `lb decap` loads it, fills `DECAP_VIPS` and reads
//! `DECAP_STATS`.
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
/// Map name: `DecapReason` as u32 -> `Traffic` (PERCPU_ARRAY,
/// `DECAP_REASON_COUNT`): packets and bytes per decision, bytes being the
/// whole frame as it arrived (outer header included).
pub const MAP_DECAP_STATS: &str = "DECAP_STATS";

/// Every map of the `lb-decap` object (what `lb decap` pins per interface).
pub const DECAP_MAPS: [&str; 2] = [MAP_DECAP_VIPS, MAP_DECAP_STATS];

/// Most VIPs one decapsulating interface accepts.
pub const MAX_DECAP_VIPS: u32 = 1024;

/// IP protocol number of IPv4-in-IPv4 (outer IPv4 `protocol`, RFC 2003).
pub const PROTO_IPIP: u8 = 4;
/// IP protocol number of IPv6 encapsulation (outer IPv6 `next header`, RFC 2473).
pub const PROTO_IPV6_ENCAP: u8 = 41;

/// Why `lb_decap` returned what it returned; each has a counter in `DECAP_STATS`.
/// Every decision is XDP_PASS: only `Decap*` packets are changed.
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
}

/// Number of `DecapReason` values (size of `DECAP_STATS`).
pub const DECAP_REASON_COUNT: u32 = 8;

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
