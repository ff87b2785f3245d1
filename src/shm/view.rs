//! One process's view of a store: the mapping, plus the layout figures it validated once at
//! open, so hot paths need not re-read (and re-check) them from shared memory.

use super::layout::*;
use super::mapping::Mapping;
use super::Corrupt;
use std::sync::atomic::Ordering::*;

pub struct View {
    pub map: Mapping,
    pub capacity: u64,
    pub slots_off: u64,
    pub max_slots: u64,
    pub heap_off: u64,
    pub generation: u64,
    hash_keys: (u64, u64),
}

/// Where things go in a mapping of `capacity` bytes: (slots_off, max_slots, heap_off).
/// A sixteenth of the space, at most a million slots, holds dict slots: a dict needs a few
/// hundred bytes of heap at the very least, so more slots than that could never all be used.
pub fn plan(capacity: u64) -> Option<(u64, u64, u64)> {
    let slot = std::mem::size_of::<Slot>() as u64;
    let max_slots = (capacity / 16 / slot).clamp(MIN_SLOTS, MAX_SLOTS);
    let slots_off = PAGE;
    let heap_off = round_up(slots_off + max_slots * slot, PAGE)?;
    // Room for at least a few blocks, or the store is useless.
    (heap_off.checked_add(PAGE)? <= capacity).then_some((slots_off, max_slots, heap_off))
}

impl View {
    /// Checks the header of a mapping and takes its layout figures.
    pub fn validate(map: Mapping) -> Result<View, Corrupt> {
        let h: &Header = map.at(0, "header")?;
        let bad = |what| Err(Corrupt { what, at: 0 });
        if h.magic.load(Acquire) != MAGIC {
            return bad("not a SharedDict store (bad magic), or not initialised yet");
        }
        if h.version.load(Relaxed) != VERSION {
            return bad("a SharedDict store of another layout version");
        }
        if h.header_size.load(Relaxed) != std::mem::size_of::<Header>() as u64
            || h.slot_size.load(Relaxed) != std::mem::size_of::<Slot>() as u64
        {
            return bad("a SharedDict store of another layout (header or slot size)");
        }
        let capacity = h.capacity.load(Relaxed);
        if capacity != map.len() {
            return bad("the store's recorded size differs from the file's");
        }
        let planned = (h.slots_off.load(Relaxed), h.max_slots.load(Relaxed), h.heap_off.load(Relaxed));
        if plan(capacity) != Some(planned) {
            return bad("the store's layout figures are inconsistent");
        }
        let (slots_off, max_slots, heap_off) = planned;
        let hash_keys = (h.hash_keys[0].load(Relaxed), h.hash_keys[1].load(Relaxed));
        let generation = h.generation.load(Relaxed);
        Ok(View { map, capacity, slots_off, max_slots, heap_off, generation, hash_keys })
    }

    pub fn header(&self) -> &Header {
        // SAFETY: `validate` (the only constructor) found a Header at offset 0 of a mapping of
        // at least a page; Header is all atomics and stays mapped as long as `self`.
        unsafe { &*self.map.base().cast::<Header>() }
    }

    pub fn slot(&self, index: u64) -> Result<&Slot, Corrupt> {
        if index >= self.max_slots {
            return Err(Corrupt { what: "slot index out of range", at: index });
        }
        self.map.at(self.slots_off + index * std::mem::size_of::<Slot>() as u64, "slot")
    }

    /// Slots that were ever used (have an initialised lock).
    pub fn slots_in_use(&self) -> u64 {
        self.header().slots_hw.load(Acquire).min(self.max_slots)
    }

    pub fn next_version(&self) -> u64 {
        self.header().versions.fetch_add(1, AcqRel) + 1
    }

    pub fn hash(&self, key: &[u8]) -> u64 {
        siphash13(self.hash_keys.0, self.hash_keys.1, key)
    }

    /// The top of the heap, checked against the mapping.
    pub fn top(&self) -> Result<u64, Corrupt> {
        let top = self.header().top.load(Acquire);
        if top < self.heap_off || top > self.capacity || !top.is_multiple_of(ALIGN) {
            return Err(Corrupt { what: "heap top out of range", at: top });
        }
        Ok(top)
    }

    /// A block's header, if `off` can be a block (inside the heap, aligned).
    pub fn block(&self, off: u64) -> Result<&BlockHead, Corrupt> {
        if off < self.heap_off || !off.is_multiple_of(ALIGN) || off >= self.capacity {
            return Err(Corrupt { what: "block offset out of the heap", at: off });
        }
        self.map.at(off, "block")
    }

    /// A used block's size, checked to lie within the heap.
    pub fn used_block(&self, off: u64, tag: u64, what: &'static str) -> Result<u64, Corrupt> {
        let b = self.block(off)?;
        let word = b.word.load(Acquire);
        let size = word & !FLAGS;
        if word & USED == 0 || b.tag.load(Relaxed) != tag || size < MIN_BLOCK || off.checked_add(size).is_none_or(|e| e > self.capacity) {
            return Err(Corrupt { what, at: off });
        }
        Ok(size)
    }
}

/// SipHash-1-3 (the function std's HashMap uses), keyed per store: stable across processes
/// (unlike std's RandomState, which cannot take a shared key) and not floodable by keys
/// chosen to collide.
pub fn siphash13(k0: u64, k1: u64, m: &[u8]) -> u64 {
    let mut v = [k0 ^ 0x736f_6d65_7073_6575, k1 ^ 0x646f_7261_6e64_6f6d, k0 ^ 0x6c79_6765_6e65_7261, k1 ^ 0x7465_6462_7974_6573];
    let mut chunks = m.chunks_exact(8);
    for c in &mut chunks {
        let mut w = [0u8; 8];
        w.copy_from_slice(c);
        compress(&mut v, u64::from_le_bytes(w));
    }
    let mut last = (m.len() as u64) << 56;
    for (i, &b) in chunks.remainder().iter().enumerate() {
        last |= (b as u64) << (8 * i);
    }
    compress(&mut v, last);
    v[2] ^= 0xff;
    for _ in 0..3 {
        sip_round(&mut v);
    }
    v[0] ^ v[1] ^ v[2] ^ v[3]
}

fn compress(v: &mut [u64; 4], m: u64) {
    v[3] ^= m;
    sip_round(v);
    v[0] ^= m;
}

fn sip_round(v: &mut [u64; 4]) {
    v[0] = v[0].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(13) ^ v[0];
    v[0] = v[0].rotate_left(32);
    v[2] = v[2].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(16) ^ v[2];
    v[0] = v[0].wrapping_add(v[3]);
    v[3] = v[3].rotate_left(21) ^ v[0];
    v[2] = v[2].wrapping_add(v[1]);
    v[1] = v[1].rotate_left(17) ^ v[2];
    v[2] = v[2].rotate_left(32);
}
