//! Seeing and steering a running agent: the L7 request metrics after known
//! traffic, the admin listener's REST API (every route, bad input refused
//! with nothing changed, 401 and CSRF refusals) and its stats page in a
//! headless Chromium driven over WebDriver (chromedriver).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use lb_tests::{RunningLab, wait_for};
use lb_userspace::control::protocol::{AdminState, BackendInfo};
use lb_userspace::lab::{Lab, TCP_PORT, VIP_V4, backend_v4};
use lb_userspace::metrics::sample;

/// Where the agent's admin listener binds, in the balancer's namespace.
const ADMIN: &str = "127.0.0.1:8404";
const PASSWORD: &str = "s3cret-admin";
const TOKEN: &str = "0123456789abcdef-admin-token-0123456789";

/// A plain HTTP frontend on the l7 VIP denying `/blocked`, a pool over be1
/// and be2, and the admin listener (userlist and token file).
fn config(lab: &Lab, dir: &Path) -> anyhow::Result<String> {
    lab.make_local_on_balancer(VIP_V4.into())?;
    let params = sha_crypt::Sha512Params::new(1000).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let hash = sha_crypt::sha512_simple(PASSWORD, &params).map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let token_file = dir.join("admin.token");
    std::fs::write(&token_file, format!("{TOKEN}\n"))?;
    Ok(format!(
        r#"
[[frontend]]
name = "web"
binds = ["{VIP_V4}:443"]
default_pool = "app"
[[frontend.acl]]
name = "blocked"
path_prefix = "/blocked"
[[frontend.request]]
action = "deny"
if = "blocked"

[[pool]]
name = "app"
servers = [{{ address = "{}:{TCP_PORT}" }}, {{ address = "{}:{TCP_PORT}" }}]

[[userlist]]
name = "admins"
users = [{{ name = "alice", password = "{hash}" }}]

[admin]
bind = "{ADMIN}"
userlist = "admins"
token_file = "{}"
"#,
        backend_v4(1),
        backend_v4(2),
        token_file.display()
    ))
}

fn start(tag: &str) -> RunningLab {
    RunningLab::start_custom(tag, 2, &[1, 1], None, config).unwrap()
}

/// GETs `paths` from the client namespace, one connection each; their statuses.
fn get_all(lab: &RunningLab, paths: Vec<String>) -> Vec<u16> {
    let vip = std::net::SocketAddr::new(VIP_V4.into(), 443);
    lb_userspace::lab::run_in_ns(lab.lab.client_ns(), move || {
        paths
            .iter()
            .map(|p| {
                let (status, _) =
                    lb_userspace::lab::client::http_get(vip, p, Duration::from_secs(3))
                        .unwrap_or_else(|e| panic!("GET {p}: {e}"));
                status
            })
            .collect()
    })
    .unwrap()
}

