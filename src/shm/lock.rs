//! Process-shared robust mutexes: a lock whose holder died is handed to the next locker
//! with the news, so it can repair what the dead holder left half done.

use super::layout::RawLock;
use super::Corrupt;

/// How a lock was acquired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Acquired {
    Clean,
    /// The previous holder died holding it: the protected state may be half changed and must
    /// be repaired before [`Guard::mark_consistent`].
    OwnerDied,
}

/// Holds a lock until dropped.
pub struct Guard<'a> {
    lock: &'a RawLock,
}

impl RawLock {
    /// Initialises the mutex in place: process-shared and robust. Only for a lock nobody can
    /// be waiting on (a new file, or a slot nobody could have reached yet).
    pub fn init(&self) -> Result<(), Corrupt> {
        // SAFETY: attr is initialised before use and destroyed after; the mutex memory is
        // ours to initialise (see above).
        unsafe {
            let mut attr: libc::pthread_mutexattr_t = std::mem::zeroed();
            if libc::pthread_mutexattr_init(&mut attr) != 0 {
                return Err(Corrupt { what: "pthread_mutexattr_init failed", at: 0 });
            }
            let ok = libc::pthread_mutexattr_setpshared(&mut attr, libc::PTHREAD_PROCESS_SHARED) == 0
                && libc::pthread_mutexattr_setrobust(&mut attr, libc::PTHREAD_MUTEX_ROBUST) == 0
                && libc::pthread_mutex_init(self.0.get(), &attr) == 0;
            libc::pthread_mutexattr_destroy(&mut attr);
            if ok {
                Ok(())
            } else {
                Err(Corrupt { what: "pthread_mutex_init failed", at: 0 })
            }
        }
    }

    /// Waits for the lock. Every holder in this module holds it only for a bounded amount of
    /// memory work (never while waiting for anything but a later lock in the fixed order
    /// registry → dict → heap), so this wait is bounded too.
    pub fn lock(&self) -> Result<(Guard<'_>, Acquired), Corrupt> {
        // SAFETY: the mutex was initialised (by `init`) before any locker could reach it.
        let rc = unsafe { libc::pthread_mutex_lock(self.0.get()) };
        let guard = Guard { lock: self };
        match rc {
            0 => Ok((guard, Acquired::Clean)),
            libc::EOWNERDEAD => Ok((guard, Acquired::OwnerDied)),
            _ => {
                // We do not hold it: forget the guard so nothing unlocks it.
                std::mem::forget(guard);
                Err(Corrupt { what: "lock unusable (ENOTRECOVERABLE or not initialised)", at: rc as u64 })
            }
        }
    }
}

impl Guard<'_> {
    /// Declares the state repaired; without it the unlock would make the lock unusable forever.
    pub fn mark_consistent(&self) {
        // SAFETY: we hold the lock (acquired with EOWNERDEAD).
        unsafe { libc::pthread_mutex_consistent(self.lock.0.get()) };
    }
}

impl Drop for Guard<'_> {
    fn drop(&mut self) {
        // SAFETY: the guard exists only while this thread holds the lock.
        unsafe { libc::pthread_mutex_unlock(self.lock.0.get()) };
    }
}
