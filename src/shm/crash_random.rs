//! The random-kill test: several child processes hammer counters, compare-and-swap counters,
//! sets and deletes on shared dicts, and dicts of their own, while the parent SIGKILLs one at
//! a random moment, over and over. After every kill the store must pass `check()`; at the
//! end every counter equals its acknowledged increments (plus at most the ones in flight at a
//! kill), no two increments returned the same value, and every key holds what its last
//! acknowledged write left (or what the write in flight at a kill would have left).

use crate::shm::Ungated;
use super::crash_child::{self as child, hex, unhex, value, Rng};
use super::crash_tests::{reap, spawn, Child};
use super::tests::{assert_clean, owner, temp_store};
use super::{DictRef, Error, Store};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// One counter's history.
#[derive(Default)]
struct Counter {
    acked: u64,
    in_flight: u64,
    returned: HashSet<u64>,
}

/// What the children acknowledged, merged over all lives.
#[derive(Default)]
struct Model {
    counters: HashMap<String, Counter>,
    /// Every state a set key may be in: `None` absent, or the (seed, len) of its value.
    keys: HashMap<String, Vec<Option<(u64, usize)>>>,
    acked_ops: u64,
}

/// A child's own dict, as its records tell.
struct Own {
    id: u64,
    token: Vec<u8>,
    destroy: Step,
    give_away: Step,
}

#[derive(PartialEq, Clone, Copy)]
enum Step {
    No,
    InFlight,
    Done,
}

impl Model {
    /// Takes in one dead life's records; returns its own dicts and whether it died creating one.
    fn absorb(&mut self, records: &[String]) -> (Vec<Own>, bool) {
        let mut own: Vec<Own> = Vec::new();
        let mut pending: Option<Vec<String>> = None;
        for r in records {
            let f: Vec<String> = r.split(' ').map(str::to_string).collect();
            let f: Vec<&str> = f.iter().map(String::as_str).collect();
            match f[..] {
                ["B", ..] => pending = Some(f[1..].iter().map(|s| s.to_string()).collect()),
                ["A", ..] => {
                    self.acked_ops += 1;
                    if let Some(begin) = pending.take() {
                        self.settle(&begin.iter().map(String::as_str).collect::<Vec<_>>());
                    }
                    self.acknowledge(&f[1..], &mut own);
                }
                _ => {}
            }
        }
        let creating = pending.as_ref().is_some_and(|p| p[0] == "N");
        if let Some(p) = pending {
            self.in_flight(&p.iter().map(String::as_str).collect::<Vec<_>>(), &mut own);
        }
        (own, creating)
    }

    fn acknowledge(&mut self, f: &[&str], own: &mut Vec<Own>) {
        match *f {
            ["I", k, v] | ["C", k, v] => {
                let c = self.counters.entry(format!("{}{k}", if f[0] == "I" { "ctr" } else { "cas" })).or_default();
                c.acked += 1;
                assert!(c.returned.insert(v.parse().unwrap()), "two increments of {}{k} returned {v}: a lost update", f[0]);
            }
            ["N", id, token] => own.push(Own { id: id.parse().unwrap(), token: unhex(token), destroy: Step::No, give_away: Step::No }),
            ["X", id] => own.iter_mut().filter(|o| o.id.to_string() == id).for_each(|o| o.destroy = Step::Done),
            ["G", id] => own.iter_mut().filter(|o| o.id.to_string() == id).for_each(|o| o.give_away = Step::Done),
            // Sets and deletes: their state comes from the begin record (see `settle`).
            _ => {}
        }
    }

    fn in_flight(&mut self, p: &[&str], own: &mut [Own]) {
        match *p {
            ["I", k] => self.counters.entry(format!("ctr{k}")).or_default().in_flight += 1,
            ["C", k] => self.counters.entry(format!("cas{k}")).or_default().in_flight += 1,
            ["S", key, seed, len] => self.keys.entry(key.to_string()).or_insert_with(|| vec![None]).push(Some((seed.parse().unwrap(), len.parse().unwrap()))),
            ["D", key] => self.keys.entry(key.to_string()).or_insert_with(|| vec![None]).push(None),
            ["X", id] => own.iter_mut().filter(|o| o.id.to_string() == id).for_each(|o| o.destroy = Step::InFlight),
            ["G", id] => own.iter_mut().filter(|o| o.id.to_string() == id).for_each(|o| o.give_away = Step::InFlight),
            _ => {}
        }
    }

    /// An acknowledged set or delete: the key is now in exactly that state.
    fn settle(&mut self, begin: &[&str]) {
        match *begin {
            ["S", key, seed, len] => {
                self.keys.insert(key.to_string(), vec![Some((seed.parse().unwrap(), len.parse().unwrap()))]);
            }
            ["D", key] => {
                self.keys.insert(key.to_string(), vec![None]);
            }
            _ => {}
        }
    }
}

