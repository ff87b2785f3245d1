//! The SharedDict registry: every dict of this port, its owner, and its pickled entries.
//!
//! Nothing here touches Python. Values are opaque pickled bytes; pickling and unpickling
//! happen outside these locks, so a dict's mutex is only ever held for a few map
//! operations and never while waiting for the GIL (the lock order is always GIL, then
//! dict, never the reverse).
//!
//! The Erlang VM keeps a read cache of values it got from here. An entry the VM caches is
//! flagged; whatever changes or removes it (from either side) reports it to the
//! [`Invalidator`] while the dict's lock is still held, so the invalidation is queued for
//! Erlang before anything that follows the change (a reply, a message) can be.

use crate::protocol::{Handle, Owner};
use parking_lot::Mutex;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub const TOKEN_LEN: usize = 16;

/// The operation reached a dict that is gone (destroyed, owner dead, older port, or a
/// handle that never named a live dict: these are deliberately indistinguishable).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Destroyed;

/// Why a `give_away` was refused.
#[derive(Debug, PartialEq, Eq)]
pub enum GiveAwayError {
    Destroyed,
    /// The caller named as the giver does not own the dict.
    NotOwner,
}

pub type Value = Arc<[u8]>;

/// What the VM must forget: one key of a dict, or all of them.
pub enum Invalidation<'a> {
    Key(&'a Handle, &'a [u8]),
    Dict(&'a Handle),
}

/// Called with the dict's lock held: it must only queue (never block, never take a dict lock).
pub type Invalidator = Box<dyn Fn(Invalidation<'_>) + Send + Sync>;

static INVALIDATOR: std::sync::OnceLock<Invalidator> = std::sync::OnceLock::new();

/// Installs where invalidations go (once, at start-up; later calls are ignored).
pub fn set_invalidator(f: Invalidator) {
    let _ = INVALIDATOR.set(f);
}

fn invalidate(what: Invalidation<'_>) {
    if let Some(f) = INVALIDATOR.get() {
        f(what)
    }
}

/// A stored value, and whether the VM may hold it in its read cache.
struct Entry {
    /// Insertion sequence number (for keys in insertion order).
    seq: u64,
    value: Value,
    cached: bool,
}

/// The outcome of an atomic read-modify-write: the new value to store (or none to keep the
/// entry as it is) and what to answer.
pub struct Update<R> {
    pub store: Option<Value>,
    pub answer: R,
}

pub struct Dict {
    id: u64,
    token: [u8; TOKEN_LEN],
    generation: u64,
    state: Mutex<DictState>,
}

#[derive(Default)]
struct DictState {
    destroyed: bool,
    entries: HashMap<Vec<u8>, Entry>,
    /// Some entry has been flagged cached since the dict was last cleared.
    any_cached: bool,
    /// insertion sequence number → key, for keys in insertion order
    order: BTreeMap<u64, Vec<u8>>,
    next_seq: u64,
    bytes: usize,
}

impl DictState {
    fn live(&mut self) -> Result<&mut Self, Destroyed> {
        if self.destroyed {
            Err(Destroyed)
        } else {
            Ok(self)
        }
    }

    fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.bytes = 0;
    }

    /// Stores `value` under `key` (an existing key keeps its place); returns whether the old
    /// entry was cached by the VM.
    fn store(&mut self, key: &[u8], value: Value) -> bool {
        self.bytes += value.len();
        if let Some(e) = self.entries.get_mut(key) {
            self.bytes -= e.value.len();
            e.value = value;
            std::mem::replace(&mut e.cached, false)
        } else {
            let seq = self.next_seq;
            self.next_seq += 1;
            self.bytes += key.len();
            self.order.insert(seq, key.to_vec());
            self.entries.insert(key.to_vec(), Entry { seq, value, cached: false });
            false
        }
    }

    fn remove(&mut self, key: &[u8]) -> Option<Entry> {
        let e = self.entries.remove(key)?;
        self.order.remove(&e.seq);
        self.bytes -= key.len() + e.value.len();
        Some(e)
    }
}

