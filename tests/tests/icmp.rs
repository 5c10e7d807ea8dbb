//! ICMP errors about NATed flows (`lb-ebpf/src/icmp_nat.rs`), translated in
//! both directions.
//!
//! Packet level: a flow is established with a normal packet, then an ICMP
//! error quoting one of its packets goes through the loaded program
//! (BPF_PROG_TEST_RUN); the output is compared byte for byte with a frame
//! built by etherparse (whose checksums are computed from scratch) and every
//! checksum in it, the quoted ones included, is checked again. End to end:
//! a client's connected UDP socket learns that the backend refused its
//! datagram.

use std::io::ErrorKind;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use etherparse::{Icmpv4Type, Icmpv6Type, PacketBuilder, icmpv4, icmpv6};
use lb_common::{Reason, csum::checksum};
use lb_tests::{RunningLab, assert_checksums_valid, reason_count, run_xdp, xdp_action::*};
use lb_userspace::{
    balancer::Balancer,
    lab::{
        CLIENT_V4, CLIENT_V6, VIP_V4, VIP_V6, backend_mac, backend_v4, backend_v6, run_in_ns,
        testrun::{CLIENT_MAC, LBB_MAC, LBC_MAC, TestRunNet},
    },
};

const PAYLOAD: &[u8] = b"hello, backend";
const CPORT: u16 = 40000;
/// A router on the client's side of the balancer.
const ROUTER_C4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);
const ROUTER_C6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x1, 0, 0, 0, 0, 0xfe);
/// A router between the balancer and the backends.
const ROUTER_B4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 254);
const ROUTER_B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x2, 0, 0, 0, 0, 0xfe);

fn config() -> String {
    format!(
        r#"
interfaces = ["lbc", "lbb"]

[[service]]
name = "tcp4"
vip = "{VIP_V4}:80"
ring_size = 13
[[service.backend]]
address = "{b4}:8080"

[[service]]
name = "udp4"
vip = "{VIP_V4}:53"
protocol = "udp"
ring_size = 13
[[service.backend]]
address = "{b4}:5353"

[[service]]
name = "tcp6"
vip = "[{VIP_V6}]:80"
ring_size = 13
[[service.backend]]
address = "[{b6}]:8080"

[[service]]
name = "udp6"
vip = "[{VIP_V6}]:53"
protocol = "udp"
ring_size = 13
[[service.backend]]
address = "[{b6}]:5353"
"#,
        b4 = backend_v4(1),
        b6 = backend_v6(1),
    )
}

#[allow(clippy::too_many_arguments)]
/// Runs `body` inside a fresh fixture namespace with the balancer loaded.
fn with_fixture(body: impl FnOnce(&mut Balancer, &TestRunNet) + Send + 'static) {
    lb_tests::with_fixture("icmp", config(), body)
}

fn udp4(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.octets(), dst.octets(), ttl)
        .udp(sport, dport)
        .write(&mut v, PAYLOAD)
        .unwrap();
    v
}

/// A TCP segment with SYN (and ACK when `ack`), carrying `PAYLOAD`.
#[allow(clippy::too_many_arguments)]
fn tcp4(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    sport: u16,
    dport: u16,
    ack: bool,
) -> Vec<u8> {
    let mut v = Vec::new();
    let step = PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.octets(), dst.octets(), ttl)
        .tcp(sport, dport, 0x0102_0304, 8192)
        .syn();
    if ack {
        step.ack(77).write(&mut v, PAYLOAD).unwrap();
    } else {
        step.write(&mut v, PAYLOAD).unwrap();
    }
    v
}

#[allow(clippy::too_many_arguments)]
fn udp6(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hops: u8,
    sport: u16,
    dport: u16,
) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv6(src.octets(), dst.octets(), hops)
        .udp(sport, dport)
        .write(&mut v, PAYLOAD)
        .unwrap();
    v
}

#[allow(clippy::too_many_arguments)]
fn tcp6(
    smac: [u8; 6],
    dmac: [u8; 6],
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hops: u8,
    sport: u16,
    dport: u16,
    ack: bool,
) -> Vec<u8> {
    let mut v = Vec::new();
    let step = PacketBuilder::ethernet2(smac, dmac)
        .ipv6(src.octets(), dst.octets(), hops)
        .tcp(sport, dport, 7, 1000)
        .syn();
    if ack {
        step.ack(77).write(&mut v, PAYLOAD).unwrap();
    } else {
        step.write(&mut v, PAYLOAD).unwrap();
    }
    v
}

