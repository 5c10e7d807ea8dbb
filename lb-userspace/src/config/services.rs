//! `[[service]]` and `[[service.backend]]`: the L4 side of the file. The
//! rules themselves are in [`super::rules`], shared with runtime changes.

use std::collections::HashMap;
use std::net::SocketAddr;

use lb_common::{DEFAULT_RING_SIZE, MAX_VIPS};
use toml::Spanned;

use super::raw::{RawBackend, RawHealth, RawService};
use super::{
    ADDR_FORM, BackendConfig, Checker, DEFAULT_WEIGHT, FlowHash, Forwarding, HealthCheck, Mode,
    Protocol, Service, rules,
};

/// The spellings of `protocol`, the default first.
const PROTOCOLS: &[(&str, Protocol)] = &[("tcp", Protocol::Tcp), ("udp", Protocol::Udp)];
/// The spellings of `mode`, the default first.
const MODES: &[(&str, Mode)] = &[("l4", Mode::L4), ("l7", Mode::L7)];
/// The spellings of `hash`, the default first.
const HASHES: &[(&str, FlowHash)] = &[("flow", FlowHash::Flow), ("source", FlowHash::Source)];

/// What earlier services took: names, VIPs, and the data plane's backend slots.
#[derive(Default)]
struct Taken {
    names: HashMap<String, usize>,
    vips: HashMap<(SocketAddr, Protocol), (String, usize)>,
    backends: usize,
}

