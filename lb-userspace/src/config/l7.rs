//! The L7 proxy's tables: `[[frontend]]`, `[[pool]]` (with their
//! `[pool.health]` and `[pool.discovery]`) and `[[userlist]]`.
//!
//! The proxy's model (`lb_proxy`) is the schema: each table is typed by
//! its serde definitions and checked by its own `validate`, routing and
//! action compilers, but one table at a time, so that every mistake is
//! reported at once, each at the key it concerns (the raw tables keep each
//! value's span).

use std::collections::HashMap;
use std::ops::Range;

use serde::de::DeserializeOwned;
use toml::Spanned;

use super::listeners::Listener;
use super::raw::{RawPool, RawProxy, RawTable};
use super::{Checker, Forwarding, ProxySection, rules};
use lb_proxy::routing::RoutingError;
use lb_proxy::{Algorithm, ConfigError, Frontend, Pool, ProxyConfig, UserList, actions, routing};

/// Most serving threads `threads` may ask for.
const MAX_THREADS: i64 = 256;
/// Bounds of `hard_stop_after`.
const MIN_HARD_STOP: std::time::Duration = std::time::Duration::from_secs(1);
const MAX_HARD_STOP: std::time::Duration = std::time::Duration::from_secs(30 * 86_400);
/// CPUs `cpu_map` may name: those of a `cpu_set_t` (CPU_SETSIZE).
const MAX_CPU: i64 = 1023;

/// Syslog facilities by name, as HAProxy and syslog(3) spell them.
const FACILITIES: [&str; 24] = [
    "kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "auth2",
    "ftp", "ntp", "audit", "alert", "cron2", "local0", "local1", "local2", "local3", "local4",
    "local5", "local6", "local7",
];

