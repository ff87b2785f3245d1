//! Unit tests of the store: every operation and its edges, in one process.

use crate::shm::Ungated;
use super::layout::{entry_block_size, OWNER_MAX};
use super::*;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

/// A store file under /dev/shm (or the temp dir), removed when dropped.
pub struct TempStore {
    pub path: PathBuf,
    pub store: Store,
}

impl Drop for TempStore {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

pub fn temp_path(tag: &str) -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = if Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    dir.join(format!("pyport-shm-test-{}-{}-{tag}", std::process::id(), N.fetch_add(1, Ordering::Relaxed)))
}

pub fn temp_store(size: u64) -> TempStore {
    let path = temp_path("t");
    let store = Store::create(&path, size, 7).expect("create store");
    TempStore { path, store }
}

pub fn owner(n: u32) -> Vec<u8> {
    // The shape of a NEW_PID_EXT (without the version byte): node atom, id, serial, creation.
    let mut o = vec![88, 119, 9];
    o.extend_from_slice(b"test@host");
    o.extend_from_slice(&n.to_be_bytes());
    o.extend_from_slice(&[0, 0, 0, 0, 0, 0, 0, 1]);
    o
}

pub fn assert_clean(store: &Store) {
    let problems = store.check();
    assert!(problems.is_empty(), "check found: {problems:#?}");
}

fn keys_of(d: &DictRef) -> Vec<Vec<u8>> {
    d.keys().unwrap()
}

#[test]
fn set_get_contains_del_take_len() {
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    assert_eq!(d.get(b"k").unwrap(), None);
    let v1 = d.set(b"k", b"one", &Ungated).unwrap();
    assert_eq!(d.get(b"k").unwrap(), Some((b"one".to_vec(), v1)));
    assert!(d.contains(b"k").unwrap() && !d.contains(b"x").unwrap());
    let v2 = d.set(b"k", b"two", &Ungated).unwrap();
    assert!(v2 > v1, "versions increase");
    assert_eq!(d.len().unwrap(), 1);
    assert_eq!(d.take(b"k", &Ungated).unwrap(), Some((b"two".to_vec(), v2)));
    assert_eq!(d.take(b"k", &Ungated).unwrap(), None);
    d.set(b"k", b"three", &Ungated).unwrap();
    assert!(d.del(b"k", &Ungated).unwrap());
    assert!(!d.del(b"k", &Ungated).unwrap());
    assert_eq!(d.len().unwrap(), 0);
    assert_clean(&t.store);
}

#[test]
fn empty_key_and_empty_value_are_ordinary() {
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    d.set(b"", b"empty key", &Ungated).unwrap();
    d.set(b"empty value", b"", &Ungated).unwrap();
    assert_eq!(d.get(b"").unwrap().unwrap().0, b"empty key");
    assert_eq!(d.get(b"empty value").unwrap().unwrap().0, b"");
    assert_eq!(keys_of(&d), vec![b"".to_vec(), b"empty value".to_vec()]);
    assert_eq!(t.store.stats().bytes, 9 + 11);
    assert_clean(&t.store);
}

#[test]
fn keys_keep_insertion_order_and_overwrite_keeps_place() {
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    for k in ["b", "a", "c"] {
        d.set(k.as_bytes(), k.as_bytes(), &Ungated).unwrap();
    }
    d.set(b"b", b"B", &Ungated).unwrap();
    d.del(b"a", &Ungated).unwrap();
    d.set(b"a", b"A", &Ungated).unwrap();
    assert_eq!(keys_of(&d), vec![b"b".to_vec(), b"c".to_vec(), b"a".to_vec()]);
    assert_eq!(d.items().unwrap()[0], (b"b".to_vec(), b"B".to_vec()));
    let s = t.store.stats();
    assert_eq!((s.dicts, s.keys, s.bytes), (1, 3, 6));
}

