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
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::time::Duration;

use etherparse::{IcmpEchoHeader, Icmpv4Type, Icmpv6Type, icmpv4, icmpv6};
use lb_common::{Reason, csum::checksum};
use lb_tests::{
    RunningLab, assert_checksums_valid,
    frames::{CPORT, Frame, Transport, fix_ipv4_checksum, frag_needed},
    reason_count, run_xdp,
    xdp_action::*,
};
use lb_userspace::{
    balancer::Balancer,
    lab::{
        CLIENT_MAC, CLIENT_V4, CLIENT_V6, VIP_V4, VIP_V6, backend_v4, backend_v6, run_in_ns,
        testrun::TestRunNet,
    },
};

/// A router on the client's side of the balancer.
const ROUTER_C4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);
const ROUTER_C6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x1, 0, 0, 0, 0, 0xfe);
/// A router between the balancer and the backends.
const ROUTER_B4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 254);
const ROUTER_B6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x2, 0, 0, 0, 0, 0xfe);

/// Runs `body` inside a fresh fixture namespace with the balancer loaded.
fn with_fixture(body: impl FnOnce(&mut Balancer, &TestRunNet) + Send + 'static) {
    lb_tests::with_fixture("icmp", lb_tests::nat_services_config(), body)
}

/// An ICMP error from `src` to `dst` quoting `quote`, as it comes in from
/// backend 1's side.
fn from_backend_side(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    ty: impl Into<Transport>,
    quote: &[u8],
) -> Vec<u8> {
    Frame::icmp(src, dst, ty, quote).from_backend(1).bytes()
}

/// An ICMP error as it comes in from the client's side.
fn from_client_side(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    ty: impl Into<Transport>,
    quote: &[u8],
) -> Vec<u8> {
    Frame::icmp(src, dst, ty, quote).bytes()
}

/// An ICMP error as the balancer forwards it to the client.
fn to_client(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    ty: impl Into<Transport>,
    quote: &[u8],
) -> Vec<u8> {
    Frame::icmp(src, dst, ty, quote).to_client().ttl(63).bytes()
}

/// An ICMP error as the balancer forwards it to backend 1.
fn to_backend(
    src: impl Into<IpAddr>,
    dst: impl Into<IpAddr>,
    ty: impl Into<Transport>,
    quote: &[u8],
) -> Vec<u8> {
    Frame::icmp(src, dst, ty, quote)
        .to_backend(1)
        .ttl(63)
        .bytes()
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
        let dgram = Frame::udp(CLIENT_V4, VIP_V4, CPORT, 53).bytes();
        let (action, natted) = run_xdp(b, &dgram, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        // The backend's port unreachable, quoting all of it, as Linux does.
        let port = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port);
        let input = from_backend_side(b1, CLIENT_V4, port.clone(), &natted[14..]);
        // The client's datagram as it left the balancer, but to the VIP.
        let quote = Frame::udp(CLIENT_V4, VIP_V4, CPORT, 53).ttl(63).ip_packet();
        let expected = to_client(VIP_V4, CLIENT_V4, port.clone(), &quote);
        assert_translated(b, net.lbb, &input, &expected, "port unreachable");

        // Without a UDP checksum (0): it stays 0 in the quote.
        let sum = 20 + 6;
        let mut natted0 = natted[14..].to_vec();
        natted0[sum..sum + 2].copy_from_slice(&[0, 0]);
        let mut quote0 = quote;
        quote0[sum..sum + 2].copy_from_slice(&[0, 0]);
        let input = from_backend_side(b1, CLIENT_V4, port.clone(), &natted0);
        let expected = to_client(VIP_V4, CLIENT_V4, port, &quote0);
        assert_translated(b, net.lbb, &input, &expected, "UDP checksum 0");

        // A TCP handshake (in PENDING): a router between the balancer and
        // the backend reports the SYN's TTL expired, quoting its header and
        // 8 bytes (the TCP checksum is not quoted). Its source stays its own.
        let syn = Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 80).syn();
        let (action, natted) = run_xdp(b, &syn.bytes(), net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let ttl = Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit);
        let input = from_backend_side(ROUTER_B4, CLIENT_V4, ttl.clone(), &natted[14..14 + 28]);
        let quote = syn.ttl(63).ip_packet();
        let expected = to_client(ROUTER_B4, CLIENT_V4, ttl.clone(), &quote[..28]);
        assert_translated(b, net.lbb, &input, &expected, "TCP, 8 bytes quoted");
        // The same, quoting the whole segment: its checksum is updated too.
        let input = from_backend_side(ROUTER_B4, CLIENT_V4, ttl.clone(), &natted[14..]);
        let expected = to_client(ROUTER_B4, CLIENT_V4, ttl, &quote);
        assert_translated(b, net.lbb, &input, &expected, "TCP, all quoted");

        assert_eq!(reason_count(b, Reason::RedirectIcmpToClient), 4);
    });
}

