//! Who may use the admin listener: Basic credentials of a `[[userlist]]`
//! user, or the Bearer token of `token_file`; and the CSRF token the stats
//! page's forms carry.
//!
//! A reload builds a new [`Auth`] from the file and swaps it in
//! ([`AuthSlot`]): a user removed or given a new password, or a new token,
//! is in force at once. The CSRF token is derived from the credential in
//! use (the user and their hash, or the token) with a key of the process:
//! each user has their own, and it changes when their credential does.

use std::collections::HashMap;
use std::io::Read as _;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use http::HeaderMap;
use lb_proxy::basic_auth::{Verifier, basic_credentials};
use sha2::{Digest, Sha256};
use tracing::warn;

/// How a request proved who it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    /// `Authorization: Basic` of a userlist user (a browser sends it by itself).
    Basic,
    /// `Authorization: Bearer` with the token (never sent by a browser on its own).
    Bearer,
}

/// A request that proved who it is, and the CSRF token of its credential.
#[derive(Debug, Clone)]
pub struct Login {
    /// How it proved it.
    pub credential: Credential,
    csrf: String,
}

impl Login {
    /// The CSRF token the stats page embeds in its forms for this credential.
    pub fn csrf(&self) -> &str {
        &self.csrf
    }

    /// Whether `given` is this credential's CSRF token.
    pub fn csrf_ok(&self, given: &str) -> bool {
        constant_time_eq(self.csrf.as_bytes(), given.as_bytes())
    }
}

/// The accepted credentials.
#[derive(Debug)]
pub struct Auth {
    /// The userlist's users (their SHA-512 crypt hashes, checked at a
    /// bounded cost: `lb_proxy::basic_auth`); its per-source failure
    /// count also refuses Bearer guesses.
    verifier: Verifier,
    users: Arc<HashMap<String, String>>,
    token: Option<String>,
    /// Keys the CSRF tokens (kept by reloads: a page open stays usable).
    key: [u8; 32],
}

impl Auth {
    /// From the config: `users` of the userlist (name to hash), the token of `token_file`.
    pub fn new(users: HashMap<String, String>, token: Option<String>) -> Result<Self> {
        let mut key = [0u8; 32];
        std::fs::File::open("/dev/urandom")
            .and_then(|mut f| f.read_exact(&mut key))
            .context("reading /dev/urandom for the CSRF key")?;
        Ok(Self::with_key(users, token, key))
    }

    fn with_key(users: HashMap<String, String>, token: Option<String>, key: [u8; 32]) -> Self {
        let users = Arc::new(users);
        Auth {
            // Shared: what a reload's new Auth counts goes on from the old one's.
            verifier: Verifier::shared(Arc::clone(&users)),
            users,
            token,
            key,
        }
    }

    /// An Auth of other credentials with the same CSRF key (a reload).
    pub fn renewed(&self, users: HashMap<String, String>, token: Option<String>) -> Self {
        Self::with_key(users, token, self.key)
    }

    /// Whether it accepts exactly `users` and `token`.
    pub fn accepts_same(&self, users: &HashMap<String, String>, token: Option<&str>) -> bool {
        *self.users == *users && self.token.as_deref() == token
    }