impl Checker<'_> {
    /// Reads `[proxy]`'s `syslog` (`ip:port` for UDP, or an absolute path
    /// of a Unix datagram socket), `syslog_facility` (default `local0`) and
    /// `syslog_format` (default `rfc3164`).
    pub(super) fn syslog(&mut self, raw: &RawProxy) -> Option<super::SyslogConfig> {
        let facility = match &raw.syslog_facility {
            None => 16,
            Some(f) => match FACILITIES.iter().position(|n| n == f.get_ref()) {
                Some(i) if raw.syslog.is_some() => i as u8,
                Some(_) => {
                    self.at(&f.span(), "syslog_facility needs syslog");
                    return None;
                }
                None => {
                    self.at(
                        &f.span(),
                        format!(
                            "unknown syslog_facility \"{}\"; expected one of {}",
                            f.get_ref(),
                            FACILITIES.join(", ")
                        ),
                    );
                    return None;
                }
            },
        };
        const FORMATS: &[(&str, super::SyslogFormat)] = &[
            ("rfc3164", super::SyslogFormat::Rfc3164),
            ("rfc5424", super::SyslogFormat::Rfc5424),
        ];
        let format = match &raw.syslog_format {
            Some(f) if raw.syslog.is_none() => {
                self.at(&f.span(), "syslog_format needs syslog");
                return None;
            }
            f => self.choice(f.as_ref(), "syslog_format", FORMATS)?,
        };
        let value = raw.syslog.as_ref()?;
        let text = value.get_ref();
        let target = if let Some(addr) = text.strip_prefix("tcp@").and_then(|a| a.parse().ok()) {
            super::SyslogTarget::Tcp(addr)
        } else if let Ok(addr) = text.strip_prefix("udp@").unwrap_or(text).parse() {
            super::SyslogTarget::Udp(addr)
        } else if text.starts_with('/') {
            let path = std::path::PathBuf::from(text);
            // On its host, what is not a socket takes no line.
            if self.host_resources {
                use std::os::unix::fs::FileTypeExt as _;
                let problem = match std::fs::metadata(&path) {
                    Err(e) => Some(format!("syslog {text}: {e}")),
                    Ok(m) if !m.file_type().is_socket() => {
                        Some(format!("syslog {text} is not a socket"))
                    }
                    Ok(_) => None,
                };
                if let Some(problem) = problem {
                    self.at(&value.span(), problem);
                    return None;
                }
            }
            super::SyslogTarget::Unix(path)
        } else {
            self.at(
                &value.span(),
                format!(
                    "syslog \"{text}\" is neither ip:port (UDP; or udp@ip:port), tcp@ip:port nor an absolute path (a Unix datagram socket, such as /dev/log)"
                ),
            );
            return None;
        };
        Some(super::SyslogConfig {
            target,
            facility,
            format,
        })
    }

    /// Reads `[proxy]`: `threads` (default: the CPUs the process may run
    /// on), `cpu_map` (default: no pinning) and `hard_stop_after`.
    pub(super) fn threads(&mut self, raw: Option<Spanned<RawProxy>>) -> lb_proxy::Threads {
        let mut threads = lb_proxy::Threads::default();
        let Some(raw) = raw.map(Spanned::into_inner) else {
            return threads;
        };
        if let Some(n) = raw.threads {
            match usize::try_from(*n.get_ref()) {
                Ok(count) if (1..=MAX_THREADS).contains(n.get_ref()) => threads.count = count,
                _ => self.at(
                    &n.span(),
                    format!(
                        "threads {} is out of range; expected 1..={MAX_THREADS} serving threads",
                        n.get_ref()
                    ),
                ),
            }
        }
        if let Some(value) = &raw.hard_stop_after
            && let Some(d) = self.duration(value, "hard_stop_after")
        {
            if (MIN_HARD_STOP..=MAX_HARD_STOP).contains(&d) {
                threads.hard_stop_after = d;
            } else {
                self.at(
                    &value.span(),
                    "hard_stop_after is out of range; expected 1s..=30d",
                );
            }
        }
        if let Some(list) = raw.cpu_map {
            if list.get_ref().is_empty() {
                self.at(
                    &list.span(),
                    "cpu_map is empty; leave it out to not pin the threads",
                );
            }
            for cpu in list.into_inner() {
                match usize::try_from(*cpu.get_ref()) {
                    // On its host, a CPU the process may not run on is a
                    // mistake: its thread would run unpinned.
                    Ok(c)
                        if *cpu.get_ref() <= MAX_CPU
                            && self.host_resources
                            && !lb_proxy::may_run_on(c) =>
                    {
                        self.at(
                            &cpu.span(),
                            format!("cpu_map entry {c} is not a CPU this process may run on"),
                        )
                    }
                    Ok(c) if *cpu.get_ref() <= MAX_CPU => threads.cpu_map.push(c),
                    _ => self.at(
                        &cpu.span(),
                        format!(
                            "cpu_map entry {} is not a CPU number; expected 0..={MAX_CPU}",
                            cpu.get_ref()
                        ),
                    ),
                }
            }
        }
        threads
    }

    /// Types and checks the proxy's tables; what is wrong is recorded, what
    /// is right is returned.
    pub(super) fn proxy_section(
        &mut self,
        frontends: Vec<Spanned<RawTable>>,
        pools: Vec<Spanned<RawPool>>,
        userlists: Vec<Spanned<RawTable>>,
    ) -> ProxySection {
        let userlists = self.userlists(userlists);
        let mut section = ProxySection::default();
        let mut names = HashMap::new();
        for raw in pools {
            let span = raw.span();
            let raw = raw.into_inner();
            let Some(pool) = self.typed::<Pool>(&raw.keys, &span, "pool") else {
                continue;
            };
            self.unique(&mut names, &raw.keys, &pool.name, "pool");
            self.pool(&raw.keys, &span, &pool);
            if let Some(h) = raw.health
                && let Some(check) = self.health(h)
            {
                section.1.push((pool.name.clone(), check));
            }
            if let Some(d) = raw.discovery
                && let Some(discovery) = self.discovery(d, None, Forwarding::Nat)
            {
                section.2.push((pool.name.clone(), discovery));
            }
            section.0.pools.push(pool);
        }
        // Frontends are checked against the pools' names only: a pool's own
        // mistakes are reported once, at the pool.
        let stubs: Vec<Pool> = names
            .keys()
            .map(|name: &String| Pool::new(name, Algorithm::RoundRobin, Vec::new()))
            .collect();
        let mut names = HashMap::new();
        for raw in frontends {
            let span = raw.span();
            let Some(frontend) = self.typed::<Frontend>(raw.get_ref(), &span, "frontend") else {
                continue;
            };
            self.unique(&mut names, raw.get_ref(), &frontend.name, "frontend");
            let alone = ProxyConfig {
                frontends: vec![frontend],
                pools: stubs.clone(),
                userlists: userlists.clone(),
            };
            self.frontend(raw.get_ref(), &span, &alone);
            section.0.frontends.extend(alone.frontends);
        }
        section.0.userlists = userlists;
        section
    }

    /// Types `[[userlist]]` tables and checks each alone; returns the good ones.
    fn userlists(&mut self, raw: Vec<Spanned<RawTable>>) -> Vec<UserList> {
        let mut names = HashMap::new();
        let mut good = Vec::new();
        for table in raw {
            let span = table.span();
            let Some(list) = self.typed::<UserList>(table.get_ref(), &span, "userlist") else {
                continue;
            };
            if !self.unique(&mut names, table.get_ref(), &list.name, "userlist") {
                continue;
            }
            let alone = ProxyConfig {
                userlists: vec![list],
                ..ProxyConfig::default()
            };
            match actions::compile(&alone) {
                Ok(_) => good.extend(alone.userlists),
                Err(e) => {
                    let key = match &e {
                        actions::ActionError::UserList { reason, .. } if reason == "empty name" => {
                            "name"
                        }
                        _ => "users",
                    };
                    self.at_key(table.get_ref(), key, &span, e.to_string());
                }
            }
        }
        good
    }

    /// Checks one pool alone: the proxy's rules, then the L4 rules its
    /// servers share with `lb add backend pool:NAME`.
    fn pool(&mut self, keys: &RawTable, span: &Range<usize>, pool: &Pool) {
        let alone = ProxyConfig {
            pools: vec![pool.clone()],
            ..ProxyConfig::default()
        };
        // A repeated server is reported at its entry, below.
        if let Err(e) = alone.validate().or_else(|e| match e {
            ConfigError::DuplicateServer { .. } => Ok(()),
            e => Err(e),
        }) {
            let key = match e {
                ConfigError::BadServerCookie { index, .. } => {
                    // At the server's entry, and its own checks below too.
                    self.at_entry(keys, ("servers", index), span, e.to_string());
                    return self.servers(keys, span, pool);
                }
                ConfigError::BadHash { .. } => ["hash_header", "hash_query", "algorithm"],
                ConfigError::BadServerTls { key, .. } => [key, "tls", "tls"],
                ConfigError::BadCookie(_) => ["cookie", "cookie", "cookie"],
                ConfigError::BadFailTimeout(_) => ["fail_timeout", "fail_timeout", "fail_timeout"],
                ConfigError::BadSlowstart(_) => ["slowstart", "slowstart", "slowstart"],
                _ => ["name", "name", "name"],
            }
            .into_iter()
            .find(|k| keys.contains_key(*k))
            .unwrap_or("servers");
            self.at_key(keys, key, span, e.to_string());
        } else if self.host_resources
            && let Some(problem) = lb_proxy::pool_host_problems(pool)
        {
            self.at_key(keys, problem.key, span, problem.reason);
        }
        self.servers(keys, span, pool);
    }

    /// Checks each server of a pool: its address, weight, and that it is
    /// listed once.
    fn servers(&mut self, keys: &RawTable, span: &Range<usize>, pool: &Pool) {
        if let Err(why) = rules::pool_servers(&pool.name, pool.servers.len()) {
            self.at(span, why);
        }
        let mut seen = std::collections::HashSet::new();
        let spans = keys
            .get("servers")
            .map(|v| entry_spans(self.lines.text, v.span()))
            .unwrap_or_default();
        for (i, server) in pool.servers.iter().enumerate() {
            let problem = rules::endpoint(server.address)
                .map_err(|why| format!("server {} {why}", server.address))
                .and_then(|()| rules::weight(i64::from(server.weight)).map(drop))
                .and_then(|()| match seen.insert(server.address) {
                    true => Ok(()),
                    false => Err(format!("server {} is listed twice", server.address)),
                });
            let at = spans.get(i).unwrap_or(span).clone();
            if let Err(why) = problem {
                self.at(&at, format!("pool \"{}\": {why}", pool.name));
            } else {
                let key = (super::Group::pool_name(&pool.name), server.address);
                self.backend_spans.insert(key, at);
            }
        }
    }

    /// Checks one frontend (`alone` holds it, stubs of every pool and the
    /// good userlists): its settings, its routing, its actions.
    fn frontend(&mut self, keys: &RawTable, span: &Range<usize>, alone: &ProxyConfig) {
        if let Err(e) = alone.validate() {
            let key = match e {
                ConfigError::UnknownPool { .. } => "default_pool",
                ConfigError::NoBinds(_) => "binds",
                ConfigError::NoConnections(_) => "max_connections",
                ConfigError::PerSourceAboveMax { .. } => "max_connections_per_source",
                ConfigError::BadSendBuffer { .. } => "send_buffer",
                ConfigError::BadTls(_) | ConfigError::BadClientAuth { .. } => "tls",
                ConfigError::TcpMode { .. } => "mode",
                ConfigError::BadErrorPage { .. } => "error_pages",
                ConfigError::BadCompression { .. } => "compression",
                ConfigError::BadRequestIdHeader(_) => "request_id_header",
                _ => "name",
            };
            self.at_key(keys, key, span, e.to_string());
        } else if self.host_resources {
            for fe in &alone.frontends {
                for problem in lb_proxy::frontend_host_problems(fe) {
                    match problem.index {
                        Some(i) => self.at_entry(keys, (problem.key, i), span, problem.reason),
                        None => self.at_key(keys, problem.key, span, problem.reason),
                    }
                }
            }
        }
        let spans = keys
            .get("binds")
            .map(|v| entry_spans(self.lines.text, v.span()))
            .unwrap_or_default();
        for fe in &alone.frontends {
            for (i, bind) in fe.binds.iter().enumerate() {
                self.listening(Listener {
                    addr: *bind,
                    span: spans.get(i).unwrap_or(span).clone(),
                    owner: super::listeners::frontend(&fe.name),
                    try_bind: false,
                });
            }
        }
        let mut acl_reported = false;
        if let Err(e) = routing::router(alone) {
            let entry = match &e {
                RoutingError::Acl { .. } => {
                    acl_reported = true;
                    ("acl", usize::MAX)
                }
                RoutingError::UnknownPool { pool, .. } => {
                    let rules = alone.frontends.first().map(|f| &f.use_pool[..]);
                    let i = rules.and_then(|r| r.iter().position(|u| &u.pool == pool));
                    ("use_pool", i.unwrap_or(usize::MAX))
                }
            };
            self.at_entry(keys, entry, span, e.to_string());
        }
        match actions::compile(alone) {
            Ok(_) => {}
            // The router compiled the same ACLs and said why already.
            Err(actions::ActionError::Acl { .. }) if acl_reported => {}
            Err(e) => {
                let entry = match &e {
                    // 1-based in the message.
                    actions::ActionError::Rule { list, index, .. } => (*list, index - 1),
                    _ => ("acl", usize::MAX),
                };
                self.at_entry(keys, entry, span, e.to_string());
            }
        }
    }

    /// Types a table with the proxy's serde definitions; a mistake is
    /// recorded at the key serde names, else at the table.
    fn typed<T: DeserializeOwned>(
        &mut self,
        keys: &RawTable,
        span: &Range<usize>,
        what: &str,
    ) -> Option<T> {
        let table: toml::Table = keys
            .iter()
            .map(|(k, v)| (k.clone(), v.get_ref().clone()))
            .collect();
        match toml::Value::Table(table).try_into() {
            Ok(typed) => Some(typed),
            Err(e) => {
                let text = e.to_string();
                let key = serde_key(&text).unwrap_or_default();
                // One line: "invalid type: ..., expected u32 in `binds`".
                let reason = text.trim().replace("\nin ", " in ").replace('\n', ": ");
                let name = keys.get("name").and_then(|n| n.get_ref().as_str());
                let reason = match name {
                    Some(name) => format!("{what} \"{name}\": {reason}"),
                    None => format!("{what}: {reason}"),
                };
                self.at_key(keys, key, span, reason);
                None
            }
        }
    }

    /// Records a second table of kind `what` named `name`, at its name;
    /// whether the name was new.
    fn unique(
        &mut self,
        seen: &mut HashMap<String, usize>,
        keys: &RawTable,
        name: &str,
        what: &str,
    ) -> bool {
        let Some(at) = keys.get("name").map(Spanned::span) else {
            return true;
        };
        if let Some(first) = seen.get(name) {
            self.at(
                &at,
                format!("duplicate {what} name \"{name}\" (first on line {first})"),
            );
            return false;
        }
        seen.insert(name.to_string(), self.line(&at));
        true
    }

    /// Records `reason` at entry `index` of the array at `key`; at the whole
    /// value when it has no such entry, at the table without the key.
    fn at_entry(
        &mut self,
        keys: &RawTable,
        (key, index): (&str, usize),
        table: &Range<usize>,
        reason: String,
    ) {
        let span = keys.get(key).map_or_else(
            || table.clone(),
            |v| entry_span(self.lines.text, v.span(), index),
        );
        self.at(&span, reason);
    }

    /// Records `reason` at the value of `key`, or at the table without it.
    fn at_key(&mut self, keys: &RawTable, key: &str, table: &Range<usize>, reason: String) {
        let span = keys.get(key).map_or_else(|| table.clone(), Spanned::span);
        self.at(&span, reason);
    }
}