/// A SYN-ACK from `src:sport` to the client's port as it left the
/// balancer or backend 1 (TTL 63), IP header onward: what an error quotes.
fn synack(src: impl Into<IpAddr>, client: impl Into<IpAddr>, sport: u16) -> Vec<u8> {
    Frame::tcp(src, client, sport, CPORT)
        .syn()
        .ack(77)
        .ttl(63)
        .ip_packet()
}

#[test]
fn ipv4_errors_about_a_reply_reach_the_backend_quoting_its_reply() {
    with_fixture(|b, net| {
        let b1 = backend_v4(1);
        let dgram = Frame::udp(CLIENT_V4, VIP_V4, CPORT, 53).bytes();
        assert_eq!(run_xdp(b, &dgram, net.lbc).unwrap().0, XDP_REDIRECT);
        // The backend's reply as the balancer sent it on (from the VIP)...
        let reply = Frame::udp(VIP_V4, CLIENT_V4, 53, CPORT).ttl(63).ip_packet();
        // ...is too big for a router on the client's path, which tells the VIP.
        let mtu = frag_needed(1400);
        let input = from_client_side(ROUTER_C4, VIP_V4, mtu.clone(), &reply);
        // The backend gets it, quoting its own reply.
        let quote = Frame::udp(b1, CLIENT_V4, 5353, CPORT).ttl(63).ip_packet();
        let expected = to_backend(ROUTER_C4, b1, mtu.clone(), &quote);
        assert_translated(b, net.lbc, &input, &expected, "UDP frag needed");

        // TCP during the handshake (PENDING): the SYN-ACK quoted whole.
        let syn = Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 80).syn().bytes();
        assert_eq!(run_xdp(b, &syn, net.lbc).unwrap().0, XDP_REDIRECT);
        let synack_vip = synack(VIP_V4, CLIENT_V4, 80);
        let input = from_client_side(ROUTER_C4, VIP_V4, mtu.clone(), &synack_vip);
        let quote = synack(b1, CLIENT_V4, 8080);
        let expected = to_backend(ROUTER_C4, b1, mtu, &quote);
        assert_translated(b, net.lbc, &input, &expected, "TCP frag needed");

        assert_eq!(reason_count(b, Reason::RedirectIcmpToBackend), 2);
    });
}

