//! The queries behind DNS discovery: one hickory resolver per discovery that
//! asks exactly the configured nameservers (no resolv.conf, hosts file,
//! search list, nor answers cached from one round to the next), and a tokio
//! task that asks again every interval and hands each round's [`Answer`] to
//! the agent.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::RData;
use hickory_resolver::{Resolver, TokioResolver};
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{debug, error};

use super::{Answer, Family, SrvRecord, address_backends, srv_backends};
use crate::config::{Discovery, RecordKind};

/// A resolver could not be built from a discovery's settings.
#[derive(Debug, thiserror::Error)]
#[error("building a resolver for {name}: {source}")]
pub struct ResolverError {
    /// The name the discovery queries.
    pub name: String,
    /// Why hickory refused.
    #[source]
    pub source: NetError,
}

/// One round's answer for a group, sent by its task to the agent.
#[derive(Debug, Clone)]
pub struct Event {
    /// The service, or `pool:NAME`.
    pub group: String,
    /// The discovery that asked (an event of a replaced one is ignored).
    pub spec: Discovery,
    /// The family its SRV targets were resolved to.
    pub family: Family,
    /// What came back.
    pub answer: Answer,
}

/// A resolver that asks `spec.nameservers` only, over UDP (TCP when an
/// answer is truncated), each query limited by `spec.timeout`.
pub fn resolver(spec: &Discovery) -> Result<TokioResolver, ResolverError> {
    let servers = spec
        .nameservers
        .iter()
        .map(|addr| {
            let mut udp = ConnectionConfig::udp();
            udp.port = addr.port();
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = addr.port();
            NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
        })
        .collect();
    // No domain and no search list: names are queried exactly as configured.
    let config = ResolverConfig::from_parts(None, Vec::new(), servers);
    let mut opts = ResolverOpts::default();
    opts.timeout = spec.timeout;
    // One retry; the round's own deadline bounds the whole anyway.
    opts.attempts = 1;
    opts.use_hosts_file = ResolveHosts::Never;
    Resolver::builder_with_config(config, TokioRuntimeProvider::default())
        .with_options(opts)
        .build()
        .map_err(|source| ResolverError {
            name: spec.name.clone(),
            source,
        })
}

/// A lookup that found nothing, told apart from one that failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Miss {
    /// The DNS answered that there is nothing (NXDOMAIN, or no records of the type).
    Empty(String),
    /// No usable answer.
    Failed(String),
}

/// Sorts a lookup error: NXDOMAIN and "no records" are answers; timeouts,
/// SERVFAIL, REFUSED and network errors are failures.
pub fn classify(err: &NetError) -> Miss {
    match err {
        NetError::Dns(DnsError::NoRecordsFound(no)) => {
            if no.response_code == ResponseCode::NXDomain {
                Miss::Empty("NXDOMAIN".into())
            } else {
                Miss::Empty(format!("no {} records", no.query.query_type()))
            }
        }
        NetError::Dns(DnsError::ResponseCode(code)) => Miss::Failed(code.to_string()),
        NetError::Timeout => Miss::Failed("no answer (timeout)".into()),
        other => Miss::Failed(other.to_string()),
    }
}

/// Runs one round: the discovery's query (and, for SRV, its targets'
/// addresses), within `spec.timeout` as a whole.
pub async fn query(resolver: &TokioResolver, spec: &Discovery, family: Family) -> Answer {
    // Every round asks the servers: a TTL does not delay a change (HAProxy's
    // resolvers do the same with `hold valid`).
    resolver.clear_cache();
    let round = async {
        match spec.record {
            RecordKind::Srv => srv_round(resolver, spec, family).await,
            RecordKind::A | RecordKind::Aaaa => {
                let family = if spec.record == RecordKind::A {
                    Family::V4
                } else {
                    Family::V6
                };
                match addresses(resolver, &spec.name, family).await {
                    Ok(ips) => Answer::from_backends(
                        address_backends(&ips, spec.port.unwrap_or(0), spec.weight),
                        &format!("no {} records", spec.record.as_str().to_uppercase()),
                    ),
                    Err(Miss::Empty(why)) => Answer::Empty(why),
                    Err(Miss::Failed(why)) => Answer::Failed(why),
                }
            }
        }
    };
    match tokio::time::timeout(spec.timeout, round).await {
        Ok(answer) => answer,
        Err(_) => Answer::Failed(format!("no answer within {:?}", spec.timeout)),
    }
}