/// Checks a dead life's own dicts against its records, then drops its owners (as the VM does
/// when an owner dies): exactly the dicts still live go, plus the one it died creating.
fn check_own_dicts(store: &Store, life: u64, own: &[Own], creating: bool) {
    let mut live = HashSet::new();
    for o in own {
        match store.lookup(o.id, &o.token) {
            Ok(_) => {
                assert!(o.destroy != Step::Done, "life {life}: dict {} survived its acknowledged destroy", o.id);
                let now = store.owner(o.id, &o.token).unwrap();
                let (before, after) = (owner(life as u32), owner(life as u32 + 1_000_000));
                match o.give_away {
                    Step::No => assert_eq!(now, before, "life {life}"),
                    Step::Done => assert_eq!(now, after, "life {life}"),
                    Step::InFlight => assert!(now == before || now == after, "life {life}: half-written owner"),
                }
                live.insert(o.id);
            }
            Err(Error::Destroyed) => assert!(o.destroy != Step::No, "life {life}: dict {} vanished", o.id),
            Err(e) => panic!("life {life}: {e:?}"),
        }
    }
    let mut gone: HashSet<u64> = store.drop_owner(&owner(life as u32), &Ungated).unwrap().into_iter().collect();
    gone.extend(store.drop_owner(&owner(life as u32 + 1_000_000), &Ungated).unwrap());
    let unknown = gone.difference(&live).count();
    assert!(live.is_subset(&gone), "life {life}: drop_owner missed a live dict");
    assert!(unknown <= usize::from(creating), "life {life}: {unknown} dicts nobody created");
}

/// The end: counters and keys against the model.
fn check_final(counters: &DictRef, sets: &DictRef, model: &Model) {
    for (key, c) in &model.counters {
        let v = counters.get(key.as_bytes()).unwrap().map_or(0, |(b, _)| u64::from_le_bytes(b.try_into().unwrap()));
        assert!(v >= c.acked && v <= c.acked + c.in_flight, "{key} = {v}: {} acknowledged, {} in flight", c.acked, c.in_flight);
        assert!(c.returned.iter().all(|&r| r <= v), "{key}: an increment returned more than the final value");
    }
    for (key, states) in &model.keys {
        let now = sets.get(key.as_bytes()).unwrap().map(|(b, _)| b);
        let ok = states.iter().any(|s| now == s.map(|(seed, len)| value(seed, len)));
        assert!(ok, "{key}: holds {:?} bytes, not what its last acknowledged write left", now.map(|v| v.len()));
    }
}

/// Runs `kills` random kills with `concurrent` children at once; returns (acked ops, recoveries).
fn random_kills(kills: u64, concurrent: u64, seed: u64) -> (u64, u64) {
    let t = temp_store(256 << 20);
    let store = &t.store;
    let counters = store.create_dict(&owner(0)).unwrap();
    let sets = store.create_dict(&owner(0)).unwrap();
    let dicts = format!("{}:{},{}:{}", counters.id(), hex(counters.token()), sets.id(), hex(sets.token()));
    let mut rng = Rng(seed);
    let mut life = 0;
    let start = |slot: u64, life: &mut u64| -> Child {
        *life += 1;
        let envs = [
            (child::ROLE, "hammer".to_string()),
            (child::PATH, t.path.display().to_string()),
            (child::LIFE, life.to_string()),
            (child::SLOT, slot.to_string()),
            (child::DICTS, dicts.clone()),
        ];
        spawn(&envs, *life)
    };
    let mut running: Vec<Option<Child>> = (0..concurrent).map(|s| Some(start(s, &mut life))).collect();
    let mut model = Model::default();
    let finish = |c: Child, model: &mut Model| {
        let life = c.life;
        let (records, killed) = reap(c, true);
        assert!(killed, "life {life} ended by itself (a failed operation?): {:?}", records.last());
        let (own, creating) = model.absorb(&records);
        check_own_dicts(store, life, &own, creating);
    };
    for _ in 0..kills {
        let slot = (rng.next() % concurrent) as usize;
        let c = running[slot].take().expect("a child in every slot");
        wait_for_first_ack(&c);
        std::thread::sleep(Duration::from_micros(rng.next() % 4000));
        finish(c, &mut model);
        assert_clean(store);
        running[slot] = Some(start(slot as u64, &mut life));
    }
    for c in running.into_iter().flatten() {
        wait_for_first_ack(&c);
        finish(c, &mut model);
    }
    assert_clean(store);
    check_final(&counters, &sets, &model);
    (model.acked_ops, store.stats().recoveries)
}

/// A kill before the child did anything tests nothing: wait until it has acknowledged an
/// operation (bounded: a child that cannot start fails the test).
fn wait_for_first_ack(c: &Child) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while c.acked.load(std::sync::atomic::Ordering::Relaxed) == 0 {
        assert!(Instant::now() < deadline, "life {} never acknowledged an operation", c.life);
        std::thread::sleep(Duration::from_micros(200));
    }
}

/// 120 kills: part of every `cargo test`.
#[test]
fn children_killed_at_random_moments_lose_nothing_acknowledged() {
    let started = Instant::now();
    let (acked, recoveries) = random_kills(120, 3, 0x5eed_0001);
    eprintln!("shm random kills: 120 kills, {acked} acknowledged operations, {recoveries} locks repaired, {:.1} s", started.elapsed().as_secs_f64());
    assert!(acked >= 120, "every life acknowledged at least one operation");
}

/// Thousands of kills, for `make soak` (PYPORT_SHM_KILLS sets how many; default 3000).
#[test]
#[ignore = "long: run by make soak"]
fn soak_children_killed_at_random_moments() {
    let kills = std::env::var("PYPORT_SHM_KILLS").ok().and_then(|s| s.parse().ok()).unwrap_or(3000);
    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64) | 1;
    let started = Instant::now();
    let (acked, recoveries) = random_kills(kills, 3, seed);
    eprintln!("shm soak: {kills} kills (seed {seed:#x}), {acked} acknowledged operations, {recoveries} locks repaired, {:.1} s", started.elapsed().as_secs_f64());
}