#[test]
fn request_metrics_count_the_traffic_sent() {
    let lab = start("admmetrics");
    // N = 20 requests: 12 answered 200 and M = 5 answered 404 by the
    // servers, K = 3 denied (403) by the frontend's ACL rule.
    let mut paths: Vec<String> = (0..12).map(|i| format!("/ok/{i}")).collect();
    paths.extend((0..5).map(|i| format!("/missing/{i}")));
    paths.extend((0..3).map(|i| format!("/blocked/{i}")));
    let statuses = get_all(&lab, paths);
    assert_eq!(statuses.iter().filter(|&&s| s == 200).count(), 12);
    assert_eq!(statuses.iter().filter(|&&s| s == 404).count(), 5);
    assert_eq!(statuses.iter().filter(|&&s| s == 403).count(), 3);

    let fe = "frontend=\"web\"";
    let metric = |text: &str, name: &str, labels: &str| sample(text, name, labels).unwrap_or(0);
    // A request is counted when its record is finished, just after its last byte.
    let mut text = String::new();
    wait_for("every request counted", Duration::from_secs(5), || {
        text = lab.metrics().unwrap();
        metric(&text, "lb_frontend_http_requests_total", fe) == 20
    });
    let code = |labels: &str, class: &str| format!("{labels},code=\"{class}\"");
    assert_eq!(
        metric(&text, "lb_frontend_http_responses_total", &code(fe, "2xx")),
        12
    );
    assert_eq!(
        metric(&text, "lb_frontend_http_responses_total", &code(fe, "4xx")),
        8
    );
    assert_eq!(
        metric(&text, "lb_frontend_http_responses_total", &code(fe, "5xx")),
        0
    );
    assert_eq!(metric(&text, "lb_frontend_requests_denied_total", fe), 3);
    assert_eq!(metric(&text, "lb_frontend_sessions_total", fe), 20);
    assert_eq!(
        metric(&text, "lb_frontend_total_time_seconds_count", fe),
        20
    );
    assert_eq!(metric(&text, "lb_frontend_limit_sessions", fe), 10000);
    // One client at a time: one connection open, or two for a moment: a
    // closed client's connection is released when its serving thread reads
    // the close, and the next client may be accepted on another thread first.
    let max = metric(&text, "lb_frontend_max_sessions", fe);
    assert!((1..=2).contains(&max), "max sessions {max}");
    // Every client closed: no connection is left open (nor counted as one
    // the accept loop waits with).
    wait_for("no client connection open", Duration::from_secs(5), || {
        lab.metric("lb_frontend_current_sessions", fe).unwrap() == 0
    });

    pool_counters(&text);
    servers_and_l4(&lab, &text);
}

/// Pools see the 17 forwarded requests only.
fn pool_counters(text: &str) {
    let metric = |text: &str, name: &str, labels: &str| sample(text, name, labels).unwrap_or(0);
    let code = |labels: &str, class: &str| format!("{labels},code=\"{class}\"");
    let pool = "pool=\"app\"";
    assert_eq!(metric(text, "lb_pool_http_requests_total", pool), 17);
    assert_eq!(
        metric(text, "lb_pool_http_responses_total", &code(pool, "2xx")),
        12
    );
    assert_eq!(
        metric(text, "lb_pool_http_responses_total", &code(pool, "4xx")),
        5
    );
    // Every answer's body is the server's name and a newline, "be1\n" or "be2\n".
    assert_eq!(metric(text, "lb_pool_bytes_out_total", pool), 17 * 4);
    assert_eq!(metric(text, "lb_pool_connection_errors_total", pool), 0);
    for family in ["connect_time", "response_time", "total_time"] {
        let name = format!("lb_pool_{family}_seconds");
        assert_eq!(metric(text, &format!("{name}_count"), pool), 17, "{name}");
        let inf = format!("{pool},le=\"+Inf\"");
        assert_eq!(metric(text, &format!("{name}_bucket"), &inf), 17, "{name}");
        // Buckets are cumulative: none holds more than the next.
        let buckets: Vec<u64> = text
            .lines()
            .filter(|l| l.starts_with(&format!("{name}_bucket{{{pool},")))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect();
        assert_eq!(buckets.len(), 13, "{name}");
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "{name}: {buckets:?}"
        );
    }
}

