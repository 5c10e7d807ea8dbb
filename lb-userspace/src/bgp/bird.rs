//! BIRD 2's control socket: the text protocol `birdc` speaks.
//!
//! After connecting, BIRD greets with `0001 BIRD <version> ready.`. Each
//! command is one line; the reply is lines of `DDDD-text` (more follow),
//! ` text` (continues the previous code) and a last `DDDD text`. Codes 0xxx
//! are results, 1xxx table rows, 2xxx table headers, 8xxx run-time errors
//! and 9xxx parse errors (BIRD's `doc/reply_codes`).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// How long one command may take, connect to last line.
pub const COMMAND_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest reply accepted (a `show protocols` of a big router is a few KiB).
const MAX_REPLY: usize = 1 << 20;

/// What went wrong talking to BIRD.
#[derive(Debug, thiserror::Error)]
pub enum BirdError {
    /// The socket could not be reached (BIRD not running, wrong path, ...).
    #[error("cannot connect to BIRD at {path}: {source}")]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Reading or writing failed half-way (timeout, BIRD went away).
    #[error("talking to BIRD at {path}: {source}")]
    Io {
        /// The socket path.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// BIRD answered with an error code (e.g. 8002 for a bad configuration).
    #[error("BIRD refused `{command}`: {code} {text}")]
    Refused {
        /// The command sent.
        command: String,
        /// BIRD's reply code.
        code: u16,
        /// Its message.
        text: String,
    },
    /// The reply did not follow the protocol.
    #[error("unexpected reply from BIRD: {0}")]
    Protocol(String),
}

/// One reply line: its code (continuations carry the previous one) and text.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Line {
    /// Reply code.
    pub code: u16,
    /// Text after the code.
    pub text: String,
}

/// Where a line stands in a reply.
#[derive(Debug, PartialEq, Eq)]
enum Kind {
    /// `DDDD-text`: more lines follow.
    More(Line),
    /// ` text`: continues the previous code.
    Continued(String),
    /// `DDDD text`: the last line.
    Last(Line),
}

/// Classifies one line of a reply (without its newline).
fn classify(line: &str) -> Result<Kind, BirdError> {
    if let Some(rest) = line.strip_prefix(' ') {
        return Ok(Kind::Continued(rest.to_string()));
    }
    let bytes = line.as_bytes();
    if bytes.len() >= 4 && bytes[..4].iter().all(u8::is_ascii_digit) {
        let code: u16 = line[..4]
            .parse()
            .map_err(|_| BirdError::Protocol(line.to_string()))?;
        let text = line.get(5..).unwrap_or("").to_string();
        return match bytes.get(4) {
            Some(b'-') => Ok(Kind::More(Line { code, text })),
            Some(b' ') | None => Ok(Kind::Last(Line { code, text })),
            _ => Err(BirdError::Protocol(line.to_string())),
        };
    }
    Err(BirdError::Protocol(line.to_string()))
}

/// Reads one whole reply.
fn read_reply(reader: &mut impl BufRead, path: &Path) -> Result<Vec<Line>, BirdError> {
    let mut lines: Vec<Line> = Vec::new();
    let mut total = 0;
    loop {
        let mut raw = String::new();
        // A line is read within what is left of MAX_REPLY (plus one byte to
        // tell "too long"): read_line alone would grow `raw` for as long as
        // the peer sends bytes without a newline.
        let room = (MAX_REPLY - total + 1) as u64;
        let n = reader
            .by_ref()
            .take(room)
            .read_line(&mut raw)
            .map_err(|source| BirdError::Io {
                path: path.to_path_buf(),
                source,
            })?;
        if n == 0 {
            return Err(BirdError::Protocol("connection closed mid-reply".into()));
        }
        total += n;
        if total > MAX_REPLY {
            return Err(BirdError::Protocol(format!(
                "reply longer than {MAX_REPLY} bytes"
            )));
        }
        match classify(raw.trim_end_matches(['\n', '\r']))? {
            Kind::More(line) => lines.push(line),
            Kind::Continued(text) => {
                let code = lines.last().map_or(0, |l| l.code);
                lines.push(Line { code, text });
            }
            Kind::Last(line) => {
                lines.push(line);
                return Ok(lines);
            }
        }
    }
}

/// The socket's reading side, all reads together bounded by `deadline`:
/// SO_RCVTIMEO alone bounds each read, and a peer trickling a byte at a
/// time would keep a command (and the thread waiting on it) going for ever.
struct UntilDeadline {
    stream: UnixStream,
    deadline: Instant,
}

