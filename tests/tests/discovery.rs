//! DNS service discovery end to end: a real authoritative DNS server (Knot)
//! in a namespace of its own on the backends' segment (`Lab::add_host`),
//! serving SRV and A/AAAA records for the lab's backends; the agent's
//! `[service.discovery]` asks it; real connections from the client show
//! which backends the data plane uses. The zone is changed and reloaded,
//! the server is killed, the agent restarted without it.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use lb_tests::RunningLab;
use lb_tests::wait_for;
use lb_userspace::control::protocol::{
    BackendInfo, DiscoveryInfo, DiscoveryState, Health, ServiceInfo,
};
use lb_userspace::lab::{
    HostLink, Lab, LabHost, LabOptions, TCP_PORT, UDP_PORT, VIP_V4,
    client::http_get,
    run_in_ns,
    services::{METRICS_ADDR, vip_tcp4, vip_tcp6, vip_udp4},
};

const T: Duration = Duration::from_secs(3);
/// The discovery interval of these tests, and one round's timeout.
const INTERVAL: Duration = Duration::from_secs(1);
const TIMEOUT: Duration = Duration::from_millis(500);
/// Scheduling slack on a busy 2-core machine, on top of interval + timeout.
const SLACK: Duration = Duration::from_secs(1);
/// The zone Knot serves.
const ZONE: &str = "lab.test.";

/// Knot, serving `ZONE` from a file in `dir` on the host's addresses.
struct DnsServer {
    dir: PathBuf,
    host: LabHost,
    pid: Option<u32>,
    serial: u32,
}

impl DnsServer {
    /// Writes Knot's configuration and a first zone with `records`, and starts it.
    fn start(lab: &mut Lab, host: LabHost, records: &[String]) -> Self {
        let dir = std::env::temp_dir().join(&host.ns);
        std::fs::create_dir_all(dir.join("db")).expect("knot's directory");
        let conf = format!(
            "server:\n    rundir: \"{d}\"\n    pidfile: \"{d}/knot.pid\"\n    listen: [ {v4}@53, {v6}@53 ]\n\
             database:\n    storage: \"{d}/db\"\n\
             control:\n    listen: \"{d}/knot.sock\"\n\
             log:\n  - target: stderr\n    any: warning\n\
             template:\n  - id: default\n    storage: \"{d}\"\n    file: \"%s.zone\"\n    zonefile-sync: -1\n    zonefile-load: whole\n    journal-content: none\n\
             zone:\n  - domain: {ZONE}\n",
            d = dir.display(),
            v4 = host.v4,
            v6 = host.v6,
        );
        std::fs::write(dir.join("knot.conf"), conf).expect("knot.conf");
        let mut server = Self {
            dir,
            host,
            pid: None,
            serial: 0,
        };
        server.write_zone(records);
        server.run(lab);
        server
    }

    fn conf(&self) -> PathBuf {
        self.dir.join("knot.conf")
    }

