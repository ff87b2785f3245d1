//! The structural checker: with every lock held, walks the whole mapping and lists every
//! inconsistency (heap chain, free lists, figures, tables, entries, leaked blocks).

use super::dict::Locked;
use super::heap::Heap;
use super::layout::*;
use super::lock::Acquired;
use super::{Error, Inner};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering::*;

/// A block as the walk found it.
struct Block {
    size: u64,
    word: u64,
    tag: u64,
}

pub fn run(inner: &Inner) -> Vec<String> {
    let mut problems = Vec::new();
    let h = inner.v.header();
    if h.magic.load(Acquire) != MAGIC {
        problems.push("bad magic".to_string());
        return problems;
    }
    let registry = match h.registry_lock.lock() {
        Ok((g, how)) => {
            if how == Acquired::OwnerDied {
                g.mark_consistent();
            }
            g
        }
        Err(e) => return vec![format!("registry lock: {e:?}")],
    };
    let mut dicts = Vec::new();
    for index in 0..inner.v.slots_in_use() {
        match inner.lock_slot(index) {
            Ok(d) => dicts.push(d),
            Err(e) => problems.push(format!("slot {index}: cannot lock: {e:?}")),
        }
    }
    let heap = match inner.v.heap() {
        Ok(heap) => heap,
        Err(e) => {
            problems.push(format!("heap lock: {e:?}"));
            return problems;
        }
    };
    let blocks = walk(&heap, &mut problems);
    check_free_lists(inner, &heap, &blocks, &mut problems);
    let mut referenced = HashSet::new();
    for d in &dicts {
        check_slot(d, &blocks, &mut referenced, &mut problems);
    }
    for (off, b) in &blocks {
        if b.word & USED != 0 && !referenced.contains(off) {
            problems.push(format!("leaked block at {off} ({} bytes, tag {})", b.size, b.tag));
        }
    }
    drop(heap);
    drop(dicts);
    drop(registry);
    problems
}

/// The chain of blocks, with its own rules: sizes, PREV_FREE bits, footers, no two free
/// blocks side by side, no free block just below `top`, and the `used` figure.
fn walk(heap: &Heap<'_>, problems: &mut Vec<String>) -> HashMap<u64, Block> {
    let mut blocks = HashMap::new();
    let mut prev_free = false;
    let mut used = 0;
    let mut last = None;
    let walked = heap.walk(|off, word, tag| {
        let size = word & !FLAGS;
        let free = word & USED == 0;
        if (word & PREV_FREE != 0) != prev_free && !free {
            problems.push(format!("block at {off}: PREV_FREE bit is wrong"));
        }
        if free && prev_free {
            problems.push(format!("free blocks side by side at {off}"));
        }
        if free {
            match heap.footer_of(off, size) {
                Ok(f) if f == size => {}
                _ => problems.push(format!("free block at {off}: footer disagrees")),
            }
        } else {
            used += size;
        }
        prev_free = free;
        last = Some((off, free));
        blocks.insert(off, Block { size, word, tag });
        Ok(())
    });
    if let Err(e) = walked {
        problems.push(format!("heap walk stopped: {e:?}"));
    }
    if let Some((off, true)) = last {
        problems.push(format!("free block at {off} just below top (should have been given back)"));
    }
    if heap.used() != used {
        problems.push(format!("used figure {} but blocks in use add up to {used}", heap.used()));
    }
    blocks
}

/// Every free block is on exactly the list of its size class, with consistent links, and
/// the non-empty bits match the lists.
fn check_free_lists(inner: &Inner, heap: &Heap<'_>, blocks: &HashMap<u64, Block>, problems: &mut Vec<String>) {
    let h = inner.v.header();
    let mut listed = HashSet::new();
    for class in 0..NCLASSES {
        let mut off = h.free_heads[class].load(Relaxed);
        let mut prev = 0;
        let bit = h.nonempty[class / 64].load(Relaxed) & (1 << (class % 64)) != 0;
        if bit != (off != 0) {
            problems.push(format!("free class {class}: non-empty bit is wrong"));
        }
        while off != 0 {
            match blocks.get(&off) {
                Some(b) if b.word & USED == 0 && class_of(b.size) == class => {}
                _ => {
                    problems.push(format!("free class {class}: lists {off}, which is not a free block of that class"));
                    break;
                }
            }
            if !listed.insert(off) {
                problems.push(format!("free block {off} listed twice (or a cycle)"));
                break;
            }
            let (next, back) = heap.links_of(off).unwrap_or((0, u64::MAX));
            if back != prev {
                problems.push(format!("free block {off}: back link {back}, expected {prev}"));
            }
            prev = off;
            off = next;
        }
    }
    for (off, b) in blocks {
        if b.word & USED == 0 && !listed.contains(off) {
            problems.push(format!("free block at {off} is on no free list"));
        }
    }
}

