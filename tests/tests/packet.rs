//! Packet-level tests: crafted frames through the loaded XDP program with
//! BPF_PROG_TEST_RUN, compared byte for byte with frames built independently by
//! etherparse (whose checksums are computed from scratch).

use std::net::{Ipv4Addr, Ipv6Addr};

use etherparse::{Icmpv4Type, Icmpv6Type, icmpv4, icmpv6};
use lb_common::{
    FLOW_CACHE_PERIOD_SHIFT, FlowKey, Reason, UDP_IDLE_UNITS, flow_time,
    hash::{flow_hash, source_hash},
};
use lb_tests::{
    assert_checksums_valid, assert_hit_path_forwards_alike,
    frames::{
        CPORT, Frame, PAYLOAD, fix_ipv4_checksum, frag_needed, icmp4_from_vip, icmp6_from_vip,
    },
    reason_count, run_xdp, set_mtu, wait_for,
    xdp_action::*,
};
use lb_userspace::{
    balancer::{Availability, Balancer},
    config::Protocol,
    dataplane::ip_to_addr,
    lab::{
        CLIENT_V4, CLIENT_V6, VIP_V4, VIP_V6, backend_mac, backend_v4, backend_v6,
        testrun::{CLIENT_MAC, LBB_MAC, TestRunNet},
    },
};

const NOT_NEIGHBOUR_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 2, 99);
const VIP2_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 2);
const VIP3_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 3);
const VIP4_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 4);
const VIP5_V4: Ipv4Addr = Ipv4Addr::new(198, 18, 100, 5);

fn config() -> String {
    let extra = format!(
        r#"
[[service]]
name = "web-l7"
vip = "{VIP_V4}:443"
mode = "l7"

[[service]]
name = "no-neighbour"
vip = "{VIP2_V4}:80"
ring_size = 13
[[service.backend]]
address = "{NOT_NEIGHBOUR_V4}:8080"

[[service]]
name = "three"
vip = "{VIP3_V4}:80"
ring_size = 13
[[service.backend]]
address = "{b4}:8080"
[[service.backend]]
address = "{b4_2}:8080"
[[service.backend]]
address = "{b4_3}:8080"

[[service]]
name = "shares-tcp4s-backend"
vip = "{VIP5_V4}:80"
ring_size = 13
[[service.backend]]
address = "{b4}:8080"

[[service]]
name = "all-drained"
vip = "{VIP4_V4}:80"
ring_size = 13
[[service.backend]]
address = "{b4}:8080"
weight = 0
"#,
        b4 = backend_v4(1),
        b4_2 = backend_v4(2),
        b4_3 = backend_v4(3),
    );
    lb_tests::nat_services_config() + &extra
}

/// Runs `body` inside a fresh fixture namespace with the balancer loaded.
fn with_fixture(body: impl FnOnce(&mut Balancer, &TestRunNet) + Send + 'static) {
    lb_tests::with_fixture("pkt", config(), body)
}

#[test]
fn ipv4_tcp_vip_hit_is_natted_to_the_backend_exactly() {
    with_fixture(|b, net| {
        let input = from_v4(CLIENT_V4);
        let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
        let expected = Frame::tcp(CLIENT_V4, backend_v4(1), CPORT, 8080)
            .syn()
            .to_backend(1)
            .ttl(63)
            .bytes();
        assert_eq!(action, XDP_REDIRECT, "lbc -> lbb is a redirect");
        assert_eq!(out, expected);
        assert_checksums_valid(&out);
        assert_eq!(reason_count(b, Reason::RedirectForward), 1);
    });
}

#[test]
fn ipv4_udp_vip_hit_is_natted_exactly_and_a_zero_checksum_stays_zero() {
    with_fixture(|b, net| {
        let input = Frame::udp(CLIENT_V4, VIP_V4, CPORT, 53).bytes();
        let natted = Frame::udp(CLIENT_V4, backend_v4(1), CPORT, 5353)
            .to_backend(1)
            .ttl(63)
            .bytes();
        let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, natted);
        assert_checksums_valid(&out);

        // IPv4 UDP without a checksum (0) must not gain a wrong one.
        let mut input = input;
        let sum_at = 14 + 20 + 6;
        input[sum_at] = 0;
        input[sum_at + 1] = 0;
        let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(&out[sum_at..sum_at + 2], &[0, 0]);
        let mut expected = natted;
        expected[sum_at] = 0;
        expected[sum_at + 1] = 0;
        assert_eq!(out, expected);
    });
}

