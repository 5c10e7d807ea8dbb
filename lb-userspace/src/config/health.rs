//! `[service.health]` and `[pool.health]`: one set of keys and rules for
//! the health checks of L4 backends and L7 servers.

use std::time::Duration;

use toml::Spanned;

use super::raw::RawHealth;
use super::{CheckKind, Checker, HealthCheck, HttpCheck, StatusMatch};

/// Health-check interval when none is given (HAProxy's `inter` default).
pub(super) const DEFAULT_HEALTH_INTERVAL: Duration = Duration::from_secs(2);
/// Shortest health-check interval; faster checks load backends for little gain.
pub(super) const MIN_HEALTH_INTERVAL: Duration = Duration::from_millis(100);
/// Longest health-check interval; beyond it a dead backend goes unnoticed too long.
pub(super) const MAX_HEALTH_INTERVAL: Duration = Duration::from_secs(3600);
/// Default `rise` (HAProxy's).
pub(super) const DEFAULT_RISE: u32 = 2;
/// Default `fall` (HAProxy's).
pub(super) const DEFAULT_FALL: u32 = 3;
/// Largest `rise` or `fall`.
pub(super) const MAX_RISE_FALL: i64 = 100;
/// HTTP status codes that pass by default: success and redirects, as HAProxy.
pub(super) const DEFAULT_STATUS: StatusMatch = StatusMatch::Range(200, 399);