#[test]
fn ipv6_errors_are_translated_in_both_directions() {
    with_fixture(|b, net| {
        let b6 = backend_v6(1);
        // Port unreachable from the backend, for a UDP flow.
        let dgram = Frame::udp(CLIENT_V6, VIP_V6, CPORT, 53).bytes();
        let (action, natted) = run_xdp(b, &dgram, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let port = Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port);
        let input = from_backend_side(b6, CLIENT_V6, port, &natted[14..]);
        let quote = Frame::udp(CLIENT_V6, VIP_V6, CPORT, 53).ttl(63).ip_packet();
        let expected = to_client(VIP_V6, CLIENT_V6, port, &quote);
        assert_translated(b, net.lbb, &input, &expected, "port unreachable");

        // Hop limit exceeded at a router toward the backend, for a SYN.
        let syn = Frame::tcp(CLIENT_V6, VIP_V6, CPORT, 80).syn();
        let (action, natted) = run_xdp(b, &syn.bytes(), net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let hops = Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded);
        let input = from_backend_side(ROUTER_B6, CLIENT_V6, hops, &natted[14..]);
        let quote = syn.ttl(63).ip_packet();
        let expected = to_client(ROUTER_B6, CLIENT_V6, hops, &quote);
        assert_translated(b, net.lbb, &input, &expected, "hop limit exceeded");
        assert_eq!(reason_count(b, Reason::RedirectIcmpToClient), 2);

        // Packet too big on the client's path, for a UDP reply and a SYN-ACK.
        let big = Icmpv6Type::PacketTooBig { mtu: 1280 };
        let reply = Frame::udp(VIP_V6, CLIENT_V6, 53, CPORT).ttl(63).ip_packet();
        let input = from_client_side(ROUTER_C6, VIP_V6, big, &reply);
        let quote = Frame::udp(b6, CLIENT_V6, 5353, CPORT).ttl(63).ip_packet();
        let expected = to_backend(ROUTER_C6, b6, big, &quote);
        assert_translated(b, net.lbc, &input, &expected, "UDP packet too big");
        let input = from_client_side(ROUTER_C6, VIP_V6, big, &synack(VIP_V6, CLIENT_V6, 80));
        let expected = to_backend(ROUTER_C6, b6, big, &synack(b6, CLIENT_V6, 8080));
        assert_translated(b, net.lbc, &input, &expected, "TCP packet too big");
        assert_eq!(reason_count(b, Reason::RedirectIcmpToBackend), 2);
    });
}

