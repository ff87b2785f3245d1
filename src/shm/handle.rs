//! A reference to one dict of a store, and the operations Python and Erlang use on it. Each
//! takes the dict's lock, checks the dict is still live, does its bounded work and unlocks.
//! A change first settles what it owes the VM's read cache through its [`Gate`], with no
//! lock held (see the module `shm`).

use super::dict::Locked;
use super::layout::{CACHED, IN_FLIGHT, TOKEN_LEN};
use super::{Error, Gate, Inner, Invalidation, Update};
use std::sync::atomic::Ordering::*;
use std::sync::Arc;

/// A key and its value, copied out.
pub type Item = (Vec<u8>, Vec<u8>);

/// A dict of a store. Holding one does not keep the dict alive: after a destroy (from any
/// process) every operation answers `Destroyed`.
#[derive(Clone)]
pub struct DictRef {
    inner: Arc<Inner>,
    id: u64,
    token: [u8; TOKEN_LEN],
}

impl std::fmt::Debug for DictRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DictRef({})", self.id)
    }
}

impl DictRef {
    pub(super) fn new(inner: Arc<Inner>, id: u64, token: [u8; TOKEN_LEN]) -> DictRef {
        DictRef { inner, id, token }
    }

    pub(super) fn inner(&self) -> &Inner {
        &self.inner
    }

    /// The dict's id: never reused within the store.
    pub fn id(&self) -> u64 {
        self.id
    }

    pub fn token(&self) -> &[u8; TOKEN_LEN] {
        &self.token
    }

