//! Health checks and runtime control, end to end: the agent in the lab's
//! balancer namespace, changes pushed with the `lb` CLI over its control
//! socket, real connections from the client namespace.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use lb_tests::RunningLab;
use lb_tests::wait_for;
use lb_userspace::control::protocol::{AdminState, BackendInfo, Health};
use lb_userspace::lab::{
    TCP_PORT, backend_v4,
    client::{TcpSession, tcp_ask},
    run_in_ns,
    services::{self, TCP4},
};

const T: Duration = Duration::from_secs(3);

fn be(i: usize) -> String {
    SocketAddr::new(backend_v4(i).into(), TCP_PORT).to_string()
}

fn tally(lab: &RunningLab, n: usize) -> BTreeMap<String, usize> {
    lb_tests::tally(lab.lab.client_ns(), services::vip_tcp4(), n, false)
}

fn backends(lab: &RunningLab) -> Vec<BackendInfo> {
    let out = lab.lb(&["show", "backends", TCP4, "--json"]);
    assert!(out.status.success());
    serde_json::from_slice(&out.stdout).expect("show backends --json parses")
}

fn backend(lab: &RunningLab, i: usize) -> BackendInfo {
    backends(lab)
        .into_iter()
        .find(|b| b.address.to_string() == be(i))
        .unwrap_or_else(|| panic!("no backend {}", be(i)))
}

const HEALTH: &str =
    "kind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nrise = 2\nfall = 2";

#[test]
fn a_dead_backend_leaves_within_interval_times_fall_and_comes_back_after_rise() {
    let mut lab = RunningLab::start_with_health("rth", 3, &[1, 1, 1], Some(HEALTH)).unwrap();
    wait_for("all backends up", Duration::from_secs(5), || {
        backends(&lab).iter().all(|b| b.health == Health::Up)
    });
    lab.lab.stop_backend_server(2).unwrap();
    let killed = Instant::now();
    wait_for("be2 down", Duration::from_secs(5), || {
        backend(&lab, 2).health == Health::Down
    });
    // interval x fall = 400 ms, plus scheduling slack on a busy 2-core machine.
    let took = killed.elapsed();
    println!("be2 marked down {took:?} after its server died (interval x fall = 400ms)");
    assert!(took < Duration::from_secs(2), "took {took:?}");
    // The status is shown as soon as the check fails; the table follows a moment later.
    std::thread::sleep(Duration::from_millis(200));
    let t = tally(&lab, 120);
    assert!(
        !t.contains_key("be2"),
        "no new connection goes to the dead backend: {t:?}"
    );
    assert_eq!(t.values().sum::<usize>(), 120, "and none fails");
    let b2 = backend(&lab, 2);
    assert_eq!(b2.health, Health::Down);
    assert!(
        b2.last_check.as_deref().unwrap_or("").contains("refused"),
        "the reason is logged and shown: {b2:?}"
    );
    lab.lab.start_backend_server(2).unwrap();
    wait_for("be2 up again", Duration::from_secs(5), || {
        backend(&lab, 2).health == Health::Up
    });
    let t = tally(&lab, 120);
    assert!(
        t.contains_key("be2"),
        "be2 takes new connections again: {t:?}"
    );
}

#[test]
fn a_backend_added_from_the_cli_gets_new_flows_while_open_connections_stay() {
    let mut lab = RunningLab::start("rta", 3, &[1, 1, 1]).unwrap();
    let vip = services::vip_tcp4();
    let (sessions, before) = run_in_ns(lab.lab.client_ns(), move || {
        let mut sessions = Vec::new();
        let mut names = Vec::new();
        for _ in 0..30 {
            let mut s = TcpSession::connect(vip, T).unwrap();
            names.push(s.ask().unwrap());
            sessions.push(s);
        }
        (sessions, names)
    })
    .unwrap();
    assert_eq!(lab.lab.add_backend().unwrap(), 4);
    assert!(lab.lb(&["add", "backend", TCP4, &be(4)]).status.success());
    let after = run_in_ns(lab.lab.client_ns(), move || {
        let mut sessions = sessions;
        sessions
            .iter_mut()
            .map(|s| s.ask().unwrap())
            .collect::<Vec<_>>()
    })
    .unwrap();
    assert_eq!(before, after, "open connections stayed on their backends");
    let t = tally(&lab, 600);
    let share = *t.get("be4").unwrap_or(&0) as f64 / 600.0;
    println!("be4 share after add: {share:.3} {t:?}");
    assert!(
        (share - 0.25).abs() < 0.07,
        "be4 gets about a quarter: {t:?}"
    );
}

