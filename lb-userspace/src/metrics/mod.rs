//! Prometheus text exposition (`GET /metrics` on `metrics`): the data
//! plane's counters, what the agent knows of each backend, and the L7
//! proxy's request counters, named after HAProxy's exporter
//! (`haproxy_frontend_*` → `lb_frontend_*`, `haproxy_backend_*` →
//! `lb_pool_*`, `haproxy_server_*` → `lb_pool_server_*`).
//!
//! | Family | Type | Labels | What |
//! |---|---|---|---|
//! | `lb_service_packets_total`, `lb_service_bytes_total` | counter | service, vip | client traffic XDP forwarded for the service |
//! | `lb_backend_packets_total`, `lb_backend_bytes_total` | counter | service, backend | client traffic XDP forwarded to the backend |
//! | `lb_xdp_packets_total`, `lb_xdp_bytes_total` | counter | reason | every XDP decision; `reason="drop_*"` are the drops by reason |
//! | `lb_service_active_flows`, `lb_backend_active_flows` | gauge | service[, backend] | connections in the XDP flow table |
//! | `lb_backend_weight`, `lb_pool_server_weight` | gauge | service, backend / pool, server | configured weight |
//! | `lb_backend_check_status`, `lb_pool_server_check_status` | gauge | … , state=up\|down\|unchecked | 1 for the health state it is in |
//! | `lb_backend_admin_state`, `lb_pool_server_admin_state` | gauge | … , state=ready\|drain\|maint | 1 for the operator's state |
//! | `lb_frontend_current_sessions`, `lb_frontend_max_sessions`, `lb_frontend_limit_sessions` | gauge | frontend | client connections open; most at once; `max_connections` |
//! | `lb_frontend_sessions_total` | counter | frontend | client connections accepted |
//! | `lb_frontend_requests_denied_total` | counter | frontend | requests refused by a rule (deny, failed auth: `PR`) |
//! | `lb_frontend_denied_connections_total` | counter | frontend | connections closed unserved by `max_connections_per_source` or a `reject` rule (not in `sessions_total`) |
//! | `lb_frontend_http_comp_bytes_in_total`, `…_bytes_out_total`, `…_responses_total` | counter | frontend | `[frontend.compression]`: bytes given to the compressor, bytes it made, responses compressed (HAProxy's `comp_in`, `comp_out`, `comp_rsp`) |
//! | `lb_{frontend,pool,pool_server}_http_requests_total` | counter | frontend / pool / pool, server | requests (pools, servers: forwarded ones) |
//! | `lb_{frontend,pool,pool_server}_http_responses_total` | counter | … , code=1xx…5xx\|other | responses by status class |
//! | `lb_{frontend,pool,pool_server}_bytes_in_total` | counter | … | request body bytes (by Content-Length) |
//! | `lb_{frontend,pool,pool_server}_bytes_out_total` | counter | … | response body bytes |
//! | `lb_{frontend,pool,pool_server}_total_time_seconds` | histogram | … | whole request (Tt) |
//! | `lb_{pool,pool_server}_connect_time_seconds` | histogram | … | connect (Tc; 0 on a reused connection) |
//! | `lb_{pool,pool_server}_response_time_seconds` | histogram | … | request sent to response head (Tr, first byte) |
//! | `lb_{pool,pool_server}_connection_errors_total` | counter | … | failed connections to servers |
//! | `lb_{pool,pool_server}_retry_warnings_total`, `…_redispatch_warnings_total` | counter | … | retries; those sent to another server |
//! | `lb_{pool,pool_server}_queue_time_seconds_total` | counter | … | time waited in the pool's queue (Tw) |
//! | `lb_pool_queued_requests`, `lb_pool_current_requests` | gauge | pool | queued; in flight |
//! | `lb_pool_server_current_requests`, `lb_pool_server_max_sessions`, `lb_pool_server_idle_connections`, `lb_pool_server_up` | gauge | pool, server | in flight (scur); most at once (smax); idle keep-alive (HTTP/1.1, and a shared HTTP/2 connection with no request in flight); taking requests (ready, healthy, not out by `max_fails`) |
//! | `lb_pool_server_taken_out_total` | counter | pool, server | times taken out after `max_fails` failed attempts in a row |
//!
//! Histogram buckets (`le`, seconds): 0.001 0.005 0.01 0.025 0.05 0.1 0.25
//! 0.5 1 2.5 5 10 +Inf; times are measured in whole milliseconds.
//! The proxy's counters start from zero when the proxy restarts (a reload
//! or runtime change that alters frontends or pools other than their
//! servers, which change in place), as HAProxy's do on a reload. XDP counts no flow creations: `lb_*_active_flows` (a scan of the
//! flow table per scrape) is what the data plane offers.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Result;
use bytes::Bytes;
use lb_common::{Reason, Traffic};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tracing::{debug, warn};

