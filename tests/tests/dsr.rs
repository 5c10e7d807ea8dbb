//! Packet-level tests of the direct-server-return modes (`forwarding =
//! "ipip"` and `"l2"`): crafted frames through the loaded XDP program with
//! BPF_PROG_TEST_RUN, compared byte for byte with frames built by etherparse.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2Header, Icmpv4Type, Icmpv6Type, IpDscp, IpEcn, IpHeaders, IpNumber,
    Ipv4Header, Ipv6FlowLabel, Ipv6Header, PacketBuilder, TcpOptionElement, icmpv4,
};
use lb_common::{FAMILY_V4, FlowKey, PROTO_TCP, Reason};
use lb_tests::{
    assert_checksums_valid, assert_hit_path_forwards_alike, reason_count, run_xdp, set_mtu,
    xdp_action::*,
};
use lb_userspace::{
    balancer::Balancer,
    dataplane::ip_to_addr,
    lab::{
        CLIENT_V4, CLIENT_V6, VIP_V4, VIP_V6, backend_mac, backend_v4, backend_v6,
        testrun::{CLIENT_MAC, LBB_MAC, LBC_MAC, TestRunNet},
    },
};

const PAYLOAD: &[u8] = b"hello, backend";
const CPORT: u16 = 40000;
/// The `l2` VIP.
const VIP_L2: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
/// The `ipip` VIP with `mss_clamp`.
const VIP_CLAMP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 3);
/// The `ipip` VIP with three backends.
const VIP_THREE: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 4);
/// A router on the client's path.
const ROUTER_V4: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 9);
/// The outer IPv4 source the config names.
const OUTER_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 1);
/// The outer IPv6 source the config names.
const OUTER_V6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x2, 0, 0, 0, 0, 0x1);

fn config(encap_v4: &str) -> String {
    format!(
        r#"
interfaces = ["lbc", "lbb"]
encap_source_v4 = "{encap_v4}"
encap_source_v6 = "{OUTER_V6}"

[[service]]
name = "tcp4"
vip = "{VIP_V4}:80"
forwarding = "ipip"
ring_size = 13
[[service.backend]]
address = "{b4}:80"

[[service]]
name = "udp4"
vip = "{VIP_V4}:53"
protocol = "udp"
forwarding = "ipip"
ring_size = 13
[[service.backend]]
address = "{b4}:53"

[[service]]
name = "tcp6"
vip = "[{VIP_V6}]:80"
forwarding = "ipip"
ring_size = 13
[[service.backend]]
address = "[{b6}]:80"

[[service]]
name = "udp6-l2"
vip = "[{VIP_V6}]:53"
protocol = "udp"
forwarding = "l2"
ring_size = 13
[[service.backend]]
address = "[{b6}]:53"

[[service]]
name = "l2"
vip = "{VIP_L2}:80"
forwarding = "l2"
ring_size = 13
[[service.backend]]
address = "{b4}:80"

[[service]]
name = "three"
vip = "{VIP_THREE}:80"
forwarding = "ipip"
ring_size = 13
[[service.backend]]
address = "{b4}:80"
[[service.backend]]
address = "{b4_2}:80"
[[service.backend]]
address = "{b4_3}:80"

[[service]]
name = "clamp"
vip = "{VIP_CLAMP}:80"
forwarding = "ipip"
mss_clamp = true
ring_size = 13
[[service.backend]]
address = "{b4}:80"
"#,
        b4 = backend_v4(1),
        b4_2 = backend_v4(2),
        b4_3 = backend_v4(3),
        b6 = backend_v6(1),
    )
}

/// Runs `body` in a fresh fixture namespace with the balancer loaded from
/// `config(encap_v4)`.
fn with_fixture(encap_v4: &str, body: impl FnOnce(&mut Balancer, &TestRunNet) + Send + 'static) {
    lb_tests::with_fixture("dsr", config(encap_v4), body)
}