#[test]
fn a_drained_backend_keeps_its_connection_and_gets_no_new_ones() {
    let lab = RunningLab::start("rtd", 3, &[1, 1, 1]).unwrap();
    let vip = services::vip_tcp4();
    // A long-lived connection that landed on be1.
    let session = run_in_ns(lab.lab.client_ns(), move || {
        for _ in 0..200 {
            let mut s = TcpSession::connect(vip, T).unwrap();
            if s.ask().unwrap() == "be1" {
                return Some(s);
            }
        }
        None
    })
    .unwrap()
    .expect("some connection lands on be1");
    assert!(lab.lb(&["drain", TCP4, &be(1)]).status.success());
    assert_eq!(backend(&lab, 1).admin, AdminState::Drain);
    let t = tally(&lab, 150);
    assert!(
        !t.contains_key("be1"),
        "no new connection to a drained backend: {t:?}"
    );
    let answers = run_in_ns(lab.lab.client_ns(), move || {
        let mut session = session;
        (0..20).map(|_| session.ask().unwrap()).collect::<Vec<_>>()
    })
    .unwrap();
    assert!(
        answers.iter().all(|n| n == "be1"),
        "its open connection keeps working"
    );
    assert!(lab.lb(&["enable", TCP4, &be(1)]).status.success());
    assert!(
        tally(&lab, 150).contains_key("be1"),
        "enabled again, it takes new connections"
    );
}

#[test]
fn a_new_connection_from_a_reused_port_follows_the_table() {
    let lab = RunningLab::start("rtp", 3, &[1, 1, 1]).unwrap();
    lb_tests::assert_reused_ports_follow_the_table(&lab, services::vip_tcp4(), TCP4, |name| {
        be(name[2..].parse().expect("a backend's name"))
    });
}

#[test]
fn removing_one_of_n_backends_moves_about_one_nth_of_flows() {
    let n = 5;
    let lab = RunningLab::start("rtr", n, &[1; 5]).unwrap();
    let vip = services::vip_udp4();
    let ports: Vec<u16> = (30000..30400).collect();
    let ask_all = |ports: Vec<u16>| {
        run_in_ns(lab.lab.client_ns(), move || {
            ports
                .iter()
                .map(|&p| {
                    let sock = std::net::UdpSocket::bind(("0.0.0.0", p)).unwrap();
                    sock.set_read_timeout(Some(T)).unwrap();
                    sock.send_to(b"who\n", vip).unwrap();
                    let mut buf = [0u8; 64];
                    let (len, _) = sock.recv_from(&mut buf).unwrap();
                    String::from_utf8_lossy(&buf[..len]).trim().to_string()
                })
                .collect::<Vec<_>>()
        })
        .unwrap()
    };
    let before = ask_all(ports.clone());
    let udp5 = SocketAddr::new(backend_v4(5).into(), lb_userspace::lab::UDP_PORT).to_string();
    assert!(
        lab.lb(&["remove", "backend", services::UDP4, &udp5])
            .status
            .success()
    );
    let after = ask_all(ports.clone());
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    let fraction = moved as f64 / ports.len() as f64;
    println!(
        "removing 1 of {n} backends moved {fraction:.3} of flows (ideal {:.3})",
        1.0 / n as f64
    );
    assert!(!after.iter().any(|b| b == "be5"));
    assert!(
        before.iter().zip(&after).all(|(a, b)| a == b || a == "be5"),
        "only the removed backend's flows moved"
    );
    assert!(fraction <= 1.5 / n as f64, "moved {fraction:.3}");
}

