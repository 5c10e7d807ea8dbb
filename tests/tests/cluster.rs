//! Several balancer nodes behind an ECMP router (the lab's cluster
//! topology, `LabOptions::with_cluster`): the router learns the VIPs from
//! every node's BIRD over BGP and spreads flows over the nodes by its L4
//! hash; every node runs `lb run` with the same ipip config, and the
//! backends (`lb decap`) answer the client through the router. Each node's
//! agent announces its VIPs through its BIRD (`[bgp]`).

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::time::{Duration, Instant};

use aya::maps::{Array, HashMap, Map, MapData};
use lb_common::maps::{Backend, MAP_BACKENDS, MAP_RINGS, MAP_VIPS, Ring, VipKey, VipMeta};
use lb_tests::{RunningCluster, cluster::Prober};
use lb_userspace::lab::{
    VIP_V4, VIP_V6,
    cluster::{BFD_INTERVAL, BFD_MULTIPLIER, node_v4},
    services::{self, Forwarding, TCP4, TCP6},
};

const VIPS: [IpAddr; 2] = [IpAddr::V4(VIP_V4), IpAddr::V6(VIP_V6)];
/// The three backends' weights.
const WEIGHTS: [u32; 3] = [1, 2, 3];

/// Two nodes running the ipip services over three backends weighted 1:2:3
/// (with `health`, if given), their agents announcing both VIPs, the router
/// holding both next hops.
fn cluster_with(tag: &str, health: Option<&str>) -> RunningCluster {
    let c = RunningCluster::start(tag, 2, &WEIGHTS, Forwarding::Ipip, health).expect("cluster");
    for vip in VIPS {
        c.lab
            .wait_router_next_hops(vip, 2, Duration::from_secs(5))
            .expect("both nodes' routes in the router");
    }
    c
}

fn cluster(tag: &str) -> RunningCluster {
    cluster_with(tag, None)
}

/// `n` new TCP connections from the client, tallied by backend name.
fn tally(c: &RunningCluster, vip: SocketAddr, n: usize) -> BTreeMap<String, u64> {
    lb_tests::tally(c.lab.client_ns(), vip, n, false)
        .into_iter()
        .map(|(name, count)| (name, count as u64))
        .collect()
}

/// Node `node`'s connections in its flow table per backend name (`be{i}`).
fn flows(c: &RunningCluster, node: usize, service: &str) -> BTreeMap<String, u64> {
    let backends = c.backends(node, service).expect("show backends");
    let lab_backends = c.lab.backends();
    backends
        .into_iter()
        .map(|b| {
            let name = lab_backends
                .iter()
                .find(|lb| {
                    b.address.ip() == IpAddr::V4(lb.v4) || b.address.ip() == IpAddr::V6(lb.v6)
                })
                .map(|lb| lb.name.clone())
                .unwrap_or_else(|| b.address.to_string());
            (name, b.active_flows)
        })
        .collect()
}

/// `after - before`, per key.
fn delta(before: &BTreeMap<String, u64>, after: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0)))
        .collect()
}

