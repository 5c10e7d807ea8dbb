//! The L7 proxy's families: frontends, pools and pool servers (see the table
//! in `crate::metrics`).

use lb_proxy::stats::{BUCKETS_MS, CounterSnapshot, HistogramSnapshot, STATUS_CLASSES};
use lb_proxy::{FrontendStats, PoolStats};

use super::{Exposition, Kind, labels};

/// A labelled counter snapshot: `frontend="x"`, `pool="x"` or `pool="x",server="a"`.
type Row<'a> = (String, &'a CounterSnapshot);

/// The counter families every level shares, `prefix` being `lb_frontend`,
/// `lb_pool` or `lb_pool_server`.
fn common(out: &mut Exposition, prefix: &str, rows: &[Row<'_>]) {
    let each = |f: fn(&CounterSnapshot) -> u64| {
        rows.iter()
            .map(move |(labels, c)| (labels.clone(), f(c)))
            .collect::<Vec<_>>()
    };
    out.family(
        &format!("{prefix}_http_requests_total"),
        "HTTP requests.",
        Kind::Counter,
        each(|c| c.requests),
    );
    let by_class = rows.iter().flat_map(|(labels, c)| {
        STATUS_CLASSES
            .iter()
            .zip(c.responses)
            .map(move |(class, n)| (format!("{labels},code=\"{class}\""), n))
    });
    out.family(
        &format!("{prefix}_http_responses_total"),
        "HTTP responses by status class.",
        Kind::Counter,
        by_class.collect(),
    );
    out.family(
        &format!("{prefix}_bytes_in_total"),
        "Request body bytes (as declared by Content-Length).",
        Kind::Counter,
        each(|c| c.bytes_in),
    );
    out.family(
        &format!("{prefix}_bytes_out_total"),
        "Response body bytes sent to clients.",
        Kind::Counter,
        each(|c| c.bytes_out),
    );
    let hist = |c: &CounterSnapshot, i: usize| -> HistogramSnapshot {
        match i {
            0 => c.connect_time.clone(),
            1 => c.first_byte_time.clone(),
            _ => c.total_time.clone(),
        }
    };
    let times = [
        ("connect_time_seconds", "Time to connect to the server."),
        (
            "response_time_seconds",
            "Time from sending the request to the response head (first byte).",
        ),
        (
            "total_time_seconds",
            "Time of the whole request, to the last response byte.",
        ),
    ];
    // Frontends see the whole request only.
    let first = if prefix == "lb_frontend" { 2 } else { 0 };
    for (i, (name, help)) in times.iter().enumerate().skip(first) {
        let samples: Vec<_> = rows.iter().map(|(l, c)| (l.clone(), hist(c, i))).collect();
        out.histogram(&format!("{prefix}_{name}"), help, &samples);
    }
}

/// The families of the servers' side (pools and servers): connect errors,
/// retries, queue time.
fn upstream(out: &mut Exposition, prefix: &str, rows: &[Row<'_>]) {
    let each = |f: fn(&CounterSnapshot) -> u64| {
        rows.iter()
            .map(move |(labels, c)| (labels.clone(), f(c)))
            .collect::<Vec<_>>()
    };
    out.family(
        &format!("{prefix}_connection_errors_total"),
        "Failed connections to servers.",
        Kind::Counter,
        each(|c| c.connect_errors),
    );
    out.family(
        &format!("{prefix}_retry_warnings_total"),
        "Requests tried again after a failure.",
        Kind::Counter,
        each(|c| c.retries),
    );
    out.family(
        &format!("{prefix}_redispatch_warnings_total"),
        "Retries sent to another server.",
        Kind::Counter,
        each(|c| c.redispatches),
    );
    out.family_f64(
        &format!("{prefix}_queue_time_seconds_total"),
        "Time requests waited in the pool's queue for a server below its maxconn.",
        Kind::Counter,
        rows.iter()
            .map(|(l, c)| (l.clone(), c.queue_ms as f64 / 1000.0))
            .collect(),
    );
}

/// Frontends: connections, requests, denials, times.
pub fn frontends(out: &mut Exposition, frontends: &[FrontendStats]) {
    let rows: Vec<Row<'_>> = frontends.iter().map(|f| (label(f), &f.counters)).collect();
    out.family(
        "lb_frontend_current_sessions",
        "Client connections open now.",
        Kind::Gauge,
        frontends
            .iter()
            .map(|f| (label(f), f.current_connections as u64))
            .collect(),
    );
    out.family(
        "lb_frontend_max_sessions",
        "Most client connections open at once.",
        Kind::Gauge,
        frontends
            .iter()
            .map(|f| (label(f), f.counters.max_current))
            .collect(),
    );
    out.family(
        "lb_frontend_limit_sessions",
        "The frontend's max_connections.",
        Kind::Gauge,
        frontends
            .iter()
            .map(|f| (label(f), f.max_connections as u64))
            .collect(),
    );
    out.family(
        "lb_frontend_sessions_total",
        "Client connections accepted.",
        Kind::Counter,
        frontends
            .iter()
            .map(|f| (label(f), f.counters.connections))
            .collect(),
    );
    out.family(
        "lb_frontend_requests_denied_total",
        "Requests refused by a request rule (deny, failed auth).",
        Kind::Counter,
        frontends
            .iter()
            .map(|f| (label(f), f.counters.denied))
            .collect(),
    );
    out.family(
        "lb_frontend_denied_connections_total",
        "Client connections closed unserved by max_connections_per_source or a reject rule.",
        Kind::Counter,
        frontends
            .iter()
            .map(|f| (label(f), f.counters.denied_connections))
            .collect(),
    );
    compression(out, frontends);
    common(out, "lb_frontend", &rows);
}

/// A frontend's labels.
fn label(f: &FrontendStats) -> String {
    labels(&[("frontend", &f.name)])
}

/// What `[frontend.compression]` did: HAProxy's `comp_in`, `comp_out`, `comp_rsp`.
fn compression(out: &mut Exposition, frontends: &[FrontendStats]) {
    type Read = fn(&lb_proxy::stats::CounterSnapshot) -> u64;
    let compression: [(&str, &str, Read); 3] = [
        ("bytes_in", "Response bytes given to the compressor.", |c| {
            c.comp_in
        }),
        (
            "bytes_out",
            "Compressed response bytes it made of them.",
            |c| c.comp_out,
        ),
        ("responses", "Responses compressed.", |c| c.comp_responses),
    ];
    for (name, help, value) in compression {
        out.family(
            &format!("lb_frontend_http_comp_{name}_total"),
            help,
            Kind::Counter,
            frontends
                .iter()
                .map(|f| (label(f), value(&f.counters)))
                .collect(),
        );
    }
}

/// Pools and their servers: the live gauges, then the counters.
pub fn pools(out: &mut Exposition, pools: &[PoolStats]) {
    let servers: Vec<Row<'_>> = pools
        .iter()
        .flat_map(|p| {
            p.servers.iter().map(move |s| {
                let labels = labels(&[("pool", &p.name), ("server", &s.address)]);
                (labels, &s.counters)
            })
        })
        .collect();
    let per_server = |value: fn(&lb_proxy::ServerStats) -> u64| {
        pools
            .iter()
            .flat_map(|p| {
                p.servers.iter().map(move |s| {
                    let labels = labels(&[("pool", &p.name), ("server", &s.address)]);
                    (labels, value(s))
                })
            })
            .collect::<Vec<_>>()
    };
    out.family(
        "lb_pool_server_current_requests",
        "Requests in flight to the L7 pool server (HAProxy's scur).",
        Kind::Gauge,
        per_server(|s| s.current as u64),
    );
    out.family(
        "lb_pool_server_max_sessions",
        "Most requests in flight to the server at once (HAProxy's smax).",
        Kind::Gauge,
        per_server(|s| s.counters.max_current),
    );
    out.family(
        "lb_pool_server_idle_connections",
        "Idle keep-alive connections to the L7 pool server.",
        Kind::Gauge,
        per_server(|s| s.idle_connections as u64),
    );
    out.family(
        "lb_pool_server_up",
        "1 when the proxy sends the server requests (ready and not failing checks).",
        Kind::Gauge,
        per_server(|s| u64::from(s.up)),
    );
    out.family(
        "lb_pool_server_taken_out_total",
        "Times the server was taken out after max_fails failed attempts in a row.",
        Kind::Counter,
        per_server(|s| s.counters.taken_out),
    );
    out.family(
        "lb_pool_queued_requests",
        "Requests waiting in the L7 pool's queue for a server below its maxconn.",
        Kind::Gauge,
        pools
            .iter()
            .map(|p| (labels(&[("pool", &p.name)]), p.queued as u64))
            .collect(),
    );
    out.family(
        "lb_pool_current_requests",
        "Requests in flight to the pool's servers.",
        Kind::Gauge,
        pools
            .iter()
            .map(|p| {
                let n: usize = p.servers.iter().map(|s| s.current).sum();
                (labels(&[("pool", &p.name)]), n as u64)
            })
            .collect(),
    );
    let rows: Vec<Row<'_>> = pools
        .iter()
        .map(|p| (labels(&[("pool", &p.name)]), &p.counters))
        .collect();
    common(out, "lb_pool", &rows);
    upstream(out, "lb_pool", &rows);
    common(out, "lb_pool_server", &servers);
    upstream(out, "lb_pool_server", &servers);
}

/// Bucket bounds as Prometheus writes them (seconds), then `+Inf`.
pub(super) fn bucket_bounds() -> impl Iterator<Item = String> {
    BUCKETS_MS
        .iter()
        .map(|ms| format!("{}", *ms as f64 / 1000.0))
        .chain(std::iter::once("+Inf".to_string()))
}