/// An ICMPv4 error quoting `quote` (IP header onward).
fn icmp4(
    (smac, dmac): ([u8; 6], [u8; 6]),
    src: Ipv4Addr,
    dst: Ipv4Addr,
    ttl: u8,
    ty: Icmpv4Type,
    quote: &[u8],
) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv4(src.octets(), dst.octets(), ttl)
        .icmpv4(ty)
        .write(&mut v, quote)
        .unwrap();
    v
}

/// An ICMPv6 error quoting `quote` (IP header onward).
fn icmp6(
    (smac, dmac): ([u8; 6], [u8; 6]),
    src: Ipv6Addr,
    dst: Ipv6Addr,
    hops: u8,
    ty: Icmpv6Type,
    quote: &[u8],
) -> Vec<u8> {
    let mut v = Vec::new();
    PacketBuilder::ethernet2(smac, dmac)
        .ipv6(src.octets(), dst.octets(), hops)
        .icmpv6(ty)
        .write(&mut v, quote)
        .unwrap();
    v
}

/// Source and destination MAC of a frame from the client's side to the
/// balancer, and of one from the balancer to the client.
const FROM_CLIENT_SIDE: ([u8; 6], [u8; 6]) = (CLIENT_MAC, LBC_MAC);
const TO_CLIENT: ([u8; 6], [u8; 6]) = (LBC_MAC, CLIENT_MAC);

/// MACs of a frame from the backend's side (backend 1 or a router there) to
/// the balancer.
fn from_backend() -> ([u8; 6], [u8; 6]) {
    (backend_mac(1), LBB_MAC)
}

/// MACs of a frame from the balancer to backend 1.
fn to_backend() -> ([u8; 6], [u8; 6]) {
    (LBB_MAC, backend_mac(1))
}

/// Checks every checksum of an ICMP error frame independently: the outer
/// IPv4 header, the ICMP checksum (ICMPv6: with its pseudo-header), the
/// quoted IPv4 header, and, when the quote holds the whole packet, its
/// TCP/UDP checksum (through `assert_checksums_valid`).
fn assert_icmp_checksums_valid(frame: &[u8]) {
    let v6 = frame[12..14] == [0x86, 0xdd];
    let (icmp, quote_ip_len) = if v6 {
        let ip = &frame[14..54];
        let icmp = &frame[54..];
        let mut pseudo = Vec::new();
        pseudo.extend_from_slice(&ip[8..40]);
        pseudo.extend_from_slice(&(icmp.len() as u32).to_be_bytes());
        pseudo.extend_from_slice(&[0, 0, 0, 58]);
        pseudo.extend_from_slice(icmp);
        assert_eq!(checksum(&pseudo), 0, "ICMPv6 checksum");
        let quote = &icmp[8..];
        (icmp, 40 + u16::from_be_bytes([quote[4], quote[5]]) as usize)
    } else {
        let ihl = (frame[14] & 0x0f) as usize * 4;
        assert_eq!(checksum(&frame[14..14 + ihl]), 0, "outer IPv4 header");
        let icmp = &frame[14 + ihl..];
        assert_eq!(checksum(icmp), 0, "ICMPv4 checksum");
        let quote = &icmp[8..];
        let qihl = (quote[0] & 0x0f) as usize * 4;
        assert_eq!(checksum(&quote[..qihl]), 0, "quoted IPv4 header");
        (icmp, u16::from_be_bytes([quote[2], quote[3]]) as usize)
    };
    let quote = &icmp[8..];
    if quote.len() >= quote_ip_len {
        let mut inner = vec![0u8; 12];
        inner.extend_from_slice(if v6 { &[0x86, 0xdd] } else { &[0x08, 0x00] });
        inner.extend_from_slice(&quote[..quote_ip_len]);
        assert_checksums_valid(&inner);
    }
}

/// Asserts the frame is passed to the kernel byte for byte as it came.
fn assert_passed_untouched(b: &mut Balancer, ingress: u32, frame: &[u8], what: &str) {
    let (action, out) = run_xdp(b, frame, ingress).unwrap();
    assert_eq!(action, XDP_PASS, "{what}: action");
    assert_eq!(out, frame, "{what}: frame changed");
}