#[test]
fn bad_control_requests_get_a_clear_error_and_change_nothing() {
    let lab = RunningLab::start("rtb", 2, &[1, 1]).unwrap();
    let before = backends(&lab);
    let services_before = lab.lb(&["show", "services", "--json"]).stdout;
    for (args, why) in [
        (
            vec!["add", "backend", "nope", "198.18.2.20:8080"],
            "unknown service",
        ),
        (
            vec!["add", "backend", TCP4, "[fd00:18:2::20]:8080"],
            "address families",
        ),
        (vec!["add", "backend", TCP4, &be(1)], "already has"),
        (
            vec!["remove", "backend", TCP4, "198.18.2.99:8080"],
            "no backend",
        ),
        (vec!["drain", TCP4, "198.18.2.99:8080"], "no backend"),
        (vec!["weight", TCP4, &be(1), "70000"], "0..=65535"),
        (
            vec!["add", "service", TCP4, "--vip", "198.18.100.7:80"],
            "already exists",
        ),
        (
            vec!["add", "service", "dup", "--vip", "198.18.100.1:80"],
            "already used",
        ),
        (vec!["remove", "service", "nope"], "unknown service"),
    ] {
        let out = lab.lb(&args);
        // 1: refused by the agent; 2: refused by the CLI's own argument checks.
        assert!(matches!(out.status.code(), Some(1 | 2)), "{args:?} fails");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{args:?}: {err}");
    }
    let bad_addr = lab.lb(&["add", "backend", TCP4, "not-an-address"]);
    assert!(
        !bad_addr.status.success(),
        "a malformed address is refused by the CLI"
    );
    assert_eq!(backends(&lab), before, "nothing changed");
    assert_eq!(
        lab.lb(&["show", "services", "--json"]).stdout,
        services_before
    );
}

#[test]
fn runtime_changes_survive_a_restart_and_a_reload() {
    let mut lab = RunningLab::start("rtp", 3, &[1, 1]).unwrap();
    assert!(lab.lb(&["add", "backend", TCP4, &be(3)]).status.success());
    assert!(lab.lb(&["weight", TCP4, &be(1), "3"]).status.success());
    lab.restart_agent().unwrap();
    let after = backends(&lab);
    assert_eq!(
        after.len(),
        3,
        "the added backend is still there: {after:?}"
    );
    assert_eq!(backend(&lab, 1).weight, 3, "the weight change too");
    assert!(tally(&lab, 90).contains_key("be3"));

    // A reload re-reads the file and keeps what the operator pushed.
    lab.reload(&[2, 1]).unwrap();
    assert!(lab.lb(&["reload"]).status.success());
    assert_eq!(backends(&lab).len(), 3);
    assert_eq!(
        backend(&lab, 1).weight,
        3,
        "the runtime weight wins over the file's"
    );
    // A broken file is refused and the running state stays.
    std::fs::write(
        &lab.config_path,
        "interfaces = [\"lbc\"]\n[[service]]\nname = 1\n",
    )
    .unwrap();
    let out = lab.lb(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("lb.toml:3:"));
    assert_eq!(backends(&lab).len(), 3);
    assert!(tally(&lab, 30).len() >= 2);
}

#[test]
fn the_program_keeps_forwarding_while_the_agent_is_down_and_a_new_agent_adopts_it() {
    let mut lab = RunningLab::start("rtk", 2, &[1, 1]).unwrap();
    let status = lab.lab.stop(lab.agent).unwrap().expect("exit status");
    assert!(
        status.success(),
        "SIGTERM stops the agent cleanly: {status}"
    );
    let t = tally(&lab, 60);
    assert_eq!(
        t.len(),
        2,
        "with no agent running, both backends still get connections: {t:?}"
    );
    assert_eq!(lab.lab.kernel_forwarded_packets().unwrap(), 0, "by XDP");
    lab.agent = lb_userspace::demo::start_agent(
        &mut lab.lab,
        &lab.config_path.clone(),
        &lab.socket.clone(),
    )
    .unwrap();
    assert_eq!(backends(&lab).len(), 2);
    assert_eq!(tally(&lab, 60).len(), 2);
}

