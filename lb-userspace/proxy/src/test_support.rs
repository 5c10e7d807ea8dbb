//! Helpers shared by the proxy's test files: a temporary directory and a
//! proxy with one frontend on 127.0.0.1 and one pool.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Frontend, Pool, Proxy, ProxyConfig};

/// A temporary directory removed on drop.
pub(crate) struct TempDir(pub PathBuf);

impl TempDir {
    /// A new, empty directory whose name has `tag`, this process and a counter.
    pub(crate) fn new(tag: &str) -> Self {
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
pub(crate) fn local_frontend() -> Frontend {
    Frontend::new("web", vec!["127.0.0.1:0".parse().unwrap()], "app")
}

/// Starts a proxy with `fe` and `pool` only, routing everything to the default pool.
pub(crate) async fn start_proxy(fe: Frontend, pool: Pool) -> Proxy {
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
pub(crate) fn two_pool_config(
    app: SocketAddr,
    api: SocketAddr,
    frontend: &str,
    top: &str,
) -> ProxyConfig {
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
