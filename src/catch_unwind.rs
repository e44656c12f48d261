//! Catching a panic inside a future, as `std::panic::catch_unwind` does for a closure: the request path
//! and the admission dispatcher use it so that one bug answers one request (or the queue) with an error
//! instead of killing a connection or leaving waiters hanging.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Polls the inner future; a panic while polling becomes `Err(payload)`.
pub struct CatchUnwind<F>(Pin<Box<F>>);

impl<F: Future> CatchUnwind<F> {
    /// Wraps `future`. Whatever it borrows is treated as unwind-safe: after a panic, the caller answers
    /// with an error and drops the future, and shared state is only reached through poison-tolerant locks.
    pub fn new(future: F) -> Self {
        Self(Box::pin(future))
    }
}

impl<F: Future> Future for CatchUnwind<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let inner = self.0.as_mut();
        match std::panic::catch_unwind(AssertUnwindSafe(|| inner.poll(cx))) {
            Ok(Poll::Pending) => Poll::Pending,
            Ok(Poll::Ready(value)) => Poll::Ready(Ok(value)),
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// The message of a panic payload, for the log.
pub fn panic_message(payload: &(dyn std::any::Any + Send)) -> &str {
    payload
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| payload.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(no message)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panic_becomes_an_error_and_a_value_passes() {
        assert_eq!(CatchUnwind::new(async { 7 }).await.unwrap(), 7);
        let caught = CatchUnwind::new(async {
            if std::hint::black_box(true) {
                panic!("boom");
            }
        })
        .await
        .unwrap_err();
        assert_eq!(panic_message(&*caught), "boom");
    }
}