impl Checker<'_> {
    /// Checks every `[[service]]`, against each other and the data plane's limits.
    pub(super) fn services(&mut self, raw: Vec<Spanned<RawService>>) -> Vec<Service> {
        // No services at all is checked once the proxy's tables are known
        // (a pure L7 file is fine).
        let mut taken = Taken::default();
        let mut services = Vec::new();
        for (index, svc) in raw.into_iter().enumerate() {
            // Reported once, at the service that crosses the limit.
            if index == MAX_VIPS as usize
                && let Err(why) = rules::service_count(index + 1)
            {
                self.at(&svc.span(), why);
            }
            services.extend(self.service(svc, &mut taken));
        }
        services
    }

    /// Checks one `[[service]]` with its backends, health check and
    /// discovery; `None` when anything in it is wrong.
    fn service(&mut self, svc: Spanned<RawService>, taken: &mut Taken) -> Option<Service> {
        let span = svc.span();
        let line = self.line(&span);
        let svc = svc.into_inner();
        let name = match &svc.name {
            None => {
                self.at(&span, "service has no `name`");
                None
            }
            Some(n) => self.service_name(n, &mut taken.names),
        };
        // Messages name the service as written even if the name itself was rejected.
        let label = svc
            .name
            .as_ref()
            .map_or_else(|| "<unnamed>".to_string(), |n| n.get_ref().clone());
        let protocol = self.choice(svc.protocol.as_ref(), "protocol", PROTOCOLS);
        let mode = self.choice(svc.mode.as_ref(), "mode", MODES);
        let forwarding = self.forwarding(svc.forwarding.as_ref(), mode, &label);
        let mss_clamp = self.mss_clamp(svc.mss_clamp.as_ref(), forwarding, &label);
        let hash = self.flow_hash(svc.hash.as_ref(), mode, &label);
        let vip = match &svc.vip {
            None => {
                self.at(&span, format!("service \"{label}\" has no `vip`"));
                None
            }
            Some(v) => self.vip(v, protocol, &label, line, &mut taken.vips),
        };
        let ring_size = match &svc.ring_size {
            None => Some(DEFAULT_RING_SIZE),
            Some(r) => self.ring_size(r),
        };
        let backends = self.backends(
            svc.backend.unwrap_or_default(),
            vip,
            forwarding.unwrap_or_default(),
            &label,
            &mut taken.backends,
        );
        // Outer None: the table is invalid (already reported); Some(None): no table.
        let discovery = match svc.discovery {
            None => Some(None),
            Some(d) => self
                .discovery(d, vip, forwarding.unwrap_or_default())
                .map(Some),
        };
        // An l4 service without backends is allowed (see `rules`): they
        // may come from `lb add backend` or a discovery.
        if let Some(ring) = ring_size {
            let active = rules::active(backends.iter().map(|b| b.weight));
            if let Err(why) = rules::ring_capacity(&label, active, ring) {
                let at = svc.ring_size.as_ref().map_or(span.clone(), Spanned::span);
                self.at(&at, why);
            }
        }
        let health = self.service_health(svc.health, protocol);
        Some(Service {
            name: name?,
            vip: vip?,
            protocol: protocol?,
            mode: mode?,
            forwarding: forwarding?,
            mss_clamp,
            hash: hash?,
            ring_size: ring_size?,
            backends,
            health: health?,
            discovery: discovery?,
            line,
        })
    }

    /// Checks `forwarding`; only l4 services forward other than by NAT.
    fn forwarding(
        &mut self,
        raw: Option<&Spanned<String>>,
        mode: Option<Mode>,
        label: &str,
    ) -> Option<Forwarding> {
        let Some(f) = raw else {
            return Some(Forwarding::Nat);
        };
        Forwarding::parse(f.get_ref())
            .and_then(|forwarding| {
                rules::forwarding(label, mode.unwrap_or_default(), forwarding).map(|()| forwarding)
            })
            .map_err(|why| self.at(&f.span(), why))
            .ok()
    }

    /// Checks `hash`: only XDP picks backends by a hash of the flow.
    fn flow_hash(
        &mut self,
        raw: Option<&Spanned<String>>,
        mode: Option<Mode>,
        label: &str,
    ) -> Option<FlowHash> {
        let hash = self.choice(raw, "hash", HASHES)?;
        if let (Some(h), Some(mode)) = (raw, mode)
            && let Err(why) = rules::flow_hash(label, mode, hash)
        {
            self.at(&h.span(), why);
            return None;
        }
        Some(hash)
    }

    /// Checks `mss_clamp`: only ipip makes packets bigger.
    fn mss_clamp(
        &mut self,
        raw: Option<&Spanned<bool>>,
        forwarding: Option<Forwarding>,
        label: &str,
    ) -> bool {
        match (raw, forwarding) {
            (Some(m), Some(f)) if *m.get_ref() && f != Forwarding::Ipip => {
                self.at(
                    &m.span(),
                    format!("mss_clamp applies to forwarding = \"ipip\" only (the mode that makes packets bigger); service \"{label}\" uses \"{}\"", f.as_str()),
                );
                false
            }
            (m, _) => m.is_some_and(|m| *m.get_ref()),
        }
    }

    /// Checks a VIP, and that no earlier service has it with this protocol.
    fn vip(
        &mut self,
        raw: &Spanned<String>,
        protocol: Option<Protocol>,
        label: &str,
        line: usize,
        taken: &mut HashMap<(SocketAddr, Protocol), (String, usize)>,
    ) -> Option<SocketAddr> {
        let vip = self.endpoint(raw, "vip")?;
        if let Some(protocol) = protocol {
            if let Some((other, other_line)) = taken.get(&(vip, protocol)) {
                let why = rules::vip_taken(vip, protocol, other, Some(*other_line));
                self.at(&raw.span(), why);
            } else {
                taken.insert((vip, protocol), (label.to_string(), line));
            }
        }
        Some(vip)
    }

    /// Checks `[service.health]`; outer `None`: the table is invalid
    /// (already reported), `Some(None)`: no table.
    fn service_health(
        &mut self,
        raw: Option<Spanned<RawHealth>>,
        protocol: Option<Protocol>,
    ) -> Option<Option<HealthCheck>> {
        let Some(raw) = raw else {
            return Some(None);
        };
        let span = raw.span();
        let check = self.health(raw)?;
        // Checks are TCP or HTTP: a UDP service's own port cannot answer them.
        if protocol == Some(Protocol::Udp) && check.port.is_none() {
            self.at(
                &span,
                "health checks of a udp service need `port`, a TCP port on the backends to check",
            );
            return None;
        }
        Some(Some(check))
    }

    pub(super) fn service_name(
        &mut self,
        name: &Spanned<String>,
        names: &mut HashMap<String, usize>,
    ) -> Option<String> {
        let span = name.span();
        let n = name.get_ref();
        if let Err(why) = rules::service_name(n) {
            self.at(&span, why);
            return None;
        }
        if let Some(first) = names.get(n) {
            self.at(&span, rules::name_taken(n, Some(*first)));
            return None;
        }
        names.insert(n.clone(), self.line(&span));
        Some(n.clone())
    }

    /// Parses a VIP or backend address: a socket address with a usable unicast IP and port.
    pub(super) fn endpoint(&mut self, value: &Spanned<String>, what: &str) -> Option<SocketAddr> {
        let span = value.span();
        let s = value.get_ref();
        let addr: SocketAddr = match s.parse() {
            Ok(a) => a,
            Err(_) => {
                let why = match s.parse::<std::net::IpAddr>() {
                    // "fd00::1:80" is a valid IPv6 address, so the missing brackets are the likely mistake.
                    Ok(std::net::IpAddr::V6(_)) => "has no port (IPv6 needs brackets)",
                    Ok(std::net::IpAddr::V4(_)) => "has no port",
                    Err(_) => "is not a socket address",
                };
                self.at(&span, format!("{what} \"{s}\" {why}; {ADDR_FORM}"));
                return None;
            }
        };
        match rules::endpoint(addr) {
            Ok(()) => Some(addr),
            Err(reason) => {
                self.at(&span, format!("{what} \"{s}\" {reason}"));
                None
            }
        }
    }

    pub(super) fn ring_size(&mut self, value: &Spanned<i64>) -> Option<u32> {
        rules::ring_size(*value.get_ref())
            .map_err(|why| self.at(&value.span(), why))
            .ok()
    }

    pub(super) fn backends(
        &mut self,
        raw: Vec<Spanned<RawBackend>>,
        vip: Option<SocketAddr>,
        forwarding: Forwarding,
        service: &str,
        all: &mut usize,
    ) -> Vec<BackendConfig> {
        let mut seen: HashMap<SocketAddr, usize> = HashMap::new();
        let mut backends = Vec::new();
        for b in raw {
            let span = b.span();
            let line = self.line(&span);
            let b = b.into_inner();
            let weight = match &b.weight {
                None => Some(DEFAULT_WEIGHT),
                Some(w) => self.weight(w),
            };
            let address = match &b.address {
                None => {
                    self.at(&span, "backend has no `address`");
                    continue;
                }
                Some(a) => a,
            };
            let Some(addr) = self.endpoint(address, "backend address") else {
                continue;
            };
            if let Some(vip) = vip
                && let Err(why) = rules::backend_for_vip(vip, forwarding, addr)
            {
                self.at(&address.span(), why);
                continue;
            }
            if let Some(first) = seen.get(&addr) {
                self.at(
                    &address.span(),
                    rules::backend_taken(service, addr, Some(*first)),
                );
                continue;
            }
            seen.insert(addr, line);
            let key = (service.to_string(), addr);
            self.backend_spans.insert(key, address.span());
            // Report the global limit once, at the backend that crosses it.
            *all += 1;
            if *all == lb_common::MAX_BACKENDS as usize + 1
                && let Err(why) = rules::backend_count(*all)
            {
                self.at(&address.span(), why);
            }
            if let Some(weight) = weight {
                backends.push(BackendConfig {
                    address: addr,
                    weight,
                    line,
                });
            }
        }
        backends
    }
}

