use super::*;
use lb_common::{DEFAULT_RING_SIZE, MAX_VIPS};

/// Joins lines with '\n' so a test's line numbers are its slice indices + 1.
fn text(lines: &[&str]) -> String {
    lines.join("\n") + "\n"
}

fn errors(lines: &[&str]) -> Vec<ConfigError> {
    match parse(&text(lines), "lb.toml") {
        Ok(c) => panic!("expected errors, got {c:?}"),
        Err(ConfigErrors(e)) => e,
    }
}

/// Asserts exactly one error, on `line`, whose reason contains `needle`.
#[track_caller]
fn expect_one(lines: &[&str], line: usize, needle: &str) {
    let errs = errors(lines);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    assert_eq!(errs[0].line, line, "{errs:#?}");
    assert!(
        errs[0].reason.contains(needle),
        "{:?} does not contain {needle:?}",
        errs[0].reason
    );
}

/// A minimal valid service, lines 2..=6 after the `interfaces` line.
const HEAD: &str = "interfaces = [\"eth0\"]";

fn svc(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec![
        HEAD,
        "[[service]]",
        "name = \"web\"",
        "vip = \"198.18.100.1:80\"",
        "[[service.backend]]",
        "address = \"198.18.2.11:8080\"",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn full_example_parses() {
    let t = text(&[
        "interfaces = [\"eth0\", \"eth1\"]",
        "xdp_mode = \"generic\"",
        "metrics = \"127.0.0.1:9100\"",
        "",
        "[[service]]",
        "name = \"web\"",
        "vip = \"198.18.100.1:80\"",
        "ring_size = 251",
        "[[service.backend]]",
        "address = \"198.18.2.11:8080\"",
        "[[service.backend]]",
        "address = \"198.18.2.12:8080\"",
        "weight = 0",
        "",
        "[[service]]",
        "name = \"dns6\"",
        "vip = \"[fd00:18:100::1]:53\"",
        "protocol = \"udp\"",
        "[[service.backend]]",
        "address = \"[fd00:18:2::11]:5353\"",
        "weight = 65535",
        "",
        "[[service]]",
        "name = \"proxy\"",
        "vip = \"198.18.100.2:443\"",
        "mode = \"l7\"",
    ]);
    let c = parse(&t, "lb.toml").unwrap();
    let expected = Config {
        interfaces: vec!["eth0".into(), "eth1".into()],
        xdp_mode: XdpModeSetting::Generic,
        metrics: Some("127.0.0.1:9100".parse().unwrap()),
        new_flow_limit: DEFAULT_NEW_FLOW_LIMIT,
        deny: Vec::new(),
        encap_source_v4: None,
        encap_source_v6: None,
        services: vec![
            Service {
                name: "web".into(),
                vip: "198.18.100.1:80".parse().unwrap(),
                protocol: Protocol::Tcp,
                mode: Mode::L4,
                forwarding: Forwarding::Nat,
                mss_clamp: false,
                ring_size: 251,
                backends: vec![
                    BackendConfig {
                        address: "198.18.2.11:8080".parse().unwrap(),
                        weight: 1,
                        line: 9,
                    },
                    BackendConfig {
                        address: "198.18.2.12:8080".parse().unwrap(),
                        weight: 0,
                        line: 11,
                    },
                ],
                health: None,
                discovery: None,
                line: 5,
            },
            Service {
                name: "dns6".into(),
                vip: "[fd00:18:100::1]:53".parse().unwrap(),
                protocol: Protocol::Udp,
                mode: Mode::L4,
                forwarding: Forwarding::Nat,
                mss_clamp: false,
                ring_size: DEFAULT_RING_SIZE,
                backends: vec![BackendConfig {
                    address: "[fd00:18:2::11]:5353".parse().unwrap(),
                    weight: 65535,
                    line: 19,
                }],
                health: None,
                discovery: None,
                line: 15,
            },
            Service {
                name: "proxy".into(),
                vip: "198.18.100.2:443".parse().unwrap(),
                protocol: Protocol::Tcp,
                mode: Mode::L7,
                forwarding: Forwarding::Nat,
                mss_clamp: false,
                ring_size: DEFAULT_RING_SIZE,
                backends: vec![],
                health: None,
                discovery: None,
                line: 23,
            },
        ],
        bgp: None,
        proxy: ProxySection::default(),
    };
    assert_eq!(c, expected);
    assert_eq!(c.services[1].protocol.number(), 17);
    assert_eq!(c.services[0].protocol.number(), 6);
}

#[test]
fn bgp_section() {
    let mut lines = svc(&[]);
    lines.extend([
        "[bgp]",
        "bird_socket = \"/run/bird/bird.ctl\"",
        "include_file = \"/etc/bird/lb-vips.conf\"",
    ]);
    let c = parse(&text(&lines), "lb.toml").unwrap();
    let bgp = c.bgp.unwrap();
    assert_eq!(bgp.bird_socket, std::path::Path::new("/run/bird/bird.ctl"));
    assert_eq!(bgp.protocol, DEFAULT_BGP_PROTOCOL);
    assert_eq!(bgp.line, 7);

    let mut lines = svc(&[]);
    lines.extend([
        "[bgp]",
        "bird_socket = \"bird.ctl\"",
        "include_file = \"/etc/bird/lb-vips.conf\"",
    ]);
    expect_one(&lines, 8, "must be an absolute path");
    let mut lines = svc(&[]);
    lines.extend(["[bgp]", "bird_socket = \"/run/bird.ctl\""]);
    expect_one(&lines, 7, "needs `include_file`");
    let mut lines = svc(&[]);
    lines.extend([
        "[bgp]",
        "bird_socket = \"/run/bird.ctl\"",
        "include_file = \"/etc/bird/lb.conf\"",
        "protocol = \"lb-vips\"",
    ]);
    expect_one(&lines, 10, "not a BIRD protocol name");
    let mut lines = svc(&[]);
    lines.extend(["[bgp]", "socket = \"/run/bird.ctl\""]);
    expect_one(&lines, 8, "unknown field");
}

#[test]
fn doc_example_parses_with_defaults() {
    let c = parse(&text(&svc(&[])), "lb.toml").unwrap();
    assert_eq!(c.xdp_mode, XdpModeSetting::Driver);
    assert_eq!(c.metrics, None);
    assert_eq!(c.services[0].ring_size, 65537);
    assert_eq!(c.services[0].backends[0].weight, 1);
}

#[test]
fn new_flow_limit_and_deny_list() {
    let c = parse(&text(&svc(&[])), "lb.toml").unwrap();
    assert_eq!(c.new_flow_limit, DEFAULT_NEW_FLOW_LIMIT);
    assert!(c.deny.is_empty());
    let mut lines = svc(&[]);
    lines.insert(1, "new_flow_limit = 0");
    lines.insert(
        2,
        "deny = [\"203.0.113.0/24\", \"2001:db8::/32\", \"198.51.100.7\"]",
    );
    let c = parse(&text(&lines), "lb.toml").unwrap();
    assert_eq!(c.new_flow_limit, 0);
    let shown: Vec<String> = c.deny.iter().map(ToString::to_string).collect();
    assert_eq!(
        shown,
        ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7/32"]
    );

    let mut lines = svc(&[]);
    lines.insert(1, "new_flow_limit = -1");
    expect_one(&lines, 2, "new_flow_limit -1 is out of range");
    for (entry, needle) in [
        (
            "\"203.0.113.5/24\"",
            "host bits are set; the network is 203.0.113.0/24",
        ),
        (
            "\"203.0.113.0/33\"",
            "prefix length \"33\" is not a number 0..=32",
        ),
        ("\"2001:db8::/129\"", "0..=128"),
        (
            "\"example.org/24\"",
            "\"example.org\" is not an IPv4 or IPv6 address",
        ),
        (
            "\"10.0.0.0/8\", \"10.0.0.0/8\"",
            "is listed twice (first on line 2)",
        ),
    ] {
        let line = format!("deny = [{entry}]");
        let mut lines = svc(&[]);
        lines.insert(1, Box::leak(line.into_boxed_str()));
        expect_one(&lines, 2, needle);
    }
}

#[test]
fn display_is_file_line_column_reason() {
    let errs = parse(&text(&["interfaces = [\"a/b\"]"]), "lb.toml").unwrap_err();
    let s = errs.to_string();
    // Whole-file errors (line 0) sort first and leave out the position.
    assert!(s.starts_with("lb.toml: no services"), "{s}");
    assert!(s.contains("\nlb.toml:1:15: interface name \"a/b\""), "{s}");
}

#[test]
fn load_missing_file() {
    let errs = load(Path::new("/nonexistent/lb.toml")).unwrap_err();
    assert_eq!(errs.0.len(), 1);
    assert_eq!(errs.0[0].line, 0);
    assert!(
        errs.to_string()
            .starts_with("/nonexistent/lb.toml: cannot read")
    );
}

#[test]
fn interfaces_missing() {
    let mut lines = svc(&[]);
    lines[0] = "";
    expect_one(&lines, 0, "missing `interfaces`");
}

#[test]
fn interfaces_empty() {
    let mut lines = svc(&[]);
    lines[0] = "interfaces = []";
    expect_one(&lines, 1, "is empty");
}

#[test]
fn interface_names() {
    for (list, needle) in [
        ("interfaces = [\"\"]", "name is empty"),
        ("interfaces = [\"abcdefghijklmnop\"]", "at most 15"),
        ("interfaces = [\"a b\"]", "whitespace"),
        ("interfaces = [\"a/b\"]", "'/'"),
        (
            "interfaces = [\"eth0\", \"eth0\"]",
            "listed twice (first on line 1)",
        ),
    ] {
        let mut lines = svc(&[]);
        lines[0] = list;
        expect_one(&lines, 1, needle);
    }
    // 15 bytes is fine.
    let mut lines = svc(&[]);
    lines[0] = "interfaces = [\"abcdefghijklmno\"]";
    assert!(parse(&text(&lines), "f").is_ok());
}

#[test]
fn a_missing_interface_is_reported_at_its_position_when_checking_this_host() {
    let mut lines = svc(&[]);
    lines[0] = "interfaces = [\"lo\", \"lbnosuch0\"]";
    let t = text(&lines);
    // The file alone is fine; on this host the second name is not.
    assert!(parse(&t, "lb.toml").is_ok());
    let errs = parse_for_this_host(&t, "lb.toml").unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    assert_eq!((errs.0[0].line, errs.0[0].column), (1, 21));
    assert!(
        errs.to_string()
            .starts_with("lb.toml:1:21: interface \"lbnosuch0\" does not exist"),
        "{errs}"
    );
    lines[0] = "interfaces = [\"lo\"]";
    assert!(parse_for_this_host(&text(&lines), "lb.toml").is_ok());
}

#[test]
fn interfaces_on_several_lines() {
    let mut lines = svc(&[]);
    lines[0] = "interfaces = [\n  \"eth0\",\n  \"eth0\",\n]";
    let errs = parse(&text(&lines), "f").unwrap_err().0;
    assert_eq!(errs.len(), 1);
    assert_eq!((errs[0].line, errs[0].column), (3, 3));
}

#[test]
fn bad_xdp_mode() {
    let mut lines = svc(&[]);
    lines.insert(1, "xdp_mode = \"native\"");
    expect_one(&lines, 2, "unknown xdp_mode \"native\"");
}

#[test]
fn bad_metrics() {
    let mut lines = svc(&[]);
    lines.insert(1, "metrics = \"localhost:9100\"");
    expect_one(
        &lines,
        2,
        "metrics \"localhost:9100\" is not a socket address",
    );
}

#[test]
fn no_services() {
    expect_one(&[HEAD], 0, "no services");
}

#[test]
fn service_name_rules() {
    let mut lines = svc(&[]);
    lines[2] = "name = \"\"";
    expect_one(&lines, 3, "service name is empty");

    let mut lines = svc(&[]);
    lines[2] = "name = \"web site\"";
    expect_one(&lines, 3, "may only contain");

    let mut lines = svc(&[]);
    lines.remove(2);
    expect_one(&lines, 2, "has no `name`");

    let lines = svc(&[
        "[[service]]",
        "name = \"web\"",
        "vip = \"198.18.100.2:80\"",
        "[[service.backend]]",
        "address = \"198.18.2.11:8080\"",
    ]);
    expect_one(&lines, 8, "\"web\" is already used (line 3)");
}

#[test]
fn vip_rules() {
    for (vip, needle) in [
        (
            "vip = \"198.18.100.1\"",
            "has no port; expected \"a.b.c.d:port\"",
        ),
        ("vip = \"fd00::1:80\"", "has no port (IPv6 needs brackets)"),
        (
            "vip = \"198.18.100.1:http\"",
            "is not a socket address; expected",
        ),
        ("vip = \"web:80\"", "[ipv6]:port"),
        ("vip = \"198.18.100.1:0\"", "port 0"),
        ("vip = \"0.0.0.0:80\"", "unspecified"),
        ("vip = \"[::]:80\"", "unspecified"),
        ("vip = \"224.0.0.1:80\"", "multicast"),
        ("vip = \"[ff02::1]:80\"", "multicast"),
    ] {
        let mut lines = svc(&[]);
        lines[3] = vip;
        expect_one(&lines, 4, needle);
    }
    let mut lines = svc(&[]);
    lines.remove(3);
    expect_one(&lines, 2, "has no `vip`");
}

#[test]
fn duplicate_vip() {
    let dup = svc(&[
        "[[service]]",
        "name = \"web2\"",
        "vip = \"198.18.100.1:80\"",
        "[[service.backend]]",
        "address = \"198.18.2.11:8080\"",
    ]);
    expect_one(&dup, 9, "already used by service \"web\" (line 2)");
    // The same address and port with another protocol is a different VIP.
    let mut other = dup.clone();
    other.insert(9, "protocol = \"udp\"");
    assert!(parse(&text(&other), "f").is_ok());
}

#[test]
fn bad_protocol_and_mode() {
    let mut lines = svc(&[]);
    lines.insert(4, "protocol = \"sctp\"");
    expect_one(&lines, 5, "unknown protocol \"sctp\"");
    let mut lines = svc(&[]);
    lines.insert(4, "mode = \"l3\"");
    expect_one(&lines, 5, "unknown mode \"l3\"");
}

#[test]
fn forwarding_modes_and_their_rules() {
    // Line numbers: 1 HEAD, 2 [[service]], 3 name, 4 vip, 5 inserted,
    // 6 [[service.backend]], 7 address.
    let dsr = |mode: &'static str, port: &'static str| {
        let mut lines = svc(&[]);
        lines.insert(4, mode);
        lines[6] = port;
        lines
    };
    let ok = parse(
        &text(&dsr(
            "forwarding = \"ipip\"",
            "address = \"198.18.2.11:80\"",
        )),
        "t.toml",
    )
    .expect("ipip with the VIP's port");
    assert_eq!(ok.services[0].forwarding, Forwarding::Ipip);
    assert!(!ok.services[0].mss_clamp);
    let ok = parse(&text(&svc(&[])), "t.toml").expect("default");
    assert_eq!(ok.services[0].forwarding, Forwarding::Nat);
    expect_one(
        &dsr("forwarding = \"l2\"", "address = \"198.18.2.11:8080\""),
        7,
        "must use the VIP's port 80 with forwarding = \"l2\"",
    );
    expect_one(
        &dsr("forwarding = \"dsr\"", "address = \"198.18.2.11:80\""),
        5,
        "unknown forwarding \"dsr\"; expected \"nat\", \"ipip\" or \"l2\"",
    );
    let mut lines = dsr("forwarding = \"l2\"", "address = \"198.18.2.11:80\"");
    lines.insert(5, "mss_clamp = true");
    expect_one(&lines, 6, "mss_clamp applies to forwarding = \"ipip\" only");
    let mut lines = svc(&[]);
    lines.insert(4, "mode = \"l7\"");
    lines.insert(5, "forwarding = \"ipip\"");
    expect_one(&lines, 6, "`forwarding` applies to l4 services only");
}

#[test]
fn encap_sources_are_checked_by_family_and_length() {
    let with = |line: &'static str| {
        let mut lines = svc(&[]);
        lines.insert(1, line);
        lines
    };
    let ok = parse(&text(&with("encap_source_v4 = \"10.1.0.0/24\"")), "t.toml").expect("v4");
    assert_eq!(ok.encap_source_v4.map(|p| p.len), Some(24));
    let ok = parse(&text(&with("encap_source_v6 = \"fd00::1\"")), "t.toml").expect("v6");
    assert_eq!(ok.encap_source_v6.map(|p| p.len), Some(128));
    expect_one(
        &with("encap_source_v4 = \"fd00::1\""),
        2,
        "expected an IPv4 address",
    );
    expect_one(
        &with("encap_source_v6 = \"10.0.0.1\""),
        2,
        "expected an IPv6 address",
    );
    expect_one(
        &with("encap_source_v6 = \"fd00::/64\""),
        2,
        "use a /96 or longer",
    );
    expect_one(
        &with("encap_source_v4 = \"10.1.0.1/24\""),
        2,
        "host bits are set",
    );
}

#[test]
fn ring_size_rules() {
    for (ring, needle) in [
        ("ring_size = 1", "too small"),
        ("ring_size = -7", "too small"),
        ("ring_size = 65539", "too large"),
        (
            "ring_size = 1000",
            "not a prime; Maglev needs a prime table size (e.g. 997)",
        ),
    ] {
        let mut lines = svc(&[]);
        lines.insert(4, ring);
        expect_one(&lines, 5, needle);
    }
    let mut lines = svc(&[]);
    lines.insert(4, "ring_size = 2");
    assert_eq!(parse(&text(&lines), "f").unwrap().services[0].ring_size, 2);
}

#[test]
fn l4_and_l7_services_may_have_no_backend() {
    // Backends may come later from `lb add backend` (see `rules`).
    let lines = &svc(&[])[..4];
    let c = parse(&text(lines), "f").unwrap();
    assert!(c.services[0].backends.is_empty());
    let mut l7 = lines.to_vec();
    l7.push("mode = \"l7\"");
    assert!(parse(&text(&l7), "f").is_ok());
}

#[test]
fn backend_address_rules() {
    for (addr, needle) in [
        ("address = \"198.18.2.11\"", "has no port"),
        ("address = \"198.18.2.11:0\"", "port 0"),
        ("address = \"0.0.0.0:80\"", "unspecified"),
        ("address = \"239.1.1.1:80\"", "multicast"),
        (
            "address = \"[fd00::11]:80\"",
            "NAT does not translate between address families",
        ),
    ] {
        let mut lines = svc(&[]);
        lines[5] = addr;
        expect_one(&lines, 6, needle);
    }
    let mut lines = svc(&[]);
    lines.remove(5);
    expect_one(&lines, 5, "backend has no `address`");
}

#[test]
fn duplicate_backend() {
    let lines = svc(&["[[service.backend]]", "address = \"198.18.2.11:8080\""]);
    expect_one(
        &lines,
        8,
        "listed twice in service \"web\" (first on line 5)",
    );
}

#[test]
fn weight_rules() {
    for (w, ok) in [
        ("weight = 0", true),
        ("weight = 65535", true),
        ("weight = 65536", false),
        ("weight = -1", false),
    ] {
        let lines = svc(&[w]);
        if ok {
            assert!(parse(&text(&lines), "f").is_ok(), "{w}");
        } else {
            expect_one(&lines, 7, "out of range; expected 0..=65535");
        }
    }
}

#[test]
fn more_active_backends_than_ring_slots() {
    let lines = svc(&[
        "[[service.backend]]",
        "address = \"198.18.2.12:8080\"",
        "[[service.backend]]",
        "address = \"198.18.2.13:8080\"",
        "[[service.backend]]",
        "address = \"198.18.2.14:8080\"",
        "weight = 0",
    ]);
    let mut small = lines.clone();
    small.insert(4, "ring_size = 2");
    expect_one(&small, 5, "3 backends with weight > 0 but ring_size is 2");
    let mut fits = lines;
    fits.insert(4, "ring_size = 3");
    assert!(parse(&text(&fits), "f").is_ok());
}

#[test]
fn too_many_services() {
    let mut t = format!("{HEAD}\n");
    for i in 0..=MAX_VIPS {
        t += &format!(
            "[[service]]\nname = \"s{i}\"\nvip = \"10.1.{}.{}:80\"\n[[service.backend]]\naddress = \"10.2.0.1:80\"\n",
            i / 256,
            i % 256
        );
    }
    let errs = parse(&t, "f").unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].line, 2 + 5 * MAX_VIPS as usize);
    assert!(errs[0].reason.contains("at most 512 (MAX_VIPS)"));
}

