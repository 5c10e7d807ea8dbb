//! What the agent knows of each backend and pool server, as gauges: weight,
//! administrative state, health (HAProxy's `check_status`), active flows.

use std::collections::BTreeMap;

use super::{Exposition, Kind};
use crate::control::{AdminState, BackendInfo, Health};

const HEALTHS: [Health; 3] = [Health::Up, Health::Down, Health::Unchecked];

const ADMIN: [AdminState; 3] = [AdminState::Ready, AdminState::Drain, AdminState::Maint];

/// Labels of a backend: `service,backend` for L4, `pool,server` for pool
/// servers (listed as `pool:NAME`); and the family prefix that goes with them.
fn labels(b: &BackendInfo) -> (&'static str, String) {
    match b.service.strip_prefix("pool:") {
        Some(pool) => (
            "lb_pool_server",
            super::labels(&[("pool", &pool), ("server", &b.address)]),
        ),
        None => (
            "lb_backend",
            super::labels(&[("service", &b.service), ("backend", &b.address)]),
        ),
    }
}

/// One gauge family per prefix (`lb_backend_*`, `lb_pool_server_*`).
fn both(
    out: &mut Exposition,
    backends: &[BackendInfo],
    suffix: &str,
    help: &str,
    samples: impl Fn(&BackendInfo, &str) -> Vec<(String, u64)>,
) {
    for prefix in ["lb_backend", "lb_pool_server"] {
        let rows = backends
            .iter()
            .filter_map(|b| {
                let (p, l) = labels(b);
                (p == prefix).then(|| samples(b, &l))
            })
            .flatten()
            .collect();
        out.family(&format!("{prefix}_{suffix}"), help, Kind::Gauge, rows);
    }
}

/// The gauges of `backends` (from `lb show backends`).
pub fn backends(out: &mut Exposition, backends: &[BackendInfo]) {
    both(out, backends, "weight", "Configured weight.", |b, l| {
        vec![(l.to_string(), u64::from(b.weight))]
    });
    both(
        out,
        backends,
        "check_status",
        "1 for the health-check state it is in (up, down, unchecked).",
        |b, l| {
            HEALTHS
                .iter()
                .map(|&h| (format!("{l},state=\"{h}\""), u64::from(b.health == h)))
                .collect()
        },
    );
    both(
        out,
        backends,
        "admin_state",
        "1 for the administrative state it is in (ready, drain, maint).",
        |b, l| {
            ADMIN
                .iter()
                .map(|&a| (format!("{l},state=\"{a}\""), u64::from(b.admin == a)))
                .collect()
        },
    );
    let l4: Vec<_> = backends
        .iter()
        .filter(|b| !b.service.starts_with("pool:"))
        .collect();
    out.family(
        "lb_backend_active_flows",
        "Connections pinned to the backend in the XDP flow table.",
        Kind::Gauge,
        l4.iter().map(|b| (labels(b).1, b.active_flows)).collect(),
    );
    let mut per_service = BTreeMap::<&str, u64>::new();
    for b in &l4 {
        *per_service.entry(&b.service).or_default() += b.active_flows;
    }
    out.family(
        "lb_service_active_flows",
        "Connections of the service in the XDP flow table.",
        Kind::Gauge,
        per_service
            .into_iter()
            .map(|(s, n)| (super::labels(&[("service", &s)]), n))
            .collect(),
    );
}
