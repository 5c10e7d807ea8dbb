//! Packet-level tests of the direct-server-return modes (`forwarding =
//! "ipip"` and `"l2"`): crafted frames through the loaded XDP program with
//! BPF_PROG_TEST_RUN, compared byte for byte with frames built by etherparse.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{
    EtherType, Ethernet2Header, Icmpv6Type, IpNumber, Ipv4Header, Ipv6FlowLabel, Ipv6Header,
    TcpOptionElement,
};
use lb_common::{FAMILY_V4, FlowKey, PROTO_TCP, Reason};
use lb_tests::{
    assert_checksums_valid, assert_hit_path_forwards_alike,
    frames::{CPORT, Frame, frag_needed, icmp4_from_vip, icmp6_from_vip},
    reason_count, run_xdp, set_mtu,
    xdp_action::*,
};
use lb_userspace::{
    balancer::Balancer,
    dataplane::ip_to_addr,
    lab::{
        CLIENT_V4, CLIENT_V6, VIP_V4, VIP_V6, backend_mac, backend_v4, backend_v6,
        testrun::{LBB_MAC, TestRunNet},
    },
};

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
/// DSCP 46 and ECN ECT(1) (IPv4 TOS, IPv6 traffic class): marks a client's
/// packet carries that encapsulation must copy to the outer header.
const TOS: u8 = 0xb9;

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

/// A client's TCP/IPv4 segment to `dst:80` with [`TOS`], so the test sees
/// it copied to the outer header.
fn tcp4(dst: Ipv4Addr, sport: u16) -> Frame {
    Frame::tcp(CLIENT_V4, dst, sport, 80).tos(TOS)
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
        let syn = tcp4(VIP_V4, CPORT).syn().bytes();
        let (action, out) = run_xdp(b, &syn, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT, "lbc -> lbb");
        assert_eq!(out, ipip4(&syn, OUTER_V4));
        assert_eq!(reason_count(b, Reason::RedirectForward), 1);

        // UDP without DF: the outer header has none either.
        let udp = Frame::udp(CLIENT_V4, VIP_V4, CPORT, 53).ttl(7).df(false);
        let input = udp.bytes();
        let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, ipip4(&input, OUTER_V4), "TTL 7 stays 7 inside");
        // And a TTL of 1 is not answered here: the packet is not routed.
        let last_hop = udp.ttl(1).bytes();
        let (action, out) = run_xdp(b, &last_hop, net.lbc).unwrap();
        assert_eq!((action, out), (XDP_REDIRECT, ipip4(&last_hop, OUTER_V4)));
        assert_eq!(reason_count(b, Reason::TxTimeExceeded), 0);
    });
}

/// The frame `inner` (an IPv6 frame) encapsulated IP6IP6 to backend 1 from
/// `OUTER_V6`, with the inner traffic class and flow label.
fn ip6ip6(inner: &[u8], traffic_class: u8, flow_label: u32) -> Vec<u8> {
    let outer = Ipv6Header {
        traffic_class,
        flow_label: Ipv6FlowLabel::try_new(flow_label).unwrap(),
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
        let flow_label = 0x5_4321;
        let input = Frame::tcp(CLIENT_V6, VIP_V6, CPORT, 80)
            .syn()
            .ttl(9)
            .tos(TOS)
            .flow_label(flow_label)
            .bytes();
        let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, ip6ip6(&input, TOS, flow_label));
    });
}

