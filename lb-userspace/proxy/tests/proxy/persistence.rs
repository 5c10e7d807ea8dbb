//! Cookie persistence (`cookie` on a pool): the first response sets the
//! server's cookie, later requests go back to that server while it serves
//! or drains, the cookie never reaches servers, and a client whose server is
//! gone is balanced again and gets a new cookie. On both HTTP paths.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Request, header};
use http_body_util::{BodyExt, Empty};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::backends::json_backend;
use crate::support::{
    access_lines, capture_access_log, h1_client, h2_handshake, local_frontend, start_proxy,
};
use lb_proxy::*;

/// What one request brought back.
#[derive(Debug)]
struct Answer {
    /// The backend that served it.
    server: String,
    /// The Set-Cookie of the response, if any.
    set_cookie: Option<String>,
    /// Its Cache-Control.
    cache_control: Option<String>,
    /// The Cookie field the backend got.
    cookie_seen: Option<String>,
}

/// GET `path` with `cookie`, over HTTP/2 (hyper's path) or HTTP/1.1 (ours).
async fn get(addr: SocketAddr, path: &str, cookie: Option<&str>, h2: bool) -> Answer {
    let mut req = Request::get(format!("http://{addr}{path}"));
    if let Some(c) = cookie {
        req = req.header(header::COOKIE, c);
    }
    let req = req.body(Empty::<Bytes>::new()).unwrap();
    let resp = if h2 {
        let (mut sender, _conn) = h2_handshake(TcpStream::connect(addr).await.unwrap()).await;
        sender.send_request(req).await.unwrap()
    } else {
        h1_client().request(req).await.unwrap()
    };
    assert_eq!(resp.status(), 200);
    let text = |name| {
        resp.headers()
            .get(name)
            .map(|v: &http::HeaderValue| v.to_str().unwrap().to_string())
    };
    let (set_cookie, cache_control) = (text(header::SET_COOKIE), text(header::CACHE_CONTROL));
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    let j: serde_json::Value = serde_json::from_slice(&body).unwrap();
    Answer {
        server: j["server"].as_str().unwrap().to_string(),
        set_cookie,
        cache_control,
        cookie_seen: j["headers"]["cookie"].as_str().map(str::to_string),
    }
}

/// The `SRV=value` pair a Set-Cookie sets.
fn pair(set_cookie: &str) -> String {
    set_cookie.split(';').next().unwrap().to_string()
}