#[test]
fn ipv6_tcp_and_udp_vip_hits_are_natted_exactly() {
    with_fixture(|b, net| {
        let tcp6 = |dst: Ipv6Addr, dport| Frame::tcp(CLIENT_V6, dst, CPORT, dport).syn();
        let udp6 = |dst: Ipv6Addr, dport| Frame::udp(CLIENT_V6, dst, CPORT, dport);
        let (action, out) = run_xdp(b, &tcp6(VIP_V6, 80).bytes(), net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let natted = tcp6(backend_v6(1), 8080).to_backend(1).ttl(63);
        assert_eq!(out, natted.bytes());
        assert_checksums_valid(&out);
        let (action, out) = run_xdp(b, &udp6(VIP_V6, 53).bytes(), net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let natted = udp6(backend_v6(1), 5353).to_backend(1).ttl(63);
        assert_eq!(out, natted.bytes());
        assert_checksums_valid(&out);
    });
}

#[test]
fn backend_reply_is_translated_back_to_the_vip() {
    with_fixture(|b, net| {
        let syn = from_v4(CLIENT_V4);
        assert_eq!(run_xdp(b, &syn, net.lbc).unwrap().0, XDP_REDIRECT);
        let reply = |src: Ipv4Addr, sport| {
            Frame::tcp(src, CLIENT_V4, sport, CPORT)
                .seq(99)
                .window(4096)
                .syn()
                .ack(0x0102_0305)
                .payload(b"welcome")
        };
        let input = reply(backend_v4(1), 8080).from_backend(1).bytes();
        let (action, out) = run_xdp(b, &input, net.lbb).unwrap();
        assert_eq!(action, XDP_REDIRECT, "lbb -> lbc is a redirect");
        assert_eq!(out, reply(VIP_V4, 80).to_client().ttl(63).bytes());
        assert_checksums_valid(&out);
        assert_eq!(reason_count(b, Reason::RedirectReply), 1);
    });
}

#[test]
fn same_interface_next_hop_uses_xdp_tx() {
    with_fixture(|b, net| {
        // A client packet arriving on the backend side leaves the same way: XDP_TX.
        let input = Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 80)
            .syn()
            .macs(CLIENT_MAC, LBB_MAC)
            .bytes();
        let (action, out) = run_xdp(b, &input, net.lbb).unwrap();
        assert_eq!(action, XDP_TX);
        let natted = Frame::tcp(CLIENT_V4, backend_v4(1), CPORT, 8080)
            .syn()
            .to_backend(1)
            .ttl(63);
        assert_eq!(out, natted.bytes());
        assert_eq!(reason_count(b, Reason::TxForward), 1);
    });
}

#[test]
fn vlan_tagged_frames_are_passed_untouched_in_both_directions() {
    with_fixture(|b, net| {
        let tagged = |src: Ipv4Addr, dst: Ipv4Addr, sport, dport| {
            Frame::tcp(src, dst, sport, dport)
                .seq(1)
                .window(1000)
                .vlan(42)
        };
        // Client -> VIP with the client side's tag: NAT would carry the tag
        // to the backend's (untagged) link.
        let to_vip = tagged(CLIENT_V4, VIP_V4, CPORT, 80).bytes();
        assert_passed_untouched(b, net.lbc, &to_vip, "tagged client -> VIP");
        assert!(
            b.dataplane().flow_counts().unwrap().is_empty(),
            "no flow for a tagged frame"
        );
        // A backend's tagged reply of an established (untagged) flow.
        let syn = from_v4(CLIENT_V4);
        assert_eq!(run_xdp(b, &syn, net.lbc).unwrap().0, XDP_REDIRECT);
        let reply = tagged(backend_v4(1), CLIENT_V4, 8080, CPORT)
            .from_backend(1)
            .bytes();
        assert_passed_untouched(b, net.lbb, &reply, "tagged backend reply");
        assert_eq!(reason_count(b, Reason::PassVlan), 2);
    });
}

/// The client's TCP or UDP (`proto` 6 or 17) 5-tuple to VIP3_V4:80 from `sport`.
fn key3(sport: u16, proto: u8) -> FlowKey {
    FlowKey {
        src: ip_to_addr(CLIENT_V4.into()).0,
        dst: ip_to_addr(VIP3_V4.into()).0,
        sport,
        dport: 80,
        proto,
        family: 4,
        pad: [0; 2],
    }
}

/// The lab backend (1..=3) of service "three" (VIP3_V4:80, `key`'s
/// protocol) whose id VIP3's Maglev table holds at `hash % size`.
fn maglev_backend(b: &mut Balancer, key: &FlowKey, hash: u32) -> usize {
    let protocol = if key.proto == 17 {
        lb_userspace::config::Protocol::Udp
    } else {
        lb_userspace::config::Protocol::Tcp
    };
    let vip_id = b
        .vip_id(format!("{VIP3_V4}:80").parse().unwrap(), protocol)
        .unwrap();
    let ring = b.dataplane().ring(vip_id).unwrap().unwrap();
    let id = ring[(hash % ring.len() as u32) as usize];
    (1..=3)
        .find(|&i| {
            b.backend_id("three", format!("{}:8080", backend_v4(i)).parse().unwrap()) == Some(id)
        })
        .unwrap()
}

#[test]
fn flows_follow_the_maglev_table_and_stay_pinned() {
    with_fixture(|b, net| {
        for sport in 1000..1064u16 {
            let input = Frame::tcp(CLIENT_V4, VIP3_V4, sport, 80).syn().bytes();
            let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
            assert_eq!(action, XDP_REDIRECT);
            let key = key3(sport, 6);
            let chosen = maglev_backend(b, &key, flow_hash(&key));
            assert_eq!(&out[30..34], &backend_v4(chosen).octets(), "sport {sport}");
            // The same flow again goes to the same backend (connection table hit).
            let (_, again) = run_xdp(b, &input, net.lbc).unwrap();
            assert_eq!(again, out);
        }
    });
}

#[test]
fn missing_neighbour_passes_the_natted_packet_to_the_stack() {
    with_fixture(|b, net| {
        let input = Frame::tcp(CLIENT_V4, VIP2_V4, CPORT, 80).syn().bytes();
        let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
        assert_eq!(action, XDP_PASS);
        // NATed, TTL untouched (the stack decrements it when it forwards), MACs untouched.
        let expected = Frame::tcp(CLIENT_V4, NOT_NEIGHBOUR_V4, CPORT, 8080)
            .syn()
            .bytes();
        assert_eq!(out, expected);
        assert_eq!(reason_count(b, Reason::PassNoNeighbour), 1);
    });
}

#[test]
fn vip_without_live_backends_drops() {
    with_fixture(|b, net| {
        let input = Frame::tcp(CLIENT_V4, VIP4_V4, CPORT, 80).syn().bytes();
        let (action, _) = run_xdp(b, &input, net.lbc).unwrap();
        assert_eq!(action, XDP_DROP);
        assert_eq!(reason_count(b, Reason::DropNoBackend), 1);
    });
}

/// Asserts the frame is passed to the kernel byte for byte as it came.
fn assert_passed_untouched(b: &mut Balancer, ingress: u32, frame: &[u8], what: &str) {
    let (action, out) = run_xdp(b, frame, ingress).unwrap();
    assert_eq!(action, XDP_PASS, "{what}: action");
    assert_eq!(out, frame, "{what}: frame changed");
}

#[test]
fn non_vip_l7_and_other_traffic_passes_untouched() {
    with_fixture(|b, net| {
        let mut arp = vec![0xffu8; 6];
        arp.extend_from_slice(&CLIENT_MAC);
        arp.extend_from_slice(&[0x08, 0x06]);
        arp.extend_from_slice(&[0u8; 28]);
        assert_passed_untouched(b, net.lbc, &arp, "ARP");
        assert_eq!(reason_count(b, Reason::PassNotIp), 1);

        let other_dst = Frame::tcp(CLIENT_V4, backend_v4(1), CPORT, 8080)
            .syn()
            .bytes();
        assert_passed_untouched(b, net.lbc, &other_dst, "not a VIP");
        let other_port = Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 81).syn().bytes();
        assert_passed_untouched(b, net.lbc, &other_port, "VIP address, other port");
        assert_eq!(reason_count(b, Reason::PassNotVip), 2);

        let l7 = Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 443).syn().bytes();
        assert_passed_untouched(b, net.lbc, &l7, "L7 VIP");
        assert_eq!(reason_count(b, Reason::PassL7), 1);

        // Code 1: not an echo request (those are answered: tests/icmp.rs).
        let mut icmp = Frame::echo_request(CLIENT_V4, VIP_V4).bytes();
        icmp[14 + 20 + 1] = 1;
        assert_passed_untouched(b, net.lbc, &icmp, "ICMP to a VIP");
        assert_eq!(reason_count(b, Reason::PassOtherProto), 1);
    });
}

#[test]
fn truncated_and_malformed_frames_are_never_rewritten() {
    with_fixture(|b, net| {
        let good = from_v4(CLIENT_V4);
        // Every truncation of a valid VIP frame (the kernel does not run XDP on
        // frames shorter than an Ethernet header, nor lets a test run one).
        for len in 14..good.len() {
            assert_passed_untouched(b, net.lbc, &good[..len], &format!("truncated to {len}"));
        }
        let mut cases: Vec<(&str, Vec<u8>)> = Vec::new();
        let mut f = good.clone();
        f[14] = 0x44; // IHL 4 (< 20 bytes)
        cases.push(("IHL below 5", f));
        let mut f = good.clone();
        f[14] = 0x55; // IP version 5
        cases.push(("IP version 5", f));
        let mut f = good.clone();
        f[16..18].copy_from_slice(&(good.len() as u16).to_be_bytes()); // longer than the frame
        cases.push(("total length beyond frame", f));
        let mut f = good.clone();
        f[16..18].copy_from_slice(&19u16.to_be_bytes());
        cases.push(("total length below header", f));
        let mut f = good.clone();
        f[14 + 20 + 12] = 0x40; // TCP data offset 4
        cases.push(("TCP data offset below 5", f));
        let mut f = good.clone();
        f[14 + 20 + 12] = 0xf0; // TCP data offset 15: 60 bytes, beyond the segment
        cases.push(("TCP data offset beyond segment", f));
        for (what, frame) in &cases {
            assert_passed_untouched(b, net.lbc, frame, what);
        }
        let malformed = reason_count(b, Reason::PassMalformed);
        assert_eq!(
            malformed,
            (good.len() - 14 + cases.len()) as u64,
            "every malformed frame counted"
        );

        let mut frag = good.clone();
        frag[20] = 0x20; // more fragments
        assert_passed_untouched(b, net.lbc, &frag, "first fragment");
        let mut frag = good.clone();
        frag[21] = 0x10; // offset 16
        assert_passed_untouched(b, net.lbc, &frag, "later fragment");
        assert_eq!(reason_count(b, Reason::PassFragment), 2);

        // IPv6 with a hop-by-hop extension header in front of TCP.
        let v6 = Frame::tcp(CLIENT_V6, VIP_V6, CPORT, 80).seq(1).bytes();
        let mut ext = v6[..14 + 40].to_vec();
        ext[14 + 6] = 0; // next header: hop-by-hop
        ext.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]); // -> TCP, PadN
        ext.extend_from_slice(&v6[14 + 40..]);
        let plen = (ext.len() - 14 - 40) as u16;
        ext[18..20].copy_from_slice(&plen.to_be_bytes());
        // Not parsed, never rewritten: VIP_V6 is an l4 VIP's address alone
        // (no l7 service here has it), so it is dropped rather than passed
        // to a stack that would route it back out (tests/icmp.rs).
        assert_eq!(
            run_xdp(b, &ext, net.lbc).unwrap().0,
            XDP_DROP,
            "IPv6 extension header"
        );
        assert_eq!(reason_count(b, Reason::DropVipUnserved), 1);

        // UDP length field larger than the datagram.
        let mut udp = Frame::udp(CLIENT_V4, VIP_V4, CPORT, 53).bytes();
        udp[14 + 20 + 4..14 + 20 + 6].copy_from_slice(&200u16.to_be_bytes());
        assert_passed_untouched(b, net.lbc, &udp, "UDP length beyond datagram");
    });
}

