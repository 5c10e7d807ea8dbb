//! Backend health checks: one TCP connect or HTTP request per interval and
//! backend, turned into UP/DOWN transitions with HAProxy's rise/fall rules.
//! A pool's servers are checked as its requests go, through its PROXY
//! header and TLS and in HTTP/2 when it has `h2` ([`CheckTransport`]),
//! unless the check has a port of its own.
//!
//! [`Tracker`] is the pure state machine, [`check_once`] one probe, and
//! [`HealthChecker`] runs a tokio task per (service, backend) and reports
//! transitions as [`HealthEvent`]s.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime};

use lb_proxy::{CheckTransport, FetchError, Fetched, ServerIo};
use tokio::net::TcpStream;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use crate::config::{CheckKind, HealthCheck, HttpCheck};
use crate::control::protocol::Health;

/// Most bytes of an HTTP response a check reads; the rest is ignored.
const MAX_RESPONSE: usize = 64 * 1024;

/// Rise/fall counting for one backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    state: Health,
    successes: u32,
    failures: u32,
}

impl Tracker {
    /// A tracker in state `Unchecked`; `rise` and `fall` below 1 count as 1.
    pub fn new(rise: u32, fall: u32) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            state: Health::Unchecked,
            successes: 0,
            failures: 0,
        }
    }

    /// The current state.
    pub fn state(&self) -> Health {
        self.state
    }

    /// Whether the last result disagrees with the state: on the way up or
    /// down (HAProxy's checks then run every `fastinter`).
    pub fn in_transition(&self) -> bool {
        match self.state {
            Health::Up => self.failures > 0,
            Health::Down => self.successes > 0,
            _ => self.failures > 0 || self.successes > 0,
        }
    }

    /// How long until the next check of `check`: `fast_interval` in
    /// transition, `down_interval` while down, else `interval`.
    pub fn next_interval(&self, check: &HealthCheck) -> Duration {
        if self.in_transition() {
            check.fast_interval
        } else if self.state == Health::Down {
            check.down_interval
        } else {
            check.interval
        }
    }

    /// How many results in a row agreed with the last one.
    pub fn streak(&self) -> u32 {
        self.successes.max(self.failures)
    }

    /// Records one check result; returns the new state if it changed.
    pub fn record(&mut self, ok: bool) -> Option<Health> {
        let next = if ok {
            self.failures = 0;
            self.successes = self.successes.saturating_add(1);
            (self.state != Health::Up && self.successes >= self.rise).then_some(Health::Up)
        } else {
            self.successes = 0;
            self.failures = self.failures.saturating_add(1);
            // Unchecked counts as available, so it needs the full `fall` as Up does.
            (self.state != Health::Down && self.failures >= self.fall).then_some(Health::Down)
        };
        if let Some(state) = next {
            self.state = state;
        }
        next
    }
}

/// Result of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// Whether the check passed.
    pub ok: bool,
    /// "ok" or why it failed ("timeout", "connection refused", "status 503", ...).
    pub reason: String,
}

impl Outcome {
    fn pass() -> Self {
        Self {
            ok: true,
            reason: "ok".to_string(),
        }
    }

    fn fail(reason: impl Into<String>) -> Self {
        Self {
            ok: false,
            reason: reason.into(),
        }
    }

    fn io(e: &io::Error) -> Self {
        match e.kind() {
            io::ErrorKind::ConnectionRefused => Self::fail("connection refused"),
            io::ErrorKind::ConnectionReset => Self::fail("connection reset"),
            _ => Self::fail(e.to_string()),
        }
    }
}

/// Checks `addr` once, through `transport` (a pool's PROXY header and TLS)
/// unless the check has a port of its own; the whole check, connect
/// included, is bounded by `check.timeout`.
pub async fn check_once(
    addr: SocketAddr,
    check: &HealthCheck,
    transport: Option<&CheckTransport>,
) -> Outcome {
    let (addr, transport) = match check.port {
        Some(p) => (SocketAddr::new(addr.ip(), p), None),
        None => (addr, transport),
    };
    tokio::time::timeout(check.timeout, probe(addr, &check.kind, transport))
        .await
        .unwrap_or_else(|_| Outcome::fail("timeout"))
}

