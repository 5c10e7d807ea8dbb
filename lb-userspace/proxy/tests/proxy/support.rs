//! Helpers shared by the proxy's test files: a temporary directory, a proxy
//! with one frontend on 127.0.0.1 and one pool, its figures, and its access log.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, Once};

use lb_proxy::{Frontend, Pool, Proxy, ProxyConfig};
use rustls::crypto::CryptoProvider;
use tracing::field::{Field, Visit};
use tracing::{Event, Metadata, Subscriber, span};

/// A temporary directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    /// A new, empty directory whose name has `tag`, this process and a counter.
    pub fn new(tag: &str) -> Self {
        static N: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "lb-proxy-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Frontend "web" on 127.0.0.1 (any port), default pool "app".
pub fn local_frontend() -> Frontend {
    Frontend::new("web", vec!["127.0.0.1:0".parse().unwrap()], "app")
}

/// Starts a proxy with `fe` and `pool` only, routing everything to the default pool.
pub async fn start_proxy(fe: Frontend, pool: Pool) -> Proxy {
    Proxy::start(
        ProxyConfig {
            frontends: vec![fe],
            pools: vec![pool],
            ..Default::default()
        },
        None,
    )
    .await
    .unwrap()
}

/// Frontend "web" on 127.0.0.1 with `frontend` (TOML) appended to its table,
/// pools "app" (server `app`) and "api" (server `api`), then `top`.
pub fn two_pool_config(app: SocketAddr, api: SocketAddr, frontend: &str, top: &str) -> ProxyConfig {
    let text = format!(
        r#"
[[frontend]]
name = "web"
binds = ["127.0.0.1:0"]
default_pool = "app"
{frontend}

[[pool]]
name = "app"
servers = [{{ address = "{app}" }}]

[[pool]]
name = "api"
servers = [{{ address = "{api}" }}]

{top}
"#
    );
    toml::from_str(&text).unwrap()
}

/// Idle keep-alive connections of the first pool to `server`.
pub fn idle(proxy: &Proxy, server: SocketAddr) -> usize {
    proxy.stats().pools()[0]
        .servers
        .iter()
        .find(|s| s.address == server)
        .map_or(0, |s| s.idle_connections)
}

/// The crypto provider of the test clients and servers (the proxy's own: ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Every access log line (`tracing` target `access`) written in this test
/// binary so far, once `capture_access_log` has run.
static LINES: Mutex<Vec<String>> = Mutex::new(Vec::new());

/// Installs, once for the whole binary, a subscriber keeping the access log
/// lines: one global subscriber, because tests run in parallel on threads of
/// their own (a per-thread one would miss the proxy's tasks).
pub fn capture_access_log() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        tracing::subscriber::set_global_default(AccessLog)
            .expect("no other global subscriber in the proxy's tests");
    });
}

/// The access log lines written so far (`capture_access_log` first).
pub fn access_lines() -> Vec<String> {
    LINES.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

/// A subscriber that keeps the message of each `access` event in `LINES`.
struct AccessLog;

impl Subscriber for AccessLog {
    fn enabled(&self, meta: &Metadata<'_>) -> bool {
        meta.target() == "access"
    }

    fn new_span(&self, _: &span::Attributes<'_>) -> span::Id {
        // Never called: no span is enabled.
        span::Id::from_u64(1)
    }

    fn record(&self, _: &span::Id, _: &span::Record<'_>) {}

    fn record_follows_from(&self, _: &span::Id, _: &span::Id) {}

    fn event(&self, event: &Event<'_>) {
        let mut message = Message(String::new());
        event.record(&mut message);
        LINES
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(message.0);
    }

    fn enter(&self, _: &span::Id) {}

    fn exit(&self, _: &span::Id) {}
}

/// The `message` field of an event (the log line).
struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}