/// Where entry `index` of the array at `value` (a span of `text`) lies; the
/// whole value if it is not an array or has no such entry. The raw tables
/// keep spans of values only: the array's text is parsed again for its
/// entries' spans.
fn entry_span(text: &str, value: Range<usize>, index: usize) -> Range<usize> {
    entry_spans(text, value.clone())
        .get(index)
        .cloned()
        .unwrap_or(value)
}

/// Where each entry of the array at `value` lies (none if it is not an
/// array): one parse for all of them.
fn entry_spans(text: &str, value: Range<usize>) -> Vec<Range<usize>> {
    #[derive(serde::Deserialize)]
    struct Wrapped {
        v: Vec<Spanned<toml::Value>>,
    }
    const PREFIX: &str = "v = ";
    let Some(array) = text.get(value.clone()) else {
        return Vec::new();
    };
    let parsed = toml::from_str::<Wrapped>(&format!("{PREFIX}{array}"));
    let shift =
        |e: Range<usize>| value.start + e.start - PREFIX.len()..value.start + e.end - PREFIX.len();
    parsed
        .map(|w| w.v.iter().map(|e| shift(e.span())).collect())
        .unwrap_or_default()
}

/// The top-level key a serde error is about: `unknown field `x``, or the
/// path `in `x.y`` toml appends.
fn serde_key(message: &str) -> Option<&str> {
    let quoted = |after: &str| {
        let rest = &message[message.find(after)? + after.len()..];
        let path = &rest[..rest.find('`')?];
        path.split(['.', '[']).next()
    };
    quoted("unknown field `").or_else(|| quoted("\nin `"))
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use super::serde_key;
    use crate::config::*;

    #[test]
    fn serde_errors_name_their_key() {
        assert_eq!(
            serde_key("unknown field `bind`, expected one of `name`, `binds`"),
            Some("bind")
        );
        assert_eq!(
            serde_key("invalid type: string \"x\", expected u32\nin `acl.path`\n"),
            Some("acl")
        );
        assert_eq!(serde_key("missing field `binds`"), None);
    }

    #[test]
    fn every_l7_mistake_is_reported_at_its_own_key() {
        let lines = [
            HEAD,
            "[[frontend]]",
            "name = \"a\"",
            "binds = [\"198.18.100.1:80\"]",
            "default_pool = \"nope\"",
            "[[frontend]]",
            "name = \"b\"",
            "binds = []",
            "default_pool = \"app\"",
            "[[pool]]",
            "name = \"app\"",
            "hash_query = true",
            "[[pool]]",
            "name = \"slow\"",
            "timeout_server = 500",
        ];
        let errs = errors(&lines);
        let got: Vec<(usize, usize)> = errs.iter().map(|e| (e.line, e.column)).collect();
        assert_eq!(got, [(5, 16), (8, 9), (12, 14), (15, 18)], "{errs:#?}");
        assert!(errs[0].reason.contains("unknown default_pool \"nope\""));
        assert!(errs[1].reason.contains("no binds"));
        assert!(errs[2].reason.contains("hash_query needs algorithm uri"));
        assert!(
            errs[3].reason.contains("duration 500 has no unit"),
            "{}",
            errs[3].reason
        );
    }

    /// A frontend `f` on line 2 with default pool `app` (line 6), then `extra`
    /// from line 9.
    fn l7(extra: &[&'static str]) -> Vec<&'static str> {
        let mut v = vec![
            HEAD,
            "[[frontend]]",
            "name = \"f\"",
            "binds = [\"198.18.100.1:80\"]",
            "default_pool = \"app\"",
            "[[pool]]",
            "name = \"app\"",
            "servers = [{ address = \"198.18.2.11:8080\" }]",
        ];
        v.extend_from_slice(extra);
        v
    }

    #[test]
    fn l7_tables_are_checked_one_by_one() {
        assert!(parse(&text(&l7(&[])), "lb.toml").is_ok());
        for (extra, line, needle) in [
            (
                &[
                    "[[frontend]]",
                    "name = \"f\"",
                    "binds = [\"198.18.100.1:81\"]",
                    "default_pool = \"app\"",
                ][..],
                10,
                "duplicate frontend name \"f\" (first on line 3)",
            ),
            (
                &[
                    "[[pool]]",
                    "name = \"b\"",
                    "servers = [{ address = \"198.18.2.11:0\" }]",
                ][..],
                11,
                "server 198.18.2.11:0 has port 0",
            ),
            (
                &[
                    "[[frontend]]",
                    "name = \"g\"",
                    "binds = [\"198.18.100.1:82\"]",
                    "default_pool = \"app\"",
                    "request_id_header = \"Content-Length\"",
                ][..],
                13,
                "frontend \"g\": request_id_header must be a header name, not a framing",
            ),
            (
                &[
                    "[[pool]]",
                    "name = \"b\"",
                    "max_fails = 3",
                    "fail_timeout = \"2h\"",
                ][..],
                12,
                "pool \"b\": fail_timeout must be within 1s..=1h",
            ),
            (
                &["[[pool]]", "name = \"b\"", "slowstart = \"2h\""][..],
                11,
                "pool \"b\": slowstart must be at most 1h",
            ),
            (
                &[
                    "[[pool]]",
                    "name = \"b\"",
                    "servers = [{ address = \"198.18.2.11:80\", weight = 70000 }]",
                ][..],
                11,
                "weight 70000 is out of range",
            ),
            (
                &[
                    "[[pool]]",
                    "name = \"b\"",
                    "servers = [{ address = \"198.18.2.11:80\" }, { address = \"198.18.2.11:80\" }]",
                ][..],
                11,
                "server 198.18.2.11:80 is listed twice",
            ),
            (
                &["[frontend.compression]", "level = 12"][..],
                9,
                "compression: level 12 is out of range; expected 1..=9",
            ),
            (
                &["[[pool]]", "name = \"b\"", "timeout_connect = \"5 s\""][..],
                11,
                "\"5 s\" is not a duration",
            ),
            (
                &["[[pool]]", "name = \"b\"", "sever = 1"][..],
                11,
                "pool \"b\": unknown field `sever`",
            ),
            (
                &[
                    "[[userlist]]",
                    "name = \"u\"",
                    "users = [{ name = \"a\", password = \"plain\" }]",
                ][..],
                11,
                "must be a SHA-512 crypt hash",
            ),
        ] {
            expect_one(&l7(extra), line, needle);
        }
    }

    #[test]
    fn max_connections_beyond_a_process_s_files_is_refused() {
        // The proxy's semaphore panicked at start on such a number.
        let mut lines = l7(&[]);
        lines.insert(5, "max_connections = 4000000000000000000");
        expect_one(&lines, 6, "max_connections must be 1..=1073741824");
        lines[5] = "max_connections = 1073741824";
        assert!(parse(&text(&lines), "lb.toml").is_ok());
    }

    #[test]
    fn max_connections_per_source_beyond_max_connections_is_refused() {
        let mut lines = l7(&[]);
        lines.splice(
            5..5,
            ["max_connections = 100", "max_connections_per_source = 101"],
        );
        let errs = errors(&lines);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(
            errs[0].to_string(),
            "lb.toml:7:30: frontend \"f\": max_connections_per_source 101 is out of range; \
             expected 0 (no limit)..=100 (its max_connections)"
        );
        lines[6] = "max_connections_per_source = -1";
        expect_one(&lines, 7, "max_connections_per_source");
        lines[6] = "max_connections_per_source = 100";
        assert!(parse(&text(&lines), "lb.toml").is_ok());
    }

    #[test]
    fn a_send_buffer_out_of_range_is_refused_at_its_line() {
        let mut lines = l7(&[]);
        lines.splice(5..5, ["send_buffer = 100"]);
        let errs = errors(&lines);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(
            errs[0].to_string(),
            "lb.toml:6:15: frontend \"f\": send_buffer 100 is out of range; expected 0 (the \
             kernel's autotuning) or 4096..=4194304 bytes"
        );
        lines[5] = "send_buffer = 65536";
        assert!(parse(&text(&lines), "lb.toml").is_ok());
    }

    #[test]
    fn a_reject_rule_looking_past_the_source_is_refused_at_its_line() {
        let mut lines = l7(&[]);
        lines.splice(
            5..5,
            [
                "acl = [{ name = \"x\", path = \"/x\" }, { name = \"s\", src = \"10.0.0.0/8\" }]",
                "request = [{ action = \"deny\", if = \"x\" },",
                "  { action = \"reject\", if = \"s or x\" }]",
            ],
        );
        let errs = errors(&lines);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        let e = errs[0].to_string();
        assert!(e.starts_with("lb.toml:8:"), "{e}");
        assert!(e.contains("`src` ACLs only, and `x` uses `path`"), "{e}");
        lines[7] = "  { action = \"reject\", if = \"s\" }]";
        assert!(parse(&text(&lines), "lb.toml").is_ok());
    }

    #[test]
    fn a_tcp_frontend_with_http_rules_is_refused_at_its_mode() {
        let mut lines = l7(&[]);
        lines.splice(
            5..5,
            ["mode = \"tcp\"", "acl = [{ name = \"x\", path = \"/x\" }]"],
        );
        let errs = errors(&lines);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        let e = errs[0].to_string();
        assert!(
            e.starts_with(
                "lb.toml:6:8: frontend \"f\": ACL `x` uses `path`, which needs mode http"
            ),
            "{e}"
        );
        lines[6] = "acl = [{ name = \"x\", sni = \"a.example\" }]";
        assert!(parse(&text(&lines), "lb.toml").is_ok());
        lines[5] = "mode = \"udp\"";
        expect_one(&lines, 6, "mode");
    }

    #[test]
    fn a_bad_persistence_cookie_name_is_refused_at_its_line() {
        let mut lines = l7(&["cookie = \"SRV ID\""]);
        let errs = errors(&lines);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(
            errs[0].to_string(),
            "lb.toml:9:10: pool \"app\": cookie must be a cookie name (letters, digits and \
             !#$%&'*+-.^_`|~)"
        );
        lines[8] = "cookie = \"SRVID\"";
        assert!(parse(&text(&lines), "lb.toml").is_ok());
    }

    #[test]
    fn client_certificate_settings_without_client_ca_are_refused_at_their_line() {
        let mut lines = l7(&[]);
        lines.splice(
            5..5,
            ["tls = { certs = [{ cert = \"a.pem\", key = \"a.key\" }], verify_client = \"optional\" }"],
        );
        let errs = errors(&lines);
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(
            errs[0].to_string(),
            "lb.toml:6:7: frontend \"f\": verify_client, client_crl and client_cert_header need client_ca"
        );
        lines[5] = "tls = { certs = [{ cert = \"a.pem\", key = \"a.key\" }], client_ca = \"ca.pem\", \
                    verify_client = \"optional\", client_cert_header = \"X-Client-Cert\" }";
        assert!(parse(&text(&lines), "lb.toml").is_ok());
        lines[5] =
            "tls = { certs = [{ cert = \"a.pem\", key = \"a.key\" }], verify_client = \"maybe\" }";
        expect_one(&lines, 6, "verify_client");
        lines[5] =
            "tls = { certs = [{ cert = \"a.pem\", key = \"a.key\" }], min_version = \"1.3\" }";
        assert!(parse(&text(&lines), "lb.toml").is_ok());
        lines[5] =
            "tls = { certs = [{ cert = \"a.pem\", key = \"a.key\" }], min_version = \"1.1\" }";
        expect_one(&lines, 6, "unknown variant `1.1`, expected `1.2` or `1.3`");
    }

    #[test]
    fn what_the_proxy_needs_of_this_host_is_tried_at_load_and_refused_at_its_line() {
        let dir = std::env::temp_dir().join(format!("lb-config-host-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["a.test".to_string()]).unwrap();
        let (cert, key, page) = (dir.join("a.pem"), dir.join("a.key"), dir.join("503.html"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        std::fs::write(&page, "<p>later</p>").unwrap();
        let missing = dir.join("missing.pem");
        // A port another program listens on, without SO_REUSEPORT.
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let taken = taken.local_addr().unwrap();
        let file = dir.join("lb.toml");
        let load_with = |tls_key: &Path, page: &Path, ca: &Path, bind: &str| {
            let binds = format!("binds = [\"127.0.0.1:0\", \"{bind}\"]");
            let tls = format!(
                "tls = {{ certs = [{{ cert = \"{}\", key = \"{}\" }}] }}",
                cert.display(),
                tls_key.display()
            );
            let pages = format!("error_pages = {{ 503 = \"{}\" }}", page.display());
            let ca = format!("ca = \"{}\"", ca.display());
            let mut lines: Vec<&str> = l7(&["tls = true"]);
            lines.push(&ca);
            lines[3] = &binds;
            lines.splice(5..5, [tls.as_str(), pages.as_str()]);
            let text = text(&lines);
            // Text alone (tests) is not tried against this host.
            assert!(parse(&text, "lb.toml").is_ok());
            std::fs::write(&file, &text).unwrap();
            load(&file).map_err(|e| e.0)
        };
        assert!(load_with(&key, &page, &cert, "[::1]:0").is_ok());
        let errs = load_with(&missing, &missing, &missing, &taken.to_string()).unwrap_err();
        let got: Vec<(usize, &str)> = errs.iter().map(|e| (e.line, e.reason.as_str())).collect();
        assert_eq!(got.len(), 4, "{errs:#?}");
        assert_eq!(got[0].0, 4, "binds, {errs:#?}");
        assert_eq!(errs[0].column, 25, "the second bind, {errs:#?}");
        assert!(
            got[0].1.contains(&format!("cannot bind {taken}")),
            "{errs:#?}"
        );
        assert_eq!(got[1].0, 6, "tls, {errs:#?}");
        assert!(
            got[1].1.starts_with("frontend \"f\": reading "),
            "{errs:#?}"
        );
        assert_eq!(got[2].0, 7, "error_pages, {errs:#?}");
        assert!(got[2].1.contains("error page 503"), "{errs:#?}");
        assert_eq!(got[3].0, 12, "ca, {errs:#?}");
        assert!(
            got[3].1.starts_with("pool \"app\": reading ca "),
            "{errs:#?}"
        );
        // A certificate as its own key, a key as trust anchors.
        let errs = load_with(&cert, &page, &key, "[::1]:0").unwrap_err();
        let got: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(got, [6, 12], "{errs:#?}");
        assert!(errs[0].reason.contains("no private key"), "{errs:#?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_pools_client_certificate_is_refused_at_the_key_that_is_wrong() {
        let text_of = |extra: &[&str]| {
            let mut lines: Vec<String> = l7(&["tls = true", "verify = false"])
                .into_iter()
                .map(String::from)
                .collect();
            lines.extend(extra.iter().map(|l| l.to_string()));
            lines.join("\n").replace("198.18.100.1:80", "127.0.0.1:0")
        };
        // Mistakes of the file itself, at the key.
        for (extra, line, needle) in [
            (&["cert = \"/c.pem\""][..], 11, "cert needs key"),
            (&["key = \"/c.key\""][..], 11, "key needs cert"),
        ] {
            let errs = parse(&text_of(extra), "lb.toml").unwrap_err().0;
            assert_eq!(errs.len(), 1, "{errs:#?}");
            assert_eq!(errs[0].line, line, "{errs:#?}");
            assert!(errs[0].reason.contains(needle), "{errs:#?}");
        }
        let errs = parse(
            &text_of(&["min_version = \"1.3\""]).replace("tls = true", "tls = false"),
            "lb.toml",
        )
        .unwrap_err()
        .0;
        assert_eq!(errs[0].line, 11, "{errs:#?}");
        assert!(errs[0].reason.contains("need tls = true"), "{errs:#?}");

        // Files this host cannot read, at the key naming them.
        let dir = std::env::temp_dir().join(format!("lb-config-pool-cert-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let ck = rcgen::generate_simple_self_signed(vec!["lb.test".to_string()]).unwrap();
        let (cert, key) = (dir.join("c.pem"), dir.join("c.key"));
        std::fs::write(&cert, ck.cert.pem()).unwrap();
        std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
        let file = dir.join("lb.toml");
        let load_with = |c: &Path, k: &Path| {
            let (c, k) = (
                format!("cert = \"{}\"", c.display()),
                format!("key = \"{}\"", k.display()),
            );
            std::fs::write(&file, text_of(&[&c, &k])).unwrap();
            load(&file).map_err(|e| e.0)
        };
        assert!(load_with(&cert, &key).is_ok());
        let errs = load_with(&dir.join("missing.pem"), &key).unwrap_err();
        assert_eq!((errs.len(), errs[0].line), (1, 11), "{errs:#?}");
        assert!(errs[0].reason.contains("missing.pem"), "{errs:#?}");
        let errs = load_with(&cert, &cert).unwrap_err();
        assert_eq!((errs.len(), errs[0].line), (1, 12), "{errs:#?}");
        assert!(errs[0].reason.contains("no private key"), "{errs:#?}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn syslog_is_an_address_or_a_socket_path_with_a_facility() {
        let with = |keys: &[&'static str]| {
            let mut lines: Vec<&str> = l7(&[]);
            lines.splice(1..1, [&["[proxy]"][..], keys].concat());
            lines
        };
        let syslog = |keys: &[&'static str]| parse(&text(&with(keys)), "lb.toml").unwrap().syslog;
        assert_eq!(syslog(&[]), None);
        assert_eq!(
            syslog(&["syslog = \"127.0.0.1:514\""]),
            Some(crate::config::SyslogConfig {
                target: crate::config::SyslogTarget::Udp("127.0.0.1:514".parse().unwrap()),
                facility: 16,
                format: crate::config::SyslogFormat::Rfc3164,
            })
        );
        assert_eq!(
            syslog(&[
                "syslog = \"/dev/log\"",
                "syslog_facility = \"daemon\"",
                "syslog_format = \"rfc5424\""
            ]),
            Some(crate::config::SyslogConfig {
                target: crate::config::SyslogTarget::Unix("/dev/log".into()),
                facility: 3,
                format: crate::config::SyslogFormat::Rfc5424,
            })
        );
        expect_one(
            &with(&["syslog = \"/dev/log\"", "syslog_format = \"rfc5425\""]),
            4,
            "syslog_format \"rfc5425\"",
        );
        expect_one(
            &with(&["syslog_format = \"rfc5424\""]),
            3,
            "syslog_format needs syslog",
        );
        let target = |keys: &[&'static str]| syslog(keys).map(|s| s.target);
        assert_eq!(
            target(&["syslog = \"tcp@[::1]:601\""]),
            Some(crate::config::SyslogTarget::Tcp(
                "[::1]:601".parse().unwrap()
            ))
        );
        assert_eq!(
            target(&["syslog = \"udp@10.0.0.1:514\""]),
            Some(crate::config::SyslogTarget::Udp(
                "10.0.0.1:514".parse().unwrap()
            ))
        );
        for bad in [
            "syslog = \"loghost\"",
            "syslog = \"tcp@loghost:601\"",
            "syslog = \"tcp@/dev/log\"",
        ] {
            expect_one(
                &with(&[bad]),
                3,
                "is neither ip:port (UDP; or udp@ip:port), tcp@ip:port nor an absolute path",
            );
        }
        expect_one(
            &with(&["syslog = \"/dev/log\"", "syslog_facility = \"local8\""]),
            4,
            "unknown syslog_facility \"local8\"",
        );
        expect_one(
            &with(&["syslog_facility = \"local1\""]),
            3,
            "syslog_facility needs syslog",
        );
        // On this host, a socket that is not there, or a file that is not
        // one, is refused at load.
        let dir = std::env::temp_dir().join(format!("lb-config-syslog-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let plain = dir.join("plain.txt");
        std::fs::write(&plain, "").unwrap();
        for (path, needle) in [
            (dir.join("nothing.sock"), "No such file or directory"),
            (plain, "is not a socket"),
        ] {
            let key = format!("syslog = \"{}\"", path.display());
            let errs = load_with_proxy_key("syslog", &key).unwrap_err();
            assert_eq!((errs.len(), errs[0].line), (1, 3), "{errs:#?}");
            assert!(errs[0].reason.contains(needle), "{errs:#?}");
        }
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Loads (checked against this host) the minimal proxy file with
    /// `key` in `[proxy]`, on line 3; `tag` names its temporary directory.
    fn load_with_proxy_key(tag: &str, key: &str) -> Result<Config, Vec<ConfigError>> {
        let dir = std::env::temp_dir().join(format!("lb-config-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("lb.toml");
        let mut lines: Vec<&str> = l7(&[]);
        lines.splice(1..1, ["[proxy]", key]);
        let text = text(&lines).replace("198.18.100.1:80", "127.0.0.1:0");
        // Text alone is not checked against this host.
        assert!(parse(&text, "lb.toml").is_ok());
        std::fs::write(&file, &text).unwrap();
        let loaded = load(&file).map_err(|e| e.0);
        let _ = std::fs::remove_file(&file);
        loaded
    }

    #[test]
    fn a_servers_own_cookie_value_is_refused_at_its_entry() {
        let with = |servers: &'static str, cookie: bool| {
            let mut lines = l7(&[]);
            lines[7] = servers;
            if cookie {
                lines.push("cookie = \"SRV\"");
            }
            lines
        };
        let one = "servers = [{ address = \"198.18.2.11:8080\", cookie = \"s1\" }]";
        assert!(parse(&text(&with(one, true)), "lb.toml").is_ok());
        expect_one(
            &with(one, false),
            8,
            "server 1: a server's cookie needs the pool's cookie",
        );
        let two = "servers = [{ address = \"198.18.2.11:8080\" }, { address = \"198.18.2.12:8080\", cookie = \"a b\" }]";
        let errs = errors(&with(two, true));
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(
            (errs[0].line, errs[0].column),
            (8, 46),
            "the second entry: {errs:#?}"
        );
        assert!(
            errs[0]
                .reason
                .contains("server 2: a server's cookie is 1 to 64"),
            "{errs:#?}"
        );
    }

    #[test]
    fn cpu_map_names_cpus_this_process_may_run_on_when_loaded() {
        let mine = (0..1024).find(|&c| lb_proxy::may_run_on(c)).expect("a CPU");
        let errs = load_with_proxy_key("cpus", &format!("cpu_map = [{mine}, 1023]")).unwrap_err();
        assert_eq!(errs.len(), 1, "{errs:#?}");
        assert_eq!(
            (errs[0].line, errs[0].column),
            (3, 14 + mine.to_string().len()),
            "{errs:#?}"
        );
        assert!(
            errs[0]
                .reason
                .contains("cpu_map entry 1023 is not a CPU this process may run on")
        );
        assert!(load_with_proxy_key("cpus", &format!("cpu_map = [{mine}]")).is_ok());
    }

    #[test]
    fn errors_in_array_entries_point_at_the_entry() {
        let mut lines = l7(&[]);
        lines.splice(
            5..5,
            [
                "acl = [{ name = \"x\", path = \"/x\" }]",
                "use_pool = [{ pool = \"app\", if = \"x\" },",
                "  { pool = \"gone\", if = \"x\" }]",
                "request = [{ action = \"deny\" }, { action = \"teleport\" }]",
            ],
        );
        lines.push("servers = [{ address = \"198.18.2.12:80\" }, { address = \"198.18.2.13:0\" }]");
        lines.retain(|l| !l.starts_with("servers = [{ address = \"198.18.2.11:8080"));
        let errs = errors(&lines);
        let got: Vec<(usize, usize)> = errs.iter().map(|e| (e.line, e.column)).collect();
        // Each at its own entry: the second use_pool rule (line 8, column
        // 3), the second request rule, the second server.
        assert_eq!(got, [(8, 3), (9, 33), (12, 44)], "{errs:#?}");
        assert!(
            errs[0].reason.contains("unknown pool \"gone\""),
            "{errs:#?}"
        );
        assert!(
            errs[1].reason.contains("request rule 2 (teleport)"),
            "{errs:#?}"
        );
        assert!(errs[2].reason.contains("has port 0"), "{errs:#?}");
    }

    #[test]
    fn l7_rules_and_actions_point_at_their_list() {
        let mut lines = l7(&[]);
        lines.splice(
            5..5,
            [
                "use_pool = [{ pool = \"gone\", if = \"x\" }]",
                "request = [{ action = \"teleport\" }]",
            ],
        );
        let errs = errors(&lines);
        let got: Vec<usize> = errs.iter().map(|e| e.line).collect();
        assert_eq!(got, [6, 7], "{errs:#?}");
        assert!(
            errs[0].reason.contains("unknown pool \"gone\""),
            "{errs:#?}"
        );
        assert!(
            errs[1].reason.contains("request rule 1 (teleport)"),
            "{errs:#?}"
        );
    }
}