/// Runs `input` on `ingress` and asserts it was redirected as `expected`.
fn assert_translated(b: &mut Balancer, ingress: u32, input: &[u8], expected: &[u8], what: &str) {
    let (action, out) = run_xdp(b, input, ingress).unwrap();
    assert_eq!(action, XDP_REDIRECT, "{what}: action");
    assert_eq!(out, expected, "{what}: frame");
    assert_icmp_checksums_valid(&out);
}

#[test]
fn ipv4_errors_about_a_clients_packet_reach_the_client_quoting_the_vip() {
    with_fixture(|b, net| {
        let b1 = backend_v4(1);
        // A UDP flow: the client's datagram NATed to the backend.
        let dgram = udp4(CLIENT_MAC, LBC_MAC, CLIENT_V4, VIP_V4, 64, CPORT, 53);
        let (action, natted) = run_xdp(b, &dgram, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        // The backend's port unreachable, quoting all of it, as Linux does.
        let port = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port);
        let input = icmp4(
            from_backend(),
            b1,
            CLIENT_V4,
            64,
            port.clone(),
            &natted[14..],
        );
        // The client's datagram as it left the balancer, but to the VIP.
        let quote = udp4(CLIENT_MAC, LBC_MAC, CLIENT_V4, VIP_V4, 63, CPORT, 53);
        let expected = icmp4(TO_CLIENT, VIP_V4, CLIENT_V4, 63, port.clone(), &quote[14..]);
        assert_translated(b, net.lbb, &input, &expected, "port unreachable");

        // Without a UDP checksum (0): it stays 0 in the quote.
        let sum = 20 + 6;
        let mut natted0 = natted[14..].to_vec();
        natted0[sum..sum + 2].copy_from_slice(&[0, 0]);
        let mut quote0 = quote[14..].to_vec();
        quote0[sum..sum + 2].copy_from_slice(&[0, 0]);
        let input = icmp4(from_backend(), b1, CLIENT_V4, 64, port.clone(), &natted0);
        let expected = icmp4(TO_CLIENT, VIP_V4, CLIENT_V4, 63, port, &quote0);
        assert_translated(b, net.lbb, &input, &expected, "UDP checksum 0");

        // A TCP handshake (in PENDING): a router between the balancer and
        // the backend reports the SYN's TTL expired, quoting its header and
        // 8 bytes (the TCP checksum is not quoted). Its source stays its own.
        let syn = tcp4(CLIENT_MAC, LBC_MAC, CLIENT_V4, VIP_V4, 64, CPORT, 80, false);
        let (action, natted) = run_xdp(b, &syn, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let ttl = Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit);
        let input = icmp4(
            from_backend(),
            ROUTER_B4,
            CLIENT_V4,
            64,
            ttl.clone(),
            &natted[14..14 + 28],
        );
        let quote = tcp4(CLIENT_MAC, LBC_MAC, CLIENT_V4, VIP_V4, 63, CPORT, 80, false);
        let expected = icmp4(
            TO_CLIENT,
            ROUTER_B4,
            CLIENT_V4,
            63,
            ttl.clone(),
            &quote[14..42],
        );
        assert_translated(b, net.lbb, &input, &expected, "TCP, 8 bytes quoted");
        // The same, quoting the whole segment: its checksum is updated too.
        let input = icmp4(
            from_backend(),
            ROUTER_B4,
            CLIENT_V4,
            64,
            ttl.clone(),
            &natted[14..],
        );
        let expected = icmp4(TO_CLIENT, ROUTER_B4, CLIENT_V4, 63, ttl, &quote[14..]);
        assert_translated(b, net.lbb, &input, &expected, "TCP, all quoted");

        assert_eq!(reason_count(b, Reason::RedirectIcmpToClient), 4);
    });
}

