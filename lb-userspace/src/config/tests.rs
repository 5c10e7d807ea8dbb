//! Tests of the file as a whole: the model, positions, the example file.

use lb_common::DEFAULT_RING_SIZE;

use super::test_support::*;
use super::*;

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
                hash: FlowHash::Flow,
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
                hash: FlowHash::Flow,
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
                hash: FlowHash::Flow,
                ring_size: DEFAULT_RING_SIZE,
                backends: vec![],
                health: None,
                discovery: None,
                line: 23,
            },
        ],
        bgp: None,
        proxy: ProxySection::default(),
        admin: None,
        syslog: None,
    };
    assert_eq!(c, expected);
    assert_eq!(c.services[1].protocol.number(), 17);
    assert_eq!(c.services[0].protocol.number(), 6);
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
fn display_is_file_line_column_reason() {
    let errs = parse(&text(&["interfaces = [\"a/b\"]"]), "lb.toml").unwrap_err();
    let s = errs.to_string();
    // Whole-file errors (line 0) sort first and leave out the position.
    assert!(s.starts_with("lb.toml: nothing to serve"), "{s}");
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
fn no_services() {
    expect_one(&[HEAD], 0, "nothing to serve");
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

#[test]
fn unknown_field_has_line() {
    let mut lines = svc(&[]);
    lines[5] = "adress = \"198.18.2.11:8080\"";
    expect_one(&lines, 6, "unknown field `adress`");
    let mut lines = svc(&[]);
    lines.insert(1, "interface = [\"eth1\"]");
    expect_one(&lines, 2, "unknown field `interface`");
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
    let c = parse(EXAMPLE, "lb.example.toml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(c.services.len(), 3);
    assert_eq!(c.services[0].forwarding, Forwarding::Ipip);
    assert!(c.services[1].backends.is_empty() && c.services[1].discovery.is_some());
    // Every matcher key, each in an ACL of its own at least.
    let keys: std::collections::BTreeSet<&str> = c.proxy.0.frontends[0]
        .acl
        .iter()
        .map(|a| a.matcher.key())
        .collect();
    assert_eq!(keys.len(), lb_proxy::acl::MATCHER_KEYS.len());
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
    every_key_shown(&doc, &[&["proxy"]], &accepted::<raw::RawProxy>());
    every_key_shown(&doc, &[&["frontend"]], &accepted::<lb_proxy::Frontend>());
    every_key_shown(
        &doc,
        &[&["frontend", "tls"]],
        &accepted::<lb_proxy::TlsConfig>(),
    );
    let certs = &[&["frontend", "tls", "certs"][..]];
    every_key_shown(&doc, certs, &accepted::<lb_proxy::CertPair>());
    every_key_shown(&doc, &[&["frontend", "acl"]], &acl_keys());
    let use_pool = &[&["frontend", "use_pool"][..]];
    every_key_shown(&doc, use_pool, &accepted::<lb_proxy::UsePool>());
    let actions = &[&["frontend", "request"][..], &["frontend", "response"]];
    every_key_shown(&doc, actions, &accepted::<lb_proxy::HttpAction>());
    every_key_shown(&doc, &[&["userlist"]], &accepted::<lb_proxy::UserList>());
    every_key_shown(
        &doc,
        &[&["userlist", "users"]],
        &accepted::<lb_proxy::User>(),
    );
    every_key_shown(&doc, &[&["pool"]], &accepted::<lb_proxy::Pool>());
    every_key_shown(
        &doc,
        &[&["pool", "servers"]],
        &accepted::<lb_proxy::ServerSpec>(),
    );
}

/// An ACL entry's keys: its name, `ignore_case` and one matcher key each.
fn acl_keys() -> Vec<String> {
    let mut keys: Vec<String> = lb_proxy::acl::MATCHER_KEYS
        .iter()
        .map(|k| k.to_string())
        .collect();
    keys.extend(["name".to_string(), "ignore_case".to_string()]);
    keys
}

#[test]
fn proxy_threads_default_to_the_cpus_and_are_checked_where_written() {
    let c = parse(&text(&svc(&[])), "lb.toml").unwrap();
    assert_eq!(c.proxy.3.count, lb_proxy::Threads::available());
    assert!(c.proxy.3.cpu_map.is_empty());
    let c = parse(
        &text(&svc(&["[proxy]", "threads = 3", "cpu_map = [1, 0]"])),
        "lb.toml",
    )
    .unwrap();
    assert_eq!((c.proxy.3.count, c.proxy.3.cpu_map), (3, vec![1, 0]));
    let errs = errors(&svc(&["[proxy]", "threads = 0", "cpu_map = [0, -1]"]));
    let got: Vec<usize> = errs.iter().map(|e| e.line).collect();
    assert_eq!(got, [8, 9], "{errs:#?}");
    assert!(errs[0].reason.contains("threads 0 is out of range"));
    assert!(errs[1].reason.contains("cpu_map entry -1"));
    // hard_stop_after: an hour unless set, 1s..=30d.
    assert_eq!(
        parse(&text(&svc(&[])), "lb.toml")
            .unwrap()
            .proxy
            .3
            .hard_stop_after,
        std::time::Duration::from_secs(3600)
    );
    let c = parse(
        &text(&svc(&["[proxy]", "hard_stop_after = \"30s\""])),
        "lb.toml",
    )
    .unwrap();
    assert_eq!(
        c.proxy.3.hard_stop_after,
        std::time::Duration::from_secs(30)
    );
    for line in [
        "hard_stop_after = \"0s\"",
        "hard_stop_after = \"31d\"",
        "hard_stop_after = \"soon\"",
    ] {
        let errs = errors(&svc(&["[proxy]", line]));
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(errs[0].line, 8, "{errs:#?}");
        assert!(errs[0].reason.contains("hard_stop_after"), "{errs:#?}");
    }
}

/// Values that have broken parsers: limits of every integer width,
/// negative, fractional and huge durations, odd addresses and prefixes,
/// wrong types, empty and control characters.
const ODD_VALUES: &[&str] = &[
    "0",
    "-1",
    "1.5",
    "255",
    "256",
    "65535",
    "65536",
    "4294967295",
    "4294967296",
    "9223372036854775807",
    "-9223372036854775808",
    "true",
    "[]",
    "[\"\"]",
    "{}",
    "\"\"",
    "\" \"",
    "\"x\"",
    "\"0s\"",
    "\"0ms\"",
    "\"-1s\"",
    "\"1.5s\"",
    "\"18446744073709551615ms\"",
    "\"9999999999999h\"",
    "\"1h1h\"",
    "\"1.2.3.4\"",
    "\"1.2.3.4:0\"",
    "\"1.2.3.4:65536\"",
    "\"0.0.0.0:80\"",
    "\"[::]:443\"",
    "\"[::1]\"",
    "\"::1:80\"",
    "\"0.0.0.0/0\"",
    "\"10.0.0.0/33\"",
    "\"::/129\"",
    "\"a b\"",
    "\"\\u0000\"",
    "\"\\r\\n\"",
    "\"é\"",
    "\"/\"",
    "\"/nonexistent/file\"",
    "\"pool:web\"",
    "\"[\"",
    "\"(\"",
    "\"*\"",
];

/// Mutation fuzzing of `parse` with the example file: a random key's value
/// replaced by an odd one, lines dropped or repeated, tables renamed, from
/// a fixed seed. Whatever the file, `parse` returns (no panic: a file is
/// user input), and every error names a line of the file (or 0, the whole
/// file) and says why.
#[test]
fn mutated_files_get_errors_at_their_lines_never_a_panic() {
    let lines: Vec<&str> = EXAMPLE.lines().collect();
    let assignments: Vec<usize> = (0..lines.len())
        .filter(|&i| {
            let l = lines[i].trim_start();
            !l.starts_with('#') && !l.starts_with('[') && l.contains(" = ")
        })
        .collect();
    // `LB_FUZZ_SEED` and `LB_FUZZ_RUNS` search further by hand.
    let knob = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let mut state: u64 = knob("LB_FUZZ_SEED", 0x636f_6e66_6967).max(1);
    let mut next = move |n: usize| {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let (mut refused, runs) = (0, knob("LB_FUZZ_RUNS", 600) as usize);
    for case in 0..runs {
        let mut edited: Vec<String> = lines.iter().map(|l| (*l).to_string()).collect();
        for _ in 0..=next(3) {
            let at = assignments[next(assignments.len())];
            match next(10) {
                0 => edited[at] = String::new(),
                1 => {
                    let line = edited[at].clone();
                    edited.insert(at, line);
                }
                2 => {
                    let headers = [
                        "[proxy]",
                        "[[frontend]]",
                        "[[pool]]",
                        "[[service]]",
                        "[admin]",
                    ];
                    edited.insert(at, headers[next(headers.len())].to_string());
                }
                _ => {
                    let key = edited[at].split(" = ").next().unwrap_or("").to_string();
                    edited[at] = format!("{key} = {}", ODD_VALUES[next(ODD_VALUES.len())]);
                }
            }
        }
        let text = edited.join("\n");
        let result = std::panic::catch_unwind(|| parse(&text, "fuzz.toml"));
        let Ok(result) = result else {
            panic!("case {case}: parse panicked on:\n{text}");
        };
        if let Err(errors) = result {
            refused += 1;
            assert!(!errors.0.is_empty(), "case {case}: an empty error list");
            for e in &errors.0 {
                assert!(
                    e.line <= edited.len() && !e.reason.trim().is_empty() && e.file == "fuzz.toml",
                    "case {case}: {e} (of {} lines):\n{text}",
                    edited.len()
                );
            }
        }
    }
    // Not vacuous: most mutants are refused, some are still good files.
    assert!(
        refused > runs / 2 && refused < runs,
        "{refused} of {runs} refused"
    );
}
