//! Who may use the admin listener: Basic credentials of a `[[userlist]]`
//! user, or the Bearer token of `token_file`; and the CSRF token the stats
//! page's forms carry.

use std::collections::HashMap;
use std::io::Read as _;
use std::net::IpAddr;
use std::path::Path;

use anyhow::{Context, Result};
use http::HeaderMap;

/// How a request proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// `Authorization: Basic` of a userlist user (a browser sends it by itself).
    Basic,
    /// `Authorization: Bearer` with the token (never sent by a browser on its own).
    Bearer,
}

/// The accepted credentials and this process's CSRF token.
#[derive(Debug)]
pub struct Auth {
    /// The userlist's users (their SHA-512 crypt hashes, checked at a
    /// bounded cost: `lb_proxy::basic_auth`).
    users: lb_proxy::basic_auth::Verifier,
    token: Option<String>,
    csrf: String,
}

impl Auth {
    /// From the config: `users` of the userlist, the token read from `token_file`.
    pub fn new(users: HashMap<String, String>, token_file: Option<&Path>) -> Result<Self> {
        let token = token_file.map(crate::config::read_token).transpose()?;
        Ok(Auth {
            users: lb_proxy::basic_auth::Verifier::new(std::sync::Arc::new(users)),
            token,
            csrf: random_hex(16)?,
        })
    }

    /// The credential the request carries, if it is a valid one; `peer`
    /// is where it came from (failures are counted per source).
    pub async fn check(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<Credential> {
        let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
        if let (Some(token), Some(given)) = (&self.token, bearer(value)) {
            return constant_time_eq(token.as_bytes(), given.as_bytes())
                .then_some(Credential::Bearer);
        }
        if !self.users.is_empty() && self.users.check(headers, peer).await {
            return Some(Credential::Basic);
        }
        None
    }

    /// The CSRF token the stats page embeds in its forms.
    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    /// Whether `given` is this process's CSRF token.
    pub fn csrf_ok(&self, given: &str) -> bool {
        constant_time_eq(self.csrf.as_bytes(), given.as_bytes())
    }

    /// The challenge of a 401: Basic when users exist, else Bearer.
    pub fn challenge(&self) -> &'static str {
        if self.users.is_empty() {
            "Bearer realm=\"lb admin\""
        } else {
            "Basic realm=\"lb admin\""
        }
    }
}

fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
}

/// Compares without an early exit, so the time taken does not tell how
/// much of a guess was right (the length may show).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// `bytes` random bytes from the kernel, as hex.
fn random_hex(bytes: usize) -> Result<String> {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .context("reading /dev/urandom for the CSRF token")?;
    Ok(buf.iter().map(|b| format!("{b:02x}")).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn bearer_and_csrf() {
        let dir = std::env::temp_dir().join(format!("lb-admin-auth-{}", std::process::id()));
        std::fs::write(&dir, "0123456789abcdef0123\n").unwrap();
        let auth = Auth::new(HashMap::new(), Some(&dir)).unwrap();
        let _ = std::fs::remove_file(&dir);
        let mut h = HeaderMap::new();
        assert_eq!(auth.check(&h, None).await, None);
        h.insert(
            "authorization",
            "Bearer 0123456789abcdef0123".parse().unwrap(),
        );
        assert_eq!(auth.check(&h, None).await, Some(Credential::Bearer));
        h.insert(
            "authorization",
            "Bearer 0123456789abcdef0124".parse().unwrap(),
        );
        assert_eq!(auth.check(&h, None).await, None);
        assert_eq!(auth.csrf().len(), 32);
        assert!(auth.csrf_ok(auth.csrf()));
        assert!(!auth.csrf_ok("nope"));
        assert_eq!(auth.challenge(), "Bearer realm=\"lb admin\"");
    }
}