/// Both nodes announce: the router holds one multipath route with both
/// nodes; 1 000 new connections are spread over the nodes (each node's
/// flow table, per backend) and by weight over the backends, and every
/// answer comes back through the router, never through a node.
#[test]
fn new_connections_spread_over_both_nodes_and_by_weight() {
    let c = cluster("clus");
    for vip in VIPS {
        let mut hops = c.lab.router_next_hops(vip).expect("route");
        hops.sort();
        let want: Vec<IpAddr> = c
            .lab
            .nodes()
            .iter()
            .map(|n| {
                if vip.is_ipv4() {
                    IpAddr::V4(n.v4)
                } else {
                    IpAddr::V6(n.v6)
                }
            })
            .collect();
        assert_eq!(hops, want, "the router's next hops to {vip}");
    }
    let sessions = c.lab.router_protocols().expect("router protocols");
    assert_eq!(
        sessions.iter().filter(|p| p.is_established()).count(),
        2,
        "{sessions:?}"
    );

    let before = [flows(&c, 1, TCP4), flows(&c, 2, TCP4)];
    let started = Instant::now();
    let names = tally(&c, services::vip_tcp4(), 1000);
    let elapsed = started.elapsed();
    let per_node = [
        delta(&before[0], &flows(&c, 1, TCP4)),
        delta(&before[1], &flows(&c, 2, TCP4)),
    ];
    let totals: Vec<u64> = per_node.iter().map(|m| m.values().sum()).collect();
    println!(
        "1000 connections in {elapsed:?}: backends {names:?}; node 1 {:?} ({}), node 2 {:?} ({})",
        per_node[0], totals[0], per_node[1], totals[1]
    );
    lb_tests::assert_weighted(&names, &WEIGHTS, "answers");
    // Each connection is in exactly one node's flow table (a reused client
    // port may fold two into one entry).
    let sum = totals[0] + totals[1];
    assert!(
        (990..=1000).contains(&sum),
        "flows on the nodes: {totals:?}"
    );
    for (i, total) in totals.iter().enumerate() {
        assert!(
            (350..=650).contains(total),
            "node {}: {total} of 1000 connections ({totals:?})",
            i + 1
        );
        lb_tests::assert_weighted(&per_node[i], &WEIGHTS, &format!("node {}", i + 1));
    }
    // The nodes agree with the client on where every connection went.
    for (name, &count) in &names {
        let on_nodes = per_node[0].get(name).unwrap_or(&0) + per_node[1].get(name).unwrap_or(&0);
        assert!(
            on_nodes.abs_diff(count) <= 10,
            "{name}: client saw {count}, nodes hold {on_nodes}"
        );
    }

    // IPv6 goes over both nodes as well.
    let before6 = [flows(&c, 1, TCP6), flows(&c, 2, TCP6)];
    let names6 = tally(&c, services::vip_tcp6(), 200);
    assert_eq!(names6.values().sum::<u64>(), 200);
    for node in 1..=2 {
        let new: u64 = delta(&before6[node - 1], &flows(&c, node, TCP6))
            .values()
            .sum();
        assert!(new >= 40, "node {node} got {new} of 200 IPv6 connections");
    }

    let paths = c.lab.vip_reply_paths().expect("nft counters");
    assert_eq!(
        paths.via_balancer, 0,
        "answers came through node 1: {paths:?}"
    );
    assert!(
        paths.via_switch >= 1200 * 3,
        "answers by the router: {paths:?}"
    );
    for node in 1..=2 {
        assert_eq!(
            c.lab.node_kernel_forwarded_packets(node).unwrap(),
            0,
            "node {node}'s kernel forwarded what XDP should have"
        );
    }
}

/// The bytes of a plain value (map keys and values are `repr(C)` without padding).
fn bytes_of<T: aya::Pod>(value: &T) -> Vec<u8> {
    // SAFETY: `T: Pod` is plain old data; the slice lives only while `value` does.
    unsafe {
        std::slice::from_raw_parts((value as *const T).cast::<u8>(), std::mem::size_of::<T>())
    }
    .to_vec()
}