#[test]
fn order_survives_growth_and_tombstone_rehash() {
    let t = temp_store(4 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    let mut model: Vec<Vec<u8>> = Vec::new();
    for round in 0..20u32 {
        for i in 0..50u32 {
            let k = format!("k{}", (i * 7 + round * 13) % 120).into_bytes();
            if (i + round) % 3 == 0 {
                if d.del(&k, &Ungated).unwrap() {
                    model.retain(|m| m != &k);
                }
            } else {
                d.set(&k, &round.to_le_bytes(), &Ungated).unwrap();
                if !model.contains(&k) {
                    model.push(k);
                }
            }
        }
        assert_eq!(keys_of(&d), model, "round {round}");
    }
    assert_clean(&t.store);
}

#[test]
fn clear_empties_and_the_dict_stays_usable() {
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    for i in 0..100u32 {
        d.set(&i.to_le_bytes(), b"v", &Ungated).unwrap();
    }
    let used_before = t.store.stats().used;
    d.clear(&Ungated).unwrap();
    assert_eq!((d.len().unwrap(), keys_of(&d).len()), (0, 0));
    assert!(t.store.stats().used < used_before);
    d.set(b"again", b"v", &Ungated).unwrap();
    assert_eq!(keys_of(&d), vec![b"again".to_vec()]);
    assert_clean(&t.store);
}

#[test]
fn update_stores_or_keeps_and_answers() {
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    let incr = |cur: Option<&[u8]>| {
        let n = cur.map_or(0, |b| u64::from_le_bytes(b.try_into().unwrap())) + 1;
        Update { store: Some(n.to_le_bytes()), answer: n }
    };
    assert_eq!(d.update(b"c", &Ungated, incr).unwrap(), 1);
    assert_eq!(d.update(b"c", &Ungated, incr).unwrap(), 2);
    let seen = d.update(b"c", &Ungated, |cur| Update::<Vec<u8>, _> { store: None, answer: cur.map(<[u8]>::to_vec) }).unwrap();
    assert_eq!(seen, Some(2u64.to_le_bytes().to_vec()));
    assert!(d.update(b"absent", &Ungated, |cur| Update::<Vec<u8>, _> { store: None, answer: cur.is_none() }).unwrap());
    assert!(!d.contains(b"absent").unwrap(), "keeping nothing stores nothing");
}

#[test]
fn replace_if_version_is_a_compare_and_swap() {
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    assert!(d.replace_if_version(b"k", None, b"first", &Ungated).unwrap(), "absent, as expected");
    assert!(!d.replace_if_version(b"k", None, b"second", &Ungated).unwrap(), "present now");
    let (_, v) = d.get(b"k").unwrap().unwrap();
    d.set(b"k", b"first", &Ungated).unwrap();
    assert!(!d.replace_if_version(b"k", Some(v), b"x", &Ungated).unwrap(), "same bytes, newer write: stale");
    let (_, v) = d.get(b"k").unwrap().unwrap();
    assert!(d.replace_if_version(b"k", Some(v), b"x", &Ungated).unwrap());
    assert_eq!(d.get(b"k").unwrap().unwrap().0, b"x");
    d.del(b"k", &Ungated).unwrap();
    assert!(!d.replace_if_version(b"k", Some(v), b"y", &Ungated).unwrap(), "gone");
}

/// A gate that records what it is asked to make the VM forget, and may refuse.
#[derive(Default)]
pub struct Recording {
    pub seen: Mutex<Vec<(u64, [u8; 16], Option<Vec<u8>>)>>,
    pub refuse: std::sync::atomic::AtomicBool,
}

impl Gate for Recording {
    fn before_change(&self, what: Invalidation<'_>) -> Result<(), Error> {
        self.seen.lock().unwrap().push(match what {
            Invalidation::Key { dict, token, key } => (dict, token, Some(key.to_vec())),
            Invalidation::Dict { dict, token } => (dict, token, None),
        });
        if self.refuse.load(std::sync::atomic::Ordering::Relaxed) {
            Err(Error::Interrupted)
        } else {
            Ok(())
        }
    }
}

/// A gated change of an entry the VM may cache waits for the gate once, before the change;
/// changes of entries it cannot cache do not; an ungated change never does. A value changed
/// since it was read is not flagged.
#[test]
fn a_gated_change_of_a_cached_entry_waits_once() {
    let t = temp_store(1 << 20);
    let g = Recording::default();
    let d = t.store.create_dict(&owner(1)).unwrap();
    let count = || g.seen.lock().unwrap().len();
    d.set(b"k", b"1", &g).unwrap();
    d.set(b"k", b"2", &g).unwrap();
    assert_eq!(count(), 0, "nothing cached, nothing to forget");
    let (_, v) = d.get(b"k").unwrap().unwrap();
    let mut replied = false;
    assert!(d.mark_cached_if_version(b"k", v, || replied = true) && replied);
    d.set(b"k", b"3", &g).unwrap();
    d.set(b"k", b"4", &g).unwrap();
    assert_eq!(*g.seen.lock().unwrap(), vec![(d.id(), *d.token(), Some(b"k".to_vec()))]);
    assert!(!d.mark_cached_if_version(b"k", v, || panic!("stale value sent for caching")));
    for change in 0..4 {
        let (_, v) = d.get(b"k").unwrap().unwrap();
        assert!(d.mark_cached_if_version(b"k", v, || ()));
        match change {
            0 => assert!(d.del(b"k", &g).unwrap()),
            1 => assert!(d.replace_if_version(b"k", Some(v), b"5", &g).unwrap()),
            2 => assert_eq!(d.update(b"k", &g, |_| Update { store: Some(b"6"), answer: 1 }).unwrap(), 1),
            _ => assert_eq!(d.take(b"k", &g).unwrap().unwrap().0, b"6"),
        }
        if change == 0 {
            d.set(b"k", b"4", &g).unwrap();
        }
    }
    assert_eq!(count(), 5);
    // Ungated (Erlang-side: the VM forgot the key itself): straight through.
    d.set(b"k", b"7", &g).unwrap();
    let (_, v) = d.get(b"k").unwrap().unwrap();
    assert!(d.mark_cached_if_version(b"k", v, || ()));
    d.set(b"k", b"7b", &Ungated).unwrap();
    assert_eq!(count(), 5);
    let (_, v) = d.get(b"k").unwrap().unwrap();
    assert!(d.mark_cached_if_version(b"k", v, || ()));
    d.clear(&g).unwrap();
    assert_eq!(g.seen.lock().unwrap().last().map(|s| s.2.clone()), Some(None), "clear forgets the whole dict");
    d.clear(&g).unwrap();
    assert_eq!(count(), 6, "a second clear has nothing cached to forget");
    d.set(b"k", b"8", &g).unwrap();
    let (_, v) = d.get(b"k").unwrap().unwrap();
    assert!(d.mark_cached_if_version(b"k", v, || ()));
    t.store.destroy(d.id(), d.token(), &g).unwrap();
    assert_eq!(g.seen.lock().unwrap().last().map(|s| (s.0, s.2.clone())), Some((d.id(), None)), "destroy forgets the whole dict");
    assert_eq!(count(), 7);
}

/// A gate that gives up leaves everything as it was, and the entry stays one a change must
/// wait for (its next change asks again).
#[test]
fn a_refused_gate_changes_nothing() {
    let t = temp_store(1 << 20);
    let g = Recording::default();
    let d = t.store.create_dict(&owner(1)).unwrap();
    d.set(b"k", b"1", &g).unwrap();
    let (_, v) = d.get(b"k").unwrap().unwrap();
    assert!(d.mark_cached_if_version(b"k", v, || ()));
    g.refuse.store(true, std::sync::atomic::Ordering::Relaxed);
    assert_eq!(d.set(b"k", b"2", &g), Err(Error::Interrupted));
    assert_eq!(d.del(b"k", &g), Err(Error::Interrupted));
    assert_eq!(d.clear(&g), Err(Error::Interrupted));
    assert_eq!(t.store.destroy(d.id(), d.token(), &g), Err(Error::Interrupted));
    assert_eq!(d.get(b"k").unwrap().map(|(b, _)| b), Some(b"1".to_vec()));
    g.refuse.store(false, std::sync::atomic::Ordering::Relaxed);
    let before = g.seen.lock().unwrap().len();
    d.set(b"k", b"2", &g).unwrap();
    assert_eq!(g.seen.lock().unwrap().len(), before + 1, "still one the VM may hold: asked again");
    assert_eq!(d.get(b"k").unwrap().map(|(b, _)| b), Some(b"2".to_vec()));
}

/// While a change waits for the VM (the gate runs with no lock held), nothing of the entry,
/// or of the dict for a whole-dict change, can be flagged cacheable, and other keys can be
/// read and changed.
#[test]
fn nothing_is_flagged_cacheable_while_a_change_waits() {
    struct Probe<'a> {
        d: &'a DictRef,
        flagged: Mutex<Vec<bool>>,
    }
    impl Gate for Probe<'_> {
        fn before_change(&self, what: Invalidation<'_>) -> Result<(), Error> {
            let d = self.d;
            d.set(b"other", b"x", &Ungated)?;
            let (_, vo) = d.get(b"other")?.ok_or(Error::Destroyed)?;
            let (_, vk) = d.get(b"k")?.ok_or(Error::Destroyed)?;
            let mut f = self.flagged.lock().unwrap();
            f.push(d.mark_cached_if_version(b"k", vk, || ()));
            if let Invalidation::Dict { .. } = what {
                f.push(d.mark_cached_if_version(b"other", vo, || ()));
            }
            Ok(())
        }
    }
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    let p = Probe { d: &d, flagged: Mutex::new(Vec::new()) };
    d.set(b"k", b"1", &Ungated).unwrap();
    let (_, v) = d.get(b"k").unwrap().unwrap();
    assert!(d.mark_cached_if_version(b"k", v, || ()));
    d.set(b"k", b"2", &p).unwrap();
    d.set(b"k", b"3", &Ungated).unwrap();
    let (_, v) = d.get(b"k").unwrap().unwrap();
    assert!(d.mark_cached_if_version(b"k", v, || ()));
    d.clear(&p).unwrap();
    assert_eq!(*p.flagged.lock().unwrap(), vec![false, false, false]);
    assert_eq!(d.len().unwrap(), 0);
}

