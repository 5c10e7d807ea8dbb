//! What outside audits run against the proxy, run as they would: testssl.sh
//! on the HTTPS frontend and slowhttptest (slowloris, slow body, slow read)
//! on the HTTP one, from the lab's client namespace against `lb run` in the
//! balancer namespace (proxy only, as in `proxy_only.rs`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use lb_userspace::lab::{
    BALANCER_CLIENT_V4, Lab, LabOptions, TCP_PORT, ns_command, services::METRICS_ADDR,
};

const HTTP_PORT: u16 = 8081;
/// As `HTTP_PORT`, with `send_buffer` set.
const CAPPED_PORT: u16 = 8082;
const HTTPS_PORT: u16 = 8443;
/// The certificate's name, as clients ask for it.
const HOST: &str = "www.example";
/// The HTTP frontend's `timeout_http_request` and `timeout_client`, short
/// so that slow clients are cut within the test (defaults: 10 s and 30 s).
const SLOW_LIMIT_SECS: u64 = 3;

/// The lab with `lb run` serving an HTTPS and an HTTP frontend in front of
/// its one backend; the certificates and their CA (`ca.pem`) are in `dir`.
struct Proxy {
    lab: Lab,
    dir: PathBuf,
}

impl Proxy {
    fn start(tag: &str) -> Proxy {
        let mut lab = Lab::create(tag, LabOptions::from_env(1).unwrap()).unwrap();
        let dir = std::env::temp_dir().join(format!("{}-{tag}", lab.balancer_ns()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        lb_tests::write_certificates(&dir, &[HOST]).unwrap();
        let path = dir.join("lb.toml");
        std::fs::write(&path, config(&lab, &dir)).unwrap();
        lb_userspace::demo::start_agent(&mut lab, &path, &dir.join("lb.sock")).unwrap();
        let proxy = Proxy { lab, dir };
        // The tools look names up (testssl.sh checks its openssl with one),
        // and the client's default route leads into the lab, where a query
        // waits for its timeout: `ip netns exec` gives them this resolver,
        // the namespace's own loopback, which refuses at once.
        std::fs::create_dir_all(proxy.etc_netns()).unwrap();
        std::fs::write(
            proxy.etc_netns().join("resolv.conf"),
            "nameserver 127.0.0.1\n",
        )
        .unwrap();
        proxy
    }

    /// Files `ip netns exec` mounts over `/etc` in the client namespace.
    fn etc_netns(&self) -> PathBuf {
        Path::new("/etc/netns").join(self.lab.client_ns())
    }

    /// Runs `program args` in the client namespace; its output, within `limit`.
    fn client_runs(&self, program: &str, args: &[&str], limit: Duration) -> std::process::Output {
        lb_tests::output_within(ns_command(self.lab.client_ns(), program).args(args), limit)
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(self.etc_netns());
        // Only if it holds nothing else (then it was made for this test).
        let _ = std::fs::remove_dir("/etc/netns");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn config(lab: &Lab, dir: &Path) -> String {
    let server = SocketAddr::new(lab.backends()[0].v4.into(), TCP_PORT);
    let pem = |ext: &str| dir.join(format!("{HOST}.{ext}")).display().to_string();
    // The metrics endpoint is what `start_agent` waits for.
    format!(
        r#"
metrics = "{METRICS_ADDR}"

[proxy]
threads = 2

[[frontend]]
name = "https"
binds = ["{BALANCER_CLIENT_V4}:{HTTPS_PORT}"]
default_pool = "app"
[frontend.tls]
certs = [{{ cert = "{}", key = "{}" }}]

[[frontend]]
name = "http"
binds = ["{BALANCER_CLIENT_V4}:{HTTP_PORT}"]
default_pool = "app"
timeout_http_request = "{SLOW_LIMIT_SECS}s"
timeout_client = "{SLOW_LIMIT_SECS}s"

[[frontend]]
name = "http-capped"
binds = ["{BALANCER_CLIENT_V4}:{CAPPED_PORT}"]
default_pool = "app"
timeout_http_request = "{SLOW_LIMIT_SECS}s"
timeout_client = "{SLOW_LIMIT_SECS}s"
send_buffer = 65536

[[pool]]
name = "app"
servers = [{{ address = "{server}" }}]
"#,
        pem("pem"),
        pem("key"),
    )
}

/// Findings testssl.sh makes about the certificate itself, which the
/// operator supplies (the test's has no CRL or OCSP address, its domain no
/// CAA record): not properties of the proxy.
fn about_the_certificate(id: &str) -> bool {
    id.starts_with("cert_") || id == "DNS_CAArecord"
}

#[test]
fn testssl_finds_no_weak_protocol_cipher_or_known_vulnerability() {
    let proxy = Proxy::start("tssl");
    let json = proxy.dir.join("testssl.json");
    let ca = proxy.dir.join("ca.pem");
    let target = format!("{HOST}:{HTTPS_PORT}");
    let ip = BALANCER_CLIENT_V4.to_string();
    // Protocols, cipher categories, forward secrecy, server preferences,
    // server defaults (certificate trusted through `--add-ca`) and every
    // vulnerability check.
    let out = proxy.client_runs(
        "testssl",
        &[
            "--quiet",
            "--color",
            "0",
            "--warnings",
            "off",
            // The lab has no DNS: every lookup would wait for its timeout.
            "--nodns",
            "none",
            "--add-ca",
            ca.to_str().unwrap(),
            "-p",
            "-s",
            "-f",
            "-P",
            "-S",
            "-U",
            "--ip",
            &ip,
            "--jsonfile",
            json.to_str().unwrap(),
            &target,
        ],
        Duration::from_secs(300),
    );
    let text = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("testssl wrote no {}: {e}; {out:?}", json.display()));
    let findings: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
    let field = |f: &serde_json::Value, k: &str| f[k].as_str().unwrap_or_default().to_string();
    // (severity, finding) of a check that must have been made.
    let report = |id: &str| {
        findings
            .iter()
            .find(|f| f["id"] == id)
            .map(|f| (field(f, "severity"), field(f, "finding")))
            .unwrap_or_else(|| panic!("testssl did not report {id}: {text}"))
    };
    // It really tested: old protocols refused, TLS 1.3 offered, classic
    // vulnerabilities checked.
    for id in ["SSLv2", "SSLv3", "TLS1", "TLS1_1"] {
        assert_eq!(report(id).1, "not offered", "{id}");
    }
    assert!(report("TLS1_3").1.starts_with("offered"), "TLS 1.3");
    for id in ["heartbleed", "ROBOT", "POODLE_SSL", "SWEET32", "LOGJAM"] {
        assert_eq!(report(id).0, "OK", "{id}: {:?}", report(id));
    }
    let bad: Vec<String> = findings
        .iter()
        .filter(|f| !about_the_certificate(&field(f, "id")))
        .filter(|f| {
            matches!(
                field(f, "severity").as_str(),
                "LOW" | "MEDIUM" | "HIGH" | "CRITICAL" | "FATAL"
            )
        })
        .map(|f| {
            format!(
                "{} {}: {}",
                field(f, "id"),
                field(f, "severity"),
                field(f, "finding")
            )
        })
        .collect();
    assert!(bad.is_empty(), "testssl.sh findings: {bad:#?}");
}

/// What one slowhttptest run showed: its output with colours removed, its
/// CSV rows (seconds, closed, pending, connected, service available), and
/// the balancer's sockets on the port that still held a connection or
/// unsent data `PROBE_AT` into the run.
struct SlowRun {
    text: String,
    rows: Vec<[u64; 5]>,
    sockets_mid_run: usize,
}

/// When `SlowRun::sockets_mid_run` is counted: the connections are all
/// open after about 2 s, and 3 s later any cut.
const PROBE_AT: Duration = Duration::from_secs(10);

/// One slowhttptest run in `mode` (`-H`, `-B`, `-X`) of `connections`
/// against `path` on `port`, its extra `args` after, for 20 s.
fn slowhttptest(
    proxy: &Proxy,
    mode: &str,
    connections: u32,
    port: u16,
    path: &str,
    args: &[&str],
) -> SlowRun {
    let prefix = proxy
        .dir
        .join(format!("slow{}{port}", mode.trim_start_matches('-')));
    let url = format!("http://{BALANCER_CLIENT_V4}:{port}{path}");
    let connections = connections.to_string();
    let mut all = vec![
        mode,
        "-c",
        &connections,
        "-r",
        "150",
        "-l",
        "20",
        // A probe that waits longer than this finds the service unavailable.
        "-p",
        "3",
        "-u",
        &url,
        "-g",
        "-o",
        prefix.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    let mut cmd = ns_command(proxy.lab.client_ns(), "slowhttptest");
    cmd.args(&all);
    let (out, sockets_mid_run) = std::thread::scope(|scope| {
        let run = scope.spawn(|| lb_tests::output_within(&mut cmd, Duration::from_secs(60)));
        std::thread::sleep(PROBE_AT);
        let sockets = proxy_sockets(proxy, port);
        (run.join().expect("slowhttptest ran"), sockets)
    });
    let text = strip_colours(&String::from_utf8_lossy(&out.stdout));
    assert!(out.status.success(), "slowhttptest {mode}: {text}");
    let csv = std::fs::read_to_string(prefix.with_extension("csv"))
        .unwrap_or_else(|e| panic!("slowhttptest {mode} wrote no CSV: {e}; {text}"));
    let rows = csv
        .lines()
        .skip(1)
        .map(|line| {
            let cells: Vec<u64> = line.split(',').map(|c| c.trim().parse().unwrap()).collect();
            cells.try_into().unwrap_or_else(|c| panic!("CSV row {c:?}"))
        })
        .collect();
    SlowRun {
        text,
        rows,
        sockets_mid_run,
    }
}

/// The balancer's TCP sockets on local `port` that hold a connection or
/// unsent data (established, or closed by the proxy with data still to
/// send); not the listener, nor those whose FIN went out with everything.
fn proxy_sockets(proxy: &Proxy, port: u16) -> usize {
    let filter = format!("sport = :{port}");
    let out = lb_tests::output_within(
        ns_command(proxy.lab.balancer_ns(), "ss").args([
            "-Htn",
            "state",
            "established",
            "state",
            "fin-wait-1",
            &filter,
        ]),
        Duration::from_secs(10),
    );
    assert!(out.status.success(), "ss: {out:?}");
    String::from_utf8_lossy(&out.stdout).lines().count()
}

/// `text` without terminal colour sequences (`ESC [ ... m`).
fn strip_colours(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            chars.by_ref().take_while(|&c| c != 'm').for_each(drop);
        } else {
            out.push(c);
        }
    }
    out
}

/// The service was available at every second of the run (slowhttptest's
/// probe got an answer: its CSV's last column is 0 when it did not), and
/// the tool made at least `least` of its connections.
fn assert_available_throughout(mode: &str, run: &SlowRun, least: u64) {
    let SlowRun { text, rows, .. } = run;
    assert!(rows.len() > 3, "{mode}: a run of a few seconds: {rows:?}");
    assert!(
        rows.iter().all(|r| r[4] != 0) && !text.contains("service available:   NO"),
        "{mode}: the service was unavailable: {rows:?}\n{text}"
    );
    let connected = rows.iter().map(|r| r[3]).max().unwrap_or(0);
    assert!(
        connected >= least,
        "{mode}: the connections were made: {rows:?}"
    );
}

#[test]
fn slowloris_and_slow_bodies_are_cut_and_the_service_stays_available() {
    let proxy = Proxy::start("slow");
    // Slowloris: heads that never end; slow body (R-U-Dead-Yet): a body a
    // few bytes every 5 s, more than `timeout_client` between two.
    for (mode, args) in [
        ("-H", vec!["-i", "5"]),
        ("-B", vec!["-i", "5", "-s", "8192"]),
    ] {
        let run = slowhttptest(&proxy, mode, 300, HTTP_PORT, "/", &args);
        assert_available_throughout(mode, &run, 250);
        assert_eq!(
            run.sockets_mid_run, 0,
            "{mode}: every connection cut by {PROBE_AT:?}"
        );
        // It notices a close when it next sends, up to one interval (5 s)
        // later; a proxy that cut nothing would last the whole 20 s.
        let cut_by = SLOW_LIMIT_SECS + 5 + 2;
        let last = run.rows.last().map_or(0, |r| r[0]);
        assert!(
            run.text.contains("No open connections left") && last <= cut_by,
            "{mode}: closed within {cut_by} s, not {last}: {}",
            run.text
        );
    }
}

#[test]
fn slow_readers_are_cut_with_their_answers_and_the_service_stays_available() {
    let proxy = Proxy::start("slowrd");
    // Slow read: 1 MB responses read 32 bytes every 5 s through a window
    // of under 1 KiB. (slowhttptest does not notice a reset in this mode:
    // the balancer's sockets are counted instead.)
    let args = ["-n", "5", "-z", "32", "-w", "512", "-y", "1024", "-k", "1"];
    let path = "/bytes/1000000";
    // By default the kernel's autotuned send buffer may take much of each
    // response (on loopback all of it: then the proxy is done with it, and
    // the kernel sends it on, as with HAProxy's and nginx's defaults).
    // Whatever it holds, no one else is blocked.
    let run = slowhttptest(&proxy, "-X", 200, HTTP_PORT, path, &args);
    assert_available_throughout("-X", &run, 150);
    // With `send_buffer`, the rest of each response surely waits on the
    // client, which makes no room within `timeout_client`: the proxy gives
    // up, and a connection closed with an answer stuck is reset, so the
    // kernel does not keep the answer either.
    let run = slowhttptest(&proxy, "-X", 200, CAPPED_PORT, path, &args);
    assert_available_throughout("-X capped", &run, 150);
    assert_eq!(run.sockets_mid_run, 0, "-X capped: every connection cut");
}