impl Dict {
    pub fn handle(&self) -> Handle {
        Handle { generation: self.generation, id: self.id, token: self.token.to_vec() }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Value>, Destroyed> {
        let mut st = self.state.lock();
        Ok(st.live()?.entries.get(key).map(|e| e.value.clone()))
    }

    pub fn contains(&self, key: &[u8]) -> Result<bool, Destroyed> {
        let mut st = self.state.lock();
        Ok(st.live()?.entries.contains_key(key))
    }

    /// Stores a value; an existing key keeps its place in the insertion order.
    pub fn set(&self, key: &[u8], value: Value) -> Result<(), Destroyed> {
        let mut guard = self.state.lock();
        let st = guard.live()?;
        if st.store(key, value) {
            invalidate(Invalidation::Key(&self.handle(), key));
        }
        Ok(())
    }

    /// Removes a key; returns whether it was present.
    pub fn del(&self, key: &[u8]) -> Result<bool, Destroyed> {
        Ok(self.take(key)?.is_some())
    }

    /// Removes a key and returns its value, atomically.
    pub fn take(&self, key: &[u8]) -> Result<Option<Value>, Destroyed> {
        let mut guard = self.state.lock();
        let st = guard.live()?;
        let entry = st.remove(key);
        if entry.as_ref().is_some_and(|e| e.cached) {
            invalidate(Invalidation::Key(&self.handle(), key));
        }
        Ok(entry.map(|e| e.value))
    }

    /// Reads, computes and stores as one step: `f` sees the current value and decides. It
    /// runs under the dict's lock, so it must be quick and must not touch Python.
    pub fn update<R>(&self, key: &[u8], f: impl FnOnce(Option<&Value>) -> Update<R>) -> Result<R, Destroyed> {
        let mut guard = self.state.lock();
        let st = guard.live()?;
        let Update { store, answer } = f(st.entries.get(key).map(|e| &e.value));
        if let Some(v) = store {
            if st.store(key, v) {
                invalidate(Invalidation::Key(&self.handle(), key));
            }
        }
        Ok(answer)
    }

    /// Stores `new` only if the entry still holds exactly `seen` (the same stored bytes, as
    /// read earlier by [`Dict::get`]; `None`: only if the key is still absent). The building
    /// block of compare-and-swap loops whose comparison needs Python or time.
    pub fn replace_if_same(&self, key: &[u8], seen: Option<&Value>, new: Value) -> Result<bool, Destroyed> {
        self.update(key, |current| {
            let same = match (current, seen) {
                (Some(c), Some(s)) => Arc::ptr_eq(c, s),
                (None, None) => true,
                _ => false,
            };
            Update { store: same.then_some(new), answer: same }
        })
    }

    /// For the VM's read cache: if `key` still holds exactly `seen`, flags it cached and runs
    /// `send` (which queues the reply that lets the VM cache it) under the dict's lock, so
    /// that any later change's invalidation is queued after that reply. Returns whether it did.
    pub fn mark_cached_if_same(&self, key: &[u8], seen: &Value, send: impl FnOnce()) -> bool {
        let mut guard = self.state.lock();
        let Ok(st) = guard.live() else { return false };
        match st.entries.get_mut(key) {
            Some(e) if Arc::ptr_eq(&e.value, seen) => {
                e.cached = true;
                st.any_cached = true;
                send();
                true
            }
            _ => false,
        }
    }

    pub fn keys(&self) -> Result<Vec<Vec<u8>>, Destroyed> {
        let mut st = self.state.lock();
        Ok(st.live()?.order.values().cloned().collect())
    }

    pub fn items(&self) -> Result<Vec<(Vec<u8>, Value)>, Destroyed> {
        let mut guard = self.state.lock();
        let st = guard.live()?;
        Ok(st.order.values().filter_map(|k| Some((k.clone(), st.entries.get(k)?.value.clone()))).collect())
    }

    pub fn len(&self) -> Result<usize, Destroyed> {
        let mut st = self.state.lock();
        Ok(st.live()?.entries.len())
    }

    pub fn clear(&self) -> Result<(), Destroyed> {
        let mut guard = self.state.lock();
        let st = guard.live()?;
        st.clear();
        if std::mem::replace(&mut st.any_cached, false) {
            invalidate(Invalidation::Dict(&self.handle()));
        }
        Ok(())
    }

    pub fn is_destroyed(&self) -> bool {
        self.state.lock().destroyed
    }

    /// Marks the dict destroyed and frees its entries. Returns false if it already was.
    fn destroy(&self) -> bool {
        let mut st = self.state.lock();
        let was_live = !st.destroyed;
        st.destroyed = true;
        st.clear();
        if std::mem::replace(&mut st.any_cached, false) {
            invalidate(Invalidation::Dict(&self.handle()));
        }
        was_live
    }

    fn sizes(&self) -> (usize, usize) {
        let st = self.state.lock();
        (st.entries.len(), st.bytes)
    }
}

/// What the registry holds, for `stats`.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RegistryStats {
    pub dicts: usize,
    pub keys: usize,
    pub bytes: usize,
}