impl Read for UntilDeadline {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let timed_out = || {
            std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "the reply did not end in time",
            )
        };
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(timed_out());
        }
        self.stream.set_read_timeout(Some(left))?;
        match self.stream.read(buf) {
            // SO_RCVTIMEO expiring reads as EAGAIN.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Err(timed_out()),
            other => other,
        }
    }
}

/// Sends `command` to the BIRD on `socket` and returns its reply; an error
/// code (8xxx, 9xxx) is `BirdError::Refused`.
pub fn command(socket: &Path, command: &str) -> Result<Vec<Line>, BirdError> {
    command_within(socket, command, COMMAND_TIMEOUT)
}

/// `command`, connect to last line within `timeout`.
fn command_within(socket: &Path, command: &str, timeout: Duration) -> Result<Vec<Line>, BirdError> {
    let deadline = Instant::now() + timeout;
    let io = |source| BirdError::Io {
        path: socket.to_path_buf(),
        source,
    };
    let stream = UnixStream::connect(socket).map_err(|source| BirdError::Connect {
        path: socket.to_path_buf(),
        source,
    })?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let mut reader = BufReader::new(UntilDeadline {
        stream: stream.try_clone().map_err(io)?,
        deadline,
    });
    let greeting = read_reply(&mut reader, socket)?;
    if greeting.last().map(|l| l.code) != Some(1) {
        return Err(BirdError::Protocol(format!(
            "no greeting, got {greeting:?}"
        )));
    }
    let mut writer = stream;
    writer
        .write_all(format!("{command}\n").as_bytes())
        .map_err(io)?;
    let reply = read_reply(&mut reader, socket)?;
    if let Some(bad) = reply.iter().find(|l| l.code >= 8000) {
        return Err(BirdError::Refused {
            command: command.to_string(),
            code: bad.code,
            text: bad.text.clone(),
        });
    }
    Ok(reply)
}

/// Asks BIRD to re-read its configuration (and so the agent's include file).
pub fn configure(socket: &Path) -> Result<(), BirdError> {
    let reply = command(socket, "configure")?;
    // 0003 Reconfigured, 0004 in progress, 0005 queued, 0019 nothing to do, 0020 OK.
    match reply.last() {
        Some(l) if matches!(l.code, 3 | 4 | 5 | 17 | 18 | 19 | 20) => Ok(()),
        other => Err(BirdError::Protocol(format!("configure answered {other:?}"))),
    }
}

/// One row of `show protocols`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Protocol {
    /// Protocol name, e.g. `rtr1` or `lb_vips_v4`.
    pub name: String,
    /// Its kind: `BGP`, `Static`, `BFD`, `Kernel`, ...
    pub proto: String,
    /// Table (`---` for none).
    pub table: String,
    /// `up`, `down`, `start`, ...
    pub state: String,
    /// When it entered that state.
    pub since: String,
    /// BIRD's detail, e.g. `Established` for a BGP session.
    pub info: String,
}

impl Protocol {
    /// A BGP session in state Established.
    pub fn is_established(&self) -> bool {
        self.proto == "BGP" && self.info.split_whitespace().next() == Some("Established")
    }
}

/// The text of a reply's lines, one per line (what `birdc` prints).
pub fn text(reply: &[Line]) -> String {
    reply.iter().map(|l| format!("{}\n", l.text)).collect()
}

/// Parses the rows of a `show protocols` reply (codes 1002 and their continuations).
pub fn parse_protocols(reply: &[Line]) -> Vec<Protocol> {
    reply
        .iter()
        .filter(|l| l.code == 1002)
        .filter_map(|l| {
            let mut words = l.text.split_whitespace().peekable();
            let name = words.next()?.to_string();
            let proto = words.next()?.to_string();
            let table = words.next()?.to_string();
            let state = words.next()?.to_string();
            // The time format may be "08:00:55.123" or "2026-12-06 08:00:55".
            let mut since = Vec::new();
            while let Some(w) = words.peek() {
                if w.chars()
                    .all(|c| c.is_ascii_digit() || matches!(c, ':' | '.' | '-'))
                {
                    since.push(*w);
                    words.next();
                } else {
                    break;
                }
            }
            Some(Protocol {
                name,
                proto,
                table,
                state,
                since: since.join(" "),
                info: words.collect::<Vec<_>>().join(" "),
            })
        })
        .collect()
}

