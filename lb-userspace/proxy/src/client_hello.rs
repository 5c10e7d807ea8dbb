//! The server name (SNI) of a TLS ClientHello, read from a `tcp` frontend's
//! first bytes without terminating TLS (HAProxy's `req.ssl_sni`), so that
//! connections passed through can be routed by name. Pure: the caller reads.

/// The most handshake bytes a ClientHello may take here; a larger one is
/// refused as malformed (HAProxy's `tune.bufsize` plays this part).
pub(crate) const MAX_HELLO: usize = 16 * 1024;

/// What the first bytes of a connection say.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Hello {
    /// A ClientHello has begun: more bytes are needed.
    Incomplete,
    /// A whole ClientHello, with the host name it asks for, if any.
    Sni(Option<String>),
    /// Not TLS, a malformed or an oversized ClientHello.
    NotTls,
}

/// Reads `buf`, the bytes a client sent first.
pub(crate) fn parse(buf: &[u8]) -> Hello {
    // The handshake message may span several records: join their payloads.
    let mut hs = Vec::new();
    let mut rest = buf;
    loop {
        if rest.len() < 5 {
            return Hello::Incomplete;
        }
        // A handshake record of TLS 1.0 to 1.3 (legacy_record_version 3.x).
        if rest[0] != 0x16 || rest[1] != 3 {
            return Hello::NotTls;
        }
        let len = usize::from(u16::from_be_bytes([rest[3], rest[4]]));
        if len == 0 || len > MAX_HELLO {
            return Hello::NotTls;
        }
        let Some(payload) = rest.get(5..5 + len) else {
            return Hello::Incomplete;
        };
        hs.extend_from_slice(payload);
        rest = &rest[5 + len..];
        if hs.len() < 4 {
            continue;
        }
        if hs[0] != 1 {
            return Hello::NotTls;
        }
        let body = usize::from(hs[1]) << 16 | usize::from(hs[2]) << 8 | usize::from(hs[3]);
        if body > MAX_HELLO {
            return Hello::NotTls;
        }
        if hs.len() >= 4 + body {
            return match server_name(&hs[4..4 + body]) {
                Some(name) => Hello::Sni(name),
                None => Hello::NotTls,
            };
        }
    }
}

/// A cursor over a ClientHello's fields; None past the end.
struct Fields<'a>(&'a [u8]);

impl<'a> Fields<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let (head, tail) = (self.0.get(..n)?, self.0.get(n..)?);
        self.0 = tail;
        Some(head)
    }

    fn u8_len(&mut self) -> Option<&'a [u8]> {
        let n = usize::from(*self.take(1)?.first()?);
        self.take(n)
    }

    fn u16(&mut self) -> Option<usize> {
        let b = self.take(2)?;
        Some(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u16_len(&mut self) -> Option<&'a [u8]> {
        let n = self.u16()?;
        self.take(n)
    }
}

/// The host name of a ClientHello body: Some(None) when it has no
/// server_name extension (or no usable name in it), None when malformed.
fn server_name(body: &[u8]) -> Option<Option<String>> {
    let mut f = Fields(body);
    f.take(2 + 32)?; // legacy_version, random
    f.u8_len()?; // legacy_session_id
    f.u16_len()?; // cipher_suites
    f.u8_len()?; // legacy_compression_methods
    if f.0.is_empty() {
        return Some(None); // no extensions at all
    }
    let mut exts = Fields(f.u16_len()?);
    while !exts.0.is_empty() {
        let kind = exts.u16()?;
        let data = exts.u16_len()?;
        if kind != 0 {
            continue;
        }
        // server_name: a list of (name_type, name); host_name is type 0.
        let mut list = Fields(Fields(data).u16_len()?);
        while !list.0.is_empty() {
            let name_type = *list.take(1)?.first()?;
            let name = list.u16_len()?;
            if name_type == 0 {
                let ok = !name.is_empty()
                    && name
                        .iter()
                        .all(|c| c.is_ascii_alphanumeric() || b"-._".contains(c));
                return Some(ok.then(|| String::from_utf8_lossy(name).to_ascii_lowercase()));
            }
        }
        return Some(None);
    }
    Some(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A ClientHello record asking for `sni` (none: no extension), as rustls sends it.
    fn hello(sni: Option<&str>) -> Vec<u8> {
        use std::sync::Arc;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .unwrap()
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(crate::upstream::NoVerify(provider)))
            .with_no_client_auth();
        let name = match sni {
            Some(s) => rustls::pki_types::ServerName::try_from(s.to_string()).unwrap(),
            None => rustls::pki_types::ServerName::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()),
        };
        let mut conn = rustls::ClientConnection::new(Arc::new(cfg), name).unwrap();
        let mut out = Vec::new();
        conn.write_tls(&mut out).unwrap();
        out
    }

    #[test]
    fn reads_the_name_of_a_real_client_hello_byte_by_byte() {
        let rec = hello(Some("API.example.org"));
        for cut in 0..rec.len() {
            assert_eq!(parse(&rec[..cut]), Hello::Incomplete, "cut at {cut}");
        }
        assert_eq!(parse(&rec), Hello::Sni(Some("api.example.org".into())));
        // Bytes after the hello (the client's next record) change nothing.
        let mut more = rec.clone();
        more.extend_from_slice(&[0x14, 3, 3, 0, 1, 1]);
        assert_eq!(parse(&more), Hello::Sni(Some("api.example.org".into())));
        assert_eq!(parse(&hello(None)), Hello::Sni(None));
    }

    #[test]
    fn a_hello_split_over_two_records_is_joined() {
        let rec = hello(Some("split.example"));
        let payload = &rec[5..];
        let (a, b) = payload.split_at(40);
        let mut two = Vec::new();
        for part in [a, b] {
            two.extend_from_slice(&[0x16, 3, 1]);
            two.extend_from_slice(&(part.len() as u16).to_be_bytes());
            two.extend_from_slice(part);
        }
        assert_eq!(parse(&two), Hello::Sni(Some("split.example".into())));
    }

    #[test]
    fn other_protocols_and_broken_hellos_have_no_name() {
        assert_eq!(parse(b"GET / HTTP/1.1\r\n\r\n"), Hello::NotTls);
        assert_eq!(parse(b"SSH-2.0-OpenSSH_9.2\r\n"), Hello::NotTls);
        // A handshake record that is not a ClientHello.
        assert_eq!(parse(&[0x16, 3, 3, 0, 4, 2, 0, 0, 0]), Hello::NotTls);
        // A whole ClientHello too short for its fields: malformed, not a
        // reason to wait for more.
        let short = [0x16, 3, 1, 0, 14, 1, 0, 0, 10, 3, 3, 0, 0, 0, 0, 0, 0, 0, 0];
        assert_eq!(parse(&short), Hello::NotTls);
        // A record claiming more than MAX_HELLO.
        assert_eq!(parse(&[0x16, 3, 1, 0x50, 0x00]), Hello::NotTls);
        // A name with bytes no host name has.
        let mut bad = hello(Some("ab.example"));
        let at = bad.windows(10).position(|w| w == b"ab.example").unwrap();
        bad[at] = b'/';
        assert_eq!(parse(&bad), Hello::Sni(None));
    }
}