impl Checker<'_> {
    /// Validates a `[service.health]` table; `None` when anything in it is wrong.
    pub(super) fn health(&mut self, raw: Spanned<RawHealth>) -> Option<HealthCheck> {
        let before = self.errors.len();
        let h = raw.into_inner();

        let http = match h.kind.as_ref().map(|k| (k, k.get_ref().as_str())) {
            None | Some((_, "tcp")) => Some(false),
            Some((_, "http")) => Some(true),
            Some((k, other)) => {
                self.at(
                    &k.span(),
                    format!("unknown health kind \"{other}\"; expected \"tcp\" or \"http\""),
                );
                None
            }
        };

        let interval = self.interval(h.interval.as_ref(), DEFAULT_HEALTH_INTERVAL, "interval");
        // HAProxy's `fastinter` and `downinter` default to `inter`.
        let fast_interval =
            interval.and_then(|i| self.interval(h.fast_interval.as_ref(), i, "fast_interval"));
        let down_interval =
            interval.and_then(|i| self.interval(h.down_interval.as_ref(), i, "down_interval"));
        // HAProxy uses `inter` when `timeout check` is unset.
        let timeout = self.timeout(h.timeout.as_ref(), interval, interval);
        let rise = self.count(h.rise.as_ref(), "rise", DEFAULT_RISE);
        let fall = self.count(h.fall.as_ref(), "fall", DEFAULT_FALL);
        let port = match &h.port {
            None => Some(None),
            Some(p) => self.port(p).map(Some),
        };

        let kind = match http {
            Some(true) => Some(CheckKind::Http(self.http_check(&h))),
            Some(false) => {
                self.no_http_fields(&h);
                Some(CheckKind::Tcp)
            }
            None => None,
        };

        if self.errors.len() != before {
            return None;
        }
        Some(HealthCheck {
            kind: kind?,
            interval: interval?,
            fast_interval: fast_interval?,
            down_interval: down_interval?,
            timeout: timeout?,
            rise: rise?,
            fall: fall?,
            port: port?,
        })
    }

    /// Refuses the http-only fields in a tcp check.
    fn no_http_fields(&mut self, h: &RawHealth) {
        for (field, span) in [
            ("method", h.method.as_ref().map(Spanned::span)),
            ("path", h.path.as_ref().map(Spanned::span)),
            ("host", h.host.as_ref().map(Spanned::span)),
            ("status", h.status.as_ref().map(Spanned::span)),
            ("body", h.body.as_ref().map(Spanned::span)),
        ] {
            if let Some(span) = span {
                self.at(
                    &span,
                    format!("`{field}` only applies to kind = \"http\"; this check is \"tcp\""),
                );
            }
        }
    }

    /// Checks the time between two checks or DNS rounds: 100ms..=1h,
    /// `default` when absent.
    pub(super) fn interval(
        &mut self,
        value: Option<&Spanned<String>>,
        default: Duration,
        key: &str,
    ) -> Option<Duration> {
        let Some(i) = value else {
            return Some(default);
        };
        let d = self.duration(i, key)?;
        if (MIN_HEALTH_INTERVAL..=MAX_HEALTH_INTERVAL).contains(&d) {
            return Some(d);
        }
        self.at(
            &i.span(),
            format!(
                "{key} \"{}\" is out of range; expected 100ms..=1h",
                i.get_ref()
            ),
        );
        None
    }

    /// Checks the limit on one check or DNS round: above zero and at most
    /// `interval` (one still running when the next is due would overlap
    /// it); `default` when absent.
    pub(super) fn timeout(
        &mut self,
        value: Option<&Spanned<String>>,
        interval: Option<Duration>,
        default: Option<Duration>,
    ) -> Option<Duration> {
        let Some(t) = value else {
            return default;
        };
        let d = self.duration(t, "timeout")?;
        if d.is_zero() {
            self.at(&t.span(), "timeout must be greater than zero");
            return None;
        }
        if let Some(interval) = interval.filter(|&i| d > i) {
            self.at(
                &t.span(),
                format!(
                    "timeout {d:?} is longer than the interval {interval:?}; it must be <= interval"
                ),
            );
            return None;
        }
        Some(d)
    }

    /// Checks a port: 1..=65535.
    pub(super) fn port(&mut self, value: &Spanned<i64>) -> Option<u16> {
        match u16::try_from(*value.get_ref()) {
            Ok(port) if port > 0 => Some(port),
            _ => {
                self.at(
                    &value.span(),
                    format!(
                        "port {} is out of range; expected 1..=65535",
                        value.get_ref()
                    ),
                );
                None
            }
        }
    }

    /// Validates the http-only fields; errors are recorded, defaults fill the gaps.
    pub(super) fn http_check(&mut self, h: &RawHealth) -> HttpCheck {
        let method = match &h.method {
            None => "GET".to_string(),
            Some(m) => {
                let s = m.get_ref();
                if s.is_empty() || !s.chars().all(|c| c.is_ascii_uppercase()) {
                    self.at(
                        &m.span(),
                        format!("method \"{s}\" is not an uppercase token; expected e.g. \"GET\" or \"HEAD\""),
                    );
                }
                s.clone()
            }
        };
        let path = match &h.path {
            None => "/".to_string(),
            Some(p) => {
                let s = p.get_ref();
                if !s.starts_with('/') {
                    self.at(&p.span(), format!("path \"{s}\" must start with '/'"));
                } else if has_space_or_control(s) {
                    // It goes into the request line verbatim.
                    self.at(
                        &p.span(),
                        format!("path \"{s}\" must not contain spaces or control characters"),
                    );
                }
                s.clone()
            }
        };
        let host = h.host.as_ref().map(|v| {
            let s = v.get_ref();
            if s.is_empty() || has_space_or_control(s) {
                // It goes into a header line verbatim.
                self.at(
                    &v.span(),
                    format!("host \"{s}\" must be non-empty without spaces or control characters"),
                );
            }
            s.clone()
        });
        let status = h
            .status
            .as_ref()
            .map_or(DEFAULT_STATUS, |s| self.status(s).unwrap_or(DEFAULT_STATUS));
        HttpCheck {
            method,
            path,
            host,
            status,
            body: h.body.as_ref().map(|b| b.get_ref().clone()),
        }
    }

    /// Parses `status`: "200-399", "200", 200 or [200, 204].
    pub(super) fn status(&mut self, value: &Spanned<toml::Value>) -> Option<StatusMatch> {
        let span = value.span();
        let result = match value.get_ref() {
            toml::Value::String(s) => {
                let (lo, hi) = s.split_once('-').unwrap_or((s, s));
                match (lo.trim().parse::<i64>(), hi.trim().parse::<i64>()) {
                    (Ok(lo), Ok(hi)) if !valid_status(lo) || !valid_status(hi) => Err(format!(
                        "status range \"{s}\" is out of range; codes are 100..=599"
                    )),
                    (Ok(lo), Ok(hi)) if lo > hi => Err(format!(
                        "status range \"{s}\" is backwards; expected \"low-high\""
                    )),
                    (Ok(lo), Ok(hi)) => Ok(StatusMatch::Range(lo as u16, hi as u16)),
                    _ => Err(format!(
                        "status \"{s}\" is not a range; expected e.g. \"200-399\" or a list such as [200, 204]"
                    )),
                }
            }
            toml::Value::Integer(code) => status_list(std::slice::from_ref(value.get_ref()))
                .map_err(|_| format!("status {code} is out of range; codes are 100..=599")),
            toml::Value::Array(codes) if codes.is_empty() => {
                Err("status list is empty; list at least one code".to_string())
            }
            toml::Value::Array(codes) => status_list(codes),
            other => Err(format!(
                "status must be a range string or a list of codes, not a {}",
                other.type_str()
            )),
        };
        result.map_err(|reason| self.at(&span, reason)).ok()
    }

    /// Validates `rise` or `fall`: 1..=100, `default` when absent.
    pub(super) fn count(
        &mut self,
        value: Option<&Spanned<i64>>,
        what: &str,
        default: u32,
    ) -> Option<u32> {
        let Some(v) = value else {
            return Some(default);
        };
        let n = *v.get_ref();
        if (1..=MAX_RISE_FALL).contains(&n) {
            Some(n as u32)
        } else {
            self.at(
                &v.span(),
                format!("{what} {n} is out of range; expected 1..=100"),
            );
            None
        }
    }
}

