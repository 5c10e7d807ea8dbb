//! Basic credentials checked against a userlist's SHA-512 crypt hashes
//! (the `auth` action, the agent's admin listener), at a cost a client
//! cannot multiply.
//!
//! One check is thousands of SHA-512 rounds (5 000 by default: about a
//! millisecond of a core). HAProxy and nginx pay it for every request that
//! carries credentials, so a logged-in client costs a thousand anonymous
//! ones, and a client guessing passwords keeps cores busy. A [`Verifier`]
//! (one per `auth` rule, one per admin listener):
//! - remembers a verified credential for [`REMEMBER`] (at most
//!   [`REMEMBERED`] of them) by a SHA-256 of a random key of its own, the
//!   user, their hash and the password: nothing kept can be read back, and
//!   a password changed in the userlist (a new hash) is not remembered;
//! - refuses, without hashing, a source (IPv4 address, IPv6 /64) with
//!   [`MAX_FAILURES`] failed credentials within [`FAILURE_PERIOD`] (a wrong
//!   password, an unknown user, a malformed header; no header at all is
//!   no failure) until its rate falls; a credential verified before still
//!   passes;
//! - hashes on tokio's blocking threads, at most [`hashing_slots`] at once
//!   in the process: the rest wait their turn, so guesses from many
//!   sources take no more than those cores from the serving threads.
//!
//! What it remembers and counts is shared by every verifier of the same
//! users and hashes ([`Verifier::shared`]: the `auth` rules of every
//! frontend, and of the proxy a reload starts beside the old one), as
//! the request-rate tables are handed over: a reload gives no source a
//! fresh allowance of guesses and makes no client hash again.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::{Duration, Instant};

use http::{HeaderMap, header};
use sha2::{Digest, Sha256};
use tokio::sync::Semaphore;

use crate::request_rate::RequestRate;

/// How long a verified credential passes without hashing again.
pub const REMEMBER: Duration = Duration::from_secs(600);
/// Verified credentials remembered at most (about 60 bytes each).
pub const REMEMBERED: usize = 10_000;
/// Failed credentials from one source within `FAILURE_PERIOD` after which
/// it is refused without hashing.
pub const MAX_FAILURES: u32 = 10;
/// The period failures are counted over (a sliding one, as HAProxy's rates).
pub const FAILURE_PERIOD: Duration = Duration::from_secs(10);

/// Hashes running at once in the process: half the CPUs, at least one.
pub fn hashing_slots() -> usize {
    std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1))
}

static HASHING: LazyLock<Semaphore> = LazyLock::new(|| Semaphore::new(hashing_slots()));

/// Checks Basic credentials against one userlist.
pub struct Verifier {
    /// User name to SHA-512 crypt hash.
    users: Arc<HashMap<String, String>>,
    /// What it remembers and counts (shared, see the module).
    state: Arc<State>,
}

/// The verified credentials and failures of one set of users.
struct State {
    /// Keys the fingerprints of verified credentials.
    key: [u8; 32],
    /// Fingerprints of verified credentials, with when they were verified.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    /// Failed credentials per source.
    failures: RequestRate,
    /// Hashes computed so far.
    hashes: AtomicU64,
}

impl State {
    fn new() -> Arc<State> {
        Arc::new(State {
            key: rand::random(),
            verified: Mutex::default(),
            failures: RequestRate::new(FAILURE_PERIOD),
            hashes: AtomicU64::new(0),
        })
    }
}

/// The states in use, by the userlist they are of (`Verifier::shared`).
type States = Mutex<HashMap<[u8; 32], std::sync::Weak<State>>>;
static STATES: LazyLock<States> = LazyLock::new(States::default);

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Verifier")
            .field("users", &self.users.len())
            .finish_non_exhaustive()
    }
}

impl Verifier {
    /// A verifier of `users` (name to SHA-512 crypt hash) of its own.
    pub fn new(users: Arc<HashMap<String, String>>) -> Verifier {
        Verifier {
            users,
            state: State::new(),
        }
    }