/// What a `steady_load` saw: new connections answered, failures, answers
/// lost on the open ones.
type Load = (u32, Vec<String>, u32);

/// From the client namespace until `stop` (at most `limit` long): `open`
/// L4 connections kept asking, and new L4 connections (and, with `l7`,
/// new HTTP requests there) one after another.
fn steady_load(
    lab: &RunningLab,
    open: usize,
    l7: Option<SocketAddr>,
    limit: Duration,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Load> {
    use std::sync::atomic::Ordering;
    let vip = services::vip_tcp4();
    let (client, flag) = (lab.lab.client_ns().to_string(), stop.clone());
    std::thread::spawn(move || {
        run_in_ns(&client, move || {
            let mut sessions: Vec<(TcpSession, String)> = (0..open)
                .map(|_| {
                    let mut s = TcpSession::connect(vip, T).unwrap();
                    let name = s.ask().unwrap();
                    (s, name)
                })
                .collect();
            let (mut ok, mut failed, mut lost) = (0u32, Vec::new(), 0u32);
            let start = Instant::now();
            // Bounded in time and count.
            while !flag.load(Ordering::Relaxed) && start.elapsed() < limit && ok < 1_000_000 {
                match tcp_ask(vip, T) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(format!("l4: {e}")),
                }
                if let Some(addr) = l7 {
                    match lb_userspace::lab::client::http_get(addr, "/", T) {
                        Ok((200, _)) => ok += 1,
                        other => failed.push(format!("l7: {other:?}")),
                    }
                }
                for (s, name) in &mut sessions {
                    match s.ask() {
                        Ok(n) if &n == name => {}
                        _ => lost += 1,
                    }
                }
            }
            (ok, failed, lost)
        })
        .unwrap()
    })
}

#[test]
fn ten_agent_restarts_under_load_fail_no_connection_and_lose_none() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let mut lab = RunningLab::start("rtx", 3, &[1, 1, 1]).unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let load = steady_load(&lab, 20, None, Duration::from_secs(120), &done);
    for i in 0..10 {
        lab.restart_agent()
            .unwrap_or_else(|e| panic!("restart {i}: {e:#}"));
        std::thread::sleep(Duration::from_millis(100));
    }
    done.store(true, Ordering::Relaxed);
    let (new_ok, new_failed, lost) = load.join().unwrap();
    println!(
        "10 restarts: {new_ok} new connections succeeded, {} failed, {lost} established answers lost",
        new_failed.len()
    );
    assert!(new_ok > 50, "the load ran: {new_ok}");
    assert!(
        new_failed.is_empty(),
        "no new connection failed: {new_failed:?}"
    );
    assert_eq!(lost, 0, "no established connection lost");
}

#[test]
fn a_takeover_under_load_refuses_nothing_and_loses_no_connection() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    // An HTTP frontend on the l7 VIP beside the l4 services.
    let mut lab = RunningLab::start_custom("rtk", 2, &[1, 1], None, |lab, _| {
        lab.make_local_on_balancer(services::vip_l7().ip())?;
        Ok(format!(
            "\n[[frontend]]\nname = \"web\"\nbinds = [\"{}\"]\ndefault_pool = \"app\"\n\n[[pool]]\nname = \"app\"\nservers = [{{ address = \"{}\" }}]\n",
            services::vip_l7(),
            be(1)
        ))
    })
    .unwrap();
    let done = Arc::new(AtomicBool::new(false));
    // New L4 and L7 connections one after another, and 10 open L4 ones.
    let load = steady_load(
        &lab,
        10,
        Some(services::vip_l7()),
        Duration::from_secs(60),
        &done,
    );
    std::thread::sleep(Duration::from_millis(500));
    let old = lab.agent;
    let args = [
        "--config".into(),
        lab.config_path.clone().into_os_string(),
        "--socket".into(),
        lab.socket.clone().into_os_string(),
        "--pin-dir".into(),
        lab.lab.agent_pin_dir().into_os_string(),
        "--takeover".into(),
    ];
    let new = lab.lab.spawn_node_agent(1, &args).unwrap();
    wait_for("the old agent to exit", Duration::from_secs(20), || {
        lab.lab.try_wait(old).unwrap().is_some()
    });
    wait_for("the new agent to answer", Duration::from_secs(20), || {
        lab.lb(&["show", "services"]).status.success()
    });
    lab.agent = new;
    std::thread::sleep(Duration::from_millis(500));
    done.store(true, Ordering::Relaxed);
    let (ok, failed, lost) = load.join().unwrap();
    println!(
        "takeover: {ok} new connections answered, {} failed, {lost} answers lost",
        failed.len()
    );
    assert!(ok > 50, "the load ran: {ok}");
    assert!(failed.is_empty(), "{failed:?}");
    assert_eq!(lost, 0, "no established connection lost");
    assert_eq!(backends(&lab).len(), 2, "the new agent runs the data plane");
}

