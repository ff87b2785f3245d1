//! The registry of dicts: creating one in a free slot, finding one by id and token, and the
//! owner bookkeeping (destroy, owner death, give_away).

use super::dict::Locked;
use super::handle::DictRef;
use super::layout::*;
use super::lock::Acquired;
use super::{crash_point, random_u64s, Error, Gate, Inner, Stats, Store};
use std::path::Path;
use std::sync::atomic::Ordering::*;

/// How many used slots the search for a free one looks at before taking a new one.
const SLOT_PROBES: u64 = 64;

impl Store {
    /// Creates a dict owned by `owner` (a pid's external form, at most [`OWNER_MAX`] bytes).
    /// `Full` when every dict slot is taken.
    pub fn create_dict(&self, owner: &[u8]) -> Result<DictRef, Error> {
        if owner.len() > OWNER_MAX {
            return Err(Error::OwnerTooLong);
        }
        let token = random_u64s()?;
        let inner = &self.inner;
        let h = inner.v.header();
        let (registry, how) = h.registry_lock.lock()?;
        if how == Acquired::OwnerDied {
            // Nothing it guards can be half done: a slot is initialised before the
            // high-water mark exposes it, and ids come from an atomic counter.
            h.recoveries.fetch_add(1, Relaxed);
            registry.mark_consistent();
        }
        let index = inner.free_slot()?;
        let d = inner.lock_slot(index)?;
        let id = (h.next_seq.fetch_add(1, Relaxed) + 1) << SLOT_BITS | index;
        d.slot.id.store(id, Relaxed);
        d.slot.token[0].store(token[0], Relaxed);
        d.slot.token[1].store(token[1], Relaxed);
        for (field, value) in [(&d.slot.table, 0), (&d.slot.len, 0), (&d.slot.bytes, 0), (&d.slot.next_seq, 0), (&d.slot.any_cached, 0), (&d.slot.spare, 0)] {
            field.store(value, Relaxed);
        }
        d.set_owner(owner);
        crash_point("create.before_live");
        // The commit point: before it the slot is free, after it the dict exists.
        d.slot.live.store(1, Release);
        drop(d);
        drop(registry);
        Ok(DictRef::new(inner.clone(), id, token_bytes(token)))
    }

    /// Finds a live dict by id and token. Unknown ids, wrong tokens and destroyed dicts are
    /// all `Destroyed`, so a fabricated handle learns nothing; the token is compared in
    /// constant time.
    pub fn lookup(&self, id: u64, token: &[u8]) -> Result<DictRef, Error> {
        let index = id & (MAX_SLOTS - 1);
        if index >= self.inner.v.slots_in_use() {
            return Err(Error::Destroyed);
        }
        let slot = self.inner.v.slot(index).map_err(|_| Error::Destroyed)?;
        let mine = [slot.token[0].load(Relaxed), slot.token[1].load(Relaxed)];
        if slot.live.load(Acquire) != 1 || slot.id.load(Acquire) != id || !constant_time_eq(&token_bytes(mine), token) {
            return Err(Error::Destroyed);
        }
        Ok(DictRef::new(self.inner.clone(), id, token_bytes(mine)))
    }