fn check_slot(d: &Locked<'_>, blocks: &HashMap<u64, Block>, referenced: &mut HashSet<u64>, problems: &mut Vec<String>) {
    let id = d.id;
    if d.slot.live.load(Acquire) != 1 {
        if d.slot.table.load(Relaxed) != 0 || d.slot.spare.load(Relaxed) != 0 {
            problems.push(format!("dict {id}: destroyed but still has a table or a spare block"));
        }
        return;
    }
    if d.slot.owner_len[(d.slot.owner_sel.load(Relaxed) & 1) as usize].load(Relaxed) > OWNER_MAX as u64 {
        problems.push(format!("dict {id}: owner too long"));
    }
    let mut claims = Vec::new();
    let mut claim = |off: u64, what: &str| {
        if !blocks.contains_key(&off) {
            claims.push(format!("dict {id}: {what} at {off} is not a block of the heap"));
        } else if !referenced.insert(off) {
            claims.push(format!("dict {id}: {what} at {off} is referenced twice"));
        }
    };
    let spare = d.slot.spare.load(Relaxed);
    if spare != 0 {
        match d.v.used_block(spare, id, "spare") {
            Ok(_) => claim(spare, "spare block"),
            Err(e) => problems.push(format!("dict {id}: spare block: {e:?}")),
        }
    }
    let t = match d.table() {
        Ok(Some(t)) => t,
        Ok(None) => {
            if d.slot.len.load(Relaxed) != 0 || d.slot.bytes.load(Relaxed) != 0 {
                problems.push(format!("dict {id}: no table but non-zero len/bytes"));
            }
            return;
        }
        Err(e) => return problems.push(format!("dict {id}: table: {e:?}")),
    };
    claim(t.block, "table");
    match check_entries(d, &t, &mut claim) {
        Ok(found) => problems.extend(found.into_iter().map(|p| format!("dict {id}: {p}"))),
        Err(e) => problems.push(format!("dict {id}: {e:?}")),
    }
    problems.extend(claims);
}

/// The table's entries: owned, hashed and placed right, unique, and matching the figures.
fn check_entries(d: &Locked<'_>, t: &super::table::Table<'_>, claim: &mut impl FnMut(u64, &str)) -> Result<Vec<String>, Error> {
    let mut found = Vec::new();
    let versions = d.v.header().versions.load(Relaxed);
    let (mut len, mut bytes, mut used) = (0, 0, 0);
    let mut keys = HashSet::new();
    for i in 0..t.cap {
        let w = t.bucket(d, i)?.load(Acquire);
        if w == EMPTY {
            continue;
        }
        used += 1;
        if w == TOMBSTONE {
            continue;
        }
        let e = match d.entry(bucket_block(w)) {
            Ok(e) => e,
            Err(c) => {
                found.push(format!("bucket {i}: {c:?}"));
                continue;
            }
        };
        claim(e.block, "entry");
        let hash = d.v.hash(e.key);
        if e.head.hash.load(Relaxed) != hash || !bucket_matches(w, hash) {
            found.push(format!("entry at {}: stored hash is wrong", e.block));
        } else if !reachable(d, t, hash, i)? {
            found.push(format!("entry at {}: an empty bucket lies between its home and its place", e.block));
        }
        if !keys.insert(e.key.to_vec()) {
            found.push(format!("key {:?} is in the table twice", e.key));
        }
        if e.seq() >= d.slot.next_seq.load(Relaxed) || e.version() > versions {
            found.push(format!("entry at {}: sequence or version from the future", e.block));
        }
        len += 1;
        bytes += e.size();
    }
    let figures = [("len", d.slot.len.load(Relaxed), len), ("bytes", d.slot.bytes.load(Relaxed), bytes), ("used buckets", t.head.used.load(Relaxed), used)];
    for (what, recorded, counted) in figures {
        if recorded != counted {
            found.push(format!("{what} recorded {recorded}, counted {counted}"));
        }
    }
    Ok(found)
}

/// Whether probing from `hash`'s home bucket reaches bucket `at` without an empty bucket.
fn reachable(d: &Locked<'_>, t: &super::table::Table<'_>, hash: u64, at: u64) -> Result<bool, Error> {
    let mut i = hash & (t.cap - 1);
    while i != at {
        if t.bucket(d, i)?.load(Relaxed) == EMPTY {
            return Ok(false);
        }
        i = (i + 1) & (t.cap - 1);
    }
    Ok(true)
}
