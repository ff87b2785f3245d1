//! Multi-thread stress tests against models: many threads, through two mappings of the same
//! file, on shared and private keys, with dicts created and destroyed under their feet.

use crate::shm::Ungated;
use super::crash_child::Rng;
use super::tests::{assert_clean, owner, temp_store};
use super::{DictRef, Error, Gate, Invalidation, Store, Update};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

fn incr(d: &DictRef, key: &[u8]) -> u64 {
    d.update(key, &Ungated, |cur| {
        let n = cur.and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes) + 1;
        Update { store: Some(n.to_le_bytes()), answer: n }
    })
    .unwrap()
}

fn counter(d: &DictRef, key: &[u8]) -> u64 {
    d.get(key).unwrap().map_or(0, |(b, _)| u64::from_le_bytes(b.try_into().unwrap()))
}

/// Each thread owns some keys of a shared dict and keeps a model of them; all threads bump
/// shared counters and compare-and-swap counters. Half of them go through a second mapping.
#[test]
fn threads_on_two_mappings_agree_with_their_models() {
    const THREADS: u64 = 4;
    const STEPS: u64 = 20_000;
    let t = temp_store(32 << 20);
    let second = Store::open(&t.path).unwrap();
    let d = t.store.create_dict(&owner(1)).unwrap();
    let barrier = Arc::new(Barrier::new(THREADS as usize));
    let workers: Vec<_> = (0..THREADS)
        .map(|n| {
            let store = if n % 2 == 0 { t.store.clone() } else { second.clone() };
            let d = store.lookup(d.id(), d.token()).unwrap();
            let barrier = barrier.clone();
            thread::spawn(move || {
                barrier.wait();
                worker(n, &d)
            })
        })
        .collect();
    let mut incrs = 0;
    for w in workers {
        let (model, n) = w.join().unwrap();
        incrs += n;
        for (k, v) in model {
            assert_eq!(d.get(&k).unwrap().map(|g| g.0), Some(v));
        }
    }
    assert_eq!(counter(&d, b"shared"), incrs, "no increment lost");
    assert_eq!(counter(&d, b"cas"), THREADS * STEPS / 10, "no compare-and-swap lost");
    assert_clean(&t.store);

    fn worker(n: u64, d: &DictRef) -> (HashMap<Vec<u8>, Vec<u8>>, u64) {
        let mut rng = Rng(n * 7919 + 1);
        let mut model = HashMap::new();
        let mut incrs = 0;
        for step in 0..STEPS {
            let r = rng.next();
            let key = format!("t{n}-{}", r % 64).into_bytes();
            match r % 10 {
                0..=3 => {
                    let v = vec![n as u8; (r >> 8) as usize % 400];
                    d.set(&key, &v, &Ungated).unwrap();
                    model.insert(key, v);
                }
                4 => {
                    assert_eq!(d.del(&key, &Ungated).unwrap(), model.remove(&key).is_some());
                }
                5..=6 => {
                    incr(d, b"shared");
                    incrs += 1;
                }
                _ => assert_eq!(d.get(&key).unwrap().map(|g| g.0), model.get(&key).cloned()),
            }
            if step % 10 == 0 {
                loop {
                    let seen = d.get(b"cas").unwrap();
                    let next = seen.as_ref().map_or(0, |(b, _)| u64::from_le_bytes(b.as_slice().try_into().unwrap())) + 1;
                    if d.replace_if_version(b"cas", seen.map(|s| s.1), &next.to_le_bytes(), &Ungated).unwrap() {
                        break;
                    }
                }
            }
        }
        (model, incrs)
    }
}

