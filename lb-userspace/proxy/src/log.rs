//! Access log: one record per request, rendered like HAProxy's `httplog` or as JSON.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::{Method, Uri, Version};

use tokio::sync::watch;

use crate::error::{Failure, Phase};
use crate::stats::{Counters, Outcome, Tally};

/// How a frontend writes its access log lines (`log_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// HAProxy's httplog line (`AccessRecord::httplog`).
    #[default]
    Httplog,
    /// One JSON object per line (`AccessRecord::json`).
    Json,
}

/// One request as logged; times in milliseconds, -1 when not reached or not measured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessRecord {
    /// Client address.
    pub client: SocketAddr,
    /// When the request started (after its head arrived).
    pub date: SystemTime,
    /// Frontend name.
    pub frontend: Arc<str>,
    /// Pool name, `<NOPOOL>` when none.
    pub pool: Arc<str>,
    /// Server address, `<NOSRV>` when none.
    pub server: Arc<str>,
    /// Tq: waiting for the request head, idle time since the previous response included.
    pub tq: i64,
    /// Tw: time spent in the pool's queue waiting for a server below its `maxconn`.
    pub tw: i64,
    /// Tc: time to connect (-1: the pooled client does not report it).
    pub tc: i64,
    /// Tr: from sending the request to the server's response head.
    pub tr: i64,
    /// Tt: whole request, until the last response byte.
    pub tt: i64,
    /// Status sent to the client.
    pub status: u16,
    /// Response body bytes sent to the client.
    pub bytes: u64,
    /// Request body bytes, as its Content-Length declares (0 otherwise).
    pub bytes_in: u64,
    /// Two HAProxy termination characters: who ended the session, in which phase.
    pub termination: [char; 2],
    /// A `tcp` frontend's session (logged as HAProxy's tcplog), not a request.
    pub tcp: bool,
    /// HAProxy's persistence cookie characters (pools with `cookie`): what
    /// the request's said (`N` none, `I` no such server, `D` its server was
    /// away, `V` valid) and whether the response set one (`I`) or not (`N`);
    /// `--` for pools without one.
    pub persistence: [char; 2],
    /// Request method; None for a request that could not be parsed (`<BADREQ>`).
    pub method: Option<Method>,
    /// Request URI, logged as its path and query; None when there is none.
    pub uri: Option<Uri>,
    /// HTTP version, logged as `HTTP/1.1`, `HTTP/2.0`, ...; None when unknown.
    pub version: Option<Version>,
    /// Its unique ID, on frontends with `request_id_header`.
    pub request_id: Option<RequestId>,
    /// The counters the request adds to when it is finished (`crate::stats`).
    pub(crate) tally: Tally,
}

/// A request's unique ID: 128 random bits, written as 32 hex digits (as
/// nginx's `$request_id`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestId([u64; 2]);

impl RequestId {
    /// A fresh one, from this thread's CSPRNG (rand's ChaCha, seeded by
    /// the OS): unique, and no ID tells another.
    pub fn new() -> Self {
        RequestId::from(rand::random::<u128>())
    }
}

impl From<u128> for RequestId {
    fn from(v: u128) -> Self {
        RequestId([(v >> 64) as u64, v as u64])
    }
}

impl Default for RequestId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}{:016x}", self.0[0], self.0[1])
    }
}

/// Whether anyone subscribes to access log records.
pub(crate) fn enabled() -> bool {
    tracing::enabled!(target: "access", tracing::Level::INFO)
}

/// Pool and server of a request that reached neither.
pub(crate) fn no_pool() -> Arc<str> {
    static NAME: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| Arc::from("<NOPOOL>")).clone()
}

/// Server of a request that reached none.
pub(crate) fn no_server() -> Arc<str> {
    static NAME: std::sync::OnceLock<Arc<str>> = std::sync::OnceLock::new();
    NAME.get_or_init(|| Arc::from("<NOSRV>")).clone()
}

impl AccessRecord {
    /// A record of `client` on `frontend` (for `pool`) before anything
    /// happened: no server, request, status, bytes or times (Tw 0), counted
    /// nowhere yet; its date is set when it is emitted.
    pub(crate) fn begin(client: SocketAddr, frontend: Arc<str>, pool: Arc<str>) -> Self {
        AccessRecord {
            client,
            date: UNIX_EPOCH,
            frontend,
            pool,
            server: no_server(),
            tq: -1,
            tw: 0,
            tc: -1,
            tr: -1,
            tt: -1,
            status: 0,
            bytes: 0,
            bytes_in: 0,
            termination: ['-', '-'],
            persistence: ['-', '-'],
            tcp: false,
            method: None,
            uri: None,
            version: None,
            request_id: None,
            tally: Tally::default(),
        }
    }