pub(super) fn valid_status(code: i64) -> bool {
    (100..=599).contains(&code)
}

/// Turns a list of TOML values into a status list, or says which element is wrong.
pub(super) fn status_list(codes: &[toml::Value]) -> Result<StatusMatch, String> {
    codes
        .iter()
        .map(|c| match c {
            toml::Value::Integer(n) if valid_status(*n) => Ok(*n as u16),
            toml::Value::Integer(n) => {
                Err(format!("status {n} is out of range; codes are 100..=599"))
            }
            other => Err(format!(
                "status list holds a {}; expected integer codes such as [200, 204]",
                other.type_str()
            )),
        })
        .collect::<Result<Vec<_>, _>>()
        .map(StatusMatch::List)
}

pub(super) fn has_space_or_control(s: &str) -> bool {
    s.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::config::*;

    /// The minimal service plus a `[service.health]` table on line 7, its fields from line 8.
    fn with_health(fields: &[&'static str]) -> Vec<&'static str> {
        let mut lines = svc(&["[service.health]"]);
        lines.extend_from_slice(fields);
        lines
    }

    fn health_of(fields: &[&'static str]) -> HealthCheck {
        let c = parse(&text(&with_health(fields)), "f").unwrap();
        c.services[0].health.clone().unwrap()
    }

    #[test]
    fn health_defaults() {
        assert_eq!(
            parse(&text(&svc(&[])), "f").unwrap().services[0].health,
            None
        );
        assert_eq!(
            health_of(&[]),
            HealthCheck {
                kind: CheckKind::Tcp,
                interval: Duration::from_secs(2),
                fast_interval: Duration::from_secs(2),
                down_interval: Duration::from_secs(2),
                timeout: Duration::from_secs(2),
                rise: 2,
                fall: 3,
                port: None,
            }
        );
        let h = health_of(&["kind = \"http\"", "interval = \"500ms\""]);
        assert_eq!(
            h.timeout,
            Duration::from_millis(500),
            "timeout defaults to the interval"
        );
        assert_eq!(
            h.kind,
            CheckKind::Http(HttpCheck {
                method: "GET".into(),
                path: "/".into(),
                host: None,
                status: StatusMatch::Range(200, 399),
                body: None,
            })
        );
    }

    #[test]
    fn health_full_http() {
        let h = health_of(&[
            "kind = \"http\"",
            "interval = \"1m\"",
            "timeout = \"1s\"",
            "rise = 1",
            "fall = 100",
            "method = \"HEAD\"",
            "path = \"/health?full=1\"",
            "host = \"example.org\"",
            "status = [200, 204]",
            "body = \"ok\"",
        ]);
        assert_eq!(
            h,
            HealthCheck {
                kind: CheckKind::Http(HttpCheck {
                    method: "HEAD".into(),
                    path: "/health?full=1".into(),
                    host: Some("example.org".into()),
                    status: StatusMatch::List(vec![200, 204]),
                    body: Some("ok".into()),
                }),
                interval: Duration::from_secs(60),
                fast_interval: Duration::from_secs(60),
                down_interval: Duration::from_secs(60),
                timeout: Duration::from_secs(1),
                rise: 1,
                fall: 100,
                port: None,
            }
        );
    }

    #[test]
    fn health_inline_table() {
        let lines = svc(&[]);
        let mut lines = lines[..4].to_vec();
        lines.push("health = { kind = \"tcp\", rise = 0 }");
        lines.push("[[service.backend]]");
        lines.push("address = \"198.18.2.11:8080\"");
        expect_one(&lines, 5, "rise 0 is out of range");
    }

    #[test]
    fn health_status_forms() {
        for (status, expected) in [
            ("status = \"200-299\"", StatusMatch::Range(200, 299)),
            ("status = \"204\"", StatusMatch::Range(204, 204)),
            ("status = 204", StatusMatch::List(vec![204])),
            ("status = [200, 301]", StatusMatch::List(vec![200, 301])),
        ] {
            let fields = ["kind = \"http\"", status];
            match health_of(&fields).kind {
                CheckKind::Http(h) => assert_eq!(h.status, expected, "{status}"),
                CheckKind::Tcp => panic!("not http"),
            }
        }
    }

    #[test]
    fn status_matches() {
        let range = StatusMatch::Range(200, 399);
        assert!(range.matches(200) && range.matches(399) && range.matches(302));
        assert!(!range.matches(199) && !range.matches(400) && !range.matches(503));
        let list = StatusMatch::List(vec![200, 204]);
        assert!(list.matches(204) && !list.matches(201));
    }

    #[test]
    fn health_kind_rules() {
        expect_one(
            &with_health(&["kind = \"icmp\""]),
            8,
            "unknown health kind \"icmp\"; expected \"tcp\" or \"http\"",
        );
    }

    #[test]
    fn health_duration_rules() {
        for (field, needle) in [
            ("interval = \"2\"", "interval \"2\" is not a duration"),
            ("interval = \"2 s\"", "is not a duration"),
            ("interval = \"1.5s\"", "is not a duration"),
            ("interval = \"s\"", "is not a duration"),
            ("interval = \"2d\"", "is not a duration"),
            ("interval = \"99999999999999999999ms\"", "is not a duration"),
            ("interval = \"99ms\"", "out of range; expected 100ms..=1h"),
            ("interval = \"61m\"", "out of range; expected 100ms..=1h"),
            ("timeout = \"soon\"", "timeout \"soon\" is not a duration"),
            ("timeout = \"0ms\"", "greater than zero"),
            (
                "timeout = \"3s\"",
                "longer than the interval 2s; it must be <= interval",
            ),
        ] {
            expect_one(&with_health(&[field]), 8, needle);
        }
        let h = health_of(&["interval = \"1h\"", "timeout = \"100ms\""]);
        assert_eq!(h.interval, Duration::from_secs(3600));
        assert_eq!(h.timeout, Duration::from_millis(100));
        assert_eq!(
            health_of(&["interval = \"100ms\""]).interval,
            Duration::from_millis(100)
        );
        // Equal to the interval is allowed.
        health_of(&["interval = \"1s\"", "timeout = \"1000ms\""]);
        // The comparison uses the given interval, on the timeout's line.
        expect_one(
            &with_health(&["interval = \"500ms\"", "timeout = \"1s\""]),
            9,
            "longer than the interval 500ms",
        );
        expect_one(&with_health(&["interval = 2"]), 8, "invalid type");
    }

    #[test]
    fn udp_health_checks_need_a_tcp_port() {
        let base = "interfaces = [\"eth0\"]\n[[service]]\nname = \"dns\"\nvip = \"198.18.100.1:53\"\nprotocol = \"udp\"\n[[service.backend]]\naddress = \"198.18.2.11:53\"\n[service.health]\nkind = \"tcp\"\n";
        let errs = parse(base, "t.toml").unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!(errs.0[0].line, 8);
        assert!(errs.0[0].reason.contains("need `port`"), "{errs}");
        let ok = parse(&format!("{base}port = 8080\n"), "t.toml").unwrap();
        assert_eq!(ok.services[0].health.as_ref().unwrap().port, Some(8080));
        let errs = parse(&format!("{base}port = 70000\n"), "t.toml").unwrap_err();
        assert!(errs.0[0].reason.contains("out of range"), "{errs}");
    }

    #[test]
    fn health_rise_fall_rules() {
        for (field, needle) in [
            ("rise = 0", "rise 0 is out of range; expected 1..=100"),
            ("rise = 101", "rise 101 is out of range"),
            ("fall = 0", "fall 0 is out of range"),
            ("fall = -3", "fall -3 is out of range"),
        ] {
            expect_one(&with_health(&[field]), 8, needle);
        }
    }

    #[test]
    fn fast_and_down_intervals_default_to_the_interval_and_share_its_range() {
        let h = health_of(&["interval = \"5s\"", "fast_interval = \"500ms\""]);
        assert_eq!(
            (h.interval, h.fast_interval, h.down_interval),
            (
                Duration::from_secs(5),
                Duration::from_millis(500),
                Duration::from_secs(5)
            )
        );
        let h = health_of(&["down_interval = \"1m\""]);
        assert_eq!(
            (h.fast_interval, h.down_interval),
            (Duration::from_secs(2), Duration::from_secs(60))
        );
        for (field, needle) in [
            (
                "fast_interval = \"10ms\"",
                "fast_interval \"10ms\" is out of range",
            ),
            (
                "down_interval = \"2h\"",
                "down_interval \"2h\" is out of range",
            ),
            (
                "down_interval = \"soon\"",
                "down_interval \"soon\" is not a duration",
            ),
        ] {
            expect_one(&with_health(&[field]), 8, needle);
        }
    }

    #[test]
    fn health_http_fields_need_http() {
        for field in [
            "method = \"GET\"",
            "path = \"/\"",
            "host = \"a\"",
            "status = 200",
            "body = \"ok\"",
        ] {
            expect_one(&with_health(&[field]), 8, "only applies to kind = \"http\"");
            let mut explicit = vec!["kind = \"tcp\""];
            explicit.push(field);
            expect_one(
                &with_health(&explicit),
                9,
                "only applies to kind = \"http\"",
            );
        }
    }

    #[test]
    fn health_http_field_rules() {
        for (field, needle) in [
            (
                "method = \"get\"",
                "method \"get\" is not an uppercase token",
            ),
            ("method = \"\"", "is not an uppercase token"),
            ("method = \"GET /\"", "is not an uppercase token"),
            ("path = \"health\"", "path \"health\" must start with '/'"),
            ("path = \"\"", "must start with '/'"),
            ("path = \"/a b\"", "must not contain spaces"),
            ("host = \"a\\r\\nX: y\"", "control characters"),
            ("host = \"\"", "must be non-empty"),
            ("status = \"99-200\"", "out of range; codes are 100..=599"),
            ("status = \"200-600\"", "out of range; codes are 100..=599"),
            ("status = \"399-200\"", "is backwards"),
            ("status = \"2xx\"", "is not a range"),
            ("status = \"200-\"", "is not a range"),
            ("status = 600", "status 600 is out of range"),
            ("status = [200, 99]", "status 99 is out of range"),
            ("status = [\"200\"]", "status list holds a string"),
            ("status = []", "status list is empty"),
            ("status = true", "not a boolean"),
        ] {
            expect_one(&with_health(&["kind = \"http\"", field]), 9, needle);
        }
    }

    #[test]
    fn health_reports_every_mistake() {
        let errs = errors(&with_health(&[
            "kind = \"http\"",
            "interval = \"10ms\"",
            "rise = 0",
            "path = \"x\"",
            "status = \"500-400\"",
        ]));
        let got: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(got, [9, 10, 11, 12], "{errs:#?}");
    }

    #[test]
    fn health_unknown_field() {
        expect_one(
            &with_health(&["intervall = \"2s\""]),
            8,
            "unknown field `intervall`",
        );
    }
}
