//! The addresses `lb run` listens on (the frontends' `binds`, `metrics`,
//! `[admin] bind`), checked together once every table is read: two
//! listeners on one address (each bound with SO_REUSEPORT, both would
//! bind and the kernel would split the connections between them), a
//! listener the XDP program keeps every connection from
//! (`rules::listener_reachable`), and on this host an address another
//! program holds (the frontends' binds are tried with their tables).
//! Then the backends that are the balancer itself (`rules::backend_not_a_vip`,
//! `rules::server_not_a_listener`): loops.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;

use super::{Checker, Config, Group, Service, rules};

/// [`Listener::owner`] of `metrics`.
pub(super) const METRICS: &str = "metrics listens on";
/// [`Listener::owner`] of `[admin] bind`.
pub(super) const ADMIN: &str = "[admin] binds";

/// [`Listener::owner`] of a bind of frontend `name`.
pub(super) fn frontend(name: &str) -> String {
    format!("frontend \"{name}\" binds")
}

/// Why `owner`'s `addr` gets no connection past the XDP program, if so.
fn reachable(owner: &str, addr: SocketAddr, services: &[Service]) -> Result<(), String> {
    rules::listener_reachable(addr, services).map_err(|why| format!("{owner} {addr}, but {why}"))
}

/// One address listened on, where the file names it and who listens.
pub(super) struct Listener {
    pub(super) addr: SocketAddr,
    pub(super) span: Range<usize>,
    /// Its owner as the subject of a sentence: `frontend "web" binds`.
    pub(super) owner: String,
    /// Also try to bind it here (when the file's host resources are
    /// checked): the frontends' binds are tried with their tables.
    pub(super) try_bind: bool,
}

impl Checker<'_> {
    /// Records an address listened on, for [`Checker::check_listeners`].
    pub(super) fn listening(&mut self, listener: Listener) {
        self.listeners.push(listener);
    }

    /// Checks every recorded listener against those before it and against
    /// the file's `services`.
    pub(super) fn check_listeners(&mut self, services: &[Service]) {
        let listeners = std::mem::take(&mut self.listeners);
        let mut first: HashMap<SocketAddr, (&str, usize)> = HashMap::new();
        for l in &listeners {
            let Listener {
                addr, span, owner, ..
            } = l;
            // Port 0: each listener is given a port of its own.
            // Compared canonical: [::ffff:a.b.c.d] is a.b.c.d.
            let key = rules::canonical(*addr);
            if let Some((other, line)) = first.get(&key).filter(|_| addr.port() != 0) {
                let why = format!(
                    "{owner} {addr}, which {other} too (line {line}): two listeners on one address would split its connections between them"
                );
                self.at(span, why);
                continue;
            }
            first.insert(key, (owner, self.line(span)));
            if let Err(why) = reachable(owner, *addr, services) {
                self.at(span, why);
            } else if l.try_bind
                && self.host_resources
                && let Err(e) = lb_proxy::can_bind(*addr)
            {
                self.at(span, format!("{owner} {addr}, which cannot be bound: {e}"));
            }
        }
    }

    /// Checks that no backend or pool server is this balancer itself: an l4
    /// service's VIP, where a frontend listens, or one of the agent's own
    /// listeners `own` (metrics, admin) (`rules`).
    pub(super) fn check_loops(
        &mut self,
        services: &[Service],
        proxy: &lb_proxy::ProxyConfig,
        own: &[SocketAddr],
    ) {
        let mut problems = Vec::new();
        // This host's addresses, when the file is checked for this host.
        let local = if self.host_resources {
            local_addresses()
        } else {
            Vec::new()
        };
        for s in services {
            for b in &s.backends {
                let this_host = rules::backend_not_a_vip(b.address, s.protocol, services)
                    .and_then(|()| rules::backend_not_local(b.address, &local));
                if let Err(why) = this_host {
                    problems.push((
                        (s.name.clone(), b.address),
                        format!("service \"{}\": {why}", s.name),
                    ));
                }
            }
        }
        for p in &proxy.pools {
            for server in &p.servers {
                if let Err(why) =
                    rules::server_not_a_listener(server.address, &proxy.frontends, &local)
                        .and_then(|()| rules::not_own_listener(server.address, own, &local))
                {
                    let key = (Group::pool_name(&p.name), server.address);
                    problems.push((key, format!("pool \"{}\": {why}", p.name)));
                }
            }
        }
        for (key, why) in problems {
            match self.backend_spans.get(&key).cloned() {
                Some(span) => self.at(&span, why),
                None => self.whole(why),
            }
        }
    }
}

