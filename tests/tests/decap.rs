//! The backend-side decapsulation program (`lb-decap`) and `lb decap`.
//!
//! Packet level: crafted frames through the loaded program with
//! BPF_PROG_TEST_RUN, compared byte for byte with frames built independently
//! by etherparse, and every decision's counter checked. End to end: `lb
//! decap` attached to a lab backend's `eth0`, IP-in-IP sent from the
//! balancer's namespace with raw sockets (the kernel adds the outer header;
//! no tunnel module needed), answered by servers bound to the VIP on `lo`.

use std::collections::BTreeMap;
use std::mem::MaybeUninit;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key};
use aya::programs::{TestRun, TestRunOptions, Xdp};
use etherparse::{
    IpFragOffset, IpNumber, Ipv4Header, Ipv4Options, Ipv6FlowLabel, Ipv6Header, SlicedPacket,
    TcpHeader, TransportSlice,
};
use lb_common::{
    AddrKey, DecapLocal, DecapReason, DecapSettings, MAP_DECAP_LOCAL, MAP_DECAP_SETTINGS,
    MAP_DECAP_SOURCES_V4, MAP_DECAP_SOURCES_V6, MAP_DECAP_STATS, MAP_DECAP_VIPS, PROG_DECAP,
    Traffic,
};
use lb_tests::frames::{CPORT, Frame, fix_ipv4_checksum};
use lb_userspace::decap::{self, Status};
use lb_userspace::lab::{
    BALANCER_BACKEND_MAC, BALANCER_BACKEND_V4, BALANCER_BACKEND_V6, CLIENT_V4, CLIENT_V6, Lab,
    LabOptions, VIP_V4, VIP_V6, backend_mac, backend_v4, backend_v6, run_in_ns,
};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const ETH_P_IP: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86dd;
const PAYLOAD: &[u8] = b"hello through the tunnel";
/// An address in the VIP range that is not configured as one.
const OTHER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 9);
const OTHER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x100, 0, 0, 0, 0, 9);
/// An outer source outside the balancers' prefixes (a would-be injector).
const FOREIGN_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 7);
const FOREIGN_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 7);

/// The loaded `lb-decap` program with `VIP_V4` and `VIP_V6` configured, and
/// the counters its runs should have left.
struct Decap {
    bpf: aya::Ebpf,
    expected: BTreeMap<&'static str, Traffic>,
}

impl Decap {
    fn load() -> Self {
        let object = decap::default_object_path().expect("the lb-decap object");
        let mut bpf = aya::Ebpf::load_file(&object).expect("load lb-decap");
        let prog: &mut Xdp = bpf
            .program_mut(PROG_DECAP)
            .expect("program")
            .try_into()
            .expect("an XDP program");
        prog.load().expect("the verifier accepts lb_decap");
        let mut vips: HashMap<_, AddrKey, u8> =
            HashMap::try_from(bpf.map_mut(MAP_DECAP_VIPS).expect("DECAP_VIPS")).unwrap();
        for vip in [IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6)] {
            vips.insert(decap::vip_key(vip), 1, 0).unwrap();
        }
        Self {
            bpf,
            expected: BTreeMap::new(),
        }
    }

    /// Allows only outer sources in `prefixes` (`a.b.c.d/n`), as `lb decap
    /// --from` does: the prefixes first, then the restriction switched on.
    fn restrict(&mut self, prefixes: &[&str]) {
        for text in prefixes {
            let (addr, len) = text.split_once('/').expect("a prefix");
            let len: u32 = len.parse().unwrap();
            match addr.parse::<IpAddr>().unwrap() {
                IpAddr::V4(a) => {
                    let mut trie: LpmTrie<_, [u8; 4], u8> =
                        LpmTrie::try_from(self.bpf.map_mut(MAP_DECAP_SOURCES_V4).unwrap()).unwrap();
                    trie.insert(&Key::new(len, a.octets()), 1, 0).unwrap();
                }
                IpAddr::V6(a) => {
                    let mut trie: LpmTrie<_, [u8; 16], u8> =
                        LpmTrie::try_from(self.bpf.map_mut(MAP_DECAP_SOURCES_V6).unwrap()).unwrap();
                    trie.insert(&Key::new(len, a.octets()), 1, 0).unwrap();
                }
            }
        }
        self.set_restricted(true);
    }

    /// Switches the source restriction on or off, the tries left as they are.
    fn set_restricted(&mut self, on: bool) {
        let mut settings: Array<_, DecapSettings> = Array::try_from(
            self.bpf
                .map_mut(MAP_DECAP_SETTINGS)
                .expect("DECAP_SETTINGS"),
        )
        .unwrap();
        let value = DecapSettings {
            restrict_sources: u32::from(on),
        };
        settings.set(0, value, 0).unwrap();
    }

    /// Makes `addrs` the only outer destinations decapsulated (none: any),
    /// as `lb decap --local-only` does with the interface's addresses.
    fn local_only(&mut self, addrs: &[IpAddr]) {
        let mut local: Array<_, DecapLocal> =
            Array::try_from(self.bpf.map_mut(MAP_DECAP_LOCAL).expect("DECAP_LOCAL")).unwrap();
        let mut value = DecapLocal {
            count: addrs.len() as u32,
            ..DecapLocal::default()
        };
        for (slot, ip) in value.addrs.iter_mut().zip(addrs) {
            *slot = decap::vip_key(*ip);
        }
        local.set(0, value, 0).unwrap();
    }

    /// Runs the program on `frame`: the action and the frame it left.
    fn run(&mut self, frame: &[u8]) -> (u32, Vec<u8>) {
        let prog: &mut Xdp = self
            .bpf
            .program_mut(PROG_DECAP)
            .unwrap()
            .try_into()
            .unwrap();
        let mut out = vec![0u8; frame.len() + 256];
        let result = prog
            .test_run(TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ..TestRunOptions::default()
            })
            .expect("BPF_PROG_TEST_RUN");
        out.truncate(result.data_size_out as usize);
        (result.return_value, out)
    }

    fn expect_count(&mut self, reason: DecapReason, frame: &[u8]) {
        let t = self.expected.entry(reason.name()).or_default();
        t.packets += 1;
        t.bytes += frame.len() as u64;
    }

    /// `frame` must come out as `expected` (its outer header stripped), passed.
    fn decapsulates(&mut self, what: &str, frame: &[u8], expected: &[u8], reason: DecapReason) {
        let (action, out) = self.run(frame);
        assert_eq!(action, XDP_PASS, "{what}");
        assert_eq!(out, expected, "{what}: not the inner frame");
        self.expect_count(reason, frame);
    }

    /// `frame` must come out byte for byte as it went in, passed.
    fn passes_untouched(&mut self, what: &str, frame: &[u8], reason: DecapReason) {
        let (action, out) = self.run(frame);
        assert_eq!(action, XDP_PASS, "{what}");
        assert_eq!(out, frame, "{what}: the frame was changed");
        self.expect_count(reason, frame);
    }

    /// `frame` must be dropped as `DropForeignSource`.
    fn drops_foreign(&mut self, what: &str, frame: &[u8]) {
        let (action, _) = self.run(frame);
        assert_eq!(action, XDP_DROP, "{what}");
        self.expect_count(DecapReason::DropForeignSource, frame);
    }

    /// Every counter is what the runs so far should have made it, no more.
    fn assert_counters(&self) {
        let stats: PerCpuArray<_, Traffic> =
            PerCpuArray::try_from(self.bpf.map(MAP_DECAP_STATS).expect("DECAP_STATS")).unwrap();
        for reason in DecapReason::ALL {
            let per_cpu = stats.get(&(reason as u32), 0).unwrap();
            let total = per_cpu.iter().fold(Traffic::default(), |a, t| Traffic {
                packets: a.packets + t.packets,
                bytes: a.bytes + t.bytes,
            });
            let want = self
                .expected
                .get(reason.name())
                .copied()
                .unwrap_or_default();
            assert_eq!(total, want, "counter {}", reason.name());
        }
    }
}