    /// The credential the request carries, if it is a valid one; `peer`
    /// is where it came from (failures are counted per source, and logged).
    pub async fn check(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Option<Login> {
        let value = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
        if let Some(given) = bearer(value) {
            return self.check_token(given, peer);
        }
        if !self.verifier.is_empty() && self.verifier.check(headers, peer).await {
            let (user, _) = basic_credentials(headers)?;
            let hash = self.users.get(&user)?;
            return Some(Login {
                credential: Credential::Basic,
                csrf: self.csrf_of(&[b"basic", user.as_bytes(), hash.as_bytes()]),
            });
        }
        failure_logged("Basic", peer);
        None
    }

    fn check_token(&self, given: &str, peer: Option<IpAddr>) -> Option<Login> {
        let token = self.token.as_deref()?;
        // A source refused for failed passwords or tokens is not compared
        // at all: guessing stays at MAX_FAILURES per FAILURE_PERIOD.
        if peer.is_some_and(|p| self.verifier.source_refused(p)) {
            failure_logged("Bearer (source refused)", peer);
            return None;
        }
        // Digests compared: equal lengths, so the length does not show either.
        let (want, got) = (Sha256::digest(token), Sha256::digest(given));
        if constant_time_eq(&want, &got) {
            return Some(Login {
                credential: Credential::Bearer,
                csrf: self.csrf_of(&[b"bearer", token.as_bytes()]),
            });
        }
        if let Some(p) = peer {
            self.verifier.count_failure(p);
        }
        failure_logged("Bearer", peer);
        None
    }

    /// The CSRF token of a credential made of `parts`.
    fn csrf_of(&self, parts: &[&[u8]]) -> String {
        let mut h = Sha256::new();
        h.update(self.key);
        // Lengths first: no two credentials give one input.
        for part in parts {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part);
        }
        h.finalize()[..16]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }

    /// The challenge of a 401: Basic when users exist, else Bearer.
    pub fn challenge(&self) -> &'static str {
        if self.verifier.is_empty() {
            "Bearer realm=\"lb admin\""
        } else {
            "Basic realm=\"lb admin\""
        }
    }
}

/// The Auth in force, replaced whole by a reload.
#[derive(Debug)]
pub struct AuthSlot(RwLock<Arc<Auth>>);

impl AuthSlot {
    /// A slot holding `auth`.
    pub fn new(auth: Auth) -> Self {
        AuthSlot(RwLock::new(Arc::new(auth)))
    }

