//! The L4 rules a service and its backends obey, wherever they come from:
//! the configuration file (`super::services`), a runtime change (`lb add`,
//! `lb weight`, see `crate::runtime`) or a DNS answer. One function per
//! rule, so that the two paths cannot drift apart again.
//!
//! Where the two paths used to disagree, the rule now says what an HAProxy
//! or Katran user expects:
//! - An l4 service may have no backends, in the file as at runtime (HAProxy
//!   accepts a backend without servers and fills it with `add server`;
//!   Katran adds a VIP before its reals). Its traffic finds no backend until
//!   one is added.
//! - Ring capacity counts backends with weight > 0 only, as the Maglev
//!   builder does (`lb_common::maglev::build`): a drained backend takes no
//!   slot, and raising a weight from 0 is checked like an addition.
//! - The data plane's backend slots are one per (service, backend) pair, as
//!   the balancer allocates them; the file used to count distinct addresses.
//! - `forwarding` other than "nat" is refused on l7 services; "nat" is
//!   harmless there and accepted by both.
//!
//! Each rule gives its reason in words: `lb check` adds the position in the
//! file, `lb` prints it as is.

use std::net::{IpAddr, SocketAddr};

use lb_common::maglev::is_prime;
use lb_common::{MAX_BACKENDS, MAX_RING_SIZE, MAX_VIPS, MAX_WEIGHT};

use super::{FlowHash, Forwarding, Mode, Protocol, Service};

/// Checks a service name: non-empty, letters, digits, '_', '.' and '-'
/// (it appears in metric labels, CLI arguments and the journal).
pub fn service_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("service name is empty".into());
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'))
    {
        return Err(format!(
            "service name \"{name}\" may only contain letters, digits, '_', '.' and '-'"
        ));
    }
    Ok(())
}

/// Why a VIP or backend address cannot be used, to follow its spelling in a
/// message: it needs a non-zero port and a concrete unicast address,
/// written in its own family (`[::ffff:127.0.0.1]` reaches 127.0.0.1 while
/// looking like another address to every comparison).
pub fn endpoint(addr: SocketAddr) -> Result<(), &'static str> {
    if addr.port() == 0 {
        Err("has port 0; a non-zero port is required")
    } else if matches!(addr.ip(), IpAddr::V6(v6) if v6.to_ipv4_mapped().is_some()) {
        Err("is an IPv4-mapped IPv6 address; write the IPv4 address itself")
    } else if addr.ip().is_unspecified() {
        Err("is the unspecified address; a concrete unicast address is required")
    } else if addr.ip().is_multicast() {
        Err("is a multicast address; a unicast address is required")
    } else if matches!(addr.ip(), IpAddr::V4(v4) if v4.is_broadcast()) {
        Err("is the broadcast address; a unicast address is required")
    } else {
        Ok(())
    }
}

/// Most servers of one L7 pool, in the file and after runtime additions:
/// every change rebuilds the pools and every scrape lists each server's
/// histograms, so a pool grown without bound slows every change.
pub const MAX_POOL_SERVERS: usize = 1000;

/// Checks that a pool may hold `count` servers ([`MAX_POOL_SERVERS`]).
pub fn pool_servers(pool: &str, count: usize) -> Result<(), String> {
    if count > MAX_POOL_SERVERS {
        return Err(format!(
            "pool \"{pool}\" would have {count} servers; at most {MAX_POOL_SERVERS}"
        ));
    }
    Ok(())
}

/// Checks a backend weight: 0 (no new flows) to [`MAX_WEIGHT`].
pub fn weight(weight: i64) -> Result<u32, String> {
    match u32::try_from(weight) {
        Ok(w) if w <= MAX_WEIGHT => Ok(w),
        _ => Err(format!(
            "weight {weight} is out of range; expected 0..={MAX_WEIGHT}"
        )),
    }
}