/// A client's IPv4 TCP frame to `dst:dport` with DSCP/ECN set, so the test
/// sees them copied to the outer header.
fn tcp4(
    dst: Ipv4Addr,
    sport: u16,
    dport: u16,
    flags: &str,
    options: &[TcpOptionElement],
) -> Vec<u8> {
    let mut ip = Ipv4Header::new(0, 64, IpNumber::TCP, CLIENT_V4.octets(), dst.octets()).unwrap();
    ip.dscp = IpDscp::try_new(46).unwrap();
    ip.ecn = IpEcn::ONE;
    let mut step = PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp(sport, dport, 0x0102_0304, 8192);
    if flags.contains('S') {
        step = step.syn();
    }
    if flags.contains('A') {
        step = step.ack(1);
    }
    if !options.is_empty() {
        step = step.options(options).expect("options fit");
    }
    let mut v = Vec::new();
    step.write(&mut v, PAYLOAD).unwrap();
    v
}

/// The frame `inner` (a client's frame) encapsulated IPIP to backend 1 from `outer_src`.
fn ipip4(inner: &[u8], outer_src: Ipv4Addr) -> Vec<u8> {
    ipip4_to(inner, outer_src, 1)
}

/// The frame `inner` encapsulated IPIP to backend `i` from `outer_src`.
fn ipip4_to(inner: &[u8], outer_src: Ipv4Addr, i: usize) -> Vec<u8> {
    let inner_ip = Ipv4Header::from_slice(&inner[14..]).unwrap().0;
    let mut outer = Ipv4Header::new(
        (inner.len() - 14) as u16,
        64,
        IpNumber::IPV4,
        outer_src.octets(),
        backend_v4(i).octets(),
    )
    .unwrap();
    outer.dscp = inner_ip.dscp;
    outer.ecn = inner_ip.ecn;
    outer.dont_fragment = inner_ip.dont_fragment;
    outer.header_checksum = outer.calc_header_checksum();
    let mut v = Vec::new();
    Ethernet2Header {
        source: LBB_MAC,
        destination: backend_mac(i),
        ether_type: EtherType::IPV4,
    }
    .write(&mut v)
    .unwrap();
    outer.write(&mut v).unwrap();
    v.extend_from_slice(&inner[14..]);
    v
}

#[test]
fn ipv4_tcp_and_udp_to_an_ipip_vip_are_encapsulated_untouched() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        let syn = tcp4(VIP_V4, CPORT, 80, "S", &[]);
        let (action, out) = run_xdp(b, &syn, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT, "lbc -> lbb");
        assert_eq!(out, ipip4(&syn, OUTER_V4));
        assert_eq!(reason_count(b, Reason::RedirectForward), 1);

        // UDP without DF: the outer header has none either.
        let mut ip =
            Ipv4Header::new(0, 7, IpNumber::UDP, CLIENT_V4.octets(), VIP_V4.octets()).unwrap();
        ip.dont_fragment = false;
        let mut udp = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
            .ip(IpHeaders::Ipv4(ip, Default::default()))
            .udp(CPORT, 53)
            .write(&mut udp, PAYLOAD)
            .unwrap();
        let (action, out) = run_xdp(b, &udp, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, ipip4(&udp, OUTER_V4), "TTL 7 stays 7 inside");
        // And a TTL of 1 is not answered here: the packet is not routed.
        let mut last_hop = udp.clone();
        last_hop[22] = 1;
        last_hop[24..26].copy_from_slice(&[0, 0]);
        let sum = lb_common::csum::checksum(&last_hop[14..34]);
        last_hop[24..26].copy_from_slice(&sum.to_be_bytes());
        let (action, out) = run_xdp(b, &last_hop, net.lbc).unwrap();
        assert_eq!((action, out), (XDP_REDIRECT, ipip4(&last_hop, OUTER_V4)));
        assert_eq!(reason_count(b, Reason::TxTimeExceeded), 0);
    });
}

/// The frame `inner` (an IPv6 frame) encapsulated IP6IP6 to backend 1 from
/// `OUTER_V6`, with the inner traffic class and flow label.
fn ip6ip6(inner: &[u8], traffic_class: u8, flow_label: Ipv6FlowLabel) -> Vec<u8> {
    let outer = Ipv6Header {
        traffic_class,
        flow_label,
        payload_length: (inner.len() - 14) as u16,
        next_header: IpNumber::IPV6,
        hop_limit: 64,
        source: OUTER_V6.octets(),
        destination: backend_v6(1).octets(),
    };
    let mut v = Vec::new();
    Ethernet2Header {
        source: LBB_MAC,
        destination: backend_mac(1),
        ether_type: EtherType::IPV6,
    }
    .write(&mut v)
    .unwrap();
    outer.write(&mut v).unwrap();
    v.extend_from_slice(&inner[14..]);
    v
}