#[test]
fn too_many_backends() {
    let mut t = format!("{HEAD}\n");
    for s in 0..2 {
        // Inline tables, one per line: thousands of [[service.backend]] headers parse slowly.
        t += &format!("[[service]]\nname = \"s{s}\"\nvip = \"10.1.0.{s}:80\"\nbackend = [\n");
        // Service 1 repeats one of service 0's addresses: the data plane
        // gives each (service, backend) pair a slot, so it is one too many.
        let n = if s == 0 { lb_common::MAX_BACKENDS } else { 1 };
        for i in 0..n {
            t += &format!("{{ address = \"10.2.{}.{}:80\" }},\n", i / 256, i % 256);
        }
        t += "]\n";
    }
    let errs = parse(&t, "f").unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    // The closing bracket is the last line; the crossing backend is just above it.
    assert_eq!(errs[0].line, t.lines().count() - 1);
    assert!(errs[0].reason.contains("at most 4096 (MAX_BACKENDS)"));
}

#[test]
fn reports_every_mistake() {
    let lines = [
        "interfaces = [\"eth0\"]",
        "xdp_mode = \"fast\"",
        "[[service]]",
        "name = \"web\"",
        "vip = \"198.18.100.1:80\"",
        "ring_size = 100",
        "[[service.backend]]",
        "address = \"[fd00::1]:80\"",
    ];
    let errs = errors(&lines);
    let got: Vec<usize> = errs.iter().map(|e| e.line).collect();
    assert_eq!(got, [2, 6, 8], "{errs:#?}");
    assert!(errs[0].reason.contains("xdp_mode"));
    assert!(errs[1].reason.contains("not a prime"));
    assert!(errs[2].reason.contains("address families"));
}

