//! `[bgp]`: where the agent finds BIRD and the file it writes for it.

use std::ops::Range;

use toml::Spanned;

use super::raw::RawBgp;
use super::{BgpConfig, Checker, DEFAULT_BGP_PROTOCOL};

impl Checker<'_> {
    /// Checks `[bgp]`: both paths absolute, the protocol a BIRD symbol.
    pub(super) fn bgp(&mut self, raw: Spanned<RawBgp>) -> Option<BgpConfig> {
        let span = raw.span();
        let line = self.line(&span);
        let raw = raw.into_inner();
        let bird_socket = self.absolute_path(raw.bird_socket, "bird_socket", &span);
        let include_file = self.absolute_path(raw.include_file, "include_file", &span);
        let protocol = match raw.protocol {
            None => DEFAULT_BGP_PROTOCOL.to_string(),
            Some(p) => {
                let name = p.get_ref();
                // `_v4`/`_v6` are appended; BIRD symbols are letters, digits, `_`.
                let valid = name.len() <= 60
                    && name.starts_with(|c: char| c.is_ascii_alphabetic())
                    && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
                if !valid {
                    self.at(
                        &p.span(),
                        format!(
                            "bgp protocol \"{name}\" is not a BIRD protocol name; expected a letter, then letters, digits or '_' (at most 60)"
                        ),
                    );
                    return None;
                }
                name.clone()
            }
        };
        Some(BgpConfig {
            bird_socket: bird_socket?,
            include_file: include_file?,
            protocol,
            line,
        })
    }

    /// A required absolute path of `[bgp]`.
    pub(super) fn absolute_path(
        &mut self,
        raw: Option<Spanned<String>>,
        key: &str,
        table: &Range<usize>,
    ) -> Option<std::path::PathBuf> {
        let Some(raw) = raw else {
            self.at(table, format!("[bgp] needs `{key}`, an absolute path"));
            return None;
        };
        let path = std::path::PathBuf::from(raw.get_ref());
        if !path.is_absolute() || raw.get_ref().contains('"') {
            self.at(
                &raw.span(),
                format!(
                    "{key} \"{}\" must be an absolute path (without '\"')",
                    raw.get_ref()
                ),
            );
            return None;
        }
        Some(path)
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::*;
    use crate::config::*;

    #[test]
    fn bgp_section() {
        let mut lines = svc(&[]);
        lines.extend([
            "[bgp]",
            "bird_socket = \"/run/bird/bird.ctl\"",
            "include_file = \"/etc/bird/lb-vips.conf\"",
        ]);
        let c = parse(&text(&lines), "lb.toml").unwrap();
        let bgp = c.bgp.unwrap();
        assert_eq!(bgp.bird_socket, std::path::Path::new("/run/bird/bird.ctl"));
        assert_eq!(bgp.protocol, DEFAULT_BGP_PROTOCOL);
        assert_eq!(bgp.line, 7);

        let mut lines = svc(&[]);
        lines.extend([
            "[bgp]",
            "bird_socket = \"bird.ctl\"",
            "include_file = \"/etc/bird/lb-vips.conf\"",
        ]);
        expect_one(&lines, 8, "must be an absolute path");
        let mut lines = svc(&[]);
        lines.extend(["[bgp]", "bird_socket = \"/run/bird.ctl\""]);
        expect_one(&lines, 7, "needs `include_file`");
        let mut lines = svc(&[]);
        lines.extend([
            "[bgp]",
            "bird_socket = \"/run/bird.ctl\"",
            "include_file = \"/etc/bird/lb.conf\"",
            "protocol = \"lb-vips\"",
        ]);
        expect_one(&lines, 10, "not a BIRD protocol name");
        let mut lines = svc(&[]);
        lines.extend(["[bgp]", "socket = \"/run/bird.ctl\""]);
        expect_one(&lines, 8, "unknown field");
    }
}
