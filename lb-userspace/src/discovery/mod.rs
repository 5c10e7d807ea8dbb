//! DNS service discovery: a service's (or an L7 pool's) backends taken from
//! SRV or A/AAAA answers and asked again every interval, as HAProxy's
//! `server-template` slots are filled from its `resolvers`.
//!
//! This module is the pure part, plain functions and a state machine:
//! answers to the wanted backend set ([`srv_backends`], [`address_backends`]),
//! what one round's answer does to the set in force ([`Tracker`]), and the
//! difference to apply to a group's backends ([`diff`]). The queries (one
//! tokio task per discovery, with hickory-resolver) are in [`dns`]. The agent
//! applies each new set through the same path as a CLI change
//! (`runtime::Desired`, then `Agent::sync`: new backends before the Maglev
//! tables, removed ones after).
//!
//! The rules (OPERATIONS.md has them for operators):
//! - Static backends stay; discovered ones come and go beside them. An
//!   address that is both is static (its configured weight wins).
//! - An answer with records replaces the discovered set at once.
//! - An empty answer (NXDOMAIN, no records of the type, an SRV target of
//!   ".", targets without addresses) is what the DNS says, but it removes the
//!   discovered backends only once it has lasted `hold` (HAProxy's
//!   `hold nx`), so a zone being rewritten does not empty a service.
//! - A failure (timeout, SERVFAIL, REFUSED, a network error, an SRV target
//!   whose own lookup fails) changes nothing: the last good set stays and
//!   the state says `failing`.

/// The queries: a hickory resolver and a task per discovery.
pub mod dns;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lb_common::MAX_WEIGHT;
use serde::{Deserialize, Serialize};

use crate::config::Group;
use crate::config::{Config, Discovery};
use crate::control::protocol::{DiscoveryInfo, DiscoveryState};

/// A backend a DNS answer asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Found {
    /// Address and port.
    pub address: SocketAddr,
    /// Maglev (or pool) weight.
    pub weight: u32,
    /// L7 pools: a backup server (an SRV record of a less preferred priority).
    #[serde(default)]
    pub backup: bool,
}

/// One SRV record of an answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SrvRecord {
    /// Lower is preferred.
    pub priority: u16,
    /// Share among records of the same priority.
    pub weight: u16,
    /// The backends' port.
    pub port: u16,
    /// Host name whose addresses are the backends; "." means "no service".
    pub target: String,
}

/// Which addresses an SRV target is resolved to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Family {
    /// A records (an IPv4 VIP).
    V4,
    /// AAAA records (an IPv6 VIP).
    V6,
    /// L7 pools, which connect themselves: A records, or AAAA for a target without any.
    Any,
}

/// What one round of queries came back with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// The records name these backends (never empty).
    Found(Vec<Found>),
    /// The DNS says there is nothing (the reason: "NXDOMAIN", "no SRV records", ...).
    Empty(String),
    /// No usable answer (timeout, SERVFAIL, a network error, ...).
    Failed(String),
}

impl Answer {
    /// `Found`, or `Empty` with `why` when nothing was found.
    pub fn from_backends(backends: Vec<Found>, why: &str) -> Self {
        if backends.is_empty() {
            Answer::Empty(why.to_string())
        } else {
            Answer::Found(backends)
        }
    }
}

/// The backends an SRV answer names, given each target's addresses.
///
/// Only records of the lowest priority serve; with `backups` (L7 pools) the
/// others become backup servers. SRV weight 0 ("rarely, when others have
/// weight") becomes 1, the smallest weight that still takes flows.
pub fn srv_backends(
    records: &[SrvRecord],
    addresses: &BTreeMap<String, Vec<IpAddr>>,
    backups: bool,
) -> Vec<Found> {
    let usable: Vec<&SrvRecord> = records
        .iter()
        .filter(|r| r.port != 0 && !is_root(&r.target))
        .collect();
    let Some(best) = usable.iter().map(|r| r.priority).min() else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for r in usable {
        let backup = r.priority != best;
        if backup && !backups {
            continue;
        }
        for ip in addresses.get(&r.target).into_iter().flatten() {
            out.push(Found {
                address: SocketAddr::new(*ip, r.port),
                weight: u32::from(r.weight).max(1),
                backup,
            });
        }
    }
    normalize(out)
}