#[test]
fn ipv6_to_an_ipip_vip_is_encapsulated_with_traffic_class_and_flow_label() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        let ip = Ipv6Header {
            traffic_class: 0xb9,
            flow_label: Ipv6FlowLabel::try_new(0x5_4321).unwrap(),
            payload_length: 0,
            next_header: IpNumber::TCP,
            hop_limit: 9,
            source: CLIENT_V6.octets(),
            destination: VIP_V6.octets(),
        };
        let mut input = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
            .ip(IpHeaders::Ipv6(ip.clone(), Default::default()))
            .tcp(CPORT, 80, 7, 1000)
            .syn()
            .write(&mut input, PAYLOAD)
            .unwrap();
        let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, ip6ip6(&input, ip.traffic_class, ip.flow_label));
    });
}

#[test]
fn l2_mode_changes_only_the_macs() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        let syn = tcp4(VIP_L2, CPORT, 80, "S", &[]);
        let (action, out) = run_xdp(b, &syn, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let mut expected = syn.clone();
        expected[..6].copy_from_slice(&backend_mac(1));
        expected[6..12].copy_from_slice(&LBB_MAC);
        assert_eq!(out, expected);
        assert_checksums_valid(&out);
        // A wrong IPv4 header checksum stays wrong (nothing is rewritten
        // that could make it look right): sent on for the backend to drop.
        let mut bad = tcp4(VIP_L2, CPORT + 1, 80, "S", &[]);
        bad[24] ^= 0x5a;
        let (action, out) = run_xdp(b, &bad, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        bad[..6].copy_from_slice(&backend_mac(1));
        bad[6..12].copy_from_slice(&LBB_MAC);
        assert_eq!(out, bad);

        let mut udp6 = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
            .ipv6(CLIENT_V6.octets(), VIP_V6.octets(), 64)
            .udp(CPORT, 53)
            .write(&mut udp6, PAYLOAD)
            .unwrap();
        let (action, out) = run_xdp(b, &udp6, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let mut expected = udp6.clone();
        expected[..6].copy_from_slice(&backend_mac(1));
        expected[6..12].copy_from_slice(&LBB_MAC);
        assert_eq!(out, expected);
        assert_eq!(reason_count(b, Reason::RedirectForward), 3);
    });
}

/// The hit path alone (`lb_xdp`, with the full program taken out of
/// `PROGS`) forwards established DSR flows, `ipip` and `l2`, IPv4 and
/// IPv6, TCP and UDP, with the full program's bytes: it has copies of the
/// full program's forwarding (a plain IPv4 one among them) that must not
/// drift from it.
#[test]
fn established_dsr_flows_are_forwarded_by_the_attached_program_alone() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        lb_tests::pin_to_this_cpu();
        let udp = |src: IpAddr, dst: IpAddr, dport: u16| {
            let step = PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC);
            let step = match (src, dst) {
                (IpAddr::V4(s), IpAddr::V4(d)) => step.ipv4(s.octets(), d.octets(), 64),
                (IpAddr::V6(s), IpAddr::V6(d)) => step.ipv6(s.octets(), d.octets(), 64),
                _ => unreachable!("one family"),
            };
            let mut v = Vec::new();
            step.udp(CPORT, dport).write(&mut v, PAYLOAD).unwrap();
            v
        };
        let mut tcp6 = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
            .ipv6(CLIENT_V6.octets(), VIP_V6.octets(), 64)
            .tcp(CPORT, 80, 7, 1000)
            .ack(1)
            .write(&mut tcp6, PAYLOAD)
            .unwrap();
        let frames: [(&str, &[u8], u32); 5] = [
            ("ipip TCP/IPv4", &tcp4(VIP_V4, CPORT, 80, "A", &[]), net.lbc),
            (
                "ipip UDP/IPv4",
                &udp(CLIENT_V4.into(), VIP_V4.into(), 53),
                net.lbc,
            ),
            ("ipip TCP/IPv6", &tcp6, net.lbc),
            (
                "l2 UDP/IPv6",
                &udp(CLIENT_V6.into(), VIP_V6.into(), 53),
                net.lbc,
            ),
            ("l2 TCP/IPv4", &tcp4(VIP_L2, CPORT, 80, "A", &[]), net.lbc),
        ];
        assert_hit_path_forwards_alike(b, &frames);
    });
}

