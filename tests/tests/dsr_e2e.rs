//! End to end in the DSR modes (`forwarding = "ipip"` and `"l2"`): real
//! sockets in the client namespace, the agent in the balancer namespace,
//! backends answering the client directly through the switch (the lab's
//! DSR return path), `lb decap` on the backends for ipip.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_tests::RunningLab;
use lb_userspace::lab::{
    client::{TcpSession, http_download, tcp_ask},
    run_in_ns,
    services::{self, Forwarding, TCP4},
};

const T: Duration = Duration::from_secs(3);
/// The 10 MB download of the issue.
const DOWNLOAD: u64 = 10 * 1024 * 1024;

/// `n` fresh TCP connections (or UDP queries, each from its own port) to
/// `vip` from the client, tallied by who answered.
fn tally(lab: &RunningLab, vip: SocketAddr, n: usize, udp: bool) -> BTreeMap<String, usize> {
    lb_tests::tally(lab.lab.client_ns(), vip, n, udp)
}

/// Asserts the 1:2:3 split of the lab's three backends.
fn assert_weighted(tally: &BTreeMap<String, usize>, what: &str) {
    lb_tests::assert_weighted(tally, &[1, 2, 3], what);
}

/// Downloads `DOWNLOAD` bytes from `vip` and checks the count.
fn download(lab: &RunningLab, vip: SocketAddr) {
    let (status, bytes) = run_in_ns(lab.lab.client_ns(), move || {
        http_download(vip, &format!("/bytes/{DOWNLOAD}"), Duration::from_secs(30))
    })
    .expect("client namespace")
    .unwrap_or_else(|e| panic!("download from {vip}: {e}"));
    assert_eq!((status, bytes), (200, DOWNLOAD), "download from {vip}");
}

fn reason(lab: &RunningLab, reason: &str) -> u64 {
    lab.metric("lb_xdp_packets_total", &format!("reason=\"{reason}\""))
        .expect("metrics")
}

/// Weighted spread over TCP and UDP, IPv4 and IPv6; every answer reaches the
/// client by the switch, none crosses the balancer; 10 MB downloads.
fn spread_and_bypass(forwarding: Forwarding, tag: &str) {
    let lab = RunningLab::start_dsr(tag, 3, &[1, 2, 3], forwarding, None, None).expect("lab");
    let tcp4 = tally(&lab, services::vip_tcp4(), 1000, false);
    assert_weighted(&tcp4, "tcp4");
    assert_weighted(&tally(&lab, services::vip_tcp6(), 300, false), "tcp6");
    assert_weighted(&tally(&lab, services::vip_udp4(), 300, true), "udp4");
    assert_weighted(&tally(&lab, services::vip_udp6(), 300, true), "udp6");
    download(&lab, services::vip_tcp4());
    download(&lab, services::vip_tcp6());

    let paths = lab.lab.vip_reply_paths().expect("nft counters");
    println!("{forwarding:?}: {paths:?}");
    assert_eq!(
        paths.via_balancer, 0,
        "no answer came back through the balancer"
    );
    assert_eq!(
        paths.balancer_lbb, 0,
        "the balancer saw no packet from a VIP"
    );
    assert!(
        paths.via_switch > 1900 + 2 * DOWNLOAD / 1500,
        "every answer came by the switch: {paths:?}"
    );
    for r in ["tx_reply", "redirect_reply"] {
        assert_eq!(
            reason(&lab, r),
            0,
            "{r}: the data plane translated no reply"
        );
    }
    assert!(
        reason(&lab, "redirect_forward") >= 3 * 1000,
        "client packets were forwarded"
    );
    assert_eq!(lab.lab.kernel_forwarded_packets().unwrap(), 0);
}

#[test]
fn ipip_spreads_by_weight_and_answers_bypass_the_balancer() {
    spread_and_bypass(Forwarding::Ipip, "dsri");
}

#[test]
fn l2_spreads_by_weight_and_answers_bypass_the_balancer() {
    spread_and_bypass(Forwarding::L2, "dsrl");
}