    /// Destroys the dict a handle names, once the VM forgot what it caches of it (`gate`).
    /// Idempotent; returns whether anything was destroyed.
    pub fn destroy(&self, id: u64, token: &[u8], gate: &dyn Gate) -> Result<bool, Error> {
        // An id names one dict for ever, so once the token matched the id suffices.
        match self.lookup(id, token).and_then(|_| self.inner.lock_dict(id)) {
            Ok(d) => match DictRef::change_all(d, gate, |d| d.destroy()) {
                Ok(()) => Ok(true),
                Err(Error::Destroyed) => Ok(false),
                Err(e) => Err(e),
            },
            Err(Error::Destroyed) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Destroys every dict `owner` owns (see [`Store::destroy`]); returns their ids.
    pub fn drop_owner(&self, owner: &[u8], gate: &dyn Gate) -> Result<Vec<u64>, Error> {
        let inner = &self.inner;
        let hash = owner_hash(owner);
        let mut gone = Vec::new();
        for index in 0..inner.v.slots_in_use() {
            let slot = inner.v.slot(index)?;
            let sel = (slot.owner_sel.load(Acquire) & 1) as usize;
            // A cheap filter without the lock; the bytes are compared under it.
            if slot.live.load(Acquire) != 1 || slot.owner_hash[sel].load(Relaxed) != hash {
                continue;
            }
            let d = match inner.lock_dict(slot.id.load(Acquire)) {
                Ok(d) => d,
                Err(Error::Destroyed) => continue,
                Err(e) => return Err(e),
            };
            if d.owner() == owner {
                let id = d.id;
                match DictRef::change_all(d, gate, |d| d.destroy()) {
                    Ok(()) => gone.push(id),
                    Err(Error::Destroyed) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        Ok(gone)
    }

    /// Makes `new_owner` the owner; `caller`, when given, must be the owner now.
    pub fn give_away(&self, id: u64, token: &[u8], new_owner: &[u8], caller: Option<&[u8]>) -> Result<(), Error> {
        if new_owner.len() > OWNER_MAX {
            return Err(Error::OwnerTooLong);
        }
        self.lookup(id, token)?;
        let d = self.inner.lock_dict(id)?;
        if caller.is_some_and(|c| c != d.owner()) {
            return Err(Error::NotOwner);
        }
        d.set_owner(new_owner);
        Ok(())
    }

    /// The current owner of a dict.
    #[cfg(test)]
    pub fn owner(&self, id: u64, token: &[u8]) -> Result<Vec<u8>, Error> {
        self.lookup(id, token)?;
        Ok(self.inner.lock_dict(id)?.owner())
    }

    /// Opens the store at `path`, or creates it (with `size` and `generation`) if there is
    /// none. Creation goes through a private name and a hard link, so a concurrent opener
    /// sees either no file or a complete store.
    pub fn open_or_create(path: &Path, size: u64, generation: u64) -> Result<Store, super::OpenError> {
        match Store::open(path) {
            Err(super::OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
            other => return other,
        }
        let mut tmp = path.as_os_str().to_owned();
        tmp.push(format!(".new-{}", std::process::id()));
        let tmp = std::path::PathBuf::from(tmp);
        let _ = std::fs::remove_file(&tmp);
        let made = match Store::create(&tmp, size, generation) {
            Ok(m) => m,
            Err(e) => {
                // Nothing half made may stay behind (a mapping refused, a full tmpfs).
                let _ = std::fs::remove_file(&tmp);
                return Err(e);
            }
        };
        let linked = std::fs::hard_link(&tmp, path);
        let _ = std::fs::remove_file(&tmp);
        match linked {
            Ok(()) => Ok(made),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Store::open(path),
            Err(e) => Err(e.into()),
        }
    }
}

impl Inner {
    /// Picks a slot for a new dict (the registry lock is held): a free used slot near the
    /// hint, else a never-used one, else any free one.
    fn free_slot(&self) -> Result<u64, Error> {
        let h = self.v.header();
        let hw = self.v.slots_in_use();
        let start = h.slot_hint.load(Relaxed);
        let free = |i: u64| -> Result<bool, Error> { Ok(self.v.slot(i)?.live.load(Acquire) == 0) };
        for k in 0..hw.min(SLOT_PROBES) {
            let i = (start + k) % hw;
            if free(i)? {
                h.slot_hint.store(i + 1, Relaxed);
                return Ok(i);
            }
        }
        if hw < self.v.max_slots {
            return self.new_slot(hw);
        }
        for i in 0..hw {
            if free(i)? {
                h.slot_hint.store(i + 1, Relaxed);
                return Ok(i);
            }
        }
        Err(Error::Full)
    }

    /// Brings slot `index` (the high-water mark) into use: backs its memory and initialises
    /// its lock before the mark moves past it, so nobody can reach an uninitialised lock.
    fn new_slot(&self, index: u64) -> Result<u64, Error> {
        let h = self.v.header();
        let end = self.v.slots_off + (index + 1) * std::mem::size_of::<Slot>() as u64;
        let backed = self.v.map.back(h.slots_backed.load(Relaxed), end).map_err(|_| Error::Full)?;
        h.slots_backed.store(backed, Relaxed);
        let slot = self.v.slot(index)?;
        slot.lock.init()?;
        slot.live.store(0, Relaxed);
        h.slots_hw.store(index + 1, Release);
        Ok(index)
    }

    pub fn stats(&self) -> Stats {
        let h = self.v.header();
        let mut s = Stats {
            used: h.used.load(Relaxed),
            capacity: self.v.capacity - self.v.heap_off,
            max_dicts: self.v.max_slots,
            recoveries: h.recoveries.load(Relaxed),
            ..Stats::default()
        };
        for index in 0..self.v.slots_in_use() {
            let Ok(slot) = self.v.slot(index) else { break };
            if slot.live.load(Acquire) == 1 {
                s.dicts += 1;
                s.keys += slot.len.load(Relaxed) as usize;
                s.bytes += slot.bytes.load(Relaxed) as usize;
            }
        }
        s
    }
}

impl DictRef {
    /// Locks this dict (if still live).
    pub(super) fn lock(&self) -> Result<Locked<'_>, Error> {
        self.inner().lock_dict(self.id())
    }
}

fn token_bytes(t: [u64; 2]) -> [u8; TOKEN_LEN] {
    let mut out = [0u8; TOKEN_LEN];
    out[..8].copy_from_slice(&t[0].to_le_bytes());
    out[8..].copy_from_slice(&t[1].to_le_bytes());
    out
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