#[test]
fn handles_are_checked_by_id_and_token() {
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    assert!(t.store.lookup(d.id(), d.token()).is_ok());
    let mut forged = *d.token();
    forged[15] ^= 1;
    assert_eq!(t.store.lookup(d.id(), &forged).err(), Some(Error::Destroyed));
    assert_eq!(t.store.lookup(d.id(), &d.token()[..15]).err(), Some(Error::Destroyed), "short token");
    assert_eq!(t.store.lookup(d.id() + (1 << 20), d.token()).err(), Some(Error::Destroyed), "unknown id, same slot");
    assert_eq!(t.store.lookup(d.id() + 1, d.token()).err(), Some(Error::Destroyed), "slot never used");
    assert_eq!(t.store.lookup(u64::MAX, d.token()).err(), Some(Error::Destroyed));
}

#[test]
fn destroy_is_idempotent_and_seen_through_held_references() {
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    d.set(b"k", b"v", &Ungated).unwrap();
    let other = t.store.lookup(d.id(), d.token()).unwrap();
    assert!(t.store.destroy(d.id(), d.token(), &Ungated).unwrap());
    assert!(!t.store.destroy(d.id(), d.token(), &Ungated).unwrap());
    assert!(other.is_destroyed() && d.is_destroyed());
    assert_eq!(other.get(b"k"), Err(Error::Destroyed));
    assert_eq!(other.set(b"k", b"v", &Ungated), Err(Error::Destroyed));
    assert_eq!(other.keys(), Err(Error::Destroyed));
    assert_eq!(other.clear(&Ungated), Err(Error::Destroyed));
    assert!(!other.mark_cached_if_version(b"k", 1, || panic!("sent for a destroyed dict")));
    assert_eq!(t.store.lookup(d.id(), d.token()).err(), Some(Error::Destroyed));
    let s = t.store.stats();
    assert_eq!((s.dicts, s.keys, s.bytes, s.used), (0, 0, 0, 0));
    assert_clean(&t.store);
}