    /// The record of a request refused before it was parsed (400, 408).
    pub(crate) fn bad_request(
        client: SocketAddr,
        frontend: Arc<str>,
        failure: Failure,
        bytes: u64,
    ) -> Self {
        AccessRecord {
            date: SystemTime::now(),
            tw: -1,
            status: failure.status().as_u16(),
            bytes,
            termination: failure.termination(),
            ..AccessRecord::begin(client, frontend, no_pool())
        }
    }

    /// Adds the finished request to the counters it reached.
    pub(crate) fn count(&self) {
        self.tally.count(&Outcome {
            status: self.status,
            bytes_in: self.bytes_in,
            bytes: self.bytes,
            tw: self.tw,
            tc: self.tc,
            tr: self.tr,
            tt: self.tt,
            denied: self.termination == ['P', 'R'],
        });
    }

    /// Counts the record in its frontend's counters (a request refused
    /// before a pool was chosen).
    pub(crate) fn counted_in(mut self, frontend: &Counters) -> Self {
        self.tally.frontend = Some(frontend.shard());
        self.count();
        self
    }

    /// The status as logged: -1 for a request that got no answer (HAProxy's).
    fn logged_status(&self) -> i32 {
        match self.status {
            0 => -1,
            s => i32::from(s),
        }
    }

    /// The method as logged.
    pub fn method_text(&self) -> &str {
        self.method.as_ref().map_or("<BADREQ>", Method::as_str)
    }

    /// The URI as logged: path and query (origin-form, as the server got it).
    pub fn uri_text(&self) -> std::borrow::Cow<'_, str> {
        match &self.uri {
            Some(u) => crate::acl::origin_target(u),
            None => "".into(),
        }
    }

    /// The version as logged.
    pub fn version_text(&self) -> &'static str {
        match self.version {
            None => "",
            Some(Version::HTTP_09) => "HTTP/0.9",
            Some(Version::HTTP_10) => "HTTP/1.0",
            Some(Version::HTTP_11) => "HTTP/1.1",
            Some(Version::HTTP_2) => "HTTP/2.0",
            Some(Version::HTTP_3) => "HTTP/3.0",
            Some(_) => "HTTP/?",
        }
    }

    /// The HAProxy httplog line:
    /// `ip:port [date] frontend pool/server Tq/Tw/Tc/Tr/Tt status bytes term "METHOD URI VERSION"`.
    pub fn httplog(&self) -> String {
        let mut s = String::with_capacity(160);
        let _ = write!(
            s,
            "{} [{}] {} {}/{} {}/{}/{}/{}/{} {} {} {}{}{}{} ",
            self.client,
            haproxy_date(self.date),
            self.frontend,
            self.pool,
            self.server,
            self.tq,
            self.tw,
            self.tc,
            self.tr,
            self.tt,
            self.logged_status(),
            self.bytes,
            self.termination[0],
            self.termination[1],
            self.persistence[0],
            self.persistence[1],
        );
        // Like a capture of HAProxy's: in braces before the request.
        if let Some(id) = self.request_id {
            let _ = write!(s, "{{{id}}} ");
        }
        let _ = write!(
            s,
            "\"{} {} {}\"",
            self.method_text(),
            self.uri_text(),
            self.version_text()
        );
        s
    }

    /// A `tcp` session as HAProxy's tcplog line: client, date, frontend,
    /// pool/server, Tw/Tc/Tt, bytes from the server, termination.
    pub fn tcplog(&self) -> String {
        format!(
            "{} [{}] {} {}/{} {}/{}/{} {} {}{}",
            self.client,
            haproxy_date(self.date),
            self.frontend,
            self.pool,
            self.server,
            self.tw,
            self.tc,
            self.tt,
            self.bytes,
            self.termination[0],
            self.termination[1],
        )
    }

    /// The same record as a JSON object.
    pub fn json(&self) -> serde_json::Value {
        let ms = self
            .date
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let mut j = serde_json::json!({
            "client_ip": self.client.ip().to_string(),
            "client_port": self.client.port(),
            "date": haproxy_date(self.date),
            "timestamp_ms": ms,
            "frontend": &*self.frontend,
            "pool": &*self.pool,
            "server": &*self.server,
            "tw": self.tw,
            "tc": self.tc,
            "tt": self.tt,
            "bytes": self.bytes,
        });
        let [t0, t1] = self.termination;
        let more = if self.tcp {
            // A session: no request, status, persistence or request times.
            serde_json::json!({
                "bytes_in": self.bytes_in,
                "termination_state": format!("{t0}{t1}"),
                "mode": "tcp",
            })
        } else {
            let [p0, p1] = self.persistence;
            serde_json::json!({
                "tq": self.tq,
                "tr": self.tr,
                "status": self.logged_status(),
                "termination_state": format!("{t0}{t1}{p0}{p1}"),
                "method": self.method_text(),
                "uri": self.uri_text(),
                "version": self.version_text(),
            })
        };
        if let (Some(j), serde_json::Value::Object(more)) = (j.as_object_mut(), more) {
            j.extend(more);
            if let Some(id) = self.request_id {
                j.insert("request_id".into(), id.to_string().into());
            }
        }
        j
    }

    /// Completes the record of a request that took `tt` (Tt, and its date:
    /// when it started) and emits it in `format`.
    pub(crate) fn finish(mut self, tt: std::time::Duration, format: LogFormat) {
        self.tt = tt.as_millis() as i64;
        self.count();
        // No clock read for a record nobody logs.
        if enabled() {
            self.date = SystemTime::now().checked_sub(tt).unwrap_or(UNIX_EPOCH);
            self.emit_as(format);
        }
    }

    /// Emits the record as an httplog line under `tracing` target `access`.
    pub fn emit(&self) {
        self.emit_as(LogFormat::Httplog);
    }

    /// Emits the record in `format` under `tracing` target `access`.
    pub fn emit_as(&self, format: LogFormat) {
        // Formatting the line is most of a log's cost: skip it when nobody listens.
        if !enabled() {
            return;
        }
        let line = match format {
            LogFormat::Httplog if self.tcp => self.tcplog(),
            LogFormat::Httplog => self.httplog(),
            LogFormat::Json => self.json().to_string(),
        };
        tracing::info!(target: "access", "{line}");
    }
}