#[cfg(test)]
mod tests {
    use lb_common::MAX_VIPS;

    use super::super::test_support::*;
    use crate::config::*;

    #[test]
    fn service_name_rules() {
        let mut lines = svc(&[]);
        lines[2] = "name = \"\"";
        expect_one(&lines, 3, "service name is empty");

        let mut lines = svc(&[]);
        lines[2] = "name = \"web site\"";
        expect_one(&lines, 3, "may only contain");

        let mut lines = svc(&[]);
        lines.remove(2);
        expect_one(&lines, 2, "has no `name`");

        let lines = svc(&[
            "[[service]]",
            "name = \"web\"",
            "vip = \"198.18.100.2:80\"",
            "[[service.backend]]",
            "address = \"198.18.2.11:8080\"",
        ]);
        expect_one(&lines, 8, "\"web\" is already used (line 3)");
    }

    #[test]
    fn vip_rules() {
        for (vip, needle) in [
            (
                "vip = \"198.18.100.1\"",
                "has no port; expected \"a.b.c.d:port\"",
            ),
            ("vip = \"fd00::1:80\"", "has no port (IPv6 needs brackets)"),
            (
                "vip = \"198.18.100.1:http\"",
                "is not a socket address; expected",
            ),
            ("vip = \"web:80\"", "[ipv6]:port"),
            ("vip = \"198.18.100.1:0\"", "port 0"),
            ("vip = \"0.0.0.0:80\"", "unspecified"),
            ("vip = \"[::]:80\"", "unspecified"),
            ("vip = \"224.0.0.1:80\"", "multicast"),
            ("vip = \"[ff02::1]:80\"", "multicast"),
        ] {
            let mut lines = svc(&[]);
            lines[3] = vip;
            expect_one(&lines, 4, needle);
        }
        let mut lines = svc(&[]);
        lines.remove(3);
        expect_one(&lines, 2, "has no `vip`");
    }