async fn probe(addr: SocketAddr, kind: &CheckKind, transport: Option<&CheckTransport>) -> Outcome {
    let tcp = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => return Outcome::io(&e),
    };
    let stream = match transport {
        None => ServerIo::Plain(tcp),
        Some(t) => match t.open(tcp, addr).await {
            Ok(s) => s,
            Err(e) => return Outcome::io(&e),
        },
    };
    match kind {
        CheckKind::Tcp => Outcome::pass(),
        CheckKind::Http(http) => {
            let h2 = transport.is_some_and(|t| t.speaks_h2(&stream));
            // Host: the check's own, else the servers' TLS name, else the address.
            let host = (http.host.as_deref())
                .or_else(|| transport.and_then(CheckTransport::server_name))
                .map_or_else(|| addr.to_string(), str::to_string);
            match http_exchange(stream, &host, http, h2).await {
                Ok(outcome) => outcome,
                Err(e) => Outcome::io(&e),
            }
        }
    }
}

/// Sends the check's request and judges the answer, read by the proxy's
/// HTTP/1.1 codec (`lb_proxy::fetch`), or in HTTP/2 (`lb_proxy::fetch_h2`).
async fn http_exchange(
    mut stream: ServerIo,
    host: &str,
    http: &HttpCheck,
    h2: bool,
) -> io::Result<Outcome> {
    // Only a body check reads the body.
    let limit = if http.body.is_some() { MAX_RESPONSE } else { 0 };
    let fetched = if h2 {
        lb_proxy::fetch_h2(stream, &http.method, host, &http.path, limit).await
    } else {
        let request = format!(
            "{} {} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n",
            http.method, http.path
        );
        lb_proxy::fetch(&mut stream, request.as_bytes(), &http.method, limit).await
    };
    Ok(match fetched {
        Ok(answer) => judge(&answer, http),
        Err(FetchError::Io(e)) => return Err(e),
        Err(FetchError::Closed) => {
            Outcome::fail("bad response: connection closed without a response")
        }
        Err(e) => Outcome::fail(e.to_string()),
    })
}

/// Decides a response (its body cut at `MAX_RESPONSE`).
fn judge(answer: &Fetched, http: &HttpCheck) -> Outcome {
    let code = answer.status.as_u16();
    if !http.status.matches(code) {
        return Outcome::fail(format!("status {code}"));
    }
    if let Some(needle) = &http.body
        && !contains(&answer.body, needle.as_bytes())
    {
        return Outcome::fail("body mismatch");
    }
    Outcome::pass()
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

/// One backend of one service to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Service name.
    pub service: String,
    /// Backend address.
    pub address: SocketAddr,
    /// How to check it.
    pub check: HealthCheck,
    /// A pool's PROXY header and TLS; None: plain TCP.
    pub transport: Option<CheckTransport>,
}

/// A backend's health state changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    /// Service name.
    pub service: String,
    /// Backend address.
    pub address: SocketAddr,
    /// The new state (`Up` or `Down`).
    pub health: Health,
    /// Reason of the check that caused the change.
    pub reason: String,
}

/// The latest known state of a checked backend.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckStatus {
    /// Current state.
    pub health: Health,
    /// Reason of the last check's outcome.
    pub last: String,
    /// When the last check finished.
    pub at: SystemTime,
}

type Key = (String, SocketAddr);

/// What a task does: the check and how it reaches the backend.
type Probe = (HealthCheck, Option<CheckTransport>);

/// A task's slot in the shared table; `generation` tells a live task from an aborted one.
struct Slot {
    generation: u64,
    status: Option<CheckStatus>,
}

type Shared = Arc<Mutex<HashMap<Key, Slot>>>;

/// Runs one checking task per target and reports transitions.
pub struct HealthChecker {
    events: UnboundedSender<HealthEvent>,
    shared: Shared,
    tasks: HashMap<Key, (Probe, JoinHandle<()>)>,
    next_generation: u64,
}

impl HealthChecker {
    /// A checker with no targets; transitions are sent to `events`.
    pub fn new(events: UnboundedSender<HealthEvent>) -> Self {
        Self {
            events,
            shared: Arc::default(),
            tasks: HashMap::new(),
            next_generation: 0,
        }
    }

