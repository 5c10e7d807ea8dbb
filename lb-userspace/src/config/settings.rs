//! The file's top-level settings: the interfaces, the `deny` list and the
//! outer sources of encapsulated packets (`xdp_mode`, `metrics` and
//! `new_flow_limit` are one-liners in [`Checker::config`]).

use std::collections::HashMap;

use lb_common::MAX_DENY_PREFIXES;
use toml::Spanned;

use super::{Checker, DenyPrefix, Host};

/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub(super) const MAX_IFNAME_LEN: usize = 15;

impl Checker<'_> {
    /// Checks an `encap_source_v4`/`_v6` value: an address or prefix of the
    /// right family; for IPv6 at least a /96, as only the last 32 bits vary.
    pub(super) fn encap_source(
        &mut self,
        raw: Option<Spanned<String>>,
        v6: bool,
    ) -> Option<DenyPrefix> {
        let raw = raw?;
        let key = if v6 {
            "encap_source_v6"
        } else {
            "encap_source_v4"
        };
        let text = raw.get_ref();
        match DenyPrefix::parse(text) {
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
    pub(super) fn deny(&mut self, raw: Option<Spanned<Vec<Spanned<String>>>>) -> Vec<DenyPrefix> {
        let Some(list) = raw else {
            return Vec::new();
        };
        let mut seen: HashMap<DenyPrefix, usize> = HashMap::new();
        let (mut v4, mut v6) = (0u32, 0u32);
        let mut out = Vec::new();
        for entry in list.into_inner() {
            let span = entry.span();
            let text = entry.get_ref();
            let prefix = match DenyPrefix::parse(text) {
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

    pub(super) fn interfaces(&mut self, raw: Option<Spanned<Vec<Spanned<String>>>>) -> Vec<String> {
        let Some(list) = raw else {
            self.whole("missing `interfaces`; list the interfaces to attach to, e.g. interfaces = [\"eth0\"]");
            return Vec::new();
        };
        if list.get_ref().is_empty() {
            self.at(
                &list.span(),
                "`interfaces` is empty; list at least one interface to attach to",
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