#[test]
fn ipv4_errors_about_a_reply_reach_the_backend_quoting_its_reply() {
    with_fixture(|b, net| {
        let b1 = backend_v4(1);
        let dgram = udp4(CLIENT_MAC, LBC_MAC, CLIENT_V4, VIP_V4, 64, CPORT, 53);
        assert_eq!(run_xdp(b, &dgram, net.lbc).unwrap().0, XDP_REDIRECT);
        // The backend's reply as the balancer sent it on (from the VIP)...
        let reply = udp4(LBC_MAC, CLIENT_MAC, VIP_V4, CLIENT_V4, 63, 53, CPORT);
        // ...is too big for a router on the client's path, which tells the VIP.
        let mtu = Icmpv4Type::DestinationUnreachable(
            icmpv4::DestUnreachableHeader::FragmentationNeeded { next_hop_mtu: 1400 },
        );
        let input = icmp4(
            FROM_CLIENT_SIDE,
            ROUTER_C4,
            VIP_V4,
            64,
            mtu.clone(),
            &reply[14..],
        );
        // The backend gets it, quoting its own reply.
        let quote = udp4(LBB_MAC, CLIENT_MAC, b1, CLIENT_V4, 63, 5353, CPORT);
        let expected = icmp4(to_backend(), ROUTER_C4, b1, 63, mtu.clone(), &quote[14..]);
        assert_translated(b, net.lbc, &input, &expected, "UDP frag needed");

        // TCP during the handshake (PENDING): the SYN-ACK quoted whole.
        let syn = tcp4(CLIENT_MAC, LBC_MAC, CLIENT_V4, VIP_V4, 64, CPORT, 80, false);
        assert_eq!(run_xdp(b, &syn, net.lbc).unwrap().0, XDP_REDIRECT);
        let synack = tcp4(LBC_MAC, CLIENT_MAC, VIP_V4, CLIENT_V4, 63, 80, CPORT, true);
        let input = icmp4(
            FROM_CLIENT_SIDE,
            ROUTER_C4,
            VIP_V4,
            64,
            mtu.clone(),
            &synack[14..],
        );
        let quote = tcp4(LBB_MAC, CLIENT_MAC, b1, CLIENT_V4, 63, 8080, CPORT, true);
        let expected = icmp4(to_backend(), ROUTER_C4, b1, 63, mtu, &quote[14..]);
        assert_translated(b, net.lbc, &input, &expected, "TCP frag needed");

        assert_eq!(reason_count(b, Reason::RedirectIcmpToBackend), 2);
    });
}

#[test]
fn ipv6_errors_are_translated_in_both_directions() {
    with_fixture(|b, net| {
        let b6 = backend_v6(1);
        // Port unreachable from the backend, for a UDP flow.
        let dgram = udp6(CLIENT_MAC, LBC_MAC, CLIENT_V6, VIP_V6, 64, CPORT, 53);
        let (action, natted) = run_xdp(b, &dgram, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let port = Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port);
        let input = icmp6(from_backend(), b6, CLIENT_V6, 64, port, &natted[14..]);
        let quote = udp6(CLIENT_MAC, LBC_MAC, CLIENT_V6, VIP_V6, 63, CPORT, 53);
        let expected = icmp6(TO_CLIENT, VIP_V6, CLIENT_V6, 63, port, &quote[14..]);
        assert_translated(b, net.lbb, &input, &expected, "port unreachable");

        // Hop limit exceeded at a router toward the backend, for a SYN.
        let syn = tcp6(CLIENT_MAC, LBC_MAC, CLIENT_V6, VIP_V6, 64, CPORT, 80, false);
        let (action, natted) = run_xdp(b, &syn, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let hops = Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded);
        let input = icmp6(
            from_backend(),
            ROUTER_B6,
            CLIENT_V6,
            64,
            hops,
            &natted[14..],
        );
        let quote = tcp6(CLIENT_MAC, LBC_MAC, CLIENT_V6, VIP_V6, 63, CPORT, 80, false);
        let expected = icmp6(TO_CLIENT, ROUTER_B6, CLIENT_V6, 63, hops, &quote[14..]);
        assert_translated(b, net.lbb, &input, &expected, "hop limit exceeded");
        assert_eq!(reason_count(b, Reason::RedirectIcmpToClient), 2);

        // Packet too big on the client's path, for a UDP reply and a SYN-ACK.
        let big = Icmpv6Type::PacketTooBig { mtu: 1280 };
        let reply = udp6(LBC_MAC, CLIENT_MAC, VIP_V6, CLIENT_V6, 63, 53, CPORT);
        let input = icmp6(FROM_CLIENT_SIDE, ROUTER_C6, VIP_V6, 64, big, &reply[14..]);
        let quote = udp6(LBB_MAC, CLIENT_MAC, b6, CLIENT_V6, 63, 5353, CPORT);
        let expected = icmp6(to_backend(), ROUTER_C6, b6, 63, big, &quote[14..]);
        assert_translated(b, net.lbc, &input, &expected, "UDP packet too big");
        let synack = tcp6(LBC_MAC, CLIENT_MAC, VIP_V6, CLIENT_V6, 63, 80, CPORT, true);
        let input = icmp6(FROM_CLIENT_SIDE, ROUTER_C6, VIP_V6, 64, big, &synack[14..]);
        let quote = tcp6(LBB_MAC, CLIENT_MAC, b6, CLIENT_V6, 63, 8080, CPORT, true);
        let expected = icmp6(to_backend(), ROUTER_C6, b6, 63, big, &quote[14..]);
        assert_translated(b, net.lbc, &input, &expected, "TCP packet too big");
        assert_eq!(reason_count(b, Reason::RedirectIcmpToBackend), 2);
    });
}