/// A forwarded request's record until its answer (or its failure) takes
/// it. Dropped with the record still in it, it logs the request as ended
/// there: the proxy's runtime went away at a hard stop (`K`), or the
/// client did (`C`: hyper dropped the exchange of an HTTP/1 client that
/// closed, an HTTP/2 stream's aborted exchange), then the phase it was in
/// (queue, connect, request body, response head). Without it such
/// requests left no line and no count.
pub(crate) struct Unfinished {
    /// Some until taken by [`Unfinished::into_record`] (or the drop).
    rec: Option<AccessRecord>,
    /// Where the request is now: the second letter if it is dropped.
    pub phase: Phase,
    start: Instant,
    format: LogFormat,
    /// The frontend's hard stop flag.
    kill: watch::Receiver<bool>,
}

impl Unfinished {
    /// Guards `rec`, a request of a frontend logging in `format` whose
    /// hard stop is `kill`, started at `start`.
    pub(crate) fn new(
        rec: AccessRecord,
        start: Instant,
        format: LogFormat,
        kill: &watch::Receiver<bool>,
    ) -> Self {
        Unfinished {
            rec: Some(rec),
            phase: Phase::Queue,
            start,
            format,
            kill: kill.clone(),
        }
    }

    /// The record, for whoever finishes it now.
    pub(crate) fn into_record(mut self) -> AccessRecord {
        self.rec.take().expect(TAKEN)
    }
}

impl From<Unfinished> for AccessRecord {
    fn from(guard: Unfinished) -> AccessRecord {
        guard.into_record()
    }
}

/// Only `into_record`, which consumes the guard, and the drop take it.
const TAKEN: &str = "an Unfinished record is taken once, as it ends";

impl std::ops::Deref for Unfinished {
    type Target = AccessRecord;
    fn deref(&self) -> &AccessRecord {
        self.rec.as_ref().expect(TAKEN)
    }
}

impl std::ops::DerefMut for Unfinished {
    fn deref_mut(&mut self) -> &mut AccessRecord {
        self.rec.as_mut().expect(TAKEN)
    }
}

impl Drop for Unfinished {
    fn drop(&mut self) {
        if let Some(mut rec) = self.rec.take() {
            let side = if *self.kill.borrow() { 'K' } else { 'C' };
            rec.termination = [side, self.phase.letter()];
            rec.finish(self.start.elapsed(), self.format);
        }
    }
}

