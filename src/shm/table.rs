//! A dict's entries: an open-addressing hash table of immutable entry blocks, changed only
//! by publishing one word at a time (a bucket, or the table root), always under the dict's lock.
//!
//! An entry is written in full into a fresh block and only then published by one release
//! store of its bucket, so no reader (and no recovery) ever sees half of one. The replaced or
//! removed block is freed after the publish; if its writer dies in between, the dict's
//! recovery finds the block by its tag and frees it.

use super::dict::Locked;
use super::layout::*;
use super::{crash_point, Corrupt, Error};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::*;

/// A published entry, borrowed from the mapping while the dict's lock is held.
pub struct Entry<'a> {
    pub block: u64,
    pub head: &'a EntryHead,
    pub key: &'a [u8],
    pub value: &'a [u8],
}

impl Entry<'_> {
    pub fn version(&self) -> u64 {
        self.head.version.load(Relaxed)
    }

    pub fn seq(&self) -> u64 {
        self.head.seq.load(Relaxed)
    }

    /// The VM may hold this value in its read cache.
    pub fn is_cached(&self) -> bool {
        self.head.cached.load(Relaxed) & CACHED != 0
    }

    /// The VM may hold it, or a change waits for the VM to forget it: a change must wait
    /// too, and no reply may be flagged cacheable.
    pub fn is_held(&self) -> bool {
        self.head.cached.load(Relaxed) != 0
    }

    /// Key and value bytes, as the `bytes` stat counts them.
    pub fn size(&self) -> u64 {
        (self.key.len() + self.value.len()) as u64
    }
}

/// A dict's hash table.
pub struct Table<'a> {
    pub block: u64,
    pub head: &'a TableHead,
    pub cap: u64,
    buckets: u64,
}

/// Where a key is, or where it would go.
pub struct Probe {
    /// The bucket holding the key, and its entry's block.
    pub found: Option<(u64, u64)>,
    /// The first bucket a new entry may take, and whether it is empty (not a tombstone).
    pub vacant: Option<(u64, bool)>,
}

impl Table<'_> {
    pub fn bucket<'m>(&self, d: &'m Locked<'_>, i: u64) -> Result<&'m AtomicU64, Corrupt> {
        d.v.map.word(self.buckets + (i & (self.cap - 1)) * 8, "bucket")
    }

    /// The blocks of every entry, in bucket order.
    pub fn entry_blocks(&self, d: &Locked<'_>) -> Result<Vec<u64>, Corrupt> {
        let mut out = Vec::new();
        for i in 0..self.cap {
            let w = self.bucket(d, i)?.load(Acquire);
            if w != EMPTY && w != TOMBSTONE {
                out.push(bucket_block(w));
            }
        }
        Ok(out)
    }
}