    /// The Auth in force now.
    pub fn current(&self) -> Arc<Auth> {
        Arc::clone(&self.0.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Puts `users` and `token` in force (the same CSRF key); false if
    /// they are those in force already.
    pub fn update(&self, users: HashMap<String, String>, token: Option<String>) -> bool {
        let mut slot = self.0.write().unwrap_or_else(|e| e.into_inner());
        if slot.accepts_same(&users, token.as_deref()) {
            return false;
        }
        *slot = Arc::new(slot.renewed(users, token));
        true
    }
}

/// Failed attempts logged at most once per this period (a guesser must not
/// flood the log); the count of those not logged goes with the next line.
const FAILURE_LOG_PERIOD: Duration = Duration::from_secs(5);

/// Logs a failed credential at warn level, rate-limited.
fn failure_logged(kind: &str, peer: Option<IpAddr>) {
    static LAST: Mutex<Option<Instant>> = Mutex::new(None);
    static UNLOGGED: AtomicU64 = AtomicU64::new(0);
    let now = Instant::now();
    let mut last = LAST.lock().unwrap_or_else(|e| e.into_inner());
    if last.is_some_and(|at| now.saturating_duration_since(at) < FAILURE_LOG_PERIOD) {
        UNLOGGED.fetch_add(1, Ordering::Relaxed);
        return;
    }
    *last = Some(now);
    let unlogged = UNLOGGED.swap(0, Ordering::Relaxed);
    warn!(
        ?peer,
        kind, unlogged, "admin listener: failed authentication"
    );
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

#[cfg(test)]
mod tests {
    use super::*;

    const TOKEN: &str = "0123456789abcdef0123456789abcdef";

    fn bearer_header(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Bearer {token}").parse().unwrap());
        h
    }

    fn basic_header(user: &str, password: &str) -> HeaderMap {
        use base64::Engine as _;
        let text = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        let mut h = HeaderMap::new();
        h.insert("authorization", format!("Basic {text}").parse().unwrap());
        h
    }

    /// A userlist hash (few rounds: tests check many).
    fn hash(password: &str) -> String {
        let params = sha_crypt::Sha512Params::new(1_000).unwrap();
        sha_crypt::sha512_simple(password, &params).unwrap()
    }

    #[tokio::test]
    async fn bearer_and_csrf() {
        let auth = Auth::new(HashMap::new(), Some(TOKEN.into())).unwrap();
        assert!(auth.check(&HeaderMap::new(), None).await.is_none());
        let login = auth.check(&bearer_header(TOKEN), None).await.unwrap();
        assert_eq!(login.credential, Credential::Bearer);
        let wrong = TOKEN.replace('f', "g");
        assert!(auth.check(&bearer_header(&wrong), None).await.is_none());
        assert_eq!(login.csrf().len(), 32);
        assert!(login.csrf_ok(login.csrf()));
        assert!(!login.csrf_ok("nope"));
        assert_eq!(auth.challenge(), "Bearer realm=\"lb admin\"");
    }

    #[tokio::test]
    async fn wrong_tokens_are_counted_per_source_and_then_refused() {
        let auth = Auth::new(HashMap::new(), Some(TOKEN.into())).unwrap();
        let (guesser, other) = ("192.0.2.7".parse().ok(), "192.0.2.8".parse().ok());
        for i in 0..lb_proxy::basic_auth::MAX_FAILURES {
            let guess = format!("{TOKEN}{i}");
            assert!(auth.check(&bearer_header(&guess), guesser).await.is_none());
        }
        // Now even the right token is refused from there, not elsewhere.
        assert!(auth.check(&bearer_header(TOKEN), guesser).await.is_none());
        assert!(auth.check(&bearer_header(TOKEN), other).await.is_some());
    }

    #[tokio::test]
    async fn a_reload_revokes_users_and_tokens_and_their_csrf_tokens() {
        let (alice, bob) = (hash("a-secret"), hash("b-secret"));
        let users = HashMap::from([
            ("alice".to_string(), alice.clone()),
            ("bob".into(), bob.clone()),
        ]);
        let slot = AuthSlot::new(Auth::new(users, Some(TOKEN.into())).unwrap());
        let auth = slot.current();
        let a = auth
            .check(&basic_header("alice", "a-secret"), None)
            .await
            .unwrap();
        let b = auth
            .check(&basic_header("bob", "b-secret"), None)
            .await
            .unwrap();
        assert_eq!(a.credential, Credential::Basic);
        // Each user has their own CSRF token.
        assert_ne!(a.csrf(), b.csrf());
        assert!(!b.csrf_ok(a.csrf()));
        // Nothing changed: nothing replaced.
        let same = HashMap::from([("alice".to_string(), alice.clone()), ("bob".into(), bob)]);
        assert!(!slot.update(same, Some(TOKEN.into())));
        // Bob removed, a new token.
        let new_token = "fedcba9876543210fedcba9876543210";
        let fewer = HashMap::from([("alice".to_string(), alice)]);
        assert!(slot.update(fewer, Some(new_token.into())));
        let auth = slot.current();
        assert!(
            auth.check(&basic_header("bob", "b-secret"), None)
                .await
                .is_none()
        );
        assert!(auth.check(&bearer_header(TOKEN), None).await.is_none());
        assert!(auth.check(&bearer_header(new_token), None).await.is_some());
        // Alice's credential is unchanged, so is her CSRF token.
        let a2 = auth
            .check(&basic_header("alice", "a-secret"), None)
            .await
            .unwrap();
        assert_eq!(a.csrf(), a2.csrf());
        // A new password: a new CSRF token.
        let changed = HashMap::from([("alice".to_string(), hash("a-new-secret"))]);
        assert!(slot.update(changed, Some(new_token.into())));
        let a3 = slot
            .current()
            .check(&basic_header("alice", "a-new-secret"), None)
            .await
            .unwrap();
        assert!(!a3.csrf_ok(a.csrf()));
    }
}
