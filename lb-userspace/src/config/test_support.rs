//! What the configuration's unit tests share: files written line by line,
//! and the minimal service they start from.

use super::{ConfigError, ConfigErrors, parse};

/// Joins lines with '\n' so a test's line numbers are its slice indices + 1.
pub(super) fn text(lines: &[&str]) -> String {
    lines.join("\n") + "\n"
}

pub(super) fn errors(lines: &[&str]) -> Vec<ConfigError> {
    match parse(&text(lines), "lb.toml") {
        Ok(c) => panic!("expected errors, got {c:?}"),
        Err(ConfigErrors(e)) => e,
    }
}

/// Asserts exactly one error, on `line`, whose reason contains `needle`.
#[track_caller]
pub(super) fn expect_one(lines: &[&str], line: usize, needle: &str) {
    let errs = errors(lines);
    assert_eq!(errs.len(), 1, "expected one error, got {errs:#?}");
    assert_eq!(errs[0].line, line, "{errs:#?}");
    assert!(
        errs[0].reason.contains(needle),
        "{:?} does not contain {needle:?}",
        errs[0].reason
    );
}

/// A minimal valid service, lines 2..=6 after the `interfaces` line.
pub(super) const HEAD: &str = "interfaces = [\"eth0\"]";

pub(super) fn svc(extra: &[&'static str]) -> Vec<&'static str> {
    let mut v = vec![
        HEAD,
        "[[service]]",
        "name = \"web\"",
        "vip = \"198.18.100.1:80\"",
        "[[service.backend]]",
        "address = \"198.18.2.11:8080\"",
    ];
    v.extend_from_slice(extra);
    v
}