/// A config with only the "three" service, over the given lab backends.
fn three_config(backends: &[usize], mode: &str) -> String {
    let mut text = format!(
        "interfaces = [\"lbc\", \"lbb\"]\n[[service]]\nname = \"three\"\nvip = \"{VIP3_V4}:80\"\nmode = \"{mode}\"\nring_size = 13\n"
    );
    for &i in backends {
        text.push_str(&format!(
            "[[service.backend]]\naddress = \"{}:8080\"\n",
            backend_v4(i)
        ));
    }
    text
}

fn apply(b: &mut Balancer, text: &str) {
    let config = lb_userspace::config::parse(text, "test.toml").expect("valid config");
    b.apply(&config).expect("apply");
}

#[test]
fn hash_source_sends_every_flow_of_a_client_to_one_backend() {
    with_fixture(|b, net| {
        // The backend (1..=3) each of `n` SYNs from `client`, one per source port, reached.
        let reached = |b: &mut Balancer, client: Ipv4Addr, proto: &str| {
            let mut seen = std::collections::BTreeSet::new();
            for sport in 2000..2040u16 {
                let input = match proto {
                    "udp" => Frame::udp(client, VIP3_V4, sport, 80).bytes(),
                    _ => Frame::tcp(client, VIP3_V4, sport, 80).syn().bytes(),
                };
                let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
                assert_eq!(action, XDP_REDIRECT, "{client}:{sport}");
                let i = (1..=3).find(|&i| out[30..34] == backend_v4(i).octets());
                seen.insert(i.expect("one of the backends"));
            }
            seen
        };
        let spread = reached(b, CLIENT_V4, "tcp");
        assert!(
            spread.len() > 1,
            "the 5-tuple spreads a client's flows: {spread:?}"
        );
        for proto in ["tcp", "udp"] {
            let text = three_config(&[1, 2, 3], "l4").replace(
                "mode = \"l4\"\n",
                &format!("mode = \"l4\"\nhash = \"source\"\nprotocol = \"{proto}\"\n"),
            );
            apply(b, &text);
            let one = reached(b, CLIENT_V4, proto);
            assert_eq!(one.len(), 1, "{proto}: one backend for the client: {one:?}");
            // The one Maglev gives the tuple without the client's port.
            let key = key3(0, if proto == "udp" { 17 } else { 6 });
            let want = maglev_backend(b, &key, source_hash(&key));
            assert_eq!(one.first(), Some(&want), "{proto}");
        }
    });
}

#[test]
fn a_hash_change_keeps_established_flows_where_they_are() {
    with_fixture(|b, net| {
        apply(b, &three_config(&[1, 2, 3], "l4"));
        // A flow whose backend the source hash would change.
        let sport = (3000..3200u16)
            .find(|&p| {
                let key = key3(p, 6);
                maglev_backend(b, &key, flow_hash(&key))
                    != maglev_backend(b, &key, source_hash(&key))
            })
            .expect("a port the two hashes disagree on");
        let backend = |out: &[u8]| (1..=3).find(|&i| out[30..34] == backend_v4(i).octets());
        let syn = Frame::tcp(CLIENT_V4, VIP3_V4, sport, 80).syn().bytes();
        let ack = Frame::tcp(CLIENT_V4, VIP3_V4, sport, 80).ack(1).bytes();
        let (_, out) = run_xdp(b, &syn, net.lbc).unwrap();
        let pinned = backend(&out).unwrap();
        let (_, out) = run_xdp(b, &ack, net.lbc).unwrap();
        assert_eq!(backend(&out), Some(pinned), "established");

        let text = three_config(&[1, 2, 3], "l4")
            .replace("mode = \"l4\"\n", "mode = \"l4\"\nhash = \"source\"\n");
        apply(b, &text);
        for _ in 0..3 {
            let (_, out) = run_xdp(b, &ack, net.lbc).unwrap();
            assert_eq!(backend(&out), Some(pinned), "the established flow stays");
        }
        // A new connection of the client gets the source hash's backend.
        let new = Frame::tcp(CLIENT_V4, VIP3_V4, sport + 1, 80).syn().bytes();
        let (_, out) = run_xdp(b, &new, net.lbc).unwrap();
        let key = key3(sport, 6);
        let got = backend(&out).unwrap();
        assert_eq!(
            got,
            maglev_backend(b, &key, source_hash(&key)),
            "a new flow"
        );
        assert_ne!(got, pinned);
    });
}

#[test]
fn established_flows_follow_backend_removal_mode_change_and_vip_removal() {
    with_fixture(|b, net| {
        apply(b, &three_config(&[1, 2, 3], "l4"));
        let input = Frame::tcp(CLIENT_V4, VIP3_V4, CPORT, 80).syn().bytes();
        let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let first = (1..=3)
            .find(|&i| out[30..34] == backend_v4(i).octets())
            .unwrap();

        // Its backend leaves: the flow is re-hashed to one that is still there.
        let rest: Vec<usize> = (1..=3).filter(|&i| i != first).collect();
        apply(b, &three_config(&rest, "l4"));
        let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        let second = (1..=3)
            .find(|&i| out[30..34] == backend_v4(i).octets())
            .unwrap();
        assert_ne!(second, first);
        assert!(rest.contains(&second));
        assert_checksums_valid(&out);

        // The VIP switches to L7: the established flow goes to the stack now.
        apply(b, &three_config(&rest, "l7"));
        assert_passed_untouched(b, net.lbc, &input, "flow of a VIP now in L7 mode");
        assert_eq!(reason_count(b, Reason::PassL7), 1);

        // Back to L4, then removed: the flow is no longer forwarded.
        apply(b, &three_config(&rest, "l4"));
        assert_eq!(run_xdp(b, &input, net.lbc).unwrap().0, XDP_REDIRECT);
        apply(
            b,
            &three_config(&[], "l7")
                .replace("name = \"three\"", "name = \"other\"")
                .replace(&format!("{VIP3_V4}"), "198.18.100.9"),
        );
        assert_passed_untouched(b, net.lbc, &input, "flow of a removed VIP");
        assert_eq!(reason_count(b, Reason::PassNotVip), 1);
    });
}

#[test]
fn a_vips_counters_survive_its_backends_retirement() {
    with_fixture(|b, net| {
        apply(b, &three_config(&[1, 2, 3], "l4"));
        let vip = std::net::SocketAddr::new(VIP3_V4.into(), 80);
        let vip_id = b.vip_id(vip, Protocol::Tcp).expect("vip id");
        let ids: Vec<u32> = (1..=3)
            .map(|i| {
                let addr = std::net::SocketAddr::new(backend_v4(i).into(), 8080);
                b.backend_id("three", addr).expect("backend id")
            })
            .collect();
        // Flows from 40 ports spread over the three backends.
        let frames: Vec<Vec<u8>> = (0..40)
            .map(|p| Frame::tcp(CLIENT_V4, VIP3_V4, 2000 + p, 80).syn().bytes())
            .collect();
        for f in &frames {
            assert_eq!(run_xdp(b, f, net.lbc).unwrap().0, XDP_REDIRECT);
        }
        let before = b.dataplane().counters().unwrap();
        assert_eq!(
            before.vips[vip_id as usize].packets, 40,
            "a VIP counts its backends' packets"
        );
        let gone = *ids
            .iter()
            .max_by_key(|id| before.backends[**id as usize].packets)
            .unwrap();
        assert!(before.backends[gone as usize].packets > 0);

        // One backend leaves: the VIP's total stays whole, its slot starts over.
        let kept: Vec<usize> = (1..=3).filter(|&i| ids[i - 1] != gone).collect();
        apply(b, &three_config(&kept, "l4"));
        let after = b.dataplane().counters().unwrap();
        assert_eq!(after.vips[vip_id as usize], before.vips[vip_id as usize]);
        assert_eq!(after.backends[gone as usize].packets, 0);
        for f in &frames {
            assert_eq!(run_xdp(b, f, net.lbc).unwrap().0, XDP_REDIRECT);
        }
        let last = b.dataplane().counters().unwrap();
        assert_eq!(last.vips[vip_id as usize].packets, 80);
    });
}