/// An Ethernet frame from the balancer to backend 1 carrying `payload`.
fn eth(ether_type: u16, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&backend_mac(1));
    v.extend_from_slice(&BALANCER_BACKEND_MAC);
    v.extend_from_slice(&ether_type.to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// A client's packet to a VIP as the balancer tunnels it: IP header onward.
fn inner(frame: Frame) -> Vec<u8> {
    frame.payload(PAYLOAD).ip_packet()
}

fn udp4(dst: Ipv4Addr) -> Vec<u8> {
    inner(Frame::udp(CLIENT_V4, dst, CPORT, 5353))
}

fn tcp4(dst: Ipv4Addr) -> Vec<u8> {
    inner(Frame::tcp(CLIENT_V4, dst, CPORT, 8080).syn())
}

fn udp6(dst: Ipv6Addr) -> Vec<u8> {
    inner(Frame::udp(CLIENT_V6, dst, CPORT, 5353))
}

fn tcp6(dst: Ipv6Addr) -> Vec<u8> {
    // The IPv4 segment's sequence number and window, not Frame's IPv6 ones.
    let syn = Frame::tcp(CLIENT_V6, dst, CPORT, 8080).syn();
    inner(syn.seq(0x0102_0304).window(8192))
}

/// `inner` in an outer IPv4 header of protocol `proto` (edited by `edit`
/// before it is written with its checksum), balancer to backend 1, framed.
fn in_v4(proto: IpNumber, inner: &[u8], edit: impl FnOnce(&mut Ipv4Header)) -> Vec<u8> {
    let mut outer = Ipv4Header::new(
        inner.len() as u16,
        64,
        proto,
        BALANCER_BACKEND_V4.octets(),
        backend_v4(1).octets(),
    )
    .unwrap();
    edit(&mut outer);
    // Options lengthen the header: the total length follows.
    outer.set_payload_len(inner.len()).unwrap();
    let mut ip = Vec::new();
    outer.write(&mut ip).unwrap();
    ip.extend_from_slice(inner);
    eth(ETH_P_IP, &ip)
}

fn ipip(inner: &[u8]) -> Vec<u8> {
    in_v4(IpNumber::IPV4, inner, |_| {})
}

/// `ipip` with another outer source.
fn ipip_from(source: Ipv4Addr, inner: &[u8]) -> Vec<u8> {
    in_v4(IpNumber::IPV4, inner, |h| h.source = source.octets())
}

/// `inner` behind an outer IPv6 header with next header `next`, framed.
fn in_v6(next: IpNumber, inner: &[u8]) -> Vec<u8> {
    in_v6_from(BALANCER_BACKEND_V6, next, inner)
}

/// `ip6ip6` with another outer source.
fn ip6ip6_from(source: Ipv6Addr, inner: &[u8]) -> Vec<u8> {
    in_v6_from(source, IpNumber::IPV6, inner)
}

/// `in_v6` from `source`.
fn in_v6_from(source: Ipv6Addr, next: IpNumber, inner: &[u8]) -> Vec<u8> {
    let outer = Ipv6Header {
        traffic_class: 0,
        flow_label: Ipv6FlowLabel::ZERO,
        payload_length: inner.len() as u16,
        next_header: next,
        hop_limit: 64,
        source: source.octets(),
        destination: backend_v6(1).octets(),
    };
    let mut ip = Vec::new();
    outer.write(&mut ip).unwrap();
    ip.extend_from_slice(inner);
    eth(ETH_P_IPV6, &ip)
}

fn ip6ip6(inner: &[u8]) -> Vec<u8> {
    in_v6(IpNumber::IPV6, inner)
}

/// `frame` with an 802.1Q tag (VLAN 10) in front of its ethertype.
fn vlan_tagged(frame: &[u8]) -> Vec<u8> {
    let mut v = frame[..12].to_vec();
    v.extend_from_slice(&[0x81, 0x00, 0x00, 0x0a]);
    v.extend_from_slice(&frame[12..]);
    v
}

#[test]
fn ipip_to_a_vip_becomes_the_inner_frame_with_the_same_macs() {
    let mut d = Decap::load();
    for (what, inner) in [("udp", udp4(VIP_V4)), ("tcp", tcp4(VIP_V4))] {
        d.decapsulates(
            what,
            &ipip(&inner),
            &eth(ETH_P_IP, &inner),
            DecapReason::DecapV4,
        );
    }
    // An outer header with options is stripped whole.
    let inner = udp4(VIP_V4);
    let with_options = in_v4(IpNumber::IPV4, &inner, |h| {
        h.options = Ipv4Options::try_from(&[1u8, 1, 1, 0][..]).unwrap();
    });
    assert_eq!(with_options[14], 0x46, "IHL 6");
    d.decapsulates(
        "outer options",
        &with_options,
        &eth(ETH_P_IP, &inner),
        DecapReason::DecapV4,
    );
    // An inner fragment is the stack's to reassemble: decapsulated.
    let mut fragment = udp4(VIP_V4);
    fragment[6] |= 0x20;
    fix_ipv4_checksum(&mut fragment);
    d.decapsulates(
        "inner fragment",
        &ipip(&fragment),
        &eth(ETH_P_IP, &fragment),
        DecapReason::DecapV4,
    );
    d.assert_counters();
}

#[test]
fn with_local_only_tunnels_to_other_outer_destinations_pass_untouched() {
    let mut d = Decap::load();
    let here = [IpAddr::V4(backend_v4(1)), IpAddr::V6(backend_v6(1))];
    d.local_only(&here);
    let (inner4, inner6) = (udp4(VIP_V4), udp6(VIP_V6));
    d.decapsulates(
        "v4 to this host",
        &ipip(&inner4),
        &eth(ETH_P_IP, &inner4),
        DecapReason::DecapV4,
    );
    d.decapsulates(
        "v6 to this host",
        &ip6ip6(&inner6),
        &eth(ETH_P_IPV6, &inner6),
        DecapReason::DecapV6,
    );
    // The same tunnels to another host that reached this one (a router,
    // a hypervisor): as the kernel's own tunnel, not taken.
    let elsewhere4 = in_v4(IpNumber::IPV4, &inner4, |h| {
        h.destination = [198, 18, 2, 99]
    });
    let mut elsewhere6 = ip6ip6(&inner6);
    elsewhere6[14 + 24 + 15] = 0x99;
    d.passes_untouched("v4 to another host", &elsewhere4, DecapReason::PassNotLocal);
    d.passes_untouched("v6 to another host", &elsewhere6, DecapReason::PassNotLocal);
    // A list of the other family's addresses only takes none of this one.
    d.local_only(&here[1..]);
    d.passes_untouched(
        "v4 with only v6 listed",
        &ipip(&inner4),
        DecapReason::PassNotLocal,
    );
    // An empty list: any destination again.
    d.local_only(&[]);
    d.decapsulates(
        "v4, any destination",
        &elsewhere4,
        &eth(ETH_P_IP, &inner4),
        DecapReason::DecapV4,
    );
    d.assert_counters();
}

#[test]
fn ip6ip6_to_a_vip_becomes_the_inner_frame_with_the_same_macs() {
    let mut d = Decap::load();
    for (what, inner) in [("udp", udp6(VIP_V6)), ("tcp", tcp6(VIP_V6))] {
        d.decapsulates(
            what,
            &ip6ip6(&inner),
            &eth(ETH_P_IPV6, &inner),
            DecapReason::DecapV6,
        );
    }
    d.assert_counters();
}

#[test]
fn restricted_sources_decapsulate_allowed_ones_and_drop_foreign_ones_to_a_vip() {
    let mut d = Decap::load();
    d.restrict(&["198.18.2.0/24", "fd00:18:2::1/128"]);
    let in_prefix = Ipv4Addr::new(198, 18, 2, 77);
    for (what, source) in [
        ("the balancer", BALANCER_BACKEND_V4),
        ("another in the prefix", in_prefix),
    ] {
        let inner = udp4(VIP_V4);
        let expected = eth(ETH_P_IP, &inner);
        d.decapsulates(
            what,
            &ipip_from(source, &inner),
            &expected,
            DecapReason::DecapV4,
        );
    }
    let inner = tcp6(VIP_V6);
    let expected = eth(ETH_P_IPV6, &inner);
    d.decapsulates(
        "the balancer (IPv6)",
        &ip6ip6(&inner),
        &expected,
        DecapReason::DecapV6,
    );

    // To a VIP from anywhere else: dropped, not passed to a kernel ipip device.
    d.drops_foreign(
        "IPIP from a foreign source",
        &ipip_from(FOREIGN_V4, &tcp4(VIP_V4)),
    );
    d.drops_foreign(
        "IPIP from just outside the prefix",
        &ipip_from(Ipv4Addr::new(198, 18, 3, 1), &udp4(VIP_V4)),
    );
    d.drops_foreign(
        "IP6IP6 from a foreign source",
        &ip6ip6_from(FOREIGN_V6, &udp6(VIP_V6)),
    );
    // The IPv6 entry is a /128: its neighbour is foreign.
    d.drops_foreign(
        "IP6IP6 from beside the allowed address",
        &ip6ip6_from(
            Ipv6Addr::new(0xfd00, 0x18, 0x2, 0, 0, 0, 0, 2),
            &udp6(VIP_V6),
        ),
    );

    // Not for a VIP, or not what would be decapsulated: as before, passed.
    use DecapReason::*;
    let cases: Vec<(&str, Vec<u8>, DecapReason)> = vec![
        (
            "foreign IPIP to another address",
            ipip_from(FOREIGN_V4, &udp4(OTHER_V4)),
            PassNotVip,
        ),
        (
            "foreign IP6IP6 to another address",
            ip6ip6_from(FOREIGN_V6, &udp6(OTHER_V6)),
            PassNotVip,
        ),
        (
            "foreign plain IPv4 to the VIP",
            eth(ETH_P_IP, &udp4(VIP_V4)),
            PassNotEncap,
        ),
        (
            "foreign IPIP with a bad inner header",
            ipip_from(FOREIGN_V4, &udp4(VIP_V4)[..12]),
            PassMalformed,
        ),
    ];
    for (what, frame, reason) in &cases {
        d.passes_untouched(what, frame, *reason);
    }
    d.assert_counters();
}

#[test]
fn restricted_to_one_family_drops_the_other_familys_tunnelled_packets() {
    let mut d = Decap::load();
    d.restrict(&["198.18.2.1/32"]);
    let inner = udp4(VIP_V4);
    let expected = eth(ETH_P_IP, &inner);
    d.decapsulates(
        "allowed IPIP",
        &ipip(&inner),
        &expected,
        DecapReason::DecapV4,
    );
    d.drops_foreign(
        "IP6IP6 from the balancer, no IPv6 prefix allowed",
        &ip6ip6(&udp6(VIP_V6)),
    );
    d.assert_counters();
}

#[test]
fn unrestricted_any_outer_source_is_decapsulated() {
    let mut d = Decap::load();
    let check = |d: &mut Decap| {
        let inner4 = tcp4(VIP_V4);
        let expected4 = eth(ETH_P_IP, &inner4);
        d.decapsulates(
            "IPIP from a foreign source",
            &ipip_from(FOREIGN_V4, &inner4),
            &expected4,
            DecapReason::DecapV4,
        );
        let inner6 = udp6(VIP_V6);
        let expected6 = eth(ETH_P_IPV6, &inner6);
        d.decapsulates(
            "IP6IP6 from a foreign source",
            &ip6ip6_from(FOREIGN_V6, &inner6),
            &expected6,
            DecapReason::DecapV6,
        );
    };
    // Never restricted (the settings are all zero after loading).
    check(&mut d);
    // Restricted, then lifted with the prefixes still in the tries.
    d.restrict(&["198.18.2.1/32", "fd00:18:2::1/128"]);
    d.drops_foreign("restricted", &ipip_from(FOREIGN_V4, &udp4(VIP_V4)));
    d.set_restricted(false);
    check(&mut d);
    d.assert_counters();
}

#[test]
fn what_is_not_a_tunnelled_packet_to_a_vip_passes_untouched() {
    use DecapReason::*;
    let mut d = Decap::load();
    let arp = eth(0x0806, &[0u8; 28]);
    let cases: Vec<(&str, Vec<u8>, DecapReason)> = vec![
        (
            "plain IPv4 to the VIP",
            eth(ETH_P_IP, &udp4(VIP_V4)),
            PassNotEncap,
        ),
        (
            "plain IPv6 to the VIP",
            eth(ETH_P_IPV6, &tcp6(VIP_V6)),
            PassNotEncap,
        ),
        ("ARP", arp, PassNotEncap),
        // A hop-by-hop header before the tunnelled one: not what the balancer sends.
        (
            "IPv6 extension header before 41",
            in_v6(IpNumber::IPV6_HEADER_HOP_BY_HOP, &{
                let mut hbh = vec![41u8, 0, 1, 4, 0, 0, 0, 0];
                hbh.extend_from_slice(&udp6(VIP_V6));
                hbh
            }),
            PassNotEncap,
        ),
        ("IPIP to another address", ipip(&udp4(OTHER_V4)), PassNotVip),
        (
            "IP6IP6 to another address",
            ip6ip6(&udp6(OTHER_V6)),
            PassNotVip,
        ),
        (
            "IPv6 in IPv4",
            in_v4(IpNumber::IPV6, &udp6(VIP_V6), |_| {}),
            PassOtherFamily,
        ),
        (
            "IPv4 in IPv6",
            in_v6(IpNumber::IPV4, &udp4(VIP_V4)),
            PassOtherFamily,
        ),
        (
            "outer first fragment",
            in_v4(IpNumber::IPV4, &udp4(VIP_V4), |h| h.more_fragments = true),
            PassFragment,
        ),
        (
            "outer later fragment",
            in_v4(IpNumber::IPV4, &udp4(VIP_V4), |h| {
                h.dont_fragment = false;
                h.fragment_offset = IpFragOffset::try_new(8).unwrap();
            }),
            PassFragment,
        ),
        (
            "VLAN-tagged IPIP",
            vlan_tagged(&ipip(&udp4(VIP_V4))),
            PassVlan,
        ),
        (
            "VLAN-tagged IP6IP6",
            vlan_tagged(&ip6ip6(&udp6(VIP_V6))),
            PassVlan,
        ),
    ];
    for (what, frame, reason) in &cases {
        d.passes_untouched(what, frame, *reason);
    }
    d.assert_counters();
}

#[test]
fn truncated_or_inconsistent_headers_pass_untouched() {
    let mut d = Decap::load();
    let good4 = ipip(&udp4(VIP_V4));
    let good6 = ip6ip6(&udp6(VIP_V6));
    let inner4 = udp4(VIP_V4);
    let inner6 = udp6(VIP_V6);
    let edited = |base: &[u8], edit: &dyn Fn(&mut Vec<u8>)| {
        let mut f = base.to_vec();
        edit(&mut f);
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "frame ends inside the outer IPv4 header",
            good4[..14 + 12].to_vec(),
        ),
        (
            "outer total length beyond the frame",
            edited(&good4, &|f| {
                let total = u16::from_be_bytes([f[16], f[17]]) + 1;
                f[16..18].copy_from_slice(&total.to_be_bytes());
                fix_ipv4_checksum(&mut f[14..]);
            }),
        ),
        (
            "outer total length below its header",
            edited(&good4, &|f| {
                f[16..18].copy_from_slice(&19u16.to_be_bytes());
                fix_ipv4_checksum(&mut f[14..]);
            }),
        ),
        (
            "outer IHL 4",
            edited(&good4, &|f| {
                f[14] = 0x44;
                fix_ipv4_checksum(&mut f[14..]);
            }),
        ),
        (
            "outer version 6 in an IPv4 ethertype",
            edited(&good4, &|f| {
                f[14] = 0x65;
                fix_ipv4_checksum(&mut f[14..]);
            }),
        ),
        ("outer checksum wrong", edited(&good4, &|f| f[24] ^= 0x5a)),
        (
            "outer payload shorter than an inner header",
            ipip(&inner4[..12]),
        ),
        (
            "inner total length beyond the outer payload",
            ipip(&inner4[..inner4.len() - 1]),
        ),
        (
            "inner IHL 4",
            ipip(&edited(&inner4, &|f| {
                f[0] = 0x44;
                fix_ipv4_checksum(f);
            })),
        ),
        ("inner IPv6 header under protocol 4", ipip(&inner6)),
        (
            "frame ends inside the outer IPv6 header",
            good6[..14 + 30].to_vec(),
        ),
        (
            "outer IPv6 payload length beyond the frame",
            edited(&good6, &|f| {
                let len = u16::from_be_bytes([f[18], f[19]]) + 1;
                f[18..20].copy_from_slice(&len.to_be_bytes());
            }),
        ),
        (
            "outer IPv6 payload shorter than an inner header",
            ip6ip6(&inner6[..30]),
        ),
        (
            "inner IPv6 payload length beyond the outer payload",
            ip6ip6(&inner6[..inner6.len() - 1]),
        ),
        ("inner IPv4 header under next header 41", ip6ip6(&inner4)),
    ];
    for (what, frame) in &cases {
        d.passes_untouched(what, frame, DecapReason::PassMalformed);
    }
    d.assert_counters();
}

