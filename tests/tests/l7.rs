//! The L7 proxy end to end: the XDP program passes the l7 VIP up to the
//! balancer's stack, the proxy terminates TLS (certificate chosen by SNI, ALPN
//! h2), routes by ACLs and forwards to the lab's backends; curl is the client.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

use lb_tests::RunningLab;
use lb_userspace::lab::{Lab, TCP_PORT, VIP_V4, backend_v4};

fn proxy_config(lab: &Lab, dir: &Path) -> anyhow::Result<String> {
    proxy_config_with(lab, dir, "")
}

/// `web_extra` is appended to the "web" pool's table.
fn proxy_config_with(lab: &Lab, dir: &Path, web_extra: &str) -> anyhow::Result<String> {
    // client.example: a client certificate of the same CA.
    lb_tests::write_certificates(dir, &["www.example", "api.example", "client.example"])?;
    lab.make_local_on_balancer(VIP_V4.into())?;
    let server = |i: usize| format!("{{ address = \"{}:{TCP_PORT}\" }}", backend_v4(i));
    let pem = |n: &str, ext: &str| dir.join(format!("{n}.{ext}")).display().to_string();
    // Several serving threads, whatever the machine (the default is its CPUs).
    Ok(format!(
        r#"
[proxy]
threads = 2

[[frontend]]
name = "https"
binds = ["{VIP_V4}:443"]
default_pool = "web"
[frontend.tls]
certs = [
  {{ cert = "{}", key = "{}" }},
  {{ cert = "{}", key = "{}" }},
]
client_ca = "{}"
verify_client = "optional"
[[frontend.acl]]
name = "private"
path_prefix = "/private/"
[[frontend.acl]]
name = "has_cert"
client_cert = true
[[frontend.request]]
action = "deny"
if = "private !has_cert"
[[frontend.acl]]
name = "is_api"
path_prefix = "/api/"
[[frontend.acl]]
name = "api_host"
host = "api.example"
[[frontend.use_pool]]
pool = "api"
if = "is_api or api_host"

# TLS offload in mode tcp: bytes to the servers, the pool chosen by SNI.
[[frontend]]
name = "tls-tcp"
binds = ["{VIP_V4}:8443"]
mode = "tcp"
default_pool = "web"
[frontend.tls]
certs = [
  {{ cert = "{}", key = "{}" }},
  {{ cert = "{}", key = "{}" }},
]
[[frontend.acl]]
name = "api_sni"
sni = "api.example"
[[frontend.use_pool]]
pool = "api"
if = "api_sni"

[[pool]]
name = "web"
servers = [{}, {}]
{web_extra}

[[pool]]
name = "api"
servers = [{{ address = "{}:{TCP_PORT}", maxconn = 50 }}]
"#,
        pem("www.example", "pem"),
        pem("www.example", "key"),
        pem("api.example", "pem"),
        pem("api.example", "key"),
        dir.join("ca.pem").display(),
        pem("www.example", "pem"),
        pem("www.example", "key"),
        pem("api.example", "pem"),
        pem("api.example", "key"),
        server(1),
        server(3),
        backend_v4(2),
    ))
}

/// `curl` from the client namespace; returns (body, "http_version ssl_verify_result").
fn curl(lab: &RunningLab, host: &str, path: &str, ca: &Path) -> (String, String) {
    curl_with(lab, host, path, ca, &[])
}

/// `curl` with extra arguments.
fn curl_with(
    lab: &RunningLab,
    host: &str,
    path: &str,
    ca: &Path,
    extra: &[&str],
) -> (String, String) {
    curl_at(lab, (host, 443), path, ca, extra)
}

/// `curl` of `https://host:port/path` (resolved to the VIP).
fn curl_at(
    lab: &RunningLab,
    (host, port): (&str, u16),
    path: &str,
    ca: &Path,
    extra: &[&str],
) -> (String, String) {
    let out = Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.lab.client_ns(),
            "curl",
            "-sS",
            "--max-time",
            "5",
        ])
        .arg("--cacert")
        .arg(ca)
        .arg("--resolve")
        .arg(format!("{host}:{port}:{VIP_V4}"))
        .args(["-w", "\n%{http_version} %{ssl_verify_result}"])
        .args(extra)
        .arg(format!("https://{host}:{port}{path}"))
        .output()
        .expect("run curl");
    assert!(
        out.status.success(),
        "curl https://{host}{path}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, meta) = text.rsplit_once('\n').expect("curl -w line");
    (body.trim().to_string(), meta.to_string())
}