/// The SRV query, then every target's addresses (concurrently).
async fn srv_round(resolver: &TokioResolver, spec: &Discovery, family: Family) -> Answer {
    let lookup = match resolver.srv_lookup(spec.name.as_str()).await {
        Ok(l) => l,
        Err(e) => {
            return match classify(&e) {
                Miss::Empty(why) => Answer::Empty(why),
                Miss::Failed(why) => Answer::Failed(why),
            };
        }
    };
    let records: Vec<SrvRecord> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::SRV(srv) => Some(SrvRecord {
                priority: srv.priority,
                weight: srv.weight,
                port: srv.port,
                target: srv.target.to_ascii(),
            }),
            _ => None,
        })
        .collect();
    let mut targets = JoinSet::new();
    let mut asked = std::collections::BTreeSet::new();
    // An answer is input: its targets are asked TARGET_LOOKUPS at a time,
    // not all at once (an answer of thousands would send as many queries).
    let slots = std::sync::Arc::new(tokio::sync::Semaphore::new(TARGET_LOOKUPS));
    for r in &records {
        if r.target != "." && asked.insert(r.target.clone()) {
            let (resolver, target, slots) = (resolver.clone(), r.target.clone(), slots.clone());
            targets.spawn(async move {
                let _slot = slots.acquire().await;
                let found = addresses(&resolver, &target, family).await;
                (target, found)
            });
        }
    }
    let mut addrs = BTreeMap::new();
    while let Some(joined) = targets.join_next().await {
        match joined {
            Ok((target, Ok(ips))) => {
                addrs.insert(target, ips);
            }
            Ok((target, Err(Miss::Empty(why)))) => {
                // The DNS says this target has no address: it adds no backend.
                debug!(%target, %why, "SRV target without addresses");
            }
            // A target whose lookup failed may well be up: the round tells nothing.
            Ok((target, Err(Miss::Failed(why)))) => {
                return Answer::Failed(format!("SRV target {target}: {why}"));
            }
            Err(e) => return Answer::Failed(format!("SRV target lookup: {e}")),
        }
    }
    Answer::from_backends(
        srv_backends(&records, &addrs, family == Family::Any),
        if records.is_empty() {
            "no SRV records"
        } else {
            "no SRV target with an address"
        },
    )
}

/// SRV targets looked up at once in one round.
const TARGET_LOOKUPS: usize = 16;

/// The addresses of `name` in `family` (`Any`: A records, else AAAA).
async fn addresses(
    resolver: &TokioResolver,
    name: &str,
    family: Family,
) -> Result<Vec<IpAddr>, Miss> {
    match family {
        Family::V4 | Family::V6 => address_records(resolver, name, family == Family::V6).await,
        Family::Any => match address_records(resolver, name, false).await {
            Err(Miss::Empty(_)) => address_records(resolver, name, true).await,
            other => other,
        },
    }
}

async fn address_records(
    resolver: &TokioResolver,
    name: &str,
    v6: bool,
) -> Result<Vec<IpAddr>, Miss> {
    let lookup = if v6 {
        resolver.ipv6_lookup(name).await
    } else {
        resolver.ipv4_lookup(name).await
    };
    let lookup = lookup.map_err(|e| classify(&e))?;
    let ips: Vec<IpAddr> = lookup
        .answers()
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) if !v6 => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) if v6 => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect();
    if ips.is_empty() {
        return Err(Miss::Empty(format!(
            "no {} records",
            if v6 { "AAAA" } else { "A" }
        )));
    }
    Ok(ips)
}

/// One round for each discovery at once (what the agent does before it
/// fills the data plane), each within its own timeout.
pub async fn first_round(discoveries: Vec<(String, Discovery, Family)>) -> Vec<(String, Answer)> {
    let mut set = JoinSet::new();
    for (group, spec, family) in discoveries {
        set.spawn(async move {
            let answer = match resolver(&spec) {
                Ok(r) => query(&r, &spec, family).await,
                Err(e) => Answer::Failed(e.to_string()),
            };
            (group, answer)
        });
    }
    let mut out = Vec::new();
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(pair) => out.push(pair),
            Err(e) => error!("a first discovery round failed to run: {e}"),
        }
    }
    out
}