    #[test]
    fn duplicate_vip() {
        let dup = svc(&[
            "[[service]]",
            "name = \"web2\"",
            "vip = \"198.18.100.1:80\"",
            "[[service.backend]]",
            "address = \"198.18.2.11:8080\"",
        ]);
        expect_one(&dup, 9, "already used by service \"web\" (line 2)");
        // The same address and port with another protocol is a different VIP.
        let mut other = dup.clone();
        other.insert(9, "protocol = \"udp\"");
        assert!(parse(&text(&other), "f").is_ok());
    }

    #[test]
    fn bad_protocol_and_mode() {
        let mut lines = svc(&[]);
        lines.insert(4, "protocol = \"sctp\"");
        expect_one(&lines, 5, "unknown protocol \"sctp\"");
        let mut lines = svc(&[]);
        lines.insert(4, "mode = \"l3\"");
        expect_one(&lines, 5, "unknown mode \"l3\"");
    }

    #[test]
    fn forwarding_modes_and_their_rules() {
        // Line numbers: 1 HEAD, 2 [[service]], 3 name, 4 vip, 5 inserted,
        // 6 [[service.backend]], 7 address.
        let dsr = |mode: &'static str, port: &'static str| {
            let mut lines = svc(&[]);
            lines.insert(4, mode);
            lines[6] = port;
            lines
        };
        let ok = parse(
            &text(&dsr(
                "forwarding = \"ipip\"",
                "address = \"198.18.2.11:80\"",
            )),
            "t.toml",
        )
        .expect("ipip with the VIP's port");
        assert_eq!(ok.services[0].forwarding, Forwarding::Ipip);
        assert!(!ok.services[0].mss_clamp);
        let ok = parse(&text(&svc(&[])), "t.toml").expect("default");
        assert_eq!(ok.services[0].forwarding, Forwarding::Nat);
        expect_one(
            &dsr("forwarding = \"l2\"", "address = \"198.18.2.11:8080\""),
            7,
            "must use the VIP's port 80 with forwarding = \"l2\"",
        );
        expect_one(
            &dsr("forwarding = \"dsr\"", "address = \"198.18.2.11:80\""),
            5,
            "unknown forwarding \"dsr\"; expected \"nat\", \"ipip\" or \"l2\"",
        );
        let mut lines = dsr("forwarding = \"l2\"", "address = \"198.18.2.11:80\"");
        lines.insert(5, "mss_clamp = true");
        expect_one(&lines, 6, "mss_clamp applies to forwarding = \"ipip\" only");
        let mut lines = svc(&[]);
        lines.insert(4, "mode = \"l7\"");
        lines.insert(5, "forwarding = \"ipip\"");
        expect_one(&lines, 6, "`forwarding` applies to l4 services only");
    }

    #[test]
    fn hash_is_flow_or_source_and_l4_only() {
        let ok = parse(&text(&svc(&[])), "t.toml").expect("default");
        assert_eq!(ok.services[0].hash, FlowHash::Flow);
        let mut lines = svc(&[]);
        lines.insert(4, "hash = \"source\"");
        let ok = parse(&text(&lines), "t.toml").expect("source");
        assert_eq!(ok.services[0].hash, FlowHash::Source);
        let mut lines = svc(&[]);
        lines.insert(4, "hash = \"src\"");
        expect_one(
            &lines,
            5,
            "unknown hash \"src\"; expected \"flow\" or \"source\"",
        );
        let mut lines = svc(&[]);
        lines.insert(4, "mode = \"l7\"");
        lines.insert(5, "hash = \"source\"");
        expect_one(&lines, 6, "hash applies to l4 services");
    }

    #[test]
    fn ring_size_rules() {
        for (ring, needle) in [
            ("ring_size = 1", "too small"),
            ("ring_size = -7", "too small"),
            ("ring_size = 65539", "too large"),
            (
                "ring_size = 1000",
                "not a prime; Maglev needs a prime table size (e.g. 997)",
            ),
        ] {
            let mut lines = svc(&[]);
            lines.insert(4, ring);
            expect_one(&lines, 5, needle);
        }
        let mut lines = svc(&[]);
        lines.insert(4, "ring_size = 2");
        assert_eq!(parse(&text(&lines), "f").unwrap().services[0].ring_size, 2);
    }