    /// A verifier of `users` sharing what it remembers and counts with
    /// every other live one of the same users and hashes.
    pub fn shared(users: Arc<HashMap<String, String>>) -> Verifier {
        let mut sorted: Vec<(&String, &String)> = users.iter().collect();
        sorted.sort();
        let mut h = Sha256::new();
        for (name, hash) in sorted {
            for part in [name, hash] {
                h.update((part.len() as u64).to_be_bytes());
                h.update(part.as_bytes());
            }
        }
        let id: [u8; 32] = h.finalize().into();
        let mut states = STATES.lock().unwrap_or_else(|e| e.into_inner());
        states.retain(|_, s| s.strong_count() > 0);
        let state = match states.get(&id).and_then(std::sync::Weak::upgrade) {
            Some(s) => s,
            None => {
                let s = State::new();
                states.insert(id, Arc::downgrade(&s));
                s
            }
        };
        Verifier { users, state }
    }

    /// Whether it has no user (then nothing passes).
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }

    /// Hashes computed so far (a remembered credential or a refused source costs none).
    pub fn hashes(&self) -> u64 {
        self.state.hashes.load(Ordering::Relaxed)
    }

    /// Whether `headers` carry Basic credentials of a user of the list;
    /// `peer` is where they came from (None: not counted per source).
    pub async fn check(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> bool {
        if !headers.contains_key(header::AUTHORIZATION) {
            return false;
        }
        let now = Instant::now();
        let Some((user, password)) = basic_credentials(headers) else {
            self.failed(peer, now);
            return false;
        };
        let Some(hash) = self.users.get(&user) else {
            self.failed(peer, now);
            return false;
        };
        let print = self.fingerprint(&user, hash, &password);
        if self.remembered(&print, now) {
            return true;
        }
        let refused = |at| peer.is_some_and(|p| self.state.failures.rate(p, at) >= MAX_FAILURES);
        if refused(now) {
            return false;
        }
        let Ok(_slot) = HASHING.acquire().await else {
            return false;
        };
        // Again after the wait: guesses sent at once all passed the first look.
        if refused(Instant::now()) {
            return false;
        }
        self.state.hashes.fetch_add(1, Ordering::Relaxed);
        let hash = hash.clone();
        let ok =
            tokio::task::spawn_blocking(move || sha_crypt::sha512_check(&password, &hash).is_ok())
                .await
                .unwrap_or(false);
        if ok {
            self.remember(print, Instant::now());
        } else {
            self.failed(peer, Instant::now());
        }
        ok
    }

    /// Whether `peer` failed [`MAX_FAILURES`] times within [`FAILURE_PERIOD`]
    /// (then any credential of it is refused unchecked: a token too).
    pub fn source_refused(&self, peer: IpAddr) -> bool {
        self.state.failures.rate(peer, Instant::now()) >= MAX_FAILURES
    }

    /// Counts a failed credential of another kind (a wrong Bearer token)
    /// against `peer`, with the failed passwords.
    pub fn count_failure(&self, peer: IpAddr) {
        self.failed(Some(peer), Instant::now());
    }

    fn failed(&self, peer: Option<IpAddr>, now: Instant) {
        if let Some(p) = peer {
            self.state.failures.hit(p, now);
        }
    }

    fn fingerprint(&self, user: &str, hash: &str, password: &str) -> [u8; 32] {
        let mut h = Sha256::new();
        h.update(self.state.key);
        // Lengths first: no two (user, hash, password) give one input.
        for part in [user, hash, password] {
            h.update((part.len() as u64).to_be_bytes());
            h.update(part.as_bytes());
        }
        h.finalize().into()
    }

    fn remembered(&self, print: &[u8; 32], now: Instant) -> bool {
        let verified = self
            .state
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        verified
            .get(print)
            .is_some_and(|&at| now.saturating_duration_since(at) < REMEMBER)
    }

    fn remember(&self, print: [u8; 32], now: Instant) {
        let mut verified = self
            .state
            .verified
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if verified.len() >= REMEMBERED {
            verified.retain(|_, at| now.saturating_duration_since(*at) < REMEMBER);
        }
        if verified.len() >= REMEMBERED {
            // Still full of fresh ones: start over rather than grow (they
            // are hashed again once).
            verified.clear();
        }
        verified.insert(print, now);
    }
}

