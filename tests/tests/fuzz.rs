//! Mutation fuzzing of `lb_xdp` with BPF_PROG_TEST_RUN: frames of every
//! kind the data plane forwards (NAT both ways, IPIP, IP6IP6, L2, MSS
//! clamping, ICMP errors translated and routed, echo, packets too big, TTL
//! expiring), each mutated thousands of times from a fixed seed. Whatever
//! the program sends on must be a whole, well-formed packet made from a
//! well-formed one (`lb_tests::fuzz::check_forwarded`); whatever it passes
//! to the stack must be untouched or be such a packet; nothing aborts.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use etherparse::{Icmpv4Type, Icmpv6Type, TcpOptionElement, icmpv4};
use lb_common::Reason;
use lb_tests::{
    frames::{CPORT, Frame, frag_needed},
    fuzz::{Failures, Rng, check_forwarded, mutate},
    run_xdp, set_mtu,
    xdp_action::*,
};
use lb_userspace::lab::{CLIENT_V4, CLIENT_V6, VIP_V4, VIP_V6, backend_v4, backend_v6};

/// The `ipip` VIP.
const VIP_IPIP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
/// The `l2` VIP.
const VIP_L2: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 3);
/// The `ipip` VIP with `mss_clamp`.
const VIP_CLAMP: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 4);
/// A NAT VIP whose backend is no neighbour (passed NATed to the stack).
const VIP_FAR: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 5);
const FAR_BACKEND: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 99);
/// A router on the client's side.
const ROUTER_C4: Ipv4Addr = Ipv4Addr::new(198, 18, 1, 254);
const ROUTER_C6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x18, 0x1, 0, 0, 0, 0, 0xfe);
/// The link toward the backends is smaller than a full frame.
const BACKEND_MTU: u16 = 1400;
/// Mutations per base frame (`LB_FUZZ_MUTATIONS` overrides it, and
/// `LB_FUZZ_SEED` the seed, to search further by hand).
const MUTATIONS: usize = 4000;
const SEED: u64 = 0x6c62_5f78_6470;