impl<'m> Locked<'m> {
    /// The dict's table, if it has one, checked.
    pub fn table(&self) -> Result<Option<Table<'m>>, Corrupt> {
        let block = self.slot.table.load(Acquire);
        if block == 0 {
            return Ok(None);
        }
        self.table_at(block).map(Some)
    }

    pub fn table_at(&self, block: u64) -> Result<Table<'m>, Corrupt> {
        let size = self.v.used_block(block, self.id, "table block not owned by its dict")?;
        let head: &TableHead = self.v.map.at(block + BLOCK_HEAD, "table head")?;
        let cap = head.cap.load(Relaxed);
        if !cap.is_power_of_two() || table_block_size(cap).is_none_or(|need| need > size) {
            return Err(Corrupt { what: "table capacity does not fit its block", at: block });
        }
        Ok(Table { block, head, cap, buckets: block + BLOCK_HEAD + TABLE_HEAD })
    }

    /// The entry in `block`, checked to be this dict's and to fit its block.
    pub fn entry(&self, block: u64) -> Result<Entry<'m>, Corrupt> {
        let size = self.v.used_block(block, self.id, "entry block not owned by its dict")?;
        let head: &EntryHead = self.v.map.at(block + BLOCK_HEAD, "entry head")?;
        let lens = head.lens.load(Relaxed);
        let (klen, vlen) = (lens & MAX_PART, lens >> 32);
        if BLOCK_HEAD + ENTRY_HEAD + klen + vlen > size {
            return Err(Corrupt { what: "entry lengths do not fit its block", at: block });
        }
        let data = block + BLOCK_HEAD + ENTRY_HEAD;
        let key = self.v.map.bytes(data, klen, "entry key")?;
        let value = self.v.map.bytes(data + klen, vlen, "entry value")?;
        Ok(Entry { block, head, key, value })
    }

    /// Probes for `key` (whose hash is `hash`).
    pub fn find(&self, t: &Table<'_>, key: &[u8], hash: u64) -> Result<Probe, Corrupt> {
        let mut vacant = None;
        for i in 0..t.cap {
            let at = hash.wrapping_add(i) & (t.cap - 1);
            let w = t.bucket(self, at)?.load(Acquire);
            if w == EMPTY {
                return Ok(Probe { found: None, vacant: vacant.or(Some((at, true))) });
            }
            if w == TOMBSTONE {
                vacant = vacant.or(Some((at, false)));
            } else if bucket_matches(w, hash) && self.entry(bucket_block(w))?.key == key {
                return Ok(Probe { found: Some((at, bucket_block(w))), vacant });
            }
        }
        Ok(Probe { found: None, vacant })
    }

    /// The entry under `key`, with its table and bucket.
    pub fn lookup(&self, key: &[u8]) -> Result<Option<(Table<'m>, u64, Entry<'m>)>, Corrupt> {
        let Some(t) = self.table()? else { return Ok(None) };
        match self.find(&t, key, self.v.hash(key))?.found {
            Some((bucket, block)) => {
                let e = self.entry(block)?;
                Ok(Some((t, bucket, e)))
            }
            None => Ok(None),
        }
    }

    /// Writes a complete entry into a new block, unpublished. `Full` leaves nothing behind.
    pub fn write_entry(&self, key: &[u8], value: &[u8], hash: u64, version: u64, seq: u64) -> Result<u64, Error> {
        let (klen, vlen) = (key.len() as u64, value.len() as u64);
        if klen > MAX_PART || vlen > MAX_PART {
            return Err(Error::Full);
        }
        let block = self.alloc_block(ENTRY_HEAD + klen + vlen)?;
        let head: &EntryHead = self.v.map.at(block + BLOCK_HEAD, "entry head")?;
        head.hash.store(hash, Relaxed);
        head.version.store(version, Relaxed);
        head.seq.store(seq, Relaxed);
        head.lens.store(klen | vlen << 32, Relaxed);
        head.cached.store(0, Relaxed);
        let data = block + BLOCK_HEAD + ENTRY_HEAD;
        self.v.map.write_bytes(data, key, "entry key")?;
        self.v.map.write_bytes(data + klen, value, "entry value")?;
        Ok(block)
    }

    /// A table with a vacant bucket for one more key: the current one, or a new one (bigger,
    /// or the same size without tombstones) published in its place.
    pub fn table_with_room(&self) -> Result<Table<'m>, Error> {
        let old = match self.table()? {
            Some(t) if (t.head.used.load(Relaxed) + 1) * 4 <= t.cap * 3 => return Ok(t),
            other => other,
        };
        let cap = match &old {
            None => MIN_TABLE,
            // Grow when live entries fill half; otherwise it was tombstones: rehash in place.
            Some(t) if (self.slot.len.load(Relaxed) + 1) * 2 > t.cap => t.cap.checked_mul(2).ok_or(Error::Full)?,
            Some(t) => t.cap,
        };
        let block = self.new_table(cap, old.as_ref())?;
        // The commit point of the growth: readers (all under our lock) see old or new whole.
        self.slot.table.store(block, Release);
        crash_point("table.grown");
        if let Some(t) = old {
            self.retire(t.block)?;
        }
        Ok(self.table_at(block)?)
    }

    /// Allocates a table of `cap` buckets holding the entries of `from`, unpublished.
    fn new_table(&self, cap: u64, from: Option<&Table<'_>>) -> Result<u64, Error> {
        let size = TABLE_HEAD.checked_add(cap.checked_mul(8).ok_or(Error::Full)?).ok_or(Error::Full)?;
        let block = self.alloc_block(size)?;
        let t = Table { block, head: self.v.map.at(block + BLOCK_HEAD, "table head")?, cap, buckets: block + BLOCK_HEAD + TABLE_HEAD };
        t.head.cap.store(cap, Relaxed);
        // A reused block holds old bytes: every bucket must start empty.
        for i in 0..cap {
            t.bucket(self, i)?.store(EMPTY, Relaxed);
        }
        let mut used = 0;
        if let Some(old) = from {
            for e in old.entry_blocks(self)? {
                let hash = self.entry(e)?.head.hash.load(Relaxed);
                self.place(&t, e, hash)?;
                used += 1;
            }
        }
        t.head.used.store(used, Relaxed);
        Ok(block)
    }

    /// Puts an entry block into the first empty bucket of its probe sequence (for rehashing).
    fn place(&self, t: &Table<'_>, block: u64, hash: u64) -> Result<(), Corrupt> {
        for i in 0..t.cap {
            let b = t.bucket(self, hash.wrapping_add(i))?;
            if b.load(Relaxed) == EMPTY {
                b.store(bucket_word(block, hash), Relaxed);
                return Ok(());
            }
        }
        Err(Corrupt { what: "rehash found no empty bucket", at: t.block })
    }

    /// A block for `payload` bytes: the dict's spare if it fits, else one from the heap (after
    /// giving the spare back, if the heap is full without it).
    pub fn alloc_block(&self, payload: u64) -> Result<u64, Error> {
        let need = block_size(payload).ok_or(Error::Full)?;
        let spare = self.slot.spare.load(Relaxed);
        if spare != 0 {
            match self.v.used_block(spare, self.id, "spare block not owned by its dict") {
                Ok(size) if size >= need && size - need < SPARE_SLACK => {
                    // Unreferenced from here until published: a crash leaves it to the sweep.
                    self.slot.spare.store(0, Relaxed);
                    return Ok(spare);
                }
                Ok(_) => {}
                // Overwritten by someone: forget it rather than fail every write for it.
                Err(_) => self.slot.spare.store(0, Relaxed),
            }
        }
        // Bound first: the heap's guard must be gone before the retry takes it again.
        let first = self.v.heap()?.alloc(payload, self.id);
        match first {
            Err(Error::Full) if self.slot.spare.load(Relaxed) != 0 => {
                self.drop_spare()?;
                self.v.heap()?.alloc(payload, self.id)
            }
            other => other,
        }
    }

    /// Disposes of a block just unpublished: kept as the spare if small and there is none,
    /// else freed.
    pub fn retire(&self, block: u64) -> Result<(), Error> {
        if self.slot.spare.load(Relaxed) == 0 && self.v.used_block(block, self.id, "retired block")? <= SPARE_MAX {
            self.slot.spare.store(block, Relaxed);
            return Ok(());
        }
        self.v.heap()?.free(block)
    }

    pub fn drop_spare(&self) -> Result<(), Error> {
        let spare = self.slot.spare.swap(0, Relaxed);
        if spare != 0 {
            self.v.heap()?.free(spare)?;
        }
        Ok(())
    }

    /// Frees a table and every entry in it (already unpublished).
    pub fn free_table(&self, t: &Table<'_>) -> Result<(), Error> {
        let blocks = t.entry_blocks(self)?;
        let heap = self.v.heap()?;
        for b in blocks {
            heap.free(b)?;
            crash_point("table.free_entry");
        }
        heap.free(t.block)
    }
}