    #[test]
    fn l4_and_l7_services_may_have_no_backend() {
        // Backends may come later from `lb add backend` (see `rules`).
        let lines = &svc(&[])[..4];
        let c = parse(&text(lines), "f").unwrap();
        assert!(c.services[0].backends.is_empty());
        let mut l7 = lines.to_vec();
        l7.push("mode = \"l7\"");
        assert!(parse(&text(&l7), "f").is_ok());
    }

    #[test]
    fn backend_address_rules() {
        for (addr, needle) in [
            ("address = \"198.18.2.11\"", "has no port"),
            ("address = \"198.18.2.11:0\"", "port 0"),
            ("address = \"0.0.0.0:80\"", "unspecified"),
            ("address = \"239.1.1.1:80\"", "multicast"),
            (
                "address = \"[fd00::11]:80\"",
                "NAT does not translate between address families",
            ),
        ] {
            let mut lines = svc(&[]);
            lines[5] = addr;
            expect_one(&lines, 6, needle);
        }
        let mut lines = svc(&[]);
        lines.remove(5);
        expect_one(&lines, 5, "backend has no `address`");
    }

    #[test]
    fn duplicate_backend() {
        let lines = svc(&["[[service.backend]]", "address = \"198.18.2.11:8080\""]);
        expect_one(
            &lines,
            8,
            "listed twice in service \"web\" (first on line 5)",
        );
    }

    #[test]
    fn weight_rules() {
        for (w, ok) in [
            ("weight = 0", true),
            ("weight = 65535", true),
            ("weight = 65536", false),
            ("weight = -1", false),
        ] {
            let lines = svc(&[w]);
            if ok {
                assert!(parse(&text(&lines), "f").is_ok(), "{w}");
            } else {
                expect_one(&lines, 7, "out of range; expected 0..=65535");
            }
        }
    }

    #[test]
    fn more_active_backends_than_ring_slots() {
        let lines = svc(&[
            "[[service.backend]]",
            "address = \"198.18.2.12:8080\"",
            "[[service.backend]]",
            "address = \"198.18.2.13:8080\"",
            "[[service.backend]]",
            "address = \"198.18.2.14:8080\"",
            "weight = 0",
        ]);
        let mut small = lines.clone();
        small.insert(4, "ring_size = 2");
        expect_one(&small, 5, "3 backends with weight > 0 but ring_size is 2");
        let mut fits = lines;
        fits.insert(4, "ring_size = 3");
        assert!(parse(&text(&fits), "f").is_ok());
    }

    #[test]
    fn too_many_services() {
        let mut t = format!("{HEAD}\n");
        for i in 0..=MAX_VIPS {
            t += &format!(
                "[[service]]\nname = \"s{i}\"\nvip = \"10.1.{}.{}:80\"\n[[service.backend]]\naddress = \"10.2.0.1:80\"\n",
                i / 256,
                i % 256
            );
        }
        let errs = parse(&t, "f").unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        assert_eq!(errs[0].line, 2 + 5 * MAX_VIPS as usize);
        assert!(errs[0].reason.contains("at most 512 (MAX_VIPS)"));
    }

    #[test]
    fn too_many_backends() {
        let mut t = format!("{HEAD}\n");
        for s in 0..2 {
            // Inline tables, one per line: thousands of [[service.backend]] headers parse slowly.
            t += &format!("[[service]]\nname = \"s{s}\"\nvip = \"10.1.0.{s}:80\"\nbackend = [\n");
            // Service 1 repeats one of service 0's addresses: the data plane
            // gives each (service, backend) pair a slot, so it is one too many.
            let n = if s == 0 { lb_common::MAX_BACKENDS } else { 1 };
            for i in 0..n {
                t += &format!("{{ address = \"10.2.{}.{}:80\" }},\n", i / 256, i % 256);
            }
            t += "]\n";
        }
        let errs = parse(&t, "f").unwrap_err().0;
        assert_eq!(errs.len(), 1, "{errs:?}");
        // The closing bracket is the last line; the crossing backend is just above it.
        assert_eq!(errs[0].line, t.lines().count() - 1);
        assert!(errs[0].reason.contains("at most 4032 (MAX_BACKENDS)"));
    }

    #[test]
    fn an_l4_service_without_backends_or_discovery_waits_for_the_cli() {
        let lines = [
            HEAD,
            "[[service]]",
            "name = \"web\"",
            "vip = \"198.18.100.1:80\"",
        ];
        let c = parse(&text(&lines), "lb.toml").unwrap();
        assert!(c.services[0].backends.is_empty() && c.services[0].discovery.is_none());
    }
}