/// The addresses of this host's interfaces (in this network namespace;
/// empty if they cannot be read): a pool server at one of them on a
/// wildcard bind's port is this proxy.
pub fn local_addresses() -> Vec<IpAddr> {
    host_addresses()
        .map(|list| list.into_iter().map(|(_, ip)| ip).collect())
        .unwrap_or_default()
}

/// Every address of every interface in this network namespace, with the
/// interface's name, in the order getifaddrs(3) lists them.
pub fn host_addresses() -> std::io::Result<Vec<(String, IpAddr)>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list`, freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&raw mut list) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut at = list;
    while !at.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*at };
        at = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_name.is_null() {
            continue;
        }
        // SAFETY: ifa_addr points to a sockaddr of the family it names.
        let ip = match i32::from(unsafe { (*ifa.ifa_addr).sa_family }) {
            libc::AF_INET => {
                // SAFETY: an AF_INET address is a sockaddr_in.
                let sin = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in>() };
                IpAddr::from(sin.sin_addr.s_addr.to_ne_bytes())
            }
            libc::AF_INET6 => {
                // SAFETY: an AF_INET6 address is a sockaddr_in6.
                let sin6 = unsafe { &*ifa.ifa_addr.cast::<libc::sockaddr_in6>() };
                IpAddr::from(sin6.sin6_addr.s6_addr)
            }
            _ => continue,
        };
        // SAFETY: a NUL-terminated name owned by the list.
        let name = unsafe { std::ffi::CStr::from_ptr(ifa.ifa_name) };
        out.push((name.to_string_lossy().into_owned(), ip));
    }
    // SAFETY: the list getifaddrs allocated, freed once.
    unsafe { libc::freeifaddrs(list) };
    Ok(out)
}

impl Config {
    /// Every address this configuration listens on, with its owner (as
    /// [`Listener::owner`]).
    pub fn listeners(&self) -> Vec<(SocketAddr, String)> {
        let binds = self.proxy.0.frontends.iter().flat_map(|fe| {
            let owner = frontend(&fe.name);
            fe.binds.iter().map(move |b| (*b, owner.clone()))
        });
        let metrics = self.metrics.map(|m| (m, METRICS.to_string()));
        let admin = self.admin.as_ref().map(|a| (a.bind, ADMIN.to_string()));
        binds.chain(metrics).chain(admin).collect()
    }

    /// Checks that every listener is reachable with `services` in place of
    /// the configuration's (a runtime change to the services).
    pub fn listeners_reachable(&self, services: &[Service]) -> Result<(), String> {
        self.listeners()
            .iter()
            .try_for_each(|(addr, owner)| reachable(owner, *addr, services))
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::expect_one;
    use super::super::{Config, parse};

    /// A frontend `name` binding `binds`, its pool and `extra` lines.
    fn file(head: &[&str], frontends: &[(&str, &str)], extra: &[&str]) -> Vec<String> {
        let mut lines: Vec<String> = head.iter().map(|l| l.to_string()).collect();
        for (name, binds) in frontends {
            lines.push("[[frontend]]".into());
            lines.push(format!("name = \"{name}\""));
            lines.push(format!("binds = [{binds}]"));
            lines.push("default_pool = \"p\"".into());
        }
        lines.push("[[pool]]".into());
        lines.push("name = \"p\"".into());
        lines.push("servers = [{ address = \"198.18.2.11:8080\" }]".into());
        lines.extend(extra.iter().map(|l| l.to_string()));
        lines
    }

    fn refs(lines: &[String]) -> Vec<&str> {
        lines.iter().map(String::as_str).collect()
    }

    fn parses(lines: &[String]) -> Config {
        let text = lines.join("\n") + "\n";
        parse(&text, "lb.toml").unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn one_address_is_listened_on_once() {
        let two = file(
            &[],
            &[("a", "\"127.0.0.1:80\""), ("b", "\"127.0.0.1:80\"")],
            &[],
        );
        expect_one(
            &refs(&two),
            7,
            "frontend \"b\" binds 127.0.0.1:80, which frontend \"a\" binds too (line 3): two listeners on one address would split its connections",
        );
        let twice = file(&[], &[("a", "\"[::1]:80\", \"[::1]:80\"")], &[]);
        expect_one(&refs(&twice), 3, "which frontend \"a\" binds too (line 3)");
        let mapped = file(
            &["metrics = \"[::ffff:127.0.0.1]:80\""],
            &[("a", "\"127.0.0.1:80\"")],
            &[],
        );
        expect_one(&refs(&mapped), 1, "which frontend \"a\" binds too (line 4)");
        let metrics = file(
            &["metrics = \"127.0.0.1:80\""],
            &[("a", "\"127.0.0.1:80\"")],
            &[],
        );
        expect_one(
            &refs(&metrics),
            1,
            "metrics listens on 127.0.0.1:80, which frontend \"a\" binds too (line 4)",
        );
        let admin = file(
            &["metrics = \"127.0.0.1:8404\""],
            &[("a", "\"127.0.0.1:80\"")],
            &[
                "[admin]",
                "bind = \"127.0.0.1:8404\"",
                "token_file = \"/etc/lb/token\"",
            ],
        );
        expect_one(
            &refs(&admin),
            10,
            "[admin] binds 127.0.0.1:8404, which metrics listens on too (line 1)",
        );
        // A wildcard and a specific address, or the two families' wildcards
        // (IPv6 listeners are IPv6 only), are different listeners: the
        // kernel gives a connection to the most specific one.
        parses(&file(
            &["metrics = \"0.0.0.0:80\""],
            &[
                ("a", "\"127.0.0.1:80\", \"[::]:80\""),
                ("b", "\"127.0.0.2:80\""),
            ],
            &[],
        ));
    }

    #[test]
    fn metrics_and_admin_binds_are_tried_on_this_host_beside_our_own() {
        let dir = std::env::temp_dir().join(format!("lb-config-listen-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let token = dir.join("token");
        std::fs::write(&token, "0123456789abcdef0123456789abcdef").unwrap();
        // A port another program listens on (no SO_REUSEPORT)...
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = taken.local_addr().unwrap();
        // ...and one a running lb holds, as `lb run` binds it.
        let ours = lb_proxy::shared_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        let ours = ours.local_addr().unwrap();
        let path = dir.join("lb.toml");
        let load = |metrics: std::net::SocketAddr, admin: std::net::SocketAddr| {
            let head = [format!("metrics = \"{metrics}\"")];
            let admin = [
                "[admin]".to_string(),
                format!("bind = \"{admin}\""),
                format!("token_file = \"{}\"", token.display()),
            ];
            let lines = file(&refs(&head), &[("a", "\"127.0.0.1:0\"")], &refs(&admin));
            let text = lines.join("\n") + "\n";
            std::fs::write(&path, text).unwrap();
            super::super::load(&path).map_err(|e| e.0)
        };
        let errs = load(taken, taken).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:#?}");
        assert_eq!(errs[0].line, 1, "{errs:#?}");
        let why =
            format!("metrics listens on {taken}, which cannot be bound: Address already in use");
        assert!(errs[0].reason.starts_with(&why), "{errs:#?}");
        // The admin's is the same address: reported as such, not tried.
        assert_eq!(errs[1].line, 10, "{errs:#?}");
        assert!(
            errs[1]
                .reason
                .contains("which metrics listens on too (line 1)"),
            "{errs:#?}"
        );
        let mut other = ours;
        other.set_port(0);
        assert!(load(ours, other).is_ok());
        // Text alone (tests) is not tried against this host.
        let text = std::fs::read_to_string(&path).unwrap();
        assert!(parse(&text.replace(&ours.to_string(), &taken.to_string()), "t").is_ok());
        let errs = load(other, taken).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert!(errs[0].reason.starts_with("[admin] binds"), "{errs:#?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_backend_that_is_the_balancer_itself_is_refused() {
        let head = [
            "interfaces = [\"eth0\"]",
            "[[service]]",
            "name = \"web\"",
            "vip = \"198.18.100.1:80\"",
            "[[service]]",
            "name = \"dns\"",
            "vip = \"198.18.100.1:53\"",
            "protocol = \"udp\"",
            "[[service.backend]]",
            "address = \"198.18.100.1:80\"",
            "[[service.backend]]",
            "address = \"198.18.100.1:53\"",
        ];
        // A UDP service's backend on a TCP VIP is no loop; on its own VIP it is.
        expect_one(
            &refs(&file(&head, &[("a", "\"127.0.0.1:8080\"")], &[])),
            12,
            "service \"dns\": backend 198.18.100.1:53 is the VIP of service \"dns\": its flows would come back to this balancer (a loop)",
        );
        let pool = |server: &str| {
            let mut lines = file(&[], &[("a", "\"127.0.0.1:8080\", \"0.0.0.0:8081\"")], &[]);
            let last = lines.len() - 1;
            lines[last] = format!(
                "servers = [{{ address = \"198.18.2.11:80\" }}, {{ address = \"{server}\" }}]"
            );
            lines
        };
        let why =
            "is where frontend \"a\" listens: its requests would come back to this proxy (a loop)";
        for server in ["127.0.0.1:8080", "127.0.0.2:8081"] {
            let errs = super::super::test_support::errors(&refs(&pool(server)));
            assert_eq!(errs.len(), 1, "{errs:#?}");
            assert_eq!(
                (errs[0].line, errs[0].column),
                (7, 44),
                "the second entry: {errs:#?}"
            );
            assert!(errs[0].reason.contains(why), "{errs:#?}");
        }
        // The same listener spelt as an IPv4-mapped IPv6 address.
        let errs = super::super::test_support::errors(&refs(&pool("[::ffff:127.0.0.1]:8080")));
        assert!(
            errs.iter().any(|e| e.reason.contains("IPv4-mapped")),
            "{errs:#?}"
        );
        assert!(errs.iter().any(|e| e.reason.contains(why)), "{errs:#?}");
        // The agent's own listeners (metrics, admin) are no servers either.
        let mut with_metrics = pool("127.0.0.1:9100");
        with_metrics.insert(0, "metrics = \"127.0.0.1:9100\"".to_string());
        let errs = super::super::test_support::errors(&refs(&with_metrics));
        assert!(
            errs.iter()
                .any(|e| e.reason.contains("the agent's own listener")),
            "{errs:#?}"
        );
        // Another port, or a wildcard's port on another host: servers.
        parses(&pool("127.0.0.1:9000"));
        parses(&pool("198.18.2.12:8081"));

        // One of this host's own addresses on a wildcard's port is this
        // proxy too (`lb check` and `lb run` pass the host's addresses).
        let config = parses(&pool("198.18.2.12:8081"));
        let frontends = &config.proxy.0.frontends;
        let own: std::net::IpAddr = "198.18.2.12".parse().unwrap();
        let server = "198.18.2.12:8081".parse().unwrap();
        let err = super::super::rules::server_not_a_listener(server, frontends, &[own]);
        assert!(err.is_err_and(|e| e.contains(why)));
        let v6 = "[fd00::1]:8081".parse().unwrap();
        let v6_own = ["fd00::1".parse().unwrap()];
        assert!(
            super::super::rules::server_not_a_listener(v6, frontends, &v6_own).is_ok(),
            "an IPv4 wildcard"
        );
        // An l4 backend on loopback is this host, wherever the file is checked.
        let head = [
            "interfaces = [\"eth0\"]",
            "[[service]]",
            "name = \"web\"",
            "vip = \"198.18.100.1:80\"",
            "[[service.backend]]",
            "address = \"127.0.0.1:8080\"",
        ];
        let errs = super::super::test_support::errors(&refs(&file(&head, &[], &[])));
        assert!(
            errs.iter()
                .any(|e| e.line == 6 && e.reason.contains("is an address of this host")),
            "{errs:#?}"
        );
        let own_v6 = "[fd00::1]:80".parse().unwrap();
        assert!(super::super::rules::backend_not_local(own_v6, &v6_own).is_err());
        let here = super::local_addresses();
        assert!(
            here.contains(&std::net::Ipv4Addr::LOCALHOST.into()),
            "{here:?}"
        );
    }

    #[test]
    fn a_listener_xdp_keeps_every_connection_from_is_refused() {
        let head = [
            "interfaces = [\"eth0\"]",
            "[[service]]",
            "name = \"web\"",
            "vip = \"198.18.100.1:80\"",
        ];
        let on_vip = file(&head, &[("a", "\"198.18.100.1:80\"")], &[]);
        expect_one(
            &refs(&on_vip),
            7,
            "frontend \"a\" binds 198.18.100.1:80, but it is the VIP of l4 service \"web\": XDP forwards its connections to the service's backends",
        );
        let other_port = file(&head, &[("a", "\"198.18.100.1:443\"")], &[]);
        expect_one(
            &refs(&other_port),
            7,
            "198.18.100.1 is the VIP address of l4 service \"web\" and of no l7 service: XDP drops what no service takes there",
        );
        let mut metrics = head.to_vec();
        metrics.insert(1, "metrics = \"198.18.100.1:9100\"");
        expect_one(
            &refs(&file(&metrics, &[("a", "\"0.0.0.0:80\"")], &[])),
            2,
            "metrics listens on 198.18.100.1:9100, but",
        );
        // An l7 service on the address passes its other ports up too (a UDP
        // service's port among them: it takes no TCP connection).
        parses(&file(
            &head,
            &[(
                "a",
                "\"198.18.100.1:443\", \"198.18.100.1:8443\", \"198.18.100.2:53\"",
            )],
            &[
                "[[service]]",
                "name = \"tls\"",
                "vip = \"198.18.100.1:443\"",
                "mode = \"l7\"",
                "[[service]]",
                "name = \"dns\"",
                "vip = \"198.18.100.2:53\"",
                "protocol = \"udp\"",
                "[[service]]",
                "name = \"proxy\"",
                "vip = \"198.18.100.2:443\"",
                "mode = \"l7\"",
            ],
        ));
    }
}
