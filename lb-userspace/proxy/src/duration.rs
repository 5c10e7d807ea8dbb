//! Durations as a whole number with a unit, `"500ms"`, `"10s"`, `"2m"` or
//! `"1h"`: the one syntax of every duration in the configuration file (a
//! bare number is refused, as its unit would be a guess).

use std::time::Duration;

use serde::{Deserialize, Deserializer, de::Error};

/// What a duration looks like, for error messages.
pub const FORM: &str = "expected a whole number with a unit: \"500ms\", \"2s\", \"1m\" or \"1h\"";

#[derive(Deserialize)]
#[serde(untagged)]
enum Raw {
    Number(i64),
    Text(String),
}

/// Reads a duration string; a bare number gets its own message.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    match Raw::deserialize(d)? {
        Raw::Number(n) => Err(D::Error::custom(format!(
            "duration {n} has no unit; {FORM}, e.g. \"{n}ms\""
        ))),
        Raw::Text(s) => {
            parse(&s).ok_or_else(|| D::Error::custom(format!("\"{s}\" is not a duration; {FORM}")))
        }
    }
}

/// Parses `<whole number><unit>` with unit `ms`, `s`, `m` or `h`, nothing around it.
pub fn parse(s: &str) -> Option<Duration> {
    let split = s.find(|c: char| !c.is_ascii_digit())?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let ms = match unit {
        "ms" => n,
        "s" => n.checked_mul(1000)?,
        "m" => n.checked_mul(60_000)?,
        "h" => n.checked_mul(3_600_000)?,
        _ => return None,
    };
    Some(Duration::from_millis(ms))
}
