//! Framing shared by server and client: a 4-byte big-endian length, then that
//! many bytes of bincode (1.x, fixed-width integers, as `bincode::serialize`).

use std::io::{self, Read, Write};

use bincode::Options;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::protocol::{MAX_ANSWER_FRAME, MAX_FRAME};

/// Why a frame could not be read, written or understood.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    /// The length prefix (or an encoded message) exceeds the limit.
    #[error("frame of {len} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Announced or encoded length.
        len: u64,
        /// The limit (`MAX_FRAME` for requests, `MAX_ANSWER_FRAME` for answers).
        limit: u32,
    },
    /// The bytes are not a valid message of the expected type.
    #[error("malformed message: {0}")]
    Malformed(#[from] bincode::Error),
    /// Reading or writing the socket failed (including EOF inside a frame).
    #[error(transparent)]
    Io(#[from] io::Error),
}

/// Same wire format as `bincode::serialize`, but bounded and strict when decoding.
fn options() -> impl Options {
    bincode::options()
        .with_fixint_encoding()
        .with_limit(u64::from(MAX_ANSWER_FRAME))
}

/// Encodes a message body (without the length prefix); refuses bodies
/// above `MAX_ANSWER_FRAME` (the agent refuses requests above `MAX_FRAME`).
pub fn encode<T: Serialize>(msg: &T) -> Result<Vec<u8>, FrameError> {
    let bytes = bincode::serialize(msg)?;
    if bytes.len() as u64 > u64::from(MAX_ANSWER_FRAME) {
        return Err(FrameError::TooLarge {
            len: bytes.len() as u64,
            limit: MAX_ANSWER_FRAME,
        });
    }
    Ok(bytes)
}

/// Decodes a message body (without the length prefix); trailing bytes are an error.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, FrameError> {
    Ok(options().deserialize(bytes)?)
}

/// Reads the version of an encoded `Envelope` without decoding its body, so a
/// peer speaking another version gets a clear answer rather than a decode error.
pub fn peek_version(bytes: &[u8]) -> Result<u32, FrameError> {
    Ok(options().allow_trailing_bytes().deserialize(bytes)?)
}

fn frame_len(prefix: [u8; 4], limit: u32) -> Result<u64, FrameError> {
    let len = u32::from_be_bytes(prefix);
    if len > limit {
        return Err(FrameError::TooLarge {
            len: u64::from(len),
            limit,
        });
    }
    Ok(u64::from(len))
}

fn prefix(body: &[u8]) -> Result<[u8; 4], FrameError> {
    match u32::try_from(body.len()) {
        Ok(len) if len <= MAX_ANSWER_FRAME => Ok(len.to_be_bytes()),
        _ => Err(FrameError::TooLarge {
            len: body.len() as u64,
            limit: MAX_ANSWER_FRAME,
        }),
    }
}

/// A body of `len` bytes as they come: memory grows with what was sent,
/// not with what the prefix announced.
fn body_of(got: Vec<u8>, len: u64) -> Result<Vec<u8>, FrameError> {
    if (got.len() as u64) < len {
        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
    }
    Ok(got)
}

/// Writes one frame (length prefix and body).
pub fn write_frame<W: Write>(w: &mut W, body: &[u8]) -> Result<(), FrameError> {
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&prefix(body)?);
    frame.extend_from_slice(body);
    w.write_all(&frame)?;
    w.flush()?;
    Ok(())
}

/// Reads one answer frame's body (at most `MAX_ANSWER_FRAME`); `None` on a
/// clean end of stream before its first byte.
pub fn read_frame<R: Read>(r: &mut R) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; 4];
    let mut filled = 0;
    while filled < prefix.len() {
        match r.read(&mut prefix[filled..]) {
            Ok(0) if filled == 0 => return Ok(None),
            Ok(0) => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    let len = frame_len(prefix, MAX_ANSWER_FRAME)?;
    let mut body = Vec::new();
    r.take(len).read_to_end(&mut body)?;
    body_of(body, len).map(Some)
}

/// Encodes and writes one message.
pub fn write_message<W: Write, T: Serialize>(w: &mut W, msg: &T) -> Result<(), FrameError> {
    write_frame(w, &encode(msg)?)
}

/// Writes one frame (length prefix and body) to an async stream.
pub async fn write_frame_async<W: AsyncWrite + Unpin>(
    w: &mut W,
    body: &[u8],
) -> Result<(), FrameError> {
    let mut frame = Vec::with_capacity(4 + body.len());
    frame.extend_from_slice(&prefix(body)?);
    frame.extend_from_slice(body);
    w.write_all(&frame).await?;
    w.flush().await?;
    Ok(())
}

/// Reads one request frame's body (at most `MAX_FRAME`) from an async
/// stream; `None` on a clean end of stream.
pub async fn read_frame_async<R: AsyncRead + Unpin>(
    r: &mut R,
) -> Result<Option<Vec<u8>>, FrameError> {
    let mut prefix = [0u8; 4];
    let mut filled = 0;
    while filled < prefix.len() {
        match r.read(&mut prefix[filled..]).await? {
            0 if filled == 0 => return Ok(None),
            0 => return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into()),
            n => filled += n,
        }
    }
    let len = frame_len(prefix, MAX_FRAME)?;
    let mut body = Vec::new();
    r.take(len).read_to_end(&mut body).await?;
    body_of(body, len).map(Some)
}