#[test]
fn syntax_error_has_line() {
    let mut lines = svc(&[]);
    lines[3] = "vip = \"198.18.100.1:80";
    let errs = errors(&lines);
    assert_eq!(errs.len(), 1);
    assert_eq!(errs[0].line, 4, "{errs:?}");
    assert!(!errs[0].reason.contains('\n'));
}

#[test]
fn wrong_type_has_line() {
    let mut lines = svc(&[]);
    lines.push("weight = \"heavy\"");
    expect_one(&lines, 7, "invalid type");
}

/// The minimal service plus a `[service.health]` table on line 7, its fields from line 8.
fn with_health(fields: &[&'static str]) -> Vec<&'static str> {
    let mut lines = svc(&["[service.health]"]);
    lines.extend_from_slice(fields);
    lines
}

fn health_of(fields: &[&'static str]) -> HealthCheck {
    let c = parse(&text(&with_health(fields)), "f").unwrap();
    c.services[0].health.clone().unwrap()
}

#[test]
fn health_defaults() {
    assert_eq!(
        parse(&text(&svc(&[])), "f").unwrap().services[0].health,
        None
    );
    assert_eq!(
        health_of(&[]),
        HealthCheck {
            kind: CheckKind::Tcp,
            interval: Duration::from_secs(2),
            timeout: Duration::from_secs(2),
            rise: 2,
            fall: 3,
            port: None,
        }
    );
    let h = health_of(&["kind = \"http\"", "interval = \"500ms\""]);
    assert_eq!(
        h.timeout,
        Duration::from_millis(500),
        "timeout defaults to the interval"
    );
    assert_eq!(
        h.kind,
        CheckKind::Http(HttpCheck {
            method: "GET".into(),
            path: "/".into(),
            host: None,
            status: StatusMatch::Range(200, 399),
            body: None,
        })
    );
}

#[test]
fn health_full_http() {
    let h = health_of(&[
        "kind = \"http\"",
        "interval = \"1m\"",
        "timeout = \"1s\"",
        "rise = 1",
        "fall = 100",
        "method = \"HEAD\"",
        "path = \"/health?full=1\"",
        "host = \"example.org\"",
        "status = [200, 204]",
        "body = \"ok\"",
    ]);
    assert_eq!(
        h,
        HealthCheck {
            kind: CheckKind::Http(HttpCheck {
                method: "HEAD".into(),
                path: "/health?full=1".into(),
                host: Some("example.org".into()),
                status: StatusMatch::List(vec![200, 204]),
                body: Some("ok".into()),
            }),
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(1),
            rise: 1,
            fall: 100,
            port: None,
        }
    );
}

#[test]
fn health_inline_table() {
    let lines = svc(&[]);
    let mut lines = lines[..4].to_vec();
    lines.push("health = { kind = \"tcp\", rise = 0 }");
    lines.push("[[service.backend]]");
    lines.push("address = \"198.18.2.11:8080\"");
    expect_one(&lines, 5, "rise 0 is out of range");
}

#[test]
fn health_status_forms() {
    for (status, expected) in [
        ("status = \"200-299\"", StatusMatch::Range(200, 299)),
        ("status = \"204\"", StatusMatch::Range(204, 204)),
        ("status = 204", StatusMatch::List(vec![204])),
        ("status = [200, 301]", StatusMatch::List(vec![200, 301])),
    ] {
        let fields = ["kind = \"http\"", status];
        match health_of(&fields).kind {
            CheckKind::Http(h) => assert_eq!(h.status, expected, "{status}"),
            CheckKind::Tcp => panic!("not http"),
        }
    }
}

#[test]
fn status_matches() {
    let range = StatusMatch::Range(200, 399);
    assert!(range.matches(200) && range.matches(399) && range.matches(302));
    assert!(!range.matches(199) && !range.matches(400) && !range.matches(503));
    let list = StatusMatch::List(vec![200, 204]);
    assert!(list.matches(204) && !list.matches(201));
}

#[test]
fn health_kind_rules() {
    expect_one(
        &with_health(&["kind = \"icmp\""]),
        8,
        "unknown health kind \"icmp\"; expected \"tcp\" or \"http\"",
    );
}

#[test]
fn health_duration_rules() {
    for (field, needle) in [
        ("interval = \"2\"", "interval \"2\" is not a duration"),
        ("interval = \"2 s\"", "is not a duration"),
        ("interval = \"1.5s\"", "is not a duration"),
        ("interval = \"s\"", "is not a duration"),
        ("interval = \"2d\"", "is not a duration"),
        ("interval = \"99999999999999999999ms\"", "is not a duration"),
        ("interval = \"99ms\"", "out of range; expected 100ms..=1h"),
        ("interval = \"61m\"", "out of range; expected 100ms..=1h"),
        ("timeout = \"soon\"", "timeout \"soon\" is not a duration"),
        ("timeout = \"0ms\"", "greater than zero"),
        (
            "timeout = \"3s\"",
            "longer than the interval 2s; it must be <= interval",
        ),
    ] {
        expect_one(&with_health(&[field]), 8, needle);
    }
    let h = health_of(&["interval = \"1h\"", "timeout = \"100ms\""]);
    assert_eq!(h.interval, Duration::from_secs(3600));
    assert_eq!(h.timeout, Duration::from_millis(100));
    assert_eq!(
        health_of(&["interval = \"100ms\""]).interval,
        Duration::from_millis(100)
    );
    // Equal to the interval is allowed.
    health_of(&["interval = \"1s\"", "timeout = \"1000ms\""]);
    // The comparison uses the given interval, on the timeout's line.
    expect_one(
        &with_health(&["interval = \"500ms\"", "timeout = \"1s\""]),
        9,
        "longer than the interval 500ms",
    );
    expect_one(&with_health(&["interval = 2"]), 8, "invalid type");
}

#[test]
fn udp_health_checks_need_a_tcp_port() {
    let base = "interfaces = [\"eth0\"]\n[[service]]\nname = \"dns\"\nvip = \"198.18.100.1:53\"\nprotocol = \"udp\"\n[[service.backend]]\naddress = \"198.18.2.11:53\"\n[service.health]\nkind = \"tcp\"\n";
    let errs = parse(base, "t.toml").unwrap_err();
    assert_eq!(errs.0.len(), 1, "{errs}");
    assert_eq!(errs.0[0].line, 8);
    assert!(errs.0[0].reason.contains("need `port`"), "{errs}");
    let ok = parse(&format!("{base}port = 8080\n"), "t.toml").unwrap();
    assert_eq!(ok.services[0].health.as_ref().unwrap().port, Some(8080));
    let errs = parse(&format!("{base}port = 70000\n"), "t.toml").unwrap_err();
    assert!(errs.0[0].reason.contains("out of range"), "{errs}");
}

#[test]
fn health_rise_fall_rules() {
    for (field, needle) in [
        ("rise = 0", "rise 0 is out of range; expected 1..=100"),
        ("rise = 101", "rise 101 is out of range"),
        ("fall = 0", "fall 0 is out of range"),
        ("fall = -3", "fall -3 is out of range"),
    ] {
        expect_one(&with_health(&[field]), 8, needle);
    }
}

#[test]
fn health_http_fields_need_http() {
    for field in [
        "method = \"GET\"",
        "path = \"/\"",
        "host = \"a\"",
        "status = 200",
        "body = \"ok\"",
    ] {
        expect_one(&with_health(&[field]), 8, "only applies to kind = \"http\"");
        let mut explicit = vec!["kind = \"tcp\""];
        explicit.push(field);
        expect_one(
            &with_health(&explicit),
            9,
            "only applies to kind = \"http\"",
        );
    }
}

#[test]
fn health_http_field_rules() {
    for (field, needle) in [
        (
            "method = \"get\"",
            "method \"get\" is not an uppercase token",
        ),
        ("method = \"\"", "is not an uppercase token"),
        ("method = \"GET /\"", "is not an uppercase token"),
        ("path = \"health\"", "path \"health\" must start with '/'"),
        ("path = \"\"", "must start with '/'"),
        ("path = \"/a b\"", "must not contain spaces"),
        ("host = \"a\\r\\nX: y\"", "control characters"),
        ("host = \"\"", "must be non-empty"),
        ("status = \"99-200\"", "out of range; codes are 100..=599"),
        ("status = \"200-600\"", "out of range; codes are 100..=599"),
        ("status = \"399-200\"", "is backwards"),
        ("status = \"2xx\"", "is not a range"),
        ("status = \"200-\"", "is not a range"),
        ("status = 600", "status 600 is out of range"),
        ("status = [200, 99]", "status 99 is out of range"),
        ("status = [\"200\"]", "status list holds a string"),
        ("status = []", "status list is empty"),
        ("status = true", "not a boolean"),
    ] {
        expect_one(&with_health(&["kind = \"http\"", field]), 9, needle);
    }
}

#[test]
fn health_reports_every_mistake() {
    let errs = errors(&with_health(&[
        "kind = \"http\"",
        "interval = \"10ms\"",
        "rise = 0",
        "path = \"x\"",
        "status = \"500-400\"",
    ]));
    let got: Vec<usize> = errs.iter().map(|e| e.line).collect();
    assert_eq!(got, [9, 10, 11, 12], "{errs:#?}");
}

#[test]
fn health_unknown_field() {
    expect_one(
        &with_health(&["intervall = \"2s\""]),
        8,
        "unknown field `intervall`",
    );
}

#[test]
fn unknown_field_has_line() {
    let mut lines = svc(&[]);
    lines[5] = "adress = \"198.18.2.11:8080\"";
    expect_one(&lines, 6, "unknown field `adress`");
    let mut lines = svc(&[]);
    lines.insert(1, "interface = [\"eth1\"]");
    expect_one(&lines, 2, "unknown field `interface`");
}

/// A service with only a `[service.discovery]` table (lines 5.. are its keys).
fn discovering(fields: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec![
        HEAD,
        "[[service]]",
        "name = \"web\"",
        "vip = \"198.18.100.1:80\"",
        "[service.discovery]",
    ];
    v.extend_from_slice(fields);
    v
}

fn discovery_of(fields: &[&'static str]) -> Discovery {
    parse(&text(&discovering(fields)), "lb.toml")
        .unwrap()
        .services
        .remove(0)
        .discovery
        .expect("a discovery")
}

const NS: &str = "nameservers = [\"198.18.2.241\"]";

#[test]
fn discovery_defaults_and_full_form() {
    let d = discovery_of(&["name = \"_http._tcp.web.lab.test\"", NS]);
    assert_eq!(
        d,
        Discovery {
            name: "_http._tcp.web.lab.test.".into(),
            record: RecordKind::Srv,
            nameservers: vec!["198.18.2.241:53".parse().unwrap()],
            interval: Duration::from_secs(5),
            timeout: Duration::from_secs(2),
            hold: Duration::from_secs(30),
            port: None,
            weight: 1,
        }
    );
    let d = discovery_of(&[
        "name = \"web.lab.test.\"",
        "type = \"a\"",
        "nameservers = [\"198.18.2.241:5353\", \"[fd00:18:2::241]:53\", \"fd00::53\"]",
        "interval = \"500ms\"",
        "hold = \"0s\"",
        "port = 8080",
        "weight = 3",
    ]);
    assert_eq!(d.name, "web.lab.test.");
    assert_eq!(d.record, RecordKind::A);
    assert_eq!(d.nameservers.len(), 3);
    assert_eq!(d.nameservers[2], "[fd00::53]:53".parse().unwrap());
    // The timeout defaults to the interval when that is shorter than 2s.
    assert_eq!(
        (d.interval, d.timeout, d.hold),
        (
            Duration::from_millis(500),
            Duration::from_millis(500),
            Duration::ZERO
        )
    );
    assert_eq!((d.port, d.weight), (Some(8080), 3));
}

#[test]
fn a_service_with_discovery_needs_no_static_backend_and_may_have_some() {
    let c = parse(
        &text(&discovering(&["name = \"_http._tcp.web.lab.test\"", NS])),
        "lb.toml",
    )
    .unwrap();
    assert!(c.services[0].backends.is_empty());
    let mut lines = svc(&[]);
    lines.extend(["[service.discovery]", "name = \"web.lab.test\"", NS]);
    let c = parse(&text(&lines), "lb.toml").unwrap();
    assert_eq!(c.services[0].backends.len(), 1);
    assert!(c.services[0].discovery.is_some());
}

#[test]
fn discovery_rules_with_their_lines() {
    let name = "name = \"_http._tcp.web.lab.test\"";
    expect_one(&discovering(&[NS]), 5, "has no `name`");
    expect_one(&discovering(&[name]), 5, "has no `nameservers`");
    expect_one(
        &discovering(&[name, "nameservers = []"]),
        7,
        "`nameservers` is empty",
    );
    for (bad, why) in [
        ("name = \"\"", "is empty"),
        ("name = \"a..b\"", "empty label"),
        ("name = \"web lab\"", "may only contain"),
        ("name = \"_http._tcp.web/lab\"", "may only contain"),
    ] {
        expect_one(&discovering(&[bad, NS]), 6, why);
    }
    let long = format!("name = \"{}.test\"", "a".repeat(64));
    let lines: Vec<&str> = discovering(&[NS])
        .into_iter()
        .chain([long.as_str()])
        .collect();
    expect_one(&lines, 7, "longer than 63");
    for (bad, why) in [
        ("nameservers = [\"dns.example\"]", "is not an address"),
        ("nameservers = [\"0.0.0.0\"]", "not a unicast"),
        ("nameservers = [\"198.18.2.241:0\"]", "port 0"),
        (
            "nameservers = [\"198.18.2.241\", \"198.18.2.241:53\"]",
            "listed twice",
        ),
    ] {
        expect_one(&discovering(&[name, bad]), 7, why);
    }
    for (bad, why) in [
        ("type = \"txt\"", "unknown discovery type"),
        (
            "type = \"aaaa\"",
            "the VIP 198.18.100.1:80 is IPv4; use type = \"a\"",
        ),
        ("interval = \"50ms\"", "out of range"),
        ("interval = \"soon\"", "not a duration"),
        ("timeout = \"0s\"", "greater than zero"),
        ("timeout = \"10s\"", "longer than the interval"),
        ("hold = \"2h\"", "out of range"),
        ("port = 80", "SRV records carry their own"),
        ("weight = 2", "SRV records carry their own"),
        ("ttl = 3", "unknown field `ttl`"),
    ] {
        expect_one(&discovering(&[name, NS, bad]), 8, why);
    }
    let a = "type = \"a\"";
    expect_one(&discovering(&[name, NS, a]), 5, "needs `port`");
    expect_one(
        &discovering(&[name, NS, a, "port = 70000"]),
        9,
        "out of range",
    );
    expect_one(
        &discovering(&[name, NS, a, "port = 80", "weight = -1"]),
        10,
        "out of range",
    );
}

#[test]
fn dsr_discovery_of_addresses_must_use_the_vip_port() {
    let mut lines = discovering(&["name = \"web.lab.test\"", NS, "type = \"a\"", "port = 8080"]);
    lines.insert(4, "forwarding = \"ipip\"");
    expect_one(&lines, 10, "must be the VIP's port 80");
    lines[9] = "port = 80";
    assert!(parse(&text(&lines), "lb.toml").is_ok());
}

#[test]
fn an_l4_service_without_backends_or_discovery_waits_for_the_cli() {
    let lines = [
        HEAD,
        "[[service]]",
        "name = \"web\"",
        "vip = \"198.18.100.1:80\"",
    ];
    let c = parse(&text(&lines), "lb.toml").unwrap();
    assert!(c.services[0].backends.is_empty() && c.services[0].discovery.is_none());
}

#[test]
fn pools_have_discovery_too() {
    let t = text(&[
        HEAD,
        "[[frontend]]",
        "name = \"web\"",
        "binds = [\"198.18.100.1:80\"]",
        "default_pool = \"app\"",
        "[[pool]]",
        "name = \"app\"",
        "[pool.discovery]",
        "name = \"_http._tcp.app.lab.test\"",
        "nameservers = [\"198.18.2.241\"]",
        "interval = \"1s\"",
    ]);
    let c = parse(&t, "lb.toml").unwrap();
    assert_eq!(c.proxy.2.len(), 1);
    assert_eq!(c.proxy.2[0].0, "app");
    assert_eq!(c.proxy.2[0].1.interval, Duration::from_secs(1));
    let bad = t.replace("interval = \"1s\"", "interval = \"1 s\"");
    let errs = parse(&bad, "lb.toml").unwrap_err().0;
    assert_eq!(errs.len(), 1, "{errs:?}");
    assert_eq!(errs[0].line, 11);
    assert!(errs[0].reason.contains("not a duration"), "{errs:?}");
}

#[test]
fn every_l7_mistake_is_reported_at_its_own_key() {
    let lines = [
        HEAD,
        "[[frontend]]",
        "name = \"a\"",
        "binds = [\"198.18.100.1:80\"]",
        "default_pool = \"nope\"",
        "[[frontend]]",
        "name = \"b\"",
        "binds = []",
        "default_pool = \"app\"",
        "[[pool]]",
        "name = \"app\"",
        "hash_query = true",
        "[[pool]]",
        "name = \"slow\"",
        "timeout_server = 500",
    ];
    let errs = errors(&lines);
    let got: Vec<(usize, usize)> = errs.iter().map(|e| (e.line, e.column)).collect();
    assert_eq!(got, [(5, 16), (8, 9), (12, 14), (15, 18)], "{errs:#?}");
    assert!(errs[0].reason.contains("unknown default_pool \"nope\""));
    assert!(errs[1].reason.contains("no binds"));
    assert!(errs[2].reason.contains("hash_query needs algorithm uri"));
    assert!(
        errs[3].reason.contains("duration 500 has no unit"),
        "{}",
        errs[3].reason
    );
}

/// A frontend `f` on line 2 with default pool `app` (line 6), then `extra`
/// from line 9.
fn l7(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec![
        HEAD,
        "[[frontend]]",
        "name = \"f\"",
        "binds = [\"198.18.100.1:80\"]",
        "default_pool = \"app\"",
        "[[pool]]",
        "name = \"app\"",
        "servers = [{ address = \"198.18.2.11:8080\" }]",
    ];
    v.extend_from_slice(extra);
    v
}

#[test]
fn l7_tables_are_checked_one_by_one() {
    assert!(parse(&text(&l7(&[])), "lb.toml").is_ok());
    for (extra, line, needle) in [
        (
            &[
                "[[frontend]]",
                "name = \"f\"",
                "binds = [\"198.18.100.1:81\"]",
                "default_pool = \"app\"",
            ][..],
            10,
            "duplicate frontend name \"f\" (first on line 3)",
        ),
        (
            &[
                "[[pool]]",
                "name = \"b\"",
                "servers = [{ address = \"198.18.2.11:0\" }]",
            ][..],
            11,
            "server 198.18.2.11:0 has port 0",
        ),
        (
            &[
                "[[pool]]",
                "name = \"b\"",
                "servers = [{ address = \"198.18.2.11:80\", weight = 70000 }]",
            ][..],
            11,
            "weight 70000 is out of range",
        ),
        (
            &["[[pool]]", "name = \"b\"", "timeout_connect = \"5 s\""][..],
            11,
            "\"5 s\" is not a duration",
        ),
        (
            &["[[pool]]", "name = \"b\"", "sever = 1"][..],
            11,
            "pool \"b\": unknown field `sever`",
        ),
        (
            &[
                "[[userlist]]",
                "name = \"u\"",
                "users = [{ name = \"a\", password = \"plain\" }]",
            ][..],
            11,
            "must be a SHA-512 crypt hash",
        ),
    ] {
        expect_one(&l7(extra), line, needle);
    }
}

#[test]
fn l7_rules_and_actions_point_at_their_list() {
    let mut lines = l7(&[]);
    lines.splice(
        5..5,
        [
            "use_pool = [{ pool = \"gone\", if = \"x\" }]",
            "request = [{ action = \"teleport\" }]",
        ],
    );
    let errs = errors(&lines);
    let got: Vec<usize> = errs.iter().map(|e| e.line).collect();
    assert_eq!(got, [6, 7], "{errs:#?}");
    assert!(
        errs[0].reason.contains("unknown pool \"gone\""),
        "{errs:#?}"
    );
    assert!(
        errs[1].reason.contains("request rule 1 (teleport)"),
        "{errs:#?}"
    );
}

/// `lb-userspace/lb.example.toml`, the commented reference of every key.
const EXAMPLE: &str = include_str!("../../lb.example.toml");

/// The keys serde accepts in a `T` table, read from its unknown-field message.
fn accepted<T: serde::de::DeserializeOwned>() -> Vec<String> {
    let Err(e) = toml::from_str::<T>("zz_no_such_key = 0") else {
        panic!("{} took an unknown key", std::any::type_name::<T>());
    };
    let text = e.to_string();
    let after = &text[text.find("expected").expect("a list of fields")..];
    after
        .split('`')
        .skip(1)
        .step_by(2)
        .map(String::from)
        .collect()
}

/// The tables found at `path` in `doc` (arrays of tables flattened).
fn tables_at<'a>(doc: &'a toml::Value, path: &[&str]) -> Vec<&'a toml::Table> {
    let mut here = vec![doc];
    for key in path {
        let mut next = Vec::new();
        for v in here {
            match v.get(key) {
                Some(toml::Value::Array(items)) => next.extend(items),
                Some(other) => next.push(other),
                None => {}
            }
        }
        here = next;
    }
    here.into_iter().filter_map(toml::Value::as_table).collect()
}

#[track_caller]
fn every_key_shown(doc: &toml::Value, paths: &[&[&str]], keys: &[String]) {
    let shown: std::collections::BTreeSet<&str> = paths
        .iter()
        .flat_map(|p| tables_at(doc, p))
        .flat_map(|t| t.keys().map(String::as_str))
        .collect();
    let missing: Vec<&String> = keys
        .iter()
        .filter(|k| !shown.contains(k.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "lb.example.toml does not show {missing:?} in {paths:?}"
    );
}

#[test]
fn the_example_file_parses_and_shows_every_key() {
    use crate::proxy;
    let c = parse(EXAMPLE, "lb.example.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.services.len(), 3);
    assert_eq!(c.services[0].forwarding, Forwarding::Ipip);
    assert!(c.services[1].backends.is_empty() && c.services[1].discovery.is_some());
    assert_eq!(
        c.proxy.0.frontends[0].acl.len(),
        crate::acl::MATCHER_KEYS.len()
    );
    assert_eq!((c.proxy.1.len(), c.proxy.2.len()), (1, 1));

    let doc: toml::Value = toml::from_str(EXAMPLE).unwrap();
    every_key_shown(&doc, &[&[]], &accepted::<raw::RawConfig>());
    every_key_shown(&doc, &[&["service"]], &accepted::<raw::RawService>());
    every_key_shown(
        &doc,
        &[&["service", "backend"]],
        &accepted::<raw::RawBackend>(),
    );
    let health = &[&["service", "health"][..], &["pool", "health"]];
    every_key_shown(&doc, health, &accepted::<raw::RawHealth>());
    let discovery = &[&["service", "discovery"][..], &["pool", "discovery"]];
    every_key_shown(&doc, discovery, &accepted::<raw::RawDiscovery>());
    every_key_shown(&doc, &[&["bgp"]], &accepted::<raw::RawBgp>());
    every_key_shown(&doc, &[&["frontend"]], &accepted::<proxy::Frontend>());
    every_key_shown(
        &doc,
        &[&["frontend", "tls"]],
        &accepted::<proxy::TlsConfig>(),
    );
    let certs = &[&["frontend", "tls", "certs"][..]];
    every_key_shown(&doc, certs, &accepted::<proxy::CertPair>());
    every_key_shown(&doc, &[&["frontend", "acl"]], &acl_keys());
    let use_pool = &[&["frontend", "use_pool"][..]];
    every_key_shown(&doc, use_pool, &accepted::<proxy::UsePool>());
    let actions = &[&["frontend", "request"][..], &["frontend", "response"]];
    every_key_shown(&doc, actions, &accepted::<proxy::HttpAction>());
    every_key_shown(&doc, &[&["userlist"]], &accepted::<proxy::UserList>());
    every_key_shown(&doc, &[&["userlist", "users"]], &accepted::<proxy::User>());
    every_key_shown(&doc, &[&["pool"]], &accepted::<proxy::Pool>());
    every_key_shown(
        &doc,
        &[&["pool", "servers"]],
        &accepted::<proxy::ServerSpec>(),
    );
}

/// An ACL entry's keys: its name, `ignore_case` and one matcher key each.
fn acl_keys() -> Vec<String> {
    let mut keys: Vec<String> = crate::acl::MATCHER_KEYS
        .iter()
        .map(|k| k.to_string())
        .collect();
    keys.extend(["name".to_string(), "ignore_case".to_string()]);
    keys
}
