//! Which of sluice's runtime threads this is. The daemon serves with one single-threaded runtime per
//! core (`server::runtimes`), each serving its connections start to end, so a request never waits for
//! another thread to be woken; what would be driven by another thread otherwise (the upstream
//! connection pools) is kept once per runtime and found by this index.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

/// How many runtimes serve requests (1 unless the daemon set it before building its state).
static COUNT: AtomicUsize = AtomicUsize::new(1);

thread_local! {
    /// This thread's runtime: 0 on any thread that did not say (the first runtime, tests, helpers).
    static INDEX: Cell<usize> = const { Cell::new(0) };
}

/// Sets how many runtimes will serve requests; at least one.
pub fn set_count(count: usize) {
    COUNT.store(count.max(1), Ordering::Relaxed);
}

/// How many runtimes serve requests.
pub fn count() -> usize {
    COUNT.load(Ordering::Relaxed).max(1)
}

/// Marks the calling thread as the runtime `index`.
pub fn enter(index: usize) {
    INDEX.with(|cell| cell.set(index));
}

/// This thread's runtime, below `of` (0 when `of` is 0).
pub fn index(of: usize) -> usize {
    INDEX.with(Cell::get).checked_rem(of).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_thread_finds_its_own_index_within_the_bound() {
        assert_eq!(index(4), 0, "a thread that did not say is the first runtime");
        enter(5);
        assert_eq!(index(8), 5);
        assert_eq!(index(2), 1, "an index past the bound wraps instead of going out of range");
        assert_eq!(index(0), 0);
        std::thread::spawn(|| assert_eq!(index(8), 0)).join().unwrap();
    }
}
