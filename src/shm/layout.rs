//! What lies where in a store's mapping: the header, the dict slots and the heap's blocks.
//!
//! Every field another process may touch is an atomic: the mapping is shared memory, written
//! by several processes at once, and a plain field would let the compiler tear or cache it.
//! Offsets, never pointers, are stored, because each process maps the file at its own address.
//!
//! ```text
//! 0                 Header (one page)
//! slots_off         Slot × max_slots   (one per dict, its lock and roots)
//! heap_off .. top   blocks: [word: size|flags][tag: dict id] payload...
//! top .. capacity   not yet used (sparse: costs nothing)
//! ```

use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicU64, Ordering};

/// "pyportSD", little-endian.
pub const MAGIC: u64 = u64::from_le_bytes(*b"pyportSD");
/// Bumped whenever the layout changes: a binary never opens a mapping it does not understand.
pub const VERSION: u64 = 1;
pub const PAGE: u64 = 4096;

/// Blocks are 16-byte aligned and at least 48 bytes: a free block holds its header, two
/// list links and a footer that must not overlap them.
pub const ALIGN: u64 = 16;
pub const MIN_BLOCK: u64 = 48;
pub const BLOCK_HEAD: u64 = std::mem::size_of::<BlockHead>() as u64;
/// In a block's word: the block is in use.
pub const USED: u64 = 1;
/// In a block's word: the block just before it is free (its last 8 bytes hold its size).
pub const PREV_FREE: u64 = 2;
pub const FLAGS: u64 = ALIGN - 1;

/// An owner is an Erlang pid in the external term format; 300 bytes hold any node name.
pub const OWNER_MAX: usize = 300;
const OWNER_WORDS: usize = OWNER_MAX.div_ceil(8);
pub const TOKEN_LEN: usize = 16;

/// A dict id is `sequence << SLOT_BITS | slot`: the slot finds it without a search, and the
/// sequence (never reused) keeps an id from ever naming a later dict of the same slot.
pub const SLOT_BITS: u32 = 20;
pub const MAX_SLOTS: u64 = 1 << SLOT_BITS;
pub const MIN_SLOTS: u64 = 16;

/// Free-list classes: exact sizes 32..=1024 step 16 (63 classes), then powers of two.
pub const EXACT_CLASSES: usize = 63;
pub const NCLASSES: usize = 112;

/// A process-shared robust mutex, on its own cache line.
#[repr(C, align(64))]
pub struct RawLock(pub UnsafeCell<libc::pthread_mutex_t>);

#[repr(C)]
pub struct Header {
    pub magic: AtomicU64,
    pub version: AtomicU64,
    pub header_size: AtomicU64,
    pub slot_size: AtomicU64,
    pub capacity: AtomicU64,
    pub generation: AtomicU64,
    pub slots_off: AtomicU64,
    pub max_slots: AtomicU64,
    pub heap_off: AtomicU64,
    /// The key of the keyed hash of dict keys: per store, so nobody can precompute collisions.
    pub hash_keys: [AtomicU64; 2],
    /// The store's one version counter: every value written and every invalidation gets the next.
    pub versions: AtomicU64,
    /// The sequence half of the next dict id.
    pub next_seq: AtomicU64,
    /// Slots below this have an initialised lock (were used at least once).
    pub slots_hw: AtomicU64,
    /// Where the search for a free slot starts.
    pub slot_hint: AtomicU64,
    /// Bytes of the slot area backed by `fallocate` so far.
    pub slots_backed: AtomicU64,
    /// Locks found held by a dead process and repaired (for stats and tests).
    pub recoveries: AtomicU64,
    /// Held to create a dict (picks and initialises a slot).
    pub registry_lock: RawLock,
    /// Held for every change to the heap's blocks and free lists.
    pub heap_lock: RawLock,
    /// The end of the heap's blocks.
    pub top: AtomicU64,
    /// Bytes of the heap backed by `fallocate` so far.
    pub heap_backed: AtomicU64,
    /// Bytes in used blocks, headers included.
    pub used: AtomicU64,
    /// Which free lists are non-empty (derived; rebuilt by recovery).
    pub nonempty: [AtomicU64; 2],
    pub free_heads: [AtomicU64; NCLASSES],
}

/// One dict: its lock, identity, owner and the root of its entries.
#[repr(C, align(64))]
pub struct Slot {
    pub lock: RawLock,
    /// The dict's id (kept after destroy: it tags the blocks still to be freed).
    pub id: AtomicU64,
    /// 1 while the dict is live. Clearing it is the commit point of destroy.
    pub live: AtomicU64,
    pub token: [AtomicU64; 2],
    /// Offset of the hash table's block, or 0 for an empty dict. Replacing it is the commit
    /// point of clear and of a table's growth.
    pub table: AtomicU64,
    /// Entries and key+value bytes: derived, recomputed by recovery.
    pub len: AtomicU64,
    pub bytes: AtomicU64,
    /// The insertion sequence number of the next new key (keys come out in this order).
    pub next_seq: AtomicU64,
    /// `CACHED`: some entry was flagged cached since the dict was last cleared; plus
    /// `IN_FLIGHT` for each whole-dict change waiting for the VM to forget the dict.
    pub any_cached: AtomicU64,
    /// A small block this dict unpublished and kept for its next write (0: none), so that
    /// overwriting a value with one of the same size needs no heap lock.
    pub spare: AtomicU64,
    /// Which of the two owner buffers is current: give_away writes the other, then flips this.
    pub owner_sel: AtomicU64,
    pub owner_hash: [AtomicU64; 2],
    pub owner_len: [AtomicU64; 2],
    pub owner: [[AtomicU64; OWNER_WORDS]; 2],
}