#[test]
fn l2_mode_changes_only_the_macs() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        let syn = tcp4(VIP_L2, CPORT).syn().bytes();
        let (action, out) = run_xdp(b, &syn, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let mut expected = syn.clone();
        expected[..6].copy_from_slice(&backend_mac(1));
        expected[6..12].copy_from_slice(&LBB_MAC);
        assert_eq!(out, expected);
        assert_checksums_valid(&out);
        // A wrong IPv4 header checksum stays wrong (nothing is rewritten
        // that could make it look right): sent on for the backend to drop.
        let mut bad = tcp4(VIP_L2, CPORT + 1).syn().bytes();
        bad[24] ^= 0x5a;
        let (action, out) = run_xdp(b, &bad, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        bad[..6].copy_from_slice(&backend_mac(1));
        bad[6..12].copy_from_slice(&LBB_MAC);
        assert_eq!(out, bad);

        let udp6 = Frame::udp(CLIENT_V6, VIP_V6, CPORT, 53).bytes();
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
        let ipip_tcp = tcp4(VIP_V4, CPORT).ack(1).bytes();
        let ipip_udp = Frame::udp(CLIENT_V4, VIP_V4, CPORT, 53).bytes();
        let ipip_tcp6 = Frame::tcp(CLIENT_V6, VIP_V6, CPORT, 80).ack(1).bytes();
        let l2_udp6 = Frame::udp(CLIENT_V6, VIP_V6, CPORT, 53).bytes();
        let l2_tcp = tcp4(VIP_L2, CPORT).ack(1).bytes();
        let frames: [(&str, &[u8], u32); 5] = [
            ("ipip TCP/IPv4", &ipip_tcp, net.lbc),
            ("ipip UDP/IPv4", &ipip_udp, net.lbc),
            ("ipip TCP/IPv6", &ipip_tcp6, net.lbc),
            ("l2 UDP/IPv6", &l2_udp6, net.lbc),
            ("l2 TCP/IPv4", &l2_tcp, net.lbc),
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
            let syn = tcp4(vip, CPORT).syn().bytes();
            assert_eq!(run_xdp(b, &syn, net.lbc).unwrap().0, XDP_REDIRECT);
            let d = b.dataplane();
            assert!(
                d.pending_flow(&client).unwrap().is_some(),
                "{vip}: handshake"
            );
            assert!(d.pending_flow(&reply).unwrap().is_none(), "{vip}");
            let ack = tcp4(vip, CPORT).ack(1).bytes();
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
            let syn = tcp4(VIP_V4, sport).syn().bytes();
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
            let syn = tcp4(VIP_CLAMP, CPORT).syn();
            let input = syn.clone().tcp_options(&options).bytes();
            let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
            assert_eq!(action, XDP_REDIRECT);
            let expected = ipip4(&syn.tcp_options(&clamped).bytes(), OUTER_V4);
            assert_eq!(out, expected, "{options:?}");
            // The inner TCP checksum was patched right.
            let mut inner = out[..14].to_vec();
            inner.extend_from_slice(&out[34..]);
            assert_checksums_valid(&inner);
        }
        // Without mss_clamp the SYN's MSS stays as it is.
        let mss = |mss| [TcpOptionElement::MaximumSegmentSize(mss)];
        let syn = tcp4(VIP_V4, CPORT).syn().tcp_options(&mss(1460)).bytes();
        let (_, out) = run_xdp(b, &syn, net.lbc).unwrap();
        assert_eq!(out, ipip4(&syn, OUTER_V4));
        // A lower route MTU clamps lower: 1400 - 60.
        set_mtu(net.ns(), "lbb", 1400);
        // (The per-CPU next-hop cache holds the old MTU for up to a second.)
        std::thread::sleep(std::time::Duration::from_millis(1100));
        let syn = tcp4(VIP_CLAMP, CPORT + 1).syn();
        let input = syn.clone().tcp_options(&mss(1460)).bytes();
        let (_, out) = run_xdp(b, &input, net.lbc).unwrap();
        let expected = syn.tcp_options(&mss(1340)).bytes();
        assert_eq!(out, ipip4(&expected, OUTER_V4));
    });
}

