//! `[service.discovery]` and `[pool.discovery]`: backends found in DNS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::ops::Range;
use std::time::Duration;

use toml::Spanned;

use super::health::{MAX_HEALTH_INTERVAL, MIN_HEALTH_INTERVAL};
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

        let name = match &d.name {
            None => {
                self.at(
                    &span,
                    "discovery has no `name`; give the DNS name to query, e.g. \"_http._tcp.web.example.org\"",
                );
                None
            }
            Some(n) => match dns_name(n.get_ref()) {
                Ok(fqdn) => Some(fqdn),
                Err(why) => {
                    self.at(&n.span(), format!("name \"{}\" {why}", n.get_ref()));
                    None
                }
            },
        };

        let record = match d.kind.as_ref().map(|k| (k, k.get_ref().as_str())) {
            None | Some((_, "srv")) => Some(RecordKind::Srv),
            Some((k, kind @ ("a" | "aaaa"))) => {
                let record = if kind == "a" {
                    RecordKind::A
                } else {
                    RecordKind::Aaaa
                };
                // NAT does not translate families: the records must be the VIP's.
                match vip {
                    Some(vip) if vip.is_ipv4() != (record == RecordKind::A) => {
                        self.at(
                            &k.span(),
                            format!(
                                "type \"{kind}\" finds {} addresses but the VIP {vip} is {}; use type = \"{}\"",
                                if record == RecordKind::A { "IPv4" } else { "IPv6" },
                                family(vip),
                                if vip.is_ipv4() { "a" } else { "aaaa" }
                            ),
                        );
                        None
                    }
                    _ => Some(record),
                }
            }
            Some((k, other)) => {
                self.at(
                    &k.span(),
                    format!(
                        "unknown discovery type \"{other}\"; expected \"srv\", \"a\" or \"aaaa\""
                    ),
                );
                None
            }
        };

        let nameservers = self.nameservers(d.nameservers.as_ref(), &span);

        let interval = match &d.interval {
            None => Some(DEFAULT_DISCOVERY_INTERVAL),
            Some(i) => self.duration(i, "interval").and_then(|v| {
                if (MIN_HEALTH_INTERVAL..=MAX_HEALTH_INTERVAL).contains(&v) {
                    Some(v)
                } else {
                    self.at(
                        &i.span(),
                        format!(
                            "interval \"{}\" is out of range; expected 100ms..=1h",
                            i.get_ref()
                        ),
                    );
                    None
                }
            }),
        };
        let timeout = match &d.timeout {
            None => interval.map(|i| i.min(DEFAULT_DISCOVERY_TIMEOUT)),
            Some(t) => self.duration(t, "timeout").and_then(|v| {
                if v.is_zero() {
                    self.at(&t.span(), "timeout must be greater than zero");
                    None
                } else if let Some(interval) = interval.filter(|&i| v > i) {
                    // A round still running when the next is due would overlap it.
                    self.at(
                        &t.span(),
                        format!(
                            "timeout {v:?} is longer than the interval {interval:?}; it must be <= interval"
                        ),
                    );
                    None
                } else {
                    Some(v)
                }
            }),
        };
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
                let port = match &d.port {
                    None => {
                        self.at(
                            &span,
                            "discovery of address records needs `port`, the port of every address found",
                        );
                        None
                    }
                    Some(p) if (1..=65535).contains(p.get_ref()) => {
                        let port = *p.get_ref() as u16;
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
                    Some(p) => {
                        self.at(
                            &p.span(),
                            format!("port {} is out of range; expected 1..=65535", p.get_ref()),
                        );
                        None
                    }
                };
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