/// Dicts are created and destroyed while other threads use references to them: a reference
/// reaches its own dict or nothing, never the next dict of the same slot.
#[test]
fn stale_references_never_reach_a_later_dict() {
    let t = temp_store(8 << 20);
    let current: Arc<Mutex<Option<DictRef>>> = Default::default();
    let stop = Arc::new(AtomicBool::new(false));
    let readers: Vec<_> = (0..3)
        .map(|_| {
            let (current, stop) = (current.clone(), stop.clone());
            thread::spawn(move || {
                let (mut reached, mut gone) = (0u64, 0u64);
                while !stop.load(Relaxed) {
                    let Some(d) = current.lock().unwrap().clone() else { continue };
                    match d.get(b"me") {
                        Ok(Some((v, _))) => {
                            assert_eq!(v, d.id().to_le_bytes(), "a reference reached another dict");
                            reached += 1;
                        }
                        Ok(None) => {}
                        Err(Error::Destroyed) => gone += 1,
                        Err(e) => panic!("{e:?}"),
                    }
                    if let Err(e) = d.set(b"other", b"x", &Ungated) {
                        assert_eq!(e, Error::Destroyed);
                    }
                }
                (reached, gone)
            })
        })
        .collect();
    for _ in 0..3000 {
        let d = t.store.create_dict(&owner(1)).unwrap();
        d.set(b"me", &d.id().to_le_bytes(), &Ungated).unwrap();
        *current.lock().unwrap() = Some(d.clone());
        thread::yield_now();
        t.store.destroy(d.id(), d.token(), &Ungated).unwrap();
    }
    stop.store(true, Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert_eq!(t.store.stats().dicts, 0);
    assert_clean(&t.store);
}

/// The VM's read cache, simulated as the Erlang side keeps it (`pyport_sd_cache`): a read
/// takes a stamp from a clock before it is sent; its cacheable reply reaches the cache later,
/// after any delay; a gated change's invalidation takes a stamp and raises its key's bucket
/// before the change is published; an entry is answered only if its stamp is above its
/// bucket. Whatever the interleaving, a writer that has finished a change never reads an older
/// version from the cache afterwards.
#[test]
fn a_cache_kept_as_the_vm_keeps_it_never_answers_older_than_a_finished_change() {
    use std::sync::atomic::AtomicU64;
    #[derive(Default)]
    struct Vm {
        clock: AtomicU64,
        buckets: Mutex<HashMap<Vec<u8>, u64>>,
        // key => (stamp of the read, version)
        cache: Mutex<HashMap<Vec<u8>, (u64, u64)>>,
        replies: Mutex<Vec<(Vec<u8>, u64, u64)>>,
    }
    impl Vm {
        fn lookup(&self, key: &[u8]) -> Option<u64> {
            let (stamp, version) = *self.cache.lock().unwrap().get(key)?;
            let bucket = self.buckets.lock().unwrap().get(key).copied().unwrap_or(0);
            (stamp > bucket).then_some(version)
        }
        fn deliver_one(&self) {
            let r = self.replies.lock().unwrap().pop();
            if let Some((k, stamp, v)) = r {
                self.cache.lock().unwrap().insert(k, (stamp, v));
            }
        }
    }
    impl Gate for Vm {
        fn before_change(&self, what: Invalidation<'_>) -> Result<(), Error> {
            let stamp = self.clock.fetch_add(1, SeqCst) + 1;
            match what {
                Invalidation::Key { key, .. } => {
                    self.buckets.lock().unwrap().insert(key.to_vec(), stamp);
                    self.cache.lock().unwrap().remove(key);
                }
                Invalidation::Dict { .. } => {
                    let mut b = self.buckets.lock().unwrap();
                    for k in 0..4u8 {
                        b.insert(vec![b'k', k], stamp);
                    }
                    self.cache.lock().unwrap().clear();
                }
            }
            Ok(())
        }
    }
    let t = temp_store(8 << 20);
    let vm = Arc::new(Vm::default());
    let d = t.store.create_dict(&owner(1)).unwrap();
    let writers: Vec<_> = (0..2u64)
        .map(|n| {
            let (d, vm) = (d.clone(), vm.clone());
            thread::spawn(move || {
                let mut rng = Rng(n + 11);
                for i in 0..10_000u64 {
                    let key = [b'k', (rng.next() % 4) as u8];
                    if n == 0 && i % 1000 == 1 {
                        d.clear(&*vm).unwrap();
                        continue;
                    }
                    let version = d.set(&key, &i.to_le_bytes(), &*vm).unwrap();
                    if let Some(cached) = vm.lookup(&key) {
                        assert!(cached >= version, "after writing version {version} of {key:?} the cache answers {cached}");
                    }
                }
            })
        })
        .collect();
    let readers: Vec<_> = (0..2u64)
        .map(|n| {
            let (d, vm) = (d.clone(), vm.clone());
            thread::spawn(move || {
                let mut rng = Rng(n + 101);
                for i in 0..20_000u64 {
                    let key = [b'k', (i % 4) as u8];
                    let stamp = vm.clock.fetch_add(1, SeqCst) + 1;
                    if let Some((_, v)) = d.get(&key).unwrap() {
                        d.mark_cached_if_version(&key, v, || vm.replies.lock().unwrap().push((key.to_vec(), stamp, v)));
                    }
                    // Replies reach the cache late, in any order.
                    if rng.next() % 3 == 0 {
                        vm.deliver_one();
                    }
                }
            })
        })
        .collect();
    for h in writers.into_iter().chain(readers) {
        h.join().unwrap();
    }
    while !vm.replies.lock().unwrap().is_empty() {
        vm.deliver_one();
    }
    for k in 0..4u8 {
        let key = vec![b'k', k];
        if let Some(v) = vm.lookup(&key) {
            assert_eq!(d.get(&key).unwrap().map(|g| g.1), Some(v), "the cache kept a stale version of {key:?}");
        }
    }
}