/// The servers share the 17 requests; `lb show proxy` agrees; L4 backends listed.
fn servers_and_l4(lab: &RunningLab, text: &str) {
    let metric = |text: &str, name: &str, labels: &str| sample(text, name, labels).unwrap_or(0);
    let pool = "pool=\"app\"";
    let mut per_server = 0;
    for i in [1, 2] {
        let server = format!("{pool},server=\"{}:{TCP_PORT}\"", backend_v4(i));
        let n = metric(text, "lb_pool_server_http_requests_total", &server);
        assert!(n > 0, "be{i} took requests");
        per_server += n;
        assert_eq!(metric(text, "lb_pool_server_weight", &server), 1);
        let state = |s: &str| format!("{server},state=\"{s}\"");
        assert_eq!(
            metric(text, "lb_pool_server_admin_state", &state("ready")),
            1
        );
        assert_eq!(
            metric(text, "lb_pool_server_check_status", &state("unchecked")),
            1
        );
        assert_eq!(metric(text, "lb_pool_server_up", &server), 1);
        // One at a time, or two for a moment: a request's server slot is
        // given back just after its last byte went out, and the client's
        // next request may reach the server on another thread first.
        let max = metric(text, "lb_pool_server_max_sessions", &server);
        assert!((1..=2).contains(&max), "max sessions {max}");
    }
    assert_eq!(per_server, 17);
    // `lb show proxy` lists the same counters.
    let out = lab.lb(&["show", "proxy", "--json"]);
    let info: lb_userspace::control::protocol::ProxyInfo =
        serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(info.frontends[0].counters.requests, 20);
    assert_eq!(info.frontends[0].counters.denied, 3);
    assert_eq!(info.pools[0].counters.responses, [0, 12, 0, 5, 0, 0]);
    let table = String::from_utf8_lossy(&lab.lb(&["show", "proxy"]).stdout).to_string();
    assert!(table.starts_with("KIND"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.starts_with("frontend") && l.contains("web")),
        "{table}"
    );
    assert!(text.contains("# TYPE lb_pool_server_response_time_seconds histogram"));
    // L4: the service's backends are listed with their weights and flows.
    let be = format!("service=\"tcp4\",backend=\"{}:{TCP_PORT}\"", backend_v4(1));
    assert_eq!(metric(text, "lb_backend_weight", &be), 1);
    assert!(text.contains("lb_service_active_flows{service=\"tcp4\"}"));
}

/// `curl` in the balancer's namespace against the admin listener; (status, body).
fn admin(lab: &RunningLab, method: &str, path: &str, extra: &[&str]) -> (u16, String) {
    let out = Command::new("ip")
        .args(["netns", "exec", lab.lab.balancer_ns(), "curl", "-sS"])
        .args(["--max-time", "5", "-X", method, "-w", "\n%{http_code}"])
        .args(extra)
        .arg(format!("http://{ADMIN}{path}"))
        .output()
        .expect("run curl");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    eprintln!("{method} {path} -> {code} {body:.200}");
    (code.trim().parse().unwrap_or(0), body.to_string())
}

const USER: [&str; 2] = ["-u", "alice:s3cret-admin"];

/// An authenticated JSON call (`body` sent as application/json).
fn api(lab: &RunningLab, method: &str, path: &str, body: &str) -> (u16, String) {
    let mut args = USER.to_vec();
    args.extend([
        "-H",
        "Content-Type: application/json",
        "--data-binary",
        body,
    ]);
    if method == "GET" {
        args.truncate(2);
    }
    admin(lab, method, path, &args)
}

/// What `lb show backends` says: (group, address, weight, state).
fn backends(lab: &RunningLab) -> Vec<(String, String, u32, AdminState)> {
    let out = lab.lb(&["show", "backends", "--json"]);
    let list: Vec<BackendInfo> = serde_json::from_slice(&out.stdout).unwrap();
    list.into_iter()
        .map(|b| (b.service, b.address.to_string(), b.weight, b.admin))
        .collect()
}

fn state_of(lab: &RunningLab, group: &str, address: &str) -> Option<(u32, AdminState)> {
    backends(lab)
        .into_iter()
        .find(|b| b.0 == group && b.1 == address)
        .map(|b| (b.2, b.3))
}

