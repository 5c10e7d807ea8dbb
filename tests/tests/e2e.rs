//! End to end: real sockets in a client namespace, the agent attached in the
//! balancer namespace, real backend servers. The balancer's kernel forwarding
//! path drops and counts everything (nftables), so traffic that arrives was
//! forwarded by XDP.

use std::collections::BTreeMap;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use lb_tests::RunningLab;
use lb_userspace::lab::{
    client::{TcpSession, tcp_ask, udp_ask},
    run_in_ns,
    services::{self, TCP4, UDP4},
};

const T: Duration = Duration::from_secs(3);

/// Opens `n` fresh TCP connections to `vip` from the client and tallies who answered.
fn tally(lab: &RunningLab, vip: SocketAddr, n: usize) -> BTreeMap<String, usize> {
    lb_tests::tally(lab.lab.client_ns(), vip, n, false)
}

#[test]
fn tcp_connections_reach_every_backend_in_proportion_to_weight() {
    let lab = RunningLab::start("e2ew", 3, &[1, 2, 3]).expect("lab");
    let n = 900;
    let tally = tally(&lab, services::vip_tcp4(), n);
    lb_tests::assert_weighted(&tally, &[1, 2, 3], "tcp4");
    assert_eq!(
        lab.lab.kernel_forwarded_packets().unwrap(),
        0,
        "the kernel forwarded nothing: XDP did"
    );
    let redirected = lab
        .metric("lb_xdp_packets_total", "reason=\"redirect_forward\"")
        .unwrap();
    assert!(
        redirected >= n as u64 * 3,
        "at least SYN, ACK, data per connection: {redirected}"
    );
}

#[test]
fn long_lived_connections_keep_their_backend_when_a_backend_is_added() {
    let mut lab = RunningLab::start("e2es", 3, &[1, 1, 1]).expect("lab");
    let vip = services::vip_tcp4();
    let (sessions, before) = run_in_ns(lab.lab.client_ns(), move || {
        let mut sessions = Vec::new();
        let mut names = Vec::new();
        for _ in 0..30 {
            let mut s = TcpSession::connect(vip, T).expect("connect");
            names.push(s.ask().expect("ask"));
            sessions.push(s);
        }
        (sessions, names)
    })
    .unwrap();
    let new = lab.lab.add_backend().expect("add backend");
    assert_eq!(new, 4);
    lab.reload(&[1, 1, 1, 1]).expect("reload");
    // Wait (bounded) until new connections reach the new backend.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = tally(&lab, vip, 20);
        if t.contains_key("be4") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "be4 never got a connection after reload: {t:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let after = run_in_ns(lab.lab.client_ns(), move || {
        let mut sessions = sessions;
        sessions
            .iter_mut()
            .map(|s| s.ask().expect("long-lived connection still works"))
            .collect::<Vec<_>>()
    })
    .unwrap();
    assert_eq!(
        before, after,
        "every long-lived connection stayed on its backend"
    );
    let tally = tally(&lab, vip, 600);
    lb_tests::assert_weighted(&tally, &[1, 1, 1, 1], "after the addition");
    assert_eq!(lab.lab.kernel_forwarded_packets().unwrap(), 0);
}

#[test]
fn udp_and_ipv6_services_work() {
    let lab = RunningLab::start("e2eu", 3, &[1, 1, 1]).expect("lab");
    let seen = run_in_ns(lab.lab.client_ns(), || {
        let mut seen = BTreeMap::<&str, BTreeMap<String, usize>>::new();
        for _ in 0..60 {
            for (what, vip) in [
                ("udp4", services::vip_udp4()),
                ("udp6", services::vip_udp6()),
            ] {
                let name = udp_ask(vip, T).unwrap_or_else(|e| panic!("{what}: {e}"));
                *seen.entry(what).or_default().entry(name).or_default() += 1;
            }
            let name = tcp_ask(services::vip_tcp6(), T).expect("tcp6");
            *seen.entry("tcp6").or_default().entry(name).or_default() += 1;
        }
        seen
    })
    .unwrap();
    println!("{seen:?}");
    for (what, names) in &seen {
        assert_eq!(
            names.len(),
            3,
            "{what} reached all three backends: {names:?}"
        );
    }
    assert_eq!(lab.lab.kernel_forwarded_packets().unwrap(), 0);
}

