//! The heap allocator: boundary-tagged blocks with segregated free lists, shared by every
//! process, under one robust lock.
//!
//! Crash safety rests on one rule: the chain of block words from `heap_off` to `top` is
//! always walkable, because every split, merge, allocation and free commits with a single
//! store of one block's word (the new tail's header is written before the head shrinks; a
//! merge is one store of the surviving header; `top` moves after the block it uncovers is
//! written). The free lists, footers, PREV_FREE bits and the `used` figure are derived: a
//! locker that finds the lock's holder dead rebuilds them all from a walk ([`Heap::rebuild`]).
//!
//! Blocks are tagged with the id of the dict they were allocated for; what a dead writer
//! allocated and never published (or unpublished and never freed) is reclaimed by its dict's
//! recovery through that tag (see `recover`).

use super::layout::*;
use super::lock::{Acquired, Guard};
use super::view::View;
use super::{crash_point, Corrupt, Error};
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering::*;

/// The heap, locked.
pub struct Heap<'a> {
    v: &'a View,
    _guard: Guard<'a>,
}

/// First-fit looks at most this many blocks of a size-range list before trying larger ones.
const FIRST_FIT_PROBES: usize = 16;

impl View {
    /// Locks the heap, rebuilding its derived state first if the last holder died.
    pub fn heap(&self) -> Result<Heap<'_>, Error> {
        let h = self.header();
        let (guard, how) = h.heap_lock.lock()?;
        let heap = Heap { v: self, _guard: guard };
        if how == Acquired::OwnerDied {
            h.recoveries.fetch_add(1, Relaxed);
            let rebuilt = heap.rebuild();
            // Consistent even if the rebuild found corruption: a lock that can never be taken
            // again would stop every process, while the corruption is reported per operation.
            heap._guard.mark_consistent();
            rebuilt?;
        }
        Ok(heap)
    }
}