/// The backends an A/AAAA answer names: every address on `port` with `weight`.
pub fn address_backends(ips: &[IpAddr], port: u16, weight: u32) -> Vec<Found> {
    normalize(
        ips.iter()
            .map(|ip| Found {
                address: SocketAddr::new(*ip, port),
                weight,
                backup: false,
            })
            .collect(),
    )
}

/// Sorted by address, one entry per address: targets sharing an address
/// add their weights (up to the largest weight), and it is a backup only if
/// every record naming it is.
pub fn normalize(mut found: Vec<Found>) -> Vec<Found> {
    found.sort();
    let mut out: Vec<Found> = Vec::with_capacity(found.len());
    for f in found {
        match out.last_mut() {
            Some(last) if last.address == f.address => {
                last.weight = last.weight.saturating_add(f.weight).min(MAX_WEIGHT);
                last.backup &= f.backup;
            }
            _ => out.push(Found {
                weight: f.weight.min(MAX_WEIGHT),
                ..f
            }),
        }
    }
    out
}

fn is_root(name: &str) -> bool {
    name.is_empty() || name == "."
}

/// What a round's answer does to the set in force.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The set in force stays.
    Keep,
    /// Apply this set, then [`Tracker::commit`] it.
    Apply(Vec<Found>),
}

/// One discovery's state: the set in force (the last good one), and where
/// the queries stand.
#[derive(Debug, Clone)]
pub struct Tracker {
    spec: Discovery,
    family: Family,
    current: Vec<Found>,
    state: DiscoveryState,
    last_error: Option<String>,
    failures: u32,
    last_success: Option<Instant>,
    /// When the DNS started answering "nothing" while backends were in force.
    empty_since: Option<(Instant, String)>,
}

impl Tracker {
    /// A discovery that has not answered yet; nothing in force.
    pub fn new(spec: Discovery, family: Family) -> Self {
        Self {
            spec,
            family,
            current: Vec::new(),
            state: DiscoveryState::Pending,
            last_error: None,
            failures: 0,
            last_success: None,
            empty_since: None,
        }
    }

    /// Puts a set in force before any answer (the previous agent's, or the
    /// previous configuration's): what stays if the DNS fails.
    pub fn seed(&mut self, set: Vec<Found>) {
        self.current = normalize(set);
    }

    /// What the discovery is configured to do.
    pub fn spec(&self) -> &Discovery {
        &self.spec
    }

    /// Which addresses SRV targets resolve to.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The set in force.
    pub fn current(&self) -> &[Found] {
        &self.current
    }

    /// Where the queries stand.
    pub fn state(&self) -> DiscoveryState {
        self.state
    }

