//! The lab's backend server: a TCP/UDP responder that answers with its own
//! name, so a client can tell which backend the balancer picked.
//!
//! TCP speaks either a line protocol (every line is answered with `{name}\n`)
//! or, when the first line is an HTTP/1.x request line, minimal HTTP/1.1 with
//! keep-alive. UDP answers every datagram with `{name}\n`.
//!
//! In HTTP mode every request is answered with the name, except
//! `GET /bytes/N`, answered with N bytes (at most [`MAX_BYTES`]) for download
//! tests and benchmarks: the byte at offset `i` is `i % 256`, so a client can
//! check that nothing was lost or reordered ([`pattern_byte`]), `GET
//! /text/N`, N bytes of an HTML table (`text/html`, [`text_byte`]) that
//! deflate shrinks about as much as a real page (the compression bench), and
//! `GET /sleep/MS`, answered after MS milliseconds (at most [`MAX_SLEEP_MS`])
//! with `{name} {n}`, n the `/sleep` requests the server was in at its start
//! (this one included): what maxconn and leastconn tests count.

use std::ffi::OsString;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use socket2::{Domain, Protocol, SockAddr, Socket, Type};

/// Name of the hidden `lb` subcommand that runs this server.
pub const SUBCOMMAND: &str = "lab-backend";
/// Longest line (request line, header or protocol line) accepted before closing.
pub const MAX_LINE: usize = 8 * 1024;
/// Most header lines in one HTTP request before closing.
const MAX_HEADERS: usize = 100;
/// Largest request body the HTTP mode reads and discards.
const MAX_BODY: u64 = 1 << 20;
/// Path prefix of the download: `GET /bytes/N` is answered with N bytes.
pub const BYTES_PATH: &str = "/bytes/";
/// Path prefix of the HTML answer: `GET /text/N`.
pub const TEXT_PATH: &str = "/text/";
/// Targets starting with this are answered 404 (with the server's name).
pub const MISSING_PATH: &str = "/missing";
/// Largest download `/bytes/N` serves (64 MiB); a larger N is answered with 400.
pub const MAX_BYTES: u64 = 64 << 20;
/// Path prefix of the slow answer: `GET /sleep/MS`.
pub const SLEEP_PATH: &str = "/sleep/";
/// Longest `/sleep/MS`; a larger MS is answered with 400.
pub const MAX_SLEEP_MS: u64 = 5_000;
/// `/sleep` requests in progress in this server.
static SLEEPING: AtomicUsize = AtomicUsize::new(0);
/// Length of the precomputed piece of the download pattern (a multiple of 256).
const PATTERN_LEN: usize = 64 * 1024;
/// The download's first [`PATTERN_LEN`] bytes; it repeats from there.
static PATTERN: [u8; PATTERN_LEN] = pattern();

const fn pattern() -> [u8; PATTERN_LEN] {
    let mut bytes = [0u8; PATTERN_LEN];
    let mut i = 0;
    while i < PATTERN_LEN {
        bytes[i] = i as u8;
        i += 1;
    }
    bytes
}

/// The byte at `offset` of every `/bytes/N` download.
pub fn pattern_byte(offset: u64) -> u8 {
    offset as u8
}

/// What a request target asks for in HTTP mode.
#[derive(Debug, PartialEq, Eq)]
enum Answer {
    /// The server's name (every target but `/bytes/...` and `/missing...`).
    Name,
    /// `/missing...`: 404 with the server's name (tests count 4xx answers).
    Missing,
    /// `/bytes/N` with N within [`MAX_BYTES`].
    Bytes(u64),
    /// `/text/N` with N within [`MAX_BYTES`].
    Text(u64),
    /// `/sleep/MS` with MS within [`MAX_SLEEP_MS`].
    Sleep(u64),
    /// `/bytes/...` or `/sleep/...` with no number or one too large.
    BadBytes,
}