use crate::control::BackendInfo;
use crate::{balancer::Balancer, dataplane::Counters};

mod l7;
mod state;

/// What the endpoint serves: the exposition text now. The agent implements
/// it, as it implements the control socket's `Handler`, so this module does
/// not know the agent.
pub trait Source: Send + Sync + 'static {
    /// The whole exposition text (called on a blocking thread).
    fn render(&self) -> Result<String>;
}

/// A service as the metrics name it.
#[derive(Debug, Clone)]
pub struct ServiceLabel {
    /// Service name from the config.
    pub name: String,
    /// VIP address and port.
    pub vip: SocketAddr,
    /// VIP id in the data plane.
    pub vip_id: u32,
}

/// A backend as the metrics name it.
#[derive(Debug, Clone)]
pub struct BackendLabel {
    /// Service it belongs to.
    pub service: String,
    /// Backend address and port.
    pub address: SocketAddr,
    /// Backend id in the data plane.
    pub backend_id: u32,
}

/// Label pairs as the exposition writes them, `k="v",...`, each value
/// escaped as the text format requires (`\\`, `\"`, `\n`): a name with a
/// quote or a newline must not end its label or forge a line. Every label
/// set is built here.
pub fn labels(pairs: &[(&str, &dyn std::fmt::Display)]) -> String {
    let mut out = String::new();
    for (i, (key, value)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str(key);
        out.push_str("=\"");
        for c in value.to_string().chars() {
            match c {
                '\\' => out.push_str("\\\\"),
                '"' => out.push_str("\\\""),
                '\n' => out.push_str("\\n"),
                c => out.push(c),
            }
        }
        out.push('"');
    }
    out
}

/// Whether a family may go down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Only ever goes up (until a restart).
    Counter,
    /// A current value.
    Gauge,
}

/// Prometheus text being written, family by family.
#[derive(Debug, Default)]
pub struct Exposition(String);

impl Exposition {
    fn header(&mut self, name: &str, help: &str, kind: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}\n# TYPE {name} {kind}");
    }

    fn kind(kind: Kind) -> &'static str {
        match kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
        }
    }

    /// One family: its HELP/TYPE header, then `name{labels} value` lines.
    pub fn family(&mut self, name: &str, help: &str, kind: Kind, samples: Vec<(String, u64)>) {
        self.header(name, help, Self::kind(kind));
        for (labels, value) in samples {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }

    /// A family of fractional values (seconds).
    pub fn family_f64(&mut self, name: &str, help: &str, kind: Kind, samples: Vec<(String, f64)>) {
        self.header(name, help, Self::kind(kind));
        for (labels, value) in samples {
            let _ = writeln!(self.0, "{name}{{{labels}}} {value}");
        }
    }

    /// A histogram family in seconds from millisecond snapshots:
    /// `_bucket{le=...}`, `_sum` and `_count` per label set.
    pub fn histogram(
        &mut self,
        name: &str,
        help: &str,
        samples: &[(String, lb_proxy::stats::HistogramSnapshot)],
    ) {
        self.header(name, help, "histogram");
        for (labels, h) in samples {
            for (le, n) in l7::bucket_bounds().zip(&h.cumulative) {
                let _ = writeln!(self.0, "{name}_bucket{{{labels},le=\"{le}\"}} {n}");
            }
            let sum = h.sum_ms as f64 / 1000.0;
            let _ = writeln!(self.0, "{name}_sum{{{labels}}} {sum}");
            let _ = writeln!(self.0, "{name}_count{{{labels}}} {}", h.count());
        }
    }

    /// The text written so far.
    pub fn into_text(self) -> String {
        self.0
    }
}