    /// The last failure.
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }

    /// Failed rounds in a row.
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Takes one round's answer at `now`.
    pub fn observe(&mut self, answer: Answer, now: Instant) -> Verdict {
        match answer {
            Answer::Failed(why) => {
                self.failures += 1;
                self.last_error = Some(why);
                self.state = DiscoveryState::Failing;
                Verdict::Keep
            }
            Answer::Found(set) => {
                self.answered(now);
                // Records again: an empty spell's countdown starts over next time.
                self.empty_since = None;
                let set = normalize(set);
                if set == self.current {
                    Verdict::Keep
                } else {
                    Verdict::Apply(set)
                }
            }
            Answer::Empty(why) => {
                self.answered(now);
                if self.current.is_empty() {
                    return Verdict::Keep;
                }
                let since = match &self.empty_since {
                    Some((since, _)) => *since,
                    None => {
                        self.empty_since = Some((now, why));
                        now
                    }
                };
                if now.saturating_duration_since(since) >= self.spec.hold {
                    Verdict::Apply(Vec::new())
                } else {
                    self.state = DiscoveryState::Holding;
                    Verdict::Keep
                }
            }
        }
    }

    /// A round that answered (with records or without).
    fn answered(&mut self, now: Instant) {
        self.failures = 0;
        self.last_success = Some(now);
        self.state = DiscoveryState::Ok;
    }

    /// `set` (from [`Verdict::Apply`]) is in force now.
    pub fn commit(&mut self, set: Vec<Found>) {
        self.current = set;
        self.empty_since = None;
    }

    /// Applying the set of [`Verdict::Apply`] failed: the old set stays,
    /// and the next answer tries again.
    pub fn refused(&mut self, why: String) {
        self.failures += 1;
        self.last_error = Some(why);
        self.state = DiscoveryState::Failing;
    }

    /// For `lb show discovery` and `lb show services`.
    pub fn info(&self, group: &str, now: Instant) -> DiscoveryInfo {
        let detail = match (&self.state, &self.empty_since) {
            (DiscoveryState::Holding, Some((since, why))) => Some(format!(
                "{why} for {:.1}s; the last {} backends stay until it has lasted {:?}",
                now.saturating_duration_since(*since).as_secs_f64(),
                self.current.len(),
                self.spec.hold
            )),
            _ => None,
        };
        DiscoveryInfo {
            group: group.to_string(),
            name: self.spec.name.clone(),
            record: self.spec.record.as_str().to_string(),
            state: self.state,
            backends: self.current.len(),
            failures: self.failures,
            last_error: self.last_error.clone(),
            since_success_ms: self.last_success.map(|t| {
                u64::try_from(now.saturating_duration_since(t).as_millis()).unwrap_or(u64::MAX)
            }),
            detail,
        }
    }
}

/// Every discovery `config` asks for: group (service name or `pool:NAME`),
/// what to ask, and which addresses SRV targets resolve to.
pub fn wanted(config: &Config) -> Vec<(String, Discovery, Family)> {
    let services = config.services.iter().filter_map(|s| {
        let family = if s.vip.is_ipv4() {
            Family::V4
        } else {
            Family::V6
        };
        s.discovery
            .as_ref()
            .map(|d| (s.name.clone(), d.clone(), family))
    });
    let pools = config
        .proxy
        .2
        .iter()
        .map(|(pool, d)| (Group::pool_name(pool), d.clone(), Family::Any));
    services.chain(pools).collect()
}

/// The trackers for `config`: unchanged discoveries keep theirs; a changed
/// one starts afresh but keeps its set in force until its first answer.
pub fn reconcile(old: &BTreeMap<String, Tracker>, config: &Config) -> BTreeMap<String, Tracker> {
    wanted(config)
        .into_iter()
        .map(|(group, spec, family)| {
            let tracker = match old.get(&group) {
                Some(t) if t.spec == spec && t.family == family => t.clone(),
                Some(t) => {
                    let mut fresh = Tracker::new(spec, family);
                    fresh.seed(t.current.clone());
                    fresh
                }
                None => Tracker::new(spec, family),
            };
            (group, tracker)
        })
        .collect()
}

/// What to change in a group's backends to get a discovered set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Diff {
    /// Discovered backends to add.
    pub add: Vec<Found>,
    /// Discovered backends whose weight (or backup flag) changes.
    pub update: Vec<Found>,
    /// Discovered backends to remove.
    pub remove: Vec<SocketAddr>,
    /// Wanted addresses that are static backends already (those stay as configured).
    pub shadowed: Vec<SocketAddr>,
}

impl Diff {
    /// Whether nothing changes.
    pub fn is_empty(&self) -> bool {
        self.add.is_empty() && self.update.is_empty() && self.remove.is_empty()
    }
}

/// Compares a group's members (`present`, of which `discovered` came from
/// DNS, the rest are static) with the `wanted` discovered set.
pub fn diff(present: &[Found], discovered: &BTreeSet<SocketAddr>, wanted: &[Found]) -> Diff {
    let by_address: BTreeMap<SocketAddr, &Found> = present.iter().map(|f| (f.address, f)).collect();
    let mut out = Diff::default();
    for w in wanted {
        match by_address.get(&w.address) {
            None => out.add.push(*w),
            Some(_) if !discovered.contains(&w.address) => out.shadowed.push(w.address),
            Some(p) if p.weight != w.weight || p.backup != w.backup => out.update.push(*w),
            Some(_) => {}
        }
    }
    let keep: BTreeSet<SocketAddr> = wanted.iter().map(|w| w.address).collect();
    out.remove = discovered
        .iter()
        .filter(|a| !keep.contains(a) && by_address.contains_key(a))
        .copied()
        .collect();
    out
}