fn key4(dst: Ipv4Addr, src: Ipv4Addr, sport: u16, dport: u16) -> FlowKey {
    FlowKey {
        src: ip_to_addr(src.into()).0,
        dst: ip_to_addr(dst.into()).0,
        sport,
        dport,
        proto: PROTO_TCP,
        family: FAMILY_V4,
        pad: [0; 2],
    }
}

#[test]
fn dsr_flows_keep_no_reply_state() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        for vip in [VIP_V4, VIP_L2] {
            let client = key4(vip, CLIENT_V4, CPORT, 80);
            // What NAT would have recorded for the backend's replies.
            let reply = key4(CLIENT_V4, backend_v4(1), 80, CPORT);
            let syn = tcp4(vip, CPORT, 80, "S", &[]);
            assert_eq!(run_xdp(b, &syn, net.lbc).unwrap().0, XDP_REDIRECT);
            let d = b.dataplane();
            assert!(
                d.pending_flow(&client).unwrap().is_some(),
                "{vip}: handshake"
            );
            assert!(d.pending_flow(&reply).unwrap().is_none(), "{vip}");
            let ack = tcp4(vip, CPORT, 80, "A", &[]);
            assert_eq!(run_xdp(b, &ack, net.lbc).unwrap().0, XDP_REDIRECT);
            let d = b.dataplane();
            assert!(d.flow(&client).unwrap().is_some(), "{vip}: confirmed");
            assert!(d.pending_flow(&client).unwrap().is_none(), "{vip}");
            assert!(d.flow(&reply).unwrap().is_none(), "{vip}: no reply entry");
            // The established flow's next packet takes the same way.
            assert_eq!(run_xdp(b, &ack, net.lbc).unwrap().0, XDP_REDIRECT);
        }
    });
}

#[test]
fn an_outer_source_prefix_takes_its_host_bits_from_the_flow() {
    with_fixture("198.18.7.0/24", |b, net| {
        for sport in [0x1234u16, 0xab00, 0xab01] {
            let syn = tcp4(VIP_V4, sport, 80, "S", &[]);
            let (action, out) = run_xdp(b, &syn, net.lbc).unwrap();
            assert_eq!(action, XDP_REDIRECT);
            // The last octet: the client's, mixed with the port's high byte
            // (the 32-bit word is client ^ port in both halves).
            let host = CLIENT_V4.octets()[3] ^ (sport >> 8) as u8;
            assert_eq!(
                out,
                ipip4(&syn, Ipv4Addr::new(198, 18, 7, host)),
                "{sport:#x}"
            );
        }
    });
}

#[test]
fn mss_clamp_lowers_a_syns_mss_to_what_fits_encapsulated() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        // 1500 - 20 (outer) - 20 (IP) - 20 (TCP) = 1440.
        for (options, clamped) in [
            (
                vec![TcpOptionElement::MaximumSegmentSize(1460)],
                vec![TcpOptionElement::MaximumSegmentSize(1440)],
            ),
            // At an odd offset: one NOP first.
            (
                vec![
                    TcpOptionElement::Noop,
                    TcpOptionElement::MaximumSegmentSize(8960),
                    TcpOptionElement::Noop,
                    TcpOptionElement::Noop,
                    TcpOptionElement::Noop,
                ],
                vec![
                    TcpOptionElement::Noop,
                    TcpOptionElement::MaximumSegmentSize(1440),
                    TcpOptionElement::Noop,
                    TcpOptionElement::Noop,
                    TcpOptionElement::Noop,
                ],
            ),
            // Already small enough: untouched.
            (
                vec![TcpOptionElement::MaximumSegmentSize(1200)],
                vec![TcpOptionElement::MaximumSegmentSize(1200)],
            ),
        ] {
            let syn = tcp4(VIP_CLAMP, CPORT, 80, "S", &options);
            let (action, out) = run_xdp(b, &syn, net.lbc).unwrap();
            assert_eq!(action, XDP_REDIRECT);
            let expected = ipip4(&tcp4(VIP_CLAMP, CPORT, 80, "S", &clamped), OUTER_V4);
            assert_eq!(out, expected, "{options:?}");
            // The inner TCP checksum was patched right.
            let mut inner = out[..14].to_vec();
            inner.extend_from_slice(&out[34..]);
            assert_checksums_valid(&inner);
        }
        // Without mss_clamp the SYN's MSS stays as it is.
        let syn = tcp4(
            VIP_V4,
            CPORT,
            80,
            "S",
            &[TcpOptionElement::MaximumSegmentSize(1460)],
        );
        let (_, out) = run_xdp(b, &syn, net.lbc).unwrap();
        assert_eq!(out, ipip4(&syn, OUTER_V4));
        // A lower route MTU clamps lower: 1400 - 60.
        set_mtu(net.ns(), "lbb", 1400);
        // (The per-CPU next-hop cache holds the old MTU for up to a second.)
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let syn = tcp4(
            VIP_CLAMP,
            CPORT + 1,
            80,
            "S",
            &[TcpOptionElement::MaximumSegmentSize(1460)],
        );
        let (_, out) = run_xdp(b, &syn, net.lbc).unwrap();
        let expected = tcp4(
            VIP_CLAMP,
            CPORT + 1,
            80,
            "S",
            &[TcpOptionElement::MaximumSegmentSize(1340)],
        );
        assert_eq!(out, ipip4(&expected, OUTER_V4));
    });
}