#[test]
fn icmp_that_cannot_be_translated_is_passed_untouched() {
    with_fixture(|b, net| {
        let b1 = backend_v4(1);
        let b6 = backend_v6(1);
        let port = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port);
        let port6 = Icmpv6Type::DestinationUnreachable(icmpv6::DestUnreachableCode::Port);

        // No flow: the quoted datagram was never NATed.
        let stray = Frame::udp(CLIENT_V4, b1, CPORT, 5353).ttl(63).ip_packet();
        let no_flow = from_backend_side(b1, CLIENT_V4, port.clone(), &stray);
        assert_passed_untouched(b, net.lbb, &no_flow, "no flow (IPv4)");
        let stray6 = Frame::udp(CLIENT_V6, b6, CPORT, 5353).ttl(63).ip_packet();
        let no_flow6 = from_backend_side(b6, CLIENT_V6, port6, &stray6);
        assert_passed_untouched(b, net.lbb, &no_flow6, "no flow (IPv6)");

        // Echo requests to a backend (answered only for a VIP: see below).
        let echo = Frame::echo_request(CLIENT_V4, b1).bytes();
        assert_passed_untouched(b, net.lbc, &echo, "echo request");
        let echo6 = Frame::echo_request(CLIENT_V6, b6).bytes();
        assert_passed_untouched(b, net.lbc, &echo6, "echo request (IPv6)");
        assert_eq!(reason_count(b, Reason::PassOtherProto), 4);

        // Now with flows for both families.
        let dgram = Frame::udp(CLIENT_V4, VIP_V4, CPORT, 53).bytes();
        let (_, natted) = run_xdp(b, &dgram, net.lbc).unwrap();
        let dgram6 = Frame::udp(CLIENT_V6, VIP_V6, CPORT, 53).bytes();
        let (_, natted6) = run_xdp(b, &dgram6, net.lbc).unwrap();
        let q = &natted[14..];
        let q6 = &natted6[14..];

        // An error about ICMP: the echo request's own error.
        let about_icmp = from_backend_side(b1, CLIENT_V4, port.clone(), &echo[14..]);
        assert_passed_untouched(b, net.lbb, &about_icmp, "error about ICMP");
        // Not sent to the quoted packet's source.
        let elsewhere = from_backend_side(b1, ROUTER_C4, port.clone(), q);
        assert_passed_untouched(b, net.lbb, &elsewhere, "not to the quoted source");
        // A redirect (type 5) is not an error translated here.
        let redirect = Icmpv4Type::Redirect(icmpv4::RedirectHeader {
            code: icmpv4::RedirectCode::RedirectForNetwork,
            gateway_internet_address: [198, 18, 2, 9],
        });
        let redirect = from_backend_side(b1, CLIENT_V4, redirect, q);
        assert_passed_untouched(b, net.lbb, &redirect, "ICMP redirect");
        assert_eq!(reason_count(b, Reason::PassOtherProto), 7);

        // Quotes too short to hold the ports: 4 bytes of UDP, and a
        // quoted IPv4 header cut short.
        let short = from_backend_side(b1, CLIENT_V4, port.clone(), &q[..24]);
        assert_passed_untouched(b, net.lbb, &short, "4 bytes quoted");
        let short = from_backend_side(b1, CLIENT_V4, port.clone(), &q[..16]);
        assert_passed_untouched(b, net.lbb, &short, "quoted header cut");
        let short6 = from_backend_side(b6, CLIENT_V6, port6, &q6[..44]);
        assert_passed_untouched(b, net.lbb, &short6, "4 bytes quoted (IPv6)");
        // A frame cut inside its quote (the IP length says more).
        let whole = from_backend_side(b1, CLIENT_V4, port.clone(), q);
        for len in 14 + 20 + 8..whole.len() {
            assert_passed_untouched(b, net.lbb, &whole[..len], &format!("cut to {len}"));
        }
        let malformed = 3 + (whole.len() - (14 + 20 + 8)) as u64;
        assert_eq!(reason_count(b, Reason::PassMalformed), malformed);

        // Expiring here: passed (the stack drops it).
        let expiring = Frame::icmp(b1, CLIENT_V4, port, q).from_backend(1).ttl(1);
        assert_passed_untouched(b, net.lbb, &expiring.bytes(), "TTL 1");
        let expiring6 = Frame::icmp(b6, CLIENT_V6, port6, q6).from_backend(1).ttl(1);
        assert_passed_untouched(b, net.lbb, &expiring6.bytes(), "hop limit 1");
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

/// A second `l4` VIP address, which an `l7` service shares (so the stack
/// has it too), and the address of an `l7` VIP alone.
const VIP2_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
const L7_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 3);

/// The echo reply `from` sends `to` for `Frame::echo_request(to, from)`,
/// built by etherparse (checksums computed from scratch).
fn echo_reply(from: IpAddr, to: IpAddr) -> Vec<u8> {
    let echo = IcmpEchoHeader { id: 1, seq: 1 };
    let reply = match from {
        IpAddr::V4(_) => Frame::icmp(from, to, Icmpv4Type::EchoReply(echo), b"ping"),
        IpAddr::V6(_) => Frame::icmp(from, to, Icmpv6Type::EchoReply(echo), b"ping"),
    };
    reply.to_client().bytes()
}

/// `nat_services_config` (VIP_V4 and VIP_V6 with l4 services only), VIP2_V4
/// with an `l2` service and an `l7` one, L7_V4 with an `l7` service.
fn vip_addresses_config() -> String {
    let extra = format!(
        r#"
[[service]]
name = "second"
vip = "{VIP2_V4}:80"
forwarding = "l2"
[[service.backend]]
address = "{b}:80"

[[service]]
name = "second-l7"
vip = "{VIP2_V4}:443"
mode = "l7"

[[service]]
name = "web-l7"
vip = "{L7_V4}:443"
mode = "l7"
"#,
        b = backend_v4(2),
    );
    lb_tests::nat_services_config() + &extra
}

/// Frames to `dst` that no service or flow takes: another TCP port, another
/// UDP port, a fragment, GRE, a timestamp request, an echo request with IPv4
/// options, one of code 1, an echo reply.
fn unserved(dst: Ipv4Addr) -> Vec<(&'static str, Vec<u8>)> {
    let mut fragment = Frame::udp(CLIENT_V4, dst, CPORT, 53).bytes();
    fragment[14 + 6] |= 0x20; // more fragments
    fix_ipv4_checksum(&mut fragment[14..34]);
    let mut gre = Frame::udp(CLIENT_V4, dst, CPORT, 53).bytes();
    gre[14 + 9] = 47;
    fix_ipv4_checksum(&mut gre[14..34]);
    let timestamp = Icmpv4Type::Unknown {
        type_u8: 13,
        code_u8: 0,
        bytes5to8: [0, 1, 0, 1],
    };
    let mut code = Frame::echo_request(CLIENT_V4, dst).bytes();
    code[14 + 20 + 1] = 1;
    vec![
        (
            "TCP, another port",
            Frame::tcp(CLIENT_V4, dst, CPORT, 81).syn().bytes(),
        ),
        (
            "UDP, another port",
            Frame::udp(CLIENT_V4, dst, CPORT, 54).bytes(),
        ),
        ("a fragment", fragment),
        ("GRE", gre),
        (
            "timestamp request",
            Frame::icmp(CLIENT_V4, dst, timestamp, &[0; 12]).bytes(),
        ),
        (
            "echo with IPv4 options",
            Frame::echo_request(CLIENT_V4, dst)
                .ip_options(&[1, 1, 1, 0])
                .bytes(),
        ),
        ("echo of code 1", code),
        ("echo reply", echo_reply(CLIENT_V4.into(), dst.into())),
    ]
}

#[test]
fn echo_requests_to_an_l4_vip_are_answered_from_it() {
    lb_tests::with_fixture("echo", vip_addresses_config(), |b, net| {
        // To each l4 VIP address (a DSR one too), whatever its services'
        // ports: the request turned around, TTL 64, on the link it came in.
        let asked: [(IpAddr, IpAddr); 3] = [
            (CLIENT_V4.into(), VIP_V4.into()),
            (CLIENT_V4.into(), VIP2_V4.into()),
            (CLIENT_V6.into(), VIP_V6.into()),
        ];
        for (client, vip) in asked {
            let request = Frame::echo_request(client, vip).ttl(9).bytes();
            let (action, out) = run_xdp(b, &request, net.lbc).unwrap();
            assert_eq!(action, XDP_TX, "{vip}: action");
            assert_eq!(out, echo_reply(vip, client), "{vip}: the reply");
        }
        assert_eq!(reason_count(b, Reason::TxEchoReply), 3);

        // Left to the stack, untouched: an l7 VIP's address (the stack's
        // own, it answers), and every cut of a request.
        let l7 = Frame::echo_request(CLIENT_V4, L7_V4).bytes();
        assert_passed_untouched(b, net.lbc, &l7, "l7 VIP");
        for request in [
            Frame::echo_request(CLIENT_V4, VIP_V4).bytes(),
            Frame::echo_request(CLIENT_V6, VIP_V6).bytes(),
        ] {
            for len in 14..request.len() {
                let (action, out) = run_xdp(b, &request[..len], net.lbc).unwrap();
                assert_eq!(action, XDP_PASS, "cut to {len}");
                assert_eq!(out, &request[..len], "cut to {len}");
            }
        }
        assert_eq!(reason_count(b, Reason::TxEchoReply), 3);

        // Refused: a source no client has (loopback, multicast, a VIP's own
        // address), another host's MAC, a corrupt IPv4 header.
        for (src, reason) in [
            (Ipv4Addr::LOCALHOST, Reason::DropMartianSource),
            (Ipv4Addr::new(224, 0, 0, 1), Reason::DropMartianSource),
            (VIP2_V4, Reason::DropSpoofedSource),
        ] {
            let before = reason_count(b, reason);
            let request = Frame::echo_request(src, VIP_V4).bytes();
            assert_eq!(
                run_xdp(b, &request, net.lbc).unwrap().0,
                XDP_DROP,
                "from {src}"
            );
            assert_eq!(reason_count(b, reason), before + 1, "from {src}");
        }
        let multicast6 = Frame::echo_request(Ipv6Addr::new(0xff02, 0, 0, 0, 0, 0, 0, 1), VIP_V6);
        assert_eq!(
            run_xdp(b, &multicast6.bytes(), net.lbc).unwrap().0,
            XDP_DROP
        );
        let elsewhere = Frame::echo_request(CLIENT_V4, VIP_V4).macs(CLIENT_MAC, [2, 0, 0, 0, 0, 9]);
        assert_eq!(run_xdp(b, &elsewhere.bytes(), net.lbc).unwrap().0, XDP_DROP);
        assert_eq!(reason_count(b, Reason::DropOtherHost), 1);
        let mut corrupt = Frame::echo_request(CLIENT_V4, VIP_V4).bytes();
        corrupt[14 + 10] ^= 0xff;
        assert_eq!(run_xdp(b, &corrupt, net.lbc).unwrap().0, XDP_DROP);
        assert_eq!(reason_count(b, Reason::DropBadIpChecksum), 1);
        assert_eq!(reason_count(b, Reason::TxEchoReply), 3);

        // Nor may a new flow come from another VIP's address.
        let spoofed = Frame::tcp(VIP2_V4, VIP_V4, CPORT, 80).syn().bytes();
        let before = reason_count(b, Reason::DropSpoofedSource);
        assert_eq!(run_xdp(b, &spoofed, net.lbc).unwrap().0, XDP_DROP);
        assert_eq!(reason_count(b, Reason::DropSpoofedSource), before + 1);
    });
}

#[test]
fn what_no_service_takes_on_an_l4_vips_address_is_dropped_not_routed_back() {
    lb_tests::with_fixture("unserved", vip_addresses_config(), |b, net| {
        // The stack does not have VIP_V4: it would route all this back out.
        let mut dropped = 0;
        for (what, frame) in unserved(VIP_V4) {
            let (action, _) = run_xdp(b, &frame, net.lbc).unwrap();
            assert_eq!(action, XDP_DROP, "{what}");
            dropped += 1;
        }
        let v6 = Frame::tcp(CLIENT_V6, VIP_V6, CPORT, 81).syn().bytes();
        assert_eq!(
            run_xdp(b, &v6, net.lbc).unwrap().0,
            XDP_DROP,
            "IPv6, another port"
        );
        dropped += 1;
        // An ICMP error to the VIP that quotes no flow of it.
        let port = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port);
        let stray = Frame::udp(VIP_V4, ROUTER_C4, 53, CPORT).ttl(63).ip_packet();
        let error = from_client_side(ROUTER_C4, VIP_V4, port, &stray);
        assert_eq!(
            run_xdp(b, &error, net.lbc).unwrap().0,
            XDP_DROP,
            "stray ICMP error"
        );
        dropped += 1;
        assert_eq!(reason_count(b, Reason::DropVipUnserved), dropped);

        // Neighbour discovery stays the stack's, whatever it is sent to.
        let solicit = Icmpv6Type::Unknown {
            type_u8: 135,
            code_u8: 0,
            bytes5to8: [0; 4],
        };
        let ns = Frame::icmp(CLIENT_V6, VIP_V6, solicit, &VIP_V6.octets()).ttl(255);
        assert_passed_untouched(b, net.lbc, &ns.bytes(), "neighbour solicitation");
        // An address the stack has (an l7 service shares it, or has it
        // alone), and one that is no VIP's: passed untouched, as before.
        for dst in [VIP2_V4, L7_V4, backend_v4(1)] {
            for (what, frame) in unserved(dst) {
                assert_passed_untouched(b, net.lbc, &frame, &format!("{what} to {dst}"));
            }
        }
        assert_eq!(reason_count(b, Reason::DropVipUnserved), dropped);
        // What the services take still goes through.
        let syn = Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 80).syn().bytes();
        assert_eq!(run_xdp(b, &syn, net.lbc).unwrap().0, XDP_REDIRECT);
    });
}