    /// The value under `key`, copied out, and its version.
    pub fn get(&self, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, Error> {
        self.read(key, |v, version| (v.to_vec(), version))
    }

    /// Runs `f` on the value under `key` (and its version) in place, under the dict's lock:
    /// it must be quick and must not touch Python or this store.
    pub fn read<R>(&self, key: &[u8], f: impl FnOnce(&[u8], u64) -> R) -> Result<Option<R>, Error> {
        let d = self.lock()?;
        Ok(d.lookup(key)?.map(|(_, _, e)| f(e.value, e.version())))
    }

    pub fn contains(&self, key: &[u8]) -> Result<bool, Error> {
        Ok(self.lock()?.lookup(key)?.is_some())
    }

    /// Stores a value (an existing key keeps its place in the insertion order); returns its
    /// version. `Full` changes nothing.
    pub fn set(&self, key: &[u8], value: &[u8], gate: &dyn Gate) -> Result<u64, Error> {
        self.change(key, gate, |d| d.store(key, value))
    }

    /// Removes a key; returns whether it was present.
    pub fn del(&self, key: &[u8], gate: &dyn Gate) -> Result<bool, Error> {
        self.change(key, gate, |d| Ok(d.remove(key, false)?.is_some()))
    }

    /// Removes a key and returns its value and version, atomically.
    pub fn take(&self, key: &[u8], gate: &dyn Gate) -> Result<Option<(Vec<u8>, u64)>, Error> {
        self.change(key, gate, |d| d.remove(key, true))
    }

    /// Reads, computes and stores as one step: `f` sees the current value and decides. It
    /// runs under the dict's lock, so it must be quick and must not touch Python or this
    /// store. If the value it asks to store does not fit, the answer is lost: `Full`.
    pub fn update<V: AsRef<[u8]>, R>(
        &self,
        key: &[u8],
        gate: &dyn Gate,
        f: impl FnOnce(Option<&[u8]>) -> Update<V, R>,
    ) -> Result<R, Error> {
        let mut f = Some(f);
        self.change(key, gate, |d| {
            let current = d.lookup(key)?;
            let f = f.take().ok_or(Error::Interrupted)?;
            let Update { store, answer } = f(current.as_ref().map(|(_, _, e)| e.value));
            if let Some(v) = store {
                d.store(key, v.as_ref())?;
            }
            Ok(answer)
        })
    }

    /// Stores `new` only if the entry still holds the value read at `seen` (a version from
    /// [`DictRef::get`]; `None`: only if the key is absent). The building block of
    /// compare-and-swap loops whose comparison needs Python or time.
    pub fn replace_if_version(&self, key: &[u8], seen: Option<u64>, new: &[u8], gate: &dyn Gate) -> Result<bool, Error> {
        self.change(key, gate, |d| {
            let current = d.lookup(key)?.map(|(_, _, e)| e.version());
            if current != seen {
                return Ok(false);
            }
            d.store(key, new)?;
            Ok(true)
        })
    }

    /// Runs `op` under the dict's lock once nothing the VM may still answer stands in the
    /// way: if the key's entry is one the VM may cache (or one whose invalidation is in
    /// flight), the gate first has the VM forget it, with the lock released, while the entry
    /// counts the wait so that no reply can flag it cacheable meanwhile. `op` runs at most
    /// once, on the state found under the final lock.
    fn change<R>(&self, key: &[u8], gate: &dyn Gate, mut op: impl FnMut(&Locked<'_>) -> Result<R, Error>) -> Result<R, Error> {
        loop {
            let d = self.lock()?;
            if !gate.waits() {
                return op(&d);
            }
            let held = match d.lookup(key)? {
                Some((_, _, e)) if e.is_held() => {
                    // Not cached from now on; our wait counts until we are back.
                    let _ = e.head.cached.fetch_update(Relaxed, Relaxed, |w| Some((w & !CACHED) + IN_FLIGHT));
                    Some(e.block)
                }
                _ => None,
            };
            let Some(block) = held else { return op(&d) };
            drop(d);
            let waited = gate.before_change(Invalidation::Key { dict: self.id, token: self.token, key });
            let d = self.lock()?;
            let current = d.lookup(key)?;
            if let Some((_, _, e)) = current.as_ref().filter(|(_, _, e)| e.block == block) {
                // A wait that failed may not have reached the VM: the entry stays cached.
                let keep = if waited.is_err() { CACHED } else { 0 };
                let _ = e.head.cached.fetch_update(Relaxed, Relaxed, |w| Some(w.saturating_sub(IN_FLIGHT) | (w & CACHED) | keep));
            }
            waited?;
            // Flagged again meanwhile (an Erlang-side write replaced the entry, whose new
            // value the VM then cached): that must be forgotten too.
            if current.is_some_and(|(_, _, e)| e.is_cached()) {
                continue;
            }
            return op(&d);
        }
    }

    /// Runs `op` (a clear or destroy) under the dict's lock, once the VM has forgotten every
    /// entry of the dict it may cache (as [`DictRef::change`] does for one key).
    pub(super) fn change_all<R>(d: Locked<'_>, gate: &dyn Gate, op: impl Fn(&Locked<'_>) -> Result<R, Error>) -> Result<R, Error> {
        let (inner, id, token) = (d.inner, d.id, d.token());
        let mut d = d;
        loop {
            if !gate.waits() || d.slot.any_cached.load(Relaxed) == 0 {
                return op(&d);
            }
            let _ = d.slot.any_cached.fetch_update(Relaxed, Relaxed, |w| Some((w & !CACHED) + IN_FLIGHT));
            drop(d);
            let waited = gate.before_change(Invalidation::Dict { dict: id, token });
            d = inner.lock_dict(id)?;
            let keep = if waited.is_err() { CACHED } else { 0 };
            let _ = d.slot.any_cached.fetch_update(Relaxed, Relaxed, |w| Some(w.saturating_sub(IN_FLIGHT) | (w & CACHED) | keep));
            waited?;
            if d.slot.any_cached.load(Relaxed) & CACHED == 0 {
                return op(&d);
            }
        }
    }

    /// For the VM's read cache: if `key` still holds the value of `version`, and no change
    /// of it (or of the whole dict) waits for the VM, flags it cached and runs `send` (which
    /// queues the reply that lets the VM cache it) under the dict's lock. Returns whether it
    /// did.
    pub fn mark_cached_if_version(&self, key: &[u8], version: u64, send: impl FnOnce()) -> bool {
        let Ok(d) = self.lock() else { return false };
        if d.slot.any_cached.load(Relaxed) >= IN_FLIGHT {
            return false;
        }
        match d.lookup(key) {
            Ok(Some((_, _, e))) if e.version() == version && e.head.cached.load(Relaxed) < IN_FLIGHT => {
                e.head.cached.store(CACHED, Relaxed);
                d.slot.any_cached.fetch_or(CACHED, Relaxed);
                send();
                true
            }
            _ => false,
        }
    }

    /// The keys, in insertion order.
    pub fn keys(&self) -> Result<Vec<Vec<u8>>, Error> {
        let d = self.lock()?;
        Ok(d.entries_in_order()?.iter().map(|e| e.key.to_vec()).collect())
    }

    /// Keys and values, in insertion order.
    pub fn items(&self) -> Result<Vec<Item>, Error> {
        let d = self.lock()?;
        Ok(d.entries_in_order()?.iter().map(|e| (e.key.to_vec(), e.value.to_vec())).collect())
    }

    pub fn len(&self) -> Result<usize, Error> {
        Ok(self.lock()?.slot.len.load(Relaxed) as usize)
    }

    /// Removes every entry, atomically.
    pub fn clear(&self, gate: &dyn Gate) -> Result<(), Error> {
        Self::change_all(self.lock()?, gate, |d| d.clear())
    }

    /// Whether the dict is gone (without taking its lock).
    pub fn is_destroyed(&self) -> bool {
        let index = self.id & (super::layout::MAX_SLOTS - 1);
        match self.inner.v.slot(index) {
            Ok(slot) => slot.live.load(Acquire) != 1 || slot.id.load(Acquire) != self.id,
            Err(_) => true,
        }
    }
}