#[test]
fn ids_are_never_reused_even_when_slots_are() {
    let t = temp_store(1 << 20);
    let a = t.store.create_dict(&owner(1)).unwrap();
    t.store.destroy(a.id(), a.token(), &Ungated).unwrap();
    let b = t.store.create_dict(&owner(1)).unwrap();
    assert_ne!(a.id(), b.id());
    assert_eq!(a.id() & ((1 << 20) - 1), b.id() & ((1 << 20) - 1), "the slot was reused");
    assert_ne!(a.token(), b.token());
    assert_eq!(a.get(b"k"), Err(Error::Destroyed), "an old reference never reaches the new dict");
    assert_eq!(t.store.lookup(a.id(), b.token()).err(), Some(Error::Destroyed));
}

#[test]
fn owner_death_destroys_only_its_dicts_and_give_away_moves_them() {
    let t = temp_store(1 << 20);
    let s = &t.store;
    let a = s.create_dict(&owner(1)).unwrap();
    let b = s.create_dict(&owner(1)).unwrap();
    let c = s.create_dict(&owner(2)).unwrap();
    assert_eq!(s.give_away(b.id(), b.token(), &owner(2), Some(&owner(3))), Err(Error::NotOwner));
    s.give_away(b.id(), b.token(), &owner(2), Some(&owner(1))).unwrap();
    assert_eq!(s.owner(b.id(), b.token()).unwrap(), owner(2));
    assert_eq!(s.drop_owner(&owner(1), &Ungated).unwrap(), vec![a.id()]);
    assert!(a.is_destroyed() && !b.is_destroyed() && !c.is_destroyed());
    let mut gone = s.drop_owner(&owner(2), &Ungated).unwrap();
    gone.sort();
    assert_eq!(gone, vec![b.id(), c.id()]);
    assert!(s.drop_owner(&owner(2), &Ungated).unwrap().is_empty());
    assert_eq!(s.give_away(c.id(), c.token(), &owner(3), None), Err(Error::Destroyed));
    assert_eq!(s.stats().dicts, 0);
}