#[test]
fn icmp_that_cannot_be_translated_is_passed_untouched() {
    with_fixture(|b, net| {
        let b1 = backend_v4(1);
        let port = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port);
        let port6 = Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port);

        // No flow: the quoted datagram was never NATed.
        let stray = udp4(CLIENT_MAC, LBB_MAC, CLIENT_V4, b1, 63, CPORT, 5353);
        let no_flow = icmp4(
            from_backend(),
            b1,
            CLIENT_V4,
            64,
            port.clone(),
            &stray[14..],
        );
        assert_passed_untouched(b, net.lbb, &no_flow, "no flow (IPv4)");
        let stray6 = udp6(
            CLIENT_MAC,
            LBB_MAC,
            CLIENT_V6,
            backend_v6(1),
            63,
            CPORT,
            5353,
        );
        let no_flow6 = icmp6(
            from_backend(),
            backend_v6(1),
            CLIENT_V6,
            64,
            port6,
            &stray6[14..],
        );
        assert_passed_untouched(b, net.lbb, &no_flow6, "no flow (IPv6)");

        // Echo requests, to a VIP and to a backend.
        let mut echo = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
            .ipv4(CLIENT_V4.octets(), VIP_V4.octets(), 64)
            .icmpv4_echo_request(1, 1)
            .write(&mut echo, b"ping")
            .unwrap();
        assert_passed_untouched(b, net.lbc, &echo, "echo request");
        let mut echo6 = Vec::new();
        PacketBuilder::ethernet2(CLIENT_MAC, LBC_MAC)
            .ipv6(CLIENT_V6.octets(), VIP_V6.octets(), 64)
            .icmpv6_echo_request(1, 1)
            .write(&mut echo6, b"ping")
            .unwrap();
        assert_passed_untouched(b, net.lbc, &echo6, "echo request (IPv6)");
        assert_eq!(reason_count(b, Reason::PassOtherProto), 4);

        // Now with flows for both families.
        let dgram = udp4(CLIENT_MAC, LBC_MAC, CLIENT_V4, VIP_V4, 64, CPORT, 53);
        let (_, natted) = run_xdp(b, &dgram, net.lbc).unwrap();
        let dgram6 = udp6(CLIENT_MAC, LBC_MAC, CLIENT_V6, VIP_V6, 64, CPORT, 53);
        let (_, natted6) = run_xdp(b, &dgram6, net.lbc).unwrap();
        let q = &natted[14..];
        let q6 = &natted6[14..];

        // An error about ICMP: the echo request's own error.
        let about_icmp = icmp4(from_backend(), b1, CLIENT_V4, 64, port.clone(), &echo[14..]);
        assert_passed_untouched(b, net.lbb, &about_icmp, "error about ICMP");
        // Not sent to the quoted packet's source.
        let elsewhere = icmp4(from_backend(), b1, ROUTER_C4, 64, port.clone(), q);
        assert_passed_untouched(b, net.lbb, &elsewhere, "not to the quoted source");
        // A redirect (type 5) is not an error translated here.
        let redirect = icmp4(
            from_backend(),
            b1,
            CLIENT_V4,
            64,
            Icmpv4Type::Redirect(icmpv4::RedirectHeader {
                code: icmpv4::RedirectCode::RedirectForNetwork,
                gateway_internet_address: [198, 18, 2, 9],
            }),
            q,
        );
        assert_passed_untouched(b, net.lbb, &redirect, "ICMP redirect");
        assert_eq!(reason_count(b, Reason::PassOtherProto), 7);

        // Quotes too short to hold the ports: 4 bytes of UDP, and a
        // quoted IPv4 header cut short.
        let short = icmp4(from_backend(), b1, CLIENT_V4, 64, port.clone(), &q[..24]);
        assert_passed_untouched(b, net.lbb, &short, "4 bytes quoted");
        let short = icmp4(from_backend(), b1, CLIENT_V4, 64, port.clone(), &q[..16]);
        assert_passed_untouched(b, net.lbb, &short, "quoted header cut");
        let short6 = icmp6(
            from_backend(),
            backend_v6(1),
            CLIENT_V6,
            64,
            port6,
            &q6[..44],
        );
        assert_passed_untouched(b, net.lbb, &short6, "4 bytes quoted (IPv6)");
        // A frame cut inside its quote (the IP length says more).
        let whole = icmp4(from_backend(), b1, CLIENT_V4, 64, port.clone(), q);
        for len in 14 + 20 + 8..whole.len() {
            assert_passed_untouched(b, net.lbb, &whole[..len], &format!("cut to {len}"));
        }
        let malformed = 3 + (whole.len() - (14 + 20 + 8)) as u64;
        assert_eq!(reason_count(b, Reason::PassMalformed), malformed);

        // Expiring here: passed (the stack drops it).
        let expiring = icmp4(from_backend(), b1, CLIENT_V4, 1, port.clone(), q);
        assert_passed_untouched(b, net.lbb, &expiring, "TTL 1");
        let expiring6 = icmp6(from_backend(), backend_v6(1), CLIENT_V6, 1, port6, q6);
        assert_passed_untouched(b, net.lbb, &expiring6, "hop limit 1");
        assert_eq!(reason_count(b, Reason::PassTtlExpired), 2);

        // The same error, whole, is translated: the cases above failed for
        // their own reason.
        let (action, _) = run_xdp(b, &whole, net.lbb).unwrap();
        assert_eq!(action, XDP_REDIRECT);
    });
}