// ---------------------------------------------------------------------------
// End to end: the real `lb decap` on a lab backend.

/// With `VIP_V6` attached and restricted to the balancer: `--from` with
/// other prefixes replaces the set (the balancer's packets are then dropped
/// and counted), and no `--from` lifts it with a warning.
fn sources_are_replaced_in_place(lab: &Lab, ns: &str, sender: &Sender, servers: &Servers) {
    let vip = VIP_V6.to_string();
    let before = stats(lab, ns);
    let out = lb(
        lab,
        &[
            "decap",
            "--netns",
            ns,
            "-i",
            "eth0",
            "--vip",
            &vip,
            "--from",
            "192.0.2.0/24,2001:db8::/32",
        ],
    );
    assert!(out.status.success());
    assert_eq!(
        sources(lab, ns),
        Some(vec!["192.0.2.0/24".into(), "2001:db8::/32".into()]),
        "the old prefixes are gone"
    );
    assert!(!udp_round_trip(
        sender,
        servers,
        true,
        b"from a source no longer allowed",
        NOT_ARRIVING
    ));
    let after = stats(lab, ns);
    let drops = |s: &BTreeMap<String, u64>| s[DecapReason::DropForeignSource.name()];
    assert_eq!(drops(&after), drops(&before) + 1, "{after:?}");

    let out = lb(lab, &["decap", "--netns", ns, "-i", "eth0", "--vip", &vip]);
    assert!(out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("any host") && stderr.contains("--from"),
        "{stderr}"
    );
    assert_eq!(sources(lab, ns), None);
    assert!(udp_round_trip(sender, servers, true, b"any source", T));
}

