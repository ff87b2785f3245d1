//! What another process's stray writes do: the checker reports each kind of damage, and
//! operations that meet damage return `Corrupt` (or reach only what is intact), never panic
//! and never hang.

use crate::shm::Ungated;
use super::layout::{Slot, BLOCK_HEAD, USED};
use super::tests::{owner, temp_store, TempStore};
use super::{Error, Store};
use crate::shm::crash_child::Rng;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering::*;

fn filled() -> (TempStore, Vec<super::DictRef>) {
    let t = temp_store(1 << 20);
    let dicts: Vec<_> = (0..3).map(|n| t.store.create_dict(&owner(n)).unwrap()).collect();
    for (n, d) in dicts.iter().enumerate() {
        for i in 0..50 {
            d.set(format!("k{i}").as_bytes(), &vec![n as u8; i * 7], &Ungated).unwrap();
        }
    }
    (t, dicts)
}

fn slot_of(s: &Store, id: u64) -> &Slot {
    s.inner.v.slot(id & ((1 << 20) - 1)).unwrap()
}

fn reported(s: &Store, what: &str) {
    let problems = s.check();
    assert!(problems.iter().any(|p| p.contains(what)), "check() did not report {what:?}: {problems:#?}");
}

#[test]
fn check_reports_a_wrong_figure() {
    let (t, d) = filled();
    slot_of(&t.store, d[1].id()).len.fetch_add(1, Relaxed);
    reported(&t.store, "len recorded 51, counted 50");
}

#[test]
fn check_reports_a_leaked_block() {
    let (t, d) = filled();
    t.store.inner.v.heap().unwrap().alloc(100, d[0].id()).unwrap();
    reported(&t.store, "leaked block");
}

#[test]
fn check_reports_a_bucket_pointing_outside_the_heap_and_the_dict_says_corrupt() {
    let (t, d) = filled();
    let table = slot_of(&t.store, d[2].id()).table.load(Relaxed);
    let first_bucket = t.store.inner.v.map.word(table + BLOCK_HEAD + 16, "bucket").unwrap();
    let buckets_in_use = (0..64).map(|i| t.store.inner.v.map.word(table + BLOCK_HEAD + 16 + 8 * i, "b").unwrap()).find(|b| b.load(Relaxed) > 1).unwrap_or(first_bucket);
    buckets_in_use.store(0xffff_0000_0000_0002, Relaxed);
    reported(&t.store, "block offset out of the heap");
    assert!(matches!(d[2].keys(), Err(Error::Corrupt(_))));
    assert!(d[0].keys().is_ok(), "other dicts are unaffected");
}

#[test]
fn check_reports_a_broken_free_list_and_a_free_block_marked_used() {
    let (t, d) = filled();
    for i in (0..50).step_by(2) {
        d[0].del(format!("k{i}").as_bytes(), &Ungated).unwrap();
    }
    assert!(t.store.check().is_empty());
    let h = t.store.inner.v.header();
    let head = h.free_heads.iter().map(|f| f.load(Relaxed)).find(|&f| f != 0).unwrap();
    t.store.inner.v.block(head).unwrap().word.fetch_or(USED, Relaxed);
    reported(&t.store, "lists");
}

/// Random words written over the slots and the heap (never over a lock: a lock word that
/// names a live thread is a hang no store can defend against): nothing panics or hangs.
#[test]
fn random_scribbles_never_panic() {
    let mut rng = Rng(0xdead_beef);
    let mut detected = 0;
    for round in 0..300 {
        let (t, d) = filled();
        let v = &t.store.inner.v;
        let top = v.top().unwrap();
        for _ in 0..1 + rng.next() % 8 {
            // Where the data is: the used slots and the heap below its top.
            let off = v.slots_off + (rng.next() % (top - v.slots_off)) / 8 * 8;
            let in_slots = off < v.heap_off;
            if in_slots && (off - v.slots_off) % std::mem::size_of::<Slot>() as u64 <= 64 {
                continue;
            }
            let word = match rng.next() % 4 {
                0 => rng.next(),
                1 => rng.next() % v.capacity,
                2 => 0,
                _ => rng.next() % 4096,
            };
            v.map.word(off, "scribble").unwrap().store(word, Relaxed);
        }
        if !t.store.check().is_empty() {
            detected += 1;
        }
        let outcome = catch_unwind(AssertUnwindSafe(|| exercise(&t.store, &d)));
        assert!(outcome.is_ok(), "round {round}: an operation panicked on a scribbled mapping");
    }
    // Many scribbles land in padding or key bytes; enough must have hit structure.
    assert!(detected >= 30, "only {detected} of 300 scribbled stores were found damaged");
}

/// Every operation once, ignoring what they answer.
fn exercise(s: &Store, dicts: &[super::DictRef]) {
    let _ = s.check();
    for d in dicts {
        let _ = d.get(b"k3");
        let _ = d.set(b"k3", b"new value", &Ungated);
        let _ = d.set(b"fresh", &[1; 300], &Ungated);
        let _ = d.del(b"k5", &Ungated);
        let _ = d.take(b"k7", &Ungated);
        let _ = d.keys();
        let _ = d.items();
        let _ = d.len();
        let _ = d.replace_if_version(b"k9", None, b"x", &Ungated);
        let _ = d.mark_cached_if_version(b"k9", 1, || ());
    }
    let _ = dicts[0].clear(&Ungated);
    let _ = s.drop_owner(&owner(1), &Ungated);
    let _ = s.give_away(dicts[2].id(), dicts[2].token(), &owner(5), None);
    let _ = s.destroy(dicts[2].id(), dicts[2].token(), &Ungated);
    let _ = s.create_dict(&owner(9)).map(|d| d.set(b"a", b"b", &Ungated));
    let _ = s.stats();
    let _ = s.check();
}