#[test]
fn established_flows_are_forwarded_by_the_attached_program_alone() {
    with_fixture(|b, net| {
        // The flow cache and next hops are per CPU.
        lb_tests::pin_to_this_cpu();
        let input = acked(CLIENT_V4, VIP_V4, CPORT, 80).bytes();
        // Another flow's packets with IP options (three NOPs, an end of
        // list): the hit path's general parser.
        let optioned = acked(CLIENT_V4, VIP_V4, CPORT + 2, 80)
            .ip_options(&[1, 1, 1, 0])
            .bytes();
        // The backend's answer to the first (NATed back to the VIP), and an IPv6 flow.
        let answer = Frame::tcp(backend_v4(1), CLIENT_V4, 8080, CPORT)
            .seq(99)
            .window(4096)
            .ack(1)
            .payload(b"welcome")
            .from_backend(1)
            .bytes();
        let v6 = Frame::tcp(CLIENT_V6, VIP_V6, CPORT, 80).ack(1).bytes();
        let frames: [(&str, &[u8], u32); 4] = [
            ("plain IPv4", &input, net.lbc),
            ("IPv4 with options", &optioned, net.lbc),
            ("the backend's answer", &answer, net.lbb),
            ("IPv6", &v6, net.lbc),
        ];
        assert_hit_path_forwards_alike(b, &frames);
        // Packets of the flow the parsers refuse are left untouched.
        let mut short_tcp = input.clone();
        short_tcp[46] = 0x40; // TCP data offset 4
        assert_passed_untouched(b, net.lbc, &short_tcp, "a TCP header under 20 bytes");
        let mut fragment = input.clone();
        fragment[20] |= 0x20; // more fragments
        fix_ipv4_checksum(&mut fragment[14..]);
        assert_passed_untouched(b, net.lbc, &fragment, "a first fragment");
        let mut long = input.clone();
        long[16..18].copy_from_slice(&((input.len() - 14 + 1) as u16).to_be_bytes());
        fix_ipv4_checksum(&mut long[14..]);
        assert_passed_untouched(b, net.lbc, &long, "an IP length past the frame");
        // What the hit path leaves (a new flow, other traffic) it passes untouched.
        let other = Frame::tcp(CLIENT_V4, VIP_V4, CPORT + 1, 80).syn().bytes();
        assert_passed_untouched(b, net.lbc, &other, "a new flow without the full program");
    });
}

/// A SYN from `src` to the VIP's port 80 on `lbc`.
fn from_v4(src: Ipv4Addr) -> Vec<u8> {
    Frame::tcp(src, VIP_V4, CPORT, 80).syn().bytes()
}

/// A SYN from `src` to the IPv6 VIP's port 80 on `lbc`.
fn from_v6(src: Ipv6Addr) -> Vec<u8> {
    Frame::tcp(src, VIP_V6, CPORT, 80).syn().bytes()
}

/// Asserts the frame is dropped untouched, and no flow was made for it.
fn assert_dropped(b: &mut Balancer, ingress: u32, frame: &[u8], what: &str) {
    let (action, out) = run_xdp(b, frame, ingress).unwrap();
    assert_eq!(action, XDP_DROP, "{what}: action");
    assert_eq!(out, frame, "{what}: frame changed");
    assert!(
        b.dataplane().flow_counts().unwrap().is_empty(),
        "{what}: a flow was created"
    );
}

#[test]
fn bad_ipv4_header_checksums_are_dropped_not_natted() {
    with_fixture(|b, net| {
        // Checksum at bytes 24..26 of the frame.
        let corrupt = |mut f: Vec<u8>| {
            f[25] ^= 0x01;
            f
        };
        assert_dropped(
            b,
            net.lbc,
            &corrupt(from_v4(CLIENT_V4)),
            "bad checksum to a VIP",
        );
        // With options (IHL 6): the whole header counts.
        let opt = Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 80)
            .syn()
            .ip_options(&[1, 1, 1, 0]) // NOP NOP NOP EOL
            .bytes();
        let (action, _) = run_xdp(b, &opt, net.lbc).unwrap();
        assert_eq!(
            action, XDP_REDIRECT,
            "a correct header with options is forwarded"
        );
        let mut bad_opt = opt.clone();
        bad_opt[36] ^= 0x80; // in the options, not in the checksum field
        let (action, out) = run_xdp(b, &bad_opt, net.lbc).unwrap();
        assert_eq!(
            (action, &out),
            (XDP_DROP, &bad_opt),
            "bad checksum over options"
        );

        // A reply of a NATed flow with a bad checksum.
        let syn = from_v4(CLIENT_V4);
        assert_eq!(run_xdp(b, &syn, net.lbc).unwrap().0, XDP_REDIRECT);
        let reply = Frame::tcp(backend_v4(1), CLIENT_V4, 8080, CPORT)
            .syn()
            .from_backend(1)
            .bytes();
        let (action, out) = run_xdp(b, &corrupt(reply.clone()), net.lbb).unwrap();
        assert_eq!((action, out), (XDP_DROP, corrupt(reply)), "bad reply");
        assert_eq!(reason_count(b, Reason::DropBadIpChecksum), 3);
        // Not a VIP: the stack's business, passed as it came.
        let other = Frame::tcp(CLIENT_V4, backend_v4(1), CPORT, 8080)
            .syn()
            .bytes();
        assert_passed_untouched(b, net.lbc, &corrupt(other), "bad checksum, not a VIP");
    });
}

#[test]
fn martian_and_spoofed_sources_create_no_flow_and_are_dropped() {
    with_fixture(|b, net| {
        let v4: [Ipv4Addr; 7] = [
            Ipv4Addr::new(0, 0, 0, 0),
            Ipv4Addr::new(0, 1, 2, 3),
            Ipv4Addr::new(127, 0, 0, 1),
            Ipv4Addr::new(224, 0, 0, 1),
            Ipv4Addr::new(239, 1, 2, 3),
            Ipv4Addr::new(240, 0, 0, 1),
            Ipv4Addr::BROADCAST,
        ];
        for src in v4 {
            assert_dropped(b, net.lbc, &from_v4(src), &format!("source {src}"));
        }
        let v6: [Ipv6Addr; 5] = [
            Ipv6Addr::UNSPECIFIED,
            Ipv6Addr::LOCALHOST,
            "ff02::1".parse().unwrap(),
            "ff0e::1:2".parse().unwrap(),
            "::ffff:198.18.1.2".parse().unwrap(),
        ];
        for src in v6 {
            assert_dropped(b, net.lbc, &from_v6(src), &format!("source {src}"));
        }
        assert_eq!(reason_count(b, Reason::DropMartianSource), 12);

        // The VIP itself, and backends' addresses (of this VIP's service and
        // of another one), as sources of new flows.
        for src in [VIP_V4, backend_v4(1), backend_v4(3)] {
            assert_dropped(b, net.lbc, &from_v4(src), &format!("source {src}"));
        }
        for src in [VIP_V6, backend_v6(1)] {
            assert_dropped(b, net.lbc, &from_v6(src), &format!("source {src}"));
        }
        assert_eq!(reason_count(b, Reason::DropSpoofedSource), 5);

        // Ordinary clients still get through.
        assert_eq!(
            run_xdp(b, &from_v4(CLIENT_V4), net.lbc).unwrap().0,
            XDP_REDIRECT
        );
        assert_eq!(
            run_xdp(b, &from_v6(CLIENT_V6), net.lbc).unwrap().0,
            XDP_REDIRECT
        );
    });
}