fn answer_for(request_line: &[u8]) -> Answer {
    let text = String::from_utf8_lossy(request_line);
    let target = text.split(' ').nth(1).unwrap_or_default();
    if target.starts_with(MISSING_PATH) {
        return Answer::Missing;
    }
    if let Some(ms) = target.strip_prefix(SLEEP_PATH) {
        return match ms.parse::<u64>() {
            Ok(ms) if ms <= MAX_SLEEP_MS => Answer::Sleep(ms),
            _ => Answer::BadBytes,
        };
    }
    let (sized, n): (fn(u64) -> Answer, _) = match (
        target.strip_prefix(BYTES_PATH),
        target.strip_prefix(TEXT_PATH),
    ) {
        (Some(n), _) => (Answer::Bytes, n),
        (_, Some(n)) => (Answer::Text, n),
        (None, None) => return Answer::Name,
    };
    match n.parse::<u64>() {
        Ok(n) if n <= MAX_BYTES => sized(n),
        _ => Answer::BadBytes,
    }
}

/// Sleeps `ms` counted among the sleeping requests; `{name} {n}`, n as
/// they were at the start (this one included).
fn sleep_answer(name: &str, ms: u64) -> String {
    let n = SLEEPING.fetch_add(1, Ordering::SeqCst) + 1;
    std::thread::sleep(Duration::from_millis(ms));
    SLEEPING.fetch_sub(1, Ordering::SeqCst);
    format!("{name} {n}")
}

/// The first [`PATTERN_LEN`] bytes of every `/text/N` answer; they repeat
/// from there (farther apart than deflate's 32 KiB window looks back).
static TEXT: std::sync::LazyLock<Vec<u8>> = std::sync::LazyLock::new(|| {
    const WORDS: [&str; 16] = [
        "invoice", "customer", "shipped", "pending", "Lisbon", "Osaka", "Toronto", "Nairobi",
        "widget", "gasket", "bracket", "sensor", "blue", "green", "large", "small",
    ];
    // A fixed pseudo-random sequence (xorshift): rows differ as a real
    // report's do, and every run serves the same bytes.
    let mut x: u32 = 0x9e37_79b9;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        x
    };
    let mut text = String::with_capacity(PATTERN_LEN + 256);
    let mut row = 0u32;
    while text.len() < PATTERN_LEN {
        row += 1;
        let r = next();
        text.push_str(&format!(
            "<tr id=\"r{row}\"><td>{}</td><td>{} {}</td><td class=\"n\">{}.{:02}</td><td>{}</td></tr>\n",
            WORDS[(r & 15) as usize],
            WORDS[((r >> 4) & 15) as usize],
            WORDS[((r >> 8) & 15) as usize],
            r % 10_000,
            (r >> 16) % 100,
            WORDS[((r >> 12) & 15) as usize],
        ));
    }
    let mut bytes = text.into_bytes();
    bytes.truncate(PATTERN_LEN);
    bytes
});

/// The byte at `offset` of every `/text/N` answer.
pub fn text_byte(offset: u64) -> u8 {
    TEXT[(offset % PATTERN_LEN as u64) as usize]
}

/// Writes `len` bytes of `piece`, repeated.
fn write_repeated(writer: &mut impl Write, piece: &[u8], len: u64) -> io::Result<()> {
    let mut left = len;
    while left > 0 {
        let n = usize::try_from(left)
            .unwrap_or(piece.len())
            .min(piece.len());
        writer.write_all(&piece[..n])?;
        left -= n as u64;
    }
    Ok(())
}

/// Arguments of `lb lab-backend` as a plain struct (the CLI maps onto it).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendArgs {
    /// Name the server answers with.
    pub name: String,
    /// TCP addresses to listen on.
    pub tcp: Vec<SocketAddr>,
    /// UDP addresses to listen on.
    pub udp: Vec<SocketAddr>,
}

impl BackendArgs {
    /// Full `lb` argument vector, subcommand first: `lab-backend --name N --tcp A ... --udp B ...`.
    pub fn to_args(&self) -> Vec<OsString> {
        let mut args = vec![SUBCOMMAND.into(), "--name".into(), self.name.clone().into()];
        for a in &self.tcp {
            args.push("--tcp".into());
            args.push(a.to_string().into());
        }
        for a in &self.udp {
            args.push("--udp".into());
            args.push(a.to_string().into());
        }
        args
    }

    /// Runs the server with these arguments (blocks).
    pub fn run(&self) -> Result<()> {
        run(&self.name, &self.tcp, &self.udp)
    }
}