/// Checks a Maglev ring size: a prime from 2 to `MAX_RING_SIZE`.
pub fn ring_size(n: i64) -> Result<u32, String> {
    let max = MAX_RING_SIZE as i64;
    if n < 2 {
        Err(format!(
            "ring_size {n} is too small; it must be a prime >= 2"
        ))
    } else if n > max {
        Err(format!(
            "ring_size {n} is too large; the maximum is {max} (MAX_RING_SIZE)"
        ))
    } else if !is_prime(n as u32) {
        // Maglev's permutation only visits every slot when the table size is prime.
        let below = (2..n as u32).rev().find(|&p| is_prime(p)).unwrap_or(2);
        Err(format!(
            "ring_size {n} is not a prime; Maglev needs a prime table size (e.g. {below})"
        ))
    } else {
        Ok(n as u32)
    }
}

/// Checks that `mode` allows `forwarding`: direct server return is an l4
/// matter, l7 traffic goes to the proxy.
pub fn forwarding(service: &str, mode: Mode, forwarding: Forwarding) -> Result<(), String> {
    if mode == Mode::L7 && forwarding.is_dsr() {
        return Err(format!(
            "service \"{service}\" is l7: `forwarding` applies to l4 services only (l7 traffic goes to the proxy)"
        ));
    }
    Ok(())
}

/// Checks that only an l4 service picks backends by a hash of its flows'
/// source (`hash`); the L7 proxy balances by its pools' `algorithm`.
pub fn flow_hash(service: &str, mode: Mode, hash: FlowHash) -> Result<(), String> {
    if mode == Mode::L7 && hash != FlowHash::Flow {
        return Err(format!(
            "hash applies to l4 services (the L7 proxy balances by its pools' `algorithm`); service \"{service}\" is l7"
        ));
    }
    Ok(())
}

/// Checks that `backend` can serve `vip`: the same address family (NAT does
/// not translate families), and in the DSR modes the VIP's port, as the
/// packet reaches the backend untouched.
pub fn backend_for_vip(
    vip: SocketAddr,
    forwarding: Forwarding,
    backend: SocketAddr,
) -> Result<(), String> {
    if vip.is_ipv4() != backend.is_ipv4() {
        return Err(format!(
            "backend {backend} is {} but the VIP {vip} is {}; NAT does not translate between address families",
            family(backend),
            family(vip)
        ));
    }
    if forwarding.is_dsr() && backend.port() != vip.port() {
        return Err(format!(
            "backend {backend} must use the VIP's port {} with forwarding = \"{}\" (the packet reaches it untouched)",
            vip.port(),
            forwarding.as_str()
        ));
    }
    Ok(())
}

/// Checks that connections to TCP `addr`, where this process listens (a
/// frontend, metrics, `[admin]`), get past the XDP program serving
/// `services`: not an `l4` TCP VIP (forwarded to that service's backends),
/// nor another port of an `l4` VIP's address that no `l7` service shares
/// (dropped there, `drop_vip_unserved`). A wildcard address is reachable
/// through every other one.
pub fn listener_reachable(addr: SocketAddr, services: &[Service]) -> Result<(), String> {
    let addr = canonical(addr);
    if addr.ip().is_unspecified() {
        return Ok(());
    }
    let l4 = |s: &&Service| s.mode == Mode::L4 && canonical(s.vip).ip() == addr.ip();
    if let Some(s) = services
        .iter()
        .filter(l4)
        .find(|s| s.vip.port() == addr.port() && s.protocol == Protocol::Tcp)
    {
        return Err(format!(
            "it is the VIP of l4 service \"{}\": XDP forwards its connections to the service's backends, so none would reach this listener (mode = \"l7\" passes them up)",
            s.name
        ));
    }
    let shared = services
        .iter()
        .any(|s| s.mode == Mode::L7 && canonical(s.vip).ip() == addr.ip());
    match services.iter().find(l4) {
        Some(s) if !shared => Err(format!(
            "{} is the VIP address of l4 service \"{}\" and of no l7 service: XDP drops what no service takes there (an l7 service for {addr} passes its connections up)",
            addr.ip(),
            s.name
        )),
        _ => Ok(()),
    }
}