#[test]
fn give_away_without_a_caller_and_owner_size_limit() {
    let t = temp_store(1 << 20);
    let s = &t.store;
    let longest = vec![7u8; OWNER_MAX];
    let d = s.create_dict(&longest).unwrap();
    assert_eq!(s.owner(d.id(), d.token()).unwrap(), longest);
    assert_eq!(s.create_dict(&[7u8; OWNER_MAX + 1]).err(), Some(Error::OwnerTooLong));
    assert_eq!(s.give_away(d.id(), d.token(), &[1u8; OWNER_MAX + 1], None), Err(Error::OwnerTooLong));
    s.give_away(d.id(), d.token(), &owner(9), None).unwrap();
    assert_eq!(s.owner(d.id(), d.token()).unwrap(), owner(9));
    assert_eq!(s.drop_owner(&longest, &Ungated).unwrap(), Vec::<u64>::new(), "the old owner owns nothing");
    // Owners that share a prefix or differ only in length are different owners.
    let e = s.create_dict(&owner(9)[..10]).unwrap();
    assert_eq!(s.drop_owner(&owner(9), &Ungated).unwrap(), vec![d.id()]);
    assert!(!e.is_destroyed());
}

/// The room left at the top of a heap without free blocks.
fn room(s: &Store) -> u64 {
    let st = s.stats();
    st.capacity - st.used
}

#[test]
fn a_write_that_does_not_fit_fails_alone_at_exactly_the_bound() {
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    d.set(b"a", b"kept", &Ungated).unwrap();
    let left = room(&t.store);
    // Block header (16) + entry head (40) + key (1) + value = `left`, a multiple of 16.
    let fits = (left - 16 - 40 - 1) as usize;
    assert_eq!(entry_block_size(1, fits as u64).unwrap(), left, "the bound is exactly reachable");
    assert_eq!(d.set(b"b", &vec![1u8; fits + 1], &Ungated), Err(Error::Full), "one byte past the bound");
    assert_eq!(d.get(b"a").unwrap().unwrap().0, b"kept", "nothing else affected");
    assert_clean(&t.store);
    d.set(b"b", &vec![1u8; fits], &Ungated).unwrap();
    assert_eq!(room(&t.store), 0);
    assert_eq!(d.set(b"c", b"", &Ungated), Err(Error::Full));
    assert_eq!(d.set(b"a", b"kept too", &Ungated), Err(Error::Full), "a replacement needs room for the new value first");
    assert_eq!(d.get(b"a").unwrap().unwrap().0, b"kept");
    assert_eq!(d.len().unwrap(), 2);
    assert!(d.del(b"b", &Ungated).unwrap());
    d.set(b"c", b"fits again", &Ungated).unwrap();
    assert_clean(&t.store);
}