/// Binds all addresses and serves forever; returns only on a fatal socket error.
///
/// IPv6 sockets are bound with `IPV6_V6ONLY` so `0.0.0.0:p` and `[::]:p` can
/// both be bound on the same port.
pub fn run(name: &str, tcp: &[SocketAddr], udp: &[SocketAddr]) -> Result<()> {
    let listeners = tcp
        .iter()
        .map(|a| bind_tcp(*a).with_context(|| format!("binding TCP {a}")))
        .collect::<Result<Vec<_>>>()?;
    let sockets = udp
        .iter()
        .map(|a| bind_udp(*a).with_context(|| format!("binding UDP {a}")))
        .collect::<Result<Vec<_>>>()?;
    tracing::info!(name, ?tcp, ?udp, "lab backend listening");
    serve(name, listeners, sockets)
}

/// Creates a socket for `addr` with the options every lab socket needs.
fn socket_for(addr: SocketAddr, ty: Type, proto: Protocol) -> io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), ty, Some(proto))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // A restarted server must rebind at once despite TIME_WAIT connections.
    socket.set_reuse_address(true)?;
    socket.bind(&SockAddr::from(addr))?;
    Ok(socket)
}

/// Binds and listens on a TCP address.
pub fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = socket_for(addr, Type::STREAM, Protocol::TCP)?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Binds a UDP address.
pub fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    Ok(socket_for(addr, Type::DGRAM, Protocol::UDP)?.into())
}

/// Serves already-bound sockets forever, one thread per socket and per TCP
/// connection; returns the first fatal error of any of them.
pub fn serve(name: &str, tcp: Vec<TcpListener>, udp: Vec<UdpSocket>) -> Result<()> {
    if tcp.is_empty() && udp.is_empty() {
        return Err(anyhow!("lab backend {name}: nothing to listen on"));
    }
    let name: Arc<str> = Arc::from(format!("{name}\n"));
    let (tx, rx) = mpsc::channel::<anyhow::Error>();
    for listener in tcp {
        let (name, tx) = (name.clone(), tx.clone());
        std::thread::Builder::new()
            .name("lab-tcp".into())
            .spawn(move || {
                let err = accept_loop(&listener, &name);
                let _ = tx.send(anyhow!(err).context("TCP accept"));
            })
            .context("spawning TCP thread")?;
    }
    for socket in udp {
        let (name, tx) = (name.clone(), tx.clone());
        std::thread::Builder::new()
            .name("lab-udp".into())
            .spawn(move || {
                let err = udp_loop(&socket, &name);
                let _ = tx.send(anyhow!(err).context("UDP receive"));
            })
            .context("spawning UDP thread")?;
    }
    drop(tx);
    match rx.recv() {
        Ok(err) => Err(err),
        Err(_) => Err(anyhow!("all lab backend threads ended")),
    }
}

/// Accepts connections until a non-transient error, which it returns.
fn accept_loop(listener: &TcpListener, name: &Arc<str>) -> io::Error {
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                let name = name.clone();
                let spawned =
                    std::thread::Builder::new()
                        .name("lab-conn".into())
                        .spawn(move || {
                            // Per-connection errors (resets, garbage) only end that connection.
                            let _ = handle_connection(stream, &name);
                        });
                if let Err(e) = spawned {
                    tracing::warn!("cannot spawn connection thread: {e}");
                }
            }
            Err(e) if is_transient_accept_error(&e) => continue,
            Err(e) => return e,
        }
    }
}

/// Errors after which `accept` can simply be retried.
fn is_transient_accept_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::Interrupted
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
    ) || matches!(
        e.raw_os_error(),
        Some(libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM | libc::EPROTO)
    )
}

/// Answers every datagram with the name until a fatal receive error.
fn udp_loop(socket: &UdpSocket, name: &Arc<str>) -> io::Error {
    let mut buf = vec![0u8; 65536];
    loop {
        match socket.recv_from(&mut buf) {
            Ok((_, peer)) => {
                // A lost reply is the client's to retry; never stop serving for it.
                let _ = socket.send_to(name.as_bytes(), peer);
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::Interrupted | io::ErrorKind::ConnectionRefused
                ) => {}
            Err(e) => return e,
        }
    }
}

/// Outcome of reading one bounded line.
enum Line {
    /// A complete line, without its `\n` (and `\r`).
    Text(Vec<u8>),
    /// Orderly end of stream (a trailing partial line is dropped).
    Eof,
    /// The line exceeded `MAX_LINE`.
    TooLong,
}