/// A client's IPv4 TCP frame to the ipip VIP of `ip_len` bytes of IP.
fn big4(ip_len: usize, df: bool) -> Vec<u8> {
    let mut ip =
        Ipv4Header::new(0, 64, IpNumber::TCP, CLIENT_V4.octets(), VIP_V4.octets()).unwrap();
    ip.dont_fragment = df;
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
        .ip(IpHeaders::Ipv4(ip, Default::default()))
        .tcp(CPORT, 80, 0x0102_0304, 8192)
        .syn()
        .write(&mut v, &vec![0x5a; ip_len - 40])
        .unwrap();
    v
}

#[test]
fn packets_that_no_longer_fit_once_encapsulated_get_the_room_left() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        set_mtu(net.ns(), "lbb", 1400);
        let frag_needed = |input: &[u8], mtu: u16| {
            let mut ip =
                Ipv4Header::new(0, 64, IpNumber::ICMP, VIP_V4.octets(), CLIENT_V4.octets())
                    .unwrap();
            ip.dont_fragment = false;
            ip.dscp = IpDscp::try_new(0xc0 >> 2).unwrap();
            let mut v = Vec::new();
            PacketBuilder::ethernet2(LBC_MAC, CLIENT_MAC)
                .ip(IpHeaders::Ipv4(ip, Default::default()))
                .icmpv4(Icmpv4Type::DestinationUnreachable(
                    icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: mtu },
                ))
                .write(&mut v, &input[14..14 + 20 + 8])
                .unwrap();
            v
        };
        // 1380 + 20 fits exactly; one more byte does not.
        let fits = big4(1380, true);
        let (action, out) = run_xdp(b, &fits, net.lbc).unwrap();
        assert_eq!((action, out), (XDP_REDIRECT, ipip4(&fits, OUTER_V4)));
        let big = big4(1381, true);
        let (action, out) = run_xdp(b, &big, net.lbc).unwrap();
        assert_eq!((action, out), (XDP_TX, frag_needed(&big, 1380)));
        assert_eq!(reason_count(b, Reason::TxTooBig), 1);
        // Without DF it can be neither fragmented here nor sent whole.
        let (action, _) = run_xdp(b, &big4(1381, false), net.lbc).unwrap();
        assert_eq!(action, XDP_DROP);
        assert_eq!(reason_count(b, Reason::DropTooBig), 1);

        // IPv6: "packet too big" with 40 bytes less.
        let mut big6 = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
            .ipv6(CLIENT_V6.octets(), VIP_V6.octets(), 64)
            .tcp(CPORT, 80, 7, 1000)
            .syn()
            .write(&mut big6, &[0x5a; 1361 - 60])
            .unwrap();
        let (action, out) = run_xdp(b, &big6, net.lbc).unwrap();
        let mut expected = Vec::new();
        PacketBuilder::ethernet2(LBC_MAC, CLIENT_MAC)
            .ipv6(VIP_V6.octets(), CLIENT_V6.octets(), 64)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1360 })
            .write(&mut expected, &big6[14..14 + 1280 - 48])
            .unwrap();
        assert_eq!((action, out), (XDP_TX, expected));
        assert_eq!(reason_count(b, Reason::TxTooBig), 2);
        assert_eq!(reason_count(b, Reason::PassTooBig), 0);
    });
}

