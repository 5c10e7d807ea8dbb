//! The proxy's shutdown as one task sees it, checked cheaply on every wake-up.

use std::future::Future;
use std::pin::Pin;
use std::task::Context;

use tokio::sync::watch;

/// The `changed()` future of a shutdown watch, pinned by its task.
pub(crate) type Changed<'a> =
    Pin<&'a mut (dyn Future<Output = Result<(), watch::error::RecvError>> + Send)>;

/// A task's view of the shutdown watch: `changed()` is polled once to
/// register the task's waker, and after that only when a version check on a
/// clone says the watch moved. (Polling it on every wake-up, as `select!`
/// does, or a new `changed()` future per wait, showed in profiles.)
pub(crate) struct ShutdownWatch<'a> {
    probe: watch::Receiver<()>,
    changed: Changed<'a>,
    registered: bool,
}

impl<'a> ShutdownWatch<'a> {
    /// Watches through `changed` (from `rx.changed()`), with `probe` a clone of `rx`.
    pub(crate) fn new(probe: watch::Receiver<()>, changed: Changed<'a>) -> Self {
        ShutdownWatch {
            probe,
            changed,
            registered: false,
        }
    }

    /// Whether the shutdown has come, without registering for it.
    pub(crate) fn has_come(&self) -> bool {
        self.probe.has_changed().unwrap_or(true)
    }

    /// Whether the shutdown has come; otherwise the task is woken when it does.
    pub(crate) fn poll_come(&mut self, cx: &mut Context<'_>) -> bool {
        if self.registered && !self.has_come() {
            return false;
        }
        self.registered = true;
        self.changed.as_mut().poll(cx).is_ready()
    }
}

#[cfg(test)]
mod tests {
    use std::future::poll_fn;
    use std::pin::pin;
    use std::task::Poll;

    use super::*;

    #[tokio::test]
    async fn wakes_its_task_when_the_sender_goes() {
        let (tx, mut rx) = watch::channel(());
        let probe = rx.clone();
        let changed = pin!(rx.changed());
        let mut watch = ShutdownWatch::new(probe, changed);
        let first = poll_fn(|cx| Poll::Ready(watch.poll_come(cx))).await;
        assert!(!first && !watch.has_come());
        let waiter = async {
            poll_fn(|cx| {
                if watch.poll_come(cx) {
                    Poll::Ready(())
                } else {
                    Poll::Pending
                }
            })
            .await
        };
        let dropper = async {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            drop(tx);
        };
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            tokio::join!(waiter, dropper)
        })
        .await
        .expect("woken by the shutdown");
    }
}