#[test]
fn packets_that_no_longer_fit_once_encapsulated_get_the_room_left() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        set_mtu(net.ns(), "lbb", 1400);
        // A client's SYN to the ipip VIP of `ip_len` bytes of IP.
        let big4 = |ip_len| {
            Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 80)
                .syn()
                .ip_len(ip_len)
        };
        // 1380 + 20 fits exactly; one more byte does not.
        let fits = big4(1380).bytes();
        let (action, out) = run_xdp(b, &fits, net.lbc).unwrap();
        assert_eq!((action, out), (XDP_REDIRECT, ipip4(&fits, OUTER_V4)));
        let big = big4(1381).bytes();
        let (action, out) = run_xdp(b, &big, net.lbc).unwrap();
        let too_big = icmp4_from_vip(frag_needed(1380), &big);
        assert_eq!((action, out), (XDP_TX, too_big));
        assert_eq!(reason_count(b, Reason::TxTooBig), 1);
        // Without DF it can be neither fragmented here nor sent whole.
        let no_df = big4(1381).df(false).bytes();
        let (action, _) = run_xdp(b, &no_df, net.lbc).unwrap();
        assert_eq!(action, XDP_DROP);
        assert_eq!(reason_count(b, Reason::DropTooBig), 1);

        // IPv6: "packet too big" with 40 bytes less.
        let big6 = Frame::tcp(CLIENT_V6, VIP_V6, CPORT, 80)
            .syn()
            .ip_len(1361)
            .bytes();
        let (action, out) = run_xdp(b, &big6, net.lbc).unwrap();
        let expected = icmp6_from_vip(Icmpv6Type::PacketTooBig { mtu: 1360 }, &big6);
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

/// A backend's 1400-byte data segment from `vip:80` to the client's
/// `cport` as it left (TTL 63), IP header onward: what routers quote.
fn backend_segment(vip: impl Into<IpAddr>, client: impl Into<IpAddr>, cport: u16) -> Vec<u8> {
    Frame::tcp(vip, client, 80, cport)
        .seq(77)
        .window(4096)
        .ack(1)
        .ttl(63)
        .payload(&[0x42; 1400])
        .ip_packet()
}

/// "Fragmentation needed" from a router to the VIP, quoting the segment
/// the backend sent the client from `VIP_THREE` to port `cport`.
fn frag_needed_to_vip(cport: u16) -> Vec<u8> {
    let quoted = backend_segment(VIP_THREE, CLIENT_V4, cport);
    Frame::icmp(ROUTER_V4, VIP_THREE, frag_needed(1400), &quoted[..20 + 8])
        .ttl(60)
        .bytes()
}

#[test]
fn frag_needed_for_a_dsr_vip_reaches_the_backend_that_owns_the_quoted_flow() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        // Several flows, so that more than one backend owns one.
        let mut owners = Vec::new();
        for cport in 41000..41012u16 {
            let syn = tcp4(VIP_THREE, cport).syn().bytes();
            let (action, out) = run_xdp(b, &syn, net.lbc).unwrap();
            assert_eq!(action, XDP_REDIRECT);
            let ack = tcp4(VIP_THREE, cport).ack(1).bytes();
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
            let syn = tcp4(VIP_THREE, cport).syn().bytes();
            let (_, out) = run_xdp(b, &syn, net.lbc).unwrap();
            assert_eq!(by_icmp, outer_backend(&out), "port {cport}");
        }
    });
}

#[test]
fn packet_too_big_for_an_ipv6_dsr_vip_is_sent_on_encapsulated() {
    with_fixture(&OUTER_V4.to_string(), |b, net| {
        let router = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 9);
        let quoted = backend_segment(VIP_V6, CLIENT_V6, CPORT);
        let too_big = Icmpv6Type::PacketTooBig { mtu: 1280 };
        let icmp = Frame::icmp(router, VIP_V6, too_big, &quoted[..1280 - 48])
            .ttl(60)
            .bytes();
        let (action, out) = run_xdp(b, &icmp, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, ip6ip6(&icmp, 0, 0));
        assert_eq!(reason_count(b, Reason::RedirectIcmpToBackend), 1);
    });
}