    /// Starts knotd in the host's namespace and waits until it answers.
    fn run(&mut self, lab: &mut Lab) {
        let pid = lab
            .spawn_in_ns(
                &self.host.ns,
                Path::new("knotd"),
                &["-c".into(), self.conf().into()],
            )
            .expect("knotd starts (is the `knot` package installed?)");
        self.pid = Some(pid);
        let deadline = Instant::now() + Duration::from_secs(10);
        while !self.knotc(&["zone-status", ZONE]) {
            assert!(Instant::now() < deadline, "knotd did not come up");
            assert!(
                lab.try_wait(pid).expect("knotd's status").is_none(),
                "knotd exited"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Runs `knotc` against this server; whether it succeeded.
    fn knotc(&self, args: &[&str]) -> bool {
        lb_tests::output_within(
            Command::new("knotc")
                .arg("-c")
                .arg(self.conf())
                .args(["-t", "5"])
                .args(args),
            Duration::from_secs(10),
        )
        .status
        .success()
    }

    /// Writes the zone file with `records` and a new serial.
    fn write_zone(&mut self, records: &[String]) {
        self.serial += 1;
        let mut text = format!(
            "$ORIGIN {ZONE}\n$TTL 1\n@ SOA ns admin {} 60 60 600 1\n@ NS ns\nns A {}\n",
            self.serial, self.host.v4
        );
        for r in records {
            text.push_str(r);
            text.push('\n');
        }
        std::fs::write(self.dir.join(format!("{ZONE}zone")), text).expect("zone file");
    }

    /// Serves `records` from now on (returns once Knot has loaded them).
    fn change(&mut self, records: &[String]) {
        self.write_zone(records);
        assert!(self.knotc(&["-b", "zone-reload", ZONE]), "zone-reload");
    }

    /// Stops the server (the pid this test started, nothing else).
    fn kill(&mut self, lab: &mut Lab) {
        if let Some(pid) = self.pid.take() {
            lab.stop(pid).expect("stopping knotd");
        }
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        // knotd itself is stopped by the lab, which started it.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The lab's A and AAAA records of backends `1..=n` (`be{i}.lab.test.`).
fn address_records(lab: &Lab) -> Vec<String> {
    lab.backends()
        .iter()
        .flat_map(|b| {
            [
                format!("{} A {}", b.name, b.v4),
                format!("{} AAAA {}", b.name, b.v6),
            ]
        })
        .collect()
}

/// SRV records of `_lb._tcp.web` for `(backend index, weight)`.
fn srv(set: &[(usize, u16)]) -> Vec<String> {
    set.iter()
        .map(|(i, w)| format!("_lb._tcp.web SRV 0 {w} {TCP_PORT} be{i}"))
        .collect()
}

/// Builds a lab with `backends` backends and a DNS server serving `records`
/// (the backends' addresses are always there), then runs the agent with
/// `services` (TOML) on top of the lab's interfaces and metrics (with a
/// frontend, the VIP is made local to the balancer first).
fn start(
    tag: &str,
    backends: usize,
    records: impl FnOnce(&Lab) -> Vec<String>,
    services: &str,
) -> (RunningLab, DnsServer) {
    let opts = LabOptions::from_env(backends).expect("lab options");
    let mut lab = Lab::create(tag, opts).expect("the lab");
    let host = lab
        .add_host(HostLink::Switch)
        .expect("the DNS server's host");
    if services.contains("[[frontend]]") {
        // An L7 frontend binds the VIP: it must be local, as with HAProxy.
        lab.make_local_on_balancer(VIP_V4.into())
            .expect("the VIP local on the balancer");
    }
    let mut all = address_records(&lab);
    all.extend(records(&lab));
    let dns = DnsServer::start(&mut lab, host, &all);
    let dir = std::env::temp_dir().join(lab.balancer_ns());
    std::fs::create_dir_all(&dir).expect("config dir");
    let config_path = dir.join("lb.toml");
    let text = format!(
        "interfaces = [\"lbc\", \"lbb\"]\nmetrics = \"{METRICS_ADDR}\"\n\n{}",
        services.replace("NAMESERVER", &dns.host.v4.to_string())
    );
    std::fs::write(&config_path, text).expect("lb.toml");
    let socket = dir.join("lb.sock");
    let agent =
        lb_userspace::demo::start_agent(&mut lab, &config_path, &socket).expect("the agent starts");
    (
        RunningLab {
            lab,
            agent,
            config_path,
            socket,
        },
        dns,
    )
}

/// The output of `lb ARGS --json`.
fn show(lab: &RunningLab, args: &[&str]) -> Vec<u8> {
    let out = lab.lb(args);
    assert!(out.status.success(), "lb {args:?}");
    out.stdout
}

fn service(lab: &RunningLab, name: &str) -> ServiceInfo {
    let list: Vec<ServiceInfo> =
        serde_json::from_slice(&show(lab, &["show", "services", "--json"])).expect("json");
    list.into_iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no service {name}"))
}

fn backends(lab: &RunningLab, name: &str) -> Vec<BackendInfo> {
    serde_json::from_slice(&show(lab, &["show", "backends", name, "--json"])).expect("json")
}

/// The backend addresses `lb show backends` lists for a service.
fn addresses(lab: &RunningLab, name: &str) -> BTreeSet<SocketAddr> {
    backends(lab, name).iter().map(|b| b.address).collect()
}

/// Addresses of backends `indexes` on `port`, IPv4 or IPv6.
fn lab_addresses(lab: &RunningLab, indexes: &[usize], port: u16, v6: bool) -> BTreeSet<SocketAddr> {
    indexes
        .iter()
        .map(|&i| {
            let b = &lab.lab.backends()[i - 1];
            if v6 {
                SocketAddr::new(b.v6.into(), port)
            } else {
                SocketAddr::new(b.v4.into(), port)
            }
        })
        .collect()
}

/// `n` new connections (or UDP queries) to `vip`, tallied by who answered.
fn tally(lab: &RunningLab, vip: SocketAddr, n: usize, udp: bool) -> BTreeMap<String, usize> {
    lb_tests::tally(lab.lab.client_ns(), vip, n, udp)
}

/// Asserts that `n` requests to `vip` are answered by exactly `names`.
fn assert_served_by(lab: &RunningLab, vip: SocketAddr, udp: bool, names: &[&str]) {
    let t = tally(lab, vip, 120, udp);
    let got: BTreeSet<&str> = t.keys().map(String::as_str).collect();
    let want: BTreeSet<&str> = names.iter().copied().collect();
    assert_eq!(got, want, "{vip} answered by {t:?}");
}

/// Stops the agent (it leaves the program forwarding) and starts it again.
fn restart_agent(lab: &mut RunningLab) {
    lab.lab.stop(lab.agent).expect("stopping the agent");
    lab.agent = lb_userspace::demo::start_agent(&mut lab.lab, &lab.config_path, &lab.socket)
        .expect("the agent starts again");
}

const SRV_SERVICES: &str = r#"
[[service]]
name = "web"
vip = "198.18.100.1:80"
[service.discovery]
name = "_lb._tcp.web.lab.test"
nameservers = ["NAMESERVER"]
interval = "1s"
timeout = "500ms"
[service.health]
kind = "tcp"
interval = "200ms"

[[service]]
name = "web6"
vip = "[fd00:18:100::1]:80"
[service.discovery]
name = "_lb._tcp.web.lab.test"
nameservers = ["NAMESERVER"]
interval = "1s"
timeout = "500ms"
"#;

/// SRV records name the backends (IPv4 and, resolved to AAAA, IPv6); a
/// changed zone is followed within one interval; with the server gone the
/// set stays and `lb show services` says discovery is failing; the server
/// back, the agent follows it again; a restart while it is gone keeps the
/// last set.
#[test]
fn srv_backends_follow_the_zone_and_stay_when_the_dns_server_dies() {
    let (mut lab, mut dns) = start("dsrv", 4, |_| srv(&[(1, 1), (2, 2)]), SRV_SERVICES);

    // Resolved before the data plane was filled: there from the start.
    let web = service(&lab, "web");
    let d = web.discovery.expect("web has a discovery");
    assert_eq!(
        (d.state, d.backends, web.backends),
        (DiscoveryState::Ok, 2, 2),
        "{d:?}"
    );
    assert_eq!(
        addresses(&lab, "web"),
        lab_addresses(&lab, &[1, 2], TCP_PORT, false)
    );
    assert_eq!(
        addresses(&lab, "web6"),
        lab_addresses(&lab, &[1, 2], TCP_PORT, true)
    );
    // Health-checked like any backend.
    wait_for("web's backends up", Duration::from_secs(5), || {
        backends(&lab, "web").iter().all(|b| b.health == Health::Up)
    });
    let t = tally(&lab, vip_tcp4(), 300, false);
    assert_eq!(t.keys().collect::<Vec<_>>(), ["be1", "be2"], "{t:?}");
    // SRV weights 1:2 are Maglev weights.
    let be2 = t["be2"] as f64 / 300.0;
    assert!(
        (0.55..0.78).contains(&be2),
        "be2 took {be2:.2} of new connections: {t:?}"
    );
    assert_served_by(&lab, vip_tcp6(), false, &["be1", "be2"]);

    // The zone changes: be1 leaves, be3 and be4 join.
    dns.change(&[address_records(&lab.lab), srv(&[(2, 1), (3, 1), (4, 1)])].concat());
    let want = lab_addresses(&lab, &[2, 3, 4], TCP_PORT, false);
    let took = wait_for("web to follow the zone", INTERVAL + TIMEOUT + SLACK, || {
        addresses(&lab, "web") == want
    });
    println!("the backends followed the zone {took:?} after the reload (interval {INTERVAL:?})");
    wait_for(
        "web6 to follow the zone",
        INTERVAL + TIMEOUT + SLACK,
        || addresses(&lab, "web6") == lab_addresses(&lab, &[2, 3, 4], TCP_PORT, true),
    );
    wait_for("the new backends up", Duration::from_secs(5), || {
        backends(&lab, "web").iter().all(|b| b.health == Health::Up)
    });
    assert_served_by(&lab, vip_tcp4(), false, &["be2", "be3", "be4"]);
    assert_served_by(&lab, vip_tcp6(), false, &["be2", "be3", "be4"]);

    // The server dies: the set stays, and the agent says it is failing.
    dns.kill(&mut lab.lab);
    let failing = |lab: &RunningLab| {
        service(lab, "web")
            .discovery
            .is_some_and(|d| d.state == DiscoveryState::Failing)
    };
    wait_for(
        "web's discovery to fail",
        INTERVAL + TIMEOUT + SLACK,
        || failing(&lab),
    );
    let d = service(&lab, "web").discovery.expect("discovery");
    assert_eq!(d.backends, 3, "{d:?}");
    assert!(d.last_error.is_some(), "{d:?}");
    assert!(d.since_success_ms.is_some(), "{d:?}");
    let all: Vec<DiscoveryInfo> =
        serde_json::from_slice(&show(&lab, &["show", "discovery", "--json"])).expect("json");
    assert_eq!(all.len(), 2, "{all:?}");
    let table = lab.lb(&["show", "services"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("failing"));
    // A few more failed rounds change nothing.
    std::thread::sleep(2 * INTERVAL);
    assert_eq!(addresses(&lab, "web"), want);
    assert_served_by(&lab, vip_tcp4(), false, &["be2", "be3", "be4"]);

    // The server back with another zone: the same agent follows it again.
    dns.write_zone(&[address_records(&lab.lab), srv(&[(1, 1)])].concat());
    dns.run(&mut lab.lab);
    let be1 = lab_addresses(&lab, &[1], TCP_PORT, false);
    wait_for(
        "web to follow the returned server",
        INTERVAL + TIMEOUT + SLACK,
        || addresses(&lab, "web") == be1,
    );
    // web6 asks on its own schedule: its set too before the server dies.
    let be1_v6 = lab_addresses(&lab, &[1], TCP_PORT, true);
    wait_for(
        "web6 to follow the returned server",
        INTERVAL + TIMEOUT + SLACK,
        || addresses(&lab, "web6") == be1_v6,
    );
    assert_eq!(
        service(&lab, "web").discovery.map(|d| d.state),
        Some(DiscoveryState::Ok)
    );
    wait_for("be1 up", Duration::from_secs(5), || {
        backends(&lab, "web").iter().all(|b| b.health == Health::Up)
    });
    assert_served_by(&lab, vip_tcp4(), false, &["be1"]);

    // A restart while the DNS is down keeps the last set (cached beside the config).
    dns.kill(&mut lab.lab);
    wait_for(
        "web's discovery to fail again",
        INTERVAL + TIMEOUT + SLACK,
        || failing(&lab),
    );
    restart_agent(&mut lab);
    assert_eq!(addresses(&lab, "web"), be1);
    assert_eq!(addresses(&lab, "web6"), be1_v6);
    assert!(failing(&lab), "{:?}", service(&lab, "web").discovery);
    assert_served_by(&lab, vip_tcp4(), false, &["be1"]);
    assert_served_by(&lab, vip_tcp6(), false, &["be1"]);
}

const A_SERVICES: &str = r#"
[[service]]
name = "dns4"
vip = "198.18.100.1:53"
protocol = "udp"
[[service.backend]]
address = "198.18.2.11:5353"
[service.discovery]
name = "udp.lab.test"
type = "a"
port = 5353
nameservers = ["NAMESERVER"]
interval = "1s"
timeout = "500ms"
hold = "2s"
"#;

/// A records with a configured port fill a UDP service beside its static
/// backend; when the name goes (NXDOMAIN) the discovered backends stay for
/// the hold time, then only the static one is left.
#[test]
fn a_records_add_to_static_backends_and_nxdomain_removes_them_after_the_hold() {
    let a = |lab: &Lab, set: &[usize]| -> Vec<String> {
        set.iter()
            .map(|&i| format!("udp A {}", lab.backends()[i - 1].v4))
            .collect()
    };
    let (lab, mut dns) = start("da", 3, |lab| a(lab, &[2, 3]), A_SERVICES);
    let all = lab_addresses(&lab, &[1, 2, 3], UDP_PORT, false);
    assert_eq!(addresses(&lab, "dns4"), all);
    assert_served_by(&lab, vip_udp4(), true, &["be1", "be2", "be3"]);

    // The name disappears: NXDOMAIN is an answer, held for 2 s.
    dns.change(&address_records(&lab.lab));
    wait_for("the discovery to hold", INTERVAL + TIMEOUT + SLACK, || {
        service(&lab, "dns4")
            .discovery
            .is_some_and(|d| d.state == DiscoveryState::Holding)
    });
    let d = service(&lab, "dns4").discovery.expect("discovery");
    assert!(
        d.detail.as_deref().unwrap_or("").starts_with("NXDOMAIN"),
        "{d:?}"
    );
    assert_eq!(addresses(&lab, "dns4"), all, "held");
    let be1 = lab_addresses(&lab, &[1], UDP_PORT, false);
    let took = wait_for(
        "the hold to end",
        Duration::from_secs(2) + INTERVAL + TIMEOUT + SLACK,
        || addresses(&lab, "dns4") == be1,
    );
    println!("the discovered backends left {took:?} after the discovery started holding (hold 2s)");
    assert_eq!(
        service(&lab, "dns4")
            .discovery
            .map(|d| (d.state, d.backends)),
        Some((DiscoveryState::Ok, 0))
    );
    assert_served_by(&lab, vip_udp4(), true, &["be1"]);
}

const POOL_SERVICES: &str = r#"
[[service]]
name = "http-l7"
vip = "198.18.100.1:80"
mode = "l7"

[[frontend]]
name = "http"
binds = ["198.18.100.1:80"]
default_pool = "app"

[[pool]]
name = "app"
[pool.discovery]
name = "_lb._tcp.web.lab.test"
nameservers = ["NAMESERVER"]
interval = "1s"
timeout = "500ms"
"#;

/// The same for an L7 pool: its servers come from SRV records and follow
/// the zone (the proxy restarts beside itself with the new servers).
#[test]
fn l7_pool_servers_follow_srv_records() {
    let (lab, mut dns) = start("dpool", 3, |_| srv(&[(1, 1), (2, 1)]), POOL_SERVICES);
    let ask = |lab: &RunningLab| -> BTreeSet<String> {
        let vip = SocketAddr::new(VIP_V4.into(), 80);
        run_in_ns(lab.lab.client_ns(), move || {
            (0..20)
                .map(|i| {
                    let (status, body) = http_get(vip, "/", T)
                        .unwrap_or_else(|e| panic!("request {i} to {vip}: {e}"));
                    assert_eq!(status, 200, "{body}");
                    body.trim().to_string()
                })
                .collect()
        })
        .expect("client namespace")
    };
    let names = |list: &[&str]| list.iter().map(|s| s.to_string()).collect::<BTreeSet<_>>();
    assert_eq!(ask(&lab), names(&["be1", "be2"]));
    assert_eq!(
        addresses(&lab, "pool:app"),
        lab_addresses(&lab, &[1, 2], TCP_PORT, false)
    );
    dns.change(&[address_records(&lab.lab), srv(&[(3, 1)])].concat());
    let be3 = lab_addresses(&lab, &[3], TCP_PORT, false);
    wait_for(
        "the pool to follow the zone",
        INTERVAL + TIMEOUT + SLACK,
        || addresses(&lab, "pool:app") == be3,
    );
    // The new proxy takes over beside the old one; give it a moment to bind.
    wait_for("requests to reach be3 only", Duration::from_secs(5), || {
        ask(&lab) == names(&["be3"])
    });
    let all: Vec<DiscoveryInfo> =
        serde_json::from_slice(&show(&lab, &["show", "discovery", "--json"])).expect("json");
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(
        (all[0].group.as_str(), all[0].state),
        ("pool:app", DiscoveryState::Ok)
    );
}