const T: Duration = Duration::from_secs(3);
const UDP_VIP_PORT: u16 = 7000;
const TCP_VIP_PORT: u16 = 7001;
const SPORT: u16 = 40000;

/// Detaches `lb decap` from the interface whose pins are here, also when
/// the test fails (dropped before the lab removes the namespaces).
struct DetachOnDrop(PathBuf);

impl Drop for DetachOnDrop {
    fn drop(&mut self) {
        if let Err(e) = decap::detach(&self.0) {
            eprintln!("warning: removing {}: {e:#}", self.0.display());
        }
    }
}

fn lb(lab: &Lab, args: &[&str]) -> Output {
    let out = lb_tests::output_within(
        Command::new(&lab.options().lb_bin).args(args),
        Duration::from_secs(20),
    );
    eprintln!(
        "$ lb {} -> {}\n{}{}",
        args.join(" "),
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// Name of the XDP program attached to `iface` in `ns`, if any.
fn xdp_prog(ns: &str, iface: &str) -> Option<String> {
    let out = Command::new("ip")
        .args(["-n", ns, "-j", "-d", "link", "show", "dev", iface])
        .output()
        .expect("ip link show");
    assert!(out.status.success(), "{out:?}");
    let links: serde_json::Value = serde_json::from_slice(&out.stdout).expect("ip -j");
    links[0]["xdp"]["prog"]["name"].as_str().map(str::to_string)
}

fn ip_in(ns: &str, args: &[&str]) {
    let out = Command::new("ip")
        .args(["-n", ns])
        .args(args)
        .output()
        .expect("ip");
    assert!(out.status.success(), "ip {args:?}: {out:?}");
}

fn status(lab: &Lab, ns: &str) -> Status {
    let out = lb(
        lab,
        &["decap", "--netns", ns, "-i", "eth0", "--stats", "--json"],
    );
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).expect("--stats --json parses")
}

fn stats(lab: &Lab, ns: &str) -> BTreeMap<String, u64> {
    status(lab, ns)
        .stats
        .into_iter()
        .map(|r| (r.reason, r.packets))
        .collect()
}

/// The allowed outer sources `--stats --json` shows (`None`: any).
fn sources(lab: &Lab, ns: &str) -> Option<Vec<String>> {
    status(lab, ns).sources
}

/// Sockets the balancer's namespace sends and listens with.
struct Sender {
    /// `AF_INET, SOCK_RAW, IPPROTO_IPIP`: sends an inner IPv4 packet, the kernel adds the outer header.
    ipip: Socket,
    /// `AF_INET6, SOCK_RAW, 41`: the same for IPv6.
    ip6ip6: Socket,
    /// Raw TCP receivers, for the backend's SYN-ACKs (no socket takes them).
    tcp4: Socket,
    tcp6: Socket,
    /// Where the backend's UDP answers arrive.
    udp4: UdpSocket,
    udp6: UdpSocket,
}

fn raw(domain: Domain, proto: i32) -> Socket {
    let s = Socket::new(domain, Type::RAW, Some(Protocol::from(proto))).expect("raw socket");
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s
}

impl Sender {
    fn new() -> Self {
        let udp = |ip: IpAddr| {
            let s = UdpSocket::bind((ip, SPORT)).expect("bind reply socket");
            s.set_read_timeout(Some(T)).unwrap();
            s
        };
        Self {
            ipip: raw(Domain::IPV4, libc::IPPROTO_IPIP),
            ip6ip6: raw(Domain::IPV6, libc::IPPROTO_IPV6),
            tcp4: raw(Domain::IPV4, libc::IPPROTO_TCP),
            tcp6: raw(Domain::IPV6, libc::IPPROTO_TCP),
            udp4: udp(BALANCER_BACKEND_V4.into()),
            udp6: udp(BALANCER_BACKEND_V6.into()),
        }
    }

    /// Sends `inner` (an IP packet) encapsulated to backend 1.
    fn send(&self, inner: &[u8]) {
        let (socket, to) = if inner[0] >> 4 == 4 {
            (&self.ipip, IpAddr::V4(backend_v4(1)))
        } else {
            (&self.ip6ip6, IpAddr::V6(backend_v6(1)))
        };
        let sent = socket
            .send_to(inner, &SockAddr::from(SocketAddr::new(to, 0)))
            .expect("send encapsulated");
        assert_eq!(sent, inner.len());
    }

    /// Waits for the SYN-ACK answering a SYN with sequence `seq` sent to the VIP's TCP port.
    fn syn_ack(&self, v6: bool, seq: u32) -> bool {
        let socket = if v6 { &self.tcp6 } else { &self.tcp4 };
        let deadline = Instant::now() + T;
        let mut buf = [MaybeUninit::<u8>::uninit(); 2048];
        while Instant::now() < deadline {
            let Ok(n) = socket.recv(&mut buf) else {
                continue;
            };
            // SAFETY: recv initialised the first n bytes.
            let bytes: Vec<u8> = buf[..n]
                .iter()
                .map(|b| unsafe { b.assume_init() })
                .collect();
            // IPv4 raw sockets deliver the IP header too, IPv6 ones do not.
            let tcp = if v6 {
                TcpHeader::from_slice(&bytes).ok().map(|(h, _)| h)
            } else {
                match SlicedPacket::from_ip(&bytes) {
                    Ok(SlicedPacket {
                        transport: Some(TransportSlice::Tcp(t)),
                        ..
                    }) => Some(t.to_header()),
                    _ => None,
                }
            };
            if let Some(h) = tcp
                && h.source_port == TCP_VIP_PORT
                && h.destination_port == SPORT + 1
                && h.syn
                && h.ack
                && h.acknowledgment_number == seq.wrapping_add(1)
            {
                return true;
            }
        }
        false
    }
}

/// Servers bound to the VIPs on the backend.
struct Servers {
    udp4: UdpSocket,
    udp6: UdpSocket,
    /// Kept open so the kernel answers SYNs to the VIP.
    _tcp: [TcpListener; 2],
}

/// The source (the balancer's address) and destination (the VIP) of the
/// inner packets of one family.
fn inner_ends(v6: bool) -> (IpAddr, IpAddr) {
    if v6 {
        (BALANCER_BACKEND_V6.into(), VIP_V6.into())
    } else {
        (BALANCER_BACKEND_V4.into(), VIP_V4.into())
    }
}

fn inner_udp(v6: bool, payload: &[u8]) -> Vec<u8> {
    let (src, vip) = inner_ends(v6);
    Frame::udp(src, vip, SPORT, UDP_VIP_PORT)
        .payload(payload)
        .ip_packet()
}

fn inner_syn(v6: bool, seq: u32) -> Vec<u8> {
    let (src, vip) = inner_ends(v6);
    Frame::tcp(src, vip, SPORT + 1, TCP_VIP_PORT)
        .syn()
        .seq(seq)
        .window(65535)
        .payload(&[])
        .ip_packet()
}

/// How long a datagram that must not arrive is waited for.
const NOT_ARRIVING: Duration = Duration::from_millis(500);

/// One UDP datagram through the tunnel to the VIP, and its direct answer:
/// whether the server got it within `wait` (then it must come from the
/// inner source, and its answer must come back from the VIP).
fn udp_round_trip(
    sender: &Sender,
    servers: &Servers,
    v6: bool,
    payload: &[u8],
    wait: Duration,
) -> bool {
    sender.send(&inner_udp(v6, payload));
    let server = if v6 { &servers.udp6 } else { &servers.udp4 };
    server.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 2048];
    let Ok((n, from)) = server.recv_from(&mut buf) else {
        return false;
    };
    assert_eq!(&buf[..n], payload, "the datagram arrives whole");
    let (inner_src, vip) = inner_ends(v6);
    assert_eq!(
        from,
        SocketAddr::new(inner_src, SPORT),
        "from the inner source"
    );
    server.send_to(b"answer", from).expect("answer");
    let reply = if v6 { &sender.udp6 } else { &sender.udp4 };
    let (n, from) = reply.recv_from(&mut buf).expect("the answer arrives");
    assert_eq!(
        (&buf[..n], from),
        (&b"answer"[..], SocketAddr::new(vip, UDP_VIP_PORT))
    );
    true
}