/// Month names as HAProxy's and syslog's dates spell them.
const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// `t` in UTC, broken down: year, month (1-12), day, hour, minute, second,
/// and the time since the second.
struct Utc {
    year: i64,
    month: u32,
    day: u32,
    hour: u64,
    minute: u64,
    second: u64,
    fraction: std::time::Duration,
}

impl Utc {
    fn of(t: SystemTime) -> Utc {
        let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
        let secs = d.as_secs();
        let (year, month, day) = civil_from_days((secs / 86_400) as i64);
        let sod = secs % 86_400;
        Utc {
            year,
            month,
            day,
            hour: sod / 3600,
            minute: sod % 3600 / 60,
            second: sod % 60,
            fraction: std::time::Duration::from_nanos(u64::from(d.subsec_nanos())),
        }
    }

    fn month_name(&self) -> &'static str {
        MONTHS[(self.month - 1) as usize]
    }
}

/// `06/Feb/2009:12:14:14.655` in UTC.
pub fn haproxy_date(t: SystemTime) -> String {
    let u = Utc::of(t);
    format!(
        "{:02}/{}/{}:{:02}:{:02}:{:02}.{:03}",
        u.day,
        u.month_name(),
        u.year,
        u.hour,
        u.minute,
        u.second,
        u.fraction.as_millis()
    )
}

/// `Dec  7 17:05:09` in UTC: a syslog (RFC 3164) line's time.
pub fn rfc3164_date(t: SystemTime) -> String {
    let u = Utc::of(t);
    format!(
        "{} {:>2} {:02}:{:02}:{:02}",
        u.month_name(),
        u.day,
        u.hour,
        u.minute,
        u.second
    )
}

/// `2026-12-07T17:05:09.123456Z` (RFC 5424's TIMESTAMP, RFC 3339 in UTC
/// with microseconds), as syslog's RFC 5424 header wants it.
pub fn rfc5424_date(t: SystemTime) -> String {
    let u = Utc::of(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:06}Z",
        u.year,
        u.month,
        u.day,
        u.hour,
        u.minute,
        u.second,
        u.fraction.as_micros()
    )
}

/// Days since 1970-01-01 to (year, month 1-12, day 1-31), Howard Hinnant's algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn record() -> AccessRecord {
        AccessRecord {
            client: "10.0.1.2:33317".parse().unwrap(),
            date: UNIX_EPOCH + Duration::from_millis(1_233_922_454_655),
            frontend: "http-in".into(),
            pool: "static".into(),
            server: "10.0.0.1:80".into(),
            tq: 10,
            tw: 0,
            tc: -1,
            tr: 20,
            tt: 30,
            status: 200,
            bytes: 2750,
            bytes_in: 0,
            termination: ['-', '-'],
            persistence: ['-', '-'],
            tcp: false,
            method: Some(Method::GET),
            uri: Some(Uri::from_static("/index.html?x=1")),
            version: Some(Version::HTTP_11),
            request_id: None,
            tally: Tally::default(),
        }
    }

    #[test]
    fn httplog_line() {
        assert_eq!(
            record().httplog(),
            "10.0.1.2:33317 [06/Feb/2009:12:14:14.655] http-in static/10.0.0.1:80 \
             10/0/-1/20/30 200 2750 ---- \"GET /index.html?x=1 HTTP/1.1\""
        );
        let with_id = AccessRecord {
            request_id: Some(RequestId::from(0xab)),
            ..record()
        };
        assert!(
            with_id.httplog().ends_with(
                " ---- {000000000000000000000000000000ab} \"GET /index.html?x=1 HTTP/1.1\""
            ),
            "{}",
            with_id.httplog()
        );
        assert_eq!(
            with_id.json()["request_id"],
            "000000000000000000000000000000ab"
        );
        assert_ne!(RequestId::new(), RequestId::new());
    }

    #[test]
    fn json_record() {
        let j = record().json();
        assert_eq!(j["client_ip"], "10.0.1.2");
        assert_eq!(j["status"], 200);
        assert_eq!(j["termination_state"], "----");
        assert_eq!(j["date"], "06/Feb/2009:12:14:14.655");
    }

    #[test]
    fn dates() {
        assert_eq!(haproxy_date(UNIX_EPOCH), "01/Jan/1970:00:00:00.000");
        // 2024-02-29 leap day.
        assert_eq!(
            haproxy_date(UNIX_EPOCH + Duration::from_secs(1_709_208_000)),
            "29/Feb/2024:12:00:00.000"
        );
    }
}
