//! Multi-thread stress tests against models: many threads, through two mappings of the same
//! file, on shared and private keys, with dicts created and destroyed under their feet.

use super::crash_child::Rng;
use super::tests::{assert_clean, owner, temp_store};
use super::{DictRef, Error, Invalidation, Store, Update};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering::*};
use std::sync::{Arc, Barrier, Mutex};
use std::thread;

fn incr(d: &DictRef, key: &[u8]) -> u64 {
    d.update(key, |cur| {
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
                    d.set(&key, &v).unwrap();
                    model.insert(key, v);
                }
                4 => {
                    assert_eq!(d.del(&key).unwrap(), model.remove(&key).is_some());
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
                    if d.replace_if_version(b"cas", seen.map(|s| s.1), &next.to_le_bytes()).unwrap() {
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
                    if let Err(e) = d.set(b"other", b"x") {
                        assert_eq!(e, Error::Destroyed);
                    }
                }
                (reached, gone)
            })
        })
        .collect();
    for _ in 0..3000 {
        let d = t.store.create_dict(&owner(1)).unwrap();
        d.set(b"me", &d.id().to_le_bytes()).unwrap();
        *current.lock().unwrap() = Some(d.clone());
        thread::yield_now();
        t.store.destroy(d.id(), d.token()).unwrap();
    }
    stop.store(true, Relaxed);
    for r in readers {
        r.join().unwrap();
    }
    assert_eq!(t.store.stats().dicts, 0);
    assert_clean(&t.store);
}

/// The VM's read cache, simulated from what the store reports: replies sent under the lock by
/// `mark_cached_if_version` and invalidations from writers on other threads, in one queue.
/// Whatever the interleaving, the simulated cache never ends up holding a stale version.
#[test]
fn a_cache_fed_by_replies_and_invalidations_never_ends_stale() {
    #[derive(Debug)]
    enum Event {
        Reply(Vec<u8>, u64),
        Forget(Option<Vec<u8>>),
    }
    let t = temp_store(8 << 20);
    let queue: Arc<Mutex<Vec<Event>>> = Default::default();
    let sink = queue.clone();
    t.store.set_invalidator(Box::new(move |w| {
        sink.lock().unwrap().push(match w {
            Invalidation::Key { key, .. } => Event::Forget(Some(key.to_vec())),
            Invalidation::Dict { .. } => Event::Forget(None),
        })
    }));
    let d = t.store.create_dict(&owner(1)).unwrap();
    let writers: Vec<_> = (0..2u64)
        .map(|n| {
            let d = d.clone();
            thread::spawn(move || {
                let mut rng = Rng(n + 11);
                for i in 0..20_000u64 {
                    let key = [b'k', (rng.next() % 4) as u8];
                    match i % 50 {
                        0 => drop(d.del(&key).unwrap()),
                        1 if n == 0 && i % 1000 == 1 => d.clear().unwrap(),
                        _ => drop(d.set(&key, &i.to_le_bytes()).unwrap()),
                    }
                }
            })
        })
        .collect();
    let reader = {
        let (d, queue) = (d.clone(), queue.clone());
        thread::spawn(move || {
            for i in 0..40_000u64 {
                let key = [b'k', (i % 4) as u8];
                if let Some((_, v)) = d.get(&key).unwrap() {
                    d.mark_cached_if_version(&key, v, || queue.lock().unwrap().push(Event::Reply(key.to_vec(), v)));
                }
            }
        })
    };
    for w in writers {
        w.join().unwrap();
    }
    reader.join().unwrap();
    let mut cache: HashMap<Vec<u8>, u64> = HashMap::new();
    for e in queue.lock().unwrap().drain(..) {
        match e {
            Event::Reply(k, v) => drop(cache.insert(k, v)),
            Event::Forget(Some(k)) => drop(cache.remove(&k)),
            Event::Forget(None) => cache.clear(),
        }
    }
    for (k, v) in cache {
        assert_eq!(d.get(&k).unwrap().map(|g| g.1), Some(v), "the cache kept a stale version of {k:?}");
    }
}