#[test]
fn rest_api_serves_every_route_and_refuses_bad_input_without_changes() {
    let lab = start("admrest");
    let be1 = format!("{}:{TCP_PORT}", backend_v4(1));
    // Credentials: none, wrong, a user's, the token.
    assert_eq!(admin(&lab, "GET", "/api/services", &[]).0, 401);
    assert_eq!(
        admin(&lab, "GET", "/api/services", &["-u", "alice:nope"]).0,
        401
    );
    let bearer = format!("Authorization: Bearer {TOKEN}");
    assert_eq!(admin(&lab, "GET", "/api/services", &["-H", &bearer]).0, 200);
    let wrong = "Authorization: Bearer 0123456789abcdef-admin-token-012345678X";
    assert_eq!(admin(&lab, "GET", "/stats", &["-H", wrong]).0, 401);

    let (status, doc) = api(&lab, "GET", "/api/openapi.json", "");
    assert_eq!(status, 200);
    let doc: serde_json::Value = serde_json::from_str(&doc).unwrap();
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/api/services",
        "/api/backends",
        "/api/services/tcp4/backends",
    ] {
        let (status, body) = api(&lab, "GET", path, "");
        assert_eq!(status, 200, "{path}");
        assert!(body.contains("tcp4"), "{path}: {body}");
    }
    for path in ["/api/stats", "/api/proxy", "/api/discovery", "/api/bgp"] {
        assert_eq!(api(&lab, "GET", path, "").0, 200, "{path}");
    }
    let (_, proxy) = api(&lab, "GET", "/api/proxy", "");
    assert!(proxy.contains("\"name\":\"app\""), "{proxy}");

    bad_input_changes_nothing(&lab, &be1);
    every_write_route(&lab, &be1);
    csrf_refusals(&lab, &be1);
    cross_origin_refusals(&lab, &be1);
    a_reload_renews_the_credentials(&lab);
}

/// Writes from another site's page are refused; answers may not be framed.
fn cross_origin_refusals(lab: &RunningLab, be1: &str) {
    let path = format!("/api/services/tcp4/backends/{be1}/drain");
    let mut args = USER.to_vec();
    args.extend(["-H", "Content-Type: application/json", "-H"]);
    args.extend(["Origin: http://evil.example", "--data-binary", "{}"]);
    assert_eq!(admin(lab, "POST", &path, &args).0, 403);
    assert_eq!(state_of(lab, "tcp4", be1), Some((7, AdminState::Ready)));
    let mut args = USER.to_vec();
    args.extend(["-D", "/dev/stdout", "-o", "/dev/null"]);
    let (_, head) = admin(lab, "GET", "/stats", &args);
    let head = head.to_ascii_lowercase();
    assert!(head.contains("x-frame-options: deny"), "{head}");
    assert!(head.contains("frame-ancestors 'none'"), "{head}");
    assert!(head.contains("x-content-type-options: nosniff"), "{head}");
}

/// `lb reload` puts a new token in force, and a user taken out of the
/// userlist is refused at once (they kept their rights until a restart).
fn a_reload_renews_the_credentials(lab: &RunningLab) {
    let dir = lab.config_path.parent().unwrap();
    let new_token = "fedcba9876543210-rotated-token-0123456789";
    std::fs::write(dir.join("admin.token"), format!("{new_token}\n")).unwrap();
    let text = std::fs::read_to_string(&lab.config_path).unwrap();
    let without_alice = text.replace("{ name = \"alice\"", "{ name = \"bob\"");
    assert_ne!(text, without_alice);
    std::fs::write(&lab.config_path, without_alice).unwrap();
    let out = lab.lb(&["reload"]);
    assert!(out.status.success(), "{out:?}");
    let old = format!("Authorization: Bearer {TOKEN}");
    let new = format!("Authorization: Bearer {new_token}");
    assert_eq!(admin(lab, "GET", "/api/services", &["-H", &old]).0, 401);
    assert_eq!(admin(lab, "GET", "/api/services", &["-H", &new]).0, 200);
    assert_eq!(admin(lab, "GET", "/api/services", &USER).0, 401);
}

