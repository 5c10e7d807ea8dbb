//! `[frontend.compression]`: servers' responses gzipped for clients that
//! accept it, on HTTP/1.1 and HTTP/2, and left alone otherwise.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Empty};

use crate::backends::scripted_server;
use crate::support::{h1_client, local_frontend, one_server_pool, start_proxy};
use lb_proxy::*;

/// The text of `/page` and `/stream`: 21 000 bytes that compress well.
fn page() -> String {
    "<p>the quick brown fox jumps over the lazy dog</p>\n".repeat(420)
}

/// A server answering by path: `/page` (HTML, with a strong ETag),
/// `/small` (under `min_size`), `/png`, `/encoded` (already gzip),
/// `/stream` (chunked, in two chunks), anything else 404.
async fn server() -> SocketAddr {
    let script = Arc::new(|_: usize, head: &str, _: &[u8]| {
        let path = head.split(' ').nth(1).unwrap_or("");
        let fixed = |ctype: &str, extra: &str, body: &str| {
            format!(
                "HTTP/1.1 200 OK\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\n{extra}\r\n{body}",
                body.len()
            )
        };
        let answer = match path {
            "/page" => fixed("text/html; charset=utf-8", "etag: \"p1\"\r\n", &page()),
            "/small" => fixed("text/html", "", &"x".repeat(100)),
            "/png" => fixed("image/png", "", &page()),
            "/encoded" => fixed("text/html", "content-encoding: gzip\r\n", &page()),
            "/stream" => {
                let text = page();
                let (a, b) = text.split_at(10_000);
                format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ntransfer-encoding: chunked\r\n\r\n{:x}\r\n{a}\r\n{:x}\r\n{b}\r\n0\r\n\r\n",
                    a.len(),
                    b.len()
                )
            }
            _ => "HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n".to_string(),
        };
        (answer.into_bytes(), false)
    });
    scripted_server(script).await.0
}

/// A proxy compressing with the defaults in front of `server()`.
async fn proxy() -> Proxy {
    let mut fe = local_frontend();
    fe.compression = Some(Compression::default());
    start_proxy(fe, one_server_pool(server().await)).await
}

/// Headers and body of `GET path` over HTTP/1.1 with `accept` as Accept-Encoding.
async fn get(proxy: &Proxy, path: &str, accept: Option<&str>) -> (StatusCode, HeaderMap, Bytes) {
    let mut req = Request::get(format!("http://{}{path}", proxy.local_addrs()[0]));
    if let Some(a) = accept {
        req = req.header("accept-encoding", a);
    }
    let resp = h1_client()
        .request(req.body(Empty::<Bytes>::new()).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    (
        parts.status,
        parts.headers,
        body.collect().await.unwrap().to_bytes(),
    )
}

fn gunzip(bytes: &[u8]) -> String {
    let mut out = String::new();
    flate2::read::GzDecoder::new(bytes)
        .read_to_string(&mut out)
        .expect("a gzip body");
    out
}

#[tokio::test]
async fn responses_are_gzipped_for_clients_that_accept_it() {
    let proxy = proxy().await;
    for path in ["/page", "/stream"] {
        let (status, h, body) = get(&proxy, path, Some("br, gzip")).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(h["content-encoding"], "gzip", "{path}");
        assert!(!h.contains_key("content-length"), "{path}: {h:?}");
        assert_eq!(h["vary"], "Accept-Encoding");
        assert!(body.len() < 2_000, "{path}: {} bytes", body.len());
        assert_eq!(gunzip(&body), page(), "{path}");
    }
    let (_, h, last) = get(&proxy, "/page", Some("gzip")).await;
    assert_eq!(h["etag"], "W/\"p1\"", "a strong validator weakened");
    // HAProxy's comp_rsp, comp_in and comp_out.
    let c = &proxy.stats().frontends()[0].counters;
    assert_eq!(c.comp_responses, 3);
    assert_eq!(c.comp_in, 3 * page().len() as u64);
    assert!(
        c.comp_out >= last.len() as u64 && c.comp_out < c.comp_in / 5,
        "{c:?}"
    );
}

#[tokio::test]
async fn other_requests_and_responses_go_as_they_are() {
    let proxy = proxy().await;
    let cases = [
        ("/page", None),
        ("/page", Some("gzip;q=0, deflate")),
        ("/small", Some("gzip")),
        ("/png", Some("gzip")),
        ("/encoded", Some("gzip")),
    ];
    for (path, accept) in cases {
        let (status, h, body) = get(&proxy, path, accept).await;
        assert_eq!(status, StatusCode::OK);
        let encoding = h.get("content-encoding").map(|v| v.to_str().unwrap());
        let expected = (path == "/encoded").then_some("gzip");
        assert_eq!(encoding, expected, "{path} {accept:?}");
        assert_eq!(h["content-length"], body.len().to_string().as_str());
        // What would have been gzipped for another client says it varies
        // by Accept-Encoding, or a cache would serve it to every client.
        let vary = h.get("vary").map(|v| v.to_str().unwrap());
        let expected = (path == "/page").then_some("Accept-Encoding");
        assert_eq!(vary, expected, "{path} {accept:?}");
    }
    // HEAD: the server's head, untouched.
    let url = format!("http://{}/page", proxy.local_addrs()[0]);
    let head = Request::head(url)
        .header("accept-encoding", "gzip")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let resp = h1_client().request(head).await.unwrap();
    assert!(!resp.headers().contains_key("content-encoding"));
}

#[tokio::test]
async fn curl_decompresses_over_http1_and_h2c() {
    let proxy = proxy().await;
    let url = format!("http://{}/page", proxy.local_addrs()[0]);
    for mode in ["--http1.1", "--http2-prior-knowledge"] {
        let out = tokio::process::Command::new("curl")
            .args(["-sS", "--compressed", mode, "-D", "-", &url])
            .output()
            .await
            .expect("curl");
        let text = String::from_utf8_lossy(&out.stdout);
        let (head, body) = text.split_once("\r\n\r\n").expect("a head");
        assert!(
            head.to_ascii_lowercase().contains("content-encoding: gzip"),
            "{mode}: {head}"
        );
        assert_eq!(body, page(), "{mode}");
    }
}

#[test]
fn bad_compression_settings_are_refused() {
    let any: SocketAddr = "127.0.0.1:1".parse().unwrap();
    let check = |extra: &str| {
        crate::support::two_pool_config(any, any, &format!("[frontend.compression]\n{extra}"), "")
            .validate()
    };
    assert_eq!(check(""), Ok(()));
    assert_eq!(check("level = 9\ntypes = [\"text/*\"]"), Ok(()));
    for bad in [
        "level = 0",
        "level = 10",
        "types = []",
        "types = [\"html\"]",
        "types = [\"*/*\"]",
    ] {
        assert!(
            matches!(check(bad), Err(ConfigError::BadCompression { .. })),
            "{bad}"
        );
    }
    let tcp =
        crate::support::two_pool_config(any, any, "mode = \"tcp\"\n[frontend.compression]", "");
    assert!(matches!(
        tcp.validate(),
        Err(ConfigError::BadCompression { .. })
    ));
}