/// A client path with a smaller MTU than the backends': the switch's
/// "fragmentation needed" / "packet too big", addressed to the VIP, must
/// reach the backend that sends the download, through the balancer.
fn path_mtu(forwarding: Forwarding, tag: &str) {
    let lab = RunningLab::start_dsr(tag, 3, &[1, 1, 1], forwarding, None, Some(1280)).expect("lab");
    download(&lab, services::vip_tcp4());
    download(&lab, services::vip_tcp6());
    let sent_on = reason(&lab, "tx_icmp_to_backend") + reason(&lab, "redirect_icmp_to_backend");
    assert!(
        sent_on >= 2,
        "the switch's errors went to the backends: {sent_on}"
    );
}

#[test]
fn ipip_path_mtu_discovery_reaches_the_backend() {
    path_mtu(Forwarding::Ipip, "dsrpi");
}

#[test]
fn l2_path_mtu_discovery_reaches_the_backend() {
    path_mtu(Forwarding::L2, "dsrpl");
}

/// Waits (at most 10 s) until 30 new connections in a row are answered.
fn wait_until_none_refused(lab: &RunningLab, vip: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let refused = run_in_ns(lab.lab.client_ns(), move || {
            (0..30).filter(|_| tcp_ask(vip, T).is_err()).count()
        })
        .unwrap();
        if refused == 0 {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "a stopped backend still gets connections: {refused} of 30 refused"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn be(i: usize) -> String {
    SocketAddr::new(
        lb_userspace::lab::backend_v4(i).into(),
        services::VIP_TCP_PORT,
    )
    .to_string()
}

#[test]
fn l2_new_connections_from_reused_ports_follow_the_table() {
    let lab =
        RunningLab::start_dsr("dsrp", 3, &[1, 1, 1], Forwarding::L2, None, None).expect("lab");
    lb_tests::assert_reused_ports_follow_the_table(&lab, services::vip_tcp4(), TCP4, |name| {
        be(name[2..].parse().expect("a backend's name"))
    });
}

#[test]
fn ipip_health_checks_drain_and_hitless_restarts_keep_working() {
    let mut lab = RunningLab::start_dsr(
        "dsrh",
        3,
        &[1, 1, 1],
        Forwarding::Ipip,
        Some("interval = \"200ms\"\nrise = 1\nfall = 2"),
        None,
    )
    .expect("lab");
    let vip = services::vip_tcp4();
    // Long-lived connections, one per backend at least.
    let sessions = run_in_ns(lab.lab.client_ns(), move || {
        let mut sessions: Vec<(TcpSession, String)> = Vec::new();
        for _ in 0..60 {
            let mut s = TcpSession::connect(vip, T).expect("connect");
            let name = s.ask().expect("ask");
            sessions.push((s, name));
        }
        sessions
    })
    .unwrap();

    // Health: be2's server stops; until the checks notice, connections
    // sent there are refused; then none is.
    lab.lab.stop_backend_server(2).expect("stop be2's server");
    wait_until_none_refused(&lab, vip);

    // Drain: be1 takes no new connection but keeps its open ones.
    assert!(lab.lb(&["drain", TCP4, &be(1)]).status.success());
    let t = tally(&lab, vip, 60, false);
    assert_eq!(t.keys().collect::<Vec<_>>(), ["be3"], "{t:?}");

    // Hitless restarts: the open connections to be1 and be3 keep answering.
    for i in 0..3 {
        lab.restart_agent()
            .unwrap_or_else(|e| panic!("restart {i}: {e:#}"));
    }
    let (kept, lost) = run_in_ns(lab.lab.client_ns(), move || {
        let (mut kept, mut lost) = (0, Vec::new());
        for (mut s, name) in sessions {
            if name == "be2" {
                continue; // its server is gone
            }
            match s.ask() {
                Ok(n) if n == name => kept += 1,
                other => lost.push(format!("{name}: {other:?}")),
            }
        }
        (kept, lost)
    })
    .unwrap();
    assert!(lost.is_empty(), "connections lost: {lost:?}");
    assert!(kept > 20, "{kept} connections checked");
    // A restarted agent starts its checks afresh (backends up, as HAProxy's
    // reload does): be2 is taken out again once they fail.
    wait_until_none_refused(&lab, vip);
    let t = tally(&lab, vip, 30, false);
    assert_eq!(
        t.keys().collect::<Vec<_>>(),
        ["be3"],
        "after restarts: {t:?}"
    );
}