#[test]
fn counters_match_the_traffic_sent() {
    let lab = RunningLab::start("e2ec", 3, &[1, 1, 1]).expect("lab");
    let vip = services::vip_udp4();
    let datagrams = 50u64;
    let payload = [b'x'; 100];
    run_in_ns(lab.lab.client_ns(), move || {
        let sock = UdpSocket::bind("0.0.0.0:0").unwrap();
        sock.set_read_timeout(Some(T)).unwrap();
        let mut buf = [0u8; 256];
        for i in 0..datagrams {
            sock.send_to(&payload, vip).unwrap();
            let (n, from) = sock
                .recv_from(&mut buf)
                .unwrap_or_else(|e| panic!("reply {i}: {e}"));
            assert_eq!(from, vip, "replies come from the VIP");
            assert!(n > 0);
        }
    })
    .unwrap();
    let frame = 14 + 20 + 8 + payload.len() as u64;
    let service = format!("service=\"{UDP4}\",vip=\"{vip}\"");
    assert_eq!(
        lab.metric("lb_service_packets_total", &service).unwrap(),
        datagrams
    );
    assert_eq!(
        lab.metric("lb_service_bytes_total", &service).unwrap(),
        datagrams * frame
    );
    let tcp = format!("service=\"{TCP4}\",vip=\"{}\"", services::vip_tcp4());
    assert_eq!(lab.metric("lb_service_packets_total", &tcp).unwrap(), 0);
    let text = lab.metrics().unwrap();
    let backend_udp: u64 = lab
        .lab
        .backends()
        .iter()
        .map(|b| {
            let labels = format!(
                "service=\"{UDP4}\",backend=\"{}:{}\"",
                b.v4,
                lb_userspace::lab::UDP_PORT
            );
            lb_userspace::metrics::sample(&text, "lb_backend_packets_total", &labels).unwrap_or(0)
        })
        .sum();
    assert_eq!(backend_udp, datagrams, "per-backend counters add up");
    assert_eq!(
        lb_userspace::metrics::sample(&text, "lb_xdp_packets_total", "reason=\"redirect_forward\""),
        Some(datagrams)
    );
    assert_eq!(
        lb_userspace::metrics::sample(&text, "lb_xdp_packets_total", "reason=\"redirect_reply\""),
        Some(datagrams)
    );
    assert_eq!(lab.lab.kernel_forwarded_packets().unwrap(), 0);
}

#[test]
fn bad_reload_keeps_the_running_config_and_stop_detaches() {
    let mut lab = RunningLab::start("e2er", 2, &[1, 1]).expect("lab");
    let vip = services::vip_tcp4();
    std::fs::write(
        &lab.config_path,
        "interfaces = [\"lbc\"]\n[[service]]\nname = \"broken\"\n",
    )
    .unwrap();
    // SAFETY: kill(2) on the agent this lab started.
    assert_eq!(unsafe { libc::kill(lab.agent as i32, libc::SIGHUP) }, 0);
    std::thread::sleep(Duration::from_millis(500));
    let t = tally(&lab, vip, 40);
    assert_eq!(
        t.len(),
        2,
        "both backends still serve after a rejected reload: {t:?}"
    );

    assert!(lab.lb(&["stop", "--detach"]).status.success());
    let status = lab.lab.stop(lab.agent).unwrap().expect("agent exit status");
    assert!(
        status.success(),
        "agent exits cleanly on `lb stop --detach`: {status}"
    );
    assert!(
        !lab.lab.agent_pin_dir().exists(),
        "its pinned state is gone"
    );
    let link = std::process::Command::new("ip")
        .args(["-n", lab.lab.balancer_ns(), "link", "show", "lbc"])
        .output()
        .unwrap();
    let link = String::from_utf8_lossy(&link.stdout);
    assert!(!link.contains("prog/xdp"), "XDP program detached: {link}");
    let refused = run_in_ns(lab.lab.client_ns(), move || {
        tcp_ask(vip, Duration::from_secs(1))
    })
    .unwrap();
    assert!(
        refused.is_err(),
        "without the program nothing answers for the VIP (the balancer has no route for it)"
    );
}

#[test]
fn ping_of_a_vip_is_answered_and_a_port_without_a_service_dropped() {
    let lab = RunningLab::start("e2ep", 1, &[1]).expect("lab");
    // iputils' ping, as an operator checks a VIP; the stack has no such
    // address (and forwards nothing here), so only XDP can answer.
    for vip in [services::vip_tcp4().ip(), services::vip_tcp6().ip()] {
        let out = std::process::Command::new("ip")
            .args([
                "netns",
                "exec",
                lab.lab.client_ns(),
                "ping",
                "-n",
                "-c",
                "3",
            ])
            .args(["-i", "0.2", "-W", "2", &vip.to_string()])
            .output()
            .expect("run ping");
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "ping {vip}: {text}");
        assert!(text.contains("3 received"), "ping {vip}: {text}");
        assert!(text.contains(&format!("from {vip}")), "ping {vip}: {text}");
    }
    assert_eq!(
        lab.metric("lb_xdp_packets_total", "reason=\"tx_echo_reply\"")
            .unwrap(),
        6
    );
    // A port no service has, on the IPv6 VIP (no l7 service shares that
    // address): dropped by XDP, not handed to a stack that would route it on.
    let vip6 = SocketAddr::new(services::vip_tcp6().ip(), 9);
    run_in_ns(lab.lab.client_ns(), move || {
        let sock = UdpSocket::bind("[::]:0").unwrap();
        for _ in 0..3 {
            sock.send_to(b"anyone?", vip6).unwrap();
        }
    })
    .unwrap();
    let dropped = || {
        lab.metric("lb_xdp_packets_total", "reason=\"drop_vip_unserved\"")
            .unwrap_or(0)
    };
    let deadline = Instant::now() + T;
    while dropped() < 3 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(dropped(), 3);
    assert_eq!(lab.lab.kernel_forwarded_packets().unwrap(), 0);
}