/// Checks that `backend`, for a service of `protocol`, is not a VIP of
/// `services` (same protocol): XDP would send its flows to the balancer
/// itself, which takes them as new flows of that VIP, again and again.
pub fn backend_not_a_vip(
    backend: SocketAddr,
    protocol: Protocol,
    services: &[Service],
) -> Result<(), String> {
    match services
        .iter()
        .find(|s| canonical(s.vip) == canonical(backend) && s.protocol == protocol)
    {
        Some(s) => Err(format!(
            "backend {backend} is the VIP of service \"{}\": its flows would come back to this balancer (a loop)",
            s.name
        )),
        None => Ok(()),
    }
}

/// Checks that l4 backend `backend` is not one of `local`, this host's
/// addresses: XDP hands the flow to the local stack, whose answers leave
/// without passing XDP, so they would never be translated back (NAT) or
/// the flow would come back here (DSR).
pub fn backend_not_local(backend: SocketAddr, local: &[IpAddr]) -> Result<(), String> {
    if is_local(canonical(backend).ip(), local) {
        return Err(format!(
            "backend {backend} is an address of this host: XDP would hand its flows to the local stack, whose answers do not pass XDP again (a backend must be another host)"
        ));
    }
    Ok(())
}

/// Checks that pool server `server` is not where a frontend of
/// `frontends` listens (its address, or a loopback address or one of
/// `local`, this host's addresses, on the port of a wildcard bind of its
/// family): its requests would come back to this proxy, each taking one
/// more connection, until the limits cut them.
pub fn server_not_a_listener(
    server: SocketAddr,
    frontends: &[lb_proxy::Frontend],
    local: &[IpAddr],
) -> Result<(), String> {
    let same = |bind: &SocketAddr| reaches(server, *bind, local);
    match frontends.iter().find(|fe| fe.binds.iter().any(same)) {
        Some(fe) => Err(format!(
            "server {server} is where frontend \"{}\" listens: its requests would come back to this proxy (a loop)",
            fe.name
        )),
        None => Ok(()),
    }
}

/// Checks that pool server `server` is none of the agent's own listeners
/// `own` (metrics, admin; a wildcard one on any of this host's
/// addresses): a frontend would serve them to its clients.
pub fn not_own_listener(
    server: SocketAddr,
    own: &[SocketAddr],
    local: &[IpAddr],
) -> Result<(), String> {
    match own.iter().find(|bind| reaches(server, **bind, local)) {
        Some(bind) => Err(format!(
            "server {server} is the agent's own listener {bind} (metrics or admin): a frontend would serve it to its clients"
        )),
        None => Ok(()),
    }
}

/// Whether connecting to `server` reaches listener `bind`: the same
/// address, or one of this host's (loopback, `local`) on the port of a
/// wildcard bind of its family.
fn reaches(server: SocketAddr, bind: SocketAddr, local: &[IpAddr]) -> bool {
    let (server, bind) = (canonical(server), canonical(bind));
    bind == server
        || (bind.port() == server.port()
            && bind.ip().is_unspecified()
            && bind.is_ipv4() == server.is_ipv4()
            && is_local(server.ip(), local))
}

/// `addr` with an IPv4-mapped IPv6 address as the IPv4 address it reaches:
/// what every comparison of addresses of this host must use.
pub fn canonical(addr: SocketAddr) -> SocketAddr {
    SocketAddr::new(addr.ip().to_canonical(), addr.port())
}

/// Whether `ip` (canonical) is a loopback address or one of `local`.
fn is_local(ip: IpAddr, local: &[IpAddr]) -> bool {
    ip.is_loopback() || local.iter().any(|l| l.to_canonical() == ip)
}

/// Backends that take slots in a Maglev ring: those with weight > 0.
pub fn active(weights: impl IntoIterator<Item = u32>) -> usize {
    weights.into_iter().filter(|&w| w > 0).count()
}

