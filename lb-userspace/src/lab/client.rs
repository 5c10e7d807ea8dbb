//! Blocking clients for the lab's backend protocol, meant to run inside the
//! client namespace via [`run_in_ns`](super::run_in_ns).

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::time::Duration;

use super::backend_server::pattern_byte;

/// Longest reply line accepted (the server's names are short).
const MAX_REPLY: u64 = 8 * 1024;
/// Largest HTTP response read.
const MAX_HTTP_RESPONSE: u64 = 1 << 20;
/// UDP attempts before giving up.
const UDP_ATTEMPTS: usize = 3;

/// Connects with a timeout and applies it to reads and writes too.
fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Reads one `\n`-terminated line and returns it trimmed.
fn read_reply<R: BufRead>(reader: &mut R) -> io::Result<String> {
    let mut buf = Vec::new();
    reader
        .by_ref()
        .take(MAX_REPLY)
        .read_until(b'\n', &mut buf)?;
    if buf.last() != Some(&b'\n') {
        return Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "connection ended before a full reply line",
        ));
    }
    Ok(String::from_utf8_lossy(&buf).trim().to_string())
}

/// Connects, sends `who\n`, and returns the backend's name.
pub fn tcp_ask(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    TcpSession::connect(addr, timeout)?.ask()
}

/// As [`tcp_ask`], from source port `port`, and closed with an RST (no
/// TIME_WAIT), so the next call can use the same 5-tuple at once, as a
/// client that cycles through its ports would.
pub fn tcp_ask_from(addr: SocketAddr, port: u16, timeout: Duration) -> io::Result<String> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (std::net::Ipv4Addr::UNSPECIFIED, port).into(),
        SocketAddr::V6(_) => (std::net::Ipv6Addr::UNSPECIFIED, port).into(),
    };
    socket.bind(&local.into())?;
    socket.connect_timeout(&addr.into(), timeout)?;
    socket.set_linger(Some(Duration::ZERO))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    let mut reader = BufReader::new(stream);
    reader.get_mut().write_all(b"who\n")?;
    read_reply(&mut reader)
}

/// One long-lived TCP connection that can ask for the backend's name repeatedly.
pub struct TcpSession {
    reader: BufReader<TcpStream>,
}

impl TcpSession {
    /// Opens the connection; `timeout` bounds the connect and every later read/write.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> io::Result<Self> {
        Ok(Self {
            reader: BufReader::new(connect(addr, timeout)?),
        })
    }

    /// Sends `who\n` on the same connection and returns the name it answers with.
    pub fn ask(&mut self) -> io::Result<String> {
        self.reader.get_mut().write_all(b"who\n")?;
        read_reply(&mut self.reader)
    }

    /// Local address of the connection (its source port identifies the flow).
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        self.reader.get_ref().local_addr()
    }
}

/// Sends `who\n` over UDP and returns the name; each of up to 3 attempts waits
/// `timeout`. A reply from any address other than `addr` is an error, which
/// catches a balancer that forgets to translate the reply's source.
pub fn udp_ask(addr: SocketAddr, timeout: Duration) -> io::Result<String> {
    let bind: SocketAddr = if addr.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = UdpSocket::bind(bind)?;
    socket.set_read_timeout(Some(timeout))?;
    let mut buf = [0u8; 2048];
    let mut last_err = io::Error::new(io::ErrorKind::TimedOut, "no UDP reply");
    for _ in 0..UDP_ATTEMPTS {
        socket.send_to(b"who\n", addr)?;
        match socket.recv_from(&mut buf) {
            Ok((n, from)) if from == addr => {
                return Ok(String::from_utf8_lossy(&buf[..n]).trim().to_string());
            }
            Ok((_, from)) => {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("UDP reply from {from}, expected {addr}"),
                ));
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                last_err = e;
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_err)
}

/// Minimal HTTP/1.1 `GET` with `Connection: close`; returns the status code and body.
pub fn http_get(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, String)> {
    let mut stream = connect(addr, timeout)?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    stream.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    stream.take(MAX_HTTP_RESPONSE).read_to_end(&mut raw)?;
    parse_response(&raw)
}

/// HTTP/1.1 `GET` of a large body with `Connection: close`, read as it
/// arrives (never held in memory): returns the status and the body's length.
/// A 200 body must carry a Content-Length, and must be the backend server's
/// `/bytes/N` pattern; `timeout` bounds the connect and every single read.
pub fn http_download(addr: SocketAddr, path: &str, timeout: Duration) -> io::Result<(u16, u64)> {
    let stream = connect(addr, timeout)?;
    let mut writer = stream.try_clone()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    writer.write_all(request.as_bytes())?;
    let mut reader = BufReader::with_capacity(64 * 1024, stream);
    let bad = |what: String| io::Error::new(io::ErrorKind::InvalidData, what);
    let status_line = read_reply(&mut reader)?;
    let status = status_line
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse::<u16>().ok())
        .filter(|_| status_line.starts_with("HTTP/1."))
        .ok_or_else(|| bad(format!("bad status line {status_line:?}")))?;
    let mut length = None;
    for _ in 0..100 {
        let line = read_reply(&mut reader)?;
        if line.is_empty() {
            break;
        }
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            length = Some(
                v.trim()
                    .parse::<u64>()
                    .map_err(|_| bad(format!("bad content-length {v:?}")))?,
            );
        }
    }
    if status != 200 {
        return Ok((status, length.unwrap_or(0)));
    }
    let length = length.ok_or_else(|| bad("no content-length".into()))?;
    let mut offset = 0u64;
    let mut buf = vec![0u8; 64 * 1024];
    while offset < length {
        let want = usize::try_from(length - offset)
            .unwrap_or(buf.len())
            .min(buf.len());
        let n = reader.read(&mut buf[..want])?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                format!("body ended after {offset} of {length} bytes"),
            ));
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern_byte(offset + i as u64)) {
            return Err(bad(format!("wrong byte at offset {}", offset + i as u64)));
        }
        offset += n as u64;
    }
    Ok((status, offset))
}

/// Splits a complete HTTP/1.x response into status code and body.
fn parse_response(raw: &[u8]) -> io::Result<(u16, String)> {
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("bad HTTP response: {what}"),
        )
    };
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| bad("no end of headers"))?;
    let head = String::from_utf8_lossy(&raw[..end]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.split(' ');
    let version = parts.next().unwrap_or_default();
    if !version.starts_with("HTTP/1.") {
        return Err(bad("status line"));
    }
    let status = parts
        .next()
        .and_then(|s| s.parse::<u16>().ok())
        .ok_or_else(|| bad("status code"))?;
    let mut body = &raw[end + 4..];
    for line in lines {
        if let Some((k, v)) = line.split_once(':')
            && k.trim().eq_ignore_ascii_case("content-length")
        {
            let len: usize = v.trim().parse().map_err(|_| bad("content-length"))?;
            body = body
                .get(..len)
                .ok_or_else(|| bad("body shorter than content-length"))?;
        }
    }
    Ok((status, String::from_utf8_lossy(body).into_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let raw = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\nbe1\nextra";
        assert_eq!(parse_response(raw).expect("parse"), (200, "be1\n".into()));
        let raw = b"HTTP/1.1 404 Not Found\r\n\r\nnope";
        assert_eq!(parse_response(raw).expect("parse"), (404, "nope".into()));
        assert!(parse_response(b"garbage").is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\nab").is_err());
    }
}
