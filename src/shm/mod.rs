//! The SharedDict store in OS shared memory: every dict of a pool of port programs, in one
//! file that each of them maps, safe against any of them being killed at any instant.
//!
//! Nothing here touches Python. Keys and values are opaque bytes (pickles); a dict's lock is
//! held only for a bounded amount of memory work, never while waiting for anything else.
//! Locks are always taken in one order: registry → dict → heap.
//!
//! The Erlang VM keeps a read cache of values it got from here. An entry the VM may cache is
//! flagged; a change to it (or to a whole dict that has such entries) made by a [`Gate`]d
//! caller first has the gate tell the VM to forget it, with no lock held, and waits: the new
//! value becomes visible only once the VM can no longer answer the old one, through whichever
//! port it reads. While that is in flight the entry (or dict) counts it, and no reply is
//! flagged cacheable. Changes the Erlang side asks for pass [`Ungated`]: the VM forgot the key
//! itself before it sent them.
//!
//! See DESIGN.md beside this file for the layout, the crash protocol and the measurements.

mod check;
mod dict;
mod handle;
mod heap;
mod layout;
mod lock;
mod mapping;
mod recover;
mod slots;
mod table;
mod view;

#[cfg(test)]
mod bench;
#[cfg(test)]
mod corrupt_tests;
#[cfg(test)]
mod crash_child;
#[cfg(test)]
mod crash_random;
#[cfg(test)]
mod crash_tests;
#[cfg(test)]
mod stress_tests;
#[cfg(test)]
mod tests;

pub use handle::DictRef;
pub use layout::{OWNER_MAX, TOKEN_LEN};

use mapping::Mapping;
use std::fmt;
use std::io;
use std::path::Path;
use std::sync::atomic::Ordering::*;
use std::sync::Arc;
use view::View;

/// Where the mapping contradicts itself: some process overwrote it (not something a crash
/// leaves: crashes are repaired). Carries what was wrong and where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Corrupt {
    pub what: &'static str,
    pub at: u64,
}

/// Why an operation failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The dict is gone (destroyed, owner dead, or an id/token that never named a live
    /// dict: deliberately indistinguishable).
    Destroyed,
    /// The write does not fit in the store's size bound (or no dict slot is free). Nothing
    /// was changed.
    Full,
    /// `give_away` by a caller that does not own the dict.
    NotOwner,
    /// An owner longer than [`OWNER_MAX`] bytes.
    OwnerTooLong,
    /// The kernel gave no random bytes for a token.
    NoRandomness,
    /// A gate gave up waiting for the VM (see [`Gate`]): nothing was changed.
    Interrupted,
    Corrupt(Corrupt),
}

impl From<Corrupt> for Error {
    fn from(c: Corrupt) -> Error {
        Error::Corrupt(c)
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Destroyed => write!(f, "the SharedDict has been destroyed"),
            Error::Full => write!(f, "the SharedDict store is full (app env shared_dict_memory)"),
            Error::NotOwner => write!(f, "only the owner may give a SharedDict away"),
            Error::OwnerTooLong => write!(f, "an owner's external form is longer than {OWNER_MAX} bytes"),
            Error::NoRandomness => write!(f, "the kernel gave no random bytes for a token"),
            Error::Interrupted => write!(f, "gave up waiting for the VM to forget a cached value"),
            Error::Corrupt(c) => write!(f, "the SharedDict store is corrupt: {} at offset {}", c.what, c.at),
        }
    }
}

/// Why a store could not be created or opened.
#[derive(Debug)]
pub enum OpenError {
    Io(io::Error),
    /// The file is not a store this binary understands (or not initialised).
    Invalid(Corrupt),
    /// The size leaves no room for a heap.
    TooSmall,
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Io(e) => write!(f, "{e}"),
            OpenError::Invalid(c) => write!(f, "not a SharedDict store of this version ({} at offset {})", c.what, c.at),
            OpenError::TooSmall => write!(f, "too small for a SharedDict store (shared_dict_memory)"),
        }
    }
}

impl From<io::Error> for OpenError {
    fn from(e: io::Error) -> OpenError {
        OpenError::Io(e)
    }
}

impl From<Corrupt> for OpenError {
    fn from(c: Corrupt) -> OpenError {
        OpenError::Invalid(c)
    }
}

/// What the VM must forget: one key of a dict, or all of them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalidation<'a> {
    Key { dict: u64, token: [u8; TOKEN_LEN], key: &'a [u8] },
    Dict { dict: u64, token: [u8; TOKEN_LEN] },
}

/// What a change to something the VM may cache waits for (see the module doc).
pub trait Gate {
    /// Returns once the VM has forgotten `what`; called with no lock held. An error (the
    /// caller gave up waiting: [`Error::Interrupted`]) abandons the change.
    fn before_change(&self, what: Invalidation<'_>) -> Result<(), Error>;

    /// Whether this gate waits at all (the changes of one that does not go straight through).
    fn waits(&self) -> bool {
        true
    }
}

/// The gate of changes the VM asked for: it forgot what they change before it sent them.
pub struct Ungated;

impl Gate for Ungated {
    fn before_change(&self, _what: Invalidation<'_>) -> Result<(), Error> {
        Ok(())
    }