/// The backends' closed port the lab's extra services point at.
const CLOSED_PORT: u16 = 5999;
/// The VIP port of those services.
const CLOSED_VIP_PORT: u16 = 54;

#[test]
fn a_refused_udp_datagram_is_reported_to_the_clients_socket() {
    let lab = RunningLab::start_custom("icmpnat", 1, &[1], None, |lab, _| {
        let b = &lab.backends()[0];
        Ok(format!(
            "\n[[service]]\nname = \"closed4\"\nvip = \"{VIP_V4}:{CLOSED_VIP_PORT}\"\nprotocol = \"udp\"\n\
             [[service.backend]]\naddress = \"{}:{CLOSED_PORT}\"\n\n\
             [[service]]\nname = \"closed6\"\nvip = \"[{VIP_V6}]:{CLOSED_VIP_PORT}\"\nprotocol = \"udp\"\n\
             [[service.backend]]\naddress = \"[{}]:{CLOSED_PORT}\"\n",
            b.v4, b.v6
        ))
    })
    .expect("lab");
    let vips: [SocketAddr; 2] = [
        (VIP_V4, CLOSED_VIP_PORT).into(),
        (VIP_V6, CLOSED_VIP_PORT).into(),
    ];
    run_in_ns(lab.lab.client_ns(), move || {
        for vip in vips {
            let bind: SocketAddr = if vip.is_ipv4() {
                (Ipv4Addr::UNSPECIFIED, 0).into()
            } else {
                (Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let sock = UdpSocket::bind(bind).unwrap();
            sock.connect(vip).unwrap();
            sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
            sock.send(b"anyone?").unwrap();
            let mut buf = [0u8; 64];
            let err = sock
                .recv(&mut buf)
                .expect_err("nothing listens behind the VIP");
            // Untranslated, the error would quote the backend's address:
            // no socket would match, and this would time out.
            assert_eq!(err.kind(), ErrorKind::ConnectionRefused, "{vip}: {err}");
        }
    })
    .unwrap();
    let translated = lab
        .metric("lb_xdp_packets_total", "reason=\"redirect_icmp_to_client\"")
        .unwrap();
    assert_eq!(translated, 2, "one port unreachable per family");
    assert_eq!(lab.lab.kernel_forwarded_packets().unwrap(), 0);
}