#[tokio::test]
async fn a_client_keeps_to_its_server_until_it_is_gone_on_both_paths() {
    capture_access_log();
    let backends = [
        json_backend("a").await,
        json_backend("b").await,
        json_backend("c").await,
    ];
    let servers = backends.iter().map(|b| ServerSpec::new(b.addr)).collect();
    let mut pool = Pool::new("app", Algorithm::RoundRobin, servers);
    pool.cookie = Some("SRV".to_string());
    let proxy = start_proxy(local_frontend(), pool).await;
    let addr = proxy.local_addrs()[0];

    for h2 in [false, true] {
        // The first response names the server, for this client only.
        let first = get(addr, "/first", None, h2).await;
        let set = first.set_cookie.expect("a cookie is set");
        assert!(
            set.starts_with("SRV=") && set.ends_with("; Path=/; HttpOnly"),
            "{set}"
        );
        assert!(!set.contains("127.0.0.1"), "no address on the wire: {set}");
        assert_eq!(first.cache_control.as_deref(), Some("private"));
        let mine = format!("{}; theme=dark", pair(&set));
        // Round robin would spread these over three servers.
        for _ in 0..6 {
            let again = get(addr, "/again", Some(&mine), h2).await;
            assert_eq!(again.server, first.server, "h2 {h2}");
            assert_eq!(again.set_cookie, None, "named already");
            // The server gets the client's other cookies, never ours.
            assert_eq!(again.cookie_seen.as_deref(), Some("theme=dark"));
        }
        // A value naming no server is balanced, and corrected.
        let stray = get(addr, "/stray", Some("SRV=ffffffff"), h2).await;
        assert!(stray.set_cookie.is_some());
        assert_eq!(stray.cookie_seen, None);

        // Draining: its clients stay, new ones go elsewhere.
        let i = ["a", "b", "c"].iter().position(|n| *n == first.server);
        let home = backends[i.unwrap()].addr;
        assert!(proxy.set_server_use("app", home, ServerUse::Draining));
        assert_eq!(
            get(addr, "/drain", Some(&mine), h2).await.server,
            first.server
        );
        for _ in 0..6 {
            assert_ne!(get(addr, "/new", None, h2).await.server, first.server);
        }
        // Down: balanced again, with the new server's cookie.
        proxy.set_server_use("app", home, ServerUse::Off);
        let moved = get(addr, "/moved", Some(&mine), h2).await;
        assert_ne!(moved.server, first.server);
        let reset = moved.set_cookie.expect("a new cookie");
        assert_ne!(pair(&reset), pair(&set));
        proxy.set_server_use("app", home, ServerUse::Serving);
    }
    // The access log's third and fourth termination characters, as HAProxy's.
    // (Lines of this test's servers only: other tests ask for /first too.)
    let ours = |l: &str| {
        backends
            .iter()
            .any(|b| l.contains(&format!("/{} ", b.addr)))
    };
    let states = |path: &str| -> Vec<String> {
        access_lines()
            .iter()
            .filter(|l| l.contains(&format!("GET {path} ")) && ours(l))
            .filter_map(|l| l.split_whitespace().nth(7).map(str::to_string))
            .collect()
    };
    for _ in 0..100 {
        if states("/moved").len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(states("/first"), ["--NI", "--NI"]);
    assert!(
        states("/again").iter().all(|s| s == "--VN"),
        "{:?}",
        states("/again")
    );
    assert_eq!(states("/stray"), ["--II", "--II"]);
    assert_eq!(states("/moved"), ["--DI", "--DI"]);
}

#[tokio::test]
async fn the_cookie_is_secure_over_tls_and_the_name_is_checked() {
    let a = json_backend("a").await;
    let dir = crate::support::TempDir::new("persist-tls");
    let (cert, _) = crate::general::write_cert(&dir, "one", &["one.test"]);
    let mut fe = local_frontend();
    fe.tls = Some(TlsConfig {
        certs: vec![cert],
        ..TlsConfig::default()
    });
    let mut pool = crate::support::one_server_pool(a.addr);
    pool.cookie = Some("SRV".to_string());
    let proxy = start_proxy(fe, pool.clone()).await;
    let addr = proxy.local_addrs()[0];
    let (mut tls, _) =
        crate::general::tls_connect(addr, Some("one.test"), &[b"http/1.1"], false).await;
    tls.write_all(b"GET / HTTP/1.1\r\nHost: one.test\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let head = crate::support::read_until_closed(&mut tls).await;
    let line = head
        .lines()
        .find(|l| l.to_ascii_lowercase().starts_with("set-cookie:"))
        .unwrap_or_else(|| panic!("{head}"));
    assert!(line.ends_with("; Path=/; HttpOnly; Secure"), "{line}");

    for bad in ["", "S RV", "SRV;", "SRV=x", "Sé"] {
        pool.cookie = Some(bad.to_string());
        let cfg = ProxyConfig {
            frontends: vec![local_frontend()],
            pools: vec![pool.clone()],
            ..Default::default()
        };
        let e = cfg.validate().expect_err(bad).to_string();
        assert!(e.contains("cookie must be a cookie name"), "{bad}: {e}");
    }
}

#[tokio::test]
async fn servers_may_have_cookie_values_of_their_own_on_both_paths() {
    // As HAProxy's `server s1 ... cookie s1`: clients' cookies keep working
    // when a pool moves over from HAProxy.
    let (a, b) = (json_backend("a").await, json_backend("b").await);
    let mut pool = Pool::new(
        "app",
        Algorithm::RoundRobin,
        vec![
            ServerSpec {
                cookie: Some("s1".into()),
                ..ServerSpec::new(a.addr)
            },
            ServerSpec::new(b.addr),
        ],
    );
    pool.cookie = Some("SRV".to_string());
    let proxy = start_proxy(local_frontend(), pool.clone()).await;
    let addr = proxy.local_addrs()[0];
    for h2 in [false, true] {
        for _ in 0..3 {
            let got = get(addr, "/", Some("SRV=s1"), h2).await;
            assert_eq!(got.server, "a", "h2 {h2}");
            assert_eq!(got.set_cookie, None, "h2 {h2}: already named");
        }
        // Balanced to `a` without a cookie, it is told its value.
        let mut told = Vec::new();
        for _ in 0..2 {
            let got = get(addr, "/", None, h2).await;
            told.push((got.server, got.set_cookie.as_deref().map(pair)));
        }
        told.sort();
        assert_eq!(
            told[0],
            ("a".to_string(), Some("SRV=s1".to_string())),
            "h2 {h2}"
        );
        assert!(
            told[1].1.as_deref().is_some_and(|p| p != "SRV=s1"),
            "{told:?}"
        );
    }

    // Values are cookie-values, unique in the pool, only with the pool's cookie.
    for (value, second, needle) in [
        ("s 1", None, "no spaces"),
        ("s;1", None, "no spaces"),
        ("", None, "1 to 64"),
        (
            "s1",
            Some("s1"),
            "another server of the pool has this cookie value",
        ),
    ] {
        let mut bad = pool.clone();
        bad.servers[0].cookie = Some(value.into());
        bad.servers[1].cookie = second.map(Into::into);
        let cfg = ProxyConfig {
            frontends: vec![local_frontend()],
            pools: vec![bad],
            ..Default::default()
        };
        let e = cfg.validate().expect_err(value).to_string();
        assert!(e.contains(needle) && e.contains("server "), "{value}: {e}");
    }
    let mut no_name = pool.clone();
    no_name.cookie = None;
    let cfg = ProxyConfig {
        frontends: vec![local_frontend()],
        pools: vec![no_name],
        ..Default::default()
    };
    let e = cfg.validate().unwrap_err().to_string();
    assert!(e.contains("needs the pool's cookie"), "{e}");
}
