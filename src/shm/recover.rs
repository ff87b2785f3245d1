//! Repair of a dict whose lock's holder died mid-operation.
//!
//! Every change to a dict commits with one store (a bucket, the table root, `live`), so the
//! dict's published state is always whole: the old value or the new one, never half of one.
//! What a dead holder can leave behind is only
//! * derived figures out of step (`len`, `bytes`, the table's `used`, `next_seq`): recounted;
//! * blocks it allocated and never published, or unpublished and never freed: every block
//!   carries the id of the dict it was allocated for, so a walk of the heap finds the ones
//!   tagged with this dict that its table does not reach, and frees them. Only a holder of
//!   this dict's lock allocates for it, and we hold that lock, so none of them is in use.
//!
//! The VM's read cache needs nothing: a change to what it may cache is published only after
//! the VM forgot it (see `handle`), so no committed change is unknown to it.
//!
//! Recovery is idempotent: if this process dies in here too, the lock stays marked and the
//! next locker starts over.

use super::dict::Locked;
use super::layout::*;
use super::Error;
use std::collections::HashSet;
use std::sync::atomic::Ordering::*;

/// Repairs the locked slot `d` (live or not).
pub fn dict(d: &Locked<'_>) -> Result<(), Error> {
    let live = d.slot.live.load(Acquire) == 1;
    let mut reachable = HashSet::new();
    if live {
        recount(d, &mut reachable)?;
        keep_spare(d, &mut reachable);
    } else {
        // A destroy that died after its commit: finish it.
        d.slot.table.store(0, Release);
        d.slot.spare.store(0, Relaxed);
        d.slot.len.store(0, Relaxed);
        d.slot.bytes.store(0, Relaxed);
    }
    sweep(d, &reachable)?;
    if !live {
        d.slot.any_cached.store(0, Relaxed);
    }
    Ok(())
}

/// Recounts a live dict's figures from its table, collecting the blocks it reaches.
fn recount(d: &Locked<'_>, reachable: &mut HashSet<u64>) -> Result<(), Error> {
    let Some(t) = d.table()? else {
        d.slot.len.store(0, Relaxed);
        d.slot.bytes.store(0, Relaxed);
        return Ok(());
    };
    reachable.insert(t.block);
    let (mut len, mut bytes, mut used) = (0, 0, 0);
    let mut next_seq = d.slot.next_seq.load(Relaxed);
    for i in 0..t.cap {
        let bucket = t.bucket(d, i)?;
        let w = bucket.load(Acquire);
        if w == EMPTY {
            continue;
        }
        used += 1;
        if w == TOMBSTONE {
            continue;
        }
        match d.entry(bucket_block(w)) {
            Ok(e) => {
                reachable.insert(e.block);
                len += 1;
                bytes += e.size();
                next_seq = next_seq.max(e.seq() + 1);
            }
            // Not something a crash leaves (entries are published whole): the mapping was
            // overwritten. Drop the unreadable entry rather than fail on it forever.
            Err(_) => bucket.store(TOMBSTONE, Release),
        }
    }
    t.head.used.store(used, Relaxed);
    d.slot.len.store(len, Relaxed);
    d.slot.bytes.store(bytes, Relaxed);
    d.slot.next_seq.store(next_seq, Relaxed);
    Ok(())
}

/// Keeps the dict's spare block if it is one of its blocks (else forgets it).
fn keep_spare(d: &Locked<'_>, reachable: &mut HashSet<u64>) {
    let spare = d.slot.spare.load(Relaxed);
    if spare != 0 && !reachable.contains(&spare) && d.v.used_block(spare, d.id, "spare").is_ok() {
        reachable.insert(spare);
    } else {
        d.slot.spare.store(0, Relaxed);
    }
}

/// Frees every block tagged with this dict's id that its table does not reach.
fn sweep(d: &Locked<'_>, reachable: &HashSet<u64>) -> Result<(), Error> {
    let heap = d.v.heap()?;
    let mut lost = Vec::new();
    heap.walk(|off, word, tag| {
        if word & USED != 0 && tag == d.id && !reachable.contains(&off) {
            lost.push(off);
        }
        Ok(())
    })?;
    for off in lost {
        heap.free(off)?;
    }
    Ok(())
}