/// Reads one line of at most `MAX_LINE` bytes.
fn read_line<R: BufRead>(reader: &mut R) -> io::Result<Line> {
    let mut buf = Vec::new();
    let limit = u64::try_from(MAX_LINE).unwrap_or(u64::MAX) + 1;
    reader.by_ref().take(limit).read_until(b'\n', &mut buf)?;
    if buf.last() != Some(&b'\n') {
        return Ok(if buf.len() > MAX_LINE {
            Line::TooLong
        } else {
            Line::Eof
        });
    }
    buf.pop();
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(Line::Text(buf))
}

/// Whether a line looks like `METHOD target HTTP/1.x`.
fn is_http_request_line(line: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(line) else {
        return false;
    };
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return false;
    };
    !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_uppercase())
        && !target.is_empty()
        && version.starts_with("HTTP/1.")
}

/// Serves one TCP connection in line mode or HTTP mode, chosen by its first line.
fn handle_connection(stream: TcpStream, name: &str) -> io::Result<()> {
    // Replies are single small writes; do not let Nagle delay them.
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let first = match read_line(&mut reader)? {
        Line::Text(line) => line,
        Line::Eof | Line::TooLong => return Ok(()),
    };
    if is_http_request_line(&first) {
        return serve_http(&mut reader, &mut writer, name, first);
    }
    writer.write_all(name.as_bytes())?;
    loop {
        match read_line(&mut reader)? {
            Line::Text(_) => writer.write_all(name.as_bytes())?,
            Line::Eof | Line::TooLong => return Ok(()),
        }
    }
}

/// Minimal HTTP/1.x: answers each request with `200 OK` and the name, keeping
/// the connection open unless the client (or HTTP/1.0) asks otherwise.
fn serve_http<R: BufRead>(
    reader: &mut R,
    writer: &mut impl Write,
    name: &str,
    first: Vec<u8>,
) -> io::Result<()> {
    let mut request_line = first;
    loop {
        let http10 = request_line.ends_with(b"HTTP/1.0");
        let Some((keep_alive, body_len)) = read_fields(reader, !http10)? else {
            return Ok(());
        };
        // A body, if any, is not looked at but must be consumed to find the next request.
        let skipped = io::copy(&mut reader.by_ref().take(body_len), &mut io::sink())?;
        if skipped < body_len || !answer(writer, &request_line, name, keep_alive)? {
            return Ok(());
        }
        if !keep_alive {
            return Ok(());
        }
        // RFC 9112 asks servers to skip empty lines before a request line.
        request_line = loop {
            match read_line(reader)? {
                Line::Text(line) if line.is_empty() => continue,
                Line::Text(line) => break line,
                Line::Eof | Line::TooLong => return Ok(()),
            }
        };
        if !is_http_request_line(&request_line) {
            writer.write_all(BAD_REQUEST)?;
            return Ok(());
        }
    }
}

const BAD_REQUEST: &[u8] =
    b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Reads a request's header fields: whether the connection stays open
