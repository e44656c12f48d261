//! The end of a drain: when `server.shutdown_grace` has passed, every request still on its way is told to
//! stop — a request waiting or backing off answers 503 `sluice_shutting_down`, one waiting for upstream
//! headers too, and a response already streaming ends with an in-band error event (SSE) or an aborted
//! body — so that every accepted request ends in a response before the process exits.

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::Context;

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

/// The signal, shared by the proxy and every request and body.
#[derive(Debug, Default)]
pub struct Stop {
    triggered: AtomicBool,
    notify: Arc<Notify>,
}

impl Stop {
    /// Tells everyone to stop now.
    pub fn trigger(&self) {
        self.triggered.store(true, Ordering::SeqCst);
        self.notify.notify_waiters();
    }

    pub fn triggered(&self) -> bool {
        self.triggered.load(Ordering::SeqCst)
    }

    /// Completes once `trigger` was called (at once if it already was).
    pub async fn wait(&self) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.triggered() {
            return;
        }
        notified.await;
    }

    /// A handle a body can poll without borrowing the signal.
    pub fn watch(self: &Arc<Self>) -> StopWatch {
        let mut notified = Box::pin(self.notify.clone().notified_owned());
        notified.as_mut().enable();
        StopWatch { stop: self.clone(), notified }
    }
}

/// A pollable view of the signal for a response body.
pub struct StopWatch {
    stop: Arc<Stop>,
    notified: Pin<Box<OwnedNotified>>,
}

impl StopWatch {
    /// Whether the signal came; registers the task to be woken when it does.
    pub fn poll_triggered(&mut self, cx: &mut Context<'_>) -> bool {
        if self.stop.triggered() {
            return true;
        }
        self.notified.as_mut().poll(cx).is_ready() || self.stop.triggered()
    }
}

#[cfg(test)]
mod tests {
    use std::task::Poll;

    use super::*;

    #[tokio::test]
    async fn waiters_and_watchers_see_the_trigger() {
        let stop = Arc::new(Stop::default());
        let mut watch = stop.watch();
        let waiter = tokio::spawn({
            let stop = stop.clone();
            async move { stop.wait().await }
        });
        let polled = std::future::poll_fn(|cx| Poll::Ready(watch.poll_triggered(cx))).await;
        assert!(!polled);
        stop.trigger();
        waiter.await.unwrap();
        assert!(std::future::poll_fn(|cx| Poll::Ready(watch.poll_triggered(cx))).await);
        stop.wait().await; // already triggered: at once
    }
}