/// User and password of an `Authorization: Basic` header.
pub fn basic_credentials(headers: &HeaderMap) -> Option<(String, String)> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = String::from_utf8(base64_decode(token.trim())?).ok()?;
    let (user, password) = decoded.split_once(':')?;
    Some((user.to_string(), password.to_string()))
}

/// Standard base64 with optional padding; None on any other byte.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let text = text.trim_end_matches('=');
    let mut out = Vec::with_capacity(text.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0u32);
    for b in text.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // A single leftover character cannot encode a byte.
    (bits < 6).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn basic(user: &str, password: &str) -> HeaderMap {
        let raw = format!("{user}:{password}");
        let table = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
        let mut text = String::new();
        for chunk in raw.as_bytes().chunks(3) {
            let b = [
                chunk[0],
                *chunk.get(1).unwrap_or(&0),
                *chunk.get(2).unwrap_or(&0),
            ];
            let n = u32::from(b[0]) << 16 | u32::from(b[1]) << 8 | u32::from(b[2]);
            for i in 0..=chunk.len() {
                text.push(table[(n >> (18 - 6 * i) & 63) as usize] as char);
            }
        }
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_str(&format!("Basic {text}")).unwrap(),
        );
        h
    }

    fn verifier() -> Verifier {
        let params = sha_crypt::Sha512Params::new(1_000).unwrap();
        let hash = sha_crypt::sha512_simple("s3cret", &params).unwrap();
        Verifier::new(Arc::new(HashMap::from([("alice".to_string(), hash)])))
    }

    #[test]
    fn basic_credentials_are_decoded() {
        let mut h = HeaderMap::new();
        // "al:p:w": the password may hold a colon, the user name may not.
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Basic YWw6cDp3"),
        );
        assert_eq!(basic_credentials(&h), Some(("al".into(), "p:w".into())));
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("basic YTpi"),
        );
        assert_eq!(basic_credentials(&h), Some(("a".into(), "b".into())));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !!!"));
        assert_eq!(basic_credentials(&h), None);
        assert_eq!(
            basic_credentials(&basic("x", "y:z")),
            Some(("x".into(), "y:z".into()))
        );
        assert_eq!(base64_decode("QQ"), Some(b"A".to_vec()));
        assert_eq!(base64_decode("Q"), None);
    }

    #[tokio::test]
    async fn a_verified_credential_is_hashed_once() {
        let v = verifier();
        let peer = Some("192.0.2.1".parse().unwrap());
        assert!(!v.check(&HeaderMap::new(), peer).await, "no credentials");
        for _ in 0..5 {
            assert!(v.check(&basic("alice", "s3cret"), peer).await);
        }
        assert_eq!(v.hashes(), 1);
        assert!(!v.check(&basic("alice", "s3cret!"), peer).await);
        assert_eq!(v.hashes(), 2, "another password is hashed");
        // A changed password is a new hash: what was remembered no longer passes.
        let params = sha_crypt::Sha512Params::new(1_000).unwrap();
        let other = sha_crypt::sha512_simple("n3w", &params).unwrap();
        let changed = Verifier {
            users: Arc::new(HashMap::from([("alice".to_string(), other)])),
            ..verifier()
        };
        assert!(!changed.check(&basic("alice", "s3cret"), peer).await);
    }

    #[tokio::test]
    async fn a_source_that_keeps_failing_is_refused_without_hashing() {
        let v = verifier();
        let (guesser, other) = (
            Some("192.0.2.1".parse().unwrap()),
            Some("192.0.2.2".parse().unwrap()),
        );
        // A verified credential of the guessing source, before it guesses.
        assert!(v.check(&basic("alice", "s3cret"), guesser).await);
        for i in 0..MAX_FAILURES {
            // Unknown users and malformed headers count, and cost no hash.
            let h = match i % 3 {
                0 => basic("alice", &format!("guess{i}")),
                1 => basic("mallory", "x"),
                _ => {
                    let mut h = HeaderMap::new();
                    h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic !"));
                    h
                }
            };
            assert!(!v.check(&h, guesser).await);
        }
        let hashed = v.hashes();
        assert_eq!(hashed, 1 + 4, "the four wrong passwords and the right one");
        for _ in 0..100 {
            assert!(!v.check(&basic("alice", "guess"), guesser).await);
        }
        assert_eq!(v.hashes(), hashed, "refused without hashing");
        // What it verified before still passes; other sources are not refused.
        assert!(v.check(&basic("alice", "s3cret"), guesser).await);
        assert!(!v.check(&basic("alice", "nope"), other).await);
        assert_eq!(v.hashes(), hashed + 1);
        // Per IPv6 /64, as the other per-source limits.
        let v6 = |s: &str| Some(s.parse::<IpAddr>().unwrap());
        for i in 0..MAX_FAILURES {
            let src = v6(&format!("2001:db8::{i:x}"));
            assert!(!v.check(&basic("mallory", "x"), src).await);
        }
        let before = v.hashes();
        assert!(!v.check(&basic("alice", "nope"), v6("2001:db8::99")).await);
        assert_eq!(v.hashes(), before, "the /64 is refused");
    }

    #[tokio::test]
    async fn verifiers_of_the_same_users_share_what_they_remember_and_count() {
        let v = verifier();
        let users = v.users.clone();
        let peer = Some("192.0.2.9".parse().unwrap());
        let (a, b) = (
            Verifier::shared(users.clone()),
            Verifier::shared(users.clone()),
        );
        assert!(a.check(&basic("alice", "s3cret"), peer).await);
        // The one a reload starts: no hash for what the old one verified...
        assert!(b.check(&basic("alice", "s3cret"), peer).await);
        assert_eq!(b.hashes(), 1);
        // ...and the guesses counted against the old one still count.
        for i in 0..MAX_FAILURES {
            assert!(!a.check(&basic("alice", &format!("g{i}")), peer).await);
        }
        let before = b.hashes();
        assert!(!b.check(&basic("alice", "g"), peer).await);
        assert_eq!(b.hashes(), before, "refused without hashing");
        // Another userlist (or the same with a changed password) starts afresh.
        let other = verifier();
        let c = Verifier::shared(other.users.clone());
        assert_eq!(c.hashes(), 0);
        // (Its own count of failures: this source is not refused there.)
        assert!(c.check(&basic("alice", "s3cret"), peer).await);
        assert_eq!(c.hashes(), 1);
        drop((a, b));
        assert_eq!(
            Verifier::shared(users).hashes(),
            0,
            "gone with its last verifier"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn guesses_sent_at_once_are_bounded_too() {
        let v = Arc::new(verifier());
        let peer = Some("192.0.2.7".parse().unwrap());
        let guesses: Vec<_> = (0..60)
            .map(|i| {
                let v = v.clone();
                tokio::spawn(async move { v.check(&basic("alice", &format!("g{i}")), peer).await })
            })
            .collect();
        for g in guesses {
            assert!(!g.await.unwrap());
        }
        // Those in a hashing slot when the tenth failure was counted may
        // finish; the rest are refused unhashed.
        let bound = u64::from(MAX_FAILURES) + hashing_slots() as u64;
        assert!(v.hashes() <= bound, "{} hashes", v.hashes());
    }

    #[test]
    fn the_remembered_set_stays_bounded() {
        let v = verifier();
        let now = Instant::now();
        for i in 0..REMEMBERED + 10 {
            v.remember(v.fingerprint("u", "h", &i.to_string()), now);
        }
        let kept = v.state.verified.lock().unwrap().len();
        assert!(kept <= REMEMBERED, "{kept}");
        let old = now - REMEMBER;
        assert!(!{
            v.remember(v.fingerprint("u", "h", "old"), old);
            v.remembered(&v.fingerprint("u", "h", "old"), now)
        });
    }
}
