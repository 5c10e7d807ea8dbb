//! The L7 proxy alone: `lb run` with `[[frontend]]`/`[[pool]]` tables and no
//! `interfaces` (HAProxy's most common use). Nothing is loaded or attached;
//! the proxy serves on its bind, and runtime control, reload and metrics work.

use std::net::SocketAddr;
use std::time::Duration;

use lb_userspace::lab::{
    BALANCER_CLIENT_V4, Lab, LabOptions, TCP_PORT, client::http_get, run_in_ns,
    services::METRICS_ADDR,
};

const BIND_PORT: u16 = 8081;

fn config(lab: &Lab, servers: usize) -> String {
    let servers: Vec<String> = lab
        .backends()
        .iter()
        .take(servers)
        .map(|b| {
            format!(
                "{{ address = \"{}\" }}",
                SocketAddr::new(b.v4.into(), TCP_PORT)
            )
        })
        .collect();
    format!(
        "metrics = \"{METRICS_ADDR}\"\n\n[proxy]\nthreads = 2\n\n[[frontend]]\nname = \"web\"\nbinds = [\"{BALANCER_CLIENT_V4}:{BIND_PORT}\"]\ndefault_pool = \"app\"\n\n[[pool]]\nname = \"app\"\nservers = [{}]\n",
        servers.join(", ")
    )
}

/// Who answers `GET /` on the proxy's bind from the client namespace.
fn ask(lab: &Lab) -> String {
    let addr = SocketAddr::new(BALANCER_CLIENT_V4.into(), BIND_PORT);
    let (status, body) = run_in_ns(lab.client_ns(), move || {
        http_get(addr, "/", Duration::from_secs(3))
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("GET / on {addr}: {e}"));
    assert_eq!(status, 200, "{body}");
    body.trim().to_string()
}

fn lb(lab: &Lab, socket: &std::path::Path, args: &[&str]) -> std::process::Output {
    lb_tests::output_within(
        std::process::Command::new(&lab.options().lb_bin)
            .arg("--socket")
            .arg(socket)
            .args(args),
        Duration::from_secs(10),
    )
}

#[test]
fn the_proxy_runs_alone_without_interfaces() {
    let mut lab = Lab::create("proxyonly", LabOptions::from_env(2).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-proxyonly", lab.balancer_ns()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    std::fs::write(&path, config(&lab, 1)).unwrap();
    let check = lb(
        &lab,
        &dir.join("unused.sock"),
        &[
            "check",
            "--netns",
            lab.balancer_ns(),
            path.to_str().unwrap(),
        ],
    );
    assert!(check.status.success(), "{check:?}");
    let said = String::from_utf8_lossy(&check.stdout);
    assert!(
        said.contains("OK (0 services, 0 backends, 1 frontends, 1 pools)"),
        "{said}"
    );
    let socket = dir.join("lb.sock");
    lb_userspace::demo::start_agent(&mut lab, &path, &socket).unwrap();

    // Nothing attached anywhere in the balancer namespace.
    for iface in Lab::balancer_interfaces() {
        assert_eq!(
            lab.xdp_program_id(lab.balancer_ns(), iface).unwrap(),
            None,
            "{iface}"
        );
    }
    assert_eq!(ask(&lab), "be1");

    // Runtime control and reload work; L4 changes say why they cannot.
    let out = lb(&lab, &socket, &["show", "backends", "pool:app", "--json"]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("198.18.2.11:8080"));
    let add = lb(
        &lab,
        &socket,
        &["add", "service", "web4", "--vip", "198.18.100.9:80"],
    );
    assert!(!add.status.success());
    assert!(
        String::from_utf8_lossy(&add.stderr).contains("no data plane"),
        "{add:?}"
    );
    std::fs::write(&path, config(&lab, 2)).unwrap();
    assert!(lb(&lab, &socket, &["reload"]).status.success());
    let mut seen = std::collections::BTreeSet::new();
    for _ in 0..6 {
        seen.insert(ask(&lab));
    }
    assert_eq!(seen.len(), 2, "both servers after the reload: {seen:?}");

    // Metrics answer (the proxy's gauges; no L4 counters).
    let metrics = METRICS_ADDR.parse().unwrap();
    let (status, body) = run_in_ns(lab.balancer_ns(), move || {
        http_get(metrics, "/metrics", Duration::from_secs(2))
    })
    .unwrap()
    .unwrap();
    assert_eq!(status, 200, "{body}");

    // A server that refuses connections, with passive health on: every
    // request is still answered, and after its first failure the server
    // shows as down, with why, until fail_timeout.
    let dead = SocketAddr::new(lab.backends()[0].v4.into(), 9);
    let text = config(&lab, 2).replace(
        "servers = [",
        &format!("max_fails = 1\nfail_timeout = \"1h\"\nservers = [{{ address = \"{dead}\" }}, "),
    );
    std::fs::write(&path, text).unwrap();
    assert!(lb(&lab, &socket, &["reload"]).status.success());
    for _ in 0..6 {
        assert!(ask(&lab).starts_with("be"));
    }
    let out = lb(&lab, &socket, &["show", "backends", "pool:app", "--json"]);
    let list: Vec<lb_userspace::control::protocol::BackendInfo> =
        serde_json::from_slice(&out.stdout).unwrap();
    let shown = list
        .iter()
        .find(|b| b.address == dead)
        .expect("the dead server");
    assert_eq!(shown.health, lb_userspace::control::protocol::Health::Down);
    assert!(
        shown
            .last_check
            .as_deref()
            .is_some_and(|c| c.contains("max_fails")),
        "{shown:?}"
    );
    let (_, body) = run_in_ns(lab.balancer_ns(), move || {
        http_get(metrics, "/metrics", Duration::from_secs(2))
    })
    .unwrap()
    .unwrap();
    let line = format!("lb_pool_server_taken_out_total{{pool=\"app\",server=\"{dead}\"}} 1");
    assert!(body.contains(&line), "{body}");
    // The stats page, `lb top` and the check-status gauge read the same state.
    let down =
        format!("lb_pool_server_check_status{{pool=\"app\",server=\"{dead}\",state=\"down\"}} 1");
    assert!(body.contains(&down), "{body}");
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
