//! The SharedDict registry: every dict of this port, its owner, and its pickled entries.
//!
//! Nothing here touches Python. Values are opaque pickled bytes; pickling and unpickling
//! happen outside these locks, so a dict's mutex is only ever held for a few map
//! operations and never while waiting for the GIL (the lock order is always GIL, then
//! dict, never the reverse).

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

pub struct Dict {
    id: u64,
    token: [u8; TOKEN_LEN],
    generation: u64,
    state: Mutex<DictState>,
}

#[derive(Default)]
struct DictState {
    destroyed: bool,
    /// key → (insertion sequence number, pickled value)
    entries: HashMap<Vec<u8>, (u64, Value)>,
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
}

impl Dict {
    pub fn handle(&self) -> Handle {
        Handle { generation: self.generation, id: self.id, token: self.token.to_vec() }
    }

    pub fn get(&self, key: &[u8]) -> Result<Option<Value>, Destroyed> {
        let mut st = self.state.lock();
        Ok(st.live()?.entries.get(key).map(|(_, v)| v.clone()))
    }

    pub fn contains(&self, key: &[u8]) -> Result<bool, Destroyed> {
        let mut st = self.state.lock();
        Ok(st.live()?.entries.contains_key(key))
    }

    /// Stores a value; an existing key keeps its place in the insertion order.
    pub fn set(&self, key: &[u8], value: Value) -> Result<(), Destroyed> {
        let mut guard = self.state.lock();
        let st = guard.live()?;
        st.bytes += value.len();
        if let Some((_, old)) = st.entries.get_mut(key) {
            st.bytes -= old.len();
            *old = value;
        } else {
            let seq = st.next_seq;
            st.next_seq += 1;
            st.bytes += key.len();
            st.order.insert(seq, key.to_vec());
            st.entries.insert(key.to_vec(), (seq, value));
        }
        Ok(())
    }

    /// Removes a key; returns whether it was present.
    pub fn del(&self, key: &[u8]) -> Result<bool, Destroyed> {
        let mut guard = self.state.lock();
        let st = guard.live()?;
        match st.entries.remove(key) {
            Some((seq, v)) => {
                st.order.remove(&seq);
                st.bytes -= key.len() + v.len();
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Removes a key and returns its value, atomically.
    pub fn take(&self, key: &[u8]) -> Result<Option<Value>, Destroyed> {
        let mut guard = self.state.lock();
        let st = guard.live()?;
        Ok(st.entries.remove(key).map(|(seq, v)| {
            st.order.remove(&seq);
            st.bytes -= key.len() + v.len();
            v
        }))
    }

    pub fn keys(&self) -> Result<Vec<Vec<u8>>, Destroyed> {
        let mut st = self.state.lock();
        Ok(st.live()?.order.values().cloned().collect())
    }

    pub fn items(&self) -> Result<Vec<(Vec<u8>, Value)>, Destroyed> {
        let mut guard = self.state.lock();
        let st = guard.live()?;
        Ok(st.order.values().map(|k| (k.clone(), st.entries[k].1.clone())).collect())
    }

    pub fn len(&self) -> Result<usize, Destroyed> {
        let mut st = self.state.lock();
        Ok(st.live()?.entries.len())
    }

    pub fn clear(&self) -> Result<(), Destroyed> {
        self.state.lock().live()?.clear();
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