    fn waits(&self) -> bool {
        false
    }
}

/// The outcome of an atomic read-modify-write: the new value to store (or none to keep the
/// entry as it is) and what to answer.
pub struct Update<V, R> {
    pub store: Option<V>,
    pub answer: R,
}

/// What the store holds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub dicts: usize,
    pub keys: usize,
    /// Key and value bytes of every entry.
    pub bytes: usize,
    /// Heap bytes in use (entries, tables, block headers).
    pub used: u64,
    /// Heap bytes in all (the size bound less the header and the dict slots).
    pub capacity: u64,
    pub max_dicts: u64,
    /// Locks found held by a dead process, and repaired, since the store was created.
    pub recoveries: u64,
}

pub(crate) struct Inner {
    v: View,
}

/// A store, mapped. Cheap to clone; every clone and every [`DictRef`] shares the mapping.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

impl Store {
    /// Creates the store's file at `path` (mode 0600, failing if it exists), sparse, of
    /// `size` bytes, for the pool of generation `generation`.
    pub fn create(path: &Path, size: u64, generation: u64) -> Result<Store, OpenError> {
        let (slots_off, max_slots, heap_off) = view::plan(size).ok_or(OpenError::TooSmall)?;
        let map = Mapping::create(path, size)?;
        let init = || -> Result<(), OpenError> {
            let h: &layout::Header = map.at(0, "header")?;
            // The header's page must be real before it is written (see `Mapping::back`).
            let backed = map.back(0, slots_off)?;
            let keys = random_u64s()?;
            h.version.store(layout::VERSION, Relaxed);
            h.header_size.store(std::mem::size_of::<layout::Header>() as u64, Relaxed);
            h.slot_size.store(std::mem::size_of::<layout::Slot>() as u64, Relaxed);
            h.capacity.store(size, Relaxed);
            h.generation.store(generation, Relaxed);
            h.slots_off.store(slots_off, Relaxed);
            h.max_slots.store(max_slots, Relaxed);
            h.heap_off.store(heap_off, Relaxed);
            h.hash_keys[0].store(keys[0], Relaxed);
            h.hash_keys[1].store(keys[1], Relaxed);
            h.slots_backed.store(backed, Relaxed);
            h.top.store(heap_off, Relaxed);
            h.heap_backed.store(backed.max(heap_off), Relaxed);
            h.registry_lock.init()?;
            h.heap_lock.init()?;
            // Last: a process that opens the file before this sees no store, not half of one.
            h.magic.store(layout::MAGIC, Release);
            Ok(())
        };
        if let Err(e) = init() {
            drop(map);
            let _ = std::fs::remove_file(path);
            return Err(e);
        }
        Self::from_map(map)
    }

    /// Maps an existing store, checking its header. A lock left held by a dead process is
    /// repaired by whoever takes it next, so nothing else is needed here.
    pub fn open(path: &Path) -> Result<Store, OpenError> {
        Self::from_map(Mapping::open(path)?)
    }

    fn from_map(map: Mapping) -> Result<Store, OpenError> {
        let v = View::validate(map)?;
        Ok(Store { inner: Arc::new(Inner { v }) })
    }

    /// The pool generation the store was created for.
    pub fn generation(&self) -> u64 {
        self.inner.v.generation
    }

    pub fn stats(&self) -> Stats {
        self.inner.stats()
    }

    /// Walks the whole mapping and returns every inconsistency found (empty: all is well).
    /// Takes every lock, so the store stands still while it runs: for tests and diagnosis.
    pub fn check(&self) -> Vec<String> {
        check::run(&self.inner)
    }
}

/// 16 random bytes from the kernel.
pub(crate) fn random_u64s() -> Result<[u64; 2], Error> {
    let mut t = [0u8; 16];
    let mut filled = 0;
    while filled < t.len() {
        // SAFETY: the pointer and length describe the unfilled tail of `t`.
        let n = unsafe { libc::getrandom(t[filled..].as_mut_ptr().cast(), t.len() - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if io::Error::last_os_error().kind() != io::ErrorKind::Interrupted {
            return Err(Error::NoRandomness);
        }
    }
    let (a, b) = t.split_at(8);
    Ok([u64::from_le_bytes(a.try_into().map_err(|_| Error::NoRandomness)?), u64::from_le_bytes(b.try_into().map_err(|_| Error::NoRandomness)?)])
}

impl From<Error> for OpenError {
    fn from(e: Error) -> OpenError {
        match e {
            Error::Corrupt(c) => OpenError::Invalid(c),
            other => OpenError::Io(io::Error::other(other.to_string())),
        }
    }
}

/// Test builds can be told (through `PYPORT_SHM_CRASH=name:n`) to SIGKILL themselves the
/// n-th time they pass the named point, so the crash tests can kill a writer at each step of
/// the crash protocol, not only where a random signal happens to land.
#[cfg(test)]
pub(crate) fn crash_point(name: &str) {
    static PLAN: std::sync::OnceLock<Option<(String, std::sync::atomic::AtomicU64)>> = std::sync::OnceLock::new();
    let plan = PLAN.get_or_init(|| {
        let spec = std::env::var("PYPORT_SHM_CRASH").ok()?;
        let (point, n) = spec.split_once(':')?;
        Some((point.to_string(), std::sync::atomic::AtomicU64::new(n.parse().ok()?)))
    });
    if let Some((point, left)) = plan {
        if point == name && left.fetch_sub(1, Relaxed) == 1 {
            // SAFETY: raising a signal at ourselves.
            unsafe { libc::raise(libc::SIGKILL) };
        }
    }
}

#[cfg(not(test))]
#[inline(always)]
pub(crate) fn crash_point(_name: &str) {}
