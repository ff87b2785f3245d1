//! The count of the port's own threads that run Python (pool workers, SharedDict decoders,
//! the event loop's threads), stuck ones included, against the cap `--max-threads`.
//!
//! Each costs a stack and a malloc arena (address space, which counts against
//! `--max-memory-bytes`). Hot workers and the first event-loop thread always start; every
//! other thread starts only below the cap. Requests nested in callbacks need none: they
//! run on the thread that waits for the callback.

use std::sync::atomic::{AtomicUsize, Ordering};

static PYTHON_THREADS: AtomicUsize = AtomicUsize::new(0);
static MAX_THREADS: AtomicUsize = AtomicUsize::new(64);

/// Sets the cap (once, at start-up).
pub fn set_max(n: usize) {
    MAX_THREADS.store(n.max(1), Ordering::Release);
}

/// Threads alive now.
pub fn count() -> usize {
    PYTHON_THREADS.load(Ordering::Acquire)
}

/// Counts a thread that must start whatever the cap (a hot worker).
pub fn reserve_always() {
    PYTHON_THREADS.fetch_add(1, Ordering::AcqRel);
}

/// Counts a thread if the cap allows one more; false when it does not.
pub fn try_reserve() -> bool {
    let max = MAX_THREADS.load(Ordering::Acquire);
    PYTHON_THREADS
        .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| (n < max).then_some(n + 1))
        .is_ok()
}

/// A counted thread ended (or failed to start).
pub fn release() {
    PYTHON_THREADS.fetch_sub(1, Ordering::AcqRel);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The cap is exact: the reservation that reaches it succeeds, the next one fails,
    /// and a release makes room again. (One test: the counter is process-wide.)
    #[test]
    fn reservations_stop_at_the_cap() {
        let base = count();
        set_max(base + 2);
        assert!(try_reserve());
        assert!(try_reserve());
        assert!(!try_reserve(), "one past the cap");
        assert_eq!(count(), base + 2);
        reserve_always();
        assert_eq!(count(), base + 3, "hot threads start whatever the cap");
        release();
        assert!(!try_reserve(), "still at the cap");
        release();
        assert!(try_reserve());
        release();
        release();
        assert_eq!(count(), base);
        set_max(64);
    }
}
