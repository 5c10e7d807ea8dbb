//! `[[service]]` and `[[service.backend]]`: the L4 side of the file. The
//! rules themselves are in [`super::rules`], shared with runtime changes.

use std::collections::HashMap;
use std::net::SocketAddr;

use lb_common::{DEFAULT_RING_SIZE, MAX_VIPS};
use toml::Spanned;

use super::raw::{RawBackend, RawService};
use super::{
    ADDR_FORM, BackendConfig, Checker, DEFAULT_WEIGHT, Forwarding, Mode, Protocol, Service, rules,
};

impl Checker<'_> {
    pub(super) fn services(&mut self, raw: Vec<Spanned<RawService>>) -> Vec<Service> {
        if raw.is_empty() {
            // Checked once the proxy's tables are known (a pure L7 file is fine).
        }
        let mut names: HashMap<String, usize> = HashMap::new();
        let mut vips: HashMap<(SocketAddr, Protocol), (String, usize)> = HashMap::new();
        let mut all_backends = 0;
        let mut services = Vec::new();
        for (index, svc) in raw.into_iter().enumerate() {
            let span = svc.span();
            let line = self.line(&span);
            // Reported once, at the service that crosses the limit.
            if index == MAX_VIPS as usize
                && let Err(why) = rules::service_count(index + 1)
            {
                self.at(&span, why);
            }
            let svc = svc.into_inner();

            let name = match &svc.name {
                None => {
                    self.at(&span, "service has no `name`");
                    None
                }
                Some(n) => self.service_name(n, &mut names),
            };
            // Messages name the service as written even if the name itself was rejected.
            let label = svc
                .name
                .as_ref()
                .map_or_else(|| "<unnamed>".to_string(), |n| n.get_ref().clone());

            let protocol =
                svc.protocol
                    .as_ref()
                    .map_or(Some(Protocol::Tcp), |p| match p.get_ref().as_str() {
                        "tcp" => Some(Protocol::Tcp),
                        "udp" => Some(Protocol::Udp),
                        other => {
                            self.at(
                                &p.span(),
                                format!(
                                    "unknown protocol \"{other}\"; expected \"tcp\" or \"udp\""
                                ),
                            );
                            None
                        }
                    });
            let mode = svc
                .mode
                .as_ref()
                .map_or(Some(Mode::L4), |m| match m.get_ref().as_str() {
                    "l4" => Some(Mode::L4),
                    "l7" => Some(Mode::L7),
                    other => {
                        self.at(
                            &m.span(),
                            format!("unknown mode \"{other}\"; expected \"l4\" or \"l7\""),
                        );
                        None
                    }
                });

            let forwarding = match &svc.forwarding {
                None => Some(Forwarding::Nat),
                Some(f) => match Forwarding::parse(f.get_ref()).and_then(|forwarding| {
                    rules::forwarding(&label, mode.unwrap_or_default(), forwarding)
                        .map(|()| forwarding)
                }) {
                    Ok(f) => Some(f),
                    Err(why) => {
                        self.at(&f.span(), why);
                        None
                    }
                },
            };
            let mss_clamp = match (&svc.mss_clamp, forwarding) {
                (Some(m), Some(f)) if *m.get_ref() && f != Forwarding::Ipip => {
                    self.at(
                        &m.span(),
                        format!("mss_clamp applies to forwarding = \"ipip\" only (the mode that makes packets bigger); service \"{label}\" uses \"{}\"", f.as_str()),
                    );
                    false
                }
                (m, _) => m.as_ref().is_some_and(|m| *m.get_ref()),
            };

            let vip = match &svc.vip {
                None => {
                    self.at(&span, format!("service \"{label}\" has no `vip`"));
                    None
                }
                Some(v) => self.endpoint(v, "vip"),
            };
            if let (Some(vip), Some(protocol), Some(v)) = (vip, protocol, &svc.vip) {
                if let Some((other, other_line)) = vips.get(&(vip, protocol)) {
                    self.at(
                        &v.span(),
                        rules::vip_taken(vip, protocol, other, Some(*other_line)),
                    );
                } else {
                    vips.insert((vip, protocol), (label.clone(), line));
                }
            }

            let ring_size = match &svc.ring_size {
                None => Some(DEFAULT_RING_SIZE),
                Some(r) => self.ring_size(r),
            };

            let raw_backends = svc.backend.unwrap_or_default();
            let backends = self.backends(
                raw_backends,
                vip,
                forwarding.unwrap_or_default(),
                &label,
                &mut all_backends,
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

            // Outer None: the table is invalid (already reported); Some(None): no table.
            let health_span = svc.health.as_ref().map(Spanned::span);
            let health = match svc.health {
                None => Some(None),
                Some(h) => self.health(h).map(Some),
            };
            // Checks are TCP or HTTP: a UDP service's own port cannot answer them.
            let health = match (health, protocol, health_span) {
                (Some(Some(h)), Some(Protocol::Udp), Some(span)) if h.port.is_none() => {
                    self.at(
                        &span,
                        "health checks of a udp service need `port`, a TCP port on the backends to check",
                    );
                    None
                }
                (h, ..) => h,
            };

            if let (
                Some(name),
                Some(vip),
                Some(protocol),
                Some(mode),
                Some(forwarding),
                Some(ring_size),
                Some(health),
                Some(discovery),
            ) = (
                name, vip, protocol, mode, forwarding, ring_size, health, discovery,
            ) {
                services.push(Service {
                    name,
                    vip,
                    protocol,
                    mode,
                    forwarding,
                    mss_clamp,
                    ring_size,
                    backends,
                    health,
                    discovery,
                    line,
                });
            }
        }
        services
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