pub struct Registry {
    generation: u64,
    next_id: AtomicU64,
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    dicts: HashMap<u64, (Arc<Dict>, Owner)>,
    by_owner: HashMap<Owner, HashSet<u64>>,
}

impl Registry {
    pub fn new(generation: u64) -> Self {
        Registry { generation, next_id: AtomicU64::new(1), inner: Mutex::new(Inner::default()) }
    }

    pub fn create(&self, owner: Owner) -> Arc<Dict> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let dict = Arc::new(Dict {
            id,
            token: random_token(),
            generation: self.generation,
            state: Mutex::new(DictState::default()),
        });
        let mut inner = self.inner.lock();
        inner.by_owner.entry(owner.clone()).or_default().insert(id);
        inner.dicts.insert(id, (dict.clone(), owner));
        dict
    }

    /// Resolves a handle; stale generations, unknown ids and wrong tokens are all
    /// `Destroyed`, so a fabricated handle learns nothing.
    pub fn lookup(&self, h: &Handle) -> Result<Arc<Dict>, Destroyed> {
        if h.generation != self.generation {
            return Err(Destroyed);
        }
        let inner = self.inner.lock();
        match inner.dicts.get(&h.id) {
            Some((d, _)) if constant_time_eq(&d.token, &h.token) => Ok(d.clone()),
            _ => Err(Destroyed),
        }
    }

    /// Destroys the dict a handle names. Idempotent; returns whether anything was destroyed.
    pub fn destroy(&self, h: &Handle) -> bool {
        match self.lookup(h) {
            Ok(d) => self.remove(d.id),
            Err(Destroyed) => false,
        }
    }

    fn remove(&self, id: u64) -> bool {
        let removed = {
            let mut inner = self.inner.lock();
            let removed = inner.dicts.remove(&id);
            if let Some((_, owner)) = &removed {
                if let Some(set) = inner.by_owner.get_mut(owner) {
                    set.remove(&id);
                    if set.is_empty() {
                        inner.by_owner.remove(owner);
                    }
                }
            }
            removed
        };
        removed.is_some_and(|(d, _)| d.destroy())
    }

    /// Destroys every dict `owner` owns; returns how many.
    pub fn drop_owner(&self, owner: &Owner) -> usize {
        let doomed: Vec<Arc<Dict>> = {
            let mut inner = self.inner.lock();
            let ids = inner.by_owner.remove(owner).unwrap_or_default();
            ids.iter().filter_map(|id| inner.dicts.remove(id).map(|(d, _)| d)).collect()
        };
        doomed.iter().filter(|d| d.destroy()).count()
    }

    /// Makes `new_owner` the owner; `caller`, when given, must be the owner now.
    pub fn give_away(&self, h: &Handle, new_owner: Owner, caller: Option<&Owner>) -> Result<(), GiveAwayError> {
        let d = self.lookup(h).map_err(|Destroyed| GiveAwayError::Destroyed)?;
        let mut inner = self.inner.lock();
        let Some((_, owner)) = inner.dicts.get_mut(&d.id) else { return Err(GiveAwayError::Destroyed) };
        if caller.is_some_and(|c| c != owner) {
            return Err(GiveAwayError::NotOwner);
        }
        let old = std::mem::replace(owner, new_owner.clone());
        if let Some(set) = inner.by_owner.get_mut(&old) {
            set.remove(&d.id);
            if set.is_empty() {
                inner.by_owner.remove(&old);
            }
        }
        inner.by_owner.entry(new_owner).or_default().insert(d.id);
        Ok(())
    }

    pub fn stats(&self) -> RegistryStats {
        let dicts: Vec<Arc<Dict>> = self.inner.lock().dicts.values().map(|(d, _)| d.clone()).collect();
        let mut s = RegistryStats { dicts: dicts.len(), ..Default::default() };
        for d in dicts {
            let (k, b) = d.sizes();
            s.keys += k;
            s.bytes += b;
        }
        s
    }
}