/// Bad input: 4xx with the reason, and nothing changed.
fn bad_input_changes_nothing(lab: &RunningLab, be1: &str) {
    let before = backends(lab);
    let bad = [
        (
            "POST",
            "/api/services/nope/backends/10.0.0.1:80/drain".to_string(),
            "",
            404,
        ),
        (
            "POST",
            format!("/api/services/tcp4/backends/{be1}/explode"),
            "",
            404,
        ),
        (
            "POST",
            "/api/services/tcp4/backends/not-an-address/drain".into(),
            "",
            400,
        ),
        (
            "PUT",
            format!("/api/services/tcp4/backends/{be1}/weight"),
            "{\"weight\":70000}",
            400,
        ),
        (
            "PUT",
            format!("/api/services/tcp4/backends/{be1}/weight"),
            "{\"weight\":-1}",
            400,
        ),
        (
            "PUT",
            format!("/api/services/tcp4/backends/{be1}/weight"),
            "{\"weight\":",
            400,
        ),
        (
            "POST",
            "/api/services/tcp4/backends".into(),
            "{\"address\":\"nope\"}",
            400,
        ),
        (
            "POST",
            "/api/services".into(),
            "{\"name\":\"x\",\"vip\":\"1.2.3\"}",
            400,
        ),
        ("DELETE", "/api/services/nope".into(), "", 404),
        (
            "DELETE",
            "/api/services/tcp4/backends/10.9.9.9:80".into(),
            "",
            404,
        ),
    ];
    for (method, path, body, want) in bad {
        let (status, reason) = api(lab, method, &path, body);
        assert_eq!(status, want, "{method} {path}: {reason}");
        let reason: serde_json::Value = serde_json::from_str(&reason).unwrap();
        assert!(reason["error"].as_str().is_some_and(|r| !r.is_empty()));
    }
    // A write without a JSON content type could be a cross-site form: refused.
    let drain = format!("/api/services/tcp4/backends/{be1}/drain");
    assert_eq!(admin(lab, "POST", &drain, &USER).0, 415);
    assert_eq!(backends(lab), before, "refused requests changed nothing");
}

/// Every write route, checked against `lb show backends`.
fn every_write_route(lab: &RunningLab, be1: &str) {
    let drain = format!("/api/services/tcp4/backends/{be1}/drain");
    assert_eq!(api(lab, "POST", &drain, "").0, 200);
    assert_eq!(state_of(lab, "tcp4", be1), Some((1, AdminState::Drain)));
    let disable = drain.replace("drain", "disable");
    assert_eq!(api(lab, "POST", &disable, "").0, 200);
    assert_eq!(state_of(lab, "tcp4", be1), Some((1, AdminState::Maint)));
    let enable = drain.replace("drain", "enable");
    assert_eq!(api(lab, "POST", &enable, "").0, 200);
    let weight = drain.replace("drain", "weight");
    assert_eq!(api(lab, "PUT", &weight, "{\"weight\":7}").0, 200);
    assert_eq!(state_of(lab, "tcp4", be1), Some((7, AdminState::Ready)));
    // Pool servers too, as `pool:NAME`.
    let pool_drain = format!("/api/services/pool:app/backends/{be1}/drain");
    assert_eq!(api(lab, "POST", &pool_drain, "").0, 200);
    assert_eq!(state_of(lab, "pool:app", be1), Some((1, AdminState::Drain)));

    let added = "198.18.2.99:8080";
    let body = format!("{{\"address\":\"{added}\",\"weight\":3}}");
    assert_eq!(
        api(lab, "POST", "/api/services/tcp4/backends", &body).0,
        200
    );
    assert_eq!(state_of(lab, "tcp4", added), Some((3, AdminState::Ready)));
    let remove = format!("/api/services/tcp4/backends/{added}");
    assert_eq!(api(lab, "DELETE", &remove, "").0, 200);
    assert_eq!(state_of(lab, "tcp4", added), None);
    let svc = "{\"name\":\"extra\",\"vip\":\"198.18.100.9:80\"}";
    assert_eq!(api(lab, "POST", "/api/services", svc).0, 200);
    assert_eq!(api(lab, "POST", "/api/services", svc).0, 409, "added twice");
    assert_eq!(api(lab, "DELETE", "/api/services/extra", "").0, 200);
    assert_eq!(api(lab, "POST", "/api/node/drain", "").0, 200);
    assert_eq!(api(lab, "POST", "/api/node/undrain", "").0, 200);
    assert_eq!(api(lab, "POST", "/api/reload", "").0, 200);
    // The runtime changes survive the reload (journaled as `lb` does).
    assert_eq!(state_of(lab, "tcp4", be1), Some((7, AdminState::Ready)));
}

