//! A reference to one dict of a store, and the operations Python and Erlang use on it. Each
//! takes the dict's lock, checks the dict is still live, does its bounded work and unlocks.

use super::layout::TOKEN_LEN;
use super::{Error, Inner, Update};
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
    pub fn set(&self, key: &[u8], value: &[u8]) -> Result<u64, Error> {
        self.lock()?.store(key, value)
    }

    /// Removes a key; returns whether it was present.
    pub fn del(&self, key: &[u8]) -> Result<bool, Error> {
        Ok(self.lock()?.remove(key, false)?.is_some())
    }

    /// Removes a key and returns its value and version, atomically.
    pub fn take(&self, key: &[u8]) -> Result<Option<(Vec<u8>, u64)>, Error> {
        self.lock()?.remove(key, true)
    }

    /// Reads, computes and stores as one step: `f` sees the current value and decides. It
    /// runs under the dict's lock, so it must be quick and must not touch Python or this
    /// store. If the value it asks to store does not fit, the answer is lost: `Full`.
    pub fn update<V: AsRef<[u8]>, R>(&self, key: &[u8], f: impl FnOnce(Option<&[u8]>) -> Update<V, R>) -> Result<R, Error> {
        let d = self.lock()?;
        let current = d.lookup(key)?;
        let Update { store, answer } = f(current.as_ref().map(|(_, _, e)| e.value));
        if let Some(v) = store {
            d.store(key, v.as_ref())?;
        }
        Ok(answer)
    }

    /// Stores `new` only if the entry still holds the value read at `seen` (a version from
    /// [`DictRef::get`]; `None`: only if the key is absent). The building block of
    /// compare-and-swap loops whose comparison needs Python or time.
    pub fn replace_if_version(&self, key: &[u8], seen: Option<u64>, new: &[u8]) -> Result<bool, Error> {
        let d = self.lock()?;
        let current = d.lookup(key)?.map(|(_, _, e)| e.version());
        if current != seen {
            return Ok(false);
        }
        d.store(key, new)?;
        Ok(true)
    }

    /// For the VM's read cache: if `key` still holds the value of `version`, flags it cached
    /// and runs `send` (which queues the reply that lets the VM cache it) under the dict's
    /// lock, so that any later change's invalidation is queued after that reply. Returns
    /// whether it did.
    pub fn mark_cached_if_version(&self, key: &[u8], version: u64, send: impl FnOnce()) -> bool {
        let Ok(d) = self.lock() else { return false };
        match d.lookup(key) {
            Ok(Some((_, _, e))) if e.version() == version => {
                e.head.cached.store(1, Relaxed);
                d.slot.any_cached.store(1, Relaxed);
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
    pub fn clear(&self) -> Result<(), Error> {
        self.lock()?.clear()
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
