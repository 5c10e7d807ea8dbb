//! The file's top-level settings: the interfaces, the `deny` list and the
//! outer sources of encapsulated packets (`xdp_mode`, `metrics` and
//! `new_flow_limit` are one-liners in [`Checker::config`]).

use std::collections::HashMap;

use lb_common::MAX_DENY_PREFIXES;
use toml::Spanned;

use super::{Checker, Host, IpPrefix};

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub(super) const MAX_IFNAME_LEN: usize = 15;

impl Checker<'_> {
    /// Checks an `encap_source_v4`/`_v6` value: an address or prefix of the
    /// right family; for IPv6 at least a /96, as only the last 32 bits vary.
    pub(super) fn encap_source(
        &mut self,
        raw: Option<Spanned<String>>,
        v6: bool,
    ) -> Option<IpPrefix> {
        let raw = raw?;
        let key = if v6 {
            "encap_source_v6"
        } else {
            "encap_source_v4"
        };
        let text = raw.get_ref();
        match IpPrefix::parse(text) {
            Err(why) => self.at(&raw.span(), format!("{key} \"{text}\": {why}")),
            Ok(p) if p.addr.is_ipv6() != v6 => self.at(
                &raw.span(),
                format!(
                    "{key} \"{text}\" is {}; expected an {} address or prefix",
                    if v6 { "IPv4" } else { "IPv6" },
                    if v6 { "IPv6" } else { "IPv4" }
                ),
            ),
            Ok(p) if v6 && p.len < 96 => self.at(
                &raw.span(),
                format!("{key} \"{text}\": only the last 32 bits come from the flow; use a /96 or longer"),
            ),
            Ok(p) => return Some(p),
        }
        None
    }

    /// Checks the `deny` list: networks, no duplicates, within the data
    /// plane's size per family.
    pub(super) fn deny(&mut self, raw: Option<Spanned<Vec<Spanned<String>>>>) -> Vec<IpPrefix> {
        let Some(list) = raw else {
            return Vec::new();
        };
        let mut seen: HashMap<IpPrefix, usize> = HashMap::new();
        let (mut v4, mut v6) = (0u32, 0u32);
        let mut out = Vec::new();
        for entry in list.into_inner() {
            let span = entry.span();
            let text = entry.get_ref();
            let prefix = match IpPrefix::parse(text) {
                Ok(p) => p,
                Err(why) => {
                    self.at(&span, format!("deny \"{text}\": {why}"));
                    continue;
                }
            };
            if let Some(first) = seen.get(&prefix) {
                self.at(
                    &span,
                    format!("deny \"{text}\" is listed twice (first on line {first})"),
                );
                continue;
            }
            seen.insert(prefix, self.line(&span));
            let count = if prefix.addr.is_ipv4() {
                &mut v4
            } else {
                &mut v6
            };
            *count += 1;
            if *count == MAX_DENY_PREFIXES + 1 {
                self.at(
                    &span,
                    format!(
                        "too many deny prefixes of this family; the data plane holds at most {MAX_DENY_PREFIXES} (MAX_DENY_PREFIXES)"
                    ),
                );
            }
            out.push(prefix);
        }
        out
    }

    /// Checks `interfaces`; without `[[service]]` tables they may be left
    /// out (or empty): the L7 proxy then runs alone, nothing attached.
    pub(super) fn interfaces(
        &mut self,
        raw: Option<Spanned<Vec<Spanned<String>>>>,
        has_services: bool,
    ) -> Vec<String> {
        let Some(list) = raw else {
            if has_services {
                self.whole("missing `interfaces`; [[service]] tables need the XDP program: list the interfaces to attach to, e.g. interfaces = [\"eth0\"] (a file with only [[frontend]] and [[pool]] tables runs the L7 proxy alone and needs none)");
            }
            return Vec::new();
        };
        if list.get_ref().is_empty() && has_services {
            self.at(
                &list.span(),
                "`interfaces` is empty; [[service]] tables need at least one interface to attach to",
            );
        }
        let mut seen: HashMap<&str, usize> = HashMap::new();
        for name in list.get_ref() {
            let span = name.span();
            let n = name.get_ref().as_str();
            if n.is_empty() {
                self.at(&span, "interface name is empty");
            } else if n.len() > MAX_IFNAME_LEN {
                self.at(
                    &span,
                    format!(
                        "interface name \"{n}\" is {} bytes long; Linux allows at most {MAX_IFNAME_LEN} (IFNAMSIZ - 1)",
                        n.len()
                    ),
                );
            } else if n.chars().any(|c| c == '/' || c == ':' || c.is_whitespace()) {
                // The kernel's dev_valid_name() rejects these characters.
                self.at(
                    &span,
                    format!("interface name \"{n}\" must not contain '/', ':' or whitespace"),
                );
            } else if let Some(first) = seen.get(n) {
                self.at(
                    &span,
                    format!("interface \"{n}\" is listed twice (first on line {first})"),
                );
            } else {
                seen.insert(n, self.line(&span));
                if self.host == Host::This && !interface_exists(n) {
                    self.at(
                        &span,
                        format!(
                            "interface \"{n}\" does not exist in this network namespace (`ip link` lists those that do)"
                        ),
                    );
                }
            }
        }
        list.into_inner()
            .into_iter()
            .map(Spanned::into_inner)
            .collect()
    }
}