/// (starting from `keep_alive`), and the body's length. None: the
/// connection is to be dropped (ended, too many fields, a bad length).
fn read_fields<R: BufRead>(
    reader: &mut R,
    mut keep_alive: bool,
) -> io::Result<Option<(bool, u64)>> {
    let mut body_len: u64 = 0;
    let mut headers = 0;
    loop {
        let line = match read_line(reader)? {
            Line::Text(line) => line,
            Line::Eof | Line::TooLong => return Ok(None),
        };
        if line.is_empty() {
            return Ok(Some((keep_alive, body_len)));
        }
        headers += 1;
        if headers > MAX_HEADERS {
            return Ok(None);
        }
        let text = String::from_utf8_lossy(&line);
        let Some((key, value)) = text.split_once(':') else {
            continue;
        };
        let (key, value) = (key.trim(), value.trim());
        if key.eq_ignore_ascii_case("connection") {
            for token in value.split(',').map(str::trim) {
                if token.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if token.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        } else if key.eq_ignore_ascii_case("content-length") {
            match value.parse::<u64>() {
                Ok(n) if n <= MAX_BODY => body_len = n,
                _ => return Ok(None),
            }
        }
    }
}

/// Writes the answer to `request_line`; false when the connection ends with it.
fn answer(
    writer: &mut impl Write,
    request_line: &[u8],
    name: &str,
    keep_alive: bool,
) -> io::Result<bool> {
    let connection = if keep_alive {
        ""
    } else {
        "Connection: close\r\n"
    };
    let answer = answer_for(request_line);
    match answer {
        Answer::Name | Answer::Missing => {
            let status = if answer == Answer::Name {
                "200 OK"
            } else {
                "404 Not Found"
            };
            let response = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{name}",
                name.len(),
            );
            writer.write_all(response.as_bytes())?;
        }
        Answer::Sleep(ms) => {
            let body = sleep_answer(name, ms);
            let response = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{connection}\r\n{body}",
                body.len(),
            );
            writer.write_all(response.as_bytes())?;
        }
        Answer::Bytes(len) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n{connection}\r\n"
            );
            writer.write_all(head.as_bytes())?;
            write_repeated(writer, &PATTERN, len)?;
        }
        Answer::Text(len) => {
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\nContent-Length: {len}\r\n{connection}\r\n"
            );
            writer.write_all(head.as_bytes())?;
            write_repeated(writer, &TEXT, len)?;
        }
        Answer::BadBytes => {
            writer.write_all(BAD_REQUEST)?;
            return Ok(false);
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lab::client::{TcpSession, http_get, tcp_ask, udp_ask};
    use std::time::Duration;

    const T: Duration = Duration::from_secs(2);

    /// Starts a server named `name` on ephemeral loopback ports (v4 and v6).
    fn start(name: &str) -> (Vec<SocketAddr>, Vec<SocketAddr>) {
        let tcp: Vec<TcpListener> = ["127.0.0.1:0", "[::1]:0"]
            .iter()
            .map(|a| bind_tcp(a.parse().expect("literal")).expect("bind tcp"))
            .collect();
        let udp: Vec<UdpSocket> = ["127.0.0.1:0", "[::1]:0"]
            .iter()
            .map(|a| bind_udp(a.parse().expect("literal")).expect("bind udp"))
            .collect();
        let tcp_addrs = tcp.iter().map(|l| l.local_addr().expect("addr")).collect();
        let udp_addrs = udp.iter().map(|s| s.local_addr().expect("addr")).collect();
        let name = name.to_string();
        std::thread::spawn(move || serve(&name, tcp, udp));
        (tcp_addrs, udp_addrs)
    }

    #[test]
    fn v4_and_v6_wildcards_share_a_port() {
        let v6 = bind_tcp("[::]:0".parse().expect("literal")).expect("bind [::]");
        let port = v6.local_addr().expect("addr").port();
        bind_tcp(SocketAddr::from(([0, 0, 0, 0], port))).expect("bind 0.0.0.0 on the same port");
        let u6 = bind_udp("[::]:0".parse().expect("literal")).expect("bind [::]");
        let port = u6.local_addr().expect("addr").port();
        bind_udp(SocketAddr::from(([0, 0, 0, 0], port))).expect("bind 0.0.0.0 on the same port");
    }

    #[test]
    fn answers_line_http_and_udp() {
        let (tcp, udp) = start("beX");
        for addr in tcp {
            assert_eq!(tcp_ask(addr, T).expect("tcp_ask"), "beX");
            let mut session = TcpSession::connect(addr, T).expect("connect");
            for _ in 0..3 {
                assert_eq!(session.ask().expect("ask"), "beX");
            }
            assert_eq!(
                http_get(addr, "/", T).expect("http_get"),
                (200, "beX\n".to_string())
            );
        }
        for addr in udp {
            assert_eq!(udp_ask(addr, T).expect("udp_ask"), "beX");
        }
    }

    #[test]
    fn http_keep_alive_serves_several_requests() {
        let (tcp, _) = start("beK");
        let mut stream = TcpStream::connect_timeout(&tcp[0], T).expect("connect");
        stream.set_read_timeout(Some(T)).expect("timeout");
        let req = "GET /a HTTP/1.1\r\nHost: x\r\n\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
        stream.write_all(req.as_bytes()).expect("write");
        let mut all = String::new();
        stream.read_to_string(&mut all).expect("read until close");
        assert_eq!(all.matches("HTTP/1.1 200 OK").count(), 2, "{all}");
        assert_eq!(all.matches("Connection: close").count(), 1, "{all}");
        assert!(all.ends_with("\r\n\r\nbeK\n"), "{all}");
    }

    #[test]
    fn overlong_line_closes_connection() {
        let (tcp, _) = start("beL");
        let mut stream = TcpStream::connect_timeout(&tcp[0], T).expect("connect");
        stream.set_read_timeout(Some(T)).expect("timeout");
        // Nothing is answered for the overlong line; the server just hangs up.
        let _ = stream.write_all(&vec![b'a'; MAX_LINE + 10]);
        let mut rest = Vec::new();
        let _ = stream.read_to_end(&mut rest);
        assert!(rest.is_empty());
    }

    #[test]
    fn serves_bytes_with_the_pattern() {
        let (tcp, _) = start("beB");
        for addr in tcp {
            for n in [0u64, 1, 65_535, 65_536, 200_001] {
                let got = crate::lab::client::http_download(addr, &format!("{BYTES_PATH}{n}"), T)
                    .expect("download");
                assert_eq!(got, (200, n));
            }
            // Other paths are still answered with the name.
            assert_eq!(
                http_get(addr, "/bytes", T).expect("http_get"),
                (200, "beB\n".to_string())
            );
            assert_eq!(http_get(addr, "/bytes/x", T).expect("bad n").0, 400);
            let too_big = format!("{BYTES_PATH}{}", MAX_BYTES + 1);
            assert_eq!(http_get(addr, &too_big, T).expect("too big").0, 400);
        }
    }

    #[test]
    fn bytes_answers_follow_the_target() {
        assert_eq!(answer_for(b"GET / HTTP/1.1"), Answer::Name);
        assert_eq!(answer_for(b"GET /bytes/10 HTTP/1.1"), Answer::Bytes(10));
        assert_eq!(answer_for(b"GET /bytes/ HTTP/1.1"), Answer::BadBytes);
        assert_eq!(answer_for(b"GET /sleep/20 HTTP/1.1"), Answer::Sleep(20));
        assert_eq!(answer_for(b"GET /sleep/5001 HTTP/1.1"), Answer::BadBytes);
        assert_eq!(
            answer_for(b"GET /bytes/67108865 HTTP/1.1"),
            Answer::BadBytes
        );
        assert_eq!(
            answer_for(b"GET /bytes/67108864 HTTP/1.1"),
            Answer::Bytes(MAX_BYTES)
        );
        assert!((0..1000u64).all(|i| PATTERN[i as usize] == pattern_byte(i)));
        assert_eq!(
            answer_for(b"GET /text/70000 HTTP/1.1"),
            Answer::Text(70_000)
        );
        assert_eq!(answer_for(b"GET /text/x HTTP/1.1"), Answer::BadBytes);
        // HTML that deflate shrinks as a real page's (to 15-40 %), not to nothing.
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(1));
        gz.write_all(&TEXT).unwrap();
        let ratio = gz.finish().unwrap().len() as f64 / TEXT.len() as f64;
        assert!((0.15..0.40).contains(&ratio), "{ratio}");
        assert_eq!(text_byte(PATTERN_LEN as u64 + 3), TEXT[3]);
    }

    #[test]
    fn request_line_detection() {
        assert!(is_http_request_line(b"GET / HTTP/1.1"));
        assert!(is_http_request_line(b"POST /x?y HTTP/1.0"));
        assert!(!is_http_request_line(b"who"));
        assert!(!is_http_request_line(b"get / HTTP/1.1"));
        assert!(!is_http_request_line(b"GET / HTTP/2"));
    }

    #[test]
    fn args_round_trip_shape() {
        let args = BackendArgs {
            name: "be1".into(),
            tcp: vec![
                "0.0.0.0:8080".parse().expect("literal"),
                "[::]:8080".parse().expect("literal"),
            ],
            udp: vec!["0.0.0.0:5353".parse().expect("literal")],
        };
        let got: Vec<String> = args
            .to_args()
            .iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            got,
            [
                "lab-backend",
                "--name",
                "be1",
                "--tcp",
                "0.0.0.0:8080",
                "--tcp",
                "[::]:8080",
                "--udp",
                "0.0.0.0:5353"
            ]
        );
    }
}