#[test]
fn frames_to_another_mac_are_not_forwarded_in_either_direction() {
    with_fixture(|b, net| {
        let other_host = [0x02, 0, 0, 0, 0, 0x99];
        for dmac in [other_host, [0xff; 6], [0x01, 0x00, 0x5e, 0, 0, 1]] {
            let f = Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 80)
                .syn()
                .macs(CLIENT_MAC, dmac)
                .bytes();
            assert_dropped(b, net.lbc, &f, &format!("to {dmac:02x?}"));
        }
        // The MAC of the other interface is not this one's either.
        let f = Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 80)
            .syn()
            .macs(CLIENT_MAC, LBB_MAC)
            .bytes();
        assert_dropped(b, net.lbc, &f, "to lbb's MAC on lbc");
        assert_eq!(reason_count(b, Reason::DropOtherHost), 4);

        // Established flow: its client packets and the backend's replies too.
        let syn = from_v4(CLIENT_V4);
        assert_eq!(run_xdp(b, &syn, net.lbc).unwrap().0, XDP_REDIRECT);
        let mut again = syn.clone();
        again[0..6].copy_from_slice(&other_host);
        let (action, out) = run_xdp(b, &again, net.lbc).unwrap();
        assert_eq!((action, &out), (XDP_DROP, &again), "established, other MAC");
        let reply = Frame::tcp(backend_v4(1), CLIENT_V4, 8080, CPORT)
            .syn()
            .macs(backend_mac(1), other_host)
            .bytes();
        let (action, out) = run_xdp(b, &reply, net.lbb).unwrap();
        assert_eq!((action, &out), (XDP_DROP, &reply), "reply, other MAC");
        assert_eq!(reason_count(b, Reason::DropOtherHost), 6);

        // Not to a VIP: the stack's business, passed as it came.
        let f = Frame::tcp(CLIENT_V4, backend_v4(1), CPORT, 8080)
            .syn()
            .macs(CLIENT_MAC, other_host)
            .bytes();
        assert_passed_untouched(b, net.lbc, &f, "other MAC, not a VIP");
    });
}

#[test]
fn expiring_packets_to_a_vip_are_answered_with_time_exceeded_from_the_vip() {
    with_fixture(|b, net| {
        // IPv4, TTL 1: the IP header and 8 bytes quoted (RFC 792), from the
        // VIP, back to the sender's MAC out of the same interface.
        let input = Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 80)
            .syn()
            .ttl(1)
            .bytes();
        let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
        let expired = Icmpv4Type::TimeExceeded(icmpv4::TimeExceededCode::TtlExceededInTransit);
        assert_eq!(action, XDP_TX);
        assert_eq!(out, icmp4_from_vip(expired, &input));
        // TTL 0 too, and UDP.
        let udp = Frame::udp(CLIENT_V4, VIP_V4, CPORT, 53).ttl(0).bytes();
        let (action, out) = run_xdp(b, &udp, net.lbc).unwrap();
        assert_eq!(action, XDP_TX);
        assert_eq!(&out[14 + 20 + 8..], &udp[14..14 + 20 + 8], "UDP quote");
        assert_eq!(reason_count(b, Reason::TxTimeExceeded), 2);

        // IPv6, hop limit 1: the whole packet fits in the quote (RFC 4443).
        let tcp6 = |payload: &[u8]| {
            Frame::tcp(CLIENT_V6, VIP_V6, CPORT, 80)
                .syn()
                .ttl(1)
                .payload(payload)
                .bytes()
        };
        let expired = Icmpv6Type::TimeExceeded(icmpv6::TimeExceededCode::HopLimitExceeded);
        let input = tcp6(PAYLOAD);
        let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
        assert_eq!(action, XDP_TX);
        assert_eq!(out, icmp6_from_vip(expired, &input));
        // Too big to quote whole: cut so the answer is 1280 bytes of IPv6,
        // at an odd length to exercise the checksum's last byte.
        let input = tcp6(&[0x5a; 1401]);
        let (action, out) = run_xdp(b, &input, net.lbc).unwrap();
        assert_eq!(action, XDP_TX);
        assert_eq!(out.len(), 14 + 1280);
        assert_eq!(out, icmp6_from_vip(expired, &input));
        assert_eq!(reason_count(b, Reason::TxTimeExceeded), 4);

        // None of them made a flow; a martian source gets no answer.
        assert!(b.dataplane().flow_counts().unwrap().is_empty());
        let martian = Frame::tcp(Ipv4Addr::BROADCAST, VIP_V4, CPORT, 80)
            .syn()
            .ttl(1)
            .bytes();
        assert_dropped(b, net.lbc, &martian, "TTL 1 from a martian source");

        // A backend's expiring reply still goes to the stack, which answers
        // the backend (it has a route there).
        let syn = from_v4(CLIENT_V4);
        assert_eq!(run_xdp(b, &syn, net.lbc).unwrap().0, XDP_REDIRECT);
        let reply = Frame::tcp(backend_v4(1), CLIENT_V4, 8080, CPORT)
            .syn()
            .from_backend(1)
            .ttl(1)
            .bytes();
        assert_passed_untouched(b, net.lbb, &reply, "expiring reply");
        assert_eq!(reason_count(b, Reason::PassTtlExpired), 1);
    });
}

#[test]
fn a_new_flow_whose_replies_would_collide_with_another_vips_live_flow_is_refused() {
    with_fixture(|b, net| {
        // The same client address and port to two VIPs whose (only) backend is
        // the same: the backend would see one connection, and the second
        // flow's reply entry would overwrite the first's.
        let first = from_v4(CLIENT_V4);
        assert_eq!(run_xdp(b, &first, net.lbc).unwrap().0, XDP_REDIRECT);
        let second = Frame::tcp(CLIENT_V4, VIP5_V4, CPORT, 80).syn().bytes();
        let (action, out) = run_xdp(b, &second, net.lbc).unwrap();
        assert_eq!((action, &out), (XDP_DROP, &second));
        assert_eq!(reason_count(b, Reason::DropReplyCollision), 1);

        // The first flow's replies still come from its own VIP.
        let reply = |src: Ipv4Addr, sport| Frame::tcp(src, CLIENT_V4, sport, CPORT).syn();
        let from_backend = reply(backend_v4(1), 8080).from_backend(1).bytes();
        let (action, out) = run_xdp(b, &from_backend, net.lbb).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, reply(VIP_V4, 80).to_client().ttl(63).bytes());

        // Another client port to the second VIP is fine.
        let other_port = Frame::tcp(CLIENT_V4, VIP5_V4, CPORT + 1, 80).syn().bytes();
        assert_eq!(run_xdp(b, &other_port, net.lbc).unwrap().0, XDP_REDIRECT);

        // Once the first VIP is gone, its flow is no longer live: the port may
        // be used for the second VIP, whose replies are then its own.
        apply(
            b,
            &format!(
                "interfaces = [\"lbc\", \"lbb\"]\n[[service]]\nname = \"shares-tcp4s-backend\"\nvip = \"{VIP5_V4}:80\"\nring_size = 13\n[[service.backend]]\naddress = \"{}:8080\"\n",
                backend_v4(1)
            ),
        );
        assert_eq!(run_xdp(b, &second, net.lbc).unwrap().0, XDP_REDIRECT);
        let (action, out) = run_xdp(b, &from_backend, net.lbb).unwrap();
        assert_eq!(action, XDP_REDIRECT);
        assert_eq!(out, reply(VIP5_V4, 80).to_client().ttl(63).bytes());
        assert_eq!(reason_count(b, Reason::DropReplyCollision), 1);
    });
}

/// The client direction's key of a TCP/IPv4 flow to `vip`:80.
fn key4(src: Ipv4Addr, sport: u16, vip: Ipv4Addr) -> FlowKey {
    FlowKey {
        src: ip_to_addr(src.into()).0,
        dst: ip_to_addr(vip.into()).0,
        sport,
        dport: 80,
        proto: 6,
        family: 4,
        pad: [0; 2],
    }
}

/// The reply direction's key of that flow, on backend `i`'s port 8080.
fn reply_key4(src: Ipv4Addr, sport: u16, backend: usize) -> FlowKey {
    FlowKey {
        src: ip_to_addr(backend_v4(backend).into()).0,
        dst: ip_to_addr(src.into()).0,
        sport: 8080,
        dport: sport,
        proto: 6,
        family: 4,
        pad: [0; 2],
    }
}

/// A TCP/IPv4 segment with ACK and no other flag (`.syn()` adds SYN): a
/// handshake's later packets, with sequence numbers of their own.
fn acked(src: Ipv4Addr, dst: Ipv4Addr, sport: u16, dport: u16) -> Frame {
    Frame::tcp(src, dst, sport, dport)
        .seq(0x0102_0305)
        .ack(0x0a0b_0c0e)
}

/// Which of "three"'s backends (1..=3) a frame sent to the backend side goes to.
fn backend_of(out: &[u8]) -> usize {
    (1..=3)
        .find(|&i| out[30..34] == backend_v4(i).octets())
        .expect("NATed to one of the backends")
}