    /// Checks exactly `targets` from now on (must be called inside a tokio runtime).
    ///
    /// Unchanged targets keep running with their state; new or changed ones
    /// start over as `Unchecked`; missing ones stop. If a (service, address)
    /// pair is listed twice, the last entry wins.
    pub fn set_targets(&mut self, targets: Vec<Target>) {
        let wanted: HashMap<Key, Probe> = targets
            .into_iter()
            .map(|t| ((t.service, t.address), (t.check, t.transport)))
            .collect();
        let mut shared = lock(&self.shared);
        self.tasks.retain(|key, (check, task)| {
            let keep = wanted.get(key) == Some(check);
            if !keep {
                task.abort();
                // Under the lock, so an aborted task can no longer publish anything.
                shared.remove(key);
            }
            keep
        });
        for (key, probe) in wanted {
            if self.tasks.contains_key(&key) {
                continue;
            }
            self.next_generation += 1;
            let generation = self.next_generation;
            shared.insert(
                key.clone(),
                Slot {
                    generation,
                    status: None,
                },
            );
            let task = tokio::spawn(run(
                key.clone(),
                probe.clone(),
                generation,
                Arc::clone(&self.shared),
                self.events.clone(),
            ));
            self.tasks.insert(key, (probe, task));
        }
    }

    /// The state of a target; `None` if it is not checked or its first check has not finished.
    pub fn status(&self, service: &str, address: SocketAddr) -> Option<CheckStatus> {
        lock(&self.shared)
            .get(&(service.to_string(), address))
            .and_then(|slot| slot.status.clone())
    }
}

impl Drop for HealthChecker {
    fn drop(&mut self) {
        for (_, task) in self.tasks.values() {
            task.abort();
        }
    }
}

/// Locks the table; a panicking task cannot leave it half-updated, so poison is ignored.
fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, HashMap<Key, Slot>> {
    shared.lock().unwrap_or_else(PoisonError::into_inner)
}