/// Renders the data plane's counters in the Prometheus text format.
pub fn render(services: &[ServiceLabel], backends: &[BackendLabel], c: &Counters) -> String {
    let mut out = Exposition::default();
    dataplane(&mut out, services, backends, c);
    out.into_text()
}

fn dataplane(
    out: &mut Exposition,
    services: &[ServiceLabel],
    backends: &[BackendLabel],
    c: &Counters,
) {
    let vip = |id: u32| c.vips.get(id as usize).copied().unwrap_or_default();
    let be = |id: u32| c.backends.get(id as usize).copied().unwrap_or_default();
    let service_labels = |s: &ServiceLabel| labels(&[("service", &s.name), ("vip", &s.vip)]);
    let backend_labels =
        |b: &BackendLabel| labels(&[("service", &b.service), ("backend", &b.address)]);
    let per_service = |f: fn(Traffic) -> u64| {
        services
            .iter()
            .map(|s| (service_labels(s), f(vip(s.vip_id))))
            .collect()
    };
    let per_backend = |f: fn(Traffic) -> u64| {
        backends
            .iter()
            .map(|b| (backend_labels(b), f(be(b.backend_id))))
            .collect()
    };
    let per_reason = |f: fn(Traffic) -> u64| {
        Reason::ALL
            .iter()
            .map(|&r| (labels(&[("reason", &r.name())]), f(c.reason(r))))
            .collect()
    };
    let counter = Kind::Counter;
    out.family(
        "lb_service_packets_total",
        "Client packets forwarded by XDP for the service.",
        counter,
        per_service(|t| t.packets),
    );
    out.family(
        "lb_service_bytes_total",
        "Client bytes forwarded by XDP for the service.",
        counter,
        per_service(|t| t.bytes),
    );
    out.family(
        "lb_backend_packets_total",
        "Client packets forwarded by XDP to the backend.",
        counter,
        per_backend(|t| t.packets),
    );
    out.family(
        "lb_backend_bytes_total",
        "Client bytes forwarded by XDP to the backend.",
        counter,
        per_backend(|t| t.bytes),
    );
    out.family(
        "lb_xdp_packets_total",
        "Packets seen by the XDP program, by the decision taken (drop_*: dropped).",
        counter,
        per_reason(|t| t.packets),
    );
    out.family(
        "lb_xdp_bytes_total",
        "Bytes seen by the XDP program, by the decision taken.",
        counter,
        per_reason(|t| t.bytes),
    );
}

/// Renders the L7 proxy's frontends, pools and pool servers.
pub fn render_proxy(
    frontends: &[lb_proxy::FrontendStats],
    pools: &[lb_proxy::PoolStats],
) -> String {
    let mut out = Exposition::default();
    l7::frontends(&mut out, frontends);
    l7::pools(&mut out, pools);
    out.into_text()
}

/// Renders what the agent knows of every backend and pool server: weight,
/// administrative state, health, active flows.
pub fn render_backends(backends: &[BackendInfo]) -> String {
    let mut out = Exposition::default();
    state::backends(&mut out, backends);
    out.into_text()
}

/// Value of the sample `name{labels}` in Prometheus text (labels exactly as rendered).
pub fn sample(text: &str, name: &str, labels: &str) -> Option<u64> {
    let prefix = if labels.is_empty() {
        format!("{name} ")
    } else {
        format!("{name}{{{labels}}} ")
    };
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .and_then(|v| v.trim().parse().ok())
}

