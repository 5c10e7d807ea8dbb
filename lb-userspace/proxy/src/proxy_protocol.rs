//! PROXY protocol v1 (text) and v2 (binary): read on frontends with
//! `accept_proxy = true` before TLS and HTTP, written by pools with
//! `send_proxy = "v1" | "v2"` at the start of each new server connection.
//!
//! A `send_proxy` pool does not reuse server connections: each one carries the
//! address of the client whose request opened it.

use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt};

/// Protocol version written by `send_proxy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    /// Text: `PROXY TCP4 <src> <dst> <sport> <dport>\r\n`.
    V1,
    /// Binary, 16-byte header plus addresses.
    V2,
}

/// The v2 signature.
const V2_SIG: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// Longest v1 line, CRLF included (spec: 107).
const V1_MAX: usize = 107;
/// Largest v2 address block accepted (TLVs included).
const V2_MAX: usize = 2048;

fn bad(msg: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Reads one PROXY header (v1 or v2) from the start of `r` and nothing more:
/// the claimed (source, destination), or None for `UNKNOWN`/`LOCAL`/non-TCP (keep the real ones).
pub async fn read_header<R: AsyncRead + Unpin>(
    r: &mut R,
) -> io::Result<Option<(SocketAddr, SocketAddr)>> {
    let mut head = [0u8; 16];
    r.read_exact(&mut head[..8]).await?;
    if head[..8] == V2_SIG[..8] {
        r.read_exact(&mut head[8..]).await?;
        if head[..12] != V2_SIG {
            return Err(bad("bad PROXY v2 signature"));
        }
        let len = usize::from(u16::from_be_bytes([head[14], head[15]]));
        if len > V2_MAX {
            return Err(bad("PROXY v2 header too long"));
        }
        let mut body = vec![0u8; len];
        r.read_exact(&mut body).await?;
        return parse_v2(head[12], head[13], &body);
    }
    if &head[..6] != b"PROXY " {
        return Err(bad("no PROXY header"));
    }
    let mut line = head[..8].to_vec();
    while !line.ends_with(b"\r\n") {
        if line.len() >= V1_MAX {
            return Err(bad("PROXY v1 line too long"));
        }
        line.push(r.read_u8().await?);
    }
    parse_v1(&line)
}

/// Parses a whole v1 line, CRLF included.
pub(crate) fn parse_v1(line: &[u8]) -> io::Result<Option<(SocketAddr, SocketAddr)>> {
    let text = std::str::from_utf8(line).map_err(|_| bad("PROXY v1 not ASCII"))?;
    let text = text
        .strip_suffix("\r\n")
        .ok_or(bad("PROXY v1 without CRLF"))?;
    let mut parts = text.split(' ');
    if parts.next() != Some("PROXY") {
        return Err(bad("no PROXY header"));
    }
    let v6 = match parts.next() {
        Some("TCP4") => false,
        Some("TCP6") => true,
        Some("UNKNOWN") => return Ok(None),
        _ => return Err(bad("bad PROXY v1 protocol")),
    };
    let fields: Vec<&str> = parts.collect();
    let [src, dst, sport, dport] = fields[..] else {
        return Err(bad("bad PROXY v1 field count"));
    };
    let ip = |s: &str| -> io::Result<IpAddr> {
        let ip: IpAddr = s.parse().map_err(|_| bad("bad PROXY v1 address"))?;
        if ip.is_ipv6() != v6 {
            return Err(bad("PROXY v1 address of the wrong family"));
        }
        Ok(ip)
    };
    let port = |s: &str| -> io::Result<u16> {
        if s.is_empty()
            || !s.bytes().all(|b| b.is_ascii_digit())
            || (s.len() > 1 && s.starts_with('0'))
        {
            return Err(bad("bad PROXY v1 port"));
        }
        s.parse().map_err(|_| bad("bad PROXY v1 port"))
    };
    Ok(Some((
        SocketAddr::new(ip(src)?, port(sport)?),
        SocketAddr::new(ip(dst)?, port(dport)?),
    )))
}

/// Parses v2 after its signature: version/command byte, family byte, address block.
pub(crate) fn parse_v2(
    ver_cmd: u8,
    family: u8,
    body: &[u8],
) -> io::Result<Option<(SocketAddr, SocketAddr)>> {
    if ver_cmd >> 4 != 2 {
        return Err(bad("bad PROXY v2 version"));
    }
    match ver_cmd & 0x0f {
        0 => return Ok(None), // LOCAL: health checks and the like.
        1 => {}
        _ => return Err(bad("bad PROXY v2 command")),
    }
    let port = |b: &[u8]| u16::from_be_bytes([b[0], b[1]]);
    match family {
        0x11 if body.len() >= 12 => {
            let src = Ipv4Addr::new(body[0], body[1], body[2], body[3]);
            let dst = Ipv4Addr::new(body[4], body[5], body[6], body[7]);
            Ok(Some((
                SocketAddr::new(src.into(), port(&body[8..])),
                SocketAddr::new(dst.into(), port(&body[10..])),
            )))
        }
        0x21 if body.len() >= 36 => {
            let mut a = [0u8; 16];
            a.copy_from_slice(&body[..16]);
            let mut b = [0u8; 16];
            b.copy_from_slice(&body[16..32]);
            Ok(Some((
                SocketAddr::new(Ipv6Addr::from(a).into(), port(&body[32..])),
                SocketAddr::new(Ipv6Addr::from(b).into(), port(&body[34..])),
            )))
        }
        0x11 | 0x21 => Err(bad("PROXY v2 address block too short")),
        // UNSPEC, UDP, unix sockets: keep the connection's own addresses.
        _ => Ok(None),
    }
}

/// The header of a connection the proxy opens on its own behalf (a health
/// check): v1 `PROXY UNKNOWN`, v2 command LOCAL; receivers keep the
/// connection's own addresses, as for HAProxy's checks.
pub fn encode_local(version: Version) -> Vec<u8> {
    match version {
        Version::V1 => b"PROXY UNKNOWN\r\n".to_vec(),
        Version::V2 => {
            let mut out = V2_SIG.to_vec();
            // Version 2, command LOCAL; family UNSPEC; no address block.
            out.extend_from_slice(&[0x20, 0x00, 0, 0]);
            out
        }
    }
}

/// The header announcing a connection from `src` to `dst`.
pub fn encode(version: Version, src: SocketAddr, dst: SocketAddr) -> Vec<u8> {
    // IPv4-mapped addresses (a dual-stack bind) are the IPv4 ones they map,
    // as the proxy's ACLs and X-Forwarded-For take them.
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (src, dst) = (canonical(src), canonical(dst));
    // Mixed families: map the IPv4 side into IPv6.
    let (src, dst) = match (src, dst) {
        (SocketAddr::V4(s), SocketAddr::V6(_)) => (
            SocketAddr::new(s.ip().to_ipv6_mapped().into(), s.port()),
            dst,
        ),
        (SocketAddr::V6(_), SocketAddr::V4(d)) => (
            src,
            SocketAddr::new(d.ip().to_ipv6_mapped().into(), d.port()),
        ),
        _ => (src, dst),
    };
    match version {
        Version::V1 => {
            let fam = if src.is_ipv4() { "TCP4" } else { "TCP6" };
            format!(
                "PROXY {fam} {} {} {} {}\r\n",
                src.ip(),
                dst.ip(),
                src.port(),
                dst.port()
            )
            .into_bytes()
        }
        Version::V2 => {
            let mut out = V2_SIG.to_vec();
            out.push(0x21);
            match (src.ip(), dst.ip()) {
                (IpAddr::V4(s), IpAddr::V4(d)) => {
                    out.extend_from_slice(&[0x11, 0, 12]);
                    out.extend_from_slice(&s.octets());
                    out.extend_from_slice(&d.octets());
                }
                (s, d) => {
                    let v6 = |ip: IpAddr| match ip {
                        IpAddr::V4(a) => a.to_ipv6_mapped(),
                        IpAddr::V6(a) => a,
                    };
                    out.extend_from_slice(&[0x21, 0, 36]);
                    out.extend_from_slice(&v6(s).octets());
                    out.extend_from_slice(&v6(d).octets());
                }
            }
            out.extend_from_slice(&src.port().to_be_bytes());
            out.extend_from_slice(&dst.port().to_be_bytes());
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ipv4_mapped_addresses_go_as_ipv4() {
        let (src, dst) = (
            "[::ffff:192.0.2.1]:5000".parse().unwrap(),
            "[::ffff:10.0.0.1]:80".parse().unwrap(),
        );
        assert_eq!(
            encode(Version::V1, src, dst),
            b"PROXY TCP4 192.0.2.1 10.0.0.1 5000 80\r\n"
        );
    }

    #[tokio::test]
    async fn round_trips() {
        let pairs: [(SocketAddr, SocketAddr); 2] = [
            (
                "192.0.2.1:5000".parse().unwrap(),
                "10.0.0.1:80".parse().unwrap(),
            ),
            (
                "[2001:db8::1]:5000".parse().unwrap(),
                "[2001:db8::2]:443".parse().unwrap(),
            ),
        ];
        for (src, dst) in pairs {
            for v in [Version::V1, Version::V2] {
                let mut bytes = encode(v, src, dst);
                bytes.extend_from_slice(b"GET");
                let mut r = &bytes[..];
                assert_eq!(read_header(&mut r).await.unwrap(), Some((src, dst)));
                assert_eq!(r, b"GET", "read past the header");
            }
        }
        assert_eq!(
            encode(Version::V1, pairs[0].0, pairs[0].1),
            b"PROXY TCP4 192.0.2.1 10.0.0.1 5000 80\r\n"
        );
    }

    #[tokio::test]
    async fn local_headers_are_read_as_no_addresses() {
        for v in [Version::V1, Version::V2] {
            let mut bytes = encode_local(v);
            bytes.extend_from_slice(b"GET");
            let mut r = &bytes[..];
            assert_eq!(read_header(&mut r).await.unwrap(), None, "{v:?}");
            assert_eq!(r, b"GET", "read past the {v:?} header");
        }
    }

    #[tokio::test]
    async fn rejects_and_unknowns() {
        for bad in [
            &b"GET / HTTP/1.1\r\n\r\n"[..],
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",
            b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
            b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
            b"\r\n\r\n\0\r\nQUIT\n\x31\x11\0\x0c",
            b"\r\n\r\n\0\r\nQUIT\n\x21\x11\0\x04abcd",
            b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2",
        ] {
            let mut r = bad;
            assert!(read_header(&mut r).await.is_err(), "{bad:?}");
        }
        let mut r = &b"PROXY UNKNOWN\r\n"[..];
        assert_eq!(read_header(&mut r).await.unwrap(), None);
        let mut r = &b"\r\n\r\n\0\r\nQUIT\n\x20\x00\x00\x00"[..];
        assert_eq!(read_header(&mut r).await.unwrap(), None);
    }
}
