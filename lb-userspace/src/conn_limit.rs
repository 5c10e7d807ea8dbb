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
