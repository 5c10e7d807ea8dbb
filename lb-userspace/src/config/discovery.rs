//! `[service.discovery]` and `[pool.discovery]`: backends found in DNS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::health::MAX_HEALTH_INTERVAL;
use super::raw::RawDiscovery;
use super::rules::family;
use super::{Checker, DEFAULT_WEIGHT, Discovery, Forwarding, RecordKind};

/// Time between DNS discovery queries when none is given.
pub(super) const DEFAULT_DISCOVERY_INTERVAL: Duration = Duration::from_secs(5);
/// Longest default time for one discovery round (shorter when the interval is).
pub(super) const DEFAULT_DISCOVERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an empty DNS answer must last before discovered backends go
/// (HAProxy's `hold nx` default): a zone being rewritten does not empty a service.
pub(super) const DEFAULT_DISCOVERY_HOLD: Duration = Duration::from_secs(30);
/// Longest name a DNS query may carry, without the root's dot (RFC 1035).
pub(super) const MAX_DNS_NAME: usize = 253;

impl Checker<'_> {
    /// Validates a `[service.discovery]` or `[pool.discovery]` table; `vip`
    /// is the service's (pools have none); `None` when anything in it is wrong.
    pub(super) fn discovery(
        &mut self,
        raw: Spanned<RawDiscovery>,
        vip: Option<SocketAddr>,
        forwarding: Forwarding,
    ) -> Option<Discovery> {
        let before = self.errors.len();
        let span = raw.span();
        let d = raw.into_inner();

        let name = self.dns_name(d.name.as_ref(), &span);
        let record = self.record_kind(d.kind.as_ref(), vip);
        let nameservers = self.nameservers(d.nameservers.as_ref(), &span);
        let interval = self.interval(d.interval.as_ref(), DEFAULT_DISCOVERY_INTERVAL, "interval");
        let default_timeout = interval.map(|i| i.min(DEFAULT_DISCOVERY_TIMEOUT));
        let timeout = self.timeout(d.timeout.as_ref(), interval, default_timeout);
        let hold = match &d.hold {
            None => Some(DEFAULT_DISCOVERY_HOLD),
            Some(h) => self.duration(h, "hold").and_then(|v| {
                if v <= MAX_HEALTH_INTERVAL {
                    Some(v)
                } else {
                    self.at(
                        &h.span(),
                        format!("hold \"{}\" is out of range; expected 0s..=1h", h.get_ref()),
                    );
                    None
                }
            }),
        };
        let (port, weight) = match record {
            Some(RecordKind::Srv) => {
                for (field, value) in [("port", &d.port), ("weight", &d.weight)] {
                    if let Some(v) = value {
                        self.at(
                            &v.span(),
                            format!("`{field}` applies to type = \"a\" or \"aaaa\"; SRV records carry their own ports and weights"),
                        );
                    }
                }
                (None, DEFAULT_WEIGHT)
            }
            Some(_) => {
                let port = self.address_port(d.port.as_ref(), &span, vip, forwarding);
                let weight = match &d.weight {
                    None => DEFAULT_WEIGHT,
                    Some(w) => self.weight(w).unwrap_or(DEFAULT_WEIGHT),
                };
                (port, weight)
            }
            None => (None, DEFAULT_WEIGHT),
        };

        if self.errors.len() != before {
            return None;
        }
        Some(Discovery {
            name: name?,
            record: record?,
            nameservers: nameservers?,
            interval: interval?,
            timeout: timeout?,
            hold: hold?,
            port,
            weight,
        })
    }

    /// Checks the name queried and makes it fully qualified.
    fn dns_name(&mut self, raw: Option<&Spanned<String>>, table: &Range<usize>) -> Option<String> {
        let Some(n) = raw else {
            self.at(
                table,
                "discovery has no `name`; give the DNS name to query, e.g. \"_http._tcp.web.example.org\"",
            );
            return None;
        };
        dns_name(n.get_ref())
            .map_err(|why| self.at(&n.span(), format!("name \"{}\" {why}", n.get_ref())))
            .ok()
    }

    /// Checks `type`; address records must be of the VIP's family, as NAT
    /// does not translate families.
    fn record_kind(
        &mut self,
        raw: Option<&Spanned<String>>,
        vip: Option<SocketAddr>,
    ) -> Option<RecordKind> {
        let Some(k) = raw else {
            return Some(RecordKind::Srv);
        };
        let record = match k.get_ref().as_str() {
            "srv" => return Some(RecordKind::Srv),
            "a" => RecordKind::A,
            "aaaa" => RecordKind::Aaaa,
            other => {
                self.at(
                    &k.span(),
                    format!(
                        "unknown discovery type \"{other}\"; expected \"srv\", \"a\" or \"aaaa\""
                    ),
                );
                return None;
            }
        };
        match vip {
            Some(vip) if vip.is_ipv4() != (record == RecordKind::A) => {
                self.at(
                    &k.span(),
                    format!(
                        "type \"{}\" finds {} addresses but the VIP {vip} is {}; use type = \"{}\"",
                        record.as_str(),
                        if record == RecordKind::A {
                            "IPv4"
                        } else {
                            "IPv6"
                        },
                        family(vip),
                        if vip.is_ipv4() { "a" } else { "aaaa" }
                    ),
                );
                None
            }
            _ => Some(record),
        }
    }

    /// Checks the port of address records: required, and with direct
    /// server return the VIP's (the packet reaches the backend untouched).
    fn address_port(
        &mut self,
        raw: Option<&Spanned<i64>>,
        table: &Range<usize>,
        vip: Option<SocketAddr>,
        forwarding: Forwarding,
    ) -> Option<u16> {
        let Some(p) = raw else {
            self.at(
                table,
                "discovery of address records needs `port`, the port of every address found",
            );
            return None;
        };
        let port = self.port(p)?;
        if let Some(vip) = vip
            && forwarding.is_dsr()
            && port != vip.port()
        {
            self.at(
                &p.span(),
                format!(
                    "port {port} must be the VIP's port {} with forwarding = \"{}\" (the packet reaches the backend untouched)",
                    vip.port(),
                    forwarding.as_str()
                ),
            );
        }
        Some(port)
    }

    /// Checks `nameservers`: at least one, each an address with an optional
    /// port (53 by default), no duplicates.
    pub(super) fn nameservers(
        &mut self,
        raw: Option<&Spanned<Vec<Spanned<String>>>>,
        table: &Range<usize>,
    ) -> Option<Vec<SocketAddr>> {
        let Some(list) = raw else {
            // No fallback to /etc/resolv.conf: the servers asked are the ones written here.
            self.at(
                table,
                "discovery has no `nameservers`; list the DNS servers to ask, e.g. nameservers = [\"198.18.2.53\"]",
            );
            return None;
        };
        if list.get_ref().is_empty() {
            self.at(
                &list.span(),
                "`nameservers` is empty; list at least one DNS server",
            );
            return None;
        }
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        let mut out = Vec::new();
        for entry in list.get_ref() {
            let text = entry.get_ref();
            let addr = match nameserver(text) {
                Ok(a) => a,
                Err(why) => {
                    self.at(&entry.span(), format!("nameserver \"{text}\" {why}"));
                    continue;
                }
            };
            if let Some(first) = seen.get(&addr) {
                self.at(
                    &entry.span(),
                    format!("nameserver {addr} is listed twice (first on line {first})"),
                );
                continue;
            }
            seen.insert(addr, self.line(&entry.span()));
            out.push(addr);
        }
        (out.len() == list.get_ref().len()).then_some(out)
    }
}