/// The file that keeps the last discovered sets next to the configuration:
/// `lb.toml` -> `lb.toml.discovered`. Rewritten, never appended to: it is a
/// cache for a start while the DNS fails, not a journal.
pub fn cache_path(config: &Path) -> PathBuf {
    let mut name = config.as_os_str().to_owned();
    name.push(".discovered");
    PathBuf::from(name)
}

/// One group's entry in the cache file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheEntry {
    /// The name it was found under.
    pub name: String,
    /// `srv`, `a` or `aaaa`.
    pub record: String,
    /// The set that was in force.
    pub backends: Vec<Found>,
}

/// The cache file's contents, by group.
pub type Cache = BTreeMap<String, CacheEntry>;

/// The sets in force of `trackers`, as the cache file holds them.
pub fn cache_of(trackers: &BTreeMap<String, Tracker>) -> Cache {
    trackers
        .iter()
        .map(|(group, t)| {
            (
                group.clone(),
                CacheEntry {
                    name: t.spec.name.clone(),
                    record: t.spec.record.as_str().to_string(),
                    backends: t.current.clone(),
                },
            )
        })
        .collect()
}

/// The cached set of `group`, if it was found by the same query.
pub fn cached_set(cache: &Cache, group: &str, spec: &Discovery) -> Option<Vec<Found>> {
    cache
        .get(group)
        .filter(|e| e.name == spec.name && e.record == spec.record.as_str())
        .map(|e| e.backends.clone())
}

/// Largest discovery cache read (a few hundred bytes per backend).
const MAX_CACHE_FILE: u64 = 64 << 20;