/// One TCP handshake from `src:sport` to VIP3 through the program, checked
/// byte for byte in both directions; returns the backend it went to. Only
/// the client's ACK puts the flow in FLOWS.
fn handshake(b: &mut Balancer, net: &TestRunNet, src: Ipv4Addr, sport: u16) -> usize {
    let syn = Frame::tcp(src, VIP3_V4, sport, 80).syn().bytes();
    let (action, out) = run_xdp(b, &syn, net.lbc).unwrap();
    assert_eq!(action, XDP_REDIRECT, "SYN from {src}:{sport}");
    let i = backend_of(&out);
    let natted = Frame::tcp(src, backend_v4(i), sport, 8080)
        .syn()
        .to_backend(i)
        .ttl(63);
    assert_eq!(out, natted.bytes(), "SYN NATed exactly");
    let key = key4(src, sport, VIP3_V4);
    let dp = b.dataplane();
    assert!(
        dp.flow(&key).unwrap().is_none(),
        "a SYN alone is not in FLOWS"
    );
    assert!(dp.pending_flow(&key).unwrap().is_some(), "but in PENDING");

    // The backend's SYN-ACK is translated back from PENDING.
    let syn_ack = acked(backend_v4(i), src, 8080, sport)
        .syn()
        .from_backend(i)
        .bytes();
    let (action, out) = run_xdp(b, &syn_ack, net.lbb).unwrap();
    assert_eq!(action, XDP_REDIRECT, "SYN-ACK to {src}:{sport}");
    let expected = acked(VIP3_V4, src, 80, sport).syn().to_client().ttl(63);
    assert_eq!(out, expected.bytes(), "SYN-ACK translated back exactly");

    // The client's ACK confirms the flow: both directions move to FLOWS.
    let ack = acked(src, VIP3_V4, sport, 80).bytes();
    let (action, out) = run_xdp(b, &ack, net.lbc).unwrap();
    assert_eq!(action, XDP_REDIRECT, "ACK from {src}:{sport}");
    let expected = acked(src, backend_v4(i), sport, 8080).to_backend(i).ttl(63);
    assert_eq!(out, expected.bytes(), "ACK NATed exactly");
    let dp = b.dataplane();
    assert!(dp.flow(&key).unwrap().is_some(), "confirmed: in FLOWS");
    assert!(dp.flow(&reply_key4(src, sport, i)).unwrap().is_some());
    assert!(
        dp.pending_flow(&key).unwrap().is_none(),
        "and out of PENDING"
    );
    i
}

/// Applies `text` with backend `drained` of "three" (1..=3, 0 for none)
/// taking no new flows.
fn apply_draining(b: &mut Balancer, text: &str, drained: usize) {
    let config = lb_userspace::config::parse(text, "test.toml").expect("valid config");
    let drained: Option<std::net::SocketAddr> =
        (drained != 0).then(|| std::net::SocketAddr::new(backend_v4(drained).into(), 8080));
    b.apply_with(&config, &|_, addr| Availability {
        new_flows: Some(addr) != drained,
        established: true,
    })
    .expect("apply");
}

/// "three" over TCP with backend `drained` taking no new flows.
fn drain_in_three(b: &mut Balancer, drained: usize) {
    apply_draining(b, &three_config(&[1, 2, 3], "l4"), drained);
}

/// The coarse monotonic clock the data plane reads (`bpf_ktime_get_coarse_ns`).
fn coarse_now() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into the timespec we own.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

#[test]
fn an_idle_udp_flow_gets_its_backend_from_the_table_again() {
    with_fixture(|b, net| {
        let text = three_config(&[1, 2, 3], "l4").replace("mode = ", "protocol = \"udp\"\nmode = ");
        apply(b, &text);
        let send = |b: &mut Balancer| {
            let frame = Frame::udp(CLIENT_V4, VIP3_V4, 5000, 80).bytes();
            let (action, out) = run_xdp(b, &frame, net.lbc).unwrap();
            assert_eq!(action, XDP_REDIRECT);
            backend_of(&out)
        };
        let key = FlowKey {
            proto: 17,
            ..key4(CLIENT_V4, 5000, VIP3_V4)
        };
        // Ages the flow's entry past the idle limit (as 30 s of silence would).
        let age = |b: &mut Balancer| {
            let mut flow = b.dataplane().flow(&key).unwrap().expect("the flow's entry");
            flow.last_seen = flow_time(coarse_now()).wrapping_sub(UDP_IDLE_UNITS + 1);
            b.dataplane().set_flow(&key, &flow).unwrap();
        };
        let first = send(b);
        apply_draining(b, &text, first);
        assert_eq!(send(b), first, "a drained backend keeps a flow that talks");
        age(b);
        b.dataplane().bump_flow_epoch().unwrap();
        let second = send(b);
        assert_ne!(
            second, first,
            "an idle flow is new: not to the drained backend"
        );
        apply_draining(b, &text, second);
        assert_eq!(send(b), second, "a flow that talks stays");
        let seen = b.dataplane().flow(&key).unwrap().unwrap().last_seen;
        assert!(
            flow_time(coarse_now()).wrapping_sub(seen) <= 1,
            "last_seen kept current"
        );
        // Without any epoch bump, a cached copy is read again from FLOWS once
        // the cache period turns: the aged entry then counts.
        age(b);
        let period = || coarse_now() >> FLOW_CACHE_PERIOD_SHIFT;
        let start = period();
        wait_for(
            "the cache period to turn",
            std::time::Duration::from_secs(10),
            || period() != start,
        );
        assert_ne!(send(b), second, "idle, past a cache period");
    });
}

#[test]
fn a_syn_gets_its_backend_from_the_table_whatever_an_older_entry_says() {
    with_fixture(|b, net| {
        apply(b, &three_config(&[1, 2, 3], "l4"));
        let syn = |sport| Frame::tcp(CLIENT_V4, VIP3_V4, sport, 80).syn().bytes();
        let send = |b: &mut Balancer, frame: &[u8]| {
            let (action, out) = run_xdp(b, frame, net.lbc).unwrap();
            assert_eq!(action, XDP_REDIRECT);
            backend_of(&out)
        };
        for sport in [2001, 2002, 2003] {
            // An established flow; the client reuses its port (a new SYN):
            // while the table agrees, the entry serves as it is.
            let first = handshake(b, net, CLIENT_V4, sport);
            assert_eq!(send(b, &syn(sport)), first, "sport {sport}");
            let key = key4(CLIENT_V4, sport, VIP3_V4);
            assert!(b.dataplane().flow(&key).unwrap().is_some());
            // Its backend drained: the next SYN goes elsewhere and its ACK
            // follows it, not the older entry.
            drain_in_three(b, first);
            let second = send(b, &syn(sport));
            assert_ne!(second, first, "sport {sport}: a SYN to a drained backend");
            assert!(
                b.dataplane().flow(&key).unwrap().is_none(),
                "older entry gone"
            );
            let ack = acked(CLIENT_V4, VIP3_V4, sport, 80).bytes();
            assert_eq!(send(b, &ack), second, "sport {sport}: the ACK");
            drain_in_three(b, 0);
        }
        // A handshake in PENDING whose backend is drained before the SYN is
        // retransmitted: the retransmission goes by the table too.
        let first = send(b, &syn(2100));
        drain_in_three(b, first);
        assert_ne!(
            send(b, &syn(2100)),
            first,
            "a retransmitted SYN to a drained backend"
        );
        assert_eq!(reason_count(b, Reason::DropRateLimited), 0);
    });
}

#[test]
fn a_syn_flood_larger_than_the_flow_table_evicts_no_established_flow() {
    with_fixture(|b, net| {
        let established = establish(b, net);
        // More distinct spoofed SYNs than FLOWS has entries, all to the VIP
        // of the established flows.
        let flood = lb_common::FLOW_TABLE_SIZE as usize + 75_712;
        let forwarded = spoofed_flood(b, net, flood, |src| {
            Frame::tcp(src, VIP3_V4, CPORT, 80).syn().bytes()
        });
        assert_eq!(
            forwarded, flood,
            "every SYN is forwarded (only never confirmed)"
        );
        assert_established_kept(b, net, &established);
    });
}