/// The first 16 bytes of every heap block.
#[repr(C)]
pub struct BlockHead {
    /// size | USED | PREV_FREE. A single store of this word commits a split, a merge, an
    /// allocation or a free, so the heap is walkable from `heap_off` to `top` at every instant.
    pub word: AtomicU64,
    /// The id of the dict that allocated the block: a crashed writer's unpublished blocks are
    /// found (and freed) by this tag.
    pub tag: AtomicU64,
}

/// The payload of a free block: its free-list links (offsets, 0 = none).
#[repr(C)]
pub struct FreeLinks {
    pub next: AtomicU64,
    pub prev: AtomicU64,
}

/// The payload head of an entry block; the key and then the value follow it.
#[repr(C)]
pub struct EntryHead {
    pub hash: AtomicU64,
    pub version: AtomicU64,
    pub seq: AtomicU64,
    /// key length | value length << 32
    pub lens: AtomicU64,
    /// `CACHED` once the VM may hold this value in its read cache, plus `IN_FLIGHT` for each
    /// change waiting for the VM to forget it (a count a killed waiter may leave behind: the
    /// next change of the key replaces the block, and the count with it).
    pub cached: AtomicU64,
}
/// See [`EntryHead::cached`] and [`Slot::any_cached`].
pub const CACHED: u64 = 1;
pub const IN_FLIGHT: u64 = 2;
pub const ENTRY_HEAD: u64 = std::mem::size_of::<EntryHead>() as u64;
/// Key and value lengths are stored in 32 bits each.
pub const MAX_PART: u64 = u32::MAX as u64;

/// The payload head of a hash table block; `cap` bucket words follow it.
#[repr(C)]
pub struct TableHead {
    pub cap: AtomicU64,
    /// Buckets not empty (live entries and tombstones): derived, recomputed by recovery.
    pub used: AtomicU64,
}
pub const TABLE_HEAD: u64 = std::mem::size_of::<TableHead>() as u64;
pub const MIN_TABLE: u64 = 8;
/// A dict keeps an unpublished block as its spare only up to this size...
pub const SPARE_MAX: u64 = 1024;
/// ...and reuses it for a write that needs at most this much less.
pub const SPARE_SLACK: u64 = 64;
/// A bucket: EMPTY, TOMBSTONE, or `hash >> 48 << 48 | entry block offset >> 4`.
pub const EMPTY: u64 = 0;
pub const TOMBSTONE: u64 = 1;

pub fn bucket_word(block: u64, hash: u64) -> u64 {
    (hash & 0xffff_0000_0000_0000) | (block >> 4)
}

pub fn bucket_block(word: u64) -> u64 {
    (word & 0x0000_ffff_ffff_ffff) << 4
}

pub fn bucket_matches(word: u64, hash: u64) -> bool {
    (word ^ hash) & 0xffff_0000_0000_0000 == 0
}

pub fn round_up(n: u64, to: u64) -> Option<u64> {
    Some(n.checked_add(to - 1)? / to * to)
}

/// The block size that holds `payload` bytes.
pub fn block_size(payload: u64) -> Option<u64> {
    Some(round_up(payload.checked_add(BLOCK_HEAD)?, ALIGN)?.max(MIN_BLOCK))
}

/// The block size of an entry: what a set of `key` and `value` lengths takes from the heap.
#[cfg(test)]
pub fn entry_block_size(key_len: u64, value_len: u64) -> Option<u64> {
    block_size(ENTRY_HEAD.checked_add(key_len)?.checked_add(value_len)?)
}

pub fn table_block_size(cap: u64) -> Option<u64> {
    block_size(TABLE_HEAD.checked_add(cap.checked_mul(8)?)?)
}

/// The free list a block of `size` belongs on.
pub fn class_of(size: u64) -> usize {
    if size <= 1024 {
        (size / ALIGN).saturating_sub(2) as usize
    } else {
        let log2 = 63 - size.leading_zeros() as usize;
        (EXACT_CLASSES + log2 - 10).min(NCLASSES - 1)
    }
}

/// The copy of a 300-byte owner in words, and back.
pub fn store_owner(words: &[AtomicU64; OWNER_WORDS], owner: &[u8]) {
    for (i, w) in words.iter().enumerate() {
        let mut b = [0u8; 8];
        let from = (i * 8).min(owner.len());
        let to = (i * 8 + 8).min(owner.len());
        b[..to - from].copy_from_slice(&owner[from..to]);
        w.store(u64::from_le_bytes(b), Ordering::Relaxed);
    }
}

pub fn load_owner(words: &[AtomicU64; OWNER_WORDS], len: usize) -> Vec<u8> {
    let mut out: Vec<u8> = words.iter().flat_map(|w| w.load(Ordering::Relaxed).to_le_bytes()).collect();
    out.truncate(len.min(OWNER_MAX));
    out
}

/// FNV-1a: a cheap pre-filter for owner comparisons (the bytes are compared after).
pub fn owner_hash(owner: &[u8]) -> u64 {
    owner.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| (h ^ b as u64).wrapping_mul(0x100_0000_01b3))
}

const _: () = assert!(std::mem::size_of::<Slot>() <= 1024);
const _: () = assert!(std::mem::size_of::<Header>() <= PAGE as usize);
const _: () = assert!(std::mem::size_of::<BlockHead>() == 16);
const _: () = assert!(ENTRY_HEAD.is_multiple_of(8));