/// BIRD's protocols and their states.
pub fn show_protocols(socket: &Path) -> Result<Vec<Protocol>, BirdError> {
    Ok(parse_protocols(&command(socket, "show protocols")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(text: &str) -> Result<Vec<Line>, BirdError> {
        read_reply(&mut text.as_bytes(), Path::new("/bird.ctl"))
    }

    #[test]
    fn replies_are_read_to_their_last_line() {
        let lines =
            reply("0002-Reading configuration from /etc/bird.conf\n0003 Reconfigured\nnext")
                .unwrap();
        assert_eq!(
            lines,
            vec![
                Line {
                    code: 2,
                    text: "Reading configuration from /etc/bird.conf".into()
                },
                Line {
                    code: 3,
                    text: "Reconfigured".into()
                },
            ]
        );
        // A continuation carries the code before it.
        let lines = reply("1002-a\n b\n0000 \n").unwrap();
        assert_eq!(lines[1].code, 1002);
        assert_eq!(lines[2].code, 0);
        assert!(matches!(reply("garbage\n"), Err(BirdError::Protocol(_))));
        assert!(matches!(reply("1002-a\n"), Err(BirdError::Protocol(_))));
    }

    /// Endless bytes without a newline; counts what was taken.
    struct NoNewline(usize);

    impl Read for NoNewline {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            // Ends eventually, so that a reader without a bound fails the test instead of hanging.
            let n = buf.len().min(8 * MAX_REPLY - self.0);
            buf[..n].fill(b'x');
            self.0 += n;
            Ok(n)
        }
    }

    #[test]
    fn an_endless_line_is_refused_at_the_reply_limit() {
        let mut src = NoNewline(0);
        let err = read_reply(&mut BufReader::new(&mut src), Path::new("/bird.ctl")).unwrap_err();
        assert!(err.to_string().contains("reply longer than"), "{err}");
        // Read no further than the limit (and the reader's buffer).
        assert!(src.0 <= MAX_REPLY + 64 * 1024, "read {} bytes", src.0);
        let mut long = "1002-a\n".repeat(MAX_REPLY / 7);
        long.push_str("0000 \n");
        assert!(matches!(reply(&long), Err(BirdError::Protocol(_))));
    }

    #[test]
    fn a_trickling_reply_times_out_as_a_whole() {
        use std::os::unix::net::UnixListener;
        let dir = std::env::temp_dir().join(format!("lb-bird-trickle-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let socket = dir.join("bird.ctl");
        let listener = UnixListener::bind(&socket).unwrap();
        // Greets, takes the command, then sends a byte every 20 ms for 3 s.
        let bird = std::thread::spawn(move || {
            let (mut s, _) = listener.accept().unwrap();
            s.write_all(b"0001 BIRD 2.15 ready.\n1002-").unwrap();
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if s.write_all(b"x").is_err() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        let start = Instant::now();
        let err = command_within(&socket, "show protocols", Duration::from_millis(300));
        let took = start.elapsed();
        let err = err.unwrap_err();
        assert!(
            matches!(&err, BirdError::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut),
            "{err}"
        );
        assert!(took < Duration::from_secs(2), "took {took:?}");
        bird.join().unwrap();
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn protocols_are_parsed_from_their_rows() {
        let text = "2002-Name       Proto      Table      State  Since         Info\n\
                    1002-device1    Device     ---        up     08:00:55.123  \n \
                    lb_vips_v4 Static     master4    up     08:00:55.123  \n \
                    rtr        BGP        ---        start  2026-12-06 08:00:57  Active        Socket: Connection refused\n\
                    0000 \n";
        let protocols = parse_protocols(&reply(text).unwrap());
        assert_eq!(protocols.len(), 3);
        assert_eq!(protocols[0].name, "device1");
        assert_eq!(protocols[0].info, "");
        assert_eq!(protocols[1].table, "master4");
        assert_eq!(protocols[2].state, "start");
        assert_eq!(protocols[2].since, "2026-12-06 08:00:57");
        assert_eq!(protocols[2].info, "Active Socket: Connection refused");
        assert!(!protocols[2].is_established());
        let up = reply("1002-lb1 BGP --- up 07:28:55.635 Established\n0000 \n").unwrap();
        assert!(parse_protocols(&up)[0].is_established());
    }

    #[test]
    fn a_missing_socket_is_a_connect_error() {
        let err = command(Path::new("/nonexistent/bird.ctl"), "show status").unwrap_err();
        assert!(matches!(err, BirdError::Connect { .. }), "{err}");
        assert!(err.to_string().contains("/nonexistent/bird.ctl"));
    }
}