/// Every entry of a pinned hash map as (key bytes, value bytes), sorted.
fn pinned_hash<K: aya::Pod, V: aya::Pod>(pin_dir: &Path, name: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let path = pin_dir.join(name);
    let data = MapData::from_pin(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let map: HashMap<MapData, K, V> =
        HashMap::try_from(Map::from_map_data(data).expect("map")).expect("a hash map");
    let mut entries: Vec<(Vec<u8>, Vec<u8>)> = map
        .iter()
        .map(|entry| {
            let (k, v) = entry.expect("reading the map");
            (bytes_of(&k), bytes_of(&v))
        })
        .collect();
    entries.sort();
    entries
}

/// Node `node`'s pinned RINGS, VIPS and BACKENDS.
struct Tables {
    rings: Vec<(Vec<u8>, Vec<u8>)>,
    vips: Vec<(Vec<u8>, Vec<u8>)>,
    backends: Vec<Vec<u8>>,
}

fn tables(c: &RunningCluster, node: usize) -> Tables {
    let dir = c.lab.node_pin_dir(node).expect("pin dir");
    // A Ring is 256 KiB, read by value: a thread with room for a few.
    std::thread::Builder::new()
        .stack_size(64 << 20)
        .spawn(move || {
            let path = dir.join(MAP_BACKENDS);
            let data = MapData::from_pin(&path).expect("BACKENDS");
            let backends: Array<MapData, Backend> =
                Array::try_from(Map::from_map_data(data).expect("map")).expect("an array");
            Tables {
                rings: pinned_hash::<u32, Ring>(&dir, MAP_RINGS),
                vips: pinned_hash::<VipKey, VipMeta>(&dir, MAP_VIPS),
                backends: (0..backends.len())
                    .map(|i| bytes_of(&backends.get(&i, 0).expect("BACKENDS entry")))
                    .collect(),
            }
        })
        .expect("thread")
        .join()
        .expect("reading the pinned maps")
}

/// Asserts both nodes' pinned tables are byte for byte the same; returns node 1's rings.
fn assert_identical(c: &RunningCluster, what: &str) -> Vec<(Vec<u8>, Vec<u8>)> {
    let (one, two) = (tables(c, 1), tables(c, 2));
    assert_eq!(one.vips, two.vips, "{what}: VIPS (VIP -> id) differ");
    assert!(
        one.backends == two.backends,
        "{what}: BACKENDS (id -> address) differ"
    );
    assert_eq!(
        one.rings.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        two.rings.iter().map(|(k, _)| k).collect::<Vec<_>>(),
        "{what}: RINGS hold different VIP ids"
    );
    for ((id, a), (_, b)) in one.rings.iter().zip(&two.rings) {
        assert!(a == b, "{what}: the Maglev tables of VIP id {id:?} differ");
    }
    // tcp4, udp4, tcp6, udp6, each with a full table (and the l7 service's).
    let size = |ring: &[u8]| u32::from_ne_bytes(ring[..4].try_into().unwrap());
    let full = one
        .rings
        .iter()
        .filter(|(_, r)| size(r) == lb_common::DEFAULT_RING_SIZE)
        .count();
    assert_eq!(full, 4, "{what}: {} rings", one.rings.len());
    println!(
        "{what}: {} rings ({full} of {} entries, {} bytes each) identical on both nodes",
        one.rings.len(),
        lb_common::DEFAULT_RING_SIZE,
        one.rings[0].1.len()
    );
    one.rings
}

/// The same backend set gives both nodes byte-identical Maglev tables (and
/// the same VIP and backend ids they refer to), also after the same
/// runtime change on each.
#[test]
fn both_nodes_build_byte_identical_maglev_tables() {
    let c = RunningCluster::start("clum", 2, &WEIGHTS, Forwarding::Ipip, None).expect("cluster");
    let first = assert_identical(&c, "from the config");
    let be1 = SocketAddr::new(
        lb_userspace::lab::backend_v4(1).into(),
        services::VIP_TCP_PORT,
    )
    .to_string();
    for node in 1..=2 {
        assert!(c.lb(node, &["weight", TCP4, &be1, "5"]).status.success());
    }
    let changed = assert_identical(&c, "after `lb weight` on both");
    assert_ne!(first, changed, "the weight change changed no table");
}

/// Client packets node `node` forwarded for the TCP VIP's backends.
fn node_packets(c: &RunningCluster, node: usize) -> u64 {
    c.backends(node, TCP4)
        .unwrap()
        .iter()
        .map(|b| b.packets)
        .sum()
}

/// 100 long-lived connections; node 1 is unplugged: BFD withdraws it from
/// the router within a fraction of a second and every connection goes on
/// answering from its backend through node 2 (same Maglev table); node 1
/// comes back (BGP and BFD up, two next hops): no connection breaks. The
/// connections are asked in rounds all along, from another thread.
#[test]
fn connections_survive_a_node_failing_and_coming_back() {
    let c = cluster("cluf");
    let v4 = IpAddr::V4(VIP_V4);
    let prober = Prober::start(&c);
    let on_node1: u64 = flows(&c, 1, TCP4).values().sum();
    assert!(
        on_node1 >= 20,
        "node 1 holds {on_node1} of the 100 connections"
    );
    let node2_before = node_packets(&c, 2);

    c.lab.disconnect_node(1).expect("unplug node 1");
    let withdrawn = c
        .lab
        .wait_router_next_hops(v4, 1, Duration::from_secs(10))
        .expect("node 1 withdrawn");
    assert_eq!(
        c.lab.router_next_hops(v4).unwrap(),
        [IpAddr::V4(node_v4(2))]
    );
    let lb1 = c.lab.router_protocols().unwrap();
    assert!(
        lb1.iter().any(|p| p.name == "lb1" && !p.is_established()),
        "{lb1:?}"
    );
    let detect = BFD_INTERVAL * BFD_MULTIPLIER;
    println!(
        "node 1 unplugged: withdrawn from the router after {withdrawn:?} (BFD detection time {detect:?})"
    );
    assert!(
        withdrawn < Duration::from_secs(1),
        "withdrawal took {withdrawn:?}, BFD should take about {detect:?}"
    );
    prober.wait_rounds(2);
    let node2_after = node_packets(&c, 2);
    assert!(
        node2_after - node2_before >= 200,
        "two rounds of 100 requests went through node 2 ({node2_before} -> {node2_after} packets)"
    );

    c.lab.reconnect_node(1).expect("plug node 1 back in");
    let ready = c
        .lab
        .wait_cluster_ready(Duration::from_secs(20))
        .expect("BGP and BFD up again");
    let back = c
        .lab
        .wait_router_next_hops(v4, 2, Duration::from_secs(10))
        .expect("node 1 announced again");
    println!("node 1 plugged back in: sessions up after {ready:?}, two next hops after {back:?}");
    let node1_before = node_packets(&c, 1);
    prober.wait_rounds(2);
    let node1_after = node_packets(&c, 1);
    assert!(
        node1_after > node1_before,
        "node 1 takes part again ({node1_before} -> {node1_after} packets)"
    );
    let report = prober.finish();
    assert!(report.failures.is_empty(), "connections broke: {report:?}");
}

/// `lb drain-node` on node 1: its agent withdraws both VIPs (the router
/// keeps node 2 only), no new connection reaches node 1, the 100
/// established connections keep answering (through node 2 now);
/// `lb undrain-node` brings node 1 back.
#[test]
fn a_drained_node_takes_no_new_flows_and_breaks_none() {
    let c = cluster("clud");
    let prober = Prober::start(&c);
    let started = Instant::now();
    assert!(c.lb(1, &["drain-node"]).status.success());
    for vip in VIPS {
        c.lab
            .wait_router_next_hops(vip, 1, Duration::from_secs(10))
            .expect("node 1 withdrawn");
        assert_eq!(c.lab.router_next_hops(vip).unwrap().len(), 1);
    }
    println!(
        "drain-node -> withdrawn on the router in {:?}",
        started.elapsed()
    );
    let out = c.lb(1, &["show", "bgp", "--json"]);
    let info: lb_userspace::control::protocol::BgpInfo =
        serde_json::from_slice(&out.stdout).expect("show bgp --json");
    assert!(
        info.drained && info.vips.iter().all(|v| !v.announced),
        "{info:?}"
    );
    assert_eq!(info.speaker.in_bird, Some(Vec::new()), "{info:?}");
    // In-flight rounds may still have crossed node 1; from here none does.
    prober.wait_rounds(1);
    let node1 = node_packets(&c, 1);
    let before = flows(&c, 2, TCP4).values().sum::<u64>();
    let names = tally(&c, services::vip_tcp4(), 200);
    assert_eq!(names.values().sum::<u64>(), 200);
    prober.wait_rounds(2);
    assert_eq!(
        node_packets(&c, 1),
        node1,
        "the drained node still received packets"
    );
    assert!(flows(&c, 2, TCP4).values().sum::<u64>() >= before + 190);

    assert!(c.lb(1, &["undrain-node"]).status.success());
    for vip in VIPS {
        c.lab
            .wait_router_next_hops(vip, 2, Duration::from_secs(10))
            .expect("node 1 announced again");
    }
    prober.wait_rounds(2);
    let report = prober.finish();
    assert!(report.failures.is_empty(), "connections broke: {report:?}");
}

/// Health checks fail on node 1 only, for every backend's IPv6 address:
/// node 1 withdraws the IPv6 VIP (its services have no backend there) and
/// keeps the IPv4 one; node 2 announces both. When the checks pass again,
/// node 1 announces the IPv6 VIP again.
#[test]
fn a_vip_down_on_one_node_is_withdrawn_by_that_node_only() {
    const HEALTH: &str =
        "kind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 1\nfall = 1";
    let c = cluster_with("cluh", Some(HEALTH));
    let v6 = IpAddr::V6(VIP_V6);
    let node1 = c.lab.node_ns(1).unwrap();
    // Only the checks (the node's own connections) are refused; XDP's
    // forwarded packets never meet this hook.
    c.lab
        .nft(
            &node1,
            "table inet lbhcblock {\n chain out {\n  type filter hook output priority 0;\n  ip6 daddr fd00:18:2::/64 meta l4proto tcp reject with tcp reset\n }\n}\n",
        )
        .expect("nft");
    let started = Instant::now();
    c.lab
        .wait_router_next_hops(v6, 1, Duration::from_secs(10))
        .expect("node 1 withdraws the IPv6 VIP");
    println!(
        "health down on node 1 -> IPv6 VIP withdrawn there in {:?}",
        started.elapsed()
    );
    assert_eq!(
        c.lab.router_next_hops(v6).unwrap(),
        [IpAddr::V6(c.lab.node(2).unwrap().v6)]
    );
    assert_eq!(c.lab.router_next_hops(IpAddr::V4(VIP_V4)).unwrap().len(), 2);
    let names = tally(&c, services::vip_tcp6(), 50);
    assert_eq!(
        names.values().sum::<u64>(),
        50,
        "IPv6 still served by node 2"
    );

    c.lab
        .nft(&node1, "delete table inet lbhcblock\n")
        .expect("nft");
    c.lab
        .wait_router_next_hops(v6, 2, Duration::from_secs(10))
        .expect("node 1 announces the IPv6 VIP again");
}
