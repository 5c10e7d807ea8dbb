//! A lazy timer for one wait at a time, shared by the client and server
//! timeouts of both HTTP paths.

use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::time::{Instant, Sleep};

/// A lazy timer before its first use: due far ahead, so that the first wait
/// moves it earlier. (A timer created due now fires at once when first
/// polled, and registering an expired timer wakes the runtime's driver
/// through its eventfd: two system calls per connection.)
fn unarmed_timer() -> Pin<Box<Sleep>> {
    Box::pin(tokio::time::sleep(Duration::from_secs(24 * 3600)))
}

/// A timer for one wait at a time, moved in tokio's wheel only when a wait
/// ends earlier than the registered deadline (moving it per request showed in
/// profiles); a wait that ends later is caught when the timer fires.
pub(crate) struct Deadline {
    sleep: Pin<Box<Sleep>>,
}

impl Deadline {
    pub(crate) fn new() -> Self {
        Deadline {
            sleep: unarmed_timer(),
        }
    }

    pub(crate) fn arm(&mut self, due: Instant) {
        if due < self.sleep.deadline() || self.sleep.is_elapsed() {
            self.sleep.as_mut().reset(due);
        }
    }

    /// Whether `due` has passed; otherwise the task is woken when it may have.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>, due: Instant) -> bool {
        loop {
            if self.sleep.as_mut().poll(cx).is_pending() {
                return false;
            }
            if Instant::now() >= due {
                return true;
            }
            self.sleep.as_mut().reset(due);
        }
    }

    /// Runs `fut` for at most `limit` (counted from its first wait: no clock
    /// read when it is ready at once); None when it timed out.
    pub(crate) async fn limit<F: Future>(&mut self, limit: Duration, fut: F) -> Option<F::Output> {
        let mut fut = pin!(fut);
        let mut due = None;
        poll_fn(|cx| {
            if let Poll::Ready(v) = fut.as_mut().poll(cx) {
                return Poll::Ready(Some(v));
            }
            let d = *due.get_or_insert_with(|| Instant::now() + limit);
            self.arm(d);
            if self.poll_expired(cx, d) {
                Poll::Ready(None)
            } else {
                Poll::Pending
            }
        })
        .await
    }
}

/// A limit on each wait of a stream that is polled rather than awaited (a
/// body handed to hyper): the timer is made at the first wait only, and
/// moved in tokio's wheel as `Deadline` moves it.
pub(crate) struct WaitLimit {
    limit: Duration,
    /// When the current wait times out; None while nothing waits.
    due: Option<Instant>,
    timer: Option<Deadline>,
}

impl WaitLimit {
    pub(crate) fn new(limit: Duration) -> Self {
        WaitLimit {
            limit,
            due: None,
            timer: None,
        }
    }

    /// The stream moved: the next wait counts from its own start.
    pub(crate) fn progress(&mut self) {
        self.due = None;
    }

    /// The stream waits: whether this wait has lasted the limit; otherwise
    /// the task is woken when it may have.
    pub(crate) fn poll_expired(&mut self, cx: &mut Context<'_>) -> bool {
        let due = *self.due.get_or_insert_with(|| Instant::now() + self.limit);
        let timer = self.timer.get_or_insert_with(Deadline::new);
        timer.arm(due);
        timer.poll_expired(cx, due)
    }
}
