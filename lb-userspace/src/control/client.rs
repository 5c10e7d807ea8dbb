//! The `lb` subcommands' side of the control socket: one request, one answer.

use std::io;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::frame::{FrameError, decode, peek_version, read_frame, write_message};
use super::protocol::{Envelope, PROTOCOL_VERSION, Request, Response};

/// How long to wait for the agent to take a request or to answer it.
pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Why a request got no answer.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// No socket at the path, or nobody accepting on it.
    #[error("no agent is listening on {} (is `lb run` running?)", path.display())]
    NotRunning {
        /// Socket path.
        path: PathBuf,
    },
    /// The agent did not answer within `TIMEOUT`.
    #[error("the agent on {} did not answer within {}s", path.display(), TIMEOUT.as_secs())]
    Timeout {
        /// Socket path.
        path: PathBuf,
    },
    /// Any other failure of the socket (permissions, connection reset, ...).
    #[error("control socket {}: {source}", path.display())]
    Io {
        /// Socket path.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// The agent answered in another protocol version.
    #[error("the agent speaks control protocol version {agent}; this lb speaks {PROTOCOL_VERSION}")]
    VersionMismatch {
        /// The agent's version.
        agent: u32,
    },
    /// The answer could not be decoded.
    #[error("bad answer from the agent: {0}")]
    Protocol(#[source] FrameError),
}

/// Sends one request to the agent listening on `path` and returns its answer.
pub fn request(path: &Path, request: Request) -> Result<Response, ClientError> {
    let io_err = |source: io::Error| match source.kind() {
        // SO_RCVTIMEO expiring reads as EAGAIN.
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => ClientError::Timeout {
            path: path.to_owned(),
        },
        _ => ClientError::Io {
            path: path.to_owned(),
            source,
        },
    };
    let frame_err = |e: FrameError| match e {
        FrameError::Io(e) => io_err(e),
        other => ClientError::Protocol(other),
    };

    let mut stream = UnixStream::connect(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused => ClientError::NotRunning {
            path: path.to_owned(),
        },
        _ => io_err(e),
    })?;
    stream.set_read_timeout(Some(TIMEOUT)).map_err(io_err)?;
    stream.set_write_timeout(Some(TIMEOUT)).map_err(io_err)?;

    let env = Envelope {
        version: PROTOCOL_VERSION,
        body: request,
    };
    write_message(&mut stream, &env).map_err(frame_err)?;
    let body = read_frame(&mut stream).map_err(frame_err)?.ok_or_else(|| {
        io_err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "the agent closed the connection without answering",
        ))
    })?;
    let version = peek_version(&body).map_err(ClientError::Protocol)?;
    if version != PROTOCOL_VERSION {
        return Err(ClientError::VersionMismatch { agent: version });
    }
    let answer: Envelope<Response> = decode(&body).map_err(ClientError::Protocol)?;
    Ok(answer.body)
}