impl<'a> Heap<'a> {
    fn h(&self) -> &'a Header {
        self.v.header()
    }

    fn word(&self, off: u64) -> Result<&'a AtomicU64, Corrupt> {
        Ok(&self.v.block(off)?.word)
    }

    fn links(&self, off: u64) -> Result<&'a FreeLinks, Corrupt> {
        self.v.map.at(off + BLOCK_HEAD, "free links")
    }

    fn footer(&self, off: u64, size: u64) -> Result<&'a AtomicU64, Corrupt> {
        self.v.map.word(off + size - 8, "free block footer")
    }

    /// Allocates a block with room for `payload` bytes, tagged `tag`; returns its offset.
    /// `Error::Full` when no free block or unused space fits.
    pub fn alloc(&self, payload: u64, tag: u64) -> Result<u64, Error> {
        let need = block_size(payload).ok_or(Error::Full)?;
        if let Some(off) = self.take_free(need)? {
            return self.carve(off, need, tag);
        }
        self.bump(need, tag)
    }

    /// Finds and unlinks a free block of at least `need` bytes.
    fn take_free(&self, need: u64) -> Result<Option<u64>, Error> {
        let first = class_of(need);
        for class in self.nonempty_from(first) {
            let mut off = self.h().free_heads[class].load(Relaxed);
            // Exact classes and classes above `need`'s range fit with their first block.
            let probes = if class == first && class >= EXACT_CLASSES { FIRST_FIT_PROBES } else { 1 };
            for _ in 0..probes {
                if off == 0 {
                    break;
                }
                let size = self.free_size(off)?;
                if size >= need {
                    self.unlink(off, size)?;
                    return Ok(Some(off));
                }
                off = self.links(off)?.next.load(Relaxed);
            }
        }
        Ok(None)
    }

    /// The non-empty classes from `first` up, in order.
    fn nonempty_from(&self, first: usize) -> impl Iterator<Item = usize> + 'a {
        let bits = [self.h().nonempty[0].load(Relaxed), self.h().nonempty[1].load(Relaxed)];
        (first..NCLASSES).filter(move |&c| bits[c / 64] & (1 << (c % 64)) != 0)
    }

    /// Gives the free block at `off` (already unlinked) to a new owner, splitting off the tail
    /// it does not need.
    fn carve(&self, off: u64, need: u64, tag: u64) -> Result<u64, Error> {
        let word = self.word(off)?.load(Relaxed);
        let size = word & !FLAGS;
        let b = self.v.block(off)?;
        if size - need >= MIN_BLOCK {
            let rest = off + need;
            self.v.block(rest)?.word.store(size - need, Relaxed);
            self.footer(rest, size - need)?.store(size - need, Relaxed);
            self.link(rest, size - need)?;
            crash_point("heap.split");
            b.tag.store(tag, Relaxed);
            b.word.store(need | USED | (word & PREV_FREE), Release);
        } else {
            b.tag.store(tag, Relaxed);
            b.word.store(size | USED | (word & PREV_FREE), Release);
            self.set_prev_free(off + size, false)?;
        }
        self.h().used.fetch_add(b.word.load(Relaxed) & !FLAGS, Relaxed);
        Ok(off)
    }

    /// Takes a new block from the unused space above `top`.
    fn bump(&self, need: u64, tag: u64) -> Result<u64, Error> {
        let h = self.h();
        let top = self.v.top()?;
        let end = top.checked_add(need).filter(|&e| e <= self.v.capacity).ok_or(Error::Full)?;
        let backed = self.v.map.back(h.heap_backed.load(Relaxed), end).map_err(|_| Error::Full)?;
        h.heap_backed.store(backed, Relaxed);
        let b = self.v.block(top)?;
        b.tag.store(tag, Relaxed);
        // The block below `top` is never free (a free block there is given back to `top`).
        b.word.store(need | USED, Relaxed);
        crash_point("heap.bump");
        h.top.store(end, Release);
        h.used.fetch_add(need, Relaxed);
        Ok(top)
    }

    /// Frees a used block, merging it with free neighbours.
    pub fn free(&self, off: u64) -> Result<(), Error> {
        let word = self.word(off)?.load(Relaxed);
        let size = word & !FLAGS;
        if word & USED == 0 || size < MIN_BLOCK {
            return Err(Corrupt { what: "free of a block that is not in use", at: off }.into());
        }
        let top = self.v.top()?;
        let end = off.checked_add(size).filter(|&e| e <= top).ok_or(Corrupt { what: "block past the heap top", at: off })?;
        let mut start = off;
        let mut total = size;
        if word & PREV_FREE != 0 {
            let prev_size = self.v.map.word(off - 8, "footer")?.load(Relaxed);
            let prev = off.checked_sub(prev_size).ok_or(Corrupt { what: "footer", at: off })?;
            if self.free_size(prev)? != prev_size {
                return Err(Corrupt { what: "footer disagrees with the block before", at: off }.into());
            }
            self.unlink(prev, prev_size)?;
            start = prev;
            total += prev_size;
        }
        if end < top {
            let next_word = self.word(end)?.load(Relaxed);
            if next_word & USED == 0 {
                let next_size = next_word & !FLAGS;
                self.unlink(end, next_size)?;
                total += next_size;
            }
        }
        self.h().used.fetch_sub(size, Relaxed);
        if start + total == top {
            // Give the space back to `top` (one store commits it).
            self.h().top.store(start, Release);
            return Ok(());
        }
        self.word(start)?.store(total, Release);
        crash_point("heap.free");
        self.footer(start, total)?.store(total, Relaxed);
        self.link(start, total)?;
        self.set_prev_free(start + total, true)
    }

    /// The size of the free block at `off`, checked.
    fn free_size(&self, off: u64) -> Result<u64, Corrupt> {
        let word = self.word(off)?.load(Relaxed);
        let size = word & !FLAGS;
        if word & USED != 0 || size < MIN_BLOCK || off.checked_add(size).is_none_or(|e| e > self.v.capacity) {
            return Err(Corrupt { what: "free list holds a block that is not free", at: off });
        }
        Ok(size)
    }

    fn set_prev_free(&self, next: u64, free: bool) -> Result<(), Error> {
        if next < self.v.top()? {
            let w = self.word(next)?;
            if free {
                w.fetch_or(PREV_FREE, Relaxed);
            } else {
                w.fetch_and(!PREV_FREE, Relaxed);
            }
        }
        Ok(())
    }

    fn link(&self, off: u64, size: u64) -> Result<(), Corrupt> {
        let class = class_of(size);
        let head = &self.h().free_heads[class];
        let first = head.load(Relaxed);
        let l = self.links(off)?;
        l.next.store(first, Relaxed);
        l.prev.store(0, Relaxed);
        if first != 0 {
            self.links(first)?.prev.store(off, Relaxed);
        }
        head.store(off, Relaxed);
        self.h().nonempty[class / 64].fetch_or(1 << (class % 64), Relaxed);
        Ok(())
    }

    fn unlink(&self, off: u64, size: u64) -> Result<(), Corrupt> {
        let class = class_of(size);
        let l = self.links(off)?;
        let (next, prev) = (l.next.load(Relaxed), l.prev.load(Relaxed));
        if next != 0 {
            self.links(next)?.prev.store(prev, Relaxed);
        }
        if prev != 0 {
            self.links(prev)?.next.store(next, Relaxed);
        } else {
            self.h().free_heads[class].store(next, Relaxed);
            if next == 0 {
                self.h().nonempty[class / 64].fetch_and(!(1 << (class % 64)), Relaxed);
            }
        }
        Ok(())
    }

    /// Visits every block from `heap_off` to `top`: (offset, word, tag).
    pub fn walk(&self, mut f: impl FnMut(u64, u64, u64) -> Result<(), Error>) -> Result<(), Error> {
        let top = self.v.top()?;
        let mut off = self.v.heap_off;
        while off < top {
            let b = self.v.block(off)?;
            let word = b.word.load(Acquire);
            let size = word & !FLAGS;
            if size < MIN_BLOCK || !size.is_multiple_of(ALIGN) || off + size > top {
                return Err(Corrupt { what: "heap block with an impossible size", at: off }.into());
            }
            f(off, word, b.tag.load(Relaxed))?;
            off += size;
        }
        Ok(())
    }

    /// Rebuilds everything derived from the chain of blocks: free lists, footers, PREV_FREE
    /// bits, `used`, and merges runs of free blocks a dead holder left unmerged. Idempotent,
    /// so a holder that dies in here just leaves the work to the next.
    pub fn rebuild(&self) -> Result<(), Error> {
        let h = self.h();
        for head in &h.free_heads {
            head.store(0, Relaxed);
        }
        h.nonempty[0].store(0, Relaxed);
        h.nonempty[1].store(0, Relaxed);
        let mut used = 0;
        let mut run: Option<(u64, u64)> = None;
        self.walk(|off, word, _| {
            if word & USED == 0 {
                run = Some(match run {
                    Some((start, size)) => (start, size + (word & !FLAGS)),
                    None => (off, word & !FLAGS),
                });
                return Ok(());
            }
            used += word & !FLAGS;
            let prev_free = match run.take() {
                Some((start, size)) => {
                    self.close_run(start, size)?;
                    PREV_FREE
                }
                None => 0,
            };
            let w = self.word(off)?;
            w.store((w.load(Relaxed) & !PREV_FREE) | prev_free, Relaxed);
            Ok(())
        })?;
        if let Some((start, _)) = run {
            h.top.store(start, Release);
        }
        h.used.store(used, Relaxed);
        Ok(())
    }

    /// For the checker: a free block's footer, its list links, and the `used` figure.
    pub fn footer_of(&self, off: u64, size: u64) -> Result<u64, Corrupt> {
        Ok(self.footer(off, size)?.load(Relaxed))
    }

    pub fn links_of(&self, off: u64) -> Result<(u64, u64), Corrupt> {
        let l = self.links(off)?;
        Ok((l.next.load(Relaxed), l.prev.load(Relaxed)))
    }

    pub fn used(&self) -> u64 {
        self.h().used.load(Relaxed)
    }

    fn close_run(&self, start: u64, size: u64) -> Result<(), Corrupt> {
        self.word(start)?.store(size, Release);
        self.footer(start, size)?.store(size, Relaxed);
        self.link(start, size)
    }
}