/// Renders `counters`, read from the balancer's data plane.
pub fn snapshot(balancer: &Balancer, counters: &Counters) -> String {
    let (services, backends) = label_sets(balancer);
    render(&services, &backends, counters)
}

fn label_sets(balancer: &Balancer) -> (Vec<ServiceLabel>, Vec<BackendLabel>) {
    let mut services = Vec::new();
    let mut backends = Vec::new();
    if let Some(config) = balancer.config() {
        for s in &config.services {
            if let Some(vip_id) = balancer.vip_id(s.vip, s.protocol) {
                services.push(ServiceLabel {
                    name: s.name.clone(),
                    vip: s.vip,
                    vip_id,
                });
            }
            for b in &s.backends {
                if let Some(backend_id) = balancer.backend_id(&s.name, b.address) {
                    backends.push(BackendLabel {
                        service: s.name.clone(),
                        address: b.address,
                        backend_id,
                    });
                }
            }
        }
    }
    (services, backends)
}

/// How long a scraper may take to send its request head.
const READ_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a scraper may take to take the answer: one that stops reading
/// would otherwise hold its task, socket and exposition text for ever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves `GET /metrics` (any path, in fact) until the task is dropped.
pub async fn serve(listener: TcpListener, source: Arc<dyn Source>) -> Result<()> {
    serve_with(listener, source, WRITE_TIMEOUT).await
}

/// The last render, shared by the scrapes that arrived before it started;
/// one render at a time (the others wait for it, then share it), so many
/// scrapes at once cost one render and one copy of the text, not one each,
/// and no scrape gets figures older than itself.
struct Renders {
    source: Arc<dyn Source>,
    last: tokio::sync::Mutex<Option<(Instant, Bytes)>>,
}

impl Renders {
    /// The exposition text of a render started after `arrived`.
    async fn text(&self, arrived: Instant) -> Result<Bytes> {
        let mut last = self.last.lock().await;
        if let Some((started, text)) = last.as_ref()
            && *started >= arrived
        {
            return Ok(text.clone());
        }
        let started = Instant::now();
        let source = Arc::clone(&self.source);
        let text = tokio::task::spawn_blocking(move || source.render())
            .await
            .unwrap_or_else(|e| Err(e.into()))
            .map(Bytes::from)?;
        *last = Some((started, text.clone()));
        Ok(text)
    }
}

/// `serve`, each answer written within `write_timeout`.
async fn serve_with(
    listener: TcpListener,
    source: Arc<dyn Source>,
    write_timeout: Duration,
) -> Result<()> {
    let mut errors = lb_proxy::accept_errors::AcceptErrors::new("metrics endpoint");
    let limit = crate::conn_limit::ConnLimit::new(
        "metrics endpoint",
        crate::conn_limit::MAX_AUX_CONNECTIONS,
    );
    let renders = Arc::new(Renders {
        source,
        last: tokio::sync::Mutex::new(None),
    });
    loop {
        let (sock, peer) = errors.accept(|| listener.accept()).await;
        // Past the cap, closed at once: its fd is back for the data path.
        let Some(slot) = limit.admit(peer) else {
            continue;
        };
        let renders = Arc::clone(&renders);
        tokio::spawn(async move {
            answer(sock, peer, &renders, write_timeout).await;
            drop(slot);
        });
    }
}

