//! The access log to a syslog daemon (`[proxy] syslog`, HAProxy's `log`):
//! each line of the proxy's `access` target becomes one datagram, RFC 3164
//! `<PRI>Mmm dd hh:mm:ss lb[PID]: LINE` or (`syslog_format = "rfc5424"`)
//! `<PRI>1 TIMESTAMP HOSTNAME lb PID - - LINE`, over UDP, a Unix
//! datagram socket such as `/dev/log`, or TCP (`tcp@ip:port`, HAProxy's
//! `log tcp@`): each message octet-counted (`LEN SP MSG`, RFC 6587 3.4.1,
//! which rsyslog and syslog-ng read by default); standard output then no
//! longer gets them.
//!
//! [`SyslogLayer`] sits in the binary's `tracing` subscriber; the agent
//! points it at the file's target with [`configure`] at start and at each
//! reload. Sends never block a serving thread: a datagram the socket cannot
//! take at once is dropped and counted (HAProxy drops them too). Over TCP
//! the lines go through a queue of `TCP_QUEUE` to a thread of their own
//! (`lb-syslog-tcp`), which connects (again after a failure, at most every
//! `TCP_RETRY`), writes them in batches and drops (and counts) what a full
//! queue, a daemon not there or a write stalled for `TCP_TIMEOUT` cannot
//! take, as HAProxy's ring does; a reload to another target ends the thread.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream, UdpSocket};
use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::{PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tracing::field::{Field, Visit};
use tracing::{Event, Subscriber};
use tracing_subscriber::layer::{Context, Layer};

use crate::config::{SyslogConfig, SyslogFormat, SyslogTarget};

/// The target of the proxy's access log lines.
pub const ACCESS_TARGET: &str = "access";

/// Severity of access lines: informational.
const SEVERITY_INFO: u8 = 6;

/// Where access lines go now; None: standard output.
static SINK: RwLock<Option<Sink>> = RwLock::new(None);
/// Whether `SINK` is set (read by the standard output filter for each event).
static ACTIVE: AtomicBool = AtomicBool::new(false);
/// Lines dropped: the socket could not take them at once.
static DROPPED: AtomicU64 = AtomicU64::new(0);

/// Points the access log at `config` (None: back to standard output).
pub fn configure(config: Option<&SyslogConfig>) -> std::io::Result<()> {
    let sink = config.map(Sink::open).transpose()?;
    let mut slot = SINK.write().unwrap_or_else(PoisonError::into_inner);
    ACTIVE.store(sink.is_some(), Ordering::Relaxed);
    *slot = sink;
    Ok(())
}

/// Whether an event belongs on standard output: access lines do not while
/// they go to syslog.
pub fn to_stdout(target: &str) -> bool {
    target != ACCESS_TARGET || !ACTIVE.load(Ordering::Relaxed)
}

/// Access lines dropped so far because the socket was full or gone.
pub fn dropped() -> u64 {
    DROPPED.load(Ordering::Relaxed)
}

/// One open syslog destination.
struct Sink {
    socket: Socket,
    facility: u8,
    pid: u32,
    format: SyslogFormat,
    /// RFC 5424's HOSTNAME, read once: `-` (nil) when unknown.
    hostname: String,
}

/// The socket and where it sends.
enum Socket {
    Udp(UdpSocket, SocketAddr),
    Unix(UnixDatagram, PathBuf),
    /// The queue to the TCP writer thread (dropped: the thread ends).
    Tcp(SyncSender<String>),
}

/// Lines waiting for the TCP writer at most (about 2 MB of access lines).
const TCP_QUEUE: usize = 10_000;
/// Least time between two connection attempts to a TCP daemon.
const TCP_RETRY: Duration = Duration::from_secs(1);
/// How long a connect, or a write the daemon takes nothing of, may wait.
const TCP_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes written to a TCP daemon at once at most.
const TCP_BATCH: usize = 64 * 1024;

/// Starts the thread that sends queued lines to the TCP daemon at `addr`.
fn spawn_tcp(addr: SocketAddr) -> std::io::Result<SyncSender<String>> {
    let (tx, rx) = std::sync::mpsc::sync_channel(TCP_QUEUE);
    std::thread::Builder::new()
        .name("lb-syslog-tcp".into())
        .spawn(move || tcp_writer(addr, &rx))?;
    Ok(tx)
}

/// Appends `message` octet-counted: `LEN SP MSG` (RFC 6587 3.4.1).
fn frame(out: &mut Vec<u8>, message: &str) {
    let _ = write!(out, "{} {message}", message.len());
}

/// The TCP writer: until the queue's sender is dropped, each line and
/// those queued behind it go out in one write, on a connection made (or
/// made again) as needed; what cannot go is dropped and counted.
fn tcp_writer(addr: SocketAddr, lines: &Receiver<String>) {
    let mut conn: Option<TcpStream> = None;
    let mut next_try = Instant::now();
    let mut batch = Vec::with_capacity(TCP_BATCH);
    while let Ok(first) = lines.recv() {
        batch.clear();
        frame(&mut batch, &first);
        let mut count = 1;
        while batch.len() < TCP_BATCH {
            let Ok(more) = lines.try_recv() else { break };
            frame(&mut batch, &more);
            count += 1;
        }
        if conn.is_none() && Instant::now() >= next_try {
            next_try = Instant::now() + TCP_RETRY;
            conn = connect(addr);
        }
        let sent = conn.as_mut().is_some_and(|s| s.write_all(&batch).is_ok());
        if !sent {
            if conn.take().is_some() {
                tracing::warn!(%addr, "syslog over TCP: the daemon stopped taking lines; dropping them until it is back");
            }
            DROPPED.fetch_add(count, Ordering::Relaxed);
        }
    }
}

/// A connection to the daemon, writes bounded by `TCP_TIMEOUT`.
fn connect(addr: SocketAddr) -> Option<TcpStream> {
    let s = TcpStream::connect_timeout(&addr, TCP_TIMEOUT)
        .and_then(|s| {
            s.set_write_timeout(Some(TCP_TIMEOUT))?;
            s.set_nodelay(true)?;
            Ok(s)
        })
        .inspect_err(|e| tracing::debug!(%addr, "syslog over TCP: {e}"))
        .ok()?;
    tracing::info!(%addr, "syslog over TCP connected");
    Some(s)
}

impl Sink {
    fn open(config: &SyslogConfig) -> std::io::Result<Self> {
        let socket = match &config.target {
            SyslogTarget::Udp(addr) => {
                let any: SocketAddr = if addr.is_ipv4() {
                    "0.0.0.0:0".parse()
                } else {
                    "[::]:0".parse()
                }
                .map_err(std::io::Error::other)?;
                let s = UdpSocket::bind(any)?;
                s.set_nonblocking(true)?;
                Socket::Udp(s, *addr)
            }
            SyslogTarget::Tcp(addr) => Socket::Tcp(spawn_tcp(*addr)?),
            SyslogTarget::Unix(path) => {
                // Unconnected: a daemon restarted (its socket made anew) is reached again.
                let s = UnixDatagram::unbound()?;
                s.set_nonblocking(true)?;
                Socket::Unix(s, path.clone())
            }
        };
        Ok(Sink {
            socket,
            facility: config.facility,
            pid: std::process::id(),
            format: config.format,
            hostname: hostname(),
        })
    }

    /// Sends `line` as one datagram stamped `now`.
    #[cfg(test)]
    fn send(&self, line: &str, now: SystemTime) {
        let mut datagram = self.header(now);
        datagram.push_str(line);
        self.send_datagram(datagram);
    }

    /// What goes before a line sent `now`.
    fn header(&self, now: SystemTime) -> String {
        match self.format {
            SyslogFormat::Rfc3164 => header(self.facility, self.pid, now),
            SyslogFormat::Rfc5424 => header_5424(self.facility, self.pid, &self.hostname, now),
        }
    }

    /// Sends a whole message; one the socket (or the TCP queue) cannot
    /// take now is dropped.
    fn send_datagram(&self, datagram: String) {
        let sent = match &self.socket {
            Socket::Udp(s, addr) => s.send_to(datagram.as_bytes(), addr).is_ok(),
            Socket::Unix(s, path) => s.send_to(datagram.as_bytes(), path).is_ok(),
            Socket::Tcp(queue) => match queue.try_send(datagram) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
        };
        if !sent {
            DROPPED.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// `<PRI>Mmm dd hh:mm:ss lb[PID]: ` (RFC 3164; the time in UTC): what
/// goes before a line.
fn header(facility: u8, pid: u32, now: SystemTime) -> String {
    let pri = u16::from(facility) * 8 + u16::from(SEVERITY_INFO);
    let date = lb_proxy::rfc3164_date(now);
    format!("<{pri}>{date} lb[{pid}]: ")
}

/// `<PRI>1 TIMESTAMP HOSTNAME lb PID - - ` (RFC 5424: version 1, the time
/// in UTC to the microsecond, no MSGID nor structured data).
fn header_5424(facility: u8, pid: u32, hostname: &str, now: SystemTime) -> String {
    let pri = u16::from(facility) * 8 + u16::from(SEVERITY_INFO);
    let date = lb_proxy::rfc5424_date(now);
    format!("<{pri}>1 {date} {hostname} lb {pid} - - ")
}

/// This host's name as RFC 5424's HOSTNAME wants it (printable ASCII, no
/// space, at most 255 characters), else `-`.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let name = name.trim();
    let fits = (1..=255).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_graphic());
    if fits { name } else { "-" }.to_string()
}

/// Sends the `access` target's lines to the configured syslog daemon.
pub struct SyslogLayer;

impl<S: Subscriber> Layer<S> for SyslogLayer {
    fn on_event(&self, event: &Event<'_>, _ctx: Context<'_, S>) {
        if event.metadata().target() != ACCESS_TARGET || !ACTIVE.load(Ordering::Relaxed) {
            return;
        }
        let sink = SINK.read().unwrap_or_else(PoisonError::into_inner);
        if let Some(sink) = sink.as_ref() {
            // The line is written behind its header: one buffer per datagram.
            let mut message = Message(sink.header(SystemTime::now()));
            event.record(&mut message);
            sink.send_datagram(message.0);
        }
    }
}

/// A datagram's header, then the event's `message` field.
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, "{value:?}");
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            self.0.push_str(value);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    /// A whole datagram: the header, then the line.
    fn format_datagram(facility: u8, pid: u32, now: SystemTime, line: &str) -> String {
        header(facility, pid, now) + line
    }

    #[test]
    fn datagrams_are_rfc_3164_lines() {
        // 2026-12-07 17:05:09 UTC.
        let at = UNIX_EPOCH + Duration::from_secs(1_796_663_109);
        assert_eq!(
            format_datagram(16, 42, at, "127.0.0.1:5000 [x] web"),
            "<134>Dec  7 17:05:09 lb[42]: 127.0.0.1:5000 [x] web"
        );
        // 2000-02-29 00:00:00 UTC.
        let leap = UNIX_EPOCH + Duration::from_secs(11_016 * 86_400);
        assert!(format_datagram(16, 1, leap, "x").starts_with("<134>Feb 29 00:00:00 "));
        // local3, at the epoch.
        assert!(format_datagram(19, 1, UNIX_EPOCH, "x").starts_with("<158>Jan  1 00:00:00 "));
    }

    #[test]
    fn rfc_5424_headers_carry_the_time_to_the_microsecond_and_the_host() {
        // 2026-12-07 17:05:09.123456 UTC.
        let at = UNIX_EPOCH + Duration::from_micros(1_796_663_109_123_456);
        assert_eq!(
            header_5424(16, 42, "edge-1", at) + "127.0.0.1:5000 [x] web",
            "<134>1 2026-12-07T17:05:09.123456Z edge-1 lb 42 - - 127.0.0.1:5000 [x] web"
        );
        let leap = UNIX_EPOCH + Duration::from_secs(11_016 * 86_400);
        assert!(
            header_5424(23, 1, "-", leap).starts_with("<190>1 2000-02-29T00:00:00.000000Z - lb 1 ")
        );
        let name = hostname();
        assert!(name == "-" || !name.contains(' '), "{name:?}");
    }

    #[test]
    fn a_sink_sends_each_line_as_one_datagram() {
        let dir = std::env::temp_dir().join(format!("lb-syslog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("log.sock");
        let _ = std::fs::remove_file(&path);
        let daemon = UnixDatagram::bind(&path).unwrap();
        daemon
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let udp_daemon = UdpSocket::bind("127.0.0.1:0").unwrap();
        udp_daemon
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let udp = SyslogTarget::Udp(udp_daemon.local_addr().unwrap());
        for (target, facility, format) in [
            (SyslogTarget::Unix(path.clone()), 16, SyslogFormat::Rfc3164),
            (udp.clone(), 23, SyslogFormat::Rfc3164),
            (udp, 16, SyslogFormat::Rfc5424),
        ] {
            let config = SyslogConfig {
                target,
                facility,
                format,
            };
            Sink::open(&config).unwrap().send("one line", UNIX_EPOCH);
        }
        let pid = std::process::id();
        let mut buf = [0u8; 512];
        let n = daemon.recv(&mut buf).unwrap();
        let want = format!("<134>Jan  1 00:00:00 lb[{pid}]: one line");
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), want);
        let n = udp_daemon.recv(&mut buf).unwrap();
        assert!(std::str::from_utf8(&buf[..n]).unwrap().starts_with("<190>"));
        let n = udp_daemon.recv(&mut buf).unwrap();
        let want = format!(
            "<134>1 1970-01-01T00:00:00.000000Z {} lb {pid} - - one line",
            hostname()
        );
        assert_eq!(std::str::from_utf8(&buf[..n]).unwrap(), want);
        // No daemon any more: dropped, never blocking.
        drop(daemon);
        let _ = std::fs::remove_file(&path);
        let sink = Sink::open(&SyslogConfig {
            target: SyslogTarget::Unix(path),
            facility: 16,
            format: SyslogFormat::Rfc3164,
        })
        .unwrap();
        let before = dropped();
        sink.send("lost", UNIX_EPOCH);
        assert_eq!(dropped(), before + 1);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Reads octet-counted messages off `s` until `n` have come.
    fn read_framed(s: &mut std::net::TcpStream, n: usize) -> Vec<String> {
        use std::io::Read as _;
        let mut buf = Vec::new();
        let mut out = Vec::new();
        while out.len() < n {
            let mut chunk = [0u8; 4096];
            let got = s.read(&mut chunk).expect("the daemon reads");
            assert!(got > 0, "closed after {out:?}");
            buf.extend_from_slice(&chunk[..got]);
            while let Some(sp) = buf.iter().position(|&b| b == b' ') {
                let len: usize = std::str::from_utf8(&buf[..sp]).unwrap().parse().unwrap();
                if buf.len() < sp + 1 + len {
                    break;
                }
                out.push(String::from_utf8(buf[sp + 1..sp + 1 + len].to_vec()).unwrap());
                buf.drain(..sp + 1 + len);
            }
        }
        out
    }

    #[test]
    fn over_tcp_lines_are_octet_counted_and_the_daemon_is_reached_again() {
        let daemon = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = daemon.local_addr().unwrap();
        let sink = Sink::open(&SyslogConfig {
            target: SyslogTarget::Tcp(addr),
            facility: 16,
            format: SyslogFormat::Rfc3164,
        })
        .unwrap();
        let pid = std::process::id();
        sink.send("one line", UNIX_EPOCH);
        sink.send("two: with spaces", UNIX_EPOCH);
        let (mut conn, _) = daemon.accept().unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(
            read_framed(&mut conn, 2),
            [
                format!("<134>Jan  1 00:00:00 lb[{pid}]: one line"),
                format!("<134>Jan  1 00:00:00 lb[{pid}]: two: with spaces"),
            ]
        );
        // The daemon restarts: lines meanwhile may be lost (counted), then
        // a new connection carries them again.
        drop(conn);
        let deadline = Instant::now() + Duration::from_secs(10);
        daemon.set_nonblocking(true).unwrap();
        let mut conn = loop {
            sink.send("again", UNIX_EPOCH);
            if let Ok((c, _)) = daemon.accept() {
                break c;
            }
            assert!(Instant::now() < deadline, "no new connection");
            std::thread::sleep(Duration::from_millis(100));
        };
        conn.set_nonblocking(false).unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let got = read_framed(&mut conn, 1);
        assert!(got[0].ends_with("]: again"), "{got:?}");
        // With no daemon, lines are dropped and counted, never waited for.
        drop((conn, daemon));
        let before = dropped();
        let deadline = Instant::now() + Duration::from_secs(10);
        while dropped() == before {
            sink.send("x", UNIX_EPOCH);
            assert!(Instant::now() < deadline, "nothing dropped");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
