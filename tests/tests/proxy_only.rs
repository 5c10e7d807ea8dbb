//! The L7 proxy alone: `lb run` with `[[frontend]]`/`[[pool]]` tables and no
//! `interfaces` (HAProxy's most common use). Nothing is loaded or attached;
//! the proxy serves on its bind, and runtime control, reload and metrics work.

use std::net::SocketAddr;
use std::time::Duration;

use lb_userspace::lab::{
    BALANCER_BACKEND_V4, BALANCER_CLIENT_V4, Lab, LabOptions, TCP_PORT, client::http_get,
    run_in_ns, services::METRICS_ADDR,
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
    // A wildcard bind and a pool server at one of the namespace's own
    // addresses on its port: the proxy itself, a loop, refused at its line.
    let looped = dir.join("looped.toml");
    let own = SocketAddr::new(BALANCER_CLIENT_V4.into(), BIND_PORT);
    let text = config(&lab, 1)
        .replace(
            &format!("{BALANCER_CLIENT_V4}:{BIND_PORT}\"]"),
            &format!("0.0.0.0:{BIND_PORT}\"]"),
        )
        .replace(
            &SocketAddr::new(lab.backends()[0].v4.into(), TCP_PORT).to_string(),
            &own.to_string(),
        );
    std::fs::write(&looped, text).unwrap();
    let said = refused_by_check(&lab, &looped);
    assert!(
        said.contains(&format!("server {own} is where frontend \"web\" listens")),
        "{said}"
    );
    // An l4 backend at one of the balancer's own addresses: XDP would hand
    // its flows to the local stack, whose answers do not pass XDP again.
    let own_backend = SocketAddr::new(BALANCER_BACKEND_V4.into(), 8080);
    std::fs::write(
        &looped,
        format!("interfaces = [\"lbc\", \"lbb\"]\n[[service]]\nname = \"l4\"\nvip = \"198.18.100.9:80\"\n[[service.backend]]\naddress = \"{own_backend}\"\n"),
    )
    .unwrap();
    let said = refused_by_check(&lab, &looped);
    assert!(
        said.contains(&format!("{}:6:", looped.display()))
            && said.contains(&format!("backend {own_backend} is an address of this host")),
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

/// What `lb check --netns` (the balancer's) says of `file`, which it must refuse.
fn refused_by_check(lab: &Lab, file: &std::path::Path) -> String {
    let check = lb(
        lab,
        &file.with_extension("sock"),
        &[
            "check",
            "--netns",
            lab.balancer_ns(),
            file.to_str().unwrap(),
        ],
    );
    assert!(!check.status.success(), "{check:?}");
    String::from_utf8_lossy(&check.stderr).into_owned()
}

/// Whether the proxy answers `GET /` on `port` of the client-side address.
fn answers(lab: &Lab, port: u16) -> bool {
    let addr = SocketAddr::new(BALANCER_CLIENT_V4.into(), port);
    run_in_ns(lab.client_ns(), move || {
        http_get(addr, "/", Duration::from_millis(500)).is_ok_and(|(s, _)| s == 200)
    })
    .unwrap()
}

/// A lab of `backends` servers, its files' directory and `lb.toml`
/// (`config(&lab, 1)`).
fn lab_with_file(tag: &str, backends: usize) -> (Lab, std::path::PathBuf, std::path::PathBuf) {
    let lab = Lab::create(tag, LabOptions::from_env(backends).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-{tag}", lab.balancer_ns()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("lb.toml");
    std::fs::write(&path, config(&lab, 1)).unwrap();
    (lab, dir, path)
}

/// What a connection loop saw: answers by body, failures.
type LoopResult = (std::collections::BTreeMap<String, usize>, Vec<String>);

/// A client in the lab opening connections one after another to the
/// proxy's bind (`GET /`, at most `count`, for at most 30 s) until `stop`.
fn connection_loop(
    lab: &Lab,
    count: usize,
    stop: &std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<LoopResult> {
    let addr = SocketAddr::new(BALANCER_CLIENT_V4.into(), BIND_PORT);
    let (client, stop) = (lab.client_ns().to_string(), stop.clone());
    std::thread::spawn(move || {
        run_in_ns(&client, move || {
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            let (mut answers, mut failures) = LoopResult::default();
            for _ in 0..count {
                if stop.load(std::sync::atomic::Ordering::Relaxed)
                    || std::time::Instant::now() > deadline
                {
                    break;
                }
                match http_get(addr, "/", Duration::from_secs(3)) {
                    Ok((200, body)) => *answers.entry(body.trim().to_string()).or_default() += 1,
                    other => failures.push(format!("{other:?}")),
                }
            }
            (answers, failures)
        })
        .unwrap()
    })
}

#[test]
fn a_second_agent_cannot_serve_the_addresses_of_the_first() {
    let (mut lab, dir, first) = lab_with_file("proxytwice", 1);
    let socket = dir.join("first.sock");
    let pid = lb_userspace::demo::start_agent(&mut lab, &first, &socket).unwrap();

    // The same file again beside it, on another control socket: refused,
    // naming the address and the first agent (each would otherwise bind it
    // with SO_REUSEPORT and get half of its connections).
    let second_socket = dir.join("second.sock");
    let out = lb_tests::output_within(
        std::process::Command::new(&lab.options().lb_bin)
            .args(["run", "--netns", lab.balancer_ns(), "--config"])
            .arg(&first)
            .arg("--socket")
            .arg(&second_socket),
        Duration::from_secs(20),
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr.contains(&format!(
            "frontend \"web\" binds {BALANCER_CLIENT_V4}:{BIND_PORT}, which another lb agent (pid {pid}) serves"
        )),
        "{stderr}"
    );
    assert!(!second_socket.exists(), "the refused agent made no socket");
    assert_eq!(ask(&lab), "be1");

    // Another agent on another address runs beside it; a reload of the
    // first that would bind that address too is refused and changes nothing.
    let other_port = BIND_PORT + 1;
    let other = dir.join("other.toml");
    let text = config(&lab, 1)
        .replace(&format!(":{BIND_PORT}\""), &format!(":{other_port}\""))
        .replace(&format!("metrics = \"{METRICS_ADDR}\"\n"), "");
    std::fs::write(&other, text).unwrap();
    let args = [
        "--config".into(),
        other.clone().into_os_string(),
        "--socket".into(),
        second_socket.clone().into_os_string(),
    ];
    let other_pid = lab.spawn_node_agent(1, &args).unwrap();
    lb_tests::wait_for("the other agent to serve", Duration::from_secs(20), || {
        answers(&lab, other_port)
    });
    let both = config(&lab, 1).replace(
        &format!("binds = [\"{BALANCER_CLIENT_V4}:{BIND_PORT}\"]"),
        &format!(
            "binds = [\"{BALANCER_CLIENT_V4}:{BIND_PORT}\", \"{BALANCER_CLIENT_V4}:{other_port}\"]"
        ),
    );
    std::fs::write(&first, both).unwrap();
    let reload = lb(&lab, &socket, &["reload"]);
    let said = String::from_utf8_lossy(&reload.stderr);
    assert!(!reload.status.success(), "{reload:?}");
    assert!(
        said.contains(&format!(
            "{other_port}, which another lb agent (pid {other_pid}) serves"
        )),
        "{said}"
    );
    assert_eq!(ask(&lab), "be1");
    // Once the other agent stops, the same reload takes the address.
    lab.stop(other_pid).unwrap();
    let reload = lb(&lab, &socket, &["reload"]);
    assert!(reload.status.success(), "{reload:?}");
    assert!(answers(&lab, other_port));
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_soft_stop_answers_what_is_in_flight_and_frees_its_addresses_at_once() {
    use std::io::{Read, Write};
    let (mut lab, dir, path) = lab_with_file("softstop", 1);
    let first = lb_userspace::demo::start_agent(&mut lab, &path, &dir.join("first.sock")).unwrap();
    let addr = SocketAddr::new(BALANCER_CLIENT_V4.into(), BIND_PORT);

    // A request in flight (the server answers after 1.5 s) and an idle
    // keep-alive connection, when the agent is told to stop softly.
    let client = lab.client_ns().to_string();
    let in_flight = std::thread::spawn({
        let client = client.clone();
        move || {
            run_in_ns(&client, move || {
                http_get(addr, "/sleep/1500", Duration::from_secs(10))
            })
            .unwrap()
        }
    });
    let mut idle = run_in_ns(&client, move || {
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
        let mut buf = [0u8; 1024];
        let n = s.read(&mut buf).unwrap();
        assert!(
            buf[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&buf[..n])
        );
        s
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let out = lb(&lab, &dir.join("first.sock"), &["stop", "--soft"]);
    assert!(out.status.success(), "{out:?}");

    // Its listener closes at once, and its addresses are free: a new agent
    // with the same file starts while the request is still in flight.
    lb_tests::wait_for("the listener to close", Duration::from_secs(5), || {
        run_in_ns(&client, move || std::net::TcpStream::connect(addr).is_err()).unwrap()
    });
    let second = dir.join("second.sock");
    lb_userspace::demo::start_agent(&mut lab, &path, &second).unwrap();
    assert!(
        lab.try_wait(first).unwrap().is_none(),
        "the first agent still drains"
    );
    // The request in flight is answered; the idle connection is closed.
    let (status, body) = in_flight.join().unwrap().expect("the request in flight");
    assert_eq!(
        (status, body.split_whitespace().next()),
        (200, Some("be1")),
        "{body}"
    );
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut buf = [0u8; 64];
    assert_eq!(
        idle.read(&mut buf).unwrap_or(0),
        0,
        "the idle connection is closed"
    );
    lb_tests::wait_for("the first agent to exit", Duration::from_secs(10), || {
        lab.try_wait(first).unwrap().is_some()
    });
    assert_eq!(ask(&lab), "be1");
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_takeover_refuses_and_cuts_no_connection() {
    let (mut lab, dir, path) = lab_with_file("takeover", 2);
    let socket = dir.join("lb.sock");
    let old = lb_userspace::demo::start_agent(&mut lab, &path, &socket).unwrap();

    // A client keeps opening connections (at most 3 000) while a new
    // agent, with a file whose pool is the second server, takes over on
    // the same control socket.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load = connection_loop(&lab, 3000, &stop);
    std::thread::sleep(Duration::from_millis(500));
    let one = SocketAddr::new(lab.backends()[0].v4.into(), TCP_PORT).to_string();
    let two = SocketAddr::new(lab.backends()[1].v4.into(), TCP_PORT).to_string();
    let next = dir.join("next.toml");
    std::fs::write(&next, config(&lab, 1).replace(&one, &two)).unwrap();
    let args = [
        "--config".into(),
        next.clone().into_os_string(),
        "--socket".into(),
        socket.clone().into_os_string(),
        "--takeover".into(),
    ];
    let new = lab.spawn_node_agent(1, &args).unwrap();
    lb_tests::wait_for("the old agent to exit", Duration::from_secs(20), || {
        lab.try_wait(old).unwrap().is_some()
    });
    lb_tests::wait_for("the new agent to answer", Duration::from_secs(20), || {
        lb(&lab, &socket, &["show", "proxy"]).status.success()
    });
    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (answers, failures) = load.join().unwrap();
    assert!(
        failures.is_empty(),
        "{} failed: {:?} ({answers:?})",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    assert!(answers.get("be1").is_some_and(|&n| n > 0), "{answers:?}");
    assert!(answers.get("be2").is_some_and(|&n| n > 0), "{answers:?}");
    assert!(lab.try_wait(new).unwrap().is_none(), "the new agent runs");
    assert_eq!(ask(&lab), "be2");
    // Without an agent to take over from, --takeover refuses to start.
    let out = lb(
        &lab,
        &dir.join("none.sock"),
        &[
            "run",
            "--netns",
            lab.balancer_ns(),
            "--config",
            next.to_str().unwrap(),
            "--takeover",
        ],
    );
    assert!(!out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("no agent answers on"),
        "{out:?}"
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn reloads_that_restart_the_proxy_refuse_no_connection() {
    let (mut lab, dir, path) = lab_with_file("reloadload", 2);
    let socket = dir.join("lb.sock");
    lb_userspace::demo::start_agent(&mut lab, &path, &socket).unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    // Two clients opening connections one after another (bounded).
    let loads: Vec<_> = (0..2)
        .map(|_| connection_loop(&lab, 20_000, &stop))
        .collect();
    // Reloads changing the frontend's max_connections: each restarts the proxy
    // beside the old one, whose listeners then close.
    for i in 0..10 {
        std::thread::sleep(Duration::from_millis(150));
        let limit = format!("default_pool = \"app\"\nmax_connections = {}\n", 1000 + i);
        std::fs::write(
            &path,
            config(&lab, 1).replace("default_pool = \"app\"\n", &limit),
        )
        .unwrap();
        let out = lb(&lab, &socket, &["reload"]);
        assert!(out.status.success(), "reload {i}: {out:?}");
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let (mut ok, mut failures) = (0, Vec::new());
    for l in loads {
        let (answers, f) = l.join().unwrap();
        ok += answers.values().sum::<usize>();
        failures.extend(f);
    }
    println!("10 reloads: {ok} answered, {} failed", failures.len());
    assert!(ok > 100, "the load ran: {ok}");
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}

/// nginx serving TLS behind a PROXY header on `addr` (HAProxy's `ssl
/// send-proxy-v2` servers), to clients with a certificate the test CA
/// signed: `/health` answers "healthy" to Host `be.test` (its name, as a
/// name-based virtual host answers), 404 to any other; other paths name
/// the PROXY header's client; the access log keeps `path proxy_protocol_addr`.
fn tls_proxy_nginx(dir: &std::path::Path, addr: SocketAddr) -> String {
    let d = dir.display();
    format!(
        "daemon off;\nuser root;\nworker_processes 1;\npid {d}/nginx.pid;\n\
         error_log {d}/nginx-error.log warn;\nevents {{\n    worker_connections 64;\n}}\n\
         http {{\n    log_format chk '$uri $proxy_protocol_addr';\n\
         \x20   access_log {d}/nginx-access.log chk;\n\
         \x20   client_body_temp_path {d}/nginx-body;\n    proxy_temp_path {d}/nginx-proxy;\n\
         \x20   fastcgi_temp_path {d}/nginx-fcgi;\n    uwsgi_temp_path {d}/nginx-uwsgi;\n\
         \x20   scgi_temp_path {d}/nginx-scgi;\n\
         \x20   server {{\n        listen {addr} ssl proxy_protocol;\n        server_name be.test;\n\
         \x20       ssl_certificate {d}/be.test.pem;\n        ssl_certificate_key {d}/be.test.key;\n\
         \x20       ssl_client_certificate {d}/ca.pem;\n        ssl_verify_client on;\n\
         \x20       location = /health {{\n            if ($host != be.test) {{\n                return 404;\n            }}\n\
         \x20           return 200 \"healthy\\n\";\n        }}\n\
         \x20       location / {{\n            return 200 \"tls $proxy_protocol_addr\\n\";\n        }}\n\
         \x20   }}\n}}\n"
    )
}

/// The state and last check `lb show backends` gives the pool's one server.
fn shown_server(
    lab: &Lab,
    socket: &std::path::Path,
) -> (lb_userspace::control::protocol::Health, String) {
    let out = lb(lab, socket, &["show", "backends", "pool:app", "--json"]);
    assert!(out.status.success(), "{out:?}");
    let list: Vec<lb_userspace::control::protocol::BackendInfo> =
        serde_json::from_slice(&out.stdout).unwrap();
    let server = list.first().expect("one server");
    (server.health, server.last_check.clone().unwrap_or_default())
}

/// Polls the pool's server until it is `want` (10 s at most); its last check.
fn wait_for_health(
    lab: &Lab,
    socket: &std::path::Path,
    want: lb_userspace::control::protocol::Health,
) -> String {
    let until = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (health, last) = shown_server(lab, socket);
        if health == want {
            return last;
        }
        assert!(
            std::time::Instant::now() < until,
            "still {health:?} ({last}), not {want:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_pool_is_health_checked_through_its_tls_and_proxy_header() {
    use lb_userspace::control::protocol::Health;
    let mut lab = Lab::create("poolchk", LabOptions::from_env(1).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-poolchk", lab.balancer_ns()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("other")).unwrap();
    let ca = lb_tests::write_certificates(&dir, &["be.test", "lb.test"]).unwrap();
    let other_ca = lb_tests::write_certificates(&dir.join("other"), &[]).unwrap();
    let server = SocketAddr::new(lab.backends()[0].v4.into(), 8443);
    let nginx_conf = dir.join("nginx.conf");
    std::fs::write(&nginx_conf, tls_proxy_nginx(&dir, server)).unwrap();
    let ns = lab.backends()[0].ns.clone();
    lab.spawn_in_ns(
        &ns,
        std::path::Path::new("/usr/sbin/nginx"),
        &[
            "-c".into(),
            nginx_conf.clone().into(),
            "-e".into(),
            dir.join("nginx-error.log").into(),
        ],
    )
    .unwrap();

    let config = |ca: &std::path::Path, version: &str| {
        format!(
            "metrics = \"{METRICS_ADDR}\"\n\n\
             [[frontend]]\nname = \"web\"\nbinds = [\"{BALANCER_CLIENT_V4}:{BIND_PORT}\"]\ndefault_pool = \"app\"\n\n\
             [[pool]]\nname = \"app\"\nservers = [{{ address = \"{server}\" }}]\n\
             tls = true\nca = \"{}\"\nsni = \"be.test\"\nsend_proxy = \"{version}\"\n\
             cert = \"{dir}/lb.test.pem\"\nkey = \"{dir}/lb.test.key\"\n\n\
             [pool.health]\nkind = \"http\"\npath = \"/health\"\nbody = \"healthy\"\n\
             interval = \"200ms\"\nrise = 1\nfall = 1\n",
            ca.display(),
            dir = dir.display(),
        )
    };
    let path = dir.join("lb.toml");
    std::fs::write(&path, config(&ca, "v2")).unwrap();
    let socket = dir.join("lb.sock");
    lb_userspace::demo::start_agent(&mut lab, &path, &socket).unwrap();

    // Up through TLS (with the pool's client certificate) after a PROXY v2
    // header, as the pool's requests go; requests carry the client's
    // address, checks none (LOCAL).
    assert_eq!(wait_for_health(&lab, &socket, Health::Up), "ok");
    let answer = ask(&lab);
    assert_eq!(answer, format!("tls {}", lb_userspace::lab::CLIENT_V4));
    let log = std::fs::read_to_string(dir.join("nginx-access.log")).unwrap();
    assert!(log.lines().any(|l| l == "/health -"), "{log}");
    assert!(
        !log.lines()
            .any(|l| l.starts_with("/health ") && l != "/health -"),
        "checks claim no client: {log}"
    );

    // A certificate the pool's ca does not sign fails the check (and the requests).
    std::fs::write(&path, config(&other_ca, "v2")).unwrap();
    assert!(lb(&lab, &socket, &["reload"]).status.success());
    let last = wait_for_health(&lab, &socket, Health::Down);
    assert!(
        last.contains("TLS handshake") && last.contains("certificate"),
        "{last}"
    );

    // PROXY v1 (UNKNOWN) and the right ca: up again.
    std::fs::write(&path, config(&ca, "v1")).unwrap();
    assert!(lb(&lab, &socket, &["reload"]).status.success());
    wait_for_health(&lab, &socket, Health::Up);
    assert_eq!(ask(&lab), format!("tls {}", lb_userspace::lab::CLIENT_V4));
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}

/// A line-protocol session to `addr` from the client namespace, its first
/// answer read (the lab backend answers each line with its name).
fn line_session(lab: &Lab, addr: SocketAddr) -> std::net::TcpStream {
    let mut s = run_in_ns(lab.client_ns(), move || {
        std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(3))
    })
    .unwrap()
    .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    assert_eq!(line_exchange(&mut s).as_deref(), Some("be1"));
    s
}

/// Sends a line and reads the answer; None once the session is closed.
fn line_exchange(s: &mut std::net::TcpStream) -> Option<String> {
    use std::io::{Read, Write};
    s.write_all(b"hi\n").ok()?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while !line.ends_with(b"\n") {
        match s.read(&mut b) {
            Ok(1) => line.push(b[0]),
            _ => return None,
        }
    }
    Some(String::from_utf8_lossy(&line).trim().to_string())
}

/// Waits (5 s at most) until the session no longer answers.
fn wait_closed(s: &mut std::net::TcpStream) {
    let until = std::time::Instant::now() + Duration::from_secs(5);
    while line_exchange(s).is_some() {
        assert!(std::time::Instant::now() < until, "still open");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_server_marked_down_by_its_checks_has_its_sessions_shut_down_if_its_pool_says_so() {
    use lb_userspace::control::protocol::Health;
    let mut lab = Lab::create("markdown", LabOptions::from_env(1).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-markdown", lab.balancer_ns()));
    std::fs::create_dir_all(&dir).unwrap();
    let server = SocketAddr::new(lab.backends()[0].v4.into(), TCP_PORT);
    let (shut, keep) = (
        SocketAddr::new(BALANCER_CLIENT_V4.into(), BIND_PORT),
        SocketAddr::new(BALANCER_CLIENT_V4.into(), BIND_PORT + 1),
    );
    let health = "[pool.health]\nkind = \"tcp\"\ninterval = \"200ms\"\nrise = 1\nfall = 1\n";
    let text = format!(
        "metrics = \"{METRICS_ADDR}\"\n\n\
         [[frontend]]\nname = \"shut\"\nmode = \"tcp\"\nbinds = [\"{shut}\"]\ndefault_pool = \"app\"\n\n\
         [[frontend]]\nname = \"keep\"\nmode = \"tcp\"\nbinds = [\"{keep}\"]\ndefault_pool = \"other\"\n\n\
         [[pool]]\nname = \"app\"\nservers = [{{ address = \"{server}\" }}]\n\
         on_marked_down = \"shutdown-sessions\"\n{health}\n\
         [[pool]]\nname = \"other\"\nservers = [{{ address = \"{server}\" }}]\n{health}"
    );
    let path = dir.join("lb.toml");
    std::fs::write(&path, text).unwrap();
    let socket = dir.join("lb.sock");
    lb_userspace::demo::start_agent(&mut lab, &path, &socket).unwrap();
    wait_for_health(&lab, &socket, Health::Up);
    let mut shut_session = line_session(&lab, shut);
    let mut kept_session = line_session(&lab, keep);

    // The server stops taking connections (new SYNs dropped); what is
    // established goes on. Its checks time out and mark it down.
    let ns = lab.backends()[0].ns.clone();
    lab.nft(
        &ns,
        &format!(
            "table inet markdown {{\n chain input {{\n  type filter hook input priority 0;\n  \
             tcp dport {TCP_PORT} tcp flags & (syn | ack) == syn drop\n }}\n}}\n"
        ),
    )
    .unwrap();
    let last = wait_for_health(&lab, &socket, Health::Down);
    assert!(last.contains("timeout"), "{last}");
    // Its session in the pool that says so is closed; the other's goes on.
    wait_closed(&mut shut_session);
    assert_eq!(line_exchange(&mut kept_session).as_deref(), Some("be1"));

    // By hand (HAProxy's `shutdown sessions server`): the other one too.
    let server_arg = server.to_string();
    for (group, refused) in [
        ("web", "only L7 pool servers"),
        ("pool:nope", "has no server"),
    ] {
        let out = lb(&lab, &socket, &["shutdown-sessions", group, &server_arg]);
        assert!(!out.status.success(), "{group}: {out:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(said.contains(refused), "{group}: {said}");
    }
    assert_eq!(line_exchange(&mut kept_session).as_deref(), Some("be1"));
    let out = lb(
        &lab,
        &socket,
        &["shutdown-sessions", "pool:other", &server_arg],
    );
    assert!(out.status.success(), "{out:?}");
    wait_closed(&mut kept_session);
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_access_log_goes_to_syslog_when_asked_and_follows_reloads() {
    let mut lab = Lab::create("syslog", LabOptions::from_env(1).unwrap()).unwrap();
    let dir = std::env::temp_dir().join(format!("{}-syslog", lab.balancer_ns()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    // The daemon: a Unix datagram socket, as /dev/log.
    let log = dir.join("log.sock");
    let daemon = std::os::unix::net::UnixDatagram::bind(&log).unwrap();
    daemon
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let next_line = || {
        let mut buf = [0u8; 4096];
        let n = daemon.recv(&mut buf).expect("a datagram");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let base = config(&lab, 1);
    let with = |proxy: &str| {
        base.replace(
            "[proxy]\nthreads = 2\n",
            &format!("[proxy]\nthreads = 2\n{proxy}"),
        )
    };
    let path = dir.join("lb.toml");
    std::fs::write(&path, with(&format!("syslog = \"{}\"\n", log.display()))).unwrap();
    let socket = dir.join("lb.sock");
    lb_userspace::demo::start_agent(&mut lab, &path, &socket).unwrap();

    assert_eq!(ask(&lab), "be1");
    let line = next_line();
    // <local0.info>Mmm dd hh:mm:ss lb[PID]: an httplog line
    assert!(line.starts_with("<134>"), "{line}");
    assert!(line.contains(" lb[") && line.contains("]: "), "{line}");
    assert!(
        line.contains(" web app/198.18.2.11:8080 ") && line.ends_with("\"GET / HTTP/1.1\""),
        "{line}"
    );

    // A reload changes the facility and the format (RFC 5424), then sends
    // the log back to standard output.
    let local3 = format!(
        "syslog = \"{}\"\nsyslog_facility = \"local3\"\nsyslog_format = \"rfc5424\"\n",
        log.display()
    );
    std::fs::write(&path, with(&local3)).unwrap();
    assert!(lb(&lab, &socket, &["reload"]).status.success());
    assert_eq!(ask(&lab), "be1");
    let line = next_line();
    // <local3.info>1 TIMESTAMP HOSTNAME lb PID - - an httplog line
    let f: Vec<&str> = line.splitn(8, ' ').collect();
    assert_eq!(
        (f[0], f[3], f[5], f[6]),
        ("<158>1", "lb", "-", "-"),
        "{line}"
    );
    assert!(f[1].ends_with('Z') && f[4].parse::<u32>().is_ok(), "{line}");
    assert!(f[7].contains(" web app/198.18.2.11:8080 "), "{line}");
    let metrics = METRICS_ADDR.parse().unwrap();
    let (_, body) = run_in_ns(lab.balancer_ns(), move || {
        http_get(metrics, "/metrics", Duration::from_secs(2))
    })
    .unwrap()
    .unwrap();
    assert!(
        body.contains("lb_access_log_syslog_dropped_total{} 0"),
        "{body}"
    );

    // Over TCP to rsyslog (imtcp, octet-counted frames), as `log tcp@`.
    let rsyslog_conf = dir.join("rsyslog.conf");
    let received = dir.join("received.log");
    std::fs::write(
        &rsyslog_conf,
        format!(
            "global(workDirectory=\"{d}\")\nmodule(load=\"imtcp\")\ninput(type=\"imtcp\" address=\"127.0.0.1\" port=\"10514\")\ntemplate(name=\"raw\" type=\"string\" string=\"%rawmsg%\\n\")\n*.* action(type=\"omfile\" file=\"{f}\" template=\"raw\")\n",
            d = dir.display(),
            f = received.display()
        ),
    )
    .unwrap();
    let ns = lab.balancer_ns().to_string();
    let rsyslogd = lab
        .spawn_in_ns(
            &ns,
            std::path::Path::new("rsyslogd"),
            &[
                "-n".into(),
                "-f".into(),
                rsyslog_conf.clone().into(),
                "-i".into(),
                dir.join("rsyslogd.pid").into(),
            ],
        )
        .expect("rsyslogd starts (is the `rsyslog` package installed?)");
    let daemon_up = || {
        let up = run_in_ns(&ns, || {
            std::net::TcpStream::connect("127.0.0.1:10514").is_ok()
        });
        up.unwrap()
    };
    lb_tests::wait_for("rsyslogd to listen", Duration::from_secs(10), daemon_up);
    std::fs::write(&path, with("syslog = \"tcp@127.0.0.1:10514\"\n")).unwrap();
    assert!(lb(&lab, &socket, &["reload"]).status.success());
    assert_eq!(ask(&lab), "be1");
    let mut lines = Vec::new();
    lb_tests::wait_for(
        "the access line in rsyslog's file",
        Duration::from_secs(10),
        || {
            lines = std::fs::read_to_string(&received)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(" web app/198.18.2.11:8080 "))
                .map(String::from)
                .collect();
            !lines.is_empty()
        },
    );
    assert!(
        lines[0].starts_with("<134>") && lines[0].contains(" lb["),
        "{lines:?}"
    );
    assert!(lines[0].ends_with("\"GET / HTTP/1.1\""), "{lines:?}");
    lab.stop(rsyslogd).unwrap();

    std::fs::write(&path, with("")).unwrap();
    assert!(lb(&lab, &socket, &["reload"]).status.success());
    assert_eq!(ask(&lab), "be1");
    daemon
        .set_read_timeout(Some(Duration::from_millis(500)))
        .unwrap();
    let mut buf = [0u8; 64];
    assert!(
        daemon.recv(&mut buf).is_err(),
        "no line after syslog was removed"
    );
    drop(lab);
    let _ = std::fs::remove_dir_all(&dir);
}