#[test]
fn a_udp_flood_larger_than_the_flow_table_evicts_no_established_tcp_flow() {
    with_fixture(|b, net| {
        let established = establish(b, net);
        // Each spoofed UDP flow would take two FLOWS entries (one per
        // direction): this many would push every older one out of it.
        let flood = lb_common::FLOW_TABLE_SIZE as usize / 2 + 75_712;
        let forwarded = spoofed_flood(b, net, flood, |src| {
            Frame::udp(src, VIP_V4, CPORT, 53).bytes()
        });
        assert_eq!(forwarded, flood, "every UDP packet is forwarded");
        assert_established_kept(b, net, &established);
        // The UDP flows themselves are kept in their own table: the latest
        // is there, and UDP still works.
        let last = flood_source(flood - 1);
        let key = FlowKey {
            proto: 17,
            dport: 53,
            ..key4(last, CPORT, VIP_V4)
        };
        assert!(
            b.dataplane().flow(&key).unwrap().is_some(),
            "latest UDP flow"
        );
        let udp = Frame::udp(CLIENT_V4, VIP_V4, CPORT, 53).bytes();
        assert_eq!(run_xdp(b, &udp, net.lbc).unwrap().0, XDP_REDIRECT);
    });
}

/// 64 TCP connections to VIP3, each through its handshake: (port, backend).
fn establish(b: &mut Balancer, net: &TestRunNet) -> Vec<(u16, usize)> {
    (20000..20064u16)
        .map(|sport| (sport, handshake(b, net, CLIENT_V4, sport)))
        .collect()
}

/// The source of a flood's `n`th packet: 11.0.0.1, 11.0.1.1, ...: a /24 of
/// its own each, so the per-prefix rate limit lets every one through.
fn flood_source(n: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(11, 0, 0, 1)) + ((n as u32) << 8))
}

/// Runs `count` frames made by `frame` (from `flood_source(n)`) through the
/// program, within five minutes; returns how many were forwarded.
fn spoofed_flood(
    b: &mut Balancer,
    net: &TestRunNet,
    count: usize,
    frame: impl Fn(Ipv4Addr) -> Vec<u8>,
) -> usize {
    let limit = std::time::Duration::from_secs(300);
    let start = std::time::Instant::now();
    let mut forwarded = 0usize;
    for n in 0..count {
        assert!(
            start.elapsed() < limit,
            "flood too slow: {n} packets in {limit:?}"
        );
        let (action, _) = run_xdp(b, &frame(flood_source(n)), net.lbc).unwrap();
        forwarded += usize::from(action == XDP_REDIRECT);
    }
    let took = start.elapsed();
    eprintln!(
        "{count} spoofed packets in {took:?} ({:.2} us each)",
        took.as_secs_f64() * 1e6 / count as f64
    );
    forwarded
}

/// Every `established` flow is still in FLOWS, both directions, pinned
/// where it was, its next packet hits it, and a new connection still gets
/// through both ways.
fn assert_established_kept(b: &mut Balancer, net: &TestRunNet, established: &[(u16, usize)]) {
    for &(sport, i) in established {
        let key = key4(CLIENT_V4, sport, VIP3_V4);
        let flow = b.dataplane().flow(&key).unwrap();
        assert!(flow.is_some(), "flow from port {sport} was evicted");
        let reply = b
            .dataplane()
            .flow(&reply_key4(CLIENT_V4, sport, i))
            .unwrap();
        assert!(reply.is_some(), "reply entry of port {sport} was evicted");
        let data = acked(CLIENT_V4, VIP3_V4, sport, 80).bytes();
        let (action, out) = run_xdp(b, &data, net.lbc).unwrap();
        assert_eq!(
            (action, backend_of(&out)),
            (XDP_REDIRECT, i),
            "port {sport}"
        );
    }
    handshake(b, net, CLIENT_V4, 30000);
}

/// The fixture's "three" and L7 services, plus `extra` top-level lines.
fn guarded_config(extra: &str) -> String {
    format!(
        "interfaces = [\"lbc\", \"lbb\"]\n{extra}\n{}\n[[service]]\nname = \"udp4\"\nvip = \"{VIP_V4}:53\"\nprotocol = \"udp\"\nring_size = 13\n[[service.backend]]\naddress = \"{}:5353\"\n[[service]]\nname = \"tcp6\"\nvip = \"[{VIP_V6}]:80\"\nring_size = 13\n[[service.backend]]\naddress = \"[{}]:8080\"\n[[service]]\nname = \"web-l7\"\nvip = \"{VIP_V4}:443\"\nmode = \"l7\"\n",
        three_config(&[1, 2, 3], "l4").replace("interfaces = [\"lbc\", \"lbb\"]\n", ""),
        backend_v4(1),
        backend_v6(1),
    )
}

#[test]
fn new_flows_are_rate_limited_per_source_prefix() {
    with_fixture(|b, net| {
        apply(b, &guarded_config("new_flow_limit = 3"));
        let syn = |src: Ipv4Addr, sport| Frame::tcp(src, VIP3_V4, sport, 80).syn().bytes();
        for sport in 1..=3 {
            assert_eq!(
                run_xdp(b, &syn(CLIENT_V4, sport), net.lbc).unwrap().0,
                XDP_REDIRECT
            );
        }
        // The fourth new flow from this /24 in the same second: dropped, as
        // is one from another address of the /24, and a UDP flow.
        let neighbour = Ipv4Addr::new(198, 18, 1, 77);
        let udp = Frame::udp(CLIENT_V4, VIP_V4, 6, 53).bytes();
        for frame in [syn(CLIENT_V4, 4), syn(neighbour, 5), udp] {
            let (action, out) = run_xdp(b, &frame, net.lbc).unwrap();
            assert_eq!((action, &out), (XDP_DROP, &frame));
        }
        assert_eq!(reason_count(b, Reason::DropRateLimited), 3);
        // Another /24 has its own allowance; the limited handshakes still
        // complete (their ACK creates nothing new); a retransmitted SYN of
        // one of them is not a new flow either.
        let other = Ipv4Addr::new(198, 18, 7, 2);
        assert_eq!(run_xdp(b, &syn(other, 1), net.lbc).unwrap().0, XDP_REDIRECT);
        assert_eq!(
            run_xdp(b, &syn(CLIENT_V4, 1), net.lbc).unwrap().0,
            XDP_REDIRECT
        );
        let ack = acked(CLIENT_V4, VIP3_V4, 1, 80).bytes();
        assert_eq!(run_xdp(b, &ack, net.lbc).unwrap().0, XDP_REDIRECT);
        assert!(
            b.dataplane()
                .flow(&key4(CLIENT_V4, 1, VIP3_V4))
                .unwrap()
                .is_some()
        );
        assert_eq!(reason_count(b, Reason::DropRateLimited), 3);

        // The next window (one second) admits again.
        std::thread::sleep(std::time::Duration::from_millis(1100));
        assert_eq!(
            run_xdp(b, &syn(CLIENT_V4, 7), net.lbc).unwrap().0,
            XDP_REDIRECT
        );

        // 0 turns the limit off.
        apply(b, &guarded_config("new_flow_limit = 0"));
        for sport in 100..120 {
            assert_eq!(
                run_xdp(b, &syn(CLIENT_V4, sport), net.lbc).unwrap().0,
                XDP_REDIRECT
            );
        }
        assert_eq!(reason_count(b, Reason::DropRateLimited), 3);
    });
}

#[test]
fn new_connections_to_an_l7_vip_share_the_source_prefix_limit() {
    with_fixture(|b, net| {
        apply(b, &guarded_config("new_flow_limit = 2"));
        let src = Ipv4Addr::new(198, 18, 9, 2);
        let to_l7 = |sport| Frame::tcp(src, VIP_V4, sport, 443);
        for sport in [1, 2] {
            let syn = to_l7(sport).syn().bytes();
            assert_eq!(run_xdp(b, &syn, net.lbc).unwrap(), (XDP_PASS, syn));
        }
        // The third SYN of the second is dropped, to the proxy as to an l4
        // VIP; the connections it has keep going.
        let syn = to_l7(3).syn().bytes();
        assert_eq!(run_xdp(b, &syn, net.lbc).unwrap(), (XDP_DROP, syn));
        let l4 = Frame::tcp(src, VIP3_V4, 4, 80).syn().bytes();
        assert_eq!(run_xdp(b, &l4, net.lbc).unwrap().0, XDP_DROP);
        let ack = acked(src, VIP_V4, 1, 443).bytes();
        assert_eq!(run_xdp(b, &ack, net.lbc).unwrap(), (XDP_PASS, ack));
        assert_eq!(reason_count(b, Reason::DropRateLimited), 2);
    });
}