#[test]
fn a_second_agent_on_the_same_pin_directory_refuses_and_names_the_first() {
    use std::process::Command;
    let lab = RunningLab::start("rtl", 2, &[1, 1]).unwrap();
    let other_socket = lab.socket.with_extension("second.sock");
    let out = lb_tests::output_within(
        Command::new(&lab.lab.options().lb_bin)
            .arg("run")
            .arg("--netns")
            .arg(lab.lab.balancer_ns())
            .arg("--config")
            .arg(&lab.config_path)
            .arg("--socket")
            .arg(&other_socket)
            .arg("--pin-dir")
            .arg(lab.lab.agent_pin_dir()),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains(&format!(
            "is in use by another lb agent (pid {})",
            lab.agent
        )),
        "{stderr}"
    );
    assert!(!other_socket.exists(), "the refused agent made no socket");
    // The first agent still runs the data plane and answers.
    assert_eq!(backends(&lab).len(), 2);
    assert_eq!(tally(&lab, 20).len(), 2);
}

#[test]
fn a_deny_list_applied_by_reload_cuts_the_client_off_and_is_counted() {
    let lab = RunningLab::start("rtd", 1, &[1]).unwrap();
    let vip = services::vip_tcp4();
    let short = Duration::from_secs(1);
    // A connection opened before the client's prefix is denied.
    let mut session = run_in_ns(lab.lab.client_ns(), move || {
        let mut s = TcpSession::connect(vip, T).expect("connect");
        assert_eq!(s.ask().expect("first answer"), "be1");
        s
    })
    .unwrap();
    let config = std::fs::read_to_string(&lab.config_path).unwrap();
    let with_deny = |deny: &str| format!("deny = [{deny}]\n{config}");

    // A bad entry is refused with its place in the file; nothing changes.
    std::fs::write(&lab.config_path, with_deny("\"198.18.1.2/24\"")).unwrap();
    let out = lab.lb(&["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        err.contains("lb.toml:1:") && err.contains("the network is 198.18.1.0/24"),
        "{err}"
    );
    assert_eq!(tally(&lab, 3).len(), 1, "still served");

    std::fs::write(
        &lab.config_path,
        with_deny("\"198.18.1.0/24\", \"fd00:18:1::/64\""),
    )
    .unwrap();
    assert!(lab.lb(&["reload"]).status.success());
    // The open connection and new ones get nothing through.
    let (old, new) = run_in_ns(lab.lab.client_ns(), move || {
        (session.ask().is_err(), tcp_ask(vip, short).is_err())
    })
    .unwrap();
    assert!(old, "the established connection was cut off");
    assert!(new, "a new connection was refused");
    let metrics = lab.metrics().unwrap();
    let denied =
        lb_userspace::metrics::sample(&metrics, "lb_xdp_packets_total", "reason=\"drop_denied\"");
    assert!(denied.is_some_and(|n| n > 0), "counted: {denied:?}");
    let stats = lab.lb(&["show", "stats"]);
    assert!(String::from_utf8_lossy(&stats.stdout).contains("drop_denied"));
    assert_eq!(lab.lab.kernel_forwarded_packets().unwrap(), 0);

    // Off the list again: served again.
    std::fs::write(&lab.config_path, &config).unwrap();
    assert!(lab.lb(&["reload"]).status.success());
    assert_eq!(tally(&lab, 3).len(), 1);
}