/// Checks that `active` backends with weight > 0 fit a ring of `ring` slots.
pub fn ring_capacity(service: &str, active: usize, ring: u32) -> Result<(), String> {
    if active > ring as usize {
        return Err(format!(
            "service \"{service}\" has {active} backends with weight > 0 but ring_size is {ring}; the ring needs a slot per backend (raise the ring size)"
        ));
    }
    Ok(())
}

/// Checks that `count` services fit the data plane's VIP table.
pub fn service_count(count: usize) -> Result<(), String> {
    if count > MAX_VIPS as usize {
        return Err(format!(
            "too many services; the data plane holds at most {MAX_VIPS} (MAX_VIPS)"
        ));
    }
    Ok(())
}

/// Checks that `count` backends, summed over services, fit the data plane:
/// it gives each (service, backend) pair a slot of its own.
pub fn backend_count(count: usize) -> Result<(), String> {
    if count > MAX_BACKENDS as usize {
        return Err(format!(
            "too many backends; the data plane holds at most {MAX_BACKENDS} (MAX_BACKENDS) across all services, one per service and backend"
        ));
    }
    Ok(())
}

/// The refusal of a second service `name`; `first_line` is the first one's
/// line in the file, if it comes from there.
pub fn name_taken(name: &str, first_line: Option<usize>) -> String {
    match first_line {
        Some(line) => format!("service name \"{name}\" is already used (line {line})"),
        None => format!("service \"{name}\" already exists"),
    }
}

/// The refusal of a second service on `vip`/`protocol`, held by `other`.
pub fn vip_taken(
    vip: SocketAddr,
    protocol: Protocol,
    other: &str,
    first_line: Option<usize>,
) -> String {
    format!(
        "VIP {vip}/{} is already used by service \"{other}\"{}",
        protocol.as_str(),
        on_line(first_line)
    )
}

/// The refusal of `backend` listed a second time in `service`.
pub fn backend_taken(service: &str, backend: SocketAddr, first_line: Option<usize>) -> String {
    match first_line {
        Some(line) => format!(
            "backend {backend} is listed twice in service \"{service}\" (first on line {line})"
        ),
        None => format!("service \"{service}\" already has backend {backend}"),
    }
}

/// " (line N)" for an earlier definition in the file, nothing otherwise.
fn on_line(line: Option<usize>) -> String {
    line.map_or_else(String::new, |l| format!(" (line {l})"))
}