#[test]
fn https_through_the_l7_vip_is_routed_by_acls_over_h2_with_sni_certificates() {
    let lab = RunningLab::start_custom("l7", 3, &[1, 1, 1], None, proxy_config).unwrap();
    let ca = lab.config_path.with_file_name("ca.pem");

    let mut web = BTreeMap::new();
    for _ in 0..20 {
        let (body, meta) = curl(&lab, "www.example", "/", &ca);
        assert_eq!(
            meta, "2 0",
            "HTTP/2 by ALPN, certificate verified for www.example"
        );
        *web.entry(body).or_insert(0) += 1;
    }
    assert_eq!(
        web.keys().cloned().collect::<Vec<_>>(),
        ["be1", "be3"],
        "the default pool round-robins over its two servers: {web:?}"
    );
    assert_eq!(web.values().copied().collect::<Vec<_>>(), [10, 10]);

    let (body, _) = curl(&lab, "www.example", "/api/users", &ca);
    assert_eq!(body, "be2", "path ACL routes /api/ to the api pool");
    let (body, meta) = curl(&lab, "api.example", "/", &ca);
    assert_eq!(body, "be2", "host ACL routes api.example to the api pool");
    assert_eq!(meta, "2 0", "and SNI picked the api.example certificate");
    // HTTP/1.1 clients take the proxy's own HTTP/1 path: same routing.
    let (body, meta) = curl_with(&lab, "api.example", "/", &ca, &["--http1.1"]);
    assert_eq!((body.as_str(), meta.as_str()), ("be2", "1.1 0"));
    let (body, _) = curl_with(&lab, "www.example", "/api/x", &ca, &["--http1.1"]);
    assert_eq!(body, "be2");
    // Mutual TLS (optional): /private/ needs a verified client certificate.
    let (body, _) = curl(&lab, "www.example", "/private/x", &ca);
    assert!(body.contains("403 Forbidden"), "{body}");
    let pem = |ext: &str| ca.with_file_name(format!("client.example.{ext}"));
    let (cert, key) = (pem("pem"), pem("key"));
    for http1 in [false, true] {
        let mut args = vec![
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
        ];
        if http1 {
            args.push("--http1.1");
        }
        let (body, _) = curl_with(&lab, "www.example", "/private/x", &ca, &args);
        assert!(body == "be1" || body == "be3", "http1 {http1}: {body}");
    }
    // A tcp frontend terminates TLS and relays the bytes, routed by SNI.
    for (host, expected) in [
        ("api.example", &["be2"][..]),
        ("www.example", &["be1", "be3"]),
    ] {
        let (body, _) = curl_at(&lab, (host, 8443), "/", &ca, &[]);
        assert!(expected.contains(&body.as_str()), "{host}: {body:?}");
    }
    // `lb show` gives the api server's maxconn.
    let out = lab.lb(&["show", "backends", "pool:api", "--json"]);
    let list: Vec<lb_userspace::control::protocol::BackendInfo> =
        serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!((list[0].max_flows, list[0].active_flows), (50, 0));

    let passed = lab
        .metric("lb_xdp_packets_total", "reason=\"pass_l7\"")
        .unwrap();
    assert!(passed > 0, "the XDP program passed the l7 VIP up");
    assert_eq!(lab.lab.kernel_forwarded_packets().unwrap(), 0);

    // Server connections were kept alive for reuse, and nothing is in flight.
    for i in [1, 3] {
        let labels = format!("pool=\"web\",server=\"{}:{TCP_PORT}\"", backend_v4(i));
        let idle = lab
            .metric("lb_pool_server_idle_connections", &labels)
            .unwrap();
        assert!(idle >= 1, "be{i}: {idle} idle connections");
        let current = lab
            .metric("lb_pool_server_current_requests", &labels)
            .unwrap();
        assert_eq!(current, 0, "be{i}: requests in flight");
    }
}

