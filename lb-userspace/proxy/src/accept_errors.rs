//! What every listener does when `accept` fails (usually out of file
//! descriptors, `EMFILE`/`ENFILE`): pause instead of spinning or giving the
//! listener up, and log the first failure and then one line per
//! `LOG_EVERY` with how many there were, instead of one per attempt.

use std::io;
use std::time::{Duration, Instant};

/// Pause after a failed accept before the next attempt.
pub const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);
/// At most one log line per listener per this long while accepts fail.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// One listener's failed accepts: when it last logged, and how many it has
/// not logged since.
#[derive(Debug)]
pub struct AcceptErrors {
    /// Names the listener in the log (`frontend web`, `metrics`, ...).
    what: String,
    last_log: Option<Instant>,
    unlogged: u64,
}

impl AcceptErrors {
    /// No failure yet for the listener `what`.
    pub fn new(what: impl Into<String>) -> Self {
        Self {
            what: what.into(),
            last_log: None,
            unlogged: 0,
        }
    }

    /// Counts a failure at `now`; returns how many to report (this one and
    /// those unlogged since the last line) when a line is due.
    pub fn record(&mut self, now: Instant) -> Option<u64> {
        self.unlogged += 1;
        let due = self
            .last_log
            .is_none_or(|at| now.saturating_duration_since(at) >= LOG_EVERY);
        if !due {
            return None;
        }
        self.last_log = Some(now);
        Some(std::mem::take(&mut self.unlogged))
    }

    /// Logs `e` if a line is due, then waits `ACCEPT_BACKOFF`.
    pub async fn pause(&mut self, e: &io::Error) {
        if let Some(count) = self.record(Instant::now()) {
            tracing::warn!(
                listener = %self.what,
                error = %e,
                failures = count,
                "accept failed; retrying every {ACCEPT_BACKOFF:?} (at most one line per {LOG_EVERY:?})"
            );
        }
        tokio::time::sleep(ACCEPT_BACKOFF).await;
    }

    /// What `accept` (a listener's accept) gives next, pausing through its failures.
    pub async fn accept<T, F>(&mut self, mut accept: impl FnMut() -> F) -> T
    where
        F: Future<Output = io::Result<T>>,
    {
        loop {
            match accept().await {
                Ok(x) => return x,
                Err(e) => self.pause(&e).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_failure_is_logged_then_one_line_per_period_with_the_count() {
        let mut errors = AcceptErrors::new("test");
        let t0 = Instant::now();
        assert_eq!(errors.record(t0), Some(1));
        // 20 a second for just under a period: silent.
        for i in 1..200 {
            assert_eq!(errors.record(t0 + ACCEPT_BACKOFF * i), None);
        }
        assert_eq!(errors.record(t0 + LOG_EVERY), Some(200));
        assert_eq!(errors.record(t0 + LOG_EVERY + ACCEPT_BACKOFF), None);
        // After a quiet spell, the next failure is logged at once.
        assert_eq!(errors.record(t0 + LOG_EVERY * 5), Some(2));
    }

    #[tokio::test]
    async fn accept_pauses_through_failures_to_the_next_connection() {
        let mut errors = AcceptErrors::new("test");
        let mut failures = 2;
        let start = Instant::now();
        let got = errors
            .accept(|| {
                failures -= 1;
                let failed = failures >= 0;
                async move {
                    if failed {
                        Err(io::Error::from(io::ErrorKind::OutOfMemory))
                    } else {
                        Ok(7)
                    }
                }
            })
            .await;
        assert_eq!(got, 7);
        assert!(start.elapsed() >= ACCEPT_BACKOFF * 2);
        assert_eq!(errors.unlogged, 1, "the second failure waits for its line");
    }
}
