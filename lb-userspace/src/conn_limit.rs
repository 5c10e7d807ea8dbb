//! A cap on the connections an auxiliary listener (metrics, admin) holds
//! at once: they need no authentication before accept and share the fds
//! of the data path, so a client opening many must not exhaust them.
//! Connections past the cap are closed at once, and said in the log at
//! most once per period per listener.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::warn;

/// Connections an auxiliary listener holds at once: each may wait its
/// read and write timeouts unauthenticated, and the fds are the data path's.
pub const MAX_AUX_CONNECTIONS: usize = 64;

/// Refusals logged at most once per this period.
const LOG_PERIOD: Duration = Duration::from_secs(10);

/// Admits at most a number of connections at once.
#[derive(Debug)]
pub struct ConnLimit {
    what: &'static str,
    max: usize,
    slots: Arc<Semaphore>,
    /// When a refusal was last logged, and how many were not since.
    logged: Mutex<(Option<Instant>, u64)>,
}

impl ConnLimit {
    /// At most `max` connections of the listener called `what` (in logs).
    pub fn new(what: &'static str, max: usize) -> Self {
        ConnLimit {
            what,
            max,
            slots: Arc::new(Semaphore::new(max)),
            logged: Mutex::new((None, 0)),
        }
    }

    /// A slot for a connection from `peer`, held as long as it is open;
    /// None (logged, rate-limited) when all are taken: close it.
    pub fn admit(&self, peer: SocketAddr) -> Option<OwnedSemaphorePermit> {
        if let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() {
            return Some(slot);
        }
        let now = Instant::now();
        let mut logged = self.logged.lock().unwrap_or_else(|e| e.into_inner());
        match logged.0 {
            Some(at) if now.saturating_duration_since(at) < LOG_PERIOD => logged.1 += 1,
            _ => {
                warn!(listener = self.what, %peer, max = self.max, also_refused = logged.1,
                    "connection limit reached: connection closed");
                *logged = (Some(now), 0);
            }
        }
        None
    }
}

/// What the listeners' tests share.
#[cfg(test)]
pub(crate) mod testing {
    use std::net::SocketAddr;
    use std::time::Duration;

    use tokio::io::AsyncReadExt as _;
    use tokio::net::TcpStream;

    /// Opens `MAX_AUX_CONNECTIONS` connections to `addr` and checks that
    /// one more is closed at once; the ones it holds come back.
    pub(crate) async fn fill_and_one_more_is_closed(addr: SocketAddr) -> Vec<TcpStream> {
        let mut held = Vec::new();
        for _ in 0..super::MAX_AUX_CONNECTIONS {
            held.push(TcpStream::connect(addr).await.unwrap());
        }
        // Let the server take them all before the one too many.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let mut extra = TcpStream::connect(addr).await.unwrap();
        let mut buf = [0u8; 16];
        let n = tokio::time::timeout(Duration::from_secs(5), extra.read(&mut buf))
            .await
            .expect("closed at once, not held");
        assert!(matches!(n, Ok(0) | Err(_)), "{n:?}");
        held
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn admits_up_to_the_limit_and_again_once_one_closes() {
        let limit = ConnLimit::new("test", 2);
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        let a = limit.admit(peer).unwrap();
        let _b = limit.admit(peer).unwrap();
        assert!(limit.admit(peer).is_none());
        assert!(limit.admit(peer).is_none());
        drop(a);
        assert!(limit.admit(peer).is_some());
    }
}