fn knob(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn config() -> String {
    let nat = lb_tests::nat_services_config();
    format!(
        r#"encap_source_v4 = "198.18.2.1"
encap_source_v6 = "fd00:18:2::1"
{nat}
[[service]]
name = "l7"
vip = "{VIP_V4}:443"
mode = "l7"

[[service]]
name = "ipip4"
vip = "{VIP_IPIP}:80"
forwarding = "ipip"
ring_size = 13
[[service.backend]]
address = "{b4}:80"

[[service]]
name = "ipip6"
vip = "[{VIP_V6}]:81"
forwarding = "ipip"
ring_size = 13
[[service.backend]]
address = "[{b6}]:81"

[[service]]
name = "l2"
vip = "{VIP_L2}:80"
forwarding = "l2"
ring_size = 13
[[service.backend]]
address = "{b4}:80"

[[service]]
name = "l2-udp"
vip = "{VIP_L2}:53"
protocol = "udp"
forwarding = "l2"
ring_size = 13
[[service.backend]]
address = "{b4}:53"

[[service]]
name = "clamp"
vip = "{VIP_CLAMP}:80"
forwarding = "ipip"
mss_clamp = true
ring_size = 13
[[service.backend]]
address = "{b4}:80"

[[service]]
name = "far"
vip = "{VIP_FAR}:80"
ring_size = 13
[[service.backend]]
address = "{FAR_BACKEND}:8080"
"#,
        b4 = backend_v4(1),
        b6 = backend_v6(1),
    )
}

/// Client `src`'s TCP segments to `dst:port`: a SYN, then an ACK with data
/// (which confirms a NAT flow the SYN left in PENDING).
fn handshake(src: IpAddr, dst: IpAddr, port: u16) -> [Frame; 2] {
    let syn = Frame::tcp(src, dst, CPORT, port).syn();
    let ack = Frame::tcp(src, dst, CPORT, port).ack(1).seq(1);
    [syn, ack]
}

/// The base frames, in an order that sets up the flows later ones belong
/// to, with the interface each arrives on (`true`: the client's side).
fn bases() -> Vec<(&'static str, bool, Vec<u8>)> {
    let (c4, c6) = (IpAddr::V4(CLIENT_V4), IpAddr::V6(CLIENT_V6));
    let (b4, b6) = (backend_v4(1), backend_v6(1));
    let mut out: Vec<(&'static str, bool, Vec<u8>)> = Vec::new();
    let mut client = |what, f: Frame| out.push((what, true, f.bytes()));
    let [syn, ack] = handshake(c4, VIP_V4.into(), 80);
    client("nat4 syn", syn);
    client("nat4 ack", ack);
    let [syn, ack] = handshake(c6, VIP_V6.into(), 80);
    client("nat6 syn", syn);
    client("nat6 ack", ack);
    client("nat4 udp", Frame::udp(c4, VIP_V4, CPORT, 53));
    client("nat6 udp", Frame::udp(c6, VIP_V6, CPORT, 53));
    let big = vec![0x5a; usize::from(BACKEND_MTU) - 40];
    client(
        "nat4 too big",
        Frame::tcp(c4, VIP_V4, CPORT, 80).ack(1).payload(&big),
    );
    client(
        "nat4 ttl 1",
        Frame::tcp(c4, VIP_V4, CPORT, 80).ack(1).ttl(1),
    );
    client("far", Frame::tcp(c4, VIP_FAR, CPORT, 80).syn());
    client("l7 syn", Frame::tcp(c4, VIP_V4, CPORT, 443).syn());
    let echo = etherparse::IcmpEchoHeader { id: 7, seq: 1 };
    client(
        "echo4",
        Frame::icmp(c4, VIP_V4, Icmpv4Type::EchoRequest(echo), b"ping"),
    );
    client(
        "echo6",
        Frame::icmp(c6, VIP_V6, Icmpv6Type::EchoRequest(echo), b"ping"),
    );
    let [syn, ack] = handshake(c4, VIP_IPIP.into(), 80);
    client("ipip4 syn", syn.tos(0xb9));
    client("ipip4 ack", ack);
    let [syn, _] = handshake(c6, VIP_V6.into(), 81);
    client("ipip6 syn", syn);
    client(
        "ipip4 too big",
        Frame::tcp(c4, VIP_IPIP, CPORT, 80).ack(1).payload(&big),
    );
    let [syn, ack] = handshake(c4, VIP_L2.into(), 80);
    client("l2 syn", syn);
    client("l2 ack", ack);
    client("l2 udp", Frame::udp(c4, VIP_L2, CPORT, 53));
    let mss = [TcpOptionElement::MaximumSegmentSize(1460)];
    client(
        "clamp syn",
        Frame::tcp(c4, VIP_CLAMP, CPORT, 80).syn().tcp_options(&mss),
    );
    // Routers on the client's path about replies that left from a VIP.
    let reply = Frame::udp(VIP_V4, CLIENT_V4, 53, CPORT).ttl(63).ip_packet();
    client(
        "frag needed nat",
        Frame::icmp(ROUTER_C4, VIP_V4, frag_needed(1300), &reply),
    );
    let reply = Frame::tcp(VIP_IPIP, CLIENT_V4, 80, CPORT)
        .ack(9)
        .ip_packet();
    client(
        "frag needed ipip",
        Frame::icmp(ROUTER_C4, VIP_IPIP, frag_needed(1300), &reply),
    );
    let reply = Frame::udp(VIP_V6, CLIENT_V6, 53, CPORT).ttl(63).ip_packet();
    let big6 = Icmpv6Type::PacketTooBig { mtu: 1280 };
    client("too big nat6", Frame::icmp(ROUTER_C6, VIP_V6, big6, &reply));
    let mut backend = |what, f: Frame| out.push((what, false, f.from_backend(1).bytes()));
    backend("reply4 tcp", Frame::tcp(b4, c4, 8080, CPORT).ack(2).seq(5));
    backend("reply6 tcp", Frame::tcp(b6, c6, 8080, CPORT).ack(2).seq(5));
    backend("reply4 udp", Frame::udp(b4, c4, 5353, CPORT));
    backend("reply6 udp", Frame::udp(b6, c6, 5353, CPORT));
    let sent = Frame::udp(c4, b4, CPORT, 5353).ttl(63).ip_packet();
    let port = Icmpv4Type::DestinationUnreachable(icmpv4::DestUnreachableHeader::Port);
    backend("unreachable4", Frame::icmp(b4, c4, port, &sent));
    out
}

#[test]
fn mutated_frames_are_sent_on_whole_or_not_at_all() {
    lb_tests::with_fixture("fuzz", config(), |b, net| {
        set_mtu(net.ns(), "lbb", BACKEND_MTU);
        let mut rng = Rng::new(knob("LB_FUZZ_SEED", SEED));
        let mutations = knob("LB_FUZZ_MUTATIONS", MUTATIONS as u64) as usize;
        let mut failures = Failures::default();
        let mut sent = 0usize;
        for (what, client_side, base) in bases() {
            let ingress = if client_side { net.lbc } else { net.lbb };
            // The base itself first: it sets up flows, and the checker must
            // accept what a correct program sends.
            let cases = std::iter::once(base.clone())
                .chain((0..mutations).map(|_| mutate(&mut rng, &base)));
            for (n, input) in cases.enumerate() {
                let (action, output) = run_xdp(b, &input, ingress).expect("test run");
                let verdict = match action {
                    XDP_DROP => Ok(()),
                    XDP_PASS if output == input => Ok(()),
                    XDP_PASS | XDP_TX | XDP_REDIRECT => {
                        sent += usize::from(action != XDP_PASS);
                        check_forwarded(&input, &output)
                    }
                    other => Err(format!("action {other}")),
                };
                failures.record(
                    &format!("{what} #{n} (action {action})"),
                    verdict,
                    &input,
                    &output,
                );
            }
        }
        failures.assert_none();
        let runs = failures.runs();
        // Not vacuous: every way of sending a packet on was taken by mutants.
        let counters = b.dataplane().counters().expect("counters");
        for reason in [
            Reason::RedirectForward,
            Reason::RedirectReply,
            Reason::PassNoNeighbour,
            Reason::TxTimeExceeded,
            Reason::TxTooBig,
            Reason::RedirectIcmpToClient,
            Reason::RedirectIcmpToBackend,
            Reason::TxEchoReply,
        ] {
            let n = counters.reason(reason).packets;
            assert!(n > 100, "{reason:?}: {n} packets");
        }
        assert!(
            sent > runs / 10,
            "only {sent} of {runs} frames were sent on"
        );
    });
}