#[test]
fn space_is_reused_after_deletes_and_coalesces() {
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    let mut n = 0u32;
    while d.set(&n.to_le_bytes(), &[5u8; 100], &Ungated).is_ok() {
        n += 1;
    }
    assert!(n > 5000, "a MiB holds thousands of small entries ({n})");
    for round in 0..3 {
        for i in 0..n {
            assert!(d.del(&i.to_le_bytes(), &Ungated).unwrap(), "round {round}");
        }
        assert_clean(&t.store);
        // Small blocks freed side by side merge: one value of a third of the heap fits (the
        // table, still there, splits the free space in two at worst).
        let big = vec![9u8; (room(&t.store) / 3) as usize];
        d.set(b"big", &big, &Ungated).unwrap();
        assert!(d.del(b"big", &Ungated).unwrap());
        for i in 0..n {
            d.set(&i.to_le_bytes(), &[5u8; 100], &Ungated).unwrap_or_else(|e| panic!("round {round} key {i}: {e:?}"));
        }
    }
    assert_clean(&t.store);
}

#[test]
fn dict_slots_run_out_with_full_and_come_back() {
    let t = temp_store(1 << 20);
    let max = t.store.stats().max_dicts;
    let dicts: Vec<DictRef> = (0..max).map(|_| t.store.create_dict(&owner(1)).unwrap()).collect();
    assert_eq!(t.store.create_dict(&owner(1)).err(), Some(Error::Full));
    t.store.destroy(dicts[3].id(), dicts[3].token(), &Ungated).unwrap();
    let again = t.store.create_dict(&owner(1)).unwrap();
    assert!(dicts.iter().all(|d| d.id() != again.id()));
    assert_clean(&t.store);
}

#[test]
fn large_values_round_trip() {
    let t = temp_store(16 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    let big: Vec<u8> = (0..(4 << 20)).map(|i: u32| (i * 31 % 251) as u8).collect();
    d.set(b"big", &big, &Ungated).unwrap();
    d.set(&big[..70_000], b"big key", &Ungated).unwrap();
    assert_eq!(d.get(b"big").unwrap().unwrap().0, big);
    assert_eq!(d.get(&big[..70_000]).unwrap().unwrap().0, b"big key");
    assert_clean(&t.store);
}

#[test]
fn a_second_mapping_sees_the_same_dicts() {
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    d.set(b"k", b"v", &Ungated).unwrap();
    let other = Store::open(&t.path).unwrap();
    assert_eq!(other.generation(), 7);
    let d2 = other.lookup(d.id(), d.token()).unwrap();
    assert_eq!(d2.get(b"k").unwrap().unwrap().0, b"v");
    d2.set(b"k2", b"v2", &Ungated).unwrap();
    assert_eq!(keys_of(&d), vec![b"k".to_vec(), b"k2".to_vec()]);
    assert_eq!(other.stats(), t.store.stats());
}

#[test]
fn create_and_open_refuse_what_they_cannot_use() {
    let t = temp_store(1 << 20);
    assert!(matches!(Store::create(&t.path, 1 << 20, 1), Err(OpenError::Io(e)) if e.kind() == std::io::ErrorKind::AlreadyExists));
    let mode = std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&t.path).unwrap().permissions());
    assert_eq!(mode & 0o777, 0o600);
    let small = temp_path("small");
    assert!(matches!(Store::create(&small, 8192, 1), Err(OpenError::TooSmall)));
    assert!(!small.exists());
    let junk = temp_path("junk");
    std::fs::write(&junk, vec![0u8; 1 << 16]).unwrap();
    assert!(matches!(Store::open(&junk), Err(OpenError::Invalid(_))), "a file of zeros is no store");
    std::fs::write(&junk, b"short").unwrap();
    assert!(Store::open(&junk).is_err());
    let _ = std::fs::remove_file(&junk);
    assert!(matches!(Store::open(&temp_path("none")), Err(OpenError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound));
}