/// Asks every `spec.interval`, after `first_delay`, until aborted or the agent is gone.
async fn run(
    group: String,
    spec: Discovery,
    family: Family,
    first_delay: Duration,
    events: UnboundedSender<Event>,
) {
    let resolver = match resolver(&spec) {
        Ok(r) => Some(r),
        Err(e) => {
            error!(%group, "DNS discovery cannot query: {e}");
            None
        }
    };
    tokio::time::sleep(first_delay).await;
    let mut ticks = tokio::time::interval(spec.interval);
    // A slow round delays the next one instead of bunching them up.
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let answer = match &resolver {
            Some(r) => query(r, &spec, family).await,
            None => Answer::Failed("no resolver (see the agent's log)".into()),
        };
        let event = Event {
            group: group.clone(),
            spec: spec.clone(),
            family,
            answer,
        };
        if events.send(event).is_err() {
            return;
        }
    }
}

/// The running discovery tasks, one per group; aborted when dropped.
pub struct Tasks {
    events: UnboundedSender<Event>,
    running: BTreeMap<String, (Discovery, Family, JoinHandle<()>)>,
}

impl Tasks {
    /// No tasks yet; their answers will go to `events`.
    pub fn new(events: UnboundedSender<Event>) -> Self {
        Self {
            events,
            running: BTreeMap::new(),
        }
    }

    /// Runs exactly the `wanted` discoveries: unchanged ones keep their
    /// task, the others are stopped or started (the first query after
    /// `first_delay(spec)`).
    pub fn reconcile(
        &mut self,
        wanted: Vec<(String, Discovery, Family)>,
        first_delay: impl Fn(&Discovery) -> Duration,
    ) {
        let mut next = BTreeMap::new();
        for (group, spec, family) in wanted {
            match self.running.remove(&group) {
                Some((s, f, task)) if s == spec && f == family => {
                    next.insert(group, (s, f, task));
                }
                old => {
                    if let Some((.., task)) = old {
                        task.abort();
                    }
                    let task = tokio::spawn(run(
                        group.clone(),
                        spec.clone(),
                        family,
                        first_delay(&spec),
                        self.events.clone(),
                    ));
                    next.insert(group, (spec, family, task));
                }
            }
        }
        for (_, (.., task)) in std::mem::replace(&mut self.running, next) {
            task.abort();
        }
    }
}

impl Drop for Tasks {
    fn drop(&mut self) {
        for (.., task) in self.running.values() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_resolver::net::NoRecords;
    use hickory_resolver::proto::op::Query;
    use hickory_resolver::proto::rr::{Name, RecordType};

    fn no_records(code: ResponseCode) -> NetError {
        let query = Query::query(Name::from_ascii("web.lab.test.").unwrap(), RecordType::SRV);
        NetError::Dns(DnsError::NoRecordsFound(NoRecords::new(query, code)))
    }

    #[test]
    fn nxdomain_and_nodata_are_answers_the_rest_failures() {
        assert_eq!(
            classify(&no_records(ResponseCode::NXDomain)),
            Miss::Empty("NXDOMAIN".into())
        );
        assert_eq!(
            classify(&no_records(ResponseCode::NoError)),
            Miss::Empty("no SRV records".into())
        );
        assert!(matches!(
            classify(&NetError::Dns(DnsError::ResponseCode(ResponseCode::ServFail))),
            Miss::Failed(why) if why.contains("Server Failure")
        ));
        assert!(matches!(
            classify(&NetError::Dns(DnsError::ResponseCode(
                ResponseCode::Refused
            ))),
            Miss::Failed(_)
        ));
        assert!(
            matches!(classify(&NetError::Timeout), Miss::Failed(why) if why.contains("timeout"))
        );
    }

    fn spec(nameserver: &str, timeout_ms: u64) -> Discovery {
        Discovery {
            name: "_http._tcp.web.lab.test.".into(),
            record: RecordKind::Srv,
            nameservers: vec![nameserver.parse().unwrap()],
            interval: Duration::from_millis(500),
            timeout: Duration::from_millis(timeout_ms),
            hold: Duration::ZERO,
            port: None,
            weight: 1,
        }
    }

    /// A nameserver that never answers: the round fails within its timeout
    /// (the real queries are exercised end to end in tests/discovery.rs).
    #[tokio::test]
    async fn a_silent_nameserver_fails_the_round_within_its_timeout() {
        // A bound UDP socket nobody reads: queries vanish without an ICMP error.
        let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = silent.local_addr().unwrap().to_string();
        let spec = spec(&addr, 300);
        let r = resolver(&spec).unwrap();
        let started = std::time::Instant::now();
        let answer = query(&r, &spec, Family::V4).await;
        let took = started.elapsed();
        assert!(matches!(answer, Answer::Failed(_)), "{answer:?}");
        assert!(took < Duration::from_secs(2), "took {took:?}");
    }
}