#[test]
fn lb_decap_on_a_backend_delivers_ipip_and_ip6ip6_to_its_vip_and_detaches_cleanly() {
    let opts = LabOptions::from_env(1).expect("lab options");
    let mut lab = Lab::create("decap", opts).expect("creating the lab");
    let be = lab.backends()[0].clone();
    let ns = be.ns.clone();
    let pins = decap::default_pin_dir("eth0", Some(&ns));
    let _detach = DetachOnDrop(pins.clone());

    // The lab's helper frees an interface it holds (here the client's c0,
    // which it attaches a pass program to); a backend's eth0 it may hold too.
    let client_ns = lab.client_ns().to_string();
    assert_eq!(xdp_prog(&client_ns, "c0").as_deref(), Some("xdp_pass"));
    assert!(lab.detach_pass(&client_ns, "c0").expect("detach_pass"));
    assert_eq!(xdp_prog(&client_ns, "c0"), None);
    lab.detach_pass(&ns, "eth0").expect("detach_pass");
    assert_eq!(xdp_prog(&ns, "eth0"), None);

    // Errors are reported plainly and leave nothing behind.
    let vips = format!("{VIP_V4},{VIP_V6}");
    let out = lb(
        &lab,
        &["decap", "--netns", &ns, "-i", "nosuch0", "--vip", &vips],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no interface nosuch0"),
        "{out:?}"
    );
    assert!(!decap::default_pin_dir("nosuch0", Some(&ns)).exists());

    // The backend's side of ipip mode: the VIPs on lo, servers bound to them.
    ip_in(&ns, &["addr", "add", &format!("{VIP_V4}/32"), "dev", "lo"]);
    ip_in(
        &ns,
        &[
            "addr",
            "add",
            &format!("{VIP_V6}/128"),
            "dev",
            "lo",
            "nodad",
        ],
    );
    let servers = run_in_ns(&ns, || {
        let udp = |ip: IpAddr| UdpSocket::bind((ip, UDP_VIP_PORT)).expect("bind UDP to the VIP");
        Servers {
            udp4: udp(VIP_V4.into()),
            udp6: udp(VIP_V6.into()),
            _tcp: [
                TcpListener::bind((VIP_V4, TCP_VIP_PORT)).expect("bind TCP to the VIP"),
                TcpListener::bind((VIP_V6, TCP_VIP_PORT)).expect("bind TCP to the VIP"),
            ],
        }
    })
    .expect("backend namespace");
    // The answers come from the VIP, which the balancer's namespace has no route back to.
    run_in_ns(lab.balancer_ns(), || {
        for key in ["all", "lbb"] {
            std::fs::write(format!("/proc/sys/net/ipv4/conf/{key}/rp_filter"), "0")
                .expect("rp_filter");
        }
    })
    .expect("balancer namespace");
    let sender = run_in_ns(lab.balancer_ns(), Sender::new).expect("balancer namespace");

    // Without decapsulation the kernel here takes no IP-in-IP.
    assert!(!udp_round_trip(
        &sender,
        &servers,
        false,
        b"before",
        NOT_ARRIVING
    ));

    // Restricted to the balancer's addresses, as the lab does for every DSR test.
    let balancer = format!("{BALANCER_BACKEND_V4},{BALANCER_BACKEND_V6}");
    // `lb decap --netns NS -i eth0 ARGS`, as an operator on the backend.
    let decap = |args: &[&str]| {
        let mut all = vec!["decap", "--netns", &ns, "-i", "eth0"];
        all.extend_from_slice(args);
        lb(&lab, &all)
    };
    let out = decap(&["--vip", &vips, "--from", &balancer]);
    assert!(out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("attached in driver mode"),
        "{out:?}"
    );
    assert!(out.stderr.is_empty(), "no warning: {out:?}");
    let balancer_prefixes = vec![
        format!("{BALANCER_BACKEND_V4}/32"),
        format!("{BALANCER_BACKEND_V6}/128"),
    ];
    assert_eq!(sources(&lab, &ns), Some(balancer_prefixes.clone()));
    let text = decap(&["--stats"]);
    assert!(
        String::from_utf8_lossy(&text.stdout).contains(&format!(
            "outer sources: {BALANCER_BACKEND_V4}/32, {BALANCER_BACKEND_V6}/128\n"
        )),
        "{text:?}"
    );
    assert_eq!(xdp_prog(&ns, "eth0").as_deref(), Some("lb_decap"));
    let link = pins.join(decap::LINK_PIN);
    let link_inode = std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&link).unwrap());
    let before = stats(&lab, &ns);

    for v6 in [false, true] {
        assert!(
            udp_round_trip(&sender, &servers, v6, b"through the tunnel", T),
            "UDP (v6: {v6}) decapsulated and answered"
        );
        let seq = 0x1000_0000 + u32::from(v6);
        sender.send(&inner_syn(v6, seq));
        assert!(
            sender.syn_ack(v6, seq),
            "TCP SYN (v6: {v6}) decapsulated and answered by the listener on the VIP"
        );
    }
    let after = stats(&lab, &ns);
    let delta = |r: DecapReason| after[r.name()] - before.get(r.name()).copied().unwrap_or(0);
    assert_eq!(delta(DecapReason::DecapV4), 2, "{after:?}");
    assert_eq!(delta(DecapReason::DecapV6), 2, "{after:?}");
    assert_eq!(delta(DecapReason::PassNotVip), 0, "{after:?}");

    // With --local-only the interface's own addresses (the balancer
    // tunnels to them) are the only outer destinations: still answered.
    let out = decap(&["--vip", &vips, "--from", &balancer, "--local-only"]);
    assert!(out.status.success(), "{out:?}");
    for v6 in [false, true] {
        assert!(
            udp_round_trip(&sender, &servers, v6, b"to this host", T),
            "UDP (v6: {v6}) decapsulated with --local-only"
        );
    }
    let after = stats(&lab, &ns);
    assert_eq!(after[DecapReason::PassNotLocal.name()], 0, "{after:?}");

    // Again with only the IPv6 VIP: updated in place, the IPv4 VIP's packets
    // are no longer stripped.
    let out = decap(&["--vip", &VIP_V6.to_string(), "--from", &balancer]);
    assert!(out.status.success());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("updated in place") && stdout.contains("0 added, 1 removed"),
        "{stdout}"
    );
    assert_eq!(
        std::os::unix::fs::MetadataExt::ino(&std::fs::metadata(&link).unwrap()),
        link_inode,
        "the same pinned attachment"
    );
    assert_eq!(xdp_prog(&ns, "eth0").as_deref(), Some("lb_decap"));
    assert!(!udp_round_trip(
        &sender,
        &servers,
        false,
        b"no longer a VIP here",
        NOT_ARRIVING
    ));
    assert!(udp_round_trip(&sender, &servers, true, b"still one", T));
    let last = stats(&lab, &ns);
    assert_eq!(last[DecapReason::PassNotVip.name()], 1, "{last:?}");
    assert_eq!(
        last[DecapReason::DecapV6.name()],
        after[DecapReason::DecapV6.name()] + 1
    );
    sources_are_replaced_in_place(&lab, &ns, &sender, &servers);

    // --detach: nothing attached, nothing pinned (not even the namespace's directory).
    let out = decap(&["--detach"]);
    assert!(out.status.success());
    assert_eq!(xdp_prog(&ns, "eth0"), None);
    assert!(!pins.exists(), "{} is left", pins.display());
    assert!(
        !pins.parent().is_some_and(Path::exists),
        "the namespace's pin directory is left"
    );
    let out = decap(&["--stats"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("nothing attached"),
        "{out:?}"
    );
    assert!(!udp_round_trip(
        &sender,
        &servers,
        true,
        b"detached",
        NOT_ARRIVING
    ));
}