#[test]
fn l7_pool_servers_that_fail_health_checks_get_no_requests() {
    // No retries: a request sent to a dead server would be a 502, so only the
    // health check can keep them all successful.
    let health = "retries = 0\n[pool.health]\nkind = \"http\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\nfall = 2\nrise = 2\n";
    let mut lab = RunningLab::start_custom("l7h", 3, &[1, 1, 1], None, |lab, dir| {
        proxy_config_with(lab, dir, health)
    })
    .unwrap();
    let ca = lab.config_path.with_file_name("ca.pem");
    lab.lab.stop_backend_server(1).unwrap();
    let killed = std::time::Instant::now();
    let be1 = format!("{}:{TCP_PORT}", backend_v4(1));
    loop {
        let out = lab.lb(&["show", "backends", "pool:web", "--json"]);
        let list: Vec<lb_userspace::control::protocol::BackendInfo> =
            serde_json::from_slice(&out.stdout).unwrap();
        if list.iter().any(|b| {
            b.address.to_string() == be1
                && b.health == lb_userspace::control::protocol::Health::Down
        }) {
            break;
        }
        assert!(
            killed.elapsed() < std::time::Duration::from_secs(5),
            "be1 never marked down"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    // interval x fall = 400 ms, plus scheduling slack on a busy 2-core machine.
    assert!(killed.elapsed() < std::time::Duration::from_secs(2));
    // The status is shown as soon as the check fails; the proxy follows a moment later.
    std::thread::sleep(std::time::Duration::from_millis(200));
    for _ in 0..20 {
        let (body, _) = curl(&lab, "www.example", "/", &ca);
        assert_eq!(body, "be3", "only the healthy server answers");
    }
    lab.lab.start_backend_server(1).unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let (body, _) = curl(&lab, "www.example", "/", &ca);
        if body == "be1" {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "be1 never came back");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn a_reload_applies_new_pools_to_the_l7_proxy() {
    let lab = RunningLab::start_custom("l7r", 3, &[1, 1, 1], None, proxy_config).unwrap();
    let ca = lab.config_path.with_file_name("ca.pem");
    let before: std::collections::BTreeSet<String> = (0..10)
        .map(|_| curl(&lab, "www.example", "/", &ca).0)
        .collect();
    assert_eq!(before.len(), 2, "{before:?}");
    // The web pool now has be1 only.
    let text = std::fs::read_to_string(&lab.config_path).unwrap();
    let one = text.replacen(
        &format!(
            "servers = [{{ address = \"{b1}:{TCP_PORT}\" }}, {{ address = \"{b3}:{TCP_PORT}\" }}]",
            b1 = backend_v4(1),
            b3 = backend_v4(3)
        ),
        &format!(
            "servers = [{{ address = \"{}:{TCP_PORT}\" }}]",
            backend_v4(1)
        ),
        1,
    );
    assert_ne!(one, text, "the pool line was found");
    std::fs::write(&lab.config_path, one).unwrap();
    assert!(lab.lb(&["reload"]).status.success());
    // `lb reload` answers once the proxy runs the new pools: at once.
    let after: std::collections::BTreeSet<String> = (0..6)
        .map(|_| curl(&lab, "www.example", "/", &ca).0)
        .collect();
    assert_eq!(
        after,
        ["be1".to_string()].into(),
        "the reload had not taken"
    );
}

#[test]
fn a_reload_the_proxy_cannot_take_is_refused_and_the_running_proxy_serves_on() {
    let lab = RunningLab::start_custom("l7x", 3, &[1, 1, 1], None, proxy_config).unwrap();
    let ca = lab.config_path.with_file_name("ca.pem");
    let good = std::fs::read_to_string(&lab.config_path).unwrap();
    let serves = |why: &str| {
        let (body, facts) = curl(&lab, "www.example", "/", &ca);
        assert!(body.starts_with("be"), "{why}: {body:?} {facts}");
    };
    serves("at start");
    // A frontend on an address the balancer does not have: refused at its
    // line, as a start would be, before anything of the file applies.
    let unbindable = format!(
        "{good}\n[[frontend]]\nname = \"elsewhere\"\nbinds = [\"203.0.113.9:80\"]\ndefault_pool = \"web\"\n"
    );
    std::fs::write(&lab.config_path, &unbindable).unwrap();
    let out = lab.lb(&["reload"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    let binds_line = unbindable.lines().count() - 1;
    assert!(
        said.contains(&format!(
            "{}:{binds_line}:10: frontend \"elsewhere\": cannot bind 203.0.113.9:80",
            lab.config_path.display()
        )),
        "{said}"
    );
    serves("after the refused bind");
    let shown = String::from_utf8_lossy(&lab.lb(&["show", "proxy"]).stdout).to_string();
    assert!(!shown.contains("elsewhere"), "{shown}");
    // A certificate that is gone: refused at its line before anything applies.
    let cert = lab.config_path.with_file_name("www.example.pem");
    let gone = good.replacen(&cert.display().to_string(), "/nonexistent/www.pem", 1);
    assert_ne!(gone, good);
    std::fs::write(&lab.config_path, &gone).unwrap();
    let out = lab.lb(&["reload"]);
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{said}");
    // The error names the file, the line of the frontend's TLS table, why.
    let tls_line = gone.lines().position(|l| l == "[frontend.tls]").unwrap() + 1;
    assert!(
        said.contains(&format!("{}:{tls_line}:", lab.config_path.display()))
            && said.contains("reading /nonexistent/www.pem"),
        "{said}"
    );
    serves("after the refused certificate");
    // Put right, the next reload takes.
    std::fs::write(&lab.config_path, &good).unwrap();
    assert!(lab.lb(&["reload"]).status.success());
    serves("after the good reload");
}

#[test]
fn l7_pool_servers_are_drained_added_and_removed_from_the_cli() {
    // With a persistence cookie: a drained server keeps its own clients.
    let config = |lab: &Lab, dir: &Path| proxy_config_with(lab, dir, "cookie = \"SRV\"");
    let lab = RunningLab::start_custom("l7c", 3, &[1, 1, 1], None, config).unwrap();
    let ca = lab.config_path.with_file_name("ca.pem");
    let seen = |n: usize| -> std::collections::BTreeSet<String> {
        (0..n)
            .map(|_| curl(&lab, "www.example", "/", &ca).0)
            .collect()
    };
    let be = |i: usize| format!("{}:{TCP_PORT}", backend_v4(i));
    // curl keeps the cookie the first answer sets in a jar, and sends it back.
    let jar = lab.config_path.with_file_name("cookies.txt");
    let jar = jar.to_str().unwrap();
    let (home, _) = curl_with(&lab, "www.example", "/", &ca, &["-c", jar]);
    let (mine, other) = if home == "be1" {
        (1, "be3")
    } else {
        (3, "be1")
    };
    assert!(lab.lb(&["drain", "pool:web", &be(mine)]).status.success());
    assert_eq!(
        seen(8),
        [other.to_string()].into(),
        "a drained server gets no new clients"
    );
    for _ in 0..4 {
        let (body, _) = curl_with(&lab, "www.example", "/", &ca, &["-b", jar]);
        assert_eq!(body, home, "but keeps the clients its cookie names");
    }
    assert!(lab.lb(&["enable", "pool:web", &be(mine)]).status.success());
    assert!(
        lab.lb(&["add", "backend", "pool:web", &be(2)])
            .status
            .success()
    );
    // Each answer comes once the proxy runs the change: in force at once.
    assert_eq!(seen(9).len(), 3, "be2 joined the pool");
    assert!(
        lab.lb(&["remove", "backend", "pool:web", &be(3)])
            .status
            .success()
    );
    assert!(!seen(8).contains("be3"), "be3 left the pool");
    let out = lab.lb(&["show", "backends", "pool:web", "--json"]);
    let list: Vec<lb_userspace::control::protocol::BackendInfo> =
        serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(list.len(), 2, "{list:?}");
    let bad = lab.lb(&["add", "backend", "pool:nope", &be(1)]);
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown pool"));
}

#[test]
fn responses_are_gzipped_for_curl_over_h2_and_http1() {
    // The https frontend compresses the backends' /bytes answers.
    let config = |lab: &Lab, dir: &Path| {
        let text = proxy_config(lab, dir)?;
        let plain = "default_pool = \"web\"\n[frontend.tls]";
        let compressing = "default_pool = \"web\"\n[frontend.compression]\ntypes = [\"application/octet-stream\"]\n[frontend.tls]";
        anyhow::ensure!(text.contains(plain), "the https frontend");
        Ok(text.replacen(plain, compressing, 1))
    };
    let lab = RunningLab::start_custom("l7gz", 3, &[1, 1, 1], None, config).unwrap();
    let ca = lab.config_path.with_file_name("ca.pem");
    let saved = lab.config_path.with_file_name("download.bin");
    const LEN: u64 = 200_000;
    for (mode, version) in [("--http2", "2"), ("--http1.1", "1.1")] {
        let out_file = saved.to_str().unwrap();
        let args = [mode, "--compressed", "-D", "-", "-o", out_file];
        let (head, meta) = curl_with(&lab, "www.example", &format!("/bytes/{LEN}"), &ca, &args);
        assert!(meta.starts_with(version), "{mode}: {meta}");
        let head = head.to_ascii_lowercase();
        assert!(head.contains("content-encoding: gzip"), "{mode}: {head}");
        assert!(!head.contains("content-length"), "{mode}: {head}");
        // curl inflated it back to the backend's own bytes.
        let body = std::fs::read(&saved).unwrap();
        assert_eq!(body.len() as u64, LEN, "{mode}");
        let wrong = (0..LEN)
            .find(|&i| body[i as usize] != lb_userspace::lab::backend_server::pattern_byte(i));
        assert_eq!(wrong, None, "{mode}: first wrong byte");
    }
    // Without --compressed (no Accept-Encoding) the bytes come as they are.
    let (head, _) = curl_with(
        &lab,
        "www.example",
        "/bytes/2000",
        &ca,
        &["-D", "-", "-o", "/dev/null"],
    );
    assert!(
        !head.to_ascii_lowercase().contains("content-encoding"),
        "{head}"
    );
}