/// Encodes and writes one message to an async stream.
pub async fn write_message_async<W: AsyncWrite + Unpin, T: Serialize>(
    w: &mut W,
    msg: &T,
) -> Result<(), FrameError> {
    write_frame_async(w, &encode(msg)?).await
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;

    use super::*;
    use crate::config::{Mode, Protocol};
    use crate::control::protocol::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn all_requests() -> Vec<Request> {
        vec![
            Request::AddService {
                name: "web".into(),
                vip: addr("198.18.100.1:80"),
                protocol: Protocol::Tcp,
                mode: Mode::L4,
                forwarding: crate::config::Forwarding::Nat,
                hash: crate::config::FlowHash::Flow,
                ring_size: Some(65537),
            },
            Request::AddService {
                name: "dns".into(),
                vip: addr("[fd00:18:100::1]:53"),
                protocol: Protocol::Udp,
                mode: Mode::L7,
                forwarding: crate::config::Forwarding::Nat,
                hash: crate::config::FlowHash::Flow,
                ring_size: None,
            },
            Request::RemoveService { name: "web".into() },
            Request::AddBackend {
                service: "web".into(),
                address: addr("198.18.2.11:8080"),
                weight: 3,
            },
            Request::RemoveBackend {
                service: "web".into(),
                address: addr("198.18.2.11:8080"),
            },
            Request::SetBackendState {
                service: "web".into(),
                address: addr("198.18.2.11:8080"),
                state: AdminState::Drain,
            },
            Request::SetBackendState {
                service: "web".into(),
                address: addr("[fd00::2]:8080"),
                state: AdminState::Maint,
            },
            Request::SetWeight {
                service: "web".into(),
                address: addr("198.18.2.11:8080"),
                weight: 0,
            },
            Request::ShowServices,
            Request::ShowBackends { service: None },
            Request::ShowBackends {
                service: Some("web".into()),
            },
            Request::ShowStats,
            Request::ShowDiscovery,
            Request::Reload,
            Request::Stop { detach: true },
        ]
    }

    fn all_responses() -> Vec<Response> {
        vec![
            Response::Ok,
            Response::Error("no such service \"x\"".into()),
            Response::Services(vec![ServiceInfo {
                name: "web".into(),
                vip: addr("198.18.100.1:80"),
                protocol: Protocol::Udp,
                mode: Mode::L7,
                forwarding: crate::config::Forwarding::Nat,
                hash: crate::config::FlowHash::Flow,
                backends: 2,
                packets: 10,
                bytes: u64::MAX,
                discovery: Some(crate::control::protocol::DiscoveryInfo {
                    group: "web".into(),
                    name: "web.lab.test.".into(),
                    record: "a".into(),
                    state: crate::control::protocol::DiscoveryState::Holding,
                    backends: 1,
                    failures: 0,
                    last_error: None,
                    since_success_ms: Some(7),
                    detail: Some("NXDOMAIN for 1.0s".into()),
                }),
            }]),
            Response::Discovery(Vec::new()),
            Response::Backends(vec![
                BackendInfo {
                    service: "web".into(),
                    address: addr("198.18.2.11:8080"),
                    weight: 1,
                    admin: AdminState::Ready,
                    health: Health::Down,
                    last_check: Some("timeout".into()),
                    active_flows: 4,
                    max_flows: 0,
                    packets: 5,
                    bytes: 6,
                },
                BackendInfo {
                    service: "web".into(),
                    address: addr("[fd00::2]:8080"),
                    weight: 0,
                    admin: AdminState::Maint,
                    health: Health::Unchecked,
                    last_check: None,
                    active_flows: 0,
                    max_flows: 0,
                    packets: 0,
                    bytes: 0,
                },
            ]),
            Response::Backends(vec![]),
            Response::Stats(vec![ReasonCount {
                reason: "tx_forward".into(),
                packets: 7,
                bytes: 8,
            }]),
        ]
    }

    #[test]
    fn every_request_round_trips() {
        for body in all_requests() {
            let env = Envelope {
                version: PROTOCOL_VERSION,
                body,
            };
            let bytes = encode(&env).unwrap();
            assert_eq!(peek_version(&bytes).unwrap(), PROTOCOL_VERSION);
            assert_eq!(decode::<Envelope<Request>>(&bytes).unwrap(), env);
        }
    }

    #[test]
    fn every_response_round_trips() {
        for body in all_responses() {
            let env = Envelope {
                version: PROTOCOL_VERSION,
                body,
            };
            let bytes = encode(&env).unwrap();
            assert_eq!(decode::<Envelope<Response>>(&bytes).unwrap(), env);
        }
    }

    #[test]
    fn frames_round_trip_sync_and_async() {
        let env = Envelope {
            version: PROTOCOL_VERSION,
            body: Request::ShowStats,
        };
        let mut wire = Vec::new();
        write_message(&mut wire, &env).unwrap();
        write_message(&mut wire, &env).unwrap();
        assert_eq!(&wire[..4], &(wire.len() as u32 / 2 - 4).to_be_bytes());
        let mut r = &wire[..];
        for _ in 0..2 {
            let body = read_frame(&mut r).unwrap().unwrap();
            assert_eq!(decode::<Envelope<Request>>(&body).unwrap(), env);
        }
        assert!(read_frame(&mut r).unwrap().is_none());

        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut out = Vec::new();
            write_message_async(&mut out, &env).await.unwrap();
            assert_eq!(out, wire[..wire.len() / 2]);
            let mut r = &wire[..];
            let body = read_frame_async(&mut r).await.unwrap().unwrap();
            assert_eq!(decode::<Envelope<Request>>(&body).unwrap(), env);
        });
    }

    #[test]
    fn oversized_and_truncated_frames_are_refused() {
        // Answers may be large (listings), not without bound.
        let mut r = &(MAX_ANSWER_FRAME + 1).to_be_bytes()[..];
        assert!(matches!(
            read_frame(&mut r),
            Err(FrameError::TooLarge { len, .. }) if len == u64::from(MAX_ANSWER_FRAME) + 1
        ));
        // Requests are small: the agent refuses one announced larger, at once.
        let over = (MAX_FRAME + 1).to_be_bytes();
        let got = tokio::runtime::Runtime::new()
            .unwrap()
            .block_on(async { read_frame_async(&mut &over[..]).await });
        assert!(matches!(
            got,
            Err(FrameError::TooLarge {
                limit: MAX_FRAME,
                ..
            })
        ));
        let mut r = &[0u8, 0][..];
        assert!(matches!(read_frame(&mut r), Err(FrameError::Io(_))));
        // A prefix announcing more than comes: an error, nothing allocated for it.
        let mut r = &[0u8, 0x10, 0, 0, 1, 2][..];
        assert!(matches!(read_frame(&mut r), Err(FrameError::Io(_))));
        let big = vec![0u8; MAX_ANSWER_FRAME as usize + 1];
        assert!(matches!(
            write_frame(&mut Vec::new(), &big),
            Err(FrameError::TooLarge { .. })
        ));
        let huge = Response::Error("x".repeat(MAX_ANSWER_FRAME as usize));
        assert!(matches!(encode(&huge), Err(FrameError::TooLarge { .. })));
        // An answer of a few MiB (thousands of pool servers) passes.
        let listing = Response::Error("x".repeat(4 << 20));
        let mut wire = Vec::new();
        write_message(&mut wire, &listing).unwrap();
        let body = read_frame(&mut &wire[..]).unwrap().unwrap();
        assert_eq!(decode::<Response>(&body).unwrap(), listing);
    }

    #[test]
    fn garbage_is_malformed() {
        assert!(matches!(
            decode::<Envelope<Request>>(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]),
            Err(FrameError::Malformed(_))
        ));
        assert!(matches!(
            peek_version(&[1, 0]),
            Err(FrameError::Malformed(_))
        ));
        let mut bytes = encode(&Envelope {
            version: PROTOCOL_VERSION,
            body: Request::Reload,
        })
        .unwrap();
        bytes.push(0);
        assert!(decode::<Envelope<Request>>(&bytes).is_err());
    }
}
