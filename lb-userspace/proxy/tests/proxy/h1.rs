//! Tests of our own HTTP/1.1 path (proxy/h1) against scripted raw-TCP servers:
//! the framings and interim answers hyper used to deal with for us.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::backends::{Seen, read_head, scripted_server, server};
use crate::support::{dead_addr, exchange_until_closed, proxy_to, read_until_closed};
use lb_proxy::*;

/// A proxy in front of a server that always answers `answer` (and closes after it when `close`).
async fn proxy_answering(answer: &'static str, close: bool) -> (Proxy, Seen) {
    let (server, seen) =
        scripted_server(Arc::new(move |_, _, _| (answer.as_bytes().to_vec(), close))).await;
    (proxy_to(server).await, seen)
}

/// Sends a POST with a body of `len` bytes of `x` from a task; the read half
/// stays with the caller, to read the answer while the body goes.
async fn post_x_body(
    front: SocketAddr,
    len: usize,
) -> (
    tokio::net::tcp::OwnedReadHalf,
    tokio::task::JoinHandle<tokio::net::tcp::OwnedWriteHalf>,
) {
    let s = TcpStream::connect(front).await.unwrap();
    let (r, mut w) = s.into_split();
    let writer = tokio::spawn(async move {
        let head = format!("POST / HTTP/1.1\r\nHost: x\r\nContent-Length: {len}\r\n\r\n");
        let _ = w.write_all(head.as_bytes()).await;
        // The proxy stops reading at some point: errors here are expected.
        let _ = w.write_all(&vec![b'x'; len]).await;
        w
    });
    (r, writer)
}

/// Sends `request` and reads until the proxy closes the connection (5 s at most).
async fn until_closed(front: SocketAddr, request: &str) -> String {
    exchange_until_closed(front, request.as_bytes()).await
}

const CHUNKED: &str =
    "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n";

#[tokio::test]
async fn chunked_response_to_http10_client_is_dechunked_then_closed() {
    let (proxy, _) = proxy_answering(CHUNKED, false).await;
    let out = until_closed(proxy.local_addrs()[0], "GET / HTTP/1.0\r\n\r\n").await;
    assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
    assert!(out.contains("connection: close\r\n"), "{out}");
    assert!(
        !out.to_ascii_lowercase().contains("transfer-encoding"),
        "{out}"
    );
    assert!(out.ends_with("\r\n\r\nhello world"), "{out}");
}

#[tokio::test]
async fn chunked_response_to_http11_client_keeps_its_framing_and_codings() {
    let gzip = "HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n";
    let (proxy, _) = proxy_answering(gzip, false).await;
    let front = proxy.local_addrs()[0];
    let out = until_closed(
        front,
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        out.contains("transfer-encoding: gzip, chunked\r\n"),
        "{out}"
    );
    assert!(out.ends_with("\r\n\r\n3\r\nabc\r\n0\r\n\r\n"), "{out}");
}