/// Reads the cache file; a missing one is empty.
pub fn load_cache(path: &Path) -> Result<Cache> {
    match lb_proxy::config_file::read_to_string(path, MAX_CACHE_FILE) {
        Ok(text) => serde_json::from_str(&text)
            .with_context(|| format!("{}: not a valid discovery cache", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Cache::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Writes the cache file whole and durably (`atomic_file`).
pub fn save_cache(path: &Path, cache: &Cache) -> Result<()> {
    let text = serde_json::to_string_pretty(cache)?;
    crate::atomic_file::replace(path, text.as_bytes(), crate::atomic_file::PRIVATE)
        .with_context(|| format!("writing {}", path.display()))
}

/// How long until the first query of a discovery that has just been
/// (re)configured: at once, except at start, where the first round ran
/// before the data plane was filled.
pub fn first_delay(spec: &Discovery, at_start: bool) -> Duration {
    if at_start {
        spec.interval
    } else {
        Duration::ZERO
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RecordKind;

    fn spec(hold_ms: u64) -> Discovery {
        Discovery {
            name: "_http._tcp.web.lab.test.".into(),
            record: RecordKind::Srv,
            nameservers: vec!["198.18.2.241:53".parse().unwrap()],
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(500),
            hold: Duration::from_millis(hold_ms),
            port: None,
            weight: 1,
        }
    }

    fn srv(priority: u16, weight: u16, port: u16, target: &str) -> SrvRecord {
        SrvRecord {
            priority,
            weight,
            port,
            target: target.into(),
        }
    }

    fn found(addr: &str, weight: u32) -> Found {
        Found {
            address: addr.parse().unwrap(),
            weight,
            backup: false,
        }
    }

    fn addresses(list: &[(&str, &[&str])]) -> BTreeMap<String, Vec<IpAddr>> {
        list.iter()
            .map(|(name, ips)| {
                (
                    name.to_string(),
                    ips.iter().map(|ip| ip.parse().unwrap()).collect(),
                )
            })
            .collect()
    }

    #[test]
    fn srv_answers_become_backends_with_their_ports_and_weights() {
        let records = [
            srv(10, 1, 8080, "be1.lab.test."),
            srv(10, 3, 8081, "be2.lab.test."),
            srv(10, 0, 8080, "be3.lab.test."),
        ];
        let addrs = addresses(&[
            ("be1.lab.test.", &["198.18.2.11"]),
            ("be2.lab.test.", &["198.18.2.12", "198.18.2.13"]),
            ("be3.lab.test.", &["198.18.2.14"]),
        ]);
        assert_eq!(
            srv_backends(&records, &addrs, false),
            vec![
                found("198.18.2.11:8080", 1),
                found("198.18.2.12:8081", 3),
                found("198.18.2.13:8081", 3),
                // Weight 0 still takes flows, as little as possible.
                found("198.18.2.14:8080", 1),
            ]
        );
    }

    #[test]
    fn only_the_best_priority_serves_and_pools_keep_the_rest_as_backups() {
        let records = [
            srv(20, 5, 80, "spare.lab.test."),
            srv(10, 1, 80, "main.lab.test."),
        ];
        let addrs = addresses(&[
            ("main.lab.test.", &["198.18.2.11"]),
            ("spare.lab.test.", &["198.18.2.12"]),
        ]);
        assert_eq!(
            srv_backends(&records, &addrs, false),
            vec![found("198.18.2.11:80", 1)]
        );
        let mut spare = found("198.18.2.12:80", 5);
        spare.backup = true;
        assert_eq!(
            srv_backends(&records, &addrs, true),
            vec![found("198.18.2.11:80", 1), spare]
        );
    }

    #[test]
    fn targets_without_addresses_root_targets_and_port_zero_add_nothing() {
        let records = [
            srv(0, 1, 80, "."),
            srv(0, 1, 0, "be1.lab.test."),
            srv(0, 1, 80, "gone.lab.test."),
        ];
        let addrs = addresses(&[("be1.lab.test.", &["198.18.2.11"])]);
        assert!(srv_backends(&records, &addrs, false).is_empty());
        assert!(srv_backends(&[], &addrs, false).is_empty());
    }

    #[test]
    fn targets_sharing_an_address_add_their_weights() {
        let records = [
            srv(0, 40000, 80, "a.lab.test."),
            srv(0, 40000, 80, "b.lab.test."),
            srv(0, 2, 81, "b.lab.test."),
        ];
        let addrs = addresses(&[
            ("a.lab.test.", &["198.18.2.11"]),
            ("b.lab.test.", &["198.18.2.11"]),
        ]);
        assert_eq!(
            srv_backends(&records, &addrs, false),
            vec![found("198.18.2.11:80", 65535), found("198.18.2.11:81", 2)]
        );
    }

    #[test]
    fn address_answers_take_the_configured_port_and_weight() {
        let ips: Vec<IpAddr> = vec![
            "198.18.2.12".parse().unwrap(),
            "198.18.2.11".parse().unwrap(),
            "198.18.2.12".parse().unwrap(),
        ];
        assert_eq!(
            address_backends(&ips, 8080, 7),
            vec![found("198.18.2.11:8080", 7), found("198.18.2.12:8080", 14)]
        );
        assert_eq!(
            Answer::from_backends(Vec::new(), "no A records"),
            Answer::Empty("no A records".into())
        );
    }

    #[test]
    fn records_replace_the_set_and_the_same_records_change_nothing() {
        let mut t = Tracker::new(spec(0), Family::V4);
        assert_eq!(t.state(), DiscoveryState::Pending);
        let now = Instant::now();
        let set = vec![found("198.18.2.12:80", 1), found("198.18.2.11:80", 1)];
        let Verdict::Apply(applied) = t.observe(Answer::Found(set.clone()), now) else {
            panic!("a first answer applies");
        };
        assert_eq!(applied, normalize(set.clone()));
        t.commit(applied);
        assert_eq!(t.state(), DiscoveryState::Ok);
        assert_eq!(t.observe(Answer::Found(set), now), Verdict::Keep);
        let fewer = vec![found("198.18.2.11:80", 1)];
        assert_eq!(
            t.observe(Answer::Found(fewer.clone()), now),
            Verdict::Apply(fewer)
        );
    }

    #[test]
    fn a_failing_resolver_keeps_the_last_good_set_and_says_so() {
        let mut t = Tracker::new(spec(0), Family::V4);
        let now = Instant::now();
        let set = vec![found("198.18.2.11:80", 1)];
        t.commit(set.clone());
        for i in 1..=3 {
            assert_eq!(
                t.observe(Answer::Failed("request timed out".into()), now),
                Verdict::Keep
            );
            assert_eq!(t.failures(), i);
        }
        assert_eq!(t.state(), DiscoveryState::Failing);
        assert_eq!(t.current(), set.as_slice());
        let info = t.info("web", now + Duration::from_secs(2));
        assert_eq!(info.state, DiscoveryState::Failing);
        assert_eq!(info.backends, 1);
        assert_eq!(info.last_error.as_deref(), Some("request timed out"));
        assert_eq!(info.since_success_ms, None, "never answered");
        // An answer again: ok, failures reset, the error kept for the record.
        assert_eq!(t.observe(Answer::Found(set), now), Verdict::Keep);
        let info = t.info("web", now + Duration::from_millis(1500));
        assert_eq!((info.state, info.failures), (DiscoveryState::Ok, 0));
        assert_eq!(info.since_success_ms, Some(1500));
        assert!(info.last_error.is_some());
    }

    #[test]
    fn an_empty_answer_removes_the_set_only_after_the_hold() {
        let mut t = Tracker::new(spec(30_000), Family::V4);
        let start = Instant::now();
        t.commit(vec![found("198.18.2.11:80", 1)]);
        let nx = || Answer::Empty("NXDOMAIN".into());
        assert_eq!(t.observe(nx(), start), Verdict::Keep);
        assert_eq!(t.state(), DiscoveryState::Holding);
        let later = start + Duration::from_secs(10);
        assert_eq!(t.observe(nx(), later), Verdict::Keep);
        let detail = t.info("web", later).detail.unwrap_or_default();
        assert!(detail.starts_with("NXDOMAIN for 10.0s"), "{detail}");
        // Records again within the hold: the countdown starts over.
        let set = vec![found("198.18.2.11:80", 1)];
        assert_eq!(t.observe(Answer::Found(set), later), Verdict::Keep);
        assert_eq!(t.state(), DiscoveryState::Ok);
        let again = later + Duration::from_secs(1);
        assert_eq!(t.observe(nx(), again), Verdict::Keep);
        assert_eq!(
            t.observe(nx(), again + Duration::from_secs(29)),
            Verdict::Keep
        );
        let end = again + Duration::from_secs(30);
        assert_eq!(t.observe(nx(), end), Verdict::Apply(Vec::new()));
        t.commit(Vec::new());
        assert_eq!(t.state(), DiscoveryState::Ok);
        assert_eq!(t.observe(nx(), end), Verdict::Keep, "nothing to remove");
    }

    #[test]
    fn a_zero_hold_removes_at_once_and_failures_never_do() {
        let mut t = Tracker::new(spec(0), Family::V4);
        let now = Instant::now();
        t.commit(vec![found("198.18.2.11:80", 1)]);
        assert_eq!(
            t.observe(Answer::Failed("SERVFAIL".into()), now),
            Verdict::Keep
        );
        assert_eq!(
            t.observe(Answer::Empty("no SRV records".into()), now),
            Verdict::Apply(Vec::new())
        );
    }

    #[test]
    fn a_refused_set_is_tried_again_with_the_next_answer() {
        let mut t = Tracker::new(spec(0), Family::V4);
        let now = Instant::now();
        let set = vec![found("198.18.2.11:80", 1)];
        assert!(matches!(
            t.observe(Answer::Found(set.clone()), now),
            Verdict::Apply(_)
        ));
        t.refused("too many backends".into());
        assert_eq!(t.state(), DiscoveryState::Failing);
        assert!(t.current().is_empty());
        assert!(matches!(
            t.observe(Answer::Found(set), now),
            Verdict::Apply(_)
        ));
    }

    #[test]
    fn diff_adds_updates_and_removes_only_discovered_backends() {
        let present = [
            found("198.18.2.11:80", 1), // static
            found("198.18.2.12:80", 1), // discovered, stays
            found("198.18.2.13:80", 1), // discovered, re-weighted
            found("198.18.2.14:80", 1), // discovered, gone
        ];
        let discovered: BTreeSet<SocketAddr> =
            ["198.18.2.12:80", "198.18.2.13:80", "198.18.2.14:80"]
                .iter()
                .map(|a| a.parse().unwrap())
                .collect();
        let wanted = [
            found("198.18.2.11:80", 9), // shadowed by the static one
            found("198.18.2.12:80", 1),
            found("198.18.2.13:80", 4),
            found("198.18.2.15:80", 1),
        ];
        let d = diff(&present, &discovered, &wanted);
        assert_eq!(d.add, vec![found("198.18.2.15:80", 1)]);
        assert_eq!(d.update, vec![found("198.18.2.13:80", 4)]);
        assert_eq!(d.remove, vec!["198.18.2.14:80".parse().unwrap()]);
        assert_eq!(d.shadowed, vec!["198.18.2.11:80".parse().unwrap()]);
        assert!(!d.is_empty());
        assert!(diff(&present, &discovered, &present[1..]).is_empty());
        // Emptying the set removes every discovered one and never a static one.
        assert_eq!(diff(&present, &discovered, &[]).remove.len(), 3);
    }

    #[test]
    fn reconcile_keeps_unchanged_trackers_and_seeds_changed_ones() {
        let text = |name: &str| {
            format!(
                "interfaces = [\"eth0\"]\n[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n\
                 [service.discovery]\nname = \"{name}\"\nnameservers = [\"198.18.2.241\"]\n"
            )
        };
        let config = crate::config::parse(&text("_http._tcp.a.test"), "t.toml").unwrap();
        let mut old = reconcile(&BTreeMap::new(), &config);
        assert_eq!(old.len(), 1);
        let t = old.get_mut("web").unwrap();
        assert_eq!(t.family(), Family::V4);
        let set = vec![found("198.18.2.11:80", 1)];
        assert!(matches!(
            t.observe(Answer::Found(set.clone()), Instant::now()),
            Verdict::Apply(_)
        ));
        t.commit(set);
        let same = reconcile(&old, &config);
        assert_eq!(same["web"].state(), DiscoveryState::Ok);
        let changed = crate::config::parse(&text("_http._tcp.b.test"), "t.toml").unwrap();
        let fresh = reconcile(&old, &changed);
        assert_eq!(fresh["web"].state(), DiscoveryState::Pending);
        assert_eq!(fresh["web"].current().len(), 1, "the old set stays");
        assert_eq!(fresh["web"].spec().name, "_http._tcp.b.test.");
        let none = crate::config::parse(
            "interfaces = [\"eth0\"]\n[[service]]\nname = \"web\"\nvip = \"198.18.100.1:80\"\n[[service.backend]]\naddress = \"198.18.2.11:80\"\n",
            "t.toml",
        )
        .unwrap();
        assert!(reconcile(&old, &none).is_empty());
    }

    #[test]
    fn the_cache_round_trips_and_is_used_only_for_the_same_query() {
        let dir = std::env::temp_dir().join(format!("lb-discovery-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = cache_path(&dir.join("lb.toml"));
        assert!(path.ends_with("lb.toml.discovered"));
        assert!(load_cache(&path).unwrap().is_empty());
        let mut trackers = BTreeMap::new();
        let mut t = Tracker::new(spec(0), Family::V4);
        t.commit(vec![found("198.18.2.11:80", 2)]);
        trackers.insert("web".to_string(), t);
        save_cache(&path, &cache_of(&trackers)).unwrap();
        let cache = load_cache(&path).unwrap();
        assert_eq!(
            cached_set(&cache, "web", &spec(0)),
            Some(vec![found("198.18.2.11:80", 2)])
        );
        let mut other = spec(0);
        other.name = "_http._tcp.other.test.".into();
        assert_eq!(cached_set(&cache, "web", &other), None);
        assert_eq!(cached_set(&cache, "api", &spec(0)), None);
        std::fs::write(&path, "not json").unwrap();
        assert!(load_cache(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