/// The stats page's forms need its CSRF token.
fn csrf_refusals(lab: &RunningLab, be1: &str) {
    let form = format!("service=tcp4&backend={be1}&action=disable");
    let mut args = USER.to_vec();
    args.extend(["--data-binary", &form]);
    let (status, page) = admin(lab, "POST", "/stats/action", &args);
    assert_eq!(status, 403, "{page}");
    let forged = format!("{form}&csrf=00112233445566778899aabbccddeeff");
    let mut args = USER.to_vec();
    args.extend(["--data-binary", &forged]);
    assert_eq!(admin(lab, "POST", "/stats/action", &args).0, 403);
    assert_eq!(state_of(lab, "tcp4", be1), Some((7, AdminState::Ready)));
}

/// A WebDriver session of chromedriver in the balancer's namespace, over
/// curl; the session (and its Chromium) is ended when dropped.
struct Browser<'a> {
    lab: &'a RunningLab,
    session: String,
}

const DRIVER: &str = "127.0.0.1:9515";

fn webdriver(
    lab: &RunningLab,
    method: &str,
    path: &str,
    body: Option<serde_json::Value>,
) -> anyhow::Result<serde_json::Value> {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", lab.lab.balancer_ns(), "curl", "-sS"])
        .args(["--max-time", "30", "-X", method]);
    if let Some(b) = body {
        cmd.args(["-H", "Content-Type: application/json", "--data-binary"])
            .arg(b.to_string());
    }
    let out = cmd.arg(format!("http://{DRIVER}{path}")).output()?;
    anyhow::ensure!(out.status.success(), "curl {path}: {out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    anyhow::ensure!(v["value"]["error"].is_null(), "{method} {path}: {v}");
    Ok(v["value"].clone())
}

impl<'a> Browser<'a> {
    fn start(lab: &'a mut RunningLab) -> anyhow::Result<Browser<'a>> {
        let ns = lab.lab.balancer_ns().to_string();
        let port = "--port=9515".into();
        lab.lab
            .spawn_in_ns(&ns, Path::new("/usr/bin/chromedriver"), &[port])?;
        let lab = &*lab;
        wait_for("chromedriver", Duration::from_secs(20), || {
            webdriver(lab, "GET", "/status", None).is_ok_and(|v| v["ready"] == true)
        });
        let caps = serde_json::json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"],
            },
        }}});
        let v = webdriver(lab, "POST", "/session", Some(caps))?;
        let session = v["sessionId"].as_str().unwrap_or_default().to_string();
        anyhow::ensure!(!session.is_empty(), "no session: {v}");
        Ok(Browser { lab, session })
    }

    fn call(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> serde_json::Value {
        let path = format!("/session/{}{path}", self.session);
        webdriver(self.lab, method, &path, body).unwrap()
    }

    fn cdp(&self, cmd: &str, params: serde_json::Value) {
        let body = serde_json::json!({"cmd": cmd, "params": params});
        self.call("POST", "/goog/cdp/execute", Some(body));
    }

    /// Clicks the element `css` selects.
    fn click(&self, css: &str) {
        let found = self.call(
            "POST",
            "/element",
            Some(serde_json::json!({"using": "css selector", "value": css})),
        );
        let id = found
            .as_object()
            .and_then(|o| o.values().next())
            .and_then(|v| v.as_str())
            .unwrap_or_else(|| panic!("no element {css}: {found}"))
            .to_string();
        self.call(
            "POST",
            &format!("/element/{id}/click"),
            Some(serde_json::json!({})),
        );
    }

    fn script(&self, script: &str) -> serde_json::Value {
        let body = serde_json::json!({"script": script, "args": []});
        self.call("POST", "/execute/sync", Some(body))
    }

    fn screenshot(&self, name: &str) {
        use base64::Engine as _;
        let png = self.call("GET", "/screenshot", None);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(png.as_str().unwrap_or_default())
            .unwrap();
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
    }
}