fn random_token() -> [u8; TOKEN_LEN] {
    let mut t = [0u8; TOKEN_LEN];
    let mut filled = 0;
    while filled < TOKEN_LEN {
        // SAFETY: the pointer and length describe the unfilled tail of `t`.
        let n = unsafe { libc::getrandom(t[filled..].as_mut_ptr().cast(), TOKEN_LEN - filled, 0) };
        if n > 0 {
            filled += n as usize;
        } else if std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            // getrandom(2) cannot fail on Linux >= 3.17 once the pool is initialised;
            // refusing to hand out guessable tokens is the only safe answer if it does.
            eprintln!("pyport: getrandom failed: {}", std::io::Error::last_os_error());
            std::process::abort();
        }
    }
    t
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(n: u32) -> Owner {
        Owner::new("test@host", n, 0, 1)
    }

    fn val(s: &str) -> Value {
        Arc::from(s.as_bytes())
    }

    #[test]
    fn keys_keep_insertion_order_and_overwrite_keeps_place() {
        let r = Registry::new(0);
        let d = r.create(owner(1));
        for k in ["b", "a", "c"] {
            d.set(k.as_bytes(), val(k)).unwrap();
        }
        d.set(b"b", val("B")).unwrap();
        d.del(b"a").unwrap();
        d.set(b"a", val("A")).unwrap();
        assert_eq!(d.keys().unwrap(), vec![b"b".to_vec(), b"c".to_vec(), b"a".to_vec()]);
        assert_eq!(d.get(b"b").unwrap().as_deref(), Some(&b"B"[..]));
        assert_eq!(r.stats(), RegistryStats { dicts: 1, keys: 3, bytes: 6 });
    }

    #[test]
    fn handles_are_checked_by_generation_and_token() {
        let r = Registry::new(4);
        let d = r.create(owner(1));
        let good = d.handle();
        assert!(r.lookup(&good).is_ok());
        let mut forged = good.clone();
        forged.token[0] ^= 1;
        assert_eq!(r.lookup(&forged).err(), Some(Destroyed));
        let mut stale = good.clone();
        stale.generation = 3;
        assert_eq!(r.lookup(&stale).err(), Some(Destroyed));
    }

    #[test]
    fn destroy_is_idempotent_and_visible_through_held_references() {
        let r = Registry::new(0);
        let d = r.create(owner(1));
        d.set(b"k", val("v")).unwrap();
        assert!(r.destroy(&d.handle()));
        assert!(!r.destroy(&d.handle()));
        assert_eq!(d.get(b"k"), Err(Destroyed));
        assert_eq!(r.stats(), RegistryStats::default());
    }

    #[test]
    fn owner_death_destroys_only_its_dicts_and_give_away_moves_them() {
        let r = Registry::new(0);
        let a = r.create(owner(1));
        let b = r.create(owner(1));
        let c = r.create(owner(2));
        assert_eq!(r.give_away(&b.handle(), owner(2), Some(&owner(3))), Err(GiveAwayError::NotOwner));
        r.give_away(&b.handle(), owner(2), Some(&owner(1))).unwrap();
        assert_eq!(r.drop_owner(&owner(1)), 1);
        assert!(a.is_destroyed());
        assert!(!b.is_destroyed() && !c.is_destroyed());
        assert_eq!(r.drop_owner(&owner(2)), 2);
        assert_eq!(r.stats().dicts, 0);
    }

    /// What the VM caches is invalidated by every change from either side, once: the flag is
    /// cleared by the invalidation, and a value changed since it was read is not flagged.
    #[test]
    fn cached_entries_are_invalidated_once_by_every_change() {
        static SEEN: Mutex<Vec<(u64, Option<Vec<u8>>)>> = Mutex::new(Vec::new());
        set_invalidator(Box::new(|what| {
            let (h, k) = match what {
                Invalidation::Key(h, k) => (h, Some(k.to_vec())),
                Invalidation::Dict(h) => (h, None),
            };
            SEEN.lock().push((h.id, k));
        }));
        let r = Registry::new(0);
        let d = r.create(owner(1));
        let seen = || -> Vec<(u64, Option<Vec<u8>>)> { SEEN.lock().iter().filter(|(id, _)| *id == d.id).cloned().collect() };
        let key = |k: &str| (d.id, Some(k.as_bytes().to_vec()));
        d.set(b"k", val("1")).unwrap();
        d.set(b"k", val("2")).unwrap();
        assert!(seen().is_empty(), "nothing cached, nothing to invalidate");
        let v = d.get(b"k").unwrap().unwrap();
        let mut replied = false;
        assert!(d.mark_cached_if_same(b"k", &v, || replied = true) && replied);
        d.set(b"k", val("3")).unwrap();
        d.set(b"k", val("4")).unwrap();
        assert_eq!(seen(), vec![key("k")], "one invalidation, then the flag is clear");
        // A value that changed after it was read is not flagged, and no reply is sent for it.
        assert!(!d.mark_cached_if_same(b"k", &v, || panic!("stale value sent for caching")));
        for change in 0..4 {
            let v = d.get(b"k").unwrap().unwrap();
            assert!(d.mark_cached_if_same(b"k", &v, || ()));
            match change {
                0 => assert!(d.del(b"k").unwrap()),
                1 => assert!(d.replace_if_same(b"k", Some(&v), val("5")).unwrap()),
                2 => assert_eq!(d.update(b"k", |_| Update { store: Some(val("6")), answer: 1 }).unwrap(), 1),
                _ => assert_eq!(d.take(b"k").unwrap().as_deref(), Some(&b"6"[..])),
            }
            if change == 0 {
                d.set(b"k", val("4")).unwrap();
            }
        }
        assert_eq!(seen().len(), 5);
        d.set(b"k", val("7")).unwrap();
        let v = d.get(b"k").unwrap().unwrap();
        assert!(d.mark_cached_if_same(b"k", &v, || ()));
        r.destroy(&d.handle());
        assert_eq!(seen().last(), Some(&(d.id, None)), "destroy forgets the whole dict");
    }

    #[test]
    fn ids_are_never_reused() {
        let r = Registry::new(0);
        let a = r.create(owner(1)).handle();
        r.destroy(&a);
        let b = r.create(owner(1)).handle();
        assert_ne!(a.id, b.id);
        assert_ne!(a.token, b.token);
    }
}
