//! http-request and http-response rules (`actions`) end to end: a real
//! backend that echoes what it received, and the compile errors of bad rules.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::{HeaderMap, StatusCode, header};
use http_body_util::{BodyExt, Empty};

use crate::backends::json_backend;
use crate::support::{exchange_until_closed, h1_client, two_pool_config};
use lb_proxy::*;

/// The shared JSON backend (`json_backend`), and the requests it served.
async fn backend(name: &'static str) -> (SocketAddr, Arc<AtomicUsize>) {
    let b = json_backend(name).await;
    (b.addr, b.requests)
}

async fn start(cfg: ProxyConfig) -> Proxy {
    let router = routing::router(&cfg).unwrap();
    Proxy::start(cfg, Some(router)).await.unwrap()
}

struct Got {
    status: StatusCode,
    headers: HeaderMap,
    body: String,
}

impl Got {
    fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap()
    }
    /// Values of a request header as the backend saw it.
    fn seen(&self, name: &str) -> Vec<String> {
        match &self.json()["header_lists"][name] {
            serde_json::Value::Array(a) => {
                a.iter().map(|v| v.as_str().unwrap().to_string()).collect()
            }
            _ => Vec::new(),
        }
    }
}

async fn send(proxy: &Proxy, path: &str, headers: &[(&str, &str)]) -> Got {
    let client = h1_client();
    let mut req = http::Request::builder().uri(format!("http://{}{path}", proxy.local_addrs()[0]));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = client
        .request(req.body(Empty::new()).unwrap())
        .await
        .unwrap();
    let (head, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Got {
        status: head.status,
        headers: head.headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }
}

fn basic(user: &str, password: &str) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let raw = format!("{user}:{password}").into_bytes();
    let mut out = String::from("Basic ");
    for chunk in raw.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

const ACLS: &str = r#"
[[frontend.acl]]
name = "admin"
path_prefix = "/admin"
[[frontend.acl]]
name = "old"
path_prefix = "/old"
[[frontend.acl]]
name = "new"
path_prefix = "/new"
[[frontend.acl]]
name = "loc"
path_prefix = "/loc"
[[frontend.acl]]
name = "pre"
path_prefix = "/pre"
[[frontend.acl]]
name = "sch"
path_prefix = "/sch"
[[frontend.acl]]
name = "health"
path = "/health"
[[frontend.acl]]
name = "teapot"
path = "/teapot"
"#;

#[tokio::test]
async fn deny_never_reaches_the_server() {
    let ((app, hits), (api, _)) = (backend("app").await, backend("api").await);
    let rules = format!(
        r#"{ACLS}
[[frontend.request]]
action = "deny"
if = "admin"
[[frontend.request]]
action = "deny"
status = 429
if = "teapot"
"#
    );
    let proxy = start(two_pool_config(app, api, &rules, "")).await;
    let r = send(&proxy, "/admin/x", &[]).await;
    assert_eq!(r.status, StatusCode::FORBIDDEN);
    assert!(r.body.contains("403 Forbidden"), "{}", r.body);
    assert_eq!(
        send(&proxy, "/teapot", &[]).await.status,
        StatusCode::TOO_MANY_REQUESTS
    );
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    let r = send(&proxy, "/ok", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn redirect_variants_and_codes() {
    let ((app, hits), (api, _)) = (backend("app").await, backend("api").await);
    let rules = format!(
        r#"{ACLS}
[[frontend.request]]
action = "redirect"
location = "https://x.example/moved"
code = 301
if = "loc"
[[frontend.request]]
action = "redirect"
prefix = "https://new.example/"
code = 308
if = "pre"
[[frontend.request]]
action = "redirect"
scheme = "https"
if = "sch"
"#
    );
    let proxy = start(two_pool_config(app, api, &rules, "")).await;
    let location = |r: &Got| r.headers[header::LOCATION].to_str().unwrap().to_string();
    let r = send(&proxy, "/loc/a?b=1", &[]).await;
    assert_eq!(r.status, StatusCode::MOVED_PERMANENTLY);
    assert_eq!(location(&r), "https://x.example/moved");
    let r = send(&proxy, "/pre/a?b=1", &[]).await;
    assert_eq!(r.status, StatusCode::PERMANENT_REDIRECT);
    assert_eq!(location(&r), "https://new.example/pre/a?b=1");
    let r = send(&proxy, "/sch/a?b=1", &[("host", "www.example")]).await;
    assert_eq!(r.status, StatusCode::FOUND);
    assert_eq!(location(&r), "https://www.example/sch/a?b=1");
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    let r = send(&proxy, "/other", &[]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert!(!r.headers.contains_key(header::LOCATION));
}

#[tokio::test]
async fn header_actions_are_seen_by_the_server() {
    let ((app, _), (api, _)) = (backend("app").await, backend("api").await);
    let rules = format!(
        r#"{ACLS}
[[frontend.request]]
action = "set-header"
name = "x-env"
value = "prod"
[[frontend.request]]
action = "add-header"
name = "x-tag"
value = "b"
[[frontend.request]]
action = "del-header"
name = "x-secret"
[[frontend.request]]
action = "set-header"
name = "x-admin"
value = "1"
if = "admin"
"#
    );
    let proxy = start(two_pool_config(app, api, &rules, "")).await;
    let sent = [("x-env", "dev"), ("x-tag", "a"), ("x-secret", "s")];
    let r = send(&proxy, "/plain", &sent).await;
    assert_eq!(r.seen("x-env"), ["prod"]);
    assert_eq!(r.seen("x-tag"), ["a", "b"]);
    assert!(r.seen("x-secret").is_empty());
    assert!(r.seen("x-admin").is_empty());
    let r = send(&proxy, "/admin", &[]).await;
    assert_eq!(r.seen("x-admin"), ["1"]);
}

#[tokio::test]
async fn header_values_name_the_connection_on_both_paths() {
    let ((app, _), (api, _)) = (backend("app").await, backend("api").await);
    let rules = r#"
[[frontend.acl]]
name = "never"
path_prefix = "/never/"
[[frontend.use_pool]]
pool = "api"
if = "never"
[[frontend.request]]
action = "set-header"
name = "x-real-ip"
value = "%[src]"
[[frontend.request]]
action = "add-header"
name = "x-via"
value = "lb %[dst]:%[dst_port] tls=%[ssl_fc]"
[[frontend.response]]
action = "set-header"
name = "x-client"
value = "%[src]:%[src_port]"
"#;
    for h2_pool in [false, true] {
        let mut cfg = two_pool_config(app, api, rules, "");
        // An HTTP/2 pool the frontend may reach puts it on hyper's path.
        cfg.pools[1].h2 = h2_pool;
        let proxy = start(cfg).await;
        let front = proxy.local_addrs()[0];
        let r = send(&proxy, "/plain", &[("x-real-ip", "203.0.113.66")]).await;
        assert_eq!(r.seen("x-real-ip"), ["127.0.0.1"], "h2 pool {h2_pool}");
        let via = format!("lb {}:{} tls=0", front.ip(), front.port());
        assert_eq!(r.seen("x-via"), [via], "h2 pool {h2_pool}");
        let client = r.headers["x-client"].to_str().unwrap();
        assert!(client.starts_with("127.0.0.1:"), "{client}");
        assert!(client[10..].parse::<u16>().is_ok(), "{client}");
    }
    // An unknown variable is refused when the rules compile.
    let bad =
        "[[frontend.request]]\naction = \"set-header\"\nname = \"x\"\nvalue = \"%[hdr(host)]\"\n";
    let err = actions::compile(&two_pool_config(app, api, bad, "")).unwrap_err();
    assert!(
        err.to_string().contains("unknown variable %[hdr(host)]"),
        "{err}"
    );
}

#[tokio::test]
async fn set_path_keeps_the_query_and_feeds_routing() {
    let ((app, _), (api, _)) = (backend("app").await, backend("api").await);
    let rules = format!(
        r#"{ACLS}
[[frontend.request]]
action = "set-path"
path = "/new/place"
if = "old"
[[frontend.use_pool]]
pool = "api"
if = "new"
"#
    );
    let proxy = start(two_pool_config(app, api, &rules, "")).await;
    let r = send(&proxy, "/old/x?q=1", &[]).await;
    assert_eq!(r.json()["path"], "/new/place?q=1");
    assert_eq!(r.json()["server"], "api");
    let r = send(&proxy, "/other?q=1", &[]).await;
    assert_eq!(r.json()["path"], "/other?q=1");
    assert_eq!(r.json()["server"], "app");
}

#[tokio::test]
async fn return_answers_with_its_body() {
    let ((app, hits), (api, _)) = (backend("app").await, backend("api").await);
    let rules = format!(
        r#"{ACLS}
[[frontend.request]]
action = "return"
body = "ok"
if = "health"
[[frontend.request]]
action = "return"
status = 503
content_type = "application/json"
body = '{{"down":true}}'
if = "teapot"
"#
    );
    let proxy = start(two_pool_config(app, api, &rules, "")).await;
    let r = send(&proxy, "/health", &[]).await;
    assert_eq!((r.status, r.body.as_str()), (StatusCode::OK, "ok"));
    assert_eq!(r.headers[header::CONTENT_TYPE], "text/plain");
    let r = send(&proxy, "/teapot", &[]).await;
    assert_eq!(r.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(r.headers[header::CONTENT_TYPE], "application/json");
    assert_eq!(r.body, r#"{"down":true}"#);
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    assert_eq!(send(&proxy, "/x", &[]).await.status, StatusCode::OK);
}

#[tokio::test]
async fn auth_needs_valid_basic_credentials() {
    let ((app, hits), (api, _)) = (backend("app").await, backend("api").await);
    let params = sha_crypt::Sha512Params::new(1_000).unwrap();
    let hash = sha_crypt::sha512_simple("s3cret:x", &params).unwrap();
    let rules = format!(
        r#"{ACLS}
[[frontend.request]]
action = "auth"
userlist = "admins"
realm = "lb"
if = "admin"
"#
    );
    let users = format!(
        r#"
[[userlist]]
name = "admins"
users = [{{ name = "alice", password = "{hash}" }}, {{ name = "bob", password = "{hash}" }}]
"#
    );
    let proxy = start(two_pool_config(app, api, &rules, &users)).await;
    let r = send(&proxy, "/admin", &[]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    assert_eq!(r.headers[header::WWW_AUTHENTICATE], "Basic realm=\"lb\"");
    for wrong in [
        basic("alice", "nope"),
        basic("carol", "s3cret:x"),
        "Bearer x".into(),
    ] {
        let r = send(&proxy, "/admin", &[("authorization", &wrong)]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED, "{wrong}");
    }
    assert_eq!(hits.load(Ordering::SeqCst), 0);
    let right = basic("alice", "s3cret:x");
    let r = send(&proxy, "/admin", &[("authorization", &right)]).await;
    assert_eq!(r.status, StatusCode::OK);
    assert_eq!(hits.load(Ordering::SeqCst), 1);
    // The condition does not hold: no credentials needed.
    assert_eq!(send(&proxy, "/public", &[]).await.status, StatusCode::OK);

    // A source that keeps guessing (3 failures above) is refused without
    // hashing, even with the right password, once it has failed
    // MAX_FAILURES times; a credential verified before still passes.
    let fails = lb_proxy::basic_auth::MAX_FAILURES - 3;
    for i in 0..fails {
        let guess = basic("alice", &format!("guess{i}"));
        let r = send(&proxy, "/admin", &[("authorization", &guess)]).await;
        assert_eq!(r.status, StatusCode::UNAUTHORIZED);
    }
    let r = send(&proxy, "/admin", &[("authorization", &right)]).await;
    assert_eq!(r.status, StatusCode::OK, "verified before the guesses");
    let other = basic("bob", "s3cret:x");
    let r = send(&proxy, "/admin", &[("authorization", &other)]).await;
    assert_eq!(r.status, StatusCode::UNAUTHORIZED, "refused unhashed");
    assert_eq!(hits.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn response_header_actions_are_seen_by_the_client() {
    let ((app, _), (api, _)) = (backend("app").await, backend("api").await);
    let rules = format!(
        r#"{ACLS}
[[frontend.response]]
action = "set-header"
name = "x-frame-options"
value = "DENY"
[[frontend.response]]
action = "del-header"
name = "server"
if = "admin"
"#
    );
    let proxy = start(two_pool_config(app, api, &rules, "")).await;
    let r = send(&proxy, "/admin", &[]).await;
    assert_eq!(r.headers["x-frame-options"], "DENY");
    assert!(!r.headers.contains_key("server"));
    let r = send(&proxy, "/public", &[]).await;
    assert_eq!(r.headers["x-frame-options"], "DENY");
    assert_eq!(r.headers["server"], "test");
}

fn compile_err(rules: &str, top: &str) -> String {
    let addr = "127.0.0.1:1".parse().unwrap();
    let cfg = two_pool_config(addr, addr, &format!("{ACLS}\n{rules}"), top);
    actions::compile(&cfg)
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
}

#[test]
fn bad_rules_are_refused_with_clear_errors() {
    let cases = [
        ("action = \"deny\"\nif = \"nope\"", "nope"),
        (
            "action = \"auth\"\nuserlist = \"ghosts\"",
            "unknown userlist \"ghosts\"",
        ),
        (
            "action = \"redirect\"\nlocation = \"/x\"\ncode = 200",
            "code 200 is not a redirect",
        ),
        ("action = \"redirect\"", "exactly one of"),
        (
            "action = \"redirect\"\nlocation = \"/x\"\nprefix = \"/y\"",
            "exactly one of",
        ),
        ("action = \"set-header\"\nvalue = \"v\"", "missing `name`"),
        ("action = \"add-header\"\nname = \"x\"", "missing `value`"),
        (
            "action = \"set-header\"\nname = \"content-length\"\nvalue = \"1\"",
            "cannot be changed",
        ),
        ("action = \"set-path\"\npath = \"no-slash\"", "bad path"),
        (
            "action = \"deny\"\nlocation = \"/x\"",
            "`location` does not apply to deny",
        ),
        ("action = \"deny\"\nstatus = 99", "status 99"),
        ("action = \"tarpit\"", "unknown action \"tarpit\""),
    ];
    for (rule, want) in cases {
        let err = compile_err(&format!("[[frontend.request]]\n{rule}"), "");
        assert!(err.contains(want), "{rule}: {err}");
        assert!(err.contains("frontend \"web\": request rule 1"), "{err}");
    }
    let err = compile_err("[[frontend.response]]\naction = \"deny\"", "");
    assert!(
        err.contains("response rule 1 (deny): unknown response action"),
        "{err}"
    );
    let bad_hash = "[[userlist]]\nname = \"u\"\nusers = [{ name = \"a\", password = \"plain\" }]";
    assert!(compile_err("", bad_hash).contains("userlist \"u\": user \"a\": password must be"));
    let twice = "[[userlist]]\nname = \"u\"\n[[userlist]]\nname = \"u\"";
    assert!(compile_err("", twice).contains("defined twice"));
}

#[tokio::test]
async fn error_pages_replace_the_proxys_own_on_both_paths() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let dir = crate::support::TempDir::new("error-pages");
    let page = |name: &str, text: &str| {
        let path = dir.0.join(name);
        std::fs::write(&path, text).unwrap();
        path
    };
    let pages: std::collections::BTreeMap<String, std::path::PathBuf> = [
        (
            "503".to_string(),
            page("503.html", "<p>down for maintenance</p>"),
        ),
        ("403".to_string(), page("403.html", "<p>not here</p>")),
        ("400".to_string(), page("400.html", "<p>say again?</p>")),
    ]
    .into();
    let deny = "[[frontend.acl]]\nname = \"blocked\"\npath_prefix = \"/blocked\"\n\
                [[frontend.request]]\naction = \"deny\"\nif = \"blocked\"\n";
    // Servers that refuse connections: every forwarded request is a 503.
    let dead = crate::support::dead_addr().await;
    let mut ours = two_pool_config(dead, dead, deny, "");
    ours.frontends[0].error_pages = pages.clone();
    let ours = start(ours).await;
    let hyper = crate::support::hyper_path_proxy(
        dead,
        |fe| {
            fe.error_pages = pages.clone();
            let rules: ProxyConfig = toml::from_str(&format!(
                "[[frontend]]\nname = \"x\"\nbinds = []\ndefault_pool = \"x\"\n{deny}"
            ))
            .unwrap();
            fe.acl.extend(rules.frontends[0].acl.clone());
            fe.request = rules.frontends[0].request.clone();
        },
        |_| {},
    )
    .await;
    let ask = |addr: SocketAddr, head: &'static str| async move {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(head.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut out)).await;
        String::from_utf8_lossy(&out).into_owned()
    };
    for (path, proxy) in [("ours", &ours), ("hyper", &hyper)] {
        let addr = proxy.local_addrs()[0];
        let out = ask(
            addr,
            "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 503"), "{path}: {out}");
        assert!(
            out.ends_with("<p>down for maintenance</p>"),
            "{path}: {out}"
        );
        let out = ask(
            addr,
            "GET /blocked HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        )
        .await;
        assert!(out.starts_with("HTTP/1.1 403"), "{path}: {out}");
        assert!(out.ends_with("<p>not here</p>"), "{path}: {out}");
        assert!(
            out.to_ascii_lowercase().contains("content-length: 15"),
            "{path}: {out}"
        );
    }
    // `reload_files` reads the pages again.
    std::fs::write(dir.0.join("503.html"), "<p>back soon</p>").unwrap();
    ours.reload_files().unwrap();
    let out = ask(
        ours.local_addrs()[0],
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.ends_with("<p>back soon</p>"), "{out}");
    // Our HTTP/1 path answers a head it refuses with the page too.
    let out = ask(
        ours.local_addrs()[0],
        "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
    assert!(out.ends_with("<p>say again?</p>"), "{out}");

    // A status the proxy never answers with a page of its own, or a file
    // that cannot be read: refused, named.
    let mut cfg = two_pool_config(dead, dead, "", "");
    cfg.frontends[0].error_pages = [("418".to_string(), page("x.html", "x"))].into();
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("error_pages has \"418\""), "{e}");
    cfg.frontends[0].error_pages = [("502".to_string(), dir.0.join("missing.html"))].into();
    let e = Proxy::start(cfg, None).await.err().expect("refused");
    assert!(format!("{e:#}").contains("missing.html"), "{e:#}");
}

#[tokio::test]
async fn a_redirect_builds_its_location_from_the_path_the_rules_saw() {
    let ((app, _), (api, _)) = (backend("app").await, backend("api").await);
    let rules = r#"
[[frontend.acl]]
name = "v"
path_prefix = "/v/"
[[frontend.request]]
action = "redirect"
prefix = "/"
if = "v"
"#;
    let proxy = start(two_pool_config(app, api, rules, "")).await;
    let front = proxy.local_addrs()[0];
    // The raw path would make a protocol-relative Location: another site.
    for (raw, want) in [
        ("//evil.example/../v/x?q=1", "/v/x?q=1"),
        ("/v/./x", "/v/x"),
    ] {
        let req = format!("GET {raw} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        let out = exchange_until_closed(front, req.as_bytes()).await;
        assert!(out.starts_with("HTTP/1.1 302"), "{raw}: {out}");
        assert!(
            out.to_ascii_lowercase()
                .contains(&format!("location: {want}\r\n")),
            "{raw}: {out}"
        );
    }
    // A raw backslash, which some servers read as `/`, is refused.
    let out = exchange_until_closed(
        front,
        b"GET /\\evil.example/../v/ HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(out.starts_with("HTTP/1.1 400"), "{out}");
}
