//! A dict, locked: the changes to its entries, each committed by one published word. (What
//! they owe the VM's read cache was settled before the lock was taken: see `handle`.)

use super::layout::*;
use super::lock::{Acquired, Guard};
use super::table::Entry;
use super::view::View;
use super::{crash_point, recover, Corrupt, Error, Inner};
use std::sync::atomic::Ordering::*;

/// A dict's slot with its lock held. Dropping it unlocks.
pub struct Locked<'a> {
    pub inner: &'a Inner,
    pub v: &'a View,
    pub slot: &'a Slot,
    /// The slot's dict id when locked (a destroyed dict's, until the slot is reused).
    pub id: u64,
    pub guard: Guard<'a>,
}

impl Inner {
    /// Locks slot `index`, repairing it first if the last holder died.
    pub fn lock_slot(&self, index: u64) -> Result<Locked<'_>, Error> {
        let slot = self.v.slot(index)?;
        let (guard, how) = slot.lock.lock()?;
        let d = Locked { inner: self, v: &self.v, slot, id: slot.id.load(Acquire), guard };
        if how == Acquired::OwnerDied {
            self.v.header().recoveries.fetch_add(1, Relaxed);
            let repaired = recover::dict(&d);
            // Consistent even if the repair failed: a lock nobody can take again would stop
            // every process, while corruption is reported by each operation that meets it.
            d.guard.mark_consistent();
            repaired?;
        }
        Ok(d)
    }

    /// Locks the live dict `id`; `Destroyed` if it is not (or no longer) live.
    pub fn lock_dict(&self, id: u64) -> Result<Locked<'_>, Error> {
        let index = id & (MAX_SLOTS - 1);
        // A slot past the high-water mark has no initialised lock: nothing to take there.
        if index >= self.v.slots_in_use() {
            return Err(Error::Destroyed);
        }
        let d = self.lock_slot(index)?;
        if d.slot.live.load(Acquire) != 1 || d.id != id {
            return Err(Error::Destroyed);
        }
        Ok(d)
    }
}

impl Locked<'_> {
    /// The dict's token (for the handle an invalidation names).
    pub fn token(&self) -> [u8; TOKEN_LEN] {
        let mut t = [0u8; TOKEN_LEN];
        t[..8].copy_from_slice(&self.slot.token[0].load(Relaxed).to_le_bytes());
        t[8..].copy_from_slice(&self.slot.token[1].load(Relaxed).to_le_bytes());
        t
    }

    /// Stores `value` under `key`; returns the version it got. An existing key keeps its
    /// place in the insertion order. `Full` changes nothing.
    pub fn store(&self, key: &[u8], value: &[u8]) -> Result<u64, Error> {
        let hash = self.v.hash(key);
        let version = self.v.next_version();
        if let Some(t) = self.table()? {
            if let Some((bucket, old)) = self.find(&t, key, hash)?.found {
                let word = t.bucket(self, bucket)?;
                return self.replace(word, old, key, value, hash, version);
            }
        }
        let t = self.table_with_room()?;
        let (bucket, empty) = self.find(&t, key, hash)?.vacant.ok_or(Corrupt { what: "full table after growth", at: t.block })?;
        let seq = self.slot.next_seq.fetch_add(1, Relaxed);
        let block = self.write_entry(key, value, hash, version, seq)?;
        t.bucket(self, bucket)?.store(bucket_word(block, hash), Release);
        crash_point("set.inserted");
        if empty {
            t.head.used.fetch_add(1, Relaxed);
        }
        self.slot.len.fetch_add(1, Relaxed);
        self.slot.bytes.fetch_add((key.len() + value.len()) as u64, Relaxed);
        Ok(version)
    }

    fn replace(&self, bucket: &std::sync::atomic::AtomicU64, old: u64, key: &[u8], value: &[u8], hash: u64, version: u64) -> Result<u64, Error> {
        let e = self.entry(old)?;
        let old_len = e.value.len() as u64;
        let block = self.write_entry(key, value, hash, version, e.seq())?;
        bucket.store(bucket_word(block, hash), Release);
        crash_point("set.replaced");
        self.slot.bytes.fetch_add(value.len() as u64, Relaxed);
        self.slot.bytes.fetch_sub(old_len, Relaxed);
        self.retire(old)?;
        Ok(version)
    }

    /// Removes `key`; returns its value and version if it was there (the value only when
    /// `copy` asks for it).
    pub fn remove(&self, key: &[u8], copy: bool) -> Result<Option<(Vec<u8>, u64)>, Error> {
        let Some((t, bucket, e)) = self.lookup(key)? else { return Ok(None) };
        let out = (if copy { e.value.to_vec() } else { Vec::new() }, e.version());
        t.bucket(self, bucket)?.store(TOMBSTONE, Release);
        crash_point("del.removed");
        self.slot.len.fetch_sub(1, Relaxed);
        self.slot.bytes.fetch_sub(e.size(), Relaxed);
        self.retire(e.block)?;
        Ok(Some(out))
    }

    /// Empties the dict: one store of the table root commits it, then the blocks are freed.
    pub fn clear(&self) -> Result<(), Error> {
        let old = self.table()?;
        self.slot.table.store(0, Release);
        crash_point("clear.committed");
        self.slot.len.store(0, Relaxed);
        self.slot.bytes.store(0, Relaxed);
        // Nothing of the dict is cached any more (its gate saw to it); a clear whose wait
        // for the VM is still in flight gets its count back to zero at worst.
        self.slot.any_cached.store(0, Relaxed);
        self.drop_spare()?;
        match old {
            Some(t) => self.free_table(&t),
            None => Ok(()),
        }
    }

    /// Destroys the dict: clearing `live` commits it; its blocks are freed after.
    pub fn destroy(&self) -> Result<(), Error> {
        self.slot.live.store(0, Release);
        crash_point("destroy.committed");
        self.clear()
    }

    /// Every entry, in insertion order.
    pub fn entries_in_order(&self) -> Result<Vec<Entry<'_>>, Error> {
        let Some(t) = self.table()? else { return Ok(Vec::new()) };
        let mut all = t.entry_blocks(self)?.into_iter().map(|b| self.entry(b)).collect::<Result<Vec<_>, _>>()?;
        all.sort_unstable_by_key(|e| e.seq());
        Ok(all)
    }

    /// The current owner's bytes.
    pub fn owner(&self) -> Vec<u8> {
        let sel = (self.slot.owner_sel.load(Acquire) & 1) as usize;
        load_owner(&self.slot.owner[sel], self.slot.owner_len[sel].load(Relaxed) as usize)
    }

    /// Makes `owner` the owner: written into the spare buffer, then one store flips to it.
    pub fn set_owner(&self, owner: &[u8]) {
        let sel = (self.slot.owner_sel.load(Acquire) & 1) as usize;
        let next = 1 - sel;
        store_owner(&self.slot.owner[next], owner);
        self.slot.owner_len[next].store(owner.len() as u64, Relaxed);
        self.slot.owner_hash[next].store(owner_hash(owner), Relaxed);
        crash_point("owner.written");
        self.slot.owner_sel.store(next as u64, Release);
    }
}
