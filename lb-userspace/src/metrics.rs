//! Prometheus text exposition of the data plane's counters, served over plain HTTP.

use std::fmt::Write as _;
use std::net::SocketAddr;

use anyhow::{Context, Result};
use lb_common::Reason;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tracing::{debug, warn};

use crate::{balancer::Balancer, dataplane::Counters};

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

/// Appends one counter family: its HELP/TYPE header, then `name{labels} value` lines.
fn family(out: &mut String, name: &str, help: &str, samples: impl Iterator<Item = (String, u64)>) {
    typed_family(out, name, help, "counter", samples);
}

/// A family of current values (`gauge`), which may go down.
fn gauges(out: &mut String, name: &str, help: &str, samples: impl Iterator<Item = (String, u64)>) {
    typed_family(out, name, help, "gauge", samples);
}

fn typed_family(
    out: &mut String,
    name: &str,
    help: &str,
    kind: &str,
    samples: impl Iterator<Item = (String, u64)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{{{labels}}} {value}");
    }
}

/// Renders counters in the Prometheus text format.
pub fn render(services: &[ServiceLabel], backends: &[BackendLabel], c: &Counters) -> String {
    let vip = |id: u32| c.vips.get(id as usize).copied().unwrap_or_default();
    let be = |id: u32| c.backends.get(id as usize).copied().unwrap_or_default();
    let service_labels = |s: &ServiceLabel| format!("service=\"{}\",vip=\"{}\"", s.name, s.vip);
    let backend_labels =
        |b: &BackendLabel| format!("service=\"{}\",backend=\"{}\"", b.service, b.address);
    let reason_labels = |r: Reason| format!("reason=\"{}\"", r.name());
    let mut out = String::new();
    family(
        &mut out,
        "lb_service_packets_total",
        "Client packets forwarded by XDP for the service.",
        services
            .iter()
            .map(|s| (service_labels(s), vip(s.vip_id).packets)),
    );
    family(
        &mut out,
        "lb_service_bytes_total",
        "Client bytes forwarded by XDP for the service.",
        services
            .iter()
            .map(|s| (service_labels(s), vip(s.vip_id).bytes)),
    );
    family(
        &mut out,
        "lb_backend_packets_total",
        "Client packets forwarded by XDP to the backend.",
        backends
            .iter()
            .map(|b| (backend_labels(b), be(b.backend_id).packets)),
    );
    family(
        &mut out,
        "lb_backend_bytes_total",
        "Client bytes forwarded by XDP to the backend.",
        backends
            .iter()
            .map(|b| (backend_labels(b), be(b.backend_id).bytes)),
    );
    family(
        &mut out,
        "lb_xdp_packets_total",
        "Packets seen by the XDP program, by the decision taken.",
        Reason::ALL
            .iter()
            .map(|&r| (reason_labels(r), c.reason(r).packets)),
    );
    family(
        &mut out,
        "lb_xdp_bytes_total",
        "Bytes seen by the XDP program, by the decision taken.",
        Reason::ALL
            .iter()
            .map(|&r| (reason_labels(r), c.reason(r).bytes)),
    );
    out
}

/// Renders the L7 pools' live figures: requests in flight and idle
/// keep-alive connections per server, queued requests per pool.
pub fn render_pools(pools: &[lb_proxy::PoolStats]) -> String {
    use lb_proxy::ServerStats;
    // One sample per pool server of the figure `value` picks.
    let per_server = |value: fn(&ServerStats) -> usize| {
        pools.iter().flat_map(move |p| {
            p.servers.iter().map(move |s| {
                let labels = format!("pool=\"{}\",server=\"{}\"", p.name, s.address);
                (labels, value(s) as u64)
            })
        })
    };
    let mut out = String::new();
    gauges(
        &mut out,
        "lb_pool_server_current_requests",
        "Requests in flight to the L7 pool server.",
        per_server(|s| s.current),
    );
    gauges(
        &mut out,
        "lb_pool_server_idle_connections",
        "Idle keep-alive connections to the L7 pool server.",
        per_server(|s| s.idle_connections),
    );
    gauges(
        &mut out,
        "lb_pool_queued_requests",
        "Requests waiting in the L7 pool's queue for a server below its maxconn.",
        pools
            .iter()
            .map(|p| (format!("pool=\"{}\"", p.name), p.queued as u64)),
    );
    out
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

/// Renders the balancer's current counters.
pub fn snapshot(balancer: &mut Balancer) -> Result<String> {
    let (services, backends) = labels(balancer);
    let counters = balancer.dataplane().counters()?;
    Ok(render(&services, &backends, &counters))
}

fn labels(balancer: &Balancer) -> (Vec<ServiceLabel>, Vec<BackendLabel>) {
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

/// Serves `GET /metrics` (any path, in fact) until the task is dropped.
pub async fn serve(listener: TcpListener, source: std::sync::Arc<dyn Source>) -> Result<()> {
    loop {
        let (mut sock, peer) = listener.accept().await.context("metrics accept")?;
        let source = source.clone();
        tokio::spawn(async move {
            // Read the request head; its content does not matter, but reading it
            // keeps clients that wait for the server to read from seeing a reset.
            let mut buf = [0u8; 2048];
            let _ =
                tokio::time::timeout(std::time::Duration::from_secs(2), sock.read(&mut buf)).await;
            let body = tokio::task::spawn_blocking(move || source.render())
                .await
                .unwrap_or_else(|e| Err(e.into()));
            let (status, body) = match body {
                Ok(text) => ("200 OK", text),
                Err(e) => {
                    warn!(error = %e, "metrics snapshot failed");
                    ("500 Internal Server Error", format!("{e:#}\n"))
                }
            };
            let resp = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Err(e) = sock.write_all(resp.as_bytes()).await {
                debug!(%peer, error = %e, "metrics write failed");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_pool_gauges() {
        let pools = [lb_proxy::PoolStats {
            name: "web".into(),
            queued: 3,
            servers: vec![lb_proxy::ServerStats {
                address: "198.18.2.11:8080".parse().unwrap(),
                current: 2,
                idle_connections: 5,
            }],
        }];
        let text = render_pools(&pools);
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
    }
    use lb_common::Traffic;

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