/// Answers one scrape with the exposition text, and closes.
async fn answer(mut sock: TcpStream, peer: SocketAddr, renders: &Renders, write_timeout: Duration) {
    // Read the request head; its content does not matter, but reading it
    // keeps clients that wait for the server to read from seeing a reset.
    let mut buf = [0u8; 2048];
    let _ = tokio::time::timeout(READ_TIMEOUT, sock.read(&mut buf)).await;
    let (status, body) = match renders.text(Instant::now()).await {
        Ok(text) => ("200 OK", text),
        Err(e) => {
            warn!(error = %e, "metrics snapshot failed");
            ("500 Internal Server Error", Bytes::from(format!("{e:#}\n")))
        }
    };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let write = async {
        sock.write_all(head.as_bytes()).await?;
        // The shared text itself, not a copy per connection.
        sock.write_all(&body).await
    };
    match tokio::time::timeout(write_timeout, write).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(%peer, error = %e, "metrics write failed"),
        Err(_) => debug!(%peer, "metrics client did not take the answer in {write_timeout:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An exposition text far larger than the socket buffers.
    struct Big;

    impl Source for Big {
        fn render(&self) -> Result<String> {
            Ok("x".repeat(32 << 20))
        }
    }

    /// Counts its renders.
    struct Counting(std::sync::atomic::AtomicUsize);

    impl Source for Counting {
        fn render(&self) -> Result<String> {
            self.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            std::thread::sleep(Duration::from_millis(100));
            Ok("lb_up 1\n".into())
        }
    }

    #[tokio::test]
    async fn scrapes_at_once_share_one_render() {
        let source = Arc::new(Counting(Default::default()));
        let renders = Arc::new(Renders {
            source: source.clone(),
            last: tokio::sync::Mutex::new(None),
        });
        // Twenty scrapes arrived before any render started.
        let arrived = Instant::now();
        let scrapes: Vec<_> = (0..20)
            .map(|_| {
                let r = Arc::clone(&renders);
                tokio::spawn(async move { r.text(arrived).await.unwrap() })
            })
            .collect();
        for s in scrapes {
            assert_eq!(&s.await.unwrap()[..], b"lb_up 1\n");
        }
        assert_eq!(source.0.load(std::sync::atomic::Ordering::Relaxed), 1);
        // One that came after it gets a render of its own: never older figures.
        renders.text(Instant::now()).await.unwrap();
        assert_eq!(source.0.load(std::sync::atomic::Ordering::Relaxed), 2);
    }

    #[tokio::test]
    async fn scrapers_past_the_limit_are_closed() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(serve_with(listener, Arc::new(Big), WRITE_TIMEOUT));
        let _held = crate::conn_limit::testing::fill_and_one_more_is_closed(addr).await;
        server.abort();
    }

    #[tokio::test]
    async fn a_scraper_that_stops_reading_is_dropped() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let write_timeout = Duration::from_millis(300);
        let server = tokio::spawn(serve_with(listener, Arc::new(Big), write_timeout));
        let mut client = TcpStream::connect(addr).await.unwrap();
        client
            .write_all(b"GET /metrics HTTP/1.1\r\n\r\n")
            .await
            .unwrap();
        // Not reading for longer than the write timeout: the answer is cut off.
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut got = Vec::new();
        let _ = client.read_to_end(&mut got).await;
        assert!(
            got.len() < 32 << 20,
            "the whole answer came after the timeout"
        );
        server.abort();
    }

    #[test]
    fn renders_pool_gauges_and_counters() {
        let mut counters = lb_proxy::stats::CounterSnapshot {
            requests: 4,
            responses: [0, 3, 0, 1, 0, 0],
            ..Default::default()
        };
        counters.total_time.cumulative = vec![1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 4];
        counters.total_time.sum_ms = 30_004;
        let pools = [lb_proxy::PoolStats {
            name: "web".into(),
            queued: 3,
            servers: vec![lb_proxy::ServerStats {
                address: "198.18.2.11:8080".parse().unwrap(),
                current: 2,
                idle_connections: 5,
                weight: 1,
                up: true,
                taken_out: false,
                counters: counters.clone(),
            }],
            counters,
        }];
        let text = render_proxy(&[], &pools);
        let server = "pool=\"web\",server=\"198.18.2.11:8080\"";
        assert_eq!(
            sample(&text, "lb_pool_server_current_requests", server),
            Some(2)
        );
        assert_eq!(
            sample(&text, "lb_pool_server_idle_connections", server),
            Some(5)
        );
        assert_eq!(
            sample(&text, "lb_pool_queued_requests", "pool=\"web\""),
            Some(3)
        );
        assert!(text.contains("# TYPE lb_pool_queued_requests gauge"));
        assert_eq!(
            sample(
                &text,
                "lb_pool_http_responses_total",
                "pool=\"web\",code=\"4xx\""
            ),
            Some(1)
        );
        let bucket = format!("{server},le=\"0.005\"");
        assert_eq!(
            sample(&text, "lb_pool_server_total_time_seconds_bucket", &bucket),
            Some(2)
        );
        assert_eq!(
            sample(&text, "lb_pool_server_total_time_seconds_count", server),
            Some(4)
        );
        assert!(text.contains("lb_pool_total_time_seconds_sum{pool=\"web\"} 30.004\n"));
    }

    #[test]
    fn renders_frontend_denials_of_requests_and_connections_apart() {
        let frontends = [lb_proxy::FrontendStats {
            name: "web".into(),
            current_connections: 2,
            max_connections: 100,
            counters: lb_proxy::stats::CounterSnapshot {
                connections: 7,
                denied: 1,
                denied_connections: 5,
                comp_in: 4000,
                comp_out: 900,
                comp_responses: 2,
                ..Default::default()
            },
        }];
        let text = render_proxy(&frontends, &[]);
        let web = "frontend=\"web\"";
        assert_eq!(sample(&text, "lb_frontend_sessions_total", web), Some(7));
        assert_eq!(
            sample(&text, "lb_frontend_requests_denied_total", web),
            Some(1)
        );
        assert_eq!(
            sample(&text, "lb_frontend_denied_connections_total", web),
            Some(5)
        );
        assert!(text.contains("# TYPE lb_frontend_denied_connections_total counter"));
        let comp = |name| sample(&text, name, web);
        assert_eq!(comp("lb_frontend_http_comp_bytes_in_total"), Some(4000));
        assert_eq!(comp("lb_frontend_http_comp_bytes_out_total"), Some(900));
        assert_eq!(comp("lb_frontend_http_comp_responses_total"), Some(2));
    }

    #[test]
    fn label_values_are_escaped_and_forge_no_line() {
        let name = "w\"e} 1\nfake_metric{x=\"y\"} 42\\";
        assert_eq!(
            labels(&[("frontend", &name), ("n", &1)]),
            r#"frontend="w\"e} 1\nfake_metric{x=\"y\"} 42\\",n="1""#
        );
        let pools = [lb_proxy::PoolStats {
            name: name.into(),
            queued: 0,
            servers: Vec::new(),
            counters: Default::default(),
        }];
        let text = render_proxy(&[], &pools);
        assert!(
            !text.lines().any(|l| l.starts_with("fake_metric")),
            "{text}"
        );
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("lb_pool_"), "{line}");
        }
    }

    #[test]
    fn renders_and_reads_back_samples() {
        let mut c = Counters {
            vips: vec![Traffic::default(); 2],
            backends: vec![Traffic::default(); 2],
            reasons: vec![Traffic::default(); Reason::ALL.len()],
        };
        c.vips[1] = Traffic {
            packets: 7,
            bytes: 700,
        };
        c.backends[0] = Traffic {
            packets: 3,
            bytes: 300,
        };
        c.reasons[Reason::PassNotVip as usize].packets = 5;
        let services = [ServiceLabel {
            name: "web".into(),
            vip: "198.18.100.1:80".parse().unwrap(),
            vip_id: 1,
        }];
        let backends = [BackendLabel {
            service: "web".into(),
            address: "198.18.2.11:8080".parse().unwrap(),
            backend_id: 0,
        }];
        let text = render(&services, &backends, &c);
        assert_eq!(
            sample(
                &text,
                "lb_service_packets_total",
                "service=\"web\",vip=\"198.18.100.1:80\""
            ),
            Some(7)
        );
        assert_eq!(
            sample(
                &text,
                "lb_backend_bytes_total",
                "service=\"web\",backend=\"198.18.2.11:8080\""
            ),
            Some(300)
        );
        assert_eq!(
            sample(&text, "lb_xdp_packets_total", "reason=\"pass_not_vip\""),
            Some(5)
        );
        assert_eq!(sample(&text, "lb_nope", ""), None);
    }
}