/// Mutation fuzzing (`lb_tests::fuzz`): tunnelled frames of both families,
/// allowed and foreign outer sources, to VIPs and not, each mutated from a
/// fixed seed. What the program changes must be a whole tunnelled packet
/// stripped to its inner packet; anything else passes untouched or, from a
/// foreign source, is dropped; nothing aborts.
#[test]
fn mutated_tunnelled_frames_are_decapsulated_whole_or_left_alone() {
    use lb_tests::fuzz::{Failures, Rng, check_decapsulated, mutate};
    let mut d = Decap::load();
    d.restrict(&["198.18.2.0/24", "fd00:18:2::/64"]);
    let bases = [
        ipip(&tcp4(VIP_V4)),
        ipip(&udp4(VIP_V4)),
        ip6ip6(&tcp6(VIP_V6)),
        ip6ip6(&udp6(VIP_V6)),
        ipip_from(FOREIGN_V4, &udp4(VIP_V4)),
        ip6ip6_from(FOREIGN_V6, &udp6(VIP_V6)),
        ipip(&udp4(OTHER_V4)),
        in_v4(IpNumber::IPV6, &udp6(VIP_V6), |_| {}),
    ];
    let mut rng = Rng::new(0x0064_6563_6170);
    let (mut stripped, mut failures) = (0usize, Failures::default());
    for base in &bases {
        for input in std::iter::once(base.clone()).chain((0..3000).map(|_| mutate(&mut rng, base)))
        {
            let (action, output) = d.run(&input);
            let verdict = match action {
                XDP_DROP | XDP_PASS if output == input => Ok(()),
                XDP_PASS => {
                    stripped += 1;
                    check_decapsulated(&input, &output)
                }
                other => Err(format!("action {other}")),
            };
            failures.record("decap", verdict, &input, &output);
        }
    }
    failures.assert_none();
    let runs = failures.runs();
    assert!(
        stripped > runs / 10,
        "only {stripped} of {runs} decapsulated"
    );
}