#[test]
fn open_or_create_creates_once() {
    let path = temp_path("ooc");
    let a = Store::open_or_create(&path, 1 << 20, 3).unwrap();
    let d = a.create_dict(&owner(1)).unwrap();
    let b = Store::open_or_create(&path, 1 << 21, 4).unwrap();
    assert_eq!(b.generation(), 3, "the existing store, not a new one");
    assert!(b.lookup(d.id(), d.token()).is_ok());
    let _ = std::fs::remove_file(&path);
}

/// A long random sequence of operations against a model, with the checker run often: what
/// the store answers is what a plain map in insertion order answers.
#[test]
fn random_operations_match_a_model() {
    let t = temp_store(2 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    let mut model: Vec<(Vec<u8>, Vec<u8>)> = Vec::new();
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    for step in 0..20_000 {
        let k = format!("key{}", next() % 300).into_bytes();
        let r = next();
        match r % 10 {
            0..=4 => {
                let v = vec![(r >> 8) as u8; (r >> 16) as usize % 600];
                match d.set(&k, &v, &Ungated) {
                    Ok(_) => match model.iter_mut().find(|(mk, _)| mk == &k) {
                        Some(e) => e.1 = v,
                        None => model.push((k, v)),
                    },
                    Err(Error::Full) => {}
                    Err(e) => panic!("{e:?}"),
                }
            }
            5..=6 => {
                let had = model.iter().position(|(mk, _)| mk == &k);
                assert_eq!(d.del(&k, &Ungated).unwrap(), had.is_some());
                if let Some(i) = had {
                    model.remove(i);
                }
            }
            7 => assert_eq!(d.get(&k).unwrap().map(|g| g.0), model.iter().find(|(mk, _)| mk == &k).map(|e| e.1.clone())),
            8 if r % 97 == 0 => {
                d.clear(&Ungated).unwrap();
                model.clear();
            }
            _ => assert_eq!(d.len().unwrap(), model.len()),
        }
        if step % 2000 == 0 {
            assert_clean(&t.store);
            assert_eq!(d.items().unwrap(), model);
        }
    }
    assert_eq!(d.items().unwrap(), model);
    let bytes: usize = model.iter().map(|(k, v)| k.len() + v.len()).sum();
    assert_eq!(t.store.stats().bytes, bytes);
    assert_clean(&t.store);
}

/// Overwriting a value with one of the same size takes the block the previous overwrite
/// gave up (the dict's spare): two blocks take turns, and the heap is not touched.
#[test]
fn same_size_overwrites_take_turns_with_the_spare_block() {
    let t = temp_store(1 << 20);
    let d = t.store.create_dict(&owner(1)).unwrap();
    let block_of = |d: &DictRef| t.store.inner.lock_dict(d.id()).unwrap().lookup(b"k").unwrap().unwrap().2.block;
    d.set(b"k", &[1; 30], &Ungated).unwrap();
    let first = block_of(&d);
    d.set(b"k", &[2; 30], &Ungated).unwrap();
    let second = block_of(&d);
    let used = t.store.stats().used;
    for i in 0..10u8 {
        d.set(b"k", &[i; 30], &Ungated).unwrap();
        assert_eq!(block_of(&d), if i % 2 == 0 { first } else { second });
    }
    assert_eq!(t.store.stats().used, used);
    d.set(b"k", &[0; 2000], &Ungated).unwrap();
    assert_clean(&t.store);
    d.clear(&Ungated).unwrap();
    assert_eq!(t.store.stats().used, 0, "clear gives the spare back too");
    assert_clean(&t.store);
}

/// The store's key hash is SipHash-1-3: the same as std's (zero-keyed) DefaultHasher at
/// every length around the 8-byte block boundaries.
#[test]
fn the_key_hash_is_siphash_1_3() {
    use std::hash::Hasher;
    let bytes: Vec<u8> = (0..70u8).collect();
    for len in 0..bytes.len() {
        let mut std_hash = std::collections::hash_map::DefaultHasher::new();
        std_hash.write(&bytes[..len]);
        assert_eq!(super::view::siphash13(0, 0, &bytes[..len]), std_hash.finish(), "length {len}");
    }
    assert_ne!(super::view::siphash13(1, 0, b"k"), super::view::siphash13(0, 0, b"k"), "the key matters");
}

