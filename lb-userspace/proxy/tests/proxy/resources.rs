//! A peer that makes the proxy use up a resource (memory, a server's
//! patience): what is counted is refused past its limit. Real sockets,
//! our HTTP/1 path.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::support::{local_frontend, start_proxy};
use lb_proxy::*;

/// How long a test waits for an answer.
const GIVE_UP: Duration = Duration::from_secs(3);

/// A server that reads each request up to the end of its chunked body
/// (trailers included) and answers 200, or `answer` once a head is in.
async fn server(answer: Option<&'static [u8]>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut got = Vec::new();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    let done = match answer {
                        Some(_) => got.windows(4).any(|w| w == b"\r\n\r\n"),
                        None => {
                            got.windows(5).any(|w| w == b"\r\n0\r\n") && got.ends_with(b"\r\n\r\n")
                        }
                    };
                    if done {
                        let a = answer.unwrap_or(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n");
                        let _ = s.write_all(a).await;
                        return;
                    }
                    match s.read(&mut buf).await {
                        Ok(n @ 1..) => got.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
            });
        }
    });
    addr
}

/// Sends `request` to `front` (from a task of its own: the proxy may answer
/// before taking it all) and returns what comes back until the close.
async fn exchange(front: SocketAddr, request: Vec<u8>) -> String {
    let s = TcpStream::connect(front).await.unwrap();
    let (mut r, mut w) = s.into_split();
    tokio::spawn(async move {
        let _ = w.write_all(&request).await;
        // Kept open: the proxy's close must come from the proxy.
        tokio::time::sleep(GIVE_UP).await;
    });
    let mut out = Vec::new();
    let mut buf = vec![0u8; 16 * 1024];
    let read = tokio::time::timeout(GIVE_UP, async {
        while let Ok(n @ 1..) = r.read(&mut buf).await {
            out.extend_from_slice(&buf[..n]);
        }
    })
    .await;
    let text = String::from_utf8_lossy(&out[..out.len().min(200)]).into_owned();
    assert!(read.is_ok(), "still open; got {text:?}");
    text
}

async fn proxy(server: SocketAddr) -> Proxy {
    let pool = Pool::new("app", Algorithm::RoundRobin, vec![ServerSpec::new(server)]);
    start_proxy(local_frontend(), pool).await
}

/// `n` header lines `a: b`.
fn many_fields(n: usize) -> Vec<u8> {
    b"a: b\r\n".repeat(n)
}

#[tokio::test]
async fn a_request_with_thousands_of_tiny_headers_is_400() {
    let proxy = proxy(server(None).await).await;
    let mut req = b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec();
    // 10 000 fields in 60 KB: past the 100 fields parsed per head long
    // before the head size limit.
    req.extend(many_fields(10_000));
    req.extend_from_slice(b"\r\n");
    let got = exchange(proxy.local_addrs()[0], req).await;
    assert!(got.starts_with("HTTP/1.1 400"), "got {got:?}");
}

#[tokio::test]
async fn a_response_with_thousands_of_tiny_headers_is_502() {
    let mut head = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n".to_vec();
    head.extend(many_fields(10_000));
    head.extend_from_slice(b"\r\n");
    let head: &'static [u8] = Vec::leak(head);
    let proxy = proxy(server(Some(head)).await).await;
    let req = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".to_vec();
    let got = exchange(proxy.local_addrs()[0], req).await;
    assert!(got.starts_with("HTTP/1.1 502"), "got {got:?}");
}

#[tokio::test]
async fn chunked_trailers_past_16_kib_are_400() {
    let proxy = proxy(server(None).await).await;
    let mut req = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n".to_vec();
    req.extend_from_slice(b"Connection: close\r\n\r\n1\r\na\r\n0\r\n");
    // 60 KB of trailers: without a limit they would go on for ever.
    req.extend(many_fields(10_000));
    req.extend_from_slice(b"\r\n");
    let got = exchange(proxy.local_addrs()[0], req).await;
    assert!(got.starts_with("HTTP/1.1 400"), "got {got:?}");
    // Trailers that fit go through.
    let mut req = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n".to_vec();
    req.extend_from_slice(b"Connection: close\r\n\r\n1\r\na\r\n0\r\n");
    req.extend(many_fields(100));
    req.extend_from_slice(b"\r\n");
    let got = exchange(proxy.local_addrs()[0], req).await;
    assert!(got.starts_with("HTTP/1.1 200"), "got {got:?}");
}