/// Which backend (1..=3) an IPIP frame from the data plane is addressed to.
fn outer_backend(out: &[u8]) -> usize {
    (1..=3)
        .find(|i| out[30..34] == backend_v4(*i).octets())
        .expect("addressed to a lab backend")
}

/// "Fragmentation needed" from a router to the VIP, quoting the segment
/// the backend sent the client from `VIP_THREE` to port `cport`.
fn frag_needed_to_vip(cport: u16) -> Vec<u8> {
    let mut quoted = Vec::new();
    PacketBuilder::ipv4(VIP_THREE.octets(), CLIENT_V4.octets(), 63)
        .tcp(80, cport, 77, 4096)
        .ack(1)
        .write(&mut quoted, &[0x42; 1400])
        .unwrap();
    let mut v = Vec::new();
    PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
        .ipv4(ROUTER_V4.octets(), VIP_THREE.octets(), 60)
        .icmpv4(Icmpv4Type::DestinationUnreachable(
            icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        ))
        .write(&mut v, &quoted[..20 + 8])
        .unwrap();
    v
}

#[test]
fn frag_needed_for_a_dsr_vip_reaches_the_backend_that_owns_the_quoted_flow() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        // Several flows, so that more than one backend owns one.
        let mut owners = Vec::new();
        for cport in 41000..41012u16 {
            let syn = tcp4(VIP_THREE, cport, 80, "S", &[]);
            let (action, out) = run_xdp(b, &syn, net.lbc).unwrap();
            assert_eq!(action, XDP_REDIRECT);
            let ack = tcp4(VIP_THREE, cport, 80, "A", &[]);
            assert_eq!(run_xdp(b, &ack, net.lbc).unwrap().0, XDP_REDIRECT);
            owners.push((cport, outer_backend(&out)));
        }
        assert!(
            owners.iter().any(|(_, o)| *o != owners[0].1),
            "the flows should not all be on one backend: {owners:?}"
        );
        // Each error goes, untouched, to the owner of the flow it quotes.
        for (cport, owner) in &owners {
            let icmp = frag_needed_to_vip(*cport);
            let (action, out) = run_xdp(b, &icmp, net.lbc).unwrap();
            assert_eq!(action, XDP_REDIRECT, "port {cport}");
            assert_eq!(out, ipip4_to(&icmp, OUTER_V4, *owner), "port {cport}");
        }
        assert_eq!(
            reason_count(b, Reason::RedirectIcmpToBackend),
            owners.len() as u64
        );
        // A flow this balancer holds no entry for (another node's, in ECMP):
        // the backend Maglev gives its packets, which a SYN then confirms.
        for cport in 42000..42006u16 {
            let icmp = frag_needed_to_vip(cport);
            let (action, out) = run_xdp(b, &icmp, net.lbc).unwrap();
            assert_eq!(action, XDP_REDIRECT);
            let by_icmp = outer_backend(&out);
            let syn = tcp4(VIP_THREE, cport, 80, "S", &[]);
            let (_, out) = run_xdp(b, &syn, net.lbc).unwrap();
            assert_eq!(by_icmp, outer_backend(&out), "port {cport}");
        }
    });
}

#[test]
fn packet_too_big_for_an_ipv6_dsr_vip_is_sent_on_encapsulated() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        let router = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);
        let mut quoted = Vec::new();
        PacketBuilder::ipv6(VIP_V6.octets(), CLIENT_V6.octets(), 63)
            .tcp(80, CPORT, 77, 4096)
            .ack(1)
            .write(&mut quoted, &[0x42; 1400])
            .unwrap();
        let mut icmp = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
            .ipv6(router.octets(), VIP_V6.octets(), 60)
            .icmpv6(Icmpv6Type::PacketTooBig { mtu: 1280 })
            .write(&mut icmp, &quoted[..1280 - 48])
            .unwrap();
        let (action, out) = run_xdp(b, &icmp, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, ip6ip6(&icmp, 0, Ipv6FlowLabel::ZERO));
        assert_eq!(reason_count(b, Reason::RedirectIcmpToBackend), 1);
    });
}