#[test]
fn denied_sources_reach_no_vip_and_lose_their_established_flows() {
    with_fixture(|b, net| {
        apply(b, &guarded_config(""));
        let i = handshake(b, net, CLIENT_V4, 1000);
        let other = Ipv4Addr::new(198, 18, 7, 2);
        let syn = |src: Ipv4Addr, sport| Frame::tcp(src, VIP3_V4, sport, 80).syn().bytes();
        assert_eq!(
            run_xdp(b, &syn(other, 1000), net.lbc).unwrap().0,
            XDP_REDIRECT
        );
        let ack = |src| acked(src, VIP3_V4, 1000, 80).bytes();
        assert_eq!(run_xdp(b, &ack(other), net.lbc).unwrap().0, XDP_REDIRECT);

        apply(
            b,
            &guarded_config("deny = [\"198.18.1.0/24\", \"fd00:18:1::/64\"]"),
        );
        // The denied client's established flow is gone from FLOWS, and its
        // packets, new flows (IPv4, IPv6, UDP) and L7 traffic are dropped.
        let key = key4(CLIENT_V4, 1000, VIP3_V4);
        assert!(b.dataplane().flow(&key).unwrap().is_none());
        assert!(
            b.dataplane()
                .flow(&reply_key4(CLIENT_V4, 1000, i))
                .unwrap()
                .is_none()
        );
        let denied = [
            ack(CLIENT_V4),
            syn(CLIENT_V4, 1001),
            from_v6(CLIENT_V6),
            Frame::udp(CLIENT_V4, VIP_V4, 53, 53).bytes(),
            Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 443).syn().bytes(),
        ];
        for frame in &denied {
            let (action, out) = run_xdp(b, frame, net.lbc).unwrap();
            assert_eq!((action, &out), (XDP_DROP, frame));
        }
        assert_eq!(reason_count(b, Reason::DropDenied), denied.len() as u64);
        // Traffic not to a VIP is the stack's business.
        let not_vip = Frame::tcp(CLIENT_V4, backend_v4(1), CPORT, 8080)
            .syn()
            .bytes();
        assert_passed_untouched(b, net.lbc, &not_vip, "denied source, not a VIP");
        // Others keep their flows and make new ones.
        assert!(
            b.dataplane()
                .flow(&key4(other, 1000, VIP3_V4))
                .unwrap()
                .is_some()
        );
        assert_eq!(run_xdp(b, &ack(other), net.lbc).unwrap().0, XDP_REDIRECT);
        assert_eq!(
            run_xdp(b, &syn(other, 1001), net.lbc).unwrap().0,
            XDP_REDIRECT
        );

        // Taken off the list (a reload), the client is served again.
        apply(b, &guarded_config(""));
        handshake(b, net, CLIENT_V4, 1002);
        assert_eq!(reason_count(b, Reason::DropDenied), denied.len() as u64);
    });
}

#[test]
fn packets_over_the_egress_mtu_get_frag_needed_or_go_to_the_stack() {
    with_fixture(|b, net| {
        // The next-hop cache is per CPU: stay on one so the cached path is
        // the one taken where the test says so.
        lb_tests::pin_to_this_cpu();
        set_mtu(net.ns(), "lbb", 1400);
        set_mtu(net.ns(), "lbc", 1400);
        // A SYN to the VIP of `ip_len` bytes of IP, and the same NATed to backend 1.
        let to_vip = |ip_len| {
            Frame::tcp(CLIENT_V4, VIP_V4, CPORT, 80)
                .syn()
                .ip_len(ip_len)
        };
        let natted = |ip_len| {
            Frame::tcp(CLIENT_V4, backend_v4(1), CPORT, 8080)
                .syn()
                .ip_len(ip_len)
        };
        // IPv4 with DF, one byte over: answered from the VIP with the MTU,
        // whether the next hop comes from the FIB (first) or from the cache
        // (after a packet that fits filled it).
        let big = to_vip(1401).bytes();
        let too_big = icmp4_from_vip(frag_needed(1400), &big);
        let (action, out) = run_xdp(b, &big, net.lbc).unwrap();
        assert_eq!((action, &out), (XDP_TX, &too_big), "FIB");
        let fits = to_vip(1400).bytes();
        let (action, out) = run_xdp(b, &fits, net.lbc).unwrap();
        assert_eq!(action, XDP_REDIRECT, "1400 bytes fit");
        assert_eq!(out, natted(1400).to_backend(1).ttl(63).bytes());
        assert_checksums_valid(&out);
        let (action, out) = run_xdp(b, &big, net.lbc).unwrap();
        assert_eq!((action, &out), (XDP_TX, &too_big), "cache");
        assert_eq!(reason_count(b, Reason::TxTooBig), 2);

        // Without DF: NATed (TTL left to the stack) and passed, for the
        // stack to fragment.
        let no_df = to_vip(1500).df(false).bytes();
        let (action, out) = run_xdp(b, &no_df, net.lbc).unwrap();
        let expected = natted(1500).df(false).bytes();
        assert_eq!((action, &out), (XDP_PASS, &expected));
        assert_eq!(reason_count(b, Reason::PassTooBig), 1);

        // IPv6: "packet too big" from the VIP, quoting what fits in 1280 bytes.
        let big6 = Frame::tcp(CLIENT_V6, VIP_V6, CPORT, 80)
            .syn()
            .ip_len(1500)
            .bytes();
        let (action, out) = run_xdp(b, &big6, net.lbc).unwrap();
        let expected = icmp6_from_vip(Icmpv6Type::PacketTooBig { mtu: 1400 }, &big6);
        assert_eq!((action, &out), (XDP_TX, &expected));
        assert_eq!(reason_count(b, Reason::TxTooBig), 3);

        // A backend's oversized reply with DF: passed untouched; the stack
        // answers the backend.
        let reply = Frame::tcp(backend_v4(1), CLIENT_V4, 8080, CPORT)
            .syn()
            .from_backend(1)
            .ip_len(1500)
            .bytes();
        assert_passed_untouched(b, net.lbb, &reply, "oversized reply");
        assert_eq!(reason_count(b, Reason::PassTooBig), 2);
        assert_eq!(reason_count(b, Reason::DropFibFailed), 0);
    });
}

#[test]
fn a_connection_that_lost_its_flow_entries_is_taken_up_again_through_pending() {
    with_fixture(|b, net| {
        let i = handshake(b, net, CLIENT_V4, 2000);
        // Its FLOWS entries go, as with an eviction or fresh maps.
        let client = lb_userspace::config::IpPrefix::parse("198.18.1.2/32").unwrap();
        assert_eq!(b.dataplane().remove_flows_from(&[client]).unwrap(), 2);
        let key = key4(CLIENT_V4, 2000, VIP3_V4);
        // The client's next packet goes where Maglev says (the same backend)
        // and is only recorded in PENDING.
        let data = acked(CLIENT_V4, VIP3_V4, 2000, 80).bytes();
        let (action, out) = run_xdp(b, &data, net.lbc).unwrap();
        assert_eq!((action, backend_of(&out)), (XDP_REDIRECT, i));
        assert!(b.dataplane().flow(&key).unwrap().is_none());
        assert!(b.dataplane().pending_flow(&key).unwrap().is_some());
        // The backend's answer (no SYN) is translated back from PENDING.
        let answer = acked(backend_v4(i), CLIENT_V4, 8080, 2000)
            .from_backend(i)
            .bytes();
        let (action, out) = run_xdp(b, &answer, net.lbb).unwrap();
        let expected = acked(VIP3_V4, CLIENT_V4, 80, 2000)
            .to_client()
            .ttl(63)
            .bytes();
        assert_eq!((action, &out), (XDP_REDIRECT, &expected));
        // The client's following packet confirms it: back in FLOWS.
        assert_eq!(run_xdp(b, &data, net.lbc).unwrap().0, XDP_REDIRECT);
        assert!(b.dataplane().flow(&key).unwrap().is_some());
        assert!(b.dataplane().pending_flow(&key).unwrap().is_none());
    });
}