impl Drop for Browser<'_> {
    fn drop(&mut self) {
        // Ends Chromium; the lab then stops chromedriver (its child).
        let _ = webdriver(
            self.lab,
            "DELETE",
            &format!("/session/{}", self.session),
            None,
        );
    }
}

/// Rows of the page: (group, backend, state, health).
const ROWS: &str = "return Array.from(document.querySelectorAll('tr.backend')).map(r => \
    [r.dataset.group, r.dataset.backend, r.querySelector('td.state').textContent, \
     r.querySelector('td.health').textContent]);";

#[test]
fn stats_page_in_a_browser_shows_every_backend_and_drains_one() {
    let mut lab = start("admpage");
    let expected = backends(&lab);
    let browser = Browser::start(&mut lab).unwrap();
    use base64::Engine as _;
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("alice:{PASSWORD}"));
    browser.cdp("Network.enable", serde_json::json!({}));
    let headers = serde_json::json!({"headers": {"Authorization": format!("Basic {basic}")}});
    browser.cdp("Network.setExtraHTTPHeaders", headers);
    let url = serde_json::json!({"url": format!("http://{ADMIN}/stats?refresh=0")});
    browser.call("POST", "/url", Some(url));
    browser.screenshot("stats-page.png");
    // Its inline script ran: the Content-Security-Policy allows it by hash.
    let ran = browser.script("return sessionStorage.getItem('lbrates') !== null;");
    assert_eq!(
        ran,
        serde_json::Value::Bool(true),
        "the page's script was blocked"
    );

    let rows = browser.script(ROWS);
    let rows: Vec<Vec<String>> = serde_json::from_value(rows).unwrap();
    for (group, address, _, state) in &expected {
        let row = rows
            .iter()
            .find(|r| r[0] == *group && r[1] == *address)
            .unwrap_or_else(|| panic!("{group} {address} not on the page: {rows:?}"));
        let shown = serde_json::to_value(state).unwrap();
        assert_eq!(Some(row[2].as_str()), shown.as_str(), "{group} {address}");
    }
    assert_eq!(rows.len(), expected.len(), "{rows:?}");

    // Click "drain" of tcp4's first backend: the form posts with its CSRF token.
    let be1 = format!("{}:{TCP_PORT}", backend_v4(1));
    browser.click(&format!(
        "form[data-backend='tcp4 {be1}'] button[value='drain']"
    ));
    wait_for("the backend drained", Duration::from_secs(10), || {
        state_of(browser.lab, "tcp4", &be1) == Some((1, AdminState::Drain))
    });
    // The page came back (303 to /stats) showing it drained, in its colour.
    wait_for("the page shows it", Duration::from_secs(10), || {
        let rows: Vec<Vec<String>> =
            serde_json::from_value(browser.script(ROWS)).unwrap_or_default();
        rows.iter()
            .any(|r| r[0] == "tcp4" && r[1] == be1 && r[2] == "drain")
    });
    browser.screenshot("stats-page-drained.png");
    // A pool server's row shuts its sessions down (an L4 backend's has no
    // such button): the agent takes it and the page comes back, no error.
    let button = "button[value='shutdown-sessions']";
    let count = |css: String| {
        let script = format!("return document.querySelectorAll(\"{css}\").length;");
        browser.script(&script).as_u64()
    };
    assert_eq!(
        count(format!("form[data-backend='tcp4 {be1}'] {button}")),
        Some(0)
    );
    browser.click(&format!("form[data-backend='pool:app {be1}'] {button}"));
    wait_for("the page again, no error", Duration::from_secs(10), || {
        let url = browser.call("GET", "/url", None);
        let error = browser.script("return document.getElementById('reason') !== null;");
        url.as_str().is_some_and(|u| u.ends_with("/stats")) && error == false
    });
}