/// "IPv4" or "IPv6", for messages.
pub fn family(addr: SocketAddr) -> &'static str {
    if addr.is_ipv4() { "IPv4" } else { "IPv6" }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names() {
        assert!(service_name("web-1.a_b").is_ok());
        assert_eq!(service_name("").unwrap_err(), "service name is empty");
        assert!(
            service_name("web site")
                .unwrap_err()
                .contains("may only contain")
        );
        assert_eq!(
            name_taken("web", Some(3)),
            "service name \"web\" is already used (line 3)"
        );
        assert_eq!(name_taken("web", None), "service \"web\" already exists");
    }

    #[test]
    fn ipv4_mapped_addresses_are_refused_and_compared_as_ipv4() {
        let mapped: SocketAddr = "[::ffff:127.0.0.1]:44080".parse().unwrap();
        assert!(endpoint(mapped).unwrap_err().contains("IPv4-mapped"));
        // The guards see through it wherever it comes from (discovery).
        assert!(backend_not_local(mapped, &[]).is_err());
        let here: SocketAddr = "[::ffff:192.0.2.1]:80".parse().unwrap();
        assert!(backend_not_local(here, &["192.0.2.1".parse().unwrap()]).is_err());
        assert_eq!(canonical(mapped), "127.0.0.1:44080".parse().unwrap());
        assert!(endpoint("[::1]:80".parse().unwrap()).is_ok());
    }

    #[test]
    fn pools_have_a_server_limit() {
        assert!(pool_servers("app", MAX_POOL_SERVERS).is_ok());
        let err = pool_servers("app", MAX_POOL_SERVERS + 1).unwrap_err();
        assert!(
            err.contains("pool \"app\" would have 1001 servers; at most 1000"),
            "{err}"
        );
    }

    #[test]
    fn endpoints() {
        assert!(endpoint(addr("198.18.2.11:80")).is_ok());
        assert!(
            endpoint(addr("198.18.2.11:0"))
                .unwrap_err()
                .contains("port 0")
        );
        assert!(
            endpoint(addr("0.0.0.0:80"))
                .unwrap_err()
                .contains("unspecified")
        );
        assert!(
            endpoint(addr("[::]:80"))
                .unwrap_err()
                .contains("unspecified")
        );
        assert!(
            endpoint(addr("224.0.0.1:80"))
                .unwrap_err()
                .contains("multicast")
        );
    }

    #[test]
    fn weights() {
        assert_eq!(weight(0), Ok(0));
        assert_eq!(weight(i64::from(MAX_WEIGHT)), Ok(MAX_WEIGHT));
        for bad in [-1, 65536, i64::MAX] {
            assert!(
                weight(bad).unwrap_err().contains("expected 0..=65535"),
                "{bad}"
            );
        }
    }

    #[test]
    fn ring_sizes() {
        assert_eq!(ring_size(2), Ok(2));
        assert_eq!(ring_size(65537), Ok(65537));
        assert!(ring_size(1).unwrap_err().contains("too small"));
        assert!(ring_size(65539).unwrap_err().contains("too large"));
        assert!(ring_size(1000).unwrap_err().contains("(e.g. 997)"));
    }

    #[test]
    fn families_and_dsr_ports() {
        let vip = addr("198.18.100.1:80");
        assert!(backend_for_vip(vip, Forwarding::Nat, addr("198.18.2.11:8080")).is_ok());
        assert!(
            backend_for_vip(vip, Forwarding::Nat, addr("[fd00::1]:80"))
                .unwrap_err()
                .contains("address families")
        );
        assert!(
            backend_for_vip(vip, Forwarding::L2, addr("198.18.2.11:8080"))
                .unwrap_err()
                .contains("must use the VIP's port 80")
        );
        assert!(backend_for_vip(vip, Forwarding::Ipip, addr("198.18.2.11:80")).is_ok());
        assert!(forwarding("s", Mode::L7, Forwarding::Ipip).is_err());
        assert!(forwarding("s", Mode::L7, Forwarding::Nat).is_ok());
        assert!(forwarding("s", Mode::L4, Forwarding::L2).is_ok());
    }

    #[test]
    fn capacity_counts_weighted_backends_and_pairs() {
        assert_eq!(active([0, 1, 5, 0]), 2);
        assert!(ring_capacity("s", 3, 3).is_ok());
        let err = ring_capacity("s", 3, 2).unwrap_err();
        assert!(
            err.contains("3 backends with weight > 0 but ring_size is 2"),
            "{err}"
        );
        assert!(service_count(MAX_VIPS as usize).is_ok());
        assert!(service_count(MAX_VIPS as usize + 1).is_err());
        assert!(backend_count(MAX_BACKENDS as usize).is_ok());
        assert!(
            backend_count(MAX_BACKENDS as usize + 1)
                .unwrap_err()
                .contains("at most 4032 (MAX_BACKENDS)")
        );
    }

    #[test]
    fn duplicates_say_where_the_first_is() {
        let b = addr("198.18.2.11:8080");
        assert_eq!(
            backend_taken("web", b, Some(5)),
            "backend 198.18.2.11:8080 is listed twice in service \"web\" (first on line 5)"
        );
        assert_eq!(
            backend_taken("web", b, None),
            "service \"web\" already has backend 198.18.2.11:8080"
        );
        assert_eq!(
            vip_taken(addr("198.18.100.1:80"), Protocol::Tcp, "web", Some(2)),
            "VIP 198.18.100.1:80/tcp is already used by service \"web\" (line 2)"
        );
    }
}