/// Parses a nameserver: "ip", "ip:port" or "[ipv6]:port"; port 53 by default.
fn nameserver(text: &str) -> Result<SocketAddr, String> {
    let addr = match text.parse::<SocketAddr>() {
        Ok(a) => a,
        Err(_) => match text.parse::<std::net::IpAddr>() {
            Ok(ip) => SocketAddr::new(ip, 53),
            Err(_) => {
                return Err(
                    "is not an address; expected \"a.b.c.d\", \"a.b.c.d:port\", \"ipv6\" or \"[ipv6]:port\""
                        .into(),
                );
            }
        },
    };
    if addr.port() == 0 {
        Err("has port 0".into())
    } else if addr.ip().is_unspecified() || addr.ip().is_multicast() {
        Err("is not a unicast address".into())
    } else {
        Ok(addr)
    }
}

/// Checks a DNS name (labels of letters, digits, '-' and '_', which SRV
/// names use) and returns it fully qualified, with the root's dot.
fn dns_name(text: &str) -> Result<String, &'static str> {
    let bare = text.strip_suffix('.').unwrap_or(text);
    if bare.is_empty() {
        return Err("is empty; give the DNS name to query");
    }
    if bare.len() > MAX_DNS_NAME {
        return Err("is longer than 253 characters, the most a DNS name holds");
    }
    for label in bare.split('.') {
        if label.is_empty() {
            return Err("has an empty label (two dots in a row, or a leading dot)");
        }
        if label.len() > 63 {
            return Err("has a label longer than 63 characters");
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err("may only contain letters, digits, '-', '_' and dots");
        }
    }
    // Relative names would be completed by a search list, which discovery never uses.
    Ok(format!("{bare}."))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::config::*;

    /// A service with only a `[service.discovery]` table (lines 5.. are its keys).
    fn discovering(fields: &[&'static str]) -> Vec<&'static str> {
        let mut v = vec![
            HEAD,
            "[[service]]",
            "name = \"web\"",
            "vip = \"198.18.100.1:80\"",
            "[service.discovery]",
        ];
        v.extend_from_slice(fields);
        v
    }

    fn discovery_of(fields: &[&'static str]) -> Discovery {
        parse(&text(&discovering(fields)), "lb.toml")
            .unwrap()
            .services
            .remove(0)
            .discovery
            .expect("a discovery")
    }

    const NS: &str = "nameservers = [\"198.18.2.241\"]";

    #[test]
    fn discovery_defaults_and_full_form() {
        let d = discovery_of(&["name = \"_http._tcp.web.lab.test\"", NS]);
        assert_eq!(
            d,
            Discovery {
                name: "_http._tcp.web.lab.test.".into(),
                record: RecordKind::Srv,
                nameservers: vec!["198.18.2.241:53".parse().unwrap()],
                interval: Duration::from_secs(5),
                timeout: Duration::from_secs(2),
                hold: Duration::from_secs(30),
                port: None,
                weight: 1,
            }
        );
        let d = discovery_of(&[
            "name = \"web.lab.test.\"",
            "type = \"a\"",
            "nameservers = [\"198.18.2.241:5353\", \"[fd00:18:2::241]:53\", \"fd00::53\"]",
            "interval = \"500ms\"",
            "hold = \"0s\"",
            "port = 8080",
            "weight = 3",
        ]);
        assert_eq!(d.name, "web.lab.test.");
        assert_eq!(d.record, RecordKind::A);
        assert_eq!(d.nameservers.len(), 3);
        assert_eq!(d.nameservers[2], "[fd00::53]:53".parse().unwrap());
        // The timeout defaults to the interval when that is shorter than 2s.
        assert_eq!(
            (d.interval, d.timeout, d.hold),
            (
                Duration::from_millis(500),
                Duration::from_millis(500),
                Duration::ZERO
            )
        );
        assert_eq!((d.port, d.weight), (Some(8080), 3));
    }

    #[test]
    fn a_service_with_discovery_needs_no_static_backend_and_may_have_some() {
        let c = parse(
            &text(&discovering(&["name = \"_http._tcp.web.lab.test\"", NS])),
            "lb.toml",
        )
        .unwrap();
        assert!(c.services[0].backends.is_empty());
        let mut lines = svc(&[]);
        lines.extend(["[service.discovery]", "name = \"web.lab.test\"", NS]);
        let c = parse(&text(&lines), "lb.toml").unwrap();
        assert_eq!(c.services[0].backends.len(), 1);
        assert!(c.services[0].discovery.is_some());
    }

    #[test]
    fn discovery_rules_with_their_lines() {
        let name = "name = \"_http._tcp.web.lab.test\"";
        expect_one(&discovering(&[NS]), 5, "has no `name`");
        expect_one(&discovering(&[name]), 5, "has no `nameservers`");
        expect_one(
            &discovering(&[name, "nameservers = []"]),
            7,
            "`nameservers` is empty",
        );
        for (bad, why) in [
            ("name = \"\"", "is empty"),
            ("name = \"a..b\"", "empty label"),
            ("name = \"web lab\"", "may only contain"),
            ("name = \"_http._tcp.web/lab\"", "may only contain"),
        ] {
            expect_one(&discovering(&[bad, NS]), 6, why);
        }
        let long = format!("name = \"{}.test\"", "a".repeat(64));
        let lines: Vec<&str> = discovering(&[NS])
            .into_iter()
            .chain([long.as_str()])
            .collect();
        expect_one(&lines, 7, "longer than 63");
        for (bad, why) in [
            ("nameservers = [\"dns.example\"]", "is not an address"),
            ("nameservers = [\"0.0.0.0\"]", "not a unicast"),
            ("nameservers = [\"198.18.2.241:0\"]", "port 0"),
            (
                "nameservers = [\"198.18.2.241\", \"198.18.2.241:53\"]",
                "listed twice",
            ),
        ] {
            expect_one(&discovering(&[name, bad]), 7, why);
        }
        for (bad, why) in [
            ("type = \"txt\"", "unknown discovery type"),
            (
                "type = \"aaaa\"",
                "the VIP 198.18.100.1:80 is IPv4; use type = \"a\"",
            ),
            ("interval = \"50ms\"", "out of range"),
            ("interval = \"soon\"", "not a duration"),
            ("timeout = \"0s\"", "greater than zero"),
            ("timeout = \"10s\"", "longer than the interval"),
            ("hold = \"2h\"", "out of range"),
            ("port = 80", "SRV records carry their own"),
            ("weight = 2", "SRV records carry their own"),
            ("ttl = 3", "unknown field `ttl`"),
        ] {
            expect_one(&discovering(&[name, NS, bad]), 8, why);
        }
        let a = "type = \"a\"";
        expect_one(&discovering(&[name, NS, a]), 5, "needs `port`");
        expect_one(
            &discovering(&[name, NS, a, "port = 70000"]),
            9,
            "out of range",
        );
        expect_one(
            &discovering(&[name, NS, a, "port = 80", "weight = -1"]),
            10,
            "out of range",
        );
    }

    #[test]
    fn dsr_discovery_of_addresses_must_use_the_vip_port() {
        let mut lines =
            discovering(&["name = \"web.lab.test\"", NS, "type = \"a\"", "port = 8080"]);
        lines.insert(4, "forwarding = \"ipip\"");
        expect_one(&lines, 10, "must be the VIP's port 80");
        lines[9] = "port = 80";
        assert!(parse(&text(&lines), "lb.toml").is_ok());
    }

    #[test]
    fn pools_have_discovery_too() {
        let t = text(&[
            HEAD,
            "[[frontend]]",
            "name = \"web\"",
            "binds = [\"198.18.100.1:80\"]",
            "default_pool = \"app\"",
            "[[pool]]",
            "name = \"app\"",
            "[pool.discovery]",
            "name = \"_http._tcp.app.lab.test\"",
            "nameservers = [\"198.18.2.241\"]",
            "interval = \"1s\"",
        ]);
        let c = parse(&t, "lb.toml").unwrap();
        assert_eq!(c.proxy.2.len(), 1);
        assert_eq!(c.proxy.2[0].0, "app");
        assert_eq!(c.proxy.2[0].1.interval, Duration::from_secs(1));
        let bad = t.replace("interval = \"1s\"", "interval = \"1 s\"");
        let errs = parse(&bad, "lb.toml").unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].line, 11);
        assert!(errs[0].reason.contains("not a duration"), "{errs:?}");
    }
}