#[tokio::test]
async fn response_delimited_by_close_reaches_the_client_then_closes() {
    let (proxy, _) = proxy_answering("HTTP/1.1 200 OK\r\nX-A: 1\r\n\r\nall of it", true).await;
    let front = proxy.local_addrs()[0];
    // A keep-alive client: the proxy must close, as the end of the body is the close.
    let out = until_closed(front, "GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
    assert!(out.contains("connection: close\r\n"), "{out}");
    assert!(out.ends_with("\r\n\r\nall of it"), "{out}");
}

#[tokio::test]
async fn interim_answers_are_relayed_and_head_answers_have_no_body() {
    let (server, seen) = scripted_server(Arc::new(|_, head: &str, _: &[u8]| {
        let answer = if head.starts_with("HEAD") {
            "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n"
        } else {
            "HTTP/1.1 103 Early Hints\r\nLink: </a.css>\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
        };
        (answer.as_bytes().to_vec(), false)
    }))
    .await;
    let proxy = proxy_to(server).await;
    // HEAD, then GET on the same connection: the HEAD answer's Content-Length announces no body.
    let out = until_closed(
        proxy.local_addrs()[0],
        "HEAD / HTTP/1.1\r\nHost: x\r\n\r\nGET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    let answers: Vec<&str> = out.split("HTTP/1.1 ").filter(|a| !a.is_empty()).collect();
    assert_eq!(answers.len(), 3, "{out}");
    assert!(answers[0].starts_with("200") && answers[0].ends_with("content-length: 100\r\n\r\n"));
    // The 103 goes ahead of its final answer (RFC 9110 15.2).
    assert_eq!(
        answers[1], "103 Early Hints\r\nlink: </a.css>\r\n\r\n",
        "{out}"
    );
    assert!(
        answers[2].starts_with("200") && answers[2].ends_with("\r\n\r\nok"),
        "{out}"
    );
    assert_eq!(seen.lock().unwrap().len(), 2);
}

#[tokio::test]
async fn expect_100_continue_is_answered_before_the_body() {
    let (server, seen) = scripted_server(Arc::new(|_, _: &str, body: &[u8]| {
        let mut answer =
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        answer.extend_from_slice(body);
        (answer, false)
    }))
    .await;
    let proxy = proxy_to(server).await;
    let mut s = TcpStream::connect(proxy.local_addrs()[0]).await.unwrap();
    s.write_all(b"POST / HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let mut interim = [0u8; 25];
    tokio::time::timeout(Duration::from_secs(5), s.read_exact(&mut interim))
        .await
        .expect("no 100 Continue")
        .unwrap();
    assert_eq!(&interim, b"HTTP/1.1 100 Continue\r\n\r\n");
    s.write_all(b"hello").await.unwrap();
    let out = read_until_closed(&mut s).await;
    assert!(
        out.starts_with("HTTP/1.1 200") && out.ends_with("hello"),
        "{out}"
    );
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn request_head_reaches_the_server_as_http11_with_forwarded_headers() {
    let (server, seen) = scripted_server(Arc::new(|_, _: &str, _: &[u8]| {
        (b"HTTP/1.1 204 No Content\r\n\r\n".to_vec(), false)
    }))
    .await;
    let proxy = proxy_to(server).await;
    let out = until_closed(
        proxy.local_addrs()[0],
        "GET /a?b=1 HTTP/1.0\r\nHost: x\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Kept: 2\r\n\r\n\
         GET /next HTTP/1.0\r\nHost: x\r\n\r\n",
    )
    .await;
    // The HTTP/1.0 keep-alive client is told the connection stays, then it ends after the second.
    assert!(
        out.starts_with("HTTP/1.1 204 No Content\r\nconnection: keep-alive\r\n\r\n"),
        "{out}"
    );
    assert_eq!(out.matches("HTTP/1.1 204").count(), 2, "{out}");
    let seen = seen.lock().unwrap();
    let first = &seen[0];
    assert!(first.starts_with("GET /a?b=1 HTTP/1.1\r\n"), "{first}");
    assert!(first.contains("x-kept: 2\r\n") && first.contains("x-forwarded-for: 127.0.0.1\r\n"));
    assert!(
        !first.contains("x-hop") && !first.contains("connection"),
        "{first}"
    );
}

#[tokio::test]
async fn an_idempotent_request_on_a_kept_connection_the_server_drops_is_sent_again() {
    // The server answers the first request of a connection, and closes the
    // connection without a word on the second: after the proxy took it from
    // its idle list, before any answer (a keep-alive close racing the request).
    let (server, seen) = scripted_server(Arc::new(|n, _: &str, _: &[u8]| match n {
        0 => (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok".to_vec(),
            false,
        ),
        _ => (Vec::new(), true),
    }))
    .await;
    let proxy = proxy_to(server).await;
    let front = proxy.local_addrs()[0];
    let first = until_closed(
        front,
        "GET /1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(first.starts_with("HTTP/1.1 200"), "{first}");
    let second = until_closed(
        front,
        "GET /2 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(
        second.starts_with("HTTP/1.1 200") && second.ends_with("ok"),
        "{second}"
    );
    // Sent on the kept connection (dropped), then again on a new one.
    {
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(seen[1].starts_with("GET /2") && seen[2].starts_with("GET /2"));
    }
    // A POST is not idempotent (RFC 9110 9.2.2): the server may have acted
    // on it before it closed, so it is answered 502 and never sent again.
    let kept = until_closed(
        front,
        "GET /3 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(kept.starts_with("HTTP/1.1 200"), "{kept}");
    let post = until_closed(
        front,
        "POST /4 HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert!(post.starts_with("HTTP/1.1 502"), "{post}");
    let seen = seen.lock().unwrap();
    assert_eq!(
        seen.iter().filter(|h| h.starts_with("POST /4")).count(),
        1,
        "{seen:?}"
    );
}

#[tokio::test]
async fn answer_given_before_reading_a_body_still_reaches_the_client() {
    // No server can be reached: 503 comes before the 128 KiB body is read,
    // and the connection then closes; a client that reads only after sending
    // its body gets the whole answer. (Whether the proxy lingers before
    // closing does not show here: a Linux client keeps the bytes that came
    // before a reset, once the proxy's FIN is in.)
    let proxy = proxy_to(dead_addr().await).await;
    let (mut r, writer) = post_x_body(proxy.local_addrs()[0], 128 << 10).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let out = read_until_closed(&mut r).await;
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    assert!(
        out.contains("connection: close\r\n") && out.ends_with("</html>\n"),
        "{out}"
    );
    writer.abort();
}

#[tokio::test]
async fn body_bytes_the_server_refused_never_reach_the_client() {
    // The server answers as soon as it has the head and closes without
    // reading the body: sending the rest of it fails with bytes still in the
    // proxy's output buffer, and the client must get the server's answer only.
    let server = server(|mut s| async move {
        read_head(&mut s).await;
        let answer =
            "HTTP/1.1 413 Payload Too Large\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
        let _ = s.write_all(answer.as_bytes()).await;
        // Dropped with the body unread: the proxy's next writes fail.
    })
    .await;
    let proxy = proxy_to(server).await;
    let (mut r, writer) = post_x_body(proxy.local_addrs()[0], 8 << 20).await;
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), r.read_to_end(&mut out))
        .await
        .expect("the proxy did not close the connection");
    let out = String::from_utf8_lossy(&out);
    assert!(
        out.starts_with("HTTP/1.1 413"),
        "{}",
        &out[..out.len().min(200)]
    );
    assert!(!out.contains('x'), "request bytes in the answer");
    writer.abort();
}

#[tokio::test]
async fn bytes_after_a_complete_response_never_answer_the_next_request() {
    // Response queue poisoning: a server (or what an attacker made of it)
    // sends a second, unasked response right behind a 204 or a HEAD answer.
    // Whoever's request next takes that connection must not get it.
    for first in [
        "HTTP/1.1 204 No Content\r\n\r\n",
        "HTTP/1.1 200 OK\r\ncontent-length: 3\r\n\r\nabc",
        "HTTP/1.1 304 Not Modified\r\ncontent-length: 6\r\n\r\n",
    ] {
        let (server, _seen) = scripted_server(Arc::new(move |n, _: &str, _: &[u8]| {
            if n == 0 {
                let poison = "HTTP/1.1 200 OK\r\ncontent-length: 6\r\n\r\nPOISON";
                (format!("{first}{poison}").into_bytes(), false)
            } else {
                (
                    b"HTTP/1.1 200 OK\r\ncontent-length: 4\r\n\r\ngood".to_vec(),
                    false,
                )
            }
        }))
        .await;
        let own = proxy_to(server).await;
        let hyper = crate::support::hyper_path_proxy(server, |_| {}, |_| {}).await;
        for proxy in [&own, &hyper] {
            let addr = proxy.local_addrs()[0];
            exchange_until_closed(
                addr,
                b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
            )
            .await;
            for _ in 0..3 {
                let out = exchange_until_closed(
                    addr,
                    b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                )
                .await;
                assert!(!out.contains("POISON"), "{first:?}: {out}");
            }
        }
    }
}