async fn run(
    key: Key,
    (check, transport): Probe,
    generation: u64,
    shared: Shared,
    events: UnboundedSender<HealthEvent>,
) {
    let (service, address) = &key;
    let mut tracker = Tracker::new(check.rise, check.fall);
    loop {
        let outcome = check_once(*address, &check, transport.as_ref()).await;
        let change = tracker.record(outcome.ok);
        {
            let mut table = lock(&shared);
            let Some(slot) = table.get_mut(&key).filter(|s| s.generation == generation) else {
                // Replaced or removed while this check ran.
                return;
            };
            slot.status = Some(CheckStatus {
                health: tracker.state(),
                last: outcome.reason.clone(),
                at: SystemTime::now(),
            });
            if let Some(health) = change {
                let n = tracker.streak();
                match health {
                    Health::Down => warn!(
                        "backend {address} of {service} is DOWN: {} ({n} consecutive failures)",
                        outcome.reason
                    ),
                    _ => info!(
                        "backend {address} of {service} is UP: {} ({n} consecutive successes)",
                        outcome.reason
                    ),
                }
                // Sent under the lock so no event follows a removal; a closed receiver only means nobody listens.
                let _ = events.send(HealthEvent {
                    service: service.clone(),
                    address: *address,
                    health,
                    reason: outcome.reason,
                });
            }
        }
        tokio::time::sleep(tracker.next_interval(&check)).await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use tokio::net::TcpListener;
    use tokio::sync::mpsc;

    use super::*;
    use crate::config::StatusMatch;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn tracker_from_unchecked_rises() {
        let mut t = Tracker::new(2, 3);
        assert_eq!(t.state(), Health::Unchecked);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(Health::Up));
        assert_eq!(t.record(true), None);
        assert_eq!(t.state(), Health::Up);
    }

    #[test]
    fn tracker_from_unchecked_falls() {
        let mut t = Tracker::new(2, 3);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.state(), Health::Unchecked);
        assert_eq!(t.record(false), Some(Health::Down));
        assert_eq!(t.streak(), 3);
        assert_eq!(t.record(false), None);
    }

    #[test]
    fn tracker_needs_consecutive_results() {
        let mut t = Tracker::new(2, 3);
        t.record(true);
        t.record(true);
        // Interleaved successes reset the failure count.
        for _ in 0..5 {
            assert_eq!(t.record(false), None);
            assert_eq!(t.record(false), None);
            assert_eq!(t.record(true), None);
        }
        assert_eq!(t.state(), Health::Up);
        t.record(false);
        t.record(false);
        assert_eq!(t.record(false), Some(Health::Down));
        // Down needs `rise` successes in a row to come back.
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(false), None);
        assert_eq!(t.record(true), None);
        assert_eq!(t.record(true), Some(Health::Up));
    }

    #[test]
    fn tracker_rise_fall_one() {
        let mut t = Tracker::new(0, 1);
        assert_eq!(t.record(false), Some(Health::Down));
        assert_eq!(t.record(true), Some(Health::Up));
        assert_eq!(t.record(false), Some(Health::Down));
    }

    #[test]
    fn checks_run_every_fast_interval_in_transition_and_down_interval_while_down() {
        let check = HealthCheck {
            fast_interval: Duration::from_millis(200),
            down_interval: Duration::from_secs(10),
            ..tcp_check(1000)
        };
        let (inter, fast, down) = (check.interval, check.fast_interval, check.down_interval);
        let mut t = Tracker::new(2, 3);
        assert_eq!(t.next_interval(&check), inter, "unchecked, nothing seen");
        t.record(true);
        assert_eq!(t.next_interval(&check), fast, "on the way up");
        t.record(true);
        assert_eq!(t.next_interval(&check), inter, "up");
        t.record(false);
        t.record(false);
        assert_eq!(t.next_interval(&check), fast, "up, failing");
        t.record(true);
        assert_eq!(t.next_interval(&check), inter, "up again, steady");
        for _ in 0..3 {
            t.record(false);
        }
        assert_eq!(t.state(), Health::Down);
        assert_eq!(t.next_interval(&check), down, "down");
        t.record(true);
        assert_eq!(t.next_interval(&check), fast, "down, answering");
        t.record(false);
        assert_eq!(t.next_interval(&check), down, "down, steady");
    }

    fn tcp_check(timeout_ms: u64) -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Tcp,
            interval: Duration::from_millis(100),
            fast_interval: Duration::from_millis(100),
            down_interval: Duration::from_millis(100),
            timeout: Duration::from_millis(timeout_ms),
            rise: 2,
            fall: 2,
            port: None,
        }
    }

    fn http_check(status: StatusMatch, body: Option<&str>) -> HealthCheck {
        HealthCheck {
            kind: CheckKind::Http(HttpCheck {
                method: "GET".into(),
                path: "/health".into(),
                host: None,
                status,
                body: body.map(Into::into),
            }),
            ..tcp_check(1000)
        }
    }

    async fn closed_port() -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        l.local_addr().unwrap()
    }

    /// Serves `response` to every connection and keeps the last request.
    async fn http_server(response: &'static str) -> (SocketAddr, Arc<Mutex<String>>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(String::new()));
        let keep = Arc::clone(&seen);
        tokio::spawn(async move {
            loop {
                let (mut s, _) = l.accept().await.unwrap();
                let keep = Arc::clone(&keep);
                tokio::spawn(async move {
                    let mut req = Vec::new();
                    let mut buf = [0u8; 1024];
                    while !req.ends_with(b"\r\n\r\n") {
                        let n = s.read(&mut buf).await.unwrap();
                        if n == 0 {
                            return;
                        }
                        req.extend_from_slice(&buf[..n]);
                    }
                    *keep.lock().unwrap() = String::from_utf8(req).unwrap();
                    s.write_all(response.as_bytes()).await.unwrap();
                });
            }
        });
        (addr, seen)
    }

    /// A pool's transport: PROXY v1 and, with `tls`, TLS without verification.
    fn pool_transport(tls: bool) -> CheckTransport {
        let mut pool = lb_proxy::Pool::new("app", lb_proxy::Algorithm::RoundRobin, Vec::new());
        pool.send_proxy = Some(lb_proxy::proxy_protocol::Version::V1);
        pool.tls = tls;
        pool.verify = false;
        CheckTransport::of(&pool).unwrap()
    }

    #[tokio::test]
    async fn a_pool_check_goes_through_its_transport_unless_it_has_a_port() {
        let (addr, seen) = http_server("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n").await;
        let check = http_check(StatusMatch::Range(200, 399), None);
        let proxied = pool_transport(false);
        assert!(check_once(addr, &check, Some(&proxied)).await.ok);
        let request = seen.lock().unwrap().clone();
        // A connection of the proxy's own: no client address to give.
        assert!(
            request.starts_with("PROXY UNKNOWN\r\nGET /health HTTP/1.1\r\n"),
            "{request}"
        );

        // A port of its own: a plain check there, as HAProxy's `port`.
        let elsewhere = SocketAddr::new(addr.ip(), closed_port().await.port());
        let own_port = HealthCheck {
            port: Some(addr.port()),
            ..check.clone()
        };
        assert!(check_once(elsewhere, &own_port, Some(&proxied)).await.ok);
        let request = seen.lock().unwrap().clone();
        assert!(request.starts_with("GET /health HTTP/1.1\r\n"), "{request}");

        // TLS to a server that does not speak it fails the check.
        let tls = pool_transport(true);
        assert!(tls.is_tls());
        assert!(!check_once(addr, &check, Some(&tls)).await.ok);
    }

    /// A TLS server for `check.test` answering every request 200, recording
    /// for each handshake whether it resumed a session; its certificate.
    async fn tls_server() -> (SocketAddr, Arc<Mutex<Vec<bool>>>, String) {
        let ck = rcgen::generate_simple_self_signed(vec!["check.test".to_string()]).unwrap();
        let key = rustls::pki_types::PrivateKeyDer::try_from(ck.key_pair.serialize_der()).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let cfg = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(cfg));
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let resumed = Arc::new(Mutex::new(Vec::new()));
        let seen = resumed.clone();
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let (acceptor, seen) = (acceptor.clone(), seen.clone());
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(s).await else {
                        return;
                    };
                    let kind = tls.get_ref().1.handshake_kind();
                    seen.lock()
                        .unwrap()
                        .push(kind == Some(rustls::HandshakeKind::Resumed));
                    let mut buf = [0u8; 1024];
                    let _ = tls.read(&mut buf).await;
                    let answer = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n";
                    let _ = tls.write_all(answer).await;
                    let _ = tls.shutdown().await;
                });
            }
        });
        (addr, resumed, ck.cert.pem())
    }

    #[tokio::test]
    async fn a_tls_pools_checks_resume_sessions_and_read_a_replaced_ca() {
        let (addr, resumed, cert) = tls_server().await;
        let dir = std::env::temp_dir().join(format!("lb-health-ca-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ca = dir.join("ca.pem");
        std::fs::write(&ca, &cert).unwrap();
        let mut pool = lb_proxy::Pool::new("app", lb_proxy::Algorithm::RoundRobin, Vec::new());
        (pool.tls, pool.verify) = (true, true);
        pool.ca = Some(ca.clone());
        pool.sni = Some("check.test".into());
        let transport = CheckTransport::of(&pool).unwrap();
        let check = http_check(StatusMatch::Range(200, 399), None);
        for _ in 0..3 {
            let outcome = check_once(addr, &check, Some(&transport)).await;
            assert!(outcome.ok, "{}", outcome.reason);
        }
        // A full handshake, then sessions resumed (a clone, as each server
        // of the pool has, shares them).
        let clone = transport.clone();
        assert!(check_once(addr, &check, Some(&clone)).await.ok);
        assert_eq!(*resumed.lock().unwrap(), [false, true, true, true]);
        // The CA replaced in place by one that did not sign the server: the
        // next check reads it and fails; put back, it passes again.
        // (File times tick coarsely: a write within the same tick as the
        // last stamp, at the same length, would go unseen until the next.)
        let tick = Duration::from_millis(20);
        let other = rcgen::generate_simple_self_signed(vec!["check.test".to_string()]).unwrap();
        tokio::time::sleep(tick).await;
        std::fs::write(&ca, other.cert.pem()).unwrap();
        let outcome = check_once(addr, &check, Some(&transport)).await;
        assert!(
            !outcome.ok && outcome.reason.contains("certificate"),
            "{}",
            outcome.reason
        );
        tokio::time::sleep(tick).await;
        std::fs::write(&ca, &cert).unwrap();
        assert!(check_once(addr, &check, Some(&transport)).await.ok);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// An HTTP/2-only server (as gRPC servers are): prior knowledge, or
    /// TLS with ALPN h2 alone (any other offer fails the handshake);
    /// `GET /health` is answered 200 "healthy", anything else 404.
    async fn h2_server(tls: bool) -> SocketAddr {
        use hyper::service::service_fn;
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let acceptor = tls.then(|| {
            let ck = rcgen::generate_simple_self_signed(vec!["h2.test".to_string()]).unwrap();
            let key =
                rustls::pki_types::PrivateKeyDer::try_from(ck.key_pair.serialize_der()).unwrap();
            let mut cfg = rustls::ServerConfig::builder_with_provider(std::sync::Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![ck.cert.der().clone()], key)
            .unwrap();
            cfg.alpn_protocols = vec![b"h2".to_vec()];
            tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
        });
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let svc = service_fn(|req: hyper::Request<hyper::body::Incoming>| async move {
                        let ok =
                            req.method() == hyper::Method::GET && req.uri().path() == "/health";
                        let (status, body) = if ok { (200, "healthy") } else { (404, "no") };
                        Ok::<_, std::convert::Infallible>(
                            hyper::Response::builder()
                                .status(status)
                                .body(http_body_util::Full::new(bytes::Bytes::from(body)))
                                .unwrap(),
                        )
                    });
                    let h2 = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    );
                    match acceptor {
                        Some(a) => {
                            if let Ok(tls) = a.accept(s).await {
                                let _ = h2
                                    .serve_connection(hyper_util::rt::TokioIo::new(tls), svc)
                                    .await;
                            }
                        }
                        None => {
                            let _ = h2
                                .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                                .await;
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn an_h2_pools_servers_are_checked_in_http_2() {
        let check = http_check(StatusMatch::Range(200, 399), Some("healthy"));
        for tls in [false, true] {
            let addr = h2_server(tls).await;
            let mut pool = lb_proxy::Pool::new("app", lb_proxy::Algorithm::RoundRobin, Vec::new());
            pool.tls = tls;
            pool.verify = false;
            let h1 = CheckTransport::of(&pool);
            pool.h2 = true;
            let h2 = CheckTransport::of(&pool);
            let out = check_once(addr, &check, h2.as_ref()).await;
            assert_eq!(out, Outcome::pass(), "tls {tls}");
            // HTTP/1.1 (or ALPN http/1.1) to it fails: what checks did before.
            assert!(!check_once(addr, &check, h1.as_ref()).await.ok, "tls {tls}");
            let missing = HttpCheck {
                path: "/missing".into(),
                ..match &check.kind {
                    CheckKind::Http(h) => h.clone(),
                    CheckKind::Tcp => unreachable!(),
                }
            };
            let missing = HealthCheck {
                kind: CheckKind::Http(missing),
                ..check.clone()
            };
            let out = check_once(addr, &missing, h2.as_ref()).await;
            assert_eq!(out, Outcome::fail("status 404"), "tls {tls}");
        }
    }

    #[tokio::test]
    async fn tcp_ok_and_refused() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = l.local_addr().unwrap();
        assert_eq!(
            check_once(open, &tcp_check(500), None).await,
            Outcome::pass()
        );
        let out = check_once(closed_port().await, &tcp_check(500), None).await;
        assert_eq!(out, Outcome::fail("connection refused"));
    }

    #[tokio::test]
    async fn http_ok_sends_the_request() {
        let (addr, seen) = http_server("HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok").await;
        let out = check_once(addr, &http_check(StatusMatch::Range(200, 399), None), None).await;
        assert_eq!(out, Outcome::pass());
        assert_eq!(
            *seen.lock().unwrap(),
            format!(
                "GET /health HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: lb-health\r\nConnection: close\r\n\r\n"
            )
        );

        let mut check = http_check(StatusMatch::Range(200, 399), None);
        if let CheckKind::Http(h) = &mut check.kind {
            h.method = "HEAD".into();
            h.host = Some("example.org".into());
        }
        assert!(check_once(addr, &check, None).await.ok);
        let req = seen.lock().unwrap().clone();
        assert!(
            req.starts_with("HEAD /health HTTP/1.1\r\nHost: example.org\r\n"),
            "{req}"
        );
    }

    #[tokio::test]
    async fn http_status_mismatch() {
        let (addr, _) = http_server("HTTP/1.1 503 Service Unavailable\r\n\r\n").await;
        let out = check_once(addr, &http_check(StatusMatch::Range(200, 399), None), None).await;
        assert_eq!(out, Outcome::fail("status 503"));
    }

    #[tokio::test]
    async fn http_status_list() {
        let (addr, _) = http_server("HTTP/1.0 204 No Content\r\n\r\n").await;
        let list = |codes: &[u16]| http_check(StatusMatch::List(codes.to_vec()), None);
        assert!(check_once(addr, &list(&[200, 204]), None).await.ok);
        assert_eq!(
            check_once(addr, &list(&[200]), None).await,
            Outcome::fail("status 204")
        );
    }

    #[tokio::test]
    async fn http_body_match() {
        let (addr, _) =
            http_server("HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nstatus: healthy\n")
                .await;
        let range = StatusMatch::Range(200, 399);
        assert!(
            check_once(addr, &http_check(range.clone(), Some("healthy")), None)
                .await
                .ok
        );
        assert_eq!(
            check_once(addr, &http_check(range, Some("sick")), None).await,
            Outcome::fail("body mismatch")
        );
    }

    #[tokio::test]
    async fn http_chunked_body() {
        let (addr, _) = http_server(
            "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhea\r\n4\r\nlthy\r\n0\r\n\r\n",
        )
        .await;
        let out = check_once(
            addr,
            &http_check(StatusMatch::Range(200, 200), Some("healthy")),
            None,
        )
        .await;
        assert_eq!(out, Outcome::pass());
    }

    #[tokio::test]
    async fn http_content_length_does_not_wait_for_close() {
        // The server keeps the connection open after a framed response.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let _ = s.read(&mut buf).await;
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_secs(10)).await;
        });
        let out = check_once(
            addr,
            &http_check(StatusMatch::Range(200, 399), Some("ok")),
            None,
        )
        .await;
        assert_eq!(out, Outcome::pass());
    }

    #[tokio::test]
    async fn http_bad_response() {
        let (addr, _) = http_server("SSH-2.0-OpenSSH\r\n\r\n").await;
        let out = check_once(addr, &http_check(StatusMatch::Range(200, 399), None), None).await;
        assert_eq!(out, Outcome::fail("bad response: malformed response head"));
        let (addr, _) = http_server("").await;
        let out = check_once(addr, &http_check(StatusMatch::Range(200, 399), None), None).await;
        assert!(out.reason.starts_with("bad response"), "{out:?}");
        assert!(!out.ok);
    }

    #[tokio::test]
    async fn http_oversized_response_is_bounded() {
        // Headers that never end: the check gives up at 64 KiB instead of reading forever.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let line = b"X-Filler: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n";
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\n").await;
            while s.write_all(line).await.is_ok() {}
        });
        let out = check_once(addr, &http_check(StatusMatch::Range(200, 399), None), None).await;
        assert!(out.reason.starts_with("bad response: "), "{out:?}");
        assert!(!out.ok);
    }

    #[tokio::test]
    async fn http_endless_header_line_is_bounded() {
        // One header line that never ends: the check gives up at 64 KiB of head.
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = l.accept().await.unwrap();
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nX-Filler: ").await;
            while s.write_all(&[b'a'; 1024]).await.is_ok() {}
        });
        let out = check_once(addr, &http_check(StatusMatch::Range(200, 399), None), None).await;
        assert_eq!(out, Outcome::fail("bad response: response head too large"));
    }

    #[tokio::test]
    async fn http_silent_server_times_out() {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        // Accepted by the kernel (backlog) but never answered.
        let mut check = http_check(StatusMatch::Range(200, 399), None);
        check.timeout = Duration::from_millis(200);
        let start = Instant::now();
        let out = check_once(addr, &check, None).await;
        let took = start.elapsed();
        assert_eq!(out, Outcome::fail("timeout"));
        assert!(took >= Duration::from_millis(200), "{took:?}");
        assert!(took < Duration::from_millis(1000), "{took:?}");
        drop(l);
    }

    async fn next_event(rx: &mut mpsc::UnboundedReceiver<HealthEvent>) -> HealthEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no health event within 5s")
            .expect("channel closed")
    }

    fn target(address: SocketAddr, check: HealthCheck) -> Target {
        Target {
            service: "web".into(),
            address,
            check,
            transport: None,
        }
    }

    #[tokio::test]
    async fn runner_reports_down_and_up() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut checker = HealthChecker::new(tx);
        checker.set_targets(vec![target(addr, tcp_check(100))]);

        let up = next_event(&mut rx).await;
        assert_eq!(
            up,
            HealthEvent {
                service: "web".into(),
                address: addr,
                health: Health::Up,
                reason: "ok".into(),
            }
        );
        let status = checker.status("web", addr).unwrap();
        assert_eq!((status.health, status.last.as_str()), (Health::Up, "ok"));

        drop(listener);
        let start = Instant::now();
        let down = next_event(&mut rx).await;
        assert_eq!(down.health, Health::Down);
        assert_eq!(down.reason, "connection refused");
        // fall = 2 at 100ms intervals: the second failure, not the first.
        assert!(
            start.elapsed() >= Duration::from_millis(100),
            "{:?}",
            start.elapsed()
        );
        assert_eq!(checker.status("web", addr).unwrap().health, Health::Down);

        let _listener = TcpListener::bind(addr).await.unwrap();
        let up = next_event(&mut rx).await;
        assert_eq!(up.health, Health::Up);
        assert!(rx.try_recv().is_err(), "one event per transition");
    }

    /// A TCP server that counts connections.
    async fn counting_server() -> (SocketAddr, Arc<AtomicUsize>) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let count = Arc::new(AtomicUsize::new(0));
        let c = Arc::clone(&count);
        tokio::spawn(async move {
            while let Ok((s, _)) = l.accept().await {
                c.fetch_add(1, Ordering::SeqCst);
                drop(s);
            }
        });
        (addr, count)
    }

    async fn wait_for(count: &AtomicUsize, at_least: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while count.load(Ordering::SeqCst) < at_least {
            assert!(Instant::now() < deadline, "server saw no checks");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Asserts no further connections arrive.
    async fn assert_quiet(count: &AtomicUsize) {
        // Let an in-flight check land first.
        tokio::time::sleep(Duration::from_millis(150)).await;
        let before = count.load(Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(400)).await;
        assert_eq!(count.load(Ordering::SeqCst), before, "a check still runs");
    }

    #[tokio::test]
    async fn set_targets_keeps_restarts_and_removes() {
        let (addr, count) = counting_server().await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut checker = HealthChecker::new(tx);
        checker.set_targets(vec![target(addr, tcp_check(100))]);
        assert_eq!(next_event(&mut rx).await.health, Health::Up);

        // Same target again: the task keeps its state and reports nothing new.
        checker.set_targets(vec![target(addr, tcp_check(100))]);
        assert_eq!(checker.status("web", addr).unwrap().health, Health::Up);
        tokio::time::sleep(Duration::from_millis(350)).await;
        assert!(rx.try_recv().is_err());

        // A changed check starts over from Unchecked and rises again.
        let mut slower = tcp_check(100);
        slower.rise = 3;
        checker.set_targets(vec![target(addr, slower)]);
        assert_ne!(
            checker.status("web", addr).map(|s| s.health),
            Some(Health::Up)
        );
        assert_eq!(next_event(&mut rx).await.health, Health::Up);

        checker.set_targets(Vec::new());
        assert_eq!(checker.status("web", addr), None);
        assert_quiet(&count).await;
        assert!(rx.try_recv().is_err());
    }

    #[tokio::test]
    async fn a_down_backend_is_checked_every_down_interval() {
        // Connections closed unanswered: every http check fails.
        let (addr, count) = counting_server().await;
        let (tx, mut rx) = mpsc::unbounded_channel();
        let mut checker = HealthChecker::new(tx);
        let check = HealthCheck {
            fall: 2,
            down_interval: Duration::from_secs(3600),
            ..http_check(StatusMatch::Range(200, 399), None)
        };
        checker.set_targets(vec![target(addr, check)]);
        assert_eq!(next_event(&mut rx).await.health, Health::Down);
        assert_eq!(count.load(Ordering::SeqCst), 2, "fall checks");
        // Down: the next check is an hour away, not 100 ms.
        assert_quiet(&count).await;
    }

    #[tokio::test]
    async fn drop_stops_tasks() {
        let (addr, count) = counting_server().await;
        let (tx, _rx) = mpsc::unbounded_channel();
        let mut checker = HealthChecker::new(tx);
        checker.set_targets(vec![target(addr, tcp_check(100))]);
        wait_for(&count, 2).await;
        drop(checker);
        assert_quiet(&count).await;
    }
}