/// Whether the current network namespace has an interface called `name`.
pub(super) fn interface_exists(name: &str) -> bool {
    // A name with a NUL byte cannot name an interface.
    let Ok(c) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a valid NUL-terminated string; the call only reads it.
    unsafe { libc::if_nametoindex(c.as_ptr()) != 0 }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::config::*;

    #[test]
    fn new_flow_limit_and_deny_list() {
        let c = parse(&text(&svc(&[])), "lb.toml").unwrap();
        assert_eq!(c.new_flow_limit, DEFAULT_NEW_FLOW_LIMIT);
        assert!(c.deny.is_empty());
        let mut lines = svc(&[]);
        lines.insert(1, "new_flow_limit = 0");
        lines.insert(
            2,
            "deny = [\"203.0.113.0/24\", \"2001:db8::/32\", \"198.51.100.7\"]",
        );
        let c = parse(&text(&lines), "lb.toml").unwrap();
        assert_eq!(c.new_flow_limit, 0);
        let shown: Vec<String> = c.deny.iter().map(ToString::to_string).collect();
        assert_eq!(
            shown,
            ["203.0.113.0/24", "2001:db8::/32", "198.51.100.7/32"]
        );

        let mut lines = svc(&[]);
        lines.insert(1, "new_flow_limit = -1");
        expect_one(&lines, 2, "new_flow_limit -1 is out of range");
        for (entry, needle) in [
            (
                "\"203.0.113.5/24\"",
                "host bits are set; the network is 203.0.113.0/24",
            ),
            (
                "\"203.0.113.0/33\"",
                "prefix length \"33\" is not a number 0..=32",
            ),
            ("\"2001:db8::/129\"", "0..=128"),
            (
                "\"example.org/24\"",
                "\"example.org\" is not an IPv4 or IPv6 address",
            ),
            (
                "\"10.0.0.0/8\", \"10.0.0.0/8\"",
                "is listed twice (first on line 2)",
            ),
        ] {
            let line = format!("deny = [{entry}]");
            let mut lines = svc(&[]);
            lines.insert(1, Box::leak(line.into_boxed_str()));
            expect_one(&lines, 2, needle);
        }
    }

    #[test]
    fn the_proxy_alone_needs_no_interfaces() {
        let proxy_only = "[[frontend]]\nname = \"web\"\nbinds = [\"127.0.0.1:8080\"]\ndefault_pool = \"app\"\n[[pool]]\nname = \"app\"\nservers = [{ address = \"127.0.0.1:9000\" }]\n";
        let c = crate::config::parse(proxy_only, "lb.toml").expect("a proxy-only file");
        assert!(c.interfaces.is_empty() && c.services.is_empty());
        let empty = format!("interfaces = []\n{proxy_only}");
        assert!(crate::config::parse(&empty, "lb.toml").is_ok());
        // Services still need them, and the message says why.
        let mut lines = svc(&[]);
        lines[0] = "";
        expect_one(&lines, 0, "[[service]] tables need the XDP program");
        // Neither: what is missing, both ways.
        expect_one(
            &["interfaces = [\"eth0\"]"],
            0,
            "nothing to serve: add [[service]] tables",
        );
        expect_one(&[""], 0, "or [[frontend]] and [[pool]] tables");
    }

    #[test]
    fn interfaces_missing() {
        let mut lines = svc(&[]);
        lines[0] = "";
        expect_one(&lines, 0, "missing `interfaces`");
    }

    #[test]
    fn interfaces_empty() {
        let mut lines = svc(&[]);
        lines[0] = "interfaces = []";
        expect_one(&lines, 1, "is empty");
    }

    #[test]
    fn interface_names() {
        for (list, needle) in [
            ("interfaces = [\"\"]", "name is empty"),
            ("interfaces = [\"abcdefghijklmnop\"]", "at most 15"),
            ("interfaces = [\"a b\"]", "whitespace"),
            ("interfaces = [\"a/b\"]", "'/'"),
            (
                "interfaces = [\"eth0\", \"eth0\"]",
                "listed twice (first on line 1)",
            ),
        ] {
            let mut lines = svc(&[]);
            lines[0] = list;
            expect_one(&lines, 1, needle);
        }
        // 15 bytes is fine.
        let mut lines = svc(&[]);
        lines[0] = "interfaces = [\"abcdefghijklmno\"]";
        assert!(parse(&text(&lines), "f").is_ok());
    }

    #[test]
    fn a_missing_interface_is_reported_at_its_position_when_checking_this_host() {
        let mut lines = svc(&[]);
        lines[0] = "interfaces = [\"lo\", \"lbnosuch0\"]";
        let t = text(&lines);
        // The file alone is fine; on this host the second name is not.
        assert!(parse(&t, "lb.toml").is_ok());
        let errs = parse_for_this_host(&t, "lb.toml").unwrap_err();
        assert_eq!(errs.0.len(), 1, "{errs}");
        assert_eq!((errs.0[0].line, errs.0[0].column), (1, 21));
        assert!(
            errs.to_string()
                .starts_with("lb.toml:1:21: interface \"lbnosuch0\" does not exist"),
            "{errs}"
        );
        lines[0] = "interfaces = [\"lo\"]";
        assert!(parse_for_this_host(&text(&lines), "lb.toml").is_ok());
    }

    #[test]
    fn interfaces_on_several_lines() {
        let mut lines = svc(&[]);
        lines[0] = "interfaces = [\n  \"eth0\",\n  \"eth0\",\n]";
        let errs = parse(&text(&lines), "f").unwrap_err().0;
        assert_eq!(errs.len(), 1);
        assert_eq!((errs[0].line, errs[0].column), (3, 3));
    }

    #[test]
    fn bad_xdp_mode() {
        let mut lines = svc(&[]);
        lines.insert(1, "xdp_mode = \"native\"");
        expect_one(&lines, 2, "unknown xdp_mode \"native\"");
    }

    #[test]
    fn bad_metrics() {
        let mut lines = svc(&[]);
        lines.insert(1, "metrics = \"localhost:9100\"");
        expect_one(
            &lines,
            2,
            "metrics \"localhost:9100\" is not a socket address",
        );
    }

    #[test]
    fn encap_sources_are_checked_by_family_and_length() {
        let with = |line: &'static str| {
            let mut lines = svc(&[]);
            lines.insert(1, line);
            lines
        };
        let ok = parse(&text(&with("encap_source_v4 = \"10.1.0.0/24\"")), "t.toml").expect("v4");
        assert_eq!(ok.encap_source_v4.map(|p| p.len), Some(24));
        let ok = parse(&text(&with("encap_source_v6 = \"fd00::1\"")), "t.toml").expect("v6");
        assert_eq!(ok.encap_source_v6.map(|p| p.len), Some(128));
        expect_one(
            &with("encap_source_v4 = \"fd00::1\""),
            2,
            "expected an IPv4 address",
        );
        expect_one(
            &with("encap_source_v6 = \"10.0.0.1\""),
            2,
            "expected an IPv6 address",
        );
        expect_one(
            &with("encap_source_v6 = \"fd00::/64\""),
            2,
            "use a /96 or longer",
        );
        expect_one(
            &with("encap_source_v4 = \"10.1.0.1/24\""),
            2,
            "host bits are set",
        );
    }
}
